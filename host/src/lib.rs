//! evrhost: sandboxed WebAssembly components as event-route handlers.
//!
//! ```text
//! wire ─► frontend ─► dispatcher ─► runtime (plugin pools) ─► reply ─► wire
//! ```
//!
//! - [`runtime`]: wasmtime, compiled-code cache, plugin versions and pools.
//! - [`dispatcher`]: routes and commands to plugins; load, reload, unload.
//! - [`bus`]: events, subscribers, filters, the host's own events.
//! - [`config`]: the TOML configuration, checked before anything runs.
//! - [`exec`]: exec tasks, as Kamailio's evrexec runs them.
//! - [`frontend`]: wire protocols (UDP, JSON-RPC 2.0 over HTTP and UNIX
//!   sockets, Prometheus metrics).

pub mod bus;
pub mod config;
pub mod dispatcher;
pub mod exec;
pub mod frontend;
pub mod housekeeping;
pub mod kv;
pub mod runtime;
