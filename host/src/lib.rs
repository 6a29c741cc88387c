//! evrhost: sandboxed WebAssembly components as event-route handlers.
//!
//! ```text
//! wire ─► frontend ─► dispatcher ─► runtime (plugin pools) ─► reply ─► wire
//! ```
//!
//! - [`runtime`]: wasmtime, compiled-code cache, plugin versions and pools.
//! - [`dispatcher`]: routes and commands to plugins; load, reload, unload.
//! - [`config`]: the TOML configuration, checked before anything runs.
//! - [`frontend`]: wire protocols (JSON-RPC 2.0 over HTTP).

pub mod config;
pub mod dispatcher;
pub mod frontend;
pub mod kv;
pub mod runtime;
