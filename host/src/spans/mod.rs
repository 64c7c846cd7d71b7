//! A sampled request's spans, as the request path records them: plain data, bounded per
//! request, handed whole to the exporter ([`export`]) when the request is over. Nothing here
//! touches the network or the OpenTelemetry SDK, so that recording costs a push onto a `Vec`.

pub mod export;

use std::borrow::Cow;
use std::time::SystemTime;

use crate::edge::trace::TraceContext;

/// The most spans one request records (the server span, its plugin calls, its upstream
/// attempts, its plugins' outbound calls); later ones are counted as dropped.
pub const MAX_SPANS: usize = 64;
/// The most attributes a plugin adds to its span in one call.
pub const MAX_PLUGIN_ATTRIBUTES: usize = 16;
/// The most events a plugin adds to its span in one call.
pub const MAX_PLUGIN_EVENTS: usize = 8;
/// The most bytes of names and values a plugin adds to its span in one call.
pub const MAX_PLUGIN_NOTE_BYTES: usize = 4096;
/// The longest name or value a plugin may give, in bytes.
pub const MAX_PLUGIN_TEXT: usize = 256;
/// The most outbound calls' spans one plugin call records.
pub const MAX_OUTBOUND_SPANS: usize = 8;

/// A span attribute's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Text.
    Text(Cow<'static, str>),
    /// A whole number.
    Int(i64),
    /// A flag.
    Bool(bool),
}

impl From<&'static str> for Value {
    fn from(text: &'static str) -> Self {
        Value::Text(Cow::Borrowed(text))
    }
}

impl From<String> for Value {
    fn from(text: String) -> Self {
        Value::Text(Cow::Owned(text))
    }
}

impl From<i64> for Value {
    fn from(number: i64) -> Self {
        Value::Int(number)
    }
}

impl From<bool> for Value {
    fn from(flag: bool) -> Self {
        Value::Bool(flag)
    }
}

/// One attribute: a key (OpenTelemetry's semantic conventions where one fits, `weir.*`
/// otherwise) and its value.
pub type Attribute = (Cow<'static, str>, Value);

/// Who a span is for, in OpenTelemetry's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The gateway serving the client's request.
    Server,
    /// The gateway calling out: an upstream attempt, a plugin's outbound call.
    Client,
    /// Work inside the gateway: a plugin call.
    Internal,
}

/// Something that happened at a moment during a span.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// What happened.
    pub name: String,
    /// When.
    pub time: SystemTime,
    /// Details.
    pub attributes: Vec<Attribute>,
}

/// One finished span of a request's trace.
#[derive(Clone, Debug, PartialEq)]
pub struct SpanRecord {
    /// What the span is, such as `GET /orders` or `plugin auth on-request`.
    pub name: Cow<'static, str>,
    /// Who it is for.
    pub kind: Kind,
    /// Its id within the trace.
    pub id: [u8; 8],
    /// Its parent's id; `None` for a root span.
    pub parent: Option<[u8; 8]>,
    /// When it began.
    pub start: SystemTime,
    /// When it ended.
    pub end: SystemTime,
    /// What is known of it.
    pub attributes: Vec<Attribute>,
    /// What happened during it.
    pub events: Vec<Event>,
    /// Why it failed, when it did: its status is then an error.
    pub failed: Option<Cow<'static, str>>,
}

impl SpanRecord {
    /// A span of `kind` named `name`, child of `parent`, that began at `start` and ends now.
    pub fn ending_now(
        name: impl Into<Cow<'static, str>>,
        kind: Kind,
        id: [u8; 8],
        parent: Option<[u8; 8]>,
        start: SystemTime,
    ) -> Self {
        SpanRecord {
            name: name.into(),
            kind,
            id,
            parent,
            start,
            end: SystemTime::now(),
            attributes: Vec::new(),
            events: Vec::new(),
            failed: None,
        }
    }

    /// Adds an attribute.
    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        self.attributes.push((Cow::Borrowed(key), value.into()));
    }
}

/// A sampled request's trace as it is recorded: the spans finished so far, within
/// [`MAX_SPANS`], and fresh ids for the next ones.
#[derive(Debug)]
pub struct RequestSpans {
    /// The trace the request belongs to, with the gateway's server span.
    pub context: TraceContext,
    /// When the request arrived: the server span's start.
    pub started: SystemTime,
    spans: Vec<SpanRecord>,
    dropped: u32,
    /// The state of the id sequence (SplitMix64), seeded by the server span's random id.
    next_id: u64,
}

impl RequestSpans {
    /// The spans of a request in `context`, which arrived at `started`.
    pub fn new(context: TraceContext, started: SystemTime) -> Self {
        RequestSpans {
            context,
            started,
            spans: Vec::new(),
            dropped: 0,
            next_id: u64::from_be_bytes(context.span_id),
        }
    }

    /// A fresh span id for this trace. Derived from the server span's random id rather than
    /// drawn from the OS: ids need to be unique within a trace, not secret.
    pub fn new_id(&mut self) -> [u8; 8] {
        splitmix(&mut self.next_id)
    }

    /// Records a finished span, unless the request has recorded its most.
    pub fn push(&mut self, span: SpanRecord) {
        if self.spans.len() < MAX_SPANS {
            self.spans.push(span);
        } else {
            self.dropped += 1;
        }
    }

    /// The spans recorded, and how many were left out.
    pub fn into_parts(self) -> (Vec<SpanRecord>, u32) {
        (self.spans, self.dropped)
    }
}

/// What a plugin's call adds to its own span through the `tracing` interface, and the spans
/// of the outbound calls it makes, gathered during the call and bounded in count and size.
#[derive(Debug, Default)]
pub struct CallNotes {
    /// The plugin call's span id: the parent of its outbound calls' spans.
    pub span_id: [u8; 8],
    /// The state of the outbound calls' id sequence, seeded by the call's span id.
    next_id: u64,
    /// Attributes the plugin set.
    pub attributes: Vec<Attribute>,
    /// Events the plugin added.
    pub events: Vec<Event>,
    /// Its outbound calls' spans.
    pub outbound: Vec<SpanRecord>,
    /// Bytes of names and values added so far.
    bytes: usize,
}

/// Why a plugin's note was not kept.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoteRefused {
    /// A name or value out of bounds.
    #[error("names are 1 to 256 printable bytes, values at most 256 bytes")]
    OutOfBounds,
    /// The call has added its most.
    #[error("this call has added the most attributes, events or bytes it may")]
    Full,
    /// A name in the gateway's own namespace, which a plugin may not write: it could pass
    /// for another tenant's call, or another outcome.
    #[error("names starting with \"weir.\" are the gateway's")]
    Reserved,
}

impl CallNotes {
    /// Notes for a call whose span is `span_id`.
    pub fn new(span_id: [u8; 8]) -> Self {
        CallNotes {
            span_id,
            next_id: u64::from_be_bytes(span_id) ^ 0x5bd1_e995_5bd1_e995,
            ..CallNotes::default()
        }
    }

    /// A fresh span id for one of the call's outbound calls.
    pub fn new_id(&mut self) -> [u8; 8] {
        splitmix(&mut self.next_id)
    }

    /// Records an outbound call's span, within [`MAX_OUTBOUND_SPANS`].
    pub fn push_outbound(&mut self, span: SpanRecord) {
        if self.outbound.len() < MAX_OUTBOUND_SPANS {
            self.outbound.push(span);
        }
    }

    /// Adds attribute `key` = `value` to the call's span, within bounds; a later value of a
    /// key replaces the earlier one.
    pub fn set_attribute(&mut self, key: &str, value: &str) -> Result<(), NoteRefused> {
        check_name(key)?;
        check_not_reserved(key)?;
        check_value(value)?;
        if let Some(kept) = self.attributes.iter_mut().find(|(k, _)| k == key) {
            kept.1 = Value::Text(Cow::Owned(value.to_owned()));
            return Ok(());
        }
        if self.attributes.len() >= MAX_PLUGIN_ATTRIBUTES {
            return Err(NoteRefused::Full);
        }
        self.spend(key.len() + value.len())?;
        self.attributes
            .push((Cow::Owned(key.to_owned()), Value::from(value.to_owned())));
        Ok(())
    }

    /// Adds event `name`, now, with `attributes`, within bounds.
    pub fn add_event(
        &mut self,
        name: &str,
        attributes: &[(String, String)],
    ) -> Result<(), NoteRefused> {
        check_name(name)?;
        for (key, value) in attributes {
            check_name(key)?;
            check_not_reserved(key)?;
            check_value(value)?;
        }
        if self.events.len() >= MAX_PLUGIN_EVENTS || attributes.len() > MAX_PLUGIN_ATTRIBUTES {
            return Err(NoteRefused::Full);
        }
        let bytes: usize = attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.spend(name.len() + bytes)?;
        self.events.push(Event {
            name: name.to_owned(),
            time: SystemTime::now(),
            attributes: attributes
                .iter()
                .map(|(k, v)| (Cow::Owned(k.clone()), Value::from(v.clone())))
                .collect(),
        });
        Ok(())
    }

    fn spend(&mut self, bytes: usize) -> Result<(), NoteRefused> {
        if self.bytes + bytes > MAX_PLUGIN_NOTE_BYTES {
            return Err(NoteRefused::Full);
        }
        self.bytes += bytes;
        Ok(())
    }
}

/// The next id of a SplitMix64 sequence: every step gives a different output, and zero (no
/// span's id) is never one.
fn splitmix(state: &mut u64) -> [u8; 8] {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    z.max(1).to_be_bytes()
}

fn check_name(name: &str) -> Result<(), NoteRefused> {
    let fits = !name.is_empty()
        && name.len() <= MAX_PLUGIN_TEXT
        && name.bytes().all(|b| b.is_ascii_graphic());
    fits.then_some(()).ok_or(NoteRefused::OutOfBounds)
}

fn check_not_reserved(name: &str) -> Result<(), NoteRefused> {
    let reserved = name
        .get(..5)
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case("weir."));
    (!reserved).then_some(()).ok_or(NoteRefused::Reserved)
}

fn check_value(value: &str) -> Result<(), NoteRefused> {
    (value.len() <= MAX_PLUGIN_TEXT)
        .then_some(())
        .ok_or(NoteRefused::OutOfBounds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> TraceContext {
        TraceContext {
            trace_id: [7; 16],
            parent_id: None,
            span_id: [1, 2, 3, 4, 5, 6, 7, 8],
            sampled: true,
        }
    }

    #[test]
    fn span_ids_within_a_request_differ_and_are_never_zero() {
        let mut spans = RequestSpans::new(context(), SystemTime::now());
        let mut seen = std::collections::HashSet::new();
        seen.insert(context().span_id);
        for _ in 0..10_000 {
            let id = spans.new_id();
            assert_ne!(id, [0; 8]);
            assert!(seen.insert(id), "{id:?} twice");
        }
    }

    #[test]
    fn a_request_records_at_most_its_bound_and_counts_the_rest() {
        let mut spans = RequestSpans::new(context(), SystemTime::now());
        for _ in 0..MAX_SPANS + 5 {
            let id = spans.new_id();
            spans.push(SpanRecord::ending_now(
                "x",
                Kind::Internal,
                id,
                None,
                SystemTime::now(),
            ));
        }
        let (kept, dropped) = spans.into_parts();
        assert_eq!((kept.len(), dropped), (MAX_SPANS, 5));
    }

    #[test]
    fn a_plugins_notes_are_bounded_in_count_size_and_form() {
        let mut notes = CallNotes::new([1; 8]);
        assert_eq!(notes.set_attribute("", "v"), Err(NoteRefused::OutOfBounds));
        assert_eq!(
            notes.set_attribute("a b", "v"),
            Err(NoteRefused::OutOfBounds)
        );
        // The gateway's own attributes cannot be written over: a tenant's plugin would pass
        // for another tenant.
        for reserved in ["weir.tenant", "WEIR.outcome", "weir."] {
            assert_eq!(
                notes.set_attribute(reserved, "b"),
                Err(NoteRefused::Reserved)
            );
            assert_eq!(
                notes.add_event("e", &[(reserved.into(), "b".into())]),
                Err(NoteRefused::Reserved)
            );
        }
        notes.set_attribute("weird", "ok").unwrap();
        notes.attributes.clear();
        notes.bytes = 0;
        assert_eq!(
            notes.set_attribute("k", &"v".repeat(MAX_PLUGIN_TEXT + 1)),
            Err(NoteRefused::OutOfBounds)
        );
        for index in 0..MAX_PLUGIN_ATTRIBUTES {
            notes.set_attribute(&format!("k{index}"), "v").unwrap();
        }
        // A key already set is replaced, not added.
        notes.set_attribute("k0", "w").unwrap();
        assert_eq!(notes.set_attribute("one-more", "v"), Err(NoteRefused::Full));
        assert_eq!(notes.attributes.len(), MAX_PLUGIN_ATTRIBUTES);
        assert_eq!(notes.attributes[0].1, Value::from("w".to_owned()));

        let mut notes = CallNotes::new([1; 8]);
        let big = "v".repeat(MAX_PLUGIN_TEXT);
        let mut added = 0;
        while notes.add_event("e", &[("k".into(), big.clone())]).is_ok() {
            added += 1;
        }
        assert_eq!(added, MAX_PLUGIN_EVENTS);
        let mut notes = CallNotes::new([1; 8]);
        let pairs: Vec<(String, String)> =
            (0..16).map(|i| (format!("k{i}"), big.clone())).collect();
        assert_eq!(notes.add_event("e", &pairs), Err(NoteRefused::Full));
    }
}
