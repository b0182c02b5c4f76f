//! keyfleet: bulk SSH key-pair creation with the exact semantics of the Alibaba Cloud ECS
//! `CreateKeyPair` and UCloud `CreateUHostKeyPair` APIs.
//!
//! # Layout
//!
//! Every job, in every mode, goes through one lifecycle (`lifecycle.rs`): decode → reserve →
//! key → upstream → commit → deliver → confirm. A mode is a thin loop around it. The wings,
//! from the door down; a file imports only from its own wing or the ones below it:
//!
//! - `cli/`: the door. The flags (`config.rs`, the parsed layer), the config file and the one
//!   merge of flags, environment, file and defaults (`resolve.rs`, the resolved layer), one
//!   function per command and the exit codes (`app.rs`), the library's enums as clap values
//!   (`values.rs`), completions and man pages (`generate.rs`). The only place that knows clap;
//!   everything below takes plain settings.
//! - `modes/`: `run.rs` (a batch file, embedded store), `worker.rs` (jobs from RabbitMQ, Redis),
//!   `serve/` (the clouds' key-pair APIs over HTTP, for their official SDKs), `submit.rs` (the
//!   producer), `collect.rs` (results into a folder), `rotate/` (a fleet's pairs replaced:
//!   successors through `run`'s pass, or with `fleet.rs` through the workers and `collect`;
//!   the replaced pairs retired through `delete.rs`); and
//!   around them `describe.rs`, `delete.rs`, `reconcile.rs` (registry against cloud),
//!   `status.rs`, `bench/`.
//! - The centre: `lifecycle.rs`, `retry.rs` (the one retry policy), `settings.rs` (catalogue,
//!   quota, engine), `quota_gauge.rs` (the quota gauge read again off the jobs' path),
//!   `reservoir.rs` (keys made ahead on idle key threads), `job/` (jobs and results and their
//!   wire form; `batch.rs`, rows of a batch file; `packer.rs`, rows made into job messages on
//!   the reader's thread for `submit`).
//! - `upstream/`: the cloud side — the seam (`mod.rs`), its settings, the signing HTTP client
//!   (`client.rs`), the importing upstream (`http.rs`), the per-scope rate limit.
//! - `sink/`: where results go — key files and the output folder (`key_files.rs`, `folder.rs`),
//!   the results queue, keys sealed in transit (`transit.rs`), file safety (`files.rs`).
//! - `queue/`: RabbitMQ (`broker.rs`) and where the servers are (`endpoints.rs`).
//! - `registry/`: names, quota and records — `embedded.rs` on redb, `redis.rs` with its Lua
//!   beside it, the Redis connection, a batch's progress (`batch_status.rs`), a rotation's
//!   record (`rotation.rs`).
//! - `telemetry/`: every metric (`metrics.rs`; `metrics/http.rs` serves them), logging,
//!   progress.
//! - `dialect/`: everything provider-specific (`aliyun.rs`, `ucloud.rs`, the other actions in
//!   `action.rs`, the registered pair in `record.rs`).
//! - `keys/`: making keys — `keygen.rs`, `fingerprint.rs` (fingerprints and the OpenSSH public
//!   key), `cpu.rs` (the rayon pool, the one way CPU work leaves the async runtime). It reports
//!   to no metric itself (the reservoir and the lifecycle do), so it stands below the wings that
//!   name a key's size or fingerprint: `telemetry/`, `job/`, `dialect/`.
//! - `prime/`: the arithmetic — the prime search (`prime/lanes/` its AVX-512 IFMA lanes, the
//!   only `unsafe` in `prime/lanes/dispatch.rs`), constant-time key assembly (`rsa_ct.rs`,
//!   `inverse.rs`).
//! - Ground floor, pure helpers: `sign/` (request signatures: Alibaba `rpc.rs` and `acs3.rs`,
//!   `ucloud.rs`), `credentials.rs` (cloud access keys), `escape.rs` (URLs without passwords,
//!   caller text in keys and paths), `group.rs` (group commit: one sync for many writes),
//!   `time.rs`, `shutdown.rs`, `hardening.rs` (no core dumps), `scheduling.rs` (batch modes'
//!   threads under `SCHED_BATCH`).

pub mod cli;
pub mod credentials;
pub mod dialect;
pub mod escape;
pub mod group;
pub mod hardening;
pub mod job;
pub mod keys;
pub mod lifecycle;
pub mod modes;
pub mod prime;
pub mod queue;
pub mod quota_gauge;
pub mod registry;
pub mod reservoir;
pub mod retry;
pub mod scheduling;
pub mod settings;
pub mod shutdown;
pub mod sign;
pub mod sink;
pub mod telemetry;
pub mod time;
pub mod upstream;
