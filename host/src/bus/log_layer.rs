//! Log lines as events and as records. A [`LogHub`] belongs to one daemon:
//! it turns log lines into E_CORE_LOG events on that daemon's bus when
//! `[events] log` names a level, and hands them as records to taps (an
//! Erlang log handler), each tap at a level of its own. [`BusLayer`] is the
//! tracing layer that feeds a hub; it reads the levels from atomics (off
//! until enabled), so it costs two loads per log line otherwise.
//!
//! A log line raised while a subscriber handles an E_CORE_LOG event is not
//! turned into another event (OpenSIPS suppresses them the same way), or a
//! plugin that logs what it receives would feed itself forever.

use std::cell::Cell;
use std::fmt::Write;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::Level;
use tracing_subscriber::layer::{Context, Layer};

use super::{Bus, Caller};
use crate::sync::lock;

/// Records waiting per tap; a slow consumer loses the rest.
const TAP_QUEUE: usize = 1024;

struct Tap {
    id: u64,
    level: u8,
    tx: mpsc::Sender<LogRecord>,
}

/// One log line, for a tap.
#[derive(Clone, Debug)]
pub struct LogRecord {
    pub level: Level,
    pub file: String,
    pub function: String,
    pub line: u32,
    pub text: String,
}

/// Where one daemon's log lines go besides stderr.
#[derive(Default)]
pub struct LogHub {
    /// 0 = off, else 1 (error) … 5 (trace).
    level: AtomicU8,
    bus: OnceLock<Weak<Bus>>,
    /// The most verbose level any tap wants; 0 = no tap.
    tap_level: AtomicU8,
    taps: Mutex<Vec<Tap>>,
    tap_ids: AtomicU64,
}

impl LogHub {
    pub fn new() -> Arc<LogHub> {
        Arc::new(LogHub::default())
    }

    /// Turns log lines at `level` and above into E_CORE_LOG events on `bus`.
    pub fn enable(&self, bus: Weak<Bus>, level: Level) {
        let _ = self.bus.set(bus);
        self.level.store(rank(&level), Relaxed);
    }

    /// Log lines at `level` and above, as records, until `untap`.
    pub fn tap(&self, level: Level) -> (u64, mpsc::Receiver<LogRecord>) {
        let id = self.tap_ids.fetch_add(1, Relaxed) + 1;
        let (tx, rx) = mpsc::channel(TAP_QUEUE);
        let mut taps = lock(&self.taps);
        taps.push(Tap { id, level: rank(&level), tx });
        self.refresh_tap_level(&taps);
        (id, rx)
    }

    pub fn set_tap_level(&self, id: u64, level: Level) {
        let mut taps = lock(&self.taps);
        if let Some(t) = taps.iter_mut().find(|t| t.id == id) {
            t.level = rank(&level);
        }
        self.refresh_tap_level(&taps);
    }

    pub fn untap(&self, id: u64) {
        let mut taps = lock(&self.taps);
        taps.retain(|t| t.id != id);
        self.refresh_tap_level(&taps);
    }

    fn refresh_tap_level(&self, taps: &[Tap]) {
        self.tap_level.store(taps.iter().map(|t| t.level).max().unwrap_or(0), Relaxed);
    }
}

tokio::task_local! {
    static SUPPRESSED: ();
}

thread_local! {
    static RAISING: Cell<bool> = const { Cell::new(false) };
}

fn rank(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 1,
        Level::WARN => 2,
        Level::INFO => 3,
        Level::DEBUG => 4,
        Level::TRACE => 5,
    }
}

/// Runs `f` with its log lines kept off the bus and the taps.
pub async fn suppressed<F: Future>(f: F) -> F::Output {
    SUPPRESSED.scope((), f).await
}

/// The layer to install in the tracing subscriber, feeding `hub`.
pub struct BusLayer {
    hub: Arc<LogHub>,
}

impl BusLayer {
    pub fn new(hub: Arc<LogHub>) -> BusLayer {
        BusLayer { hub }
    }
}

#[derive(Default)]
struct Message {
    text: String,
    fields: String,
}

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.text.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.text, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for BusLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let hub = &self.hub;
        let meta = event.metadata();
        let rank = rank(meta.level());
        let to_bus = rank <= hub.level.load(Relaxed);
        let to_taps = rank <= hub.tap_level.load(Relaxed);
        if !to_bus && !to_taps {
            return;
        }
        if SUPPRESSED.try_with(|_| ()).is_ok() || RAISING.with(Cell::get) {
            return;
        }
        let mut message = Message::default();
        event.record(&mut message);
        if to_taps {
            let record = LogRecord {
                level: *meta.level(),
                file: meta.file().unwrap_or("").to_string(),
                function: meta.target().to_string(),
                line: meta.line().unwrap_or(0),
                text: format!("{}{}", message.text, message.fields),
            };
            for t in lock(&hub.taps).iter().filter(|t| rank <= t.level) {
                let _ = t.tx.try_send(record.clone());
            }
        }
        if !to_bus {
            return;
        }
        let Some(bus) = hub.bus.get().and_then(Weak::upgrade) else { return };
        let level = match *meta.level() {
            Level::ERROR => "ERROR",
            Level::WARN => "WARN",
            Level::INFO => "INFO",
            Level::DEBUG | Level::TRACE => "DBG",
        };
        let now = chrono::Local::now().format("%b %e %H:%M:%S").to_string();
        RAISING.with(|r| r.set(true));
        bus.raise(
            "E_CORE_LOG",
            vec![
                ("time", now),
                ("pid", std::process::id().to_string()),
                ("level", level.to_string()),
                ("module", meta.target().to_string()),
                ("message", format!("{}{}", message.text, message.fields)),
            ],
            Caller {
                file: meta.file().unwrap_or("").into(),
                function: meta.target().into(),
                line: meta.line().unwrap_or(0),
            },
        );
        RAISING.with(|r| r.set(false));
    }
}
