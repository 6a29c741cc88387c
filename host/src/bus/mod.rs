//! The event bus: events fired by plugins, raised by evrhost about itself
//! (thresholds, pool scaling, disconnects, log lines, profiling) or sent by
//! peers, delivered to subscribers — plugins (their `subscriber` export)
//! and external JSON-RPC sinks over UDP and TCP, as OpenSIPS's
//! event_datagram and event_stream deliver them.
//!
//! Invariants:
//! - `fire` never blocks and never fails because of a subscriber. Each
//!   subscriber has a bounded queue and a delivery task of its own; a full
//!   queue drops the event for that subscriber alone and counts it.
//! - An event gets its standard headers once, when fired, before any
//!   subscriber sees it; a plugin cannot forge them.
//! - An expired subscription stops matching at once; housekeeping removes
//!   it, and a subscriber left with none is removed with its task.

mod filter;
pub mod log_layer;
mod profile;
pub mod sink;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::mpsc;

pub use filter::Filters;
pub use profile::Profiler;

use crate::dispatcher::Dispatcher;
use crate::runtime::Event;

/// Subscriptions one subscriber may hold; past this `subscribe` fails, so a
/// plugin or a peer cannot grow the bus without bound.
pub const MAX_SUBSCRIPTIONS: usize = 1024;

/// Headers the bus sets on every event; anything a plugin put under these
/// names is replaced.
const STANDARD: [&str; 11] = [
    "Event-Name",
    "Event-Subclass",
    "Core-UUID",
    "Hostname",
    "Event-Date-Local",
    "Event-Date-GMT",
    "Event-Date-Timestamp",
    "Event-Calling-File",
    "Event-Calling-Function",
    "Event-Calling-Line-Number",
    "Event-Sequence",
];

/// An event as written in subscriptions: `NAME`, or `CUSTOM:SUBCLASS`
/// (subclasses such as `acme::login` hold colons of their own).
pub fn split_event(event: &str) -> (&str, Option<&str>) {
    match event.split_once(':') {
        Some((name, subclass)) if !subclass.is_empty() => (name, Some(subclass)),
        _ => (event.trim_end_matches(':'), None),
    }
}

/// Event names only the host raises.
pub fn reserved(name: &str) -> bool {
    name.starts_with("E_CORE_")
        || name.starts_with("E_PROFILING_")
        || matches!(name, "HEARTBEAT" | "BACKGROUND_JOB" | "PLUGIN_LOAD" | "PLUGIN_RELOAD" | "PLUGIN_FAIL")
}

/// Who fired an event: `Event-Calling-File/Function/Line-Number`.
#[derive(Clone, Debug)]
pub struct Caller {
    pub file: String,
    pub function: String,
    pub line: u32,
}

impl Caller {
    pub fn host(function: &str) -> Caller {
        Caller { file: "evrhost".into(), function: function.into(), line: 0 }
    }
}

/// Where a subscriber's events go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Plugin(String),
    /// event_datagram: one JSON-RPC notification per datagram.
    Udp(SocketAddr),
    /// event_stream: JSON-RPC notifications back to back on one TCP
    /// connection; `method` replaces the event name when given.
    Tcp {
        addr: SocketAddr,
        method: Option<String>,
    },
    /// A front-end's own consumer (an Erlang node's event handler).
    Channel(ChannelSink),
}

/// Delivery to a front-end: `deliver` gets each event (true: delivered).
/// Two sinks are the same target when their ids are equal.
#[derive(Clone)]
pub struct ChannelSink {
    pub id: String,
    pub deliver: Arc<dyn Fn(&Event) -> bool + Send + Sync>,
}

impl ChannelSink {
    pub fn new(id: String, deliver: impl Fn(&Event) -> bool + Send + Sync + 'static) -> ChannelSink {
        ChannelSink { id, deliver: Arc::new(deliver) }
    }
}

impl PartialEq for ChannelSink {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for ChannelSink {}

impl std::fmt::Debug for ChannelSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChannelSink({})", self.id)
    }
}

impl Target {
    /// `udp:HOST:PORT` or `tcp:HOST:PORT[/METHOD]`, as OpenSIPS writes
    /// sockets; HOST is an IP address.
    pub fn parse(socket: &str) -> Result<Target, String> {
        let (proto, rest) = socket
            .split_once(':')
            .ok_or_else(|| format!("`{socket}`: expected udp:IP:PORT or tcp:IP:PORT[/METHOD]"))?;
        let (hostport, method) = match (proto, rest.split_once('/')) {
            ("tcp", Some((hp, m))) if !m.is_empty() => (hp, Some(m.to_string())),
            _ => (rest, None),
        };
        let addr = crate::config::parse_sockaddr(&format!("udp:{hostport}"))
            .map_err(|e| e.replace("udp:", &format!("{proto}:")))?;
        match proto {
            "udp" => Ok(Target::Udp(addr)),
            "tcp" => Ok(Target::Tcp { addr, method }),
            other => Err(format!("`{socket}`: unknown transport `{other}` (udp or tcp)")),
        }
    }

    pub fn id(&self) -> String {
        match self {
            Target::Plugin(name) => format!("plugin:{name}"),
            Target::Udp(addr) => format!("udp:{addr}"),
            Target::Tcp { addr, method: None } => format!("tcp:{addr}"),
            Target::Tcp { addr, method: Some(m) } => format!("tcp:{addr}/{m}"),
            Target::Channel(sink) => sink.id.clone(),
        }
    }
}

#[derive(Clone, Debug)]
struct Subscription {
    /// An event name, or `ALL`.
    name: String,
    subclass: Option<String>,
    expires: Option<Instant>,
}

impl Subscription {
    fn matches(&self, event: &Event, now: Instant) -> bool {
        self.expires.is_none_or(|t| t > now)
            && (self.name == "ALL" || self.name == event.name)
            && (self.subclass.is_none() || self.subclass == event.subclass)
    }
}

pub struct Subscriber {
    pub target: Target,
    subscriptions: Mutex<Vec<Subscription>>,
    filters: Mutex<Filters>,
    tx: mpsc::Sender<Arc<Event>>,
    pub delivered: AtomicU64,
    /// Dropped because the subscriber's queue was full.
    pub overflow: AtomicU64,
    /// Delivery attempts that failed (an unreachable peer, a plugin error).
    pub failed: AtomicU64,
}

impl Subscriber {
    fn wants(&self, event: &Event, now: Instant) -> bool {
        let subscribed = lock(&self.subscriptions).iter().any(|s| s.matches(event, now));
        subscribed && lock(&self.filters).passes(event)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update under these locks is one push, retain or clear.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Serialize)]
pub struct SubscriberInfo {
    pub target: String,
    pub events: Vec<String>,
    pub filters: usize,
    pub queued: usize,
    pub delivered: u64,
    pub overflow: u64,
    pub failed: u64,
}

pub struct Bus {
    core_uuid: String,
    hostname: String,
    sequence: AtomicU64,
    subscribers: ArcSwap<Vec<Arc<Subscriber>>>,
    admin: Mutex<()>,
    queue: usize,
    dispatcher: OnceLock<Weak<Dispatcher>>,
    /// (second, local, GMT) of the last event's dates.
    dates: Mutex<(u64, String, String)>,
    /// The daemon's main runtime: delivery tasks and background jobs run
    /// there, whichever thread (the RPC thread's) starts them.
    runtime: tokio::runtime::Handle,
}

impl Bus {
    /// `queue`: events waiting per subscriber before overflow. Must be
    /// called inside the runtime that is to run the bus's tasks (`spawn`).
    pub fn new(queue: usize) -> Arc<Bus> {
        let hostname =
            nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into());
        Arc::new(Bus {
            core_uuid: uuid::Uuid::new_v4().to_string(),
            hostname,
            sequence: AtomicU64::new(0),
            subscribers: ArcSwap::from_pointee(Vec::new()),
            admin: Mutex::new(()),
            queue: queue.max(1),
            dispatcher: OnceLock::new(),
            dates: Mutex::new((0, String::new(), String::new())),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// Runs `task` on the daemon's main runtime, whatever thread asks.
    pub fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        drop(self.runtime.spawn(task));
    }

    /// Plugin subscribers are delivered through the dispatcher.
    pub fn attach(&self, dispatcher: Weak<Dispatcher>) {
        let _ = self.dispatcher.set(dispatcher);
    }

    /// Adds the standard headers and hands the event to every subscriber
    /// that wants it.
    pub fn fire(&self, mut event: Event, caller: &Caller) {
        let subscribers = self.subscribers.load();
        let sequence = self.sequence.fetch_add(1, Relaxed) + 1;
        if subscribers.is_empty() {
            return;
        }
        event.headers.retain(|(k, _)| !STANDARD.iter().any(|s| s.eq_ignore_ascii_case(k)));
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let (local, gmt) = self.dates(now.as_secs());
        let h = &mut event.headers;
        h.push(("Event-Name".into(), event.name.clone()));
        if let Some(subclass) = &event.subclass {
            h.push(("Event-Subclass".into(), subclass.clone()));
        }
        h.push(("Core-UUID".into(), self.core_uuid.clone()));
        h.push(("Hostname".into(), self.hostname.clone()));
        h.push(("Event-Date-Local".into(), local));
        h.push(("Event-Date-GMT".into(), gmt));
        h.push(("Event-Date-Timestamp".into(), now.as_micros().to_string()));
        h.push(("Event-Calling-File".into(), caller.file.clone()));
        h.push(("Event-Calling-Function".into(), caller.function.clone()));
        h.push(("Event-Calling-Line-Number".into(), caller.line.to_string()));
        h.push(("Event-Sequence".into(), sequence.to_string()));
        let event = Arc::new(event);
        let now = Instant::now();
        for sub in subscribers.iter() {
            if !sub.wants(&event, now) {
                continue;
            }
            if sub.tx.try_send(event.clone()).is_err() {
                sub.overflow.fetch_add(1, Relaxed);
            }
        }
    }

    /// Event-Date-Local and Event-Date-GMT for a second since the epoch.
    /// Formatting them (and finding the local zone) costs microseconds, so
    /// they are made once a second.
    fn dates(&self, secs: u64) -> (String, String) {
        let mut cache = lock(&self.dates);
        if cache.0 != secs || cache.1.is_empty() {
            let at = UNIX_EPOCH + Duration::from_secs(secs);
            let local: chrono::DateTime<chrono::Local> = at.into();
            let utc: chrono::DateTime<chrono::Utc> = at.into();
            *cache = (
                secs,
                local.format("%Y-%m-%d %H:%M:%S").to_string(),
                utc.format("%a, %d %b %Y %H:%M:%S GMT").to_string(),
            );
        }
        (cache.1.clone(), cache.2.clone())
    }

    /// Raises an event of the host's own. `params` come first, in order.
    pub fn raise(&self, name: &str, params: Vec<(&str, String)>, caller: &Caller) {
        let headers = params.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        self.fire(Event { name: name.to_string(), subclass: None, headers, body: None }, caller);
    }

    /// Whether anybody listens for `name` (to skip building costly events).
    pub fn wanted(&self, name: &str) -> bool {
        self.subscribers.load().iter().any(|s| lock(&s.subscriptions).iter().any(|x| x.name == name || x.name == "ALL"))
    }

    /// Subscribes `target` to `name` (`ALL` for every event; `subclass`
    /// narrows CUSTOM events). Subscribing again refreshes the expiry, as
    /// OpenSIPS does. `expire` None never expires.
    pub fn subscribe(
        self: &Arc<Self>,
        target: Target,
        name: &str,
        subclass: Option<&str>,
        expire: Option<Duration>,
    ) -> Result<(), String> {
        let _admin = lock(&self.admin);
        // An expiry too far to represent is no expiry.
        let expires = expire.and_then(|d| Instant::now().checked_add(d));
        let subscription = Subscription { name: name.to_string(), subclass: subclass.map(str::to_string), expires };
        let current = self.subscribers.load_full();
        if let Some(sub) = current.iter().find(|s| s.target == target) {
            let mut subs = lock(&sub.subscriptions);
            subs.retain(|s| !(s.name == subscription.name && s.subclass == subscription.subclass));
            if subs.len() >= MAX_SUBSCRIPTIONS {
                return Err(format!("{} holds {MAX_SUBSCRIPTIONS} subscriptions already", target.id()));
            }
            subs.push(subscription);
            return Ok(());
        }
        let (tx, rx) = mpsc::channel(self.queue);
        let sub = Arc::new(Subscriber {
            target: target.clone(),
            subscriptions: Mutex::new(vec![subscription]),
            filters: Mutex::new(Filters::default()),
            tx,
            delivered: AtomicU64::new(0),
            overflow: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        });
        let weak_sub = Arc::downgrade(&sub);
        match target {
            Target::Plugin(plugin) => {
                let dispatcher = self.dispatcher.get().cloned().unwrap_or_default();
                self.spawn(sink::to_plugin(plugin, dispatcher, weak_sub, rx));
            }
            Target::Udp(addr) => {
                self.spawn(sink::to_udp(addr, weak_sub, rx));
            }
            Target::Tcp { addr, method } => {
                self.spawn(sink::to_tcp(addr, method, Arc::downgrade(self), weak_sub, rx));
            }
            Target::Channel(channel) => {
                self.spawn(sink::to_channel(channel, weak_sub, rx));
            }
        }
        let mut next = (*current).clone();
        next.push(sub);
        self.subscribers.store(Arc::new(next));
        Ok(())
    }

    /// Removes a subscription; true when there was one.
    pub fn unsubscribe(&self, target: &Target, name: &str, subclass: Option<&str>) -> bool {
        let _admin = lock(&self.admin);
        let current = self.subscribers.load_full();
        let Some(sub) = current.iter().find(|s| &s.target == target) else { return false };
        let removed = {
            let mut subs = lock(&sub.subscriptions);
            let before = subs.len();
            subs.retain(|s| !(s.name == name && s.subclass.as_deref() == subclass));
            before != subs.len()
        };
        self.prune(&current);
        removed
    }

    /// Removes every subscription of a target (an unloaded plugin).
    pub fn remove(&self, target: &Target) {
        let _admin = lock(&self.admin);
        let current = self.subscribers.load_full();
        if current.iter().any(|s| &s.target == target) {
            let next: Vec<Arc<Subscriber>> = current.iter().filter(|s| &s.target != target).cloned().collect();
            self.subscribers.store(Arc::new(next));
        }
    }

    /// A filter command for a subscriber (see `Filters::command`).
    pub fn filter(&self, target: &Target, command: &str) -> Result<String, String> {
        let current = self.subscribers.load();
        let sub = current
            .iter()
            .find(|s| &s.target == target)
            .ok_or_else(|| format!("{} subscribes to nothing; subscribe first", target.id()))?;
        let reply = lock(&sub.filters).command(command);
        reply
    }

    /// Drops expired subscriptions and subscribers left with none.
    pub fn housekeeping(&self) {
        let _admin = lock(&self.admin);
        let current = self.subscribers.load_full();
        let now = Instant::now();
        for sub in current.iter() {
            lock(&sub.subscriptions).retain(|s| s.expires.is_none_or(|t| t > now));
        }
        self.prune(&current);
    }

    fn prune(&self, current: &Arc<Vec<Arc<Subscriber>>>) {
        if current.iter().any(|s| lock(&s.subscriptions).is_empty()) {
            let next: Vec<Arc<Subscriber>> =
                current.iter().filter(|s| !lock(&s.subscriptions).is_empty()).cloned().collect();
            self.subscribers.store(Arc::new(next));
        }
    }

    pub fn list(&self) -> Vec<SubscriberInfo> {
        self.subscribers
            .load()
            .iter()
            .map(|s| SubscriberInfo {
                target: s.target.id(),
                events: lock(&s.subscriptions)
                    .iter()
                    .map(|x| match &x.subclass {
                        Some(sub) => format!("{}:{sub}", x.name),
                        None => x.name.clone(),
                    })
                    .collect(),
                filters: lock(&s.filters).len(),
                queued: self.queue - s.tx.capacity(),
                delivered: s.delivered.load(Relaxed),
                overflow: s.overflow.load(Relaxed),
                failed: s.failed.load(Relaxed),
            })
            .collect()
    }
}

/// An event as an OpenSIPS JSON-RPC notification (protocols.md §3.3): the
/// headers as `params`, in order, the body as `_body`. For OpenSIPS's own
/// events (`E_…`) integer values are JSON numbers, as OpenSIPS types them.
pub fn notification(event: &Event, method: Option<&str>) -> Vec<u8> {
    let doc = Notification { jsonrpc: "2.0", method: method.unwrap_or(&event.name), params: Params(event) };
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// Serialized straight from the event's headers: no intermediate map.
#[derive(Serialize)]
struct Notification<'a> {
    jsonrpc: &'static str,
    method: &'a str,
    params: Params<'a>,
}

struct Params<'a>(&'a Event);

impl Serialize for Params<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let event = self.0;
        let numeric = event.name.starts_with("E_");
        let mut map = serializer.serialize_map(Some(event.headers.len() + usize::from(event.body.is_some())))?;
        for (k, v) in &event.headers {
            match v.parse::<i64>() {
                Ok(n) if numeric && n.to_string() == *v => map.serialize_entry(k, &n)?,
                _ => map.serialize_entry(k, v)?,
            }
        }
        if let Some(body) = &event.body {
            map.serialize_entry("_body", body)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_parse_as_opensips_writes_them() {
        assert_eq!(Target::parse("udp:127.0.0.1:8888"), Ok(Target::Udp("127.0.0.1:8888".parse().unwrap())));
        assert_eq!(
            Target::parse("tcp:127.0.0.1:9000/notify"),
            Ok(Target::Tcp { addr: "127.0.0.1:9000".parse().unwrap(), method: Some("notify".into()) })
        );
        assert_eq!(Target::parse("tcp:[::1]:9000").map(|t| t.id()), Ok("tcp:[::1]:9000".to_string()));
        assert!(Target::parse("unix:/tmp/x").is_err());
        assert!(Target::parse("udp:nohost").is_err());
    }

    #[test]
    fn notifications_type_opensips_params() {
        let event = Event {
            name: "E_CORE_THRESHOLD".into(),
            subclass: None,
            headers: vec![("source".into(), "plugin x".into()), ("time".into(), "1500".into())],
            body: None,
        };
        let doc: serde_json::Value = serde_json::from_slice(&notification(&event, None)).unwrap();
        assert_eq!(doc["method"], "E_CORE_THRESHOLD");
        assert_eq!(doc["params"]["time"], 1500);
        assert_eq!(doc["params"]["source"], "plugin x");
        assert!(doc.get("id").is_none(), "a notification has no id");
    }
}
