//! Outbound routes: a route whose handler is an Erlang process. Each
//! request reaches the process as `{call, Event}` (later requests of the
//! same call as `{call_event, Event}`), and its `{route_reply, UUID,
//! //! Reply}` is the route's reply.

use std::sync::{Arc, Weak};
use std::time::Duration;

use eetf::{Pid, Term};
use erl_dist::message::Message;
use erl_dist::node::NodeName;

use super::session::Session;
use super::term::{self, as_atom, as_pairs, as_text, atom, tuple};
use super::{dist, Key, Node};
use crate::config::ErlangTarget;
use crate::dispatcher::{RemoteError, RemoteHandler};
use crate::runtime::{Origin, Reply, Request};
use crate::sync::lock;

/// One route's Erlang handler, as the dispatcher runs it.
pub(super) struct ErlangRoute {
    node: Weak<Node>,
    route: String,
    target: ErlangTarget,
    /// `erlang:TARGET`, for `route.list` and outcomes.
    name: String,
}

impl ErlangRoute {
    pub(super) fn new(node: &Arc<Node>, route: String, target: ErlangTarget) -> ErlangRoute {
        let name = format!("erlang:{target}");
        ErlangRoute { node: Arc::downgrade(node), route, target, name }
    }
}

#[async_trait::async_trait]
impl RemoteHandler for ErlangRoute {
    fn name(&self) -> &str {
        &self.name
    }

    async fn handle(&self, request: &Request) -> Result<Reply, RemoteError> {
        let node = self.node.upgrade().ok_or_else(|| RemoteError("the Erlang front-end has stopped".into()))?;
        node.route(&self.route, &self.target, request).await.map_err(RemoteError)
    }
}

impl Node {
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
            Origin::Yate(m) => format!("yate {}", m.name),
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

/// A call's process: where the later requests of one call go.
pub(super) struct Call {
    pub node: String,
    /// None: the registered process itself.
    pub pid: Option<Pid>,
    pub last: std::time::Instant,
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
pub(super) struct Outbound {
    pub node: String,
    pub route: String,
    pub target: String,
    pub started: std::time::Instant,
}

/// The reply term a process sends back, `{route_reply, UUID, Reply}`:
/// - text (a string or binary): handled, the text is the reply's data;
/// - `{ok, Data}` or `{ok, Data, [{"Name","Value"}…]}`: the same, with
///   parameters;
/// - `declined`: not handled (the front-end's "no answer");
/// - `{error, Reason}`: the route fails with Reason.
fn remote_reply(answer: &Term) -> Result<Reply, String> {
    let reply = |data: Vec<u8>, params| Reply {
        handled: true,
        retval: String::new(),
        params,
        unset: Vec::new(),
        data: Some(data),
    };
    let bytes = |t: &Term| -> Option<Vec<u8>> {
        match t {
            Term::Binary(b) => Some(b.bytes.clone()),
            _ => as_text(t).map(String::into_bytes),
        }
    };
    match answer {
        Term::Atom(a) if a.name == "declined" => {
            Ok(Reply { handled: false, retval: String::new(), params: Vec::new(), unset: Vec::new(), data: None })
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

impl Node {
    async fn route(&self, route: &str, target: &ErlangTarget, request: &Request) -> Result<Reply, String> {
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
