//! UDP front-end: evrexec's `sockaddr` tasks. Each datagram is one call of
//! the route with its data and its source (`origin = udp(peer)`); the
//! reply's data, when the handler gives some, goes back to the source.
//!
//! Kamailio's evrexec reads one datagram per `recvfrom` and runs the route
//! in that same process, so a slow route stalls the socket and a flood is
//! lost in the kernel. Here a receiver thread reads batches with
//! recvmmsg(2) and runs each batch where it lands or hands it on:
//! - run to completion: while it keeps up, the receiver thread runs the
//!   route itself, datagram by datagram, with no
//!   hop to another thread. At light load this is one wake-up per read,
//!   not three (receiver, worker, receiver again), and most of the CPU a
//!   datagram costs;
//! - handed on: once `HAND_ON_AFTER` (4) reads in a row came back full
//!   (the socket holds more than a burst: the receiver is behind), batches
//!   go to `workers` async tasks through a bounded queue, so the receiver
//!   goes on reading while they work. With one worker, datagrams are
//!   handled in arrival order either way, as evrexec does (nothing runs
//!   here while a handed-on one is unfinished); with more, concurrently
//!   (no order between them), and the receiver runs the next read itself
//!   as soon as it is no longer behind;
//! - a route whose call took `SLOW_INLINE` (1 ms) on the receiver thread
//!   (a slow guest, or one the runtime sent to its slow lane; not a call
//!   the scheduler merely preempted, which rusage tells apart) is not run
//!   there again for `DEMOTION` (1 s), doubled at every slow call after a
//!   demotion up to `MAX_DEMOTION` and reset by a quick one: a slow route
//!   stalls the socket for at most one call now and then, and otherwise
//!   has the workers and the queue between it and the kernel;
//! - a batch travels as one queue item (one wake-up, not 32), but the
//!   bound counts datagrams: when `queue` datagrams wait, more are dropped
//!   and counted (the `dropped` metric, and a warning at most once a
//!   second): the receiver never blocks on the workers and memory never
//!   grows without bound;
//! - buffers hold 65,536 bytes, more than the largest UDP payload, so no
//!   datagram is cut;
//! - dense traffic is read at a pace: once reads come less than
//!   `coalesce_us` (100 µs) apart, or one that was handed on found several
//!   datagrams but not a full batch, the receiver sleeps until `coalesce_us`
//!   after the last read began and reads what came meanwhile, instead of
//!   waking for each datagram; it waits for the socket again after a read
//!   that finds nothing. A wake-up costs more than the route on a small
//!   machine (a fast receiver drains the socket and sleeps between two
//!   datagrams of a burst), so this bounds wake-ups to 10,000 a second
//!   and gives each hand-over more datagrams. A datagram waits at most
//!   `coalesce_us`; the first after a quiet spell is never delayed.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::task::JoinHandle;

use super::{Context, Frontend, FrontendError, Running};
use crate::bus::Profiler;
use crate::config::UdpDef;
use crate::dispatcher::{Dispatcher, RouteOutcome};
use crate::runtime::{Origin, Peer, Request};

mod inline;
mod stats;
use inline::{Inline, HAND_ON_AFTER};
use stats::{socket_inode, UdpMetrics};
pub use stats::{UdpEndpoint, UdpStats};

/// Datagrams read per recvmmsg call.
const BATCH: usize = 32;
/// Larger than any UDP payload (65,507 bytes over IPv4, 65,527 over IPv6).
const BUFFER: usize = 65_536;

/// The UDP front-end: every `[[exec]]` with a `sockaddr`.
pub struct Udp;

impl Frontend for Udp {
    type Settings = Vec<UdpDef>;
    const NAME: &'static str = "udp";

    async fn start(defs: Vec<UdpDef>, ctx: &Context) -> Result<Running, FrontendError> {
        let mut running = Running::new(Self::NAME);
        let mut endpoints = Vec::new();
        for def in &defs {
            let socket = bind(def).map_err(|e| FrontendError::new(Self::NAME, e))?;
            let (endpoint, tasks) =
                start(def, socket, ctx.dispatcher.clone()).map_err(|e| FrontendError::new(Self::NAME, e))?;
            tracing::info!(route = %def.route, workers = def.workers, "UDP on udp:{}", endpoint.addr);
            endpoints.push(endpoint);
            for task in tasks {
                running.task(task);
            }
        }
        running.metrics(Arc::new(UdpMetrics(endpoints)));
        Ok(running)
    }
}

/// Binds `def.addr` (non-blocking) with the configured receive buffer.
pub fn bind(def: &UdpDef) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let context = |e: io::Error| io::Error::new(e.kind(), format!("udp:{}: {e}", def.addr));
    let socket = Socket::new(Domain::for_address(def.addr), Type::DGRAM, Some(Protocol::UDP)).map_err(context)?;
    if let Some(size) = def.recv_buffer {
        socket.set_recv_buffer_size(size).map_err(context)?;
    }
    socket.set_nonblocking(true).map_err(context)?;
    socket.bind(&def.addr.into()).map_err(context)?;
    Ok(socket.into())
}

/// One recvmmsg batch as one allocation: the datagrams' bytes back to
/// back, and where each ends with its source. A worker copies each into
/// its reused request buffer, so no datagram costs an allocation of its
/// own (nor a free on another thread).
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    /// (end offset in `bytes`, source).
    ends: Vec<(usize, SocketAddr)>,
}

impl Batch {
    fn len(&self) -> usize {
        self.ends.len()
    }

    fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn datagrams(&self) -> impl Iterator<Item = (&[u8], SocketAddr)> {
        let mut start = 0;
        self.ends.iter().map(move |&(end, peer)| {
            let data = self.bytes.get(start..end).unwrap_or_default();
            start = end;
            (data, peer)
        })
    }
}

/// Datagrams handed to the workers, counted across batches.
struct Backlog {
    /// In the queue: bounded by `limit`.
    waiting: AtomicUsize,
    /// In the queue or in a worker's hands: with one worker, while any
    /// is, the receiver hands every batch on (to keep arrival order).
    unfinished: AtomicUsize,
    limit: usize,
}

/// Serves `def.route` on `socket`: the receiver thread ends once the
/// returned worker tasks are aborted (it sees the queue closed). Called
/// on the daemon's runtime, which the receiver thread runs its calls on.
pub fn start(
    def: &UdpDef,
    socket: std::net::UdpSocket,
    d: Arc<Dispatcher>,
) -> io::Result<(UdpEndpoint, Vec<JoinHandle<()>>)> {
    let (route, addr) = (def.route.as_str(), socket.local_addr().unwrap_or(def.addr));
    let inode = socket_inode(socket.as_raw_fd());
    let sender = Arc::new(ReplySocket::new(socket.try_clone()?)?);
    let stats = Arc::new(UdpStats::default());
    let backlog = Arc::new(Backlog { waiting: AtomicUsize::new(0), unfinished: AtomicUsize::new(0), limit: def.queue });
    let unsaved = Arc::new(tokio::sync::Semaphore::new(MAX_UNSAVED_REPLIES));
    // The channel holds batches; `backlog` bounds the datagrams in them.
    let (tx, rx) = async_channel::bounded::<Batch>(def.queue.div_ceil(BATCH).max(4));
    let handler = || Handler {
        d: d.clone(),
        replies: Replies { socket: sender.clone(), stats: stats.clone(), on: def.reply, unsaved: unsaved.clone() },
        profiling: def.profiling.then(|| format!("UDP receiver udp:{addr}")),
        request: Request { route: route.to_string(), data: Vec::new(), params: Vec::new(), origin: Origin::Cli },
        last_peer: None,
    };
    let mut tasks = Vec::new();
    for _ in 0..def.workers {
        let (rx, backlog, mut handler) = (rx.clone(), backlog.clone(), handler());
        tasks.push(tokio::spawn(async move {
            while let Ok(batch) = rx.recv().await {
                backlog.waiting.fetch_sub(batch.len(), Relaxed);
                for (data, peer) in batch.datagrams() {
                    handler.datagram(data, peer).await;
                }
                backlog.unfinished.fetch_sub(batch.len(), Release);
                give_way();
            }
        }));
    }
    let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
    let inline = Inline::new(runtime, handler(), def.workers == 1);
    let (name, receiver_stats, coalesce) = (route.to_string(), stats.clone(), def.coalesce);
    std::thread::Builder::new().name("evrhost-udp".into()).spawn(move || {
        if let Err(e) = receive(&socket, &tx, &backlog, &receiver_stats, &name, coalesce, inline) {
            tracing::error!(route = %name, %addr, error = %e, "UDP receiver stopped");
        }
    })?;
    Ok((UdpEndpoint { name: route.to_string(), addr, stats, inode }, tasks))
}

/// Runs the route for one datagram after another: a worker's, or the
/// receiver thread's own.
struct Handler {
    d: Arc<Dispatcher>,
    replies: Replies,
    /// The profiler's name for this socket, when `profiling` is on.
    profiling: Option<String>,
    /// Reused: only the data and, when the peer changes, the origin.
    request: Request,
    last_peer: Option<SocketAddr>,
}

impl Handler {
    async fn datagram(&mut self, data: &[u8], peer: SocketAddr) {
        // Most datagrams come from a few peers: the origin (a formatted
        // IP) is rebuilt only when the peer changes.
        if self.last_peer != Some(peer) {
            self.request.origin = Origin::Udp(Peer { ip: peer.ip().to_canonical().to_string(), port: peer.port() });
            self.last_peer = Some(peer);
        }
        self.request.data.clear();
        self.request.data.extend_from_slice(data);
        let (d, request, replies) = (&self.d, &self.request, &self.replies);
        match self.profiling.as_ref().filter(|_| d.bus().wanted("E_PROFILING_PROC")) {
            None => {
                handle(d, request, peer, replies).await;
            }
            Some(name) => {
                let mut profiler = Profiler::start(d.bus(), "E_PROFILING_PROC", name);
                profiler.enter("udp datagram", "udp", 0);
                let status = handle(d, request, peer, replies).await;
                profiler.exit("udp datagram", "udp", 0, status);
                profiler.end(name, status);
            }
        }
    }
}

/// Replies waiting for their kv writes to be durable, per socket; past
/// this a worker waits for its own before taking the next datagram.
const MAX_UNSAVED_REPLIES: usize = 4096;

/// The socket's clone replies go out through. It is registered with
/// tokio for writing only: a clone registered for reading too (as
/// `tokio::net::UdpSocket` is) has every arriving datagram wake a tokio
/// worker for a readiness nobody awaits — measured 0.6 wake-ups and
/// 4–9 µs of CPU per datagram, most of what a datagram cost.
struct ReplySocket(AsyncFd<std::net::UdpSocket>);

impl ReplySocket {
    fn new(socket: std::net::UdpSocket) -> io::Result<ReplySocket> {
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
struct Replies {
    socket: Arc<ReplySocket>,
    stats: Arc<UdpStats>,
    /// Set: replies go back (`reply = true`).
    on: bool,
    unsaved: Arc<tokio::sync::Semaphore>,
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

/// Runs the route for one datagram; the status is 0, or -1 when the call
/// failed (for profiling records). A reply whose kv writes are not yet
/// durable is sent once they are, while the worker takes the next
/// datagram; without a reply nothing is acknowledged, so nothing waits.
async fn handle(d: &Dispatcher, request: &Request, peer: SocketAddr, replies: &Replies) -> i64 {
    let route = request.route.as_str();
    let outcome = match d.run_route_unsaved(request).await {
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

fn to_std(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    addr.as_sockaddr_in6().map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// Warns of dropped datagrams at most once a second.
struct DropWarning {
    since: u64,
    last: Option<Instant>,
}

impl DropWarning {
    fn warn(&mut self, route: &str) {
        if self.since > 0 && self.last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            tracing::warn!(route = %route, dropped = self.since, "UDP queue full: datagrams dropped");
            (self.since, self.last) = (0, Some(Instant::now()));
        }
    }
}

/// The receiver thread: waits for the socket with poll(2) (waking every
/// 250 ms to notice shutdown), then drains it in recvmmsg batches, each
/// run here or handed on (see the module doc).
fn receive(
    socket: &std::net::UdpSocket,
    tx: &async_channel::Sender<Batch>,
    backlog: &Backlog,
    stats: &UdpStats,
    route: &str,
    coalesce: Duration,
    mut inline: Inline,
) -> io::Result<()> {
    let fd = socket.as_raw_fd();
    let mut buffers: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; BUFFER]).collect();
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut received: Vec<(usize, Option<SocketAddr>)> = Vec::with_capacity(BATCH);
    let mut drops = DropWarning { since: 0, last: None };
    // Full reads in a row: the socket holds this many batches or more.
    let mut behind = 0usize;
    // When the last read began, and whether the next is paced (see the
    // module doc): then it comes after a sleep instead of a poll.
    let (mut last_read, mut paced) = (None::<Instant>, false);
    while !tx.is_closed() {
        drops.warn(route);
        if !paced {
            let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(250u16)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let began = Instant::now();
        let soon = last_read.is_some_and(|last| began.duration_since(last) < coalesce);
        last_read = Some(began);
        let (mut read, mut crowded) = (0usize, false);
        loop {
            // The slices borrow the buffers only inside this block.
            let batch = {
                let mut slices: Vec<[IoSliceMut<'_>; 1]> = buffers.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
                recvmmsg(fd, &mut headers, slices.iter_mut(), MsgFlags::MSG_DONTWAIT, None).map(|results| {
                    received.clear();
                    received.extend(results.map(|msg| (msg.bytes, msg.address.as_ref().and_then(to_std))));
                })
            };
            match batch {
                Ok(()) => {}
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    // ICMP errors caused by earlier replies and the like.
                    tracing::debug!(route = %route, error = %e, "recvmmsg");
                    break;
                }
            }
            stats.received.fetch_add(received.len() as u64, Relaxed);
            read += received.len();
            let full = received.len() == BATCH;
            behind = if full { behind + 1 } else { 0 };
            // With one worker, nothing runs here while one it was given
            // is unfinished (Acquire: its last datagram is handled before
            // this thread runs the next). With more there is no order to
            // keep, and waiting for them would keep the receiver handing
            // on for as long as datagrams come faster than a worker wakes.
            let first = if behind < HAND_ON_AFTER
                && (!inline.ordered || backlog.unfinished.load(Acquire) == 0)
                && inline.allowed(Instant::now())
            {
                inline.run(&buffers, &received, route)
            } else {
                0
            };
            stats.inline.fetch_add(first as u64, Relaxed);
            if first < received.len() {
                match hand_on(&buffers, &received[first..], first, tx, backlog) {
                    Some(lost) if lost > 0 => {
                        stats.dropped.fetch_add(lost as u64, Relaxed);
                        drops.since += lost as u64;
                    }
                    Some(_) => {}
                    None => return Ok(()),
                }
                drops.warn(route);
                // Under load: the next hand-over should carry more.
                crowded |= !full && received.len() > 1;
                if full {
                    give_way();
                }
            }
            if !full {
                break;
            }
        }
        paced = read > 0 && !coalesce.is_zero() && (paced || soon || crowded);
        if paced {
            if let Some(rest) = (began + coalesce).checked_duration_since(Instant::now()) {
                std::thread::sleep(rest);
            }
        }
    }
    Ok(())
}

/// Lets the other threads of the same priority run: under overload the
/// receiver and the workers never wait, and on a daemon run under a
/// real-time policy (`chrt -f`, as the Kamailio anchor is), where threads
/// of one priority are not time-sliced, the RPC thread would otherwise
/// get a core only when one of them sleeps, or when the kernel's
/// real-time throttling steps in (50 ms a second). One sched_yield(2)
/// per batch.
fn give_way() {
    std::thread::yield_now();
}

/// Queues `received` (the datagrams of `buffers` from `first` on) for the
/// workers, as much as the backlog's bound allows; the number dropped, or
/// None once the workers are gone.
fn hand_on(
    buffers: &[Vec<u8>],
    received: &[(usize, Option<SocketAddr>)],
    first: usize,
    tx: &async_channel::Sender<Batch>,
    backlog: &Backlog,
) -> Option<usize> {
    let room = backlog.limit.saturating_sub(backlog.waiting.load(Relaxed));
    let mut batch = Batch {
        bytes: Vec::with_capacity(received.iter().take(room).map(|(len, _)| *len).sum()),
        ends: Vec::with_capacity(received.len().min(room)),
    };
    for (buffer, (len, peer)) in buffers[first..].iter().zip(received).take(room) {
        let Some(peer) = *peer else { continue };
        batch.bytes.extend_from_slice(&buffer[..(*len).min(BUFFER)]);
        batch.ends.push((batch.bytes.len(), peer));
    }
    let mut lost = received.len() - batch.len();
    if !batch.is_empty() {
        let n = batch.len();
        backlog.waiting.fetch_add(n, Relaxed);
        backlog.unfinished.fetch_add(n, Relaxed);
        match tx.try_send(batch) {
            Ok(()) => {}
            Err(async_channel::TrySendError::Full(_)) => {
                backlog.waiting.fetch_sub(n, Relaxed);
                backlog.unfinished.fetch_sub(n, Relaxed);
                lost += n;
            }
            Err(async_channel::TrySendError::Closed(_)) => return None,
        }
    }
    Some(lost)
}
