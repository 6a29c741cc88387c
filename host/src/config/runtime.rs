//! `[runtime]`: the engine's settings and the compiled-code cache.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::checker::Checker;
use super::ConfigError;
use crate::runtime::{ComponentCache, CoredumpSettings, EngineSettings};

/// The largest linear memory a plugin may have, in MiB (wasm32's 4 GiB).
pub(super) const MAX_MEMORY_MB: u64 = 4096;
/// Instances alive at once, all plugins together: each reserves address
/// space in the pooling allocator.
pub(super) const MAX_INSTANCES: u32 = 10_000;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RuntimeSection {
    /// false disables the compiled-code cache.
    cache: Option<bool>,
    cache_dir: Option<String>,
    epoch_tick_ms: Option<Spanned<u64>>,
    max_instances: Option<Spanned<u32>>,
    max_memory_mb: Option<Spanned<u64>>,
    /// On a trap, a wasm coredump is written here (relative to the file).
    coredump_dir: Option<String>,
    coredump_max_mb: Option<Spanned<u64>>,
    coredump_keep: Option<Spanned<u64>>,
}

/// `coredump_*`: off unless a directory is given; the bounds are checked
/// even then, so a file that passes `check` with them serves with them.
fn coredump(ck: &Checker, rt: &RuntimeSection, base: &Path) -> Result<Option<CoredumpSettings>, ConfigError> {
    let max_mb = ck.range(&rt.coredump_max_mb, "runtime.coredump_max_mb", 1, MAX_MEMORY_MB)?.unwrap_or(64);
    let keep = ck.range(&rt.coredump_keep, "runtime.coredump_keep", 1, 10_000)?.unwrap_or(16);
    Ok(rt.coredump_dir.as_ref().map(|dir| CoredumpSettings {
        dir: base.join(dir),
        max_bytes: (max_mb as usize) << 20,
        keep: keep as usize,
    }))
}

/// The engine's settings, and the cache directory (None: no cache).
pub(super) fn check(
    ck: &Checker,
    rt: &RuntimeSection,
    base: &Path,
) -> Result<(EngineSettings, Option<PathBuf>), ConfigError> {
    let defaults = EngineSettings::default();
    // A tick is the deadline's resolution: past a second, deadlines mean little.
    let tick_ms = ck.range(&rt.epoch_tick_ms, "runtime.epoch_tick_ms", 1, 1000)?.unwrap_or(1);
    // A wasm32 memory is at most 4 GiB.
    let max_memory_mb = ck.range(&rt.max_memory_mb, "runtime.max_memory_mb", 1, MAX_MEMORY_MB)?;
    let engine = EngineSettings {
        tick: Duration::from_millis(tick_ms),
        total_instances: ck
            .range(&rt.max_instances, "runtime.max_instances", 1, MAX_INSTANCES)?
            .unwrap_or(defaults.total_instances),
        max_memory_bytes: max_memory_mb.map_or(defaults.max_memory_bytes, |mb| (mb as usize) << 20),
        coredump: coredump(ck, rt, base)?,
    };
    let cache_dir = match (rt.cache, &rt.cache_dir) {
        (Some(false), _) => None,
        (_, Some(dir)) => Some(base.join(dir)),
        _ => ComponentCache::default_dir(),
    };
    Ok((engine, cache_dir))
}
