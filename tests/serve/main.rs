//! `keyfleet serve` (each test its own process on a free port), the official SDKs against it,
//! the HTTP upstream with serve as the cloud, and the metrics exposition checked by Prometheus.
//!
//! `metrics` installs the process's global metrics recorder: it lives here because no other test
//! of this binary runs keygen, `run` or the gateway in this process (each talks to a `keyfleet`
//! child), so nothing else records into it or behaves differently with it installed.

#[path = "../util/mod.rs"]
mod util;

mod metrics;
mod rotate;
mod serve;
mod serve_connections;
mod serve_sdk;
mod upstream;
