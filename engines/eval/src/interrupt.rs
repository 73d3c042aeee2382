//! Interrupting a local cell. evcxr has no interrupt API, so: while the cell compiles, kill the
//! cargo build (nothing is lost); while it runs, have the store stop it (its fork is killed and
//! the store rolls it back, or, for a cell that runs without a transaction, the store dies and
//! evcxr restarts it without the variables).

use crate::ipc::Locked;
use crate::store::StoreControl;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interruption {
    Compiling,
    Running,
}

#[derive(Default)]
struct State {
    runtime: Mutex<Option<StoreControl>>,
    running: AtomicBool,
    /// Set by an interrupt, cleared when the cell's result has been classified. While set, any
    /// cargo build evcxr starts (it retries) is killed too.
    pending: Mutex<Option<Interruption>>,
    /// Tells a stdin prompt in progress to give up.
    cancel_input: AtomicBool,
    /// When the evaluation process is an engine's store, whether it runs a compiled cell right
    /// now; otherwise a running cell is compiling.
    line_running: Mutex<Option<Arc<AtomicBool>>>,
}

impl State {
    fn stop_running_cell(&self) {
        let runtime = self.runtime.locked().clone();
        if let Some(runtime) = runtime {
            runtime.stop_running_cell();
        }
    }

    fn kill_runtime(&self) {
        let runtime = self.runtime.locked().clone();
        if let Some(runtime) = runtime {
            runtime.kill();
        }
    }

    /// Whether a compiled cell runs in the store right now.
    fn line_runs(&self) -> bool {
        self.line_running
            .locked()
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::SeqCst))
    }
}

#[derive(Clone, Default)]
pub struct Interrupter {
    state: Arc<State>,
}

/// Marks a cell as running until dropped.
pub struct RunningCell<'a> {
    state: &'a State,
}

impl Drop for RunningCell<'_> {
    fn drop(&mut self) {
        self.state.running.store(false, Ordering::SeqCst);
    }
}

impl Interrupter {
    pub fn set_runtime(&self, runtime: Option<StoreControl>) {
        *self.state.runtime.locked() = runtime;
    }

    /// Says where to look for whether a compiled cell is running (rather than compiling).
    pub fn set_line_flag(&self, flag: Arc<AtomicBool>) {
        *self.state.line_running.locked() = Some(flag);
    }

    pub fn begin_cell(&self) -> RunningCell<'_> {
        *self.state.pending.locked() = None;
        self.state.cancel_input.store(false, Ordering::SeqCst);
        self.state.running.store(true, Ordering::SeqCst);
        RunningCell { state: &self.state }
    }

    pub fn take_interruption(&self) -> Option<Interruption> {
        self.state.pending.locked().take()
    }

    pub fn input_cancelled(&self) -> &AtomicBool {
        &self.state.cancel_input
    }

    /// Kills the evaluation process and any build in progress, so that nothing outlives its
    /// owner when it exits.
    pub fn kill_all(&self) {
        kill_builds();
        self.state.kill_runtime();
    }

    fn stop_running_cell(&self) {
        self.state.stop_running_cell();
    }

    /// Stops the running cell, if any. Returns what was interrupted.
    pub fn interrupt(&self) -> Option<Interruption> {
        if !self.state.running.load(Ordering::SeqCst) {
            return None;
        }
        self.state.cancel_input.store(true, Ordering::SeqCst);
        let builds = build_processes();
        let between_builds = self
            .state
            .line_running
            .locked()
            .as_ref()
            .is_some_and(|flag| !flag.load(Ordering::SeqCst));
        // Between two builds (evcxr analyses the cell in process) nothing runs yet: stop the
        // next build rather than the evaluation process.
        let kind = if builds.is_empty() && !between_builds {
            Interruption::Running
        } else {
            Interruption::Compiling
        };
        // Recorded before anything is killed: the evaluator asks what happened as soon as the
        // kill makes evcxr return, and must not take an interrupt for a crash.
        let mut pending = self.state.pending.locked();
        let first = pending.is_none();
        // Stopping the run may lose the variables, whatever an earlier interrupt stopped.
        if *pending != Some(Interruption::Running) {
            *pending = Some(kind);
        }
        drop(pending);
        match kind {
            Interruption::Compiling => kill(&builds),
            Interruption::Running => self.stop_running_cell(),
        }
        if first && kind == Interruption::Compiling {
            // evcxr may retry a failed build; keep stopping builds until the cell ends. A
            // compiled cell that starts meanwhile (it was on its way to the store) is stopped
            // too.
            let state = self.state.clone();
            std::thread::spawn(move || {
                while state.running.load(Ordering::SeqCst)
                    && state.pending.lock().map(|p| p.is_some()).unwrap_or(false)
                {
                    kill_builds();
                    if state.line_runs() {
                        *state.pending.locked() = Some(Interruption::Running);
                        state.stop_running_cell();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
        Some(kind)
    }
}

/// Every cargo build started by this process, and everything under it.
fn build_processes() -> Vec<u32> {
    let me = std::process::id();
    let table = process_table();
    table
        .iter()
        .filter(|(_, (parent, name))| *parent == me && name == "cargo")
        .flat_map(|(pid, _)| subtree(&table, *pid))
        .collect()
}

fn kill(pids: &[u32]) {
    for &pid in pids {
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
}

/// Kills every cargo build started by this process (and everything under it).
fn kill_builds() {
    kill(&build_processes());
}

/// pid -> (parent pid, command name), read from /proc.
pub fn process_table() -> HashMap<u32, (u32, String)> {
    let mut table = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return table;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The name is in parentheses and may itself contain spaces or parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_owned();
        let parent = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        table.insert(pid, (parent, name));
    }
    table
}

/// `root` and all its descendants, parents before children.
fn subtree(table: &HashMap<u32, (u32, String)>, root: u32) -> Vec<u32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(
            table
                .iter()
                .filter(|(_, (p, _))| *p == parent)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_table_sees_this_process_and_its_parent() {
        let table = process_table();
        let (parent, _name) = table.get(&std::process::id()).expect("self in /proc");
        assert_eq!(*parent, std::os::unix::process::parent_id());
    }

    #[test]
    fn subtree_collects_descendants() {
        let table: HashMap<u32, (u32, String)> = [
            (2, (1, "a".into())),
            (3, (2, "b".into())),
            (4, (3, "c".into())),
            (5, (1, "d".into())),
        ]
        .into_iter()
        .collect();
        let mut tree = subtree(&table, 2);
        tree.sort();
        assert_eq!(tree, vec![2, 3, 4]);
    }

    #[test]
    fn interrupt_with_nothing_running_does_nothing() {
        assert_eq!(Interrupter::default().interrupt(), None);
    }
}
