//! What Parallax adds around evcxr's cache of compiled dependencies, when this binary runs as
//! cargo's rustc wrapper for a crate built without incremental compilation (a dependency):
//!
//! - One build of a crate at a time per host. The wrapper copies the crate from, or into, a
//!   cache in the user's cache directory, and bumps a hit counter there by rewriting a file.
//!   Engines that compile at once (a diverged engine builds its own cells, hosts may share a
//!   home) would then read a counter or an artifact another process is halfway through
//!   writing, and the build fails. Holding a lock named after the crate for the whole wrapper
//!   run makes each cache entry written and read by one process at a time; builds of different
//!   crates still run side by side.
//! - Restored dep-info that names this build's files. evcxr keeps rustc's dep-info with the
//!   library, and it names files of the build script's output directory (`OUT_DIR`) by their
//!   absolute path in the context that first built the crate. Once that context's directory is
//!   gone, cargo finds the file missing on every later build, takes the crate for dirty, and
//!   rebuilds it and everything above it (the data crate, for real) on every cell. The wrapper
//!   points those paths at this build's `OUT_DIR`, where the build script wrote the same files.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// evcxr's own variables: set when this process is its rustc wrapper with the cache on.
const WRAPPER_VAR: &str = "EVCXR_RUSTC_WRAPPER";
const CACHE_VAR: &str = "EVCXR_CACHE_ENABLED";

/// When this process is about to act as evcxr's caching rustc wrapper for a dependency: takes
/// that crate's lock until the process exits and, for a crate with a build script, has its
/// dep-info pointed at this build's files as the process exits (evcxr's wrapper ends the
/// process itself). Otherwise does nothing. Call right before `evcxr::runtime_hook`.
pub fn prepare_wrapped_build() {
    if std::env::var_os(WRAPPER_VAR).is_none() || std::env::var_os(CACHE_VAR).is_none() {
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let Some(name) = cached_crate_name(&args) else {
        return;
    };
    hold_lock(name);
    if let Some(fix) = DepInfoFix::for_build(name, &args) {
        if DEP_INFO_FIX.set(fix).is_ok() {
            // SAFETY: registers a plain function; it runs once, at exit, in this
            // single-threaded process.
            unsafe { libc::atexit(fix_dep_info_at_exit) };
        }
    }
}

fn hold_lock(name: &str) {
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

static DEP_INFO_FIX: OnceLock<DepInfoFix> = OnceLock::new();

extern "C" fn fix_dep_info_at_exit() {
    if let Some(fix) = DEP_INFO_FIX.get() {
        fix.apply();
    }
}

/// The dep-info file of one dependency build and the build script output directory its
/// paths should name.
struct DepInfoFix {
    dep_info: PathBuf,
    out_dir: String,
}

impl DepInfoFix {
    /// For a crate whose build script ran (cargo then sets `OUT_DIR`): rustc writes its
    /// dep-info as `<out-dir>/<crate name><extra filename>.d`.
    fn for_build(name: &str, args: &[String]) -> Option<DepInfoFix> {
        let out_dir = std::env::var("OUT_DIR").ok()?;
        let value_after = |flag: &str| {
            let at = args.iter().position(|arg| arg == flag)?;
            args.get(at + 1)
        };
        let extra = args
            .iter()
            .find_map(|arg| arg.strip_prefix("extra-filename="))
            .unwrap_or_default();
        let dep_info = Path::new(value_after("--out-dir")?).join(format!("{name}{extra}.d"));
        Some(DepInfoFix { dep_info, out_dir })
    }

    fn apply(&self) {
        // No file: the build failed, or emitted no dep-info; cargo says what went wrong.
        let Ok(text) = std::fs::read_to_string(&self.dep_info) else {
            return;
        };
        let Some(fixed) = pointed_at(&text, &self.out_dir) else {
            return;
        };
        let staged = self.dep_info.with_extension("d.parallax");
        let written =
            std::fs::write(&staged, fixed).and_then(|()| std::fs::rename(&staged, &self.dep_info));
        if let Err(error) = written {
            // Only slower: cargo rebuilds the crate (from evcxr's cache) on the next cell.
            eprintln!("parallax: cannot fix {}: {error}", self.dep_info.display());
        }
    }
}

/// `dep_info` with every path into another build's copy of this build script output
/// directory (`<another target>/.../build/<unit>/out`) naming `out_dir` instead; `None` when
/// there is nothing to change or `out_dir` is not such a directory.
fn pointed_at(dep_info: &str, out_dir: &str) -> Option<String> {
    // rustc escapes spaces in dep-info paths; keep to directories that need no escaping.
    if out_dir.contains(char::is_whitespace) {
        return None;
    }
    let mut parts = out_dir.rsplitn(4, '/');
    let (out, unit, build) = (parts.next()?, parts.next()?, parts.next()?);
    if out != "out" || build != "build" || unit.is_empty() {
        return None;
    }
    let marker = format!("/build/{unit}/out");
    let mut fixed = String::with_capacity(dep_info.len());
    let mut changed = false;
    let mut done = 0;
    while let Some(found) = dep_info[done..].find(&marker) {
        let at = done + found;
        let end = at + marker.len();
        let ends_path = dep_info[end..]
            .chars()
            .next()
            .is_none_or(|c| c == '/' || c == ':' || c.is_whitespace());
        let start = path_start(dep_info, done, at);
        if ends_path && dep_info[start..end] != *out_dir {
            fixed.push_str(&dep_info[done..start]);
            fixed.push_str(out_dir);
            changed = true;
        } else {
            fixed.push_str(&dep_info[done..end]);
        }
        done = end;
    }
    fixed.push_str(&dep_info[done..]);
    changed.then_some(fixed)
}

/// Where the path that reaches `at` begins: after the last unescaped space, tab, line start or
/// `=` (of `# env-dep:OUT_DIR=...`) at or after `from`.
fn path_start(text: &str, from: usize, at: usize) -> usize {
    let bytes = text.as_bytes();
    (from..at)
        .rev()
        .find(|&i| match bytes[i] {
            b'\n' | b'\t' | b'=' => true,
            b' ' => i == 0 || bytes[i - 1] != b'\\',
            _ => false,
        })
        .map_or(from, |i| i + 1)
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
    use super::{cached_crate_name, pointed_at};

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

    const HERE: &str =
        "/t/p-2/.tmpB/target/x86_64-unknown-linux-gnu/debug/build/serde_core-ff63/out";

    #[test]
    fn restored_dep_info_names_this_builds_out_dir() {
        let there = "/tmp/.tmpA/target/x86_64-unknown-linux-gnu/debug/build/serde_core-ff63/out";
        let src = "/registry/serde_core-1.0/src/lib.rs";
        let dep_info = format!(
            "/d/libserde_core-f3.rlib: {src} {there}/private.rs\n\n{src}:\n{there}/private.rs:\n\n\
             # env-dep:OUT_DIR={there}\n"
        );
        let fixed = pointed_at(&dep_info, HERE).expect("a path to fix");
        assert_eq!(fixed, dep_info.replace(there, HERE));
        // Already right: nothing to write.
        assert_eq!(pointed_at(&fixed, HERE), None);
    }

    #[test]
    fn other_units_and_look_alike_paths_are_left_alone() {
        let dep_info =
            "/x.rlib: /a/build/serde_core-ff63/outside.rs /a/build/thiserror-ca88/out/p.rs\n";
        assert_eq!(pointed_at(dep_info, HERE), None);
        assert_eq!(pointed_at(dep_info, "/not/a/build/script/dir"), None);
        assert_eq!(
            pointed_at(dep_info, "/with space/build/serde_core-ff63/out"),
            None
        );
    }

    #[test]
    fn an_escaped_space_stays_inside_the_path() {
        let there = "/tmp/my\\ dir/target/debug/build/serde_core-ff63/out";
        let dep_info = format!("/x.rlib: /src/lib.rs {there}/private.rs\n");
        let fixed = pointed_at(&dep_info, HERE).expect("a path to fix");
        assert_eq!(fixed, format!("/x.rlib: /src/lib.rs {HERE}/private.rs\n"));
    }
}
