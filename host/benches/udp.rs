//! The UDP front-end and the JSON-RPC round trip of a running daemon,
//! against null baselines measured in the same run.
//!
//! `cargo bench --bench udp` starts `evrhost run` on a temporary config
//! (the counter plugin behind a `[[exec]]` UDP socket, echo behind
//! `evrexec:test`) and prints one table, like `calls.rs`: every evrhost
//! figure beside its baseline, the ratio, the target and PASS/MISS. The
//! bench reports; it never asserts.
//!
//! 1. UDP loss-free rate, searched twice: with a paced sendmmsg(2)
//!    generator, and with a UDP GSO generator (one send per 64 datagrams,
//!    cut by the kernel), whose lower CPU per datagram lets the offered
//!    rate pass 400k/s on 2 shared cores. In both, the generator (its own thread)
//!    sends N = R × 1 s datagrams at R/s, each carrying one key per trial;
//!    loss = 1 − (the counter plugin's count of that key) / sent. The
//!    highest R with loss < 0.1 % is searched (double from 100k/s, then
//!    bisect). The baseline is a null receiver in this process: a thread
//!    on its own socket (same receive buffer) that reads recvmmsg(2)
//!    batches of 32 and only counts. The two searches run interleaved,
//!    trial by trial, so a noisy neighbour hits both alike. A trial counts
//!    at the rate its generator reached: on a small machine the generator
//!    shares the cores with the receiver and may fall short of the target,
//!    and a figure marked ≥ means nothing was lost at the most it could
//!    offer. Each trial line gives the CPU per datagram of the receiver
//!    (by thread), the generator and the softirqs (loopback delivery), and
//!    what other processes used: a trial where they took over 15% of a
//!    core is run again.
//! 2. RPC round trip: 20,000 sequential `evrexec.run` calls of a route
//!    bound to echo over a keep-alive connection, against the same client
//!    talking to a minimal hyper HTTP/1.1 server in this process that
//!    answers every POST with a fixed body; blocks of 1,000 calls taken in
//!    turn. Three clients: a raw HTTP/1.1 client that busy-polls its socket
//!    for the answer (the server's latency, without the client's own
//!    wake-up), the same sleeping in read(2), and evrhost's hyper-based
//!    `RpcClient`. `core.version` through the busy-poll client shows the
//!    transport and JSON without a plugin call. `EVRHOST_BENCH_CASES`
//!    (`udp`, `rpc`; both by default) picks the parts to run.
//!
//! `EVRHOST_BENCH_UDP_WORKERS` overrides the exec's `workers` (default 2),
//! to see how the rate scales with them.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use bytes::Bytes;
use evrhost::frontend::client::RpcClient;
use evrhost::harness::Spawned;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmmsg, sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage};
use serde_json::{json, Value};

mod common;
use common::*;

/// Datagrams per sendmmsg call.
const SEND_BATCH: usize = 64;
/// Datagrams per recvmmsg call, as host/src/frontend/udp.rs reads them.
const RECV_BATCH: usize = 32;
/// Receive buffer asked for, by the daemon and the null receiver alike
/// (the kernel caps it at net.core.rmem_max).
const RECV_BUFFER: usize = 33_554_432;
/// Exec workers and counter instances: one per core of this 2-core
/// machine (4 measured 0.51–0.56× of null, 2 measured 0.64–0.69×: more
/// tasks than cores only add wake-ups).
const WORKERS: usize = 2;
const QUEUE: usize = 65_536;
/// A trial sends rate × TRIAL datagrams and gives up sending after TRIAL_CAP.
const TRIAL: Duration = Duration::from_secs(1);
const TRIAL_CAP: Duration = Duration::from_secs(3);
/// After sending: poll the count this often, at most SETTLE_MAX.
const SETTLE_POLL: Duration = Duration::from_millis(50);
const SETTLE_MAX: Duration = Duration::from_secs(3);
/// Loss-free means less than this fraction lost.
const MAX_LOSS: f64 = 0.001;
const START_RATE: f64 = 100_000.0;
const MAX_RATE: f64 = 3_200_000.0;
const MIN_RATE: f64 = 10_000.0;
const BISECTIONS: usize = 4;
/// Both searches together stop starting trials after this.
const SEARCH_BUDGET: Duration = Duration::from_secs(40);
/// A trial whose generator reached less than this share of the target
/// rate is generator-bound: the rate was not really offered.
const GENERATOR_SHARE: f64 = 0.95;
/// A trial during which other processes used more than this share of a
/// core is noisy: it is run again, at most NOISY_RETRIES times a search.
const NOISE_SHARE: f64 = 0.15;
const NOISY_RETRIES: usize = 3;

const RPC_WARMUP: usize = 2_000;
const RPC_CALLS: usize = 20_000;
const RPC_BLOCK: usize = 1_000;
const NULL_REPLY: &[u8] = br#"{"jsonrpc":"2.0","result":{},"id":1}"#;

// ---- formatting -----------------------------------------------------------------

struct Row {
    case: &'static str,
    evrhost: String,
    baseline: String,
    ratio: f64,
    target: &'static str,
    /// None: reported, no target.
    pass: Option<bool>,
}

// ---- scratch directory and the daemon ----------------------------------------------

/// A temporary directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> anyhow::Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("evrhost-bench-udp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `evrhost run`, killed on drop.
struct Daemon {
    process: Spawned,
    rpc: SocketAddr,
    udp: SocketAddr,
    log: PathBuf,
}

fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn plugin(name: &str) -> String {
    format!("{}/{name}.wasm", env!("EVRHOST_PLUGINS_DIR"))
}

/// `EVRHOST_BENCH_CASES`: `udp`, `rpc` or both (the default).
fn cases() -> String {
    std::env::var("EVRHOST_BENCH_CASES").unwrap_or_else(|_| "udp,rpc".into())
}

fn workers() -> usize {
    std::env::var("EVRHOST_BENCH_UDP_WORKERS").ok().and_then(|w| w.parse().ok()).filter(|w| *w > 0).unwrap_or(WORKERS)
}

fn daemon_config(cache: &Path, rpc: SocketAddr, udp: SocketAddr, workers: usize) -> String {
    format!(
        r#"
[runtime]
cache_dir = "{cache}"

[rpc]
listen = "{rpc}"

[[plugin]]
name = "counter"
path = "{counter}"
max_instances = {WORKERS}

[[plugin]]
name = "echo"
path = "{echo}"

[[route]]
name = "count"
plugin = "counter"

[[route]]
name = "evrexec:test"
plugin = "echo"

[[exec]]
name = "count"
sockaddr = "udp:{udp}"
workers = {workers}
queue = {QUEUE}
recv_buffer = {RECV_BUFFER}
reply = false
"#,
        cache = cache.display(),
        counter = plugin("counter"),
        echo = plugin("echo"),
    )
}

fn start_daemon(dir: &Path, workers: usize) -> anyhow::Result<Daemon> {
    let rpc: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()?).parse()?;
    let udp: SocketAddr = format!("127.0.0.1:{}", free_udp_port()?).parse()?;
    let config = dir.join("udp-bench.toml");
    std::fs::write(&config, daemon_config(&dir.join("cache"), rpc, udp, workers))?;
    let log = dir.join("evrhost.log");
    let bin = Path::new(env!("CARGO_BIN_EXE_evrhost"));
    let state = dir.display().to_string();
    let env = [("XDG_STATE_HOME", state.as_str())];
    let process = Spawned::start(bin, &config, rpc, &log, &env, Duration::from_secs(30))?;
    Ok(Daemon { process, rpc, udp, log })
}

impl Daemon {
    fn alive(&mut self) -> bool {
        self.process.alive()
    }

    /// The sum of a metric's samples, all labels together.
    fn metric(&self, name: &str) -> Option<u64> {
        metric(self.rpc, name)
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }
}

// ---- what the kernel says --------------------------------------------------------

/// The `Udp:` line of /proc/net/snmp, by name.
fn udp_snmp() -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return BTreeMap::new();
    };
    names
        .split_whitespace()
        .skip(1)
        .zip(values.split_whitespace().skip(1))
        .filter_map(|(n, v)| Some((n.to_string(), v.parse().ok()?)))
        .collect()
}

fn snmp_delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, name: &str) -> u64 {
    after.get(name).copied().unwrap_or(0).saturating_sub(before.get(name).copied().unwrap_or(0))
}

/// CPU seconds (user + system) of a /proc `stat` line, with its `comm`.
fn parse_stat(text: &str) -> Option<(String, f64)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on Linux.
    Some((comm, (utime + stime) as f64 / 100.0))
}

/// The calling thread's CPU seconds.
fn thread_cpu() -> f64 {
    std::fs::read_to_string("/proc/thread-self/stat").ok().and_then(|t| parse_stat(&t)).map_or(0.0, |(_, s)| s)
}

/// CPU seconds of each thread of a process, by thread id.
fn process_threads(pid: u32) -> BTreeMap<u32, (String, f64)> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        if let Some(stat) = std::fs::read_to_string(entry.path().join("stat")).ok().and_then(|t| parse_stat(&t)) {
            out.insert(tid, stat);
        }
    }
    out
}

/// CPU seconds spent between two snapshots, grouped by thread name.
fn cpu_by_name(before: &BTreeMap<u32, (String, f64)>, after: &BTreeMap<u32, (String, f64)>) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (tid, (comm, secs)) in after {
        let was = before.get(tid).map_or(0.0, |(_, s)| *s);
        let name = match comm.as_str() {
            c if c.starts_with("tokio-runtime") => "tokio".to_string(),
            c => c.trim_start_matches("evrhost-").to_string(),
        };
        *out.entry(name).or_insert(0.0) += secs - was;
    }
    out.retain(|_, s| *s > 0.0);
    out
}

// ---- the load generator and the null receiver --------------------------------------

struct Sent {
    count: u64,
    elapsed: Duration,
    /// sendmmsg calls that returned EAGAIN/ENOBUFS.
    stalls: u64,
    /// CPU seconds of the generator thread.
    cpu: f64,
}

/// Sends `n` copies of `payload` to `target` at `rate`/s: batches of
/// SEND_BATCH, each sent once its scheduled time has come (sleeping, not
/// spinning, until then: the daemon needs the cores). A generator that
/// falls behind catches up with batches back to back.
fn generate(target: SocketAddr, payload: &[u8], rate: f64, n: u64, gso: bool) -> std::io::Result<Sent> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.connect(target)?;
    let fd = socket.as_raw_fd();
    let mut headers = MultiHeaders::<()>::preallocate(SEND_BATCH, None);
    let slices: Vec<[IoSlice<'_>; 1]> = (0..SEND_BATCH).map(|_| [IoSlice::new(payload)]).collect();
    // The socket is connected: no address per message.
    let addrs = [None::<()>; SEND_BATCH];
    // UDP GSO: one send of SEND_BATCH payloads back to back, cut into
    // datagrams by the kernel, costs the generator far less CPU than
    // sendmmsg (one trip down the stack per batch), so more of the shared
    // cores is left to the receiver being measured. Kernels without it
    // fall back to sendmmsg.
    let gso = gso
        && !payload.is_empty()
        && nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::UdpGsoSegment, &(payload.len() as i32))
            .is_ok();
    let burst: Vec<u8> = payload.repeat(SEND_BATCH);
    let cpu = thread_cpu();
    let start = Instant::now();
    let (mut sent, mut stalls) = (0u64, 0u64);
    while sent < n {
        let now = Instant::now();
        if now.duration_since(start) > TRIAL_CAP {
            break;
        }
        let due = start + Duration::from_secs_f64(sent as f64 / rate);
        if due > now {
            std::thread::sleep(due - now);
        }
        let k = (n - sent).min(SEND_BATCH as u64) as usize;
        // Datagrams sent, the one pacing loop for both ways of sending.
        let result = if gso {
            socket
                .send(&burst[..k * payload.len()])
                .map(|bytes| bytes / payload.len())
                .map_err(|e| e.raw_os_error().map_or(Errno::EIO, Errno::from_raw))
        } else {
            let no_cmsgs: [ControlMessage<'_>; 0] = [];
            sendmmsg(fd, &mut headers, &slices[..k], &addrs[..k], no_cmsgs, MsgFlags::empty()).map(|r| r.count())
        };
        match result {
            Ok(count) => sent += count as u64,
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN | Errno::ENOBUFS) => {
                stalls += 1;
                std::thread::yield_now();
            }
            Err(e) => return Err(e.into()),
        }
    }
    let elapsed = start.elapsed();
    Ok(Sent { count: sent, elapsed, stalls, cpu: thread_cpu() - cpu })
}

/// A socket that only counts what it receives, in recvmmsg batches.
struct NullReceiver {
    addr: SocketAddr,
    /// SO_RCVBUF as the kernel set it.
    rcvbuf: usize,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NullReceiver {
    fn start() -> anyhow::Result<NullReceiver> {
        use socket2::{Domain, Protocol, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        // As the daemon does (host/src/frontend/udp.rs, `bind`).
        socket.set_recv_buffer_size(RECV_BUFFER)?;
        socket.set_nonblocking(true)?;
        socket.bind(&"127.0.0.1:0".parse::<SocketAddr>()?.into())?;
        let rcvbuf = socket.recv_buffer_size()?;
        let socket: UdpSocket = socket.into();
        let addr = socket.local_addr()?;
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (count.clone(), stop.clone());
        let thread =
            std::thread::Builder::new().name("null-udp".into()).spawn(move || null_receive(&socket, &c, &s))?;
        Ok(NullReceiver { addr, rcvbuf, count, stop, thread: Some(thread) })
    }
}

impl Drop for NullReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The receiver loop of host/src/frontend/udp.rs without the work: poll,
/// then drain in recvmmsg batches, counting.
fn null_receive(socket: &UdpSocket, count: &AtomicU64, stop: &AtomicBool) {
    let fd = socket.as_raw_fd();
    let mut buffers: Vec<Vec<u8>> = (0..RECV_BATCH).map(|_| vec![0u8; 65_536]).collect();
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(RECV_BATCH, None);
    while !stop.load(Relaxed) {
        let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(100u16)) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(_) => return,
        }
        loop {
            let mut slices: Vec<[IoSliceMut<'_>; 1]> = buffers.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
            let got = match recvmmsg(fd, &mut headers, slices.iter_mut(), MsgFlags::MSG_DONTWAIT, None) {
                Ok(results) => results.fold(0, |n, m| {
                    std::hint::black_box(m.bytes);
                    n + 1
                }),
                Err(Errno::EINTR) => continue,
                Err(_) => break,
            };
            count.fetch_add(got as u64, Relaxed);
            if got < RECV_BATCH {
                break;
            }
        }
    }
}

// ---- trials and the search ---------------------------------------------------------

/// What the daemon's metrics say about a trial.
struct Probe {
    /// Datagrams the daemon's receiver thread read.
    received: Option<u64>,
    /// Dropped because the queue was full.
    queue_drops: Option<u64>,
}

struct Trial {
    who: &'static str,
    rate: f64,
    sent: Sent,
    counted: u64,
    /// From the end of sending until the count stopped growing.
    settle: Duration,
    /// Udp RcvbufErrors in /proc/net/snmp (the whole host).
    kernel_drops: u64,
    in_errors: u64,
    /// evrhost only.
    probe: Option<Probe>,
    /// The receiving side's CPU seconds by thread name: the daemon's
    /// threads, or the null receiver's.
    cpu: BTreeMap<String, f64>,
    /// CPU seconds used by everything on the machine but the daemon and
    /// this bench (other work skews the figures).
    others: f64,
    /// CPU seconds in interrupts and softirqs, machine-wide: mostly the
    /// loopback delivery of the datagrams.
    softirq: f64,
    /// From the first datagram until the count was read for the last time.
    wall: Duration,
    /// Noisy, and run again.
    retried: bool,
}

impl Trial {
    fn loss(&self) -> f64 {
        if self.sent.count == 0 {
            return 1.0;
        }
        1.0 - self.counted as f64 / self.sent.count as f64
    }

    fn achieved(&self) -> f64 {
        self.sent.count as f64 / self.sent.elapsed.as_secs_f64().max(1e-9)
    }

    fn ok(&self) -> bool {
        self.loss() < MAX_LOSS
    }

    fn noisy(&self) -> bool {
        self.others > NOISE_SHARE * self.wall.as_secs_f64()
    }

    /// Receiver CPU per datagram counted, in µs.
    fn cpu_per_datagram(&self) -> f64 {
        self.cpu.values().sum::<f64>() / self.counted.max(1) as f64 * 1e6
    }

    fn line(&self) -> String {
        let mut line = format!(
            "  {:<7} target {:>9} sent {:>8} at {:>9} counted {:>8} loss {:>6.2}% {} settle {:>4} ms kernel drops {:>6}",
            self.who,
            fmt_rate(self.rate),
            self.sent.count,
            fmt_rate(self.achieved()),
            self.counted,
            self.loss() * 100.0,
            if self.ok() { "ok  " } else { "LOSS" },
            self.settle.as_millis(),
            self.kernel_drops,
        );
        if self.in_errors != self.kernel_drops {
            line.push_str(&format!(" (InErrors {})", self.in_errors));
        }
        if let Some(p) = &self.probe {
            let show = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
            line.push_str(&format!(" recv'd {} queue drops {}", show(p.received), show(p.queue_drops)));
        }
        let cpu: Vec<String> = self.cpu.iter().map(|(n, s)| format!("{n} {s:.2}")).collect();
        line.push_str(&format!(
            " | cpu s: {} ({:.1} µs/dgram), gen {:.2} ({:.1} µs/dgram), softirq {:.2} ({:.1} µs/dgram), others {:.2}",
            cpu.join(" "),
            self.cpu_per_datagram(),
            self.sent.cpu,
            self.sent.cpu / self.sent.count.max(1) as f64 * 1e6,
            self.softirq,
            self.softirq / self.sent.count.max(1) as f64 * 1e6,
            self.others,
        ));
        if self.sent.stalls > 0 {
            line.push_str(&format!(" ({} send stalls)", self.sent.stalls));
        }
        if self.retried {
            line.push_str(" [noisy: run again]");
        }
        line
    }
}

/// CPU seconds of a whole process.
fn process_cpu(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|t| parse_stat(&t)).map_or(0.0, |(_, s)| s)
}

/// CPU seconds the machine spent (all CPUs, /proc/stat): running tasks
/// (user, nice, system, steal), and in interrupts and softirqs, which no
/// task is charged for (loopback packets are delivered in softirqs).
fn machine_cpu() -> [f64; 2] {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = text.lines().next().and_then(|l| l.strip_prefix("cpu ")) else {
        return [0.0; 2];
    };
    let v: Vec<u64> = cpu.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let at = |i: usize| v.get(i).copied().unwrap_or(0) as f64 / 100.0;
    [at(0) + at(1) + at(2) + at(7), at(5) + at(6)]
}

/// CPU seconds of this process, of the daemon, of all tasks, and of
/// interrupts and softirqs.
fn cpu_snapshot(daemon: u32) -> [f64; 4] {
    let [tasks, irq] = machine_cpu();
    [process_cpu(std::process::id()), process_cpu(daemon), tasks, irq]
}

/// One trial against `target`; `count` reads how many of this trial's
/// datagrams were handled so far. `evr`: the target is the daemon (else
/// the null receiver of this process).
#[allow(clippy::too_many_arguments)]
fn trial(
    gso: bool,
    who: &'static str,
    target: SocketAddr,
    rate: f64,
    key: &str,
    count: &mut dyn FnMut() -> anyhow::Result<u64>,
    daemon: &Daemon,
    evr: bool,
) -> anyhow::Result<Trial> {
    let n = (rate * TRIAL.as_secs_f64()).round() as u64;
    let receiver = if evr { daemon.pid() } else { std::process::id() };
    let snmp = udp_snmp();
    let metrics =
        evr.then(|| (daemon.metric("evrhost_udp_received_total"), daemon.metric("evrhost_udp_dropped_total")));
    let threads = process_threads(receiver);
    let cpu = cpu_snapshot(daemon.pid());
    let payload = key.as_bytes().to_vec();
    let start = Instant::now();
    let sent = std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("udp-generator".into())
            .spawn_scoped(s, || generate(target, &payload, rate, n, gso))
            .map_err(anyhow::Error::from)
            .and_then(|t| t.join().map_err(|_| anyhow!("the generator panicked")))
    })??;
    let end = Instant::now();
    let mut counted = count()?;
    let (mut settled, mut still) = (end, 0);
    while counted < sent.count && end.elapsed() < SETTLE_MAX && still < 2 {
        std::thread::sleep(SETTLE_POLL);
        let now = count()?;
        if now == counted {
            still += 1;
        } else {
            (counted, settled, still) = (now, Instant::now(), 0);
        }
    }
    let cpu_after = cpu_snapshot(daemon.pid());
    let mut by_name = cpu_by_name(&threads, &process_threads(receiver));
    if !evr {
        by_name.retain(|name, _| name == "null-udp");
    }
    let after = udp_snmp();
    let probe = metrics.map(|(received, dropped)| {
        let delta = |now: Option<u64>, was: Option<u64>| now.zip(was).map(|(a, b)| a.saturating_sub(b));
        Probe {
            received: delta(daemon.metric("evrhost_udp_received_total"), received),
            queue_drops: delta(daemon.metric("evrhost_udp_dropped_total"), dropped),
        }
    });
    let d: Vec<f64> = cpu_after.iter().zip(cpu).map(|(a, b)| a - b).collect();
    Ok(Trial {
        who,
        rate,
        sent,
        counted,
        settle: settled.duration_since(end),
        kernel_drops: snmp_delta(&snmp, &after, "RcvbufErrors"),
        in_errors: snmp_delta(&snmp, &after, "InErrors"),
        probe,
        cpu: by_name,
        others: (d[2] - d[0] - d[1]).max(0.0),
        softirq: d[3],
        wall: start.elapsed(),
        retried: false,
    })
}

/// Doubles the offered rate from START_RATE while loss-free, then bisects.
/// A trial counts at the rate its generator reached (it shares the cores
/// with the receiver, and may fall short of the target); doubling stops
/// when that rate no longer rises.
struct Search {
    next: Option<f64>,
    /// Highest loss-free rate reached, lowest lossy one.
    lo: Option<f64>,
    hi: Option<f64>,
    /// The highest loss-free trial fell short of its target: the receiver
    /// lost nothing at the most the generator could offer.
    generator_bound: bool,
    bisections: usize,
    retries: usize,
    trials: Vec<Trial>,
}

impl Search {
    fn new() -> Search {
        Search {
            next: Some(START_RATE),
            lo: None,
            hi: None,
            generator_bound: false,
            bisections: 0,
            retries: 0,
            trials: Vec::new(),
        }
    }

    /// The highest loss-free rate reached.
    fn best(&self) -> f64 {
        self.lo.unwrap_or(0.0)
    }

    fn record(&mut self, mut t: Trial) {
        if t.noisy() && self.retries < NOISY_RETRIES {
            // Kept for the record; `next` stays: the same rate again.
            self.retries += 1;
            t.retried = true;
            self.trials.push(t);
            return;
        }
        let reached = t.achieved().min(t.rate);
        let short = reached < GENERATOR_SHARE * t.rate;
        let mut saturated = false;
        if t.ok() {
            let lo = self.lo.unwrap_or(0.0);
            // A doubled target that brought less than 10% more.
            saturated = short && reached < 1.1 * lo;
            if reached > lo {
                self.lo = Some(reached);
                self.generator_bound = short;
            }
        } else {
            self.hi = Some(self.hi.map_or(reached, |hi| hi.min(reached)));
        }
        self.trials.push(t);
        self.next = match (self.lo, self.hi) {
            (Some(lo), None) => (!saturated && lo * 2.0 <= MAX_RATE).then_some(lo * 2.0),
            (None, Some(hi)) => (hi / 2.0 >= MIN_RATE).then_some(hi / 2.0),
            (Some(lo), Some(hi)) if self.bisections < BISECTIONS && hi - lo > 0.05 * lo => {
                self.bisections += 1;
                Some(((lo + hi) / 2.0 / 1e3).round() * 1e3)
            }
            _ => None,
        };
    }
}

/// A JSON-RPC client that reconnects once when its connection is gone.
struct Rpc {
    addr: SocketAddr,
    client: RpcClient,
}

impl Rpc {
    async fn connect(addr: SocketAddr) -> anyhow::Result<Rpc> {
        Ok(Rpc { addr, client: RpcClient::connect(addr, None).await? })
    }

    async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        let doc = match self.client.call(method, params.clone()).await {
            Ok(doc) => doc,
            Err(_) => {
                self.client = RpcClient::connect(self.addr, None).await?;
                self.client.call(method, params).await?
            }
        };
        doc.get("result").cloned().ok_or_else(|| anyhow!("{method}: {doc}"))
    }
}

struct UdpResult {
    evr: Search,
    null: Search,
    null_rcvbuf: usize,
    elapsed: Duration,
}

fn udp_search(
    rt: &tokio::runtime::Runtime,
    daemon: &mut Daemon,
    rpc: &mut Rpc,
    gso: bool,
) -> anyhow::Result<UdpResult> {
    let null = NullReceiver::start()?;
    let (mut evr, mut nul) = (Search::new(), Search::new());
    let start = Instant::now();
    let mut run = 0usize;
    while start.elapsed() < SEARCH_BUDGET && (evr.next.is_some() || nul.next.is_some()) {
        // Rotate which side goes first.
        for side in [run % 2, (run + 1) % 2] {
            run += 1;
            if side == 0 {
                let Some(rate) = evr.next else { continue };
                if !daemon.alive() {
                    return Err(anyhow!("evrhost exited during the UDP search"));
                }
                let key = format!("k{}-{}-{run}", std::process::id(), u8::from(gso));
                let arg = json!(["counter.get", key]);
                let mut count = || -> anyhow::Result<u64> {
                    let v = rt.block_on(rpc.call("api.run", arg.clone()))?;
                    v.as_str().and_then(|s| s.trim().parse().ok()).ok_or_else(|| anyhow!("counter.get answered {v}"))
                };
                let t = trial(gso, "evrhost", daemon.udp, rate, &key, &mut count, daemon, true)?;
                eprintln!("{}", t.line());
                evr.record(t);
            } else {
                let Some(rate) = nul.next else { continue };
                let base = null.count.load(Relaxed);
                let mut count = || Ok(null.count.load(Relaxed) - base);
                let t = trial(gso, "null", null.addr, rate, "k-null", &mut count, daemon, false)?;
                eprintln!("{}", t.line());
                nul.record(t);
            }
        }
    }
    Ok(UdpResult { evr, null: nul, null_rcvbuf: null.rcvbuf, elapsed: start.elapsed() })
}

// ---- the RPC round trip ----------------------------------------------------------------

/// A hyper HTTP/1.1 server answering every request with NULL_REPLY.
fn start_null_http(rt: &tokio::runtime::Runtime) -> anyhow::Result<SocketAddr> {
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    rt.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    let mut resp = hyper::Response::new(Full::new(Bytes::from_static(NULL_REPLY)));
                    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// One sequence of timed round trips: a call answering whether it got a
/// JSON-RPC result, and what it measured.
struct Series<'a> {
    call: Box<dyn FnMut() -> anyhow::Result<bool> + 'a>,
    /// ns, sorted once all ran.
    times: Vec<f64>,
    errors: u64,
}

impl<'a> Series<'a> {
    fn new(call: impl FnMut() -> anyhow::Result<bool> + 'a) -> Series<'a> {
        Series { call: Box::new(call), times: Vec::with_capacity(RPC_CALLS), errors: 0 }
    }

    fn raw(addr: SocketAddr, method: &str, busy_poll: bool) -> anyhow::Result<Series<'a>> {
        let mut client = RawClient::connect(addr, busy_poll)?;
        let request = rpc_request(addr, method, r#"["evrexec:test","mydata"]"#);
        Ok(Series::new(move || client.round_trip(&request)))
    }

    fn hyper(rt: &'a tokio::runtime::Runtime, addr: SocketAddr) -> anyhow::Result<Series<'a>> {
        let mut client = rt.block_on(RpcClient::connect(addr, None))?;
        let params = json!(["evrexec:test", "mydata"]);
        Ok(Series::new(move || {
            let doc = rt.block_on(client.call("evrexec.run", params.clone()))?;
            Ok(doc.get("result").is_some())
        }))
    }

    fn q(&self, p: f64) -> f64 {
        quantile(&self.times, p)
    }
}

/// Runs every series' calls in blocks of RPC_BLOCK, taking the series in
/// turn (the first of a round rotating), so a noisy moment hits them alike;
/// each series' first RPC_WARMUP calls are not kept.
fn interleave(series: &mut [Series]) {
    let blocks = (RPC_WARMUP + RPC_CALLS) / RPC_BLOCK;
    let n = series.len();
    for block in 0..blocks {
        for k in 0..n {
            let s = &mut series[(block + k) % n];
            for _ in 0..RPC_BLOCK {
                let start = Instant::now();
                let ok = (s.call)();
                let ns = start.elapsed().as_nanos() as f64;
                if !matches!(ok, Ok(true)) {
                    s.errors += 1;
                }
                if block * RPC_BLOCK >= RPC_WARMUP {
                    s.times.push(ns);
                }
            }
        }
    }
    for s in series {
        s.times.sort_by(f64::total_cmp);
    }
}

// ---- main ------------------------------------------------------------------------------

fn main() {
    // `cargo bench` passes `--bench`; a filter or `--list` is not supported.
    if std::env::args().any(|a| a == "--list") {
        println!("udp: bench");
        return;
    }
    let started = Instant::now();
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let workers = workers();
    eprintln!("udp bench: {cores} cores, load avg {load} at start, exec workers {workers}");
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut trials = Vec::new();
    if let Err(e) = run(cores, workers, &mut rows, &mut notes, &mut trials) {
        notes.push(format!("ERROR: {e:#}"));
    }

    println!();
    println!(
        "evrhost UDP/RPC benchmark ({cores} cores shared by the daemon, the generator and the client; \
         load avg {load} at start)"
    );
    println!("{:<38} {:>12} {:>12} {:>7}   {:<26} result", "case", "evrhost", "baseline", "ratio", "target");
    for r in &rows {
        println!(
            "{:<38} {:>12} {:>12} {:>6.2}x   {:<26} {}",
            r.case,
            r.evrhost,
            r.baseline,
            r.ratio,
            r.target,
            match r.pass {
                Some(true) => "PASS",
                Some(false) => "MISS",
                None => "-",
            }
        );
    }
    println!();
    println!(
        "UDP trials (loss-free: < {}% lost; {} s of datagrams at the target rate, one key each; \
         kernel drops = Udp RcvbufErrors; others = CPU-s of other processes, over {:.0}% of a core: run again):",
        MAX_LOSS * 100.0,
        TRIAL.as_secs_f64(),
        NOISE_SHARE * 100.0
    );
    for t in &trials {
        println!("{t}");
    }
    for n in &notes {
        println!("{n}");
    }
    println!("total bench time: {:.1} s", started.elapsed().as_secs_f64());
}

fn run(
    cores: usize,
    workers: usize,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
    trials: &mut Vec<String>,
) -> anyhow::Result<()> {
    let scratch = Scratch::new()?;
    // The client side (RPC calls, counter polls) on this thread.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // The null HTTP server on its own 2-thread runtime, as the daemon has.
    let server_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut daemon = start_daemon(&scratch.0, workers)?;
    let mut rpc = rt.block_on(Rpc::connect(daemon.rpc))?;

    // 1. UDP, twice: with a sendmmsg generator (the issue's), whose own
    // CPU per datagram caps what either receiver can be offered on 2
    // shared cores, and with a UDP GSO generator, cheap enough to offer
    // more than 400k/s (and to let the null receiver run far ahead).
    let modes = [
        (false, "UDP loss-free, sendmmsg generator", "sendmmsg", "≥75% of null"),
        (true, "UDP loss-free, GSO generator", "GSO", "≥400k/s"),
    ];
    for (gso, case, mode, target) in modes {
        if !cases().contains("udp") {
            break;
        }
        let udp = udp_search(&rt, &mut daemon, &mut rpc, gso);
        match udp {
            Ok(u) => {
                let (e, n) = (u.evr.best(), u.null.best());
                let mark = |s: &Search| if s.generator_bound { "≥" } else { "" };
                rows.push(Row {
                    case,
                    evrhost: format!("{}{}", mark(&u.evr), fmt_rate(e)),
                    baseline: format!("{}{}", mark(&u.null), fmt_rate(n)),
                    ratio: e / n,
                    target,
                    pass: Some(e > 0.0 && if gso { e >= 400_000.0 } else { e >= 0.75 * n }),
                });
                let mut all: Vec<&Trial> = u.evr.trials.iter().chain(&u.null.trials).collect();
                all.sort_by_key(|t| t.who != "evrhost");
                trials.extend(all.iter().map(|t| t.line()));
                notes.push(format!(
                    "UDP ({mode}): exec workers {workers}, queue {QUEUE}, recv_buffer {RECV_BUFFER} asked, \
                 SO_RCVBUF {} granted (net.core.rmem_max {}); search took {:.1} s",
                    u.null_rcvbuf,
                    std::fs::read_to_string("/proc/sys/net/core/rmem_max").map_or("?".into(), |s| s.trim().to_string()),
                    u.elapsed.as_secs_f64()
                ));
                if u.null.generator_bound || u.evr.generator_bound {
                    notes.push(format!(
                        "UDP ({mode}): ≥ = the generator could not send faster (< {:.0}% of the target rate \
                     reached) without loss: the receiver's limit is higher",
                        GENERATOR_SHARE * 100.0
                    ));
                }
                // CPU per datagram at the highest loss-free rate of each side:
                // what caps the rate when the cores are shared.
                for (name, search) in [("evrhost", &u.evr), ("null", &u.null)] {
                    let Some(t) = search
                        .trials
                        .iter()
                        .filter(|t| t.ok() && !t.retried)
                        .max_by(|a, b| a.achieved().total_cmp(&b.achieved()))
                    else {
                        continue;
                    };
                    let per = |secs: f64| secs / t.sent.count.max(1) as f64 * 1e6;
                    let (gen, irq) = (per(t.sent.cpu), per(t.softirq));
                    let parts: Vec<String> =
                        t.cpu.iter().map(|(n, s)| format!("{n} {:.2}", s / t.counted.max(1) as f64 * 1e6)).collect();
                    notes.push(format!(
                    "UDP ({mode}) CPU per datagram at {} ({name}): receiver {:.2} µs ({}), generator {gen:.2} µs, \
                     softirq {irq:.2} µs; {cores} cores / their sum ≈ {} (where the cores saturate); others used {:.2} CPU-s",
                    fmt_rate(t.achieved()),
                    t.cpu_per_datagram(),
                    parts.join(", "),
                    fmt_rate(cores as f64 / ((t.cpu_per_datagram() + gen + irq) * 1e-6)),
                    t.others,
                ));
                }
                // What the daemon handled when it lost datagrams.
                if let Some(t) = u.evr.trials.iter().filter(|t| !t.ok() && !t.retried).min_by_key(|t| t.rate as u64) {
                    let handled_rate = t.counted as f64 / (t.sent.elapsed + t.settle).as_secs_f64();
                    notes.push(format!(
                        "UDP ({mode}): first lossy evrhost trial ({} target): counted {} in {:.2} s ≈ {} handled",
                        fmt_rate(t.rate),
                        t.counted,
                        (t.sent.elapsed + t.settle).as_secs_f64(),
                        fmt_rate(handled_rate),
                    ));
                }
            }
            Err(e) => notes.push(format!("ERROR: UDP search ({mode}): {e:#}")),
        }
    }

    // 2. RPC round trips: evrhost and the null server in turn, with three
    // clients; core.version shows what the transport and JSON cost without
    // a plugin call.
    let null_http = start_null_http(&server_rt)?;
    if !daemon.alive() {
        return Err(anyhow!("evrhost exited before the RPC case"));
    }
    let evr = daemon.rpc;
    let mut series = vec![
        Series::raw(evr, "evrexec.run", true)?,
        Series::raw(null_http, "evrexec.run", true)?,
        Series::raw(evr, "core.version", true)?,
        Series::raw(evr, "evrexec.run", false)?,
        Series::raw(null_http, "evrexec.run", false)?,
        Series::hyper(&rt, evr)?,
        Series::hyper(&rt, null_http)?,
    ];
    interleave(&mut series);
    let [poll_evr, poll_null, poll_version, block_evr, block_null, hyper_evr, hyper_null] = &series[..] else {
        unreachable!("seven series were made")
    };
    let row = |case, e: &Series, b: &Series, p: f64, target, pass| Row {
        case,
        evrhost: fmt_ns(e.q(p)),
        baseline: fmt_ns(b.q(p)),
        ratio: e.q(p) / b.q(p),
        target,
        pass,
    };
    let errors: u64 = series.iter().map(|s| s.errors).sum();
    rows.push(row(
        "RPC evrexec.run p50, busy-poll client",
        poll_evr,
        poll_null,
        0.5,
        "p50 ≤ 30 µs",
        Some(errors == 0 && poll_evr.q(0.5) <= 30_000.0),
    ));
    rows.push(row("RPC evrexec.run p99, busy-poll client", poll_evr, poll_null, 0.99, "(reported)", None));
    rows.push(row("RPC core.version p50, busy-poll client", poll_version, poll_null, 0.5, "(reported)", None));
    rows.push(row("RPC evrexec.run p50, blocking client", block_evr, block_null, 0.5, "(reported)", None));
    rows.push(row("RPC evrexec.run p50, hyper client", hyper_evr, hyper_null, 0.5, "(reported)", None));
    notes.push(format!(
        "RPC: {RPC_CALLS} sequential calls per series after {RPC_WARMUP} warm-up, each series on its own keep-alive \
         connection, blocks of {RPC_BLOCK} taken in turn; baseline = a hyper HTTP/1.1 server in the bench process \
         answering a fixed body. Clients: busy-poll and blocking = a raw HTTP/1.1 client polling the socket or \
         sleeping in read(2); hyper = evrhost's RpcClient (as `evrhost rpc`) on a current-thread runtime. \
         p99 blocking {} vs {}, hyper {} vs {}",
        fmt_ns(block_evr.q(0.99)),
        fmt_ns(block_null.q(0.99)),
        fmt_ns(hyper_evr.q(0.99)),
        fmt_ns(hyper_null.q(0.99)),
    ));
    if errors > 0 {
        notes.push(format!("WARNING: {errors} RPC call(s) failed while timed; the RPC figures are not trustworthy"));
    }
    drop(series);
    let warnings = std::fs::read_to_string(&daemon.log)
        .map(|l| l.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).count())
        .unwrap_or(0);
    notes.push(format!("daemon log: {warnings} warning/error line(s)"));
    drop(rpc);
    drop(daemon);
    server_rt.shutdown_background();
    Ok(())
}
