//! Plugins' `messages` import on Yate's wire: a `%%>message` with a fresh
//! id, and the wait for the engine's `%%<message` answer to it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::counters::bump;
use super::session::{Out, Writer};
use super::{wire, Shared};
use crate::dispatcher::MessageEngine;
use crate::runtime::{Answer, HostError, Message};
use crate::sync::lock;

/// Dispatches waiting for their answer, by id.
pub(super) type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<wire::Answer>>>>;

/// Where plugins' messages go while a connection is up.
#[derive(Clone)]
pub(super) struct Outbox {
    pub tx: Writer,
    pub pending: Pending,
    /// The engine's input buffer as last confirmed.
    pub bufsize: Arc<AtomicUsize>,
}

impl Shared {
    /// The message's line, checked against the engine's buffer.
    fn line(&self, outbox: &Outbox, id: &str, message: &Message) -> Result<Vec<u8>, HostError> {
        let mut line = Vec::with_capacity(128);
        wire::write_message(&mut line, id, 0, &message.name, &message.retvalue, &message.params)
            .map_err(|e| HostError::Invalid(e.to_string()))?;
        let bufsize = outbox.bufsize.load(Relaxed);
        if line.len() >= bufsize {
            return Err(HostError::Invalid(format!(
                "the message takes {} bytes on the wire; the engine's buffer holds {bufsize}",
                line.len()
            )));
        }
        Ok(line)
    }

    fn outbox(&self) -> Result<Outbox, HostError> {
        lock(&self.outbox).clone().ok_or_else(|| HostError::Failed("the Yate engine is not connected".into()))
    }
}

#[async_trait::async_trait]
impl MessageEngine for Shared {
    async fn dispatch(&self, message: Message) -> Result<Answer, HostError> {
        let outbox = self.outbox()?;
        let id = format!("evrhost.{}", self.next_id.fetch_add(1, Relaxed));
        let line = self.line(&outbox, &id, &message)?;
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&outbox.pending);
            if pending.len() >= self.settings.max_in_flight {
                return Err(HostError::Failed(format!(
                    "{} messages already wait for the engine's answer",
                    pending.len()
                )));
            }
            pending.insert(id.clone(), tx);
        }
        let closed = || HostError::Failed("the connection to the engine closed before it answered".into());
        if outbox.tx.send(Out::line(line)).is_err() {
            lock(&outbox.pending).remove(&id);
            return Err(closed());
        }
        bump(&self.counters.sent);
        match tokio::time::timeout(self.settings.timeout, rx).await {
            Ok(Ok(a)) => {
                bump(&self.counters.answered);
                Ok(Answer { handled: a.handled, name: a.name, retvalue: a.retvalue, params: a.params })
            }
            Ok(Err(_)) => Err(closed()),
            Err(_) => {
                lock(&outbox.pending).remove(&id);
                bump(&self.counters.timeouts);
                Err(HostError::Failed(format!(
                    "the engine did not answer `{}` within {} ms",
                    message.name,
                    self.settings.timeout.as_millis()
                )))
            }
        }
    }

    fn enqueue(&self, message: Message) -> Result<(), HostError> {
        let outbox = self.outbox()?;
        let line = self.line(&outbox, "", &message)?;
        let queued = outbox.tx.queued();
        if queued >= self.settings.max_in_flight {
            return Err(HostError::Failed(format!("{queued} lines already wait for the engine to read them")));
        }
        outbox.tx.send(Out::line(line)).map_err(|_| HostError::Failed("the connection to the engine closed".into()))?;
        bump(&self.counters.sent);
        Ok(())
    }
}
