//! The receiver thread's own runs of the route: when it may run a batch
//! itself, and how a route slow there is sent to the workers for a while
//! (see the parent module's doc).
//!
//! A call that took long by the wall clock is not always the route's
//! doing: on a busy machine the scheduler may take the thread away
//! mid-call for milliseconds. Demoting for that would hand a
//! microsecond route to the workers (two wake-ups per batch) for a second
//! at a time, so a long call is blamed on the route only when the thread
//! either spent much of it on the CPU or waited in it (a voluntary
//! switch: Redis, a lock, the runtime's slow lane), read from the
//! thread's own rusage. Reading it costs a syscall, so it is read only
//! while the route is watched: a long call not watched starts a watch of
//! `WATCH` and is let go, and the watched calls after it are judged. A
//! route slow on every call is sent on after its second, not its first.
//! A batch (one call for a read's datagrams) is judged by its average per
//! datagram, as one call each would have been.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nix::sys::resource::{getrusage, UsageWho};

use super::{Handler, BUFFER};

/// How long reads may keep coming back full (with no quiet wait for the
/// socket between them) before the receiver is behind and hands on. A
/// burst is still run here, even one of several batches (a generator
/// catching up sends them back to back), since a hand-over costs the
/// workers' wake-ups, the dearest thing on a small machine; a flood that
/// keeps the socket full this long is not. Counting full reads instead
/// (4 in a row) handed 40–75 % of a 50k/s sendmmsg load to the workers.
pub(super) const BEHIND_AFTER: Duration = Duration::from_millis(2);
/// A call this long on the receiver thread sends the route to the workers.
const SLOW_INLINE: Duration = Duration::from_millis(1);
/// How long a slow route stays off the receiver thread at first, and at most.
const DEMOTION: Duration = Duration::from_secs(1);
const MAX_DEMOTION: Duration = Duration::from_secs(64);
/// How long after a long call the thread's usage is read around each batch.
const WATCH: Duration = Duration::from_secs(5);

/// The receiver thread's own handler, and whether it may use it now.
pub(super) struct Inline {
    runtime: tokio::runtime::Handle,
    handler: Handler,
    /// One worker: arrival order is kept, so nothing runs here while a
    /// datagram handed on is unfinished.
    pub(super) ordered: bool,
    demoted_until: Option<Instant>,
    /// The next demotion's length.
    demotion: Duration,
    /// Until when calls are judged by the thread's usage (see the module doc).
    watched_until: Option<Instant>,
}

impl Inline {
    pub(super) fn new(runtime: tokio::runtime::Handle, handler: Handler, ordered: bool) -> Inline {
        Inline { runtime, handler, ordered, demoted_until: None, demotion: DEMOTION, watched_until: None }
    }

    pub(super) fn allowed(&self, now: Instant) -> bool {
        self.demoted_until.is_none_or(|until| now >= until)
    }

    /// Runs the read's datagrams here, in order: in one call when the
    /// plugin takes batches, else one by one, stopping after the first
    /// slow one. Gives back the index of the first not run.
    pub(super) fn run(&mut self, buffers: &[Vec<u8>], received: &[(usize, Option<SocketAddr>)], route: &str) -> usize {
        let watched = self.watched_until.is_some_and(|until| Instant::now() < until);
        // Where the judged stretch of the read began, and the usage then.
        let mut mark = watched.then(|| (Instant::now(), ThreadUsage::now()));
        // (index in the read, data, source)
        let datagrams = buffers
            .iter()
            .zip(received)
            .enumerate()
            .filter_map(|(i, (buffer, (len, peer)))| Some((i, &buffer[..(*len).min(BUFFER)], (*peer)?)));
        if received.len() > 1 && self.handler.batches() {
            let started = Instant::now();
            let n = self.runtime.block_on(self.handler.datagrams(datagrams.map(|(_, data, peer)| (data, peer))));
            if self.slow(route, started, n, &mut mark) {
                return received.len();
            }
        } else {
            for (i, data, peer) in datagrams {
                let started = Instant::now();
                self.runtime.block_on(self.handler.datagram(data, peer));
                if self.slow(route, started, 1, &mut mark) {
                    return i + 1;
                }
            }
        }
        if self.demoted_until.is_some() {
            // Quick again after a demotion.
            (self.demoted_until, self.demotion) = (None, DEMOTION);
        }
        received.len()
    }

    /// Judges the call of `requests` requests that began at `started`,
    /// by its average per request; demotes the route when it was slow
    /// here, and says so. `mark` is where the judged stretch began.
    fn slow(&mut self, route: &str, started: Instant, requests: usize, mark: &mut Option<Mark>) -> bool {
        let n = u32::try_from(requests.max(1)).unwrap_or(u32::MAX);
        let took = started.elapsed();
        if took / n < SLOW_INLINE {
            return false;
        }
        let Some((since, at_start)) = *mark else {
            tracing::trace!(route = %route, took = ?took, "a long UDP call: the route's next calls are watched");
            self.watched_until = Some(Instant::now() + WATCH);
            *mark = Some((Instant::now(), ThreadUsage::now()));
            return false;
        };
        let (before, usage) = (started.saturating_duration_since(since), at_start.zip(ThreadUsage::now()));
        if let Some((at_start, at_end)) = usage.filter(|(a, b)| !slow_here(before, n, a, b)) {
            tracing::trace!(route = %route, took = ?took, cpu = ?at_end.cpu.saturating_sub(at_start.cpu),
                "a long UDP call while the thread was preempted: the route stays here");
            return false;
        }
        // A demotion that ended with a slow call: the next is longer.
        let next = if self.demoted_until.is_some() { (self.demotion * 2).min(MAX_DEMOTION) } else { DEMOTION };
        self.demotion = next;
        self.demoted_until = Some(Instant::now() + next);
        let (cpu, waits) =
            usage.map_or((None, None), |(a, b)| (Some(b.cpu.saturating_sub(a.cpu)), Some(b.waits - a.waits)));
        tracing::debug!(route = %route, took = ?took, requests, batch_cpu = ?cpu, waits = ?waits, off_for = ?next,
            "a slow UDP call: the route runs on the workers");
        true
    }
}

/// Where a judged stretch of calls began, and the thread's usage then.
type Mark = (Instant, Option<ThreadUsage>);

/// What the kernel counted for this thread so far.
#[derive(Clone, Copy, Debug)]
struct ThreadUsage {
    /// User and system time.
    cpu: Duration,
    /// Voluntary context switches: the times the thread waited.
    waits: i64,
}

impl ThreadUsage {
    /// None where the kernel will not say: every long call is then blamed.
    fn now() -> Option<ThreadUsage> {
        let usage = getrusage(UsageWho::RUSAGE_THREAD).ok()?;
        let micros = |t: nix::sys::time::TimeVal| {
            Duration::from_secs(t.tv_sec().max(0) as u64) + Duration::from_micros(t.tv_usec().max(0) as u64)
        };
        Some(ThreadUsage {
            cpu: micros(usage.user_time()) + micros(usage.system_time()),
            waits: usage.voluntary_context_switches(),
        })
    }
}

/// Whether a call of `requests` requests that took `SLOW_INLINE` or more
/// per request by the wall clock was slow on this thread, given the
/// stretch's usage at its start and now and the wall time of the stretch
/// before the call: the call waited (a voluntary switch in the stretch),
/// or its CPU time per request — the call's at least the stretch's CPU
/// less the wall time before the call — is half of `SLOW_INLINE` or more.
/// Otherwise the thread was preempted.
fn slow_here(before: Duration, requests: u32, at_start: &ThreadUsage, at_end: &ThreadUsage) -> bool {
    let cpu = at_end.cpu.saturating_sub(at_start.cpu).saturating_sub(before);
    at_end.waits > at_start.waits || cpu / requests.max(1) >= SLOW_INLINE / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn usage(cpu_us: u64, waits: i64) -> ThreadUsage {
        ThreadUsage { cpu: Duration::from_micros(cpu_us), waits }
    }

    #[test]
    fn a_long_call_on_the_cpu_or_waiting_is_the_routes_a_preempted_one_is_not() {
        // Burned 1.5 ms of CPU in the call: slow.
        assert!(slow_here(Duration::ZERO, 1, &usage(100, 3), &usage(1_600, 3)));
        // Waited (Redis, a lock, the slow lane), with little CPU: slow.
        assert!(slow_here(Duration::ZERO, 1, &usage(100, 3), &usage(150, 4)));
        // 20 µs of CPU in a 2 ms call, no wait: preempted.
        assert!(!slow_here(Duration::ZERO, 1, &usage(100, 3), &usage(120, 3)));
        // The batch's earlier calls ran 3 ms (their CPU is not this call's).
        assert!(!slow_here(3 * MS, 1, &usage(0, 0), &usage(3_200, 0)));
        assert!(slow_here(3 * MS, 1, &usage(0, 0), &usage(3_600, 0)));
        // A batch of 8 with 4 ms of CPU: 0.5 ms a request, slow; 3 ms, not.
        assert!(slow_here(Duration::ZERO, 8, &usage(0, 0), &usage(4_000, 0)));
        assert!(!slow_here(Duration::ZERO, 8, &usage(0, 0), &usage(3_000, 0)));
    }

    #[test]
    fn the_thread_usage_counts_cpu_and_waits() {
        let start = ThreadUsage::now().expect("getrusage(RUSAGE_THREAD) on Linux");
        // Spins until 2 ms of CPU are counted (however often the thread
        // is preempted meanwhile), or fails after 10 s.
        let spin = Instant::now();
        let spun = loop {
            let now = ThreadUsage::now().expect("rusage");
            if now.cpu >= start.cpu + 2 * MS {
                break now;
            }
            assert!(spin.elapsed() < Duration::from_secs(10), "no CPU time counted for spinning");
            std::hint::black_box(&now);
        };
        std::thread::sleep(MS);
        let slept = ThreadUsage::now().expect("rusage");
        assert!(slept.waits > spun.waits, "a sleep is a voluntary switch");
        assert!(slow_here(Duration::ZERO, 1, &spun, &slept));
    }
}
