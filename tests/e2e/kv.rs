//! The kv store through the real daemon: acknowledged writes survive
//! `kill -9`, the relaxed mode loses at most its window, operators read and
//! write keys over RPC, and a store that cannot be opened stops the daemon.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::support::{error, evrhost, result, text, Daemon};

const COUNTING: &str = r#"
[rpc]
listen = "127.0.0.1:{PORT}"

[[plugin]]
name = "kvcount"
path = "{kvcount}"

[[route]]
name = "count"
plugin = "kvcount"

[[plugin]]
name = "echo"
path = "{echo}"

[[route]]
name = "echo"
plugin = "echo"
"#;

/// A pseudo-random number below `n`, from the clock (no seed to keep).
fn random_below(n: u64) -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    u64::from(nanos.wrapping_mul(2_654_435_761)) % n
}

async fn counted(daemon: &Daemon, key: &str) -> u64 {
    let mut c = daemon.client().await;
    let r = c.call("kv.get", json!(["default", format!("kvcount:{key}")])).await.expect("rpc");
    match &result(&r)["value"] {
        Value::String(v) => v.parse().expect("a number"),
        _ => 0,
    }
}

/// `clients` tasks counting `key` through `route.run` until the daemon
/// goes away; each acknowledged call is counted (with its time) in `acked`.
fn load(
    daemon: &Daemon,
    clients: usize,
    key: &str,
    acked: &Arc<Mutex<Vec<Instant>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|_| {
            let (addr, key, acked) = (daemon.addr, key.to_string(), acked.clone());
            tokio::spawn(async move {
                let Ok(mut c) = evrhost::frontend::client::RpcClient::connect(addr, None).await else { return };
                loop {
                    match c.call("route.run", json!(["count", key])).await {
                        Ok(r) if r.get("result").is_some() => acked.lock().expect("lock").push(Instant::now()),
                        _ => return,
                    }
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_counts_survive_kill_9_at_random_moments() {
    const CLIENTS: usize = 4;
    let mut daemon = Daemon::start(COUNTING).await;
    let mut floor = 0u64;
    for round in 0..6 {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let tasks = load(&daemon, CLIENTS, "k", &acked);
        tokio::time::sleep(Duration::from_millis(200 + random_below(300))).await;
        daemon = daemon.kill_and_restart().await;
        for t in tasks {
            t.await.expect("client task");
        }
        let acked = acked.lock().expect("lock").len() as u64;
        let now = counted(&daemon, "k").await;
        // Every acknowledged increment is there; beyond them, at most the
        // calls in flight when the daemon died (one per client).
        assert!(now >= floor + acked, "round {round}: {now} counted, {floor} + {acked} acknowledged");
        assert!(now <= floor + acked + CLIENTS as u64, "round {round}: {now} counted of {floor} + {acked}");
        assert!(acked > 0, "round {round}: no call was acknowledged");
        floor = now;
    }
    let (_, metrics) = daemon.scrape();
    assert!(metrics.contains("evrhost_kv_commits_total"), "{metrics}");
}

/// UDP too: a reply datagram leaves only once its counts are on disk
/// (while the worker goes on with the next datagram).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_acknowledged_by_a_reply_datagram_survive_kill_9() {
    let config = format!("{COUNTING}\n[[exec]]\nname = \"count\"\nsockaddr = \"udp:127.0.0.1:{{UDP}}\"\n");
    let mut daemon = Daemon::start(&config).await;
    let target = daemon.udp_addr(0);
    let mut floor = 0u64;
    for round in 0..3 {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let senders: Vec<_> = (0..3)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
                    socket.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
                    let (mut sent, mut replies, mut buf) = (0u64, 0u64, [0u8; 64]);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        socket.send_to(b"u", target).expect("send");
                        sent += 1;
                        // No reply in time (a loaded machine, or the daemon
                        // gone): send again until told to stop.
                        if let Ok(n) = socket.recv(&mut buf) {
                            assert_eq!(&buf[..n], b"1");
                            replies += 1;
                        }
                    }
                    (sent, replies)
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300 + random_below(300))).await;
        daemon = daemon.kill_and_restart().await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (sent, replies) =
            senders.into_iter().map(|t| t.join().expect("sender")).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        let now = counted(&daemon, "u").await;
        assert!(replies > 0, "round {round}: no reply came back");
        assert!(now >= floor + replies, "round {round}: {now} counted, {floor} + {replies} replied to");
        assert!(now <= floor + sent, "round {round}: {now} counted, {floor} + {sent} sent");
        floor = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relaxed_commits_lose_at_most_their_window() {
    const FLUSH_MS: u64 = 200;
    let config = format!("{COUNTING}\n[kv]\ndurability = \"relaxed\"\nflush_ms = {FLUSH_MS}\n");
    let daemon = Daemon::start(&config).await;
    let acked = Arc::new(Mutex::new(Vec::new()));
    let tasks = load(&daemon, 2, "r", &acked);
    tokio::time::sleep(Duration::from_millis(700 + random_below(300))).await;
    let killed = Instant::now();
    let daemon = daemon.kill_and_restart().await;
    for t in tasks {
        t.await.expect("client task");
    }
    let acked = acked.lock().expect("lock").clone();
    let now = counted(&daemon, "r").await;
    // Everything acknowledged a window (and a commit's time) before the
    // kill is on disk.
    let margin = Duration::from_millis(FLUSH_MS + 300);
    let old = acked.iter().filter(|t| killed.duration_since(**t) > margin).count() as u64;
    assert!(old > 0, "the load acknowledged nothing before the window");
    assert!(now >= old, "{now} counted, {old} acknowledged more than {margin:?} before the kill");
    assert!(now <= acked.len() as u64 + 2, "{now} counted of {} acknowledged", acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_get_set_list_and_delete_keys_over_rpc() {
    let config = format!(
        "{COUNTING}\n[[tenant]]\nname = \"small\"\nkv_max_keys = 2\n\n[[plugin]]\nname = \"other\"\npath = \"{{counter}}\"\ntenant = \"small\"\n\n[[route]]\nname = \"other\"\nplugin = \"other\"\n"
    );
    let daemon = Daemon::start(&config).await;
    let mut c = daemon.client().await;
    let call = |m: &'static str, p: Value| (m, p);
    let mut rpc = async |(m, p): (&str, Value)| c.call(m, p).await.expect("rpc");

    // A plugin's writes are visible to the operator, and theirs to it.
    result(&rpc(call("route.run", json!(["count", "a;b;a"]))).await);
    assert_eq!(
        result(&rpc(call("kv.get", json!(["default", "kvcount:a"]))).await),
        &json!({"key": "kvcount:a", "value": "2"})
    );
    assert_eq!(result(&rpc(call("kv.set", json!(["default", "kvcount:z", "41"]))).await), &json!("OK"));
    assert_eq!(result(&rpc(call("kv.incr", json!(["default", "kvcount:z"]))).await), &json!(42));
    assert_eq!(result(&rpc(call("api.run", json!(["kvcount.get", "z"]))).await), &json!("42"));
    let listed = rpc(call("kv.list", json!(["default", "kvcount:", 2]))).await;
    assert_eq!(result(&listed), &json!([{"key": "kvcount:a", "value": "2"}, {"key": "kvcount:b", "value": "1"}]));

    // A value that would drive a terminal is shown as hex.
    rpc(call("kv.set", json!(["default", "raw", "\u{1b}[2J"]))).await;
    assert_eq!(
        result(&rpc(call("kv.get", json!(["default", "raw"]))).await),
        &json!({"key": "raw", "hex": "1b5b324a"})
    );
    assert_eq!(result(&rpc(call("kv.delete", json!(["default", "raw"]))).await), &json!({"deleted": true}));
    assert_eq!(result(&rpc(call("kv.get", json!(["default", "raw"]))).await), &Value::Null);

    // Tenants are apart, quotas hold, bad input is named.
    assert_eq!(result(&rpc(call("kv.get", json!(["small", "kvcount:a"]))).await), &Value::Null);
    result(&rpc(call("route.run", json!(["other", "x"]))).await);
    result(&rpc(call("route.run", json!(["other", "y"]))).await);
    let full = rpc(call("route.run", json!(["other", "w"]))).await;
    assert!(error(&full).1.contains("has 2 keys already"), "{full}");
    let (code, message) = error(&rpc(call("kv.set", json!(["small", "third", "v"]))).await);
    assert_eq!((code, message.contains("has 2 keys already")), (400, true), "{message}");
    assert_eq!(error(&rpc(call("kv.get", json!(["nobody", "k"]))).await), (404, "no tenant `nobody`".to_string()));
    assert_eq!(error(&rpc(call("kv.list", json!(["default", "", 0]))).await).0, -32602);
    assert_eq!(error(&rpc(call("kv.incr", json!(["default", "kvcount:z", "x"]))).await).0, -32602);
    let methods = rpc(call("system.listMethods", json!([]))).await;
    assert!(result(&methods).as_array().expect("array").contains(&json!("kv.list")), "{methods}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_it_cannot_open_stops_the_daemon_naming_the_path() {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("evrhost.toml");
    let run = |kv: &str| {
        std::fs::write(&config, format!("[kv]\n{kv}\n")).expect("config");
        let out = evrhost(&["run", "-c", config.to_str().expect("utf-8"), "--listen", "127.0.0.1:0"]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        text(&out.stderr)
    };
    // Not a store at all.
    let store = dir.path().join("store");
    std::fs::create_dir(&store).expect("mkdir");
    std::fs::write(store.join("kv.redb"), vec![0x5a; 4096]).expect("garbage");
    let stderr = run(&format!("dir = \"{}\"", store.display()));
    assert!(stderr.contains(&format!("{}/kv.redb", store.display())), "{stderr}");
    assert!(stderr.contains("restore it from a backup, or move it away"), "{stderr}");
    // A directory that cannot be made.
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").expect("file");
    let stderr = run(&format!("dir = \"{}/kv\"", file.display()));
    assert!(stderr.contains("cannot create the data directory") && stderr.contains("a-file/kv"), "{stderr}");
    // A store another daemon holds.
    let held = dir.path().join("held");
    let daemon =
        Daemon::start(&format!("[rpc]\nlisten = \"127.0.0.1:{{PORT}}\"\n[kv]\ndir = \"{}\"\n", held.display())).await;
    let stderr = run(&format!("dir = \"{}\"", held.display()));
    assert!(stderr.contains("is held by another evrhost"), "{stderr}");
    drop(daemon);
    // A new directory is made private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&held).expect("made").permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

/// A disk that fills (a file-size limit stands in for it): calls that
/// write fail with the cause named and nothing unsaved is acknowledged;
/// calls that do not write go on; after a restart with room, what was
/// acknowledged is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_withholds_replies_and_loses_nothing_acknowledged() {
    let daemon = Daemon::start(COUNTING).await;
    let mut c = daemon.client().await;
    for _ in 0..3 {
        result(&c.call("route.run", json!(["count", "before"])).await.expect("rpc"));
    }
    drop(c);
    // Restart the same store under a file-size limit just above its size.
    let (kept, addr) = daemon.kill();
    let dir = kept.path().to_path_buf();
    let size = std::fs::metadata(dir.join("evrhost/kv.redb")).expect("store").len()
        + std::fs::metadata(dir.join("evrhost/kv.wal")).expect("log").len();
    let wrapper = dir.join("limited.sh");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nulimit -f {}\nexec {} \"$@\"\n", size / 512 + 64, super::support::BIN),
    )
    .expect("wrapper");
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let log = dir.join("limited.log");
    let env = [("RUST_LOG", "info"), ("NO_COLOR", "1"), ("XDG_STATE_HOME", dir.to_str().expect("utf-8"))];
    let limited = evrhost::harness::Spawned::start(
        &wrapper,
        &dir.join("evrhost.toml"),
        addr,
        &log,
        &env,
        Duration::from_secs(60),
    )
    .expect("start under the limit");
    let mut c = evrhost::frontend::client::RpcClient::connect(addr, None).await.expect("connect");
    let big = "x".repeat(200_000);
    let refused = c.call("kv.set", json!(["default", "big", big])).await.expect("rpc");
    let (code, message) = error(&refused);
    assert_eq!(code, 503, "{message}");
    assert!(message.contains("kv.wal"), "{message}");
    // Not writing still works; writing is refused with the cause named.
    assert_eq!(result(&c.call("route.run", json!(["echo", "hi"])).await.expect("rpc"))["data"], json!("hi"));
    let counting = c.call("route.run", json!(["count", "during"])).await.expect("rpc");
    assert!(error(&counting).1.contains("kv writes not saved"), "{counting}");
    let (_, metrics) = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("write");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("read");
        ((), body)
    };
    assert!(super::support::metric(&metrics, "evrhost_kv_errors_total") > 0, "{metrics}");
    drop(c);
    drop(limited);
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(log.contains("kv: commit failed"), "{log}");

    // With room again: the acknowledged counts are there.
    let again = Daemon::start(&format!("{COUNTING}\n[kv]\ndir = \"{}\"\n", dir.join("evrhost").display())).await;
    assert_eq!(counted(&again, "before").await, 3);
}
