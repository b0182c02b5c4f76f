//! The `keyfleet` command: parse flags, set up logging and the shutdown signal, and hand
//! over to the library.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli: keyfleet::cli::config::Cli = keyfleet::cli::parse();
    keyfleet::telemetry::logging::init(&cli.global.log, "warn");
    keyfleet::hardening::no_core_dumps();
    let shutdown = keyfleet::shutdown::on_signals();
    match keyfleet::cli::app::execute(cli, shutdown).await {
        Ok(code) => code,
        Err(e) => keyfleet::cli::app::exit_code(&e),
    }
}
