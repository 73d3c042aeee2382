//! Cells run again without evcxr. A cell that leaves the compiling context's state as it found
//! it (`parallax_eval::stateless`: expressions only, no variable gained or lost) and ran
//! cleanly is remembered with the compiled cells it ran. Run again unchanged, with nothing
//! else run since, the leader replays those in its store and passes them on to its followers,
//! as a follower replays its leader's: no analysis, no cargo, no rustc, the same entry in the
//! history. Anything else that runs forgets every remembered cell.

use super::{Core, Step};
use parallax_eval::history::Entry;
use parallax_eval::ipc::Locked;
use parallax_eval::store::Run;
use parallax_eval::{result_of_run, CellError, CellOutput, StreamSink};
use std::collections::{BTreeSet, HashMap};

#[derive(Default)]
pub(super) struct Memo {
    /// A cell's code and the `LOAD_AND_RUN` lines of its compiled cells.
    cells: HashMap<String, Vec<String>>,
}

impl Memo {
    pub(super) fn lines(&self, code: &str) -> Option<Vec<String>> {
        self.cells.get(code).cloned()
    }

    pub(super) fn forget(&mut self) {
        self.cells.clear();
    }

    /// After evcxr executed `code`: remembers it when it left the state as it found it,
    /// forgets everything otherwise.
    pub(super) fn after_execution(&mut self, ran: &Executed) {
        let clean = ran.ok
            && !ran.lines.is_empty()
            && ran.before == ran.after
            && ran.outcomes_clean
            && parallax_eval::stateless::leaves_state_alone(ran.code);
        if clean {
            self.cells.insert(ran.code.to_owned(), ran.lines.clone());
        } else {
            self.forget();
        }
    }
}

/// What one execution by evcxr came to, for the memo.
pub(super) struct Executed<'a> {
    pub code: &'a str,
    pub ok: bool,
    pub lines: Vec<String>,
    pub before: &'a BTreeSet<String>,
    pub after: &'a BTreeSet<String>,
    /// Its compiled cells neither panicked, failed a `?`, changed a type nor died.
    pub outcomes_clean: bool,
}

impl Core {
    /// Replays a remembered cell's compiled cells in the store, telling the followers as the
    /// gateway would have. A run that did not end cleanly forgets the memo; a death also drops
    /// the compiling context, which learns of it by replaying the history when next needed.
    pub(super) async fn replay_remembered(
        &mut self,
        task: u64,
        code: &str,
        lines: Vec<String>,
        tell: &(impl Fn(Step) + Clone),
        sink: StreamSink,
        variables: &BTreeSet<String>,
    ) -> Result<CellOutput, CellError> {
        tell(Step::Entry {
            code: code.to_owned(),
        });
        let mut entry = Entry::new(code);
        let mut last: Option<(Run, bool)> = None;
        for line in lines {
            tell(Step::Run { line: line.clone() });
            let Some((run, interrupted)) = self.run_line(task, line, sink.clone()).await else {
                tell(Step::EntryEnd { ok: false });
                self.memo.forget();
                return Err(parallax_eval::diagnostics::interrupted_before_running());
            };
            entry.lines.push(run.outcome.clone());
            let died = run.outcome.died;
            last = Some((run, interrupted));
            if died {
                break;
            }
        }
        let Some((run, interrupted)) = last else {
            tell(Step::EntryEnd { ok: false });
            return Err(CellError::internal(
                "a remembered cell had no compiled cell",
            ));
        };
        let ok = !run.outcome.died;
        tell(Step::EntryEnd { ok });
        if entry.counts(ok) {
            self.history.locked().push(entry);
        }
        if !run.outcome.clean() {
            self.memo.forget();
        }
        if run.outcome.died {
            self.compiler = None;
        }
        tracing::debug!("engine {}: task {task} ran a remembered cell", self.engine);
        result_of_run(&run, variables, variables, interrupted)
    }
}
