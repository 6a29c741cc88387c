//! The receiver thread's own runs of the route: when it may run a batch
//! itself, and how a route slow there is sent to the workers for a while
//! (see the parent module's doc).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{Handler, BUFFER};

/// Full reads in a row after which the receiver is behind and hands on:
/// a burst of a few batches is still run here (a hand-over costs the
/// workers' wake-ups, the dearest thing on a small machine), a backlog
/// of HAND_ON_AFTER × BATCH datagrams is not.
pub(super) const HAND_ON_AFTER: usize = 4;
/// A call this long on the receiver thread sends the route to the workers.
const SLOW_INLINE: Duration = Duration::from_millis(1);
/// How long a slow route stays off the receiver thread at first, and at most.
const DEMOTION: Duration = Duration::from_secs(1);
const MAX_DEMOTION: Duration = Duration::from_secs(64);

/// The receiver thread's own handler, and whether it may use it now.
pub(super) struct Inline {
    runtime: tokio::runtime::Handle,
    handler: Handler,
    /// One worker: arrival order is kept, so nothing runs here while a
    /// datagram handed on is unfinished.
    pub(super) ordered: bool,
    demoted_until: Option<Instant>,
    /// The next demotion's length.
    demotion: Duration,
}

impl Inline {
    pub(super) fn new(runtime: tokio::runtime::Handle, handler: Handler, ordered: bool) -> Inline {
        Inline { runtime, handler, ordered, demoted_until: None, demotion: DEMOTION }
    }

    pub(super) fn allowed(&self, now: Instant) -> bool {
        self.demoted_until.is_none_or(|until| now >= until)
    }

    /// Runs the batch's datagrams here, in order; stops after the first
    /// slow one and gives back the index of the first not run.
    pub(super) fn run(&mut self, buffers: &[Vec<u8>], received: &[(usize, Option<SocketAddr>)], route: &str) -> usize {
        let (runtime, handler) = (&self.runtime, &mut self.handler);
        for (i, (buffer, (len, peer))) in buffers.iter().zip(received).enumerate() {
            let Some(peer) = *peer else { continue };
            let started = Instant::now();
            runtime.block_on(handler.datagram(&buffer[..(*len).min(BUFFER)], peer));
            let took = started.elapsed();
            if took < SLOW_INLINE {
                continue;
            }
            // A demotion that ended with a slow call: the next is longer.
            let next = if self.demoted_until.is_some() { (self.demotion * 2).min(MAX_DEMOTION) } else { DEMOTION };
            self.demotion = next;
            self.demoted_until = Some(Instant::now() + next);
            tracing::debug!(route = %route, took = ?took, off_for = ?next, "a slow UDP call: the route runs on the workers");
            return i + 1;
        }
        if self.demoted_until.is_some() {
            // Quick again after a demotion.
            (self.demoted_until, self.demotion) = (None, DEMOTION);
        }
        received.len()
    }
}
