//! What a UDP socket counts, and how `/metrics` shows it (the kernel's
//! drops on the socket included).

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crate::frontend::metrics::{header, Metrics};

#[derive(Default, Debug)]
pub struct UdpStats {
    pub received: AtomicU64,
    /// Handled by the receiver thread itself (the rest went to workers).
    pub inline: AtomicU64,
    /// Dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Calls that failed (the cause is logged and counted per plugin).
    pub failed: AtomicU64,
    pub replies: AtomicU64,
    pub reply_errors: AtomicU64,
}

/// One UDP socket as the metrics see it.
pub struct UdpEndpoint {
    pub name: String,
    pub addr: SocketAddr,
    pub stats: Arc<UdpStats>,
    /// The socket's inode, to find its kernel drop count in /proc/net/udp.
    pub(super) inode: Option<u64>,
}

/// The inode of an open socket (`socket:[N]` in /proc/self/fd).
pub(super) fn socket_inode(fd: i32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// Datagrams the kernel dropped per socket inode (its receive buffer was
/// full), from the `drops` column of /proc/net/udp and /proc/net/udp6.
fn kernel_drops() -> std::collections::HashMap<u64, u64> {
    let mut drops = std::collections::HashMap::new();
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if let (Some(inode), Some(n)) = (fields.get(9), fields.last()) {
                if let (Ok(inode), Ok(n)) = (inode.parse::<u64>(), n.parse::<u64>()) {
                    drops.insert(inode, n);
                }
            }
        }
    }
    drops
}

/// Datagrams received, dropped, failed and replied, per socket.
pub(super) struct UdpMetrics(pub(super) Vec<UdpEndpoint>);

impl Metrics for UdpMetrics {
    fn render(&self, out: &mut String) {
        type Counter = (&'static str, &'static str, fn(&UdpStats) -> &AtomicU64);
        let counters: [Counter; 5] = [
            ("evrhost_udp_received_total", "Datagrams received.", |s| &s.received),
            ("evrhost_udp_inline_total", "Datagrams the receiver thread handled itself.", |s| &s.inline),
            ("evrhost_udp_dropped_total", "Datagrams dropped because the queue was full.", |s| &s.dropped),
            ("evrhost_udp_failed_total", "Datagrams whose call failed.", |s| &s.failed),
            ("evrhost_udp_replies_total", "Reply datagrams sent.", |s| &s.replies),
        ];
        for (metric, help, value) in counters {
            header(out, metric, "counter", help);
            for e in &self.0 {
                let n = value(&e.stats).load(Relaxed);
                let _ = writeln!(out, "{metric}{{route=\"{}\",addr=\"{}\"}} {n}", e.name, e.addr);
            }
        }
        let drops = kernel_drops();
        let metric = "evrhost_udp_kernel_drops_total";
        header(out, metric, "counter", "Datagrams the kernel dropped before evrhost read them (receive buffer full).");
        for e in &self.0 {
            if let Some(n) = e.inode.and_then(|i| drops.get(&i)) {
                let _ = writeln!(out, "{metric}{{route=\"{}\",addr=\"{}\"}} {n}", e.name, e.addr);
            }
        }
    }
}
