//! Front-ends: each owns its sockets and translates one wire protocol into
//! dispatcher calls and back. They know nothing of wasmtime; the
//! dispatcher and the bus know nothing of them.
//!
//! To add a front-end, write a module whose type implements [`Frontend`]
//! (its `Settings` come from a `config/` section) and add one
//! `launch::<YourFrontend>(…)` line to `run` in `daemon.rs`.
//!
//! - `udp`: evrexec's UDP sockets — where a datagram enters (`udp::receive`),
//!   becomes a route call (`udp::handle` → `Dispatcher::run_route_unsaved`)
//!   and its reply leaves, once the call's kv writes are durable.
//! - `rpc`: JSON-RPC 2.0 over HTTP and a UNIX socket, `/metrics`, on a
//!   thread of its own.
//! - `erlang`: a hidden Erlang C-node, as FreeSWITCH's mod_erlang_event.
//! - `yate`: Yate's external module protocol, on stdio or as a client of
//!   a Yate listener.
//! - `event_sinks`: OpenSIPS's event_datagram and event_stream, the
//!   subscribers `event.subscribe` and `[[events.subscribe]]` add.

pub mod client;
pub mod erlang;
pub mod event_sinks;
pub mod metrics;
pub mod rpc;
pub mod table;
pub mod thread;
pub mod udp;
pub mod yate;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::bus::log_layer::LogHub;
use crate::bus::{Bus, Caller};
use crate::dispatcher::Dispatcher;
use metrics::{Metrics, Registry};

/// One kind of front door (the shape of Spin's `Trigger`): its settings,
/// and how it starts.
///
/// Every front-end must:
/// - bound every queue it keeps, and count (and say where to read) what it
///   drops when one is full;
/// - survive any byte sequence a peer sends: a bad message is answered or
///   logged and skipped, never a panic, never a hang;
/// - raise E_CORE_TCP_DISCONNECT through [`disconnected`] when a stream
///   peer goes away, whatever the reason;
/// - where it is the client, reconnect with a backoff and set up again
///   what the connection carried, while the rest of the daemon serves on;
/// - stop when its [`Running`] is stopped (its tasks aborted, its stop
///   hooks run), leaving nothing behind (a socket file, a registration).
pub trait Frontend {
    /// Its settings, as `config/` checked them.
    type Settings: Send + 'static;
    /// For logs and errors: `udp`, `rpc`, `erlang`.
    const NAME: &'static str;
    /// Opens its sockets and starts serving; returns what it runs.
    fn start(settings: Self::Settings, ctx: &Context) -> impl Future<Output = Result<Running, FrontendError>> + Send;
}

/// A front-end that could not start.
#[derive(Debug, thiserror::Error)]
#[error("{frontend} front-end")]
pub struct FrontendError {
    pub frontend: &'static str,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl FrontendError {
    pub fn new(frontend: &'static str, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        FrontendError { frontend, source: source.into() }
    }
}

/// What a front-end gets to work with.
#[derive(Clone)]
pub struct Context {
    pub dispatcher: Arc<Dispatcher>,
    /// Log lines as records, for a front-end's log handlers.
    pub logs: Arc<LogHub>,
    /// Every front-end's metrics, for `/metrics`.
    pub metrics: Arc<Registry>,
    /// External event subscribers (event_datagram, event_stream).
    pub sinks: Arc<event_sinks::EventSinks>,
    /// Cancelled when the daemon stops. A front-end whose peer is the
    /// reason the process runs (Yate's pipes) cancels it to stop the daemon.
    pub shutdown: CancellationToken,
}

impl Context {
    /// A context for `dispatcher`'s front-ends, feeding `logs`' taps.
    pub fn new(dispatcher: Arc<Dispatcher>, logs: Arc<LogHub>) -> Context {
        Context { dispatcher, logs, metrics: Arc::default(), sinks: Arc::default(), shutdown: CancellationToken::new() }
    }

    pub fn bus(&self) -> &Arc<Bus> {
        self.dispatcher.bus()
    }
}

/// What a started front-end runs: tasks on the main runtime, hooks to run
/// when it stops, and its metrics.
pub struct Running {
    pub name: &'static str,
    tasks: Vec<JoinHandle<()>>,
    /// Tasks that finish on their own once `shutdown` is cancelled.
    graceful: Vec<JoinHandle<()>>,
    on_stop: Vec<Box<dyn FnOnce() + Send>>,
    metrics: Option<Arc<dyn Metrics>>,
}

impl Running {
    pub fn new(name: &'static str) -> Running {
        Running { name, tasks: Vec::new(), graceful: Vec::new(), on_stop: Vec::new(), metrics: None }
    }

    pub fn task(&mut self, task: JoinHandle<()>) {
        self.tasks.push(task);
    }

    /// A task that ends by itself after `shutdown` (saying goodbye to its
    /// peer); a stop waits for it a while before aborting it.
    pub fn graceful(&mut self, task: JoinHandle<()>) {
        self.graceful.push(task);
    }

    pub fn on_stop(&mut self, hook: impl FnOnce() + Send + 'static) {
        self.on_stop.push(Box::new(hook));
    }

    pub fn metrics(&mut self, metrics: Arc<dyn Metrics>) {
        self.metrics = Some(metrics);
    }

    /// Gives the graceful tasks a few seconds, runs the stop hooks, then
    /// aborts the tasks and waits for them.
    pub async fn stop(self) {
        for mut task in self.graceful {
            if tokio::time::timeout(GRACE, &mut task).await.is_err() {
                task.abort();
            }
        }
        for hook in self.on_stop {
            hook();
        }
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// How long a graceful task may take to finish once the daemon stops.
const GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Starts a front-end when it has settings (it is configured); its
/// metrics join `/metrics`.
pub async fn launch<F: Frontend>(
    settings: Option<F::Settings>,
    ctx: &Context,
) -> Result<Option<Running>, FrontendError> {
    let Some(settings) = settings else { return Ok(None) };
    let running = F::start(settings, ctx).await?;
    if let Some(metrics) = &running.metrics {
        ctx.metrics.add(metrics.clone());
    }
    Ok(Some(running))
}

/// E_CORE_TCP_DISCONNECT with OpenSIPS's parameters: the peer is `src`,
/// this end `dst`; `proto` is `tcp`, `unix`, `erlang`, … The one place it
/// is raised.
pub fn disconnected(bus: &Bus, local: Option<SocketAddr>, peer: Option<SocketAddr>, proto: &str) {
    let ip = |a: Option<SocketAddr>| a.map_or(String::new(), |a| a.ip().to_canonical().to_string());
    let port = |a: Option<SocketAddr>| a.map_or(0, |a| a.port()).to_string();
    bus.raise(
        "E_CORE_TCP_DISCONNECT",
        vec![
            ("src_ip", ip(peer)),
            ("src_port", port(peer)),
            ("dst_ip", ip(local)),
            ("dst_port", port(local)),
            ("proto", proto.to_string()),
        ],
        Caller::host("tcp_disconnect"),
    );
}
