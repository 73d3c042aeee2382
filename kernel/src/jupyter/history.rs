//! The session's input history, for `history_request`: tail, range and glob search, with
//! outputs when asked.

use serde_json::{json, Value};

/// The current session's number in replies. There is one session: this kernel's lifetime.
pub const SESSION: i64 = 1;

struct Entry {
    line: i64,
    input: String,
    output: Option<String>,
}

#[derive(Default)]
pub struct History {
    entries: Vec<Entry>,
}

impl History {
    pub fn record(&mut self, line: i64, input: &str, output: Option<String>) {
        self.entries.push(Entry {
            line,
            input: input.to_owned(),
            output,
        });
    }

    /// Answers a `history_request` content with the `history` list of its reply.
    pub fn query(&self, request: &Value) -> Vec<Value> {
        let with_output = request["output"].as_bool().unwrap_or(false);
        let n = request["n"].as_u64().map(|n| n as usize);
        let selected: Vec<&Entry> = match request["hist_access_type"].as_str().unwrap_or("tail") {
            "range" => {
                let session = request["session"].as_i64().unwrap_or(0);
                // 0 means the current session; negative numbers count back to earlier sessions,
                // and this kernel has none.
                if session != 0 && session != SESSION {
                    Vec::new()
                } else {
                    let start = request["start"].as_i64().unwrap_or(0);
                    let stop = request["stop"].as_i64().unwrap_or(i64::MAX);
                    self.entries
                        .iter()
                        .filter(|e| e.line >= start && e.line < stop)
                        .collect()
                }
            }
            "search" => {
                let pattern = request["pattern"].as_str().unwrap_or("*");
                let unique = request["unique"].as_bool().unwrap_or(false);
                let mut found: Vec<&Entry> = self
                    .entries
                    .iter()
                    .filter(|e| glob_match(pattern, &e.input))
                    .collect();
                if unique {
                    // Keep the latest occurrence of each input, in order.
                    let mut seen = std::collections::HashSet::new();
                    found.reverse();
                    found.retain(|e| seen.insert(e.input.as_str()));
                    found.reverse();
                }
                last_n(found, n)
            }
            _ => last_n(self.entries.iter().collect(), Some(n.unwrap_or(10))),
        };
        selected
            .into_iter()
            .map(|e| {
                let text = if with_output {
                    json!([e.input, e.output])
                } else {
                    json!(e.input)
                };
                json!([SESSION, e.line, text])
            })
            .collect()
    }
}

fn last_n(entries: Vec<&Entry>, n: Option<usize>) -> Vec<&Entry> {
    match n {
        Some(n) if entries.len() > n => entries[entries.len() - n..].to_vec(),
        _ => entries,
    }
}

/// Glob matching as IPython's history search does it: `*` any run, `?` one character.
fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            backtrack = Some((pi, ti));
            pi += 1;
        } else if let Some((star, matched)) = backtrack {
            pi = star + 1;
            ti = matched + 1;
            backtrack = Some((star, matched + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> History {
        let mut h = History::default();
        h.record(1, "let a = 1;", None);
        h.record(2, "a + 1", Some("2".into()));
        h.record(3, "a + 1", Some("2".into()));
        h.record(4, "println!(\"x\")", None);
        h
    }

    #[test]
    fn tail_returns_the_last_n() {
        let got = sample().query(&json!({"hist_access_type": "tail", "n": 2}));
        assert_eq!(
            got,
            vec![json!([1, 3, "a + 1"]), json!([1, 4, "println!(\"x\")"])]
        );
    }

    #[test]
    fn output_pairs_input_and_result() {
        let got = sample().query(&json!({"hist_access_type": "tail", "n": 1, "output": true}));
        assert_eq!(got, vec![json!([1, 4, ["println!(\"x\")", null]])]);
        let got = sample().query(&json!({"hist_access_type": "range", "session": 1, "start": 2, "stop": 3, "output": true}));
        assert_eq!(got, vec![json!([1, 2, ["a + 1", "2"]])]);
    }

    #[test]
    fn range_by_line_and_session() {
        let h = sample();
        let got =
            h.query(&json!({"hist_access_type": "range", "session": 0, "start": 2, "stop": 4}));
        assert_eq!(got.len(), 2);
        let other =
            h.query(&json!({"hist_access_type": "range", "session": 7, "start": 1, "stop": 4}));
        assert!(other.is_empty());
    }

    #[test]
    fn search_with_glob_and_unique() {
        let h = sample();
        assert_eq!(
            h.query(&json!({"hist_access_type": "search", "pattern": "a*"}))
                .len(),
            2
        );
        let unique =
            h.query(&json!({"hist_access_type": "search", "pattern": "a*", "unique": true}));
        assert_eq!(unique, vec![json!([1, 3, "a + 1"])]);
        assert_eq!(
            h.query(&json!({"hist_access_type": "search", "pattern": "*ln!(?x?)"}))
                .len(),
            1
        );
        assert!(h
            .query(&json!({"hist_access_type": "search", "pattern": "zzz*"}))
            .is_empty());
    }

    #[test]
    fn glob() {
        assert!(glob_match("*", ""));
        assert!(glob_match("a*c", "abbbc"));
        assert!(!glob_match("a*c", "abbb"));
        assert!(glob_match("?b*", "abxyz"));
    }
}
