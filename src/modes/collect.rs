//! `keyfleet collect`: drains a batch's results queue into the same output folder `run` writes
//! (key files + manifest). Resumable: it appends, skips jobs already written, and acks results
//! only once they are on disk. Stops when the batch is complete (per `keyfleet status`) or
//! after a quiet spell.
//!
//! The rule: a result is acked only once what it carries is durable in the folder. Before it
//! consumes anything, collect checks that the batch exists, was not already collected
//! elsewhere, and that the identity it holds is the one the batch's keys are encrypted to; a
//! key it still cannot write (it does not decrypt, the disk is full, a permission) stays on the
//! queue for the next collect.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use lapin::options::BasicAckOptions;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::dialect::Scope;
use crate::job::results_message::{unpack_keys, ResultsMessage};
use crate::job::{set_private_key_body, take_private_key_body, JobResult};
use crate::queue::broker::{Broker, BrokerError};
use crate::queue::endpoints::Endpoints;
use crate::registry::batch_status::{BatchStatusStore, Collected};
use crate::registry::redis::RedisRegistry;
use crate::registry::{Entry, Registry, RegistryError};
use crate::sink::folder::OutputDir;
use crate::sink::key_files::KeyFileError;
use crate::sink::KeyFiles;
use crate::telemetry::progress::{Progress, ProgressMode, Tally};

#[derive(Clone, Debug)]
pub struct CollectOptions {
    pub batch_id: String,
    pub out: PathBuf,
    /// The batch's age identity file, when the user names one; otherwise it is looked for
    /// where `submit` puts it ([`crate::sink::transit::identity_candidates`]).
    pub identity: Option<PathBuf>,
    /// Keep an identity found in its default place once the batch is completely collected
    /// (it is removed otherwise: nothing needs it any more).
    pub keep_identity: bool,
    pub endpoints: Endpoints,
    /// Stop after this long without a result (the batch may be incomplete; run again later).
    pub idle_timeout: Duration,
    pub progress: ProgressMode,
    /// Stop once the folder holds a result for each of these jobs — a created pair where the
    /// value is true, any result where it is false — rather than when the batch's total is
    /// reached (`rotate --submit --wait` collects one wave at a time).
    pub until: Option<HashMap<Uuid, bool>>,
    /// What a mode adds to each manifest line (`rotate`: the pair a successor replaces).
    pub annotate: Option<Annotator>,
}

/// Fields a mode adds to a manifest line (never a private key).
pub type Annotation = serde_json::Map<String, serde_json::Value>;

/// What a mode adds to one result's manifest line.
pub type Annotate = dyn Fn(&JobResult) -> Option<Annotation> + Send + Sync;

/// The fields added to each result's manifest line, by result.
#[derive(Clone)]
pub struct Annotator(pub Arc<Annotate>);

impl std::fmt::Debug for Annotator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Annotator")
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct CollectSummary {
    pub batch_id: String,
    #[serde(flatten)]
    pub tally: Tally,
    /// Results skipped because their job was already written, or superseded by a newer key.
    pub duplicates: u64,
    /// Created results whose key was not the registered key (or no key): forged or damaged,
    /// kept in `rejected.jsonl`. The genuine result is still written when it comes.
    pub rejected: u64,
    /// Results left on the queue because their key could not be decrypted: the next collect
    /// with the right identity writes them.
    pub kept: u64,
    /// The identity file used, if the batch's keys are encrypted.
    pub identity: Option<PathBuf>,
    /// The identity file removed because the batch is now completely collected.
    pub identity_removed: Option<PathBuf>,
    /// Results of the batch written so far, this run and earlier ones.
    pub collected: u64,
    pub total: Option<u64>,
    pub complete: bool,
    pub manifest: PathBuf,
    /// Every job the folder answers, and whether its pair was created.
    #[serde(skip)]
    pub written: crate::sink::folder::Written,
}

impl CollectSummary {
    /// The report a person reads.
    pub fn render(&self) -> String {
        let t = &self.tally;
        let mut text = format!(
            "batch {}: collected {} results this run ({} created, {} failed), {} duplicates skipped\n",
            self.batch_id, t.rows, t.created, t.failed, self.duplicates
        );
        for (code, n) in &t.failed_by_code {
            text.push_str(&format!("  failed {code}: {n}\n"));
        }
        if self.rejected > 0 {
            text.push_str(&format!(
                "  rejected (not the registered key; kept in rejected.jsonl): {}\n",
                self.rejected
            ));
        }
        if self.kept > 0 {
            text.push_str(&format!(
                "  left on the queue (their keys did not decrypt with {}): {}\n",
                self.identity
                    .as_deref()
                    .map_or("no identity".into(), |p| p.display().to_string()),
                self.kept
            ));
        }
        let (collected, manifest) = (self.collected, self.manifest.display());
        text.push_str(&match self.total {
            Some(t) if self.complete => format!("complete: {collected}/{t} results in {manifest}\n"),
            None if self.complete => {
                format!("complete: every result waited for is in {manifest} ({collected} results)\n")
            }
            Some(t) => format!(
                "incomplete: {collected}/{t} results so far in {manifest} (run collect again to continue)\n"
            ),
            None => format!("{collected} results so far in {manifest} (total not known yet)\n"),
        });
        match (&self.identity_removed, &self.identity) {
            (Some(p), _) => text.push_str(&format!(
                "identity {} removed: every key of the batch is written (--keep-identity keeps it)\n",
                p.display()
            )),
            (None, Some(p)) if !self.complete => text.push_str(&format!(
                "identity: {} (keep it until the batch is collected)\n",
                p.display()
            )),
            _ => {}
        }
        text
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("RabbitMQ")]
    Amqp(#[from] lapin::Error),
    #[error("Redis")]
    Redis(#[from] RegistryError),
    #[error(transparent)]
    Output(#[from] crate::sink::folder::OutputError),
    #[error("no such batch {batch:?}: Redis (prefix {prefix:?}) holds no recipient, results count or collection record for it (a batch is forgotten 7 days after its last activity); nothing was read or created")]
    NoSuchBatch { batch: String, prefix: String },
    #[error("batch {batch:?} was already collected into {} ({results} results, {at}); each private key is delivered once, so its keys are there, not here", dir.display())]
    AlreadyCollected {
        batch: String,
        dir: PathBuf,
        results: u64,
        at: String,
    },
    #[error("the private keys of batch {batch:?} are encrypted, and its identity file is not in any of {}: pass --identity FILE", list(searched))]
    NoIdentity {
        batch: String,
        searched: Vec<PathBuf>,
    },
    #[error("identity file {} is not the identity of batch {batch:?} (its keys are encrypted to {recipient}); nothing was read: pass the batch's own identity with --identity FILE", path.display())]
    IdentityMismatch {
        path: PathBuf,
        batch: String,
        recipient: String,
    },
    #[error(transparent)]
    Transit(#[from] crate::sink::transit::TransitError),
    #[error("a key file could not be written, so its result stays on the queue (fix the cause, then run collect again)")]
    KeyFile(#[source] KeyFileError),
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Acks are sent in groups, each after the manifest lines they cover are synced.
const ACK_EVERY: usize = 64;

/// How long results may be held back for the registry before they are looked at again while
/// the queue keeps delivering (when it is quiet, [`quiet_spell`] decides): 20 ms for up to 64
/// held results, and 20 ms more for each 64 beyond, so that a registry that does not confirm
/// (thousands held) costs Redis at most ~3,200 lookups a second, not thousands every 20 ms.
fn recheck_after(held: &[Arrived]) -> Duration {
    let results: usize = held.iter().map(|m| m.results.len()).sum();
    Duration::from_millis(20)
        .saturating_mul(u32::try_from(results.div_ceil(64).max(1)).unwrap_or(u32::MAX))
}

pub async fn collect(
    opts: CollectOptions,
    shutdown: CancellationToken,
) -> Result<CollectSummary, CollectError> {
    let e = &opts.endpoints;
    let mut broker = Broker::connect_nodes(&e.amqp_url, 0, e.topology(), e.connect_timeout).await?;
    let collected = drain(&mut broker, opts, shutdown).await;
    // Also on an error: whatever was not acked goes back to the queue now, not when the
    // connection times out.
    broker.close().await;
    collected
}

/// Reads the batch's results queue until the batch is complete, or quiet, or stopped.
async fn drain(
    broker: &mut Broker,
    opts: CollectOptions,
    shutdown: CancellationToken,
) -> Result<CollectSummary, CollectError> {
    let e = &opts.endpoints;
    let registry = RedisRegistry::connect(&e.redis_url, &e.prefix, e.connect_timeout)
        .await?
        .with_replicas(e.redis_replicas);
    registry.check_replicas(e.connect_timeout).await?;
    let status = BatchStatusStore::from_connection(registry.connection(), &e.prefix);
    // Everything that would make this collect consume results it cannot write is checked
    // before the first one is read.
    let batch = &opts.batch_id;
    let known = status.status(batch).await?;
    let recipient = status.recipient(batch).await?;
    let collected_before = status.collected(batch).await?;
    if known.is_none() && recipient.is_none() && collected_before.is_none() {
        return Err(CollectError::NoSuchBatch {
            batch: batch.clone(),
            prefix: e.prefix.clone(),
        });
    }
    // Collected here already: nothing is left to decrypt, so its identity (removed then) is
    // not needed to say so.
    let done_here = collected_before
        .as_ref()
        .is_some_and(|c| Path::new(&c.dir) == folder_path(&opts.out));
    if let Some(c) = collected_before.filter(|_| !done_here) {
        return Err(CollectError::AlreadyCollected {
            batch: batch.clone(),
            dir: c.dir.into(),
            results: c.results,
            at: c.at,
        });
    }
    let identity = find_identity(&opts, recipient.as_deref(), !done_here)?;
    if let Some((path, _, _)) = &identity {
        tracing::info!("identity: {}", path.display());
    }
    broker.declare().await?;
    let queue = broker.declare_results_queue(batch).await?;
    broker.set_prefetch((ACK_EVERY * 4) as u16).await?;
    let (out, seen) = OutputDir::resume(&opts.out)?;
    let mut consumer = broker.consume(&queue).await?;

    let mut total = known.and_then(|s| s.total);
    let progress = Progress::new(opts.progress, total);
    let identity_path = identity.as_ref().map(|(p, _, _)| p.clone());
    let removable = identity.as_ref().is_some_and(|(_, _, default)| *default);
    let keys = Keys {
        files: out.keys().clone(),
        identity: identity.map(|(_, id, _)| id),
    };
    let mut desk = Desk {
        out,
        seen,
        progress,
        counts: Counts::default(),
        keys,
        annotate: opts.annotate.clone(),
    };
    let reached = |seen: &crate::sink::folder::Written, total: Option<u64>| match &opts.until {
        Some(until) => until
            .iter()
            .all(|(job, created)| seen.get(job).is_some_and(|c| *c || !created)),
        None => total.is_some_and(|t| seen.len() as u64 >= t),
    };
    // Messages whose keys could not be decrypted: never acked, so they stay on the queue.
    let mut kept: Vec<lapin::Acker> = Vec::new();
    let mut unacked: Vec<lapin::Acker> = Vec::new();
    // Messages holding a result the registry or the batch status does not yet vouch for
    // (a created pair not yet marked delivered, a failure not yet recorded): their worker
    // may still confirm them, or their job may come back and replace the pair. Held unacked,
    // whole: a message is acked only once every result in it is written or superseded.
    let mut held: Vec<Arrived> = Vec::new();
    let judge = Judge {
        registry: &registry,
        status: &status,
        shutdown: &shutdown,
    };
    let mut held_since = Instant::now();
    let mut last_result = Instant::now();
    let mut checked_total = Instant::now();
    loop {
        if reached(&desk.seen, total) {
            break;
        }
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            next = tokio::time::timeout(quiet_spell(&held), consumer.next()) => next,
        };
        // Each arm says whether it found the connection lost: reconnected below.
        let lost_connection = match next {
            Ok(lost @ (Some(Err(_)) | None)) => {
                match lost {
                    Some(Err(e)) => tracing::warn!("RabbitMQ consumer failed: {e}; reconnecting"),
                    _ => tracing::warn!("RabbitMQ consumer ended; reconnecting"),
                }
                true
            }
            Ok(Some(Ok(delivery))) => {
                // The messages that have arrived meanwhile join this one: one group, whose key
                // files share their syncs and whose registry lookups go out together. An error
                // stops the gathering; the consumer reports it again next.
                let mut deliveries = vec![delivery];
                while deliveries.len() < ACK_EVERY {
                    match consumer.next().now_or_never() {
                        Some(Some(Ok(d))) => deliveries.push(d),
                        _ => break,
                    }
                }
                last_result = Instant::now();
                let mut arrived = Vec::with_capacity(deliveries.len());
                for delivery in deliveries {
                    match desk.open(&delivery.data)? {
                        Opened::Results(results) => arrived.push(Arrived {
                            results,
                            acker: delivery.acker,
                        }),
                        Opened::Unreadable => unacked.push(delivery.acker),
                        Opened::Undecryptable => kept.push(delivery.acker),
                    }
                }
                if held.is_empty() {
                    held_since = Instant::now();
                }
                let still = desk
                    .judge_and_take(&judge, arrived, &mut unacked, &mut kept)
                    .await?;
                held.extend(still);
                // Results held a while are looked at again even while the queue is busy: at a
                // steady trickle it is never quiet, and they would wait for the batch's end.
                if !held.is_empty() && held_since.elapsed() >= recheck_after(&held) {
                    let waiting = std::mem::take(&mut held);
                    held = desk
                        .judge_and_take(&judge, waiting, &mut unacked, &mut kept)
                        .await?;
                    held_since = Instant::now();
                }
                unacked.len() >= ACK_EVERY && acks_lost(ack_all(&mut desk.out, &mut unacked).await?)
            }
            Err(_) => {
                let waiting = std::mem::take(&mut held);
                let before = desk.seen.len();
                held = desk
                    .judge_and_take(&judge, waiting, &mut unacked, &mut kept)
                    .await?;
                held_since = Instant::now();
                if desk.seen.len() > before {
                    last_result = Instant::now();
                }
                let lost = acks_lost(ack_all(&mut desk.out, &mut unacked).await?);
                if checked_total.elapsed() > Duration::from_secs(1) {
                    // The total only decides when to stop: a Redis restart is ridden out.
                    match status.status(&opts.batch_id).await {
                        Ok(s) => total = s.and_then(|s| s.total).or(total),
                        Err(e) => tracing::warn!("batch status: {e}; trying again"),
                    }
                    checked_total = Instant::now();
                }
                if last_result.elapsed() >= opts.idle_timeout && !lost {
                    break;
                }
                lost
            }
        };
        // The connection is lost (a RabbitMQ node restarted or died), found by the consumer or
        // by an ack that could not reach RabbitMQ: what was written is made durable, the
        // results not yet acked go back to the queue with the old channel (those already
        // written come back as duplicates and are acked away), and collecting goes on through
        // a new connection, the next node first.
        if lost_connection {
            desk.out.sync()?;
            unacked.clear();
            held.clear();
            kept.clear();
            match reconnect(broker, &opts, &shutdown).await? {
                Some(c) => consumer = c,
                None => break,
            }
        }
    }
    // One last look at what was held: messages whose every result is a superseded copy are
    // acked away now rather than left for the next collect.
    let mut still = Vec::new();
    for message in held.drain(..) {
        let verdicts =
            futures::future::try_join_all(message.results.iter().map(|r| judge.verdict(r))).await?;
        let stale = message.results.iter().zip(&verdicts).all(|(r, v)| {
            *v == Verdict::Superseded && (desk.seen.contains_key(&r.job_id) || r.is_created())
        });
        if stale {
            desk.counts.duplicates += message.results.len() as u64;
            unacked.push(message.acker);
        } else {
            still.push(message);
        }
    }
    let held = still;
    if !held.is_empty() {
        tracing::warn!(
            held = held.iter().map(|m| m.results.len()).sum::<usize>(),
            "results not yet confirmed by the registry or the batch status were left on the queue; run collect again"
        );
    }
    if !kept.is_empty() {
        tracing::error!(
            kept = kept.len(),
            "results whose private key could not be decrypted were left on the queue; run collect again with the batch's identity"
        );
    }
    // Dropped unacked: the broker keeps them for the next collect.
    drop(held);
    drop(kept);
    // Everything is written; an ack lost now leaves duplicates on the queue and fails the
    // collect, so that it is run again (and drops them) before the identity is removed.
    ack_all(&mut desk.out, &mut unacked).await??;
    if let Ok(s) = status.status(&opts.batch_id).await {
        total = s.and_then(|s| s.total).or(total);
    }
    let Desk {
        out,
        seen,
        progress,
        counts,
        ..
    } = desk;
    let manifest = out.finish()?;
    let (tally, _) = progress.finish();
    let collected = seen.len() as u64;
    let complete = reached(&seen, total);
    let mut identity_removed = None;
    if complete {
        let record = Collected {
            dir: folder_path(&opts.out).to_string_lossy().into_owned(),
            results: collected,
            at: crate::time::now_rfc3339(),
        };
        if let Err(e) = status.set_collected(&opts.batch_id, &record).await {
            tracing::warn!("could not record where the batch was collected: {e}");
        }
        if let (Some(path), true, false) = (&identity_path, removable, opts.keep_identity) {
            match std::fs::remove_file(path) {
                Ok(()) => identity_removed = Some(path.clone()),
                Err(e) => tracing::warn!("could not remove identity {}: {e}", path.display()),
            }
        }
    }
    Ok(CollectSummary {
        batch_id: opts.batch_id,
        tally,
        duplicates: counts.duplicates,
        rejected: counts.rejected,
        kept: counts.kept,
        identity: identity_path,
        identity_removed,
        collected,
        total,
        complete,
        manifest,
        written: seen,
    })
}

/// How long the queue may be quiet before held results are looked at again (and acks sent,
/// and the total checked). Short while results are held: their workers mark them delivered
/// within a millisecond of the confirm, and at the end of a batch the last results are
/// usually among them (a look costs one Redis round trip for the held results together).
fn quiet_spell<T>(held: &[T]) -> Duration {
    if held.is_empty() {
        Duration::from_millis(250)
    } else {
        Duration::from_millis(5)
    }
}

/// The output folder as recorded and compared: canonical once it exists.
fn folder_path(out: &Path) -> PathBuf {
    std::fs::canonicalize(out)
        .or_else(|_| std::path::absolute(out))
        .unwrap_or_else(|_| out.to_owned())
}

/// The batch's identity: the one named, or the first found where `submit` puts it, checked
/// against the recipient the batch's keys are encrypted to. Returns the path, the identity,
/// and whether it was found in a default place (and so may be removed once collected).
fn find_identity(
    opts: &CollectOptions,
    recipient: Option<&str>,
    needed: bool,
) -> Result<Option<(PathBuf, crate::sink::transit::Identity, bool)>, CollectError> {
    let (path, default) = match &opts.identity {
        // A batch without a recipient has nothing to decrypt: a missing file is no matter.
        Some(path) if recipient.is_none() && !path.exists() => (None, false),
        Some(path) => (Some(path.clone()), false),
        None => {
            let places = crate::sink::transit::identity_candidates(&opts.batch_id, &opts.out);
            match places.iter().find(|p| p.exists()) {
                Some(p) => (Some(p.clone()), true),
                None if recipient.is_some() && needed => {
                    return Err(CollectError::NoIdentity {
                        batch: opts.batch_id.clone(),
                        searched: places,
                    })
                }
                None => (None, true),
            }
        }
    };
    let Some(path) = path else {
        // A batch without a recipient: its keys travel in plaintext (a producer other than
        // `submit`, and a worker run with --allow-plaintext-results).
        return Ok(None);
    };
    let identity = crate::sink::transit::read_identity(&path)?;
    if let Some(r) = recipient {
        if identity.to_public().to_string() != r.trim() {
            return Err(CollectError::IdentityMismatch {
                path,
                batch: opts.batch_id.clone(),
                recipient: r.trim().to_owned(),
            });
        }
    }
    Ok(Some((path, identity, default)))
}

/// A connection for the rest of the batch after the last one was lost — the node after the
/// lost one first, tried until it works or `shutdown` — and a consumer of the batch's results
/// queue on it; `None` when stopped first. The old connection is closed.
async fn reconnect(
    broker: &mut Broker,
    opts: &CollectOptions,
    shutdown: &CancellationToken,
) -> Result<Option<lapin::Consumer>, CollectError> {
    let e = &opts.endpoints;
    let lost = broker.node();
    let fresh = crate::retry::RetryPolicy::reconnect()
        .run("reconnecting to RabbitMQ", shutdown, || async {
            let b = Broker::connect_nodes(&e.amqp_url, lost + 1, e.topology(), e.connect_timeout)
                .await?;
            b.declare().await?;
            let queue = b.declare_results_queue(&opts.batch_id).await?;
            b.set_prefetch((ACK_EVERY * 4) as u16).await?;
            let consumer = b.consume(&queue).await?;
            Ok::<_, BrokerError>((b, consumer))
        })
        .await;
    match fresh {
        Ok((b, consumer)) => {
            let old = std::mem::replace(broker, b);
            let _ = tokio::time::timeout(Duration::from_secs(2), old.close()).await;
            tracing::info!(node = %e.amqp_url.shown(broker.node()), "reconnected to RabbitMQ");
            Ok(Some(consumer))
        }
        Err(_) if shutdown.is_cancelled() => Ok(None),
        Err(err) => Err(err.into()),
    }
}

/// Acks the results written so far, once they are synced. The inner `Err` is an ack that could
/// not reach RabbitMQ: the channel went with its connection, and the messages not acked go
/// back to the queue with it (to come back as duplicates of what was written).
async fn ack_all(
    out: &mut OutputDir,
    unacked: &mut Vec<lapin::Acker>,
) -> Result<Result<(), lapin::Error>, CollectError> {
    if unacked.is_empty() {
        return Ok(Ok(()));
    }
    out.sync()?;
    // One by one: results held back for the registry sit between these on the channel, so a
    // `multiple` ack would take them too.
    for acker in unacked.drain(..) {
        if let Err(e) = acker.ack(BasicAckOptions::default()).await {
            return Ok(Err(e));
        }
    }
    Ok(Ok(()))
}

/// Whether acking found the connection lost (logged; collecting reconnects).
fn acks_lost(acked: Result<(), lapin::Error>) -> bool {
    match acked {
        Ok(()) => false,
        Err(e) => {
            tracing::warn!("acking written results failed: {e}; reconnecting");
            true
        }
    }
}

/// What to do with a result read from the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// Write it: a failure, or a created pair the registry holds, delivered, with this key.
    Accept,
    /// Drop it (its key unread): the job was written already, or its pair is no longer the
    /// one registered (the job came back after a worker died, and replaced it).
    Superseded,
    /// The registry holds this very pair but not yet as delivered (its worker has not
    /// confirmed it), or a failure is not yet recorded in the batch status. Decide later.
    Wait,
}

/// What a result is judged against: the registry and the batch status, the lookups retried
/// until `shutdown`.
struct Judge<'a> {
    registry: &'a RedisRegistry,
    status: &'a BatchStatusStore,
    shutdown: &'a CancellationToken,
}

impl Judge<'_> {
    async fn verdict(&self, r: &JobResult) -> Result<Verdict, RegistryError> {
        verdict(self.registry, self.status, r, self.shutdown).await
    }
}

/// A created result counts only once the registry holds its pair, for its job, with its
/// fingerprint, marked delivered: a key read before that may be replaced by its job's next
/// attempt, and the user would hold a key that is not registered.
///
/// A failed result counts only once the batch's status in Redis records that very outcome for
/// its job: whoever may publish to the results exchange could otherwise answer a job with a
/// failure and hide its key; only workers and `submit` write the batch status.
async fn verdict(
    registry: &RedisRegistry,
    status: &BatchStatusStore,
    r: &JobResult,
    shutdown: &CancellationToken,
) -> Result<Verdict, RegistryError> {
    let retry = crate::retry::RetryPolicy::queue();
    let Some(created) = r.created() else {
        let recorded = retry
            .run("batch status", shutdown, || {
                status.outcome(&r.batch_id, r.job_id)
            })
            .await?;
        return Ok(match recorded {
            None => Verdict::Wait,
            Some(o) if o == r.outcome_label() => Verdict::Accept,
            Some(_) => Verdict::Superseded,
        });
    };
    let (Some(name), Some(region)) = (&r.key_pair_name, &r.region) else {
        return Ok(Verdict::Superseded);
    };
    let scope = Scope {
        provider: r.provider,
        owner: r.owner.clone(),
        region: region.clone(),
    };
    // Retried like a worker's registry calls, so a Redis restart does not stop a collect.
    let entry = retry
        .run("registry lookup", shutdown, || {
            registry.lookup(&scope, name)
        })
        .await?;
    Ok(match entry {
        Some(Entry::Pair(record))
            if record.job_id == r.job_id
                && record.fingerprint_sha256 == created.fingerprint_sha256 =>
        {
            if record.delivered {
                Verdict::Accept
            } else {
                Verdict::Wait
            }
        }
        _ => Verdict::Superseded,
    })
}

/// Whether the key file at `path` holds the key with this SHA-256 fingerprint.
fn holds_key(path: &std::path::Path, sha256: &str) -> bool {
    std::fs::read_to_string(path)
        .map(zeroize::Zeroizing::new)
        .ok()
        .and_then(|pem| crate::keys::keygen::fingerprints_of_pem(&pem).ok())
        .is_some_and(|(_, fp)| fp == sha256)
}

/// Results dropped as superseded, created results whose key was rejected, and results left
/// on the queue.
#[derive(Default)]
struct Counts {
    duplicates: u64,
    rejected: u64,
    kept: u64,
}

/// Where taken results go, and what is counted of them.
struct Desk {
    out: OutputDir,
    seen: crate::sink::folder::Written,
    progress: Progress,
    counts: Counts,
    keys: Keys,
    annotate: Option<Annotator>,
}

/// How keys are read and written here.
struct Keys {
    files: KeyFiles,
    identity: Option<crate::sink::transit::Identity>,
}

/// What became of a result taken from the queue.
#[derive(Debug, PartialEq, Eq)]
enum Taken {
    /// Written (or dropped as superseded, or rejected as forged): ack it.
    Done,
    /// Its key could not be decrypted: leave it on the queue.
    Kept,
}

/// Why a created result's key is not written.
enum Refused {
    /// It is not the registered key, or no key: forged or damaged. Kept aside and acked; the
    /// genuine result is written when it comes.
    Rejected(String),
    /// It cannot be decrypted here: it stays on the queue for a collect that can.
    Undecryptable(String),
}

/// A result of a group on its way to the folder.
// Moved once, from the first pass over the group to the second: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Taking {
    Done(Taken),
    /// Its manifest line comes next; a created result's key file is being written.
    Line {
        result: JobResult,
        key_file: Option<KeyFileWrite>,
    },
}

/// A key file queued for writing, and the fingerprint of the key it holds.
struct KeyFileWrite {
    written: std::pin::Pin<Box<dyn Future<Output = Result<PathBuf, KeyFileError>> + Send>>,
    sha256: String,
}

/// A message taken from the results queue: its results (one for v1), their keys in
/// plaintext, and its acker.
struct Arrived {
    results: Vec<JobResult>,
    acker: lapin::Acker,
}

/// What a message read from the results queue turned out to be.
enum Opened {
    Results(Vec<JobResult>),
    /// Not a results message: kept aside in `unreadable.jsonl`, to be acked.
    Unreadable,
    /// A v2 message whose keys do not decrypt here: left on the queue.
    Undecryptable,
}

impl Desk {
    /// Reads a results message of either version; a v2 message's keys are decrypted (once for
    /// the message) and put into their results, as a v1 result's key is taken out of its body.
    fn open(&mut self, data: &[u8]) -> Result<Opened, CollectError> {
        let unreadable = |out: &OutputDir, why: &str| {
            // Not keyfleet's result format: keep the bytes (they may hold a key, hence 0600)
            // and go on, rather than stop on it forever.
            tracing::error!("a message on the results queue is not a result: {why}");
            out.keep_unreadable(data).map(|()| Opened::Unreadable)
        };
        let (mut results, private_keys) = match ResultsMessage::decode(data) {
            Err(e) => return Ok(unreadable(&self.out, &e.to_string())?),
            Ok(ResultsMessage::One(result)) => {
                let mut result = *result;
                let pem = take_private_key_body(result.provider, &mut result.response);
                if let Some(c) = result.created_mut() {
                    c.private_key = pem;
                }
                return Ok(Opened::Results(vec![result]));
            }
            Ok(ResultsMessage::Group {
                results,
                private_keys,
                ..
            }) => (results, private_keys),
        };
        let n = results.len();
        if n == 0 {
            return Ok(unreadable(
                &self.out,
                "a v2 results message without results",
            )?);
        }
        let keys = if private_keys.is_empty() {
            (0..n).map(|_| None).collect()
        } else {
            let plain = if crate::sink::transit::is_sealed(&private_keys) {
                let opened = match &self.keys.identity {
                    Some(identity) => crate::sink::transit::open_bytes(identity, &private_keys, 0)
                        .map_err(|e| e.to_string()),
                    None => Err(
                        "the keys are encrypted and the batch has no identity here (--identity FILE)"
                            .to_owned(),
                    ),
                };
                match opened {
                    Ok(plain) => plain,
                    Err(why) => {
                        tracing::error!(results = n, "message left on the queue: {why}");
                        self.counts.kept += n as u64;
                        return Ok(Opened::Undecryptable);
                    }
                }
            } else {
                zeroize::Zeroizing::new(private_keys.as_bytes().to_vec())
            };
            match unpack_keys(&plain, n) {
                Some(keys) => keys,
                None => {
                    return Ok(unreadable(
                        &self.out,
                        "its keys are not one a result (a v2 results message)",
                    )?)
                }
            }
        };
        for (result, key) in results.iter_mut().zip(keys) {
            if let Some(c) = result.created_mut() {
                c.private_key = key;
            }
        }
        Ok(Opened::Results(results))
    }

    /// Judges the results of `messages` (their registry and status lookups together) and
    /// takes those of every message none of whose results must wait: each such message is
    /// pushed to `unacked`, or to `kept` when a key of it could not be decrypted. Returns the
    /// messages that wait.
    async fn judge_and_take(
        &mut self,
        judge: &Judge<'_>,
        messages: Vec<Arrived>,
        unacked: &mut Vec<lapin::Acker>,
        kept: &mut Vec<lapin::Acker>,
    ) -> Result<Vec<Arrived>, CollectError> {
        if messages.is_empty() {
            return Ok(messages);
        }
        let seen = &self.seen;
        let verdicts =
            futures::future::try_join_all(messages.iter().flat_map(|m| m.results.iter()).map(
                |result| {
                    // A job already written is done, unless what was written is a failure and
                    // this is a created pair: a failure may have been forged, or answered by an
                    // attempt before the one that created the pair, which the registry then
                    // vouches for.
                    let written = seen.get(&result.job_id).copied();
                    let done = written == Some(true) || (written.is_some() && !result.is_created());
                    async move {
                        match done {
                            true => Ok(Verdict::Superseded),
                            false => judge.verdict(result).await,
                        }
                    }
                },
            ))
            .await?;
        let mut verdicts = verdicts.into_iter();
        let (mut waiting, mut taking, mut ackers) = (Vec::new(), Vec::new(), Vec::new());
        for message in messages {
            let mine: Vec<Verdict> = verdicts.by_ref().take(message.results.len()).collect();
            if mine.contains(&Verdict::Wait) {
                waiting.push(message);
                continue;
            }
            ackers.push((message.acker, message.results.len()));
            taking.extend(message.results.into_iter().zip(mine));
        }
        let mut taken = self.take(taking).await?.into_iter();
        for (acker, n) in ackers {
            // Every one of the message's n answers is consumed, whatever they are.
            let undecrypted = taken.by_ref().take(n).filter(|t| *t == Taken::Kept).count() > 0;
            if undecrypted {
                kept.push(acker);
            } else {
                unacked.push(acker);
            }
        }
        Ok(waiting)
    }

    /// Takes a group of results in their order: writes the accepted ones (their key files as
    /// one group through the sink, sharing its syncs, then their manifest lines in order),
    /// drops superseded ones, counting them. A created result whose key is not the key the
    /// registry holds (a forged result; the genuine one may still come) is kept aside, not
    /// written, and counted; one whose key does not decrypt is left on the queue
    /// ([`Taken::Kept`]). One answer per result, in order.
    async fn take(&mut self, group: Vec<(JobResult, Verdict)>) -> Result<Vec<Taken>, CollectError> {
        let Desk {
            out,
            seen,
            progress,
            counts,
            keys,
            annotate,
        } = self;
        // What this group writes, for a second result of one job in the same group.
        let mut writing = crate::sink::folder::Written::new();
        let mut taking = Vec::with_capacity(group.len());
        for (mut result, verdict) in group {
            let written = writing.get(&result.job_id).or(seen.get(&result.job_id));
            let superseded = written == Some(&true) || (written.is_some() && !result.is_created());
            if verdict != Verdict::Accept || superseded {
                counts.duplicates += 1;
                taking.push(Taking::Done(Taken::Done));
                continue;
            }
            let mut key_file = None;
            if result.is_created() {
                match plaintext_key(keys, &mut result) {
                    Ok(()) => {}
                    Err(Refused::Undecryptable(why)) => {
                        tracing::error!(job = %result.job_id, "result left on the queue: {why}");
                        counts.kept += 1;
                        taking.push(Taking::Done(Taken::Kept));
                        continue;
                    }
                    Err(Refused::Rejected(why)) => {
                        tracing::error!(job = %result.job_id, "result not written: {why}");
                        out.keep_rejected(&result, &why)?;
                        counts.rejected += 1;
                        taking.push(Taking::Done(Taken::Done));
                        continue;
                    }
                }
                let sha256 = result
                    .created()
                    .map(|c| c.fingerprint_sha256.clone())
                    .unwrap_or_default();
                key_file = Some(KeyFileWrite {
                    written: Box::pin(keys.files.write_queued(&mut result)),
                    sha256,
                });
            }
            writing.insert(result.job_id, result.is_created());
            taking.push(Taking::Line { result, key_file });
        }
        let mut taken = Vec::with_capacity(taking.len());
        for t in taking {
            let (mut result, key_file) = match t {
                Taking::Done(t) => {
                    taken.push(t);
                    continue;
                }
                Taking::Line { result, key_file } => (result, key_file),
            };
            let path = match key_file {
                None => None,
                Some(KeyFileWrite { written, sha256 }) => match written.await {
                    Ok(path) => Some(path),
                    // Written by an earlier collect that stopped before its manifest line or ack.
                    Err(KeyFileError::Exists(path)) if holds_key(&path, &sha256) => Some(path),
                    // Not acked: the result stays on the queue for the next collect, and no key
                    // is lost.
                    Err(e) => return Err(CollectError::KeyFile(e)),
                },
            };
            if let Some(path) = &path {
                set_private_key_body(
                    result.provider,
                    &mut result.response,
                    &path.to_string_lossy(),
                );
            }
            let extra = annotate
                .as_ref()
                .and_then(|a| (a.0)(&result))
                .unwrap_or_default();
            out.append_with(&result, path.as_deref(), &extra)?;
            seen.insert(result.job_id, result.is_created());
            progress.record(&result);
            taken.push(Taken::Done);
        }
        Ok(taken)
    }
}

/// Turns the created result's key body into the plaintext PEM, checked against the
/// fingerprint the registry holds (the result's own, which `verdict` compared). A key that
/// cannot be decrypted is put back, so the result still carries it when left on the queue.
fn plaintext_key(keys: &Keys, result: &mut JobResult) -> Result<(), Refused> {
    let Some(created) = result.created_mut() else {
        return Ok(());
    };
    let Some(body) = created.private_key.take() else {
        return Err(Refused::Rejected(
            "a created result without a private key".into(),
        ));
    };
    let pem = if crate::sink::transit::is_sealed(&body.0) {
        let Some(identity) = &keys.identity else {
            created.private_key = Some(body);
            return Err(Refused::Undecryptable(
                "the key is encrypted and the batch has no identity here (--identity FILE)".into(),
            ));
        };
        match crate::sink::transit::open(identity, &body.0) {
            Ok(pem) => pem,
            Err(e) => {
                created.private_key = Some(body);
                return Err(Refused::Undecryptable(e.to_string()));
            }
        }
    } else {
        body.0
    };
    match crate::keys::keygen::fingerprints_of_pem(&pem) {
        Ok((_, sha256)) if sha256 == created.fingerprint_sha256 => {}
        Ok(_) => {
            return Err(Refused::Rejected(
                "the private key is not the registered key".into(),
            ))
        }
        Err(e) => return Err(Refused::Rejected(format!("not a private key: {e}"))),
    }
    created.private_key = Some(crate::job::SecretPem(pem));
    Ok(())
}
