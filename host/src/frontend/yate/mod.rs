//! Yate's external module protocol (extmodule, protocols.md §1): evrhost is
//! a module of a Yate engine — spawned by it on stdin/stdout, or a client
//! of one of its `[listener]`s — and Yate's messages run routes.
//!
//! - `wire`: the line codec, byte for byte as the engine's.
//! - `transport`: the pipes or the socket.
//! - `session`: one connection — setup, each engine line, the writes.
//! - `answer`: an engine message's route call and its answer line.
//! - `link`: plugins' `messages` import, sent on the current connection.
//! - `counters`: what `/metrics` and `yate.status` show.
//!
//! The connection is served on a thread of its own (`frontend/thread.rs`),
//! the route calls inside the session's task: a message's way from the
//! engine's line to the answer's takes no hand-over between threads.
//!
//! A socket connection that drops raises E_CORE_TCP_DISCONNECT and is made
//! again with a backoff, everything re-installed; the rest of the daemon
//! serves on. When the engine closes the pipes of a spawned evrhost, what
//! is in flight finishes and the daemon exits.

mod answer;
mod counters;
mod link;
mod session;
mod transport;
pub mod wire;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use super::thread::FrontendThread;
use super::{disconnected, Context, Frontend, FrontendError, Running};
use crate::config::{YateConnect, YateSettings};
use crate::dispatcher::{Command, CommandError, HostCommand};
use crate::runtime::CommandInfo;
use crate::sync::lock;
use counters::{bump, Counters, Throttle, YateMetrics};
use link::Outbox;
use session::Ended;

/// The Yate front-end.
pub struct Yate;

/// What every connection of the front-end shares.
pub(crate) struct Shared {
    settings: YateSettings,
    /// `tcp:…`, `unix:…` or `stdio`, for status and logs.
    describe: String,
    counters: Counters,
    /// Engine messages being handled; a permit is held until the answer
    /// is written.
    in_flight: Arc<Semaphore>,
    /// The connection plugins' messages go out on; None between them.
    outbox: Mutex<Option<Outbox>>,
    next_id: AtomicU64,
    /// (message, route, state) of each install, for `yate.status`.
    installs: Mutex<Vec<(String, String, &'static str)>>,
    garbage_report: Throttle,
    overlong_report: Throttle,
    error_in_report: Throttle,
    busy_report: Throttle,
    failure_report: Throttle,
}

impl Shared {
    /// A session is up (it has an outbox).
    fn connected(&self) -> bool {
        lock(&self.outbox).is_some()
    }

    fn in_flight(&self) -> usize {
        self.settings.max_in_flight.saturating_sub(self.in_flight.available_permits())
    }

    fn bufsize(&self) -> usize {
        lock(&self.outbox).as_ref().map_or(0, |o| o.bufsize.load(Relaxed))
    }

    fn waiting(&self) -> usize {
        lock(&self.outbox).as_ref().map_or(0, |o| lock(&o.pending).len())
    }
}

fn describe(connect: &YateConnect) -> String {
    match connect {
        YateConnect::Stdio => "stdio".into(),
        YateConnect::Tcp(addr) => format!("tcp:{addr}"),
        YateConnect::Unix(path) => format!("unix:{}", path.display()),
    }
}

impl Frontend for Yate {
    type Settings = YateSettings;
    const NAME: &'static str = "yate";

    async fn start(settings: YateSettings, ctx: &Context) -> Result<Running, FrontendError> {
        let shared = Arc::new(Shared {
            describe: describe(&settings.connect),
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight)),
            settings,
            counters: Counters::default(),
            outbox: Mutex::new(None),
            next_id: AtomicU64::new(1),
            installs: Mutex::new(Vec::new()),
            garbage_report: Throttle::default(),
            overlong_report: Throttle::default(),
            error_in_report: Throttle::default(),
            busy_report: Throttle::default(),
            failure_report: Throttle::default(),
        });
        ctx.dispatcher.set_message_engine(shared.clone());
        let info = CommandInfo {
            name: "yate.status".into(),
            usage: String::new(),
            description: "the Yate connection: state, installs, in flight, answers by outcome (JSON)".into(),
        };
        let run = Arc::new(Status(Arc::downgrade(&shared)));
        ctx.dispatcher
            .add_command(HostCommand { info, run, admin: false })
            .await
            .map_err(|e| FrontendError::new(Self::NAME, e))?;
        let thread = FrontendThread::start(Self::NAME).map_err(|e| FrontendError::new(Self::NAME, e))?;
        let mut running = Running::new(Self::NAME);
        running.metrics(YateMetrics::of(&shared));
        running.graceful(thread.spawn(serve(shared, ctx.clone())));
        running.on_stop(move || thread.stop());
        Ok(running)
    }
}

/// Connects, serves, and for a socket connects again with a backoff,
/// until the daemon stops.
async fn serve(shared: Arc<Shared>, ctx: Context) {
    let settings = &shared.settings;
    let mut backoff = settings.reconnect_min;
    let mut failures = 0u32;
    loop {
        match transport::open(&settings.connect).await {
            Ok(conn) => {
                failures = 0;
                backoff = settings.reconnect_min;
                let (local, peer, proto) = (conn.local, conn.peer, conn.proto);
                bump(&shared.counters.connects);
                tracing::info!(engine = %shared.describe, "yate: connected");
                let ended = session::run(conn, &shared, &ctx).await;
                let why = match &ended {
                    Ended::Shutdown => return,
                    Ended::Closed => "the engine closed the connection".to_string(),
                    Ended::Failed(e) => format!("reading failed: {e}"),
                };
                if settings.connect == YateConnect::Stdio {
                    tracing::info!("yate: {why}; stopping");
                    ctx.shutdown.cancel();
                    return;
                }
                bump(&shared.counters.disconnects);
                disconnected(ctx.bus(), local, peer, proto);
                tracing::warn!(engine = %shared.describe, "yate: {why}; connecting again");
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(engine = %shared.describe, error = %e, failures, retry_ms = backoff.as_millis() as u64,
                        "yate: cannot connect");
                }
                if settings.connect == YateConnect::Stdio {
                    ctx.shutdown.cancel();
                    return;
                }
            }
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(settings.reconnect_max).max(Duration::from_millis(1));
    }
}

/// `yate.status`.
struct Status(std::sync::Weak<Shared>);

#[async_trait::async_trait]
impl Command for Status {
    async fn run(&self, _args: &str) -> Result<String, CommandError> {
        let shared = self.0.upgrade().ok_or_else(|| CommandError("-ERR the Yate front-end stopped".into()))?;
        Ok(counters::status(&shared))
    }
}
