//! The controller: owns the pool of engines. It starts engine processes, talks to them over a
//! signed ZeroMQ ROUTER socket, routes each task's output to whoever runs the job, and notices
//! at once when an engine process dies. Engines reach it over TCP only, so nothing here
//! assumes that they share this host's file system, except for launching local ones.

use crate::monitor::{Monitor, TaskKey};
use anyhow::Context;
use bytes::Bytes;
use parallax_engine::payload_from;
use parallax_engine_protocol::{
    FromEngine, Outcome, Receiver, Role, Sender, Share, Signer, StateReport, Step, StreamName,
    ToEngine,
};
use parallax_eval::Payload;
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use zeromq::{RouterSendHalf, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// How long `%cluster start` waits for engines to build their evaluation context.
const START_TIMEOUT: Duration = Duration::from_secs(600);

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

struct Engine {
    pid: u32,
    host: String,
    state: EngineState,
    started: Instant,
    identity: Option<Bytes>,
    /// Tasks sent to this engine and not finished, oldest first.
    running: Vec<u64>,
    executed: u64,
    /// We asked it to exit, so its exit is no news.
    stopping: bool,
    /// The state its variables are in, as far as we know: engines on one host in the same
    /// state share compiled cells.
    state_key: StateKey,
    /// It holds a compiling context for its state (or will, once its queued cells ran).
    compiler: bool,
    /// Its last report.
    report: Option<StateReport>,
    /// Why its state left the others', in words, most recent cause.
    divergence: Option<String>,
}

/// What an engine's state is known as: its history's fingerprint, once it reported with nothing
/// queued, or the shared cell it was last sent, which leaves every engine of that cell's group
/// in one state unless their outcomes differ (they report that later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum StateKey {
    Reported(u64),
    After(u64),
}

/// A shared cell in flight: who compiles it, and for whom.
struct SharedCell {
    leader: u32,
    followers: Vec<u32>,
    /// Tasks of the cell not yet done.
    open: usize,
}

/// What a job hears about its tasks.
#[derive(Debug, Clone)]
pub enum TaskEvent {
    Stream {
        engine: u32,
        name: StreamName,
        text: String,
    },
    Done {
        engine: u32,
        execution_count: u64,
        outcome: Outcome,
    },
    /// The values a `Fetch` asked for.
    Fetched {
        engine: u32,
        type_src: String,
        payload: Payload,
    },
    /// A map's cell is serving on `engine`.
    MapReady {
        engine: u32,
        arg_type: String,
        result_type: String,
    },
    ChunkDone {
        engine: u32,
        chunk: u64,
        elapsed_ns: u64,
        failures: Vec<(u64, String)>,
        results: Payload,
    },
    ChunkRefused {
        engine: u32,
        chunk: u64,
        message: String,
    },
    /// A map's result type, as a cell writes it.
    ResultType { type_src: String },
}

/// Where a job hears about its tasks.
pub type Events = mpsc::UnboundedSender<TaskEvent>;

/// One row of `%cluster status`.
pub struct EngineStatus {
    pub id: u32,
    pub pid: u32,
    pub host: String,
    pub state: EngineState,
    pub uptime: Duration,
}

#[derive(Default)]
struct Registry {
    engines: BTreeMap<u32, Engine>,
    next_engine: u32,
    next_task: u64,
    /// task -> (engine, where its events go)
    tasks: HashMap<u64, (u32, mpsc::UnboundedSender<TaskEvent>)>,
    next_cell: u64,
    cells: HashMap<u64, SharedCell>,
    /// task -> its shared cell
    task_cells: HashMap<u64, u64>,
    /// Tasks that do not count as executions (warming an engine up).
    uncounted: std::collections::HashSet<u64>,
}

impl Registry {
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

    /// Splits `targets` into groups that share compiled cells (one host, one state), each with
    /// its leader: an engine that already holds a compiling context for that state if there
    /// is one, else the lowest id. Records the cells and the state each engine will be in.
    fn plan(&mut self, targets: &[u32]) -> HashMap<u32, Share> {
        let mut groups: BTreeMap<(String, StateKey), Vec<u32>> = BTreeMap::new();
        for &engine in targets {
            let key = match self.engines.get(&engine) {
                Some(e) if !is_dead(e) => (e.host.clone(), e.state_key),
                // Dead or unknown: it will not run the cell; alone, no one waits for it.
                _ => (String::new(), StateKey::After(u64::MAX - engine as u64)),
            };
            groups.entry(key).or_default().push(engine);
        }
        let mut plan = HashMap::new();
        for ((host, state), members) in groups {
            let cell = self.next_cell;
            self.next_cell += 1;
            // Engines in this state that do not get the cell part from those that do.
            let left_out: Vec<u32> = self
                .engines
                .iter()
                .filter(|(id, e)| {
                    !is_dead(e) && e.host == host && e.state_key == state && !members.contains(id)
                })
                .map(|(id, _)| *id)
                .collect();
            if !left_out.is_empty() {
                let ids = |list: &[u32]| {
                    list.iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                for &member in &members {
                    if let Some(engine) = self.engines.get_mut(&member) {
                        engine.divergence = Some(format!(
                            "it ran a cell (shared cell {cell}) that engines {} did not",
                            ids(&left_out)
                        ));
                    }
                }
                for &other in &left_out {
                    if let Some(engine) = self.engines.get_mut(&other) {
                        engine.divergence = Some(format!(
                            "engines {} ran a cell (shared cell {cell}) that it did not",
                            ids(&members)
                        ));
                    }
                }
            }
            let leader = members
                .iter()
                .copied()
                .find(|m| self.engines.get(m).is_some_and(|e| e.compiler))
                .unwrap_or(members[0]);
            let followers: Vec<u32> = members.iter().copied().filter(|m| *m != leader).collect();
            for &member in &members {
                let role = if member == leader {
                    Role::Lead {
                        followers: followers.clone(),
                    }
                } else {
                    Role::Follow { leader }
                };
                plan.insert(member, Share { cell, role });
                if let Some(engine) = self.engines.get_mut(&member) {
                    engine.state_key = StateKey::After(cell);
                    engine.compiler = member == leader;
                }
            }
            self.cells.insert(
                cell,
                SharedCell {
                    leader,
                    followers,
                    open: members.len(),
                },
            );
        }
        plan
    }
}

struct Link {
    endpoint: String,
    key_file: PathBuf,
    commands: mpsc::UnboundedSender<Outgoing>,
}

/// A message for one engine, with its binary buffers.
type Outgoing = (u32, ToEngine, Vec<Bytes>);

/// A cheap handle on the controller.
#[derive(Clone)]
pub struct Controller {
    registry: Arc<Mutex<Registry>>,
    signer: Signer,
    key: String,
    link: Arc<tokio::sync::Mutex<Option<Link>>>,
    /// Bumped whenever an engine changes state, for waiters.
    changed: Arc<watch::Sender<u64>>,
    /// Bumped by each interrupt of everything (the kernel's stop button), for running jobs.
    interrupts: Arc<watch::Sender<u64>>,
    /// What the engines are doing, for the dashboard.
    pub monitor: Monitor,
    /// Timed round trips in flight: nonce -> engines yet to answer, and who waits.
    round_trips: Arc<Mutex<RoundTrips>>,
    /// The dispatcher's queue, for passing on steps from where no await is allowed.
    commands: Arc<std::sync::OnceLock<mpsc::UnboundedSender<Outgoing>>>,
    /// Held while a shared cell is sent to its engines, so that every engine receives shared
    /// cells in the same order (a follower waits for its leader, never the other way round).
    dispatching: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Default)]
struct RoundTrips {
    sent: u64,
    open: HashMap<u64, RoundTrip>,
}

struct RoundTrip {
    waiting_for: std::collections::BTreeSet<u32>,
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Timed round trips use nonces from here up, apart from the keep-alive pings' small ones.
const ROUND_TRIP_NONCES: u64 = 1 << 63;

/// The fingerprint of an engine that has executed nothing.
const EMPTY_HISTORY: u64 = 0;

impl Controller {
    pub fn new(key: &str) -> Self {
        let (changed, _) = watch::channel(0);
        let (interrupts, _) = watch::channel(0);
        Controller {
            interrupts: Arc::new(interrupts),
            monitor: Monitor::default(),
            round_trips: Arc::default(),
            commands: Arc::default(),
            dispatching: Arc::default(),
            registry: Arc::default(),
            signer: Signer::new(key),
            key: key.to_owned(),
            link: Arc::default(),
            changed: Arc::new(changed),
        }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Binds the engines' socket on first use.
    async fn link(&self) -> anyhow::Result<(String, PathBuf)> {
        let mut link = self.link.lock().await;
        if let Some(link) = link.as_ref() {
            return Ok((link.endpoint.clone(), link.key_file.clone()));
        }
        let mut socket = RouterSocket::new();
        let endpoint = socket
            .bind("tcp://127.0.0.1:0")
            .await
            .context("binding the engines' socket")?
            .to_string();
        let key_file = write_key_file(&self.key)?;
        let (send, recv) = socket.split();
        let (commands, command_rx) = mpsc::unbounded_channel();
        let _ = self.commands.set(commands.clone());
        tokio::spawn(self.clone().receive(recv));
        tokio::spawn(self.clone().dispatch(send, command_rx));
        tokio::spawn(self.clone().ping());
        *link = Some(Link {
            endpoint: endpoint.clone(),
            key_file: key_file.clone(),
            commands,
        });
        Ok((endpoint, key_file))
    }

    async fn send(&self, engine: u32, message: ToEngine) {
        self.send_to(engine, message, Vec::new()).await;
    }

    /// Sends a message with buffers to one engine (a map's chunks, its end).
    pub async fn send_to(&self, engine: u32, message: ToEngine, buffers: Vec<Bytes>) {
        if let ToEngine::Chunk { task, chunk, .. } = &message {
            let label = self.monitor.label_of_map(*task);
            self.monitor.started(
                TaskKey::Chunk {
                    task: *task,
                    chunk: *chunk,
                },
                engine,
                &label,
            );
        }
        if let Some(link) = self.link.lock().await.as_ref() {
            let _ = link.commands.send((engine, message, buffers));
        }
    }

    /// Starts `count` engines and waits until each is ready or dead. Returns the new ids.
    pub async fn start_engines(&self, count: u32) -> anyhow::Result<Vec<u32>> {
        let ids: Vec<u32> = {
            let mut registry = self.registry();
            let first = registry.next_engine;
            registry.next_engine += count;
            (first..first + count).collect()
        };
        let total = self
            .registry()
            .engines
            .values()
            .filter(|e| !is_dead(e))
            .count() as u32
            + count;
        for &id in &ids {
            self.spawn_engine(id, total).await?;
        }
        self.wait_until_started(&ids).await?;
        let live: Vec<u32> = {
            let registry = self.registry();
            ids.iter()
                .copied()
                .filter(|id| registry.engines.get(id).is_some_and(|e| !is_dead(e)))
                .collect()
        };
        self.warm_up(&live).await?;
        Ok(ids)
    }

    /// Starts a new process in the place of dead engine `id`, with the same id, and waits until
    /// it is ready. Its variables are gone: it starts from an empty context.
    pub async fn restart_engine(&self, id: u32) -> anyhow::Result<()> {
        let total = {
            let registry = self.registry();
            match registry.engines.get(&id) {
                None => anyhow::bail!("there is no engine {id}"),
                Some(engine) if !is_dead(engine) => {
                    anyhow::bail!(
                        "engine {id} is {}; only a dead engine is restarted",
                        engine.state
                    )
                }
                Some(_) => registry.engines.values().filter(|e| !is_dead(e)).count() as u32 + 1,
            }
        };
        tracing::info!("restarting engine {id}");
        self.spawn_engine(id, total).await?;
        if let Some(engine) = self.registry().engines.get_mut(&id) {
            engine.divergence = Some("it was restarted, with none of the others' state".into());
        }
        self.wait_until_started(&[id]).await?;
        self.warm_up(&[id]).await?;
        match self.registry().engines.get(&id).map(|e| e.state.clone()) {
            Some(EngineState::Dead(why)) => anyhow::bail!("engine {id} died again: {why}"),
            _ => Ok(()),
        }
    }

    /// Launches the process of engine `id`, one of `total` live engines.
    async fn spawn_engine(&self, id: u32, total: u32) -> anyhow::Result<()> {
        let (endpoint, key_file) = self.link().await?;
        let exe = std::env::current_exe().context("finding the parallax binary")?;
        let mut command = tokio::process::Command::new(&exe);
        command
            .args(["engine", "--controller", &endpoint, "--id", &id.to_string()])
            .arg("--key-file")
            .arg(&key_file)
            .env("PARALLAX_ENGINE_ID", id.to_string())
            .env("PARALLAX_ENGINES", total.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: prctl in the child between fork and exec touches no memory of ours; it
        // ties the engine's life to this kernel's, even when the kernel is SIGKILLed.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command.spawn().context("starting an engine process")?;
        let pid = child.id().unwrap_or(0);
        let last_words = child
            .stderr
            .take()
            .map(|stderr| tokio::spawn(relay_stderr(stderr, id, self.monitor.clone())));
        self.registry().engines.insert(
            id,
            Engine {
                pid,
                host: "localhost".into(),
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
            },
        );
        tokio::spawn(self.clone().watch_process(id, child, last_words));
        self.notify();
        self.monitor
            .output(id, "log", &format!("engine {id} started (pid {pid})"));
        Ok(())
    }

    /// Waits until none of `ids` is still starting.
    async fn wait_until_started(&self, ids: &[u32]) -> anyhow::Result<()> {
        let mut changed = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            let starting = {
                let registry = self.registry();
                ids.iter()
                    .filter(|id| {
                        registry
                            .engines
                            .get(id)
                            .is_some_and(|e| e.state == EngineState::Starting)
                    })
                    .count()
            };
            if starting == 0 {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                anyhow::bail!("{starting} engines were not ready after {START_TIMEOUT:?}");
            }
        }
    }

    /// Waits for an engine process to exit and reports it: at once, by id and cause.
    async fn watch_process(
        self,
        id: u32,
        mut child: tokio::process::Child,
        last_words: Option<tokio::task::JoinHandle<Option<String>>>,
    ) {
        // Taken before the wait: a reaped child has no id.
        let pid = child.id();
        let status = child.wait().await;
        let cause = match status {
            Ok(status) => match (status.signal(), status.code()) {
                (Some(signal), _) => format!("killed by signal {signal} ({})", signal_name(signal)),
                (None, Some(code)) => {
                    // An engine that gives up says why on its last line; a moment to read it.
                    let said = match last_words {
                        Some(reader) => tokio::time::timeout(Duration::from_millis(300), reader)
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .flatten(),
                        None => None,
                    };
                    match said {
                        Some(reason) => format!("exited with code {code}: {reason}"),
                        None => format!("exited with code {code}"),
                    }
                }
                (None, None) => "exited".to_owned(),
            },
            Err(e) => format!("lost: {e}"),
        };
        // A restarted engine has the same id and a new process: the old one's end is no news.
        let replaced = self
            .registry()
            .engines
            .get(&id)
            .is_some_and(|engine| pid.is_some_and(|p| p != engine.pid));
        if replaced {
            return;
        }
        let mut expected = false;
        let orphaned: Vec<(u64, mpsc::UnboundedSender<TaskEvent>)> = {
            let mut registry = self.registry();
            let running = match registry.engines.get_mut(&id) {
                Some(engine) => {
                    expected = engine.stopping;
                    if !matches!(engine.state, EngineState::Dead(_)) {
                        engine.state = EngineState::Dead(cause.clone());
                    }
                    std::mem::take(&mut engine.running)
                }
                None => Vec::new(),
            };
            // Followers waiting for its compiled cells hear that it is gone.
            let led: Vec<(u64, Vec<u32>)> = registry
                .cells
                .iter()
                .filter(|(_, shared)| shared.leader == id)
                .map(|(cell, shared)| (*cell, shared.followers.clone()))
                .collect();
            for (cell, followers) in led {
                for follower in followers {
                    self.pass_on(
                        follower,
                        ToEngine::Shared {
                            cell,
                            from: id,
                            step: Step::Abort {
                                reason: cause.clone(),
                            },
                        },
                    );
                }
            }
            for task in &running {
                registry.close_cell_task(*task);
                registry.uncounted.remove(task);
            }
            running
                .into_iter()
                .filter_map(|task| registry.tasks.remove(&task).map(|(_, tx)| (task, tx)))
                .collect()
        };
        self.monitor.engine_died(id, &cause);
        if expected {
            tracing::info!("engine {id} stopped: {cause}");
        } else {
            tracing::warn!("engine {id} {cause}");
        }
        for (_, events) in orphaned {
            let _ = events.send(TaskEvent::Done {
                engine: id,
                execution_count: 0,
                outcome: Outcome::Error {
                    ename: "EngineDied".into(),
                    evalue: format!("engine {id} {cause}"),
                    traceback: vec![format!(
                        "EngineDied: engine {id} {cause}; the other engines go on"
                    )],
                },
            });
        }
        self.notify();
    }

    async fn receive(self, mut socket: zeromq::RouterRecvHalf) {
        let mut receiver = Receiver::new(self.signer.clone());
        loop {
            let raw = match socket.recv().await {
                Ok(raw) => raw,
                Err(e) => {
                    tracing::warn!("engines: receive failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let mut frames = raw.into_vec();
            if frames.is_empty() {
                continue;
            }
            let identity = frames.remove(0);
            match receiver.decode::<FromEngine>(frames) {
                Ok(envelope) => self.handle(identity, envelope.body, envelope.buffers),
                Err(e) => tracing::warn!("engines: dropped a message: {e}"),
            }
        }
    }

    fn handle(&self, identity: Bytes, message: FromEngine, buffers: Vec<Bytes>) {
        let mut registry = self.registry();
        let sender = registry
            .engines
            .iter()
            .find(|(_, e)| e.identity.as_ref() == Some(&identity))
            .map(|(id, _)| *id);
        match message {
            FromEngine::Register { engine, pid, host } => match registry.engines.get_mut(&engine) {
                Some(record) if record.pid == pid && record.identity.is_none() => {
                    record.identity = Some(identity);
                    record.host = host;
                }
                // It says it again until it hears from us.
                Some(record)
                    if record.pid == pid && record.identity.as_ref() == Some(&identity) => {}
                _ => tracing::warn!(
                    "engines: unexpected registration as engine {engine} (pid {pid})"
                ),
            },
            FromEngine::Ready { engine } if sender == Some(engine) => {
                if let Some(record) = registry.engines.get_mut(&engine) {
                    if record.state == EngineState::Starting {
                        record.state = EngineState::Idle;
                    }
                }
                drop(registry);
                self.notify();
            }
            FromEngine::Stream { task, name, text } => {
                if let Some((engine, events)) = registry.tasks.get(&task) {
                    if sender == Some(*engine) {
                        let stream = match name {
                            StreamName::Stdout => "stdout",
                            StreamName::Stderr => "stderr",
                        };
                        self.monitor.output(*engine, stream, &text);
                        let _ = events.send(TaskEvent::Stream {
                            engine: *engine,
                            name,
                            text,
                        });
                    }
                }
            }
            FromEngine::Done {
                task,
                outcome,
                state,
            } => {
                let owned = registry
                    .tasks
                    .get(&task)
                    .is_some_and(|(e, _)| sender == Some(*e));
                if owned {
                    let error = match &outcome {
                        Outcome::Error { ename, evalue, .. } => Some(format!("{ename}: {evalue}")),
                        Outcome::Ok { .. } => None,
                    };
                    self.monitor.finished(TaskKey::Task(task), error, None);
                    registry.close_cell_task(task);
                    let counted = !registry.uncounted.remove(&task);
                    if let Some((engine, events)) = registry.tasks.remove(&task) {
                        let mut count = 0;
                        if let Some(record) = registry.engines.get_mut(&engine) {
                            record.running.retain(|t| *t != task);
                            if counted {
                                record.executed += 1;
                            }
                            count = record.executed;
                            if record.running.is_empty() && record.state == EngineState::Busy {
                                record.state = EngineState::Idle;
                            }
                            if let Some(report) = state {
                                let said = record.report.as_ref().and_then(|r| r.note.as_ref());
                                if report.note.is_some() && report.note.as_ref() != said {
                                    record.divergence.clone_from(&report.note);
                                }
                                // With cells still queued, the prediction stands until the last.
                                if record.running.is_empty() {
                                    record.state_key = StateKey::Reported(report.fingerprint);
                                    record.compiler = report.compiler;
                                }
                                record.report = Some(report);
                            }
                        }
                        let _ = events.send(TaskEvent::Done {
                            engine,
                            execution_count: count,
                            outcome,
                        });
                    }
                }
            }
            FromEngine::Share { cell, to, step } => {
                let Some(shared) = registry.cells.get(&cell) else {
                    return;
                };
                if sender != Some(shared.leader) {
                    tracing::warn!(
                        "engines: engine {sender:?} spoke for cell {cell} of engine {}",
                        shared.leader
                    );
                    return;
                }
                for follower in to {
                    if shared.followers.contains(&follower) {
                        self.pass_on(
                            follower,
                            ToEngine::Shared {
                                cell,
                                from: shared.leader,
                                step: step.clone(),
                            },
                        );
                    }
                }
            }
            FromEngine::Pong { nonce } => {
                if let Some(engine) = sender {
                    let mut trips = self.round_trips.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(trip) = trips.open.get_mut(&nonce) {
                        trip.waiting_for.remove(&engine);
                        if trip.waiting_for.is_empty() {
                            if let Some(done) = trip.done.take() {
                                let _ = done.send(());
                            }
                        }
                    }
                }
            }
            FromEngine::Fetched {
                task,
                type_src,
                meta,
            } => {
                let event = payload_from(meta, buffers).map(|payload| {
                    move |engine| TaskEvent::Fetched {
                        engine,
                        type_src,
                        payload,
                    }
                });
                forward(&registry, sender, task, event);
            }
            FromEngine::MapReady {
                task,
                arg_type,
                result_type,
            } => forward(
                &registry,
                sender,
                task,
                Ok(|engine| TaskEvent::MapReady {
                    engine,
                    arg_type,
                    result_type,
                }),
            ),
            FromEngine::ChunkDone {
                task,
                chunk,
                elapsed_ns,
                failures,
                meta,
            } => {
                let failed = failures
                    .first()
                    .map(|(index, message)| format!("item {index}: {message}"));
                self.monitor.finished(
                    TaskKey::Chunk { task, chunk },
                    failed,
                    Some(Duration::from_nanos(elapsed_ns)),
                );
                // Results that do not decode are a refused chunk: it is run again elsewhere.
                match payload_from(meta, buffers) {
                    Ok(results) => forward(
                        &registry,
                        sender,
                        task,
                        Ok(|engine| TaskEvent::ChunkDone {
                            engine,
                            chunk,
                            elapsed_ns,
                            failures,
                            results,
                        }),
                    ),
                    Err(message) => forward(
                        &registry,
                        sender,
                        task,
                        Ok(|engine| TaskEvent::ChunkRefused {
                            engine,
                            chunk,
                            message: format!("malformed results: {message}"),
                        }),
                    ),
                }
            }
            FromEngine::ChunkRefused {
                task,
                chunk,
                message,
            } => {
                self.monitor
                    .finished(TaskKey::Chunk { task, chunk }, Some(message.clone()), None);
                forward(
                    &registry,
                    sender,
                    task,
                    Ok(|engine| TaskEvent::ChunkRefused {
                        engine,
                        chunk,
                        message,
                    }),
                );
            }
            FromEngine::ResultType { task, type_src } => forward(
                &registry,
                sender,
                task,
                Ok(|_| TaskEvent::ResultType { type_src }),
            ),
            other => tracing::warn!("engines: unexpected {other:?} from {sender:?}"),
        }
    }

    async fn dispatch(
        self,
        mut socket: RouterSendHalf,
        mut commands: mpsc::UnboundedReceiver<Outgoing>,
    ) {
        let mut sender = Sender::new(
            self.signer.clone(),
            format!("controller-{}", std::process::id()),
        );
        while let Some((engine, message, buffers)) = commands.recv().await {
            let identity = self
                .registry()
                .engines
                .get(&engine)
                .and_then(|e| e.identity.clone());
            let Some(identity) = identity else {
                tracing::warn!("engines: engine {engine} has not registered; dropped {message:?}");
                continue;
            };
            let mut frames = vec![identity];
            frames.extend(sender.encode(&message, buffers));
            if let Ok(message) = ZmqMessage::try_from(frames) {
                if let Err(e) = socket.send(message).await {
                    tracing::warn!("engines: send to engine {engine} failed: {e}");
                }
            }
        }
    }

    /// Engines exit when they stop hearing from us; a ping a second keeps them alive.
    async fn ping(self) {
        let mut nonce = 0;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            nonce += 1;
            let listening: Vec<u32> = self
                .registry()
                .engines
                .iter()
                .filter(|(_, e)| !is_dead(e) && !e.stopping && e.identity.is_some())
                .map(|(id, _)| *id)
                .collect();
            for id in listening {
                self.send(id, ToEngine::Ping { nonce }).await;
            }
        }
    }

    /// Sends a no-op message to each of `engines` and waits for all their answers: the time
    /// from the first send to the last answer, or None if one did not answer `within`.
    pub async fn round_trip(&self, engines: &[u32], within: Duration) -> Option<Duration> {
        let (done, answered) = tokio::sync::oneshot::channel();
        let nonce = {
            let mut trips = self.round_trips.lock().unwrap_or_else(|p| p.into_inner());
            trips.sent += 1;
            let nonce = ROUND_TRIP_NONCES + trips.sent;
            trips.open.insert(
                nonce,
                RoundTrip {
                    waiting_for: engines.iter().copied().collect(),
                    done: Some(done),
                },
            );
            nonce
        };
        let started = Instant::now();
        for &engine in engines {
            self.send(engine, ToEngine::Ping { nonce }).await;
        }
        let answered = tokio::time::timeout(within, answered).await;
        let took = started.elapsed();
        self.round_trips
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .open
            .remove(&nonce);
        matches!(answered, Ok(Ok(()))).then_some(took)
    }

    /// Ids of the engines that can take cells (registered and ready), ascending.
    pub fn ready_engines(&self) -> Vec<u32> {
        self.registry()
            .engines
            .iter()
            .filter(|(_, e)| matches!(e.state, EngineState::Idle | EngineState::Busy))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Ids of the engines that are not dead, ascending.
    pub fn live_engines(&self) -> Vec<u32> {
        self.registry()
            .engines
            .iter()
            .filter(|(_, e)| !is_dead(e))
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn status(&self) -> Vec<EngineStatus> {
        self.registry()
            .engines
            .iter()
            .map(|(id, e)| EngineStatus {
                id: *id,
                pid: e.pid,
                host: e.host.clone(),
                state: e.state.clone(),
                uptime: e.started.elapsed(),
            })
            .collect()
    }

    /// Which live engines share compiled cells and which compile their own, and why: a line
    /// each, for `%cluster status`.
    pub fn sharing(&self) -> Vec<String> {
        let registry = self.registry();
        let mut groups: BTreeMap<(String, StateKey), Vec<u32>> = BTreeMap::new();
        let mut per_host: HashMap<String, usize> = HashMap::new();
        for (id, engine) in registry.engines.iter().filter(|(_, e)| !is_dead(e)) {
            groups
                .entry((engine.host.clone(), engine.state_key))
                .or_default()
                .push(*id);
            *per_host.entry(engine.host.clone()).or_default() += 1;
        }
        let mut lines = Vec::new();
        for ((host, _), members) in groups {
            let compiling = members
                .iter()
                .copied()
                .find(|m| registry.engines.get(m).is_some_and(|e| e.compiler));
            if members.len() > 1 {
                let ids: Vec<String> = members.iter().map(u32::to_string).collect();
                lines.push(match compiling {
                    Some(leader) => format!(
                        "engines {} on {host} share compiled cells: engine {leader} compiles them",
                        ids.join(", ")
                    ),
                    None => format!(
                        "engines {} on {host} share compiled cells: engine {} will compile the next",
                        ids.join(", "),
                        members[0]
                    ),
                });
                continue;
            }
            let id = members[0];
            let why = if per_host.get(&host) == Some(&1) {
                format!("it is the only engine on {host}")
            } else {
                registry
                    .engines
                    .get(&id)
                    .and_then(|e| e.divergence.clone())
                    .unwrap_or_else(|| "no other engine is in its state".to_owned())
            };
            lines.push(format!(
                "engine {id} on {host} compiles its own cells: {why}"
            ));
        }
        lines
    }

    /// Sends `code` to each engine in `targets`; the events of every task go to one channel.
    pub async fn submit(
        &self,
        targets: &[u32],
        code: &str,
    ) -> (Vec<(u32, u64)>, mpsc::UnboundedReceiver<TaskEvent>) {
        let (events, event_rx) = mpsc::unbounded_channel();
        let sent = self
            .start_shared(targets, &events, |_, task, share| {
                let code = code.to_owned();
                (ToEngine::Execute { task, code, share }, Vec::new())
            })
            .await;
        (sent, event_rx)
    }

    /// Queues a message for an engine without waiting (from where no await is allowed).
    fn pass_on(&self, engine: u32, message: ToEngine) {
        if let Some(commands) = self.commands.get() {
            let _ = commands.send((engine, message, Vec::new()));
        }
    }

    /// Starts one task on each of `targets`, all executing the same cell: the engines of one
    /// host whose states are the same share it, compiled once by one of them. `message` makes
    /// what to send to an engine from its task's id and its part in the sharing.
    pub async fn start_shared(
        &self,
        targets: &[u32],
        events: &Events,
        mut message: impl FnMut(u32, u64, Share) -> (ToEngine, Vec<Bytes>),
    ) -> Vec<(u32, u64)> {
        let _in_order = self.dispatching.lock().await;
        let mut plan = self.registry().plan(targets);
        let mut sent = Vec::with_capacity(targets.len());
        for &engine in targets {
            let Some(share) = plan.remove(&engine) else {
                continue;
            };
            let cell = share.cell;
            let task = self
                .start_task_in(engine, events, Some(cell), |task| {
                    message(engine, task, share)
                })
                .await;
            sent.push((engine, task));
        }
        sent
    }

    /// Has new engines build what every cell needs first (their compiling context, the
    /// helper crates), once per host, before they count as started.
    async fn warm_up(&self, ids: &[u32]) -> anyhow::Result<()> {
        let (events, mut event_rx) = mpsc::unbounded_channel();
        let tasks = self
            .start_shared(ids, &events, |_, task, share| {
                let code = String::new();
                (ToEngine::Execute { task, code, share }, Vec::new())
            })
            .await;
        {
            let mut registry = self.registry();
            registry
                .uncounted
                .extend(tasks.iter().map(|(_, task)| *task));
        }
        drop(events);
        let mut waiting = tasks.len();
        let mut failures = Vec::new();
        while waiting > 0 {
            match event_rx.recv().await {
                Some(TaskEvent::Done {
                    engine, outcome, ..
                }) => {
                    waiting -= 1;
                    if let Outcome::Error { ename, evalue, .. } = outcome {
                        failures.push(format!("engine {engine}: {ename}: {evalue}"));
                    }
                }
                Some(_) => {}
                None => break,
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("engines could not get ready: {}", failures.join("; "))
        }
    }

    /// Starts one task on `engine`: `message` makes what to send from the new task's id. The
    /// task's events go to `events` until its `Done` (or the engine's death).
    async fn start_task_in(
        &self,
        engine: u32,
        events: &Events,
        cell: Option<u64>,
        message: impl FnOnce(u64) -> (ToEngine, Vec<Bytes>),
    ) -> u64 {
        let task = {
            let mut registry = self.registry();
            let task = registry.next_task;
            registry.next_task += 1;
            registry.tasks.insert(task, (engine, events.clone()));
            if let Some(cell) = cell {
                registry.task_cells.insert(task, cell);
            }
            if let Some(record) = registry.engines.get_mut(&engine) {
                record.running.push(task);
                if record.state == EngineState::Idle {
                    record.state = EngineState::Busy;
                }
            }
            task
        };
        let (message, buffers) = message(task);
        match &message {
            // A map's chunks are its tasks on the dashboard.
            ToEngine::Map { func, .. } => self.monitor.map_label(task, &map_label(func)),
            other => self
                .monitor
                .started(TaskKey::Task(task), engine, &task_label(other)),
        }
        self.send_to(engine, message, buffers).await;
        task
    }

    /// Asks engines to stop these tasks (each engine stops its running cell).
    pub async fn interrupt(&self, tasks: &[(u32, u64)]) {
        for &(engine, task) in tasks {
            self.send(engine, ToEngine::Interrupt { task }).await;
        }
    }

    /// Interrupts job `id` (the dashboard's button): the job hears it, and its tasks still
    /// running are interrupted. False when no such job runs or it cannot be interrupted.
    pub async fn interrupt_job(&self, id: u64) -> bool {
        let Some(tasks) = self.monitor.cancel_job(id) else {
            return false;
        };
        let running: Vec<(u32, u64)> = {
            let registry = self.registry();
            tasks
                .into_iter()
                .filter(|(_, task)| registry.tasks.contains_key(task))
                .collect()
        };
        self.interrupt(&running).await;
        true
    }

    /// Tells a job when the kernel's stop button is pressed: `changed()` fires on each press
    /// after this call.
    pub fn interrupts(&self) -> watch::Receiver<u64> {
        self.interrupts.subscribe()
    }

    /// Interrupts every task still running anywhere (the kernel's stop button).
    pub async fn interrupt_all(&self) {
        self.interrupts.send_modify(|n| *n += 1);
        let running: Vec<(u32, u64)> = self
            .registry()
            .engines
            .iter()
            .filter_map(|(id, e)| e.running.first().map(|t| (*id, *t)))
            .collect();
        self.interrupt(&running).await;
    }

    async fn wait_for_no_live_engines(&self, within: Duration) {
        let mut changed = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        while !self.live_engines().is_empty() {
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                break;
            }
        }
    }

    /// Stops every engine: asks politely, then kills what is left.
    pub async fn stop_all(&self) -> usize {
        let live = self.live_engines();
        for engine in self.registry().engines.values_mut() {
            engine.stopping = true;
        }
        for &id in &live {
            self.send(id, ToEngine::Shutdown).await;
        }
        self.wait_for_no_live_engines(Duration::from_secs(3)).await;
        for id in self.live_engines() {
            let pid = self.registry().engines.get(&id).map(|e| e.pid);
            if let Some(pid) = pid {
                // SAFETY: kill(2) takes plain integers.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
            }
        }
        self.wait_for_no_live_engines(Duration::from_secs(3)).await;
        // A new pool numbers its engines from 0 again, so PARALLAX_ENGINE_ID stays 0..N-1.
        let mut registry = self.registry();
        registry.engines.clear();
        registry.next_engine = 0;
        live.len()
    }
}

/// Passes an event to the job that owns `task`, if `sender` is the engine running it; a
/// malformed message is dropped and logged.
fn forward<F: FnOnce(u32) -> TaskEvent>(
    registry: &Registry,
    sender: Option<u32>,
    task: u64,
    event: Result<F, String>,
) {
    let Some((engine, events)) = registry.tasks.get(&task) else {
        return;
    };
    if sender != Some(*engine) {
        tracing::warn!("engines: engine {sender:?} spoke for task {task} of engine {engine}");
        return;
    }
    match event {
        Ok(make) => {
            let _ = events.send(make(*engine));
        }
        Err(e) => tracing::warn!("engines: dropped malformed values of task {task}: {e}"),
    }
}

/// How a task is named on the dashboard.
fn task_label(message: &ToEngine) -> String {
    match message {
        ToEngine::Execute { code, .. } if code.is_empty() => "warm-up".to_owned(),
        ToEngine::Execute { .. } => "cell".to_owned(),
        ToEngine::Store { name, .. } => format!("store {name}"),
        ToEngine::Fetch { name, .. } => format!("fetch {name}"),
        ToEngine::Map { func, .. } => map_label(func),
        ToEngine::Chunk { .. } => "chunk".to_owned(),
        ToEngine::Interrupt { .. }
        | ToEngine::Ping { .. }
        | ToEngine::Shutdown
        | ToEngine::MapEnd { .. }
        | ToEngine::Shared { .. } => "control".to_owned(),
    }
}

/// A map's name on the dashboard: its function, or `closure`.
pub fn map_label(func: &str) -> String {
    if func.trim_start().starts_with('|') {
        "map closure".to_owned()
    } else {
        format!("map {}", func.trim())
    }
}

/// Passes an engine's stderr on to ours, line by line, and returns its last fatal message (the
/// `parallax: …` line an engine prints when it gives up).
async fn relay_stderr(
    stderr: tokio::process::ChildStderr,
    engine: u32,
    monitor: Monitor,
) -> Option<String> {
    use tokio::io::AsyncBufReadExt;
    let mut reader = tokio::io::BufReader::new(stderr);
    let mut line = Vec::new();
    let mut fatal = None;
    // Bytes, not strings: a line that is not UTF-8 must not stop the draining, or the engine
    // would block on a full pipe.
    while matches!(reader.read_until(b'\n', &mut line).await, Ok(n) if n > 0) {
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        eprintln!("{text}");
        monitor.output(engine, "log", text);
        if let Some(reason) = text.strip_prefix("parallax: ") {
            fatal = Some(reason.to_owned());
        }
        line.clear();
    }
    fatal
}

fn is_dead(engine: &Engine) -> bool {
    matches!(engine.state, EngineState::Dead(_))
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGINT => "SIGINT",
        _ => "signal",
    }
}

/// Writes the connection key for engines to read: a private directory, a file of mode 0600.
fn write_key_file(key: &str) -> anyhow::Result<PathBuf> {
    let base = parallax_eval::private_base();
    let dir = base.join(format!("parallax-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    let path = dir.join("engine.key");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    std::io::Write::write_all(&mut file, key.as_bytes())?;
    Ok(path)
}

/// Removes the key file's directory (at kernel exit).
pub fn remove_key_dir() {
    let base = parallax_eval::private_base();
    let _ = std::fs::remove_dir_all(base.join(format!("parallax-{}", std::process::id())));
}

#[cfg(test)]
mod tests {
    use super::relay_stderr;

    #[tokio::test]
    async fn an_engines_last_words_are_kept_and_odd_bytes_do_not_stop_the_relay() {
        let mut child = tokio::process::Command::new("sh")
            .args([
                "-c",
                "echo 'Compiling serde' >&2; printf 'bad \\377 byte\\n' >&2; \
                 echo 'parallax: connecting to the controller: refused' >&2; echo after >&2; exit 1",
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("sh runs");
        let stderr = child.stderr.take().expect("piped");
        let monitor = crate::monitor::Monitor::default();
        let said = relay_stderr(stderr, 3, monitor.clone()).await;
        assert_eq!(
            said.as_deref(),
            Some("connecting to the controller: refused")
        );
        assert_eq!(child.wait().await.expect("exit").code(), Some(1));
        // The dashboard shows what the engine wrote.
        let lines = monitor.output_since(0);
        assert_eq!(lines.len(), 4);
        assert!(lines.iter().all(|l| l.engine == 3 && l.stream == "log"));
    }
}
