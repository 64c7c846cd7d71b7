//! Who is asking: API keys (`X-API-KEY`), dashboard sessions (a signed cookie plus a CSRF
//! token on writes), and the lockout that slows down password guessing.
//!
//! Keys are kept only as their sha256. A session is stateless: an HMAC over the user, role,
//! expiry, a nonce and a fingerprint of the account's password hash, with a signing key that
//! every gateway of a cluster shares (in etcd, or in `admin.session_keys`), so a session
//! opened on one gateway works on every other, and survives a restart. A logout is recorded
//! in the store, so it ends the session everywhere; a removed account or a changed password
//! ends its sessions too. Passwords are checked on the blocking pool, a few at a time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use http::HeaderMap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::Semaphore;

use crate::config::{AdminConfig, Role, session_key_bytes};
use crate::digest::sha256_hex;
use crate::edge::ADMIN_SESSION_COOKIES;
use crate::store::{ConfigWriter, Expect, WriteError};

/// The session cookie's name on a plain admin listener.
pub const SESSION_COOKIE: &str = ADMIN_SESSION_COOKIES[0];
/// The session cookie's name on a TLS admin listener: `__Host-` makes the browser keep it to
/// this host, `Secure` and `Path=/`, and refuse it from any other.
pub const SECURE_SESSION_COOKIE: &str = ADMIN_SESSION_COOKIES[1];
/// The header a dashboard write carries its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// The header an API key travels in.
pub const KEY_HEADER: &str = "x-api-key";
/// Failed logins for one account, or from one network, before it is locked out.
const MAX_FAILURES: u32 = 5;
/// How long a lockout lasts.
const LOCKOUT: Duration = Duration::from_secs(60);
/// Accounts and networks tracked at once; beyond this the oldest records are dropped.
const MAX_TRACKED: usize = 10_000;
/// Password checks that run at once; argon2 takes a core for tens of milliseconds each.
const HASHING_AT_ONCE: usize = 2;
/// How long a login waits for its turn to check a password before it is turned away.
const HASHING_QUEUE: Duration = Duration::from_secs(10);
/// How often, at most, an unknown signing key makes weir read the store's keys again.
const KEYS_REREAD: Duration = Duration::from_secs(1);

/// The session cookie's name on a listener that is (or is not) served over TLS.
pub fn session_cookie(tls: bool) -> &'static str {
    if tls {
        SECURE_SESSION_COOKIE
    } else {
        SESSION_COOKIE
    }
}

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
    /// Too many failures for this account or from this network.
    #[error("too many failed logins; try again in {0} s")]
    LockedOut(u64),
    /// Every password check is taken.
    #[error("too many logins at once; try again shortly")]
    Busy,
    /// The shared session keys could not be read or made.
    #[error("the config store is unavailable; sessions cannot be opened")]
    Unavailable,
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
    /// The keys that sign and verify sessions.
    keys: Mutex<SigningKeys>,
    failures: Mutex<HashMap<Tracked, Failures>>,
    /// Nonces of sessions that logged out here, with when they expire.
    revoked: Mutex<HashMap<String, u64>>,
    /// Turns for a password check.
    hashing: Arc<Semaphore>,
    /// Password checks, counted.
    checks: PasswordChecks,
}

/// The metrics of password checks.
#[derive(Clone, Debug, Default)]
pub struct PasswordChecks {
    /// Running now (`weir_admin_password_checks_in_flight`).
    pub in_flight: Gauge,
    /// Done, known usernames and unknown alike (`weir_admin_password_checks_total`).
    pub done: Counter,
}

/// What failed logins are counted against.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum Tracked {
    /// A username (whether or not it exists, so that lockouts do not tell).
    Account(String),
    /// An IPv4 address, or an IPv6 /64: one subscriber's worth of addresses.
    Network(IpAddr),
}

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

type HmacSha256 = Hmac<Sha256>;

/// One key that signs or verifies sessions.
#[derive(Clone, Debug)]
struct SigningKey {
    /// The first 16 hex digits of the key's sha256: which key signed a token.
    id: String,
    secret: Vec<u8>,
    /// Seconds since the epoch when it stopped signing; it verifies for one session
    /// lifetime after.
    retired: Option<u64>,
}

impl SigningKey {
    fn new(secret: Vec<u8>, retired: Option<u64>) -> Self {
        SigningKey {
            id: sha256_hex(&secret)[..16].to_owned(),
            secret,
            retired,
        }
    }

    fn random() -> Self {
        let mut secret = vec![0; 32];
        getrandom::fill(&mut secret).expect("the OS has randomness");
        SigningKey::new(secret, None)
    }

    /// Whether it still verifies sessions that last `lifetime` seconds.
    fn verifies(&self, lifetime: u64) -> bool {
        self.retired
            .is_none_or(|retired| now_secs() < retired.saturating_add(lifetime))
    }

    fn mac(&self, purpose: &[u8], data: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("any key length");
        mac.update(purpose);
        mac.update(data);
        mac
    }
}

/// Where the signing keys come from, and what is known of them.
struct SigningKeys {
    /// Newest first; the first signs.
    keys: Vec<SigningKey>,
    /// The source they were read from.
    source: KeySource,
    /// When a non-first `admin.session_keys` entry was first seen, by key id.
    config_retired: HashMap<String, u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum KeySource {
    /// Made at start: no store to share them through, and none configured.
    Local,
    /// `admin.session_keys`, as this list.
    Config(Vec<String>),
    /// The store's document at this revision, read at this instant.
    Store(i64, Instant),
}

/// The store's document of session keys (`<prefix>/admin_session_keys`).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct KeysDocument {
    /// Newest first.
    keys: Vec<StoredKey>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct StoredKey {
    /// URL-safe base64.
    secret: String,
    /// When it stopped signing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retired: Option<u64>,
}

impl KeysDocument {
    fn fresh() -> Self {
        let key = SigningKey::random();
        KeysDocument {
            keys: vec![StoredKey {
                secret: B64.encode(&key.secret),
                retired: None,
            }],
        }
    }

    fn signing_keys(&self) -> Option<Vec<SigningKey>> {
        let keys: Option<Vec<_>> = self
            .keys
            .iter()
            .map(|k| {
                let secret = B64.decode(&k.secret).ok().filter(|s| s.len() >= 32)?;
                Some(SigningKey::new(secret, k.retired))
            })
            .collect();
        keys.filter(|keys| keys.first().is_some_and(|k| k.retired.is_none()))
    }
}

/// An argon2id hash that no password matches: an unknown username is checked against it, so
/// that it takes as long as a known one.
static DECOY: LazyLock<String> = LazyLock::new(|| {
    let mut password = [0; 32];
    getrandom::fill(&mut password).expect("the OS has randomness");
    hash_password(&B64.encode(password))
});

impl Auth {
    /// Keys and sessions over `fixed` settings (or the store's), the environment's key and a
    /// generated key's hash, counting password checks in `checks`.
    pub fn new(
        fixed: Option<AdminConfig>,
        env_key: Option<&str>,
        generated: Option<String>,
        checks: PasswordChecks,
    ) -> Self {
        Auth {
            fixed: fixed.map(Arc::new),
            env_key: env_key.map(|key| sha256_hex(key.as_bytes())),
            generated,
            keys: Mutex::new(SigningKeys {
                keys: vec![SigningKey::random()],
                source: KeySource::Local,
                config_retired: HashMap::new(),
            }),
            failures: Mutex::new(HashMap::new()),
            revoked: Mutex::new(HashMap::new()),
            hashing: Arc::new(Semaphore::new(HASHING_AT_ONCE)),
            checks,
        }
    }

    /// The settings in force: `--admin-config`'s, or else the store's.
    pub fn settings(&self, from_store: &Arc<AdminConfig>) -> Arc<AdminConfig> {
        self.fixed.clone().unwrap_or_else(|| from_store.clone())
    }

    /// Who sent `headers`, and whether they may do what `write` says. `tls` says which session
    /// cookie the listener uses; `shared` is the store that holds the cluster's session keys
    /// and logouts, if there is one.
    pub async fn authenticate(
        &self,
        settings: &AdminConfig,
        headers: &HeaderMap,
        write: bool,
        tls: bool,
        shared: Option<&dyn ConfigWriter>,
    ) -> Result<Principal, Refusal> {
        let principal = if let Some(key) = headers.get(KEY_HEADER) {
            self.key_principal(settings, key.as_bytes())
                .ok_or(Refusal::Invalid)?
        } else if let Some(token) = cookie(headers, session_cookie(tls)) {
            let (principal, csrf) = self.session(settings, token, shared).await?;
            if write {
                let sent = headers.get(CSRF_HEADER).map(|v| v.as_bytes());
                if sent != Some(csrf.as_bytes()) {
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

    /// Checks a password and opens a session, or counts a failure against the account and
    /// `from`'s network. The password is checked on the blocking pool, at most
    /// [`HASHING_AT_ONCE`] at a time, and an unknown username costs the same as a known one.
    pub async fn login(
        &self,
        settings: &AdminConfig,
        shared: Option<&dyn ConfigWriter>,
        from: IpAddr,
        username: &str,
        password: &str,
    ) -> Result<Session, LoginError> {
        let tracked = [
            Tracked::Account(if username.len() <= 64 {
                username.to_owned()
            } else {
                // No account has a longer name (admin.accounts refuses one).
                String::from("\0long")
            }),
            Tracked::Network(network(from)),
        ];
        if let Some(left) = self.locked_for(&tracked) {
            return Err(LoginError::LockedOut(left.as_secs().max(1)));
        }
        let account = settings.accounts.iter().find(|a| a.username == username);
        let verified = self
            .check_password(account.map(|a| a.password_hash.clone()), password)
            .await?;
        let Some(account) = account.filter(|_| verified) else {
            self.count_failure(&tracked);
            return Err(LoginError::Wrong);
        };
        {
            let mut failures = self.failures.lock().expect("failures lock");
            for key in &tracked {
                failures.remove(key);
            }
        }
        let key = self.signing_key(settings, shared).await?;
        let expires = now_secs() + settings.session_minutes * 60;
        let mut nonce = [0; 16];
        getrandom::fill(&mut nonce).expect("the OS has randomness");
        let payload = serde_json::json!({
            "u": account.username,
            "r": account.role,
            "e": expires,
            "n": B64.encode(nonce),
            "k": key.id,
            "p": password_fingerprint(&account.password_hash),
        });
        let payload = B64.encode(payload.to_string());
        let signature = key.mac(b"session.", payload.as_bytes()).finalize();
        let token = format!("{payload}.{}", B64.encode(signature.into_bytes()));
        Ok(Session {
            csrf: csrf(&key, &token),
            token,
            username: account.username.clone(),
            role: account.role,
            expires,
        })
    }

    /// Whether `password` matches `hash` (or, for no hash, the decoy), checked on the blocking
    /// pool when a turn is free.
    async fn check_password(
        &self,
        hash: Option<String>,
        password: &str,
    ) -> Result<bool, LoginError> {
        let turn = tokio::time::timeout(HASHING_QUEUE, self.hashing.clone().acquire_owned())
            .await
            .map_err(|_| LoginError::Busy)?
            .map_err(|_| LoginError::Busy)?;
        let password = password.to_owned();
        let checking = InFlight::new(&self.checks.in_flight);
        let done = self.checks.done.clone();
        // The check runs to its end even if the client goes away, and holds its turn till then.
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            let _checking = checking;
            let matched = verify_password(hash.as_deref().unwrap_or(&DECOY), &password);
            done.inc();
            hash.is_some() && matched
        })
        .await
        .map_err(|_| LoginError::Busy)
    }

    /// Ends the session `token`, on every gateway that shares `shared`, if it is one this
    /// cluster signed: anyone may call logout, and a forged token must not write to the store.
    pub async fn logout(
        &self,
        settings: &AdminConfig,
        token: &str,
        shared: Option<&dyn ConfigWriter>,
    ) {
        let Some(unverified) = claims_unverified(token) else {
            return;
        };
        let Some(key) = self.verifying_key(settings, &unverified.key, shared).await else {
            return;
        };
        let Some(claims) = verify(&key, token) else {
            return;
        };
        let now = now_secs();
        if claims.expires <= now {
            return;
        }
        let ttl = (claims.expires - now).min(settings.session_minutes * 60);
        {
            let mut revoked = self.revoked.lock().expect("revoked lock");
            revoked.retain(|_, expires| *expires > now);
            revoked.insert(claims.nonce.clone(), claims.expires);
        }
        if let Some(store) = shared
            && let Err(error) = store.revoke_session(&claims.nonce, ttl).await
        {
            tracing::warn!(%error, "a logout could not be recorded in the store: other gateways accept the session until it expires");
        }
    }

    /// The session `token`'s principal and CSRF token, if it is signed by a key in force,
    /// unexpired, not logged out anywhere, and its account still exists with the same
    /// password (its role is read from the settings now, not from the token).
    pub async fn session(
        &self,
        settings: &AdminConfig,
        token: &str,
        shared: Option<&dyn ConfigWriter>,
    ) -> Result<(Principal, String), Refusal> {
        let unverified = claims_unverified(token).ok_or(Refusal::Invalid)?;
        let key = self
            .verifying_key(settings, &unverified.key, shared)
            .await
            .ok_or(Refusal::Invalid)?;
        let claims = verify(&key, token).ok_or(Refusal::Invalid)?;
        if claims.expires <= now_secs() || self.is_revoked(&claims.nonce, shared).await {
            return Err(Refusal::Invalid);
        }
        let account = settings
            .accounts
            .iter()
            .find(|a| a.username == claims.username)
            .filter(|a| password_fingerprint(&a.password_hash) == claims.password)
            .ok_or(Refusal::Invalid)?;
        let principal = Principal {
            name: account.username.clone(),
            role: account.role,
            via: Via::Session,
        };
        Ok((principal, csrf(&key, token)))
    }

    async fn is_revoked(&self, nonce: &str, shared: Option<&dyn ConfigWriter>) -> bool {
        if self
            .revoked
            .lock()
            .expect("revoked lock")
            .contains_key(nonce)
        {
            return true;
        }
        let Some(store) = shared else {
            return false;
        };
        match store.session_revoked(nonce).await {
            Ok(revoked) => revoked,
            Err(error) => {
                // While the store is down, the dashboard still works for what it can show;
                // a logout made elsewhere meanwhile is not seen until the store is back.
                tracing::warn!(%error, "cannot read session logouts from the store");
                false
            }
        }
    }

    /// The key that signs new sessions, read (or made) in the store when it is the source.
    async fn signing_key(
        &self,
        settings: &AdminConfig,
        shared: Option<&dyn ConfigWriter>,
    ) -> Result<SigningKey, LoginError> {
        // Configured keys win; else the store's, read at each login so a rotation made on
        // another gateway signs here at once.
        if !self.follow_config(settings)
            && let Some(store) = shared
        {
            self.read_store_keys(store, true).await?;
        }
        let keys = self.keys.lock().expect("keys lock");
        Ok(keys.keys[0].clone())
    }

    /// The key with `id`, if it verifies sessions now.
    async fn verifying_key(
        &self,
        settings: &AdminConfig,
        id: &str,
        shared: Option<&dyn ConfigWriter>,
    ) -> Option<SigningKey> {
        let lifetime = settings.session_minutes * 60;
        let from_config = self.follow_config(settings);
        let find = |keys: &SigningKeys| {
            keys.keys
                .iter()
                .find(|k| k.id == id && k.verifies(lifetime))
                .cloned()
        };
        let reread = {
            let keys = self.keys.lock().expect("keys lock");
            if let Some(key) = find(&keys) {
                return Some(key);
            }
            // A key made or rotated on another gateway: read the store again, now and then.
            match keys.source {
                KeySource::Local => shared.is_some() && !from_config,
                KeySource::Store(_, read) => read.elapsed() >= KEYS_REREAD,
                KeySource::Config(_) => false,
            }
        };
        if reread && let Some(store) = shared {
            self.read_store_keys(store, false).await.ok()?;
            return find(&self.keys.lock().expect("keys lock"));
        }
        None
    }

    /// Uses `admin.session_keys` when the settings have any; returns whether it does.
    fn follow_config(&self, settings: &AdminConfig) -> bool {
        if settings.session_keys.is_empty() {
            return false;
        }
        let mut keys = self.keys.lock().expect("keys lock");
        if keys.source == KeySource::Config(settings.session_keys.clone()) {
            return true;
        }
        let now = now_secs();
        let mut made = Vec::new();
        for (index, text) in settings.session_keys.iter().enumerate() {
            let Some(secret) = session_key_bytes(text) else {
                continue;
            };
            let mut key = SigningKey::new(secret, None);
            if index > 0 {
                // Retired from when this gateway first saw it second or later.
                let since = *keys.config_retired.entry(key.id.clone()).or_insert(now);
                key.retired = Some(since);
            }
            made.push(key);
        }
        if made.is_empty() {
            return false;
        }
        keys.keys = made;
        keys.source = KeySource::Config(settings.session_keys.clone());
        true
    }

    /// Reads the store's session keys; with `create`, makes them if none are stored.
    async fn read_store_keys(
        &self,
        store: &dyn ConfigWriter,
        create: bool,
    ) -> Result<(), LoginError> {
        let unavailable = |error: WriteError| {
            tracing::warn!(%error, "cannot read the dashboard's session keys from the store");
            LoginError::Unavailable
        };
        let mut stored = store.session_keys().await.map_err(unavailable)?;
        if stored.is_none() && create {
            let document = serde_json::to_string(&KeysDocument::fresh()).expect("JSON");
            match store.put_session_keys(&document, Expect::Absent).await {
                Ok(revision) => stored = Some((document, revision)),
                // Another gateway made them first: theirs are the cluster's.
                Err(WriteError::Conflict { .. }) => {
                    stored = store.session_keys().await.map_err(unavailable)?;
                }
                Err(error) => return Err(unavailable(error)),
            }
        }
        let Some((document, revision)) = stored else {
            return Err(LoginError::Unavailable);
        };
        let parsed = serde_json::from_str::<KeysDocument>(&document)
            .ok()
            .and_then(|d| d.signing_keys());
        let Some(parsed) = parsed else {
            tracing::warn!(
                "the store's admin_session_keys is not a valid key document; sessions cannot be opened"
            );
            return Err(LoginError::Unavailable);
        };
        let mut keys = self.keys.lock().expect("keys lock");
        keys.keys = parsed;
        keys.source = KeySource::Store(revision, Instant::now());
        Ok(())
    }

    /// Makes a new signing key in the store; the one it replaces verifies sessions for one
    /// more session lifetime, and older ones are dropped.
    pub async fn rotate(&self, store: &dyn ConfigWriter) -> Result<(), WriteError> {
        let (document, expect) = match store.session_keys().await? {
            Some((text, revision)) => (
                serde_json::from_str::<KeysDocument>(&text).unwrap_or_default(),
                Expect::Revision(revision),
            ),
            None => (KeysDocument::default(), Expect::Absent),
        };
        let mut rotated = KeysDocument::fresh();
        if let Some(mut previous) = document.keys.into_iter().find(|k| k.retired.is_none()) {
            previous.retired = Some(now_secs());
            rotated.keys.push(previous);
        }
        let text = serde_json::to_string(&rotated).expect("JSON");
        store.put_session_keys(&text, expect).await?;
        // This gateway signs with the new key at once; others at their next read.
        let _ = self.read_store_keys(store, false).await;
        Ok(())
    }

    fn locked_for(&self, tracked: &[Tracked]) -> Option<Duration> {
        let failures = self.failures.lock().expect("failures lock");
        tracked
            .iter()
            .filter_map(|key| {
                let record = failures.get(key)?;
                let elapsed = record.last.elapsed();
                (record.count >= MAX_FAILURES && elapsed < LOCKOUT).then(|| LOCKOUT - elapsed)
            })
            .max()
    }

    fn count_failure(&self, tracked: &[Tracked]) {
        let mut failures = self.failures.lock().expect("failures lock");
        for key in tracked {
            if failures.len() >= MAX_TRACKED {
                failures.retain(|_, record| record.last.elapsed() < LOCKOUT);
            }
            if failures.len() >= MAX_TRACKED {
                // Still full of fresh records: forget the oldest rather than grow without bound.
                if let Some(oldest) = failures
                    .iter()
                    .min_by_key(|(_, r)| r.last)
                    .map(|(key, _)| key.clone())
                {
                    failures.remove(&oldest);
                }
            }
            let record = failures.entry(key.clone()).or_insert(Failures {
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
}

/// Counts one password check in flight until dropped.
struct InFlight(Gauge);

impl InFlight {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The network failed logins from `ip` count against: the address itself for IPv4, its /64
/// for IPv6 (one subscriber usually has a whole /64 to rotate through).
fn network(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// A short fingerprint of an account's password hash: a changed password ends its sessions.
fn password_fingerprint(hash: &str) -> String {
    sha256_hex(hash.as_bytes())[..16].to_owned()
}

/// The CSRF token that goes with session `token`, signed with the key that signed it.
fn csrf(key: &SigningKey, token: &str) -> String {
    B64.encode(key.mac(b"csrf.", token.as_bytes()).finalize().into_bytes())
}

struct Claims {
    username: String,
    expires: u64,
    nonce: String,
    key: String,
    password: String,
}

/// A token's claims, before its signature is checked: only to pick the key that checks it,
/// or to record a logout.
fn claims_unverified(token: &str) -> Option<Claims> {
    let (payload, _) = token.split_once('.')?;
    if payload.len() > 4096 {
        return None;
    }
    let payload: serde_json::Value = serde_json::from_slice(&B64.decode(payload).ok()?).ok()?;
    let nonce = payload["n"].as_str()?;
    // The nonce becomes a store key: only what login makes is accepted.
    if nonce.len() > 32
        || !nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return None;
    }
    Some(Claims {
        username: payload["u"].as_str()?.to_owned(),
        expires: payload["e"].as_u64()?,
        nonce: nonce.to_owned(),
        key: payload["k"].as_str()?.to_owned(),
        password: payload["p"].as_str()?.to_owned(),
    })
}

/// The claims of `token` if `key` signed it.
fn verify(key: &SigningKey, token: &str) -> Option<Claims> {
    let (payload, signature) = token.split_once('.')?;
    let signature = B64.decode(signature).ok()?;
    key.mac(b"session.", payload.as_bytes())
        .verify_slice(&signature)
        .ok()?;
    claims_unverified(token)
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

    fn auth() -> Auth {
        Auth::new(None, Some("env-key"), None, PasswordChecks::default())
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

    async fn who(
        auth: &Auth,
        s: &AdminConfig,
        h: &HeaderMap,
        write: bool,
    ) -> Result<Principal, Refusal> {
        auth.authenticate(s, h, write, false, None).await
    }

    #[tokio::test]
    async fn keys_have_roles_and_a_viewer_cannot_write() {
        let auth = auth();
        let s = settings();
        let ops = who(&auth, &s, &headers(&[("x-api-key", "admin-key")]), true)
            .await
            .unwrap();
        assert_eq!((ops.name.as_str(), ops.role), ("ops", Role::Admin));
        let viewer = headers(&[("x-api-key", "viewer-key")]);
        assert_eq!(
            who(&auth, &s, &viewer, false).await.unwrap().role,
            Role::Viewer
        );
        assert_eq!(who(&auth, &s, &viewer, true).await, Err(Refusal::ReadOnly));
        let env = who(&auth, &s, &headers(&[("x-api-key", "env-key")]), true)
            .await
            .unwrap();
        assert_eq!(env.name, "WEIR_ADMIN_KEY");
        assert_eq!(
            who(&auth, &s, &headers(&[("x-api-key", "guess")]), false).await,
            Err(Refusal::Invalid)
        );
        assert_eq!(
            who(&auth, &s, &HeaderMap::new(), false).await,
            Err(Refusal::Missing)
        );
    }

    #[tokio::test]
    async fn a_session_needs_its_csrf_token_to_write_and_ends_at_logout() {
        let auth = auth();
        let s = settings();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let session = auth
            .login(&s, None, ip, "alice", "correct horse")
            .await
            .unwrap();
        let cookie = format!("other=1; {SESSION_COOKIE}={}", session.token);
        let read = headers(&[("cookie", &cookie)]);
        assert_eq!(who(&auth, &s, &read, false).await.unwrap().name, "alice");
        assert_eq!(who(&auth, &s, &read, true).await, Err(Refusal::Csrf));
        let write = headers(&[("cookie", &cookie), ("x-csrf-token", &session.csrf)]);
        assert_eq!(
            who(&auth, &s, &write, true).await.unwrap().via,
            Via::Session
        );
        // On a TLS listener only the __Host- cookie counts.
        assert_eq!(
            auth.authenticate(&s, &read, false, true, None).await,
            Err(Refusal::Missing)
        );
        // A forged or altered token is refused.
        let forged = format!("{SESSION_COOKIE}={}x", session.token);
        assert_eq!(
            who(&auth, &s, &headers(&[("cookie", &forged)]), false).await,
            Err(Refusal::Invalid)
        );
        // A gateway with keys of its own does not verify it.
        let other = Auth::new(None, None, None, PasswordChecks::default());
        assert_eq!(who(&other, &s, &read, false).await, Err(Refusal::Invalid));
        // A forged token's logout records nothing: logout needs no credentials.
        let forged_claims = B64.encode(json_payload(
            "alice",
            "bm9uY2Vub25jZW5vbmNl",
            &session.token,
        ));
        auth.logout(&s, &format!("{forged_claims}.AAAA"), None)
            .await;
        assert!(auth.revoked.lock().unwrap().is_empty());
        auth.logout(&s, &session.token, None).await;
        assert_eq!(who(&auth, &s, &read, false).await, Err(Refusal::Invalid));
    }

    #[tokio::test]
    async fn failed_logins_lock_out_the_account_and_the_network_and_not_others() {
        let auth = auth();
        let s = settings();
        // Rotating through a /64 does not help: the network is locked.
        for n in 1..=5 {
            let ip: IpAddr = format!("2001:db8:1:2::{n}").parse().unwrap();
            assert_eq!(
                auth.login(&s, None, ip, "mallory", "x").await.unwrap_err(),
                LoginError::Wrong
            );
        }
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let locked = auth
            .login(&s, None, same_64, "alice", "correct horse")
            .await
            .unwrap_err();
        assert!(matches!(locked, LoginError::LockedOut(s) if (1..=60).contains(&s)));
        // Rotating addresses does not help either: the account is locked.
        for n in 1..=5 {
            let ip: IpAddr = format!("198.51.100.{n}").parse().unwrap();
            assert_eq!(
                auth.login(&s, None, ip, "alice", "wrong")
                    .await
                    .unwrap_err(),
                LoginError::Wrong
            );
        }
        let fresh: IpAddr = "203.0.113.1".parse().unwrap();
        assert!(matches!(
            auth.login(&s, None, fresh, "alice", "correct horse").await,
            Err(LoginError::LockedOut(_))
        ));
        // Another account from another network is not locked.
        let mut s = s;
        s.accounts.push(Account {
            username: "bob".into(),
            password_hash: hash_password("battery staple"),
            role: Role::Viewer,
        });
        auth.login(&s, None, fresh, "bob", "battery staple")
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_unknown_username_is_checked_against_a_decoy_hash() {
        let checks = PasswordChecks::default();
        let auth = Auth::new(None, None, None, checks.clone());
        let s = settings();
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        assert_eq!(
            auth.login(&s, None, ip, "nobody", "x").await.unwrap_err(),
            LoginError::Wrong
        );
        assert_eq!(checks.done.get(), 1, "no argon2 run for an unknown user");
        assert_eq!(checks.in_flight.get(), 0);
    }

    #[tokio::test]
    async fn a_removed_account_or_a_changed_password_ends_its_sessions() {
        let auth = auth();
        let mut s = settings();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let session = auth
            .login(&s, None, ip, "alice", "correct horse")
            .await
            .unwrap();
        assert!(auth.session(&s, &session.token, None).await.is_ok());
        s.accounts[0].password_hash = hash_password("new horse");
        assert_eq!(
            auth.session(&s, &session.token, None).await.unwrap_err(),
            Refusal::Invalid
        );
        s.accounts.clear();
        assert_eq!(
            auth.session(&s, &session.token, None).await.unwrap_err(),
            Refusal::Invalid
        );
    }

    #[tokio::test]
    async fn configured_keys_are_shared_and_a_rotated_one_still_verifies() {
        let one = B64.encode([1u8; 32]);
        let two = B64.encode([2u8; 32]);
        let mut s = settings();
        s.session_keys = vec![one.clone()];
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let first = auth();
        let session = first
            .login(&s, None, ip, "alice", "correct horse")
            .await
            .unwrap();
        // Another gateway (or this one after a restart) with the same keys accepts it,
        // CSRF token included.
        let second = auth();
        let (principal, csrf) = second.session(&s, &session.token, None).await.unwrap();
        assert_eq!((principal.name.as_str(), csrf), ("alice", session.csrf));
        // Rotated: the old key verifies, the new one signs.
        s.session_keys = vec![two, one];
        assert!(second.session(&s, &session.token, None).await.is_ok());
        let newer = second
            .login(&s, None, ip, "alice", "correct horse")
            .await
            .unwrap();
        s.session_keys.truncate(1);
        assert!(second.session(&s, &newer.token, None).await.is_ok());
        assert!(second.session(&s, &session.token, None).await.is_err());
    }

    /// A payload like the one `token` carries, for `user` with `nonce` and a far expiry.
    fn json_payload(user: &str, nonce: &str, token: &str) -> String {
        let real = claims_unverified(token).unwrap();
        serde_json::json!({"u": user, "r": "admin", "e": u64::MAX / 2, "n": nonce,
                           "k": real.key, "p": real.password})
        .to_string()
    }

    #[test]
    fn networks_are_a_v4_address_or_a_v6_64() {
        let v6: IpAddr = "2001:db8:aa:bb:1:2:3:4".parse().unwrap();
        assert_eq!(network(v6), "2001:db8:aa:bb::".parse::<IpAddr>().unwrap());
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(network(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }
}
