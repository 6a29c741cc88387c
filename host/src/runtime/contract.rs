//! Which version of `wit/` this host speaks, and the check that refuses a
//! component built for another one before the linker sees it, naming the
//! version it was built for.

use wasmtime::component::Component;
use wasmtime::Engine;

/// The package every plugin interface belongs to.
pub const PACKAGE: &str = "evrhost:plugin";
/// The version of `wit/plugin.wit`. A component built for another minor
/// version (0.x) is refused: its records have other shapes.
pub const VERSION: &str = "0.2.0";

/// `evrhost:plugin/NAME@VERSION`, as a `&'static str`.
macro_rules! interface {
    ($name:literal) => {
        concat!("evrhost:plugin/", $name, "@0.2.0")
    };
}
pub(crate) use interface;

/// A component built against another version of the contract.
#[derive(Debug, thiserror::Error)]
#[error(
    "it was built for {PACKAGE}@{built_for} (it names `{interface}`); this evrhost speaks {PACKAGE}@{VERSION}: \
     rebuild it against this evrhost's wit/ (or its guest SDK)"
)]
pub struct ContractMismatch {
    pub built_for: String,
    pub interface: String,
}

/// The first import or export of `component` in this package at another
/// version, if any.
pub fn check(engine: &Engine, component: &Component) -> Result<(), ContractMismatch> {
    let ty = component.component_type();
    let names = ty.imports(engine).map(|(n, _)| n.to_string()).chain(ty.exports(engine).map(|(n, _)| n.to_string()));
    for name in names {
        let Some(rest) = name.strip_prefix(PACKAGE).and_then(|r| r.strip_prefix('/')) else { continue };
        let version = rest.split_once('@').map_or("", |(_, v)| v);
        if version != VERSION {
            let built_for = if version.is_empty() { "an unversioned package".into() } else { version.to_string() };
            return Err(ContractMismatch { built_for, interface: name });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_macro_names_this_version() {
        assert_eq!(interface!("route"), format!("{}/route@{}", super::PACKAGE, super::VERSION));
    }
}
