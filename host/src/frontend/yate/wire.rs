//! The line codec of Yate's external-module protocol, module side: escaping, parsing the lines the engine
//! sends, writing the lines we send, and framing the byte stream into lines (`protocols.md` §1).

use std::collections::VecDeque;

/// Everything that can be wrong with a line, in either direction. Offsets count bytes from the start of the
/// line (or of the input, for [`unescape`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("{field}: raw control byte 0x{byte:02x} at offset {offset}")]
    ControlByte { field: &'static str, offset: usize, byte: u8 },
    #[error("{field}: invalid escape at offset {offset}")]
    BadEscape { field: &'static str, offset: usize },
    #[error("{field} at offset {offset} is not valid UTF-8")]
    NotUtf8 { field: &'static str, offset: usize },
    #[error("line ends before the {field} field")]
    MissingField { field: &'static str },
    #[error("{field} is not a boolean: {value:?}")]
    BadBool { field: &'static str, value: String },
    #[error("{field} is not a decimal number: {value:?}")]
    BadNumber { field: &'static str, value: String },
    #[error("parameter at offset {offset} has an empty key")]
    EmptyKey { offset: usize },
    #[error("unknown line keyword {keyword:?}")]
    Unknown { keyword: String },
    #[error("parameter key {key:?} {reason}")]
    BadKey { key: String, reason: &'static str },
    #[error("{field} {name:?} {reason}")]
    BadName { field: &'static str, name: String, reason: &'static str },
    #[error("{field} {reason}")]
    BadValue { field: String, reason: &'static str },
    #[error("install priority {priority} is outside 0..=2147483647 (the engine reads a C int)")]
    BadPriority { priority: i64 },
    #[error("message time {time} does not fit the engine's 32-bit unsigned seconds")]
    BadTime { time: u64 },
    #[error("connect role {role:?} is neither global nor channel")]
    BadRole { role: String },
    #[error("line of at least {len} bytes exceeds the {max}-byte limit")]
    Overlong { len: usize, max: usize },
}
use WireError as E;
type R<T = ()> = Result<T, WireError>;

const NUL: &str = "contains a NUL byte, which the engine's C strings cannot carry";

/// msgEscape (String.cpp:1800-1820): a byte < 0x20, ':' or `extra` becomes '%' + (c + 0x40), '%' becomes
/// "%%", anything else (UTF-8 included) is copied. A NUL becomes "%@", which the engine cannot decode: the
/// writers below refuse NUL before escaping.
pub fn escape(out: &mut Vec<u8>, bytes: &[u8], extra: Option<u8>) {
    let mut run = 0;
    for (i, &c) in bytes.iter().enumerate() {
        let code = if c < 0x20 || c == b':' || Some(c) == extra {
            c.wrapping_add(0x40)
        } else if c == b'%' {
            b'%'
        } else {
            continue;
        };
        out.extend_from_slice(&bytes[run..i]);
        out.extend_from_slice(&[b'%', code]);
        run = i + 1;
    }
    out.extend_from_slice(&bytes[run..]);
}

/// msgUnescape (String.cpp:1822-1857): a raw byte < 0x20 is an error; '%' + 'A'..='_' decodes to c - 0x40,
/// "%z" to ':', '%' + (extra + 0x40) to `extra`, "%%" to '%'; anything else after '%' (also the end of the
/// input, "%@", and "%}" with no extra) is an error.
pub fn unescape(bytes: &[u8], extra: Option<u8>) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(bytes.len());
    unescape_into(&mut out, bytes, extra, "input", 0)?;
    Ok(out)
}

fn unescape_into(out: &mut Vec<u8>, bytes: &[u8], extra: Option<u8>, field: &'static str, base: usize) -> R {
    let extra_code = extra.map(|e| e.wrapping_add(0x40));
    let mut i = 0;
    while let Some(&c) = bytes.get(i) {
        if c < 0x20 {
            return Err(E::ControlByte { field, offset: base + i, byte: c });
        }
        if c != b'%' {
            out.push(c);
            i += 1;
            continue;
        }
        let decoded = match bytes.get(i + 1) {
            Some(&n) if (0x41..=0x5f).contains(&n) || n == b'z' || Some(n) == extra_code => n.wrapping_sub(0x40),
            Some(b'%') => b'%',
            _ => return Err(E::BadEscape { field, offset: base + i }),
        };
        out.push(decoded);
        i += 2;
    }
    Ok(())
}

/// The engine's `String >> bool` followed by its "nothing left" check (String.cpp:999-1000, 1243-1266):
/// optional leading blanks, one of the words, then nothing. Empty input is `None`; where the engine reads an
/// empty field as false, the caller decides that.
pub fn parse_bool(field: &[u8]) -> Option<bool> {
    let start = field.iter().position(|&b| b != b' ' && b != b'\t')?;
    match &field[start..] {
        b"false" | b"no" | b"off" | b"disable" | b"f" => Some(false),
        b"true" | b"yes" | b"on" | b"enable" | b"t" => Some(true),
        _ => None,
    }
}

/// A line from the engine, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// `%%>message:<id>:<time>:<name>:<retvalue>[:<key>=<value>...]`: the engine asks us to handle a message.
    Message(Message),
    /// `%%<message:<id>:<processed>:<name>:<retvalue>[:params]`, id non-empty: the answer to one we dispatched.
    Answer(Answer),
    /// The same line with an empty id: a watcher notification, never answered.
    Watched(Answer),
    /// `%%<install:<priority>:<name>:<success>`.
    Installed { priority: i64, name: String, ok: bool },
    /// `%%<uninstall:<priority>:<name>:<success>` (priority 0 when nothing was installed).
    Uninstalled { priority: i64, name: String, ok: bool },
    /// `%%<watch:<name>:<success>`.
    Watching { name: String, ok: bool },
    /// `%%<unwatch:<name>:<success>`.
    Unwatching { name: String, ok: bool },
    /// `%%<setlocal:<name>:<value>:<success>`; the value is raw and may contain ':'.
    SetLocal { name: String, value: String, ok: bool },
    /// `%%<quit`.
    Quit,
    /// `Error in: <original line>` (or `Error in:<line>`, as YATEDOC writes it); lossy UTF-8.
    ErrorIn(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The id field exactly as received, still escaped: the engine matches our answer on it byte for byte.
    pub id: Vec<u8>,
    pub time: u64,
    pub name: String,
    pub retvalue: String,
    pub params: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Unescaped.
    pub id: String,
    pub handled: bool,
    pub name: String,
    pub retvalue: String,
    pub params: Vec<(String, String)>,
}

fn colon(line: &[u8], from: usize) -> Option<usize> {
    line.get(from..)?.iter().position(|&b| b == b':').map(|p| from + p)
}

fn text(bytes: &[u8], extra: Option<u8>, field: &'static str, base: usize) -> R<String> {
    let mut v = Vec::with_capacity(bytes.len());
    unescape_into(&mut v, bytes, extra, field, base)?;
    String::from_utf8(v).map_err(|_| E::NotUtf8 { field, offset: base })
}

fn raw(bytes: &[u8], field: &'static str, base: usize) -> R<String> {
    std::str::from_utf8(bytes).map(str::to_owned).map_err(|_| E::NotUtf8 { field, offset: base })
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(64)]).into_owned()
}

/// The first and the last ':' of a reply whose middle field is raw and may hold ':' itself.
fn outer_colons(body: &[u8], middle: &'static str) -> R<(usize, usize)> {
    let first = colon(body, 0).ok_or(E::MissingField { field: middle })?;
    let last = body.iter().rposition(|&b| b == b':').filter(|&l| l > first);
    Ok((first, last.ok_or(E::MissingField { field: "success" })?))
}

fn success(bytes: &[u8]) -> R<bool> {
    parse_bool(bytes).ok_or_else(|| E::BadBool { field: "success", value: lossy(bytes) })
}

/// Parses one line, given without its '\n'; one trailing '\r' is stripped here too.
pub fn parse(line: &[u8]) -> Result<Incoming, WireError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if let Some(rest) = line.strip_prefix(b"Error in:") {
        return Ok(Incoming::ErrorIn(String::from_utf8_lossy(rest.strip_prefix(b" ").unwrap_or(rest)).into_owned()));
    }
    if line == b"%%<quit" {
        return Ok(Incoming::Quit);
    }
    let kw_end = colon(line, 0).unwrap_or(line.len());
    let s = kw_end + 1;
    let body = line.get(s..).unwrap_or_default();
    match &line[..kw_end] {
        b"%%>message" => parse_message(line, s).map(Incoming::Message),
        b"%%<message" => parse_answer(line, s),
        kw @ (b"%%<install" | b"%%<uninstall") => {
            let (first, last) = outer_colons(body, "name")?;
            let p = &body[..first];
            let priority = std::str::from_utf8(p).ok().and_then(|p| p.parse().ok());
            let priority = priority.ok_or_else(|| E::BadNumber { field: "priority", value: lossy(p) })?;
            let name = raw(&body[first + 1..last], "name", s + first + 1)?;
            let ok = success(&body[last + 1..])?;
            Ok(if kw == b"%%<install" {
                Incoming::Installed { priority, name, ok }
            } else {
                Incoming::Uninstalled { priority, name, ok }
            })
        }
        kw @ (b"%%<watch" | b"%%<unwatch") => {
            let last = body.iter().rposition(|&b| b == b':').ok_or(E::MissingField { field: "success" })?;
            let (name, ok) = (raw(&body[..last], "name", s)?, success(&body[last + 1..])?);
            Ok(if kw == b"%%<watch" { Incoming::Watching { name, ok } } else { Incoming::Unwatching { name, ok } })
        }
        b"%%<setlocal" => {
            let (first, last) = outer_colons(body, "value")?;
            let name = raw(&body[..first], "name", s)?;
            let value = raw(&body[first + 1..last], "value", s + first + 1)?;
            Ok(Incoming::SetLocal { name, value, ok: success(&body[last + 1..])? })
        }
        kw => Err(E::Unknown { keyword: lossy(kw) }),
    }
}

/// Message::decode(str, id) (Message.cpp:127-152): id and time, then the common part.
fn parse_message(line: &[u8], s: usize) -> R<Message> {
    let id_end = colon(line, s).ok_or(E::MissingField { field: "time" })?;
    let id = &line[s..id_end];
    // Checked only: the id goes back verbatim.
    unescape_into(&mut Vec::new(), id, None, "message id", s)?;
    let t_end = colon(line, id_end + 1).ok_or(E::MissingField { field: "message name" })?;
    let t = &line[id_end + 1..t_end];
    let time = match t {
        [] => Some(0),
        _ if t.iter().all(u8::is_ascii_digit) => std::str::from_utf8(t).ok().and_then(|t| t.parse().ok()),
        _ => None,
    };
    let time = time.ok_or_else(|| E::BadNumber { field: "time", value: lossy(t) })?;
    let (name, retvalue, params) = common(line, t_end + 1)?;
    Ok(Message { id: id.to_vec(), time, name, retvalue, params })
}

fn parse_answer(line: &[u8], s: usize) -> R<Incoming> {
    let id_end = colon(line, s).ok_or(E::MissingField { field: "processed" })?;
    let id = text(&line[s..id_end], None, "message id", s)?;
    let p_end = colon(line, id_end + 1).ok_or(E::MissingField { field: "message name" })?;
    let p = &line[id_end + 1..p_end];
    // As the engine reads it: an empty flag is false.
    let handled = match p {
        [] => false,
        _ => parse_bool(p).ok_or_else(|| E::BadBool { field: "processed", value: lossy(p) })?,
    };
    // Message.cpp:168: nothing after the flag's ':' is a valid answer that changes nothing.
    let (name, retvalue, params) = if p_end + 1 == line.len() { Default::default() } else { common(line, p_end + 1)? };
    let answer = Answer { id, handled, name, retvalue, params };
    Ok(if answer.id.is_empty() { Incoming::Watched(answer) } else { Incoming::Answer(answer) })
}

type Common = (String, String, Vec<(String, String)>);

/// Message::commonDecode (Message.cpp:182-234), except for the keys: the engine *encodes* them with '=' as
/// extra (Message.cpp:171-180), so each chunk is split at its first raw '=' (which only a key's end can be)
/// and the key unescaped with '=' as extra. For keys without "%}" that is the engine's own decoding.
fn common(line: &[u8], s: usize) -> R<Common> {
    let name_end = colon(line, s).ok_or(E::MissingField { field: "retvalue" })?;
    let name = text(&line[s..name_end], None, "message name", s)?;
    let ret_end = colon(line, name_end + 1).unwrap_or(line.len());
    let retvalue = text(&line[name_end + 1..ret_end], None, "retvalue", name_end + 1)?;
    let mut params = Vec::new();
    let mut pos = ret_end;
    while pos < line.len() {
        let start = pos + 1;
        pos = colon(line, start).unwrap_or(line.len());
        let chunk = &line[start..pos];
        // The engine skips empty chunks ("a::b") too.
        if chunk.is_empty() {
            continue;
        }
        let (key, value, v_off) = match chunk.iter().position(|&b| b == b'=') {
            Some(e) => (&chunk[..e], &chunk[e + 1..], start + e + 1),
            None => (chunk, &b""[..], pos),
        };
        if key.is_empty() {
            return Err(E::EmptyKey { offset: start });
        }
        params.push((text(key, Some(b'='), "parameter key", start)?, text(value, None, "parameter value", v_off)?));
    }
    Ok((name, retvalue, params))
}

/// Runs a writer and adds the '\n', or leaves `out` as it was.
fn line_with(out: &mut Vec<u8>, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    let mark = out.len();
    let r = f(out);
    match r {
        Ok(()) => out.push(b'\n'),
        Err(_) => out.truncate(mark),
    }
    r
}

fn no_nul(s: &str, field: impl FnOnce() -> String) -> R {
    if s.as_bytes().contains(&0) {
        return Err(E::BadValue { field: field(), reason: NUL });
    }
    Ok(())
}

/// Keys are decoded by the engine without the '=' escape, so a "%}" would be rejected and a raw '=' would
/// split the key: neither can be sent.
fn key(out: &mut Vec<u8>, key: &str) -> R {
    let reason = if key.is_empty() {
        "is empty"
    } else if key.contains('=') {
        "contains '=', which the engine cannot read back in a key"
    } else if key.contains('\0') {
        NUL
    } else {
        out.push(b':');
        escape(out, key.as_bytes(), None);
        return Ok(());
    };
    Err(E::BadKey { key: key.to_owned(), reason })
}

fn write_params(out: &mut Vec<u8>, set: &[(String, String)]) -> R {
    for (k, v) in set {
        key(out, k)?;
        no_nul(v, || format!("value of parameter {k:?}"))?;
        out.push(b'=');
        escape(out, v.as_bytes(), None);
    }
    Ok(())
}

/// Fields the engine reads raw (not unescaped) must not hold ':' (the separator) nor control bytes.
fn raw_name(out: &mut Vec<u8>, name: &str, field: &'static str, allow_empty: bool) -> R {
    let reason = if name.is_empty() && !allow_empty {
        "is empty"
    } else if name.contains(':') {
        "contains ':' and is sent raw"
    } else if name.bytes().any(|b| b < 0x20) {
        "contains a control byte and is sent raw"
    } else {
        out.extend_from_slice(name.as_bytes());
        return Ok(());
    };
    Err(E::BadName { field, name: name.to_owned(), reason })
}

/// Our answer to an engine `%%>message`: `%%<message:<id>:<true|false>:<name>:<retvalue>[:key=value...][:key...]`.
/// `id` is the received [`Message::id`], written verbatim. An empty `name` keeps the engine's; `retvalue`
/// always replaces the engine's (pass the received one to keep it). `set` sets parameters, `unset` deletes them.
pub fn write_answer(
    out: &mut Vec<u8>,
    id: &[u8],
    processed: bool,
    name: &str,
    retvalue: &str,
    set: &[(String, String)],
    unset: &[String],
) -> Result<(), WireError> {
    line_with(out, |out| {
        if id.is_empty() || id.iter().any(|&b| b < 0x20 || b == b':') {
            let reason = "must be the non-empty id received, without ':' or control bytes";
            return Err(E::BadValue { field: "message id".into(), reason });
        }
        no_nul(name, || "message name".into())?;
        no_nul(retvalue, || "retvalue".into())?;
        out.extend_from_slice(b"%%<message:");
        out.extend_from_slice(id);
        out.extend_from_slice(if processed { b":true:" } else { b":false:" });
        escape(out, name.as_bytes(), None);
        out.push(b':');
        escape(out, retvalue.as_bytes(), None);
        write_params(out, set)?;
        unset.iter().try_for_each(|k| key(out, k))
    })
}

/// A message we dispatch: `%%>message:<id>:<time>:<name>:<retvalue>[:key=value...]`. An empty id is fire and
/// forget (no answer comes); a time of 0 means "now" to the engine, which reads at most `u32::MAX`.
pub fn write_message(
    out: &mut Vec<u8>,
    id: &str,
    time: u64,
    name: &str,
    retvalue: &str,
    params: &[(String, String)],
) -> Result<(), WireError> {
    line_with(out, |out| {
        if time > u64::from(u32::MAX) {
            return Err(E::BadTime { time });
        }
        if name.is_empty() {
            return Err(E::BadName { field: "message name", name: String::new(), reason: "is empty" });
        }
        no_nul(id, || "message id".into())?;
        no_nul(name, || "message name".into())?;
        no_nul(retvalue, || "retvalue".into())?;
        out.extend_from_slice(b"%%>message:");
        escape(out, id.as_bytes(), None);
        out.extend_from_slice(format!(":{time}:").as_bytes());
        escape(out, name.as_bytes(), None);
        out.push(b':');
        escape(out, retvalue.as_bytes(), None);
        write_params(out, params)
    })
}

/// `%%>install:[<priority>]:<name>[:<filter-name>[:<filter-value>]]`. No priority means the engine's 100.
/// The name is read raw; the filter name (non-empty, or the engine silently drops the filter) and value are
/// escaped.
pub fn write_install(
    out: &mut Vec<u8>,
    priority: Option<i64>,
    name: &str,
    filter: Option<(&str, Option<&str>)>,
) -> Result<(), WireError> {
    line_with(out, |out| {
        out.extend_from_slice(b"%%>install:");
        if let Some(priority) = priority {
            if !(0..=i64::from(i32::MAX)).contains(&priority) {
                return Err(E::BadPriority { priority });
            }
            out.extend_from_slice(priority.to_string().as_bytes());
        }
        out.push(b':');
        raw_name(out, name, "install name", false)?;
        if let Some((fname, fvalue)) = filter {
            if fname.is_empty() {
                return Err(E::BadName { field: "filter name", name: String::new(), reason: "is empty" });
            }
            no_nul(fname, || "filter name".into())?;
            out.push(b':');
            escape(out, fname.as_bytes(), None);
            if let Some(fvalue) = fvalue {
                no_nul(fvalue, || "filter value".into())?;
                out.push(b':');
                escape(out, fvalue.as_bytes(), None);
            }
        }
        Ok(())
    })
}

/// `%%>uninstall:<name>`, name raw and non-empty.
pub fn write_uninstall(out: &mut Vec<u8>, name: &str) -> Result<(), WireError> {
    raw_command(out, "%%>uninstall:", name, "uninstall name", false)
}

/// `%%>watch:<name>`, name raw; an empty name watches every message.
pub fn write_watch(out: &mut Vec<u8>, name: &str) -> Result<(), WireError> {
    raw_command(out, "%%>watch:", name, "watch name", true)
}

/// `%%>unwatch:<name>`, name raw.
pub fn write_unwatch(out: &mut Vec<u8>, name: &str) -> Result<(), WireError> {
    raw_command(out, "%%>unwatch:", name, "unwatch name", true)
}

fn raw_command(out: &mut Vec<u8>, cmd: &str, name: &str, field: &'static str, allow_empty: bool) -> R {
    line_with(out, |out| {
        out.extend_from_slice(cmd.as_bytes());
        raw_name(out, name, field, allow_empty)
    })
}

/// `%%>setlocal:<name>:<value>`. The engine neither unescapes nor keeps the value's outer blanks, so a value
/// with control bytes or leading/trailing spaces cannot be sent. An empty value queries.
pub fn write_setlocal(out: &mut Vec<u8>, name: &str, value: &str) -> Result<(), WireError> {
    line_with(out, |out| {
        out.extend_from_slice(b"%%>setlocal:");
        raw_name(out, name, "setlocal name", false)?;
        let reason = if value.bytes().any(|b| b < 0x20) {
            "contains a control byte and is sent raw"
        } else if value.starts_with(' ') || value.ends_with(' ') {
            "has leading or trailing blanks, which the engine trims"
        } else {
            out.push(b':');
            out.extend_from_slice(value.as_bytes());
            return Ok(());
        };
        Err(E::BadValue { field: format!("setlocal value {value:?}"), reason })
    })
}

/// `%%>connect:<role>`; this engine accepts only `global` and `channel`.
pub fn write_connect(out: &mut Vec<u8>, role: &str) -> Result<(), WireError> {
    if role != "global" && role != "channel" {
        return Err(E::BadRole { role: role.to_owned() });
    }
    out.extend_from_slice(format!("%%>connect:{role}\n").as_bytes());
    Ok(())
}

/// `%%>output:<text>`, for the engine's log. The text is sent raw, so each control byte (a newline would end
/// the line) is replaced by a space rather than failing: this is a log line, not data.
pub fn write_output(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(b"%%>output:");
    out.extend(text.bytes().map(|b| if b < 0x20 { b' ' } else { b }));
    out.push(b'\n');
}

/// `%%>quit`.
pub fn write_quit(out: &mut Vec<u8>) {
    out.extend_from_slice(b"%%>quit\n");
}

/// Frames a byte stream into lines, skipping empty ones and stripping one '\r'. A line longer than `max`
/// bytes (its '\n' not counted, a '\r' counted) is dropped whole and reported once, in order, as
/// [`WireError::Overlong`]. An unfinished line is never buffered past `max` bytes (the rest of an overlong
/// one is skipped as it arrives), so the buffer holds at most the complete lines of pushes not yet read
/// plus `max` bytes.
#[derive(Debug)]
pub struct LineBuffer {
    buf: Vec<u8>,
    /// First byte not yet returned.
    start: usize,
    /// First byte of the unfinished last line: no '\n' lies beyond it.
    tail: usize,
    max: usize,
    /// Skipping the rest of an overlong line until its '\n'.
    discarding: bool,
    /// (position in `buf`, bytes seen) of the overlong lines dropped there, still to be reported.
    dropped: VecDeque<(usize, usize)>,
}

impl LineBuffer {
    pub fn new(max: usize) -> Self {
        LineBuffer { buf: Vec::new(), start: 0, tail: 0, max, discarding: false, dropped: VecDeque::new() }
    }

    /// Bytes held and not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Adds bytes as read. Reading every line before the next push keeps the buffer within its bound.
    pub fn push(&mut self, mut bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.tail -= self.start;
            self.dropped.iter_mut().for_each(|d| d.0 -= self.start);
            self.start = 0;
        }
        if self.discarding {
            match bytes.iter().position(|&b| b == b'\n') {
                None => return,
                Some(i) => (self.discarding, bytes) = (false, &bytes[i + 1..]),
            }
        }
        let last_nl = bytes.iter().rposition(|&b| b == b'\n');
        let partial = match last_nl {
            Some(i) => bytes.len() - i - 1,
            None => self.buf.len() - self.tail + bytes.len(),
        };
        if partial <= self.max {
            self.buf.extend_from_slice(bytes);
            if last_nl.is_some() {
                self.tail = self.buf.len() - partial;
            }
            return;
        }
        match last_nl {
            Some(i) => self.buf.extend_from_slice(&bytes[..=i]),
            None => self.buf.truncate(self.tail),
        }
        self.tail = self.buf.len();
        self.dropped.push_back((self.tail, partial));
        self.discarding = true;
    }

    /// The next complete line, without its "\r\n", or `None` until more bytes are pushed.
    pub fn next_line(&mut self) -> Option<Result<&[u8], WireError>> {
        loop {
            if self.dropped.front().is_some_and(|&(pos, _)| pos == self.start) {
                let (_, len) = self.dropped.pop_front()?;
                return Some(Err(E::Overlong { len, max: self.max }));
            }
            let from = self.start;
            let nl = from + self.buf.get(from..self.tail)?.iter().position(|&b| b == b'\n')?;
            self.start = nl + 1;
            if nl - from > self.max {
                return Some(Err(E::Overlong { len: nl - from, max: self.max }));
            }
            let end = if nl > from && self.buf.get(nl - 1) == Some(&b'\r') { nl - 1 } else { nl };
            if end > from {
                return self.buf.get(from..end).map(Ok);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn esc(b: &[u8], extra: Option<u8>) -> Vec<u8> {
        let mut v = Vec::new();
        escape(&mut v, b, extra);
        v
    }

    #[test]
    fn escaping_follows_the_engine_code() {
        assert_eq!(esc(b"a:b", None), b"a%zb");
        assert_eq!(esc(b"\n\r\t", None), b"%J%M%I");
        assert_eq!(esc(b"50%", None), b"50%%");
        assert_eq!(esc(b"\x01", None), b"%A");
        assert_eq!(esc(b"a=b", Some(b'=')), b"a%}b");
        assert_eq!(esc(b"a=b}", None), b"a=b}");
        assert_eq!(esc("é€".as_bytes(), None), "é€".as_bytes());
        assert_eq!(esc(b"\0", None), b"%@");
        assert_eq!(unescape(b"%z%J%%%A", None), Ok(b":\n%\x01".to_vec()));
        // YATEDOC's example: %Z is 0x1A, not ':'.
        assert_eq!(unescape(b"/bin%Z/usr/bin", None), Ok(b"/bin\x1a/usr/bin".to_vec()));
        assert_eq!(unescape(b"a%}b", Some(b'=')), Ok(b"a=b".to_vec()));
        assert_eq!(unescape("é%z".as_bytes(), None), Ok("é:".as_bytes().to_vec()));
        assert_eq!(unescape(b"x%@", None), Err(E::BadEscape { field: "input", offset: 1 }));
        assert_eq!(unescape(b"%}", None), Err(E::BadEscape { field: "input", offset: 0 }));
        for bad in [&b"%a"[..], b"%`", b"%!", b"ab%"] {
            assert!(matches!(unescape(bad, None), Err(E::BadEscape { .. })), "{bad:?}");
        }
        assert_eq!(unescape(b"a\nb", None), Err(E::ControlByte { field: "input", offset: 1, byte: 0x0a }));
    }

    #[test]
    fn booleans() {
        for (s, v) in [("true", true), (" \tyes", true), ("t", true), ("enable", true), ("off", false), ("f", false)] {
            assert_eq!(parse_bool(s.as_bytes()), Some(v), "{s}");
        }
        for s in ["", "  ", "1", "0", "true ", "TRUE", "truex", "yes no"] {
            assert_eq!(parse_bool(s.as_bytes()), None, "{s:?}");
        }
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter().map(|&(k, v)| (k.to_owned(), v.to_owned())).collect()
    }

    #[test]
    fn parses_engine_lines() {
        let line = b"%%>message:0x7f3a2c001234.1804289383:1095112794:call.route:::caller=1234:called=5%z6";
        let want = Message {
            id: b"0x7f3a2c001234.1804289383".to_vec(),
            time: 1095112794,
            name: "call.route".into(),
            retvalue: String::new(),
            params: pairs(&[("caller", "1234"), ("called", "5:6")]),
        };
        assert_eq!(parse(line), Ok(Incoming::Message(want)));
        let Ok(Incoming::Message(m)) = parse(b"%%>message:i%%d::n:r:a%}b=c=d:bare\r") else { panic!() };
        assert_eq!((m.id, m.time, m.params), (b"i%%d".to_vec(), 0, pairs(&[("a=b", "c=d"), ("bare", "")])));
        let answer = Answer {
            id: "a:1".into(),
            handled: true,
            name: "engine.timer".into(),
            retvalue: "x".into(),
            params: pairs(&[("time", "1")]),
        };
        assert_eq!(parse(b"%%<message:a%z1:true:engine.timer:x:time=1"), Ok(Incoming::Answer(answer.clone())));
        let watched = Answer { id: String::new(), ..answer };
        assert_eq!(parse(b"%%<message::true:engine.timer:x:time=1"), Ok(Incoming::Watched(watched)));
        let Ok(Incoming::Answer(a)) = parse(b"%%<message:q::") else { panic!() };
        assert!(!a.handled && a.name.is_empty() && a.params.is_empty());
        let installed = Incoming::Installed { priority: 100, name: "engine.timer".into(), ok: true };
        assert_eq!(parse(b"%%<install:100:engine.timer:true"), Ok(installed));
        let un = Incoming::Uninstalled { priority: 0, name: "a:b".into(), ok: false };
        assert_eq!(parse(b"%%<uninstall:0:a:b:false"), Ok(un));
        assert_eq!(parse(b"%%<watch:call.route:true"), Ok(Incoming::Watching { name: "call.route".into(), ok: true }));
        assert_eq!(parse(b"%%<unwatch::false"), Ok(Incoming::Unwatching { name: String::new(), ok: false }));
        let set = Incoming::SetLocal { name: "bufsize".into(), value: "16384".into(), ok: true };
        assert_eq!(parse(b"%%<setlocal:bufsize:16384:true"), Ok(set));
        let Ok(Incoming::SetLocal { value, .. }) = parse(b"%%<setlocal:config.a.b:x:y::false") else { panic!() };
        assert_eq!(value, "x:y:");
        assert_eq!(parse(b"%%<quit"), Ok(Incoming::Quit));
        assert_eq!(parse(b"Error in: foo:bar"), Ok(Incoming::ErrorIn("foo:bar".into())));
        assert_eq!(parse(b"Error in:foo"), Ok(Incoming::ErrorIn("foo".into())));
    }

    #[test]
    fn rejects_bad_lines() {
        let cases: &[(&[u8], WireError)] = &[
            (b"%%<bogus:1", E::Unknown { keyword: "%%<bogus".into() }),
            (b"hello", E::Unknown { keyword: "hello".into() }),
            (b"%%<quit:now", E::Unknown { keyword: "%%<quit".into() }),
            (b"%%>message:id", E::MissingField { field: "time" }),
            (b"%%>message:id:1", E::MissingField { field: "message name" }),
            (b"%%>message:id:1:name", E::MissingField { field: "retvalue" }),
            (b"%%>message:id:12x:n:", E::BadNumber { field: "time", value: "12x".into() }),
            (b"%%>message:id:-1:n:", E::BadNumber { field: "time", value: "-1".into() }),
            (b"%%>message:i\td:1:n:", E::ControlByte { field: "message id", offset: 12, byte: 9 }),
            (b"%%>message:id:1:n:r:a=%q", E::BadEscape { field: "parameter value", offset: 22 }),
            (b"%%>message:id:1:n:r:a=x%}", E::BadEscape { field: "parameter value", offset: 23 }),
            (b"%%>message:id:1:n:r:=v", E::EmptyKey { offset: 20 }),
            (b"%%>message:id:1:n%z\xff:r", E::NotUtf8 { field: "message name", offset: 16 }),
            (b"%%<message:id:maybe:n:r", E::BadBool { field: "processed", value: "maybe".into() }),
            (b"%%<message:id:true", E::MissingField { field: "message name" }),
            (b"%%<message:id:true:n", E::MissingField { field: "retvalue" }),
            (b"%%<message:%@:true:n:", E::BadEscape { field: "message id", offset: 11 }),
            (b"%%<install:abc:x:true", E::BadNumber { field: "priority", value: "abc".into() }),
            (b"%%<install:100:x", E::MissingField { field: "success" }),
            (b"%%<watch:x:1", E::BadBool { field: "success", value: "1".into() }),
            (b"%%<setlocal:x", E::MissingField { field: "value" }),
        ];
        for (line, err) in cases {
            assert_eq!(parse(line).as_ref(), Err(err), "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn writes_lines() {
        let mut out = b"keep".to_vec();
        let set = pairs(&[("a:b", "x=y\n"), ("e", "")]);
        write_answer(&mut out, b"0x1.2", true, "", "ok", &set, &["gone".into()]).unwrap();
        assert_eq!(out, b"keep%%<message:0x1.2:true::ok:a%zb=x=y%J:e=:gone\n");
        out.truncate(4);
        for k in ["a=b", ""] {
            let r = write_answer(&mut out, b"1", false, "n", "", &pairs(&[("ok", "1"), (k, "v")]), &[]);
            assert!(matches!(r, Err(E::BadKey { key, .. }) if key == k));
            assert!(matches!(write_answer(&mut out, b"1", false, "n", "", &[], &[k.into()]), Err(E::BadKey { .. })));
        }
        let r = write_answer(&mut out, b"1", false, "n", "", &pairs(&[("k", "a\0")]), &[]);
        assert!(matches!(r, Err(E::BadValue { .. })));
        assert!(matches!(write_answer(&mut out, b"a:b", false, "", "", &[], &[]), Err(E::BadValue { .. })));
        assert!(matches!(write_message(&mut out, "", 1 << 32, "n", "", &[]), Err(E::BadTime { .. })));
        assert!(matches!(write_message(&mut out, "", 0, "", "", &[]), Err(E::BadName { .. })));
        assert!(matches!(write_install(&mut out, Some(-1), "x", None), Err(E::BadPriority { priority: -1 })));
        for bad in ["", "a:b", "a\nb"] {
            assert!(matches!(write_install(&mut out, None, bad, None), Err(E::BadName { .. })));
            assert!(matches!(write_setlocal(&mut out, bad, "1"), Err(E::BadName { .. })));
        }
        assert!(matches!(write_install(&mut out, None, "x", Some(("", None))), Err(E::BadName { .. })));
        assert!(matches!(write_uninstall(&mut out, ""), Err(E::BadName { .. })));
        assert!(matches!(write_watch(&mut out, "a:b"), Err(E::BadName { .. })));
        for bad in [" 1", "1 ", "a\tb"] {
            assert!(matches!(write_setlocal(&mut out, "timeout", bad), Err(E::BadValue { .. })));
        }
        assert!(matches!(write_connect(&mut out, "play"), Err(E::BadRole { .. })));
        assert_eq!(out, b"keep");
        out.clear();
        write_message(&mut out, "m:1", 42, "call.route", "", &pairs(&[("called", "5%")])).unwrap();
        write_install(&mut out, Some(50), "call.route", Some(("called", Some("1:2")))).unwrap();
        write_install(&mut out, None, "engine.timer", None).unwrap();
        write_install(&mut out, None, "chan.dtmf", Some(("id", None))).unwrap();
        write_uninstall(&mut out, "engine.timer").unwrap();
        write_watch(&mut out, "").unwrap();
        write_unwatch(&mut out, "x").unwrap();
        write_setlocal(&mut out, "trackparam", "").unwrap();
        write_setlocal(&mut out, "bufsize", "16384").unwrap();
        write_connect(&mut out, "global").unwrap();
        write_output(&mut out, "a\nb\tc");
        write_quit(&mut out);
        let want = "%%>message:m%z1:42:call.route::called=5%%\n%%>install:50:call.route:called:1%z2\n\
            %%>install::engine.timer\n%%>install::chan.dtmf:id\n%%>uninstall:engine.timer\n%%>watch:\n\
            %%>unwatch:x\n%%>setlocal:trackparam:\n%%>setlocal:bufsize:16384\n%%>connect:global\n\
            %%>output:a b c\n%%>quit\n";
        assert_eq!(String::from_utf8_lossy(&out), want);
    }

    // ---- The engine's side, ported from Yate's code to check what we write. ----

    /// msgUnescape on a C string. (A '%' at the very end makes the engine read past the string; we call it an
    /// error, and never write one.)
    fn engine_unescape(s: &[u8]) -> Result<Vec<u8>, ()> {
        let mut out = Vec::new();
        let mut it = s.iter().copied();
        while let Some(c) = it.next() {
            match c {
                0 => break,
                1..=0x1f => return Err(()),
                b'%' => match it.next() {
                    Some(n @ (0x41..=0x5f | b'z')) => out.push(n - 0x40),
                    Some(b'%') => out.push(b'%'),
                    _ => return Err(()),
                },
                c => out.push(c),
            }
        }
        Ok(out)
    }

    /// `String >> bool` then `if (!rcvd.null())`: None is a rejected line.
    fn engine_bool(f: &[u8]) -> Option<bool> {
        let s = f.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(f.len());
        let words: [(&[&[u8]], bool); 2] =
            [(&[b"false", b"no", b"off", b"disable", b"f"], false), (&[b"true", b"yes", b"on", b"enable", b"t"], true)];
        for (list, v) in words {
            for w in list {
                let brk = matches!(f.get(s + w.len()), None | Some(b' ' | b'\t' | b'\r' | b'\n'));
                if f[s..].starts_with(w) && brk {
                    return (s + w.len() == f.len()).then_some(v);
                }
            }
        }
        f.is_empty().then_some(false)
    }

    #[derive(Debug, Default, PartialEq)]
    struct Decoded {
        id: Vec<u8>,
        time: u32,
        processed: bool,
        name: Option<Vec<u8>>,
        retvalue: Vec<u8>,
        ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    }

    /// Message::commonDecode: name (must end in ':'), retvalue, chunks split at the first '=' after unescaping.
    fn engine_common(rest: &[u8], d: &mut Decoded) -> Result<(), ()> {
        let mut fields = rest.split(|&b| b == b':');
        let name = engine_unescape(fields.next().ok_or(())?)?;
        let ret = fields.next().ok_or(())?; // no ':' after the name: rejected
        d.name = (!name.is_empty()).then_some(name);
        d.retvalue = engine_unescape(ret)?;
        for chunk in fields.filter(|c| !c.is_empty()) {
            let chunk = engine_unescape(chunk)?;
            d.ops.push(match chunk.iter().position(|&b| b == b'=') {
                None => (chunk, None),
                Some(0) => return Err(()),
                Some(p) => (chunk[..p].to_vec(), Some(chunk[p + 1..].to_vec())),
            });
        }
        Ok(())
    }

    /// Message::decode(str, received, id): literal prefix `%%<message:<id>:`, the flag, then the rest.
    fn engine_answer(line: &[u8], id: &[u8]) -> Result<Decoded, ()> {
        let rest = line.strip_prefix(b"%%<message:").and_then(|r| r.strip_prefix(id)).ok_or(())?;
        let rest = rest.strip_prefix(b":").ok_or(())?;
        let sep = rest.iter().position(|&b| b == b':').ok_or(())?;
        let mut d = Decoded { processed: engine_bool(&rest[..sep]).ok_or(())?, ..Decoded::default() };
        if sep + 1 < rest.len() {
            engine_common(&rest[sep + 1..], &mut d)?;
        }
        Ok(d)
    }

    /// Message::decode(str, id), for the decimal times we write (`>> unsigned int` refuses > UINT_MAX).
    fn engine_message(line: &[u8]) -> Result<Decoded, ()> {
        let rest = line.strip_prefix(b"%%>message:").ok_or(())?;
        let mut f = rest.splitn(3, |&b| b == b':');
        let (id, t, rest) = (f.next().ok_or(())?, f.next().ok_or(())?, f.next().ok_or(())?);
        let time = if t.is_empty() { 0 } else { std::str::from_utf8(t).map_err(|_| ())?.parse().map_err(|_| ())? };
        let mut d = Decoded { id: engine_unescape(id)?, time, ..Decoded::default() };
        engine_common(rest, &mut d)?;
        Ok(d)
    }

    fn tricky() -> impl Strategy<Value = String> {
        let c = prop_oneof![3 => any::<char>(), 1 => prop::sample::select(vec![':', '%', '=', '\n', '\r', '}', 'z'])];
        vec(c, 0..10).prop_map(|v| v.into_iter().filter(|&c| c != '\0').collect())
    }

    fn key_text() -> impl Strategy<Value = String> {
        tricky().prop_map(|s| s.replace('=', "")).prop_filter("non-empty", |s| !s.is_empty())
    }

    fn one_line(out: &[u8]) -> &[u8] {
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(out.last(), Some(&b'\n'));
        assert!(!out.contains(&b'\r') && !out.contains(&0));
        &out[..out.len() - 1]
    }

    fn bytes_of(p: &[(String, String)]) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        p.iter().map(|(k, v)| (k.clone().into_bytes(), Some(v.clone().into_bytes()))).collect()
    }

    proptest! {
        #[test]
        fn escape_round_trips(b in vec(1u8..=255, 0..64), eq: bool) {
            let extra = eq.then_some(b'=');
            let e = esc(&b, extra);
            prop_assert!(e.iter().all(|&c| c >= 0x20 && c != b':'));
            prop_assert_eq!(unescape(&e, extra), Ok(b));
        }

        #[test]
        fn answers_decode_engine_side(
            id in vec(any::<u8>().prop_filter("raw id", |&b| b >= 0x20 && b != b':'), 1..12),
            processed: bool, name in tricky(), ret in tricky(),
            set in vec((key_text(), tricky()), 0..4), unset in vec(key_text(), 0..3),
        ) {
            let mut out = Vec::new();
            write_answer(&mut out, &id, processed, &name, &ret, &set, &unset).unwrap();
            let d = engine_answer(one_line(&out), &id).unwrap();
            let mut ops = bytes_of(&set);
            ops.extend(unset.iter().map(|k| (k.clone().into_bytes(), None)));
            let name = (!name.is_empty()).then(|| name.into_bytes());
            prop_assert_eq!(d, Decoded { processed, name, retvalue: ret.into_bytes(), ops, ..Decoded::default() });
        }

        #[test]
        fn messages_decode_both_sides(
            id in tricky(), time in 0..=u64::from(u32::MAX), name in key_text(), ret in tricky(),
            set in vec((key_text(), tricky()), 0..4),
        ) {
            let mut out = Vec::new();
            write_message(&mut out, &id, time, &name, &ret, &set).unwrap();
            let line = one_line(&out);
            let d = engine_message(line).unwrap();
            let want = Decoded {
                id: id.clone().into_bytes(), time: time as u32, name: Some(name.clone().into_bytes()),
                retvalue: ret.clone().into_bytes(), ops: bytes_of(&set), ..Decoded::default()
            };
            prop_assert_eq!(d, want);
            // The engine writes a message to us in the same format.
            let Ok(Incoming::Message(m)) = parse(line) else { panic!("{line:?}") };
            prop_assert_eq!(unescape(&m.id, None), Ok(id.into_bytes()));
            prop_assert_eq!((m.time, m.name, m.retvalue, m.params), (time, name, ret, set));
        }
    }

    fn drain(lb: &mut LineBuffer) -> Vec<Result<String, WireError>> {
        std::iter::from_fn(|| lb.next_line().map(|r| r.map(|l| String::from_utf8_lossy(l).into_owned()))).collect()
    }

    fn ok(lines: &[&str]) -> Vec<Result<String, WireError>> {
        lines.iter().map(|l| Ok(l.to_string())).collect()
    }

    #[test]
    fn frames_lines() {
        let mut lb = LineBuffer::new(16);
        lb.push(b"%%<qu");
        assert!(drain(&mut lb).is_empty());
        lb.push(b"it\r\n\n\r\nabc\nde");
        assert_eq!(drain(&mut lb), ok(&["%%<quit", "abc"]));
        lb.push(b"f\r");
        lb.push(b"\ng\n");
        assert_eq!(drain(&mut lb), ok(&["def", "g"]));
        assert_eq!(lb.buffered(), 0);
    }

    #[test]
    fn drops_overlong_lines_once_and_in_order() {
        let over = |len| Err(E::Overlong { len, max: 8 });
        let mut lb = LineBuffer::new(8);
        lb.push(b"ok\n0123456789");
        assert_eq!(drain(&mut lb), vec![Ok("ok".into()), over(10)]);
        for _ in 0..1000 {
            lb.push(&[b'x'; 4096]);
            assert!(lb.buffered() <= 8 && lb.buf.capacity() < 4096);
            assert!(drain(&mut lb).is_empty());
        }
        lb.push(b"yyy\nnext\n");
        assert_eq!(drain(&mut lb), ok(&["next"]));
        lb.push(b"a\n0123456789abc\n12345678\n");
        assert_eq!(drain(&mut lb), vec![Ok("a".into()), over(13), Ok("12345678".into())]);
        // Pushed twice before reading: the report still comes between its neighbours.
        lb.push(b"l1\n0123456789");
        lb.push(b"zz\nl2\n0123");
        lb.push(b"45678\n");
        assert_eq!(drain(&mut lb), vec![Ok("l1".into()), over(10), Ok("l2".into()), over(9)]);
        lb.push(b"12345678");
        assert_eq!(lb.buffered(), 8);
        lb.push(b"\n");
        assert_eq!(drain(&mut lb), ok(&["12345678"]));
    }
}
