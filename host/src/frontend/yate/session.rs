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
//!
//! The route calls run inside the session's task, as a set of futures it
//! polls between reads, not as tasks of their own: the answers to one read
//! go out in one write, as a native module's do, and no call costs a task
//! hand-over. A call that waits (a `commands.call`, a `messages.dispatch`
//! whose answer this very session reads) or runs long (it yields at each
//! epoch tick) never stops the reading.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::answer::{answer, decline, message_id};
use super::counters::bump;
use super::link::{Outbox, Pending};
use super::transport::Conn;
use super::wire::{self, Incoming};
use super::Shared;
use crate::bus::Caller;
use crate::config::{YateInstall, YATE_DEFAULT_BUFSIZE};
use crate::dispatcher::Dispatcher;
use crate::frontend::Context;
use crate::runtime::Event;
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

/// Lines for the engine; answers carry their messages' in-flight
/// permits, so that answers the engine does not read yet still count
/// against `max_in_flight`.
#[derive(Default)]
pub(super) struct Out {
    lines: Vec<u8>,
    permits: Vec<OwnedSemaphorePermit>,
}

impl Out {
    pub fn line(line: Vec<u8>) -> Out {
        Out { lines: line, permits: Vec::new() }
    }
}

/// A route call in flight: its answer line and its permit.
type Call = Pin<Box<dyn Future<Output = (Vec<u8>, OwnedSemaphorePermit)> + Send>>;

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
pub(super) struct Lane {
    pub d: Arc<Dispatcher>,
    pub shared: Arc<Shared>,
    pub bufsize: Arc<AtomicUsize>,
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
    calls: FuturesUnordered<Call>,
    /// What goes out next, in one write.
    out: Out,
    /// The engine's side; None while a write holds it.
    writer: Option<Box<dyn AsyncWrite + Unpin + Send>>,
    writing: Option<Writing>,
    /// Nothing more is written (the engine is gone, or a write failed).
    mute: bool,
    /// Lines of plugins' dispatches, from other tasks.
    queue: mpsc::UnboundedReceiver<Out>,
    queued: Arc<AtomicUsize>,
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
    let tx = Writer { tx, queued: queued.clone() };
    // Until the engine confirms the size asked, lines keep to its default.
    let bufsize = Arc::new(AtomicUsize::new(shared.settings.bufsize.min(YATE_DEFAULT_BUFSIZE)));
    let lane = Arc::new(Lane { d: ctx.dispatcher.clone(), shared: shared.clone(), bufsize });
    let installs = shared.settings.installs.iter().map(|i| (i.message.clone(), (i.clone(), State::Off))).collect();
    let mut session = Session {
        ctx,
        lane,
        calls: FuturesUnordered::new(),
        out: Out::default(),
        writer: Some(writer),
        writing: None,
        mute: false,
        queue: rx,
        queued,
        pending: Pending::default(),
        installs,
        setlocals: VecDeque::new(),
    };
    session.setup(socket);
    *lock(&shared.outbox) =
        Some(Outbox { tx, pending: session.pending.clone(), bufsize: session.lane.bufsize.clone() });
    let ended = session.read(reader).await;
    *lock(&shared.outbox) = None;
    // Plugins waiting for an answer learn that none will come.
    lock(&session.pending).clear();
    *lock(&shared.installs) = Vec::new();
    // The engine gone, answers nobody reads are not written.
    session.mute |= !matches!(ended, Ended::Shutdown);
    // What is in flight finishes (its side effects are the plugins'), and
    // the last answers go out.
    let finish = async {
        while let Some((line, permit)) = session.calls.next().await {
            session.out.lines.extend_from_slice(&line);
            session.out.permits.push(permit);
        }
        session.drain().await;
    };
    if tokio::time::timeout(QUIT_WITHIN, finish).await.is_err() {
        tracing::warn!(calls = session.calls.len(), "yate: calls still running when the connection ended; dropped");
    }
    ended
}

/// A write in progress; it gives the writer back when done.
type Writing = Pin<Box<dyn Future<Output = (Box<dyn AsyncWrite + Unpin + Send>, std::io::Result<()>)> + Send>>;

/// Past this much waiting to be written (the engine reads slowly), the
/// session stops reading until it is.
const MAX_UNWRITTEN: usize = 4 << 20;

impl Session<'_> {
    /// Adds a line to this turn's write.
    fn send(&mut self, line: Vec<u8>) {
        self.out.lines.extend_from_slice(&line);
    }

    /// Starts writing what is waiting, in one piece, unless a write is
    /// under way (what waits then goes out when it is done).
    fn flush(&mut self) {
        if self.writing.is_some() || self.out.lines.is_empty() {
            return;
        }
        let out = std::mem::take(&mut self.out);
        if self.mute {
            return;
        }
        let Some(mut w) = self.writer.take() else { return };
        self.writing = Some(Box::pin(async move {
            let result = async {
                w.write_all(&out.lines).await?;
                w.flush().await
            }
            .await;
            // The permits go back only now: the engine has the answers.
            drop(out);
            (w, result)
        }));
    }

    fn written(&mut self, w: Box<dyn AsyncWrite + Unpin + Send>, result: std::io::Result<()>) {
        self.writing = None;
        self.writer = Some(w);
        if let Err(e) = result {
            tracing::debug!(error = %e, "yate: write failed");
            self.mute = true;
        }
    }

    /// Writes everything still waiting.
    async fn drain(&mut self) {
        while let Ok(out) = self.queue.try_recv() {
            self.queued.fetch_sub(1, Relaxed);
            self.out.lines.extend_from_slice(&out.lines);
        }
        loop {
            self.flush();
            let Some(writing) = self.writing.as_mut() else { return };
            let (w, result) = writing.await;
            self.written(w, result);
        }
    }

    /// Takes the answers of every call that is done, without waiting.
    async fn collect_done(&mut self) {
        let (calls, out) = (&mut self.calls, &mut self.out);
        std::future::poll_fn(|cx| {
            while let Poll::Ready(Some((line, permit))) = calls.poll_next_unpin(cx) {
                out.lines.extend_from_slice(&line);
                out.permits.push(permit);
            }
            Poll::Ready(())
        })
        .await;
    }

    fn write(&mut self, what: &str, f: impl FnOnce(&mut Vec<u8>) -> Result<(), wire::WireError>) {
        let mut line = Vec::new();
        match f(&mut line) {
            Ok(()) => self.send(line),
            Err(e) => tracing::error!(error = %e, "yate: cannot send {what}"),
        }
    }

    /// The first lines: who we are, the settings, then what we handle.
    fn setup(&mut self, socket: bool) {
        let shared = self.lane.shared.clone();
        let settings = &shared.settings;
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
        let shared = self.lane.shared.clone();
        let mut lines = wire::LineBuffer::new(shared.settings.max_line_bytes);
        let mut buf = vec![0u8; 64 * 1024];
        let mut routes = self.lane.d.watch_routes();
        let mut routes_open = true;
        let quit_deadline = tokio::time::sleep(Duration::MAX);
        tokio::pin!(quit_deadline);
        let mut quitting = false;
        loop {
            self.flush();
            let reading = self.out.lines.len() < MAX_UNWRITTEN;
            tokio::select! {
                (w, result) = async {
                    match self.writing.as_mut() {
                        Some(writing) => writing.await,
                        None => std::future::pending().await,
                    }
                }, if self.writing.is_some() => {
                    self.written(w, result);
                }
                Some(out) = self.queue.recv() => {
                    self.queued.fetch_sub(1, Relaxed);
                    self.out.lines.extend_from_slice(&out.lines);
                }
                Some((line, permit)) = self.calls.next(), if !self.calls.is_empty() => {
                    self.out.lines.extend_from_slice(&line);
                    self.out.permits.push(permit);
                    self.collect_done().await;
                }
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
                read = reader.read(&mut buf), if reading => match read {
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
                        // Calls that finish at once answer in this read's write.
                        self.collect_done().await;
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
        self.calls.push(Box::pin(async move { (answer(&lane, route, m).await, permit) }));
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
        self.ctx.bus().fire(event, Caller::host("yate"));
    }
}
