//! Compiled components cached on disk, so a restart or a reload of an
//! unchanged plugin does not recompile (100 ms to seconds) but maps the
//! artifact (~0.2 ms).
//!
//! Key: BLAKE3 of the wasm bytes and of the engine's compatibility hash
//! (wasmtime version, target, and settings such as fuel and epochs).
//!
//! Invariant behind the `unsafe` deserialization: only this module writes
//! into the cache directory, which it creates with mode 0700, and it writes
//! an artifact only as produced by `Component::serialize`, renamed into
//! place atomically. wasmtime still checks the header and the engine
//! settings of each artifact; one it refuses is recompiled and replaced.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use wasmtime::component::Component;
use wasmtime::Engine;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    Compiled,
    Disabled,
}

pub struct ComponentCache {
    dir: Option<PathBuf>,
    engine_key: String,
}

impl ComponentCache {
    /// `None` disables the cache. A directory that cannot be created
    /// disables it too, with a warning: evrhost then compiles every time.
    pub fn new(engine: &Engine, dir: Option<PathBuf>) -> Self {
        let dir = dir.and_then(|dir| match create_private_dir(&dir) {
            Ok(()) => Some(dir),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "compiled-component cache disabled");
                None
            }
        });
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        ComponentCache { dir, engine_key: format!("{:016x}", hasher.finish()) }
    }

    /// The default location: `$XDG_CACHE_HOME/evrhost` or `~/.cache/evrhost`.
    pub fn default_dir() -> Option<PathBuf> {
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|base| base.join("evrhost"))
    }

    /// Compiles `wasm` (a component's bytes) or maps its cached artifact.
    /// `digest` is blake3 of `wasm`.
    pub fn load(
        &self,
        engine: &Engine,
        wasm: &[u8],
        digest: &blake3::Hash,
    ) -> wasmtime::Result<(Component, CacheOutcome)> {
        let Some(path) = self.path(digest) else {
            return Ok((Component::new(engine, wasm)?, CacheOutcome::Disabled));
        };
        if let Some(component) = self.cached(engine, digest) {
            return Ok((component, CacheOutcome::Hit));
        }
        let component = Component::new(engine, wasm)?;
        if let Err(e) = store(&component, &path) {
            tracing::warn!(path = %path.display(), error = %e, "could not write compiled-component cache");
        }
        Ok((component, CacheOutcome::Compiled))
    }

    /// Where the artifact of the code with this digest lives.
    fn path(&self, digest: &blake3::Hash) -> Option<PathBuf> {
        let mut hasher = blake3::Hasher::new();
        hasher.update(self.engine_key.as_bytes());
        hasher.update(digest.as_bytes());
        Some(self.dir.as_ref()?.join(format!("{}.cwasm", hasher.finalize().to_hex())))
    }

    /// The cached artifact of the code with this digest, if there is one
    /// this engine accepts.
    pub fn cached(&self, engine: &Engine, digest: &blake3::Hash) -> Option<Component> {
        let path = self.path(digest)?;
        if !path.exists() {
            return None;
        }
        // SAFETY: see the module doc: the file was written by `store`.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cached artifact refused; recompiling");
                None
            }
        }
    }
}

fn store(component: &Component, path: &Path) -> std::io::Result<()> {
    let bytes = component.serialize().map_err(std::io::Error::other)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}
