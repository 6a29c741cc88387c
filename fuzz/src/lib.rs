//! The fuzz targets' bodies: each takes arbitrary bytes to one parser or
//! front door of the host, and panics only on a bug (a property broken), so
//! that a crash the fuzzer finds is one of ours. The host keeps its own
//! promise — no input panics or hangs it — and these check it.
//!
//! Targets that need a running host (JSON-RPC, routes) share one, started
//! on first use, with the example plugins built by `host/build.rs`.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use evrhost::bus::Filters;
use evrhost::config::{Config, EventSocket, RpcSettings};
use evrhost::dispatcher::Dispatcher;
use evrhost::frontend::erlang::term;
use evrhost::frontend::event_sinks::EventSinks;
use evrhost::frontend::rpc::jsonrpc::{self, Server};
use evrhost::frontend::rpc::unix::Framer;
use evrhost::frontend::yate::wire::{self, Incoming};
use evrhost::harness::TestHost;
use evrhost::runtime::{Event, Origin, Peer, Request};

/// One host for the targets that need one, and the runtime it runs on.
struct Shared {
    rt: tokio::runtime::Runtime,
    /// Kept so its front-ends live; the targets use its dispatcher.
    _host: std::sync::Mutex<TestHost>,
    dispatcher: Arc<Dispatcher>,
    server: Server,
}

const HOST: &str = r#"
[[plugin]]
name = "echo"
path = "{echo}"
[[plugin]]
name = "kvcount"
path = "{kvcount}"
[[plugin]]
name = "counter"
path = "{counter}"
[[route]]
name = "echo"
plugin = "echo"
[[route]]
name = "evrexec:udp"
plugin = "kvcount"
[[route]]
name = "count"
plugin = "counter"
"#;

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the fuzz host");
        let host = rt.block_on(TestHost::start(HOST)).expect("the fuzz host starts");
        let mut settings = RpcSettings::none();
        // plugin.load may read nothing at all: no directory is allowed.
        settings.plugin_dirs = vec![Path::new("/nonexistent-evrhost-fuzz").to_path_buf()];
        let server = Server { dispatcher: host.dispatcher.clone(), settings, sinks: Arc::new(EventSinks::default()) };
        let dispatcher = host.dispatcher.clone();
        Shared { rt, _host: std::sync::Mutex::new(host), dispatcher, server }
    })
}

/// Yate's line protocol, from the engine: framing, parsing, and for a
/// message the answer line, which must be one line the engine can read.
pub fn yate_line(data: &[u8]) {
    let mut lines = wire::LineBuffer::new(4096);
    let (first, second) = data.split_at(data.len() / 2);
    for chunk in [first, second] {
        lines.push(chunk);
        while let Some(line) = lines.next_line() {
            let Ok(line) = line else { continue };
            assert!(!line.contains(&b'\n'), "a framed line holds no newline");
            if let Ok(Incoming::Message(m)) = wire::parse(line) {
                let mut out = Vec::new();
                if wire::write_answer(&mut out, &m.id, true, "", &m.retvalue, &m.params, &[]).is_ok() {
                    assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1, "one answer line");
                    assert_eq!(out.last(), Some(&b'\n'));
                }
                let mut again = Vec::new();
                if wire::write_message(&mut again, "x", 0, &m.name, &m.retvalue, &m.params).is_ok() {
                    let text = &again[..again.len() - 1];
                    match wire::parse(text) {
                        Ok(Incoming::Message(back)) => {
                            assert_eq!((back.name, back.retvalue, back.params), (m.name, m.retvalue, m.params))
                        }
                        other => panic!("a written message reads back as {other:?}"),
                    }
                }
            }
        }
    }
}

/// A JSON-RPC request body, as HTTP and the UNIX socket hand it over.
pub fn jsonrpc(data: &[u8]) {
    let s = shared();
    let reply = s.rt.block_on(jsonrpc::handle(&s.server, data));
    if let Some(reply) = reply {
        let value: Result<serde_json::Value, _> = serde_json::from_slice(&reply);
        assert!(value.is_ok(), "every reply is JSON: {}", String::from_utf8_lossy(&reply));
    }
}

/// The UNIX socket's framing, bytes arriving in pieces.
pub fn unix_framer(data: &[u8]) {
    let mut framer = Framer::default();
    let mut buffer = Vec::new();
    for piece in data.chunks(7) {
        buffer.extend_from_slice(piece);
        loop {
            match framer.next_end(&buffer) {
                Ok(Some(end)) => {
                    assert!(end <= buffer.len());
                    buffer.drain(..end);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

/// An Erlang external term: what passes the checker must decode.
pub fn erlang_term(data: &[u8]) {
    if term::check(data).is_ok() {
        let _ = eetf::Term::decode(std::io::Cursor::new(data));
    }
}

/// mod_event_socket filter commands, one a line, then an event through
/// them.
pub fn event_filter(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut filters = Filters::default();
    for command in text.lines().take(300) {
        let _ = filters.command(command);
    }
    let event = Event {
        name: "CUSTOM".into(),
        subclass: Some("acme::login".into()),
        headers: vec![("User".into(), "alice".into()), ("Realm".into(), "example.com".into())],
        body: None,
    };
    let _ = filters.passes(&event);
}

/// A configuration file.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text, "fuzz.toml", Path::new("/nonexistent-evrhost-fuzz"));
    }
}

/// A datagram through the dispatcher to a real plugin (kvcount), as the
/// UDP front-end hands it over.
pub fn udp_route(data: &[u8]) {
    let s = shared();
    let request = Request {
        route: "evrexec:udp".into(),
        data: data.to_vec(),
        params: Vec::new(),
        origin: Origin::Udp(Peer { ip: "127.0.0.1".into(), port: 5060 }),
    };
    let _ = s.rt.block_on(s.dispatcher.run_route(&request));
}

/// A subscriber's socket, as `event.subscribe` and `[[events.subscribe]]`
/// give it.
pub fn event_socket(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(socket) = EventSocket::parse(text) {
            // Stored parsed: its id reads back as the same socket.
            let id = socket.id();
            let again = EventSocket::parse(&id).map(|s| s.id());
            assert_eq!(again.as_deref(), Ok(id.as_str()), "{text:?}");
        }
    }
}

/// A target's body.
pub type Target = fn(&[u8]);

/// Every target by name, for the corpus replay.
pub const TARGETS: [(&str, Target); 8] = [
    ("yate_line", yate_line),
    ("jsonrpc", jsonrpc),
    ("unix_framer", unix_framer),
    ("erlang_term", erlang_term),
    ("event_filter", event_filter),
    ("config", config),
    ("udp_route", udp_route),
    ("event_socket", event_socket),
];
