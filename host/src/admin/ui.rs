//! The dashboard's static files, built into the binary. They hold no data (everything comes
//! through `/v1`), so they are served to anyone; a strict Content-Security-Policy allows only
//! these files and the one inline import map, by its hash.

use std::sync::LazyLock;

use base64::Engine;
use http::{HeaderValue, Method, Response, StatusCode, header};

use crate::body::ProxyBody;

/// Each file: its path under `/ui/`, its content type and its bytes.
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../../ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../../ui/style.css"),
    ),
    (
        "vendor/preact.module.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/vendor/preact.module.js"),
    ),
    (
        "vendor/hooks.module.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/vendor/hooks.module.js"),
    ),
    (
        "vendor/htm.module.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/vendor/htm.module.js"),
    ),
    (
        "vendor/uPlot.esm.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/vendor/uPlot.esm.js"),
    ),
    (
        "vendor/uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../../ui/vendor/uPlot.min.css"),
    ),
];

/// The policy: scripts, styles and fetches from this origin only, plus the import map.
static POLICY: LazyLock<HeaderValue> = LazyLock::new(|| {
    let index = std::str::from_utf8(FILES[0].2).expect("index.html is UTF-8");
    let import_map = index
        .split_once("<script type=\"importmap\">")
        .and_then(|(_, rest)| rest.split_once("</script>"))
        .map(|(map, _)| map)
        .expect("index.html has an import map");
    let digest = <sha2::Sha256 as sha2::Digest>::digest(import_map.as_bytes());
    let hash = base64::engine::general_purpose::STANDARD.encode(digest);
    HeaderValue::from_str(&format!(
        "default-src 'none'; script-src 'self' 'sha256-{hash}'; style-src 'self'; \
         connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; \
         base-uri 'none'"
    ))
    .expect("the policy is a header value")
});

/// Serves one of the dashboard's files; `/ui` and `/ui/` are the page itself.
pub(super) fn serve(method: &Method, path: &str) -> Response<ProxyBody> {
    if method != Method::GET && method != Method::HEAD {
        return super::api::error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
    let name = path
        .strip_prefix("/ui")
        .unwrap_or_default()
        .trim_start_matches('/');
    let name = if name.is_empty() { "index.html" } else { name };
    let Some((_, content_type, bytes)) = FILES.iter().find(|(file, _, _)| *file == name) else {
        return super::api::error(StatusCode::NOT_FOUND, "no such dashboard file");
    };
    let mut response = Response::new(if method == Method::HEAD {
        ProxyBody::Empty
    } else {
        ProxyBody::full(*bytes)
    });
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, POLICY.clone());
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_served_with_a_policy_and_nothing_else_is() {
        let page = serve(&Method::GET, "/ui/");
        assert_eq!(page.status(), StatusCode::OK);
        let policy = page.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        assert!(policy.contains("script-src 'self' 'sha256-"), "{policy}");
        assert_eq!(serve(&Method::GET, "/ui/app.js").status(), StatusCode::OK);
        // The charts' library and its styles; no inline style is needed for them.
        assert_eq!(
            serve(&Method::GET, "/ui/vendor/uPlot.esm.js").status(),
            StatusCode::OK
        );
        assert_eq!(
            serve(&Method::GET, "/ui/vendor/uPlot.min.css").status(),
            StatusCode::OK
        );
        assert!(policy.contains("style-src 'self';"), "{policy}");
        for missing in [
            "/ui/../Cargo.toml",
            "/ui/vendor/",
            "/ui/app.js/",
            "/ui/x.js",
        ] {
            assert_eq!(
                serve(&Method::GET, missing).status(),
                StatusCode::NOT_FOUND,
                "{missing}"
            );
        }
        assert_eq!(
            serve(&Method::POST, "/ui/").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
