//! Tenants' keys on a Redis or Valkey server that several evrhost nodes
//! share. A tenant's keys are the fields of one hash,
//! `PREFIX:{TENANT}:kv`, and the bytes they take are counted in
//! `PREFIX:{TENANT}:bytes` (a tenant name has no `}`, so no tenant's keys
//! can name another's). Writes run as server-side scripts, so quotas and
//! `incr` are atomic across nodes. Durability is the server's own
//! (`appendfsync`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::{KeyValue, KvError, KvLimits, KvMetrics};
use crate::sync::lock;

/// A failing server is logged at most once per this.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Fields an operator's listing looks at per HSCAN round.
const SCAN_COUNT: usize = 1000;

#[derive(Clone, Debug, PartialEq)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` (TLS).
    pub url: String,
    /// Connections, each multiplexing every call's commands.
    pub pool: usize,
    /// How long one command may take, connecting included.
    pub timeout: Duration,
    pub prefix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("redis url `{url}`: {reason}")]
    Url { url: String, reason: String },
}

const SET: &str = r"
local old = redis.call('HSTRLEN', KEYS[1], ARGV[1])
local exists = redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1
local grow = string.len(ARGV[2]) - old
if not exists then
  if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return 1 end
  grow = grow + string.len(ARGV[1])
end
local bytes = tonumber(redis.call('GET', KEYS[2]) or '0')
if grow > 0 and bytes + grow > tonumber(ARGV[4]) then return 2 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCRBY', KEYS[2], grow)
return 0
";

const DELETE: &str = r"
local old = redis.call('HSTRLEN', KEYS[1], ARGV[1])
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('DECRBY', KEYS[2], old + string.len(ARGV[1]))
return 1
";

/// Returns {status, value}: the value as text, so no counter passes
/// through a Lua number (a double).
const INCR: &str = r"
local before = redis.call('HGET', KEYS[1], ARGV[1])
if not before and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return {1, ''} end
local r = redis.pcall('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
if type(r) == 'table' and r.err then
  if string.find(r.err, 'overflow') then return {4, ''} end
  return {3, ''}
end
local after = redis.call('HGET', KEYS[1], ARGV[1])
local grow = string.len(after) - (before and string.len(before) or 0)
if not before then grow = grow + string.len(ARGV[1]) end
local bytes = tonumber(redis.call('GET', KEYS[2]) or '0')
if grow > 0 and bytes + grow > tonumber(ARGV[4]) then
  if before then redis.call('HSET', KEYS[1], ARGV[1], before) else redis.call('HDEL', KEYS[1], ARGV[1]) end
  return {2, ''}
end
redis.call('INCRBY', KEYS[2], grow)
return {0, after}
";

/// The connections and scripts every tenant's space shares.
pub struct RemoteStore {
    settings: RedisSettings,
    connections: Vec<ConnectionManager>,
    next: AtomicUsize,
    set: Script,
    delete: Script,
    incr: Script,
    errors: AtomicU64,
    logged: Mutex<Option<Instant>>,
}

impl RemoteStore {
    /// Parses the URL and prepares the connections; they connect on first
    /// use and again (with backoff) whenever the server goes away. Must run
    /// in a tokio runtime.
    pub fn connect(settings: &RedisSettings) -> Result<RemoteStore, RemoteError> {
        let bad = |reason: String| RemoteError::Url { url: redact(&settings.url), reason };
        if settings.url.starts_with("rediss://") {
            // rustls needs a process-wide provider; installing it twice is
            // harmless.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = redis::Client::open(settings.url.as_str()).map_err(|e| bad(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(5))
            .set_number_of_retries(2);
        let connections = (0..settings.pool.max(1))
            .map(|_| ConnectionManager::new_lazy_with_config(client.clone(), config.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        Ok(RemoteStore {
            settings: settings.clone(),
            connections,
            next: AtomicUsize::new(0),
            set: Script::new(SET),
            delete: Script::new(DELETE),
            incr: Script::new(INCR),
            errors: AtomicU64::new(0),
            logged: Mutex::new(None),
        })
    }

    pub fn space(self: &Arc<Self>, tenant: &str, limits: KvLimits) -> RedisSpace {
        let prefix = &self.settings.prefix;
        RedisSpace {
            tenant: tenant.to_string(),
            limits,
            hash: format!("{prefix}:{{{tenant}}}:kv"),
            bytes: format!("{prefix}:{{{tenant}}}:bytes"),
            store: self.clone(),
        }
    }

    pub fn metrics(&self) -> KvMetrics {
        KvMetrics { errors: self.errors.load(Relaxed), ..KvMetrics::default() }
    }

    fn connection(&self) -> ConnectionManager {
        let i = self.next.fetch_add(1, Relaxed) % self.connections.len();
        self.connections[i].clone()
    }

    /// Runs one command within the timeout; a failure is counted, logged
    /// at most once per `LOG_EVERY`, and becomes `Unavailable`.
    async fn run<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, KvError> {
        let reason = match tokio::time::timeout(self.settings.timeout, fut).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {} ms", self.settings.timeout.as_millis()),
        };
        self.errors.fetch_add(1, Relaxed);
        let mut logged = lock(&self.logged);
        if logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            *logged = Some(Instant::now());
            tracing::error!(url = %redact(&self.settings.url), "kv: redis {what} failed: {reason} (reconnecting with backoff; logged once per {} s)", LOG_EVERY.as_secs());
        }
        Err(KvError::Unavailable { reason: format!("redis: {reason}") })
    }
}

/// The URL without its password, for logs and errors.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// One tenant's keys on the server.
pub struct RedisSpace {
    tenant: String,
    limits: KvLimits,
    hash: String,
    bytes: String,
    store: Arc<RemoteStore>,
}

impl RedisSpace {
    fn check_key(&self, key: &str) -> Result<(), KvError> {
        if key.len() > self.limits.max_key_bytes {
            return Err(KvError::KeyTooLong { len: key.len(), max: self.limits.max_key_bytes });
        }
        Ok(())
    }

    fn quota_error(&self, status: i64, key: &str) -> KvError {
        match status {
            1 => KvError::Full { tenant: self.tenant.clone(), max: self.limits.max_keys },
            2 => KvError::OverBudget { tenant: self.tenant.clone(), max: self.limits.max_bytes },
            3 => KvError::NotANumber { key: key.to_string() },
            4 => KvError::Overflow { key: key.to_string() },
            other => KvError::Unavailable { reason: format!("redis: the script answered {other}") },
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        self.check_key(key)?;
        let mut c = self.store.connection();
        self.store.run("HGET", redis::cmd("HGET").arg(&self.hash).arg(key).query_async(&mut c)).await
    }

    pub async fn set(&self, key: &str, value: Vec<u8>) -> Result<(), KvError> {
        self.check_key(key)?;
        if value.len() > self.limits.max_value_bytes {
            return Err(KvError::ValueTooLarge { len: value.len(), max: self.limits.max_value_bytes });
        }
        let mut c = self.store.connection();
        let mut call = self.store.set.key(&self.hash);
        call.key(&self.bytes).arg(key).arg(value).arg(self.limits.max_keys).arg(self.limits.max_bytes);
        match self.store.run("set", call.invoke_async::<i64>(&mut c)).await? {
            0 => Ok(()),
            status => Err(self.quota_error(status, key)),
        }
    }

    pub async fn delete(&self, key: &str) -> Result<bool, KvError> {
        self.check_key(key)?;
        let mut c = self.store.connection();
        let mut call = self.store.delete.key(&self.hash);
        call.key(&self.bytes).arg(key);
        Ok(self.store.run("delete", call.invoke_async::<i64>(&mut c)).await? == 1)
    }

    pub async fn incr(&self, key: &str, delta: i64) -> Result<i64, KvError> {
        self.check_key(key)?;
        let mut c = self.store.connection();
        let mut call = self.store.incr.key(&self.hash);
        call.key(&self.bytes).arg(key).arg(delta).arg(self.limits.max_keys).arg(self.limits.max_bytes);
        let (status, value): (i64, String) = self.store.run("incr", call.invoke_async(&mut c)).await?;
        if status != 0 {
            return Err(self.quota_error(status, key));
        }
        value.parse().map_err(|_| KvError::NotANumber { key: key.to_string() })
    }

    /// Up to `limit` keys starting with `prefix`, in key order. Scans the
    /// tenant's hash (bounded by its key quota).
    pub async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<KeyValue>, KvError> {
        let pattern = format!("{}*", glob_escape(prefix));
        let mut c = self.store.connection();
        let mut best: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
        let mut cursor: u64 = 0;
        loop {
            let (next, fields): (u64, Vec<(String, Vec<u8>)>) = self
                .store
                .run(
                    "HSCAN",
                    redis::cmd("HSCAN")
                        .arg(&self.hash)
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(SCAN_COUNT)
                        .query_async(&mut c),
                )
                .await?;
            for (k, v) in fields {
                best.insert(k, v);
                if best.len() > limit {
                    best.pop_last();
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(best.into_iter().map(|(key, value)| KeyValue { key, value }).collect())
    }
}

/// `text` matched literally by a Redis glob.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(redact("redis://user:hunter2@db:6379/0"), "redis://user:***@db:6379/0");
        assert_eq!(redact("redis://:hunter2@db"), "redis://:***@db");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    #[test]
    fn glob_characters_are_literal() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
