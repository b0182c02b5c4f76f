//! `keyfleet run`: the job lifecycle in one process on the embedded store. Rows stream from the
//! batch file through a bounded channel, at most `concurrency` jobs are in flight (keys are made
//! on the rayon pool), key files are the sink, and the manifest lists results in input order.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::job::batch::{self, Format, Row, RowDefaults};
use crate::job::JobResult;
use crate::keys::cpu::CpuPool;
use crate::lifecycle::{Admission, Finished, Lifecycle};
use crate::registry::embedded::EmbeddedRegistry;
use crate::registry::Registry;
use crate::reservoir::Reservoir;
use crate::retry::RetryPolicy;
use crate::settings::Settings;
use crate::sink::folder::OutputDir;
use crate::telemetry::progress::{Progress, ProgressMode, Tally};
use crate::upstream::{LocalUpstream, Upstream};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Batch(#[from] batch::BatchError),
    #[error(transparent)]
    Output(#[from] crate::sink::folder::OutputError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Cpu(#[from] crate::keys::cpu::CpuError),
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub input: PathBuf,
    pub format: Option<Format>,
    pub out: PathBuf,
    pub state: PathBuf,
    /// Rayon threads; 0 = one per core.
    pub threads: usize,
    pub defaults: RowDefaults,
    pub settings: Settings,
    pub progress: ProgressMode,
    /// Keys made ahead, taken before the rayon pool is asked (`bench --pipeline --pooled`
    /// times the plumbing alone this way); `None` for a plain run.
    pub reservoir: Option<Reservoir>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    #[serde(flatten)]
    pub tally: Tally,
    pub seconds: f64,
    pub keys_per_second: f64,
    pub threads: usize,
    pub manifest: PathBuf,
    /// A signal stopped the run before the whole batch was read.
    pub interrupted: bool,
}

impl Summary {
    /// The report a person reads.
    pub fn render(&self) -> String {
        let t = &self.tally;
        let mut out = format!(
            "{} rows: {} created, {} failed in {:.1} s ({:.1} keys/s on {} threads)\n",
            t.rows, t.created, t.failed, self.seconds, self.keys_per_second, self.threads
        );
        if t.delivered_earlier > 0 {
            out.push_str(&format!(
                "  delivered by an earlier run of this batch (listed again): {}\n",
                t.delivered_earlier
            ));
        }
        for (code, n) in &t.failed_by_code {
            out.push_str(&format!("  failed {code}: {n}\n"));
        }
        out.push_str(&format!("manifest: {}\n", self.manifest.display()));
        if self.interrupted {
            out.push_str(
                "interrupted: rows after the last one in the manifest were not processed\n",
            );
        }
        out
    }
}

/// Jobs in flight in a pass on `threads` key-generation threads. 256 more than the threads
/// need: with the keys made ahead (`bench --pipeline --pooled`, 4,000 keys) the plumbing
/// alone moved from 2,933 keys/s with 64 more to 3,441 with 256 (its groups grow with the jobs
/// in flight), and 512 gave no more (3,270).
pub fn concurrency(threads: usize) -> usize {
    threads * 4 + 256
}

/// At most this many rows already read are admitted (their names reserved) together.
const ADMITTED_TOGETHER: usize = 64;

/// Admits the jobs of `rows` together, in their order; a bad row stays in its place.
async fn admit_in_order<R: Registry, U: Upstream>(
    lifecycle: &Lifecycle<R, U>,
    rows: Vec<Row>,
) -> Vec<Result<Admission, batch::BadRow>> {
    let mut jobs = Vec::new();
    let mut places = Vec::with_capacity(rows.len());
    for row in rows {
        match row {
            Row::Job(job) => {
                jobs.push(job);
                places.push(None);
            }
            Row::Bad(bad) => places.push(Some(bad)),
        }
    }
    let mut admitted = lifecycle.admit_many(jobs, 1).await.into_iter();
    places
        .into_iter()
        .filter_map(|place| match place {
            Some(bad) => Some(Err(bad)),
            None => admitted.next().map(Ok),
        })
        .collect()
}

/// What a mode adds to a result's manifest line (`rotate`: the pair it replaces), by result.
pub type Annotate<'a> =
    dyn Fn(&JobResult) -> Option<serde_json::Map<String, serde_json::Value>> + Sync + 'a;

/// One pass of `rows` through the lifecycle into `out`: names admitted in input order, keys
/// made concurrently, one manifest line per row in input order (with what `annotate` adds).
/// `run` makes one pass per batch; `rotate` one per wave, into the same folder.
pub async fn pass<R: Registry, U: Upstream>(
    lifecycle: &Lifecycle<R, U>,
    out: &mut OutputDir,
    rows: impl futures::Stream<Item = Row>,
    progress: &mut Progress,
    concurrency: usize,
    annotate: &Annotate<'_>,
) -> Result<(), RunError> {
    let keys = out.keys().clone();
    // Names are admitted in input order (so the first of two rows with the same name wins, as
    // a reader of the file expects), the rows read so far together; keys are then made
    // concurrently, and `buffered` hands the finished jobs back in input order for the
    // manifest.
    let admitted = rows
        .ready_chunks(ADMITTED_TOGETHER)
        .then(|chunk| {
            let lifecycle = lifecycle.clone();
            async move { admit_in_order(&lifecycle, chunk).await }
        })
        .flat_map(futures::stream::iter);
    // Boxed so that dropping it below really drops the receiver, which releases the reader
    // thread if a signal stopped us before the end of the file.
    let mut finished = Box::pin(
        admitted
            .map(|admission| {
                let (lifecycle, keys) = (lifecycle.clone(), keys.clone());
                async move {
                    match admission {
                        Ok(admission) => lifecycle.complete(admission, &keys).await,
                        Err(bad) => lifecycle.answer(bad.into_result(), &keys).await,
                    }
                }
            })
            .buffered(concurrency),
    );

    let mut flushed = std::time::Instant::now();
    while let Some(finished) = finished.next().await {
        let result = match finished {
            Finished::Delivered(result) | Finished::Undeliverable { result, .. } => result,
            // The embedded policy answers instead of handing back, and a file's rows are
            // answered every run, and key files are never gone: none of these ends here.
            Finished::AnsweredBefore | Finished::HandBack(_) | Finished::Abandoned => continue,
        };
        // A damaged state file stops the run: rows it failed are not answered with it (pairs
        // created before it was found are real, and listed).
        if !result.is_created() {
            if let Some(damage) = lifecycle.registry().damage() {
                return Err(damage.into());
            }
        }
        let key_file = result.is_created().then(|| keys.path(&result));
        match annotate(&result) {
            Some(extra) => out.append_with(&result, key_file.as_deref(), &extra)?,
            None => out.append(&result, key_file.as_deref())?,
        }
        progress.record(&result);
        if flushed.elapsed() > Duration::from_secs(1) {
            out.flush()?;
            flushed = std::time::Instant::now();
        }
    }
    Ok(())
}

/// Runs a batch file through the pipeline on the embedded store, registering with `upstream`
/// ([`LocalUpstream`] unless a cloud is configured). The run's threads are batch-scheduled
/// (`scheduling.rs`): opened here, the state file's writer is one of them.
pub async fn run<U: Upstream>(
    opts: RunOptions,
    upstream: Arc<U>,
    shutdown: CancellationToken,
) -> Result<Summary, RunError> {
    let _batch = crate::scheduling::batch();
    let registry = Arc::new(EmbeddedRegistry::open(&opts.state)?);
    run_with(opts, registry, upstream, shutdown).await
}

/// [`run`] on this machine alone: no cloud.
pub async fn run_locally(
    opts: RunOptions,
    shutdown: CancellationToken,
) -> Result<Summary, RunError> {
    run(opts, Arc::new(LocalUpstream), shutdown).await
}

/// [`run`] with the registry and upstream supplied (tests and benchmarks use this).
pub async fn run_with<R: Registry, U: Upstream>(
    opts: RunOptions,
    registry: Arc<R>,
    upstream: Arc<U>,
    shutdown: CancellationToken,
) -> Result<Summary, RunError> {
    // Fail on an unreadable input or a bad header before creating anything.
    let input = batch::BatchInput::open(&opts.input, opts.format)?;
    let mut out = OutputDir::create(&opts.out)?;
    if let Some(old) = &out.rotated {
        tracing::info!("kept the previous manifest as {}", old.display());
    }
    let cpu = CpuPool::new(opts.threads)?;
    let threads = cpu.threads();
    // Rows already read are finished even after a signal; the policy's waits end early then.
    let mut lifecycle = Lifecycle::new(
        registry,
        upstream,
        cpu,
        opts.settings.clone(),
        RetryPolicy::embedded(),
        shutdown.child_token(),
    );
    if let Some(reservoir) = opts.reservoir.clone() {
        lifecycle = lifecycle.with_reservoir(reservoir);
    }

    // Enough jobs in flight to keep every rayon thread busy while results wait for their
    // turn in input order, and for the writes of many jobs to share a group commit (state
    // file and key files); small enough that memory does not depend on the batch size (a
    // job in flight holds one key, a few KiB).
    let concurrency = concurrency(threads);
    let (rx, reader) = batch::spawn_reader(input, &opts.defaults, concurrency * 2)?;

    let mut progress = Progress::of_batch(opts.progress, &opts.input, opts.format);
    let rows =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) })
            .take_until(shutdown.clone().cancelled_owned());
    pass(
        &lifecycle,
        &mut out,
        rows,
        &mut progress,
        concurrency,
        &|_: &JobResult| None,
    )
    .await?;
    // The last rows' "delivered" marks are not synced on their own (`registry/embedded.rs`).
    lifecycle.registry().flush().await?;
    let interrupted = shutdown.is_cancelled();
    let read = batch::join_reader(&opts.input, reader);
    if !interrupted {
        read?;
    }
    let manifest = out.finish()?;
    let (tally, elapsed) = progress.finish();
    let seconds = elapsed.as_secs_f64();
    Ok(Summary {
        keys_per_second: tally.created as f64 / seconds.max(1e-9),
        tally,
        seconds,
        threads,
        manifest,
        interrupted,
    })
}
