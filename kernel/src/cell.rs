//! A cell, run: its segments in order, Rust to the notebook's own evaluator, magics to their
//! families; the first error stops it, and the last segment's value is the cell's result. With
//! `%autopx` on, the whole cell goes to the engines instead.

use crate::controller::Controller;
use crate::dashboard::monitor::Monitor;
use crate::jupyter::iopub::CellOut;
use crate::magic::Magics;
use parallax_eval::{CellError, CellOutput, Evaluator, InputAsker};
use parallax_magics::Segment;
use serde_json::json;

pub struct CellRunner {
    evaluator: Evaluator,
    magics: Magics,
}

impl CellRunner {
    pub fn new(evaluator: Evaluator, controller: Controller, monitor: Monitor) -> Self {
        CellRunner {
            magics: Magics::new(controller, monitor, evaluator.clone()),
            evaluator,
        }
    }

    /// The notebook's own evaluation context (completion, hover, interrupts).
    pub fn evaluator(&self) -> &Evaluator {
        &self.evaluator
    }

    pub async fn run(
        &mut self,
        code: &str,
        out: &CellOut,
        ask_input: Option<InputAsker>,
    ) -> Result<CellOutput, CellError> {
        if self.magics.autopx() && code.trim() != "%autopx" {
            return self.magics.px_cell(code, out).await;
        }
        let segments = parallax_magics::split_cell(code);
        let last = segments.len().saturating_sub(1);
        let mut result = CellOutput::default();
        for (index, segment) in segments.into_iter().enumerate() {
            let output = match segment {
                Segment::Rust(rust) => {
                    self.evaluator
                        .execute(rust, out.sink(), ask_input.clone())
                        .await?
                }
                Segment::LineMagic(line) => self.magics.run(&line, None, out).await?,
                Segment::CellMagic { line, body } => {
                    self.magics.run(&line, Some(&body), out).await?
                }
            };
            if index == last {
                result = output;
            } else if !output.data.is_empty() {
                // An earlier segment's value is shown, but only the last is the result.
                out.publish(
                    "display_data",
                    json!({"data": output.data, "metadata": {}, "transient": {}}),
                );
            }
        }
        Ok(result)
    }
}
