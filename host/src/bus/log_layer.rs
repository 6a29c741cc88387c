//! E_CORE_LOG: each log line as an event, when `[events] log` names a
//! level. The layer reads the level from an atomic (off until the config
//! enables it), so it costs one load per log line otherwise.
//!
//! A log line raised while a subscriber handles an E_CORE_LOG event is not
//! turned into another event (OpenSIPS suppresses them the same way), or a
//! plugin that logs what it receives would feed itself forever.

use std::cell::Cell;
use std::fmt::Write;
use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::{OnceLock, Weak};

use tracing::field::{Field, Visit};
use tracing::Level;
use tracing_subscriber::layer::{Context, Layer};

use super::{Bus, Caller};

/// 0 = off, else 1 (error) … 5 (trace).
static LEVEL: AtomicU8 = AtomicU8::new(0);
static BUS: OnceLock<Weak<Bus>> = OnceLock::new();

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
        if rank(meta.level()) > LEVEL.load(Relaxed) {
            return;
        }
        if SUPPRESSED.try_with(|_| ()).is_ok() || RAISING.with(Cell::get) {
            return;
        }
        let Some(bus) = BUS.get().and_then(Weak::upgrade) else { return };
        let mut message = Message::default();
        event.record(&mut message);
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
