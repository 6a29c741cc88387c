//! A guest's stdout and stderr, captured per call and sent to the plugin's
//! log. Bounded: bytes past the cap are dropped and counted, never an error
//! to the guest (a panic message must still get through).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use crate::sync::lock;
use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

#[derive(Clone)]
pub struct OutputCapture {
    inner: Arc<Mutex<Captured>>,
    /// Set by a write, cleared by `take`: most calls print nothing, and
    /// then `take` costs one load instead of a lock.
    written: Arc<AtomicBool>,
}

struct Captured {
    buf: Vec<u8>,
    cap: usize,
    dropped: usize,
}

impl OutputCapture {
    pub fn new(cap: usize) -> Self {
        OutputCapture {
            inner: Arc::new(Mutex::new(Captured { buf: Vec::new(), cap, dropped: 0 })),
            written: Arc::new(AtomicBool::new(false)),
        }
    }

    fn append(&self, bytes: &[u8]) {
        let mut c = lock(&self.inner);
        let room = c.cap.saturating_sub(c.buf.len());
        let kept = bytes.len().min(room);
        c.buf.extend_from_slice(&bytes[..kept]);
        c.dropped += bytes.len() - kept;
        self.written.store(true, Ordering::Release);
    }

    /// Takes what was written since the last call: the text, and how many
    /// bytes were dropped over the cap.
    pub fn take(&self) -> (String, usize) {
        // A plain load first: the common case (nothing printed) then costs
        // no atomic write.
        if !self.written.load(Ordering::Relaxed) || !self.written.swap(false, Ordering::Acquire) {
            return (String::new(), 0);
        }
        let mut c = lock(&self.inner);
        if c.buf.is_empty() && c.dropped == 0 {
            return (String::new(), 0);
        }
        let text = String::from_utf8_lossy(&c.buf).into_owned();
        c.buf.clear();
        (text, std::mem::take(&mut c.dropped))
    }
}

impl IsTerminal for OutputCapture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for OutputCapture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for OutputCapture {
    async fn ready(&mut self) {}
}

#[wasmtime_wasi::async_trait]
impl OutputStream for OutputCapture {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 << 10)
    }
}

impl tokio::io::AsyncWrite for OutputCapture {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
