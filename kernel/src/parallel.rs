//! Running the parallel magics: `%cluster`, `%px`, `%pxresult`, `%pxconfig`, `%autopx`.
//! Engine output is shown ipyparallel's way: `[stdout:2] …`, `[stderr:0] …`, `Out[1:5]: …`.

use crate::controller::{Controller, TaskEvent};
use crate::iopub::{OutputRoute, Publisher};
use crate::monitor::{Job, JobKind};
use parallax_engine_protocol::{Outcome, StreamName};
use parallax_eval::{CellError, CellOutput};
use parallax_magics::{ClusterCommand, GroupOutputs, PxFlags, Targets};
use serde_json::{json, Map, Value};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// An engine that does not stop within this long after a timeout's interrupt is given up on.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// A blocking `%px` cell that runs longer than this shows a progress block (ipyparallel's
/// default too)...
const PROGRESS_AFTER: f64 = 2.0;
/// ...redrawn at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// One thing an engine produced, kept for grouping and for `%pxresult`.
#[derive(Debug, Clone)]
enum Piece {
    Stream {
        engine: u32,
        name: StreamName,
        text: String,
    },
    Result {
        engine: u32,
        execution_count: u64,
        data: Map<String, Value>,
    },
    Error {
        engine: u32,
        ename: String,
        evalue: String,
        traceback: Vec<String>,
    },
}

impl Piece {
    fn engine(&self) -> u32 {
        match self {
            Piece::Stream { engine, .. }
            | Piece::Result { engine, .. }
            | Piece::Error { engine, .. } => *engine,
        }
    }

    fn publish(&self, publisher: &Publisher, route: &OutputRoute) {
        match self {
            Piece::Stream { engine, name, text } => {
                publish_engine_stream(publisher, route, *engine, *name, text)
            }
            Piece::Result {
                engine,
                execution_count,
                data,
            } => {
                let mut data = data.clone();
                if let Some(Value::String(plain)) = data.get("text/plain") {
                    let shown = format!("Out[{engine}:{execution_count}]: {plain}");
                    data.insert("text/plain".into(), Value::String(shown));
                }
                publisher.publish(
                    route,
                    "display_data",
                    json!({
                        "data": data,
                        "metadata": {"engine": engine, "execution_count": execution_count},
                        "transient": {},
                    }),
                );
            }
            Piece::Error {
                engine,
                ename,
                evalue,
                traceback,
            } => {
                let mut lines = vec![format!("[{engine}:{ename}] {evalue}")];
                lines.extend(traceback.iter().cloned());
                publisher.publish(
                    route,
                    "error",
                    json!({"ename": format!("[{engine}:{ename}]"), "evalue": evalue, "traceback": lines}),
                );
            }
        }
    }
}

/// What a finished job produced.
#[derive(Debug, Clone, Default)]
struct Report {
    pieces: Vec<Piece>,
    targets: Vec<u32>,
}

impl Report {
    fn failures(&self) -> Vec<(u32, &str)> {
        self.pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Error { engine, ename, .. } => Some((*engine, ename.as_str())),
                _ => None,
            })
            .collect()
    }

    fn publish_grouped(&self, group: GroupOutputs, publisher: &Publisher, route: &OutputRoute) {
        let mut pieces = self.pieces.clone();
        match group {
            GroupOutputs::Order => {}
            GroupOutputs::Engine => pieces.sort_by_key(Piece::engine),
            GroupOutputs::Type => pieces.sort_by_key(|p| match p {
                Piece::Stream {
                    name: StreamName::Stdout,
                    engine,
                    ..
                } => (0, *engine),
                Piece::Stream {
                    name: StreamName::Stderr,
                    engine,
                    ..
                } => (1, *engine),
                Piece::Result { engine, .. } => (2, *engine),
                Piece::Error { engine, .. } => (3, *engine),
            }),
        }
        for piece in &pieces {
            piece.publish(publisher, route);
        }
    }

    /// The cell's overall outcome: an error naming every failed engine, if any failed.
    fn outcome(&self) -> Result<CellOutput, CellError> {
        let failures = self.failures();
        if failures.is_empty() {
            return Ok(CellOutput::default());
        }
        let list: Vec<String> = failures
            .iter()
            .map(|(engine, ename)| format!("engine {engine} ({ename})"))
            .collect();
        Err(CellError::plain(
            "EngineError",
            format!(
                "{} of {} engines failed: {}",
                failures.len(),
                self.targets.len(),
                list.join(", ")
            ),
        ))
    }
}

/// A non-blocking job: its report appears when it is done.
struct Pending {
    report: watch::Receiver<Option<Report>>,
}

pub struct Parallel {
    controller: Controller,
    defaults: PxFlags,
    pub autopx: bool,
    pending: Option<Pending>,
}

impl Parallel {
    pub fn new(controller: Controller) -> Self {
        Parallel {
            controller,
            defaults: PxFlags::default(),
            autopx: false,
            pending: None,
        }
    }

    pub fn defaults(&self) -> &PxFlags {
        &self.defaults
    }

    pub async fn cluster(
        &mut self,
        command: ClusterCommand,
        publisher: &Publisher,
        route: &OutputRoute,
    ) -> Result<CellOutput, CellError> {
        let say = |text: String| publisher.stream(route, "stdout", &(text + "\n"));
        match command {
            ClusterCommand::Start { engines } => {
                let live = self.controller.live_engines();
                if !live.is_empty() {
                    return Err(CellError::plain(
                        "UsageError",
                        format!(
                            "{} engines are already running; use %cluster add -n K or %cluster restart",
                            live.len()
                        ),
                    ));
                }
                let count = engines.unwrap_or_else(default_engine_count);
                say(self.start(count).await?);
            }
            ClusterCommand::Add { engines } => say(self.start(engines).await?),
            ClusterCommand::Stop => {
                let stopped = self.controller.stop_all().await;
                say(format!("Stopped {stopped} engines."));
            }
            ClusterCommand::Restart => {
                let count = self.controller.status().len().max(1) as u32;
                let stopped = self.controller.stop_all().await;
                say(format!("Stopped {stopped} engines."));
                say(self.start(count).await?);
            }
            ClusterCommand::Status => say(self.status_table()),
            ClusterCommand::Ping { count } => say(self.ping(count).await?),
        }
        Ok(CellOutput::default())
    }

    async fn start(&self, count: u32) -> Result<String, CellError> {
        let started = Instant::now();
        let ids = self
            .controller
            .start_engines(count)
            .await
            .map_err(|e| CellError::plain("ClusterError", format!("{e:#}")))?;
        let status = self.controller.status();
        let dead: Vec<String> = status
            .iter()
            .filter(|s| {
                ids.contains(&s.id) && matches!(s.state, crate::controller::EngineState::Dead(_))
            })
            .map(|s| format!("engine {} {}", s.id, s.state))
            .collect();
        let ready = ids.len() - dead.len();
        let mut text = format!(
            "Started {ready} engines in {:.1} s (ids {}).",
            started.elapsed().as_secs_f64(),
            ids.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        if !dead.is_empty() {
            text.push_str(&format!(" Failed: {}.", dead.join("; ")));
        }
        Ok(text)
    }

    /// Times round trips of a no-op message to every ready engine: the control path alone,
    /// with no compiling and no cell.
    async fn ping(&self, count: u32) -> Result<String, CellError> {
        let engines = self.controller.ready_engines();
        if engines.is_empty() {
            return Err(CellError::plain(
                "UsageError",
                "no engines; start some with %cluster start [-n N]",
            ));
        }
        let mut times = Vec::with_capacity(count as usize);
        for _ in 0..count {
            match self
                .controller
                .round_trip(&engines, Duration::from_secs(5))
                .await
            {
                Some(took) => times.push(took.as_secs_f64() * 1e3),
                None => {
                    return Err(CellError::plain(
                        "EngineError",
                        "an engine did not answer within 5 s; see %cluster status",
                    ))
                }
            }
        }
        times.sort_by(f64::total_cmp);
        let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
        Ok(format!(
            "Round trip to {} engines (a signed no-op message to each and its answer), {count} times: median {:.3} ms, min {:.3} ms, 95th percentile {:.3} ms.",
            engines.len(),
            at(0.5),
            at(0.0),
            at(0.95),
        ))
    }

    fn status_table(&self) -> String {
        let status = self.controller.status();
        if status.is_empty() {
            return "No engines. Start some with %cluster start [-n N].".to_owned();
        }
        let mut text = format!(
            "{:>6}  {:>8}  {:<12}  {:<10}  {:>9}\n",
            "engine", "pid", "host", "state", "uptime"
        );
        for s in status {
            text.push_str(&format!(
                "{:>6}  {:>8}  {:<12}  {:<10}  {:>8.0}s\n",
                s.id,
                s.pid,
                s.host,
                s.state.to_string(),
                s.uptime.as_secs_f64()
            ));
        }
        let sharing = self.controller.sharing();
        if !sharing.is_empty() {
            text.push_str("Compiled cells:\n");
            for line in sharing {
                text.push_str(&format!("  {line}\n"));
            }
        }
        text.trim_end().to_owned()
    }

    pub fn configure(&mut self, flags: PxFlags, publisher: &Publisher, route: &OutputRoute) {
        if flags != PxFlags::default() {
            self.defaults = flags.over(&self.defaults);
        }
        let d = &self.defaults;
        let text = format!(
            "%px defaults: --targets {} --{} --timeout {} --group-outputs {} {} --progress-after {}\n",
            d.targets.clone().unwrap_or(Targets::All),
            if d.block.unwrap_or(true) {
                "block"
            } else {
                "noblock"
            },
            d.timeout.map_or("none".to_owned(), |t| t.to_string()),
            match d.group_outputs.unwrap_or_default() {
                GroupOutputs::Order => "order",
                GroupOutputs::Engine => "engine",
                GroupOutputs::Type => "type",
            },
            if d.local.unwrap_or(false) {
                "--local"
            } else {
                "--no-local"
            },
            d.progress_after.unwrap_or(PROGRESS_AFTER),
        );
        publisher.stream(route, "stdout", &text);
    }

    /// Runs `code` on the engines the flags select. Blocking: outputs live, result when all
    /// are done. Non-blocking: returns at once; `%pxresult` shows the outputs.
    pub async fn px(
        &mut self,
        flags: &PxFlags,
        code: &str,
        publisher: &Publisher,
        route: &OutputRoute,
    ) -> Result<CellOutput, CellError> {
        let flags = flags.over(&self.defaults);
        let targets = select_engines(&self.controller, &flags.targets)?;
        let timeout = flags.timeout.map(Duration::from_secs_f64);
        let group = flags.group_outputs.unwrap_or_default();
        if !flags.block.unwrap_or(true) {
            let (report_tx, report_rx) = watch::channel(None);
            let controller = self.controller.clone();
            let job_targets = targets.clone();
            let code = code.to_owned();
            tokio::spawn(async move {
                let report = run_job(controller, &job_targets, &code, timeout, None, None).await;
                let _ = report_tx.send(Some(report));
            });
            self.pending = Some(Pending { report: report_rx });
            let ids: Vec<String> = targets.iter().map(u32::to_string).collect();
            publisher.stream(
                route,
                "stdout",
                &format!(
                    "Sent to engines {}; %pxresult shows the outputs.\n",
                    ids.join(", ")
                ),
            );
            return Ok(CellOutput::default());
        }
        let live = (group == GroupOutputs::Order).then(|| (publisher.clone(), route.clone()));
        let progress_after = flags.progress_after.unwrap_or(PROGRESS_AFTER);
        // Grouped outputs come at the end, so the progress block is the only sign of life.
        let progress = (progress_after >= 0.0).then(|| Progress {
            publisher: publisher.clone(),
            route: route.clone(),
            after: Duration::from_secs_f64(progress_after),
        });
        let report = run_job(
            self.controller.clone(),
            &targets,
            code,
            timeout,
            live,
            progress,
        )
        .await;
        if group != GroupOutputs::Order {
            report.publish_grouped(group, publisher, route);
        }
        report.outcome()
    }

    pub async fn px_result(
        &mut self,
        publisher: &Publisher,
        route: &OutputRoute,
    ) -> Result<CellOutput, CellError> {
        let Some(pending) = self.pending.as_mut() else {
            return Err(CellError::plain(
                "UsageError",
                "no non-blocking %px has run yet; use %px --noblock CODE first",
            ));
        };
        let report = loop {
            if let Some(report) = pending.report.borrow().clone() {
                break report;
            }
            if pending.report.changed().await.is_err() {
                return Err(CellError::internal("the non-blocking job was lost"));
            }
        };
        let group = self.defaults.group_outputs.unwrap_or(GroupOutputs::Type);
        report.publish_grouped(group, publisher, route);
        report.outcome()
    }
}

/// Runs `code` on `targets` and collects the report. The engines of a host that are in the same
/// state compile it (and any `:dep` it adds) once, on one of them.
async fn run_job(
    controller: Controller,
    targets: &[u32],
    code: &str,
    timeout: Option<Duration>,
    live: Option<(Publisher, OutputRoute)>,
    progress: Option<Progress>,
) -> Report {
    let job = controller.monitor.job(
        JobKind::Px,
        &cell_label(code),
        targets,
        targets.len() as u64,
        true,
    );
    let (tasks, events) = controller.submit(targets, code).await;
    job.track(&tasks);
    let mut report = collect(&controller, &job, tasks, events, timeout, live, progress).await;
    report.targets = targets.to_vec();
    let failures = report.failures();
    let error = (!failures.is_empty()).then(|| {
        let each: Vec<String> = failures
            .iter()
            .map(|(engine, ename)| format!("engine {engine}: {ename}"))
            .collect();
        each.join(", ")
    });
    job.finish(error);
    report
}

/// A cell's name on the dashboard: its first line that says something.
fn cell_label(code: &str) -> String {
    let line = code
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("//"))
        .unwrap_or("(empty cell)");
    let mut label: String = line.chars().take(60).collect();
    if label.len() < line.len() {
        label.push('…');
    }
    label
}

/// Collects a job's events until every task is done. With `live`, publishes each piece as it
/// arrives. With a timeout, interrupts the tasks still running when it passes.
async fn collect(
    controller: &Controller,
    job: &Job,
    tasks: Vec<(u32, u64)>,
    mut events: mpsc::UnboundedReceiver<TaskEvent>,
    timeout: Option<Duration>,
    live: Option<(Publisher, OutputRoute)>,
    progress: Option<Progress>,
) -> Report {
    let targets: Vec<u32> = tasks.iter().map(|(engine, _)| *engine).collect();
    let mut remaining = tasks.clone();
    let mut report = Report {
        pieces: Vec::new(),
        targets,
    };
    let started = tokio::time::Instant::now();
    let mut deadline = timeout.map(|t| started + t);
    let mut timed_out: Vec<u32> = Vec::new();
    let mut progress = progress.map(|p| PxProgress::new(&report.targets, p));
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    loop {
        if remaining.is_empty() {
            break;
        }
        let received = async {
            match deadline {
                Some(at) => tokio::time::timeout_at(at, events.recv()).await,
                None => Ok(events.recv().await),
            }
        };
        let received = tokio::select! {
            received = received => received,
            _ = tick.tick(), if progress.is_some() => {
                if let Some(progress) = progress.as_mut() {
                    progress.draw(false);
                }
                continue;
            }
        };
        let next = match received {
            Ok(event) => event,
            Err(_) => {
                let still: Vec<(u32, u64)> = remaining.clone();
                if timed_out.is_empty() {
                    // First pass: ask the engines still running to stop.
                    timed_out = still.iter().map(|(e, _)| *e).collect();
                    controller.interrupt(&still).await;
                    deadline = Some(tokio::time::Instant::now() + STOP_GRACE);
                    continue;
                }
                // They did not stop: report them and stop waiting.
                for (engine, _) in still {
                    let piece = Piece::Error {
                        engine,
                        ename: "Timeout".into(),
                        evalue: format!(
                            "engine {engine} was still running after {:.1} s and did not stop",
                            timeout.map_or(0.0, |t| t.as_secs_f64())
                        ),
                        traceback: Vec::new(),
                    };
                    if let Some((publisher, route)) = &live {
                        piece.publish(publisher, route);
                    }
                    report.pieces.push(piece);
                }
                break;
            }
        };
        let Some(event) = next else { break };
        let piece = match event {
            TaskEvent::Stream { engine, name, text } => Piece::Stream { engine, name, text },
            // Data tasks' events; a cell does not produce them.
            TaskEvent::Fetched { .. }
            | TaskEvent::MapReady { .. }
            | TaskEvent::ChunkDone { .. }
            | TaskEvent::ChunkRefused { .. }
            | TaskEvent::ResultType { .. } => continue,
            TaskEvent::Done {
                engine,
                execution_count,
                outcome,
            } => {
                remaining.retain(|(e, _)| *e != engine);
                job.advance(1);
                if let Some(progress) = progress.as_mut() {
                    progress.finished(engine, matches!(outcome, Outcome::Ok { .. }));
                }
                match outcome {
                    Outcome::Ok { data } if data.is_empty() => continue,
                    Outcome::Ok { data } => Piece::Result {
                        engine,
                        execution_count,
                        data,
                    },
                    Outcome::Error {
                        ename,
                        evalue,
                        traceback,
                    } if timed_out.contains(&engine) && ename == "Interrupted" => Piece::Error {
                        engine,
                        ename: "Timeout".into(),
                        evalue: format!(
                            "stopped after {:.1} s: {evalue}",
                            timeout.map_or(0.0, |t| t.as_secs_f64())
                        ),
                        traceback,
                    },
                    Outcome::Error {
                        ename,
                        evalue,
                        traceback,
                    } => Piece::Error {
                        engine,
                        ename,
                        evalue,
                        traceback,
                    },
                }
            }
        };
        if let Some((publisher, route)) = &live {
            piece.publish(publisher, route);
        }
        report.pieces.push(piece);
    }
    if let Some(progress) = progress.as_mut() {
        progress.draw(true);
    }
    report
}

/// Where a blocking cell's progress block goes, and after how long it shows.
#[derive(Clone)]
struct Progress {
    publisher: Publisher,
    route: OutputRoute,
    after: Duration,
}

/// A long `%px` cell's progress block: after a second, which engines are done and how long
/// the others have run, redrawn in place; at the end, a summary.
struct PxProgress {
    to: Progress,
    display_id: String,
    shown: bool,
    started: Instant,
    /// engine -> None while it runs, then (seconds it took, ok).
    engines: std::collections::BTreeMap<u32, Option<(f64, bool)>>,
}

impl PxProgress {
    fn new(targets: &[u32], to: Progress) -> Self {
        PxProgress {
            to,
            display_id: format!("px-progress-{}", uuid::Uuid::new_v4()),
            shown: false,
            started: Instant::now(),
            engines: targets.iter().map(|e| (*e, None)).collect(),
        }
    }

    fn finished(&mut self, engine: u32, ok: bool) {
        let took = self.started.elapsed().as_secs_f64();
        self.engines.insert(engine, Some((took, ok)));
    }

    /// Shows or redraws the block; `last` draws the summary, and only over a block shown.
    fn draw(&mut self, last: bool) {
        if last && !self.shown || !last && self.started.elapsed() < self.to.after {
            return;
        }
        let elapsed = self.started.elapsed().as_secs_f64();
        let done = self.engines.values().filter(|e| e.is_some()).count();
        let failed = self
            .engines
            .values()
            .filter(|e| matches!(e, Some((_, false))))
            .count();
        let total = self.engines.len();
        let mut text = format!("%px: {done} of {total} engines done");
        if failed > 0 {
            text.push_str(&format!(" ({failed} failed)"));
        }
        text.push_str(&format!(", {elapsed:.1} s"));
        let mut rows = String::new();
        for (engine, state) in &self.engines {
            let (what, colour) = match state {
                None => (format!("running {elapsed:.1} s"), "#69c"),
                Some((took, true)) => (format!("done in {took:.1} s"), "#3a7"),
                Some((took, false)) => (format!("failed after {took:.1} s"), "#d22"),
            };
            text.push_str(&format!(" | engine {engine}: {what}"));
            rows.push_str(&format!(
                "<div><span style=\"display:inline-block;width:6em\">engine {engine}</span><span style=\"color:{colour}\">{what}</span></div>"
            ));
        }
        let percent = 100.0 * done as f64 / total.max(1) as f64;
        let html = format!(
            "<div style=\"font-family:monospace;font-size:12px;max-width:40em\">\
             <div>%px: {done} of {total} engines done, {elapsed:.1} s</div>\
             <div style=\"background:#eee;height:8px;margin:4px 0\"><div style=\"width:{percent:.1}%;background:#3a7;height:8px\"></div></div>\
             {rows}</div>"
        );
        let kind = if self.shown {
            "update_display_data"
        } else {
            "display_data"
        };
        self.to.publisher.publish(
            &self.to.route,
            kind,
            json!({
                "data": {"text/plain": text, "text/html": html},
                "metadata": {},
                "transient": {"display_id": self.display_id},
            }),
        );
        self.shown = true;
    }
}

/// The ready engines `targets` selects, or a clear error when there are none.
pub fn select_engines(
    controller: &Controller,
    targets: &Option<Targets>,
) -> Result<Vec<u32>, CellError> {
    let engines = controller.ready_engines();
    if engines.is_empty() {
        return Err(CellError::plain(
            "NoEngines",
            "no engines are running; start some with %cluster start [-n N]",
        ));
    }
    let selected = targets
        .clone()
        .unwrap_or(Targets::All)
        .select(&engines)
        .map_err(|e| CellError::plain("UsageError", e))?;
    if selected.is_empty() {
        return Err(CellError::plain(
            "UsageError",
            "the targets select no engine",
        ));
    }
    Ok(selected)
}

/// Shows what an engine printed, each line prefixed as ipyparallel does: `[stdout:2] …`.
pub fn publish_engine_stream(
    publisher: &Publisher,
    route: &OutputRoute,
    engine: u32,
    name: StreamName,
    text: &str,
) {
    let (label, stream) = match name {
        StreamName::Stdout => ("stdout", "stdout"),
        StreamName::Stderr => ("stderr", "stderr"),
    };
    let prefixed: String = text
        .split_inclusive('\n')
        .map(|line| format!("[{label}:{engine}] {line}"))
        .collect();
    publisher.stream(route, stream, &prefixed);
}

fn default_engine_count() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}
