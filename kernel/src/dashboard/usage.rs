//! CPU and memory of every engine, on whichever host: each engine says what it and its
//! processes use in its answers to the keep-alive pings; here that becomes a CPU share.

use crate::controller::{EngineState, EngineStatus};
use parallax_eval::ipc::Locked;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Each engine's CPU share between its last two reports, and its memory.
#[derive(Default)]
pub struct UsageSampler {
    /// engine -> its last report's CPU seconds and arrival, and the share computed then.
    last: HashMap<u32, (f64, Instant, Option<f64>)>,
}

#[derive(Clone, Copy, Default)]
pub struct Usage {
    pub cpu_percent: Option<f64>,
    pub rss_bytes: u64,
}

impl UsageSampler {
    pub fn sample(&mut self, engines: &[EngineStatus]) -> HashMap<u32, Usage> {
        let mut found = HashMap::new();
        for engine in engines {
            let Some((reported, arrived)) = engine.usage else {
                continue;
            };
            if matches!(engine.state, EngineState::Dead(_)) {
                continue;
            }
            let cpu_percent = match self.last.get(&engine.id) {
                Some(&(_, at, percent)) if at == arrived => percent,
                Some(&(before, at, _)) => {
                    let seconds = arrived.duration_since(at).as_secs_f64().max(1e-3);
                    Some(100.0 * (reported.cpu_seconds - before).max(0.0) / seconds)
                }
                None => None,
            };
            self.last
                .insert(engine.id, (reported.cpu_seconds, arrived, cpu_percent));
            found.insert(
                engine.id,
                Usage {
                    cpu_percent,
                    rss_bytes: reported.rss_bytes,
                },
            );
        }
        found
    }
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
