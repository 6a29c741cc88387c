//! Overload: evrhost offered twice the rate it handled at saturation, for
//! `EVRHOST_BENCH_OVERLOAD_S` seconds (30 by default), while a client on
//! this process times an `evrexec.run` RPC call of echo every 10 ms. It
//! reports the RPC latency under that load, and the accounting of every
//! datagram sent: the plugin's own count of those handled, plus those
//! dropped in the queue, plus those the kernel dropped on evrhost's socket
//! (its `drops` column, which RcvbufErrors in /proc/net/snmp counts
//! machine-wide) must equal the number sent, and no call may have failed
//! (a deadline hit would be one).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::{fmt_ns, fmt_rate, metric, quantile, rpc_request, RawClient};
use crate::load::{generate, snmp_delta, udp_snmp, Mode};
use crate::sides::Evrhost;
use crate::trial::Side;
use crate::Report;

const RPC_EVERY: Duration = Duration::from_millis(10);

fn seconds() -> u64 {
    std::env::var("EVRHOST_BENCH_OVERLOAD_S").ok().and_then(|s| s.parse().ok()).unwrap_or(30)
}

/// The daemon's counters that the accounting adds up.
#[derive(Clone, Copy, Debug)]
struct Counters {
    handled: u64,
    received: u64,
    queue_drops: u64,
    kernel_drops: u64,
    failed: u64,
    discarded: u64,
}

fn counters(evr: &mut Evrhost) -> anyhow::Result<Counters> {
    let m = |name: &str| metric(evr.rpc, name).unwrap_or(0);
    Ok(Counters {
        received: m("evrhost_udp_received_total"),
        queue_drops: m("evrhost_udp_dropped_total"),
        kernel_drops: m("evrhost_udp_kernel_drops_total"),
        failed: m("evrhost_udp_failed_total"),
        discarded: m("evrhost_instances_discarded_total"),
        handled: evr.handled()?,
    })
}

/// Times an RPC call every RPC_EVERY while `sending`: the times (ns) of
/// those answered, and the number that were not.
fn time_calls(rpc: SocketAddr, request: &[u8], sending: &AtomicBool) -> anyhow::Result<(Vec<f64>, u64)> {
    let mut client = RawClient::connect(rpc, false)?;
    let (mut times, mut errors) = (Vec::new(), 0u64);
    let mut next = Instant::now();
    while sending.load(Ordering::Relaxed) {
        let started = Instant::now();
        match client.round_trip(request) {
            Ok(true) => times.push(started.elapsed().as_nanos() as f64),
            Ok(false) | Err(_) => {
                errors += 1;
                if let Ok(c) = RawClient::connect(rpc, false) {
                    client = c;
                }
            }
        }
        next += RPC_EVERY;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    Ok((times, errors))
}

/// Runs the overload part at twice `saturation` (datagrams/s), sent with
/// UDP GSO, the generator that leaves the most of the two cores to evrhost.
pub fn overload(evr: &mut Evrhost, payloads: &[Vec<u8>], saturation: f64, out: &mut Report) -> anyhow::Result<()> {
    let secs = seconds();
    if secs == 0 || !saturation.is_finite() || saturation <= 0.0 {
        return Ok(());
    }
    let rate = 2.0 * saturation;
    let n = (rate * secs as f64) as u64;
    let cap = Duration::from_secs(secs + 5);
    let before = counters(evr)?;
    let snmp = udp_snmp();
    let request = rpc_request(evr.rpc, "evrexec.run", r#"["evrexec:test","overload"]"#);
    let (target, rpc) = (evr.udp, evr.rpc);
    let sending = AtomicBool::new(true);
    let (sent, (times, rpc_errors)) = std::thread::scope(|s| -> anyhow::Result<_> {
        let generator = std::thread::Builder::new()
            .name("udp-generator".into())
            .spawn_scoped(s, || generate(target, payloads, rate, n, cap, Mode::Gso, true))?;
        let client = std::thread::Builder::new()
            .name("overload-rpc".into())
            .spawn_scoped(s, || time_calls(rpc, &request, &sending))?;
        // The client waits on the daemon, not on the scheduler: under
        // chrt, as the daemon is (a client of normal priority would get
        // a core only when the daemon's real-time threads leave one). So
        // does the generator: at normal priority it got only what the
        // daemon left, about its saturation rate, never twice it. It
        // yields after each send, as the daemon's threads do.
        if crate::kamailio::fifo_allowed() {
            crate::fifo_threads(std::process::id(), |name| name == "overload-rpc" || name == "udp-generator");
        }
        let sent = generator.join().map_err(|_| anyhow::anyhow!("the generator panicked"));
        sending.store(false, Ordering::Relaxed);
        let calls = client.join().map_err(|_| anyhow::anyhow!("the RPC client panicked"))?;
        Ok((sent??, calls?))
    })?;
    let elapsed = sent.elapsed.as_secs_f64().max(1e-9);
    // Let the queue drain: the count stops growing.
    let mut handled = evr.handled()?;
    for _ in 0..60 {
        std::thread::sleep(Duration::from_millis(100));
        let now = evr.handled()?;
        if now == handled {
            break;
        }
        handled = now;
    }
    let after = counters(evr)?;
    let rcvbuf_errors = snmp_delta(&snmp, &udp_snmp(), "RcvbufErrors");
    let d = |f: fn(&Counters) -> u64| f(&after).saturating_sub(f(&before));
    let (handled, queue, kernel) = (d(|c| c.handled), d(|c| c.queue_drops), d(|c| c.kernel_drops));
    let accounted = handled + queue + kernel;
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let p99 = quantile(&sorted, 0.99);
    out.row(
        format!("overload {secs} s at 2× saturation: RPC p99"),
        fmt_ns(p99),
        fmt_ns(10e6),
        p99 / 10e6,
        "≤10 ms",
        Some(p99 <= 10e6 && rpc_errors == 0),
    );
    out.row(
        "overload: sent = handled + queue + kernel drops".into(),
        accounted.to_string(),
        sent.count.to_string(),
        accounted as f64 / sent.count.max(1) as f64,
        "exact, 0 failed",
        Some(accounted == sent.count && d(|c| c.failed) == 0 && d(|c| c.discarded) == 0),
    );
    out.notes.push(format!(
        "overload: offered {} ({} sent in {elapsed:.1} s, 2 × the {} saturation), handled {handled} ({}), \
         queue drops {queue}, kernel drops on the socket {kernel} (machine RcvbufErrors {rcvbuf_errors}), \
         received {}, failed calls {}, instances discarded {}; RPC every {} ms: {} answered, {rpc_errors} errors, \
         p50 {} p99 {} max {}",
        fmt_rate(rate),
        sent.count,
        fmt_rate(saturation),
        fmt_rate(handled as f64 / elapsed),
        d(|c| c.received),
        d(|c| c.failed),
        d(|c| c.discarded),
        RPC_EVERY.as_millis(),
        times.len(),
        fmt_ns(quantile(&sorted, 0.5)),
        fmt_ns(p99),
        fmt_ns(sorted.last().copied().unwrap_or(0.0)),
    ));
    Ok(())
}
