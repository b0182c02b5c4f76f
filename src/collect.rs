//! `keyfleet collect`: drains a batch's results queue into the same output folder `run` writes
//! (key files + manifest). Resumable: it appends, skips jobs already written, and acks results
//! only once they are on disk. Stops when the batch is complete (per `keyfleet status`) or
//! after a quiet spell.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::BasicAckOptions;
use tokio_util::sync::CancellationToken;

use crate::batch_status::BatchStatusStore;
use crate::broker::{Broker, BrokerError};
use crate::dialect::Scope;
use crate::endpoints::Endpoints;
use crate::job::{set_private_key_body, take_private_key_body, JobResult};
use crate::output::OutputDir;
use crate::progress::{Progress, ProgressMode, Tally};
use crate::registry::redis::RedisRegistry;
use crate::registry::{Entry, Registry, RegistryError};
use crate::sink::key_files::KeyFileError;
use crate::sink::KeyFiles;

#[derive(Clone, Debug)]
pub struct CollectOptions {
    pub batch_id: String,
    pub out: PathBuf,
    /// The batch's age identity: decrypts the private keys (`transit.rs`).
    pub identity: PathBuf,
    pub endpoints: Endpoints,
    /// Stop after this long without a result (the batch may be incomplete; run again later).
    pub idle_timeout: Duration,
    pub progress: ProgressMode,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct CollectSummary {
    pub batch_id: String,
    #[serde(flatten)]
    pub tally: Tally,
    /// Results skipped because their job was already written, or superseded by a newer key.
    pub duplicates: u64,
    /// Created results whose key was not written: it did not decrypt with the batch's
    /// identity, or was not the registered key. Kept in `rejected.jsonl`.
    pub rejected: u64,
    /// Results of the batch written so far, this run and earlier ones.
    pub collected: u64,
    pub total: Option<u64>,
    pub complete: bool,
    pub manifest: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("Redis: {0}")]
    Redis(#[from] RegistryError),
    #[error(transparent)]
    Output(#[from] crate::output::OutputError),
    #[error("the batch's private keys are encrypted, and its identity file {0} does not exist: pass --identity FILE (`submit` wrote ./<batch-id>.age-identity where it ran)")]
    NoIdentity(PathBuf),
    #[error(transparent)]
    Transit(#[from] crate::transit::TransitError),
    #[error("a key file could not be written, so its result stays on the queue (fix the cause, then run collect again)")]
    KeyFile(#[source] KeyFileError),
}

/// Acks are sent in groups, each after the manifest lines they cover are synced.
const ACK_EVERY: usize = 64;

pub async fn collect(
    opts: CollectOptions,
    shutdown: CancellationToken,
) -> Result<CollectSummary, CollectError> {
    let e = &opts.endpoints;
    let broker = Broker::connect(&e.amqp_url, e.topology(), e.connect_timeout).await?;
    let collected = drain(&broker, opts, shutdown).await;
    // Also on an error: whatever was not acked goes back to the queue now, not when the
    // connection times out.
    broker.close().await;
    collected
}

/// Reads the batch's results queue until the batch is complete, or quiet, or stopped.
async fn drain(
    broker: &Broker,
    opts: CollectOptions,
    shutdown: CancellationToken,
) -> Result<CollectSummary, CollectError> {
    let e = &opts.endpoints;
    let registry = RedisRegistry::connect(&e.redis_url, &e.prefix, e.connect_timeout).await?;
    let status = BatchStatusStore::from_connection(registry.connection(), &e.prefix);
    broker.declare().await?;
    let queue = broker.declare_results_queue(&opts.batch_id).await?;
    broker.set_prefetch((ACK_EVERY * 4) as u16).await?;
    let (mut out, mut seen) = OutputDir::resume(&opts.out)?;
    let mut consumer = broker.consume(&queue).await?;

    let mut total = status.status(&opts.batch_id).await?.and_then(|s| s.total);
    let mut progress = Progress::new(opts.progress, total);
    let keys = Keys {
        files: out.keys().clone(),
        identity: match opts.identity.exists() {
            true => Some(crate::transit::read_identity(&opts.identity)?),
            false => None,
        },
        identity_path: opts.identity.clone(),
    };
    let mut counts = Counts::default();
    let mut unacked: Vec<lapin::Acker> = Vec::new();
    // Created results whose pair the registry does not yet hold as delivered: their worker
    // may still confirm them, or their job may come back and replace the pair. Held unacked.
    let mut held: Vec<(JobResult, lapin::Acker)> = Vec::new();
    let mut last_result = Instant::now();
    let mut checked_total = Instant::now();
    loop {
        if total.is_some_and(|t| seen.len() as u64 >= t) {
            break;
        }
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            next = tokio::time::timeout(Duration::from_millis(250), consumer.next()) => next,
        };
        match next {
            Ok(Some(delivery)) => {
                let delivery = delivery?;
                last_result = Instant::now();
                let mut result: JobResult = match serde_json::from_slice(&delivery.data) {
                    Ok(r) => r,
                    Err(e) => {
                        // Not keyfleet's result format: keep the bytes (they may hold a key,
                        // hence 0600) and go on, rather than stop on it forever.
                        tracing::error!("a message on the results queue is not a result: {e}");
                        out.keep_unreadable(&delivery.data)?;
                        unacked.push(delivery.acker);
                        continue;
                    }
                };
                let pem = take_private_key_body(result.provider, &mut result.response);
                if let Some(c) = result.created_mut() {
                    c.private_key = pem;
                }
                // A job already written is done, unless what was written is a failure and this
                // is a created pair: a failure may have been forged, or answered by an attempt
                // before the one that created the pair, which the registry then vouches for.
                let written = seen.get(&result.job_id).copied();
                let verdict =
                    if written == Some(true) || (written.is_some() && !result.is_created()) {
                        Verdict::Superseded
                    } else {
                        verdict(&registry, &status, &result, &shutdown).await?
                    };
                match verdict {
                    Verdict::Wait => held.push((result, delivery.acker)),
                    verdict => {
                        take(
                            &mut out,
                            &keys,
                            &mut seen,
                            &mut progress,
                            &mut counts,
                            result,
                            verdict,
                        )
                        .await?;
                        unacked.push(delivery.acker);
                    }
                }
                if unacked.len() >= ACK_EVERY {
                    ack_all(&mut out, &mut unacked).await?;
                }
            }
            Ok(None) => break,
            Err(_) => {
                let mut still = Vec::with_capacity(held.len());
                for (result, acker) in held.drain(..) {
                    match verdict(&registry, &status, &result, &shutdown).await? {
                        Verdict::Wait => still.push((result, acker)),
                        verdict => {
                            let (out, seen) = (&mut out, &mut seen);
                            take(
                                out,
                                &keys,
                                seen,
                                &mut progress,
                                &mut counts,
                                result,
                                verdict,
                            )
                            .await?;
                            unacked.push(acker);
                            last_result = Instant::now();
                        }
                    }
                }
                held = still;
                ack_all(&mut out, &mut unacked).await?;
                if checked_total.elapsed() > Duration::from_secs(1) {
                    // The total only decides when to stop: a Redis restart is ridden out.
                    match status.status(&opts.batch_id).await {
                        Ok(s) => total = s.and_then(|s| s.total).or(total),
                        Err(e) => tracing::warn!("batch status: {e}; trying again"),
                    }
                    checked_total = Instant::now();
                }
                if last_result.elapsed() >= opts.idle_timeout {
                    break;
                }
            }
        }
    }
    // One last look at what was held: superseded copies are acked away now rather than left
    // for the next collect.
    let mut still = Vec::new();
    for (result, acker) in held.drain(..) {
        match verdict(&registry, &status, &result, &shutdown).await? {
            Verdict::Superseded if seen.contains_key(&result.job_id) || result.is_created() => {
                counts.duplicates += 1;
                unacked.push(acker);
            }
            _ => still.push((result, acker)),
        }
    }
    let held = still;
    if !held.is_empty() {
        tracing::warn!(
            held = held.len(),
            "results not yet confirmed by the registry or the batch status were left on the queue; run collect again"
        );
    }
    // Dropped unacked: the broker keeps them for the next collect.
    drop(held);
    ack_all(&mut out, &mut unacked).await?;
    if let Ok(s) = status.status(&opts.batch_id).await {
        total = s.and_then(|s| s.total).or(total);
    }
    let manifest = out.finish()?;
    let (tally, _) = progress.finish();
    let collected = seen.len() as u64;
    Ok(CollectSummary {
        batch_id: opts.batch_id,
        tally,
        duplicates: counts.duplicates,
        rejected: counts.rejected,
        collected,
        total,
        complete: total.is_some_and(|t| collected >= t),
        manifest,
    })
}

async fn ack_all(out: &mut OutputDir, unacked: &mut Vec<lapin::Acker>) -> Result<(), CollectError> {
    if unacked.is_empty() {
        return Ok(());
    }
    out.sync()?;
    // One by one: results held back for the registry sit between these on the channel, so a
    // `multiple` ack would take them too.
    for acker in unacked.drain(..) {
        acker.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
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
        .and_then(|pem| crate::keygen::fingerprints_of_pem(&pem).ok())
        .is_some_and(|(_, fp)| fp == sha256)
}

/// Results dropped as superseded, and created results whose key was rejected.
#[derive(Default)]
struct Counts {
    duplicates: u64,
    rejected: u64,
}

/// How keys are read and written here.
struct Keys {
    files: KeyFiles,
    identity: Option<crate::transit::Identity>,
    identity_path: PathBuf,
}

/// Writes an accepted result (key file through the sink, then its manifest line), or drops a
/// superseded one, counting it. A created result whose key is rejected (it does not decrypt
/// with the batch's identity, or is not the key the registry holds: a forged result; the
/// genuine one may still come) is kept aside, not written, and counted.
async fn take(
    out: &mut OutputDir,
    keys: &Keys,
    seen: &mut crate::output::Written,
    progress: &mut Progress,
    counts: &mut Counts,
    mut result: JobResult,
    verdict: Verdict,
) -> Result<(), CollectError> {
    if verdict != Verdict::Accept {
        counts.duplicates += 1;
        return Ok(());
    }
    let mut key_file = None;
    if result.is_created() {
        match plaintext_key(keys, &mut result)? {
            Ok(()) => {}
            Err(why) => {
                tracing::error!(job = %result.job_id, "result not written: {why}");
                out.keep_rejected(&result, &why)?;
                counts.rejected += 1;
                return Ok(());
            }
        }
        let sha256 = result
            .created()
            .map(|c| c.fingerprint_sha256.clone())
            .unwrap_or_default();
        match keys.files.write(&mut result) {
            Ok(path) => key_file = Some(path),
            // Written by an earlier collect that stopped before its manifest line or ack.
            Err(KeyFileError::Exists(path)) if holds_key(&path, &sha256) => {
                set_private_key_body(
                    result.provider,
                    &mut result.response,
                    &path.to_string_lossy(),
                );
                key_file = Some(path);
            }
            // Not acked: the result stays on the queue for the next collect, and no key is lost.
            Err(e) => return Err(CollectError::KeyFile(e)),
        }
    }
    out.append(&result, key_file.as_deref())?;
    seen.insert(result.job_id, result.is_created());
    progress.record(&result);
    Ok(())
}

/// Turns the created result's key body into the plaintext PEM, checked against the
/// fingerprint the registry holds (the result's own, which `verdict` compared). The inner
/// `Err` is why the key is rejected.
fn plaintext_key(keys: &Keys, result: &mut JobResult) -> Result<Result<(), String>, CollectError> {
    let Some(created) = result.created_mut() else {
        return Ok(Ok(()));
    };
    let Some(body) = created.private_key.take() else {
        return Ok(Err("a created result without a private key".into()));
    };
    let pem = if crate::transit::is_sealed(&body.0) {
        let Some(identity) = &keys.identity else {
            return Err(CollectError::NoIdentity(keys.identity_path.clone()));
        };
        match crate::transit::open(identity, &body.0) {
            Ok(pem) => pem,
            Err(e) => return Ok(Err(e.to_string())),
        }
    } else {
        body.0
    };
    match crate::keygen::fingerprints_of_pem(&pem) {
        Ok((_, sha256)) if sha256 == created.fingerprint_sha256 => {}
        Ok(_) => return Ok(Err("the private key is not the registered key".into())),
        Err(e) => return Ok(Err(format!("not a private key: {e}"))),
    }
    created.private_key = Some(crate::job::SecretPem(pem));
    Ok(Ok(()))
}
