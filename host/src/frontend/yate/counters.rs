//! What the Yate front-end counts: messages by outcome, lines it could not
//! use, plugins' dispatches; shown on `/metrics` and by `yate.status`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use super::Shared;
use crate::frontend::metrics::{header, Metrics};
use crate::sync::lock;

#[derive(Default)]
pub(super) struct Counters {
    /// `%%>message` lines from the engine.
    pub received: AtomicU64,
    /// Answered `processed=true`.
    pub handled: AtomicU64,
    /// A handler replied, not handled.
    pub declined: AtomicU64,
    /// No handler: not installed (any more), or the route has none.
    pub unhandled: AtomicU64,
    /// The handlers failed (a trap, a limit, an error).
    pub failed: AtomicU64,
    /// More than `max_in_flight` at once: answered at once.
    pub busy: AtomicU64,
    /// The answer would not fit the engine's buffer.
    pub too_long: AtomicU64,
    /// The reply could not be said on the wire (a key with `=`).
    pub bad_reply: AtomicU64,
    /// Lines that did not parse (answered false when they were messages).
    pub garbage: AtomicU64,
    /// Lines over `max_line_bytes`, skipped.
    pub overlong: AtomicU64,
    /// `Error in:` lines: the engine did not understand one of ours.
    pub error_in: AtomicU64,
    /// Watcher notifications raised on the bus.
    pub watched: AtomicU64,
    /// Plugins' `messages.dispatch` and `enqueue` sent.
    pub sent: AtomicU64,
    pub answered: AtomicU64,
    pub timeouts: AtomicU64,
    /// Answers matching no waiting dispatch (late, or not ours).
    pub unmatched: AtomicU64,
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
}

pub(super) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

/// At most one report a second of a recurring problem, with how many
/// went unreported since.
#[derive(Default)]
pub(super) struct Throttle {
    second: AtomicU64,
    suppressed: AtomicU64,
}

impl Throttle {
    /// `Some(n)` when a report is due (n suppressed since the last one).
    pub fn due(&self) -> Option<u64> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if self.second.swap(now, Relaxed) != now {
            Some(self.suppressed.swap(0, Relaxed))
        } else {
            self.suppressed.fetch_add(1, Relaxed);
            None
        }
    }
}

/// The message outcomes, as `/metrics` and `yate.status` name them.
fn outcomes(c: &Counters) -> [(&'static str, u64); 8] {
    [
        ("handled", c.handled.load(Relaxed)),
        ("declined", c.declined.load(Relaxed)),
        ("unhandled", c.unhandled.load(Relaxed)),
        ("failed", c.failed.load(Relaxed)),
        ("busy", c.busy.load(Relaxed)),
        ("too_long", c.too_long.load(Relaxed)),
        ("bad_reply", c.bad_reply.load(Relaxed)),
        ("garbage", c.garbage.load(Relaxed)),
    ]
}

/// `yate.status`: the connection, the installs, the counters, as JSON.
pub(super) fn status(shared: &Shared) -> String {
    let c = &shared.counters;
    let installs: Vec<serde_json::Value> = lock(&shared.installs)
        .iter()
        .map(|(message, route, state)| serde_json::json!({"message": message, "route": route, "state": state}))
        .collect();
    let answers: serde_json::Map<String, serde_json::Value> =
        outcomes(c).into_iter().map(|(k, v)| (k.to_string(), v.into())).collect();
    serde_json::json!({
        "connect": shared.describe,
        "connected": shared.connected(),
        "connects": c.connects.load(Relaxed),
        "disconnects": c.disconnects.load(Relaxed),
        "bufsize": shared.bufsize(),
        "installs": installs,
        "watch": shared.settings.watch,
        "in_flight": shared.in_flight(),
        "max_in_flight": shared.settings.max_in_flight,
        "received": c.received.load(Relaxed),
        "answers": answers,
        "lines": {
            "overlong": c.overlong.load(Relaxed),
            "error_in": c.error_in.load(Relaxed),
        },
        "watched": c.watched.load(Relaxed),
        "dispatch": {
            "sent": c.sent.load(Relaxed),
            "answered": c.answered.load(Relaxed),
            "timeouts": c.timeouts.load(Relaxed),
            "unmatched": c.unmatched.load(Relaxed),
            "waiting": shared.waiting(),
        },
    })
    .to_string()
}

pub(super) struct YateMetrics(pub Weak<Shared>);

impl YateMetrics {
    pub fn of(shared: &Arc<Shared>) -> Arc<dyn Metrics> {
        Arc::new(YateMetrics(Arc::downgrade(shared)))
    }
}

impl Metrics for YateMetrics {
    fn render(&self, out: &mut String) {
        let Some(shared) = self.0.upgrade() else { return };
        let c = &shared.counters;
        header(out, "evrhost_yate_connected", "gauge", "1 while connected to the Yate engine.");
        let _ = writeln!(out, "evrhost_yate_connected {}", u8::from(shared.connected()));
        header(out, "evrhost_yate_in_flight", "gauge", "Engine messages being handled now.");
        let _ = writeln!(out, "evrhost_yate_in_flight {}", shared.in_flight());
        header(out, "evrhost_yate_messages_total", "counter", "Engine messages answered, by outcome.");
        for (outcome, n) in outcomes(c) {
            let _ = writeln!(out, "evrhost_yate_messages_total{{outcome=\"{outcome}\"}} {n}");
        }
        let counters: [(&str, &str, &AtomicU64); 7] = [
            ("evrhost_yate_overlong_lines_total", "Engine lines over max_line_bytes, skipped.", &c.overlong),
            ("evrhost_yate_error_in_total", "Error in: lines from the engine.", &c.error_in),
            ("evrhost_yate_watched_total", "Watcher notifications raised on the bus.", &c.watched),
            ("evrhost_yate_dispatched_total", "Messages plugins sent to the engine.", &c.sent),
            (
                "evrhost_yate_dispatch_timeouts_total",
                "Plugins' dispatches the engine did not answer in time.",
                &c.timeouts,
            ),
            ("evrhost_yate_unmatched_answers_total", "Engine answers matching no waiting dispatch.", &c.unmatched),
            ("evrhost_yate_connects_total", "Connections made to the engine.", &c.connects),
        ];
        for (name, help, counter) in counters {
            header(out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", counter.load(Relaxed));
        }
    }
}
