//! CPU and memory of the local engines, read from /proc: each engine process with its
//! evaluation process and whatever else it started.

use crate::controller::{EngineState, EngineStatus};
use parallax_eval::ipc::Locked;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// CPU and memory of each local engine, with its evaluation process.
#[derive(Default)]
pub struct UsageSampler {
    last: HashMap<u32, (u64, Instant)>,
}

#[derive(Clone, Copy, Default)]
pub struct Usage {
    pub cpu_percent: Option<f64>,
    pub rss_bytes: u64,
}

impl UsageSampler {
    pub fn sample(&mut self, engines: &[EngineStatus]) -> HashMap<u32, Usage> {
        let tree = process_tree();
        let mut found = HashMap::new();
        for engine in engines {
            // Another host's process ids are not this host's to read.
            if matches!(engine.state, EngineState::Dead(_)) || engine.pid == 0 || !engine.local {
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
    for (pid, (parent, _)) in parallax_eval::interrupt::process_table() {
        children.entry(parent).or_default().push(pid);
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

/// A sampler and its latest sample, with when it was taken.
type Cached = (UsageSampler, Option<(Instant, HashMap<u32, Usage>)>);

/// One sampler shared by every view, so that /proc is read at most once per `every`.
#[derive(Clone)]
pub struct SharedUsage {
    every: Duration,
    inner: Arc<Mutex<Cached>>,
}

impl SharedUsage {
    pub fn new(every: Duration) -> Self {
        SharedUsage {
            every,
            inner: Arc::default(),
        }
    }

    pub fn get(&self, engines: &[EngineStatus]) -> HashMap<u32, Usage> {
        let mut inner = self.inner.locked();
        if let Some((at, usage)) = &inner.1 {
            if at.elapsed() < self.every {
                return usage.clone();
            }
        }
        let usage = inner.0.sample(engines);
        inner.1 = Some((Instant::now(), usage.clone()));
        usage
    }
}
