//! The evaluation context's thread: one evcxr `CommandContext`, fed jobs over a channel, with
//! its stdout and stderr streamed to the running cell's sink, and the panic hook that reports a
//! cell's panic as structured data.

use crate::cell_build::{BuildCounter, BuildReport};
use crate::diagnostics::{self, CellError};
use crate::display::{self, DisplaySettings};
use crate::gateway::{Compiling, Recorder};
use crate::history::Entry;
use crate::interrupt::Interrupter;
use crate::ipc::Locked;
use crate::notebook::NotebookStore;
use crate::outputs::{discard_output, CellOutput, InputAsker, StreamForwarder, StreamSink};
use crossbeam_channel::Receiver;
use evcxr::{CommandContext, EvalCallbacks};
use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Installed in the evaluation process so that a panic in a cell reaches us as structured data
/// (`diagnostics::PANIC_MIME`, escaped as `diagnostics::unescape` reads it)
/// rather than as free text on stderr. Panics on other threads keep the usual stderr report.
/// A statement, not an expression, so that evcxr does not try to display a value.
const PANIC_HOOK_CELL: &str = r#"{
    let cell_thread = std::thread::current().id();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = if let Some(s) = payload.downcast_ref::<&str>() {
            s.to_string()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            String::from("Box<dyn Any>")
        };
        if std::thread::current().id() == cell_thread {
            println!("EVCXR_BEGIN_CONTENT application/vnd.parallax.panic");
            println!("{}", message.replace('\\', "\\\\").replace('\n', "\\n"));
            println!("EVCXR_END_CONTENT");
        } else {
            let name = std::thread::current().name().unwrap_or("<unnamed>").to_string();
            eprintln!("thread '{name}' panicked: {message}");
        }
    }));
};"#;

pub(crate) enum Job {
    Execute {
        code: String,
        sink: StreamSink,
        ask_input: Option<InputAsker>,
        done: oneshot::Sender<Result<CellOutput, CellError>>,
    },
    Complete {
        code: String,
        cursor: usize,
        done: oneshot::Sender<Result<evcxr::Completions, String>>,
    },
    Inspect {
        code: String,
        cursor: usize,
        done: oneshot::Sender<Result<(String, String), String>>,
    },
    /// Answered once the evcxr context is built (or failed to build).
    Ready {
        done: oneshot::Sender<Result<(), String>>,
    },
    /// The type of a variable, as evcxr spells it in the cells it generates.
    VariableType {
        name: String,
        done: oneshot::Sender<Option<String>>,
    },
    /// Executes recorded entries again, told their recorded outcomes instead of running them.
    Replay {
        entries: Vec<Entry>,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// The context's variables: their names, or `name: type` when `typed`.
    Variables {
        typed: bool,
        done: oneshot::Sender<BTreeSet<String>>,
    },
}

/// Whose context an evaluator's is.
pub(crate) enum Role {
    /// An engine's: it compiles for the engine's store.
    Engine(Box<Compiling>),
    /// The notebook's: it compiles for a store of its own, whose process gets this environment.
    Notebook(Vec<(String, String)>),
}

struct Engine {
    ctx: CommandContext,
    stdout: StreamForwarder,
    stderr: StreamForwarder,
    /// The current cell's sink; output printed between cells goes to the last cell's.
    sink: Arc<Mutex<StreamSink>>,
    /// The pid of the evaluation process our panic hook was installed in.
    hooked_pid: Option<u32>,
    recorder: Option<Arc<dyn Recorder>>,
    /// The notebook's store, for the notebook's context.
    notebook: Option<NotebookStore>,
    /// How evcxr shows values, followed so that the display stand-in is on only when it fits.
    display: DisplaySettings,
    /// Where the rustc wrapper counts this context's builds, and their running total.
    report: BuildReport,
    builds: BuildCounter,
}

pub(crate) fn run(jobs: Receiver<Job>, interrupter: Interrupter, role: Role, builds: BuildCounter) {
    let mut engine = Engine::start(role, &interrupter, builds);
    if let Err(e) = &engine {
        tracing::error!("{e}");
    }

    for job in jobs {
        let engine = match &mut engine {
            Ok(engine) => engine,
            Err(message) => {
                fail_job(job, message);
                continue;
            }
        };
        match job {
            Job::Execute {
                code,
                sink,
                ask_input,
                done,
            } => {
                let result = engine.execute(&code, sink, ask_input, &interrupter);
                // Counted before the answer, which the engine's report follows.
                engine.builds.add(engine.report.take());
                let _ = done.send(result);
            }
            Job::Complete { code, cursor, done } => {
                let result = guarded(|| {
                    engine
                        .ctx
                        .completions(&code, cursor)
                        .map_err(|e| e.to_string())
                });
                let _ = done.send(result.unwrap_or_else(Err));
            }
            Job::Inspect { code, cursor, done } => {
                let result = guarded(|| {
                    engine
                        .ctx
                        .hover_at(&code, cursor)
                        .map_err(|e| e.to_string())
                });
                let _ = done.send(result.unwrap_or_else(Err));
            }
            Job::Ready { done } => {
                let _ = done.send(Ok(()));
            }
            Job::Replay { entries, done } => {
                let replayed = engine.replay(entries);
                engine.builds.add(engine.report.take());
                let _ = done.send(replayed);
            }
            Job::Variables { typed, done } => {
                let _ = done.send(engine.variables(typed));
            }
            Job::VariableType { name, done } => {
                let found = engine
                    .ctx
                    .variables_and_types()
                    .find(|(variable, _)| *variable == name)
                    .map(|(_, ty)| ty.to_owned());
                let _ = done.send(found);
            }
        }
        engine.builds.add(engine.report.take());
    }
}

fn fail_job(job: Job, message: &str) {
    match job {
        Job::Execute { done, .. } => {
            let _ = done.send(Err(CellError::internal(message)));
        }
        Job::Complete { done, .. } => {
            let _ = done.send(Err(message.to_owned()));
        }
        Job::Inspect { done, .. } => {
            let _ = done.send(Err(message.to_owned()));
        }
        Job::Ready { done } => {
            let _ = done.send(Err(message.to_owned()));
        }
        Job::VariableType { done, .. } => {
            let _ = done.send(None);
        }
        Job::Replay { done, .. } => {
            let _ = done.send(Err(message.to_owned()));
        }
        Job::Variables { done, .. } => {
            let _ = done.send(BTreeSet::new());
        }
    }
}

/// Runs evcxr code, turning a panic inside evcxr itself into an error for the user.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        format!("internal error in the evaluator: {message}")
    })
}

impl Engine {
    /// Builds the evcxr context: one that compiles for an engine's store, or the notebook's,
    /// which gets a store of its own and its helpers at once.
    fn start(
        role: Role,
        interrupter: &Interrupter,
        builds: BuildCounter,
    ) -> Result<Engine, String> {
        let started = Instant::now();
        let sink = Arc::new(Mutex::new(discard_output()));
        let (compiling, notebook) = match role {
            Role::Engine(compiling) => (*compiling, None),
            Role::Notebook(environment) => {
                let failed = |e: std::io::Error| {
                    format!("could not start the notebook's evaluation process: {e}")
                };
                let store = NotebookStore::start(&environment).map_err(failed)?;
                (
                    store.compiling(builds.clone()).map_err(failed)?,
                    Some(store),
                )
            }
        };
        // Set before the context is built, so that an interrupt meanwhile finds them.
        interrupter.set_runtime(Some(compiling.runtime.clone()));
        if let Some(store) = &notebook {
            interrupter.set_line_flag(store.line_flag());
        }
        let (ctx, outputs) = evcxr::EvalContext::with_subprocess_command(compiling.relay)
            .map(|(ctx, outputs)| (CommandContext::with_eval_context(ctx), outputs))
            .map_err(|e| format!("could not start the Rust evaluator (evcxr): {e}"))?;
        let is_notebook = notebook.is_some();
        let mut engine = Engine {
            ctx,
            stdout: StreamForwarder::spawn("stdout", outputs.stdout, sink.clone()),
            stderr: StreamForwarder::spawn("stderr", outputs.stderr, sink.clone()),
            sink,
            hooked_pid: None,
            recorder: Some(compiling.recorder),
            notebook,
            display: DisplaySettings::default(),
            report: BuildReport::fresh(),
            builds,
        };
        let context_built = started.elapsed();
        // Before any build, so that cargo's environment never changes between two.
        if let Err(e) = engine.ctx.execute(&engine.report.command()) {
            tracing::warn!("builds will not be counted: {e}");
        }
        // An engine's context installs it in its first cell, so that the engines that share
        // its compiled cells install it too.
        if is_notebook {
            if let Err(e) = engine.install_panic_hook() {
                tracing::warn!("could not install the panic hook: {e}");
            }
            // The notebook's context: its helpers come before any cell (an engine's
            // arrive with its first cell's preludes instead).
            engine.add_helpers(interrupter);
        }
        engine.builds.add(engine.report.take());
        tracing::info!(
            "evaluator ready in {:.2?} (evcxr context {context_built:.2?})",
            started.elapsed()
        );
        Ok(engine)
    }

    /// `:transactions on|off` in the notebook: its store's setting. (Engines switch theirs
    /// before their contexts see the cell.)
    fn switch_transactions(
        &mut self,
        asked: Result<bool, String>,
        sink: &StreamSink,
    ) -> Result<CellOutput, CellError> {
        let on = asked.map_err(|usage| CellError::plain("UsageError", usage))?;
        let Some(store) = &self.notebook else {
            return Err(CellError::internal("this context has no store of its own"));
        };
        store
            .set_transactions(on)
            .map_err(|e| CellError::internal(&e))?;
        sink("stdout", crate::transaction::switched_words(on));
        Ok(CellOutput::default())
    }

    /// A cell the notebook's memo holds runs again in the notebook's store, without evcxr.
    fn run_remembered(
        &mut self,
        code: &str,
        sink: &StreamSink,
        interrupter: &Interrupter,
    ) -> Option<Result<CellOutput, CellError>> {
        let lines = self.notebook.as_ref()?.remembered(code)?;
        let variables = self.variables(false);
        let (run, interrupted) = self.notebook.as_mut()?.run_again(lines, sink, interrupter);
        if run.outcome.died {
            // The store is a new one: evcxr must forget its variables and start its relay
            // again, which it does when it sees a cell's process die (its `:restart` command
            // would keep the variables it knew).
            if let Err(e) = self.replay(vec![crate::history::Entry::death()]) {
                tracing::warn!("telling the notebook's context its store died: {e}");
            }
        }
        Some(diagnostics::result_of_run(
            &run,
            &variables,
            &variables,
            interrupted,
        ))
    }

    fn runtime_pid(&self) -> Option<u32> {
        self.ctx
            .process_handle()
            .lock()
            .ok()
            .map(|child| child.id())
    }

    fn install_panic_hook(&mut self) -> Result<(), String> {
        self.run_hidden(PANIC_HOOK_CELL)?;
        self.hooked_pid = self.runtime_pid();
        Ok(())
    }

    /// A cell of Parallax's own, recorded like any other so that engines that share this
    /// context's cells run it too; its output goes nowhere.
    fn run_hidden(&mut self, code: &str) -> Result<(), String> {
        self.begin_entry(code);
        let result = guarded(|| self.ctx.execute(code));
        self.end_entry(matches!(result, Ok(Ok(_))));
        result?.map(|_| ()).map_err(|e| e.to_string())
    }

    /// Runs a cell in evcxr, recorded as an entry.
    fn evaluate(
        &mut self,
        code: &str,
        ask: &dyn Fn(&str, bool) -> String,
    ) -> Result<Result<evcxr::EvalOutputs, evcxr::Error>, String> {
        self.begin_entry(code);
        let result = guarded(|| {
            self.ctx.execute_with_callbacks(
                code,
                // evcxr does not export its request type; the closure's argument is inferred.
                &mut EvalCallbacks {
                    input_reader: &|request| ask(&request.prompt, request.is_password),
                },
            )
        });
        self.end_entry(matches!(result, Ok(Ok(_))));
        result
    }

    /// A cell that failed to compile on an ambiguous method (nothing ran), compiled again with
    /// the display stand-in off. When that works, the value's type has an `evcxr_display`
    /// from a trait of the notebook's, which the stand-in made ambiguous, and evcxr's own
    /// display stays on from now on; when it fails too, the ambiguity was the cell's own and
    /// its first error stands.
    fn evaluate_without_stand_in(
        &mut self,
        code: &str,
        ask: &dyn Fn(&str, bool) -> String,
        first: Result<Result<evcxr::EvalOutputs, evcxr::Error>, String>,
    ) -> Result<Result<evcxr::EvalOutputs, evcxr::Error>, String> {
        if let Err(e) = self.run_hidden(display::OFF) {
            tracing::warn!("could not turn the display stand-in off: {e}");
            return first;
        }
        let again = self.evaluate(code, ask);
        if matches!(again, Ok(Err(evcxr::Error::CompilationErrors(_)))) {
            if let Err(e) = self.run_hidden(display::ON) {
                tracing::warn!("could not turn the display stand-in back on: {e}");
                self.display.conflict_seen();
            }
            return first;
        }
        tracing::info!("a trait of the notebook's gives values evcxr_display: stand-in off");
        self.display.conflict_seen();
        again
    }

    /// After a cell that may have changed how evcxr shows values, turns the display stand-in
    /// on or off to match.
    fn follow_display(&mut self, code: &str) {
        if !DisplaySettings::may_change(code) {
            return;
        }
        let fitted = self.display.stand_in_fits();
        self.display.follow(code);
        let fits = self.display.stand_in_fits();
        if fits != fitted {
            let cell = if fits { display::ON } else { display::OFF };
            if let Err(e) = self.run_hidden(cell) {
                tracing::warn!("could not switch the display stand-in: {e}");
            }
        }
    }

    fn begin_entry(&self, code: &str) {
        if let Some(recorder) = &self.recorder {
            recorder.begin_entry(code);
        }
    }

    fn end_entry(&self, ok: bool) {
        if let Some(recorder) = &self.recorder {
            recorder.end_entry(ok);
        }
    }

    /// See `Evaluator::replay`.
    fn replay(&mut self, entries: Vec<Entry>) -> Result<(), String> {
        let Some(recorder) = self.recorder.clone() else {
            return Err("only a compiling evaluator replays".into());
        };
        for (index, entry) in crate::history::to_replay(&entries).into_iter().enumerate() {
            let ran = !entry.lines.is_empty();
            recorder.begin_replay(entry.lines.clone());
            let result = guarded(|| self.ctx.execute(&entry.code));
            let asked = recorder.end_replay();
            if matches!(result, Ok(Ok(_))) {
                // The switches it caused are entries of their own, replayed in turn.
                self.display.follow(&entry.code);
            }
            let failed = match result {
                Ok(Ok(_)) => None,
                // A recorded death or type change ends the execution with an error after it ran.
                Ok(Err(_)) if ran => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(internal) => Some(internal),
            };
            if let Some(error) = failed {
                return Err(format!("entry {index} did not execute again: {error}"));
            }
            asked.map_err(|e| format!("entry {index}: {e}"))?;
        }
        // The relay may have been restarted by a recorded death; the hook goes in again then.
        Ok(())
    }

    /// Names, or `name: type` when `typed` (what the memo compares).
    fn variables(&self, typed: bool) -> BTreeSet<String> {
        self.ctx
            .variables_and_types()
            .map(|(name, ty)| {
                if typed {
                    format!("{name}: {ty}")
                } else {
                    name.to_owned()
                }
            })
            .collect()
    }

    /// The dependency cache and the data crate, before any cell. A failure is logged: cells
    /// that move data then say the crate is missing.
    fn add_helpers(&mut self, interrupter: &Interrupter) {
        // One cell: evcxr applies its commands, then builds once.
        let cell = crate::cells::data_crate_dep()
            .map(|dep| [":cache 4000", &dep, display::ON].join("\n"))
            .map_err(|e| format!("writing the parallax_data crate: {e}"));
        let added = cell.and_then(|cell| {
            self.execute(&cell, discard_output(), None, interrupter)
                .map(|_| ())
                .map_err(|e| e.evalue)
        });
        if let Err(e) = added {
            tracing::warn!("the notebook's data crate: {e}");
        }
    }

    fn execute(
        &mut self,
        code: &str,
        sink: StreamSink,
        ask_input: Option<InputAsker>,
        interrupter: &Interrupter,
    ) -> Result<CellOutput, CellError> {
        // A restarted evaluation process (after an interrupt or a crash) lost the hook.
        if self.hooked_pid != self.runtime_pid() {
            if let Err(e) = self.install_panic_hook() {
                tracing::warn!("could not reinstall the panic hook: {e}");
            }
        }
        if let Some(asked) = crate::transaction::command(code) {
            return self.switch_transactions(asked, &sink);
        }
        if let Some(result) = self.run_remembered(code, &sink, interrupter) {
            return result;
        }
        if let Some(store) = &self.notebook {
            store.begin(&sink);
        }
        *self.sink.locked() = sink;
        let before = self.variables(false);
        let typed_before = self.variables(true);
        let asked_input = std::cell::Cell::new(false);
        let ask = |prompt: &str, password: bool| -> String {
            asked_input.set(true);
            match &ask_input {
                Some(ask) => ask(prompt, password).unwrap_or_default(),
                None => {
                    tracing::info!("a cell asked for input, but its frontend does not allow stdin");
                    String::new()
                }
            }
        };
        let _running = interrupter.begin_cell();
        let mut result = self.evaluate(code, &ask);
        if let Ok(Err(evcxr::Error::CompilationErrors(errors))) = &result {
            if self.display.stand_in_fits() && display::may_conflict(errors) {
                result = self.evaluate_without_stand_in(code, &ask, result);
            }
        }
        if matches!(result, Ok(Ok(_))) {
            self.follow_display(code);
        }
        let interruption = interrupter.take_interruption();
        // stderr arrives through its own pipe; give a line written just before the cell ended
        // the moment it needs to reach its channel, so it is published before the result.
        std::thread::sleep(Duration::from_millis(2));
        self.stdout.flush();
        self.stderr.flush();
        let after = self.variables(false);
        let typed_after = self.variables(true);
        if let Some(store) = &mut self.notebook {
            let ok = matches!(result, Ok(Ok(_)));
            let typed = (&typed_before, &typed_after);
            store.after_execution(code, ok, typed, asked_input.get());
        }

        let result = match result {
            Ok(result) => result,
            Err(internal) => return Err(CellError::internal(&internal)),
        };
        let notes = self
            .recorder
            .as_ref()
            .map(|recorder| recorder.notes())
            .unwrap_or_default();
        if let (Some(threads), Ok(_)) = (&notes.threads_left, &result) {
            let sink = self.sink.locked().clone();
            sink("stderr", &diagnostics::threads_left_note(threads, &after));
        }
        diagnostics::result_of_execution(result, code, (&before, &after), interruption, &notes)
    }
}
