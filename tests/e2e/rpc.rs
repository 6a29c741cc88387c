//! JSON-RPC 2.0 over HTTP: Kamailio's evrexec.run replies, malformed input,
//! batches, and the `evrhost rpc` client.

use std::io::{Read, Write};
use std::time::Duration;

use serde_json::json;

use super::support::{error, evrhost, result, text, Daemon, BIN};

const CONFIG: &str = r#"
[rpc]
listen = "127.0.0.1:{PORT}"

[[plugin]]
name = "echo"
path = "{echo}"

[[plugin]]
name = "counter"
path = "{counter}"

[[route]]
name = "evrexec:test"
plugin = "echo"

[[route]]
name = "count"
plugin = "counter"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evrexec_run_answers_as_kamailio_does() {
    let daemon = Daemon::start(CONFIG).await;
    let mut client = daemon.client().await;
    let r = client.call("evrexec.run", json!(["evrexec:test", "mydata"])).await.expect("rpc");
    assert_eq!(result(&r), &json!({}));
    let r = client.call("evrexec.run", json!([])).await.expect("rpc");
    assert_eq!(error(&r), (500, "Invalid parameters".to_string()));
    let r = client.call("evrexec.run", json!(["evrexec:nothere"])).await.expect("rpc");
    assert_eq!(error(&r), (500, "Event route not found".to_string()));
    // Named parameters count by their order, as in jsonrpcs.
    let r = client.call("route.run", json!({"name": "evrexec:test", "data": "by name"})).await.expect("rpc");
    assert_eq!(result(&r)["data"], json!("by name"));
    assert_eq!(result(&r)["plugin"], json!("echo"));
    assert!(result(&r)["fuel"].as_u64().unwrap_or(0) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_state_is_reachable_through_its_commands() {
    let daemon = Daemon::start(CONFIG).await;
    let mut client = daemon.client().await;
    for _ in 0..3 {
        result(&client.call("evrexec.run", json!(["count", "alice"])).await.expect("rpc"));
    }
    result(&client.call("evrexec.run", json!(["count", "bob"])).await.expect("rpc"));
    let r = client.call("api.run", json!(["counter.get", "alice"])).await.expect("rpc");
    assert_eq!(result(&r), &json!("3"));
    let r = client.call("api.run", json!(["counter.reset", "alice"])).await.expect("rpc");
    assert_eq!(result(&r), &json!("3"));
    let r = client.call("api.run", json!(["counter.get", "alice"])).await.expect("rpc");
    assert_eq!(result(&r), &json!("0"));
    let r = client.call("api.run", json!(["counter.get", "bob"])).await.expect("rpc");
    assert_eq!(result(&r), &json!("1"));
    let r = client.call("api.run", json!(["no.such.command"])).await.expect("rpc");
    assert_eq!(error(&r), (404, "no command `no.such.command`".to_string()));
    let r = client.call("api.run", json!(["status"])).await.expect("rpc");
    assert!(result(&r).as_str().unwrap_or("").starts_with("UP "), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_json_rpc_errors() {
    let mut daemon = Daemon::start(CONFIG).await;
    let mut client = daemon.client().await;
    let cases: [(&[u8], i64); 6] = [
        (b"{not json", -32700),
        (b"", -32700),
        (b"[]", -32600),
        (b"42", -32600),
        (br#"{"jsonrpc":"1.0","method":"core.version","id":1}"#, -32600),
        (br#"{"jsonrpc":"2.0","method":"core.version","params":"x","id":1}"#, -32602),
    ];
    for (body, code) in cases {
        let (status, response) = client.post(body.to_vec()).await.expect("http");
        assert_eq!(status, 200);
        let response: serde_json::Value = serde_json::from_slice(&response).expect("json");
        assert_eq!(error(&response).0, code, "{}: {response}", text(body));
    }
    let r = client.call("no.such.method", json!([])).await.expect("rpc");
    assert_eq!(error(&r).0, -32601);

    // A batch: two answers, none for the notification.
    let batch = br#"[{"jsonrpc":"2.0","method":"core.version","id":1},
        {"jsonrpc":"2.0","method":"evrexec.run","params":["evrexec:test","n"]},
        {"jsonrpc":"2.0","method":"evrexec.run","params":["nope"],"id":"b"}]"#;
    let (_, response) = client.post(batch.to_vec()).await.expect("http");
    let response: serde_json::Value = serde_json::from_slice(&response).expect("json");
    assert_eq!(response.as_array().map(Vec::len), Some(2), "{response}");
    assert_eq!(response[1]["id"], json!("b"));

    let (status, _) = client.post(vec![b' '; 2 << 20]).await.expect("http");
    assert_eq!(status, 413);

    // Bytes that are not HTTP at all end that connection, nothing else.
    let mut raw = std::net::TcpStream::connect(daemon.addr).expect("connect");
    raw.write_all(b"\x00\xff\x13garbage\r\n\r\n").expect("write");
    let mut sink = Vec::new();
    let _ = raw.read_to_end(&mut sink);
    let mut client = daemon.client().await;
    result(&client.call("core.version", json!([])).await.expect("rpc"));
    assert!(daemon.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rpc_command_is_a_kamcmd() {
    let daemon = Daemon::start(CONFIG).await;
    let addr = daemon.addr.to_string();
    let out = evrhost(&["rpc", "-a", &addr, "evrexec.run", "evrexec:test", "mydata"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "{}");
    let out = evrhost(&["rpc", "-a", &addr, "evrexec.run", "evrexec:nothere"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("500 - Event route not found"), "{}", text(&out.stderr));
    let out = evrhost(&["rpc", "-a", &addr, "--json", "core.uptime"]);
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(doc["result"]["uptime"].is_u64(), "{doc}");
    let out = evrhost(&["rpc", "-a", "127.0.0.1:1", "core.version"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot connect to 127.0.0.1:1"), "{}", text(&out.stderr));

    // Lists: JSON into a pipe, a table on a terminal (or with --table).
    let out = evrhost(&["rpc", "-a", &addr, "route.list"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON into a pipe");
    assert!(doc.as_array().is_some_and(|routes| !routes.is_empty()), "{doc}");
    let out = evrhost(&["rpc", "-a", &addr, "--table", "plugin.list"]);
    let table = text(&out.stdout);
    let mut lines = table.lines();
    assert!(lines.next().is_some_and(|h| h.starts_with("PLUGIN ") && h.contains(" TENANT ")), "{table}");
    assert!(table.lines().any(|l| l.starts_with("echo ") && l.contains("route")), "{table}");
    let on_a_tty = format!("{BIN} rpc -a {addr} route.list");
    let out = std::process::Command::new("script").args(["-qec", &on_a_tty, "/dev/null"]).output().expect("script");
    assert!(text(&out.stdout).starts_with("ROUTE "), "{}", text(&out.stdout));

    // --help METHOD asks the daemon; a method it lacks is named.
    let out = evrhost(&["rpc", "-a", &addr, "--help", "evrexec.run"]);
    assert_eq!(text(&out.stdout).trim(), "evrexec.run NAME [DATA] — run an event route; {} on success (Kamailio)");
    let out = evrhost(&["rpc", "-a", &addr, "--help", "no.such"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no.such: Method Not Found"), "{}", text(&out.stderr));
    let out = evrhost(&["rpc", "--help"]);
    assert!(text(&out.stdout).contains("Usage: evrhost rpc [OPTIONS] [METHOD] [PARAMS]..."), "{}", text(&out.stdout));

    // Tracing switched over RPC, as Kamailio operators switch debug levels.
    let out = evrhost(&["rpc", "-a", &addr, "plugin.trace", "echo", "on"]);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).ok(),
        Some(json!({"name": "echo", "trace": true}))
    );
    let out = evrhost(&["rpc", "-a", &addr, "plugin.trace", "echo", "loud"]);
    assert!(text(&out.stderr).contains("-32602 - Invalid params: on or off"), "{}", text(&out.stderr));
    let out = evrhost(&["rpc", "-a", &addr, "plugin.trace", "ghost", "on"]);
    assert!(text(&out.stderr).starts_with("error: 404"), "{}", text(&out.stderr));
    let r = daemon.client().await.call("route.run", json!(["evrexec:test", "traced"])).await.expect("rpc");
    result(&r);
    let out = evrhost(&["rpc", "-a", &addr, "--json", "plugin.list"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let echo = doc["result"].as_array().and_then(|l| l.iter().find(|p| p["name"] == "echo")).cloned();
    assert_eq!(echo.map(|p| p["trace"].clone()), Some(json!(true)));
    daemon.wait_for_log(&["call ok", "plugin=echo", "route=evrexec:test"], Duration::from_secs(5)).await;

    // Completion scripts offer the methods.
    for shell in ["bash", "zsh"] {
        let out = evrhost(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let script = text(&out.stdout);
        assert!(script.contains("subscribers_list") && script.contains("plugin.reload"), "{shell}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_required_when_configured() {
    let daemon = Daemon::start(&CONFIG.replace("[rpc]\n", "[rpc]\ntoken = \"s3cret\"\n")).await;
    let mut anonymous = daemon.client().await;
    let (status, _) =
        anonymous.post(br#"{"jsonrpc":"2.0","method":"core.version","id":1}"#.to_vec()).await.expect("http");
    assert_eq!(status, 401);
    let mut client =
        evrhost::frontend::client::RpcClient::connect(daemon.addr, Some("s3cret".into())).await.expect("connect");
    result(&client.call("core.version", json!([])).await.expect("rpc"));
}

/// The RPC front-ends share one thread: a long plugin call over one
/// connection must not hold up the others (the call yields at every epoch
/// tick), nor a UDP route on the main runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_call_does_not_hold_up_other_connections() {
    const SLOW: &str = r#"
[rpc]
listen = "127.0.0.1:{PORT}"

[[plugin]]
name = "hostile"
path = "{hostile}"
deadline_ms = 5000
fuel = 1000000000000

[[plugin]]
name = "echo"
path = "{echo}"

[[route]]
name = "spin"
plugin = "hostile"

[[route]]
name = "evrexec:test"
plugin = "echo"
"#;
    let daemon = Daemon::start(SLOW).await;
    let mut slow = daemon.client().await;
    let spin = tokio::spawn(async move { slow.call("evrexec.run", json!(["spin", "1500"])).await });
    // Give the slow call time to be running before the others start.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut other = daemon.client().await;
    for i in 0..20 {
        let answer = other.call("evrexec.run", json!(["evrexec:test", format!("call {i}")])).await.expect("rpc");
        assert_eq!(result(&answer), &json!({}));
        let version = other.call("core.version", json!([])).await.expect("rpc");
        assert!(result(&version).as_str().is_some_and(|v| v.starts_with("evrhost ")));
    }
    assert!(!spin.is_finished(), "the slow call ended before the others: the test proves nothing");
    let answer = spin.await.expect("task").expect("rpc");
    assert_eq!(result(&answer), &json!({}), "the slow call itself succeeds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_lock_real_work_out() {
    let daemon = Daemon::start(CONFIG).await;
    // More idle sockets than the daemon serves at once, none sending a byte.
    let idle: Vec<std::net::TcpStream> =
        (0..1100).map(|_| std::net::TcpStream::connect(daemon.addr).expect("connect")).collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let mut c = daemon.client().await;
        let r = c.call("core.version", json!([])).await.expect("a real request is served");
        assert!(result(&r).as_str().unwrap_or("").starts_with("evrhost"), "{r}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "served in {:?}", started.elapsed());
    }
    let mut health = std::net::TcpStream::connect(daemon.addr).expect("connect");
    health.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("write");
    let mut body = String::new();
    health.read_to_string(&mut body).expect("read");
    assert!(body.starts_with("HTTP/1.1 200") && body.ends_with("ok\n"), "{body}");
    // The oldest idle ones were closed to make room: the daemon holds no
    // more than its bound.
    assert!(daemon.fds() < 1024 + 64, "{} descriptors open", daemon.fds());
    drop(idle);
}
