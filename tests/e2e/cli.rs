//! The plugin author's tools: `evrhost call`, `evrhost inspect`, and the
//! daemon on its embedded default.

use std::time::{Duration, Instant};

use serde_json::json;

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

/// The README's first command: the daemon on its embedded default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_without_a_config_serves_the_embedded_demo() {
    let port = super::support::free_port();
    // `--listen` keeps clear of a daemon someone runs by hand on 7080.
    let state = tempfile::tempdir().expect("temp dir");
    let mut child = std::process::Command::new(BIN)
        .args(["run", "--listen", &format!("127.0.0.1:{port}")])
        .env("XDG_STATE_HOME", state.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let addr = format!("127.0.0.1:{port}").parse().expect("addr");
    let started = Instant::now();
    let mut client = loop {
        if let Ok(client) = evrhost::frontend::client::RpcClient::connect(addr, None).await {
            break client;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no listener");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let r = client.call("evrexec.run", json!(["evrexec:test", "mydata"])).await.expect("rpc");
    assert_eq!(result(&r), &json!({}));
    let r = client.call("plugin.list", json!([])).await.expect("rpc");
    assert_eq!(result(&r)[0]["source"], json!("builtin:counter"));
    let _ = child.kill();
    let _ = child.wait();
}
