//! Jobs (one key-pair creation request) and their results: the in-process form of the
//! message contract. Both serialize to the versioned JSON documented in docs/distributed.md
//! (a job message of several jobs is in `message`, a results message of several results in
//! `results_message`).

pub mod batch;
pub mod jobs_per_message;
pub mod message;
pub mod packer;
pub mod results_message;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::dialect::{self, ApiError, Provider};
use crate::keys::keygen::KeyBits;
use crate::time::now_rfc3339;

/// The message-format version this build reads and writes.
pub const MESSAGE_VERSION: u32 = 1;

/// One key-pair creation request, as produced by a batch file or a job message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    pub v: u32,
    pub job_id: Uuid,
    pub batch_id: String,
    /// Where the request came from in its batch file (1-based line number), if it came from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    pub provider: Provider,
    /// Alibaba: the account; UCloud: the project used when `ProjectId` is absent.
    pub owner: String,
    /// The dialect's request parameters under their API names.
    pub params: BTreeMap<String, String>,
    #[serde(default)]
    pub key_bits: KeyBits,
}

/// Why a job message cannot be run: such a message is dead-lettered with this reason (the
/// variant names the metric's reason label).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON, or not the job format (a missing, mistyped or unknown field).
    #[error("not a keyfleet job message: {0}")]
    NotAJob(String),
    #[error("unsupported message version v={0} (this worker reads v=1 and v=2)")]
    UnsupportedVersion(u64),
    #[error("batch_id must be 1 to 200 bytes without control characters")]
    BatchId,
}

impl DecodeError {
    /// The `reason` label of `keyfleet_dead_lettered_total`.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            DecodeError::NotAJob(_) | DecodeError::BatchId => "undecodable",
            DecodeError::UnsupportedVersion(_) => "unsupported_version",
        }
    }
}

impl Job {
    /// Reads a job message. The version is looked at first, so a message of a later version
    /// is reported as such even when its fields are ones this build does not know.
    pub fn decode(data: &[u8]) -> Result<Job, DecodeError> {
        #[derive(Deserialize)]
        struct Versioned {
            v: u64,
        }
        if let Ok(Versioned { v }) = serde_json::from_slice::<Versioned>(data) {
            if v != u64::from(MESSAGE_VERSION) {
                return Err(DecodeError::UnsupportedVersion(v));
            }
        }
        let job: Job =
            serde_json::from_slice(data).map_err(|e| DecodeError::NotAJob(e.to_string()))?;
        check_batch_id(&job.batch_id)?;
        Ok(job)
    }
}

/// The one rule for batch ids, for job messages and the command line alike: 1 to 200 bytes
/// (with the longest `--prefix`, the results queue's name stays within AMQP's 255), no control
/// characters (they would corrupt logs and file names).
pub fn check_batch_id(id: &str) -> Result<(), DecodeError> {
    if id.is_empty() || id.len() > 200 || id.chars().any(char::is_control) {
        return Err(DecodeError::BatchId);
    }
    Ok(())
}

/// A private key travelling from key generation to the one place it is delivered.
/// Never serialized by derive, never printed.
pub struct SecretPem(pub Zeroizing<String>);

impl fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretPem(<redacted>)")
    }
}

/// The outcome of one job. In memory it is typed ([`Status`]); on the wire it is the flat v1
/// message and manifest format of the README, where the fields of the other status are `null`
/// (see [`wire`]).
#[derive(Debug)]
pub struct JobResult {
    pub v: u32,
    pub job_id: Uuid,
    pub batch_id: String,
    pub line: Option<u64>,
    pub provider: Provider,
    pub owner: String,
    pub key_pair_name: Option<String>,
    pub region: Option<String>,
    /// The dialect's response body exactly as the API answers, except that `PrivateKeyBody`
    /// is left empty here: the sink fills it with the key (results queue) or the key file's
    /// path (manifest), so the key is in exactly one place.
    pub response: serde_json::Value,
    pub attempt: u32,
    pub started_at: String,
    pub finished_at: String,
    pub status: Status,
}

/// Created or failed, with what only that status has.
#[derive(Debug)]
pub enum Status {
    Created(CreatedPair),
    Failed(Failure),
}

/// What a created result carries besides the common fields.
#[derive(Debug)]
pub struct CreatedPair {
    /// The OpenSSH public key line.
    pub public_key: String,
    pub fingerprint_md5: String,
    pub fingerprint_sha256: String,
    /// The dialect's `KeyPairFingerPrint` (UCloud's differs from the key's MD5).
    pub key_pair_fingerprint: String,
    /// UCloud's `KeyPairId`; `None` for Alibaba.
    pub key_pair_id: Option<String>,
    /// The private key, from key generation until a sink takes it; never serialized.
    pub private_key: Option<SecretPem>,
    /// Listed again, not made: an earlier run of the same job delivered this pair, and its key
    /// file is in place (a rerun's manifest lists every row of the batch). Never on the wire.
    pub delivered_earlier: bool,
}

/// Why a job failed, as its API answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub http_status: u16,
    /// The error code (Alibaba code, or UCloud RetCode as a string).
    pub code: String,
    pub message: String,
}

/// Takes the private key out of the response's `PrivateKeyBody` (a result message carries it
/// there, as the API would), leaving the field empty.
pub fn take_private_key_body(
    provider: Provider,
    response: &mut serde_json::Value,
) -> Option<SecretPem> {
    let slot = dialect::private_key_slot(provider, response)?;
    match std::mem::replace(slot, serde_json::Value::String(String::new())) {
        serde_json::Value::String(s) if !s.is_empty() => Some(SecretPem(Zeroizing::new(s))),
        _ => None,
    }
}

/// Puts `body` into the response's `PrivateKeyBody` field, wherever the dialect keeps it.
pub fn set_private_key_body(provider: Provider, response: &mut serde_json::Value, body: &str) {
    if let Some(slot) = dialect::private_key_slot(provider, response) {
        *slot = serde_json::Value::String(body.to_owned());
    }
}

/// Job ids are derived from the batch id and the line, so a re-run of the same batch after a
/// crash finds its own undelivered key pairs and replaces them instead of failing: the
/// name-based UUID of `keyfleet:<batch id>:<line>`.
pub fn job_id(batch_id: &str, line: u64) -> Uuid {
    let mut digits = itoa::Buffer::new();
    name_based_id(&[
        b"keyfleet:",
        batch_id.as_bytes(),
        b":",
        digits.format(line).as_bytes(),
    ])
}

/// The version-5 (SHA-1, name-based) UUID in the OID namespace of the name that `parts` make
/// when joined — what `Uuid::new_v5(&Uuid::NAMESPACE_OID, name)` gives, with the name fed in
/// pieces (no joined copy) and hashed by the `sha1` crate, which uses the CPU's SHA
/// instructions where it has them (uuid's own SHA-1 is portable code: it was a tenth of
/// `submit`'s packing thread, two hashes a row).
pub fn name_based_id(parts: &[&[u8]]) -> Uuid {
    use sha1::Digest;
    let mut hash = sha1::Sha1::new();
    hash.update(Uuid::NAMESPACE_OID.as_bytes());
    for part in parts {
        hash.update(part);
    }
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

impl JobResult {
    /// A result in this build's message version for the job (or unreadable input) `job_id`
    /// names, the rest blank for its constructor to fill in: no name, region or response,
    /// attempt 0, no times, failed without a reason yet.
    fn blank(
        job_id: Uuid,
        batch_id: String,
        line: Option<u64>,
        provider: Provider,
        owner: String,
    ) -> JobResult {
        JobResult {
            v: MESSAGE_VERSION,
            job_id,
            batch_id,
            line,
            provider,
            owner,
            key_pair_name: None,
            region: None,
            response: serde_json::Value::Null,
            attempt: 0,
            started_at: String::new(),
            finished_at: String::new(),
            status: Status::Failed(Failure {
                http_status: 0,
                code: String::new(),
                message: String::new(),
            }),
        }
    }

    /// [`JobResult::blank`] for `job`: its id, batch, line, provider and owner.
    pub(crate) fn of_job(job: &Job) -> JobResult {
        JobResult::blank(
            job.job_id,
            job.batch_id.clone(),
            job.line,
            job.provider,
            job.owner.clone(),
        )
    }

    /// A failed result for a job that could not be served.
    pub fn failed(job: &Job, err: &ApiError, started_at: String, attempt: u32) -> JobResult {
        JobResult {
            key_pair_name: job.params.get("KeyPairName").cloned(),
            region: job.params.get(dialect::region_param(job.provider)).cloned(),
            attempt,
            started_at,
            ..JobResult::of_job(job)
        }
        .fail_with(err)
    }

    /// A failed result for a batch row that never became a job (bad quoting, bad provider).
    pub fn rejected_row(
        batch_id: &str,
        line: u64,
        provider: Provider,
        owner: &str,
        reason: &str,
    ) -> JobResult {
        JobResult::rejected(
            batch_id,
            job_id(batch_id, line),
            Some(line),
            provider,
            owner,
            reason,
        )
    }

    /// A failed result for input that never became a job: a batch row or a job message that
    /// cannot be read. `job_id` identifies the input, so a repeated copy is the same answer.
    pub fn rejected(
        batch_id: &str,
        job_id: Uuid,
        line: Option<u64>,
        provider: Provider,
        owner: &str,
        reason: &str,
    ) -> JobResult {
        JobResult {
            attempt: 1,
            started_at: now_rfc3339(),
            ..JobResult::blank(job_id, batch_id.into(), line, provider, owner.into())
        }
        .fail_with(&ApiError::InvalidParameter {
            name: "row".into(),
            reason: reason.to_owned(),
        })
    }

    /// This result turned into a failure with `err` (a created pair that could not be
    /// delivered, or a fresh answer): the key, if any, is dropped (zeroized) here.
    pub fn fail_with(mut self, err: &ApiError) -> JobResult {
        let reply = err.reply(self.provider);
        self.response = dialect::error_body(self.provider, err, Uuid::new_v4());
        self.finished_at = now_rfc3339();
        self.status = Status::Failed(Failure {
            http_status: reply.http_status,
            code: reply.code,
            // The response body stays as the API would answer; the manifest's message also
            // says what went wrong inside keyfleet, so an operator can act on it.
            message: match err {
                ApiError::Internal(detail) => format!("{} ({detail})", reply.message),
                _ => reply.message,
            },
        });
        self
    }

    pub fn is_created(&self) -> bool {
        matches!(self.status, Status::Created(_))
    }

    pub fn created(&self) -> Option<&CreatedPair> {
        match &self.status {
            Status::Created(c) => Some(c),
            Status::Failed(_) => None,
        }
    }

    pub fn created_mut(&mut self) -> Option<&mut CreatedPair> {
        match &mut self.status {
            Status::Created(c) => Some(c),
            Status::Failed(_) => None,
        }
    }

    pub fn failure(&self) -> Option<&Failure> {
        match &self.status {
            Status::Failed(f) => Some(f),
            Status::Created(_) => None,
        }
    }

    /// The one outcome label of a result, used by metrics, batch status and summaries:
    /// `created`, or the error code its API answered with.
    pub fn outcome_label(&self) -> &str {
        match &self.status {
            Status::Created(c) if c.delivered_earlier => DELIVERED_EARLIER,
            Status::Created(_) => CREATED,
            Status::Failed(f) => &f.code,
        }
    }

    /// Takes the private key out of a created result (for its one delivery).
    pub fn take_private_key(&mut self) -> Option<SecretPem> {
        self.created_mut()?.private_key.take()
    }
}

/// The outcome label of a created result.
pub const CREATED: &str = "created";

/// The outcome label of a row whose pair an earlier run of the same job delivered.
pub const DELIVERED_EARLIER: &str = "delivered_earlier";

pub mod wire {
    //! The v1 wire form of [`JobResult`]: one flat object, field order as published in the
    //! README, the other status's fields present as `null`. Hand-written (de)serialization
    //! keeps the message and manifest formats byte for byte as they were while the in-memory
    //! type says what it means.

    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use uuid::Uuid;

    use super::{CreatedPair, Failure, JobResult, Status};
    use crate::dialect::Provider;

    #[derive(Serialize)]
    struct Out<'a> {
        v: u32,
        job_id: Uuid,
        batch_id: &'a str,
        line: Option<u64>,
        provider: Provider,
        status: &'static str,
        http_status: u16,
        code: Option<&'a str>,
        message: Option<&'a str>,
        key_pair_name: Option<&'a str>,
        region: Option<&'a str>,
        owner: &'a str,
        response: &'a serde_json::Value,
        public_key: Option<&'a str>,
        fingerprint_md5: Option<&'a str>,
        fingerprint_sha256: Option<&'a str>,
        key_pair_fingerprint: Option<&'a str>,
        key_pair_id: Option<&'a str>,
        attempt: u32,
        started_at: &'a str,
        finished_at: &'a str,
    }

    #[derive(Deserialize)]
    struct In {
        v: u32,
        job_id: Uuid,
        batch_id: String,
        line: Option<u64>,
        provider: Provider,
        status: String,
        http_status: u16,
        code: Option<String>,
        message: Option<String>,
        key_pair_name: Option<String>,
        region: Option<String>,
        owner: String,
        response: serde_json::Value,
        public_key: Option<String>,
        fingerprint_md5: Option<String>,
        fingerprint_sha256: Option<String>,
        key_pair_fingerprint: Option<String>,
        key_pair_id: Option<String>,
        attempt: u32,
        started_at: String,
        finished_at: String,
    }

    impl Serialize for JobResult {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let (created, failed) = match &self.status {
                Status::Created(c) => (Some(c), None),
                Status::Failed(f) => (None, Some(f)),
            };
            Out {
                v: self.v,
                job_id: self.job_id,
                batch_id: &self.batch_id,
                line: self.line,
                provider: self.provider,
                status: if created.is_some() {
                    "created"
                } else {
                    "failed"
                },
                http_status: failed.map_or(200, |f| f.http_status),
                code: failed.map(|f| f.code.as_str()),
                message: failed.map(|f| f.message.as_str()),
                key_pair_name: self.key_pair_name.as_deref(),
                region: self.region.as_deref(),
                owner: &self.owner,
                response: &self.response,
                public_key: created.map(|c| c.public_key.as_str()),
                fingerprint_md5: created.map(|c| c.fingerprint_md5.as_str()),
                fingerprint_sha256: created.map(|c| c.fingerprint_sha256.as_str()),
                key_pair_fingerprint: created.map(|c| c.key_pair_fingerprint.as_str()),
                key_pair_id: created.and_then(|c| c.key_pair_id.as_deref()),
                attempt: self.attempt,
                started_at: &self.started_at,
                finished_at: &self.finished_at,
            }
            .serialize(s)
        }
    }

    impl<'de> Deserialize<'de> for JobResult {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            use serde::de::Error;
            let w = In::deserialize(d)?;
            let need = |v: Option<String>, field: &str| {
                v.ok_or_else(|| D::Error::custom(format!("a created result has no {field}")))
            };
            let status = match w.status.as_str() {
                "created" => Status::Created(CreatedPair {
                    public_key: need(w.public_key, "public_key")?,
                    fingerprint_md5: need(w.fingerprint_md5, "fingerprint_md5")?,
                    fingerprint_sha256: need(w.fingerprint_sha256, "fingerprint_sha256")?,
                    key_pair_fingerprint: need(w.key_pair_fingerprint, "key_pair_fingerprint")?,
                    key_pair_id: w.key_pair_id,
                    private_key: None,
                    delivered_earlier: false,
                }),
                "failed" => Status::Failed(Failure {
                    http_status: w.http_status,
                    code: w
                        .code
                        .ok_or_else(|| D::Error::custom("a failed result has no code"))?,
                    message: w.message.unwrap_or_default(),
                }),
                other => {
                    return Err(D::Error::unknown_variant(other, &["created", "failed"]));
                }
            };
            Ok(JobResult {
                v: w.v,
                job_id: w.job_id,
                batch_id: w.batch_id,
                line: w.line,
                provider: w.provider,
                owner: w.owner,
                key_pair_name: w.key_pair_name,
                region: w.region,
                response: w.response,
                attempt: w.attempt,
                started_at: w.started_at,
                finished_at: w.finished_at,
                status,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_stable_per_batch_and_line() {
        assert_eq!(job_id("b", 2), job_id("b", 2));
        assert_ne!(job_id("b", 2), job_id("b", 3));
        assert_ne!(job_id("b", 2), job_id("c", 2));
    }

    #[test]
    fn job_ids_are_the_name_based_uuids_of_batch_and_line_as_before() {
        // Ids already in queues, registries and manifests were made by uuid's own v5; a rerun
        // must find them, so the hash in pieces has to give the same ids.
        // The expected ids are Python's `uuid.uuid5(uuid.NAMESPACE_OID, name)`.
        assert_eq!(
            job_id("b", 2).to_string(),
            "229f8d20-67bc-509b-9fea-4d97888b4182"
        );
        assert_eq!(
            job_id("批次-7", u64::MAX).to_string(),
            "f33b42fe-5324-5ddc-a4fc-104245ab8c59"
        );
    }

    proptest::proptest! {
        #[test]
        fn name_based_ids_are_uuid_v5_of_the_joined_name(
            parts in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..90), 0..6),
            batch in ".{0,40}",
            line in proptest::num::u64::ANY,
        ) {
            let slices: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
            proptest::prop_assert_eq!(
                name_based_id(&slices),
                Uuid::new_v5(&Uuid::NAMESPACE_OID, &parts.concat())
            );
            proptest::prop_assert_eq!(
                job_id(&batch, line),
                Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("keyfleet:{batch}:{line}").as_bytes())
            );
        }
    }

    #[test]
    fn secret_pem_debug_is_redacted() {
        let s = SecretPem(Zeroizing::new("-----BEGIN PRIVATE KEY-----".into()));
        assert_eq!(format!("{s:?}"), "SecretPem(<redacted>)");
    }
}
