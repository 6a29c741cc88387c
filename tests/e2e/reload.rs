//! Hot swap: no call is lost, and a bad version never replaces a good one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::support::{error, plugin, result, Daemon};

const CONFIG: &str = r#"
[rpc]
listen = "127.0.0.1:{PORT}"
plugin_dirs = ["{PLUGINS}", "{DIR}"]

[[plugin]]
name = "echo"
path = "{echo}"
max_instances = 2

[[route]]
name = "echo"
plugin = "echo"
"#;

fn path(name: &str) -> String {
    plugin(name).display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_a_loop_of_calls_loses_no_call() {
    let daemon = Daemon::start(CONFIG).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for caller in 0..2 {
        let mut client = daemon.client().await;
        let stop = stop.clone();
        callers.push(tokio::spawn(async move {
            let (mut calls, mut failures, mut retvals) = (0u64, Vec::new(), std::collections::BTreeSet::new());
            while !stop.load(Ordering::Relaxed) {
                let r = client.call("route.run", json!(["echo", format!("{caller}-{calls}")])).await.expect("rpc");
                match r.get("result") {
                    // echo answers "ok"; counter, swapped in for a while, a count.
                    Some(res) => {
                        let retval = res["retval"].as_str().unwrap_or_default().to_string();
                        retvals.insert(if retval == "ok" { "echo" } else { "counter" });
                    }
                    None => failures.push(r.to_string()),
                }
                calls += 1;
            }
            (calls, failures, retvals)
        }));
    }
    let mut admin = daemon.client().await;
    let swaps = [path("counter"), path("echo"), path("counter"), path("echo"), path("echo")];
    for source in &swaps {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let r = admin.call("plugin.reload", json!(["echo", source])).await.expect("rpc");
        result(&r);
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    stop.store(true, Ordering::Relaxed);

    let mut total = 0;
    for caller in callers {
        let (calls, failures, retvals) = caller.await.expect("caller task");
        assert!(failures.is_empty(), "{} of {calls} calls failed, e.g. {}", failures.len(), failures[0]);
        assert_eq!(retvals.len(), 2, "both versions answered: {retvals:?}");
        total += calls;
    }
    assert!(total > 200, "only {total} calls in ~900 ms");
    let list = admin.call("plugin.list", json!([])).await.expect("rpc");
    assert_eq!(result(&list)[0]["reloads"], json!(swaps.len()), "{list}");
    assert_eq!(result(&list)[0]["stats"]["errors"], json!({}), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_version_is_refused_and_the_old_one_serves_on() {
    let daemon = Daemon::start(CONFIG).await;
    let dir = daemon.dir.path();
    let garbage = dir.join("garbage.wasm");
    std::fs::write(&garbage, b"this is not wasm at all").expect("write");
    let core = dir.join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").expect("write");
    let truncated = dir.join("truncated.wasm");
    let echo = std::fs::read(plugin("echo")).expect("read echo.wasm");
    std::fs::write(&truncated, &echo[..echo.len() / 2]).expect("write");

    let mut client = daemon.client().await;
    let before = client.call("plugin.list", json!([])).await.expect("rpc");
    let hash = result(&before)[0]["hash"].clone();

    let cases = [
        (garbage.display().to_string(), "is not WebAssembly".to_string()),
        (core.display().to_string(), "is a core wasm module, not a component".to_string()),
        (truncated.display().to_string(), "cannot compile".to_string()),
        (
            path("timer"),
            "plugin `echo` does not export `evrhost:plugin/route@0.2.0`, which route `echo` needs".to_string(),
        ),
        (dir.join("missing.wasm").display().to_string(), "cannot read".to_string()),
    ];
    for (source, expected) in cases {
        let r = client.call("plugin.reload", json!(["echo", source])).await.expect("rpc");
        let (code, message) = error(&r);
        assert_eq!(code, 500, "{source}: {message}");
        assert!(message.contains(&expected), "{source}: {message}");
        let r = client.call("route.run", json!(["echo", "still here"])).await.expect("rpc");
        assert_eq!(result(&r)["data"], json!("still here"), "after {source}");
    }
    let after = client.call("plugin.list", json!([])).await.expect("rpc");
    assert_eq!(result(&after)[0]["hash"], hash, "the old version is still the one loaded");
    assert_eq!(result(&after)[0]["reloads"], json!(0));

    // Over RPC a plugin comes only from the plugin directories.
    for outside in ["/etc/passwd", "/dev/zero", "/tmp/../etc/hostname"] {
        let r = client.call("plugin.load", json!(["intruder", outside])).await.expect("rpc");
        let (code, message) = error(&r);
        assert_eq!(code, -32602, "{outside}: {message}");
        assert!(message.contains("outside the plugin directories"), "{outside}: {message}");
        let r = client.call("plugin.reload", json!(["echo", outside])).await.expect("rpc");
        assert!(error(&r).1.contains("outside the plugin directories"), "{outside}: {r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_and_unload_change_what_is_served() {
    let daemon = Daemon::start(CONFIG).await;
    let mut client = daemon.client().await;
    let r = client.call("plugin.load", json!(["counter", path("counter")])).await.expect("rpc");
    assert_eq!(result(&r)["exports"], json!(["route", "api"]));
    let r = client.call("api.run", json!(["counter.get", "nobody"])).await.expect("rpc");
    assert_eq!(result(&r), &json!("0"));
    let r = client.call("plugin.load", json!(["counter", path("counter")])).await.expect("rpc");
    assert!(error(&r).1.contains("already loaded"));

    let r = client.call("plugin.unload", json!(["echo"])).await.expect("rpc");
    assert_eq!(result(&r)["routes_removed"], json!(["echo"]));
    let r = client.call("evrexec.run", json!(["echo"])).await.expect("rpc");
    assert_eq!(error(&r), (500, "Event route not found".to_string()));
    let names: Vec<Value> = result(&client.call("plugin.list", json!([])).await.expect("rpc"))
        .as_array()
        .expect("array")
        .iter()
        .map(|p| p["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("counter")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_rewritten_in_place_is_read_again_and_an_unchanged_one_is_not() {
    let daemon = Daemon::start(CONFIG).await;
    let mut client = daemon.client().await;
    let file = daemon.dir.path().join("swap.wasm");
    std::fs::copy(plugin("echo"), &file).expect("copy");
    let source = file.display().to_string();
    result(&client.call("plugin.reload", json!(["echo", source])).await.expect("rpc"));
    let hash = |list: &Value| list["result"][0]["hash"].clone();
    let first = hash(&client.call("plugin.list", json!([])).await.expect("rpc"));
    // Unchanged: the same version again, from the remembered hash.
    result(&client.call("plugin.reload", json!(["echo"])).await.expect("rpc"));
    assert_eq!(hash(&client.call("plugin.list", json!([])).await.expect("rpc")), first);
    // Rewritten in place (same inode): read, hashed and compiled anew.
    std::fs::write(&file, std::fs::read(plugin("counter")).expect("read")).expect("rewrite");
    result(&client.call("plugin.reload", json!(["echo"])).await.expect("rpc"));
    assert_ne!(hash(&client.call("plugin.list", json!([])).await.expect("rpc")), first);
    let r = client.call("route.run", json!(["echo", "k"])).await.expect("rpc");
    assert_eq!(result(&r)["retval"], json!("1"), "the counter answers now: {r}");
}
