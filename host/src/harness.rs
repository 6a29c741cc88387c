//! An in-process host for tests and benchmarks (the shape of Spin's
//! `factors-test`): a config's runtime and dispatcher with the built-in
//! commands, and the front-ends it configures, in this process — no
//! binary, no waiting for log lines. Events are watched on the bus itself.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use evrhost::harness::TestHost;
//! let host = TestHost::start("[[plugin]]\nname = \"echo\"\npath = \"{echo}\"\n").await?;
//! let mut loads = host.watch("PLUGIN_RELOAD")?;
//! host.dispatcher.reload("echo", None).await?;
//! assert!(loads.next(std::time::Duration::from_secs(1)).await.is_some());
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::bus::log_layer::LogHub;
use crate::bus::{split_event, BusError, Fired, Sink};
use crate::config::{Config, ConfigError};
use crate::daemon::{self, DaemonError};
use crate::dispatcher::Dispatcher;
use crate::frontend::{launch, udp::Udp, Context, Running};
use crate::kv::KvStore;
use crate::runtime::Event;

/// A component built from `plugins/` by the host's build script.
pub fn plugin(name: &str) -> PathBuf {
    Path::new(env!("EVRHOST_PLUGINS_DIR")).join(format!("{name}.wasm"))
}

/// The names of the components built from `plugins/`.
pub fn plugins() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(env!("EVRHOST_PLUGINS_DIR"))
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".wasm").map(str::to_string)).collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `{NAME}` in a test's config stands for the path of plugin NAME, and
/// `{PLUGINS}` for their directory.
pub fn with_plugin_paths(config: &str) -> String {
    let mut text = config.replace("{PLUGINS}", env!("EVRHOST_PLUGINS_DIR"));
    for name in plugins() {
        text = text.replace(&format!("{{{name}}}"), &plugin(&name).display().to_string());
    }
    text
}

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Frontend(#[from] crate::frontend::FrontendError),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// A host in this process; its front-ends stop when it is dropped.
pub struct TestHost {
    pub dispatcher: Arc<Dispatcher>,
    pub ctx: Context,
    frontends: Vec<Running>,
}

impl TestHost {
    /// Starts `config` (with `{NAME}` plugin paths filled in, no compiled
    /// cache, no RPC listener, kv in memory unless it has a `[kv]` section)
    /// and its UDP front-end. Must run in a tokio runtime.
    pub async fn start(config: &str) -> Result<TestHost, HarnessError> {
        let mut parsed = Config::parse(&with_plugin_paths(config), "(test)", Path::new("."))?;
        parsed.cache_dir = None;
        let has_kv = config.lines().any(|l| l.trim() == "[kv]");
        let kv = if has_kv { KvStore::open(&parsed.kv).map_err(DaemonError::from)? } else { KvStore::default() };
        let config = parsed;
        let dispatcher = daemon::start_with(&config, kv).await?;
        let ctx = Context::new(dispatcher.clone(), LogHub::new());
        let mut frontends = Vec::new();
        frontends.extend(launch::<Udp>((!config.udp.is_empty()).then(|| config.udp.clone()), &ctx).await?);
        Ok(TestHost { dispatcher, ctx, frontends })
    }

    /// Events named `event` (`NAME`, `ALL` or `CUSTOM:SUBCLASS`) from now on.
    pub fn watch(&self, event: &str) -> Result<Watch, HarnessError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (name, subclass) = split_event(event);
        let id = format!("harness:{}", uuid::Uuid::new_v4());
        self.dispatcher.bus().subscribe(&id, || Box::new(ChannelSink(tx)), name, subclass, None)?;
        Ok(Watch { rx })
    }

    /// Stops the front-ends.
    pub async fn stop(mut self) {
        for frontend in self.frontends.drain(..) {
            frontend.stop().await;
        }
    }
}

/// Events as the bus delivers them to a subscriber.
pub struct Watch {
    rx: mpsc::UnboundedReceiver<Arc<Event>>,
}

impl Watch {
    /// The next event, or None after `within`.
    pub async fn next(&mut self, within: Duration) -> Option<Arc<Event>> {
        tokio::time::timeout(within, self.rx.recv()).await.ok().flatten()
    }
}

/// Hands on each event with its standard headers, as plugins get it.
struct ChannelSink(mpsc::UnboundedSender<Arc<Event>>);

#[async_trait::async_trait]
impl Sink for ChannelSink {
    async fn deliver(&mut self, event: &Fired) -> bool {
        self.0.send(Arc::new(event.event().clone())).is_ok()
    }
}

/// The value of a header of `event`.
pub fn header<'e>(event: &'e Event, name: &str) -> Option<&'e str> {
    event.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// `evrhost run -c CONFIG` in a child process, killed on drop: the daemon
/// the end-to-end tests and the benches talk to over real sockets. `bin` is
/// the binary (`env!("CARGO_BIN_EXE_evrhost")` where cargo gives it).
pub struct Spawned {
    child: std::process::Child,
    pub rpc: std::net::SocketAddr,
    log: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start evrhost: {0}")]
    Io(#[from] std::io::Error),
    #[error("evrhost exited with {status} before serving:\n{log}")]
    Exited { status: std::process::ExitStatus, log: String },
    #[error("evrhost did not listen on {rpc} within {within:?}:\n{log}")]
    NotReady { rpc: std::net::SocketAddr, within: Duration, log: String },
}

impl Spawned {
    /// Starts the daemon on the config file `config`, its log (stderr) to
    /// `log`, with `env` set, and waits until it logs that it is ready (at
    /// info level) and its RPC listener `rpc` accepts connections.
    pub fn start(
        bin: &Path,
        config: &Path,
        rpc: std::net::SocketAddr,
        log: &Path,
        env: &[(&str, &str)],
        within: Duration,
    ) -> Result<Spawned, SpawnError> {
        use std::process::{Command, Stdio};
        let mut command = Command::new(bin);
        command.arg("run").arg("-c").arg(config).env_remove("RUST_LOG");
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(log)?).spawn()?;
        let mut spawned = Spawned { child, rpc, log: log.to_path_buf() };
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = spawned.child.try_wait()? {
                return Err(SpawnError::Exited { status, log: spawned.log() });
            }
            // Its own "ready" line, not merely a port that answers: another
            // daemon may hold the port this one failed to bind.
            if spawned.log().contains(" ready")
                && std::net::TcpStream::connect_timeout(&rpc, Duration::from_millis(200)).is_ok()
            {
                return Ok(spawned);
            }
            if started.elapsed() > within {
                return Err(SpawnError::NotReady { rpc, within, log: spawned.log() });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
