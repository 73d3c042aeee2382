//! What runs on this host for a launch: an engine process, the ssh client of a remote one, or
//! mpiexec for many. Each gets the connection on its stdin, has its stderr relayed to the log,
//! and is watched: its end is the end of the engines it holds, reported at once by id and
//! cause (with its last words: the engine's reason, or the ssh or mpiexec error).

use crate::controller::events::Observer;
use crate::controller::Controller;
use anyhow::Context;
use parallax_engine_protocol::Connection;
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::time::Duration;

/// What a local process holds: one engine, or every engine of a launch.
#[derive(Debug, Clone, Copy)]
pub(super) enum Holder {
    Engine(u32),
    Launch(u32),
}

impl Controller {
    /// Starts `command`, hands it the connection on stdin, and watches it for `holder`.
    pub(super) fn run_holder(
        &self,
        mut command: tokio::process::Command,
        holder: Holder,
        connection: &Connection,
    ) -> anyhow::Result<u32> {
        command
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let program = command
            .as_std()
            .get_program()
            .to_string_lossy()
            .into_owned();
        let child = command
            .spawn()
            .with_context(|| format!("starting `{program}`"))?;
        Ok(self.hold(child, &program, holder, connection))
    }

    /// Hands a started process (spawned with its stdin and stderr piped) the connection on
    /// stdin, and watches it for `holder`. Returns its pid.
    pub(super) fn hold(
        &self,
        mut child: tokio::process::Child,
        program: &str,
        holder: Holder,
        connection: &Connection,
    ) -> u32 {
        let pid = child.id().unwrap_or(0);
        if let Some(mut stdin) = child.stdin.take() {
            let text = connection.to_json() + "\n";
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                // Dropped after writing: the engine reads one document, then EOF.
                let _ = stdin.write_all(text.as_bytes()).await;
            });
        }
        let engine = match holder {
            Holder::Engine(id) => Some(id),
            Holder::Launch(_) => None,
        };
        let last_words = child
            .stderr
            .take()
            .map(|stderr| tokio::spawn(relay_stderr(stderr, engine, self.observer.clone())));
        {
            let mut registry = self.registry();
            match holder {
                Holder::Engine(id) => {
                    if let Some(engine) = registry.engines.get_mut(&id) {
                        engine.process = Some(pid);
                    }
                }
                Holder::Launch(launch) => {
                    if let Some(launch) = registry.launches.get_mut(&launch) {
                        launch.processes.push(pid);
                    }
                }
            }
        }
        tokio::spawn(self.clone().watch_process(holder, child, last_words));
        let who = match holder {
            Holder::Engine(id) => {
                // The dashboard's log of the engine begins here.
                let line = format!("engine {id} started (`{program}`, pid {pid} here)");
                self.observer.output(id, "log", &line);
                format!("engine {id}")
            }
            Holder::Launch(launch) => format!("launch {launch}"),
        };
        tracing::info!("{who}: started `{program}` (pid {pid})");
        pid
    }

    /// Waits for a process to exit and reports the end of the engines it held.
    async fn watch_process(
        self,
        holder: Holder,
        mut child: tokio::process::Child,
        last_words: Option<tokio::task::JoinHandle<Option<String>>>,
    ) {
        // Taken before the wait: a reaped child has no id.
        let pid = child.id();
        let status = child.wait().await;
        let cause = match status {
            Ok(status) => exit_cause(status, last_words).await,
            Err(e) => format!("lost: {e}"),
        };
        match holder {
            Holder::Engine(id) => {
                // A restarted engine has the same id and a new process: the old one's end is
                // no news.
                let replaced = self
                    .registry()
                    .engines
                    .get(&id)
                    .is_some_and(|engine| pid.is_some_and(|p| Some(p) != engine.process));
                if !replaced {
                    self.engine_died(id, &cause);
                }
            }
            Holder::Launch(launch) => {
                let held = self.registry().engines_of(launch);
                for id in held {
                    self.engine_died(id, &format!("ended with its launcher, which {cause}"));
                }
            }
        }
    }
}

/// Sends `signal` to a process this kernel started.
pub(in crate::controller) fn signal(pid: u32, signal: i32) {
    if pid == 0 {
        return;
    }
    // SAFETY: kill(2) takes plain integers.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// How a process ended, in words: its signal, or its exit code and the reason it gave.
async fn exit_cause(
    status: std::process::ExitStatus,
    last_words: Option<tokio::task::JoinHandle<Option<String>>>,
) -> String {
    match (status.signal(), status.code()) {
        (Some(signal), _) => format!("killed by signal {signal} ({})", signal_name(signal)),
        (None, Some(code)) => {
            // An engine that gives up says why on its last line; a moment to read it.
            let said = match last_words {
                Some(reader) => tokio::time::timeout(Duration::from_millis(300), reader)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .flatten(),
                None => None,
            };
            match said {
                Some(reason) => format!("exited with code {code}: {reason}"),
                None => format!("exited with code {code}"),
            }
        }
        (None, None) => "exited".to_owned(),
    }
}

/// Passes a launched process's stderr on to ours, line by line, and returns its last words:
/// the `parallax: …` line an engine prints when it gives up, or else its last line (what ssh
/// or mpiexec said).
async fn relay_stderr(
    stderr: tokio::process::ChildStderr,
    engine: Option<u32>,
    observer: Arc<dyn Observer>,
) -> Option<String> {
    use tokio::io::AsyncBufReadExt;
    let mut reader = tokio::io::BufReader::new(stderr);
    let mut line = Vec::new();
    let mut fatal = None;
    let mut last = None;
    // Bytes, not strings: a line that is not UTF-8 must not stop the draining, or the engine
    // would block on a full pipe.
    while matches!(reader.read_until(b'\n', &mut line).await, Ok(n) if n > 0) {
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        eprintln!("{text}");
        if let Some(engine) = engine {
            observer.output(engine, "log", text);
        }
        if let Some(reason) = text.strip_prefix("parallax: ") {
            fatal = Some(reason.to_owned());
        } else if text.chars().any(|c| c.is_alphanumeric()) {
            // Not a rule of dashes, as mpiexec draws around what it says.
            last = Some(text.trim().to_owned());
        }
        line.clear();
    }
    fatal.or(last)
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGINT => "SIGINT",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use super::relay_stderr;
    use crate::controller::events::{Observer, TaskKey};
    use parallax_engine_protocol::ToEngine;
    use parallax_eval::ipc::Locked;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[derive(Default)]
    struct Lines(Mutex<Vec<(u32, &'static str, String)>>);

    impl Observer for Lines {
        fn sent(&self, _: u32, _: &ToEngine) {}
        fn finished(&self, _: TaskKey, _: Option<String>, _: Option<Duration>) {}
        fn engine_died(&self, _: u32, _: &str) {}
        fn output(&self, engine: u32, stream: &'static str, text: &str) {
            self.0.locked().push((engine, stream, text.to_owned()));
        }
    }

    #[tokio::test]
    async fn an_engines_last_words_are_kept_and_odd_bytes_do_not_stop_the_relay() {
        let mut child = tokio::process::Command::new("sh")
            .args([
                "-c",
                "echo 'Compiling serde' >&2; printf 'bad \\377 byte\\n' >&2; \
                 echo 'parallax: connecting to the controller: refused' >&2; echo after >&2; exit 1",
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("sh runs");
        let stderr = child.stderr.take().expect("piped");
        let lines = Arc::new(Lines::default());
        let said = relay_stderr(stderr, Some(3), lines.clone()).await;
        assert_eq!(
            said.as_deref(),
            Some("connecting to the controller: refused")
        );
        assert_eq!(child.wait().await.expect("exit").code(), Some(1));
        // The observer (the dashboard) hears what the engine wrote.
        let heard = lines.0.locked();
        assert_eq!(heard.len(), 4);
        assert!(heard.iter().all(|(e, s, _)| *e == 3 && *s == "log"));
    }
}
