//! The evaluation process a compiling evcxr context is given: it passes the context's lines to
//! the engine's gateway (`crate::gateway`) and the gateway's back, and when the gateway says
//! the engine's store died, it ends the same way, so that evcxr sees its process die and
//! starts a new one, exactly as with a process of its own.

use crate::gateway::DIED;
use std::io::{BufRead, BufReader, Write};

/// Relays until either side closes; never returns.
pub fn serve(socket: &std::path::Path) -> ! {
    let stream = match parallax_data::socket_path::connect(socket) {
        Ok(stream) => stream,
        Err(e) => {
            eprintln!("parallax relay: cannot reach {}: {e}", socket.display());
            std::process::exit(99);
        }
    };
    let Ok(mut to_gateway) = stream.try_clone() else {
        std::process::exit(99);
    };
    // The context's lines (instructions, answers to prompts) go to the gateway as they come.
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if writeln!(to_gateway, "{line}").is_err() {
                break;
            }
        }
        // The context closed us: it is being dropped.
        std::process::exit(0);
    });
    let mut from_gateway = BufReader::new(stream);
    let stdout = std::io::stdout();
    let mut line = String::new();
    loop {
        line.clear();
        match from_gateway.read_line(&mut line) {
            Ok(0) | Err(_) => std::process::exit(1),
            Ok(_) => {}
        }
        if let Some(how) = line.trim_end().strip_prefix(DIED) {
            end_like(how);
        }
        let mut out = stdout.lock();
        let _ = out.write_all(line.as_bytes());
        if from_gateway.buffer().is_empty() {
            let _ = out.flush();
        }
    }
}

/// Ends this process as the store ended: by the same signal, or with the same code.
fn end_like(how: &str) -> ! {
    let number = |prefix: &str| {
        how.strip_prefix(prefix)
            .and_then(|n| n.trim().parse::<i32>().ok())
    };
    if let Some(signal) = number("signal ") {
        // SAFETY: plain system calls on this process; no core file for a relayed crash.
        unsafe {
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &no_core);
            libc::signal(signal, libc::SIG_DFL);
            libc::raise(signal);
        }
    }
    std::process::exit(number("code ").unwrap_or(1));
}
