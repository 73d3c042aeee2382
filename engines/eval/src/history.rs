//! What an engine's variables are the result of: the cells its evaluation context executed, in
//! order, each with the outcome of every compiled cell it ran. evcxr's context state is a
//! function of this record, so two engines with equal records can run the same compiled cells,
//! and a new context that executes the recorded cells again, told the recorded outcomes
//! instead of running anything, reaches the state the engine's variables are in.

pub use crate::evalproto::LineOutcome;
use std::collections::BTreeSet;
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

    /// A cell recorded as having died: replayed, it makes evcxr forget every variable, as
    /// the death of a store that ran a cell outside it (a remembered cell) did.
    pub fn death() -> Entry {
        Entry {
            code: "// The evaluation process died: its variables went with it.\n()".into(),
            lines: vec![LineOutcome {
                died: true,
                ..LineOutcome::default()
            }],
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
    /// How many entries there were after the last `compact`.
    compacted: usize,
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

    /// Keeps only what a replay needs (`to_replay`) once the entries have doubled since the
    /// last time; the fingerprint stays the whole record's. For a copy that is only ever
    /// replayed (the controller's, for a replacement engine), so that it does not grow with
    /// every cell run.
    pub fn compact(&mut self) {
        if self.entries.len() < 2 * self.compacted.max(32) {
            return;
        }
        self.entries = to_replay(&self.entries).into_iter().cloned().collect();
        self.compacted = self.entries.len();
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

/// The entries a new context must execute again to reach the state `entries` leave, in order:
/// every entry but those whose effect is gone or never was. An expression cell that ran
/// cleanly and names no variable changed nothing (naming one, it may have moved it, which
/// evcxr then forgets). A cell that only bound variables changed nothing that lasts once each
/// of them is bound again, unless an entry kept between uses it. A death loses every variable:
/// before one, neither kind of cell left a trace. So a notebook that runs `let out = ...` a
/// thousand times replays it once, and a replacement engine, whose history ends in a death, replays its
/// items (`fn`s, types, `use`s, `:dep`s) and little else.
pub fn to_replay(entries: &[Entry]) -> Vec<&Entry> {
    use crate::stateless::{bound_names, reach, Reach};
    let mut kept = Vec::new();
    // Walking back from the end: names an entry kept later uses as they are bound here, and
    // names an entry kept later binds again.
    let mut used: BTreeSet<String> = BTreeSet::new();
    let mut bound_later: BTreeSet<String> = BTreeSet::new();
    let mut death_follows = false;
    // Each entry parsed once: the names it binds, and the words it uses beyond them.
    let parsed: Vec<(Vec<String>, BTreeSet<String>)> = entries
        .iter()
        .map(|entry| {
            let bound = bound_names(&entry.code);
            let words = uses(&entry.code, &bound);
            (bound, words)
        })
        .collect();
    let variables: BTreeSet<&String> = parsed.iter().flat_map(|(bound, _)| bound).collect();
    for (entry, (bound, words)) in entries.iter().zip(&parsed).rev() {
        let died = entry.lines.iter().any(|line| line.died);
        let may_move = || !death_follows && words.iter().any(|word| variables.contains(word));
        let keep = died
            || match reach(&entry.code) {
                Reach::Anything => true,
                Reach::Nothing => !entry.lines.iter().all(LineOutcome::clean) || may_move(),
                Reach::Bindings => {
                    may_move()
                        || bound.iter().any(|name| {
                            used.contains(name) || !(death_follows || bound_later.contains(name))
                        })
                }
            };
        if !keep {
            continue;
        }
        if died {
            used.clear();
            bound_later.clear();
            death_follows = true;
        }
        for name in bound {
            used.remove(name);
            bound_later.insert(name.clone());
        }
        used.extend(words.iter().cloned());
        kept.push(entry);
    }
    kept.reverse();
    kept
}

/// The identifier-like words of `code` beyond its bindings' own names: more than it uses
/// (strings, comments, nested bindings), never less.
fn uses(code: &str, bound: &[String]) -> BTreeSet<String> {
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for word in code.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
        if !word.is_empty() {
            *counts.entry(word).or_default() += 1;
        }
    }
    for name in bound {
        if let Some(count) = counts.get_mut(name.as_str()) {
            *count = count.saturating_sub(1);
        }
    }
    counts
        .into_iter()
        .filter(|(_, count)| *count > 0)
        .map(|(word, _)| word.to_owned())
        .collect()
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

    fn ran(code: &str) -> Entry {
        Entry {
            code: code.into(),
            lines: vec![LineOutcome::default()],
        }
    }

    fn death() -> Entry {
        Entry {
            code: "()".into(),
            lines: vec![LineOutcome {
                died: true,
                ..Default::default()
            }],
        }
    }

    fn replayed(entries: &[Entry]) -> Vec<&str> {
        to_replay(entries).iter().map(|e| e.code.as_str()).collect()
    }

    #[test]
    fn a_replay_skips_what_left_no_trace() {
        let history = [
            ran("fn work(x: u64) -> u64 { x * 2 }"),
            ran("work(3)"),
            ran("let out = work(4);"),
            ran("let kept = 1;"),
            ran("let mut m = kept + 1;"),
            ran("let out = work(5);"),
            death(),
            ran("let after = 2;"),
            ran("after + 1"),
        ];
        // `kept` is used by a `mut` binding kept before the death; the `out`s are not. After
        // the death, `after + 1` may have moved `after`.
        assert_eq!(
            replayed(&history),
            [
                "fn work(x: u64) -> u64 { x * 2 }",
                "let kept = 1;",
                "let mut m = kept + 1;",
                "()",
                "let after = 2;",
                "after + 1"
            ]
        );
        // Without a death, the bindings that are not bound again live on.
        assert_eq!(
            replayed(&history[..6]),
            [
                "fn work(x: u64) -> u64 { x * 2 }",
                "let kept = 1;",
                "let mut m = kept + 1;",
                "let out = work(5);"
            ]
        );
        // A binding used by the one that replaces it stays (it may have been moved there).
        let chain = [ran("let out = 1;"), ran("let out = out + 1;")];
        assert_eq!(replayed(&chain), ["let out = 1;", "let out = out + 1;"]);
        let used = [ran("let a = 1;"), ran("let mut b = a;"), ran("let a = 2;")];
        assert_eq!(
            replayed(&used),
            ["let a = 1;", "let mut b = a;", "let a = 2;"]
        );
        // A cell that may have moved a variable stays, unless a death follows.
        let moved = [
            ran("let v = vec![1];"),
            ran("drop(v)"),
            ran("let w = 2;"),
            ran("let w = 3;"),
        ];
        assert_eq!(
            replayed(&moved),
            ["let v = vec![1];", "drop(v)", "let w = 3;"]
        );
        let moving = [
            ran("let v = vec![1];"),
            ran("let n = v;"),
            ran("let n = 2;"),
        ];
        assert_eq!(
            replayed(&moving),
            ["let v = vec![1];", "let n = v;", "let n = 2;"]
        );
        assert_eq!(
            replayed(&[moved[0].clone(), moved[1].clone(), death()]),
            ["()"]
        );
        // An expression that panicked is replayed as it ran.
        let mut panicked = ran("work(0)");
        panicked.lines[0].panicked = true;
        assert_eq!(replayed(&[panicked.clone()]), ["work(0)"]);
    }

    #[test]
    fn a_compacted_copy_keeps_its_fingerprint_and_stays_small() {
        let mut whole = History::default();
        let mut copy = History::default();
        for entry in [ran("fn work(x: u64) -> u64 { x }")]
            .into_iter()
            .chain((0..1000).flat_map(|_| [ran("let out = work(1);"), ran("work(3)")]))
        {
            whole.push(entry.clone());
            copy.push(entry);
            copy.compact();
        }
        assert_eq!(copy.fingerprint(), whole.fingerprint());
        assert!(copy.len() < 64, "{}", copy.len());
        let replayed: Vec<_> = to_replay(copy.entries()).into_iter().collect();
        assert_eq!(replayed, to_replay(whole.entries()));
    }

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
