//! `kv.*`: operators look inside a tenant's keys, as Kamailio's
//! `htable.get` / `htable.dump` let them. A value is shown as `value` when
//! it is printable text and as `hex` otherwise, so no value can drive a
//! terminal. Writes answer once they are durable, as a plugin's reply does.

use serde_json::{json, Value};

use super::jsonrpc::{Params, RpcError};
use crate::dispatcher::Dispatcher;
use crate::kv::{KvError, KvSpace};

/// Keys a listing returns unless asked for fewer; and at most.
const DEFAULT_LIST: usize = 100;
const MAX_LIST: usize = 10_000;

pub const METHODS: [(&str, &str); 5] = [
    ("kv.get", "TENANT KEY — a key's value (`value` as text, or `hex`), or null"),
    ("kv.set", "TENANT KEY VALUE — set a key (answered once durable)"),
    ("kv.incr", "TENANT KEY [DELTA] — add DELTA (1) to a counter; its new value"),
    ("kv.delete", "TENANT KEY — delete a key; whether it was there"),
    ("kv.list", "TENANT [PREFIX] [LIMIT] — keys starting with PREFIX, in order, at most LIMIT (100, up to 10000)"),
];

pub async fn call(d: &Dispatcher, method: &str, p: &Params) -> Result<Value, RpcError> {
    let tenant = p.required(0, "tenant")?;
    let space = d.kv_space(&tenant).ok_or_else(|| RpcError::new(404, format!("no tenant `{tenant}`")))?;
    match method {
        "kv.get" => {
            let key = p.required(1, "key")?;
            let (value, _) = space.get(&key).await;
            Ok(value.map_err(kv_error)?.map_or(Value::Null, |v| shown(&key, &v)))
        }
        "kv.set" => {
            let key = p.required(1, "key")?;
            let value = p.required(2, "value")?;
            let (done, ticket) = space.set(&key, value.into_bytes()).await;
            done.map_err(kv_error)?;
            durable(&space, ticket).await?;
            Ok(Value::String("OK".into()))
        }
        "kv.incr" => {
            let key = p.required(1, "key")?;
            let delta = match p.text(2) {
                None => 1,
                Some(t) => {
                    t.parse::<i64>().map_err(|_| RpcError::new(-32602, "Invalid params: delta is a 64-bit integer"))?
                }
            };
            let (n, ticket) = space.incr(&key, delta).await;
            let n = n.map_err(kv_error)?;
            durable(&space, ticket).await?;
            Ok(json!(n))
        }
        "kv.delete" => {
            let key = p.required(1, "key")?;
            let (deleted, ticket) = space.delete(&key).await;
            let deleted = deleted.map_err(kv_error)?;
            durable(&space, ticket).await?;
            Ok(json!({"deleted": deleted}))
        }
        "kv.list" => {
            let prefix = p.text(1).unwrap_or_default();
            let limit = match p.text(2) {
                None => DEFAULT_LIST,
                Some(t) => t
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_LIST).contains(n))
                    .ok_or_else(|| RpcError::new(-32602, format!("Invalid params: limit is 1 to {MAX_LIST}")))?,
            };
            let keys = space.list(&prefix, limit).await.map_err(kv_error)?;
            Ok(Value::Array(keys.iter().map(|kv| shown(&kv.key, &kv.value)).collect()))
        }
        other => Err(RpcError::new(-32601, format!("Method Not Found: {other}"))),
    }
}

async fn durable(space: &KvSpace, ticket: crate::kv::Ticket) -> Result<(), RpcError> {
    space.durable(ticket).await.map_err(kv_error)
}

fn kv_error(e: KvError) -> RpcError {
    let code = if e.is_unavailable() { 503 } else { 400 };
    RpcError::new(code, e.to_string())
}

/// `{key, value}` for printable text, `{key, hex}` for anything else.
fn shown(key: &str, value: &[u8]) -> Value {
    match std::str::from_utf8(value) {
        Ok(text) if !text.chars().any(|c| c.is_control() && c != '\t' && c != '\n') => {
            json!({"key": key, "value": text})
        }
        _ => {
            let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
            json!({"key": key, "hex": hex})
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_bytes_and_binary_are_shown_as_hex() {
        assert_eq!(shown("k", b"plain text\twith tab"), json!({"key": "k", "value": "plain text\twith tab"}));
        assert_eq!(shown("k", b"\x1b[2J"), json!({"key": "k", "hex": "1b5b324a"}));
        assert_eq!(shown("k", &[0xff, 0x00]), json!({"key": "k", "hex": "ff00"}));
    }
}
