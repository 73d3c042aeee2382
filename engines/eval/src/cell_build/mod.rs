//! A cell's build, as this binary does it in the role of cargo's rustc wrapper (evcxr makes it
//! that wrapper). For evcxr's cell crate, and only when it is built for real, the wrapper
//! looks the build up in the host's compiled-cell cache (`cache`) by its key (`key`): on a
//! hit it puts the cached library and dep-info where rustc would have and says what rustc
//! said, without running rustc; on a miss it runs rustc with local LTO off (which costs a
//! cell more than it saves) and keeps the result. Each build is counted in the file the
//! context named (`REPORT_VAR`), which the context reads after each cell.
//!
//! A cached library keeps the entry name of the build that made it (`run_user_code_7`),
//! while evcxr asks a later build for its own (`run_user_code_12`): every library also
//! exports `ENTRY_ALIAS`, which the runtime calls when the asked-for name is missing.

pub mod cache;
pub mod key;

use cache::{Built, CellCache};
use parallax_engine_protocol::BuildCounts;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The variable naming the file a context reads its build counts from.
pub const REPORT_VAR: &str = "PARALLAX_BUILD_REPORT";

/// The name under which every cell library also exports its entry.
pub const ENTRY_ALIAS: &str = "parallax_cell_entry";

/// evcxr's name for its cell crate, and its own wrapper's variables.
const CELL_CRATE: &str = "ctx";
const WRAPPER_VAR: &str = "EVCXR_RUSTC_WRAPPER";
const SO_PATH_VAR: &str = "EVCXR_EXECUTION_SO_PATH";

/// The metadata every cell library is built with, in every context (see `args_for_rustc`).
const CELL_METADATA: &str = "parallax-cell";

/// Stands for the crate's directory in what the cache keeps.
pub(crate) const CRATE_DIR_MARK: &str = "{parallax-cell-crate}";

/// One rustc command line for the cell crate, as cargo gave it to the wrapper.
pub struct RustcCall {
    rustc: PathBuf,
    args: Vec<String>,
    crate_dir: PathBuf,
    source: PathBuf,
    out_dir: PathBuf,
    extra_filename: String,
}

impl RustcCall {
    /// The call this process was started for, if it is a build of the cell crate that makes
    /// a library (not `cargo check`, not a dependency, not evcxr's own non-incremental build).
    fn of_this_process() -> Option<RustcCall> {
        std::env::var_os(WRAPPER_VAR)?;
        let mut argv = std::env::args_os().skip(1);
        let rustc = PathBuf::from(argv.next()?);
        let args: Vec<String> = argv
            .map(|arg| arg.into_string().ok())
            .collect::<Option<_>>()?;
        // `--flag value` or `--flag=value`, as cargo spells each.
        let value_of = |flag: &str| {
            args.iter().enumerate().find_map(|(at, arg)| {
                if arg == flag {
                    args.get(at + 1).cloned()
                } else {
                    arg.strip_prefix(flag)?.strip_prefix('=').map(str::to_owned)
                }
            })
        };
        let codegen = |option: &str| {
            args.iter()
                .find_map(|arg| arg.strip_prefix(option).map(str::to_owned))
        };
        let builds_library = value_of("--emit").is_some_and(|emit| emit.contains("link"));
        let incremental = codegen("incremental=").is_some();
        if value_of("--crate-name")? != CELL_CRATE || !builds_library || !incremental {
            return None;
        }
        let crate_dir = std::env::current_dir().ok()?;
        let source = crate_dir.join(args.iter().find(|arg| arg.ends_with(".rs"))?);
        Some(RustcCall {
            out_dir: PathBuf::from(value_of("--out-dir")?),
            extra_filename: codegen("extra-filename=").unwrap_or_default(),
            rustc,
            args,
            crate_dir,
            source,
        })
    }

    /// The arguments as the key sees them: no output or incremental directories or metadata
    /// hash, linked crates by content, the crate's own paths relative to it.
    fn keyed_args(&self, digests: &key::ExternDigests) -> Vec<String> {
        let crate_dir = self.crate_dir.to_string_lossy();
        let mut keyed = Vec::with_capacity(self.args.len());
        let mut args = self.args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--out-dir" => {
                    args.next();
                }
                _ if arg.starts_with("--out-dir=") => {}
                "--extern" => {
                    let Some(named) = args.next() else { break };
                    keyed.push(match named.split_once('=') {
                        Some((name, path)) => format!("--extern {name}={}", digests.of(path)),
                        None => format!("--extern {named}"),
                    });
                }
                // Cargo's metadata hash names the crate's directory, a new one per context;
                // what else it covers (compiler, profile, features, dependencies) is keyed on
                // its own.
                _ if arg.starts_with("incremental=") || arg.starts_with("metadata=") => {
                    keyed.pop(); // its `-C`
                }
                _ => keyed.push(arg.replace(crate_dir.as_ref(), CRATE_DIR_MARK)),
            }
        }
        keyed
    }

    /// Cargo's arguments with its metadata hash (which names the context's directory) replaced
    /// by one shared by every context: a library from the cache then defines its types with
    /// the same `TypeId`s, and its symbols with the same names, as one built here would, so
    /// values stored by one are taken by the other.
    fn args_for_rustc(&self) -> Vec<String> {
        self.args
            .iter()
            .map(|arg| match arg.strip_prefix("metadata=") {
                Some(_) => format!("metadata={CELL_METADATA}"),
                None => arg.clone(),
            })
            .collect()
    }

    fn library(&self) -> PathBuf {
        self.out_dir
            .join(format!("lib{CELL_CRATE}{}.so", self.extra_filename))
    }

    fn dep_info(&self) -> PathBuf {
        self.out_dir
            .join(format!("{CELL_CRATE}{}.d", self.extra_filename))
    }

    fn relative(&self, text: &str) -> String {
        text.replace(self.crate_dir.to_string_lossy().as_ref(), CRATE_DIR_MARK)
    }

    fn absolute(&self, text: &str) -> String {
        text.replace(CRATE_DIR_MARK, self.crate_dir.to_string_lossy().as_ref())
    }
}

/// When this process is cargo's rustc wrapper for a cell build, does the build and exits with
/// rustc's status; otherwise returns. Call before `evcxr::runtime_hook`.
pub fn serve_if_cell_build() {
    let Some(call) = RustcCall::of_this_process() else {
        return;
    };
    let built = build(&call).unwrap_or_else(|e| {
        eprintln!("parallax: building the cell: {e}");
        false
    });
    std::process::exit(if built { 0 } else { 1 });
}

/// Whether the cell's library is in place.
fn build(call: &RustcCall) -> std::io::Result<bool> {
    let source = std::fs::read_to_string(&call.source)?;
    let key = key::BuildKey::of(call, &source);
    let cache = CellCache::of_host();
    if let Some(built) = cache.find(&key) {
        put_in_place(call, &built)?;
        cache.count(true);
        report("cached");
        return Ok(true);
    }
    if !source.contains(ENTRY_ALIAS) {
        std::fs::write(&call.source, with_entry_alias(&source))?;
    }
    let (succeeded, messages) = run_rustc(call)?;
    if !succeeded {
        report("failed");
        return Ok(false);
    }
    cache.count(false);
    report("compiled");
    let built = Built {
        library: std::fs::read(call.library())?,
        dep_info: call.relative(&std::fs::read_to_string(call.dep_info())?),
        messages: call.relative(&messages),
    };
    if let Err(e) = cache.store(&key, &built) {
        eprintln!("parallax: could not keep the cell in the cache: {e}");
    }
    tell_evcxr(call)?;
    Ok(true)
}

/// The cell's source with `ENTRY_ALIAS` calling its entry, after everything evcxr wrote (so
/// that no line of its moves, and its error spans stay right).
fn with_entry_alias(source: &str) -> String {
    let marker = format!("fn {}", key::ENTRY_PREFIX);
    let entry = source.find(&marker).map(|at| {
        let name = &source[at + 3..];
        let end = name
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(name.len());
        &name[..end]
    });
    match entry {
        // Typeless pointers: some of evcxr's builds name the store's type by another path.
        Some(entry) => format!(
            "{source}\n#[unsafe(no_mangle)]\npub extern \"C\" fn {ENTRY_ALIAS}(store: *mut \
             ::core::ffi::c_void) -> *mut ::core::ffi::c_void {{ {entry}(store.cast()).cast() }}\n"
        ),
        None => source.to_owned(),
    }
}

/// Runs rustc with the call's arguments, one metadata for every context and local LTO off,
/// passing what it says on to cargo and keeping it.
fn run_rustc(call: &RustcCall) -> std::io::Result<(bool, String)> {
    let mut child = Command::new(&call.rustc)
        .args(call.args_for_rustc())
        .args(["-C", "lto=off"])
        .stderr(Stdio::piped())
        .spawn()?;
    let mut messages = String::new();
    if let Some(stderr) = child.stderr.take() {
        let mut to_cargo = std::io::stderr().lock();
        for line in BufReader::new(stderr).lines() {
            let line = line?;
            writeln!(to_cargo, "{line}")?;
            messages.push_str(&line);
            messages.push('\n');
        }
    }
    Ok((child.wait()?.success(), messages))
}

/// A cached build where rustc would have left it, and rustc's words for cargo.
fn put_in_place(call: &RustcCall, built: &Built) -> std::io::Result<()> {
    write_by_rename(&call.library(), &built.library)?;
    write_by_rename(&call.dep_info(), call.absolute(&built.dep_info).as_bytes())?;
    std::io::stderr().write_all(call.absolute(&built.messages).as_bytes())?;
    tell_evcxr(call)
}

fn write_by_rename(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let scratch = path.with_extension(format!("parallax-{}", std::process::id()));
    std::fs::write(&scratch, bytes)?;
    std::fs::rename(&scratch, path)
}

/// evcxr's own wrapper tells it where the library is, in the file it names.
fn tell_evcxr(call: &RustcCall) -> std::io::Result<()> {
    match std::env::var_os(SO_PATH_VAR) {
        Some(file) => std::fs::write(file, call.library().to_string_lossy().as_bytes()),
        None => Ok(()),
    }
}

/// Something the context should log: said in its report file, since what the wrapper writes
/// to stderr goes to cargo, and evcxr keeps little of that.
pub(crate) fn note(message: &str) {
    report(&format!("{NOTE}{message}"));
}

const NOTE: &str = "note ";

/// Counts this build in the context's report file (or says a note).
fn report(outcome: &str) {
    if let Some(path) = std::env::var_os(REPORT_VAR) {
        if let Err(e) = cache::append_line(Path::new(&path), outcome) {
            eprintln!("parallax: could not count the build: {e}");
        }
    }
}

/// The builds of one evaluator, shared between its handle and its context's thread.
#[derive(Clone, Default)]
pub struct BuildCounter(std::sync::Arc<std::sync::Mutex<BuildCounts>>);

impl BuildCounter {
    pub fn add(&self, counts: BuildCounts) {
        if let Ok(mut total) = self.0.lock() {
            total.add(counts);
        }
    }

    pub fn get(&self) -> BuildCounts {
        self.0.lock().map(|total| *total).unwrap_or_default()
    }
}

/// A context's report file: the builds counted since it was last read.
pub struct BuildReport {
    path: PathBuf,
}

impl BuildReport {
    /// A fresh report file for one context of this process, in the process's own temporary
    /// directory (`crate::places::use_own_temp_dir`), which goes with it even if the context
    /// is never dropped.
    pub fn fresh() -> BuildReport {
        static CONTEXTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let number = CONTEXTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("parallax-builds-{}-{number}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        BuildReport { path }
    }

    /// The evcxr command that has the context's builds report here (not a cell of its
    /// history: the path differs between engines that share cells).
    pub fn command(&self) -> String {
        format!(":build_env {REPORT_VAR}={}", self.path.display())
    }

    /// The builds counted since the last call.
    pub fn take(&self) -> BuildCounts {
        let mut counts = BuildCounts::default();
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return counts;
        };
        let _ = std::fs::remove_file(&self.path);
        for line in text.lines() {
            match line {
                "compiled" => counts.compiled += 1,
                "cached" => counts.cached += 1,
                "failed" => counts.failed += 1,
                other => match other.strip_prefix(NOTE) {
                    Some(note) => tracing::warn!("{note}"),
                    None => tracing::warn!("unknown line in the build report: {other:?}"),
                },
            }
        }
        counts
    }
}

impl Drop for BuildReport {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_leaves_out_where_a_context_builds() {
        let call = |dir: &str| RustcCall {
            rustc: PathBuf::from("/toolchain/bin/rustc"),
            args: [
                "--crate-name",
                "ctx",
                "src/lib.rs",
                "-C",
                "opt-level=2",
                "-C",
                &format!("incremental={dir}/target/incremental"),
                "-C",
                "metadata=5a1b",
                "--out-dir",
                &format!("{dir}/target/deps"),
                "-L",
                &format!("dependency={dir}/target/deps"),
            ]
            .iter()
            .map(|arg| arg.replace("5a1b", &dir.len().to_string()))
            .collect(),
            crate_dir: PathBuf::from(dir),
            source: PathBuf::from(format!("{dir}/src/lib.rs")),
            out_dir: PathBuf::from(format!("{dir}/target/deps")),
            extra_filename: String::new(),
        };
        let first = call("/tmp/.tmpA");
        let digests = key::ExternDigests::load(&first.crate_dir);
        let keyed = first.keyed_args(&digests);
        assert_eq!(keyed, call("/tmp/.tmpBBBB").keyed_args(&digests));
        assert!(keyed.contains(&"opt-level=2".to_owned()));
        assert!(keyed.iter().all(|arg| !arg.contains("/tmp/.tmpA")));
        assert!(keyed.iter().all(|arg| !arg.starts_with("metadata=")));
        // A crate directory at another depth: its library's path to the standard library's
        // differs, so its build is another.
        let source = "fn f() {}\n";
        let base = |dir: &str| key::BuildKey::of(&call(dir), source).base;
        assert_eq!(base("/tmp/.tmpA"), base("/tmp/.tmpBBBB"));
        assert_ne!(base("/tmp/.tmpA"), base("/tmp/parallax-tmp-1/.tmpA"));
    }
}
