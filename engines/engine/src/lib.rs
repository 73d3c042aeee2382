//! The engine process: connects to its controller, evaluates the cells it is sent one at a time
//! with its own evcxr context, and streams output and results back. It exits when told to, or
//! when it has heard nothing from the controller for a while (the kernel is gone).

use anyhow::Context;
use bytes::Bytes;
use parallax_engine_protocol::{
    FromEngine, Outcome, Receiver, Sender, Signer, StreamName, ToEngine,
};
use parallax_eval::{Evaluator, StreamSink};
use std::path::PathBuf;
use std::sync::Arc;
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
    let (outbound, mut outbound_rx) = mpsc::unbounded_channel::<FromEngine>();

    let register = FromEngine::Register {
        engine,
        pid: std::process::id(),
        host: hostname(),
    };
    send(&mut socket, &mut sender, &register).await?;

    let evaluator = Evaluator::start();
    let (tasks, task_rx) = mpsc::unbounded_channel::<(u64, String)>();
    tokio::spawn(run_tasks(
        evaluator.clone(),
        task_rx,
        outbound.clone(),
        engine,
    ));

    let mut last_heard = Instant::now();
    let mut silence_check = tokio::time::interval(Duration::from_secs(1));
    let result = loop {
        tokio::select! {
            raw = socket.recv() => {
                let raw = match raw {
                    Ok(raw) => raw,
                    Err(e) => break Err(anyhow::anyhow!("controller connection failed: {e}")),
                };
                let message = match receiver.decode::<ToEngine>(raw.into_vec()) {
                    Ok(envelope) => envelope.body,
                    Err(e) => {
                        tracing::warn!("engine {engine}: dropped a message: {e}");
                        continue;
                    }
                };
                last_heard = Instant::now();
                match message {
                    ToEngine::Execute { task, code } => {
                        let _ = tasks.send((task, code));
                    }
                    ToEngine::Interrupt { task } => {
                        tracing::info!("engine {engine}: interrupt for task {task}");
                        evaluator.interrupter().interrupt();
                    }
                    ToEngine::Ping { nonce } => {
                        let _ = outbound.send(FromEngine::Pong { nonce });
                    }
                    ToEngine::Shutdown => break Ok(()),
                }
            }
            Some(message) = outbound_rx.recv() => {
                if let Err(e) = send(&mut socket, &mut sender, &message).await {
                    break Err(e);
                }
            }
            _ = silence_check.tick() => {
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

/// Runs tasks one at a time, in the order they arrived.
async fn run_tasks(
    evaluator: Evaluator,
    mut tasks: mpsc::UnboundedReceiver<(u64, String)>,
    outbound: mpsc::UnboundedSender<FromEngine>,
    engine: u32,
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
            let _ = outbound.send(FromEngine::Ready { engine });
        }
        Err(e) => {
            // Exiting is how the controller learns of it: it reports the exit code at once.
            tracing::error!("engine {engine}: {e}");
            std::process::exit(EXIT_NO_EVALUATOR);
        }
    }
    while let Some((task, code)) = tasks.recv().await {
        let sink_outbound = outbound.clone();
        let sink: StreamSink = Arc::new(move |name, text| {
            let name = if name == "stderr" {
                StreamName::Stderr
            } else {
                StreamName::Stdout
            };
            let _ = sink_outbound.send(FromEngine::Stream {
                task,
                name,
                text: text.to_owned(),
            });
        });
        let outcome = match evaluator.execute(code, sink, None).await {
            Ok(output) => Outcome::Ok { data: output.data },
            Err(error) => Outcome::Error {
                ename: error.ename,
                evalue: error.evalue,
                traceback: error.traceback,
            },
        };
        let _ = outbound.send(FromEngine::Done { task, outcome });
    }
}

async fn send(
    socket: &mut DealerSocket,
    sender: &mut Sender,
    message: &FromEngine,
) -> anyhow::Result<()> {
    let frames: Vec<Bytes> = sender.encode(message, Vec::new());
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
