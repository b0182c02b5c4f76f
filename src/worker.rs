//! The distributed-mode worker: consumes jobs from RabbitMQ, runs each through the pipeline
//! (keys on the rayon pool, quota in Redis, upstream rate-limited), publishes the result with a
//! confirm, and only then acks. Survives broker and Redis restarts; drains on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::batch_status::BatchStatusStore;
use crate::broker::{self, Broker, BrokerError, Topology};
use crate::cpu::CpuPool;
use crate::dialect::Provider;
use crate::job::{set_private_key_body, Job, JobResult, Status, MESSAGE_VERSION};
use crate::keygen::KeyBits;
use crate::metrics::{self, Readiness};
use crate::pipeline::{Pipeline, Settings};
use crate::rate_limit::{RateLimit, RateLimited};
use crate::registry::redis::RedisRegistry;
use crate::registry::{Registry, RegistryError};
use crate::reservoir::Reservoir;
use crate::upstream::LocalUpstream;

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub amqp_url: String,
    pub redis_url: String,
    pub topology: Topology,
    pub redis_prefix: String,
    /// Jobs in flight (= RabbitMQ prefetch).
    pub concurrency: u16,
    /// Rayon threads; 0 = one per core.
    pub threads: usize,
    pub settings: Settings,
    /// Pre-generated RSA-2048 keys kept ready for bursts; 0 = no reservoir.
    pub reservoir: usize,
    /// Upstream calls per second per provider + region; 0 = unlimited.
    pub upstream_rps: u32,
    pub upstream_burst: u32,
    /// How long in-flight jobs may take to finish after a shutdown signal.
    pub drain_timeout: Duration,
    /// How long start-up waits for RabbitMQ and Redis before giving up.
    pub connect_timeout: Duration,
    pub metrics_addr: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("Redis: {0}")]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Cpu(#[from] crate::cpu::CpuError),
    #[error("metrics endpoint: {0}")]
    Metrics(String),
}

type WorkerPipeline = Pipeline<RedisRegistry, RateLimited<LocalUpstream>>;

struct Shared {
    pipeline: WorkerPipeline,
    status: BatchStatusStore,
    shutdown: CancellationToken,
}

/// Runs a worker until `shutdown` is cancelled, then drains: stops consuming, lets jobs in
/// flight finish within the drain deadline, and leaves the rest unacked for redelivery.
pub async fn run(cfg: WorkerConfig, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let readiness = Readiness::new();
    if let Some(addr) = cfg.metrics_addr {
        metrics::install().map_err(|e| WorkerError::Metrics(e.to_string()))?;
        let bound = metrics::serve(addr, readiness.clone(), shutdown.clone())
            .await
            .map_err(|e| WorkerError::Metrics(e.to_string()))?;
        tracing::info!("metrics on http://{bound}/metrics");
    }
    let registry =
        RedisRegistry::connect(&cfg.redis_url, &cfg.redis_prefix, cfg.connect_timeout).await?;
    readiness.set_redis(true);
    let broker = Broker::connect(&cfg.amqp_url, cfg.topology.clone(), cfg.connect_timeout).await?;
    broker.declare().await?;
    readiness.set_amqp(true);
    let status = BatchStatusStore::from_connection(registry.connection(), &cfg.redis_prefix);
    let limit = RateLimit::new(cfg.upstream_rps, cfg.upstream_burst).map(Arc::new);
    let upstream = Arc::new(RateLimited::new(LocalUpstream, limit));
    let cpu = CpuPool::new(cfg.threads)?;
    let mut pipeline = Pipeline::new(
        Arc::new(registry.clone()),
        upstream,
        cpu.clone(),
        cfg.settings.clone(),
    );
    if cfg.reservoir > 0 {
        let reservoir = Reservoir::new(cpu, cfg.settings.engine, cfg.reservoir, &[KeyBits::B2048]);
        pipeline = pipeline.with_reservoir(reservoir);
    }
    let shared = Arc::new(Shared {
        pipeline,
        status,
        shutdown: shutdown.clone(),
    });
    let tracker = TaskTracker::new();
    let health = tokio::spawn(watch_redis(registry, readiness.clone(), shutdown.clone()));

    let mut broker = Arc::new(broker);
    let mut backoff = Duration::from_millis(200);
    'connection: loop {
        let consumer = async {
            broker.set_prefetch(cfg.concurrency).await?;
            let c = broker
                .channel()
                .basic_consume(
                    broker.topology.jobs_queue().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, BrokerError>(c)
        }
        .await;
        match consumer {
            Ok(mut consumer) => {
                readiness.set_amqp(true);
                backoff = Duration::from_millis(200);
                tracing::info!(queue = %broker.topology.jobs_queue(), "consuming");
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'connection,
                        next = consumer.next() => match next {
                            Some(Ok(delivery)) => {
                                let (shared, broker) = (shared.clone(), broker.clone());
                                tracker.spawn(async move { handle(&shared, &broker, delivery).await });
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
        // Reconnect with capped exponential backoff until it works or we are told to stop.
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break 'connection,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            match Broker::connect(&cfg.amqp_url, cfg.topology.clone(), cfg.connect_timeout).await {
                Ok(b) => match b.declare().await {
                    Ok(()) => {
                        tracing::info!("reconnected to RabbitMQ");
                        broker = Arc::new(b);
                        continue 'connection;
                    }
                    Err(e) => tracing::warn!("RabbitMQ topology: {e}"),
                },
                Err(e) => tracing::warn!("{e}"),
            }
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

/// Why a message is not a job: the dead-letter reason.
pub fn decode_job(data: &[u8]) -> Result<Job, String> {
    let job: Job =
        serde_json::from_slice(data).map_err(|e| format!("not a keyfleet job message: {e}"))?;
    if job.v != MESSAGE_VERSION {
        return Err(format!(
            "unsupported message version v={} (this worker reads v={MESSAGE_VERSION})",
            job.v
        ));
    }
    if job.batch_id.is_empty() || job.batch_id.len() > 200 {
        return Err("batch_id must be 1 to 200 characters".into());
    }
    Ok(job)
}

/// How long a job keeps retrying internal failures while holding its message. Long enough to
/// ride out a Redis restart; after it the job is handed back (nack + requeue) so the broker's
/// delivery limit, not this worker, decides when a job that always fails is dead-lettered.
const RETRY_WINDOW: Duration = Duration::from_secs(120);

/// Retries `op` while it fails with a storage error, with capped backoff, until it works, the
/// retry window closes, or shutdown is signalled (then `None`).
async fn persist<T, F, Fut>(
    shutdown: &CancellationToken,
    what: &str,
    mut op: F,
) -> Option<Result<T, RegistryError>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, RegistryError>>,
{
    let deadline = Instant::now() + RETRY_WINDOW;
    let mut backoff = Duration::from_millis(100);
    loop {
        match op().await {
            Err(RegistryError::Storage(e)) if Instant::now() < deadline => {
                tracing::warn!("{what}: {e}; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(3));
            }
            Err(RegistryError::Storage(e)) => {
                tracing::error!("{what}: {e}; giving up after {} s", RETRY_WINDOW.as_secs());
                return None;
            }
            other => return Some(other),
        }
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

async fn handle(shared: &Shared, broker: &Broker, delivery: Delivery) {
    let started = Instant::now();
    let _in_flight = metrics::InFlight::start();
    let props = delivery.properties.clone();
    if let Some(ts) = props.timestamp() {
        let waited = crate::job::unix_now() - *ts as i64;
        metrics::queue_wait(Duration::from_secs(waited.max(0) as u64));
    }
    if delivery.redelivered {
        metrics::redelivered();
    }
    let job = match decode_job(&delivery.data) {
        Ok(job) => job,
        Err(reason) => return reject_undecodable(shared, broker, &delivery, &reason).await,
    };
    let attempt = broker::delivery_count(&props) + 1;

    // Run the job; internal failures (Redis away) are retried here, holding the message, so a
    // restart does not burn the delivery limit.
    let deadline = Instant::now() + RETRY_WINDOW;
    let mut backoff = Duration::from_millis(100);
    let outcome = loop {
        match shared.pipeline.create(&job, attempt).await {
            Ok(outcome) => break outcome,
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(job = %job.job_id, "internal error, retrying: {e}");
                tokio::select! {
                    _ = shared.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(3));
            }
            Err(e) => {
                tracing::error!(job = %job.job_id, "internal error for {} s, handing the job back: {e}", RETRY_WINDOW.as_secs());
                return requeue(&delivery).await;
            }
        }
    };
    let mut result = outcome.result;
    if let Some(pending) = &outcome.pending {
        if let Some(pem) = result.private_key.take() {
            set_private_key_body(result.provider, &mut result.response, &pem.0);
        }
        match broker.publish_result(&result).await {
            Ok(()) => {}
            Err(BrokerError::Unroutable(queue)) => {
                // The batch's results queue is gone: the key can never be delivered, so the
                // pair must not stay registered.
                tracing::error!(job = %job.job_id, "results queue for batch {queue} is gone; releasing the key pair");
                let p = pending.clone();
                let released = persist(&shared.shutdown, "release", || {
                    shared
                        .pipeline
                        .registry()
                        .release(&p.scope, &p.name, p.job_id)
                })
                .await;
                if released.is_some() {
                    let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                } else if !shared.shutdown.is_cancelled() {
                    requeue(&delivery).await;
                }
                return;
            }
            Err(e) => {
                // Not confirmed: hand the job back; its redelivery replaces this pair. (If the
                // channel is gone, the nack fails and the broker redelivers anyway.)
                tracing::warn!(job = %job.job_id, "result not confirmed: {e}");
                return requeue(&delivery).await;
            }
        }
        let p = pending.clone();
        if persist(&shared.shutdown, "mark delivered", || {
            shared.pipeline.confirm(&p)
        })
        .await
        .is_none()
        {
            if !shared.shutdown.is_cancelled() {
                requeue(&delivery).await;
            }
            return;
        }
        if let Ok(used) = shared.pipeline.registry().quota_used(&p.scope).await {
            metrics::quota_used(p.scope.provider.as_str(), &p.scope.region, used);
        }
    } else {
        match broker.publish_result(&result).await {
            Ok(()) => {}
            Err(BrokerError::Unroutable(batch)) => {
                // Nobody can ever read this answer; holding the job would only block it.
                tracing::error!(job = %job.job_id, "results queue for batch {batch} is gone; dropping the answer");
            }
            Err(e) => {
                tracing::warn!(job = %job.job_id, "result not confirmed: {e}");
                return requeue(&delivery).await;
            }
        }
    }
    finish(shared, &result, started).await;
    if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
        // The channel died after the result was confirmed: the job comes back and is answered
        // again; the collector keeps one answer per job.
        tracing::warn!(job = %job.job_id, "ack failed: {e}");
    }
}

fn outcome_label(result: &JobResult) -> String {
    match result.status {
        Status::Created => "created".into(),
        Status::Failed => result.code.clone().unwrap_or_else(|| "unknown".into()),
    }
}

async fn finish(shared: &Shared, result: &JobResult, started: Instant) {
    let outcome = outcome_label(result);
    metrics::job_finished(result.provider.as_str(), &outcome, started.elapsed());
    let (batch, job) = (result.batch_id.clone(), result.job_id);
    let recorded = persist(&shared.shutdown, "batch status", || {
        shared.status.record(&batch, job, &outcome)
    })
    .await;
    if let Some(Err(e)) = recorded {
        tracing::warn!("batch status not recorded: {e}");
    }
}

/// A message that is not a job: answer its batch if we can tell which, then dead-letter it
/// with the reason, then ack. Nothing is silently dropped.
async fn reject_undecodable(shared: &Shared, broker: &Broker, delivery: &Delivery, reason: &str) {
    tracing::warn!("dead-lettering an undecodable message: {reason}");
    let batch = delivery
        .properties
        .correlation_id()
        .as_ref()
        .map(|s| s.as_str().to_owned())
        .or_else(|| {
            serde_json::from_slice::<serde_json::Value>(&delivery.data)
                .ok()?
                .get("batch_id")?
                .as_str()
                .map(str::to_owned)
        })
        .filter(|b| !b.is_empty() && b.len() <= 200);
    if let Some(batch) = &batch {
        let mut result = JobResult::unparseable(batch, None, Provider::Aliyun, "", reason);
        // Without a usable message id, the job id comes from the bytes: a redelivered copy of
        // the same poison message is then the same job, counted once.
        result.job_id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &delivery.data);
        if let Some(id) = delivery
            .properties
            .message_id()
            .as_ref()
            .and_then(|m| uuid::Uuid::parse_str(m.as_str()).ok())
        {
            result.job_id = id;
        }
        match broker.publish_result(&result).await {
            Ok(()) => finish(shared, &result, Instant::now()).await,
            Err(BrokerError::Unroutable(_)) => {}
            Err(e) => {
                tracing::warn!("error result not confirmed: {e}");
                return requeue(delivery).await;
            }
        }
    }
    match broker
        .dead_letter(&delivery.data, &delivery.properties, reason)
        .await
    {
        Ok(()) => {
            metrics::dead_lettered(if reason.contains("version") {
                "unsupported_version"
            } else {
                "undecodable"
            });
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        }
        Err(e) => tracing::warn!("dead-lettering failed, leaving the message for redelivery: {e}"),
    }
}
