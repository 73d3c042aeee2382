//! Launching engine processes and noticing their exit: a local engine is a child process of
//! the kernel, tied to its life; its stderr is relayed to the kernel's log, and its end is
//! reported at once, by id and cause, to the jobs whose tasks it held.

use super::events::{Observer, TaskEvent};
use super::pool::{Engine, EngineState};
use super::Controller;
use anyhow::Context;
use parallax_engine_protocol::{Outcome, Step, ToEngine};
use parallax_eval::ipc::PrivateDir;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

impl Controller {
    /// Launches the process of engine `id`, one of `total` live engines.
    pub(super) async fn spawn_engine(&self, id: u32, total: u32) -> anyhow::Result<()> {
        let (endpoint, key_file) = self.link().await?;
        let exe = std::env::current_exe().context("finding the parallax binary")?;
        let mut command = tokio::process::Command::new(&exe);
        command
            .args(["engine", "--controller", &endpoint, "--id", &id.to_string()])
            .arg("--key-file")
            .arg(&key_file)
            .env("PARALLAX_ENGINE_ID", id.to_string())
            .env("PARALLAX_ENGINES", total.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: prctl in the child between fork and exec touches no memory of ours; it
        // ties the engine's life to this kernel's, even when the kernel is SIGKILLed. The signal
        // follows the forking thread, here one of tokio's workers, which live as long as the
        // kernel's runtime.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command.spawn().context("starting an engine process")?;
        let pid = child.id().unwrap_or(0);
        let last_words = child
            .stderr
            .take()
            .map(|stderr| tokio::spawn(relay_stderr(stderr, id, self.observer.clone())));
        self.registry().engines.insert(id, Engine::launched(pid));
        tokio::spawn(self.clone().watch_process(id, child, last_words));
        self.notify();
        self.observer
            .output(id, "log", &format!("engine {id} started (pid {pid})"));
        Ok(())
    }

    /// Waits for an engine process to exit and reports it.
    async fn watch_process(
        self,
        id: u32,
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
        // A restarted engine has the same id and a new process: the old one's end is no news.
        let replaced = self
            .registry()
            .engines
            .get(&id)
            .is_some_and(|engine| pid.is_some_and(|p| p != engine.pid));
        if !replaced {
            self.engine_died(id, &cause);
        }
    }

    /// Engine `id` is gone: its followers and its jobs hear it at once, by id and cause.
    pub(super) fn engine_died(&self, id: u32, cause: &str) {
        let mut expected = false;
        let orphaned = {
            let mut registry = self.registry();
            let running = match registry.engines.get_mut(&id) {
                Some(engine) => {
                    expected = engine.stopping;
                    if !engine.is_dead() {
                        engine.state = EngineState::Dead(cause.to_owned());
                    }
                    std::mem::take(&mut engine.running)
                }
                None => Vec::new(),
            };
            // Followers waiting for its compiled cells hear that it is gone.
            for (cell, followers) in registry.cells_led_by(id) {
                for follower in followers {
                    let step = Step::Abort {
                        reason: cause.to_owned(),
                    };
                    let message = ToEngine::Shared {
                        cell,
                        from: id,
                        step,
                    };
                    self.pass_on(follower, message);
                }
            }
            running
                .into_iter()
                .filter_map(|task| registry.close_task(task))
                .collect::<Vec<_>>()
        };
        self.observer.engine_died(id, cause);
        if expected {
            tracing::info!("engine {id} stopped: {cause}");
        } else {
            tracing::warn!("engine {id} {cause}");
        }
        for closed in orphaned {
            let _ = closed.events.send(TaskEvent::Done {
                engine: id,
                execution_count: 0,
                outcome: Outcome::Error {
                    ename: "EngineDied".into(),
                    evalue: format!("engine {id} {cause}"),
                    traceback: vec![format!(
                        "EngineDied: engine {id} {cause}; the other engines go on"
                    )],
                },
            });
        }
        self.notify();
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

/// Passes an engine's stderr on to ours, line by line, and returns its last fatal message (the
/// `parallax: …` line an engine prints when it gives up).
async fn relay_stderr(
    stderr: tokio::process::ChildStderr,
    engine: u32,
    observer: Arc<dyn Observer>,
) -> Option<String> {
    use tokio::io::AsyncBufReadExt;
    let mut reader = tokio::io::BufReader::new(stderr);
    let mut line = Vec::new();
    let mut fatal = None;
    // Bytes, not strings: a line that is not UTF-8 must not stop the draining, or the engine
    // would block on a full pipe.
    while matches!(reader.read_until(b'\n', &mut line).await, Ok(n) if n > 0) {
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        eprintln!("{text}");
        observer.output(engine, "log", text);
        if let Some(reason) = text.strip_prefix("parallax: ") {
            fatal = Some(reason.to_owned());
        }
        line.clear();
    }
    fatal
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

/// The connection key for engines to read: a file of mode 0600 in a private directory, which
/// goes with this value (at kernel exit).
pub(super) struct KeyFile {
    dir: PrivateDir,
}

impl KeyFile {
    pub fn write(key: &str) -> anyhow::Result<KeyFile> {
        let base = parallax_eval::private_base();
        let dir = PrivateDir::create(base.join(format!("parallax-{}", std::process::id())))?;
        let path = dir.path().join("engine.key");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        std::io::Write::write_all(&mut file, key.as_bytes())?;
        Ok(KeyFile { dir })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("engine.key")
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
        let said = relay_stderr(stderr, 3, lines.clone()).await;
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
