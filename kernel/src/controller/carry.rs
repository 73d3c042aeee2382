//! Carrying a value to another host once, however many of its engines need it: its bytes go in
//! parts, a few in flight at a time, to one engine of that host, which writes them into a file of
//! shared memory there; the host's engines then store the value from that file. Neither side
//! holds more than the value and the parts in flight.

use super::events::TaskEvent;
use super::Controller;
use bytes::Bytes;
use parallax_engine_protocol::{Outcome, Region, ToEngine};
use tokio::sync::mpsc;

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
    /// Carries `data` to `engine`'s host; `progress` hears the bytes written there so far.
    /// Fails with what went wrong there, or when the stop button is pressed.
    pub async fn carry(
        &self,
        engine: u32,
        data: Bytes,
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
        let total = data.len() as u64;
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
                let part = data.slice(sent as usize..end as usize);
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
