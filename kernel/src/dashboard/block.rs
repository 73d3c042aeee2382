//! `%dashboard`: a live block in the notebook that shows what the engines are doing, updated in
//! place with `update_display_data` twice a second, from the controller's monitor. `--stop`
//! freezes it as a static snapshot that stays in the saved notebook. Its text/plain form is a
//! compact table, which is what `jupyter console` shows.

use super::monitor::Snapshot;
use super::usage::{SharedUsage, Usage};
use super::Watched;
use crate::controller::{EngineState, EngineStatus};
use crate::jupyter::iopub::CellOut;
use crate::text::html_escape as escape;
use serde_json::json;
use std::collections::HashMap;
use std::fmt::Write;
use std::time::Duration;
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
    /// Shows a new block under the cell `out` answers and keeps it up to date. `link` is the
    /// browser page's address, shown in the block.
    pub fn start(watched: Watched, out: CellOut, link: Option<String>) -> Self {
        let display_id = format!("dashboard-{}", uuid::Uuid::new_v4());
        let Watched {
            controller,
            monitor,
            usage,
        } = watched;
        let draw = move |usage: &mut SharedUsage, update: bool, frozen: bool| {
            let status = controller.status();
            let snapshot = monitor.snapshot();
            let usage = usage.get(&status);
            let frame = Frame {
                snapshot: &snapshot,
                status: &status,
                usage: &usage,
                frozen,
                link: link.as_deref().filter(|_| !frozen),
            };
            let data = json!({
                "text/plain": render_text(&frame),
                "text/html": render_html(&frame),
            });
            out.show_in_place(&display_id, update, data);
        };
        let mut usage = usage;
        // The first frame belongs to the %dashboard cell's own output, before it ends.
        draw(&mut usage, false, false);
        let (stop, mut stopped) = oneshot::channel();
        let done = tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH);
            tick.tick().await;
            loop {
                let frozen = tokio::select! {
                    _ = tick.tick() => false,
                    _ = &mut stopped => true,
                };
                draw(&mut usage, true, frozen);
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

pub fn engine_counts(status: &[EngineStatus], snapshot: &Snapshot) -> (usize, usize, usize) {
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

/// One drawing of the block: what it shows, as text and as HTML.
struct Frame<'a> {
    snapshot: &'a Snapshot,
    status: &'a [EngineStatus],
    usage: &'a HashMap<u32, Usage>,
    /// The last frame, a snapshot that stays in the notebook.
    frozen: bool,
    /// The browser page's address.
    link: Option<&'a str>,
}

/// The compact table `jupyter console` shows.
fn render_text(frame: &Frame) -> String {
    let Frame {
        snapshot,
        status,
        usage,
        frozen,
        link,
    } = *frame;
    let mut text = header(snapshot, status, frozen);
    text.push('\n');
    if let Some(link) = link {
        let _ = writeln!(text, "In a browser: {link}");
    }
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

fn render_html(frame: &Frame) -> String {
    let Frame {
        snapshot,
        status,
        usage,
        frozen,
        link,
    } = *frame;
    let link = link.map_or(String::new(), |link| {
        format!(
            " <a href=\"{0}\" target=\"_blank\" rel=\"noopener\">open in a browser</a>",
            escape(link)
        )
    });
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
         <div><b>{}</b>{link}</div>\
         <table style=\"border-collapse:collapse;margin:4px 0\"><tr><th>engine</th><th>host</th><th>pid</th><th>state</th><th>task</th><th>for</th><th>done</th><th>CPU</th><th>memory</th></tr>{rows}</table>\
         {}{errors}</div>",
        escape(&header(snapshot, status, frozen)),
        stream_svg(snapshot, status),
    )
}
