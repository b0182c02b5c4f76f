//! The distributed-mode worker: consumes job messages (v1: one job, v2: several) from RabbitMQ,
//! runs each job through the pipeline (keys on the rayon pool, quota in Redis, upstream
//! rate-limited), publishes each result with a confirm, and only then acks the message.
//! Survives broker and Redis restarts; drains on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dialect::Provider;
use crate::job::message::{BadJob, JobMessage};
use crate::job::{DecodeError, Job, JobResult};
use crate::keys::cpu::CpuPool;
use crate::keys::keygen::KeyBits;
use crate::lifecycle::{Finished, Lifecycle};
use crate::queue::broker::{self, Broker, BrokerError};
use crate::queue::endpoints::Endpoints;
use crate::registry::batch_status::BatchStatusStore;
use crate::registry::redis::RedisRegistry;
use crate::registry::RegistryError;
use crate::reservoir::Reservoir;
use crate::retry::RetryPolicy;
use crate::settings::Settings;
use crate::sink::result_group::ResultGroup;
use crate::sink::results_queue::Recipients;
use crate::sink::{ResultsQueue, Sink};
use crate::telemetry::metrics::{self, Readiness};
use crate::upstream::rate_limit::RateLimit;
use crate::upstream::Configured;

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub endpoints: Endpoints,
    /// Jobs in flight; also the RabbitMQ prefetch, in messages.
    pub concurrency: u16,
    /// Rayon threads; 0 = one per core.
    pub threads: usize,
    pub settings: Settings,
    /// Pre-generated RSA-2048 keys kept ready for bursts; 0 = no reservoir.
    pub reservoir: usize,
    /// Fill the reservoir once, never refill it (benchmarks of the plumbing alone).
    pub reservoir_once: bool,
    /// Upstream calls per second per provider + region; 0 = unlimited.
    pub upstream_rps: u32,
    pub upstream_burst: u32,
    /// Where keys are registered (no endpoint: keyfleet's registry only).
    pub upstream: crate::upstream::settings::Settings,
    /// How long in-flight jobs may take to finish after a shutdown signal.
    pub drain_timeout: Duration,
    /// Where /metrics is served; `None`: nowhere.
    pub metrics_addr: Option<MetricsBind>,
    /// Plaintext keys for batches without a recipient (see `sink/results_queue.rs`).
    pub allow_plaintext_results: bool,
}

/// Where a worker serves its metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsBind {
    /// The address the user gave: taken is an error.
    Exactly(SocketAddr),
    /// The default: when its port is taken (another worker on this host), a free port on the
    /// same interface is used, so any number of workers start with defaults.
    Default(SocketAddr),
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("Redis")]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Cpu(#[from] crate::keys::cpu::CpuError),
    #[error("metrics endpoint: {0}")]
    Metrics(String),
    #[error("upstream")]
    Upstream(#[from] crate::upstream::BuildError),
}

/// What every job of this worker is handled with.
struct Handler {
    lifecycle: Lifecycle<RedisRegistry, Configured>,
    status: BatchStatusStore,
    allow_plaintext: bool,
    recipients: Recipients,
    /// One permit a job in flight: a v2 message's jobs wait for theirs, so `--concurrency`
    /// bounds jobs, not messages, whatever the producer packs into a message.
    slots: Arc<Semaphore>,
    /// The permits `slots` was made with.
    concurrency: usize,
}

/// Runs a worker until `shutdown` is cancelled, then drains: stops consuming, lets jobs in
/// flight finish within the drain deadline, and leaves the rest unacked for redelivery.
pub async fn run(cfg: WorkerConfig, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let readiness = Readiness::new();
    if let Some(bind) = cfg.metrics_addr {
        let failed = |e: &(dyn std::error::Error + 'static)| {
            WorkerError::Metrics(format!(
                "{} (choose another with --metrics-addr HOST:PORT, 127.0.0.1:0 for any free port, or off)",
                crate::sink::error_chain(e)
            ))
        };
        metrics::install().map_err(|e| failed(&e))?;
        let bound = match bind {
            MetricsBind::Exactly(addr) => metrics::serve(addr, readiness.clone(), shutdown.clone())
                .await
                .map_err(|e| failed(&e))?,
            MetricsBind::Default(addr) => {
                match metrics::serve(addr, readiness.clone(), shutdown.clone()).await {
                    Ok(bound) => bound,
                    Err(metrics::MetricsError::Bind { source, .. })
                        if source.kind() == std::io::ErrorKind::AddrInUse =>
                    {
                        let any = SocketAddr::new(addr.ip(), 0);
                        let bound = metrics::serve(any, readiness.clone(), shutdown.clone())
                            .await
                            .map_err(|e| failed(&e))?;
                        tracing::warn!(
                            "metrics port {} is taken (another worker?): serving metrics on {bound} instead",
                            addr.port()
                        );
                        bound
                    }
                    Err(e) => return Err(failed(&e)),
                }
            }
        };
        tracing::info!("metrics on http://{bound}/metrics");
    }
    let e = &cfg.endpoints;
    // A signal during start-up (servers slow to answer) stops the worker at once: nothing is
    // in flight yet.
    let started = async {
        let registry = RedisRegistry::connect(&e.redis_url, &e.prefix, e.connect_timeout)
            .await?
            .with_replicas(e.redis_replicas);
        registry.check_replicas(e.connect_timeout).await?;
        readiness.set_redis(true);
        let broker = Broker::connect_nodes(&e.amqp_url, 0, e.topology(), e.connect_timeout).await?;
        broker.declare().await?;
        readiness.set_amqp(true);
        Ok::<_, WorkerError>((registry, broker))
    };
    let (registry, broker) = tokio::select! {
        started = started => started?,
        _ = shutdown.cancelled() => {
            tracing::info!("stopped during start-up");
            return Ok(());
        }
    };
    let status = BatchStatusStore::from_connection(registry.connection(), &e.prefix);
    let limit = RateLimit::new(cfg.upstream_rps, cfg.upstream_burst).map(Arc::new);
    let upstream = Configured::build(&cfg.upstream, limit)?;
    // In front of a cloud, --upstream-rps is the fleet's total, as the cloud counts it.
    upstream.share_rate_limit(registry.connection(), &e.prefix);
    let upstream = Arc::new(upstream);
    let cpu = CpuPool::new(cfg.threads)?;
    let mut lifecycle = Lifecycle::new(
        Arc::new(registry.clone()),
        upstream,
        cpu.clone(),
        cfg.settings.clone(),
        RetryPolicy::queue(),
        shutdown.clone(),
    );
    if cfg.reservoir > 0 {
        let reservoir = Reservoir::new(cpu, cfg.settings.engine, cfg.reservoir, &[KeyBits::B2048]);
        if cfg.reservoir_once {
            reservoir.freeze_when_full();
        }
        lifecycle = lifecycle.with_reservoir(reservoir);
    }
    let handler = Arc::new(Handler {
        lifecycle,
        status,
        allow_plaintext: cfg.allow_plaintext_results,
        recipients: Recipients::default(),
        slots: Arc::new(Semaphore::new(usize::from(cfg.concurrency.max(1)))),
        concurrency: usize::from(cfg.concurrency.max(1)),
    });
    let tracker = TaskTracker::new();
    let health = tokio::spawn(watch_redis(registry, readiness.clone(), shutdown.clone()));

    let mut broker = Arc::new(broker);
    'connection: loop {
        let consumer = async {
            broker.set_prefetch(cfg.concurrency).await?;
            broker.consume(&broker.topology.jobs_queue()).await
        }
        .await;
        // Cancelled when this connection is lost: its deliveries can no longer be acked, and
        // RabbitMQ gives them to another worker, so the jobs still working on them stop before
        // their answers (see `Finished::Abandoned`).
        let closed = CancellationToken::new();
        match consumer {
            Ok(mut consumer) => {
                readiness.set_amqp(true);
                tracing::info!(queue = %broker.topology.jobs_queue(), "consuming");
                loop {
                    tokio::select! {
                        // A drain, not a loss: the jobs in flight finish and are acked.
                        _ = shutdown.cancelled() => break 'connection,
                        next = consumer.next() => match next {
                            Some(Ok(delivery)) => {
                                let (handler, broker) = (handler.clone(), broker.clone());
                                let closed = closed.clone();
                                tracker.spawn(async move { handle(&handler, &broker, &closed, delivery).await });
                            }
                            Some(Err(e)) => {
                                tracing::warn!("RabbitMQ consumer failed: {e}; reconnecting");
                                break;
                            }
                            None => {
                                tracing::warn!("RabbitMQ consumer ended; reconnecting");
                                break;
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::warn!("cannot consume jobs: {e}; reconnecting"),
        }
        readiness.set_amqp(false);
        closed.cancel();
        // The old channel is closed for certain (a consumer can end with its channel still
        // open), so RabbitMQ requeues every job of it that was not acked.
        let _ = tokio::time::timeout(Duration::from_secs(2), broker.close()).await;
        // Until it works or we are told to stop. With several nodes (a cluster), the one after
        // the node just lost comes first: if that node died, its quorum queues have moved to
        // the others, and the worker should not wait on the dead one before trying them.
        let lost = broker.node();
        let reconnected = RetryPolicy::reconnect()
            .run("reconnecting to RabbitMQ", &shutdown, || async {
                let b =
                    Broker::connect_nodes(&e.amqp_url, lost + 1, e.topology(), e.connect_timeout)
                        .await?;
                b.declare().await?;
                Ok::<_, BrokerError>(b)
            })
            .await;
        match reconnected {
            Ok(b) => {
                tracing::info!(node = %e.amqp_url.shown(b.node()), "reconnected to RabbitMQ");
                broker = Arc::new(b);
            }
            Err(_) => break 'connection,
        }
    }

    readiness.set_draining(true);
    tracing::info!(in_flight = tracker.len(), "draining");
    tracker.close();
    if tokio::time::timeout(cfg.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            unfinished = tracker.len(),
            "drain deadline passed; unfinished jobs stay unacked and will be redelivered"
        );
    }
    broker.close().await;
    health.abort();
    Ok(())
}

/// Keeps `/readyz` honest about Redis.
async fn watch_redis(registry: RedisRegistry, readiness: Readiness, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        readiness.set_redis(registry.ping().await.is_ok());
    }
}

/// One job message, start to end: decode, the lifecycle of its job (or of each of its jobs,
/// for a v2 message) with the results queue as its sink, then ack, hand back or dead-letter as
/// the jobs' endings say.
async fn handle(
    handler: &Handler,
    broker: &Broker,
    channel_closed: &CancellationToken,
    delivery: Delivery,
) {
    if let Some(waited) = broker::queue_wait(&delivery.properties) {
        metrics::queue_wait(waited);
    }
    if delivery.redelivered {
        metrics::redelivered();
    }
    let sink = ResultsQueue::new(broker, &handler.status)
        .allow_plaintext(handler.allow_plaintext)
        .recipients(&handler.recipients)
        .channel(channel_closed);
    let attempt = broker::delivery_count(&delivery.properties) + 1;
    let message = match JobMessage::decode(&delivery.data) {
        Ok(message) => message,
        Err(e) => return reject_undecodable(handler, broker, &sink, &delivery, &e).await,
    };
    // A v1 message is a group of one: one path for both.
    let (batch_id, jobs) = match message {
        JobMessage::One(job) => (job.batch_id.clone(), vec![Ok(job)]),
        JobMessage::Group { batch_id, jobs } => (batch_id, jobs),
    };
    // A message of more jobs than --concurrency takes every permit and runs alone.
    let wanted = u32::try_from(jobs.len().clamp(1, handler.concurrency)).unwrap_or(u32::MAX);
    let _slots = tokio::select! {
        biased;
        _ = sink.gone() => return settle(broker, &delivery, abandoned(jobs.len())).await,
        slots = handler.slots.acquire_many(wanted) => match slots {
            Ok(slots) => slots,
            Err(_) => return,
        },
    };
    let endings = run_jobs(handler, broker, &sink, &delivery, &batch_id, jobs, attempt).await;
    settle(broker, &delivery, endings).await;
}

/// The jobs of a message (one for v1): a job that does not decode is answered and
/// dead-lettered alone; the others are admitted together (their names reserved in one round
/// trip) and completed side by side. One ending a job.
async fn run_jobs(
    handler: &Handler,
    broker: &Broker,
    sink: &ResultsQueue<'_>,
    delivery: &Delivery,
    batch_id: &str,
    jobs: Vec<Result<Job, BadJob>>,
    attempt: u32,
) -> Vec<Finished> {
    let mut endings = Vec::with_capacity(jobs.len());
    let mut good = Vec::with_capacity(jobs.len());
    for job in jobs {
        match job {
            Ok(job) => good.push(job),
            Err(bad) => {
                if !refuse_bad_job(handler, broker, sink, delivery, batch_id, &bad).await {
                    endings.push(Finished::HandBack(
                        "a bad job of the message was not yet answered and dead-lettered".into(),
                    ));
                }
            }
        }
    }
    let _in_flight: Vec<_> = good.iter().map(|_| metrics::InFlight::start()).collect();
    let admitting = good.len();
    let admissions = tokio::select! {
        biased;
        _ = sink.gone() => return abandoned(admitting),
        admissions = handler.lifecycle.admit_many(good, attempt) => admissions,
    };
    // The jobs of a v2 message answer together: one results message, one confirm.
    if admissions.len() < 2 {
        for a in admissions {
            endings.push(handler.lifecycle.complete(a, sink).await);
        }
        return endings;
    }
    let group = ResultGroup::new(batch_id, admissions.len());
    let completed =
        futures::future::join_all(admissions.into_iter().enumerate().map(|(slot, a)| {
            let sink = sink.in_group(&group, slot);
            async move {
                let ending = handler.lifecycle.complete(a, &sink).await;
                sink.left().await;
                ending
            }
        }))
        .await;
    // Their progress in one call, before the message is acked.
    let settled = group.take_settled();
    let settled: Vec<(uuid::Uuid, &str)> =
        settled.iter().map(|(id, o)| (*id, o.as_str())).collect();
    handler
        .lifecycle
        .settle_many(sink, batch_id, &settled)
        .await;
    endings.extend(completed);
    endings
}

/// The endings of `jobs` jobs stopped together because their channel closed.
fn abandoned(jobs: usize) -> Vec<Finished> {
    (0..jobs.max(1)).map(|_| Finished::Abandoned).collect()
}

/// What a message's jobs' endings make of it. Every job settled: ack. A channel gone: nothing
/// (RabbitMQ has requeued the message). A job to try again: the whole message is handed back,
/// and its jobs answered already are acknowledged without a second answer when it returns. A
/// result nobody can take: the message is dead-lettered with the reason.
async fn settle(broker: &Broker, delivery: &Delivery, endings: Vec<Finished>) {
    let stopped = endings
        .iter()
        .filter(|e| matches!(e, Finished::Abandoned))
        .count();
    if stopped > 0 {
        // Neither ack nor nack can reach RabbitMQ on a closed channel; it has requeued the
        // message for another worker already.
        tracing::info!(
            jobs = stopped,
            "stopped jobs whose RabbitMQ channel closed; another worker answers them"
        );
        metrics::abandoned(stopped);
        return;
    }
    let mut undeliverable = None;
    let mut hand_back = false;
    for ending in endings {
        match ending {
            Finished::Delivered(_) | Finished::AnsweredBefore | Finished::Abandoned => {}
            Finished::HandBack(_) => hand_back = true,
            Finished::Undeliverable { result, reason } => {
                // No results queue takes this batch's answers (deleted, expired, or a batch id
                // nobody declared): the pair was released; the job waits in the dead-letter
                // queue.
                tracing::error!(job = %result.job_id, batch = %result.batch_id, "dead-lettering a job whose result cannot be delivered: {reason}");
                undeliverable.get_or_insert(reason);
            }
        }
    }
    if hand_back {
        requeue(delivery).await;
    } else if let Some(reason) = undeliverable {
        dead_letter(broker, delivery, "undeliverable", &reason).await;
    } else {
        ack(delivery).await;
    }
}

async fn ack(delivery: &Delivery) {
    if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
        // The channel died after the result was confirmed: the job comes back, and the
        // registry tells its next attempt that it was answered.
        tracing::warn!("ack failed: {e}");
    }
}

/// Hands a job back to the broker for redelivery (counted against its delivery limit).
async fn requeue(delivery: &Delivery) {
    let opts = lapin::options::BasicNackOptions {
        requeue: true,
        ..Default::default()
    };
    if let Err(e) = delivery.acker.nack(opts).await {
        tracing::warn!("nack failed (the job comes back when the channel closes): {e}");
    }
}

/// Puts the message on the dead-letter queue with `reason`, then acks it; if the broker does
/// not confirm the copy, the original stays for redelivery.
async fn dead_letter(broker: &Broker, delivery: &Delivery, label: &str, reason: &str) {
    match broker
        .dead_letter(&delivery.data, &delivery.properties, reason)
        .await
    {
        Ok(()) => {
            metrics::dead_lettered(label);
            ack(delivery).await;
        }
        Err(e) => tracing::warn!("dead-lettering failed, leaving the message for redelivery: {e}"),
    }
}

/// A message that is not a job: answer its batch if we can tell which, then dead-letter it
/// with the reason. Nothing is silently dropped.
async fn reject_undecodable(
    handler: &Handler,
    broker: &Broker,
    sink: &ResultsQueue<'_>,
    delivery: &Delivery,
    err: &DecodeError,
) {
    let reason = err.to_string();
    tracing::warn!("dead-lettering an undecodable message: {reason}");
    let props = &delivery.properties;
    let batch = props
        .correlation_id()
        .as_ref()
        .map(|s| s.as_str().to_owned())
        .or_else(|| field(&delivery.data, "batch_id"))
        .filter(|b| !b.is_empty() && b.len() <= 200);
    if let Some(batch) = &batch {
        // Without a usable message id, the job id comes from the bytes: a redelivered copy of
        // the same poison message is then the same job, counted once.
        let job_id = props
            .message_id()
            .as_ref()
            .and_then(|m| uuid::Uuid::parse_str(m.as_str()).ok())
            .unwrap_or_else(|| crate::job::name_based_id(&[&delivery.data]));
        let result = JobResult::rejected(batch, job_id, None, Provider::Aliyun, "", &reason);
        if let Finished::HandBack(_) = handler.lifecycle.answer(result, sink).await {
            return requeue(delivery).await;
        }
    }
    dead_letter(broker, delivery, err.metric_reason(), &reason).await;
}

/// A job of a v2 message that does not decode: its batch (the message's) is answered for it
/// under its own `job_id` when it has a readable one (else an id from its bytes), and its
/// bytes alone are dead-lettered with the reason. True once both are done; false leaves the
/// message to come back.
async fn refuse_bad_job(
    handler: &Handler,
    broker: &Broker,
    sink: &ResultsQueue<'_>,
    delivery: &Delivery,
    batch_id: &str,
    bad: &BadJob,
) -> bool {
    let reason = bad.error.to_string();
    tracing::warn!("dead-lettering an undecodable job of a v2 message: {reason}");
    let job_id = field(&bad.bytes, "job_id")
        .and_then(|id| uuid::Uuid::parse_str(&id).ok())
        .unwrap_or_else(|| crate::job::name_based_id(&[&bad.bytes]));
    let result = JobResult::rejected(batch_id, job_id, None, Provider::Aliyun, "", &reason);
    if let Finished::HandBack(_) = handler.lifecycle.answer(result, sink).await {
        return false;
    }
    let props = delivery
        .properties
        .clone()
        .with_message_id(job_id.to_string().into());
    match broker.dead_letter(&bad.bytes, &props, &reason).await {
        Ok(()) => {
            metrics::dead_lettered(bad.error.metric_reason());
            true
        }
        Err(e) => {
            tracing::warn!("dead-lettering failed, leaving the message for redelivery: {e}");
            false
        }
    }
}

/// A string field of a JSON object, if `data` is one and has it.
fn field(data: &[u8], name: &str) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(data)
        .ok()?
        .get(name)?
        .as_str()
        .map(str::to_owned)
}
