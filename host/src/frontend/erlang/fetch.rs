//! XML fetch bindings: `{bind, Section}` pids, the `fetch` import asking
//! //! them, and their `fetch_reply` answers (the first one wins).

use std::sync::{Arc, Weak};

use eetf::Pid;
use erl_dist::message::Message;

use super::session::{self, Session};
use super::term::{self, as_text, atom, tuple};
use super::{Key, Node, RECENT_FETCHES};
use crate::dispatcher::Fetcher;
use crate::runtime::{FetchQuery, HostError};
use crate::sync::lock;

/// Why a `fetch_reply` answered nothing.
pub(super) enum FetchReplyError {
    /// The fetch was answered already (`duplicate_response`) or gave up
    /// (`timeout`): `{error, FetchID, Why}`.
    Late(&'static str),
    /// Nobody asked: `{error, invalid_uuid}`.
    Unknown,
}

impl Node {
    /// Binds `pid` to `section`; false when the peer holds too many bindings.
    pub(super) fn bind(&self, section: &str, pid: Pid, session: &Arc<Session>) -> bool {
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
    pub(super) fn fetch_reply(&self, id: &str, xml: String) -> Result<(), FetchReplyError> {
        if self.resolve(&Key::Uuid(id.to_string()), term::string(&xml)) {
            self.remember_fetch(id, "duplicate_response");
            return Ok(());
        }
        match lock(&self.recent_fetches).iter().find(|(f, _)| f == id) {
            Some((_, why)) => Err(FetchReplyError::Late(why)),
            None => Err(FetchReplyError::Unknown),
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
}

pub(super) struct Binding {
    pub section: String,
    pub pid: Pid,
    pub session: Weak<Session>,
}

#[async_trait::async_trait]
impl Fetcher for Node {
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
