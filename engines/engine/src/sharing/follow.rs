//! How a follower runs a shared cell: it checks that its state is its leader's, then runs
//! the compiled cells its leader passes on in its own store, and settles its history; when
//! its state is not the leader's, it leads the cell for itself.

use super::{outcome_of, Core, Ended, Work};
use parallax_engine_protocol::Step;
use parallax_eval::history::Entry;
use parallax_eval::ipc::Locked;
use parallax_eval::store::Run;
use parallax_eval::{result_of_run, CellError, StreamSink};
use std::collections::BTreeSet;

impl Core {
    pub(super) async fn follow(
        &mut self,
        task: u64,
        cell: u64,
        leader: u32,
        work: &Work,
        sink: StreamSink,
    ) -> Ended {
        let mut steps = self.inbox.take(cell);
        match steps.recv().await {
            Some((_, Step::Begin { fingerprint })) if fingerprint == self.fingerprint() => {}
            first => {
                // Not the state the leader compiles for (or no leader): compile for itself.
                self.inbox.abandon(cell);
                if matches!(
                    first,
                    Some((_, Step::Done { .. } | Step::Abort { .. })) | None
                ) {
                    self.inbox.close(cell);
                }
                tracing::info!(
                    "engine {}: task {task}: its state is not engine {leader}'s; it compiles \
                     the cell itself",
                    self.engine
                );
                self.note = Some(format!(
                    "its state was not engine {leader}'s when cell {cell} came"
                ));
                return self.lead(task, cell, &[], work, sink).await;
            }
        }
        // It runs another context's compiled cells now: its own context falls behind.
        self.compiler = None;
        self.memo.forget();
        let mut current: Option<Entry> = None;
        let mut entries: Vec<Entry> = Vec::new();
        let mut last_run: Option<(Run, bool)> = None;
        let mut skipped = false;
        loop {
            let Some((_, step)) = steps.recv().await else {
                break;
            };
            match step {
                Step::Begin { .. } => {}
                Step::Entry { code } => {
                    current = Some(Entry::new(&code));
                    last_run = None;
                }
                Step::Run { line } => {
                    let Some((run, interrupted)) = self.run_line(task, line, sink.clone()).await
                    else {
                        // Interrupted before the compiled cell started here: it never will.
                        skipped = true;
                        continue;
                    };
                    if let Some(entry) = current.as_mut() {
                        entry.lines.push(run.outcome.clone());
                    }
                    if run.outcome.died || run.notes.rolled_back.is_some() {
                        entries.extend(current.take());
                        return self.cell_failed_here(cell, leader, entries, run, interrupted);
                    }
                    last_run = Some((run, interrupted));
                }
                Step::EntryEnd { ok } => {
                    // An entry whose cell was skipped here is not part of this engine's state,
                    // whatever it did on the leader.
                    let entry = current.take().filter(|e| e.counts(ok) && !skipped);
                    entries.extend(entry);
                }
                Step::Done {
                    outcome,
                    ran,
                    before,
                    after,
                    sent_type,
                    fingerprint,
                    ended,
                } => {
                    self.inbox.close(cell);
                    let before: BTreeSet<String> = before.into_iter().collect();
                    let after: BTreeSet<String> = after.into_iter().collect();
                    self.variables.clone_from(&after);
                    let outcome = match (&last_run, ran) {
                        _ if skipped => outcome_of(Err(
                            parallax_eval::diagnostics::interrupted_before_running(),
                        )),
                        (Some((run, interrupted)), true) => {
                            outcome_of(result_of_run(run, &before, &after, *interrupted))
                        }
                        _ => outcome,
                    };
                    self.settle(entries, fingerprint, after.is_subset(&before));
                    if self.fingerprint() != fingerprint {
                        tracing::info!(
                            "engine {}: cell {cell} left it in another state than engine {leader}",
                            self.engine
                        );
                        let here = last_run
                            .as_ref()
                            .map(|(run, _)| run.outcome.describe())
                            .unwrap_or_else(|| "it ran nothing".into());
                        self.note = Some(format!(
                            "in cell {cell}, {here} here; on engine {leader}, {ended}"
                        ));
                    }
                    return Ended { outcome, sent_type };
                }
                Step::Abort { reason } => {
                    entries.extend(current.take().filter(|e| !e.lines.is_empty()));
                    return self.leader_stopped(cell, leader, &reason, entries, last_run);
                }
            }
        }
        Ended {
            outcome: outcome_of(Err(CellError::internal("the leader's steps stopped"))),
            sent_type: None,
        }
    }

    /// One of `cell`'s compiled cells died here (the store was started again, empty) or was
    /// rolled back (a crash or a stop of its transaction): this engine is not in its leader's
    /// state any more, so it stops following now rather than wait for the end of a cell that
    /// may be waiting for it (a `%pmap` whose leader serves on until this engine's part is
    /// given to others). Its history records what happened, for its next compiling context.
    fn cell_failed_here(
        &mut self,
        cell: u64,
        leader: u32,
        entries: Vec<Entry>,
        run: Run,
        interrupted: bool,
    ) -> Ended {
        self.inbox.abandon(cell);
        let mut history = self.history.locked();
        entries.into_iter().for_each(|entry| history.push(entry));
        drop(history);
        let what = run.outcome.describe();
        tracing::info!(
            "engine {}: cell {cell}, which engine {leader} leads: {what} here",
            self.engine
        );
        self.note = Some(format!(
            "in cell {cell}, {what} here; engine {leader} went on with it"
        ));
        let before = self.variables.clone();
        if run.outcome.died {
            self.variables.clear();
        }
        let outcome = outcome_of(result_of_run(&run, &before, &before, interrupted));
        Ended {
            outcome,
            sent_type: None,
        }
    }

    /// The leader of `cell` stopped mid-cell: what ran here still counts (its entries go in the
    /// history); only what the leader would have said is lost.
    fn leader_stopped(
        &mut self,
        cell: u64,
        leader: u32,
        reason: &str,
        entries: Vec<Entry>,
        last_run: Option<(Run, bool)>,
    ) -> Ended {
        self.inbox.close(cell);
        let mut history = self.history.locked();
        entries.into_iter().for_each(|entry| history.push(entry));
        drop(history);
        self.note = Some(format!("engine {leader} stopped during cell {cell}"));
        let outcome = match &last_run {
            Some((run, interrupted)) => outcome_of(result_of_run(
                run,
                &BTreeSet::new(),
                &BTreeSet::new(),
                *interrupted,
            )),
            None => outcome_of(Err(CellError::plain(
                "EngineDied",
                format!(
                    "engine {leader}, which compiled this cell for engine {}, {reason}; \
                     the cell did not run here",
                    self.engine
                ),
            ))),
        };
        Ended {
            outcome,
            sent_type: None,
        }
    }

    /// Adds a followed cell's entries to the history. A cell that defined no new variable
    /// leaves evcxr's state the same whether it panicked (or a `?` failed) or not: a follower
    /// for which only that differs from its leader records the leader's outcome, and so stays
    /// in its leader's state (`no_new_variables`: the leader's context has none after it).
    fn settle(&self, mut entries: Vec<Entry>, leader: u64, no_new_variables: bool) {
        let mut history = self.history.locked();
        if history.fingerprint_with(&entries) != leader && no_new_variables {
            let mut unharmed = entries.clone();
            for line in unharmed.iter_mut().flat_map(|e| e.lines.iter_mut()) {
                if !line.died && line.changed_type.is_empty() {
                    line.panicked = false;
                    line.user_error = false;
                }
            }
            if history.fingerprint_with(&unharmed) == leader {
                entries = unharmed;
            }
        }
        entries.into_iter().for_each(|entry| history.push(entry));
    }
}
