//! The hostile fixtures are stopped within their limits and named with
//! their cause, while other plugins keep answering.

use std::time::{Duration, Instant};

use serde_json::json;

use super::support::{error, evrhost, plugin, result, text, Daemon};

/// `evrhost call` on one fixture: (exit code, stdout).
fn call(route: &str, extra: &[&str]) -> (i32, String) {
    let path = plugin("hostile");
    let mut args = vec!["call", path.to_str().expect("utf-8 path"), route, "--deadline-ms", "100", "--memory-mb", "16"];
    args.extend_from_slice(extra);
    let out = evrhost(&args);
    (out.status.code().unwrap_or(-1), text(&out.stdout))
}

fn reported_time(stdout: &str) -> Duration {
    let line = stdout.lines().find(|l| l.starts_with("time:")).expect("a time: line");
    let us: u64 = line.trim_start_matches("time:").trim().trim_end_matches("µs").trim().parse().expect("µs");
    Duration::from_micros(us)
}

#[test]
fn each_fixture_reports_its_cause() {
    let cases: [(&str, &[&str], &str, &str); 7] = [
        ("loop", &["--fuel", "1000000000000"], "deadline", "deadline of 100 ms exceeded"),
        ("loop", &["--fuel", "1000000"], "fuel", "out of fuel (1000000 units)"),
        ("bomb", &[], "memory", "memory cap of 16384 KiB exceeded"),
        ("recurse", &[], "stack", "stack overflow"),
        ("panic", &[], "panic", "panic: hostile plugin panics on purpose (at "),
        ("bigreply", &[], "reply-size", "reply of 8388608 bytes exceeds the cap of 1048576"),
        ("fail", &[], "guest-error", "handler error: hostile plugin refuses"),
    ];
    for (route, extra, kind, message) in cases {
        let (code, stdout) = call(route, extra);
        assert_eq!(code, 1, "{route}: {stdout}");
        assert!(stdout.contains(&format!("plugin `hostile`, route `{route}`: {message}")), "{route}: {stdout}");
        assert!(stdout.contains(&format!("cause:   {kind}")), "{route}: {stdout}");
    }
}

#[test]
fn an_endless_loop_is_stopped_at_its_deadline() {
    let (code, stdout) = call("loop", &["--fuel", "1000000000000"]);
    assert_eq!(code, 1, "{stdout}");
    let took = reported_time(&stdout);
    // Epoch ticks are 1 ms: the trap comes at the deadline, not long after.
    assert!(took >= Duration::from_millis(95), "stopped early: {took:?}");
    assert!(took <= Duration::from_millis(100 + 30), "stopped late: {took:?}");
}

#[test]
fn a_log_flood_is_cut_to_the_budget_and_stopped() {
    let path = plugin("hostile");
    let out = evrhost(&["call", path.to_str().expect("utf-8"), "logflood", "--deadline-ms", "100"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("cause:   deadline"), "{stdout}");
    let lines = stderr.lines().filter(|l| l.contains("xxxxxxxx")).count();
    assert_eq!(lines, 100, "the per-call budget is 100 lines");
    assert!(stderr.lines().filter(|l| l.contains("xxxxxxxx")).all(|l| l.len() < 4096 + 300), "lines are cut");
    assert!(stderr.contains("log lines over the per-call budget were dropped"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_serves_on_while_a_plugin_misbehaves() {
    let mut config = String::from(
        r#"
        [rpc]
        listen = "127.0.0.1:{PORT}"

        [[plugin]]
        name = "echo"
        path = "{echo}"

        [[plugin]]
        name = "hostile"
        path = "{hostile}"
        deadline_ms = 100
        # Enough fuel that the endless loop meets its deadline first.
        fuel = 1000000000000
        memory_mb = 16
        max_instances = 2

        [[route]]
        name = "echo"
        plugin = "echo"
        "#,
    );
    for route in ["loop", "bomb", "recurse", "panic", "bigreply", "ok"] {
        config.push_str(&format!("[[route]]\nname = \"{route}\"\nplugin = \"hostile\"\n"));
    }
    let mut daemon = Daemon::start(&config).await;

    // Echo answers continuously while the fixtures run beside it.
    let echo = {
        let mut client = daemon.client().await;
        tokio::spawn(async move {
            let mut answered = 0;
            let started = Instant::now();
            while started.elapsed() < Duration::from_millis(1500) {
                let r = client.call("route.run", json!(["echo", format!("ping {answered}")])).await.expect("echo rpc");
                assert_eq!(result(&r)["data"], json!(format!("ping {answered}")), "{r}");
                answered += 1;
            }
            answered
        })
    };
    let mut client = daemon.client().await;
    let expected = [
        ("loop", "deadline of 100 ms exceeded"),
        ("bomb", "memory cap of 16384 KiB exceeded"),
        ("recurse", "stack overflow"),
        ("panic", "panic: hostile plugin panics on purpose"),
        ("bigreply", "reply of 8388608 bytes exceeds the cap"),
    ];
    for _ in 0..2 {
        for (route, message) in expected {
            let r = client.call("evrexec.run", json!([route])).await.expect("rpc");
            let (code, text) = error(&r);
            assert_eq!(code, 500);
            assert!(text.contains(&format!("plugin `hostile`, route `{route}`: {message}")), "{route}: {text}");
        }
    }
    // A fresh instance serves the plugin's next call.
    let r = client.call("route.run", json!(["ok"])).await.expect("rpc");
    assert_eq!(result(&r)["retval"], json!("ok"));

    let answered = echo.await.expect("echo task");
    assert!(answered > 50, "echo answered only {answered} calls");
    assert!(daemon.is_running());

    let stats = client.call("plugin.stats", json!(["hostile"])).await.expect("rpc");
    let errors = &result(&stats)["hostile"]["errors"];
    for kind in ["deadline", "memory", "stack", "panic"] {
        assert_eq!(errors[kind], json!(2), "{kind}: {stats}");
    }
    assert_eq!(errors["reply-size"], json!(2), "{stats}");
    // Each poisoning failure discarded its instance: 4 kinds × 2.
    assert!(result(&stats)["hostile"]["discarded"].as_u64().unwrap_or(0) >= 8, "{stats}");

    let log = daemon.log();
    assert!(
        log.lines().any(|l| l.contains("deadline of 100 ms exceeded")
            && l.contains("plugin=hostile")
            && l.contains("route=loop")
            && l.contains("instance discarded")),
        "the log names plugin, route and cause:\n{log}"
    );
}
