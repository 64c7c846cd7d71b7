//! Which of a component's imports its plugin entry allows: checked once, when the module loads.

use crate::config::{Grants, WasiGrant};

/// What the gateway offers for one imported interface.
#[derive(Debug, PartialEq, Eq)]
enum Offer {
    /// Every plugin may import it: it reaches nothing outside the plugin.
    Inert,
    /// Only with this grant.
    Granted(&'static str, bool),
    /// Not something the gateway provides.
    Unknown,
}

/// `wasi:io/streams@0.2.6` → `wasi:io/streams`.
fn unversioned(import: &str) -> &str {
    import.split_once('@').map_or(import, |(name, _)| name)
}

fn offer(import: &str, grants: &Grants) -> Offer {
    let wasi = |grant| grants.wasi.contains(&grant);
    if let Some(function) = import.strip_prefix("env.") {
        return filter_offer(function);
    }
    if let Some(function) = import
        .strip_prefix("wasi_snapshot_preview1.")
        .or_else(|| import.strip_prefix("wasi_unstable."))
    {
        return match function {
            "clock_time_get" | "clock_res_get" => {
                Offer::Granted("wasi: [clocks]", wasi(WasiGrant::Clocks))
            }
            "random_get" => Offer::Granted("wasi: [random]", wasi(WasiGrant::Random)),
            name if name.starts_with("path_")
                || name.starts_with("sock_")
                || name.starts_with("fd_prestat")
                || name == "fd_readdir" =>
            {
                Offer::Granted("wasi: [runtime]", wasi(WasiGrant::Runtime))
            }
            // Output, exit, an empty environment and arguments: plumbing, as for components.
            _ => Offer::Inert,
        };
    }
    match unversioned(import) {
        "weir:plugin/http" | "weir:plugin/response-edits" | "weir:plugin/kv-scope" => Offer::Inert,
        // Linked for every plugin, so that one which can also work without consumers (key-auth
        // with inline keys) loads without the grant; each call checks `grants.consumers`.
        "weir:plugin/consumers" | "weir:plugin/consumer-credentials" => Offer::Inert,
        "weir:plugin/routing" | "weir:plugin/fallbacks" => {
            Offer::Granted("routing: true", grants.routing)
        }
        "weir:plugin/log" => Offer::Granted("log: true", grants.log),
        "weir:plugin/clock" => Offer::Granted("clock: true", grants.clock),
        "weir:plugin/kv" => Offer::Granted("kv: true", grants.kv),
        "weir:plugin/metrics" | "weir:plugin/ai-metrics" => {
            Offer::Granted("metrics: true", grants.metrics)
        }
        "weir:plugin/http-client" => Offer::Granted("http: {hosts: [..]}", grants.http.is_some()),
        "weir:plugin/tracing" => Offer::Granted("tracing: true", grants.tracing),
        // Streams and exit are plumbing; stdin is empty, the environment and arguments are
        // empty, and there is no terminal. Output is dropped unless `stdio` is granted.
        "wasi:io/error"
        | "wasi:io/poll"
        | "wasi:io/streams"
        | "wasi:cli/exit"
        | "wasi:cli/environment"
        | "wasi:cli/stdin"
        | "wasi:cli/stdout"
        | "wasi:cli/stderr"
        | "wasi:cli/terminal-input"
        | "wasi:cli/terminal-output"
        | "wasi:cli/terminal-stdin"
        | "wasi:cli/terminal-stdout"
        | "wasi:cli/terminal-stderr" => Offer::Inert,
        name if name.starts_with("wasi:clocks/") => {
            Offer::Granted("wasi: [clocks]", wasi(WasiGrant::Clocks))
        }
        name if name.starts_with("wasi:random/") => {
            Offer::Granted("wasi: [random]", wasi(WasiGrant::Random))
        }
        // Never reachable: with `runtime` granted they are linked with no directory, no
        // network and no name lookup behind them, for runtimes whose libc imports them.
        name if name.starts_with("wasi:filesystem/") || name.starts_with("wasi:sockets/") => {
            Offer::Granted("wasi: [runtime]", wasi(WasiGrant::Runtime))
        }
        _ => Offer::Unknown,
    }
}

/// What a proxy-wasm filter's `env` import needs at load time: nothing. The SDKs import every
/// host function whether or not the filter calls it, so a filter's grants are checked when it
/// calls one (see `proxy_wasm/imports.rs`), and a call without its grant fails the call.
fn filter_offer(function: &str) -> Offer {
    if FILTER_FUNCTIONS.contains(&function) {
        Offer::Inert
    } else {
        Offer::Unknown
    }
}

/// Every `env` function of proxy-wasm 0.2.0 and 0.2.1 that Weir links.
pub const FILTER_FUNCTIONS: &[&str] = &[
    "proxy_log",
    "proxy_get_log_level",
    "proxy_get_current_time_nanoseconds",
    "proxy_set_tick_period_milliseconds",
    "proxy_get_buffer_bytes",
    "proxy_get_buffer_status",
    "proxy_set_buffer_bytes",
    "proxy_get_header_map_pairs",
    "proxy_get_header_map_size",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_add_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_get_property",
    "proxy_set_property",
    "proxy_continue_stream",
    "proxy_continue_request",
    "proxy_continue_response",
    "proxy_close_stream",
    "proxy_send_local_response",
    "proxy_http_call",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_define_metric",
    "proxy_increment_metric",
    "proxy_record_metric",
    "proxy_get_metric",
    "proxy_set_effective_context",
    "proxy_done",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
    "proxy_get_status",
    "proxy_call_foreign_function",
];

/// The imports the gateway does not provide at all, whatever the grants.
pub fn unknown(imports: &[String]) -> Vec<&str> {
    imports
        .iter()
        .filter(|import| offer(import, &Grants::default()) == Offer::Unknown)
        .map(String::as_str)
        .collect()
}

/// What a plugin entry's grants say of one import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It may be imported.
    Allowed,
    /// Only with this grant, which the entry lacks (as the YAML that adds it).
    NotGranted(&'static str),
    /// The gateway does not provide it, whatever the grants.
    Unprovided,
}

impl std::fmt::Display for Verdict {
    /// `ok`, or what would allow the import.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Allowed => f.write_str("ok"),
            Verdict::NotGranted(grant @ "wasi: [runtime]") => write!(
                f,
                "not granted; add grants: {{{grant}}}, which links it with no files or network \
                 behind it: nothing is ever reachable"
            ),
            Verdict::NotGranted(grant) => write!(f, "not granted; add grants: {{{grant}}}"),
            Verdict::Unprovided => f.write_str("the gateway does not provide it"),
        }
    }
}

/// What `grants` say of `import`.
pub fn verdict(import: &str, grants: &Grants) -> Verdict {
    match offer(import, grants) {
        Offer::Inert | Offer::Granted(_, true) => Verdict::Allowed,
        Offer::Granted(grant, false) => Verdict::NotGranted(grant),
        Offer::Unknown => Verdict::Unprovided,
    }
}

/// Checks every import of a component against its entry's grants; the error names each refused
/// import and what would allow it.
pub fn check(imports: &[String], grants: &Grants) -> Result<(), String> {
    let refused: Vec<String> = imports
        .iter()
        .filter_map(|import| match verdict(import, grants) {
            Verdict::Allowed => None,
            refused => Some(format!("{import} ({refused})")),
        })
        .collect();
    if refused.is_empty() {
        Ok(())
    } else {
        Err(format!("the module imports {}", refused.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HttpGrant;

    fn imports(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn inert_imports_need_no_grant() {
        let rust_std = imports(&[
            "weir:plugin/http@0.1.0",
            "wasi:io/streams@0.2.6",
            "wasi:cli/environment@0.2.6",
            "wasi:cli/stderr@0.2.6",
            "wasi:cli/terminal-stderr@0.2.6",
        ]);
        check(&rust_std, &Grants::default()).unwrap();
    }

    #[test]
    fn host_functions_need_their_grant() {
        let kv = imports(&["weir:plugin/kv@0.1.0", "weir:plugin/log@0.1.0"]);
        let err = check(&kv, &Grants::default()).unwrap_err();
        assert!(
            err.contains("weir:plugin/kv@0.1.0 (not granted; add grants: {kv: true})"),
            "{err}"
        );
        assert!(err.contains("weir:plugin/log@0.1.0"), "{err}");
        let granted = Grants {
            kv: true,
            log: true,
            ..Grants::default()
        };
        check(&kv, &granted).unwrap();
        let http = imports(&["weir:plugin/http-client@0.1.0"]);
        assert!(check(&http, &granted).is_err());
        let with_http = Grants {
            http: Some(HttpGrant {
                hosts: vec!["a:80".into()],
                methods: vec!["GET".into()],
                timeout_ms: 100,
                max_response_bytes: 100,
                private: false,
            }),
            ..Grants::default()
        };
        check(&http, &with_http).unwrap();
    }

    #[test]
    fn wasi_clocks_random_files_and_sockets_each_need_their_grant() {
        let clocks = imports(&[
            "wasi:clocks/monotonic-clock@0.2.6",
            "wasi:random/random@0.2.6",
        ]);
        assert!(
            check(&clocks, &Grants::default())
                .unwrap_err()
                .contains("wasi: [clocks]")
        );
        let grants = Grants {
            wasi: vec![WasiGrant::Clocks, WasiGrant::Random],
            ..Grants::default()
        };
        check(&clocks, &grants).unwrap();
        let files = imports(&["wasi:filesystem/preopens@0.2.6", "wasi:sockets/tcp@0.2.6"]);
        let err = check(&files, &grants).unwrap_err();
        assert!(
            err.contains(
                "wasi:filesystem/preopens@0.2.6 (not granted; add grants: {wasi: [runtime]}"
            ),
            "{err}"
        );
        assert!(err.contains("nothing is ever reachable"), "{err}");
        assert!(err.contains("wasi:sockets/tcp@0.2.6"), "{err}");
        let runtime = Grants {
            wasi: vec![WasiGrant::Runtime],
            ..Grants::default()
        };
        check(&files, &runtime).unwrap();
        assert!(
            check(&imports(&["acme:evil/backdoor"]), &grants)
                .unwrap_err()
                .contains("does not provide")
        );
    }
}
