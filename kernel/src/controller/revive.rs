//! Dead engines come back by themselves: an engine that died without being asked to (killed,
//! crashed, cut off) is started again with the same id on the same host (a Slurm engine as a
//! new task, a job of one task on its node; an MPI rank as the one rank of a new `mpiexec` on
//! its host), and takes over the dead one's history (`ToEngine::Adopt`), so that its
//! functions, types, `use`s and dependencies are there again without any cell running again;
//! its variables died with it and are named. At most `RESTARTS_PER_MINUTE` times a minute per
//! engine, so that a crash loop stops; `%cluster start --no-restart` turns it off.

use super::pool::Inheritance;
use super::Controller;
use std::time::{Duration, Instant};

/// How many times an engine is started again within `RESTART_WINDOW`.
pub const RESTARTS_PER_MINUTE: usize = 3;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// What became of a dead engine, in words for the cell it was running.
pub enum Revival {
    /// Being restarted; the variables that died with it.
    Coming { lost: Vec<String> },
    /// Not restarted: why.
    Not(String),
}

impl Controller {
    /// After engine `id` died without being asked to: starts its replacement, unless that is
    /// turned off, its launcher cannot, or it died too often lately.
    pub(super) fn revive(&self, id: u32) -> Revival {
        if !self.settings().auto_restart {
            return Revival::Not("restarting dead engines is off (--no-restart)".into());
        }
        let inheritance = {
            let mut registry = self.registry();
            let launcher = registry
                .engines
                .get(&id)
                .and_then(|engine| registry.launches.get(&engine.launch))
                .map(|launch| launch.kind);
            if !matches!(launcher, Some("local" | "ssh" | "mpi" | "slurm")) {
                return Revival::Not(format!(
                    "an engine started by {} is not restarted by itself; %cluster restart \
                     starts the pool again",
                    launcher.unwrap_or("hand")
                ));
            }
            let Some(engine) = registry.engines.get_mut(&id) else {
                return Revival::Not("it is not in the pool".into());
            };
            if engine.pid == 0 {
                // It never registered: a launch that failed, not a death to heal.
                return Revival::Not("it never got ready, so it is not restarted".into());
            }
            let now = Instant::now();
            engine
                .restarts
                .retain(|at| now.duration_since(*at) < RESTART_WINDOW);
            if engine.restarts.len() >= RESTARTS_PER_MINUTE {
                return Revival::Not(format!(
                    "it died {} times within a minute, so it is not restarted again (a crash \
                     loop?); %cluster restart starts the pool again",
                    RESTARTS_PER_MINUTE + 1
                ));
            }
            engine.restarts.push(now);
            if engine.history.is_none() {
                // Its reports stopped adding up: start it afresh rather than guess.
                drop(registry);
                return self.restart_afresh(id);
            }
            Inheritance {
                history: engine
                    .history
                    .as_ref()
                    .map(|history| history.entries().iter().map(|e| e.to_wire()).collect())
                    .unwrap_or_default(),
                lost: engine.variables.clone(),
            }
        };
        let lost = inheritance.lost.clone();
        let controller = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            match controller.restart_engine_with(id, Some(inheritance)).await {
                Ok(()) => tracing::info!(
                    "engine {id} is back {:.1?} after its death",
                    started.elapsed()
                ),
                Err(e) => tracing::warn!("engine {id} could not be restarted: {e:#}"),
            }
            controller.notify();
        });
        Revival::Coming { lost }
    }

    /// Starts dead engine `id` again with nothing of its state.
    fn restart_afresh(&self, id: u32) -> Revival {
        let controller = self.clone();
        tokio::spawn(async move {
            if let Err(e) = controller.restart_engine(id).await {
                tracing::warn!("engine {id} could not be restarted: {e:#}");
            }
            controller.notify();
        });
        Revival::Not(
            "it is being restarted without its state (its history was not known here)".into(),
        )
    }

    /// The inheritance of a replacement that just registered, if it has one (once).
    pub(super) fn inheritance_of(&self, id: u32) -> Option<Inheritance> {
        self.registry()
            .engines
            .get_mut(&id)
            .and_then(|engine| engine.inheritance.take())
    }
}

/// The words a revival adds to a dead engine's message.
pub fn revival_words(revival: &Revival) -> String {
    match revival {
        Revival::Coming { lost } if lost.is_empty() => "; it is being restarted, with its \
                                                         functions, types and dependencies"
            .to_owned(),
        Revival::Coming { lost } => format!(
            "; it is being restarted, with its functions, types and dependencies; variables \
             lost: {}",
            lost.join(", ")
        ),
        Revival::Not(why) => format!("; {why}"),
    }
}
