//! What the controller tells others: a job hears its tasks' events on a channel of its own, and
//! an observer (the dashboard's monitor) hears every task start and end, deaths and output.
//! Both are given to the controller, which knows nothing of who listens.

use parallax_engine_protocol::{Outcome, Payload, Region, StreamName, ToEngine};
use std::time::Duration;
use tokio::sync::mpsc;

/// What a job hears about its tasks.
#[derive(Debug, Clone)]
pub enum TaskEvent {
    Stream {
        engine: u32,
        name: StreamName,
        text: String,
    },
    Done {
        engine: u32,
        execution_count: u64,
        outcome: Outcome,
    },
    /// The values a `Fetch` asked for.
    Fetched {
        engine: u32,
        type_src: String,
        payload: Payload,
    },
    /// A map's cell is serving on `engine`.
    MapReady {
        engine: u32,
        arg_type: String,
        result_type: String,
    },
    ChunkDone {
        engine: u32,
        chunk: u64,
        elapsed_ns: u64,
        failures: Vec<(u64, String)>,
        results: Payload,
    },
    ChunkRefused {
        engine: u32,
        chunk: u64,
        message: String,
    },
    /// A map's result type, as a cell writes it.
    ResultType { type_src: String },
    /// How many bytes of a carry its engine holds; with all of them, where they are on its
    /// host.
    Carried {
        received: u64,
        region: Option<Region>,
    },
}

/// Where a job hears about its tasks.
pub type Events = mpsc::UnboundedSender<TaskEvent>;

/// A unit of work on an engine as an observer sees it: a task, or one chunk of a map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskKey {
    Task(u64),
    Chunk { task: u64, chunk: u64 },
}

/// Hears what every engine is doing, as messages pass.
pub trait Observer: Send + Sync {
    /// `message` went to `engine`: a new task or chunk, or a control message.
    fn sent(&self, engine: u32, message: &ToEngine);
    /// A task or chunk ended; `error` says why it failed; `took` is the engine's own timing.
    fn finished(&self, key: TaskKey, error: Option<String>, took: Option<Duration>);
    fn engine_died(&self, engine: u32, cause: &str);
    /// What an engine printed: `stream` is stdout or stderr of a cell, or `log` for the
    /// engine process's own lines.
    fn output(&self, engine: u32, stream: &'static str, text: &str);
}
