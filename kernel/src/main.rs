//! `parallax`: the Parallax Jupyter kernel, and its installer.

mod completeness;
mod history;
mod install;
mod iopub;
mod server;
mod shell;
mod stdin;
mod wire;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
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
}

fn main() -> ExitCode {
    // evcxr runs this same binary as its evaluation process and as a rustc wrapper; in those
    // roles this call never returns. It must come before anything else.
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
    let result = match cli.command {
        Cmd::Kernel { connection_file } => run_kernel(&connection_file),
        Cmd::Install(args) => install::install(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("parallax: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_kernel(connection_file: &std::path::Path) -> anyhow::Result<()> {
    let info = server::read_connection_file(connection_file)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(server::serve(info))?;
    // Exit without waiting for the evaluator: its process ends when our pipes close.
    std::process::exit(0)
}
