//! The byte streams to a Yate engine: the process's stdin/stdout when Yate
//! spawned evrhost, or a TCP or UNIX socket to one of its listeners.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::YateConnect;

/// One connection to the engine.
pub(super) struct Conn {
    pub reader: Box<dyn AsyncRead + Unpin + Send>,
    pub writer: Box<dyn AsyncWrite + Unpin + Send>,
    /// For E_CORE_TCP_DISCONNECT: this end and the engine's (TCP only).
    pub local: Option<SocketAddr>,
    pub peer: Option<SocketAddr>,
    /// `tcp`, `unix` or `pipe`.
    pub proto: &'static str,
    /// Whether a `%%>connect` line goes first (sockets only).
    pub socket: bool,
}

/// Opens the connection `connect` names.
pub(super) async fn open(connect: &YateConnect) -> io::Result<Conn> {
    match connect {
        YateConnect::Stdio => stdio(),
        YateConnect::Tcp(addr) => {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (local, peer) = (stream.local_addr().ok(), stream.peer_addr().ok());
            let (r, w) = stream.into_split();
            Ok(Conn { reader: Box::new(r), writer: Box::new(w), local, peer, proto: "tcp", socket: true })
        }
        YateConnect::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path).await?;
            let (r, w) = stream.into_split();
            Ok(Conn { reader: Box::new(r), writer: Box::new(w), local: None, peer: None, proto: "unix", socket: true })
        }
    }
}

/// Yate's pipes, read and written without blocking threads (a blocked
/// read of stdin would keep the process from exiting); a stdin or stdout
/// that is not a pipe (a file, a terminal) falls back to tokio's own.
fn stdio() -> io::Result<Conn> {
    use tokio::net::unix::pipe;
    let input = std::io::stdin().as_fd().try_clone_to_owned()?;
    let output = std::io::stdout().as_fd().try_clone_to_owned()?;
    let reader: Box<dyn AsyncRead + Unpin + Send> = match pipe::Receiver::from_owned_fd(input) {
        Ok(r) => Box::new(r),
        Err(_) => Box::new(tokio::io::stdin()),
    };
    let writer: Box<dyn AsyncWrite + Unpin + Send> = match pipe::Sender::from_owned_fd(output) {
        Ok(w) => Box::new(w),
        Err(_) => Box::new(tokio::io::stdout()),
    };
    Ok(Conn { reader, writer, local: None, peer: None, proto: "pipe", socket: false })
}
