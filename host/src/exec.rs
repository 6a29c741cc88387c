//! Exec tasks: Kamailio evrexec's startup tasks, run by the plugin's `task`
//! export.
//!
//! Each task waits `wait`, then runs in `workers` workers, each given its
//! index as a string. A task may run forever: it yields through the host's
//! `sleep`, and every slice between sleeps gets the plugin's full fuel and
//! deadline (see `runtime::imports::add_sleep`); a slice that exceeds
//! either is stopped like any call. A task that fails is logged with its
//! cause and restarted after a backoff that doubles up to a maximum (reset
//! after a run that lasted longer than the maximum), never silently lost.
//! A reload moves running tasks to the new version; shutdown aborts them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::config::ExecDef;
use crate::dispatcher::Dispatcher;

pub struct Tasks {
    handles: Vec<JoinHandle<()>>,
}

impl Tasks {
    /// Starts every startup task in `defs`.
    pub fn start(d: &Arc<Dispatcher>, defs: &[ExecDef]) -> Tasks {
        let mut handles = Vec::new();
        for def in defs {
            for worker in 0..def.workers {
                let run = Worker {
                    d: d.clone(),
                    name: def.name.clone(),
                    plugin: def.plugin.clone(),
                    worker: worker.to_string(),
                    backoff: (def.backoff_min, def.backoff_max),
                };
                let wait = def.wait;
                handles.push(tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    run.run().await
                }));
            }
        }
        Tasks { handles }
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Cancels every task; a call in flight is dropped with its instance.
    pub async fn stop(self) {
        for handle in &self.handles {
            handle.abort();
        }
        for handle in self.handles {
            let _ = handle.await;
        }
    }
}

struct Worker {
    d: Arc<Dispatcher>,
    name: String,
    plugin: String,
    worker: String,
    backoff: (Duration, Duration),
}

impl Worker {
    async fn run(self) {
        let (min, max) = self.backoff;
        let mut backoff = min;
        loop {
            let Some(slot) = self.d.slot(&self.plugin) else {
                tracing::warn!(task = %self.name, worker = %self.worker, plugin = %self.plugin, "plugin unloaded; task ends");
                return;
            };
            // Armed before the version is read, so a swap is never missed.
            let swapped = slot.swapped.notified();
            let version = slot.current();
            tracing::info!(task = %self.name, worker = %self.worker, plugin = %self.plugin, hash = %version.short_hash(), "task starting");
            let started = Instant::now();
            let outcome = tokio::select! {
                (result, _) = version.run_task(&self.name, &self.worker) => Some(result),
                _ = swapped => None,
            };
            match outcome {
                None => {
                    tracing::info!(task = %self.name, worker = %self.worker, "plugin replaced; restarting the task on the new version");
                    backoff = min;
                }
                Some(Ok(())) => {
                    tracing::info!(task = %self.name, worker = %self.worker, "task finished");
                    return;
                }
                Some(Err(e)) => {
                    if started.elapsed() > max {
                        backoff = min;
                    }
                    tracing::error!(
                        task = %self.name,
                        worker = %self.worker,
                        cause = %e.cause.kind(),
                        retry_ms = backoff.as_millis() as u64,
                        "task failed: {e}; restarting"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(max);
                }
            }
        }
    }
}
