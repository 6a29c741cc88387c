//! What a plugin's imports reach outside its own instance: other plugins'
//! commands and the event bus. The dispatcher implements it; the runtime
//! knows only this trait.

use super::bindings::{Answer, Event, HostError, Message};
use super::spec::PluginSpec;

#[async_trait::async_trait]
pub trait Services: Send + Sync + 'static {
    /// Runs an API command on behalf of the plugin `caller` (within what
    /// its tenant and its grants allow). `depth` counts nested command
    /// calls, so that a cycle of plugins calling each other ends.
    async fn call_command(
        &self,
        caller: &PluginSpec,
        command: &str,
        args: &str,
        depth: u32,
    ) -> Result<String, HostError>;
    fn fire(&self, plugin: &str, route: &str, event: Event) -> Result<(), HostError>;
    fn subscribe(&self, plugin: &str, name: &str, subclass: Option<&str>) -> Result<(), HostError>;
    fn unsubscribe(&self, plugin: &str, name: &str, subclass: Option<&str>) -> Result<bool, HostError>;
    fn filter(&self, plugin: &str, command: &str) -> Result<String, HostError>;
    /// Asks the processes bound to the query's section (the Erlang
    /// front-end's) for a document.
    async fn fetch(&self, query: FetchQuery) -> Result<String, HostError>;
    /// Dispatches a message in the engine evrhost is a module of and waits
    /// for its answer, if the caller's tenant may send it.
    async fn dispatch_message(&self, caller: &PluginSpec, message: Message) -> Result<Answer, HostError>;
    /// Enqueues a message there without waiting.
    fn enqueue_message(&self, caller: &PluginSpec, message: Message) -> Result<(), HostError>;
    /// Raises an event of the host's own (thresholds, pool scaling, …):
    /// no capability check, never fails the caller.
    fn raise(&self, event: Event);
}

/// A plugin's `fetch`, as FreeSWITCH's XML search bindings ask: a section
/// (`directory`, `dialplan`, …), a tag/key/value to look for, parameters.
#[derive(Clone, Debug)]
pub struct FetchQuery {
    pub section: String,
    pub tag: String,
    pub key: String,
    pub value: String,
    pub params: Vec<(String, String)>,
}
