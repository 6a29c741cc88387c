//! One connected Erlang node: mod_erlang_event's "listener". It reads the
//! peer's messages, answers them as handle_msg.c does, and sends it the
//! events, log lines and fetch requests its processes asked for.
//!
//! Invariants:
//! - Replies to a peer's commands go out in the order the commands came
//!   (one worker per session runs them), so a process that sends two `api`
//!   requests gets two answers in that order.
//! - Answers to requests *we* made (`fetch_reply`, `route_reply`, a
//!   `get_pid` answer, a `rex` reply) are taken by the reader at once, never
//!   queued behind a command: a plugin command that fetches from this very
//!   peer cannot deadlock.
//! - Events and log lines never wait for a slow peer: its queue full, they
//!   are dropped and counted. Replies wait (the reader stops reading, and
//!   TCP pushes back on the peer).
//! - Nothing a peer asks for grows without bound: queued commands, running
//!   background jobs, fetch bindings, subscriptions and filters all have
//!   caps, and a request past one gets an error, not a silent drop.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use eetf::{Pid, Term};
use erl_dist::message::Message;
use tokio::sync::{mpsc, watch};

use super::fetch::FetchReplyError;
use super::term::{self, as_atom, as_pairs, as_text, atom, tuple};
use super::{Key, Node, Work};
use crate::bus::log_layer::{self, LogHub, LogRecord};
use crate::bus::{self, FilterChange, Filters, Fired, Sink};
use crate::runtime::Event;
use crate::sync::lock;

/// Commands waiting for the session's worker; past this the reader waits.
pub const COMMAND_QUEUE: usize = 256;
/// Background jobs one peer may have running; past this `bgapi` answers
/// `{error, badmem}`, so a peer cannot pile up tasks without bound.
const MAX_JOBS: usize = 256;
/// Fetch bindings one peer may hold (`{bind, …}` from that many pids).
pub const MAX_BINDINGS: usize = 256;

pub struct Session {
    logs: Arc<LogHub>,
    /// The peer's node name.
    pub peer: String,
    pub addr: Option<SocketAddr>,
    /// The listener's own pid: what `getpid` answers and what handlers link to.
    pub pid: Pid,
    pub started: Instant,
    tx: mpsc::Sender<Message>,
    closing: watch::Sender<bool>,
    state: Mutex<State>,
    pub events_sent: AtomicU64,
    pub events_dropped: AtomicU64,
    /// Background jobs running for this peer.
    pub jobs: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
struct State {
    event_handler: Option<Pid>,
    /// Erlang filters: only excludes take effect (see `Filters::passes_excludes_only`).
    filters: Filters,
    subscribed: bool,
    log_handler: Option<Pid>,
    log_level: Option<tracing::Level>,
    log_tap: Option<u64>,
}

fn ok() -> Term {
    atom("ok")
}

fn error(reason: &str) -> Term {
    tuple(vec![atom("error"), atom(reason)])
}

impl Session {
    pub fn new(
        peer: String,
        addr: Option<SocketAddr>,
        pid: Pid,
        tx: mpsc::Sender<Message>,
        logs: Arc<LogHub>,
    ) -> Arc<Session> {
        Arc::new(Session {
            logs,
            peer,
            addr,
            pid,
            started: Instant::now(),
            tx,
            closing: watch::channel(false).0,
            state: Mutex::new(State::default()),
            events_sent: AtomicU64::new(0),
            events_dropped: AtomicU64::new(0),
            jobs: Default::default(),
        })
    }

    /// Asks the reader and writer to finish (the writer sends what is
    /// queued first).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Queues a message without waiting; false when the peer's queue is full
    /// or the connection gone.
    pub fn try_send(&self, message: Message) -> bool {
        self.tx.try_send(message).is_ok()
    }

    /// Queues a message, waiting for room.
    pub async fn send(&self, message: Message) -> bool {
        self.tx.send(message).await.is_ok()
    }

    pub fn reply(&self, to: &Pid, message: Term) -> bool {
        self.try_send(Message::send(to.clone(), message))
    }

    fn link(&self, to: &Pid) {
        self.try_send(Message::link(self.pid.clone(), to.clone()));
    }

    /// The session's id as a bus subscriber (one per connection: a
    /// reconnecting peer's new session never shares the old one's
    /// subscriptions).
    fn target_id(&self) -> String {
        format!("erlang:{}#{}.{}", self.peer, self.pid.id, self.pid.serial)
    }

    /// Ends what the session set up: its bus subscription and log tap (the
    /// node drops its fetch bindings and calls).
    pub fn teardown(&self, bus: &bus::Bus) {
        bus.remove(&self.target_id());
        if let Some(id) = lock(&self.state).log_tap.take() {
            self.logs.untap(id);
        }
    }

    /// A linked process of the peer exited: it handles nothing any more.
    pub fn forget(&self, pid: &Pid) {
        let mut state = lock(&self.state);
        if state.event_handler.as_ref() == Some(pid) {
            state.event_handler = None;
        }
        if state.log_handler.as_ref() == Some(pid) {
            state.log_handler = None;
            if let Some(id) = state.log_tap.take() {
                self.logs.untap(id);
            }
        }
    }

    /// Splits what the reader got: answers to our own requests are taken
    /// now; the rest is queued for the worker (Some is returned).
    pub fn take_answer(&self, node: &Node, from: Option<&Pid>, to: Option<&Pid>, message: Term) -> Option<Work> {
        let Term::Tuple(t) = &message else { return Some(Work::Message(from.cloned(), message)) };
        match t.elements.as_slice() {
            // {Ref, NewPid}: a get_pid answer.
            [Term::Reference(r), answer] => {
                if !node.resolve(&Key::Ref(r.id.clone()), answer.clone()) {
                    if let Some(from) = from {
                        self.reply(from, error("notfound"));
                    }
                }
                None
            }
            [tag, uuid, rest @ ..] if as_atom(tag) == Some("fetch_reply") => {
                let answer = match (as_text(uuid), rest) {
                    (Some(id), [xml]) => match as_text(xml) {
                        Some(xml) => match node.fetch_reply(&id, xml) {
                            Ok(()) => tuple(vec![atom("ok"), uuid.clone()]),
                            Err(FetchReplyError::Late(why)) => tuple(vec![atom("error"), uuid.clone(), atom(why)]),
                            Err(FetchReplyError::Unknown) => error("invalid_uuid"),
                        },
                        None => error("badarg"),
                    },
                    (Some(_), _) => error("badarg"),
                    (None, _) => error("invalid_uuid"),
                };
                if let Some(from) = from {
                    self.reply(from, answer);
                }
                None
            }
            [tag, uuid, answer] if as_atom(tag) == Some("route_reply") => {
                let taken = as_text(uuid).is_some_and(|id| node.resolve(&Key::Uuid(id), answer.clone()));
                if !taken {
                    tracing::debug!(peer = %self.peer, "route_reply for no waiting request");
                    if let Some(from) = from {
                        self.reply(from, error("invalid_uuid"));
                    }
                }
                None
            }
            // {rex, Reply}: an rpc answer, to the pid that asked.
            [tag, answer]
                if as_atom(tag) == Some("rex")
                    && to.is_some_and(|to| node.resolve(&Key::Pid(to.id, to.serial), answer.clone())) =>
            {
                None
            }
            _ => Some(Work::Message(from.cloned(), message)),
        }
    }

    /// Runs one queued command and answers it; true asks to close.
    pub async fn run(self: &Arc<Self>, node: &Arc<Node>, from: Option<Pid>, message: Term) -> bool {
        let (answer, close) = self.handle(node, from.as_ref(), &message).await;
        if let (Some(from), Some(answer)) = (from, answer) {
            self.send(Message::send(from, answer)).await;
        }
        close
    }

    /// handle_msg: the answer (None: nothing to say) and whether to close.
    pub async fn handle(
        self: &Arc<Self>,
        node: &Arc<Node>,
        from: Option<&Pid>,
        message: &Term,
    ) -> (Option<Term>, bool) {
        match message {
            Term::Atom(a) => self.handle_atom(node, from, &a.name),
            Term::Tuple(t) => match t.elements.first().and_then(as_atom) {
                Some(tag) => (Some(self.handle_tuple(node, from, tag, &t.elements[1..]).await), false),
                None => (Some(error("undef")), false),
            },
            _ => (Some(error("undef")), false),
        }
    }

    fn handle_atom(self: &Arc<Self>, node: &Arc<Node>, from: Option<&Pid>, name: &str) -> (Option<Term>, bool) {
        let answer = match name {
            "register_event_handler" => {
                let Some(from) = from else { return (None, false) };
                lock(&self.state).event_handler = Some(from.clone());
                self.link(from);
                ok()
            }
            "register_log_handler" => {
                let Some(from) = from else { return (None, false) };
                self.link(from);
                self.start_log(node, from.clone());
                ok()
            }
            "nolog" => {
                let mut state = lock(&self.state);
                state.log_handler = None;
                match state.log_tap.take() {
                    Some(id) => {
                        self.logs.untap(id);
                        ok()
                    }
                    None => error("notlistening"),
                }
            }
            "noevents" | "session_noevents" => {
                let was = std::mem::take(&mut lock(&self.state).subscribed);
                node.bus().remove(&self.target_id());
                if was {
                    ok()
                } else {
                    error("notlistening")
                }
            }
            "exit" => return (Some(ok()), true),
            "getpid" => tuple(vec![atom("ok"), term::pid_term(&self.pid)]),
            "link" => return (None, false),
            _ => error("undef"),
        };
        (Some(answer), false)
    }

    async fn handle_tuple(self: &Arc<Self>, node: &Arc<Node>, from: Option<&Pid>, tag: &str, args: &[Term]) -> Term {
        match tag {
            "event" | "session_event" => self.events(node, args, false),
            "setevent" | "session_setevent" => self.events(node, args, true),
            "nixevent" | "session_nixevent" => self.nixevents(node, args),
            "filter" => self.filter(args),
            "set_log_level" => match args {
                [level] => match as_atom(level).and_then(log_level) {
                    Some(level) => {
                        let mut state = lock(&self.state);
                        state.log_level = Some(level);
                        if let Some(id) = state.log_tap {
                            self.logs.set_tap_level(id, level);
                        }
                        ok()
                    }
                    None => error("badarg"),
                },
                _ => error("badarg"),
            },
            "api" => match command_args(args) {
                Some((command, args)) => {
                    let (good, text) = node.api(&command, &args).await;
                    tuple(vec![atom(if good { "ok" } else { "error" }), node.encoding.text(&text)])
                }
                None => error("badarg"),
            },
            "bgapi" => match (command_args(args), from) {
                (Some((command, args)), Some(from)) => {
                    if self.jobs.load(Relaxed) >= MAX_JOBS {
                        tracing::warn!(peer = %self.peer, "bgapi refused: {MAX_JOBS} background jobs still running");
                        return error("badmem");
                    }
                    let job = uuid::Uuid::new_v4().to_string();
                    node.bgapi(self.clone(), from.clone(), job.clone(), command, args);
                    tuple(vec![atom("ok"), node.encoding.text(&job)])
                }
                _ => error("badarg"),
            },
            "sendevent" => self.sendevent(node, args),
            "sendmsg" => match args {
                [uuid, headers] if as_text(uuid).is_some() && as_pairs(headers).is_some() => error("nosession"),
                _ => error("badarg"),
            },
            "bind" => match (args, from) {
                ([section], Some(from)) => match as_atom(section).filter(|s| SECTIONS.contains(s)) {
                    Some(section) if node.bind(section, from.clone(), self) => {
                        self.link(from);
                        ok()
                    }
                    Some(_) => error("badmem"),
                    None => error("badarg"),
                },
                _ => error("badarg"),
            },
            "handlecall" => match args {
                [uuid] | [uuid, _] if as_text(uuid).is_some() => error("badsession"),
                _ => error("badarg"),
            },
            "rex" => error("notfound"),
            _ => error("undef"),
        }
    }

    /// `{event, Type…}`: atoms; after `CUSTOM` the atoms are subclasses.
    /// `setevent` replaces the subscriptions instead of adding to them.
    fn events(self: &Arc<Self>, node: &Node, args: &[Term], replace: bool) -> Term {
        let Some(names) = args.iter().map(as_atom).collect::<Option<Vec<&str>>>() else { return error("badarg") };
        if names.is_empty() || (replace && names.contains(&"ALL")) {
            return error("badarg");
        }
        let bus = node.bus();
        let id = self.target_id();
        if replace {
            bus.remove(&id);
        }
        let mut custom = false;
        for name in names {
            let sink = || self.sink(node);
            let result = if custom {
                bus.subscribe(&id, sink, "CUSTOM", Some(name), None)
            } else if name == "CUSTOM" {
                custom = true;
                continue;
            } else {
                bus.subscribe(&id, sink, name, None, None)
            };
            if let Err(e) = result {
                tracing::warn!(peer = %self.peer, error = %e, "event subscription refused");
                return error("badarg");
            }
        }
        lock(&self.state).subscribed = true;
        ok()
    }

    fn nixevents(&self, node: &Node, args: &[Term]) -> Term {
        let Some(names) = args.iter().map(as_atom).collect::<Option<Vec<&str>>>() else { return error("badarg") };
        if names.is_empty() {
            return error("badarg");
        }
        if !lock(&self.state).subscribed {
            return error("notlistening");
        }
        let id = self.target_id();
        let mut custom = false;
        for name in names {
            if custom {
                node.bus().unsubscribe(&id, "CUSTOM", Some(name));
            } else if name == "CUSTOM" {
                custom = true;
            } else {
                node.bus().unsubscribe(&id, name, None);
            }
        }
        ok()
    }

    /// Where the bus delivers this session's events: to its event handler.
    fn sink(self: &Arc<Self>, node: &Node) -> Box<dyn Sink> {
        Box::new(EventHandlerSink { session: Arc::downgrade(self), encoding: node.encoding })
    }

    fn deliver(&self, event: &Event, encoding: term::Encoding) -> bool {
        let handler = {
            let state = lock(&self.state);
            if !state.filters.passes_excludes_only(event) {
                return true;
            }
            state.event_handler.clone()
        };
        let Some(handler) = handler else { return true };
        let sent = self.try_send(Message::send(handler, event_term(event, encoding)));
        if sent { &self.events_sent } else { &self.events_dropped }.fetch_add(1, Relaxed);
        sent
    }

    /// `{filter, 'Hdr val', 'add Hdr val', 'delete Hdr [val]', 'delete all'}`:
    /// each atom a mod_event_socket filter command.
    fn filter(&self, args: &[Term]) -> Term {
        if args.is_empty() {
            return error("badarg");
        }
        let mut state = lock(&self.state);
        let log = args
            .iter()
            .map(|arg| {
                let change = as_atom(arg).and_then(|line| state.filters.command(line).ok());
                let entry =
                    |what: &str, h: &str, v: &str| tuple(vec![term::string(what), term::string(h), term::string(v)]);
                match change {
                    Some(FilterChange::Added { header, value }) => entry("added", &header, &value),
                    Some(FilterChange::Deleted { header, value }) => {
                        entry("deleted", &header, value.as_deref().unwrap_or(""))
                    }
                    Some(FilterChange::DeletedAll) => entry("deleted", "all", ""),
                    None => atom("-ERR invalid syntax"),
                }
            })
            .collect();
        tuple(vec![atom("filter_command_processing_log"), term::list(log)])
    }

    /// `{sendevent, 'NAME', Headers}` / `{sendevent, 'CUSTOM', 'Sub', Headers}`.
    fn sendevent(&self, node: &Node, args: &[Term]) -> Term {
        let (name, subclass, headers) = match args {
            [name, headers] => (as_atom(name), None, headers),
            [name, subclass, headers] => match as_atom(subclass) {
                Some(s) => (as_atom(name), Some(s.to_string()), headers),
                None => return error("badarg"),
            },
            _ => return error("badarg"),
        };
        let (Some(name), Some(pairs)) = (name, as_pairs(headers)) else { return error("badarg") };
        if bus::reserved(name) || name.is_empty() {
            tracing::warn!(peer = %self.peer, event = name, "sendevent refused: evrhost raises this event itself");
            return error("badarg");
        }
        let mut body = None;
        let headers = pairs
            .into_iter()
            .filter_map(|(k, v)| {
                if k.eq_ignore_ascii_case("body") {
                    body = Some(v);
                    None
                } else {
                    Some((k, v))
                }
            })
            .collect();
        let event = Event { name: name.to_string(), subclass, headers, body };
        node.bus().fire(event, bus::Caller { file: "erlang".into(), function: self.peer.clone().into(), line: 0 });
        ok()
    }

    fn start_log(self: &Arc<Self>, node: &Node, handler: Pid) {
        let mut state = lock(&self.state);
        let level = *state.log_level.get_or_insert(tracing::Level::DEBUG);
        state.log_handler = Some(handler);
        if state.log_tap.is_some() {
            return;
        }
        let (id, mut rx) = self.logs.tap(level);
        state.log_tap = Some(id);
        let session = Arc::downgrade(self);
        let encoding = node.encoding;
        // Its own log lines must not come back to it as records.
        tokio::spawn(log_layer::suppressed(async move {
            while let Some(record) = rx.recv().await {
                let Some(session) = session.upgrade() else { return };
                let Some(handler) = lock(&session.state).log_handler.clone() else { continue };
                session.try_send(Message::send(handler, log_term(&record, encoding)));
            }
        }));
    }
}

/// A session's event handler as a bus subscriber.
struct EventHandlerSink {
    session: std::sync::Weak<Session>,
    encoding: term::Encoding,
}

#[async_trait::async_trait]
impl Sink for EventHandlerSink {
    async fn deliver(&mut self, event: &Fired) -> bool {
        self.session.upgrade().is_some_and(|s| s.deliver(event.event(), self.encoding))
    }
}

/// The sections a process may bind to, as mod_xml_curl names them.
const SECTIONS: [&str; 7] = ["configuration", "directory", "dialplan", "phrases", "languages", "chatplan", "channels"];

/// `{api, Cmd, Args}`: Cmd an atom, as mod_erlang_event decodes it (a
/// command given as a string or binary is `badarg`); Args text.
fn command_args(args: &[Term]) -> Option<(String, String)> {
    match args {
        [command, args] => Some((as_atom(command)?.to_string(), as_text(args)?)),
        _ => None,
    }
}

/// FreeSWITCH's log level names, as `set_log_level` takes them.
fn log_level(name: &str) -> Option<tracing::Level> {
    use tracing::Level;
    Some(match name {
        "debug" => Level::DEBUG,
        "info" | "notice" => Level::INFO,
        "warning" | "warn" => Level::WARN,
        "err" | "error" | "crit" | "alert" | "emerg" | "console" => Level::ERROR,
        _ => return None,
    })
}

/// FreeSWITCH's numbers for the levels (switch_log_level_t).
fn fs_level(level: tracing::Level) -> i32 {
    match level {
        tracing::Level::ERROR => 3,
        tracing::Level::WARN => 4,
        tracing::Level::INFO => 6,
        _ => 7,
    }
}

/// `{event, [UniqueID | undefined, {"Name","Value"}, …, {"body", Body}]}`.
pub fn event_term(event: &Event, encoding: term::Encoding) -> Term {
    let mut list = Vec::with_capacity(event.headers.len() + 2);
    let unique = event.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("Unique-ID"));
    list.push(unique.map_or_else(|| atom("undefined"), |(_, v)| encoding.text(v)));
    for (k, v) in &event.headers {
        list.push(tuple(vec![encoding.text(k), encoding.text(v)]));
    }
    if let Some(body) = &event.body {
        list.push(tuple(vec![encoding.text("body"), encoding.text(body)]));
    }
    tuple(vec![atom("event"), term::list(list)])
}

/// `{log, [{level,L},{text_channel,C},{file,F},{func,Fn},{line,N},{data,D}]}`.
fn log_term(record: &LogRecord, encoding: term::Encoding) -> Term {
    let pair = |k: &str, v: Term| tuple(vec![atom(k), v]);
    tuple(vec![
        atom("log"),
        term::list(vec![
            pair("level", term::int(fs_level(record.level))),
            pair("text_channel", term::int(0)),
            pair("file", encoding.text(&record.file)),
            pair("func", encoding.text(&record.function)),
            pair("line", term::int(i32::try_from(record.line).unwrap_or(i32::MAX))),
            pair("data", encoding.text(&record.text)),
        ]),
    ])
}
