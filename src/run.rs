//! `keyfleet run`: the whole pipeline in one process on the embedded store. Rows stream from
//! the batch file through a bounded channel, at most `concurrency` jobs are in flight (keys are
//! made on the rayon pool), and results are delivered in input order to the output folder.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::batch::{self, Format, Row, RowDefaults};
use crate::cpu::CpuPool;
use crate::dialect::ApiError;
use crate::job::{now_rfc3339, JobResult};
use crate::output::OutputDir;
use crate::pipeline::{Outcome, Pipeline, Reservation, Settings, Stage, TransientError};
use crate::progress::{Progress, ProgressMode, Tally};
use crate::registry::embedded::EmbeddedRegistry;
use crate::registry::Registry;
use crate::upstream::{LocalUpstream, Upstream};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Batch(#[from] batch::BatchError),
    #[error(transparent)]
    Output(#[from] crate::output::OutputError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Cpu(#[from] crate::cpu::CpuError),
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

/// How many times an internal failure (storage, a lost reservation) is retried before the
/// row is answered with an internal error.
const ATTEMPTS: u32 = 3;

/// Runs a batch file through the pipeline on the embedded store.
pub async fn run(opts: RunOptions, shutdown: CancellationToken) -> Result<Summary, RunError> {
    let registry = Arc::new(EmbeddedRegistry::open(&opts.state)?);
    run_with(opts, registry, Arc::new(LocalUpstream), shutdown).await
}

/// [`run`] with the registry and upstream supplied (tests and benchmarks use this).
pub async fn run_with<R: Registry, U: Upstream>(
    opts: RunOptions,
    registry: Arc<R>,
    upstream: Arc<U>,
    shutdown: CancellationToken,
) -> Result<Summary, RunError> {
    // Fail on an unreadable input before creating anything.
    std::fs::File::open(&opts.input).map_err(|source| batch::BatchError::Io {
        path: opts.input.clone(),
        source,
    })?;
    let mut out = OutputDir::create(&opts.out)?;
    if let Some(old) = &out.rotated {
        tracing::info!("kept the previous manifest as {}", old.display());
    }
    let cpu = CpuPool::new(opts.threads)?;
    let threads = cpu.threads();
    let pipeline = Pipeline::new(registry, upstream, cpu, opts.settings.clone());

    // Enough jobs in flight to keep every rayon thread busy while results wait for their
    // turn in input order; small enough that memory does not depend on the batch size.
    let concurrency = threads * 4 + 4;
    let (rx, reader) =
        batch::spawn_reader(&opts.input, opts.format, &opts.defaults, concurrency * 2)?;

    let total = batch::count_rows(&opts.input, opts.format);
    let mut progress = Progress::new(opts.progress, total);
    let rows =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) })
            .take_until(shutdown.clone().cancelled_owned());
    let defaults = opts.defaults.clone();
    // Names are reserved one row at a time in input order (so the first of two rows with the
    // same name wins, as a reader of the file expects); keys are then made concurrently.
    let staged = rows.then(|row| {
        let pipeline = pipeline.clone();
        let defaults = defaults.clone();
        async move {
            (
                std::time::Instant::now(),
                stage(&pipeline, row, &defaults).await,
            )
        }
    });
    // Boxed so that dropping it below really drops the receiver, which releases the reader
    // thread if a signal stopped us before the end of the file.
    let mut results = Box::pin(
        staged
            .map(|(started, staged)| {
                let pipeline = pipeline.clone();
                async move {
                    let outcome = match staged {
                        Stage::Answered(outcome) => outcome,
                        Stage::Reserved(r) => make(&pipeline, r).await,
                    };
                    (started, outcome)
                }
            })
            .buffered(concurrency),
    );

    let mut flushed = std::time::Instant::now();
    while let Some((started, outcome)) = results.next().await {
        let result = deliver(&pipeline, &mut out, outcome).await?;
        let label = match &result.code {
            Some(code) => code.as_str(),
            None => "created",
        };
        crate::metrics::job_finished(result.provider.as_str(), label, started.elapsed());
        progress.record(&result);
        if flushed.elapsed() > Duration::from_secs(1) {
            out.flush()?;
            flushed = std::time::Instant::now();
        }
    }
    drop(results);
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

/// Turns a row into a reserved job or an answer, retrying internal failures.
async fn stage<R: Registry, U: Upstream>(
    pipeline: &Pipeline<R, U>,
    row: Row,
    defaults: &RowDefaults,
) -> Stage {
    let job = match row {
        Row::Job(job) => job,
        Row::Bad {
            line,
            provider,
            owner,
            reason,
        } => {
            return Stage::Answered(Outcome {
                result: JobResult::unparseable(
                    &defaults.batch_id,
                    Some(line),
                    provider,
                    &owner,
                    &reason,
                ),
                pending: None,
            })
        }
    };
    retrying(&job, 1, |attempt| pipeline.reserve(&job, attempt))
        .await
        .unwrap_or_else(|(attempt, e)| Stage::Answered(internal(&job, attempt, &e)))
}

/// Runs `op(attempt)` until it succeeds or fails internally [`ATTEMPTS`] times in all; then
/// the last attempt number and error.
async fn retrying<T, Fut>(
    job: &crate::job::Job,
    mut attempt: u32,
    mut op: impl FnMut(u32) -> Fut,
) -> Result<T, (u32, TransientError)>
where
    Fut: std::future::Future<Output = Result<T, TransientError>>,
{
    loop {
        match op(attempt).await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < ATTEMPTS => {
                tracing::warn!(
                    line = job.line,
                    attempt,
                    "retrying after internal error: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                attempt += 1;
            }
            Err(e) => return Err((attempt, e)),
        }
    }
}

/// Makes the key for a reserved job; an internal failure runs the whole job again (its
/// reservation is found by job id), up to [`ATTEMPTS`] times.
async fn make<R: Registry, U: Upstream>(pipeline: &Pipeline<R, U>, r: Box<Reservation>) -> Outcome {
    let (job, first_attempt) = (r.job.clone(), r.attempt);
    let mut reserved = Some(r);
    retrying(&job, first_attempt, |attempt| {
        let first = reserved.take();
        let job = &job;
        async move {
            match first {
                Some(r) => pipeline.make(r).await,
                None => pipeline.create(job, attempt).await,
            }
        }
    })
    .await
    .unwrap_or_else(|(attempt, e)| internal(&job, attempt, &e))
}

fn internal(job: &crate::job::Job, attempt: u32, e: &TransientError) -> Outcome {
    Outcome {
        result: JobResult::failed(
            job,
            &ApiError::Internal(e.to_string()),
            now_rfc3339(),
            attempt,
        ),
        pending: None,
    }
}

/// Writes the key file (if any), confirms or abandons the pair, and appends the manifest line.
async fn deliver<R: Registry, U: Upstream>(
    pipeline: &Pipeline<R, U>,
    out: &mut OutputDir,
    outcome: Outcome,
) -> Result<JobResult, RunError> {
    let Outcome {
        mut result,
        pending,
    } = outcome;
    let mut key_file = None;
    if let Some(p) = pending {
        match out.write_key(&mut result) {
            Ok(path) => {
                pipeline.confirm(&p).await?;
                key_file = Some(path);
            }
            Err(e) => {
                tracing::warn!(line = result.line, "{e}");
                result = pipeline.abandon(&p, result, &e.to_string()).await?;
            }
        }
    }
    out.append(&result, key_file.as_deref())?;
    Ok(result)
}
