//! The controller: owns the pool of engines and everything sent to them. Engines reach it over
//! TCP only, so nothing here assumes that they share this host's file system. It never speaks Jupyter: a job hears its tasks' events on a channel it
//! is given, and an `Observer` (the dashboard) hears every task, death and line of output.
//!
//! - `pool`: what is known of each engine, task and shared cell;
//! - `plan`: which engines share a compiled cell, and who compiles it (pure);
//! - `launch`: starting engines here or on other hosts (ssh, mpiexec, Slurm), stopping them;
//! - `carry`: a value carried to another host once, for all its engines there;
//! - `link`: the signed socket, where it listens, sending, receiving;
//! - `liveness`: heartbeats, and engines declared dead;
//! - `routing`: what each message from an engine does;
//! - `collect`: a job's events gathered until its tasks are done;
//! - `scheduler`: a map's chunks handed out, measured and run again (pure);
//! - here: the handle, and what the rest of the kernel asks of it.

mod carry;
mod collect;
mod events;
mod launch;
mod link;
mod liveness;
mod plan;
mod pool;
mod revive;
mod routing;
pub mod scheduler;

pub use carry::{Carried, CarryFailed};
pub use collect::{collect, JobView, Piece, Report};
pub use events::{Events, Observer, TaskEvent, TaskKey};
pub use launch::{LaunchPlan, Launcher, Mpi, Slurm, Ssh, REGISTER_TIMEOUT};
pub use link::{default_ip, Settings};
pub use liveness::HEARTBEAT_TIMEOUT;
pub use pool::{BatchJob, EngineState, EngineStatus};

use bytes::Bytes;
use link::{Link, Outgoing};
use parallax_engine_protocol::shared::{shm_base, SharedDir};
use parallax_engine_protocol::{Outcome, Share, Signer, ToEngine, TIMED_PING_NONCES};
use parallax_eval::ipc::Locked;
use pool::Registry;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// How long `%cluster start` waits for engines to build their evaluation context.
const START_TIMEOUT: Duration = Duration::from_secs(600);

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
    /// Hears what the engines are doing (the dashboard).
    observer: Arc<dyn Observer>,
    /// Timed round trips in flight: nonce -> engines yet to answer, and who waits.
    round_trips: Arc<Mutex<RoundTrips>>,
    /// The dispatcher's queue, for passing on steps from where no await is allowed.
    commands: Arc<Mutex<Option<mpsc::UnboundedSender<Outgoing>>>>,
    /// The link's reading, sending and pinging tasks, ended when it closes.
    link_tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    settings: Arc<Mutex<Settings>>,
    /// The launches of this pool, for `%cluster restart`.
    plans: Arc<Mutex<Vec<LaunchPlan>>>,
    /// Held while a shared cell is sent to its engines, so that every engine receives shared
    /// cells in the same order (a follower waits for its leader, never the other way round).
    dispatching: Arc<tokio::sync::Mutex<()>>,
    /// Where engines of this host write the values they send back, for the kernel to read in
    /// place; `None` where the host has no shared memory.
    shared: Option<Arc<SharedDir>>,
    /// An engine process warming up on this host, for the next pool to adopt.
    standby: Arc<Mutex<Option<launch::standby::Standby>>>,
    /// Values engines of other hosts send back in parts, as they arrive.
    arrivals: Arc<Mutex<carry::Arrivals>>,
}

#[derive(Default)]
struct RoundTrips {
    sent: u64,
    open: HashMap<u64, RoundTrip>,
}

struct RoundTrip {
    waiting_for: BTreeSet<u32>,
    done: Option<oneshot::Sender<()>>,
}

impl Controller {
    pub fn new(key: &str, observer: Arc<dyn Observer>) -> Self {
        Controller {
            registry: Arc::default(),
            signer: Signer::new(key),
            key: key.to_owned(),
            link: Arc::default(),
            changed: Arc::new(watch::channel(0).0),
            interrupts: Arc::new(watch::channel(0).0),
            observer,
            round_trips: Arc::default(),
            commands: Arc::default(),
            link_tasks: Arc::default(),
            plans: Arc::default(),
            settings: Arc::new(Mutex::new(Settings {
                ip: default_ip(),
                heartbeat_timeout: HEARTBEAT_TIMEOUT,
                register_timeout: REGISTER_TIMEOUT,
                url: String::new(),
                auto_restart: true,
            })),
            dispatching: Arc::default(),
            // Opening it also sweeps what a killed kernel or engine left.
            shared: SharedDir::open(&shm_base()),
            arrivals: Arc::default(),
            standby: Arc::default(),
        }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.locked()
    }

    /// Fires whenever the pool changes (an engine starts, registers, ends a task, dies).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
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
        self.registry()
            .uncounted
            .extend(tasks.iter().map(|(_, task)| *task));
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
        let mut shares = self.registry().share(targets);
        let mut sent = Vec::with_capacity(targets.len());
        for &engine in targets {
            let Some(share) = shares.remove(&engine) else {
                continue;
            };
            let task = self.registry().open_task(engine, events, Some(share.cell));
            let (message, buffers) = message(engine, task, share);
            self.send_to(engine, message, buffers).await;
            sent.push((engine, task));
        }
        sent
    }

    /// Asks engines to stop these tasks (each engine stops its running cell).
    pub async fn interrupt(&self, tasks: &[(u32, u64)]) {
        for &(engine, task) in tasks {
            self.send(engine, ToEngine::Interrupt { task }).await;
        }
    }

    /// Interrupts those of `tasks` that are still running.
    pub async fn interrupt_running(&self, tasks: Vec<(u32, u64)>) {
        let running: Vec<(u32, u64)> = {
            let registry = self.registry();
            tasks
                .into_iter()
                .filter(|(_, task)| registry.tasks.contains_key(task))
                .collect()
        };
        self.interrupt(&running).await;
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

    /// Sends a no-op message to each of `engines` and waits for all their answers: the time
    /// from the first send to the last answer, or None if one did not answer `within`.
    pub async fn round_trip(&self, engines: &[u32], within: Duration) -> Option<Duration> {
        let (done, answered) = oneshot::channel();
        let nonce = {
            let mut trips = self.round_trips.locked();
            trips.sent += 1;
            let nonce = TIMED_PING_NONCES + trips.sent;
            let trip = RoundTrip {
                waiting_for: engines.iter().copied().collect(),
                done: Some(done),
            };
            trips.open.insert(nonce, trip);
            nonce
        };
        let started = Instant::now();
        for &engine in engines {
            self.send(engine, ToEngine::Ping { nonce }).await;
        }
        let answered = tokio::time::timeout(within, answered).await;
        let took = started.elapsed();
        self.round_trips.locked().open.remove(&nonce);
        matches!(answered, Ok(Ok(()))).then_some(took)
    }

    /// Engine `engine` answered the ping `nonce`.
    fn answered(&self, engine: u32, nonce: u64) {
        let mut trips = self.round_trips.locked();
        if let Some(trip) = trips.open.get_mut(&nonce) {
            trip.waiting_for.remove(&engine);
            if trip.waiting_for.is_empty() {
                if let Some(done) = trip.done.take() {
                    let _ = done.send(());
                }
            }
        }
    }

    /// Whether `engine` runs on this host, so shares its memory.
    pub fn is_local(&self, engine: u32) -> bool {
        let here = parallax_eval::places::host_name();
        self.registry()
            .engines
            .get(&engine)
            .is_some_and(|e| e.host == here)
    }

    /// The host of `engine`, when it is not this one (whose engines share the kernel's
    /// memory).
    pub fn other_host(&self, engine: u32) -> Option<String> {
        let here = parallax_eval::places::host_name();
        self.registry()
            .engines
            .get(&engine)
            .filter(|e| e.host != here)
            .map(|e| e.host.clone())
    }

    /// A fresh path in the kernel's shared memory for an engine of this host to write a value
    /// into; `None` without shared memory.
    pub fn shared_destination(&self) -> Option<std::path::PathBuf> {
        self.shared.as_ref().map(|dir| dir.fresh_path("fetch"))
    }

    /// Whether an engine of another host should send fetched values in parts, into the
    /// kernel's shared memory.
    pub fn takes_parts(&self) -> bool {
        self.shared.is_some()
    }

    /// Whether `path` is one `shared_destination` could have given: an engine may name no
    /// other file for the kernel to read and remove.
    fn is_shared_destination(&self, path: &std::path::Path) -> bool {
        self.shared
            .as_ref()
            .is_some_and(|dir| path.parent() == Some(dir.path()))
    }

    /// Ids of the engines that can take cells (registered and ready), ascending.
    pub fn ready_engines(&self) -> Vec<u32> {
        self.registry()
            .ids(|e| matches!(e.state, EngineState::Idle | EngineState::Busy))
    }

    /// Ids of the engines that are not dead, ascending.
    pub fn live_engines(&self) -> Vec<u32> {
        self.registry().ids(|e| !e.is_dead())
    }

    /// The batch jobs of the pool, as the scheduler last said them.
    pub fn jobs(&self) -> Vec<BatchJob> {
        self.registry()
            .launches
            .values()
            .filter_map(|l| l.job.clone())
            .collect()
    }

    /// One row per engine, grouped by host (this host's first), then by id.
    pub fn status(&self) -> Vec<EngineStatus> {
        let here = parallax_eval::places::host_name();
        let mut rows: Vec<EngineStatus> = self
            .registry()
            .engines
            .iter()
            .map(|(id, e)| EngineStatus {
                id: *id,
                pid: e.pid,
                host: e.host.clone(),
                local: e.host == here,
                usage: e.usage,
                state: e.state.clone(),
                uptime: e.started.elapsed(),
                builds: e.report.as_ref().map(|r| r.builds).unwrap_or_default(),
            })
            .collect();
        rows.sort_by(|a, b| (!a.local, &a.host, a.id).cmp(&(!b.local, &b.host, b.id)));
        rows
    }

    /// Which live engines share compiled cells and which compile their own, and why: a line
    /// each, for `%cluster status`.
    pub fn sharing(&self) -> Vec<String> {
        plan::sharing_report(&self.registry().standings())
    }
}
