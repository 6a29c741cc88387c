//! Builds the example plugins and hostile fixtures in `plugins/` for
//! wasm32-wasip2, so that the daemon can embed the examples and the tests
//! can load real components. Nothing is built by hand; no `.wasm` is
//! committed. The plugins are the members of `plugins/Cargo.toml`, the one
//! place that lists them; the tests find them in EVRHOST_PLUGINS_DIR.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The `members = [...]` of the plugins' workspace manifest.
fn members(manifest: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(manifest).unwrap_or_else(|e| panic!("cannot read {}: {e}", manifest.display()));
    let list = text
        .split_once("members")
        .and_then(|(_, rest)| rest.split_once('['))
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(list, _)| list)
        .unwrap_or_else(|| panic!("{}: no `members = [...]`", manifest.display()));
    list.split(',').map(|m| m.trim().trim_matches('"').to_string()).filter(|m| !m.is_empty()).collect()
}

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().expect("host/ lives in the workspace root").to_path_buf();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for dir in ["plugins", "guest-sdk", "wit"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }

    // A target directory of their own, shared by every profile of the host,
    // so a release build after a debug one does not rebuild them; a nested
    // cargo on another target dir takes no lock the outer one holds.
    let target_dir =
        env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target")).join("wasm-plugins");
    println!("cargo:rerun-if-env-changed=EVRHOST_GUEST_TOOLCHAIN");
    // The host may be built by a toolchain without the wasm target (the
    // fuzzers' nightly): EVRHOST_GUEST_TOOLCHAIN names the one that has it.
    let mut cmd = match env::var_os("EVRHOST_GUEST_TOOLCHAIN") {
        Some(toolchain) => {
            let mut cmd = Command::new("rustup");
            cmd.arg("run").arg(toolchain).arg("cargo");
            for var in ["RUSTC", "RUSTDOC", "RUSTUP_TOOLCHAIN", "RUSTC_WRAPPER", "CARGO"] {
                cmd.env_remove(var);
            }
            cmd
        }
        None => Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into())),
    };
    cmd.arg("build")
        .arg("--release")
        .arg("--target=wasm32-wasip2")
        .arg("--manifest-path")
        .arg(root.join("plugins/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // The host's flags are not the guests' flags.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("cannot run cargo to build the plugins");
    if !status.success() {
        panic!(
            "building plugins/ for wasm32-wasip2 failed (see above). \
             If the target is missing: rustup target add wasm32-wasip2"
        );
    }

    let dest = out_dir.join("plugins");
    std::fs::create_dir_all(&dest).expect("cannot create OUT_DIR/plugins");
    for name in members(&root.join("plugins/Cargo.toml")) {
        let built = target_dir.join("wasm32-wasip2/release").join(format!("{name}.wasm"));
        copy(&built, &dest.join(format!("{name}.wasm")));
    }
    println!("cargo:rustc-env=EVRHOST_PLUGINS_DIR={}", dest.display());
}

fn copy(from: &Path, to: &Path) {
    if let Err(e) = std::fs::copy(from, to) {
        panic!("cannot copy {} to {}: {e}", from.display(), to.display());
    }
}
