//! ai-prompt-guard: checks the messages of an OpenAI-style chat completion request against
//! allow and deny patterns, and refuses it with 400, in OpenAI's error format, before any
//! provider is called. APISIX's `ai-prompt-guard` has the same fields.

use regex::{Regex, RegexBuilder};
use serde::Deserialize;
use weir_sdk::{Action, Plugin, Reply, Request, Wants, schemars};

/// The longest pattern, and the most patterns of each kind.
const MAX_PATTERN: usize = 1024;
const MAX_PATTERNS: usize = 64;
/// The most memory one compiled pattern may take.
const PATTERN_SIZE_LIMIT: usize = 1 << 20;

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Check every role's messages (system and assistant too), not only the user's.
    #[serde(default)]
    match_all_roles: bool,
    /// Check every message of the conversation, not only the last one checked.
    #[serde(default)]
    match_all_conversation_history: bool,
    /// A checked message must match at least one of these, when there are any.
    #[serde(default)]
    allow_patterns: Vec<String>,
    /// A checked message must match none of these.
    #[serde(default)]
    deny_patterns: Vec<String>,
}

struct PromptGuard {
    match_all_roles: bool,
    match_all_conversation_history: bool,
    allow: Vec<Regex>,
    deny: Vec<Regex>,
}

/// Compiles `patterns`, each bounded in length and in the memory it may take.
fn compiled(patterns: &[String], field: &str) -> Result<Vec<Regex>, String> {
    if patterns.len() > MAX_PATTERNS {
        return Err(format!("{field}: more than {MAX_PATTERNS} patterns"));
    }
    patterns
        .iter()
        .map(|pattern| {
            if pattern.len() > MAX_PATTERN {
                return Err(format!("{field}: a pattern is over {MAX_PATTERN} bytes"));
            }
            RegexBuilder::new(pattern)
                .size_limit(PATTERN_SIZE_LIMIT)
                .build()
                .map_err(|e| format!("{field}: {pattern:?} is not a pattern: {e}"))
        })
        .collect()
}

/// A 400 in OpenAI's error format.
fn refused(message: &str) -> Action {
    let body = serde_json::json!({"error": {
        "message": message,
        "type": "invalid_request_error",
        "code": "prompt_guard",
    }});
    Action::Respond(Reply {
        status: 400,
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.to_string().into_bytes(),
    })
}

/// The text of a message's `content`: a string, or the text parts of a list of parts.
fn text_of(content: &serde_json::Value) -> Option<String> {
    match content {
        serde_json::Value::String(text) => Some(text.clone()),
        serde_json::Value::Array(parts) => Some(
            parts
                .iter()
                .filter(|part| part["type"] == "text")
                .filter_map(|part| part["text"].as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        serde_json::Value::Null => Some(String::new()),
        _ => None,
    }
}

impl Plugin for PromptGuard {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        Ok(PromptGuard {
            match_all_roles: config.match_all_roles,
            match_all_conversation_history: config.match_all_conversation_history,
            allow: compiled(&config.allow_patterns, "allow_patterns")?,
            deny: compiled(&config.deny_patterns, "deny_patterns")?,
        })
    }

    fn wants(&self) -> Wants {
        Wants {
            on_request: true,
            on_response: false,
            on_log: false,
            request_body: true,
            response_body: false,
        }
    }

    fn on_request(&self, req: &Request) -> Action {
        let Ok(body) = req.body() else {
            return refused("the request body could not be read");
        };
        let Ok(document) = serde_json::from_slice::<serde_json::Value>(&body) else {
            return refused("the request body is not JSON");
        };
        let Some(messages) = document["messages"].as_array() else {
            return refused("the request has no messages");
        };
        let mut checked: Vec<String> = Vec::new();
        for message in messages {
            let role = message["role"].as_str().unwrap_or_default();
            if !self.match_all_roles && role != "user" {
                continue;
            }
            let Some(text) = text_of(&message["content"]) else {
                return refused("a message's content is neither text nor a list of parts");
            };
            checked.push(text);
        }
        if !self.match_all_conversation_history && checked.len() > 1 {
            checked.drain(..checked.len() - 1);
        }
        for text in &checked {
            if self.deny.iter().any(|pattern| pattern.is_match(text)) {
                return refused("the prompt is not allowed: it matches a deny pattern");
            }
            if !self.allow.is_empty() && !self.allow.iter().any(|pattern| pattern.is_match(text)) {
                return refused("the prompt is not allowed: it matches no allow pattern");
            }
        }
        Action::Continue
    }
}

weir_sdk::export_plugin!(PromptGuard);
