//! The registry in Redis, for distributed mode: many workers on many machines share one quota
//! and one namespace per scope, with the exact semantics of [`super::embedded`].
//!
//! Key layout (`<prefix>` is `keyfleet` unless configured; `<scope>` is [`Scope::key`]):
//! - `<prefix>:{<scope>}:pairs` — hash: name → [`Entry`] JSON (the same serde JSON as the
//!   embedded store; public halves only, private keys are never written to Redis);
//! - `<prefix>:{<scope>}:used` — string: slots counted against the scope's quota;
//! - `<prefix>:{<scope>}:deadlines` — sorted set: name → reservation deadline (ms), so a
//!   reservation at a full scope finds the expired ones in O(log n) (`reserve.lua`); it may
//!   hold names that are no longer reservations, which are checked and dropped when met;
//! - `<prefix>:{<scope>}:indexed` — set once the deadline index covers every reservation of a
//!   scope written before the index existed;
//! - `<prefix>:scopes` — set of scope keys, an index for `describe` only;
//! - `<prefix>:nonce:<hash>` — a signature nonce `keyfleet serve` has seen, expiring by itself;
//! - `<prefix>:rotation:<id>` — string: a rotation ([`Rotation`] JSON: names, fingerprints and
//!   job ids, no key), and `<prefix>:rotations` — set of rotation ids, for `rotate`'s selection
//!   and `reconcile`. Written with the `--redis-replicas` wait like the scopes' entries.
//!
//! Every key of a scope carries the scope as its hash tag, so each operation's script touches
//! one cluster slot and works on Redis Cluster. Reserve, commit, mark_delivered, release and
//! delete are one Lua script each (`*.lua` beside this file, run with EVALSHA; redis-rs loads a
//! script again when the server answers NOSCRIPT, e.g. after a restart). Key names are built
//! here and passed as KEYS, never inside Lua.
//!
//! Every script that changes a scope runs through [`RedisConn::run_script`], which waits for
//! `--redis-replicas` replicas after it; a reservation, a record, its delivery mark are then on
//! a replica before the worker acts on them. Not waited for: the `scopes` index (a `describe`
//! aid, written again by every reserve) and serve's nonces (a replay window, not a key).
//!
//! Reservation deadlines are read against the Redis server's clock (`TIME` inside the script),
//! not the caller's: workers whose clocks disagree still agree on when a reservation expired.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use crate::registry::connection::{RedisConn, ScriptCall};
use redis::Script;
use sha2::Digest;
use uuid::Uuid;

use super::rotation::Rotation;
use super::{Claim, Entry, Filter, Registry, RegistryError, Reserved};
use crate::dialect::record::KeyPairRecord;
use crate::dialect::Scope;
use crate::registry::connection::{check_prefix, connect, storage};

/// The key prefix the binaries use unless told otherwise.
pub const DEFAULT_PREFIX: &str = "keyfleet";

/// Bounds a reservation TTL so `now + ttl` stays an exact integer in Lua (doubles are exact up to
/// 2^53; 2^50 ms is about 35,000 years).
const MAX_TTL_MS: i64 = 1 << 50;

/// The scripts, hashed once per process.
struct Scripts {
    reserve: Script,
    note_key: Script,
    commit: Script,
    mark_delivered: Script,
    release: Script,
    delete: Script,
}

/// A script that acts on one job's entry: `entry.lua` (its `job_entry`) joined in front.
macro_rules! job_entry_script {
    ($file:literal) => {
        Script::new(concat!(include_str!("entry.lua"), include_str!($file)))
    };
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    reserve: Script::new(include_str!("reserve.lua")),
    note_key: job_entry_script!("note_key.lua"),
    commit: job_entry_script!("commit.lua"),
    mark_delivered: job_entry_script!("mark_delivered.lua"),
    release: job_entry_script!("release.lua"),
    delete: Script::new(include_str!("delete.lua")),
});

/// The Redis keys of one scope; all of them hash to the same cluster slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopeKeys {
    /// Hash: name → [`Entry`] JSON.
    pub pairs: String,
    /// Slots counted against the quota.
    pub used: String,
    /// Sorted set: name → reservation deadline (ms).
    pub deadlines: String,
    /// Set once `deadlines` covers every reservation (scopes older than the index).
    pub indexed: String,
}

#[derive(Clone)]
pub struct RedisRegistry {
    conn: RedisConn,
    prefix: Arc<str>,
}

impl std::fmt::Debug for RedisRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRegistry")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisRegistry {
    /// Connects with a bounded wait (`timeout`); the error names the URL (without password) and
    /// says what failed. Reconnects by itself later (ConnectionManager), so a Redis restart does
    /// not kill callers: operations during the outage fail with [`RegistryError::Storage`] and
    /// succeed again afterwards.
    pub async fn connect(
        url: &str,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, RegistryError> {
        check_prefix(prefix)?;
        let conn = connect(url, timeout).await?;
        Ok(Self::from_connection(conn, prefix))
    }

    /// A registry over an existing connection (e.g. one shared with
    /// [`crate::registry::batch_status::BatchStatusStore`]). The prefix is used as given.
    pub fn from_connection(conn: RedisConn, prefix: &str) -> Self {
        RedisRegistry {
            conn,
            prefix: prefix.into(),
        }
    }

    /// The same registry, each write waiting for `replicas` Redis replicas
    /// (`--redis-replicas`; see [`RedisConn::write`]). Stores built on its
    /// [`RedisRegistry::connection`] afterwards wait for as many.
    pub fn with_replicas(mut self, replicas: u32) -> Self {
        self.conn = self.conn.with_replicas(replicas);
        self
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The connection, to share with other Redis users of the same process.
    /// See [`RedisConn::check_replicas`].
    pub async fn check_replicas(&self, within: Duration) -> Result<(), RegistryError> {
        self.conn.check_replicas(within).await
    }

    pub fn connection(&self) -> RedisConn {
        self.conn.clone()
    }

    /// PING, for readiness probes.
    pub async fn ping(&self) -> Result<(), RegistryError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(drop)
            .map_err(storage)
    }

    /// The keys the scripts of `scope` work on.
    pub fn scope_keys(&self, scope: &Scope) -> ScopeKeys {
        self.keys_of(&scope.key())
    }

    /// The set indexing every scope ever reserved in, for `describe`.
    pub fn scopes_key(&self) -> String {
        format!("{}:scopes", self.prefix)
    }

    /// The key a rotation is kept under.
    pub fn rotation_key(&self, id: &str) -> String {
        format!("{}:rotation:{id}", self.prefix)
    }

    /// The set of every rotation id.
    pub fn rotations_key(&self) -> String {
        format!("{}:rotations", self.prefix)
    }

    fn keys_of(&self, scope_key: &str) -> ScopeKeys {
        ScopeKeys {
            pairs: format!("{}:{{{scope_key}}}:pairs", self.prefix),
            used: format!("{}:{{{scope_key}}}:used", self.prefix),
            deadlines: format!("{}:{{{scope_key}}}:deadlines", self.prefix),
            indexed: format!("{}:{{{scope_key}}}:indexed", self.prefix),
        }
    }

    /// Adds the scope to the index before every reservation, so every scope that holds entries
    /// is listed. Lives outside the scripts because the index is in another slot. Not cached in
    /// the process: a Redis that lost its data (restart without persistence) must be indexed
    /// again, and a SADD of a known member is cheap and not even replicated. An emptied scope
    /// stays listed: pruning it could race with a worker that is just reserving in it.
    async fn index_scope(&self, scope_key: &str) -> Result<(), RegistryError> {
        let mut conn = self.conn.clone();
        redis::cmd("SADD")
            .arg(self.scopes_key())
            .arg(scope_key)
            .query_async::<i64>(&mut conn)
            .await
            .map(drop)
            .map_err(storage)
    }
}

/// The reserve script's call for `claim` in the scope whose keys are `keys`.
fn reserve_call<'a>(keys: &ScopeKeys, claim: &Claim<'_>) -> ScriptCall<'a> {
    let mut call = ScriptCall::new(&SCRIPTS.reserve);
    call.key(&keys.pairs)
        .key(&keys.used)
        .key(&keys.deadlines)
        .key(&keys.indexed)
        .arg(claim.name)
        .arg(claim.job_id.hyphenated().to_string())
        .arg(claim.quota)
        .arg(claim.ttl_ms.clamp(-MAX_TTL_MS, MAX_TTL_MS));
    call
}

/// What the reserve script's answer means.
fn reserved(reply: &str) -> Result<Reserved, RegistryError> {
    match reply {
        "fresh" => Ok(Reserved::Fresh),
        "resumed" => Ok(Reserved::Resumed),
        "tookover" => Ok(Reserved::TookOver),
        "replacing" => Ok(Reserved::Replacing),
        "exists" => Err(RegistryError::AlreadyExists),
        "delivered" => Err(RegistryError::AlreadyDelivered),
        "quota" => Err(RegistryError::QuotaExceeded),
        other => Err(unexpected("reserve", other)),
    }
}

fn decode_rotation(id: &str, raw: &str) -> Result<Rotation, RegistryError> {
    serde_json::from_str(raw)
        .map_err(|e| RegistryError::Storage(format!("rotation {id:?} is not valid: {e}")))
}

fn decode_entry(name: &str, raw: &str) -> Result<Entry, RegistryError> {
    serde_json::from_str(raw)
        .map_err(|e| RegistryError::Storage(format!("registry entry {name:?} is not valid: {e}")))
}

fn unexpected(script: &str, reply: &str) -> RegistryError {
    RegistryError::Storage(format!(
        "unexpected reply {reply:?} from the {script} script"
    ))
}

impl RedisRegistry {
    /// Runs one of the scripts that act on a job's entry (those joined to `entry.lua`): KEYS
    /// the scope's pairs hash; ARGV the name, the job id, then `extra`. The script's "lost" is
    /// [`RegistryError::ReservationLost`]; any other reply is returned.
    async fn on_job_entry(
        &self,
        script: &Script,
        scope: &Scope,
        name: &str,
        job_id: Uuid,
        extra: Option<&str>,
    ) -> Result<String, RegistryError> {
        let keys = self.scope_keys(scope);
        let mut call = ScriptCall::new(script);
        call.key(&keys.pairs).key(&keys.deadlines);
        call.arg(name).arg(job_id.hyphenated().to_string());
        if let Some(extra) = extra {
            call.arg(extra);
        }
        let reply: String = self.conn.run_script(&call).await?;
        if reply == "lost" {
            return Err(RegistryError::ReservationLost);
        }
        Ok(reply)
    }
}

impl Registry for RedisRegistry {
    // A commit can run and its answer be lost (a dropped connection, a WAIT that came back
    // short): the job's next try replaces the undelivered pair.
    const FAILED_COMMIT_IS_CERTAIN: bool = false;

    async fn note_key(
        &self,
        scope: &Scope,
        name: &str,
        job_id: Uuid,
        public_key: &str,
    ) -> Result<Vec<String>, RegistryError> {
        let script = &SCRIPTS.note_key;
        let reply = self
            .on_job_entry(script, scope, name, job_id, Some(public_key))
            .await?;
        serde_json::from_str(&reply).map_err(|_| unexpected("note_key", &reply))
    }

    async fn remember_nonce(&self, key: &str, ttl_ms: i64) -> Result<bool, RegistryError> {
        let mut conn = self.conn.clone();
        // Hashed so caller text never forms a key (and never carries a hash tag).
        let digest = hex::encode(&sha2::Sha256::digest(key.as_bytes())[..16]);
        let set: Option<String> = redis::cmd("SET")
            .arg(format!("{}:nonce:{digest}", self.prefix))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms.max(1))
            .query_async(&mut conn)
            .await
            .map_err(storage)?;
        Ok(set.is_some())
    }

    async fn reserve(&self, claim: &Claim<'_>) -> Result<Reserved, RegistryError> {
        self.reserve_many(std::slice::from_ref(claim))
            .await
            .pop()
            .unwrap_or_else(|| Err(RegistryError::Storage("redis: no reservation".into())))
    }

    /// The claims of each scope in one round trip: its index entry, then one pipeline of its
    /// reserve scripts in the order given (one slot, so one node of a cluster), with one `WAIT`
    /// after them. Scopes are independent of each other (names and quota are per scope), so
    /// only the order within a scope matters, and the scopes go out side by side. A pipeline
    /// that fails answers each of its claims with that error; the lifecycle tries a transient
    /// one again, claim by claim.
    async fn reserve_many(&self, claims: &[Claim<'_>]) -> Vec<Result<Reserved, RegistryError>> {
        let mut scopes: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, claim) in claims.iter().enumerate() {
            let key = claim.scope.key();
            match scopes.iter_mut().find(|(k, _)| *k == key) {
                Some((_, members)) => members.push(i),
                None => scopes.push((key, vec![i])),
            }
        }
        let decided = futures::future::join_all(scopes.iter().map(|(scope_key, members)| async {
            self.index_scope(scope_key).await?;
            let keys = self.keys_of(scope_key);
            let calls: Vec<ScriptCall<'_>> = members
                .iter()
                .map(|&i| reserve_call(&keys, &claims[i]))
                .collect();
            self.conn.run_scripts(&calls).await
        }))
        .await;
        let mut answers: Vec<Option<Result<Reserved, RegistryError>>> =
            claims.iter().map(|_| None).collect();
        for ((_, members), replies) in scopes.iter().zip(decided) {
            match replies {
                Ok(replies) => {
                    for (&i, reply) in members.iter().zip(replies) {
                        answers[i] = Some(
                            redis::from_redis_value::<String>(reply)
                                .map_err(|e| {
                                    RegistryError::Storage(format!(
                                        "redis: unexpected reply to reserve: {e}"
                                    ))
                                })
                                .and_then(|r| reserved(&r)),
                        );
                    }
                }
                Err(e) => {
                    for &i in members {
                        answers[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        answers
            .into_iter()
            .map(|a| {
                a.unwrap_or_else(|| {
                    Err(RegistryError::Storage(
                        "redis: a reservation was not answered".into(),
                    ))
                })
            })
            .collect()
    }

    async fn commit(&self, record: &KeyPairRecord) -> Result<(), RegistryError> {
        let json = serde_json::to_string(&Entry::Pair(record.clone()))
            .map_err(|e| RegistryError::Storage(format!("cannot encode the record: {e}")))?;
        // The record type has no room for a private key; this guards against one pasted into a
        // text field, since whatever is sent here lands in Redis and its backups.
        if json.contains("PRIVATE KEY") {
            return Err(RegistryError::Storage(
                "refusing to store a record that contains private key material".to_owned(),
            ));
        }
        let (scope, name) = (&record.scope, &record.name);
        let reply = self
            .on_job_entry(&SCRIPTS.commit, scope, name, record.job_id, Some(&json))
            .await?;
        match reply.as_str() {
            "ok" => Ok(()),
            other => Err(unexpected("commit", other)),
        }
    }

    async fn mark_delivered(
        &self,
        scope: &Scope,
        name: &str,
        job_id: Uuid,
    ) -> Result<(), RegistryError> {
        let script = &SCRIPTS.mark_delivered;
        let reply = self.on_job_entry(script, scope, name, job_id, None).await?;
        match reply.as_str() {
            "ok" => Ok(()),
            other => Err(unexpected("mark_delivered", other)),
        }
    }

    async fn release(&self, scope: &Scope, name: &str, job_id: Uuid) -> Result<(), RegistryError> {
        let keys = self.scope_keys(scope);
        let mut call = ScriptCall::new(&SCRIPTS.release);
        call.key(&keys.pairs)
            .key(&keys.used)
            .key(&keys.deadlines)
            .arg(name)
            .arg(job_id.hyphenated().to_string());
        self.conn.run_script::<i64>(&call).await.map(drop)
    }

    async fn describe(&self, filter: &Filter) -> Result<Vec<KeyPairRecord>, RegistryError> {
        let mut conn = self.conn.clone();
        let scope_keys: Vec<String> = match (filter.provider, &filter.owner, &filter.region) {
            // One scope named in full: read it directly, indexed or not.
            (Some(provider), Some(owner), Some(region)) => vec![Scope {
                provider,
                owner: owner.clone(),
                region: region.clone(),
            }
            .key()],
            _ => redis::cmd("SMEMBERS")
                .arg(self.scopes_key())
                .query_async(&mut conn)
                .await
                .map_err(storage)?,
        };
        let mut found = Vec::new();
        for scope_key in scope_keys {
            let entries: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(self.keys_of(&scope_key).pairs)
                .query_async(&mut conn)
                .await
                .map_err(storage)?;
            for (name, raw) in entries {
                if let Entry::Pair(r) = decode_entry(&name, &raw)? {
                    if filter.matches(&r) {
                        // The embedded store's order: its table key, scope key + '\n' + name.
                        found.push((format!("{scope_key}\n{name}"), r));
                    }
                }
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found.into_iter().map(|(_, r)| r).collect())
    }

    async fn delete(&self, scope: &Scope, name: &str) -> Result<bool, RegistryError> {
        let keys = self.scope_keys(scope);
        let mut call = ScriptCall::new(&SCRIPTS.delete);
        call.key(&keys.pairs)
            .key(&keys.used)
            .key(&keys.deadlines)
            .arg(name);
        let removed: i64 = self.conn.run_script(&call).await?;
        Ok(removed == 1)
    }

    async fn lookup(&self, scope: &Scope, name: &str) -> Result<Option<Entry>, RegistryError> {
        let keys = self.scope_keys(scope);
        let mut conn = self.conn.clone();
        let raw: Option<String> = redis::cmd("HGET")
            .arg(&keys.pairs)
            .arg(name)
            .query_async(&mut conn)
            .await
            .map_err(storage)?;
        raw.map(|raw| decode_entry(name, &raw)).transpose()
    }

    async fn save_rotation(&self, rotation: &Rotation) -> Result<(), RegistryError> {
        let json = serde_json::to_string(rotation).map_err(|e| {
            RegistryError::Storage(format!("encoding rotation {}: {e}", rotation.id))
        })?;
        // The record first, then the index: a rotation listed is always readable.
        let mut set = redis::cmd("SET");
        set.arg(self.rotation_key(&rotation.id)).arg(json);
        self.conn.write::<()>(&set, None).await?;
        let mut index = redis::cmd("SADD");
        index.arg(self.rotations_key()).arg(&rotation.id);
        self.conn.write::<i64>(&index, None).await.map(drop)
    }

    async fn rotation(&self, id: &str) -> Result<Option<Rotation>, RegistryError> {
        let mut conn = self.conn.clone();
        let raw: Option<String> = redis::cmd("GET")
            .arg(self.rotation_key(id))
            .query_async(&mut conn)
            .await
            .map_err(storage)?;
        raw.map(|raw| decode_rotation(id, &raw)).transpose()
    }

    async fn rotations(&self) -> Result<Vec<Rotation>, RegistryError> {
        let mut conn = self.conn.clone();
        let mut ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.rotations_key())
            .query_async(&mut conn)
            .await
            .map_err(storage)?;
        ids.sort();
        let mut out = Vec::with_capacity(ids.len());
        // One GET each: on a Cluster the records live in different slots.
        for id in ids {
            if let Some(r) = self.rotation(&id).await? {
                out.push(r);
            }
        }
        Ok(out)
    }

    async fn quota_used(&self, scope: &Scope) -> Result<u64, RegistryError> {
        let keys = self.scope_keys(scope);
        let mut conn = self.conn.clone();
        let used: Option<u64> = redis::cmd("GET")
            .arg(&keys.used)
            .query_async(&mut conn)
            .await
            .map_err(storage)?;
        Ok(used.unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_must_not_carry_a_hash_tag() {
        assert!(check_prefix("keyfleet").is_ok());
        assert!(check_prefix("kf{x}").is_err());
    }

    #[test]
    fn scripts_pass_keys_in_keys() {
        for src in [
            include_str!("entry.lua"),
            include_str!("reserve.lua"),
            include_str!("note_key.lua"),
            include_str!("commit.lua"),
            include_str!("mark_delivered.lua"),
            include_str!("release.lua"),
            include_str!("delete.lua"),
            include_str!("batch_record.lua"),
            include_str!("batch_set_total.lua"),
            include_str!("../upstream/fleet_rate.lua"),
        ] {
            for call in src.split("redis.call(").skip(1) {
                let args: Vec<&str> = call.splitn(3, ',').map(str::trim).collect();
                if args[0].starts_with("'TIME'") {
                    continue;
                }
                assert!(
                    args.get(1).is_some_and(|k| k.starts_with("KEYS[")),
                    "redis.call({call:.40}…) names a key that is not from KEYS"
                );
            }
        }
    }
}
