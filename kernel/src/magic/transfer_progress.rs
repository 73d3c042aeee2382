//! The progress block of a transfer that takes over a second: what it is doing, the bytes the
//! engines hold so far, the rate, the time left and which engines are done, redrawn in place;
//! it ends as a summary line.

use super::progress::{bar, ProgressBlock, MAP_AFTER, REDRAW_EVERY};
use crate::jupyter::iopub::CellOut;
use crate::text::{engine_list, html_escape, human_bytes};
use std::future::Future;
use std::time::{Duration, Instant};

pub struct TransferProgress {
    block: ProgressBlock,
    /// The magic and the variable: `%push big`.
    what: String,
    engines: usize,
    /// Set once the values are on their way to the engines.
    moving: Option<Moving>,
}

struct Moving {
    began: Instant,
    total: u64,
    moved: u64,
    done: Vec<u32>,
}

impl TransferProgress {
    pub fn new(out: &CellOut, what: String, engines: usize) -> Self {
        TransferProgress {
            block: ProgressBlock::new(out.clone(), "transfer", Some(MAP_AFTER)),
            what,
            engines,
            moving: None,
        }
    }

    /// Awaits `work`, redrawing the block with `doing` and its time meanwhile.
    pub async fn during<T>(&mut self, doing: &str, work: impl Future<Output = T>) -> T {
        let what = self.what.clone();
        self.redrawing(work, |elapsed| {
            let text = format!("{what}: {doing} ({:.1} s)", elapsed.as_secs_f64());
            let html = html_escape(&text);
            (text, html)
        })
        .await
    }

    /// Awaits `work`, redrawing the block with `doing`, the bytes `counted` of `total` and
    /// their rate meanwhile.
    pub async fn counting<T>(
        &mut self,
        doing: &str,
        counted: &std::sync::atomic::AtomicU64,
        total: u64,
        work: impl Future<Output = T>,
    ) -> T {
        let what = self.what.clone();
        self.redrawing(work, |elapsed| {
            let bytes = counted.load(std::sync::atomic::Ordering::Relaxed);
            let rate = bytes as f64 / elapsed.as_secs_f64().max(1e-3);
            let text = format!(
                "{what}: {doing}: {} of {}, {}/s ({:.1} s)",
                human_bytes(bytes),
                human_bytes(total),
                human_bytes(rate as u64),
                elapsed.as_secs_f64()
            );
            let percent = 100.0 * bytes as f64 / total.max(1) as f64;
            let html = with_bar(percent, &text);
            (text, html)
        })
        .await
    }

    /// Awaits `work`, redrawing the block with what `frame` makes of the time so far.
    async fn redrawing<T>(
        &mut self,
        work: impl Future<Output = T>,
        frame: impl Fn(Duration) -> (String, String),
    ) -> T {
        let mut work = std::pin::pin!(work);
        let mut tick = tokio::time::interval(REDRAW_EVERY);
        let began = Instant::now();
        loop {
            tokio::select! {
                done = &mut work => return done,
                _ = tick.tick() => {
                    if self.block.due() {
                        let (text, html) = frame(began.elapsed());
                        self.block.draw(&text, &html);
                    }
                }
            }
        }
    }

    /// The values are on their way: `total` bytes for the engines to hold in all.
    pub fn moving(&mut self, total: u64) {
        self.moving = Some(Moving {
            began: Instant::now(),
            total,
            moved: 0,
            done: Vec::new(),
        });
    }

    /// `engine` holds its `bytes`.
    pub fn engine_done(&mut self, engine: u32, bytes: u64) {
        if let Some(moving) = &mut self.moving {
            moving.moved += bytes;
            moving.done.push(engine);
            moving.done.sort_unstable();
        }
    }

    /// Redraws the block if it is time to.
    pub fn tick(&mut self) {
        if self.block.due() {
            let (text, html) = self.frame();
            self.block.draw(&text, &html);
        }
    }

    /// The last frame over a block that was shown: what was moved, and how fast.
    pub fn finish(&mut self, failed: bool) {
        let (mut text, _) = self.frame();
        if failed {
            text.push_str(" (stopped)");
        }
        let html = html_escape(&text);
        self.block.finish(&text, &html);
    }

    fn frame(&self) -> (String, String) {
        let Some(moving) = &self.moving else {
            let text = format!("{}: starting", self.what);
            let html = html_escape(&text);
            return (text, html);
        };
        let elapsed = moving.began.elapsed();
        let per_second = moving.moved as f64 / elapsed.as_secs_f64().max(1e-3);
        let left = if moving.moved == 0 || moving.moved >= moving.total {
            String::new()
        } else {
            let seconds = (moving.total - moving.moved) as f64 / per_second;
            format!(
                ", about {} left",
                seconds_text(Duration::from_secs_f64(seconds))
            )
        };
        let text = format!(
            "{}: {} of {} on the engines, {}/s{left}; {} of {} engines done{}",
            self.what,
            human_bytes(moving.moved),
            human_bytes(moving.total),
            human_bytes(per_second as u64),
            moving.done.len(),
            self.engines,
            if moving.done.is_empty() {
                String::new()
            } else {
                format!(" ({})", engine_list(&moving.done))
            },
        );
        let percent = 100.0 * moving.moved as f64 / moving.total.max(1) as f64;
        let html = with_bar(percent, &text);
        (text, html)
    }
}

/// `text` after a bar filled to `percent`, as HTML.
fn with_bar(percent: f64, text: &str) -> String {
    format!(
        "<div style=\"display:flex;align-items:center;gap:8px\">{}<span>{}</span></div>",
        bar(percent, 10, "#4a90d9"),
        html_escape(text)
    )
}

fn seconds_text(left: Duration) -> String {
    let seconds = left.as_secs_f64();
    if seconds < 60.0 {
        format!("{seconds:.0} s")
    } else {
        format!("{:.0} min", seconds / 60.0)
    }
}

#[cfg(test)]
mod tests {
    use super::seconds_text;
    use std::time::Duration;

    #[test]
    fn time_left_reads_in_seconds_then_minutes() {
        assert_eq!(seconds_text(Duration::from_secs_f64(4.4)), "4 s");
        assert_eq!(seconds_text(Duration::from_secs(150)), "2 min");
    }
}
