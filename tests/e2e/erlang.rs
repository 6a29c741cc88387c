//! The Erlang front-end against real Erlang nodes (`erl`/`escript` from
//! Debian's erlang-nox): the escripts in `tests/erlang/` play the Erlang
//! application's side, as the seed document's examples do.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio_util::compat::TokioAsyncReadCompatExt;

use super::support::{error, free_port, metric, result, text, Daemon};

const COOKIE: &str = "ClueCon";

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/erlang").join(name)
}

/// This host's short name, as `erl -sname` sees it.
fn short_host() -> String {
    let host = nix::unistd::gethostname().expect("hostname").into_string().expect("UTF-8 hostname");
    host.split('.').next().unwrap_or(&host).to_string()
}

/// A daemon with an `[erlang]` section (nodename `evr<port>`) and `extra`
/// config; `{HOST}` stands for the short host name. Returns the daemon
/// and its node name.
async fn start(erlang: &str, extra: &str) -> (Daemon, u16) {
    let port = free_port();
    let config = format!(
        "[rpc]\nlisten = \"127.0.0.1:{{PORT}}\"\n[erlang]\nlisten-port = {port}\nnodename = \"evr{port}\"\ncookie = \"{COOKIE}\"\nroute-timeout-ms = 1500\n{erlang}\n\
         [[plugin]]\nname = \"kvcount\"\npath = \"{{kvcount}}\"\n{extra}"
    )
    .replace("{HOST}", &short_host());
    (Daemon::start(&config).await, port)
}

fn escript(args: &[&str]) -> Output {
    Command::new("escript")
        .args(args)
        .env("ERL_CRASH_DUMP_SECONDS", "0")
        .output()
        .expect("run escript (Debian's erlang-nox)")
}

/// `erl -eval EXPR` on a fresh node; EXPR prints what the test reads.
fn erl(name: &str, cookie: &str, expr: &str) -> String {
    let out = Command::new("erl")
        .env("ERL_CRASH_DUMP_SECONDS", "0")
        .args(["-noshell", "-sname", name, "-setcookie", cookie, "-eval", expr, "-s", "init", "stop"])
        .output()
        .expect("run erl (Debian's erlang-nox)");
    text(&out.stdout)
}

#[tokio::test]
async fn inbound_commands_answer_as_mod_erlang_event_does() {
    let (d, port) = start("", "").await;
    let evr = format!("evr{port}@{}", short_host());
    let out = escript(&[script("inbound.escript").to_str().unwrap(), &format!("in{port}"), &evr, COOKIE, "shortnames"]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "inbound.escript failed:\n{stdout}\n{}\n--- evrhost log:\n{}",
        text(&out.stderr),
        d.log()
    );
    for check in [
        "api status",
        "api unknown",
        "api plugin command",
        "api command as text",
        "api echo",
        "bgapi unknown command",
        "fetch_reply unknown",
        "bgapi",
        "getpid",
        "events",
        "filters",
        "log handler",
        "rex",
        "exit",
    ] {
        assert!(stdout.lines().any(|l| l == format!("ok {check}")), "no `ok {check}` in:\n{stdout}");
    }
    // `exit` closed the connection: a disconnect was logged for the peer.
    d.wait_for_log(&["Erlang node disconnected", &format!("in{port}@")], Duration::from_secs(5)).await;
}

#[tokio::test]
async fn long_names_work_with_a_full_node_name() {
    let port = free_port();
    let config = format!(
        "[rpc]\nlisten = \"127.0.0.1:{{PORT}}\"\n[erlang]\nlisten-port = {port}\nnodename = \"evr{port}@127.0.0.1\"\nshortname = false\ncookie = \"{COOKIE}\"\n\
         [[plugin]]\nname = \"kvcount\"\npath = \"{{kvcount}}\"\n"
    );
    let d = Daemon::start(&config).await;
    let evr = format!("evr{port}@127.0.0.1");
    let me = format!("long{port}@127.0.0.1");
    let out = escript(&[script("inbound.escript").to_str().unwrap(), &me, &evr, COOKIE, "longnames"]);
    assert!(out.status.success(), "{}\n{}\n--- evrhost log:\n{}", text(&out.stdout), text(&out.stderr), d.log());
}

#[tokio::test]
async fn a_wrong_cookie_is_refused_and_the_node_stays_up() {
    let (d, port) = start("", "").await;
    let evr = format!("evr{port}@{}", short_host());
    let listener = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let socket = format!("udp:{}", listener.local_addr().unwrap());
    let mut c = d.client().await;
    result(&c.call("event.subscribe", json!(["E_CORE_TCP_DISCONNECT", socket])).await.unwrap());
    let ping = format!("io:format(\"~p~n\", [net_adm:ping('{evr}')])");
    assert_eq!(erl(&format!("bad{port}"), "NotTheCookie", &ping).trim(), "pang");
    d.wait_for_log(&["Erlang handshake failed", "wrong cookie"], Duration::from_secs(5)).await;
    // RPC connections end too (proto tcp); the Erlang one says erlang.
    let mut buf = vec![0u8; 65536];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), listener.recv(&mut buf))
            .await
            .expect("E_CORE_TCP_DISCONNECT with proto erlang")
            .unwrap();
        let event: serde_json::Value = serde_json::from_slice(&buf[..n]).unwrap();
        assert_eq!(event["method"], "E_CORE_TCP_DISCONNECT");
        if event["params"]["proto"] == "erlang" {
            break;
        }
    }
    assert_eq!(erl(&format!("good{port}"), COOKIE, &ping).trim(), "pong");
}

#[tokio::test]
async fn an_address_outside_the_acl_is_refused() {
    let (d, port) = start("apply-inbound-acl = [\"10.0.0.0/8\"]", "").await;
    let evr = format!("evr{port}@{}", short_host());
    let ping = format!("io:format(\"~p~n\", [net_adm:ping('{evr}')])");
    assert_eq!(erl(&format!("acl{port}"), COOKIE, &ping).trim(), "pang");
    d.wait_for_log(&["outside apply-inbound-acl"], Duration::from_secs(5)).await;
}

/// A handler node that keeps running while the test calls routes.
struct Handler(Child);

impl Handler {
    fn start(name: &str, evr: &str) -> (Handler, std::sync::mpsc::Receiver<String>) {
        let mut child = Command::new("escript")
            .env("ERL_CRASH_DUMP_SECONDS", "0")
            .args([script("handler.escript").to_str().unwrap(), name, evr, COOKIE, "shortnames"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run escript (Debian's erlang-nox)");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        (Handler(child), rx)
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn expect_line(rx: &std::sync::mpsc::Receiver<String>, want: &str) {
    loop {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(line) if line == want => return,
            Ok(_) => continue,
            Err(e) => panic!("no `{want}` from the Erlang handler: {e}"),
        }
    }
}

#[tokio::test]
async fn routes_reach_erlang_processes_and_plugins_fetch_from_bound_ones() {
    let port = free_port();
    let handler = format!("h{port}@{{HOST}}");
    let routes = format!(
        "[[plugin]]\nname = \"directory\"\npath = \"{{directory}}\"\n\
         [[route]]\nname = \"dir\"\nplugin = \"directory\"\n\
         [[route]]\nname = \"toerl\"\nerlang = \"myhandler {handler}\"\n\
         [[route]]\nname = \"toerl_pid\"\nerlang = \"myhandler:! {handler}\"\n\
         [[route]]\nname = \"toerl_rpc\"\nerlang = \"evrtest:launch {handler}\"\n"
    );
    let (d, eport) = start("", &routes).await;
    let evr = format!("evr{eport}@{}", short_host());
    let (_h, lines) = Handler::start(&format!("h{port}"), &evr);
    expect_line(&lines, "ready");
    let mut c = d.client().await;

    // A registered process: evrhost connects to the handler's node.
    let r = c.call("route.run", json!(["toerl", "alice"])).await.unwrap();
    let reply = result(&r);
    assert_eq!(reply["data"], "hello alice from toerl", "{r}");
    assert_eq!(reply["params"]["X-Handler"], "first");
    assert!(reply["plugin"].as_str().unwrap().starts_with("erlang:myhandler"));

    // get_pid and rpc launch: a spawned process answers.
    for route in ["toerl_pid", "toerl_rpc"] {
        let r = c.call("route.run", json!([route, "bob"])).await.unwrap();
        assert_eq!(result(&r)["data"], format!("hello bob from {route}"), "{r}\n{}", d.log());
        assert_eq!(result(&r)["params"]["X-Handler"], "spawned");
    }
    // Requests of one call go to the process that took the first one, as
    // `{call_event, Event}`.
    let first = c.call("route.run", json!(["toerl_pid", "carol", {"Call-ID": "c-1"}])).await.unwrap();
    let again = c.call("route.run", json!(["toerl_pid", "carol", {"Call-ID": "c-1"}])).await.unwrap();
    assert_eq!(result(&first)["params"]["X-Handler"], "spawned", "{first}");
    assert_eq!(result(&again)["params"]["X-Handler"], "call_event", "{again}");
    assert_eq!(result(&again)["data"], "again carol");
    assert_eq!(result(&first)["params"]["X-Pid"], result(&again)["params"]["X-Pid"], "the same process");
    let sessions = c.call("api.run", json!(["erlang", "sessions", format!("h{port}@{}", short_host())])).await.unwrap();
    assert!(result(&sessions).as_str().unwrap().contains("call c-1 route toerl_pid"), "{sessions}");
    // The front-end's share of /metrics: the handler's node is connected.
    let (status, metrics) = d.scrape();
    assert!(status.contains("200"), "{status}");
    assert!(metric(&metrics, "evrhost_erlang_nodes ") >= 1, "{metrics}");
    assert!(metrics.contains(&format!("evrhost_erlang_events_sent_total{{node=\"h{port}@")), "{metrics}");

    // Declined, failed, and never answered (the route times out).
    let r = c.call("route.run", json!(["toerl", "decline"])).await.unwrap();
    assert_eq!(result(&r)["handled"], false, "{r}");
    let r = c.call("route.run", json!(["toerl", "fail"])).await.unwrap();
    assert!(error(&r).1.contains("told to fail"), "{r}");
    let r = c.call("route.run", json!(["toerl", "silent"])).await.unwrap();
    assert!(error(&r).1.contains("no route_reply"), "{r}");

    // The handler bound `directory` after its first call; the plugin's
    // fetch reaches it, from a route and from an API command.
    expect_line(&lines, "bound");
    let r = c.call("route.run", json!(["dir", "1000 example.com"])).await.unwrap();
    let xml = result(&r)["data"].as_str().unwrap_or_default().to_string();
    assert!(xml.contains("<user id=\"1000\"/>") && xml.contains("example.com"), "{r}\n{}", d.log());
    expect_line(&lines, "duplicate refused");
    let r = c.call("api.run", json!(["directory.lookup", "2000"])).await.unwrap();
    assert!(result(&r).as_str().unwrap().contains("<user id=\"2000\"/>"), "{r}");

    let r = c.call("api.run", json!(["erlang", "listeners"])).await.unwrap();
    assert!(result(&r).as_str().unwrap().contains(&format!("h{port}@")), "{r}");

    // The handler node goes away: its binding goes with it.
    drop(_h);
    d.wait_for_log(&["Erlang node disconnected", &format!("h{port}@")], Duration::from_secs(70)).await;
    let r = c.call("route.run", json!(["dir", "1000"])).await.unwrap();
    assert!(error(&r).1.contains("no Erlang process is bound"), "{r}");
}

/// The client side of the handshake, from the test, to send what no Erlang
/// node would.
async fn raw_peer(port: u16, evr: &str) -> tokio::net::TcpStream {
    raw_peer_named(port, evr, &format!("raw{port}")).await
}

async fn raw_peer_named(port: u16, evr: &str, name: &str) -> tokio::net::TcpStream {
    use erl_dist::handshake::ClientSideHandshake;
    use erl_dist::node::{Creation, LocalNode};
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    let mut local = LocalNode::new(format!("{name}@{}", short_host()).parse().unwrap(), Creation::random());
    local.flags = erl_dist::DistributionFlags::mandatory();
    let mut hs = ClientSideHandshake::new(stream.compat(), local, COOKIE);
    hs.execute_send_name(6).await.expect("send name");
    let (stream, peer) = hs.execute_rest(true).await.expect("handshake");
    assert_eq!(peer.name.to_string(), evr);
    stream.into_inner()
}

#[tokio::test]
async fn garbage_and_huge_frames_end_only_their_own_connection() {
    let (d, port) = start("max-frame-kb = 1024", "").await;
    let evr = format!("evr{port}@{}", short_host());

    // Bytes that are no handshake at all.
    let mut junk = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    d.wait_for_log(&["Erlang handshake failed"], Duration::from_secs(10)).await;

    // After a good handshake: a frame of junk terms, a term nested 100,000
    // deep, a list claiming 4 billion elements: each skipped.
    let mut peer = raw_peer(port, &evr).await;
    let mut frames = Vec::new();
    let mut deep = vec![112u8, 131];
    deep.extend(std::iter::repeat_n([104u8, 1], 100_000).flatten());
    deep.push(106);
    for body in [vec![112u8, 131, 200, 1, 2, 3], deep, vec![112u8, 131, 108, 0xff, 0xff, 0xff, 0xff, 106], vec![7u8, 7]]
    {
        frames.extend((body.len() as u32).to_be_bytes());
        frames.extend(body);
    }
    peer.write_all(&frames).await.unwrap();
    d.wait_for_log(&["Erlang frame skipped", "nested deeper"], Duration::from_secs(5)).await;
    d.wait_for_log(&["Erlang frame skipped", "truncated"], Duration::from_secs(5)).await;
    d.wait_for_log(&["Erlang frame skipped", "type tag 7"], Duration::from_secs(5)).await;

    // A frame over max-frame-kb: that connection ends.
    peer.write_all(&(100u32 << 20).to_be_bytes()).await.unwrap();
    d.wait_for_log(&["Erlang node disconnected", "exceeds the limit"], Duration::from_secs(5)).await;

    // The node serves everyone else.
    let ping = format!("io:format(\"~p~n\", [net_adm:ping('{evr}')])");
    assert_eq!(erl(&format!("after{port}"), COOKIE, &ping).trim(), "pong");
}

/// One distribution frame: `{foo, Evrhost} ! Message` from `name`'s pid.
fn reg_send(name: &str, message: eetf::Term) -> Vec<u8> {
    let from = eetf::Pid::new(format!("{name}@{}", short_host()), 1, 0, 1);
    let mut body = vec![112u8];
    erl_dist::message::Message::reg_send(from, eetf::Atom::from("foo"), message).write_into(&mut body).unwrap();
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend(body);
    frame
}

fn tuple(elements: Vec<eetf::Term>) -> eetf::Term {
    eetf::Term::from(eetf::Tuple::from(elements))
}

fn atom(name: &str) -> eetf::Term {
    eetf::Term::from(eetf::Atom::from(name))
}

#[tokio::test]
async fn a_peer_that_stops_reading_is_cut_off_alone() {
    let (d, port) = start("write-timeout-ms = 500", "").await;
    let evr = format!("evr{port}@{}", short_host());
    let name = format!("deaf{port}");
    let peer = raw_peer_named(port, &evr, &name).await;
    let (_read, mut write) = peer.into_split();
    // Requests whose answers it never reads: once the socket buffers are
    // full, evrhost's writer waits, then gives up on this peer.
    let request = reg_send(&name, tuple(vec![atom("api"), atom("version"), eetf::Term::from(eetf::List::nil())]));
    let flood = tokio::spawn(async move {
        let burst: Vec<u8> = request.iter().copied().cycle().take(request.len() * 10_000).collect();
        for _ in 0..100 {
            if write.write_all(&burst).await.is_err() {
                return;
            }
        }
    });
    d.wait_for_log(&["Erlang connection: write failed", "has not read for"], Duration::from_secs(30)).await;
    d.wait_for_log(&["Erlang node disconnected", &name], Duration::from_secs(5)).await;
    flood.abort();
    let ping = format!("io:format(\"~p~n\", [net_adm:ping('{evr}')])");
    assert_eq!(erl(&format!("alive{port}"), COOKIE, &ping).trim(), "pong");
}

#[tokio::test]
async fn a_peer_gone_in_the_middle_of_a_bgapi_loses_only_its_answer() {
    let extra = "[[plugin]]\nname = \"directory\"\npath = \"{directory}\"\n";
    let (d, port) = start("fetch-timeout-ms = 800", extra).await;
    let evr = format!("evr{port}@{}", short_host());
    let name = format!("gone{port}");
    let mut peer = raw_peer_named(port, &evr, &name).await;
    // It binds `directory` (and will never answer), asks for a lookup in
    // the background, and leaves.
    let mut frames = reg_send(&name, tuple(vec![atom("bind"), atom("directory")]));
    let lookup = eetf::Term::from(eetf::ByteList::from(b"1000".to_vec()));
    frames.extend(reg_send(&name, tuple(vec![atom("bgapi"), atom("directory.lookup"), lookup])));
    peer.write_all(&frames).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(peer);
    d.wait_for_log(&["Erlang node disconnected", &name], Duration::from_secs(5)).await;
    d.wait_for_log(&["bgapi result not delivered", &name], Duration::from_secs(5)).await;
    let mut c = d.client().await;
    let r = c.call("api.run", json!(["status"])).await.unwrap();
    assert!(result(&r).as_str().unwrap().starts_with("UP "), "{r}");
}

#[tokio::test]
async fn binary_encoding_sends_binaries() {
    let (_d, port) = start("encoding = \"binary\"", "").await;
    let evr = format!("evr{port}@{}", short_host());
    let expr = format!(
        "{{foo, '{evr}'}} ! {{api, status, <<>>}}, \
         receive {{ok, B}} when is_binary(B) -> io:format(\"binary ~s~n\", [B]); R -> io:format(\"~p~n\", [R]) \
         after 3000 -> io:format(\"timeout~n\") end"
    );
    let out = erl(&format!("bin{port}"), COOKIE, &expr);
    assert!(out.starts_with("binary UP "), "{out}");
}
