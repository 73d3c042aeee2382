//! Moving values between the notebook's own context and the engines: `%scatter`, `%push`,
//! `%gather`, `%pull`. A generated cell hands the notebook's values to this process over the
//! data socket; they go to the engines as binary buffers of signed messages, and the engines'
//! generated cells store them. Values never appear in source code.

use super::carrying;
use super::progress::REDRAW_EVERY;
use super::select_engines;
use super::transfer_progress::TransferProgress;
use crate::controller::{Controller, TaskEvent};
use crate::jupyter::iopub::CellOut;
use crate::text::{engine_list, human_bytes};
use parallax_engine_protocol::shared::SegmentFile;
use parallax_engine_protocol::Payload;
use parallax_engine_protocol::{Outcome, ToEngine};
use parallax_eval::{cells, CellError, CellOutput, DataPort, Evaluator};
use parallax_magics::{Collect, Distribute, Movement, Targets};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// The notebook's side of data movement: its evaluator, its data socket and the engines.
#[derive(Clone)]
pub struct DataMover {
    pub controller: Controller,
    pub evaluator: Evaluator,
    transfers: Arc<AtomicU64>,
}

impl DataMover {
    pub fn new(controller: Controller, evaluator: Evaluator) -> Self {
        DataMover {
            controller,
            evaluator,
            transfers: Arc::default(),
        }
    }

    /// A fresh id for a transfer through the notebook's data socket.
    pub fn next_transfer(&self) -> u64 {
        self.transfers.fetch_add(1, Ordering::Relaxed)
    }

    /// The ready engines `targets` selects, or a clear error.
    pub fn select(&self, targets: &Option<Targets>) -> Result<Vec<u32>, CellError> {
        select_engines(&self.controller, targets)
    }

    /// The notebook's data socket; the first call builds the `parallax_data` crate.
    pub async fn port(&self) -> Result<DataPort, CellError> {
        self.evaluator.data_port().await
    }

    /// Runs a generated cell in the notebook's context; what it prints is shown.
    pub async fn run_local(&self, code: String, out: &CellOut) -> Result<CellOutput, CellError> {
        self.evaluator.execute(code, out.sink(), None).await
    }

    /// Evaluates `expr` in the notebook and takes its values: its items (`items`) or itself.
    /// Returns them with their type as a cell writes it. `item_type` pins the items' type.
    pub async fn take_local(
        &self,
        expr: &str,
        items: bool,
        item_type: Option<&str>,
        out: &CellOut,
    ) -> Result<(Payload, String), CellError> {
        let port = self.port().await?;
        let id = self.next_transfer();
        let arrived = port.expect(id);
        port.running(id);
        let code = if items {
            cells::send_items(expr, item_type)
        } else {
            cells::send_value(expr)
        };
        let ran = self.run_local(code, out).await;
        port.withdraw(id);
        if let Err(error) = ran {
            return Err(explain_input_error(error, expr, items, item_type));
        }
        let payload = arrived
            .await
            .map_err(|_| CellError::internal("the notebook's values never arrived"))?;
        let spelled = self.evaluator.variable_type(cells::SENT).await;
        let type_src = spelled
            .as_deref()
            .and_then(cells::sent_type)
            .ok_or_else(|| {
                CellError::internal(&format!(
                    "evcxr did not name the type of `{expr}` (found {spelled:?})"
                ))
            })?;
        Ok((payload, type_src))
    }

    /// Stores `payload` in the notebook as `name: Vec<item_type>`.
    pub async fn store_local(
        &self,
        name: &str,
        item_type: &str,
        payload: Payload,
        out: &CellOut,
    ) -> Result<(), CellError> {
        self.store_parts_local(name, item_type, vec![payload], out)
            .await
    }

    /// Stores the items of `parts`, joined in order, in the notebook as `name: Vec<item_type>`.
    /// Parts in shared memory are read from there by the cell, not copied here first.
    pub async fn store_parts_local(
        &self,
        name: &str,
        item_type: &str,
        parts: Vec<Payload>,
        out: &CellOut,
    ) -> Result<(), CellError> {
        let port = self.port().await?;
        let id = self.next_transfer();
        port.offer_parts(id, parts);
        port.running(id);
        let ran = self
            .run_local(cells::receive_items(name, item_type), out)
            .await;
        port.withdraw(id);
        ran.map(|_| ())
    }

    /// `%scatter` and `%push`.
    pub async fn distribute(
        &self,
        command: Distribute,
        out: &CellOut,
    ) -> Result<CellOutput, CellError> {
        let targets = self.select(&command.targets)?;
        let scatter = command.movement == Movement::Scatter;
        let magic = if scatter { "%scatter" } else { "%push" };
        let what = format!("{magic} {}", command.name);
        let mut progress = TransferProgress::new(out, what, targets.len());
        let began = std::time::Instant::now();
        let taking = self.take_local(&command.expr, scatter, None, out);
        let (payload, type_src) = progress
            .during("taking the values in the notebook", taking)
            .await?;
        tracing::debug!(
            "{:?}: took {} bytes from the notebook in {:.3} s",
            command.movement,
            payload.data.len(),
            began.elapsed().as_secs_f64()
        );
        let began = std::time::Instant::now();
        let parts: Vec<Payload> = if scatter {
            split_evenly(payload.meta.count, targets.len() as u64)
                .into_iter()
                .map(|(start, end)| payload.slice(start, end))
                .collect()
        } else {
            vec![payload.clone(); targets.len()]
        };
        let part_of: BTreeMap<u32, &Payload> = targets.iter().copied().zip(&parts).collect();
        // Values for other hosts cross each link once, into shared memory there.
        let carries =
            carrying::carry_to_other_hosts(&self.controller, &part_of, scatter, &mut progress)
                .await;
        if carries.interrupted {
            progress.finish(true);
            return Err(CellError::plain(
                "Interrupted",
                format!(
                    "{magic} {} was stopped while the value crossed to other hosts; \
                     it was stored nowhere",
                    command.name
                ),
            ));
        }
        let mut failed: Vec<String> = carries
            .failed
            .iter()
            .map(|(engine, why)| format!("engine {engine}: {why}"))
            .collect();
        let storing: Vec<u32> = targets
            .iter()
            .copied()
            .filter(|engine| !carries.failed.contains_key(engine))
            .collect();
        let (events, mut event_rx) = mpsc::unbounded_channel();
        self.controller
            .start_shared(&storing, &events, |engine, task, share| {
                let part = part_of[&engine];
                // An engine of this host reads the bytes where the notebook wrote them; one of
                // another host, where they were carried to.
                let region = match carries.regions.get(&engine) {
                    Some(carried) => Some(carried.clone()),
                    None => part.region().filter(|_| self.controller.is_local(engine)),
                };
                let buffers = part.buffers_unless(region.is_some());
                let store = ToEngine::Store {
                    task,
                    name: command.name.clone(),
                    type_src: type_src.clone(),
                    value: !scatter,
                    meta: part.meta.clone().into(),
                    share,
                    region,
                };
                (store, buffers)
            })
            .await;
        drop(events);
        progress.moving(parts.iter().map(|p| p.data.len() as u64).sum());
        let (done, store_failures) = stores_done(&mut event_rx, &mut progress, &part_of).await;
        failed.extend(store_failures);
        progress.finish(!failed.is_empty());
        // Every engine has its own copy now: the carried files can go.
        drop(carries);
        if done < storing.len() {
            failed.push("the pool stopped before every engine answered".into());
        }
        tracing::debug!(
            "{:?}: stored on the engines in {:.3} s",
            command.movement,
            began.elapsed().as_secs_f64()
        );
        if !failed.is_empty() {
            return Err(CellError::plain(
                "DataError",
                format!(
                    "`{}` was not stored on every engine:\n{}",
                    command.name,
                    failed.join("\n")
                ),
            ));
        }
        out.stdout(&stored_summary(
            &command.name,
            &type_src,
            &targets,
            &parts,
            scatter,
        ));
        Ok(CellOutput::default())
    }

    /// `%gather` and `%pull`.
    pub async fn collect(&self, command: Collect, out: &CellOut) -> Result<CellOutput, CellError> {
        let targets = self.select(&command.targets)?;
        let gather = command.movement == Movement::Gather;
        let magic = if gather { "%gather" } else { "%pull" };
        let mut progress = TransferProgress::new(out, format!("{magic} {}", command.name), 0);
        let began = std::time::Instant::now();
        let (events, mut event_rx) = mpsc::unbounded_channel();
        // Files engines of this host write into: removed when this transfer ends, whether or
        // not an engine got as far as making its file.
        let mut destinations = Vec::new();
        self.controller
            .start_shared(&targets, &events, |engine, task, share| {
                let into = self
                    .controller
                    .shared_destination()
                    .filter(|_| self.controller.is_local(engine));
                if let Some(path) = &into {
                    destinations.push(SegmentFile::expected(path.clone()));
                }
                // An engine of another host sends big values in parts.
                let parts = into.is_none() && self.controller.takes_parts();
                let fetch = ToEngine::Fetch {
                    task,
                    name: command.name.clone(),
                    value: !gather,
                    share,
                    into: into.map(|path| path.to_string_lossy().into_owned()),
                    parts,
                };
                (fetch, Vec::new())
            })
            .await;
        drop(events);
        let fetching = fetched_values(&mut event_rx, &command.name, gather);
        let (fetched, mut failed) = progress.during("fetching from the engines", fetching).await;
        for engine in &targets {
            if !fetched.contains_key(engine)
                && failed
                    .iter()
                    .all(|f| !f.starts_with(&format!("engine {engine}:")))
            {
                failed.push(format!("engine {engine}: sent nothing back"));
            }
        }
        if !failed.is_empty() {
            return Err(CellError::plain(
                "DataError",
                format!(
                    "could not fetch `{}` from every engine:\n{}",
                    command.name,
                    failed.join("\n")
                ),
            ));
        }
        let types: Vec<&str> = fetched.values().map(|(t, _)| t.as_str()).collect();
        let item_type = types.first().copied().unwrap_or_default().to_owned();
        if types.iter().any(|t| *t != item_type) {
            let each: Vec<String> = fetched
                .iter()
                .map(|(engine, (t, _))| format!("engine {engine}: {t}"))
                .collect();
            return Err(CellError::plain(
                "DataError",
                format!(
                    "`{}` has different types on the engines ({}); one local Vec cannot hold them",
                    command.name,
                    each.join(", ")
                ),
            ));
        }
        let parts: Vec<Payload> = fetched.into_values().map(|(_, p)| p).collect();
        let type_name = parts
            .first()
            .map(|p| p.meta.type_name.clone())
            .unwrap_or_default();
        let (joined, _) = Payload::joined_layout(&type_name, &parts)
            .map_err(|e| CellError::plain("DataError", e))?;
        let count = joined.count;
        let bytes: u64 = parts.iter().map(|p| p.data.len() as u64).sum();
        tracing::debug!(
            "{:?}: {bytes} bytes from the engines in {:.3} s",
            command.movement,
            began.elapsed().as_secs_f64()
        );
        let began = std::time::Instant::now();
        let storing = self.store_parts_local(&command.local, &item_type, parts, out);
        let stored = progress.during("storing in the notebook", storing).await;
        progress.finish(stored.is_err());
        stored?;
        drop(destinations);
        tracing::debug!(
            "{:?}: stored in the notebook in {:.3} s",
            command.movement,
            began.elapsed().as_secs_f64()
        );
        out.stdout(&format!(
            "{}: Vec<{item_type}> with {count} {} from engines {}, {}.\n",
            command.local,
            if gather { "items" } else { "values" },
            engine_list(&targets),
            human_bytes(bytes)
        ));
        Ok(CellOutput::default())
    }
}

/// What the engines sent back for a `Fetch`, by engine, and what failed where, in words.
async fn fetched_values(
    events: &mut mpsc::UnboundedReceiver<TaskEvent>,
    name: &str,
    gather: bool,
) -> (BTreeMap<u32, (String, Payload)>, Vec<String>) {
    let mut fetched = BTreeMap::new();
    let mut failed = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            TaskEvent::Fetched {
                engine,
                type_src,
                payload,
            } => {
                fetched.insert(engine, (type_src, payload));
            }
            TaskEvent::Done {
                engine,
                outcome: Outcome::Error { ename, evalue, .. },
                ..
            } => failed.push(format!(
                "engine {engine}: {}",
                explain_fetch_error(&ename, &evalue, name, gather)
            )),
            _ => {}
        }
    }
    (fetched, failed)
}

/// Waits for every store's end, drawing the progress meanwhile: how many ended, and how
/// those that failed did.
async fn stores_done(
    event_rx: &mut mpsc::UnboundedReceiver<TaskEvent>,
    progress: &mut TransferProgress,
    part_of: &BTreeMap<u32, &Payload>,
) -> (usize, Vec<String>) {
    let (mut done, mut failed) = (0, Vec::new());
    let mut tick = tokio::time::interval(REDRAW_EVERY);
    loop {
        let event = tokio::select! {
            event = event_rx.recv() => event,
            _ = tick.tick() => {
                progress.tick();
                continue;
            }
        };
        let Some(event) = event else { break };
        if let TaskEvent::Done {
            engine, outcome, ..
        } = event
        {
            done += 1;
            match outcome {
                Outcome::Error { ename, evalue, .. } => {
                    failed.push(format!("engine {engine}: {ename}: {evalue}"))
                }
                _ => progress.engine_done(engine, part_of[&engine].data.len() as u64),
            }
        }
    }
    (done, failed)
}

/// What a push or scatter stored where, in one line.
fn stored_summary(
    name: &str,
    type_src: &str,
    targets: &[u32],
    parts: &[Payload],
    scatter: bool,
) -> String {
    let what = if scatter {
        let sizes: Vec<String> = parts.iter().map(|p| p.meta.count.to_string()).collect();
        format!(
            "{name}: Vec<{type_src}> on engines {} ({} items each)",
            engine_list(targets),
            sizes.join("/")
        )
    } else {
        format!("{name}: {type_src} on engines {}", engine_list(targets))
    };
    format!(
        "Stored {what}, {}.\n",
        human_bytes(parts.iter().map(|p| p.data.len() as u64).sum())
    )
}

/// What an engine's failure to send `name` back means, in the user's words.
fn explain_fetch_error(ename: &str, evalue: &str, name: &str, gather: bool) -> String {
    if ename != "CompileError" {
        return format!("{ename}: {evalue}");
    }
    if evalue.contains("cannot find value") {
        format!("there is no variable `{name}` there")
    } else if evalue.contains("Serialize") {
        format!("`{name}` cannot be sent: its type does not implement serde's Serialize")
    } else if gather {
        format!("`{name}` is not a vector (or anything with items) there; %pull brings back single values ({evalue})")
    } else {
        format!("{ename}: {evalue}")
    }
}

/// Contiguous ranges that split `count` items into `parts` parts whose sizes differ by at most
/// one, the bigger ones first.
pub fn split_evenly(count: u64, parts: u64) -> Vec<(u64, u64)> {
    let parts = parts.max(1);
    let (base, extra) = (count / parts, count % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let size = base + u64::from(i < extra);
            let range = (start, start + size);
            start += size;
            range
        })
        .collect()
}

/// Mentions serde when a type cannot be encoded, and what the input must be when it does not
/// yield the expected items.
pub fn explain_input_error(
    mut error: CellError,
    expr: &str,
    items: bool,
    item_type: Option<&str>,
) -> CellError {
    if error.ename != "CompileError" {
        return error;
    }
    let whole = format!("{} {}", error.evalue, error.traceback.join(" "));
    let note = if whole.contains("Serialize") || whole.contains("Deserialize") {
        format!(
            "the values of `{expr}` cannot be sent: their type does not implement serde's \
             Serialize and Deserialize. Derive them, after \
             `:dep serde = {{ version = \"1\", features = [\"derive\"] }}`, with \
             #[derive(serde::Serialize, serde::Deserialize)]"
        )
    } else if let Some(item_type) = item_type {
        format!("`{expr}` does not yield items of type `{item_type}`, which the function takes")
    } else if items {
        format!("`{expr}` is not something whose items can be sent (a Vec, a slice, a range, an iterator)")
    } else {
        format!("`{expr}` cannot be sent")
    };
    error.evalue = format!("{note}: {}", error.evalue);
    error.traceback.insert(0, format!("DataError: {note}\n"));
    error.ename = "DataError".into();
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_contiguous_and_even() {
        assert_eq!(split_evenly(10, 3), vec![(0, 4), (4, 7), (7, 10)]);
        assert_eq!(split_evenly(2, 3), vec![(0, 1), (1, 2), (2, 2)]);
        assert_eq!(split_evenly(0, 2), vec![(0, 0), (0, 0)]);
    }

    #[test]
    fn fetch_errors_are_explained() {
        let missing = explain_fetch_error(
            "CompileError",
            "cannot find value `x` in this scope",
            "x",
            true,
        );
        assert_eq!(missing, "there is no variable `x` there");
        let scalar = explain_fetch_error(
            "CompileError",
            "the method `parallax_items` exists but its trait bounds were not satisfied",
            "k",
            true,
        );
        assert!(
            scalar.contains("%pull brings back single values"),
            "{scalar}"
        );
        let panic = explain_fetch_error("Panic", "boom", "k", false);
        assert_eq!(panic, "Panic: boom");
    }

    #[test]
    fn serde_errors_say_so() {
        let error = CellError::new(
            "CompileError",
            "the trait bound `P: Serialize` is not satisfied",
            vec![],
        );
        let explained = explain_input_error(error, "points", true, None);
        assert_eq!(explained.ename, "DataError");
        assert!(explained.evalue.contains("#[derive(serde::Serialize"));
        let other = CellError::plain("Panic", "boom");
        assert_eq!(explain_input_error(other.clone(), "x", true, None), other);
    }
}
