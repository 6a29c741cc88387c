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
    let short = if lang == "python" { "py" } else { lang };
    let r = call(&mut client, "api.run", json!([format!("{short}-echo.upper"), "abc"])).await;
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

/// An interpreter guest's loop, memory bomb, throw and runaway recursion
/// are each stopped within its limits and named, kv denied is a HostError
/// the plugin can read, and the plugin next to it serves on throughout.
async fn hostile_is_contained(lang: &str, cases: &[(&str, &str)]) {
    let hostile = guest(lang, "hostile");
    let echo = guest(lang, "echo");
    let mut config = format!(
        r#"
        [rpc]
        listen = "127.0.0.1:{{PORT}}"

        [[plugin]]
        name = "hostile"
        path = "{hostile}"
        deadline_ms = 200
        memory_mb = 48
        capabilities = ["log", "config"]

        [[plugin]]
        name = "echo"
        path = "{echo}"

        [[route]]
        name = "echo"
        plugin = "echo"
        "#,
        hostile = hostile.display(),
        echo = echo.display()
    );
    for route in cases.iter().map(|(r, _)| r).chain(&["ok", "kv"]) {
        config.push_str(&format!("\n[[route]]\nname = \"{route}\"\nplugin = \"hostile\"\n"));
    }
    let daemon = Daemon::start(&config).await;
    let mut client = daemon.client().await;
    for (route, expected) in cases {
        let r = call(&mut client, "route.run", json!([route])).await;
        let (_, message) = error(&r);
        assert!(message.contains(&format!("plugin `hostile`, route `{route}`: ")), "{lang} {route}: {message}");
        assert!(expected.split('|').any(|e| message.contains(e)), "{lang} {route}: {message}");
        let r = call(&mut client, "route.run", json!(["ok"])).await;
        assert_eq!(result(&r)["retval"], json!("ok"), "{lang}: a fresh instance after {route}");
        let r = call(&mut client, "route.run", json!(["echo", route])).await;
        assert_eq!(result(&r)["data"], json!(route), "{lang}: the neighbour after {route}");
    }
    let r = call(&mut client, "route.run", json!(["kv"])).await;
    assert_eq!(result(&r)["retval"], json!("denied"), "{lang}: {r}");
    let stats = call(&mut client, "plugin.stats", json!(["hostile"])).await;
    let errors = &result(&stats)["hostile"]["errors"];
    assert_eq!(errors["memory"], json!(1), "{lang}: {stats}");
    assert_eq!(errors["guest-error"], json!(1), "{lang}: {stats}");
    assert_eq!(result(&stats)["hostile"]["calls"], json!(2 * cases.len() + 1), "{lang}: {stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_js_plugin_is_stopped_within_its_limits() {
    hostile_is_contained(
        "js",
        &[
            ("loop", "out of fuel|deadline of 200 ms exceeded"),
            ("bomb", "memory cap of 49152 KiB exceeded"),
            ("throw", "handler error: js-hostile throws on purpose"),
            ("recurse", "stack overflow"),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_python_plugin_is_stopped_within_its_limits() {
    hostile_is_contained(
        "python",
        &[
            ("loop", "out of fuel|deadline of 200 ms exceeded"),
            ("bomb", "memory cap of 49152 KiB exceeded"),
            ("raise", "handler error: py-hostile raises on purpose"),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_js_plugin_reloaded_under_a_loop_of_calls_loses_no_call() {
    let (echo, kvcount) = (guest("js", "echo"), guest("js", "kvcount"));
    let dir = echo.parent().expect("guest-plugins").display().to_string();
    let config = format!(
        "[rpc]\nlisten = \"127.0.0.1:{{PORT}}\"\nplugin_dirs = [\"{dir}\"]\n\n[[plugin]]\nname = \"echo\"\npath = \"{}\"\nmax_instances = 2\n\n[[route]]\nname = \"echo\"\nplugin = \"echo\"\n",
        echo.display()
    );
    let daemon = Daemon::start(&config).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut callers = Vec::new();
    for caller in 0..2 {
        let mut client = daemon.client().await;
        let stop = stop.clone();
        callers.push(tokio::spawn(async move {
            let (mut calls, mut failures, mut seen) = (0u64, Vec::new(), std::collections::BTreeSet::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = call(&mut client, "route.run", json!(["echo", format!("{caller}-{calls}")])).await;
                match r.get("result") {
                    // echo answers "ok", kvcount the number of keys, 1.
                    Some(res) => {
                        seen.insert(res["retval"].as_str().unwrap_or_default().to_string());
                    }
                    None => failures.push(r.to_string()),
                }
                calls += 1;
            }
            (calls, failures, seen)
        }));
    }
    let mut admin = daemon.client().await;
    let swaps = [&kvcount, &echo, &kvcount, &echo];
    for source in swaps {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = call(&mut admin, "plugin.reload", json!(["echo", source.display().to_string()])).await;
        result(&r);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for caller in callers {
        let (calls, failures, seen) = caller.await.expect("caller");
        assert!(failures.is_empty(), "{} of {calls} calls failed, e.g. {}", failures.len(), failures[0]);
        assert_eq!(seen, ["1".to_string(), "ok".to_string()].into(), "both versions answered");
        total += calls;
    }
    assert!(total > 100, "only {total} calls");
    let list = call(&mut admin, "plugin.list", json!([])).await;
    assert_eq!(result(&list)[0]["reloads"], json!(swaps.len()), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_js_and_python_plugins_load_side_by_side_and_one_too_small_is_refused_naming_the_limit() {
    let (js, py) = (guest("js", "hostile"), guest("python", "hostile"));
    let mut config = "[rpc]\nlisten = \"127.0.0.1:{PORT}\"\n".to_string();
    let names: Vec<String> = (0..4).map(|i| format!("js{i}")).chain((0..3).map(|i| format!("py{i}"))).collect();
    for name in &names {
        let path = if name.starts_with("js") { &js } else { &py };
        config.push_str(&format!(
            "\n[[plugin]]\nname = \"{name}\"\npath = \"{}\"\nmin_instances = 2\n\n[[route]]\nname = \"{name}:ok\"\nplugin = \"{name}\"\n",
            path.display()
        ));
    }
    let daemon = Daemon::start(&config).await;
    let mut client = daemon.client().await;
    for name in &names {
        let r = call(&mut client, "route.run", json!([format!("{name}:ok")])).await;
        assert_eq!(result(&r)["retval"], json!("ok"), "{name}: {r}");
    }
    drop(daemon);

    let dir = tempfile::tempdir().expect("dir");
    let small = dir.path().join("small.toml");
    std::fs::write(&small, format!("[[plugin]]\nname = \"py\"\npath = \"{}\"\nmemory_mb = 8\n", py.display()))
        .expect("write");
    let out = super::support::evrhost(&["check", &small.display().to_string()]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("plugin `py` needs 12992 KiB of memory to start, more than its cap of 8192 KiB: raise its `memory_mb` to at least 13"), "{stderr}");
}
