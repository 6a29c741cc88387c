//! Counts events per key from `key=value;key=value;…` datagrams: each key
//! named in a datagram counts once, in the tenant's kv store. Read the
//! counts with the `kvcount.get KEY` command (`evrhost rpc api.run
//! kvcount.get KEY`). A segment without `=` counts as a key by itself;
//! empty segments are skipped.

use evrhost_sdk::{export, kv, Api, CommandInfo, Reply, Request, Route};

struct KvCount;

/// Keys counted from one datagram at most; the rest is ignored.
const MAX_KEYS: usize = 64;

fn counter(key: &str) -> String {
    format!("kvcount:{key}")
}

impl Route for KvCount {
    fn handle(req: Request) -> Result<Reply, String> {
        let text = req.data_str();
        let mut counted = 0;
        for segment in text.split(';').map(str::trim).filter(|s| !s.is_empty()).take(MAX_KEYS) {
            let key = segment.split_once('=').map_or(segment, |(k, _)| k).trim();
            if key.is_empty() {
                continue;
            }
            kv::incr(&counter(key), 1).map_err(|e| format!("counting `{key}`: {}", e.message()))?;
            counted += 1;
        }
        // The count as data too, so a UDP sender gets it back (and knows
        // the counts are saved: a reply leaves once its writes are durable).
        Ok(Reply::handled().retval(counted.to_string()).data(counted.to_string()))
    }
}

impl Api for KvCount {
    fn commands() -> Vec<CommandInfo> {
        vec![CommandInfo::new("kvcount.get", "KEY", "how many datagrams named KEY")]
    }

    fn execute(command: String, args: String) -> Result<String, String> {
        match command.as_str() {
            "kvcount.get" => {
                Ok(kv::get_string(&counter(args.trim())).map_err(|e| e.message())?.unwrap_or_else(|| "0".into()))
            }
            other => Err(format!("unknown command {other}")),
        }
    }
}

export!(KvCount: route, api);
