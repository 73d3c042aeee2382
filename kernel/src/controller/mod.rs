//! The controller: owns the pool of engines and everything sent to them. Engines reach it over
//! TCP only, so nothing here assumes that they share this host's file system, except for
//! launching local ones. It never speaks Jupyter: a job hears its tasks' events on a channel it
//! is given, and an `Observer` (the dashboard) hears every task, death and line of output.
//!
//! - `pool`: what is known of each engine, task and shared cell;
//! - `plan`: which engines share a compiled cell, and who compiles it (pure);
//! - `launch`: starting engine processes and noticing their exit;
//! - `link`: the signed socket, sending, receiving, keep-alive;
//! - `routing`: what each message from an engine does;
//! - `collect`: a job's events gathered until its tasks are done;
//! - `scheduler`: a map's chunks handed out, measured and run again (pure);
//! - here: the handle, and what the rest of the kernel asks of it.

mod collect;
mod events;
mod launch;
mod link;
mod plan;
mod pool;
mod routing;
pub mod scheduler;

pub use collect::{collect, JobView, Piece, Report};
pub use events::{Events, Observer, TaskEvent, TaskKey};
pub use pool::{EngineState, EngineStatus};

use bytes::Bytes;
use link::{Link, Outgoing};
use parallax_engine_protocol::{Outcome, Share, Signer, ToEngine};
use parallax_eval::ipc::Locked;
use pool::Registry;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// How long `%cluster start` waits for engines to build their evaluation context.
const START_TIMEOUT: Duration = Duration::from_secs(600);
/// Timed round trips use nonces from here up, apart from the keep-alive pings' small ones.
const ROUND_TRIP_NONCES: u64 = 1 << 63;

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
            dispatching: Arc::default(),
        }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.locked()
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Starts `count` engines and waits until each is ready or dead. Returns the new ids.
    pub async fn start_engines(&self, count: u32) -> anyhow::Result<Vec<u32>> {
        let (ids, total) = {
            let mut registry = self.registry();
            let first = registry.next_engine;
            registry.next_engine += count;
            (
                (first..first + count).collect::<Vec<u32>>(),
                registry.live_count() + count,
            )
        };
        for &id in &ids {
            self.spawn_engine(id, total).await?;
        }
        self.wait_until_started(&ids).await?;
        let live: Vec<u32> = {
            let registry = self.registry();
            ids.iter()
                .copied()
                .filter(|id| registry.engines.get(id).is_some_and(|e| !e.is_dead()))
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
                Some(engine) if !engine.is_dead() => {
                    anyhow::bail!(
                        "engine {id} is {}; only a dead engine is restarted",
                        engine.state
                    )
                }
                Some(_) => registry.live_count() + 1,
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

    /// Sends a no-op message to each of `engines` and waits for all their answers: the time
    /// from the first send to the last answer, or None if one did not answer `within`.
    pub async fn round_trip(&self, engines: &[u32], within: Duration) -> Option<Duration> {
        let (done, answered) = oneshot::channel();
        let nonce = {
            let mut trips = self.round_trips.locked();
            trips.sent += 1;
            let nonce = ROUND_TRIP_NONCES + trips.sent;
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

    /// Ids of the engines that can take cells (registered and ready), ascending.
    pub fn ready_engines(&self) -> Vec<u32> {
        self.registry()
            .ids(|e| matches!(e.state, EngineState::Idle | EngineState::Busy))
    }

    /// Ids of the engines that are not dead, ascending.
    pub fn live_engines(&self) -> Vec<u32> {
        self.registry().ids(|e| !e.is_dead())
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
        plan::sharing_report(&self.registry().standings())
    }
}
