//! The distribution protocol on the wire: EPMD registration and lookup,
//! the handshake (erl_dist, over tokio through `compat`), then frames of
//! our own.
//!
//! erl_dist's own channel writes a frame in four small writes and flushes
//! each; on a socket with Nagle's algorithm that costs a 40 ms delayed-ACK
//! stall per round trip. Here a frame — or a burst of frames queued
//! together — goes out in one `write_all` on a TCP_NODELAY socket.

use std::io;
use std::time::Duration;

use erl_dist::epmd::{EpmdClient, NodeEntry};
use erl_dist::handshake::{ClientSideHandshake, HandshakeError, HandshakeStatus, ServerSideHandshake};
use erl_dist::message::Message;
use erl_dist::node::{Creation, LocalNode, NodeName, PeerNode};
use erl_dist::DistributionFlags;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_util::compat::TokioAsyncReadCompatExt;

use super::term;

pub const EPMD_PORT: u16 = 4369;
/// A handshake that has not finished by then is abandoned (a peer that
/// connects and says nothing holds no task for long).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The pass-through tag before every message after the handshake.
const PASS_THROUGH: u8 = 112;
/// Frames queued together are written together, up to about this much.
const WRITE_BATCH: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("handshake: the peer's cookie digest does not match ours (wrong cookie)")]
    WrongCookie,
    #[error("EPMD: {0}")]
    Epmd(String),
    #[error("node {0} is not registered with EPMD")]
    NotRegistered(String),
    #[error("a frame of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("no data from the peer for {0:?} (net tick time)")]
    TickTimeout(Duration),
    #[error("the peer has not read for {0:?}")]
    Stalled(Duration),
}

/// The flags evrhost advertises: erl_dist's mandatory set (what OTP 25+
/// requires), monitors (accepted and never fired: our processes do not
/// die apart from the connection), SEND_SENDER (so a send to one of our
/// pids says who sent it), SPAWN with EXIT_PAYLOAD (so `rpc:call` reaches
/// us as erpc's spawn request). Not PUBLISHED: a hidden node. No
/// fragments, no atom cache.
pub fn flags() -> DistributionFlags {
    DistributionFlags::mandatory()
        | DistributionFlags::DIST_MONITOR
        | DistributionFlags::DIST_MONITOR_NAME
        | DistributionFlags::SEND_SENDER
        | DistributionFlags::SPAWN
        | DistributionFlags::EXIT_PAYLOAD
}

fn handshake_error(e: impl std::fmt::Display) -> DistError {
    DistError::Handshake(e.to_string())
}

fn from_handshake(e: HandshakeError) -> DistError {
    match e {
        HandshakeError::CookieMismatch => DistError::WrongCookie,
        other => handshake_error(other),
    }
}

/// The server side of the handshake on an accepted socket.
pub async fn accept(stream: TcpStream, local: LocalNode, cookie: &str) -> Result<(TcpStream, PeerNode), DistError> {
    let run = async {
        let mut hs = ServerSideHandshake::new(stream.compat(), local, cookie);
        hs.execute_recv_name().await.map_err(handshake_error)?;
        let (stream, peer) = hs.execute_rest(HandshakeStatus::Ok).await.map_err(from_handshake)?;
        Ok((stream.into_inner(), peer))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, run).await.map_err(|_| handshake_error("timed out"))?
}

/// Connects to `peer` (looked up in the EPMD on its host) and runs the
/// client side of the handshake.
pub async fn connect(peer: &NodeName, local: LocalNode, cookie: &str) -> Result<(TcpStream, PeerNode), DistError> {
    let run = async {
        let host = peer.host();
        let epmd = TcpStream::connect((host, EPMD_PORT))
            .await
            .map_err(|e| DistError::Epmd(format!("cannot reach the EPMD of {host} (port {EPMD_PORT}): {e}")))?;
        let entry = EpmdClient::new(epmd.compat())
            .get_node(peer.name())
            .await
            .map_err(|e| DistError::Epmd(e.to_string()))?
            .ok_or_else(|| DistError::NotRegistered(peer.to_string()))?;
        let stream = TcpStream::connect((host, entry.port)).await?;
        stream.set_nodelay(true)?;
        let mut hs = ClientSideHandshake::new(stream.compat(), local, cookie);
        let status =
            hs.execute_send_name(erl_dist::LOWEST_DISTRIBUTION_PROTOCOL_VERSION).await.map_err(handshake_error)?;
        // erl_dist never answers an `alive` status; the caller reuses a live
        // connection to a node rather than opening a second one.
        if status == HandshakeStatus::Alive {
            return Err(handshake_error(format!("{peer} says a connection to us is already up")));
        }
        let (stream, node) = hs.execute_rest(true).await.map_err(from_handshake)?;
        Ok((stream.into_inner(), node))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, run).await.map_err(|_| handshake_error("timed out"))?
}

/// Registers `name` as a hidden node listening on `port`. The returned
/// stream must stay open: EPMD forgets the node when it closes. When no
/// EPMD answers, `epmd -daemon` is started and the registration retried.
pub async fn register(name: &str, port: u16) -> Result<(TcpStream, Creation), DistError> {
    let mut started = false;
    let mut delay = Duration::from_millis(20);
    loop {
        match TcpStream::connect(("127.0.0.1", EPMD_PORT)).await {
            Ok(stream) => {
                let (stream, creation) = EpmdClient::new(stream.compat())
                    .register(NodeEntry::new_hidden(name, port))
                    .await
                    .map_err(|e| DistError::Epmd(format!("registering `{name}`: {e}")))?;
                return Ok((stream.into_inner(), creation));
            }
            Err(e) if delay > Duration::from_secs(2) => {
                return Err(DistError::Epmd(format!("no EPMD on 127.0.0.1:{EPMD_PORT} ({e})")));
            }
            Err(_) if !started => {
                started = true;
                tracing::info!("no EPMD answers on port {EPMD_PORT}; starting `epmd -daemon`");
                let status = tokio::process::Command::new("epmd").arg("-daemon").status().await;
                if let Err(e) = status {
                    return Err(DistError::Epmd(format!("no EPMD answers and `epmd -daemon` failed: {e}")));
                }
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
}

/// Reads frames; answers nothing itself (ticks are the writer's job).
pub struct FrameReader {
    inner: BufReader<OwnedReadHalf>,
    max: usize,
    buf: Vec<u8>,
}

/// What one frame held.
pub enum Frame {
    Tick,
    Message(Box<Message>),
    /// A frame whose terms could not be read; the stream stays in step
    /// (frames are length-prefixed), so the connection goes on.
    Garbage(String),
}

impl FrameReader {
    pub fn new(read: OwnedReadHalf, max: usize) -> FrameReader {
        FrameReader { inner: BufReader::with_capacity(16 * 1024, read), max, buf: Vec::new() }
    }

    /// The next frame; None at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, DistError> {
        let size = match self.inner.read_u32().await {
            Ok(n) => n as usize,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if size == 0 {
            return Ok(Some(Frame::Tick));
        }
        if size > self.max {
            return Err(DistError::TooLarge { size, max: self.max });
        }
        self.buf.resize(size, 0);
        self.inner.read_exact(&mut self.buf).await?;
        Ok(Some(decode(&self.buf)))
    }
}

fn decode(frame: &[u8]) -> Frame {
    let Some((&PASS_THROUGH, body)) = frame.split_first() else {
        let tag = frame.first().map_or_else(|| "(none)".to_string(), u8::to_string);
        return Frame::Garbage(format!("type tag {tag} (expected {PASS_THROUGH})"));
    };
    if let Err(e) = term::check(body) {
        return Frame::Garbage(e.to_string());
    }
    match Message::read_from(&mut &body[..]) {
        Ok(message) => Frame::Message(Box::new(message)),
        Err(e) => Frame::Garbage(e.to_string()),
    }
}

/// Writes what arrives on `rx`, several queued messages per write, and a
/// tick when nothing was sent for `tick`. Ends when every sender is gone,
/// or when `closing` turns true (after writing what is queued, so an
/// `exit`'s `ok` reaches the peer); fails when the peer stops reading for
/// `stall`.
pub async fn write_loop(
    mut write: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Message>,
    mut closing: watch::Receiver<bool>,
    tick: Duration,
    stall: Duration,
) -> Result<(), DistError> {
    let mut buf: Vec<u8> = Vec::with_capacity(8 * 1024);
    loop {
        buf.clear();
        let mut last = false;
        tokio::select! {
            biased;
            m = tokio::time::timeout(tick, rx.recv()) => match m {
                Ok(None) => return Ok(()),
                Ok(Some(message)) => encode(&mut buf, message),
                Err(_) => buf.extend_from_slice(&0u32.to_be_bytes()),
            },
            _ = closing.wait_for(|c| *c) => last = true,
        }
        while last || buf.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(message) => encode(&mut buf, message),
                Err(_) => break,
            }
        }
        if !buf.is_empty() {
            match tokio::time::timeout(stall, write.write_all(&buf)).await {
                Ok(result) => result?,
                Err(_) => return Err(DistError::Stalled(stall)),
            }
        }
        if last {
            return Ok(());
        }
    }
}

/// Appends one frame. A message that cannot be encoded (an atom over 255
/// characters, say) is logged and left out.
fn encode(buf: &mut Vec<u8>, message: Message) {
    let start = buf.len();
    buf.extend_from_slice(&[0, 0, 0, 0, PASS_THROUGH]);
    if let Err(e) = message.write_into(buf) {
        tracing::warn!(error = %e, "an Erlang message could not be encoded; not sent");
        buf.truncate(start);
        return;
    }
    let len = (buf.len() - start - 4) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Our node as erl_dist's handshake wants it.
pub fn local_node(name: &NodeName, creation: Creation) -> LocalNode {
    let mut node = LocalNode::new(name.clone(), creation);
    node.flags = flags();
    node
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mutations of a real frame (a reg_send of `{api, status, ""}` with a
    /// pid and a reference): whatever a peer sends decodes or is refused,
    /// never panics.
    #[test]
    fn mutated_frames_never_panic() {
        let from = eetf::Pid::new("peer@host", 1, 0, 7);
        let message = term::tuple(vec![
            term::atom("api"),
            term::atom("status"),
            term::string("x"),
            eetf::Term::from(eetf::Reference { node: "peer@host".into(), id: vec![1, 2, 3], creation: 7 }),
            term::list(vec![term::int(-5), term::pid_term(&from)]),
        ]);
        let mut frame = vec![PASS_THROUGH];
        Message::reg_send(from, "foo".into(), message).write_into(&mut frame).unwrap();
        assert!(matches!(decode(&frame), Frame::Message(_)));
        // xorshift: deterministic, no dependency.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..50_000 {
            let mut bytes = frame.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() as usize) % bytes.len();
                match next() % 3 {
                    0 => bytes[i] = next() as u8,
                    1 => bytes.truncate(i.max(1)),
                    _ => bytes.insert(i, next() as u8),
                }
            }
            let _ = decode(&bytes);
        }
    }
}
