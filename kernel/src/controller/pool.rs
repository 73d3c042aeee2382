//! The pool: every engine the controller knows (its process, host, state, running tasks, the
//! state of its variables), the tasks in flight and whose events they feed, and the shared
//! cells being compiled. Plain data behind the controller's lock; no I/O.

use super::events::Events;
use super::plan::{self, Group, Standing, StateKey, EMPTY_HISTORY};
use bytes::Bytes;
use parallax_engine_protocol::{BuildCounts, HistoryEntry, ProcessUsage, Role, Share, StateReport};
use parallax_eval::history::{Entry, History};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineState {
    Starting,
    Idle,
    Busy,
    Dead(String),
}

impl std::fmt::Display for EngineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineState::Starting => write!(f, "starting"),
            EngineState::Idle => write!(f, "idle"),
            EngineState::Busy => write!(f, "busy"),
            EngineState::Dead(why) => write!(f, "dead ({why})"),
        }
    }
}

/// One row of `%cluster status`.
pub struct EngineStatus {
    pub id: u32,
    /// Its process id on its host.
    pub pid: u32,
    pub host: String,
    /// It runs on this host.
    pub local: bool,
    /// What it and its processes use, as it last said, and when that arrived.
    pub usage: Option<(ProcessUsage, Instant)>,
    pub state: EngineState,
    pub uptime: Duration,
    /// What its compiling contexts built, as its last report said.
    pub builds: BuildCounts,
}

pub struct Engine {
    /// Its process id on its host, once it registered (a local one's from the start).
    pub pid: u32,
    pub host: String,
    /// The launch it belongs to (`Registry::launches`).
    pub launch: u32,
    /// The process on this host that holds it and that stopping it may kill: a local engine
    /// itself, or the ssh client that runs a remote one.
    pub process: Option<u32>,
    /// When it last said anything (or was launched).
    pub last_heard: Instant,
    /// What it and its processes use, as it last said, and when that arrived.
    pub usage: Option<(ProcessUsage, Instant)>,
    pub state: EngineState,
    pub started: Instant,
    /// Its socket identity, once it registered.
    pub identity: Option<Bytes>,
    /// Tasks sent to this engine and not finished, oldest first.
    pub running: Vec<u64>,
    pub executed: u64,
    /// We asked it to exit, so its exit is no news.
    pub stopping: bool,
    /// The state its variables are in, as far as we know.
    pub state_key: StateKey,
    /// It holds a compiling context for its state (or will, once its queued cells ran).
    pub compiler: bool,
    /// Its last report.
    pub report: Option<StateReport>,
    /// Why its state left the others', in words, most recent cause.
    pub divergence: Option<String>,
    /// A copy of its history, from the entries its reports add; `None` once they did not add
    /// up to the fingerprint it reported.
    pub history: Option<History>,
    /// Its variables, as its last report said.
    pub variables: Vec<String>,
    /// What it takes over from the dead engine it replaces, sent once it registers.
    pub inheritance: Option<Inheritance>,
    /// When it was started again after a death, within the last minute or so.
    pub restarts: Vec<Instant>,
}

/// What the replacement of a dead engine takes over: the dead one's history (its functions,
/// types and dependencies) and the names of the variables that died with it.
#[derive(Debug, Clone, Default)]
pub struct Inheritance {
    pub history: Vec<HistoryEntry>,
    pub lost: Vec<String>,
}

impl Engine {
    /// An engine just launched on `host` (as far as the launcher knows), not registered yet.
    pub fn launched(launch: u32, host: &str) -> Engine {
        Engine {
            pid: 0,
            host: host.to_owned(),
            launch,
            process: None,
            last_heard: Instant::now(),
            usage: None,
            state: EngineState::Starting,
            started: Instant::now(),
            identity: None,
            running: Vec::new(),
            executed: 0,
            stopping: false,
            state_key: StateKey::Reported(EMPTY_HISTORY),
            compiler: false,
            report: None,
            divergence: None,
            history: Some(History::default()),
            variables: Vec::new(),
            inheritance: None,
            restarts: Vec::new(),
        }
    }

    pub fn is_dead(&self) -> bool {
        matches!(self.state, EngineState::Dead(_))
    }

    /// A task ended: it leaves the running list, and with nothing left the engine is idle.
    /// Its report, if any, says what state it is in now.
    pub fn task_ended(&mut self, task: u64, counted: bool, report: Option<StateReport>) {
        self.running.retain(|t| *t != task);
        if counted {
            self.executed += 1;
        }
        if self.running.is_empty() && self.state == EngineState::Busy {
            self.state = EngineState::Idle;
        }
        let Some(report) = report else { return };
        self.follow_history(&report);
        self.variables.clone_from(&report.variables);
        let said = self.report.as_ref().and_then(|r| r.note.as_ref());
        if report.note.is_some() && report.note.as_ref() != said {
            self.divergence.clone_from(&report.note);
        }
        // With cells still queued, the planner's prediction stands until the last.
        if self.running.is_empty() {
            self.state_key = StateKey::Reported(report.fingerprint);
            self.compiler = report.compiler;
        }
        self.report = Some(report);
    }
}

impl Engine {
    /// A replacement's record: the history it will have once it took over the dead engine's
    /// (which the planner must know, so that it never groups it with fresh engines).
    pub fn inherit(&mut self, inheritance: Inheritance) {
        let mut history = History::default();
        for entry in &inheritance.history {
            history.push(Entry::from_wire(entry));
        }
        history.push(Entry::from_wire(
            &parallax_engine_protocol::take_over_entry(),
        ));
        self.state_key = StateKey::Reported(history.fingerprint());
        self.history = Some(history);
        self.divergence = Some(if inheritance.lost.is_empty() {
            "it replaces the engine that died, with its functions, types and dependencies".into()
        } else {
            format!(
                "it replaces the engine that died, with its functions, types and dependencies; \
                 variables lost: {}",
                inheritance.lost.join(", ")
            )
        });
        self.inheritance = Some(inheritance);
    }

    /// Adds what a report adds to the copy of the engine's history, and checks the copy
    /// against the fingerprint it reports.
    fn follow_history(&mut self, report: &StateReport) {
        let Some(history) = self.history.as_mut() else {
            return;
        };
        for entry in &report.added {
            history.push(Entry::from_wire(entry));
        }
        history.compact();
        if history.fingerprint() != report.fingerprint {
            tracing::warn!(
                "the copy of an engine's history does not match its report ({} entries): a \
                 replacement would start without its functions",
                report.entries
            );
            self.history = None;
        }
    }
}

/// One start of engines by a launcher: what it is, what holds its engines on this host, and
/// the batch job it submitted.
pub struct Launch {
    /// `local`, `ssh`, `mpi`, `slurm` or `by hand`.
    pub kind: &'static str,
    /// Processes on this host that hold the launch's engines as a whole (mpiexec), signalled
    /// when it stops.
    pub processes: Vec<u32>,
    /// Its batch job, for Slurm.
    pub job: Option<BatchJob>,
    /// Its engines have been able to register since: a batch job's only once it runs.
    pub running_since: Option<Instant>,
    /// What an ssh engine of it is restarted with: the ssh configuration and the binary's
    /// path on its host.
    pub ssh_config: Option<std::path::PathBuf>,
    pub parallax: String,
    /// Its place in the pool's launch plans (`Controller::plans`): what a dead engine of it
    /// is started again with (a Slurm job's options).
    pub plan: Option<usize>,
}

/// A batch job and its state as the scheduler last said it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchJob {
    pub id: String,
    pub state: String,
    pub reason: String,
}

impl std::fmt::Display for BatchJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slurm job {} {}", self.id, self.state)?;
        if !self.reason.is_empty() && self.reason != "None" {
            write!(f, " ({})", self.reason)?;
        }
        Ok(())
    }
}

/// A task just closed.
pub struct ClosedTask {
    pub engine: u32,
    pub events: Events,
    /// It counts as an execution (warm-ups do not).
    pub counted: bool,
}

/// A shared cell in flight: who compiles it, and for whom.
pub struct SharedCell {
    pub leader: u32,
    pub followers: Vec<u32>,
    /// Tasks of the cell not yet done.
    pub open: usize,
}

#[derive(Default)]
pub struct Registry {
    pub engines: BTreeMap<u32, Engine>,
    pub next_engine: u32,
    pub launches: BTreeMap<u32, Launch>,
    pub next_launch: u32,
    next_task: u64,
    /// task -> (engine, where its events go)
    pub tasks: HashMap<u64, (u32, Events)>,
    next_cell: u64,
    pub cells: HashMap<u64, SharedCell>,
    /// task -> its shared cell
    task_cells: HashMap<u64, u64>,
    /// Tasks that do not count as executions (warming an engine up).
    pub uncounted: HashSet<u64>,
}

impl Registry {
    /// Ids of the engines `keep` selects, ascending.
    pub fn ids(&self, keep: impl Fn(&Engine) -> bool) -> Vec<u32> {
        self.engines
            .iter()
            .filter(|(_, e)| keep(e))
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn live_count(&self) -> u32 {
        self.engines.values().filter(|e| !e.is_dead()).count() as u32
    }

    /// The engine that registered with socket identity `identity`.
    pub fn engine_at(&self, identity: &Bytes) -> Option<u32> {
        self.engines
            .iter()
            .find(|(_, e)| e.identity.as_ref() == Some(identity))
            .map(|(id, _)| *id)
    }

    /// Records a new launch; returns its id.
    pub fn add_launch(&mut self, launch: Launch) -> u32 {
        let id = self.next_launch;
        self.next_launch += 1;
        self.launches.insert(id, launch);
        id
    }

    /// The live engines of launch `launch`.
    pub fn engines_of(&self, launch: u32) -> Vec<u32> {
        self.ids(|e| e.launch == launch && !e.is_dead())
    }

    /// A new task for `engine`, whose events go to `events`.
    pub fn open_task(&mut self, engine: u32, events: &Events, cell: Option<u64>) -> u64 {
        let task = self.next_task;
        self.next_task += 1;
        self.tasks.insert(task, (engine, events.clone()));
        if let Some(cell) = cell {
            self.task_cells.insert(task, cell);
        }
        if let Some(record) = self.engines.get_mut(&engine) {
            record.running.push(task);
            if record.state == EngineState::Idle {
                record.state = EngineState::Busy;
            }
        }
        task
    }

    /// Opens a task that is no cell (a carry): not queued among the engine's cells, not counted
    /// as an execution, but routed and ended like any task, also by the engine's death.
    pub fn open_side_task(&mut self, engine: u32, events: &Events) -> u64 {
        let task = self.next_task;
        self.next_task += 1;
        self.tasks.insert(task, (engine, events.clone()));
        self.uncounted.insert(task);
        task
    }

    /// Every open task of `engine`: its cells and its side tasks.
    pub fn tasks_of(&self, engine: u32) -> Vec<u64> {
        let mut tasks: Vec<u64> = self
            .tasks
            .iter()
            .filter(|(_, (e, _))| *e == engine)
            .map(|(task, _)| *task)
            .collect();
        tasks.sort_unstable();
        tasks
    }

    /// Task `task` is over: returns its engine, where its events went, and whether it counts
    /// as an execution, if it was open.
    pub fn close_task(&mut self, task: u64) -> Option<ClosedTask> {
        self.close_cell_task(task);
        let counted = !self.uncounted.remove(&task);
        let (engine, events) = self.tasks.remove(&task)?;
        Some(ClosedTask {
            engine,
            events,
            counted,
        })
    }

    /// A task of a shared cell ended; the cell is forgotten with its last task.
    fn close_cell_task(&mut self, task: u64) {
        if let Some(cell) = self.task_cells.remove(&task) {
            if let Some(shared) = self.cells.get_mut(&cell) {
                shared.open = shared.open.saturating_sub(1);
                if shared.open == 0 {
                    self.cells.remove(&cell);
                }
            }
        }
    }

    /// What the planner knows of each live engine.
    pub fn standings(&self) -> BTreeMap<u32, Standing> {
        self.engines
            .iter()
            .filter(|(_, e)| !e.is_dead())
            .map(|(id, e)| {
                let standing = Standing {
                    host: e.host.clone(),
                    state: e.state_key,
                    compiler: e.compiler,
                    divergence: e.divergence.clone(),
                };
                (*id, standing)
            })
            .collect()
    }

    /// Plans a cell for `targets` (see `plan::plan`) and records it: the shared cells, the
    /// state each engine will be in, who compiles, and why engines left out part.
    pub fn share(&mut self, targets: &[u32]) -> HashMap<u32, Share> {
        let groups = plan::plan(&self.standings(), targets, self.next_cell);
        self.next_cell += groups.len() as u64;
        let mut shares = HashMap::new();
        for group in groups {
            for (engine, why) in group.divergences() {
                if let Some(record) = self.engines.get_mut(&engine) {
                    record.divergence = Some(why);
                }
            }
            for member in group.members() {
                shares.insert(member, share_of(&group, member));
                if let Some(record) = self.engines.get_mut(&member) {
                    record.state_key = StateKey::After(group.cell);
                    record.compiler = member == group.leader;
                }
            }
            let open = group.followers.len() + 1;
            self.cells.insert(
                group.cell,
                SharedCell {
                    leader: group.leader,
                    followers: group.followers,
                    open,
                },
            );
        }
        shares
    }

    /// The cells `engine` leads and that are still open, with their followers.
    pub fn cells_led_by(&self, engine: u32) -> Vec<(u64, Vec<u32>)> {
        self.cells
            .iter()
            .filter(|(_, shared)| shared.leader == engine)
            .map(|(cell, shared)| (*cell, shared.followers.clone()))
            .collect()
    }
}

fn share_of(group: &Group, member: u32) -> Share {
    let role = if member == group.leader {
        Role::Lead {
            followers: group.followers.clone(),
        }
    } else {
        Role::Follow {
            leader: group.leader,
        }
    };
    Share {
        cell: group.cell,
        role,
    }
}
