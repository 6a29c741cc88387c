//! A raw JSON-RPC-over-HTTP client for the benches that time round trips.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use nix::errno::Errno;
use nix::sys::socket::MsgFlags;

/// A minimal HTTP/1.1 client, as load generators such as wrk are: one
/// prebuilt request written per call, the response read until its
/// Content-Length is in. It costs a round trip a few hundred nanoseconds;
/// a hyper client on a tokio runtime costs several microseconds of its own.
///
/// `busy_poll`: wait for the answer by polling the socket instead of
/// sleeping in read(2). A sleeping client is woken by an interrupt to its
/// idle vCPU, ~10 µs on this VM, which then counts in every round trip; a
/// polling one measures the server and the loopback, not its own wake-up.
pub struct RawClient {
    stream: TcpStream,
    busy_poll: bool,
    buf: Vec<u8>,
}

impl RawClient {
    pub fn connect(addr: SocketAddr, busy_poll: bool) -> anyhow::Result<RawClient> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(RawClient { stream, busy_poll, buf: Vec::with_capacity(4096) })
    }

    fn read_some(&mut self) -> anyhow::Result<()> {
        let mut chunk = [0u8; 4096];
        let n = if self.busy_poll {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match nix::sys::socket::recv(self.stream.as_raw_fd(), &mut chunk, MsgFlags::MSG_DONTWAIT) {
                    Ok(n) => break n,
                    Err(Errno::EAGAIN) if Instant::now() < deadline => std::hint::spin_loop(),
                    Err(e) => return Err(e.into()),
                }
            }
        } else {
            self.stream.read(&mut chunk)?
        };
        if n == 0 {
            return Err(anyhow!("connection closed"));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// The last answer's body.
    pub fn body(&self) -> &[u8] {
        self.buf.windows(4).position(|w| w == b"\r\n\r\n").map_or(&[], |i| &self.buf[i + 4..])
    }

    /// Sends `request` (a whole HTTP request); true when the answer is a
    /// 200 carrying a JSON-RPC result.
    pub fn round_trip(&mut self, request: &[u8]) -> anyhow::Result<bool> {
        self.stream.write_all(request)?;
        self.buf.clear();
        let head_end = loop {
            self.read_some()?;
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = std::str::from_utf8(&self.buf[..head_end])?;
        let length: usize = head
            .lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")))
            .and_then(|(_, v)| v.trim().parse().ok())
            .ok_or_else(|| anyhow!("no Content-Length"))?;
        let ok = head.starts_with("HTTP/1.1 200 ");
        while self.buf.len() < head_end + length {
            self.read_some()?;
        }
        Ok(ok && self.buf[head_end..].starts_with(br#"{"jsonrpc":"2.0","result""#))
    }
}

/// A whole keep-alive POST of one JSON-RPC call.
pub fn rpc_request(addr: SocketAddr, method: &str, params: &str) -> Vec<u8> {
    let body = format!(r#"{{"jsonrpc":"2.0","method":"{method}","params":{params},"id":1}}"#);
    let mut request = format!(
        "POST /RPC HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body.as_bytes());
    request
}

/// A plain HTTP/1.1 GET with `Connection: close`: the status and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_nodelay(true);
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.get(9..12)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Some((status, body))
}

/// The sum of a `/metrics` family's samples, all labels together.
pub fn metric(rpc: SocketAddr, name: &str) -> Option<u64> {
    let (200, text) = http_get(rpc, "/metrics")? else {
        return None;
    };
    let mut sum = 0.0;
    let mut seen = false;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if rest.starts_with('{') || rest.starts_with(' ') {
            if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
                sum += v;
                seen = true;
            }
        }
    }
    seen.then_some(sum as u64)
}
