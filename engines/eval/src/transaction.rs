//! A compiled cell as a transaction on the process that holds a store's variables (the
//! holder, under `crate::supervisor`). Before the cell runs, the holder forks; the fork runs
//! the cell and, when the cell ends, becomes the holder: it tells the supervisor, tells the old
//! holder, which exits at once, and carries on serving. If the fork dies instead (the stop
//! button or a timeout killed it, or the cell crashed or exited), the old holder still has
//! every variable as it was before the cell: it says the cell was rolled back, as evcxr's
//! runtime says a cell panicked (evcxr then keeps the variables it knew and drops the cell's
//! new ones), and goes on.
//!
//! A process with more than one thread cannot be forked with its threads (a rayon pool or a
//! tokio runtime an earlier cell started): there the cell runs in the holder itself, as
//! without transactions, and a stop or a crash loses the variables. The cell that leaves
//! threads behind says so (`THREADS_LEFT`), and each cell run in place is announced
//! (`IN_PLACE`), so that what would be lost, and why, can be said.
//!
//! While a cell runs, the pages it changes exist twice (copy on write).

use crate::evalproto::{IN_PLACE, PANIC_NOTIFICATION, ROLLED_BACK, THREADS_LEFT};
use crate::supervisor::{CONTROL_FD, HOLDER_VAR};
use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;

/// `PARALLAX_TRANSACTIONS on|off`: a runtime instruction that turns transactions on or off
/// for the cells that follow.
pub const SWITCH: &str = "PARALLAX_TRANSACTIONS ";

/// In a store's environment: `off` starts it with transactions off.
pub const SWITCH_VAR: &str = "PARALLAX_TRANSACTIONS";

/// The cell that switches transactions in the notebook (`%px` it for engines).
pub const COMMAND: &str = ":transactions";

/// What `:transactions on|off` asks for: `Some(Ok(on))`; `Some(Err(usage))` when it is
/// misspelled; `None` for any other cell.
pub fn command(code: &str) -> Option<Result<bool, String>> {
    let rest = code.trim().strip_prefix(COMMAND)?;
    if !rest.is_empty() && !rest.starts_with(char::is_whitespace) {
        return None;
    }
    Some(match rest.trim() {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!(
            "usage: {COMMAND} on|off (not `{other}`): off runs cells without a transaction, \
             for cells that rewrite values too large to exist twice while they run; a stop or \
             a crash then loses the variables"
        )),
    })
}

/// What a switch says, once done.
pub fn switched_words(on: bool) -> &'static str {
    if on {
        "transactions on: a stopped or crashing cell is rolled back, nothing is lost\n"
    } else {
        "transactions off: a stopped or crashing cell restarts the evaluation process, and its \
         variables are lost\n"
    }
}

/// The signal a fork that took over gets when the old holder has gone: it then dies with the
/// supervisor, its new parent.
const HANDED_OVER: libc::c_int = libc::SIGUSR2;

/// The supervisor's pid, for `on_handed_over`.
static SUPERVISOR: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// How a cell ended, for the process that serves on after it.
pub enum Ended {
    /// The cell ran to its end; this process holds the variables it left.
    Ran,
    /// The cell's fork died: this process holds the variables as they were before it. How the
    /// fork ended, in words.
    RolledBack(String),
}

pub struct Transactions {
    reports: File,
    enabled: bool,
    /// Compiled cells run so far: the numbers the supervisor's stop requests use.
    cells: u64,
}

impl Transactions {
    /// In a holder (its supervisor's pid in `HOLDER_VAR`): dies with the supervisor, and
    /// reports to it on `CONTROL_FD`. `None` in any other evaluation process.
    pub fn for_holder() -> Option<Transactions> {
        let supervisor: i32 = std::env::var(HOLDER_VAR).ok()?.parse().ok()?;
        die_with(supervisor);
        SUPERVISOR.store(supervisor, std::sync::atomic::Ordering::SeqCst);
        // SAFETY: installs a handler that only makes async-signal-safe calls; SA_RESTART
        // keeps a read of stdin it interrupts going.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            let handler: extern "C" fn(libc::c_int) = on_handed_over;
            action.sa_sigaction = handler as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(HANDED_OVER, &action, std::ptr::null_mut());
        }
        // SAFETY: the supervisor gave this process fd 3 for its reports.
        let reports = unsafe { File::from_raw_fd(CONTROL_FD) };
        Some(Transactions {
            reports,
            enabled: std::env::var(SWITCH_VAR).map_or(true, |setting| setting != "off"),
            cells: 0,
        })
    }

    /// Applies a `SWITCH` instruction.
    pub fn switch(&mut self, setting: &str) {
        self.enabled = setting.trim() != "off";
    }

    /// Runs one compiled cell, in a fork when it can.
    pub fn run(&mut self, cell: impl FnOnce()) -> Ended {
        self.cells += 1;
        let number = self.cells;
        let threads = thread_count();
        if !self.enabled {
            return self.run_in_place(number, "transactions off", cell);
        }
        if threads != 1 {
            return self.run_in_place(number, &format!("{threads} threads"), cell);
        }
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        let (handover_read, handover_write) =
            match crate::ipc::pipe().map(|(r, w)| (File::from(r), File::from(w))) {
                Ok(ends) => ends,
                Err(e) => return self.run_in_place(number, &format!("no fork: {e}"), cell),
            };
        let holder = own_pid();
        // SAFETY: this process has one thread (checked above), so the fork has all of it.
        match unsafe { libc::fork() } {
            0 => {
                drop(handover_read);
                self.run_in_fork(number, holder, handover_write, cell);
                Ended::Ran
            }
            fork if fork > 0 => {
                drop(handover_write);
                self.wait_for_fork(number, fork, handover_read)
            }
            _ => {
                // Out of memory (a large heap's commit charge) or of processes.
                let e = std::io::Error::last_os_error();
                self.run_in_place(number, &format!("no fork: {e}"), cell)
            }
        }
    }

    /// Runs the cell in this process, unprotected, and says so first.
    fn run_in_place(&mut self, number: u64, why: &str, cell: impl FnOnce()) -> Ended {
        println!("{IN_PLACE}{why}");
        self.report("cell", number, own_pid());
        cell();
        self.report("end", number, own_pid());
        Ended::Ran
    }

    fn run_in_fork(&mut self, number: u64, holder: i32, handover: File, cell: impl FnOnce()) {
        // The fork dies with the holder until it takes over, so that a killed store leaves
        // no cell running.
        die_with(holder);
        self.report("cell", number, own_pid());
        cell();
        let threads = thread_count();
        if threads > 1 {
            // Said before anything is lost, so that the notebook can say what would be.
            println!("{THREADS_LEFT}{}", threads - 1);
        }
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // The old holder's end must not end this process: it says it is over instead
        // (`HANDED_OVER`), once its memory is released, which can take a while for a large
        // heap; this process serves on meanwhile.
        // SAFETY: prctl takes plain integers.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, HANDED_OVER) };
        self.report("end", number, own_pid());
        let mut handover = handover;
        let _ = handover.write_all(b"1");
    }

    fn wait_for_fork(&mut self, number: u64, fork: i32, handover: File) -> Ended {
        let mut handed = [0u8; 1];
        let mut handover = handover;
        if std::io::Read::read(&mut handover, &mut handed).is_ok_and(|n| n == 1) {
            // The fork holds everything now; nothing of this process is needed, not even its
            // destructors.
            // SAFETY: _exit ends this process at once.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for this process's own child; status is a plain integer.
        while unsafe { libc::waitpid(fork, &mut status, 0) } < 0
            && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {}
        self.report("end", number, own_pid());
        let how = ended_words(status);
        // The fork may have died halfway through a line: readers find the marker at its end.
        println!("{ROLLED_BACK}{how}\n{PANIC_NOTIFICATION}");
        Ended::RolledBack(how)
    }

    fn report(&mut self, kind: &str, number: u64, pid: i32) {
        // One write per line: the pipe keeps lines of this size whole.
        let _ = self
            .reports
            .write_all(format!("{kind} {number} {pid}\n").as_bytes());
    }
}

/// How a process ended, from its wait status, in words.
fn ended_words(status: i32) -> String {
    if libc::WIFSIGNALED(status) {
        let signal = libc::WTERMSIG(status);
        let name = match signal {
            libc::SIGKILL => "SIGKILL",
            libc::SIGABRT => "SIGABRT",
            libc::SIGSEGV => "SIGSEGV",
            libc::SIGBUS => "SIGBUS",
            libc::SIGILL => "SIGILL",
            libc::SIGFPE => "SIGFPE",
            libc::SIGTERM => "SIGTERM",
            _ => "",
        };
        if name.is_empty() {
            format!("signal {signal}")
        } else {
            format!("signal {signal} ({name})")
        }
    } else if libc::WIFEXITED(status) {
        format!("exit code {}", libc::WEXITSTATUS(status))
    } else {
        format!("wait status {status}")
    }
}

extern "C" fn on_handed_over(_: libc::c_int) {
    die_with(SUPERVISOR.load(std::sync::atomic::Ordering::SeqCst));
}

/// Arms SIGKILL for when `parent` dies, and dies now if it already has. Async-signal-safe.
fn die_with(parent: i32) {
    // SAFETY: prctl and getppid take plain integers; _exit ends the process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != parent {
            libc::_exit(1);
        }
    }
}

fn own_pid() -> i32 {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() }
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |tasks| tasks.count())
}

#[cfg(test)]
mod tests {
    use super::{command, ended_words};

    #[test]
    fn the_switch_reads_on_or_off_and_explains_anything_else() {
        assert_eq!(command(":transactions off"), Some(Ok(false)));
        assert_eq!(command("  :transactions   on \n"), Some(Ok(true)));
        assert!(
            command(":transactions maybe").is_some_and(|r| r.is_err_and(|e| e.contains("usage")))
        );
        assert!(command(":transactions").is_some_and(|r| r.is_err()));
        assert_eq!(command(":transactionsoff"), None);
        assert_eq!(command("let x = 1;"), None);
    }

    #[test]
    fn an_ending_in_words() {
        // Wait statuses as the kernel encodes them: a signal in the low bits, an exit code
        // in the second byte.
        assert_eq!(ended_words(libc::SIGKILL), "signal 9 (SIGKILL)");
        assert_eq!(ended_words(libc::SIGABRT | 0x80), "signal 6 (SIGABRT)");
        assert_eq!(ended_words(3 << 8), "exit code 3");
    }
}
