//! W3C trace context at the edge: a client's `traceparent` (and `tracestate`), checked, or a
//! trace the gateway starts; the gateway's own span as the parent the upstream sees; and
//! whether the request is sampled, which a client is believed about only when it is trusted.

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::config::TracingConfig;

/// The header that carries a request's place in a trace.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// The header that carries vendors' trace state, meaningful only beside a valid `traceparent`.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The longest `tracestate` passed on: the specification's 32 list members, at the length it
/// asks every vendor to keep whole.
const MAX_TRACESTATE: usize = 512;

/// The length of a version-00 `traceparent`: `00-` 32 hex `-` 16 hex `-` 2 hex.
const TRACEPARENT_LEN: usize = 55;

/// A request's place in a trace, as the gateway passes it on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace's id: the client's, or a new one.
    pub trace_id: [u8; 16],
    /// The client's span, the parent of the gateway's, when it sent a valid one.
    pub parent_id: Option<[u8; 8]>,
    /// The gateway's span for this request: the parent the upstream sees.
    pub span_id: [u8; 8],
    /// Whether the trace is sampled.
    pub sampled: bool,
}

impl TraceContext {
    /// The trace id as 32 lowercase hex digits, as the access log and error answers give it.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The `traceparent` the upstream gets: this trace, with the gateway's span as its parent.
    pub fn traceparent(&self) -> HeaderValue {
        let flags = if self.sampled { "01" } else { "00" };
        let value = format!("00-{}-{}-{flags}", hex(&self.trace_id), hex(&self.span_id));
        HeaderValue::from_str(&value).expect("hex digits and dashes")
    }
}

/// What a valid `traceparent` said.
#[derive(Debug, PartialEq, Eq)]
struct Parent {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    sampled: bool,
}

/// Decides the request's trace context from its headers, and leaves in them what the
/// upstream gets: the gateway's `traceparent`, and the client's `tracestate` only beside a
/// valid `traceparent` of its own, and only if it is within bounds. `trusted` says whether the
/// peer is a trusted proxy; `random` gives fresh bytes for new ids.
pub fn arrive(
    headers: &mut HeaderMap,
    trusted: bool,
    config: &TracingConfig,
    random: impl FnOnce() -> [u8; 24],
) -> TraceContext {
    let parent = incoming(headers);
    let fresh = random();
    let mut span_id: [u8; 8] = fresh[16..].try_into().expect("8 bytes");
    // An all-zero span id is invalid; one chance in 2^64, made valid rather than retried.
    span_id[7] |= (span_id == [0; 8]) as u8;
    let context = match &parent {
        Some(parent) => TraceContext {
            trace_id: parent.trace_id,
            parent_id: Some(parent.parent_id),
            span_id,
            sampled: if trusted || config.respect_client_sampling {
                parent.sampled
            } else {
                sampled_by_ratio(&parent.trace_id, config.sample_ratio)
            },
        },
        None => {
            let mut trace_id: [u8; 16] = fresh[..16].try_into().expect("16 bytes");
            trace_id[15] |= (trace_id == [0; 16]) as u8;
            TraceContext {
                trace_id,
                parent_id: None,
                span_id,
                sampled: sampled_by_ratio(&trace_id, config.sample_ratio),
            }
        }
    };
    let state = parent.is_some().then(|| incoming_state(headers)).flatten();
    headers.insert(TRACEPARENT, context.traceparent());
    match state {
        Some(state) => headers.insert(TRACESTATE, state),
        None => headers.remove(TRACESTATE),
    };
    context
}

/// The client's `traceparent`, if it sent exactly one and it is valid.
fn incoming(headers: &HeaderMap) -> Option<Parent> {
    let mut values = headers.get_all(TRACEPARENT).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    parse(value.as_bytes())
}

/// A `traceparent` (W3C Trace Context, level 1): version 00 exactly, or a later version's
/// first four fields; lowercase hex; neither id all zeros.
fn parse(value: &[u8]) -> Option<Parent> {
    if value.len() < TRACEPARENT_LEN {
        return None;
    }
    let version = lower_hex::<1>(&value[..2])?;
    match version[0] {
        0xff => return None,
        0x00 if value.len() != TRACEPARENT_LEN => return None,
        // A later version may add fields, after a dash.
        _ if value.len() > TRACEPARENT_LEN && value[TRACEPARENT_LEN] != b'-' => return None,
        _ => {}
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let trace_id = lower_hex::<16>(&value[3..35])?;
    let parent_id = lower_hex::<8>(&value[36..52])?;
    let flags = lower_hex::<1>(&value[53..55])?;
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some(Parent {
        trace_id,
        parent_id,
        sampled: flags[0] & 1 == 1,
    })
}

/// The client's `tracestate` values joined, if they are printable and within bounds.
fn incoming_state(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut joined = Vec::new();
    for value in headers.get_all(TRACESTATE) {
        if !joined.is_empty() {
            joined.push(b',');
        }
        joined.extend_from_slice(value.as_bytes());
        if joined.len() > MAX_TRACESTATE {
            return None;
        }
    }
    let printable = joined.iter().all(|b| (b' '..=b'~').contains(b));
    if joined.is_empty() || !printable {
        return None;
    }
    HeaderValue::from_bytes(&joined).ok()
}

/// Whether a trace is sampled at `ratio`, decided by its id alone, so that every gateway
/// (and every span of the trace) decides alike.
fn sampled_by_ratio(trace_id: &[u8; 16], ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let low = u64::from_be_bytes(trace_id[8..].try_into().expect("8 bytes"));
    // The low half of a random id is uniform; scaled to [0, 1) it is below `ratio` that often.
    #[allow(clippy::cast_precision_loss)]
    let share = low as f64 / 2f64.powi(64);
    share < ratio
}

/// `N` bytes from `2N` lowercase hex digits.
fn lower_hex<const N: usize>(digits: &[u8]) -> Option<[u8; N]> {
    let digit = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    };
    if digits.len() != 2 * N {
        return None;
    }
    let mut out = [0; N];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const FRESH: [u8; 24] = [0x11; 24];

    fn config(sample_ratio: f64, respect_client_sampling: bool) -> TracingConfig {
        TracingConfig {
            sample_ratio,
            respect_client_sampling,
            ..TracingConfig::default()
        }
    }

    fn arrive_with(
        traceparent: &[&str],
        tracestate: &[&str],
        trusted: bool,
        config: &TracingConfig,
    ) -> (TraceContext, HeaderMap) {
        let mut headers = HeaderMap::new();
        for value in traceparent {
            headers.append(TRACEPARENT, HeaderValue::from_str(value).unwrap());
        }
        for value in tracestate {
            headers.append(TRACESTATE, HeaderValue::from_str(value).unwrap());
        }
        let context = arrive(&mut headers, trusted, config, || FRESH);
        (context, headers)
    }

    #[test]
    fn a_valid_traceparent_keeps_its_trace_and_gets_the_gateways_span_as_parent() {
        let (context, headers) =
            arrive_with(&[CLIENT], &["congo=t61rcWkgMzE"], true, &config(0.0, false));
        assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            context.parent_id,
            Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        assert_eq!(context.span_id, [0x11; 8]);
        assert!(context.sampled, "a trusted peer's flag is followed");
        assert_eq!(
            headers[TRACEPARENT],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01"
        );
        assert_eq!(headers[TRACESTATE], "congo=t61rcWkgMzE");
    }

    #[test]
    fn an_untrusted_clients_sampled_flag_is_not_believed_unless_configured() {
        for (respect, sampled) in [(false, false), (true, true)] {
            let (context, headers) = arrive_with(&[CLIENT], &[], false, &config(0.0, respect));
            assert_eq!(
                context.sampled, sampled,
                "respect_client_sampling: {respect}"
            );
            assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert!(
                headers[TRACEPARENT]
                    .to_str()
                    .unwrap()
                    .ends_with(if sampled { "-01" } else { "-00" })
            );
        }
        // Unsampled by the client, the ratio decides for an untrusted one: 1.0 samples all.
        let unsampled = CLIENT.replace("-01", "-00");
        let (context, _) = arrive_with(&[&unsampled], &[], false, &config(1.0, false));
        assert!(context.sampled);
    }

    #[test]
    fn a_malformed_traceparent_is_replaced_and_its_tracestate_dropped() {
        let zeros_trace = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
        let zeros_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01";
        for bad in [
            "",
            "garbage",
            &CLIENT.to_uppercase(),
            zeros_trace,
            zeros_parent,
            &CLIENT.replacen("00", "ff", 1),
            &format!("{CLIENT}-extra"),
            &CLIENT.replace('-', "_"),
            &CLIENT.replacen("4b", "4g", 1),
        ] {
            let (context, headers) = arrive_with(&[bad], &["a=b"], false, &config(1.0, false));
            assert_eq!(context.trace_id, [0x11; 16], "{bad:?}");
            assert_eq!(context.parent_id, None, "{bad:?}");
            assert_eq!(
                headers[TRACEPARENT], "00-11111111111111111111111111111111-1111111111111111-01",
                "{bad:?}"
            );
            assert!(headers.get(TRACESTATE).is_none(), "{bad:?}");
        }
        // Two traceparents are none.
        let (context, _) = arrive_with(&[CLIENT, CLIENT], &[], false, &config(1.0, false));
        assert_eq!(context.parent_id, None);
    }

    #[test]
    fn a_later_versions_extra_fields_are_read_past() {
        let later = CLIENT.replacen("00", "01", 1) + "-what-comes-next";
        let (context, headers) = arrive_with(&[&later], &[], true, &config(1.0, false));
        assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(headers[TRACEPARENT].to_str().unwrap().starts_with("00-"));
    }

    #[test]
    fn tracestate_is_joined_and_bounded() {
        let (_, headers) = arrive_with(&[CLIENT], &["a=1", "b=2"], true, &config(1.0, false));
        assert_eq!(headers[TRACESTATE], "a=1,b=2");
        let long = format!("a={}", "x".repeat(MAX_TRACESTATE));
        let (_, headers) = arrive_with(&[CLIENT], &[&long], true, &config(1.0, false));
        assert!(headers.get(TRACESTATE).is_none());
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_static(CLIENT));
        headers.insert(TRACESTATE, HeaderValue::from_bytes(b"a=\xff").unwrap());
        arrive(&mut headers, true, &config(1.0, false), || FRESH);
        assert!(headers.get(TRACESTATE).is_none());
    }

    #[test]
    fn the_ratio_samples_by_the_trace_id_alone() {
        let mut id = [0u8; 16];
        assert!(!sampled_by_ratio(&id, 0.0));
        assert!(sampled_by_ratio(&id, 0.5));
        id[8] = 0x80;
        assert!(!sampled_by_ratio(&id, 0.5), "the upper half is out at 0.5");
        assert!(sampled_by_ratio(&id, 0.51));
        assert!(sampled_by_ratio(&[0xff; 16], 1.0));
        assert!(!sampled_by_ratio(&[0xff; 16], 0.999));
    }

    #[test]
    fn all_zero_fresh_ids_are_made_valid() {
        let mut headers = HeaderMap::new();
        let context = arrive(&mut headers, false, &config(1.0, false), || [0; 24]);
        assert_ne!(context.trace_id, [0; 16]);
        assert_ne!(context.span_id, [0; 8]);
    }
}
