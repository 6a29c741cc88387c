//! What plugins' imports reach through the dispatcher: other commands, the
//! bus (within their tenant's event rights), a front-end's `fetch`; and the
//! sink that delivers bus events to a plugin's `subscriber` export.

use std::sync::{Arc, Weak};

use super::Dispatcher;
use crate::bus::{self, log_layer, Caller, Fired, Sink};
use crate::runtime::{Answer, Event, Export, FetchQuery, HostError, Message, PluginSpec, Services};

/// Answers plugins' `fetch` import: a front-end that asks the processes
/// bound to a section.
#[async_trait::async_trait]
pub trait Fetcher: Send + Sync + 'static {
    async fn fetch(&self, query: &FetchQuery) -> Result<String, HostError>;
}

/// Carries plugins' `messages` import to the engine evrhost is a module
/// of: a front-end.
#[async_trait::async_trait]
pub trait MessageEngine: Send + Sync + 'static {
    async fn dispatch(&self, message: Message) -> Result<Answer, HostError>;
    fn enqueue(&self, message: Message) -> Result<(), HostError>;
}

/// The bus id of a plugin as a subscriber.
pub(super) fn plugin_sink_id(plugin: &str) -> String {
    format!("plugin:{plugin}")
}

/// Delivers events to a plugin's current version.
struct PluginSink {
    plugin: String,
    d: Weak<Dispatcher>,
}

#[async_trait::async_trait]
impl Sink for PluginSink {
    async fn deliver(&mut self, event: &Fired) -> bool {
        let Some(version) = self.d.upgrade().and_then(|d| d.plugin(&self.plugin)) else { return false };
        let event = event.event();
        // A log event a plugin handles must not raise log events of its own.
        if event.name == "E_CORE_LOG" {
            return log_layer::suppressed(version.on_event(event)).await.0.is_ok();
        }
        let (result, _) = version.on_event(event).await;
        if let Err(e) = &result {
            tracing::debug!(plugin = %self.plugin, error = %e, "event not delivered");
        }
        result.is_ok()
    }

    /// In one call of `subscriber-batch` when the plugin has it.
    async fn deliver_batch(&mut self, fired: &[Arc<Fired>]) -> usize {
        let Some(version) = self.d.upgrade().and_then(|d| d.plugin(&self.plugin)) else { return 0 };
        let events: Vec<&Event> = fired.iter().map(|e| e.event()).collect();
        if !version.takes_events(&events) {
            return bus::deliver_each(self, fired).await;
        }
        let call = version.on_events(&events);
        let (result, _) =
            if events.iter().any(|e| e.name == "E_CORE_LOG") { log_layer::suppressed(call).await } else { call.await };
        match result {
            Ok(()) => events.len(),
            Err(e) => {
                tracing::debug!(plugin = %self.plugin, events = events.len(), error = %e, "events not delivered");
                0
            }
        }
    }
}

/// The dispatcher as plugins' imports see it.
pub(super) struct Link(pub(super) Weak<Dispatcher>);

impl Link {
    fn get(&self) -> Result<Arc<Dispatcher>, HostError> {
        self.0.upgrade().ok_or_else(|| HostError::Failed("evrhost is shutting down".into()))
    }

    /// The engine, if one is attached and `caller`'s tenant may send it
    /// a message named so.
    fn message_engine(&self, caller: &PluginSpec, message: &Message) -> Result<Arc<dyn MessageEngine>, HostError> {
        let d = self.get()?;
        if message.name.is_empty() {
            return Err(HostError::Invalid("a message needs a name".into()));
        }
        let tenant =
            d.tenants.get(&caller.tenant).ok_or_else(|| HostError::Failed("the plugin is not loaded".into()))?;
        if !tenant.messages.allows(&message.name) {
            return Err(HostError::Denied(format!(
                "tenant `{}` may not send messages named `{}`",
                caller.tenant, message.name
            )));
        }
        d.engine
            .get()
            .cloned()
            .ok_or_else(|| HostError::NotFound("no engine is attached: evrhost is not a module of one".into()))
    }
}

fn describe(name: &str, subclass: Option<&str>) -> String {
    match subclass {
        Some(sub) => format!("`{name}` `{sub}`"),
        None => format!("`{name}`"),
    }
}

#[async_trait::async_trait]
impl Services for Link {
    async fn call_command(
        &self,
        caller: &PluginSpec,
        command: &str,
        args: &str,
        depth: u32,
    ) -> Result<String, HostError> {
        self.get()?.run_command_for(caller, command, args, depth).await
    }

    fn fire(&self, plugin: &str, route: &str, event: Event) -> Result<(), HostError> {
        let d = self.get()?;
        if event.name.is_empty() || event.name.contains(char::is_whitespace) {
            return Err(HostError::Invalid("an event needs a name without spaces".into()));
        }
        if event.name == "CUSTOM" && event.subclass.as_deref().is_none_or(str::is_empty) {
            return Err(HostError::Invalid("a CUSTOM event needs a subclass".into()));
        }
        if bus::reserved(&event.name) {
            return Err(HostError::Denied(format!("`{}` is raised by evrhost only", event.name)));
        }
        let tenant = d.tenant(plugin).ok_or_else(|| HostError::Failed("the plugin is not loaded".into()))?;
        if !tenant.fire.allows(&event.name, event.subclass.as_deref()) {
            return Err(HostError::Denied(format!(
                "the tenant may not fire {}",
                describe(&event.name, event.subclass.as_deref())
            )));
        }
        d.bus.fire(event, Caller { file: plugin.to_string().into(), function: route.to_string().into(), line: 0 });
        Ok(())
    }

    fn subscribe(&self, plugin: &str, name: &str, subclass: Option<&str>) -> Result<(), HostError> {
        let d = self.get()?;
        if name.is_empty() {
            return Err(HostError::Invalid("an event name is needed (ALL for every event)".into()));
        }
        if !d.plugin(plugin).is_some_and(|v| v.has_export(Export::Subscriber)) {
            return Err(HostError::Invalid(format!(
                "plugin `{plugin}` does not export `{}`; events would have nowhere to go",
                Export::Subscriber.interface()
            )));
        }
        let tenant = d.tenant(plugin).ok_or_else(|| HostError::Failed("the plugin is not loaded".into()))?;
        if !tenant.subscribe.allows(name, subclass) {
            return Err(HostError::Denied(format!("the tenant may not subscribe to {}", describe(name, subclass))));
        }
        let sink = || -> Box<dyn Sink> { Box::new(PluginSink { plugin: plugin.to_string(), d: self.0.clone() }) };
        d.bus
            .subscribe(&plugin_sink_id(plugin), sink, name, subclass, None)
            .map_err(|e| HostError::Invalid(e.to_string()))
    }

    fn unsubscribe(&self, plugin: &str, name: &str, subclass: Option<&str>) -> Result<bool, HostError> {
        let d = self.get()?;
        Ok(d.bus.unsubscribe(&plugin_sink_id(plugin), name, subclass))
    }

    fn filter(&self, plugin: &str, command: &str) -> Result<String, HostError> {
        let d = self.get()?;
        match d.bus.filter(&plugin_sink_id(plugin), command) {
            Ok(change) => Ok(change.to_string()),
            Err(e) => Err(HostError::Invalid(e.to_string())),
        }
    }

    async fn fetch(&self, query: FetchQuery) -> Result<String, HostError> {
        let d = self.get()?;
        let fetcher = d.fetcher.get().cloned().ok_or_else(|| {
            HostError::NotFound("no front-end answers fetches: nothing can be bound to a section".into())
        })?;
        fetcher.fetch(&query).await
    }

    async fn dispatch_message(&self, caller: &PluginSpec, message: Message) -> Result<Answer, HostError> {
        let engine = self.message_engine(caller, &message)?;
        engine.dispatch(message).await
    }

    fn enqueue_message(&self, caller: &PluginSpec, message: Message) -> Result<(), HostError> {
        self.message_engine(caller, &message)?.enqueue(message)
    }

    fn raise(&self, event: Event) {
        if let Ok(d) = self.get() {
            d.bus.fire(event, Caller::host("runtime"));
        }
    }
}
