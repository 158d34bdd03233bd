//! The `blockd` binary: `blockd run --config FILE [--node NAME] [--io-engine ENGINE]`.
//!
//! Exit codes: 0 clean shutdown; 1 runtime failure (message on stderr); 2 usage or
//! config error.

use std::io::IsTerminal;
use std::process::ExitCode;

use blockd::cli::{Cli, Command};
use blockd::config::Config;
use blockd::daemon::{RunOptions, run};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli.command {
        Command::Run { config, node, io_engine } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return usage_error(&e),
            };
            let node = match config.local_node(node.as_deref()) {
                Ok(n) => n.clone(),
                Err(e) => return usage_error(&e),
            };
            // Before anything is opened or bound: a missing or too small disk is a
            // mistake in the config (exit 2, file:line:key), not a runtime failure.
            if let Err(e) = config.check_local(&node) {
                return usage_error(&e);
            }
            // `worker-threads`: a standalone export's tasks hand each request from
            // the NBD reader to the writer; on one thread that is a function call,
            // across two a thread wake-up (ARCHITECTURE, "Threads").
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.worker_threads(&node))
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => return failure(&anyhow::Error::new(e).context("cannot start the async runtime")),
            };
            match runtime.block_on(run(config, node, RunOptions { engine: io_engine })) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => failure(&e),
            }
        }
    }
}

fn usage_error(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("blockd: {e}");
    ExitCode::from(2)
}

fn failure(e: &anyhow::Error) -> ExitCode {
    eprintln!("blockd: {e:#}");
    ExitCode::from(1)
}
