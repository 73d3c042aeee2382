//! Where a compiling evcxr context meets an engine's evaluation process. The context's own
//! evaluation process is a relay (`crate::relay`) connected here; each compiled cell it is told
//! to run is run in the engine's store, whose output goes back to the context as if the store
//! were its child. On the way, the gateway records each executed entry in the engine's history
//! and passes the entries and compiled cells on, so that other engines on this host can run
//! the same compiled cells without compiling. To build a context for a history (after the
//! engine's state left its group's), the gateway replays recorded outcomes to the context
//! instead of running anything.

use crate::cell_build::BuildCounter;
use crate::evalproto::{Event, LineNotes, LineOutcome, Parser, COMPLETE};
use crate::history::{Entry, History};
use crate::ipc::{bind_private, read_lines, serve_connections, Locked, PrivateDir};
use crate::store::Store;
use crossbeam_channel::{never, select, Receiver};
use std::collections::VecDeque;
use std::io::{BufWriter, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Set (with `EVCXR_IS_RUNTIME`) in a relay's environment: the gateway's socket.
pub const RELAY_VAR: &str = "PARALLAX_RELAY";

/// Tells a relay that the evaluation process behind it died: `signal N` or `code N` follows.
pub const DIED: &str = "PARALLAX_RELAY_DIED ";

/// What the gateway passes on while a context executes, for the engines that follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shared {
    /// The context began executing this entry.
    Entry(String),
    /// A compiled cell to run (a `LOAD_AND_RUN` line).
    Run(String),
    /// The entry ended; whether it succeeded.
    EntryEnd(bool),
}

pub type Forward = Arc<dyn Fn(Shared) + Send + Sync>;

/// How an evaluator tells its gateway what it executes.
pub trait Recorder: Send + Sync {
    fn begin_entry(&self, code: &str);
    fn end_entry(&self, ok: bool);
    /// The next execution replays an entry: these outcomes answer its compiled cells.
    fn begin_replay(&self, outcomes: Vec<LineOutcome>);
    /// Whether the replayed entry asked for exactly the recorded compiled cells.
    fn end_replay(&self) -> Result<(), String>;
    /// What the store said of the current (or last) entry's compiled cells beyond their
    /// outcomes.
    fn notes(&self) -> LineNotes;
}

/// How a compiling evaluator reaches the evaluation process it compiles for: its context's own
/// process is a relay to a gateway, which runs what it compiles in a store (an engine's, or
/// the notebook's) and records each execution.
pub struct Compiling {
    pub relay: std::process::Command,
    /// Counts the context's builds; kept by the engine across the contexts it starts.
    pub builds: BuildCounter,
    pub recorder: Arc<dyn Recorder>,
    /// The store's processes: an interrupt of a running cell stops it there.
    pub runtime: crate::store::StoreControl,
}

#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<Mutex<Store>>,
    /// Set while a compiled cell runs in the store.
    line_running: Arc<AtomicBool>,
    history: Arc<Mutex<History>>,
    socket: PathBuf,
    dir: PrivateDir,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The entry being executed; compiled cells outside one (evcxr's own warm-up) never run.
    entry: Option<Entry>,
    forward: Option<Forward>,
    replay: Option<Replay>,
    notes: LineNotes,
}

struct Replay {
    outcomes: VecDeque<LineOutcome>,
    unexpected: usize,
}

enum Answer {
    Dry(LineOutcome),
    Live(Option<Forward>),
}

impl Gateway {
    /// Listens in a new private directory under `base`.
    pub fn open(
        base: &Path,
        store: Arc<Mutex<Store>>,
        history: Arc<Mutex<History>>,
        line_running: Arc<AtomicBool>,
    ) -> std::io::Result<Gateway> {
        let dir = base.join(format!("parallax-gateway-{}", std::process::id()));
        let (dir, socket, listener) = bind_private(dir, "relay.sock")?;
        let inner = Arc::new(Inner {
            store,
            line_running,
            history,
            socket,
            dir,
            state: Mutex::default(),
        });
        serve_connections(
            listener,
            Arc::downgrade(&inner),
            "gateway",
            |inner, stream| serve_relay(&inner, stream),
        )?;
        Ok(Gateway { inner })
    }

    /// The evaluation process command to give a compiling context.
    pub fn relay_command(&self) -> std::io::Result<Command> {
        Ok(self.relay_command_for(&std::env::current_exe()?))
    }

    /// The same, with `program` (a binary that serves as a relay) as the relay.
    pub fn relay_command_for(&self, program: &Path) -> Command {
        let mut command = Command::new(program);
        command.env(RELAY_VAR, &self.inner.socket);
        command
    }

    /// The private directory the gateway's socket is in (removed when the gateway goes).
    pub fn dir(&self) -> &Path {
        self.inner.dir.path()
    }

    /// Where the entries and compiled cells of the next executions go (None: nowhere).
    pub fn set_forward(&self, forward: Option<Forward>) {
        self.inner.state().forward = forward;
    }
}

impl Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.locked()
    }

    fn answer(&self) -> Answer {
        let mut state = self.state();
        if let Some(replay) = state.replay.as_mut() {
            return Answer::Dry(replay.outcomes.pop_front().unwrap_or_else(|| {
                replay.unexpected += 1;
                LineOutcome::default()
            }));
        }
        if state.entry.is_some() {
            Answer::Live(state.forward.clone())
        } else {
            Answer::Dry(LineOutcome::default())
        }
    }
}

impl Recorder for Gateway {
    fn begin_entry(&self, code: &str) {
        let forward = {
            let mut state = self.inner.state();
            state.entry = Some(Entry::new(code));
            state.notes = LineNotes::default();
            state.forward.clone()
        };
        if let Some(forward) = forward {
            forward(Shared::Entry(code.to_owned()));
        }
    }

    fn end_entry(&self, ok: bool) {
        let (entry, forward) = {
            let mut state = self.inner.state();
            (state.entry.take(), state.forward.clone())
        };
        if let Some(forward) = forward {
            forward(Shared::EntryEnd(ok));
        }
        if let Some(entry) = entry.filter(|e| e.counts(ok)) {
            self.inner.history.locked().push(entry);
        }
    }

    fn begin_replay(&self, outcomes: Vec<LineOutcome>) {
        self.inner.state().replay = Some(Replay {
            outcomes: outcomes.into(),
            unexpected: 0,
        });
    }

    fn end_replay(&self) -> Result<(), String> {
        match self.inner.state().replay.take() {
            Some(replay) if replay.outcomes.is_empty() && replay.unexpected == 0 => Ok(()),
            Some(replay) => Err(format!(
                "{} recorded compiled cells were not asked for, {} were not recorded",
                replay.outcomes.len(),
                replay.unexpected
            )),
            None => Err("no replay was under way".into()),
        }
    }

    fn notes(&self) -> LineNotes {
        self.inner.state().notes.clone()
    }
}

/// One relay connection: one life of the context's evaluation process.
fn serve_relay(inner: &Inner, stream: UnixStream) {
    let Ok(reading) = stream.try_clone() else {
        return;
    };
    let Ok(relay) = read_lines(reading, "gateway-read") else {
        return;
    };
    let mut out = BufWriter::new(stream);
    while let Ok(Some(line)) = relay.recv() {
        if !line.starts_with("LOAD_AND_RUN ") {
            // An answer to a prompt that came after its cell ended.
            continue;
        }
        let went_on = match inner.answer() {
            Answer::Dry(outcome) => answer_dry(&mut out, &outcome),
            Answer::Live(forward) => run_live(inner, &line, forward, &relay, &mut out),
        };
        if !went_on {
            return;
        }
    }
}

/// Tells the context what the recorded run did; false if that was the process's death.
fn answer_dry(out: &mut impl Write, outcome: &LineOutcome) -> bool {
    let written = if outcome.died {
        writeln!(out, "{DIED}code 1")
    } else {
        outcome
            .markers()
            .iter()
            .try_for_each(|marker| writeln!(out, "{marker}"))
            .and_then(|_| writeln!(out, "{COMPLETE}"))
    };
    written.and_then(|_| out.flush()).is_ok() && !outcome.died
}

/// Runs a compiled cell in the store, streaming its output to the context; false if the store
/// died (the relay then exits the way it did, and the context starts a new one).
fn run_live(
    inner: &Inner,
    line: &str,
    forward: Option<Forward>,
    relay: &Receiver<Option<String>>,
    out: &mut BufWriter<UnixStream>,
) -> bool {
    if let Some(forward) = forward {
        forward(Shared::Run(line.to_owned()));
    }
    let mut store = inner.store.locked();
    inner.line_running.store(true, Ordering::SeqCst);
    let mut outcome = LineOutcome::default();
    let mut notes = LineNotes::default();
    let mut parser = Parser::default();
    let mut alive = store.send(line).is_ok();
    let lines = store.lines();
    let mut answers = relay.clone();
    while alive {
        select! {
            recv(lines) -> message => match message {
                Ok(Some(printed)) => {
                    let event = parser.feed(&printed);
                    if let Some(event) = &event {
                        outcome.note(event);
                        notes.note(event);
                    }
                    // The end goes to the context only once the outcome is recorded: the
                    // context ends its entry as soon as it reads it.
                    if event == Some(Event::Complete) {
                        break;
                    }
                    // Parallax's own markers are not evcxr's to read; what a rolled-back
                    // cell's fork left of a line is.
                    let passed = match &event {
                        Some(Event::InPlace(_) | Event::ThreadsLeft(_)) => continue,
                        Some(Event::RolledBack { partial, .. }) if partial.is_empty() => continue,
                        Some(Event::RolledBack { partial, .. }) => partial,
                        _ => &printed,
                    };
                    // The context may be gone (it is being dropped); the cell still finishes.
                    let _ = writeln!(out, "{passed}");
                    if lines.is_empty() {
                        let _ = out.flush();
                    }
                }
                _ => alive = false,
            },
            recv(answers) -> message => match message {
                Ok(Some(answer)) => {
                    let _ = store.send(&answer);
                }
                _ => answers = never(),
            },
        }
    }
    inner.line_running.store(false, Ordering::SeqCst);
    let mut death = None;
    if alive {
        store.stderr_caught_up();
    } else {
        outcome.died = true;
        death = Some(store.death());
        if let Err(e) = store.restart() {
            tracing::error!("could not restart the evaluation process: {e}");
        }
    }
    drop(store);
    {
        let mut state = inner.state();
        if let Some(entry) = state.entry.as_mut() {
            entry.lines.push(outcome);
        }
        if notes != LineNotes::default() {
            state.notes = notes;
        }
    }
    let _ = match death {
        None => writeln!(out, "{COMPLETE}"),
        Some(death) => writeln!(out, "{DIED}{}", death.status_words()),
    };
    let _ = out.flush();
    alive
}
