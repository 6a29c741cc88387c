//! The event interface over RPC: `event.*`, and the names OpenSIPS
//! operators script with, answered as OpenSIPS's MI answers them
//! (`mi_core.c`, `evi/event_interface.c`): `event_subscribe`,
//! `events_list`, `subscribers_list`, `raise_event`, each also under its
//! OpenSIPS 4 name (`evi:subscribe`, `evi:list`, `evi:subscribers`,
//! `evi:raise`). Their parameters come by name or by position.

use std::time::Duration;

use serde_json::{json, Map, Value};

use super::jsonrpc::Server;
use super::params::{as_text, Params, RpcError};
use crate::bus::{split_event, Caller, FilterChange, FilterError, HOST_EVENTS};
use crate::config::EventSocket;
use crate::runtime::Event;

pub const METHODS: [(&str, &str); 12] = [
    ("event.subscribe", "EVENT SOCKET [EXPIRE] — OpenSIPS's event_subscribe: udp:IP:PORT or tcp:IP:PORT[/METHOD]; EVENT is NAME, ALL or CUSTOM:SUBCLASS; EXPIRE seconds (3600)"),
    ("event.unsubscribe", "EVENT SOCKET — drop a subscription"),
    ("event.list", "— subscribers: events, filters, queued, delivered, overflow, failed"),
    ("event.filter", "SOCKET COMMAND… — a mod_event_socket filter command for a subscriber"),
    ("event_subscribe", "event socket [expire] — OpenSIPS MI: subscribe (3600 s; 0 unsubscribes); \"OK\""),
    ("evi:subscribe", "event socket [expire] — OpenSIPS 4 name of event_subscribe"),
    ("events_list", "— OpenSIPS MI: {\"Events\": [{name, id}]}, the events evrhost raises or someone subscribed to"),
    ("evi:list", "— OpenSIPS 4 name of events_list"),
    ("subscribers_list", "[event [socket]] — OpenSIPS MI: the subscribers of every event, of one, or one subscriber"),
    ("evi:subscribers", "[event [socket]] — OpenSIPS 4 name of subscribers_list"),
    ("raise_event", "event [params] — OpenSIPS MI: raise an event; params an array, an object or a JSON object as text"),
    ("evi:raise", "event [params] — OpenSIPS 4 name of raise_event"),
];

/// Parameters a raised event may carry, and bytes of all of them.
const MAX_RAISE_PARAMS: usize = 64;
const MAX_RAISE_BYTES: usize = 64 << 10;

pub async fn call(s: &Server, method: &str, p: &Params) -> Option<Result<Value, RpcError>> {
    Some(match method {
        "event.subscribe" => subscribe(s, p, false),
        "event_subscribe" | "evi:subscribe" => subscribe(s, p, true),
        "event.unsubscribe" => unsubscribe(s, p),
        "event.list" => Ok(serde_json::to_value(s.dispatcher.bus().list()).unwrap_or(Value::Null)),
        "event.filter" => filter(s, p),
        "events_list" | "evi:list" => {
            Ok(json!({"Events": known(s).iter().map(|(name, id)| json!({"name": name, "id": id})).collect::<Vec<_>>()}))
        }
        "subscribers_list" | "evi:subscribers" => subscribers(s, p),
        "raise_event" | "evi:raise" => raise(s, p),
        _ => return None,
    })
}

fn bad_value() -> RpcError {
    RpcError::new(400, "Bad parameter value")
}

/// OpenSIPS's answer to a missing or mistyped parameter.
fn param_error() -> RpcError {
    RpcError::new(-32602, "Invalid params")
}

/// `mi`: parameters by name, OpenSIPS's errors.
fn subscribe(s: &Server, p: &Params, mi: bool) -> Result<Value, RpcError> {
    let text = |i: usize, name: &str| -> Result<String, RpcError> {
        if !mi {
            return p.required(i, name);
        }
        p.by_name(i, name).and_then(as_text).filter(|v| !v.is_empty()).ok_or_else(param_error)
    };
    let event = text(0, "event")?;
    let socket = text(1, "socket")?;
    let expire = if mi { p.by_name(2, "expire") } else { p.get(2) };
    let expire = match expire {
        None | Some(Value::Null) => 3600,
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .ok_or_else(|| RpcError::new(-32602, "Invalid params: expire must be a number"))?,
    };
    if expire < 0 {
        return Err(RpcError::new(-32602, "Negative expire value"));
    }
    let socket = EventSocket::parse(&socket).map_err(|_| bad_value())?;
    let (name, subclass) = split_event(&event);
    if name.is_empty() {
        return Err(bad_value());
    }
    let d = &s.dispatcher;
    // OpenSIPS: an expire of 0 removes the subscription.
    if expire == 0 {
        d.bus().unsubscribe(&socket.id(), name, subclass);
    } else {
        let expire = Some(Duration::from_secs(expire as u64));
        s.sinks.subscribe(d.bus(), &socket, name, subclass, expire).map_err(|e| RpcError::new(400, e.to_string()))?;
    }
    Ok(Value::String("OK".into()))
}

fn unsubscribe(s: &Server, p: &Params) -> Result<Value, RpcError> {
    let event = p.required(0, "event")?;
    let socket = p.required(1, "socket")?;
    let target = EventSocket::parse(&socket).map_err(|_| bad_value())?;
    let (name, subclass) = split_event(&event);
    if s.dispatcher.bus().unsubscribe(&target.id(), name, subclass) {
        Ok(Value::String("OK".into()))
    } else {
        Err(RpcError::new(404, format!("{socket} is not subscribed to {event}")))
    }
}

fn filter(s: &Server, p: &Params) -> Result<Value, RpcError> {
    let socket = p.required(0, "socket")?;
    let target = EventSocket::parse(&socket).map_err(|_| bad_value())?;
    match s.dispatcher.bus().filter(&target.id(), &p.rest(1).join(" ")) {
        Ok(change) => Ok(Value::String(filter_reply(&change))),
        Err(crate::bus::BusError::Filter(e)) => Err(RpcError::new(400, filter_error(&e))),
        Err(e) => Err(RpcError::new(400, e.to_string())),
    }
}

/// A filter command's outcome as mod_event_socket answers it.
fn filter_reply(change: &FilterChange) -> String {
    match change {
        FilterChange::Added { header, value } => format!("+OK filter added. [{header}]=[{value}]"),
        FilterChange::Deleted { header, value } => {
            format!("+OK filter deleted. [{header}][{}]", value.as_deref().unwrap_or(""))
        }
        FilterChange::DeletedAll => "+OK filter deleted. [all]".to_string(),
    }
}

fn filter_error(e: &FilterError) -> String {
    match e {
        FilterError::Syntax => "-ERR invalid syntax".to_string(),
        other => format!("-ERR {other}"),
    }
}

/// The events OpenSIPS would call registered: the host's own, then every
/// other one somebody subscribed to since start, numbered on in the order
/// first seen.
fn known(s: &Server) -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> = HOST_EVENTS.iter().map(|(n, id)| (n.to_string(), *id)).collect();
    let others = s.dispatcher.bus().named().into_iter().filter(|e| !HOST_EVENTS.iter().any(|(n, _)| n == e));
    out.extend(others.zip(HOST_EVENTS.len() as u32 + 1..));
    out
}

/// A subscriber as OpenSIPS prints one: its socket, and its expire as
/// subscribed (seconds) or "never".
fn subscriber(socket: &str, expire: Option<Duration>) -> Value {
    let expire = expire.map_or(json!("never"), |d| json!(d.as_secs()));
    json!({"socket": socket, "expire": expire})
}

fn subscribers(s: &Server, p: &Params) -> Result<Value, RpcError> {
    let known = known(s);
    let all = s.dispatcher.bus().subscriptions();
    // `ALL` subscribers hear every event, so they are listed under each.
    let of = |event: &str| -> Vec<(String, Option<Duration>)> {
        all.iter().filter(|(_, e, _)| e == event || e == "ALL").map(|(id, _, x)| (id.clone(), *x)).collect()
    };
    let Some(event) = p.by_name(0, "event") else {
        let events: Vec<Value> = known
            .iter()
            .filter_map(|(name, id)| {
                let subs = of(name);
                let list: Vec<Value> = subs.iter().map(|(sock, x)| subscriber(sock, *x)).collect();
                (!list.is_empty()).then(|| json!({"name": name, "id": id, "Subscribers": list}))
            })
            .collect();
        return Ok(json!({"Events": events}));
    };
    let event = as_text(event).ok_or_else(param_error)?;
    let (name, id) =
        known.iter().find(|(n, _)| *n == event).ok_or_else(|| RpcError::new(404, "Event not published"))?;
    let subs = of(name);
    let Some(socket) = p.by_name(1, "socket") else {
        // OpenSIPS prints an event only when it has subscribers.
        if subs.is_empty() {
            return Ok(json!({"Event": {}}));
        }
        let list: Vec<Value> = subs.iter().map(|(sock, x)| subscriber(sock, *x)).collect();
        return Ok(json!({"Event": {"name": name, "id": id, "Subscribers": list}}));
    };
    let socket = as_text(socket).ok_or_else(param_error)?;
    let id_of = EventSocket::parse(&socket).map(|s| s.id()).unwrap_or(socket);
    let (sock, expire) =
        subs.iter().find(|(sock, _)| *sock == id_of).ok_or_else(|| RpcError::new(404, "Subscriber does not exist"))?;
    Ok(json!({"Event": {"name": name, "id": id, "Subscriber": subscriber(sock, *expire)}}))
}

fn raise(s: &Server, p: &Params) -> Result<Value, RpcError> {
    let event = p.by_name(0, "event").and_then(as_text).filter(|e| !e.is_empty()).ok_or_else(param_error)?;
    if !known(s).iter().any(|(n, _)| *n == event) {
        return Err(RpcError::new(404, "Event not registered"));
    }
    let bus = s.dispatcher.bus();
    if !bus.wanted(&event) {
        return Err(RpcError::new(480, "Temporarily Unavailable"));
    }
    let bad = || RpcError::new(400, "Bad Params");
    let headers: Vec<(String, String)> = match p.by_name(1, "params") {
        None | Some(Value::Null) => Vec::new(),
        // OpenSIPS names array parameters by nothing; here by position.
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| Some((i.to_string(), as_text(v)?)))
            .collect::<Option<_>>()
            .ok_or_else(bad)?,
        Some(Value::Object(map)) => named(map),
        Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => named(&map),
            _ => return Err(bad()),
        },
        Some(_) => return Err(bad()),
    };
    let bytes: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    if headers.len() > MAX_RAISE_PARAMS || bytes > MAX_RAISE_BYTES {
        return Err(RpcError::new(
            400,
            format!("Bad Params: at most {MAX_RAISE_PARAMS} parameters of {MAX_RAISE_BYTES} bytes in all"),
        ));
    }
    let (name, subclass) = split_event(&event);
    let event = Event { name: name.to_string(), subclass: subclass.map(str::to_string), headers, body: None };
    bus.fire(event, Caller::host("raise_event"));
    Ok(Value::String("OK".into()))
}

/// OpenSIPS: numbers stay numbers, strings strings, anything else its JSON.
fn named(map: &Map<String, Value>) -> Vec<(String, String)> {
    map.iter().map(|(k, v)| (k.clone(), as_text(v).unwrap_or_else(|| v.to_string()))).collect()
}
