//! The registry of key pairs: atomic reserve / commit / release of names under a per-scope
//! quota, and the records that `describe` and `delete` work on.
//!
//! One trait, one implementation per mode: `embedded.rs` (a redb file, for `keyfleet run`)
//! and, in distributed mode, Redis. The rules of a reservation are in [`Entry`] so every
//! implementation applies the same ones.

pub mod batch_status;
pub mod connection;
pub mod embedded;
pub mod redis;
pub mod rotation;

use std::future::Future;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::dialect::record::{wildcard_match, KeyPairRecord};
use crate::dialect::Scope;

/// What a name in a scope is bound to.
// Decoded once per registry operation and dropped: boxing the record would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum Entry {
    /// Held for `job_id` until `deadline_ms` (Unix milliseconds): a crashed worker's
    /// reservation expires instead of leaking quota.
    Reserved {
        job_id: Uuid,
        deadline_ms: i64,
        /// The public keys (OpenSSH lines) this job has tried to register upstream and not
        /// delivered (noted *before* each cloud call; carried over when the job replaces its
        /// undelivered pair). A key the cloud holds under this name that is in this list is
        /// keyfleet's own, whose private half is lost: it may be replaced there.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tried_keys: Vec<String>,
    },
    Pair(KeyPairRecord),
}

impl Entry {
    /// The keys a reservation that replaces or resumes this entry for `job_id` inherits.
    pub fn tried_keys_for(&self, job_id: Uuid) -> Vec<String> {
        match self {
            Entry::Reserved {
                job_id: j,
                tried_keys,
                ..
            } if *j == job_id => tried_keys.clone(),
            Entry::Pair(r) if r.job_id == job_id && !r.delivered => {
                let mut keys = r.earlier_keys.clone();
                if !keys.contains(&r.public_key) {
                    keys.push(r.public_key.clone());
                }
                keys
            }
            _ => Vec::new(),
        }
    }
}

/// How a successful reserve came about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reserved {
    /// A new slot was counted against the quota.
    Fresh,
    /// The job already held this name (a redelivery): nothing counted twice.
    Resumed,
    /// An expired reservation of another job was taken over (its slot reused).
    TookOver,
    /// The job's own undelivered key pair is being replaced (its slot reused).
    Replacing,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("the key pair quota of this region is used up")]
    QuotaExceeded,
    #[error("a key pair with this name already exists")]
    AlreadyExists,
    /// The name holds this very job's key pair, already delivered: the job was answered
    /// before (it came back after its answer went out).
    #[error("this job's key pair was delivered already")]
    AlreadyDelivered,
    /// The reservation this job relied on is gone (expired and taken by another job).
    #[error("the reservation for this key pair was lost")]
    ReservationLost,
    /// The store itself failed: worth retrying.
    #[error("registry storage error: {0}")]
    Storage(String),
    /// A write landed on the Redis master, but fewer of its replicas than `--redis-replicas`
    /// asks for acknowledged it within `waited`: a failover now would lose it. Worth retrying
    /// (every write is safe to repeat); if it lasts, a replica is down, far behind, or missing
    /// (a master with no replica can never satisfy `--redis-replicas` 1).
    #[error(
        "registry storage error: the write reached {acked} of the {wanted} Redis replica(s) \
         --redis-replicas (KEYFLEET_REDIS_REPLICAS) asks for within {} ms; is a replica down, \
         behind, or missing?",
        waited.as_millis()
    )]
    ReplicasBehind {
        acked: u64,
        wanted: u32,
        waited: std::time::Duration,
    },
    /// At start-up: a Redis master has fewer replicas connected than `--redis-replicas` asks
    /// every write to reach, so no write could ever count. Not retried.
    #[error(
        "--redis-replicas {wanted} (KEYFLEET_REDIS_REPLICAS) has every write wait for {wanted} \
         replica(s), but {found}: start the replicas, or lower the setting"
    )]
    TooFewReplicas { wanted: u32, found: String },
    /// The state file is damaged (pages that fail their checksums, or that cannot be read):
    /// not retried, and nothing more is read from it or written to it. A run stops on it
    /// instead of answering rows.
    #[error(
        "state file {} is damaged ({detail}): keyfleet will not use it; restore it from a backup, \
         or move it aside to start a new one (keyfleet then knows none of the key pairs it held)",
        path.display()
    )]
    Corrupt {
        path: std::path::PathBuf,
        detail: String,
    },
}

/// What to do with an existing entry when `job_id` asks for its name. `None` entry means the
/// name is free (the quota check is separate, because it needs the scope's count).
pub fn reserve_decision(entry: Option<&Entry>, job_id: Uuid, now_ms: i64) -> ReserveDecision {
    match entry {
        None => ReserveDecision::NeedsSlot,
        Some(Entry::Reserved { job_id: owner, .. }) if *owner == job_id => {
            ReserveDecision::Reuse(Reserved::Resumed)
        }
        Some(Entry::Reserved { deadline_ms, .. }) if *deadline_ms <= now_ms => {
            ReserveDecision::Reuse(Reserved::TookOver)
        }
        Some(Entry::Pair(r)) if r.job_id == job_id && !r.delivered => {
            ReserveDecision::Reuse(Reserved::Replacing)
        }
        Some(Entry::Pair(r)) if r.job_id == job_id => ReserveDecision::Delivered,
        Some(_) => ReserveDecision::Taken,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReserveDecision {
    NeedsSlot,
    Reuse(Reserved),
    /// The job's own pair, delivered: nothing to reserve, the job was answered.
    Delivered,
    Taken,
}

/// Filters of `describe`, modelled on DescribeKeyPairs.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub provider: Option<crate::dialect::Provider>,
    pub owner: Option<String>,
    pub region: Option<String>,
    /// `*` matches any run of characters.
    pub name: Option<String>,
    /// Matches the dialect fingerprint, the MD5 form or the SHA-256 form.
    pub fingerprint: Option<String>,
}

impl Filter {
    pub fn matches(&self, r: &KeyPairRecord) -> bool {
        self.provider.is_none_or(|p| p == r.scope.provider)
            && self.owner.as_ref().is_none_or(|o| *o == r.scope.owner)
            && self.region.as_ref().is_none_or(|g| *g == r.scope.region)
            && self
                .name
                .as_ref()
                .is_none_or(|n| wildcard_match(n, &r.name))
            && self.fingerprint.as_ref().is_none_or(|f| {
                *f == r.key_pair_fingerprint
                    || *f == r.fingerprint_md5
                    || *f == r.fingerprint_sha256
            })
    }
}

/// What [`Registry::reserve`] asks for: `name` in `scope` for `job_id`, for `ttl_ms`
/// milliseconds, counted against `quota` (the most slots the scope may hold). Named fields,
/// so a call site cannot swap the quota and the TTL.
#[derive(Clone, Copy, Debug)]
pub struct Claim<'a> {
    pub scope: &'a Scope,
    pub name: &'a str,
    pub job_id: Uuid,
    pub quota: u64,
    pub ttl_ms: i64,
}

/// The registry seam. Every method is atomic on its own.
pub trait Registry: Send + Sync + 'static {
    /// Whether a [`Registry::commit`] that reports a failure certainly did not happen. A store
    /// across a network can run a commit and lose its answer (a dropped connection, replicas
    /// that did not confirm in time); the job is then tried again, which replaces its pair
    /// while it is undelivered but not once it is delivered. So only a store whose failed
    /// commits did not happen has pairs committed delivered (`Sink::DELIVERED_AT_COMMIT`).
    const FAILED_COMMIT_IS_CERTAIN: bool;

    /// Binds the claim's name in its scope to its job for its TTL, counting it against its
    /// quota unless the job already holds it.
    fn reserve(
        &self,
        claim: &Claim<'_>,
    ) -> impl Future<Output = Result<Reserved, RegistryError>> + Send;

    /// [`Registry::reserve`] for several claims, decided in the order given (the first of two
    /// claims on one name wins it, and quota goes to the earlier ones); one answer per claim,
    /// in that order. A store that can do it in one round trip does; the default asks one by
    /// one.
    fn reserve_many(
        &self,
        claims: &[Claim<'_>],
    ) -> impl Future<Output = Vec<Result<Reserved, RegistryError>>> + Send {
        async move {
            let mut out = Vec::with_capacity(claims.len());
            for claim in claims {
                out.push(self.reserve(claim).await);
            }
            out
        }
    }

    /// Turns the job's reservation into `record`: undelivered, unless the record says it is
    /// delivered (see [`Registry::FAILED_COMMIT_IS_CERTAIN`]).
    fn commit(
        &self,
        record: &KeyPairRecord,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Marks the job's record delivered: from now on its name answers AlreadyExist.
    fn mark_delivered(
        &self,
        scope: &Scope,
        name: &str,
        job_id: Uuid,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Frees the job's reservation or undelivered record, and its quota slot.
    fn release(
        &self,
        scope: &Scope,
        name: &str,
        job_id: Uuid,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Registered key pairs matching `filter`, in scope and name order.
    fn describe(
        &self,
        filter: &Filter,
    ) -> impl Future<Output = Result<Vec<KeyPairRecord>, RegistryError>> + Send;

    /// Deletes a key pair (or a stale reservation) by name; `true` when something was removed.
    fn delete(
        &self,
        scope: &Scope,
        name: &str,
    ) -> impl Future<Output = Result<bool, RegistryError>> + Send;

    /// What `name` in `scope` is bound to, if anything.
    fn lookup(
        &self,
        scope: &Scope,
        name: &str,
    ) -> impl Future<Output = Result<Option<Entry>, RegistryError>> + Send;

    /// Remembers a request's signature nonce for `ttl_ms`; `false` when it was seen before and
    /// has not expired (a replay). `key` is the caller's access key and the nonce, so every
    /// `serve` sharing this registry refuses a replay sent to any of them.
    fn remember_nonce(
        &self,
        key: &str,
        ttl_ms: i64,
    ) -> impl Future<Output = Result<bool, RegistryError>> + Send;

    /// Notes on the job's reservation that it is about to register `public_key` (an OpenSSH
    /// line) upstream; returns every key the job has tried (this one included). Fails with
    /// `ReservationLost` when the job no longer holds the name.
    fn note_key(
        &self,
        scope: &Scope,
        name: &str,
        job_id: Uuid,
        public_key: &str,
    ) -> impl Future<Output = Result<Vec<String>, RegistryError>> + Send;

    /// Slots counted against the quota of `scope`: records plus reservations, including expired
    /// ones not yet swept (a sweep runs when a reserve finds the scope at its quota).
    fn quota_used(&self, scope: &Scope) -> impl Future<Output = Result<u64, RegistryError>> + Send;

    /// Records `rotation` (replacing an earlier record of the same id), durably before it
    /// answers: a rotation's successors are created only once it is recorded.
    fn save_rotation(
        &self,
        rotation: &rotation::Rotation,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// The rotation recorded under `id`, if any.
    fn rotation(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<rotation::Rotation>, RegistryError>> + Send;

    /// Every recorded rotation, by id.
    fn rotations(
        &self,
    ) -> impl Future<Output = Result<Vec<rotation::Rotation>, RegistryError>> + Send;

    /// Makes every change so far durable. The embedded store leaves the sync of some writes to
    /// the next synced one (see `embedded.rs`); a run ends with this. Redis: nothing to do.
    fn flush(&self) -> impl Future<Output = Result<(), RegistryError>> + Send {
        async { Ok(()) }
    }

    /// The damage this store found in itself ([`RegistryError::Corrupt`]), once it has: every
    /// call fails from then on, and a run stops rather than answer its rows with it.
    fn damage(&self) -> Option<RegistryError> {
        None
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_decisions() {
        let me = Uuid::new_v4();
        let other = Uuid::new_v4();
        assert_eq!(reserve_decision(None, me, 10), ReserveDecision::NeedsSlot);
        let live = Entry::Reserved {
            job_id: other,
            deadline_ms: 100,
            tried_keys: vec![],
        };
        assert_eq!(
            reserve_decision(Some(&live), me, 10),
            ReserveDecision::Taken
        );
        assert_eq!(
            reserve_decision(Some(&live), me, 100),
            ReserveDecision::Reuse(Reserved::TookOver)
        );
        let mine = Entry::Reserved {
            job_id: me,
            deadline_ms: 100,
            tried_keys: vec![],
        };
        assert_eq!(
            reserve_decision(Some(&mine), me, 1_000),
            ReserveDecision::Reuse(Reserved::Resumed)
        );
    }
}
