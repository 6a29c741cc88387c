//! The `evrhost` command: the daemon, its RPC client and the plugin
//! author's tools.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::Value;

use evrhost::bus::Target;
use evrhost::config::{Config, ExecKind, PluginDef, RouteDef, RpcSettings, DEFAULT_RPC_LISTEN};
use evrhost::dispatcher::Dispatcher;
use evrhost::frontend::metrics::Registry;
use evrhost::frontend::{client::RpcClient, http, rpc_thread::RpcThread, udp, unix};
use evrhost::runtime::{Export, Isolation, Origin, Request, Runtime};
use evrhost::{exec, housekeeping};

#[derive(Parser)]
#[command(name = "evrhost", version, about = "Runs sandboxed WebAssembly components as event-route handlers")]
struct Cli {
    /// Log filter, e.g. `info`, `debug`, `evrhost=debug,plugin=warn`
    /// (RUST_LOG wins when set).
    #[arg(long, global = true, default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the daemon (without -c: the embedded default config and plugins).
    Run {
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Listen for JSON-RPC here instead of the config's `[rpc] listen`.
        #[arg(long, value_name = "IP:PORT")]
        listen: Option<std::net::SocketAddr>,
    },
    /// Runs one route of a plugin once and prints the reply, fuel and time.
    Call {
        plugin: PathBuf,
        route: String,
        /// The request's data.
        data: Option<String>,
        /// A request parameter (repeatable).
        #[arg(long = "param", value_name = "NAME=VALUE", value_parser = parse_param)]
        params: Vec<(String, String)>,
        #[arg(long)]
        fuel: Option<u64>,
        #[arg(long)]
        deadline_ms: Option<u64>,
        #[arg(long)]
        memory_mb: Option<u64>,
        /// A fresh instance for the call, as `isolation = "per-call"`.
        #[arg(long)]
        per_call: bool,
    },
    /// Shows a plugin's exports, imports and commands.
    Inspect { plugin: PathBuf },
    /// Checks a config: syntax, references, and that every plugin compiles,
    /// instantiates and exports what its routes need.
    Check { config: PathBuf },
    /// Calls a JSON-RPC method of a running daemon, like kamcmd.
    Rpc {
        method: String,
        /// Parameters; numeric-looking ones are sent as numbers unless
        /// prefixed with `s:`.
        params: Vec<String>,
        /// The daemon's RPC address.
        #[arg(short, long, default_value = DEFAULT_RPC_LISTEN)]
        addr: std::net::SocketAddr,
        #[arg(long, env = "EVRHOST_RPC_TOKEN")]
        token: Option<String>,
        /// Print the whole JSON response.
        #[arg(long)]
        json: bool,
    },
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("`{s}`: expected NAME=VALUE"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cli.log))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    {
        use tracing_subscriber::prelude::*;
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter);
        tracing_subscriber::registry().with(fmt).with(evrhost::bus::log_layer::BusLayer).init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config, listen } => run(config.as_deref(), listen).await,
        Command::Call { plugin, route, data, params, fuel, deadline_ms, memory_mb, per_call } => {
            let mut def = plugin_def(&plugin)?;
            let limits = &mut def.spec.limits;
            limits.fuel = fuel.unwrap_or(limits.fuel);
            limits.deadline = deadline_ms.map_or(limits.deadline, std::time::Duration::from_millis);
            limits.memory_bytes = memory_mb.map_or(limits.memory_bytes, |mb| (mb as usize) << 20);
            if per_call {
                limits.isolation = Isolation::PerCall;
            }
            call(def, &route, data.unwrap_or_default(), params).await
        }
        Command::Inspect { plugin } => inspect(&plugin).await,
        Command::Check { config } => check(&config).await,
        Command::Rpc { method, params, addr, token, json } => rpc(addr, token, &method, &params, json).await,
    }
}

/// A plugin from a file, named after it.
fn plugin_def(path: &Path) -> anyhow::Result<PluginDef> {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("plugin");
    let name: String =
        stem.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).take(64).collect();
    let path = path.to_str().with_context(|| format!("{}: the path is not UTF-8", path.display()))?;
    PluginDef::with_defaults(&name, path).map_err(anyhow::Error::msg)
}

/// A config holding one plugin, for the one-shot commands.
fn single(def: PluginDef, routes: Vec<RouteDef>) -> Config {
    let mut config = Config::parse("", "(command line)", Path::new(".")).expect("an empty config is valid");
    config.plugins = vec![def];
    config.routes = routes;
    config.rpc = RpcSettings { listen: None, unix: None, token: None };
    config.exec = Vec::new();
    config
}

async fn start(config: &Config) -> anyhow::Result<Arc<Dispatcher>> {
    let runtime = Runtime::new(config.engine.clone(), config.cache_dir.clone())?;
    Ok(Dispatcher::start(runtime, config).await?)
}

async fn run(path: Option<&Path>, listen: Option<std::net::SocketAddr>) -> anyhow::Result<ExitCode> {
    let started = std::time::Instant::now();
    let (mut config, origin) = match path {
        Some(path) => (Config::load(path)?, path.display().to_string()),
        None => (Config::embedded_default()?, "the embedded default config".to_string()),
    };
    if listen.is_some() {
        config.rpc.listen = listen;
    }
    let d = start(&config).await?;
    let registry = Arc::new(Registry::default());
    let mut background = vec![housekeeping::spawn(d.clone(), config.events.clone())];
    if let Some(level) = config.events.log {
        evrhost::bus::log_layer::enable(Arc::downgrade(d.bus()), level);
    }
    for (event, socket) in &config.events.subscribe {
        // Checked when the config was read.
        if let Ok(target) = Target::parse(socket) {
            let (name, subclass) = evrhost::bus::split_event(event);
            d.bus().subscribe(target, name, subclass, None).map_err(anyhow::Error::msg)?;
        }
    }

    for exec in &config.exec {
        if let ExecKind::Udp(def) = &exec.kind {
            let socket = udp::bind(def)?;
            let (endpoint, tasks) = udp::start(&exec.name, def, socket, d.clone())?;
            tracing::info!(route = %exec.name, workers = def.workers, "UDP on udp:{}", endpoint.addr);
            registry.add_udp(endpoint);
            background.extend(tasks);
        }
    }
    // Before the RPC listener: once that answers, peers can find the node.
    if let Some(settings) = &config.erlang {
        let (node, tasks) = evrhost::frontend::erlang::Node::start(settings.clone(), &d).await?;
        tracing::info!("Erlang C-node {} on port {}", node.name, settings.listen.port());
        background.extend(tasks);
    }
    let rpc_thread = RpcThread::start().context("cannot start the RPC thread")?;
    if let Some(addr) = config.rpc.listen {
        let listener = http::bind(addr)?;
        let addr = listener.local_addr().unwrap_or(addr);
        rpc_thread.spawn(http::serve(listener, d.clone(), registry.clone(), config.rpc.token.clone()));
        tracing::info!("JSON-RPC on http://{addr}/RPC, metrics on http://{addr}/metrics");
        tracing::info!("try: evrhost rpc -a {addr} evrexec.run evrexec:test mydata");
    }
    if let Some(path) = &config.rpc.unix {
        rpc_thread.spawn(unix::serve(unix::bind(path)?, d.clone()));
        tracing::info!("JSON-RPC on unix:{}", path.display());
    }
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

    wait_for_shutdown(&d).await?;
    rpc_thread.stop();
    tasks.stop().await;
    for task in background {
        task.abort();
    }
    if let Some(path) = &config.rpc.unix {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("evrhost stopped");
    Ok(ExitCode::SUCCESS)
}

/// Returns on SIGINT or SIGTERM; SIGHUP reloads every plugin from where it
/// was loaded (an unchanged one comes from the compiled cache).
async fn wait_for_shutdown(d: &Arc<Dispatcher>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading every plugin");
                for p in d.plugins() {
                    // Errors are logged by reload; the old version serves on.
                    let _ = d.reload(&p.name, None).await;
                }
            }
        }
    }
}

async fn call(def: PluginDef, route: &str, data: String, params: Vec<(String, String)>) -> anyhow::Result<ExitCode> {
    let name = def.spec.name.clone();
    let config = single(def, vec![RouteDef { name: route.to_string(), plugin: name, priority: 0 }]);
    let d = start(&config).await?;
    let request = Request { route: route.to_string(), data: data.into_bytes(), params, origin: Origin::Cli };
    match d.run_route(&request).await {
        Ok(outcome) => {
            let r = &outcome.reply;
            println!("handled: {}", r.handled);
            println!("retval:  {}", r.retval);
            for (k, v) in &r.params {
                println!("param:   {k}={v}");
            }
            if let Some(data) = &r.data {
                println!("data:    {} ({} bytes)", String::from_utf8_lossy(data), data.len());
            }
            println!("fuel:    {}", outcome.report.fuel);
            println!("time:    {} µs", outcome.report.elapsed.as_micros());
            Ok(ExitCode::SUCCESS)
        }
        Err(evrhost::dispatcher::DispatchError::Call(e)) => {
            println!("error:   {e}");
            println!("cause:   {}", e.cause.kind());
            let stats = d.plugins().into_iter().next().map(|p| p.stats);
            if let Some(stats) = stats {
                println!("fuel:    {}", stats.fuel);
                println!("time:    {} µs", stats.busy_us);
            }
            Ok(ExitCode::from(1))
        }
        Err(e) => Err(e.into()),
    }
}

async fn inspect(path: &Path) -> anyhow::Result<ExitCode> {
    let def = plugin_def(path)?;
    let name = def.spec.name.clone();
    let config = single(def, Vec::new());
    let d = start(&config).await?;
    let version = d.plugin(&name).context("the plugin did not load")?;
    let wasm = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    let (component, _) = d.runtime().compile(&name, &path.display().to_string(), &wasm)?;
    let info = d.runtime().describe(&component);
    println!("plugin:   {name} ({} bytes, blake3 {})", wasm.len(), version.short_hash());
    let exports: Vec<&str> = version.exports().iter().map(|e| e.name()).collect();
    println!(
        "exports:  {}",
        if exports.is_empty() { "(none evrhost can call)".to_string() } else { exports.join(", ") }
    );
    for e in Export::ALL {
        if version.has_export(e) {
            println!("          {}", e.interface());
        }
    }
    println!("imports:");
    for i in &info.imports {
        println!("          {i}");
    }
    if !version.commands().is_empty() {
        println!("commands:");
        for c in version.commands() {
            println!("          {} {} — {}", c.name, c.usage, c.description);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn check(path: &Path) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(path)?;
    config.rpc.listen = None;
    let d = start(&config).await?;
    println!(
        "{}: ok: {} plugins, {} routes, {} commands",
        path.display(),
        d.plugins().len(),
        d.routes().len(),
        d.commands().len()
    );
    Ok(ExitCode::SUCCESS)
}

/// kamcmd's convention: numeric-looking arguments go as numbers; `s:`
/// forces a string.
fn rpc_param(arg: &str) -> Value {
    if let Some(s) = arg.strip_prefix("s:") {
        return Value::String(s.to_string());
    }
    if let Ok(i) = arg.parse::<i64>() {
        return Value::from(i);
    }
    Value::String(arg.to_string())
}

async fn rpc(
    addr: std::net::SocketAddr,
    token: Option<String>,
    method: &str,
    params: &[String],
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut client = RpcClient::connect(addr, token).await?;
    let params = Value::Array(params.iter().map(|p| rpc_param(p)).collect());
    let response = client.call(method, params).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&response)?);
    }
    if let Some(error) = response.get("error") {
        if !json {
            let code = error.get("code").cloned().unwrap_or(Value::Null);
            let message = error.get("message").and_then(Value::as_str).unwrap_or("(no message)");
            eprintln!("error: {code} - {message}");
        }
        return Ok(ExitCode::from(1));
    }
    if !json {
        match response.get("result") {
            Some(Value::String(text)) => println!("{text}"),
            Some(other) => println!("{}", serde_json::to_string_pretty(other)?),
            None => bail!("the response has neither result nor error: {response}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}
