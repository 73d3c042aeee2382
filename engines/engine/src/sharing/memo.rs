//! Cells run again without evcxr (which ones: `parallax_eval::memo`). Run again unchanged, with
//! nothing else run since, the leader replays a remembered cell's compiled cells in its store
//! and passes them on to its followers, as a follower replays its leader's: no analysis, no
//! cargo, no rustc, the same entry in the history.

use super::{Core, Step};
use parallax_eval::history::Entry;
use parallax_eval::ipc::Locked;
use parallax_eval::store::Run;
use parallax_eval::{result_of_run, CellError, CellOutput, StreamSink};
use std::collections::BTreeSet;

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
