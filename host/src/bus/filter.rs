//! Per-subscriber event filters, with mod_event_socket's semantics
//! (protocols.md §4.1):
//! - no filters: everything passes;
//! - otherwise an event passes when an include filter matches and no
//!   exclude filter does; filters on a header the event lacks are ignored;
//! - a value's leading `+`, `-` and spaces are consumed (`-` excludes);
//! - a raw value starting with `/` is a regex (`/^acme::/`), anything else
//!   compares case-insensitively. As in FreeSWITCH, the regex test looks at
//!   the raw first character, so an exclude (`-/x/`) compares as text.

use regex::Regex;

use crate::runtime::Event;

/// Filters one subscriber may hold.
pub const MAX_FILTERS: usize = 256;

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
    pub fn add(&mut self, header: &str, raw: &str) -> Result<(), String> {
        if self.list.len() >= MAX_FILTERS {
            return Err(format!("{MAX_FILTERS} filters already; delete some first"));
        }
        let consumed = raw.trim_start_matches(['+', '-', ' ']);
        let exclude = raw[..raw.len() - consumed.len()].contains('-');
        let matcher = match raw.strip_prefix('/') {
            Some(pattern) => {
                let pattern = pattern.strip_suffix('/').unwrap_or(pattern);
                Matcher::Regex(Regex::new(pattern).map_err(|e| format!("bad regex `{pattern}`: {e}"))?)
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
    /// rest of the line. Returns the reply text.
    pub fn command(&mut self, command: &str) -> Result<String, String> {
        let command = command.trim();
        let (first, rest) = command.split_once(' ').map_or((command, ""), |(a, b)| (a, b.trim()));
        match first {
            "" => Err("-ERR invalid syntax".into()),
            "delete" if rest == "all" => {
                self.clear();
                Ok("+OK filter deleted. [all]".into())
            }
            "delete" => {
                let (header, value) = rest.split_once(' ').map_or((rest, None), |(h, v)| (h, Some(v.trim())));
                if header.is_empty() {
                    return Err("-ERR invalid syntax".into());
                }
                self.delete(header, value);
                Ok(format!("+OK filter deleted. [{header}][{}]", value.unwrap_or("")))
            }
            _ => {
                let line = if first == "add" { rest } else { command };
                let Some((header, value)) = line.split_once(' ').map(|(h, v)| (h, v.trim())) else {
                    return Err("-ERR invalid syntax".into());
                };
                if header.is_empty() || value.is_empty() {
                    return Err("-ERR invalid syntax".into());
                }
                self.add(header, value).map_err(|e| format!("-ERR {e}"))?;
                Ok(format!("+OK filter added. [{header}]=[{value}]"))
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
}

impl Filters {
    /// mod_erlang_event's test, which differs from mod_event_socket's: an
    /// event starts as sent, so include filters change nothing and only a
    /// matching exclude stops it; an exclude with nothing after its `-`
    /// matches the header's mere presence.
    pub fn passes_erlang(&self, event: &Event) -> bool {
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
        assert_eq!(f.command("delete Realm").unwrap(), "+OK filter deleted. [Realm][]");
        assert!(f.passes(&event(&[("User", "alice"), ("Realm", "spam.example")])));
        f.command("delete all").unwrap();
        assert!(f.is_empty());
    }

    #[test]
    fn bad_commands_are_refused() {
        let mut f = Filters::default();
        assert_eq!(f.command("add User").unwrap_err(), "-ERR invalid syntax");
        assert_eq!(f.command("").unwrap_err(), "-ERR invalid syntax");
        assert!(f.command("add User /(unclosed/").unwrap_err().contains("bad regex"));
        assert!(f.is_empty());
        for i in 0..MAX_FILTERS {
            f.command(&format!("add User u{i}")).unwrap();
        }
        assert!(f.command("add User one-too-many").unwrap_err().contains("filters already"));
    }

    #[test]
    fn erlang_filters_only_exclude() {
        let mut f = Filters::default();
        f.command("add User alice").unwrap();
        assert!(f.passes_erlang(&event(&[("User", "bob")])), "an include does not restrict");
        f.command("add Realm -spam.example").unwrap();
        assert!(!f.passes_erlang(&event(&[("Realm", "SPAM.example")])));
        f.command("add X-Debug -").unwrap();
        assert!(!f.passes_erlang(&event(&[("X-Debug", "1")])), "an empty exclude: the header's presence");
        assert!(f.passes_erlang(&event(&[("Realm", "good.example")])));
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
