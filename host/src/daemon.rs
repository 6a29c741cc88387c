//! The daemon: a runtime and a dispatcher with the built-in commands, the
//! configured event subscribers, the front-ends, exec tasks and periodic
//! work, until SIGINT or SIGTERM; SIGHUP reloads every plugin.

use std::sync::Arc;
use std::time::Instant;

use crate::bus::log_layer::LogHub;
use crate::bus::{split_event, BusError};
use crate::config::Config;
use crate::dispatcher::{DispatchError, Dispatcher};
use crate::frontend::erlang::Erlang;
use crate::frontend::rpc::Rpc;
use crate::frontend::udp::Udp;
use crate::frontend::yate::Yate;
use crate::frontend::{launch, Context, FrontendError};
use crate::kv::{Durability, KvBackend, KvStore, OpenError};
use crate::runtime::{Runtime, RuntimeError};
use crate::{builtins, exec, housekeeping};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error("[[events.subscribe]]: {0}")]
    Subscribe(#[from] BusError),
    #[error("cannot watch for signals: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Kv(#[from] OpenError),
}

/// A runtime and a dispatcher for `config`, with the built-in commands and
/// kv in memory: all that `evrhost call`, `inspect` and `check` need (they
/// never touch a running daemon's store).
pub async fn start(config: &Config) -> Result<Arc<Dispatcher>, DaemonError> {
    start_with(config, KvStore::default()).await
}

/// `start` on the given kv store.
pub async fn start_with(config: &Config, kv: KvStore) -> Result<Arc<Dispatcher>, DaemonError> {
    let runtime = Runtime::new(config.engine.clone(), config.cache_dir.clone())?;
    let d = Dispatcher::start_with(runtime, config, kv).await?;
    builtins::install(&d).await?;
    Ok(d)
}

/// Serves `config` until a signal stops it. `origin` names the config in
/// the log; `logs` is the hub the process's tracing layer feeds; `ready`
/// runs once every front-end serves.
pub async fn run(config: Config, origin: &str, logs: Arc<LogHub>, ready: impl FnOnce()) -> Result<(), DaemonError> {
    let started = Instant::now();
    let kv = KvStore::open(&config.kv)?;
    tracing::info!(backend = kv.backend_name(), "kv: {}", describe(&config.kv));
    let d = start_with(&config, kv).await?;
    let periodic = housekeeping::spawn(d.clone(), config.events.clone());
    if let Some(level) = config.events.log {
        logs.enable(Arc::downgrade(d.bus()), level);
    }
    let ctx = Context::new(d.clone(), logs);
    for (event, socket) in &config.events.subscribe {
        let (name, subclass) = split_event(event);
        ctx.sinks.subscribe(d.bus(), socket, name, subclass, None)?;
    }
    let rpc = &config.rpc;
    // One line per front-end. The RPC listener comes last: once it answers,
    // the daemon is ready (and Erlang peers can find the node).
    let frontends = [
        launch::<Udp>((!config.udp.is_empty()).then(|| config.udp.clone()), &ctx).await?,
        launch::<Erlang>(config.erlang.clone(), &ctx).await?,
        launch::<Yate>(config.yate.clone(), &ctx).await?,
        launch::<Rpc>((rpc.listen.is_some() || rpc.unix.is_some()).then(|| rpc.clone()), &ctx).await?,
    ];
    let tasks = exec::Tasks::start(&d, &config.exec);

    let plugins: Vec<String> = d.plugins().into_iter().map(|p| format!("{} ({})", p.name, p.source)).collect();
    let routes: Vec<String> = d.routes().into_iter().map(|r| r.name).collect();
    tracing::info!(config = %origin, "evrhost {} serving", env!("CARGO_PKG_VERSION"));
    tracing::info!("plugins: {}", plugins.join(", "));
    tracing::info!("routes: {}", routes.join(", "));
    if !tasks.is_empty() {
        tracing::info!("exec tasks: {} workers", tasks.len());
    }
    tracing::info!(ms = started.elapsed().as_secs_f64() * 1e3, "ready");
    ready();

    wait_for_shutdown(&d, &ctx.shutdown).await?;
    ctx.shutdown.cancel();
    let stop = async {
        for frontend in frontends.into_iter().rev().flatten() {
            frontend.stop().await;
        }
        tasks.stop().await;
    };
    if tokio::time::timeout(STOP_WITHIN, stop).await.is_err() {
        tracing::warn!(seconds = STOP_WITHIN.as_secs(), "front-ends and tasks did not stop in time; leaving them");
    }
    periodic.abort();
    // After the front-ends: no call writes any more.
    d.kv().close(STOP_WITHIN);
    tracing::info!("evrhost stopped");
    Ok(())
}

fn describe(backend: &KvBackend) -> String {
    match backend {
        KvBackend::Memory => "in memory, gone at exit".into(),
        KvBackend::Embedded { dir, durability: Durability::Sync } => {
            format!("{}/kv.redb, each acknowledged write on disk", dir.display())
        }
        KvBackend::Embedded { dir, durability: Durability::Relaxed(every) } => {
            format!("{}/kv.redb, committed every {} ms (a crash loses at most that)", dir.display(), every.as_millis())
        }
        KvBackend::Redis(r) => format!("redis, {} connection(s), key prefix {}", r.pool, r.prefix),
    }
}

/// How long stopping may take: whatever is still running then (a call that
/// never yields, a reload stuck on a slow disk) is left to process exit.
const STOP_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Returns on SIGINT or SIGTERM, or when a front-end asks (`shutdown`
/// cancelled: Yate closed the pipes of the evrhost it spawned). SIGHUP
/// reloads every plugin from where it was loaded (an unchanged one comes
/// from the compiled cache), in a task of its own, so that a slow reload
/// never delays a stop.
async fn wait_for_shutdown(
    d: &Arc<Dispatcher>,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<(), DaemonError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = shutdown.cancelled() => return Ok(()),
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading every plugin");
                let d = d.clone();
                tokio::spawn(async move {
                    for p in d.plugins() {
                        // Errors are logged by reload; the old version serves on.
                        let _ = d.reload(&p.name, None).await;
                    }
                });
            }
        }
    }
}
