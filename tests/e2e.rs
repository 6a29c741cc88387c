//! End-to-end tests: the real `evrhost` binary, real wasm components built
//! from `plugins/`, real sockets.

mod e2e {
    pub mod aliases;
    pub mod cli;
    pub mod config_errors;
    pub mod erlang;
    pub mod events;
    pub mod evrexec;
    pub mod guest_builds;
    pub mod guests;
    pub mod kv;
    pub mod kv_backends;
    pub mod reload;
    pub mod rpc;
    pub mod sandbox;
    pub mod support;
    pub mod yate;
}

/// A fake Yate engine (protocols.md §1), for `e2e::yate` and the bench.
#[path = "yate/engine.rs"]
mod engine;
