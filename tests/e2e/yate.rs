//! The Yate front-end against a fake Yate engine (`tests/yate/engine.rs`,
//! written from protocols.md §1 apart from the host's codec): evrhost
//! spawned on pipes, and as a client of TCP and UNIX listeners.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::support::{free_port, metric, result, Daemon, BIN};
use crate::engine::{Delivery, Engine, Listener, Outcome};

const WAIT: Duration = Duration::from_secs(10);

/// The plugins and routes every test here uses; `{ENGINE}` is the
/// `connect` value, `{EXTRA}` more of `[yate]`.
const CONFIG: &str = r#"
[rpc]
listen = "127.0.0.1:{PORT}"

[[plugin]]
name = "yateroute"
path = "{yateroute}"
[[plugin]]
name = "yateauth"
path = "{yateauth}"
[[plugin]]
name = "watcher"
path = "{listener}"
[plugin.config]
id = "watcher"
[[plugin]]
name = "hostile"
path = "{hostile}"
deadline_ms = 200

[[route]]
name = "call.route"
plugin = "yateroute"
[[route]]
name = "user.auth"
plugin = "yateauth"
[[route]]
name = "watcher.subscribe"
plugin = "watcher"
[[route]]
name = "watcher.filter"
plugin = "watcher"
[[route]]
name = "loop"
plugin = "hostile"

[yate]
connect = "{ENGINE}"
watch = ["call.cdr"]
{EXTRA}
[yate.setlocal]
timeout = 3000
trackparam = "evrhost"

[[yate.install]]
message = "call.route"
priority = 90
[[yate.install]]
message = "user.auth"
[[yate.install]]
message = "test.loop"
route = "loop"
"#;

fn config(engine: &str, extra: &str) -> String {
    CONFIG.replace("{ENGINE}", engine).replace("{EXTRA}", extra)
}

async fn api(daemon: &Daemon, command: &str, args: &[&str]) -> Value {
    let mut params = vec![json!(command)];
    params.extend(args.iter().map(|a| json!(a)));
    let mut c = daemon.client().await;
    c.call("api.run", Value::Array(params)).await.expect("rpc")
}

async fn status(daemon: &Daemon) -> Value {
    let text = api(daemon, "yate.status", &[]).await;
    serde_json::from_str(result(&text).as_str().expect("text")).expect("yate.status is JSON")
}

/// The engine's next connection, once evrhost has installed what it has
/// routes for.
async fn accept(listener: &Listener) -> Engine {
    let engine = listener.accept_timeout(WAIT).await.expect("evrhost connects to the listener");
    for name in ["call.route", "user.auth", "test.loop"] {
        assert!(engine.wait_installed(name, WAIT).await, "{name} installed: {:?}", engine.sent_lines());
    }
    engine
}

fn answered_at_once(o: &Outcome) {
    assert_eq!(o.delivery, Delivery::Answered, "{o:?}");
    assert!(o.elapsed < Duration::from_millis(1500), "answered in {:?}, not left for the timeout", o.elapsed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_client_installs_answers_watches_and_dispatches() {
    let (addr, listener) = Engine::listen_tcp(None).expect("listen");
    let daemon = Daemon::start(&config(&format!("tcp:{addr}"), "")).await;
    let engine = accept(&listener).await;
    let sent = engine.sent_lines();
    assert_eq!(sent[0], "%%>connect:global", "the connect line comes first on a listener without a role");
    assert!(sent.contains(&"%%>setlocal:bufsize:8192".to_string()), "{sent:?}");
    assert!(sent.contains(&"%%>install:90:call.route".to_string()), "{sent:?}");
    assert!(engine.wait_for(WAIT, |e| e.setlocals().len() >= 3).await, "setlocal answers: {:?}", engine.setlocals());
    assert!(engine.watched().iter().any(|w| w == "call.cdr"), "{:?}", engine.watched());
    assert!(engine.errors_sent().is_empty(), "the engine understood every line: {:?}", engine.errors_sent());

    // A routed number: the target (with every awkward character) becomes
    // the return value; one parameter set, one deleted, the rest kept.
    let called = "1:2%3=4\u{fc}";
    let target = "sip/sip:b\tob@h:5060;x=%z=\u{1F4DE}";
    let r = api(&daemon, "yateroute.set", &[called, target]).await;
    assert!(result(&r).as_str().unwrap_or("").starts_with("+OK"), "{r}");
    let caller = "al:ice%\r\n=x";
    let o =
        engine.dispatch("call.route", "old", &[("caller", caller), ("called", called), ("osip_X-Debug", "1")]).await;
    answered_at_once(&o);
    assert!(o.processed, "{o:?}");
    assert_eq!(o.msg.retvalue_str(), target);
    assert_eq!(o.msg.get_str("osip_X-Routed-By").as_deref(), Some("evrhost"));
    assert_eq!(o.msg.get_str("osip_X-Debug"), None, "a bare key deletes");
    assert_eq!(o.msg.get_str("caller").as_deref(), Some(caller), "parameters not mentioned are kept");

    // Declined, failing and looping handlers: false at once, the return
    // value untouched.
    let o = engine.dispatch("call.route", "keep", &[("called", "999")]).await;
    answered_at_once(&o);
    assert!(!o.processed);
    assert_eq!(o.msg.retvalue_str(), "keep");
    let o = engine.dispatch("call.route", "keep", &[("caller", "x")]).await;
    answered_at_once(&o);
    assert_eq!((o.processed, o.msg.retvalue_str().as_str()), (false, "keep"), "a handler error: {o:?}");
    let o = engine.dispatch("test.loop", "keep", &[]).await;
    answered_at_once(&o);
    assert_eq!((o.processed, o.msg.retvalue_str().as_str()), (false, "keep"), "a deadline hit: {o:?}");

    // user.auth answers the password.
    api(&daemon, "yateauth.add", &["alice", "s3:cr%t"]).await;
    let o = engine.dispatch("user.auth", "", &[("username", "alice"), ("realm", "example.com")]).await;
    answered_at_once(&o);
    assert_eq!((o.processed, o.msg.retvalue_str().as_str()), (true, "s3:cr%t"));

    // Pipelined, many in flight, answers matched by id.
    api(&daemon, "yateroute.set", &["42", "sip/42"]).await;
    let outcomes = engine.pipeline_outcomes("call.route", 300, 32, |_| vec![("called".into(), "42".into())]).await;
    assert_eq!(outcomes.len(), 300);
    assert!(outcomes.iter().all(|o| o.answered() && o.processed && o.msg.retvalue_str() == "sip/42"));

    // Garbage and Error in: lines are never answered; the module goes on.
    let before = engine.sent_lines().len();
    assert!(engine.send_line(b"this is no command").await);
    assert!(engine.send_line(b"Error in: %%>nonsense").await);
    assert!(engine.send_line(b"%%>message:0xbad.1:1:call.route::called=%q").await);
    let o = engine.dispatch("call.route", "", &[("called", "42")]).await;
    answered_at_once(&o);
    let after: Vec<String> = engine.sent_lines()[before..].to_vec();
    assert!(after.iter().any(|l| l == "%%<message:0xbad.1:false:"), "a broken message is declined by id: {after:?}");
    assert_eq!(after.len(), 2, "nothing else answered: {after:?}");

    // Watched messages reach the bus (a plugin subscribed to them).
    let mut c = daemon.client().await;
    let r = c.call("route.run", json!(["watcher.subscribe", "CUSTOM yate::call.cdr"])).await.expect("rpc");
    assert_eq!(result(&r)["retval"], json!("subscribed"));
    engine.notify("call.cdr", "", &[("billid", "77"), ("duration", "12")], false).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let r = api(&daemon, "watcher.count", &["CUSTOM:yate::call.cdr"]).await;
        if result(&r) == &json!("1") {
            break;
        }
        assert!(Instant::now() < deadline, "the watcher never got call.cdr: {r}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let last = api(&daemon, "watcher.last", &["CUSTOM:yate::call.cdr"]).await;
    assert!(result(&last).as_str().unwrap_or("").contains("billid"), "{last}");
    assert!(!engine.sent_lines().iter().any(|l| l.starts_with("%%<message::")), "notifications are not answered");

    // A plugin dispatches to the engine and gets its answer.
    engine.on_message("test.ping", |m| {
        m.retvalue = b"pong".to_vec();
        m.set("seen", "yes");
        true
    });
    let r = api(&daemon, "yateroute.send", &["test.ping", "a=1:2"]).await;
    assert_eq!(result(&r), &json!("true pong a=1:2 seen=yes"), "{r}");

    let s = status(&daemon).await;
    assert_eq!(s["connected"], json!(true));
    assert_eq!(s["in_flight"], json!(0));
    assert!(s["answers"]["handled"].as_u64().unwrap_or(0) >= 303, "{s}");
    assert!(s["answers"]["failed"].as_u64().unwrap_or(0) >= 2, "{s}");
    assert_eq!(s["answers"]["garbage"], json!(2), "{s}");
    assert_eq!(s["lines"]["error_in"], json!(1), "{s}");
    assert_eq!(s["dispatch"]["answered"], json!(1), "{s}");
    let (_, metrics) = daemon.scrape();
    assert_eq!(metric(&metrics, "evrhost_yate_connected"), 1);

    // A stop says goodbye: %%>quit, and the engine's %%<quit ends it.
    let mut daemon = daemon;
    daemon.terminate();
    assert!(engine.wait_for(WAIT, |e| e.quit_received()).await, "%%>quit on stop: {:?}", engine.sent_lines());
    let deadline = Instant::now() + WAIT;
    while daemon.is_running() {
        assert!(Instant::now() < deadline, "evrhost stops after the quit exchange:\n{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_engine_is_reconnected_and_unloads_uninstall() {
    let (addr, listener) = Engine::listen_tcp(None).expect("listen");
    let daemon = Daemon::start(&config(&format!("tcp:{addr}"), "reconnect_min_ms = 50")).await;
    let first = accept(&listener).await;
    let mut c = daemon.client().await;
    let r = c.call("route.run", json!(["watcher.subscribe", "E_CORE_TCP_DISCONNECT"])).await.expect("rpc");
    assert_eq!(result(&r)["retval"], json!("subscribed"));
    // Only the engine's connection, not the RPC clients'.
    let filter = format!("add src_port {}", addr.port());
    let r = c.call("route.run", json!(["watcher.filter", filter])).await.expect("rpc");
    assert!(result(&r)["retval"].as_str().unwrap_or("").contains("src_port"), "{r}");

    first.kill().await;
    let second = accept(&listener).await;
    api(&daemon, "yateroute.set", &["7", "sip/7"]).await;
    let o = second.dispatch("call.route", "", &[("called", "7")]).await;
    answered_at_once(&o);
    assert!(o.processed);
    let count = api(&daemon, "watcher.count", &["E_CORE_TCP_DISCONNECT"]).await;
    assert_eq!(result(&count), &json!("1"), "the lost connection raised E_CORE_TCP_DISCONNECT");

    // Unloading a plugin uninstalls its messages; loading it and binding
    // the route installs them again.
    let path = evrhost::harness::plugin("yateauth").display().to_string();
    let r = c.call("plugin.unload", json!(["yateauth"])).await.expect("rpc");
    assert_eq!(result(&r)["routes_removed"], json!(["user.auth"]));
    assert!(second.wait_for(WAIT, |e| !e.installed().iter().any(|i| i.1 == "user.auth")).await, "uninstalled");
    let o = second.dispatch("user.auth", "", &[("username", "alice")]).await;
    assert_eq!(o.delivery, Delivery::NotInstalled);
    let r = c.call("plugin.load", json!(["yateauth", path])).await.expect("rpc");
    assert!(r.get("result").is_some(), "{r}");
    let r = c.call("route.add", json!(["user.auth", "yateauth"])).await.expect("rpc");
    assert!(r.get("result").is_some(), "{r}");
    assert!(second.wait_installed("user.auth", WAIT).await, "installed again: {:?}", second.sent_lines());
    let r = c.call("route.add", json!(["user.auth", "yateauth"])).await.expect("rpc");
    assert!(r["error"]["message"].as_str().unwrap_or("").contains("already"), "{r}");

    // A reload under load loses no message.
    let engine = second.clone();
    let traffic = tokio::spawn(async move {
        engine.pipeline_outcomes("call.route", 2000, 16, |_| vec![("called".into(), "7".into())]).await
    });
    let r = c.call("plugin.reload", json!(["yateroute"])).await.expect("rpc");
    assert!(r.get("result").is_some(), "{r}");
    let outcomes = traffic.await.expect("traffic");
    assert!(outcomes.iter().all(|o| o.answered() && o.processed), "every message answered through the reload");
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounds_hold_on_a_unix_listener_with_a_role() {
    let dir = tempfile::tempdir().expect("dir");
    let socket = dir.path().join("yate.sock");
    let listener = Engine::listen_unix(&socket, Some("global")).expect("listen");
    let extra = "role = \"\"\nmax_in_flight = 2\nmax_line_bytes = 4096\nbufsize = 2048";
    let daemon = Daemon::start(&config(&format!("unix:{}", socket.display()), extra)).await;
    let engine = accept(&listener).await;
    assert!(
        !engine.sent_lines().iter().any(|l| l.starts_with("%%>connect")),
        "no connect line on a listener with a role"
    );
    assert!(engine.wait_for(WAIT, |e| e.bufsize() == 2048).await, "bufsize set: {}", engine.bufsize());

    // More than max_in_flight at once: the rest are answered false at once.
    let slow: Vec<_> = (0..6)
        .map(|_| {
            let e = engine.clone();
            tokio::spawn(async move { e.dispatch("test.loop", "r", &[]).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in slow {
        outcomes.push(t.await.expect("dispatch"));
    }
    assert!(outcomes.iter().all(|o| o.answered() && !o.processed), "{outcomes:?}");
    let s = status(&daemon).await;
    assert!(s["answers"]["busy"].as_u64().unwrap_or(0) >= 1, "over the bound counted: {s}");

    // A reply the engine's buffer would not hold is refused, not sent.
    let long = "x".repeat(3000);
    api(&daemon, "yateroute.set", &["long", &long]).await;
    let o = engine.dispatch("call.route", "kept", &[("called", "long")]).await;
    answered_at_once(&o);
    assert_eq!((o.processed, o.msg.retvalue_str().as_str()), (false, "kept"));
    assert!(!engine.overflowed(), "evrhost never overflows the engine's buffer");
    let s = status(&daemon).await;
    assert_eq!(s["answers"]["too_long"], json!(1), "{s}");

    // An engine line past max_line_bytes is skipped, and the next is read.
    let mut huge = b"%%>message:0xhuge.1:1:call.route::called=".to_vec();
    huge.extend(std::iter::repeat_n(b'9', 10_000));
    assert!(engine.send_line(&huge).await);
    api(&daemon, "yateroute.set", &["8", "sip/8"]).await;
    let o = engine.dispatch("call.route", "", &[("called", "8")]).await;
    answered_at_once(&o);
    assert!(o.processed);
    assert_eq!(status(&daemon).await["lines"]["overlong"], json!(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_by_yate_it_speaks_on_pipes_and_exits_on_eof() {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let text = evrhost::harness::with_plugin_paths(&config("stdio", "").replace("{PORT}", &port.to_string()));
    let path = dir.path().join("yate.toml");
    std::fs::write(&path, text).expect("config");
    // One argument, as Yate's execl gives it.
    let engine = Engine::command(Path::new(BIN))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env("XDG_STATE_HOME", &dir.path().display().to_string())
        .spawn(&path.display().to_string())
        .expect("spawn");
    for name in ["call.route", "user.auth", "test.loop"] {
        assert!(engine.wait_installed(name, WAIT).await, "{name}: {:?}\n{}", engine.sent_lines(), engine.stderr());
    }
    let o = engine.dispatch("call.route", "x", &[("called", "none")]).await;
    answered_at_once(&o);
    assert!(!o.processed);
    let sent = engine.sent_lines();
    assert!(sent.iter().all(|l| l.starts_with("%%")), "nothing but protocol on stdout: {sent:?}");
    assert!(!sent.iter().any(|l| l.starts_with("%%>connect")), "no connect line on pipes");
    assert!(engine.stderr().contains("yate: installed"), "the log goes to stderr:\n{}", engine.stderr());

    engine.close_input().await;
    let status = engine.wait_exit(Duration::from_secs(8)).await.expect("evrhost exits when Yate closes its input");
    assert!(status.success(), "{status:?}\n{}", engine.stderr());
}
