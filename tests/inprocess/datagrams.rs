//! The datagrams export: a UDP read packed in one call, each datagram with
//! its own source, with the results one call each would give.

use evrhost::bus::log_layer::BusLayer;
use evrhost::dispatcher::{DispatchError, RouteOutcome};
use evrhost::harness::TestHost;
use evrhost::runtime::{Origin, Packed, Peer, Request};

/// `datagrams` of `route`, each with the index of its source in `peers`.
fn packed(route: &str, datagrams: &[(&str, u16)], peers: &[(&str, u16)]) -> Packed {
    let mut packed =
        Packed { route: route.into(), data: Vec::new(), ends: Vec::new(), peers: Vec::new(), sources: Vec::new() };
    for (data, source) in datagrams {
        packed.data.extend_from_slice(data.as_bytes());
        packed.ends.push(packed.data.len() as u32);
        packed.sources.push(*source);
    }
    packed.peers = peers.iter().map(|(ip, port)| Peer { ip: ip.to_string(), port: *port }).collect();
    packed
}

fn kinds(results: &[Result<RouteOutcome, DispatchError>]) -> Vec<String> {
    let kind = |r: &Result<_, DispatchError>| match r {
        Ok(_) => "ok".to_string(),
        Err(DispatchError::Call(e)) => e.cause.kind().to_string(),
        Err(e) => format!("not a call error: {e}"),
    };
    results.iter().map(kind).collect()
}

#[tokio::test(flavor = "current_thread")]
async fn a_packed_read_reaches_the_plugin_with_each_datagram_from_its_own_source() {
    use tracing_subscriber::prelude::*;
    let config = "[[plugin]]\nname = \"xlog\"\npath = \"{xlog}\"\n[[route]]\nname = \"udp\"\nplugin = \"xlog\"\n";
    let host = TestHost::start(config).await.expect("the host starts");
    let _guard = tracing_subscriber::registry().with(BusLayer::new(host.ctx.logs.clone())).set_default();
    let (_tap, mut records) = host.ctx.logs.tap(tracing::Level::INFO);
    let d = &host.dispatcher;
    assert!(d.takes_datagrams("udp"), "a Rust route plugin exports datagrams");
    let read = packed("udp", &[("a", 0), ("bb", 1), ("ccc", 0)], &[("10.0.0.1", 5060), ("::1", 7)]);
    let results = d.run_datagrams_unsaved(&read).await;
    assert_eq!(kinds(&results), ["ok"; 3]);
    let mut lines = Vec::new();
    while let Ok(record) = records.try_recv() {
        lines.push(record.text);
    }
    let want = [
        "udp socket data: [a] from [10.0.0.1]:5060 plugin=xlog tenant=default route=udp",
        "udp socket data: [bb] from [::1]:7 plugin=xlog tenant=default route=udp",
        "udp socket data: [ccc] from [10.0.0.1]:5060 plugin=xlog tenant=default route=udp",
    ];
    assert_eq!(lines, want, "in order, each from its source");
    let stats = d.plugins().into_iter().find(|p| p.name == "xlog").expect("xlog").stats;
    assert_eq!(stats.calls, 3, "a packed read counts as its datagrams: {stats:?}");
}

#[tokio::test]
async fn a_packed_read_counts_as_the_same_datagrams_one_call_each() {
    let config = "[[plugin]]\nname = \"evcount\"\npath = \"{evcount}\"\n\
                  [[route]]\nname = \"count\"\nplugin = \"evcount\"\n";
    let host = TestHost::start(config).await.expect("the host starts");
    let d = &host.dispatcher;
    let data = ["ev=reg;user=a", "user=c", "=ev=opt;user=f", "ev=bye=x;user=g", "xev=inv;user=h", ""];
    let read = packed("count", &data.map(|d| (d, 0)), &[("127.0.0.1", 9)]);
    assert_eq!(kinds(&d.run_datagrams_unsaved(&read).await), ["ok"; 6]);
    for data in data {
        let request = Request { route: "count".into(), data: data.into(), params: Vec::new(), origin: Origin::Cli };
        d.run_route(&request).await.expect("one call");
    }
    for (key, want) in [("rx", "6"), ("bad", "6"), ("ev::reg", "2"), ("ev::opt", "2"), ("ev::bye=x", "2")] {
        assert_eq!(d.run_command("evcount.get", key, 0).await.expect("evcount.get"), want, "{key}");
    }
}

#[tokio::test]
async fn a_read_of_a_route_that_ran_long_is_called_datagram_by_datagram() {
    let config = "[[plugin]]\nname = \"hostile\"\npath = \"{hostile}\"\nmax_instances = 1\ndeadline_ms = 200\n\
                  [[route]]\nname = \"spin\"\nplugin = \"hostile\"\n";
    let host = TestHost::start(config).await.expect("the host starts");
    let d = &host.dispatcher;
    assert!(d.takes_datagrams("spin"));
    let slow = Request { route: "spin".into(), data: b"5".to_vec(), params: Vec::new(), origin: Origin::Cli };
    d.run_route(&slow).await.expect("a slow call");
    assert!(!d.takes_datagrams("spin"), "its next calls go one by one, on the slow lane");
    // One by one, each with its own 200 ms deadline: a packed call of
    // them (one deadline for 450 ms of work) would fail.
    let started = std::time::Instant::now();
    let read = packed("spin", &[("150", 0), ("150", 0), ("150", 0)], &[("127.0.0.1", 9)]);
    assert_eq!(kinds(&d.run_datagrams_unsaved(&read).await), ["ok"; 3]);
    // The guest spins by the wall clock, which NTP may be slewing.
    assert!(started.elapsed() >= std::time::Duration::from_millis(430), "{:?}", started.elapsed());
}
