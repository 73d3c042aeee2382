//! A map's scheduler: which chunk of items goes to which engine next. Chunks go to whichever
//! serving engine has room (two in flight each, so none idles on the wire); their size follows
//! the measured cost of an item; the chunks of an engine that stops serving go back in the queue
//! for the others. Pure bookkeeping: the caller sends what it is told and reports what comes
//! back.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Chunks each engine holds at once: one running, one waiting, so it never idles on the wire.
const IN_FLIGHT: usize = 2;
/// Items in the first chunks, before anything is measured.
const PROBE_ITEMS: u64 = 16;
/// The compute time a chunk aims at: long enough to hide the per-chunk cost, short enough to
/// balance the load.
const CHUNK_TARGET: Duration = Duration::from_millis(50);
/// Chunks stay below this many bytes of input.
const CHUNK_BYTES: u64 = 16 << 20;

/// How many items the next chunk gets: `fixed` if given, else enough to take about
/// `CHUNK_TARGET` at the measured cost per item, never so many that an engine would wait for
/// another's big last chunk, nor more than `CHUNK_BYTES` of input.
pub fn chunk_size(
    fixed: Option<u64>,
    cost_ns: Option<f64>,
    remaining: u64,
    engines: u64,
    bytes_per_item: u64,
) -> u64 {
    if let Some(fixed) = fixed {
        return fixed.max(1);
    }
    let spread = remaining.div_ceil(2 * engines.max(1)).max(1);
    let by_bytes = (CHUNK_BYTES / bytes_per_item.max(1)).max(1);
    let wanted = match cost_ns {
        None => PROBE_ITEMS,
        Some(cost) => (CHUNK_TARGET.as_nanos() as f64 / cost.max(1.0)) as u64,
    };
    wanted.clamp(1, spread.min(by_bytes))
}

struct Chunk {
    start: u64,
    end: u64,
    /// The engine running it, if any.
    engine: Option<u32>,
    done: bool,
    /// When it was last sent, for the debug log of round trips.
    sent: Instant,
}

/// An engine's part in the map.
#[derive(Debug, Clone, Default)]
pub struct Worker {
    /// Its serving task.
    pub task: u64,
    /// Serving, and answering.
    pub ready: bool,
    /// Its serving cell ended (or it died).
    pub ended: bool,
    /// It served this map at some point (a task of it answered).
    pub served: bool,
    in_flight: Vec<u64>,
    pub items_done: u64,
}

/// A chunk to send: items `start..end` to `engine`'s serving task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub engine: u32,
    pub task: u64,
    pub chunk: u64,
    pub start: u64,
    pub end: u64,
}

/// A chunk came back: how many items it held and how long its round trip took.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub items: u64,
    pub round_trip: Duration,
}

pub struct Scheduler {
    workers: BTreeMap<u32, Worker>,
    chunks: Vec<Chunk>,
    retry: VecDeque<u64>,
    next_start: u64,
    total: u64,
    fixed_chunk: Option<u64>,
    bytes_per_item: u64,
    /// Nanoseconds an item takes, smoothed.
    cost_ns: Option<f64>,
    finished: u64,
    /// An item failed here: the items from here on are not needed any more.
    limit: Option<u64>,
}

impl Scheduler {
    /// A map served by these engines' tasks, before its items are known.
    pub fn new(serving: &[(u32, u64)]) -> Self {
        let workers = serving
            .iter()
            .map(|&(engine, task)| {
                let worker = Worker {
                    task,
                    ..Worker::default()
                };
                (engine, worker)
            })
            .collect();
        Scheduler {
            workers,
            chunks: Vec::new(),
            retry: VecDeque::new(),
            next_start: 0,
            total: 0,
            fixed_chunk: None,
            bytes_per_item: 1,
            cost_ns: None,
            finished: 0,
            limit: None,
        }
    }

    /// The items: `total` of them, about `bytes` in all; `fixed_chunk` pins the chunk size.
    pub fn set_items(&mut self, total: u64, bytes: u64, fixed_chunk: Option<u64>) {
        self.total = total;
        self.bytes_per_item = bytes.checked_div(total).unwrap_or(1).max(1);
        self.fixed_chunk = fixed_chunk;
    }

    pub fn workers(&self) -> &BTreeMap<u32, Worker> {
        &self.workers
    }

    pub fn worker(&self, engine: u32) -> Option<&Worker> {
        self.workers.get(&engine)
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// Items whose results are in.
    pub fn finished(&self) -> u64 {
        self.finished
    }

    pub fn is_done(&self) -> bool {
        self.finished == self.total
    }

    /// Every engine stopped serving.
    pub fn all_ended(&self) -> bool {
        self.workers.values().all(|w| w.ended)
    }

    /// The serving tasks that have not ended, to end or interrupt.
    pub fn open_tasks(&self) -> Vec<(u32, u64)> {
        self.workers
            .iter()
            .filter(|(_, w)| !w.ended)
            .map(|(id, w)| (*id, w.task))
            .collect()
    }

    /// The lowest serving task, under which the dashboard shows the chunks not sent yet.
    pub fn first_task(&self) -> u64 {
        self.workers
            .values()
            .map(|w| w.task)
            .min()
            .unwrap_or_default()
    }

    /// `engine` serves the map now.
    pub fn serving(&mut self, engine: u32) {
        if let Some(worker) = self.workers.get_mut(&engine) {
            worker.ready = true;
            worker.served = true;
        }
    }

    /// `engine`, whose serving ended, serves again with a new task (it came back): not ready
    /// until that task answers. False if it had not ended.
    pub fn rejoin(&mut self, engine: u32, task: u64) -> bool {
        match self.workers.get_mut(&engine) {
            Some(worker) if worker.ended => {
                *worker = Worker {
                    task,
                    served: true,
                    items_done: worker.items_done,
                    ..Worker::default()
                };
                true
            }
            _ => false,
        }
    }

    /// Hands out chunks to every serving engine with room.
    pub fn assign(&mut self) -> Vec<Assignment> {
        let serving: Vec<u32> = self
            .workers
            .iter()
            .filter(|(_, w)| w.ready && !w.ended)
            .map(|(id, _)| *id)
            .collect();
        let engines = serving.len().max(1) as u64;
        let mut assigned = Vec::new();
        for engine in serving {
            while self.workers[&engine].in_flight.len() < IN_FLIGHT {
                let Some(chunk) = self.next_chunk(engines) else {
                    return assigned;
                };
                let spec = &mut self.chunks[chunk as usize];
                spec.engine = Some(engine);
                spec.sent = Instant::now();
                let (start, end) = (spec.start, spec.end);
                let Some(worker) = self.workers.get_mut(&engine) else {
                    break;
                };
                worker.in_flight.push(chunk);
                assigned.push(Assignment {
                    engine,
                    task: worker.task,
                    chunk,
                    start,
                    end,
                });
            }
        }
        assigned
    }

    /// An item at `index` failed and the map will fail: only the items before it still
    /// matter (one of them may fail too, and the map names the first).
    pub fn stop_at(&mut self, index: u64) {
        self.limit = Some(self.limit.map_or(index, |limit| limit.min(index)));
    }

    /// Every item before `index` is done.
    pub fn done_below(&self, index: u64) -> bool {
        self.next_start >= index.min(self.total)
            && self
                .chunks
                .iter()
                .all(|chunk| chunk.done || chunk.start >= index)
    }

    /// A chunk to run again, else a new one, else none; none at or past the limit.
    fn next_chunk(&mut self, engines: u64) -> Option<u64> {
        let limit = self.limit.unwrap_or(u64::MAX);
        while let Some(chunk) = self.retry.pop_front() {
            if self.chunks[chunk as usize].start < limit {
                return Some(chunk);
            }
        }
        if self.next_start >= self.total.min(limit) {
            return None;
        }
        let remaining = self.total - self.next_start;
        let size = chunk_size(
            self.fixed_chunk,
            self.cost_ns,
            remaining,
            engines,
            self.bytes_per_item,
        );
        let end = (self.next_start + size).min(self.total);
        self.chunks.push(Chunk {
            start: self.next_start,
            end,
            engine: None,
            done: false,
            sent: Instant::now(),
        });
        self.next_start = end;
        Some(self.chunks.len() as u64 - 1)
    }

    /// Chunks not sent yet, as far as can be told (the sizes to come follow the last).
    pub fn queued(&self) -> u64 {
        let last_size = self.chunks.last().map_or(1, |c| (c.end - c.start).max(1));
        self.retry.len() as u64 + (self.total - self.next_start).div_ceil(last_size)
    }

    /// `engine` finished `chunk` in `elapsed_ns` of compute. None when that is no news: an
    /// unknown chunk, one already done, or one since given to another engine.
    pub fn chunk_done(&mut self, engine: u32, chunk: u64, elapsed_ns: u64) -> Option<Finished> {
        let spec = self.chunks.get_mut(chunk as usize)?;
        if spec.done || spec.engine != Some(engine) {
            return None;
        }
        spec.done = true;
        let items = spec.end - spec.start;
        let round_trip = spec.sent.elapsed();
        self.finished += items;
        if items > 0 {
            let per_item = elapsed_ns as f64 / items as f64;
            self.cost_ns = Some(match self.cost_ns {
                Some(old) => 0.5 * old + 0.5 * per_item,
                None => per_item,
            });
        }
        if let Some(worker) = self.workers.get_mut(&engine) {
            worker.in_flight.retain(|c| *c != chunk);
            worker.items_done += items;
        }
        Some(Finished { items, round_trip })
    }

    /// `engine` stopped serving (its cell ended, it died, it sits the map out): its chunks in
    /// flight go back in the queue for the others. Returns how many, or None if it is not one
    /// of the map's engines.
    pub fn engine_ended(&mut self, engine: u32) -> Option<usize> {
        let worker = self.workers.get_mut(&engine)?;
        worker.ended = true;
        let orphans = std::mem::take(&mut worker.in_flight);
        for &chunk in &orphans {
            if let Some(spec) = self.chunks.get_mut(chunk as usize) {
                spec.engine = None;
            }
            self.retry.push_back(chunk);
        }
        Some(orphans.len())
    }

    /// `engine` could not read `chunk`'s items: it is no longer in flight there, and the map
    /// fails (the same items would fail anywhere). Returns the items it held, for the error.
    pub fn chunk_refused(&mut self, engine: u32, chunk: u64) -> Option<(u64, u64)> {
        let spec = self.chunks.get_mut(chunk as usize)?;
        if spec.done || spec.engine != Some(engine) {
            return None;
        }
        spec.engine = None;
        if let Some(worker) = self.workers.get_mut(&engine) {
            worker.in_flight.retain(|c| *c != chunk);
        }
        Some((spec.start, spec.end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_follow_cost_and_spread_the_tail() {
        // Nothing measured: a small probe.
        assert_eq!(chunk_size(None, None, 1_000_000, 2, 8), PROBE_ITEMS);
        // Cheap items: big chunks, but the remainder is left for both engines.
        assert_eq!(chunk_size(None, Some(5.0), 1_000_000, 2, 8), 250_000);
        // 10 ms items: five a chunk, to stay near 50 ms.
        assert_eq!(chunk_size(None, Some(10e6), 400, 2, 8), 5);
        // Very heavy items: one a chunk.
        assert_eq!(chunk_size(None, Some(1e9), 400, 2, 8), 1);
        // Big items: under the byte cap.
        assert_eq!(chunk_size(None, Some(5.0), 1_000_000, 1, 1 << 20), 16);
        // A fixed size wins.
        assert_eq!(chunk_size(Some(7), Some(5.0), 3, 2, 8), 7);
        // The last items still go out.
        assert_eq!(chunk_size(None, Some(5.0), 1, 2, 8), 1);
    }

    /// A map of `total` 8-byte items on engines 0 and 1 (tasks 10 and 11), both serving.
    fn serving_map(total: u64, fixed: Option<u64>) -> Scheduler {
        let mut map = Scheduler::new(&[(0, 10), (1, 11)]);
        map.set_items(total, total * 8, fixed);
        map.serving(0);
        map.serving(1);
        map
    }

    fn covered(assigned: &[Assignment]) -> u64 {
        assigned.iter().map(|a| a.end - a.start).sum()
    }

    #[test]
    fn only_serving_engines_get_chunks_two_at_a_time() {
        let mut map = Scheduler::new(&[(0, 10), (1, 11)]);
        map.set_items(1000, 8000, Some(100));
        assert!(map.assign().is_empty(), "no engine serves yet");
        map.serving(1);
        let first = map.assign();
        assert_eq!(first.len(), IN_FLIGHT);
        assert!(first.iter().all(|a| a.engine == 1 && a.task == 11));
        assert_eq!((first[0].start, first[0].end), (0, 100));
        assert!(map.assign().is_empty(), "engine 1 has no room");
        map.serving(0);
        assert_eq!(map.assign().len(), IN_FLIGHT);
        assert_eq!(map.queued(), 6);
    }

    #[test]
    fn every_item_runs_once_and_the_map_ends() {
        let mut map = serving_map(1000, Some(64));
        let mut seen = vec![0u32; 1000];
        while !map.is_done() {
            let assigned = map.assign();
            assert!(!assigned.is_empty(), "chunks keep coming until the end");
            for a in assigned {
                for item in a.start..a.end {
                    seen[item as usize] += 1;
                }
                let finished = map.chunk_done(a.engine, a.chunk, 1_000);
                assert_eq!(finished.map(|f| f.items), Some(a.end - a.start));
            }
        }
        assert!(seen.iter().all(|&n| n == 1));
        assert_eq!(map.finished(), 1000);
        let per_engine: u64 = map.workers().values().map(|w| w.items_done).sum();
        assert_eq!(per_engine, 1000);
    }

    #[test]
    fn a_dead_engines_chunks_run_again_on_the_others_once() {
        let mut map = serving_map(400, Some(50));
        let assigned = map.assign();
        let lost: Vec<&Assignment> = assigned.iter().filter(|a| a.engine == 0).collect();
        assert_eq!(lost.len(), 2);
        // Engine 1 finishes its own; engine 0 dies holding two chunks.
        for a in assigned.iter().filter(|a| a.engine == 1) {
            assert!(map.chunk_done(1, a.chunk, 10).is_some());
        }
        assert_eq!(map.engine_ended(0), Some(2));
        assert!(!map.all_ended());
        let again = map.assign();
        let rerun: Vec<u64> = again.iter().map(|a| a.chunk).collect();
        assert_eq!(
            rerun,
            [lost[0].chunk, lost[1].chunk],
            "the lost chunks go first"
        );
        assert!(again.iter().all(|a| a.engine == 1));
        // A late answer from the dead engine is no news.
        assert_eq!(map.chunk_done(0, lost[0].chunk, 10), None);
        let mut left: Vec<Assignment> = again;
        while !map.is_done() {
            for a in left.drain(..) {
                assert!(map.chunk_done(1, a.chunk, 10).is_some());
            }
            left = map.assign();
        }
        assert_eq!(map.finished(), 400);
        assert_eq!(map.open_tasks(), [(1, 11)]);
        assert_eq!(map.engine_ended(7), None, "not one of the map's engines");
    }

    #[test]
    fn a_chunk_is_counted_once_and_only_from_its_engine() {
        let mut map = serving_map(100, Some(10));
        let a = map.assign().remove(0);
        let other = if a.engine == 0 { 1 } else { 0 };
        assert_eq!(map.chunk_done(other, a.chunk, 5), None);
        assert!(map.chunk_done(a.engine, a.chunk, 5).is_some());
        assert_eq!(map.chunk_done(a.engine, a.chunk, 5), None);
        assert_eq!(map.chunk_done(a.engine, 999, 5), None);
        assert_eq!(map.finished(), 10);
    }

    #[test]
    fn chunk_sizes_follow_the_measured_cost() {
        let mut map = serving_map(1_000_000, None);
        let probes = map.assign();
        assert!(probes.iter().all(|a| a.end - a.start == PROBE_ITEMS));
        // 1 µs items: the next chunks aim at CHUNK_TARGET, 50 000 items.
        let a = &probes[0];
        map.chunk_done(a.engine, a.chunk, 1_000 * PROBE_ITEMS);
        let next = map.assign();
        assert_eq!(next.len(), 1);
        assert_eq!(covered(&next), CHUNK_TARGET.as_nanos() as u64 / 1_000);
        // Then 10 ns items: the cost is smoothed (half old, half new: 505 ns).
        let b = &next[0];
        map.chunk_done(b.engine, b.chunk, 10 * covered(&next));
        let smoothed = map.assign();
        assert_eq!(
            covered(&smoothed),
            (CHUNK_TARGET.as_nanos() as f64 / 505.0) as u64
        );
    }

    #[test]
    fn a_refused_chunk_names_its_items_once() {
        let mut map = serving_map(100, Some(10));
        let assigned = map.assign();
        let a = &assigned[1];
        assert_eq!(map.chunk_refused(a.engine, a.chunk), Some((a.start, a.end)));
        assert_eq!(map.chunk_refused(a.engine, a.chunk), None);
        // Its engine has room again, and nothing of it counts as done.
        assert_eq!(map.finished(), 0);
        assert_eq!(map.worker(a.engine).map(|w| w.in_flight.len()), Some(1));
    }

    #[test]
    fn at_a_timeout_the_done_items_and_the_tasks_to_stop_are_known() {
        let mut map = serving_map(1000, Some(100));
        let assigned = map.assign();
        let first = &assigned[0];
        map.chunk_done(first.engine, first.chunk, 10);
        map.engine_ended(1);
        // The caller stops the map here: what ran, and whom to interrupt.
        assert_eq!(map.finished(), 100);
        assert!(!map.is_done());
        assert_eq!(map.open_tasks(), [(0, 10)]);
    }

    #[test]
    fn when_every_engine_stops_the_map_knows() {
        let mut map = serving_map(100, Some(10));
        let _ = map.assign();
        map.engine_ended(0);
        map.engine_ended(1);
        assert!(map.all_ended());
        assert!(map.assign().is_empty());
        assert!(map.open_tasks().is_empty());
        assert_eq!(map.queued(), 10, "every chunk is still to run");
    }

    #[test]
    fn after_a_failure_only_the_items_before_it_are_run() {
        let mut map = Scheduler::new(&[(0, 10), (1, 11)]);
        map.set_items(100, 800, Some(10));
        map.serving(0);
        map.serving(1);
        let sent = map.assign();
        assert_eq!(sent.len(), 4);
        // The second chunk (items 10..20) fails at 13 while the first is still out.
        assert!(map.chunk_done(0, sent[1].chunk, 1).is_some());
        map.stop_at(13);
        assert!(!map.done_below(13));
        // Nothing past the failure is handed out any more.
        assert!(map.assign().is_empty());
        let first = sent.iter().find(|a| a.start == 0).expect("chunk 0..10");
        assert!(map.chunk_done(first.engine, first.chunk, 1).is_some());
        assert!(map.done_below(13));
    }
}
