//! Engines as the tasks of one Slurm batch job: `sbatch` submits a script whose `srun` starts
//! one engine per task, and a poller follows the job's state (PENDING and why, RUNNING, its
//! end) for the cell and `%cluster status`. The connection reaches every task on srun's stdin,
//! from the script, which Slurm keeps readable only by its owner and the Slurm user.

use super::News;
use crate::controller::pool::BatchJob;
use crate::controller::Controller;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Slurm {
    pub partition: Option<String>,
    pub time: Option<String>,
    pub account: Option<String>,
    pub nodes: Option<u32>,
    /// More `sbatch` arguments, as given.
    pub sbatch_args: Vec<String>,
}

/// How often the job's state is asked while the pool lives.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// A Slurm command that has not answered in this long has failed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

impl Slurm {
    fn arguments(&self, engines: u32, output: &Path) -> Vec<String> {
        let mut args = vec![
            "--parsable".to_owned(),
            "--job-name=parallax".into(),
            format!("--ntasks={engines}"),
            format!("--output={}", output.display()),
        ];
        let mut with = |flag: &str, value: &Option<String>| {
            if let Some(value) = value {
                args.push(format!("--{flag}={value}"));
            }
        };
        with("partition", &self.partition);
        with("time", &self.time);
        with("account", &self.account);
        with("nodes", &self.nodes.map(|n| n.to_string()));
        args.extend(self.sbatch_args.iter().cloned());
        args
    }
}

/// The batch script: every task an engine, the connection on their stdin.
fn script(parallax: &str, first: u32, connection: &str) -> String {
    format!(
        "#!/bin/sh\n\
         # Parallax engines, one per task; srun hands each the connection on its stdin.\n\
         exec srun --input=all {} engine --connect - --rank-offset {first} <<'PARALLAX_CONNECTION'\n\
         {connection}\n\
         PARALLAX_CONNECTION\n",
        super::ssh::shell_quote(parallax)
    )
}

/// Where a job's output goes: a directory of the user's own, on the home that the nodes share.
fn output_dir() -> PathBuf {
    parallax_eval::places::home()
        .join(".parallax")
        .join("slurm")
}

impl Controller {
    /// Submits the job for `launch` and starts following its state.
    pub(super) async fn submit_job(
        &self,
        slurm: &Slurm,
        launch: u32,
        engines: u32,
        parallax: &str,
        first: u32,
        news: &News,
    ) -> anyhow::Result<()> {
        let dir = output_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let output = dir.join("parallax-%j.out");
        let connection = self.connection().await?.to_json();
        let mut command = tokio::process::Command::new("sbatch");
        command
            .args(slurm.arguments(engines, &output))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().context("running sbatch")?;
        if let Some(mut stdin) = child.stdin.take() {
            use tokio::io::AsyncWriteExt;
            stdin
                .write_all(script(parallax, first, &connection).as_bytes())
                .await
                .context("writing the batch script to sbatch")?;
        }
        let ran = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
            .await
            .context("sbatch did not answer")??;
        if !ran.status.success() {
            anyhow::bail!(
                "sbatch failed: {}",
                String::from_utf8_lossy(&ran.stderr).trim()
            );
        }
        let said = String::from_utf8_lossy(&ran.stdout);
        let id = said
            .trim()
            .split(';')
            .next()
            .filter(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()))
            .with_context(|| format!("sbatch said `{}`, not a job id", said.trim()))?
            .to_owned();
        let job = BatchJob {
            id: id.clone(),
            state: "PENDING".into(),
            reason: String::new(),
        };
        if let Some(record) = self.registry().launches.get_mut(&launch) {
            record.job = Some(job);
        }
        let _ = news.send(format!("Submitted Slurm job {id}."));
        let output = dir.join(format!("parallax-{id}.out"));
        tokio::spawn(self.clone().follow_job(launch, id, output, news.clone()));
        Ok(())
    }

    /// Submits a job of one task, engine `id`, on node `host`: a dead engine's replacement.
    /// What the job says goes to the log (no cell waits for it).
    pub(super) async fn submit_task(
        &self,
        slurm: &Slurm,
        launch: u32,
        host: &str,
        parallax: &str,
        id: u32,
    ) -> anyhow::Result<()> {
        let mut one = slurm.clone();
        one.nodes = None;
        one.sbatch_args.push(format!("--nodelist={host}"));
        let (news, mut heard) = tokio::sync::mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Some(line) = heard.recv().await {
                tracing::info!("engine {id}'s new Slurm task: {line}");
            }
        });
        self.submit_job(&one, launch, 1, parallax, id, &news).await
    }

    /// Asks the job's state each second until it ends or the pool forgets it; says each change.
    async fn follow_job(self, launch: u32, id: String, output: PathBuf, news: News) {
        let mut last = None;
        loop {
            let Some(state) = job_state(&id).await else {
                tokio::time::sleep(POLL_EVERY).await;
                continue;
            };
            let ended = state.has_ended();
            let job = BatchJob {
                id: id.clone(),
                state: state.state.clone(),
                reason: state.reason.clone(),
            };
            {
                let mut registry = self.registry();
                let Some(record) = registry.launches.get_mut(&launch) else {
                    return;
                };
                if state.state == "RUNNING" && record.running_since.is_none() {
                    record.running_since = Some(Instant::now());
                }
                record.job = Some(job.clone());
            }
            if last.as_ref() != Some(&job) {
                let mut line = job.to_string();
                if state.state == "RUNNING" && !state.nodes.is_empty() {
                    line.push_str(&format!(" on {}", state.nodes));
                }
                if let Some(hint) = pending_hint(&state.reason) {
                    line.push_str(&format!(": {hint}"));
                }
                let _ = news.send(line + ".");
                self.notify();
                last = Some(job.clone());
            }
            if ended {
                let mut cause = format!("ended with its {job}");
                if let Some(tail) = last_line(&output) {
                    cause.push_str(&format!("; its output ends: {tail}"));
                }
                let held = self.registry().engines_of(launch);
                for engine in held {
                    self.engine_died(engine, &cause);
                }
                return;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
}

/// What a reason a job waits for means to the user, when it will not pass by itself.
fn pending_hint(reason: &str) -> Option<&'static str> {
    match reason {
        "PartitionConfig" | "PartitionNodeLimit" => Some(
            "it asks for more than the partition has and will not start unless the partition \
             changes; %cluster stop or the stop button cancels it",
        ),
        "PartitionTimeLimit" => Some("its --time is over the partition's limit"),
        "AccountNotAllowed" | "InvalidAccount" => Some("the account may not use this partition"),
        _ => None,
    }
}

/// A job's state as `scontrol show job` tells it.
struct JobState {
    state: String,
    reason: String,
    nodes: String,
}

impl JobState {
    fn has_ended(&self) -> bool {
        !matches!(
            self.state.as_str(),
            "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING" | "SUSPENDED" | "REQUEUED"
        )
    }
}

async fn job_state(id: &str) -> Option<JobState> {
    let mut command = tokio::process::Command::new("scontrol");
    command.args(["show", "job", "-o", id]).kill_on_drop(true);
    let ran = tokio::time::timeout(COMMAND_TIMEOUT, command.output())
        .await
        .ok()?
        .ok()?;
    let said =
        String::from_utf8_lossy(&ran.stdout).into_owned() + &String::from_utf8_lossy(&ran.stderr);
    if said.contains("Invalid job id") {
        // Slurm has forgotten it: it ended a while ago.
        return Some(JobState {
            state: "ENDED".into(),
            reason: String::new(),
            nodes: String::new(),
        });
    }
    parse_job(&said)
}

fn parse_job(line: &str) -> Option<JobState> {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
    };
    Some(JobState {
        state: field("JobState")?,
        reason: field("Reason").unwrap_or_default(),
        nodes: field("NodeList")
            .filter(|n| n != "(null)")
            .unwrap_or_default(),
    })
}

/// The last line of a job's output, when this host can read it.
fn last_line(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_owned())
}

/// Cancels a job, pending or running.
pub(super) async fn cancel(id: &str) {
    let mut command = tokio::process::Command::new("scancel");
    command.arg(id).kill_on_drop(true);
    match tokio::time::timeout(COMMAND_TIMEOUT, command.output()).await {
        Ok(Ok(ran)) if ran.status.success() => tracing::info!("cancelled Slurm job {id}"),
        Ok(Ok(ran)) => tracing::warn!(
            "scancel {id}: {}",
            String::from_utf8_lossy(&ran.stderr).trim()
        ),
        Ok(Err(e)) => tracing::warn!("scancel {id}: {e}"),
        Err(_) => tracing::warn!("scancel {id} did not answer"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_state_and_reason_of_a_job() {
        let line = "JobId=12 JobName=parallax UserId=root(0) JobState=PENDING \
                    Reason=PartitionNodeLimit Dependency=(null) NodeList=(null) NumNodes=3";
        let state = parse_job(line).expect("parsed");
        assert_eq!(state.state, "PENDING");
        assert_eq!(state.reason, "PartitionNodeLimit");
        assert_eq!(state.nodes, "");
        assert!(!state.has_ended());
        let done =
            parse_job("JobId=3 JobState=CANCELLED Reason=None NodeList=host[1-2]").expect("parsed");
        assert!(done.has_ended());
        assert_eq!(done.nodes, "host[1-2]");
        assert!(parse_job("garbage").is_none());
    }

    #[test]
    fn submits_one_task_per_engine_with_the_options_given() {
        let slurm = Slurm {
            partition: Some("debug".into()),
            nodes: Some(2),
            sbatch_args: vec!["--exclusive".into()],
            ..Slurm::default()
        };
        let args = slurm.arguments(4, Path::new("/h/out-%j"));
        assert_eq!(
            args.join(" "),
            "--parsable --job-name=parallax --ntasks=4 --output=/h/out-%j \
             --partition=debug --nodes=2 --exclusive"
        );
        let script = script("/opt/parallax", 4, "{\"key\": \"k\"}");
        assert!(
            script.contains("srun --input=all /opt/parallax engine --connect - --rank-offset 4")
        );
        assert!(script.contains("\n{\"key\": \"k\"}\nPARALLAX_CONNECTION\n"));
    }
}
