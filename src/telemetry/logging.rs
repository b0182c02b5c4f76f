//! Logging for both binaries: `tracing` to stderr, filtered by the user's directives, with
//! colour only on a terminal.
//!
//! Whatever the directives say, dependencies never log message bodies: lapin logs a message
//! the broker returns as unroutable at WARN with its whole payload (`returned_messages`), and a
//! result's payload is a private key. Those events are dropped, and lapin and its protocol crate
//! are capped at INFO, below which they trace frames.

use std::io::IsTerminal;

use tracing::Level;
use tracing_subscriber::filter::{filter_fn, EnvFilter, FilterExt};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Installs the global subscriber. `directives` is an `EnvFilter` string (`--log`); when it
/// does not parse, `fallback` is used and the problem is reported once logging works.
pub fn init(directives: &str, fallback: &str) {
    let (filter, bad) = match EnvFilter::try_new(directives) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new(fallback), Some(e)),
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(filter.and(filter_fn(|meta| allowed(meta.target(), *meta.level()))));
    let _ = tracing_subscriber::registry().with(layer).try_init();
    if let Some(e) = bad {
        tracing::warn!("--log {directives:?} is not a valid filter ({e}); using {fallback:?}");
    }
}

/// Whether an event of `target` at `level` may be logged at all (see the module docs).
pub fn allowed(target: &str, level: Level) -> bool {
    if target.starts_with("lapin::returned_messages") {
        return false;
    }
    let chatty = ["lapin", "amq_protocol"]
        .iter()
        .any(|c| target == *c || target.starts_with(&format!("{c}::")));
    !chatty || level <= Level::INFO
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returned_message_bodies_are_never_logged() {
        assert!(!allowed("lapin::returned_messages", Level::WARN));
        assert!(!allowed("lapin::returned_messages", Level::ERROR));
        assert!(!allowed("lapin::channel", Level::TRACE));
        assert!(!allowed("amq_protocol::frame", Level::DEBUG));
        assert!(allowed("lapin::channel", Level::WARN));
        assert!(allowed("keyfleet::modes::worker", Level::TRACE));
        assert!(allowed("lapinx", Level::TRACE));
    }
}
