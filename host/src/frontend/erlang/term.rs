//! Erlang terms in and out: a bounds check that runs before eetf sees a
//! peer's bytes, and the few shapes mod_erlang_event speaks (strings per
//! `encoding`, proplists, events).
//!
//! eetf trusts its input: a list header claiming 2³² elements reserves that
//! much memory, a distribution header panics, and nesting
//! recurses without limit. `check` walks the external term format
//! iteratively and refuses all three before eetf decodes anything, so no
//! frame a peer sends can abort the daemon.

use eetf::{Atom, Binary, ByteList, FixInteger, List, Pid, Term, Tuple};

/// Deeper nesting than any mod_erlang_event message needs; bounds eetf's
/// recursion.
pub const MAX_DEPTH: usize = 128;
/// eetf's string encoder writes a 16-bit length and wraps past this.
const MAX_STRING_EXT: usize = u16::MAX as usize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TermError {
    #[error("truncated term")]
    Truncated,
    #[error("term nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("unsupported term tag {0}")]
    Tag(u8),
    #[error("bad version byte {0} (expected 131)")]
    Version(u8),
    #[error("a bit binary with {0} bits in its last byte (1 to 8)")]
    TailBits(u8),
}

/// Checks that `bytes` holds whole terms (each `131` + a term), back to
/// back, none nested deeper than `MAX_DEPTH`, every count and length
/// within what is left of the buffer.
pub fn check(bytes: &[u8]) -> Result<(), TermError> {
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            131 => at = check_one(bytes, at + 1)?,
            v => return Err(TermError::Version(v)),
        }
    }
    Ok(())
}

/// Walks one term from `at`; returns the offset after it. `pending` holds,
/// for each open container, how many terms it still expects.
fn check_one(b: &[u8], mut at: usize) -> Result<usize, TermError> {
    let mut pending: Vec<u64> = vec![1];
    let need = |at: usize, n: usize| -> Result<(), TermError> {
        if b.len().saturating_sub(at) < n {
            Err(TermError::Truncated)
        } else {
            Ok(())
        }
    };
    let u16_at = |at: usize| -> Result<usize, TermError> {
        need(at, 2)?;
        Ok(u16::from_be_bytes([b[at], b[at + 1]]) as usize)
    };
    let u32_at = |at: usize| -> Result<usize, TermError> {
        need(at, 4)?;
        Ok(u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize)
    };
    while let Some(top) = pending.last_mut() {
        if *top == 0 {
            pending.pop();
            continue;
        }
        *top -= 1;
        need(at, 1)?;
        let tag = b[at];
        at += 1;
        // Terms a container still expects; each takes a byte at least, so
        // a count beyond the bytes left is a lie.
        let mut open = |n: usize, at: usize| -> Result<(), TermError> {
            if n > b.len().saturating_sub(at) {
                return Err(TermError::Truncated);
            }
            if pending.len() >= MAX_DEPTH {
                return Err(TermError::TooDeep);
            }
            pending.push(n as u64);
            Ok(())
        };
        match tag {
            97 => at += 1,                            // SMALL_INTEGER
            98 => at += 4,                            // INTEGER
            70 => at += 8,                            // NEW_FLOAT
            99 => at += 31,                           // FLOAT
            106 => {}                                 // NIL
            100 | 118 | 107 => at += 2 + u16_at(at)?, // ATOM, ATOM_UTF8, STRING
            115 | 119 => {
                need(at, 1)?;
                at += 1 + b[at] as usize // SMALL_ATOM(_UTF8)
            }
            109 => at += 4 + u32_at(at)?, // BINARY
            77 => {
                // BIT_BINARY: the decoder shifts by 8 − bits, so bits
                // outside 1..=8 must not reach it (found by fuzz/erlang_term).
                let len = u32_at(at)?;
                need(at + 4, 1)?;
                let bits = b[at + 4];
                if !(1..=8).contains(&bits) {
                    return Err(TermError::TailBits(bits));
                }
                at += 5 + len
            }
            110 => {
                need(at, 1)?;
                at += 2 + b[at] as usize // SMALL_BIG
            }
            111 => at += 5 + u32_at(at)?, // LARGE_BIG
            104 => {
                need(at, 1)?;
                let n = b[at] as usize;
                at += 1;
                open(n, at)?;
            }
            105 => {
                let n = u32_at(at)?;
                at += 4;
                open(n, at)?;
            }
            108 => {
                let n = u32_at(at)?;
                at += 4;
                open(n.saturating_add(1), at)?; // elements and the tail
            }
            116 => {
                let n = u32_at(at)?;
                at += 4;
                open(n.saturating_mul(2), at)?;
            }
            // Pids, ports and references start with their node's atom;
            // their fixed tails are skipped after it.
            88 | 103 | 89 | 102 | 101 | 120 | 90 | 114 => {
                let ids = if matches!(tag, 90 | 114) {
                    let n = u16_at(at)?;
                    at += 2;
                    n
                } else {
                    0
                };
                need(at, 1)?;
                let node_len = match b[at] {
                    100 | 118 => 3 + u16_at(at + 1)?,
                    115 | 119 => {
                        need(at + 1, 1)?;
                        2 + b[at + 1] as usize
                    }
                    t => return Err(TermError::Tag(t)),
                };
                at += node_len;
                at += match tag {
                    88 => 12,
                    103 => 9,
                    89 => 8,
                    102 | 101 => 5,
                    120 => 12,
                    90 => 4 + 4 * ids,
                    _ => 1 + 4 * ids,
                };
            }
            113 => open(3, at)?, // EXPORT: module, function, arity
            // Funs, atom-cache references, compressed terms, distribution
            // headers: nothing a mod_erlang_event peer sends, and costly or
            // unsupported to decode.
            t => return Err(TermError::Tag(t)),
        }
        if at > b.len() {
            return Err(TermError::Truncated);
        }
    }
    Ok(at)
}

// ---- building terms ---------------------------------------------------------

pub fn atom(name: &str) -> Term {
    Term::from(Atom::from(name))
}

pub fn tuple(elements: Vec<Term>) -> Term {
    Term::from(Tuple::from(elements))
}

pub fn list(elements: Vec<Term>) -> Term {
    Term::from(List::from(elements))
}

pub fn int(n: i32) -> Term {
    Term::from(FixInteger::from(n))
}

pub fn pid_term(pid: &Pid) -> Term {
    Term::from(pid.clone())
}

pub use crate::config::Encoding;

impl Encoding {
    pub fn text(self, s: &str) -> Term {
        match self {
            Encoding::Binary => Term::from(Binary::from(s.as_bytes())),
            Encoding::String => string(s),
        }
    }

    /// Raw bytes (a datagram, say): a binary, or a list of bytes.
    pub fn bytes(self, b: &[u8]) -> Term {
        match self {
            Encoding::Binary => Term::from(Binary::from(b)),
            Encoding::String if b.is_empty() => Term::from(List::nil()),
            Encoding::String if b.len() <= MAX_STRING_EXT => Term::from(ByteList::from(b.to_vec())),
            Encoding::String => list(b.iter().map(|&x| int(i32::from(x))).collect()),
        }
    }
}

/// An Erlang string. Past 65,535 bytes STRING_EXT cannot say the length, so
/// the text goes as a list of integers.
pub fn string(s: &str) -> Term {
    Encoding::String.bytes(s.as_bytes())
}

// ---- reading terms ----------------------------------------------------------

pub fn as_atom(t: &Term) -> Option<&str> {
    match t {
        Term::Atom(a) => Some(&a.name),
        _ => None,
    }
}

/// Text from a string (a byte list), a binary or an atom. A list holding a
/// code point above 255 is not text an Erlang string can carry: None.
/// Bytes that are not UTF-8 are read as Latin-1, as Erlang prints them.
pub fn as_text(t: &Term) -> Option<String> {
    let bytes: Vec<u8> = match t {
        Term::ByteList(b) => b.bytes.clone(),
        Term::Binary(b) => b.bytes.clone(),
        Term::Atom(a) => return Some(a.name.clone()),
        Term::List(l) => l
            .elements
            .iter()
            .map(|e| match e {
                Term::FixInteger(i) => u8::try_from(i.value).ok(),
                _ => None,
            })
            .collect::<Option<Vec<u8>>>()?,
        _ => return None,
    };
    Some(String::from_utf8(bytes).unwrap_or_else(|e| e.into_bytes().iter().map(|&b| char::from(b)).collect()))
}

/// `[{"Key","Value"}, …]` with keys and values as text.
pub fn as_pairs(t: &Term) -> Option<Vec<(String, String)>> {
    let elements: &[Term] = match t {
        Term::List(l) => &l.elements,
        // "" is an empty list; a STRING_EXT is not a proplist.
        Term::ByteList(b) if b.bytes.is_empty() => &[],
        _ => return None,
    };
    elements
        .iter()
        .map(|e| match e {
            Term::Tuple(t) if t.elements.len() == 2 => Some((as_text(&t.elements[0])?, as_text(&t.elements[1])?)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(t: &Term) -> Vec<u8> {
        let mut buf = Vec::new();
        t.encode(&mut buf).unwrap();
        buf
    }

    #[test]
    fn a_bit_binary_needs_1_to_8_tail_bits() {
        assert_eq!(check(b"\x83M\x00\x00\x00\x01\x03\xe0"), Ok(()));
        assert_eq!(check(b"\x83M\x00\x00\x00\x01\x00\xff"), Err(TermError::TailBits(0)));
        assert_eq!(check(b"\x83M\x00\x00\x00\x01\x09\xff"), Err(TermError::TailBits(9)));
        assert_eq!(check(b"\x83M\x00\x00\x00\x01"), Err(TermError::Truncated));
    }

    #[test]
    fn well_formed_terms_pass() {
        let pid = Pid::new("evrhost@localhost", 1, 0, 7);
        let t = tuple(vec![
            atom("api"),
            string("status"),
            Term::from(Binary::from(&b"x"[..])),
            list(vec![int(1), int(-70000), pid_term(&pid)]),
            tuple(vec![]),
        ]);
        let mut two = encode(&t);
        two.extend(encode(&atom("ok")));
        assert_eq!(check(&two), Ok(()));
    }

    #[test]
    fn lies_and_bombs_are_refused() {
        // A list claiming 4 billion elements.
        assert_eq!(check(&[131, 108, 0xff, 0xff, 0xff, 0xff, 106]), Err(TermError::Truncated));
        // A binary longer than the frame.
        assert_eq!(check(&[131, 109, 0, 0, 1, 0, 1, 2]), Err(TermError::Truncated));
        // Nesting: {{{{…}}}} 10,000 deep.
        let mut deep = vec![131];
        for _ in 0..10_000 {
            deep.extend([104, 1]);
        }
        deep.push(106);
        assert_eq!(check(&deep), Err(TermError::TooDeep));
        // A distribution header and a compressed term.
        assert_eq!(check(&[131, 68, 0]), Err(TermError::Tag(68)));
        assert_eq!(check(&[131, 80, 0, 0, 0, 1]), Err(TermError::Tag(80)));
        assert_eq!(check(&[130, 106]), Err(TermError::Version(130)));
        assert_eq!(check(&[131]), Err(TermError::Truncated));
    }

    #[test]
    fn long_strings_go_as_lists_and_round_trip() {
        let long = "x".repeat(70_000);
        let bytes = encode(&string(&long));
        check(&bytes).unwrap();
        let back = Term::decode(&bytes[..]).unwrap();
        assert_eq!(as_text(&back).as_deref(), Some(long.as_str()));
        assert_eq!(as_text(&string("héllo")).as_deref(), Some("héllo"));
    }

    #[test]
    fn text_an_erlang_string_cannot_carry_is_refused() {
        assert_eq!(as_text(&list(vec![int(104), int(1000)])), None);
        // [104, 233]: Latin-1, as the Erlang shell types "hé".
        assert_eq!(as_text(&list(vec![int(104), int(233)])).as_deref(), Some("hé"));
    }
}
