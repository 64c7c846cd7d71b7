//! OpenAI's chat completions to Anthropic's Messages API and back: the request, a whole
//! answer, each event of a streamed one, and errors. Pure, so that it is tested natively.

use serde_json::{Map, Value, json};

/// The Messages API version the requests are written for.
pub const VERSION: &str = "2023-06-01";

/// `max_tokens` when the client gave none: Anthropic requires one, OpenAI does not.
const DEFAULT_MAX_TOKENS: u64 = 4096;

/// An OpenAI chat completion request as an Anthropic Messages request for `model`, or why it
/// cannot be one.
pub fn request(openai: &Map<String, Value>, model: &str) -> Result<Value, String> {
    for unsupported in [
        "tools",
        "tool_choice",
        "functions",
        "response_format",
        "logprobs",
    ] {
        if openai.get(unsupported).is_some_and(|v| !v.is_null()) {
            return Err(format!("{unsupported} is not translated for anthropic"));
        }
    }
    if openai
        .get("n")
        .and_then(Value::as_u64)
        .is_some_and(|n| n != 1)
    {
        return Err("n other than 1 is not translated for anthropic".into());
    }
    let Some(messages) = openai.get("messages").and_then(Value::as_array) else {
        return Err("messages must be a list".into());
    };
    let mut system = Vec::new();
    let mut turns = Vec::new();
    for message in messages {
        let role = message["role"].as_str().unwrap_or_default();
        let content = content(&message["content"])?;
        match role {
            "system" | "developer" => system.push(text_of(&content)),
            "user" | "assistant" => turns.push(json!({"role": role, "content": content})),
            other => return Err(format!("messages of role {other:?} are not translated")),
        }
    }
    let max_tokens = openai
        .get("max_completion_tokens")
        .or_else(|| openai.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    let mut out = Map::new();
    out.insert("model".into(), model.into());
    out.insert("messages".into(), turns.into());
    out.insert("max_tokens".into(), max_tokens.into());
    if !system.is_empty() {
        out.insert("system".into(), system.join("\n\n").into());
    }
    for same in ["temperature", "top_p", "stream"] {
        if let Some(value) = openai.get(same).filter(|v| !v.is_null()) {
            out.insert(same.into(), value.clone());
        }
    }
    match openai.get("stop") {
        Some(Value::String(stop)) => {
            out.insert("stop_sequences".into(), json!([stop]));
        }
        Some(stop @ Value::Array(_)) => {
            out.insert("stop_sequences".into(), stop.clone());
        }
        _ => {}
    }
    if let Some(user) = openai.get("user").and_then(Value::as_str) {
        out.insert("metadata".into(), json!({ "user_id": user }));
    }
    Ok(Value::Object(out))
}

/// A message's content as Anthropic's: a string stays one, and a list keeps its text parts.
fn content(content: &Value) -> Result<Value, String> {
    match content {
        Value::String(_) => Ok(content.clone()),
        Value::Null => Ok(Value::String(String::new())),
        Value::Array(parts) => parts
            .iter()
            .map(
                |part| match (part["type"].as_str(), part["text"].as_str()) {
                    (Some("text"), Some(text)) => Ok(json!({"type": "text", "text": text})),
                    (kind, _) => Err(format!(
                        "content parts of type {:?} are not translated",
                        kind.unwrap_or_default()
                    )),
                },
            )
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        _ => Err("a message's content is neither text nor a list of parts".into()),
    }
}

/// The text of translated content, for the system prompt.
fn text_of(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| part["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// OpenAI's `finish_reason` for Anthropic's `stop_reason`.
fn finish_reason(stop_reason: &Value) -> Value {
    match stop_reason.as_str() {
        Some("end_turn" | "stop_sequence") => "stop".into(),
        Some("max_tokens") => "length".into(),
        Some("tool_use") => "tool_calls".into(),
        Some("refusal") => "content_filter".into(),
        _ => Value::Null,
    }
}

/// OpenAI's `usage` for Anthropic's input and output token counts.
fn usage(input: u64, output: u64) -> Value {
    json!({
        "prompt_tokens": input,
        "completion_tokens": output,
        "total_tokens": input.saturating_add(output),
    })
}

/// A whole Anthropic answer (a message or an error) as OpenAI's, stamped `created`.
pub fn answer(anthropic: &Value, created: u64) -> Option<Value> {
    if anthropic["type"] == "error" {
        return Some(error(anthropic));
    }
    if anthropic["type"] != "message" {
        return None;
    }
    let text: String = anthropic["content"]
        .as_array()?
        .iter()
        .filter(|block| block["type"] == "text")
        .filter_map(|block| block["text"].as_str())
        .collect();
    let counts = &anthropic["usage"];
    Some(json!({
        "id": anthropic["id"],
        "object": "chat.completion",
        "created": created,
        "model": anthropic["model"],
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason(&anthropic["stop_reason"]),
        }],
        "usage": usage(
            counts["input_tokens"].as_u64().unwrap_or(0),
            counts["output_tokens"].as_u64().unwrap_or(0),
        ),
    }))
}

/// An Anthropic error body as OpenAI's.
pub fn error(anthropic: &Value) -> Value {
    let message = anthropic["error"]["message"]
        .as_str()
        .unwrap_or("the provider answered with an error");
    let kind = anthropic["error"]["type"].as_str().unwrap_or("api_error");
    json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
}

/// What a streamed answer carries from event to event.
#[derive(Debug, Default)]
pub struct Stream {
    /// The message's id, from `message_start`.
    id: String,
    /// The model that answers, from `message_start`.
    model: String,
    /// When the answer began, in seconds since the epoch.
    created: u64,
    /// The prompt's tokens, from `message_start`.
    input_tokens: u64,
    /// The answer's tokens so far, from `message_delta`.
    output_tokens: u64,
    /// Whether the client asked for a last chunk with the usage.
    include_usage: bool,
    /// Whether any text has come yet.
    texted: bool,
}

impl Stream {
    /// A stream that began at `created`, with a usage chunk at its end if the client asked.
    pub fn new(created: u64, include_usage: bool) -> Stream {
        Stream {
            created,
            include_usage,
            ..Stream::default()
        }
    }

    /// The prompt's and the answer's tokens so far.
    pub fn tokens(&self) -> (u64, u64) {
        (self.input_tokens, self.output_tokens)
    }

    /// Whether any of the answer's text has come.
    pub fn texted(&self) -> bool {
        self.texted
    }

    /// The OpenAI events (each a `data:` line and a blank line) for one Anthropic event's
    /// data, appended to `out`.
    pub fn event(&mut self, data: &Value, out: &mut Vec<u8>) {
        match data["type"].as_str().unwrap_or_default() {
            "message_start" => {
                let message = &data["message"];
                self.id = message["id"].as_str().unwrap_or_default().to_owned();
                self.model = message["model"].as_str().unwrap_or_default().to_owned();
                self.input_tokens = message["usage"]["input_tokens"].as_u64().unwrap_or(0);
                let delta = json!({"role": "assistant", "content": ""});
                self.chunk(
                    json!([{"index": 0, "delta": delta, "finish_reason": null}]),
                    out,
                );
            }
            "content_block_delta" if data["delta"]["type"] == "text_delta" => {
                self.texted = true;
                let delta = json!({"content": data["delta"]["text"]});
                self.chunk(
                    json!([{"index": 0, "delta": delta, "finish_reason": null}]),
                    out,
                );
            }
            "message_delta" => {
                if let Some(output) = data["usage"]["output_tokens"].as_u64() {
                    self.output_tokens = output;
                }
                let finish = finish_reason(&data["delta"]["stop_reason"]);
                self.chunk(
                    json!([{"index": 0, "delta": {}, "finish_reason": finish}]),
                    out,
                );
            }
            "message_stop" => {
                if self.include_usage {
                    let mut chunk = self.chunk_value(json!([]));
                    chunk["usage"] = usage(self.input_tokens, self.output_tokens);
                    data_line(&chunk.to_string(), out);
                }
                data_line("[DONE]", out);
            }
            "error" => data_line(&error(data).to_string(), out),
            // ping, content_block_start and content_block_stop have no OpenAI counterpart.
            _ => {}
        }
    }

    fn chunk_value(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    fn chunk(&self, choices: Value, out: &mut Vec<u8>) {
        data_line(&self.chunk_value(choices).to_string(), out);
    }
}

/// One server-sent event of `data`.
fn data_line(data: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(data.as_bytes());
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn a_request_moves_system_prompts_and_renames_its_fields() {
        let openai = object(json!({
            "model": "gpt-4o", "stream": true, "temperature": 0.5, "stop": "END",
            "max_tokens": 50, "user": "u1",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"},
            ],
        }));
        let out = request(&openai, "claude-x").unwrap();
        assert_eq!(
            out,
            json!({
                "model": "claude-x", "max_tokens": 50, "system": "Be brief.", "stream": true,
                "temperature": 0.5, "stop_sequences": ["END"], "metadata": {"user_id": "u1"},
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                    {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Bye"},
                ],
            })
        );
        let bare = request(&object(json!({"messages": []})), "m").unwrap();
        assert_eq!(bare["max_tokens"], DEFAULT_MAX_TOKENS);
    }

    #[test]
    fn what_cannot_be_translated_is_refused() {
        for bad in [
            json!({"messages": [], "tools": [{}]}),
            json!({"messages": [], "n": 2}),
            json!({"messages": "hi"}),
            json!({"messages": [{"role": "tool", "content": "x"}]}),
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            json!({"messages": [{"role": "user", "content": 7}]}),
        ] {
            assert!(request(&object(bad.clone()), "m").is_err(), "{bad}");
        }
    }

    #[test]
    fn a_whole_answer_and_an_error_become_openais() {
        let message = json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}],
            "stop_reason": "max_tokens", "usage": {"input_tokens": 3, "output_tokens": 4},
        });
        let out = answer(&message, 7).unwrap();
        assert_eq!(out["object"], "chat.completion");
        assert_eq!(out["created"], 7);
        assert_eq!(out["choices"][0]["message"]["content"], "Hello");
        assert_eq!(out["choices"][0]["finish_reason"], "length");
        assert_eq!(out["usage"]["total_tokens"], 7);
        let failed =
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}});
        let out = answer(&failed, 7).unwrap();
        assert_eq!(out["error"]["message"], "busy");
        assert_eq!(out["error"]["type"], "overloaded_error");
        assert_eq!(answer(&json!({"type": "other"}), 7), None);
    }

    #[test]
    fn a_stream_becomes_chunks_with_usage_and_done() {
        let mut stream = Stream::new(9, true);
        let mut out = Vec::new();
        for event in [
            json!({"type": "message_start", "message": {"id": "msg_1", "model": "claude-x",
                   "usage": {"input_tokens": 5}}}),
            json!({"type": "ping"}),
            json!({"type": "content_block_start", "index": 0}),
            json!({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}}),
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                   "usage": {"output_tokens": 2}}),
            json!({"type": "message_stop"}),
        ] {
            stream.event(&event, &mut out);
        }
        let text = String::from_utf8(out).unwrap();
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 5, "{text}");
        assert_eq!(stream.tokens(), (5, 2));
        assert!(stream.texted());
        let data = |i: usize| -> Value { serde_json::from_str(&events[i][6..]).unwrap() };
        assert_eq!(data(0)["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(data(0)["id"], "msg_1");
        assert_eq!(data(1)["choices"][0]["delta"]["content"], "Hi");
        assert_eq!(data(2)["choices"][0]["finish_reason"], "stop");
        assert_eq!(data(3)["choices"], json!([]));
        assert_eq!(data(3)["usage"]["total_tokens"], 7);
        assert_eq!(events[4], "data: [DONE]");
    }
}
