//! One tenant's keys in this process, optionally mirrored to the journal.
//! The map answers every read; the journal only records. Each write is
//! numbered inside the space's lock, so for any key the journal's last
//! entry is the map's value.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use super::journal::Journal;
use super::{KeyValue, KvError, KvLimits, Ticket};
use crate::sync::lock;

struct Entry {
    value: Vec<u8>,
    /// The journal number of the write that set it (0: on disk already).
    ticket: Ticket,
}

/// One tenant's keys, and the bytes they and their values take.
#[derive(Default)]
struct Keys {
    map: HashMap<String, Entry>,
    bytes: usize,
    /// The last delete's number: a miss may be hiding a delete not yet on
    /// disk, so a read that misses depends on it.
    deleted: Ticket,
}

pub struct LocalSpace {
    tenant: String,
    limits: KvLimits,
    keys: Mutex<Keys>,
    journal: Option<Arc<Journal>>,
}

impl LocalSpace {
    /// A space holding `loaded` (read back from the journal). Loaded keys
    /// are kept even past lowered limits; only growth is refused then.
    pub(crate) fn new(
        tenant: &str,
        limits: KvLimits,
        journal: Option<Arc<Journal>>,
        loaded: Vec<(String, Vec<u8>)>,
    ) -> Self {
        let mut keys = Keys::default();
        for (key, value) in loaded {
            keys.bytes += key.len() + value.len();
            keys.map.insert(key, Entry { value, ticket: Ticket::NONE });
        }
        LocalSpace { tenant: tenant.to_string(), limits, keys: Mutex::new(keys), journal }
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, Keys> {
        // Each operation is one insert or remove plus a counter: a panic
        // cannot leave the map half-updated, so poison is harmless.
        lock(&self.keys)
    }

    fn check_key(&self, key: &str) -> Result<(), KvError> {
        if key.len() > self.limits.max_key_bytes {
            return Err(KvError::KeyTooLong { len: key.len(), max: self.limits.max_key_bytes });
        }
        Ok(())
    }

    /// Records a write in the journal (under the space's lock).
    fn record(&self, key: &str, value: Option<&[u8]>) -> Ticket {
        match &self.journal {
            Some(j) => j.record(&self.tenant, key, value),
            None => Ticket::NONE,
        }
    }

    /// The space's bytes once an entry of `old` bytes (0: none yet)
    /// becomes one of `new`, a value of `value` bytes: within the value
    /// cap and, when it grows, the budget (loaded keys may be past a
    /// lowered one: shrinking is allowed).
    fn resized(&self, total: usize, old: usize, new: usize, value: usize) -> Result<usize, KvError> {
        if value > self.limits.max_value_bytes {
            return Err(KvError::ValueTooLarge { len: value, max: self.limits.max_value_bytes });
        }
        let bytes = total - old + new;
        if bytes > self.limits.max_bytes && bytes > total {
            return Err(KvError::OverBudget { tenant: self.tenant.clone(), max: self.limits.max_bytes });
        }
        Ok(bytes)
    }

    fn insert(&self, keys: &mut Keys, key: &str, value: Vec<u8>) -> Result<Ticket, KvError> {
        let old = keys.map.get(key).map(|e| key.len() + e.value.len());
        let bytes = self.resized(keys.bytes, old.unwrap_or(0), key.len() + value.len(), value.len())?;
        if old.is_none() && keys.map.len() >= self.limits.max_keys {
            return Err(KvError::Full { tenant: self.tenant.clone(), max: self.limits.max_keys });
        }
        let ticket = self.record(key, Some(&value));
        keys.map.insert(key.to_string(), Entry { value, ticket });
        keys.bytes = bytes;
        Ok(ticket)
    }

    pub fn get(&self, key: &str) -> (Result<Option<Vec<u8>>, KvError>, Ticket) {
        if let Err(e) = self.check_key(key) {
            return (Err(e), Ticket::NONE);
        }
        let keys = self.keys();
        match keys.map.get(key) {
            Some(e) => (Ok(Some(e.value.clone())), e.ticket),
            None => (Ok(None), keys.deleted),
        }
    }

    pub fn set(&self, key: &str, value: Vec<u8>) -> (Result<(), KvError>, Ticket) {
        if let Err(e) = self.check_key(key) {
            return (Err(e), Ticket::NONE);
        }
        let mut keys = self.keys();
        split(self.insert(&mut keys, key, value).map(|t| ((), t)))
    }

    pub fn delete(&self, key: &str) -> (Result<bool, KvError>, Ticket) {
        if let Err(e) = self.check_key(key) {
            return (Err(e), Ticket::NONE);
        }
        let mut keys = self.keys();
        match keys.map.remove(key) {
            Some(entry) => {
                keys.bytes -= key.len() + entry.value.len();
                let ticket = self.record(key, None);
                keys.deleted = ticket;
                (Ok(true), ticket)
            }
            None => (Ok(false), keys.deleted),
        }
    }

    /// A counter is decimal text (as Redis keeps it), rewritten in place:
    /// one lookup, no allocation once the key exists.
    pub fn incr(&self, key: &str, delta: i64) -> (Result<i64, KvError>, Ticket) {
        if let Err(e) = self.check_key(key) {
            return (Err(e), Ticket::NONE);
        }
        let mut guard = self.keys();
        let keys = &mut *guard;
        let Some(entry) = keys.map.get_mut(key) else {
            return split(self.insert(keys, key, delta.to_string().into_bytes()).map(|t| (delta, t)));
        };
        let current = std::str::from_utf8(&entry.value)
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .ok_or_else(|| KvError::NotANumber { key: key.to_string() });
        let next = match current
            .and_then(|n| n.checked_add(delta).ok_or_else(|| KvError::Overflow { key: key.to_string() }))
        {
            Ok(n) => n,
            Err(e) => return (Err(e), Ticket::NONE),
        };
        let mut digits = itoa::Buffer::new();
        let text = digits.format(next).as_bytes();
        let bytes = match self.resized(keys.bytes, entry.value.len(), text.len(), text.len()) {
            Ok(bytes) => bytes,
            Err(e) => return (Err(e), Ticket::NONE),
        };
        let ticket = self.record(key, Some(text));
        entry.value.clear();
        entry.value.extend_from_slice(text);
        entry.ticket = ticket;
        keys.bytes = bytes;
        (Ok(next), ticket)
    }

    /// Up to `limit` keys starting with `prefix`, in key order.
    pub fn list(&self, prefix: &str, limit: usize) -> Vec<KeyValue> {
        let keys = self.keys();
        // The smallest `limit` matches, without sorting the whole map.
        let mut best: BTreeMap<&str, &[u8]> = BTreeMap::new();
        for (k, e) in keys.map.iter().filter(|(k, _)| k.starts_with(prefix)) {
            if best.len() < limit {
                best.insert(k, &e.value);
            } else if let Some((&last, _)) = best.last_key_value() {
                if k.as_str() < last {
                    best.pop_last();
                    best.insert(k, &e.value);
                }
            }
        }
        best.into_iter().map(|(k, v)| KeyValue { key: k.to_string(), value: v.to_vec() }).collect()
    }

    pub async fn durable(&self, ticket: Ticket) -> Result<(), KvError> {
        match &self.journal {
            Some(j) if ticket != Ticket::NONE => j.durable(ticket).await,
            _ => Ok(()),
        }
    }
}

fn split<T>(r: Result<(T, Ticket), KvError>) -> (Result<T, KvError>, Ticket) {
    match r {
        Ok((v, t)) => (Ok(v), t),
        Err(e) => (Err(e), Ticket::NONE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space(limits: KvLimits) -> LocalSpace {
        LocalSpace::new("t", limits, None, Vec::new())
    }

    #[test]
    fn incr_counts_and_refuses_garbage_and_overflow() {
        let kv = space(KvLimits::default());
        assert_eq!(kv.incr("a", 2).0, Ok(2));
        assert_eq!(kv.incr("a", 3).0, Ok(5));
        kv.set("b", b"abc".to_vec()).0.unwrap();
        assert_eq!(kv.incr("b", 1).0, Err(KvError::NotANumber { key: "b".into() }));
        kv.set("c", i64::MAX.to_string().into_bytes()).0.unwrap();
        assert_eq!(kv.incr("c", 1).0, Err(KvError::Overflow { key: "c".into() }));
        assert_eq!(kv.get("c").0, Ok(Some(i64::MAX.to_string().into_bytes())), "a refused incr leaves the value");
        kv.set("d", b" 41 ".to_vec()).0.unwrap();
        assert_eq!(kv.incr("d", -50).0, Ok(-9));
        assert_eq!(kv.get("d").0, Ok(Some(b"-9".to_vec())));
    }

    #[test]
    fn a_counter_growing_in_place_keeps_the_byte_budget() {
        // "a" + "9" is 2 bytes; "a" + "10" is 3: over a budget of 2.
        let kv = space(KvLimits { max_keys: 10, max_key_bytes: 8, max_value_bytes: 8, max_bytes: 2 });
        assert_eq!(kv.incr("a", 9).0, Ok(9));
        assert!(matches!(kv.incr("a", 1).0, Err(KvError::OverBudget { .. })));
        assert_eq!(kv.incr("a", -9).0, Ok(0), "shrinking is allowed");
        assert_eq!(kv.incr("a", 5).0, Ok(5));
        let kv = space(KvLimits { max_keys: 10, max_key_bytes: 8, max_value_bytes: 2, max_bytes: 100 });
        assert_eq!(kv.incr("b", 99).0, Ok(99));
        assert!(matches!(kv.incr("b", 1).0, Err(KvError::ValueTooLarge { len: 3, max: 2 })));
    }

    #[test]
    fn limits_hold() {
        let kv = space(KvLimits { max_keys: 2, max_key_bytes: 4, max_value_bytes: 3, max_bytes: 1 << 20 });
        assert!(matches!(kv.set("toolong", vec![]).0, Err(KvError::KeyTooLong { .. })));
        assert!(matches!(kv.set("a", vec![0; 4]).0, Err(KvError::ValueTooLarge { .. })));
        kv.set("a", vec![1]).0.unwrap();
        kv.set("b", vec![1]).0.unwrap();
        kv.set("a", vec![2]).0.unwrap(); // overwriting needs no new slot
        assert!(matches!(kv.set("c", vec![1]).0, Err(KvError::Full { .. })));
        assert_eq!(kv.delete("a").0, Ok(true));
        kv.set("c", vec![1]).0.unwrap();
    }

    #[test]
    fn the_byte_budget_counts_keys_and_values_and_frees_on_delete() {
        let limits = KvLimits { max_keys: 100, max_key_bytes: 16, max_value_bytes: 64, max_bytes: 100 };
        let kv = space(limits);
        kv.set("aaaa", vec![0; 60]).0.unwrap(); // 64 bytes
        assert_eq!(kv.set("bbbb", vec![0; 40]).0, Err(KvError::OverBudget { tenant: "t".into(), max: 100 }));
        kv.set("aaaa", vec![0; 10]).0.unwrap(); // shrinking frees room
        kv.set("bbbb", vec![0; 40]).0.unwrap(); // 14 + 44 = 58
        assert!(matches!(kv.set("cccc", vec![0; 40]).0, Err(KvError::OverBudget { .. })));
        assert_eq!(kv.delete("bbbb").0, Ok(true));
        kv.set("cccc", vec![0; 40]).0.unwrap();
        assert_eq!(kv.incr("n", 1).0, Ok(1), "a counter fits in what is left");
    }

    #[test]
    fn keys_loaded_past_a_lowered_budget_stay_and_may_shrink() {
        let limits = KvLimits { max_keys: 1, max_key_bytes: 16, max_value_bytes: 64, max_bytes: 10 };
        let kv = LocalSpace::new("t", limits, None, vec![("a".into(), vec![0; 20]), ("b".into(), vec![0; 20])]);
        assert_eq!(kv.get("a").0, Ok(Some(vec![0; 20])));
        assert!(matches!(kv.set("c", vec![]).0, Err(KvError::OverBudget { .. })));
        kv.set("a", vec![1]).0.unwrap();
        assert!(matches!(kv.set("a", vec![1; 30]).0, Err(KvError::OverBudget { .. })));
    }

    #[test]
    fn listing_is_bounded_ordered_and_by_prefix() {
        let kv = space(KvLimits::default());
        for k in ["user:c", "user:a", "route:x", "user:b", "user:d"] {
            kv.set(k, k.as_bytes().to_vec()).0.unwrap();
        }
        let keys: Vec<String> = kv.list("user:", 3).into_iter().map(|kv| kv.key).collect();
        assert_eq!(keys, ["user:a", "user:b", "user:c"]);
        assert_eq!(kv.list("", 100).len(), 5);
        assert!(kv.list("nope", 10).is_empty());
    }
}
