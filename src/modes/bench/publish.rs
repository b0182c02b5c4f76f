//! `keyfleet bench --submit`: `keyfleet submit` of generated rows against a bare publisher —
//! the same jobs queue (quorum), the same message bytes and properties (as many jobs a
//! message), the same window of publisher confirms, and nothing else (no file, no validation, no encoding, no Redis). The
//! bare rate is the broker's own ceiling on this machine; submit's share of it is what its
//! plumbing costs. Rounds alternate which goes first; medians are reported. Each measurement
//! uses a prefix of its own, whose queues and Redis keys are deleted afterwards. Numbers only; nothing asserts timing.

use std::collections::VecDeque;
use std::time::Instant;

use lapin::PublisherConfirm;
use tokio_util::sync::CancellationToken;

use super::{median, process_cpu_seconds, write_rows};
use crate::dialect::{Catalog, Provider};
use crate::job::batch::RowDefaults;
use crate::job::jobs_per_message::JobsPerMessage;
use crate::job::Job;
use crate::keys::keygen::KeyBits;
use crate::modes::submit::{submit, KeysTo, SubmitError, SubmitOptions};
use crate::queue::broker::{self, Broker, BrokerError};
use crate::queue::endpoints::Endpoints;
use crate::registry::batch_status::BatchStatusStore;
use crate::registry::RegistryError;
use crate::telemetry::progress::ProgressMode;

/// One publisher's run: jobs per second (wall clock) and this process's CPU per job.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PublishMeasurement {
    pub jobs_per_second: f64,
    pub cpu_us_per_job: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PublishReport {
    pub jobs: usize,
    pub rounds: usize,
    pub confirm_window: usize,
    /// The packing plan both publishers followed (`"auto"` or a number).
    pub jobs_per_message: JobsPerMessage,
    /// Messages a round published.
    pub messages: u64,
    /// The bytes of the plan's largest message.
    pub message_bytes: usize,
    pub bare: Vec<PublishMeasurement>,
    pub submit: Vec<PublishMeasurement>,
    pub bare_median_jobs_per_second: f64,
    pub submit_median_jobs_per_second: f64,
    /// submit's median over the bare publisher's.
    pub submit_ratio_to_bare: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishBenchError {
    #[error("--keys must be at least 1")]
    NoJobs,
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("submit")]
    Submit(#[from] SubmitError),
    #[error("Redis")]
    Redis(#[from] RegistryError),
    #[error("temporary files")]
    Io(#[from] std::io::Error),
}

/// `jobs` jobs per measurement, `rounds` rounds of bare and submit, alternated.
pub async fn bench_submit(
    endpoints: &Endpoints,
    jobs: usize,
    rounds: usize,
    confirm_window: usize,
    plan: JobsPerMessage,
) -> Result<PublishReport, PublishBenchError> {
    if jobs == 0 {
        return Err(PublishBenchError::NoJobs);
    }
    let dir = tempfile::tempdir()?;
    let input = write_rows(dir.path(), jobs)?;
    let identity = dir.path().join("bench.age-identity");
    let message = sample_job();
    let largest = vec![message.clone(); plan.largest().min(jobs)];
    let message_bytes = crate::job::message::encode(&largest).map_or(0, |m| m.len());
    let (mut bare, mut subs) = (Vec::new(), Vec::new());
    for round in 0..rounds.max(1) {
        for first in [round % 2 == 0, round % 2 != 0] {
            let ep = Endpoints {
                prefix: format!(
                    "{}-bench-{}",
                    endpoints.prefix,
                    &uuid::Uuid::new_v4().simple().to_string()[..8]
                ),
                ..endpoints.clone()
            };
            if first {
                bare.push(measure_bare(&ep, &message, plan, jobs, confirm_window).await?);
            } else {
                let opts = SubmitOptions {
                    input: input.clone(),
                    format: None,
                    defaults: RowDefaults {
                        batch_id: message.batch_id.clone(),
                        provider: Provider::Aliyun,
                        owner: "bench".into(),
                        key_bits: KeyBits::B2048,
                    },
                    catalog: Catalog::default(),
                    endpoints: ep.clone(),
                    progress: ProgressMode::Off,
                    confirm_window,
                    jobs_per_message: plan,
                    keys_to: KeysTo::IdentityFile(identity.clone()),
                };
                let cpu = process_cpu_seconds();
                let summary = submit(opts, CancellationToken::new()).await?;
                let cpu = process_cpu_seconds() - cpu;
                subs.push(PublishMeasurement {
                    jobs_per_second: summary.jobs_per_second,
                    cpu_us_per_job: cpu * 1e6 / jobs as f64,
                });
                remove(&ep, &message.batch_id).await?;
            }
        }
    }
    let bare_median = median(bare.iter().map(|m| m.jobs_per_second).collect());
    let submit_median = median(subs.iter().map(|m| m.jobs_per_second).collect());
    Ok(PublishReport {
        jobs,
        rounds: rounds.max(1),
        confirm_window,
        jobs_per_message: plan,
        messages: plan.messages(jobs as u64),
        message_bytes,
        bare,
        submit: subs,
        bare_median_jobs_per_second: bare_median,
        submit_median_jobs_per_second: submit_median,
        submit_ratio_to_bare: submit_median / bare_median.max(1e-9),
    })
}

/// The job a row of the benchmark's file becomes, as `submit` would publish it.
fn sample_job() -> Job {
    Job {
        v: 1,
        job_id: uuid::Uuid::new_v4(),
        batch_id: "bench".into(),
        line: Some(2),
        provider: Provider::Aliyun,
        owner: "bench".into(),
        params: [
            ("RegionId".to_owned(), "cn-hangzhou".to_owned()),
            ("KeyPairName".to_owned(), "bench-0000001".to_owned()),
        ]
        .into_iter()
        .collect(),
        key_bits: KeyBits::B2048,
    }
}

/// The bare publisher: messages of `job` repeated, sized as `plan` says, for `jobs` jobs,
/// confirms kept `window` deep. Each size is encoded once, before the clock starts.
async fn measure_bare(
    ep: &Endpoints,
    job: &Job,
    plan: JobsPerMessage,
    jobs: usize,
    window: usize,
) -> Result<PublishMeasurement, PublishBenchError> {
    let broker = Broker::connect_nodes(&ep.amqp_url, 0, ep.topology(), ep.connect_timeout).await?;
    broker.declare().await?;
    let encode = |n: usize| {
        let group = vec![job.clone(); n];
        crate::job::message::encode(&group)
            .map(|payload| {
                (
                    n,
                    payload,
                    crate::job::message::message_id(&group).to_string(),
                )
            })
            .map_err(|e| BrokerError::Encode(e.to_string()))
    };
    // The sizes the plan uses; a last, partly filled message is sent full (as before).
    let payloads = [
        encode(plan.next(0).min(jobs))?,
        encode(plan.largest().min(jobs))?,
    ];
    let batch = &job.batch_id;
    let routing = ep.topology().jobs_routing_key();
    let mut pending: VecDeque<PublisherConfirm> = VecDeque::with_capacity(window);
    let cpu = process_cpu_seconds();
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < jobs as u64 {
        let n = plan.next(sent).min(jobs);
        let (_, payload, id) = payloads
            .iter()
            .find(|(size, ..)| *size == n)
            .unwrap_or(&payloads[1]);
        if pending.len() >= window {
            if let Some(c) = pending.pop_front() {
                broker::confirmed(c, &routing).await?;
            }
        }
        pending.push_back(broker.publish_encoded_job(payload, id, batch).await?);
        sent += n as u64;
    }
    for c in pending.drain(..) {
        broker::confirmed(c, &routing).await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds() - cpu;
    broker.remove(&[]).await?;
    broker.close().await;
    Ok(PublishMeasurement {
        jobs_per_second: jobs as f64 / seconds.max(1e-9),
        cpu_us_per_job: cpu * 1e6 / jobs as f64,
    })
}

/// Deletes what a measurement's `submit` declared and recorded: its queues and exchanges, and
/// the batch's status in Redis.
async fn remove(ep: &Endpoints, batch: &str) -> Result<(), PublishBenchError> {
    let broker = Broker::connect_nodes(&ep.amqp_url, 0, ep.topology(), ep.connect_timeout).await?;
    broker.remove(&[batch]).await?;
    broker.close().await;
    BatchStatusStore::connect(&ep.redis_url, &ep.prefix, ep.connect_timeout)
        .await?
        .forget(batch)
        .await?;
    Ok(())
}

pub fn render(r: &PublishReport) -> String {
    let list = |v: &[PublishMeasurement]| {
        v.iter()
            .map(|m| format!("{:.0}", m.jobs_per_second))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let cpu = |v: &[PublishMeasurement]| median(v.iter().map(|m| m.cpu_us_per_job).collect());
    format!(
        "{} jobs a measurement, {} rounds alternated, {} confirms in flight, {} messages of \
         --jobs-per-message {} (the largest {} bytes)\n\
         bare publisher: {} jobs/s  median {:.0}  ({:.1} µs CPU a job in this process)\n\
         keyfleet submit: {} jobs/s  median {:.0}  ({:.1} µs CPU a job in this process)\n\
         submit / bare: {:.1}%\n",
        r.jobs,
        r.rounds,
        r.confirm_window,
        r.messages,
        r.jobs_per_message,
        r.message_bytes,
        list(&r.bare),
        r.bare_median_jobs_per_second,
        cpu(&r.bare),
        list(&r.submit),
        r.submit_median_jobs_per_second,
        cpu(&r.submit),
        r.submit_ratio_to_bare * 100.0,
    )
}
