//! `[kv]`: where tenants' keys live. `embedded` (the default) keeps them
//! in a redb file under `dir`; `memory` forgets them at exit; `redis`
//! shares them between nodes on a Redis or Valkey server.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::checker::Checker;
use super::ConfigError;
use crate::kv::{default_dir, Durability, KvBackend, RedisSettings};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct KvSection {
    backend: Option<Spanned<String>>,
    dir: Option<Spanned<String>>,
    durability: Option<Spanned<String>>,
    flush_ms: Option<Spanned<u64>>,
    url: Option<Spanned<String>>,
    pool: Option<Spanned<usize>>,
    timeout_ms: Option<Spanned<u64>>,
    prefix: Option<Spanned<String>>,
}

/// Relaxed commits happen at most this often by default.
const DEFAULT_FLUSH_MS: u64 = 100;

pub(super) fn check(ck: &Checker, kv: &Option<KvSection>, base: &Path) -> Result<KvBackend, ConfigError> {
    let Some(kv) = kv else {
        return Ok(embedded_default());
    };
    let backend = kv.backend.as_ref().map_or("embedded", |b| b.get_ref().as_str());
    // Where to point at a missing key: the backend, or any other key.
    let section = kv.backend.as_ref().or(kv.dir.as_ref());
    // A key that belongs to another backend is a mistake worth naming.
    only(ck, backend, &kv.dir, "dir", "embedded")?;
    only(ck, backend, &kv.durability, "durability", "embedded")?;
    only(ck, backend, &kv.flush_ms, "flush_ms", "embedded")?;
    only(ck, backend, &kv.url, "url", "redis")?;
    only(ck, backend, &kv.pool, "pool", "redis")?;
    only(ck, backend, &kv.timeout_ms, "timeout_ms", "redis")?;
    only(ck, backend, &kv.prefix, "prefix", "redis")?;
    match backend {
        "memory" => Ok(KvBackend::Memory),
        "embedded" => {
            let dir = match &kv.dir {
                Some(d) if d.get_ref().is_empty() => return Err(ck.at(d, "kv.dir", "an empty path")),
                Some(d) => base.join(d.get_ref()),
                None => return with_durability(ck, kv, embedded_default()),
            };
            with_durability(ck, kv, KvBackend::Embedded { dir, durability: Durability::Sync })
        }
        "redis" => {
            let Some(url) = &kv.url else {
                return Err(missing_url(ck, section));
            };
            let text = url.get_ref();
            if !(text.starts_with("redis://") || text.starts_with("rediss://")) {
                return Err(ck.at(url, "kv.url", "a redis:// or rediss:// URL"));
            }
            let prefix = kv.prefix.as_ref().map_or("evrhost", |p| p.get_ref().as_str());
            if let Some(p) = &kv.prefix {
                if p.get_ref().is_empty()
                    || p.get_ref().len() > 64
                    || p.get_ref().chars().any(|c| c.is_control() || c == '{' || c == '}')
                {
                    return Err(ck.at(p, "kv.prefix", "1-64 characters, no braces or control characters"));
                }
            }
            Ok(KvBackend::Redis(RedisSettings {
                url: text.clone(),
                pool: ck.range(&kv.pool, "kv.pool", 1, 64)?.unwrap_or(2),
                timeout: Duration::from_millis(ck.range(&kv.timeout_ms, "kv.timeout_ms", 1, 60_000)?.unwrap_or(250)),
                prefix: prefix.to_string(),
            }))
        }
        other => match &kv.backend {
            Some(b) => Err(ck.at(b, "kv.backend", format!("`{other}`: one of embedded, memory, redis"))),
            None => Ok(embedded_default()),
        },
    }
}

fn only<T>(ck: &Checker, backend: &str, key: &Option<Spanned<T>>, name: &str, owner: &str) -> Result<(), ConfigError> {
    match key {
        Some(k) if backend != owner => {
            Err(ck.at(k, &format!("kv.{name}"), format!("only for backend = \"{owner}\" (this is \"{backend}\")")))
        }
        _ => Ok(()),
    }
}

fn missing_url(ck: &Checker, at: Option<&Spanned<String>>) -> ConfigError {
    let message = "backend = \"redis\" needs url = \"redis://HOST:PORT[/DB]\" (or rediss:// for TLS)";
    match at {
        Some(at) => ck.at(at, "kv.url", message),
        None => ConfigError::Syntax { file: ck.file.to_string(), message: format!("[kv]: {message}") },
    }
}

/// The embedded store in the default directory (`/var/lib/evrhost` when
/// there is no home: a daemon that may not create it says so and stops).
fn embedded_default() -> KvBackend {
    let dir = default_dir().unwrap_or_else(|| "/var/lib/evrhost".into());
    KvBackend::Embedded { dir, durability: Durability::Sync }
}

fn with_durability(ck: &Checker, kv: &KvSection, backend: KvBackend) -> Result<KvBackend, ConfigError> {
    let KvBackend::Embedded { dir, .. } = backend else {
        return Ok(backend);
    };
    let flush = ck.millis(&kv.flush_ms, "kv.flush_ms")?;
    let durability = match kv.durability.as_ref().map(|d| (d, d.get_ref().as_str())) {
        None | Some((_, "sync")) => {
            if let Some(f) = &kv.flush_ms {
                return Err(ck.at(f, "kv.flush_ms", "only with durability = \"relaxed\""));
            }
            Durability::Sync
        }
        Some((_, "relaxed")) => Durability::Relaxed(Duration::from_millis(flush.unwrap_or(DEFAULT_FLUSH_MS))),
        Some((d, other)) => return Err(ck.at(d, "kv.durability", format!("`{other}`: sync or relaxed"))),
    };
    Ok(KvBackend::Embedded { dir, durability })
}
