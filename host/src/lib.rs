//! evrhost: sandboxed WebAssembly components as event-route handlers.
//!
//! ```text
//! wire ─► frontend ─► dispatcher ─► runtime (plugin pools) ─► reply ─► wire
//!                         ▲               │ host imports
//!                         └──── bus ◄─────┘◄── core events
//! ```
//!
//! The parts, from the bottom up (each uses only those before it):
//! - [`sync`], [`error`], [`kv`]: small shared pieces.
//! - [`runtime`]: wasmtime, compiled-code cache, plugin versions and pools.
//! - [`config`]: the TOML configuration, checked before anything runs,
//!   stored as the runtime's and the front-ends' typed settings.
//! - [`bus`]: events, subscribers and their sinks, filters, log events.
//! - [`dispatcher`]: routes and commands to their handlers; load, reload,
//!   unload.
//! - [`builtins`], [`exec`], [`housekeeping`]: the host's own commands,
//!   exec tasks, periodic work.
//! - [`frontend`]: wire protocols (UDP, JSON-RPC over HTTP and UNIX
//!   sockets, the Erlang C-node, event sinks, metrics).
//! - [`guest`]: the plugin author's tools, `evrhost new` and `build`;
//!   of the parts above it uses only the runtime's `footprint`.
//! - [`daemon`]: wires them together; [`harness`]: the same in process,
//!   for tests.

pub mod builtins;
pub mod bus;
pub mod config;
pub mod daemon;
pub mod dispatcher;
pub mod error;
pub mod exec;
pub mod frontend;
pub mod guest;
pub mod harness;
pub mod housekeeping;
pub mod kv;
pub mod runtime;
pub mod sync;
