//! Write evrhost plugins in Rust.
//!
//! A plugin is a type that implements one or more of the traits [`Route`],
//! [`Api`], [`Subscriber`] and [`Task`], exported with [`export!`]. The
//! component then exports exactly those interfaces, and evrhost binds routes,
//! commands, subscriptions and exec tasks to it accordingly.
//!
//! ```no_run
//! use evrhost_sdk::{export, kv, log, Reply, Request, Route};
//!
//! struct Hits;
//!
//! impl Route for Hits {
//!     fn handle(req: Request) -> Result<Reply, String> {
//!         let key = req.data_str();
//!         let n = kv::incr(&key, 1).map_err(|e| e.message())?;
//!         log::info(&format!("{key} seen {n} times"));
//!         Ok(Reply::handled().retval(n.to_string()))
//!     }
//! }
//!
//! export!(Hits: route);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` (crate type
//! `cdylib`) and try it with `evrhost call target/wasm32-wasip2/release/hits.wasm
//! myroute somekey`.
//!
//! Host calls that a plugin's configuration does not grant return
//! [`HostError::Denied`]; they never trap.

#![allow(clippy::missing_safety_doc)]

use std::borrow::Cow;

/// Bindings generated from `wit/`. Not part of the API: use the re-exports.
///
/// One `generate!` per export kind, each with `pub_export_macro`, so that a
/// world's export section lands in a plugin only when that plugin invokes
/// the export; the component then exports exactly what the plugin
/// implements. The shared interfaces are generated once (`imports`) and the
/// other worlds reuse them through `with`.
#[doc(hidden)]
pub mod __bindings {
    pub mod imports {
        wit_bindgen::generate!({
            world: "imports",
            path: "../wit",
        });
    }

    macro_rules! export_world {
        ($module:ident, $world:literal, $macro_name:literal, $bindings:literal) => {
            pub mod $module {
                wit_bindgen::generate!({
                    world: $world,
                    path: "../wit",
                    pub_export_macro: true,
                    export_macro_name: $macro_name,
                    default_bindings_module: $bindings,
                    with: {
                        "evrhost:plugin/types@0.2.0": crate::__bindings::imports::evrhost::plugin::types,
                        "evrhost:plugin/host@0.2.0": crate::__bindings::imports::evrhost::plugin::host,
                        "evrhost:plugin/kv@0.2.0": crate::__bindings::imports::evrhost::plugin::kv,
                        "evrhost:plugin/events@0.2.0": crate::__bindings::imports::evrhost::plugin::events,
                        "evrhost:plugin/commands@0.2.0": crate::__bindings::imports::evrhost::plugin::commands,
                        "evrhost:plugin/fetch@0.2.0": crate::__bindings::imports::evrhost::plugin::fetch,
                        "evrhost:plugin/messages@0.2.0": crate::__bindings::imports::evrhost::plugin::messages,
                    },
                });
            }
        };
    }

    export_world!(route, "route-handler", "export_route", "evrhost_sdk::__bindings::route");
    export_world!(api, "api-provider", "export_api", "evrhost_sdk::__bindings::api");
    export_world!(subscriber, "event-subscriber", "export_subscriber", "evrhost_sdk::__bindings::subscriber");
    export_world!(task, "startup-task", "export_task", "evrhost_sdk::__bindings::task");
}

use __bindings::imports::evrhost::plugin as wit;

pub use wit::types::{
    Answer, CommandInfo, Event, Headers, HostError, Level, Message, MessageInfo, Origin, Peer, Reply, Request,
};

/// Offers API commands. Export with `export!(T: api)`.
pub use __bindings::api::exports::evrhost::plugin::api::Guest as Api;
/// Handles calls of event routes. Export with `export!(T: route)`.
///
/// The component exports `batch` and `datagrams` too: requests that
/// arrived together come in one call of [`Route::handle_batch`], which by
/// default hands each to [`Route::handle`] in order, and the datagrams of
/// one UDP read in one call of [`Route::handle_datagrams`], which by
/// default makes them requests for `handle_batch`. Override `handle_batch`
/// to do work once per batch, e.g. to add up counters before one
/// `kv::incr` per key, and `handle_datagrams` to read a UDP read's
/// datagrams where they lie, with no request (and no allocation) each. A
/// batch is one call: a trap or a limit fails all of its requests.
pub trait Route {
    /// `Err` is a handler failure: reported to the caller, the instance
    /// stays usable.
    fn handle(request: Request) -> Result<Reply, String>;

    /// One result per request, in their order.
    fn handle_batch(requests: Vec<Request>) -> Vec<Result<Reply, String>> {
        requests.into_iter().map(Self::handle).collect()
    }

    /// One result per datagram, in their order.
    fn handle_datagrams(datagrams: Datagrams) -> Vec<Result<Reply, String>> {
        Self::handle_batch(datagrams.into_requests())
    }
}

/// The datagrams of one UDP read, packed as they came (see
/// [`Route::handle_datagrams`]).
pub struct Datagrams(__bindings::route::exports::evrhost::plugin::datagrams::Packed);

/// One datagram of a [`Datagrams`]: its bytes and its source.
#[derive(Clone, Copy, Debug)]
pub struct Datagram<'a> {
    pub data: &'a [u8],
    pub peer: &'a Peer,
}

impl Datagrams {
    #[doc(hidden)]
    pub fn __new(packed: __bindings::route::exports::evrhost::plugin::datagrams::Packed) -> Datagrams {
        Datagrams(packed)
    }

    /// The route they came for.
    pub fn route(&self) -> &str {
        &self.0.route
    }

    pub fn len(&self) -> usize {
        self.0.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.ends.is_empty()
    }

    /// Each datagram, in order. A source the host did not list (it never
    /// does that) reads as `0.0.0.0:0`.
    pub fn iter(&self) -> impl Iterator<Item = Datagram<'_>> + '_ {
        static NOWHERE: Peer = Peer { ip: String::new(), port: 0 };
        let mut start = 0;
        self.0.ends.iter().zip(&self.0.sources).map(move |(&end, &source)| {
            let end = end as usize;
            let data = self.0.data.get(start..end).unwrap_or_default();
            start = end;
            Datagram { data, peer: self.0.peers.get(usize::from(source)).unwrap_or(&NOWHERE) }
        })
    }

    /// A request for each, as `route.handle` would get it.
    pub fn into_requests(self) -> Vec<Request> {
        self.iter()
            .map(|d| Request {
                route: self.0.route.clone(),
                data: d.data.to_vec(),
                params: Vec::new(),
                origin: Origin::Udp(d.peer.clone()),
            })
            .collect()
    }
}
/// Receives subscribed events. Export with `export!(T: subscriber)`.
///
/// The component exports `subscriber-batch` too: events that queued up
/// while the last ones were being delivered come in one call of
/// [`Subscriber::on_events`], which by default hands each to
/// [`Subscriber::on_event`] in order. Override it to do work once per
/// batch, e.g. to add up counts before one `kv::incr` per key. A batch is
/// one call: a trap or a limit loses all of its events.
pub trait Subscriber {
    fn on_event(event: Event);

    /// The events in the order they were fired.
    fn on_events(events: Vec<Event>) {
        events.into_iter().for_each(Self::on_event)
    }
}
/// Runs as an exec task. Export with `export!(T: task)`.
pub use __bindings::task::exports::evrhost::plugin::task::Guest as Task;

/// Exports a type as a plugin: name the interfaces it implements, and the
/// component exports exactly those.
///
/// ```no_run
/// use evrhost_sdk::{export, Api, CommandInfo, Reply, Request, Route};
///
/// struct Counter;
///
/// impl Route for Counter {
///     fn handle(_req: Request) -> Result<Reply, String> {
///         Ok(Reply::handled())
///     }
/// }
///
/// impl Api for Counter {
///     fn commands() -> Vec<CommandInfo> {
///         vec![CommandInfo::new("counter.get", "KEY", "the count of KEY")]
///     }
///     fn execute(_command: String, _args: String) -> Result<String, String> {
///         Ok("0".into())
///     }
/// }
///
/// export!(Counter: route, api);
/// ```
#[macro_export]
macro_rules! export {
    ($ty:ident : $($kind:ident),+ $(,)?) => {
        $( $crate::__export_one!($kind, $ty); )+
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __export_one {
    (route, $ty:ident) => {
        impl $crate::__bindings::route::exports::evrhost::plugin::route::Guest for $ty {
            fn handle(request: $crate::Request) -> Result<$crate::Reply, String> {
                <$ty as $crate::Route>::handle(request)
            }
        }
        impl $crate::__bindings::route::exports::evrhost::plugin::batch::Guest for $ty {
            fn handle_batch(requests: Vec<$crate::Request>) -> Vec<Result<$crate::Reply, String>> {
                <$ty as $crate::Route>::handle_batch(requests)
            }
        }
        impl $crate::__bindings::route::exports::evrhost::plugin::datagrams::Guest for $ty {
            fn handle_datagrams(
                packed: $crate::__bindings::route::exports::evrhost::plugin::datagrams::Packed,
            ) -> Vec<Result<$crate::Reply, String>> {
                <$ty as $crate::Route>::handle_datagrams($crate::Datagrams::__new(packed))
            }
        }
        $crate::__export_route_handler_impl!($ty with_types_in $crate::__bindings::route);
    };
    (api, $ty:ident) => {
        $crate::__export_api_provider_impl!($ty with_types_in $crate::__bindings::api);
    };
    (subscriber, $ty:ident) => {
        impl $crate::__bindings::subscriber::exports::evrhost::plugin::subscriber::Guest for $ty {
            fn on_event(event: $crate::Event) {
                <$ty as $crate::Subscriber>::on_event(event)
            }
        }
        impl $crate::__bindings::subscriber::exports::evrhost::plugin::subscriber_batch::Guest for $ty {
            fn on_events(events: Vec<$crate::Event>) {
                <$ty as $crate::Subscriber>::on_events(events)
            }
        }
        $crate::__export_event_subscriber_impl!($ty with_types_in $crate::__bindings::subscriber);
    };
    (task, $ty:ident) => {
        $crate::__export_startup_task_impl!($ty with_types_in $crate::__bindings::task);
    };
    ($other:ident, $ty:ident) => {
        compile_error!(concat!(
            "evrhost_sdk::export!: unknown interface `",
            stringify!($other),
            "`; expected route, api, subscriber or task"
        ));
    };
}

/// The value of the first header named `name` (ASCII case-insensitive).
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

impl Request {
    /// The payload as text; invalid UTF-8 is replaced.
    pub fn data_str(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.data)
    }

    /// A named parameter (ASCII case-insensitive).
    pub fn param(&self, name: &str) -> Option<&str> {
        header(&self.params, name)
    }

    /// The Yate message this request carries (its name, id, time and
    /// return value so far); `None` for other front-ends.
    pub fn message(&self) -> Option<&MessageInfo> {
        match &self.origin {
            Origin::Yate(info) => Some(info),
            _ => None,
        }
    }
}

impl Reply {
    /// A reply that stops dispatch of the route.
    pub fn handled() -> Self {
        Reply { handled: true, retval: String::new(), params: Vec::new(), unset: Vec::new(), data: None }
    }

    /// A reply that lets the route's next handler run.
    pub fn declined() -> Self {
        Reply { handled: false, ..Self::handled() }
    }

    pub fn retval(mut self, retval: impl Into<String>) -> Self {
        self.retval = retval.into();
        self
    }

    /// Sets a parameter (for Yate: of the message being answered).
    pub fn param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.push((name.into(), value.into()));
        self
    }

    /// Deletes a parameter of the message being answered (Yate's bare
    /// `key`); other front-ends ignore it.
    pub fn unset(mut self, name: impl Into<String>) -> Self {
        self.unset.push(name.into());
        self
    }

    /// Bytes for the front-end to send back (a UDP reply datagram, say).
    pub fn data(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.data = Some(data.into());
        self
    }
}

impl Event {
    pub fn new(name: impl Into<String>) -> Self {
        Event { name: name.into(), subclass: None, headers: Vec::new(), body: None }
    }

    /// A CUSTOM event with this subclass.
    pub fn custom(subclass: impl Into<String>) -> Self {
        Event { subclass: Some(subclass.into()), ..Self::new("CUSTOM") }
    }

    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn body(mut self, body: impl Into<String>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// The value of a header (ASCII case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

impl HostError {
    /// What went wrong, for people: `denied: …`, `invalid: …`. (The
    /// `Display` that wit-bindgen derives prints the variant's `Debug`.)
    pub fn message(&self) -> String {
        match self {
            HostError::Denied(m) => format!("denied: {m}"),
            HostError::Invalid(m) => format!("invalid: {m}"),
            HostError::NotFound(m) => format!("not found: {m}"),
            HostError::Failed(m) => format!("failed: {m}"),
        }
    }
}

impl CommandInfo {
    pub fn new(name: &str, usage: &str, description: &str) -> Self {
        CommandInfo { name: name.into(), usage: usage.into(), description: description.into() }
    }
}

/// Logging to the plugin's log (tagged by the host with plugin, tenant and
/// route).
pub mod log {
    use super::{wit::host, Level};

    pub fn log(level: Level, message: &str) {
        host::log(level, message)
    }
    pub fn debug(message: &str) {
        host::log(Level::Debug, message)
    }
    pub fn info(message: &str) {
        host::log(Level::Info, message)
    }
    pub fn notice(message: &str) {
        host::log(Level::Notice, message)
    }
    pub fn warn(message: &str) {
        host::log(Level::Warn, message)
    }
    pub fn error(message: &str) {
        host::log(Level::Error, message)
    }
}

/// The tenant's key-value store.
pub mod kv {
    use super::{wit::kv, HostError};

    pub fn get(key: &str) -> Result<Option<Vec<u8>>, HostError> {
        kv::get(key)
    }
    /// The value as text; invalid UTF-8 is replaced.
    pub fn get_string(key: &str) -> Result<Option<String>, HostError> {
        Ok(kv::get(key)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }
    pub fn set(key: &str, value: impl AsRef<[u8]>) -> Result<(), HostError> {
        kv::set(key, value.as_ref())
    }
    /// True when the key existed.
    pub fn delete(key: &str) -> Result<bool, HostError> {
        kv::delete(key)
    }
    /// Adds `delta` to a decimal counter (absent = 0); returns the new value.
    pub fn incr(key: &str, delta: i64) -> Result<i64, HostError> {
        kv::incr(key, delta)
    }
}

/// The event bus.
pub mod events {
    use super::{wit::events, Event, HostError};

    pub fn fire(event: &Event) -> Result<(), HostError> {
        events::fire(event)
    }
    /// Matching events arrive at the plugin's [`Subscriber`](crate::Subscriber).
    pub fn subscribe(name: &str, subclass: Option<&str>) -> Result<(), HostError> {
        events::subscribe(name, subclass)
    }
    pub fn unsubscribe(name: &str, subclass: Option<&str>) -> Result<bool, HostError> {
        events::unsubscribe(name, subclass)
    }
    /// A mod_event_socket filter command: `add Unique-ID 1234`,
    /// `add Event-Subclass /^acme::/`, `add Caller -spam`, `delete all`.
    pub fn filter(command: &str) -> Result<String, HostError> {
        events::filter(command)
    }
}

impl Message {
    pub fn new(name: impl Into<String>) -> Self {
        Message { name: name.into(), retvalue: String::new(), params: Vec::new() }
    }

    pub fn retvalue(mut self, retvalue: impl Into<String>) -> Self {
        self.retvalue = retvalue.into();
        self
    }

    pub fn param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.push((name.into(), value.into()));
        self
    }
}

impl Answer {
    /// A parameter of the answered message (ASCII case-insensitive).
    pub fn param(&self, name: &str) -> Option<&str> {
        header(&self.params, name)
    }
}

/// Messages to the telephony engine evrhost is a module of (Yate).
///
/// ```no_run
/// use evrhost_sdk::{messages, Message};
///
/// let answer = messages::dispatch(&Message::new("chan.masquerade").param("id", "sip/1")).unwrap();
/// if answer.handled {
///     evrhost_sdk::log::info(&format!("done: {}", answer.retvalue));
/// }
/// messages::enqueue(&Message::new("call.drop").param("id", "sip/2")).unwrap();
/// ```
pub mod messages {
    use super::{wit::messages, Answer, HostError, Message};

    /// Dispatches `message` in the engine and waits for its answer.
    /// [`HostError::NotFound`] when no engine is attached,
    /// [`HostError::Failed`] when it does not answer in time.
    pub fn dispatch(message: &Message) -> Result<Answer, HostError> {
        messages::dispatch(message)
    }

    /// Enqueues `message` in the engine; no answer comes back.
    pub fn enqueue(message: &Message) -> Result<(), HostError> {
        messages::enqueue(message)
    }
}

/// A value from the plugin's `[plugin.config]` table.
pub fn config(key: &str) -> Option<String> {
    wit::host::config(key)
}

/// Microseconds since the Unix epoch, from the host's clock.
pub fn now_us() -> u64 {
    wit::host::now()
}

/// Suspends an exec task; fuel and deadline are renewed afterwards.
/// Outside a task the host refuses with [`HostError::Denied`].
pub fn sleep(duration: std::time::Duration) -> Result<(), HostError> {
    let ms = u32::try_from(duration.as_millis()).unwrap_or(u32::MAX);
    wit::host::sleep(ms)
}

/// Calls an API command: a host built-in or one another plugin exports.
pub fn call(command: &str, args: &str) -> Result<String, HostError> {
    wit::commands::call(command, args)
}

/// Asks the Erlang processes bound to `section` (`directory`, `dialplan`,
/// …) for a document, as FreeSWITCH's XML bindings do; the first answer
/// wins. [`HostError::NotFound`] when no process is bound,
/// [`HostError::Failed`] when none answers in time.
///
/// ```no_run
/// let params = [("user".to_string(), "1000".to_string())];
/// match evrhost_sdk::fetch("directory", "domain", "name", "example.com", &params) {
///     Ok(xml) => assert!(xml.starts_with('<')),
///     Err(e) => evrhost_sdk::log::warn(&format!("no directory: {}", e.message())),
/// }
/// ```
pub fn fetch(
    section: &str,
    tag: &str,
    key: &str,
    value: &str,
    params: &[(String, String)],
) -> Result<String, HostError> {
    wit::fetch::fetch(section, tag, key, value, params)
}
