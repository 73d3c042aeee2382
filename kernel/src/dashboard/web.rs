//! The dashboard in a browser: an HTTP server on 127.0.0.1 (unless told otherwise) that serves
//! one page, a JSON API for scripts, and a stream of server-sent events that keeps the page
//! live. Every request needs the token that `%dashboard` prints in its link; without it the
//! answer is 403. Each event carries only what changed since the last one sent to that page,
//! so its size follows the engines' activity, never the session's length.

use super::block::engine_counts;
use super::monitor::{Monitor, Snapshot};
use super::usage::SharedUsage;
use super::Watched;
use crate::controller::{Controller, EngineState};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use parallax_eval::ipc::same_secret;
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A page gets at most one event per this long...
const MIN_GAP: Duration = Duration::from_millis(100);
/// ...and at least one per this long, for clocks and CPU figures.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// The whole-session timeline is sent at most this often.
const TIMELINE_EVERY: Duration = Duration::from_secs(2);
/// Finished jobs in the history.
const HISTORY_JOBS: usize = 50;

const PAGE: &str = include_str!("page.html");

#[derive(Clone)]
struct App {
    controller: Controller,
    monitor: Monitor,
    token: String,
    usage: SharedUsage,
}

/// A running dashboard server.
pub struct WebDashboard {
    /// The page's address with its token.
    pub url: String,
}

impl WebDashboard {
    /// Binds the server (PARALLAX_DASHBOARD_IP, default 127.0.0.1; PARALLAX_DASHBOARD_PORT,
    /// default a free one) and serves it for the kernel's life.
    pub async fn start(watched: Watched) -> anyhow::Result<Self> {
        let ip: IpAddr = match std::env::var("PARALLAX_DASHBOARD_IP") {
            Ok(ip) => ip
                .parse()
                .map_err(|e| anyhow::anyhow!("PARALLAX_DASHBOARD_IP={ip}: {e}"))?,
            Err(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        let port: u16 = match std::env::var("PARALLAX_DASHBOARD_PORT") {
            Ok(port) => port
                .parse()
                .map_err(|e| anyhow::anyhow!("PARALLAX_DASHBOARD_PORT={port}: {e}"))?,
            Err(_) => 0,
        };
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, port)).await?;
        let bound = listener.local_addr()?;
        let token = uuid::Uuid::new_v4().simple().to_string();
        let app = App {
            controller: watched.controller,
            monitor: watched.monitor,
            token: token.clone(),
            usage: watched.usage,
        };
        let router = Router::new()
            .route("/", get(page))
            .route("/api/state", get(state))
            .route("/api/tasks", get(tasks))
            .route("/api/timeline", get(timeline))
            .route("/api/jobs", get(jobs))
            .route("/api/output", get(output))
            .route("/api/events", get(events))
            .route("/api/jobs/{id}/interrupt", post(interrupt_job))
            .route("/api/engines/{id}/restart", post(restart_engine))
            .layer(middleware::from_fn_with_state(app.clone(), require_token))
            .with_state(app);
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::warn!("dashboard server stopped: {e}");
            }
        });
        let host = if bound.ip().is_unspecified() {
            "localhost".to_owned()
        } else {
            match bound.ip() {
                IpAddr::V6(v6) => format!("[{v6}]"),
                v4 => v4.to_string(),
            }
        };
        let url = format!("http://{host}:{}/?token={token}", bound.port());
        tracing::info!("dashboard at http://{host}:{}/", bound.port());
        Ok(WebDashboard { url })
    }
}

/// The token comes as `?token=` (links, the page's event stream) or as an
/// `Authorization: token …` (or `Bearer …`) header (scripts).
async fn require_token(State(app): State<App>, request: Request, next: Next) -> Response {
    let from_query = request.uri().query().and_then(|query| {
        query.split('&').find_map(|pair| {
            pair.strip_prefix("token=")
                .map(|t| percent_decoded(t).unwrap_or_default())
        })
    });
    let from_header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("token ")
                .or_else(|| v.strip_prefix("Bearer "))
        })
        .map(|t| t.trim().to_owned());
    let allowed = [from_query, from_header]
        .into_iter()
        .flatten()
        .any(|given| same_secret(given.as_bytes(), app.token.as_bytes()));
    if allowed {
        next.run(request).await
    } else {
        (
            StatusCode::FORBIDDEN,
            "403: this dashboard needs its token; open the link that %dashboard prints\n",
        )
            .into_response()
    }
}

/// `%41` to `A`; None for a malformed escape.
fn percent_decoded(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

async fn page() -> Response {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            // The page loads nothing from elsewhere, and no other page may frame it.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
            ),
        ],
        Html(PAGE),
    )
        .into_response()
}

fn wall_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
        * 1000.0
}

/// The cluster bar, the engine rows, the running jobs and the latest errors.
fn state_view(app: &App, snapshot: &Snapshot) -> Value {
    let status = app.controller.status();
    let usage = app.usage.get(&status);
    let (alive, busy, dead) = engine_counts(&status, snapshot);
    let engines: Vec<Value> = status
        .iter()
        .map(|s| {
            let activity = snapshot.engines.get(&s.id);
            let current = activity.and_then(|a| a.current.as_ref());
            let (state, reason) = match &s.state {
                EngineState::Dead(why) => ("dead".to_owned(), Some(why.clone())),
                other => (other.to_string(), None),
            };
            let used = usage.get(&s.id);
            json!({
                "id": s.id,
                "host": s.host,
                "pid": s.pid,
                "state": state,
                "reason": reason,
                "uptime": s.uptime.as_secs_f64(),
                "task": current.map(|c| c.0.clone()),
                "task_since": current.map(|c| c.1),
                "done": activity.map_or(0, |a| a.done),
                "failed": activity.map_or(0, |a| a.failed),
                "cpu": used.and_then(|u| u.cpu_percent),
                "rss": used.map(|u| u.rss_bytes),
            })
        })
        .collect();
    json!({
        "now": snapshot.now,
        "started_wall_ms": app.monitor.started_wall_ms,
        "cluster": {
            "engines": status.len(),
            "alive": alive,
            "busy": busy,
            "dead": dead,
            "queued": snapshot.queued,
            "running": snapshot.running,
            "done": snapshot.done,
            "failed": snapshot.failed,
            "rate": snapshot.rate,
        },
        "engines": engines,
        "jobs_running": snapshot.jobs_running,
        "errors": snapshot.errors,
        "last_task": app.monitor.last_task(),
    })
}

async fn state(State(app): State<App>) -> Json<Value> {
    let snapshot = app.monitor.summary();
    Json(state_view(&app, &snapshot))
}

#[derive(Deserialize)]
struct Since {
    since: Option<u64>,
}

/// Finished tasks numbered above `since` that are still in the recent stream; `complete` is
/// false when some of them have already left it.
async fn tasks(State(app): State<App>, Query(query): Query<Since>) -> Json<Value> {
    let since = query.since.unwrap_or(0);
    let (tasks, dropped) = app.monitor.tasks_since(since);
    Json(json!({
        "tasks": tasks,
        "last_task": app.monitor.last_task(),
        "complete": !dropped,
        "now": app.monitor.now(),
    }))
}

async fn timeline(State(app): State<App>) -> Json<Value> {
    Json(json!(app.monitor.timeline()))
}

#[derive(Deserialize)]
struct Limit {
    limit: Option<usize>,
}

async fn jobs(State(app): State<App>, Query(query): Query<Limit>) -> Json<Value> {
    let monitor = &app.monitor;
    Json(json!({
        "running": monitor.summary().jobs_running,
        "done": monitor.jobs_done(query.limit.unwrap_or(HISTORY_JOBS)),
    }))
}

async fn output(State(app): State<App>, Query(query): Query<Since>) -> Json<Value> {
    Json(json!({"lines": app.monitor.output_since(query.since.unwrap_or(0))}))
}

async fn interrupt_job(State(app): State<App>, Path(id): Path<u64>) -> Response {
    // The job hears it, and its tasks still running are interrupted.
    let cancelled = app.monitor.cancel_job(id);
    if let Some(tasks) = cancelled {
        app.controller.interrupt_running(tasks).await;
        tracing::info!("dashboard: interrupted job {id}");
        Json(json!({"interrupted": id})).into_response()
    } else {
        (
            StatusCode::CONFLICT,
            Json(json!({"error": format!("job {id} is not running or cannot be interrupted")})),
        )
            .into_response()
    }
}

async fn restart_engine(State(app): State<App>, Path(id): Path<u32>) -> Response {
    match app.controller.restart_engine(id).await {
        Ok(()) => Json(json!({"restarted": id})).into_response(),
        Err(e) => (
            StatusCode::CONFLICT,
            Json(json!({"error": format!("{e:#}")})),
        )
            .into_response(),
    }
}

/// What one page has been sent so far.
struct Feed {
    app: App,
    changes: tokio::sync::watch::Receiver<u64>,
    first: bool,
    last_task: u64,
    last_output: u64,
    jobs_version: Option<u64>,
    timeline_version: Option<u64>,
    timeline_sent: Option<Instant>,
}

impl Feed {
    /// Waits for news (or the heartbeat), then says what changed.
    async fn next_frame(&mut self) -> Value {
        if !std::mem::replace(&mut self.first, false) {
            tokio::time::sleep(MIN_GAP).await;
            let _ = tokio::time::timeout(HEARTBEAT, self.changes.changed()).await;
        }
        self.changes.borrow_and_update();
        let monitor = &self.app.monitor;
        let snapshot = monitor.summary();
        let mut frame = json!({"state": state_view(&self.app, &snapshot)});
        let (tasks, _) = monitor.tasks_since(self.last_task);
        if let Some(last) = tasks.last() {
            self.last_task = last.seq;
        }
        frame["tasks"] = json!(tasks);
        let lines = monitor.output_since(self.last_output);
        if let Some(last) = lines.last() {
            self.last_output = last.seq;
        }
        frame["output"] = json!(lines);
        if self.jobs_version != Some(snapshot.jobs_version) {
            self.jobs_version = Some(snapshot.jobs_version);
            frame["jobs"] = json!(monitor.jobs_done(HISTORY_JOBS));
        }
        let timeline_due = self
            .timeline_sent
            .is_none_or(|at| at.elapsed() >= TIMELINE_EVERY);
        if self.timeline_version != Some(snapshot.timeline_version) && timeline_due {
            self.timeline_version = Some(snapshot.timeline_version);
            self.timeline_sent = Some(Instant::now());
            frame["timeline"] = json!(monitor.timeline());
        }
        frame["sent_wall_ms"] = json!(wall_ms());
        frame
    }
}

async fn events(State(app): State<App>) -> impl IntoResponse {
    let feed = Feed {
        changes: app.monitor.watch(),
        app,
        first: true,
        last_task: 0,
        last_output: 0,
        jobs_version: None,
        timeline_version: None,
        timeline_sent: None,
    };
    let stream = futures_util::stream::unfold(feed, |mut feed| async move {
        let frame = feed.next_frame().await;
        let event = Event::default().event("frame").data(frame.to_string());
        Some((Ok::<_, Infallible>(event), feed))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same_secret(b"abc123", b"abc123"));
        assert!(!same_secret(b"abc124", b"abc123"));
        assert!(!same_secret(b"abc12", b"abc123"));
        assert!(!same_secret(b"", b"abc123"));
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(percent_decoded("a%20b+c").as_deref(), Some("a b c"));
        assert_eq!(percent_decoded("%zz"), None);
        assert_eq!(percent_decoded("%4"), None);
    }
}
