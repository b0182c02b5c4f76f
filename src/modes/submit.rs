//! `keyfleet submit`: the producer. Reads a batch file, answers rows that fail validation at
//! once (as failed results, never enqueued), and publishes every other row as a persistent job
//! message with publisher confirms kept in flight, so enqueueing is not one round trip per job.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Instant;

use lapin::PublisherConfirm;
use tokio_util::sync::CancellationToken;

use crate::dialect::Catalog;
use crate::job::batch::{self, Format, RowDefaults};
use crate::job::jobs_per_message::{Cursor, JobsPerMessage};
use crate::job::packer::{self, Packed};
use crate::job::Job;
use crate::queue::broker::{self, Broker, BrokerError};
use crate::queue::endpoints::Endpoints;
use crate::registry::batch_status::BatchStatusStore;
use crate::registry::RegistryError;
use crate::sink::transit;
use crate::sink::{ResultsQueue, Sink};
use crate::telemetry::progress::{Progress, ProgressMode};

#[derive(Clone, Debug)]
pub struct SubmitOptions {
    pub input: PathBuf,
    pub format: Option<Format>,
    pub defaults: RowDefaults,
    pub catalog: Catalog,
    pub endpoints: Endpoints,
    pub progress: ProgressMode,
    /// Publisher confirms awaited at most this many messages behind.
    pub confirm_window: usize,
    /// Jobs packed into each message: 1 publishes v1 messages, more v2 ones.
    pub jobs_per_message: JobsPerMessage,
    /// Where private keys are encrypted to.
    pub keys_to: KeysTo,
}

/// Whom a batch's private keys are encrypted to.
#[derive(Clone, Debug)]
pub enum KeysTo {
    /// An identity file: read if it exists, created (0600) if not.
    IdentityFile(PathBuf),
    /// An age recipient (`age1…`) whose identity the user keeps.
    Recipient(String),
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct SubmitSummary {
    pub batch_id: String,
    pub rows: u64,
    pub enqueued: u64,
    /// Rows answered at once as failed results (invalid or unreadable).
    pub rejected: u64,
    pub seconds: f64,
    pub jobs_per_second: f64,
    pub interrupted: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Batch(#[from] batch::BatchError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("Redis")]
    Redis(#[from] RegistryError),
    #[error("answering an invalid row: {0}")]
    Answer(String),
    #[error(transparent)]
    Transit(#[from] crate::sink::transit::TransitError),
    /// The batch was published to before, its keys encrypted to another recipient.
    #[error("the keys of batch {batch:?} are encrypted to {recorded}, and {why}: pass that recipient's identity with --identity FILE")]
    OtherRecipient {
        batch: String,
        recorded: String,
        why: String,
    },
}

/// Runs of packed messages the reader thread may have ready ahead of publishing: 16 runs of
/// 32 messages of up to 32 jobs (`auto`) is 16,384 rows, ~4 MB encoded.
const RUNS_AHEAD: usize = 16;

/// Enqueues a batch; returns once every job is confirmed by the broker.
pub async fn submit(
    opts: SubmitOptions,
    shutdown: CancellationToken,
) -> Result<SubmitSummary, SubmitError> {
    let input = batch::BatchInput::open(&opts.input, opts.format)?;
    let batch_id = opts.defaults.batch_id.clone();
    let (broker, status, workers) = open_batch(&opts.endpoints, &batch_id, &opts.keys_to).await?;
    let plan = opts.jobs_per_message.for_workers(workers);

    // Rows are checked, packed and encoded on the reader thread (`job::packer`); this loop
    // publishes what it is handed and answers the rows that are not jobs.
    let (mut rx, reader) = packer::spawn_packer(
        input,
        &opts.defaults,
        opts.catalog.clone(),
        plan,
        RUNS_AHEAD,
    )?;

    let mut progress = Progress::of_batch(opts.progress, &opts.input, opts.format);
    let started = Instant::now();
    let mut window = ConfirmWindow::new(&opts.endpoints, opts.confirm_window, plan);
    let (mut rows, mut enqueued, mut rejected) = (0u64, 0u64, 0u64);
    let mut interrupted = false;
    'read: loop {
        let run = tokio::select! {
            _ = shutdown.cancelled() => { interrupted = true; break }
            run = rx.recv() => match run { Some(run) => run, None => break },
        };
        for packed in run {
            if shutdown.is_cancelled() {
                interrupted = true;
                break 'read;
            }
            match packed {
                Packed::Message {
                    payload,
                    message_id,
                    jobs,
                } => {
                    window
                        .publish_encoded(&broker, &payload, &message_id, &batch_id)
                        .await?;
                    rows += jobs;
                    enqueued += jobs;
                    progress.enqueue(jobs);
                }
                Packed::Answer(result) => {
                    let mut result = *result;
                    rows += 1;
                    // Answered here, through the same sink a worker answers with.
                    let sink = ResultsQueue::new(&broker, &status);
                    sink.deliver(&mut result)
                        .await
                        .map_err(|e| SubmitError::Answer(e.to_string()))?;
                    sink.settled(&batch_id, result.job_id, result.outcome_label())
                        .await?;
                    progress.record(&result);
                    rejected += 1;
                }
                Packed::Unencodable(e) => return Err(BrokerError::Encode(e).into()),
            }
        }
    }
    drop(rx);
    window.drain(&broker).await?;
    let read = batch::join_reader(&opts.input, reader);
    if !interrupted {
        read?;
    }
    status.set_total(&batch_id, rows).await?;
    progress.finish();
    broker.close().await;
    let seconds = started.elapsed().as_secs_f64();
    Ok(SubmitSummary {
        batch_id,
        rows,
        enqueued,
        rejected,
        seconds,
        jobs_per_second: rows as f64 / seconds.max(1e-9),
        interrupted,
    })
}

/// Connects for a batch and readies it for its first job: the topology declared, the batch's
/// recipient recorded (a worker refuses a job whose batch has none) and its results queue
/// declared (results are kept even before a collector runs). `rotate --submit` shares it.
/// Also returns how many workers consume the jobs queue now ([`Broker::declare`]).
pub async fn open_batch(
    e: &Endpoints,
    batch_id: &str,
    keys_to: &KeysTo,
) -> Result<(Broker, BatchStatusStore, u32), SubmitError> {
    let broker = Broker::connect_nodes(&e.amqp_url, 0, e.topology(), e.connect_timeout).await?;
    let status = BatchStatusStore::connect(&e.redis_url, &e.prefix, e.connect_timeout)
        .await?
        .with_replicas(e.redis_replicas);
    status.check_replicas(e.connect_timeout).await?;
    let workers = broker.declare().await?;
    // A batch published to before (a rerun) keeps its recipient: results already sealed to it
    // must stay readable, so another identity is refused, and none is made in its place.
    let recorded = status.recipient(batch_id).await?;
    let other = |why: String| SubmitError::OtherRecipient {
        batch: batch_id.to_owned(),
        recorded: recorded.clone().unwrap_or_default().trim().to_owned(),
        why,
    };
    let recipient = match (keys_to, &recorded) {
        (KeysTo::Recipient(r), _) => transit::parse_recipient(r)?,
        (KeysTo::IdentityFile(path), _) if path.exists() => {
            transit::read_identity(path)?.to_public()
        }
        (KeysTo::IdentityFile(path), None) => transit::create_identity(path)?,
        (KeysTo::IdentityFile(path), Some(_)) => {
            return Err(other(format!("its identity is not at {}", path.display())))
        }
    };
    if recorded
        .as_deref()
        .is_some_and(|r| r.trim() != recipient.to_string())
    {
        return Err(other(format!("the one given here is {recipient}")));
    }
    status
        .set_recipient(batch_id, &recipient.to_string())
        .await?;
    broker.declare_results_queue(batch_id).await?;
    Ok((broker, status, workers))
}

/// Jobs packed into messages and publisher confirms kept in flight: jobs are gathered until
/// the next message's size as `plan` says are waiting (one v1 message for a single job, a v2
/// message for several; [`crate::job::message`]), each message is published without waiting
/// for its confirm, and a confirm is awaited only when `size` messages are outstanding (and
/// all of them at the end).
pub struct ConfirmWindow {
    routing: String,
    size: usize,
    /// Where the jobs published since the last drain are in their plan.
    cursor: Cursor,
    gathered: Vec<Job>,
    waiting: VecDeque<PublisherConfirm>,
}

impl ConfirmWindow {
    pub fn new(e: &Endpoints, size: usize, plan: JobsPerMessage) -> Self {
        ConfirmWindow {
            routing: e.topology().jobs_routing_key(),
            size: size.max(1),
            cursor: Cursor::new(plan),
            gathered: Vec::with_capacity(plan.largest()),
            waiting: VecDeque::with_capacity(size.max(1)),
        }
    }

    /// Takes a job; it is published once its message is full (or at [`ConfirmWindow::drain`]).
    /// A job of another batch than the last one starts a message of its own, and the plan
    /// over; so does the first job after a drain (each wave of a rotation, and each
    /// re-publish of lost jobs, is spread over the workers as a batch of its own would be).
    pub async fn publish(&mut self, broker: &Broker, job: Job) -> Result<(), BrokerError> {
        if !self.cursor.on(&job.batch_id) {
            self.flush(broker).await?;
            self.cursor.start(&job.batch_id);
        }
        self.gathered.push(job);
        if self.gathered.len() >= self.cursor.size() {
            self.flush(broker).await?;
        }
        Ok(())
    }

    /// Publishes the jobs gathered so far as one message.
    async fn flush(&mut self, broker: &Broker) -> Result<(), BrokerError> {
        if self.gathered.is_empty() {
            return Ok(());
        }
        self.make_room().await?;
        self.waiting
            .push_back(broker.publish_jobs(&self.gathered).await?);
        self.cursor.sealed(self.gathered.len());
        self.gathered.clear();
        Ok(())
    }

    /// Publishes a message already packed and encoded ([`crate::job::packer`]), in the same
    /// window of confirms. Nothing may be gathered (`publish`) meanwhile: that message would
    /// go out after this one.
    pub async fn publish_encoded(
        &mut self,
        broker: &Broker,
        payload: &[u8],
        message_id: &str,
        batch_id: &str,
    ) -> Result<(), BrokerError> {
        debug_assert!(self.gathered.is_empty());
        self.make_room().await?;
        self.waiting.push_back(
            broker
                .publish_encoded_job(payload, message_id, batch_id)
                .await?,
        );
        Ok(())
    }

    /// Waits for the oldest confirm when `size` are outstanding.
    async fn make_room(&mut self) -> Result<(), BrokerError> {
        if self.waiting.len() >= self.size {
            if let Some(c) = self.waiting.pop_front() {
                broker::confirmed(c, &self.routing).await?;
            }
        }
        Ok(())
    }

    /// Publishes what is gathered and waits for every confirm still outstanding. What is
    /// published next starts the plan over.
    pub async fn drain(&mut self, broker: &Broker) -> Result<(), BrokerError> {
        self.flush(broker).await?;
        for c in self.waiting.drain(..) {
            broker::confirmed(c, &self.routing).await?;
        }
        self.cursor.restart();
        Ok(())
    }
}
