//! ai-token-limit: at most `tokens` LLM tokens per `window_s` seconds for each consumer, route or
//! client address, counted in fixed windows in the plugin's kv from the `usage` the answers
//! report (a JSON answer's, or a server-sent-events stream's last).

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use weir_sdk::{
    Action, ChunkAction, ChunkWants, Level, Plugin, Reply, Request, Response, Wants, consumers, kv,
    response, schemars, sse,
};

/// `{"tokens": 100000, "window_s": 3600, "count": "total", "key": "consumer"}`.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Tokens allowed per window: a request is let through while the window's count is under it.
    #[schemars(range(min = 1))]
    tokens: u64,
    /// The window's length in seconds, at most 30 days.
    #[schemars(range(min = 1, max = MAX_WINDOW_S))]
    window_s: u64,
    /// Which tokens count: `total` (prompt and completion), `prompt` or `completion`.
    #[serde(default)]
    count: Count,
    /// Who is counted, on each route apart: `consumer` (the one an auth plugin earlier in the
    /// chain found; the client's address when none did), `route` or `ip`.
    #[serde(default)]
    key: Key,
    /// The status of a refused request.
    #[serde(default = "default_rejected_code")]
    #[schemars(range(min = 200, max = 599))]
    rejected_code: u16,
}

/// Which of an answer's tokens count.
// Serialize puts the default in the schema.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, schemars::JsonSchema, PartialEq)]
#[serde(rename_all = "snake_case")]
enum Count {
    #[default]
    Total,
    Prompt,
    Completion,
}

/// Who a request's tokens are counted for.
// Serialize puts the default in the schema.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, schemars::JsonSchema, PartialEq)]
#[serde(rename_all = "snake_case")]
enum Key {
    #[default]
    Consumer,
    Route,
    Ip,
}

/// Too Many Requests, as OpenAI answers.
fn default_rejected_code() -> u16 {
    429
}

/// The longest window: 30 days.
const MAX_WINDOW_S: u64 = 30 * 86_400;

/// The most tokens one answer may add: more than any model answers, and small enough that a
/// hostile upstream's numbers cannot overflow the counter.
const MAX_ANSWER_TOKENS: u64 = 1 << 40;

/// What this request's answer body is, as far as counting goes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum Body {
    /// Not counted: passed on untouched.
    #[default]
    Other,
    /// A JSON answer, read whole at its end.
    Json,
    /// A server-sent-events stream, read event by event.
    EventStream,
}

/// What one request has left for its answer's hooks.
#[derive(Default)]
struct State {
    /// The counter's key without its window, when this request's usage is counted.
    counter: Option<String>,
    /// This plugin asked for the stream's usage, so the client, which did not, must not get it.
    injected: bool,
    /// The answer's body, as `on_response` found it.
    body: Body,
    /// The usage the answer reported so far.
    usage: Option<Usage>,
}

/// The plugin: one route's limit, and the request it is serving.
struct TokenLimit {
    tokens: u64,
    window_s: u64,
    count: Count,
    key: Key,
    rejected_code: u16,
    /// One request's state: the host gives an instance to one request at a time, from its
    /// `on_request` to its answer's last chunk, and to later requests afterwards.
    state: Mutex<State>,
}

/// The tokens an answer reports using; each count is absent when the answer does not say.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Usage {
    prompt: Option<u64>,
    completion: Option<u64>,
    total: Option<u64>,
}

impl Usage {
    /// The usage a `usage` object reports: OpenAI's names, or Anthropic's (and OpenAI
    /// Responses') `input_tokens` and `output_tokens`.
    fn of(value: &Value) -> Option<Usage> {
        let usage = value.as_object()?;
        let first = |names: &[&str]| {
            names
                .iter()
                .find_map(|name| usage.get(*name).and_then(token_count))
        };
        Some(Usage {
            prompt: first(&["prompt_tokens", "input_tokens"]),
            completion: first(&["completion_tokens", "output_tokens"]),
            total: first(&["total_tokens"]),
        })
    }

    /// Takes each count `newer` has: Anthropic's stream gives the prompt's tokens in its first
    /// event and the completion's in a later one.
    fn merge(&mut self, newer: Usage) {
        self.prompt = newer.prompt.or(self.prompt);
        self.completion = newer.completion.or(self.completion);
        self.total = newer.total.or(self.total);
    }

    /// The tokens that count, if the answer reported them.
    fn counted(&self, count: Count) -> Option<u64> {
        let tokens = match count {
            Count::Total => self.total.or(match (self.prompt, self.completion) {
                (None, None) => None,
                (prompt, completion) => {
                    Some(prompt.unwrap_or(0).saturating_add(completion.unwrap_or(0)))
                }
            }),
            Count::Prompt => self.prompt,
            Count::Completion => self.completion,
        }?;
        Some(tokens.min(MAX_ANSWER_TOKENS))
    }
}

/// A token count as an upstream wrote it, clamped: a negative one is 0, a fraction is cut, a
/// huge one is [`MAX_ANSWER_TOKENS`]; anything but a number is none.
fn token_count(value: &Value) -> Option<u64> {
    let number = value.as_number()?;
    let tokens = number
        .as_u64()
        .or_else(|| number.as_f64().map(|float| float.max(0.0) as u64))?;
    Some(tokens.min(MAX_ANSWER_TOKENS))
}

/// The usage a JSON answer or event reports: at the top, or in Anthropic's `message_start`
/// (`message.usage`) or OpenAI Responses' `response.completed` (`response.usage`).
fn usage_in(document: &Value) -> Option<Usage> {
    let mut found: Option<Usage> = None;
    for usage in [
        &document["message"]["usage"],
        &document["response"]["usage"],
        &document["usage"],
    ] {
        if let Some(usage) = Usage::of(usage) {
            found.get_or_insert_default().merge(usage);
        }
    }
    found
}

/// Whether an event is OpenAI's usage-only chunk (`"choices": []` with a `usage`), the one
/// `stream_options.include_usage` adds.
fn is_usage_only(document: &Value) -> bool {
    document["choices"].as_array().is_some_and(Vec::is_empty) && document["usage"].is_object()
}

/// What asking for a stream's usage makes of a request body.
#[derive(Debug, PartialEq)]
enum UsageRequest {
    /// Not a JSON object: nothing is counted for it.
    NotCounted,
    /// Counted as it is: not a stream, or one that already asks for its usage.
    Unchanged,
    /// The body that asks for the stream's usage, which the client's did not.
    Injected(Vec<u8>),
}

/// Makes a streamed chat completion's body ask for its usage (`stream_options.include_usage`),
/// keeping any other `stream_options`.
fn with_usage_requested(body: &[u8]) -> UsageRequest {
    let Ok(Value::Object(mut document)) = serde_json::from_slice::<Value>(body) else {
        return UsageRequest::NotCounted;
    };
    if document.get("stream") != Some(&Value::Bool(true)) {
        return UsageRequest::Unchanged;
    }
    match document.get_mut("stream_options") {
        None => {
            // Written in front of the body's own members, so that the rest goes upstream byte
            // for byte: serde_json's map would sort the keys and could round big numbers.
            let Some(open) = body.iter().position(|&byte| byte == b'{') else {
                return UsageRequest::Unchanged;
            };
            let mut injected = Vec::with_capacity(body.len() + 40);
            injected.extend_from_slice(&body[..=open]);
            injected.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
            injected.extend_from_slice(&body[open + 1..]);
            UsageRequest::Injected(injected)
        }
        Some(options @ Value::Null) => {
            *options = serde_json::json!({"include_usage": true});
            reserialized(document)
        }
        Some(Value::Object(options)) => {
            if options.get("include_usage") == Some(&Value::Bool(true)) {
                return UsageRequest::Unchanged;
            }
            options.insert("include_usage".into(), Value::Bool(true));
            reserialized(document)
        }
        // Not an object: the provider refuses it, and says why better than a rewrite would.
        Some(_) => UsageRequest::Unchanged,
    }
}

/// `document` as the request's new body.
fn reserialized(document: serde_json::Map<String, Value>) -> UsageRequest {
    match serde_json::to_vec(&Value::Object(document)) {
        Ok(body) => UsageRequest::Injected(body),
        Err(_) => UsageRequest::Unchanged,
    }
}

/// Whether the request goes to an API whose streams report their usage unasked and that
/// refuses `stream_options.include_usage`: Anthropic's messages, OpenAI's responses.
fn reports_usage_unasked(path: &str) -> bool {
    let path = path.trim_end_matches('/');
    path.ends_with("/messages") || path.ends_with("/responses")
}

/// The kind of body a `content-type` names: its essence, case-insensitive, parameters ignored.
fn body_kind(content_type: Option<&str>) -> Body {
    let essence = content_type
        .and_then(|value| value.split(';').next())
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if essence == "text/event-stream" {
        Body::EventStream
    } else if essence == "application/json" || essence.ends_with("+json") {
        Body::Json
    } else {
        Body::Other
    }
}

/// An event's data (its `data:` lines, joined with `\n`) as JSON, when it may hold a usage; an
/// event without one, `[DONE]`, or bytes that are not JSON give none.
fn event_json(event: &[u8]) -> Option<Value> {
    let data = sse::event_data(event)?;
    // Most events are tokens of the answer: parse only those that can hold a usage.
    if !data.windows(7).any(|window| window == b"\"usage\"") {
        return None;
    }
    serde_json::from_slice(&data).ok()
}

/// What a pass over whole events found.
#[derive(Debug, Default, PartialEq)]
struct Scan {
    /// The usage they report, the later events' counts over the earlier ones'.
    usage: Option<Usage>,
    /// The bytes to send instead, when usage-only events were dropped.
    kept: Option<Vec<u8>>,
}

/// Reads the usage of `events`, and drops the usage-only ones when `drop_usage_only`.
fn scan_events(events: &[&[u8]], drop_usage_only: bool) -> Scan {
    let mut scan = Scan::default();
    for (index, event) in events.iter().enumerate() {
        let document = event_json(event);
        if let Some(usage) = document.as_ref().and_then(usage_in) {
            scan.usage.get_or_insert_default().merge(usage);
        }
        if drop_usage_only && document.as_ref().is_some_and(is_usage_only) {
            // The bytes are copied only once an event is dropped; until then the chunk passes.
            scan.kept.get_or_insert_with(|| events[..index].concat());
        } else if let Some(kept) = &mut scan.kept {
            kept.extend_from_slice(event);
        }
    }
    scan
}

/// Which fixed window of `window_s` seconds `now_ms` falls in, and the seconds to its end (at
/// least 1).
fn window(now_ms: u64, window_s: u64) -> (u64, u64) {
    let window_ms = window_s.saturating_mul(1000).max(1);
    let number = now_ms / window_ms;
    let end_ms = number.saturating_add(1).saturating_mul(window_ms);
    let reset = end_ms.saturating_sub(now_ms).div_ceil(1000).max(1);
    (number, reset)
}

/// How long a window's counter is kept: past its end, so that a late answer never restarts it.
fn keep(reset: u64) -> Option<Duration> {
    Some(Duration::from_secs(reset.saturating_add(1)))
}

/// The counter's key without its window. The route is always in it, so that each route counts
/// on its own; route ids and consumer names have no `:`.
fn counter_base(route: &str, key: Key, consumer: Option<&str>, ip: &str) -> String {
    match (key, consumer) {
        (Key::Route, _) => format!("{route}:route"),
        (Key::Consumer, Some(consumer)) => format!("{route}:consumer:{consumer}"),
        (Key::Consumer, None) | (Key::Ip, _) => format!("{route}:ip:{ip}"),
    }
}

/// The counter's key in window `window`.
fn counter_key(base: &str, window: u64) -> String {
    format!("{base}:{window}")
}

/// The `X-AI-RateLimit-*` headers.
fn limit_headers(limit: u64, remaining: u64, reset: u64) -> [(&'static str, String); 3] {
    [
        ("x-ai-ratelimit-limit", limit.to_string()),
        ("x-ai-ratelimit-remaining", remaining.to_string()),
        ("x-ai-ratelimit-reset", reset.to_string()),
    ]
}

impl TokenLimit {
    /// The request's state; a poisoned lock still holds a usable one, reset by `on_request`.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The refusal of a request over the limit, in OpenAI's format for a tokens limit.
    fn rejection(&self, used: u64, reset: u64) -> Reply {
        let message = format!(
            "Rate limit reached on tokens per {}s: Limit {}, Used {used}. Please try again in {reset}s.",
            self.window_s, self.tokens
        );
        let body = serde_json::json!({"error": {
            "message": message,
            "type": "tokens",
            "param": null,
            "code": "rate_limit_exceeded",
        }});
        let mut headers = vec![
            ("content-type".to_owned(), "application/json".to_owned()),
            ("retry-after".to_owned(), reset.to_string()),
        ];
        headers.extend(
            limit_headers(self.tokens, 0, reset).map(|(name, value)| (name.to_owned(), value)),
        );
        Reply {
            status: self.rejected_code,
            headers,
            body: body.to_string().into_bytes(),
        }
    }

    /// Adds the answer's tokens to the window it ended in, once.
    fn settle(&self, state: &mut State) {
        let Some(base) = state.counter.take() else {
            return;
        };
        let Some(tokens) = state.usage.and_then(|usage| usage.counted(self.count)) else {
            return;
        };
        if tokens == 0 {
            return;
        }
        let (window, reset) = window(weir_sdk::now_ms(), self.window_s);
        let delta = i64::try_from(tokens).unwrap_or(i64::MAX);
        if let Err(error) = kv::incr(&counter_key(&base, window), delta, keep(reset)) {
            weir_sdk::log(
                Level::Warn,
                &format!("could not count an answer's {tokens} tokens: {error}"),
            );
        }
    }
}

impl Plugin for TokenLimit {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.tokens == 0 {
            return Err("`tokens` must be at least 1".into());
        }
        if !(1..=MAX_WINDOW_S).contains(&config.window_s) {
            return Err(format!("`window_s` must be in 1..={MAX_WINDOW_S}"));
        }
        if !(200..=599).contains(&config.rejected_code) {
            return Err("`rejected_code` must be a status in 200..=599".into());
        }
        Ok(TokenLimit {
            tokens: config.tokens,
            window_s: config.window_s,
            count: config.count,
            key: config.key,
            rejected_code: config.rejected_code,
            state: Mutex::new(State::default()),
        })
    }

    fn wants(&self) -> Wants {
        Wants {
            on_request: true,
            on_response: true,
            on_log: false,
            request_body: true,
            response_body: false,
        }
    }

    fn chunk_wants(&self) -> ChunkWants {
        ChunkWants {
            request: false,
            response: true,
        }
    }

    fn on_request(&self, req: &Request) -> Action {
        let mut state = self.state();
        *state = State::default();

        let (window, reset) = window(weir_sdk::now_ms(), self.window_s);
        let consumer = match self.key {
            Key::Consumer => consumers::current(req),
            Key::Route | Key::Ip => None,
        };
        let base = counter_base(
            &req.route_id(),
            self.key,
            consumer.as_deref(),
            &req.client_ip(),
        );
        // An increment by 0 reads the count atomically, on Redis as in memory.
        let used = match kv::incr(&counter_key(&base, window), 0, keep(reset)) {
            Ok(used) => u64::try_from(used).unwrap_or(0),
            Err(error) => {
                weir_sdk::log(
                    Level::Warn,
                    &format!(
                        "could not read the token count, so the request goes through: {error}"
                    ),
                );
                0
            }
        };
        if used >= self.tokens {
            return Action::Respond(self.rejection(used, reset));
        }
        // Queued for the answer, whoever gives it.
        for (name, value) in limit_headers(self.tokens, self.tokens - used, reset) {
            let _ = response::set_header(req, name, &value);
        }

        let Ok(body) = req.body() else {
            return Action::Continue;
        };
        match with_usage_requested(&body) {
            UsageRequest::NotCounted => return Action::Continue,
            UsageRequest::Unchanged => {}
            UsageRequest::Injected(_) if reports_usage_unasked(&req.path()) => {}
            UsageRequest::Injected(injected) => match req.set_body(&injected) {
                Ok(()) => state.injected = true,
                Err(error) => weir_sdk::log(
                    Level::Warn,
                    &format!("could not ask for the stream's usage: {error}"),
                ),
            },
        }
        // A compressed answer's usage cannot be read, so a client must not be able to ask for
        // one and go uncounted.
        req.remove_header("accept-encoding");
        state.counter = Some(base);
        Action::Continue
    }

    fn on_response(&self, _req: &Request, resp: &Response) {
        let mut state = self.state();
        let counted = state.counter.is_some() && (200..300).contains(&resp.status());
        state.body = if !counted {
            Body::Other
        } else if resp
            .header("content-encoding")
            .is_some_and(|encoding| !encoding.trim().eq_ignore_ascii_case("identity"))
        {
            weir_sdk::log(
                Level::Warn,
                "the answer is compressed, so its tokens are not counted",
            );
            Body::Other
        } else {
            body_kind(resp.header("content-type").as_deref())
        };
    }

    fn on_response_chunk(&self, chunk: &[u8], end_of_stream: bool) -> ChunkAction {
        let mut state = self.state();
        match state.body {
            Body::Other => ChunkAction::Pass,
            Body::Json => {
                if !end_of_stream {
                    return ChunkAction::Hold;
                }
                state.usage = serde_json::from_slice::<Value>(chunk)
                    .ok()
                    .and_then(|answer| usage_in(&answer));
                self.settle(&mut state);
                ChunkAction::Pass
            }
            Body::EventStream => {
                let (mut events, rest) = sse::split_events(chunk);
                if !rest.is_empty() {
                    if !end_of_stream {
                        return ChunkAction::Hold;
                    }
                    // The stream ended without the last event's blank line.
                    events.push(rest);
                }
                let scan = scan_events(&events, state.injected);
                if let Some(usage) = scan.usage {
                    state.usage.get_or_insert_default().merge(usage);
                }
                if end_of_stream {
                    self.settle(&mut state);
                }
                match scan.kept {
                    Some(kept) => ChunkAction::Replace(kept),
                    None => ChunkAction::Pass,
                }
            }
        }
    }
}

weir_sdk::export_plugin!(TokenLimit);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(tokens: u64, window_s: u64) -> Config {
        Config {
            tokens,
            window_s,
            count: Count::Total,
            key: Key::Consumer,
            rejected_code: 429,
        }
    }

    fn text(bytes: &[u8]) -> &str {
        std::str::from_utf8(bytes).unwrap()
    }

    #[test]
    fn the_config_is_checked() {
        assert!(TokenLimit::new(config(1000, 60)).is_ok());
        assert!(TokenLimit::new(config(0, 60)).is_err());
        assert!(TokenLimit::new(config(1000, 0)).is_err());
        assert!(TokenLimit::new(config(1000, MAX_WINDOW_S)).is_ok());
        assert!(TokenLimit::new(config(1000, MAX_WINDOW_S + 1)).is_err());
        let mut bad_code = config(1000, 60);
        bad_code.rejected_code = 99;
        assert!(TokenLimit::new(bad_code).is_err());

        let parsed: Config = serde_json::from_value(json!({"tokens": 5, "window_s": 60})).unwrap();
        assert_eq!(
            (parsed.count, parsed.key, parsed.rejected_code),
            (Count::Total, Key::Consumer, 429)
        );
        let parsed: Config = serde_json::from_value(
            json!({"tokens": 5, "window_s": 60, "count": "completion", "key": "ip"}),
        )
        .unwrap();
        assert_eq!((parsed.count, parsed.key), (Count::Completion, Key::Ip));
        for bad in [
            json!({"tokens": 5, "window_s": 60, "limit": 3}),
            json!({"tokens": 5, "window_s": 60, "count": "all"}),
            json!({"tokens": 5, "window_s": 60, "key": "header:x"}),
            json!({"tokens": -5, "window_s": 60}),
            json!({"window_s": 60}),
        ] {
            assert!(
                serde_json::from_value::<Config>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_schema_documents_every_field() {
        let schema = serde_json::to_value(schemars::schema_for!(Config)).unwrap();
        let properties = schema["properties"].as_object().unwrap();
        assert_eq!(properties.len(), 5);
        for (name, property) in properties {
            assert!(property["description"].is_string(), "{name}: {property}");
        }
        assert_eq!(schema["required"], json!(["tokens", "window_s"]));
        assert_eq!(properties["count"]["default"], "total");
        assert_eq!(properties["key"]["default"], "consumer");
        assert_eq!(properties["tokens"]["minimum"], 1);
        assert_eq!(properties["window_s"]["maximum"], MAX_WINDOW_S);
        assert_eq!(schema["additionalProperties"], json!(false));
    }

    #[test]
    fn usage_is_read_from_openai_and_anthropic_answers() {
        let openai = json!({"choices": [], "usage":
            {"prompt_tokens": 10, "completion_tokens": 32, "total_tokens": 42}});
        let usage = usage_in(&openai).unwrap();
        assert_eq!(usage.counted(Count::Total), Some(42));
        assert_eq!(usage.counted(Count::Prompt), Some(10));
        assert_eq!(usage.counted(Count::Completion), Some(32));

        let anthropic =
            json!({"type": "message", "usage": {"input_tokens": 7, "output_tokens": 5}});
        let usage = usage_in(&anthropic).unwrap();
        assert_eq!(usage.counted(Count::Total), Some(12));
        assert_eq!(usage.counted(Count::Prompt), Some(7));

        let responses = json!({"type": "response.completed", "response": {"usage":
            {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}}});
        assert_eq!(usage_in(&responses).unwrap().counted(Count::Total), Some(7));

        let only_prompt = json!({"usage": {"prompt_tokens": 9}});
        let usage = usage_in(&only_prompt).unwrap();
        assert_eq!(usage.counted(Count::Total), Some(9));
        assert_eq!(usage.counted(Count::Completion), None);

        for none in [
            json!({"usage": null}),
            json!({"usage": 12}),
            json!({"choices": []}),
            json!([1, 2]),
            json!("usage"),
        ] {
            assert_eq!(usage_in(&none), None, "{none}");
        }
        assert_eq!(
            usage_in(&json!({"usage": {}}))
                .unwrap()
                .counted(Count::Total),
            None
        );
    }

    #[test]
    fn hostile_token_counts_are_clamped() {
        assert_eq!(token_count(&json!(12)), Some(12));
        assert_eq!(token_count(&json!(-12)), Some(0));
        assert_eq!(token_count(&json!(12.9)), Some(12));
        assert_eq!(token_count(&json!(-1.5)), Some(0));
        assert_eq!(token_count(&json!(1e300)), Some(MAX_ANSWER_TOKENS));
        assert_eq!(token_count(&json!(u64::MAX)), Some(MAX_ANSWER_TOKENS));
        assert_eq!(token_count(&json!("12")), None);
        assert_eq!(token_count(&json!(null)), None);

        let huge = Usage {
            prompt: Some(MAX_ANSWER_TOKENS),
            completion: Some(MAX_ANSWER_TOKENS),
            total: None,
        };
        assert_eq!(huge.counted(Count::Total), Some(MAX_ANSWER_TOKENS));
        let huge = Usage::of(&json!({"prompt_tokens": u64::MAX, "completion_tokens": u64::MAX}));
        assert_eq!(huge.unwrap().counted(Count::Total), Some(MAX_ANSWER_TOKENS));
    }

    #[test]
    fn later_counts_win_field_by_field() {
        let mut usage = Usage::of(&json!({"input_tokens": 25, "output_tokens": 1})).unwrap();
        usage.merge(Usage::of(&json!({"output_tokens": 15})).unwrap());
        assert_eq!(usage.counted(Count::Total), Some(40));
        assert_eq!(usage.counted(Count::Completion), Some(15));
    }

    #[test]
    fn a_stream_is_made_to_ask_for_its_usage() {
        let body = br#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}],"n":12345678901234567890123}"#;
        let UsageRequest::Injected(injected) = with_usage_requested(body) else {
            panic!("not injected");
        };
        assert_eq!(
            text(&injected),
            r#"{"stream_options":{"include_usage":true},"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}],"n":12345678901234567890123}"#
        );

        let spaced = b" \n{ \"stream\": true }";
        let UsageRequest::Injected(injected) = with_usage_requested(spaced) else {
            panic!("not injected");
        };
        let document: Value = serde_json::from_slice(&injected).unwrap();
        assert_eq!(
            document,
            json!({"stream": true, "stream_options": {"include_usage": true}})
        );

        let other_options = br#"{"stream":true,"stream_options":{"include_obfuscation":false}}"#;
        let UsageRequest::Injected(injected) = with_usage_requested(other_options) else {
            panic!("not injected");
        };
        let document: Value = serde_json::from_slice(&injected).unwrap();
        assert_eq!(
            document["stream_options"],
            json!({"include_obfuscation": false, "include_usage": true})
        );

        for declined in [
            &br#"{"stream":true,"stream_options":{"include_usage":false}}"#[..],
            br#"{"stream":true,"stream_options":null}"#,
        ] {
            let UsageRequest::Injected(injected) = with_usage_requested(declined) else {
                panic!("not injected");
            };
            let document: Value = serde_json::from_slice(&injected).unwrap();
            assert_eq!(document["stream_options"]["include_usage"], json!(true));
        }
    }

    #[test]
    fn a_body_that_needs_nothing_is_left_alone() {
        for unchanged in [
            &br#"{"stream":true,"stream_options":{"include_usage":true}}"#[..],
            br#"{"stream":false}"#,
            br#"{"stream":"true"}"#,
            br#"{"messages":[]}"#,
            br#"{"stream":true,"stream_options":"yes"}"#,
        ] {
            assert_eq!(
                with_usage_requested(unchanged),
                UsageRequest::Unchanged,
                "{}",
                text(unchanged)
            );
        }
        for not_counted in [
            &b""[..],
            b"stream=true",
            b"[{\"stream\":true}]",
            b"\"stream\"",
            b"{\"stream\":true",
            b"\xff\xfe{}",
        ] {
            assert_eq!(with_usage_requested(not_counted), UsageRequest::NotCounted);
        }
    }

    #[test]
    fn apis_that_report_usage_unasked_are_known_by_path() {
        assert!(reports_usage_unasked("/v1/messages"));
        assert!(reports_usage_unasked("/v1/responses/"));
        assert!(!reports_usage_unasked("/v1/chat/completions"));
        assert!(!reports_usage_unasked("/v1/completions"));
        assert!(!reports_usage_unasked("/"));
    }

    #[test]
    fn the_content_type_says_what_the_body_is() {
        assert_eq!(body_kind(Some("text/event-stream")), Body::EventStream);
        assert_eq!(
            body_kind(Some(" Text/Event-Stream ; charset=utf-8")),
            Body::EventStream
        );
        assert_eq!(body_kind(Some("application/json")), Body::Json);
        assert_eq!(
            body_kind(Some("APPLICATION/JSON; charset=utf-8")),
            Body::Json
        );
        assert_eq!(body_kind(Some("application/problem+json")), Body::Json);
        assert_eq!(body_kind(Some("text/plain")), Body::Other);
        assert_eq!(body_kind(Some("text/event-streams")), Body::Other);
        assert_eq!(body_kind(Some("")), Body::Other);
        assert_eq!(body_kind(None), Body::Other);
    }

    #[test]
    fn an_events_data_lines_are_joined() {
        let event = b"event: message\ndata: {\"usage\":\ndata: {\"total_tokens\": 3}}\n\n";
        assert_eq!(
            event_json(event),
            Some(json!({"usage": {"total_tokens": 3}}))
        );
        assert_eq!(
            event_json(b"data:{\"usage\":null}\r\n\r\n"),
            Some(json!({"usage": null}))
        );
        assert_eq!(event_json(b"data: [DONE]\n\n"), None);
        assert_eq!(event_json(b"data: {\"choices\":[]}\n\n"), None);
        assert_eq!(event_json(b"data: {\"usage\": \xff}\n\n"), None);
        assert_eq!(event_json(b": {\"usage\":{}}\n\n"), None);
    }

    const OPENAI_STREAM: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n\
data: [DONE]\n\n";

    #[test]
    fn the_usage_only_event_is_dropped_when_the_plugin_asked_for_it() {
        let (events, _) = sse::split_events(OPENAI_STREAM);
        let scan = scan_events(&events, true);
        assert_eq!(scan.usage.unwrap().counted(Count::Total), Some(11));
        let kept = scan.kept.unwrap();
        assert!(!text(&kept).contains("total_tokens"));
        assert!(text(&kept).starts_with("data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]"));
        assert!(text(&kept).ends_with("\"usage\":null}\n\ndata: [DONE]\n\n"));
        assert_eq!(kept.len() + events[2].len(), OPENAI_STREAM.len());

        // The client asked for it: the stream passes as it came.
        let scan = scan_events(&events, false);
        assert_eq!(scan.usage.unwrap().counted(Count::Total), Some(11));
        assert_eq!(scan.kept, None);

        // A chunk of nothing but the usage event becomes nothing.
        let scan = scan_events(&events[2..3], true);
        assert_eq!(scan.kept, Some(Vec::new()));
    }

    #[test]
    fn a_usage_sent_with_content_is_kept() {
        let event: &[u8] =
            b"data: {\"choices\":[{\"delta\":{}}],\"usage\":{\"total_tokens\":4}}\n\n";
        let scan = scan_events(&[event], true);
        assert_eq!(scan.usage.unwrap().counted(Count::Total), Some(4));
        assert_eq!(scan.kept, None);
    }

    #[test]
    fn an_anthropic_stream_counts_its_first_and_last_usage() {
        let stream = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"usage\"}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n";
        let (events, rest) = sse::split_events(stream);
        assert!(rest.is_empty());
        let scan = scan_events(&events, false);
        assert_eq!(scan.usage.unwrap().counted(Count::Total), Some(40));
        assert_eq!(scan.kept, None);
    }

    #[test]
    fn hostile_events_pass_untouched_and_count_nothing() {
        let events: [&[u8]; 4] = [
            b"data: {\"usage\": {\"total_tokens\": \n\n",
            b"data: \xff\xfe\"usage\"\n\n",
            b"\x00\x01\n\n",
            b"data: {\"choices\": [], \"usage\": \"many\"}\n\n",
        ];
        let scan = scan_events(&events, true);
        assert_eq!(scan, Scan::default());
    }

    #[test]
    fn windows_are_fixed_and_reset_at_their_end() {
        assert_eq!(window(0, 60), (0, 60));
        assert_eq!(window(59_001, 60), (0, 1));
        assert_eq!(window(59_999, 60), (0, 1));
        assert_eq!(window(60_000, 60), (1, 60));
        assert_eq!(window(1_700_000_000_123, 3600), (472_222, 3600 - 800));
        assert_eq!(window(u64::MAX, MAX_WINDOW_S).1, 1);
        assert_eq!(keep(5), Some(Duration::from_secs(6)));
    }

    #[test]
    fn the_counter_key_always_has_the_route() {
        assert_eq!(
            counter_base("chat", Key::Consumer, Some("alice"), "10.0.0.1"),
            "chat:consumer:alice"
        );
        // No auth plugin found a consumer: the client's address is counted.
        assert_eq!(
            counter_base("chat", Key::Consumer, None, "10.0.0.1"),
            "chat:ip:10.0.0.1"
        );
        assert_eq!(
            counter_base("chat", Key::Ip, Some("alice"), "::1"),
            "chat:ip:::1"
        );
        assert_eq!(
            counter_base("chat", Key::Route, Some("alice"), "::1"),
            "chat:route"
        );
        assert_eq!(counter_key("chat:route", 7), "chat:route:7");
    }

    #[test]
    fn a_refusal_is_in_openais_format() {
        let limit = TokenLimit::new(config(1000, 60)).unwrap();
        let reply = limit.rejection(1020, 17);
        assert_eq!(reply.status, 429);
        let header = |name: &str| {
            reply
                .headers
                .iter()
                .find(|(header, _)| header == name)
                .map(|(_, value)| value.as_str())
        };
        assert_eq!(header("content-type"), Some("application/json"));
        assert_eq!(header("retry-after"), Some("17"));
        assert_eq!(header("x-ai-ratelimit-limit"), Some("1000"));
        assert_eq!(header("x-ai-ratelimit-remaining"), Some("0"));
        assert_eq!(header("x-ai-ratelimit-reset"), Some("17"));
        let body: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["error"]["type"], "tokens");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        assert_eq!(body["error"]["param"], Value::Null);
        assert_eq!(
            body["error"]["message"],
            "Rate limit reached on tokens per 60s: Limit 1000, Used 1020. Please try again in 17s."
        );
    }
}
