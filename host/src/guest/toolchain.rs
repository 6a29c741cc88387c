//! Finding a guest toolchain's command and running it, with its output
//! kept for the error when it fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::GuestError;

/// `name` from the project's own `node_modules/.bin` or `.venv/bin` (where
/// `npm install` and `pip install` put a pinned toolchain), else from PATH.
pub fn find(project: &Path, name: &str, hint: &str) -> Result<PathBuf, GuestError> {
    let local = [project.join("node_modules/.bin").join(name), project.join(".venv/bin").join(name)];
    if let Some(found) = local.into_iter().find(|p| p.is_file()) {
        return Ok(found);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        // Tools run in the project's directory: a relative PATH entry would miss.
        .and_then(|p| std::path::absolute(p).ok())
        .ok_or_else(|| GuestError::MissingTool { tool: name.to_string(), hint: hint.to_string() })
}

/// Runs `cmd`; on failure the error carries what it printed.
pub fn run(mut cmd: Command, tool: &str, project: &Path) -> Result<(), GuestError> {
    let shown = tool.to_string();
    // Their own backtraces say nothing to a plugin author.
    cmd.env_remove("RUST_BACKTRACE").env_remove("RUST_LIB_BACKTRACE");
    let output = cmd.output().map_err(|e| GuestError::ToolFailed {
        tool: shown.clone(),
        project: project.display().to_string(),
        output: format!("cannot start it: {e}"),
    })?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Err(GuestError::ToolFailed { tool: shown, project: project.display().to_string(), output: tail(text.trim_end()) })
}

/// What a failed tool printed last, where its error is; a toolchain can
/// print megabytes before it.
const MAX_SHOWN: usize = 16 << 10;

fn tail(text: &str) -> String {
    if text.len() <= MAX_SHOWN {
        return text.to_string();
    }
    let mut start = text.len() - MAX_SHOWN;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("[… {start} bytes before]\n{}", &text[start..])
}

/// The first line `tool ARGS` prints, e.g. its version; `tool` when it
/// prints nothing.
pub fn version(tool: &Path, args: &[&str], name: &str) -> String {
    Command::new(tool)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string))
        .unwrap_or_else(|| name.to_string())
}
