//! `%px`/`%%px`, `%pxresult`, `%pxconfig` and `%autopx`: a cell sent to the engines, its
//! outputs shown ipyparallel's way (`[stdout:2] …`, `[stderr:0] …`, `Out[1:5]: …`), live or
//! grouped, with a progress block when it runs long.

use super::progress::{self, ProgressBlock};
use super::{publish_engine_stream, select_engines};
use crate::controller::{collect, Controller, JobView, Piece, Report};
use crate::dashboard::jobs::JobKind;
use crate::dashboard::monitor::Job;
use crate::dashboard::monitor::Monitor;
use crate::jupyter::iopub::CellOut;
use crate::text::engine_list;
use parallax_eval::{CellError, CellOutput};
use parallax_magics::{GroupOutputs, PxFlags, Targets};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::watch;

/// The state of the `%px` family: its defaults, `%autopx`, and the last non-blocking job.
pub struct Px {
    controller: Controller,
    monitor: Monitor,
    defaults: PxFlags,
    pub autopx: bool,
    /// A non-blocking job's report appears here when it is done.
    pending: Option<watch::Receiver<Option<Report>>>,
}

impl Px {
    pub fn new(controller: Controller, monitor: Monitor) -> Self {
        Px {
            controller,
            monitor,
            defaults: PxFlags::default(),
            autopx: false,
            pending: None,
        }
    }

    pub fn defaults(&self) -> &PxFlags {
        &self.defaults
    }

    /// `%autopx`: every following cell goes to the engines, until run again.
    pub fn toggle_autopx(&mut self, out: &CellOut) {
        self.autopx = !self.autopx;
        let state = if self.autopx {
            "on: every cell now runs on the engines (run %autopx again to stop)"
        } else {
            "off: cells run in the notebook's own context again"
        };
        out.stdout(&format!("%autopx is {state}\n"));
    }

    /// `%pxconfig`: sets defaults and says what they are.
    pub fn configure(&mut self, flags: PxFlags, out: &CellOut) {
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
            d.progress_after
                .unwrap_or(progress::PX_AFTER.as_secs_f64()),
        );
        out.stdout(&text);
    }

    /// Runs `code` on the engines the flags select. Blocking: outputs live, result when all
    /// are done. Non-blocking: returns at once; `%pxresult` shows the outputs.
    pub async fn px(
        &mut self,
        flags: &PxFlags,
        code: &str,
        out: &CellOut,
    ) -> Result<CellOutput, CellError> {
        let flags = flags.over(&self.defaults);
        let targets = select_engines(&self.controller, &flags.targets)?;
        let timeout = flags.timeout.map(Duration::from_secs_f64);
        let group = flags.group_outputs.unwrap_or_default();
        if !flags.block.unwrap_or(true) {
            let (report_tx, report_rx) = watch::channel(None);
            let run = Run::new(self, &targets, code, timeout);
            tokio::spawn(async move {
                let report = run.go(&mut ()).await;
                let _ = report_tx.send(Some(report));
            });
            self.pending = Some(report_rx);
            out.stdout(&format!(
                "Sent to engines {}; %pxresult shows the outputs.\n",
                engine_list(&targets)
            ));
            return Ok(CellOutput::default());
        }
        let after = flags
            .progress_after
            .unwrap_or(progress::PX_AFTER.as_secs_f64());
        // Grouped outputs come at the end, so the progress block is the only sign of life.
        let mut view = LiveView {
            out: out.clone(),
            live: group == GroupOutputs::Order,
            progress: PxProgress::new(out, &targets, after),
        };
        let report = Run::new(self, &targets, code, timeout).go(&mut view).await;
        if group != GroupOutputs::Order {
            publish_grouped(&report, group, out);
        }
        outcome(&report)
    }

    /// `%pxresult`: the outputs of the last non-blocking `%px`, once it is done.
    pub async fn px_result(&mut self, out: &CellOut) -> Result<CellOutput, CellError> {
        let Some(pending) = self.pending.as_mut() else {
            return Err(CellError::plain(
                "UsageError",
                "no non-blocking %px has run yet; use %px --noblock CODE first",
            ));
        };
        let report = loop {
            if let Some(report) = pending.borrow().clone() {
                break report;
            }
            if pending.changed().await.is_err() {
                return Err(CellError::internal("the non-blocking job was lost"));
            }
        };
        let group = self.defaults.group_outputs.unwrap_or(GroupOutputs::Type);
        publish_grouped(&report, group, out);
        outcome(&report)
    }
}

/// One `%px` job: a cell on some engines, compiled once per host and state, as a job on the
/// dashboard.
struct Run {
    controller: Controller,
    job: Job,
    targets: Vec<u32>,
    code: String,
    timeout: Option<Duration>,
}

impl Run {
    fn new(px: &Px, targets: &[u32], code: &str, timeout: Option<Duration>) -> Self {
        let label = cell_label(code);
        let total = targets.len() as u64;
        Run {
            controller: px.controller.clone(),
            job: px.monitor.job(JobKind::Px, &label, targets, total, true),
            targets: targets.to_vec(),
            code: code.to_owned(),
            timeout,
        }
    }

    async fn go(self, view: &mut dyn JobView) -> Report {
        let (tasks, events) = self.controller.submit(&self.targets, &self.code).await;
        self.job.track(&tasks);
        let mut counted = Counted {
            job: &self.job,
            inner: view,
        };
        let mut report = collect(&self.controller, tasks, events, self.timeout, &mut counted).await;
        // Engines that were not sent the cell (dead since) count too.
        report.targets = self.targets;
        let failures = report.failures();
        let error = (!failures.is_empty()).then(|| {
            let each: Vec<String> = failures
                .iter()
                .map(|(engine, ename)| format!("engine {engine}: {ename}"))
                .collect();
            each.join(", ")
        });
        self.job.finish(error);
        report
    }
}

/// Counts finished engines on the dashboard's job, then lets `inner` see everything.
struct Counted<'a> {
    job: &'a Job,
    inner: &'a mut dyn JobView,
}

impl JobView for Counted<'_> {
    fn piece(&mut self, piece: &Piece) {
        self.inner.piece(piece);
    }

    fn engine_done(&mut self, engine: u32, ok: bool) {
        self.job.advance(1);
        self.inner.engine_done(engine, ok);
    }

    fn tick(&mut self, last: bool) {
        self.inner.tick(last);
    }

    fn tick_every(&self) -> Option<Duration> {
        self.inner.tick_every()
    }
}

/// A blocking cell as the notebook sees it: pieces as they come (unless they are grouped at
/// the end) and its progress block.
struct LiveView {
    out: CellOut,
    live: bool,
    progress: Option<PxProgress>,
}

impl JobView for LiveView {
    fn piece(&mut self, piece: &Piece) {
        if self.live {
            show_piece(piece, &self.out);
        }
    }

    fn engine_done(&mut self, engine: u32, ok: bool) {
        if let Some(progress) = self.progress.as_mut() {
            progress.finished(engine, ok);
        }
    }

    fn tick(&mut self, last: bool) {
        if let Some(progress) = self.progress.as_mut() {
            progress.draw(last);
        }
    }

    fn tick_every(&self) -> Option<Duration> {
        self.progress.as_ref().map(|_| progress::REDRAW_EVERY)
    }
}

/// A long `%px` cell's progress block: which engines are done and how long the others have
/// run; at the end, a summary.
struct PxProgress {
    block: ProgressBlock,
    /// engine -> None while it runs, then (seconds it took, ok).
    engines: BTreeMap<u32, Option<(f64, bool)>>,
}

impl PxProgress {
    /// None when `after` is negative: no block at all.
    fn new(out: &CellOut, targets: &[u32], after: f64) -> Option<Self> {
        (after >= 0.0).then(|| PxProgress {
            block: ProgressBlock::new(
                out.clone(),
                "px-progress",
                Some(Duration::from_secs_f64(after)),
            ),
            engines: targets.iter().map(|e| (*e, None)).collect(),
        })
    }

    fn finished(&mut self, engine: u32, ok: bool) {
        let took = self.block.elapsed().as_secs_f64();
        self.engines.insert(engine, Some((took, ok)));
    }

    fn draw(&mut self, last: bool) {
        if !last && !self.block.due() {
            return;
        }
        let (text, html) = self.render();
        if last {
            self.block.finish(&text, &html);
        } else {
            self.block.draw(&text, &html);
        }
    }

    fn render(&self) -> (String, String) {
        let elapsed = self.block.elapsed().as_secs_f64();
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
             <div>%px: {done} of {total} engines done, {elapsed:.1} s</div>{}{rows}</div>",
            progress::bar(percent, 8, "#3a7")
        );
        (text, html)
    }
}

/// Shows one piece: a stream with its engine's prefix, a result as `Out[engine:count]`, an
/// error named `[engine:Name]`.
fn show_piece(piece: &Piece, out: &CellOut) {
    match piece {
        Piece::Stream { engine, name, text } => publish_engine_stream(out, *engine, *name, text),
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
            out.publish(
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
            out.publish(
                "error",
                json!({"ename": format!("[{engine}:{ename}]"), "evalue": evalue, "traceback": lines}),
            );
        }
    }
}

/// Shows a finished job's pieces in the order `group` asks for.
fn publish_grouped(report: &Report, group: GroupOutputs, out: &CellOut) {
    let mut pieces = report.pieces.clone();
    match group {
        GroupOutputs::Order => {}
        GroupOutputs::Engine => pieces.sort_by_key(Piece::engine),
        GroupOutputs::Type => pieces.sort_by_key(|p| match p {
            Piece::Stream {
                name: parallax_engine_protocol::StreamName::Stdout,
                engine,
                ..
            } => (0, *engine),
            Piece::Stream { engine, .. } => (1, *engine),
            Piece::Result { engine, .. } => (2, *engine),
            Piece::Error { engine, .. } => (3, *engine),
        }),
    }
    for piece in &pieces {
        show_piece(piece, out);
    }
}

/// The cell's overall outcome: an error naming every failed engine, if any failed.
fn outcome(report: &Report) -> Result<CellOutput, CellError> {
    let failures = report.failures();
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
            report.targets.len(),
            list.join(", ")
        ),
    ))
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
