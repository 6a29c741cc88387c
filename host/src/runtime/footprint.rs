//! What a component says of itself before it runs: the language it was
//! written in (from `evrhost build`'s own section, else from its modules'
//! producers sections) and what it needs of the instance pool.

use wasmparser::{Instance, KnownCustom, Parser, Payload};

/// The custom section `evrhost build` adds: `key=value` lines.
pub const BUILD_SECTION: &str = "evrhost-build";

/// Longest build section read; the rest is ignored.
const MAX_BUILD_SECTION: usize = 4096;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Footprint {
    /// `js`, `go`, `python`, `rust`, or a producers section's language.
    pub language: Option<String>,
    /// Whether `evrhost build` made it (its section says the language).
    pub built_by_evrhost: bool,
    /// The toolchain, as the build section or the producers name it.
    pub built_with: Vec<String>,
    /// Core instances one instance of the component makes.
    pub core_instances: u32,
    /// Linear memories it defines.
    pub memories: u32,
    /// Bytes of linear memory its memories start with.
    pub initial_memory: u64,
}

impl Footprint {
    /// Reads `wasm`; a malformed binary yields what was read before the
    /// fault (compiling it reports the fault).
    pub fn of(wasm: &[u8]) -> Footprint {
        let mut f = Footprint::default();
        let mut languages = Vec::new();
        for payload in Parser::new(0).parse_all(wasm) {
            let Ok(payload) = payload else { break };
            match payload {
                // Bags of exports are not instances the pool makes.
                Payload::InstanceSection(r) => {
                    let made = r.into_iter().flatten().filter(|i| matches!(i, Instance::Instantiate { .. })).count();
                    f.core_instances = f.core_instances.saturating_add(u32::try_from(made).unwrap_or(u32::MAX));
                }
                Payload::MemorySection(r) => {
                    for memory in r.into_iter().flatten() {
                        f.memories = f.memories.saturating_add(1);
                        f.initial_memory = f.initial_memory.saturating_add(memory.initial.saturating_mul(1 << 16));
                    }
                }
                Payload::CustomSection(c) if c.name() == BUILD_SECTION => {
                    let text = String::from_utf8_lossy(&c.data()[..c.data().len().min(MAX_BUILD_SECTION)]).into_owned();
                    for (key, value) in text.lines().filter_map(|l| l.split_once('=')) {
                        match key {
                            "language" => {
                                f.language = Some(value.to_string());
                                f.built_by_evrhost = true;
                            }
                            "toolchain" => f.built_with.insert(0, value.to_string()),
                            _ => {}
                        }
                    }
                }
                Payload::CustomSection(c) => {
                    if let KnownCustom::Producers(producers) = c.as_known() {
                        for field in producers.into_iter().flatten() {
                            for value in field.values.into_iter().flatten() {
                                let named = format!("{} {}", value.name, value.version).trim().to_string();
                                match field.name {
                                    "language" if !languages.contains(&named) => languages.push(named),
                                    "processed-by" | "sdk" if !f.built_with.contains(&named) => {
                                        f.built_with.push(named)
                                    }
                                    _ => {}
                                }
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        if f.language.is_none() {
            f.language = interpreter(&f.built_with).map(str::to_string).or_else(|| {
                // The host side of an interpreter is often Rust or C: a
                // toolchain named above says more than these.
                (!languages.is_empty()).then(|| languages.join(", "))
            });
        }
        f
    }
}

/// The language of a component an interpreter toolchain made, from the
/// toolchains its producers sections name.
fn interpreter(built_with: &[String]) -> Option<&'static str> {
    const KNOWN: [(&str, &str); 4] = [
        ("componentize-qjs", "js"),
        ("componentize-js", "js"),
        ("componentize-py", "python"),
        ("Go cmd/compile", "go"),
    ];
    KNOWN.iter().find(|(tool, _)| built_with.iter().any(|b| b.starts_with(tool))).map(|(_, lang)| *lang)
}

/// `wasm` with a build section appended: a custom section may close a
/// component as well as a module.
pub fn with_build_section(mut wasm: Vec<u8>, fields: &[(&str, &str)]) -> Vec<u8> {
    let body: String = fields.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    let mut payload = Vec::new();
    leb128(&mut payload, BUILD_SECTION.len() as u64);
    payload.extend_from_slice(BUILD_SECTION.as_bytes());
    payload.extend_from_slice(body.as_bytes());
    wasm.push(0);
    leb128(&mut wasm, payload.len() as u64);
    wasm.extend_from_slice(&payload);
    wasm
}

fn leb128(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_section_is_read_back_and_the_component_counted() {
        let echo = std::fs::read(crate::harness::plugin("echo")).expect("echo.wasm");
        let plain = Footprint::of(&echo);
        assert!(plain.language.as_deref().is_some_and(|l| l.starts_with("Rust")), "{plain:?}");
        assert!(plain.core_instances >= 2 && plain.memories >= 1 && plain.initial_memory > 0, "{plain:?}");
        let marked = with_build_section(echo, &[("language", "js"), ("toolchain", "componentize-qjs 0.4.5")]);
        let f = Footprint::of(&marked);
        assert_eq!(f.language.as_deref(), Some("js"));
        assert_eq!(f.built_with.first().map(String::as_str), Some("componentize-qjs 0.4.5"));
        assert_eq!(
            (f.core_instances, f.memories, f.initial_memory),
            (plain.core_instances, plain.memories, plain.initial_memory)
        );
        let engine = wasmtime::Engine::default();
        wasmtime::component::Component::new(&engine, &marked).expect("still a valid component");
    }
}
