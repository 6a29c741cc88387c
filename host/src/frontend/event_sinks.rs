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
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UdpSocket};

use crate::bus::{Bus, BusError, Fired, Sink, Value, DELIVERY_BATCH};
use crate::config::EventSocket;

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
    fn of<'e>(events: impl Iterator<Item = &'e Fired>) -> Payloads {
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
    async fn deliver(&mut self, event: &Fired) -> bool {
        self.send(&Payloads::of(std::iter::once(event))).await == 1
    }

    async fn deliver_batch(&mut self, events: &[Arc<Fired>]) -> usize {
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
    async fn deliver(&mut self, event: &Fired) -> bool {
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
pub fn notification(event: &Fired, method: Option<&str>) -> Vec<u8> {
    let mut out = Vec::new();
    write_notification(&mut out, event, method);
    out
}

/// `notification`, written at the end of `out`, straight from the event:
/// no map, no strings made for its standard headers.
fn write_notification(out: &mut Vec<u8>, event: &Fired, method: Option<&str>) {
    // Room for the text and its quoting and punctuation, so it is written
    // without growing the buffer (the standard headers take about 400).
    let text: usize = event.headers().iter().map(|(k, v)| k.len() + v.len() + 6).sum::<usize>()
        + event.body().map_or(0, |b| b.len() + 12)
        + 2 * event.name().len();
    out.reserve(text + 480);
    let numeric = event.name().starts_with("E_");
    out.extend_from_slice(br#"{"jsonrpc":"2.0","method":"#);
    json_string(out, method.unwrap_or(event.name()));
    out.extend_from_slice(br#","params":{"#);
    let mut first = true;
    let own = event.headers().iter().map(|(k, v)| (k.as_str(), Value::Text(v)));
    let standard = event.standard().map(|(k, v): (&'static str, _)| (k as &str, v));
    for (k, v) in own.chain(standard) {
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
        json_string(out, k);
        out.push(b':');
        match v {
            Value::Number(n) if numeric => push_number(out, n),
            Value::Number(n) => {
                out.push(b'"');
                push_number(out, n);
                out.push(b'"');
            }
            Value::Text(text) if numeric && canonical_integer(text) => out.extend_from_slice(text.as_bytes()),
            Value::Text(text) => json_string(out, text),
        }
    }
    if let Some(body) = event.body() {
        if !first {
            out.push(b',');
        }
        out.extend_from_slice(br#""_body":"#);
        json_string(out, body);
    }
    out.extend_from_slice(b"}}");
}

fn push_number(out: &mut Vec<u8>, n: u64) {
    use std::io::Write;
    // Writing to a Vec cannot fail.
    let _ = write!(out, "{n}");
}

/// Whether `text` is an i64 written as Rust writes one (no sign but a
/// leading `-`, no leading zeros, not `-0`): what a JSON number gives
/// back unchanged.
fn canonical_integer(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let canonical = match digits.as_bytes() {
        [] => false,
        [b'0'] => digits.len() == text.len(),
        [b'0', ..] => false,
        bytes => bytes.iter().all(u8::is_ascii_digit),
    };
    canonical && text.parse::<i64>().is_ok()
}

/// `text` as a JSON string, quoted and escaped.
fn json_string(out: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = text.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => br#"\""#,
            b'\\' => br"\\",
            b'\n' => br"\n",
            b'\r' => br"\r",
            b'\t' => br"\t",
            0x08 => br"\b",
            0x0c => br"\f",
            0x00..=0x1f => &[b'\\', b'u', b'0', b'0', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]],
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(short);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Caller;
    use crate::runtime::Event;

    fn stamped(name: &str, headers: &[(&str, &str)], body: Option<&str>) -> (serde_json::Value, Fired) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let bus = rt.block_on(async { Bus::new(4) });
        let event = Event {
            name: name.into(),
            subclass: None,
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: body.map(str::to_string),
        };
        let fired = bus.stamp(event, Caller::host("test"));
        (serde_json::from_slice(&notification(&fired, None)).unwrap(), fired)
    }

    #[test]
    fn notifications_type_opensips_params() {
        let (doc, _) = stamped("E_CORE_THRESHOLD", &[("source", "plugin x"), ("time", "1500")], None);
        assert_eq!(doc["method"], "E_CORE_THRESHOLD");
        assert_eq!(doc["params"]["time"], 1500);
        assert_eq!(doc["params"]["source"], "plugin x");
        assert_eq!(doc["params"]["Event-Sequence"], 1);
        assert_eq!(doc["params"]["Event-Calling-Function"], "test");
        assert!(doc.get("id").is_none(), "a notification has no id");
        // Only what reads back as the same text is a number.
        let (doc, _) =
            stamped("E_X", &[("a", "007"), ("b", "-0"), ("c", "+5"), ("d", "-12"), ("e", "0"), ("f", "")], None);
        let p = &doc["params"];
        assert_eq!((&p["a"], &p["b"], &p["c"]), (&"007".into(), &"-0".into(), &"+5".into()));
        assert_eq!((&p["d"], &p["e"], &p["f"]), (&(-12).into(), &0.into(), &"".into()));
        assert_eq!(p["g"], serde_json::Value::Null);
        // Not an OpenSIPS event: text stays text.
        let (doc, _) = stamped("CUSTOM", &[("n", "42")], None);
        assert_eq!(doc["params"]["n"], "42");
        assert_eq!(doc["params"]["Event-Sequence"], "1");
    }

    #[test]
    fn notifications_carry_every_header_in_order_and_any_text_escaped() {
        let odd = "quote \" back\\slash\n\r\t\u{8}\u{c}\u{1}\u{1f}\u{7f} é \u{1F600} </script>";
        let (doc, fired) = stamped("CUSTOM", &[("k\"ey", odd), ("Event-Name", "forged")], Some(odd));
        let params = doc["params"].as_object().unwrap();
        // Params keep their order (serde_json's map is sorted here, so read the
        // pairs through the built event instead, which is what plugins get).
        let event = fired.event();
        assert_eq!(params.len(), event.headers.len() + 1, "every header and the body");
        for (k, v) in &event.headers {
            assert_eq!(params[k.as_str()], serde_json::Value::String(v.clone()), "{k}");
        }
        assert_eq!(params["k\"ey"], odd);
        assert_eq!(params["_body"], odd);
        assert_eq!(params["Event-Name"], "CUSTOM", "a standard header cannot be forged");
        let names: Vec<&str> = event.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(&names[..3], ["k\"ey", "Event-Name", "Core-UUID"]);
        assert_eq!(names.last(), Some(&"Event-Sequence"));
        assert!(!names.contains(&"Event-Subclass"), "no subclass, no header");
    }
}
