//! `%dashboard`: a live block in the notebook that shows what the engines are doing, updated in
//! place with `update_display_data` twice a second, from the controller's monitor. `--stop`
//! freezes it as a static snapshot that stays in the saved notebook. Its text/plain form is a
//! compact table, which is what `jupyter console` shows.

use crate::controller::{Controller, EngineState, EngineStatus};
use crate::iopub::{OutputRoute, Publisher};
use crate::monitor::Snapshot;
use serde_json::json;
use std::collections::HashMap;
use std::fmt::Write;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How often the live block is redrawn.
const REFRESH: Duration = Duration::from_millis(500);
/// The task stream shows this much of the recent past.
const STREAM_SPAN: f64 = 60.0;

/// A live dashboard block: where it is and how to stop it.
pub struct LiveDashboard {
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

impl LiveDashboard {
    /// Publishes a new block answering `route` and keeps it up to date.
    pub fn start(controller: Controller, publisher: Publisher, route: OutputRoute) -> Self {
        let display_id = format!("dashboard-{}", uuid::Uuid::new_v4());
        let mut usage = UsageSampler::default();
        let draw = move |usage: &mut UsageSampler, kind: &str, frozen: bool| {
            let status = controller.status();
            let snapshot = controller.monitor.snapshot();
            let usage = usage.sample(&status);
            publisher.publish(
                &route,
                kind,
                json!({
                    "data": {
                        "text/plain": render_text(&snapshot, &status, &usage, frozen),
                        "text/html": render_html(&snapshot, &status, &usage, frozen),
                    },
                    "metadata": {},
                    "transient": {"display_id": display_id},
                }),
            );
        };
        // The first frame belongs to the %dashboard cell's own output, before it ends.
        draw(&mut usage, "display_data", false);
        let (stop, mut stopped) = oneshot::channel();
        let done = tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH);
            tick.tick().await;
            loop {
                let frozen = tokio::select! {
                    _ = tick.tick() => false,
                    _ = &mut stopped => true,
                };
                draw(&mut usage, "update_display_data", frozen);
                if frozen {
                    return;
                }
            }
        });
        LiveDashboard { stop, done }
    }

    /// Draws the block one last time, as a snapshot, and stops updating it.
    pub async fn freeze(self) {
        let _ = self.stop.send(());
        let _ = self.done.await;
    }
}

/// CPU and memory of each local engine, with its evaluation process.
#[derive(Default)]
struct UsageSampler {
    last: HashMap<u32, (u64, Instant)>,
}

#[derive(Clone, Copy, Default)]
struct Usage {
    cpu_percent: Option<f64>,
    rss_bytes: u64,
}

impl UsageSampler {
    fn sample(&mut self, engines: &[EngineStatus]) -> HashMap<u32, Usage> {
        let tree = process_tree();
        let mut found = HashMap::new();
        for engine in engines {
            if matches!(engine.state, EngineState::Dead(_)) || engine.pid == 0 {
                continue;
            }
            let mut ticks = 0;
            let mut rss_bytes = 0;
            let mut todo = vec![engine.pid];
            while let Some(pid) = todo.pop() {
                if let Some((t, rss)) = cpu_and_memory(pid) {
                    ticks += t;
                    rss_bytes += rss;
                }
                todo.extend(tree.get(&pid).into_iter().flatten());
            }
            let now = Instant::now();
            let cpu_percent = self.last.get(&engine.id).map(|(before, at)| {
                let seconds = now.duration_since(*at).as_secs_f64().max(1e-3);
                100.0 * ticks.saturating_sub(*before) as f64 / clock_ticks() / seconds
            });
            self.last.insert(engine.id, (ticks, now));
            found.insert(
                engine.id,
                Usage {
                    cpu_percent,
                    rss_bytes,
                },
            );
        }
        found
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf takes and returns plain integers.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// parent pid -> child pids, from /proc.
fn process_tree() -> HashMap<u32, Vec<u32>> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return children;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(parent) = stat_fields(pid).and_then(|f| f.get(1).and_then(|p| p.parse().ok())) {
            children.entry(parent).or_default().push(pid);
        }
    }
    children
}

/// The fields of /proc/PID/stat after the command name (state, ppid, ...).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.get(stat.rfind(')')? + 2..)?;
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// CPU ticks used (user + system) and resident bytes of one process.
fn cpu_and_memory(pid: u32) -> Option<(u64, u64)> {
    let fields = stat_fields(pid)?;
    // After the name: state(0) ppid(1) ... utime(11) stime(12) ... rss(21), in pages.
    let number = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    // SAFETY: sysconf takes and returns plain integers.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    Some((number(11)? + number(12)?, number(21)? * page))
}

fn engine_counts(status: &[EngineStatus], snapshot: &Snapshot) -> (usize, usize, usize) {
    let dead = status
        .iter()
        .filter(|s| matches!(s.state, EngineState::Dead(_)))
        .count();
    let busy = status
        .iter()
        .filter(|s| {
            !matches!(s.state, EngineState::Dead(_))
                && snapshot
                    .engines
                    .get(&s.id)
                    .is_some_and(|a| a.current.is_some())
        })
        .count();
    (status.len() - dead, busy, dead)
}

fn header(snapshot: &Snapshot, status: &[EngineStatus], frozen: bool) -> String {
    let (alive, busy, dead) = engine_counts(status, snapshot);
    format!(
        "Parallax dashboard{}: engines {alive} alive, {busy} busy, {dead} dead | tasks {} queued, {} running, {} done, {} failed | {:.1} tasks/s",
        if frozen { " (snapshot)" } else { "" },
        snapshot.queued,
        snapshot.running,
        snapshot.done,
        snapshot.failed,
        snapshot.rate,
    )
}

fn current_task(snapshot: &Snapshot, id: u32) -> (String, String) {
    match snapshot.engines.get(&id).and_then(|a| a.current.as_ref()) {
        Some((label, since)) => (label.clone(), format!("{:.1} s", snapshot.now - since)),
        None => ("-".to_owned(), String::new()),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1 << 20) as f64)
}

fn cpu(usage: Option<&Usage>) -> String {
    usage
        .and_then(|u| u.cpu_percent)
        .map_or("-".to_owned(), |c| format!("{c:.0}%"))
}

/// The compact table `jupyter console` shows.
fn render_text(
    snapshot: &Snapshot,
    status: &[EngineStatus],
    usage: &HashMap<u32, Usage>,
    frozen: bool,
) -> String {
    let mut text = header(snapshot, status, frozen);
    text.push('\n');
    let _ = writeln!(
        text,
        "{:>6}  {:<10} {:>8}  {:<14} {:<24} {:>8} {:>6} {:>6} {:>9}",
        "engine", "host", "pid", "state", "task", "for", "done", "cpu", "memory"
    );
    for s in status {
        let (task, running_for) = current_task(snapshot, s.id);
        let activity = snapshot.engines.get(&s.id);
        let state = match &s.state {
            EngineState::Dead(_) => "dead".to_owned(),
            other => other.to_string(),
        };
        let _ = writeln!(
            text,
            "{:>6}  {:<10} {:>8}  {:<14} {:<24} {:>8} {:>6} {:>6} {:>9}",
            s.id,
            s.host,
            s.pid,
            state,
            truncate(&task, 24),
            running_for,
            activity.map_or(0, |a| a.done),
            cpu(usage.get(&s.id)),
            usage
                .get(&s.id)
                .map_or("-".to_owned(), |u| mib(u.rss_bytes)),
        );
    }
    for error in snapshot.errors.iter().rev().take(3) {
        let _ = writeln!(
            text,
            "error on engine {} at {:.0} s: {}",
            error.engine,
            error.at,
            truncate(&error.message, 100)
        );
    }
    text.trim_end().to_owned()
}

fn truncate(text: &str, width: usize) -> String {
    let first_line = text.lines().next().unwrap_or_default();
    if first_line.chars().count() <= width {
        first_line.to_owned()
    } else {
        let cut: String = first_line.chars().take(width.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A stable colour per label, so that one function keeps its colour.
fn colour(label: &str) -> String {
    let hash = label
        .bytes()
        .fold(2166136261u32, |h, b| (h ^ b as u32).wrapping_mul(16777619));
    format!("hsl({}, 55%, 55%)", hash % 360)
}

/// The task stream of the last minute: one lane per engine, a bar per task.
fn stream_svg(snapshot: &Snapshot, status: &[EngineStatus]) -> String {
    const WIDTH: f64 = 600.0;
    const LANE: f64 = 14.0;
    let lanes: Vec<u32> = status.iter().map(|s| s.id).collect();
    let height = LANE * lanes.len().max(1) as f64 + 14.0;
    let start = snapshot.now - STREAM_SPAN;
    let x = |t: f64| ((t - start) / STREAM_SPAN * WIDTH).clamp(0.0, WIDTH);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" style=\"background:#fafafa\">"
    );
    for (lane, id) in lanes.iter().enumerate() {
        let y = lane as f64 * LANE;
        let _ = write!(
            svg,
            "<text x=\"2\" y=\"{}\" font-size=\"9\" fill=\"#888\">{id}</text>",
            y + 10.0
        );
        for record in snapshot
            .stream
            .iter()
            .filter(|r| r.engine == *id && r.end >= start)
        {
            let (x0, x1) = (x(record.start), x(record.end));
            let fill = if record.ok {
                colour(&record.label)
            } else {
                "#d22".to_owned()
            };
            let _ = write!(
                svg,
                "<rect x=\"{x0:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{fill}\"><title>{} ({:.3} s)</title></rect>",
                y + 2.0,
                (x1 - x0).max(1.0),
                LANE - 4.0,
                escape(&record.label),
                record.end - record.start
            );
        }
        if let Some((label, since)) = snapshot.engines.get(id).and_then(|a| a.current.as_ref()) {
            let x0 = x(*since);
            let _ = write!(
                svg,
                "<rect x=\"{x0:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\" opacity=\"0.5\"><title>{} (running)</title></rect>",
                y + 2.0,
                (WIDTH - x0).max(1.0),
                LANE - 4.0,
                colour(label),
                escape(label)
            );
        }
    }
    let _ = write!(
        svg,
        "<text x=\"{}\" y=\"{}\" font-size=\"9\" fill=\"#888\" text-anchor=\"end\">now</text><text x=\"14\" y=\"{}\" font-size=\"9\" fill=\"#888\">-60 s</text></svg>",
        WIDTH - 2.0,
        height - 2.0,
        height - 2.0
    );
    svg
}

fn render_html(
    snapshot: &Snapshot,
    status: &[EngineStatus],
    usage: &HashMap<u32, Usage>,
    frozen: bool,
) -> String {
    let mut rows = String::new();
    for s in status {
        let (task, running_for) = current_task(snapshot, s.id);
        let activity = snapshot.engines.get(&s.id);
        let state = match &s.state {
            EngineState::Dead(why) => {
                format!("<span style=\"color:#d22\">dead</span> ({})", escape(why))
            }
            other => other.to_string(),
        };
        let _ = write!(
            rows,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{state}</td><td>{}</td><td>{running_for}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            s.id,
            escape(&s.host),
            s.pid,
            escape(&task),
            activity.map_or(0, |a| a.done),
            cpu(usage.get(&s.id)),
            usage.get(&s.id).map_or("-".to_owned(), |u| mib(u.rss_bytes)),
        );
    }
    let errors: String = snapshot
        .errors
        .iter()
        .rev()
        .take(5)
        .map(|e| {
            format!(
                "<li>engine {} at {:.0} s: {}</li>",
                e.engine,
                e.at,
                escape(&truncate(&e.message, 160))
            )
        })
        .collect();
    let errors = if errors.is_empty() {
        String::new()
    } else {
        format!("<div style=\"color:#d22\">Latest errors:<ul style=\"margin:2px 0\">{errors}</ul></div>")
    };
    format!(
        "<div class=\"parallax-dashboard\" style=\"font-family:monospace;font-size:12px\">\
         <div><b>{}</b></div>\
         <table style=\"border-collapse:collapse;margin:4px 0\"><tr><th>engine</th><th>host</th><th>pid</th><th>state</th><th>task</th><th>for</th><th>done</th><th>CPU</th><th>memory</th></tr>{rows}</table>\
         {}{errors}</div>",
        escape(&header(snapshot, status, frozen)),
        stream_svg(snapshot, status),
    )
}
