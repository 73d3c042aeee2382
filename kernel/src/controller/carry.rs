//! Values crossing between hosts in parts. Out: a value is carried to another host once,
//! however many of its engines need it: its bytes go in parts, a few in flight at a time, to
//! one engine of that host, which writes them into a file of shared memory there; the host's
//! engines then store the value from that file. Back: an engine of another host sends a
//! fetched value in parts, written as they come into a file of the kernel's shared memory,
//! where the notebook reads it. Neither side holds more than the value and the parts in flight.

use super::events::TaskEvent;
use super::Controller;
use bytes::{Bytes, BytesMut};
use parallax_engine_protocol::shared::{Assembly, PartRefused, SharedDir};
use parallax_engine_protocol::{
    DataMeta, Outcome, Payload, Region, ToEngine, NO_SHARED_ROOM, PARTS_IN_FLIGHT, PART_BYTES,
};
use parallax_eval::ipc::Locked;
use std::collections::HashMap;
use tokio::sync::mpsc;

/// Fetched values arriving in parts, by task.
pub(super) type Arrivals = HashMap<u64, Arrival>;

/// Why a carry did not finish.
#[derive(Debug, Clone, PartialEq)]
pub enum CarryFailed {
    /// The stop button was pressed.
    Interrupted,
    /// The host had no room in shared memory for it, in words.
    NoRoom(String),
    /// What went wrong, in words.
    Error(String),
}

/// A value held in shared memory on an engine's host until this is dropped.
pub struct Carried {
    _held: Held,
    pub region: Region,
}

/// A carry's task: its file is released when this goes, however the carry ended.
struct Held {
    controller: Controller,
    engine: u32,
    task: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.controller
            .pass_on(self.engine, ToEngine::Release { task: self.task });
    }
}

impl Controller {
    /// Carries the bytes of `value` to `engine`'s host; `progress` hears the bytes written
    /// there so far. Fails with what went wrong there, or when the stop button is pressed.
    pub async fn carry(
        &self,
        engine: u32,
        value: &Payload,
        mut progress: impl FnMut(u64),
    ) -> Result<Carried, CarryFailed> {
        let (events, mut event_rx) = mpsc::unbounded_channel();
        let task = self.registry().open_side_task(engine, &events);
        drop(events);
        let held = Held {
            controller: self.clone(),
            engine,
            task,
        };
        let mut interrupts = self.interrupts();
        let total = value.data.len() as u64;
        let (mut sent, mut received, mut parts) = (0, 0, 0);
        loop {
            // At least one part, so that an empty value has a file too.
            while (sent < total || parts == 0) && sent - received < PARTS_IN_FLIGHT * PART_BYTES {
                let end = (sent + PART_BYTES).min(total);
                let carry = ToEngine::Carry {
                    task,
                    offset: sent,
                    total,
                };
                let part = value.read_part(sent, end).map_err(|e| {
                    CarryFailed::Error(format!("cannot read the value's bytes: {e}"))
                })?;
                self.send_to(engine, carry, vec![part]).await;
                sent = end;
                parts += 1;
            }
            let event = tokio::select! {
                event = event_rx.recv() => event,
                _ = interrupts.changed() => return Err(CarryFailed::Interrupted),
            };
            match event {
                Some(TaskEvent::Carried {
                    received: now,
                    region,
                }) => {
                    received = now;
                    progress(received);
                    if let Some(region) = region {
                        return Ok(Carried {
                            _held: held,
                            region,
                        });
                    }
                }
                Some(TaskEvent::Done {
                    outcome: Outcome::Error { ename, evalue, .. },
                    ..
                }) if ename == NO_SHARED_ROOM => return Err(CarryFailed::NoRoom(evalue)),
                Some(TaskEvent::Done {
                    outcome: Outcome::Error { ename, evalue, .. },
                    ..
                }) => return Err(CarryFailed::Error(format!("{ename}: {evalue}"))),
                Some(_) => {}
                None => return Err(CarryFailed::Error("the pool stopped".into())),
            }
        }
    }
}

/// A fetched value arriving in parts: into the kernel's shared memory, or into memory where
/// that is full or missing; or why its parts could not be kept.
pub(super) enum Arrival {
    Shared(Assembly),
    Memory { bytes: BytesMut, total: u64 },
    Failed(String),
}

impl Arrival {
    fn new(dir: Option<&SharedDir>, total: u64) -> Arrival {
        match dir.map(|dir| Assembly::new(dir, "fetch", total)) {
            Some(Ok(assembly)) => Arrival::Shared(assembly),
            _ => Arrival::Memory {
                bytes: BytesMut::new(),
                total,
            },
        }
    }

    /// Keeps the part at `offset`; returns the bytes kept so far.
    fn write(&mut self, offset: u64, part: &[u8]) -> Result<u64, String> {
        match self {
            Arrival::Shared(assembly) => {
                match assembly.write(offset, part) {
                    Ok(received) => Ok(received),
                    Err(PartRefused::NoRoom(why)) => {
                        tracing::warn!("engines: shared memory is full ({why}); a fetched value is kept in memory");
                        let bytes = assembly.written().map_err(|e| e.to_string())?;
                        let total = assembly.total();
                        *self = Arrival::Memory {
                            bytes: BytesMut::from(&bytes[..]),
                            total,
                        };
                        self.write(offset, part)
                    }
                    Err(refused) => Err(refused.to_string()),
                }
            }
            Arrival::Memory { bytes, total } => {
                let end = offset + part.len() as u64;
                if offset != bytes.len() as u64 || end > *total {
                    return Err(format!(
                        "a part at {offset}..{end} of {total} bytes, when {} had arrived",
                        bytes.len()
                    ));
                }
                bytes.extend_from_slice(part);
                Ok(end)
            }
            Arrival::Failed(why) => Err(why.clone()),
        }
    }

    /// The whole value, with the item ends in `buffers`.
    fn into_payload(self, meta: DataMeta, mut buffers: Vec<Bytes>) -> Result<Payload, String> {
        match self {
            Arrival::Shared(assembly) => {
                let region = assembly.hand_over()?;
                Payload::from_message(meta, buffers, Some(region), true)
            }
            Arrival::Memory { bytes, total } if bytes.len() as u64 == total => {
                buffers.push(bytes.freeze());
                Payload::from_message(meta, buffers, None, false)
            }
            Arrival::Memory { bytes, total } => {
                Err(format!("{} of {total} bytes arrived", bytes.len()))
            }
            Arrival::Failed(why) => Err(why),
        }
    }
}

impl Controller {
    /// A part of what fetch `task` of `engine` sends back: kept, and answered, so the engine
    /// sends more. A part that cannot be kept is still answered (the engine finishes) and the
    /// fetch fails when its `Fetched` comes.
    pub(super) fn part_arrived(
        &self,
        engine: u32,
        task: u64,
        offset: u64,
        total: u64,
        buffers: Vec<Bytes>,
    ) {
        let mut arrivals = self.arrivals.locked();
        let arrival = arrivals
            .entry(task)
            .or_insert_with(|| Arrival::new(self.shared.as_deref(), total));
        let written = match buffers.as_slice() {
            [part] => arrival.write(offset, part),
            _ => Err(format!("a part in {} buffers, not one", buffers.len())),
        };
        let received = match written {
            Ok(received) => received,
            Err(e) => {
                *arrival = Arrival::Failed(e);
                total
            }
        };
        drop(arrivals);
        self.pass_on(engine, ToEngine::Received { task, received });
    }

    /// The values fetch `task` sent in parts, ready in the kernel's shared memory.
    pub(super) fn streamed_payload(
        &self,
        task: u64,
        meta: DataMeta,
        buffers: Vec<Bytes>,
    ) -> Result<Payload, String> {
        let arrival = self.arrivals.locked().remove(&task);
        match arrival {
            None => Err("its parts never came".into()),
            Some(arrival) => arrival.into_payload(meta, buffers),
        }
    }
}
