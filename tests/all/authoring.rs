//! The plugin author's tools: `weir plugin check` and `weir plugin test`, as library calls.

use weir::authoring::{TestRequest, TestUpstream, check, run};
use weir::config::Grants;
use weir::plugin::grants::Verdict;
use weir_tests::plugins;

fn all_grants() -> Grants {
    serde_json::from_value(serde_json::json!({
        "log": true, "clock": true, "kv": true, "metrics": true, "http": {"hosts": []},
        "wasi": ["clocks", "random", "stdio", "runtime"],
    }))
    .unwrap()
}

fn request(target: &str, headers: &[(&str, &str)]) -> TestRequest {
    TestRequest {
        method: "GET".into(),
        target: target.into(),
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
        body: Vec::new(),
        client_ip: "127.0.0.1".parse().unwrap(),
    }
}

fn upstream(content_type: &str, body: &str) -> TestUpstream {
    TestUpstream {
        status: 200,
        headers: vec![("content-type".into(), content_type.into())],
        body: body.as_bytes().to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_world_the_imports_and_the_verdict() {
    let report = check(
        std::fs::read(plugins::REQUEST_ID).unwrap(),
        &Grants::default(),
    )
    .await
    .unwrap();
    assert_eq!(report.exports.as_deref(), Some("weir:plugin/filter@0.1.0"));
    assert!(
        report
            .imports
            .iter()
            .any(|i| i.import == "weir:plugin/http@0.1.0" && i.verdict == Verdict::Allowed)
    );
    assert!(report.loads.is_ok());

    let report = check(std::fs::read(plugins::PROBE).unwrap(), &Grants::default())
        .await
        .unwrap();
    let kv = report
        .imports
        .iter()
        .find(|i| i.import == "weir:plugin/kv@0.1.0")
        .unwrap();
    assert_eq!(kv.verdict, Verdict::NotGranted("kv: true"));
    assert_eq!(
        kv.verdict.to_string(),
        "not granted; add grants: {kv: true}"
    );
    assert!(report.loads.unwrap_err().contains("weir:plugin/kv@0.1.0"));

    let report = check(std::fs::read(plugins::FS_READER).unwrap(), &all_grants())
        .await
        .unwrap();
    assert!(
        report.loads.is_ok(),
        "with `runtime` the filesystem is linked, empty"
    );

    let report = check(
        b"\0asm\x01\0\0\0 not a component".to_vec(),
        &Grants::default(),
    )
    .await
    .unwrap();
    assert!(
        report
            .loads
            .unwrap_err()
            .contains("module does not compile")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_reports_edits_kv_and_logs_for_each_language() {
    // Rust: a header edit, a kv counter, a log line, a response edit.
    let report = run(
        std::fs::read(plugins::RUST_EXAMPLE).unwrap(),
        r#"{"header": "x-stamp"}"#,
        all_grants(),
        request("/shop?item=1", &[]),
        upstream("text/plain", "hi"),
    )
    .await
    .unwrap();
    assert_eq!(report.action.as_deref(), Some("continue"));
    assert_eq!(report.request_edits, ["header x-stamp: 1"]);
    assert_eq!(report.response_edits, ["header x-stamped: yes"]);
    assert_eq!(report.kv, [("requests".to_string(), "1".to_string())]);
    assert_eq!(
        report.logs,
        [("info".to_string(), "stamp has seen 1 requests".to_string())]
    );

    // Python: its init refuses a bad config, with its own reason.
    let python = std::fs::read(plugins::PYTHON_EXAMPLE).unwrap();
    let rejected = run(
        python.clone(),
        r#"{"percent_b": 500}"#,
        all_grants(),
        request("/", &[]),
        upstream("text/plain", ""),
    )
    .await
    .unwrap();
    assert!(
        matches!(&rejected.init, Some(Err(reason)) if reason.contains("percent_b")),
        "{:?}",
        rejected.init
    );
    let report = run(
        python,
        r#"{"percent_b": 100}"#,
        all_grants(),
        request("/", &[("x-user", "ada")]),
        upstream("text/plain", ""),
    )
    .await
    .unwrap();
    assert_eq!(report.request_edits, ["header x-ab-variant: b"]);
    assert!(
        report
            .kv
            .contains(&("variant:ada".to_string(), "b".to_string())),
        "{:?}",
        report.kv
    );
    assert_eq!(
        report.logs,
        [("info".to_string(), "assigned ada to variant b".to_string())]
    );

    // JavaScript: a body edit on the response.
    let report = run(
        std::fs::read(plugins::JS_EXAMPLE).unwrap(),
        r#"{"fields": ["password"]}"#,
        all_grants(),
        request("/", &[]),
        upstream("application/json", r#"{"password":"x","name":"ada"}"#),
    )
    .await
    .unwrap();
    assert!(
        report
            .response_edits
            .contains(&r#"body {"password":"[redacted]","name":"ada"}"#.to_string()),
        "{:?}",
        report.response_edits
    );

    // A failing plugin's failure is reported, not hidden.
    let report = run(
        std::fs::read(plugins::PROBE).unwrap(),
        r#"{"mode": "panic"}"#,
        all_grants(),
        request("/", &[]),
        upstream("text/plain", ""),
    )
    .await
    .unwrap();
    assert!(report.failure.unwrap().contains("plugin trapped"));
}

/// `weir plugin test` must mean what the gateway does: the same plugin, the same request, the
/// same upstream answer, and the same edits to what the client gets, whether the plugin
/// replied in on-request (on-response still runs) or let the request through, and with the
/// response headers it queued in on-request applied either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_test_and_the_gateway_agree_on_what_the_client_gets() {
    use weir_tests::{TestGateway, Upstream, get, yaml};
    let config = serde_json::json!({"mode": "mark-and-deny", "deny": "/deny"});
    let up = Upstream::start("u").await;
    let gateway = TestGateway::start(&yaml(serde_json::json!({
        "upstreams": [{"id": "u", "nodes": [{"host": "127.0.0.1", "port": up.addr.port(), "weight": 1}]}],
        "plugins": [weir_tests::probe_entry("probe", serde_json::json!({}))],
        "routes": [{"id": "r", "uri": "/*", "upstream_id": "u", "plugins": [
            {"name": "probe", "config": config},
        ]}],
    })))
    .await;
    for path in ["/deny", "/ok"] {
        let answer = get(&gateway.url(path)).await;
        let report = run(
            std::fs::read(plugins::PROBE).unwrap(),
            &config.to_string(),
            all_grants(),
            request(path, &[]),
            upstream("text/plain", "hi"),
        )
        .await
        .unwrap();
        assert!(report.failure.is_none(), "{:?}", report.failure);
        let mut from_gateway: Vec<String> = answer
            .headers
            .iter()
            .filter(|(name, _)| name.as_str().starts_with("x-probe-"))
            .map(|(name, value)| format!("header {name}: {}", value.to_str().unwrap()))
            .collect();
        from_gateway.sort();
        let mut from_test: Vec<String> = report
            .response_edits
            .iter()
            .filter(|edit| edit.starts_with("header x-probe-"))
            .cloned()
            .collect();
        from_test.sort();
        assert_eq!(from_test, from_gateway, "{path}: {report}");
        let status = answer.status.as_u16().to_string();
        assert_eq!(
            from_gateway,
            [
                format!("header x-probe-marked: {status}"),
                "header x-probe-queued: request".to_string()
            ],
            "{path}"
        );
    }
}
