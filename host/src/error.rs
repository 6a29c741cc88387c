//! Errors as people read them: an error and every source below it.

use std::error::Error;

/// `error: source: source…`, the whole chain on one line, for a log field,
/// an RPC error message or an event header.
pub fn chain(e: &(dyn Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        // A wrapper that repeats its source's text adds nothing.
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("cannot load")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_chain_reads_outer_to_inner() {
        let e = Outer(std::io::Error::other("disk on fire"));
        assert_eq!(super::chain(&e), "cannot load: disk on fire");
    }
}
