//! Values carried to this engine's host once for all its engines: the controller streams a
//! value's bytes here in parts, this engine writes them into a file of shared memory of its own,
//! and the host's engines then store the value from that file. The file goes when the
//! controller releases it, or with the engine's directory when the engine ends.

use crate::Outbound;
use bytes::Bytes;
use parallax_engine_protocol::shared::{shm_base, Assembly, PartRefused, SharedDir};
use parallax_engine_protocol::{FromEngine, Outcome};
use parallax_eval::ipc::Locked;
use std::collections::hash_map::{Entry, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

/// Why a carry failed: what arrived was not intact, or this host had no room for it (the
/// controller then sends the value to each engine instead).
const DATA_ERROR: &str = "DataError";
const NO_ROOM: &str = parallax_engine_protocol::NO_SHARED_ROOM;

/// Why a part was refused: the error's name and what went wrong.
type Refusal = (&'static str, String);

/// The carries this engine holds, by task.
#[derive(Default)]
pub(crate) struct Carries {
    dir: OnceLock<Option<Arc<SharedDir>>>,
    held: Mutex<HashMap<u64, Assembly>>,
}

impl Carries {
    /// Writes one part of carry `task` and says how much has arrived; a part that cannot be
    /// taken ends the carry with an error.
    pub fn part(
        &self,
        engine: u32,
        task: u64,
        offset: u64,
        total: u64,
        buffers: Result<Vec<Bytes>, String>,
        outbound: &Outbound,
    ) {
        let written = match buffers.as_deref() {
            Ok([part]) => self.write(task, offset, total, part),
            Ok(other) => Err((
                DATA_ERROR,
                format!("a part in {} buffers, not one", other.len()),
            )),
            Err(why) => Err((DATA_ERROR, why.clone())),
        };
        let answer = match written {
            Ok(Some(carried)) => carried,
            // A later part of a carry that already failed: its failure was said.
            Ok(None) => return,
            Err((ename, why)) => {
                tracing::warn!("engine {engine}: dropped carry {task}: {why}");
                self.held.locked().remove(&task);
                FromEngine::Done {
                    task,
                    outcome: Outcome::Error {
                        ename: ename.into(),
                        evalue: why.clone(),
                        traceback: vec![format!("{ename}: {why}\n")],
                    },
                    state: None,
                }
            }
        };
        let _ = outbound.send((answer, Vec::new()));
    }

    fn write(
        &self,
        task: u64,
        offset: u64,
        total: u64,
        part: &[u8],
    ) -> Result<Option<FromEngine>, Refusal> {
        let mut held = self.held.locked();
        let assembly = match held.entry(task) {
            Entry::Occupied(entry) => entry.into_mut(),
            // A later part of a carry that already failed.
            Entry::Vacant(_) if offset != 0 => return Ok(None),
            Entry::Vacant(entry) => {
                let dir = self
                    .dir
                    .get_or_init(|| SharedDir::open(&shm_base()))
                    .as_ref()
                    .ok_or((NO_ROOM, "this host has no shared memory".to_owned()))?;
                let assembly = Assembly::new(dir, "carried", total)
                    .map_err(|e| (NO_ROOM, format!("{total} bytes of shared memory: {e}")))?;
                entry.insert(assembly)
            }
        };
        let received = assembly
            .write(offset, part)
            .map_err(|refused| match refused {
                // Shared memory filled up (a container's small /dev/shm).
                PartRefused::NoRoom(why) => (NO_ROOM, why),
                PartRefused::OutOfPlace(why) => (DATA_ERROR, why),
            })?;
        Ok(Some(FromEngine::Carried {
            task,
            received,
            region: assembly.region(),
        }))
    }

    /// Removes carry `task`'s file (the engines that stored it hold their own copies) and
    /// says so.
    pub fn release(&self, task: u64, outbound: &Outbound) {
        self.held.locked().remove(&task);
        let done = FromEngine::Done {
            task,
            outcome: Outcome::Ok {
                data: Default::default(),
            },
            state: None,
        };
        let _ = outbound.send((done, Vec::new()));
    }
}
