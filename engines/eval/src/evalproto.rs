//! The lines an evaluation process (evcxr's protocol) writes on stdout while it runs a compiled
//! cell, classified: the cell's own output, rich content blocks, and the markers evcxr's
//! generated code prints (a panic, a `?` error, a variable whose type changed, a stdin prompt),
//! up to the end of the cell. evcxr parses these itself for its own context; an engine that runs
//! cells compiled by another engine's context parses them here.

pub const COMPLETE: &str = "EVCXR_EXECUTION_COMPLETE";
pub const PANIC_NOTIFICATION: &str = "EVCXR_PANIC_NOTIFICATION";
/// Parallax's own (`crate::transaction`): the cell's fork died and the holder rolled it back;
/// how the fork ended follows. It may end a line the fork left unfinished.
pub const ROLLED_BACK: &str = "PARALLAX_ROLLED_BACK ";
/// Parallax's own: the cell runs in the holder itself, without a transaction; why follows.
pub const IN_PLACE: &str = "PARALLAX_IN_PLACE ";
/// Parallax's own: the cell left threads running (how many follows), so the cells after it
/// run without a transaction.
pub const THREADS_LEFT: &str = "PARALLAX_THREADS_LEFT ";
const USER_ERROR: &str = "EVCXR_ERROR_OCCURRED";
const CHANGED_TYPE: &str = "EVCXR_VARIABLE_CHANGED_TYPE:";
const INPUT_REQUEST: &str = "EVCXR_INPUT_REQUEST";
const INPUT_REQUEST_PASSWORD: &str = "EVCXR_INPUT_REQUEST_PASSWORD";
const BEGIN_CONTENT: &str = "EVCXR_BEGIN_CONTENT ";
const END_CONTENT: &str = "EVCXR_END_CONTENT";

/// One thing the evaluation process said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Stdout(String),
    Content {
        mime: String,
        text: String,
    },
    Panic,
    UserError,
    ChangedType(String),
    Input {
        prompt: String,
        password: bool,
    },
    /// The cell was rolled back (`how` its fork ended); `partial` is what the fork had
    /// written of its last line.
    RolledBack {
        partial: String,
        how: String,
    },
    /// The cell runs without a transaction, for the reason given.
    InPlace(String),
    /// The cell left this many threads running.
    ThreadsLeft(String),
    Complete,
}

/// Turns lines into events; a content block spans several lines.
#[derive(Default)]
pub struct Parser {
    content: Option<(String, String)>,
}

impl Parser {
    /// The event `line` completes, if any.
    pub fn feed(&mut self, line: &str) -> Option<Event> {
        if let Some((mime, mut text)) = self.content.take() {
            if line == END_CONTENT {
                return Some(Event::Content { mime, text });
            }
            // evcxr's generated code prints this even inside a block when the display panics.
            if line == PANIC_NOTIFICATION {
                return Some(Event::Panic);
            }
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(line);
            self.content = Some((mime, text));
            return None;
        }
        if let Some(at) = line.find(ROLLED_BACK) {
            return Some(Event::RolledBack {
                partial: line[..at].to_owned(),
                how: line[at + ROLLED_BACK.len()..].to_owned(),
            });
        }
        Some(if line == COMPLETE {
            Event::Complete
        } else if let Some(why) = line.strip_prefix(IN_PLACE) {
            Event::InPlace(why.to_owned())
        } else if let Some(count) = line.strip_prefix(THREADS_LEFT) {
            Event::ThreadsLeft(count.to_owned())
        } else if line == PANIC_NOTIFICATION {
            Event::Panic
        } else if line == USER_ERROR {
            Event::UserError
        } else if let Some(name) = line.strip_prefix(CHANGED_TYPE) {
            Event::ChangedType(name.to_owned())
        } else if let Some(rest) = line.strip_prefix(INPUT_REQUEST) {
            let password = line.starts_with(INPUT_REQUEST_PASSWORD);
            let prompt = rest.split(':').nth(1).unwrap_or_default().to_owned();
            Event::Input { prompt, password }
        } else if let Some(mime) = line.strip_prefix(BEGIN_CONTENT) {
            self.content = Some((mime.trim().to_owned(), String::new()));
            return None;
        } else {
            Event::Stdout(line.to_owned())
        })
    }
}

/// What running one compiled cell did to the evaluation process's variables: all that
/// decides the state of evcxr's context afterwards. Two engines whose runs of the same
/// compiled cells had the same outcomes hold the same variables, of the same types.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct LineOutcome {
    /// The cell panicked: its new variables were not stored.
    pub panicked: bool,
    /// A `?` returned early: its new variables were not stored.
    pub user_error: bool,
    /// Variables dropped because their type was redefined.
    pub changed_type: Vec<String>,
    /// The process died (a crash, or an interrupt): every variable went with it.
    pub died: bool,
    /// The cell's fork died (a crash, or an interrupt) and the holder rolled it back: every
    /// variable is as it was before the cell, which counts as a panic for evcxr's state.
    pub rolled_back: bool,
}

impl LineOutcome {
    /// It neither panicked, failed a `?`, changed a type nor died.
    pub fn clean(&self) -> bool {
        !self.panicked
            && !self.user_error
            && self.changed_type.is_empty()
            && !self.died
            && !self.rolled_back
    }

    /// Notes what an event says about the run.
    pub fn note(&mut self, event: &Event) {
        match event {
            Event::Panic => self.panicked = true,
            Event::UserError => self.user_error = true,
            Event::ChangedType(name) => self.changed_type.push(name.clone()),
            Event::RolledBack { .. } => self.rolled_back = true,
            _ => {}
        }
    }

    /// The lines evcxr's context must read to reach the state this outcome leaves, before
    /// the end-of-cell marker (a death is the end of the process instead).
    pub fn markers(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .changed_type
            .iter()
            .map(|name| format!("{CHANGED_TYPE}{name}"))
            .collect();
        if self.user_error {
            lines.push(USER_ERROR.to_owned());
        }
        if self.panicked {
            lines.push(PANIC_NOTIFICATION.to_owned());
        }
        lines
    }

    pub fn to_wire(&self) -> parallax_engine_protocol::LineReport {
        parallax_engine_protocol::LineReport {
            panicked: self.panicked,
            user_error: self.user_error,
            changed_type: self.changed_type.clone(),
            died: self.died,
            rolled_back: self.rolled_back,
        }
    }

    pub fn from_wire(wire: &parallax_engine_protocol::LineReport) -> LineOutcome {
        LineOutcome {
            panicked: wire.panicked,
            user_error: wire.user_error,
            changed_type: wire.changed_type.clone(),
            died: wire.died,
            rolled_back: wire.rolled_back,
        }
    }

    /// In words, for `%cluster status`.
    pub fn describe(&self) -> String {
        if self.died {
            "its evaluation process died".to_owned()
        } else if self.rolled_back {
            "it was stopped or crashed, and rolled back".to_owned()
        } else if self.panicked {
            "it panicked".to_owned()
        } else if self.user_error {
            "a `?` returned an error".to_owned()
        } else if !self.changed_type.is_empty() {
            format!("it lost {} to a type change", self.changed_type.join(", "))
        } else {
            "it ran to the end".to_owned()
        }
    }
}

/// What a store says of a compiled cell beyond its outcome, for the words of its result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LineNotes {
    /// How the cell's fork ended, when the store rolled the cell back.
    pub rolled_back: Option<String>,
    /// Why the cell ran without a transaction, when it did.
    pub in_place: Option<String>,
    /// How many threads the cell left running, when it left some.
    pub threads_left: Option<String>,
}

impl LineNotes {
    /// Notes what an event says.
    pub fn note(&mut self, event: &Event) {
        match event {
            Event::RolledBack { how, .. } => self.rolled_back = Some(how.clone()),
            Event::InPlace(why) => self.in_place = Some(why.clone()),
            Event::ThreadsLeft(count) => self.threads_left = Some(count.clone()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_the_lines_of_a_run() {
        let mut parser = Parser::default();
        let lines = [
            "hello",
            "EVCXR_BEGIN_CONTENT text/plain",
            "\"40",
            "and 42\"",
            "EVCXR_END_CONTENT",
            "EVCXR_INPUT_REQUEST:name?:",
            "EVCXR_VARIABLE_CHANGED_TYPE:x",
            "EVCXR_PANIC_NOTIFICATION",
            "PARALLAX_IN_PLACE 3 threads",
            "PARALLAX_THREADS_LEFT 2",
            "half a linePARALLAX_ROLLED_BACK signal 9 (SIGKILL)",
            "EVCXR_EXECUTION_COMPLETE",
        ];
        let events: Vec<Event> = lines.iter().filter_map(|l| parser.feed(l)).collect();
        assert_eq!(
            events,
            vec![
                Event::Stdout("hello".into()),
                Event::Content {
                    mime: "text/plain".into(),
                    text: "\"40\nand 42\"".into()
                },
                Event::Input {
                    prompt: "name?".into(),
                    password: false
                },
                Event::ChangedType("x".into()),
                Event::Panic,
                Event::InPlace("3 threads".into()),
                Event::ThreadsLeft("2".into()),
                Event::RolledBack {
                    partial: "half a line".into(),
                    how: "signal 9 (SIGKILL)".into()
                },
                Event::Complete,
            ]
        );
        let mut outcome = LineOutcome::default();
        events.iter().for_each(|e| outcome.note(e));
        assert!(outcome.panicked && outcome.rolled_back && !outcome.user_error && !outcome.died);
        assert_eq!(
            outcome.markers(),
            vec!["EVCXR_VARIABLE_CHANGED_TYPE:x", "EVCXR_PANIC_NOTIFICATION"]
        );
    }
}
