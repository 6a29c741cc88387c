//! Running a route: its handlers in priority order until one replies
//! `handled`. A handler is a plugin or a remote target; both take the same
//! path.

use std::sync::Arc;
use std::time::Instant;

use super::table::Target;
use super::{DispatchError, Dispatcher, RouteOutcome, Slot};
use crate::bus::Profiler;
use crate::runtime::{CallError, CallReport, Origin, Outcome, Packed, PluginVersion, Reply, Request};

/// A route handler that is not a plugin: a process behind a front-end. The
/// front-end that owns it registers it (`Dispatcher::add_remote_route`);
/// to the dispatcher it is opaque.
#[async_trait::async_trait]
pub trait RemoteHandler: Send + Sync + 'static {
    /// How `route.list`, outcomes and logs name it, e.g. `scheme:target`.
    fn name(&self) -> &str;
    async fn handle(&self, request: &Request) -> Result<Reply, RemoteError>;
}

/// Why a remote target gave no reply, in its front-end's words.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RemoteError(pub String);

impl Dispatcher {
    /// `run_route_unsaved`, then waits until the call's kv writes are
    /// durable: the outcome may be sent to its caller at once.
    pub async fn run_route(&self, request: &Request) -> Result<RouteOutcome, DispatchError> {
        self.run_route_unsaved(request).await?.saved(&request.route).await
    }

    /// Runs the route `request.route`: its handlers in priority order until
    /// one replies `handled`. A handler that fails is logged and the next
    /// one runs; the error is returned only when no handler replied at all.
    ///
    /// The reply is not acknowledged yet: a front-end that sends it must
    /// first await `RouteOutcome::saved` (while it serves other requests),
    /// one that sends nothing need not wait.
    pub async fn run_route_unsaved(&self, request: &Request) -> Result<RouteOutcome, DispatchError> {
        let route = request.route.as_str();
        let handlers: Vec<Target> = {
            // A guard, not an Arc: no shared count to bounce between cores.
            let table = self.table.load();
            let Some(handlers) = table.routes.get(route) else {
                return Err(DispatchError::RouteNotFound(route.to_string()));
            };
            if let [only] = handlers.as_slice() {
                // The common case, one plugin, without the general path's layer.
                let target = only.target.clone();
                drop(table);
                return match &target {
                    Target::Plugin(slot) => self.run_plugin(slot, request).await,
                    remote => self.run_target(remote, request).await,
                };
            }
            handlers.iter().map(|h| h.target.clone()).collect()
        };
        let mut declined: Option<RouteOutcome> = None;
        let mut failed: Option<DispatchError> = None;
        // Every handler's kv writes must be durable before the reply goes:
        // one journal numbers them all, so the last number covers them.
        let mut ticket = crate::kv::Ticket::NONE;
        for target in &handlers {
            match self.run_target(target, request).await {
                Ok(mut outcome) if outcome.reply.handled => {
                    outcome.report.kv_ticket = outcome.report.kv_ticket.max(ticket);
                    return Ok(outcome);
                }
                Ok(outcome) => {
                    ticket = ticket.max(outcome.report.kv_ticket);
                    declined = Some(outcome);
                }
                Err(e) => {
                    tracing::warn!(route, handler = %target.name(), error = %e, "route handler failed; trying the next");
                    failed = Some(e);
                }
            }
        }
        match (declined, failed) {
            (Some(mut outcome), _) => {
                outcome.report.kv_ticket = ticket;
                Ok(outcome)
            }
            (None, Some(e)) => Err(e),
            (None, None) => Err(DispatchError::RouteNotFound(route.to_string())),
        }
    }

    /// Runs the route `route` once for each of `requests` (all of that
    /// route), in order, and gives one result per request. In one call of
    /// the plugin's batch export when the route has a single handler, a
    /// plugin exporting `batch` whose calls were short lately and that is
    /// not being profiled; otherwise request by request, as
    /// `run_route_unsaved` would. The outcomes of one call share its
    /// report (the batch's time and fuel, and the kv ticket to wait for).
    pub async fn run_batch_unsaved(
        &self,
        route: &str,
        requests: &[Request],
    ) -> Vec<Result<RouteOutcome, DispatchError>> {
        let handler = match requests {
            [_, _, ..] => self.batch_handler(route),
            _ => None,
        };
        let Some((slot, version)) = handler else {
            let mut results = Vec::with_capacity(requests.len());
            for request in requests {
                results.push(self.run_route_unsaved(request).await);
            }
            return results;
        };
        outcomes(version.handle_batch(route, requests).await, &slot, &version, requests.len())
    }

    /// Runs `packed.route` once for each of the datagrams in `packed`, in
    /// one call of the plugin's `datagrams` export when `takes_datagrams`;
    /// otherwise (a reload since the caller asked) as `run_batch_unsaved`
    /// of requests made of them. Results as `run_batch_unsaved`'s.
    pub async fn run_datagrams_unsaved(&self, packed: &Packed) -> Vec<Result<RouteOutcome, DispatchError>> {
        let route = packed.route.as_str();
        if let Some((slot, version)) = self.batch_handler(route).filter(|(_, v)| v.takes_datagrams(route)) {
            return outcomes(version.handle_datagrams(packed).await, &slot, &version, packed.ends.len());
        }
        self.run_batch_unsaved(route, &unpack(packed)).await
    }

    /// Whether `run_datagrams_unsaved` would make its call for `route` now.
    pub fn takes_datagrams(&self, route: &str) -> bool {
        self.batch_handler(route).is_some_and(|(_, v)| v.takes_datagrams(route))
    }

    /// Whether `run_batch_unsaved` would make one call of a batch for
    /// `route` now.
    pub fn takes_batches(&self, route: &str) -> bool {
        self.batch_handler(route).is_some()
    }

    /// The route's only handler and its current version, when it is a
    /// plugin that takes batches now.
    fn batch_handler(&self, route: &str) -> Option<(Arc<Slot>, Arc<PluginVersion>)> {
        let table = self.table.load();
        let [only] = table.routes.get(route)?.as_slice() else { return None };
        let Target::Plugin(slot) = &only.target else { return None };
        let version = slot.current();
        let profiled = version.spec.profiling && self.bus.wanted("E_PROFILING_SCRIPT");
        (version.batches(route) && !profiled).then(|| (slot.clone(), version))
    }

    async fn run_target(&self, target: &Target, request: &Request) -> Result<RouteOutcome, DispatchError> {
        match target {
            Target::Plugin(slot) => self.run_plugin(slot, request).await,
            Target::Remote(handler) => {
                let started = Instant::now();
                let reply = handler.handle(request).await.inspect_err(|e| {
                    tracing::warn!(route = %request.route, handler = %handler.name(), error = %e, "remote route failed");
                })?;
                let report = CallReport { elapsed: started.elapsed(), ..CallReport::default() };
                Ok(RouteOutcome { reply, plugin: handler.name().into(), report, version: None })
            }
        }
    }

    /// A plugin's reply, handled or not, with E_PROFILING_SCRIPT records
    /// when the plugin asks for them and somebody listens.
    async fn run_plugin(&self, slot: &Arc<Slot>, request: &Request) -> Result<RouteOutcome, DispatchError> {
        let version = slot.current();
        let (result, report) = if version.spec.profiling && self.bus.wanted("E_PROFILING_SCRIPT") {
            let mut profiler = Profiler::start(&self.bus, "E_PROFILING_SCRIPT", &request.route);
            profiler.enter(&request.route, &slot.name, 0);
            let outcome = version.handle(request, 0).await;
            let status = match &outcome.0 {
                Ok(reply) if reply.handled => 1,
                Ok(_) => 0,
                Err(_) => -1,
            };
            profiler.exit(&request.route, &slot.name, 0, status);
            profiler.end(&request.route, status);
            outcome
        } else {
            version.handle(request, 0).await
        };
        match result {
            Ok(reply) => Ok(RouteOutcome { reply, plugin: slot.name.clone(), report, version: Some(version) }),
            Err(e) => Err(DispatchError::Call(Box::new(e))),
        }
    }
}

/// The outcomes of one call for `n` requests: each reply with the call's
/// report, or the call's failure for each.
fn outcomes(
    (result, report): Outcome<Vec<Result<Reply, CallError>>>,
    slot: &Arc<Slot>,
    version: &Arc<PluginVersion>,
    n: usize,
) -> Vec<Result<RouteOutcome, DispatchError>> {
    let outcome = |reply| RouteOutcome { reply, plugin: slot.name.clone(), report, version: Some(version.clone()) };
    match result {
        Ok(replies) => {
            replies.into_iter().map(|r| r.map(outcome).map_err(|e| DispatchError::Call(Box::new(e)))).collect()
        }
        Err(e) => (0..n).map(|_| Err(DispatchError::Call(Box::new(e.clone())))).collect(),
    }
}

/// The requests a packed read stands for, one per datagram.
fn unpack(packed: &Packed) -> Vec<Request> {
    let mut start = 0;
    let sources = packed.sources.iter().chain(std::iter::repeat(&u16::MAX));
    let each = packed.ends.iter().zip(sources).map(|(&end, &source)| {
        let end = usize::try_from(end).unwrap_or(usize::MAX);
        let data = packed.data.get(start..end).unwrap_or_default().to_vec();
        start = end;
        let origin = packed.peers.get(usize::from(source)).cloned().map_or(Origin::Cli, Origin::Udp);
        Request { route: packed.route.clone(), data, params: Vec::new(), origin }
    });
    each.collect()
}
