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

/// The counters one datagram bumps: `bad`, or `rx` and `ev::<ev>`.
fn count(req: &Request, mut bump: impl FnMut(&str)) {
    let data = req.data_str();
    let fields = parse(&data);
    // As handler.lua: seq is read and not used.
    std::hint::black_box(fields.seq);
    if fields.ev.is_empty() || fields.user.is_empty() {
        bump("bad");
    } else {
        bump("rx");
        let mut key = String::with_capacity(4 + fields.ev.len());
        key.push_str("ev::");
        key.push_str(fields.ev);
        bump(&key);
    }
}

impl Route for EvCount {
    fn handle(req: Request) -> Result<Reply, String> {
        let mut failed = None;
        count(&req, |key| {
            if let Err(e) = kv::incr(key, 1) {
                failed.get_or_insert(e.message());
            }
        });
        failed.map_or(Ok(Reply::handled()), Err)
    }

    /// The datagrams of one read: each parsed and counted, and each
    /// counter bumped once by its total, as Kamailio's htable ends up.
    fn handle_batch(requests: Vec<Request>) -> Vec<Result<Reply, String>> {
        // Few distinct keys per batch: a list beats a map.
        let mut totals: Vec<(String, i64)> = Vec::new();
        for req in &requests {
            count(req, |key| match totals.iter_mut().find(|(k, _)| k == key) {
                Some((_, n)) => *n += 1,
                None => totals.push((key.to_string(), 1)),
            });
        }
        let failed = totals.iter().find_map(|(key, n)| kv::incr(key, *n).err().map(|e| e.message()));
        let reply = || failed.clone().map_or(Ok(Reply::handled()), Err);
        requests.iter().map(|_| reply()).collect()
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
