//! One connection to the engine, from its first line to its last: the
//! setup (`connect`, `setlocal`, `install`, `watch`), then each engine
//! line in turn — a message becomes a route call answered when it ends,
//! in any order; an answer wakes the plugin waiting for it; a watcher
//! notification goes on the bus — and the installs follow the routes as
//! plugins load and unload.
//!
//! Every engine message is answered exactly once, at once when it cannot
//! be handled (no handler, a failure, over `max_in_flight`), never left
//! for the engine's timeout, which would block a Yate thread.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::counters::bump;
use super::link::{Outbox, Pending};
use super::transport::Conn;
use super::wire::{self, Incoming};
use super::Shared;
use crate::bus::Caller;
use crate::config::{YateInstall, YATE_DEFAULT_BUFSIZE};
use crate::dispatcher::{DispatchError, Dispatcher};
use crate::frontend::Context;
use crate::runtime::{Event, MessageInfo, Origin, Request};
use crate::sync::lock;

/// How long a stop waits for the engine's `%%<quit`, then for the
/// answers of messages in flight.
const QUIT_WITHIN: Duration = Duration::from_millis(1000);

/// Why a connection ended.
pub(super) enum Ended {
    /// The daemon stops.
    Shutdown,
    /// The engine closed it (EOF) or said `%%<quit`.
    Closed,
    /// A read failed.
    Failed(std::io::Error),
}

/// A line for the engine; an answer carries its message's in-flight
/// permit, so that answers the engine does not read yet still count
/// against `max_in_flight`.
pub(super) struct Out {
    line: Vec<u8>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Out {
    pub fn line(line: Vec<u8>) -> Out {
        Out { line, _permit: None }
    }
}

/// The queue to the writer task, with the count of what waits in it.
#[derive(Clone)]
pub(super) struct Writer {
    tx: mpsc::UnboundedSender<Out>,
    queued: Arc<AtomicUsize>,
}

impl Writer {
    pub fn send(&self, out: Out) -> Result<(), Out> {
        self.queued.fetch_add(1, Relaxed);
        self.tx.send(out).map_err(|e| {
            self.queued.fetch_sub(1, Relaxed);
            e.0
        })
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Relaxed)
    }
}

/// What a message's task needs, shared by all of one connection's.
struct Lane {
    d: Arc<Dispatcher>,
    shared: Arc<Shared>,
    tx: Writer,
    bufsize: Arc<AtomicUsize>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    /// Not installed: its route has no handler.
    Off,
    Asked,
    On,
    /// The engine said false; not asked again on this connection.
    Refused,
    Removing,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Off => "off",
            State::Asked => "installing",
            State::On => "installed",
            State::Refused => "refused",
            State::Removing => "uninstalling",
        }
    }
}

struct Session<'a> {
    ctx: &'a Context,
    lane: Arc<Lane>,
    pending: Pending,
    installs: HashMap<String, (YateInstall, State)>,
    /// setlocal names and values asked, in order, until answered.
    setlocals: VecDeque<(String, String)>,
}

/// Serves one connection until it ends or the daemon stops.
pub(super) async fn run(conn: Conn, shared: &Arc<Shared>, ctx: &Context) -> Ended {
    let Conn { reader, writer, socket, .. } = conn;
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let mute = Arc::new(AtomicBool::new(false));
    let writer_task = tokio::spawn(write_lines(writer, rx, queued.clone(), mute.clone()));
    let tx = Writer { tx, queued };
    // Until the engine confirms the size asked, lines keep to its default.
    let bufsize = Arc::new(AtomicUsize::new(shared.settings.bufsize.min(YATE_DEFAULT_BUFSIZE)));
    let lane = Arc::new(Lane { d: ctx.dispatcher.clone(), shared: shared.clone(), tx, bufsize });
    let installs = shared.settings.installs.iter().map(|i| (i.message.clone(), (i.clone(), State::Off))).collect();
    let mut session = Session { ctx, lane, pending: Pending::default(), installs, setlocals: VecDeque::new() };
    session.setup(socket);
    *lock(&shared.outbox) = Some(Outbox {
        tx: session.lane.tx.clone(),
        pending: session.pending.clone(),
        bufsize: session.lane.bufsize.clone(),
    });
    let ended = session.read(reader).await;
    *lock(&shared.outbox) = None;
    // Plugins waiting for an answer learn that none will come.
    lock(&session.pending).clear();
    *lock(&shared.installs) = Vec::new();
    if !matches!(ended, Ended::Shutdown) {
        // The engine is gone: what is in flight finishes, but answers
        // nobody reads are not written.
        mute.store(true, Relaxed);
    }
    let max = u32::try_from(shared.settings.max_in_flight).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(QUIT_WITHIN, shared.in_flight.acquire_many(max)).await;
    drop(session);
    if tokio::time::timeout(QUIT_WITHIN, writer_task).await.is_err() {
        tracing::debug!("yate: the writer did not finish; dropping what it holds");
    }
    ended
}

/// Writes what is queued, many lines a write.
async fn write_lines(
    mut w: Box<dyn AsyncWrite + Unpin + Send>,
    mut rx: mpsc::UnboundedReceiver<Out>,
    queued: Arc<AtomicUsize>,
    mute: Arc<AtomicBool>,
) {
    const BATCH: usize = 256 * 1024;
    let mut batch = Vec::with_capacity(64 * 1024);
    let mut held = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.clear();
        batch.extend_from_slice(&first.line);
        held.push(first);
        while batch.len() < BATCH {
            let Ok(out) = rx.try_recv() else { break };
            batch.extend_from_slice(&out.line);
            held.push(out);
        }
        queued.fetch_sub(held.len(), Relaxed);
        if !mute.load(Relaxed) {
            let written = async {
                w.write_all(&batch).await?;
                w.flush().await
            };
            if let Err(e) = written.await {
                tracing::debug!(error = %e, "yate: write failed");
                mute.store(true, Relaxed);
            }
        }
        // Permits go back only now: the engine has the answers.
        held.clear();
    }
}

impl Session<'_> {
    fn send(&self, line: Vec<u8>) {
        let _ = self.lane.tx.send(Out::line(line));
    }

    fn write(&self, what: &str, f: impl FnOnce(&mut Vec<u8>) -> Result<(), wire::WireError>) {
        let mut line = Vec::new();
        match f(&mut line) {
            Ok(()) => self.send(line),
            Err(e) => tracing::error!(error = %e, "yate: cannot send {what}"),
        }
    }

    /// The first lines: who we are, the settings, then what we handle.
    fn setup(&mut self, socket: bool) {
        let settings = &self.lane.shared.settings;
        if let (true, Some(role)) = (socket, &settings.role) {
            self.write("connect", |l| wire::write_connect(l, role));
        }
        let bufsize = settings.bufsize.to_string();
        let asked = std::iter::once(("bufsize".to_string(), bufsize)).chain(settings.setlocal.iter().cloned());
        for (name, value) in asked {
            self.write("setlocal", |l| wire::write_setlocal(l, &name, &value));
            self.setlocals.push_back((name, value));
        }
        for name in &settings.watch {
            self.write("watch", |l| wire::write_watch(l, name));
        }
        self.sync_installs();
    }

    /// Installs what has a route with handlers, uninstalls what lost it.
    fn sync_installs(&mut self) {
        let d = &self.lane.d;
        let mut lines = Vec::new();
        for (install, state) in self.installs.values_mut() {
            let wanted = d.has_route(&install.route);
            let mut line = Vec::new();
            let written = match (*state, wanted) {
                (State::Off, true) => {
                    let filter = install.filter.as_ref().map(|(n, v)| (n.as_str(), v.as_deref()));
                    *state = State::Asked;
                    wire::write_install(&mut line, install.priority.map(i64::from), &install.message, filter)
                }
                (State::Asked | State::On, false) => {
                    *state = State::Removing;
                    wire::write_uninstall(&mut line, &install.message)
                }
                _ => continue,
            };
            match written {
                Ok(()) => lines.push(line),
                Err(e) => tracing::error!(message = %install.message, error = %e, "yate: cannot install"),
            }
        }
        for line in lines {
            self.send(line);
        }
        self.publish_installs();
    }

    fn publish_installs(&self) {
        let mut list: Vec<(String, String, &'static str)> =
            self.installs.values().map(|(i, s)| (i.message.clone(), i.route.clone(), s.name())).collect();
        list.sort();
        *lock(&self.lane.shared.installs) = list;
    }

    async fn read(&mut self, mut reader: Box<dyn AsyncRead + Unpin + Send>) -> Ended {
        let settings = &self.lane.shared.settings;
        let mut lines = wire::LineBuffer::new(settings.max_line_bytes);
        let mut buf = vec![0u8; 64 * 1024];
        let mut routes = self.lane.d.watch_routes();
        let mut routes_open = true;
        let quit_deadline = tokio::time::sleep(Duration::MAX);
        tokio::pin!(quit_deadline);
        let mut quitting = false;
        loop {
            tokio::select! {
                _ = self.ctx.shutdown.cancelled(), if !quitting => {
                    quitting = true;
                    let mut line = Vec::new();
                    wire::write_quit(&mut line);
                    self.send(line);
                    quit_deadline.as_mut().reset(tokio::time::Instant::now() + QUIT_WITHIN);
                }
                _ = &mut quit_deadline, if quitting => return Ended::Shutdown,
                changed = routes.changed(), if routes_open => match changed {
                    Ok(()) => self.sync_installs(),
                    Err(_) => routes_open = false,
                },
                read = reader.read(&mut buf) => match read {
                    Ok(0) => return if quitting { Ended::Shutdown } else { Ended::Closed },
                    Ok(n) => {
                        lines.push(&buf[..n]);
                        while let Some(item) = lines.next_line() {
                            match item {
                                Ok(line) => {
                                    if self.line(line) {
                                        return if quitting { Ended::Shutdown } else { Ended::Closed };
                                    }
                                }
                                Err(wire::WireError::Overlong { len, .. }) => self.overlong(len),
                                Err(_) => self.overlong(0),
                            }
                        }
                    }
                    Err(e) => return if quitting { Ended::Shutdown } else { Ended::Failed(e) },
                },
            }
        }
    }

    fn overlong(&self, len: usize) {
        let shared = &self.lane.shared;
        bump(&shared.counters.overlong);
        if let Some(more) = shared.overlong_report.due() {
            let max = shared.settings.max_line_bytes;
            tracing::warn!(bytes = len, max_line_bytes = max, more, "yate: an engine line over max_line_bytes skipped");
        }
    }

    /// One engine line; true when the engine said `%%<quit`.
    fn line(&mut self, line: &[u8]) -> bool {
        let shared = self.lane.shared.clone();
        let c = &shared.counters;
        match wire::parse(line) {
            Ok(Incoming::Message(m)) => self.message(m),
            Ok(Incoming::Answer(a)) => match lock(&self.pending).remove(&a.id) {
                Some(waiting) => {
                    let _ = waiting.send(a);
                }
                None => {
                    bump(&c.unmatched);
                    tracing::debug!(id = %a.id, "yate: an answer nobody waits for (late?)");
                }
            },
            Ok(Incoming::Watched(a)) => self.watched(a),
            Ok(Incoming::Installed { name, ok, priority }) => {
                if let Some((_, state)) = self.installs.get_mut(&name) {
                    if *state == State::Asked {
                        *state = if ok { State::On } else { State::Refused };
                    }
                }
                if ok {
                    tracing::info!(message = %name, priority, "yate: installed");
                } else {
                    tracing::error!(message = %name, "yate: the engine refused to install it");
                }
                self.publish_installs();
            }
            Ok(Incoming::Uninstalled { name, ok, .. }) => {
                if let Some((_, state)) = self.installs.get_mut(&name) {
                    *state = State::Off;
                }
                tracing::info!(message = %name, ok, "yate: uninstalled");
                // A route may have come back while the uninstall went out.
                self.sync_installs();
            }
            Ok(Incoming::Watching { name, ok }) => {
                if ok {
                    tracing::info!(message = %name, "yate: watching");
                } else {
                    tracing::warn!(message = %name, "yate: the engine refused to watch it");
                }
            }
            Ok(Incoming::Unwatching { name, ok }) => tracing::info!(message = %name, ok, "yate: unwatched"),
            Ok(Incoming::SetLocal { name, value, ok }) => self.setlocal(&name, &value, ok),
            Ok(Incoming::Quit) => return true,
            Ok(Incoming::ErrorIn(text)) => {
                bump(&c.error_in);
                if let Some(more) = shared.error_in_report.due() {
                    tracing::warn!(line = %text, more, "yate: the engine did not understand a line of ours");
                }
            }
            Err(e) => {
                bump(&c.garbage);
                // A message whose id can be read is answered, whatever else
                // is wrong with it: the engine would wait for it otherwise.
                if let Some(id) = message_id(line) {
                    bump(&c.received);
                    self.send(decline(id));
                }
                if let Some(more) = shared.garbage_report.due() {
                    let shown = String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned();
                    tracing::warn!(error = %e, line = %shown, more, "yate: an engine line that does not parse");
                }
            }
        }
        false
    }

    fn setlocal(&mut self, name: &str, value: &str, ok: bool) {
        let asked = self.setlocals.iter().position(|(n, _)| n == name).and_then(|i| self.setlocals.remove(i));
        let asked_value = asked.as_ref().map_or("", |(_, v)| v.as_str());
        if !ok {
            tracing::warn!(name, asked = asked_value, now = value, "yate: the engine refused a setlocal");
            return;
        }
        if asked.is_some() && value != asked_value {
            tracing::warn!(name, asked = asked_value, now = value, "yate: the engine set another value");
        } else {
            tracing::info!(name, value, "yate: setlocal");
        }
        if name == "bufsize" {
            if let Ok(size) = value.parse::<usize>() {
                self.lane.bufsize.store(size.clamp(2048, 65536), Relaxed);
            }
        }
    }

    /// An engine message: run its route in a task of its own, or answer
    /// false at once.
    fn message(&mut self, m: wire::Message) {
        let shared = &self.lane.shared;
        bump(&shared.counters.received);
        let route = match self.installs.get(&m.name) {
            Some((install, State::Asked | State::On)) => install.route.clone(),
            _ => {
                bump(&shared.counters.unhandled);
                return self.send(decline(&m.id));
            }
        };
        let Ok(permit) = shared.in_flight.clone().try_acquire_owned() else {
            bump(&shared.counters.busy);
            if let Some(more) = shared.busy_report.due() {
                let max = shared.settings.max_in_flight;
                tracing::warn!(max_in_flight = max, more, "yate: too many messages in flight; answered false");
            }
            return self.send(decline(&m.id));
        };
        let lane = self.lane.clone();
        tokio::spawn(async move {
            let line = answer(&lane, route, m).await;
            let _ = lane.tx.send(Out { line, _permit: Some(permit) });
        });
    }

    /// A watcher notification, raised on the bus as
    /// `CUSTOM yate::<message>`.
    fn watched(&self, a: wire::Answer) {
        let mut headers = Vec::with_capacity(a.params.len() + 3);
        headers.push(("Yate-Message".to_string(), a.name.clone()));
        headers.push(("Yate-Handled".to_string(), a.handled.to_string()));
        headers.push(("Yate-Retvalue".to_string(), a.retvalue));
        headers.extend(a.params);
        let event = Event { name: "CUSTOM".into(), subclass: Some(format!("yate::{}", a.name)), headers, body: None };
        bump(&self.lane.shared.counters.watched);
        self.ctx.bus().fire(event, &Caller::host("yate"));
    }
}

/// `%%<message:<id>:false:` — the shortest answer, which changes nothing
/// (protocols.md §1.4): the engine goes on to its next handler.
fn decline(id: &[u8]) -> Vec<u8> {
    let mut line = Vec::with_capacity(id.len() + 20);
    line.extend_from_slice(b"%%<message:");
    line.extend_from_slice(id);
    line.extend_from_slice(b":false:\n");
    line
}

/// The id of a `%%>message` line, however broken the rest is.
fn message_id(line: &[u8]) -> Option<&[u8]> {
    let rest = line.strip_prefix(b"%%>message:")?;
    let id = &rest[..rest.iter().position(|&b| b == b':')?];
    (!id.is_empty() && !id.iter().any(|&b| b < 0x20)).then_some(id)
}

/// Runs the message's route and says its outcome as the answer line.
async fn answer(lane: &Lane, route: String, m: wire::Message) -> Vec<u8> {
    let c = &lane.shared.counters;
    let id = String::from_utf8_lossy(&m.id).into_owned();
    let info = MessageInfo { id, time: m.time, name: m.name, retvalue: m.retvalue };
    let request = Request { route, data: Vec::new(), params: m.params, origin: Origin::Yate(info) };
    let Origin::Yate(info) = &request.origin else { return decline(&m.id) };
    match lane.d.run_route(&request).await {
        Ok(outcome) => {
            let r = &outcome.reply;
            // A handler that declines without a return value leaves the
            // message's; `retvalue` always replaces it on the wire.
            let retvalue = if r.handled || !r.retval.is_empty() { &r.retval } else { &info.retvalue };
            let mut line = Vec::with_capacity(64 + retvalue.len());
            let bufsize = lane.bufsize.load(Relaxed);
            match wire::write_answer(&mut line, &m.id, r.handled, "", retvalue, &r.params, &r.unset) {
                Ok(()) if line.len() < bufsize => {
                    bump(if r.handled { &c.handled } else { &c.declined });
                    line
                }
                Ok(()) => {
                    bump(&c.too_long);
                    tracing::warn!(plugin = %outcome.plugin, route = %request.route, message = %info.name,
                        bytes = line.len(), bufsize, "yate: the answer does not fit the engine's buffer; answered false");
                    decline(&m.id)
                }
                Err(e) => {
                    bump(&c.bad_reply);
                    tracing::warn!(plugin = %outcome.plugin, route = %request.route, message = %info.name,
                        error = %e, "yate: the reply cannot be said on Yate's wire; answered false");
                    decline(&m.id)
                }
            }
        }
        Err(DispatchError::RouteNotFound(_)) => {
            bump(&c.unhandled);
            decline(&m.id)
        }
        Err(e) => {
            bump(&c.failed);
            if let Some(more) = lane.shared.failure_report.due() {
                tracing::warn!(route = %request.route, message = %info.name, error = %crate::error::chain(&e), more,
                    "yate: the handler failed; answered false");
            }
            decline(&m.id)
        }
    }
}
