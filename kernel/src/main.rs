//! `parallax`: the Parallax Jupyter kernel, its engines and its installer, in one binary.
//!
//! The parts, from the notebook to the engines and back:
//! - `jupyter`: the five Jupyter channels; `shell` takes each request in turn;
//! - `cell`: runs a cell's segments: Rust in the notebook's own evcxr context, magics in `magic`;
//! - `magic`: one file per family of magics, turning a parsed command into work and output;
//! - `controller`: the pool of engines, the signed socket to them, the compile-sharing plan,
//!   the map scheduler; it never speaks Jupyter;
//! - `dashboard`: the monitor the controller reports to, and its views (the notebook block,
//!   the browser page);
//! - `text`: words and markup shared by the views; `install`: the kernelspec.
//!
//! The engines' side is in `engines/` (`parallax_engine::run` is `parallax engine`), and the
//! magics' parser in `magics/`.
//!
//! The path of a `%px` cell: `jupyter::shell::Shell::execute` → `cell::CellRunner::run` →
//! `magic::Magics::run` → `magic::px::Px::px` → `controller::Controller::submit` (plan, one
//! task per engine, sent over `controller::link`) → engines → `controller::routing` →
//! `controller::collect` → the cell's `CellOut`. ARCHITECTURE.md walks it step by step, and a
//! `%pmap` chunk too.

mod cell;
mod controller;
mod dashboard;
mod install;
mod jupyter;
mod magic;
mod text;

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "parallax",
    version,
    about = "Interactive parallel Rust in Jupyter"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the kernel (Jupyter starts it with this command).
    Kernel {
        /// The connection file Jupyter wrote for this kernel.
        #[arg(long, short = 'f')]
        connection_file: PathBuf,
    },
    /// Install the `parallax` kernelspec so that Jupyter can start this kernel.
    Install(install::InstallArgs),
    /// Run an engine: launchers start these for `%cluster start`; on a machine without one,
    /// start them by hand with the file `%cluster connection-file` writes.
    Engine {
        /// The connection file (address and key, mode 0600), or `-` to read it from stdin.
        #[arg(long)]
        connect: PathBuf,
        /// This engine's id in the pool (default: the controller numbers it).
        #[arg(long, conflicts_with = "rank_offset")]
        id: Option<u32>,
        /// Take the id OFFSET + the rank that mpiexec or srun gives this process.
        #[arg(long, value_name = "OFFSET")]
        rank_offset: Option<u32>,
        /// Warm up first (the compiling context and its preludes), then read the connection,
        /// with the id to take, on stdin: the kernel keeps one such engine ready to adopt.
        #[arg(long, conflicts_with_all = ["id", "rank_offset"])]
        standby: bool,
    },
}

fn run_engine(connect: &Path, id: Option<u32>, rank_offset: Option<u32>) -> anyhow::Result<()> {
    let connection = read_connection(connect)?;
    let id = match (id, rank_offset) {
        (Some(id), _) => parallax_engine::EngineId::Given(id),
        (None, Some(offset)) => parallax_engine::EngineId::RankOffset(offset),
        (None, None) => parallax_engine::EngineId::Assigned,
    };
    parallax_engine::run(parallax_engine::EngineConfig { connection, id })
}

/// A standby engine: warm first, then adopted with the connection (and id) the kernel writes.
fn run_standby_engine(connect: &Path) -> anyhow::Result<()> {
    let connect = connect.to_owned();
    parallax_engine::run_standby(move || {
        let connection = read_connection(&connect)?;
        let id = connection
            .engine
            .ok_or_else(|| anyhow::anyhow!("a standby engine's connection names no id"))?;
        Ok(parallax_engine::EngineConfig {
            connection,
            id: parallax_engine::EngineId::Given(id),
        })
    })
}

fn read_connection(connect: &Path) -> anyhow::Result<parallax_engine_protocol::Connection> {
    use anyhow::Context;
    let text = if connect == Path::new("-") {
        // One JSON document; the launcher closes our stdin after it, or (ssh) keeps it open.
        let mut text = String::new();
        let stdin = std::io::stdin();
        let mut line = String::new();
        while stdin
            .read_line(&mut line)
            .context("reading the connection on stdin")?
            > 0
        {
            text.push_str(&line);
            line.clear();
            if serde_json::from_str::<serde_json::Value>(&text).is_ok() {
                break;
            }
        }
        text
    } else {
        std::fs::read_to_string(connect)
            .with_context(|| format!("reading the connection file {}", connect.display()))?
    };
    parallax_engine_protocol::Connection::parse(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", connect.display()))
}

fn main() -> ExitCode {
    // A store looks for its owner itself (the supervisor's loop), and its holder dies with the
    // supervisor by a signal: a watching thread would keep the holder from forking its cells.
    let store = std::env::var_os(parallax_eval::store::STORE_VAR).is_some();
    if std::env::var_os("EVCXR_IS_RUNTIME").is_some() && !store {
        die_with_parent();
    }
    // evcxr runs this same binary as its evaluation process and as a rustc wrapper; in those
    // roles this call never returns. It must come before anything else but the line above.
    // Parallax's own evaluation processes: an engine's store, a compiling context's relay to
    // it, a runtime that records the compiled cells it runs, and the notebook's.
    if std::env::var_os("EVCXR_IS_RUNTIME").is_some() {
        if let Some(socket) = std::env::var_os(parallax_eval::gateway::RELAY_VAR) {
            parallax_eval::relay::serve(std::path::Path::new(&socket));
        }
        if store {
            if std::env::var_os(parallax_eval::supervisor::HOLDER_VAR).is_some() {
                parallax_eval::runtime::serve(None, true);
            }
            parallax_eval::supervisor::supervise();
        }
        if let Some(report) = std::env::var_os(parallax_eval::runtime::REPORT_VAR) {
            parallax_eval::runtime::serve(Some(std::path::Path::new(&report)), false);
        }
        // The notebook's own: ours rather than evcxr's, for the cached cells' entry alias.
        parallax_eval::runtime::serve(None, false);
    }
    parallax_eval::cell_build::serve_if_cell_build();
    parallax_eval::crate_cache::prepare_wrapped_build();
    evcxr::runtime_hook();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // The kernel's stderr ends up in the Jupyter server's log, not a terminal.
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PARALLAX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,parallax=info")),
        )
        .init();
    if matches!(cli.command, Cmd::Kernel { .. } | Cmd::Engine { .. }) {
        parallax_eval::places::use_own_temp_dir();
    }
    let result = match cli.command {
        Cmd::Kernel { connection_file } => run_kernel(&connection_file),
        Cmd::Install(args) => install::install(&args),
        Cmd::Engine {
            connect,
            standby: true,
            ..
        } => run_standby_engine(&connect),
        Cmd::Engine {
            connect,
            id,
            rank_offset,
            standby: false,
        } => run_engine(&connect, id, rank_offset),
    };
    parallax_engine_protocol::shared::remove_own_dirs();
    parallax_eval::places::remove_own_temp_dir();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("parallax: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// An evaluation process runs user code that may loop forever; it must not outlive the kernel
/// or engine that started it, even when that one is killed with SIGKILL. PR_SET_PDEATHSIG
/// would not do: it fires when the *thread* that forked the process ends, and an engine's store
/// is restarted (after a crash or an interrupt) from whichever thread ran the cell, such as one
/// of tokio's blocking threads, which tokio retires after ten idle seconds, killing the store
/// with it. So a thread of ours watches for the parent process itself to go.
fn die_with_parent() {
    /// How often the parent is looked for: the most an orphan outlives it.
    const PARENT_WATCH: std::time::Duration = std::time::Duration::from_millis(100);
    // SAFETY: getppid takes nothing and cannot fail; _exit takes a plain integer.
    let parent = unsafe { libc::getppid() };
    if parent == 1 {
        unsafe { libc::_exit(1) };
    }
    let watch = std::thread::Builder::new()
        .name("parent-watch".into())
        .spawn(move || loop {
            std::thread::sleep(PARENT_WATCH);
            // SAFETY: as above. Once orphaned, a process is re-parented: its parent id changes.
            if unsafe { libc::getppid() } != parent {
                unsafe { libc::_exit(1) };
            }
        });
    if watch.is_err() {
        // Without a watch, the thread-bound signal is better than nothing.
        // SAFETY: prctl takes plain integers.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    }
}

fn run_kernel(connection_file: &std::path::Path) -> anyhow::Result<()> {
    let info = jupyter::server::read_connection_file(connection_file)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let served = runtime.block_on(jupyter::server::serve(info));
    parallax_engine_protocol::shared::remove_own_dirs();
    parallax_eval::places::remove_own_temp_dir();
    served?;
    // Exit without waiting for the evaluator: its process ends when our pipes close.
    std::process::exit(0)
}
