//! body-crypt: request bodies arrive encrypted and are decrypted for the upstream; response
//! bodies are encrypted for the client. The form is JWE compact serialization (RFC 7516) with
//! `alg: dir` and `enc: A256GCM`, so that any JOSE library can talk to it.

use std::collections::BTreeMap;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::Deserialize;
use weir_sdk::{Action, Plugin, Reply, Request, Response, Wants, schemars};

/// `{"keys": {"k1": "<base64url of 32 bytes>"}, "active": "k1", "request": "decrypt",
/// "response": "encrypt"}`.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Keys by id (`kid`), each 32 bytes in base64url, as a JWK's `k`. Secrets: the admin API
    /// answers with a placeholder.
    #[schemars(extend("writeOnly" = true))]
    keys: BTreeMap<String, String>,
    /// The key that encrypts responses.
    active: String,
    /// `decrypt`: request bodies are JWE and go upstream in the clear.
    #[serde(default)]
    request: Option<Direction>,
    /// `encrypt`: response bodies go to the client as JWE.
    #[serde(default)]
    response: Option<Direction>,
    /// Only responses of these content types are encrypted (prefixes; empty: all).
    #[serde(default)]
    content_types: Vec<String>,
}

#[derive(Clone, Copy, Deserialize, schemars::JsonSchema, PartialEq)]
#[serde(rename_all = "snake_case")]
enum Direction {
    Decrypt,
    Encrypt,
}

/// The protected header weir writes and accepts.
#[derive(Deserialize, schemars::JsonSchema)]
struct Header {
    alg: String,
    enc: String,
    kid: String,
    #[serde(default)]
    cty: Option<String>,
    #[serde(default)]
    zip: Option<String>,
}

struct BodyCrypt {
    keys: BTreeMap<String, Aes256Gcm>,
    active: String,
    decrypt_requests: bool,
    encrypt_responses: bool,
    content_types: Vec<String>,
}

/// The media type of a JWE.
const JOSE: &str = "application/jose";

/// The var that marks a request this plugin refused: its own answer is not sealed.
const REFUSED: &str = "body-crypt.refused";

/// Why a JWE was refused; the client hears only that it was.
fn open(
    keys: &BTreeMap<String, Aes256Gcm>,
    jwe: &[u8],
) -> Result<(Vec<u8>, Option<String>), String> {
    let text = std::str::from_utf8(jwe).map_err(|_| "not text")?.trim();
    let parts: Vec<&str> = text.split('.').collect();
    let [protected, encrypted_key, iv, ciphertext, tag] = parts[..] else {
        return Err("not five parts".into());
    };
    let header: Header = serde_json::from_slice(&B64.decode(protected).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    if header.alg != "dir" || header.enc != "A256GCM" || header.zip.is_some() {
        return Err(format!(
            "alg {} enc {} is not dir A256GCM",
            header.alg, header.enc
        ));
    }
    if !encrypted_key.is_empty() {
        return Err("`dir` has no encrypted key".into());
    }
    let cipher = keys.get(&header.kid).ok_or("unknown kid")?;
    let iv = B64.decode(iv).map_err(|e| e.to_string())?;
    let tag = B64.decode(tag).map_err(|e| e.to_string())?;
    if iv.len() != 12 || tag.len() != 16 {
        return Err("iv or tag has the wrong length".into());
    }
    let mut sealed = B64.decode(ciphertext).map_err(|e| e.to_string())?;
    sealed.extend_from_slice(&tag);
    let plain = cipher
        .decrypt(
            Nonce::from_slice(&iv),
            Payload {
                msg: &sealed,
                aad: protected.as_bytes(),
            },
        )
        .map_err(|_| "the tag does not verify")?;
    Ok((plain, header.cty))
}

/// `plain` as a JWE under `kid`.
fn seal(cipher: &Aes256Gcm, kid: &str, cty: Option<&str>, plain: &[u8]) -> Result<String, String> {
    let mut header = serde_json::json!({"alg": "dir", "enc": "A256GCM", "kid": kid});
    if let Some(cty) = cty {
        header["cty"] = serde_json::Value::String(cty.to_owned());
    }
    let protected = B64.encode(header.to_string());
    let mut iv = [0u8; 12];
    getrandom::fill(&mut iv).map_err(|e| format!("no random nonce: {e}"))?;
    let sealed = cipher
        .encrypt(
            Nonce::from_slice(&iv),
            Payload {
                msg: plain,
                aad: protected.as_bytes(),
            },
        )
        .map_err(|_| "encryption failed")?;
    let (ciphertext, tag) = sealed.split_at(sealed.len() - 16);
    Ok(format!(
        "{protected}..{}.{}.{}",
        B64.encode(iv),
        B64.encode(ciphertext),
        B64.encode(tag)
    ))
}

impl Plugin for BodyCrypt {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.keys.is_empty() {
            return Err("`keys` is empty".into());
        }
        let mut keys = BTreeMap::new();
        for (kid, k) in &config.keys {
            let bytes = B64
                .decode(k)
                .map_err(|_| format!("key {kid:?} is not base64url"))?;
            let cipher = Aes256Gcm::new_from_slice(&bytes)
                .map_err(|_| format!("key {kid:?} is {} bytes, not 32", bytes.len()))?;
            keys.insert(kid.clone(), cipher);
        }
        if !keys.contains_key(&config.active) {
            return Err(format!("`active` {:?} is not one of `keys`", config.active));
        }
        if config.request == Some(Direction::Encrypt) || config.response == Some(Direction::Decrypt)
        {
            return Err("`request` can only be decrypt, and `response` only encrypt".into());
        }
        if config.request.is_none() && config.response.is_none() {
            return Err("set `request: decrypt`, `response: encrypt`, or both".into());
        }
        Ok(BodyCrypt {
            keys,
            active: config.active,
            decrypt_requests: config.request.is_some(),
            encrypt_responses: config.response.is_some(),
            content_types: config.content_types,
        })
    }

    fn wants(&self) -> Wants {
        Wants {
            on_request: self.decrypt_requests,
            on_response: self.encrypt_responses,
            on_log: false,
            request_body: self.decrypt_requests,
            response_body: self.encrypt_responses,
        }
    }

    fn on_request(&self, req: &Request) -> Action {
        let body = match req.body() {
            Ok(body) => body,
            Err(error) => return Action::Respond(Reply::error(413, &error)),
        };
        if body.is_empty() {
            return Action::Continue;
        }
        match open(&self.keys, &body) {
            Ok((plain, cty)) => {
                if let Err(error) = req.set_body(&plain) {
                    return Action::Respond(Reply::error(413, &error));
                }
                match cty {
                    Some(cty) => {
                        let _ = req.set_header("content-type", &cty);
                    }
                    None => req.remove_header("content-type"),
                }
                Action::Continue
            }
            // The reason stays here: a client learns nothing about why.
            Err(_) => {
                req.set_var(REFUSED, "1");
                Action::Respond(Reply::error(400, "the body could not be decrypted"))
            }
        }
    }

    fn on_response(&self, req: &Request, resp: &Response) {
        if req.get_var(REFUSED).is_some() {
            return;
        }
        let cty = resp.header("content-type");
        if !self.content_types.is_empty()
            && !cty
                .as_deref()
                .is_some_and(|c| self.content_types.iter().any(|t| c.starts_with(t.as_str())))
        {
            return;
        }
        let Ok(plain) = resp.body() else {
            return;
        };
        let cipher = &self.keys[&self.active];
        match seal(cipher, &self.active, cty.as_deref(), &plain) {
            Ok(jwe) => {
                let _ = resp.set_body(jwe.as_bytes());
                let _ = resp.set_header("content-type", JOSE);
            }
            Err(error) => {
                // Never the clear body in place of a sealed one.
                let _ = resp.set_status(500);
                let _ = resp.set_body(format!("{{\"error\":\"{error}\"}}").as_bytes());
            }
        }
    }
}

weir_sdk::export_plugin!(BodyCrypt);
