//! What an engine message becomes: its route's call, and the answer line
//! that says the outcome — or, when it cannot be handled, the shortest
//! answer, at once.

use std::sync::atomic::Ordering::Relaxed;

use super::counters::bump;
use super::session::Lane;
use super::wire;
use crate::dispatcher::DispatchError;
use crate::runtime::{MessageInfo, Origin, Request};

/// `%%<message:<id>:false:` — the shortest answer, which changes nothing
/// (protocols.md §1.4): the engine goes on to its next handler.
pub(super) fn decline(id: &[u8]) -> Vec<u8> {
    let mut line = Vec::with_capacity(id.len() + 20);
    line.extend_from_slice(b"%%<message:");
    line.extend_from_slice(id);
    line.extend_from_slice(b":false:\n");
    line
}

/// The id of a `%%>message` line, however broken the rest is.
pub(super) fn message_id(line: &[u8]) -> Option<&[u8]> {
    let rest = line.strip_prefix(b"%%>message:")?;
    let id = &rest[..rest.iter().position(|&b| b == b':')?];
    (!id.is_empty() && !id.iter().any(|&b| b < 0x20)).then_some(id)
}

/// Runs the message's route and says its outcome as the answer line.
pub(super) async fn answer(lane: &Lane, route: String, m: wire::Message) -> Vec<u8> {
    let c = &lane.shared.counters;
    let id = String::from_utf8_lossy(&m.id).into_owned();
    let info = MessageInfo { id, time: m.time, name: m.name, retvalue: m.retvalue };
    let request = Request { route, data: Vec::new(), params: m.params, origin: Origin::Yate(info) };
    let Origin::Yate(info) = &request.origin else { return decline(&m.id) };
    match lane.d.run_route(&request).await {
        Ok(outcome) => {
            let r = &outcome.reply;
            // A handler that declines without a return value leaves the
            // message's; `retvalue` always replaces it on the wire.
            let retvalue = if r.handled || !r.retval.is_empty() { &r.retval } else { &info.retvalue };
            let mut line = Vec::with_capacity(64 + retvalue.len());
            let bufsize = lane.bufsize.load(Relaxed);
            match wire::write_answer(&mut line, &m.id, r.handled, "", retvalue, &r.params, &r.unset) {
                Ok(()) if line.len() < bufsize => {
                    bump(if r.handled { &c.handled } else { &c.declined });
                    line
                }
                Ok(()) => {
                    bump(&c.too_long);
                    tracing::warn!(plugin = %outcome.plugin, route = %request.route, message = %info.name,
                        bytes = line.len(), bufsize, "yate: the answer does not fit the engine's buffer; answered false");
                    decline(&m.id)
                }
                Err(e) => {
                    bump(&c.bad_reply);
                    tracing::warn!(plugin = %outcome.plugin, route = %request.route, message = %info.name,
                        error = %e, "yate: the reply cannot be said on Yate's wire; answered false");
                    decline(&m.id)
                }
            }
        }
        Err(DispatchError::RouteNotFound(_)) => {
            bump(&c.unhandled);
            decline(&m.id)
        }
        Err(e) => {
            bump(&c.failed);
            if let Some(more) = lane.shared.failure_report.due() {
                tracing::warn!(route = %request.route, message = %info.name, error = %crate::error::chain(&e), more,
                    "yate: the handler failed; answered false");
            }
            decline(&m.id)
        }
    }
}
