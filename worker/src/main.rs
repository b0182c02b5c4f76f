//! `keyfleet-worker`: parse flags, set up logging and the shutdown signal, run the worker.

use std::process::ExitCode;

use anyhow::Context;
use keyfleet::cli::config::WorkerArgs;
use keyfleet::cli::resolve::FileConfig;

#[tokio::main]
async fn main() -> ExitCode {
    let args: WorkerArgs = keyfleet::cli::parse();
    keyfleet::telemetry::logging::init(&args.log, "info");
    keyfleet::hardening::no_core_dumps();
    let file = match FileConfig::load(args.config.as_deref()) {
        Ok((file, _)) => file,
        Err(e) => {
            eprintln!("keyfleet-worker: {}", keyfleet::sink::error_chain(&e));
            return ExitCode::from(2);
        }
    };
    let shutdown = keyfleet::shutdown::on_signals();
    let result = keyfleet::modes::worker::run(args.to_config(&file), shutdown)
        .await
        .context("keyfleet-worker stopped");
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyfleet-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}
