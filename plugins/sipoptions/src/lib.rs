//! Answers SIP OPTIONS over UDP with `200 OK` (a keep-alive responder, as
//! SIP proxies and load balancers ping each other). The response copies the
//! request's Via headers, From, To (with a tag added), Call-ID and CSeq.
//! Other requests get `405 Method Not Allowed`; responses and bytes that
//! are not SIP get no answer.

use evrhost_sdk::{export, Reply, Request, Route};

struct SipOptions;

/// The full name of a header, from its compact form too (RFC 3261 §7.3.3).
fn canonical(name: &str) -> Option<&'static str> {
    match name.to_ascii_lowercase().as_str() {
        "via" | "v" => Some("Via"),
        "from" | "f" => Some("From"),
        "to" | "t" => Some("To"),
        "call-id" | "i" => Some("Call-ID"),
        "cseq" => Some("CSeq"),
        _ => None,
    }
}

/// A stable to-tag for a dialog: FNV-1a of the Call-ID.
fn tag(call_id: &str) -> String {
    let hash = call_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("{hash:016x}")
}

fn respond(request: &str) -> Option<String> {
    let mut lines = request.split("\r\n");
    let request_line = lines.next()?;
    let mut parts = request_line.split(' ');
    let (method, _uri, version) = (parts.next()?, parts.next()?, parts.next()?);
    if version != "SIP/2.0" || method.starts_with("SIP/") {
        return None;
    }
    let mut vias = Vec::new();
    let (mut from, mut to, mut call_id, mut cseq) = (None, None, None, None);
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        match canonical(name.trim()) {
            Some("Via") => vias.push(value),
            Some("From") => from = Some(value),
            Some("To") => to = Some(value),
            Some("Call-ID") => call_id = Some(value),
            Some("CSeq") => cseq = Some(value),
            _ => {}
        }
    }
    let (from, to, call_id, cseq) = (from?, to?, call_id?, cseq?);
    if vias.is_empty() {
        return None;
    }
    let status = if method == "OPTIONS" { "200 OK" } else { "405 Method Not Allowed" };
    let to =
        if to.to_ascii_lowercase().contains(";tag=") { to.to_string() } else { format!("{to};tag={}", tag(call_id)) };
    let mut out = format!("SIP/2.0 {status}\r\n");
    for via in vias {
        out.push_str(&format!("Via: {via}\r\n"));
    }
    out.push_str(&format!(
        "From: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {cseq}\r\nAllow: OPTIONS\r\nServer: evrhost sipoptions\r\nContent-Length: 0\r\n\r\n"
    ));
    Some(out)
}

impl Route for SipOptions {
    fn handle(req: Request) -> Result<Reply, String> {
        match respond(&req.data_str()) {
            Some(response) => Ok(Reply::handled().retval("answered").data(response)),
            None => Ok(Reply::declined().retval("not a SIP request")),
        }
    }
}

export!(SipOptions: route);
