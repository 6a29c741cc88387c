//! Connections to peer nodes: accepting them (inbound ACL, handshake),
//! setting up a session's reader, command worker and writer, and tearing
//! //! all of it down when the connection ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use eetf::{Pid, Term};
use erl_dist::message::Message;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::rex::{gen_call, spawn_work};
use super::session::{self, Session};
use super::term::{atom, tuple};
use super::{dist, Node, Work, PEER_QUEUE, TICK, TICK_TIMEOUT};
use crate::frontend::disconnected;
use crate::sync::lock;

impl Node {
    pub(super) async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
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
            disconnected(&self.bus, local, Some(addr), "erlang");
            return;
        }
        let _ = stream.set_nodelay(true);
        let (stream, peer) = match dist::accept(stream, dist::local_node(&self.name, self.creation), &self.cookie).await
        {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(%addr, error = %e, "Erlang handshake failed");
                disconnected(&self.bus, local, Some(addr), "erlang");
                return;
            }
        };
        tracing::info!(peer = %peer.name, %addr, "Erlang node connected");
        self.open(stream, peer.name.to_string());
    }

    /// Sets up a session on a connected stream and runs its reader in a
    /// task of its own; returns at once.
    pub(super) fn open(self: &Arc<Self>, stream: TcpStream, peer: String) -> Arc<Session> {
        let addr = stream.peer_addr().ok();
        let local = stream.local_addr().ok();
        let (read, write) = stream.into_split();
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        let session = Session::new(peer.clone(), addr, self.new_pid(), tx, self.logs.clone());
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
            disconnected(&node.bus, local, addr, "erlang");
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
}
