//! Where this host keeps things: its name, the user's home, its cache directory, the base of
//! this process's private directories, and the temporary directory each kernel and engine keeps
//! for itself. One reading of each for the kernel and the engines, so that both name a host and
//! a folder alike.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::OnceLock;

/// This host's name, as engines report theirs and the controller compares them. Read once:
/// a host does not change its name under a running process, and the dashboard asks every frame.
pub fn host_name() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_owned())
    })
}

/// The user's home, else the temporary directory (a service account may have none).
pub fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// The user's cache directory as evcxr finds it (XDG_CACHE_HOME, else ~/.cache), read each
/// time: an engine on another host points XDG_CACHE_HOME elsewhere before its threads start.
pub fn cache_base() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|path| path.is_absolute())
        .unwrap_or_else(|| home().join(".cache"))
}

/// Where private directories go: the user's runtime directory, else the host's temporary one.
pub fn private_base() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(host_temp)
}

/// The name of a kernel's or engine's own temporary directory, before its pid.
const OWN_TEMP_PREFIX: &str = "parallax-tmp-";

/// The host's temporary directory as it was before a process of ours pointed `TMPDIR` at its
/// own (children inherit both).
const HOST_TEMP_VAR: &str = "PARALLAX_HOST_TMPDIR";

/// The host's temporary directory (not this process's own).
pub fn host_temp() -> PathBuf {
    std::env::var_os(HOST_TEMP_VAR)
        .map(PathBuf::from)
        .filter(|path| path.is_absolute())
        .unwrap_or_else(std::env::temp_dir)
}

/// Gives this process (a kernel or an engine) a temporary directory of its own, for it and its
/// children: evcxr makes each context's crate directory there (tens of MiB once built), and
/// rust-analyzer its own, and neither removes them when the process exits without dropping the
/// context, or is killed. `remove_own_temp_dir` removes it at the end; one whose process is
/// gone is removed by the next kernel or engine of this host. Call before any thread starts:
/// it sets the environment.
pub fn use_own_temp_dir() {
    let host = host_temp();
    sweep_dead_temp_dirs();
    let own = own_temp_dir(&host);
    let made = std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&own)
        .or_else(|e| match e.kind() {
            // A pid's earlier life, gone without a sweep since.
            std::io::ErrorKind::AlreadyExists => Ok(()),
            _ => Err(e),
        });
    match made {
        Ok(()) => {
            std::env::set_var(HOST_TEMP_VAR, &host);
            std::env::set_var("TMPDIR", &own);
        }
        Err(e) => tracing::warn!("temporary files stay in {}: {e}", host.display()),
    }
}

/// Removes the own temporary directories of this host's kernels and engines that are gone
/// (one that was killed could not remove its own).
pub fn sweep_dead_temp_dirs() {
    parallax_engine_protocol::shared::sweep_dead(&host_temp(), &[OWN_TEMP_PREFIX]);
}

/// Removes what this host's dead kernels and engines left: their shared memory and their own
/// temporary directories (a killed process cannot remove them).
pub fn sweep_dead_leftovers() {
    parallax_engine_protocol::shared::sweep(&parallax_engine_protocol::shared::shm_base());
    sweep_dead_temp_dirs();
}

/// Removes this process's own temporary directory, if it has one.
pub fn remove_own_temp_dir() {
    let own = own_temp_dir(&host_temp());
    if std::env::temp_dir() == own {
        let _ = std::fs::remove_dir_all(own);
    }
}

fn own_temp_dir(host: &std::path::Path) -> PathBuf {
    host.join(format!("{OWN_TEMP_PREFIX}{}", std::process::id()))
}
