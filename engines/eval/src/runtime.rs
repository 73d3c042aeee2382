//! An evaluation process of Parallax's own, speaking evcxr 0.22's protocol: evcxr's context
//! writes `LOAD_AND_RUN <shared object> <function>` for each compiled cell, the process loads the
//! object, calls the function with the variable store it holds and answers
//! `EVCXR_EXECUTION_COMPLETE`. Unlike evcxr's own, it also writes each of those lines to a
//! report file before running it: the record of compiled cells, in order, that another
//! evaluation process can replay to reach the same state without compiling (compile once per
//! machine). The kernel binary becomes this process when `EVCXR_IS_RUNTIME` is set with
//! `PARALLAX_RUNTIME_REPORT`, or as a store's holder (`crate::supervisor`), which reports
//! nothing (its engine sends it every line itself) and runs each compiled cell as a
//! transaction (`crate::transaction`).

use std::ffi::c_void;
use std::io::{BufRead, Write};

/// The environment variable naming the report file.
pub const REPORT_VAR: &str = "PARALLAX_RUNTIME_REPORT";

const COMPLETE: &str = "EVCXR_EXECUTION_COMPLETE";

/// Written to a store's stderr at the end of each compiled cell, before its end on stdout: the
/// engine or kernel reading both waits for it (`crate::store`), so that what the cell wrote to
/// stderr is passed on with the cell, not after it.
pub const STDERR_SYNC: &str = "PARALLAX_STDERR_SYNC 5f1c0d2e";

/// `PARALLAX_SET_ENV NAME VALUE`: a variable the engine learns only after its store started
/// (a standby engine learns its id when it is adopted), set before any cell of the user's.
pub const SET_ENV: &str = "PARALLAX_SET_ENV ";

/// Serves the evaluation protocol on stdin and stdout until stdin closes; never returns.
/// `sync_stderr`: as a store, write `STDERR_SYNC` at the end of each cell.
pub fn serve(report: Option<&std::path::Path>, sync_stderr: bool) -> ! {
    install_crash_handlers();
    let mut report = report.map(|path| {
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(file) => file,
            Err(e) => {
                eprintln!("parallax runtime: cannot open {}: {e}", path.display());
                std::process::exit(99);
            }
        }
    });
    let complete = || {
        if sync_stderr {
            eprintln!("{STDERR_SYNC}");
        }
        println!("{COMPLETE}");
        let _ = std::io::stdout().flush();
    };
    // Loaded objects are never unloaded: their thread-local destructors may run at exit.
    let mut loaded: Vec<libloading::Library> = Vec::new();
    let mut store: *mut c_void = std::ptr::null_mut();
    // A store's holder runs each compiled cell as a transaction.
    let mut transactions = crate::transaction::Transactions::for_holder();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if let Some(setting) = line.strip_prefix(SET_ENV) {
            set_environment(setting);
            complete();
            continue;
        }
        if let Some(setting) = line.strip_prefix(crate::transaction::SWITCH) {
            if let Some(transactions) = transactions.as_mut() {
                transactions.switch(setting);
            }
            complete();
            continue;
        }
        let Some((path, function)) = line
            .strip_prefix("LOAD_AND_RUN ")
            .and_then(|rest| rest.rsplit_once(' '))
        else {
            eprintln!("parallax runtime: unrecognised instruction {line:?}");
            std::process::exit(99);
        };
        if let Err(e) = report
            .as_mut()
            .map_or(Ok(()), |r| writeln!(r, "{line}").and_then(|_| r.flush()))
        {
            eprintln!("parallax runtime: cannot write the report: {e}");
            std::process::exit(99);
        }
        let mut run_cell = || {
            // SAFETY: the object was just built by evcxr for this process's protocol: its
            // function takes and returns the variable store, as evcxr's own runtime calls it.
            let result = unsafe {
                libloading::Library::new(path).and_then(|library| {
                    type Entry = extern "C" fn(*mut c_void) -> *mut c_void;
                    // A library from the compiled-cell cache has its first build's entry name.
                    let run = library.get::<Entry>(function.as_bytes()).or_else(|_| {
                        library.get::<Entry>(crate::cell_build::ENTRY_ALIAS.as_bytes())
                    })?;
                    store = run(store);
                    Ok(library)
                })
            };
            match result {
                Ok(library) => loaded.push(library),
                Err(e) => {
                    eprintln!("parallax runtime: loading {path}: {e}");
                    std::process::exit(99);
                }
            }
        };
        match transactions.as_mut() {
            // A rolled-back cell was announced by the transaction; the store goes on.
            Some(transactions) => {
                let _ = transactions.run(run_cell);
            }
            None => run_cell(),
        }
        complete();
    }
    std::process::exit(0);
}

fn set_environment(setting: &str) {
    let (name, value) = setting.split_once(' ').unwrap_or((setting, ""));
    // Sent before any cell of the user's ran, so no thread of theirs reads the environment
    // meanwhile; this process's own only thread is this one.
    std::env::set_var(name, value);
}

/// A crash in a cell ends the process with a word on stderr, as evcxr's runtime does, and by
/// the same signal (a cell's fork then reports how it ended); evcxr's context reports a lost
/// process.
fn install_crash_handlers() {
    extern "C" fn on_crash(signal: libc::c_int) {
        let said: &[u8] = match signal {
            libc::SIGSEGV => b"Segmentation fault.\n",
            libc::SIGILL => b"Illegal instruction.\n",
            libc::SIGBUS => b"Bus error.\n",
            _ => b"Unexpected signal.\n",
        };
        // SAFETY: write(2), signal(2) and raise(3) are async-signal-safe. The signal, blocked
        // while this runs, ends the process with its default action once this returns (a
        // fault also comes back as the instruction runs again).
        unsafe {
            libc::write(2, said.as_ptr().cast(), said.len());
            libc::signal(signal, libc::SIG_DFL);
            libc::raise(signal);
        }
    }
    for signal in [libc::SIGSEGV, libc::SIGILL, libc::SIGBUS] {
        // SAFETY: installs a handler that only calls async-signal-safe functions.
        unsafe {
            let handler: extern "C" fn(libc::c_int) = on_crash;
            libc::signal(signal, handler as libc::sighandler_t);
        }
    }
}
