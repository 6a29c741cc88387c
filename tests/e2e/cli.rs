//! The plugin author's tools: `evrhost call`, `evrhost inspect`, and the
//! daemon on its embedded default.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::support::{evrhost, plugin, result, text, BIN};

#[test]
fn call_prints_the_reply_fuel_and_time() {
    let path = plugin("echo");
    let out = evrhost(&["call", path.to_str().expect("utf-8"), "r", "hello", "--param", "k=v"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    for line in ["handled: true", "retval:  ok", "param:   k=v", "data:    hello (5 bytes)"] {
        assert!(stdout.contains(line), "{line}: {stdout}");
    }
    let fuel: u64 = stdout.lines().find_map(|l| l.strip_prefix("fuel:")).expect("fuel").trim().parse().expect("n");
    assert!(fuel > 0);
    let out = evrhost(&["call", path.to_str().expect("utf-8"), "r", "--per-call"]);
    assert!(out.status.success());
}

#[test]
fn call_refuses_a_plugin_without_a_route_export() {
    let path = plugin("timer");
    let out = evrhost(&["call", path.to_str().expect("utf-8"), "tick"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr)
            .contains("plugin `timer` does not export `evrhost:plugin/route@0.2.0`, which route `tick` needs"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn inspect_shows_exports_imports_and_commands() {
    let out = evrhost(&["inspect", plugin("counter").to_str().expect("utf-8")]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("exports:  route, api"), "{stdout}");
    assert!(stdout.contains("evrhost:plugin/kv@0.2.0"), "{stdout}");
    assert!(stdout.contains("counter.get KEY"), "{stdout}");
    let out = evrhost(&["inspect", plugin("timer").to_str().expect("utf-8")]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("exports:  task"), "{stdout}");
    assert!(!stdout.contains("evrhost:plugin/kv@0.2.0"), "timer imports no kv: {stdout}");
}

#[test]
fn inspect_names_a_file_that_is_not_a_component() {
    let dir = tempfile::tempdir().expect("dir");
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").expect("write");
    let out = evrhost(&["inspect", core.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("is a core wasm module, not a component"), "{}", text(&out.stderr));
}

/// The README's first command: the daemon on its embedded default, which
/// prints, once ready, commands to try; each works as printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_without_a_config_serves_the_embedded_demo() {
    use std::io::BufRead;
    let port = super::support::free_port();
    let udp = super::support::free_udp_port();
    // `--listen` and `--udp` keep clear of a daemon someone runs by hand.
    let state = tempfile::tempdir().expect("temp dir");
    let mut child = std::process::Command::new(BIN)
        .args(["run", "--listen", &format!("127.0.0.1:{port}"), "--udp", &format!("127.0.0.1:{udp}")])
        .env("XDG_STATE_HOME", state.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("piped stdout");
    let greeting = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let last = line.contains("HEARTBEAT");
            lines.push(line);
            if last {
                break;
            }
        }
        lines
    });
    let greeting = tokio::time::timeout(Duration::from_secs(60), greeting).await.expect("greeted").expect("read");
    assert!(greeting[0].contains(&format!("JSON-RPC on 127.0.0.1:{port}")), "{greeting:?}");
    // Each suggestion, run as printed (the binary for `evrhost`, up to its comment).
    let run = |needle: &str| {
        let line =
            greeting.iter().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no `{needle}` in {greeting:?}"));
        let command = line.split('#').next().unwrap_or_default().trim().replace("evrhost ", &format!("{BIN} "));
        let out = std::process::Command::new("bash").args(["-c", &command]).output().expect("bash runs");
        assert!(out.status.success(), "{command}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    assert!(run("route.run echo").contains("hello"));
    assert_eq!(run("evrexec.run").trim(), "{}");
    run("/dev/udp/");
    run("/dev/udp/");
    let started = Instant::now();
    while run("kvcount.get").trim() != "2" {
        assert!(started.elapsed() < Duration::from_secs(10), "the datagrams were not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(greeting.iter().any(|l| l.contains("event.subscribe HEARTBEAT")), "{greeting:?}");

    let addr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut client = evrhost::frontend::client::RpcClient::connect(addr, None).await.expect("rpc");
    let r = client.call("plugin.list", json!([])).await.expect("rpc");
    let sources: Vec<&Value> = result(&r).as_array().expect("a list").iter().map(|p| &p["source"]).collect();
    assert!(sources.contains(&&json!("builtin:kvcount")), "{sources:?}");
    let _ = child.kill();
    let _ = child.wait();
}

/// Every config in `examples/` (one per system evrhost replaces) passes
/// `evrhost check`: each plugin compiles and instantiates, each route has
/// its export.
#[test]
fn every_example_config_checks() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("examples/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = evrhost(&["check", path.to_str().expect("utf-8")]);
            assert!(out.status.success(), "{}: {}", path.display(), text(&out.stderr));
            assert!(text(&out.stdout).contains(": ok: "), "{}", text(&out.stdout));
            checked.push(path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string());
        }
    }
    checked.sort();
    assert_eq!(checked, ["freeswitch", "kamailio", "opensips", "yate"]);
}

#[test]
fn call_shows_a_trapped_guests_backtrace() {
    let hostile = plugin("hostile");
    let out = evrhost(&["call", hostile.to_str().expect("utf-8"), "panic"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("cause:   panic"), "{stdout}");
    let frames: Vec<&str> = stdout.lines().skip_while(|l| !l.starts_with("backtrace")).skip(1).collect();
    assert!(
        frames.first().is_some_and(|f| f.trim().starts_with("0: handle at ") && f.ends_with("src/lib.rs:37:24")),
        "{stdout}"
    );
}
