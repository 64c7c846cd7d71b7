//! ai-proxy: serves OpenAI's `POST /v1/chat/completions` from one or more providers
//! (OpenAI-compatible endpoints and Anthropic's Messages API), tried in priority order with
//! the gateway's fallbacks, and translated both ways, streamed or whole. APISIX's `ai-proxy`
//! and `ai-proxy-multi` have the same shape.

mod anthropic;

use std::sync::{Mutex, PoisonError};

use serde::Deserialize;
use serde_json::{Map, Value, json};
use weir_sdk::ai_metrics::{self, ModelUse};
use weir_sdk::fallbacks::{self, Target};
use weir_sdk::{
    Action, ChunkAction, ChunkWants, Level, Plugin, Reply, Request, Response, Summary, Wants,
    schemars, sse,
};

/// The most instances one route may list (the gateway tries at most 8 targets).
const MAX_INSTANCES: usize = 8;
/// The most models `allowed_models` may list.
const MAX_MODELS: usize = 256;

/// `{"instances": [...], "allowed_models": [...]}`.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Config {
    /// The providers to try, highest `priority` first (in their order here among equals).
    instances: Vec<InstanceConfig>,
    /// When not empty, the only models a client may ask for.
    #[serde(default)]
    allowed_models: Vec<String>,
}

/// One provider the request may go to.
#[derive(Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct InstanceConfig {
    /// The instance's name, for the logs.
    name: String,
    /// The provider's API: `openai` (any OpenAI-compatible endpoint) or `anthropic`.
    provider: Provider,
    /// The id of the gateway upstream that reaches the provider.
    upstream: String,
    /// The provider's API key. Without it, the key is the consumer's: its `ai-proxy`
    /// credential's `api_key` (the plugin entry's `grants.consumers` must list `ai-proxy`).
    /// Write-only: the admin API never shows it.
    #[serde(default)]
    #[schemars(extend("writeOnly" = true))]
    api_key: Option<String>,
    /// The model to ask for, whatever the client asked.
    #[serde(default)]
    model: Option<String>,
    /// Higher is tried first.
    #[serde(default)]
    priority: i32,
    /// The provider's path (with any query); by default `/v1/chat/completions` for `openai`
    /// and `/v1/messages` for `anthropic`.
    #[serde(default)]
    path: Option<String>,
}

/// The API a provider speaks.
#[derive(Clone, Copy, Debug, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(rename_all = "snake_case")]
enum Provider {
    Openai,
    Anthropic,
}

impl Provider {
    /// The provider's name in the metrics.
    fn label(self) -> &'static str {
        match self {
            Provider::Openai => "openai",
            Provider::Anthropic => "anthropic",
        }
    }
}

/// How a response's body reaches the client.
#[derive(Debug, Default)]
enum Answer {
    /// As it came: a request not this plugin's, or an answer it does not read.
    #[default]
    Pass,
    /// An OpenAI-compatible provider's whole answer: held, its usage read, then passed.
    OpenaiWhole,
    /// An OpenAI-compatible provider's stream: passed event by event, its usage read (and
    /// kept from a client that did not ask for it).
    OpenaiStream,
    /// Held whole, then translated from Anthropic's JSON (an answer or an error).
    AnthropicWhole,
    /// Translated event by event from Anthropic's stream.
    AnthropicStream(anthropic::Stream),
    /// Held whole, with the provider's key taken out: an OpenAI-compatible provider's error.
    Redacted,
    /// The gateway's own error, when no provider answered: said again in OpenAI's format.
    NoProvider,
}

/// What the plugin keeps for the request it serves, from `on-request` to its last chunk.
#[derive(Debug, Default)]
struct Exchange {
    /// The provider of each target set, and the model asked of it, in their order.
    providers: Vec<(Provider, String)>,
    /// The target that answered.
    answered: Option<(Provider, String)>,
    /// When the request came, in milliseconds since the epoch.
    started_ms: u64,
    /// The prompt's and the answer's tokens, once an answer said.
    usage: Option<(u64, u64)>,
    /// Milliseconds from the request to the first token of a stream.
    first_token_ms: Option<u64>,
    /// The keys sent, to take out of anything a provider says back.
    keys: Vec<String>,
    /// Whether the client asked for usage at the end of a stream.
    include_usage: bool,
    /// Whether the client asked for a stream.
    stream: bool,
    /// When the request came, in seconds since the epoch.
    created: u64,
    answer: Answer,
}

struct AiProxy {
    /// Highest priority first.
    instances: Vec<InstanceConfig>,
    allowed_models: Vec<String>,
    exchange: Mutex<Exchange>,
}

/// An answer in OpenAI's error format.
fn openai_error(status: u16, kind: &str, message: &str) -> Reply {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": null}});
    Reply {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.to_string().into_bytes(),
    }
}

fn invalid(message: &str) -> Action {
    Action::Respond(openai_error(400, "invalid_request_error", message))
}

/// Whether a content type's essence is `text/event-stream`.
fn is_event_stream(content_type: Option<&str>) -> bool {
    content_type
        .and_then(|value| value.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// `bytes` with each of `keys` replaced by `***`.
fn redacted(bytes: &[u8], keys: &[String]) -> Vec<u8> {
    let mut text = String::from_utf8_lossy(bytes).into_owned();
    for key in keys.iter().filter(|key| !key.is_empty()) {
        text = text.replace(key.as_str(), "***");
    }
    text.into_bytes()
}

impl AiProxy {
    fn exchange(&self) -> std::sync::MutexGuard<'_, Exchange> {
        self.exchange.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The API key for `instance`: its own, or the consumer's.
    fn key(&self, instance: &InstanceConfig, req: &Request) -> Option<String> {
        if let Some(key) = &instance.api_key {
            return Some(key.clone());
        }
        let credential = weir_sdk::consumers::credential(req, "ai-proxy").ok()??;
        let credential: Value = serde_json::from_str(&credential).ok()?;
        credential["api_key"].as_str().map(str::to_owned)
    }

    /// The target for `instance` of the client's request `body`, or why there is none.
    fn target(
        &self,
        instance: &InstanceConfig,
        body: &Map<String, Value>,
        model: Option<&str>,
        key: &str,
    ) -> Result<(Target, String), String> {
        let model = instance
            .model
            .as_deref()
            .or(model)
            .ok_or("the request names no model")?;
        let (path, headers, body) = match instance.provider {
            Provider::Openai => {
                let mut body = body.clone();
                body.insert("model".into(), model.into());
                if body.get("stream") == Some(&Value::Bool(true)) {
                    // The usage is the metrics'; a client that did not ask never sees it.
                    let options = body
                        .entry("stream_options")
                        .or_insert_with(|| Value::Object(Map::new()));
                    if let Value::Object(options) = options {
                        options.insert("include_usage".into(), true.into());
                    }
                }
                let headers = vec![("authorization".to_owned(), format!("Bearer {key}"))];
                ("/v1/chat/completions", headers, Value::Object(body))
            }
            Provider::Anthropic => {
                let headers = vec![
                    ("x-api-key".to_owned(), key.to_owned()),
                    (
                        "anthropic-version".to_owned(),
                        anthropic::VERSION.to_owned(),
                    ),
                ];
                ("/v1/messages", headers, anthropic::request(body, model)?)
            }
        };
        let mut set_headers = headers;
        set_headers.push(("content-type".into(), "application/json".into()));
        let target = Target {
            upstream: instance.upstream.clone(),
            set_headers,
            path: Some(instance.path.clone().unwrap_or_else(|| path.to_owned())),
            body: Some(body.to_string().into_bytes()),
        };
        Ok((target, model.to_owned()))
    }

    /// The response chunk of a request this plugin sent on, as the client gets it.
    fn answer_chunk(&self, chunk: &[u8], end_of_stream: bool) -> ChunkAction {
        let mut exchange = self.exchange();
        let exchange = &mut *exchange;
        let whole = matches!(
            exchange.answer,
            Answer::OpenaiWhole | Answer::AnthropicWhole | Answer::Redacted | Answer::NoProvider
        );
        if whole && !end_of_stream {
            return ChunkAction::Hold;
        }
        let streamed = matches!(
            exchange.answer,
            Answer::OpenaiStream | Answer::AnthropicStream(_)
        );
        let mut events = Vec::new();
        if streamed {
            let (whole, rest) = sse::split_events(chunk);
            if !rest.is_empty() && !end_of_stream {
                // An event split across chunks is read once whole.
                return ChunkAction::Hold;
            }
            events = whole;
            if !rest.is_empty() {
                // The stream ended without the last event's blank line.
                events.push(rest);
            }
        }
        match &mut exchange.answer {
            Answer::Pass => ChunkAction::Pass,
            Answer::OpenaiWhole => {
                exchange.usage = serde_json::from_slice::<Value>(chunk)
                    .ok()
                    .and_then(|answer| openai_usage(&answer));
                ChunkAction::Pass
            }
            Answer::AnthropicWhole => {
                let translated = serde_json::from_slice::<Value>(chunk)
                    .ok()
                    .and_then(|whole| anthropic::answer(&whole, exchange.created));
                let Some(answer) = translated else {
                    return ChunkAction::Replace(redacted(chunk, &exchange.keys));
                };
                exchange.usage = openai_usage(&answer);
                ChunkAction::Replace(redacted(answer.to_string().as_bytes(), &exchange.keys))
            }
            Answer::Redacted => ChunkAction::Replace(redacted(chunk, &exchange.keys)),
            Answer::NoProvider => {
                let reply = openai_error(502, "upstream_error", "no provider could answer");
                ChunkAction::Replace(reply.body)
            }
            Answer::OpenaiStream => {
                let keep_usage = exchange.include_usage;
                let mut out = Vec::with_capacity(chunk.len());
                let mut dropped = false;
                for event in events {
                    let data = sse::event_data(event);
                    let parsed = data.and_then(|data| serde_json::from_slice::<Value>(&data).ok());
                    if let Some(data) = &parsed {
                        if let Some(usage) = openai_usage(data) {
                            exchange.usage = Some(usage);
                        }
                        let texted = data["choices"][0]["delta"]["content"]
                            .as_str()
                            .is_some_and(|text| !text.is_empty());
                        if texted && exchange.first_token_ms.is_none() {
                            exchange.first_token_ms = Some(elapsed_ms(exchange.started_ms));
                        }
                        if !keep_usage && data["choices"] == json!([]) && data["usage"].is_object()
                        {
                            dropped = true;
                            continue;
                        }
                    }
                    out.extend_from_slice(event);
                }
                if dropped {
                    ChunkAction::Replace(out)
                } else {
                    ChunkAction::Pass
                }
            }
            Answer::AnthropicStream(stream) => {
                let mut out = Vec::new();
                for event in events {
                    let data = sse::event_data(event);
                    if let Some(Ok(data)) = data.map(|data| serde_json::from_slice::<Value>(&data))
                    {
                        stream.event(&data, &mut out);
                    }
                }
                if stream.texted() && exchange.first_token_ms.is_none() {
                    exchange.first_token_ms = Some(elapsed_ms(exchange.started_ms));
                }
                exchange.usage = Some(stream.tokens());
                ChunkAction::Replace(out)
            }
        }
    }
}

/// Milliseconds since `started_ms`.
fn elapsed_ms(started_ms: u64) -> u64 {
    weir_sdk::now_ms().saturating_sub(started_ms)
}

/// The prompt's and the answer's tokens in an OpenAI answer or chunk's `usage`.
fn openai_usage(answer: &Value) -> Option<(u64, u64)> {
    let usage = answer.get("usage").filter(|usage| usage.is_object())?;
    Some((
        usage["prompt_tokens"].as_u64().unwrap_or(0),
        usage["completion_tokens"].as_u64().unwrap_or(0),
    ))
}

impl Plugin for AiProxy {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.instances.is_empty() || config.instances.len() > MAX_INSTANCES {
            return Err(format!("instances: list 1 to {MAX_INSTANCES} providers"));
        }
        if config.allowed_models.len() > MAX_MODELS {
            return Err(format!("allowed_models: more than {MAX_MODELS} models"));
        }
        let mut instances = config.instances;
        for instance in &instances {
            if instance
                .path
                .as_ref()
                .is_some_and(|path| !path.starts_with('/'))
            {
                return Err(format!(
                    "instances: {}'s path must start with /",
                    instance.name
                ));
            }
        }
        // Stable: among equal priorities, the config's order holds.
        instances.sort_by_key(|instance| std::cmp::Reverse(instance.priority));
        Ok(AiProxy {
            instances,
            allowed_models: config.allowed_models,
            exchange: Mutex::default(),
        })
    }

    fn wants(&self) -> Wants {
        Wants {
            on_request: true,
            on_response: true,
            on_log: true,
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
        // The instance is this request's until its last chunk; what an earlier one left goes.
        *self.exchange() = Exchange::default();
        if req.method() != "POST" {
            return Action::Respond(openai_error(
                405,
                "invalid_request_error",
                "chat completions are POSTed",
            ));
        }
        let Ok(body) = req.body() else {
            return invalid("the request body could not be read");
        };
        let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&body) else {
            return invalid("the request body is not a JSON object");
        };
        let model = match body.get("model") {
            None | Some(Value::Null) => None,
            Some(Value::String(model)) => Some(model.as_str()),
            Some(_) => return invalid("model must be a string"),
        };
        if let Some(model) = model
            && !self.allowed_models.is_empty()
            && !self.allowed_models.iter().any(|allowed| allowed == model)
        {
            return Action::Respond(openai_error(
                400,
                "invalid_request_error",
                "the model is not allowed on this route",
            ));
        }
        let mut targets = Vec::new();
        let mut exchange = Exchange {
            include_usage: body
                .get("stream_options")
                .and_then(|options| options.get("include_usage"))
                == Some(&Value::Bool(true)),
            stream: body.get("stream") == Some(&Value::Bool(true)),
            started_ms: weir_sdk::now_ms(),
            ..Exchange::default()
        };
        let mut why = None;
        for instance in &self.instances {
            let Some(key) = self.key(instance, req) else {
                why.get_or_insert_with(|| "no API key for the provider".to_owned());
                continue;
            };
            match self.target(instance, &body, model, &key) {
                Ok((target, model)) => {
                    targets.push(target);
                    exchange.providers.push((instance.provider, model));
                    exchange.keys.push(key);
                }
                Err(e) => {
                    why.get_or_insert(e);
                }
            }
        }
        if targets.is_empty() {
            let why = why.unwrap_or_else(|| "no provider can serve the request".into());
            return invalid(&why);
        }
        // The client's credentials are for the gateway, never for a provider; and a
        // compressed answer could not be read as it streams.
        for header in ["authorization", "x-api-key", "api-key", "accept-encoding"] {
            req.remove_header(header);
        }
        if let Err(e) = fallbacks::set_targets(req, &targets) {
            weir_sdk::log(
                Level::Error,
                &format!("ai-proxy: the targets were refused: {e}"),
            );
            return Action::Respond(openai_error(
                500,
                "server_error",
                "the gateway's ai-proxy is misconfigured",
            ));
        }
        exchange.created = exchange.started_ms / 1000;
        *self.exchange() = exchange;
        Action::Continue
    }

    fn on_response(&self, req: &Request, resp: &Response) {
        let mut exchange = self.exchange();
        if exchange.providers.is_empty() {
            return;
        }
        let success = (200..300).contains(&resp.status());
        let streamed = is_event_stream(resp.header("content-type").as_deref());
        exchange.answered = fallbacks::answered_by(req)
            .and_then(|index| exchange.providers.get(index as usize).cloned());
        let provider = exchange.answered.as_ref().map(|(provider, _)| *provider);
        exchange.answer = match provider {
            Some(Provider::Anthropic) if success && streamed => Answer::AnthropicStream(
                anthropic::Stream::new(exchange.created, exchange.include_usage),
            ),
            Some(Provider::Anthropic) => Answer::AnthropicWhole,
            Some(Provider::Openai) if success && streamed => Answer::OpenaiStream,
            Some(Provider::Openai) if success => Answer::OpenaiWhole,
            Some(Provider::Openai) => Answer::Redacted,
            None if resp.status() >= 500 => Answer::NoProvider,
            None => Answer::Pass,
        };
    }

    fn on_log(&self, req: &Request, _summary: &Summary) {
        let exchange = self.exchange();
        let (Some((provider, model)), Some((prompt, completion))) =
            (&exchange.answered, exchange.usage)
        else {
            return;
        };
        let used = ModelUse {
            provider: provider.label().into(),
            model: model.clone(),
            prompt_tokens: prompt,
            completion_tokens: completion,
            first_token_ms: exchange.first_token_ms.filter(|_| exchange.stream),
        };
        if let Err(e) = ai_metrics::record(req, &used) {
            weir_sdk::log(Level::Warn, &format!("ai-proxy: usage not recorded: {e}"));
        }
    }

    fn on_response_chunk(&self, chunk: &[u8], end_of_stream: bool) -> ChunkAction {
        self.answer_chunk(chunk, end_of_stream)
    }
}

weir_sdk::export_plugin!(AiProxy);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_key_is_write_only_in_the_schema_the_admin_api_redacts_by() {
        let schema = serde_json::to_value(schemars::schema_for!(Config)).unwrap();
        let instance = &schema["$defs"]["InstanceConfig"]["properties"];
        assert_eq!(instance["api_key"]["writeOnly"], true, "{schema}");
        assert!(instance["upstream"].get("writeOnly").is_none(), "{schema}");
    }

    #[test]
    fn keys_are_taken_out_of_what_a_provider_says() {
        let keys = vec!["sk-secret".to_owned(), String::new()];
        assert_eq!(redacted(b"bad key sk-secret!", &keys), b"bad key ***!");
    }
}
