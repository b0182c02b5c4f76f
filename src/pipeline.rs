//! The pipeline stages every job goes through, in both modes: decode + validate → reserve →
//! keygen (rayon) → upstream register → commit; then the caller delivers the result and
//! confirms (or abandons) it here. Bad input never touches the quota or makes a key.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::cpu::CpuPool;
use crate::dialect::{self, ApiError, Catalog, Created, Provider, Scope};
use crate::job::{now_rfc3339, unix_now, Job, JobResult, SecretPem, Status, MESSAGE_VERSION};
use crate::keygen::{self, Engine};
use crate::registry::{KeyPairRecord, Registry, RegistryError};
use crate::reservoir::Reservoir;
use crate::upstream::Upstream;

/// The key-pair quota: one default and per-region overrides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quota {
    pub default: u64,
    pub per_region: BTreeMap<String, u64>,
}

impl Default for Quota {
    /// 500 key pairs per region, as both clouds document.
    fn default() -> Self {
        Quota {
            default: 500,
            per_region: BTreeMap::new(),
        }
    }
}

impl Quota {
    pub fn for_region(&self, region: &str) -> u64 {
        self.per_region.get(region).copied().unwrap_or(self.default)
    }
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub catalog: Catalog,
    pub quota: Quota,
    pub engine: Engine,
    /// How long a reservation holds a name before a crashed job's slot may be taken over.
    pub reservation_ttl: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            catalog: Catalog::default(),
            quota: Quota::default(),
            engine: Engine::default(),
            reservation_ttl: Duration::from_secs(300),
        }
    }
}

/// A failure that is not the request's fault and may pass: the caller retries the job
/// (distributed mode) or answers it with an internal error (embedded mode).
#[derive(Debug, thiserror::Error)]
pub enum TransientError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Cpu(#[from] crate::cpu::CpuError),
}

/// A created key pair waiting for its result to be delivered.
#[derive(Clone, Debug)]
pub struct Pending {
    pub scope: Scope,
    pub name: String,
    pub job_id: Uuid,
}

/// A job whose name is reserved, waiting for its key.
#[derive(Debug)]
pub struct Reservation {
    pub job: Job,
    pub req: dialect::CreateRequest,
    pub pending: Pending,
    pub started_at: String,
    pub attempt: u32,
}

/// Where a job stands after [`Pipeline::reserve`].
// Short-lived and moved a handful of times per job: boxing the answer would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Stage {
    /// Already answered (bad request, quota, name taken).
    Answered(Outcome),
    Reserved(Box<Reservation>),
}

/// What a job came to before delivery.
#[derive(Debug)]
pub struct Outcome {
    pub result: JobResult,
    /// Set when a key pair was created: deliver the result, then `confirm` (or `abandon`).
    pub pending: Option<Pending>,
}

pub struct Pipeline<R, U> {
    registry: Arc<R>,
    upstream: Arc<U>,
    cpu: CpuPool,
    settings: Arc<Settings>,
    reservoir: Option<Reservoir>,
}

impl<R, U> Clone for Pipeline<R, U> {
    fn clone(&self) -> Self {
        Pipeline {
            registry: self.registry.clone(),
            upstream: self.upstream.clone(),
            cpu: self.cpu.clone(),
            settings: self.settings.clone(),
            reservoir: self.reservoir.clone(),
        }
    }
}

impl<R: Registry, U: Upstream> Pipeline<R, U> {
    pub fn new(registry: Arc<R>, upstream: Arc<U>, cpu: CpuPool, settings: Settings) -> Self {
        Pipeline {
            registry,
            upstream,
            cpu,
            settings: Arc::new(settings),
            reservoir: None,
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

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn cpu(&self) -> &CpuPool {
        &self.cpu
    }

    /// Runs every stage up to delivery. Request faults become failed results; only failures of
    /// keyfleet's own machinery come back as `Err` (the job may then be run again: its
    /// reservation is found by job id, so nothing is counted twice).
    pub async fn create(&self, job: &Job, attempt: u32) -> Result<Outcome, TransientError> {
        match self.reserve(job, attempt).await? {
            Stage::Answered(outcome) => Ok(outcome),
            Stage::Reserved(r) => self.make(r).await,
        }
    }

    /// Decode, validate and reserve the name. Cheap; `keyfleet run` does this in input order so
    /// that, of two rows with the same name, the first one wins.
    pub async fn reserve(&self, job: &Job, attempt: u32) -> Result<Stage, TransientError> {
        let started_at = now_rfc3339();
        let failed = |err: &ApiError| {
            Stage::Answered(Outcome {
                result: JobResult::failed(job, err, started_at.clone(), attempt),
                pending: None,
            })
        };
        let req = match dialect::decode(
            job.provider,
            &job.owner,
            &job.params,
            &self.settings.catalog,
        ) {
            Ok(req) => req,
            Err(e) => return Ok(failed(&e)),
        };
        let quota = self.settings.quota.for_region(&req.scope.region);
        let ttl_ms = self.settings.reservation_ttl.as_millis() as i64;
        match self
            .registry
            .reserve(&req.scope, &req.name, job.job_id, quota, ttl_ms)
            .await
        {
            Ok(_) => {}
            Err(RegistryError::QuotaExceeded) => return Ok(failed(&ApiError::QuotaExceeded)),
            Err(RegistryError::AlreadyExists) => return Ok(failed(&ApiError::AlreadyExists)),
            Err(e) => return Err(e.into()),
        }
        Ok(Stage::Reserved(Box::new(Reservation {
            pending: Pending {
                scope: req.scope.clone(),
                name: req.name.clone(),
                job_id: job.job_id,
            },
            job: job.clone(),
            req,
            started_at,
            attempt,
        })))
    }

    /// Key generation (on the rayon pool), upstream registration and commit for a reserved
    /// name. Every early exit gives the reservation back.
    pub async fn make(&self, r: Box<Reservation>) -> Result<Outcome, TransientError> {
        let Reservation {
            job,
            req,
            pending,
            started_at,
            attempt,
        } = *r;
        let scope = &pending.scope;
        let failed = |err: &ApiError| Outcome {
            result: JobResult::failed(&job, err, started_at.clone(), attempt),
            pending: None,
        };
        let (bits, engine) = (job.key_bits, self.settings.engine);
        let ready = self.reservoir.as_ref().and_then(|r| r.take(bits));
        let keys = self.cpu.run(move || {
            let key = match ready {
                Some(key) => key,
                None => {
                    let t = std::time::Instant::now();
                    let key = keygen::generate_private(bits, engine)?;
                    crate::metrics::keygen(bits.bits(), t.elapsed());
                    key
                }
            };
            keygen::encode(&key)
        });
        let keys = match keys.await {
            Ok(Ok(k)) => k,
            Ok(Err(e)) => {
                self.release(&pending).await?;
                return Ok(failed(&ApiError::Internal(e.to_string())));
            }
            Err(e) => {
                self.release(&pending).await?;
                return Err(e.into());
            }
        };
        if let Err(e) = self.upstream.register(&req, &keys.public_line).await {
            self.release(&pending).await?;
            return Ok(failed(&e));
        }
        let (key_pair_id, key_pair_fingerprint) = match job.provider {
            Provider::Aliyun => (None, keys.fingerprint_md5.clone()),
            Provider::Ucloud => {
                let id = dialect::ucloud::new_key_pair_id();
                let fp = dialect::ucloud::fingerprint(&scope.owner, &id, &keys.public_line);
                (Some(id), fp)
            }
        };
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
            delivered: false,
        };
        // A failed commit means our reservation was taken over (we were slower than its TTL):
        // nothing of ours is registered, so the job can safely be run again.
        self.registry.commit(&record).await?;
        let response = dialect::success_body(
            &req,
            &Created {
                request_id: Uuid::new_v4(),
                key_pair_id: key_pair_id.as_deref().unwrap_or(""),
                create_time: record.created_at,
                fingerprint: &key_pair_fingerprint,
                private_key_body: "",
            },
        );
        let result = JobResult {
            v: MESSAGE_VERSION,
            job_id: job.job_id,
            batch_id: job.batch_id.clone(),
            line: job.line,
            provider: job.provider,
            status: Status::Created,
            http_status: 200,
            code: None,
            message: None,
            key_pair_name: Some(record.name),
            region: Some(scope.region.clone()),
            owner: scope.owner.clone(),
            response,
            public_key: Some(record.public_key),
            fingerprint_md5: Some(record.fingerprint_md5),
            fingerprint_sha256: Some(record.fingerprint_sha256),
            key_pair_fingerprint: Some(key_pair_fingerprint),
            key_pair_id,
            attempt,
            started_at,
            finished_at: now_rfc3339(),
            private_key: Some(SecretPem(keys.private_pem)),
        };
        Ok(Outcome {
            result,
            pending: Some(pending),
        })
    }

    async fn release(&self, p: &Pending) -> Result<(), RegistryError> {
        self.registry.release(&p.scope, &p.name, p.job_id).await
    }

    /// The result reached its destination: the name now answers AlreadyExist for good.
    pub async fn confirm(&self, p: &Pending) -> Result<(), RegistryError> {
        self.registry
            .mark_delivered(&p.scope, &p.name, p.job_id)
            .await
    }

    /// The result could not be delivered: remove the key pair (its private key is gone) and
    /// turn the result into an internal error that says why.
    pub async fn abandon(
        &self,
        p: &Pending,
        result: JobResult,
        why: &str,
    ) -> Result<JobResult, RegistryError> {
        self.release(p).await?;
        let job = Job {
            v: MESSAGE_VERSION,
            job_id: result.job_id,
            batch_id: result.batch_id.clone(),
            line: result.line,
            provider: result.provider,
            owner: result.owner.clone(),
            params: BTreeMap::from([(
                "KeyPairName".to_owned(),
                result.key_pair_name.clone().unwrap_or_default(),
            )]),
            key_bits: Default::default(),
        };
        let mut failed = JobResult::failed(
            &job,
            &ApiError::Internal(why.to_owned()),
            result.started_at.clone(),
            result.attempt,
        );
        failed.region = result.region.clone();
        Ok(failed)
    }
}
