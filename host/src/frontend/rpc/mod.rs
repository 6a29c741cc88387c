//! The JSON-RPC front-end: JSON-RPC 2.0 over HTTP (`http.rs`, with
//! `/metrics` and `/health`) and over a UNIX stream socket (`unix.rs`),
//! one method table for both (`jsonrpc.rs`, with `event_methods.rs` and
//! `kv_methods.rs`; `params.rs` reads parameters), served by a thread of its own
//! (`frontend/thread.rs`).

mod event_methods;
pub mod http;
pub mod jsonrpc;
mod kv_methods;
mod params;
pub mod unix;

use std::sync::Arc;

use super::thread::FrontendThread;
use super::{Context, Frontend, FrontendError, Running};
use crate::config::RpcSettings;

pub struct Rpc;

impl Frontend for Rpc {
    type Settings = RpcSettings;
    const NAME: &'static str = "rpc";

    async fn start(settings: RpcSettings, ctx: &Context) -> Result<Running, FrontendError> {
        let mut running = Running::new(Self::NAME);
        let error = |e: std::io::Error| FrontendError::new(Self::NAME, e);
        let thread = FrontendThread::start("rpc").map_err(error)?;
        let server = Arc::new(jsonrpc::Server {
            dispatcher: ctx.dispatcher.clone(),
            settings: settings.clone(),
            sinks: ctx.sinks.clone(),
        });
        if let Some(addr) = settings.listen {
            let listener = http::bind(addr).map_err(error)?;
            let addr = listener.local_addr().unwrap_or(addr);
            drop(thread.spawn(http::serve(listener, server.clone(), ctx.metrics.clone())));
            tracing::info!("JSON-RPC on http://{addr}/RPC, metrics on http://{addr}/metrics");
            tracing::info!("try: evrhost rpc -a {addr} evrexec.run evrexec:test mydata");
        }
        let mut socket_file = None;
        if let Some(path) = &settings.unix {
            let (listener, file) = unix::bind(path).map_err(error)?;
            drop(thread.spawn(unix::serve(listener, server.clone())));
            tracing::info!("JSON-RPC on unix:{}", path.display());
            socket_file = Some(file);
        }
        running.on_stop(move || {
            thread.stop();
            if let Some(file) = socket_file {
                file.remove();
            }
        });
        Ok(running)
    }
}
