//! Every kv backend keeps quotas, tenants apart and `incr` atomic; Redis
//! (a real `redis-server`) is shared by two daemons exactly, and when it
//! goes away kv calls fail cleanly while everything else serves on.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::support::{error, free_port, metric, result, Daemon};

/// A `redis-server` of the test's own, without persistence, on loopback.
pub struct RedisServer {
    child: Child,
    pub port: u16,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_on(free_port())
    }

    pub fn start_on(port: u16) -> RedisServer {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's redis-server package; .ci/run installs it)");
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "redis-server did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisServer { child, port }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(kv: &str) -> String {
    format!(
        r#"
[rpc]
listen = "127.0.0.1:{{PORT}}"

[[tenant]]
name = "small"
kv_max_keys = 2
kv_max_bytes = 64

[[plugin]]
name = "kvcount"
path = "{{kvcount}}"

[[route]]
name = "count"
plugin = "kvcount"

[[exec]]
name = "count"
sockaddr = "udp:127.0.0.1:{{UDP}}"

[[plugin]]
name = "small"
path = "{{counter}}"
tenant = "small"

[[route]]
name = "small"
plugin = "small"

[[plugin]]
name = "echo"
path = "{{echo}}"

[[route]]
name = "echo"
plugin = "echo"

{kv}
"#
    )
}

async fn call(daemon: &Daemon, method: &str, params: Value) -> Value {
    daemon.client().await.call(method, params).await.expect("rpc")
}

/// The same checks on each backend.
async fn quotas_isolation_and_atomic_incr(kv: &str) {
    let daemon = Daemon::start(&config(kv)).await;
    // Quotas: two keys, 64 bytes.
    assert_eq!(result(&call(&daemon, "kv.set", json!(["small", "a", "1"])).await), &json!("OK"));
    assert_eq!(result(&call(&daemon, "kv.set", json!(["small", "b", "x".repeat(40)])).await), &json!("OK"));
    let over = call(&daemon, "kv.set", json!(["small", "a", "y".repeat(30)])).await;
    assert!(error(&over).1.contains("more than its 64 bytes"), "{over}");
    assert_eq!(result(&call(&daemon, "kv.set", json!(["small", "a", "2"])).await), &json!("OK"), "an overwrite fits");
    let full = call(&daemon, "kv.set", json!(["small", "c", "1"])).await;
    assert!(error(&full).1.contains("has 2 keys already"), "{full}");
    let from_plugin = call(&daemon, "route.run", json!(["small", "k"])).await;
    assert!(error(&from_plugin).1.contains("has 2 keys already"), "{from_plugin}");
    assert_eq!(result(&call(&daemon, "kv.delete", json!(["small", "b"])).await), &json!({"deleted": true}));
    assert_eq!(result(&call(&daemon, "route.run", json!(["small", "k"])).await)["retval"], json!("1"));
    let counted = call(&daemon, "kv.incr", json!(["small", "a", "1"])).await;
    assert_eq!(result(&counted), &json!(3), "text that is a number counts");
    call(&daemon, "kv.set", json!(["small", "a", "abc"])).await;
    let garbage = call(&daemon, "kv.incr", json!(["small", "a"])).await;
    assert!(error(&garbage).1.contains("not a decimal integer"), "{garbage}");

    // Tenants apart: the same key name is two keys.
    call(&daemon, "kv.set", json!(["default", "a", "mine"])).await;
    assert_eq!(result(&call(&daemon, "kv.get", json!(["small", "a"])).await)["value"], json!("abc"));
    assert_eq!(result(&call(&daemon, "kv.get", json!(["default", "a"])).await)["value"], json!("mine"));
    let listed = result(&call(&daemon, "kv.list", json!(["small"])).await).clone();
    assert_eq!(listed, json!([{"key": "a", "value": "abc"}, {"key": "counter:k", "value": "1"}]));

    // incr is atomic under concurrent calls.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let addr = daemon.addr;
            tokio::spawn(async move {
                let mut c = evrhost::frontend::client::RpcClient::connect(addr, None).await.expect("connect");
                for _ in 0..50 {
                    result(&c.call("route.run", json!(["count", "n;n"])).await.expect("rpc"));
                }
            })
        })
        .collect();
    for c in clients {
        c.await.expect("client");
    }
    assert_eq!(result(&call(&daemon, "kv.get", json!(["default", "kvcount:n"])).await)["value"], json!("400"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_keeps_quotas_tenants_and_atomic_incr() {
    quotas_isolation_and_atomic_incr("[kv]\nbackend = \"memory\"").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_keeps_quotas_tenants_and_atomic_incr() {
    quotas_isolation_and_atomic_incr("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keeps_quotas_tenants_and_atomic_incr() {
    let redis = RedisServer::start();
    // A generous timeout: the machine runs every other test meanwhile.
    let kv = format!("[kv]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout_ms = 3000", redis.url());
    quotas_isolation_and_atomic_incr(&kv).await;
}

/// Calls of `plugin` so far, by `plugin.stats`.
async fn calls(daemon: &Daemon, plugin: &str) -> (u64, u64) {
    let stats = call(daemon, "plugin.stats", json!([plugin])).await;
    let s = &result(&stats)[plugin];
    (s["calls"].as_u64().expect("calls"), s["errors"].as_u64().unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_count_udp_datagrams_into_one_redis_exactly() {
    let redis = RedisServer::start();
    let kv = format!("[kv]\nbackend = \"redis\"\nurl = \"{}\"\npool = 2\ntimeout_ms = 3000", redis.url());
    let daemons = [Daemon::start(&config(&kv)).await, Daemon::start(&config(&kv)).await];
    let sockets: Vec<_> = daemons
        .iter()
        .map(|d| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            s.connect(d.udp_addr(0)).expect("connect");
            s
        })
        .collect();
    for i in 0..2000 {
        sockets[i % 2].send(b"hits;region=eu").expect("send");
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // Settled: both daemons' call counts stop moving.
    let mut last = (0, 0);
    let settled = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = (calls(&daemons[0], "kvcount").await.0, calls(&daemons[1], "kvcount").await.0);
        if now == last || settled.elapsed() > Duration::from_secs(20) {
            break;
        }
        last = now;
    }
    let (c0, e0) = calls(&daemons[0], "kvcount").await;
    let (c1, e1) = calls(&daemons[1], "kvcount").await;
    assert_eq!((e0, e1), (0, 0), "no call failed");
    // One call of each is the `commands` listing at load.
    let (c0, c1) = (c0 - 1, c1 - 1);
    assert!(c0 > 500 && c1 > 500, "each daemon counted: {c0}, {c1}");
    for d in &daemons {
        for key in ["kvcount:hits", "kvcount:region"] {
            let seen = call(d, "kv.get", json!(["default", key])).await;
            assert_eq!(result(&seen)["value"], json!((c0 + c1).to_string()), "{key}: {c0} + {c1} datagrams handled");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_fails_kv_calls_cleanly_and_coming_back_heals() {
    let redis = RedisServer::start();
    let port = redis.port;
    let kv = format!("[kv]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout_ms = 200", redis.url());
    let daemon = Daemon::start(&config(&kv)).await;
    assert_eq!(result(&call(&daemon, "route.run", json!(["count", "up"])).await)["retval"], json!("1"));
    drop(redis);

    let mut c = daemon.client().await;
    for _ in 0..20 {
        let started = Instant::now();
        let r = c.call("route.run", json!(["count", "down"])).await.expect("rpc");
        assert!(error(&r).1.contains("kv store unavailable"), "{r}");
        assert!(started.elapsed() < Duration::from_millis(1000), "a failing call took {:?}", started.elapsed());
    }
    // What does not use kv serves on.
    assert_eq!(result(&c.call("route.run", json!(["echo", "still"])).await.expect("rpc"))["data"], json!("still"));
    let (_, metrics) = daemon.scrape();
    assert!(metric(&metrics, "evrhost_kv_errors_total") >= 20, "{metrics}");
    let logged = daemon.log().lines().filter(|l| l.contains("kv: redis") && l.contains("failed")).count();
    assert!((1..=2).contains(&logged), "logged once per interval, not per call: {logged}\n{}", daemon.log());

    // Back on the same port: counting works again, after the backoff.
    let _redis = RedisServer::start_on(port);
    let started = Instant::now();
    loop {
        let r = c.call("route.run", json!(["count", "back"])).await.expect("rpc");
        if r.get("result").is_some() {
            assert_eq!(result(&r)["retval"], json!("1"));
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "no recovery: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
