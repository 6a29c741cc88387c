//! A guest's backtrace, read from a trap: the functions it was in, by
//! name (the component's name section, demangled), with file:line where
//! the component carries DWARF. Operators read it in the log, plugin
//! authors in `evrhost call`, callers a bounded line of it in the error.

use std::fmt;

/// Frames kept (wasmtime captures at most 20).
const MAX_FRAMES: usize = 20;
/// Frames in the one-line form a caller's error carries.
pub const SHORT_FRAMES: usize = 6;
/// Characters of one function name, and of one location, kept: both come
/// from the component (its name section, its DWARF), so a hostile one
/// cannot make a log line or an error of any size.
const MAX_NAME: usize = 120;
const MAX_LOCATION: usize = 240;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The function, or `<module>!<wasm-function[N]>` when unnamed.
    pub function: String,
    /// `file:line[:column]`, from DWARF.
    pub location: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestBacktrace {
    /// Innermost first, without the guest's own panic machinery.
    pub frames: Vec<Frame>,
}

/// What a Rust guest's panic runs through before it traps: not where the
/// fault is.
fn plumbing(function: &str) -> bool {
    [
        "core::panicking",
        "std::panicking",
        "std::sys",
        "std::rt",
        "std::process::abort",
        "__rust",
        "rust_panic",
        "panic_abort",
        "abort",
    ]
    .iter()
    .any(|p| function.starts_with(p))
}

impl GuestBacktrace {
    /// The backtrace attached to a wasmtime error, if any.
    pub fn of(e: &wasmtime::Error) -> Option<GuestBacktrace> {
        let bt = e.downcast_ref::<wasmtime::WasmBacktrace>()?;
        let frames: Vec<Frame> = bt
            .frames()
            .iter()
            .flat_map(|frame| {
                let fallback = || {
                    let module = frame.module().name().unwrap_or("module");
                    format!("{module}!<wasm-function[{}]>", frame.func_index())
                };
                let symbols = frame.symbols();
                if symbols.is_empty() {
                    let function = frame.func_name().map_or_else(fallback, demangled);
                    return vec![Frame { function: bounded(function, MAX_NAME), location: None }];
                }
                // Inlined functions give several symbols for one frame.
                symbols
                    .iter()
                    .map(|s| {
                        let function = s.name().or(frame.func_name()).map_or_else(fallback, demangled);
                        let location = s.file().map(|file| match (s.line(), s.column()) {
                            (Some(line), Some(col)) => format!("{file}:{line}:{col}"),
                            (Some(line), None) => format!("{file}:{line}"),
                            _ => file.to_string(),
                        });
                        Frame {
                            function: bounded(function, MAX_NAME),
                            location: location.map(|l| bounded(l, MAX_LOCATION)),
                        }
                    })
                    .collect()
            })
            .filter(|f| !plumbing(&f.function))
            .take(MAX_FRAMES)
            .collect();
        (!frames.is_empty()).then_some(GuestBacktrace { frames })
    }

    /// One line: the innermost `n` frames, `f at file:line ← g ← …`.
    pub fn short(&self, n: usize) -> String {
        let mut parts: Vec<String> = self.frames.iter().take(n).map(Frame::to_string).collect();
        if self.frames.len() > n {
            parts.push(format!("… {} more", self.frames.len() - n));
        }
        parts.join(" ← ")
    }
}

/// A Rust symbol (legacy or v0 mangling) as source names it, without its
/// hash; any other name as it is.
fn demangled(name: &str) -> String {
    format!("{:#}", rustc_demangle::demangle(name))
}

fn bounded(mut name: String, max: usize) -> String {
    if let Some((at, _)) = name.char_indices().nth(max) {
        name.truncate(at);
        name.push('…');
    }
    name
}

impl fmt::Display for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(at) => write!(f, "{} at {at}", self.function),
            None => write!(f, "{}", self.function),
        }
    }
}

/// Numbered, one frame a line, innermost first.
impl fmt::Display for GuestBacktrace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, frame) in self.frames.iter().enumerate() {
            writeln!(f, "{i:>4}: {frame}")?;
        }
        Ok(())
    }
}
