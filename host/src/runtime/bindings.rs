//! Host-side bindings generated from `wit/` (world `host-view`: every
//! export of `plugin`, `batch`, `datagrams` and `subscriber-batch`).
//!
//! The world lists every export a plugin may have; a plugin implements only
//! some, so the host never instantiates the world as a whole: it looks up
//! each export interface on its own (see `plugin::Exports`).

// Host functions are synchronous (cheaper per call) except those that
// wait: `commands.call` runs another plugin, `fetch.fetch` waits for an
// Erlang process, `messages.dispatch` waits for the engine's answer,
// `kv.*` may wait for a Redis server (in process they are ready at once,
// and `kv_import::add_local` shadows them with synchronous ones),
// and `host.sleep` (shadowed in `imports::add_sleep`) suspends a task.
wasmtime::component::bindgen!({
    world: "host-view",
    path: "../wit",
    imports: {
        "evrhost:plugin/commands.call": async,
        "evrhost:plugin/host.sleep": async,
        "evrhost:plugin/fetch.fetch": async,
        "evrhost:plugin/messages.dispatch": async,
        "evrhost:plugin/kv.get": async,
        "evrhost:plugin/kv.set": async,
        "evrhost:plugin/kv.delete": async,
        "evrhost:plugin/kv.incr": async,
    },
    exports: { default: async },
});

pub use self::evrhost::plugin::types::{
    Answer, CommandInfo, Event, HostError, Level, Message, MessageInfo, Origin, Peer, Reply, Request,
};
pub use self::exports::evrhost::plugin::datagrams::Packed;
pub use self::exports::evrhost::plugin::{api, batch, datagrams, route, subscriber, subscriber_batch, task};
