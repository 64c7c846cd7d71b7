//! basic-auth: lets a request through only with `Authorization: Basic` credentials that match a
//! consumer's `basic-auth` username and password hash (argon2id or bcrypt).

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordVerifier};
use base64::Engine;
use base64::alphabet::STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde::Deserialize;
use weir_sdk::schemars::{self, JsonSchema};
use weir_sdk::{Action, Level, Plugin, Reply, Request, consumers};

/// `{"realm": "weir", "hide_credentials": true}`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Config {
    /// `realm: weir`: the realm a refusal's `WWW-Authenticate: Basic realm="…"` names.
    #[serde(default = "default_realm")]
    realm: String,
    /// `hide_credentials: true`: the upstream never sees the `Authorization` header.
    #[serde(default)]
    hide_credentials: bool,
}

fn default_realm() -> String {
    "weir".into()
}

/// A consumer's `basic-auth` credential: `{username, password}`, the password a PHC string.
#[derive(Deserialize)]
struct Credential {
    #[serde(default)]
    password: Option<String>,
}

/// What an unknown username's password is checked against: argon2id with the default
/// parameters (those `weir` and the docs make hashes with), so that refusing an unknown user
/// costs as long as refusing a known one, and the time does not tell which usernames exist.
const DECOY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2l4dGVlbi1ieXRlLXNsdA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

/// The longest `Authorization` header looked at; a longer one is refused unread.
const MAX_HEADER_BYTES: usize = 4096;

/// Standard base64, with or without padding (clients differ).
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

struct BasicAuth {
    /// `Basic realm="…"`, ready to send.
    challenge: String,
    hide_credentials: bool,
}

/// How a stored password is checked.
enum Scheme {
    Argon2id,
    Bcrypt,
}

/// The scheme of a stored PHC string; anything else (a plaintext password above all) is never
/// compared.
fn scheme(stored: &str) -> Option<Scheme> {
    if stored.starts_with("$argon2id$") {
        Some(Scheme::Argon2id)
    } else if ["$2a$", "$2b$", "$2y$"]
        .iter()
        .any(|prefix| stored.starts_with(prefix))
    {
        Some(Scheme::Bcrypt)
    } else {
        None
    }
}

/// Whether `password` matches the PHC string `stored`; an error says what is wrong with
/// `stored`. Both libraries compare in constant time.
fn password_matches(password: &str, stored: &str) -> Result<bool, String> {
    match scheme(stored) {
        Some(Scheme::Argon2id) => {
            let hash = PasswordHash::new(stored)
                .map_err(|e| format!("its argon2id hash does not parse: {e}"))?;
            if hash.salt.is_none() || hash.hash.is_none() {
                return Err("its argon2id hash has no salt or no output".into());
            }
            // The parameters (memory, passes, lanes) and salt come from the hash.
            match Argon2::default().verify_password(password.as_bytes(), &hash) {
                Ok(()) => Ok(true),
                Err(argon2::password_hash::Error::Password) => Ok(false),
                Err(e) => Err(format!("its argon2id hash cannot be checked: {e}")),
            }
        }
        Some(Scheme::Bcrypt) => bcrypt::verify(password.as_bytes(), stored)
            .map_err(|e| format!("its bcrypt hash cannot be checked: {e}")),
        None => Err(
            "its password is not an argon2id or bcrypt PHC string ($argon2id$… or $2b$…), so it \
             is never compared; store a hash"
                .into(),
        ),
    }
}

/// The username and password in an `Authorization: Basic …` value.
fn decode(value: &str) -> Option<(String, String)> {
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let bytes = BASE64.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (user, password) = text.split_once(':')?;
    (!user.is_empty()).then(|| (user.to_owned(), password.to_owned()))
}

impl BasicAuth {
    fn refuse(&self, message: &str) -> Action {
        Action::Respond(Reply::error(401, message).with_header("www-authenticate", &self.challenge))
    }

    /// The consumer `value` proves to be, or why not (a line for the operator when the
    /// consumer's credential, not the client, is at fault).
    fn check(&self, value: &str) -> Result<String, Option<String>> {
        let (user, password) = decode(value).ok_or(None)?;
        let consumer = match consumers::lookup("basic-auth", "username", &user) {
            Ok(Some(consumer)) => consumer,
            Ok(None) => {
                let _ = password_matches(&password, DECOY_HASH);
                return Err(None);
            }
            // Not granted, or two consumers share the username: never pick one.
            Err(error) => return Err(Some(format!("the consumer lookup failed: {error}"))),
        };
        let name = consumer.name;
        let stored = serde_json::from_str::<Credential>(&consumer.credential)
            .ok()
            .and_then(|credential| credential.password)
            .ok_or_else(|| {
                Some(format!(
                    "consumer {name:?}: its basic-auth has no `password`"
                ))
            })?;
        match password_matches(&password, &stored) {
            Ok(true) => Ok(name),
            Ok(false) => Err(None),
            Err(error) => Err(Some(format!("consumer {name:?}: {error}"))),
        }
    }
}

impl Plugin for BasicAuth {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.realm.is_empty()
            || config
                .realm
                .chars()
                .any(|c| c == '"' || c == '\\' || c.is_control())
        {
            return Err(
                "`realm` must be non-empty, without quotes, backslashes or control \
                        characters"
                    .into(),
            );
        }
        Ok(BasicAuth {
            challenge: format!("Basic realm=\"{}\"", config.realm),
            hide_credentials: config.hide_credentials,
        })
    }

    fn on_request(&self, req: &Request) -> Action {
        let Some(value) = req.header("authorization") else {
            return self.refuse("missing credentials");
        };
        if value.len() > MAX_HEADER_BYTES {
            return self.refuse("invalid credentials");
        }
        let consumer = match self.check(&value) {
            Ok(consumer) => consumer,
            Err(operator) => {
                if let Some(line) = operator {
                    weir_sdk::log(Level::Warn, &format!("refused a request: {line}"));
                }
                return self.refuse("invalid credentials");
            }
        };
        if let Err(error) = consumers::set(req, &consumer) {
            weir_sdk::log(
                Level::Error,
                &format!("could not mark the request as consumer {consumer:?}'s: {error}"),
            );
            return Action::Respond(Reply::error(
                500,
                "basic-auth could not record the consumer",
            ));
        }
        if self.hide_credentials {
            req.remove_header("authorization");
        }
        Action::Continue
    }
}

weir_sdk::export_plugin!(BasicAuth);

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{PasswordHasher, SaltString};

    fn argon2id(password: &str) -> String {
        let salt = SaltString::encode_b64(b"sixteen-byte-slt").unwrap();
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .unwrap()
            .to_string()
    }

    #[test]
    fn the_decoy_hash_costs_a_real_check() {
        // A decoy that failed to parse would be refused at once, and the time would tell.
        assert_eq!(password_matches("anything", DECOY_HASH), Ok(false));
        let hash = PasswordHash::new(DECOY_HASH).unwrap();
        assert_eq!(hash.params.get_decimal("m"), Some(19456));
    }

    #[test]
    fn argon2id_and_bcrypt_hashes_check_the_password() {
        let stored = argon2id("correct horse");
        assert!(stored.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert_eq!(password_matches("correct horse", &stored), Ok(true));
        assert_eq!(password_matches("correct horsf", &stored), Ok(false));

        let stored = bcrypt::hash("correct horse", 4).unwrap();
        assert!(stored.starts_with("$2b$04$"));
        assert_eq!(password_matches("correct horse", &stored), Ok(true));
        assert_eq!(password_matches("", &stored), Ok(false));
        let y = stored.replacen("$2b$", "$2y$", 1);
        assert_eq!(password_matches("correct horse", &y), Ok(true));
    }

    #[test]
    fn a_plaintext_or_broken_stored_password_is_never_compared() {
        let plain = password_matches("hunter2", "hunter2").unwrap_err();
        assert!(plain.contains("never compared"), "{plain}");
        assert!(!plain.contains("hunter2"), "{plain}");
        assert!(password_matches("x", "$argon2id$v=19$garbage").is_err());
        assert!(password_matches("x", "$2b$04$short").is_err());
        // argon2i and the buggy-era $2x$ are not accepted.
        assert!(password_matches("x", &argon2id("x").replacen("argon2id", "argon2i", 1)).is_err());
    }

    #[test]
    fn the_header_decodes_to_a_username_and_a_password() {
        let header = |raw: &str| format!("Basic {}", BASE64.encode(raw));
        assert_eq!(
            decode(&header("alice:pa:ss")),
            Some(("alice".into(), "pa:ss".into()))
        );
        assert_eq!(
            decode(&header("alice:")),
            Some(("alice".into(), String::new()))
        );
        let unpadded = header("al:x").trim_end_matches('=').to_owned();
        assert_eq!(decode(&unpadded), Some(("al".into(), "x".into())));
        assert_eq!(
            decode(&format!("basic  {}", BASE64.encode("bob:pw"))),
            Some(("bob".into(), "pw".into()))
        );
        assert_eq!(decode(&header(":nouser")), None);
        assert_eq!(decode(&header("no-colon")), None);
        assert_eq!(decode("Bearer abc"), None);
        assert_eq!(decode("Basic !!!"), None);
        assert_eq!(decode("Basic"), None);
    }

    #[test]
    fn a_realm_that_would_break_the_header_is_refused() {
        let config = |realm: &str| Config {
            realm: realm.into(),
            hide_credentials: false,
        };
        assert!(BasicAuth::new(config("api")).is_ok());
        for bad in ["", "a\"b", "a\\b", "a\nb"] {
            assert!(BasicAuth::new(config(bad)).is_err(), "{bad:?}");
        }
    }
}
