//! The shell channel: each request answered in turn (execute, complete, inspect, is_complete,
//! history, comms), one at a time, in arrival order, as Jupyter frontends expect. A cell's work
//! is the `CellRunner`'s; this file speaks the protocol around it.

use super::completeness::{self, Completeness};
use super::history::History;
use super::iopub::{CellOut, OutputRoute, Publisher, Session};
use super::stdin::StdinBridge;
use super::wire::{send_logged, WireMessage};
use crate::cell::CellRunner;
use jupyter_protocol::{ExecuteRequest, JupyterMessageContent};
use parallax_eval::{CellError, InputAsker};
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::mpsc;
use zeromq::RouterSendHalf;

pub struct Shell {
    session: Session,
    publisher: Publisher,
    cells: CellRunner,
    stdin: StdinBridge,
    socket: RouterSendHalf,
    kernel_info: Value,
    shutdown: mpsc::UnboundedSender<()>,
    history: History,
    execution_count: i64,
    /// Requests taken off the queue while aborting after an error, to be served next.
    deferred: VecDeque<WireMessage>,
}

impl Shell {
    pub fn new(
        session: Session,
        publisher: Publisher,
        cells: CellRunner,
        stdin: StdinBridge,
        socket: RouterSendHalf,
        kernel_info: Value,
        shutdown: mpsc::UnboundedSender<()>,
    ) -> Self {
        Shell {
            session,
            publisher,
            cells,
            stdin,
            socket,
            kernel_info,
            shutdown,
            history: History::default(),
            execution_count: 0,
            deferred: VecDeque::new(),
        }
    }

    pub async fn run(mut self, mut queue: mpsc::UnboundedReceiver<WireMessage>) {
        loop {
            let request = match self.deferred.pop_front() {
                Some(request) => request,
                None => match queue.recv().await {
                    Some(request) => request,
                    None => return,
                },
            };
            let route = OutputRoute::answering(&request);
            self.publisher.status(&route, "busy");
            let failed = self.handle(&request, &route).await;
            self.publisher.status(&route, "idle");
            if failed {
                self.abort_queued(&mut queue).await;
            }
        }
    }

    async fn reply(&mut self, request: &WireMessage, msg_type: &str, content: Value) {
        let reply = self.session.reply(request, msg_type, content);
        send_logged(&mut self.socket, self.session.encode(&reply), "shell").await;
    }

    /// Handles one request. Returns true when an execute failed and asked to stop on error.
    async fn handle(&mut self, request: &WireMessage, route: &OutputRoute) -> bool {
        match request.msg_type() {
            "kernel_info_request" => {
                let info = self.kernel_info.clone();
                self.reply(request, "kernel_info_reply", info).await;
            }
            "execute_request" => return self.execute(request, route).await,
            "is_complete_request" => {
                let code = request.content["code"].as_str().unwrap_or_default();
                let content = match completeness::check(code) {
                    Completeness::Complete => json!({"status": "complete"}),
                    Completeness::Incomplete(indent) => {
                        json!({"status": "incomplete", "indent": indent})
                    }
                    Completeness::Invalid => json!({"status": "invalid"}),
                };
                self.reply(request, "is_complete_reply", content).await;
            }
            "complete_request" => {
                let content = self.complete(&request.content).await;
                self.reply(request, "complete_reply", content).await;
            }
            "inspect_request" => {
                let content = self.inspect(&request.content).await;
                self.reply(request, "inspect_reply", content).await;
            }
            "history_request" => {
                let history = self.history.query(&request.content);
                let content = json!({"status": "ok", "history": history});
                self.reply(request, "history_reply", content).await;
            }
            "comm_info_request" => {
                // No comm targets exist yet; the reply says so.
                self.reply(
                    request,
                    "comm_info_reply",
                    json!({"status": "ok", "comms": {}}),
                )
                .await;
            }
            "comm_open" => {
                let comm_id = request.content["comm_id"].clone();
                let target = request.content["target_name"].as_str().unwrap_or_default();
                tracing::info!("comm_open for unknown target {target:?}: closing it");
                self.publisher.publish(
                    route,
                    "comm_close",
                    json!({"comm_id": comm_id, "data": {}}),
                );
            }
            "comm_msg" | "comm_close" => {}
            "shutdown_request" => {
                let restart = request.content["restart"].as_bool().unwrap_or(false);
                let content = json!({"status": "ok", "restart": restart});
                self.reply(request, "shutdown_reply", content).await;
                let _ = self.shutdown.send(());
            }
            other => tracing::warn!("shell: ignored a {other} message"),
        }
        false
    }

    /// After a failed cell with `stop_on_error`, the executes already queued are answered with
    /// `aborted` instead of running against a state their author did not expect.
    async fn abort_queued(&mut self, queue: &mut mpsc::UnboundedReceiver<WireMessage>) {
        while let Ok(request) = queue.try_recv() {
            if request.msg_type() == "execute_request" {
                let route = OutputRoute::answering(&request);
                self.publisher.status(&route, "busy");
                let content = json!({"status": "aborted", "execution_count": self.execution_count});
                self.reply(&request, "execute_reply", content).await;
                self.publisher.status(&route, "idle");
            } else {
                self.deferred.push_back(request);
            }
        }
    }

    async fn execute(&mut self, request: &WireMessage, route: &OutputRoute) -> bool {
        let parsed = JupyterMessageContent::from_type_and_content(
            "execute_request",
            request.content.clone(),
        );
        let req: ExecuteRequest = match parsed {
            Ok(JupyterMessageContent::ExecuteRequest(req)) => req,
            other => {
                let problem = match other {
                    Err(e) => e.to_string(),
                    Ok(_) => "unexpected content".to_owned(),
                };
                tracing::warn!("shell: malformed execute_request: {problem}");
                let error = CellError::plain(
                    "BadRequest",
                    format!("malformed execute_request: {problem}"),
                );
                self.reply(
                    request,
                    "execute_reply",
                    error_reply(&error, self.execution_count),
                )
                .await;
                return false;
            }
        };
        let store_history = req.store_history && !req.silent;
        if store_history {
            self.execution_count += 1;
        }
        let count = self.execution_count;
        if !req.silent {
            self.publisher.publish(
                route,
                "execute_input",
                json!({"code": req.code, "execution_count": count}),
            );
        }
        let ask_input = req.allow_stdin.then(|| self.input_asker(request));
        let out = CellOut::new(self.publisher.clone(), route.clone());
        let outcome = self.cells.run(&req.code, &out, ask_input).await;
        match outcome {
            Ok(output) => {
                let plain = output
                    .data
                    .get("text/plain")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                if !req.silent && !output.data.is_empty() {
                    self.publish_output(route, output.data, count);
                }
                if store_history {
                    self.history.record(count, &req.code, plain);
                }
                let content = json!({
                    "status": "ok",
                    "execution_count": count,
                    "payload": [],
                    "user_expressions": {},
                });
                self.reply(request, "execute_reply", content).await;
                false
            }
            Err(error) => {
                if store_history {
                    self.history.record(count, &req.code, None);
                }
                self.publisher.publish(
                    route,
                    "error",
                    json!({"ename": error.ename, "evalue": error.evalue, "traceback": error.traceback}),
                );
                self.reply(request, "execute_reply", error_reply(&error, count))
                    .await;
                req.stop_on_error
            }
        }
    }

    /// A final expression's value (it has `text/plain`) is the cell's `execute_result`; rich
    /// output without one is `display_data`.
    fn publish_output(&self, route: &OutputRoute, data: Map<String, Value>, count: i64) {
        match count {
            count if data.contains_key("text/plain") => self.publisher.publish(
                route,
                "execute_result",
                json!({"execution_count": count, "data": data, "metadata": {}}),
            ),
            _ => self.publisher.publish(
                route,
                "display_data",
                json!({"data": data, "metadata": {}, "transient": {}}),
            ),
        }
    }

    fn input_asker(&self, request: &WireMessage) -> InputAsker {
        let bridge = self.stdin.clone();
        let identities = request.identities.clone();
        let parent = request.header.clone();
        let interrupter = self.cells.evaluator().interrupter().clone();
        Arc::new(move |prompt: &str, password: bool| {
            bridge.ask(
                &identities,
                &parent,
                prompt,
                password,
                interrupter.input_cancelled(),
            )
        })
    }

    async fn complete(&self, content: &Value) -> Value {
        let code = content["code"].as_str().unwrap_or_default();
        let cursor = byte_offset(
            code,
            content["cursor_pos"].as_u64().unwrap_or(code.len() as u64),
        );
        let line_start = code[..cursor].rfind('\n').map_or(0, |i| i + 1);
        let line = &code[line_start..cursor];
        if let Some(partial) = magic_prefix(line) {
            let matches: Vec<String> = parallax_magics::MAGICS
                .iter()
                .filter(|m| m.name.starts_with(partial))
                .map(|m| m.name.to_owned())
                .collect();
            let start = cursor - partial.len();
            return completion_reply(code, matches, start, cursor);
        }
        let rust = parallax_magics::blank_non_rust(code);
        match self.cells.evaluator().complete(rust, cursor).await {
            Ok(found) => {
                let matches = found.completions.into_iter().map(|c| c.code).collect();
                completion_reply(code, matches, found.start_offset, found.end_offset)
            }
            Err(e) => {
                tracing::info!("completion failed: {e}");
                completion_reply(code, Vec::new(), cursor, cursor)
            }
        }
    }

    async fn inspect(&self, content: &Value) -> Value {
        let code = content["code"].as_str().unwrap_or_default();
        let cursor = byte_offset(
            code,
            content["cursor_pos"].as_u64().unwrap_or(code.len() as u64),
        );
        // Hover needs the whole identifier under the cursor.
        let end = cursor
            + code[cursor..]
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(code.len() - cursor);
        let rust = parallax_magics::blank_non_rust(code);
        match self.cells.evaluator().inspect(rust, end).await {
            Ok((plain, html)) if !plain.is_empty() && plain != "No documentation found" => json!({
                "status": "ok",
                "found": true,
                "data": {"text/plain": plain, "text/html": html},
                "metadata": {},
            }),
            Ok(_) => json!({"status": "ok", "found": false, "data": {}, "metadata": {}}),
            Err(e) => {
                tracing::info!("inspect failed: {e}");
                json!({"status": "ok", "found": false, "data": {}, "metadata": {}})
            }
        }
    }
}

fn error_reply(error: &CellError, count: i64) -> Value {
    json!({
        "status": "error",
        "execution_count": count,
        "ename": error.ename,
        "evalue": error.evalue,
        "traceback": error.traceback,
    })
}

/// The name typed so far after `%` or `%%` at the start of a line, if the line is a magic.
fn magic_prefix(line: &str) -> Option<&str> {
    let rest = line.trim_start().strip_prefix('%')?;
    let rest = rest.strip_prefix('%').unwrap_or(rest);
    (!rest.contains(char::is_whitespace)).then_some(rest)
}

/// Jupyter counts cursor positions in Unicode code points; Rust strings index bytes.
fn byte_offset(code: &str, code_points: u64) -> usize {
    code.char_indices()
        .nth(code_points as usize)
        .map_or(code.len(), |(byte, _)| byte)
}

fn code_points(code: &str, byte: usize) -> usize {
    code.get(..byte)
        .map_or(code.chars().count(), |s| s.chars().count())
}

fn completion_reply(code: &str, matches: Vec<String>, start: usize, end: usize) -> Value {
    json!({
        "status": "ok",
        "matches": matches,
        "cursor_start": code_points(code, start),
        "cursor_end": code_points(code, end),
        "metadata": {},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_conversions_respect_multibyte_characters() {
        let code = "let é = 1; é";
        assert_eq!(byte_offset(code, 4), 4);
        assert_eq!(byte_offset(code, 5), 6); // é is two bytes
        assert_eq!(byte_offset(code, 6), 7);
        assert_eq!(byte_offset(code, 100), code.len());
        assert_eq!(code_points(code, 7), 6);
    }

    #[test]
    fn magic_prefixes() {
        assert_eq!(magic_prefix("%lsm"), Some("lsm"));
        assert_eq!(magic_prefix("  %%p"), Some("p"));
        assert_eq!(magic_prefix("%magic ls"), None);
        assert_eq!(magic_prefix("let x"), None);
    }
}
