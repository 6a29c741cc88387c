//! JavaScript plugins, on QuickJS through componentize-qjs.
//!
//! The SDK is the one built into this binary, written to the project's
//! `node_modules/evrhost` at every build so it always matches the host. An
//! entry module of the build's own re-exports the plugin's exports and
//! fails the build, naming the export, when one listed in `plugin.toml`
//! is missing (componentize-qjs would otherwise build a component that
//! traps at its first call).

use std::path::Path;
use std::process::Command;

use super::{io, toolchain, GuestError, Manifest, WORLD};

/// The SDK plugins import as `evrhost`.
pub const SDK: &str = include_str!("../../../guest-sdk/js/evrhost.js");

/// The toolchain version the SDK and templates are tested with.
pub const COMPONENTIZE_QJS: &str = "0.4.5";

/// The module a project's code starts from.
pub const ENTRY: &str = "plugin.js";

pub fn build(dir: &Path, work: &Path, manifest: &Manifest, out: &Path) -> Result<String, GuestError> {
    let entry = dir.join(ENTRY);
    if !entry.is_file() {
        return Err(GuestError::Invalid(format!("{}: not found; a JavaScript plugin starts there", entry.display())));
    }
    let tool = toolchain::find(
        dir,
        "componentize-qjs",
        &format!("run `npm install` in {} (its package.json pins componentize-qjs@{COMPONENTIZE_QJS})", dir.display()),
    )?;
    let sdk = dir.join("node_modules/evrhost");
    std::fs::create_dir_all(&sdk).map_err(io(&sdk))?;
    std::fs::write(sdk.join("index.js"), SDK).map_err(io(&sdk))?;
    std::fs::write(sdk.join("package.json"), "{\"name\":\"evrhost\",\"type\":\"module\",\"main\":\"index.js\"}\n")
        .map_err(io(&sdk))?;

    let wrapper = work.join("entry.js");
    std::fs::write(&wrapper, entry_module(manifest)).map_err(io(&wrapper))?;
    let mut cmd = Command::new(&tool);
    cmd.arg("--wit")
        .arg(work.join("wit"))
        .arg("--world")
        .arg(WORLD)
        .arg("--js")
        .arg(&wrapper)
        .arg("--module-root")
        .arg(dir)
        // The host runs components without the component-model async ABI.
        .arg("--sync")
        .arg("--output")
        .arg(out);
    toolchain::run(cmd, "componentize-qjs", dir)?;
    Ok(version(&tool))
}

/// componentize-qjs has no `--version`: its package says it.
fn version(tool: &Path) -> String {
    let package = std::fs::canonicalize(tool)
        .ok()
        .and_then(|bin| bin.parent().and_then(Path::parent).map(|p| p.join("package.json")))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|v| v["version"].as_str().map(str::to_string));
    match package {
        Some(v) => format!("componentize-qjs {v}"),
        None => "componentize-qjs".to_string(),
    }
}

/// Re-exports the plugin's exports, each checked to exist.
fn entry_module(manifest: &Manifest) -> String {
    let mut js = format!("import * as plugin from \"../{ENTRY}\";\n");
    for export in &manifest.exports {
        let name = export.name();
        js.push_str(&format!(
            "if (plugin.{name} === undefined) throw new Error(\"{ENTRY} exports no `{name}`, which plugin.toml lists: \
             add `export const {name} = define{}(...)` or drop it from `exports`\");\n\
             export const {name} = plugin.{name};\n",
            super::manifest::class(*export)
        ));
    }
    js
}
