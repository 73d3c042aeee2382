//! What a cell gives back and where its side effects go: its result bundle, the sink its
//! printed output streams to, and how it asks the frontend for input.

use serde_json::{Map, Value};
use std::sync::Arc;

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
