//! E_PROFILING_SCRIPT (a route's handlers) and E_PROFILING_PROC (a
//! front-end's work on one message) records, as OpenSIPS emits them:
//! `start`, `enter`, `exit`, `end`, each with sec, usec, session, verb,
//! name, type, depth; `file` and `line` on enter/exit; `status` on
//! exit/end.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{Bus, Caller};

pub struct Profiler<'b> {
    bus: &'b Bus,
    event: &'static str,
    session: u64,
    depth: u32,
}

impl<'b> Profiler<'b> {
    /// Opens a session (`event`: "E_PROFILING_SCRIPT" or "E_PROFILING_PROC").
    pub fn start(bus: &'b Bus, event: &'static str, name: &str) -> Profiler<'b> {
        let p = Profiler { bus, event, session: bus.profiling_sessions.fetch_add(1, Relaxed) + 1, depth: 0 };
        p.record("start", name, None, None);
        p
    }

    pub fn enter(&mut self, name: &str, file: &str, line: u32) {
        self.depth += 1;
        self.record("enter", name, Some((file, line)), None);
    }

    pub fn exit(&mut self, name: &str, file: &str, line: u32, status: i64) {
        self.depth = self.depth.saturating_sub(1);
        self.record("exit", name, Some((file, line)), Some(status));
    }

    pub fn end(self, name: &str, status: i64) {
        self.record("end", name, None, Some(status));
    }

    fn record(&self, verb: &str, name: &str, at: Option<(&str, u32)>, status: Option<i64>) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let name = if name.is_empty() { "<root>" } else { name };
        let mut params = vec![
            ("sec", now.as_secs().to_string()),
            ("usec", now.subsec_micros().to_string()),
            ("session", self.session.to_string()),
            ("verb", verb.to_string()),
            ("name", name.to_string()),
            ("type", "1".to_string()),
            ("depth", self.depth.to_string()),
        ];
        if let Some((file, line)) = at {
            params.push(("file", file.to_string()));
            params.push(("line", line.to_string()));
        }
        if let Some(status) = status {
            params.push(("status", status.to_string()));
        }
        self.bus.raise(self.event, params, Caller::host("profiling"));
    }
}
