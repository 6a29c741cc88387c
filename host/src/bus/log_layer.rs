//! E_CORE_LOG: each log line as an event, when `[events] log` names a
//! level; and taps: log lines as records for a front-end (an Erlang log
//! handler), each tap at a level of its own. The layer reads the levels
//! from atomics (off until enabled), so it costs two loads per log line
//! otherwise.
//!
//! A log line raised while a subscriber handles an E_CORE_LOG event is not
//! turned into another event (OpenSIPS suppresses them the same way), or a
//! plugin that logs what it receives would feed itself forever.

use std::cell::Cell;
use std::fmt::Write;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock, Weak};

use tokio::sync::mpsc;

use tracing::field::{Field, Visit};
use tracing::Level;
use tracing_subscriber::layer::{Context, Layer};

use super::{Bus, Caller};

/// 0 = off, else 1 (error) … 5 (trace).
static LEVEL: AtomicU8 = AtomicU8::new(0);
static BUS: OnceLock<Weak<Bus>> = OnceLock::new();
/// The most verbose level any tap wants; 0 = no tap.
static TAP_LEVEL: AtomicU8 = AtomicU8::new(0);
static TAPS: Mutex<Vec<Tap>> = Mutex::new(Vec::new());
static TAP_IDS: AtomicU64 = AtomicU64::new(1);
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

fn taps() -> std::sync::MutexGuard<'static, Vec<Tap>> {
    // Updates are single pushes, retains and assignments.
    TAPS.lock().unwrap_or_else(|p| p.into_inner())
}

fn refresh_tap_level(taps: &[Tap]) {
    TAP_LEVEL.store(taps.iter().map(|t| t.level).max().unwrap_or(0), Relaxed);
}

/// Log lines at `level` and above, as records, until `untap`.
pub fn tap(level: Level) -> (u64, mpsc::Receiver<LogRecord>) {
    let id = TAP_IDS.fetch_add(1, Relaxed);
    let (tx, rx) = mpsc::channel(TAP_QUEUE);
    let mut taps = taps();
    taps.push(Tap { id, level: rank(&level), tx });
    refresh_tap_level(&taps);
    (id, rx)
}

pub fn set_tap_level(id: u64, level: Level) {
    let mut taps = taps();
    if let Some(t) = taps.iter_mut().find(|t| t.id == id) {
        t.level = rank(&level);
    }
    refresh_tap_level(&taps);
}

pub fn untap(id: u64) {
    let mut taps = taps();
    taps.retain(|t| t.id != id);
    refresh_tap_level(&taps);
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

/// Turns log lines at `level` and above into E_CORE_LOG events on `bus`.
pub fn enable(bus: Weak<Bus>, level: Level) {
    let _ = BUS.set(bus);
    LEVEL.store(rank(&level), Relaxed);
}

/// Runs `f` with its log lines kept off the bus.
pub async fn suppressed<F: Future>(f: F) -> F::Output {
    SUPPRESSED.scope((), f).await
}

/// The layer to install in the tracing subscriber.
pub struct BusLayer;

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
        let meta = event.metadata();
        let rank = rank(meta.level());
        let to_bus = rank <= LEVEL.load(Relaxed);
        let to_taps = rank <= TAP_LEVEL.load(Relaxed);
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
            for t in taps().iter().filter(|t| rank <= t.level) {
                let _ = t.tx.try_send(record.clone());
            }
        }
        if !to_bus {
            return;
        }
        let Some(bus) = BUS.get().and_then(Weak::upgrade) else { return };
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
            &Caller {
                file: meta.file().unwrap_or("").to_string(),
                function: meta.target().to_string(),
                line: meta.line().unwrap_or(0),
            },
        );
        RAISING.with(|r| r.set(false));
    }
}
