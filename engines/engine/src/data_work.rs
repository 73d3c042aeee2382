//! The tasks that move values through an engine's data socket: storing pushed or scattered
//! values, fetching values to pull or gather, and serving a map's chunks. Each runs a cell
//! the engines of a host share, and what it sends back goes out before the task's `Done`.

use crate::sharing::{self, outcome_of, Core};
use crate::{DataWork, Fetch, Outbound, Store};
use bytes::Bytes;
use parallax_engine_protocol::{
    FromEngine, Outcome, Payload, Share, PARTS_FROM, PARTS_IN_FLIGHT, PART_BYTES,
};
use parallax_eval::ipc::Locked;
use parallax_eval::{cells, CellError, MapInput, MapOutput, StreamSink};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{mpsc, watch};

/// The fetches sending values back in parts, by task: where the controller's `Received`
/// answers go.
pub(crate) type Receipts = Arc<Mutex<HashMap<u64, watch::Sender<u64>>>>;

/// What the controller has received of one fetch's parts; forgotten when dropped.
pub(crate) struct Acks {
    task: u64,
    received: watch::Receiver<u64>,
    receipts: Receipts,
}

impl Acks {
    pub(crate) fn open(task: u64, receipts: &Receipts) -> Acks {
        let (sender, received) = watch::channel(0);
        receipts.locked().insert(task, sender);
        Acks {
            task,
            received,
            receipts: receipts.clone(),
        }
    }

    /// Sends `data` in parts, at most `PARTS_IN_FLIGHT` of them unanswered.
    async fn send_in_parts(&mut self, data: &Bytes, outbound: &Outbound) -> Result<(), String> {
        let total = data.len() as u64;
        let mut sent = 0;
        while sent < total {
            while sent - *self.received.borrow() >= PARTS_IN_FLIGHT * PART_BYTES {
                self.received
                    .changed()
                    .await
                    .map_err(|_| "the engine is stopping".to_owned())?;
            }
            let end = (sent + PART_BYTES).min(total);
            let part = FromEngine::FetchedPart {
                task: self.task,
                offset: sent,
                total,
            };
            let bytes = data.slice(sent as usize..end as usize);
            outbound
                .send((part, vec![bytes]))
                .map_err(|_| "the engine is stopping".to_owned())?;
            sent = end;
        }
        Ok(())
    }
}

impl Drop for Acks {
    fn drop(&mut self) {
        self.receipts.locked().remove(&self.task);
    }
}

/// Runs the cell of a data task; what it sends back goes out before the task's `Done`. The
/// cell's transfer id is the shared cell's number, the same on every engine that runs it.
pub(crate) async fn run_data_work(
    core: &mut Core,
    task: u64,
    share: &Share,
    work: DataWork,
    preludes: Vec<String>,
    sink: StreamSink,
    outbound: &Outbound,
) -> Outcome {
    let id = share.cell;
    let port = core.port.clone();
    match work {
        DataWork::Store(stored, payload) => {
            store(core, task, share, stored, payload, preludes, sink).await
        }
        DataWork::Fetch(fetch) => {
            fetch_value(core, task, share, fetch, preludes, sink, outbound).await
        }
        DataWork::Map { func } => {
            let session = port.open_map(id);
            let ended_early = {
                let mut maps = core.maps.locked();
                maps.feeds.insert(task, session.input.clone());
                maps.ended.remove(&task)
            };
            if ended_early {
                let _ = session.input.send(MapInput::End);
            }
            let forwarder =
                tokio::spawn(forward_map_output(task, session.output, outbound.clone()));
            let code = cells::serve_map(&func);
            let ended = run_data_cell(core, task, share, code, preludes, true, sink).await;
            core.maps.locked().feeds.remove(&task);
            // The cell is over, so its side of the session is closed and the forwarder ends
            // once it has passed on every result.
            let _ = forwarder.await;
            if let Outcome::Error { .. } = ended.outcome {
                return ended.outcome;
            }
            if let Some(type_src) = ended.sent_type {
                let _ = outbound.send((FromEngine::ResultType { task, type_src }, Vec::new()));
            }
            Outcome::Ok {
                data: Default::default(),
            }
        }
    }
}

/// Stores pushed or scattered values: offers them to the cell that stores them.
async fn store(
    core: &mut Core,
    task: u64,
    share: &Share,
    stored: Store,
    payload: Result<Payload, String>,
    preludes: Vec<String>,
    sink: StreamSink,
) -> Outcome {
    let Store {
        name,
        type_src,
        value,
    } = stored;
    let id = share.cell;
    let port = core.port.clone();
    let began = Instant::now();
    let refused = match payload {
        Ok(payload) => {
            port.offer(id, payload);
            None
        }
        Err(e) => Some(e),
    };
    let code = if value {
        cells::receive_value(&name, &type_src)
    } else {
        cells::receive_items(&name, &type_src)
    };
    let ended = run_data_cell(core, task, share, code, preludes, false, sink).await;
    tracing::debug!(
        "store of `{name}` took {:.3} s",
        began.elapsed().as_secs_f64()
    );
    match refused {
        Some(e) => outcome_of(Err(CellError::plain(
            "DataError",
            format!("the values for `{name}` did not arrive intact: {e}"),
        ))),
        None => ended.outcome,
    }
}

/// Sends a variable back: a cell hands its values to this engine, which passes them on.
async fn fetch_value(
    core: &mut Core,
    task: u64,
    share: &Share,
    fetch: Fetch,
    preludes: Vec<String>,
    sink: StreamSink,
    outbound: &Outbound,
) -> Outcome {
    let Fetch {
        name,
        value,
        into,
        mut acks,
    } = fetch;
    let id = share.cell;
    let port = core.port.clone();
    let began = Instant::now();
    // Shared memory of this engine's own is of no use to a controller on another host.
    let controller_reads_shared = into.is_some();
    let arrived = match into {
        Some(path) => port.expect_into(id, path),
        None => port.expect(id),
    };
    let code = if value {
        cells::send_value(&name)
    } else {
        cells::send_items(&name, None)
    };
    let ended = run_data_cell(core, task, share, code, preludes, true, sink).await;
    if let Outcome::Error { .. } = ended.outcome {
        return ended.outcome;
    }
    match (arrived.await, ended.sent_type) {
        (Ok(payload), Some(type_src)) => {
            tracing::debug!(
                "fetch of `{name}`: {} bytes in {:.3} s",
                payload.data.len(),
                began.elapsed().as_secs_f64()
            );
            // Written where the controller asked: it reads the bytes there.
            let region = payload.region().filter(|_| controller_reads_shared);
            // A big value for another host goes ahead in parts.
            let streamed = match &mut acks {
                Some(acks) if region.is_none() && payload.data.len() as u64 >= PARTS_FROM => {
                    if let Err(e) = acks.send_in_parts(&payload.data, outbound).await {
                        return outcome_of(Err(CellError::internal(&e)));
                    }
                    true
                }
                _ => false,
            };
            let buffers = payload.buffers_unless(region.is_some() || streamed);
            let fetched = FromEngine::Fetched {
                task,
                type_src,
                meta: payload.meta.into(),
                region,
                streamed,
            };
            let _ = outbound.send((fetched, buffers));
            Outcome::Ok {
                data: Default::default(),
            }
        }
        (Err(_), _) => outcome_of(Err(CellError::internal("the values never arrived"))),
        (_, None) => outcome_of(Err(CellError::internal(&format!(
            "evcxr did not name the type of `{name}`"
        )))),
    }
}

/// Runs a data task's cell, then forgets its transfer (the shared cell's number).
async fn run_data_cell(
    core: &mut Core,
    task: u64,
    share: &Share,
    code: String,
    preludes: Vec<String>,
    wants_sent_type: bool,
    sink: StreamSink,
) -> sharing::Ended {
    let work = sharing::Work {
        code,
        preludes,
        wants_sent_type,
    };
    // The cell names no transfer: the one its engine runs now (the shared cell's number).
    core.port.running(share.cell);
    let ended = core.execute(task, share, &work, sink).await;
    core.port.withdraw(share.cell);
    ended
}

async fn forward_map_output(
    task: u64,
    mut output: mpsc::UnboundedReceiver<MapOutput>,
    outbound: Outbound,
) {
    while let Some(item) = output.recv().await {
        let message = match item {
            MapOutput::Ready {
                arg_type,
                result_type,
            } => (
                FromEngine::MapReady {
                    task,
                    arg_type,
                    result_type,
                },
                Vec::new(),
            ),
            MapOutput::Done {
                chunk,
                elapsed_ns,
                results,
                failures,
            } => {
                let buffers = results.wire_buffers();
                (
                    FromEngine::ChunkDone {
                        task,
                        chunk,
                        elapsed_ns,
                        failures,
                        meta: results.meta.into(),
                    },
                    buffers,
                )
            }
            MapOutput::Refused { chunk, message } => (
                FromEngine::ChunkRefused {
                    task,
                    chunk,
                    message,
                },
                Vec::new(),
            ),
        };
        if outbound.send(message).is_err() {
            return;
        }
    }
}
