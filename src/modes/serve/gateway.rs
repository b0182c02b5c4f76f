//! The API gateway of `keyfleet serve`: everything a request goes through before its action
//! runs. Which API it speaks (Alibaba V3 by its `Authorization: ACS3-…` header; UCloud by a
//! UCloud action or a `PublicKey` parameter; Alibaba RPC otherwise), its signature, time stamp
//! and nonce, the access key's throttle, and injected faults.
//!
//! Check order (Alibaba; first failure wins): signature present → access key known → signature
//! method → time stamp well formed and within 15 minutes → signature → API version → nonce
//! unused (a nonce is remembered only once the signature is valid, so nobody can burn another
//! caller's nonces) → throttle → injected fault. UCloud signs no time stamp or nonce, so its
//! requests cannot be protected against replay (README).
//!
//! Secrets are compared in constant time; no secret, signature or string to sign containing a
//! secret (UCloud's) is ever logged.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::time::{Duration, SystemTime};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use rand_core::{OsRng, RngCore};

use super::request::ApiRequest;
use crate::credentials::{AccessKey, Credentials};
use crate::dialect::action::ActionKind;
use crate::dialect::{ApiError, GatewayError, Provider};
use crate::registry::{Registry, RegistryError};
use crate::sign;

/// How far a request's time stamp may be from the server's clock, either way (Alibaba's rule).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(15 * 60);
/// How long a nonce is remembered: longer than any time stamp stays valid (2 × the skew), so a
/// replay is refused for as long as its time stamp would pass.
pub const NONCE_TTL: Duration = Duration::from_secs(31 * 60);
/// The one Alibaba API version keyfleet speaks.
pub const ALIYUN_VERSION: &str = "2014-05-26";

/// Headers a V3 signature must cover: without them a signature could be moved to another
/// action, time or nonce.
const V3_REQUIRED_SIGNED: &[&str] = &[
    "host",
    "x-acs-action",
    "x-acs-content-sha256",
    "x-acs-date",
    "x-acs-signature-nonce",
    "x-acs-version",
];

/// Alibaba RPC parameters that belong to the gateway, not to the action.
const RPC_COMMON: &[&str] = &[
    "AccessKeyId",
    "Format",
    "Signature",
    "SignatureMethod",
    "SignatureNonce",
    "SignatureType",
    "SignatureVersion",
    "Timestamp",
    "Version",
];
const UCLOUD_COMMON: &[&str] = &["PublicKey", "Signature"];

/// How an Alibaba answer is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Xml,
}

/// The signature scheme a request uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    AliyunRpc,
    AliyunV3,
    Ucloud,
}

impl Scheme {
    pub fn provider(self) -> Provider {
        match self {
            Scheme::AliyunRpc | Scheme::AliyunV3 => Provider::Aliyun,
            Scheme::Ucloud => Provider::Ucloud,
        }
    }
}

/// When an injected fault strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The action is done, then its answer is replaced by 503 / RetCode 150: the client must
    /// find out by describing what happened.
    AfterAction,
}

/// An authenticated request, ready for its action.
#[derive(Clone, Debug)]
pub struct Caller {
    pub scheme: Scheme,
    pub key: AccessKey,
    pub format: Format,
    /// The action's name as sent.
    pub action: String,
    pub kind: ActionKind,
    /// The action's own parameters (gateway parameters removed), `Action` included.
    pub params: BTreeMap<String, String>,
    pub fault: Option<Fault>,
}

/// A request refused before its action: how to answer it.
#[derive(Debug)]
pub struct Refusal {
    pub provider: Provider,
    pub format: Format,
    /// The action's name, when known (UCloud puts it in every answer).
    pub action: Option<String>,
    pub error: ApiError,
}

pub struct Gateway {
    credentials: Credentials,
    throttle: Option<DefaultKeyedRateLimiter<String>>,
    fault_rate: f64,
}

impl Gateway {
    /// `throttle_rps` 0 = no throttle; `fault_rate` in 0..=1.
    pub fn new(credentials: Credentials, throttle_rps: u32, fault_rate: f64) -> Gateway {
        let throttle = NonZeroU32::new(throttle_rps)
            .map(|n| RateLimiter::keyed(Quota::per_second(n).allow_burst(n)));
        Gateway {
            credentials,
            throttle,
            fault_rate,
        }
    }

    pub fn scheme_of(req: &ApiRequest) -> Scheme {
        if req
            .header("authorization")
            .is_some_and(|h| h.starts_with("ACS3-"))
        {
            return Scheme::AliyunV3;
        }
        let ucloud_action = req
            .param("Action")
            .is_some_and(|a| ActionKind::parse(Provider::Ucloud, a).is_some());
        if ucloud_action || req.param("PublicKey").is_some() {
            Scheme::Ucloud
        } else {
            Scheme::AliyunRpc
        }
    }

    /// The dialect and format `req` is answered in (before anything is checked).
    pub fn shape(req: &ApiRequest) -> (Provider, Format) {
        let scheme = Gateway::scheme_of(req);
        (scheme.provider(), Gateway::format_of(req, scheme))
    }

    fn format_of(req: &ApiRequest, scheme: Scheme) -> Format {
        match scheme {
            Scheme::AliyunRpc => match req.param("Format") {
                Some(f) if f.eq_ignore_ascii_case("json") => Format::Json,
                _ => Format::Xml,
            },
            Scheme::AliyunV3 => match req.param("Format") {
                Some(f) if f.eq_ignore_ascii_case("xml") => Format::Xml,
                _ => Format::Json,
            },
            Scheme::Ucloud => Format::Json,
        }
    }

    /// Authenticates `req` and finds its action (see the module docs for the order).
    pub async fn admit<R: Registry>(
        &self,
        req: &ApiRequest,
        registry: &R,
    ) -> Result<Caller, Refusal> {
        let scheme = Gateway::scheme_of(req);
        let provider = scheme.provider();
        let format = Gateway::format_of(req, scheme);
        let action_sent = match scheme {
            Scheme::AliyunV3 => req.header("x-acs-action"),
            _ => req.param("Action"),
        }
        .map(str::to_owned);
        let refuse = |error: ApiError| Refusal {
            provider,
            format,
            action: action_sent.clone(),
            error,
        };
        let key = match scheme {
            Scheme::AliyunRpc => self.rpc(req),
            Scheme::AliyunV3 => self.v3(req),
            Scheme::Ucloud => self.ucloud(req),
        }
        .map_err(|(reason, e)| {
            crate::telemetry::metrics::signature_failure(provider.as_str(), reason);
            refuse(e.into())
        })?;
        if provider == Provider::Aliyun {
            let version = match scheme {
                Scheme::AliyunV3 => req.header("x-acs-version"),
                _ => req.param("Version"),
            };
            if version != Some(ALIYUN_VERSION) {
                return Err(refuse(GatewayError::VersionInvalid.into()));
            }
            let nonce = match scheme {
                Scheme::AliyunV3 => req.header("x-acs-signature-nonce"),
                _ => req.param("SignatureNonce"),
            };
            // Empty or blank is no nonce (issue 17, fault 10): refused as a missing one, and
            // never remembered, so it cannot stand in for a nonce on any request.
            let Some(nonce) = nonce.filter(|n| !n.trim().is_empty()) else {
                crate::telemetry::metrics::signature_failure(provider.as_str(), "missing");
                return Err(refuse(GatewayError::IncompleteSignature.into()));
            };
            let fresh = registry
                .remember_nonce(
                    &format!("{}\n{nonce}", key.id),
                    NONCE_TTL.as_millis() as i64,
                )
                .await
                .map_err(|e: RegistryError| refuse(ApiError::Internal(e.to_string())))?;
            if !fresh {
                crate::telemetry::metrics::signature_failure(provider.as_str(), "nonce_used");
                return Err(refuse(GatewayError::NonceUsed.into()));
            }
        }
        if let Some(limiter) = &self.throttle {
            if limiter
                .check_key(&format!("{}\n{}", provider.as_str(), key.id))
                .is_err()
            {
                return Err(refuse(GatewayError::Throttled.into()));
            }
        }
        let Some(action) = action_sent.clone().filter(|a| !a.is_empty()) else {
            return Err(refuse(GatewayError::ActionMissing.into()));
        };
        let Some(kind) = ActionKind::parse(provider, &action) else {
            return Err(refuse(GatewayError::ActionNotFound.into()));
        };
        let fault = if self.fault_rate > 0.0 && unit_random() < self.fault_rate {
            // Half before the action, half after it.
            if OsRng.next_u32() & 1 == 0 {
                return Err(refuse(GatewayError::Unavailable.into()));
            }
            Some(Fault::AfterAction)
        } else {
            None
        };
        let params = action_params(req, scheme, &action).map_err(refuse)?;
        Ok(Caller {
            scheme,
            key,
            format,
            action,
            kind,
            params,
            fault,
        })
    }

    fn key(&self, provider: Provider, id: Option<&str>) -> Result<AccessKey, Failure> {
        let Some(id) = id.filter(|i| !i.is_empty()) else {
            return Err(("missing", GatewayError::IncompleteSignature));
        };
        self.credentials
            .get(provider, id)
            .cloned()
            .ok_or(("unknown_key", GatewayError::AccessKeyNotFound))
    }

    fn rpc(&self, req: &ApiRequest) -> Result<AccessKey, Failure> {
        let Some(signature) = req.param("Signature").filter(|s| !s.is_empty()) else {
            return Err(("missing", GatewayError::IncompleteSignature));
        };
        let key = self.key(Provider::Aliyun, req.param("AccessKeyId"))?;
        if req.param("SignatureMethod") != Some("HMAC-SHA1") {
            return Err(("method", GatewayError::SignatureMethodInvalid));
        }
        check_time(req.param("Timestamp"))?;
        let params: Vec<(String, String)> = req
            .all_params()
            .filter(|(k, _)| k != "Signature")
            .cloned()
            .collect();
        let string_to_sign = sign::rpc::string_to_sign(req.method.as_str(), &params);
        let expected = sign::rpc::signature(key.secret.expose(), &string_to_sign);
        if !sign::ct_eq(expected.as_bytes(), signature.as_bytes()) {
            return Err((
                "mismatch",
                GatewayError::SignatureMismatch { string_to_sign },
            ));
        }
        Ok(key)
    }

    fn v3(&self, req: &ApiRequest) -> Result<AccessKey, Failure> {
        let incomplete = ("missing", GatewayError::IncompleteSignature);
        let header = req.header("authorization").unwrap_or("");
        let auth = sign::acs3::parse_authorization(header).map_err(|_| incomplete.clone())?;
        if auth.algorithm != "ACS3-HMAC-SHA256" {
            return Err(incomplete);
        }
        let key = self.key(Provider::Aliyun, Some(&auth.access_key_id))?;
        let signed: Vec<String> = auth
            .signed_headers
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        if !V3_REQUIRED_SIGNED
            .iter()
            .all(|h| signed.iter().any(|s| s == h))
        {
            return Err(incomplete);
        }
        check_time(req.header("x-acs-date"))?;
        let headers: Vec<(String, String)> = req
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        let content = req.header("x-acs-content-sha256").unwrap_or("");
        let canonical = sign::acs3::canonical_request(
            req.method.as_str(),
            &req.query,
            &headers,
            &signed,
            content,
        )
        .map_err(|_| incomplete.clone())?;
        let string_to_sign = sign::acs3::string_to_sign(&canonical);
        let expected = sign::acs3::signature(key.secret.expose(), &string_to_sign);
        let sent = auth.signature.to_ascii_lowercase();
        let body_ok = content.eq_ignore_ascii_case(&sign::acs3::content_sha256(&req.body));
        if !(sign::ct_eq(expected.as_bytes(), sent.as_bytes()) && body_ok) {
            return Err((
                "mismatch",
                GatewayError::SignatureMismatch { string_to_sign },
            ));
        }
        Ok(key)
    }

    fn ucloud(&self, req: &ApiRequest) -> Result<AccessKey, Failure> {
        let Some(signature) = req.param("Signature").filter(|s| !s.is_empty()) else {
            return Err(("missing", GatewayError::IncompleteSignature));
        };
        let key = self.key(Provider::Ucloud, req.param("PublicKey"))?;
        let params: Vec<(String, String)> = req
            .all_params()
            .filter(|(k, _)| k != "Signature")
            .cloned()
            .collect();
        let expected = sign::ucloud::signature(&params, key.secret.expose());
        let sent = signature.to_ascii_lowercase();
        if !sign::ct_eq(expected.as_bytes(), sent.as_bytes()) {
            // UCloud's string to sign ends with the private key: never echoed.
            return Err((
                "mismatch",
                GatewayError::SignatureMismatch {
                    string_to_sign: String::new(),
                },
            ));
        }
        Ok(key)
    }
}

/// A refused signature: the metric's reason label and the answer.
type Failure = (&'static str, GatewayError);

/// `YYYY-MM-DDThh:mm:ssZ` (UTC) within [`MAX_CLOCK_SKEW`] of now.
fn check_time(stamp: Option<&str>) -> Result<(), Failure> {
    let malformed = ("timestamp_format", GatewayError::TimestampMalformed);
    let stamp = stamp.ok_or(malformed.clone())?;
    if !stamp.ends_with('Z') {
        return Err(malformed);
    }
    let at = humantime::parse_rfc3339(stamp).map_err(|_| malformed)?;
    let now = SystemTime::now();
    let skew = match at.duration_since(now) {
        Ok(ahead) => ahead,
        Err(e) => e.duration(),
    };
    if skew > MAX_CLOCK_SKEW {
        return Err(("timestamp_expired", GatewayError::TimestampExpired));
    }
    Ok(())
}

/// The action's own parameters: the gateway's removed, `Action` set to what was asked (V3
/// sends it as a header). A parameter given twice is refused: which value would count?
fn action_params(
    req: &ApiRequest,
    scheme: Scheme,
    action: &str,
) -> Result<BTreeMap<String, String>, ApiError> {
    let common: &[&str] = match scheme {
        Scheme::AliyunRpc | Scheme::AliyunV3 => RPC_COMMON,
        Scheme::Ucloud => UCLOUD_COMMON,
    };
    let mut params = BTreeMap::new();
    for (k, v) in req.all_params() {
        if common.contains(&k.as_str()) || k == "Action" {
            continue;
        }
        if params.insert(k.clone(), v.clone()).is_some() {
            return Err(ApiError::unknown_parameter(k, "given more than once"));
        }
    }
    params.insert("Action".to_owned(), action.to_owned());
    Ok(params)
}

/// Uniform in [0, 1).
fn unit_random() -> f64 {
    (OsRng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_stamps_within_fifteen_minutes() {
        let at = |offset: i64| {
            let t = if offset >= 0 {
                SystemTime::now() + Duration::from_secs(offset as u64)
            } else {
                SystemTime::now() - Duration::from_secs((-offset) as u64)
            };
            humantime::format_rfc3339_seconds(t).to_string()
        };
        assert!(check_time(Some(&at(0))).is_ok());
        assert!(check_time(Some(&at(14 * 60))).is_ok());
        assert!(check_time(Some(&at(-14 * 60))).is_ok());
        assert_eq!(
            check_time(Some(&at(16 * 60))).unwrap_err().0,
            "timestamp_expired"
        );
        assert_eq!(
            check_time(Some(&at(-16 * 60))).unwrap_err().0,
            "timestamp_expired"
        );
        for bad in [
            "",
            "yesterday",
            "2016-02-23 12:46:24",
            "2016-02-23T12:46:24+08:00",
        ] {
            assert_eq!(
                check_time(Some(bad)).unwrap_err().0,
                "timestamp_format",
                "{bad}"
            );
        }
        assert_eq!(check_time(None).unwrap_err().0, "timestamp_format");
    }

    #[test]
    fn fault_draws_are_fractions() {
        for _ in 0..1000 {
            let u = unit_random();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
