//! Engines on this host: children of the kernel, tied to its life.

/// `parallax engine` as engine `id`, reading the connection on stdin.
pub(super) fn command(exe: &str, id: u32) -> tokio::process::Command {
    engine_command(exe, &["--id", &id.to_string()])
}

/// `parallax engine --standby`: warm first, then the connection and its id on stdin.
pub(super) fn standby_command(exe: &str) -> tokio::process::Command {
    engine_command(exe, &["--standby"])
}

fn engine_command(exe: &str, how: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(exe);
    command.args(["engine", "--connect", "-"]).args(how);
    // SAFETY: prctl in the child between fork and exec touches no memory of ours; it ties the
    // engine's life to this kernel's, even when the kernel is SIGKILLed. The signal follows the
    // forking thread, here one of tokio's workers, which live as long as the kernel's runtime.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    command
}
