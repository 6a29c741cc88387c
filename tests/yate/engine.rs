//! A fake Yate engine for testing external modules (Yate's "extmodule" protocol).
//!
//! It follows `shared/protocols.md` §1, which cites yatevoip/yate@1647cdc4:
//! `modules/extmodule.cpp` (ExtModReceiver::run / processLine / received),
//! `engine/Message.cpp` (Message::encode / decode / commonDecode) and
//! `engine/String.cpp` (msgEscape / msgUnescape, `>> bool`, toInteger). Where
//! the code is odd, this file copies it and says so ("Yate quirk").
//!
//! The escaping and line parsing are written here from that spec, apart from
//! evrhost's own codec, so that tests running evrhost against this engine
//! cross-check the two. Nothing here imports evrhost.
//!
//! Use from an integration test with `#[path = "../yate/engine.rs"] mod engine;`
//! (it needs `tokio` with the `full` features). Everything is async and must run
//! inside a tokio runtime. Sessions: [`Engine::spawn`] (pipes, like a
//! `[scripts]` entry), [`Engine::listen_tcp`] / [`Engine::listen_unix`]
//! (`[listener]` sections), [`Engine::attach`] (any stream pair) and
//! [`Engine::connect_native`] (the in-process baseline module).
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::io::{DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

// ---- Escaping (§1.2): String::msgEscape / String::msgUnescape ----------------------------------

/// `msgEscape(s, extra)`: bytes < 0x20, ':' and `extra` become '%' + (c + 0x40); '%' becomes "%%".
fn escape_with(s: &[u8], extra: Option<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 8);
    for &c in s {
        if c < 0x20 || c == b':' || Some(c) == extra {
            out.extend_from_slice(&[b'%', c.wrapping_add(0x40)]);
        } else if c == b'%' {
            out.extend_from_slice(b"%%");
        } else {
            out.push(c);
        }
    }
    out
}

/// Escapes a value (or a message name, a return value) as the engine writes it.
/// Yate's strings cannot hold NUL; if you pass one it comes out as `%@`, which no decoder accepts.
pub fn esc(s: &[u8]) -> Vec<u8> {
    escape_with(s, None)
}

/// Escapes a parameter *name*: like [`esc`] but '=' becomes `%}` (Message::commonEncode).
pub fn esc_key(s: &[u8]) -> Vec<u8> {
    escape_with(s, Some(b'='))
}

/// `msgUnescape` with no extra character: the text decoded so far, and the error position if any.
fn unescape_partial(s: &[u8]) -> (Vec<u8>, Option<usize>) {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            c if c < 0x20 => return (out, Some(i)), // a raw control byte is an error
            b'%' => {
                // Yate quirk: a '%' at the very end matches the "extra" char 0 (NUL) and Yate
                // reads past the string; that is undefined, so it is an error here.
                let next = s.get(i + 1).copied().unwrap_or(0);
                if (0x41..=0x5f).contains(&next) || next == b'z' {
                    out.push(next - 0x40);
                } else if next == b'%' {
                    out.push(b'%');
                } else {
                    return (out, Some(i + 1));
                }
                i += 2;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    (out, None)
}

/// Strict decoding, as the engine decodes answers and messages: only `%A`..`%_`, `%z` and `%%`.
pub fn unesc(s: &[u8]) -> Result<Vec<u8>, String> {
    match unescape_partial(s) {
        (out, None) => Ok(out),
        (_, Some(pos)) => Err(format!("bad escape at byte {pos} of {:?}", text(s))),
    }
}

/// msgUnescape called without an error pointer (install filters, debug text): keeps the prefix.
fn unesc_lenient(s: &[u8]) -> Vec<u8> {
    unescape_partial(s).0
}

// ---- Yate's number and boolean parsing (engine/String.cpp) -------------------------------------

/// C `strtol(s, &end, 0)`: (value, bytes used), or None when it converts nothing.
/// Values far out of range saturate, which the callers treat as ERANGE.
fn c_strtol(s: &[u8]) -> Option<(i128, usize)> {
    let mut i = s.iter().take_while(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)).count();
    let neg = s.get(i) == Some(&b'-');
    if matches!(s.get(i), Some(b'-' | b'+')) {
        i += 1;
    }
    let hex = s.get(i) == Some(&b'0')
        && matches!(s.get(i + 1), Some(b'x' | b'X'))
        && s.get(i + 2).is_some_and(u8::is_ascii_hexdigit);
    let (base, start) = match (hex, s.get(i)) {
        (true, _) => (16, i + 2),
        (false, Some(b'0')) => (8, i),
        _ => (10, i),
    };
    let mut j = start;
    let mut v: i128 = 0;
    while let Some(d) = s.get(j).and_then(|&c| (c as char).to_digit(base)) {
        v = (v * base as i128 + d as i128).min(1 << 80);
        j += 1;
    }
    (j > start).then_some((if neg { -v } else { v }, j))
}

/// Yate's `strtoi`: on overflow (and at exactly INT_MAX/INT_MIN) nothing is converted.
fn yate_strtoi(s: &[u8]) -> Option<(i32, usize)> {
    let (v, n) = c_strtol(s)?;
    (v > i32::MIN as i128 && v < i32::MAX as i128).then_some((v as i32, n))
}

/// `String::toInteger(def, 0, min, max)`: the whole string must be a number; out of range clamps.
fn to_integer(s: &[u8], def: i32, min: i32, max: i32) -> i32 {
    match yate_strtoi(s) {
        Some((v, n)) if n == s.len() => v.clamp(min, max),
        _ => def,
    }
}

/// The `<time>` field of `%%>message`: `String >> unsigned int` must use the whole field.
fn time_field(t: &[u8]) -> Option<u32> {
    if t.is_empty() {
        return Some(0);
    }
    match c_strtol(t) {
        Some((v, n)) if n == t.len() && (0..=u32::MAX as i128).contains(&v) => Some(v as u32),
        _ => None, // includes "-5": strtoul wraps it past UINT_MAX
    }
}

const FALSE_WORDS: [&[u8]; 5] = [b"false", b"no", b"off", b"disable", b"f"];
const TRUE_WORDS: [&[u8]; 5] = [b"true", b"yes", b"on", b"enable", b"t"];

fn bool_word(s: &[u8]) -> Option<bool> {
    FALSE_WORDS.contains(&s).then_some(false).or(TRUE_WORDS.contains(&s).then_some(true))
}

/// `String >> bool` plus Message::decode's "nothing may follow" check (§1.3).
/// Ok(None): empty field, the flag keeps its value. Err: the answer is rejected.
fn bool_field(f: &[u8]) -> Result<Option<bool>, ()> {
    let blanks = f.iter().take_while(|c| matches!(c, b' ' | b'\t')).count();
    if f.is_empty() {
        return Ok(None);
    }
    bool_word(&f[blanks..]).map(Some).ok_or(())
}

/// `String::toBoolean(def)`: exact words only.
fn to_boolean(s: &[u8], def: bool) -> bool {
    bool_word(s).unwrap_or(def)
}

fn bool_text(b: bool) -> &'static str {
    ["false", "true"][b as usize]
}

/// `String::trimBlanks`: spaces and tabs only.
fn trim_blanks(s: &[u8]) -> &[u8] {
    let start = s.iter().take_while(|c| matches!(c, b' ' | b'\t')).count();
    let end = s.len() - s[start..].iter().rev().take_while(|c| matches!(c, b' ' | b'\t')).count();
    &s[start..end]
}

fn find(s: &[u8], c: u8) -> Option<usize> {
    s.iter().position(|&b| b == c)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

// ---- Messages (engine/Message.cpp) -------------------------------------------------------------

/// A Yate message: name, return value and the ordered parameter list (a NamedList).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Msg {
    pub name: Vec<u8>,
    pub retvalue: Vec<u8>,
    pub params: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Msg {
    pub fn new(name: &str, retvalue: &str, params: &[(&str, &str)]) -> Msg {
        let params = params.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect();
        Msg { name: name.into(), retvalue: retvalue.into(), params }
    }
    /// The first parameter called `key` (NamedList::getParam).
    pub fn get(&self, key: impl AsRef<[u8]>) -> Option<&[u8]> {
        self.params.iter().find(|(k, _)| k == key.as_ref()).map(|(_, v)| &v[..])
    }
    pub fn get_str(&self, key: &str) -> Option<String> {
        self.get(key).map(text)
    }
    pub fn name_str(&self) -> String {
        text(&self.name)
    }
    pub fn retvalue_str(&self) -> String {
        text(&self.retvalue)
    }
    /// NamedList::setParam: replaces the first one of that name, else appends.
    pub fn set(&mut self, key: &str, value: &str) {
        self.set_param(key.as_bytes().to_vec(), value.as_bytes().to_vec());
    }
    /// NamedList::clearParam: removes every parameter of that name.
    pub fn clear(&mut self, key: &str) {
        self.params.retain(|(k, _)| k != key.as_bytes());
    }
    fn set_param(&mut self, key: Vec<u8>, value: Vec<u8>) {
        match self.params.iter_mut().find(|(k, _)| *k == key) {
            Some(p) => p.1 = value,
            None => self.params.push((key, value)),
        }
    }
    /// Message::commonEncode: `name:retvalue[:key=value]...`.
    fn encode_common(&self, out: &mut Vec<u8>) {
        out.extend(esc(&self.name));
        out.push(b':');
        out.extend(esc(&self.retvalue));
        for (k, v) in &self.params {
            out.push(b':');
            out.extend(esc_key(k));
            out.push(b'=');
            out.extend(esc(v));
        }
    }
}

/// `%%>message:<id>:<time>:...` as Message::encode(id) writes it.
fn encode_message(id: &str, time: u32, msg: &Msg) -> Vec<u8> {
    let mut out = cat(&[b"%%>message:", &esc(id.as_bytes()), b":", time.to_string().as_bytes(), b":"]);
    msg.encode_common(&mut out);
    out
}

/// `%%<message:<id>:<bool>:...` as Message::encode(received, id) writes it (answers and watcher notes).
fn encode_answer(id: &[u8], processed: bool, msg: &Msg) -> Vec<u8> {
    let mut out = cat(&[b"%%<message:", &esc(id), b":", bool_text(processed).as_bytes(), b":"]);
    msg.encode_common(&mut out);
    out
}

/// Message::commonDecode, applied in place as Yate does: on an error, changes made before it stay.
fn common_decode(rest: &[u8], msg: &mut Msg) -> Result<(), ()> {
    let sep = find(rest, b':').ok_or(())?; // the name field must be followed by ':'
    let name = unesc(&rest[..sep]).map_err(drop)?;
    if !name.is_empty() {
        msg.name = name; // an empty name keeps the name
    }
    let mut fields = rest[sep + 1..].split(|&c| c == b':');
    msg.retvalue = unesc(fields.next().unwrap_or_default()).map_err(drop)?; // always replaces
    for chunk in fields.filter(|c| !c.is_empty()) {
        // Yate quirk: keys are decoded with no extra character, so `%}` (an escaped '=') is an error.
        let chunk = unesc(chunk).map_err(drop)?;
        match find(&chunk, b'=') {
            None => msg.params.retain(|(k, _)| *k != chunk), // bare key: delete
            Some(0) => return Err(()),                       // "=value"
            Some(p) => msg.set_param(chunk[..p].to_vec(), chunk[p + 1..].to_vec()),
        }
    }
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum AnswerDecode {
    OtherId,
    Invalid,
    Ok,
}

/// Message::decode(str, received, id) for the answer to one pending message.
/// Like Yate it writes `processed` and the message as it goes, even when a later field fails.
fn decode_answer(line: &[u8], id: &[u8], processed: &mut bool, msg: &mut Msg) -> AnswerDecode {
    let prefix = cat(&[b"%%<message:", id, b":"]); // the literal prefix: id byte-identical
    let Some(rest) = line.strip_prefix(&prefix[..]) else { return AnswerDecode::OtherId };
    let Some(sep) = find(rest, b':') else { return AnswerDecode::Invalid };
    match bool_field(&rest[..sep]) {
        Ok(Some(v)) => *processed = v,
        Ok(None) => {}
        Err(()) => return AnswerDecode::Invalid,
    }
    if rest.len() == sep + 1 {
        return AnswerDecode::Ok; // `%%<message:<id>:<bool>:` changes nothing else
    }
    match common_decode(&rest[sep + 1..], msg) {
        Ok(()) => AnswerDecode::Ok,
        Err(()) => AnswerDecode::Invalid,
    }
}

/// Message::decode(str, id) for a `%%>message` the module emits: (id, time, message).
fn decode_module_message(line: &[u8]) -> Option<(Vec<u8>, u32, Msg)> {
    let rest = line.strip_prefix(b"%%>message:")?;
    let sep = find(rest, b':')?;
    let sep2 = sep + 1 + find(&rest[sep + 1..], b':')?;
    let id = unesc(&rest[..sep]).ok()?;
    let time = time_field(&rest[sep + 1..sep2])?;
    let mut msg = Msg::default();
    common_decode(&rest[sep2 + 1..], &mut msg).ok()?;
    Some((id, time, msg))
}

// ---- Session state -----------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Role {
    #[default]
    Unknown, // a listener without role: the first line must be %%>connect
    Global,
    Channel,
}

fn listener_role(role: Option<&str>) -> io::Result<Role> {
    match role {
        None => Ok(Role::Unknown),
        Some("global") => Ok(Role::Global),
        Some("channel") => Ok(Role::Channel),
        // ExtListener::init: any other role disables the listener.
        Some(other) => Err(io::Error::new(io::ErrorKind::InvalidInput, format!("unknown listener role {other:?}"))),
    }
}

/// The `setlocal` parameters (§1.4.1), defaults from extmodule.cpp.
struct Settings {
    bufsize: i32,
    timeout_ms: i32,
    maxqueue: i32,
    timebomb: bool,
    restart: bool,
    reenter: bool,
    selfwatch: bool,
    setdata: bool,
    settime: bool,
    trackparam: Vec<u8>,
    reason: Vec<u8>,
    debuglevel: i32,
    debugname: Vec<u8>,
    debugname_set: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            bufsize: 8192,
            timeout_ms: 10000,
            maxqueue: 1000,
            timebomb: false,
            restart: false,
            reenter: false,
            selfwatch: false,
            setdata: true,
            settime: false,
            trackparam: Vec::new(),
            reason: Vec::new(),
            debuglevel: 7, // DebugNote, the plugin's default
            debugname: Vec::new(),
            debugname_set: false,
        }
    }
}

/// What the fake engine reports for `engine.<param>` (Engine::runParams).
const RUN_PARAMS: &[(&str, &str)] = &[
    ("version", "6.4.1"),
    ("release", "devel1"),
    ("nodename", "fakeyate"),
    ("configname", "yate"),
    ("sharedpath", "/usr/share/yate"),
    ("configpath", "/etc/yate"),
    ("cfgsuffix", ".conf"),
    ("modulepath", "/usr/lib/yate"),
    ("modsuffix", ".yate"),
    ("logfile", ""),
    ("clientmode", "false"),
    ("supervised", "false"),
    ("maxworkers", "10"),
];

struct Relay {
    prio: i32,
    name: Vec<u8>,
    filter: Option<(Vec<u8>, Vec<u8>)>,
}

impl Relay {
    /// MessageFilter with a MatchingItemString: the first param of that name, a missing one is "".
    fn accepts(&self, msg: &Msg) -> bool {
        self.name == msg.name && self.filter.as_ref().is_none_or(|(k, v)| msg.get(k).unwrap_or(b"") == &v[..])
    }
}

enum Release {
    Answered,
    Flushed,
}

/// A MsgHolder: one engine message waiting for its answer.
struct Pending {
    id: String,
    processed: bool,
    msg: Msg,
    done: Option<oneshot::Sender<(Release, bool, Msg)>>,
}

type Handler = Arc<dyn Fn(&mut Msg) -> bool + Send + Sync>;

/// A relay as [`Engine::installed`] lists it: (priority, name, filter name and value).
pub type Installed = (i32, String, Option<(String, String)>);

#[derive(Default)]
struct State {
    role: Role,
    scripted: bool,
    set: Settings,
    relays: Vec<Relay>,
    watched: Vec<Vec<u8>>,
    pending: Vec<Pending>,
    max_in_flight: usize,
    handlers: HashMap<Vec<u8>, Handler>,
    from_module: Vec<Vec<u8>>,
    to_module: Vec<Vec<u8>>,
    errors_sent: Vec<Vec<u8>>,
    unmatched: Vec<Vec<u8>>,
    invalid_answers: Vec<Vec<u8>>,
    setlocals: Vec<(String, String, bool)>,
    outputs: Vec<String>,
    debugs: Vec<(i32, String)>,
    module_messages: Vec<(String, Msg)>,
    connect: Option<(String, String, String)>,
    overflowed: bool,
    quit: bool,
    closed: bool,
    pid: Option<u32>,
    exit: Option<ExitStatus>,
    seq: u64,
    rng: u64,
    id_base: u64,
    runid: u64,
}

impl State {
    fn new(role: Role, scripted: bool, debugname: &str, pid: Option<u32>) -> State {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let seed = now.as_nanos() as u64 ^ ((pid.unwrap_or(0) as u64) << 32) | 1;
        let set = Settings { debugname: debugname.into(), ..Settings::default() };
        let id_base = 0x7f00_0000_0000 | ((seed & 0xff_fff0) << 12);
        State { role, scripted, set, pid, rng: seed, id_base, runid: now.as_secs(), ..State::default() }
    }

    /// A MsgHolder id, `"%p.%ld"`: the holder's address and Random::random().
    fn next_id(&mut self) -> String {
        self.seq += 1;
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        format!("{:#x}.{}", self.id_base + self.seq * 0x60, (self.rng >> 33) & 0x7fff_ffff)
    }

    fn timeout(&self) -> Option<Duration> {
        // `timeout` <= 0 waits forever
        (self.set.timeout_ms > 0).then(|| Duration::from_millis(self.set.timeout_ms as u64))
    }
}

// ---- The engine session ------------------------------------------------------------------------

/// How a dispatch to the module ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// A valid answer matched the id.
    Answered,
    /// No valid answer within the timeout (an invalid answer counts as none).
    TimedOut,
    /// The module has no relay for the name (or its filter refused): nothing was written.
    NotInstalled,
    /// Not written: the module quit or died, its `maxqueue` was full, or the write failed.
    NotDelivered,
    /// The module went away while the message waited (Yate's flush()).
    ModuleGone,
}

/// The result of [`Engine::dispatch`].
#[derive(Clone, Debug)]
pub struct Outcome {
    pub delivery: Delivery,
    /// What the relay returned. Yate quirk: after a timeout this is still the flag an
    /// *invalid* answer may have set, since Message::decode stores it before failing.
    pub processed: bool,
    /// The message after the answer (or a failed decode) changed it.
    pub msg: Msg,
    /// The id written in `%%>message`, if one was.
    pub id: Option<String>,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn answered(&self) -> bool {
        self.delivery == Delivery::Answered
    }
}

/// Getters for logs of byte lines, as lossy UTF-8.
macro_rules! lines_as_text {
    ($($(#[$doc:meta])* $name:ident => $field:ident;)*) => {$(
        $(#[$doc])*
        pub fn $name(&self) -> Vec<String> {
            self.lock().$field.iter().map(|l| text(l)).collect()
        }
    )*};
}

/// Getters for single state values.
macro_rules! state_values {
    ($($(#[$doc:meta])* $name:ident: $ty:ty = $st:ident => $value:expr;)*) => {$(
        $(#[$doc])*
        pub fn $name(&self) -> $ty {
            let $st = self.lock();
            $value
        }
    )*};
}

/// One module connection or spawned module, seen from the engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    writer: tokio::sync::Mutex<Option<Box<dyn AsyncWrite + Send + Unpin>>>,
    reader: Mutex<Option<JoinHandle<()>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

#[derive(PartialEq)]
enum Flow {
    Continue,
    Close,
}

const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;

fn send_signal(pid: u32, sig: i32) {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    // SAFETY: kill(2) takes plain integers; the pid is our own child, not yet reaped.
    unsafe {
        kill(pid as i32, sig);
    }
}

/// Builder for a piped module, see [`Engine::command`].
pub struct Spawn {
    program: PathBuf,
    envs: Vec<(String, String)>,
}

impl Spawn {
    /// Adds an environment variable for the module (e.g. `RUST_LOG`).
    pub fn env(mut self, key: &str, value: &str) -> Spawn {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Starts the module as ExtModReceiver::create does: `execl(script, script, arg)`, so it
    /// always gets exactly one argument (trimmed of blanks, possibly empty).
    pub fn spawn(self, arg: &str) -> io::Result<Engine> {
        let arg = text(trim_blanks(arg.as_bytes()));
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.arg(arg).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let missing = || io::Error::other("child pipes missing");
        let stdin = child.stdin.take().ok_or_else(missing)?;
        let stdout = child.stdout.take().ok_or_else(missing)?;
        let mut stderr = child.stderr.take().ok_or_else(missing)?;
        let name = self.program.to_string_lossy();
        let engine = Engine::start(stdout, stdin, Role::Global, true, &name, child.id());
        let buf = engine.inner.stderr.clone();
        tokio::spawn(async move {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = stderr.read(&mut chunk).await {
                buf.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&chunk[..n]);
            }
        });
        let waiter = engine.clone();
        tokio::spawn(async move {
            if let Ok(status) = child.wait().await {
                waiter.lock().exit = Some(status);
            }
        });
        Ok(engine)
    }
}

/// A `[listener]` socket; each accepted connection is a new [`Engine`] session.
/// Dropping it closes the listening socket.
pub struct Listener {
    socket: ListenSocket,
    role: Role,
}

enum ListenSocket {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    /// Waits for the next module connection.
    pub async fn accept(&self) -> io::Result<Engine> {
        Ok(match &self.socket {
            ListenSocket::Tcp(l) => {
                let (r, w) = l.accept().await?.0.into_split();
                Engine::start(r, w, self.role, false, "listener", None)
            }
            ListenSocket::Unix(l) => {
                let (r, w) = l.accept().await?.0.into_split();
                Engine::start(r, w, self.role, false, "listener", None)
            }
        })
    }

    /// [`Listener::accept`] with a limit; None when nobody connected in time.
    pub async fn accept_timeout(&self, timeout: Duration) -> Option<Engine> {
        tokio::time::timeout(timeout, self.accept()).await.ok()?.ok()
    }
}

impl Engine {
    /// A builder for a piped module (to add environment variables).
    pub fn command(program: &Path) -> Spawn {
        Spawn { program: program.to_path_buf(), envs: Vec::new() }
    }

    /// Starts `program` with exactly one argument, stdin/stdout piped, stderr captured.
    pub fn spawn(program: &Path, arg: &str) -> io::Result<Engine> {
        Engine::command(program).spawn(arg)
    }

    /// Binds a TCP listener on 127.0.0.1:0. `role`: None (the module must `%%>connect`),
    /// `global` or `channel`; anything else fails, as it disables the listener in Yate.
    pub fn listen_tcp(role: Option<&str>) -> io::Result<(SocketAddr, Listener)> {
        let role = listener_role(role)?;
        let std = std::net::TcpListener::bind("127.0.0.1:0")?;
        std.set_nonblocking(true)?;
        let addr = std.local_addr()?;
        Ok((addr, Listener { socket: ListenSocket::Tcp(tokio::net::TcpListener::from_std(std)?), role }))
    }

    /// Binds a UNIX stream listener at `path` (removing a stale file first, as Yate does).
    pub fn listen_unix(path: &Path, role: Option<&str>) -> io::Result<Listener> {
        let role = listener_role(role)?;
        let _ = std::fs::remove_file(path);
        let std = std::os::unix::net::UnixListener::bind(path)?;
        std.set_nonblocking(true)?;
        Ok(Listener { socket: ListenSocket::Unix(tokio::net::UnixListener::from_std(std)?), role })
    }

    /// A session over any stream pair, as if accepted on a listener with `role`.
    pub fn attach<R, W>(reader: R, writer: W, role: Option<&str>) -> io::Result<Engine>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        Ok(Engine::start(reader, writer, listener_role(role)?, false, "attached", None))
    }

    /// An in-process session (role `global`) whose module is `module`, run on a tokio duplex.
    pub fn connect_module<F, Fut>(module: F) -> Engine
    where
        F: FnOnce(ReadHalf<DuplexStream>, WriteHalf<DuplexStream>) -> Fut,
        Fut: Future<Output = io::Result<()>> + Send + 'static,
    {
        let (engine_end, module_end) = tokio::io::duplex(1 << 16);
        let (mr, mw) = tokio::io::split(module_end);
        tokio::spawn(module(mr, mw));
        let (er, ew) = tokio::io::split(engine_end);
        Engine::start(er, ew, Role::Global, false, "native", None)
    }

    /// The benchmark baseline: a session with [`native_module`] on the other end.
    pub fn connect_native() -> Engine {
        Engine::connect_module(native_module)
    }

    fn start<R, W>(reader: R, writer: W, role: Role, scripted: bool, name: &str, pid: Option<u32>) -> Engine
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let engine = Engine {
            inner: Arc::new(Inner {
                state: Mutex::new(State::new(role, scripted, name, pid)),
                writer: tokio::sync::Mutex::new(Some(Box::new(writer))),
                reader: Mutex::new(None),
                stderr: Arc::new(Mutex::new(Vec::new())),
            }),
        };
        let task = tokio::spawn(read_loop(engine.clone(), reader));
        *engine.inner.reader.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        engine
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// outputLine: one whole line plus '\n', giving up after the session timeout.
    async fn write_line(&self, line: Vec<u8>) -> bool {
        let limit = self.lock().timeout();
        let write = async {
            let mut guard = self.inner.writer.lock().await;
            let Some(w) = guard.as_mut() else { return false };
            let data = cat(&[&line, b"\n"]);
            if w.write_all(&data).await.is_err() || w.flush().await.is_err() {
                return false;
            }
            let mut st = self.lock(); // still under the writer lock, so the log keeps wire order
            if line.starts_with(b"Error in: ") {
                st.errors_sent.push(line.clone());
            }
            st.to_module.push(line);
            true
        };
        match limit {
            Some(d) => tokio::time::timeout(d, write).await.unwrap_or(false),
            None => write.await,
        }
    }

    /// Writes raw bytes plus '\n' to the module (garbage, over-long lines...).
    pub async fn send_line(&self, bytes: &[u8]) -> bool {
        self.write_line(bytes.to_vec()).await
    }

    // ----- dispatching engine messages to the module -----

    /// Dispatches a message (session timeout), then runs the watchers. See [`Engine::dispatch_msg`].
    pub async fn dispatch(&self, name: &str, retvalue: &str, params: &[(&str, &str)]) -> Outcome {
        self.dispatch_msg(Msg::new(name, retvalue, params), None).await
    }

    /// [`Engine::dispatch`] waiting at most `timeout` for the answer.
    pub async fn dispatch_timeout(&self, name: &str, ret: &str, params: &[(&str, &str)], timeout: Duration) -> Outcome {
        self.dispatch_msg(Msg::new(name, ret, params), Some(timeout)).await
    }

    /// Delivers `msg` to the module's relay (ExtModReceiver::received) and then sends the
    /// watcher notification (the post-dispatch hook). `timeout` None: the session's.
    pub async fn dispatch_msg(&self, msg: Msg, timeout: Option<Duration>) -> Outcome {
        let out = self.deliver(msg, timeout).await;
        self.post_hooks(&out.msg, out.processed, false).await;
        out
    }

    async fn deliver(&self, msg: Msg, timeout: Option<Duration>) -> Outcome {
        let started = Instant::now();
        let done = |delivery, processed, msg, id| Outcome { delivery, processed, msg, id, elapsed: started.elapsed() };
        let (id, line, mut rx, wait) = {
            let mut st = self.lock();
            if !st.relays.iter().any(|r| r.accepts(&msg)) {
                return done(Delivery::NotInstalled, false, msg, None);
            }
            let full = st.set.maxqueue > 0 && st.pending.len() >= st.set.maxqueue as usize;
            if st.closed || st.quit || full {
                return done(Delivery::NotDelivered, false, msg, None);
            }
            let id = st.next_id();
            let line = encode_message(&id, now_secs(), &msg);
            let (tx, rx) = oneshot::channel();
            // Registered before the write, so even an instant answer finds its holder.
            st.pending.push(Pending { id: id.clone(), processed: false, msg, done: Some(tx) });
            st.max_in_flight = st.max_in_flight.max(st.pending.len());
            (id, line, rx, timeout.or(st.timeout()))
        };
        if !self.write_line(line).await {
            let p = self.take_pending(&id);
            self.bomb().await;
            let msg = p.map(|p| p.msg).unwrap_or_default();
            return done(Delivery::NotDelivered, false, msg, Some(id));
        }
        let got = match wait {
            Some(d) => tokio::time::timeout(d, &mut rx).await.ok(),
            None => Some((&mut rx).await),
        };
        let got = match got {
            Some(r) => r.ok(),
            None => match self.take_pending(&id) {
                Some(p) => {
                    self.bomb().await;
                    return done(Delivery::TimedOut, p.processed, p.msg, Some(id));
                }
                None => rx.try_recv().ok(), // released at the same instant: the release wins
            },
        };
        match got {
            Some((Release::Answered, processed, msg)) => done(Delivery::Answered, processed, msg, Some(id)),
            Some((Release::Flushed, processed, msg)) => done(Delivery::ModuleGone, processed, msg, Some(id)),
            None => done(Delivery::ModuleGone, false, Msg::default(), Some(id)),
        }
    }

    fn take_pending(&self, id: &str) -> Option<Pending> {
        let mut st = self.lock();
        let i = st.pending.iter().position(|p| p.id == id)?;
        Some(st.pending.remove(i))
    }

    /// `timebomb`: a failed or timed-out message kills the module.
    async fn bomb(&self) {
        let bomb = self.lock().set.timebomb;
        if bomb {
            self.die().await;
        }
    }

    /// MsgWatcher::dispatched: `%%<message::<handled>:...` if the module watches the name.
    async fn post_hooks(&self, msg: &Msg, handled: bool, own: bool) {
        let send = {
            let st = self.lock();
            !st.closed
                && !st.quit
                && (!own || st.set.selfwatch)
                && st.watched.iter().any(|w| w.is_empty() || *w == msg.name)
        };
        if send {
            self.write_line(encode_answer(b"", handled, msg)).await;
        }
    }

    /// The watcher notification for a message dispatched elsewhere in the engine.
    pub async fn notify(&self, name: &str, retvalue: &str, params: &[(&str, &str)], handled: bool) {
        self.post_hooks(&Msg::new(name, retvalue, params), handled, false).await;
    }

    /// The engine-side handler for messages the module emits with `%%>message`: it may change
    /// the message and returns `handled`. Without one: not handled, nothing changed. `""` catches all.
    pub fn on_message(&self, name: &str, handler: impl Fn(&mut Msg) -> bool + Send + Sync + 'static) {
        self.lock().handlers.insert(name.as_bytes().to_vec(), Arc::new(handler));
    }

    /// Keeps `window` dispatches of `name` in flight until `n` were sent; outcomes in send order.
    pub async fn pipeline_outcomes<F>(&self, name: &str, n: usize, window: usize, mut make_params: F) -> Vec<Outcome>
    where
        F: FnMut(usize) -> Vec<(String, String)>,
    {
        let mut tasks = tokio::task::JoinSet::new();
        let mut outcomes: Vec<Option<Outcome>> = vec![None; n];
        let mut next = 0;
        while next < n || !tasks.is_empty() {
            while next < n && tasks.len() < window.max(1) {
                let params = make_params(next).into_iter().map(|(k, v)| (k.into_bytes(), v.into_bytes())).collect();
                let msg = Msg { name: name.into(), retvalue: Vec::new(), params };
                let (engine, i) = (self.clone(), next);
                tasks.spawn(async move { (i, engine.dispatch_msg(msg, None).await) });
                next += 1;
            }
            if let Some(Ok((i, outcome))) = tasks.join_next().await {
                outcomes[i] = Some(outcome);
            }
        }
        outcomes.into_iter().flatten().collect()
    }

    /// [`Engine::pipeline_outcomes`] reduced to the latencies of the answered messages
    /// (fewer than `n` entries means some were not answered).
    pub async fn pipeline<F>(&self, name: &str, n: usize, window: usize, make_params: F) -> Vec<Duration>
    where
        F: FnMut(usize) -> Vec<(String, String)>,
    {
        let outcomes = self.pipeline_outcomes(name, n, window, make_params).await;
        outcomes.iter().filter(|o| o.answered()).map(|o| o.elapsed).collect()
    }

    // ----- ending the session -----

    /// Closes the module's input (EOF on its stdin / half-closes the socket), like die()'s first step.
    pub async fn close_input(&self) {
        let writer = self.inner.writer.lock().await.take();
        if let Some(mut w) = writer {
            let _ = w.shutdown().await;
        }
    }

    /// ExtModReceiver::die(): close the input, give a piped module 60 ms, close, then SIGTERM.
    pub async fn die(&self) {
        self.close_input().await;
        let piped = self.lock().pid.is_some();
        if piped {
            self.wait_exit(Duration::from_millis(60)).await;
        }
        self.finish(true, Duration::ZERO).await;
    }

    /// Kills the module: SIGKILL for a piped one (the engine then sees EOF), closes a socket.
    pub async fn kill(&self) {
        let pid = {
            let st = self.lock();
            st.exit.is_none().then_some(st.pid).flatten()
        };
        match pid {
            Some(pid) => send_signal(pid, SIGKILL),
            None => self.finish(true, Duration::ZERO).await,
        }
    }

    /// The engine closes the module: releases waiting messages (flush()), drops relays and
    /// watchers, closes the streams; a piped module still alive after `term_after` gets SIGTERM.
    async fn finish(&self, abort_reader: bool, term_after: Duration) {
        let pid = {
            let mut st = self.lock();
            if st.closed {
                return;
            }
            st.closed = true;
            for p in st.pending.drain(..) {
                if let Some(tx) = p.done {
                    let _ = tx.send((Release::Flushed, p.processed, p.msg));
                }
            }
            st.relays.clear();
            st.watched.clear();
            st.exit.is_none().then_some(st.pid).flatten()
        };
        if abort_reader {
            if let Some(task) = self.inner.reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
                task.abort();
            }
        }
        if let Ok(mut guard) = tokio::time::timeout(Duration::from_secs(1), self.inner.writer.lock()).await {
            if let Some(mut w) = guard.take() {
                let _ = w.shutdown().await;
            }
        }
        if let Some(pid) = pid {
            let engine = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(term_after).await;
                if engine.lock().exit.is_none() {
                    send_signal(pid, SIGTERM);
                }
            });
        }
    }

    // ----- queries -----

    /// The relays the module installed: (priority, name, filter name and value).
    pub fn installed(&self) -> Vec<Installed> {
        let st = self.lock();
        st.relays.iter().map(|r| (r.prio, text(&r.name), r.filter.as_ref().map(|(k, v)| (text(k), text(v))))).collect()
    }
    /// Lines the module sent, as bytes (after '\r' stripping; empty lines are skipped).
    pub fn sent_raw(&self) -> Vec<Vec<u8>> {
        self.lock().from_module.clone()
    }
    /// The per-message answer timeout in ms (<= 0: forever); tests may override it.
    pub fn set_timeout_ms(&self, ms: i32) {
        self.lock().set.timeout_ms = ms;
    }

    lines_as_text! {
        /// Lines the module sent (lossy UTF-8).
        sent_lines => from_module;
        /// Lines the engine wrote to the module, in wire order, without the '\n'.
        engine_lines => to_module;
        /// The `Error in: <line>` lines the engine wrote.
        errors_sent => errors_sent;
        /// `%%<message:` lines whose id matched no waiting message (late answers, stray ids).
        /// Yate logs these and `invalid_answers` alike as "unmatched message".
        unmatched => unmatched;
        /// `%%<message:` lines with a waiting id that did not decode (so they never match).
        invalid_answers => invalid_answers;
        /// Watched names ("" = every message).
        watched => watched;
    }

    state_values! {
        /// Every setlocal answered: (name, value reported, success).
        setlocals: Vec<(String, String, bool)> = st => st.setlocals.clone();
        /// Texts from `%%>output:` (trimmed).
        outputs: Vec<String> = st => st.outputs.clone();
        /// `%%>debug:` lines: (level, unescaped text).
        debugs: Vec<(i32, String)> = st => st.debugs.clone();
        /// Messages the module emitted with `%%>message`: (id, message as decoded).
        module_messages: Vec<(String, Msg)> = st => st.module_messages.clone();
        /// The accepted `%%>connect`: (role, channel id, type).
        connected_as: Option<(String, String, String)> = st => st.connect.clone();
        /// The engine closed the module because a line did not fit in `bufsize`.
        overflowed: bool = st => st.overflowed;
        quit_received: bool = st => st.quit;
        /// The engine has closed the session (EOF, overflow, quit, bad connect, die, kill).
        closed: bool = st => st.closed;
        /// `setlocal restart` was accepted (the fake does not re-spawn by itself).
        restart_requested: bool = st => st.set.restart;
        bufsize: usize = st => st.set.bufsize as usize;
        timeout_ms: i32 = st => st.set.timeout_ms;
        /// The most messages that were waiting for an answer at once.
        max_in_flight: usize = st => st.max_in_flight;
    }

    /// What a piped module wrote on stderr so far.
    pub fn stderr(&self) -> String {
        text(&self.inner.stderr.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Polls `pred` every 5 ms until it holds (true) or `timeout` passes (false).
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&Engine) -> bool) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if pred(self) {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    pub async fn wait_closed(&self, timeout: Duration) -> bool {
        self.wait_for(timeout, |e| e.closed()).await
    }
    pub async fn wait_installed(&self, name: &str, timeout: Duration) -> bool {
        self.wait_for(timeout, |e| e.installed().iter().any(|r| r.1 == name)).await
    }
    /// The exit status of a piped module, once it exited (None on timeout or for sockets).
    pub async fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        self.wait_for(timeout, |e| e.lock().exit.is_some()).await;
        self.lock().exit
    }

    // ----- the module's lines (ExtModReceiver::processLine) -----

    async fn process_line(&self, line: Vec<u8>) -> Flow {
        let role = {
            let mut st = self.lock();
            if st.quit {
                return Flow::Close; // m_quit: the reader stops
            }
            st.from_module.push(line.clone());
            st.role
        };
        if role == Role::Unknown {
            return self.on_connect(&line);
        }
        if line.starts_with(b"%%<message:") {
            self.on_answer(&line);
        } else if let Some(rest) = line.strip_prefix(b"%%>install:") {
            let answer = self.on_install(rest);
            self.write_line(answer).await;
        } else if let Some(name) = line.strip_prefix(b"%%>uninstall:") {
            let prio = {
                let mut st = self.lock();
                let i = st.relays.iter().position(|r| r.name == name);
                i.map(|i| st.relays.remove(i).prio)
            };
            let body = cat(&[prio.unwrap_or(0).to_string().as_bytes(), b":", name]);
            self.answer_ok(b"%%<uninstall:", &body, prio.is_some()).await;
        } else if let Some(name) = line.strip_prefix(b"%%>watch:") {
            let ok = {
                let mut st = self.lock();
                let ok = !st.closed && !st.watched.iter().any(|w| w == name);
                if ok {
                    st.watched.push(name.to_vec());
                }
                ok
            };
            self.answer_ok(b"%%<watch:", name, ok).await;
        } else if let Some(name) = line.strip_prefix(b"%%>unwatch:") {
            let ok = {
                let mut st = self.lock();
                let i = st.watched.iter().position(|w| w == name);
                i.map(|i| st.watched.remove(i)).is_some()
            };
            self.answer_ok(b"%%<unwatch:", name, ok).await;
        } else if let Some(rest) = line.strip_prefix(b"%%>output:") {
            self.lock().outputs.push(text(trim_blanks(rest)));
        } else if let Some(rest) = line.strip_prefix(b"%%>debug:").filter(|r| find(r, b':').is_some_and(|p| p > 0)) {
            let pos = find(rest, b':').unwrap_or(0);
            let level = to_integer(&rest[..pos], 10, 1, 10);
            self.lock().debugs.push((level, text(&unesc_lenient(&rest[pos + 1..]))));
        } else if let Some(rest) = line.strip_prefix(b"%%>setlocal:").filter(|r| find(r, b':').is_some_and(|p| p > 0)) {
            let answer = self.on_setlocal(rest);
            self.write_line(answer).await;
        } else if line == b"%%>quit" {
            self.lock().quit = true;
            self.write_line(b"%%<quit".to_vec()).await;
            return Flow::Close;
        } else if let Some((id, _time, msg)) = decode_module_message(&line) {
            self.lock().module_messages.push((text(&id), msg.clone()));
            let engine = self.clone(); // Engine::enqueue: dispatched later, in its own task
            tokio::spawn(async move { engine.run_module_message(id, msg).await });
        } else {
            // Also `%%>debug` without a level, `%%>setlocal` without ':' or name, a second connect.
            self.write_line(cat(&[b"Error in: ", &line])).await;
        }
        Flow::Continue
    }

    async fn answer_ok(&self, head: &[u8], body: &[u8], ok: bool) {
        self.write_line(cat(&[head, body, b":", bool_text(ok).as_bytes()])).await;
    }

    /// Only the first line on a listener without role: `%%>connect:<role>[:<id>][:<type>]`.
    fn on_connect(&self, line: &[u8]) -> Flow {
        let Some(rest) = line.strip_prefix(b"%%>connect:") else { return Flow::Close };
        let (role, chan, kind) = match find(rest, b':') {
            None => (rest, &b""[..], &b""[..]),
            Some(p) => {
                let tail = &rest[p + 1..];
                match find(tail, b':') {
                    Some(q) => (&rest[..p], &tail[..q], &tail[q + 1..]),
                    None => (&rest[..p], tail, &b""[..]),
                }
            }
        };
        let role_value = match role {
            b"global" => Role::Global,
            b"channel" => Role::Channel,
            _ => return Flow::Close, // "unknown role": the connection is closed
        };
        let mut st = self.lock();
        st.role = role_value;
        st.connect = Some((text(role), text(chan), text(kind)));
        Flow::Continue
    }

    /// Offers the answer to every waiting message, as processLine walks m_waiting.
    fn on_answer(&self, line: &[u8]) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut invalid = false;
        for i in 0..st.pending.len() {
            let p = &mut st.pending[i];
            match decode_answer(line, p.id.as_bytes(), &mut p.processed, &mut p.msg) {
                AnswerDecode::OtherId => {}
                AnswerDecode::Invalid => invalid = true,
                AnswerDecode::Ok => {
                    let p = st.pending.remove(i);
                    if let Some(tx) = p.done {
                        let _ = tx.send((Release::Answered, p.processed, p.msg));
                    }
                    return;
                }
            }
        }
        if invalid {
            st.invalid_answers.push(line.to_vec());
        } else {
            st.unmatched.push(line.to_vec());
        }
    }

    /// `%%>install:[<prio>]:<name>[:<fname>[:<fvalue>]]`, parsed exactly as processLine does.
    fn on_install(&self, rest: &[u8]) -> Vec<u8> {
        let mut prio = 100;
        let mut id = rest;
        if let Some((v, n)) = yate_strtoi(id) {
            prio = v;
            id = &id[n..];
        }
        // Yate quirk: `id >> ":"` uses strstr, so it skips past the first ':' anywhere.
        if let Some(p) = find(id, b':') {
            id = &id[p + 1..];
        }
        // Regexp ^([^:]*):([^:]*):?(.*) — name raw, filter name and value unescaped.
        let (name, filter) = match find(id, b':') {
            None => (id, None),
            Some(p) => {
                let tail = &id[p + 1..];
                let (fname, fvalue) = match find(tail, b':') {
                    Some(q) => (&tail[..q], &tail[q + 1..]),
                    None => (tail, &b""[..]),
                };
                let fname = unesc_lenient(fname);
                (&id[..p], (!fname.is_empty()).then(|| (fname, unesc_lenient(fvalue))))
            }
        };
        let mut st = self.lock();
        let ok = !name.is_empty() && !st.closed && !st.relays.iter().any(|r| r.name == name);
        if ok {
            st.relays.push(Relay { prio, name: name.to_vec(), filter });
        }
        cat(&[b"%%<install:", prio.to_string().as_bytes(), b":", name, b":", bool_text(ok).as_bytes()])
    }

    /// `%%>setlocal:<name>:<value>` (name non-empty): the value is trimmed, never unescaped.
    fn on_setlocal(&self, rest: &[u8]) -> Vec<u8> {
        let col = find(rest, b':').unwrap_or(0);
        let name = &rest[..col];
        let mut val = trim_blanks(&rest[col + 1..]).to_vec();
        let mut guard = self.lock();
        let st = &mut *guard;
        let set = &mut st.set;
        let flag = |v: &mut Vec<u8>, b: &mut bool| {
            *b = to_boolean(v, *b);
            *v = bool_text(*b).into();
            true
        };
        let int = |v: &mut Vec<u8>, x: &mut i32, min, max| {
            *x = to_integer(v, *x, min, max);
            *v = x.to_string().into();
            true
        };
        let ok = match name {
            b"trackparam" if val.is_empty() => {
                val = set.trackparam.clone();
                true
            }
            b"trackparam" => {
                set.trackparam = val.clone();
                true
            }
            b"reason" => {
                set.reason = val.clone();
                true
            }
            b"timeout" => int(&mut val, &mut set.timeout_ms, i32::MIN, i32::MAX),
            b"maxqueue" => int(&mut val, &mut set.maxqueue, 0, 10000),
            b"bufsize" => int(&mut val, &mut set.bufsize, 2048, 65536),
            b"restart" => {
                // only scripts started by the engine with the global role can be restarted
                set.restart = st.scripted && st.role == Role::Global && to_boolean(&val, set.restart);
                val = bool_text(set.restart).into();
                true
            }
            b"timebomb" => flag(&mut val, &mut set.timebomb),
            b"reenter" => flag(&mut val, &mut set.reenter),
            b"setdata" => flag(&mut val, &mut set.setdata),
            b"settime" => flag(&mut val, &mut set.settime),
            b"selfwatch" => flag(&mut val, &mut set.selfwatch),
            b"debuglevel" => {
                // toInteger(DebugAll, 0, DebugTest, DebugAll), then DebugEnabler raises it to DebugVis (3)
                if !val.is_empty() {
                    set.debuglevel = to_integer(&val, 10, 1, 10).max(3);
                }
                val = set.debuglevel.to_string().into();
                true
            }
            b"debugname" => {
                if !val.is_empty() && !set.debugname_set {
                    set.debugname = val.clone();
                    set.debugname_set = true;
                } else {
                    val = set.debugname.clone();
                }
                true
            }
            b"runid" => {
                let ok = val.is_empty();
                val = st.runid.to_string().into();
                ok
            }
            n if n.starts_with(b"engine.") => {
                let param = RUN_PARAMS.iter().find(|(k, _)| k.as_bytes() == &n[7..]);
                let ok = val.is_empty() && param.is_some();
                val = param.map(|(_, v)| v.as_bytes().to_vec()).unwrap_or_default();
                ok
            }
            n if n.starts_with(b"config.") => {
                val.clear(); // the fake has no yate.conf: neither keys nor sections exist
                false
            }
            n if n.starts_with(b"loaded.") => {
                let ok = val.is_empty();
                val = bool_text(&n[7..] == b"extmodule").into();
                ok
            }
            _ => false, // unknown, and `id` / `disconnected`, which need a channel
        };
        st.setlocals.push((text(name), text(&val), ok));
        cat(&[b"%%<setlocal:", name, b":", &val, b":", bool_text(ok).as_bytes()])
    }

    /// A module-originated message, dispatched in its own task (Engine::enqueue). With `reenter`
    /// the module's own relay sees it first; then the test's [`Engine::on_message`] handler.
    async fn run_module_message(&self, id: Vec<u8>, mut msg: Msg) {
        let mut handled = false;
        let reenter = self.lock().set.reenter;
        if reenter {
            let out = self.deliver(msg, None).await;
            handled = out.processed;
            msg = out.msg;
        }
        if !handled {
            // an engine handler for the name, else one for "" (which catches all, as in Yate)
            let handler = {
                let st = self.lock();
                st.handlers.get(&msg.name).or_else(|| st.handlers.get(&b""[..])).cloned()
            };
            if let Some(handler) = handler {
                handled = handler(&mut msg);
            }
        }
        // Post-hooks run inside dispatch(); the answer is sent when the message is destroyed.
        self.post_hooks(&msg, handled, true).await;
        if !id.is_empty() && !self.write_line(encode_answer(&id, handled, &msg)).await {
            self.bomb().await;
        }
    }
}

fn now_secs() -> u32 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as u32).unwrap_or(0)
}

/// ExtModReceiver::run: lines end at '\n' (or a NUL, via strchr/strlen), one trailing '\r' is
/// dropped, empty lines are skipped. A line that leaves no room in `bufsize` closes the module.
async fn read_loop<R: AsyncRead + Unpin>(engine: Engine, mut reader: R) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 65536];
    'read: loop {
        // Yate reads at most bufsize - used - 1 bytes; no room left means overflow.
        let space = engine.bufsize() as isize - buf.len() as isize - 1;
        if space <= 0 {
            engine.lock().overflowed = true;
            break;
        }
        let n = match reader.read(&mut chunk[..space as usize]).await {
            Ok(0) | Err(_) => break, // EOF or read error
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        while let Some(pos) = buf.iter().position(|&c| c == b'\n' || c == 0) {
            let end = if pos > 0 && buf[pos - 1] == b'\r' { pos - 1 } else { pos };
            if end > 0 {
                if engine.process_line(buf[..end].to_vec()).await == Flow::Close {
                    break 'read;
                }
                // "lost data shrinking read buffer": a setlocal bufsize below what is buffered
                if buf.len() >= engine.bufsize() {
                    engine.lock().overflowed = true;
                    break 'read;
                }
            }
            buf.drain(..=pos);
        }
    }
    engine.finish(false, Duration::from_millis(30)).await; // cleanup(): 30 ms, then SIGTERM
}

// ---- The native baseline module ----------------------------------------------------------------

/// The minimal native external module (no wasm): installs `call.route` and answers each
/// `%%>message` with `%%<message:<id>:true::sip/<called>`. Returns at EOF.
pub async fn native_module<R, W>(reader: R, writer: W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut reader = BufReader::new(reader);
    let mut writer = BufWriter::new(writer);
    writer.write_all(b"%%>install:100:call.route\n").await?;
    writer.flush().await?;
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let Some(rest) = line.strip_suffix(b"\n").unwrap_or(&line).strip_prefix(b"%%>message:") else { continue };
        let fields: Vec<&[u8]> = rest.split(|&c| c == b':').collect();
        if fields.len() < 4 {
            continue; // id, time, name, retvalue
        }
        let called = fields[4..]
            .iter()
            .filter_map(|kv| unesc(kv).ok())
            .find_map(|kv| kv.strip_prefix(b"called=").map(<[u8]>::to_vec))
            .unwrap_or_default();
        let answer = cat(&[b"%%<message:", fields[0], b":true::", &esc(&cat(&[b"sip/", &called])), b"\n"]);
        writer.write_all(&answer).await?;
        if reader.buffer().is_empty() {
            writer.flush().await?; // batch answers while more input is already buffered
        }
    }
}

// ---- Tests -------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    /// The engine on one end of a duplex; the test plays the module on the other.
    fn pair(role: Option<&str>) -> (Engine, BufReader<ReadHalf<DuplexStream>>, WriteHalf<DuplexStream>) {
        let (engine_end, module_end) = tokio::io::duplex(1 << 16);
        let (er, ew) = tokio::io::split(engine_end);
        let (mr, mw) = tokio::io::split(module_end);
        (Engine::attach(er, ew, role).unwrap(), BufReader::new(mr), mw)
    }

    async fn read_line(r: &mut BufReader<ReadHalf<DuplexStream>>) -> Option<String> {
        let mut s = String::new();
        let n = tokio::time::timeout(T, r.read_line(&mut s)).await.ok()?.ok()?;
        (n > 0).then(|| s.trim_end_matches('\n').to_string())
    }

    type ModuleFuture = std::pin::Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

    /// A module that installs call.route and answers every message with `reply` ("{id}" and
    /// "{called}" replaced) after `delay(n)` ms for the n-th message, so answers can overtake each other.
    fn replying_module(
        reply: &'static str,
        delay: fn(u64) -> u64,
    ) -> impl FnOnce(ReadHalf<DuplexStream>, WriteHalf<DuplexStream>) -> ModuleFuture {
        move |r, mut w| {
            Box::pin(async move {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
                let writer = tokio::spawn(async move {
                    while let Some(line) = rx.recv().await {
                        w.write_all(&line).await?;
                    }
                    Ok::<_, io::Error>(())
                });
                let _ = tx.send(b"%%>install::call.route\n".to_vec());
                let mut r = BufReader::new(r);
                let (mut line, mut n) = (String::new(), 0);
                while r.read_line(&mut line).await? > 0 {
                    if let Some(rest) = line.trim_end().strip_prefix("%%>message:") {
                        let id = rest.split(':').next().unwrap_or("").to_string();
                        let called = rest.split(':').find_map(|f| f.strip_prefix("called=")).unwrap_or("").to_string();
                        let answer = reply.replace("{id}", &id).replace("{called}", &called) + "\n";
                        let (tx, wait) = (tx.clone(), Duration::from_millis(delay(n)));
                        n += 1;
                        tokio::spawn(async move {
                            tokio::time::sleep(wait).await;
                            let _ = tx.send(answer.into_bytes());
                        });
                    }
                    line.clear();
                }
                drop(tx);
                let _ = writer.await;
                Ok(())
            })
        }
    }

    #[test]
    fn escaping_follows_msg_escape() {
        assert_eq!(esc(b"a:b%c\n\r\t\x01="), b"a%zb%%c%J%M%I%A=");
        assert_eq!(esc_key(b"k=v:"), b"k%}v%z");
        assert_eq!(unesc(b"a%zb%%c%J%M%I%A%_").unwrap(), b"a:b%c\n\r\t\x01\x1f");
        assert_eq!(unesc(b"%Z").unwrap(), b"\x1a"); // the YATEDOC example's "%Z" is not ':'
        assert_eq!(unesc("ü€=".as_bytes()).unwrap(), "ü€=".as_bytes());
        for bad in [&b"%}"[..], b"%@", b"%a", b"%`", b"%", b"ab%", b"x\ty", b"%Z\n"] {
            assert!(unesc(bad).is_err(), "{:?} must be rejected", text(bad));
        }
        let all: Vec<u8> = (1..=255).collect();
        assert_eq!(unesc(&esc(&all)).unwrap(), all);
    }

    #[test]
    fn answers_decode_strictly() {
        let base = Msg::new("call.route", "old", &[("a", "1"), ("b", "2")]);
        let decode = |line: &str| {
            let (mut processed, mut msg) = (false, base.clone());
            (decode_answer(line.as_bytes(), b"0x1.2", &mut processed, &mut msg), processed, msg)
        };
        let (r, p, m) = decode("%%<message:0x1.2:true:");
        assert!(r == AnswerDecode::Ok && p && m == base, "shortest form changes nothing");
        let (r, p, m) = decode("%%<message:0x1.2:false::new:a:c=x=y::b=3");
        assert!(r == AnswerDecode::Ok && !p);
        assert_eq!(
            (m.name_str(), m.retvalue_str(), m.get("a"), m.get_str("c")),
            ("call.route".into(), "new".into(), None, Some("x=y".into()))
        );
        assert_eq!(m.get("b"), Some(&b"3"[..]));
        let (r, p, m) = decode("%%<message:0x1.2: \tyes:other%z1:");
        assert!(r == AnswerDecode::Ok && p && m.name == b"other:1" && m.retvalue.is_empty());
        assert_eq!(decode("%%<message:0x1.2::").0, AnswerDecode::Ok); // empty flag: stays false
        for bad in [
            "%%<message:0x1.2:true",
            "%%<message:0x1.2:1:",
            "%%<message:0x1.2:true :",
            "%%<message:0x1.2:truex:",
            "%%<message:0x1.2:true:name",
            "%%<message:0x1.2:true::r:=v",
            "%%<message:0x1.2:true::r:k%}=v",
            "%%<message:0x1.2:true::r%",
            "%%<message:0x1.2:true::r:a=%@",
        ] {
            assert_eq!(decode(bad).0, AnswerDecode::Invalid, "{bad}");
        }
        assert_eq!(decode("%%<message:0x1.20:true:").0, AnswerDecode::OtherId);
        // Yate quirk: a failing answer has already stored the flag and the fields before the error.
        let (_, p, m) = decode("%%<message:0x1.2:true::r:=v");
        assert!(p && m.retvalue == b"r");
    }

    #[test]
    fn module_messages_decode_strictly() {
        let (id, time, m) = decode_module_message(b"%%>message:a%z1:0x10:test::x=1:y").unwrap();
        assert_eq!((id, time, m.name_str(), m.params.len()), (b"a:1".to_vec(), 16, "test".into(), 1));
        for bad in [
            "%%>message:a:0:test",
            "%%>message:a:-1:test:",
            "%%>message:a:1x:test:",
            "%%>message:a%:0:t:",
            "%%>message:a:0",
        ] {
            assert!(decode_module_message(bad.as_bytes()).is_none(), "{bad}");
        }
    }

    #[tokio::test]
    async fn native_module_installs_call_route() {
        let e = Engine::connect_native();
        assert!(e.wait_installed("call.route", T).await);
        assert_eq!(e.installed(), vec![(100, "call.route".to_string(), None)]);
        assert!(e.wait_for(T, |e| e.engine_lines().contains(&"%%<install:100:call.route:true".into())).await);
        let out = e.dispatch("call.execute", "", &[]).await;
        assert_eq!((out.delivery, out.processed), (Delivery::NotInstalled, false));
    }

    #[tokio::test]
    async fn round_trip_with_awkward_characters() {
        let e = Engine::connect_native();
        assert!(e.wait_installed("call.route", T).await);
        let called = "a:b%c\nd=e\r\t ü€ %z";
        let out = e.dispatch("call.route", "", &[("called", called), ("k=ey", "v")]).await;
        assert!(out.answered() && out.processed, "{out:?}");
        assert_eq!(out.msg.retvalue_str(), format!("sip/{called}"));
        assert_eq!(out.msg.get_str("called").as_deref(), Some(called));
        let sent = e.engine_lines().into_iter().find(|l| l.starts_with("%%>message:")).unwrap();
        assert!(sent.ends_with(":call.route::called=a%zb%%c%Jd=e%M%I ü€ %%z:k%}ey=v"), "{sent}");
        let id = out.id.unwrap();
        assert!(id.starts_with("0x") && id.contains('.'), "Yate-style id {id}");
    }

    #[tokio::test]
    async fn pipelining_matches_out_of_order_answers() {
        let e = Engine::connect_module(replying_module("%%<message:{id}:true::sip/{called}", |n| (n % 4) * 3));
        assert!(e.wait_installed("call.route", T).await);
        let outs = e.pipeline_outcomes("call.route", 256, 32, |i| vec![("called".into(), i.to_string())]).await;
        assert_eq!(outs.len(), 256);
        for (i, o) in outs.iter().enumerate() {
            assert!(o.answered() && o.msg.retvalue_str() == format!("sip/{i}"), "{i}: {o:?}");
        }
        assert!((16..=32).contains(&e.max_in_flight()), "in flight {}", e.max_in_flight());
        let ids = |lines: Vec<String>, prefix: &str| -> Vec<String> {
            lines
                .iter()
                .filter_map(|l| l.strip_prefix(prefix))
                .map(|r| r.split(':').next().unwrap().to_string())
                .collect()
        };
        let (sent, answered) = (ids(e.engine_lines(), "%%>message:"), ids(e.sent_lines(), "%%<message:"));
        let mut sorted = answered.clone();
        sorted.sort();
        let mut expected = sent.clone();
        expected.sort();
        assert_eq!(sorted, expected);
        assert_ne!(sent, answered, "answers should have come back out of order");
        assert!(e.unmatched().is_empty() && e.invalid_answers().is_empty());
        assert_eq!(e.pipeline("call.route", 10, 4, |_| vec![]).await.len(), 10);
    }

    #[tokio::test]
    async fn rejected_answer_times_out_and_late_answer_is_unmatched() {
        let e = Engine::connect_module(replying_module("%%<message:{id}:true::ret:=bad", |_| 0));
        assert!(e.wait_installed("call.route", T).await);
        let out = e.dispatch_timeout("call.route", "", &[], Duration::from_millis(200)).await;
        assert_eq!(out.delivery, Delivery::TimedOut);
        assert!(out.processed && out.msg.retvalue == b"ret", "Yate quirk: flag and retvalue stick");
        assert_eq!(e.invalid_answers().len(), 1);
        assert!(e.unmatched().is_empty() && e.errors_sent().is_empty(), "answers never get Error in");

        let late = Engine::connect_module(replying_module("%%<message:{id}:true::", |_| 150));
        assert!(late.wait_installed("call.route", T).await);
        let out = late.dispatch_timeout("call.route", "", &[], Duration::from_millis(30)).await;
        assert_eq!((out.delivery, out.processed), (Delivery::TimedOut, false));
        assert!(late.wait_for(T, |e| e.unmatched().len() == 1).await);
    }

    #[tokio::test]
    async fn module_eof_releases_waiting_messages_and_timebomb_kills() {
        let (e, mut r, mut w) = pair(Some("global"));
        w.write_all(b"%%>install::x\n").await.unwrap();
        assert_eq!(read_line(&mut r).await.as_deref(), Some("%%<install:100:x:true"));
        let engine = e.clone();
        let call = tokio::spawn(async move { engine.dispatch("x", "", &[]).await });
        assert!(read_line(&mut r).await.unwrap().starts_with("%%>message:"));
        w.shutdown().await.unwrap(); // EOF on the module's output
        assert_eq!(call.await.unwrap().delivery, Delivery::ModuleGone);
        assert!(e.closed() && e.installed().is_empty());

        let (e, mut r, mut w) = pair(Some("global"));
        w.write_all(b"%%>setlocal:timebomb:on\n%%>install::x\n").await.unwrap();
        assert_eq!(read_line(&mut r).await.as_deref(), Some("%%<setlocal:timebomb:true:true"));
        assert_eq!(read_line(&mut r).await.as_deref(), Some("%%<install:100:x:true"));
        let out = e.dispatch_timeout("x", "", &[], Duration::from_millis(50)).await;
        assert_eq!(out.delivery, Delivery::TimedOut);
        assert!(read_line(&mut r).await.unwrap().starts_with("%%>message:"));
        assert_eq!(read_line(&mut r).await, None, "die() closed the module");
        assert!(e.closed());
    }

    #[tokio::test]
    async fn overflowing_line_closes_the_module() {
        let (e, mut r, mut w) = pair(Some("global"));
        let fits = "x".repeat(8190); // + '\n' = bufsize - 1 bytes: the longest line that fits
        w.write_all(format!("{fits}\n{fits}x\n").as_bytes()).await.unwrap();
        assert_eq!(read_line(&mut r).await, Some(format!("Error in: {fits}")));
        assert_eq!(read_line(&mut r).await, None, "the engine closed the module");
        assert!(e.overflowed() && e.closed());
    }

    #[tokio::test]
    async fn garbage_gets_error_in_and_quit_ends_the_session() {
        let (e, mut r, mut w) = pair(Some("global"));
        let lines = concat!(
            "hello\r\n\n\r\nab\0cd\n", // CR stripped, empty lines skipped, NUL ends a line
            "%%>quit:\n%%<install:1:x:true\n%%>connect:global\n%%>debug:x\n%%>setlocal:bufsize\n"
        );
        w.write_all(lines.as_bytes()).await.unwrap();
        for l in [
            "hello",
            "ab",
            "cd",
            "%%>quit:",
            "%%<install:1:x:true",
            "%%>connect:global",
            "%%>debug:x",
            "%%>setlocal:bufsize",
        ] {
            assert_eq!(read_line(&mut r).await, Some(format!("Error in: {l}")));
        }
        w.write_all(b"%%>output:  hi  \n%%>debug:3:a%zb\n%%>install::x\n%%>quit\n%%>install::y\n").await.unwrap();
        assert_eq!(read_line(&mut r).await.as_deref(), Some("%%<install:100:x:true"));
        assert_eq!(read_line(&mut r).await.as_deref(), Some("%%<quit"));
        assert_eq!(read_line(&mut r).await, None);
        assert!(e.quit_received() && e.wait_closed(T).await && e.installed().is_empty());
        assert_eq!((e.outputs(), e.debugs()), (vec!["hi".to_string()], vec![(3, "a:b".to_string())]));
        assert!(!e.sent_lines().contains(&"%%>install::y".to_string()));
        assert_eq!(e.dispatch("x", "", &[]).await.delivery, Delivery::NotInstalled);
    }

    #[tokio::test]
    async fn install_watch_setlocal_answers() {
        let (e, mut r, mut w) = pair(Some("global"));
        let script = [
            ("%%>install::engine.timer", "%%<install:100:engine.timer:true"),
            ("%%>install:50:call.route:called:1%z2", "%%<install:50:call.route:true"),
            ("%%>install:50:call.route", "%%<install:50:call.route:false"),
            ("%%>install:", "%%<install:100::false"),
            ("%%>install:foo:bar:baz", "%%<install:100:bar:true"), // Yate quirk (strstr)
            ("%%>uninstall:engine.timer", "%%<uninstall:100:engine.timer:true"),
            ("%%>uninstall:engine.timer", "%%<uninstall:0:engine.timer:false"),
            ("%%>watch:", "%%<watch::true"),
            ("%%>watch:", "%%<watch::false"),
            ("%%>unwatch:x", "%%<unwatch:x:false"),
            ("%%>setlocal:bufsize:100", "%%<setlocal:bufsize:2048:true"),
            ("%%>setlocal:timeout: 250 ", "%%<setlocal:timeout:250:true"),
            ("%%>setlocal:timeout:abc", "%%<setlocal:timeout:250:true"),
            ("%%>setlocal:maxqueue:20000", "%%<setlocal:maxqueue:10000:true"),
            ("%%>setlocal:reenter:yes", "%%<setlocal:reenter:true:true"),
            ("%%>setlocal:selfwatch:", "%%<setlocal:selfwatch:false:true"),
            ("%%>setlocal:restart:true", "%%<setlocal:restart:false:true"),
            ("%%>setlocal:engine.version:", "%%<setlocal:engine.version:6.4.1:true"),
            ("%%>setlocal:engine.version:7", "%%<setlocal:engine.version:6.4.1:false"),
            ("%%>setlocal:nosuch:a%zb", "%%<setlocal:nosuch:a%zb:false"),
            ("%%>setlocal:debugname:mine", "%%<setlocal:debugname:mine:true"),
            ("%%>setlocal:debugname:other", "%%<setlocal:debugname:mine:true"),
            ("%%>setlocal::1", "Error in: %%>setlocal::1"),
        ];
        for (line, answer) in script {
            w.write_all(format!("{line}\n").as_bytes()).await.unwrap();
            assert_eq!(read_line(&mut r).await.as_deref(), Some(answer), "after {line}");
        }
        let filter = Some(("called".to_string(), "1:2".to_string()));
        assert_eq!(
            e.installed(),
            vec![(50, "call.route".into(), filter), (100, "bar".into(), Some(("baz".into(), "".into())))]
        );
        assert_eq!((e.bufsize(), e.timeout_ms(), e.watched()), (2048, 250, vec![String::new()]));
        e.set_timeout_ms(5000); // the test answers by hand below

        // The filter refuses: not installed, but the catch-all watcher still hears of it.
        let out = e.dispatch("call.route", "", &[("called", "3")]).await;
        assert_eq!(out.delivery, Delivery::NotInstalled);
        assert_eq!(read_line(&mut r).await.as_deref(), Some("%%<message::false:call.route::called=3"));
        let engine = e.clone();
        let call = tokio::spawn(async move { engine.dispatch("call.route", "", &[("called", "1:2")]).await });
        let sent = read_line(&mut r).await.unwrap();
        let id = sent.strip_prefix("%%>message:").unwrap().split(':').next().unwrap().to_string();
        w.write_all(format!("%%<message:{id}:true:renamed:ok:x=1\n").as_bytes()).await.unwrap();
        let out = call.await.unwrap();
        assert!(
            out.answered()
                && out.processed
                && out.msg.name == b"renamed"
                && out.msg.get_str("x").as_deref() == Some("1")
        );
        assert_eq!(read_line(&mut r).await.as_deref(), Some("%%<message::true:renamed:ok:called=1%z2:x=1"));
    }

    #[tokio::test]
    async fn module_messages_are_answered_after_dispatch() {
        let (e, mut r, mut w) = pair(Some("channel"));
        e.on_message("test.ping", |m| {
            m.retvalue = b"pong".to_vec();
            m.set("x", "1:2");
            true
        });
        w.write_all(b"%%>message::0:test.ping::\n%%>message:abc.1:0:test.ping:ping:a=1\n").await.unwrap();
        assert_eq!(read_line(&mut r).await.as_deref(), Some("%%<message:abc.1:true:test.ping:pong:a=1:x=1%z2"));
        w.write_all(b"%%>message:q:0:other:rv\n%%>message:q:0:other\n").await.unwrap();
        let mut got = vec![read_line(&mut r).await.unwrap(), read_line(&mut r).await.unwrap()];
        got.sort();
        assert_eq!(got, vec!["%%<message:q:false:other:rv".to_string(), "Error in: %%>message:q:0:other".into()]);
        assert_eq!(e.module_messages().len(), 3, "the empty-id one was dispatched, never answered");
    }

    #[tokio::test]
    async fn tcp_listener_roles_and_reconnects() {
        use tokio::net::TcpStream;
        let (addr, listener) = Engine::listen_tcp(None).unwrap();
        let mut bad = TcpStream::connect(addr).await.unwrap();
        bad.write_all(b"%%>install::x\n").await.unwrap();
        let first = listener.accept().await.unwrap();
        assert!(first.wait_closed(T).await);
        assert_eq!(bad.read(&mut [0u8; 16]).await.unwrap(), 0);

        let mut good = TcpStream::connect(addr).await.unwrap();
        good.write_all(b"%%>connect:channel:chan/1:nodata\n%%>install::x\n").await.unwrap();
        let second = listener.accept().await.unwrap();
        assert!(second.wait_for(T, |e| e.engine_lines() == ["%%<install:100:x:true"]).await);
        assert_eq!(second.connected_as(), Some(("channel".into(), "chan/1".into(), "nodata".into())));
        second.kill().await;
        assert_eq!(good.read(&mut [0u8; 64]).await.unwrap_or(0), "%%<install:100:x:true\n".len());

        let mut unknown = TcpStream::connect(addr).await.unwrap();
        unknown.write_all(b"%%>connect:play\n").await.unwrap();
        assert!(listener.accept().await.unwrap().wait_closed(T).await);

        let (addr, listener) = Engine::listen_tcp(Some("global")).unwrap();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"%%>connect:global\n").await.unwrap();
        let e = listener.accept().await.unwrap();
        assert!(e.wait_for(T, |e| e.errors_sent() == ["Error in: %%>connect:global"]).await);
        assert!(Engine::listen_tcp(Some("playrec")).is_err());

        let path = std::env::temp_dir().join(format!("fakeyate-{}.sock", std::process::id()));
        let listener = Engine::listen_unix(&path, Some("global")).unwrap();
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        s.write_all(b"%%>install::over.unix\n").await.unwrap();
        assert!(listener.accept().await.unwrap().wait_installed("over.unix", T).await);
        drop(listener);
        let _ = std::fs::remove_file(&path);
    }

    #[tokio::test]
    async fn spawned_script_gets_one_argument_and_eof() {
        let path = std::env::temp_dir().join(format!("fakeyate-{}.sh", std::process::id()));
        let script = concat!(
            "#!/bin/sh\n",
            "echo \"argc=$# arg=[$1] foo=$FOO\" >&2\n",
            "echo '%%>install::x'\n",
            "read l\n",
            "echo \"got=$l\" >&2\n",
            "cat >/dev/null\n",
            "echo bye >&2\n"
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let e = Engine::command(&path).env("FOO", "bar").spawn("  hello world ").unwrap();
        assert!(e.wait_installed("x", T).await);
        assert!(e.wait_for(T, |e| e.stderr().contains("got=%%<install:100:x:true")).await);
        assert!(e.stderr().contains("argc=1 arg=[hello world] foo=bar"), "{}", e.stderr());
        e.close_input().await;
        assert!(e.wait_exit(T).await.is_some_and(|s| s.success()));
        assert!(e.wait_closed(T).await && e.stderr().contains("bye"));
        let _ = std::fs::remove_file(&path);
    }
}
