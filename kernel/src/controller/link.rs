//! The link to the engines: one signed ZeroMQ ROUTER socket, bound on first use to the
//! address the user chose (127.0.0.1 unless told otherwise). A task reads it and hands each
//! verified message to the router; another sends what the controller queues, addressed by the
//! engine's socket identity; `liveness` pings through it.

use super::Controller;
use anyhow::Context;
use bytes::Bytes;
use parallax_engine_protocol::{Connection, FromEngine, Receiver, Sender, ToEngine};
use std::time::Duration;
use tokio::sync::mpsc;
use zeromq::{RouterSendHalf, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// Where a message goes: a registered engine, or a socket not yet an engine (a refusal).
#[derive(Debug, Clone)]
pub(super) enum Address {
    Engine(u32),
    Socket(Bytes),
}

/// A message for one engine, with its binary buffers.
pub(super) type Outgoing = (Address, ToEngine, Vec<Bytes>);

/// The bound socket's url and the send queue.
pub(super) struct Link {
    pub url: String,
    pub commands: mpsc::UnboundedSender<Outgoing>,
}

/// Where the controller listens and how patient it is; `%cluster start` may change them
/// while no engine lives.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The address to bind, and to tell engines.
    pub ip: String,
    pub heartbeat_timeout: Duration,
    pub register_timeout: Duration,
    /// The bound socket's url, once bound.
    pub url: String,
    /// A dead engine comes back by itself (`%cluster start --no-restart` turns it off).
    pub auto_restart: bool,
}

impl Settings {
    pub fn is_loopback(&self) -> bool {
        self.ip == "localhost"
            || self
                .ip
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

/// The address the controller listens on unless told: `PARALLAX_CONTROLLER_IP`, or loopback.
pub fn default_ip() -> String {
    std::env::var("PARALLAX_CONTROLLER_IP")
        .ok()
        .filter(|ip| !ip.trim().is_empty())
        .unwrap_or_else(|| "127.0.0.1".to_owned())
}

impl Controller {
    pub fn settings(&self) -> Settings {
        parallax_eval::ipc::Locked::locked(&*self.settings).clone()
    }

    /// Listens on `ip` from now on, and waits so long for engines. The socket is bound anew
    /// when the address changes, which needs an empty pool.
    pub async fn configure(
        &self,
        ip: Option<String>,
        heartbeat_timeout: Option<Duration>,
        register_timeout: Option<Duration>,
    ) -> anyhow::Result<()> {
        let mut settings = self.settings();
        if let Some(ip) = ip {
            if ip != settings.ip {
                if self.link.lock().await.is_some() {
                    if !self.live_engines().is_empty() {
                        anyhow::bail!(
                            "the controller listens on {} while engines run; stop them first \
                             (%cluster stop) to listen on {ip}",
                            settings.ip
                        );
                    }
                    self.close().await;
                }
                settings.ip = ip;
            }
        }
        if let Some(timeout) = heartbeat_timeout {
            settings.heartbeat_timeout = timeout;
        }
        if let Some(timeout) = register_timeout {
            settings.register_timeout = timeout;
        }
        *parallax_eval::ipc::Locked::locked(&*self.settings) = settings;
        Ok(())
    }

    /// Whether dead engines come back by themselves, from now on.
    pub fn set_auto_restart(&self, on: bool) {
        parallax_eval::ipc::Locked::locked(&*self.settings).auto_restart = on;
    }

    /// What an engine needs to reach the controller, binding the socket on first use.
    pub async fn connection(&self) -> anyhow::Result<Connection> {
        let url = self.link().await?;
        let settings = self.settings();
        Ok(Connection {
            url,
            key: self.key.clone(),
            signature_scheme: "hmac-sha256".into(),
            controller_host: parallax_eval::places::host_name().to_owned(),
            heartbeat_timeout_s: settings.heartbeat_timeout.as_secs_f64(),
            register_timeout_s: settings.register_timeout.as_secs_f64(),
            engine: None,
        })
    }

    /// The engines' url, binding the socket on first use.
    async fn link(&self) -> anyhow::Result<String> {
        let mut link = self.link.lock().await;
        if let Some(link) = link.as_ref() {
            return Ok(link.url.clone());
        }
        let ip = self.settings().ip;
        let mut socket = RouterSocket::new();
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.clone()
        };
        let url = socket
            .bind(&format!("tcp://{host}:0"))
            .await
            .with_context(|| format!("listening on {ip} for engines"))?
            .to_string();
        let (send, recv) = socket.split();
        let (commands, command_rx) = mpsc::unbounded_channel();
        *parallax_eval::ipc::Locked::locked(&*self.commands) = Some(commands.clone());
        parallax_eval::ipc::Locked::locked(&*self.settings).url = url.clone();
        let tasks = vec![
            tokio::spawn(self.clone().receive(recv)),
            tokio::spawn(self.clone().dispatch(send, command_rx)),
            tokio::spawn(self.clone().keep_alive()),
        ];
        *parallax_eval::ipc::Locked::locked(&*self.link_tasks) = tasks;
        tracing::info!("listening for engines on {url}");
        *link = Some(Link {
            url: url.clone(),
            commands,
        });
        Ok(url)
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
                Ok(envelope) => {
                    if let Some(why) = &envelope.damaged {
                        // Routed without its values: the task they belong to fails, named.
                        tracing::warn!(
                            "engines: refused the values of {}: {why}",
                            parallax_engine_protocol::kind_of(&envelope.body)
                        );
                    }
                    self.route(identity, envelope.body, envelope.buffers)
                }
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
        while let Some((address, message, buffers)) = commands.recv().await {
            let identity = match &address {
                Address::Socket(identity) => Some(identity.clone()),
                Address::Engine(engine) => self
                    .registry()
                    .engines
                    .get(engine)
                    .and_then(|e| e.identity.clone()),
            };
            let Some(identity) = identity else {
                tracing::warn!("engines: {address:?} has not registered; dropped {message:?}");
                continue;
            };
            let mut frames = vec![identity];
            frames.extend(sender.encode(&message, buffers));
            if let Ok(message) = ZmqMessage::try_from(frames) {
                if let Err(e) = socket.send(message).await {
                    tracing::warn!("engines: send to {address:?} failed: {e}");
                }
            }
        }
    }

    /// Queues a message for an engine; it goes out in the order queued.
    pub async fn send_to(&self, engine: u32, message: ToEngine, buffers: Vec<Bytes>) {
        self.observer.sent(engine, &message);
        if let Some(link) = self.link.lock().await.as_ref() {
            let _ = link
                .commands
                .send((Address::Engine(engine), message, buffers));
        }
    }

    pub(super) async fn send(&self, engine: u32, message: ToEngine) {
        self.send_to(engine, message, Vec::new()).await;
    }

    /// Queues a message for an engine without waiting (from where no await is allowed).
    pub(super) fn pass_on(&self, engine: u32, message: ToEngine) {
        self.pass_to(Address::Engine(engine), message);
    }

    pub(super) fn pass_to(&self, address: Address, message: ToEngine) {
        if let Some(commands) = parallax_eval::ipc::Locked::locked(&*self.commands).as_ref() {
            let _ = commands.send((address, message, Vec::new()));
        }
    }

    /// Closes the link: its tasks end and the socket is dropped, its port freed.
    pub async fn close(&self) {
        self.link.lock().await.take();
        parallax_eval::ipc::Locked::locked(&*self.commands).take();
        for task in std::mem::take(&mut *parallax_eval::ipc::Locked::locked(&*self.link_tasks)) {
            task.abort();
        }
    }
}
