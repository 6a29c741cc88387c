//! Front-ends: each owns its sockets and translates one wire protocol into
//! dispatcher calls and back. They know nothing about wasmtime.

pub mod client;
pub mod erlang;
pub mod http;
pub mod jsonrpc;
pub mod metrics;
pub mod rpc_thread;
pub mod udp;
pub mod unix;
