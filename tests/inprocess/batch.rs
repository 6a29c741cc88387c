//! The batch export: a read's requests in one call, with the same results
//! as one call each, and failing together.

use std::time::Duration;

use evrhost::dispatcher::DispatchError;
use evrhost::harness::TestHost;
use evrhost::runtime::{Origin, Request};

fn requests(route: &str, data: &[&str]) -> Vec<Request> {
    let request = |d: &&str| Request {
        route: route.into(),
        data: d.as_bytes().to_vec(),
        params: Vec::new(),
        origin: Origin::Cli,
    };
    data.iter().map(request).collect()
}

/// The cause kind of each failed result, "ok" for each reply.
fn kinds(results: &[Result<evrhost::dispatcher::RouteOutcome, DispatchError>]) -> Vec<String> {
    let kind = |r: &Result<_, DispatchError>| match r {
        Ok(_) => "ok".to_string(),
        Err(DispatchError::Call(e)) => e.cause.kind().to_string(),
        Err(e) => format!("not a call error: {e}"),
    };
    results.iter().map(kind).collect()
}

#[tokio::test]
async fn a_batch_counts_as_its_requests_and_ends_as_one_call_each_would() {
    let config = "[[plugin]]\nname = \"evcount\"\npath = \"{evcount}\"\n\
                  [[route]]\nname = \"count\"\nplugin = \"evcount\"\n";
    let host = TestHost::start(config).await.expect("the host starts");
    let d = &host.dispatcher;
    assert!(d.takes_batches("count"), "a Rust route plugin exports batch");
    // As handler.lua's gmatch("([^;=]+)=([^;]*)") reads them: a pair may
    // start past a stray `=`, a value may hold `=`, a key is whole.
    let data = [
        "ev=reg;user=a;seq=1",
        "ev=inv;user=b",
        "user=c",
        "ev=reg;user=d",
        "ev=;user=e",
        "=ev=opt;user=f",
        "ev=bye=x;user=g",
        "xev=inv;user=h",
    ];
    let batch = d.run_batch_unsaved("count", &requests("count", &data)).await;
    assert_eq!(kinds(&batch), ["ok"; 8]);
    assert!(batch.iter().flatten().all(|o| o.reply.handled && &*o.plugin == "evcount"));
    // The same datagrams one call each: every counter exactly doubles.
    for request in requests("count", &data) {
        d.run_route(&request).await.expect("one call");
    }
    let counts = [("rx", "10"), ("bad", "6"), ("ev::reg", "4"), ("ev::inv", "2"), ("ev::opt", "2"), ("ev::bye=x", "2")];
    for (key, want) in counts {
        assert_eq!(d.run_command("evcount.get", key, 0).await.expect("evcount.get"), want, "{key}");
    }
    let stats = d.plugins().into_iter().find(|p| p.name == "evcount").expect("evcount").stats;
    // 8 in the batch, 8 one by one, the 6 commands, and the listing of
    // its commands at load.
    assert_eq!(stats.calls, 23, "{stats:?}");
}

const HOSTILE: &str = "[[plugin]]\nname = \"hostile\"\npath = \"{hostile}\"\nmax_instances = 1\ndeadline_ms = 200\n\
                       [[route]]\nname = \"panicon\"\nplugin = \"hostile\"\n\
                       [[route]]\nname = \"shortbatch\"\nplugin = \"hostile\"\n\
                       [[route]]\nname = \"spin\"\nplugin = \"hostile\"\n";

#[tokio::test]
async fn a_trap_in_a_batch_fails_each_of_its_requests_and_the_next_batch_runs() {
    let host = TestHost::start(HOSTILE).await.expect("the host starts");
    let d = &host.dispatcher;
    let results = d.run_batch_unsaved("panicon", &requests("panicon", &["a", "panic", "c"])).await;
    assert_eq!(kinds(&results), ["panic"; 3]);
    let Err(DispatchError::Call(e)) = &results[2] else { unreachable!("checked above") };
    assert!(e.to_string().contains("plugin `hostile`, route `panicon`: panic: hostile plugin panics"), "{e}");
    let results = d.run_batch_unsaved("panicon", &requests("panicon", &["a", "b"])).await;
    assert_eq!(kinds(&results), ["ok"; 2], "a fresh instance serves the next batch");
    let retvals: Vec<_> = results.iter().flatten().map(|o| o.reply.retval.as_str()).collect();
    assert_eq!(retvals, ["a", "b"], "in order");
    let stats = d.plugins().into_iter().find(|p| p.name == "hostile").expect("hostile").stats;
    assert_eq!((stats.calls, stats.errors.get("panic"), stats.discarded), (5, Some(&3), 1), "{stats:?}");
}

#[tokio::test]
async fn a_batch_answered_with_the_wrong_number_of_results_fails_and_says_so() {
    let host = TestHost::start(HOSTILE).await.expect("the host starts");
    let d = &host.dispatcher;
    let results = d.run_batch_unsaved("shortbatch", &requests("shortbatch", &["a", "b", "c"])).await;
    assert_eq!(kinds(&results), ["guest-error"; 3]);
    let Err(DispatchError::Call(e)) = &results[0] else { unreachable!("checked above") };
    assert!(e.to_string().contains("handle-batch returned 2 results for 3 requests"), "{e}");
    // Not a trap: the instance is kept, and one request alone is one call.
    let one = d.run_batch_unsaved("shortbatch", &requests("shortbatch", &["alone"])).await;
    assert_eq!(kinds(&one), ["ok"]);
    let stats = d.plugins().into_iter().find(|p| p.name == "hostile").expect("hostile").stats;
    assert_eq!(stats.discarded, 0, "{stats:?}");
}

#[tokio::test]
async fn a_route_that_ran_long_is_called_request_by_request() {
    let host = TestHost::start(HOSTILE).await.expect("the host starts");
    let d = &host.dispatcher;
    assert!(d.takes_batches("spin"));
    // 5 ms of guest time in one call: long (over the lanes' 1 ms).
    d.run_route(&requests("spin", &["5"])[0]).await.expect("a slow call");
    assert!(!d.takes_batches("spin"), "its next calls go one by one, on the slow lane");
    assert!(d.takes_batches("panicon"), "the plugin's other routes still take batches");
    // One by one, each with its own deadline: three calls of 150 ms pass
    // where a batch of them (one call's 200 ms) would not.
    let started = std::time::Instant::now();
    let results = d.run_batch_unsaved("spin", &requests("spin", &["150", "150", "150"])).await;
    assert_eq!(kinds(&results), ["ok"; 3]);
    // The guest spins by the wall clock, which NTP may be slewing (0.5 %
    // fast was seen): a margin, not 450 ms exactly.
    assert!(started.elapsed() >= Duration::from_millis(430), "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_datagrams_is_answered_each_to_its_source_in_order() {
    use evrhost::config::UdpDef;
    use evrhost::frontend::udp;
    use std::sync::atomic::Ordering::Relaxed;

    let config = "[[plugin]]\nname = \"echo\"\npath = \"{echo}\"\n[[route]]\nname = \"echo\"\nplugin = \"echo\"\n";
    let host = TestHost::start(config).await.expect("the host starts");
    assert!(host.dispatcher.takes_batches("echo"));
    let def = UdpDef {
        route: "echo".into(),
        addr: "127.0.0.1:0".parse().expect("addr"),
        workers: 1,
        queue: 1024,
        recv_buffer: Some(1 << 20),
        reply: true,
        profiling: false,
        coalesce: Duration::from_micros(100),
    };
    let socket = udp::bind(&def).expect("bind");
    let (endpoint, tasks) = udp::start(&def, socket, host.dispatcher.clone()).expect("start");
    // More peers than the UDP handler keeps formatted (8): its list of
    // them starts over while the burst comes in.
    let clients: Vec<_> = (0..12)
        .map(|_| {
            let c = std::net::UdpSocket::bind("127.0.0.1:0").expect("client");
            c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
            c
        })
        .collect();
    // Interleaved, back to back: reads of many datagrams from 12 peers.
    for i in 0..40 {
        for (c, client) in clients.iter().enumerate() {
            client.send_to(format!("{c}-{i}").as_bytes(), endpoint.addr).expect("send");
        }
    }
    let mut buffer = [0u8; 64];
    for (c, client) in clients.iter().enumerate() {
        for i in 0..40 {
            let (n, from) = client.recv_from(&mut buffer).expect("a reply for each datagram");
            assert_eq!(
                (std::str::from_utf8(&buffer[..n]).expect("utf-8"), from),
                (&*format!("{c}-{i}"), endpoint.addr)
            );
        }
    }
    let stats = &endpoint.stats;
    // A reply is counted just after it is sent: the last may arrive first.
    let counted = std::time::Instant::now() + Duration::from_secs(1);
    while stats.replies.load(Relaxed) < 480 && std::time::Instant::now() < counted {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!((stats.received.load(Relaxed), stats.replies.load(Relaxed), stats.failed.load(Relaxed)), (480, 480, 0));
    for task in tasks {
        task.abort();
    }
}

#[tokio::test]
async fn a_batch_has_the_per_call_fuel_for_each_of_its_requests() {
    // About 2,000 units a datagram: 32 of them need more than one call's
    // 20,000, and less than 32 calls' worth.
    let config = "[[plugin]]\nname = \"evcount\"\npath = \"{evcount}\"\nfuel = 20000\n\
                  [[route]]\nname = \"count\"\nplugin = \"evcount\"\n";
    let host = TestHost::start(config).await.expect("the host starts");
    let d = &host.dispatcher;
    let data: Vec<String> = (0..32).map(|i| format!("ev=reg;user=u{i};seq={i};dom=example.org")).collect();
    let data: Vec<&str> = data.iter().map(String::as_str).collect();
    let batch = d.run_batch_unsaved("count", &requests("count", &data)).await;
    assert_eq!(kinds(&batch), ["ok"; 32]);
    let stats = d.plugins().into_iter().find(|p| p.name == "evcount").expect("evcount").stats;
    assert!(stats.fuel > 20_000, "the batch used more than one call's fuel: {stats:?}");
    assert_eq!(d.run_command("evcount.get", "rx", 0).await.expect("evcount.get"), "32");
}

#[tokio::test]
async fn a_batch_out_of_fuel_names_the_fuel_it_was_given() {
    let config = "[[plugin]]\nname = \"hostile\"\npath = \"{hostile}\"\nfuel = 1000000\ndeadline_ms = 5000\n\
                  [[route]]\nname = \"loop\"\nplugin = \"hostile\"\n";
    let host = TestHost::start(config).await.expect("the host starts");
    let results = host.dispatcher.run_batch_unsaved("loop", &requests("loop", &["a", "b"])).await;
    assert_eq!(kinds(&results), ["fuel"; 2]);
    let Err(DispatchError::Call(e)) = &results[0] else { unreachable!("checked above") };
    assert!(e.to_string().contains("out of fuel (2000000 units)"), "{e}");
}
