//! The `kv` import. A call on the in-process backends (memory, embedded)
//! never waits, so for those the linker holds synchronous definitions
//! ([`add_local`]) over bindgen's async ones: a host call without a boxed
//! future, a blocking context or a fiber switch, which is most of what a
//! counter costs. The async definitions serve Redis, where a call waits for
//! the server within what is left of the call's deadline.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::Linker;
use wasmtime::StoreContextMut;

use super::bindings::evrhost::plugin::kv;
use super::bindings::HostError;
use super::contract::interface;
use super::imports::denied;
use super::state::HostState;
use super::trace::traced;
use crate::kv::{KvError, KvSpace, LocalSpace, Ticket};

fn kv_error(e: KvError) -> HostError {
    match e {
        KvError::Full { .. } | KvError::OverBudget { .. } | KvError::Unavailable { .. } => {
            HostError::Failed(e.to_string())
        }
        _ => HostError::Invalid(e.to_string()),
    }
}

impl HostState {
    /// The plugin's kv space, if granted, and what is left of the call's
    /// deadline (a remote store's command must not outlast it).
    fn kv_space(&self) -> Result<(Arc<KvSpace>, Duration), HostError> {
        if !self.plugin.spec.capabilities.kv {
            return Err(denied("kv"));
        }
        let plugin = &self.plugin;
        let left_ticks = self.call.deadline_tick.saturating_sub(plugin.ticks.now());
        let left = plugin.spec.limits.deadline.mul_f64(left_ticks as f64 / plugin.deadline_ticks.max(1) as f64);
        Ok((plugin.kv.clone(), left))
    }

    /// A kv operation's result; its ticket joins the call's, which the
    /// call's reply waits on.
    fn settle<T>(&mut self, (result, ticket): (Result<T, KvError>, Ticket)) -> Result<T, HostError> {
        self.call.kv_ticket = self.call.kv_ticket.max(ticket);
        result.map_err(kv_error)
    }
}

/// Runs `op`, bounded by `left` when the store is remote.
async fn within<T>(
    space: &KvSpace,
    left: Duration,
    op: impl std::future::Future<Output = (Result<T, KvError>, Ticket)>,
) -> (Result<T, KvError>, Ticket) {
    if space.is_local() {
        return op.await;
    }
    match tokio::time::timeout(left, op).await {
        Ok(done) => done,
        Err(_) => (Err(KvError::Unavailable { reason: "no answer before the call's deadline".into() }), Ticket::NONE),
    }
}

impl kv::Host for HostState {
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, HostError> {
        traced!(self, "kv.get", [key], async {
            let (space, left) = self.kv_space()?;
            let done = within(&space, left, space.get(&key)).await;
            self.settle(done)
        })
    }

    async fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), HostError> {
        let traced = self.trace_begin(&[&key, &value]);
        let result = async {
            let (space, left) = self.kv_space()?;
            let done = within(&space, left, space.set(&key, value)).await;
            self.settle(done)
        }
        .await;
        self.trace_end("kv.set", traced, &result);
        result
    }

    async fn delete(&mut self, key: String) -> Result<bool, HostError> {
        traced!(self, "kv.delete", [key], async {
            let (space, left) = self.kv_space()?;
            let done = within(&space, left, space.delete(&key)).await;
            self.settle(done)
        })
    }

    async fn incr(&mut self, key: String, delta: i64) -> Result<i64, HostError> {
        traced!(self, "kv.incr", [key, delta], async {
            let (space, left) = self.kv_space()?;
            let done = within(&space, left, space.incr(&key, delta)).await;
            self.settle(done)
        })
    }
}

impl HostState {
    /// The plugin's in-process space, if granted (the linker that calls
    /// this is used only for plugins whose space is one).
    fn local_kv(&self) -> Result<&LocalSpace, HostError> {
        if !self.plugin.spec.capabilities.kv {
            return Err(denied("kv"));
        }
        self.plugin.kv.local().ok_or_else(|| HostError::Failed("the kv store is not in this process".into()))
    }
}

/// Shadows the `kv` functions with synchronous ones, for a linker whose
/// plugins all have an in-process space. Each is traced and settled as
/// the async one.
pub(crate) fn add_local(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut kv = linker.instance(interface!("kv"))?;
    kv.func_wrap("get", |mut store: StoreContextMut<'_, HostState>, (key,): (String,)| {
        let state = store.data_mut();
        Ok((traced!(state, "kv.get", [key], {
            let done = state.local_kv()?.get(&key);
            state.settle(done)
        }),))
    })?;
    kv.func_wrap("set", |mut store: StoreContextMut<'_, HostState>, (key, value): (String, Vec<u8>)| {
        let state = store.data_mut();
        let traced = state.trace_begin(&[&key, &value]);
        let result = (|| {
            let done = state.local_kv()?.set(&key, value);
            state.settle(done)
        })();
        state.trace_end("kv.set", traced, &result);
        Ok((result,))
    })?;
    kv.func_wrap("delete", |mut store: StoreContextMut<'_, HostState>, (key,): (String,)| {
        let state = store.data_mut();
        Ok((traced!(state, "kv.delete", [key], {
            let done = state.local_kv()?.delete(&key);
            state.settle(done)
        }),))
    })?;
    kv.func_wrap("incr", |mut store: StoreContextMut<'_, HostState>, (key, delta): (String, i64)| {
        let state = store.data_mut();
        Ok((traced!(state, "kv.incr", [key, delta], {
            let done = state.local_kv()?.incr(&key, delta);
            state.settle(done)
        }),))
    })?;
    linker.allow_shadowing(false);
    Ok(())
}
