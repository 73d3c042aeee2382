//! Values crossing between hosts in parts. Out: a value is carried to another host once,
//! however many of its engines need it: its bytes go in parts, a few in flight at a time, to
//! one engine of that host, which writes them into a file of shared memory there; the host's
//! engines then store the value from that file. Back: an engine of another host sends a
//! fetched value in parts, written as they come into a file of the kernel's shared memory,
//! where the notebook reads it. Neither side holds more than the value and the parts in flight.

use super::events::TaskEvent;
use super::Controller;
use bytes::Bytes;
use parallax_engine_protocol::shared::Assembly;
use parallax_engine_protocol::{DataMeta, Outcome, Payload, Region, ToEngine};
use parallax_eval::ipc::Locked;
use std::collections::HashMap;
use tokio::sync::mpsc;

/// Fetched values arriving in parts, by task, or why their parts could not be kept.
pub(super) type Arrivals = HashMap<u64, Result<Assembly, String>>;

/// The bytes of one part: big enough that a message's fixed cost vanishes, small enough that
/// the parts in flight stay a bounded buffer.
const CARRY_PART: u64 = 8 << 20;
/// Parts sent and not yet written on the other side.
const PARTS_IN_FLIGHT: u64 = 4;

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
    ) -> Result<Carried, String> {
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
            while (sent < total || parts == 0) && sent - received < PARTS_IN_FLIGHT * CARRY_PART {
                let end = (sent + CARRY_PART).min(total);
                let carry = ToEngine::Carry {
                    task,
                    offset: sent,
                    total,
                };
                let part = value
                    .read_part(sent, end)
                    .map_err(|e| format!("cannot read the value's bytes: {e}"))?;
                self.send_to(engine, carry, vec![part]).await;
                sent = end;
                parts += 1;
            }
            let event = tokio::select! {
                event = event_rx.recv() => event,
                _ = interrupts.changed() => return Err("interrupted".into()),
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
                }) => return Err(format!("{ename}: {evalue}")),
                Some(_) => {}
                None => return Err("the pool stopped".into()),
            }
        }
    }
}

impl Controller {
    /// A part of what fetch `task` of `engine` sends back: written into the kernel's shared
    /// memory, and answered, so the engine sends more. A part that cannot be kept is still
    /// answered (the engine finishes) and the fetch fails when its `Fetched` comes.
    pub(super) fn part_arrived(
        &self,
        engine: u32,
        task: u64,
        offset: u64,
        total: u64,
        buffers: Vec<Bytes>,
    ) {
        let mut arrivals = self.arrivals.locked();
        let arrival = arrivals.entry(task).or_insert_with(|| {
            let dir = self
                .shared
                .as_ref()
                .ok_or("no shared memory on the kernel's host")?;
            Assembly::new(dir, "fetch", total)
                .map_err(|e| format!("no room for {total} bytes: {e}"))
        });
        let written = match (arrival.as_mut(), buffers.as_slice()) {
            (Ok(assembly), [part]) => assembly.write(offset, part),
            (Ok(_), _) => Err(format!("a part in {} buffers, not one", buffers.len())),
            (Err(e), _) => Err(e.clone()),
        };
        let received = match written {
            Ok(received) => received,
            Err(e) => {
                *arrival = Err(e);
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
            Some(arrival) => {
                let region = arrival?.hand_over()?;
                Payload::from_message(meta, buffers, Some(region), true)
            }
        }
    }
}
