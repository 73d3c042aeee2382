//! What a cell gives back and where its side effects go: its result bundle, the sink its
//! printed output streams to (and the forwarders that batch evcxr's lines into it), and how it
//! asks the frontend for input.

use crate::ipc::Locked;
use crossbeam_channel::Receiver;
use serde_json::{Map, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a successful cell produced: the MIME bundle of its final expression and rich output.
#[derive(Debug, Default)]
pub struct CellOutput {
    pub data: Map<String, Value>,
}

/// How a stdin prompt from a cell reaches the frontend.
pub type InputAsker = Arc<dyn Fn(&str, bool) -> Option<String> + Send + Sync>;

/// Where a cell's printed output goes: called with "stdout" or "stderr" and a batch of lines.
pub type StreamSink = Arc<dyn Fn(&'static str, &str) + Send + Sync>;

/// A sink that drops what it is given (evcxr's own warm-up cells).
pub fn discard_output() -> StreamSink {
    Arc::new(|_, _| {})
}

/// Forwards one of evcxr's output channels to IOPub as `stream` messages, batching lines that
/// arrive within a couple of milliseconds of each other.
pub(crate) struct StreamForwarder {
    lines: Receiver<String>,
    in_flight: Arc<Mutex<()>>,
}

impl StreamForwarder {
    pub(crate) fn spawn(
        name: &'static str,
        lines: Receiver<String>,
        sink: Arc<Mutex<StreamSink>>,
    ) -> Self {
        let in_flight = Arc::new(Mutex::new(()));
        let forwarder = StreamForwarder {
            lines: lines.clone(),
            in_flight: in_flight.clone(),
        };
        std::thread::Builder::new()
            .name(format!("forward-{name}"))
            .spawn(move || {
                const BATCH_WINDOW: Duration = Duration::from_millis(2);
                const BATCH_BYTES: usize = 64 * 1024;
                while let Ok(first) = lines.recv() {
                    let _publishing = in_flight.locked();
                    let mut text = first;
                    text.push('\n');
                    let deadline = Instant::now() + BATCH_WINDOW;
                    while text.len() < BATCH_BYTES {
                        match lines.recv_deadline(deadline) {
                            Ok(line) => {
                                text.push_str(&line);
                                text.push('\n');
                            }
                            Err(_) => break,
                        }
                    }
                    let sink = sink.locked().clone();
                    sink(name, &text);
                }
            })
            .expect("spawning an output forwarder");
        forwarder
    }

    /// Returns once every line received so far has been published.
    pub(crate) fn flush(&self) {
        while !self.lines.is_empty() {
            std::thread::sleep(Duration::from_micros(200));
        }
        drop(self.in_flight.locked());
    }
}
