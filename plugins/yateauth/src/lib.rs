//! A Yate `user.auth` handler: answers the password stored for the user
//! (Yate's authenticators return it as the message's return value, and the
//! engine checks the digest), and declines unknown users.
//!
//! Commands: `yateauth.add USER PASSWORD`, `yateauth.remove USER`.

use evrhost_sdk::{export, kv, Api, CommandInfo, Reply, Request, Route};

struct YateAuth;

fn key(user: &str) -> String {
    format!("password:{user}")
}

impl Route for YateAuth {
    fn handle(req: Request) -> Result<Reply, String> {
        req.message().ok_or("yateauth answers Yate messages only")?;
        let Some(user) = req.param("username").filter(|u| !u.is_empty()) else {
            return Ok(Reply::declined());
        };
        match kv::get_string(&key(user)).map_err(|e| e.message())? {
            Some(password) => Ok(Reply::handled().retval(password)),
            None => Ok(Reply::declined()),
        }
    }
}

impl Api for YateAuth {
    fn commands() -> Vec<CommandInfo> {
        vec![
            CommandInfo::new("yateauth.add", "USER PASSWORD", "let USER authenticate with PASSWORD"),
            CommandInfo::new("yateauth.remove", "USER", "forget USER"),
        ]
    }

    fn execute(command: String, args: String) -> Result<String, String> {
        let args = args.trim();
        match command.as_str() {
            "yateauth.add" => {
                let (user, password) = args.split_once(' ').ok_or("usage: yateauth.add USER PASSWORD")?;
                kv::set(&key(user), password.trim()).map_err(|e| e.message())?;
                Ok(format!("+OK {user}"))
            }
            "yateauth.remove" => {
                let existed = kv::delete(&key(args)).map_err(|e| e.message())?;
                Ok(if existed { format!("+OK {args} removed") } else { format!("-ERR no user {args}") })
            }
            other => Err(format!("unknown command {other}")),
        }
    }
}

export!(YateAuth: route, api);
