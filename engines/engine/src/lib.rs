//! The engine process: connects to its controller, evaluates the cells it is sent one at a time,
//! and streams output and results back. Its variables live in its store (an evaluation process
//! of its own); the cells it runs there are compiled once per host: by this engine's compiling
//! context when it leads a shared cell, which passes each compiled cell on to the engines that
//! follow it, or by the leader's when it follows. It exits when told to, or when it has heard
//! nothing from the controller for a while (the kernel is gone).

mod carrying;
mod data_work;
mod handler;
mod inbox;
mod offline;
mod sharing;

use anyhow::Context;
use bytes::Bytes;
use handler::Handler;
use parallax_engine_protocol::{
    Connection, FromEngine, Payload, Receiver, Sender, Share, Signer, StreamName, ToEngine,
    RANK_VARIABLES,
};
use parallax_eval::ipc::Locked;
use parallax_eval::{cells, places};
use parallax_eval::{private_base, MapInput, StreamSink};
use sharing::{Core, DEPENDENCY_CACHE};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// The helper crate engine cells use without a `:dep` of their own, carried in this binary so
/// that an engine on another host needs nothing but the binary.
const ENV_CRATE_SOURCE: &str = include_str!("../../env/src/lib.rs");
const ENV_CRATE_MANIFEST: &str = include_str!("../../env/Cargo.toml");

/// Gives the engines of a host other than the kernel's a cache directory of that host's own:
/// evcxr's compiled-crate cache is safe for the engines of one host, which compile in turn,
/// but not for hosts compiling at once into the home they share. Called before any thread
/// starts, as setting the environment must be.
fn separate_host_cache(controller_host: &str) {
    let host = places::host_name();
    if host == controller_host {
        return;
    }
    let own = places::cache_base()
        .join("parallax")
        .join("hosts")
        .join(host);
    std::env::set_var("XDG_CACHE_HOME", own);
}

/// How an engine learns its id in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineId {
    /// Its launcher numbered it.
    Given(u32),
    /// MPI or Slurm started it: its id is this offset plus its rank.
    RankOffset(u32),
    /// Started by hand: the controller numbers it.
    Assigned,
}

pub struct EngineConfig {
    pub connection: Connection,
    pub id: EngineId,
}

pub fn run(config: EngineConfig) -> anyhow::Result<()> {
    separate_host_cache(&config.connection.controller_host);
    let signer = Signer::new(config.connection.key.trim());
    let runtime = engine_runtime()?;
    let terminate = {
        let _inside = runtime.enter();
        terminations()
    };
    runtime.block_on(serve(config, signer, None, terminate))
}

/// SIGTERM (the kernel ending its standby engine, mpiexec or scancel ending their engines,
/// jupyter_client ending a kernel's process group) ends an engine as a shutdown does: its
/// cell killed, its directories removed. Once caught it is caught for good, so every phase
/// after this call listens for it. Call inside the runtime.
fn terminations() -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok()
}

/// Resolves when SIGTERM arrives (never, if it could not be caught).
async fn terminated(terminate: &mut Option<tokio::signal::unix::Signal>) {
    match terminate {
        Some(signal) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}

fn engine_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
}

/// A standby engine: started on the kernel's host before any pool, it builds its compiling
/// context and runs the preludes (most of an engine's start), then waits for `adoption`
/// (blocking: the kernel writing the connection, with the id to take, to its stdin) and goes
/// on as that engine, ready at once.
pub fn run_standby(
    adoption: impl FnOnce() -> anyhow::Result<EngineConfig> + Send + 'static,
) -> anyhow::Result<()> {
    let runtime = engine_runtime()?;
    let mut terminate = {
        let _inside = runtime.enter();
        terminations()
    };
    let warming = async {
        sweep_stale_dirs();
        let host = [("PARALLAX_HOST", places::host_name().to_owned())];
        let (placeholder, _) = mpsc::unbounded_channel();
        let mut core = Core::new(u32::MAX, placeholder, &own_dirs_base(), &host)
            .context("starting the standby engine's evaluation process")?;
        let began = Instant::now();
        core.prepare(&preludes())
            .await
            .map_err(|e| anyhow::anyhow!("warming the standby engine: {}", e.evalue))?;
        tracing::info!("standby engine warm in {:.2?}", began.elapsed());
        anyhow::Ok(core)
    };
    let adopted: anyhow::Result<Option<(EngineConfig, Core)>> = runtime.block_on(async {
        let warm = tokio::select! {
            warm = warming => warm?,
            _ = terminated(&mut terminate) => return Ok(None),
        };
        // Blocking on stdin, beside the signal: the standby waits here for most of its life.
        let adoption = tokio::task::spawn_blocking(adoption);
        tokio::select! {
            config = adoption => Ok(Some((config??, warm))),
            _ = terminated(&mut terminate) => Ok(None),
        }
    });
    let Some((config, warm)) = adopted? else {
        // The thread still reading stdin is not waited for.
        runtime.shutdown_background();
        anyhow::bail!("ended by SIGTERM before it was adopted");
    };
    let signer = Signer::new(config.connection.key.trim());
    runtime.block_on(serve(config, signer, Some(warm), terminate))
}

/// The id this engine asks for: the one it was given, or its offset plus the rank MPI or Slurm
/// put in its environment.
fn requested_id(id: EngineId) -> anyhow::Result<Option<u32>> {
    match id {
        EngineId::Given(id) => Ok(Some(id)),
        EngineId::Assigned => Ok(None),
        EngineId::RankOffset(offset) => {
            for name in RANK_VARIABLES {
                if let Ok(rank) = std::env::var(name) {
                    let rank: u32 = rank
                        .trim()
                        .parse()
                        .with_context(|| format!("{name}={rank} is not a rank"))?;
                    return Ok(Some(offset + rank));
                }
            }
            anyhow::bail!(
                "--rank-offset needs a rank in the environment ({}), as mpiexec or srun set it",
                RANK_VARIABLES.join(", ")
            )
        }
    }
}

/// Says why an engine cannot reach its controller before trying, when it can tell: a loopback
/// address is only the controller's own host.
fn unreachable_by_address(connection: &Connection, host: &str) -> Option<String> {
    let address = connection.loopback_address()?;
    (host != connection.controller_host).then(|| {
        format!(
            "the controller on host {} listens on {address}, a loopback address that this host \
             ({host}) cannot reach; start the cluster with --ip ADDRESS, an address of {} that \
             the engines' hosts can reach",
            connection.controller_host, connection.controller_host
        )
    })
}

/// What the engine's task runner is asked to do, one task at a time, in arrival order.
pub(crate) enum Work {
    Code(String),
    Data(DataWork),
    /// A replacement's inheritance (`ToEngine::Adopt`): not a task, nothing answers it.
    Adopt {
        history: Vec<parallax_engine_protocol::HistoryEntry>,
        lost: Vec<String>,
    },
}

/// What a task does: the work that is one.
enum Task {
    Code(String),
    Data(DataWork),
}

/// Work that moves values through the engine's data socket.
pub(crate) enum DataWork {
    Store(Store, Result<Payload, String>),
    Fetch(Fetch),
    Map { func: String },
}

/// What a `Store` keeps: the variable's name, its type, and whether it is one value.
pub(crate) struct Store {
    pub(crate) name: String,
    pub(crate) type_src: String,
    pub(crate) value: bool,
}

/// What a `Fetch` sends back, and where its bytes go on the controller's host, if there.
pub(crate) struct Fetch {
    pub(crate) name: String,
    pub(crate) value: bool,
    pub(crate) into: Option<PathBuf>,
    /// Set when the values go back in parts: the controller's answers to them.
    pub(crate) acks: Option<data_work::Acks>,
}

pub(crate) type Outbound = mpsc::UnboundedSender<(FromEngine, Vec<Bytes>)>;

/// The maps this engine serves: their chunk feeds, and maps ended before their cell began.
#[derive(Default)]
pub(crate) struct Maps {
    pub(crate) feeds: HashMap<u64, std_mpsc::Sender<MapInput>>,
    ended: HashSet<u64>,
}

pub(crate) type SharedMaps = Arc<Mutex<Maps>>;

/// A cell stopping a map is given this long to finish its chunk before it is interrupted.
pub(crate) const MAP_STOP_GRACE: Duration = Duration::from_secs(2);

/// The engine's core: a standby's, adopted, or a new one.
fn engine_core(
    warm: Option<Core>,
    engine: u32,
    outbound: &Outbound,
    environment: &[(&str, String)],
) -> anyhow::Result<Core> {
    match warm {
        Some(mut core) => {
            core.adopt(engine, outbound.clone(), environment)
                .map_err(|e| anyhow::anyhow!("adopting the standby engine: {e}"))?;
            Ok(core)
        }
        None => {
            sweep_stale_dirs();
            Core::new(engine, outbound.clone(), &own_dirs_base(), environment)
                .context("starting the engine's evaluation process")
        }
    }
}

/// `warm`: a standby engine's core, adopted as this engine.
async fn serve(
    config: EngineConfig,
    signer: Signer,
    warm: Option<Core>,
    mut terminate: Option<tokio::signal::unix::Signal>,
) -> anyhow::Result<()> {
    let connection = &config.connection;
    let host = places::host_name().to_owned();
    if let Some(why) = unreachable_by_address(connection, &host) {
        anyhow::bail!(why);
    }
    let requested = requested_id(config.id)?;
    let Registered {
        mut socket,
        mut sender,
        mut receiver,
        engine,
        engines,
    } = join(connection, &host, signer, requested).await?;
    let (outbound, mut outbound_rx) = mpsc::unbounded_channel::<(FromEngine, Vec<Bytes>)>();
    let environment = [
        ("PARALLAX_ENGINE_ID", engine.to_string()),
        ("PARALLAX_ENGINES", engines.to_string()),
        ("PARALLAX_HOST", host),
    ];
    let core = engine_core(warm, engine, &outbound, &environment)?;
    let own_dirs = core.dirs();
    let interrupter = core.interrupter.clone();
    let running = Arc::new(AtomicU64::new(NO_TASK));
    let (tasks, task_rx) = mpsc::unbounded_channel::<(u64, Share, Work)>();
    let handler = Handler {
        engine,
        tasks,
        interrupter: interrupter.clone(),
        cancelled: core.cancelled.clone(),
        maps: core.maps.clone(),
        inbox: core.inbox.clone(),
        running: running.clone(),
        outbound: outbound.clone(),
        carries: Default::default(),
        receipts: Default::default(),
    };
    tokio::spawn(run_tasks(core, task_rx, outbound.clone(), running));
    let _ = outbound.send((FromEngine::Ready { engine }, Vec::new()));

    let silence_limit = connection.heartbeat_timeout();
    let mut last_heard = Instant::now();
    let mut silence_check = tokio::time::interval(Duration::from_secs(1));
    let result = loop {
        tokio::select! {
            raw = socket.recv() => {
                let raw = match raw {
                    Ok(raw) => raw,
                    Err(e) => break Err(anyhow::anyhow!("controller connection failed: {e}")),
                };
                let (message, buffers) = match receiver.decode::<ToEngine>(raw.into_vec()) {
                    Ok(envelope) => match envelope.damaged {
                        Some(why) => {
                            tracing::warn!("engine {engine}: refused the values of {}: {why}",
                                parallax_engine_protocol::kind_of(&envelope.body));
                            (envelope.body, Err(why))
                        }
                        None => (envelope.body, Ok(envelope.buffers)),
                    },
                    Err(e) => {
                        tracing::warn!("engine {engine}: dropped a message: {e}");
                        continue;
                    }
                };
                last_heard = Instant::now();
                if handler.handle(message, buffers).is_break() {
                    break Ok(());
                }
            }
            Some((message, buffers)) = outbound_rx.recv() => {
                if let Err(e) = send(&mut socket, &mut sender, &message, buffers).await {
                    break Err(e);
                }
            }
            _ = terminated(&mut terminate) => break Err(anyhow::anyhow!("ended by SIGTERM")),
            _ = silence_check.tick() => {
                if last_heard.elapsed() > silence_limit {
                    break Err(anyhow::anyhow!(
                        "no word from the controller for {silence_limit:?}; exiting"
                    ));
                }
            }
        }
    };
    // A cell still running must not outlive the engine.
    interrupter.kill_all();
    for dir in own_dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

/// An engine the controller took in: its socket and signing ends, its id, the pool's size.
struct Registered {
    socket: DealerSocket,
    sender: Sender,
    receiver: Receiver,
    engine: u32,
    engines: u32,
}

/// Connects to the controller and registers, asking for `requested` (or any id).
async fn join(
    connection: &parallax_engine_protocol::Connection,
    host: &str,
    signer: Signer,
    requested: Option<u32>,
) -> anyhow::Result<Registered> {
    let mut sender = Sender::new(
        signer.clone(),
        format!("engine-{}@{host}", std::process::id()),
    );
    let mut receiver = Receiver::new(signer);
    let mut socket = DealerSocket::new();
    let registration_message = FromEngine::Register {
        engine: requested,
        pid: std::process::id(),
        host: host.to_owned(),
    };
    let within = connection.register_timeout();
    let registration = async {
        socket
            .connect(&connection.url)
            .await
            .with_context(|| format!("connecting to the controller at {}", connection.url))?;
        register(
            &mut socket,
            &mut sender,
            &mut receiver,
            &registration_message,
        )
        .await
    };
    let (engine, engines) = match tokio::time::timeout(within, registration).await {
        Ok(answer) => answer?,
        Err(_) => anyhow::bail!(
            "no answer from the controller at {} within {within:?}: it is unreachable from \
             {host}, or this engine's key is not the controller's",
            connection.url
        ),
    };
    Ok(Registered {
        socket,
        sender,
        receiver,
        engine,
        engines,
    })
}

/// Says `register` until the controller answers, once a second: the first may go out before
/// the controller has recorded the process it launched. Returns the id it gave and the pool's
/// size.
async fn register(
    socket: &mut DealerSocket,
    sender: &mut Sender,
    receiver: &mut Receiver,
    register: &FromEngine,
) -> anyhow::Result<(u32, u32)> {
    let mut again = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = again.tick() => send(socket, sender, register, Vec::new()).await?,
            raw = socket.recv() => {
                let raw = raw.map_err(|e| anyhow::anyhow!("controller connection failed: {e}"))?;
                match receiver.decode::<ToEngine>(raw.into_vec()) {
                    Ok(envelope) => match envelope.body {
                        ToEngine::Welcome { engine, engines } => return Ok((engine, engines)),
                        ToEngine::Refused { reason } => {
                            anyhow::bail!("the controller refused this engine: {reason}")
                        }
                        other => tracing::debug!("before registration, ignored {other:?}"),
                    },
                    Err(e) => tracing::warn!("engine: dropped a message: {e}"),
                }
            }
        }
    }
}

/// Removes the private directories killed engines and kernels left behind: an engine's gateway
/// and data directories, and a kernel's key directory (`parallax-PID`), each named after the
/// process that made it.
fn sweep_stale_dirs() {
    parallax_engine_protocol::shared::sweep_dead(
        &private_base(),
        &["parallax-gateway-", "parallax-data-", "parallax-"],
    );
}

const NO_TASK: u64 = u64::MAX;

pub(crate) fn end_map(maps: &SharedMaps, task: u64) {
    let mut maps = maps.locked();
    match maps.feeds.get(&task) {
        Some(feed) => {
            let _ = feed.send(MapInput::End);
        }
        None => {
            maps.ended.insert(task);
        }
    }
}

/// The commands every engine context executes before its first cell: the dependency cache,
/// the helper crates cells use without a `:dep` of their own, and the display stand-in that
/// spares an expression cell its second build. The crates come first: a crate added after a
/// cell defined a type makes evcxr drop the variables of that type. They are one cell: evcxr
/// applies a cell's commands, then builds once (each build after a new `:dep` also has
/// rust-analyzer load the crate graph again).
fn preludes() -> Vec<String> {
    let mut preludes = vec![DEPENDENCY_CACHE.to_owned()];
    if offline::is_offline() {
        // A compute node with no route out builds from the cargo cache it shares.
        preludes.insert(0, ":offline 1".to_owned());
    }
    let helpers = [
        ("parallax_env", ENV_CRATE_MANIFEST, ENV_CRATE_SOURCE),
        (
            "parallax_data",
            cells::DATA_CRATE_MANIFEST,
            cells::DATA_CRATE_SOURCE,
        ),
    ];
    for (name, manifest, source) in helpers {
        match cells::helper_crate_dep(name, manifest, source) {
            Ok(dep) => preludes.push(dep),
            Err(e) => tracing::warn!("could not write the {name} crate: {e}"),
        }
    }
    preludes.push(parallax_eval::display::ON.to_owned());
    vec![preludes.join("\n")]
}

/// Runs tasks one at a time, in the order they arrived.
async fn run_tasks(
    mut core: Core,
    mut tasks: mpsc::UnboundedReceiver<(u64, Share, Work)>,
    outbound: Outbound,
    running: Arc<AtomicU64>,
) {
    let preludes = preludes();
    while let Some((task, share, work)) = tasks.recv().await {
        let work = match work {
            Work::Adopt { history, lost } => {
                core.take_over(&history, &lost);
                continue;
            }
            Work::Code(code) => Task::Code(code),
            Work::Data(data) => Task::Data(data),
        };
        let sink_outbound = outbound.clone();
        let sink: StreamSink = Arc::new(move |name, text| {
            let name = if name == "stderr" {
                StreamName::Stderr
            } else {
                StreamName::Stdout
            };
            let stream = FromEngine::Stream {
                task,
                name,
                text: text.to_owned(),
            };
            let _ = sink_outbound.send((stream, Vec::new()));
        });
        running.store(task, Ordering::SeqCst);
        let outcome = match work {
            Task::Code(code) => {
                let work = sharing::Work {
                    code,
                    preludes: preludes.clone(),
                    wants_sent_type: false,
                };
                core.execute(task, &share, &work, sink).await.outcome
            }
            Task::Data(work) => {
                let needs = preludes.clone();
                data_work::run_data_work(&mut core, task, &share, work, needs, sink, &outbound)
                    .await
            }
        };
        running.store(NO_TASK, Ordering::SeqCst);
        let report = core.report();
        tracing::debug!(
            "engine {}: task {task} done; history {:016x} of {} entries",
            core.engine,
            report.fingerprint,
            report.entries
        );
        let done = FromEngine::Done {
            task,
            outcome,
            state: Some(report),
        };
        let _ = outbound.send((done, Vec::new()));
    }
}

async fn send(
    socket: &mut DealerSocket,
    sender: &mut Sender,
    message: &FromEngine,
    buffers: Vec<Bytes>,
) -> anyhow::Result<()> {
    let frames: Vec<Bytes> = sender.encode(message, buffers);
    let message = ZmqMessage::try_from(frames).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    socket
        .send(message)
        .await
        .context("sending to the controller")
}

/// Where an engine makes its gateway's and data socket's directories: its own temporary
/// directory (`parallax_eval::places::use_own_temp_dir`), which goes with it even when it is
/// killed.
fn own_dirs_base() -> std::path::PathBuf {
    std::env::temp_dir()
}
