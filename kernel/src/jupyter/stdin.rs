//! The stdin channel: a cell that reads input sends `input_request` to the frontend that ran it
//! and blocks until the `input_reply` arrives, or until the cell is interrupted.

use super::iopub::{Outgoing, Session};
use super::wire::{self, send_logged, ReplayGuard};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use zeromq::{RouterSocket, SocketRecv};

struct Prompt {
    request: Outgoing,
    answer: oneshot::Sender<String>,
}

#[derive(Clone)]
pub struct StdinBridge {
    session: Session,
    prompts: mpsc::UnboundedSender<Prompt>,
}

impl StdinBridge {
    pub fn spawn(socket: RouterSocket, session: Session) -> StdinBridge {
        let (prompts, queue) = mpsc::unbounded_channel();
        tokio::spawn(run(socket, session.clone(), queue));
        StdinBridge { session, prompts }
    }

    /// Asks the frontend for a line of input, from a blocking thread. Returns `None` when the
    /// wait is cancelled (the cell was interrupted) or the kernel is stopping.
    pub fn ask(
        &self,
        identities: &[bytes::Bytes],
        parent_header: &Value,
        prompt: &str,
        password: bool,
        cancel: &AtomicBool,
    ) -> Option<String> {
        let mut request = self.session.message(
            "input_request",
            parent_header,
            json!({"prompt": prompt, "password": password}),
        );
        request.identities = identities.to_vec();
        let (answer, mut answered) = oneshot::channel();
        self.prompts.send(Prompt { request, answer }).ok()?;
        loop {
            match answered.try_recv() {
                Ok(value) => return Some(value),
                Err(oneshot::error::TryRecvError::Closed) => return None,
                Err(oneshot::error::TryRecvError::Empty) => {
                    if cancel.load(Ordering::SeqCst) {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

async fn run(socket: RouterSocket, session: Session, mut prompts: mpsc::UnboundedReceiver<Prompt>) {
    let (mut send, mut recv) = socket.split();
    let mut replay = ReplayGuard::default();
    while let Some(mut prompt) = prompts.recv().await {
        send_logged(&mut send, session.encode(&prompt.request), "stdin").await;
        loop {
            tokio::select! {
                // The asker gave up (interrupt): stop waiting for this reply.
                _ = prompt.answer.closed() => break,
                raw = recv.recv() => {
                    let raw = match raw {
                        Ok(raw) => raw,
                        Err(e) => {
                            tracing::warn!("stdin: receive failed: {e}");
                            continue;
                        }
                    };
                    match wire::decode(raw, session.signer(), &mut replay) {
                        Ok(reply) if reply.msg_type() == "input_reply" => {
                            let value = reply.content["value"].as_str().unwrap_or_default();
                            let _ = prompt.answer.send(value.to_owned());
                            break;
                        }
                        Ok(other) => tracing::warn!("stdin: ignored a {} message", other.msg_type()),
                        Err(e) => tracing::warn!("stdin: dropped a message: {e}"),
                    }
                }
            }
        }
    }
}
