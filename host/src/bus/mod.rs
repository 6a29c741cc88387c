//! The event bus: events fired by plugins, raised by evrhost about itself
//! (thresholds, pool scaling, disconnects, log lines, profiling) or sent by
//! peers, delivered to subscribers. A subscriber is an id and a [`Sink`]:
//! the dispatcher makes the sinks of plugins (their `subscriber` export),
//! front-ends make theirs (OpenSIPS's event_datagram and event_stream, an
//! Erlang node's event handler). The bus knows none of them.
//!
//! Invariants:
//! - `fire` never blocks and never fails because of a subscriber. Each
//!   subscriber has a bounded queue and a delivery task of its own; a full
//!   queue drops the event for that subscriber alone and counts it.
//! - An event gets its standard headers once, when fired, before any
//!   subscriber sees it (kept compact: [`Fired`]); a plugin cannot forge
//!   them.
//! - An expired subscription stops matching at once; housekeeping removes
//!   it, and a subscriber left with none is removed with its task.

mod filter;
mod fired;
pub mod log_layer;
mod profile;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::mpsc;

pub use filter::{FilterChange, FilterError, Filters, MAX_FILTERS, MAX_REGEX_FILTERS};
pub use fired::{Caller, Fired, Value};
pub use profile::Profiler;

use crate::runtime::Event;
use crate::sync::lock;
use fired::Second;

/// Subscriptions one subscriber may hold; past this `subscribe` fails, so a
/// plugin or a peer cannot grow the bus without bound.
pub const MAX_SUBSCRIPTIONS: usize = 1024;
/// Subscribers at once (plugins, peers, sockets): each has a queue and a
/// task, and a stream subscriber a connection.
pub const MAX_SUBSCRIBERS: usize = 1024;

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

/// The events evrhost raises itself, each with the id OpenSIPS's
/// `events_list` gives it (OpenSIPS's numbers for its core events; the
/// rest follow).
pub const HOST_EVENTS: [(&str, u32); 13] = [
    ("E_CORE_THRESHOLD", 1),
    ("E_CORE_SHM_THRESHOLD", 2),
    ("E_CORE_PKG_THRESHOLD", 3),
    ("E_CORE_PROC_AUTO_SCALE", 4),
    ("E_CORE_TCP_DISCONNECT", 5),
    ("E_CORE_LOG", 6),
    ("E_PROFILING_PROC", 7),
    ("E_PROFILING_SCRIPT", 8),
    ("HEARTBEAT", 9),
    ("BACKGROUND_JOB", 10),
    ("PLUGIN_LOAD", 11),
    ("PLUGIN_RELOAD", 12),
    ("PLUGIN_FAIL", 13),
];

/// Events a delivery task takes off its queue at once: what queued up
/// while the last ones were being delivered, up to this many.
pub const DELIVERY_BATCH: usize = 64;

/// Where one subscriber's events go. The bus calls it from the
/// subscriber's own task, in the order the events were fired; a slow sink
/// delays only itself.
#[async_trait::async_trait]
pub trait Sink: Send + 'static {
    /// True when the event was delivered (counted as delivered, else as
    /// failed).
    async fn deliver(&mut self, event: &Fired) -> bool;

    /// Delivers events that queued up together (at most
    /// [`DELIVERY_BATCH`], in order) and says how many were delivered; the
    /// rest count as failed. A sink that can send several at once for
    /// less than one at a time (one system call, one guest call) does so
    /// here; by default each goes through `deliver`.
    async fn deliver_batch(&mut self, events: &[Arc<Fired>]) -> usize {
        deliver_each(self, events).await
    }
}

/// `events` through `sink.deliver`, one at a time: how many were delivered.
/// The default `deliver_batch`, for a sink that falls back to it.
pub async fn deliver_each<S: Sink + ?Sized>(sink: &mut S, events: &[Arc<Fired>]) -> usize {
    let mut delivered = 0;
    for event in events {
        delivered += usize::from(sink.deliver(event).await);
    }
    delivered
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("{id} holds {MAX_SUBSCRIPTIONS} subscriptions already")]
    TooManySubscriptions { id: String },
    #[error("{MAX_SUBSCRIBERS} subscribers already; {id} is refused (unsubscribe some first)")]
    TooManySubscribers { id: String },
    #[error("{id} subscribes to nothing; subscribe first")]
    NotSubscribed { id: String },
    #[error(transparent)]
    Filter(#[from] FilterError),
}

#[derive(Clone, Debug)]
struct Subscription {
    /// An event name, or `ALL`.
    name: String,
    subclass: Option<String>,
    expires: Option<Instant>,
    /// As asked for (OpenSIPS lists it); None never expires.
    expire: Option<Duration>,
}

impl Subscription {
    /// `NAME` or `NAME:SUBCLASS`, as subscribed.
    fn written(&self) -> String {
        match &self.subclass {
            Some(sub) => format!("{}:{sub}", self.name),
            None => self.name.clone(),
        }
    }

    fn matches(&self, event: &Fired, now: Instant) -> bool {
        self.expires.is_none_or(|t| t > now)
            && (self.name == "ALL" || self.name == event.name())
            && (self.subclass.is_none() || self.subclass.as_deref() == event.subclass())
    }
}

struct Subscriber {
    /// What subscribe, unsubscribe, filter and remove know it by:
    /// `plugin:NAME`, `udp:IP:PORT`, …
    id: String,
    subscriptions: Mutex<Vec<Subscription>>,
    filters: Mutex<Filters>,
    tx: mpsc::Sender<Arc<Fired>>,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    delivered: AtomicU64,
    /// Dropped because the subscriber's queue was full.
    overflow: AtomicU64,
    /// Delivery attempts that failed (an unreachable peer, a plugin error).
    failed: AtomicU64,
}

impl Subscriber {
    /// Filters see the event with its standard headers, built for the
    /// first subscriber that filters.
    fn wants(&self, event: &Fired, now: Instant) -> bool {
        let subscribed = lock(&self.subscriptions).iter().any(|s| s.matches(event, now));
        subscribed && {
            let filters = lock(&self.filters);
            filters.is_empty() || filters.passes(event.event())
        }
    }
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
    core_uuid: Arc<str>,
    hostname: Arc<str>,
    sequence: AtomicU64,
    subscribers: ArcSwap<Vec<Arc<Subscriber>>>,
    admin: Mutex<()>,
    queue: usize,
    /// What the events of the last second fired share.
    second: ArcSwap<Second>,
    /// Events someone subscribed to by name, in the order first seen, at
    /// most [`MAX_SUBSCRIBERS`]: what OpenSIPS's `events_list` would call
    /// registered, with ids that stay put.
    named: Mutex<Vec<String>>,
    /// Profiling sessions opened so far (E_PROFILING_* `session`).
    pub(crate) profiling_sessions: AtomicU64,
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
        let (core_uuid, hostname): (Arc<str>, Arc<str>) = (uuid::Uuid::new_v4().to_string().into(), hostname.into());
        let second = Second {
            secs: u64::MAX,
            core_uuid: core_uuid.clone(),
            hostname: hostname.clone(),
            local: "".into(),
            gmt: "".into(),
        };
        Arc::new(Bus {
            core_uuid,
            hostname,
            sequence: AtomicU64::new(0),
            subscribers: ArcSwap::from_pointee(Vec::new()),
            admin: Mutex::new(()),
            queue: queue.max(1),
            second: ArcSwap::from_pointee(second),
            named: Mutex::new(Vec::new()),
            profiling_sessions: AtomicU64::new(0),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// Runs `task` on the daemon's main runtime, whatever thread asks.
    pub fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        drop(self.runtime.spawn(task));
    }

    /// Adds the standard headers and hands the event to every subscriber
    /// that wants it.
    pub fn fire(&self, event: Event, caller: Caller) {
        let subscribers = self.subscribers.load();
        let sequence = self.sequence.fetch_add(1, Relaxed) + 1;
        if subscribers.is_empty() {
            return;
        }
        let event = Arc::new(self.stamped(event, caller, sequence));
        let now = Instant::now();
        for sub in subscribers.iter() {
            if !sub.wants(&event, now) {
                continue;
            }
            if sub.tx.try_send(event.clone()).is_err() {
                sub.counters.overflow.fetch_add(1, Relaxed);
            }
        }
    }

    /// The event as `fire` would hand it to subscribers now, with the next
    /// sequence number, handed to none.
    pub fn stamp(&self, event: Event, caller: Caller) -> Fired {
        let sequence = self.sequence.fetch_add(1, Relaxed) + 1;
        self.stamped(event, caller, sequence)
    }

    fn stamped(&self, event: Event, caller: Caller, sequence: u64) -> Fired {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let micros = u64::try_from(now.as_micros()).unwrap_or(u64::MAX);
        Fired::new(event, caller, sequence, micros, self.second(now.as_secs()))
    }

    /// What the events fired in second `secs` since the epoch share.
    /// Formatting the dates (and finding the local zone) costs
    /// microseconds, so they are made once a second.
    fn second(&self, secs: u64) -> Arc<Second> {
        let current = self.second.load_full();
        if current.secs == secs {
            return current;
        }
        let at = UNIX_EPOCH + Duration::from_secs(secs);
        let local: chrono::DateTime<chrono::Local> = at.into();
        let utc: chrono::DateTime<chrono::Utc> = at.into();
        let next = Arc::new(Second {
            secs,
            core_uuid: self.core_uuid.clone(),
            hostname: self.hostname.clone(),
            local: local.format("%Y-%m-%d %H:%M:%S").to_string(),
            gmt: utc.format("%a, %d %b %Y %H:%M:%S GMT").to_string(),
        });
        self.second.store(next.clone());
        next
    }

    /// Raises an event of the host's own. `params` come first, in order.
    pub fn raise(&self, name: &str, params: Vec<(&str, String)>, caller: Caller) {
        let headers = params.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        self.fire(Event { name: name.to_string(), subclass: None, headers, body: None }, caller);
    }

    /// Whether anybody listens for `name` (to skip building costly events).
    pub fn wanted(&self, name: &str) -> bool {
        self.subscribers.load().iter().any(|s| lock(&s.subscriptions).iter().any(|x| x.name == name || x.name == "ALL"))
    }

    /// Subscribes the subscriber `id` to `name` (`ALL` for every event;
    /// `subclass` narrows CUSTOM events). A new subscriber's events go to
    /// the sink `sink` makes (called only then). Subscribing again
    /// refreshes the expiry, as OpenSIPS does. `expire` None never expires.
    pub fn subscribe(
        &self,
        id: &str,
        sink: impl FnOnce() -> Box<dyn Sink>,
        name: &str,
        subclass: Option<&str>,
        expire: Option<Duration>,
    ) -> Result<(), BusError> {
        let _admin = lock(&self.admin);
        // An expiry too far to represent is no expiry.
        let expires = expire.and_then(|d| Instant::now().checked_add(d));
        let subscription =
            Subscription { name: name.to_string(), subclass: subclass.map(str::to_string), expires, expire };
        let written = subscription.written();
        let current = self.subscribers.load_full();
        if let Some(sub) = current.iter().find(|s| s.id == id) {
            let mut subs = lock(&sub.subscriptions);
            subs.retain(|s| !(s.name == subscription.name && s.subclass == subscription.subclass));
            if subs.len() >= MAX_SUBSCRIPTIONS {
                return Err(BusError::TooManySubscriptions { id: id.to_string() });
            }
            subs.push(subscription);
            self.remember(&written);
            return Ok(());
        }
        if current.len() >= MAX_SUBSCRIBERS {
            return Err(BusError::TooManySubscribers { id: id.to_string() });
        }
        let (tx, rx) = mpsc::channel(self.queue);
        let counters = Arc::new(Counters::default());
        let sub = Arc::new(Subscriber {
            id: id.to_string(),
            subscriptions: Mutex::new(vec![subscription]),
            filters: Mutex::new(Filters::default()),
            tx,
            counters: counters.clone(),
        });
        self.spawn(deliver(sink(), rx, counters));
        let mut next = (*current).clone();
        next.push(sub);
        self.subscribers.store(Arc::new(next));
        self.remember(&written);
        Ok(())
    }

    /// Removes a subscription; true when there was one.
    pub fn unsubscribe(&self, id: &str, name: &str, subclass: Option<&str>) -> bool {
        let _admin = lock(&self.admin);
        let current = self.subscribers.load_full();
        let Some(sub) = current.iter().find(|s| s.id == id) else { return false };
        let removed = {
            let mut subs = lock(&sub.subscriptions);
            let before = subs.len();
            subs.retain(|s| !(s.name == name && s.subclass.as_deref() == subclass));
            before != subs.len()
        };
        self.prune(&current);
        removed
    }

    /// Removes a subscriber and every subscription it holds; its delivery
    /// task ends once its queue is drained.
    pub fn remove(&self, id: &str) {
        let _admin = lock(&self.admin);
        let current = self.subscribers.load_full();
        if current.iter().any(|s| s.id == id) {
            let next: Vec<Arc<Subscriber>> = current.iter().filter(|s| s.id != id).cloned().collect();
            self.subscribers.store(Arc::new(next));
        }
    }

    /// A filter command for a subscriber (see `Filters::command`).
    pub fn filter(&self, id: &str, command: &str) -> Result<FilterChange, BusError> {
        let current = self.subscribers.load();
        let sub = current.iter().find(|s| s.id == id).ok_or_else(|| BusError::NotSubscribed { id: id.to_string() })?;
        let change = lock(&sub.filters).command(command)?;
        Ok(change)
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

    /// Only a subscription that was made names an event.
    fn remember(&self, event: &str) {
        let mut named = lock(&self.named);
        if event != "ALL" && named.len() < MAX_SUBSCRIBERS && !named.iter().any(|n| n == event) {
            named.push(event.to_string());
        }
    }

    /// Events subscribed to by name since start, in the order first seen.
    pub fn named(&self) -> Vec<String> {
        lock(&self.named).clone()
    }

    /// Every live subscription: (subscriber, event as written, expire as
    /// asked for).
    pub fn subscriptions(&self) -> Vec<(String, String, Option<Duration>)> {
        let now = Instant::now();
        let mut out = Vec::new();
        for sub in self.subscribers.load().iter() {
            for x in lock(&sub.subscriptions).iter().filter(|x| x.expires.is_none_or(|t| t > now)) {
                out.push((sub.id.clone(), x.written(), x.expire));
            }
        }
        out
    }

    /// Every subscriber with a live subscription, and those it holds (an
    /// expired one is gone at once here, as in matching, before
    /// housekeeping removes it).
    pub fn list(&self) -> Vec<SubscriberInfo> {
        let now = Instant::now();
        let live = |s: &Subscriber| -> Vec<String> {
            let subscriptions = lock(&s.subscriptions);
            subscriptions.iter().filter(|x| x.expires.is_none_or(|t| t > now)).map(Subscription::written).collect()
        };
        self.subscribers
            .load()
            .iter()
            .filter_map(|s| {
                let events = live(s);
                (!events.is_empty()).then(|| SubscriberInfo {
                    target: s.id.clone(),
                    events,
                    filters: lock(&s.filters).len(),
                    queued: self.queue - s.tx.capacity(),
                    delivered: s.counters.delivered.load(Relaxed),
                    overflow: s.counters.overflow.load(Relaxed),
                    failed: s.counters.failed.load(Relaxed),
                })
            })
            .collect()
    }
}

/// A subscriber's delivery task: ends when the subscriber is removed (its
/// queue's sender dropped) and the queue is drained.
async fn deliver(mut sink: Box<dyn Sink>, mut rx: mpsc::Receiver<Arc<Fired>>, counters: Arc<Counters>) {
    let mut batch = Vec::with_capacity(DELIVERY_BATCH);
    while rx.recv_many(&mut batch, DELIVERY_BATCH).await > 0 {
        let delivered = if let [event] = batch.as_slice() {
            usize::from(sink.deliver(event).await)
        } else {
            sink.deliver_batch(&batch).await.min(batch.len())
        };
        counters.delivered.fetch_add(delivered as u64, Relaxed);
        if delivered < batch.len() {
            counters.failed.fetch_add((batch.len() - delivered) as u64, Relaxed);
        }
        batch.clear();
    }
}
