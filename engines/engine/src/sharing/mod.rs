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

mod follow;
mod memo;

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
    CellError, CellOutput, Compiling, DataPort, Evaluator, Interrupter, StreamSink,
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
    /// Cells that can run again without evcxr.
    memo: parallax_eval::memo::Memo,
    /// History entries already reported to the controller.
    reported: usize,
    /// The variables after the last cell, for the controller (lost if this engine dies).
    pub(crate) variables: BTreeSet<String>,
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
            memo: parallax_eval::memo::Memo::default(),
            reported: 0,
            variables: BTreeSet::new(),
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

    /// Takes over from a dead engine: its history, so that the compiling context this engine
    /// builds when it next needs one (by replaying the history, running nothing) has its
    /// functions, types, `use`s and dependencies; then an entry that makes it forget the
    /// variables, lost with the dead engine's store (`take_over_entry`).
    pub fn take_over(
        &mut self,
        history: &[parallax_engine_protocol::HistoryEntry],
        lost: &[String],
    ) {
        let mut adopted = History::default();
        for entry in history {
            adopted.push(Entry::from_wire(entry));
        }
        adopted.push(Entry::from_wire(
            &parallax_engine_protocol::take_over_entry(),
        ));
        self.reported = adopted.len();
        *self.history.locked() = adopted;
        self.variables.clear();
        self.compiler = None;
        self.memo.forget();
        self.note = Some(if lost.is_empty() {
            "it replaces a dead engine, whose functions, types and dependencies it rebuilt".into()
        } else {
            format!(
                "it replaces a dead engine, whose functions, types and dependencies it rebuilt; \
                 variables lost: {}",
                lost.join(", ")
            )
        });
        tracing::info!(
            "engine {}: took over a dead engine's {} history entries",
            self.engine,
            history.len()
        );
    }

    /// Where this engine's state stands, for the controller, with the history entries added
    /// since the last report.
    pub fn report(&mut self) -> StateReport {
        let history = self.history.locked();
        let added = history.entries()[self.reported.min(history.len())..]
            .iter()
            .map(|entry| entry.to_wire())
            .collect();
        self.reported = history.len();
        StateReport {
            fingerprint: history.fingerprint(),
            entries: history.len() as u64,
            compiler: self.compiler.is_some(),
            note: self.note.clone(),
            builds: self.builds.get(),
            added,
            variables: self.variables.iter().cloned().collect(),
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
        // Each engine switches its own store; nothing is compiled or shared.
        if let Some(asked) = parallax_eval::transaction::command(&work.code) {
            let switched = asked
                .map_err(|usage| CellError::plain("UsageError", usage))
                .and_then(|on| {
                    self.store
                        .locked()
                        .set_transactions(on)
                        .map_err(|e| CellError::internal(&e))?;
                    sink("stdout", parallax_eval::transaction::switched_words(on));
                    Ok(CellOutput::default())
                });
            return Ended {
                outcome: outcome_of(switched),
                sent_type: None,
            };
        }
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
        // The compiled cells evcxr runs go to the followers, and are noted for the memo.
        let compiled: Arc<Mutex<Vec<String>>> = Arc::default();
        let forward: Forward = {
            let tell = tell.clone();
            let compiled = compiled.clone();
            Arc::new(move |shared: Shared| {
                tell(match shared {
                    Shared::Entry(code) => Step::Entry { code },
                    Shared::Run(line) => {
                        compiled.locked().push(line.clone());
                        Step::Run { line }
                    }
                    Shared::EntryEnd(ok) => Step::EntryEnd { ok },
                })
            })
        };
        self.gateway.set_forward(Some(forward));
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
        let typed_before = compiler.typed_variables().await;
        let entries_before = self.history.locked().len();
        compiled.locked().clear();
        let remembered = self.memo.lines(&work.code);
        let result = if self.cancelled.load(Ordering::SeqCst) == task {
            Err(parallax_eval::diagnostics::interrupted_while_compiling())
        } else if work.code.trim().is_empty() {
            Ok(CellOutput::default())
        } else if let Some(lines) = remembered.clone() {
            let code = &work.code;
            self.replay_remembered(task, code, lines, &tell, sink, &before)
                .await
        } else {
            compiler.execute(work.code.clone(), sink, None).await
        };
        let after = compiler.variables().await;
        self.variables.clone_from(&after);
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
        let (ran, ended, outcomes_clean) = self.last_entry(&work.code, entries_before);
        if remembered.is_none() {
            let typed_after = compiler.typed_variables().await;
            self.memo.after_execution(&parallax_eval::memo::Executed {
                code: &work.code,
                ok: result.is_ok(),
                lines: std::mem::take(&mut *compiled.locked()),
                before: &typed_before,
                after: &typed_after,
                outcomes_clean,
                // An engine's prompts get an empty answer, in a replay too.
                asked_input: false,
            });
        }
        let outcome = outcome_of(result);
        tell(self.done(&outcome, ran, (before, after), sent_type.clone(), &ended));
        Ended { outcome, sent_type }
    }

    /// Whether the history's last entry, added since it had `entries_before`, is `code`'s and
    /// ran compiled cells; how the last ended; whether it is the only one and all ended
    /// cleanly (for the memo).
    fn last_entry(&self, code: &str, entries_before: usize) -> (bool, String, bool) {
        let history = self.history.locked();
        match history.entries().last() {
            Some(last) if history.len() > entries_before && last.code == code => (
                !last.lines.is_empty(),
                last.lines.last().map(|l| l.describe()).unwrap_or_default(),
                history.len() == entries_before + 1 && last.lines.iter().all(|l| l.clean()),
            ),
            _ => (false, String::new(), false),
        }
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
        self.memo.forget();
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
