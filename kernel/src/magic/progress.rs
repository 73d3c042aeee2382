//! A long job's progress block under its cell: it appears once the job has run a while, is
//! redrawn in place at most a few times a second, and ends as a summary. `%px` and `%pmap`
//! each say what goes in it.

use crate::jupyter::iopub::CellOut;
use serde_json::json;
use std::time::{Duration, Instant};

/// A blocking `%px` cell shows its block after this long (ipyparallel's default too)...
pub const PX_AFTER: Duration = Duration::from_secs(2);
/// ...a map after this long, since its bar says more than the engines' names...
pub const MAP_AFTER: Duration = Duration::from_secs(1);
/// ...and either is redrawn at most this often.
pub const REDRAW_EVERY: Duration = Duration::from_millis(250);

pub struct ProgressBlock {
    out: CellOut,
    display_id: String,
    /// None: never shown.
    after: Option<Duration>,
    started: Instant,
    drawn: Option<Instant>,
}

impl ProgressBlock {
    /// A block named `kind` (the start of its display id) that shows after `after`.
    pub fn new(out: CellOut, kind: &str, after: Option<Duration>) -> Self {
        ProgressBlock {
            out,
            display_id: format!("{kind}-{}", uuid::Uuid::new_v4()),
            after,
            started: Instant::now(),
            drawn: None,
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn shown(&self) -> bool {
        self.drawn.is_some()
    }

    /// Time to draw: the job has run long enough and the last frame is old enough.
    pub fn due(&self) -> bool {
        let Some(after) = self.after else {
            return false;
        };
        self.started.elapsed() >= after && self.drawn.is_none_or(|at| at.elapsed() >= REDRAW_EVERY)
    }

    /// Shows the block, or redraws it, with `text` for consoles and `html` for notebooks.
    pub fn draw(&mut self, text: &str, html: &str) {
        self.out.show_in_place(
            &self.display_id,
            self.shown(),
            json!({"text/plain": text, "text/html": html}),
        );
        self.drawn = Some(Instant::now());
    }

    /// The last frame, over a block that was shown; a job too short to show one shows none.
    pub fn finish(&mut self, text: &str, html: &str) {
        if self.shown() {
            self.draw(text, html);
        }
    }
}

/// A bar `percent` full, `height` pixels high, in `colour`.
pub fn bar(percent: f64, height: u32, colour: &str) -> String {
    format!(
        "<div style=\"flex:1;background:#eee;height:{height}px;margin:4px 0\"><div style=\"width:{percent:.1}%;background:{colour};height:{height}px\"></div></div>"
    )
}
