//! Where this host keeps things: its name, the user's home, its cache directory, the base of
//! this process's private directories. One reading of each for the kernel and the engines, so
//! that both name a host and a folder alike.

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

/// Where private directories go: the user's runtime directory, else the temporary one.
pub fn private_base() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}
