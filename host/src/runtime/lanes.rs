//! Where a call runs: on the thread it arrived on, or on the slow lane.
//!
//! A call runs where it arrives (a front-end's thread, a bus worker), with
//! no hop: most calls take microseconds. A call that runs long marks its
//! target — the route, command or event it was called for — in its plugin
//! version's `CallHistory`, and the following calls of that target run on
//! the slow lane: threads of their own at a lower CPU priority
//! (`SLOW_LANE_NICE`). So while slow and hostile guests burn the cores, a
//! front-end's thread still runs the short calls at once: the kernel
//! prefers it over the lane's threads whenever both want a core, and the
//! lane's calls never share a front-end's run queue. (Before, a long call
//! on the RPC thread yielded once per epoch tick, and every other RPC call
//! waited a tick per long call in flight.)
//!
//! A call runs long when it used `LONG_FUEL` (guest code), took `LONG_CALL`
//! (host imports too, whose time fuel does not see), or broke so badly
//! that its instance is discarded. The first bound is the fine one; the
//! second is coarse on purpose: a short call the kernel preempted took
//! wall time without holding the thread, and counting it as long would
//! send short calls to the lane whenever the machine is busy, where they
//! are slower still and would stay. Time waiting for a free instance is
//! not counted at all.
//!
//! Invariants:
//! - The history is a fixed table of `BUCKETS` counters per plugin version,
//!   indexed by a hash of the target: bounded whatever names a guest or a
//!   peer uses. Targets sharing a bucket share a lane, which is safe either
//!   way.
//! - A long call adds `LONG_WEIGHT` to its bucket (saturating), a short one
//!   takes one away: a target stays on the lane while more than one call in
//!   `LONG_WEIGHT + 1` is long, so a guest cannot keep its long calls on a
//!   front-end's thread by mixing in short ones.
//! - A running call marks its target as soon as it yields for the first
//!   time (`mark_long`, from the epoch callback), so the calls of that
//!   target that arrive while it still runs already take the lane.
//! - A call on the lane never hops again: nested calls run where their
//!   caller runs.
//! - Deadlines are the same wall time on the lane: a call the cores cannot
//!   serve in time fails at its deadline, as anywhere else.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::time::Duration;

/// Fuel of about 250 µs of guest code: a call using it holds a thread long
/// enough to delay the short ones.
pub const LONG_FUEL: u64 = 500_000;
/// A call taking this long, a tick, is long whatever its fuel.
pub const LONG_CALL: Duration = Duration::from_millis(1);
/// How many nice steps the lane's threads are below the daemon's: under
/// contention the kernel gives a thread ten steps higher about nine times
/// their share, and prefers it on wake-up.
pub const SLOW_LANE_NICE: i32 = 10;

const BUCKETS: usize = 64;
const LONG_WEIGHT: u8 = 16;

thread_local! {
    static ON_SLOW_LANE: Cell<bool> = const { Cell::new(false) };
}

/// Which targets of one plugin version ran long lately.
pub struct CallHistory {
    buckets: [AtomicU8; BUCKETS],
}

impl Default for CallHistory {
    fn default() -> Self {
        CallHistory { buckets: std::array::from_fn(|_| AtomicU8::new(0)) }
    }
}

impl CallHistory {
    fn bucket(&self, target: &str) -> &AtomicU8 {
        // FNV-1a: a few nanoseconds for a route name, and no key to seed;
        // a collision only shares a lane.
        let hash =
            target.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        &self.buckets[(hash as usize) % BUCKETS]
    }

    /// Whether the next call of `target` belongs on the slow lane (false
    /// on the lane itself: it never hops twice).
    pub fn runs_long(&self, target: &str) -> bool {
        self.bucket(target).load(Relaxed) > 0 && !ON_SLOW_LANE.with(Cell::get)
    }

    pub fn mark_long(&self, target: &str) {
        let bucket = self.bucket(target);
        let _ = bucket.fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_add(LONG_WEIGHT)));
    }

    /// Counts a finished call that did not yield (one that did was marked
    /// then) by the time and fuel it used.
    pub fn record(&self, target: &str, took: Duration, fuel: u64, poisoned: bool) {
        if poisoned || fuel >= LONG_FUEL || took >= LONG_CALL {
            self.mark_long(target);
            return;
        }
        let bucket = self.bucket(target);
        // The common case, a short call of a short target, only reads.
        if bucket.load(Relaxed) > 0 {
            let _ = bucket.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot start the slow lane's threads: {0}")]
pub struct SlowLaneError(#[from] std::io::Error);

/// The threads long calls run on: a tokio runtime of its own.
pub struct SlowLane {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl SlowLane {
    /// One thread per core but one (at least one): long calls never hold
    /// every core, so a short call always finds one. Nice alone does not
    /// protect the short calls: on `cargo bench --bench neighbours`, two
    /// lane threads each touching 32 MiB a call took the memory bandwidth
    /// both cores share, and echo's median rose 5.7× whatever their
    /// priority (two such loops outside evrhost, at nice 10, cost as
    /// much); with one lane thread it stayed at its idle median.
    pub fn start() -> Result<SlowLane, SlowLaneError> {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        let threads = cores.saturating_sub(1).max(1);
        let nice = lane_nice(rustix::process::getpriority_process(None).unwrap_or(0));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("evrhost-slow")
            .on_thread_start(move || {
                ON_SLOW_LANE.with(|on| on.set(true));
                // Per thread on Linux. Failing leaves the lane at the
                // daemon's priority: still off the front-ends' threads.
                if let Err(e) = rustix::process::setpriority_process(None, nice) {
                    tracing::debug!("the slow lane keeps the daemon's priority: {e}");
                }
            })
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        Ok(SlowLane { runtime: Some(runtime), handle })
    }

    pub fn handle(&self) -> tokio::runtime::Handle {
        self.handle.clone()
    }
}

/// The lane's nice value for a daemon at `daemon`'s (19 is the lowest).
fn lane_nice(daemon: i32) -> i32 {
    (daemon + SLOW_LANE_NICE).min(19)
}

impl Drop for SlowLane {
    fn drop(&mut self) {
        // May be dropped on an async thread, where a blocking shutdown
        // would panic; calls still on the lane are cancelled.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Runs `call` on the lane and waits for it; None if the lane stopped
/// under it (the daemon is shutting down) or the call panicked. A caller
/// cancelled meanwhile cancels the call too, as it would have where it
/// arrived.
pub async fn run_on<T: Send + 'static>(
    lane: &tokio::runtime::Handle,
    call: impl Future<Output = T> + Send + 'static,
) -> Option<T> {
    struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);
    impl<T> Drop for AbortOnDrop<T> {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let mut task = AbortOnDrop(lane.spawn(call));
    (&mut task.0).await.ok()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const SHORT: u64 = 5_000;
    const QUICK: Duration = Duration::from_micros(5);

    #[test]
    fn a_long_call_weighs_sixteen_short_ones_and_other_targets_stay() {
        let history = CallHistory::default();
        assert!(!history.runs_long("spin"));
        history.record("spin", QUICK, LONG_FUEL, false);
        assert!(history.runs_long("spin"));
        assert!(!history.runs_long("ok"), "a target of its own bucket");
        for _ in 0..LONG_WEIGHT - 1 {
            history.record("spin", QUICK, SHORT, false);
        }
        assert!(history.runs_long("spin"));
        history.record("spin", QUICK, SHORT, false);
        assert!(!history.runs_long("spin"));
        // A discarded instance counts as long, however quick the trap.
        history.record("panic", QUICK, SHORT, true);
        // So is a call that took a tick in its imports, whatever its fuel.
        history.record("slow-import", LONG_CALL, SHORT, false);
        assert!(history.runs_long("slow-import"));
        assert!(history.runs_long("panic"));
    }

    #[test]
    fn one_long_call_in_sixteen_keeps_a_target_on_the_lane_and_the_count_saturates() {
        let history = CallHistory::default();
        for _ in 0..100 {
            history.record("sly", QUICK, LONG_FUEL * 4, false);
            for _ in 0..15 {
                history.record("sly", LONG_CALL / 2, SHORT, false);
                assert!(history.runs_long("sly"));
            }
        }
        for _ in 0..1_000 {
            history.mark_long("hot");
        }
        assert_eq!(history.bucket("hot").load(Relaxed), u8::MAX);
    }

    #[test]
    fn the_lane_runs_calls_at_a_lower_priority_and_never_hops_twice() {
        let lane = SlowLane::start().expect("the lane starts");
        let history = Arc::new(CallHistory::default());
        history.mark_long("spin");
        let h = history.clone();
        let ours = rustix::process::getpriority_process(None).expect("getpriority");
        let (name, nice, hops) = block_on(run_on(&lane.handle(), async move {
            let nice = rustix::process::getpriority_process(None).expect("getpriority");
            (std::thread::current().name().map(str::to_string), nice, h.runs_long("spin"))
        }))
        .expect("the call ran");
        assert_eq!(name.as_deref(), Some("evrhost-slow"));
        assert_eq!(nice, lane_nice(ours));
        assert!(!hops, "a call on the lane runs its nested calls there");
        assert!(history.runs_long("spin"), "elsewhere it still hops");
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().expect("a runtime").block_on(f)
    }
}
