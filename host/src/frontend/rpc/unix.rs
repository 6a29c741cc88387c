//! JSON-RPC over a UNIX stream socket: request documents back to back (any
//! whitespace between them), each answered with one response document and
//! a newline. No token: the socket file's permissions guard it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

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
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let s = s.clone();
                tokio::spawn(async move {
                    connection(stream, &s).await;
                    crate::frontend::disconnected(s.dispatcher.bus(), None, None, "unix");
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "rpc unix accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(mut stream: UnixStream, s: &Server) {
    let mut buffer: Vec<u8> = Vec::with_capacity(4096);
    loop {
        let mut requests = Vec::new();
        let mut consumed = 0;
        let mut values = serde_json::Deserializer::from_slice(&buffer).into_iter::<Value>();
        let malformed = loop {
            match values.next() {
                Some(Ok(v)) => {
                    requests.push(v);
                    consumed = values.byte_offset();
                }
                Some(Err(e)) if e.is_eof() => break None,
                Some(Err(e)) => break Some(e),
                None => break None,
            }
        };
        buffer.drain(..consumed);
        for request in requests {
            if let Some(response) = jsonrpc::handle_value(s, request).await {
                if write(&mut stream, &response).await.is_err() {
                    return;
                }
            }
        }
        if let Some(e) = malformed {
            // Past a syntax error the stream cannot be resynchronised.
            let response = jsonrpc::parse_error(&e.to_string());
            let _ = write(&mut stream, &response).await;
            return;
        }
        if buffer.len() > MAX_BODY {
            let response = jsonrpc::parse_error(&format!("a document over {MAX_BODY} bytes"));
            let _ = write(&mut stream, &response).await;
            return;
        }
        match stream.read_buf(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

async fn write(stream: &mut UnixStream, response: &Value) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(response).unwrap_or_default();
    bytes.push(b'\n');
    stream.write_all(&bytes).await
}
