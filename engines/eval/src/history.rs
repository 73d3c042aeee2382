//! What an engine's variables are the result of: the cells its evaluation context executed, in
//! order, each with the outcome of every compiled cell it ran. evcxr's context state is a
//! function of this record, so two engines with equal records can run the same compiled cells,
//! and a new context that executes the recorded cells again, told the recorded outcomes
//! instead of running anything, reaches the state the engine's variables are in.

pub use crate::evalproto::LineOutcome;
use std::hash::{Hash, Hasher};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Entry {
    /// What the context executed: a cell, or a command such as `:dep`.
    pub code: String,
    /// The compiled cells it ran, in order (usually one; none for a `:dep` alone).
    pub lines: Vec<LineOutcome>,
}

impl Entry {
    pub fn new(code: &str) -> Entry {
        Entry {
            code: code.to_owned(),
            lines: Vec::new(),
        }
    }

    /// Whether the entry can have changed the context: a failed execution that ran nothing
    /// (a compile error) leaves evcxr's state as it was.
    pub fn counts(&self, ok: bool) -> bool {
        ok || !self.lines.is_empty()
    }
}

impl Entry {
    /// Its wire form, for the controller's copy of an engine's history.
    pub fn to_wire(&self) -> parallax_engine_protocol::HistoryEntry {
        parallax_engine_protocol::HistoryEntry {
            code: self.code.clone(),
            lines: self.lines.iter().map(LineOutcome::to_wire).collect(),
        }
    }

    pub fn from_wire(wire: &parallax_engine_protocol::HistoryEntry) -> Entry {
        Entry {
            code: wire.code.clone(),
            lines: wire.lines.iter().map(LineOutcome::from_wire).collect(),
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct History {
    entries: Vec<Entry>,
    fingerprint: u64,
}

impl History {
    /// Equal for equal records, different (but for a 64-bit collision) otherwise. Engines of
    /// one binary compare these; the hasher's keys are fixed.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn push(&mut self, entry: Entry) {
        self.fingerprint = chain(self.fingerprint, &entry);
        self.entries.push(entry);
    }

    /// The fingerprint this history would have with `entries` pushed.
    pub fn fingerprint_with(&self, entries: &[Entry]) -> u64 {
        entries.iter().fold(self.fingerprint, chain)
    }

    /// Whether `code` was executed and counted.
    pub fn contains(&self, code: &str) -> bool {
        self.entries.iter().any(|e| e.code == code)
    }
}

fn chain(fingerprint: u64, entry: &Entry) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    fingerprint.hash(&mut hasher);
    entry.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_follow_code_and_outcomes() {
        let ran = |code: &str, panicked: bool| Entry {
            code: code.into(),
            lines: vec![LineOutcome {
                panicked,
                ..Default::default()
            }],
        };
        let mut a = History::default();
        let mut b = History::default();
        assert_eq!(a.fingerprint(), b.fingerprint());
        a.push(ran("let x = 1;", false));
        b.push(ran("let x = 1;", false));
        assert_eq!(a.fingerprint(), b.fingerprint());
        a.push(ran("let y = f();", false));
        b.push(ran("let y = f();", true));
        assert_ne!(a.fingerprint(), b.fingerprint());
        let mut c = History::default();
        c.push(ran("let y = f();", false));
        c.push(ran("let x = 1;", false));
        assert_ne!(c.fingerprint(), a.fingerprint(), "order matters");
        let mut d = History::default();
        let expected = d.fingerprint_with(&[ran("let x = 1;", false)]);
        d.push(ran("let x = 1;", false));
        assert_eq!(d.fingerprint(), expected);
    }
}
