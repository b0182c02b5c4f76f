//! What keyfleet tells its operators: metrics and their HTTP endpoint, logs, progress.

pub mod logging;
pub mod metrics;
pub mod progress;
