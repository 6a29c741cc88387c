//! UDP front-end: evrexec's `sockaddr` tasks. Each datagram is one request
//! of the route with its data and its source (`origin = udp(peer)`); the
//! reply's data, when the handler gives some, goes back to the source. A
//! read's datagrams may reach the plugin in one call (its `batch` export).
//!
//! Kamailio's evrexec reads one datagram per `recvfrom` and runs the route
//! in that same process, so a slow route stalls the socket and a flood is
//! lost in the kernel. Here a receiver thread reads batches with
//! recvmmsg(2) and runs each batch where it lands or hands it on:
//! - run to completion: while it keeps up, the receiver thread runs the
//!   route itself, with no hop to another thread. At light load this is
//!   one wake-up per read, not three (receiver, worker, receiver again),
//!   and most of the CPU a datagram costs;
//! - handed on: once reads have kept coming back full for `BEHIND_AFTER`
//!   (2 ms), with no wait of `QUIET` (100 µs) for the socket between them
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
//!   `coalesce_us`; the first after a quiet spell is never delayed;
//! - a receiver the socket woke keeps reading for `LINGER` (5 µs) after
//!   each read that found datagrams, so the datagrams of a burst, a
//!   microsecond or two apart, cost one wake-up and not one each (a paced
//!   read does not linger: its sleep is what gathers them);
//! - a read's datagrams run in one call when the plugin exports `batch`
//!   (`Dispatcher::run_batch_unsaved`), here and on the workers.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
use tokio::task::JoinHandle;

use super::{Context, Frontend, FrontendError, Running};
use crate::config::UdpDef;
use crate::dispatcher::Dispatcher;

mod handler;
mod inline;
mod stats;
use handler::{Handler, Replies, ReplySocket, MAX_UNSAVED_REPLIES};
use inline::{Inline, BEHIND_AFTER};
use stats::{socket_inode, UdpMetrics};
pub use stats::{UdpEndpoint, UdpStats};

/// Datagrams read per recvmmsg call.
const BATCH: usize = 32;
/// How long a receiver woken by the socket keeps reading after a read
/// that found datagrams: the rest of a burst comes a microsecond or two
/// apart, and a wake-up costs more than this.
const LINGER: Duration = Duration::from_micros(5);
/// A wait this long for the socket means the receiver keeps up: the full
/// reads before it were a burst (say 64 datagrams sent at once, which
/// fill two reads), not a backlog.
const QUIET: Duration = Duration::from_micros(100);
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
    let handler = || {
        let replies = Replies { socket: sender.clone(), stats: stats.clone(), on: def.reply, unsaved: unsaved.clone() };
        Handler::new(d.clone(), route, replies, def.profiling.then(|| format!("UDP receiver udp:{addr}")))
    };
    // The workers hold the write end: once they have all ended (aborted at
    // shutdown), the receiver's poll sees the read end hang up, so it
    // waits for datagrams without waking up now and then to look.
    let (stopped, running) = io::pipe()?;
    let running = Arc::new(running);
    let mut tasks = Vec::new();
    for _ in 0..def.workers {
        let (rx, backlog, mut handler) = (rx.clone(), backlog.clone(), handler());
        let running = running.clone();
        tasks.push(tokio::spawn(async move {
            let _running = running;
            while let Ok(batch) = rx.recv().await {
                backlog.waiting.fetch_sub(batch.len(), Relaxed);
                handler.datagrams(batch.datagrams()).await;
                backlog.unfinished.fetch_sub(batch.len(), Release);
                give_way();
            }
        }));
    }
    let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
    let inline = Inline::new(runtime, handler(), def.workers == 1);
    let (name, receiver_stats, coalesce) = (route.to_string(), stats.clone(), def.coalesce);
    drop(running);
    std::thread::Builder::new().name("evrhost-udp".into()).spawn(move || {
        let ends = Ends { socket: &socket, stopped: &stopped };
        if let Err(e) = receive(ends, &tx, &backlog, &receiver_stats, &name, coalesce, inline) {
            tracing::error!(route = %name, %addr, error = %e, "UDP receiver stopped");
        }
    })?;
    Ok((UdpEndpoint { name: route.to_string(), addr, stats, inode }, tasks))
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

/// What a receiver thread waits on: its socket, and the pipe whose write
/// end the workers hold.
struct Ends<'a> {
    socket: &'a std::net::UdpSocket,
    stopped: &'a io::PipeReader,
}

/// The receiver thread: waits for the socket or the workers' end with
/// poll(2) (waking once a second only while a drop warning is due), then
/// drains the socket in recvmmsg batches, each run here or handed on (see
/// the module doc).
fn receive(
    Ends { socket, stopped }: Ends<'_>,
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
    // Since when reads have come back full, with no quiet wait between.
    let mut full_since = None::<Instant>;
    // When the last read began, and whether the next is paced (see the
    // module doc): then it comes after a sleep instead of a poll.
    let (mut last_read, mut paced) = (None::<Instant>, false);
    while !tx.is_closed() {
        drops.warn(route);
        if !paced {
            let mut fds =
                [PollFd::new(socket.as_fd(), PollFlags::POLLIN), PollFd::new(stopped.as_fd(), PollFlags::POLLIN)];
            let wait = if drops.since > 0 { PollTimeout::from(1000u16) } else { PollTimeout::NONE };
            let polled = Instant::now();
            match poll(&mut fds, wait) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) if fds[1].any().unwrap_or(true) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
            if polled.elapsed() >= QUIET {
                full_since = None;
            }
        }
        let began = Instant::now();
        let soon = last_read.is_some_and(|last| began.duration_since(last) < coalesce);
        last_read = Some(began);
        let (mut read, mut crowded) = (0usize, false);
        // Until when an empty read is retried at once (see `LINGER`).
        let mut linger_until = None::<Instant>;
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
                Err(nix::errno::Errno::EAGAIN) => {
                    if linger_until.is_some_and(|until| Instant::now() < until) {
                        std::hint::spin_loop();
                        continue;
                    }
                    break;
                }
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
            let now = Instant::now();
            full_since = if full { Some(full_since.unwrap_or(now)) } else { None };
            let behind = full_since.is_some_and(|since| now.duration_since(since) >= BEHIND_AFTER);
            // With one worker, nothing runs here while one it was given
            // is unfinished (Acquire: its last datagram is handled before
            // this thread runs the next). With more there is no order to
            // keep, and waiting for them would keep the receiver handing
            // on for as long as datagrams come faster than a worker wakes.
            let first = if !behind && (!inline.ordered || backlog.unfinished.load(Acquire) == 0) && inline.allowed(now)
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
            if !full && paced {
                break;
            }
            linger_until = Some(Instant::now() + LINGER);
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
