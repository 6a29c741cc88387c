//! Kamailio's evrexec in evrhost: exec tasks, UDP routes, `evrexec.run`,
//! metrics, the UNIX RPC socket, and a real SIP client (sipp).

use std::io::{BufRead, BufReader, Write};
use std::net::UdpSocket;
use std::time::Duration;

use serde_json::json;

use super::support::{evrhost, metric, result, text, Daemon};

const SECOND: Duration = Duration::from_secs(1);

fn udp_client(to: std::net::SocketAddr) -> UdpSocket {
    let bind = if to.is_ipv6() { "[::1]:0" } else { "127.0.0.1:0" };
    let socket = UdpSocket::bind(bind).expect("bind");
    socket.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    socket.connect(to).expect("connect");
    socket
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timer_task_loops_with_sleep_past_its_deadline() {
    let daemon = Daemon::start(
        r#"
        [rpc]
        listen = "127.0.0.1:{PORT}"

        [[plugin]]
        name = "timer"
        path = "{timer}"
        # Each slice between sleeps gets the whole deadline afresh.
        deadline_ms = 20
        [plugin.config]
        interval_ms = 30

        [[exec]]
        name = "evrexec:timer"
        plugin = "timer"
        workers = 2
        wait = 1000
        "#,
    )
    .await;
    // 10 iterations of 30 ms = 300 ms, far past the 20 ms deadline.
    daemon.wait_for_log(&["worker 0: x is 10", "route=evrexec:timer"], 5 * SECOND).await;
    daemon.wait_for_log(&["worker 1: x is 10"], 5 * SECOND).await;
    assert!(!daemon.log().contains("task failed"), "{}", daemon.log());

    // A reload moves the running tasks to the new version.
    let mut client = daemon.client().await;
    result(&client.call("plugin.reload", json!(["timer"])).await.expect("rpc"));
    daemon.wait_for_log(&["plugin replaced; restarting the task on the new version", "worker=1"], 5 * SECOND).await;
    daemon.wait_for_log(&["worker 1: x is 3"], 5 * SECOND).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_task_is_restarted_with_backoff() {
    let daemon = Daemon::start(
        r#"
        [rpc]
        listen = "127.0.0.1:{PORT}"

        [[plugin]]
        name = "timer"
        path = "{timer}"
        # Without the sleep capability the task's first sleep fails.
        capabilities = ["log", "config"]

        [[exec]]
        name = "evrexec:timer"
        plugin = "timer"
        restart_min_ms = 20
        restart_max_ms = 80
        "#,
    )
    .await;
    let first = daemon.wait_for_log(&["task failed", "retry_ms=20"], 5 * SECOND).await;
    assert!(first.contains("not granted the `sleep` capability"), "{first}");
    assert!(first.contains("task=evrexec:timer") && first.contains("cause=guest-error"), "{first}");
    daemon.wait_for_log(&["task failed", "retry_ms=40"], 5 * SECOND).await;
    daemon.wait_for_log(&["task failed", "retry_ms=80"], 5 * SECOND).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_routes_get_data_and_source_and_rpc_reaches_routes_with_data() {
    let daemon = Daemon::start(
        r#"
        [rpc]
        listen = "127.0.0.1:{PORT}"

        [[plugin]]
        name = "xlog"
        path = "{xlog}"

        [[route]]
        name = "evrexec:udp"
        plugin = "xlog"

        [[route]]
        name = "evrexec:test"
        plugin = "xlog"

        [[exec]]
        name = "evrexec:udp"
        sockaddr = "udp:127.0.0.1:{UDP}"
        "#,
    )
    .await;
    let client = udp_client(daemon.udp_addr(0));
    client.send(b"hello evrexec").expect("send");
    let port = client.local_addr().expect("addr").port().to_string();
    let line = daemon.wait_for_log(&["udp socket data: [hello evrexec] from [127.0.0.1]:"], 5 * SECOND).await;
    assert!(line.ends_with("route=evrexec:udp") || line.contains(&format!("]:{port}")), "{line}");
    assert!(line.contains(&format!("]:{port}")), "the source port: {line}");

    // `evrhost rpc evrexec.run evrexec:test mydata` reaches the route.
    let out = evrhost(&["rpc", "-a", &daemon.addr.to_string(), "evrexec.run", "evrexec:test", "mydata"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    daemon.wait_for_log(&["rpc command data: mydata", "route=evrexec:test"], 5 * SECOND).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_replies_carry_any_bytes_up_to_the_largest_datagram() {
    let daemon = Daemon::start(
        r#"
        [rpc]
        listen = "127.0.0.1:{PORT}"

        [[plugin]]
        name = "echo"
        path = "{echo}"

        [[route]]
        name = "echo"
        plugin = "echo"

        [[exec]]
        name = "echo"
        sockaddr = "udp:127.0.0.1:{UDP}"
        workers = 2
        recv_buffer = 1048576

        [[exec]]
        name = "echo"
        sockaddr = "udp:::1:{UDP}"
        "#,
    )
    .await;
    let mut buf = vec![0u8; 70_000];
    for n in 0..2 {
        let client = udp_client(daemon.udp_addr(n));
        let garbage: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let largest = vec![b'x'; if n == 0 { 65_507 } else { 65_527 }];
        for payload in [b"ping".to_vec(), Vec::new(), garbage, largest] {
            client.send(&payload).expect("send");
            let len = client.recv(&mut buf).expect("a reply");
            assert_eq!(len, payload.len(), "socket {n}");
            assert_eq!(&buf[..len], &payload[..], "socket {n}");
        }
    }
    let mut rpc = daemon.client().await;
    let stats = rpc.call("plugin.stats", json!(["echo"])).await.expect("rpc");
    assert_eq!(result(&stats)["echo"]["calls"], json!(8), "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_udp_queue_drops_counts_and_warns() {
    let daemon = Daemon::start(
        r#"
        [rpc]
        listen = "127.0.0.1:{PORT}"

        [[plugin]]
        name = "hostile"
        path = "{hostile}"
        deadline_ms = 50
        fuel = 1000000000000
        max_instances = 1

        [[route]]
        name = "loop"
        plugin = "hostile"

        [[exec]]
        name = "loop"
        sockaddr = "udp:127.0.0.1:{UDP}"
        queue = 2
        "#,
    )
    .await;
    let client = udp_client(daemon.udp_addr(0));
    for i in 0..40 {
        client.send(format!("{i}").as_bytes()).expect("send");
    }
    daemon.wait_for_log(&["UDP queue full: datagrams dropped", "route=loop"], 10 * SECOND).await;
    let mut rpc = daemon.client().await;
    let scrape = || daemon.scrape();
    let value = metric;
    // The warning comes with the first dropped batch; the receiver may
    // still be reading the rest (it pauses between reads under load), and
    // the worker still failing the queued ones.
    let deadline = std::time::Instant::now() + 10 * SECOND;
    let (status, metrics) = loop {
        let (status, metrics) = scrape();
        let settled = value(&metrics, "evrhost_udp_failed_total{") + value(&metrics, "evrhost_udp_dropped_total{");
        if settled >= 40 || std::time::Instant::now() > deadline {
            break (status, metrics);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(status.contains("200"), "{status}");
    let (received, dropped) =
        (value(&metrics, "evrhost_udp_received_total{"), value(&metrics, "evrhost_udp_dropped_total{"));
    assert_eq!(received, 40, "{metrics}");
    assert_eq!(value(&metrics, "evrhost_udp_kernel_drops_total{"), 0, "all 40 reached evrhost\n{metrics}");
    // Each datagram's call fails at its deadline or the datagram is
    // dropped. How many of each depends on how the reads fall: a read's
    // datagrams may fail together in one batch before the route, known to
    // run long, goes one by one and to the worker and its queue of 2.
    let failed = value(&metrics, "evrhost_udp_failed_total{");
    assert_eq!(failed + dropped, 40, "every datagram failed or was dropped\n{metrics}");
    assert!(dropped >= 5, "1 worker, a queue of 2 and 50 ms calls: {dropped} dropped\n{metrics}");
    assert!(metrics.contains("evrhost_call_errors_total{plugin=\"hostile\",cause=\"deadline\"}"), "{metrics}");
    assert!(metrics.contains("evrhost_call_duration_seconds_bucket{plugin=\"hostile\",le=\"0.1\"}"), "{metrics}");
    result(&rpc.call("core.version", json!([])).await.expect("the daemon still answers"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_rpc_over_a_unix_socket() {
    let daemon = Daemon::start(
        r#"
        [rpc]
        listen = "127.0.0.1:{PORT}"
        unix = "{DIR}/rpc.sock"

        [[plugin]]
        name = "echo"
        path = "{echo}"

        [[route]]
        name = "evrexec:test"
        plugin = "echo"
        "#,
    )
    .await;
    let path = daemon.dir.path().join("rpc.sock");
    let mut stream = std::os::unix::net::UnixStream::connect(&path).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    // Two documents back to back, the second split across writes.
    stream
        .write_all(
            br#"{"jsonrpc":"2.0","method":"evrexec.run","params":["evrexec:test","u"],"id":1} {"jsonrpc":"2.0","#,
        )
        .expect("write");
    stream.write_all(br#""method":"evrexec.run","params":["nope"],"id":2}"#).expect("write");
    let mut lines = BufReader::new(stream.try_clone().expect("clone")).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().expect("line").expect("read")).expect("json");
    assert_eq!(first, json!({"jsonrpc": "2.0", "result": {}, "id": 1}));
    let second: serde_json::Value = serde_json::from_str(&lines.next().expect("line").expect("read")).expect("json");
    assert_eq!(second["error"]["message"], json!("Event route not found"));
    // Garbage: a parse error, then the connection ends.
    stream.write_all(b"}}garbage").expect("write");
    let third: serde_json::Value = serde_json::from_str(&lines.next().expect("line").expect("read")).expect("json");
    assert_eq!(third["error"]["code"], json!(-32700));
    assert!(lines.next().is_none(), "closed after a syntax error");

    // A second daemon on the same socket is refused and leaves it alone.
    let second = daemon.dir.path().join("second.toml");
    let config = daemon.config().replace(&daemon.addr.port().to_string(), &super::support::free_port().to_string());
    std::fs::write(&second, config).expect("write");
    let out = evrhost(&["run", "-c", second.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("another process serves on this socket"), "{}", text(&out.stderr));
    let mut again = std::os::unix::net::UnixStream::connect(&path).expect("the first daemon's socket is still there");
    again.write_all(br#"{"jsonrpc":"2.0","method":"core.version","id":3}"#).expect("write");
    let mut answer = String::new();
    BufReader::new(again).read_line(&mut answer).expect("read");
    assert!(answer.contains("evrhost"), "{answer}");

    // A document that arrives a byte at a time is answered once it is
    // whole, through the same fast path as HTTP's.
    let mut drip = std::os::unix::net::UnixStream::connect(&path).expect("connect");
    drip.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    for b in br#"{"jsonrpc":"2.0","method":"system.methodHelp","params":["core.uptime"],"id":"d{1}"}"# {
        drip.write_all(&[*b]).expect("write");
    }
    let mut answer = String::new();
    BufReader::new(drip.try_clone().expect("clone")).read_line(&mut answer).expect("read");
    let answer: serde_json::Value = serde_json::from_str(&answer).expect("json");
    assert_eq!(answer, json!({"jsonrpc": "2.0", "result": "— seconds since start", "id": "d{1}"}));
    // A top-level scalar cannot be framed: a parse error, then the end.
    drip.write_all(b" 42 ").expect("write");
    let mut lines = BufReader::new(drip).lines();
    let error: serde_json::Value = serde_json::from_str(&lines.next().expect("line").expect("read")).expect("json");
    assert_eq!(error["error"]["code"], json!(-32700), "{error}");
    assert!(lines.next().is_none(), "closed after it");
}

/// A real SIP client: SIPp sends OPTIONS, the plugin answers 200 OK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sipp_gets_200_ok_to_options() {
    let sipp = std::process::Command::new("sipp").arg("-v").output();
    assert!(sipp.is_ok(), "sipp is not installed: apt-get install sip-tester (.ci/run does)");
    let daemon = Daemon::start(
        r#"
        [rpc]
        listen = "127.0.0.1:{PORT}"

        [[plugin]]
        name = "sipoptions"
        path = "{sipoptions}"

        [[route]]
        name = "sip"
        plugin = "sipoptions"

        [[exec]]
        name = "sip"
        sockaddr = "udp:127.0.0.1:{UDP}"
        "#,
    )
    .await;
    let target = daemon.udp_addr(0).to_string();
    let scenario = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/sipp/options.xml");
    let local_port = super::support::free_udp_port().to_string();
    let out = std::process::Command::new("sipp")
        .args(["-sf", scenario, &target, "-m", "50", "-r", "200", "-l", "10"])
        .args(["-i", "127.0.0.1", "-p", &local_port, "-s", "evrhost", "-nostdin", "-timeout", "30s", "-timeout_error"])
        .current_dir(daemon.dir.path())
        .output()
        .expect("run sipp");
    assert!(out.status.success(), "sipp failed ({}):\n{}\n{}", out.status, text(&out.stdout), text(&out.stderr));
    let mut rpc = daemon.client().await;
    let stats = rpc.call("plugin.stats", json!(["sipoptions"])).await.expect("rpc");
    let calls = result(&stats)["sipoptions"]["calls"].as_u64().unwrap_or(0);
    assert!(calls >= 50, "{stats}");
}
