//! What an engine does with each message from the controller: queue a task, pass a shared
//! cell's step on, feed a map its chunks, interrupt, answer a ping.

use crate::carrying::Carries;
use crate::data_work::{Acks, Receipts};
use crate::inbox::Inbox;
use crate::{end_map, DataWork, Fetch, Outbound, SharedMaps, Store, Work, MAP_STOP_GRACE};
use bytes::Bytes;
use parallax_engine_protocol::{
    FromEngine, Payload, ProcessUsage, Role, Share, ToEngine, TIMED_PING_NONCES,
};
use parallax_eval::ipc::Locked;
use parallax_eval::{Interrupter, MapInput};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// What the engine does with each message from the controller: queue a task, pass a shared
/// cell's step to it, feed a map, interrupt, answer a ping.
pub(crate) struct Handler {
    pub engine: u32,
    pub tasks: mpsc::UnboundedSender<(u64, Share, Work)>,
    pub interrupter: Interrupter,
    pub cancelled: Arc<AtomicU64>,
    pub maps: SharedMaps,
    pub inbox: Inbox,
    /// The task running now.
    pub running: Arc<AtomicU64>,
    pub outbound: Outbound,
    /// Values carried to this host for its engines.
    pub carries: Carries,
    /// Fetches sending their values back in parts.
    pub receipts: Receipts,
}

impl Handler {
    /// Breaks when the controller says to shut down.
    /// Acts on a message; `buffers` is why its values were refused if they were altered.
    pub fn handle(
        &self,
        message: ToEngine,
        buffers: Result<Vec<Bytes>, String>,
    ) -> ControlFlow<()> {
        let engine = self.engine;
        match message {
            ToEngine::Execute { task, code, share } => {
                let _ = self.tasks.send((task, share, Work::Code(code)));
            }
            ToEngine::Store {
                task,
                name,
                type_src,
                value,
                meta,
                share,
                region,
            } => {
                // Values that did not arrive intact are dropped, but the engine still takes
                // part in the shared cell: the others of its group may wait for it. Values in
                // shared memory are the controller's: mapped, never removed here.
                let payload =
                    buffers.and_then(|buffers| Payload::from_message(meta, buffers, region, false));
                if let Err(e) = &payload {
                    tracing::warn!("engine {engine}: dropped a store: {e}");
                }
                let stored = Store {
                    name,
                    type_src,
                    value,
                };
                let work = Work::Data(DataWork::Store(stored, payload));
                let _ = self.tasks.send((task, share, work));
            }
            ToEngine::Fetch {
                task,
                name,
                value,
                share,
                into,
                parts,
            } => {
                let into = into.map(std::path::PathBuf::from);
                let acks = parts.then(|| Acks::open(task, &self.receipts));
                let fetch = Fetch {
                    name,
                    value,
                    into,
                    acks,
                };
                let work = Work::Data(DataWork::Fetch(fetch));
                let _ = self.tasks.send((task, share, work));
            }
            ToEngine::Map { task, func, share } => {
                let _ = self
                    .tasks
                    .send((task, share, Work::Data(DataWork::Map { func })));
            }
            ToEngine::Shared { cell, from, step } => self.inbox.deliver(cell, from, step),
            ToEngine::Chunk {
                task,
                chunk,
                start,
                meta,
                region,
            } => {
                // Items in shared memory are the notebook's: mapped, never removed here.
                let items =
                    buffers.and_then(|buffers| Payload::from_message(meta, buffers, region, false));
                self.chunk(task, chunk, start, items)
            }
            ToEngine::MapEnd { task } => end_map(&self.maps, task),
            ToEngine::Carry {
                task,
                offset,
                total,
            } => self
                .carries
                .part(engine, task, offset, total, buffers, &self.outbound),
            ToEngine::Release { task } => self.carries.release(task, &self.outbound),
            ToEngine::Received { task, received } => {
                if let Some(acks) = self.receipts.locked().get(&task) {
                    acks.send_replace(received);
                }
            }
            ToEngine::Interrupt { task } => self.interrupt(task),
            ToEngine::Ping { nonce } => {
                if nonce >= TIMED_PING_NONCES {
                    let _ = self
                        .outbound
                        .send((FromEngine::Pong { nonce, usage: None }, Vec::new()));
                } else {
                    // A keep-alive ping, once a second: its answer says what the engine uses,
                    // read from /proc off the socket's thread.
                    let outbound = self.outbound.clone();
                    tokio::task::spawn_blocking(move || {
                        let (cpu_seconds, rss_bytes) =
                            parallax_eval::usage::tree_usage(std::process::id());
                        let usage = Some(ProcessUsage {
                            cpu_seconds,
                            rss_bytes,
                        });
                        let _ = outbound.send((FromEngine::Pong { nonce, usage }, Vec::new()));
                    });
                }
            }
            ToEngine::Shutdown => return ControlFlow::Break(()),
            // Answers to a registration said again, after the first.
            ToEngine::Adopt { history, lost } => self.adopt(history, lost),
            ToEngine::Welcome { .. } => {}
            ToEngine::Refused { reason } => {
                tracing::warn!("engine {engine}: the controller refused it: {reason}");
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    /// A map's chunk goes to its serving cell; items that did not arrive intact are refused.
    fn chunk(&self, task: u64, chunk: u64, start: u64, items: Result<Payload, String>) {
        let engine = self.engine;
        let feed = self.maps.locked().feeds.get(&task).cloned();
        match (feed, items) {
            (Some(feed), Ok(items)) => {
                let _ = feed.send(MapInput::Chunk {
                    chunk,
                    start,
                    items,
                });
            }
            (None, _) => {
                tracing::warn!("engine {engine}: a chunk for map {task}, which is not serving")
            }
            (_, Err(e)) => {
                tracing::warn!("engine {engine}: dropped a chunk: {e}");
                let refused = FromEngine::ChunkRefused {
                    task,
                    chunk,
                    message: e,
                };
                let _ = self.outbound.send((refused, Vec::new()));
            }
        }
    }

    /// A replacement's inheritance goes into the task queue, so that it comes before the
    /// cells sent after it.
    fn adopt(&self, history: Vec<parallax_engine_protocol::HistoryEntry>, lost: Vec<String>) {
        let share = Share {
            cell: 0,
            role: Role::Lead {
                followers: Vec::new(),
            },
        };
        let _ = self.tasks.send((0, share, Work::Adopt { history, lost }));
    }

    fn interrupt(&self, task: u64) {
        tracing::info!("engine {}: interrupt for task {task}", self.engine);
        let serving = self.maps.locked().feeds.contains_key(&task);
        if serving {
            // A map stops between chunks and keeps the engine's variables; only an item that
            // runs on and on needs the hard way.
            end_map(&self.maps, task);
            let interrupter = self.interrupter.clone();
            let running = self.running.clone();
            tokio::spawn(async move {
                tokio::time::sleep(MAP_STOP_GRACE).await;
                if running.load(Ordering::SeqCst) == task {
                    interrupter.interrupt();
                }
            });
        } else if self.running.load(Ordering::SeqCst) == task {
            self.cancelled.store(task, Ordering::SeqCst);
            self.interrupter.interrupt();
        }
    }
}
