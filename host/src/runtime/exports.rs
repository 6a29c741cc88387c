//! The four export interfaces a plugin may have (and `batch` and
//! `datagrams`, which go with `route`, and `subscriber-batch`, with
//! `subscriber`), where each
//! lives in a component (resolved once per version) and in one of its
//! instances.

use wasmtime::component::{ComponentExportIndex, Func, Instance, InstancePre};
use wasmtime::AsContextMut;

use super::bindings::{api, batch, datagrams, route, subscriber, subscriber_batch, task};
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
/// The optional export that goes with `route`, for UDP reads.
pub const DATAGRAMS: &str = interface!("datagrams");
/// The optional export that goes with `subscriber`.
pub const SUBSCRIBER_BATCH: &str = interface!("subscriber-batch");

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
    /// Only beside `route`, as `batch`.
    datagrams: Option<datagrams::GuestIndices>,
    api: Option<api::GuestIndices>,
    subscriber: Option<subscriber::GuestIndices>,
    /// Only beside `subscriber`: where its `on-events` is.
    subscriber_batch: Option<ComponentExportIndex>,
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
        // An optional export beside `main`, which it serves.
        fn beside<M, T>(
            main: &Option<M>,
            present: bool,
            export: &'static str,
            r: impl FnOnce() -> wasmtime::Result<T>,
        ) -> Result<Option<T>, ExportMismatch> {
            match (main, present) {
                (Some(_), true) => r().map(Some).map_err(|err| ExportMismatch { export, message: format!("{err:#}") }),
                _ => Ok(None),
            }
        }
        let exports = |name: &str| exported.iter().any(|n| n == name);
        let batch = beside(&route, exports(BATCH), BATCH, || batch::GuestIndices::new(pre))?;
        let datagrams = beside(&route, exports(DATAGRAMS), DATAGRAMS, || datagrams::GuestIndices::new(pre))?;
        let subscriber = lookup(has(Export::Subscriber), Export::Subscriber, subscriber::GuestIndices::new(pre))?;
        // Checked against the contract by the generated bindings, then
        // called through its own index: the generated call takes the
        // events by value, and the bus holds them shared.
        let subscriber_batch = beside(&subscriber, exports(SUBSCRIBER_BATCH), SUBSCRIBER_BATCH, || {
            subscriber_batch::GuestIndices::new(pre)?;
            let component = pre.component();
            let interface = component.get_export_index(None, SUBSCRIBER_BATCH);
            interface
                .and_then(|i| component.get_export_index(Some(&i), "on-events"))
                .ok_or_else(|| wasmtime::format_err!("no function `on-events`"))
        })?;
        Ok(ExportIndices {
            route,
            batch,
            datagrams,
            api: lookup(has(Export::Api), Export::Api, api::GuestIndices::new(pre))?,
            subscriber,
            subscriber_batch,
            task: lookup(has(Export::Task), Export::Task, task::GuestIndices::new(pre))?,
        })
    }

    /// Whether the route export comes with `batch`.
    pub fn has_batch(&self) -> bool {
        self.batch.is_some()
    }

    /// Whether the route export comes with `datagrams`.
    pub fn has_datagrams(&self) -> bool {
        self.datagrams.is_some()
    }

    /// Whether the subscriber export comes with `subscriber-batch`.
    pub fn has_subscriber_batch(&self) -> bool {
        self.subscriber_batch.is_some()
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
            datagrams: self.datagrams.as_ref().map(|i| i.load(store.as_context_mut(), instance)).transpose()?,
            api: self.api.as_ref().map(|i| i.load(store.as_context_mut(), instance)).transpose()?,
            subscriber: self.subscriber.as_ref().map(|i| i.load(store.as_context_mut(), instance)).transpose()?,
            subscriber_batch: match &self.subscriber_batch {
                Some(i) => Some(
                    instance
                        .get_func(store.as_context_mut(), i)
                        .ok_or_else(|| wasmtime::format_err!("no function `on-events` in this instance"))?,
                ),
                None => None,
            },
            task: self.task.as_ref().map(|i| i.load(store.as_context_mut(), instance)).transpose()?,
        })
    }
}

/// The loaded exports of one instance.
pub(crate) struct WorkerExports {
    pub route: Option<route::Guest>,
    pub batch: Option<batch::Guest>,
    pub datagrams: Option<datagrams::Guest>,
    pub api: Option<api::Guest>,
    pub subscriber: Option<subscriber::Guest>,
    /// `on-events`, called with the bus's shared events (see
    /// `PluginVersion::on_events`).
    pub subscriber_batch: Option<Func>,
    pub task: Option<task::Guest>,
}
