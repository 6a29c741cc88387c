//! API commands for peers (`api`, `bgapi`) with mod_erlang_event's error
//! rules, and the `erlang` console command.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};

use eetf::Pid;
use erl_dist::message::Message;

use super::session::Session;
use super::term::{atom, tuple};
use super::Node;
use crate::bus::Caller;
use crate::dispatcher::{Command, CommandError, DispatchError};
use crate::sync::lock;

/// A failed command's text, as mod_erlang_event gives it for `api` and
/// `bgapi` alike.
fn failure(command: &str, e: &DispatchError) -> String {
    match e {
        DispatchError::CommandNotFound(_) => format!("{command}: Command not found!\n"),
        other => format!("-ERR {}", crate::error::chain(other)),
    }
}

/// The `erlang` command, for every API client.
pub(super) struct Console(pub(super) Weak<Node>);

#[async_trait::async_trait]
impl Command for Console {
    async fn run(&self, args: &str) -> Result<String, CommandError> {
        let node = self.0.upgrade().ok_or_else(|| CommandError("-ERR stopped".into()))?;
        node.console(args).map_err(CommandError)
    }
}

impl Node {
    /// An API command for a peer: (ok?, text). As mod_erlang_event, an
    /// unknown command, empty output or output starting with `-` is an
    /// error.
    pub(super) async fn api(&self, command: &str, args: &str) -> (bool, String) {
        let Some(d) = self.d.upgrade() else { return (false, "-ERR shutting down".into()) };
        match d.run_command(command, args, 0).await {
            Ok(text) if text.is_empty() || text.starts_with('-') => (false, text),
            Ok(text) => (true, text),
            Err(e) => (false, failure(command, &e)),
        }
    }

    pub(super) fn bgapi(self: &Arc<Self>, session: Arc<Session>, to: Pid, job: String, command: String, args: String) {
        let Some(d) = self.d.upgrade() else { return };
        let encoding = self.encoding;
        session.jobs.fetch_add(1, Relaxed);
        tokio::spawn(async move {
            let caller = Caller::host("erlang bgapi");
            let (ok, text) = d.run_background(&job, &command, &args, &caller, failure).await;
            session.jobs.fetch_sub(1, Relaxed);
            let tag = if ok { "bgok" } else { "bgerror" };
            let message = tuple(vec![atom(tag), encoding.text(&job), encoding.text(&text)]);
            if !session.send(Message::send(to, message)).await {
                tracing::info!(peer = %session.peer, job = %job, "bgapi result not delivered: the node is gone");
            }
        });
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
}
