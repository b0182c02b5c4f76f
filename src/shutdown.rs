//! The shutdown signal: Ctrl-C / SIGTERM cancel a token that the library watches; a second
//! signal exits at once. Library code only ever sees the token, so tests can cancel it.

use tokio_util::sync::CancellationToken;

/// Exit code used when a second signal cuts the drain short (128 + SIGINT).
pub const EXIT_FORCED: i32 = 130;

/// Cancels the returned token on the first SIGINT/SIGTERM; exits the process on the second.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::warn!("signal received: finishing work in flight (signal again to stop at once)");
        t.cancel();
        wait_for_signal().await;
        eprintln!("second signal: stopping now");
        std::process::exit(EXIT_FORCED);
    });
    token
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
