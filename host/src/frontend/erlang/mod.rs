//! The Erlang front-end: evrhost as a hidden C-node that Erlang/OTP
//! applications drive as they drive FreeSWITCH's mod_erlang_event
//! (protocols.md §4.4).
//!
//! - Inbound: a peer node sends terms to any name on our node; `session`
//!   answers them (api, bgapi, events, filters, logs, sendevent, bind and
//!   fetch_reply, getpid, exit, rpc through `rex`).
//! - Outbound: a route may name an Erlang process (`myhandler node@host`,
//!   `myhandler:! node@host`, `mod:fun node@host`); each request reaches it
//!   as `{call, Event}` and its `{route_reply, UUID, Reply}` is the route's
//!   reply (see `remote_reply` for the reply terms).
//! - Plugins' `fetch` import asks the processes bound to a section; the
//!   first `fetch_reply` wins, within `fetch_timeout`.
//!
//! Invariants:
//! - One connection per peer node, whoever opened it: an outbound route to
//!   a node that is connected already uses that connection.
//! - A connection's end (EOF, error, tick timeout, stall, `exit`) tears down
//!   what it set up (subscriptions, log tap, bindings), raises
//!   E_CORE_TCP_DISCONNECT and touches nothing else.
//! - Every request we wait on (`get_pid`, rpc, route, fetch) has a timeout
//!   and is removed from `pending` when it ends, answered or not.

mod dist;
mod session;
pub mod term;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use eetf::{Pid, Reference, Term};
use erl_dist::message::Message;
use erl_dist::node::{Creation, NodeName};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::bus::{self, Bus};
use crate::config::{ErlangSettings, ErlangTarget};
use crate::dispatcher::{Dispatcher, RemoteRoutes};
use crate::runtime::{FetchQuery, HostError, Origin, Reply, Request};
use session::Session;
use term::{as_atom, as_pairs, as_text, atom, tuple, Encoding};

pub use session::event_term;

/// Messages queued for one peer before events to it are dropped.
const PEER_QUEUE: usize = 4096;
/// How often we tick an idle connection, and how long a silent peer lives:
/// OTP's defaults (net_ticktime 60 s, a tick every 15 s).
const TICK: Duration = Duration::from_secs(15);
const TICK_TIMEOUT: Duration = Duration::from_secs(60);
/// Fetch ids remembered after their answer, to tell a late or duplicate
/// `fetch_reply` from an unknown one.
const RECENT_FETCHES: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ErlangError {
    #[error("Erlang front-end: cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("Erlang front-end: {0}")]
    Dist(#[from] dist::DistError),
    #[error("Erlang front-end: node name `{0}`: {1}")]
    Name(String, String),
}

/// Work for a session's worker, in arrival order.
pub enum Work {
    /// A term sent to a name of ours (or a pid), from this pid if known.
    Message(Option<Pid>, Term),
    /// A message to `rex`: an rpc.
    Rex(Pid, Term),
    /// A spawn request: erpc's way in.
    Spawn { from: Pid, req: Reference, module: Term, function: Term, args: Vec<Term> },
}

/// What a request we wait on is keyed by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    /// A get_pid answer `{Ref, Pid}`.
    Ref(Vec<u32>),
    /// A `{rex, Reply}` to one of our pids: (id, serial).
    Pid(u32, u32),
    /// A fetch or a route request.
    Uuid(String),
}

struct Binding {
    section: String,
    pid: Pid,
    session: Weak<Session>,
}

/// A call's process: where the later requests of one call go.
struct Call {
    node: String,
    /// None: the registered process itself.
    pid: Option<Pid>,
    last: std::time::Instant,
}

/// A call nobody sent a request of for this long is forgotten.
const CALL_IDLE: Duration = Duration::from_secs(300);
/// Calls remembered at most; past this new calls are not remembered (each
/// of their requests is a call of its own).
const MAX_CALLS: usize = 100_000;

/// The call a request belongs to: its `Unique-ID` or `Call-ID` parameter.
fn call_id(request: &Request) -> Option<String> {
    request
        .params
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("Unique-ID") || k.eq_ignore_ascii_case("Call-ID"))
        .map(|(_, v)| v.clone())
}

/// An outbound request waiting for its process, for `erlang sessions`.
struct Outbound {
    node: String,
    route: String,
    target: String,
    started: std::time::Instant,
}

pub struct Node {
    me: Weak<Node>,
    pub name: NodeName,
    creation: Creation,
    cookie: String,
    pub encoding: Encoding,
    settings: ErlangSettings,
    d: Weak<Dispatcher>,
    bus: Arc<Bus>,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    /// Outbound connects, one at a time (so two routes to one node share
    /// the connection the first opens).
    connecting: tokio::sync::Mutex<()>,
    next_id: AtomicU32,
    pending: Mutex<HashMap<Key, oneshot::Sender<Term>>>,
    recent_fetches: Mutex<VecDeque<(String, &'static str)>>,
    bindings: Mutex<Vec<Binding>>,
    outbound: Mutex<BTreeMap<String, Outbound>>,
    calls: Mutex<HashMap<(String, String), Call>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update under these locks is a single insert, remove or push.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Our node's full name: `nodename` as given when it holds `@`, else with
/// this host's name (cut at the first dot for short names).
pub fn node_name(settings: &ErlangSettings) -> Result<NodeName, ErlangError> {
    let full = if settings.nodename.contains('@') {
        settings.nodename.clone()
    } else {
        let host =
            nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into());
        let host = if settings.shortname { host.split('.').next().unwrap_or(&host).to_string() } else { host };
        format!("{}@{host}", settings.nodename)
    };
    full.parse().map_err(|e: erl_dist::node::NodeNameError| ErlangError::Name(full.clone(), e.to_string()))
}

impl Node {
    /// Listens, registers with EPMD (starting it when none runs) and
    /// serves peers until the returned tasks are aborted.
    pub async fn start(
        settings: ErlangSettings,
        d: &Arc<Dispatcher>,
    ) -> Result<(Arc<Node>, Vec<JoinHandle<()>>), ErlangError> {
        let name = node_name(&settings)?;
        let listener = TcpListener::bind(settings.listen)
            .await
            .map_err(|source| ErlangError::Listen { addr: settings.listen, source })?;
        let port = listener.local_addr().map_or(settings.listen.port(), |a| a.port());
        let (epmd, creation) = dist::register(name.name(), port).await?;
        let node = Arc::new_cyclic(|me| Node {
            me: me.clone(),
            name,
            creation,
            cookie: settings.cookie.clone(),
            encoding: settings.encoding,
            settings,
            d: Arc::downgrade(d),
            bus: d.bus().clone(),
            sessions: Mutex::new(HashMap::new()),
            connecting: tokio::sync::Mutex::new(()),
            next_id: AtomicU32::new(1),
            pending: Mutex::new(HashMap::new()),
            recent_fetches: Mutex::new(VecDeque::new()),
            bindings: Mutex::new(Vec::new()),
            outbound: Mutex::new(BTreeMap::new()),
            calls: Mutex::new(HashMap::new()),
        });
        d.set_fetcher(node.clone());
        d.set_remote_routes(node.clone());
        let commands: Arc<Node> = node.clone();
        d.add_command("erlang", "listeners | sessions NODE", "connected Erlang nodes and their outbound sessions", {
            let node = Arc::downgrade(&commands);
            Arc::new(move |args: &str| node.upgrade().map_or_else(|| Err("-ERR stopped".into()), |n| n.console(args)))
        });
        tracing::info!(node = %node.name, port, creation = creation.get(), "Erlang C-node registered with EPMD (hidden)");
        let accept = tokio::spawn(node.clone().accept_loop(listener));
        let keep = tokio::spawn(keep_registration(epmd, node.name.to_string()));
        Ok((node, vec![accept, keep]))
    }

    pub fn bus(&self) -> &Arc<Bus> {
        &self.bus
    }

    pub fn session(&self, peer: &str) -> Option<Arc<Session>> {
        lock(&self.sessions).get(peer).cloned()
    }

    fn new_pid(&self) -> Pid {
        let n = self.next_id.fetch_add(1, Relaxed);
        // PID ids are 15 bits in the old encoding; the serial takes the rest.
        Pid::new(self.name.to_string(), n & 0x7fff, n >> 15, self.creation.get())
    }

    fn new_ref(&self) -> Reference {
        let n = self.next_id.fetch_add(1, Relaxed);
        let r: u32 = rand_u32();
        Reference {
            node: self.name.to_string().into(),
            id: vec![n & 0x3ffff, r, r.rotate_left(13)],
            creation: self.creation.get(),
        }
    }

    /// Hands `answer` to whoever waits on `key`; false when nobody does.
    pub fn resolve(&self, key: &Key, answer: Term) -> bool {
        match lock(&self.pending).remove(key) {
            Some(tx) => tx.send(answer).is_ok(),
            None => false,
        }
    }

    async fn wait(&self, key: Key, rx: oneshot::Receiver<Term>, timeout: Duration) -> Option<Term> {
        let answer = tokio::time::timeout(timeout, rx).await.ok().and_then(Result::ok);
        lock(&self.pending).remove(&key);
        answer
    }

    fn expect(&self, key: Key) -> oneshot::Receiver<Term> {
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(key, tx);
        rx
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, addr) = match listener.accept().await {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "Erlang front-end: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let node = self.clone();
            tokio::spawn(async move { node.inbound(stream, addr).await });
        }
    }

    async fn inbound(self: Arc<Self>, stream: TcpStream, addr: SocketAddr) {
        let local = stream.local_addr().ok();
        if !self.settings.acl.is_empty() && !self.settings.acl.iter().any(|c| c.contains(addr.ip())) {
            tracing::warn!(%addr, "Erlang connection refused: the address is outside apply-inbound-acl");
            bus::sink::tcp_disconnect(&self.bus, local, Some(addr), "erlang");
            return;
        }
        let _ = stream.set_nodelay(true);
        let (stream, peer) = match dist::accept(stream, dist::local_node(&self.name, self.creation), &self.cookie).await
        {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(%addr, error = %e, "Erlang handshake failed");
                bus::sink::tcp_disconnect(&self.bus, local, Some(addr), "erlang");
                return;
            }
        };
        tracing::info!(peer = %peer.name, %addr, "Erlang node connected");
        self.open(stream, peer.name.to_string());
    }

    /// Sets up a session on a connected stream and runs its reader in a
    /// task of its own; returns at once.
    fn open(self: &Arc<Self>, stream: TcpStream, peer: String) -> Arc<Session> {
        let addr = stream.peer_addr().ok();
        let local = stream.local_addr().ok();
        let (read, write) = stream.into_split();
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        let session = Session::new(peer.clone(), addr, self.new_pid(), tx);
        if let Some(old) = lock(&self.sessions).insert(peer.clone(), session.clone()) {
            tracing::info!(peer = %peer, "a new connection replaces the old one");
            old.close();
        }
        let closing = session.closing();
        let write_timeout = self.settings.write_timeout;
        let writer = tokio::spawn({
            let session = session.clone();
            async move {
                if let Err(e) = dist::write_loop(write, rx, closing, TICK, write_timeout).await {
                    tracing::warn!(peer = %session.peer, error = %e, "Erlang connection: write failed; closing");
                    session.close();
                }
            }
        });
        let (cmd_tx, cmd_rx) = mpsc::channel(session::COMMAND_QUEUE);
        let worker = tokio::spawn(self.clone().work(session.clone(), cmd_rx));
        let node = self.clone();
        let reader_session = session.clone();
        tokio::spawn(async move {
            let session = reader_session;
            let reason = node.read_loop(&session, dist::FrameReader::new(read, node.settings.max_frame), cmd_tx).await;
            tracing::info!(peer = %session.peer, reason = %reason, "Erlang node disconnected");
            session.close();
            worker.abort();
            let _ = writer.await;
            node.teardown(&session);
            bus::sink::tcp_disconnect(&node.bus, local, addr, "erlang");
        });
        session
    }

    fn teardown(&self, session: &Arc<Session>) {
        {
            let mut sessions = lock(&self.sessions);
            if sessions.get(&session.peer).is_some_and(|s| Arc::ptr_eq(s, session)) {
                sessions.remove(&session.peer);
            }
        }
        lock(&self.bindings).retain(|b| b.session.upgrade().is_some_and(|s| !Arc::ptr_eq(&s, session)));
        lock(&self.calls).retain(|_, c| c.node != session.peer);
        session.teardown(&self.bus);
    }

    /// The reader: frames in, answers taken, commands queued. Returns why
    /// it stopped.
    async fn read_loop(
        &self,
        session: &Arc<Session>,
        mut reader: dist::FrameReader,
        commands: mpsc::Sender<Work>,
    ) -> String {
        let mut closing = session.closing();
        let mut garbage = 0u64;
        loop {
            let frame = tokio::select! {
                f = tokio::time::timeout(TICK_TIMEOUT, reader.next()) => f,
                _ = closing.wait_for(|c| *c) => return "closed".into(),
            };
            let message = match frame {
                Err(_) => return dist::DistError::TickTimeout(TICK_TIMEOUT).to_string(),
                Ok(Err(e)) => return e.to_string(),
                Ok(Ok(None)) => return "the peer closed the connection".into(),
                Ok(Ok(Some(dist::Frame::Tick))) => continue,
                Ok(Ok(Some(dist::Frame::Garbage(why)))) => {
                    garbage += 1;
                    tracing::warn!(peer = %session.peer, garbage, "Erlang frame skipped: {why}");
                    continue;
                }
                Ok(Ok(Some(dist::Frame::Message(m)))) => *m,
            };
            let queued = match message {
                Message::RegSend(m) => self.reg_send(session, m.from_pid, &m.to_name.name, m.message),
                Message::RegSendTt(m) => self.reg_send(session, m.from_pid, &m.to_name.name, m.message),
                Message::SendSender(m) => session.take_answer(self, Some(&m.from_pid), Some(&m.to_pid), m.message),
                Message::SendSenderTt(m) => session.take_answer(self, Some(&m.from_pid), Some(&m.to_pid), m.message),
                Message::Send(m) => session.take_answer(self, None, Some(&m.to_pid), m.message),
                Message::SendTt(m) => session.take_answer(self, None, Some(&m.to_pid), m.message),
                Message::Exit(m) => self.exited(session, &m.from_pid),
                Message::Exit2(m) => self.exited(session, &m.from_pid),
                Message::PayloadExit(m) => self.exited(session, &m.from_pid),
                Message::PayloadExit2(m) => self.exited(session, &m.from_pid),
                Message::SpawnRequest(m) => Some(spawn_work(m.from_pid, m.req_id, m.mfa, m.arg_list)),
                Message::SpawnRequestTt(m) => Some(spawn_work(m.from_pid, m.req_id, m.mfa, m.arg_list)),
                Message::UnlinkId(m) => {
                    session.try_send(Message::unlink_id_ack(m.id, m.to_pid, m.from_pid));
                    None
                }
                // Links and monitors on our processes: they live as long
                // as the connection, which the peer watches already.
                _ => None,
            };
            if let Some(command) = queued {
                if commands.send(command).await.is_err() {
                    return "the command worker stopped".into();
                }
            }
        }
    }

    fn exited(&self, session: &Session, pid: &Pid) -> Option<Work> {
        session.forget(pid);
        lock(&self.bindings).retain(|b| b.pid != *pid);
        None
    }

    /// A message to a registered name: `net_kernel` (ping), `rex` (rpc) or
    /// anything else (mod_erlang_event ignores the name).
    fn reg_send(&self, session: &Session, from: Pid, to: &str, message: Term) -> Option<Work> {
        match to {
            "net_kernel" => {
                // {'$gen_call', {From, Tag}, {is_auth, Node}} → {Tag, yes}
                if let Some((caller, tag, _)) = gen_call(&message) {
                    session.reply(&caller, tuple(vec![tag, atom("yes")]));
                }
                None
            }
            "rex" => Some(Work::Rex(from, message)),
            _ => session.take_answer(self, Some(&from), None, message),
        }
    }

    async fn work(self: Arc<Self>, session: Arc<Session>, mut rx: mpsc::Receiver<Work>) {
        while let Some(work) = rx.recv().await {
            match work {
                Work::Rex(from, call) => self.rex(&session, from, &call).await,
                Work::Spawn { from, req, module, function, args } => {
                    self.spawn(&session, from, req, &module, &function, &args).await
                }
                Work::Message(from, message) => {
                    if session.run(&self, from, message).await {
                        // `exit`: the ok is queued; the writer sends it, then closes.
                        session.close();
                        return;
                    }
                }
            }
        }
    }

    /// An rpc to our node, in either form:
    /// `{'$gen_call', {From, Tag}, {call, M, F, A, GL}}` (rpc's rex server
    /// protocol) answered `{Tag, Result}`, or ei_rpc's `{From, {call, M, F,
    /// A, GL}}` answered `{rex, Result}`. `evrhost:F(A…)` (or `freeswitch:`)
    /// runs the message `{F, A…}` as if sent directly, so
    /// `rpc:call(Node, evrhost, api, [status, ""])` is `{ok, Text}`.
    async fn rex(self: &Arc<Self>, session: &Arc<Session>, from: Pid, call: &Term) {
        let (to, tag, request) = match gen_call(call) {
            Some((caller, tag, request)) => (caller, Some(tag), request),
            None => match call {
                Term::Tuple(t) if t.elements.len() == 2 => match &t.elements[0] {
                    Term::Pid(p) => (p.clone(), None, t.elements[1].clone()),
                    _ => return,
                },
                _ => return,
            },
        };
        let result = match &request {
            Term::Tuple(t) if t.elements.len() == 5 && as_atom(&t.elements[0]) == Some("call") => {
                let (m, f, a) = (&t.elements[1], &t.elements[2], &t.elements[3]);
                let args = match a {
                    Term::List(l) => Some(l.elements.clone()),
                    Term::ByteList(b) if b.bytes.is_empty() => Some(Vec::new()),
                    _ => None,
                };
                match self.apply(session, &from, m, f, args).await {
                    Some(answer) => answer,
                    None => undef_rpc(m, f, a),
                }
            }
            _ => tuple(vec![atom("badrpc"), atom("badarg")]),
        };
        let reply = match tag {
            Some(tag) => tuple(vec![tag, result]),
            None => tuple(vec![atom("rex"), result]),
        };
        session.send(Message::send(to, reply)).await;
    }

    /// `evrhost:F(A…)` (or `freeswitch:`) for an rpc: the answer to the
    /// message `{F, A…}` (`F` alone without arguments), as if the caller
    /// had sent it. None for any other module.
    async fn apply(
        self: &Arc<Self>,
        session: &Arc<Session>,
        caller: &Pid,
        m: &Term,
        f: &Term,
        args: Option<Vec<Term>>,
    ) -> Option<Term> {
        let (Some("evrhost" | "freeswitch"), Some(f), Some(args)) = (as_atom(m), as_atom(f), args) else {
            return None;
        };
        let message = if args.is_empty() {
            atom(f)
        } else {
            let mut elements = vec![atom(f)];
            elements.extend(args);
            tuple(elements)
        };
        let (answer, close) = session.handle(self, Some(caller), &message).await;
        if close {
            session.close();
        }
        Some(answer.unwrap_or_else(|| atom("ok")))
    }

    /// A spawn request: how `rpc:call` and `erpc:call` reach a node since
    /// OTP 23. Only `erpc:execute_call(Ref, M, F, A)` is served, by
    /// `apply`; its result goes back as the exit reason of a process that
    /// never ran, through the monitor the caller asked for, as erpc reads
    /// it: `{Ref, return, Result}`.
    async fn spawn(
        self: &Arc<Self>,
        session: &Arc<Session>,
        from: Pid,
        req: Reference,
        m: &Term,
        f: &Term,
        args: &[Term],
    ) {
        use erl_dist::term::PidOrAtom;
        let [r, module, function, a] = args else {
            session.send(Message::spawn_reply(req, from, 0.into(), PidOrAtom::Atom("notsup".into()))).await;
            return;
        };
        if (as_atom(m), as_atom(f)) != (Some("erpc"), Some("execute_call")) {
            session.send(Message::spawn_reply(req, from, 0.into(), PidOrAtom::Atom("notsup".into()))).await;
            return;
        }
        let pid = self.new_pid();
        // Flag 2: the monitor is set up.
        session.send(Message::spawn_reply(req.clone(), from.clone(), 2.into(), PidOrAtom::Pid(pid.clone()))).await;
        let list = match a {
            Term::List(l) => Some(l.elements.clone()),
            Term::ByteList(b) if b.bytes.is_empty() => Some(Vec::new()),
            _ => None,
        };
        let reason = match self.apply(session, &from, module, function, list).await {
            Some(answer) => tuple(vec![r.clone(), atom("return"), answer]),
            None => {
                let mfa = tuple(vec![module.clone(), function.clone(), a.clone(), term::list(Vec::new())]);
                tuple(vec![r.clone(), atom("error"), atom("undef"), term::list(vec![mfa])])
            }
        };
        session.send(Message::payload_monitor_p_exit(PidOrAtom::Pid(pid), from, req, reason)).await;
    }

    /// An API command for a peer: (ok?, text). As mod_erlang_event, an
    /// unknown command, empty output or output starting with `-` is an
    /// error.
    async fn api(&self, command: &str, args: &str) -> (bool, String) {
        let Some(d) = self.d.upgrade() else { return (false, "-ERR shutting down".into()) };
        match d.run_command(command, args, 0).await {
            Ok(text) if text.is_empty() || text.starts_with('-') => (false, text),
            Ok(text) => (true, text),
            Err(crate::dispatcher::DispatchError::CommandNotFound(_)) => {
                (false, format!("{command}: Command not found!\n"))
            }
            Err(e) => (false, format!("-ERR {e}")),
        }
    }

    fn bgapi(self: &Arc<Self>, session: Arc<Session>, to: Pid, job: String, command: String, args: String) {
        let Some(d) = self.d.upgrade() else { return };
        let encoding = self.encoding;
        session.jobs.fetch_add(1, Relaxed);
        tokio::spawn(async move {
            let (ok, text) = d.run_background(&job, &command, &args, &bus::Caller::host("erlang bgapi")).await;
            session.jobs.fetch_sub(1, Relaxed);
            let tag = if ok { "bgok" } else { "bgerror" };
            let message = tuple(vec![atom(tag), encoding.text(&job), encoding.text(&text)]);
            if !session.send(Message::send(to, message)).await {
                tracing::info!(peer = %session.peer, job = %job, "bgapi result not delivered: the node is gone");
            }
        });
    }

    /// Binds `pid` to `section`; false when the peer holds too many bindings.
    fn bind(&self, section: &str, pid: Pid, session: &Arc<Session>) -> bool {
        let mut bindings = lock(&self.bindings);
        if bindings.iter().any(|b| b.section == section && b.pid == pid) {
            return true;
        }
        let held = bindings.iter().filter(|b| b.session.upgrade().is_some_and(|s| Arc::ptr_eq(&s, session))).count();
        if held >= session::MAX_BINDINGS {
            tracing::warn!(peer = %session.peer, "bind refused: {} bindings already", session::MAX_BINDINGS);
            return false;
        }
        bindings.push(Binding { section: section.to_string(), pid, session: Arc::downgrade(session) });
        true
    }

    /// A `fetch_reply`: Ok when it answered a waiting fetch.
    fn fetch_reply(&self, id: &str, xml: String) -> Result<(), &'static str> {
        if self.resolve(&Key::Uuid(id.to_string()), term::string(&xml)) {
            self.remember_fetch(id, "duplicate_response");
            return Ok(());
        }
        match lock(&self.recent_fetches).iter().find(|(f, _)| f == id) {
            Some((_, why)) => Err(why),
            None => Err("invalid_uuid"),
        }
    }

    fn remember_fetch(&self, id: &str, why: &'static str) {
        let mut recent = lock(&self.recent_fetches);
        if let Some(entry) = recent.iter_mut().find(|(f, _)| f == id) {
            entry.1 = why;
            return;
        }
        if recent.len() >= RECENT_FETCHES {
            recent.pop_front();
        }
        recent.push_back((id.to_string(), why));
    }

    /// The `erlang` console command.
    fn console(&self, args: &str) -> Result<String, String> {
        let mut words = args.split_whitespace();
        match (words.next(), words.next()) {
            (Some("listeners"), None) => {
                let sessions = lock(&self.sessions);
                let outbound = lock(&self.outbound);
                let mut lines: Vec<String> = sessions
                    .values()
                    .map(|s| {
                        let n = outbound.values().filter(|o| o.node == s.peer).count();
                        let addr = s.addr.map_or_else(|| "-".into(), |a| a.to_string());
                        format!(
                            "{} ({addr}) up {} s, {n} outbound session(s), events sent {} dropped {}",
                            s.peer,
                            s.started.elapsed().as_secs(),
                            s.events_sent.load(Relaxed),
                            s.events_dropped.load(Relaxed)
                        )
                    })
                    .collect();
                lines.sort();
                Ok(if lines.is_empty() { "No active listeners".into() } else { lines.join("\n") })
            }
            (Some("sessions"), Some(peer)) => {
                if self.session(peer).is_none() {
                    return Err(format!("-ERR no connection to node {peer}"));
                }
                let mut lines: Vec<String> = lock(&self.outbound)
                    .iter()
                    .filter(|(_, o)| o.node == peer)
                    .map(|(id, o)| {
                        format!("{id} route {} to {} for {} ms", o.route, o.target, o.started.elapsed().as_millis())
                    })
                    .collect();
                lines.extend(lock(&self.calls).iter().filter(|(_, c)| c.node == peer).map(|((route, id), c)| {
                    let to = c.pid.as_ref().map_or_else(|| "the registered process".to_string(), |p| p.to_string());
                    format!("call {id} route {route} to {to}, idle {} s", c.last.elapsed().as_secs())
                }));
                Ok(if lines.is_empty() { format!("No outbound sessions for {peer}") } else { lines.join("\n") })
            }
            _ => Err("-USAGE: erlang listeners | erlang sessions NODE".into()),
        }
    }

    /// The connection to `peer`: the live one, or a new one.
    async fn connection(self: &Arc<Self>, peer: &str) -> Result<Arc<Session>, String> {
        if let Some(s) = self.session(peer) {
            return Ok(s);
        }
        let _one = self.connecting.lock().await;
        if let Some(s) = self.session(peer) {
            return Ok(s);
        }
        let name: NodeName = peer.parse().map_err(|e| format!("node `{peer}`: {e}"))?;
        let local = dist::local_node(&self.name, self.creation);
        let (stream, node) = dist::connect(&name, local, &self.cookie).await.map_err(|e| format!("{peer}: {e}"))?;
        tracing::info!(peer = %node.name, "connected to Erlang node");
        Ok(self.open(stream, node.name.to_string()))
    }

    /// The process a request goes to: the registered process itself, or
    /// the pid its `get_pid` or rpc launch answers.
    async fn handler_pid(
        self: &Arc<Self>,
        session: &Arc<Session>,
        target: &ErlangTarget,
        uuid: &str,
    ) -> Result<Option<Pid>, String> {
        let timeout = self.settings.route_timeout;
        match target {
            ErlangTarget::Registered { .. } => Ok(None),
            ErlangTarget::GetPid { name, .. } => {
                let r = self.new_ref();
                let rx = self.expect(Key::Ref(r.id.clone()));
                let ask = tuple(vec![
                    atom("get_pid"),
                    self.encoding.text(uuid),
                    Term::from(r.clone()),
                    term::pid_term(&session.pid),
                ]);
                session.send(Message::reg_send(session.pid.clone(), name.as_str().into(), ask)).await;
                match self.wait(Key::Ref(r.id), rx, timeout).await {
                    Some(Term::Pid(p)) => Ok(Some(p)),
                    Some(other) => Err(format!("get_pid answered {other}, not a pid")),
                    None => Err(format!("no get_pid answer from {name} within {timeout:?}")),
                }
            }
            ErlangTarget::Rpc { module, function, .. } => {
                let r = self.new_ref();
                let asker = self.new_pid();
                let rx = self.expect(Key::Pid(asker.id, asker.serial));
                let call = tuple(vec![
                    atom("call"),
                    atom(module),
                    atom(function),
                    term::list(vec![Term::from(r.clone())]),
                    atom("user"),
                ]);
                let ask = tuple(vec![term::pid_term(&asker), call]);
                session.send(Message::reg_send(asker.clone(), "rex".into(), ask)).await;
                match self.wait(Key::Pid(asker.id, asker.serial), rx, timeout).await {
                    Some(Term::Tuple(t)) if t.elements.len() == 2 => match (&t.elements[0], &t.elements[1]) {
                        (Term::Reference(back), Term::Pid(p)) if back.id == r.id => Ok(Some(p.clone())),
                        _ => Err(format!("{module}:{function} returned {}, not {{Ref, Pid}}", Term::Tuple(t.clone()))),
                    },
                    Some(other) => Err(format!("{module}:{function} returned {other}, not {{Ref, Pid}}")),
                    None => Err(format!("no rpc answer from {module}:{function} within {timeout:?}")),
                }
            }
        }
    }

    /// The `{call, Event}` (or `{call_event, Event}`) a request becomes.
    fn call_term(&self, request: &Request, uuid: &str, tag: &str) -> Term {
        let e = self.encoding;
        let pair = |k: &str, v: &str| tuple(vec![e.text(k), e.text(v)]);
        let mut list = vec![
            e.text(uuid),
            pair("Event-Name", "ROUTE"),
            pair("Unique-ID", uuid),
            pair("Route", &request.route),
            pair("Reply-Node", &self.name.to_string()),
        ];
        let origin = match &request.origin {
            Origin::Cli => "cli".to_string(),
            Origin::Startup(w) => format!("startup {w}"),
            Origin::Udp(p) => {
                list.push(pair("Peer-IP", &p.ip));
                list.push(pair("Peer-Port", &p.port.to_string()));
                "udp".into()
            }
            Origin::Rpc => "rpc".into(),
            Origin::Erlang(n) => format!("erlang {n}"),
            Origin::Yate => "yate".into(),
            Origin::Event(n) => format!("event {n}"),
        };
        list.push(pair("Origin", &origin));
        for (k, v) in &request.params {
            list.push(pair(k, v));
        }
        list.push(tuple(vec![e.text("body"), e.bytes(&request.data)]));
        tuple(vec![atom(tag), tuple(vec![atom("event"), term::list(list)])])
    }
}

/// The reply term a process sends back, `{route_reply, UUID, Reply}`:
/// - text (a string or binary): handled, the text is the reply's data;
/// - `{ok, Data}` or `{ok, Data, [{"Name","Value"}…]}`: the same, with
///   parameters;
/// - `declined`: not handled (the front-end's "no answer");
/// - `{error, Reason}`: the route fails with Reason.
fn remote_reply(answer: &Term) -> Result<Reply, String> {
    let reply = |data: Vec<u8>, params| Reply { handled: true, retval: String::new(), params, data: Some(data) };
    let bytes = |t: &Term| -> Option<Vec<u8>> {
        match t {
            Term::Binary(b) => Some(b.bytes.clone()),
            _ => as_text(t).map(String::into_bytes),
        }
    };
    match answer {
        Term::Atom(a) if a.name == "declined" => {
            Ok(Reply { handled: false, retval: String::new(), params: Vec::new(), data: None })
        }
        Term::Tuple(t) => match t.elements.as_slice() {
            [tag, data] if as_atom(tag) == Some("ok") => bytes(data).map(|d| reply(d, Vec::new())),
            [tag, data, params] if as_atom(tag) == Some("ok") => {
                bytes(data).zip(as_pairs(params)).map(|(d, p)| reply(d, p))
            }
            [tag, reason] if as_atom(tag) == Some("error") => {
                return Err(as_text(reason).unwrap_or_else(|| reason.to_string()))
            }
            _ => None,
        }
        .ok_or_else(|| format!("unreadable route_reply {answer}")),
        other => bytes(other).map(|d| reply(d, Vec::new())).ok_or_else(|| format!("unreadable route_reply {other}")),
    }
}

#[async_trait::async_trait]
impl RemoteRoutes for Node {
    async fn run(&self, route: &str, target: &ErlangTarget, request: &Request) -> Result<Reply, String> {
        let me = self.me.upgrade().ok_or("the Erlang front-end has stopped")?;
        let session = me.connection(target.node()).await?;
        let uuid = uuid::Uuid::new_v4().to_string();
        lock(&self.outbound).insert(
            uuid.clone(),
            Outbound {
                node: target.node().to_string(),
                route: route.to_string(),
                target: target.to_string(),
                started: std::time::Instant::now(),
            },
        );
        // Requests of one call (a `Unique-ID` or `Call-ID` parameter) go to
        // the process that took the first one, as FreeSWITCH sends a call's
        // later events: `{call, Event}` first, `{call_event, Event}` after.
        let call_key = call_id(request).map(|id| (route.to_string(), id));
        let known = call_key.as_ref().and_then(|key| {
            let mut calls = lock(&self.calls);
            let call = calls.get_mut(key).filter(|c| c.node == target.node())?;
            call.last = std::time::Instant::now();
            Some(call.pid.clone())
        });
        let result = async {
            let (pid, tag) = match known {
                Some(pid) => (pid, "call_event"),
                None => {
                    let pid = me.handler_pid(&session, target, &uuid).await?;
                    if let Some(key) = &call_key {
                        let now = std::time::Instant::now();
                        let mut calls = lock(&self.calls);
                        calls.retain(|_, c| now.duration_since(c.last) < CALL_IDLE);
                        if calls.len() < MAX_CALLS {
                            let node = target.node().to_string();
                            calls.insert(key.clone(), Call { node, pid: pid.clone(), last: now });
                        }
                    }
                    (pid, "call")
                }
            };
            let rx = self.expect(Key::Uuid(uuid.clone()));
            let call = self.call_term(request, &uuid, tag);
            let sent = match (&pid, target) {
                (Some(pid), _) => session.send(Message::send(pid.clone(), call)).await,
                (None, ErlangTarget::Registered { name, .. }) => {
                    session.send(Message::reg_send(session.pid.clone(), name.as_str().into(), call)).await
                }
                (None, _) => false,
            };
            if !sent {
                lock(&self.pending).remove(&Key::Uuid(uuid.clone()));
                return Err(format!("{}: the connection is gone", target.node()));
            }
            let timeout = self.settings.route_timeout;
            match self.wait(Key::Uuid(uuid.clone()), rx, timeout).await {
                Some(answer) => remote_reply(&answer),
                None => Err(format!("no route_reply from {target} within {timeout:?}")),
            }
        }
        .await;
        lock(&self.outbound).remove(&uuid);
        result
    }
}

#[async_trait::async_trait]
impl crate::dispatcher::Fetcher for Node {
    async fn fetch(&self, query: &FetchQuery) -> Result<String, HostError> {
        let FetchQuery { section, tag, key, value, params } = query;
        let bound: Vec<(Pid, Arc<Session>)> = lock(&self.bindings)
            .iter()
            .filter(|b| b.section == *section)
            .filter_map(|b| Some((b.pid.clone(), b.session.upgrade()?)))
            .collect();
        if bound.is_empty() {
            return Err(HostError::NotFound(format!("no Erlang process is bound to section `{section}`")));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let rx = self.expect(Key::Uuid(id.clone()));
        let e = self.encoding;
        let text = |s: &str| e.text(if s.is_empty() { "undefined" } else { s });
        let params = term::list(params.iter().map(|(k, v)| tuple(vec![e.text(k), e.text(v)])).collect());
        let request = tuple(vec![atom("fetch"), atom(section), text(tag), text(key), text(value), e.text(&id), params]);
        for (pid, session) in &bound {
            session.try_send(Message::send(pid.clone(), request.clone()));
        }
        let timeout = self.settings.fetch_timeout;
        match self.wait(Key::Uuid(id.clone()), rx, timeout).await {
            Some(xml) => Ok(as_text(&xml).unwrap_or_default()),
            None => {
                self.remember_fetch(&id, "timeout");
                Err(HostError::Failed(format!("no fetch_reply for section `{section}` within {timeout:?}")))
            }
        }
    }
}

/// A spawn request, queued for the session's worker like any command.
fn spawn_work(from: Pid, req: Reference, mfa: erl_dist::term::Mfa, args: eetf::List) -> Work {
    Work::Spawn { from, req, module: Term::from(mfa.module), function: Term::from(mfa.function), args: args.elements }
}

/// `{'$gen_call', {From, Tag}, Request}` → (From, Tag, Request).
fn gen_call(message: &Term) -> Option<(Pid, Term, Term)> {
    let Term::Tuple(t) = message else { return None };
    let [label, from, request] = t.elements.as_slice() else { return None };
    if as_atom(label) != Some("$gen_call") {
        return None;
    }
    let Term::Tuple(f) = from else { return None };
    match f.elements.as_slice() {
        [Term::Pid(p), tag] => Some((p.clone(), tag.clone(), request.clone())),
        _ => None,
    }
}

/// What the rex server answers for a function it does not know.
fn undef_rpc(m: &Term, f: &Term, a: &Term) -> Term {
    let mfa = tuple(vec![m.clone(), f.clone(), a.clone(), term::list(Vec::new())]);
    tuple(vec![atom("badrpc"), tuple(vec![atom("EXIT"), tuple(vec![atom("undef"), term::list(vec![mfa])])])])
}

fn rand_u32() -> u32 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    nanos ^ std::process::id().rotate_left(16)
}

/// Keeps the EPMD registration's connection open; EPMD forgets the node
/// when it closes, so its end is logged loudly.
async fn keep_registration(mut epmd: TcpStream, name: String) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    loop {
        match epmd.read(&mut buf).await {
            Ok(0) | Err(_) => {
                tracing::error!(node = %name, "EPMD closed our registration; peers cannot find this node until restart");
                return;
            }
            Ok(_) => {}
        }
    }
}
