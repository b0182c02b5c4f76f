//! Jobs (one key-pair creation request) and their results: the in-process form of the
//! message contract. Both serialize to the versioned JSON documented in the README.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::dialect::{self, ApiError, Provider};
use crate::keygen::KeyBits;

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Created,
    Failed,
}

/// A private key travelling from key generation to the one place it is delivered.
/// Never serialized by derive, never printed.
pub struct SecretPem(pub Zeroizing<String>);

impl fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretPem(<redacted>)")
    }
}

/// The outcome of one job.
#[derive(Debug, Serialize, Deserialize)]
pub struct JobResult {
    pub v: u32,
    pub job_id: Uuid,
    pub batch_id: String,
    pub line: Option<u64>,
    pub provider: Provider,
    pub status: Status,
    pub http_status: u16,
    /// The error code (Alibaba code, or UCloud RetCode as a string); `None` on success.
    pub code: Option<String>,
    pub message: Option<String>,
    pub key_pair_name: Option<String>,
    pub region: Option<String>,
    pub owner: String,
    /// The dialect's response body exactly as the API answers, except that `PrivateKeyBody`
    /// is left empty here: the sink fills it with the key (broker) or the key file's path
    /// (manifest), so the key is in exactly one place.
    pub response: serde_json::Value,
    pub public_key: Option<String>,
    pub fingerprint_md5: Option<String>,
    pub fingerprint_sha256: Option<String>,
    /// UCloud's KeyPairFingerPrint (a different value from the key's MD5).
    pub key_pair_fingerprint: Option<String>,
    pub key_pair_id: Option<String>,
    pub attempt: u32,
    pub started_at: String,
    pub finished_at: String,
    #[serde(skip)]
    pub private_key: Option<SecretPem>,
}

/// Takes the private key out of the response's `PrivateKeyBody` (a result message carries it
/// there, as the API would), leaving the field empty.
pub fn take_private_key_body(
    provider: Provider,
    response: &mut serde_json::Value,
) -> Option<SecretPem> {
    let slot = match provider {
        Provider::Aliyun => response.get_mut("PrivateKeyBody"),
        Provider::Ucloud => response
            .get_mut("KeyPair")
            .and_then(|kp| kp.get_mut("PrivateKeyBody")),
    }?;
    match std::mem::replace(slot, serde_json::Value::String(String::new())) {
        serde_json::Value::String(s) if !s.is_empty() => Some(SecretPem(Zeroizing::new(s))),
        _ => None,
    }
}

/// Puts `body` into the response's `PrivateKeyBody` field, wherever the dialect keeps it.
pub fn set_private_key_body(provider: Provider, response: &mut serde_json::Value, body: &str) {
    let slot = match provider {
        Provider::Aliyun => response.get_mut("PrivateKeyBody"),
        Provider::Ucloud => response
            .get_mut("KeyPair")
            .and_then(|kp| kp.get_mut("PrivateKeyBody")),
    };
    if let Some(slot) = slot {
        *slot = serde_json::Value::String(body.to_owned());
    }
}

/// RFC 3339 UTC timestamp with seconds precision, without pulling in a date crate.
pub fn now_rfc3339() -> String {
    let secs = unix_now();
    rfc3339(secs)
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Formats Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian, days-from-civil).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

impl JobResult {
    /// A failed result for a job that could not be served.
    pub fn failed(job: &Job, err: &ApiError, started_at: String, attempt: u32) -> JobResult {
        let request_id = Uuid::new_v4();
        let reply = err.reply(job.provider);
        JobResult {
            v: MESSAGE_VERSION,
            job_id: job.job_id,
            batch_id: job.batch_id.clone(),
            line: job.line,
            provider: job.provider,
            status: Status::Failed,
            http_status: reply.http_status,
            code: Some(reply.code),
            // The response body stays as the API would answer; the manifest's message also says
            // what went wrong inside keyfleet, so an operator can act on it.
            message: Some(match err {
                ApiError::Internal(detail) => format!("{} ({detail})", reply.message),
                _ => reply.message,
            }),
            key_pair_name: job.params.get("KeyPairName").cloned(),
            region: job
                .params
                .get(match job.provider {
                    Provider::Aliyun => "RegionId",
                    Provider::Ucloud => "Region",
                })
                .cloned(),
            owner: job.owner.clone(),
            response: dialect::error_body(job.provider, err, request_id),
            public_key: None,
            fingerprint_md5: None,
            fingerprint_sha256: None,
            key_pair_fingerprint: None,
            key_pair_id: None,
            attempt,
            started_at,
            finished_at: now_rfc3339(),
            private_key: None,
        }
    }

    /// A failed result for input that never became a job (an unparseable row or message).
    pub fn unparseable(
        batch_id: &str,
        line: Option<u64>,
        provider: Provider,
        owner: &str,
        reason: &str,
    ) -> JobResult {
        let job = Job {
            v: MESSAGE_VERSION,
            job_id: Uuid::new_v4(),
            batch_id: batch_id.to_owned(),
            line,
            provider,
            owner: owner.to_owned(),
            params: BTreeMap::new(),
            key_bits: KeyBits::default(),
        };
        let err = ApiError::InvalidParameter {
            name: "row".into(),
            reason: reason.to_owned(),
        };
        let now = now_rfc3339();
        JobResult::failed(&job, &err, now, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_392_000), "2026-11-23T00:00:00Z");
    }

    #[test]
    fn secret_pem_debug_is_redacted() {
        let s = SecretPem(Zeroizing::new("-----BEGIN PRIVATE KEY-----".into()));
        assert_eq!(format!("{s:?}"), "SecretPem(<redacted>)");
    }
}
