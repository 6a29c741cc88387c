//! The load generator, the null receiver and what /proc says about CPU
//! and the kernel's UDP counters: the parts every receiver is measured by.

use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmmsg, sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage};

/// Datagrams per sendmmsg call.
pub const SEND_BATCH: usize = 64;
/// Datagrams per recvmmsg call, as host/src/frontend/udp.rs reads them.
pub const RECV_BATCH: usize = 32;
/// Receive buffer asked for, by the daemon and the null receiver alike
/// (the kernel caps it at net.core.rmem_max).
pub const RECV_BUFFER: usize = 33_554_432;

/// The anchor's datagrams (`host/benches/kamailio/handler.lua`): 63 bytes
/// each, `ev` rotating through reg/inv/bye/opt, user and seq counting up.
/// One sendmmsg batch's worth, all of one length (as UDP GSO needs).
pub fn anchor_payloads() -> Vec<Vec<u8>> {
    const EVENTS: [&str; 4] = ["reg", "inv", "bye", "opt"];
    (0..SEND_BATCH)
        .map(|i| {
            format!("ev={};user=u{:07};dom=example.org;seq={:08};ts=1700000000", EVENTS[i % 4], i + 1, i + 1)
                .into_bytes()
        })
        .collect()
}

/// How the generator sends.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// sendmmsg(2) batches of SEND_BATCH: the anchor's generator.
    Sendmmsg,
    /// UDP GSO: one send of SEND_BATCH payloads back to back, cut into
    /// datagrams by the kernel. It costs the generator far less CPU per
    /// datagram (one trip down the stack per batch), so more of the shared
    /// cores is left to the receiver being measured.
    Gso,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Sendmmsg => "sendmmsg",
            Mode::Gso => "GSO",
        }
    }
}

pub struct Sent {
    pub count: u64,
    pub elapsed: Duration,
    /// sendmmsg calls that returned EAGAIN/ENOBUFS.
    pub stalls: u64,
    /// CPU seconds of the generator thread.
    pub cpu: f64,
}

/// Sends `n` datagrams of `payloads` (in turn) to `target` at `rate`/s
/// (unpaced when infinite), for at most `cap`: batches of SEND_BATCH,
/// each sent once its scheduled time has come (sleeping, not spinning,
/// until then: the receivers need the cores). A generator that falls
/// behind catches up with batches back to back. With `share`, it yields
/// after each batch, as the daemon's threads do under load: a generator
/// run under a real-time policy then shares the cores with the threads of
/// its priority instead of holding one.
pub fn generate(
    target: SocketAddr,
    payloads: &[Vec<u8>],
    rate: f64,
    n: u64,
    cap: Duration,
    mode: Mode,
    share: bool,
) -> std::io::Result<Sent> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.connect(target)?;
    let fd = socket.as_raw_fd();
    let mut headers = MultiHeaders::<()>::preallocate(SEND_BATCH, None);
    let slices: Vec<[IoSlice<'_>; 1]> = payloads.iter().cycle().take(SEND_BATCH).map(|p| [IoSlice::new(p)]).collect();
    // The socket is connected: no address per message.
    let addrs = [None::<()>; SEND_BATCH];
    let size = payloads.first().map_or(0, Vec::len);
    // Kernels without UDP GSO fall back to sendmmsg.
    let gso = mode == Mode::Gso
        && size > 0
        && payloads.iter().all(|p| p.len() == size)
        && nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::UdpGsoSegment, &(size as i32)).is_ok();
    let burst: Vec<u8> = payloads.iter().cycle().take(SEND_BATCH).flatten().copied().collect();
    let cpu = thread_cpu();
    let start = Instant::now();
    let (mut sent, mut stalls) = (0u64, 0u64);
    while sent < n {
        let now = Instant::now();
        if now.duration_since(start) > cap {
            break;
        }
        if rate.is_finite() {
            let due = start + Duration::from_secs_f64(sent as f64 / rate);
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        let k = (n - sent).min(SEND_BATCH as u64) as usize;
        // Datagrams sent, the one pacing loop for both ways of sending.
        let result = if gso {
            socket
                .send(&burst[..k * size])
                .map(|bytes| bytes / size)
                .map_err(|e| e.raw_os_error().map_or(Errno::EIO, Errno::from_raw))
        } else {
            let no_cmsgs: [ControlMessage<'_>; 0] = [];
            sendmmsg(fd, &mut headers, &slices[..k], &addrs[..k], no_cmsgs, MsgFlags::empty()).map(|r| r.count())
        };
        if share {
            std::thread::yield_now();
        }
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
pub struct NullReceiver {
    pub addr: SocketAddr,
    /// SO_RCVBUF as the kernel set it.
    pub rcvbuf: usize,
    pub count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NullReceiver {
    pub fn start() -> anyhow::Result<NullReceiver> {
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

// ---- what the kernel says --------------------------------------------------------

/// The `Udp:` line of /proc/net/snmp, by name.
pub fn udp_snmp() -> BTreeMap<String, u64> {
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

pub fn snmp_delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, name: &str) -> u64 {
    after.get(name).copied().unwrap_or(0).saturating_sub(before.get(name).copied().unwrap_or(0))
}

/// A /proc `stat` line's `comm` and parent pid.
fn parse_stat(text: &str) -> Option<(String, u32)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    // After the comm: the state, then the ppid.
    let ppid: u32 = text.get(close + 1..)?.split_whitespace().nth(1)?.parse().ok()?;
    Some((comm, ppid))
}

/// CPU seconds from a `schedstat` file: nanoseconds on a CPU, where the
/// ticks of `stat` count only in 10 ms steps (an idle daemon's whole use).
fn schedstat(path: &str) -> f64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0.0, |ns| ns as f64 / 1e9)
}

/// The calling thread's CPU seconds.
pub fn thread_cpu() -> f64 {
    schedstat("/proc/thread-self/schedstat")
}

/// CPU seconds of a whole process, every thread's.
pub fn process_cpu(pid: u32) -> f64 {
    process_threads(pid).values().map(|(_, s)| s).sum()
}

/// The pids whose parent is `parent`.
pub fn children(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|t| parse_stat(&t))
                .is_some_and(|(_, ppid)| ppid == parent)
        })
        .collect()
}

/// CPU seconds of each thread of a process, by thread id, with its name.
pub fn process_threads(pid: u32) -> BTreeMap<u32, (String, f64)> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let Some((comm, _)) = std::fs::read_to_string(entry.path().join("stat")).ok().and_then(|t| parse_stat(&t))
        else {
            continue;
        };
        out.insert(tid, (comm, schedstat(&format!("/proc/{pid}/task/{tid}/schedstat"))));
    }
    out
}

/// CPU seconds spent between two snapshots, grouped by thread name.
pub fn cpu_by_name(
    before: &BTreeMap<u32, (String, f64)>,
    after: &BTreeMap<u32, (String, f64)>,
) -> BTreeMap<String, f64> {
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

/// CPU seconds the machine spent (all CPUs, /proc/stat): running tasks
/// (user, nice, system, steal), and in interrupts and softirqs, which no
/// task is charged for (loopback packets are delivered in softirqs).
pub fn machine_cpu() -> [f64; 2] {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = text.lines().next().and_then(|l| l.strip_prefix("cpu ")) else {
        return [0.0; 2];
    };
    let v: Vec<u64> = cpu.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let at = |i: usize| v.get(i).copied().unwrap_or(0) as f64 / 100.0;
    [at(0) + at(1) + at(2) + at(7), at(5) + at(6)]
}
