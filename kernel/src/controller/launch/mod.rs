//! Starting engines, on this host or on others, through the tools clusters already run: a child
//! process (`local`), `ssh`, `mpiexec`, or a Slurm batch job. Every launcher hands its engines
//! the connection (address and key) on their stdin, never on a command line; they register
//! with the controller, which answers with their id. What a launcher prints goes to the log,
//! and into the cell when its engines fail to start.
//!
//! - `local`, `ssh`, `mpi`, `slurm`: the command each launcher runs;
//! - `process`: watching what runs on this host, its last words, and its end;
//! - here: the plan, starting a launch and waiting for its engines, stopping them all.

mod local;
mod mpi;
mod process;
mod slurm;
mod ssh;
pub mod standby;

pub use mpi::Mpi;
pub use slurm::Slurm;
pub use ssh::Ssh;

use super::pool::{Engine, EngineState, Inheritance, Launch};
use super::Controller;
use anyhow::Context;
use parallax_engine_protocol::Connection;
pub(super) use process::signal;
use process::Holder;
use std::time::Duration;
use tokio::sync::mpsc;

/// How engines are started.
#[derive(Debug, Clone, PartialEq)]
pub enum Launcher {
    Local,
    Ssh(Ssh),
    Mpi(Mpi),
    Slurm(Slurm),
}

/// A start of `engines` engines by `launcher`; `parallax` is the binary's path on the other
/// hosts (default: `parallax` on their PATH).
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchPlan {
    pub launcher: Launcher,
    pub engines: u32,
    pub parallax: Option<String>,
}

/// What a start says while it waits (a batch job's state, live), for the cell.
pub type News = mpsc::UnboundedSender<String>;

/// How long engines have, once their launch runs, to register.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

impl Controller {
    /// Starts `plan`'s engines and waits until each is ready or dead, saying on `news` what
    /// a batch job waits for. Returns the new ids.
    pub async fn start_engines(&self, plan: &LaunchPlan, news: &News) -> anyhow::Result<Vec<u32>> {
        let connection = self.connection().await?;
        let parallax = match &plan.parallax {
            Some(path) => path.clone(),
            None => "parallax".to_owned(),
        };
        let hosts = plan_hosts(plan);
        if hosts.len() != plan.engines as usize {
            anyhow::bail!(
                "{} engines asked for, and the hosts take {}",
                plan.engines,
                hosts.len()
            );
        }
        if plan.engines == 0 {
            anyhow::bail!("no engines to start");
        }
        let (ids, launch) = {
            let mut registry = self.registry();
            let kind = match plan.launcher {
                Launcher::Local => "local",
                Launcher::Ssh(_) => "ssh",
                Launcher::Mpi(_) => "mpi",
                Launcher::Slurm(_) => "slurm",
            };
            let batch = matches!(plan.launcher, Launcher::Slurm(_));
            let ssh_config = match &plan.launcher {
                Launcher::Ssh(ssh) => ssh.config.clone(),
                _ => None,
            };
            let launch = registry.add_launch(Launch {
                kind,
                processes: Vec::new(),
                job: None,
                running_since: (!batch).then(std::time::Instant::now),
                ssh_config,
                parallax: parallax.clone(),
                plan: Some(parallax_eval::ipc::Locked::locked(&*self.plans).len()),
            });
            let first = registry.next_engine;
            registry.next_engine += plan.engines;
            let ids: Vec<u32> = (first..first + plan.engines).collect();
            for (&id, host) in ids.iter().zip(&hosts) {
                registry.engines.insert(id, Engine::launched(launch, host));
            }
            (ids, launch)
        };
        self.notify();
        parallax_eval::ipc::Locked::locked(&*self.plans).push(plan.clone());
        let first = ids[0];
        let started = match &plan.launcher {
            Launcher::Local => {
                let exe = std::env::current_exe().context("finding the parallax binary")?;
                let exe = exe.to_string_lossy().into_owned();
                let mut standby = self.take_standby();
                for &id in &ids {
                    match standby.take() {
                        Some(child) => {
                            let adopted = Connection {
                                engine: Some(id),
                                ..connection.clone()
                            };
                            self.hold(child, &exe, Holder::Engine(id), &adopted);
                        }
                        None => {
                            let command = local::command(&exe, id);
                            self.run_holder(command, Holder::Engine(id), &connection)?;
                        }
                    }
                }
                Ok(())
            }
            Launcher::Ssh(ssh) => {
                for (&id, host) in ids.iter().zip(&hosts) {
                    let command = ssh.command(host, &parallax, id);
                    self.run_holder(command, Holder::Engine(id), &connection)?;
                }
                Ok(())
            }
            Launcher::Mpi(mpi) => {
                let command = mpi.command(plan.engines, &parallax, first);
                self.run_holder(command, Holder::Launch(launch), &connection)
                    .map(|_| ())
            }
            Launcher::Slurm(slurm) => {
                self.submit_job(slurm, launch, plan.engines, &parallax, first, news)
                    .await
            }
        };
        if let Err(e) = started {
            for &id in &ids {
                self.engine_died(id, &format!("could not be launched: {e:#}"));
            }
            return Err(e);
        }
        self.wait_until_started(&ids).await?;
        let live: Vec<u32> = {
            let registry = self.registry();
            ids.iter()
                .copied()
                .filter(|id| registry.engines.get(id).is_some_and(|e| !e.is_dead()))
                .collect()
        };
        self.warm_up(&live).await?;
        Ok(ids)
    }

    /// The launches of this pool, in order.
    pub fn plans(&self) -> Vec<LaunchPlan> {
        parallax_eval::ipc::Locked::locked(&*self.plans).clone()
    }

    /// A new pool starts: its launches are recorded anew.
    pub fn forget_plans(&self) {
        parallax_eval::ipc::Locked::locked(&*self.plans).clear();
    }

    /// Starts a new process in the place of dead engine `id`, with the same id, and waits until
    /// it is ready. Its variables are gone: it starts from an empty context. An engine of a
    /// local or ssh launch is started as it was; one of a Slurm job as a new job of one task on
    /// its node; an MPI rank as the one rank of a new mpiexec on its host.
    pub async fn restart_engine(&self, id: u32) -> anyhow::Result<()> {
        self.restart_engine_with(id, None).await
    }

    /// Starts dead engine `id` again; with `inheritance`, the new engine takes over the dead
    /// one's history once it registers (`super::revive`).
    pub(in crate::controller) async fn restart_engine_with(
        &self,
        id: u32,
        inheritance: Option<Inheritance>,
    ) -> anyhow::Result<()> {
        let connection = self.connection().await?;
        let (kind, host, ssh, parallax, plan) = {
            let registry = self.registry();
            match registry.engines.get(&id) {
                None => anyhow::bail!("there is no engine {id}"),
                Some(engine) if !engine.is_dead() => {
                    anyhow::bail!(
                        "engine {id} is {}; only a dead engine is restarted",
                        engine.state
                    )
                }
                Some(engine) => {
                    let launch = registry.launches.get(&engine.launch);
                    let ssh = Ssh {
                        hosts: Vec::new(),
                        config: launch.and_then(|l| l.ssh_config.clone()),
                    };
                    let parallax = launch.map_or_else(|| "parallax".into(), |l| l.parallax.clone());
                    let plan = launch.and_then(|l| l.plan);
                    (
                        launch.map(|l| l.kind),
                        engine.host.clone(),
                        ssh,
                        parallax,
                        plan,
                    )
                }
            }
        };
        let launcher = plan
            .and_then(|index| self.plans().get(index).cloned())
            .map(|plan| plan.launcher);
        tracing::info!("restarting engine {id}");
        match (kind, launcher) {
            (Some("local"), _) => {
                let exe = std::env::current_exe().context("finding the parallax binary")?;
                self.renew(id, None, &host, inheritance);
                let command = local::command(&exe.to_string_lossy(), id);
                self.run_holder(command, Holder::Engine(id), &connection)?;
            }
            (Some("ssh"), _) => {
                self.renew(id, None, &host, inheritance);
                let command = ssh.command(&host, &parallax, id);
                self.run_holder(command, Holder::Engine(id), &connection)?;
            }
            // A new task: a job of its own on the same node, the first job's step going on.
            (Some("slurm"), Some(Launcher::Slurm(slurm))) => {
                // Running once the job is (`follow_job` says when).
                let launch = self.replacement_launch("slurm", None, &parallax, plan);
                self.renew(id, Some(launch), &host, inheritance);
                self.submit_task(&slurm, launch, &host, &parallax, id)
                    .await?;
            }
            // A rank cannot rejoin its mpiexec: the one rank of a new mpiexec on the same host,
            // numbered so that its id is the dead one's.
            (Some("mpi"), Some(Launcher::Mpi(mpi))) => {
                let now = Some(std::time::Instant::now());
                let launch = self.replacement_launch("mpi", now, &parallax, plan);
                self.renew(id, Some(launch), &host, inheritance);
                let command = mpi.one_rank_on(&host).command(1, &parallax, id);
                self.run_holder(command, Holder::Launch(launch), &connection)?;
            }
            _ => anyhow::bail!(
                "engine {id} was started by {}; restart the whole cluster with %cluster restart",
                kind.unwrap_or("hand")
            ),
        }
        self.notify();
        self.wait_until_started(&[id]).await?;
        self.warm_up(&[id]).await?;
        match self.registry().engines.get(&id).map(|e| e.state.clone()) {
            Some(EngineState::Dead(why)) => anyhow::bail!("engine {id} died again: {why}"),
            _ => Ok(()),
        }
    }

    /// Records the launch of a dead engine's replacement that is not its first launch's
    /// process: a Slurm job or an mpiexec of its own, of the same `plan`. Returns its number.
    fn replacement_launch(
        &self,
        kind: &'static str,
        running_since: Option<std::time::Instant>,
        parallax: &str,
        plan: Option<usize>,
    ) -> u32 {
        self.registry().add_launch(Launch {
            kind,
            processes: Vec::new(),
            job: None,
            running_since,
            ssh_config: None,
            parallax: parallax.to_owned(),
            plan,
        })
    }

    /// Makes dead engine `id`'s record that of its coming replacement (of `launch`, if it is
    /// another), keeping its restarts and taking over its `inheritance`.
    fn renew(&self, id: u32, launch: Option<u32>, host: &str, inheritance: Option<Inheritance>) {
        if let Some(engine) = self.registry().engines.get_mut(&id) {
            let launch = launch.unwrap_or(engine.launch);
            let restarts = std::mem::take(&mut engine.restarts);
            *engine = Engine::launched(launch, host);
            engine.restarts = restarts;
            match inheritance {
                Some(inheritance) => engine.inherit(inheritance),
                None => {
                    engine.divergence =
                        Some("it was restarted, with none of the others' state".into())
                }
            }
        }
    }

    /// Waits until none of `ids` is still starting.
    async fn wait_until_started(&self, ids: &[u32]) -> anyhow::Result<()> {
        let mut changed = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + super::START_TIMEOUT;
        loop {
            let starting = {
                let registry = self.registry();
                ids.iter()
                    .filter(|id| {
                        registry
                            .engines
                            .get(id)
                            .is_some_and(|e| e.state == EngineState::Starting)
                    })
                    .count()
            };
            if starting == 0 {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                anyhow::bail!(
                    "{starting} engines were not ready after {:?}",
                    super::START_TIMEOUT
                );
            }
        }
    }

    /// Stops every engine: asks politely, then ends what holds them on this host (engine
    /// processes, ssh clients, mpiexec) and cancels batch jobs. An engine that still does not
    /// answer is given up on: it exits by itself once it stops hearing from us.
    pub async fn stop_all(&self) -> usize {
        let live = self.live_engines();
        for engine in self.registry().engines.values_mut() {
            engine.stopping = true;
        }
        for &id in &live {
            self.send(id, parallax_engine_protocol::ToEngine::Shutdown)
                .await;
        }
        let jobs: Vec<String> = self
            .registry()
            .launches
            .values()
            .filter_map(|l| l.job.as_ref().map(|job| job.id.clone()))
            .collect();
        // A job still in the queue has no engine to ask.
        for job in &jobs {
            slurm::cancel(job).await;
        }
        self.wait_for_no_live_engines(Duration::from_secs(3)).await;
        let (processes, launchers) = {
            let registry = self.registry();
            let processes: Vec<u32> = registry
                .engines
                .values()
                .filter(|e| !e.is_dead())
                .filter_map(|e| e.process)
                .collect();
            let launchers: Vec<u32> = registry
                .launches
                .values()
                .flat_map(|l| l.processes.iter().copied())
                .collect();
            (processes, launchers)
        };
        for pid in processes {
            process::signal(pid, libc::SIGKILL);
        }
        // mpiexec passes SIGTERM on to every rank, on every host.
        for pid in launchers {
            process::signal(pid, libc::SIGTERM);
        }
        self.wait_for_no_live_engines(Duration::from_secs(3)).await;
        for id in self.live_engines() {
            self.engine_died(
                id,
                "did not stop in time; it exits once it stops hearing from us",
            );
        }
        // A new pool numbers its engines from 0 again, so PARALLAX_ENGINE_ID stays 0..N-1.
        let mut registry = self.registry();
        registry.engines.clear();
        registry.launches.clear();
        registry.next_engine = 0;
        live.len()
    }

    async fn wait_for_no_live_engines(&self, within: Duration) {
        let mut changed = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        while !self.live_engines().is_empty() {
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                break;
            }
        }
    }
}

/// The host each new engine is launched on, as far as the launcher knows it before they
/// register (ssh knows; mpiexec and Slurm place them).
fn plan_hosts(plan: &LaunchPlan) -> Vec<String> {
    let unknown = |what: &str| vec![what.to_owned(); plan.engines as usize];
    match &plan.launcher {
        Launcher::Local => unknown(parallax_eval::places::host_name()),
        Launcher::Ssh(ssh) => ssh.placement(),
        Launcher::Mpi(_) => unknown("(mpiexec)"),
        Launcher::Slurm(_) => unknown("(slurm)"),
    }
}
