//! The dispatcher, reload, routes, commands and pools tested in process
//! (`evrhost::harness::TestHost`): no binary, no sockets unless a test asks
//! for a front-end, no waiting for log lines — what happened is read from
//! the bus and the dispatcher.

use std::sync::Arc;
use std::time::Duration;

use evrhost::bus::log_layer::BusLayer;
use evrhost::config::CodeSource;
use evrhost::dispatcher::{Command, CommandError, DispatchError, HostCommand, RemoteError, RemoteHandler, RemoteRoute};
use evrhost::harness::{header, plugin, TestHost};
use evrhost::runtime::{CommandInfo, Origin, Reply, Request};

#[path = "inprocess/batch.rs"]
mod batch;
#[path = "inprocess/datagrams.rs"]
mod datagrams;
#[path = "inprocess/event_batches.rs"]
mod event_batches;
#[path = "inprocess/udp_bursts.rs"]
mod udp_bursts;

const SECOND: Duration = Duration::from_secs(1);

fn request(route: &str, data: &str) -> Request {
    Request { route: route.into(), data: data.as_bytes().to_vec(), params: Vec::new(), origin: Origin::Cli }
}

const ECHO: &str = r#"
[[plugin]]
name = "echo"
path = "{echo}"

[[route]]
name = "echo"
plugin = "echo"
"#;

#[tokio::test]
async fn a_refused_reload_raises_plugin_fail_and_the_old_version_serves_on() {
    let host = TestHost::start(ECHO).await.expect("the host starts");
    let d = &host.dispatcher;
    let before = d.plugin("echo").expect("echo is loaded").hash.clone();
    let mut fails = host.watch("PLUGIN_FAIL").expect("watch");
    let mut reloads = host.watch("PLUGIN_RELOAD").expect("watch");

    let dir = tempfile::tempdir().expect("temp dir");
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"not wasm").expect("write");
    // A component built against the contract before this one.
    let old = dir.path().join("old.wasm");
    let old_component = wat::parse_str(r#"(component (import "evrhost:plugin/host@0.1.0" (instance)))"#);
    std::fs::write(&old, old_component.expect("wat")).expect("write");
    let cases = [
        (
            CodeSource::File(old),
            "it was built for evrhost:plugin@0.1.0 (it names `evrhost:plugin/host@0.1.0`); \
             this evrhost speaks evrhost:plugin@0.2.0",
        ),
        (CodeSource::File(garbage), "is not WebAssembly"),
        (CodeSource::File(dir.path().join("missing.wasm")), "cannot read"),
        (CodeSource::File(plugin("timer")), "does not export `evrhost:plugin/route@0.2.0`, which route `echo` needs"),
    ];
    for (code, expected) in cases {
        let Err(err) = d.reload("echo", Some(code)).await else { panic!("a bad version must be refused") };
        assert!(err.to_string().contains(expected), "{err}");
        let event = fails.next(SECOND).await.expect("PLUGIN_FAIL is raised");
        assert_eq!(header(&event, "Plugin"), Some("echo"));
        assert!(header(&event, "Error").is_some_and(|e| e.contains(expected)), "{event:?}");
        let outcome = d.run_route(&request("echo", "still here")).await.expect("the old version serves");
        assert_eq!(outcome.reply.data.as_deref(), Some(&b"still here"[..]));
    }
    assert_eq!(d.plugin("echo").expect("loaded").hash, before, "nothing was swapped");
    assert!(reloads.next(Duration::from_millis(50)).await.is_none(), "no PLUGIN_RELOAD for a refused version");

    let new = d.reload("echo", Some(CodeSource::File(plugin("echo")))).await.expect("a good reload");
    let event = reloads.next(SECOND).await.expect("PLUGIN_RELOAD");
    assert_eq!(header(&event, "Plugin-Hash"), Some(new.short_hash()));
}

/// A remote target that answers with a fixed reply, or declines.
struct Fixed {
    name: String,
    handled: bool,
}

#[async_trait::async_trait]
impl RemoteHandler for Fixed {
    fn name(&self) -> &str {
        &self.name
    }
    async fn handle(&self, _request: &Request) -> Result<Reply, RemoteError> {
        if self.name.contains("broken") {
            return Err(RemoteError("the peer is gone".into()));
        }
        Ok(Reply {
            handled: self.handled,
            retval: self.name.clone(),
            params: Vec::new(),
            unset: Vec::new(),
            data: None,
        })
    }
}

fn remote(route: &str, priority: i32, name: &str, handled: bool) -> RemoteRoute {
    RemoteRoute { route: route.into(), priority, handler: Arc::new(Fixed { name: name.into(), handled }) }
}

#[tokio::test]
async fn plugins_and_remote_targets_share_one_routing_path_in_priority_order() {
    // echo answers handled with retval "ok", at priority 100.
    let host = TestHost::start(ECHO).await.expect("the host starts");
    let d = &host.dispatcher;
    d.add_remote_route(remote("echo", 10, "test:declines", false)).await.expect("added");
    d.add_remote_route(remote("echo", 20, "test:broken", true)).await.expect("added");
    let outcome = d.run_route(&request("echo", "x")).await.expect("echo answers after the remote ones");
    assert_eq!((&*outcome.plugin, outcome.reply.retval.as_str()), ("echo", "ok"));

    d.add_remote_route(remote("echo", 30, "test:takes", true)).await.expect("added");
    let outcome = d.run_route(&request("echo", "x")).await.expect("handled");
    assert_eq!(&*outcome.plugin, "test:takes", "priority 30 runs before echo's 100");

    let routes = d.routes();
    let echo = routes.iter().find(|r| r.name == "echo").expect("the echo route");
    let order: Vec<&str> = echo.handlers.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(order, ["test:declines", "test:broken", "test:takes", "echo"]);

    // A route only remote targets serve; when all fail, the error says why.
    d.add_remote_route(remote("gone", 0, "test:broken", true)).await.expect("added");
    match d.run_route(&request("gone", "")).await {
        Err(DispatchError::Remote(e)) => assert_eq!(e.to_string(), "the peer is gone"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(d.run_route(&request("nowhere", "")).await, Err(DispatchError::RouteNotFound(_))));

    // Unloading echo leaves the remote handlers of its route serving.
    d.unload("echo").await.expect("unloaded");
    let outcome = d.run_route(&request("echo", "x")).await.expect("handled");
    assert_eq!(&*outcome.plugin, "test:takes");
}

struct Upper;

#[async_trait::async_trait]
impl Command for Upper {
    async fn run(&self, args: &str) -> Result<String, CommandError> {
        Ok(args.to_uppercase())
    }
}

fn upper(name: &str) -> HostCommand {
    let info = CommandInfo { name: name.into(), usage: String::new(), description: String::new() };
    HostCommand { info, run: Arc::new(Upper), admin: false }
}

#[tokio::test]
async fn host_commands_are_answered_and_their_names_are_guarded() {
    let host = TestHost::start(
        "[[plugin]]\nname = \"counter\"\npath = \"{counter}\"\n[[route]]\nname = \"count\"\nplugin = \"counter\"\n",
    )
    .await
    .expect("the host starts");
    let d = &host.dispatcher;
    assert_eq!(d.run_command("echo", "hello there", 0).await.expect("echo"), "hello there");
    assert!(d.run_command("status", "", 0).await.expect("status").starts_with("UP "));
    d.add_command(upper("upper")).await.expect("a new name");
    assert_eq!(d.run_command("upper", "abc", 0).await.expect("upper"), "ABC");
    assert!(matches!(
        d.add_command(upper("status")).await,
        Err(DispatchError::HostCommandConflict(name)) if name == "status"
    ));
    assert!(matches!(
        d.add_command(upper("counter.get")).await,
        Err(DispatchError::CommandConflict { plugin, .. }) if plugin == "counter"
    ));
    assert_eq!(d.run_command("counter.get", "nobody", 0).await.expect("the plugin's command"), "0");
    let names: Vec<String> = d.commands().into_iter().map(|c| c.name).collect();
    for name in
        ["version", "status", "echo", "log", "plugin.list", "plugin.reload", "route.list", "upper", "counter.get"]
    {
        assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
    }
    assert!(matches!(d.run_command("nope", "", 0).await, Err(DispatchError::CommandNotFound(_))));
}

#[tokio::test(flavor = "current_thread")]
async fn the_log_command_reaches_log_taps_of_its_own_host_only() {
    use tracing_subscriber::prelude::*;
    let host = TestHost::start("").await.expect("the host starts");
    let other = TestHost::start("").await.expect("a second host in the same process");
    // This thread's log lines feed the first host's hub alone.
    let _guard = tracing_subscriber::registry().with(BusLayer::new(host.ctx.logs.clone())).set_default();
    let (tap, mut records) = host.ctx.logs.tap(tracing::Level::INFO);
    let (_, mut elsewhere) = other.ctx.logs.tap(tracing::Level::DEBUG);

    assert_eq!(host.dispatcher.run_command("log", "notice hello from the api", 0).await.expect("log"), "+OK");
    let record = records.try_recv().expect("the tap got the line");
    assert_eq!((record.level, record.text.as_str()), (tracing::Level::INFO, "hello from the api"));
    assert!(host.dispatcher.run_command("log", "debug too quiet", 0).await.is_ok());
    assert!(records.try_recv().is_err(), "below the tap's level");
    assert!(host.dispatcher.run_command("log", "loud nonsense", 0).await.is_err(), "an unknown level is refused");
    assert!(elsewhere.try_recv().is_err(), "the other host's tap sees nothing");
    host.ctx.logs.untap(tap);
    assert!(host.dispatcher.run_command("log", "err after untap", 0).await.is_ok());
    assert!(records.try_recv().is_err(), "an untapped receiver gets nothing more");
}

#[tokio::test]
async fn a_pool_scales_up_under_load_and_down_when_idle() {
    let host = TestHost::start(
        r#"
[[plugin]]
name = "hostile"
path = "{hostile}"
min_instances = 1
max_instances = 3
idle_ms = 1

[[route]]
name = "spin"
plugin = "hostile"
"#,
    )
    .await
    .expect("the host starts");
    let d = host.dispatcher.clone();
    let mut scale = host.watch("E_CORE_PROC_AUTO_SCALE").expect("watch");
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let d = d.clone();
            tokio::spawn(async move { d.run_route(&request("spin", "30")).await })
        })
        .collect();
    for call in calls {
        call.await.expect("the call task").expect("spin returns");
    }
    let mut ups = 0;
    while let Some(event) = scale.next(Duration::from_millis(200)).await {
        assert_eq!(header(&event, "group_filter"), Some("hostile"));
        if header(&event, "scale") == Some("up") {
            ups += 1;
        }
    }
    assert!(ups >= 1, "three concurrent calls on one warm instance grew the pool");
    tokio::time::sleep(Duration::from_millis(20)).await;
    d.housekeeping();
    let down = scale.next(SECOND).await.expect("an idle instance is dropped");
    assert_eq!(header(&down, "scale"), Some("down"));
    assert_eq!(d.plugin("hostile").expect("loaded").idle_instances(), 1, "down to min_instances");
}

/// Tenant `acme`: the prober (hostile's `call` route) and kvcount; tenant
/// `beta`: counter. `{GRANT}` is the prober's host_commands.
const TENANTS: &str = r#"
[[tenant]]
name = "acme"
[[tenant]]
name = "beta"

[[plugin]]
name = "prober"
path = "{hostile}"
tenant = "acme"
host_commands = [{GRANT}]

[[plugin]]
name = "kvcount"
path = "{kvcount}"
tenant = "acme"

[[plugin]]
name = "counter"
path = "{counter}"
tenant = "beta"

[[route]]
name = "call"
plugin = "prober"
"#;

async fn probe(host: &TestHost, command: &str) -> String {
    let outcome = host.dispatcher.run_route(&request("call", command)).await.expect("the prober answers");
    outcome.reply.retval
}

#[tokio::test]
async fn a_plugin_calls_only_its_tenants_commands_and_the_host_commands_it_is_granted() {
    let host = TestHost::start(&TENANTS.replace("{GRANT}", "\"echo\"")).await.expect("the host starts");
    assert_eq!(probe(&host, "kvcount.get x").await, "ok: 0", "its own tenant's plugin command");
    assert_eq!(probe(&host, "counter.get x").await, "not found: no command `counter.get`", "beta's is not there");
    assert_eq!(probe(&host, "counter.reset x").await, "not found: no command `counter.reset`");
    assert_eq!(probe(&host, "no.such x").await, "not found: no command `no.such`", "indistinguishable");
    assert_eq!(probe(&host, "echo granted").await, "ok: granted", "a granted host command");
    // Every other host command is refused, the admin ones first of all.
    let host_commands: Vec<String> = host
        .dispatcher
        .commands()
        .into_iter()
        .map(|c| c.name)
        .filter(|n| !n.contains('.') || n.starts_with("plugin.") || n.starts_with("route."))
        .collect();
    for name in ["version", "status", "log", "plugin.list", "plugin.reload", "route.list"] {
        assert!(host_commands.iter().any(|c| c == name), "{name} is a host command: {host_commands:?}");
        let answer = probe(&host, &format!("{name} prober")).await;
        assert!(answer.starts_with("denied: ") && answer.contains("host_commands"), "{name}: {answer}");
    }
    // From outside (RPC, Erlang) every command still answers.
    assert_eq!(host.dispatcher.run_command("counter.get", "x", 0).await.expect("an operator's call"), "0");
}

#[tokio::test]
async fn a_plugin_reloading_from_its_commands_export_never_deadlocks_the_admin_path() {
    let config = r#"
[[plugin]]
name = "reentrant"
path = "{reentrant}"
host_commands = ["plugin.reload"]
"#;
    let host = TestHost::start(config).await.expect("the host starts; its own reload found nothing to reload");
    let d = host.dispatcher.clone();
    // Each reload reads the new version's commands, which calls
    // plugin.reload while this reload holds the admin lock.
    for _ in 0..3 {
        let reload = tokio::time::timeout(5 * SECOND, d.reload("reentrant", None)).await;
        assert!(matches!(reload, Ok(Ok(_))), "a reload finished in time");
    }
    let text = tokio::time::timeout(5 * SECOND, d.run_command("plugin.reload", "reentrant", 0)).await;
    assert!(matches!(&text, Ok(Ok(t)) if t.starts_with("+OK reentrant reloaded")), "{text:?}");
    assert_eq!(d.run_command("reentrant.ping", "", 0).await.expect("the plugin serves"), "pong");
    let other = TestHost::start(&TENANTS.replace("{GRANT}", "\"plugin.reload\"")).await.expect("starts");
    // Granted and no admin change running: the prober may reload itself.
    assert!(probe(&other, "plugin.reload kvcount").await.starts_with("ok: +OK kvcount reloaded"));
}

#[tokio::test]
async fn a_plugin_file_is_read_only_when_it_is_a_regular_file_of_bounded_size() {
    use evrhost::config::{PluginDef, MAX_PLUGIN_BYTES};
    let host = TestHost::start("").await.expect("the host starts");
    let dir = tempfile::tempdir().expect("temp dir");
    let huge = dir.path().join("huge.wasm");
    std::fs::File::create(&huge).and_then(|f| f.set_len(MAX_PLUGIN_BYTES + 1)).expect("a sparse file");
    let cases = [("/dev/zero", "not a regular file"), (huge.to_str().expect("utf-8"), "over the limit")];
    for (path, expected) in cases {
        let def = PluginDef::with_defaults("big", path).expect("a valid name and path");
        let started = std::time::Instant::now();
        let Err(e) = host.dispatcher.load(def).await else { panic!("{path} must be refused") };
        let text = evrhost::error::chain(&e);
        assert!(text.contains("cannot read") && text.contains(expected), "{path}: {text}");
        assert!(started.elapsed() < SECOND, "{path}: refused before reading it");
    }
}

#[tokio::test]
async fn busy_refusals_are_counted_as_errors_of_the_plugin() {
    let host = TestHost::start(
        "[[plugin]]\nname = \"hostile\"\npath = \"{hostile}\"\nmax_instances = 1\ndeadline_ms = 100\n\
         [[route]]\nname = \"spin\"\nplugin = \"hostile\"\n",
    )
    .await
    .expect("the host starts");
    let d = host.dispatcher.clone();
    // One instance: the first call spins 90 ms, the second waits for it and
    // runs, the third waits past its 100 ms deadline and is refused.
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let d = d.clone();
            tokio::spawn(async move { d.run_route(&request("spin", "90")).await })
        })
        .collect();
    let mut busy = 0;
    for call in calls {
        if let Err(DispatchError::Call(e)) = call.await.expect("the call task") {
            assert_eq!(e.cause.kind(), "busy", "{e}");
            busy += 1;
        }
    }
    assert!(busy >= 1, "a call found no free instance in time");
    let stats = d.plugins().into_iter().find(|p| p.name == "hostile").expect("hostile").stats;
    assert_eq!(stats.errors.get("busy"), Some(&busy), "{stats:?}");
}

#[tokio::test]
async fn a_plugin_logs_at_most_its_bytes_per_second_however_often_it_is_called() {
    let host = TestHost::start(
        "[[plugin]]\nname = \"hostile\"\npath = \"{hostile}\"\ndeadline_ms = 30000\nfuel = 100000000000\n\
         max_log_lines = 1000000\nmax_log_bytes_per_s = 40960\n\
         [[route]]\nname = \"logflood\"\nplugin = \"hostile\"\n",
    )
    .await
    .expect("the host starts");
    let d = &host.dispatcher;
    // 1,000,000 lines cut to 4,096 bytes: the budget passes about 10 a second.
    let outcome = d.run_route(&request("logflood", "")).await.expect("the flood returns");
    assert_eq!(outcome.reply.retval, "flooded");
    let stats = d.plugins().into_iter().find(|p| p.name == "hostile").expect("hostile").stats;
    let seconds = outcome.report.elapsed.as_secs() + 1;
    let passed = 1_000_000 - stats.log_lines_dropped;
    assert!(passed <= 10 * seconds + 1, "{passed} lines passed in {seconds} s: {stats:?}");
    assert!(passed >= 1, "the first lines pass");
}

#[tokio::test]
async fn the_bus_holds_a_bounded_number_of_subscribers() {
    let host = TestHost::start("").await.expect("the host starts");
    let mut watches = Vec::new();
    for _ in 0..evrhost::bus::MAX_SUBSCRIBERS {
        watches.push(host.watch("HEARTBEAT").expect("within the cap"));
    }
    match host.watch("HEARTBEAT") {
        Err(evrhost::harness::HarnessError::Bus(e)) => assert!(e.to_string().contains("subscribers already"), "{e}"),
        Ok(_) => panic!("one past the cap must be refused"),
        Err(other) => panic!("{other}"),
    }
}

/// An engine that answers every message handled, its name as the return
/// value, and remembers what it was sent.
#[derive(Default)]
struct Engine(std::sync::Mutex<Vec<String>>);

#[async_trait::async_trait]
impl evrhost::dispatcher::MessageEngine for Engine {
    async fn dispatch(
        &self,
        m: evrhost::runtime::Message,
    ) -> Result<evrhost::runtime::Answer, evrhost::runtime::HostError> {
        self.0.lock().expect("lock").push(m.name.clone());
        Ok(evrhost::runtime::Answer { handled: true, name: m.name.clone(), retvalue: m.name, params: m.params })
    }

    fn enqueue(&self, m: evrhost::runtime::Message) -> Result<(), evrhost::runtime::HostError> {
        self.0.lock().expect("lock").push(m.name);
        Ok(())
    }
}

#[tokio::test]
async fn a_plugin_sends_the_engine_only_the_messages_its_tenant_may() {
    let config = "[[tenant]]\nname = \"acme\"\nmessages = [\"chan.*\", \"call.drop\"]\n\
                  [[plugin]]\nname = \"yateroute\"\npath = \"{yateroute}\"\ntenant = \"acme\"\n";
    let host = TestHost::start(config).await.expect("the host starts");
    let d = &host.dispatcher;
    let none = d.run_command("yateroute.send", "chan.masquerade id=1", 0).await.expect_err("no engine yet");
    assert!(evrhost::error::chain(&none).contains("no engine is attached"), "{none}");
    let engine = Arc::new(Engine::default());
    d.set_message_engine(engine.clone());
    let ok = d.run_command("yateroute.send", "chan.masquerade id=1", 0).await.expect("within the tenant's names");
    assert_eq!(ok, "true chan.masquerade id=1");
    assert_eq!(d.run_command("yateroute.send", "call.drop", 0).await.expect("an exact name"), "true call.drop");
    let denied = d.run_command("yateroute.send", "call.execute callto=x", 0).await.expect_err("not the tenant's");
    assert!(
        evrhost::error::chain(&denied).contains("tenant `acme` may not send messages named `call.execute`"),
        "{denied}"
    );
    assert_eq!(*engine.0.lock().expect("lock"), ["chan.masquerade", "call.drop"], "the denied one never left");
}

/// The log lines a tap got so far, as text.
fn drained(records: &mut tokio::sync::mpsc::Receiver<evrhost::bus::log_layer::LogRecord>) -> Vec<String> {
    let mut lines = Vec::new();
    while let Ok(record) = records.try_recv() {
        lines.push(record.text);
    }
    lines
}

#[tokio::test(flavor = "current_thread")]
async fn a_traced_plugin_logs_each_import_with_its_arguments_result_and_time() {
    use tracing_subscriber::prelude::*;
    let host = TestHost::start(
        "[[plugin]]\nname = \"counter\"\npath = \"{counter}\"\ntrace = true\n\
         [[route]]\nname = \"count\"\nplugin = \"counter\"\n\
         [[plugin]]\nname = \"hostile\"\npath = \"{hostile}\"\ndeadline_ms = 5000\n\
         [[route]]\nname = \"spin\"\nplugin = \"hostile\"\n",
    )
    .await
    .expect("the host starts");
    let _guard = tracing_subscriber::registry().with(BusLayer::new(host.ctx.logs.clone())).set_default();
    let (_tap, mut records) = host.ctx.logs.tap(tracing::Level::INFO);
    let d = &host.dispatcher;

    d.run_route(&request("count", "alice")).await.expect("counted");
    let lines = drained(&mut records);
    let import = lines.iter().find(|l| l.contains("kv.incr(")).unwrap_or_else(|| panic!("no kv.incr in {lines:?}"));
    assert!(import.starts_with(r#"kv.incr("counter:alice", 1) -> 1"#), "{import}");
    for tag in ["plugin=counter", "tenant=default", "route=count", "us="] {
        assert!(import.contains(tag), "{tag} missing: {import}");
    }
    let end = lines.iter().find(|l| l.starts_with("call ok")).unwrap_or_else(|| panic!("no call line in {lines:?}"));
    assert!(end.contains("imports=1") && end.contains("untraced=0"), "{end}");
    // An error is traced as the guest sees it.
    d.run_command("counter.get", "alice", 0).await.expect("a command");
    let lines = drained(&mut records);
    assert!(lines.iter().any(|l| l.starts_with(r#"kv.get("counter:alice") -> "1""#)), "{lines:?}");

    // Switched off, nothing; the switch holds across a reload.
    d.set_trace("counter", false).expect("a plugin");
    d.run_route(&request("count", "alice")).await.expect("counted");
    let lines = drained(&mut records);
    assert!(!lines.iter().any(|l| l.contains("kv.incr") || l.starts_with("call ")), "{lines:?}");
    d.set_trace("counter", true).expect("a plugin");
    d.reload("counter", None).await.expect("reloaded");
    assert!(d.plugins().iter().any(|p| p.name == "counter" && p.trace));
    d.run_route(&request("count", "bob")).await.expect("counted");
    assert!(drained(&mut records).iter().any(|l| l.starts_with(r#"kv.incr("counter:bob", 1) -> 1"#)));
    assert!(matches!(d.set_trace("ghost", true), Err(DispatchError::PluginNotFound(_))));

    // A call making thousands of imports traces the first 200 and counts the rest.
    d.set_trace("hostile", true).expect("a plugin");
    d.run_route(&request("spin", "20")).await.expect("spun");
    let lines = drained(&mut records);
    let traced = lines.iter().filter(|l| l.starts_with("host.now() -> ")).count();
    assert_eq!(traced, evrhost::runtime::MAX_TRACED_PER_CALL as usize, "{}", lines.len());
    let end = lines.iter().find(|l| l.starts_with("call ok")).expect("the call's line");
    let untraced: u64 =
        end.split("untraced=").nth(1).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0);
    assert!(untraced > 100, "{end}");
}

#[tokio::test]
async fn a_trap_names_the_guest_functions_and_file_lines_and_an_opt_in_coredump_is_written_bounded() {
    let dumps = tempfile::tempdir().expect("temp dir");
    let host = TestHost::start(&format!(
        "[runtime]\ncoredump_dir = \"{}\"\ncoredump_keep = 2\n\
         [[plugin]]\nname = \"hostile\"\npath = \"{{hostile}}\"\nmemory_mb = 16\n\
         [[route]]\nname = \"panic\"\nplugin = \"hostile\"\n\
         [[route]]\nname = \"recurse\"\nplugin = \"hostile\"\n\
         [[route]]\nname = \"loop\"\nplugin = \"hostile\"\n",
        dumps.path().display()
    ))
    .await
    .expect("the host starts");
    let d = &host.dispatcher;
    let call_error = |e: DispatchError| match e {
        DispatchError::Call(e) => e,
        other => panic!("not a call error: {other}"),
    };

    // A panic: the frame that panicked, by name and file:line (the hostile
    // fixture carries line tables), without the guest's panic machinery.
    let e = call_error(d.run_route(&request("panic", "")).await.expect_err("it panics"));
    let bt = e.backtrace.clone().expect("a backtrace");
    assert_eq!(bt.frames[0].function, "handle", "{bt}");
    let at = bt.frames[0].location.as_deref().unwrap_or_default();
    assert!(at.ends_with("plugins/hostile/src/lib.rs:37:24"), "{bt}");
    let text = e.to_string();
    assert!(text.contains("panic: hostile plugin panics on purpose") && text.contains("(in handle at "), "{text}");
    // Runaway recursion: the caller's line is bounded, the backtrace too.
    let e = call_error(d.run_route(&request("recurse", "")).await.expect_err("it overflows"));
    let bt = e.backtrace.clone().expect("a backtrace");
    assert!(bt.frames.len() <= 20 && bt.frames.iter().skip(1).all(|f| f.function == "recurse"), "{bt}");
    assert!(e.to_string().contains("… 14 more)"), "{e}");

    // The first trap was dumped; the second came within the second and
    // was not. A dump is a wasm coredump ("core" custom section).
    let files = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> =
            std::fs::read_dir(dir).map_or(Vec::new(), |d| d.filter_map(|e| Some(e.ok()?.path())).collect());
        v.sort();
        v
    };
    let started = std::time::Instant::now();
    while files(dumps.path()).is_empty() && started.elapsed() < 5 * SECOND {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let written = files(dumps.path());
    assert_eq!(written.len(), 1, "{written:?}");
    assert!(written[0].file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("hostile-")), "{written:?}");
    let bytes = std::fs::read(&written[0]).expect("the dump");
    assert_eq!(&bytes[..4], b"\0asm");
    assert!(bytes.windows(4).any(|w| w == b"core"), "a coredump section");
    // Only the newest `coredump_keep` stay.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        d.run_route(&request("loop", "")).await.expect_err("out of fuel");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kept = files(dumps.path());
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(!kept.contains(&written[0]), "the oldest was removed: {kept:?}");
}

/// CPU time this thread has run, from the kernel's scheduler statistics.
fn thread_cpu() -> Duration {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    Duration::from_nanos(text.split_whitespace().next().and_then(|ns| ns.parse().ok()).expect("run time in ns"))
}

#[tokio::test(flavor = "current_thread")]
async fn a_route_that_ran_long_takes_the_slow_lane_off_the_callers_thread_until_it_is_short_again() {
    let host = TestHost::start(&format!(
        "{ECHO}[[plugin]]\nname = \"hostile\"\npath = \"{{hostile}}\"\nfuel = 100000000000\n\
         [[route]]\nname = \"spin\"\nplugin = \"hostile\"\n[[route]]\nname = \"ok\"\nplugin = \"hostile\"\n"
    ))
    .await
    .expect("the host starts");
    let d = &host.dispatcher;
    let lane_calls =
        |name: &str| d.plugins().into_iter().find(|p| p.name == name).expect("loaded").stats.slow_lane_calls;

    // Its first long call runs where it arrived; it marks the route.
    assert_eq!(d.run_route(&request("spin", "5")).await.expect("spins").reply.retval, "spun");
    assert_eq!(lane_calls("hostile"), 0);
    // The next runs on the lane: this thread hardly runs while it spins.
    let cpu = thread_cpu();
    let outcome = d.run_route(&request("spin", "200")).await.expect("spins on the lane");
    let used = thread_cpu() - cpu;
    assert_eq!(outcome.reply.retval, "spun");
    // The guest spins by the wall clock, which NTP may be slewing.
    assert!(outcome.report.elapsed >= Duration::from_millis(190), "{:?}", outcome.report);
    assert!(used < Duration::from_millis(50), "the caller's thread ran {used:?} of a 200 ms call");
    assert_eq!(lane_calls("hostile"), 1);

    // Other routes, of this plugin or another, stay where they arrive (a
    // call the kernel preempted for a tick on a busy machine may not).
    for _ in 0..5 {
        d.run_route(&request("ok", "")).await.expect("ok");
        d.run_route(&request("echo", "x")).await.expect("echo");
    }
    assert!(lane_calls("hostile") - 1 + lane_calls("echo") < 10, "short routes run where they arrive");

    // Two long calls weigh 32 short ones: then the route is back.
    let mut short = 0;
    loop {
        let before = lane_calls("hostile");
        assert_eq!(d.run_route(&request("spin", "0")).await.expect("short").reply.retval, "spun");
        short += 1;
        if lane_calls("hostile") == before {
            break;
        }
        assert!(short < 1_000, "a route whose calls are short again comes back");
    }
    assert!(short > 32, "back after {short} short calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_task_asleep_in_host_sleep_lets_the_epoch_ticker_park() {
    let text =
        "[[plugin]]\nname = \"timer\"\npath = \"{timer}\"\ndeadline_ms = 20\n[plugin.config]\ninterval_ms = \"30\"\n\n\
                [[exec]]\nname = \"evrexec:timer\"\nplugin = \"timer\"\n";
    let host = TestHost::start(text).await.expect("the host starts");
    let config =
        evrhost::config::Config::parse(&evrhost::harness::with_plugin_paths(text), "(test)", std::path::Path::new("."))
            .expect("config");
    let tasks = evrhost::exec::Tasks::start(&host.dispatcher, &config.exec);
    assert_eq!(tasks.len(), 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The task wakes every 30 ms for a few µs: nearly every sample finds
    // no call holding the ticker (before, the sleeping task held it always).
    let mut asleep = 0;
    for _ in 0..40 {
        asleep += usize::from(host.dispatcher.runtime().calls_running() == 0);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let timer = host.dispatcher.plugin("timer").expect("timer");
    tasks.stop().await;
    assert!(asleep >= 30, "only {asleep} of 40 samples found the ticker free to park");
    // And it kept running past its 20 ms deadline, each slice between
    // sleeps with a fresh one: nothing failed.
    let errors: Vec<_> = timer.stats.errors().filter(|(_, n)| *n > 0).collect();
    assert!(errors.is_empty(), "{errors:?}");
}
