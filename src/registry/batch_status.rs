//! Progress counters of a batch in Redis, for `keyfleet status`: how many jobs the batch has,
//! how many were answered, created, or failed per error code. Each job counts exactly once,
//! however often it is redelivered and answered again.
//!
//! Keys (`<batch>` is the batch id with `%`, `{`, `}` percent-encoded, so it is always one
//! whole hash tag and both keys of a batch share a cluster slot):
//! - `<prefix>:batch:{<batch>}:counts` — hash: `total`, `answered`, `created`, `failed:<code>`;
//! - `<prefix>:batch:{<batch>}:jobs` — hash: job id → outcome (what makes counting idempotent).
//!
//! Its writes (a job's outcome, the total, the recipient, where the batch was collected) wait
//! for `--redis-replicas` replicas ([`RedisConn::write`]): a failover must not lose the total
//! or an outcome `collect` relies on.
//!
//! Both expire after [`DEFAULT_BATCH_TTL`] (or the store's TTL) without activity, so abandoned
//! batches clean up; `record` and `set_total` refresh it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use crate::registry::connection::{RedisConn, ScriptCall};
use redis::Script;
use uuid::Uuid;

use crate::registry::connection::storage;
use crate::registry::redis::RedisRegistry;
use crate::registry::RegistryError;

/// How long a batch's counters live after its last activity: a week, long enough to ask about a
/// batch after a weekend, short enough that old batches do not pile up.
pub const DEFAULT_BATCH_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// The outcome [`BatchStatusStore::record`] counts as a created key pair; anything else is an
/// error code.
pub const CREATED: &str = crate::job::CREATED;

static RECORD: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("batch_record.lua")));
static SET_TOTAL: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("batch_set_total.lua")));

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BatchStatus {
    pub batch_id: String,
    /// Jobs in the batch; `None` until the producer has read its whole input.
    pub total: Option<u64>,
    /// Jobs with a result (created or failed).
    pub answered: u64,
    pub created: u64,
    /// Failed jobs per error code.
    pub failed: BTreeMap<String, u64>,
}

impl BatchStatus {
    /// Jobs still without a result, once the total is known.
    pub fn pending(&self) -> Option<u64> {
        self.total.map(|t| t.saturating_sub(self.answered))
    }
}

/// The Redis keys of one batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchKeys {
    pub counts: String,
    pub jobs: String,
    /// String: the age recipient the batch's private keys are encrypted to (`transit.rs`).
    pub recipient: String,
    /// String (JSON [`Collected`]): where `collect` wrote the whole batch.
    pub collected: String,
}

/// Where a batch was completely collected, so a `collect` elsewhere can say where its keys are
/// (each private key is delivered once) instead of waiting for results that will not come.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Collected {
    /// The output folder, absolute.
    pub dir: String,
    pub results: u64,
    /// RFC 3339.
    pub at: String,
}

#[derive(Clone)]
pub struct BatchStatusStore {
    conn: RedisConn,
    prefix: Arc<str>,
    ttl: Duration,
}

impl std::fmt::Debug for BatchStatusStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchStatusStore")
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn escape_batch_id(batch_id: &str) -> String {
    crate::escape::escape_chars(batch_id, |_, c| matches!(c, '%' | '{' | '}'))
}

impl BatchStatusStore {
    /// Connects the way [`RedisRegistry::connect`] does, sharing nothing else with it.
    pub async fn connect(
        url: &str,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, RegistryError> {
        let redis = RedisRegistry::connect(url, prefix, timeout).await?;
        Ok(Self::from_connection(redis.connection(), prefix))
    }

    /// A store over an existing connection (e.g. [`crate::registry::redis::RedisRegistry::connection`]).
    pub fn from_connection(conn: RedisConn, prefix: &str) -> Self {
        BatchStatusStore {
            conn,
            prefix: prefix.into(),
            ttl: DEFAULT_BATCH_TTL,
        }
    }

    /// The same store, each write waiting for `replicas` Redis replicas (`--redis-replicas`;
    /// see [`RedisConn::write`]).
    pub fn with_replicas(mut self, replicas: u32) -> Self {
        self.conn = self.conn.with_replicas(replicas);
        self
    }

    /// See [`RedisConn::check_replicas`].
    pub async fn check_replicas(&self, within: Duration) -> Result<(), RegistryError> {
        self.conn.check_replicas(within).await
    }

    /// The same store with another inactivity TTL for the batch keys it writes.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The keys of `batch_id`. An empty batch id has no keys: its hash tag would be `{}`, which
    /// Redis Cluster ignores, splitting the two keys across slots.
    pub fn batch_keys(&self, batch_id: &str) -> Result<BatchKeys, RegistryError> {
        if batch_id.is_empty() {
            return Err(RegistryError::Storage(
                "a batch id must not be empty".to_owned(),
            ));
        }
        let tag = escape_batch_id(batch_id);
        Ok(BatchKeys {
            counts: format!("{}:batch:{{{tag}}}:counts", self.prefix),
            jobs: format!("{}:batch:{{{tag}}}:jobs", self.prefix),
            recipient: format!("{}:batch:{{{tag}}}:recipient", self.prefix),
            collected: format!("{}:batch:{{{tag}}}:collected", self.prefix),
        })
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Sets the batch's total (the producer calls it once it knows how many rows it read).
    pub async fn set_total(&self, batch_id: &str, total: u64) -> Result<(), RegistryError> {
        let keys = self.batch_keys(batch_id)?;
        let mut call = ScriptCall::new(&SET_TOTAL);
        call.key(&keys.counts)
            .key(&keys.jobs)
            .key(&keys.recipient)
            .arg(total)
            .arg(self.ttl_ms());
        self.conn.run_script::<i64>(&call).await.map(drop)
    }

    /// Deletes all that is recorded of the batch: for a benchmark's batches, which are
    /// measured and thrown away (a real batch's record expires with its TTL).
    pub async fn forget(&self, batch_id: &str) -> Result<(), RegistryError> {
        let keys = self.batch_keys(batch_id)?;
        let mut del = redis::cmd("DEL");
        del.arg(&keys.counts)
            .arg(&keys.jobs)
            .arg(&keys.recipient)
            .arg(&keys.collected);
        self.conn.write::<i64>(&del, None).await.map(drop)
    }

    /// Records the age recipient the batch's private keys are encrypted to. Only a producer
    /// (`submit`) calls it; workers read it with [`BatchStatusStore::recipient`].
    pub async fn set_recipient(
        &self,
        batch_id: &str,
        recipient: &str,
    ) -> Result<(), RegistryError> {
        let keys = self.batch_keys(batch_id)?;
        let mut set = redis::cmd("SET");
        set.arg(&keys.recipient)
            .arg(recipient)
            .arg("PX")
            .arg(self.ttl_ms());
        self.conn.write(&set, None).await
    }

    /// The batch's age recipient, if its producer recorded one.
    pub async fn recipient(&self, batch_id: &str) -> Result<Option<String>, RegistryError> {
        let keys = self.batch_keys(batch_id)?;
        let mut conn = self.conn.clone();
        redis::cmd("GET")
            .arg(&keys.recipient)
            .query_async(&mut conn)
            .await
            .map_err(storage)
    }

    /// Records that the whole batch was collected into `c.dir`.
    pub async fn set_collected(&self, batch_id: &str, c: &Collected) -> Result<(), RegistryError> {
        let keys = self.batch_keys(batch_id)?;
        let json = serde_json::to_string(c).map_err(|e| RegistryError::Storage(e.to_string()))?;
        let mut set = redis::cmd("SET");
        set.arg(&keys.collected)
            .arg(json)
            .arg("PX")
            .arg(self.ttl_ms());
        self.conn.write(&set, None).await
    }

    /// Where the whole batch was collected, if it was.
    pub async fn collected(&self, batch_id: &str) -> Result<Option<Collected>, RegistryError> {
        let keys = self.batch_keys(batch_id)?;
        let mut conn = self.conn.clone();
        let json: Option<String> = redis::cmd("GET")
            .arg(&keys.collected)
            .query_async(&mut conn)
            .await
            .map_err(storage)?;
        json.map(|j| {
            serde_json::from_str(&j).map_err(|e| {
                RegistryError::Storage(format!("batch {batch_id:?}: collected record: {e}"))
            })
        })
        .transpose()
    }

    /// Records a job's outcome ([`CREATED`] or an error code). Idempotent per job id: a second
    /// call for the same job id changes nothing and returns false.
    pub async fn record(
        &self,
        batch_id: &str,
        job_id: Uuid,
        outcome: &str,
    ) -> Result<bool, RegistryError> {
        Ok(self.record_many(batch_id, &[(job_id, outcome)]).await? == 1)
    }

    /// Records the outcomes of several jobs of one batch (a v2 message's) in one script call,
    /// each as [`BatchStatusStore::record`] would. Returns how many were counted; the others
    /// were recorded before.
    pub async fn record_many(
        &self,
        batch_id: &str,
        outcomes: &[(Uuid, &str)],
    ) -> Result<u64, RegistryError> {
        if outcomes.is_empty() {
            return Ok(0);
        }
        let keys = self.batch_keys(batch_id)?;
        let mut call = ScriptCall::new(&RECORD);
        call.key(&keys.counts)
            .key(&keys.jobs)
            .key(&keys.recipient)
            .arg(self.ttl_ms());
        let mut id = Uuid::encode_buffer();
        for (job_id, outcome) in outcomes {
            call.arg(&*job_id.hyphenated().encode_lower(&mut id))
                .arg(*outcome);
        }
        let counted: i64 = self.conn.run_script(&call).await?;
        Ok(u64::try_from(counted).unwrap_or(0))
    }

    /// The outcome recorded for one job of the batch (by the worker or producer that answered
    /// it), if any.
    pub async fn outcome(
        &self,
        batch_id: &str,
        job_id: Uuid,
    ) -> Result<Option<String>, RegistryError> {
        let keys = self.batch_keys(batch_id)?;
        let mut conn = self.conn.clone();
        redis::cmd("HGET")
            .arg(&keys.jobs)
            .arg(job_id.hyphenated().to_string())
            .query_async(&mut conn)
            .await
            .map_err(storage)
    }

    /// The batch's counters; `None` if the batch is unknown (never seen, or expired).
    pub async fn status(&self, batch_id: &str) -> Result<Option<BatchStatus>, RegistryError> {
        let keys = self.batch_keys(batch_id)?;
        let mut conn = self.conn.clone();
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&keys.counts)
            .query_async(&mut conn)
            .await
            .map_err(storage)?;
        if fields.is_empty() {
            return Ok(None);
        }
        let mut status = BatchStatus {
            batch_id: batch_id.to_owned(),
            ..BatchStatus::default()
        };
        for (field, value) in fields {
            let n: u64 = value.parse().map_err(|_| {
                RegistryError::Storage(format!(
                    "batch {batch_id:?}: counter {field:?} holds {value:?}, not a count"
                ))
            })?;
            match field.as_str() {
                "total" => status.total = Some(n),
                "answered" => status.answered = n,
                "created" => status.created = n,
                _ => {
                    // Fields this version does not know are skipped, so an older `status`
                    // still reads counters a newer worker wrote.
                    if let Some(code) = field.strip_prefix("failed:") {
                        status.failed.insert(code.to_owned(), n);
                    }
                }
            }
        }
        Ok(Some(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_needs_the_total() {
        let mut s = BatchStatus {
            answered: 3,
            ..BatchStatus::default()
        };
        assert_eq!(s.pending(), None);
        s.total = Some(10);
        assert_eq!(s.pending(), Some(7));
        s.total = Some(2);
        assert_eq!(s.pending(), Some(0));
    }

    #[test]
    fn batch_ids_are_one_hash_tag() {
        assert_eq!(escape_batch_id("b-1"), "b-1");
        assert_eq!(escape_batch_id("a{b}%"), "a%7Bb%7D%25");
    }
}
