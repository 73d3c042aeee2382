//! The process a store is, seen from outside: its pid never changes while the process that
//! holds the variables does. A compiled cell runs in a fork of the holder
//! (`crate::transaction`), and the fork becomes the holder when the cell ends; so the engine
//! or kernel that started the store talks to this supervisor about processes and to the holder
//! (through the stdin and stdout they share) about cells.
//!
//! The supervisor starts the first holder, adopts every orphan under it (a child subreaper:
//! a fork whose parent handed over to it), reaps them, and:
//! - stops a running cell when asked on its fd 3 (`stop N`, N counting the compiled cells sent
//!   to this store), by killing the fork that runs it: the holder carries on;
//! - learns which process holds the variables and which runs a cell from the holders' reports
//!   on the control pipe (`cell N PID`, `end N PID`);
//! - ends as the holder ended (the same signal or exit code) when the holder dies outside a
//!   cell's fork, killing what is left, so that the store's owner sees the store's death as
//!   before; and ends, with everything under it, when its owner is gone.

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

/// In a holder's environment: the supervisor's pid.
pub const HOLDER_VAR: &str = "PARALLAX_STORE_HOLDER";

/// The file descriptor on which the supervisor hears stop requests, and on which a holder
/// reports to the supervisor.
pub const CONTROL_FD: i32 = 3;

/// How often the supervisor looks whether its owner is still there.
const OWNER_WATCH: Duration = Duration::from_millis(100);

/// What the supervisor knows of the processes under it.
#[derive(Default)]
struct Supervision {
    holder: i32,
    /// The compiled cell running now, by number, and the fork that runs it.
    cell: Option<(u64, i32)>,
    /// The highest cell number asked to stop.
    stop: u64,
    /// Forks that ran cells and may still be alive: killed when the supervisor ends.
    forks: BTreeSet<i32>,
}

impl Supervision {
    fn heard(&mut self, line: &str) {
        let mut words = line.split_whitespace();
        let (Some(kind), Some(number), Some(pid)) = (words.next(), words.next(), words.next())
        else {
            return;
        };
        let (Ok(number), Ok(pid)) = (number.parse::<u64>(), pid.parse::<i32>()) else {
            return;
        };
        match kind {
            "cell" => {
                self.cell = Some((number, pid));
                if pid != self.holder {
                    self.forks.insert(pid);
                }
                if self.stop >= number {
                    kill(pid);
                }
            }
            "end" => {
                self.cell = None;
                self.holder = pid;
                self.forks.remove(&pid);
            }
            _ => {}
        }
    }

    fn stop_requested(&mut self, line: &str) {
        let Some(number) = line
            .strip_prefix("stop ")
            .and_then(|n| n.trim().parse::<u64>().ok())
        else {
            return;
        };
        self.stop = self.stop.max(number);
        if let Some((running, pid)) = self.cell {
            if running <= number {
                kill(pid);
            }
        }
    }

    fn kill_forks(&self) {
        for &pid in &self.forks {
            kill(pid);
        }
    }
}

fn kill(pid: i32) {
    if pid > 0 {
        // SAFETY: kill(2) takes plain integers.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Serves as a store's supervisor; never returns. Call in a process started with its stop
/// requests on fd 3 and the store's stdin, stdout and stderr.
pub fn supervise() -> ! {
    match Supervisor::start() {
        Ok(mut supervisor) => supervisor.run(),
        Err(e) => {
            eprintln!("parallax store: cannot start its holder: {e}");
            std::process::exit(99);
        }
    }
}

struct Supervisor {
    owner: i32,
    stops: LineReader,
    reports: LineReader,
    children: OwnedFd,
    state: Supervision,
}

impl Supervisor {
    fn start() -> std::io::Result<Supervisor> {
        // SAFETY: plain calls on this process; the fds made here are owned below.
        let owner = unsafe { libc::getppid() };
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let children = child_signals()?;
        // SAFETY: fd 3 was given to this process for it alone.
        let stops = unsafe { OwnedFd::from_raw_fd(CONTROL_FD) };
        set_cloexec(&stops)?;
        let (reports, report_end) = crate::ipc::pipe()?;
        let holder = spawn_holder(&report_end)?;
        drop(report_end);
        Ok(Supervisor {
            owner,
            stops: LineReader::new(stops)?,
            reports: LineReader::new(reports)?,
            children,
            state: Supervision {
                holder,
                ..Default::default()
            },
        })
    }

    fn run(&mut self) -> ! {
        loop {
            let mut polled = [
                poll_for(&self.stops.fd),
                poll_for(&self.reports.fd),
                poll_for(&self.children),
            ];
            // SAFETY: polls three fds this process owns, for at most OWNER_WATCH.
            unsafe { libc::poll(polled.as_mut_ptr(), 3, OWNER_WATCH.as_millis() as i32) };
            // SAFETY: getppid cannot fail.
            if unsafe { libc::getppid() } != self.owner {
                self.end(None);
            }
            // Reports first: a holder that handed over said so before it exited.
            for line in self.reports.read_lines() {
                self.state.heard(&line);
            }
            let stops = self.stops.read_lines();
            for line in &stops {
                self.state.stop_requested(line);
            }
            if self.stops.closed {
                self.end(None);
            }
            self.drain_child_signals();
            self.reap();
        }
    }

    fn drain_child_signals(&self) {
        let mut info = [0u8; 128];
        // SAFETY: reads into a buffer of the size given; the fd is non-blocking.
        while unsafe {
            libc::read(
                self.children.as_raw_fd(),
                info.as_mut_ptr().cast(),
                info.len(),
            )
        } > 0
        {}
    }

    fn reap(&mut self) {
        loop {
            let mut status = 0;
            // SAFETY: waits for any child without blocking; status is a plain integer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            self.state.forks.remove(&pid);
            if pid == self.state.holder {
                // A holder that handed over reported it before it exited, but the report may
                // have arrived after this loop last read them.
                for line in self.reports.read_lines() {
                    self.state.heard(&line);
                }
            }
            if pid == self.state.holder {
                self.end(Some(status));
            }
        }
    }

    /// Kills what is left under the supervisor and ends it: as the holder ended, when it did.
    fn end(&self, holder_status: Option<i32>) -> ! {
        self.state.kill_forks();
        kill(self.state.holder);
        match holder_status {
            Some(status) if libc::WIFSIGNALED(status) => {
                let signal = libc::WTERMSIG(status);
                // SAFETY: restores the default action and raises the signal on this process.
                unsafe {
                    libc::signal(signal, libc::SIG_DFL);
                    let mut unblock: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut unblock);
                    libc::sigaddset(&mut unblock, signal);
                    libc::sigprocmask(libc::SIG_UNBLOCK, &unblock, std::ptr::null_mut());
                    libc::raise(signal);
                }
                std::process::exit(128 + signal)
            }
            Some(status) if libc::WIFEXITED(status) => {
                std::process::exit(libc::WEXITSTATUS(status))
            }
            _ => std::process::exit(1),
        }
    }
}

/// A signalfd that becomes readable when a child ends (SIGCHLD, blocked for it).
fn child_signals() -> std::io::Result<OwnedFd> {
    // SAFETY: builds a signal set on the stack and blocks it; signalfd returns a new fd.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// The holder: this binary again, with the reports' pipe as its fd 3 and SIGCHLD unblocked.
fn spawn_holder(report_end: &OwnedFd) -> std::io::Result<i32> {
    let report_fd = report_end.as_raw_fd();
    let mut command = Command::new(std::env::current_exe()?);
    // SAFETY: getpid cannot fail.
    command.env(HOLDER_VAR, unsafe { libc::getpid() }.to_string());
    // SAFETY: between fork and exec only async-signal-safe calls: dup2, fcntl, sigprocmask.
    unsafe {
        command.pre_exec(move || {
            pass_as_control_fd(report_fd)?;
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGCHLD);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    let child = command.spawn()?;
    // Reaped by `Supervisor::reap`, not by a `Child`.
    Ok(child.id() as i32)
}

/// In a child between fork and exec: makes `fd` its `CONTROL_FD`, kept open across exec.
/// Only async-signal-safe calls.
pub fn pass_as_control_fd(fd: i32) -> std::io::Result<()> {
    // SAFETY: dup2 and fcntl take plain integers.
    let moved = unsafe {
        if fd == CONTROL_FD {
            // dup2 onto itself would leave close-on-exec set.
            libc::fcntl(fd, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, CONTROL_FD)
        }
    };
    if moved < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn set_cloexec(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd this process owns.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn poll_for(fd: &OwnedFd) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Whole lines from a non-blocking fd, as they arrive.
struct LineReader {
    fd: OwnedFd,
    pending: Vec<u8>,
    closed: bool,
}

impl LineReader {
    fn new(fd: OwnedFd) -> std::io::Result<LineReader> {
        // SAFETY: fcntl on an fd this process owns.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if flags < 0
            || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(LineReader {
            fd,
            pending: Vec::new(),
            closed: false,
        })
    }

    fn read_lines(&mut self) -> Vec<String> {
        let mut chunk = [0u8; 4096];
        loop {
            // SAFETY: reads into a buffer of the size given, from a non-blocking fd of ours.
            let read =
                unsafe { libc::read(self.fd.as_raw_fd(), chunk.as_mut_ptr().cast(), chunk.len()) };
            match read {
                0 => {
                    self.closed = true;
                    break;
                }
                n if n > 0 => self.pending.extend_from_slice(&chunk[..n as usize]),
                _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
                _ => break,
            }
        }
        let mut lines = Vec::new();
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            lines.push(String::from_utf8_lossy(&line[..end]).into_owned());
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::Supervision;

    #[test]
    fn a_stop_reaches_the_cell_it_names_whenever_it_arrives() {
        let mut state = Supervision {
            holder: 10,
            ..Default::default()
        };
        // Asked to stop cell 1 before its fork said it runs it: kept for when it does.
        state.stop_requested("stop 1");
        assert_eq!(state.stop, 1);
        state.heard("cell 2 -1");
        assert_eq!(state.cell, Some((2, -1)));
        state.heard("end 2 -2");
        assert_eq!((state.cell, state.holder), (None, -2));
        // A stop for a cell that ended is kept but reaches no later cell.
        state.stop_requested("stop 2");
        state.heard("cell 3 -3");
        assert_eq!(state.cell, Some((3, -3)));
        assert!(state.forks.contains(&-3));
        state.heard("gibberish");
        state.stop_requested("stop x");
        assert_eq!(state.stop, 2);
    }
}
