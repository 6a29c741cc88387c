//! The JSON-RPC front-end: JSON-RPC 2.0 over HTTP (`http.rs`, with
//! `/metrics` and `/health`) and over a UNIX stream socket (`unix.rs`),
//! one method table for both (`jsonrpc.rs`), served by a thread of its own
//! (`thread.rs`).

pub mod http;
pub mod jsonrpc;
pub mod thread;
pub mod unix;

use super::{Context, Frontend, FrontendError, Running};
use crate::config::RpcSettings;
use thread::RpcThread;

pub struct Rpc;

impl Frontend for Rpc {
    type Settings = RpcSettings;
    const NAME: &'static str = "rpc";

    async fn start(settings: RpcSettings, ctx: &Context) -> Result<Running, FrontendError> {
        let mut running = Running::new(Self::NAME);
        let error = |e: std::io::Error| FrontendError::new(Self::NAME, e);
        let thread = RpcThread::start().map_err(error)?;
        if let Some(addr) = settings.listen {
            let listener = http::bind(addr).map_err(error)?;
            let addr = listener.local_addr().unwrap_or(addr);
            thread.spawn(http::serve(listener, ctx.dispatcher.clone(), ctx.metrics.clone(), settings.token.clone()));
            tracing::info!("JSON-RPC on http://{addr}/RPC, metrics on http://{addr}/metrics");
            tracing::info!("try: evrhost rpc -a {addr} evrexec.run evrexec:test mydata");
        }
        let mut socket_file = None;
        if let Some(path) = &settings.unix {
            thread.spawn(unix::serve(unix::bind(path).map_err(error)?, ctx.dispatcher.clone()));
            tracing::info!("JSON-RPC on unix:{}", path.display());
            socket_file = Some(path.clone());
        }
        running.on_stop(move || {
            thread.stop();
            if let Some(path) = socket_file {
                let _ = std::fs::remove_file(path);
            }
        });
        Ok(running)
    }
}
