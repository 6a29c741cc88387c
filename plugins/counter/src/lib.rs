//! Counts requests per key in the tenant's kv store.
//!
//! Route: the request's data is the key (`default` when empty); the reply's
//! retval is the new count. Commands: `counter.get KEY`, `counter.reset KEY`.

use evrhost_sdk::{export, kv, Api, CommandInfo, Reply, Request, Route};

struct Counter;

fn key_of(raw: &str) -> String {
    let key = raw.trim();
    format!("counter:{}", if key.is_empty() { "default" } else { key })
}

impl Route for Counter {
    fn handle(req: Request) -> Result<Reply, String> {
        let n = kv::incr(&key_of(&req.data_str()), 1).map_err(|e| e.message())?;
        Ok(Reply::handled().retval(n.to_string()))
    }
}

impl Api for Counter {
    fn commands() -> Vec<CommandInfo> {
        vec![
            CommandInfo::new("counter.get", "KEY", "the count of KEY"),
            CommandInfo::new("counter.reset", "KEY", "sets the count of KEY to 0; prints the old count"),
        ]
    }

    fn execute(command: String, args: String) -> Result<String, String> {
        let key = key_of(&args);
        let count = kv::get_string(&key).map_err(|e| e.message())?.unwrap_or_else(|| "0".into());
        match command.as_str() {
            "counter.get" => Ok(count),
            "counter.reset" => {
                kv::delete(&key).map_err(|e| e.message())?;
                Ok(count)
            }
            other => Err(format!("unknown command {other}")),
        }
    }
}

export!(Counter: route, api);
