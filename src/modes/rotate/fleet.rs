//! `keyfleet rotate --submit`: a rotation through RabbitMQ and the workers, on the Redis
//! registry the fleet shares. The record, selection, headroom and waves are those of the
//! in-process rotation (`mod.rs`); the successors' jobs are published as one batch whose id is
//! the rotation's, and `--wait` collects each wave (`collect`, into one folder) before anything
//! is retired. Through the workers, a successor counts as delivered once its key is in that
//! folder, not merely on the results queue.
//!
//! A rerun never publishes a job id twice: a job published before may still be queued, and two
//! copies of one job must never be worked at once. A job RabbitMQ confirmed is waited for, not
//! published again, until it is answered. Only a job whose publication a crash cut short (not
//! known to be queued) or whose answer was a failure is published again, under a new id
//! recorded first ([`Member::next_publication`]); if the cut-short one was queued after all,
//! the registry gives the name to one of the two, the other answers `KeyPair.AlreadyExist`,
//! and the wait looks past that answer to the job that holds the name.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{
    annotator, begin, next_step, retire_delivered, row, status_of, successor_states, Begun, Next,
    RotateError, RotateOptions, RotateSummary, Successor,
};
use crate::job::batch::Row;
use crate::modes::collect::{self, CollectOptions};
use crate::modes::submit::{open_batch, ConfirmWindow, KeysTo};
use crate::queue::broker::Broker;
use crate::queue::endpoints::Endpoints;
use crate::registry::batch_status::BatchStatusStore;
use crate::registry::redis::RedisRegistry;
use crate::registry::rotation::Rotation;
use crate::registry::{Entry, Registry};
use crate::sink::folder::{OutputDir, Written};
use crate::telemetry::progress::Tally;
use crate::upstream::http::HttpUpstream;

/// What a rotation through the workers needs beyond [`RotateOptions`].
#[derive(Clone, Debug)]
pub struct FleetOptions {
    pub endpoints: Endpoints,
    /// Whom the successors' private keys are encrypted to on the results queue.
    pub keys_to: KeysTo,
    /// The identity `collect` decrypts with, when not where `rotate` puts it.
    pub identity: Option<PathBuf>,
    /// Removed once every successor's key is in the folder (the identity `rotate` made in a
    /// default place: nothing needs it afterwards).
    pub remove_identity: Option<PathBuf>,
    /// Collect the successors (and retire, with `--waves` / `--retire`); without it, publish
    /// and return (`keyfleet collect ROTATION-ID` collects them).
    pub wait: bool,
    /// Give up waiting after this long without a result (the workers are gone, or stuck).
    pub idle_timeout: Duration,
    pub confirm_window: usize,
    /// Jobs packed into each message (`submit --jobs-per-message`).
    pub jobs_per_message: crate::job::jobs_per_message::JobsPerMessage,
}

/// Runs (or resumes) a rotation through the workers.
pub async fn rotate(
    opts: RotateOptions,
    fleet: FleetOptions,
    registry: Arc<RedisRegistry>,
    cloud: Option<&HttpUpstream>,
    shutdown: CancellationToken,
) -> Result<RotateSummary, RotateError> {
    // The folder first: a rotation collects into one folder, and its rerun must find it.
    let (out, mut written) = OutputDir::resume(&opts.out)?;
    let manifest = out.manifest_path().to_owned();
    drop(out);
    let dir = std::fs::canonicalize(&opts.out)
        .unwrap_or_else(|_| opts.out.clone())
        .to_string_lossy()
        .into_owned();
    let (mut rotation, resumed, headroom) =
        match begin(&*registry, &opts, Some((&dir, &written))).await? {
            Begun::Finished(summary) => return Ok(*summary),
            Begun::Go {
                rotation,
                resumed,
                headroom,
            } => (rotation, resumed, headroom),
        };
    let id = rotation.id.clone();
    // Opened when a job is first published: a rerun with nothing to publish (only keys to
    // collect, or pairs to retire) needs neither RabbitMQ's jobs queue nor the identity.
    let mut publisher = Publisher {
        endpoints: &fleet.endpoints,
        keys_to: &fleet.keys_to,
        key_bits: opts.key_bits,
        window: ConfirmWindow::new(
            &fleet.endpoints,
            fleet.confirm_window,
            fleet.jobs_per_message,
        ),
        broker: None,
    };
    let status = BatchStatusStore::from_connection(registry.connection(), &fleet.endpoints.prefix);

    let mut listed = vec![false; rotation.members.len()];
    let (mut waves, mut retired, mut enqueued) = (0, 0, 0);
    let mut tally = Tally::default();
    let mut stuck = None;
    let mut incomplete = false;
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        let next = next_step(
            &*registry,
            cloud,
            &opts,
            &mut rotation,
            Some(&written),
            &listed,
            &mut retired,
        )
        .await?;
        let (wave, states) = match next {
            Next::Wave { members, states } => (members, states),
            Next::Done => break,
            Next::Stuck(e) => {
                stuck = Some(e);
                break;
            }
        };
        waves += 1;
        for &i in &wave {
            listed[i] = true;
        }
        // A successor that is missing, or taken by another pair (its row answers
        // `KeyPair.AlreadyExist`), gets a job — unless its current job is confirmed queued and
        // not yet answered: that one is waited for, as is a successor one of its jobs holds.
        let publish: Vec<usize> = wave
            .iter()
            .copied()
            .filter(|&i| {
                let m = &rotation.members[i];
                let queued = m.published > 0 && !m.publishing;
                matches!(states[i], Successor::Missing | Successor::Taken)
                    && (!queued || written.contains_key(&m.successor_job_id))
            })
            .collect();
        enqueued += publisher
            .publish(&registry, &mut rotation, &publish)
            .await?;
        if !fleet.wait {
            continue;
        }
        // Collected; if the results stop for --idle-timeout, the jobs that answered nothing
        // and hold nothing are lost (dead-lettered after too many deliveries, or their queue
        // purged): published again under new ids, once, and waited for again. Should a lost
        // one turn up after all, the registry picks one of the two.
        let mut collected = false;
        for attempt in 0..2 {
            if attempt > 0 {
                let states = successor_states(&*registry, &rotation, Some(&written)).await?;
                let lost: Vec<usize> = wave
                    .iter()
                    .copied()
                    .filter(|&i| {
                        states[i] == Successor::Missing
                            && !written.contains_key(&rotation.members[i].successor_job_id)
                    })
                    .collect();
                if lost.is_empty() {
                    break;
                }
                tracing::warn!(
                    "rotation {id}: {} successor job(s) did not answer within --idle-timeout and hold nothing: publishing them again",
                    lost.len()
                );
                enqueued += publisher.publish(&registry, &mut rotation, &lost).await?;
            }
            collected = settle(
                &registry,
                &opts,
                &fleet,
                &rotation,
                &wave,
                &mut written,
                &mut tally,
                &shutdown,
            )
            .await?;
            if collected || shutdown.is_cancelled() {
                break;
            }
        }
        note_failures(&status, &mut rotation, &wave, &written).await?;
        registry.save_rotation(&rotation).await?;
        if !collected {
            incomplete = !shutdown.is_cancelled();
            break;
        }
        if opts.waves {
            let states = successor_states(&*registry, &rotation, Some(&written)).await?;
            retired += retire_delivered(&*registry, cloud, &mut rotation, &states).await?;
        }
    }
    publisher.close().await;
    if let Some(e) = stuck {
        return Err(e);
    }
    let interrupted = shutdown.is_cancelled();
    let mut states = successor_states(&*registry, &rotation, Some(&written)).await?;
    let all_in_folder = states.iter().all(|s| *s == Successor::Delivered);
    if fleet.wait && opts.retire && !interrupted && !incomplete {
        if all_in_folder {
            retired += retire_delivered(&*registry, cloud, &mut rotation, &states).await?;
            states = successor_states(&*registry, &rotation, Some(&written)).await?;
        } else {
            tracing::warn!(
                "rotation {id}: not retiring: some successors are not delivered (see `keyfleet status {id}`)"
            );
        }
    }
    if fleet.wait && all_in_folder {
        if let Some(path) = &fleet.remove_identity {
            match std::fs::remove_file(path) {
                Ok(()) => tracing::info!(
                    "identity {} removed: every successor's key is in the folder",
                    path.display()
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("could not remove identity {}: {e}", path.display()),
            }
        }
    }
    Ok(RotateSummary {
        rotation_id: id,
        resumed,
        already_finished: false,
        headroom,
        waves,
        enqueued,
        tally,
        retired,
        status: status_of(&rotation, &states),
        manifest: fleet.wait.then_some(manifest),
        interrupted,
        incomplete,
    })
}

/// Publishes successors' jobs for a rotation: the batch opened on first use.
struct Publisher<'a> {
    endpoints: &'a Endpoints,
    keys_to: &'a KeysTo,
    key_bits: crate::keys::keygen::KeyBits,
    window: ConfirmWindow,
    broker: Option<Broker>,
}

impl Publisher<'_> {
    /// Publishes a job for each of `members` (a new id for one published before), recorded
    /// before it is published and confirmed after; returns how many.
    async fn publish(
        &mut self,
        registry: &RedisRegistry,
        rotation: &mut Rotation,
        members: &[usize],
    ) -> Result<u64, RotateError> {
        if members.is_empty() {
            return Ok(0);
        }
        let broker = match &mut self.broker {
            Some(b) => b,
            None => {
                let (b, _, _) = open_batch(self.endpoints, &rotation.id, self.keys_to).await?;
                self.broker.insert(b)
            }
        };
        for &i in members {
            rotation.members[i].next_publication();
        }
        // Recorded before publishing: every job id a worker may answer is the rotation's.
        registry.save_rotation(rotation).await?;
        for &i in members {
            if let Row::Job(job) = row(rotation, i, self.key_bits) {
                self.window.publish(broker, job).await?;
            }
        }
        self.window.drain(broker).await?;
        for &i in members {
            rotation.members[i].confirmed();
        }
        registry.save_rotation(rotation).await?;
        Ok(members.len() as u64)
    }

    async fn close(self) {
        if let Some(b) = self.broker {
            b.close().await;
        }
    }
}

/// Collects the wave's successors into the folder: each member is waited for through the job
/// that holds its name (an earlier one of its jobs, after a rerun), or through its current job
/// when none does. Returns false when the results stopped coming for `--idle-timeout`, or a
/// signal came, first.
#[allow(clippy::too_many_arguments)]
async fn settle(
    registry: &RedisRegistry,
    opts: &RotateOptions,
    fleet: &FleetOptions,
    rotation: &Rotation,
    wave: &[usize],
    written: &mut Written,
    tally: &mut Tally,
    shutdown: &CancellationToken,
) -> Result<bool, RotateError> {
    let annotate = annotator(rotation.clone());
    loop {
        let until = awaited(registry, rotation, wave.iter().copied(), written).await?;
        if until.is_empty() {
            return Ok(true);
        }
        if shutdown.is_cancelled() {
            return Ok(false);
        }
        let c = collect::collect(
            CollectOptions {
                batch_id: rotation.id.clone(),
                out: opts.out.clone(),
                identity: fleet.identity.clone(),
                keep_identity: true,
                endpoints: fleet.endpoints.clone(),
                idle_timeout: fleet.idle_timeout,
                progress: opts.progress,
                until: Some(until.clone()),
                annotate: Some(annotate.clone()),
            },
            shutdown.clone(),
        )
        .await?;
        tally.merge(&c.tally);
        *written = c.written;
        let reached = until
            .iter()
            .all(|(job, created)| written.get(job).is_some_and(|c| *c || !created));
        if !reached {
            return Ok(false);
        }
    }
}

/// What the folder still waits for, for each of `members`: the job that holds its successor's
/// name (an earlier one of its jobs, after a rerun) — its key, once the pair is registered —
/// or, when none does, an answer of its current job. The stop set of `collect` (`until`).
pub async fn awaited(
    registry: &RedisRegistry,
    rotation: &Rotation,
    members: impl IntoIterator<Item = usize>,
    written: &Written,
) -> Result<HashMap<Uuid, bool>, crate::registry::RegistryError> {
    let mut until = HashMap::new();
    for i in members {
        let m = &rotation.members[i];
        let entry = registry.lookup(&m.scope, &m.successor).await?;
        let (job, created) = match entry {
            // Its pair: wait for the key.
            Some(Entry::Pair(r)) if m.is_job(r.job_id) => (r.job_id, true),
            // Being worked on: wait for its answer (a created pair, if a failure of the same
            // job is written already).
            Some(Entry::Reserved { job_id, .. }) if m.is_job(job_id) => {
                (job_id, written.contains_key(&job_id))
            }
            _ => (m.successor_job_id, false),
        };
        let done = written.get(&job).is_some_and(|c| *c || !created);
        if !done {
            until.insert(job, created);
        }
    }
    Ok(until)
}

/// Records, for `status`, the error each member of the wave whose successor is not in the
/// folder last failed with (its current job's outcome, from the batch status).
async fn note_failures(
    status: &BatchStatusStore,
    rotation: &mut Rotation,
    wave: &[usize],
    written: &Written,
) -> Result<(), RotateError> {
    for &i in wave {
        let m = &mut rotation.members[i];
        let in_folder = m
            .earlier_job_ids
            .iter()
            .chain(std::iter::once(&m.successor_job_id))
            .any(|j| written.get(j) == Some(&true));
        m.failed = match in_folder {
            true => None,
            false => status
                .outcome(&rotation.id, m.successor_job_id)
                .await?
                .filter(|o| o != crate::job::CREATED && o != crate::job::DELIVERED_EARLIER),
        };
    }
    Ok(())
}
