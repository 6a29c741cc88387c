//! JSON-RPC over a UNIX stream socket: request documents (objects or
//! batches) back to back, any whitespace between them, each answered with
//! one response document and a newline. No token: the socket file's
//! permissions guard it.
//!
//! Bounds: 64 connections at once (more wait in the kernel's backlog), a
//! document of at most 1 MiB that must arrive whole within 30 s, and 60 s
//! of silence between documents; past any of them the connection ends.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use super::http::MAX_BODY;
use super::jsonrpc::{self, Server};

/// A socket file this daemon made: removed at stop only while it is still
/// that file (another daemon may have replaced it since).
pub struct SocketFile {
    path: PathBuf,
    identity: (u64, u64),
}

impl SocketFile {
    pub fn remove(&self) {
        use std::os::unix::fs::MetadataExt;
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.identity) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds `path`. A socket left there by a daemon that is gone is replaced;
/// one a live daemon answers on is refused (as is any file that is not a
/// socket), so a second daemon never takes the first one's socket away.
pub fn bind(path: &Path) -> std::io::Result<(std::os::unix::net::UnixListener, SocketFile)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let context =
        |e: std::io::Error| std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", path.display()));
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(context(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is there",
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(context(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another process serves on this socket (a second daemon with the same [rpc] unix?)",
            )));
        }
        std::fs::remove_file(path).map_err(context)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(context)?;
    listener.set_nonblocking(true)?;
    let meta = std::fs::symlink_metadata(path).map_err(context)?;
    Ok((listener, SocketFile { path: path.to_path_buf(), identity: (meta.dev(), meta.ino()) }))
}

/// Connections served at once; more wait in the kernel's backlog. Each may
/// hold a document of up to `MAX_BODY` bytes.
const MAX_CONNECTIONS: usize = 64;
/// A connection that sends nothing for this long is closed.
const IDLE: Duration = Duration::from_secs(60);
/// A document must arrive whole within this long of its first byte.
const DOCUMENT: Duration = Duration::from_secs(30);

/// Serves until the task is dropped; the listener joins the reactor of the
/// runtime this runs on.
pub async fn serve(listener: std::os::unix::net::UnixListener, s: Arc<Server>) {
    let listener = match UnixListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "the RPC UNIX listener cannot join the runtime; no JSON-RPC over it");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        match listener.accept().await {
            Ok((stream, _)) => {
                let s = s.clone();
                tokio::spawn(async move {
                    connection(stream, &s).await;
                    crate::frontend::disconnected(s.dispatcher.bus(), None, None, "unix");
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "rpc unix accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Where JSON documents end, as bytes arrive: each byte is looked at once,
/// so a document that arrives a byte at a time costs its length, not its
/// length squared (re-parsing the buffer on every read did).
#[derive(Default)]
pub struct Framer {
    scanned: usize,
    depth: usize,
    started: bool,
    in_string: bool,
    escaped: bool,
}

/// A document that is not an object or an array: the stream cannot be
/// framed past it.
pub struct NotFramed;

impl Framer {
    /// The end of the first complete document in `buf`, None while it is
    /// incomplete. After an end, the caller drops `..end` from the buffer.
    pub fn next_end(&mut self, buf: &[u8]) -> Result<Option<usize>, NotFramed> {
        for (i, &b) in buf.iter().enumerate().skip(self.scanned) {
            if !self.started {
                match b {
                    b' ' | b'\t' | b'\r' | b'\n' => continue,
                    b'{' | b'[' => (self.started, self.depth) = (true, 1),
                    _ => return Err(NotFramed),
                }
                continue;
            }
            if self.in_string {
                match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        *self = Framer::default();
                        return Ok(Some(i + 1));
                    }
                }
                _ => {}
            }
        }
        self.scanned = buf.len();
        Ok(None)
    }

    /// Inside a document (its first byte has come).
    fn in_document(&self) -> bool {
        self.started
    }
}

async fn connection(mut stream: UnixStream, s: &Server) {
    let mut buffer: Vec<u8> = Vec::with_capacity(4096);
    let mut framer = Framer::default();
    loop {
        loop {
            let end = match framer.next_end(&buffer) {
                Ok(Some(end)) => end,
                Ok(None) => break,
                Err(NotFramed) => {
                    let response = jsonrpc::parse_error("a request is a JSON object or array");
                    let _ = write(&mut stream, &encode(&response)).await;
                    return;
                }
            };
            let doc = &buffer[..end];
            if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(doc) {
                // Past a syntax error the stream cannot be resynchronised.
                let _ = write(&mut stream, &encode(&jsonrpc::parse_error(&e.to_string()))).await;
                return;
            }
            let response = jsonrpc::handle(s, doc).await;
            buffer.drain(..end);
            if let Some(response) = response {
                if write(&mut stream, &response).await.is_err() {
                    return;
                }
            }
        }
        if buffer.len() > MAX_BODY {
            let response = jsonrpc::parse_error(&format!("a document over {MAX_BODY} bytes"));
            let _ = write(&mut stream, &encode(&response)).await;
            return;
        }
        let wait = if framer.in_document() { DOCUMENT } else { IDLE };
        match tokio::time::timeout(wait, stream.read_buf(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => {
                tracing::debug!(seconds = wait.as_secs(), "rpc unix connection idle; closed");
                return;
            }
        }
    }
}

fn encode(response: &Value) -> Vec<u8> {
    serde_json::to_vec(response).unwrap_or_default()
}

async fn write(stream: &mut UnixStream, response: &[u8]) -> std::io::Result<()> {
    stream.write_all(response).await?;
    stream.write_all(b"\n").await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every end the framer finds, feeding `text` in pieces of `step` bytes.
    fn ends(text: &str, step: usize) -> Vec<String> {
        let (mut framer, mut buf, mut found) = (Framer::default(), Vec::new(), Vec::new());
        for chunk in text.as_bytes().chunks(step) {
            buf.extend_from_slice(chunk);
            while let Ok(Some(end)) = framer.next_end(&buf) {
                found.push(String::from_utf8_lossy(&buf[..end]).trim().to_string());
                buf.drain(..end);
            }
        }
        found
    }

    #[test]
    fn documents_are_framed_whatever_the_pieces() {
        let text = r#" {"a":"}{\"]"} [1,{"b":[2]}]
{"c":"\\"}"#;
        for step in [1, 2, 3, 7, 1000] {
            assert_eq!(ends(text, step), [r#"{"a":"}{\"]"}"#, r#"[1,{"b":[2]}]"#, r#"{"c":"\\"}"#], "step {step}");
        }
        assert!(Framer::default().next_end(b"  42").is_err(), "a scalar cannot be framed");
        assert!(Framer::default().next_end(b"}}garbage").is_err());
        assert_eq!(Framer::default().next_end(br#"{"open": ["#).ok(), Some(None), "incomplete");
    }
}
