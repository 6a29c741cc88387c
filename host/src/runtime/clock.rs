//! Call timing. A call of a reused instance costs about a microsecond, and
//! std's clock costs ~30 ns a read on a VM, twice per call; the TSC reads
//! in a few. quanta reads the TSC, but calibrates it for up to 200 ms, so
//! the calibration runs on a thread of its own at start-up and std's clock
//! times calls until it is done: start-up never waits for it.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static TSC: OnceLock<quanta::Clock> = OnceLock::new();

/// Starts calibrating the TSC clock, once per process.
pub fn calibrate_in_background() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new().name("evrhost-clock".into()).spawn(|| {
            let _ = TSC.set(quanta::Clock::new());
        });
        if let Err(e) = spawned {
            tracing::debug!(error = %e, "no TSC clock; calls are timed with the system clock");
        }
    });
}

/// When a call started.
#[derive(Clone, Copy, Debug)]
pub enum Stamp {
    Tsc(u64),
    Std(Instant),
}

pub fn now() -> Stamp {
    match TSC.get() {
        Some(clock) => Stamp::Tsc(clock.raw()),
        None => Stamp::Std(Instant::now()),
    }
}

impl Stamp {
    pub fn elapsed(self) -> Duration {
        match self {
            Stamp::Std(start) => start.elapsed(),
            // A TSC stamp was taken with the clock, which is never unset.
            Stamp::Tsc(start) => {
                TSC.get().map_or(Duration::ZERO, |c| Duration::from_nanos(c.delta_as_nanos(start, c.raw())))
            }
        }
    }
}
