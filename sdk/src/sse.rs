//! Server-sent events (`text/event-stream`), as a plugin reading a streamed answer chunk by
//! chunk splits them: whole events first, and the bytes of one not ended yet kept for later.

/// Splits `bytes` into whole events, each with the blank line that ends it (`\n` or `\r\n` line
/// ends), and the rest: an event not ended yet, empty when `bytes` end at an event's end.
pub fn split_events(bytes: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut events = Vec::new();
    let mut event_start = 0;
    let mut line_start = 0;
    while let Some(newline) = bytes[line_start..].iter().position(|&byte| byte == b'\n') {
        let line_end = line_start + newline + 1;
        if matches!(&bytes[line_start..line_end], b"\n" | b"\r\n") {
            events.push(&bytes[event_start..line_end]);
            event_start = line_end;
        }
        line_start = line_end;
    }
    (events, &bytes[event_start..])
}

/// An event's data: its `data:` lines, each without the one space that may follow the colon,
/// joined with `\n`; none for an event without a `data:` line (a comment, or `event:` alone).
pub fn event_data(event: &[u8]) -> Option<Vec<u8>> {
    let mut data: Option<Vec<u8>> = None;
    for line in event.split(|&byte| byte == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(value) = line.strip_prefix(b"data:") else {
            continue;
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        match &mut data {
            Some(data) => {
                data.push(b'\n');
                data.extend_from_slice(value);
            }
            None => data = Some(value.to_vec()),
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_end_at_a_blank_line() {
        let (events, rest) = split_events(b"data: a\n\ndata: b\r\n\r\n: comment\ndata: c\n\n");
        assert_eq!(
            events,
            [
                &b"data: a\n\n"[..],
                b"data: b\r\n\r\n",
                b": comment\ndata: c\n\n"
            ]
        );
        assert!(rest.is_empty());

        let (events, rest) = split_events(b"data: a\n\ndata: b\n");
        assert_eq!(events, [&b"data: a\n\n"[..]]);
        assert_eq!(rest, b"data: b\n");

        let (events, rest) = split_events(b"data: a\r\n\r");
        assert!(events.is_empty());
        assert_eq!(rest, b"data: a\r\n\r");

        let (events, rest) = split_events(b"");
        assert!(events.is_empty() && rest.is_empty());

        let (events, rest) = split_events(b"\xff\xfe\n\n\x00");
        assert_eq!(events, [&b"\xff\xfe\n\n"[..]]);
        assert_eq!(rest, b"\x00");
    }

    #[test]
    fn an_events_data_lines_are_joined() {
        let event = b"event: message\ndata: {\"a\":\ndata: 1}\n\n";
        assert_eq!(event_data(event).as_deref(), Some(&b"{\"a\":\n1}"[..]));
        assert_eq!(event_data(b"data:2\r\n\r\n").as_deref(), Some(&b"2"[..]));
        assert_eq!(event_data(b"data:  3\n\n").as_deref(), Some(&b" 3"[..]));
        assert_eq!(event_data(b"data:\n\n").as_deref(), Some(&b""[..]));
        assert_eq!(event_data(b": comment\nevent: x\n\n"), None);
    }
}
