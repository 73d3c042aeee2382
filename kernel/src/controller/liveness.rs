//! Knowing which engines live, wherever they run: the controller pings every engine each
//! second; one that says nothing for the heartbeat timeout (its host gone, its network cut,
//! stopped) is declared dead, as is one that does not register in time once its launch runs.
//! A dead engine is reported at once, by id and host, to the jobs whose tasks it held, and
//! whatever holds it on this host is ended. Engines do the same the other way: one that stops
//! hearing the controller exits.

use super::events::TaskEvent;
use super::pool::EngineState;
use super::Controller;
use parallax_engine_protocol::{Outcome, Step, ToEngine};
use parallax_eval::ipc::Locked;
use std::time::{Duration, Instant};

/// A ping a second; engines exit after the heartbeat timeout without one.
const PING_EVERY: Duration = Duration::from_secs(1);

/// An engine that does not answer for this long is dead, unless told otherwise.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

impl Controller {
    /// Pings the engines each second, and declares dead those that have gone silent or never
    /// registered.
    pub(super) async fn keep_alive(self) {
        let mut nonce = 0;
        let mut tick = tokio::time::interval(PING_EVERY);
        loop {
            tick.tick().await;
            nonce += 1;
            let listening = self
                .registry()
                .ids(|e| !e.is_dead() && !e.stopping && e.identity.is_some());
            for id in listening {
                self.send(id, ToEngine::Ping { nonce }).await;
            }
            for (id, cause) in self.silent_engines() {
                self.declare_dead(id, &cause).await;
            }
        }
    }

    /// Engines gone silent, and engines whose launch runs that did not register in time.
    fn silent_engines(&self) -> Vec<(u32, String)> {
        let settings = self.settings();
        let registry = self.registry();
        let mut silent = Vec::new();
        for (id, engine) in &registry.engines {
            if engine.is_dead() || engine.stopping {
                continue;
            }
            if engine.identity.is_some() {
                let quiet = engine.last_heard.elapsed();
                if quiet > settings.heartbeat_timeout {
                    silent.push((
                        *id,
                        format!(
                            "stopped answering: no word for {:.1} s (heartbeat timeout {:.1} s)",
                            quiet.as_secs_f64(),
                            settings.heartbeat_timeout.as_secs_f64()
                        ),
                    ));
                }
                continue;
            }
            let Some(running) = registry
                .launches
                .get(&engine.launch)
                .and_then(|l| l.running_since)
            else {
                continue;
            };
            let since = running.max(engine.started);
            if since.elapsed() > settings.register_timeout {
                let mut cause = format!(
                    "did not register within {:.0} s; it was told to reach the controller at {}",
                    settings.register_timeout.as_secs_f64(),
                    settings.url
                );
                if settings.is_loopback() {
                    cause.push_str(
                        ", a loopback address: engines on other hosts cannot reach it; \
                         start the cluster with --ip ADDRESS",
                    );
                }
                silent.push((*id, cause));
            }
        }
        silent
    }

    /// Declares engine `id` dead: it is told to exit (should it come back), what holds it on
    /// this host is ended, and its jobs hear it.
    async fn declare_dead(&self, id: u32, cause: &str) {
        self.send(id, ToEngine::Shutdown).await;
        let process = self.registry().engines.get(&id).and_then(|e| e.process);
        self.engine_died(id, cause);
        if let Some(pid) = process {
            super::launch::signal(pid, libc::SIGKILL);
        }
    }

    /// Engine `id` is gone: its followers and its jobs hear it at once, by id and cause.
    pub(super) fn engine_died(&self, id: u32, cause: &str) {
        let mut expected = false;
        let orphaned = {
            let mut registry = self.registry();
            match registry.engines.get_mut(&id) {
                // Declared dead already (silent): its process's end is no news.
                Some(engine) if engine.is_dead() => return,
                Some(engine) => {
                    expected = engine.stopping;
                    if !engine.is_dead() {
                        engine.state = EngineState::Dead(cause.to_owned());
                    }
                    engine.running.clear();
                }
                None => {}
            };
            let running = registry.tasks_of(id);
            let mut arrivals = self.arrivals.locked();
            for task in &running {
                // What it was sending back in parts will not be complete.
                arrivals.remove(task);
            }
            drop(arrivals);
            // Followers waiting for its compiled cells hear that it is gone.
            for (cell, followers) in registry.cells_led_by(id) {
                for follower in followers {
                    let step = Step::Abort {
                        reason: cause.to_owned(),
                    };
                    let message = ToEngine::Shared {
                        cell,
                        from: id,
                        step,
                    };
                    self.pass_on(follower, message);
                }
            }
            running
                .into_iter()
                .filter_map(|task| registry.close_task(task))
                .collect::<Vec<_>>()
        };
        let cause = match self.registry().engines.get(&id) {
            Some(engine) if !engine.host.starts_with('(') => format!("on {}: {cause}", engine.host),
            _ => cause.to_owned(),
        };
        // What becomes of it: the cells it was running say so.
        let revival = if expected {
            String::new()
        } else {
            super::revive::revival_words(&self.revive(id))
        };
        let cause = cause.as_str();
        self.observer.engine_died(id, cause);
        if expected {
            tracing::info!("engine {id} stopped {cause}");
        } else {
            tracing::warn!("engine {id} {cause}{revival}");
        }
        for closed in orphaned {
            let _ = closed.events.send(TaskEvent::Done {
                engine: id,
                execution_count: 0,
                outcome: Outcome::Error {
                    ename: "EngineDied".into(),
                    evalue: format!("engine {id} {cause}{revival}"),
                    traceback: vec![format!(
                        "EngineDied: engine {id} {cause}{revival}; the other engines go on"
                    )],
                },
            });
        }
        // A killed engine of this host cannot remove its shared memory or its temporary
        // directory; nobody else needs them. Off the runtime's threads: a build directory
        // takes a while to remove.
        let _ = std::thread::Builder::new()
            .name("sweep".into())
            .spawn(parallax_eval::places::sweep_dead_leftovers);
        self.notify();
    }
}

/// When an engine was last heard from, for the heartbeat.
pub(super) fn heard(engine: &mut super::pool::Engine) {
    engine.last_heard = Instant::now();
}
