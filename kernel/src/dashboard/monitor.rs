//! What the engines are doing, for the dashboards: tasks started and finished on each engine (a
//! cell, a transfer, a chunk of a map), the jobs they belong to, counters, the recent task
//! stream, the whole session's timeline, the engines' recent output and the latest errors.
//! The controller and the jobs feed it as messages pass; nothing in it grows with the session's
//! length: the stream keeps a window of recent tasks, the timeline a fixed number of buckets,
//! and the jobs, errors and output short lists.

use super::jobs::{JobBook, JobKind, JobRecord, NewJob};
use super::timeline::Timeline;
use crate::controller::{Observer, TaskKey};
use parallax_engine_protocol::ToEngine;
use parallax_eval::ipc::Locked;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// Finished tasks older than this leave the stream.
const STREAM_WINDOW: Duration = Duration::from_secs(60);
/// The stream keeps at most this many finished tasks.
const STREAM_LIMIT: usize = 2000;
/// Errors kept for display.
const ERRORS_KEPT: usize = 8;
/// The rate is measured over this window.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// Lines of output kept per engine, and the length a line is cut to.
const OUTPUT_LINES: usize = 200;
const OUTPUT_LINE_CHARS: usize = 400;

/// One finished task in the stream. Times are seconds since the monitor started.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskRecord {
    /// Finished tasks are numbered in the order they finish, from 1.
    pub seq: u64,
    pub engine: u32,
    pub label: String,
    pub start: f64,
    pub end: f64,
    pub ok: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorRecord {
    pub at: f64,
    pub engine: u32,
    pub message: String,
}

/// A line an engine printed. `stream` is stdout or stderr of a cell, or `log` for what the
/// engine process itself wrote (compiler messages, its own errors).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputLine {
    pub seq: u64,
    pub at: f64,
    pub engine: u32,
    pub stream: &'static str,
    pub text: String,
}

/// An engine's activity.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineActivity {
    /// What it runs now and since when (seconds since the monitor started).
    pub current: Option<(String, f64)>,
    pub done: u64,
    pub failed: u64,
}

/// A copy of the state, for rendering.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub now: f64,
    pub queued: u64,
    pub running: u64,
    pub done: u64,
    pub failed: u64,
    /// Tasks finished per second over the last few seconds.
    pub rate: f64,
    pub engines: BTreeMap<u32, EngineActivity>,
    pub stream: Vec<TaskRecord>,
    pub errors: Vec<ErrorRecord>,
    pub jobs_running: Vec<JobRecord>,
    /// Bumped whenever the finished jobs or the timeline change.
    pub jobs_version: u64,
    pub timeline_version: u64,
}

struct Running {
    engine: u32,
    label: String,
    start: f64,
}

#[derive(Default)]
struct State {
    running: HashMap<TaskKey, Running>,
    /// Labels of maps, by their serving task, for their chunks.
    map_labels: HashMap<u64, String>,
    /// Work a job holds back until an engine has room (chunks of a map not sent yet).
    queued: HashMap<u64, u64>,
    done: u64,
    failed: u64,
    engines: BTreeMap<u32, EngineActivity>,
    stream: VecDeque<TaskRecord>,
    errors: VecDeque<ErrorRecord>,
    next_seq: u64,
    timeline: Timeline,
    jobs: JobBook,
    output: BTreeMap<u32, VecDeque<OutputLine>>,
    next_output: u64,
    timeline_version: u64,
}

/// Cheap to clone; every clone sees the same state.
#[derive(Clone)]
pub struct Monitor {
    started: Instant,
    /// Wall-clock time of `started`, in milliseconds since the Unix epoch.
    pub started_wall_ms: f64,
    state: Arc<Mutex<State>>,
    /// Bumped on every change, for live views waiting for news.
    version: Arc<watch::Sender<u64>>,
}

impl Default for Monitor {
    fn default() -> Self {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Monitor {
            started: Instant::now(),
            started_wall_ms: wall.as_secs_f64() * 1000.0,
            state: Arc::default(),
            version: Arc::new(watch::channel(0).0),
        }
    }
}

/// A job's entry in the monitor: it ends when finished or dropped.
pub struct Job {
    monitor: Monitor,
    id: u64,
    ended: bool,
}

impl Job {
    #[cfg(test)]
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Engine tasks that belong to the job, for interrupting it.
    pub fn track(&self, tasks: &[(u32, u64)]) {
        self.monitor.state().jobs.track(self.id, tasks);
    }

    pub fn set_total(&self, total: u64) {
        self.update(|job| job.total = total);
    }

    pub fn progress(&self, done: u64) {
        self.update(|job| job.done = done);
    }

    pub fn advance(&self, more: u64) {
        self.update(|job| job.done += more);
    }

    fn update(&self, change: impl FnOnce(&mut JobRecord)) {
        self.monitor.state().jobs.update(self.id, change);
        self.monitor.changed();
    }

    /// Fires when the job is interrupted from the dashboard.
    pub fn cancelled(&self) -> watch::Receiver<bool> {
        self.monitor.state().jobs.cancelled(self.id)
    }

    pub fn finish(mut self, error: Option<String>) {
        self.end(error);
    }

    /// Ends the job as a cell's outcome says.
    pub fn finish_as<T>(self, outcome: &Result<T, parallax_eval::CellError>) {
        let error = outcome
            .as_ref()
            .err()
            .map(|e| format!("{}: {}", e.ename, e.evalue));
        if error.is_none() {
            self.update(|job| job.done = job.total);
        }
        self.finish(error);
    }

    fn end(&mut self, error: Option<String>) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let end = self.monitor.now();
        self.monitor.state().jobs.end(self.id, end, error);
        self.monitor.changed();
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.end(None);
    }
}

impl Monitor {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.locked()
    }

    fn changed(&self) {
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Fires on every change.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Seconds since the monitor started.
    pub fn now(&self) -> f64 {
        self.seconds(Instant::now())
    }

    /// A job starts: `total` units of work (items, engines).
    pub fn job(
        &self,
        kind: JobKind,
        label: &str,
        engines: &[u32],
        total: u64,
        interruptible: bool,
    ) -> Job {
        let start = self.now();
        let job = NewJob {
            kind,
            label,
            engines,
            total,
            interruptible,
        };
        let id = self.state().jobs.open(job, start);
        self.changed();
        Job {
            monitor: self.clone(),
            id,
            ended: false,
        }
    }

    /// Marks job `id` interrupted and returns its engine tasks; None if it is not running.
    pub fn cancel_job(&self, id: u64) -> Option<Vec<(u32, u64)>> {
        self.state().jobs.cancel(id)
    }

    /// Finished jobs, newest first.
    pub fn jobs_done(&self, limit: usize) -> Vec<JobRecord> {
        self.state().jobs.done(limit)
    }

    /// Text an engine printed; kept line by line.
    pub fn output(&self, engine: u32, stream: &'static str, text: &str) {
        let at = self.now();
        {
            let mut state = self.state();
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                state.next_output += 1;
                let seq = state.next_output;
                let mut kept: String = line.chars().take(OUTPUT_LINE_CHARS).collect();
                if kept.len() < line.len() {
                    kept.push('…');
                }
                let lines = state.output.entry(engine).or_default();
                lines.push_back(OutputLine {
                    seq,
                    at,
                    engine,
                    stream,
                    text: kept,
                });
                while lines.len() > OUTPUT_LINES {
                    lines.pop_front();
                }
            }
        }
        self.changed();
    }

    /// Lines printed after `since`, oldest first, per engine.
    pub fn output_since(&self, since: u64) -> Vec<OutputLine> {
        let state = self.state();
        let mut lines: Vec<OutputLine> = state
            .output
            .values()
            .flat_map(|lines| lines.iter().filter(|l| l.seq > since).cloned())
            .collect();
        lines.sort_by_key(|l| l.seq);
        lines
    }

    /// Finished tasks still in the stream with a number above `since`, and whether some
    /// after `since` have already left it.
    pub fn tasks_since(&self, since: u64) -> (Vec<TaskRecord>, bool) {
        let state = self.state();
        let tasks: Vec<TaskRecord> = state
            .stream
            .iter()
            .filter(|r| r.seq > since)
            .cloned()
            .collect();
        let first_kept = state.stream.front().map_or(state.next_seq + 1, |r| r.seq);
        (tasks, first_kept > since + 1)
    }

    pub fn last_task(&self) -> u64 {
        self.state().next_seq
    }

    pub fn timeline(&self) -> Timeline {
        self.state().timeline.clone()
    }

    fn seconds(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.started).as_secs_f64()
    }

    pub fn started(&self, key: TaskKey, engine: u32, label: &str) {
        let start = self.seconds(Instant::now());
        let mut state = self.state();
        state.engines.entry(engine).or_default().current = Some((label.to_owned(), start));
        state.running.insert(
            key,
            Running {
                engine,
                label: label.to_owned(),
                start,
            },
        );
        drop(state);
        self.changed();
    }

    /// Names the chunks of the map served as `task`.
    fn name_map(&self, task: u64, label: &str) {
        self.state().map_labels.insert(task, label.to_owned());
    }

    fn label_of_map(&self, task: u64) -> String {
        self.state()
            .map_labels
            .get(&task)
            .cloned()
            .unwrap_or_else(|| "map".to_owned())
    }

    /// A task ended: `error` says why when it failed. `took` is the engine's own measure of
    /// its run, when it has one (the start is then moved to match it).
    pub fn finished(&self, key: TaskKey, error: Option<String>, took: Option<Duration>) {
        let end = self.seconds(Instant::now());
        self.record_finish(key, error, took, end);
        self.changed();
    }

    fn record_finish(&self, key: TaskKey, error: Option<String>, took: Option<Duration>, end: f64) {
        let mut state = self.state();
        if let TaskKey::Task(task) = key {
            state.map_labels.remove(&task);
            state.queued.remove(&task);
        }
        let Some(running) = state.running.remove(&key) else {
            return;
        };
        let start = took.map_or(running.start, |t| {
            (end - t.as_secs_f64()).max(running.start)
        });
        let still_running = state
            .running
            .values()
            .filter(|r| r.engine == running.engine)
            .max_by(|a, b| a.start.total_cmp(&b.start))
            .map(|r| (r.label.clone(), r.start));
        let activity = state.engines.entry(running.engine).or_default();
        activity.current = still_running;
        let ok = error.is_none();
        if ok {
            activity.done += 1;
            state.done += 1;
        } else {
            activity.failed += 1;
            state.failed += 1;
        }
        if let Some(message) = error {
            state.errors.push_back(ErrorRecord {
                at: end,
                engine: running.engine,
                message,
            });
            while state.errors.len() > ERRORS_KEPT {
                state.errors.pop_front();
            }
        }
        state
            .timeline
            .add(running.engine, &running.label, start, end, ok);
        state.timeline_version += 1;
        state.next_seq += 1;
        let seq = state.next_seq;
        state.stream.push_back(TaskRecord {
            seq,
            engine: running.engine,
            label: running.label,
            start,
            end,
            ok,
        });
        let oldest = end - STREAM_WINDOW.as_secs_f64();
        while state
            .stream
            .front()
            .is_some_and(|r| r.end < oldest || state.stream.len() > STREAM_LIMIT)
        {
            state.stream.pop_front();
        }
    }

    /// Every task still running on `engine` failed with it.
    pub fn engine_died(&self, engine: u32, cause: &str) {
        let keys: Vec<TaskKey> = self
            .state()
            .running
            .iter()
            .filter(|(_, r)| r.engine == engine)
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            self.finished(key, Some(format!("engine {engine} {cause}")), None);
        }
        self.changed();
    }

    /// How much work job `task` holds back for now.
    pub fn set_queued(&self, task: u64, count: u64) {
        self.state().queued.insert(task, count);
    }

    /// The state with the recent task stream.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot_with(true)
    }

    /// The state without the task stream, for views that take it apart.
    pub fn summary(&self) -> Snapshot {
        self.snapshot_with(false)
    }

    fn snapshot_with(&self, with_stream: bool) -> Snapshot {
        let now = self.seconds(Instant::now());
        let state = self.state();
        let since = now - RATE_WINDOW.as_secs_f64();
        let recent = state.stream.iter().filter(|r| r.end >= since).count();
        let window = RATE_WINDOW.as_secs_f64().min(now.max(1e-3));
        Snapshot {
            now,
            queued: state.queued.values().sum(),
            running: state.running.len() as u64,
            done: state.done,
            failed: state.failed,
            rate: recent as f64 / window,
            engines: state.engines.clone(),
            stream: if with_stream {
                state.stream.iter().cloned().collect()
            } else {
                Vec::new()
            },
            errors: state.errors.iter().cloned().collect(),
            jobs_running: state.jobs.running(),
            jobs_version: state.jobs.version,
            timeline_version: state.timeline_version,
        }
    }
}

/// The controller tells the monitor what every engine does.
impl Observer for Monitor {
    fn sent(&self, engine: u32, message: &ToEngine) {
        match message {
            // A map's chunks are its tasks on the dashboard, under its function's name.
            ToEngine::Map { task, func, .. } => self.name_map(*task, &map_label(func)),
            ToEngine::Chunk { task, chunk, .. } => {
                let label = self.label_of_map(*task);
                let key = TaskKey::Chunk {
                    task: *task,
                    chunk: *chunk,
                };
                self.started(key, engine, &label);
            }
            ToEngine::Execute { task, code, .. } => {
                let label = if code.is_empty() { "warm-up" } else { "cell" };
                self.started(TaskKey::Task(*task), engine, label);
            }
            ToEngine::Store { task, name, .. } => {
                self.started(TaskKey::Task(*task), engine, &format!("store {name}"))
            }
            ToEngine::Fetch { task, name, .. } => {
                self.started(TaskKey::Task(*task), engine, &format!("fetch {name}"))
            }
            ToEngine::Carry {
                task,
                offset: 0,
                total,
            } => self.started(
                TaskKey::Task(*task),
                engine,
                &format!("carry {}", crate::text::human_bytes(*total)),
            ),
            ToEngine::Interrupt { .. }
            | ToEngine::Carry { .. }
            | ToEngine::Release { .. }
            | ToEngine::Received { .. }
            | ToEngine::Ping { .. }
            | ToEngine::Shutdown
            | ToEngine::MapEnd { .. }
            | ToEngine::Shared { .. }
            | ToEngine::Welcome { .. }
            | ToEngine::Adopt { .. }
            | ToEngine::Refused { .. } => {}
        }
    }

    fn finished(&self, key: TaskKey, error: Option<String>, took: Option<Duration>) {
        Monitor::finished(self, key, error, took);
    }

    fn engine_died(&self, engine: u32, cause: &str) {
        Monitor::engine_died(self, engine, cause);
    }

    fn output(&self, engine: u32, stream: &'static str, text: &str) {
        Monitor::output(self, engine, stream, text);
    }
}

/// A map's name on the dashboard: its function, or `closure`.
pub fn map_label(func: &str) -> String {
    if func.trim_start().starts_with('|') {
        "map closure".to_owned()
    } else {
        format!("map {}", func.trim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_tasks_and_deaths() {
        let monitor = Monitor::default();
        monitor.started(TaskKey::Task(1), 0, "cell");
        monitor.started(TaskKey::Chunk { task: 2, chunk: 0 }, 1, "map f");
        monitor.started(TaskKey::Chunk { task: 2, chunk: 1 }, 1, "map f");
        let snap = monitor.snapshot();
        assert_eq!((snap.running, snap.done, snap.failed), (3, 0, 0));
        assert_eq!(
            snap.engines[&0].current.as_ref().map(|c| c.0.as_str()),
            Some("cell")
        );
        monitor.finished(TaskKey::Task(1), None, None);
        monitor.finished(
            TaskKey::Chunk { task: 2, chunk: 0 },
            Some("item 3 panicked".into()),
            Some(Duration::from_millis(1)),
        );
        monitor.engine_died(1, "killed by signal 9");
        let snap = monitor.snapshot();
        assert_eq!((snap.running, snap.done, snap.failed), (0, 1, 2));
        assert_eq!(snap.engines[&0].current, None);
        assert_eq!(snap.stream.len(), 3);
        assert!(!snap.stream[1].ok && snap.stream[1].end >= snap.stream[1].start);
        assert_eq!(snap.errors.len(), 2);
        assert!(snap.errors[1].message.contains("killed by signal 9"));
        // Finishing twice, or what never started, changes nothing.
        monitor.finished(TaskKey::Task(1), None, None);
        monitor.finished(TaskKey::Task(99), None, None);
        assert_eq!(monitor.snapshot().done, 1);
    }

    #[test]
    fn output_is_kept_per_engine_by_line_and_read_from_a_point() {
        let monitor = Monitor::default();
        monitor.output(0, "stdout", "a\nb\n");
        monitor.output(1, "stderr", "oops\n");
        let all = monitor.output_since(0);
        let texts: Vec<&str> = all.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["a", "b", "oops"]);
        assert_eq!(monitor.output_since(2).len(), 1);
        for i in 0..(OUTPUT_LINES + 50) {
            monitor.output(0, "stdout", &format!("line {i}"));
        }
        let engine0 = monitor
            .output_since(0)
            .into_iter()
            .filter(|l| l.engine == 0)
            .count();
        assert_eq!(engine0, OUTPUT_LINES);
        monitor.output(2, "stdout", &"x".repeat(10_000));
        let long = monitor
            .output_since(0)
            .pop()
            .map(|l| l.text)
            .unwrap_or_default();
        assert_eq!(long.chars().count(), OUTPUT_LINE_CHARS + 1);
    }

    #[test]
    fn tasks_are_numbered_and_read_from_a_point() {
        let monitor = Monitor::default();
        for i in 0..5 {
            monitor.started(TaskKey::Task(i), 0, "cell");
            monitor.finished(TaskKey::Task(i), None, None);
        }
        let (tasks, dropped) = monitor.tasks_since(3);
        assert_eq!(tasks.iter().map(|t| t.seq).collect::<Vec<_>>(), [4, 5]);
        assert!(!dropped);
        assert_eq!(monitor.last_task(), 5);
        let timeline = monitor.timeline();
        assert_eq!(timeline.lanes[&0].iter().map(|b| b.tasks).sum::<u32>(), 5);
    }

    #[test]
    fn errors_are_capped() {
        let monitor = Monitor::default();
        for i in 0..20 {
            monitor.started(TaskKey::Task(i), 0, "cell");
            monitor.finished(TaskKey::Task(i), Some(format!("e{i}")), None);
        }
        let snap = monitor.snapshot();
        assert_eq!(snap.errors.len(), ERRORS_KEPT);
        assert_eq!(snap.errors.last().map(|e| e.message.as_str()), Some("e19"));
        assert_eq!(snap.failed, 20);
    }
}
