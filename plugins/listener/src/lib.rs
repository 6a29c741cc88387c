//! Subscribes, filters and fires events on request, and counts what it
//! receives: the event bus seen from a plugin.
//!
//! Routes, by the last dot-separated part of their name (`subscribe`,
//! `watcher.subscribe`, …); the request's data says what:
//! - `subscribe`: `NAME [SUBCLASS]`;
//! - `filter`: a mod_event_socket filter command, e.g. `add User alice`;
//! - `fire`: `SUBCLASS [KEY=VALUE;…]`, a CUSTOM event;
//! - `burst`: `N SUBCLASS BYTES`, N CUSTOM events with a BYTES-long header.
//!
//! Commands: `<id>.count NAME` (events received with that name, or
//! `CUSTOM:SUBCLASS`), `<id>.last NAME` (the last one's headers), where
//! `<id>` is the `[plugin.config] id` (default `listener`), so that two
//! listeners can share a tenant.

use evrhost_sdk::{config, events, export, kv, log, Api, CommandInfo, Event, Reply, Request, Route, Subscriber};

struct Listener;

fn id() -> String {
    config("id").unwrap_or_else(|| "listener".into())
}

fn key_of(event: &Event) -> String {
    match &event.subclass {
        Some(sub) => format!("CUSTOM:{sub}"),
        None => event.name.clone(),
    }
}

impl Route for Listener {
    fn handle(req: Request) -> Result<Reply, String> {
        let data = req.data_str().trim().to_string();
        let action = req.route.rsplit('.').next().unwrap_or_default();
        let result = match action {
            "subscribe" => {
                let (name, subclass) = data.split_once(' ').map_or((data.as_str(), None), |(n, s)| (n, Some(s.trim())));
                events::subscribe(name, subclass).map(|()| "subscribed".to_string())
            }
            "filter" => events::filter(&data),
            "fire" => {
                let (subclass, pairs) = data.split_once(' ').unwrap_or((data.as_str(), ""));
                let mut event = Event::custom(subclass);
                for pair in pairs.split(';').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    event = event.header(k.trim(), v.trim());
                }
                events::fire(&event).map(|()| "fired".to_string())
            }
            "burst" => {
                let mut words = data.split_whitespace();
                let n: usize = words.next().and_then(|w| w.parse().ok()).unwrap_or(1);
                let subclass = words.next().unwrap_or("burst");
                let bytes: usize = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                let padding = "p".repeat(bytes);
                let mut fired = 0;
                for i in 0..n {
                    let event = Event::custom(subclass).header("N", i.to_string()).header("Padding", padding.as_str());
                    if events::fire(&event).is_ok() {
                        fired += 1;
                    }
                }
                Ok(fired.to_string())
            }
            other => return Err(format!("unknown route {other}")),
        };
        result.map(|text| Reply::handled().retval(text)).map_err(|e| e.message())
    }
}

/// Counts `n` events of `key`, the last of them `last`.
fn received(id: &str, key: &str, n: usize, last: &Event) {
    let _ = kv::incr(&format!("{id}:count:{key}"), n as i64);
    let headers: Vec<String> = last.headers.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = kv::set(&format!("{id}:last:{key}"), headers.join("\n"));
    if last.name != "E_CORE_LOG" {
        match n {
            1 => log::info(&format!("{id} got {key}")),
            _ => log::info(&format!("{id} got {key} x{n}")),
        }
    }
}

impl Subscriber for Listener {
    fn on_event(event: Event) {
        received(&id(), &key_of(&event), 1, &event);
    }

    /// Once per name in the batch: one incr by the count, the last one's
    /// headers, one log line.
    fn on_events(events: Vec<Event>) {
        let id = id();
        let mut seen: Vec<(String, usize, usize)> = Vec::new();
        for (i, event) in events.iter().enumerate() {
            let key = key_of(event);
            match seen.iter_mut().find(|(k, _, _)| *k == key) {
                Some((_, n, last)) => (*n, *last) = (*n + 1, i),
                None => seen.push((key, 1, i)),
            }
        }
        for (key, n, last) in &seen {
            received(&id, key, *n, &events[*last]);
        }
    }
}

impl Api for Listener {
    fn commands() -> Vec<CommandInfo> {
        let id = id();
        vec![
            CommandInfo::new(&format!("{id}.count"), "NAME", "events received with NAME (or CUSTOM:SUBCLASS)"),
            CommandInfo::new(&format!("{id}.last"), "NAME", "the headers of the last such event"),
        ]
    }

    fn execute(command: String, args: String) -> Result<String, String> {
        let id = id();
        let name = args.trim();
        if command == format!("{id}.count") {
            return Ok(kv::get_string(&format!("{id}:count:{name}"))
                .map_err(|e| e.message())?
                .unwrap_or_else(|| "0".into()));
        }
        if command == format!("{id}.last") {
            return Ok(kv::get_string(&format!("{id}:last:{name}")).map_err(|e| e.message())?.unwrap_or_default());
        }
        Err(format!("unknown command {command}"))
    }
}

export!(Listener: route, api, subscriber);
