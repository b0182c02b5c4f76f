//! The two API dialects keyfleet speaks: Alibaba Cloud ECS `CreateKeyPair` ([`aliyun`]) and
//! UCloud `CreateUHostKeyPair` ([`ucloud`]).
//!
//! This module holds what both share: the provider enum, the catalogue of regions that "exist",
//! the quota/uniqueness [`Scope`], the validated [`CreateRequest`], the [`ApiError`] taxonomy,
//! and the dispatchers ([`decode`], [`success_body`], [`error_body`]) that hand each request to
//! its dialect. Every rule, code and message is taken from the two API documents (README, "Semantics and errors"); the
//! per-dialect files document the check order and the exact wire forms.
//!
//! Empty values: a parameter present with `""` is "given as empty". A *required* parameter
//! given as empty counts as not supplied (`MissingParameter`), because an empty name or region
//! can only be a blank cell, never a value; an *optional* parameter given as empty is validated
//! as given (so `Tag.1.Value=""` is an empty tag value, `ResourceGroupId=""` names no group).

pub mod action;
pub mod aliyun;
pub mod public_key;
pub mod record;
pub mod ucloud;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use action::{DeleteRequest, DescribeRequest, ImportRequest};
use record::KeyPairRecord;

/// Key pairs allowed per [`Scope`] by both clouds (Alibaba: 500 per region and account;
/// UCloud: the same per project and region; README, "Quota and uniqueness"). The registry enforces it.
pub const KEY_PAIR_QUOTA: u32 = 500;

/// Longest piece of caller text echoed back inside an error, so a hostile or broken job cannot
/// blow up log lines and error bodies with its own parameter names or values.
const ECHO_LIMIT: usize = 64;

/// The cloud whose API semantics a request follows.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Aliyun,
    Ucloud,
}

impl Provider {
    pub const ALL: [Provider; 2] = [Provider::Aliyun, Provider::Ucloud];

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Aliyun => "aliyun",
            Provider::Ucloud => "ucloud",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Provider {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Provider::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let allowed: Vec<String> = Provider::ALL
                    .iter()
                    .map(|p| format!("\"{}\"", p.as_str()))
                    .collect();
                format!(
                    "unknown provider {:?}: expected one of {}",
                    clip(s),
                    allowed.join(", ")
                )
            })
    }
}

/// What exists in the (simulated) cloud: region ids per provider, Alibaba resource groups,
/// UCloud defaults.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Catalog {
    pub aliyun_regions: BTreeSet<String>,
    pub ucloud_regions: BTreeSet<String>,
    /// Alibaba `ResourceGroupId`s that exist.
    pub resource_groups: BTreeSet<String>,
    /// Used when UCloud `Region` is absent.
    pub ucloud_default_region: String,
}

/// Alibaba Cloud public ECS region ids (as listed by `DescribeRegions`). Sydney
/// (`ap-southeast-2`) and Mumbai (`ap-south-1`) are left out: Alibaba closed them, so the real
/// API would refuse them too.
pub const ALIYUN_REGIONS: &[&str] = &[
    "cn-qingdao",
    "cn-beijing",
    "cn-zhangjiakou",
    "cn-huhehaote",
    "cn-wulanchabu",
    "cn-hangzhou",
    "cn-shanghai",
    "cn-nanjing",
    "cn-fuzhou",
    "cn-shenzhen",
    "cn-heyuan",
    "cn-guangzhou",
    "cn-chengdu",
    "cn-wuhan-lr",
    "cn-hongkong",
    "cn-shanghai-finance-1",
    "cn-shenzhen-finance-1",
    "cn-beijing-finance-1",
    "ap-northeast-1",
    "ap-northeast-2",
    "ap-southeast-1",
    "ap-southeast-3",
    "ap-southeast-5",
    "ap-southeast-6",
    "ap-southeast-7",
    "us-east-1",
    "us-west-1",
    "na-south-1",
    "eu-west-1",
    "eu-central-1",
    "me-east-1",
    "me-central-1",
];

/// UCloud public region ids, plus `cn-zj`, which the seed's request example uses.
pub const UCLOUD_REGIONS: &[&str] = &[
    "cn-bj2",
    "cn-sh2",
    "cn-gd",
    "cn-wlcb",
    "cn-qz",
    "cn-zj",
    "hk",
    "tw-tp",
    "jpn-tky",
    "kr-seoul",
    "sg",
    "th-bkk",
    "idn-jakarta",
    "vn-sng",
    "ph-mnl",
    "ind-mumbai",
    "uae-dubai",
    "rus-mosc",
    "ge-fra",
    "uk-london",
    "us-ca",
    "us-ws",
    "bra-saopaulo",
    "afr-nigeria",
];

impl Default for Catalog {
    fn default() -> Self {
        Catalog {
            aliyun_regions: ALIYUN_REGIONS.iter().map(|s| s.to_string()).collect(),
            ucloud_regions: UCLOUD_REGIONS.iter().map(|s| s.to_string()).collect(),
            // The seed's example ResourceGroupId.
            resource_groups: BTreeSet::from(["rg-resourcegroupid1".to_string()]),
            ucloud_default_region: "cn-bj2".to_string(),
        }
    }
}

impl Catalog {
    /// The region ids that exist for `provider`.
    pub fn regions(&self, provider: Provider) -> &BTreeSet<String> {
        match provider {
            Provider::Aliyun => &self.aliyun_regions,
            Provider::Ucloud => &self.ucloud_regions,
        }
    }
}

/// Quota and uniqueness scope: provider + owner + region. For Alibaba owner = the account; for
/// UCloud owner = the effective ProjectId.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Scope {
    pub provider: Provider,
    pub owner: String,
    pub region: String,
}

impl Scope {
    /// `provider:owner:region`, e.g. `aliyun:acct:cn-hangzhou`. Owner and region are
    /// percent-encoded for `:` and `%` so distinct scopes never share a key (the owner is free
    /// text), and for `{`/`}` so a key never carries an accidental Redis Cluster hash tag.
    pub fn key(&self) -> String {
        format!(
            "{}:{}:{}",
            self.provider.as_str(),
            escape_key_part(&self.owner),
            escape_key_part(&self.region)
        )
    }
}

fn escape_key_part(s: &str) -> String {
    // Control characters (owners are free text) would break the embedded store's
    // `scope \n name` keys and confuse logs.
    crate::escape::escape_chars(s, |_, c| {
        matches!(c, '%' | ':' | '{' | '}') || c.is_control()
    })
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tag {
    pub key: String,
    pub value: String,
}

/// A validated create request.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CreateRequest {
    pub scope: Scope,
    /// `KeyPairName`.
    pub name: String,
    /// Alibaba only.
    pub resource_group_id: Option<String>,
    /// Alibaba only, in N order.
    pub tags: Vec<Tag>,
    /// UCloud only.
    pub zone: Option<String>,
}

impl CreateRequest {
    pub fn provider(&self) -> Provider {
        self.scope.provider
    }
}

/// A [`Scope`] still borrowed from its request (see [`CreateParts`]).
#[derive(Clone, Copy, Debug)]
pub struct ScopeRef<'a> {
    pub provider: Provider,
    pub owner: &'a str,
    pub region: &'a str,
}

impl ScopeRef<'_> {
    pub fn to_scope(self) -> Scope {
        Scope {
            provider: self.provider,
            owner: self.owner.to_owned(),
            region: self.region.to_owned(),
        }
    }
}

/// A create request that passed every rule of its dialect, still borrowed from its
/// parameters: [`validate`] stops here, [`decode`] copies it out into a [`CreateRequest`].
/// `submit` checks each row before it publishes it and needs no copy (the copies, with their
/// drops, were an eighth of its packing thread's samples).
#[derive(Debug)]
pub struct CreateParts<'a> {
    pub scope: ScopeRef<'a>,
    pub name: &'a str,
    pub resource_group_id: Option<&'a str>,
    /// Owned: none, and so no allocation, unless the request has tags.
    pub tags: Vec<Tag>,
    pub zone: Option<&'a str>,
}

impl CreateParts<'_> {
    pub fn into_request(self) -> CreateRequest {
        CreateRequest {
            scope: self.scope.to_scope(),
            name: self.name.to_owned(),
            resource_group_id: self.resource_group_id.map(str::to_owned),
            tags: self.tags,
            zone: self.zone.map(str::to_owned),
        }
    }
}

/// Every way a create can fail, for both dialects. The registry produces `QuotaExceeded` /
/// `AlreadyExists`. Display is a human sentence for logs; it never contains key material.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// A required parameter is absent (or given as empty); holds its name.
    #[error("the required parameter {0} is missing")]
    MissingParameter(String),
    /// Unknown parameter name, a bad `Action` value (`name == "Action"`, see
    /// [`ApiError::ACTION`]), a malformed UCloud `ProjectId`, …
    #[error("parameter {name:?} is not valid: {reason}")]
    InvalidParameter { name: String, reason: String },
    #[error("the key pair name is not valid")]
    NameMalformed,
    #[error("region {0:?} does not exist")]
    RegionNotFound(String),
    /// UCloud: Zone given but not in the region.
    #[error("zone {0:?} does not exist in the region")]
    ZoneNotFound(String),
    #[error("resource group {0:?} does not exist")]
    ResourceGroupNotFound(String),
    #[error("two tags have the same key")]
    DuplicateTagKey,
    #[error("a tag key is not valid")]
    TagKeyMalformed,
    #[error("a tag value is not valid")]
    TagValueMalformed,
    #[error("more than 20 tags (a tag index above 20)")]
    TooManyTags,
    #[error("the key pair quota of this region is used up")]
    QuotaExceeded,
    #[error("a key pair with this name already exists in this region")]
    AlreadyExists,
    /// keyfleet itself failed for this request (not the caller's fault).
    #[error("internal error: {0}")]
    Internal(String),
    /// ImportKeyPair: `PublicKeyBody` is not an OpenSSH public key of an accepted type.
    #[error("the public key body is not an accepted OpenSSH public key")]
    PublicKeyMalformed,
    /// DeleteKeyPairs: `KeyPairNames` is not a JSON array of at most 100 names.
    #[error("KeyPairNames is not a JSON array of at most 100 names")]
    KeyPairNamesInvalid,
    /// The API gateway's answers, before any action runs (`keyfleet serve`).
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    /// The upstream cloud refused the request: its answer, passed on as it came.
    #[error("the cloud answered {}: {}", .0.code, .0.message)]
    Upstream(ErrorReply),
}

/// Why the API gateway refused a request before its action ran (signatures, time stamps,
/// nonces, throttling, injected faults). Each dialect answers these with its own codes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// No signature, or a malformed `Authorization` header, or an unsupported V3 algorithm.
    #[error("the request is not signed (or its signature is malformed)")]
    IncompleteSignature,
    #[error("the access key is not known")]
    AccessKeyNotFound,
    #[error("the signature method is not HMAC-SHA1")]
    SignatureMethodInvalid,
    #[error("the time stamp is not well formatted")]
    TimestampMalformed,
    #[error("the time stamp is more than 15 minutes away from the server's time")]
    TimestampExpired,
    /// The signature does not match. Holds the server's string to sign (Alibaba echoes it so
    /// the client can tell a wrong secret from a wrong canonical form); it holds no secret.
    #[error("the signature does not match")]
    SignatureMismatch { string_to_sign: String },
    #[error("the signature nonce was used already")]
    NonceUsed,
    #[error("the API version is not 2014-05-26")]
    VersionInvalid,
    /// No `Action` at all (UCloud 160).
    #[error("the request names no action")]
    ActionMissing,
    #[error("the action does not exist")]
    ActionNotFound,
    /// `--throttle-rps`: beyond the access key's requests per second.
    #[error("too many requests for this access key")]
    Throttled,
    /// `--fault-rate`: an injected failure.
    #[error("service unavailable (injected fault)")]
    Unavailable,
}

impl ApiError {
    /// The parameter name under which a bad `Action` value is reported; dialects answer it with
    /// their "no such action" code rather than a generic invalid-parameter code.
    pub const ACTION: &'static str = "Action";

    /// How `provider`'s API answers this error.
    pub fn reply(&self, provider: Provider) -> ErrorReply {
        match provider {
            Provider::Aliyun => aliyun::reply(self),
            Provider::Ucloud => ucloud::reply(self),
        }
    }

    /// Unknown parameter name; the name is clipped before it is echoed anywhere.
    pub(crate) fn unknown_parameter(name: &str, reason: &str) -> ApiError {
        ApiError::InvalidParameter {
            name: clip(name),
            reason: reason.to_string(),
        }
    }
}

/// One request as a dialect's decoders see it: who sends it (`owner`: the account for Alibaba,
/// the default project for UCloud), its parameters, and what exists.
#[derive(Clone, Copy, Debug)]
pub struct Call<'a> {
    pub owner: &'a str,
    pub params: &'a BTreeMap<String, String>,
    pub catalog: &'a Catalog,
}

impl<'a> Call<'a> {
    /// A required parameter's value; absent or given as empty is `MissingParameter` (see the
    /// module docs).
    pub(crate) fn required(self, name: &str) -> Result<&'a String, ApiError> {
        match self.params.get(name) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(ApiError::MissingParameter(name.into())),
        }
    }

    /// An optional filter's value; absent or given as empty is no filter.
    pub(crate) fn nonempty(self, name: &str) -> Option<String> {
        self.params.get(name).filter(|v| !v.is_empty()).cloned()
    }
}

/// Steps 1 and 2 of both dialects' create check order. Parameter names: each must be `known`;
/// a dialect's signing parameter (in `signing`) is refused with `signing_reason`, anything else
/// as unknown. Then an `Action` parameter, when sent, must name the create `action`.
pub(crate) fn check_create(
    params: &BTreeMap<String, String>,
    known: impl Fn(&str) -> bool,
    signing: &[&str],
    signing_reason: &str,
    action: &str,
) -> Result<(), ApiError> {
    if let Some(name) = params.keys().find(|name| !known(name)) {
        let reason = if signing.contains(&name.as_str()) {
            signing_reason
        } else {
            "unknown parameter"
        };
        return Err(ApiError::unknown_parameter(name, reason));
    }
    match params.get("Action") {
        Some(sent) if sent != action => Err(ApiError::InvalidParameter {
            name: ApiError::ACTION.into(),
            reason: format!("unsupported action {:?}; expected {action}", clip(sent)),
        }),
        _ => Ok(()),
    }
}

/// How a dialect answers an error.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErrorReply {
    /// Alibaba: the seed's HttpCode; UCloud: always 200.
    pub http_status: u16,
    /// Alibaba: the error code (`InvalidKeyPairName.Malformed`, …); UCloud: the RetCode as a
    /// decimal string.
    pub code: String,
    /// Alibaba: the seed's message text exactly; UCloud: a clear message.
    pub message: String,
    /// UCloud RetCode, `None` for Alibaba.
    pub ret_code: Option<i64>,
}

/// The decoders' dispatchers, all of one signature: each builds the request's [`Call`] and hands
/// it to `provider`'s decoder of that name, in the dialect module or in its `actions`.
macro_rules! dispatch_decoders {
    ($(
        $(#[$doc:meta])*
        $name:ident $(in $module:ident)? -> $out:ty;
    )*) => {$(
        $(#[$doc])*
        pub fn $name(
            provider: Provider,
            owner: &str,
            params: &BTreeMap<String, String>,
            catalog: &Catalog,
        ) -> Result<$out, ApiError> {
            let call = Call { owner, params, catalog };
            match provider {
                Provider::Aliyun => aliyun::$($module::)?$name(call),
                Provider::Ucloud => ucloud::$($module::)?$name(call),
            }
        }
    )*};
}

dispatch_decoders! {
    /// Decode + validate a flat map of API parameter names (Alibaba `RegionId`, `KeyPairName`,
    /// `ResourceGroupId`, `Tag.N.Key`, `Tag.N.Value`, optional `Action`; UCloud `Region`, `Zone`,
    /// `ProjectId`, `KeyPairName`, optional `Action`). Unknown parameter names are an
    /// `InvalidParameter` error: other systems publish jobs to us and must learn about typos.
    /// `owner` is the account (Alibaba) or the default project (UCloud, used when `ProjectId` is
    /// absent). The check order of each dialect is documented in its module.
    decode -> CreateRequest;
}

/// [`decode`]'s rules in its order, without copying the request out of `params`.
pub fn validate<'a>(
    provider: Provider,
    owner: &'a str,
    params: &'a BTreeMap<String, String>,
    catalog: &'a Catalog,
) -> Result<CreateParts<'a>, ApiError> {
    let call = Call {
        owner,
        params,
        catalog,
    };
    match provider {
        Provider::Aliyun => aliyun::validate(call),
        Provider::Ucloud => ucloud::validate(call),
    }
}

/// What a successful create produced (filled in by the pipeline).
#[derive(Clone)]
pub struct Created<'a> {
    pub request_id: uuid::Uuid,
    /// UCloud `KeyPairId` (`uhostkp-` + 8 lower-case alphanumerics); unused by Alibaba.
    pub key_pair_id: &'a str,
    /// Unix seconds.
    pub create_time: i64,
    /// The dialect's `KeyPairFingerPrint`.
    pub fingerprint: &'a str,
    /// What goes into `PrivateKeyBody` (the PEM, or a file path in the manifest).
    pub private_key_body: &'a str,
}

/// Hand-written so that debug-logging a result never prints a private key.
impl fmt::Debug for Created<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Created")
            .field("request_id", &self.request_id)
            .field("key_pair_id", &self.key_pair_id)
            .field("create_time", &self.create_time)
            .field("fingerprint", &self.fingerprint)
            .field("private_key_body", &"<redacted>")
            .finish()
    }
}

/// The dialect's success response body, exactly as the API answers.
pub fn success_body(req: &CreateRequest, created: &Created<'_>) -> serde_json::Value {
    match req.provider() {
        Provider::Aliyun => aliyun::success_json(req, created),
        Provider::Ucloud => ucloud::success_json(req, created),
    }
}

/// The dialect's error body (Alibaba `{RequestId, HostId, Code, Message, Recommend}`, UCloud
/// `{RetCode, Action, Message}`).
pub fn error_body(provider: Provider, err: &ApiError, request_id: uuid::Uuid) -> serde_json::Value {
    match provider {
        Provider::Aliyun => aliyun::error_json(err, request_id),
        Provider::Ucloud => ucloud::error_json(err),
    }
}

/// Where the dialect's response body keeps `PrivateKeyBody` (Alibaba: top level; UCloud:
/// inside `KeyPair`).
pub fn private_key_slot(
    provider: Provider,
    response: &mut serde_json::Value,
) -> Option<&mut serde_json::Value> {
    match provider {
        Provider::Aliyun => response.get_mut("PrivateKeyBody"),
        Provider::Ucloud => response
            .get_mut("KeyPair")
            .and_then(|kp| kp.get_mut("PrivateKeyBody")),
    }
}

/// The request parameter that names the region (`RegionId` / `Region`).
pub fn region_param(provider: Provider) -> &'static str {
    match provider {
        Provider::Aliyun => "RegionId",
        Provider::Ucloud => "Region",
    }
}

/// How a new key pair is identified in its dialect: the `KeyPairId` both mint (Alibaba
/// `kp-…`, which its current CreateKeyPair page answers with and the SDKs' response models
/// carry; UCloud `uhostkp-…`) and the `KeyPairFingerPrint` the API answers with.
pub fn key_pair_identity(
    scope: &Scope,
    fingerprint_md5: &str,
    public_line: &str,
) -> (Option<String>, String) {
    key_pair_identity_with(scope, fingerprint_md5, public_line, None)
}

/// [`key_pair_identity`] with the `KeyPairId` a cloud gave, when it gave one.
pub fn key_pair_identity_with(
    scope: &Scope,
    fingerprint_md5: &str,
    public_line: &str,
    cloud_id: Option<String>,
) -> (Option<String>, String) {
    match scope.provider {
        Provider::Aliyun => (
            Some(cloud_id.unwrap_or_else(aliyun::new_key_pair_id)),
            fingerprint_md5.to_owned(),
        ),
        Provider::Ucloud => {
            let id = cloud_id.unwrap_or_else(ucloud::new_key_pair_id);
            let fp = ucloud::fingerprint(&scope.owner, &id, public_line);
            (Some(id), fp)
        }
    }
}

impl ApiError {
    /// One error of every kind, for lists derived from the dialects (metric labels).
    pub fn every_kind() -> Vec<ApiError> {
        let invalid = [(ApiError::ACTION, ""), ("x", "")];
        ApiError::create_kinds(&["KeyPairName", "RegionId"], &invalid, [""; 4])
    }

    /// Every kind of error a create can end in, in a fixed order: a `MissingParameter` for each
    /// of `missing`, an `InvalidParameter` for each (name, reason) of `invalid`, then one of
    /// each other kind, those that carry text with `region`, `zone`, `group` and `internal`.
    pub(crate) fn create_kinds(
        missing: &[&str],
        invalid: &[(&str, &str)],
        [region, zone, group, internal]: [&str; 4],
    ) -> Vec<ApiError> {
        let missing = missing
            .iter()
            .map(|name| ApiError::MissingParameter((*name).into()));
        let invalid = invalid
            .iter()
            .map(|(name, reason)| ApiError::InvalidParameter {
                name: (*name).into(),
                reason: (*reason).into(),
            });
        let others = [
            ApiError::NameMalformed,
            ApiError::RegionNotFound(region.into()),
            ApiError::ZoneNotFound(zone.into()),
            ApiError::ResourceGroupNotFound(group.into()),
            ApiError::DuplicateTagKey,
            ApiError::TagKeyMalformed,
            ApiError::TagValueMalformed,
            ApiError::TooManyTags,
            ApiError::QuotaExceeded,
            ApiError::AlreadyExists,
            ApiError::Internal(internal.into()),
        ];
        missing.chain(invalid).chain(others).collect()
    }
}

// The other key-pair actions (`action.rs`), each sent to its dialect.
dispatch_decoders! {
    decode_import in actions -> ImportRequest;
    decode_describe in actions -> DescribeRequest;
    decode_delete in actions -> DeleteRequest;
}

/// The answer to an import: the registered record.
pub fn import_body(record: &KeyPairRecord, request_id: uuid::Uuid) -> serde_json::Value {
    match record.scope.provider {
        Provider::Aliyun => aliyun::actions::import_json(record, request_id),
        Provider::Ucloud => ucloud::actions::import_json(record),
    }
}

/// The answer to a describe: `page` out of `total` matches.
pub fn describe_body(
    req: &DescribeRequest,
    total: usize,
    page: &[KeyPairRecord],
    request_id: uuid::Uuid,
) -> serde_json::Value {
    match req.scope.provider {
        Provider::Aliyun => aliyun::actions::describe_json(req, total, page, request_id),
        Provider::Ucloud => ucloud::actions::describe_json(req, total, page),
    }
}

/// The answer to a delete.
pub fn delete_body(provider: Provider, request_id: uuid::Uuid) -> serde_json::Value {
    match provider {
        Provider::Aliyun => serde_json::json!({ "RequestId": aliyun::request_id(request_id) }),
        Provider::Ucloud => serde_json::json!({
            "RetCode": 0,
            "Action": format!("{}Response", action::ActionKind::Delete.name(Provider::Ucloud)),
        }),
    }
}

/// Every error code `provider`'s API answers a create with, in a stable order.
pub fn error_codes(provider: Provider) -> Vec<String> {
    let mut codes: Vec<String> = Vec::new();
    for e in ApiError::every_kind() {
        let code = e.reply(provider).code;
        if !codes.contains(&code) {
            codes.push(code);
        }
    }
    codes
}

/// `prefix` + `len` characters drawn uniformly from `[a-z0-9]` out of `rng`. Bytes ≥ 252 are
/// rejected so that `byte % 36` is uniform (252 = 7 × 36).
pub(crate) fn random_id<R: rand_core::RngCore + ?Sized>(
    prefix: &str,
    len: usize,
    rng: &mut R,
) -> Result<String, rand_core::Error> {
    const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    const LIMIT: u8 = 252;
    let mut id = String::with_capacity(prefix.len() + len);
    id.push_str(prefix);
    let mut drawn = 0;
    // 32 bytes per draw: at most 20 needed, and few are ever rejected (4 in 256).
    let mut buf = [0u8; 32];
    while drawn < len {
        rng.try_fill_bytes(&mut buf)?;
        for &b in buf.iter().filter(|&&b| b < LIMIT) {
            if drawn == len {
                break;
            }
            id.push(char::from(ALPHABET[usize::from(b % 36)]));
            drawn += 1;
        }
    }
    Ok(id)
}

/// Every code either dialect answers with, gateway and every action included (the API metrics'
/// `code` label values).
pub fn all_answer_codes() -> Vec<String> {
    let gateway = [
        GatewayError::IncompleteSignature,
        GatewayError::AccessKeyNotFound,
        GatewayError::SignatureMethodInvalid,
        GatewayError::TimestampMalformed,
        GatewayError::TimestampExpired,
        GatewayError::SignatureMismatch {
            string_to_sign: String::new(),
        },
        GatewayError::NonceUsed,
        GatewayError::VersionInvalid,
        GatewayError::ActionMissing,
        GatewayError::ActionNotFound,
        GatewayError::Throttled,
        GatewayError::Unavailable,
    ];
    let mut errors = ApiError::every_kind();
    errors.extend([
        ApiError::PublicKeyMalformed,
        ApiError::KeyPairNamesInvalid,
        ApiError::MissingParameter("PublicKeyBody".into()),
        ApiError::MissingParameter("Action".into()),
    ]);
    errors.extend(gateway.into_iter().map(ApiError::Gateway));
    let mut codes: Vec<String> = Vec::new();
    for provider in Provider::ALL {
        for e in &errors {
            let code = e.reply(provider).code;
            if !codes.contains(&code) {
                codes.push(code);
            }
        }
    }
    codes
}

/// Whether `name` follows `provider`'s `KeyPairName` rule (Alibaba: 2–128 characters from a
/// letter or Chinese character on; UCloud: 1–63).
pub fn name_is_valid(provider: Provider, name: &str) -> bool {
    match provider {
        Provider::Aliyun => aliyun::name_is_valid(name),
        Provider::Ucloud => ucloud::name_is_valid(name),
    }
}

/// The create request's parameters, under the API's names, for a pair named `name` in `scope`
/// with `tags` and `resource_group_id` (Alibaba) or `zone` (UCloud): what `keyfleet rotate`
/// creates a successor with, so it lands where the pair it replaces is and is tagged alike.
/// The owner (account, or UCloud's default project) is the job's, not a parameter.
pub fn create_params(
    scope: &Scope,
    name: &str,
    tags: &[Tag],
    resource_group_id: Option<&str>,
    zone: Option<&str>,
) -> std::collections::BTreeMap<String, String> {
    let mut params = std::collections::BTreeMap::new();
    params.insert(
        region_param(scope.provider).to_owned(),
        scope.region.clone(),
    );
    params.insert("KeyPairName".to_owned(), name.to_owned());
    match scope.provider {
        Provider::Aliyun => {
            for (i, tag) in tags.iter().enumerate() {
                params.insert(format!("Tag.{}.Key", i + 1), tag.key.clone());
                params.insert(format!("Tag.{}.Value", i + 1), tag.value.clone());
            }
            if let Some(rg) = resource_group_id {
                params.insert("ResourceGroupId".to_owned(), rg.to_owned());
            }
        }
        Provider::Ucloud => {
            if let Some(zone) = zone {
                params.insert("Zone".to_owned(), zone.to_owned());
            }
        }
    }
    params
}

/// Caller text as it may appear inside an error: at most [`ECHO_LIMIT`] characters.
pub(crate) fn clip(s: &str) -> String {
    match s.char_indices().nth(ECHO_LIMIT) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

/// "Chinese character" in both dialects' name rules: CJK Unified Ideographs U+4E00–U+9FFF and
/// Extension A U+3400–U+4DBF. Extensions B+ (supplementary planes), compatibility ideographs,
/// radicals and CJK punctuation are not accepted: they are not what either console calls a
/// Chinese character, and rejecting is the side that cannot create an unusable name.
pub fn is_chinese(c: char) -> bool {
    matches!(c, '\u{4E00}'..='\u{9FFF}' | '\u{3400}'..='\u{4DBF}')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A successor's request decodes to the scope, tags, group and zone it was made from.
    #[test]
    fn create_params_decode_to_the_pair_they_describe() {
        let catalog = Catalog::default();
        let tags = vec![Tag {
            key: "env".into(),
            value: "prod".into(),
        }];
        let aliyun = Scope {
            provider: Provider::Aliyun,
            owner: "acme".into(),
            region: "cn-hangzhou".into(),
        };
        let params = create_params(&aliyun, "web-01-20261205", &tags, None, None);
        let req = decode(Provider::Aliyun, "acme", &params, &catalog).unwrap();
        assert_eq!(
            (req.scope, req.name, req.tags),
            (aliyun, "web-01-20261205".into(), tags)
        );
        let ucloud = Scope {
            provider: Provider::Ucloud,
            owner: "org-acme".into(),
            region: "cn-bj2".into(),
        };
        let params = create_params(&ucloud, "cache-01-x", &[], None, Some("cn-bj2-02"));
        let req = decode(Provider::Ucloud, "org-acme", &params, &catalog).unwrap();
        assert_eq!((req.scope, req.zone), (ucloud, Some("cn-bj2-02".into())));
    }

    #[test]
    fn provider_names_round_trip() {
        for p in Provider::ALL {
            assert_eq!(p.as_str().parse::<Provider>(), Ok(p));
            assert_eq!(p.to_string(), p.as_str());
            assert_eq!(
                serde_json::to_value(p).unwrap(),
                serde_json::json!(p.as_str())
            );
        }
        assert_eq!("ALIYUN".parse::<Provider>(), Ok(Provider::Aliyun));
        assert_eq!("UCloud".parse::<Provider>(), Ok(Provider::Ucloud));
    }

    #[test]
    fn provider_parse_error_names_value_and_choices() {
        for bad in ["aws", "", " aliyun", "aliyun "] {
            let err = bad.parse::<Provider>().unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
            assert!(
                err.contains("\"aliyun\"") && err.contains("\"ucloud\""),
                "{err}"
            );
        }
    }

    #[test]
    fn scope_keys_are_unambiguous() {
        let s = |p, o: &str, r: &str| Scope {
            provider: p,
            owner: o.into(),
            region: r.into(),
        };
        assert_eq!(
            s(Provider::Aliyun, "acct", "cn-hangzhou").key(),
            "aliyun:acct:cn-hangzhou"
        );
        assert_eq!(s(Provider::Ucloud, "org-1", "hk").key(), "ucloud:org-1:hk");
        // Without escaping these two would both be "aliyun:a:b:c".
        assert_ne!(
            s(Provider::Aliyun, "a:b", "c").key(),
            s(Provider::Aliyun, "a", "b:c").key()
        );
        assert_eq!(
            s(Provider::Aliyun, "a:b%{x}", "r").key(),
            "aliyun:a%3Ab%25%7Bx%7D:r"
        );
        // An owner that literally contains an escape sequence stays distinct.
        assert_ne!(
            s(Provider::Aliyun, "a%3Ab", "r").key(),
            s(Provider::Aliyun, "a:b", "r").key()
        );
    }

    #[test]
    fn default_catalog() {
        let c = Catalog::default();
        for r in [
            "cn-qingdao",
            "cn-hangzhou",
            "ap-southeast-1",
            "us-west-1",
            "eu-central-1",
        ] {
            assert!(c.aliyun_regions.contains(r), "{r}");
        }
        for r in [
            "cn-bj2", "cn-sh2", "cn-gd", "cn-wlcb", "hk", "us-ca", "cn-zj",
        ] {
            assert!(c.ucloud_regions.contains(r), "{r}");
        }
        assert!(c.resource_groups.contains("rg-resourcegroupid1"));
        assert_eq!(c.ucloud_default_region, "cn-bj2");
        assert!(c.ucloud_regions.contains(&c.ucloud_default_region));
        assert_eq!(c.regions(Provider::Aliyun), &c.aliyun_regions);
        assert_eq!(c.regions(Provider::Ucloud), &c.ucloud_regions);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Catalog>(&json).unwrap(), c);
    }

    #[test]
    fn chinese_ranges() {
        for (c, ok) in [
            ('\u{3400}', true),
            ('\u{4DBF}', true),
            ('\u{4E00}', true),
            ('\u{9FFF}', true),
            ('密', true),
            ('\u{33FF}', false),
            ('\u{4DC0}', false), // Yijing hexagram, between Ext A and the main block
            ('\u{A000}', false),
            ('\u{20000}', false),
            ('。', false),
            ('a', false),
        ] {
            assert_eq!(is_chinese(c), ok, "{:?}", c);
        }
    }

    #[test]
    fn clip_limits_echoed_text() {
        assert_eq!(clip("short"), "short");
        let long = "密".repeat(100);
        let clipped = clip(&long);
        assert_eq!(clipped.chars().count(), ECHO_LIMIT + 1);
        assert!(clipped.ends_with('…'));
        assert_eq!(clip(&"x".repeat(ECHO_LIMIT)), "x".repeat(ECHO_LIMIT));
    }

    #[test]
    fn display_is_a_sentence_per_variant() {
        for e in all_errors() {
            let s = e.to_string();
            assert!(!s.is_empty() && !s.contains("BEGIN"), "{s}");
        }
    }

    #[test]
    fn created_debug_redacts_private_key() {
        let c = Created {
            request_id: uuid::Uuid::nil(),
            key_pair_id: "uhostkp-abcd1234",
            create_time: 1,
            fingerprint: "fp",
            private_key_body: "-----BEGIN PRIVATE KEY-----SECRET",
        };
        let d = format!("{c:?}");
        assert!(!d.contains("SECRET") && d.contains("redacted"), "{d}");
    }

    #[test]
    fn dispatchers_route_by_provider() {
        let cat = Catalog::default();
        let a: BTreeMap<String, String> = [("RegionId", "cn-hangzhou"), ("KeyPairName", "ab")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let req = decode(Provider::Aliyun, "acct", &a, &cat).unwrap();
        assert_eq!(req.provider(), Provider::Aliyun);
        let u: BTreeMap<String, String> = [("KeyPairName".to_string(), "k".to_string())].into();
        let req = decode(Provider::Ucloud, "proj", &u, &cat).unwrap();
        assert_eq!(req.provider(), Provider::Ucloud);
        let e = ApiError::NameMalformed;
        assert_eq!(e.reply(Provider::Aliyun).http_status, 400);
        assert_eq!(e.reply(Provider::Ucloud).http_status, 200);
        assert!(error_body(Provider::Aliyun, &e, uuid::Uuid::nil())
            .get("HostId")
            .is_some());
        assert!(error_body(Provider::Ucloud, &e, uuid::Uuid::nil())
            .get("RetCode")
            .is_some());
    }

    /// Request parameters from name/value pairs, for the dialect tests.
    pub(crate) fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// One value of every variant, for exhaustive reply tables in the dialect tests.
    pub(crate) fn all_errors() -> Vec<ApiError> {
        let samples = ["xx", "xx-01", "rg-x", "disk full"];
        ApiError::create_kinds(&["KeyPairName"], &[("Foo", "unknown parameter")], samples)
    }
}
