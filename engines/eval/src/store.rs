//! An engine's own evaluation process, driven by the engine rather than by an evcxr context: it
//! holds the engine's variables and runs compiled cells it is sent as `LOAD_AND_RUN` lines,
//! whichever context compiled them. It is Parallax's runtime (`crate::runtime`) under a
//! supervisor (`crate::supervisor`), in a process group of its own, a child of the engine
//! that dies with it. Each compiled cell runs as a transaction (`crate::transaction`): a stop
//! kills the cell's fork (`StoreControl::stop_running_cell`), and the variables stay.

use crate::evalproto::{Event, LineOutcome, Parser};
use crate::ipc::{read_lines, Lines, Locked};
use crate::outputs::StreamSink;
use serde_json::{Map, Value};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Set (with `EVCXR_IS_RUNTIME`) in a store's environment: the binary becomes Parallax's
/// runtime.
pub const STORE_VAR: &str = "PARALLAX_STORE";

/// How many of its last stderr lines a dead store is described by.
const STDERR_TAIL: usize = 20;

/// What the engine hears from its store: a stdout line, or its end.
pub type StoreLines = Lines;

pub struct Store {
    command: Arc<Mutex<Command>>,
    child: Child,
    /// The same handle across restarts, so that an interrupter always reaches the live one.
    control: StoreControl,
    stdin: Option<ChildStdin>,
    lines: StoreLines,
    sink: Arc<Mutex<StreamSink>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    stderr_sync: Arc<StderrSync>,
    /// Compiled cells (and settings) this process of the store ended.
    ended: u64,
}

/// How far the store's stderr has been read: its thread counts the runtime's
/// `crate::runtime::STDERR_SYNC` lines, one at the end of each compiled cell.
#[derive(Default)]
struct StderrSync {
    seen: Mutex<u64>,
    arrived: Condvar,
}

/// The most a cell's end waits for its stderr: a process that stopped writing it (killed
/// right after its end) must not hold the cell.
const STDERR_WAIT: Duration = Duration::from_secs(2);

/// What others may do to a store's processes: stop the cell it runs, or end it all.
#[derive(Clone, Default)]
pub struct StoreControl {
    live: Arc<Mutex<Control>>,
    /// The stop pipe's end that the next supervisor started gets as its fd 3: read between
    /// fork and exec by the one `pre_exec` hook the command has, whichever start it is.
    next_stop_fd: Arc<std::sync::atomic::AtomicI32>,
}

#[derive(Default)]
struct Control {
    /// The supervisor's pid, which is also its process group's.
    pid: i32,
    /// The supervisor's fd 3: stop requests.
    stops: Option<std::fs::File>,
    /// `LOAD_AND_RUN` lines sent to this process of the store: the number of the last is the
    /// cell a stop request names.
    cells_sent: u64,
}

impl StoreControl {
    /// Stops the compiled cell running now (the last one sent): its fork is killed and the
    /// store rolls it back. A cell that runs without a transaction takes the store with it.
    pub fn stop_running_cell(&self) {
        let mut control = self.live.locked();
        let request = format!("stop {}\n", control.cells_sent);
        if let Some(stops) = control.stops.as_mut() {
            let _ = stops.write_all(request.as_bytes());
        }
    }

    /// Kills the store: its supervisor and every process under it.
    pub fn kill(&self) {
        let pid = self.live.locked().pid;
        if pid > 0 {
            // SAFETY: kill(2) takes plain integers; a negative pid names the process group.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    }

    pub fn pid(&self) -> u32 {
        self.live.locked().pid as u32
    }

    fn sent(&self, line: &str) {
        if line.starts_with("LOAD_AND_RUN ") {
            self.live.locked().cells_sent += 1;
        }
    }

    fn replace(&self, pid: u32, stops: std::fs::File) {
        *self.live.locked() = Control {
            pid: pid as i32,
            stops: Some(stops),
            cells_sent: 0,
        };
    }
}

/// How a store ended.
#[derive(Debug, Clone)]
pub struct Death {
    pub signal: Option<i32>,
    pub code: Option<i32>,
    /// The exit status and the last lines of stderr.
    pub words: String,
}

impl Death {
    /// `signal N` or `code N`: how a relay standing in for the store should end.
    pub fn status_words(&self) -> String {
        match (self.signal, self.code) {
            (Some(signal), _) => format!("signal {signal}"),
            (None, Some(code)) => format!("code {code}"),
            (None, None) => "code 1".to_owned(),
        }
    }
}

/// What running one compiled cell gave, for an engine that builds its own reply.
#[derive(Debug, Default)]
pub struct Run {
    pub outcome: LineOutcome,
    /// The MIME bundle the cell printed (its final expression's value among it).
    pub contents: Map<String, Value>,
    /// Why the process died, when it did.
    pub death: Option<String>,
    /// Whether it was rolled back, or ran without a transaction.
    pub notes: crate::evalproto::LineNotes,
}

impl Store {
    /// Starts the store: this binary, with `env` added to its environment.
    pub fn start(env: &[(String, String)]) -> std::io::Result<Store> {
        Self::start_program(&std::env::current_exe()?, env)
    }

    /// Starts the store as `program` (a binary that serves Parallax's runtime).
    pub fn start_program(
        program: &std::path::Path,
        env: &[(String, String)],
    ) -> std::io::Result<Store> {
        let mut command = Command::new(program);
        command
            .env("EVCXR_IS_RUNTIME", "1")
            .env(STORE_VAR, "1")
            .env("RUST_BACKTRACE", "1")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let sink: Arc<Mutex<StreamSink>> = Arc::new(Mutex::new(Arc::new(|_, _| {})));
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_sync = Arc::new(StderrSync::default());
        let control = StoreControl::default();
        // Once: a `Command` keeps every hook it was given, and each restart spawns it again.
        let stop_fd = control.next_stop_fd.clone();
        command.process_group(0);
        // SAFETY: between fork and exec only an atomic load, dup2 and fcntl, all
        // async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                crate::supervisor::pass_as_control_fd(stop_fd.load(Ordering::SeqCst))
            });
        }
        let (child, stdin, lines) =
            spawn(&mut command, &control, &sink, &stderr_tail, &stderr_sync)?;
        Ok(Store {
            command: Arc::new(Mutex::new(command)),
            child,
            control,
            stdin: Some(stdin),
            lines,
            sink,
            stderr_tail,
            stderr_sync,
            ended: 0,
        })
    }

    /// The live store's processes, for interrupts and ends.
    pub fn handle(&self) -> StoreControl {
        self.control.clone()
    }

    /// Where the store's stderr goes from now on.
    pub fn set_sink(&self, sink: StreamSink) {
        *self.sink.locked() = sink;
    }

    pub fn lines(&self) -> StoreLines {
        self.lines.clone()
    }

    /// Writes one line to the store's stdin (an instruction, or an answer to a prompt).
    pub fn send(&mut self, line: &str) -> std::io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| std::io::Error::other("the store is closed"))?;
        writeln!(stdin, "{line}")?;
        self.control.sent(line);
        stdin.flush()
    }

    /// Adds `env` to the store's environment: to the live process, before any cell of the
    /// user's ran in it, and to those a restart starts.
    pub fn add_environment(&mut self, env: &[(String, String)]) -> Result<(), String> {
        self.command
            .locked()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let quiet: StreamSink = Arc::new(|_, _| {});
        for (name, value) in env {
            let line = format!("{}{name} {value}", crate::runtime::SET_ENV);
            let run = self.run(&line, &quiet);
            if let Some(death) = run.death {
                return Err(format!("the store died setting {name}: {death}"));
            }
        }
        Ok(())
    }

    /// Turns transactions on or off, in the live process and in those a restart starts.
    pub fn set_transactions(&mut self, on: bool) -> Result<(), String> {
        let setting = if on { "on" } else { "off" };
        self.command
            .locked()
            .env(crate::transaction::SWITCH_VAR, setting);
        let quiet: StreamSink = Arc::new(|_, _| {});
        let line = format!("{}{setting}", crate::transaction::SWITCH);
        match self.run(&line, &quiet).death {
            Some(death) => Err(format!("the store died switching transactions: {death}")),
            None => Ok(()),
        }
    }

    /// Replaces a dead (or killed) store with a fresh one, without variables.
    pub fn restart(&mut self) -> std::io::Result<()> {
        if let Ok(None) = self.child.try_wait() {
            self.control.kill();
        }
        let _ = self.child.wait();
        self.stdin = None;
        self.stderr_tail.locked().clear();
        self.stderr_sync = Arc::new(StderrSync::default());
        self.ended = 0;
        let mut command = self.command.locked();
        let (child, stdin, lines) = spawn(
            &mut command,
            &self.control,
            &self.sink,
            &self.stderr_tail,
            &self.stderr_sync,
        )?;
        self.child = child;
        self.stdin = Some(stdin);
        self.lines = lines;
        Ok(())
    }

    /// Why the store ended: its exit status and last words. Waits for it to exit.
    pub fn death(&mut self) -> Death {
        let status = self.child.wait();
        // Its stderr reader may still be passing on the last lines.
        std::thread::sleep(Duration::from_millis(20));
        let tail: Vec<String> = self.stderr_tail.locked().iter().cloned().collect();
        let (signal, code, status) = match status {
            Ok(status) => (status.signal(), status.code(), status.to_string()),
            Err(e) => (None, None, format!("lost: {e}")),
        };
        let words = if tail.is_empty() {
            status
        } else {
            format!("{status}: {}", tail.join("\n"))
        };
        Death {
            signal,
            code,
            words,
        }
    }

    /// Runs one compiled cell and waits for its end; its stdout goes to `sink` as it is
    /// printed. A prompt for input gets an empty answer (engines have no stdin). A store that
    /// died is restarted before this returns.
    pub fn run(&mut self, line: &str, sink: &StreamSink) -> Run {
        let mut run = Run::default();
        let mut parser = Parser::default();
        if self.send(line).is_err() {
            return self.died(run);
        }
        let lines = self.lines.clone();
        // Lines already waiting go out together.
        let mut pending = String::new();
        let flush = |pending: &mut String| {
            if !pending.is_empty() {
                sink("stdout", pending);
                pending.clear();
            }
        };
        loop {
            if lines.is_empty() || pending.len() > 64 * 1024 {
                flush(&mut pending);
            }
            let Ok(Some(line)) = lines.recv() else {
                flush(&mut pending);
                return self.died(run);
            };
            match parser.feed(&line) {
                None => {}
                Some(Event::Stdout(text)) => {
                    pending.push_str(&text);
                    pending.push('\n');
                }
                Some(Event::RolledBack { partial, how }) => {
                    if !partial.is_empty() {
                        pending.push_str(&partial);
                        pending.push('\n');
                    }
                    flush(&mut pending);
                    let event = Event::RolledBack { partial, how };
                    run.outcome.note(&event);
                    run.notes.note(&event);
                }
                Some(event) => {
                    flush(&mut pending);
                    run.outcome.note(&event);
                    run.notes.note(&event);
                    if self.apply(event, &mut run) {
                        return run;
                    }
                }
            }
        }
    }

    /// After the end of a compiled cell on stdout: waits until what it wrote to stderr before
    /// its end has been passed on.
    pub fn stderr_caught_up(&mut self) {
        self.ended += 1;
        let seen = self.stderr_sync.seen.locked();
        let _ = self
            .stderr_sync
            .arrived
            .wait_timeout_while(seen, STDERR_WAIT, |seen| *seen < self.ended);
    }

    /// Handles an event other than stdout; true at the end of the cell.
    fn apply(&mut self, event: Event, run: &mut Run) -> bool {
        match event {
            Event::Complete => {
                self.stderr_caught_up();
                true
            }
            Event::Content { mime, text } => {
                run.contents.insert(mime, Value::String(text));
                false
            }
            Event::Input { .. } => {
                let _ = self.send("");
                false
            }
            _ => false,
        }
    }

    fn died(&mut self, mut run: Run) -> Run {
        run.outcome.died = true;
        run.death = Some(self.death().words);
        if let Err(e) = self.restart() {
            tracing::error!("could not restart the evaluation process: {e}");
        }
        run
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.control.kill();
        let _ = self.child.wait();
    }
}

/// Starts the store's supervisor (in a process group of its own, its stop requests on fd 3:
/// the command's hook, set in `Store::start_program`).
fn spawn(
    command: &mut Command,
    control: &StoreControl,
    sink: &Arc<Mutex<StreamSink>>,
    stderr_tail: &Arc<Mutex<VecDeque<String>>>,
    stderr_sync: &Arc<StderrSync>,
) -> std::io::Result<(Child, ChildStdin, StoreLines)> {
    let (stop_read, stop_write) = crate::ipc::pipe()?;
    control
        .next_stop_fd
        .store(stop_read.as_raw_fd(), Ordering::SeqCst);
    let mut child = command.spawn()?;
    drop(stop_read);
    control.replace(child.id(), std::fs::File::from(stop_write));
    let stdin = child
        .stdin
        .take()
        .ok_or_else(|| std::io::Error::other("no stdin"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("no stdout"))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| std::io::Error::other("no stderr"))?;
    let lines = read_lines(stdout, "store-stdout")?;
    let sink = sink.clone();
    let tail = stderr_tail.clone();
    let sync = stderr_sync.clone();
    std::thread::Builder::new()
        .name("store-stderr".into())
        .spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(mut line) = line else { break };
                // A rolled-back cell's fork may have left a line unfinished before it.
                if let Some(partial) = line.strip_suffix(crate::runtime::STDERR_SYNC) {
                    *sync.seen.locked() += 1;
                    sync.arrived.notify_all();
                    if partial.is_empty() {
                        continue;
                    }
                    line = partial.to_owned();
                }
                {
                    let mut tail = tail.locked();
                    if tail.len() == STDERR_TAIL {
                        tail.pop_front();
                    }
                    tail.push_back(line.clone());
                }
                let sink = sink.locked().clone();
                sink("stderr", &format!("{line}\n"));
            }
        })?;
    Ok((child, stdin, lines))
}
