//! `%pmap`: maps a function over the notebook's items across the engines. Each engine compiles
//! one serving cell for the map and streams chunks of items through it; chunks go to whichever
//! engine has room, their size follows the measured cost of an item, and the chunks of an engine
//! that dies are run again on the others. Results land in the notebook as one `Vec<R>`.

use crate::controller::TaskEvent;
use crate::data::{explain_input_error, human_bytes, list, DataMover};
use crate::iopub::{OutputRoute, Publisher};
use crate::monitor::{Job, JobKind};
use crate::parallel::publish_engine_stream;
use bytes::Bytes;
use parallax_engine::payload_buffers;
use parallax_engine_protocol::{Outcome, ToEngine};
use parallax_eval::{cells, CellError, CellOutput, Payload};
use parallax_magics::Pmap;
use serde_json::json;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Chunks each engine holds at once: one running, one waiting, so it never idles on the wire.
const IN_FLIGHT: usize = 2;
/// Items in the first chunks, before anything is measured.
const PROBE_ITEMS: u64 = 16;
/// The compute time a chunk aims at: long enough to hide the per-chunk cost, short enough to
/// balance the load.
const CHUNK_TARGET: Duration = Duration::from_millis(50);
/// Chunks stay below this many bytes of input.
const CHUNK_BYTES: u64 = 16 << 20;
/// The progress display appears once a map has run this long.
const PROGRESS_AFTER: Duration = Duration::from_secs(1);
/// The progress display is updated at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// How long engines get to end a stopped map before they are interrupted.
const STOP_GRACE: Duration = Duration::from_secs(10);

struct Chunk {
    start: u64,
    end: u64,
    /// The engine running it, if any.
    engine: Option<u32>,
    done: bool,
    /// When it was last sent, for the debug log of round trips.
    sent: Instant,
}

struct Worker {
    task: u64,
    /// Serving, and answering.
    ready: bool,
    /// Its serving cell ended (or it died).
    ended: bool,
    in_flight: Vec<u64>,
    items_done: u64,
}

/// Why a map stops before its end.
enum Stop {
    Failed(CellError),
    Interrupted,
    TimedOut,
}

struct Progress {
    display_id: String,
    shown: bool,
    last: Instant,
}

/// Runs a map as a job on the dashboard.
pub async fn pmap(
    mover: &DataMover,
    pmap: Pmap,
    publisher: &Publisher,
    route: &OutputRoute,
) -> Result<CellOutput, CellError> {
    let targets = mover.select(&pmap.flags.targets)?;
    let job = mover.controller.monitor.job(
        JobKind::Pmap,
        &crate::controller::map_label(&pmap.func),
        &targets,
        0,
        true,
    );
    let outcome = run_map(mover, pmap, targets, &job, publisher, route).await;
    job.finish_as(&outcome);
    outcome
}

async fn run_map(
    mover: &DataMover,
    pmap: Pmap,
    targets: Vec<u32>,
    job: &Job,
    publisher: &Publisher,
    route: &OutputRoute,
) -> Result<CellOutput, CellError> {
    let started = Instant::now();
    let mut interrupts = mover.controller.interrupts();
    let mut cancelled = job.cancelled();
    // The notebook's context builds the data crate first, so that the engines find its
    // dependencies in evcxr's shared cache instead of all building them at once.
    mover.port().await?;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut workers: BTreeMap<u32, Worker> = BTreeMap::new();
    let serving = mover
        .controller
        .start_shared(&targets, &events_tx, |_, task, share| {
            let func = pmap.func.clone();
            (ToEngine::Map { task, func, share }, Vec::new())
        })
        .await;
    job.track(&serving);
    for (engine, task) in serving {
        workers.insert(
            engine,
            Worker {
                task,
                ready: false,
                ended: false,
                in_flight: Vec::new(),
                items_done: 0,
            },
        );
    }
    drop(events_tx);
    let func_label = if pmap.func.starts_with('|') {
        "the closure".to_owned()
    } else {
        format!("`{}`", pmap.func)
    };

    // The notebook's items are taken while the engines compile; if they turn out not to be of
    // the type the function takes, they are taken again below, typed as it wants.
    let first_take = {
        let (mover, input) = (mover.clone(), pmap.input.clone());
        let (publisher, route) = (publisher.clone(), route.clone());
        tokio::spawn(async move {
            mover
                .take_local(&input, true, None, &publisher, &route)
                .await
        })
    };

    // The first engine to serve says what the function takes and returns.
    let mut not_serving: Vec<String> = Vec::new();
    let (arg_type, result_type) = loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = stopped(&mut interrupts, &mut cancelled) => {
                let _ = first_take.await;
                let error = CellError::plain("Interrupted", "the map was interrupted before it started");
                return Err(abandon(mover, &workers, &mut events, error).await);
            }
        };
        match event {
            Some(TaskEvent::MapReady {
                engine,
                arg_type,
                result_type,
            }) => {
                if let Some(worker) = workers.get_mut(&engine) {
                    worker.ready = true;
                }
                break (arg_type, result_type);
            }
            Some(TaskEvent::Done {
                engine, outcome, ..
            }) => {
                if let Some(worker) = workers.get_mut(&engine) {
                    worker.ended = true;
                }
                not_serving.push(serve_failure(engine, &outcome, &func_label));
                if workers.values().all(|w| w.ended) {
                    let _ = first_take.await;
                    return Err(map_error(&not_serving, &func_label));
                }
            }
            Some(TaskEvent::Stream { engine, name, text }) => {
                publish_engine_stream(publisher, route, engine, name, &text)
            }
            Some(_) => {}
            None => {
                let _ = first_take.await;
                return Err(map_error(&not_serving, &func_label));
            }
        }
    };

    // The notebook's items, typed as the function wants when a literal could be read otherwise.
    let hint = cells::type_name_is_source(&arg_type).then_some(arg_type.as_str());
    let taken = first_take.await.unwrap_or_else(|e| {
        Err(CellError::internal(&format!(
            "taking the items failed: {e}"
        )))
    });
    let fits = matches!(&taken, Ok((items, _)) if items.meta.type_name == arg_type);
    let taken = match hint {
        Some(hint) if !fits => {
            mover
                .take_local(&pmap.input, true, Some(hint), publisher, route)
                .await
        }
        _ => taken,
    };
    let items = match taken {
        Ok((items, _)) if items.meta.type_name == arg_type => items,
        Ok((_, item_type)) => {
            let error = CellError::plain(
                "TypeMismatch",
                format!(
                    "the items of `{}` are `{item_type}`, but {func_label} takes `{arg_type}` \
                     on the engines",
                    pmap.input
                ),
            );
            return Err(abandon(mover, &workers, &mut events, error).await);
        }
        Err(error) => {
            let error = explain_input_error(error, &pmap.input, true, hint);
            return Err(abandon(mover, &workers, &mut events, error).await);
        }
    };

    let total = items.meta.count;
    job.set_total(total);
    let bytes_per_item = (items.data.len() as u64)
        .checked_div(total)
        .unwrap_or(1)
        .max(1);
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut retry: VecDeque<u64> = VecDeque::new();
    let mut next_start = 0u64;
    let mut cost_ns: Option<f64> = None;
    let mut results: BTreeMap<u64, Payload> = BTreeMap::new();
    let mut completion_order: Vec<Payload> = Vec::new();
    let mut failed: Vec<(u64, u32, String)> = Vec::new();
    let mut items_finished = 0u64;
    let mut result_type_src: Option<String> = None;
    let mut progress = Progress {
        display_id: format!("pmap-{}", uuid::Uuid::new_v4()),
        shown: false,
        last: Instant::now(),
    };
    let map_started = Instant::now();
    let deadline = pmap
        .flags
        .timeout
        .map(|t| tokio::time::Instant::now() + Duration::from_secs_f64(t));
    let mut tick = tokio::time::interval(PROGRESS_EVERY);

    // Hands out chunks to every serving engine with room.
    macro_rules! fill {
        () => {{
            let serving: Vec<u32> = workers
                .iter()
                .filter(|(_, w)| w.ready && !w.ended)
                .map(|(id, _)| *id)
                .collect();
            let engines = serving.len().max(1) as u64;
            for engine in serving {
                while workers[&engine].in_flight.len() < IN_FLIGHT {
                    let chunk = match retry.pop_front() {
                        Some(chunk) => chunk,
                        None if next_start < total => {
                            let size = chunk_size(
                                pmap.flags.chunk,
                                cost_ns,
                                total - next_start,
                                engines,
                                bytes_per_item,
                            );
                            let end = (next_start + size).min(total);
                            chunks.push(Chunk {
                                start: next_start,
                                end,
                                engine: None,
                                done: false,
                                sent: Instant::now(),
                            });
                            next_start = end;
                            chunks.len() as u64 - 1
                        }
                        None => break,
                    };
                    let spec = &mut chunks[chunk as usize];
                    spec.engine = Some(engine);
                    spec.sent = Instant::now();
                    let part = items.slice(spec.start, spec.end);
                    let worker = workers.get_mut(&engine).expect("a serving engine");
                    worker.in_flight.push(chunk);
                    let message = ToEngine::Chunk {
                        task: worker.task,
                        chunk,
                        start: spec.start,
                        meta: part.meta.clone().into(),
                    };
                    mover
                        .controller
                        .send_to(engine, message, payload_buffers(&part))
                        .await;
                }
            }
        }};
    }

    // Chunks not sent yet show as queued on the dashboard, under the first serving task.
    let queue_key = workers.values().map(|w| w.task).min().unwrap_or_default();
    macro_rules! report_queue {
        () => {{
            let last_size = chunks.last().map_or(1, |c| (c.end - c.start).max(1));
            let waiting = retry.len() as u64 + (total - next_start).div_ceil(last_size);
            mover.controller.monitor.set_queued(queue_key, waiting);
        }};
    }
    fill!();
    report_queue!();
    let stop: Option<Stop> = loop {
        if items_finished == total {
            break None;
        }
        if workers.values().all(|w| w.ended) {
            let lost = total - items_finished;
            break Some(Stop::Failed(CellError::plain(
                "EngineError",
                format!(
                    "every engine stopped serving the map; {lost} of {total} items were not run"
                ),
            )));
        }
        let event = tokio::select! {
            event = events.recv() => event,
            _ = tick.tick() => {
                show_progress(&mut progress, publisher, route, &pmap, &workers, items_finished, total, map_started);
                continue;
            }
            _ = sleep_until(deadline) => break Some(Stop::TimedOut),
            // The engines were told too: each ends its map after the chunk it is on.
            _ = stopped(&mut interrupts, &mut cancelled) => break Some(Stop::Interrupted),
        };
        let Some(event) = event else {
            break Some(Stop::Failed(CellError::internal(
                "the engines' events stopped",
            )));
        };
        match event {
            TaskEvent::MapReady {
                engine,
                arg_type: theirs,
                ..
            } => {
                if theirs == arg_type {
                    if let Some(worker) = workers.get_mut(&engine) {
                        worker.ready = true;
                    }
                } else {
                    // Its definition differs from the others': it sits this map out.
                    publisher.stream(
                        route,
                        "stderr",
                        &format!("engine {engine}: {func_label} takes `{theirs}` there, not `{arg_type}`; it sits this map out\n"),
                    );
                    if let Some(worker) = workers.get(&engine) {
                        mover
                            .controller
                            .send_to(engine, ToEngine::MapEnd { task: worker.task }, Vec::new())
                            .await;
                    }
                }
                fill!();
            }
            TaskEvent::ChunkDone {
                engine,
                chunk,
                elapsed_ns,
                failures,
                results: part,
            } => {
                let Some(spec) = chunks.get_mut(chunk as usize) else {
                    continue;
                };
                if spec.done || spec.engine != Some(engine) {
                    continue;
                }
                spec.done = true;
                let count = spec.end - spec.start;
                tracing::debug!(
                    "pmap chunk {chunk}: {count} items on engine {engine}, {:.2} ms computing, {:.2} ms round trip",
                    elapsed_ns as f64 / 1e6,
                    spec.sent.elapsed().as_secs_f64() * 1e3
                );
                items_finished += count;
                job.progress(items_finished);
                if count > 0 {
                    let per_item = elapsed_ns as f64 / count as f64;
                    cost_ns = Some(match cost_ns {
                        Some(old) => 0.5 * old + 0.5 * per_item,
                        None => per_item,
                    });
                }
                if let Some(worker) = workers.get_mut(&engine) {
                    worker.in_flight.retain(|c| *c != chunk);
                    worker.items_done += count;
                }
                if pmap.flags.unordered {
                    completion_order.push(part);
                } else {
                    results.insert(chunk, part);
                }
                if !failures.is_empty() {
                    if !pmap.flags.skip_errors {
                        let (index, message) = failures
                            .iter()
                            .min_by_key(|(index, _)| *index)
                            .cloned()
                            .unwrap_or_default();
                        break Some(Stop::Failed(CellError::new(
                            "MapError",
                            format!("item {index} panicked on engine {engine}: {message}"),
                            vec![format!(
                                "MapError: {func_label} panicked on item {index} (engine {engine}): {message}\n\
                                 Use --skip-errors to go on past failing items."
                            )],
                        )));
                    }
                    failed.extend(failures.into_iter().map(|(i, m)| (i, engine, m)));
                }
                fill!();
                report_queue!();
            }
            TaskEvent::ChunkRefused {
                engine,
                chunk,
                message,
            } => {
                break Some(Stop::Failed(CellError::plain(
                    "DataError",
                    format!("engine {engine} could not read the items of chunk {chunk}: {message}"),
                )));
            }
            TaskEvent::Done {
                engine, outcome, ..
            } => {
                let Some(worker) = workers.get_mut(&engine) else {
                    continue;
                };
                worker.ended = true;
                let orphans = std::mem::take(&mut worker.in_flight);
                for &chunk in &orphans {
                    chunks[chunk as usize].engine = None;
                    retry.push_back(chunk);
                }
                match outcome {
                    Outcome::Error { ename, .. } if ename == "Interrupted" => {
                        break Some(Stop::Interrupted)
                    }
                    Outcome::Error { ename, evalue, .. } => {
                        let rerun = if orphans.is_empty() {
                            String::new()
                        } else {
                            format!("; its {} chunks run again on the others", orphans.len())
                        };
                        let why = if worker.ready {
                            "stopped"
                        } else {
                            "cannot serve"
                        };
                        publisher.stream(
                            route,
                            "stderr",
                            &format!("[{ename}] engine {engine} {why}: {evalue}{rerun}\n"),
                        );
                        if !worker.ready {
                            not_serving.push(serve_failure(
                                engine,
                                &Outcome::Error {
                                    ename,
                                    evalue,
                                    traceback: Vec::new(),
                                },
                                &func_label,
                            ));
                        }
                    }
                    Outcome::Ok { .. } => {}
                }
                fill!();
            }
            TaskEvent::Stream { engine, name, text } => {
                publish_engine_stream(publisher, route, engine, name, &text)
            }
            TaskEvent::ResultType { type_src, .. } => {
                result_type_src.get_or_insert(type_src);
            }
            TaskEvent::Fetched { .. } => {}
        }
    };

    // The map proper: first chunk out to last result in. The rest of the cell is compiling and
    // setting up its cells, reported apart.
    let map_time = map_started.elapsed();
    let error = match stop {
        None => None,
        Some(Stop::Failed(error)) => Some(error),
        Some(Stop::Interrupted) => Some(CellError::plain(
            "Interrupted",
            format!("the map was interrupted with {items_finished} of {total} items done"),
        )),
        Some(Stop::TimedOut) => {
            let secs = pmap.flags.timeout.unwrap_or_default();
            // Interrupting a serving engine ends its map, and interrupts an item only if it
            // runs on.
            let serving: Vec<(u32, u64)> = workers
                .iter()
                .filter(|(_, w)| !w.ended)
                .map(|(id, w)| (*id, w.task))
                .collect();
            mover.controller.interrupt(&serving).await;
            Some(CellError::plain(
                "Timeout",
                format!("the map was stopped after {secs} s with {items_finished} of {total} items done"),
            ))
        }
    };
    mover.controller.monitor.set_queued(queue_key, 0);
    // Every serving cell ends, and says its result type.
    let result_type_src = finish(mover, &workers, &mut events, result_type_src).await;
    if progress.shown {
        let summary = summary_text(
            &pmap,
            &workers,
            items_finished,
            total,
            map_started,
            error.is_some(),
        );
        publish_progress(
            &progress,
            publisher,
            route,
            "update_display_data",
            &summary,
            items_finished,
            total,
            &workers,
        );
    }
    if let Some(error) = error {
        return Err(error);
    }
    let Some(type_src) = result_type_src else {
        return Err(CellError::internal("no engine named the map's result type"));
    };
    let parts: Vec<Payload> = if pmap.flags.unordered {
        completion_order
    } else {
        results.into_values().collect()
    };
    let joined =
        Payload::concat(&result_type, &parts).map_err(|e| CellError::plain("DataError", e))?;
    let result_bytes = joined.data.len() as u64;
    let stored = joined.meta.count;
    mover
        .store_local(&pmap.flags.out, &type_src, joined, publisher, route)
        .await?;
    let setup_time = started.elapsed().saturating_sub(map_time);
    let mut line = format!(
        "{}: Vec<{type_src}> with {stored} results of {func_label} ({}) from engines {}: map {:.3} s, {} items/s (compiling and set-up {:.2} s apart)\n",
        pmap.flags.out,
        human_bytes(result_bytes),
        list(&workers.keys().copied().collect::<Vec<_>>()),
        map_time.as_secs_f64(),
        rate(total, map_time),
        setup_time.as_secs_f64(),
    );
    if pmap.flags.skip_errors {
        failed.sort_by_key(|(index, ..)| *index);
        let name = format!("{}_failed", pmap.flags.out);
        let indices: Vec<u64> = failed.iter().map(|(index, ..)| *index).collect();
        mover
            .store_local(&name, "usize", usize_payload(&indices), publisher, route)
            .await?;
        if !failed.is_empty() {
            let shown: Vec<String> = indices.iter().take(20).map(u64::to_string).collect();
            let more = if indices.len() > 20 { ", …" } else { "" };
            line.push_str(&format!(
                "{} items failed and were skipped (indices in {name}): {}{more}\n",
                failed.len(),
                shown.join(", ")
            ));
            if let Some((index, engine, message)) = failed.first() {
                line.push_str(&format!(
                    "first failure: item {index} on engine {engine}: {message}\n"
                ));
            }
        }
    }
    publisher.stream(route, "stdout", &line);
    Ok(CellOutput::default())
}

/// How many items the next chunk gets.
fn chunk_size(
    fixed: Option<u64>,
    cost_ns: Option<f64>,
    remaining: u64,
    engines: u64,
    bytes_per_item: u64,
) -> u64 {
    if let Some(fixed) = fixed {
        return fixed.max(1);
    }
    // Leave enough chunks for every engine near the end, so that none waits on a big last one.
    let spread = remaining.div_ceil(2 * engines).max(1);
    let by_bytes = (CHUNK_BYTES / bytes_per_item).max(1);
    let wanted = match cost_ns {
        None => PROBE_ITEMS,
        Some(cost) => (CHUNK_TARGET.as_nanos() as f64 / cost.max(1.0)) as u64,
    };
    wanted.clamp(1, spread.min(by_bytes))
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Ends every serving cell and waits for them to finish; returns the result type one of them
/// named. Engines that do not end in time are interrupted.
async fn finish(
    mover: &DataMover,
    workers: &BTreeMap<u32, Worker>,
    events: &mut mpsc::UnboundedReceiver<TaskEvent>,
    mut result_type: Option<String>,
) -> Option<String> {
    let mut open: Vec<(u32, u64)> = workers
        .iter()
        .filter(|(_, w)| !w.ended)
        .map(|(id, w)| (*id, w.task))
        .collect();
    for &(engine, task) in &open {
        mover
            .controller
            .send_to(engine, ToEngine::MapEnd { task }, Vec::new())
            .await;
    }
    let mut deadline = tokio::time::Instant::now() + STOP_GRACE;
    let mut interrupted = false;
    while !open.is_empty() {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(TaskEvent::ResultType { type_src, .. })) => {
                result_type.get_or_insert(type_src);
            }
            Ok(Some(TaskEvent::Done { engine, .. })) => open.retain(|(e, _)| *e != engine),
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) if !interrupted => {
                mover.controller.interrupt(&open).await;
                interrupted = true;
                deadline = tokio::time::Instant::now() + STOP_GRACE;
            }
            Err(_) => break,
        }
    }
    result_type
}

/// Stops a map that never got going and passes on why.
async fn abandon(
    mover: &DataMover,
    workers: &BTreeMap<u32, Worker>,
    events: &mut mpsc::UnboundedReceiver<TaskEvent>,
    error: CellError,
) -> CellError {
    finish(mover, workers, events, None).await;
    error
}

fn serve_failure(engine: u32, outcome: &Outcome, func_label: &str) -> String {
    match outcome {
        Outcome::Error { ename, evalue, .. } => format!("engine {engine}: [{ename}] {evalue}"),
        Outcome::Ok { .. } => format!("engine {engine}: ended before serving {func_label}"),
    }
}

/// Why no engine could serve the map, with a hint for the usual causes.
fn map_error(failures: &[String], func_label: &str) -> CellError {
    let all = failures.join("\n");
    let hint = if all.contains("cannot find") {
        format!("{func_label} is not defined on the engines; define it there first, with %%px")
    } else if all.contains("Serialize") || all.contains("Deserialize") {
        format!(
            "the argument and result of {func_label} must implement serde's Serialize and \
             Deserialize; derive them with #[derive(serde::Serialize, serde::Deserialize)]"
        )
    } else if all.contains("type annotations needed") {
        "give the closure's argument a type, as in |x: u64| x * x".to_owned()
    } else {
        format!("no engine could run {func_label} as a map")
    };
    CellError::new(
        "MapError",
        format!("{hint}\n{all}"),
        vec![format!("MapError: {hint}\n"), all],
    )
}

fn usize_payload(values: &[u64]) -> Payload {
    let mut data = Vec::with_capacity(values.len() * 8);
    for value in values {
        data.extend_from_slice(&value.to_le_bytes());
    }
    Payload {
        meta: parallax_data::Meta {
            type_name: "usize".into(),
            count: values.len() as u64,
            width: 8,
            elem_width: 0,
        },
        ends: Vec::new(),
        data: Bytes::from(data),
    }
}

fn rate(items: u64, elapsed: Duration) -> String {
    let per_second = items as f64 / elapsed.as_secs_f64().max(1e-9);
    if per_second >= 1e6 {
        format!("{:.2} M", per_second / 1e6)
    } else if per_second >= 1e3 {
        format!("{:.1} k", per_second / 1e3)
    } else {
        format!("{per_second:.1}")
    }
}

#[allow(clippy::too_many_arguments)]
fn show_progress(
    progress: &mut Progress,
    publisher: &Publisher,
    route: &OutputRoute,
    pmap: &Pmap,
    workers: &BTreeMap<u32, Worker>,
    done: u64,
    total: u64,
    started: Instant,
) {
    if started.elapsed() < PROGRESS_AFTER || progress.last.elapsed() < PROGRESS_EVERY {
        return;
    }
    let text = summary_text(pmap, workers, done, total, started, false);
    let kind = if progress.shown {
        "update_display_data"
    } else {
        "display_data"
    };
    publish_progress(
        progress, publisher, route, kind, &text, done, total, workers,
    );
    progress.shown = true;
    progress.last = Instant::now();
}

fn summary_text(
    pmap: &Pmap,
    workers: &BTreeMap<u32, Worker>,
    done: u64,
    total: u64,
    started: Instant,
    stopped: bool,
) -> String {
    let elapsed = started.elapsed();
    let per_second = done as f64 / elapsed.as_secs_f64().max(1e-9);
    let eta = if done > 0 && done < total {
        format!(", ETA {:.1} s", (total - done) as f64 / per_second)
    } else {
        String::new()
    };
    let engines: Vec<String> = workers
        .iter()
        .map(|(id, w)| {
            let state = if w.ended && done < total {
                " (gone)"
            } else {
                ""
            };
            format!("{id}: {}{state}", w.items_done)
        })
        .collect();
    let status = if stopped {
        "stopped"
    } else if done == total {
        "done"
    } else {
        "running"
    };
    format!(
        "%pmap -> {} {status}: {done}/{total} items ({:.0}%), {} items/s, {:.1} s{eta}; per engine {}",
        pmap.flags.out,
        100.0 * done as f64 / total.max(1) as f64,
        rate(done, elapsed),
        elapsed.as_secs_f64(),
        engines.join(", ")
    )
}

#[allow(clippy::too_many_arguments)]
fn publish_progress(
    progress: &Progress,
    publisher: &Publisher,
    route: &OutputRoute,
    kind: &str,
    text: &str,
    done: u64,
    total: u64,
    workers: &BTreeMap<u32, Worker>,
) {
    let percent = 100.0 * done as f64 / total.max(1) as f64;
    let rows: String = workers
        .iter()
        .map(|(id, w)| {
            let share = 100.0 * w.items_done as f64 / total.max(1) as f64;
            format!(
                "<div style=\"display:flex;align-items:center;gap:6px\"><span style=\"width:5em\">engine {id}</span>\
                 <div style=\"flex:1;background:#eee;height:6px\"><div style=\"width:{share:.1}%;background:#69c;height:6px\"></div></div>\
                 <span style=\"width:7em;text-align:right\">{}</span></div>",
                w.items_done
            )
        })
        .collect();
    let html = format!(
        "<div style=\"font-family:monospace;font-size:12px;max-width:40em\">\
         <div>{}</div>\
         <div style=\"background:#eee;height:10px;margin:4px 0\"><div style=\"width:{percent:.1}%;background:#3a7;height:10px\"></div></div>\
         {rows}</div>",
        html_escape(text)
    );
    publisher.publish(
        route,
        kind,
        json!({
            "data": {"text/plain": text, "text/html": html},
            "metadata": {},
            "transient": {"display_id": progress.display_id},
        }),
    );
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Fires when the kernel's stop button is pressed or the dashboard interrupts this job.
async fn stopped(interrupts: &mut watch::Receiver<u64>, cancelled: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = interrupts.changed() => {}
        _ = cancel_requested(cancelled) => {}
    }
}

async fn cancel_requested(cancelled: &mut watch::Receiver<bool>) {
    let ended = cancelled.wait_for(|c| *c).await.is_err();
    if ended {
        // The job has ended, so nobody can cancel it any more.
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_follow_cost_and_spread_the_tail() {
        // Nothing measured: a small probe.
        assert_eq!(chunk_size(None, None, 1_000_000, 2, 8), PROBE_ITEMS);
        // Cheap items: big chunks, but the remainder is left for both engines.
        assert_eq!(chunk_size(None, Some(5.0), 1_000_000, 2, 8), 250_000);
        // 10 ms items: five a chunk, to stay near 50 ms.
        assert_eq!(chunk_size(None, Some(10e6), 400, 2, 8), 5);
        // Very heavy items: one a chunk.
        assert_eq!(chunk_size(None, Some(1e9), 400, 2, 8), 1);
        // Big items: under the byte cap.
        assert_eq!(chunk_size(None, Some(5.0), 1_000_000, 1, 1 << 20), 16);
        // A fixed size wins.
        assert_eq!(chunk_size(Some(7), Some(5.0), 3, 2, 8), 7);
        // The last items still go out.
        assert_eq!(chunk_size(None, Some(5.0), 1, 2, 8), 1);
    }

    #[test]
    fn missing_functions_are_named() {
        let error = map_error(
            &["engine 0: [CompileError] cannot find value `nope` in this scope".into()],
            "`nope`",
        );
        assert!(error
            .evalue
            .contains("`nope` is not defined on the engines"));
        assert!(error.evalue.contains("engine 0"));
    }
}
