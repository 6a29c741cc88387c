//! A plugin version: one compiled component, what it exports, its pool,
//! and the calls of its exports. Every call takes the same way: a lease on
//! an instance from the pool, the guest call, and the lease's `finish`
//! (which classifies a failure and returns or drops the instance), written
//! once in `call_export!`; each export's method says only how to call the
//! guest.

use std::sync::Arc;
use std::time::SystemTime;

use super::bindings::{CommandInfo, Event, Packed, Reply, Request};
use super::cache::CacheOutcome;
use super::error::{CallError, Cause};
use super::exports::{Export, ExportIndices};
use super::pool::{CallReport, Failure, Pool};
use super::spec::PluginSpec;
use super::stats::Stats;

/// One call of an export, the way every call goes: a lease on an instance
/// (waiting at most the deadline), the guest call `$invoke` (a body given
/// the store and the instance's exports, using `?` on `Failure`), then the
/// lease's `finish`. A macro, not a function taking a closure: the body
/// borrows the store across an await, and each call stays monomorphic.
macro_rules! call_export {
    ($self:ident, $what:literal, $target:expr, $depth:expr, $task:expr, |$store:ident, $exports:ident| $invoke:block) => {
        call_export!($self, $what, $target, $depth, $task, 1, |$store, $exports| $invoke)
    };
    // A call carrying `$requests` requests (a batch: see `Lease::batch_of`).
    ($self:ident, $what:literal, $target:expr, $depth:expr, $task:expr, $requests:expr, |$store:ident, $exports:ident| $invoke:block) => {{
        let target: &str = $target;
        let requests: usize = $requests;
        match $self.pool.acquire(target, $depth, $task).await {
            Err(cause) => {
                // Refused before it ran (busy, or no instance could be
                // made): not a call, but an error of the plugin's.
                $self.stats.errors_of(&cause, requests as u64);
                (Err($self.error($what, target, cause)), CallReport::default())
            }
            Ok(mut lease) => {
                let batched = if requests == 1 { Ok(()) } else { lease.batch_of(requests) };
                let outcome = match (batched, lease.parts()) {
                    (Err(cause), _) => Err(Failure::Wasm(wasmtime::format_err!("{cause}"))),
                    (Ok(()), Some(($store, $exports))) => async { $invoke }.await,
                    (Ok(()), None) => Err(Failure::Wasm(wasmtime::format_err!("a lease without an instance"))),
                };
                let (result, report) = lease.finish(outcome);
                let failed = |(cause, backtrace)| CallError { backtrace, ..$self.error($what, target, cause) };
                (result.map_err(failed), report)
            }
        }
    }};
}

/// One loaded version of a plugin. Calls in flight hold an `Arc` to the
/// version they started on, so a reload never cuts them short.
pub struct PluginVersion {
    pub spec: Arc<PluginSpec>,
    /// BLAKE3 of the wasm bytes, hex.
    pub hash: String,
    pub cache: CacheOutcome,
    pub loaded_at: SystemTime,
    exports: Vec<Export>,
    commands: Vec<CommandInfo>,
    pub(crate) pool: Pool,
    pub stats: Arc<Stats>,
}

/// A call's result and what it cost.
pub type Outcome<T> = (Result<T, CallError>, CallReport);

impl PluginVersion {
    pub(crate) fn new(
        spec: Arc<PluginSpec>,
        hash: String,
        cache: CacheOutcome,
        indices: &ExportIndices,
        pool: Pool,
        stats: Arc<Stats>,
    ) -> Self {
        let exports = Export::ALL.into_iter().filter(|e| indices.has(*e)).collect();
        PluginVersion { spec, hash, cache, loaded_at: SystemTime::now(), exports, commands: Vec::new(), pool, stats }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The first 16 hex digits of the hash, to name a version in logs.
    pub fn short_hash(&self) -> &str {
        self.hash.get(..16).unwrap_or(&self.hash)
    }

    pub fn exports(&self) -> &[Export] {
        &self.exports
    }

    pub fn has_export(&self, e: Export) -> bool {
        self.exports.contains(&e)
    }

    /// The commands the plugin offered when it loaded.
    pub fn commands(&self) -> &[CommandInfo] {
        &self.commands
    }

    pub fn idle_instances(&self) -> usize {
        self.pool.idle_count()
    }

    /// Drops instances idle longer than `idle_after`, down to the minimum.
    pub fn shrink_idle(&self) {
        self.pool.shrink_idle();
    }

    fn error(&self, what: &'static str, target: &str, cause: Cause) -> CallError {
        CallError { plugin: self.spec.name.clone(), what, target: target.to_string(), cause, backtrace: None }
    }

    /// Holds a reply until the kv writes its call made (or read) are
    /// durable; the instance is back in the pool meanwhile. A write that
    /// cannot be saved turns the reply into an error, so no caller is told
    /// of a write a crash would lose.
    pub async fn acknowledge<T>(&self, what: &'static str, target: &str, (result, report): Outcome<T>) -> Outcome<T> {
        if report.kv_ticket == crate::kv::Ticket::NONE {
            return (result, report);
        }
        match self.pool.kv().durable(report.kv_ticket).await {
            Ok(()) => (result, report),
            Err(e) => {
                let cause = Cause::Storage { reason: e.to_string() };
                self.stats.error(&cause);
                tracing::warn!(plugin = %self.spec.name, route = %target, "reply withheld: {cause}");
                (Err(self.error(what, target, cause)), report)
            }
        }
    }

    /// Runs `call` (of `target`) on the slow lane, for a target that ran
    /// long lately (`lanes`); a lane that stopped under it fails the call.
    /// Callers box it: the common path's future stays as small as before.
    async fn on_slow_lane<T: Send + 'static>(
        &self,
        what: &'static str,
        target: &str,
        call: impl std::future::Future<Output = Outcome<T>> + Send + 'static,
    ) -> Outcome<T> {
        self.stats.slow_lane();
        match super::lanes::run_on(self.pool.slow_lane(), call).await {
            Some(outcome) => outcome,
            None => {
                let message =
                    "the call ended on the slow lane without an answer (the daemon is stopping, or a host panic)";
                let cause = Cause::Host { message: message.into() };
                (Err(self.error(what, target, cause)), CallReport::default())
            }
        }
    }

    /// Calls the route handler. `depth` counts nested command calls. The
    /// reply is not yet acknowledged: its caller waits for
    /// `acknowledge` before the reply leaves (the dispatcher does).
    pub async fn handle(self: &Arc<Self>, request: &Request, depth: u32) -> Outcome<Reply> {
        if self.pool.runs_long(&request.route) {
            let (me, owned) = (self.clone(), request.clone());
            let call = async move { me.handle_here(&owned, depth).await };
            return Box::pin(self.on_slow_lane("route", &request.route, call)).await;
        }
        self.handle_here(request, depth).await
    }

    async fn handle_here(&self, request: &Request, depth: u32) -> Outcome<Reply> {
        let (result, report) = call_export!(self, "route", &request.route, depth, false, |store, exports| {
            let g = exports.route.as_ref().ok_or_else(|| missing(Export::Route))?;
            guest(g.call_handle(store, request).await)
        });
        (result.and_then(|reply| self.within_cap(&request.route, reply)), report)
    }

    /// Whether calls of `route` may go in batches now: the plugin exports
    /// `batch` and the route's calls were short lately (a batch has one
    /// call's deadline, and a slow route's belong on the slow lane).
    pub fn batches(&self, route: &str) -> bool {
        self.pool.has_batch() && !self.pool.runs_long(route)
    }

    /// Calls the batch export with `requests`, all of the route `route`
    /// (check `batches` first): one result per request, in order. The
    /// replies are not yet acknowledged, as `handle`'s.
    pub async fn handle_batch(&self, route: &str, requests: &[Request]) -> Outcome<Vec<Result<Reply, CallError>>> {
        let (result, report) = call_export!(self, "route", route, 0, false, requests.len(), |store, exports| {
            let g = exports.batch.as_ref().ok_or_else(|| missing_interface(super::exports::BATCH))?;
            let results = g.call_handle_batch(store, requests).await.map_err(Failure::Wasm)?;
            one_each("handle-batch", results, requests.len())
        });
        (result.map(|results| self.replies(route, results)), report)
    }

    /// Whether a UDP read of `route` may go packed in one call now: as
    /// `batches`, with the `datagrams` export.
    pub fn takes_datagrams(&self, route: &str) -> bool {
        self.pool.has_datagrams() && !self.pool.runs_long(route)
    }

    /// Calls the datagrams export with a read's datagrams (check
    /// `takes_datagrams` first): one result per datagram, in order, not
    /// yet acknowledged, as `handle_batch`'s.
    pub async fn handle_datagrams(&self, packed: &Packed) -> Outcome<Vec<Result<Reply, CallError>>> {
        let (route, n) = (packed.route.as_str(), packed.ends.len());
        let (result, report) = call_export!(self, "route", route, 0, false, n, |store, exports| {
            let g = exports.datagrams.as_ref().ok_or_else(|| missing_interface(super::exports::DATAGRAMS))?;
            let results = g.call_handle_datagrams(store, packed).await.map_err(Failure::Wasm)?;
            one_each("handle-datagrams", results, n)
        });
        (result.map(|results| self.replies(route, results)), report)
    }

    /// A batch's results as replies within the size cap, or errors.
    fn replies(&self, route: &str, results: Vec<Result<Reply, String>>) -> Vec<Result<Reply, CallError>> {
        let reply = |r: Result<Reply, String>| match r {
            Ok(reply) => self.within_cap(route, reply),
            Err(message) => {
                let cause = Cause::Guest { message };
                self.stats.error(&cause);
                Err(self.error("route", route, cause))
            }
        };
        results.into_iter().map(reply).collect()
    }

    /// The reply, or an error when it is over the plugin's size cap.
    fn within_cap(&self, route: &str, reply: Reply) -> Result<Reply, CallError> {
        let size = reply.retval.len()
            + reply.params.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
            + reply.data.as_ref().map_or(0, Vec::len);
        let cap = self.spec.limits.max_reply_bytes;
        if size > cap {
            let cause = Cause::ReplyTooLarge { size, cap };
            self.stats.error(&cause);
            return Err(self.error("route", route, cause));
        }
        Ok(reply)
    }

    /// Runs one of the plugin's API commands.
    pub async fn execute(self: &Arc<Self>, command: &str, args: &str, depth: u32) -> Outcome<String> {
        let outcome = if self.pool.runs_long(command) {
            let (me, c, a) = (self.clone(), command.to_string(), args.to_string());
            let call = async move { me.execute_here(&c, &a, depth).await };
            Box::pin(self.on_slow_lane("command", command, call)).await
        } else {
            self.execute_here(command, args, depth).await
        };
        self.acknowledge("command", command, outcome).await
    }

    async fn execute_here(&self, command: &str, args: &str, depth: u32) -> Outcome<String> {
        call_export!(self, "command", command, depth, false, |store, exports| {
            let g = exports.api.as_ref().ok_or_else(|| missing(Export::Api))?;
            guest(g.call_execute(store, command, args).await)
        })
    }

    /// Delivers an event to the subscriber export.
    pub async fn on_event(self: &Arc<Self>, event: &Event) -> Outcome<()> {
        if self.pool.runs_long(&event.name) {
            let (me, owned) = (self.clone(), event.clone());
            let call = async move { me.on_event_here(&owned).await };
            return Box::pin(self.on_slow_lane("event", &event.name, call)).await;
        }
        self.on_event_here(event).await
    }

    async fn on_event_here(&self, event: &Event) -> Outcome<()> {
        call_export!(self, "event", &event.name, 0, false, |store, exports| {
            let g = exports.subscriber.as_ref().ok_or_else(|| missing(Export::Subscriber))?;
            g.call_on_event(store, event).await.map_err(Failure::Wasm)
        })
    }

    /// Whether `events` may go in one call of `subscriber-batch`: the
    /// plugin exports it and none of them is of a name whose deliveries
    /// ran long lately (a batch has one call's deadline).
    pub fn takes_events(&self, events: &[&Event]) -> bool {
        self.pool.has_subscriber_batch() && !events.iter().any(|e| self.pool.runs_long(&e.name))
    }

    /// Delivers `events` in one call of `subscriber-batch` (check
    /// `takes_events` first); the call is named after the first event.
    pub async fn on_events(&self, events: &[&Event]) -> Outcome<()> {
        let name = events.first().map_or("", |e| e.name.as_str());
        call_export!(self, "event", name, 0, false, events.len(), |store, exports| {
            let f =
                exports.subscriber_batch.as_ref().ok_or_else(|| missing_interface(super::exports::SUBSCRIBER_BATCH))?;
            // A `&Event` lowers as the event: no copy of the bus's.
            let f = f.typed::<(&[&Event],), ()>(&*store).map_err(Failure::Wasm)?;
            f.call_async(store, (events,)).await.map_err(Failure::Wasm)
        })
    }

    /// Runs the task export for one exec worker.
    pub async fn run_task(&self, name: &str, worker: &str) -> Outcome<()> {
        call_export!(self, "task", name, 0, true, |store, exports| {
            let g = exports.task.as_ref().ok_or_else(|| missing(Export::Task))?;
            guest(g.call_run(store, worker).await)
        })
    }

    /// Asks the api export for its commands; called once, at load.
    pub(crate) async fn read_commands(&mut self) -> Result<(), Cause> {
        if !self.has_export(Export::Api) {
            return Ok(());
        }
        let (result, _): Outcome<Vec<CommandInfo>> =
            call_export!(self, "command", "(commands)", 0, false, |store, exports| {
                let g = exports.api.as_ref().ok_or_else(|| missing(Export::Api))?;
                g.call_commands(store).await.map_err(Failure::Wasm)
            });
        self.commands = result.map_err(|e| e.cause)?;
        Ok(())
    }
}

fn missing(e: Export) -> Failure {
    missing_interface(e.interface())
}

/// A batch call's results, when there is one per request.
fn one_each<T>(export: &str, results: Vec<T>, requests: usize) -> Result<Vec<T>, Failure> {
    if results.len() != requests {
        let got = results.len();
        return Err(Failure::Guest(format!("{export} returned {got} results for {requests} requests")));
    }
    Ok(results)
}

fn missing_interface(interface: &str) -> Failure {
    Failure::Wasm(wasmtime::format_err!("the plugin does not export `{interface}`"))
}

/// A guest function's `result<T, string>`: its error is the handler's own.
fn guest<T>(r: wasmtime::Result<Result<T, String>>) -> Result<T, Failure> {
    match r {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(message)) => Err(Failure::Guest(message)),
        Err(e) => Err(Failure::Wasm(e)),
    }
}
