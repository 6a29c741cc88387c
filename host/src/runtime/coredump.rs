//! Opt-in wasm coredumps (`[runtime] coredump_dir`): on a trap, the
//! guest's stack, globals and memory, written as a standard wasm coredump
//! file for offline debugging (`wasmgdb`, `wasm-tools`). Bounded three
//! ways: a dump bigger than `max_bytes` is not written, at most one a
//! second is, and only the newest `keep` files stay in the directory.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use wasmtime::{AsContext, Store};

use super::state::HostState;
use crate::sync::lock;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoredumpSettings {
    pub dir: PathBuf,
    /// A dump past this (its memories, mostly) is skipped and logged.
    pub max_bytes: usize,
    /// Files kept; older ones are removed.
    pub keep: usize,
}

/// Dumps at most this often, daemon-wide: a trap storm must not turn into
/// a disk storm, nor stall calls on serializing memories.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

pub(crate) struct Coredumps {
    settings: CoredumpSettings,
    last: Mutex<Option<Instant>>,
}

impl Coredumps {
    pub fn new(settings: CoredumpSettings) -> Coredumps {
        Coredumps { settings, last: Mutex::new(None) }
    }

    /// Writes the coredump `e` carries, if it carries one and the bounds
    /// allow; the file is written off the calling thread.
    pub fn write(&self, e: &wasmtime::Error, store: &mut Store<HostState>, plugin: &str, target: &str) {
        let Some(dump) = e.downcast_ref::<wasmtime::WasmCoreDump>() else { return };
        {
            let mut last = lock(&self.last);
            if last.is_some_and(|at| at.elapsed() < MIN_INTERVAL) {
                tracing::debug!(%plugin, route = %target, "coredump skipped: one was written less than a second ago");
                return;
            }
            *last = Some(Instant::now());
        }
        let size: usize = dump.memories().iter().map(|m| m.data_size(store.as_context())).sum();
        let max = self.settings.max_bytes;
        if size > max {
            tracing::warn!(%plugin, route = %target, size, max, "coredump not written: its memories are over coredump_max_mb");
            return;
        }
        let bytes = dump.serialize(&mut *store, plugin);
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let path = self.settings.dir.join(format!("{plugin}-{ms}.coredump"));
        let (dir, keep, plugin, target) =
            (self.settings.dir.clone(), self.settings.keep, plugin.to_string(), target.to_string());
        let spawned = std::thread::Builder::new().name("evrhost-coredump".into()).spawn(move || {
            match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, &bytes)) {
                Ok(()) => tracing::info!(%plugin, route = %target, path = %path.display(), bytes = bytes.len(), "coredump written"),
                Err(e) => tracing::warn!(%plugin, route = %target, path = %path.display(), error = %e, "coredump not written"),
            }
            prune(&dir, keep);
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "coredump not written: no thread to write it");
        }
    }
}

/// Removes all but the newest `keep` coredumps of `dir` (by name: each
/// ends in its time of writing).
fn prune(dir: &std::path::Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut dumps: Vec<(u128, PathBuf)> = entries
        .filter_map(|e| {
            let path = e.ok()?.path();
            let stem = path.file_name()?.to_str()?.strip_suffix(".coredump")?;
            let ms = stem.rsplit_once('-')?.1.parse().ok()?;
            Some((ms, path))
        })
        .collect();
    dumps.sort();
    let excess = dumps.len().saturating_sub(keep);
    for (_, path) in dumps.into_iter().take(excess) {
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove an old coredump");
        }
    }
}
