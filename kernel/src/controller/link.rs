//! The link to the engines: one signed ZeroMQ ROUTER socket, bound on first use. A task reads
//! it and hands each verified message to the router; another sends what the controller queues,
//! addressed by the engine's socket identity; a third keeps the engines alive with pings.

use super::launch::KeyFile;
use super::Controller;
use anyhow::Context;
use bytes::Bytes;
use parallax_engine_protocol::{FromEngine, Receiver, Sender, ToEngine};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;
use zeromq::{RouterSendHalf, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// A message for one engine, with its binary buffers.
pub(super) type Outgoing = (u32, ToEngine, Vec<Bytes>);

/// The bound socket's address, the key file engines read, and the send queue.
pub(super) struct Link {
    pub endpoint: String,
    pub key_file: KeyFile,
    pub commands: mpsc::UnboundedSender<Outgoing>,
}

/// Engines exit when they stop hearing from us; a ping a second keeps them alive.
const KEEP_ALIVE: Duration = Duration::from_secs(1);

impl Controller {
    /// The engines' endpoint and key file, binding the socket on first use.
    pub(super) async fn link(&self) -> anyhow::Result<(String, PathBuf)> {
        let mut link = self.link.lock().await;
        if let Some(link) = link.as_ref() {
            return Ok((link.endpoint.clone(), link.key_file.path()));
        }
        let mut socket = RouterSocket::new();
        let endpoint = socket
            .bind("tcp://127.0.0.1:0")
            .await
            .context("binding the engines' socket")?
            .to_string();
        let key_file = KeyFile::write(&self.key)?;
        let key_path = key_file.path();
        let (send, recv) = socket.split();
        let (commands, command_rx) = mpsc::unbounded_channel();
        let _ = self.commands.set(commands.clone());
        tokio::spawn(self.clone().receive(recv));
        tokio::spawn(self.clone().dispatch(send, command_rx));
        tokio::spawn(self.clone().keep_alive());
        *link = Some(Link {
            endpoint: endpoint.clone(),
            key_file,
            commands,
        });
        Ok((endpoint, key_path))
    }

    /// Reads the socket: every verified message goes to the router; anything malformed or
    /// unsigned is dropped and logged.
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
                Ok(envelope) => self.route(identity, envelope.body, envelope.buffers),
                Err(e) => tracing::warn!("engines: dropped a message: {e}"),
            }
        }
    }

    /// Signs and sends what is queued for the engines, in order.
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

    async fn keep_alive(self) {
        let mut nonce = 0;
        let mut tick = tokio::time::interval(KEEP_ALIVE);
        loop {
            tick.tick().await;
            nonce += 1;
            let listening = self
                .registry()
                .ids(|e| !e.is_dead() && !e.stopping && e.identity.is_some());
            for id in listening {
                self.send(id, ToEngine::Ping { nonce }).await;
            }
        }
    }

    /// Queues a message for an engine; it goes out in the order queued.
    pub async fn send_to(&self, engine: u32, message: ToEngine, buffers: Vec<Bytes>) {
        self.observer.sent(engine, &message);
        if let Some(link) = self.link.lock().await.as_ref() {
            let _ = link.commands.send((engine, message, buffers));
        }
    }

    pub(super) async fn send(&self, engine: u32, message: ToEngine) {
        self.send_to(engine, message, Vec::new()).await;
    }

    /// Queues a message for an engine without waiting (from where no await is allowed).
    pub(super) fn pass_on(&self, engine: u32, message: ToEngine) {
        if let Some(commands) = self.commands.get() {
            let _ = commands.send((engine, message, Vec::new()));
        }
    }

    /// Forgets the link: the key file and its directory are removed (at kernel exit).
    pub async fn close(&self) {
        self.link.lock().await.take();
    }
}
