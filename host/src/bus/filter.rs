//! Per-subscriber event filters, with mod_event_socket's semantics
//! (protocols.md §4.1):
//! - no filters: everything passes;
//! - otherwise an event passes when an include filter matches and no
//!   exclude filter does; filters on a header the event lacks are ignored;
//! - a value's leading `+`, `-` and spaces are consumed (`-` excludes);
//! - a raw value starting with `/` is a regex (`/^acme::/`), anything else
//!   compares case-insensitively. As in FreeSWITCH, the regex test looks at
//!   the raw first character, so an exclude (`-/x/`) compares as text.
//!
//! A filter command's outcome is typed ([`FilterChange`], [`FilterError`]):
//! each front-end renders it in its own protocol.

use regex::{Regex, RegexBuilder};

use crate::runtime::Event;

/// Filters one subscriber may hold.
pub const MAX_FILTERS: usize = 256;
/// Of those, regexes: each may take up to `REGEX_BYTES` compiled and as
/// much again for its lazy DFA, so one subscriber's regexes stay within
/// 16 MiB however they are written.
pub const MAX_REGEX_FILTERS: usize = 32;
const REGEX_BYTES: usize = 256 << 10;
/// The longest regex pattern taken.
const MAX_PATTERN: usize = 1024;

#[derive(Debug)]
struct Filter {
    header: String,
    /// As given, prefix included.
    raw: String,
    exclude: bool,
    matcher: Matcher,
}

#[derive(Debug)]
enum Matcher {
    Text(String),
    Regex(Regex),
}

/// What a filter command did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FilterChange {
    Added {
        header: String,
        value: String,
    },
    /// Filters on `header` (with this raw value, if given) were removed.
    Deleted {
        header: String,
        value: Option<String>,
    },
    DeletedAll,
}

impl std::fmt::Display for FilterChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FilterChange::Added { header, value } => write!(f, "filter added: [{header}]=[{value}]"),
            FilterChange::Deleted { header, value } => {
                write!(f, "filter deleted: [{header}][{}]", value.as_deref().unwrap_or(""))
            }
            FilterChange::DeletedAll => write!(f, "filter deleted: [all]"),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    /// Not one of the command shapes.
    #[error("invalid syntax")]
    Syntax,
    #[error("{MAX_FILTERS} filters already; delete some first")]
    TooMany,
    #[error("{MAX_REGEX_FILTERS} regex filters already; delete some first")]
    TooManyRegexes,
    #[error("bad regex `{pattern}`: {message}")]
    Regex { pattern: String, message: String },
}

#[derive(Debug, Default)]
pub struct Filters {
    list: Vec<Filter>,
}

impl Filters {
    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Adds a filter; an invalid regex is refused.
    pub fn add(&mut self, header: &str, raw: &str) -> Result<(), FilterError> {
        if self.list.len() >= MAX_FILTERS {
            return Err(FilterError::TooMany);
        }
        let consumed = raw.trim_start_matches(['+', '-', ' ']);
        let exclude = raw[..raw.len() - consumed.len()].contains('-');
        let matcher = match raw.strip_prefix('/') {
            Some(pattern) => {
                let pattern = pattern.strip_suffix('/').unwrap_or(pattern);
                if self.list.iter().filter(|f| matches!(f.matcher, Matcher::Regex(_))).count() >= MAX_REGEX_FILTERS {
                    return Err(FilterError::TooManyRegexes);
                }
                let bad = |message: String| FilterError::Regex { pattern: pattern.chars().take(64).collect(), message };
                if pattern.len() > MAX_PATTERN {
                    return Err(bad(format!("{} bytes; at most {MAX_PATTERN}", pattern.len())));
                }
                let re = RegexBuilder::new(pattern)
                    .size_limit(REGEX_BYTES)
                    .dfa_size_limit(REGEX_BYTES)
                    .build()
                    .map_err(|e| bad(e.to_string()))?;
                Matcher::Regex(re)
            }
            None => Matcher::Text(consumed.to_string()),
        };
        self.list.push(Filter { header: header.to_string(), raw: raw.to_string(), exclude, matcher });
        Ok(())
    }

    /// Removes the filters on `header` (with this raw value, if given).
    pub fn delete(&mut self, header: &str, raw: Option<&str>) -> usize {
        let before = self.list.len();
        self.list.retain(|f| !(f.header.eq_ignore_ascii_case(header) && raw.is_none_or(|r| f.raw == r)));
        before - self.list.len()
    }

    pub fn clear(&mut self) {
        self.list.clear();
    }

    /// A mod_event_socket `filter` command: `HEADER VALUE`, `add HEADER
    /// VALUE`, `delete HEADER [VALUE]` or `delete all`. The value is the
    /// rest of the line.
    pub fn command(&mut self, command: &str) -> Result<FilterChange, FilterError> {
        let command = command.trim();
        let (first, rest) = command.split_once(' ').map_or((command, ""), |(a, b)| (a, b.trim()));
        match first {
            "" => Err(FilterError::Syntax),
            "delete" if rest == "all" => {
                self.clear();
                Ok(FilterChange::DeletedAll)
            }
            "delete" => {
                let (header, value) = rest.split_once(' ').map_or((rest, None), |(h, v)| (h, Some(v.trim())));
                if header.is_empty() {
                    return Err(FilterError::Syntax);
                }
                self.delete(header, value);
                Ok(FilterChange::Deleted { header: header.to_string(), value: value.map(str::to_string) })
            }
            _ => {
                let line = if first == "add" { rest } else { command };
                let Some((header, value)) = line.split_once(' ').map(|(h, v)| (h, v.trim())) else {
                    return Err(FilterError::Syntax);
                };
                if header.is_empty() || value.is_empty() {
                    return Err(FilterError::Syntax);
                }
                self.add(header, value)?;
                Ok(FilterChange::Added { header: header.to_string(), value: value.to_string() })
            }
        }
    }

    pub fn passes(&self, event: &Event) -> bool {
        if self.list.is_empty() {
            return true;
        }
        let mut send = false;
        for f in &self.list {
            let Some(value) = header(event, &f.header) else { continue };
            let matched = match &f.matcher {
                Matcher::Text(text) => value.eq_ignore_ascii_case(text),
                Matcher::Regex(re) => re.is_match(value),
            };
            if matched {
                if f.exclude {
                    return false;
                }
                send = true;
            }
        }
        send
    }

    /// The other rule FreeSWITCH applies (mod_erlang_event's): an event
    /// starts as sent, so include filters change nothing and only a
    /// matching exclude stops it; an exclude with nothing after its `-`
    /// matches the header's mere presence.
    pub fn passes_excludes_only(&self, event: &Event) -> bool {
        !self.list.iter().any(|f| {
            f.exclude
                && header(event, &f.header).is_some_and(|value| match &f.matcher {
                    Matcher::Text(text) => text.is_empty() || value.eq_ignore_ascii_case(text),
                    Matcher::Regex(re) => re.is_match(value),
                })
        })
    }
}

/// The value of an event header (ASCII case-insensitive); `Event-Name` and
/// `Event-Subclass` are answered from the event itself.
pub fn header<'a>(event: &'a Event, name: &str) -> Option<&'a str> {
    if name.eq_ignore_ascii_case("Event-Name") {
        return Some(&event.name);
    }
    if name.eq_ignore_ascii_case("Event-Subclass") {
        return event.subclass.as_deref();
    }
    event.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(headers: &[(&str, &str)]) -> Event {
        Event {
            name: "CUSTOM".into(),
            subclass: Some("acme::login".into()),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: None,
        }
    }

    #[test]
    fn includes_excludes_and_regexes() {
        let mut f = Filters::default();
        assert!(f.passes(&event(&[])), "no filters: everything");
        f.command("add User alice").unwrap();
        assert!(f.passes(&event(&[("User", "ALICE")])), "case-insensitive");
        assert!(!f.passes(&event(&[("User", "bob")])));
        assert!(!f.passes(&event(&[])), "filters exist but none matched");
        f.command("Event-Subclass /^acme::/").unwrap();
        assert!(f.passes(&event(&[("User", "bob")])), "the regex on the subclass matches");
        f.command("add Realm -spam.example").unwrap();
        assert!(!f.passes(&event(&[("User", "alice"), ("Realm", "spam.example")])), "an exclude wins");
        assert_eq!(f.command("delete Realm"), Ok(FilterChange::Deleted { header: "Realm".into(), value: None }));
        assert!(f.passes(&event(&[("User", "alice"), ("Realm", "spam.example")])));
        assert_eq!(f.command("delete all"), Ok(FilterChange::DeletedAll));
        assert!(f.is_empty());
    }

    #[test]
    fn bad_commands_are_refused() {
        let mut f = Filters::default();
        assert_eq!(f.command("add User"), Err(FilterError::Syntax));
        assert_eq!(f.command(""), Err(FilterError::Syntax));
        assert_eq!(f.command("delete"), Err(FilterError::Syntax));
        assert!(matches!(f.command("add User /(unclosed/"), Err(FilterError::Regex { .. })));
        // A regex whose compiled form would be huge is refused, not built.
        let huge = f.command("add User /(\\w{100}){100}/");
        assert!(matches!(&huge, Err(FilterError::Regex { message, .. }) if message.contains("size limit")), "{huge:?}");
        let long = format!("add User /{}/", "a".repeat(2000));
        assert!(matches!(f.command(&long), Err(FilterError::Regex { message, .. }) if message.contains("at most")));
        assert!(f.is_empty());
        for i in 0..MAX_REGEX_FILTERS {
            f.command(&format!("add User /^u{i}$/")).unwrap();
        }
        assert_eq!(f.command("add User /^more$/"), Err(FilterError::TooManyRegexes));
        assert_eq!(f.command("delete all"), Ok(FilterChange::DeletedAll));
        for i in 0..MAX_FILTERS {
            f.command(&format!("add User u{i}")).unwrap();
        }
        assert_eq!(f.command("add User one-too-many"), Err(FilterError::TooMany));
    }

    #[test]
    fn excludes_only_rule() {
        let mut f = Filters::default();
        f.command("add User alice").unwrap();
        assert!(f.passes_excludes_only(&event(&[("User", "bob")])), "an include does not restrict");
        f.command("add Realm -spam.example").unwrap();
        assert!(!f.passes_excludes_only(&event(&[("Realm", "SPAM.example")])));
        f.command("add X-Debug -").unwrap();
        assert!(!f.passes_excludes_only(&event(&[("X-Debug", "1")])), "an empty exclude: the header's presence");
        assert!(f.passes_excludes_only(&event(&[("Realm", "good.example")])));
    }

    #[test]
    fn an_exclude_regex_compares_as_text_as_freeswitch_does() {
        let mut f = Filters::default();
        f.command("add User +alice").unwrap();
        f.command("add User -/^a/").unwrap();
        assert!(f.passes(&event(&[("User", "alice")])), "`-/^a/` is the text `/^a/`, not a regex");
        assert!(!f.passes(&event(&[("User", "/^a/")])));
    }
}
