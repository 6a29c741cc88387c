//! The Kamailio anchor's work per datagram (`handler.lua` beside
//! `host/benches/kamailio/`), for the side-by-side UDP bench.
//!
//! Route: the data is `k=v;k=v;…`; `ev`, `user` and `seq` are taken. When
//! `ev` or `user` is missing or empty the tenant's counter `bad` goes up,
//! else `rx` and `ev::<ev>`. Command: `evcount.get NAME`, the count of
//! NAME (0 before its first datagram).
//!
//! The data is read as bytes, as Lua reads its strings: no UTF-8 check,
//! no allocation per datagram; a counter's name is made only where it is
//! bumped.

use std::borrow::Cow;

use evrhost_sdk::{export, kv, Api, CommandInfo, Datagrams, Reply, Request, Route};

struct EvCount;

/// What the route reads of a datagram.
#[derive(Default)]
struct Fields<'a> {
    ev: &'a [u8],
    user: &'a [u8],
    seq: Option<u64>,
}

/// The pairs `handler.lua` finds with `gmatch("([^;=]+)=([^;]*)")`: a key
/// is a run of bytes other than `;` and `=` followed by `=`, its value
/// what follows up to the next `;`. Where no pair starts, the scan moves
/// on as gmatch does (past the key-like run, or one byte).
fn parse(data: &[u8]) -> Fields<'_> {
    let mut fields = Fields::default();
    let mut i = 0;
    while i < data.len() {
        let key_end = find(data, i, |w| byte_in(w, b';') | byte_in(w, b'='), |b| b == b';' || b == b'=');
        if key_end > i && data.get(key_end) == Some(&b'=') {
            let value_start = key_end + 1;
            let value_end = find(data, value_start, |w| byte_in(w, b';'), |b| b == b';');
            let value = &data[value_start..value_end];
            match &data[i..key_end] {
                b"ev" => fields.ev = value,
                b"user" => fields.user = value,
                b"seq" => fields.seq = decimal(value),
                _ => {}
            }
            i = value_end;
        } else {
            i = key_end.max(i + 1);
        }
    }
    fields
}

/// The index of the first byte at or after `from` that `hit` matches,
/// or the length: eight bytes at a time while they last (`hits` marks
/// the matching bytes of a word with their top bit), as a byte loop
/// costs a wasm guest dearly.
fn find(data: &[u8], from: usize, hits: impl Fn(u64) -> u64, hit: impl Fn(u8) -> bool) -> usize {
    let mut i = from;
    while let Some(word) = data.get(i..i + 8) {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(word);
        let marked = hits(u64::from_le_bytes(bytes));
        if marked != 0 {
            // The lowest mark is exact (a borrow only runs upwards).
            return i + (marked.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    data.get(i..).and_then(|rest| rest.iter().position(|&b| hit(b))).map_or(data.len(), |n| i + n)
}

/// The top bit of each byte of `word` equal to `byte`.
fn byte_in(word: u64, byte: u8) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let x = word ^ (ONES * u64::from(byte));
    x.wrapping_sub(ONES) & !x & (ONES << 7)
}

/// A run of ASCII digits as a number (Lua's `tonumber` for what the
/// anchor sends: 19 digits always fit); None for anything else.
fn decimal(text: &[u8]) -> Option<u64> {
    if text.is_empty() || text.len() > 19 || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(text.iter().fold(0u64, |n, &b| n * 10 + u64::from(b - b'0')))
}

/// A counter a datagram bumps, named without allocating.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Counter<'a> {
    Bad,
    Rx,
    /// `ev::<ev>`.
    Ev(&'a [u8]),
}

impl Counter<'_> {
    fn name(self) -> Cow<'static, str> {
        match self {
            Counter::Bad => "bad".into(),
            Counter::Rx => "rx".into(),
            Counter::Ev(ev) => {
                let ev = String::from_utf8_lossy(ev);
                let mut name = String::with_capacity(4 + ev.len());
                name.push_str("ev::");
                name.push_str(&ev);
                name.into()
            }
        }
    }
}

/// The counters one datagram bumps: `bad`, or `rx` and `ev::<ev>`.
fn count<'a>(data: &'a [u8], mut bump: impl FnMut(Counter<'a>)) {
    let fields = parse(data);
    // As handler.lua: seq is read and not used.
    std::hint::black_box(fields.seq);
    if fields.ev.is_empty() || fields.user.is_empty() {
        bump(Counter::Bad);
    } else {
        bump(Counter::Rx);
        bump(Counter::Ev(fields.ev));
    }
}

impl Route for EvCount {
    fn handle(req: Request) -> Result<Reply, String> {
        let mut failed = None;
        count(&req.data, |counter| {
            if let Err(e) = kv::incr(&counter.name(), 1) {
                failed.get_or_insert(e.message());
            }
        });
        failed.map_or(Ok(Reply::handled()), Err)
    }

    /// Requests that came together: each parsed and counted, and each
    /// counter bumped once by its total, as Kamailio's htable ends up.
    fn handle_batch(requests: Vec<Request>) -> Vec<Result<Reply, String>> {
        counted(requests.iter().map(|req| req.data.as_slice()), requests.len())
    }

    /// The datagrams of one UDP read, as `handle_batch`, read where they
    /// lie.
    fn handle_datagrams(datagrams: Datagrams) -> Vec<Result<Reply, String>> {
        counted(datagrams.iter().map(|d| d.data), datagrams.len())
    }
}

/// Counts each of `data` (`n` of them), then bumps each counter once by
/// its total; the same result for each.
fn counted<'a>(data: impl Iterator<Item = &'a [u8]>, n: usize) -> Vec<Result<Reply, String>> {
    // Few distinct counters per batch: a list beats a map.
    let mut totals: Vec<(Counter<'_>, i64)> = Vec::with_capacity(8);
    for data in data {
        count(data, |counter| match totals.iter_mut().find(|(c, _)| *c == counter) {
            Some((_, n)) => *n += 1,
            None => totals.push((counter, 1)),
        });
    }
    let failed = totals.iter().find_map(|(counter, n)| kv::incr(&counter.name(), *n).err().map(|e| e.message()));
    let reply = || failed.clone().map_or(Ok(Reply::handled()), Err);
    (0..n).map(|_| reply()).collect()
}

impl Api for EvCount {
    fn commands() -> Vec<CommandInfo> {
        vec![CommandInfo::new("evcount.get", "NAME", "the count of NAME: rx, bad or ev::EVENT")]
    }

    fn execute(command: String, args: String) -> Result<String, String> {
        match command.as_str() {
            "evcount.get" => Ok(kv::get_string(args.trim()).map_err(|e| e.message())?.unwrap_or_else(|| "0".into())),
            other => Err(format!("unknown command {other}")),
        }
    }
}

export!(EvCount: route, api);
