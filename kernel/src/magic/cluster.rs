//! `%cluster`: start engines here or on other hosts (ssh, mpiexec, Slurm), add, stop and
//! restart them, show their status (hosts, batch jobs, who shares compiled cells), time the
//! control path with `ping`, and write the connection file for engines started by hand.

use crate::controller::{Controller, EngineState, LaunchPlan, Launcher, Mpi, Slurm, Ssh};
use crate::jupyter::iopub::CellOut;
use crate::text::engine_list;
use parallax_eval::{CellError, CellOutput};
use parallax_magics::{ClusterCommand, LaunchOptions, LauncherKind};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long `%cluster ping` waits for every engine's answer.
const PING_WITHIN: Duration = Duration::from_secs(5);

pub async fn cluster(
    controller: &Controller,
    command: ClusterCommand,
    out: &CellOut,
) -> Result<CellOutput, CellError> {
    let say = |text: String| out.stdout(&(text + "\n"));
    match command {
        ClusterCommand::Start(options) => {
            let live = controller.live_engines();
            if !live.is_empty() {
                return Err(usage(format!(
                    "{} engines are already running; use %cluster add or %cluster restart",
                    live.len()
                )));
            }
            controller.forget_plans();
            start(controller, options, out).await?;
        }
        ClusterCommand::Add(options) => start(controller, options, out).await?,
        ClusterCommand::Stop => {
            let stopped = controller.stop_all().await;
            say(format!("Stopped {stopped} engines."));
            // The next pool starts warm.
            controller.keep_standby();
        }
        ClusterCommand::Restart => {
            let plans = controller.plans();
            let stopped = controller.stop_all().await;
            // Launched again below, they are recorded again.
            controller.forget_plans();
            say(format!("Stopped {stopped} engines."));
            if plans.is_empty() {
                let options = LaunchOptions {
                    engines: Some(stopped.max(1) as u32),
                    ..LaunchOptions::default()
                };
                start(controller, options, out).await?;
            }
            for plan in plans {
                launch(controller, &plan, out).await?;
            }
        }
        ClusterCommand::Status => say(status_table(controller)),
        ClusterCommand::Ping { count } => say(ping(controller, count).await?),
        ClusterCommand::ConnectionFile { path, ip } => {
            say(connection_file(controller, path, ip).await?)
        }
    }
    Ok(CellOutput::default())
}

fn usage(message: String) -> CellError {
    CellError::plain("UsageError", message)
}

fn failed(e: anyhow::Error) -> CellError {
    CellError::plain("ClusterError", format!("{e:#}"))
}

/// Starts engines as `options` (over their profile, if they name one) say.
async fn start(
    controller: &Controller,
    options: LaunchOptions,
    out: &CellOut,
) -> Result<(), CellError> {
    let options = with_profile(options)?;
    let seconds = |s: Option<f64>| s.map(Duration::from_secs_f64);
    controller
        .configure(
            options.ip.clone(),
            seconds(options.heartbeat_timeout),
            seconds(options.start_timeout),
        )
        .await
        .map_err(failed)?;
    controller.set_auto_restart(!options.no_restart);
    let plan = launch_plan(&options).map_err(usage)?;
    if options.noblock {
        return launch_in_background(controller, plan, out);
    }
    launch(controller, &plan, out).await
}

/// Starts a launch and returns: its engines join the pool as they register, and what it says
/// goes to the log. `%cluster status` shows how it stands; `%cluster stop` ends it.
fn launch_in_background(
    controller: &Controller,
    plan: LaunchPlan,
    out: &CellOut,
) -> Result<(), CellError> {
    let controller = controller.clone();
    let engines = plan.engines;
    tokio::spawn(async move {
        let (news, mut heard) = mpsc::unbounded_channel();
        let logger = tokio::spawn(async move {
            while let Some(line) = heard.recv().await {
                tracing::info!("{line}");
            }
        });
        match controller.start_engines(&plan, &news).await {
            Ok(ids) => tracing::info!("started engines {}", engine_list(&ids)),
            Err(e) => tracing::warn!("a background start failed: {e:#}"),
        }
        drop(news);
        let _ = logger.await;
    });
    out.stdout(&format!(
        "Starting {engines} engines in the background; %cluster status shows how they stand, %cluster stop ends them.\n"
    ));
    Ok(())
}

/// Runs one launch, saying what it waits for as it goes; the stop button ends the wait and
/// stops what was started.
async fn launch(
    controller: &Controller,
    plan: &LaunchPlan,
    out: &CellOut,
) -> Result<(), CellError> {
    let began = Instant::now();
    let (news, mut heard) = mpsc::unbounded_channel();
    let mut interrupts = controller.interrupts();
    let starting = controller.start_engines(plan, &news);
    tokio::pin!(starting);
    let started = loop {
        tokio::select! {
            started = &mut starting => break started,
            Some(line) = heard.recv() => out.stdout(&(line + "\n")),
            _ = interrupts.changed() => {
                let stopped = controller.stop_all().await;
                return Err(CellError::plain(
                    "KeyboardInterrupt",
                    format!("the start was interrupted; stopped {stopped} engines and cancelled their jobs"),
                ));
            }
        }
    };
    while let Ok(line) = heard.try_recv() {
        out.stdout(&(line + "\n"));
    }
    let ids = started.map_err(failed)?;
    let dead: Vec<String> = controller
        .status()
        .iter()
        .filter(|s| ids.contains(&s.id) && matches!(s.state, EngineState::Dead(_)))
        .map(|s| format!("engine {} ({}) {}", s.id, s.host, s.state))
        .collect();
    let ready = ids.len() - dead.len();
    let mut hosts: Vec<String> = controller
        .status()
        .into_iter()
        .filter(|s| ids.contains(&s.id) && !matches!(s.state, EngineState::Dead(_)))
        .map(|s| s.host)
        .collect();
    hosts.dedup();
    let mut text = format!(
        "Started {ready} engines in {:.1} s (ids {}",
        began.elapsed().as_secs_f64(),
        engine_list(&ids)
    );
    text.push(')');
    if !hosts.is_empty() {
        text.push_str(&format!(" on {}", hosts.join(", ")));
    }
    text.push('.');
    if !dead.is_empty() {
        text.push_str(&format!(" Failed: {}.", dead.join("; ")));
    }
    out.stdout(&(text + "\n"));
    if ready == 0 {
        return Err(CellError::plain(
            "ClusterError",
            format!("no engine started: {}", dead.join("; ")),
        ));
    }
    Ok(())
}

/// The options of the profile these name, overridden by these.
fn with_profile(options: LaunchOptions) -> Result<LaunchOptions, CellError> {
    let Some(name) = options.profile.clone() else {
        return Ok(options);
    };
    let path = profiles_path();
    let text = std::fs::read_to_string(&path).map_err(|e| {
        usage(format!(
            "profile `{name}`: cannot read the profiles file {}: {e}",
            path.display()
        ))
    })?;
    let profile = parallax_magics::profile_options(&text, &name)
        .map_err(|e| usage(format!("{}: {e}", path.display())))?;
    Ok(options.over(profile))
}

fn profiles_path() -> PathBuf {
    match std::env::var_os("PARALLAX_PROFILES") {
        Some(path) => PathBuf::from(path),
        None => parallax_eval::places::home()
            .join(".parallax")
            .join("profiles.toml"),
    }
}

/// The controller's plan for these options, or what is missing or wrong, in words.
fn launch_plan(options: &LaunchOptions) -> Result<LaunchPlan, String> {
    let kind = options.launcher.unwrap_or(LauncherKind::Local);
    let path = |p: &Option<String>| p.as_ref().map(PathBuf::from);
    let hosts = match (&options.hosts, kind) {
        (Some(spec), LauncherKind::Ssh | LauncherKind::Mpi) => {
            Some(parallax_magics::host_counts(spec)?)
        }
        (Some(_), _) => return Err("--hosts is for the ssh and mpi launchers".into()),
        (None, LauncherKind::Ssh) => {
            return Err("the ssh launcher needs --hosts host1:N,host2:M".into())
        }
        (None, _) => None,
    };
    let from_hosts = hosts
        .as_ref()
        .map(|hosts| hosts.iter().map(|(_, n)| n).sum::<u32>());
    let engines = match (kind, options.engines, from_hosts) {
        (LauncherKind::Ssh, Some(n), Some(sum)) if n != sum => {
            return Err(format!(
                "-n {n} and --hosts disagree: the hosts run {sum} engines in all"
            ))
        }
        (LauncherKind::Ssh, _, Some(sum)) => sum,
        (_, Some(n), _) => n,
        (LauncherKind::Local, None, _) => default_engine_count(),
        (LauncherKind::Mpi, None, Some(sum)) => sum,
        (_, None, _) => return Err("how many engines? say -n N".into()),
    };
    let launcher = match kind {
        LauncherKind::Local => Launcher::Local,
        LauncherKind::Ssh => Launcher::Ssh(Ssh {
            hosts: hosts.unwrap_or_default(),
            config: path(&options.ssh_config),
        }),
        LauncherKind::Mpi => Launcher::Mpi(Mpi {
            hosts: options.hosts.clone(),
            hostfile: path(&options.hostfile),
            ssh_config: path(&options.ssh_config),
            args: options.mpi_args.clone(),
        }),
        LauncherKind::Slurm => Launcher::Slurm(Slurm {
            partition: options.partition.clone(),
            time: options.time.clone(),
            account: options.account.clone(),
            nodes: options.nodes,
            sbatch_args: options.sbatch_args.clone(),
        }),
    };
    Ok(LaunchPlan {
        launcher,
        engines,
        parallax: options.remote_parallax.clone(),
    })
}

/// Writes the connection (address and key) for engines started by hand, mode 0600.
async fn connection_file(
    controller: &Controller,
    path: Option<String>,
    ip: Option<String>,
) -> Result<String, CellError> {
    controller.configure(ip, None, None).await.map_err(failed)?;
    let connection = controller.connection().await.map_err(failed)?;
    let path = match path {
        Some(path) => PathBuf::from(path),
        None => {
            let dir = parallax_eval::places::home()
                .join(".parallax")
                .join("security");
            std::fs::create_dir_all(&dir)
                .and_then(|_| {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                })
                .map_err(|e| failed(anyhow::anyhow!("creating {}: {e}", dir.display())))?;
            dir.join(format!("engine-{}.json", std::process::id()))
        }
    };
    // Removed first: an existing file would keep its mode.
    let _ = std::fs::remove_file(&path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut file| {
            std::io::Write::write_all(&mut file, (connection.to_json() + "\n").as_bytes())
        })
        .map_err(|e| failed(anyhow::anyhow!("writing {}: {e}", path.display())))?;
    let mut text = format!(
        "Wrote {} (mode 0600): engines started with `parallax engine --connect {}` join this pool at {}.",
        path.display(),
        path.display(),
        connection.url
    );
    if controller.settings().is_loopback() {
        text.push_str(
            " That is a loopback address: only engines on this host can reach it; \
             write the file with --ip ADDRESS for other hosts.",
        );
    }
    Ok(text)
}

/// Times round trips of a no-op message to every ready engine: the control path alone, with
/// no compiling and no cell.
async fn ping(controller: &Controller, count: u32) -> Result<String, CellError> {
    let engines = controller.ready_engines();
    if engines.is_empty() {
        return Err(CellError::plain(
            "UsageError",
            "no engines; start some with %cluster start [-n N]",
        ));
    }
    let mut times = Vec::with_capacity(count as usize);
    for _ in 0..count {
        match controller.round_trip(&engines, PING_WITHIN).await {
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

fn status_table(controller: &Controller) -> String {
    let status = controller.status();
    let jobs = controller.jobs();
    if status.is_empty() && jobs.is_empty() {
        return "No engines. Start some with %cluster start [-n N].".to_owned();
    }
    let mut text = format!(
        "{:>6}  {:>8}  {:<12}  {:<10}  {:>9}\n",
        "engine", "pid", "host", "state", "uptime"
    );
    for s in status {
        // A starting engine's pid is known once it registers.
        let pid = match s.pid {
            0 => "-".to_owned(),
            pid => pid.to_string(),
        };
        text.push_str(&format!(
            "{:>6}  {:>8}  {:<12}  {:<10}  {:>8.0}s\n",
            s.id,
            pid,
            s.host,
            s.state.to_string(),
            s.uptime.as_secs_f64()
        ));
    }
    for job in jobs {
        text.push_str(&format!("{job}\n"));
    }
    let settings = controller.settings();
    if !settings.url.is_empty() {
        text.push_str(&format!("Listening for engines on {}.\n", settings.url));
    }
    let sharing = controller.sharing();
    if !sharing.is_empty() {
        text.push_str("Compiled cells:\n");
        for line in sharing {
            text.push_str(&format!("  {line}\n"));
        }
    }
    text.trim_end().to_owned()
}

fn default_engine_count() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}
