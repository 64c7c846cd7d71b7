//! jwt-auth: lets a request through only with a JWT that the consumer its `key` claim names has
//! signed, with the algorithm that consumer's credential pins, and that is within `exp`/`nbf`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::{Map, Value};
use weir_sdk::schemars::{self, JsonSchema};
use weir_sdk::{Action, Level, Plugin, Reply, Request, consumers, cookie, query_param};

/// `{"header": "authorization", "query": "jwt", "cookie": "jwt", "claim": "key",
/// "algorithms": ["RS256"], "clock_skew_s": 30, "hide_credentials": true}`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Config {
    /// `header: authorization`: the header that carries `Bearer <token>` (or the bare token);
    /// `null` does not look there.
    #[serde(default = "default_header")]
    header: Option<String>,
    /// `query: jwt`: the query parameter that carries the token; `null` does not look there.
    #[serde(default = "default_jwt")]
    query: Option<String>,
    /// `cookie: jwt`: the cookie that carries the token; `null` does not look there.
    #[serde(default = "default_jwt")]
    cookie: Option<String>,
    /// `claim: key`: the claim whose value is a consumer's jwt-auth `key`.
    #[serde(default = "default_claim")]
    claim: String,
    /// `algorithms: [RS256, ES256]`: the only algorithms this route accepts (default: all).
    /// Each consumer's credential pins its own; this can only narrow it.
    #[serde(default = "Alg::all")]
    algorithms: Vec<Alg>,
    /// `clock_skew_s: 30`: seconds of leeway on `exp` and `nbf`, 0 to 300 (default 0).
    #[serde(default)]
    clock_skew_s: u64,
    /// `hide_credentials: true`: the upstream never sees the token.
    #[serde(default)]
    hide_credentials: bool,
    /// `issuer: https://login.example.com`: the token's `iss` must be exactly this.
    #[serde(default)]
    issuer: Option<String>,
    /// `audience: orders-api`: the token's `aud` (a string, or a list of them) must name this.
    #[serde(default)]
    audience: Option<String>,
}

fn default_header() -> Option<String> {
    Some("authorization".into())
}

fn default_jwt() -> Option<String> {
    Some("jwt".into())
}

fn default_claim() -> String {
    "key".into()
}

/// The signature algorithms jwt-auth verifies; `alg: none` is not one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, JsonSchema)]
enum Alg {
    /// HMAC with SHA-256 and the credential's `secret`.
    #[serde(rename = "HS256")]
    Hs256,
    /// HMAC with SHA-384.
    #[serde(rename = "HS384")]
    Hs384,
    /// HMAC with SHA-512.
    #[serde(rename = "HS512")]
    Hs512,
    /// RSASSA-PKCS1-v1_5 with SHA-256 and the credential's `public_key`.
    #[serde(rename = "RS256")]
    Rs256,
    /// ECDSA on P-256 with SHA-256.
    #[serde(rename = "ES256")]
    Es256,
    /// Ed25519.
    #[serde(rename = "EdDSA")]
    EdDsa,
}

impl Alg {
    const ALL: [Alg; 6] = [
        Alg::Hs256,
        Alg::Hs384,
        Alg::Hs512,
        Alg::Rs256,
        Alg::Es256,
        Alg::EdDsa,
    ];

    fn all() -> Vec<Alg> {
        Self::ALL.to_vec()
    }

    /// Its name in a JOSE header's `alg`.
    fn name(self) -> &'static str {
        match self {
            Alg::Hs256 => "HS256",
            Alg::Hs384 => "HS384",
            Alg::Hs512 => "HS512",
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
            Alg::EdDsa => "EdDSA",
        }
    }

    fn parse(name: &str) -> Option<Alg> {
        Self::ALL.into_iter().find(|alg| alg.name() == name)
    }

    fn jwt(self) -> Algorithm {
        match self {
            Alg::Hs256 => Algorithm::HS256,
            Alg::Hs384 => Algorithm::HS384,
            Alg::Hs512 => Algorithm::HS512,
            Alg::Rs256 => Algorithm::RS256,
            Alg::Es256 => Algorithm::ES256,
            Alg::EdDsa => Algorithm::EdDSA,
        }
    }

    fn is_hmac(self) -> bool {
        matches!(self, Alg::Hs256 | Alg::Hs384 | Alg::Hs512)
    }
}

/// A consumer's `jwt-auth` credential: `{key, secret, algorithm}` or `{key, public_key,
/// algorithm}`. Other fields are left alone.
#[derive(Deserialize)]
struct Credential {
    /// The HMAC secret.
    #[serde(default)]
    secret: Option<String>,
    /// `secret` is base64 (standard alphabet) of the key bytes.
    #[serde(default)]
    base64_secret: bool,
    /// A PEM public key (SPKI `PUBLIC KEY`, or `RSA PUBLIC KEY` for RS256).
    #[serde(default)]
    public_key: Option<String>,
    /// The one algorithm this consumer's tokens may use; HS256 when left out.
    #[serde(default)]
    algorithm: Option<String>,
}

/// The longest token looked at; a longer one is refused unread.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The largest `clock_skew_s`.
const MAX_CLOCK_SKEW_S: u64 = 300;

/// Where the token came from, so that `hide_credentials` removes it from there.
#[derive(Clone, Copy)]
enum Source {
    Header,
    Query,
    Cookie,
}

/// Why a request is refused: what the client hears, and what the operator should hear (of a
/// misconfigured credential or an ambiguous key; never of an ordinary bad token, which a client
/// could send in bulk).
#[derive(Debug)]
struct Refusal {
    message: &'static str,
    log: Option<String>,
}

impl Refusal {
    fn invalid() -> Refusal {
        Refusal {
            message: "invalid JWT",
            log: None,
        }
    }

    fn logged(line: String) -> Refusal {
        Refusal {
            message: "invalid JWT",
            log: Some(line),
        }
    }

    fn reply(self) -> Action {
        if let Some(line) = &self.log {
            weir_sdk::log(Level::Warn, line);
        }
        Action::Respond(
            Reply::error(401, self.message)
                .with_header("www-authenticate", "Bearer error=\"invalid_token\""),
        )
    }
}

struct JwtAuth {
    header: Option<String>,
    query: Option<String>,
    cookie: Option<String>,
    claim: String,
    algorithms: Vec<Alg>,
    clock_skew_s: u64,
    hide_credentials: bool,
    issuer: Option<String>,
    audience: Option<String>,
}

/// The JSON object in one base64url part of a token.
fn json_part(part: &str) -> Option<Map<String, Value>> {
    let bytes = B64URL.decode(part).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(object) => Some(object),
        _ => None,
    }
}

/// A compact JWS split and decoded, not yet trusted.
struct Token<'a> {
    /// `header.payload`: what the signature covers.
    signed: &'a str,
    /// The signature, base64url.
    signature: &'a str,
    /// The header's `alg`.
    alg: String,
    /// The payload's claims.
    claims: Map<String, Value>,
}

impl<'a> Token<'a> {
    fn parse(token: &'a str) -> Result<Token<'a>, Refusal> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Refusal::invalid());
        }
        let (signed, signature) = token.rsplit_once('.').ok_or_else(Refusal::invalid)?;
        let (header, payload) = signed.split_once('.').ok_or_else(Refusal::invalid)?;
        // More than three parts (a JWE has five) is not a JWS.
        if payload.contains('.') {
            return Err(Refusal::invalid());
        }
        let header = json_part(header).ok_or_else(Refusal::invalid)?;
        // An extension the token says must be understood is one this plugin does not know.
        if header.contains_key("crit") {
            return Err(Refusal::invalid());
        }
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or_else(Refusal::invalid)?
            .to_owned();
        let claims = json_part(payload).ok_or_else(Refusal::invalid)?;
        Ok(Token {
            signed,
            signature,
            alg,
            claims,
        })
    }
}

/// A NumericDate claim: absent, or a number of seconds (fractions allowed); anything else is
/// an error.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, ()> {
    match claims.get(name) {
        None => Ok(None),
        Some(value) => value.as_f64().map(Some).ok_or(()),
    }
}

/// The key that verifies `consumer`'s tokens under `alg`, or why the credential has none.
fn decoding_key(consumer: &str, credential: &Credential, alg: Alg) -> Result<DecodingKey, String> {
    if alg.is_hmac() {
        let secret = credential.secret.as_deref().unwrap_or_default();
        if secret.is_empty() {
            return Err(format!(
                "consumer {consumer:?}: its jwt-auth credential has algorithm {} but no `secret`",
                alg.name()
            ));
        }
        if credential.base64_secret {
            return DecodingKey::from_base64_secret(secret).map_err(|_| {
                format!("consumer {consumer:?}: its jwt-auth `secret` is not base64")
            });
        }
        return Ok(DecodingKey::from_secret(secret.as_bytes()));
    }
    let pem = credential.public_key.as_deref().unwrap_or_default();
    if pem.is_empty() {
        return Err(format!(
            "consumer {consumer:?}: its jwt-auth credential has algorithm {} but no `public_key`",
            alg.name()
        ));
    }
    let key = match alg {
        Alg::Rs256 => DecodingKey::from_rsa_pem(pem.as_bytes()),
        Alg::Es256 => DecodingKey::from_ec_pem(pem.as_bytes()),
        _ => DecodingKey::from_ed_pem(pem.as_bytes()),
    };
    key.map_err(|_| {
        format!(
            "consumer {consumer:?}: its jwt-auth `public_key` is not a PEM {} public key",
            alg.name()
        )
    })
}

/// The request's query without parameter `name`.
fn without_param(query: &str, name: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            !pair.is_empty()
                && form_urlencoded::parse(pair.as_bytes())
                    .next()
                    .is_none_or(|(key, _)| key != name)
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

impl JwtAuth {
    /// The token and where it was: the header, else the query parameter, else the cookie.
    fn token(&self, req: &Request) -> Option<(String, Source)> {
        if let Some(value) = self.header.as_deref().and_then(|name| req.header(name)) {
            let value = value.trim();
            let token = match value.split_once(' ') {
                Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
                _ => value,
            };
            return Some((token.to_owned(), Source::Header));
        }
        if let Some(token) = self
            .query
            .as_deref()
            .and_then(|name| query_param(req, name))
        {
            return Some((token, Source::Query));
        }
        let name = self.cookie.as_deref()?;
        cookie(req, name).map(|token| (token, Source::Cookie))
    }

    /// The name of the consumer who signed `token`, checked at `now_ms`.
    fn verify(&self, token: &str, now_ms: u64) -> Result<String, Refusal> {
        let token = Token::parse(token)?;
        let key = token
            .claims
            .get(&self.claim)
            .and_then(Value::as_str)
            .ok_or_else(Refusal::invalid)?;
        let consumer = match consumers::lookup("jwt-auth", "key", key) {
            Ok(Some(consumer)) => consumer,
            Ok(None) => return Err(Refusal::invalid()),
            // Not granted, or two consumers share the key: never pick one.
            Err(error) => {
                return Err(Refusal::logged(format!(
                    "refused a token: the consumer lookup failed: {error}"
                )));
            }
        };
        self.check(&token, &consumer.name, &consumer.credential, now_ms)?;
        Ok(consumer.name)
    }

    /// Whether `token` was signed for consumer `name`, whose jwt-auth credential is the JSON
    /// `credential`, and is valid at `now_ms`.
    fn check(
        &self,
        token: &Token,
        name: &str,
        credential: &str,
        now_ms: u64,
    ) -> Result<(), Refusal> {
        let credential: Credential = serde_json::from_str(credential).map_err(|e| {
            Refusal::logged(format!(
                "consumer {name:?}: its jwt-auth credential is not usable: {e}"
            ))
        })?;
        let pinned = match credential.algorithm.as_deref() {
            None => Alg::Hs256,
            Some(named) => Alg::parse(named).ok_or_else(|| {
                Refusal::logged(format!(
                    "consumer {name:?}: its jwt-auth algorithm {named:?} is not one of HS256, \
                     HS384, HS512, RS256, ES256, EdDSA"
                ))
            })?,
        };
        // The consumer's credential decides the algorithm, never the token: `none`, and an
        // RS256 public key used as an HMAC secret, end here.
        if token.alg != pinned.name() || !self.algorithms.contains(&pinned) {
            return Err(Refusal::invalid());
        }
        let key = decoding_key(name, &credential, pinned).map_err(Refusal::logged)?;
        if !jsonwebtoken::crypto::verify(
            token.signature,
            token.signed.as_bytes(),
            &key,
            pinned.jwt(),
        )
        .unwrap_or(false)
        {
            return Err(Refusal::invalid());
        }
        let now = now_ms as f64 / 1000.0;
        let skew = self.clock_skew_s as f64;
        let exp = numeric_date(&token.claims, "exp").map_err(|()| Refusal::invalid())?;
        if exp.is_some_and(|exp| now >= exp + skew) {
            return Err(Refusal {
                message: "JWT has expired",
                log: None,
            });
        }
        let nbf = numeric_date(&token.claims, "nbf").map_err(|()| Refusal::invalid())?;
        if nbf.is_some_and(|nbf| now + skew < nbf) {
            return Err(Refusal {
                message: "JWT is not valid yet",
                log: None,
            });
        }
        if let Some(issuer) = &self.issuer
            && token.claims.get("iss").and_then(Value::as_str) != Some(issuer)
        {
            return Err(Refusal::invalid());
        }
        if let Some(audience) = &self.audience {
            let named = match token.claims.get("aud") {
                Some(Value::String(aud)) => aud == audience,
                Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(audience)),
                _ => false,
            };
            if !named {
                return Err(Refusal::invalid());
            }
        }
        Ok(())
    }

    /// Takes the token out of the request, from wherever it came.
    fn hide(&self, req: &Request, source: Source) {
        match (source, &self.header, &self.query, &self.cookie) {
            (Source::Header, Some(header), _, _) => req.remove_header(header),
            (Source::Query, _, Some(param), _) => {
                if let Some(query) = req.query() {
                    let _ = req.set_query(without_param(&query, param).as_deref());
                }
            }
            (Source::Cookie, _, _, Some(cookie)) => {
                let kept: Vec<String> = req
                    .headers()
                    .into_iter()
                    .filter(|(name, _)| name == "cookie")
                    .flat_map(|(_, value)| {
                        value
                            .split(';')
                            .map(str::trim)
                            .filter(|pair| {
                                !pair.is_empty()
                                    && pair.split_once('=').map_or(*pair, |(key, _)| key).trim()
                                        != cookie.as_str()
                            })
                            .map(str::to_owned)
                            .collect::<Vec<_>>()
                    })
                    .collect();
                if kept.is_empty() {
                    req.remove_header("cookie");
                } else {
                    let _ = req.set_header("cookie", &kept.join("; "));
                }
            }
            _ => {}
        }
    }
}

impl Plugin for JwtAuth {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.header.is_none() && config.query.is_none() && config.cookie.is_none() {
            return Err("`header`, `query` and `cookie` are all null: set at least one".into());
        }
        for (field, name) in [
            ("header", &config.header),
            ("query", &config.query),
            ("cookie", &config.cookie),
        ] {
            if name.as_deref().is_some_and(str::is_empty) {
                return Err(format!("`{field}` is empty; name one, or set it to null"));
            }
        }
        if config.claim.is_empty() {
            return Err("`claim` is empty".into());
        }
        if config.algorithms.is_empty() {
            return Err("`algorithms` is empty: leave it out to accept all".into());
        }
        if config.clock_skew_s > MAX_CLOCK_SKEW_S {
            return Err(format!(
                "`clock_skew_s` is {}; at most {MAX_CLOCK_SKEW_S}",
                config.clock_skew_s
            ));
        }
        Ok(JwtAuth {
            header: config.header.map(|h| h.to_ascii_lowercase()),
            query: config.query,
            cookie: config.cookie,
            claim: config.claim,
            algorithms: config.algorithms,
            clock_skew_s: config.clock_skew_s,
            hide_credentials: config.hide_credentials,
            issuer: config.issuer,
            audience: config.audience,
        })
    }

    fn on_request(&self, req: &Request) -> Action {
        let Some((token, source)) = self.token(req) else {
            return Action::Respond(
                Reply::error(401, "missing JWT").with_header("www-authenticate", "Bearer"),
            );
        };
        let consumer = match self.verify(&token, weir_sdk::now_ms()) {
            Ok(consumer) => consumer,
            Err(refusal) => return refusal.reply(),
        };
        if let Err(error) = consumers::set(req, &consumer) {
            weir_sdk::log(
                Level::Error,
                &format!("could not mark the request as consumer {consumer:?}'s: {error}"),
            );
            return Action::Respond(Reply::error(500, "jwt-auth could not record the consumer"));
        }
        if self.hide_credentials {
            self.hide(req, source);
        }
        Action::Continue
    }
}

weir_sdk::export_plugin!(JwtAuth);

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    /// 2026-01-01T00:00:00Z.
    const NOW_MS: u64 = 1_767_225_600_000;
    const NOW_S: u64 = NOW_MS / 1000;

    fn plugin(config: Value) -> JwtAuth {
        JwtAuth::new(serde_json::from_value(config).expect("a valid config")).expect("accepted")
    }

    fn sign(alg: Algorithm, key: &EncodingKey, claims: Value) -> String {
        jsonwebtoken::encode(&Header::new(alg), &claims, key).expect("signing")
    }

    /// A token made by hand from a header and claims, with `signature` as it is.
    fn forge(header: Value, claims: Value, signature: &str) -> String {
        format!(
            "{}.{}.{signature}",
            B64URL.encode(header.to_string()),
            B64URL.encode(claims.to_string())
        )
    }

    fn check(plugin: &JwtAuth, token: &str, credential: Value) -> Result<(), Refusal> {
        let token = Token::parse(token)?;
        plugin.check(&token, "alice", &credential.to_string(), NOW_MS)
    }

    fn hs256_credential() -> Value {
        json!({"key": "user-a", "secret": "a-secret-of-thirty-two-bytes-or-more"})
    }

    fn hs256_key() -> EncodingKey {
        EncodingKey::from_secret(b"a-secret-of-thirty-two-bytes-or-more")
    }

    #[test]
    fn an_hs256_token_signed_with_the_consumers_secret_passes() {
        let jwt = plugin(json!({}));
        let token = sign(Algorithm::HS256, &hs256_key(), json!({"key": "user-a"}));
        check(&jwt, &token, hs256_credential()).unwrap();
        let parsed = Token::parse(&token).unwrap();
        assert_eq!(parsed.claims["key"], "user-a");
    }

    #[test]
    fn a_wrong_secret_a_tampered_payload_and_alg_none_are_refused() {
        let jwt = plugin(json!({}));
        let other = EncodingKey::from_secret(b"another-secret");
        let token = sign(Algorithm::HS256, &other, json!({"key": "user-a"}));
        assert_eq!(
            check(&jwt, &token, hs256_credential()).unwrap_err().message,
            "invalid JWT"
        );

        let token = sign(Algorithm::HS256, &hs256_key(), json!({"key": "user-a"}));
        let (_, signature) = token.rsplit_once('.').unwrap();
        let tampered = forge(
            json!({"alg": "HS256", "typ": "JWT"}),
            json!({"key": "user-b"}),
            signature,
        );
        assert!(check(&jwt, &tampered, hs256_credential()).is_err());

        for none in [
            forge(json!({"alg": "none"}), json!({"key": "user-a"}), ""),
            forge(json!({"alg": "None"}), json!({"key": "user-a"}), ""),
            forge(json!({"alg": "none"}), json!({"key": "user-a"}), signature),
        ] {
            assert!(check(&jwt, &none, hs256_credential()).is_err(), "{none}");
        }
    }

    #[test]
    fn the_credential_pins_the_algorithm() {
        let jwt = plugin(json!({}));
        let hs512 = sign(Algorithm::HS512, &hs256_key(), json!({"key": "user-a"}));
        assert!(check(&jwt, &hs512, hs256_credential()).is_err());
        let mut credential = hs256_credential();
        credential["algorithm"] = json!("HS512");
        check(&jwt, &hs512, credential).unwrap();
    }

    #[test]
    fn an_rsa_public_key_used_as_an_hmac_secret_is_refused() {
        use rsa::pkcs8::EncodePublicKey;
        let private = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).unwrap();
        let public_pem = private
            .to_public_key()
            .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
            .unwrap();
        let credential = json!({"key": "user-a", "algorithm": "RS256", "public_key": public_pem});
        // The attacker knows the public key and signs with it as an HMAC secret.
        let confused = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(public_pem.as_bytes()),
            json!({"key": "user-a"}),
        );
        assert!(check(&plugin(json!({})), &confused, credential).is_err());
    }

    #[test]
    fn rs256_es256_and_eddsa_tokens_verify_with_the_consumers_public_key() {
        use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
        let jwt = plugin(json!({}));
        let claims = json!({"key": "user-a", "exp": NOW_S + 60});

        let rsa = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).unwrap();
        let private = rsa.to_pkcs8_pem(LineEnding::LF).unwrap();
        let public = rsa
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        let token = sign(
            Algorithm::RS256,
            &EncodingKey::from_rsa_pem(private.as_bytes()).unwrap(),
            claims.clone(),
        );
        check(
            &jwt,
            &token,
            json!({"algorithm": "RS256", "public_key": public}),
        )
        .unwrap();

        let ec = p256::SecretKey::random(&mut rand_core::OsRng);
        let private = ec.to_pkcs8_pem(LineEnding::LF).unwrap();
        let public = ec.public_key().to_public_key_pem(LineEnding::LF).unwrap();
        let token = sign(
            Algorithm::ES256,
            &EncodingKey::from_ec_pem(private.as_bytes()).unwrap(),
            claims.clone(),
        );
        check(
            &jwt,
            &token,
            json!({"algorithm": "ES256", "public_key": public}),
        )
        .unwrap();
        // Pinned to ES256, the same key's token claiming RS256 goes nowhere.
        let relabelled = forge(
            json!({"alg": "RS256"}),
            claims.clone(),
            token.rsplit_once('.').unwrap().1,
        );
        assert!(
            check(
                &jwt,
                &relabelled,
                json!({"algorithm": "ES256", "public_key": public})
            )
            .is_err()
        );

        let ed = ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng);
        let private = ed.to_pkcs8_pem(LineEnding::LF).unwrap();
        let public = ed
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        let token = sign(
            Algorithm::EdDSA,
            &EncodingKey::from_ed_pem(private.as_bytes()).unwrap(),
            claims,
        );
        check(
            &jwt,
            &token,
            json!({"algorithm": "EdDSA", "public_key": public}),
        )
        .unwrap();
        // The route may narrow what it accepts.
        assert!(
            check(
                &plugin(json!({"algorithms": ["RS256"]})),
                &token,
                json!({"algorithm": "EdDSA", "public_key": public})
            )
            .is_err()
        );
    }

    #[test]
    fn exp_and_nbf_hold_with_the_clock_skew() {
        let strict = plugin(json!({}));
        let lenient = plugin(json!({"clock_skew_s": 30}));
        let token = |claims: Value| sign(Algorithm::HS256, &hs256_key(), claims);

        let expired = token(json!({"key": "user-a", "exp": NOW_S - 10}));
        let refusal = check(&strict, &expired, hs256_credential()).unwrap_err();
        assert_eq!(refusal.message, "JWT has expired");
        check(&lenient, &expired, hs256_credential()).unwrap();
        let at_exp = token(json!({"key": "user-a", "exp": NOW_S}));
        assert!(check(&strict, &at_exp, hs256_credential()).is_err());

        let early = token(json!({"key": "user-a", "nbf": NOW_S + 10}));
        let refusal = check(&strict, &early, hs256_credential()).unwrap_err();
        assert_eq!(refusal.message, "JWT is not valid yet");
        check(&lenient, &early, hs256_credential()).unwrap();

        let fractional = token(json!({"key": "user-a", "exp": NOW_S as f64 + 0.5}));
        check(&strict, &fractional, hs256_credential()).unwrap();
        let text = token(json!({"key": "user-a", "exp": "tomorrow"}));
        assert!(check(&strict, &text, hs256_credential()).is_err());
    }

    #[test]
    fn issuer_and_audience_hold_where_the_route_names_them() {
        let pinned = plugin(json!({"issuer": "https://login.test", "audience": "orders"}));
        let token = |claims: Value| sign(Algorithm::HS256, &hs256_key(), claims);
        let good = token(json!({"key": "user-a", "iss": "https://login.test", "aud": "orders"}));
        check(&pinned, &good, hs256_credential()).unwrap();
        let listed = token(json!({"key": "user-a", "iss": "https://login.test",
                                  "aud": ["billing", "orders"]}));
        check(&pinned, &listed, hs256_credential()).unwrap();
        for claims in [
            json!({"key": "user-a", "iss": "https://evil.test", "aud": "orders"}),
            json!({"key": "user-a", "iss": "https://login.test", "aud": "billing"}),
            json!({"key": "user-a", "iss": "https://login.test"}),
            json!({"key": "user-a", "aud": "orders"}),
            json!({"key": "user-a", "iss": "https://login.test", "aud": [7]}),
        ] {
            assert!(
                check(&pinned, &token(claims.clone()), hs256_credential()).is_err(),
                "{claims}"
            );
        }
        // Without them, neither claim is looked at.
        check(
            &plugin(json!({})),
            &token(json!({"key": "user-a", "iss": "x"})),
            hs256_credential(),
        )
        .unwrap();
    }

    #[test]
    fn a_credential_without_its_key_is_refused_and_logged() {
        let jwt = plugin(json!({}));
        let token = sign(Algorithm::HS256, &hs256_key(), json!({"key": "user-a"}));
        let refusal = check(&jwt, &token, json!({"key": "user-a"})).unwrap_err();
        let line = refusal.log.expect("the operator hears of it");
        assert!(line.contains("no `secret`"), "{line}");
        assert!(!line.contains("thirty-two"), "{line}");
        let rs256 = forge(json!({"alg": "RS256"}), json!({"key": "user-a"}), "c2ln");
        let refusal = check(&jwt, &rs256, json!({"algorithm": "RS256"})).unwrap_err();
        assert!(refusal.log.unwrap().contains("no `public_key`"));
        let refusal = check(&jwt, &token, json!({"algorithm": "PS256"})).unwrap_err();
        assert!(refusal.log.unwrap().contains("is not one of"));
    }

    #[test]
    fn malformed_tokens_are_refused_before_any_lookup() {
        let token = sign(Algorithm::HS256, &hs256_key(), json!({"key": "user-a"}));
        for bad in [
            String::new(),
            "a.b".into(),
            format!("{token}.extra.parts"),
            forge(
                json!({"alg": "HS256", "crit": ["exp"]}),
                json!({"key": "k"}),
                "x",
            ),
            forge(json!(["not", "an", "object"]), json!({"key": "k"}), "x"),
            format!("{token}{}", "A".repeat(MAX_TOKEN_BYTES)),
        ] {
            assert!(Token::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn configs_out_of_bounds_are_refused() {
        let refused = |config: Value| {
            JwtAuth::new(serde_json::from_value(config).unwrap())
                .err()
                .expect("refused")
        };
        assert!(refused(json!({"clock_skew_s": 301})).contains("at most 300"));
        assert!(refused(json!({"algorithms": []})).contains("`algorithms` is empty"));
        assert!(refused(json!({"header": null, "query": null, "cookie": null})).contains("null"));
        assert!(serde_json::from_value::<Config>(json!({"algorithms": ["none"]})).is_err());
        assert!(serde_json::from_value::<Config>(json!({"secret": "x"})).is_err());
    }

    #[test]
    fn without_param_keeps_the_other_parameters_as_they_were() {
        assert_eq!(
            without_param("a=1&jwt=x.y.z&b=%20", "jwt").as_deref(),
            Some("a=1&b=%20")
        );
        assert_eq!(without_param("jwt=x", "jwt"), None);
        assert_eq!(without_param("j%77t=x&c", "jwt").as_deref(), Some("c"));
    }

    #[test]
    fn algorithms_round_trip_by_name() {
        for alg in Alg::ALL {
            assert_eq!(Alg::parse(alg.name()), Some(alg));
        }
        assert_eq!(Alg::parse("none"), None);
        assert_eq!(Alg::parse("hs256"), None);
    }
}
