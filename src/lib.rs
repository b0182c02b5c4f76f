//! keyfleet: bulk SSH key-pair creation with the exact semantics of the Alibaba Cloud ECS
//! `CreateKeyPair` and UCloud `CreateUHostKeyPair` APIs.
//!
//! The pipeline (`pipeline.rs`) is one code path for every mode; its seams are the
//! [`registry::Registry`] and [`upstream::Upstream`] traits, fed by a job source (`batch.rs`
//! for files) and drained into a result sink (`output.rs` for `keyfleet run`).

pub mod app;
pub mod batch;
pub mod batch_status;
pub mod bench;
pub mod broker;
pub mod collect;
pub mod config;
pub mod cpu;
pub mod dialect;
pub mod fingerprint;
pub mod job;
pub mod keygen;
pub mod metrics;
pub mod output;
pub mod pipeline;
pub mod prime;
pub mod progress;
pub mod rate_limit;
pub mod registry;
pub mod reservoir;
pub mod run;
pub mod shutdown;
pub mod submit;
pub mod upstream;
pub mod worker;
