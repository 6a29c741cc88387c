//! Why a call failed, named so an operator can act on it.

use std::fmt;
use std::time::Duration;

use wasmtime::Trap;

use super::state::HostState;

/// The cause of a failed call. Every cause but `Guest`, `ReplyTooLarge`,
/// `Busy`, `Storage` and `Host` poisons the instance: it is discarded and the next
/// call gets a fresh one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The call used up its fuel.
    OutOfFuel { fuel: u64 },
    /// The call ran past its wall-time deadline.
    Deadline { limit: Duration },
    /// Linear memory would have grown past the plugin's cap.
    MemoryCap { cap: usize, requested: usize },
    /// The wasm stack overflowed (runaway recursion).
    StackOverflow,
    /// The guest panicked; `message` is what it wrote to stderr.
    Panic { message: String },
    /// Any other trap (out-of-bounds access, division by zero, …).
    Trap { message: String },
    /// The reply was bigger than the plugin's cap; it was not delivered.
    ReplyTooLarge { size: usize, cap: usize },
    /// The handler returned an error of its own.
    Guest { message: String },
    /// No instance became free before the deadline.
    Busy { waited: Duration },
    /// The call ran, but its kv writes could not be made durable: its
    /// reply is withheld, so nothing unsaved is acknowledged.
    Storage { reason: String },
    /// The host failed to run the call (instantiation, a host import).
    Host { message: String },
}

impl Cause {
    /// A stable short name, for metrics and for matching in tests.
    pub fn kind(&self) -> &'static str {
        match self {
            Cause::OutOfFuel { .. } => "fuel",
            Cause::Deadline { .. } => "deadline",
            Cause::MemoryCap { .. } => "memory",
            Cause::StackOverflow => "stack",
            Cause::Panic { .. } => "panic",
            Cause::Trap { .. } => "trap",
            Cause::ReplyTooLarge { .. } => "reply-size",
            Cause::Guest { .. } => "guest-error",
            Cause::Busy { .. } => "busy",
            Cause::Storage { .. } => "storage",
            Cause::Host { .. } => "host",
        }
    }

    pub const KINDS: [&'static str; 11] = [
        "fuel",
        "deadline",
        "memory",
        "stack",
        "panic",
        "trap",
        "reply-size",
        "guest-error",
        "busy",
        "storage",
        "host",
    ];

    /// Whether the instance that produced this must be thrown away.
    pub fn poisons_instance(&self) -> bool {
        !matches!(self, Cause::Guest { .. } | Cause::ReplyTooLarge { .. } | Cause::Busy { .. } | Cause::Storage { .. })
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::OutOfFuel { fuel } => write!(f, "out of fuel ({fuel} units)"),
            Cause::Deadline { limit } => write!(f, "deadline of {} ms exceeded", limit.as_millis()),
            Cause::MemoryCap { cap, requested } => {
                write!(f, "memory cap of {} KiB exceeded (asked for {} KiB)", cap >> 10, requested >> 10)
            }
            Cause::StackOverflow => write!(f, "stack overflow"),
            Cause::Panic { message } => write!(f, "panic: {message}"),
            Cause::Trap { message } => write!(f, "trap: {message}"),
            Cause::ReplyTooLarge { size, cap } => write!(f, "reply of {size} bytes exceeds the cap of {cap}"),
            Cause::Guest { message } => write!(f, "handler error: {message}"),
            Cause::Busy { waited } => write!(f, "no free instance after {} ms", waited.as_millis()),
            Cause::Storage { reason } => write!(f, "kv writes not saved, reply withheld: {reason}"),
            Cause::Host { message } => write!(f, "host error: {message}"),
        }
    }
}

impl std::error::Error for Cause {}

/// Boxed sources of load errors (wasmtime's, mostly).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A failed call: which plugin, which route (or command, or event), why,
/// and for a trap where the guest was.
#[derive(Clone, Debug, thiserror::Error)]
pub struct CallError {
    pub plugin: String,
    /// "route", "command", "event" or "task".
    pub what: &'static str,
    pub target: String,
    pub cause: Cause,
    pub backtrace: Option<std::sync::Arc<super::backtrace::GuestBacktrace>>,
}

/// The backtrace's innermost frames follow the cause, on the same line, so
/// every caller (an RPC error, a reply to a peer) gets them, bounded.
impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "plugin `{}`, {} `{}`: {}", self.plugin, self.what, self.target, self.cause)?;
        if let Some(bt) = &self.backtrace {
            write!(f, " (in {})", bt.short(super::backtrace::SHORT_FRAMES))?;
        }
        Ok(())
    }
}

/// A plugin that cannot be loaded (or reloaded: the old version serves on).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("plugin `{plugin}`: cannot read {path}: {source}")]
    Read { plugin: String, path: String, source: std::io::Error },
    #[error("plugin `{plugin}`: {path} is a core wasm module, not a component (build for wasm32-wasip2, or wrap it with `wasm-tools component new`)")]
    CoreModule { plugin: String, path: String },
    #[error("plugin `{plugin}`: {path} is not WebAssembly (no `\\0asm` header)")]
    NotWasm { plugin: String, path: String },
    #[error("plugin `{plugin}`: cannot compile {path}")]
    Compile { plugin: String, path: String, source: BoxError },
    #[error("plugin `{plugin}`: {path} is built for the component-model async ABI, which evrhost does not run: build it synchronously (`evrhost build` does; by hand, componentize-qjs --sync)")]
    AsyncAbi { plugin: String, path: String },
    #[error("plugin `{plugin}`: cannot link")]
    Link { plugin: String, source: BoxError },
    #[error("plugin `{plugin}` imports `{import}`, which this evrhost does not offer: build it against this evrhost's wit/ (worlds `imports` and WASI 0.2)")]
    MissingImport { plugin: String, import: String, source: BoxError },
    #[error("plugin `{plugin}`: {mismatch}")]
    Contract { plugin: String, mismatch: super::contract::ContractMismatch },
    #[error("plugin `{plugin}`: cannot instantiate")]
    Instantiate { plugin: String, source: Cause },
    #[error("plugin `{plugin}` needs {needs_kib} KiB of memory to start, more than its cap of {cap_kib} KiB: raise its `memory_mb` to at least {}", .needs_kib.div_ceil(1024))]
    MemoryToStart { plugin: String, needs_kib: usize, cap_kib: usize },
    #[error("plugin `{plugin}` does not export `{export}`, which {needed_by} needs")]
    MissingExport { plugin: String, export: &'static str, needed_by: String },
    #[error("plugin `{plugin}`: listing its commands failed")]
    Commands { plugin: String, source: Cause },
    #[error("plugin `{plugin}`: {message}")]
    Invalid { plugin: String, message: String },
    /// A load by hash found no compiled artifact; the caller reads the code.
    #[error("plugin `{plugin}`: no compiled artifact cached for it")]
    NotCached { plugin: String },
}

/// Renders a wasmtime error with its whole chain of causes.
pub(crate) fn chain(e: &wasmtime::Error) -> String {
    format!("{e:#}")
}

/// Names the cause of a wasmtime error, using what the store saw; `fuel`
/// is what the call was given (a batch gets the per-call fuel per request).
pub(super) fn classify(e: &wasmtime::Error, state: &HostState, stderr: &str, fuel: u64) -> Cause {
    let limits = &state.plugin.spec.limits;
    if let Some(requested) = state.limiter.refused {
        return Cause::MemoryCap { cap: limits.memory_bytes, requested };
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => Cause::OutOfFuel { fuel },
        Some(Trap::Interrupt) => Cause::Deadline { limit: limits.deadline },
        Some(Trap::StackOverflow) => Cause::StackOverflow,
        Some(Trap::UnreachableCodeReached) if stderr.contains("panicked at") => {
            Cause::Panic { message: panic_message(stderr) }
        }
        Some(trap) => Cause::Trap { message: trap.to_string() },
        None => Cause::Host { message: chain(e) },
    }
}

/// "msg (at file:line:col)" from a Rust panic report on stderr.
fn panic_message(stderr: &str) -> String {
    let Some(start) = stderr.find("panicked at ") else { return stderr.trim().to_string() };
    let rest = &stderr[start + "panicked at ".len()..];
    let mut lines = rest.lines();
    let location = lines.next().unwrap_or("").trim_end_matches(':');
    let message: Vec<&str> = lines.take_while(|l| !l.starts_with("note: ")).collect();
    format!("{} (at {location})", message.join(" ").trim())
}

#[cfg(test)]
mod tests {
    #[test]
    fn panic_message_keeps_text_and_location() {
        let stderr =
            "\nthread '<unnamed>' panicked at src/lib.rs:40:24:\nboom now\nnote: run with `RUST_BACKTRACE=1`\n";
        assert_eq!(super::panic_message(stderr), "boom now (at src/lib.rs:40:24)");
    }
}
