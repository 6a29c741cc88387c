//! The JSON-RPC round trip of the running daemon against a minimal hyper
//! server in this process, with three clients.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use evrhost::frontend::client::RpcClient;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;

use crate::common::{fmt_ns, quantile, rpc_request, RawClient};
use crate::Row;

const RPC_WARMUP: usize = 2_000;
const RPC_CALLS: usize = 20_000;
const RPC_BLOCK: usize = 1_000;
const NULL_REPLY: &[u8] = br#"{"jsonrpc":"2.0","result":{},"id":1}"#;

/// A hyper HTTP/1.1 server answering every request with NULL_REPLY.
fn start_null_http(rt: &tokio::runtime::Runtime) -> anyhow::Result<SocketAddr> {
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    rt.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    let mut resp = hyper::Response::new(Full::new(Bytes::from_static(NULL_REPLY)));
                    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// One sequence of timed round trips: a call answering whether it got a
/// JSON-RPC result, and what it measured.
struct Series<'a> {
    call: Box<dyn FnMut() -> anyhow::Result<bool> + 'a>,
    /// ns, sorted once all ran.
    times: Vec<f64>,
    errors: u64,
}

impl<'a> Series<'a> {
    fn new(call: impl FnMut() -> anyhow::Result<bool> + 'a) -> Series<'a> {
        Series { call: Box::new(call), times: Vec::with_capacity(RPC_CALLS), errors: 0 }
    }

    fn raw(addr: SocketAddr, method: &str, busy_poll: bool) -> anyhow::Result<Series<'a>> {
        let mut client = RawClient::connect(addr, busy_poll)?;
        let request = rpc_request(addr, method, r#"["evrexec:test","mydata"]"#);
        Ok(Series::new(move || client.round_trip(&request)))
    }

    fn hyper(rt: &'a tokio::runtime::Runtime, addr: SocketAddr) -> anyhow::Result<Series<'a>> {
        let mut client = rt.block_on(RpcClient::connect(addr, None))?;
        let params = json!(["evrexec:test", "mydata"]);
        Ok(Series::new(move || {
            let doc = rt.block_on(client.call("evrexec.run", params.clone()))?;
            Ok(doc.get("result").is_some())
        }))
    }

    fn q(&self, p: f64) -> f64 {
        quantile(&self.times, p)
    }
}

/// Runs every series' calls in blocks of RPC_BLOCK, taking the series in
/// turn (the first of a round rotating), so a noisy moment hits them alike;
/// each series' first RPC_WARMUP calls are not kept.
fn interleave(series: &mut [Series]) {
    let blocks = (RPC_WARMUP + RPC_CALLS) / RPC_BLOCK;
    let n = series.len();
    for block in 0..blocks {
        for k in 0..n {
            let s = &mut series[(block + k) % n];
            for _ in 0..RPC_BLOCK {
                let start = Instant::now();
                let ok = (s.call)();
                let ns = start.elapsed().as_nanos() as f64;
                if !matches!(ok, Ok(true)) {
                    s.errors += 1;
                }
                if block * RPC_BLOCK >= RPC_WARMUP {
                    s.times.push(ns);
                }
            }
        }
    }
    for s in series {
        s.times.sort_by(f64::total_cmp);
    }
}

/// 20,000 sequential `evrexec.run` calls of echo against the daemon at
/// `evr` and the null server, blocks taken in turn, by three clients.
pub fn round_trips(
    rt: &tokio::runtime::Runtime,
    server_rt: &tokio::runtime::Runtime,
    evr: SocketAddr,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> anyhow::Result<()> {
    let null_http = start_null_http(server_rt)?;
    // core.version shows what the transport and JSON cost without a
    // plugin call.
    let mut series = vec![
        Series::raw(evr, "evrexec.run", true)?,
        Series::raw(null_http, "evrexec.run", true)?,
        Series::raw(evr, "core.version", true)?,
        Series::raw(evr, "evrexec.run", false)?,
        Series::raw(null_http, "evrexec.run", false)?,
        Series::hyper(rt, evr)?,
        Series::hyper(rt, null_http)?,
    ];
    interleave(&mut series);
    let [poll_evr, poll_null, poll_version, block_evr, block_null, hyper_evr, hyper_null] = &series[..] else {
        unreachable!("seven series were made")
    };
    let row = |case: &str, e: &Series, b: &Series, p: f64, target, pass| Row {
        case: case.to_string(),
        evrhost: fmt_ns(e.q(p)),
        baseline: fmt_ns(b.q(p)),
        ratio: e.q(p) / b.q(p),
        target,
        pass,
    };
    let errors: u64 = series.iter().map(|s| s.errors).sum();
    rows.push(row(
        "RPC evrexec.run p50, busy-poll client",
        poll_evr,
        poll_null,
        0.5,
        "p50 ≤ 30 µs",
        Some(errors == 0 && poll_evr.q(0.5) <= 30_000.0),
    ));
    rows.push(row("RPC evrexec.run p99, busy-poll client", poll_evr, poll_null, 0.99, "(reported)", None));
    rows.push(row("RPC core.version p50, busy-poll client", poll_version, poll_null, 0.5, "(reported)", None));
    rows.push(row("RPC evrexec.run p50, blocking client", block_evr, block_null, 0.5, "(reported)", None));
    rows.push(row("RPC evrexec.run p50, hyper client", hyper_evr, hyper_null, 0.5, "(reported)", None));
    notes.push(format!(
        "RPC: {RPC_CALLS} sequential calls per series after {RPC_WARMUP} warm-up, each series on its own keep-alive \
         connection, blocks of {RPC_BLOCK} taken in turn; baseline = a hyper HTTP/1.1 server in the bench process \
         answering a fixed body. Clients: busy-poll and blocking = a raw HTTP/1.1 client polling the socket or \
         sleeping in read(2); hyper = evrhost's RpcClient (as `evrhost rpc`) on a current-thread runtime. \
         p99 blocking {} vs {}, hyper {} vs {}",
        fmt_ns(block_evr.q(0.99)),
        fmt_ns(block_null.q(0.99)),
        fmt_ns(hyper_evr.q(0.99)),
        fmt_ns(hyper_null.q(0.99)),
    ));
    if errors > 0 {
        notes.push(format!("WARNING: {errors} RPC call(s) failed while timed; the RPC figures are not trustworthy"));
    }
    Ok(())
}
