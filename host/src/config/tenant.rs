//! `[[tenant]]`: each tenant's kv limits, which events its plugins may
//! fire and subscribe to, and which messages they may send to an engine.

use std::collections::HashMap;

use serde::Deserialize;
use toml::Spanned;

use super::checker::{valid_name, Checker};
use super::ConfigError;
use crate::kv::KvLimits;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TenantSection {
    name: Spanned<String>,
    kv_max_keys: Option<Spanned<usize>>,
    kv_max_key_bytes: Option<Spanned<usize>>,
    kv_max_value_bytes: Option<Spanned<usize>>,
    kv_max_bytes: Option<Spanned<usize>>,
    events_fire: Option<Vec<String>>,
    events_subscribe: Option<Vec<String>>,
    messages: Option<Vec<Spanned<String>>>,
}

/// A tenant: its kv limits and which events its plugins may fire and
/// subscribe to.
#[derive(Clone, Debug)]
pub struct Tenant {
    pub kv: KvLimits,
    pub fire: EventAcl,
    pub subscribe: EventAcl,
    /// Message names its plugins may send to an engine (`messages`).
    pub messages: NameAcl,
}

impl Tenant {
    /// The default tenant may fire and subscribe to anything.
    fn default_tenant() -> Tenant {
        Tenant {
            kv: KvLimits::default(),
            fire: EventAcl::new(vec!["ALL".into()]),
            subscribe: EventAcl::new(vec!["ALL".into()]),
            messages: NameAcl::all(),
        }
    }

    /// A named tenant, unless configured otherwise, only its own CUSTOM
    /// subclasses: `CUSTOM:<tenant>::…`.
    fn named(name: &str) -> Tenant {
        let own = EventAcl::new(vec![format!("CUSTOM:{name}::")]);
        Tenant { kv: KvLimits::default(), fire: own.clone(), subscribe: own, messages: NameAcl::default() }
    }
}

/// Event names a tenant may use: `ALL`, an exact `NAME`, or
/// `CUSTOM:PREFIX` for CUSTOM events whose subclass starts with PREFIX.
#[derive(Clone, Debug)]
pub struct EventAcl {
    entries: Vec<String>,
}

impl EventAcl {
    pub fn new(entries: Vec<String>) -> EventAcl {
        EventAcl { entries }
    }

    /// Whether `name` (with `subclass`) is allowed. Subscribing to `ALL`,
    /// or to CUSTOM without a subclass, needs `ALL`.
    pub fn allows(&self, name: &str, subclass: Option<&str>) -> bool {
        self.entries.iter().any(|e| {
            e == "ALL"
                || (e == name && name != "CUSTOM" && name != "ALL")
                || match (e.strip_prefix("CUSTOM:"), subclass) {
                    (Some(prefix), Some(sub)) => name == "CUSTOM" && sub.starts_with(prefix),
                    _ => false,
                }
        })
    }
}

/// Names a tenant may use: `ALL`, an exact name, or `PREFIX*` for every
/// name starting with PREFIX. Empty (a named tenant's default): none.
#[derive(Clone, Debug, Default)]
pub struct NameAcl {
    entries: Vec<String>,
}

impl NameAcl {
    pub fn all() -> NameAcl {
        NameAcl { entries: vec!["ALL".into()] }
    }

    pub fn allows(&self, name: &str) -> bool {
        self.entries.iter().any(|e| match e.strip_suffix('*') {
            _ if e == "ALL" => true,
            Some(prefix) => name.starts_with(prefix),
            None => e == name,
        })
    }
}

/// Every tenant by name; `default` always exists.
pub(super) fn check(ck: &Checker, sections: &[TenantSection]) -> Result<HashMap<String, Tenant>, ConfigError> {
    let mut tenants = HashMap::new();
    tenants.insert("default".to_string(), Tenant::default_tenant());
    for t in sections {
        let name = t.name.get_ref();
        if !valid_name(name) {
            return Err(ck.at(&t.name, "tenant.name", "use 1-64 letters, digits, `_`, `-` or `.`"));
        }
        let d = KvLimits::default();
        let kv = KvLimits {
            max_keys: ck.range(&t.kv_max_keys, "tenant.kv_max_keys", 0, 100_000_000)?.unwrap_or(d.max_keys),
            max_key_bytes: ck
                .range(&t.kv_max_key_bytes, "tenant.kv_max_key_bytes", 1, 65_536)?
                .unwrap_or(d.max_key_bytes),
            max_value_bytes: ck
                .range(&t.kv_max_value_bytes, "tenant.kv_max_value_bytes", 0, 64 << 20)?
                .unwrap_or(d.max_value_bytes),
            max_bytes: ck.range(&t.kv_max_bytes, "tenant.kv_max_bytes", 0, 1 << 40)?.unwrap_or(d.max_bytes),
        };
        let fallback = if name == "default" { Tenant::default_tenant() } else { Tenant::named(name) };
        let messages = match &t.messages {
            None => fallback.messages,
            Some(list) => {
                let mut entries = Vec::with_capacity(list.len());
                for m in list {
                    let e = m.get_ref();
                    if e.is_empty() || e.len() > 128 || e.bytes().any(|b| b < 0x21 || b == b':') {
                        return Err(ck.at(
                            m,
                            "tenant.messages",
                            "a message name or `PREFIX*`: 1-128 bytes, no blanks, no `:`",
                        ));
                    }
                    entries.push(e.clone());
                }
                NameAcl { entries }
            }
        };
        let tenant = Tenant {
            messages,
            kv,
            fire: t.events_fire.clone().map_or(fallback.fire, EventAcl::new),
            subscribe: t.events_subscribe.clone().map_or(fallback.subscribe, EventAcl::new),
        };
        if tenants.insert(name.clone(), tenant).is_some() && name != "default" {
            return Err(ck.at(&t.name, "tenant.name", format!("tenant `{name}` is defined twice")));
        }
    }
    Ok(tenants)
}
