//! keyfleet: bulk SSH key-pair creation with the exact semantics of the Alibaba Cloud ECS
//! `CreateKeyPair` and UCloud `CreateUHostKeyPair` APIs.
//!
//! # Layout
//!
//! Every job, in every mode, goes through one lifecycle (`lifecycle.rs`): decode → reserve →
//! key → upstream → commit → deliver → confirm. A mode is a thin loop around it.
//!
//! - Modes: `run.rs` (a batch file, embedded store), `worker.rs` (jobs from RabbitMQ, Redis),
//!   `serve/` (the clouds' key-pair APIs over HTTP, for their official SDKs),
//!   `submit.rs` (the producer), `collect.rs` (results into a folder), `bench.rs`; `app.rs` turns
//!   the command line into one of these, `config.rs` holds its flags and the config file.
//! - The lifecycle and its parts: `lifecycle.rs`, `retry.rs` (the one retry policy),
//!   `settings.rs` (catalogue, quota, engine), `sink/` (where results go: `key_files.rs`,
//!   `results_queue.rs`), `upstream.rs` and `rate_limit.rs` (the cloud side).
//! - Private keys in transit: `transit.rs` (age encryption to a batch's recipient).
//! - What a job is: `job.rs` (jobs, results, their wire form), `batch.rs` (rows of a batch
//!   file), `dialect/` (everything provider-specific: `aliyun.rs`, `ucloud.rs`).
//! - State: `registry/` (names, quota and records: `embedded.rs` on redb, `redis.rs` with its Lua
//!   beside it), `batch_status.rs` (a batch's progress in Redis).
//! - Infrastructure: `credentials.rs` (cloud access keys: what `serve` accepts and the upstream
//!   signs with), `endpoints.rs` (where the servers are), `broker.rs` (RabbitMQ),
//!   `redis_connection.rs`, `escape.rs` (caller text in keys and paths), `cpu.rs` (the rayon
//!   pool, the one way CPU work leaves the async runtime), `shutdown.rs`, `logging.rs`,
//!   `hardening.rs` (no core dumps), `metrics.rs` (every metric; `metrics/http.rs` serves them).
//! - Keys: `keygen.rs`, `prime/` (the prime search; `prime/lanes/` its AVX-512 IFMA lanes, the
//!   only `unsafe` in `prime/lanes/dispatch.rs`), `rsa_ct.rs` (constant-time key assembly and
//!   encoding), `reservoir.rs` (keys made ahead), `fingerprint.rs`.
//! - Output: `output.rs` (the folder and its manifest), `progress.rs`.
//! - Request signatures, pure functions: `sign/` (Alibaba `rpc.rs` and `acs3.rs`, `ucloud.rs`).

pub mod cli;
pub mod credentials;
pub mod dialect;
pub mod escape;
pub mod hardening;
pub mod job;
pub mod keys;
pub mod lifecycle;
pub mod modes;
pub mod prime;
pub mod queue;
pub mod registry;
pub mod retry;
pub mod settings;
pub mod shutdown;
pub mod sign;
pub mod sink;
pub mod telemetry;
pub mod upstream;
