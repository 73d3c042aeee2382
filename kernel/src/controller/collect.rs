//! A cell's job on the engines, collected: its tasks' events gathered into pieces (what each
//! engine printed, returned or failed with) until every task is done, with a timeout that
//! interrupts the engines still running. A `JobView` sees each piece as it comes, to show it
//! live; the collector itself shows nothing.

use super::events::TaskEvent;
use super::Controller;
use parallax_engine_protocol::{Outcome, StreamName};
use serde_json::{Map, Value};
use std::time::Duration;
use tokio::sync::mpsc;

/// An engine that does not stop within this long after a timeout's interrupt is given up on.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// One thing an engine produced.
#[derive(Debug, Clone)]
pub enum Piece {
    Stream {
        engine: u32,
        name: StreamName,
        text: String,
    },
    Result {
        engine: u32,
        execution_count: u64,
        data: Map<String, Value>,
    },
    Error {
        engine: u32,
        ename: String,
        evalue: String,
        traceback: Vec<String>,
    },
}

impl Piece {
    pub fn engine(&self) -> u32 {
        match self {
            Piece::Stream { engine, .. }
            | Piece::Result { engine, .. }
            | Piece::Error { engine, .. } => *engine,
        }
    }
}

/// What a finished job produced, in arrival order.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub pieces: Vec<Piece>,
    pub targets: Vec<u32>,
}

impl Report {
    /// The engines that failed, with the error's name.
    pub fn failures(&self) -> Vec<(u32, &str)> {
        self.pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Error { engine, ename, .. } => Some((*engine, ename.as_str())),
                _ => None,
            })
            .collect()
    }
}

/// Sees a job while it is collected.
pub trait JobView: Send {
    /// A piece arrived (output as it is printed, a result, an error).
    fn piece(&mut self, _piece: &Piece) {}
    /// An engine finished its task.
    fn engine_done(&mut self, _engine: u32, _ok: bool) {}
    /// Called every `tick_every()` while the job runs, and with `last` once at its end.
    fn tick(&mut self, _last: bool) {}
    /// How often `tick` is called; None: never.
    fn tick_every(&self) -> Option<Duration> {
        None
    }
}

/// A view that sees nothing.
impl JobView for () {}

/// Collects a job's events until every task in `tasks` is done. With a timeout, interrupts the
/// tasks still running when it passes, and reports those that do not stop.
pub async fn collect(
    controller: &Controller,
    tasks: Vec<(u32, u64)>,
    mut events: mpsc::UnboundedReceiver<TaskEvent>,
    timeout: Option<Duration>,
    view: &mut dyn JobView,
) -> Report {
    let mut report = Report {
        pieces: Vec::new(),
        targets: tasks.iter().map(|(engine, _)| *engine).collect(),
    };
    let mut remaining = tasks;
    let mut deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut timed_out: Vec<u32> = Vec::new();
    let every = view.tick_every();
    let mut tick = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
    while !remaining.is_empty() {
        let received = async {
            match deadline {
                Some(at) => tokio::time::timeout_at(at, events.recv()).await,
                None => Ok(events.recv().await),
            }
        };
        let received = tokio::select! {
            received = received => received,
            _ = tick.tick(), if every.is_some() => {
                view.tick(false);
                continue;
            }
        };
        let event = match received {
            Ok(Some(event)) => event,
            Ok(None) => break,
            Err(_) if timed_out.is_empty() => {
                // First pass: ask the engines still running to stop.
                timed_out = remaining.iter().map(|(e, _)| *e).collect();
                controller.interrupt(&remaining).await;
                deadline = Some(tokio::time::Instant::now() + STOP_GRACE);
                continue;
            }
            Err(_) => {
                // They did not stop: report them and stop waiting.
                for (engine, _) in std::mem::take(&mut remaining) {
                    let piece = Piece::Error {
                        engine,
                        ename: "Timeout".into(),
                        evalue: format!(
                            "engine {engine} was still running after {:.1} s and did not stop",
                            timeout.map_or(0.0, |t| t.as_secs_f64())
                        ),
                        traceback: Vec::new(),
                    };
                    view.piece(&piece);
                    report.pieces.push(piece);
                }
                break;
            }
        };
        let piece = match event {
            TaskEvent::Stream { engine, name, text } => Piece::Stream { engine, name, text },
            TaskEvent::Done {
                engine,
                execution_count,
                outcome,
            } => {
                remaining.retain(|(e, _)| *e != engine);
                view.engine_done(engine, matches!(outcome, Outcome::Ok { .. }));
                let stopped = timed_out.contains(&engine);
                match piece_of_outcome(engine, execution_count, outcome, stopped, timeout) {
                    Some(piece) => piece,
                    None => continue,
                }
            }
            // Data tasks' events; a cell does not produce them.
            _ => continue,
        };
        view.piece(&piece);
        report.pieces.push(piece);
    }
    view.tick(true);
    report
}

/// What a task's outcome shows: its result, if it has one, or its error; an engine stopped by
/// a timeout says so.
fn piece_of_outcome(
    engine: u32,
    execution_count: u64,
    outcome: Outcome,
    timed_out: bool,
    timeout: Option<Duration>,
) -> Option<Piece> {
    match outcome {
        Outcome::Ok { data } if data.is_empty() => None,
        Outcome::Ok { data } => Some(Piece::Result {
            engine,
            execution_count,
            data,
        }),
        Outcome::Error {
            ename,
            evalue,
            traceback,
        } if timed_out && ename == "Interrupted" => Some(Piece::Error {
            engine,
            ename: "Timeout".into(),
            evalue: format!(
                "stopped after {:.1} s: {evalue}",
                timeout.map_or(0.0, |t| t.as_secs_f64())
            ),
            traceback,
        }),
        Outcome::Error {
            ename,
            evalue,
            traceback,
        } => Some(Piece::Error {
            engine,
            ename,
            evalue,
            traceback,
        }),
    }
}
