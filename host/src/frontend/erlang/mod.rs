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
//! Files: `dist.rs` (EPMD, handshakes, framing), `term.rs` (checking and
//! building terms), `connection.rs` (a peer's connection and its tasks),
//! `session.rs` (answering a peer's messages), `api.rs` (api, bgapi, the
//! `erlang` command), `rex.rs` (rpc and erpc), `fetch.rs` (bindings and
//! fetches), `outbound.rs` (routes handled by Erlang processes).
//!
//! Invariants:
//! - One connection per peer node, whoever opened it: an outbound route to
//!   a node that is connected already uses that connection.
//! - A connection's end (EOF, error, tick timeout, stall, `exit`) tears down
//!   what it set up (subscriptions, log tap, bindings), raises
//!   E_CORE_TCP_DISCONNECT and touches nothing else.
//! - Every request we wait on (`get_pid`, rpc, route, fetch) has a timeout
//!   and is removed from `pending` when it ends, answered or not.

mod api;
mod connection;
mod dist;
mod fetch;
mod outbound;
mod rex;
mod session;
pub mod term;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use eetf::{Pid, Reference, Term};
use erl_dist::node::{Creation, NodeName};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::metrics::{header, Metrics};
use super::{Context, Frontend, FrontendError, Running};
use crate::bus::log_layer::LogHub;
use crate::bus::Bus;
use crate::config::ErlangSettings;
use crate::dispatcher::{Dispatcher, HostCommand, RemoteRoute};
use crate::runtime::CommandInfo;
use crate::sync::lock;
use session::Session;
use term::Encoding;

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
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Dist(#[from] dist::DistError),
    #[error("node name `{0}`: {1}")]
    Name(String, String),
    #[error(transparent)]
    Dispatch(#[from] crate::dispatcher::DispatchError),
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

pub struct Node {
    me: Weak<Node>,
    pub name: NodeName,
    creation: Creation,
    cookie: String,
    pub encoding: Encoding,
    settings: ErlangSettings,
    d: Weak<Dispatcher>,
    bus: Arc<Bus>,
    logs: Arc<LogHub>,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    /// Outbound connects, one at a time (so two routes to one node share
    /// the connection the first opens).
    connecting: tokio::sync::Mutex<()>,
    next_id: AtomicU32,
    pending: Mutex<HashMap<Key, oneshot::Sender<Term>>>,
    recent_fetches: Mutex<VecDeque<(String, &'static str)>>,
    bindings: Mutex<Vec<fetch::Binding>>,
    outbound: Mutex<BTreeMap<String, outbound::Outbound>>,
    calls: Mutex<HashMap<(String, String), outbound::Call>>,
}

/// The Erlang front-end: `[erlang]`.
pub struct Erlang;

impl Frontend for Erlang {
    type Settings = ErlangSettings;
    const NAME: &'static str = "erlang";

    async fn start(settings: ErlangSettings, ctx: &Context) -> Result<Running, FrontendError> {
        let port = settings.listen.port();
        let (node, tasks) = Node::start(settings, ctx).await.map_err(|e| FrontendError::new(Self::NAME, e))?;
        tracing::info!("Erlang C-node {} on port {port}", node.name);
        let mut running = Running::new(Self::NAME);
        for task in tasks {
            running.task(task);
        }
        running.metrics(Arc::new(NodeMetrics(Arc::downgrade(&node))));
        Ok(running)
    }
}

/// Connected nodes, and the events sent to and dropped for each.
struct NodeMetrics(Weak<Node>);

impl Metrics for NodeMetrics {
    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let Some(node) = self.0.upgrade() else { return };
        let sessions: Vec<Arc<Session>> = lock(&node.sessions).values().cloned().collect();
        header(out, "evrhost_erlang_nodes", "gauge", "Erlang nodes connected.");
        let _ = writeln!(out, "evrhost_erlang_nodes {}", sessions.len());
        type Counter = (&'static str, &'static str, fn(&Session) -> u64);
        let counters: [Counter; 2] = [
            ("evrhost_erlang_events_sent_total", "Events sent to a node's event handler.", |s| {
                s.events_sent.load(Relaxed)
            }),
            ("evrhost_erlang_events_dropped_total", "Events dropped because a node's queue was full.", |s| {
                s.events_dropped.load(Relaxed)
            }),
        ];
        for (name, help, value) in counters {
            header(out, name, "counter", help);
            for s in &sessions {
                let _ = writeln!(out, "{name}{{node=\"{}\"}} {}", s.peer, value(s));
            }
        }
    }
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
        ctx: &Context,
    ) -> Result<(Arc<Node>, Vec<tokio::task::JoinHandle<()>>), ErlangError> {
        let d = &ctx.dispatcher;
        let name = node_name(&settings)?;
        let listener = TcpListener::bind(settings.listen)
            .await
            .map_err(|source| ErlangError::Listen { addr: settings.listen, source })?;
        let port = listener.local_addr().map_or(settings.listen.port(), |a| a.port());
        let (epmd, creation) = dist::register(name.name(), port).await?;
        let routes = settings.routes.clone();
        let node = Arc::new_cyclic(|me| Node {
            me: me.clone(),
            name,
            creation,
            cookie: settings.cookie.clone(),
            encoding: settings.encoding,
            settings,
            d: Arc::downgrade(d),
            bus: d.bus().clone(),
            logs: ctx.logs.clone(),
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
        for route in routes {
            let handler = Arc::new(outbound::ErlangRoute::new(&node, route.route.clone(), route.target));
            d.add_remote_route(RemoteRoute { route: route.route, priority: route.priority, handler }).await?;
        }
        let info = CommandInfo {
            name: "erlang".into(),
            usage: "listeners | sessions NODE".into(),
            description: "connected Erlang nodes and their outbound sessions".into(),
        };
        let run = Arc::new(api::Console(Arc::downgrade(&node)));
        d.add_command(HostCommand { info, run, admin: false }).await?;
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
