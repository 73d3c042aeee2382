//! Jobs on the dashboard: a user's request to the engines (a `%px` cell, a map, a transfer)
//! from start to end, its progress, its engine tasks (to interrupt it from the page), and the
//! history of finished ones.

use super::monitor::Monitor;
use serde::Serialize;
use std::time::Instant;
use tokio::sync::watch;

/// Finished jobs kept for the history.
const JOBS_KEPT: usize = 100;

/// What a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Px,
    Pmap,
    Scatter,
    Push,
    Gather,
    Pull,
}

/// A user's request to the engines: a %px cell on some engines, a map, a transfer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobRecord {
    pub id: u64,
    pub kind: JobKind,
    pub label: String,
    pub engines: Vec<u32>,
    pub start: f64,
    pub end: Option<f64>,
    /// Units of work done and in all: items of a map, engines of a cell.
    pub done: u64,
    pub total: u64,
    pub error: Option<String>,
    /// It can be interrupted from the dashboard.
    pub interruptible: bool,
}

pub(super) struct RunningJob {
    pub(super) record: JobRecord,
    /// Engine tasks of the job, for interrupting it.
    pub(super) tasks: Vec<(u32, u64)>,
    pub(super) cancel: watch::Sender<bool>,
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
        let mut state = self.monitor.state();
        if let Some(job) = state.jobs_running.get_mut(&self.id) {
            job.tasks.extend_from_slice(tasks);
        }
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
        {
            let mut state = self.monitor.state();
            if let Some(job) = state.jobs_running.get_mut(&self.id) {
                change(&mut job.record);
            }
        }
        self.monitor.changed();
    }

    /// Fires when the job is interrupted from the dashboard.
    pub fn cancelled(&self) -> watch::Receiver<bool> {
        let state = self.monitor.state();
        match state.jobs_running.get(&self.id) {
            Some(job) => job.cancel.subscribe(),
            None => watch::channel(true).1,
        }
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
        let end = self.monitor.seconds(Instant::now());
        {
            let mut state = self.monitor.state();
            if let Some(job) = state.jobs_running.remove(&self.id) {
                let mut record = job.record;
                record.end = Some(end);
                record.error = error;
                record.interruptible = false;
                state.jobs_done.push_back(record);
                while state.jobs_done.len() > JOBS_KEPT {
                    state.jobs_done.pop_front();
                }
                state.jobs_version += 1;
            }
        }
        self.monitor.changed();
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.end(None);
    }
}

impl Monitor {
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
        let id = {
            let mut state = self.state();
            state.next_job += 1;
            let id = state.next_job;
            state.jobs_running.insert(
                id,
                RunningJob {
                    record: JobRecord {
                        id,
                        kind,
                        label: label.to_owned(),
                        engines: engines.to_vec(),
                        start,
                        end: None,
                        done: 0,
                        total,
                        error: None,
                        interruptible,
                    },
                    tasks: Vec::new(),
                    cancel: watch::channel(false).0,
                },
            );
            id
        };
        self.changed();
        Job {
            monitor: self.clone(),
            id,
            ended: false,
        }
    }

    /// Marks job `id` interrupted and returns its engine tasks; None if it is not running.
    pub fn cancel_job(&self, id: u64) -> Option<Vec<(u32, u64)>> {
        let state = self.state();
        let job = state.jobs_running.get(&id)?;
        if !job.record.interruptible {
            return None;
        }
        job.cancel.send_replace(true);
        Some(job.tasks.clone())
    }

    /// Finished jobs, newest first.
    pub fn jobs_done(&self, limit: usize) -> Vec<JobRecord> {
        self.state()
            .jobs_done
            .iter()
            .rev()
            .take(limit)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_move_from_running_to_history_and_can_be_cancelled() {
        let monitor = Monitor::default();
        let job = monitor.job(JobKind::Pmap, "map f", &[0, 1], 0, true);
        job.track(&[(0, 5), (1, 6)]);
        job.set_total(100);
        job.progress(40);
        let cancelled = job.cancelled();
        let snap = monitor.summary();
        assert_eq!(snap.jobs_running.len(), 1);
        assert_eq!(
            (snap.jobs_running[0].done, snap.jobs_running[0].total),
            (40, 100)
        );
        assert_eq!(monitor.cancel_job(job.id()), Some(vec![(0, 5), (1, 6)]));
        assert!(*cancelled.borrow());
        job.finish(Some("interrupted".into()));
        assert_eq!(monitor.cancel_job(1), None);
        let done = monitor.jobs_done(10);
        assert_eq!(done[0].error.as_deref(), Some("interrupted"));
        assert!(done[0].end.is_some());
        // A job dropped without a word ends without an error; a transfer is not interruptible.
        let transfer = monitor.job(JobKind::Push, "x", &[0], 1, false);
        assert_eq!(monitor.cancel_job(transfer.id()), None);
        drop(transfer);
        let done = monitor.jobs_done(10);
        assert_eq!(
            (done.len(), done[0].kind, done[0].error.clone()),
            (2, JobKind::Push, None)
        );
        assert!(monitor.summary().jobs_running.is_empty());
    }
}
