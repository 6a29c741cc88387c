//! Delivery tasks, one per subscriber: to a plugin's `subscriber` export,
//! to a UDP peer (event_datagram) and to a TCP peer (event_stream). Each
//! ends when its subscriber is removed (the queue's sender is dropped).

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;

use super::{notification, Bus, Caller, Subscriber};
use crate::dispatcher::Dispatcher;
use crate::runtime::Event;

/// event_stream's default: one second for a connect or a write.
const TCP_TIMEOUT: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

fn count(sub: &Weak<Subscriber>, ok: bool) {
    if let Some(sub) = sub.upgrade() {
        if ok { &sub.delivered } else { &sub.failed }.fetch_add(1, Relaxed);
    }
}

pub(super) async fn to_plugin(
    plugin: String,
    d: Weak<Dispatcher>,
    sub: Weak<Subscriber>,
    mut rx: mpsc::Receiver<Arc<Event>>,
) {
    while let Some(event) = rx.recv().await {
        let Some(version) = d.upgrade().and_then(|d| d.plugin(&plugin)) else { return };
        // A log event a plugin handles must not raise log events of its own.
        let log_event = event.name == "E_CORE_LOG";
        let (result, _) = if log_event {
            super::log_layer::suppressed(version.on_event(&event)).await
        } else {
            version.on_event(&event).await
        };
        if let Err(e) = &result {
            if !log_event {
                tracing::debug!(plugin = %plugin, error = %e, "event not delivered");
            }
        }
        count(&sub, result.is_ok());
    }
}

pub(super) async fn to_channel(channel: super::ChannelSink, sub: Weak<Subscriber>, mut rx: mpsc::Receiver<Arc<Event>>) {
    while let Some(event) = rx.recv().await {
        count(&sub, (channel.deliver)(&event));
    }
}

pub(super) async fn to_udp(addr: SocketAddr, sub: Weak<Subscriber>, mut rx: mpsc::Receiver<Arc<Event>>) {
    let local = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
    let socket = match UdpSocket::bind(local).await {
        Ok(socket) => socket,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot open a UDP socket for event delivery");
            return;
        }
    };
    while let Some(event) = rx.recv().await {
        // No retry, as event_datagram; a momentarily full local send
        // buffer is waited for (briefly: this task is the peer's alone).
        let payload = notification(&event, None);
        let send = socket.send_to(&payload, addr);
        let ok = matches!(tokio::time::timeout(Duration::from_millis(100), send).await, Ok(Ok(_)));
        count(&sub, ok);
    }
}

pub(super) async fn to_tcp(
    addr: SocketAddr,
    method: Option<String>,
    bus: Weak<Bus>,
    sub: Weak<Subscriber>,
    mut rx: mpsc::Receiver<Arc<Event>>,
) {
    let mut stream: Option<TcpStream> = None;
    let mut backoff = Duration::from_millis(100);
    let mut retry_at = tokio::time::Instant::now();
    while let Some(event) = rx.recv().await {
        if stream.is_none() {
            if tokio::time::Instant::now() < retry_at {
                // Still backing off: the event is lost for this peer.
                count(&sub, false);
                continue;
            }
            match tokio::time::timeout(TCP_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    tracing::info!(%addr, "event stream connected");
                    stream = Some(s);
                    backoff = Duration::from_millis(100);
                }
                _ => {
                    tracing::warn!(%addr, retry_ms = backoff.as_millis() as u64, "event stream: cannot connect");
                    retry_at = tokio::time::Instant::now() + backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    count(&sub, false);
                    continue;
                }
            }
        }
        let Some(s) = stream.as_mut() else { continue };
        let bytes = notification(&event, method.as_deref());
        match tokio::time::timeout(TCP_TIMEOUT, s.write_all(&bytes)).await {
            Ok(Ok(())) => count(&sub, true),
            failure => {
                let why = match failure {
                    Ok(Err(e)) => e.to_string(),
                    _ => "write timed out (the peer stopped reading)".to_string(),
                };
                tracing::warn!(%addr, error = %why, "event stream lost");
                if let (Some(bus), Some(s)) = (bus.upgrade(), stream.take()) {
                    disconnected(&bus, &s, "tcp");
                }
                retry_at = tokio::time::Instant::now() + backoff;
                count(&sub, false);
            }
        }
    }
}

/// Raises E_CORE_TCP_DISCONNECT for a stream that ended.
pub fn disconnected(bus: &Bus, stream: &TcpStream, proto: &str) {
    let (local, peer) = (stream.local_addr().ok(), stream.peer_addr().ok());
    tcp_disconnect(bus, local, peer, proto);
}

/// E_CORE_TCP_DISCONNECT with OpenSIPS's parameters: the peer is `src`,
/// this end `dst`.
pub fn tcp_disconnect(bus: &Bus, local: Option<SocketAddr>, peer: Option<SocketAddr>, proto: &str) {
    let ip = |a: Option<SocketAddr>| a.map_or(String::new(), |a| a.ip().to_canonical().to_string());
    let port = |a: Option<SocketAddr>| a.map_or(0, |a| a.port()).to_string();
    bus.raise(
        "E_CORE_TCP_DISCONNECT",
        vec![
            ("src_ip", ip(peer)),
            ("src_port", port(peer)),
            ("dst_ip", ip(local)),
            ("dst_port", port(local)),
            ("proto", proto.to_string()),
        ],
        &Caller::host("tcp_disconnect"),
    );
}
