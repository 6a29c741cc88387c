//! A hostile fixture for the admin path: its `commands()` export, which the
//! host calls while it loads or reloads the plugin, calls `plugin.reload`
//! (on itself, or on the plugin its config names) and logs the answer. It
//! must get an error or an answer, never hold the admin path in a deadlock.

use evrhost_sdk::{config, export, log, Api, CommandInfo};

struct Reentrant;

impl Api for Reentrant {
    fn commands() -> Vec<CommandInfo> {
        let target = config("reload").unwrap_or_else(|| "reentrant".into());
        let answer = match evrhost_sdk::call("plugin.reload", &target) {
            Ok(text) => format!("ok: {text}"),
            Err(e) => e.message(),
        };
        log::info(&format!("plugin.reload {target} from commands(): {answer}"));
        vec![CommandInfo::new("reentrant.ping", "", "answers pong")]
    }

    fn execute(command: String, _args: String) -> Result<String, String> {
        match command.as_str() {
            "reentrant.ping" => Ok("pong".into()),
            other => Err(format!("unknown command {other}")),
        }
    }
}

export!(Reentrant: api);
