//! `keyfleet-worker`: the distributed-mode worker (RabbitMQ jobs → keys → Redis registry →
//! results). Not built yet: until it is, this binary says so and exits with status 2 instead of
//! pretending to work.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "keyfleet-worker {}: distributed mode is not available in this build yet; \
use `keyfleet run FILE --out DIR` (embedded mode, no servers needed)",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
