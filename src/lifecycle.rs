//! One job lifecycle for every mode: decode → reserve → key → upstream → commit → deliver →
//! confirm (or abandon), retried by one policy (`retry.rs`) and measured in one place.
//!
//! A mode is a thin loop around [`Lifecycle::process`] (or its two halves, [`Lifecycle::admit`]
//! and [`Lifecycle::complete`], which `keyfleet run` splits so names are reserved in input
//! order while keys are made concurrently). What a mode does with its job afterwards —
//! ack, hand back, dead-letter — is read off [`Finished`].
//!
//! Exactly once: a created pair is committed to the registry *undelivered*; the sink delivers
//! the result; only then is the pair marked delivered. A job that comes back before that (a
//! worker died) replaces its undelivered pair with a new key, so a reader of results accepts a
//! key only once the registry holds it, delivered, with the same fingerprint (`collect.rs`).
//! A sink whose delivery is a hand-over inside this process that cannot fail (an HTTP answer)
//! has its pairs committed delivered instead, on a registry whose failed commits certainly did
//! not happen: there is nothing a separate mark would wait for.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::dialect::record::KeyPairRecord;
use crate::dialect::{self, ApiError, CreateRequest};
use crate::job::{CreatedPair, Job, JobResult, SecretPem, Status, CREATED};
use crate::keys::cpu::{CpuError, CpuPool};
use crate::keys::keygen::{self, KeyMaterial, KeygenError};
use crate::quota_gauge::QuotaGauge;
use crate::registry::{Claim, Entry, Registry, RegistryError};
use crate::reservoir::Reservoir;
use crate::retry::{GiveUp, RetryPolicy, Transient};
use crate::settings::Settings;
use crate::sink::{AtDestination, DeliveryError, Sink};
use crate::time::{now_rfc3339, unix_now};
use crate::upstream::{Registration, Upstream};

/// A failure of keyfleet's own machinery while making a key pair.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// Not retried: the same inputs would fail the same way.
    #[error(transparent)]
    Keygen(#[from] KeygenError),
}

impl Transient for LifecycleError {
    fn is_transient(&self) -> bool {
        match self {
            LifecycleError::Registry(e) => {
                e.is_transient() || matches!(e, RegistryError::ReservationLost)
            }
            LifecycleError::Cpu(_) => true,
            LifecycleError::Keygen(_) => false,
        }
    }
}

/// A job whose name is reserved for it: its key comes next.
#[derive(Debug)]
pub struct Admitted {
    job: Job,
    req: CreateRequest,
    attempt: u32,
    started_at: String,
    clock: Instant,
}

/// Where a job stands after [`Lifecycle::admit`].
// Moved once, from admit to complete: boxing the answer would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Admission {
    Admitted(Box<Admitted>),
    /// Answered without a key: a bad request, the quota, a taken name.
    Answered {
        result: JobResult,
        clock: Instant,
    },
    /// This job's key pair was delivered before: it came back after its answer went out.
    AnsweredBefore {
        job: Job,
        req: CreateRequest,
        clock: Instant,
    },
    /// Stopped or gave up before reserving; the job goes back to its queue.
    HandBack(String),
}

/// A job of [`Lifecycle::admit_many`] after decoding.
// Moved once, into its admission: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Decoded {
    Request(Job, CreateRequest),
    Answered(Admission),
}

/// How a job's life ended: what the mode does with it.
#[derive(Debug)]
pub enum Finished {
    /// The result reached its destination and is settled: acknowledge the job.
    Delivered(JobResult),
    /// The job was answered by an earlier attempt: acknowledge it, answer nothing.
    AnsweredBefore,
    /// Not finished (shutdown, or internal errors for the whole retry window, or a delivery the
    /// destination did not confirm): hand the job back. Its next attempt picks up its
    /// reservation or replaces its undelivered pair.
    HandBack(String),
    /// The sink went away before the answer went out ([`Sink::gone`]: the worker's channel
    /// closed, and RabbitMQ has given the job to another worker). Nothing more is done for the
    /// job here, not even releasing its name: its other attempt, which has the same job id,
    /// may hold it already.
    Abandoned,
    /// The result can never be delivered; any pair was released. `result` is the failure to
    /// record where a record is kept (the manifest); a queue dead-letters the job with `reason`.
    Undeliverable { result: JobResult, reason: String },
}

pub struct Lifecycle<R, U> {
    registry: Arc<R>,
    upstream: Arc<U>,
    cpu: CpuPool,
    settings: Arc<Settings>,
    reservoir: Option<Reservoir>,
    retry: RetryPolicy,
    shutdown: CancellationToken,
    quota_gauge: QuotaGauge,
}

impl<R, U> Clone for Lifecycle<R, U> {
    fn clone(&self) -> Self {
        Lifecycle {
            registry: self.registry.clone(),
            upstream: self.upstream.clone(),
            cpu: self.cpu.clone(),
            settings: self.settings.clone(),
            reservoir: self.reservoir.clone(),
            retry: self.retry,
            shutdown: self.shutdown.clone(),
            quota_gauge: self.quota_gauge.clone(),
        }
    }
}

impl<R: Registry, U: Upstream> Lifecycle<R, U> {
    pub fn new(
        registry: Arc<R>,
        upstream: Arc<U>,
        cpu: CpuPool,
        settings: Settings,
        retry: RetryPolicy,
        shutdown: CancellationToken,
    ) -> Self {
        Lifecycle {
            quota_gauge: QuotaGauge::start(&registry, &shutdown),
            registry,
            upstream,
            cpu,
            settings: Arc::new(settings),
            reservoir: None,
            retry,
            shutdown,
        }
    }

    /// Takes keys from `reservoir` when it has one ready, so bursts skip key generation.
    pub fn with_reservoir(mut self, reservoir: Reservoir) -> Self {
        self.reservoir = Some(reservoir);
        self
    }

    pub fn registry(&self) -> &Arc<R> {
        &self.registry
    }

    /// The count of `scope` changed: its quota gauge is read again off this path, with the
    /// other scopes changed in the next moment. Jobs that create call it; so does a mode that
    /// changes a scope outside a job (`serve`'s delete).
    pub fn quota_changed(&self, scope: &dialect::Scope) {
        self.quota_gauge
            .changed(scope, self.settings.quota.for_region(&scope.region));
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn cpu(&self) -> &CpuPool {
        &self.cpu
    }

    /// The whole life of one job: admit, then complete.
    pub async fn process<S: Sink>(&self, job: Job, attempt: u32, sink: &S) -> Finished {
        let admission = tokio::select! {
            biased;
            _ = sink.gone() => return Finished::Abandoned,
            admission = self.admit(job, attempt) => admission,
        };
        self.complete(admission, sink).await
    }

    /// Decode + validate the request and reserve its name. Cheap; bad input never touches the
    /// quota or makes a key.
    pub async fn admit(&self, job: Job, attempt: u32) -> Admission {
        let mut admitted = self.admit_many(vec![job], attempt).await;
        admitted
            .pop()
            .unwrap_or_else(|| Admission::HandBack("the job was not admitted".into()))
    }

    /// [`Lifecycle::admit`] for jobs in the order they came: their names are reserved together
    /// (in one round trip where the store can) and decided in that order, so the first of two
    /// rows with one name wins it and the quota goes to the earlier rows. One admission per
    /// job, in order.
    pub async fn admit_many(&self, jobs: Vec<Job>, attempt: u32) -> Vec<Admission> {
        let clock = Instant::now();
        let started_at = now_rfc3339();
        let catalog = &self.settings.catalog;
        // A job whose request does not decode is answered here and reserves nothing.
        let decoded: Vec<Decoded> = jobs
            .into_iter()
            .map(
                |job| match dialect::decode(job.provider, &job.owner, &job.params, catalog) {
                    Ok(req) => Decoded::Request(job, req),
                    Err(e) => Decoded::Answered(Admission::Answered {
                        result: JobResult::failed(&job, &e, started_at.clone(), attempt),
                        clock,
                    }),
                },
            )
            .collect();
        let answers = {
            let claims: Vec<Claim<'_>> = decoded
                .iter()
                .filter_map(|d| match d {
                    Decoded::Request(job, req) => Some(self.claim(job, req)),
                    Decoded::Answered(_) => None,
                })
                .collect();
            self.registry.reserve_many(&claims).await
        };
        let mut answers = answers.into_iter();
        let mut out = Vec::with_capacity(decoded.len());
        for d in decoded {
            let (job, req) = match d {
                Decoded::Request(job, req) => (job, req),
                Decoded::Answered(answered) => {
                    out.push(answered);
                    continue;
                }
            };
            let reserved = match answers.next() {
                Some(Ok(_)) => Ok(()),
                Some(Err(e)) if !e.is_transient() => Err(e),
                // Not decided (the store failed for now): the one retry policy takes it up.
                Some(Err(_)) | None => self.reserve(&job, &req).await,
            };
            out.push(self.admission(job, req, reserved, attempt, &started_at, clock));
        }
        out
    }

    /// What a job's reservation made of it.
    fn admission(
        &self,
        job: Job,
        req: CreateRequest,
        reserved: Result<(), RegistryError>,
        attempt: u32,
        started_at: &str,
        clock: Instant,
    ) -> Admission {
        let answered = |err: &ApiError| Admission::Answered {
            result: JobResult::failed(&job, err, started_at.to_owned(), attempt),
            clock,
        };
        match reserved {
            Ok(()) => Admission::Admitted(Box::new(Admitted {
                job,
                req,
                attempt,
                started_at: started_at.to_owned(),
                clock,
            })),
            Err(RegistryError::QuotaExceeded) => answered(&ApiError::QuotaExceeded),
            Err(RegistryError::AlreadyExists) => answered(&ApiError::AlreadyExists),
            Err(RegistryError::AlreadyDelivered) => Admission::AnsweredBefore { job, req, clock },
            Err(e) => match self.give_up(&job, attempt, started_at, &e) {
                Ok(result) => Admission::Answered { result, clock },
                Err(why) => Admission::HandBack(why),
            },
        }
    }

    /// Everything after admission: the key pair (key, upstream, commit), its delivery through
    /// `sink`, and the registry's confirmation.
    pub async fn complete<S: Sink>(&self, admission: Admission, sink: &S) -> Finished {
        let (result, clock) = match admission {
            Admission::Answered { result, clock } => (result, clock),
            Admission::HandBack(why) => return Finished::HandBack(why),
            Admission::AnsweredBefore { job, req, clock } => {
                if !S::ANSWERS_REPEATED_JOBS {
                    self.settle(sink, &job.batch_id, job.job_id, CREATED).await;
                    return Finished::AnsweredBefore;
                }
                let result = match self.delivered_earlier(&job, &req, sink).await {
                    Some(result) => result,
                    None => JobResult::failed(&job, &ApiError::AlreadyExists, now_rfc3339(), 1),
                };
                (result, clock)
            }
            Admission::Admitted(admitted) => {
                let clock = admitted.clock;
                // Up to the delivery, a job whose sink is gone stops where it is: dropped at
                // an await, as a crash would leave it, which the registry is built to survive.
                // Its other attempt takes up the reservation or replaces the undelivered pair.
                let created = tokio::select! {
                    biased;
                    _ = sink.gone() => return Finished::Abandoned,
                    created = self.create(*admitted, sink) => created,
                };
                match created {
                    Ok(result) => (result, clock),
                    Err(finished) => return finished,
                }
            }
        };
        self.deliver(result, clock, sink).await
    }

    /// Answers input that never became a job (an unreadable row or message) through `sink`.
    pub async fn answer<S: Sink>(&self, result: JobResult, sink: &S) -> Finished {
        self.deliver(result, Instant::now(), sink).await
    }

    /// The claim a job makes on its name.
    fn claim<'a>(&self, job: &Job, req: &'a CreateRequest) -> Claim<'a> {
        Claim {
            scope: &req.scope,
            name: &req.name,
            job_id: job.job_id,
            quota: self.settings.quota.for_region(&req.scope.region),
            ttl_ms: self.settings.reservation_ttl.as_millis() as i64,
        }
    }

    /// Reserves the job's name, retried by the one policy.
    async fn reserve(&self, job: &Job, req: &CreateRequest) -> Result<(), RegistryError> {
        let claim = self.claim(job, req);
        self.retry
            .run("reserve", &self.shutdown, || self.registry.reserve(&claim))
            .await
            .map(|_| ())
    }

    /// Key, upstream and commit, retried as a whole while keyfleet's own machinery fails (each
    /// try finds the job's reservation again by job id).
    async fn create<S: Sink>(&self, a: Admitted, sink: &S) -> Result<JobResult, Finished> {
        let retried = AtomicBool::new(false);
        let made = self
            .retry
            .run("create", &self.shutdown, || async {
                if retried.swap(true, Ordering::Relaxed) {
                    match self.reserve(&a.job, &a.req).await {
                        Ok(()) => {}
                        Err(RegistryError::QuotaExceeded) => {
                            return Ok(self.failed(&a, &ApiError::QuotaExceeded))
                        }
                        Err(RegistryError::AlreadyExists) => {
                            return Ok(self.failed(&a, &ApiError::AlreadyExists))
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                self.make(&a, sink).await
            })
            .await;
        match made {
            Ok(result) => Ok(result),
            // Another attempt of this job (its message came back to another worker while this
            // one was slow) delivered the pair: this job is answered.
            Err(LifecycleError::Registry(RegistryError::AlreadyDelivered)) => {
                Err(Finished::AnsweredBefore)
            }
            Err(e) => {
                // Whatever we held goes back, so the quota slot is not kept until the TTL.
                let _ = self
                    .registry
                    .release(&a.req.scope, &a.req.name, a.job.job_id)
                    .await;
                self.give_up(&a.job, a.attempt, &a.started_at, &e)
                    .map_err(Finished::HandBack)
            }
        }
    }

    /// Whether a pair made for sink `S` is committed delivered, with no mark after: when
    /// delivering to `S` cannot fail, and a commit reported failed certainly did not happen
    /// (else the job's retry could meet its own delivered pair, which it may not replace,
    /// with the key gone).
    fn delivered_at_commit<S: Sink>() -> bool {
        S::DELIVERED_AT_COMMIT && R::FAILED_COMMIT_IS_CERTAIN
    }

    fn failed(&self, a: &Admitted, err: &ApiError) -> JobResult {
        JobResult::failed(&a.job, err, a.started_at.clone(), a.attempt)
    }

    /// A rerun's line for a row whose pair this same job delivered before: the pair as the
    /// registry holds it, when its key file still holds its key (`None`: answer AlreadyExist).
    async fn delivered_earlier<S: Sink>(
        &self,
        job: &Job,
        req: &CreateRequest,
        sink: &S,
    ) -> Option<JobResult> {
        let Ok(Some(Entry::Pair(record))) = self.registry.lookup(&req.scope, &req.name).await
        else {
            return None;
        };
        if record.job_id != job.job_id || !record.delivered {
            return None;
        }
        match sink.at_destination(&req.scope, &req.name).await {
            AtDestination::Key { key, .. } if key.public_line == record.public_key => {}
            _ => return None,
        }
        let now = now_rfc3339();
        Some(created_result(job, req, record, 1, now, None))
    }

    /// The key for this try: one an interrupted attempt of this job left at the destination,
    /// or a new one. `Err` is the row's answer when the destination holds something else.
    async fn key_for<S: Sink>(
        &self,
        a: &Admitted,
        sink: &S,
    ) -> Result<Result<KeyMaterial, ApiError>, LifecycleError> {
        let (job, req) = (&a.job, &a.req);
        match sink.at_destination(&req.scope, &req.name).await {
            AtDestination::Free => {}
            AtDestination::Key { key, at } => {
                // Taken up only when the registry knows it as one of this job's keys. A key
                // it does not — a deleted pair's, another run's, the user's own — is never
                // registered again nor overwritten.
                let entry = self.registry.lookup(&req.scope, &req.name).await?;
                let own =
                    entry.is_some_and(|e| e.tried_keys_for(job.job_id).contains(&key.public_line));
                if own {
                    tracing::info!(job = %job.job_id, line = job.line, "taking up the key file an interrupted attempt left");
                    return Ok(Ok(key));
                }
                return Ok(Err(ApiError::Internal(format!(
                    "refusing to overwrite existing key file {at}: it holds a key this row did not make"
                ))));
            }
            AtDestination::Occupied(why) => return Ok(Err(ApiError::Internal(why))),
        }
        let (bits, engine) = (job.key_bits, self.settings.engine);
        Ok(Ok(
            match self.reservoir.as_ref().and_then(|r| r.take(bits)) {
                Some(ready) => ready,
                None => {
                    // Its commit and key file follow in a few milliseconds: the writers may
                    // wait for them (`group.rs`).
                    let _coming = crate::group::expect_company();
                    self.cpu
                        .run(move || {
                            let t = Instant::now();
                            let key = keygen::generate_private(bits, engine)?;
                            crate::telemetry::metrics::keygen(bits.bits(), t.elapsed());
                            keygen::encode(&key)
                        })
                        .await??
                }
            },
        ))
    }

    /// One try at the key pair: a key (from the destination, the reservoir or the rayon pool),
    /// its registration upstream, and the commit of its record.
    async fn make<S: Sink>(&self, a: &Admitted, sink: &S) -> Result<JobResult, LifecycleError> {
        let (job, req) = (&a.job, &a.req);
        let scope = &req.scope;
        let keys = match self.key_for(a, sink).await? {
            Ok(keys) => keys,
            Err(refused) => {
                self.registry.release(scope, &req.name, job.job_id).await?;
                return Ok(self.failed(a, &refused));
            }
        };
        // A key about to leave for a cloud is noted first, so a later attempt can recognise it
        // there (exactly once against a cloud whose answer was lost).
        let tried = if self.upstream.is_remote() {
            self.registry
                .note_key(scope, &req.name, job.job_id, &keys.public_line)
                .await?
        } else {
            Vec::new()
        };
        let registration = Registration {
            req,
            job_id: job.job_id,
            public_key: &keys.public_line,
            fingerprint_md5: &keys.fingerprint_md5,
            tried: &tried,
        };
        let registered = match self.upstream.register(&registration).await {
            Ok(r) => r,
            Err(e) => {
                self.registry.release(scope, &req.name, job.job_id).await?;
                return Ok(self.failed(a, &e));
            }
        };
        let (key_pair_id, key_pair_fingerprint) = dialect::key_pair_identity_with(
            scope,
            &keys.fingerprint_md5,
            &keys.public_line,
            registered.key_pair_id,
        );
        let earlier_keys: Vec<String> = tried
            .into_iter()
            .filter(|k| *k != keys.public_line)
            .collect();
        let record = KeyPairRecord {
            scope: scope.clone(),
            name: req.name.clone(),
            job_id: job.job_id,
            key_pair_id: key_pair_id.clone(),
            key_pair_fingerprint: key_pair_fingerprint.clone(),
            fingerprint_md5: keys.fingerprint_md5.clone(),
            fingerprint_sha256: keys.fingerprint_sha256.clone(),
            public_key: keys.public_line.clone(),
            created_at: unix_now(),
            tags: req.tags.clone(),
            resource_group_id: req.resource_group_id.clone(),
            zone: req.zone.clone(),
            delivered: Self::delivered_at_commit::<S>(),
            earlier_keys,
        };
        // A failed commit means our reservation was taken over (we were slower than its TTL):
        // nothing of ours is registered, so the job can safely be tried again.
        self.registry.commit(&record).await?;
        let private_key = Some(SecretPem(keys.private_pem));
        Ok(created_result(
            job,
            req,
            record,
            a.attempt,
            a.started_at.clone(),
            private_key,
        ))
    }

    /// Internal errors outlasted the retry policy (or shutdown came): the job's answer, an
    /// internal error, or why it is handed back, as the mode's policy says.
    fn give_up(
        &self,
        job: &Job,
        attempt: u32,
        started_at: &str,
        e: &dyn std::fmt::Display,
    ) -> Result<JobResult, String> {
        match self.retry.give_up {
            GiveUp::HandBack => {
                let why = if self.shutdown.is_cancelled() {
                    format!("shutting down: {e}")
                } else {
                    format!("internal error for the whole retry window: {e}")
                };
                tracing::error!(job = %job.job_id, "handing the job back: {why}");
                Err(why)
            }
            GiveUp::Answer => Ok(JobResult::failed(
                job,
                &ApiError::Internal(e.to_string()),
                started_at.to_owned(),
                attempt,
            )),
        }
    }

    /// A delivered result whose job cannot be settled (the registry did not confirm it): hand
    /// the job back, or where nothing can be handed back, answer it as an internal error.
    fn unsettled(&self, result: JobResult, clock: Instant, why: String) -> Finished {
        match self.retry.give_up {
            GiveUp::HandBack => Finished::HandBack(why),
            GiveUp::Answer => {
                let result = result.fail_with(&ApiError::Internal(why));
                self.record(&result, clock);
                Finished::Delivered(result)
            }
        }
    }

    /// Delivers `result`, then confirms a created pair (or abandons it when it cannot be
    /// delivered), settles the job with the sink and records its metrics.
    async fn deliver<S: Sink>(&self, mut result: JobResult, clock: Instant, sink: &S) -> Finished {
        let pair = result
            .key_pair_name
            .clone()
            .zip(result.region.clone())
            .filter(|_| result.is_created())
            .map(|(name, region)| {
                let scope = dialect::Scope {
                    provider: result.provider,
                    owner: result.owner.clone(),
                    region,
                };
                (scope, name)
            });
        match sink.deliver(&mut result).await {
            Ok(()) => {}
            Err(DeliveryError::Unconfirmed(why)) => {
                tracing::warn!(job = %result.job_id, "result not confirmed, handing the job back: {why}");
                return Finished::HandBack(why);
            }
            Err(DeliveryError::Undeliverable(why)) => {
                if let Some((scope, name)) = &pair {
                    // The private key is gone with the failed delivery: the pair must not stay
                    // registered. If the registry is away the job is handed back instead, and
                    // its next attempt replaces the pair.
                    let released = self
                        .retry
                        .run("release", &self.shutdown, || {
                            self.registry.release(scope, name, result.job_id)
                        })
                        .await;
                    if let Err(e) = released {
                        let why = format!("{why}; and releasing the pair: {e}");
                        return self.unsettled(result, clock, why);
                    }
                }
                let result = result.fail_with(&ApiError::Internal(why.clone()));
                self.record(&result, clock);
                return Finished::Undeliverable {
                    result,
                    reason: why,
                };
            }
        }
        if let Some((scope, name)) = &pair {
            if !Self::delivered_at_commit::<S>() {
                let confirmed = self
                    .retry
                    .run("mark delivered", &self.shutdown, || {
                        self.registry.mark_delivered(scope, name, result.job_id)
                    })
                    .await;
                // Another attempt of this job replaced or released the pair: this copy of the
                // result is superseded (readers check the registry), and the job must still
                // get its one answer, so it goes back.
                if let Err(e) = confirmed {
                    let why = format!("marking the pair delivered: {e}");
                    return self.unsettled(result, clock, why);
                }
            }
            self.quota_changed(scope);
        }
        self.settle(
            sink,
            &result.batch_id,
            result.job_id,
            result.outcome_label(),
        )
        .await;
        self.record(&result, clock);
        Finished::Delivered(result)
    }

    async fn settle<S: Sink>(&self, sink: &S, batch_id: &str, job_id: Uuid, outcome: &str) {
        let settled = self
            .retry
            .run("batch status", &self.shutdown, || {
                sink.settled(batch_id, job_id, outcome)
            })
            .await;
        if let Err(e) = settled {
            // Progress counting only: the answer itself is out, so the job is not held for it.
            tracing::warn!(job = %job_id, "batch status not recorded: {e}");
        }
    }

    /// Settles, in one call where the sink can, jobs of one batch whose sinks left settling
    /// to the end of their message (a v2 message's jobs in the worker), retried by the one
    /// policy like a single job's.
    pub async fn settle_many<S: Sink>(&self, sink: &S, batch_id: &str, outcomes: &[(Uuid, &str)]) {
        let settled = self
            .retry
            .run("batch status", &self.shutdown, || {
                sink.settled_many(batch_id, outcomes)
            })
            .await;
        if let Err(e) = settled {
            tracing::warn!(jobs = outcomes.len(), "batch status not recorded: {e}");
        }
    }

    /// The job's metrics, in one place for every mode.
    fn record(&self, result: &JobResult, clock: Instant) {
        crate::telemetry::metrics::job_finished(
            result.provider.as_str(),
            result.outcome_label(),
            clock.elapsed(),
        );
    }
}

/// The created result of `record`: with its private key when it was just made, or listed again
/// (`private_key` `None`) for a rerun whose earlier run delivered it.
fn created_result(
    job: &Job,
    req: &CreateRequest,
    record: KeyPairRecord,
    attempt: u32,
    started_at: String,
    private_key: Option<SecretPem>,
) -> JobResult {
    let response = dialect::success_body(
        req,
        &dialect::Created {
            request_id: Uuid::new_v4(),
            key_pair_id: record.key_pair_id.as_deref().unwrap_or(""),
            create_time: record.created_at,
            fingerprint: &record.key_pair_fingerprint,
            private_key_body: "",
        },
    );
    JobResult {
        owner: record.scope.owner.clone(),
        key_pair_name: Some(record.name),
        region: Some(record.scope.region.clone()),
        response,
        attempt,
        started_at,
        finished_at: now_rfc3339(),
        status: Status::Created(CreatedPair {
            public_key: record.public_key,
            fingerprint_md5: record.fingerprint_md5,
            fingerprint_sha256: record.fingerprint_sha256,
            key_pair_fingerprint: record.key_pair_fingerprint,
            key_pair_id: record.key_pair_id,
            delivered_earlier: private_key.is_none(),
            private_key,
        }),
        ..JobResult::of_job(job)
    }
}
