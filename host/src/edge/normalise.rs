//! The request path's one normal form, decided before routing.
//!
//! Routing, plugins and the upstream all see the same path, so a path that one of them would
//! read differently from another (`//private`, `/a/../private`, `/%70rivate`) cannot slip past a
//! route's plugins. The rules, in order:
//!
//! 1. The path must start with `/` (an absolute-form URI arrives here as its path).
//! 2. Percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded; every other
//!    escape is kept, with upper-case hex. A `%` not followed by two hex digits is refused.
//! 3. Repeated slashes are merged, and `.` and `..` segments are removed (RFC 3986 5.2.4);
//!    a `..` that would climb above the root is refused.
//! 4. An encoded `NUL` is refused. An encoded `/` or `\`, a literal `\`, and escapes that do
//!    not decode to UTF-8 are refused too, unless the route keeps the raw path
//!    (`path_normalization: off`): backends disagree on what those mean.
//! 5. A segment that is `.` or `..` followed by `;`, in any spelling (`..;`, `%2e%2e;`,
//!    `..%3B`), is refused whatever the route: Java servers (Tomcat, Jetty, Spring) drop the
//!    `;` parameter and then read a dot segment the gateway never saw.

use std::borrow::Cow;
use std::fmt;

/// Why a path has no safe normal form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    /// It does not start with `/`.
    NotAbsolute,
    /// A `%` is not followed by two hex digits.
    BadEscape,
    /// It holds `%00`.
    Nul,
    /// A `..` climbs above the root.
    AboveRoot,
    /// It holds `%2F`, which some backends decode into a separator.
    EncodedSlash,
    /// It holds `\` or `%5C`, which some backends treat as a separator.
    Backslash,
    /// Its escapes do not decode to UTF-8.
    InvalidUtf8,
    /// A segment is `.` or `..` followed by `;` (`/..;/`), which Java servers read as a dot
    /// segment once they drop the path parameter.
    DotSegmentParameter,
}

impl PathError {
    /// Whether a route with `path_normalization: off` may still send the raw path upstream.
    /// The other errors leave no path to route on at all.
    pub fn allowed_raw(self) -> bool {
        matches!(
            self,
            PathError::EncodedSlash | PathError::Backslash | PathError::InvalidUtf8
        )
    }
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::NotAbsolute => "the path must start with /",
            PathError::BadEscape => "the path holds a % that is not followed by two hex digits",
            PathError::Nul => "the path holds an encoded NUL (%00)",
            PathError::AboveRoot => "the path climbs above the root with ..",
            PathError::EncodedSlash => "the path holds an encoded slash (%2F)",
            PathError::Backslash => "the path holds a backslash (\\ or %5C)",
            PathError::InvalidUtf8 => "the path's escapes do not decode to UTF-8",
            PathError::DotSegmentParameter => {
                "the path holds a . or .. segment with a parameter (;)"
            }
        })
    }
}

impl std::error::Error for PathError {}

/// A path in normal form, and whether it may only go upstream raw.
#[derive(Debug, PartialEq, Eq)]
pub struct NormalPath<'a> {
    /// The normal form: what routes match.
    pub path: Cow<'a, str>,
    /// Set when the path is routable but unsafe to forward under the normal rules; only a route
    /// with `path_normalization: off` accepts it (and then sends the raw path).
    pub raw_only: Option<PathError>,
}

/// Normalises `raw`, a request path without its query.
pub fn normalise(raw: &str) -> Result<NormalPath<'_>, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(raw.as_bytes()) {
        return Ok(NormalPath {
            path: Cow::Borrowed(raw),
            raw_only: None,
        });
    }
    let mut raw_only = None;
    let mut note = |error: PathError| {
        raw_only.get_or_insert(error);
    };
    let mut segments: Vec<String> = Vec::new();
    let mut kept_escapes = false;
    let pieces: Vec<&str> = raw[1..].split('/').collect();
    let last = pieces.len() - 1;
    for (index, piece) in pieces.into_iter().enumerate() {
        let segment = decode_segment(piece, &mut note, &mut kept_escapes)?;
        if is_dot_with_parameter(&segment) {
            return Err(PathError::DotSegmentParameter);
        }
        match segment.as_str() {
            "." => {
                if index == last {
                    segments.push(String::new());
                }
            }
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                if index == last {
                    segments.push(String::new());
                }
            }
            // A repeated slash, except the one that ends the path.
            "" if index != last => {}
            _ => segments.push(segment),
        }
    }
    let mut path = String::with_capacity(raw.len());
    for segment in &segments {
        path.push('/');
        path.push_str(segment);
    }
    if path.is_empty() {
        path.push('/');
    }
    if kept_escapes && std::str::from_utf8(&decode_all(&path)).is_err() {
        note(PathError::InvalidUtf8);
    }
    Ok(NormalPath {
        path: Cow::Owned(path),
        raw_only,
    })
}

/// The fast path: nothing to decode, merge or remove.
fn is_normal(bytes: &[u8]) -> bool {
    let mut previous_slash = false;
    for (index, &byte) in bytes.iter().enumerate() {
        match byte {
            b'%' | b'\\' => return false,
            b'/' if previous_slash => return false,
            b'.' if previous_slash => {
                let rest = &bytes[index + 1..];
                let dots = if rest.first() == Some(&b'.') { 2 } else { 1 };
                if matches!(
                    rest.get(dots - 1..),
                    Some([]) | Some([b'/', ..]) | Some([b';', ..])
                ) {
                    return false;
                }
                // A segment such as `..x` or `.well-known`: not a dot segment.
            }
            _ => {}
        }
        previous_slash = byte == b'/';
    }
    true
}

/// `.;x` or `..;x`, the `;` perhaps still escaped (decoded segments write it `%3B`): a dot
/// segment to a server that drops path parameters (Tomcat, Jetty, Spring).
fn is_dot_with_parameter(segment: &str) -> bool {
    let rest = segment
        .strip_prefix("..")
        .or_else(|| segment.strip_prefix('.'));
    rest.is_some_and(|rest| rest.starts_with(';') || rest.starts_with("%3B"))
}

/// Decodes one segment's unreserved escapes; records what makes it raw-only.
fn decode_segment(
    piece: &str,
    note: &mut impl FnMut(PathError),
    kept_escapes: &mut bool,
) -> Result<String, PathError> {
    let bytes = piece.as_bytes();
    let mut out = String::with_capacity(piece.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'%' => {
                let (Some(high), Some(low)) = (
                    bytes.get(index + 1).and_then(|b| hex_value(*b)),
                    bytes.get(index + 2).and_then(|b| hex_value(*b)),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let byte = high << 4 | low;
                match byte {
                    0 => return Err(PathError::Nul),
                    b'/' => note(PathError::EncodedSlash),
                    b'\\' => note(PathError::Backslash),
                    _ => {}
                }
                if is_unreserved(byte) {
                    out.push(char::from(byte));
                } else {
                    *kept_escapes = true;
                    push_escape(&mut out, byte);
                }
                index += 3;
            }
            b'\\' => {
                note(PathError::Backslash);
                *kept_escapes = true;
                push_escape(&mut out, b'\\');
                index += 1;
            }
            _ => {
                // Copy the run up to the next escape or backslash in one go (it may be UTF-8).
                let end = bytes[index..]
                    .iter()
                    .position(|b| matches!(b, b'%' | b'\\'))
                    .map_or(bytes.len(), |offset| index + offset);
                out.push_str(&piece[index..end]);
                index = end;
            }
        }
    }
    Ok(out)
}

fn push_escape(out: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(byte >> 4)]));
    out.push(char::from(HEX[usize::from(byte & 0xf)]));
}

/// Every escape decoded, for the UTF-8 check.
fn decode_all(path: &str) -> Vec<u8> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%'
            && let (Some(high), Some(low)) = (
                bytes.get(index + 1).and_then(|b| hex_value(*b)),
                bytes.get(index + 2).and_then(|b| hex_value(*b)),
            )
        {
            out.push(high << 4 | low);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    out
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn normal(raw: &str) -> Result<(String, Option<PathError>), PathError> {
        normalise(raw).map(|n| (n.path.into_owned(), n.raw_only))
    }

    fn ok(raw: &str) -> String {
        match normal(raw) {
            Ok((path, None)) => path,
            other => panic!("{raw:?} -> {other:?}"),
        }
    }

    #[test]
    fn the_attack_paths_normalise_to_what_the_backend_would_see() {
        assert_eq!(ok("//private/x"), "/private/x");
        assert_eq!(ok("/hello/../private/x"), "/private/x");
        assert_eq!(ok("/%70rivate/x"), "/private/x");
        assert_eq!(ok("/./private/x"), "/private/x");
        assert_eq!(ok("/private/%2e%2e/private/x"), "/private/x");
        assert_eq!(ok("/private/%2E./private/x"), "/private/x");
        assert_eq!(ok("/PRIVATE/x"), "/PRIVATE/x");
    }

    #[test]
    fn ordinary_paths_are_borrowed_untouched() {
        for path in [
            "/",
            "/a",
            "/a/b/",
            "/a/.well-known",
            "/a/..b/c.",
            "/a~b_c-d.e",
            "/a/b?",
        ] {
            let n = normalise(path).unwrap();
            assert!(matches!(n.path, Cow::Borrowed(_)), "{path}");
            assert_eq!(n.path, path);
            assert_eq!(n.raw_only, None);
        }
    }

    #[test]
    fn dot_segments_and_slashes_follow_rfc_3986() {
        assert_eq!(ok("/a/b/c/./../../g"), "/a/g");
        assert_eq!(ok("/a/b/."), "/a/b/");
        assert_eq!(ok("/a/b/.."), "/a/");
        assert_eq!(ok("/a/.."), "/");
        assert_eq!(ok("/."), "/");
        assert_eq!(ok("/a//b///c//"), "/a/b/c/");
        assert_eq!(ok("///"), "/");
        assert_eq!(ok("/a/%7Euser/%41"), "/a/~user/A");
    }

    #[test]
    fn other_escapes_are_kept_in_upper_case() {
        assert_eq!(ok("/a%20b/%c3%a9"), "/a%20b/%C3%A9");
        assert_eq!(ok("/100%25"), "/100%25");
        // A decoded %25 is never decoded again.
        assert_eq!(ok("/%252e%252e/x"), "/%252e%252e/x");
    }

    #[test]
    fn unsafe_paths_are_refused_with_a_reason() {
        assert_eq!(normal("private/x"), Err(PathError::NotAbsolute));
        assert_eq!(normal("*"), Err(PathError::NotAbsolute));
        assert_eq!(normal(""), Err(PathError::NotAbsolute));
        assert_eq!(normal("/a%2"), Err(PathError::BadEscape));
        assert_eq!(normal("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normal("/a%00b"), Err(PathError::Nul));
        assert_eq!(normal("/.."), Err(PathError::AboveRoot));
        assert_eq!(normal("/a/../../etc/passwd"), Err(PathError::AboveRoot));
        assert_eq!(normal("/%2e%2e/x"), Err(PathError::AboveRoot));
        for error in [
            PathError::NotAbsolute,
            PathError::BadEscape,
            PathError::Nul,
            PathError::AboveRoot,
        ] {
            assert!(!error.allowed_raw());
        }
    }

    #[test]
    fn a_dot_segment_with_path_parameters_is_refused_in_every_spelling() {
        for raw in [
            "/hello/..;/private/x",
            "/hello/.;/private/x",
            "/hello/%2e%2e;/private/x",
            "/hello/.%2e;/private/x",
            "/hello/%2E.;/private/x",
            "/hello/..%3b/private/x",
            "/hello/..%3B/private/x",
            "/hello/.%3B/private/x",
            "/hello/%2e%3b/private/x",
            "/hello/..;jsessionid=1/private/x",
            "/..;/private/x",
            "/hello/..;",
            "//..;/x",
        ] {
            assert_eq!(normal(raw), Err(PathError::DotSegmentParameter), "{raw}");
        }
        assert!(!PathError::DotSegmentParameter.allowed_raw());
        // A `;` elsewhere is not a dot segment: matrix parameters on a name go through.
        assert_eq!(ok("/a;b/x"), "/a;b/x");
        assert_eq!(ok("/a/...;/x"), "/a/...;/x");
        assert_eq!(ok("/a/x.;"), "/a/x.;");
        assert_eq!(ok("/a/;/x"), "/a/;/x");
    }

    #[test]
    fn separators_in_disguise_route_but_are_raw_only() {
        assert_eq!(
            normal("/private%2fx"),
            Ok(("/private%2Fx".into(), Some(PathError::EncodedSlash)))
        );
        assert_eq!(
            normal("/private%5Cx"),
            Ok(("/private%5Cx".into(), Some(PathError::Backslash)))
        );
        assert_eq!(
            normal("/private\\x"),
            Ok(("/private%5Cx".into(), Some(PathError::Backslash)))
        );
        // `..%2F` is not a dot segment: it stays, encoded.
        assert_eq!(
            normal("/a/..%2F..%2Fprivate"),
            Ok(("/a/..%2F..%2Fprivate".into(), Some(PathError::EncodedSlash)))
        );
        assert_eq!(
            normal("/a%ff"),
            Ok(("/a%FF".into(), Some(PathError::InvalidUtf8)))
        );
        assert!(PathError::EncodedSlash.allowed_raw());
    }

    /// RFC 3986 5.2.4 on fully decoded bytes, with repeated slashes merged: what a backend that
    /// decodes everything would see. The normal form must decode to the same thing.
    fn reference(raw: &str) -> Option<Vec<u8>> {
        let decoded = decode_all(raw);
        let mut out: Vec<&[u8]> = Vec::new();
        let pieces: Vec<&[u8]> = decoded[1..].split(|b| *b == b'/').collect();
        let last = pieces.len() - 1;
        for (index, piece) in pieces.into_iter().enumerate() {
            match piece {
                b"." if index == last => out.push(b""),
                b"." => {}
                b".." => {
                    out.pop()?;
                    if index == last {
                        out.push(b"");
                    }
                }
                b"" if index != last => {}
                _ => out.push(piece),
            }
        }
        let mut path = Vec::new();
        for segment in out {
            path.push(b'/');
            path.extend_from_slice(segment);
        }
        if path.is_empty() {
            path.push(b'/');
        }
        Some(path)
    }

    fn path_strategy() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("a".to_owned()),
            Just("B".to_owned()),
            Just(".".to_owned()),
            Just("..".to_owned()),
            Just("".to_owned()),
            Just("%2e".to_owned()),
            Just("%2E".to_owned()),
            Just("%41".to_owned()),
            Just("%7e".to_owned()),
            Just("%20".to_owned()),
            Just("%c3%a9".to_owned()),
            Just("%25".to_owned()),
            Just("%2f".to_owned()),
            Just("%5c".to_owned()),
            Just("\\".to_owned()),
            Just("%00".to_owned()),
            Just("%".to_owned()),
            Just("%g1".to_owned()),
            Just("%ff".to_owned()),
            Just("..;".to_owned()),
            Just(".%3b".to_owned()),
            Just("é".to_owned()),
            "[a-z.%/]{0,4}",
        ];
        prop::collection::vec(piece, 0..12).prop_map(|pieces| {
            let mut path = String::from("/");
            for (index, piece) in pieces.iter().enumerate() {
                if index > 0 && index % 2 == 0 {
                    path.push('/');
                }
                path.push_str(piece);
            }
            path
        })
    }

    proptest! {
        #![proptest_config(crate::proptest_cases(20_000))]

        #[test]
        fn fuzz_normalise_never_panics_on_any_string(raw in any::<String>()) {
            let _ = normalise(&raw);
            let _ = normalise(&format!("/{raw}"));
        }

        #[test]
        fn fuzz_normal_forms_are_stable_and_agree_with_the_reference(raw in path_strategy()) {
            match normalise(&raw) {
                Ok(normal) => {
                    let path: &str = &normal.path;
                    prop_assert!(path.starts_with('/'));
                    prop_assert!(!path.contains("//"), "{path}");
                    for segment in path.split('/') {
                        prop_assert!(segment != "." && segment != "..", "{path}");
                    }
                    // Normalising again changes nothing, and a normal form that still holds a
                    // disguised separator was flagged. (`raw_only` speaks of the raw input: one
                    // in a segment that `..` removed is flagged too.)
                    let again = normalise(path).unwrap();
                    prop_assert_eq!(&*again.path, path);
                    prop_assert!(again.raw_only.is_none() || normal.raw_only.is_some());
                    if normal.raw_only.is_none() {
                        prop_assert_eq!(Some(decode_all(path)), reference(&raw), "{}", raw);
                    }
                }
                Err(PathError::AboveRoot) => {
                    // A disguised separator splits segments differently in the reference.
                    let lower = raw.to_ascii_lowercase();
                    if !lower.contains("%2f") && !lower.contains("%5c") && !raw.contains('\\') {
                        prop_assert_eq!(reference(&raw), None, "{}", raw);
                    }
                }
                Err(error) => prop_assert!(
                    matches!(
                        error,
                        PathError::BadEscape | PathError::Nul | PathError::DotSegmentParameter
                    ),
                    "{raw}: {error}"
                ),
            }
        }
    }
}
