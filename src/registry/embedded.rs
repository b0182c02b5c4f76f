//! The registry in one local file (redb): what `keyfleet run`, `describe` and `delete` use when
//! no servers are configured. Every operation is one write transaction, so reserve / commit /
//! release are atomic and survive a crash at any point.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use uuid::Uuid;

use super::{
    now_ms, reserve_decision, Entry, Filter, KeyPairRecord, Registry, RegistryError,
    ReserveDecision, Reserved,
};
use crate::dialect::Scope;

/// `scope key \n name` → JSON of [`Entry`].
const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");
/// `scope key` → slots counted against its quota.
const COUNTS: TableDefinition<&str, u64> = TableDefinition::new("counts");

/// Signature nonce → Unix milliseconds until which it counts as used (`keyfleet serve`).
const NONCES: TableDefinition<&str, i64> = TableDefinition::new("nonces");
/// Expired nonces are swept when this many have been remembered since the last sweep.
const NONCE_SWEEP_EVERY: u64 = 4096;

/// Separates scope and name in an entry key; it occurs in neither (both dialects forbid control
/// characters in names, and `Scope::key` escapes them).
const SEP: char = '\n';

#[derive(Clone)]
pub struct EmbeddedRegistry {
    db: Arc<Database>,
    path: PathBuf,
    nonces_since_sweep: Arc<std::sync::atomic::AtomicU64>,
}

fn storage<E: std::fmt::Display>(e: E) -> RegistryError {
    RegistryError::Storage(e.to_string())
}

fn entry_key(scope: &Scope, name: &str) -> String {
    format!("{}{SEP}{name}", scope.key())
}

fn decode_entry(bytes: &[u8]) -> Result<Entry, RegistryError> {
    serde_json::from_slice(bytes).map_err(storage)
}

fn encode_entry(entry: &Entry) -> Result<Vec<u8>, RegistryError> {
    serde_json::to_vec(entry).map_err(storage)
}

impl EmbeddedRegistry {
    /// Opens (or creates) the state file, creating its parent folder.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let shown = path.display();
        // A missing folder is a typo far more often than a wish: say so instead of creating it.
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !parent.is_dir() {
                return Err(RegistryError::Storage(format!(
                    "cannot open state file {shown}: folder {} does not exist",
                    parent.display()
                )));
            }
        }
        if std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == 0) {
            return Err(RegistryError::Storage(format!(
                "state file {shown} is empty, so it is not a keyfleet state file (a crash while \
                 it was created, or a file made by hand): move it away to start a new registry"
            )));
        }
        let db = open_database(path)?;
        let txn = db.begin_write().map_err(storage)?;
        txn.open_table(ENTRIES).map_err(storage)?;
        txn.open_table(COUNTS).map_err(storage)?;
        txn.open_table(NONCES).map_err(storage)?;
        txn.commit().map_err(storage)?;
        Ok(EmbeddedRegistry {
            db: Arc::new(db),
            path: path.to_owned(),
            nonces_since_sweep: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, RegistryError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, RegistryError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| RegistryError::Storage(format!("registry task failed: {e}")))?
    }
}

/// Opens (or creates) the redb file. redb asserts on some damaged files (a truncated one, for
/// instance) instead of returning an error; that panic is caught here, with the panic message
/// kept off the terminal, and reported as what it is: a damaged state file.
fn open_database(path: &Path) -> Result<Database, RegistryError> {
    let shown = path.display();
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(|| Database::create(path));
    std::panic::set_hook(quiet);
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(RegistryError::Storage(format!(
            "cannot open state file {shown}: {e}"
        ))),
        Err(_) => Err(RegistryError::Storage(format!(
            "state file {shown} is damaged (truncated or overwritten): keyfleet cannot read it; \
             restore it from a backup, or move it away to start a new registry"
        ))),
    }
}

/// The entry under `key`, decoded.
fn entry_at(
    entries: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Entry>, RegistryError> {
    match entries.get(key).map_err(storage)? {
        Some(v) => Ok(Some(decode_entry(v.value())?)),
        None => Ok(None),
    }
}

/// A write transaction whose commit is not synced on its own (a later synced commit makes it
/// durable along with itself).
fn unsynced_write(db: &Database) -> Result<redb::WriteTransaction, RegistryError> {
    let mut txn = db.begin_write().map_err(storage)?;
    txn.set_durability(redb::Durability::None)
        .map_err(|e| RegistryError::Storage(e.to_string()))?;
    Ok(txn)
}

/// Gives one slot of `scope_key`'s quota back.
fn free_slot(counts: &mut redb::Table<&str, u64>, scope_key: &str) -> Result<(), RegistryError> {
    let used = counts.get(scope_key).map_err(storage)?.map(|v| v.value());
    counts
        .insert(scope_key, used.unwrap_or(0).saturating_sub(1))
        .map_err(storage)?;
    Ok(())
}

/// Removes expired reservations of one scope; returns how many slots were freed.
fn sweep_expired(
    entries: &mut redb::Table<&str, &[u8]>,
    scope_key: &str,
    now: i64,
) -> Result<u64, RegistryError> {
    let lo = format!("{scope_key}{SEP}");
    let hi = format!("{scope_key}{}", char::from(SEP as u8 + 1));
    let mut expired = Vec::new();
    for item in entries.range(lo.as_str()..hi.as_str()).map_err(storage)? {
        let (k, v) = item.map_err(storage)?;
        if let Entry::Reserved { deadline_ms, .. } = decode_entry(v.value())? {
            if deadline_ms <= now {
                expired.push(k.value().to_owned());
            }
        }
    }
    for k in &expired {
        entries.remove(k.as_str()).map_err(storage)?;
    }
    Ok(expired.len() as u64)
}

impl Registry for EmbeddedRegistry {
    async fn note_key(
        &self,
        scope: &Scope,
        name: &str,
        job_id: Uuid,
        public_key: &str,
    ) -> Result<Vec<String>, RegistryError> {
        let key = entry_key(scope, name);
        let fingerprint = public_key.to_owned();
        self.blocking(move |db| {
            // Synced: the note must be on disk before the cloud call it announces.
            let txn = db.begin_write().map_err(storage)?;
            let tried = {
                let mut entries = txn.open_table(ENTRIES).map_err(storage)?;
                let existing = entry_at(&entries, &key)?;
                match existing {
                    Some(Entry::Reserved {
                        job_id: j,
                        deadline_ms,
                        mut tried_keys,
                    }) if j == job_id => {
                        if !tried_keys.contains(&fingerprint) {
                            tried_keys.push(fingerprint);
                        }
                        let entry = Entry::Reserved {
                            job_id,
                            deadline_ms,
                            tried_keys: tried_keys.clone(),
                        };
                        entries
                            .insert(key.as_str(), encode_entry(&entry)?.as_slice())
                            .map_err(storage)?;
                        tried_keys
                    }
                    _ => return Err(RegistryError::ReservationLost),
                }
            };
            txn.commit().map_err(storage)?;
            Ok(tried)
        })
        .await
    }

    async fn remember_nonce(&self, key: &str, ttl_ms: i64) -> Result<bool, RegistryError> {
        let key = key.to_owned();
        let sweep = self
            .nonces_since_sweep
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % NONCE_SWEEP_EVERY
            == NONCE_SWEEP_EVERY - 1;
        self.blocking(move |db| {
            let now = now_ms();
            // A nonce lost in a crash lets a replay through only within the 15 minutes its
            // time stamp is valid, and only after that crash: not worth an fsync per request.
            let txn = unsynced_write(db)?;
            let fresh = {
                let mut nonces = txn.open_table(NONCES).map_err(storage)?;
                let seen = nonces
                    .get(key.as_str())
                    .map_err(storage)?
                    .is_some_and(|until| until.value() > now);
                if !seen {
                    nonces.insert(key.as_str(), now + ttl_ms).map_err(storage)?;
                }
                if sweep {
                    nonces.retain(|_, until| until > now).map_err(storage)?;
                }
                !seen
            };
            txn.commit().map_err(storage)?;
            Ok(fresh)
        })
        .await
    }

    async fn reserve(
        &self,
        scope: &Scope,
        name: &str,
        job_id: Uuid,
        quota: u64,
        ttl_ms: i64,
    ) -> Result<Reserved, RegistryError> {
        let scope_key = scope.key();
        let key = entry_key(scope, name);
        self.blocking(move |db| {
            let now = now_ms();
            // Not synced on its own: a reservation lost in a crash costs nothing (the row
            // reserves again on the re-run, and no key was made for it), and the commit that
            // follows it is synced, which makes this one durable too.
            let txn = unsynced_write(db)?;
            let outcome = {
                let mut entries = txn.open_table(ENTRIES).map_err(storage)?;
                let mut counts = txn.open_table(COUNTS).map_err(storage)?;
                let existing = entry_at(&entries, &key)?;
                let outcome = match reserve_decision(existing.as_ref(), job_id, now) {
                    ReserveDecision::Taken => return Err(RegistryError::AlreadyExists),
                    ReserveDecision::Delivered => return Err(RegistryError::AlreadyDelivered),
                    ReserveDecision::Reuse(how) => how,
                    ReserveDecision::NeedsSlot => {
                        let mut used = counts
                            .get(scope_key.as_str())
                            .map_err(storage)?
                            .map(|v| v.value())
                            .unwrap_or(0);
                        if used >= quota {
                            used -= sweep_expired(&mut entries, &scope_key, now)?.min(used);
                            counts.insert(scope_key.as_str(), used).map_err(storage)?;
                            if used >= quota {
                                return Err(RegistryError::QuotaExceeded);
                            }
                        }
                        counts
                            .insert(scope_key.as_str(), used + 1)
                            .map_err(storage)?;
                        Reserved::Fresh
                    }
                };
                let tried_keys = existing
                    .as_ref()
                    .map(|e| e.tried_keys_for(job_id))
                    .unwrap_or_default();
                let entry = Entry::Reserved {
                    job_id,
                    deadline_ms: now + ttl_ms,
                    tried_keys,
                };
                entries
                    .insert(key.as_str(), encode_entry(&entry)?.as_slice())
                    .map_err(storage)?;
                outcome
            };
            txn.commit().map_err(storage)?;
            Ok(outcome)
        })
        .await
    }

    async fn commit(&self, record: &KeyPairRecord) -> Result<(), RegistryError> {
        let key = entry_key(&record.scope, &record.name);
        let record = record.clone();
        self.blocking(move |db| {
            // Synced: the key file is written only after this, and a rerun takes up a key file
            // an interrupted attempt left only when the registry knows its key as this job's
            // (a key it cannot place is never overwritten, and the row would fail).
            let txn = db.begin_write().map_err(storage)?;
            {
                let mut entries = txn.open_table(ENTRIES).map_err(storage)?;
                let existing = entry_at(&entries, &key)?;
                match existing {
                    Some(Entry::Reserved { job_id, .. }) if job_id == record.job_id => {}
                    _ => return Err(RegistryError::ReservationLost),
                }
                let entry = Entry::Pair(record);
                entries
                    .insert(key.as_str(), encode_entry(&entry)?.as_slice())
                    .map_err(storage)?;
            }
            txn.commit().map_err(storage)
        })
        .await
    }

    async fn mark_delivered(
        &self,
        scope: &Scope,
        name: &str,
        job_id: Uuid,
    ) -> Result<(), RegistryError> {
        let key = entry_key(scope, name);
        self.blocking(move |db| {
            // Not synced on its own: the next synced write (any job's commit or note, or the
            // run's final flush) carries it. Lost in a crash, it leaves the pair undelivered
            // with its key file in place, and the rerun takes that key up again and delivers
            // it to the same file — one sync per key fewer for the same outcome.
            let txn = unsynced_write(db)?;
            {
                let mut entries = txn.open_table(ENTRIES).map_err(storage)?;
                let existing = entry_at(&entries, &key)?;
                match existing {
                    Some(Entry::Pair(mut r)) if r.job_id == job_id => {
                        r.delivered = true;
                        entries
                            .insert(key.as_str(), encode_entry(&Entry::Pair(r))?.as_slice())
                            .map_err(storage)?;
                    }
                    _ => return Err(RegistryError::ReservationLost),
                }
            }
            txn.commit().map_err(storage)
        })
        .await
    }

    async fn release(&self, scope: &Scope, name: &str, job_id: Uuid) -> Result<(), RegistryError> {
        let scope_key = scope.key();
        let key = entry_key(scope, name);
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(storage)?;
            {
                let mut entries = txn.open_table(ENTRIES).map_err(storage)?;
                let mut counts = txn.open_table(COUNTS).map_err(storage)?;
                let existing = entry_at(&entries, &key)?;
                let mine = match existing {
                    Some(Entry::Reserved { job_id: j, .. }) => j == job_id,
                    Some(Entry::Pair(r)) => r.job_id == job_id && !r.delivered,
                    None => false,
                };
                if mine {
                    entries.remove(key.as_str()).map_err(storage)?;
                    free_slot(&mut counts, &scope_key)?;
                }
            }
            txn.commit().map_err(storage)
        })
        .await
    }

    async fn flush(&self) -> Result<(), RegistryError> {
        self.blocking(|db| {
            let txn = db.begin_write().map_err(storage)?;
            txn.commit().map_err(storage)
        })
        .await
    }

    async fn describe(&self, filter: &Filter) -> Result<Vec<KeyPairRecord>, RegistryError> {
        let filter = filter.clone();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(storage)?;
            let entries = txn.open_table(ENTRIES).map_err(storage)?;
            let mut out = Vec::new();
            for item in entries.iter().map_err(storage)? {
                let (_, v) = item.map_err(storage)?;
                if let Entry::Pair(r) = decode_entry(v.value())? {
                    if filter.matches(&r) {
                        out.push(r);
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn delete(&self, scope: &Scope, name: &str) -> Result<bool, RegistryError> {
        let scope_key = scope.key();
        let key = entry_key(scope, name);
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(storage)?;
            let removed = {
                let mut entries = txn.open_table(ENTRIES).map_err(storage)?;
                let mut counts = txn.open_table(COUNTS).map_err(storage)?;
                let removed = entries.remove(key.as_str()).map_err(storage)?.is_some();
                if removed {
                    free_slot(&mut counts, &scope_key)?;
                }
                removed
            };
            txn.commit().map_err(storage)?;
            Ok(removed)
        })
        .await
    }

    async fn lookup(&self, scope: &Scope, name: &str) -> Result<Option<Entry>, RegistryError> {
        let key = entry_key(scope, name);
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(storage)?;
            let entries = txn.open_table(ENTRIES).map_err(storage)?;
            entry_at(&entries, &key)
        })
        .await
    }

    async fn quota_used(&self, scope: &Scope) -> Result<u64, RegistryError> {
        let scope_key = scope.key();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(storage)?;
            let counts = txn.open_table(COUNTS).map_err(storage)?;
            Ok(counts
                .get(scope_key.as_str())
                .map_err(storage)?
                .map(|v| v.value())
                .unwrap_or(0))
        })
        .await
    }
}
