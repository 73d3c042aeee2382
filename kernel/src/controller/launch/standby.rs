//! The standby engine: one engine process on this host, started before any pool, that builds
//! its compiling context and runs the preludes (most of an engine's start) while the kernel is
//! idle, then waits. The first local engine of the next `%cluster start` is that process,
//! adopted with the connection and its id on its stdin: a pool is ready once the others have
//! started their stores. `PARALLAX_STANDBY=0` turns it off (it holds a compiling context).

use super::local;
use crate::controller::Controller;
use anyhow::Context;

/// Turns the standby engine off when set to `0`.
pub const STANDBY_VAR: &str = "PARALLAX_STANDBY";

/// How long a standby engine has to end after SIGTERM.
const STANDBY_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The waiting process, spawned with its stdin open.
pub struct Standby {
    child: tokio::process::Child,
}

impl Controller {
    /// Starts a standby engine, unless one waits already, engines run, or it is turned off.
    pub fn keep_standby(&self) {
        if std::env::var(STANDBY_VAR).is_ok_and(|value| value.trim() == "0") {
            return;
        }
        let mut standby = parallax_eval::ipc::Locked::locked(&*self.standby);
        let waiting = standby
            .as_mut()
            .is_some_and(|s| matches!(s.child.try_wait(), Ok(None)));
        if waiting || self.registry().live_count() > 0 {
            return;
        }
        match spawn() {
            Ok(child) => {
                tracing::info!("standby engine started (pid {})", child.id().unwrap_or(0));
                *standby = Some(Standby { child });
            }
            Err(e) => tracing::warn!("no standby engine: {e:#}"),
        }
    }

    /// The standby engine's process, if one is still alive, to adopt.
    pub(super) fn take_standby(&self) -> Option<tokio::process::Child> {
        let mut taken = parallax_eval::ipc::Locked::locked(&*self.standby).take()?;
        let pid = taken.child.id().unwrap_or(0);
        match taken.child.try_wait() {
            // A process killed a moment ago may not be reaped yet: its state says it is gone.
            Ok(None) if still_running(pid) => Some(taken.child),
            _ => {
                tracing::info!("the standby engine had ended; starting engines afresh");
                None
            }
        }
    }
}

impl Controller {
    /// At the kernel's end: ends the standby engine, if one waits, and removes what it left
    /// on this host. SIGTERM first, which it answers by removing its own directories; SIGKILL
    /// if it has not ended within `STANDBY_GRACE`.
    pub async fn end_standby(&self) {
        let taken = parallax_eval::ipc::Locked::locked(&*self.standby).take();
        let Some(mut standby) = taken else {
            return;
        };
        if let Some(pid) = standby.child.id() {
            super::signal(pid, libc::SIGTERM);
        }
        let ended = tokio::time::timeout(STANDBY_GRACE, standby.child.wait()).await;
        if !matches!(ended, Ok(Ok(_))) {
            // Reaped here, so that the sweep below sees it gone.
            if let Err(e) = standby.child.kill().await {
                tracing::warn!("ending the standby engine: {e}");
            }
        }
        let _ = tokio::task::spawn_blocking(parallax_eval::places::sweep_dead_leftovers).await;
    }
}

/// The process exists and is not a zombie.
fn still_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

fn spawn() -> anyhow::Result<tokio::process::Child> {
    let exe = std::env::current_exe().context("finding the parallax binary")?;
    let mut command = local::standby_command(&exe.to_string_lossy());
    command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        // Read once adopted, with the engine's id (it says little before).
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    command.spawn().context("starting the standby engine")
}
