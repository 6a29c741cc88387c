//! `plugin.toml`: a plugin project's name, language and exports, parsed
//! once and kept typed.

use std::path::Path;

use serde::Deserialize;

use super::GuestError;

/// The file that makes a directory a plugin project.
pub const MANIFEST: &str = "plugin.toml";

/// Largest `plugin.toml` read.
const MAX_MANIFEST: u64 = 64 << 10;

/// Longest plugin name; it becomes a file name and a log tag.
const MAX_NAME: usize = 64;

/// A language a plugin can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Rust,
    Js,
    Go,
    Python,
}

impl Language {
    pub fn name(self) -> &'static str {
        match self {
            Language::Rust => "rust",
            Language::Js => "js",
            Language::Go => "go",
            Language::Python => "python",
        }
    }
}

pub use crate::runtime::Export;

/// An export's name capitalised: Python's class, the JS SDK's `define…`
/// suffix.
pub fn class(export: Export) -> &'static str {
    match export {
        Export::Route => "Route",
        Export::Api => "Api",
        Export::Subscriber => "Subscriber",
        Export::Task => "Task",
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    name: String,
    language: Language,
    /// Rust plugins say what they export with `export!`.
    #[serde(default)]
    exports: Vec<String>,
}

/// A parsed `plugin.toml`.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub name: String,
    pub language: Language,
    /// Each at most once, in the order given.
    pub exports: Vec<Export>,
}

impl Manifest {
    pub fn load(dir: &Path) -> Result<Manifest, GuestError> {
        let path = dir.join(MANIFEST);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() > MAX_MANIFEST) {
            return Err(GuestError::Manifest {
                path,
                message: format!("over {MAX_MANIFEST} bytes; it is a few lines"),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => GuestError::Manifest {
                path: path.clone(),
                message: format!("not found: {} is not a plugin project (`evrhost new` makes one)", dir.display()),
            },
            _ => GuestError::Io { path: path.clone(), source },
        })?;
        Manifest::parse(&text).map_err(|message| GuestError::Manifest { path, message })
    }

    pub fn parse(text: &str) -> Result<Manifest, String> {
        let raw: Raw = toml::from_str(text).map_err(|e| e.to_string())?;
        check_name(&raw.name)?;
        let mut exports = Vec::new();
        for name in raw.exports {
            let export = Export::ALL
                .into_iter()
                .find(|e| e.name() == name)
                .ok_or_else(|| format!("`exports`: unknown export `{name}`; known: route, api, subscriber, task"))?;
            if exports.contains(&export) {
                return Err(format!("`exports` lists `{name}` twice"));
            }
            exports.push(export);
        }
        if exports.is_empty() && raw.language != Language::Rust {
            return Err(
                "`exports` is empty: list what the plugin implements, any of route, api, subscriber, task".into()
            );
        }
        Ok(Manifest { name: raw.name, language: raw.language, exports })
    }
}

/// A name fit for a file, a Cargo package and a log tag.
pub fn check_name(name: &str) -> Result<(), String> {
    let fits = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if fits {
        Ok(())
    } else {
        Err(format!("name `{name}`: use 1 to {MAX_NAME} lowercase letters, digits, `-` or `_`, starting with a letter"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_is_parsed_and_its_mistakes_named() {
        let m = Manifest::parse("name = \"echo\"\nlanguage = \"js\"\nexports = [\"route\", \"api\"]\n").unwrap();
        assert_eq!((m.name.as_str(), m.language, m.exports), ("echo", Language::Js, vec![Export::Route, Export::Api]));
        let twice = Manifest::parse("name = \"e\"\nlanguage = \"js\"\nexports = [\"route\", \"route\"]").unwrap_err();
        assert!(twice.contains("`route` twice"), "{twice}");
        let none = Manifest::parse("name = \"e\"\nlanguage = \"python\"").unwrap_err();
        assert!(none.contains("`exports` is empty"), "{none}");
        let unknown_export = Manifest::parse("name = \"e\"\nlanguage = \"js\"\nexports = [\"routes\"]").unwrap_err();
        assert!(unknown_export.contains("unknown export `routes`"), "{unknown_export}");
        let lang = Manifest::parse("name = \"e\"\nlanguage = \"cobol\"\nexports = [\"route\"]").unwrap_err();
        assert!(lang.contains("cobol"), "{lang}");
        let name = Manifest::parse("name = \"../x\"\nlanguage = \"js\"\nexports = [\"route\"]").unwrap_err();
        assert!(name.contains("name `../x`"), "{name}");
        let unknown =
            Manifest::parse("name = \"e\"\nlanguage = \"js\"\nexports = [\"route\"]\nentry = \"x\"").unwrap_err();
        assert!(unknown.contains("entry"), "{unknown}");
        assert!(Manifest::parse("name = \"r\"\nlanguage = \"rust\"").is_ok());
    }
}
