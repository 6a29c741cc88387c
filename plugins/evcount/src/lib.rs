//! The Kamailio anchor's work per datagram (`handler.lua` beside
//! `host/benches/kamailio/`), for the side-by-side UDP bench.
//!
//! Route: the data is `k=v;k=v;…`; `ev`, `user` and `seq` are taken. When
//! `ev` or `user` is missing or empty the tenant's counter `bad` goes up,
//! else `rx` and `ev::<ev>`. Command: `evcount.get NAME`, the count of
//! NAME (0 before its first datagram).

use evrhost_sdk::{export, kv, Api, CommandInfo, Reply, Request, Route};

struct EvCount;

/// What the route reads of a datagram.
#[derive(Default)]
struct Fields<'a> {
    ev: &'a str,
    user: &'a str,
    seq: Option<u64>,
}

fn parse(data: &str) -> Fields<'_> {
    let mut fields = Fields::default();
    for (key, value) in data.split(';').filter_map(|pair| pair.split_once('=')) {
        match key {
            "ev" => fields.ev = value,
            "user" => fields.user = value,
            "seq" => fields.seq = value.parse().ok(),
            _ => {}
        }
    }
    fields
}

impl Route for EvCount {
    fn handle(req: Request) -> Result<Reply, String> {
        let data = req.data_str();
        let fields = parse(&data);
        // As handler.lua: seq is read and not used.
        std::hint::black_box(fields.seq);
        let bump = |key: &str| kv::incr(key, 1).map_err(|e| e.message());
        if fields.ev.is_empty() || fields.user.is_empty() {
            bump("bad")?;
        } else {
            bump("rx")?;
            let mut key = String::with_capacity(4 + fields.ev.len());
            key.push_str("ev::");
            key.push_str(fields.ev);
            bump(&key)?;
        }
        Ok(Reply::handled())
    }
}

impl Api for EvCount {
    fn commands() -> Vec<CommandInfo> {
        vec![CommandInfo::new("evcount.get", "NAME", "the count of NAME: rx, bad or ev::EVENT")]
    }

    fn execute(command: String, args: String) -> Result<String, String> {
        match command.as_str() {
            "evcount.get" => Ok(kv::get_string(args.trim()).map_err(|e| e.message())?.unwrap_or_else(|| "0".into())),
            other => Err(format!("unknown command {other}")),
        }
    }
}

export!(EvCount: route, api);
