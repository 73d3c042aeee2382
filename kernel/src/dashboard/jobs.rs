//! Jobs on the dashboard: a user's request to the engines (a `%px` cell, a map, a transfer)
//! from start to end, its progress, its engine tasks (to interrupt it from the page), and the
//! history of finished ones. The book is plain data; the monitor holds it and hands out `Job`
//! handles.

use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
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

struct RunningJob {
    record: JobRecord,
    /// Engine tasks of the job, for interrupting it.
    tasks: Vec<(u32, u64)>,
    cancel: watch::Sender<bool>,
}

/// What a new job is: its kind, its name, its engines, and how many units of work it has.
pub struct NewJob<'a> {
    pub kind: JobKind,
    pub label: &'a str,
    pub engines: &'a [u32],
    pub total: u64,
    pub interruptible: bool,
}

/// The running jobs and the recent history.
#[derive(Default)]
pub struct JobBook {
    next: u64,
    running: BTreeMap<u64, RunningJob>,
    done: VecDeque<JobRecord>,
    /// Bumped whenever a job ends.
    pub version: u64,
}

impl JobBook {
    /// Opens a job started at `start` (seconds); returns its id.
    pub fn open(&mut self, job: NewJob, start: f64) -> u64 {
        self.next += 1;
        let id = self.next;
        let record = JobRecord {
            id,
            kind: job.kind,
            label: job.label.to_owned(),
            engines: job.engines.to_vec(),
            start,
            end: None,
            done: 0,
            total: job.total,
            error: None,
            interruptible: job.interruptible,
        };
        let running = RunningJob {
            record,
            tasks: Vec::new(),
            cancel: watch::channel(false).0,
        };
        self.running.insert(id, running);
        id
    }

    /// Engine tasks that belong to job `id`, for interrupting it.
    pub fn track(&mut self, id: u64, tasks: &[(u32, u64)]) {
        if let Some(job) = self.running.get_mut(&id) {
            job.tasks.extend_from_slice(tasks);
        }
    }

    pub fn update(&mut self, id: u64, change: impl FnOnce(&mut JobRecord)) {
        if let Some(job) = self.running.get_mut(&id) {
            change(&mut job.record);
        }
    }

    /// Fires when job `id` is interrupted from the dashboard (at once if it is not running).
    pub fn cancelled(&self, id: u64) -> watch::Receiver<bool> {
        match self.running.get(&id) {
            Some(job) => job.cancel.subscribe(),
            None => watch::channel(true).1,
        }
    }

    /// Marks job `id` interrupted and returns its engine tasks; None if it is not running or
    /// cannot be interrupted.
    pub fn cancel(&self, id: u64) -> Option<Vec<(u32, u64)>> {
        let job = self.running.get(&id)?;
        if !job.record.interruptible {
            return None;
        }
        job.cancel.send_replace(true);
        Some(job.tasks.clone())
    }

    /// Job `id` ended at `end` (seconds); `error` says why it failed. It moves to the history.
    pub fn end(&mut self, id: u64, end: f64, error: Option<String>) {
        let Some(job) = self.running.remove(&id) else {
            return;
        };
        let mut record = job.record;
        record.end = Some(end);
        record.error = error;
        record.interruptible = false;
        self.done.push_back(record);
        while self.done.len() > JOBS_KEPT {
            self.done.pop_front();
        }
        self.version += 1;
    }

    pub fn running(&self) -> Vec<JobRecord> {
        self.running.values().map(|j| j.record.clone()).collect()
    }

    /// Finished jobs, newest first.
    pub fn done(&self, limit: usize) -> Vec<JobRecord> {
        self.done.iter().rev().take(limit).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dashboard::monitor::Monitor;

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

    #[test]
    fn the_history_keeps_the_last_jobs() {
        let mut book = JobBook::default();
        for i in 0..(JOBS_KEPT as u64 + 5) {
            let job = NewJob {
                kind: JobKind::Px,
                label: "cell",
                engines: &[0],
                total: 1,
                interruptible: true,
            };
            let id = book.open(job, i as f64);
            book.end(id, i as f64 + 0.5, None);
        }
        let done = book.done(usize::MAX);
        assert_eq!(done.len(), JOBS_KEPT);
        assert_eq!(done[0].id, JOBS_KEPT as u64 + 5, "newest first");
        assert_eq!(book.version, JOBS_KEPT as u64 + 5);
        // Ending what is not running changes nothing.
        book.end(1, 0.0, Some("late".into()));
        assert_eq!(book.version, JOBS_KEPT as u64 + 5);
    }
}
