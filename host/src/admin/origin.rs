//! Where an admin request says it comes from: the `Host` it was sent to (against DNS
//! rebinding) and the page that sent it (`Origin`, `Sec-Fetch-Site`: against cross-site
//! writes). Browsers set these headers and pages cannot forge them; tools such as curl send
//! neither `Origin` nor `Sec-Fetch-Site`, and are let through on their key.

use std::net::IpAddr;

use http::{HeaderMap, Uri, header};

/// The authority a request was sent to: HTTP/2's `:authority` (or an absolute URI), else
/// `Host`.
pub fn authority<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    match uri.authority() {
        Some(authority) => Some(authority.as_str()),
        None => headers.get(header::HOST)?.to_str().ok(),
    }
}

/// The host name of an authority, without port, brackets or one trailing dot, in lower case;
/// `None` for user info or a port that is not digits.
fn host_name(authority: &str) -> Option<String> {
    if authority.contains('@') {
        return None;
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (host, rest) = v6.split_once(']')?;
            (host, rest.strip_prefix(':'))
        }
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if port.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// Whether the admin listener on `listener` serves a request sent to `authority`: the
/// listener's own address (any address, when it listens on all of them), `localhost`, or a
/// name in `admin.hosts`. A rebinding attack needs a name the attacker controls, so every other
/// name is refused.
pub fn host_allowed(authority: Option<&str>, listener: IpAddr, allowed: &[String]) -> bool {
    let Some(host) = authority.and_then(host_name) else {
        return false;
    };
    if host == "localhost" {
        return true;
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        let listener = listener.to_canonical();
        return listener.is_unspecified() || ip.to_canonical() == listener;
    }
    allowed
        .iter()
        .any(|name| host_name(name).is_some_and(|name| name == host))
}

/// Why a browser's request was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CrossSite {
    /// `Sec-Fetch-Site` says another site sent it.
    #[error("a cross-site request to the admin API is refused (Sec-Fetch-Site)")]
    FetchSite,
    /// `Origin` is not the admin listener's own.
    #[error("a request from another origin to the admin API is refused (Origin)")]
    Origin,
}

/// Checks that a request that writes, or reads a CSRF token, came from the admin listener's
/// own pages (or from no page at all). `tls` says which scheme the listener's origin has.
pub fn same_origin(uri: &Uri, headers: &HeaderMap, tls: bool) -> Result<(), CrossSite> {
    if let Some(site) = headers.get("sec-fetch-site") {
        // `none`: the user started it (a typed address, a bookmark), not a page.
        if !matches!(site.as_bytes(), b"same-origin" | b"none") {
            return Err(CrossSite::FetchSite);
        }
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let scheme = if tls { "https://" } else { "http://" };
    let expected = authority(uri, headers).map(|host| format!("{scheme}{host}"));
    match (origin.to_str(), expected) {
        (Ok(origin), Some(expected)) if origin.eq_ignore_ascii_case(&expected) => Ok(()),
        _ => Err(CrossSite::Origin),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn a_rebound_name_is_refused_and_the_listeners_own_names_are_served() {
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        let none: &[String] = &[];
        for host in [
            "127.0.0.1:9180",
            "127.0.0.1",
            "localhost:9180",
            "LOCALHOST.",
        ] {
            assert!(host_allowed(Some(host), loopback, none), "{host}");
        }
        for host in [
            "attacker.example:9180",
            "127.0.0.2:9180",
            "[::1]:9180",
            "x@127.0.0.1",
            "127.0.0.1:abc",
            "localhost:",
            "",
        ] {
            assert!(!host_allowed(Some(host), loopback, none), "{host}");
        }
        assert!(!host_allowed(None, loopback, none));
        let listed = ["Admin.Example.com".to_owned()];
        assert!(host_allowed(
            Some("admin.example.com.:9180"),
            loopback,
            &listed
        ));
        // On every address, any address is the listener's; names still need listing.
        let any: IpAddr = "::".parse().unwrap();
        assert!(host_allowed(Some("[2001:db8::7]:9180"), any, none));
        assert!(host_allowed(Some("10.1.2.3"), any, none));
        assert!(!host_allowed(Some("gw.internal"), any, none));
    }

    #[test]
    fn a_write_from_another_site_is_refused_and_one_from_no_page_is_not() {
        let uri: Uri = "/v1/routes/a".parse().unwrap();
        let own = headers(&[
            ("host", "127.0.0.1:9180"),
            ("origin", "http://127.0.0.1:9180"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert_eq!(same_origin(&uri, &own, false), Ok(()));
        // The same page over TLS has an https origin.
        assert_eq!(same_origin(&uri, &own, true), Err(CrossSite::Origin));
        let curl = headers(&[("host", "127.0.0.1:9180")]);
        assert_eq!(same_origin(&uri, &curl, false), Ok(()));
        for (name, value, refusal) in [
            ("origin", "http://evil.example", CrossSite::Origin),
            ("origin", "null", CrossSite::Origin),
            ("origin", "http://127.0.0.1:9181", CrossSite::Origin),
            ("sec-fetch-site", "cross-site", CrossSite::FetchSite),
            ("sec-fetch-site", "same-site", CrossSite::FetchSite),
        ] {
            let sent = headers(&[("host", "127.0.0.1:9180"), (name, value)]);
            assert_eq!(same_origin(&uri, &sent, false), Err(refusal), "{value}");
        }
    }
}
