//! Remote procedure calls into our node: `rpc:call` through `rex` (both
//! the rex server's `$gen_call` and ei_rpc's form) and erpc's spawn
//! requests, //! requests, each run as the message `{F, A…}` would be.

use std::sync::Arc;

use eetf::{Pid, Reference, Term};
use erl_dist::message::Message;

use super::session::Session;
use super::term::{self, as_atom, atom, tuple};
use super::{Node, Work};

impl Node {
    /// An rpc to our node, in either form:
    /// `{'$gen_call', {From, Tag}, {call, M, F, A, GL}}` (rpc's rex server
    /// protocol) answered `{Tag, Result}`, or ei_rpc's `{From, {call, M, F,
    /// A, GL}}` answered `{rex, Result}`. `evrhost:F(A…)` (or `freeswitch:`)
    /// runs the message `{F, A…}` as if sent directly, so
    /// `rpc:call(Node, evrhost, api, [status, ""])` is `{ok, Text}`.
    pub(super) async fn rex(self: &Arc<Self>, session: &Arc<Session>, from: Pid, call: &Term) {
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
    pub(super) async fn spawn(
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
}

/// A spawn request, queued for the session's worker like any command.
pub(super) fn spawn_work(from: Pid, req: Reference, mfa: erl_dist::term::Mfa, args: eetf::List) -> Work {
    Work::Spawn { from, req, module: Term::from(mfa.module), function: Term::from(mfa.function), args: args.elements }
}

/// `{'$gen_call', {From, Tag}, Request}` → (From, Tag, Request).
pub(super) fn gen_call(message: &Term) -> Option<(Pid, Term, Term)> {
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
