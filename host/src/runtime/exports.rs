//! The four export interfaces a plugin may have (and `batch`, which goes
//! with `route`), where each lives in a component (resolved once per
//! version) and in one of its instances.

use wasmtime::component::{Instance, InstancePre};
use wasmtime::AsContextMut;

use super::bindings::{api, batch, route, subscriber, task};
use super::contract::interface;
use super::state::HostState;

/// The four export interfaces a plugin may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Export {
    Route,
    Api,
    Subscriber,
    Task,
}

impl Export {
    pub const ALL: [Export; 4] = [Export::Route, Export::Api, Export::Subscriber, Export::Task];

    pub fn name(self) -> &'static str {
        match self {
            Export::Route => "route",
            Export::Api => "api",
            Export::Subscriber => "subscriber",
            Export::Task => "task",
        }
    }

    pub fn interface(self) -> &'static str {
        match self {
            Export::Route => interface!("route"),
            Export::Api => interface!("api"),
            Export::Subscriber => interface!("subscriber"),
            Export::Task => interface!("task"),
        }
    }
}

/// The optional export that goes with `route`.
pub const BATCH: &str = interface!("batch");

/// An export present under its name but with another shape: a plugin
/// built against an incompatible contract.
#[derive(Debug, thiserror::Error)]
#[error("export `{export}` does not match the contract: {message}")]
pub struct ExportMismatch {
    pub export: &'static str,
    pub message: String,
}

/// Where each export a plugin has lives, resolved once per version.
#[derive(Clone)]
pub(crate) struct ExportIndices {
    route: Option<route::GuestIndices>,
    /// Only beside `route`: a batch export alone serves no route.
    batch: Option<batch::GuestIndices>,
    api: Option<api::GuestIndices>,
    subscriber: Option<subscriber::GuestIndices>,
    task: Option<task::GuestIndices>,
}

impl ExportIndices {
    /// Looks each interface up by name; one present with another shape (a
    /// plugin built against an incompatible contract) is an error.
    pub fn new(pre: &InstancePre<HostState>) -> Result<Self, ExportMismatch> {
        let engine = pre.engine();
        let exported: Vec<String> =
            pre.component().component_type().exports(engine).map(|(name, _)| name.to_string()).collect();
        let has = |e: Export| exported.iter().any(|n| n == e.interface());
        fn lookup<T>(present: bool, e: Export, r: wasmtime::Result<T>) -> Result<Option<T>, ExportMismatch> {
            match (present, r) {
                (false, _) => Ok(None),
                (true, Ok(indices)) => Ok(Some(indices)),
                (true, Err(err)) => Err(ExportMismatch { export: e.interface(), message: format!("{err:#}") }),
            }
        }
        let route = lookup(has(Export::Route), Export::Route, route::GuestIndices::new(pre))?;
        let batch = match (&route, exported.iter().any(|n| n == BATCH)) {
            (Some(_), true) => Some(
                batch::GuestIndices::new(pre)
                    .map_err(|err| ExportMismatch { export: BATCH, message: format!("{err:#}") })?,
            ),
            _ => None,
        };
        Ok(ExportIndices {
            route,
            batch,
            api: lookup(has(Export::Api), Export::Api, api::GuestIndices::new(pre))?,
            subscriber: lookup(has(Export::Subscriber), Export::Subscriber, subscriber::GuestIndices::new(pre))?,
            task: lookup(has(Export::Task), Export::Task, task::GuestIndices::new(pre))?,
        })
    }

    /// Whether the route export comes with `batch`.
    pub fn has_batch(&self) -> bool {
        self.batch.is_some()
    }

    pub fn has(&self, e: Export) -> bool {
        match e {
            Export::Route => self.route.is_some(),
            Export::Api => self.api.is_some(),
            Export::Subscriber => self.subscriber.is_some(),
            Export::Task => self.task.is_some(),
        }
    }

    pub(crate) fn load(&self, mut store: impl AsContextMut, instance: &Instance) -> wasmtime::Result<WorkerExports> {
        Ok(WorkerExports {
            route: self.route.as_ref().map(|i| i.load(store.as_context_mut(), instance)).transpose()?,
            batch: self.batch.as_ref().map(|i| i.load(store.as_context_mut(), instance)).transpose()?,
            api: self.api.as_ref().map(|i| i.load(store.as_context_mut(), instance)).transpose()?,
            subscriber: self.subscriber.as_ref().map(|i| i.load(store.as_context_mut(), instance)).transpose()?,
            task: self.task.as_ref().map(|i| i.load(store.as_context_mut(), instance)).transpose()?,
        })
    }
}

/// The loaded exports of one instance.
pub(crate) struct WorkerExports {
    pub route: Option<route::Guest>,
    pub batch: Option<batch::Guest>,
    pub api: Option<api::Guest>,
    pub subscriber: Option<subscriber::Guest>,
    pub task: Option<task::Guest>,
}
