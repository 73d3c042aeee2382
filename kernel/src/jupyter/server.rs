//! The Jupyter kernel server: binds the five channels from a connection file and serves them.
//! Each socket is owned by one task; the shell handler runs requests one at a time, while
//! control (interrupt, shutdown) and heartbeat stay responsive during a long cell.

use super::iopub::{IopubItem, OutputRoute, Publisher, Session};
use super::shell::Shell;
use super::stdin::StdinBridge;
use super::wire::{self, send_logged, ReplayGuard, WireMessage};
use crate::cell::CellRunner;
use crate::controller::Controller;
use crate::dashboard::monitor::Monitor;
use anyhow::{bail, Context};
use jupyter_protocol::ConnectionInfo;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::mpsc;
use zeromq::{PubSocket, RepSocket, RouterSocket, Socket, SocketRecv, SocketSend};

pub fn read_connection_file(path: &Path) -> anyhow::Result<ConnectionInfo> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the connection file {}", path.display()))?;
    let info: ConnectionInfo = serde_json::from_str(&text)
        .with_context(|| format!("parsing the connection file {}", path.display()))?;
    if !info.key.is_empty() && info.signature_scheme != "hmac-sha256" {
        bail!(
            "unsupported signature scheme {:?}: Parallax signs with hmac-sha256",
            info.signature_scheme
        );
    }
    Ok(info)
}

/// Serves the kernel until a shutdown request arrives.
pub async fn serve(info: ConnectionInfo) -> anyhow::Result<()> {
    let signer = wire::Signer::new(&info.key);
    if !signer.is_signing() {
        tracing::warn!("the connection file has an empty key: messages are not signed");
    }
    let session = Session::new(signer);
    let rust_version = std::thread::spawn(rustc_version);

    let mut heartbeat = RepSocket::new();
    heartbeat
        .bind(&info.hb_url())
        .await
        .context("binding heartbeat")?;
    let mut iopub = PubSocket::new();
    iopub
        .bind(&info.iopub_url())
        .await
        .context("binding iopub")?;
    let mut control = RouterSocket::new();
    control
        .bind(&info.control_url())
        .await
        .context("binding control")?;
    let mut shell = RouterSocket::new();
    shell
        .bind(&info.shell_url())
        .await
        .context("binding shell")?;
    let mut stdin = RouterSocket::new();
    stdin
        .bind(&info.stdin_url())
        .await
        .context("binding stdin")?;
    tracing::info!("listening on {} (shell port {})", info.ip, info.shell_port);

    let (publisher, iopub_queue) = Publisher::new(session.clone());
    tokio::spawn(run_iopub(iopub, session.clone(), iopub_queue));
    tokio::spawn(run_heartbeat(heartbeat));
    publisher.status(&OutputRoute::default(), "starting");

    let evaluator = parallax_eval::Evaluator::start();
    let monitor = Monitor::default();
    let controller = Controller::new(&info.key, Arc::new(monitor.clone()));
    // Once the notebook's own context is built, so that the two do not share the cores.
    let ready_evaluator = evaluator.clone();
    let standby_controller = controller.clone();
    tokio::spawn(async move {
        if ready_evaluator.ready().await.is_ok() {
            standby_controller.keep_standby();
        }
    });
    let kernel_info = kernel_info(&rust_version.join().unwrap_or_default());
    let (shutdown_tx, mut shutdown_rx) = mpsc::unbounded_channel::<()>();

    let interrupter = evaluator.interrupter().clone();
    let sigint_controller = controller.clone();
    tokio::spawn(async move {
        let Ok(mut sigint) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        else {
            return;
        };
        while sigint.recv().await.is_some() {
            tracing::info!("SIGINT: interrupting the running cell");
            interrupter.interrupt();
            sigint_controller.interrupt_all().await;
        }
    });

    tokio::spawn(run_control(
        control,
        session.clone(),
        publisher.clone(),
        evaluator.interrupter().clone(),
        controller.clone(),
        kernel_info.clone(),
        shutdown_tx.clone(),
    ));

    let stdin_bridge = StdinBridge::spawn(stdin, session.clone());
    let (shell_send, shell_recv) = shell.split();
    let (shell_queue_tx, shell_queue) = mpsc::unbounded_channel();
    tokio::spawn(read_socket(
        "shell",
        shell_recv,
        session.clone(),
        shell_queue_tx,
    ));
    let cells = CellRunner::new(evaluator, controller.clone(), monitor);
    let shell = Shell::new(
        session,
        publisher.clone(),
        cells,
        stdin_bridge,
        shell_send,
        kernel_info,
        shutdown_tx.clone(),
    );
    tokio::spawn(shell.run(shell_queue));
    tokio::spawn(shut_down_on_sigterm(shutdown_tx.clone()));
    tokio::spawn(watch_parent(shutdown_tx));

    shutdown_rx.recv().await;
    controller.stop_all().await;
    controller.end_standby().await;
    controller.close().await;
    publisher.flush().await;
    // zeromq.rs has no ZMQ_LINGER: a message sent on a socket is only queued, and a task of the
    // socket's writes it out. The shutdown reply was lost about once in 25 shutdowns under load
    // when the process exited first; this gives those tasks time to write what is queued.
    tokio::time::sleep(LINGER).await;
    Ok(())
}

/// SIGTERM (jupyter_client sends it to a kernel slow to shut down, and so may a user) shuts
/// the kernel down as a shutdown request does: its engines stopped, its files removed.
async fn shut_down_on_sigterm(shutdown: mpsc::UnboundedSender<()>) {
    let Ok(mut sigterm) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        return;
    };
    if sigterm.recv().await.is_some() {
        tracing::info!("SIGTERM: shutting down");
        let _ = shutdown.send(());
    }
}

/// How long the kernel keeps running after its last reply is queued, so that it is sent.
const LINGER: std::time::Duration = std::time::Duration::from_millis(200);

/// A kernel whose launcher dies without shutting it down would keep its engines forever. When
/// jupyter_client launched it (it sets JPY_PARENT_PID), the kernel shuts down once its parent
/// process is gone (it is then re-parented), as ipykernel does.
async fn watch_parent(shutdown: mpsc::UnboundedSender<()>) {
    if std::env::var_os("JPY_PARENT_PID").is_none() {
        return;
    }
    // SAFETY: getppid takes nothing and cannot fail.
    let parent = unsafe { libc::getppid() };
    if parent <= 1 {
        return;
    }
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        // SAFETY: as above.
        if unsafe { libc::getppid() } != parent {
            tracing::warn!("the kernel's parent (pid {parent}) is gone; shutting down");
            let _ = shutdown.send(());
            return;
        }
    }
}

/// Reads a ROUTER socket, dropping (and logging) anything malformed, unsigned or replayed.
async fn read_socket<S: SocketRecv>(
    name: &'static str,
    mut socket: S,
    session: Session,
    queue: mpsc::UnboundedSender<WireMessage>,
) {
    let mut replay = ReplayGuard::default();
    loop {
        let raw = match socket.recv().await {
            Ok(raw) => raw,
            Err(e) => {
                tracing::warn!("{name}: receive failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        match wire::decode(raw, session.signer(), &mut replay) {
            Ok(message) => {
                tracing::debug!("{name}: received a {}", message.msg_type());
                if queue.send(message).is_err() {
                    return;
                }
            }
            Err(e) => tracing::warn!("{name}: dropped a message: {e}"),
        }
    }
}

async fn run_iopub(
    mut socket: PubSocket,
    session: Session,
    mut queue: mpsc::UnboundedReceiver<IopubItem>,
) {
    while let Some(item) = queue.recv().await {
        match item {
            IopubItem::Message(out) => {
                if let Err(e) = socket.send(session.encode(&out)).await {
                    tracing::warn!("iopub: send failed: {e}");
                }
            }
            IopubItem::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

async fn run_heartbeat(mut socket: RepSocket) {
    loop {
        match socket.recv().await {
            Ok(ping) => {
                if let Err(e) = socket.send(ping).await {
                    tracing::warn!("heartbeat: send failed: {e}");
                }
            }
            Err(e) => {
                tracing::warn!("heartbeat: receive failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

async fn run_control(
    socket: RouterSocket,
    session: Session,
    publisher: Publisher,
    interrupter: parallax_eval::Interrupter,
    controller: Controller,
    kernel_info: Value,
    shutdown: mpsc::UnboundedSender<()>,
) {
    let (mut send, recv) = socket.split();
    let (queue_tx, mut queue) = mpsc::unbounded_channel();
    tokio::spawn(read_socket("control", recv, session.clone(), queue_tx));
    while let Some(request) = queue.recv().await {
        let route = OutputRoute::answering(&request);
        publisher.status(&route, "busy");
        let (reply, stop) = match request.msg_type() {
            "kernel_info_request" => (
                Some(session.reply(&request, "kernel_info_reply", kernel_info.clone())),
                false,
            ),
            "interrupt_request" => {
                match interrupter.interrupt() {
                    Some(kind) => tracing::info!("interrupted the running cell while {kind:?}"),
                    None => tracing::info!("interrupt requested with no local cell running"),
                }
                controller.interrupt_all().await;
                (
                    Some(session.reply(&request, "interrupt_reply", json!({"status": "ok"}))),
                    false,
                )
            }
            "shutdown_request" => {
                let restart = request.content["restart"].as_bool().unwrap_or(false);
                let content = json!({"status": "ok", "restart": restart});
                (
                    Some(session.reply(&request, "shutdown_reply", content)),
                    true,
                )
            }
            other => {
                tracing::warn!("control: ignored a {other} message");
                (None, false)
            }
        };
        if let Some(reply) = reply {
            send_logged(&mut send, session.encode(&reply), "control").await;
        }
        publisher.status(&route, "idle");
        if stop {
            let _ = shutdown.send(());
        }
    }
}

fn rustc_version() -> String {
    std::process::Command::new("rustc")
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.split_whitespace().nth(1).map(str::to_owned))
        .unwrap_or_default()
}

fn kernel_info(rust_version: &str) -> Value {
    json!({
        "status": "ok",
        "protocol_version": super::iopub::PROTOCOL_VERSION,
        "implementation": "parallax",
        "implementation_version": env!("CARGO_PKG_VERSION"),
        "language_info": {
            "name": "rust",
            "version": rust_version,
            "mimetype": "text/rust",
            "file_extension": ".rs",
            "pygments_lexer": "rust",
            "codemirror_mode": "rust",
        },
        "banner": format!(
            "Parallax {}: interactive parallel Rust (evaluated with evcxr). %lsmagic lists the magics.",
            env!("CARGO_PKG_VERSION")
        ),
        "help_links": [
            {"text": "The Rust Programming Language", "url": "https://doc.rust-lang.org/book/"},
            {"text": "evcxr", "url": "https://github.com/evcxr/evcxr"},
        ],
        "debugger": false,
    })
}
