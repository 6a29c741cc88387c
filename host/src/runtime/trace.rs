//! Call tracing, as app_lua's `log_mode` logs every KEMI export call: with
//! a plugin's trace switch on, each host import its calls make is logged —
//! the import, its arguments and its result (both bounded), the time it
//! took — tagged with the plugin, the tenant and the route. Off, an import
//! pays one relaxed atomic load.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Instant;

use super::bindings::{Answer, Event, HostError, Level, Message};
use super::state::HostState;

/// A plugin's switch, kept across its reloads (`plugin.trace NAME on|off`).
#[derive(Debug, Default)]
pub struct TraceSwitch(AtomicBool);

impl TraceSwitch {
    pub fn new(on: bool) -> TraceSwitch {
        TraceSwitch(AtomicBool::new(on))
    }

    pub fn set(&self, on: bool) {
        self.0.store(on, Relaxed);
    }

    pub fn is_on(&self) -> bool {
        self.0.load(Relaxed)
    }
}

/// Imports one call traces; the rest are counted, and the count is
/// logged when the call ends, so a loop of imports cannot flood the log.
pub const MAX_TRACED_PER_CALL: u32 = 200;
/// Characters of one argument or result shown.
const MAX_SHOWN: usize = 96;

/// An import being traced: when it began and its arguments, rendered
/// before the call consumes them.
pub(crate) struct Traced {
    started: Instant,
    args: String,
}

/// A value as a trace line shows it, bounded.
pub(crate) trait Shown {
    fn show(&self, out: &mut String);
}

impl HostState {
    /// Some when this import is to be traced; `args` is rendered only then.
    pub(crate) fn trace_begin(&mut self, args: &[&dyn Shown]) -> Option<Traced> {
        if !self.plugin.trace.is_on() {
            return None;
        }
        if self.call.traced >= MAX_TRACED_PER_CALL {
            self.call.trace_skipped += 1;
            return None;
        }
        self.call.traced += 1;
        let mut rendered = String::new();
        for (i, arg) in args.iter().enumerate() {
            if i > 0 {
                rendered.push_str(", ");
            }
            arg.show(&mut rendered);
        }
        Some(Traced { started: Instant::now(), args: rendered })
    }

    pub(crate) fn trace_end(&self, import: &str, traced: Option<Traced>, result: &dyn Shown) {
        let Some(t) = traced else { return };
        let us = t.started.elapsed().as_micros() as u64;
        let mut shown = String::new();
        result.show(&mut shown);
        let spec = &self.plugin.spec;
        tracing::info!(
            target: "trace",
            plugin = %spec.name,
            tenant = %spec.tenant,
            route = %self.call.target,
            us,
            "{import}({}) -> {shown}",
            t.args
        );
    }
}

/// Runs an import's body, traced when the plugin's switch is on:
/// `traced!(self, "kv.get", [key], async { … })`, or without `async` for
/// a synchronous body. The body's `?` ends the body, so errors are traced.
macro_rules! traced {
    ($state:ident, $import:literal, [$($arg:expr),*], async $body:block) => {{
        let traced = $state.trace_begin(&[$(&$arg as &dyn $crate::runtime::trace::Shown),*]);
        let result = async $body.await;
        $state.trace_end($import, traced, &result);
        result
    }};
    ($state:ident, $import:literal, [$($arg:expr),*], $body:block) => {{
        let traced = $state.trace_begin(&[$(&$arg as &dyn $crate::runtime::trace::Shown),*]);
        // A closure, so that the body's `?` ends the body, not the caller.
        #[allow(clippy::redundant_closure_call)]
        let result = (|| $body)();
        $state.trace_end($import, traced, &result);
        result
    }};
}
pub(crate) use traced;

/// Text quoted and escaped, cut at [`MAX_SHOWN`] characters.
fn quoted(text: &str, out: &mut String) {
    let mut escaped = String::new();
    for c in text.chars().flat_map(char::escape_debug) {
        if escaped.chars().count() >= MAX_SHOWN {
            let _ = write!(out, "\"{escaped}\"… ({} bytes)", text.len());
            return;
        }
        escaped.push(c);
    }
    let _ = write!(out, "\"{escaped}\"");
}

impl Shown for String {
    fn show(&self, out: &mut String) {
        quoted(self, out);
    }
}

impl Shown for Vec<u8> {
    fn show(&self, out: &mut String) {
        match std::str::from_utf8(self) {
            Ok(text) => quoted(text, out),
            Err(_) => {
                let _ = write!(out, "<{} bytes>", self.len());
            }
        }
    }
}

macro_rules! shown_as_display {
    ($($t:ty),*) => {$(
        impl Shown for $t {
            fn show(&self, out: &mut String) {
                let _ = write!(out, "{self}");
            }
        }
    )*};
}
shown_as_display!(i64, u64, u32, bool);

impl Shown for () {
    fn show(&self, out: &mut String) {
        out.push_str("()");
    }
}

impl<T: Shown> Shown for Option<T> {
    fn show(&self, out: &mut String) {
        match self {
            Some(v) => v.show(out),
            None => out.push_str("none"),
        }
    }
}

impl<T: Shown> Shown for Result<T, HostError> {
    fn show(&self, out: &mut String) {
        match self {
            Ok(v) => v.show(out),
            Err(e) => {
                let (kind, message) = match e {
                    HostError::Denied(m) => ("denied", m),
                    HostError::Invalid(m) => ("invalid", m),
                    HostError::NotFound(m) => ("not-found", m),
                    HostError::Failed(m) => ("failed", m),
                };
                let _ = write!(out, "error {kind}: ");
                quoted(message, out);
            }
        }
    }
}

impl Shown for Level {
    fn show(&self, out: &mut String) {
        let _ = write!(out, "{self:?}");
    }
}

impl Shown for Vec<(String, String)> {
    fn show(&self, out: &mut String) {
        let _ = write!(out, "[{} params]", self.len());
    }
}

impl Shown for Event {
    fn show(&self, out: &mut String) {
        out.push_str(&self.name);
        if let Some(subclass) = &self.subclass {
            let _ = write!(out, ":{subclass}");
        }
        let _ = write!(out, " ({} headers)", self.headers.len());
    }
}

impl Shown for Message {
    fn show(&self, out: &mut String) {
        let _ = write!(out, "{} ({} params)", self.name, self.params.len());
    }
}

impl Shown for Answer {
    fn show(&self, out: &mut String) {
        let _ = write!(out, "handled={} ", self.handled);
        quoted(&self.retvalue, out);
    }
}

/// The trace's last line for a call: how it ended, what it cost, and the
/// imports past the per-call cap that were not traced.
pub(crate) fn trace_call<T>(
    data: &super::state::HostState,
    result: &Result<T, super::error::Cause>,
    elapsed: std::time::Duration,
    fuel: u64,
) {
    let spec = &data.plugin.spec;
    let outcome = match result {
        Ok(_) => "ok".to_string(),
        Err(cause) => format!("failed: {cause}"),
    };
    tracing::info!(
        target: "trace",
        plugin = %spec.name,
        tenant = %spec.tenant,
        route = %data.call.target,
        us = elapsed.as_micros() as u64,
        fuel,
        imports = data.call.traced + data.call.trace_skipped,
        untraced = data.call.trace_skipped,
        "call {outcome}"
    );
}
