//! The engine process: connects to its controller, evaluates the cells it is sent one at a time
//! with its own evcxr context, and streams output and results back. It exits when told to, or
//! when it has heard nothing from the controller for a while (the kernel is gone).

use anyhow::Context;
use bytes::Bytes;
use parallax_engine_protocol::{
    ends_from_bytes, ends_to_bytes, DataMeta, FromEngine, Outcome, Receiver, Sender, Signer,
    StreamName, ToEngine,
};
use parallax_eval::{
    cells, CellError, CellOutput, DataPort, Evaluator, MapInput, MapOutput, Payload, StreamSink,
};
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

/// Writes the helper crate into a private directory and returns the `:dep` line for it.
fn env_crate_dep() -> std::io::Result<String> {
    let dir = std::env::temp_dir().join(format!("parallax-env-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("src"))?;
    std::fs::write(dir.join("Cargo.toml"), ENV_CRATE_MANIFEST)?;
    std::fs::write(dir.join("src").join("lib.rs"), ENV_CRATE_SOURCE)?;
    let path = dir
        .to_string_lossy()
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    Ok(format!(":dep parallax_env = {{ path = \"{path}\" }}"))
}

/// The exit code of an engine whose evcxr context could not be built.
const EXIT_NO_EVALUATOR: i32 = 3;

/// evcxr's command that caches built dependencies (size in MiB).
const DEPENDENCY_CACHE: &str = ":cache 4000";

/// The controller pings every second; this long without any message means it is gone.
const CONTROLLER_SILENCE_LIMIT: Duration = Duration::from_secs(10);

pub struct EngineConfig {
    /// The controller's ROUTER endpoint, `tcp://HOST:PORT`.
    pub controller: String,
    pub engine_id: u32,
    /// A file holding the connection key (mode 0600).
    pub key_file: PathBuf,
}

pub fn run(config: EngineConfig) -> anyhow::Result<()> {
    let key = std::fs::read_to_string(&config.key_file)
        .with_context(|| format!("reading the key file {}", config.key_file.display()))?;
    let signer = Signer::new(key.trim());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(serve(config, signer))
}

/// What the engine's task runner is asked to do, one task at a time, in arrival order.
enum Work {
    Code(String),
    Data(DataWork),
}

/// Work that moves values through the engine's data socket.
enum DataWork {
    Store {
        name: String,
        type_src: String,
        value: bool,
        payload: Payload,
    },
    Fetch {
        name: String,
        value: bool,
    },
    Map {
        func: String,
    },
}

type Outbound = mpsc::UnboundedSender<(FromEngine, Vec<Bytes>)>;

/// The maps this engine serves: their chunk feeds, and maps ended before their cell began.
#[derive(Default)]
struct Maps {
    feeds: HashMap<u64, std_mpsc::Sender<MapInput>>,
    ended: HashSet<u64>,
}

type SharedMaps = Arc<Mutex<Maps>>;

fn lock(maps: &SharedMaps) -> std::sync::MutexGuard<'_, Maps> {
    maps.lock().unwrap_or_else(|p| p.into_inner())
}

/// A cell stopping a map is given this long to finish its chunk before it is interrupted.
const MAP_STOP_GRACE: Duration = Duration::from_secs(2);

async fn serve(config: EngineConfig, signer: Signer) -> anyhow::Result<()> {
    let mut socket = DealerSocket::new();
    socket
        .connect(&config.controller)
        .await
        .with_context(|| format!("connecting to the controller at {}", config.controller))?;
    let engine = config.engine_id;
    let mut sender = Sender::new(
        signer.clone(),
        format!("engine-{engine}-{}", std::process::id()),
    );
    let mut receiver = Receiver::new(signer);
    let (outbound, mut outbound_rx) = mpsc::unbounded_channel::<(FromEngine, Vec<Bytes>)>();

    let register = FromEngine::Register {
        engine,
        pid: std::process::id(),
        host: hostname(),
    };
    send(&mut socket, &mut sender, &register, Vec::new()).await?;

    let evaluator = Evaluator::start();
    let maps = SharedMaps::default();
    let running = Arc::new(AtomicU64::new(NO_TASK));
    let (tasks, task_rx) = mpsc::unbounded_channel::<(u64, Work)>();
    tokio::spawn(run_tasks(
        evaluator.clone(),
        task_rx,
        outbound.clone(),
        engine,
        maps.clone(),
        running.clone(),
    ));

    let mut last_heard = Instant::now();
    // Until the controller speaks, it may not have our registration (it can arrive before the
    // controller has recorded the process it started): say it again each second.
    let mut heard_from_controller = false;
    let mut silence_check = tokio::time::interval(Duration::from_secs(1));
    let result = loop {
        tokio::select! {
            raw = socket.recv() => {
                let raw = match raw {
                    Ok(raw) => raw,
                    Err(e) => break Err(anyhow::anyhow!("controller connection failed: {e}")),
                };
                let (message, buffers) = match receiver.decode::<ToEngine>(raw.into_vec()) {
                    Ok(envelope) => (envelope.body, envelope.buffers),
                    Err(e) => {
                        tracing::warn!("engine {engine}: dropped a message: {e}");
                        continue;
                    }
                };
                last_heard = Instant::now();
                heard_from_controller = true;
                match message {
                    ToEngine::Execute { task, code } => {
                        let _ = tasks.send((task, Work::Code(code)));
                    }
                    ToEngine::Store { task, name, type_src, value, meta } => {
                        match payload_from(meta, buffers) {
                            Ok(payload) => {
                                let _ = tasks.send((task, Work::Data(DataWork::Store { name, type_src, value, payload })));
                            }
                            Err(e) => {
                                tracing::warn!("engine {engine}: dropped a store: {e}");
                                let _ = outbound.send((done_error(task, "DataError", &e), Vec::new()));
                            }
                        }
                    }
                    ToEngine::Fetch { task, name, value } => {
                        let _ = tasks.send((task, Work::Data(DataWork::Fetch { name, value })));
                    }
                    ToEngine::Map { task, func } => {
                        let _ = tasks.send((task, Work::Data(DataWork::Map { func })));
                    }
                    ToEngine::Chunk { task, chunk, start, meta } => {
                        let feed = lock(&maps).feeds.get(&task).cloned();
                        match (feed, payload_from(meta, buffers)) {
                            (Some(feed), Ok(items)) => {
                                let _ = feed.send(MapInput::Chunk { chunk, start, items });
                            }
                            (None, _) => tracing::warn!("engine {engine}: a chunk for map {task}, which is not serving"),
                            (_, Err(e)) => {
                                tracing::warn!("engine {engine}: dropped a chunk: {e}");
                                let refused = FromEngine::ChunkRefused { task, chunk, message: e };
                                let _ = outbound.send((refused, Vec::new()));
                            }
                        }
                    }
                    ToEngine::MapEnd { task } => end_map(&maps, task),
                    ToEngine::Interrupt { task } => {
                        tracing::info!("engine {engine}: interrupt for task {task}");
                        let serving = lock(&maps).feeds.contains_key(&task);
                        if serving {
                            // A map stops between chunks and keeps the engine's variables; only
                            // an item that runs on and on needs the hard way.
                            end_map(&maps, task);
                            let interrupter = evaluator.interrupter().clone();
                            let running = running.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(MAP_STOP_GRACE).await;
                                if running.load(Ordering::SeqCst) == task {
                                    interrupter.interrupt();
                                }
                            });
                        } else {
                            evaluator.interrupter().interrupt();
                        }
                    }
                    ToEngine::Ping { nonce } => {
                        let _ = outbound.send((FromEngine::Pong { nonce }, Vec::new()));
                    }
                    ToEngine::Shutdown => break Ok(()),
                }
            }
            Some((message, buffers)) = outbound_rx.recv() => {
                if let Err(e) = send(&mut socket, &mut sender, &message, buffers).await {
                    break Err(e);
                }
            }
            _ = silence_check.tick() => {
                if !heard_from_controller {
                    if let Err(e) = send(&mut socket, &mut sender, &register, Vec::new()).await {
                        break Err(e);
                    }
                }
                if last_heard.elapsed() > CONTROLLER_SILENCE_LIMIT {
                    break Err(anyhow::anyhow!(
                        "no word from the controller for {CONTROLLER_SILENCE_LIMIT:?}; exiting"
                    ));
                }
            }
        }
    };
    // A cell still running must not outlive the engine.
    evaluator.interrupter().kill_all();
    let _ = std::fs::remove_dir_all(
        std::env::temp_dir().join(format!("parallax-env-{}", std::process::id())),
    );
    result
}

const NO_TASK: u64 = u64::MAX;

fn end_map(maps: &SharedMaps, task: u64) {
    let mut maps = lock(maps);
    match maps.feeds.get(&task) {
        Some(feed) => {
            let _ = feed.send(MapInput::End);
        }
        None => {
            maps.ended.insert(task);
        }
    }
}

/// Values out of a message's buffers (item ends, then bytes), checked against their layout.
pub fn payload_from(meta: DataMeta, buffers: Vec<Bytes>) -> Result<Payload, String> {
    let [ends, data]: [Bytes; 2] = buffers
        .try_into()
        .map_err(|b: Vec<Bytes>| format!("{} buffers, expected 2", b.len()))?;
    let ends = ends_from_bytes(&ends).ok_or("item ends are not 8-byte numbers")?;
    let payload = Payload {
        meta: meta.into(),
        ends,
        data,
    };
    payload.validate()?;
    Ok(payload)
}

/// The buffers a message carries values in: item ends, then bytes (shared, not copied).
pub fn payload_buffers(payload: &Payload) -> Vec<Bytes> {
    vec![ends_to_bytes(&payload.ends), payload.data.clone()]
}

fn done_error(task: u64, ename: &str, evalue: &str) -> FromEngine {
    FromEngine::Done {
        task,
        outcome: Outcome::Error {
            ename: ename.to_owned(),
            evalue: evalue.to_owned(),
            traceback: vec![format!("{ename}: {evalue}")],
        },
    }
}

fn outcome_of(result: Result<CellOutput, CellError>) -> Outcome {
    match result {
        Ok(output) => Outcome::Ok { data: output.data },
        Err(error) => Outcome::Error {
            ename: error.ename,
            evalue: error.evalue,
            traceback: error.traceback,
        },
    }
}

/// Runs tasks one at a time, in the order they arrived.
async fn run_tasks(
    evaluator: Evaluator,
    mut tasks: mpsc::UnboundedReceiver<(u64, Work)>,
    outbound: Outbound,
    engine: u32,
    maps: SharedMaps,
    running: Arc<AtomicU64>,
) {
    match evaluator.ready().await {
        Ok(()) => {
            // evcxr's dependency cache lives in the user's cache directory, so engines on one
            // host share it; the controller has one engine build a new dependency first.
            let quiet: StreamSink = Arc::new(|_, _| {});
            if let Err(e) = evaluator
                .execute(DEPENDENCY_CACHE.into(), quiet.clone(), None)
                .await
            {
                tracing::warn!(
                    "engine {engine}: could not enable the dependency cache: {}",
                    e.evalue
                );
            }
            match env_crate_dep() {
                Ok(dep) => {
                    if let Err(e) = evaluator.execute(dep, quiet, None).await {
                        tracing::warn!(
                            "engine {engine}: parallax_env is unavailable: {}",
                            e.evalue
                        );
                    }
                }
                Err(e) => tracing::warn!("engine {engine}: could not write parallax_env: {e}"),
            }
            let _ = outbound.send((FromEngine::Ready { engine }, Vec::new()));
        }
        Err(e) => {
            // Exiting is how the controller learns of it: it reports the exit code at once.
            tracing::error!("engine {engine}: {e}");
            std::process::exit(EXIT_NO_EVALUATOR);
        }
    }
    while let Some((task, work)) = tasks.recv().await {
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
            Work::Code(code) => outcome_of(evaluator.execute(code, sink, None).await),
            Work::Data(work) => match evaluator.data_port().await {
                Ok(port) => {
                    run_data_work(&evaluator, &port, task, work, sink, &outbound, &maps).await
                }
                Err(error) => outcome_of(Err(error)),
            },
        };
        running.store(NO_TASK, Ordering::SeqCst);
        let _ = outbound.send((FromEngine::Done { task, outcome }, Vec::new()));
    }
}

/// Runs the cell of a data task; what it sends back goes out before the task's `Done`.
async fn run_data_work(
    evaluator: &Evaluator,
    port: &DataPort,
    task: u64,
    work: DataWork,
    sink: StreamSink,
    outbound: &Outbound,
    maps: &SharedMaps,
) -> Outcome {
    match work {
        DataWork::Store {
            name,
            type_src,
            value,
            payload,
        } => {
            let began = Instant::now();
            port.offer(task, payload);
            let code = if value {
                cells::receive_value(port, task, &name, &type_src)
            } else {
                cells::receive_items(port, task, &name, &type_src)
            };
            let result = evaluator.execute(code, sink, None).await;
            port.withdraw(task);
            tracing::debug!(
                "store of `{name}` took {:.3} s",
                began.elapsed().as_secs_f64()
            );
            outcome_of(result)
        }
        DataWork::Fetch { name, value } => {
            let began = Instant::now();
            let arrived = port.expect(task);
            let code = if value {
                cells::send_value(port, task, &name)
            } else {
                cells::send_items(port, task, &name, None)
            };
            let result = evaluator.execute(code, sink, None).await;
            port.withdraw(task);
            if let Err(error) = result {
                return outcome_of(Err(error));
            }
            let spelled = evaluator.variable_type(cells::SENT).await;
            match (arrived.await, spelled.as_deref().and_then(cells::sent_type)) {
                (Ok(payload), Some(type_src)) => {
                    tracing::debug!(
                        "fetch of `{name}`: {} bytes in {:.3} s",
                        payload.data.len(),
                        began.elapsed().as_secs_f64()
                    );
                    let buffers = payload_buffers(&payload);
                    let fetched = FromEngine::Fetched {
                        task,
                        type_src,
                        meta: payload.meta.into(),
                    };
                    let _ = outbound.send((fetched, buffers));
                    Outcome::Ok {
                        data: Default::default(),
                    }
                }
                (Err(_), _) => outcome_of(Err(CellError::internal("the values never arrived"))),
                (_, None) => outcome_of(Err(CellError::internal(&format!(
                    "evcxr did not name the type of `{name}` (found {spelled:?})"
                )))),
            }
        }
        DataWork::Map { func } => {
            let session = port.open_map(task);
            let ended_early = {
                let mut maps = lock(maps);
                maps.feeds.insert(task, session.input.clone());
                maps.ended.remove(&task)
            };
            if ended_early {
                let _ = session.input.send(MapInput::End);
            }
            let forwarder =
                tokio::spawn(forward_map_output(task, session.output, outbound.clone()));
            let result = evaluator
                .execute(cells::serve_map(port, task, &func), sink, None)
                .await;
            lock(maps).feeds.remove(&task);
            port.withdraw(task);
            // The cell is over, so its side of the session is closed and the forwarder ends
            // once it has passed on every result.
            let _ = forwarder.await;
            if let Err(error) = result {
                return outcome_of(Err(error));
            }
            if let Some(type_src) = evaluator
                .variable_type(cells::SENT)
                .await
                .as_deref()
                .and_then(cells::sent_type)
            {
                let _ = outbound.send((FromEngine::ResultType { task, type_src }, Vec::new()));
            }
            Outcome::Ok {
                data: Default::default(),
            }
        }
    }
}

async fn forward_map_output(
    task: u64,
    mut output: mpsc::UnboundedReceiver<MapOutput>,
    outbound: Outbound,
) {
    while let Some(item) = output.recv().await {
        let message = match item {
            MapOutput::Ready {
                arg_type,
                result_type,
            } => (
                FromEngine::MapReady {
                    task,
                    arg_type,
                    result_type,
                },
                Vec::new(),
            ),
            MapOutput::Done {
                chunk,
                elapsed_ns,
                results,
                failures,
            } => {
                let buffers = payload_buffers(&results);
                (
                    FromEngine::ChunkDone {
                        task,
                        chunk,
                        elapsed_ns,
                        failures,
                        meta: results.meta.into(),
                    },
                    buffers,
                )
            }
            MapOutput::Refused { chunk, message } => (
                FromEngine::ChunkRefused {
                    task,
                    chunk,
                    message,
                },
                Vec::new(),
            ),
        };
        if outbound.send(message).is_err() {
            return;
        }
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

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned())
}
