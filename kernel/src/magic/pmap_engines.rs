//! The engines of a running `%pmap` that stop serving it, and those that come back: an engine
//! whose serving cell fails is named, its chunks go to the others; an engine that served and
//! is back (a replacement for one that died, or one whose store was started again) serves the
//! map again, so that a map carries on with the pool it has, not just without what it lost.

use super::pmap::MapRun;
use super::pmap_report::serve_failure;
use crate::controller::EngineState;
use parallax_engine_protocol::{Outcome, ToEngine};

/// How many times one engine comes back to serve one map (each return compiles its serving
/// cell again; an engine that keeps failing is left out).
const RETURNS_PER_ENGINE: usize = 3;

impl MapRun<'_> {
    /// An engine's serving cell failed: say so, and that its chunks run again elsewhere.
    pub(super) fn engine_stopped(
        &mut self,
        engine: u32,
        ename: String,
        evalue: String,
        rerun: usize,
    ) {
        let rerun_note = if rerun == 0 {
            String::new()
        } else {
            format!("; its {rerun} chunks run again on the others")
        };
        if ename == "EngineDied" {
            self.died.insert(engine);
        }
        let ready = self.scheduler.worker(engine).is_some_and(|w| w.ready);
        let why = if ready { "stopped" } else { "cannot serve" };
        self.out.stderr(&format!(
            "[{ename}] engine {engine} {why}: {evalue}{rerun_note}\n"
        ));
        if !ready {
            let outcome = Outcome::Error {
                ename,
                evalue,
                traceback: Vec::new(),
            };
            let failure = serve_failure(engine, &outcome, &self.func_label);
            self.not_serving.push(failure);
        }
    }

    /// The pool changed: engines of this map that stopped serving it and are idle again start
    /// serving it anew, if they had served it or died (an engine that could not serve the map
    /// would fail the same way again).
    pub(super) async fn serve_again(&mut self) {
        // Most changes come while every engine serves: nothing to look up then.
        if !self.scheduler.workers().values().any(|worker| worker.ended) {
            return;
        }
        let back: Vec<u32> =
            self.mover
                .controller
                .status()
                .into_iter()
                .filter(|engine| engine.state == EngineState::Idle)
                .map(|engine| engine.id)
                .filter(|id| {
                    self.scheduler.worker(*id).is_some_and(|worker| {
                        worker.ended && (worker.served || self.died.contains(id))
                    }) && self.returns.get(id).copied().unwrap_or(0) < RETURNS_PER_ENGINE
                })
                .collect();
        if back.is_empty() {
            return;
        }
        let func = self.pmap.func.clone();
        let serving = self
            .mover
            .controller
            .start_shared(&back, &self.events_tx, |_, task, share| {
                let func = func.clone();
                (ToEngine::Map { task, func, share }, Vec::new())
            })
            .await;
        self.job.track(&serving);
        for (engine, task) in serving {
            if !self.scheduler.rejoin(engine, task) {
                // No longer one of this map's ended workers: its serving cell ends at once.
                let end = ToEngine::MapEnd { task };
                self.mover.controller.send_to(engine, end, Vec::new()).await;
                continue;
            }
            *self.returns.entry(engine).or_default() += 1;
            self.out.stderr(&format!(
                "engine {engine} is back: it serves the map again\n"
            ));
        }
    }
}
