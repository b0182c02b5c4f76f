//! The registry in one local file (redb): what `keyfleet run`, `describe` and `delete` use when
//! no servers are configured. Every write runs on one writer thread, in groups (`group.rs`):
//! the writes queued while the last group committed share one transaction and one sync. A
//! write that must be durable is answered once its transaction has committed and synced; one
//! that need not be (a reservation, a delivered mark, a nonce) is answered as soon as it is
//! applied, and rides on the next commit. Every read first commits what was answered, so it
//! sees every write answered before it began. Every operation is atomic and survives a crash
//! at any point. A damaged file is refused when opened
//! (every page checked against redb's checksums) and, should damage show later, every call
//! fails with [`RegistryError::Corrupt`] naming the file — no partial listing, no panic.

use std::cell::Cell;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use uuid::Uuid;

use super::rotation::Rotation;
use super::{
    now_ms, reserve_decision, Claim, Entry, Filter, Registry, RegistryError, ReserveDecision,
    Reserved,
};
use crate::dialect::record::KeyPairRecord;
use crate::dialect::Scope;
use crate::group::{Group, Held, GATHER};

/// `scope key \n name` → JSON of [`Entry`].
const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");
/// `scope key` → slots counted against its quota.
const COUNTS: TableDefinition<&str, u64> = TableDefinition::new("counts");

/// Rotation id → JSON of [`Rotation`] (`keyfleet rotate`). Made by the first rotation saved,
/// not when the file is opened: a state file that never held a rotation stays as it was.
const ROTATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("rotations");

/// Signature nonce → Unix milliseconds until which it counts as used (`keyfleet serve`).
const NONCES: TableDefinition<&str, i64> = TableDefinition::new("nonces");
/// Expired nonces are swept when this many have been remembered since the last sweep.
const NONCE_SWEEP_EVERY: u64 = 4096;

/// Separates scope and name in an entry key; it occurs in neither (both dialects forbid control
/// characters in names, and `Scope::key` escapes them).
const SEP: char = '\n';

#[derive(Clone)]
pub struct EmbeddedRegistry {
    db: Arc<Store>,
    /// The one writer (declared after `db`: when the last clone goes, the writer thread, which
    /// holds the database too, is waited for, so the file is closed when the registry is).
    writer: Arc<Group<WriteOp>>,
    /// Set while the writer holds writes it answered but has not committed: a read asks it to
    /// commit them first, so it sees every write answered before it began.
    uncommitted: Arc<AtomicBool>,
    path: PathBuf,
    nonces_since_sweep: Arc<std::sync::atomic::AtomicU64>,
    /// Set once the file is found damaged: every later call fails with it, so nothing goes on
    /// reading or writing a file known to be broken.
    damage: Arc<OnceLock<RegistryError>>,
}

/// The open database. redb writes its allocator state when a database closes, and on a damaged
/// file that can panic: the close runs contained, and is skipped for a file found damaged
/// (nothing more is written to it; the process lets go of it when it exits).
struct Store {
    db: Option<Database>,
    damage: Arc<OnceLock<RegistryError>>,
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(db) = self.db.take() {
            if self.damage.get().is_some() {
                std::mem::forget(db);
            } else if contained(move || drop(db)).is_err() {
                tracing::warn!("closing the state file failed inside its storage engine");
            }
        }
    }
}

/// A redb error as a registry error: redb's own `Corrupted` is a damaged file (filled in with
/// its path by [`EmbeddedRegistry::blocking`]), anything else a storage error worth a retry.
fn storage<E: Into<redb::Error>>(e: E) -> RegistryError {
    match e.into() {
        redb::Error::Corrupted(why) => corrupt(why),
        e => RegistryError::Storage(e.to_string()),
    }
}

/// Damage found where the path is not at hand; [`EmbeddedRegistry::blocking`] names the file.
fn corrupt(detail: impl Into<String>) -> RegistryError {
    RegistryError::Corrupt {
        path: PathBuf::new(),
        detail: detail.into(),
    }
}

fn entry_key(scope: &Scope, name: &str) -> String {
    format!("{}{SEP}{name}", scope.key())
}

/// Every value was written by [`encode_entry`]: one that does not decode is damage, not a
/// passing failure (retrying would read the same bytes).
/// How every stored [`Entry::Pair`] begins (its serde tag, written first).
const PAIR_PREFIX: &[u8] = br#"{"state":"pair""#;

fn decode_entry(bytes: &[u8]) -> Result<Entry, RegistryError> {
    serde_json::from_slice(bytes)
        .map_err(|e| corrupt(format!("a stored entry does not decode: {e}")))
}

fn decode_rotation(bytes: &[u8]) -> Result<Rotation, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| corrupt(format!("a rotation does not decode: {e}")))
}

fn encode_entry(entry: &Entry) -> Result<Vec<u8>, RegistryError> {
    serde_json::to_vec(entry).map_err(|e| RegistryError::Storage(e.to_string()))
}

impl EmbeddedRegistry {
    /// Opens (or creates) the state file. An existing file is checked whole first (every page
    /// against its checksum, see [`verify`]): a damaged one is refused before anything reads
    /// or writes it.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        Self::open_gathering(path, GATHER)
    }

    /// [`EmbeddedRegistry::open`], with synced writes waiting up to `gather` for company.
    fn open_gathering(path: &Path, gather: Duration) -> Result<Self, RegistryError> {
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
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            // Refused before the check below reads it (see `state_file`).
            return Err(symlink_refused(path));
        }
        if std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == 0) {
            return Err(RegistryError::Storage(format!(
                "state file {shown} is empty, so it is not a keyfleet state file (a crash while \
                 it was created, or a file made by hand): move it away to start a new registry"
            )));
        }
        if std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
            verify(path)?;
        }
        let damage = Arc::new(OnceLock::new());
        let store = Store {
            db: Some(open_database(path)?),
            damage: damage.clone(),
        };
        let tables = contained(|| -> Result<(), RegistryError> {
            let Some(db) = &store.db else {
                return Ok(());
            };
            let txn = db.begin_write().map_err(storage)?;
            txn.open_table(ENTRIES).map_err(storage)?;
            txn.open_table(COUNTS).map_err(storage)?;
            txn.open_table(NONCES).map_err(storage)?;
            txn.commit().map_err(storage)
        });
        let e = match tables {
            Ok(Ok(())) => {
                let db = Arc::new(store);
                let uncommitted = Arc::new(AtomicBool::new(false));
                let mut state = Writer {
                    open: None,
                    store: db.clone(),
                    uncommitted: uncommitted.clone(),
                    held: Held::new(gather),
                };
                let writer = Group::spawn("keyfleet-state", WRITES_PER_GROUP, move |ops| {
                    state.take(ops)
                })
                .map_err(|e| {
                    RegistryError::Storage(format!("cannot start the state writer: {e}"))
                })?;
                return Ok(EmbeddedRegistry {
                    db,
                    writer: Arc::new(writer),
                    uncommitted,
                    path: path.to_owned(),
                    nonces_since_sweep: Arc::new(std::sync::atomic::AtomicU64::new(0)),
                    damage,
                });
            }
            Ok(Err(e @ RegistryError::Corrupt { .. })) => named(e, path),
            Ok(Err(e)) => return Err(e),
            Err(()) => damaged(path, "its tables cannot be read"),
        };
        Err(damage.get_or_init(|| e).clone())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the blocking pool. A panic inside redb (it asserts on some damaged pages
    /// instead of returning an error) is contained and, like redb's own `Corrupted` or an
    /// entry that does not decode, reported as a damaged state file — from then on by every
    /// call.
    async fn blocking<T, F>(&self, f: F) -> Result<T, RegistryError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, RegistryError> + Send + 'static,
    {
        if let Some(e) = self.damage.get() {
            return Err(e.clone());
        }
        if self.uncommitted.load(Ordering::Acquire) {
            let (done, committed) = tokio::sync::oneshot::channel();
            if self.writer.send(WriteOp::Commit(done)).is_ok() {
                // If that commit fails, the writes it held are gone, and what is read is what
                // the file holds: nothing to report here.
                let _ = committed.await;
            }
        }
        let store = self.db.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            contained(|| match &store.db {
                Some(db) => f(db),
                None => Err(RegistryError::Storage("the state file is closed".into())),
            })
        })
        .await
        .map_err(|e| RegistryError::Storage(format!("registry task failed: {e}")))?;
        let e = match outcome {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e @ RegistryError::Corrupt { .. })) => named(e, &self.path),
            Ok(Err(e)) => return Err(e),
            Err(()) => damaged(&self.path, "a page of it cannot be read"),
        };
        Err(self.damage.get_or_init(|| e).clone())
    }

    /// Runs `f` inside the writer thread's open transaction and answers with its outcome: once
    /// that transaction has committed and synced when `synced`, else as soon as `f` has run
    /// (see [`Writer::take`]). `f` returns a refusal only before writing anything (see
    /// [`leaves_transaction_whole`]).
    async fn write<T, F>(&self, synced: bool, f: F) -> Result<T, RegistryError>
    where
        T: Send + 'static,
        F: FnOnce(&redb::WriteTransaction) -> Result<T, RegistryError> + Send + 'static,
    {
        let queued = self.queue_write(synced, f);
        self.written(queued).await
    }

    /// The first half of [`EmbeddedRegistry::write`]: queues the write at once (writes are
    /// applied in the order they are queued) and returns where its answer will come.
    fn queue_write<T, F>(&self, synced: bool, f: F) -> Result<Answer<T>, RegistryError>
    where
        T: Send + 'static,
        F: FnOnce(&redb::WriteTransaction) -> Result<T, RegistryError> + Send + 'static,
    {
        if let Some(e) = self.damage.get() {
            return Err(e.clone());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let apply = move |txn: &redb::WriteTransaction| {
            let own = f(txn);
            let spoiled = match &own {
                Err(e) if !leaves_transaction_whole(e) => Some(e.clone()),
                _ => None,
            };
            let answer = move |group: Result<(), RegistryError>| {
                let _ = tx.send(group.and(own));
            };
            Applied {
                answer: Box::new(answer),
                spoiled,
            }
        };
        let op = WriteOp::Write {
            synced,
            apply: Box::new(apply),
        };
        if self.writer.send(op).is_err() {
            return Err(RegistryError::Storage(
                "the state writer has stopped".into(),
            ));
        }
        Ok(rx)
    }

    /// The second half of [`EmbeddedRegistry::write`]: the answer of a queued write.
    async fn written<T>(
        &self,
        queued: Result<Answer<T>, RegistryError>,
    ) -> Result<T, RegistryError> {
        // No answer at all: the write was dropped by a panic inside redb.
        let outcome = match queued {
            Ok(rx) => rx
                .await
                .unwrap_or_else(|_| Err(corrupt("a page of it cannot be read or written"))),
            Err(e) => Err(e),
        };
        let e = match outcome {
            Ok(v) => return Ok(v),
            Err(e @ RegistryError::Corrupt { .. }) => named(e, &self.path),
            Err(e) => return Err(e),
        };
        Err(self.damage.get_or_init(|| e).clone())
    }
}

/// At most this many writes share a transaction: enough that a busy run syncs rarely, few
/// enough that one group's transaction stays small.
const WRITES_PER_GROUP: usize = 256;

/// How long the writes answered before their commit may wait, at most, for company (a synced
/// write, a read, more of their kind) before their transaction is committed on its own. Until a
/// synced commit they are no more durable committed than not, and a read commits them first.
const LINGER: Duration = Duration::from_millis(20);

/// One request to the writer thread.
enum WriteOp {
    /// A write, applied inside the open transaction.
    Write {
        /// The write must be on disk before it is answered: the transaction is committed, and
        /// synced, before the answer goes. A write that need not be is answered as soon as it
        /// is applied, and committed with what follows it.
        synced: bool,
        apply: Box<dyn FnOnce(&redb::WriteTransaction) -> Applied + Send>,
    },
    /// Commit what is open now, then answer (a read is about to start: it must see every write
    /// already answered).
    Commit(tokio::sync::oneshot::Sender<()>),
}

/// Where the outcome of a queued write comes.
type Answer<T> = tokio::sync::oneshot::Receiver<Result<T, RegistryError>>;

/// Gives a write's own outcome to its caller, or the transaction's failure.
type GiveAnswer = Box<dyn FnOnce(Result<(), RegistryError>) + Send>;

/// A write applied to the open transaction.
struct Applied {
    answer: GiveAnswer,
    /// The store failed part-way through this write: the transaction may hold half of it, so
    /// it is abandoned. This write and those after it in its group get this error, and retry;
    /// the writes answered before it in the transaction are lost (see [`Writer::take`]).
    spoiled: Option<RegistryError>,
}

/// Whether an error a write returns leaves the transaction as it was before the write. The
/// refusals are decided before anything is written (a quota refusal after sweeping expired
/// reservations leaves a consistent sweep); a storage error may come from half-way through.
fn leaves_transaction_whole(e: &RegistryError) -> bool {
    matches!(
        e,
        RegistryError::QuotaExceeded
            | RegistryError::AlreadyExists
            | RegistryError::AlreadyDelivered
            | RegistryError::ReservationLost
    )
}

/// The writer thread's state between groups: the transaction left open, holding writes that
/// were answered already.
struct Writer {
    /// Declared before `store`, so it is dropped (aborted) first: the database's own drop
    /// waits for an open write transaction to end, and would wait forever for this one.
    open: Option<Open>,
    store: Arc<Store>,
    /// Shared with the registry: set while `open` holds answered writes, so a read commits them
    /// first ([`EmbeddedRegistry::blocking`]).
    uncommitted: Arc<AtomicBool>,
    /// The writes in `open` that must be synced before they are answered, held while keys
    /// are still being made so that one sync serves several ([`Held`]; it keeps, from one
    /// transaction to the next, whether waiting found company).
    held: Held<GiveAnswer>,
}

/// The transaction the writer holds open.
struct Open {
    txn: redb::WriteTransaction,
    /// It is committed [`LINGER`] after this, whatever keeps arriving — or, while it holds
    /// synced writes, when their wait for company ends ([`GATHER`] at most after the first),
    /// so a write answered before its commit stays uncommitted [`LINGER`] + [`GATHER`] at most.
    began: std::time::Instant,
    /// Writes in it, answered.
    answered: usize,
}

impl Writer {
    /// Applies a group of writes, in the order they came, to the open transaction. A write that
    /// needs no sync is answered at once (its caller goes on while the key is made); the
    /// transaction is committed when a read asks for it, when it holds [`WRITES_PER_GROUP`]
    /// writes, and otherwise [`LINGER`] after it was begun — unless a write in it must be
    /// synced: then at once if no key is being made, else when the keys being made have sent
    /// theirs or after [`GATHER`], so that one sync serves several (an empty `ops` is a wait
    /// passing: see [`Group::spawn`]). Returns how long to wait.
    ///
    /// A write answered before its commit is lost by a crash, as a write committed without a
    /// sync is, and, while the process lives, when its transaction is abandoned: a later write
    /// in it failed inside the storage engine, or its commit failed, or the file was found
    /// damaged. Each leaves the registry as a crash at that point would: a lost reservation is
    /// found lost by its job's commit, which tries the job again; a lost delivered mark makes
    /// a rerun take its key file up again; a lost nonce lets its request be replayed once. A
    /// write that needs no sync and comes after a synced one in the same group sees that one's
    /// effect, and is lost with it when its commit fails.
    fn take(&mut self, ops: Vec<WriteOp>) -> Option<Duration> {
        let mut waiting: Vec<GiveAnswer> = Vec::new();
        let mut commits: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
        let linger_over = ops.is_empty();
        let outcome = contained(|| -> Result<(), RegistryError> {
            let Some(db) = &self.store.db else {
                return Err(RegistryError::Storage("the state file is closed".into()));
            };
            let mut spoiled = None;
            for op in ops {
                let (op_synced, apply) = match op {
                    WriteOp::Commit(done) => {
                        commits.push(done);
                        continue;
                    }
                    WriteOp::Write { synced, apply } => (synced, apply),
                };
                let open = match &mut self.open {
                    Some(open) => open,
                    None => {
                        let mut txn = db.begin_write().map_err(storage)?;
                        // Made durable by the first synced commit (redb orders commits).
                        txn.set_durability(redb::Durability::None)
                            .map_err(storage)?;
                        self.open.insert(Open {
                            txn,
                            began: std::time::Instant::now(),
                            answered: 0,
                        })
                    }
                };
                let applied = (apply)(&open.txn);
                // From a spoiled write on, the group's writes are still applied (their answers
                // come from applying them) but all wait, and get its error.
                spoiled = spoiled.or(applied.spoiled);
                if spoiled.is_some() {
                    waiting.push(applied.answer);
                } else if op_synced {
                    self.held.push(applied.answer);
                } else {
                    self.uncommitted.store(true, Ordering::Release);
                    open.answered += 1;
                    (applied.answer)(Ok(()));
                }
            }
            if let Some(e) = spoiled {
                return Err(e);
            }
            // Nothing more is written to a file found damaged.
            if let Some(e) = self.store.damage.get() {
                return Err(e.clone());
            }
            let due = !commits.is_empty()
                || linger_over
                || self.open.as_ref().is_some_and(|open| {
                    // Synced writes held for company set the time; else the linger does.
                    open.answered + self.held.len() >= WRITES_PER_GROUP
                        || if self.held.is_empty() {
                            open.began.elapsed() >= LINGER
                        } else {
                            self.held.left().is_none()
                        }
                });
            if due {
                if let Some(Open { mut txn, .. }) = self.open.take() {
                    let synced = !self.held.is_empty();
                    waiting.extend(self.held.take());
                    if synced {
                        txn.set_durability(redb::Durability::Immediate)
                            .map_err(storage)?;
                    }
                    txn.commit().map_err(storage)?;
                }
            }
            Ok(())
        });
        // A panic inside redb is damage (see `blocking`); the writes not yet applied were
        // dropped with it, which their callers see as the same.
        let outcome =
            outcome.unwrap_or_else(|()| Err(corrupt("a page of it cannot be read or written")));
        if outcome.is_err() {
            if let Some(Open { txn, .. }) = self.open.take() {
                // The synced writes held in it are lost with it, and told so.
                waiting.extend(self.held.take());
                // Dropping it aborts it, which may itself trip over the damage that failed it.
                let _ = contained(move || drop(txn));
            }
        }
        if self.open.is_none() {
            self.uncommitted.store(false, Ordering::Release);
        }
        for answer in waiting {
            answer(outcome.clone());
        }
        for done in commits {
            let _ = done.send(());
        }
        let open = self.open.as_ref()?;
        Some(if self.held.is_empty() {
            LINGER.saturating_sub(open.began.elapsed())
        } else {
            // Zero when the wait is over: the next call commits.
            self.held.left().unwrap_or_default()
        })
    }
}

impl EmbeddedRegistry {
    /// Queues the reservation of `claim` (see [`Registry::reserve`]).
    ///
    /// Not synced on its own: a reservation lost in a crash costs nothing (the row reserves
    /// again on the re-run, and no key was made for it), and the commit that follows it is
    /// synced, which makes this one durable too.
    fn queue_reserve(&self, claim: &Claim<'_>) -> Result<Answer<Reserved>, RegistryError> {
        let scope_key = claim.scope.key();
        let key = entry_key(claim.scope, claim.name);
        let (job_id, quota, ttl_ms) = (claim.job_id, claim.quota, claim.ttl_ms);
        self.queue_write(false, move |txn| {
            let now = now_ms();
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
            Ok(outcome)
        })
    }
}

/// `e` with the state file's path filled in when it is damage found without it.
fn named(e: RegistryError, path: &Path) -> RegistryError {
    match e {
        RegistryError::Corrupt { path: p, detail } if p.as_os_str().is_empty() => {
            damaged(path, detail)
        }
        e => e,
    }
}

fn damaged(path: &Path, detail: impl Into<String>) -> RegistryError {
    RegistryError::Corrupt {
        path: path.to_owned(),
        detail: detail.into(),
    }
}

thread_local! {
    /// Set while this thread runs a [`contained`] call: its panics are expected, and caught.
    static CONTAINED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, catching a panic (`Err`). The panic message stays off the terminal (it would
/// read as a crash, and says nothing a user can act on); it is logged at debug level. The
/// process's panic hook is wrapped once, and keeps printing every other panic.
fn contained<T>(f: impl FnOnce() -> T) -> Result<T, ()> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CONTAINED.with(Cell::get) {
                tracing::debug!("the state file's storage engine panicked: {info}");
            } else {
                previous(info);
            }
        }));
    });
    let outer = CONTAINED.with(|c| c.replace(true));
    let caught = std::panic::catch_unwind(AssertUnwindSafe(f));
    CONTAINED.with(|c| c.set(outer));
    caught.map_err(|_| ())
}

/// Opens (or creates) the redb file. redb asserts on some damaged files (a truncated one, for
/// instance) instead of returning an error: that is reported as what it is, a damaged file.
///
/// A lock that is held only a moment is waited for: a process that starts a program in another
/// thread while this one opens the file lends its children, between their fork and their
/// exec, every open file description it has — the check's ([`verify`]) among them, with its
/// lock. CI saw a test's open refused so, right after the check let go of the file.
fn open_database(path: &Path) -> Result<Database, RegistryError> {
    let mut tries = 0;
    loop {
        let file = state_file(path)?;
        match contained(|| Database::builder().create_file(file)) {
            Ok(Ok(db)) => return Ok(db),
            Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) if tries < LOCK_TRIES => {
                tries += 1;
                std::thread::sleep(LOCK_PAUSE);
            }
            Ok(Err(e)) => return Err(open_error(path, e)),
            Err(()) => return Err(damaged(path, "truncated or overwritten")),
        }
    }
}

/// The state file opened as redb's `Database::create` opens it (read and write, created when
/// missing, never truncated), but created 0600 and never through a symlink: a link planted
/// where the state file goes would have redb create or write a file wherever it points.
fn state_file(path: &Path) -> Result<File, RegistryError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        // O_NOFOLLOW, as `sink::files::no_follow` gives the sinks (the registry sits below them).
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
                symlink_refused(path)
            } else {
                RegistryError::Storage(format!("cannot open state file {}: {e}", path.display()))
            }
        })
}

fn symlink_refused(path: &Path) -> RegistryError {
    RegistryError::Storage(format!(
        "cannot open state file {}: it is a symbolic link, which keyfleet neither follows nor \
         writes through; name the file itself (--state)",
        path.display()
    ))
}

/// How long [`open_database`] waits for a lock held a moment: 10 × 50 ms. A file another
/// keyfleet really has open is refused half a second later than it would be.
const LOCK_TRIES: u32 = 10;
const LOCK_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// Checks every page of an existing state file against the checksums redb keeps in the page
/// above it (up to the root's, in the file header), without changing the file: redb's
/// `check_integrity` runs on a copy-on-write view of it ([`Overlay`]). On a damaged file redb
/// would otherwise read garbage pages as they come — list some entries and not others, or
/// panic — and `check_integrity` on the file itself would "repair" damage to the latest commit
/// by rolling it back, so that the next run would silently work on older state.
///
/// A file another process has open (and may be writing) is left to the open that follows,
/// which refuses it.
fn verify(path: &Path) -> Result<(), RegistryError> {
    let overlay = match Overlay::new(path) {
        Ok(Some(o)) => o,
        Ok(None) => return Ok(()),
        Err(e) => {
            return Err(RegistryError::Storage(format!(
                "cannot open state file {}: {e}",
                path.display()
            )))
        }
    };
    let checked = contained(|| -> Result<bool, redb::DatabaseError> {
        let mut db = redb::Builder::new().create_with_backend(overlay)?;
        let before = contents_digest(&db);
        if db.check_integrity()? {
            return Ok(true);
        }
        // redb also answers "repaired" when the only thing it rebuilt is its allocator state
        // (which pages are free: after many deletes, pages whose freeing was still pending),
        // which is no damage. A repair of damage rolls the latest state back, which changes
        // what the tables hold: only that counts.
        Ok(before.is_ok_and(|b| contents_digest(&db).is_ok_and(|a| a == b)))
    });
    match checked {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err(damaged(
            path,
            "pages of its latest state fail their checksums",
        )),
        Ok(Err(e)) => Err(open_error(path, e)),
        // redb asserts when a check finds damage it cannot repair.
        Err(()) => Err(damaged(path, "pages of it fail their checksums")),
    }
}

/// A digest of everything the tables hold, to tell a repair that changed the contents from one
/// that did not (see [`verify`]). Only compared within one check, so its layout is free.
fn contents_digest(db: &Database) -> Result<Vec<u8>, redb::Error> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let txn = db.begin_read()?;
    digest_table(&txn, ENTRIES, &mut h, |v| v.to_vec())?;
    digest_table(&txn, ROTATIONS, &mut h, |v| v.to_vec())?;
    digest_table(&txn, COUNTS, &mut h, |v| v.to_le_bytes().to_vec())?;
    digest_table(&txn, NONCES, &mut h, |v| v.to_le_bytes().to_vec())?;
    Ok(h.finalize().to_vec())
}

/// Adds every row of `table` (absent: none) to `h`, each field followed by a separator.
fn digest_table<V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    table: TableDefinition<&str, V>,
    h: &mut sha2::Sha256,
    bytes: impl for<'a> Fn(V::SelfType<'a>) -> Vec<u8>,
) -> Result<(), redb::Error> {
    use sha2::Digest;
    let t = match txn.open_table(table) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for item in t.iter()? {
        let (k, v) = item?;
        h.update(k.value().as_bytes());
        h.update([0]);
        h.update(bytes(v.value()));
        h.update([0]);
    }
    h.update([1]);
    Ok(())
}

/// Why redb could not open (or check) the file at `path`.
fn open_error(path: &Path, e: redb::DatabaseError) -> RegistryError {
    match e {
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(why)) => damaged(path, why),
        // What redb says of a file without its magic number.
        redb::DatabaseError::Storage(redb::StorageError::Io(e))
            if e.kind() == std::io::ErrorKind::InvalidData =>
        {
            damaged(
                path,
                "it does not begin as a state file does (damaged, or some other file)",
            )
        }
        e => RegistryError::Storage(format!("cannot open state file {}: {e}", path.display())),
    }
}

/// The state file read-only, with writes kept in memory: what [`verify`] lets redb repair.
/// Holds the file's lock while it lives, as redb's own file backend would.
#[derive(Debug)]
struct Overlay {
    file: Mutex<File>,
    state: Mutex<OverlayState>,
}

#[derive(Debug)]
struct OverlayState {
    len: u64,
    /// The file's bytes from here on read as zeros (redb shrank the file, then maybe grew it).
    file_end: u64,
    /// Writes in the order they came; a read applies the ones it overlaps, in order.
    writes: Vec<(u64, Vec<u8>)>,
}

impl Overlay {
    /// `None` when another process holds the file.
    fn new(path: &Path) -> std::io::Result<Option<Overlay>> {
        let file = File::open(path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        let len = file.metadata()?.len();
        Ok(Some(Overlay {
            file: Mutex::new(file),
            state: Mutex::new(OverlayState {
                len,
                file_end: len,
                writes: Vec::new(),
            }),
        }))
    }

    fn state(&self) -> std::io::Result<std::sync::MutexGuard<'_, OverlayState>> {
        self.state
            .lock()
            .map_err(|_| std::io::Error::other("state file check: a lock was poisoned"))
    }
}

impl redb::StorageBackend for Overlay {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.state()?.len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let state = self.state()?;
        let end = offset + out.len() as u64;
        if end > state.len {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        out.fill(0);
        if offset < state.file_end {
            let n = (state.file_end.min(end) - offset) as usize;
            let mut file = self
                .file
                .lock()
                .map_err(|_| std::io::Error::other("state file check: a lock was poisoned"))?;
            file.seek(SeekFrom::Start(offset))?;
            file.read_exact(&mut out[..n])?;
        }
        for (at, data) in &state.writes {
            let (lo, hi) = (offset.max(*at), end.min(at + data.len() as u64));
            if lo < hi {
                out[(lo - offset) as usize..(hi - offset) as usize]
                    .copy_from_slice(&data[(lo - at) as usize..(hi - at) as usize]);
            }
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let mut state = self.state()?;
        if len < state.len {
            // What lies past the new end reads as zeros if the file grows again.
            state.file_end = state.file_end.min(len);
            state.writes.retain_mut(|(at, data)| {
                data.truncate(len.saturating_sub(*at) as usize);
                !data.is_empty()
            });
        }
        state.len = len;
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut state = self.state()?;
        let end = offset + data.len() as u64;
        state.len = state.len.max(end);
        state.writes.push((offset, data.to_vec()));
        Ok(())
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
        // A full scope is mostly pairs: those are known by their first bytes (serde writes
        // the tag first), so a refusal does not decode every record of the scope. Anything
        // else is decoded.
        if v.value().starts_with(PAIR_PREFIX) {
            continue;
        }
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
    // A commit that reports a failure did not happen, as far as this process goes on: redb
    // fails before the new state takes effect, except when the final sync fails, and from
    // then on it refuses every write (`PreviousIo`), so no retry meets a pair it half-made.
    const FAILED_COMMIT_IS_CERTAIN: bool = true;

    async fn note_key(
        &self,
        scope: &Scope,
        name: &str,
        job_id: Uuid,
        public_key: &str,
    ) -> Result<Vec<String>, RegistryError> {
        let key = entry_key(scope, name);
        let fingerprint = public_key.to_owned();
        // Synced: the note must be on disk before the cloud call it announces.
        self.write(true, move |txn| {
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
        // Not synced: a nonce lost in a crash lets a replay through only within the 15 minutes
        // its time stamp is valid, and only after that crash: not worth an fsync per request.
        self.write(false, move |txn| {
            let now = now_ms();
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
            Ok(fresh)
        })
        .await
    }

    async fn reserve(&self, claim: &Claim<'_>) -> Result<Reserved, RegistryError> {
        let queued = self.queue_reserve(claim);
        self.written(queued).await
    }

    async fn reserve_many(&self, claims: &[Claim<'_>]) -> Vec<Result<Reserved, RegistryError>> {
        // All queued before any answer is awaited: one group, in the order given.
        let queued: Vec<_> = claims.iter().map(|c| self.queue_reserve(c)).collect();
        let mut out = Vec::with_capacity(queued.len());
        for q in queued {
            out.push(self.written(q).await);
        }
        out
    }

    async fn commit(&self, record: &KeyPairRecord) -> Result<(), RegistryError> {
        let key = entry_key(&record.scope, &record.name);
        let record = record.clone();
        // Synced: the key file is written only after this, and a rerun takes up a key file an
        // interrupted attempt left only when the registry knows its key as this job's (a key it
        // cannot place is never overwritten, and the row would fail).
        self.write(true, move |txn| {
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
            Ok(())
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
        // Not synced on its own: the next synced write (any job's commit or note, or the run's
        // final flush) carries it. Lost in a crash, it leaves the pair undelivered with its key
        // file in place, and the rerun takes that key up again and delivers it to the same
        // file — one sync per key fewer for the same outcome.
        self.write(false, move |txn| {
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
            Ok(())
        })
        .await
    }

    async fn release(&self, scope: &Scope, name: &str, job_id: Uuid) -> Result<(), RegistryError> {
        let scope_key = scope.key();
        let key = entry_key(scope, name);
        self.write(true, move |txn| {
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
            Ok(())
        })
        .await
    }

    fn damage(&self) -> Option<RegistryError> {
        self.damage.get().cloned()
    }

    async fn flush(&self) -> Result<(), RegistryError> {
        // An empty synced write: its group's commit makes every earlier one durable.
        self.write(true, |_| Ok(())).await
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
        self.write(true, move |txn| {
            let removed = {
                let mut entries = txn.open_table(ENTRIES).map_err(storage)?;
                let mut counts = txn.open_table(COUNTS).map_err(storage)?;
                let removed = entries.remove(key.as_str()).map_err(storage)?.is_some();
                if removed {
                    free_slot(&mut counts, &scope_key)?;
                }
                removed
            };
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

    async fn save_rotation(&self, rotation: &Rotation) -> Result<(), RegistryError> {
        let id = rotation.id.clone();
        let bytes = serde_json::to_vec(rotation)
            .map_err(|e| RegistryError::Storage(format!("encoding rotation {id}: {e}")))?;
        // Synced: successors are created only once their rotation is on disk.
        self.write(true, move |txn| {
            let mut rotations = txn.open_table(ROTATIONS).map_err(storage)?;
            rotations
                .insert(id.as_str(), bytes.as_slice())
                .map_err(storage)?;
            Ok(())
        })
        .await
    }

    async fn rotation(&self, id: &str) -> Result<Option<Rotation>, RegistryError> {
        let id = id.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(storage)?;
            let rotations = match txn.open_table(ROTATIONS) {
                Ok(t) => t,
                // A state file that never held a rotation has no such table.
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(storage(e)),
            };
            match rotations.get(id.as_str()).map_err(storage)? {
                Some(v) => Ok(Some(decode_rotation(v.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn rotations(&self) -> Result<Vec<Rotation>, RegistryError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(storage)?;
            let rotations = match txn.open_table(ROTATIONS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(storage(e)),
            };
            let mut out = Vec::new();
            for item in rotations.iter().map_err(storage)? {
                let (_, v) = item.map_err(storage)?;
                out.push(decode_rotation(v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn quota_used(&self, scope: &Scope) -> Result<u64, RegistryError> {
        let scope_key = scope.key();
        // Counted by the writer, in its open transaction: it sees every write answered before,
        // with no commit asked for (a read would first have the writer commit them, and the
        // quota gauge reads every scope with creates in flight ten times a second).
        self.write(false, move |txn| {
            let counts = txn.open_table(COUNTS).map_err(storage)?;
            let used = counts
                .get(scope_key.as_str())
                .map_err(storage)?
                .map(|v| v.value())
                .unwrap_or(0);
            Ok(used)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::dialect::Provider;

    fn record(scope: &Scope, name: &str, job_id: Uuid) -> KeyPairRecord {
        KeyPairRecord {
            scope: scope.clone(),
            name: name.into(),
            job_id,
            key_pair_id: None,
            key_pair_fingerprint: format!("fp-{name}"),
            fingerprint_md5: format!("md5-{name}"),
            fingerprint_sha256: format!("SHA256:{name}"),
            public_key: format!("ssh-rsa AAAAB3NzaC1yc2E {name} {}", "x".repeat(300)),
            created_at: 1_700_000_000,
            tags: Vec::new(),
            resource_group_id: None,
            zone: None,
            delivered: true,
            earlier_keys: Vec::new(),
        }
    }

    /// `sweep_expired` skips pairs by their first bytes: every pair must begin so, and no
    /// reservation may.
    #[test]
    fn stored_pairs_and_only_pairs_begin_with_the_pair_prefix() {
        let scope = Scope {
            provider: Provider::Ucloud,
            owner: "o".into(),
            region: "r".into(),
        };
        let pair = serde_json::to_vec(&Entry::Pair(record(&scope, "n", Uuid::nil()))).unwrap();
        assert!(
            pair.starts_with(PAIR_PREFIX),
            "{}",
            String::from_utf8_lossy(&pair)
        );
        let reserved = serde_json::to_vec(&Entry::Reserved {
            job_id: Uuid::nil(),
            deadline_ms: 1,
            tried_keys: vec!["ssh-rsa AAAA pair".into()],
        })
        .unwrap();
        assert!(!reserved.starts_with(PAIR_PREFIX));
    }

    /// The fault CI showed: a child forked by another thread holds the lock of a file
    /// description this process just closed, until it execs. An open then waits for it.
    #[test]
    fn a_lock_held_a_moment_by_a_forked_child_does_not_fail_the_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        drop(EmbeddedRegistry::open(&path).unwrap());
        let held = std::fs::File::open(&path).unwrap();
        held.try_lock().unwrap();
        let released = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(120));
            drop(held);
        });
        assert!(EmbeddedRegistry::open(&path).is_ok());
        released.join().unwrap();

        // A lock held for good is still refused, naming the file.
        let held = std::fs::File::open(&path).unwrap();
        held.try_lock().unwrap();
        let Err(refused) = EmbeddedRegistry::open(&path) else {
            panic!("a state file locked by another holder was opened");
        };
        let refused = refused.to_string();
        assert!(refused.contains("already open"), "{refused}");
        assert!(refused.contains("state.redb"), "{refused}");
    }

    /// At the quota, a reservation sweeps the scope's expired reservations from among its
    /// pairs (which the sweep passes over by their first bytes), and only those.
    #[tokio::test]
    async fn at_the_quota_expired_reservations_among_pairs_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        filled(&path, 3).await;
        let registry = EmbeddedRegistry::open(&path).unwrap();
        let scope = Scope {
            provider: Provider::Aliyun,
            owner: "acct".into(),
            region: "cn-hangzhou".into(),
        };
        let claim = |name: &'static str, quota: u64, ttl_ms: i64| Claim {
            scope: &scope,
            name,
            job_id: Uuid::new_v4(),
            quota,
            ttl_ms,
        };
        // The reservation lapses by the test's hand, not the clock's: a 1 ms lease could
        // lapse before the refusal below on a slow machine (CI saw it answered Fresh).
        registry
            .reserve(&claim("lapsing", 4, 60_000))
            .await
            .unwrap();
        assert_eq!(
            registry.reserve(&claim("refused", 4, 60_000)).await,
            Err(RegistryError::QuotaExceeded)
        );
        let key = entry_key(&scope, "lapsing");
        registry
            .write(true, move |txn| {
                let mut entries = txn.open_table(ENTRIES).map_err(storage)?;
                let Some(Entry::Reserved {
                    job_id, tried_keys, ..
                }) = entry_at(&entries, &key)?
                else {
                    panic!("lapsing is not a reservation");
                };
                let lapsed = Entry::Reserved {
                    job_id,
                    deadline_ms: now_ms() - 1,
                    tried_keys,
                };
                entries
                    .insert(key.as_str(), encode_entry(&lapsed)?.as_slice())
                    .map_err(storage)?;
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(
            registry.reserve(&claim("fresh", 4, 60_000)).await,
            Ok(Reserved::Fresh)
        );
        assert_eq!(registry.lookup(&scope, "lapsing").await.unwrap(), None);
        assert_eq!(registry.quota_used(&scope).await.unwrap(), 4);
        for i in 0..3 {
            let name = format!("pair-{i:04}");
            assert!(matches!(
                registry.lookup(&scope, &name).await.unwrap(),
                Some(Entry::Pair(_))
            ));
        }
    }

    /// While a key is being made for a job, a synced commit waits for company instead of
    /// syncing alone: a second one joins it, neither is answered until they are made durable
    /// together (here by a read after a write answered at once, which commits what is open),
    /// and both are then in the file.
    /// The wait is a minute here so that only what the writer does decides the outcome.
    #[tokio::test]
    async fn a_synced_commit_waits_for_the_keys_being_made_and_shares_their_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let registry = EmbeddedRegistry::open_gathering(&path, Duration::from_secs(60)).unwrap();
        let scope = Scope {
            provider: Provider::Aliyun,
            owner: "acct".into(),
            region: "cn-hangzhou".into(),
        };
        let jobs = [Uuid::new_v4(), Uuid::new_v4()];
        for (i, job) in jobs.iter().enumerate() {
            let name = format!("pair-{i}");
            let claim = Claim {
                scope: &scope,
                name: &name,
                job_id: *job,
                quota: 10,
                ttl_ms: 60_000,
            };
            assert_eq!(registry.reserve(&claim).await, Ok(Reserved::Fresh));
        }
        let coming = crate::group::expect_company();
        let commit = |i: usize| {
            let registry = registry.clone();
            let record = record(&scope, &format!("pair-{i}"), jobs[i]);
            tokio::spawn(async move { registry.commit(&record).await })
        };
        let first = commit(0);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !first.is_finished(),
            "a synced commit did not wait for company"
        );
        let second = commit(1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!first.is_finished() && !second.is_finished());
        // A read commits what is open first when a write in it was answered already (held
        // writes were not, so no reader is owed them): a reservation answered at once, then a
        // read, and the two commits go together with it.
        let third = Claim {
            scope: &scope,
            name: "pair-2",
            job_id: Uuid::new_v4(),
            quota: 10,
            ttl_ms: 60_000,
        };
        assert_eq!(registry.reserve(&third).await, Ok(Reserved::Fresh));
        assert!(!first.is_finished() && !second.is_finished());
        let read = registry.lookup(&scope, "pair-0").await.unwrap();
        assert!(matches!(read, Some(Entry::Pair(_))));
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
        drop(coming);
        drop(registry);
        let reopened = EmbeddedRegistry::open(&path).unwrap();
        for i in 0..2 {
            assert!(matches!(
                reopened.lookup(&scope, &format!("pair-{i}")).await.unwrap(),
                Some(Entry::Pair(_))
            ));
        }
    }

    /// A reservation is answered before its transaction commits (it rides on the next commit).
    /// A read that starts after the answer still sees it — the read has the writer commit it
    /// first — and closing the registry commits what is still open, so the file keeps it.
    #[tokio::test]
    async fn a_write_answered_before_its_commit_is_read_back_and_kept_at_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let registry = EmbeddedRegistry::open(&path).unwrap();
        let scope = Scope {
            provider: Provider::Aliyun,
            owner: "acct".into(),
            region: "cn-hangzhou".into(),
        };
        let (early, late) = (Uuid::new_v4(), Uuid::new_v4());
        let claim = |name: &'static str, job_id: Uuid| Claim {
            scope: &scope,
            name,
            job_id,
            quota: 10,
            ttl_ms: 60_000,
        };
        assert_eq!(
            registry.reserve(&claim("early", early)).await,
            Ok(Reserved::Fresh)
        );
        // Read at once, well inside the writer's linger: only the commit the read asks for
        // can show the reservation.
        assert!(
            matches!(
                registry.lookup(&scope, "early").await.unwrap(),
                Some(Entry::Reserved { job_id, .. }) if job_id == early
            ),
            "a reservation already answered is not read back"
        );
        assert_eq!(
            registry.reserve(&claim("late", late)).await,
            Ok(Reserved::Fresh)
        );
        assert_eq!(registry.quota_used(&scope).await.unwrap(), 2);
        assert_eq!(
            registry.reserve(&claim("later", Uuid::new_v4())).await,
            Ok(Reserved::Fresh)
        );
        drop(registry);
        let reopened = EmbeddedRegistry::open(&path).unwrap();
        assert!(
            matches!(
                reopened.lookup(&scope, "later").await.unwrap(),
                Some(Entry::Reserved { .. })
            ),
            "a reservation answered just before the registry closed was not kept"
        );
        assert_eq!(reopened.quota_used(&scope).await.unwrap(), 3);
    }

    /// A write that fails inside the storage engine spoils its transaction: the writes grouped
    /// with it still get an answer — that error, which they retry — and the file is not taken
    /// for damaged. (They were dropped unanswered once, which reads as a damaged file.)
    #[tokio::test]
    async fn a_failing_write_fails_the_writes_grouped_with_it_and_damages_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let registry = EmbeddedRegistry::open(&dir.path().join("state.redb")).unwrap();
        let scope = Scope {
            provider: Provider::Aliyun,
            owner: "acct".into(),
            region: "cn-hangzhou".into(),
        };
        let claim = Claim {
            scope: &scope,
            name: "victim",
            job_id: Uuid::new_v4(),
            quota: 10,
            ttl_ms: 60_000,
        };
        // Holds the writer, already past forming its group, while the next two are queued,
        // so that they form the next group together.
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        let busy = registry.queue_write(false, move |_| {
            started_tx.send(()).unwrap();
            go_rx.recv_timeout(Duration::from_secs(60)).unwrap();
            Ok(())
        });
        started.recv_timeout(Duration::from_secs(60)).unwrap();
        let spoiler = registry.queue_write(false, |_| -> Result<(), RegistryError> {
            Err(RegistryError::Storage("injected".into()))
        });
        let victim = registry.queue_reserve(&claim);
        go.send(()).unwrap();
        registry.written(busy).await.unwrap();
        assert_eq!(
            registry.written(spoiler).await,
            Err(RegistryError::Storage("injected".into()))
        );
        assert_eq!(
            registry.written(victim).await,
            Err(RegistryError::Storage("injected".into()))
        );
        assert!(registry.damage().is_none(), "{:?}", registry.damage());
        assert_eq!(registry.reserve(&claim).await, Ok(Reserved::Fresh));
    }

    async fn filled(path: &Path, pairs: usize) {
        let registry = EmbeddedRegistry::open(path).unwrap();
        let scope = Scope {
            provider: Provider::Aliyun,
            owner: "acct".into(),
            region: "cn-hangzhou".into(),
        };
        for i in 0..pairs {
            let (name, job) = (format!("pair-{i:04}"), Uuid::new_v4());
            registry
                .reserve(&Claim {
                    scope: &scope,
                    name: &name,
                    job_id: job,
                    quota: 1_000_000,
                    ttl_ms: 60_000,
                })
                .await
                .unwrap();
            registry.commit(&record(&scope, &name, job)).await.unwrap();
        }
        registry.flush().await.unwrap();
    }

    /// A panic inside redb (it asserts on damaged pages it reads) during a call: the call and
    /// every later one fail as a damaged state file naming it — never a retried storage error
    /// (which `run` answered rows with), never a crash.
    #[tokio::test]
    async fn a_panic_inside_redb_is_a_damaged_file_from_then_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        filled(&path, 3).await;
        let registry = EmbeddedRegistry::open(&path).unwrap();
        assert_eq!(
            registry.describe(&Filter::default()).await.unwrap().len(),
            3
        );
        assert!(registry.damage().is_none());
        let failed = registry
            .blocking(|_| -> Result<(), RegistryError> {
                // What redb 3 does on some damaged branch pages.
                unreachable!("a damaged page")
            })
            .await;
        let Err(RegistryError::Corrupt { path: named, .. }) = failed else {
            panic!("{failed:?}");
        };
        assert_eq!(named, path);
        assert!(registry.damage().is_some());
        let again = registry.describe(&Filter::default()).await;
        assert!(
            matches!(again, Err(RegistryError::Corrupt { .. })),
            "{again:?}"
        );
        let message = again.unwrap_err().to_string();
        assert!(
            message.contains(&path.display().to_string()) && message.contains("restore it"),
            "{message}"
        );
    }

    /// A value that does not decode is damage (not retried), named with the file.
    #[tokio::test]
    async fn an_entry_that_does_not_decode_is_a_damaged_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        filled(&path, 2).await;
        let registry = EmbeddedRegistry::open(&path).unwrap();
        registry
            .blocking(|db| {
                let txn = db.begin_write().map_err(storage)?;
                txn.open_table(ENTRIES)
                    .map_err(storage)?
                    .insert(
                        "aliyun:acct:cn-hangzhou\npair-0000",
                        b"{not json".as_slice(),
                    )
                    .map_err(storage)?;
                txn.commit().map_err(storage)
            })
            .await
            .unwrap();
        let listed = registry.describe(&Filter::default()).await;
        assert!(
            matches!(&listed, Err(RegistryError::Corrupt { path: p, .. }) if *p == path),
            "{listed:?}"
        );
    }
}
