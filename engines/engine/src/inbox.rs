//! A follower's inbox: the steps its leaders send for each shared cell, kept until the
//! follower's task for that cell begins listening (they may arrive first).

use parallax_engine_protocol::Step;
use parallax_eval::ipc::Locked;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

pub(crate) type StepFrom = (u32, Step);

enum Slot {
    Open(
        mpsc::UnboundedSender<StepFrom>,
        Option<mpsc::UnboundedReceiver<StepFrom>>,
    ),
    /// The follower stopped listening before the leader's `Done`.
    Abandoned,
}

/// Steps from leaders, by cell: they may arrive before the follower's task begins.
#[derive(Clone, Default)]
pub struct Inbox {
    slots: Arc<Mutex<HashMap<u64, Slot>>>,
}

impl Inbox {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Slot>> {
        self.slots.locked()
    }

    pub fn deliver(&self, cell: u64, from: u32, step: Step) {
        let mut slots = self.slots();
        let last = matches!(step, Step::Done { .. } | Step::Abort { .. });
        match slots.get(&cell) {
            Some(Slot::Abandoned) => {
                if last {
                    slots.remove(&cell);
                }
            }
            Some(Slot::Open(tx, _)) => {
                let _ = tx.send((from, step));
            }
            None => {
                let (tx, rx) = mpsc::unbounded_channel();
                let _ = tx.send((from, step));
                slots.insert(cell, Slot::Open(tx, Some(rx)));
            }
        }
    }

    pub(crate) fn take(&self, cell: u64) -> mpsc::UnboundedReceiver<StepFrom> {
        let mut slots = self.slots();
        if let Some(Slot::Open(_, rx)) = slots.get_mut(&cell) {
            if let Some(rx) = rx.take() {
                return rx;
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        slots.insert(cell, Slot::Open(tx, None));
        rx
    }

    /// The follower heard the last step.
    pub(crate) fn close(&self, cell: u64) {
        self.slots().remove(&cell);
    }

    /// The follower stops listening early; later steps are dropped.
    pub(crate) fn abandon(&self, cell: u64) {
        self.slots().insert(cell, Slot::Abandoned);
    }
}
