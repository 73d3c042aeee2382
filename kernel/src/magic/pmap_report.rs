//! What `%pmap` tells the user while and after it runs: its progress block (items done, rate,
//! ETA, a bar per engine) and, when no engine can serve the map, why, with a hint.

use super::progress::{self, ProgressBlock};
use crate::controller::scheduler::Scheduler;
use crate::jupyter::iopub::CellOut;
use crate::text::{engine_list, html_escape, human_bytes, rate};
use parallax_engine_protocol::Outcome;
use parallax_eval::{cells, CellError};

/// The map's progress block: items done, rate, ETA, and a bar per engine.
pub struct MapProgress {
    block: ProgressBlock,
    out_name: String,
}

impl MapProgress {
    pub fn new(out: &CellOut, out_name: &str) -> Self {
        MapProgress {
            block: ProgressBlock::new(out.clone(), "pmap", Some(progress::MAP_AFTER)),
            out_name: out_name.to_owned(),
        }
    }

    pub fn update(&mut self, map: &Scheduler) {
        if self.block.due() {
            let (text, html) = self.render(map, false);
            self.block.draw(&text, &html);
        }
    }

    pub fn finish(&mut self, map: &Scheduler, stopped: bool) {
        let (text, html) = self.render(map, stopped);
        self.block.finish(&text, &html);
    }

    fn render(&self, map: &Scheduler, stopped: bool) -> (String, String) {
        let (done, total) = (map.finished(), map.total());
        let elapsed = self.block.elapsed();
        let per_second = done as f64 / elapsed.as_secs_f64().max(1e-9);
        let eta = if done > 0 && done < total {
            format!(", ETA {:.1} s", (total - done) as f64 / per_second)
        } else {
            String::new()
        };
        let engines: Vec<String> = map
            .workers()
            .iter()
            .map(|(id, w)| {
                let gone = if w.ended && done < total {
                    " (gone)"
                } else {
                    ""
                };
                format!("{id}: {}{gone}", w.items_done)
            })
            .collect();
        let status = if stopped {
            "stopped"
        } else if done == total {
            "done"
        } else {
            "running"
        };
        let percent = 100.0 * done as f64 / total.max(1) as f64;
        let text = format!(
            "%pmap -> {} {status}: {done}/{total} items ({percent:.0}%), {} items/s, {:.1} s{eta}; per engine {}",
            self.out_name,
            rate(done, elapsed),
            elapsed.as_secs_f64(),
            engines.join(", ")
        );
        let rows: String = map
            .workers()
            .iter()
            .map(|(id, w)| {
                let share = 100.0 * w.items_done as f64 / total.max(1) as f64;
                format!(
                    "<div style=\"display:flex;align-items:center;gap:6px\"><span style=\"width:5em\">engine {id}</span>{}<span style=\"width:7em;text-align:right\">{}</span></div>",
                    progress::bar(share, 6, "#69c"),
                    w.items_done
                )
            })
            .collect();
        let html = format!(
            "<div style=\"font-family:monospace;font-size:12px;max-width:40em\"><div>{}</div>{}{rows}</div>",
            html_escape(&text),
            progress::bar(percent, 10, "#3a7"),
        );
        (text, html)
    }
}

pub fn serve_failure(engine: u32, outcome: &Outcome, func_label: &str) -> String {
    match outcome {
        Outcome::Error { ename, evalue, .. } => format!("engine {engine}: [{ename}] {evalue}"),
        Outcome::Ok { .. } => format!("engine {engine}: ended before serving {func_label}"),
    }
}

/// Why no engine could serve the map, with a hint for the usual causes.
pub fn map_error(failures: &[String], func_label: &str) -> CellError {
    let all = failures.join("\n");
    let hint = if all.contains("cannot find") {
        format!("{func_label} is not defined on the engines; define it there first, with %%px")
    } else if all.contains("Serialize") || all.contains("Deserialize") {
        format!(
            "the argument and result of {func_label} must implement serde's Serialize and \
             Deserialize; derive them with #[derive(serde::Serialize, serde::Deserialize)]"
        )
    } else if all.contains("type annotations needed") {
        "give the closure's argument a type, as in |x: u64| x * x".to_owned()
    } else {
        format!("no engine could run {func_label} as a map")
    };
    CellError::new(
        "MapError",
        format!("{hint}\n{all}"),
        vec![format!("MapError: {hint}\n"), all],
    )
}

/// Failed items named in the cell's last line, at most.
const FAILURES_SHOWN: usize = 20;

/// With `--skip-errors`: how many items failed, which (their indices are in `name`), and the
/// first failure (index, engine, message).
pub fn failures_line(name: &str, indices: &[u64], first: (u64, u32, String)) -> String {
    let (index, engine, message) = first;
    let shown: Vec<String> = indices
        .iter()
        .take(FAILURES_SHOWN)
        .map(u64::to_string)
        .collect();
    let more = if indices.len() > FAILURES_SHOWN {
        ", …"
    } else {
        ""
    };
    format!(
        "{} items failed and were skipped (indices in {name}): {}{more}\n\
         first failure: item {index} on engine {engine}: {message}\n",
        indices.len(),
        shown.join(", ")
    )
}

/// The map's result type as a cell writes it: named by the engines as their serving cells
/// end, or, if every engine that compiled the cell died first, its type name when that is also
/// its spelling.
pub fn result_type(named: Option<String>, type_name: &str) -> Result<String, CellError> {
    let fallback = || cells::type_name_is_source(type_name).then(|| type_name.to_owned());
    named.or_else(fallback).ok_or_else(|| {
        CellError::plain(
            "MapError",
            format!(
                "the engines that compiled the map's cell died before naming its result type \
                 ({type_name}); run the map again on the engines left"
            ),
        )
    })
}

/// The line a map ends with: what was stored, from which engines, how fast, and how many
/// items each engine mapped.
pub fn summary(
    map: &Scheduler,
    stored: &str,
    func_label: &str,
    result_bytes: u64,
    (map_time, setup_time): (std::time::Duration, std::time::Duration),
) -> String {
    let engines: Vec<u32> = map.workers().keys().copied().collect();
    let shares: Vec<String> = map
        .workers()
        .iter()
        .map(|(id, worker)| format!("{id}: {}", worker.items_done))
        .collect();
    format!(
        "{stored} of {func_label} ({}) from engines {}: map {:.3} s, {} items/s (compiling and set-up {:.2} s apart); items per engine {}\n",
        human_bytes(result_bytes),
        engine_list(&engines),
        map_time.as_secs_f64(),
        rate(map.total(), map_time),
        setup_time.as_secs_f64(),
        shares.join(", "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_functions_are_named() {
        let error = map_error(
            &["engine 0: [CompileError] cannot find value `nope` in this scope".into()],
            "`nope`",
        );
        assert!(error
            .evalue
            .contains("`nope` is not defined on the engines"));
        assert!(error.evalue.contains("engine 0"));
    }
}
