//! Plugins in JavaScript, Go and Python, built from `plugins/{js,go,python}`
//! by `evrhost build` with the pinned toolchains (`guest-sdk/toolchains/
//! install`), served by the real daemon: routes, commands, events, tasks,
//! kv, denied capabilities, limits, and a reload of a JS plugin under load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::support::{error, result, text, Daemon, BIN};

/// Where `guest-sdk/toolchains/install` put the toolchains.
pub fn tools() -> PathBuf {
    let dir = std::env::var_os("EVRHOST_GUEST_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("../guest-tools"));
    assert!(
        dir.join(".pins").is_file(),
        "no guest toolchains in {}: run guest-sdk/toolchains/install (the README's test command does)",
        dir.display()
    );
    dir
}

/// PATH with the toolchains first.
pub fn tool_path() -> std::ffi::OsString {
    let tools = tools();
    let mut dirs = vec![tools.join("node_modules/.bin"), tools.join("venv/bin")];
    dirs.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    std::env::join_paths(dirs).expect("PATH")
}

/// Runs `evrhost build` on `project` into `out`; its output, and whether it worked.
pub fn build(project: &Path, out: &Path) -> (bool, String) {
    let output = Command::new(BIN)
        .arg("build")
        .arg(project)
        .arg("-o")
        .arg(out)
        .env("PATH", tool_path())
        .output()
        .expect("run evrhost build");
    (output.status.success(), format!("{}{}", text(&output.stdout), text(&output.stderr)))
}

/// The component built from `plugins/LANG/NAME`, once per test process.
pub fn guest(lang: &str, name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, Arc<OnceLock<PathBuf>>>>> = OnceLock::new();
    let key = format!("{lang}-{name}");
    let cell = BUILT.get_or_init(Default::default).lock().expect("lock").entry(key.clone()).or_default().clone();
    cell.get_or_init(|| {
        let project = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins").join(lang).join(name);
        let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-plugins");
        std::fs::create_dir_all(&out_dir).expect("out dir");
        let out = out_dir.join(format!("{key}.wasm"));
        let (ok, output) = build(&project, &out);
        assert!(ok, "evrhost build {}: {output}", project.display());
        out
    })
    .clone()
}

async fn call(client: &mut evrhost::frontend::client::RpcClient, method: &str, params: Value) -> Value {
    client.call(method, params).await.unwrap_or_else(|e| panic!("{method}: {e}"))
}

/// Waits until `api.run COMMAND ARG` answers `want` (a kv count that an
/// event or a task makes).
async fn until_count(client: &mut evrhost::frontend::client::RpcClient, command: &str, arg: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = call(client, "api.run", json!([command, arg])).await;
        let n: u64 = result(&r).as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
        if n >= want {
            return;
        }
        assert!(Instant::now() < deadline, "{command} {arg} stayed at {n}, not {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every export of a language's kvcount and echo through the daemon.
async fn serves_everything(lang: &str) {
    let kvcount = guest(lang, "kvcount");
    let echo = guest(lang, "echo");
    let config = format!(
        r#"
        [rpc]
        listen = "127.0.0.1:{{PORT}}"

        [[plugin]]
        name = "kvcount"
        path = "{kvcount}"
        [plugin.config]
        tick_ms = "20"

        [[plugin]]
        name = "echo"
        path = "{echo}"

        [[route]]
        name = "count"
        plugin = "kvcount"

        [[route]]
        name = "echo"
        plugin = "echo"

        [[exec]]
        name = "evrexec:ticks"
        plugin = "kvcount"
        "#,
        kvcount = kvcount.display(),
        echo = echo.display()
    );
    let daemon = Daemon::start(&config).await;
    let mut client = daemon.client().await;

    // A route: the reply's data, parameters and retval.
    let r = call(&mut client, "route.run", json!(["echo", "héllo wörld", {"a": "1", "b": "two"}])).await;
    let reply = result(&r);
    assert_eq!(reply["data"], json!("héllo wörld"), "{lang}: {r}");
    assert_eq!(reply["retval"], json!("ok"), "{lang}: {r}");
    assert_eq!(reply["params"], json!({"a": "1", "b": "two"}), "{lang}: {r}");
    let r = call(&mut client, "api.run", json!(["echo.upper", "abc"])).await;
    assert_eq!(result(&r), &json!("ABC"), "{lang}");

    // kv through a route and a command.
    let r = call(&mut client, "route.run", json!(["count", "a=1;b=2;a;;=x"])).await;
    assert_eq!(result(&r)["retval"], json!("3"), "{lang}: {r}");
    let r = call(&mut client, "api.run", json!(["kvcount.get", "a"])).await;
    assert_eq!(result(&r), &json!("2"), "{lang}");
    let r = call(&mut client, "api.run", json!(["kvcount.get", "never"])).await;
    assert_eq!(result(&r), &json!("0"), "{lang}");

    // A host call's refusal becomes the SDK's error, and the handler's
    // failure reaches the caller with its text.
    let r = call(&mut client, "api.run", json!(["kvcount.watch", ""])).await;
    assert!(error(&r).1.contains("invalid: "), "{lang}: {r}");

    // Events: subscribe from a command, count in the subscriber.
    let r = call(&mut client, "api.run", json!(["kvcount.watch", "BACKGROUND_JOB"])).await;
    assert_eq!(result(&r), &json!("watching BACKGROUND_JOB"), "{lang}");
    for _ in 0..3 {
        result(&call(&mut client, "api.bgrun", json!(["kvcount.get", "a"])).await);
    }
    until_count(&mut client, "kvcount.events", "BACKGROUND_JOB", 3).await;

    // The exec task ticks, sleeping between ticks.
    until_count(&mut client, "kvcount.get", "ticks", 5).await;

    let stats = call(&mut client, "plugin.stats", json!(["kvcount"])).await;
    assert_eq!(result(&stats)["kvcount"]["errors"], json!({"guest-error": 1}), "{lang}: {stats}");
    assert!(!daemon.log().contains("task failed"), "{lang}: {}", daemon.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_js_plugin_serves_routes_commands_events_tasks_and_kv() {
    serves_everything("js").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_plugin_serves_routes_commands_events_tasks_and_kv() {
    serves_everything("go").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_plugin_serves_routes_commands_events_tasks_and_kv() {
    serves_everything("python").await;
}
