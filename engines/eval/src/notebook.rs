//! The notebook's evaluation process, set up as an engine's is: its evcxr context's own process
//! is a relay to a gateway (`crate::gateway`) in the kernel, and its compiled cells run in a
//! store (`crate::store`) of the kernel's. evcxr's pipes to its process are its own; the
//! store's are ours, so a cell run again unchanged (`crate::memo`) runs its compiled cells
//! again in the store without evcxr, cargo or rustc.

use crate::cell_build::BuildCounter;
use crate::gateway::{Compiling, Gateway, Shared};
use crate::history::History;
use crate::interrupt::Interrupter;
use crate::ipc::Locked;
use crate::memo::{Executed, Memo};
use crate::outputs::StreamSink;
use crate::store::{Run, Store};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub(crate) struct NotebookStore {
    store: Arc<Mutex<Store>>,
    gateway: Gateway,
    /// The entries the gateway records; emptied after each cell (the notebook replays none).
    history: Arc<Mutex<History>>,
    line_running: Arc<AtomicBool>,
    memo: Memo,
    /// The compiled cells of the cell under way, as the gateway passes them on.
    compiled: Arc<Mutex<Vec<String>>>,
}

impl NotebookStore {
    /// Starts the store, with `environment` added to its own, and its gateway. Both live in
    /// the process's own temporary directory (`crate::places::use_own_temp_dir`), which goes
    /// with it.
    pub(crate) fn start(environment: &[(String, String)]) -> std::io::Result<NotebookStore> {
        let store = Arc::new(Mutex::new(Store::start(environment)?));
        let history = Arc::new(Mutex::new(History::default()));
        let line_running = Arc::new(AtomicBool::new(false));
        let gateway = Gateway::open(
            &std::env::temp_dir(),
            store.clone(),
            history.clone(),
            line_running.clone(),
        )?;
        let compiled = Arc::new(Mutex::new(Vec::new()));
        let collected = compiled.clone();
        gateway.set_forward(Some(Arc::new(move |shared| {
            if let Shared::Run(line) = shared {
                collected.locked().push(line);
            }
        })));
        Ok(NotebookStore {
            store,
            gateway,
            history,
            line_running,
            memo: Memo::default(),
            compiled,
        })
    }

    /// What the notebook's evcxr context is given to compile for this store.
    pub(crate) fn compiling(&self, builds: BuildCounter) -> std::io::Result<Compiling> {
        Ok(Compiling {
            relay: self.gateway.relay_command()?,
            builds,
            recorder: Arc::new(self.gateway.clone()),
            runtime: self.store.locked().handle(),
        })
    }

    /// Set while a compiled cell runs: an interrupt then stops the store, not a build.
    pub(crate) fn line_flag(&self) -> Arc<AtomicBool> {
        self.line_running.clone()
    }

    /// Before a cell: its stderr goes to `sink`, and its compiled cells are collected afresh.
    pub(crate) fn begin(&self, sink: &StreamSink) {
        self.store.locked().set_sink(sink.clone());
        self.compiled.locked().clear();
    }

    /// Turns the store's transactions on or off.
    pub(crate) fn set_transactions(&self, on: bool) -> Result<(), String> {
        self.store.locked().set_transactions(on)
    }

    /// The compiled cells of `code`, when it can run again without evcxr.
    pub(crate) fn remembered(&self, code: &str) -> Option<Vec<String>> {
        self.memo.lines(code)
    }

    /// After evcxr executed `code`: what the memo learns from it.
    pub(crate) fn after_execution(
        &mut self,
        code: &str,
        ok: bool,
        (before, after): (&BTreeSet<String>, &BTreeSet<String>),
        asked_input: bool,
    ) {
        let outcomes_clean = {
            let mut history = self.history.locked();
            let clean = history.len() == 1
                && history.entries().first().is_some_and(|entry| {
                    entry.code == code && entry.lines.iter().all(|line| line.clean())
                });
            *history = History::default();
            clean
        };
        self.memo.after_execution(&Executed {
            code,
            ok,
            lines: std::mem::take(&mut *self.compiled.locked()),
            before,
            after,
            outcomes_clean,
            asked_input,
        });
    }

    /// Runs a remembered cell's compiled cells again in the store; the last one's run, and
    /// whether an interrupt stopped it. A run that did not end cleanly forgets the memo (a
    /// death also restarted the store: the caller tells evcxr).
    pub(crate) fn run_again(
        &mut self,
        lines: Vec<String>,
        sink: &StreamSink,
        interrupter: &Interrupter,
    ) -> (Run, bool) {
        let _running = interrupter.begin_cell();
        let mut last = Run::default();
        {
            let mut store = self.store.locked();
            for line in lines {
                self.line_running.store(true, Ordering::SeqCst);
                last = store.run(&line, sink);
                self.line_running.store(false, Ordering::SeqCst);
                if last.outcome.died {
                    break;
                }
            }
        }
        if !last.outcome.clean() {
            self.memo.forget();
        }
        (last, interrupter.take_interruption().is_some())
    }
}
