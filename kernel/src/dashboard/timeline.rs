//! The whole session's task stream, aggregated: each engine's time is cut into equal buckets
//! that say how busy it was, how many tasks ended and failed, and what ran most. When the
//! session outgrows the buckets, neighbours merge and each bucket covers twice the time, so
//! its size never grows with the session's length or its number of tasks.

use serde::Serialize;
use std::collections::BTreeMap;

/// Buckets per engine at most.
pub const MAX_BUCKETS: usize = 512;
/// The first buckets cover this many seconds.
const FIRST_WIDTH: f64 = 0.25;
/// Distinct labels kept; later ones share the last slot.
const MAX_LABELS: usize = 64;

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Bucket {
    /// Seconds of work in this bucket.
    pub busy: f64,
    /// Tasks that ended in it.
    pub tasks: u32,
    pub failed: u32,
    /// The label that had the most work in it, as an index into the labels.
    pub label: u16,
    #[serde(skip)]
    label_busy: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Timeline {
    /// Seconds each bucket covers; bucket `i` of every lane starts at `i * width`.
    pub width: f64,
    pub labels: Vec<String>,
    pub lanes: BTreeMap<u32, Vec<Bucket>>,
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline {
            width: FIRST_WIDTH,
            labels: Vec::new(),
            lanes: BTreeMap::new(),
        }
    }
}

impl Timeline {
    fn label_index(&mut self, label: &str) -> u16 {
        if let Some(i) = self.labels.iter().position(|l| l == label) {
            return i as u16;
        }
        if self.labels.len() + 1 < MAX_LABELS {
            self.labels.push(label.to_owned());
            return (self.labels.len() - 1) as u16;
        }
        if self.labels.len() < MAX_LABELS {
            self.labels.push("other".to_owned());
        }
        (MAX_LABELS - 1) as u16
    }

    /// Halves the resolution: each pair of neighbours becomes one bucket.
    fn coarsen(&mut self) {
        for lane in self.lanes.values_mut() {
            let merged = lane
                .chunks(2)
                .map(|pair| {
                    let mut bucket = pair[0];
                    if let Some(next) = pair.get(1) {
                        bucket.busy += next.busy;
                        bucket.tasks += next.tasks;
                        bucket.failed += next.failed;
                        if next.label_busy > bucket.label_busy {
                            bucket.label = next.label;
                            bucket.label_busy = next.label_busy;
                        }
                    }
                    bucket
                })
                .collect();
            *lane = merged;
        }
        self.width *= 2.0;
    }

    /// Adds a finished task that ran on `engine` from `start` to `end` (seconds since the
    /// session started).
    pub fn add(&mut self, engine: u32, label: &str, start: f64, end: f64, ok: bool) {
        let (start, end) = (start.max(0.0), end.max(start.max(0.0)));
        while (end / self.width) as usize >= MAX_BUCKETS {
            self.coarsen();
        }
        let label = self.label_index(label);
        let width = self.width;
        let first = (start / width) as usize;
        let last = (end / width) as usize;
        let lane = self.lanes.entry(engine).or_default();
        if lane.len() <= last {
            lane.resize(last + 1, Bucket::default());
        }
        for (i, bucket) in lane.iter_mut().enumerate().take(last + 1).skip(first) {
            let from = start.max(i as f64 * width);
            let to = end.min((i + 1) as f64 * width);
            let overlap = (to - from).max(0.0);
            bucket.busy += overlap;
            if overlap >= bucket.label_busy {
                bucket.label = label;
                bucket.label_busy = overlap;
            }
        }
        let ending = &mut lane[last];
        ending.tasks += 1;
        if !ok {
            ending.failed += 1;
        }
    }

    #[cfg(test)]
    pub fn buckets(&self) -> usize {
        self.lanes.values().map(Vec::len).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_is_spread_over_the_buckets_it_covers() {
        let mut timeline = Timeline::default();
        timeline.add(0, "cell", 0.1, 0.6, true);
        timeline.add(1, "map f", 0.0, 0.1, false);
        let lane = &timeline.lanes[&0];
        assert_eq!(lane.len(), 3);
        assert!((lane[0].busy - 0.15).abs() < 1e-9);
        assert!((lane[1].busy - 0.25).abs() < 1e-9);
        assert!((lane[2].busy - 0.1).abs() < 1e-9);
        assert_eq!((lane[2].tasks, lane[0].tasks), (1, 0));
        assert_eq!(timeline.lanes[&1][0].failed, 1);
        assert_eq!(timeline.labels, vec!["cell", "map f"]);
    }

    #[test]
    fn a_long_session_stays_within_its_buckets_and_keeps_its_totals() {
        let mut timeline = Timeline::default();
        let mut busy = 0.0;
        // Ten hours of half-second tasks: 72 000 tasks.
        for i in 0..72_000u32 {
            let start = i as f64 * 0.5;
            timeline.add(
                i % 2,
                &format!("f{}", i % 100),
                start,
                start + 0.4,
                i % 7 != 0,
            );
            busy += 0.4;
        }
        assert!(timeline.buckets() <= MAX_BUCKETS);
        assert!(timeline.labels.len() <= MAX_LABELS);
        let lanes = timeline.lanes.values().flatten();
        let (sum, tasks) = lanes.fold((0.0, 0u32), |(b, t), x| (b + x.busy, t + x.tasks));
        assert!((sum - busy).abs() < 1e-3 * busy);
        assert_eq!(tasks, 72_000);
        assert!(timeline.width * MAX_BUCKETS as f64 >= 36_000.0);
    }
}
