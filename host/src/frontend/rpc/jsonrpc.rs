//! JSON-RPC 2.0, independent of the transport: a request document in, a
//! response document out (none for notifications).
//!
//! Kamailio compatibility: `evrexec.run NAME [DATA]` answers `{}` on
//! success, error 500 "Invalid parameters" without a name, and error 500
//! "Event route not found" for an unknown route. Parameters may be an array
//! or an object; of an object only the order of the values counts, as in
//! Kamailio's jsonrpcs. Protocol errors use the standard codes (-32700,
//! -32600, -32601, -32602).

use std::sync::Arc;

use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

pub(super) use super::params::Params;
pub use super::params::RpcError;
use crate::config::{CodeSource, PluginDef, RouteDef, RpcSettings};
use crate::dispatcher::{DispatchError, Dispatcher};
use crate::frontend::event_sinks::EventSinks;
use crate::runtime::{Origin, Request};

/// What the methods answer with: the dispatcher, and the settings that
/// bound what a caller may ask for.
pub struct Server {
    pub dispatcher: Arc<Dispatcher>,
    pub settings: RpcSettings,
    pub sinks: Arc<EventSinks>,
}

/// A plugin given by path over RPC may come only from the plugin
/// directories: JSON-RPC must not read any file of the host.
fn confined(settings: &RpcSettings, mut def: PluginDef) -> Result<PluginDef, RpcError> {
    if let CodeSource::File(path) = &def.code {
        let path = settings.confine(path).map_err(|e| RpcError::new(-32602, e.0))?;
        def.spec.source = path.display().to_string();
        def.code = CodeSource::File(path);
    }
    Ok(def)
}

/// Requests in one batch; more is refused as a whole.
const MAX_BATCH: usize = 1000;

/// Every method, with its usage, for `system.listMethods` and the docs.
pub fn methods() -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    METHODS.iter().chain(super::event_methods::METHODS.iter()).chain(super::kv_methods::METHODS.iter())
}

/// The methods answered here (`kv_methods` has the rest).
const METHODS: [(&str, &str); 20] = [
    ("evrexec.run", "NAME [DATA] — run an event route; {} on success (Kamailio)"),
    ("route.run", "NAME [DATA] [PARAMS] — run a route; the reply, plugin, fuel and time"),
    ("api.run", "COMMAND [ARGS…] — run an API command (built-in or a plugin's)"),
    ("api.list", "— the API commands"),
    ("api.bgrun", "COMMAND [ARGS…] — run a command in the background: its Job-UUID now, a BACKGROUND_JOB event later"),
    ("plugin.list", "— the loaded plugins"),
    ("plugin.stats", "[NAME] — calls, errors by cause, time and fuel"),
    ("plugin.load", "NAME PATH — load a plugin with default limits"),
    ("plugin.reload", "NAME [PATH] — load a new version and swap it in atomically"),
    ("plugin.unload", "NAME — remove a plugin and its routes"),
    (
        "plugin.trace",
        "NAME on|off — log each host import its calls make (name, arguments, result, time), as app_lua's log_mode",
    ),
    ("route.list", "— the routes and their handlers"),
    ("route.add", "NAME PLUGIN [PRIORITY] — bind a loaded plugin to a route (priority 100)"),
    ("route.remove", "NAME PLUGIN — unbind a plugin from a route"),
    ("app_lua.list", "— Kamailio: one `N: [SOURCE]` line per plugin, or \"No scripts loaded\""),
    ("app_lua.reload", "[N] — Kamailio: reload plugin N of app_lua.list, or all; {} or 500 \"Reload Failed\""),
    ("core.version", "— the version"),
    ("core.uptime", "— seconds since start"),
    ("system.listMethods", "— these methods"),
    ("system.methodHelp", "METHOD — the usage of one method"),
];

/// Answers one JSON-RPC document given as bytes. `None` when there is
/// nothing to send back (only notifications).
pub async fn handle(s: &Server, body: &[u8]) -> Option<Vec<u8>> {
    if let Some(plain) = PlainCall::read(body) {
        return plain.answer(s).await;
    }
    let response = match serde_json::from_slice(body) {
        Ok(doc) => handle_value(s, doc).await?,
        Err(e) => parse_error(&e.to_string()),
    };
    Some(encode(&response))
}

/// The response to a document that is not JSON.
pub fn parse_error(detail: &str) -> Value {
    failure(Value::Null, RpcError::new(-32700, format!("Parse error: {detail}")))
}

/// Answers one parsed document: a request or a batch.
pub async fn handle_value(s: &Server, doc: Value) -> Option<Value> {
    match doc {
        Value::Array(items) if items.is_empty() || items.len() > MAX_BATCH => Some(failure(
            Value::Null,
            RpcError::new(-32600, format!("Invalid Request: a batch holds 1 to {MAX_BATCH} requests")),
        )),
        Value::Array(items) => {
            let mut out = Vec::new();
            for item in items {
                if let Some(response) = handle_one(s, item).await {
                    out.push(response);
                }
            }
            (!out.is_empty()).then_some(Value::Array(out))
        }
        single => handle_one(s, single).await,
    }
}

/// A request in the shape nearly every client sends — an object with
/// `"jsonrpc": "2.0"`, a string `method`, `params` an array (or absent) and
/// `id` a number, a string or null (or absent) — read without building a
/// `Value` tree for the document, and answered with the id's own text.
/// Everything else (a batch, params as an object, a field of a wrong type,
/// a duplicate key, an escaped `"2.0"`) takes the general path, which
/// names each fault; for these shapes both paths give the same answer.
///
/// Why: a round trip's parse and encode measured ~3 µs through `Value`
/// trees, a tenth of an `evrexec.run` round trip.
#[derive(serde::Deserialize)]
struct PlainCall<'a> {
    jsonrpc: &'a str,
    #[serde(borrow)]
    method: std::borrow::Cow<'a, str>,
    #[serde(default, borrow, deserialize_with = "present")]
    params: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    id: Option<&'a RawValue>,
}

/// A field that is present, `null` included (serde reads `null` as an
/// absent `Option` otherwise, and a null id is not a notification).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue as serde::Deserialize>::deserialize(d).map(Some)
}

impl PlainCall<'_> {
    fn read(body: &[u8]) -> Option<PlainCall<'_>> {
        let call: PlainCall = serde_json::from_slice(body).ok()?;
        let id_ok = call.id.is_none_or(|id| {
            let text = id.get();
            text == "null" || text.starts_with(|c: char| c == '"' || c == '-' || c.is_ascii_digit())
        });
        let params_ok = call.params.is_none_or(|p| p.get().starts_with('['));
        (call.jsonrpc == "2.0" && id_ok && params_ok).then_some(call)
    }

    async fn answer(self, s: &Server) -> Option<Vec<u8>> {
        let params = match self.params {
            None => Vec::new(),
            Some(raw) => match serde_json::from_str(raw.get()) {
                Ok(items) => items,
                // `read` saw an array; RawValue checked it is well-formed.
                Err(e) => return Some(encode(&parse_error(&e.to_string()))),
            },
        };
        let result = call(s, &self.method, Params::positional(params)).await;
        let id = self.id?.get();
        let mut out = Vec::with_capacity(64);
        match result {
            Ok(result) => {
                out.extend_from_slice(br#"{"jsonrpc":"2.0","result":"#);
                // Serializing a `Value` into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut out, &result);
            }
            Err(e) => {
                out.extend_from_slice(br#"{"jsonrpc":"2.0","error":"#);
                let _ = serde_json::to_writer(&mut out, &json!({"code": e.code, "message": e.message}));
            }
        }
        out.extend_from_slice(br#","id":"#);
        out.extend_from_slice(id.as_bytes());
        out.push(b'}');
        Some(out)
    }
}

fn encode(v: &Value) -> Vec<u8> {
    // Serializing a `Value` cannot fail: its keys are strings.
    serde_json::to_vec(v).unwrap_or_default()
}

fn failure(id: Value, e: RpcError) -> Value {
    json!({"jsonrpc": "2.0", "error": {"code": e.code, "message": e.message}, "id": id})
}

async fn handle_one(s: &Server, request: Value) -> Option<Value> {
    let Value::Object(mut obj) = request else {
        return Some(failure(Value::Null, RpcError::new(-32600, "Invalid Request: not an object")));
    };
    let id = obj.remove("id");
    let id_value = id.clone().unwrap_or(Value::Null);
    if !matches!(id_value, Value::Null | Value::Number(_) | Value::String(_)) {
        return Some(failure(Value::Null, RpcError::new(-32600, "Invalid Request: id must be a number or a string")));
    }
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Some(failure(id_value, RpcError::new(-32600, "Invalid Request: jsonrpc must be \"2.0\"")));
    }
    let Some(method) = obj.get("method").and_then(Value::as_str).map(str::to_string) else {
        return Some(failure(id_value, RpcError::new(-32600, "Invalid Request: method must be a string")));
    };
    let params = match obj.remove("params") {
        None => Params::positional(Vec::new()),
        Some(Value::Array(items)) => Params::positional(items),
        Some(Value::Object(map)) => Params::named(map),
        Some(_) => {
            return Some(failure(id_value, RpcError::new(-32602, "Invalid params: must be an array or an object")))
        }
    };
    let result = call(s, &method, params).await;
    // A request without an id is a notification: no response, even on error.
    id.as_ref()?;
    Some(match result {
        Ok(result) => json!({"jsonrpc": "2.0", "result": result, "id": id_value}),
        Err(e) => failure(id_value, e),
    })
}

fn dispatch_error(e: DispatchError) -> RpcError {
    let code = match &e {
        DispatchError::RouteNotFound(_)
        | DispatchError::CommandNotFound(_)
        | DispatchError::PluginNotFound(_)
        | DispatchError::RouteHandlerNotFound { .. } => 404,
        _ => 500,
    };
    RpcError::new(code, crate::error::chain(&e))
}

async fn call(s: &Server, method: &str, p: Params) -> Result<Value, RpcError> {
    let d = &s.dispatcher;
    match method {
        "evrexec.run" => {
            let Some(name) = p.text(0) else { return Err(RpcError::new(500, "Invalid parameters")) };
            let data = p.text(1).unwrap_or_default();
            let request = Request { route: name, data: data.into_bytes(), params: Vec::new(), origin: Origin::Rpc };
            // Kamailio answers every failure with 500: "Event route not
            // found", or here the call's cause.
            d.run_route(&request).await.map(|_| json!({})).map_err(|e| RpcError::new(500, crate::error::chain(&e)))
        }
        "route.run" => {
            let name = p.required(0, "route name")?;
            let data = p.text(1).unwrap_or_default();
            let params = match p.get(2) {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Object(map)) => map
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_string)))
                    .collect(),
                Some(_) => return Err(RpcError::new(-32602, "Invalid params: params (object) expected at position 2")),
            };
            let request = Request { route: name, data: data.into_bytes(), params, origin: Origin::Rpc };
            let outcome = d.run_route(&request).await.map_err(dispatch_error)?;
            let r = &outcome.reply;
            let params: Map<String, Value> =
                r.params.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
            Ok(json!({
                "handled": r.handled,
                "retval": r.retval,
                "params": params,
                "data": r.data.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()),
                "plugin": &*outcome.plugin,
                "fuel": outcome.report.fuel,
                "time_us": outcome.report.elapsed.as_micros() as u64,
            }))
        }
        "api.run" => {
            let command = p.required(0, "command")?;
            let args = p.rest(1);
            let text = d.run_command(&command, &args.join(" "), 0).await.map_err(dispatch_error)?;
            Ok(Value::String(text))
        }
        "api.list" => Ok(Value::Array(
            d.commands()
                .into_iter()
                .map(|c| json!({"name": c.name, "usage": c.usage, "description": c.description}))
                .collect(),
        )),
        "api.bgrun" => {
            let command = p.required(0, "command")?;
            let args = p.rest(1);
            let job = uuid::Uuid::new_v4().to_string();
            let (d2, reply_job) = (d.clone(), job.clone());
            d.bus().spawn(async move {
                let caller = crate::bus::Caller::host("api.bgrun");
                let failure = |_: &str, e: &DispatchError| format!("-ERR {}", crate::error::chain(e));
                d2.run_background(&job, &command, &args.join(" "), &caller, failure).await;
            });
            Ok(json!({"job_uuid": reply_job}))
        }
        "plugin.list" => Ok(serde_json::to_value(d.plugins()).unwrap_or(Value::Null)),
        "plugin.stats" => {
            let only = p.text(0);
            let stats: Map<String, Value> = d
                .plugins()
                .into_iter()
                .filter(|info| only.as_ref().is_none_or(|n| *n == info.name))
                .map(|info| (info.name, serde_json::to_value(info.stats).unwrap_or(Value::Null)))
                .collect();
            if let (Some(name), true) = (&only, stats.is_empty()) {
                return Err(dispatch_error(DispatchError::PluginNotFound(name.clone())));
            }
            Ok(Value::Object(stats))
        }
        "plugin.load" => {
            let name = p.required(0, "plugin name")?;
            let path = p.required(1, "path")?;
            let def = PluginDef::with_defaults(&name, &path).map_err(|m| RpcError::new(-32602, m.0))?;
            let def = confined(&s.settings, def)?;
            let v = d.load(def).await.map_err(dispatch_error)?;
            Ok(
                json!({"name": name, "hash": v.short_hash(), "exports": v.exports().iter().map(|e| e.name()).collect::<Vec<_>>()}),
            )
        }
        "plugin.reload" => {
            let name = p.required(0, "plugin name")?;
            let code = match p.text(1) {
                Some(path) => {
                    let def = PluginDef::with_defaults(&name, &path).map_err(|m| RpcError::new(-32602, m.0))?;
                    Some(confined(&s.settings, def)?.code)
                }
                None => None,
            };
            let started = std::time::Instant::now();
            let v = d.reload(&name, code).await.map_err(dispatch_error)?;
            Ok(json!({"name": name, "hash": v.short_hash(), "ms": started.elapsed().as_secs_f64() * 1e3}))
        }
        "plugin.unload" => {
            let name = p.required(0, "plugin name")?;
            let routes = d.unload(&name).await.map_err(dispatch_error)?;
            Ok(json!({"name": name, "routes_removed": routes}))
        }
        "plugin.trace" => {
            let name = p.required(0, "plugin name")?;
            let on = match p.text(1).as_deref() {
                Some("on" | "1" | "true") => true,
                Some("off" | "0" | "false") => false,
                _ => return Err(RpcError::new(-32602, "Invalid params: on or off expected at position 1")),
            };
            d.set_trace(&name, on).map_err(dispatch_error)?;
            Ok(json!({"name": name, "trace": on}))
        }
        "route.list" => Ok(serde_json::to_value(d.routes()).unwrap_or(Value::Null)),
        "route.add" => {
            let name = p.required(0, "route name")?;
            let plugin = p.required(1, "plugin name")?;
            if name.is_empty() || name.len() > 256 {
                return Err(RpcError::new(-32602, "Invalid params: a route name is 1 to 256 bytes"));
            }
            let priority = match p.get(2) {
                None | Some(Value::Null) => 100,
                Some(v) => v
                    .as_i64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                    .and_then(|n| i32::try_from(n).ok())
                    .ok_or_else(|| RpcError::new(-32602, "Invalid params: priority must be a 32-bit number"))?,
            };
            let def = RouteDef { name: name.clone(), plugin: plugin.clone(), priority };
            d.add_route(def).await.map_err(dispatch_error)?;
            Ok(json!({"route": name, "plugin": plugin, "priority": priority}))
        }
        "route.remove" => {
            let name = p.required(0, "route name")?;
            let plugin = p.required(1, "plugin name")?;
            d.remove_route(&name, &plugin).await.map_err(dispatch_error)?;
            Ok(json!({"route": name, "plugin": plugin}))
        }
        "core.version" => Ok(Value::String(format!("evrhost {}", env!("CARGO_PKG_VERSION")))),
        "core.uptime" => Ok(json!({"uptime": d.uptime().as_secs()})),
        "system.listMethods" => Ok(Value::Array(methods().map(|(m, _)| Value::String(m.to_string())).collect())),
        "system.methodHelp" => {
            let m = p.required(0, "method")?;
            methods()
                .find(|(name, _)| *name == m)
                .map(|(_, usage)| Value::String(usage.to_string()))
                .ok_or_else(|| RpcError::new(-32601, format!("Method Not Found: {m}")))
        }
        "app_lua.list" => {
            let lines: Vec<String> =
                d.plugins().iter().enumerate().map(|(i, p)| format!("{i}: [{}]", p.source)).collect();
            Ok(Value::String(if lines.is_empty() { "No scripts loaded".into() } else { lines.join("\n") }))
        }
        "app_lua.reload" => {
            // Kamailio: an absent position (-1) reloads every script.
            let plugins = d.plugins();
            let chosen = match p.get(0).and_then(|v| v.as_i64().or_else(|| v.as_str()?.parse().ok())) {
                None | Some(-1) => plugins.iter().collect::<Vec<_>>(),
                Some(i) => usize::try_from(i).ok().and_then(|i| plugins.get(i)).into_iter().collect(),
            };
            if chosen.is_empty() {
                return Err(RpcError::new(500, "Reload Failed"));
            }
            for plugin in chosen {
                d.reload(&plugin.name, None).await.map_err(|_| RpcError::new(500, "Reload Failed"))?;
            }
            Ok(json!({}))
        }
        kv if kv.starts_with("kv.") => super::kv_methods::call(d, kv, &p).await,
        other => match super::event_methods::call(s, other, &p).await {
            Some(answer) => answer,
            None => Err(RpcError::new(-32601, format!("Method Not Found: {method}"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::runtime::Runtime;

    async fn dispatcher() -> Server {
        let mut config = Config::empty();
        config.cache_dir = None;
        let runtime = Runtime::new(config.engine.clone(), None).expect("the engine builds");
        let d = Dispatcher::start(runtime, &config).await.expect("an empty dispatcher starts");
        crate::builtins::install(&d).await.expect("the built-in commands install");
        Server { dispatcher: d, settings: RpcSettings::none(), sinks: Arc::default() }
    }

    /// The answer the general path gives.
    async fn general(d: &Server, doc: &str) -> Option<Value> {
        let doc: Value = serde_json::from_str(doc).expect("test documents are JSON");
        handle_value(d, doc).await
    }

    #[tokio::test]
    async fn plain_calls_answer_as_the_general_path_does() {
        let d = dispatcher().await;
        let plain = [
            r#"{"jsonrpc":"2.0","method":"core.version","id":1}"#,
            r#"{"id":"a\"b","method":"system.methodHelp","params":["evrexec.run"],"jsonrpc":"2.0"}"#,
            r#"{"jsonrpc":"2.0","method":"system.methodHelp","params":[],"id":null}"#,
            r#"{"jsonrpc":"2.0","method":"no.such","params":[1,true],"id":-7}"#,
            r#"{"jsonrpc":"2.0","method":"evrexec.run","params":["nowhere","data"],"id":2,"extra":{}}"#,
            r#"{"jsonrpc":"2.0","method":"evrexec.run","id":3}"#,
            r#" {"jsonrpc" : "2.0", "method" : "api.run", "params" : ["status"], "id" : 4} "#,
        ];
        for doc in plain {
            assert!(PlainCall::read(doc.as_bytes()).is_some(), "{doc} should take the plain path");
            let fast = handle(&d, doc.as_bytes()).await.expect("a request with an id is answered");
            let fast: Value = serde_json::from_slice(&fast).expect("the answer is JSON");
            assert_eq!(Some(fast), general(&d, doc).await, "{doc}");
        }
        // A notification is run and not answered, on either path.
        let note = r#"{"jsonrpc":"2.0","method":"core.uptime"}"#;
        assert!(PlainCall::read(note.as_bytes()).is_some());
        assert_eq!(handle(&d, note.as_bytes()).await, None);

        let batch = r#"[{"jsonrpc":"2.0","method":"core.version","id":1}]"#;
        assert!(PlainCall::read(batch.as_bytes()).is_none());
        let answer: Value = serde_json::from_slice(&handle(&d, batch.as_bytes()).await.expect("answered")).unwrap();
        assert_eq!(answer[0]["result"], format!("evrhost {}", env!("CARGO_PKG_VERSION")));

        // Valid, but not plain: params by name, an escaped version, a
        // duplicate key (the last one counts, as serde_json's maps keep it).
        for doc in [
            r#"{"jsonrpc":"2.0","method":"core.version","method":"system.methodHelp","params":["core.uptime"],"id":1}"#,
            r#"{"jsonrpc":"2.0","method":"system.methodHelp","params":{"m":"core.uptime"},"id":1}"#,
            r#"{"jsonrpc":"2\u002e0","method":"system.methodHelp","params":["core.uptime"],"id":1}"#,
        ] {
            assert!(PlainCall::read(doc.as_bytes()).is_none(), "{doc}");
            let answer: Value = serde_json::from_slice(&handle(&d, doc.as_bytes()).await.expect("answered")).unwrap();
            assert_eq!(answer["result"], "— seconds since start", "{doc}");
        }

        // Each of these is refused, by the general path.
        let general_only = [
            r#"{"jsonrpc":"2.0","method":"core.version","params":null,"id":1}"#,
            r#"{"jsonrpc":"2.0","method":"core.version","params":"x","id":1}"#,
            r#"{"jsonrpc":"2.0","method":"core.version","id":[1]}"#,
            r#"{"jsonrpc":"2.0","method":"core.version","id":true}"#,
            r#"{"jsonrpc":"1.0","method":"core.version","id":1}"#,
            r#"{"jsonrpc":"2.0","method":5,"id":1}"#,
            r#"{"jsonrpc":"2.0","id":1}"#,
            r#"{"jsonrpc":"2.0","method":"core.version","id":1"#,
            r#"42"#,
        ];
        for doc in general_only {
            assert!(PlainCall::read(doc.as_bytes()).is_none(), "{doc} should take the general path");
            let answer = handle(&d, doc.as_bytes()).await.expect("every one of these is answered");
            let answer: Value = serde_json::from_slice(&answer).expect("the answer is JSON");
            assert!(answer["error"]["code"].is_i64(), "{doc}: {answer}");
        }
    }
}
