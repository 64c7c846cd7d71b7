//! Who is asking: API keys (`X-API-KEY`), dashboard sessions (a signed cookie plus a CSRF
//! token on writes), and the lockout that slows down password guessing.
//!
//! Keys are kept only as their sha256. A session is stateless (an HMAC over the user, role,
//! expiry and a nonce, with a secret made at start), so a restart ends every session; a
//! logout puts the nonce on a revoked list until the session would have expired anyway.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::Sha256;

use crate::config::{AdminConfig, Role};
use crate::plugin::sha256_hex;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "weir_session";
/// The header a dashboard write carries its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// The header an API key travels in.
pub const KEY_HEADER: &str = "x-api-key";
/// Failed logins from one address before it is locked out.
const MAX_FAILURES: u32 = 5;
/// How long a lockout lasts.
const LOCKOUT: Duration = Duration::from_secs(60);
/// Addresses tracked at once; beyond this the oldest records are dropped.
const MAX_TRACKED: usize = 10_000;

/// Who a request comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The key's name, or the account's username.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// How it proved itself.
    pub via: Via,
}

/// How a principal proved itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    /// An API key.
    Key,
    /// A dashboard session.
    Session,
}

/// Why a request is not let in.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No key and no session.
    #[error("authentication required: send an X-API-KEY header, or log in")]
    Missing,
    /// A key or session that is not valid.
    #[error("the API key or session is not valid")]
    Invalid,
    /// A session write without its CSRF token.
    #[error("a write from a session needs its X-CSRF-Token header")]
    Csrf,
    /// A viewer asked to write.
    #[error("the viewer role may only read")]
    ReadOnly,
}

/// Why a login failed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// Wrong username or password.
    #[error("wrong username or password")]
    Wrong,
    /// Too many failures from this address.
    #[error("too many failed logins from this address; try again in {0} s")]
    LockedOut(u64),
}

/// A session that was just opened.
#[derive(Debug)]
pub struct Session {
    /// The cookie's value.
    pub token: String,
    /// The token writes must carry in `X-CSRF-Token`.
    pub csrf: String,
    /// Who.
    pub username: String,
    /// What it may do.
    pub role: Role,
    /// When it ends, seconds since the epoch.
    pub expires: u64,
}

/// The admin listener's keys, sessions and lockouts.
pub struct Auth {
    /// Settings from `--admin-config`, which replace the store's.
    fixed: Option<Arc<AdminConfig>>,
    /// The sha256 of `WEIR_ADMIN_KEY`.
    env_key: Option<String>,
    /// The sha256 of the key weir generated, when no key was configured.
    generated: Option<String>,
    secret: [u8; 32],
    failures: Mutex<HashMap<IpAddr, Failures>>,
    /// Nonces of sessions that logged out, with when they expire.
    revoked: Mutex<HashMap<String, u64>>,
}

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

type HmacSha256 = Hmac<Sha256>;

impl Auth {
    /// Keys and sessions over `fixed` settings (or the store's), the environment's key and a
    /// generated key's hash.
    pub fn new(
        fixed: Option<AdminConfig>,
        env_key: Option<&str>,
        generated: Option<String>,
    ) -> Self {
        let mut secret = [0; 32];
        getrandom::fill(&mut secret).expect("the OS has randomness");
        Auth {
            fixed: fixed.map(Arc::new),
            env_key: env_key.map(|key| sha256_hex(key.as_bytes())),
            generated,
            secret,
            failures: Mutex::new(HashMap::new()),
            revoked: Mutex::new(HashMap::new()),
        }
    }

    /// The settings in force: `--admin-config`'s, or else the store's.
    pub fn settings(&self, from_store: &Arc<AdminConfig>) -> Arc<AdminConfig> {
        self.fixed.clone().unwrap_or_else(|| from_store.clone())
    }

    /// Who sent `headers`, and whether they may do what `write` says.
    pub fn authenticate(
        &self,
        settings: &AdminConfig,
        headers: &HeaderMap,
        write: bool,
    ) -> Result<Principal, Refusal> {
        let principal = if let Some(key) = headers.get(KEY_HEADER) {
            self.key_principal(settings, key.as_bytes())
                .ok_or(Refusal::Invalid)?
        } else if let Some(token) = cookie(headers, SESSION_COOKIE) {
            let principal = self.session_principal(settings, token)?;
            if write {
                let sent = headers.get(CSRF_HEADER).map(|v| v.as_bytes());
                if sent != Some(self.csrf(token).as_bytes()) {
                    return Err(Refusal::Csrf);
                }
            }
            principal
        } else {
            return Err(Refusal::Missing);
        };
        if write && principal.role != Role::Admin {
            return Err(Refusal::ReadOnly);
        }
        Ok(principal)
    }

    fn key_principal(&self, settings: &AdminConfig, key: &[u8]) -> Option<Principal> {
        let hash = sha256_hex(key);
        let principal = |name: &str, role| Principal {
            name: name.to_owned(),
            role,
            via: Via::Key,
        };
        if let Some(found) = settings.keys.iter().find(|k| k.key_sha256 == hash) {
            return Some(principal(&found.name, found.role));
        }
        if self.env_key.as_deref() == Some(hash.as_str()) {
            return Some(principal("WEIR_ADMIN_KEY", Role::Admin));
        }
        if self.generated.as_deref() == Some(hash.as_str()) {
            return Some(principal("generated", Role::Admin));
        }
        None
    }

    /// Checks a password and opens a session, or counts a failure against `from`.
    pub fn login(
        &self,
        settings: &AdminConfig,
        from: IpAddr,
        username: &str,
        password: &str,
    ) -> Result<Session, LoginError> {
        if let Some(left) = self.locked_for(from) {
            return Err(LoginError::LockedOut(left.as_secs().max(1)));
        }
        let account = settings.accounts.iter().find(|a| a.username == username);
        let verified =
            account.is_some_and(|account| verify_password(&account.password_hash, password));
        let Some(account) = account.filter(|_| verified) else {
            self.count_failure(from);
            return Err(LoginError::Wrong);
        };
        self.failures.lock().expect("failures lock").remove(&from);
        let expires = now_secs() + settings.session_minutes * 60;
        let mut nonce = [0; 16];
        getrandom::fill(&mut nonce).expect("the OS has randomness");
        let payload = serde_json::json!({
            "u": account.username,
            "r": account.role,
            "e": expires,
            "n": B64.encode(nonce),
        });
        let payload = B64.encode(payload.to_string());
        let token = format!("{payload}.{}", B64.encode(self.sign(payload.as_bytes())));
        Ok(Session {
            csrf: self.csrf(&token),
            token,
            username: account.username.clone(),
            role: account.role,
            expires,
        })
    }

    /// Ends the session `token` (if it is one).
    pub fn logout(&self, token: &str) {
        if let Some(claims) = self.claims(token) {
            let now = now_secs();
            let mut revoked = self.revoked.lock().expect("revoked lock");
            revoked.retain(|_, expires| *expires > now);
            revoked.insert(claims.nonce, claims.expires);
        }
    }

    /// The session `token`'s principal, if it is valid, unexpired, not logged out, and its
    /// account still exists (its role is read from the settings now, not from the token).
    pub fn session_principal(
        &self,
        settings: &AdminConfig,
        token: &str,
    ) -> Result<Principal, Refusal> {
        let claims = self.claims(token).ok_or(Refusal::Invalid)?;
        if claims.expires <= now_secs()
            || self
                .revoked
                .lock()
                .expect("revoked lock")
                .contains_key(&claims.nonce)
        {
            return Err(Refusal::Invalid);
        }
        let account = settings
            .accounts
            .iter()
            .find(|a| a.username == claims.username)
            .ok_or(Refusal::Invalid)?;
        Ok(Principal {
            name: account.username.clone(),
            role: account.role,
            via: Via::Session,
        })
    }

    /// The CSRF token that goes with session `token`.
    pub fn csrf(&self, token: &str) -> String {
        B64.encode(self.mac(b"csrf.", token.as_bytes()).finalize().into_bytes())
    }

    fn sign(&self, payload: &[u8]) -> Vec<u8> {
        self.mac(b"session.", payload)
            .finalize()
            .into_bytes()
            .to_vec()
    }

    /// An HMAC over `data` with the secret, for one `purpose`, so that a token made for one
    /// purpose never verifies for another.
    fn mac(&self, purpose: &[u8], data: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("any key length");
        mac.update(purpose);
        mac.update(data);
        mac
    }

    fn claims(&self, token: &str) -> Option<Claims> {
        let (payload, signature) = token.split_once('.')?;
        let signature = B64.decode(signature).ok()?;
        self.mac(b"session.", payload.as_bytes())
            .verify_slice(&signature)
            .ok()?;
        let payload: serde_json::Value = serde_json::from_slice(&B64.decode(payload).ok()?).ok()?;
        Some(Claims {
            username: payload["u"].as_str()?.to_owned(),
            expires: payload["e"].as_u64()?,
            nonce: payload["n"].as_str()?.to_owned(),
        })
    }

    fn locked_for(&self, from: IpAddr) -> Option<Duration> {
        let failures = self.failures.lock().expect("failures lock");
        let record = failures.get(&from)?;
        let elapsed = record.last.elapsed();
        (record.count >= MAX_FAILURES && elapsed < LOCKOUT).then(|| LOCKOUT - elapsed)
    }

    fn count_failure(&self, from: IpAddr) {
        let mut failures = self.failures.lock().expect("failures lock");
        if failures.len() >= MAX_TRACKED {
            failures.retain(|_, record| record.last.elapsed() < LOCKOUT);
        }
        if failures.len() >= MAX_TRACKED {
            // Still full of fresh records: forget the oldest rather than grow without bound.
            if let Some(oldest) = failures
                .iter()
                .min_by_key(|(_, r)| r.last)
                .map(|(ip, _)| *ip)
            {
                failures.remove(&oldest);
            }
        }
        let record = failures.entry(from).or_insert(Failures {
            count: 0,
            last: Instant::now(),
        });
        if record.last.elapsed() >= LOCKOUT {
            record.count = 0;
        }
        record.count += 1;
        record.last = Instant::now();
    }
}

struct Claims {
    username: String,
    expires: u64,
    nonce: String,
}

/// Whether `password` matches an argon2id PHC hash.
fn verify_password(hash: &str, password: &str) -> bool {
    use argon2::PasswordVerifier;
    argon2::PasswordHash::new(hash).is_ok_and(|hash| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok()
    })
}

/// An argon2id hash of `password` in PHC form, for `admin.accounts`.
pub fn hash_password(password: &str) -> String {
    use argon2::PasswordHasher;
    let mut salt = [0; 16];
    getrandom::fill(&mut salt).expect("the OS has randomness");
    let salt = argon2::password_hash::SaltString::encode_b64(&salt).expect("16 bytes encode");
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 hashes any password")
        .to_string()
}

/// A new random API key: `weir_` and 43 URL-safe characters (256 bits).
pub fn new_key() -> String {
    let mut bytes = [0; 32];
    getrandom::fill(&mut bytes).expect("the OS has randomness");
    format!("weir_{}", B64.encode(bytes))
}

/// The value of cookie `name`, if the request sent it.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Account, ApiKey};

    fn settings() -> AdminConfig {
        AdminConfig {
            keys: vec![
                ApiKey {
                    name: "ops".into(),
                    key_sha256: sha256_hex(b"admin-key"),
                    role: Role::Admin,
                },
                ApiKey {
                    name: "grafana".into(),
                    key_sha256: sha256_hex(b"viewer-key"),
                    role: Role::Viewer,
                },
            ],
            accounts: vec![Account {
                username: "alice".into(),
                password_hash: hash_password("correct horse"),
                role: Role::Admin,
            }],
            ..AdminConfig::default()
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn keys_have_roles_and_a_viewer_cannot_write() {
        let auth = Auth::new(None, Some("env-key"), None);
        let s = settings();
        let ops = auth
            .authenticate(&s, &headers(&[("x-api-key", "admin-key")]), true)
            .unwrap();
        assert_eq!((ops.name.as_str(), ops.role), ("ops", Role::Admin));
        let viewer = headers(&[("x-api-key", "viewer-key")]);
        assert_eq!(
            auth.authenticate(&s, &viewer, false).unwrap().role,
            Role::Viewer
        );
        assert_eq!(auth.authenticate(&s, &viewer, true), Err(Refusal::ReadOnly));
        let env = auth
            .authenticate(&s, &headers(&[("x-api-key", "env-key")]), true)
            .unwrap();
        assert_eq!(env.name, "WEIR_ADMIN_KEY");
        assert_eq!(
            auth.authenticate(&s, &headers(&[("x-api-key", "guess")]), false),
            Err(Refusal::Invalid)
        );
        assert_eq!(
            auth.authenticate(&s, &HeaderMap::new(), false),
            Err(Refusal::Missing)
        );
    }

    #[test]
    fn a_session_needs_its_csrf_token_to_write_and_ends_at_logout() {
        let auth = Auth::new(None, None, None);
        let s = settings();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let session = auth.login(&s, ip, "alice", "correct horse").unwrap();
        let cookie = format!("other=1; {SESSION_COOKIE}={}", session.token);
        let read = headers(&[("cookie", &cookie)]);
        assert_eq!(auth.authenticate(&s, &read, false).unwrap().name, "alice");
        assert_eq!(auth.authenticate(&s, &read, true), Err(Refusal::Csrf));
        let write = headers(&[("cookie", &cookie), ("x-csrf-token", &session.csrf)]);
        assert_eq!(
            auth.authenticate(&s, &write, true).unwrap().via,
            Via::Session
        );
        // A forged or altered token is refused.
        let forged = format!("{SESSION_COOKIE}={}x", session.token);
        assert_eq!(
            auth.authenticate(&s, &headers(&[("cookie", &forged)]), false),
            Err(Refusal::Invalid)
        );
        // Another gateway's secret does not verify it.
        let other = Auth::new(None, None, None);
        assert_eq!(other.authenticate(&s, &read, false), Err(Refusal::Invalid));
        auth.logout(&session.token);
        assert_eq!(auth.authenticate(&s, &read, false), Err(Refusal::Invalid));
    }

    #[test]
    fn five_failed_logins_lock_an_address_out() {
        let auth = Auth::new(None, None, None);
        let s = settings();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for _ in 0..5 {
            assert_eq!(
                auth.login(&s, ip, "alice", "wrong").unwrap_err(),
                LoginError::Wrong
            );
        }
        let locked = auth.login(&s, ip, "alice", "correct horse").unwrap_err();
        assert!(matches!(locked, LoginError::LockedOut(s) if (1..=60).contains(&s)));
        // Another address is not locked, and an unknown user fails the same way.
        let elsewhere: IpAddr = "192.0.2.8".parse().unwrap();
        assert_eq!(
            auth.login(&s, elsewhere, "mallory", "x").unwrap_err(),
            LoginError::Wrong
        );
        auth.login(&s, elsewhere, "alice", "correct horse").unwrap();
    }

    #[test]
    fn a_removed_account_ends_its_sessions() {
        let auth = Auth::new(None, None, None);
        let mut s = settings();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let session = auth.login(&s, ip, "alice", "correct horse").unwrap();
        s.accounts.clear();
        assert_eq!(
            auth.session_principal(&s, &session.token),
            Err(Refusal::Invalid)
        );
    }
}
