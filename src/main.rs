//! The `keyfleet` command line: parse flags, set up logging and the shutdown signal, and hand
//! over to the library.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = keyfleet::config::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.global.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let shutdown = keyfleet::shutdown::on_signals();
    match keyfleet::app::execute(cli, shutdown).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keyfleet: {e:#}");
            ExitCode::from(keyfleet::app::EXIT_FAILED)
        }
    }
}
