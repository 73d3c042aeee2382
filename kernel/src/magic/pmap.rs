//! `%pmap`: maps a function over the notebook's items across the engines. Each engine compiles
//! one serving cell for the map (once per host and state, like any cell); the controller's
//! `Scheduler` says which chunk of items goes where; results land in the notebook as one
//! `Vec<R>`, in input order unless `--unordered`.

use super::pmap_report::{self, failures_line, map_error, serve_failure, MapProgress};
use super::progress;
use super::publish_engine_stream;
use super::transfer::{explain_input_error, DataMover};
use crate::controller::scheduler::{Assignment, Scheduler};
use crate::controller::TaskEvent;
use crate::dashboard::jobs::JobKind;
use crate::dashboard::monitor::Job;
use crate::dashboard::monitor::{map_label, Monitor};
use crate::jupyter::iopub::CellOut;

use parallax_engine_protocol::{Outcome, Payload, ToEngine};
use parallax_eval::{cells, CellError, CellOutput};
use parallax_magics::Pmap;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// How long engines get to end a stopped map before they are interrupted.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Runs a map as a job on the dashboard.
pub async fn pmap(
    mover: &DataMover,
    monitor: &Monitor,
    pmap: Pmap,
    out: &CellOut,
) -> Result<CellOutput, CellError> {
    let targets = mover.select(&pmap.flags.targets)?;
    let job = monitor.job(JobKind::Pmap, &map_label(&pmap.func), &targets, 0, true);
    let outcome = run(mover, monitor, pmap, targets, &job, out).await;
    job.finish_as(&outcome);
    outcome
}

/// The map's phases: the engines compile while the notebook's items are taken; once one serves,
/// chunks stream through them; then every serving cell ends and the results are stored.
async fn run(
    mover: &DataMover,
    monitor: &Monitor,
    pmap: Pmap,
    targets: Vec<u32>,
    job: &Job,
    out: &CellOut,
) -> Result<CellOutput, CellError> {
    let started = Instant::now();
    let mut map = MapRun::start(mover, monitor, job, out, pmap, &targets).await?;
    // The notebook's items are taken while the engines compile; if they turn out not to be of
    // the type the function takes, they are taken again, typed as it wants.
    let first_take = {
        let (mover, input, out) = (mover.clone(), map.pmap.input.clone(), out.clone());
        tokio::spawn(async move { mover.take_local(&input, true, None, &out).await })
    };
    let types = map.wait_for_serving().await;
    let items = match types {
        Ok((arg_type, result_type)) => match map.take_items(first_take, &arg_type).await {
            Ok(items) => (items, result_type),
            Err(error) => return Err(map.abandon(error).await),
        },
        Err(error) => {
            let _ = first_take.await;
            return Err(map.abandon(error).await);
        }
    };
    let (items, result_type) = items;
    map.scheduler.set_items(
        items.meta.count,
        items.data.len() as u64,
        map.pmap.flags.chunk,
    );
    job.set_total(items.meta.count);
    // The progress block times the map proper, not the compiling before it.
    map.progress = MapProgress::new(out, &map.pmap.flags.out);
    let map_started = Instant::now();
    let stop = map.run_chunks(&items).await;
    // The map proper: first chunk out to last result in. The rest of the cell is compiling and
    // setting up its cells, reported apart.
    let map_time = map_started.elapsed();
    let error = match stop {
        None => None,
        Some(stop) => Some(map.stop_error(stop).await),
    };
    monitor.set_queued(map.scheduler.first_task(), 0);
    // Every serving cell ends, and says its result type.
    map.end_serving().await;
    map.progress.finish(&map.scheduler, error.is_some());
    if let Some(error) = error {
        return Err(error);
    }
    let setup_time = started.elapsed().saturating_sub(map_time);
    map.store_results(&result_type, map_time, setup_time).await
}

/// Why a map stops before its end.
enum Stop {
    Failed(CellError),
    Interrupted,
    TimedOut,
}

pub(super) struct MapRun<'a> {
    pub(super) mover: &'a DataMover,
    monitor: &'a Monitor,
    pub(super) job: &'a Job,
    pub(super) out: &'a CellOut,
    pub(super) pmap: Pmap,
    /// The function as the messages name it: `square`, or "the closure".
    pub(super) func_label: String,
    events: mpsc::UnboundedReceiver<TaskEvent>,
    /// Where the serving tasks' events go, for engines that join later.
    pub(super) events_tx: mpsc::UnboundedSender<TaskEvent>,
    pub(super) scheduler: Scheduler,
    interrupts: watch::Receiver<u64>,
    cancelled: watch::Receiver<bool>,
    /// The pool's changes: an engine that comes back may serve again.
    pool_changes: watch::Receiver<u64>,
    /// How many times each engine came back to serve this map.
    pub(super) returns: BTreeMap<u32, usize>,
    /// Engines that died during the map (their replacements may serve it).
    pub(super) died: std::collections::BTreeSet<u32>,
    /// Why engines could not serve, for the error when none can.
    pub(super) not_serving: Vec<String>,
    results: Results,
    progress: MapProgress,
}

/// What came back: results by chunk (input order) or as they came, the failed items, and the
/// result type a cell writes.
#[derive(Default)]
struct Results {
    by_chunk: BTreeMap<u64, Payload>,
    as_they_came: Vec<Payload>,
    failed: Vec<(u64, u32, String)>,
    type_src: Option<String>,
}

impl<'a> MapRun<'a> {
    /// Has every target compile and start its serving cell.
    async fn start(
        mover: &'a DataMover,
        monitor: &'a Monitor,
        job: &'a Job,
        out: &'a CellOut,
        pmap: Pmap,
        targets: &[u32],
    ) -> Result<MapRun<'a>, CellError> {
        let interrupts = mover.controller.interrupts();
        let cancelled = job.cancelled();
        // The notebook's context builds the data crate first, so that the engines find its
        // dependencies in evcxr's shared cache instead of all building them at once.
        mover.port().await?;
        let (events_tx, events) = mpsc::unbounded_channel();
        let serving = mover
            .controller
            .start_shared(targets, &events_tx, |_, task, share| {
                let func = pmap.func.clone();
                (ToEngine::Map { task, func, share }, Vec::new())
            })
            .await;
        job.track(&serving);
        let func_label = if pmap.func.starts_with('|') {
            "the closure".to_owned()
        } else {
            format!("`{}`", pmap.func)
        };
        let progress = MapProgress::new(out, &pmap.flags.out);
        Ok(MapRun {
            mover,
            monitor,
            job,
            out,
            pmap,
            func_label,
            events,
            events_tx,
            scheduler: Scheduler::new(&serving),
            interrupts,
            cancelled,
            pool_changes: mover.controller.changes(),
            returns: BTreeMap::new(),
            died: Default::default(),
            not_serving: Vec::new(),
            results: Results::default(),
            progress,
        })
    }

    /// Waits for the first engine to serve, which says what the function takes and returns.
    async fn wait_for_serving(&mut self) -> Result<(String, String), CellError> {
        loop {
            let event = tokio::select! {
                event = self.events.recv() => event,
                _ = stopped(&mut self.interrupts, &mut self.cancelled) => {
                    return Err(CellError::plain("Interrupted", "the map was interrupted before it started"));
                }
            };
            match event {
                Some(TaskEvent::MapReady {
                    engine,
                    arg_type,
                    result_type,
                }) => {
                    self.scheduler.serving(engine);
                    return Ok((arg_type, result_type));
                }
                Some(TaskEvent::Done {
                    engine, outcome, ..
                }) => {
                    self.scheduler.engine_ended(engine);
                    if matches!(&outcome, Outcome::Error { ename, .. } if ename == "EngineDied") {
                        self.died.insert(engine);
                    }
                    let failure = serve_failure(engine, &outcome, &self.func_label);
                    self.not_serving.push(failure);
                    if self.scheduler.all_ended() {
                        return Err(map_error(&self.not_serving, &self.func_label));
                    }
                }
                Some(TaskEvent::Stream { engine, name, text }) => {
                    publish_engine_stream(self.out, engine, name, &text)
                }
                Some(_) => {}
                None => return Err(map_error(&self.not_serving, &self.func_label)),
            }
        }
    }

    /// The notebook's items, typed as the function wants when a literal could be read
    /// otherwise.
    async fn take_items(
        &self,
        first_take: JoinHandle<Result<(Payload, String), CellError>>,
        arg_type: &str,
    ) -> Result<Payload, CellError> {
        let input = &self.pmap.input;
        let hint = cells::type_name_is_source(arg_type).then_some(arg_type);
        let taken = first_take.await.unwrap_or_else(|e| {
            Err(CellError::internal(&format!(
                "taking the items failed: {e}"
            )))
        });
        let fits = matches!(&taken, Ok((items, _)) if items.meta.type_name == arg_type);
        let taken = match hint {
            Some(hint) if !fits => {
                self.mover
                    .take_local(input, true, Some(hint), self.out)
                    .await
            }
            _ => taken,
        };
        match taken {
            Ok((items, _)) if items.meta.type_name == arg_type => Ok(items),
            Ok((_, item_type)) => Err(CellError::plain(
                "TypeMismatch",
                format!(
                    "the items of `{input}` are `{item_type}`, but {} takes `{arg_type}` \
                     on the engines",
                    self.func_label
                ),
            )),
            Err(error) => Err(explain_input_error(error, input, true, hint)),
        }
    }

    /// Streams the chunks through the serving engines until every item is done or the map
    /// stops.
    async fn run_chunks(&mut self, items: &Payload) -> Option<Stop> {
        let deadline = self
            .pmap
            .flags
            .timeout
            .map(|t| tokio::time::Instant::now() + Duration::from_secs_f64(t));
        let mut tick = tokio::time::interval(progress::REDRAW_EVERY);
        self.dispatch(items).await;
        loop {
            if self.scheduler.is_done() {
                return None;
            }
            if self.scheduler.all_ended() {
                let total = self.scheduler.total();
                let lost = total - self.scheduler.finished();
                return Some(Stop::Failed(CellError::plain(
                    "EngineError",
                    format!(
                        "every engine stopped serving the map; {lost} of {total} items were not run"
                    ),
                )));
            }
            let event = tokio::select! {
                event = self.events.recv() => event,
                _ = tick.tick() => {
                    self.progress.update(&self.scheduler);
                    continue;
                }
                Ok(()) = self.pool_changes.changed() => {
                    self.serve_again().await;
                    continue;
                }
                _ = sleep_until(deadline) => return Some(Stop::TimedOut),
                // The engines were told too: each ends its map after the chunk it is on.
                _ = stopped(&mut self.interrupts, &mut self.cancelled) => return Some(Stop::Interrupted),
            };
            let Some(event) = event else {
                let error = CellError::internal("the engines' events stopped");
                return Some(Stop::Failed(error));
            };
            if let Some(stop) = self.on_event(event, items).await {
                return Some(stop);
            }
        }
    }

    /// What one engine's news does to the map.
    async fn on_event(&mut self, event: TaskEvent, items: &Payload) -> Option<Stop> {
        match event {
            TaskEvent::MapReady {
                engine, arg_type, ..
            } => self.on_serving(engine, &arg_type, items).await,
            TaskEvent::ChunkDone {
                engine,
                chunk,
                elapsed_ns,
                failures,
                results,
            } => {
                let finished = self.scheduler.chunk_done(engine, chunk, elapsed_ns)?;
                tracing::debug!(
                    "pmap chunk {chunk}: {} items on engine {engine}, {:.2} ms computing, {:.2} ms round trip",
                    finished.items,
                    elapsed_ns as f64 / 1e6,
                    finished.round_trip.as_secs_f64() * 1e3
                );
                self.job.progress(self.scheduler.finished());
                if self.pmap.flags.unordered {
                    self.results.as_they_came.push(results);
                } else {
                    self.results.by_chunk.insert(chunk, results);
                }
                let failed = failures.into_iter().map(|(i, m)| (i, engine, m));
                self.results.failed.extend(failed);
                // Without --skip-errors the map fails, naming the first failing item: the
                // chunks before it finish first, in case one of them fails too.
                let first = self.results.failed.iter().map(|f| f.0).min();
                if let (false, Some(first)) = (self.pmap.flags.skip_errors, first) {
                    self.scheduler.stop_at(first);
                    if self.scheduler.done_below(first) {
                        return Some(Stop::Failed(self.item_failed()));
                    }
                }
                self.dispatch(items).await;
            }
            TaskEvent::ChunkRefused {
                engine,
                chunk,
                message,
            } => {
                let held = self.scheduler.chunk_refused(engine, chunk);
                let which = held.map_or(String::new(), |(start, end)| {
                    format!(" (items {start}..{end})")
                });
                return Some(Stop::Failed(CellError::plain(
                    "DataError",
                    format!(
                        "engine {engine} could not read the items of chunk {chunk}{which}: {message}"
                    ),
                )));
            }
            TaskEvent::Done {
                engine, outcome, ..
            } => {
                let rerun = self.scheduler.engine_ended(engine)?;
                if let Outcome::Error { ename, evalue, .. } = outcome {
                    if ename == "Interrupted" {
                        return Some(Stop::Interrupted);
                    }
                    self.engine_stopped(engine, ename, evalue, rerun);
                }
                self.dispatch(items).await;
            }
            TaskEvent::Stream { engine, name, text } => {
                publish_engine_stream(self.out, engine, name, &text)
            }
            TaskEvent::ResultType { type_src } => {
                self.results.type_src.get_or_insert(type_src);
            }
            TaskEvent::Fetched { .. } | TaskEvent::Carried { .. } => {}
        }
        None
    }

    /// Another engine serves: it takes chunks if its function takes the same type as the
    /// first one's; otherwise its definition differs and it sits this map out.
    async fn on_serving(&mut self, engine: u32, theirs: &str, items: &Payload) {
        if theirs == items.meta.type_name {
            self.scheduler.serving(engine);
        } else if let Some(worker) = self.scheduler.worker(engine) {
            self.out.stderr(&format!(
                "engine {engine}: {} takes `{theirs}` there, not `{}`; it sits this map out\n",
                self.func_label, items.meta.type_name
            ));
            let end = ToEngine::MapEnd { task: worker.task };
            self.mover.controller.send_to(engine, end, Vec::new()).await;
        }
        self.dispatch(items).await;
    }

    /// An item panicked and errors are not skipped: the map fails, naming the first item.
    fn item_failed(&self) -> CellError {
        let (index, engine, message) = self
            .results
            .failed
            .iter()
            .min_by_key(|(index, ..)| *index)
            .cloned()
            .unwrap_or_default();
        CellError::new(
            "MapError",
            format!("item {index} panicked on engine {engine}: {message}"),
            vec![format!(
                "MapError: {} panicked on item {index} (engine {engine}): {message}\n\
                 Use --skip-errors to go on past failing items.",
                self.func_label
            )],
        )
    }

    /// Sends the chunks the scheduler hands out, and shows how many wait.
    async fn dispatch(&mut self, items: &Payload) {
        for Assignment {
            engine,
            task,
            chunk,
            start,
            end,
        } in self.scheduler.assign()
        {
            let part = items.slice(start, end);
            // An engine of this host reads its items where the notebook wrote them.
            let region = part
                .region()
                .filter(|_| self.mover.controller.is_local(engine));
            let buffers = part.buffers_unless(region.is_some());
            let message = ToEngine::Chunk {
                task,
                chunk,
                start,
                meta: part.wire_meta(),
                region,
            };
            self.mover
                .controller
                .send_to(engine, message, buffers)
                .await;
        }
        // Chunks not sent yet show as queued on the dashboard, under the first serving task.
        let waiting = self.scheduler.queued();
        self.monitor
            .set_queued(self.scheduler.first_task(), waiting);
    }

    /// The error a stopped map ends with; a timed-out map's engines are interrupted.
    async fn stop_error(&mut self, stop: Stop) -> CellError {
        let (done, total) = (self.scheduler.finished(), self.scheduler.total());
        match stop {
            Stop::Failed(error) => error,
            Stop::Interrupted => CellError::plain(
                "Interrupted",
                format!("the map was interrupted with {done} of {total} items done"),
            ),
            Stop::TimedOut => {
                // Interrupting a serving engine ends its map, and interrupts an item only if
                // it runs on.
                let serving = self.scheduler.open_tasks();
                self.mover.controller.interrupt(&serving).await;
                let secs = self.pmap.flags.timeout.unwrap_or_default();
                CellError::plain(
                    "Timeout",
                    format!("the map was stopped after {secs} s with {done} of {total} items done"),
                )
            }
        }
    }

    /// Ends every serving cell and waits for them to finish, keeping the result type one of
    /// them names. Engines that do not end in time are interrupted.
    async fn end_serving(&mut self) {
        let mut open = self.scheduler.open_tasks();
        for &(engine, task) in &open {
            let end = ToEngine::MapEnd { task };
            self.mover.controller.send_to(engine, end, Vec::new()).await;
        }
        let mut deadline = tokio::time::Instant::now() + STOP_GRACE;
        let mut interrupted = false;
        while !open.is_empty() {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(TaskEvent::ResultType { type_src })) => {
                    self.results.type_src.get_or_insert(type_src);
                }
                Ok(Some(TaskEvent::Done { engine, .. })) => open.retain(|(e, _)| *e != engine),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) if !interrupted => {
                    self.mover.controller.interrupt(&open).await;
                    interrupted = true;
                    deadline = tokio::time::Instant::now() + STOP_GRACE;
                }
                Err(_) => break,
            }
        }
    }

    /// Stops a map that never got going and passes on why.
    async fn abandon(&mut self, error: CellError) -> CellError {
        self.end_serving().await;
        error
    }

    /// Stores the results in the notebook (and the failed indices with `--skip-errors`) and
    /// says what came back, from where, and how fast.
    async fn store_results(
        &mut self,
        result_type: &str,
        map_time: Duration,
        setup_time: Duration,
    ) -> Result<CellOutput, CellError> {
        let type_src = pmap_report::result_type(self.results.type_src.clone(), result_type)?;
        let parts: Vec<Payload> = if self.pmap.flags.unordered {
            std::mem::take(&mut self.results.as_they_came)
        } else {
            std::mem::take(&mut self.results.by_chunk)
                .into_values()
                .collect()
        };
        let joined =
            Payload::concat(result_type, &parts).map_err(|e| CellError::plain("DataError", e))?;
        let (result_bytes, stored) = (joined.data.len() as u64, joined.meta.count);
        let out_name = self.pmap.flags.out.clone();
        self.mover
            .store_local(&out_name, &type_src, joined, self.out)
            .await?;
        let mut line = pmap_report::summary(
            &self.scheduler,
            &format!("{out_name}: Vec<{type_src}> with {stored} results"),
            &self.func_label,
            result_bytes,
            (map_time, setup_time),
        );
        if self.pmap.flags.skip_errors {
            line.push_str(&self.store_failures().await?);
        }
        self.out.stdout(&line);
        Ok(CellOutput::default())
    }

    /// With `--skip-errors`: the failed items' indices as `NAME_failed`, and what to say of them.
    async fn store_failures(&mut self) -> Result<String, CellError> {
        let failed = &mut self.results.failed;
        failed.sort_by_key(|(index, ..)| *index);
        let name = format!("{}_failed", self.pmap.flags.out);
        let indices: Vec<u64> = failed.iter().map(|(index, ..)| *index).collect();
        let first = failed.first().cloned();
        self.mover
            .store_local(&name, "usize", Payload::usizes(&indices), self.out)
            .await?;
        Ok(first.map_or(String::new(), |first| failures_line(&name, &indices, first)))
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
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
