//! Running the route for datagrams, one by one or a read's at once, and
//! sending the replies back to their sources.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::UdpStats;
use crate::bus::Profiler;
use crate::dispatcher::{DispatchError, Dispatcher, RouteOutcome};
use crate::runtime::{Origin, Packed, Peer, Request};

/// Runs the route for one datagram after another, or for a read's
/// datagrams at once: a worker's, or the receiver thread's own.
pub(super) struct Handler {
    d: Arc<Dispatcher>,
    route: String,
    replies: Replies,
    /// The profiler's name for this socket, when `profiling` is on.
    profiling: Option<String>,
    /// Reused, at most a read's worth: only the data and, when the peer
    /// changes, the origin.
    requests: Vec<Request>,
    /// The peer each request's origin was made for.
    peers: Vec<Option<SocketAddr>>,
    /// Reused for the plugins that take a read packed: its peers are
    /// formatted once and kept (see `pack`).
    packed: Packed,
    /// The address of each of `packed.peers`.
    known: Vec<SocketAddr>,
}

impl Handler {
    pub(super) fn new(d: Arc<Dispatcher>, route: &str, replies: Replies, profiling: Option<String>) -> Handler {
        let packed = Packed {
            route: route.to_string(),
            data: Vec::new(),
            ends: Vec::new(),
            peers: Vec::new(),
            sources: Vec::new(),
        };
        let (requests, peers, known) = (Vec::new(), Vec::new(), Vec::new());
        Handler { d, route: route.to_string(), replies, profiling, requests, peers, packed, known }
    }

    /// The profiler's name, when a profiler listens: then each datagram
    /// is a call of its own, with its records.
    fn profiled(&self) -> Option<&str> {
        self.profiling.as_deref().filter(|_| self.d.bus().wanted("E_PROFILING_PROC"))
    }

    /// Whether `datagrams` would run a read's datagrams in one call now.
    pub(super) fn batches(&self) -> bool {
        self.profiled().is_none() && self.d.takes_batches(&self.route)
    }

    /// Makes request `i` carry `data` from `peer`.
    fn fill(&mut self, i: usize, data: &[u8], peer: SocketAddr) {
        if i == self.requests.len() {
            let (route, data, params) = (self.route.clone(), Vec::new(), Vec::new());
            self.requests.push(Request { route, data, params, origin: Origin::Cli });
            self.peers.push(None);
        }
        let (request, last) = (&mut self.requests[i], &mut self.peers[i]);
        // Most datagrams come from a few peers: the origin (a formatted
        // IP) is rebuilt only when the peer changes.
        if *last != Some(peer) {
            request.origin = Origin::Udp(Peer { ip: peer.ip().to_canonical().to_string(), port: peer.port() });
            *last = Some(peer);
        }
        request.data.clear();
        request.data.extend_from_slice(data);
    }

    pub(super) async fn datagram(&mut self, data: &[u8], peer: SocketAddr) {
        self.fill(0, data, peer);
        let (d, request, replies) = (&self.d, &self.requests[0], &self.replies);
        match self.profiled() {
            None => {
                deliver(d.run_route_unsaved(request).await, &self.route, peer, replies).await;
            }
            Some(name) => {
                let mut profiler = Profiler::start(d.bus(), "E_PROFILING_PROC", name);
                profiler.enter("udp datagram", "udp", 0);
                let status = deliver(d.run_route_unsaved(request).await, &self.route, peer, replies).await;
                profiler.exit("udp datagram", "udp", 0, status);
                profiler.end(name, status);
            }
        }
    }

    /// Runs the route for each of `datagrams` (a read's, so at most
    /// `BATCH`), in one call when the plugin takes batches (see
    /// `Dispatcher::run_batch_unsaved`); gives how many there were.
    pub(super) async fn datagrams<'a>(&mut self, datagrams: impl Iterator<Item = (&'a [u8], SocketAddr)>) -> usize {
        if self.profiled().is_some() {
            let mut n = 0;
            for (data, peer) in datagrams {
                self.datagram(data, peer).await;
                n += 1;
            }
            return n;
        }
        if self.d.takes_datagrams(&self.route) {
            let n = self.pack(datagrams);
            let results = self.d.run_datagrams_unsaved(&self.packed).await;
            for (result, &source) in results.into_iter().zip(&self.packed.sources) {
                let Some(&peer) = self.known.get(usize::from(source)) else { continue };
                deliver(result, &self.route, peer, &self.replies).await;
            }
            return n;
        }
        let mut n = 0;
        for (data, peer) in datagrams {
            self.fill(n, data, peer);
            n += 1;
        }
        let results = self.d.run_batch_unsaved(&self.route, &self.requests[..n]).await;
        for (result, peer) in results.into_iter().zip(&self.peers) {
            let Some(peer) = *peer else { continue };
            deliver(result, &self.route, peer, &self.replies).await;
        }
        n
    }

    /// Packs `datagrams` into `packed`; gives how many there were. The
    /// peers seen are kept from read to read (a peer's address is
    /// formatted once), until more than `MAX_KNOWN` are.
    fn pack<'a>(&mut self, datagrams: impl Iterator<Item = (&'a [u8], SocketAddr)>) -> usize {
        let packed = &mut self.packed;
        if self.known.len() > MAX_KNOWN {
            self.known.clear();
            packed.peers.clear();
        }
        packed.data.clear();
        packed.ends.clear();
        packed.sources.clear();
        for (data, peer) in datagrams {
            let source = match self.known.iter().position(|known| *known == peer) {
                Some(i) => i,
                None => {
                    self.known.push(peer);
                    packed.peers.push(Peer { ip: peer.ip().to_canonical().to_string(), port: peer.port() });
                    self.known.len() - 1
                }
            };
            // A read holds at most 32 datagrams of at most 65,536 bytes.
            let (Ok(source), Ok(end)) = (u16::try_from(source), u32::try_from(packed.data.len() + data.len())) else {
                continue;
            };
            packed.data.extend_from_slice(data);
            packed.ends.push(end);
            packed.sources.push(source);
        }
        packed.ends.len()
    }
}

/// Peers kept formatted for packed reads: past this many, the list starts
/// over. Every one kept is lowered into the guest with each read, so the
/// few peers of a trunk are kept, and traffic from many peers lists about
/// one read's worth.
const MAX_KNOWN: usize = 8;

/// Replies waiting for their kv writes to be durable, per socket; past
/// this a worker waits for its own before taking the next datagram.
pub(super) const MAX_UNSAVED_REPLIES: usize = 4096;

/// The socket's clone replies go out through. It is registered with
/// tokio for writing only: a clone registered for reading too (as
/// `tokio::net::UdpSocket` is) has every arriving datagram wake a tokio
/// worker for a readiness nobody awaits — measured 0.6 wake-ups and
/// 4–9 µs of CPU per datagram, most of what a datagram cost.
pub(super) struct ReplySocket(AsyncFd<std::net::UdpSocket>);

impl ReplySocket {
    pub(super) fn new(socket: std::net::UdpSocket) -> io::Result<ReplySocket> {
        // SAFETY: the AsyncFd owns the socket, so its fd stays open and
        // the same until the registration is dropped with it.
        let fd = unsafe { AsyncFd::register_with_interest(socket, Interest::WRITABLE) };
        Ok(ReplySocket(fd.map_err(io::Error::from)?))
    }

    /// Sends at once when the socket has room (nearly always), else once
    /// it has.
    async fn send_to(&self, data: &[u8], peer: SocketAddr) -> io::Result<usize> {
        match self.0.get_ref().send_to(data, peer) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            done => return done,
        }
        loop {
            let mut ready = self.0.writable().await?;
            if let Ok(done) = ready.try_io(|s| s.get_ref().send_to(data, peer)) {
                return done;
            }
        }
    }
}

/// Where a worker's replies go.
pub(super) struct Replies {
    pub(super) socket: Arc<ReplySocket>,
    pub(super) stats: Arc<UdpStats>,
    /// Set: replies go back (`reply = true`).
    pub(super) on: bool,
    pub(super) unsaved: Arc<tokio::sync::Semaphore>,
}

impl Replies {
    async fn send(&self, route: &str, data: &[u8], peer: SocketAddr) {
        send_reply(&self.socket, &self.stats, route, data, peer).await;
    }
}

async fn send_reply(socket: &ReplySocket, stats: &UdpStats, route: &str, data: &[u8], peer: SocketAddr) {
    match socket.send_to(data, peer).await {
        Ok(_) => stats.replies.fetch_add(1, Relaxed),
        Err(e) => {
            tracing::debug!(route = %route, %peer, error = %e, "reply datagram not sent");
            stats.reply_errors.fetch_add(1, Relaxed)
        }
    };
}

/// Sends the reply of a datagram's call, if any; the status is 0, or -1
/// when the call failed (for profiling records). A reply whose kv writes
/// are not yet durable is sent once they are, while the caller takes the
/// next datagram; without a reply nothing is acknowledged, so nothing
/// waits.
async fn deliver(result: Result<RouteOutcome, DispatchError>, route: &str, peer: SocketAddr, replies: &Replies) -> i64 {
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(e) => {
            replies.stats.failed.fetch_add(1, Relaxed);
            tracing::debug!(route = %route, %peer, error = %e, "datagram not handled");
            return -1;
        }
    };
    if !replies.on || outcome.reply.data.is_none() {
        return 0;
    }
    if !outcome.unsaved() {
        if let Some(data) = &outcome.reply.data {
            replies.send(route, data, peer).await;
        }
        return 0;
    }
    let saved = |outcome: RouteOutcome, socket: Arc<ReplySocket>, stats: Arc<UdpStats>, route: String| async move {
        match outcome.saved(&route).await {
            Ok(o) => {
                if let Some(data) = &o.reply.data {
                    send_reply(&socket, &stats, &route, data, peer).await;
                }
                0
            }
            Err(e) => {
                stats.failed.fetch_add(1, Relaxed);
                tracing::debug!(route = %route, %peer, error = %e, "reply withheld");
                -1
            }
        }
    };
    let job = saved(outcome, replies.socket.clone(), replies.stats.clone(), route.to_string());
    match replies.unsaved.clone().try_acquire_owned() {
        Ok(permit) => {
            tokio::spawn(async move {
                job.await;
                drop(permit);
            });
            0
        }
        Err(_) => job.await,
    }
}
