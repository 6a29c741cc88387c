//! The `evrhost` command: the daemon, its RPC client and the plugin
//! author's tools.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::Value;

use evrhost::bus::log_layer::{BusLayer, LogHub};
use evrhost::config::{Config, PluginDef, RouteDef, DEFAULT_RPC_LISTEN};
use evrhost::daemon::{self, start};
use evrhost::frontend::client::RpcClient;
use evrhost::frontend::rpc::jsonrpc;
use evrhost::runtime::{Export, Isolation, Origin, Request};

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
        /// Bind the config's UDP route socket here instead (a config with
        /// exactly one `[[exec]] sockaddr`, as the embedded default).
        #[arg(long, value_name = "IP:PORT")]
        udp: Option<std::net::SocketAddr>,
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
    /// Makes a plugin project: `evrhost new hello --lang js`, then `evrhost build hello`.
    New {
        name: String,
        #[arg(long, value_enum)]
        lang: evrhost::guest::Language,
        /// Where to make it (its directory is DIR/NAME).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Builds a plugin project (a directory with a plugin.toml) into a component.
    Build {
        #[arg(default_value = ".")]
        project: PathBuf,
        /// The component's path (default: PROJECT/NAME.wasm).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Shows a plugin's exports, imports and commands.
    Inspect { plugin: PathBuf },
    /// Checks a config: syntax, references, and that every plugin compiles,
    /// instantiates and exports what its routes need.
    Check { config: PathBuf },
    /// Calls a JSON-RPC method of a running daemon, like kamcmd; `--help
    /// METHOD` asks the daemon what METHOD takes.
    #[command(disable_help_flag = true)]
    Rpc {
        /// A JSON-RPC method (`system.listMethods` lists them).
        #[arg(value_parser = MethodName, hide_possible_values = true, required_unless_present = "help")]
        method: Option<String>,
        /// Parameters; numeric-looking ones are sent as numbers unless
        /// prefixed with `s:`.
        params: Vec<String>,
        /// The daemon's RPC address.
        #[arg(short, long, default_value = DEFAULT_RPC_LISTEN)]
        addr: std::net::SocketAddr,
        /// The daemon's `[rpc] token`.
        #[arg(long, env = "EVRHOST_RPC_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Print the whole JSON response.
        #[arg(long, conflicts_with = "table")]
        json: bool,
        /// Print a list result as a table even when not on a terminal (on
        /// one, that is the default).
        #[arg(long)]
        table: bool,
        /// Print help; with METHOD, the daemon's usage of that method.
        #[arg(short, long)]
        help: bool,
    },
    /// Prints a shell completion script: `source <(evrhost completions bash)`.
    Completions { shell: clap_complete::Shell },
}

/// Any method name, offering the daemon's own as completions (a newer
/// daemon may answer more).
#[derive(Clone)]
struct MethodName;

impl clap::builder::TypedValueParser for MethodName {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        clap::builder::StringValueParser::new().parse_ref(cmd, arg, value)
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        Some(Box::new(jsonrpc::methods().map(|(name, usage)| clap::builder::PossibleValue::new(*name).help(*usage))))
    }
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("`{s}`: expected NAME=VALUE"))
}

/// Yate starts a script with one argument at most (`execl(script, script,
/// arg)`): `evrhost CONFIG.toml` is `evrhost run -c CONFIG.toml`, so an
/// `extmodule.conf` `[scripts]` line can name evrhost and its config.
fn args() -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let [_, only] = args.as_slice() {
        let path = Path::new(only);
        if path.extension().is_some_and(|e| e == "toml") {
            let config = only.clone();
            args.truncate(1);
            args.extend(["run".into(), "-c".into(), config]);
        }
    }
    args
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(args());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cli.log))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = LogHub::new();
    // A file past RLIMIT_FSIZE must fail the write (EFBIG, which the kv
    // store reports) rather than kill the daemon.
    // SAFETY: SIG_IGN installs no handler code; nothing else has set one yet.
    let _ =
        unsafe { nix::sys::signal::signal(nix::sys::signal::Signal::SIGXFSZ, nix::sys::signal::SigHandler::SigIgn) };
    {
        use tracing_subscriber::prelude::*;
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter);
        tracing_subscriber::registry().with(fmt).with(BusLayer::new(logs.clone())).init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli.command, logs)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command, logs: Arc<LogHub>) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config, listen, udp } => run(config.as_deref(), listen, udp, logs).await,
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
        Command::New { name, lang, dir } => {
            let made = evrhost::guest::new(&dir, &name, lang)?;
            println!("made {}: see its README.md, then `evrhost build {}`", made.display(), made.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Build { project, output } => {
            let built = evrhost::guest::build(&project, output.as_deref())?;
            println!(
                "built {} ({}): {}",
                built.manifest.name,
                built.manifest.language.name(),
                built.component.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { plugin } => inspect(&plugin).await,
        Command::Check { config } => check(&config).await,
        Command::Rpc { method: None, .. } => {
            let mut cli = <Cli as clap::CommandFactory>::command();
            if let Some(rpc) = cli.find_subcommand_mut("rpc") {
                rpc.clone().bin_name("evrhost rpc").print_help()?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Rpc { method: Some(method), addr, token, help: true, .. } => method_help(addr, token, &method).await,
        Command::Rpc { method: Some(method), params, addr, token, json, table, help: false } => {
            use std::io::IsTerminal;
            let output = match (json, table || std::io::stdout().is_terminal()) {
                (true, _) => Output::Json,
                (false, true) => Output::Table,
                (false, false) => Output::Plain,
            };
            rpc(addr, token, &method, &params, output).await
        }
        Command::Completions { shell } => {
            let mut cli = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cli, "evrhost", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A plugin from a file, named after it.
fn plugin_def(path: &Path) -> anyhow::Result<PluginDef> {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("plugin");
    let name: String =
        stem.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).take(64).collect();
    let path = path.to_str().with_context(|| format!("{}: the path is not UTF-8", path.display()))?;
    Ok(PluginDef::with_defaults(&name, path)?)
}

/// A config holding one plugin, for the one-shot commands.
fn single(def: PluginDef, routes: Vec<RouteDef>) -> Config {
    let mut config = Config::empty();
    config.plugins = vec![def];
    config.routes = routes;
    config
}

async fn run(
    path: Option<&Path>,
    listen: Option<std::net::SocketAddr>,
    udp: Option<std::net::SocketAddr>,
    logs: Arc<LogHub>,
) -> anyhow::Result<ExitCode> {
    let (mut config, origin) = match path {
        Some(path) => (Config::load(path)?, path.display().to_string()),
        None => (Config::embedded_default()?, "the embedded default config".to_string()),
    };
    if listen.is_some() {
        config.rpc.listen = listen;
        config.rpc.check_exposure().context("--listen")?;
    }
    if let Some(addr) = udp {
        match config.udp.as_mut_slice() {
            [only] => only.addr = addr,
            other => bail!("--udp: the config has {} UDP route sockets; it takes one", other.len()),
        }
    }
    // Yate may speak to evrhost over its stdout: only the embedded default
    // prints anything there.
    let greeting = if path.is_none() { greeting(&config) } else { String::new() };
    daemon::run(config, &origin, logs, move || print!("{greeting}")).await?;
    Ok(ExitCode::SUCCESS)
}

/// What to try first, once the embedded default serves: one line per job,
/// each a command that works as printed.
fn greeting(config: &Config) -> String {
    let addr = config.rpc.listen.map(|a| a.to_string()).unwrap_or_default();
    let rpc = if addr == DEFAULT_RPC_LISTEN { "evrhost rpc".to_string() } else { format!("evrhost rpc -a {addr}") };
    let mut lines = vec![
        (format!("{rpc} route.run echo hello"), "a route: its reply, fuel and time".to_string()),
        (format!("{rpc} evrexec.run evrexec:test mydata"), "as kamcmd runs Kamailio's".to_string()),
    ];
    for udp in &config.udp {
        let (ip, port) = (udp.addr.ip(), udp.addr.port());
        let datagram = format!("printf 'user=alice;ip=10.0.0.1' > /dev/udp/{ip}/{port}");
        lines.push((datagram, format!("a datagram to route `{}` (bash)", udp.route)));
    }
    if config.plugins.iter().any(|p| p.spec.name == "kvcount") {
        lines.push((format!("{rpc} api.run kvcount.get user"), "what the datagrams counted".to_string()));
    }
    if config.events.heartbeat.is_some() {
        let subscribe = format!("{rpc} event.subscribe HEARTBEAT udp:127.0.0.1:7091 && nc -ulp 7091");
        lines.push((subscribe, "events, as OpenSIPS sends them".to_string()));
    }
    let width = lines.iter().map(|(command, _)| command.len()).max().unwrap_or(0);
    let mut out = format!("evrhost is ready. JSON-RPC on {addr}; try:\n");
    for (command, why) in lines {
        out.push_str(&format!("  {command:<width$}  # {why}\n"));
    }
    out
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
            if let Some(bt) = &e.backtrace {
                println!("backtrace (innermost first):");
                print!("{bt}");
            }
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
    let (component, _) = d.runtime().compile(&name, &path.display().to_string(), &wasm, &blake3::hash(&wasm))?;
    let info = d.runtime().describe(&component);
    println!("plugin:   {name} ({} bytes, blake3 {})", wasm.len(), version.short_hash());
    let footprint = evrhost::runtime::footprint::Footprint::of(&wasm);
    let source = if footprint.built_by_evrhost { "evrhost build" } else { "its producers sections" };
    let mut built_with = footprint.built_with.join(", ");
    if !built_with.is_empty() {
        built_with.insert_str(0, "; ");
    }
    println!("language: {} ({source}{built_with})", footprint.language.as_deref().unwrap_or("unknown"));
    println!(
        "needs:    {} core instances, {} memories, {} KiB of memory to start (memory_mb >= {})",
        footprint.core_instances,
        footprint.memories,
        footprint.initial_memory >> 10,
        footprint.initial_memory.div_ceil(1 << 20).max(1)
    );
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
    let config = Config::load(path)?;
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

/// How `evrhost rpc` prints a result.
#[derive(Clone, Copy, PartialEq)]
enum Output {
    /// The whole response.
    Json,
    /// Lists as tables, the rest as `Plain`.
    Table,
    /// Text as itself, anything else as pretty JSON.
    Plain,
}

async fn rpc(
    addr: std::net::SocketAddr,
    token: Option<String>,
    method: &str,
    params: &[String],
    output: Output,
) -> anyhow::Result<ExitCode> {
    let mut client = RpcClient::connect(addr, token).await?;
    let params = Value::Array(params.iter().map(|p| rpc_param(p)).collect());
    let response = client.call(method, params).await?;
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&response)?);
    }
    if let Some(error) = response.get("error") {
        if output != Output::Json {
            let code = error.get("code").cloned().unwrap_or(Value::Null);
            let message = error.get("message").and_then(Value::as_str).unwrap_or("(no message)");
            eprintln!("error: {code} - {message}");
        }
        return Ok(ExitCode::from(1));
    }
    let result =
        response.get("result").with_context(|| format!("the response has neither result nor error: {response}"))?;
    match result {
        _ if output == Output::Json => {}
        Value::String(text) => println!("{text}"),
        other => match evrhost::frontend::table::render(method, other).filter(|_| output == Output::Table) {
            Some(table) => print!("{table}"),
            None => println!("{}", serde_json::to_string_pretty(other)?),
        },
    }
    Ok(ExitCode::SUCCESS)
}

/// `evrhost rpc --help METHOD`: the daemon's `system.methodHelp`, or the
/// usage this binary knows when no daemon answers.
async fn method_help(addr: std::net::SocketAddr, token: Option<String>, method: &str) -> anyhow::Result<ExitCode> {
    let asked = match RpcClient::connect(addr, token).await {
        Ok(mut client) => Some(client.call("system.methodHelp", Value::Array(vec![method.into()])).await?),
        Err(_) => None,
    };
    let usage = match &asked {
        Some(response) => match (response.get("result"), response.get("error")) {
            (Some(Value::String(usage)), _) => usage.clone(),
            (_, Some(error)) => {
                let message = error.get("message").and_then(Value::as_str).unwrap_or("(no message)");
                bail!("{method}: {message}");
            }
            _ => bail!("system.methodHelp answered {response}"),
        },
        None => match jsonrpc::methods().find(|(name, _)| *name == method) {
            Some((_, usage)) => format!("{usage}  (from this binary: no daemon at {addr})"),
            None => bail!("{method}: no such method, and no daemon at {addr} to ask"),
        },
    };
    println!("{method} {usage}");
    Ok(ExitCode::SUCCESS)
}
