//! The event bus, each event provoked for real and received by real
//! subscribers: plugins, a UDP peer (event_datagram) and a TCP peer
//! (event_stream).

use std::io::Read;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::support::{error, result, Daemon};

const SECOND: Duration = Duration::from_secs(1);

/// An event_datagram peer: one JSON-RPC notification per datagram.
pub(super) struct UdpPeer {
    socket: UdpSocket,
}

impl UdpPeer {
    pub(super) fn new() -> UdpPeer {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        UdpPeer { socket }
    }

    pub(super) fn socket(&self) -> String {
        format!("udp:{}", self.socket.local_addr().expect("addr"))
    }

    /// The next notification for `method` whose params satisfy `pred`.
    pub(super) fn next(&self, method: &str, within: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        let mut buf = vec![0u8; 70_000];
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            let Ok(n) = self.socket.recv(&mut buf) else { continue };
            let doc: Value = serde_json::from_slice(&buf[..n]).expect("a JSON notification");
            assert_eq!(doc["jsonrpc"], json!("2.0"));
            assert!(doc.get("id").is_none(), "a notification has no id: {doc}");
            if doc["method"] == json!(method) && pred(&doc["params"]) {
                return doc;
            }
            seen.push(doc["method"].to_string());
        }
        panic!("no {method} notification within {within:?}; saw {seen:?}");
    }
}

/// An event_stream peer: JSON documents back to back on one connection.
struct TcpPeer {
    addr: SocketAddr,
    docs: mpsc::Receiver<Value>,
}

impl TcpPeer {
    fn new() -> TcpPeer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, docs) = mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 65536];
                    while let Ok(n) = stream.read(&mut chunk) {
                        if n == 0 {
                            return;
                        }
                        buffer.extend_from_slice(&chunk[..n]);
                        let mut values = serde_json::Deserializer::from_slice(&buffer).into_iter::<Value>();
                        let mut consumed = 0;
                        while let Some(Ok(v)) = values.next() {
                            consumed = values.byte_offset();
                            let _ = tx.send(v);
                        }
                        buffer.drain(..consumed);
                    }
                });
            }
        });
        TcpPeer { addr, docs }
    }

    fn next(&self, within: Duration) -> Value {
        self.docs.recv_timeout(within).expect("an event_stream notification")
    }
}

async fn run(client: &mut evrhost::frontend::client::RpcClient, route: &str, data: &str) -> Value {
    client.call("route.run", json!([route, data])).await.expect("rpc")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_events_reach_a_plugin_a_udp_and_a_tcp_subscriber_filtered() {
    let daemon = Daemon::start(
        r#"
        [rpc]
        listen = "127.0.0.1:{PORT}"

        [[tenant]]
        name = "acme"

        [[plugin]]
        name = "firer"
        path = "{listener}"
        tenant = "acme"
        [plugin.config]
        id = "firer"

        [[plugin]]
        name = "watcher"
        path = "{listener}"
        tenant = "acme"
        [plugin.config]
        id = "watcher"

        [[route]]
        name = "firer.fire"
        plugin = "firer"
        [[route]]
        name = "watcher.subscribe"
        plugin = "watcher"
        [[route]]
        name = "watcher.filter"
        plugin = "watcher"
        "#,
    )
    .await;
    let (udp, tcp) = (UdpPeer::new(), TcpPeer::new());
    let mut c = daemon.client().await;
    assert_eq!(result(&run(&mut c, "watcher.subscribe", "CUSTOM acme::login").await)["retval"], json!("subscribed"));
    assert_eq!(
        result(&run(&mut c, "watcher.filter", "add User alice").await)["retval"],
        json!("filter added: [User]=[alice]")
    );
    let r = c.call("event.subscribe", json!(["CUSTOM:acme::login", udp.socket()])).await.expect("rpc");
    assert_eq!(result(&r), &json!("OK"));
    let stream = format!("tcp:{}/acme.login", tcp.addr);
    result(&c.call("event.subscribe", json!(["CUSTOM:acme::login", stream, 600])).await.expect("rpc"));
    let r = c.call("event.filter", json!([stream, "add", "User", "/^(alice|carol)$/"])).await.expect("rpc");
    assert_eq!(result(&r), &json!("+OK filter added. [User]=[/^(alice|carol)$/]"));

    for user in ["alice", "bob", "carol"] {
        result(&run(&mut c, "firer.fire", &format!("acme::login User={user};Realm=example.com")).await);
    }
    result(&run(&mut c, "firer.fire", "acme::logout User=alice").await);

    // UDP: every login (no filter), with the standard headers.
    for user in ["alice", "bob", "carol"] {
        let doc = udp.next("CUSTOM", 5 * SECOND, |p| p["User"] == json!(user));
        let p = &doc["params"];
        assert_eq!(p["Event-Subclass"], json!("acme::login"));
        assert_eq!(p["Realm"], json!("example.com"));
        assert_eq!(p["Event-Calling-File"], json!("firer"));
        assert_eq!(p["Event-Calling-Function"], json!("firer.fire"));
        for h in
            ["Core-UUID", "Hostname", "Event-Date-Local", "Event-Date-GMT", "Event-Date-Timestamp", "Event-Sequence"]
        {
            assert!(p[h].is_string(), "{h} in {p}");
        }
    }
    // TCP: alice and carol only, under the socket's method.
    let users: Vec<Value> = (0..2)
        .map(|_| tcp.next(5 * SECOND))
        .map(|d| {
            assert_eq!(d["method"], json!("acme.login"));
            d["params"]["User"].clone()
        })
        .collect();
    assert_eq!(users, vec![json!("alice"), json!("carol")]);
    assert!(tcp.docs.recv_timeout(Duration::from_millis(300)).is_err(), "bob was filtered out");

    // The plugin: alice only; never the logout.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = c.call("api.run", json!(["watcher.count", "CUSTOM:acme::login"])).await.expect("rpc");
    assert_eq!(result(&r), &json!("1"));
    let r = c.call("api.run", json!(["watcher.last", "CUSTOM:acme::login"])).await.expect("rpc");
    assert!(result(&r).as_str().unwrap_or("").contains("User=alice"), "{r}");
    let r = c.call("api.run", json!(["watcher.count", "CUSTOM:acme::logout"])).await.expect("rpc");
    assert_eq!(result(&r), &json!("0"));

    // The tenant's ACL: only CUSTOM acme::…; host events are the host's.
    let r = run(&mut c, "firer.fire", "other::thing").await;
    assert!(error(&r).1.contains("denied: the tenant may not fire `CUSTOM` `other::thing`"), "{r}");
    let r = run(&mut c, "watcher.subscribe", "HEARTBEAT").await;
    assert!(error(&r).1.contains("the tenant may not subscribe to `HEARTBEAT`"), "{r}");

    let list = c.call("event.list", json!([])).await.expect("rpc");
    let subs = result(&list).as_array().expect("array").clone();
    let find = |target: &str| subs.iter().find(|s| s["target"] == json!(target)).cloned().unwrap_or(Value::Null);
    assert_eq!(find("plugin:watcher")["delivered"], json!(1), "{list}");
    assert_eq!(find(&udp.socket())["delivered"], json!(3), "{list}");
    assert_eq!(find(&format!("tcp:{}/acme.login", tcp.addr))["filters"], json!(1), "{list}");
}

const CORE: &str = r#"
[rpc]
listen = "127.0.0.1:{PORT}"
plugin_dirs = ["{PLUGINS}", "{DIR}"]

[events]
heartbeat_s = 1
log = "info"

[[plugin]]
name = "hostile"
path = "{hostile}"
warn_ms = 5
memory_mb = 16
pkg_threshold = 50
min_instances = 1
max_instances = 4
idle_ms = 300
fuel = 1000000000000
profiling = true

[[plugin]]
name = "xlog"
path = "{xlog}"

[[plugin]]
name = "counter"
path = "{counter}"

[[route]]
name = "spin"
plugin = "hostile"
[[route]]
name = "grow"
plugin = "hostile"
[[route]]
name = "ok"
plugin = "hostile"
[[route]]
name = "evrexec:test"
plugin = "xlog"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thresholds_memory_and_pool_scaling_are_raised() {
    let daemon = Daemon::start(CORE).await;
    let udp = UdpPeer::new();
    let mut c = daemon.client().await;
    for event in ["E_CORE_THRESHOLD", "E_CORE_PKG_THRESHOLD", "E_CORE_PROC_AUTO_SCALE"] {
        result(&c.call("event.subscribe", json!([event, udp.socket()])).await.expect("rpc"));
    }

    result(&run(&mut c, "spin", "20").await);
    let t = udp.next("E_CORE_THRESHOLD", 5 * SECOND, |_| true);
    assert_eq!(t["params"]["source"], json!("plugin hostile route spin"));
    assert!(t["params"]["time"].as_u64().unwrap_or(0) >= 20_000, "time is an int, in µs: {t}");
    assert_eq!(t["params"]["extra"], json!("threshold 5000 us"));

    result(&run(&mut c, "grow", "10").await);
    let m = udp.next("E_CORE_PKG_THRESHOLD", 5 * SECOND, |_| true);
    assert!(m["params"]["usage"].as_u64().unwrap_or(0) >= 50, "{m}");
    assert_eq!(m["params"]["threshold"], json!(50));
    assert_eq!(m["params"]["size"], json!(16 << 20));

    // Four concurrent calls grow the pool from 1 to 4 …
    let mut calls = Vec::new();
    for _ in 0..4 {
        let mut client = daemon.client().await;
        calls.push(tokio::spawn(async move { run(&mut client, "spin", "150").await }));
    }
    for call in calls {
        result(&call.await.expect("task"));
    }
    let mut ups: Vec<u64> = (0..3)
        .map(|_| udp.next("E_CORE_PROC_AUTO_SCALE", 5 * SECOND, |p| p["scale"] == json!("up")))
        .map(|d| {
            assert_eq!(d["params"]["group_type"], json!("plugin"));
            assert_eq!(d["params"]["group_filter"], json!("hostile"));
            d["params"]["process_id"].as_u64().unwrap_or(0)
        })
        .collect();
    ups.sort();
    assert_eq!(ups, vec![2, 3, 4]);
    // … and idle for 300 ms, it shrinks back to its minimum of 1.
    let downs: Vec<u64> = (0..3)
        .map(|_| udp.next("E_CORE_PROC_AUTO_SCALE", 5 * SECOND, |p| p["scale"] == json!("down")))
        .map(|d| d["params"]["process_id"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(downs, vec![3, 2, 1]);
    let list = c.call("plugin.list", json!([])).await.expect("rpc");
    let hostile = result(&list).as_array().expect("array").iter().find(|p| p["name"] == json!("hostile")).cloned();
    assert_eq!(hostile.expect("hostile")["idle_instances"], json!(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnects_logs_profiling_heartbeats_jobs_and_plugin_events() {
    let daemon = Daemon::start(CORE).await;
    let udp = UdpPeer::new();
    let mut c = daemon.client().await;
    for event in [
        "E_CORE_TCP_DISCONNECT",
        "E_CORE_LOG",
        "E_PROFILING_SCRIPT",
        "HEARTBEAT",
        "BACKGROUND_JOB",
        "PLUGIN_RELOAD",
        "PLUGIN_FAIL",
    ] {
        result(&c.call("event.subscribe", json!([event, udp.socket()])).await.expect("rpc"));
    }

    // A stream peer goes away.
    let mut other = daemon.client().await;
    result(&other.call("core.version", json!([])).await.expect("rpc"));
    drop(other);
    let d = udp.next("E_CORE_TCP_DISCONNECT", 5 * SECOND, |_| true);
    assert_eq!(d["params"]["proto"], json!("tcp"));
    assert_eq!(d["params"]["src_ip"], json!("127.0.0.1"));
    assert_eq!(d["params"]["dst_port"], json!(daemon.addr.port()));

    // A log line of a plugin.
    result(&c.call("evrexec.run", json!(["evrexec:test", "hello log"])).await.expect("rpc"));
    let l = udp.next("E_CORE_LOG", 5 * SECOND, |p| {
        p["message"].as_str().is_some_and(|m| m.contains("rpc command data: hello log"))
    });
    assert_eq!(l["params"]["level"], json!("INFO"));
    assert_eq!(l["params"]["module"], json!("plugin"));

    // Profiling records of one call: start, enter, exit, end of one session.
    result(&run(&mut c, "ok", "").await);
    let records: Vec<Value> =
        (0..4).map(|_| udp.next("E_PROFILING_SCRIPT", 5 * SECOND, |_| true)["params"].clone()).collect();
    let verbs: Vec<&Value> = records.iter().map(|r| &r["verb"]).collect();
    assert_eq!(verbs, vec!["start", "enter", "exit", "end"]);
    assert!(records.iter().all(|r| r["session"] == records[0]["session"] && r["name"] == json!("ok")));
    let depths: Vec<&Value> = records.iter().map(|r| &r["depth"]).collect();
    assert_eq!(depths, vec![0, 1, 0, 0]);
    assert_eq!(records[1]["file"], json!("hostile"));
    assert_eq!(records[2]["status"], json!(1));
    assert!(records[0].get("status").is_none() && records[0].get("file").is_none(), "{:?}", records[0]);

    // A heartbeat (every second here).
    let h = udp.next("HEARTBEAT", 5 * SECOND, |_| true);
    assert_eq!(h["params"]["Event-Info"], json!("System Ready"));
    assert!(h["params"]["Idle-CPU"].is_string() && h["params"]["Up-Time"].is_string(), "{h}");

    // A background job.
    let r = c.call("api.bgrun", json!(["counter.get", "nobody"])).await.expect("rpc");
    let job = result(&r)["job_uuid"].clone();
    let b = udp.next("BACKGROUND_JOB", 5 * SECOND, |p| p["Job-UUID"] == job);
    assert_eq!(b["params"]["_body"], json!("0"));
    assert_eq!(b["params"]["Job-Command"], json!("counter.get"));
    assert_eq!(b["params"]["Job-Successful"], json!("true"));

    // A reload, and a refused one.
    result(&c.call("plugin.reload", json!(["xlog"])).await.expect("rpc"));
    udp.next("PLUGIN_RELOAD", 5 * SECOND, |p| p["Plugin"] == json!("xlog"));
    let garbage = daemon.dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"garbage").expect("write");
    error(&c.call("plugin.reload", json!(["xlog", garbage.display().to_string()])).await.expect("rpc"));
    let f = udp.next("PLUGIN_FAIL", 5 * SECOND, |p| p["Plugin"] == json!("xlog"));
    assert!(f["params"]["Error"].as_str().unwrap_or("").contains("is not WebAssembly"), "{f}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_blocks_nothing() {
    let daemon = Daemon::start(
        r#"
        [rpc]
        listen = "127.0.0.1:{PORT}"

        [[plugin]]
        name = "firer"
        path = "{listener}"

        [[route]]
        name = "burst"
        plugin = "firer"
        "#,
    )
    .await;
    // A TCP peer that accepts and never reads.
    let stalled = TcpListener::bind("127.0.0.1:0").expect("bind");
    let stalled_socket = format!("tcp:{}", stalled.local_addr().expect("addr"));
    std::thread::spawn(move || {
        if let Ok((held, _)) = stalled.accept() {
            std::thread::sleep(Duration::from_secs(30));
            drop(held);
        }
    });
    let udp = UdpPeer::new();
    let mut c = daemon.client().await;
    result(&c.call("event.subscribe", json!(["CUSTOM:load", stalled_socket])).await.expect("rpc"));
    result(&c.call("event.subscribe", json!(["CUSTOM:load", udp.socket()])).await.expect("rpc"));

    // 100 bursts of 50 events of ~3 KiB: 15 MB, far more than the socket
    // buffers hold (the peer never reads, so its receive window stays small).
    // After each burst the test waits for the UDP subscriber to have sent
    // it: a bus held up by the stalled peer would stop it here, while the
    // stalled peer's own queue fills and overflows.
    let accounted =
        |s: &Value| ["delivered", "overflow", "failed"].iter().map(|k| s[k].as_u64().unwrap_or(0)).sum::<u64>();
    let mut firing = Duration::ZERO;
    let mut list = Value::Null;
    for burst in 1..=100u64 {
        let started = Instant::now();
        let r = run(&mut c, "burst", "50 load 3000").await;
        firing += started.elapsed();
        assert_eq!(result(&r)["retval"], json!("50"), "fire never fails for a slow subscriber");
        let deadline = Instant::now() + 10 * SECOND;
        loop {
            list = c.call("event.list", json!([])).await.expect("rpc");
            let fast = find(&list, &udp.socket());
            if accounted(&fast) >= burst * 50 {
                break;
            }
            assert!(Instant::now() < deadline, "burst {burst}: the UDP subscriber is held up: {list}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert!(firing < 10 * SECOND, "firing took {firing:?}");
    let (stalled, fast) = (find(&list, &stalled_socket), find(&list, &udp.socket()));
    let lost = stalled["overflow"].as_u64().unwrap_or(0) + stalled["failed"].as_u64().unwrap_or(0);
    assert!(lost > 0, "the stalled peer lost events, counted: {list}");
    assert_eq!(fast["delivered"], json!(5000), "the UDP peer got every event: {list}");
}

/// One subscriber's line of an `event.list` answer (null when absent).
fn find(list: &Value, target: &str) -> Value {
    result(list)
        .as_array()
        .and_then(|subs| subs.iter().find(|s| s["target"] == json!(target)).cloned())
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_expire_and_bad_ones_are_refused() {
    let daemon = Daemon::start("[rpc]\nlisten = \"127.0.0.1:{PORT}\"\n").await;
    let udp = UdpPeer::new();
    let mut c = daemon.client().await;
    result(&c.call("event.subscribe", json!(["HEARTBEAT", udp.socket(), 1])).await.expect("rpc"));
    assert_eq!(result(&c.call("event.list", json!([])).await.expect("rpc")).as_array().map(Vec::len), Some(1));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(result(&c.call("event.list", json!([])).await.expect("rpc")), &json!([]), "expired");

    let r = c.call("event.subscribe", json!(["HEARTBEAT", udp.socket(), -5])).await.expect("rpc");
    assert_eq!(error(&r), (-32602, "Negative expire value".to_string()));
    let r = c.call("event.subscribe", json!(["HEARTBEAT", "carrier-pigeon:1.2.3.4:5"])).await.expect("rpc");
    assert_eq!(error(&r), (400, "Bad parameter value".to_string()));
    // An expiry too far to represent is no expiry, not a crash.
    let r = c.call("event.subscribe", json!(["HEARTBEAT", udp.socket(), i64::MAX])).await.expect("rpc");
    assert_eq!(result(&r), &json!("OK"));
    // Expire 0 removes, as in OpenSIPS.
    result(&c.call("event.subscribe", json!(["HEARTBEAT", udp.socket()])).await.expect("rpc"));
    result(&c.call("event.subscribe", json!(["HEARTBEAT", udp.socket(), 0])).await.expect("rpc"));
    assert_eq!(result(&c.call("event.list", json!([])).await.expect("rpc")), &json!([]));
}

/// Subscribers cost no file descriptor each, and peers that never got past
/// the token cannot make the daemon send E_CORE_TCP_DISCONNECT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_udp_subscribers_share_a_socket_and_unauthenticated_peers_raise_nothing() {
    let daemon = Daemon::start("[rpc]\nlisten = \"127.0.0.1:{PORT}\"\ntoken = \"s3cret\"\n").await;
    let mut admin =
        evrhost::frontend::client::RpcClient::connect(daemon.addr, Some("s3cret".into())).await.expect("connect");
    let watcher = UdpPeer::new();
    let r = admin.call("event.subscribe", json!(["E_CORE_TCP_DISCONNECT", watcher.socket()])).await.expect("rpc");
    assert_eq!(result(&r), &json!("OK"));
    let before = daemon.fds();
    // 300 more subscribers (they need not exist: event_datagram does not
    // care). On 127.0.0.2, so none can be the watcher's own ephemeral port.
    for port in 40_000..40_300 {
        let r = admin.call("event.subscribe", json!(["E_CORE_TCP_DISCONNECT", format!("udp:127.0.0.2:{port}")])).await;
        assert_eq!(result(&r.expect("rpc")), &json!("OK"));
    }
    // Five peers without the token: 401 each, and no event for their going.
    for _ in 0..5 {
        let mut anonymous = daemon.client().await;
        let (status, _) =
            anonymous.post(br#"{"jsonrpc":"2.0","method":"core.version","id":1}"#.to_vec()).await.expect("http");
        assert_eq!(status, 401);
    }
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        assert!(watcher.socket.recv(&mut buf).is_err(), "an unauthenticated peer raised an event");
    }
    // One authorized peer that goes: every subscriber is told, through the
    // shared socket.
    let mut client =
        evrhost::frontend::client::RpcClient::connect(daemon.addr, Some("s3cret".into())).await.expect("connect");
    result(&client.call("core.version", json!([])).await.expect("rpc"));
    drop(client);
    watcher.next("E_CORE_TCP_DISCONNECT", Duration::from_secs(5), |p| p["proto"] == json!("tcp"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = admin.call("event.list", json!([])).await.expect("rpc");
        let subscribers = result(&list).as_array().expect("array").clone();
        assert_eq!(subscribers.len(), 301, "every subscription is a subscriber of its own");
        // Reached: delivered, or still in the subscriber's queue on a
        // loaded machine (the bus's part is done either way).
        let delivered: u64 =
            subscribers.iter().map(|s| s["delivered"].as_u64().unwrap_or(0) + s["queued"].as_u64().unwrap_or(0)).sum();
        let failed: u64 = subscribers.iter().map(|s| s["failed"].as_u64().unwrap_or(0)).sum();
        assert_eq!(failed, 0, "no delivery fails for want of a socket");
        if delivered >= 301 {
            break;
        }
        let stuck: Vec<&Value> =
            subscribers.iter().filter(|s| s["delivered"] == json!(0) && s["queued"] == json!(0)).collect();
        assert!(Instant::now() < deadline, "{delivered} of 301 reached; not yet: {stuck:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(daemon.fds() <= before + 4, "fds went from {before} to {}", daemon.fds());
}
