//! Events that queue up for a subscriber leave together: in one call of a
//! plugin's `subscriber-batch`, in one sendmmsg to a UDP subscriber; each
//! is counted, in order, and one that cannot go fails alone.

use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};

use evrhost::bus::{Caller, SubscriberInfo};
use evrhost::config::EventSocket;
use evrhost::frontend::event_sinks::EventSinks;
use evrhost::harness::TestHost;
use evrhost::runtime::{Event, Origin, Request};

fn custom(subclass: &str, n: usize, padding: usize) -> Event {
    Event {
        name: "CUSTOM".into(),
        subclass: Some(subclass.into()),
        headers: vec![("N".into(), n.to_string()), ("Padding".into(), "p".repeat(padding))],
        body: None,
    }
}

/// The subscriber `target` once it has handled `want` events (delivered or
/// failed), or as it is after 10 s.
async fn settled(host: &TestHost, target: &str, want: u64) -> SubscriberInfo {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sub = host.dispatcher.bus().list().into_iter().find(|s| s.target == target).expect("subscribed");
        if sub.delivered + sub.failed >= want || Instant::now() > deadline {
            return sub;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn queued_events_reach_a_plugin_in_batches_each_counted_once_in_order() {
    use tracing_subscriber::prelude::*;
    let config = "[[plugin]]\nname = \"listener\"\npath = \"{listener}\"\n[plugin.config]\nid = \"l\"\n\
                  [[route]]\nname = \"l.subscribe\"\nplugin = \"listener\"\n";
    let host = TestHost::start(config).await.expect("the host starts");
    let _guard = tracing_subscriber::registry()
        .with(evrhost::bus::log_layer::BusLayer::new(host.ctx.logs.clone()))
        .set_default();
    let (_tap, mut lines) = host.ctx.logs.tap(tracing::Level::INFO);
    let d = &host.dispatcher;
    let subscribe =
        Request { route: "l.subscribe".into(), data: b"CUSTOM batch".to_vec(), params: vec![], origin: Origin::Cli };
    d.run_route(&subscribe).await.expect("subscribed");

    // Fired without a yield between: they all wait in the queue.
    for n in 0..300 {
        d.bus().fire(custom("batch", n, 0), Caller::host("test"));
    }
    let sub = settled(&host, "plugin:listener", 300).await;
    assert_eq!((sub.delivered, sub.failed, sub.overflow), (300, 0, 0), "{sub:?}");
    assert_eq!(d.run_command("l.count", "CUSTOM:batch", 0).await.expect("l.count"), "300");
    let last = d.run_command("l.last", "CUSTOM:batch", 0).await.expect("l.last");
    assert!(last.lines().any(|l| l == "N=299"), "the last one fired is the last one seen: {last}");

    // The listener logs once per call: "l got CUSTOM:batch" or "… xN".
    let mut calls = Vec::new();
    while let Ok(record) = lines.try_recv() {
        if let Some(rest) = record.text.strip_prefix("l got CUSTOM:batch") {
            // The record's text goes on with the plugin's fields.
            let count = rest.split_whitespace().next().and_then(|w| w.strip_prefix('x'));
            calls.push(count.map_or(1, |n| n.parse::<u64>().unwrap_or_else(|_| panic!("a count: {:?}", record.text))));
        }
    }
    assert_eq!(calls.iter().sum::<u64>(), 300, "{calls:?}");
    assert!(calls.len() < 300 && calls.iter().all(|&n| n <= 64), "batches of at most 64: {calls:?}");
    let stats = d.plugins().into_iter().find(|p| p.name == "listener").expect("listener").stats;
    assert_eq!(stats.errors.values().sum::<u64>(), 0, "{stats:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn queued_events_reach_a_udp_subscriber_in_order_and_one_too_big_fails_alone() {
    let host = TestHost::start("").await.expect("the host starts");
    let receiver = UdpSocket::bind("127.0.0.1:0").expect("bind");
    receiver.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
    let _ = socket2::SockRef::from(&receiver).set_recv_buffer_size(8 << 20);
    let socket = EventSocket::Udp(receiver.local_addr().expect("addr"));
    Arc::new(EventSinks::default())
        .subscribe(host.dispatcher.bus(), &socket, "CUSTOM", Some("udp"), None)
        .expect("subscribed");

    // 200 in a row, the 100th too big for a datagram.
    for n in 0..200 {
        let padding = if n == 100 { 70_000 } else { 0 };
        host.dispatcher.bus().fire(custom("udp", n, padding), Caller::host("test"));
    }
    let sub = settled(&host, &socket.id(), 200).await;
    assert_eq!((sub.delivered, sub.failed, sub.overflow), (199, 1, 0), "{sub:?}");

    let received = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; 65536];
        let mut seen = Vec::new();
        while let Ok(len) = receiver.recv(&mut buf) {
            let doc: serde_json::Value = serde_json::from_slice(&buf[..len]).expect("a JSON-RPC notification");
            seen.push(doc["params"]["N"].as_str().and_then(|n| n.parse::<usize>().ok()).expect("N"));
        }
        seen
    })
    .await
    .expect("the reader");
    let want: Vec<usize> = (0..200).filter(|&n| n != 100).collect();
    assert_eq!(received, want, "every event but the too big one, in order");
}
