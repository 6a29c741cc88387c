//! A thread for a front-end of its own: a tokio current-thread runtime.
//! The JSON-RPC front-ends (HTTP and the UNIX socket) run on one, and the
//! Yate connection on another.
//!
//! Why a thread of their own: on the daemon's multi-thread runtime, the
//! worker that finds a request ready also wakes a second worker in case
//! there is work to steal, and on a 2-core machine that wake-up is a large
//! part of what a round trip costs beyond the kernel's loopback (3–4 µs of
//! ~38 µs, `cargo bench --bench udp`). Here one thread reads a request,
//! runs it and writes the answer; and control traffic does not queue
//! behind UDP batches on the main runtime's workers, nor they behind it.
//! (For Yate, a round trip with one message in flight: `cargo bench
//! --bench yate`.)
//!
//! Invariants:
//! - What a request starts that outlives it (an `api.bgrun` job, an event
//!   subscriber's delivery task) runs on the main runtime (`Bus::spawn`),
//!   not here.
//! - A plugin call made here is the same async call as anywhere else: past
//!   its second epoch tick it yields at every tick, and the reactor is
//!   polled after every task poll, so a slow route delays the other RPC
//!   connections a tick at a time, never for its whole run.
//! - `stop` cancels every task of the thread (each connection included)
//!   and joins it.

use std::future::Future;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

pub struct FrontendThread {
    name: &'static str,
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FrontendThread {
    /// Starts the thread (`evrhost-NAME`) and its runtime.
    pub fn start(name: &'static str) -> std::io::Result<FrontendThread> {
        // I/O and timers only: signals and child processes are the main
        // runtime's, and their drivers would be polled at every park here.
        // A long plugin call yields once a tick and is at once runnable
        // again, so the run queue never empties while it lasts: the reactor
        // is polled after every task poll (tokio's default is every 61st),
        // or a request on another connection would wait 61 ticks.
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_io().enable_time().event_interval(1).build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name(format!("evrhost-{name}")).spawn(move || {
            // Tasks spawned through `handle` run while this blocks; an
            // error means the sender is gone, which is a stop as well.
            let _ = runtime.block_on(stopped);
            // Cancels the tasks still on it; a compile a `plugin.load` left
            // on the blocking pool is not waited for past a second.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        })?;
        Ok(FrontendThread { name, handle, stop: Some(stop), thread: Some(thread) })
    }

    /// Runs `task` on the thread.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) -> tokio::task::JoinHandle<()> {
        self.handle.spawn(task)
    }

    /// Cancels the thread's tasks and waits for it to end.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!(frontend = self.name, "the front-end's thread panicked");
            }
        }
    }
}

impl Drop for FrontendThread {
    fn drop(&mut self) {
        self.shut_down();
    }
}
