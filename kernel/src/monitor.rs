//! What the engines are doing, for the dashboard: tasks started and finished on each engine (a
//! cell, a transfer, a chunk of a map), counters, the recent task stream and the latest errors.
//! The controller feeds it as messages pass; nothing in it grows with the session's length:
//! the stream keeps a window of recent tasks and the errors a short list.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Finished tasks older than this leave the stream.
const STREAM_WINDOW: Duration = Duration::from_secs(60);
/// The stream keeps at most this many finished tasks.
const STREAM_LIMIT: usize = 2000;
/// Errors kept for display.
const ERRORS_KEPT: usize = 8;
/// The rate is measured over this window.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// A task as the dashboard knows it: a controller task, or one chunk of a map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskKey {
    Task(u64),
    Chunk { task: u64, chunk: u64 },
}

/// One finished task in the stream. Times are seconds since the monitor started.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord {
    pub engine: u32,
    pub label: String,
    pub start: f64,
    pub end: f64,
    pub ok: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ErrorRecord {
    pub at: f64,
    pub engine: u32,
    pub message: String,
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
}

/// Cheap to clone; every clone sees the same state.
#[derive(Clone)]
pub struct Monitor {
    started: Instant,
    state: Arc<Mutex<State>>,
}

impl Default for Monitor {
    fn default() -> Self {
        Monitor {
            started: Instant::now(),
            state: Arc::default(),
        }
    }
}

impl Monitor {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
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
    }

    /// Names the chunks of the map served as `task`.
    pub fn map_label(&self, task: u64, label: &str) {
        self.state().map_labels.insert(task, label.to_owned());
    }

    pub fn label_of_map(&self, task: u64) -> String {
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
        state.stream.push_back(TaskRecord {
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
    }

    /// How much work job `task` holds back for now.
    pub fn set_queued(&self, task: u64, count: u64) {
        self.state().queued.insert(task, count);
    }

    pub fn snapshot(&self) -> Snapshot {
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
            stream: state.stream.iter().cloned().collect(),
            errors: state.errors.iter().cloned().collect(),
        }
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
