//! The proxy-wasm ABI's numbers and encodings (0.2.0 and 0.2.1): status codes, map and buffer
//! ids, and how header maps and property paths travel through guest memory. Pure code.

/// `proxy_status_t`: what every host function returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// No such key, property, header or queue.
    NotFound = 1,
    /// An argument is out of range or refused (a header value with CR or LF, say).
    BadArgument = 2,
    /// The host could not encode the value.
    SerializationFailure = 3,
    /// The guest's bytes do not decode.
    ParseFailure = 4,
    /// A pointer or length is outside the guest's memory.
    InvalidMemoryAccess = 6,
    /// The queue is empty.
    Empty = 7,
    /// Shared data changed since its CAS value was read.
    CasMismatch = 8,
    /// The host failed (a full quota, an unreachable kv backend).
    InternalFailure = 10,
    /// Weir does not implement the function.
    Unimplemented = 12,
}

/// `proxy_action_t`: what a stream callback answers.
pub const ACTION_CONTINUE: u32 = 0;

/// `proxy_map_type_t`: the header maps a filter can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapType {
    /// The request's headers, with `:method`, `:path`, `:authority` and `:scheme`.
    RequestHeaders,
    /// The request's trailers.
    RequestTrailers,
    /// The response's headers, with `:status`.
    ResponseHeaders,
    /// The response's trailers.
    ResponseTrailers,
    /// An http call's response headers, with `:status`.
    CallResponseHeaders,
    /// An http call's response trailers.
    CallResponseTrailers,
}

impl MapType {
    /// The map `id` names; gRPC metadata (4 and 5) is not offered.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => MapType::RequestHeaders,
            1 => MapType::RequestTrailers,
            2 => MapType::ResponseHeaders,
            3 => MapType::ResponseTrailers,
            6 => MapType::CallResponseHeaders,
            7 => MapType::CallResponseTrailers,
            _ => return None,
        })
    }
}

/// `proxy_buffer_type_t`: the buffers a filter can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufferType {
    /// The request body seen so far.
    RequestBody,
    /// The response body seen so far.
    ResponseBody,
    /// An http call's response body.
    CallResponseBody,
    /// The entry's `vm_config`.
    VmConfiguration,
    /// The route's `config` for the plugin.
    PluginConfiguration,
}

impl BufferType {
    /// The buffer `id` names; TCP data (2, 3) and gRPC messages (5) are not offered.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => BufferType::RequestBody,
            1 => BufferType::ResponseBody,
            4 => BufferType::CallResponseBody,
            6 => BufferType::VmConfiguration,
            7 => BufferType::PluginConfiguration,
            _ => return None,
        })
    }
}

/// `proxy_stream_type_t`: which side of the exchange to continue or close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamType {
    /// The request.
    Request,
    /// The response.
    Response,
}

impl StreamType {
    /// The stream `id` names; TCP streams (2, 3) are not offered.
    pub fn from_id(id: u32) -> Option<Self> {
        match id {
            0 => Some(StreamType::Request),
            1 => Some(StreamType::Response),
            _ => None,
        }
    }
}

/// `proxy_metric_type_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetricType {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// A distribution of recorded values.
    Histogram,
}

impl MetricType {
    /// The metric type `id` names.
    pub fn from_id(id: u32) -> Option<Self> {
        match id {
            0 => Some(MetricType::Counter),
            1 => Some(MetricType::Gauge),
            2 => Some(MetricType::Histogram),
            _ => None,
        }
    }
}

/// The log level names, by `proxy_log_level_t`.
pub fn log_level(level: u32) -> Option<&'static str> {
    ["trace", "debug", "info", "warn", "error", "critical"]
        .get(level as usize)
        .copied()
}

/// The most pairs one encoded map may hold.
pub const MAX_MAP_PAIRS: usize = 1024;

/// Encodes header pairs as the ABI lays them out: the count, each pair's two lengths, then
/// each name and value followed by a NUL.
pub fn encode_map<'a>(pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])> + Clone) -> Vec<u8> {
    let count = pairs.clone().into_iter().count();
    let mut out = Vec::with_capacity(4 + count * 8);
    out.extend_from_slice(&(count as u32).to_le_bytes());
    for (name, value) in pairs.clone() {
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    }
    for (name, value) in pairs {
        out.extend_from_slice(name);
        out.push(0);
        out.extend_from_slice(value);
        out.push(0);
    }
    out
}

/// Decodes what [`encode_map`] writes; `None` when the bytes do not hold a whole map of at
/// most [`MAX_MAP_PAIRS`] pairs.
pub fn decode_map(bytes: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let word = |at: usize| -> Option<usize> {
        let slice = bytes.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes(slice.try_into().ok()?) as usize)
    };
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let count = word(0)?;
    if count > MAX_MAP_PAIRS {
        return None;
    }
    let mut at = 4 + count * 8;
    let mut pairs = Vec::with_capacity(count);
    for i in 0..count {
        let name_len = word(4 + i * 8)?;
        let value_len = word(8 + i * 8)?;
        let name = bytes.get(at..at.checked_add(name_len)?)?.to_vec();
        at += name_len + 1;
        let value = bytes.get(at..at.checked_add(value_len)?)?.to_vec();
        at += value_len + 1;
        pairs.push((name, value));
    }
    (at <= bytes.len()).then_some(pairs)
}

/// A property path's segments: the ABI separates them with NUL (`request\0path`). Dots are
/// accepted too, as some SDKs send `request.path`.
pub fn property_path(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let separator = if text.contains('\0') { '\0' } else { '.' };
    text.trim_end_matches('\0')
        .split(separator)
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_round_trips_and_a_short_or_lying_one_does_not_decode() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b":path", b"/a?b"), (b"x", b""), (b"", b"v")];
        let bytes = encode_map(pairs.iter().copied());
        let decoded = decode_map(&bytes).unwrap();
        let expected: Vec<(Vec<u8>, Vec<u8>)> = pairs
            .iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect();
        assert_eq!(decoded, expected);
        assert_eq!(decode_map(&[]), Some(Vec::new()));
        // Cut short anywhere, it is refused rather than read past its end.
        for end in 1..bytes.len() - 1 {
            assert_eq!(decode_map(&bytes[..end]), None, "cut at {end}");
        }
        // A count that claims more pairs than the bytes hold, or more than the bound.
        let mut lying = bytes.clone();
        lying[0] = 200;
        assert_eq!(decode_map(&lying), None);
        let huge = ((MAX_MAP_PAIRS + 1) as u32).to_le_bytes();
        assert_eq!(decode_map(&huge), None);
        // A length near u32::MAX does not overflow the offsets.
        let mut wrap = encode_map([(&b"a"[..], &b"b"[..])]);
        wrap[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_map(&wrap), None);
    }

    #[test]
    fn property_paths_split_on_nul_or_dots() {
        assert_eq!(property_path(b"request\0path"), ["request", "path"]);
        assert_eq!(property_path(b"request\0path\0"), ["request", "path"]);
        assert_eq!(property_path(b"source.address"), ["source", "address"]);
        assert_eq!(property_path(b"plugin_name"), ["plugin_name"]);
    }

    #[test]
    fn ids_outside_the_abi_name_nothing() {
        assert_eq!(MapType::from_id(4), None);
        assert_eq!(MapType::from_id(7), Some(MapType::CallResponseTrailers));
        assert_eq!(BufferType::from_id(2), None);
        assert_eq!(
            BufferType::from_id(7),
            Some(BufferType::PluginConfiguration)
        );
        assert_eq!(StreamType::from_id(2), None);
        assert_eq!(MetricType::from_id(3), None);
        assert_eq!(log_level(5), Some("critical"));
        assert_eq!(log_level(6), None);
    }
}
