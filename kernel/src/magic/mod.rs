//! The magics, one file per family, each turning a parsed command into work for the engines
//! and output for the notebook: `cluster`, `px` (with `%pxresult`, `%pxconfig`, `%autopx`),
//! `pmap`, `transfer` (`%scatter`, `%push`, `%gather`, `%pull`), `dashboard` and `cache`. Parsing is
//! the `parallax-magics` crate's; here is what each command does.

mod cache;
mod carrying;
mod cluster;
mod dashboard;
mod pmap;
mod pmap_engines;
mod pmap_report;
mod progress;
mod px;
mod transfer;
mod transfer_progress;

use crate::controller::Controller;
use crate::dashboard::jobs::JobKind;
use crate::dashboard::monitor::Job;
use crate::dashboard::monitor::Monitor;
use crate::jupyter::iopub::CellOut;
use parallax_engine_protocol::StreamName;
use parallax_eval::{CellError, CellOutput, Evaluator};
use parallax_magics::{Command, Movement, PxFlags, Targets};
use transfer::DataMover;

/// Every family's state, for the kernel's life.
pub struct Magics {
    controller: Controller,
    monitor: Monitor,
    evaluator: Evaluator,
    px: px::Px,
    data: DataMover,
    dashboard: dashboard::Dashboards,
}

impl Magics {
    pub fn new(controller: Controller, monitor: Monitor, evaluator: Evaluator) -> Self {
        Magics {
            px: px::Px::new(controller.clone(), monitor.clone()),
            data: DataMover::new(controller.clone(), evaluator.clone()),
            dashboard: dashboard::Dashboards::new(controller.clone(), monitor.clone()),
            controller,
            monitor,
            evaluator,
        }
    }

    /// `%autopx` is on: every cell goes to the engines.
    pub fn autopx(&self) -> bool {
        self.px.autopx
    }

    /// A whole cell sent to the engines with the `%px` defaults (`%autopx`).
    pub async fn px_cell(&mut self, code: &str, out: &CellOut) -> Result<CellOutput, CellError> {
        self.px.px(&PxFlags::default(), code, out).await
    }

    /// Runs the magic on `line` (with `body`, for a cell magic).
    pub async fn run(
        &mut self,
        line: &str,
        body: Option<&str>,
        out: &CellOut,
    ) -> Result<CellOutput, CellError> {
        let command = parallax_magics::parse(line, body)
            .map_err(|e| CellError::plain("UsageError", e.to_string()))?;
        match command {
            Command::Lsmagic => out.stdout(&parallax_magics::listing()),
            Command::Help { name } => {
                // The parser only accepts names it knows, so the help exists.
                out.stdout(&parallax_magics::help_for(&name).unwrap_or_default());
            }
            Command::Cluster(command) => {
                return cluster::cluster(&self.controller, command, out).await
            }
            Command::Px { flags, code } => {
                let local = flags.over(self.px.defaults()).local.unwrap_or(false);
                let engines = self.px.px(&flags, &code, out).await;
                if local {
                    let mine = self.evaluator.execute(code, out.sink(), None).await;
                    engines?;
                    return mine;
                }
                return engines;
            }
            Command::PxResult => return self.px.px_result(out).await,
            Command::Autopx => self.px.toggle_autopx(out),
            Command::PxConfig { flags } => self.px.configure(flags, out),
            Command::Pmap(command) => {
                return pmap::pmap(&self.data, &self.monitor, command, out).await
            }
            Command::Distribute(command) => {
                let kind = match command.movement {
                    Movement::Scatter => JobKind::Scatter,
                    _ => JobKind::Push,
                };
                let job = self.transfer_job(kind, &command.name, &command.targets);
                let outcome = self.data.distribute(command, out).await;
                job.finish_as(&outcome);
                return outcome;
            }
            Command::Collect(command) => {
                let kind = match command.movement {
                    Movement::Gather => JobKind::Gather,
                    _ => JobKind::Pull,
                };
                let job = self.transfer_job(kind, &command.name, &command.targets);
                let outcome = self.data.collect(command, out).await;
                job.finish_as(&outcome);
                return outcome;
            }
            Command::Dashboard { stop } => self.dashboard.toggle(stop, out).await,
            Command::Cache(command) => {
                return cache::cache(&self.evaluator, &self.controller, command, out)
            }
        }
        Ok(CellOutput::default())
    }

    /// A transfer's entry on the dashboard.
    fn transfer_job(&self, kind: JobKind, name: &str, targets: &Option<Targets>) -> Job {
        let engines = select_engines(&self.controller, targets).unwrap_or_default();
        let total = engines.len() as u64;
        self.monitor.job(kind, name, &engines, total, false)
    }
}

/// The ready engines `targets` selects, or a clear error when there are none.
fn select_engines(
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
fn publish_engine_stream(out: &CellOut, engine: u32, name: StreamName, text: &str) {
    let stream = match name {
        StreamName::Stdout => "stdout",
        StreamName::Stderr => "stderr",
    };
    let prefixed: String = text
        .split_inclusive('\n')
        .map(|line| format!("[{stream}:{engine}] {line}"))
        .collect();
    out.stream(stream, &prefixed);
}
