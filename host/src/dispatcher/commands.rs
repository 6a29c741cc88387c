//! API commands: those the host and its front-ends answer themselves
//! (registered with `add_command`), then the plugins' (their `api`
//! export), and background jobs that run either.

use std::sync::Arc;

use super::table::{Spec, Table};
use super::{DispatchError, Dispatcher};
use crate::bus::Caller;
use crate::runtime::{CommandInfo, Event, HostError, PluginSpec};

/// A command the host or a front-end answers: its arguments as one text
/// in, its text out.
#[async_trait::async_trait]
pub trait Command: Send + Sync + 'static {
    async fn run(&self, args: &str) -> Result<String, CommandError>;
}

/// Why a host command failed, in its own words.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CommandError(pub String);

/// Who answers a command.
enum Provider {
    Host { run: Arc<dyn Command>, admin: bool },
    Plugin(Arc<super::Slot>),
    None,
}

/// A registered host command.
#[derive(Clone)]
pub struct HostCommand {
    pub info: CommandInfo,
    pub run: Arc<dyn Command>,
    /// It changes the host (takes the admin lock): a plugin granted it
    /// never waits for an admin change already running, which may be the
    /// very one running that plugin (a reload reading its commands).
    pub admin: bool,
}

impl Dispatcher {
    /// Adds a command the host or a front-end answers. Refused when a
    /// plugin or another host command has the name already.
    pub async fn add_command(&self, command: HostCommand) -> Result<(), DispatchError> {
        let _admin = self.admin.lock().await;
        let table = self.table.load_full();
        let name = command.info.name.clone();
        if table.spec.host_commands.contains_key(&name) {
            return Err(DispatchError::HostCommandConflict(name));
        }
        if let Some(slot) = table.commands.get(&name) {
            return Err(DispatchError::CommandConflict {
                command: name,
                plugin: slot.name.to_string(),
                other: "evrhost (built-in)".into(),
            });
        }
        let mut spec: Spec = table.spec.clone();
        spec.host_commands.insert(name, command);
        self.publish(Table::build(spec, None)?);
        Ok(())
    }

    /// Runs an API command: the host's or a plugin's. `depth` counts nested
    /// command calls.
    pub async fn run_command(&self, command: &str, args: &str, depth: u32) -> Result<String, DispatchError> {
        match self.provider(command) {
            Provider::Host { run, .. } => Ok(run.run(args).await?),
            Provider::Plugin(slot) => {
                let (result, _) = slot.current().execute(command, args, depth).await;
                result.map_err(|e| DispatchError::Call(Box::new(e)))
            }
            Provider::None => Err(DispatchError::CommandNotFound(command.to_string())),
        }
    }

    /// Who answers `command`: the host first, then a plugin.
    fn provider(&self, command: &str) -> Provider {
        let table = self.table.load();
        if let Some(host) = table.spec.host_commands.get(command) {
            return Provider::Host { run: host.run.clone(), admin: host.admin };
        }
        table.commands.get(command).map_or(Provider::None, |slot| Provider::Plugin(slot.clone()))
    }

    /// Runs a command a plugin called (`commands.call`). The rule: a plugin
    /// reaches the commands of its own tenant's plugins, and of the host's
    /// only those its config grants (`host_commands`); another tenant's
    /// command is answered as if it did not exist, so a tenant cannot probe
    /// for them.
    pub(super) async fn run_command_for(
        &self,
        caller: &PluginSpec,
        command: &str,
        args: &str,
        depth: u32,
    ) -> Result<String, HostError> {
        let not_found = || HostError::NotFound(format!("no command `{command}`"));
        let slot = match self.provider(command) {
            Provider::Host { run, admin } => {
                if !caller.host_commands.iter().any(|c| c == command) {
                    return Err(HostError::Denied(format!(
                        "plugin `{}` is not granted the host command `{command}` (see host_commands)",
                        caller.name
                    )));
                }
                if admin && self.admin.try_lock().is_err() {
                    return Err(HostError::Failed(format!(
                        "`{command}` waits for the admin lock, and an admin change is running: a plugin never waits on it"
                    )));
                }
                return run.run(args).await.map_err(|e| HostError::Failed(e.0));
            }
            Provider::Plugin(slot) => slot,
            Provider::None => return Err(not_found()),
        };
        let version = slot.current();
        if version.spec.tenant != caller.tenant {
            return Err(not_found());
        }
        let (result, _) = version.execute(command, args, depth).await;
        result.map_err(|e| HostError::Failed(e.to_string()))
    }

    /// Runs a command in the background as a job (`bgapi`, `api.bgrun`):
    /// fires BACKGROUND_JOB with its output when done, and returns
    /// (succeeded, output). A failure's output is `failure(error)`, the
    /// text the asking front-end gives errors in.
    pub async fn run_background(
        &self,
        job: &str,
        command: &str,
        args: &str,
        caller: &Caller,
        failure: impl FnOnce(&str, &DispatchError) -> String,
    ) -> (bool, String) {
        let (ok, output) = match self.run_command(command, args, 0).await {
            Ok(text) => (true, text),
            Err(e) => (false, failure(command, &e)),
        };
        let mut headers = vec![
            ("Job-UUID".to_string(), job.to_string()),
            ("Job-Command".to_string(), command.to_string()),
            ("Job-Successful".to_string(), ok.to_string()),
        ];
        if !args.is_empty() {
            headers.push(("Job-Command-Arg".to_string(), args.to_string()));
        }
        let event = Event { name: "BACKGROUND_JOB".into(), subclass: None, headers, body: Some(output.clone()) };
        self.bus.fire(event, caller.clone());
        (ok, output)
    }

    /// Every command: the host's first, then the plugins'.
    pub fn commands(&self) -> Vec<CommandInfo> {
        let table = self.table.load();
        let mut all: Vec<CommandInfo> = table.spec.host_commands.values().map(|c| c.info.clone()).collect();
        for slot in table.spec.plugins.values() {
            all.extend(slot.current().commands().iter().cloned());
        }
        all
    }
}
