//! Tenant-scoped key-value spaces, each within its tenant's key count and
//! byte budget, on one of three backends:
//!
//! - `memory`: a map per tenant; gone when the daemon stops.
//! - `embedded` (the default): the same maps, mirrored to a redb file by
//!   one committer thread ([`journal`]). Every write is numbered; a call
//!   that wrote (or read a value not yet on disk) waits for the commit that
//!   covers its number before its reply leaves, so an acknowledged write
//!   survives `kill -9`. Writes of concurrent calls share one commit.
//! - `redis`: a hash per tenant on a Redis or Valkey server that several
//!   nodes share ([`remote`]); quotas are kept by server-side scripts.
//!
//! A plugin sees none of this: the `kv` import works the same on each.
//! Adding a backend is one more [`KvSpace`] variant and its arm in
//! [`KvStore::space`].

pub mod journal;
mod local;
pub mod remote;
mod wal;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use journal::{Durability, Journal, JournalError};
pub use local::LocalSpace;
pub use remote::{RedisSettings, RedisSpace, RemoteStore};
pub use wal::WalError;

use crate::sync::lock;

#[derive(Clone, Copy, Debug)]
pub struct KvLimits {
    pub max_keys: usize,
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// Keys and values together, the tenant's budget.
    pub max_bytes: usize,
}

impl Default for KvLimits {
    fn default() -> Self {
        KvLimits { max_keys: 100_000, max_key_bytes: 1024, max_value_bytes: 1 << 20, max_bytes: 64 << 20 }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvError {
    #[error("tenant `{tenant}` has {max} keys already")]
    Full { tenant: String, max: usize },
    #[error("tenant `{tenant}` would hold more than its {max} bytes of keys and values")]
    OverBudget { tenant: String, max: usize },
    #[error("key of {len} bytes is over the limit of {max}")]
    KeyTooLong { len: usize, max: usize },
    #[error("value of {len} bytes is over the limit of {max}")]
    ValueTooLarge { len: usize, max: usize },
    #[error("value of `{key}` is not a decimal integer")]
    NotANumber { key: String },
    #[error("counter `{key}` would overflow")]
    Overflow { key: String },
    /// The store could not take the write or read (disk, server): the
    /// call is not acknowledged, and it may be retried.
    #[error("kv store unavailable: {reason}")]
    Unavailable { reason: String },
}

impl KvError {
    /// Whether the fault is the store's rather than the request's.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, KvError::Unavailable { .. })
    }
}

/// A write's number in the embedded store's journal: the reply of a call
/// that holds one waits until [`KvSpace::durable`] says it is on disk.
/// `Ticket::NONE` waits for nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(pub(crate) u64);

impl Ticket {
    pub const NONE: Ticket = Ticket(0);
}

/// One key as an operator's listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
}

/// One tenant's keys on the daemon's backend.
pub enum KvSpace {
    Local(LocalSpace),
    Remote(RedisSpace),
}

impl KvSpace {
    /// Whether every operation is answered in this process, without waiting.
    pub fn is_local(&self) -> bool {
        matches!(self, KvSpace::Local(_))
    }

    /// The in-process space, whose operations are synchronous.
    pub fn local(&self) -> Option<&LocalSpace> {
        match self {
            KvSpace::Local(s) => Some(s),
            KvSpace::Remote(_) => None,
        }
    }

    pub async fn get(&self, key: &str) -> (Result<Option<Vec<u8>>, KvError>, Ticket) {
        match self {
            KvSpace::Local(s) => s.get(key),
            KvSpace::Remote(s) => (s.get(key).await, Ticket::NONE),
        }
    }

    pub async fn set(&self, key: &str, value: Vec<u8>) -> (Result<(), KvError>, Ticket) {
        match self {
            KvSpace::Local(s) => s.set(key, value),
            KvSpace::Remote(s) => (s.set(key, value).await, Ticket::NONE),
        }
    }

    pub async fn delete(&self, key: &str) -> (Result<bool, KvError>, Ticket) {
        match self {
            KvSpace::Local(s) => s.delete(key),
            KvSpace::Remote(s) => (s.delete(key).await, Ticket::NONE),
        }
    }

    pub async fn incr(&self, key: &str, delta: i64) -> (Result<i64, KvError>, Ticket) {
        match self {
            KvSpace::Local(s) => s.incr(key, delta),
            KvSpace::Remote(s) => (s.incr(key, delta).await, Ticket::NONE),
        }
    }

    /// Up to `limit` keys starting with `prefix`, in key order.
    pub async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<KeyValue>, KvError> {
        match self {
            KvSpace::Local(s) => Ok(s.list(prefix, limit)),
            KvSpace::Remote(s) => s.list(prefix, limit).await,
        }
    }

    /// Waits until every write up to `ticket` is on disk (at once on a
    /// backend without a journal, or with a relaxed one).
    pub async fn durable(&self, ticket: Ticket) -> Result<(), KvError> {
        match self {
            KvSpace::Local(s) => s.durable(ticket).await,
            KvSpace::Remote(_) => Ok(()),
        }
    }
}

/// Which backend, and its settings, as `[kv]` gives them.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum KvBackend {
    #[default]
    Memory,
    Embedded {
        dir: PathBuf,
        durability: Durability,
    },
    Redis(RedisSettings),
}

/// Where the embedded store lives when `[kv] dir` is not given:
/// `$XDG_STATE_HOME/evrhost`, else `~/.local/state/evrhost`.
pub fn default_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .map(|base| base.join("evrhost"))
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("kv: {0}")]
    Redis(#[from] remote::RemoteError),
}

enum Backing {
    Memory,
    Journal(Arc<Journal>),
    Redis(Arc<RemoteStore>),
}

/// All tenants' spaces, created on first use with the tenant's limits.
pub struct KvStore {
    backing: Backing,
    spaces: Mutex<HashMap<String, Arc<KvSpace>>>,
    /// Keys read back from the journal at open, by tenant, until the
    /// tenant's space is made.
    loaded: Mutex<journal::Loaded>,
}

impl Default for KvStore {
    fn default() -> Self {
        KvStore { backing: Backing::Memory, spaces: Mutex::default(), loaded: Mutex::default() }
    }
}

impl KvStore {
    /// Opens the backend. The embedded store is read whole here: a store
    /// that cannot be opened or read stops the daemon rather than letting
    /// it start empty.
    pub fn open(backend: &KvBackend) -> Result<KvStore, OpenError> {
        match backend {
            KvBackend::Memory => Ok(KvStore::default()),
            KvBackend::Embedded { dir, durability } => {
                let (journal, loaded) = Journal::open(dir, *durability)?;
                Ok(KvStore {
                    backing: Backing::Journal(Arc::new(journal)),
                    spaces: Mutex::default(),
                    loaded: Mutex::new(loaded),
                })
            }
            KvBackend::Redis(settings) => Ok(KvStore {
                backing: Backing::Redis(Arc::new(RemoteStore::connect(settings)?)),
                spaces: Mutex::default(),
                loaded: Mutex::default(),
            }),
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match &self.backing {
            Backing::Memory => "memory",
            Backing::Journal(_) => "embedded",
            Backing::Redis(_) => "redis",
        }
    }

    pub fn space(&self, tenant: &str, limits: KvLimits) -> Arc<KvSpace> {
        let mut spaces = lock(&self.spaces);
        spaces
            .entry(tenant.to_string())
            .or_insert_with(|| {
                Arc::new(match &self.backing {
                    Backing::Memory => KvSpace::Local(LocalSpace::new(tenant, limits, None, Vec::new())),
                    Backing::Journal(journal) => {
                        let keys = lock(&self.loaded).remove(tenant).unwrap_or_default();
                        KvSpace::Local(LocalSpace::new(tenant, limits, Some(journal.clone()), keys))
                    }
                    Backing::Redis(store) => KvSpace::Remote(store.space(tenant, limits)),
                })
            })
            .clone()
    }

    /// Counters of the store's health, for `/metrics`.
    pub fn metrics(&self) -> KvMetrics {
        match &self.backing {
            Backing::Memory => KvMetrics::default(),
            Backing::Journal(j) => j.metrics(),
            Backing::Redis(r) => r.metrics(),
        }
    }

    /// Commits what is pending and stops the committer (on shutdown).
    pub fn close(&self, within: Duration) {
        if let Backing::Journal(journal) = &self.backing {
            journal.close(within);
        }
    }
}

/// The store's health as `/metrics` shows it.
#[derive(Debug, Default, Clone, Copy)]
pub struct KvMetrics {
    pub commits: u64,
    pub committed_writes: u64,
    pub errors: u64,
}
