//! What one plugin may use: per-call budgets, pool size, output caps and
//! the host capabilities it is granted.

use std::time::Duration;

/// How a plugin's instances are shared between calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isolation {
    /// A worker keeps its instance across calls (state persists, fastest),
    /// like a Kamailio Lua state per process.
    Reuse,
    /// Every call gets a fresh instance: nothing leaks between requests.
    PerCall,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Reuse => "reuse",
            Isolation::PerCall => "per-call",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Limits {
    /// Fuel (roughly, wasm instructions) for one call.
    pub fuel: u64,
    /// Wall time for one call; enforced by epoch interruption.
    pub deadline: Duration,
    /// A call slower than this is logged as a threshold warning.
    pub warn_after: Option<Duration>,
    /// Cap on an instance's linear memory, in bytes.
    pub memory_bytes: usize,
    pub min_instances: usize,
    pub max_instances: usize,
    pub isolation: Isolation,
    /// Cap on a reply: retval + params + data, in bytes.
    pub max_reply_bytes: usize,
    /// Longer log lines are cut to this many bytes.
    pub max_log_line_bytes: usize,
    /// Log lines past this many in one call are dropped and counted.
    pub max_log_lines_per_call: usize,
    /// Bytes of log the plugin may write per second, all its calls and
    /// instances together; lines past it are dropped and counted.
    pub max_log_bytes_per_s: u64,
    /// Cap on an event a plugin fires: name, headers and body, in bytes.
    pub max_event_bytes: usize,
    /// E_CORE_PKG_THRESHOLD when an instance's memory passes this percent
    /// of `memory_bytes`; 0 never.
    pub pkg_threshold_pct: u8,
    /// Idle instances above `min_instances` are dropped after this long
    /// (E_CORE_PROC_AUTO_SCALE `down`).
    pub idle_after: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel: 500_000_000,
            deadline: Duration::from_millis(1000),
            warn_after: None,
            memory_bytes: 64 << 20,
            min_instances: 1,
            max_instances: 4,
            isolation: Isolation::Reuse,
            max_reply_bytes: 1 << 20,
            max_log_line_bytes: 4096,
            max_log_lines_per_call: 100,
            max_log_bytes_per_s: 1 << 20,
            max_event_bytes: 64 << 10,
            pkg_threshold_pct: 0,
            idle_after: Duration::from_secs(30),
        }
    }
}

/// Host imports a plugin may use. Everything is granted unless the plugin's
/// configuration lists what it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    pub log: bool,
    pub config: bool,
    pub kv: bool,
    pub events: bool,
    pub commands: bool,
    /// Asking bound Erlang processes for documents.
    pub fetch: bool,
    /// Sending messages to the engine evrhost is a module of (within the
    /// tenant's message names).
    pub messages: bool,
    /// Only exec tasks may sleep, whatever this says.
    pub sleep: bool,
}

impl Capabilities {
    pub const NAMES: [&'static str; 8] = ["log", "config", "kv", "events", "commands", "fetch", "messages", "sleep"];

    pub fn all() -> Self {
        Capabilities {
            log: true,
            config: true,
            kv: true,
            events: true,
            commands: true,
            fetch: true,
            messages: true,
            sleep: true,
        }
    }

    pub fn none() -> Self {
        Capabilities {
            log: false,
            config: false,
            kv: false,
            events: false,
            commands: false,
            fetch: false,
            messages: false,
            sleep: false,
        }
    }

    /// Grants one capability by name; false for an unknown name.
    pub fn grant(&mut self, name: &str) -> bool {
        let slot = match name {
            "log" => &mut self.log,
            "config" => &mut self.config,
            "kv" => &mut self.kv,
            "events" => &mut self.events,
            "commands" => &mut self.commands,
            "fetch" => &mut self.fetch,
            "messages" => &mut self.messages,
            "sleep" => &mut self.sleep,
            _ => return false,
        };
        *slot = true;
        true
    }
}

/// A host directory the plugin sees through WASI (none by default).
#[derive(Clone, Debug)]
pub struct Preopen {
    pub host: std::path::PathBuf,
    pub guest: String,
    pub read_only: bool,
}
