//! `%cluster`: start, add, stop and restart engines, show their status (and which of them share
//! compiled cells), and time the control path with `ping`.

use crate::controller::{Controller, EngineState};
use crate::jupyter::iopub::CellOut;
use crate::text::engine_list;
use parallax_eval::{CellError, CellOutput};
use parallax_magics::ClusterCommand;
use std::time::{Duration, Instant};

/// How long `%cluster ping` waits for every engine's answer.
const PING_WITHIN: Duration = Duration::from_secs(5);

pub async fn cluster(
    controller: &Controller,
    command: ClusterCommand,
    out: &CellOut,
) -> Result<CellOutput, CellError> {
    let say = |text: String| out.stdout(&(text + "\n"));
    match command {
        ClusterCommand::Start { engines } => {
            let live = controller.live_engines();
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
            say(start(controller, count).await?);
        }
        ClusterCommand::Add { engines } => say(start(controller, engines).await?),
        ClusterCommand::Stop => {
            let stopped = controller.stop_all().await;
            say(format!("Stopped {stopped} engines."));
        }
        ClusterCommand::Restart => {
            let count = controller.status().len().max(1) as u32;
            let stopped = controller.stop_all().await;
            say(format!("Stopped {stopped} engines."));
            say(start(controller, count).await?);
        }
        ClusterCommand::Status => say(status_table(controller)),
        ClusterCommand::Ping { count } => say(ping(controller, count).await?),
    }
    Ok(CellOutput::default())
}

async fn start(controller: &Controller, count: u32) -> Result<String, CellError> {
    let started = Instant::now();
    let ids = controller
        .start_engines(count)
        .await
        .map_err(|e| CellError::plain("ClusterError", format!("{e:#}")))?;
    let dead: Vec<String> = controller
        .status()
        .iter()
        .filter(|s| ids.contains(&s.id) && matches!(s.state, EngineState::Dead(_)))
        .map(|s| format!("engine {} {}", s.id, s.state))
        .collect();
    let ready = ids.len() - dead.len();
    let mut text = format!(
        "Started {ready} engines in {:.1} s (ids {}).",
        started.elapsed().as_secs_f64(),
        engine_list(&ids)
    );
    if !dead.is_empty() {
        text.push_str(&format!(" Failed: {}.", dead.join("; ")));
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
