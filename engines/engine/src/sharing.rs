//! How an engine executes its tasks: the compile-once protocol between the engines of a host.
//!
//! Every engine holds its variables in its store and keeps the history of what was executed to
//! make them. A task comes with a role. The leader executes the cell in its compiling context
//! (built on first need, by replaying its history when it has one), which runs each compiled
//! cell in the leader's store and passes it on to the followers; it ends with a `Done` step
//! carrying what the followers need to answer like it. A follower first checks that its
//! history is the leader's (the `Begin` step's fingerprint): if so it runs the compiled cells
//! in its own store; if not (its state diverged since the controller last heard), it compiles
//! the cell for itself. A follower whose outcome differs from the leader's (a panic on one of
//! them only, a crash) ends with a different history, which the controller sees in its report.

use crate::inbox::Inbox;
use crate::{Maps, Outbound, SharedMaps};
use parallax_engine_protocol::{FromEngine, Outcome, Role, Share, StateReport, Step};
use parallax_eval::cell_build::BuildCounter;
use parallax_eval::cells;
use parallax_eval::gateway::{Forward, Gateway, Shared};
use parallax_eval::history::{Entry, History};
use parallax_eval::ipc::Locked;
use parallax_eval::store::{Run, Store};
use parallax_eval::{
    result_of_run, CellError, CellOutput, Compiling, DataPort, Evaluator, Interrupter, StreamSink,
};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// evcxr's command that caches built dependencies (size in MiB).
pub const DEPENDENCY_CACHE: &str = ":cache 4000";

/// What a task executes: its cell, the commands the cell needs first, and whether the type
/// of the values it sends is wanted afterwards.
pub struct Work {
    pub code: String,
    pub preludes: Vec<String>,
    pub wants_sent_type: bool,
}

/// How a shared task ended on this engine.
pub struct Ended {
    pub outcome: Outcome,
    pub sent_type: Option<String>,
}

pub struct Core {
    pub engine: u32,
    store: Arc<Mutex<Store>>,
    history: Arc<Mutex<History>>,
    gateway: Gateway,
    compiler: Option<Evaluator>,
    pub interrupter: Interrupter,
    pub port: DataPort,
    pub inbox: Inbox,
    outbound: Outbound,
    /// Why this engine's state left the one it shared, most recent first.
    note: Option<String>,
    pub maps: SharedMaps,
    /// The task an interrupt came for: one that is still building its compiling context
    /// (nothing an interrupt can stop without losing the work) ends as soon as it is built.
    pub cancelled: Arc<AtomicU64>,
    line_running: Arc<AtomicBool>,
    /// What this engine's compiling contexts have built, all of them.
    builds: BuildCounter,
}

impl Core {
    /// `environment` is what the engine's cells see of it (`parallax_env`).
    pub fn new(
        engine: u32,
        outbound: Outbound,
        base: &std::path::Path,
        environment: &[(&str, String)],
    ) -> std::io::Result<Core> {
        let port = DataPort::open(base)?;
        let mut variables = vec![
            (
                parallax_data::SOCKET_VAR.to_owned(),
                port.socket().to_owned(),
            ),
            (parallax_data::TOKEN_VAR.to_owned(), port.token().to_owned()),
        ];
        variables.extend(environment.iter().map(|(k, v)| (k.to_string(), v.clone())));
        let store = Store::start(&variables)?;
        let store = Arc::new(Mutex::new(store));
        let history = Arc::new(Mutex::new(History::default()));
        let line_running = Arc::new(AtomicBool::new(false));
        let gateway = Gateway::open(base, store.clone(), history.clone(), line_running.clone())?;
        let interrupter = Interrupter::default();
        interrupter.set_runtime(Some(store.locked().handle()));
        interrupter.set_line_flag(line_running.clone());
        Ok(Core {
            engine,
            store,
            history,
            gateway,
            compiler: None,
            interrupter,
            port,
            inbox: Inbox::default(),
            outbound,
            note: None,
            maps: Arc::new(Mutex::new(Maps::default())),
            cancelled: Arc::new(AtomicU64::new(u64::MAX)),
            line_running,
            builds: BuildCounter::default(),
        })
    }

    /// A standby engine's warm-up, before it has an id or a pool: builds the compiling
    /// context and runs the preludes in it. The history stays empty, as a fresh engine's is:
    /// the first shared cell runs the preludes again (built by now, so found in the
    /// compiled-cell cache) and passes them on to the followers, which match it then.
    pub async fn prepare(&mut self, preludes: &[String]) -> Result<(), CellError> {
        let quiet: StreamSink = Arc::new(|_, _| {});
        let compiler = self.compiler(&quiet).await?;
        for prelude in preludes {
            compiler
                .execute(prelude.clone(), quiet.clone(), None)
                .await?;
        }
        *self.history.locked() = History::default();
        Ok(())
    }

    /// A standby engine taken into a pool: its id, where it speaks, and what its cells see of
    /// it, which its store learns now.
    pub fn adopt(
        &mut self,
        engine: u32,
        outbound: Outbound,
        environment: &[(&str, String)],
    ) -> Result<(), String> {
        self.engine = engine;
        self.outbound = outbound;
        let environment: Vec<(String, String)> = environment
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        self.store.locked().add_environment(&environment)
    }

    fn fingerprint(&self) -> u64 {
        self.history.locked().fingerprint()
    }

    /// Where this engine's state stands, for the controller.
    pub fn report(&self) -> StateReport {
        let history = self.history.locked();
        StateReport {
            fingerprint: history.fingerprint(),
            entries: history.len() as u64,
            compiler: self.compiler.is_some(),
            note: self.note.clone(),
            builds: self.builds.get(),
        }
    }

    /// Executes `work` in the role the controller gave.
    pub async fn execute(
        &mut self,
        task: u64,
        share: &Share,
        work: &Work,
        sink: StreamSink,
    ) -> Ended {
        self.store.locked().set_sink(sink.clone());
        match &share.role {
            Role::Lead { followers } => self.lead(task, share.cell, followers, work, sink).await,
            Role::Follow { leader } => self.follow(task, share.cell, *leader, work, sink).await,
        }
    }

    async fn lead(
        &mut self,
        task: u64,
        cell: u64,
        followers: &[u32],
        work: &Work,
        sink: StreamSink,
    ) -> Ended {
        let to = followers.to_vec();
        let outbound = self.outbound.clone();
        let tell = move |step: Step| {
            if !to.is_empty() {
                let share = FromEngine::Share {
                    cell,
                    to: to.clone(),
                    step,
                };
                let _ = outbound.send((share, Vec::new()));
            }
        };
        tell(Step::Begin {
            fingerprint: self.fingerprint(),
        });
        let compiler = match self.compiler(&sink).await {
            Ok(compiler) => compiler,
            Err(error) => {
                let outcome = outcome_of(Err(error));
                tell(self.done(&outcome, false, Default::default(), None, ""));
                return Ended {
                    outcome,
                    sent_type: None,
                };
            }
        };
        let forward: Option<Forward> = (!followers.is_empty()).then(|| {
            let tell = tell.clone();
            Arc::new(move |shared: Shared| {
                tell(match shared {
                    Shared::Entry(code) => Step::Entry { code },
                    Shared::Run(line) => Step::Run { line },
                    Shared::EntryEnd(ok) => Step::EntryEnd { ok },
                })
            }) as Forward
        });
        self.gateway.set_forward(forward);
        let quiet: StreamSink = Arc::new(|_, _| {});
        for prelude in &work.preludes {
            if self.history.locked().contains(prelude) {
                continue;
            }
            let began = Instant::now();
            if let Err(e) = compiler.execute(prelude.clone(), quiet.clone(), None).await {
                tracing::warn!("engine {}: `{prelude}` failed: {}", self.engine, e.evalue);
            }
            tracing::debug!(
                "engine {}: preludes in {:.2?}",
                self.engine,
                began.elapsed()
            );
        }
        let before = compiler.variables().await;
        let entries_before = self.history.locked().len();
        let result = if self.cancelled.load(Ordering::SeqCst) == task {
            Err(parallax_eval::diagnostics::interrupted_while_compiling())
        } else if work.code.trim().is_empty() {
            Ok(CellOutput::default())
        } else {
            compiler.execute(work.code.clone(), sink, None).await
        };
        let after = compiler.variables().await;
        let sent_type = if work.wants_sent_type && result.is_ok() {
            compiler
                .variable_type(cells::SENT)
                .await
                .as_deref()
                .and_then(cells::sent_type)
        } else {
            None
        };
        self.gateway.set_forward(None);
        let (ran, ended) = {
            let history = self.history.locked();
            match history.entries().last() {
                Some(last) if history.len() > entries_before && last.code == work.code => (
                    !last.lines.is_empty(),
                    last.lines.last().map(|l| l.describe()).unwrap_or_default(),
                ),
                _ => (false, String::new()),
            }
        };
        let outcome = outcome_of(result);
        tell(self.done(&outcome, ran, (before, after), sent_type.clone(), &ended));
        Ended { outcome, sent_type }
    }

    fn done(
        &self,
        outcome: &Outcome,
        ran: bool,
        (before, after): (BTreeSet<String>, BTreeSet<String>),
        sent_type: Option<String>,
        ended: &str,
    ) -> Step {
        Step::Done {
            outcome: outcome.clone(),
            ran,
            before: before.into_iter().collect(),
            after: after.into_iter().collect(),
            sent_type,
            fingerprint: self.fingerprint(),
            ended: ended.to_owned(),
        }
    }

    /// This engine's compiling context, built on first need. For a history it has to be
    /// brought to the state the store is in, by executing the history again with its recorded
    /// outcomes; if evcxr does not reproduce it, the engine starts afresh, and says so.
    async fn compiler(&mut self, sink: &StreamSink) -> Result<Evaluator, CellError> {
        if let Some(compiler) = &self.compiler {
            return Ok(compiler.clone());
        }
        let started = Instant::now();
        let compiler = self.start_compiler().await?;
        let entries: Vec<Entry> = self.history.locked().entries().to_vec();
        if !entries.is_empty() {
            match compiler.replay(entries.clone()).await {
                Ok(()) => tracing::info!(
                    "engine {}: a compiling context for its {} entries took {:.1?}",
                    self.engine,
                    entries.len(),
                    started.elapsed()
                ),
                Err(e) => {
                    drop(compiler);
                    let reason = format!(
                        "engine {}: no compiling context could be brought to this engine's \
                         state ({e}); its evaluation process was restarted, and its variables, \
                         functions and types are gone\n",
                        self.engine
                    );
                    tracing::warn!("{}", reason.trim_end());
                    sink("stderr", &reason);
                    if let Err(e) = self.store.locked().restart() {
                        return Err(CellError::internal(&format!(
                            "restarting the evaluation process: {e}"
                        )));
                    }
                    *self.history.locked() = History::default();
                    self.note = Some("its state could not be rebuilt; it was reset".into());
                    let fresh = self.start_compiler().await?;
                    self.compiler = Some(fresh.clone());
                    return Ok(fresh);
                }
            }
        }
        self.compiler = Some(compiler.clone());
        Ok(compiler)
    }

    async fn start_compiler(&self) -> Result<Evaluator, CellError> {
        let relay = self
            .gateway
            .relay_command()
            .map_err(|e| CellError::internal(&format!("the relay command: {e}")))?;
        let compiler = Evaluator::start_compiling(
            Compiling {
                relay,
                recorder: Arc::new(self.gateway.clone()),
                runtime: self.store.locked().handle(),
                builds: self.builds.clone(),
            },
            self.interrupter.clone(),
        );
        compiler
            .ready()
            .await
            .map_err(|e| CellError::internal(&e))?;
        Ok(compiler)
    }

    async fn follow(
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

    /// Runs one compiled cell of `task` in the store; true with it if an interrupt stopped it.
    /// None when an interrupt for `task` came before the cell started: it does not run.
    async fn run_line(&self, task: u64, line: String, sink: StreamSink) -> Option<(Run, bool)> {
        let store = self.store.clone();
        let interrupter = self.interrupter.clone();
        let line_running = self.line_running.clone();
        let cancelled = self.cancelled.clone();
        let ran = tokio::task::spawn_blocking(move || {
            let run = {
                let mut store = store.locked();
                let _running = interrupter.begin_cell();
                // An interrupt sets `cancelled` before it looks for a running cell: either it
                // saw this one begin, or this sees its mark.
                if cancelled.load(Ordering::SeqCst) == task {
                    return None;
                }
                line_running.store(true, Ordering::SeqCst);
                let run = store.run(&line, &sink);
                line_running.store(false, Ordering::SeqCst);
                run
            };
            Some((run, interrupter.take_interruption().is_some()))
        })
        .await;
        ran.unwrap_or_else(|_| {
            let mut run = Run::default();
            run.outcome.died = true;
            run.death = Some("the runner panicked".into());
            Some((run, false))
        })
    }

    /// The private directories this engine made, to remove when it exits.
    pub fn dirs(&self) -> Vec<std::path::PathBuf> {
        vec![self.gateway.dir().to_owned(), self.port.dir().to_owned()]
    }
}

pub fn outcome_of(result: Result<CellOutput, CellError>) -> Outcome {
    match result {
        Ok(output) => Outcome::Ok { data: output.data },
        Err(mut error) => {
            if let Some(hint) = crate::offline::hint_for(&error.evalue) {
                error.evalue.push_str(&hint);
                error.traceback.push(hint.trim().to_owned());
            }
            Outcome::Error {
                ename: error.ename,
                evalue: error.evalue,
                traceback: error.traceback,
            }
        }
    }
}
