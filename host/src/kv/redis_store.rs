//! The kv on Redis (`kv: {backend: redis}`): every gateway that names the same server shares
//! it, so a counter there counts across gateways.
//!
//! Keys are `weir:kv:<tenant>/<plugin>:<key>`. A failure to reach Redis is [`KvUnavailable`]:
//! the plugin call fails and the plugin's `failure` policy answers.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Script, Value};

use super::{KvError, KvUnavailable};

/// After a failed connect, calls fail at once for this long instead of each waiting out a
/// connect of its own.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(500);

/// The longest TTL sent to Redis (a century); Redis refuses expiries past its clock's range.
const MAX_TTL_MS: u64 = 100 * 365 * 86_400_000;

/// `incr`: INCRBY and, for a key that did not exist, PEXPIRE, as one atomic step. A value that
/// is not an integer (or an overflow) comes back as a status reply rather than an error, so
/// that it is told apart from an unreachable server.
const INCR_SCRIPT: &str = r"
local existed = redis.call('EXISTS', KEYS[1])
local n = redis.pcall('INCRBY', KEYS[1], ARGV[1])
if type(n) == 'table' then return redis.status_reply(n.err or 'ERR increment failed') end
if existed == 0 and ARGV[2] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return n
";

/// `get_cas`: the value and its CAS value, the first 32 bits of its SHA-1 (never 0), which
/// every gateway computes alike, since Redis computes it.
const GET_CAS_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then return false end
local c = tonumber(string.sub(redis.sha1hex(v), 1, 8), 16)
if c == 0 then c = 1 end
return {v, c}
";

/// `set_if`: stores ARGV[1] only if the value's CAS value is still ARGV[2], keeping its TTL.
const SET_IF_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local c = tonumber(string.sub(redis.sha1hex(v), 1, 8), 16)
if c == 0 then c = 1 end
if c ~= tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
return 1
";

/// A Redis server that plugin kvs live on.
pub struct RedisStore {
    client: Client,
    url: String,
    timeout: Duration,
    config: AsyncConnectionConfig,
    incr: Script,
    get_cas: Script,
    set_if: Script,
    /// The open connection; `None` until the first call, and again after a failure.
    connection: ArcSwapOption<MultiplexedConnection>,
    /// One caller connects at a time; the others wait for it rather than pile on.
    connecting: tokio::sync::Mutex<()>,
    /// When the last connect failed.
    failed_at: Mutex<Option<Instant>>,
}

impl RedisStore {
    /// Checks a `server.redis_url` without connecting.
    pub fn check_url(url: &str) -> Result<(), String> {
        client(url).map(drop)
    }

    /// A store on the server at `url`; it connects at its first call.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, String> {
        let client = client(url)?;
        Ok(RedisStore {
            client,
            url: url.to_owned(),
            timeout,
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout)),
            incr: Script::new(INCR_SCRIPT),
            get_cas: Script::new(GET_CAS_SCRIPT),
            set_if: Script::new(SET_IF_SCRIPT),
            connection: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
            failed_at: Mutex::new(None),
        })
    }

    /// Whether this store is the one `url` and `timeout` describe.
    pub fn is(&self, url: &str, timeout: Duration) -> bool {
        self.url == url && self.timeout == timeout
    }

    /// The value under `key` in `namespace`.
    pub async fn get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, KvUnavailable> {
        let mut connection = self.connection().await?;
        let reply = redis::cmd("GET")
            .arg(redis_key(namespace, key))
            .query_async(&mut connection)
            .await;
        self.settle(reply)
    }

    /// Stores `value` under `key`, with `ttl` if given.
    pub async fn set(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), KvUnavailable> {
        let mut connection = self.connection().await?;
        let mut command = redis::cmd("SET");
        command.arg(redis_key(namespace, key)).arg(value);
        if let Some(ttl) = ttl {
            command.arg("PX").arg(ttl_ms(ttl));
        }
        let reply: Result<(), _> = command.query_async(&mut connection).await;
        self.settle(reply)
    }

    /// Removes `key`.
    pub async fn delete(&self, namespace: &str, key: &str) -> Result<(), KvUnavailable> {
        let mut connection = self.connection().await?;
        let reply: Result<(), _> = redis::cmd("DEL")
            .arg(redis_key(namespace, key))
            .query_async(&mut connection)
            .await;
        self.settle(reply)
    }

    /// Atomically adds `delta` and returns the new value; a new key starts at 0 with `ttl`.
    ///
    /// The outer error is an unreachable server, the inner one a value that is not a counter.
    pub async fn incr(
        &self,
        namespace: &str,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<Result<i64, KvError>, KvUnavailable> {
        let mut connection = self.connection().await?;
        let ttl = ttl.map(|ttl| ttl_ms(ttl).to_string()).unwrap_or_default();
        let reply: Result<Value, _> = self
            .incr
            .key(redis_key(namespace, key))
            .arg(delta)
            .arg(ttl)
            .invoke_async(&mut connection)
            .await;
        Ok(match self.settle(reply)? {
            Value::Int(n) => Ok(n),
            Value::SimpleString(refusal) => Err(KvError::Refused(refusal)),
            other => Err(KvError::Refused(format!("unexpected reply {other:?}"))),
        })
    }

    /// The value under `key` with its compare-and-swap value (never 0).
    pub async fn get_with_cas(
        &self,
        namespace: &str,
        key: &str,
    ) -> Result<Option<(Vec<u8>, u32)>, KvUnavailable> {
        let mut connection = self.connection().await?;
        let reply: Result<Option<(Vec<u8>, u32)>, _> = self
            .get_cas
            .key(redis_key(namespace, key))
            .invoke_async(&mut connection)
            .await;
        self.settle(reply)
    }

    /// Stores `value` only if the value under `key` still has CAS value `expected`; `false`
    /// when it changed or went.
    pub async fn set_if(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        expected: u32,
    ) -> Result<bool, KvUnavailable> {
        let mut connection = self.connection().await?;
        let reply: Result<i64, _> = self
            .set_if
            .key(redis_key(namespace, key))
            .arg(value)
            .arg(expected)
            .invoke_async(&mut connection)
            .await;
        Ok(self.settle(reply)? == 1)
    }

    /// The open connection, or a new one.
    async fn connection(&self) -> Result<MultiplexedConnection, KvUnavailable> {
        if let Some(connection) = self.connection.load_full() {
            return Ok((*connection).clone());
        }
        let _turn = self.connecting.lock().await;
        if let Some(connection) = self.connection.load_full() {
            return Ok((*connection).clone());
        }
        let recently_failed = self
            .failed_at
            .lock()
            .expect("redis failure lock")
            .is_some_and(|at| at.elapsed() < RECONNECT_BACKOFF);
        if recently_failed {
            return Err(KvUnavailable(
                "Redis could not be reached a moment ago".into(),
            ));
        }
        match self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await
        {
            Ok(connection) => {
                *self.failed_at.lock().expect("redis failure lock") = None;
                self.connection.store(Some(Arc::new(connection.clone())));
                Ok(connection)
            }
            Err(error) => {
                *self.failed_at.lock().expect("redis failure lock") = Some(Instant::now());
                Err(KvUnavailable(format!("connecting to Redis: {error}")))
            }
        }
    }

    /// Passes a reply on; on an error, drops the connection so that the next call makes a new
    /// one (a dropped or timed-out connection is not worth keeping).
    fn settle<T>(&self, reply: redis::RedisResult<T>) -> Result<T, KvUnavailable> {
        reply.map_err(|error| {
            if error.is_io_error()
                || error.is_timeout()
                || error.is_connection_dropped()
                || error.is_unrecoverable_error()
            {
                self.connection.store(None);
            }
            KvUnavailable(format!("Redis: {error}"))
        })
    }
}

/// The client for `url`, which must be a plain (not TLS) Redis URL.
fn client(url: &str) -> Result<Client, String> {
    if url.starts_with("rediss://") || url.starts_with("valkeys://") {
        return Err("TLS to Redis (rediss://) is not supported yet; use redis://".into());
    }
    Client::open(url)
        .map_err(|e| format!("redis_url is not a Redis URL such as redis://host:6379/0: {e}"))
}

/// The Redis key of a plugin's `key`. A namespace is `tenant/plugin` (or `tenant/:shared`,
/// proxy-wasm's shared data), and neither name may hold a `:`, so no two namespaces share a
/// key.
fn redis_key(namespace: &str, key: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(8 + namespace.len() + 1 + key.len());
    bytes.extend_from_slice(b"weir:kv:");
    bytes.extend_from_slice(namespace.as_bytes());
    bytes.push(b':');
    bytes.extend_from_slice(key.as_bytes());
    bytes
}

/// A TTL in whole milliseconds, at least 1 (Redis refuses 0) and at most [`MAX_TTL_MS`].
fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_TTL_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_without_connecting() {
        RedisStore::check_url("redis://127.0.0.1:6379/0").unwrap();
        RedisStore::check_url("redis://:secret@10.0.0.7").unwrap();
        assert!(
            RedisStore::check_url("rediss://10.0.0.7")
                .unwrap_err()
                .contains("TLS")
        );
        assert!(RedisStore::check_url("http://10.0.0.7").is_err());
        assert!(RedisStore::check_url("redis://10.0.0.7/not-a-db").is_err());
    }

    #[test]
    fn keys_carry_the_namespace_and_ttls_stay_in_range() {
        assert_eq!(
            redis_key("default/limit-count", "a|b"),
            b"weir:kv:default/limit-count:a|b"
        );
        assert_eq!(ttl_ms(Duration::ZERO), 1);
        assert_eq!(ttl_ms(Duration::from_millis(1500)), 1500);
        assert_eq!(ttl_ms(Duration::MAX), MAX_TTL_MS);
    }
}
