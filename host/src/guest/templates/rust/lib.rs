//! {{name}}: counts how often each text was sent and answers with the count.
//! Try it: `evrhost call {{name}}.wasm hello world`.

use evrhost_sdk::{export, kv, log, Api, CommandInfo, Reply, Request, Route};

struct Plugin;

impl Route for Plugin {
    fn handle(req: Request) -> Result<Reply, String> {
        let text = req.data_str();
        let n = kv::incr(&format!("seen:{text}"), 1).map_err(|e| e.message())?;
        log::info(&format!("{text} seen {n} times on {}", req.route));
        Ok(Reply::handled().retval(n.to_string()).data(format!("{text} #{n}")))
    }
}

impl Api for Plugin {
    fn commands() -> Vec<CommandInfo> {
        vec![CommandInfo::new("{{name}}.seen", "TEXT", "how often TEXT was sent")]
    }

    fn execute(command: String, args: String) -> Result<String, String> {
        match command.as_str() {
            "{{name}}.seen" => Ok(kv::get_string(&format!("seen:{args}")).map_err(|e| e.message())?.unwrap_or_else(|| "0".into())),
            other => Err(format!("unknown command {other}")),
        }
    }
}

export!(Plugin: route, api);
