//! Rust plugins: cargo for wasm32-wasip2, the SDK crate vendored into the
//! project by `evrhost new`.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{io, GuestError, Manifest};

/// The SDK crate's files, written to `evrhost-sdk/` of a new project.
pub const SDK_MANIFEST: &str = include_str!("../../../guest-sdk/Cargo.toml");
pub const SDK_LIB: &str = include_str!("../../../guest-sdk/src/lib.rs");

pub fn build(dir: &Path, manifest: &Manifest, out: &Path) -> Result<String, GuestError> {
    let cargo = std::env::var_os("CARGO").map(PathBuf::from).unwrap_or_else(|| "cargo".into());
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| dir.join("target"));
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--release", "--target=wasm32-wasip2", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target);
    super::toolchain::run(cmd, "cargo", dir)?;
    let built = target.join("wasm32-wasip2/release").join(format!("{}.wasm", manifest.name.replace('-', "_")));
    std::fs::copy(&built, out).map_err(io(&built))?;
    Ok(super::toolchain::version(&cargo, &["--version"], "cargo"))
}
