//! OpenSIPS's external event subscribers (protocols.md §3.3): each event
//! as a JSON-RPC notification, one per datagram to `udp:IP:PORT`
//! (event_datagram), or back to back on one TCP connection to
//! `tcp:IP:PORT[/METHOD]` (event_stream, which reconnects with backoff).

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Weak};
use std::time::Duration;

use nix::sys::socket::{sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage};
use serde::Serialize;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UdpSocket};

use crate::bus::{Bus, BusError, Sink, DELIVERY_BATCH};
use crate::config::EventSocket;
use crate::runtime::Event;

/// event_stream's default: one second for a connect or a write.
const TCP_TIMEOUT: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The daemon's event_datagram and event_stream subscribers. Every UDP
/// subscriber sends through one socket per address family, so a thousand
/// subscribers cost two file descriptors, not a thousand.
#[derive(Default)]
pub struct EventSinks {
    v4: tokio::sync::OnceCell<Arc<UdpSocket>>,
    v6: tokio::sync::OnceCell<Arc<UdpSocket>>,
}

impl EventSinks {
    /// Subscribes `socket` to `name` (`NAME`, `ALL` or `CUSTOM` with
    /// `subclass`).
    pub fn subscribe(
        self: &Arc<Self>,
        bus: &Arc<Bus>,
        socket: &EventSocket,
        name: &str,
        subclass: Option<&str>,
        expire: Option<Duration>,
    ) -> Result<(), BusError> {
        bus.subscribe(&socket.id(), || self.sink(socket, bus), name, subclass, expire)
    }

    fn sink(self: &Arc<Self>, socket: &EventSocket, bus: &Arc<Bus>) -> Box<dyn Sink> {
        match socket {
            EventSocket::Udp(addr) => Box::new(UdpSink { addr: *addr, sinks: self.clone() }),
            EventSocket::Tcp { addr, method } => Box::new(TcpSink {
                addr: *addr,
                method: method.clone(),
                bus: Arc::downgrade(bus),
                stream: None,
                backoff: Duration::from_millis(100),
                retry_at: tokio::time::Instant::now(),
            }),
        }
    }

    /// The shared socket for `addr`'s family, bound on first use.
    async fn socket(&self, addr: SocketAddr) -> std::io::Result<Arc<UdpSocket>> {
        let (cell, local) = if addr.is_ipv6() { (&self.v6, "[::]:0") } else { (&self.v4, "0.0.0.0:0") };
        cell.get_or_try_init(|| async { UdpSocket::bind(local).await.map(Arc::new) }).await.cloned()
    }
}

/// event_datagram: no retry; a momentarily full local send buffer is
/// waited for, briefly (the task is this peer's alone). Events that queued
/// up together leave in one sendmmsg(2).
struct UdpSink {
    addr: SocketAddr,
    sinks: Arc<EventSinks>,
}

impl UdpSink {
    /// Sends each of `payloads` as a datagram; how many were sent.
    async fn send(&self, payloads: &Payloads) -> usize {
        let socket = match self.sinks.socket(self.addr).await {
            Ok(socket) => socket,
            Err(e) => {
                tracing::error!(addr = %self.addr, error = %e, "cannot open a UDP socket for event delivery");
                return 0;
            }
        };
        let to = SockaddrStorage::from(self.addr);
        let (mut at, mut sent) = (0, 0);
        let mut give_up = None;
        while at < payloads.len() {
            match socket.try_io(Interest::WRITABLE, || send_many(socket.as_raw_fd(), payloads, at, to)) {
                // sendmmsg sends one at least or fails; never spin on none.
                Ok(n) => {
                    at += n.max(1);
                    sent += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let until = *give_up.get_or_insert_with(|| tokio::time::Instant::now() + SEND_WAIT);
                    if !matches!(tokio::time::timeout_at(until, socket.writable()).await, Ok(Ok(()))) {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // This one datagram cannot go (too big, say); the next may.
                    tracing::debug!(addr = %self.addr, error = %e, "event datagram not sent");
                    at += 1;
                }
            }
        }
        sent
    }
}

/// How long a full local send buffer is waited for before the events in
/// hand count as failed.
const SEND_WAIT: Duration = Duration::from_millis(100);

/// Notifications back to back in one buffer: one allocation a batch.
#[derive(Default)]
struct Payloads {
    bytes: Vec<u8>,
    /// Where each one ends.
    ends: Vec<usize>,
}

impl Payloads {
    fn of<'e>(events: impl Iterator<Item = &'e Event>) -> Payloads {
        let mut payloads = Payloads::default();
        for event in events {
            write_notification(&mut payloads.bytes, event, None);
            payloads.ends.push(payloads.bytes.len());
        }
        payloads
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn get(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }
}

/// One sendmmsg(2) of (at most [`DELIVERY_BATCH`] of) `payloads` from
/// `from` on, to `to`: how many left.
fn send_many(fd: RawFd, payloads: &Payloads, from: usize, to: SockaddrStorage) -> io::Result<usize> {
    let n = (payloads.len() - from).min(DELIVERY_BATCH);
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(n, None);
    let slices: Vec<[IoSlice<'_>; 1]> = (from..from + n).map(|i| [IoSlice::new(payloads.get(i))]).collect();
    let addrs = vec![Some(to); n];
    let no_cmsgs: [ControlMessage<'_>; 0] = [];
    sendmmsg(fd, &mut headers, &slices, &addrs, no_cmsgs, MsgFlags::MSG_DONTWAIT)
        .map(|results| results.count())
        .map_err(io::Error::from)
}

#[async_trait::async_trait]
impl Sink for UdpSink {
    async fn deliver(&mut self, event: &Event) -> bool {
        self.send(&Payloads::of(std::iter::once(event))).await == 1
    }

    async fn deliver_batch(&mut self, events: &[Arc<Event>]) -> usize {
        self.send(&Payloads::of(events.iter().map(|e| &**e))).await
    }
}

/// event_stream: one connection, reopened after a backoff that doubles up
/// to 30 s; events that arrive while it backs off are lost (and counted).
struct TcpSink {
    addr: SocketAddr,
    method: Option<String>,
    bus: Weak<Bus>,
    stream: Option<TcpStream>,
    backoff: Duration,
    retry_at: tokio::time::Instant,
}

#[async_trait::async_trait]
impl Sink for TcpSink {
    async fn deliver(&mut self, event: &Event) -> bool {
        let addr = self.addr;
        if self.stream.is_none() {
            if tokio::time::Instant::now() < self.retry_at {
                return false;
            }
            match tokio::time::timeout(TCP_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    tracing::info!(%addr, "event stream connected");
                    self.stream = Some(s);
                    self.backoff = Duration::from_millis(100);
                }
                _ => {
                    tracing::warn!(%addr, retry_ms = self.backoff.as_millis() as u64, "event stream: cannot connect");
                    self.retry_at = tokio::time::Instant::now() + self.backoff;
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                    return false;
                }
            }
        }
        let Some(s) = self.stream.as_mut() else { return false };
        let bytes = notification(event, self.method.as_deref());
        match tokio::time::timeout(TCP_TIMEOUT, s.write_all(&bytes)).await {
            Ok(Ok(())) => true,
            failure => {
                let why = match failure {
                    Ok(Err(e)) => e.to_string(),
                    _ => "write timed out (the peer stopped reading)".to_string(),
                };
                tracing::warn!(%addr, error = %why, "event stream lost");
                if let (Some(bus), Some(s)) = (self.bus.upgrade(), self.stream.take()) {
                    super::disconnected(&bus, s.local_addr().ok(), s.peer_addr().ok(), "tcp");
                }
                self.retry_at = tokio::time::Instant::now() + self.backoff;
                false
            }
        }
    }
}

/// An event as an OpenSIPS JSON-RPC notification (protocols.md §3.3): the
/// headers as `params`, in order, the body as `_body`. For OpenSIPS's own
/// events (`E_…`) integer values are JSON numbers, as OpenSIPS types them.
pub fn notification(event: &Event, method: Option<&str>) -> Vec<u8> {
    let mut out = Vec::new();
    write_notification(&mut out, event, method);
    out
}

/// `notification`, written at the end of `out`.
fn write_notification(out: &mut Vec<u8>, event: &Event, method: Option<&str>) {
    // Room for the text and its quoting and punctuation, so it is written
    // without growing the buffer.
    let text: usize = event.headers.iter().map(|(k, v)| k.len() + v.len() + 6).sum::<usize>()
        + event.body.as_ref().map_or(0, |b| b.len() + 12)
        + event.name.len();
    out.reserve(text + 48);
    let doc = Notification { jsonrpc: "2.0", method: method.unwrap_or(&event.name), params: Params(event) };
    let start = out.len();
    if serde_json::to_writer(&mut *out, &doc).is_err() {
        out.truncate(start);
    }
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
            match numeric.then(|| v.parse::<i64>()) {
                Some(Ok(n)) if n.to_string() == *v => map.serialize_entry(k, &n)?,
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
