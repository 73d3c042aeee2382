//! One build of a crate at a time per host, around evcxr's compiled-crate cache.
//!
//! evcxr runs this binary as cargo's rustc wrapper; for a crate built without incremental
//! compilation (a dependency) the wrapper copies it from, or into, a cache in the user's cache
//! directory, and bumps a hit counter there by rewriting a file. Engines that compile at once
//! (a diverged engine builds its own cells, hosts may share a home) would then read a counter
//! or an artifact another process is halfway through writing, and the build fails. Holding a
//! lock named after the crate for the whole wrapper run makes each cache entry written and
//! read by one process at a time; builds of different crates still run side by side.

use std::fs::File;

/// evcxr's own variables: set when this process is its rustc wrapper with the cache on.
const WRAPPER_VAR: &str = "EVCXR_RUSTC_WRAPPER";
const CACHE_VAR: &str = "EVCXR_CACHE_ENABLED";

/// When this process is about to act as evcxr's caching rustc wrapper for a dependency, waits
/// for and takes that crate's lock, and keeps it until the process exits. Otherwise does
/// nothing. Call right before `evcxr::runtime_hook`.
pub fn hold_while_wrapping_rustc() {
    if std::env::var_os(WRAPPER_VAR).is_none() || std::env::var_os(CACHE_VAR).is_none() {
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let Some(name) = cached_crate_name(&args) else {
        return;
    };
    let dir = crate::places::cache_base()
        .join("parallax")
        .join("crate-locks");
    let lock = std::fs::create_dir_all(&dir)
        .and_then(|()| File::create(dir.join(format!("{name}.lock"))))
        .and_then(|file| file.lock().map(|()| file));
    match lock {
        // Released by the kernel when the wrapper exits, however it exits.
        Ok(file) => std::mem::forget(file),
        // Without the lock the build still runs, as evcxr alone would run it.
        Err(error) => eprintln!("parallax: no lock for building {name}: {error}"),
    }
}

/// The crate a rustc command line builds, when evcxr would cache it: not incremental.
fn cached_crate_name(args: &[String]) -> Option<&str> {
    if args.iter().any(|arg| arg.starts_with("incremental=")) {
        return None;
    }
    let position = args.iter().position(|arg| arg == "--crate-name")?;
    let name = args.get(position + 1)?;
    let plain = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    (plain && !name.is_empty()).then_some(name.as_str())
}

#[cfg(test)]
mod tests {
    use super::cached_crate_name;

    fn args(line: &str) -> Vec<String> {
        line.split(' ').map(str::to_owned).collect()
    }

    #[test]
    fn a_dependency_build_is_locked_by_its_crate_name() {
        let line = "parallax rustc --crate-name itoa --edition=2018 src/lib.rs -C metadata=1f";
        assert_eq!(cached_crate_name(&args(line)), Some("itoa"));
    }

    #[test]
    fn an_incremental_build_is_not_cached_so_not_locked() {
        let line = "parallax rustc --crate-name ctx -C incremental=/tmp/x src/lib.rs";
        assert_eq!(cached_crate_name(&args(line)), None);
    }

    #[test]
    fn a_name_that_is_not_a_file_name_is_not_used() {
        assert_eq!(cached_crate_name(&args("rustc --crate-name ../x")), None);
        assert_eq!(cached_crate_name(&args("rustc --print cfg")), None);
    }
}
