//! An event as the bus hands it to subscribers: the event as fired, and
//! its standard headers kept as what they are made of (numbers, the
//! caller, the second's shared dates) instead of eleven pairs of strings.
//!
//! Firing an event used to allocate 22 strings for those headers, each
//! freed later by another thread, which glibc's allocator makes the
//! dearest part of a fan-out. A sink that writes the headers out (a
//! datagram, a stream) reads them from here without building them; a sink
//! that needs them as an [`Event`] (a plugin's `subscriber` export) gets
//! one built on first use and shared by every such sink.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use crate::runtime::Event;

/// Headers the bus sets on every event, in the order it sets them;
/// anything a plugin put under these names is replaced.
pub(super) const STANDARD: [&str; 11] = [
    "Event-Name",
    "Event-Subclass",
    "Core-UUID",
    "Hostname",
    "Event-Date-Local",
    "Event-Date-GMT",
    "Event-Date-Timestamp",
    "Event-Calling-File",
    "Event-Calling-Function",
    "Event-Calling-Line-Number",
    "Event-Sequence",
];

/// Who fired an event: `Event-Calling-File/Function/Line-Number`.
#[derive(Clone, Debug)]
pub struct Caller {
    pub file: Cow<'static, str>,
    pub function: Cow<'static, str>,
    pub line: u32,
}

impl Caller {
    pub fn host(function: &'static str) -> Caller {
        Caller { file: Cow::Borrowed("evrhost"), function: Cow::Borrowed(function), line: 0 }
    }
}

/// What every event fired in the same second shares.
#[derive(Debug)]
pub(super) struct Second {
    pub(super) secs: u64,
    pub(super) core_uuid: Arc<str>,
    pub(super) hostname: Arc<str>,
    pub(super) local: String,
    pub(super) gmt: String,
}

/// A standard header's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value<'a> {
    Text(&'a str),
    Number(u64),
}

impl std::fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Text(text) => f.write_str(text),
            Value::Number(n) => write!(f, "{n}"),
        }
    }
}

/// An event fired on the bus (see the module doc).
#[derive(Debug)]
pub struct Fired {
    /// As fired, without any header under a standard name.
    event: Event,
    caller: Caller,
    sequence: u64,
    micros: u64,
    second: Arc<Second>,
    full: OnceLock<Event>,
}

impl Fired {
    pub(super) fn new(mut event: Event, caller: Caller, sequence: u64, micros: u64, second: Arc<Second>) -> Fired {
        event.headers.retain(|(k, _)| !STANDARD.iter().any(|s| s.eq_ignore_ascii_case(k)));
        Fired { event, caller, sequence, micros, second, full: OnceLock::new() }
    }

    pub fn name(&self) -> &str {
        &self.event.name
    }

    pub fn subclass(&self) -> Option<&str> {
        self.event.subclass.as_deref()
    }

    /// The headers it was fired with (none under a standard name), in order.
    pub fn headers(&self) -> &[(String, String)] {
        &self.event.headers
    }

    pub fn body(&self) -> Option<&str> {
        self.event.body.as_deref()
    }

    /// The standard headers, in [`STANDARD`]'s order (Event-Subclass only
    /// when it has one); they come after [`Fired::headers`].
    pub fn standard(&self) -> impl Iterator<Item = (&'static str, Value<'_>)> {
        let second = &*self.second;
        let values = [
            Some(Value::Text(&self.event.name)),
            self.event.subclass.as_deref().map(Value::Text),
            Some(Value::Text(&second.core_uuid)),
            Some(Value::Text(&second.hostname)),
            Some(Value::Text(&second.local)),
            Some(Value::Text(&second.gmt)),
            Some(Value::Number(self.micros)),
            Some(Value::Text(&self.caller.file)),
            Some(Value::Text(&self.caller.function)),
            Some(Value::Number(u64::from(self.caller.line))),
            Some(Value::Number(self.sequence)),
        ];
        STANDARD.into_iter().zip(values).filter_map(|(name, value)| Some((name, value?)))
    }

    /// The event with its standard headers after its own, as a plugin's
    /// `subscriber` export receives it: built on first use.
    pub fn event(&self) -> &Event {
        self.full.get_or_init(|| {
            let mut headers = Vec::with_capacity(self.event.headers.len() + STANDARD.len());
            headers.extend(self.event.headers.iter().cloned());
            headers.extend(self.standard().map(|(k, v)| (k.to_string(), v.to_string())));
            let event = &self.event;
            Event { name: event.name.clone(), subclass: event.subclass.clone(), headers, body: event.body.clone() }
        })
    }
}
