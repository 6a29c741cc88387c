//! Tenant-scoped key-value spaces, each within its tenant's key count and
//! byte budget. In memory: they outlive plugin reloads but not the daemon.

use crate::sync::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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
}

/// One tenant's keys, and the bytes they and their values take.
#[derive(Default)]
struct Keys {
    map: HashMap<String, Vec<u8>>,
    bytes: usize,
}

/// One tenant's keys.
pub struct KvSpace {
    tenant: String,
    limits: KvLimits,
    map: Mutex<Keys>,
}

impl KvSpace {
    pub fn new(tenant: &str, limits: KvLimits) -> Self {
        KvSpace { tenant: tenant.to_string(), limits, map: Mutex::new(Keys::default()) }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, Keys> {
        // A panic while holding the lock cannot leave the map half-updated
        // (each operation is one insert or remove), so poison is harmless.
        lock(&self.map)
    }

    fn check_key(&self, key: &str) -> Result<(), KvError> {
        if key.len() > self.limits.max_key_bytes {
            return Err(KvError::KeyTooLong { len: key.len(), max: self.limits.max_key_bytes });
        }
        Ok(())
    }

    fn insert(&self, keys: &mut Keys, key: &str, value: Vec<u8>) -> Result<(), KvError> {
        if value.len() > self.limits.max_value_bytes {
            return Err(KvError::ValueTooLarge { len: value.len(), max: self.limits.max_value_bytes });
        }
        let old = keys.map.get(key).map(|v| key.len() + v.len());
        let bytes = keys.bytes - old.unwrap_or(0) + key.len() + value.len();
        if bytes > self.limits.max_bytes {
            return Err(KvError::OverBudget { tenant: self.tenant.clone(), max: self.limits.max_bytes });
        }
        if old.is_none() && keys.map.len() >= self.limits.max_keys {
            return Err(KvError::Full { tenant: self.tenant.clone(), max: self.limits.max_keys });
        }
        keys.map.insert(key.to_string(), value);
        keys.bytes = bytes;
        Ok(())
    }

    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        self.check_key(key)?;
        Ok(self.map().map.get(key).cloned())
    }

    pub fn set(&self, key: &str, value: Vec<u8>) -> Result<(), KvError> {
        self.check_key(key)?;
        let mut map = self.map();
        self.insert(&mut map, key, value)
    }

    pub fn delete(&self, key: &str) -> Result<bool, KvError> {
        self.check_key(key)?;
        let mut keys = self.map();
        let removed = keys.map.remove(key);
        if let Some(value) = &removed {
            keys.bytes -= key.len() + value.len();
        }
        Ok(removed.is_some())
    }

    pub fn incr(&self, key: &str, delta: i64) -> Result<i64, KvError> {
        self.check_key(key)?;
        let mut map = self.map();
        let current = match map.map.get(key) {
            None => 0,
            Some(raw) => std::str::from_utf8(raw)
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .ok_or_else(|| KvError::NotANumber { key: key.to_string() })?,
        };
        let next = current.checked_add(delta).ok_or_else(|| KvError::Overflow { key: key.to_string() })?;
        self.insert(&mut map, key, next.to_string().into_bytes())?;
        Ok(next)
    }
}

/// All tenants' spaces, created on first use with the tenant's limits.
#[derive(Default)]
pub struct KvStore {
    spaces: Mutex<HashMap<String, Arc<KvSpace>>>,
}

impl KvStore {
    pub fn space(&self, tenant: &str, limits: KvLimits) -> Arc<KvSpace> {
        let mut spaces = lock(&self.spaces);
        spaces.entry(tenant.to_string()).or_insert_with(|| Arc::new(KvSpace::new(tenant, limits))).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incr_counts_and_refuses_garbage_and_overflow() {
        let kv = KvSpace::new("t", KvLimits::default());
        assert_eq!(kv.incr("a", 2), Ok(2));
        assert_eq!(kv.incr("a", 3), Ok(5));
        kv.set("b", b"abc".to_vec()).unwrap();
        assert_eq!(kv.incr("b", 1), Err(KvError::NotANumber { key: "b".into() }));
        kv.set("c", i64::MAX.to_string().into_bytes()).unwrap();
        assert_eq!(kv.incr("c", 1), Err(KvError::Overflow { key: "c".into() }));
    }

    #[test]
    fn limits_hold() {
        let kv = KvSpace::new("t", KvLimits { max_keys: 2, max_key_bytes: 4, max_value_bytes: 3, max_bytes: 1 << 20 });
        assert!(matches!(kv.set("toolong", vec![]), Err(KvError::KeyTooLong { .. })));
        assert!(matches!(kv.set("a", vec![0; 4]), Err(KvError::ValueTooLarge { .. })));
        kv.set("a", vec![1]).unwrap();
        kv.set("b", vec![1]).unwrap();
        kv.set("a", vec![2]).unwrap(); // overwriting needs no new slot
        assert!(matches!(kv.set("c", vec![1]), Err(KvError::Full { .. })));
        assert_eq!(kv.delete("a"), Ok(true));
        kv.set("c", vec![1]).unwrap();
    }

    #[test]
    fn the_byte_budget_counts_keys_and_values_and_frees_on_delete() {
        let limits = KvLimits { max_keys: 100, max_key_bytes: 16, max_value_bytes: 64, max_bytes: 100 };
        let kv = KvSpace::new("t", limits);
        kv.set("aaaa", vec![0; 60]).unwrap(); // 64 bytes
        assert_eq!(kv.set("bbbb", vec![0; 40]), Err(KvError::OverBudget { tenant: "t".into(), max: 100 }));
        kv.set("aaaa", vec![0; 10]).unwrap(); // shrinking frees room
        kv.set("bbbb", vec![0; 40]).unwrap(); // 14 + 44 = 58
        assert!(matches!(kv.set("cccc", vec![0; 40]), Err(KvError::OverBudget { .. })));
        assert_eq!(kv.delete("bbbb"), Ok(true));
        kv.set("cccc", vec![0; 40]).unwrap();
        assert_eq!(kv.incr("n", 1), Ok(1), "a counter fits in what is left");
    }
}
