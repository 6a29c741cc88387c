//! The host functions a plugin imports. Each checks the plugin's
//! capabilities first: a denied call returns `host-error::denied`, it never
//! traps and is never silently ignored.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wasmtime::component::Linker;
use wasmtime::StoreContextMut;

use super::bindings::evrhost::plugin::{commands, events, fetch, host, messages, types};
use super::bindings::{Answer, Event, HostError, Level, Message};
use super::contract::interface;
use super::services::FetchQuery;
use super::state::HostState;
use super::trace::traced;

/// Command calls nested deeper than this fail, which ends cycles of plugins
/// calling each other.
const MAX_COMMAND_DEPTH: u32 = 8;

/// Writes one line to the plugin's log, within the per-call budget and the
/// line-size cap. Used for the `log` import and for guest stdout/stderr.
pub(crate) fn emit_log(state: &mut HostState, level: Level, message: &str) {
    let limits = &state.plugin.spec.limits;
    if state.call.log_lines >= limits.max_log_lines_per_call {
        state.call.log_dropped += 1;
        return;
    }
    let mut end = message.len().min(limits.max_log_line_bytes);
    if !state.plugin.log_budget.take(end as u64) {
        state.call.log_rate_dropped += 1;
        return;
    }
    state.call.log_lines += 1;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let text = &message[..end];
    let cut = if end < message.len() { " [cut]" } else { "" };
    let spec = &state.plugin.spec;
    let (plugin, tenant, target) = (&spec.name, &spec.tenant, &state.call.target);
    match level {
        Level::Debug => {
            tracing::debug!(target: "plugin", plugin = %plugin, tenant = %tenant, route = %target, "{text}{cut}")
        }
        Level::Info | Level::Notice => {
            tracing::info!(target: "plugin", plugin = %plugin, tenant = %tenant, route = %target, "{text}{cut}")
        }
        Level::Warn => {
            tracing::warn!(target: "plugin", plugin = %plugin, tenant = %tenant, route = %target, "{text}{cut}")
        }
        Level::Error | Level::Crit => {
            tracing::error!(target: "plugin", plugin = %plugin, tenant = %tenant, route = %target, "{text}{cut}")
        }
    }
}

fn sleep_allowed(state: &HostState) -> Result<(), HostError> {
    if !state.call.is_task {
        return Err(HostError::Denied("only exec tasks may sleep".into()));
    }
    if !state.plugin.spec.capabilities.sleep {
        return Err(denied("sleep"));
    }
    Ok(())
}

/// Defines `host.sleep` over bindgen's definition, because it needs the
/// store: an exec task runs in slices between sleeps, and each slice gets
/// the plugin's whole fuel budget and deadline afresh when the sleep ends.
/// A task that never sleeps is stopped like any call; one that sleeps
/// between bounded slices may run forever.
pub(crate) fn add_sleep(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut host = linker.instance(interface!("host"))?;
    host.func_wrap_async("sleep", |mut store: StoreContextMut<'_, HostState>, (ms,): (u32,)| {
        Box::new(async move {
            if let Err(e) = sleep_allowed(store.data()) {
                return Ok((Err(e),));
            }
            {
                // No guest code runs meanwhile: the ticker may park. The
                // guard holds it again even if the task is cancelled here.
                let ticks = store.data().plugin.ticks.clone();
                let _paused = ticks.pause();
                tokio::time::sleep(Duration::from_millis(u64::from(ms))).await;
            }
            let fuel = store.data().plugin.spec.limits.fuel;
            store.set_fuel(fuel)?;
            let data = store.data_mut();
            data.call.deadline_tick = data.plugin.deadline_from_now();
            store.set_epoch_deadline(1);
            Ok((Ok::<(), HostError>(()),))
        })
    })?;
    linker.allow_shadowing(false);
    Ok(())
}

pub(super) fn denied(capability: &str) -> HostError {
    HostError::Denied(format!("this plugin is not granted the `{capability}` capability"))
}

impl types::Host for HostState {}

impl host::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        traced!(self, "host.log", [level, message], {
            if self.plugin.spec.capabilities.log {
                emit_log(self, level, &message);
            }
        })
    }

    fn config(&mut self, key: String) -> Option<String> {
        traced!(self, "host.config", [key], {
            let spec = &self.plugin.spec;
            if !spec.capabilities.config {
                return None;
            }
            spec.config.get(&key).cloned()
        })
    }

    fn now(&mut self) -> u64 {
        traced!(self, "host.now", [], {
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
        })
    }

    /// Never reached: `add_sleep` shadows this definition with one that
    /// can renew the store's fuel and deadline. It refuses like that one.
    async fn sleep(&mut self, _ms: u32) -> Result<(), HostError> {
        sleep_allowed(self)?;
        Err(HostError::Failed("sleep is served by the store-aware definition".into()))
    }
}

fn event_size(event: &Event) -> usize {
    event.name.len()
        + event.subclass.as_ref().map_or(0, String::len)
        + event.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
        + event.body.as_ref().map_or(0, String::len)
}

impl events::Host for HostState {
    fn fire(&mut self, event: Event) -> Result<(), HostError> {
        let traced = self.trace_begin(&[&event]);
        let result = self.fire_checked(event);
        self.trace_end("events.fire", traced, &result);
        result
    }

    fn subscribe(&mut self, name: String, subclass: Option<String>) -> Result<(), HostError> {
        traced!(self, "events.subscribe", [name, subclass], {
            if !self.plugin.spec.capabilities.events {
                return Err(denied("events"));
            }
            self.plugin.services.subscribe(&self.plugin.spec.name, &name, subclass.as_deref())
        })
    }

    fn unsubscribe(&mut self, name: String, subclass: Option<String>) -> Result<bool, HostError> {
        traced!(self, "events.unsubscribe", [name, subclass], {
            if !self.plugin.spec.capabilities.events {
                return Err(denied("events"));
            }
            self.plugin.services.unsubscribe(&self.plugin.spec.name, &name, subclass.as_deref())
        })
    }

    fn filter(&mut self, command: String) -> Result<String, HostError> {
        traced!(self, "events.filter", [command], {
            if !self.plugin.spec.capabilities.events {
                return Err(denied("events"));
            }
            self.plugin.services.filter(&self.plugin.spec.name, &command)
        })
    }
}

impl HostState {
    fn fire_checked(&mut self, event: Event) -> Result<(), HostError> {
        let spec = &self.plugin.spec;
        if !spec.capabilities.events {
            return Err(denied("events"));
        }
        let size = event_size(&event);
        if size > spec.limits.max_event_bytes {
            return Err(HostError::Invalid(format!(
                "event of {size} bytes exceeds the cap of {}",
                spec.limits.max_event_bytes
            )));
        }
        self.plugin.services.fire(&spec.name, &self.call.target, event)
    }
}

impl commands::Host for HostState {
    async fn call(&mut self, command: String, args: String) -> Result<String, HostError> {
        traced!(self, "commands.call", [command, args], async {
            if !self.plugin.spec.capabilities.commands {
                return Err(denied("commands"));
            }
            let depth = self.call.depth + 1;
            if depth > MAX_COMMAND_DEPTH {
                return Err(HostError::Failed(format!("command calls nested deeper than {MAX_COMMAND_DEPTH}")));
            }
            let (services, caller) = (self.plugin.services.clone(), self.plugin.spec.clone());
            services.call_command(&caller, &command, &args, depth).await
        })
    }
}

impl fetch::Host for HostState {
    async fn fetch(
        &mut self,
        section: String,
        tag: String,
        key: String,
        value: String,
        params: Vec<(String, String)>,
    ) -> Result<String, HostError> {
        let traced = self.trace_begin(&[&section, &tag, &key, &value, &params]);
        let result = async {
            if !self.plugin.spec.capabilities.fetch {
                return Err(denied("fetch"));
            }
            if section.is_empty() || section.len() > 64 {
                return Err(HostError::Invalid("a section name is 1 to 64 bytes".into()));
            }
            let services = self.plugin.services.clone();
            services.fetch(FetchQuery { section, tag, key, value, params }).await
        }
        .await;
        self.trace_end("fetch.fetch", traced, &result);
        result
    }
}

/// Messages carry names, a return value and parameters: bounded like an
/// event, so that a plugin cannot flood the engine's line buffer.
fn message_size(message: &Message) -> usize {
    message.name.len() + message.retvalue.len() + message.params.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
}

impl HostState {
    fn message_allowed(&self, message: &Message) -> Result<(), HostError> {
        let spec = &self.plugin.spec;
        if !spec.capabilities.messages {
            return Err(denied("messages"));
        }
        let size = message_size(message);
        if size > spec.limits.max_event_bytes {
            return Err(HostError::Invalid(format!(
                "message of {size} bytes exceeds the cap of {}",
                spec.limits.max_event_bytes
            )));
        }
        Ok(())
    }
}

impl messages::Host for HostState {
    async fn dispatch(&mut self, message: Message) -> Result<Answer, HostError> {
        let traced = self.trace_begin(&[&message]);
        // Moved in whole: a shared borrow of the state held across the
        // await would need it to be Sync.
        let this = &mut *self;
        let result = async move {
            this.message_allowed(&message)?;
            let (services, caller) = (this.plugin.services.clone(), this.plugin.spec.clone());
            services.dispatch_message(&caller, message).await
        }
        .await;
        self.trace_end("messages.dispatch", traced, &result);
        result
    }

    fn enqueue(&mut self, message: Message) -> Result<(), HostError> {
        let traced = self.trace_begin(&[&message]);
        let result = self
            .message_allowed(&message)
            .and_then(|()| self.plugin.services.enqueue_message(&self.plugin.spec, message));
        self.trace_end("messages.enqueue", traced, &result);
        result
    }
}
