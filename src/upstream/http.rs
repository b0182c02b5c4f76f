//! `HttpUpstream`: registers each created key pair in the cloud account by importing its
//! public half — `ImportKeyPair` (Alibaba, signed ACS3-HMAC-SHA256, or RPC HMAC-SHA1 when
//! chosen) or `ImportUHostKeyPairs` (UCloud) — signed exactly as the official SDKs sign
//! (`api_client.rs`, `sign/`).
//!
//! Every call to the cloud first takes a token from the per provider + account + region limit.
//! Throttling (`Throttling*`, HTTP 429/503, `ServiceUnavailable`, 5xx, UCloud 150/153) and
//! network errors are tried again on the one retry policy ([`RetryPolicy::upstream`]: backoff
//! with jitter, honouring `x-acs-retry-after`) up to the registration deadline, which the
//! import, look-up and delete of one key share; the job is held meanwhile.
//!
//! Exactly once: the lifecycle notes each attempt's public key on the job's reservation before
//! the call ([`crate::registry::Registry::note_key`]). When the cloud answers that the name
//! exists (a retry after a lost answer, or a redelivered job), the name is looked up there:
//! - the cloud holds *this* key → success (the answer was lost, the import was not);
//! - it holds a key this job tried before and never delivered (its private half is gone) →
//!   that pair is deleted there and this key imported;
//! - it holds any other key → the row answers `KeyPair.AlreadyExist` / 8204; nothing deleted.
//!
//! A refusal that is the request's own fault (quota, a bad name, a wrong secret) becomes the
//! row's answer with the cloud's code and message. No credential is ever logged or echoed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Registered, Registration, Upstream};
use crate::credentials::{AccessKey, Credentials};
use crate::dialect::action::ActionKind;
use crate::dialect::{self, ApiError, CreateRequest, ErrorReply, Provider};
use crate::retry::{RetryPolicy, Transient};
use crate::upstream::client::{ApiClient, Reply, Signer};
use crate::upstream::rate_limit::RateLimit;

/// How the Alibaba side is signed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AliyunSigning {
    /// `ACS3-HMAC-SHA256` (the Tea SDKs' default).
    #[default]
    V3,
    /// RPC HMAC-SHA1, signature version 1.0 (the classic SDK).
    Rpc,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamConfigError {
    #[error(
        "--upstream-endpoint {0:?}: expected PROVIDER=URL, e.g. aliyun=http://127.0.0.1:18080"
    )]
    Shape(String),
    #[error("--upstream-endpoint {0:?}: {1}")]
    Url(String, String),
    #[error("the HTTP client could not start: {0}")]
    Client(String),
}

/// What an upstream needs to be built.
#[derive(Debug, Default)]
pub struct UpstreamConfig {
    pub endpoints: Vec<(Provider, Endpoint)>,
    /// Keys per owner (`account` = the row's owner); the environment's keys serve every owner
    /// the file does not name.
    pub credentials: Option<Credentials>,
    pub signing: AliyunSigning,
    /// How long one key's registration may keep retrying.
    pub deadline: Duration,
}

/// Where a provider's API is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `scheme`, `authority` (`host` or `host:port`).
    Fixed(String, String),
    /// The public regional endpoint, `https://ecs.<RegionId>.aliyuncs.com`.
    AliyunRegional,
}

/// UCloud's public API endpoint.
pub const UCLOUD_PUBLIC: &str = "api.ucloud.cn";

/// The public endpoint of `provider` (`--upstream aliyun,ucloud`).
pub fn public_endpoint(provider: Provider) -> Endpoint {
    match provider {
        Provider::Aliyun => Endpoint::AliyunRegional,
        Provider::Ucloud => Endpoint::Fixed("https".into(), UCLOUD_PUBLIC.into()),
    }
}

/// Parses `aliyun=http://127.0.0.1:18080` (or `https://…`).
pub fn parse_endpoint(s: &str) -> Result<(Provider, Endpoint), UpstreamConfigError> {
    let (p, url) = s
        .split_once('=')
        .ok_or_else(|| UpstreamConfigError::Shape(s.to_owned()))?;
    let provider: Provider = p
        .trim()
        .parse()
        .map_err(|e: String| UpstreamConfigError::Url(s.to_owned(), e))?;
    let parsed = url::Url::parse(url.trim())
        .map_err(|e| UpstreamConfigError::Url(s.to_owned(), e.to_string()))?;
    let scheme = parsed.scheme();
    if scheme != "http" && scheme != "https" {
        return Err(UpstreamConfigError::Url(
            s.to_owned(),
            format!("scheme {scheme:?} is not http or https"),
        ));
    }
    if !matches!(parsed.path(), "" | "/") || parsed.query().is_some() {
        return Err(UpstreamConfigError::Url(
            s.to_owned(),
            "the key-pair APIs live at the endpoint's root: give no path or query".into(),
        ));
    }
    let host = parsed
        .host_str()
        .ok_or_else(|| UpstreamConfigError::Url(s.to_owned(), "no host".into()))?;
    // The Host header (and the V3 signature) carry the port only when it is not the default.
    let authority = match parsed.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    Ok((provider, Endpoint::Fixed(scheme.to_owned(), authority)))
}

pub struct HttpUpstream {
    endpoints: HashMap<Provider, Endpoint>,
    /// One client (connection pool) per base URL, made on first use.
    clients: std::sync::Mutex<HashMap<String, ApiClient>>,
    credentials: Credentials,
    env_keys: HashMap<Provider, AccessKey>,
    signing: AliyunSigning,
    limit: Option<Arc<RateLimit>>,
    deadline: Duration,
}

impl HttpUpstream {
    /// The limit its calls wait for, if any.
    pub fn rate_limit(&self) -> Option<&Arc<RateLimit>> {
        self.limit.as_ref()
    }
}

impl std::fmt::Debug for HttpUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpUpstream")
            .field("endpoints", &self.endpoints)
            .field("signing", &self.signing)
            .finish_non_exhaustive()
    }
}

/// The environment variables the official tools read.
pub const ALIYUN_ID_ENV: &str = "ALIBABA_CLOUD_ACCESS_KEY_ID";
pub const ALIYUN_SECRET_ENV: &str = "ALIBABA_CLOUD_ACCESS_KEY_SECRET";
pub const UCLOUD_PUBLIC_ENV: &str = "UCLOUD_PUBLIC_KEY";
pub const UCLOUD_PRIVATE_ENV: &str = "UCLOUD_PRIVATE_KEY";

/// Why one call to the cloud brought no answer to use.
#[derive(Debug, thiserror::Error)]
enum Unanswered {
    /// Worth trying again (after at least this long, when the cloud said so).
    #[error("{0}")]
    Again(String, Option<Duration>),
    #[error("refused: {}", .0.code)]
    Refused(ErrorReply),
}

impl Transient for Unanswered {
    fn is_transient(&self) -> bool {
        matches!(self, Unanswered::Again(..))
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Unanswered::Again(_, after) => *after,
            Unanswered::Refused(_) => None,
        }
    }
}

/// Why one import did not register the key.
#[derive(Debug, thiserror::Error)]
enum NotImported {
    /// The name exists but is not listed: deleted meanwhile, or an import of it still under
    /// way in the cloud (an earlier attempt's, sent just before its worker died). Worth asking
    /// again shortly.
    #[error("the cloud answers that the name exists but does not list it")]
    NotListed,
    #[error(transparent)]
    Answer(#[from] ApiError),
}

impl Transient for NotImported {
    fn is_transient(&self) -> bool {
        matches!(self, NotImported::NotListed)
    }
}

impl HttpUpstream {
    pub fn new(
        config: UpstreamConfig,
        env: impl Fn(&str) -> Option<String>,
        limit: Option<Arc<RateLimit>>,
    ) -> Result<HttpUpstream, UpstreamConfigError> {
        let endpoints: HashMap<Provider, Endpoint> = config.endpoints.into_iter().collect();
        // Fail now, not on the first row, if the HTTP client cannot start.
        ApiClient::new("127.0.0.1:1").map_err(|e| UpstreamConfigError::Client(e.to_string()))?;
        let mut env_keys = HashMap::new();
        let pairs = [
            (Provider::Aliyun, ALIYUN_ID_ENV, ALIYUN_SECRET_ENV),
            (Provider::Ucloud, UCLOUD_PUBLIC_ENV, UCLOUD_PRIVATE_ENV),
        ];
        for (provider, id, secret) in pairs {
            if let (Some(id), Some(secret)) = (env(id), env(secret)) {
                if !id.is_empty() && !secret.is_empty() {
                    env_keys.insert(
                        provider,
                        AccessKey {
                            provider,
                            id,
                            secret: crate::credentials::Secret::new(secret),
                            account: String::new(),
                        },
                    );
                }
            }
        }
        Ok(HttpUpstream {
            endpoints,
            clients: std::sync::Mutex::new(HashMap::new()),
            credentials: config.credentials.unwrap_or_default(),
            env_keys,
            signing: config.signing,
            limit,
            deadline: config.deadline,
        })
    }

    /// The providers that have an endpoint.
    pub fn providers(&self) -> Vec<Provider> {
        let mut p: Vec<Provider> = self.endpoints.keys().copied().collect();
        p.sort();
        p
    }

    /// The client for `req`'s provider and region.
    fn client(&self, req: &CreateRequest) -> Result<ApiClient, ApiError> {
        let provider = req.scope.provider;
        let (scheme, authority) = match self.endpoints.get(&provider) {
            None => {
                return Err(ApiError::Internal(format!(
                    "no --upstream-endpoint for {provider}"
                )))
            }
            Some(Endpoint::Fixed(scheme, authority)) => (scheme.clone(), authority.clone()),
            Some(Endpoint::AliyunRegional) => (
                "https".to_owned(),
                format!("ecs.{}.aliyuncs.com", req.scope.region),
            ),
        };
        let base = format!("{scheme}://{authority}");
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(&base) {
            return Ok(c.clone());
        }
        let client = ApiClient::with_base(&scheme, &authority)
            .map_err(|e| ApiError::Internal(format!("the HTTP client failed: {e}")))?;
        clients.insert(base, client.clone());
        Ok(client)
    }

    fn signer(&self, provider: Provider, owner: &str) -> Result<Signer, ApiError> {
        let key = self
            .credentials
            .for_account(provider, owner)
            .or_else(|| self.env_keys.get(&provider))
            .ok_or_else(|| {
                let hint = match provider {
                    Provider::Aliyun => format!("{ALIYUN_ID_ENV} and {ALIYUN_SECRET_ENV}"),
                    Provider::Ucloud => format!("{UCLOUD_PUBLIC_ENV} and {UCLOUD_PRIVATE_ENV}"),
                };
                ApiError::Internal(format!(
                    "no upstream credentials for {provider} owner {:?}: set {hint}, or give \
                     --upstream-credentials a file with an entry whose account is that owner",
                    dialect::clip(owner)
                ))
            })?;
        let (id, secret) = (key.id.clone(), key.secret.expose().to_owned());
        Ok(match (provider, self.signing) {
            (Provider::Aliyun, AliyunSigning::V3) => Signer::AliyunV3 { id, secret },
            (Provider::Aliyun, AliyunSigning::Rpc) => Signer::AliyunRpc { id, secret },
            (Provider::Ucloud, _) => Signer::Ucloud {
                public_key: id,
                private_key: secret,
            },
        })
    }

    /// One action, tried again through throttling and lost answers until `until`.
    async fn call(
        &self,
        req: &CreateRequest,
        signer: &Signer,
        kind: ActionKind,
        params: &[(String, String)],
        until: Instant,
    ) -> Result<serde_json::Value, ApiError> {
        let provider = req.scope.provider;
        let client = self.client(req)?;
        let action = kind.name(provider);
        let borrowed: Vec<(&str, &str)> = params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let (client, borrowed) = (&client, &borrowed[..]);
        let attempt = move || async move {
            if let Some(limit) = &self.limit {
                let waited = limit.acquire(req).await;
                crate::telemetry::metrics::upstream_wait(provider.as_str(), waited);
            }
            let outcome = match client.call(signer, action, borrowed).await {
                Ok(reply) => classify(provider, &reply),
                // The URL carries the request's parameters: left out of messages and logs.
                Err(e) => Err(Unanswered::Again(
                    format!("{action}: {}", crate::sink::error_chain(&e.without_url())),
                    None,
                )),
            };
            let label = match &outcome {
                Ok(_) => "OK",
                Err(Unanswered::Refused(r)) => r.code.as_str(),
                Err(Unanswered::Again(..)) => "retry",
            };
            crate::telemetry::metrics::upstream_request(provider.as_str(), label);
            outcome
        };
        let what = format!("upstream {provider} {action}");
        RetryPolicy::upstream(until)
            .run(&what, &never_cancelled(), attempt)
            .await
            .map_err(|e| match e {
                Unanswered::Refused(reply) => refusal(provider, reply),
                Unanswered::Again(why, _) => ApiError::Internal(format!(
                    "the cloud did not accept {action} within {:?}: {why}",
                    self.deadline
                )),
            })
    }

    /// One import; on "exists", looks and either succeeds, replaces this job's own lost key
    /// (and imports again), or refuses. `replaced` counts replacements over all of the
    /// registration's imports, so a cloud that keeps answering "exists" cannot loop.
    async fn import(
        &self,
        reg: &Registration<'_>,
        signer: &Signer,
        params: &[(String, String)],
        until: Instant,
        replaced: &AtomicU32,
    ) -> Result<Registered, NotImported> {
        let req = reg.req;
        let provider = req.scope.provider;
        loop {
            let err = match self
                .call(req, signer, ActionKind::Import, params, until)
                .await
            {
                Ok(body) => {
                    return Ok(Registered {
                        key_pair_id: body["KeyPairId"].as_str().map(str::to_owned),
                    })
                }
                Err(e) => e,
            };
            if !matches!(&err, ApiError::Upstream(r) if is_already_exists(provider, r)) {
                return Err(err.into());
            }
            let Some((id, fp)) = self.lookup(req, signer, until).await? else {
                return Err(NotImported::NotListed);
            };
            if same_key(req, id.as_deref(), &fp, reg.public_key) {
                return Ok(Registered { key_pair_id: id });
            }
            let ours = reg
                .tried
                .iter()
                .filter(|k| k.as_str() != reg.public_key)
                .any(|k| same_key(req, id.as_deref(), &fp, k));
            if !ours {
                return Err(ApiError::AlreadyExists.into());
            }
            if replaced.fetch_add(1, Ordering::Relaxed) >= 3 {
                return Err(ApiError::Internal(
                    "the cloud kept answering that the name exists while it was being replaced"
                        .into(),
                )
                .into());
            }
            tracing::info!(%provider, job = %reg.job_id, "replacing this job's earlier key, never delivered, in the cloud");
            self.delete(req, signer, id.as_deref(), until).await?;
        }
    }

    fn import_params(reg: &Registration<'_>) -> Vec<(String, String)> {
        let req = reg.req;
        let mut p: Vec<(String, String)> = Vec::new();
        let mut push = |k: &str, v: &str| p.push((k.to_owned(), v.to_owned()));
        match req.scope.provider {
            Provider::Aliyun => {
                push("RegionId", &req.scope.region);
                push("KeyPairName", &req.name);
                push("PublicKeyBody", reg.public_key);
                if let Some(rg) = &req.resource_group_id {
                    push("ResourceGroupId", rg);
                }
                for (i, t) in req.tags.iter().enumerate() {
                    push(&format!("Tag.{}.Key", i + 1), &t.key);
                    push(&format!("Tag.{}.Value", i + 1), &t.value);
                }
            }
            Provider::Ucloud => {
                push("Region", &req.scope.region);
                push("ProjectId", &req.scope.owner);
                push("KeyPairName", &req.name);
                push("PublicKeyBody", reg.public_key);
            }
        }
        p
    }

    /// The pair the cloud holds under the request's name: (KeyPairId, KeyPairFingerPrint).
    async fn lookup(
        &self,
        req: &CreateRequest,
        signer: &Signer,
        until: Instant,
    ) -> Result<Option<(Option<String>, String)>, ApiError> {
        let p: Vec<(String, String)> = match req.scope.provider {
            Provider::Aliyun => vec![
                ("RegionId".into(), req.scope.region.clone()),
                ("KeyPairName".into(), req.name.clone()),
            ],
            Provider::Ucloud => vec![
                ("Region".into(), req.scope.region.clone()),
                ("ProjectId".into(), req.scope.owner.clone()),
                ("KeyPairName".into(), req.name.clone()),
            ],
        };
        let body = self
            .call(req, signer, ActionKind::Describe, &p, until)
            .await?;
        let pairs = match req.scope.provider {
            Provider::Aliyun => body["KeyPairs"]["KeyPair"].clone(),
            Provider::Ucloud => body["KeyPairs"].clone(),
        };
        Ok(pairs
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["KeyPairName"] == req.name.as_str())
            .map(|p| {
                (
                    p["KeyPairId"].as_str().map(str::to_owned),
                    p["KeyPairFingerPrint"].as_str().unwrap_or("").to_owned(),
                )
            }))
    }

    async fn delete(
        &self,
        req: &CreateRequest,
        signer: &Signer,
        id: Option<&str>,
        until: Instant,
    ) -> Result<(), ApiError> {
        let p: Vec<(String, String)> = match req.scope.provider {
            Provider::Aliyun => vec![
                ("RegionId".into(), req.scope.region.clone()),
                (
                    "KeyPairNames".into(),
                    serde_json::to_string(&[&req.name]).unwrap_or_default(),
                ),
            ],
            Provider::Ucloud => vec![
                ("Region".into(), req.scope.region.clone()),
                ("ProjectId".into(), req.scope.owner.clone()),
                ("KeyPairIds.0".into(), id.unwrap_or("").to_owned()),
            ],
        };
        self.call(req, signer, ActionKind::Delete, &p, until)
            .await
            .map(drop)
    }
}

/// Shutdown does not end an upstream call's retries: the job is held until the cloud's answer
/// settles its registration, up to the deadline, so a key the cloud may hold is not dropped
/// unrecorded.
fn never_cancelled() -> tokio_util::sync::CancellationToken {
    tokio_util::sync::CancellationToken::new()
}

/// A key pair as the cloud describes it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CloudPair {
    pub name: String,
    pub key_pair_id: Option<String>,
    /// The cloud's `KeyPairFingerPrint`.
    pub fingerprint: String,
}

fn scope_request(scope: &dialect::Scope, name: &str) -> CreateRequest {
    CreateRequest {
        scope: scope.clone(),
        name: name.to_owned(),
        resource_group_id: None,
        tags: Vec::new(),
        zone: None,
    }
}

impl HttpUpstream {
    /// Deletes `name` in the cloud (`DeleteKeyPairs` / `DeleteUHostKeyPairs`); `true` when the
    /// cloud held it.
    pub async fn delete_pair(&self, scope: &dialect::Scope, name: &str) -> Result<bool, ApiError> {
        let req = scope_request(scope, name);
        let signer = self.signer(scope.provider, &scope.owner)?;
        let until = Instant::now() + self.deadline;
        let Some((id, _)) = self.lookup(&req, &signer, until).await? else {
            return Ok(false);
        };
        self.delete(&req, &signer, id.as_deref(), until).await?;
        Ok(true)
    }

    /// Every key pair the cloud holds in `scope`, page by page.
    pub async fn list(&self, scope: &dialect::Scope) -> Result<Vec<CloudPair>, ApiError> {
        let req = scope_request(scope, "");
        let signer = self.signer(scope.provider, &scope.owner)?;
        let until = Instant::now() + self.deadline;
        let mut out = Vec::new();
        for page in 0usize.. {
            let params: Vec<(String, String)> = match scope.provider {
                Provider::Aliyun => vec![
                    ("RegionId".into(), scope.region.clone()),
                    ("PageSize".into(), "50".into()),
                    ("PageNumber".into(), (page + 1).to_string()),
                ],
                Provider::Ucloud => vec![
                    ("Region".into(), scope.region.clone()),
                    ("ProjectId".into(), scope.owner.clone()),
                    ("Limit".into(), "100".into()),
                    ("Offset".into(), (page * 100).to_string()),
                ],
            };
            let body = self
                .call(&req, &signer, ActionKind::Describe, &params, until)
                .await?;
            let items = match scope.provider {
                Provider::Aliyun => body["KeyPairs"]["KeyPair"].clone(),
                Provider::Ucloud => body["KeyPairs"].clone(),
            };
            let items = items.as_array().cloned().unwrap_or_default();
            if items.is_empty() {
                break;
            }
            out.extend(items.iter().map(|p| CloudPair {
                name: p["KeyPairName"].as_str().unwrap_or("").to_owned(),
                key_pair_id: p["KeyPairId"].as_str().map(str::to_owned),
                fingerprint: p["KeyPairFingerPrint"].as_str().unwrap_or("").to_owned(),
            }));
        }
        Ok(out)
    }
}

/// Whether the cloud's `KeyPairFingerPrint` (with its `KeyPairId`) is that of `public_key`.
fn same_key(req: &CreateRequest, id: Option<&str>, cloud_fp: &str, public_key: &str) -> bool {
    match req.scope.provider {
        Provider::Aliyun => dialect::public_key::parse(public_key)
            .is_ok_and(|k| k.fingerprint_md5.eq_ignore_ascii_case(cloud_fp)),
        Provider::Ucloud => id.is_some_and(|id| {
            dialect::ucloud::fingerprint(&req.scope.owner, id, public_key) == cloud_fp
        }),
    }
}

fn is_already_exists(provider: Provider, r: &ErrorReply) -> bool {
    match provider {
        Provider::Aliyun => r.code == "KeyPair.AlreadyExist",
        Provider::Ucloud => r.ret_code == Some(dialect::ucloud::RET_KEY_PAIR_NAME_EXISTS),
    }
}

/// Reads one answer of the cloud.
fn classify(provider: Provider, reply: &Reply) -> Result<serde_json::Value, Unanswered> {
    let body = reply.json();
    let retry_after = reply.retry_after;
    match provider {
        Provider::Aliyun => {
            let code = body["Code"].as_str().unwrap_or("").to_owned();
            if reply.status == 200 && code.is_empty() {
                return Ok(body);
            }
            let throttled = code.starts_with("Throttling")
                || code == "ServiceUnavailable"
                || code == "InternalError"
                || reply.status == 429
                || reply.status >= 500;
            if throttled {
                return Err(Unanswered::Again(
                    format!(
                        "HTTP {} {}",
                        reply.status,
                        if code.is_empty() { "(no code)" } else { &code }
                    ),
                    retry_after,
                ));
            }
            Err(Unanswered::Refused(ErrorReply {
                http_status: reply.status,
                code: if code.is_empty() {
                    format!("HTTP{}", reply.status)
                } else {
                    code
                },
                message: body["Message"].as_str().unwrap_or("").to_owned(),
                ret_code: None,
            }))
        }
        Provider::Ucloud => {
            if reply.status == 429 || reply.status >= 500 {
                return Err(Unanswered::Again(
                    format!("HTTP {}", reply.status),
                    retry_after,
                ));
            }
            let Some(ret) = body["RetCode"].as_i64() else {
                return Err(Unanswered::Again(
                    format!("HTTP {}: no RetCode", reply.status),
                    retry_after,
                ));
            };
            match ret {
                0 => Ok(body),
                150 | 153 => Err(Unanswered::Again(format!("RetCode {ret}"), retry_after)),
                ret => Err(Unanswered::Refused(ErrorReply {
                    http_status: 200,
                    code: ret.to_string(),
                    message: body["Message"].as_str().unwrap_or("").to_owned(),
                    ret_code: Some(ret),
                })),
            }
        }
    }
}

/// A refusal as the row's answer; credential refusals name the setting to fix.
fn refusal(provider: Provider, mut r: ErrorReply) -> ApiError {
    match provider {
        Provider::Aliyun => {
            if r.code == "SignatureDoesNotMatch" && r.message.contains("server string to sign is:")
            {
                // What the classic SDK concludes from an echoed string to sign: ours is the
                // same canonical form, so the secret differs.
                r.code = "InvalidAccessKeySecret".into();
                r.message = format!(
                    "The AccessKeySecret is incorrect: check {ALIYUN_SECRET_ENV} or the \
                     --upstream-credentials file"
                );
            } else if r.code.starts_with("InvalidAccessKeyId") || r.code == "IncompleteSignature" {
                r.message = format!(
                    "{} (check {ALIYUN_ID_ENV} or the --upstream-credentials file)",
                    r.message
                );
            }
        }
        Provider::Ucloud => {
            if matches!(r.ret_code, Some(170..=172)) {
                r.message = format!(
                    "{} (check {UCLOUD_PUBLIC_ENV} / {UCLOUD_PRIVATE_ENV} or the \
                     --upstream-credentials file)",
                    r.message
                );
            }
        }
    }
    ApiError::Upstream(r)
}

impl Upstream for HttpUpstream {
    fn is_remote(&self) -> bool {
        true
    }

    async fn register(&self, reg: &Registration<'_>) -> Result<Registered, ApiError> {
        let req = reg.req;
        let provider = req.scope.provider;
        let signer = self.signer(provider, &req.scope.owner)?;
        let until = Instant::now() + self.deadline;
        let params = HttpUpstream::import_params(reg);
        let replaced = AtomicU32::new(0);
        let (signer, params, replaced) = (&signer, &params[..], &replaced);
        let attempt =
            move || async move { self.import(reg, signer, params, until, replaced).await };
        let what = format!("upstream {provider} import");
        RetryPolicy::upstream(until)
            .run(&what, &never_cancelled(), attempt)
            .await
            .map_err(|e| match e {
                NotImported::NotListed => ApiError::Internal(format!(
                    "the cloud kept answering that the name exists without listing it, for {:?}",
                    self.deadline
                )),
                NotImported::Answer(e) => e,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_provider_equals_http_url() {
        let fixed = |s: &str, a: &str| Endpoint::Fixed(s.into(), a.into());
        assert_eq!(
            parse_endpoint("aliyun=http://127.0.0.1:18080").unwrap(),
            (Provider::Aliyun, fixed("http", "127.0.0.1:18080"))
        );
        assert_eq!(
            parse_endpoint("ucloud=https://api.ucloud.cn/").unwrap(),
            (Provider::Ucloud, fixed("https", "api.ucloud.cn"))
        );
        assert_eq!(
            parse_endpoint("ucloud=http://api.example:80").unwrap(),
            (Provider::Ucloud, fixed("http", "api.example")),
            "a default port is not part of the Host header"
        );
        for bad in [
            "aliyun",
            "aws=http://x",
            "aliyun=ftp://x",
            "aliyun=::",
            "aliyun=http://x/api",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }

    fn reply(status: u16, body: &str) -> Reply {
        Reply {
            status,
            body: body.into(),
            retry_after: None,
        }
    }

    #[test]
    fn throttling_and_faults_are_tried_again_refusals_are_answers() {
        let again = |p, r: &Reply| matches!(classify(p, r), Err(Unanswered::Again(..)));
        assert!(again(
            Provider::Aliyun,
            &reply(400, r#"{"Code":"Throttling.User"}"#)
        ));
        assert!(again(
            Provider::Aliyun,
            &reply(503, r#"{"Code":"ServiceUnavailable"}"#)
        ));
        assert!(again(Provider::Aliyun, &reply(502, "bad gateway")));
        assert!(again(Provider::Ucloud, &reply(200, r#"{"RetCode":153}"#)));
        assert!(again(Provider::Ucloud, &reply(200, r#"{"RetCode":150}"#)));
        assert!(matches!(
            classify(Provider::Aliyun, &reply(403, r#"{"Code":"QuotaExceed.KeyPair","Message":"m"}"#)),
            Err(Unanswered::Refused(r)) if r.code == "QuotaExceed.KeyPair" && r.http_status == 403
        ));
        assert!(matches!(
            classify(Provider::Ucloud, &reply(200, r#"{"RetCode":8204,"Message":"m"}"#)),
            Err(Unanswered::Refused(r)) if r.ret_code == Some(8204)
        ));
        let wrong = ErrorReply {
            http_status: 400,
            code: "SignatureDoesNotMatch".into(),
            message: "… server string to sign is:POST&%2F&x".into(),
            ret_code: None,
        };
        let e = refusal(Provider::Aliyun, wrong);
        let r = e.reply(Provider::Aliyun);
        assert_eq!(r.code, "InvalidAccessKeySecret");
        assert!(r.message.contains(ALIYUN_SECRET_ENV));
    }
}
