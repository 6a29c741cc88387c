//! The UDP receiver runs bursts itself: a burst that fills every read
//! (a multiple of its 32-datagram batch, all at once, four reads' worth)
//! is no backlog.

use std::time::{Duration, Instant};

use evrhost::config::Config;
use evrhost::frontend::udp;
use evrhost::harness::{with_plugin_paths, TestHost};

const CONFIG: &str = "[[plugin]]\nname = \"evcount\"\npath = \"{evcount}\"\nmax_instances = 2\n\
                      [[route]]\nname = \"count\"\nplugin = \"evcount\"\n";

/// 128 datagrams of 63 bytes in two UDP GSO sends (64 each, the most
/// one may carry), which the kernel cuts and queues together: they are
/// all waiting when the receiver reads.
fn burst(socket: &std::net::UdpSocket) -> std::io::Result<usize> {
    let datagram: &[u8; 63] = b"ev=reg;user=u0000001;dom=example.org;seq=00000001;ts=1700000000";
    let (a, b) = (socket.send(&datagram.repeat(64))?, socket.send(&datagram.repeat(64))?);
    Ok((a + b) / datagram.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_that_fill_every_read_are_run_by_the_receiver_not_handed_to_the_workers() {
    let host = TestHost::start(CONFIG).await.expect("the host starts");
    let text = format!(
        "{CONFIG}[[exec]]\nname = \"count\"\nsockaddr = \"udp:127.0.0.1:0\"\nworkers = 2\nrecv_buffer = 4194304\n"
    );
    let config = Config::parse(&with_plugin_paths(&text), "(test)", std::path::Path::new(".")).expect("config");
    let def = &config.udp[0];
    let socket = udp::bind(def).expect("bind");
    let (endpoint, tasks) = udp::start(def, socket, host.dispatcher.clone()).expect("the receiver starts");

    let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    sender.connect(endpoint.addr).expect("connect");
    nix::sys::socket::setsockopt(&sender, nix::sys::socket::sockopt::UdpGsoSegment, &63).expect("UDP GSO");
    let bursts = 20;
    for _ in 0..bursts {
        assert_eq!(burst(&sender).expect("sent"), 128);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sent = bursts * 128;
    let started = Instant::now();
    while endpoint.stats.received.load(std::sync::atomic::Ordering::Relaxed) < sent as u64 {
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", endpoint.stats);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let handled_here = endpoint.stats.inline.load(std::sync::atomic::Ordering::Relaxed);
    // Before, full reads counted as a backlog across bursts: from the
    // second burst on nearly every datagram went to the workers (96 of
    // 1280 ran here). Then four full reads in a row did: a quarter of
    // each burst.
    assert!(handled_here >= sent as u64 * 7 / 8, "{handled_here} of {sent} run on the receiver thread");
    for task in tasks {
        task.abort();
    }
    let counted = host.dispatcher.run_command("evcount.get", "rx", 0).await.expect("evcount.get");
    assert_eq!(counted, sent.to_string(), "every datagram counted");
}
