//! A SIP-registrar-style user lookup answered by Erlang: the route asks the
//! processes bound to the `directory` section (FreeSWITCH's XML search
//! bindings) for the user named in the request's data, and replies with
//! the XML they return. The `directory.lookup USER [DOMAIN]` command does
//! the same from the API (`{api, 'directory.lookup', "1000"}` from Erlang).

use evrhost_sdk::{export, fetch, Api, CommandInfo, Reply, Request, Route};

struct Directory;

/// The fetch FreeSWITCH makes for a user: section `directory`, tag
/// `domain`, key `name`, the domain as value, the user among the params.
fn lookup(user: &str, domain: &str) -> Result<String, String> {
    if user.is_empty() {
        return Err("a user is needed".into());
    }
    let params = [
        ("Event-Name".to_string(), "REQUEST_PARAMS".to_string()),
        ("action".to_string(), "sip_auth".to_string()),
        ("user".to_string(), user.to_string()),
        ("domain".to_string(), domain.to_string()),
    ];
    fetch("directory", "domain", "name", domain, &params).map_err(|e| e.message())
}

impl Route for Directory {
    fn handle(req: Request) -> Result<Reply, String> {
        let text = req.data_str();
        let mut words = text.split_whitespace();
        let user = words.next().unwrap_or("");
        let domain = words.next().unwrap_or("localhost");
        let xml = lookup(user, domain)?;
        Ok(Reply::handled().data(xml.into_bytes()))
    }
}

impl Api for Directory {
    fn commands() -> Vec<CommandInfo> {
        vec![CommandInfo::new("directory.lookup", "USER [DOMAIN]", "the directory XML for USER, from Erlang")]
    }

    fn execute(command: String, args: String) -> Result<String, String> {
        match command.as_str() {
            "directory.lookup" => {
                let mut words = args.split_whitespace();
                lookup(words.next().unwrap_or(""), words.next().unwrap_or("localhost"))
            }
            other => Err(format!("unknown command {other}")),
        }
    }
}

export!(Directory: route, api);
