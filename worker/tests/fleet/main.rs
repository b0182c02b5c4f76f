//! Distributed mode end to end: workers as processes on the RabbitMQ and Redis scripts/test.sh
//! runs (a fresh prefix per test), submit and collect, key delivery and private keys, the
//! upstream, and Prometheus scraping a worker.
//!
//! `restarts.rs` (restarts the shared Redis and RabbitMQ) and `redis_failover.rs` (six
//! `redis-server`s of its own, timing-sensitive failover) stay binaries of their own: nothing
//! else runs while they do.

#[path = "../util/mod.rs"]
mod util;

/// The test cloud's keys and contents, and a rotation's end check: shared with the
/// `keyfleet` crate's tests.
#[path = "../../../tests/util/cloud.rs"]
mod cloud;

mod collect;
mod delivery;
mod distributed;
mod private_keys;
mod prometheus;
mod rotate;
mod upstream;
