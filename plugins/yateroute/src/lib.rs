//! A Yate `call.route` handler: routes a called number to the `callto`
//! stored for it in the tenant's kv, and declines the others so that the
//! engine's next handler (regexroute, say) gets them.
//!
//! Install it with `[[yate.install]] message = "call.route"` and a route
//! `call.route` bound to this plugin. Commands:
//! - `yateroute.set NUMBER TARGET` / `yateroute.del NUMBER`: the table;
//! - `yateroute.send NAME [KEY=VALUE …]`: dispatches a message in the
//!   engine and prints its answer (`true RETVALUE KEY=VALUE …`).

use evrhost_sdk::{export, kv, log, messages, Api, CommandInfo, Message, Reply, Request, Route};

struct YateRoute;

fn key(number: &str) -> String {
    format!("route:{number}")
}

impl Route for YateRoute {
    fn handle(req: Request) -> Result<Reply, String> {
        let message = req.message().ok_or("yateroute answers Yate messages only")?;
        let called = req.param("called").ok_or_else(|| format!("{} without a `called` parameter", message.name))?;
        match kv::get_string(&key(called)).map_err(|e| e.message())? {
            Some(target) => {
                log::debug(&format!("{called} -> {target}"));
                // Yate's routers set the target as the return value; the
                // debug header of the caller's leg is not passed on.
                Ok(Reply::handled().retval(target).param("osip_X-Routed-By", "evrhost").unset("osip_X-Debug"))
            }
            None => Ok(Reply::declined()),
        }
    }
}

impl Api for YateRoute {
    fn commands() -> Vec<CommandInfo> {
        vec![
            CommandInfo::new("yateroute.set", "NUMBER TARGET", "route NUMBER to TARGET (a callto)"),
            CommandInfo::new("yateroute.del", "NUMBER", "forget NUMBER's route"),
            CommandInfo::new("yateroute.send", "NAME [KEY=VALUE …]", "dispatch a message in the engine"),
        ]
    }

    fn execute(command: String, args: String) -> Result<String, String> {
        let args = args.trim();
        match command.as_str() {
            "yateroute.set" => {
                let (number, target) =
                    args.split_once(' ').ok_or("usage: yateroute.set NUMBER TARGET")?;
                kv::set(&key(number), target.trim()).map_err(|e| e.message())?;
                Ok(format!("+OK {number} -> {}", target.trim()))
            }
            "yateroute.del" => {
                let existed = kv::delete(&key(args)).map_err(|e| e.message())?;
                Ok(if existed { "+OK deleted".into() } else { format!("-ERR no route for {args}") })
            }
            "yateroute.send" => {
                let mut words = args.split(' ').filter(|w| !w.is_empty());
                let mut message = Message::new(words.next().ok_or("usage: yateroute.send NAME [KEY=VALUE …]")?);
                for pair in words {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    message = message.param(k, v);
                }
                let answer = messages::dispatch(&message).map_err(|e| e.message())?;
                let params: Vec<String> = answer.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
                Ok(format!("{} {} {}", answer.handled, answer.retvalue, params.join(" ")).trim_end().to_string())
            }
            other => Err(format!("unknown command {other}")),
        }
    }
}

export!(YateRoute: route, api);
