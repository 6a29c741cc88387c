//! The plugin author's side: `evrhost new` projects build and answer in
//! every language, a project that says one thing and does another fails its
//! build naming the difference, and components the host cannot run are
//! refused at load naming the missing piece, never at the first call.

use std::path::Path;
use std::process::Command;

use super::guests::{tool_path, tools};
use super::support::{evrhost, text, BIN};

fn run(args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env("PATH", tool_path())
        // A Rust project shares the plugins' compiled dependencies.
        .env("CARGO_TARGET_DIR", Path::new(env!("CARGO_TARGET_TMPDIR")).join("../wasm-plugins"))
        .output()
        .expect("run evrhost");
    (out.status.success(), format!("{}{}", text(&out.stdout), text(&out.stderr)))
}

fn scaffolded(lang: &str) {
    let dir = tempfile::tempdir().expect("dir");
    let name = format!("hello-{lang}");
    let (ok, out) = run(&["new", &name, "--lang", lang], dir.path());
    assert!(ok, "{lang}: {out}");
    let project = dir.path().join(&name);
    let readme = std::fs::read_to_string(project.join("README.md")).expect("README");
    assert!(readme.contains(&format!("evrhost call {name}.wasm hello world")), "{readme}");

    let (ok, out) = run(&["build", &name], dir.path());
    assert!(ok, "{lang}: {out}");
    let wasm = project.join(format!("{name}.wasm"));
    let (ok, out) = run(&["call", &wasm.display().to_string(), "hello", "world"], dir.path());
    assert!(ok, "{lang}: {out}");
    assert!(out.contains("retval:  1") && out.contains("data:    world #1"), "{lang}: {out}");
    let (ok, out) = run(&["inspect", &wasm.display().to_string()], dir.path());
    assert!(ok, "{lang}: {out}");
    assert!(out.contains(&format!("language: {lang} (evrhost build; ")), "{lang}: {out}");
    assert!(out.contains(&format!("{name}.seen TEXT — how often TEXT was sent")), "{lang}: {out}");

    let (ok, out) = run(&["new", &name, "--lang", lang], dir.path());
    assert!(!ok && out.contains("already exists"), "{lang}: {out}");
}

#[test]
fn a_new_js_project_builds_and_answers() {
    scaffolded("js");
}

#[test]
fn a_new_go_project_builds_and_answers() {
    scaffolded("go");
}

#[test]
fn a_new_python_project_builds_and_answers() {
    scaffolded("python");
}

#[test]
fn a_new_rust_project_builds_and_answers() {
    scaffolded("rust");
}

#[test]
fn a_project_that_lists_an_export_its_code_lacks_fails_its_build_naming_it() {
    let dir = tempfile::tempdir().expect("dir");
    let cases = [
        ("js", "plugin.js exports no `task`, which plugin.toml lists"),
        ("python", "plugin.py defines no class Task(evrhost.Task), which plugin.toml lists"),
        ("go", "plugin.toml lists `task`, but the Go code does not export it"),
    ];
    for (lang, expected) in cases {
        let name = format!("x-{lang}");
        assert!(run(&["new", &name, "--lang", lang], dir.path()).0);
        let manifest = dir.path().join(&name).join("plugin.toml");
        let text = std::fs::read_to_string(&manifest).expect("plugin.toml");
        std::fs::write(&manifest, text.replace("[\"route\", \"api\"]", "[\"route\", \"api\", \"task\"]"))
            .expect("write");
        let (ok, out) = run(&["build", &name], dir.path());
        assert!(!ok && out.contains(expected), "{lang}: {out}");
    }
    let (ok, out) = run(&["new", "Bad Name", "--lang", "js"], dir.path());
    assert!(!ok && out.contains("name `Bad Name`: use 1 to 64 lowercase letters"), "{out}");
    let (ok, out) = run(&["build", "."], dir.path());
    assert!(!ok && out.contains("plugin.toml: not found"), "{out}");

    // Without the toolchain, the build says which one and how to get it.
    assert!(run(&["new", "no-tools", "--lang", "js"], dir.path()).0);
    let out = Command::new(BIN)
        .args(["build", "no-tools"])
        .current_dir(dir.path())
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("run");
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("componentize-qjs not found: run `npm install`"), "{err}");
}

/// Builds `js` against `wit` (world `w`) with componentize-qjs itself.
fn qjs(dir: &Path, name: &str, wit: &str, sync: bool) -> String {
    let wit_path = dir.join(format!("{name}.wit"));
    std::fs::write(&wit_path, wit).expect("wit");
    let js = dir.join("raw.js");
    std::fs::write(&js, "export const route = { handle(req) { return { handled: true, retval: \"ok\", params: [], unset: [], data: null }; } };\n").expect("js");
    let out = dir.join(format!("{name}.wasm"));
    let mut cmd = Command::new(tools().join("node_modules/.bin/componentize-qjs"));
    cmd.arg("--wit").arg(&wit_path).arg("--js").arg(&js).args(["-n", "w", "-o"]).arg(&out);
    if sync {
        cmd.arg("--sync");
    }
    let status = cmd.output().expect("componentize-qjs");
    assert!(status.status.success(), "{}", text(&status.stderr));
    out.display().to_string()
}

#[test]
fn components_the_host_cannot_run_are_refused_at_load_naming_what_is_missing() {
    let dir = tempfile::tempdir().expect("dir");
    let contract = evrhost::guest::CONTRACT;
    let world = "\nworld w {\n    include imports;\n    export route;\n}\n";
    let cases = [
        (
            qjs(dir.path(), "async", &format!("{contract}{world}"), false),
            "is built for the component-model async ABI, which evrhost does not run".to_string(),
        ),
        (
            qjs(dir.path(), "old", &format!("{contract}{world}").replace("evrhost:plugin@0.2.0", "evrhost:plugin@0.1.0"), true),
            "it was built for evrhost:plugin@0.1.0".to_string(),
        ),
        (
            qjs(
                dir.path(),
                "foreign",
                &format!("{contract}\ninterface sockets {{ open: func(); }}\nworld w {{\n    include imports;\n    import sockets;\n    export route;\n}}\n"),
                true,
            ),
            "imports `evrhost:plugin/sockets@0.2.0`, which this evrhost does not offer".to_string(),
        ),
    ];
    for (wasm, expected) in cases {
        let out = evrhost(&["call", &wasm, "r"]);
        let err = text(&out.stderr);
        assert!(!out.status.success() && err.contains(&expected), "{wasm}: {err}");
    }
}
