//! Alibaba Cloud ECS `CreateKeyPair` dialect (seed `000_…`): parameter validation, the error
//! table (HTTP status, code, message) and the JSON/XML response renderings.
//!
//! # Check order
//! One request with several faults always gets the same answer; checks run in this order and
//! the first failure wins:
//!
//! 1. Parameter names, in byte order of the name: anything but `Action`, `RegionId`,
//!    `KeyPairName`, `ResourceGroupId`, `Tag.<N>.Key`, `Tag.<N>.Value` → 400 `InvalidParameter`.
//!    Names come first because a misspelt `KeyPairNmae` should be reported as itself, not as
//!    a missing `KeyPairName`.
//! 2. `Action`, if given, must be `CreateKeyPair` → 404 `InvalidAction.NotFound`.
//! 3. `RegionId`, then `KeyPairName`, absent or empty → 400 `MissingRegionId` /
//!    `MissingKeyPairName`.
//! 4. `RegionId` in the catalogue → 404 `InvalidRegionId.NotFound`.
//! 5. `KeyPairName` rules → 400 `InvalidKeyPairName.Malformed`.
//! 6. `ResourceGroupId`, if given (even empty), in the catalogue → 404
//!    `InvalidResourceGroup.NotFound`.
//! 7. Tags:
//!    1. any `N` above 20 → 403 `QuotaExceed.Tags` (the only way to pass more than 20 tags,
//!       since each `N` in 1..=20 names one tag);
//!    2. any `N` that is not a plain decimal in 1..=20 (`0`, `01`, `x`, empty) → 400
//!       `InvalidTagKey.Malformed`;
//!    3. a `Tag.N.Value` without its `Tag.N.Key` → 400 `InvalidTagKey.Malformed`;
//!    4. in `N` order, the key then the value of each tag → 400 `InvalidTagKey.Malformed` /
//!       `InvalidTagValue.Malformed`;
//!    5. two tags with the same key → 400 `Duplicate.TagKey`.
//!
//! # Readings of the seed
//! - Name: 2–128 characters (Unicode scalar values, not bytes); the first is an ASCII letter or
//!   a Chinese character ([`super::is_chinese`]); the rest are ASCII letters, Chinese
//!   characters, ASCII digits, `:`, `_`, `-`; it must not start with `http://` / `https://`
//!   (already impossible through the character set, but checked on its own as the seed lists
//!   it on its own).
//! - Tag keys and values: "must not start with `aliyun` / `acs:`" and "must not contain
//!   `http://` / `https://`" are compared ASCII-case-insensitively: `Aliyun…` is the same
//!   reserved namespace and `HTTP://` the same URL scheme. A `Tag.N.Key` without a value is a
//!   tag with an empty value.

use std::collections::BTreeMap;

pub mod actions;

use super::{
    is_chinese, ApiError, Call, CreateParts, CreateRequest, Created, ErrorReply, GatewayError, Tag,
};

/// `HostId` of every error body.
pub const HOST_ID: &str = "ecs.aliyuncs.com";
/// The only accepted `Action` value.
pub const ACTION: &str = "CreateKeyPair";
/// Most tags per key pair, and the highest `N` of `Tag.N.*`.
pub const MAX_TAGS: usize = 20;

const MSG_NAME_MALFORMED: &str = "Specified Key Pair name is not valid.";
const MSG_QUOTA_KEY_PAIR: &str = "The key pair quota exceeds.";
const MSG_ALREADY_EXIST: &str = "The key pair already exist.";
const MSG_RESOURCE_GROUP: &str = "The ResourceGroup provided does not exist in our records.";
const MSG_DUPLICATE_TAG_KEY: &str = "The Tag.N.Key contain duplicate key.";
const MSG_TAG_KEY: &str = "The specified Tag.n.Key is not valid.";
const MSG_TAG_VALUE: &str = "The specified Tag.n.Value is not valid.";
const MSG_REGION: &str = "The specified RegionId does not exist.";
const MSG_ZONE: &str = "The specified zone does not exist.";
const MSG_TOO_MANY_TAGS: &str = "The maximum number of tags (20) is exceeded.";
const MSG_ACTION: &str = "Specified api is not found, please check your url and method.";
const MSG_INTERNAL: &str =
    "The request processing has failed due to some unknown error, exception or failure.";

/// Alibaba's common signing parameters: keyfleet takes no credentials, so these get a reason
/// that says so instead of a bare "unknown parameter".
const SIGNING_PARAMS: &[&str] = &[
    "AccessKeyId",
    "Format",
    "SecurityToken",
    "Signature",
    "SignatureMethod",
    "SignatureNonce",
    "SignatureVersion",
    "Timestamp",
    "Version",
];
/// What a signing parameter is refused with.
const SIGNING_REASON: &str = "a signing parameter; keyfleet takes no credentials or signatures";

/// How Alibaba answers `err`: the seed's table where it has the error, Alibaba's common codes
/// otherwise.
pub fn reply(err: &ApiError) -> ErrorReply {
    let (status, code, message): (u16, String, String) = match err {
        // The other actions' pages name the generic code for these two.
        ApiError::MissingParameter(p) if p == "PublicKeyBody" || p == "KeyPairNames" => (
            400,
            "MissingParameter".into(),
            format!(
                "The input parameter \"{p}\" that is mandatory for processing this request is not supplied."
            ),
        ),
        ApiError::MissingParameter(p) => (
            400,
            format!("Missing{p}"),
            format!(
                "The input parameter \"{p}\" that is mandatory for processing this request is not supplied."
            ),
        ),
        ApiError::InvalidParameter { name, .. } if name == ApiError::ACTION => {
            (404, "InvalidAction.NotFound".into(), MSG_ACTION.into())
        }
        ApiError::InvalidParameter { name, reason } => (
            400,
            "InvalidParameter".into(),
            format!("The specified parameter \"{name}\" is not valid: {reason}."),
        ),
        ApiError::NameMalformed => (
            400,
            "InvalidKeyPairName.Malformed".into(),
            MSG_NAME_MALFORMED.into(),
        ),
        ApiError::RegionNotFound(_) => (404, "InvalidRegionId.NotFound".into(), MSG_REGION.into()),
        ApiError::ZoneNotFound(_) => (404, "InvalidZoneId.NotFound".into(), MSG_ZONE.into()),
        ApiError::ResourceGroupNotFound(_) => (
            404,
            "InvalidResourceGroup.NotFound".into(),
            MSG_RESOURCE_GROUP.into(),
        ),
        ApiError::DuplicateTagKey => (400, "Duplicate.TagKey".into(), MSG_DUPLICATE_TAG_KEY.into()),
        ApiError::TagKeyMalformed => (400, "InvalidTagKey.Malformed".into(), MSG_TAG_KEY.into()),
        ApiError::TagValueMalformed => {
            (400, "InvalidTagValue.Malformed".into(), MSG_TAG_VALUE.into())
        }
        ApiError::TooManyTags => (403, "QuotaExceed.Tags".into(), MSG_TOO_MANY_TAGS.into()),
        ApiError::QuotaExceeded => (403, "QuotaExceed.KeyPair".into(), MSG_QUOTA_KEY_PAIR.into()),
        ApiError::AlreadyExists => (400, "KeyPair.AlreadyExist".into(), MSG_ALREADY_EXIST.into()),
        ApiError::Internal(_) => (500, "InternalError".into(), MSG_INTERNAL.into()),
        ApiError::PublicKeyMalformed => (
            400,
            "InvalidPublicKeyBody.Malformed".into(),
            "The PublicKeyBody format is not supported.".into(),
        ),
        ApiError::KeyPairNamesInvalid => (
            400,
            "InvalidKeyPairNames.ValueNotSupported".into(),
            "The specified parameter \"KeyPairNames\" is not valid.".into(),
        ),
        ApiError::Gateway(g) => gateway_reply(g),
        ApiError::Upstream(r) => (r.http_status, r.code.clone(), r.message.clone()),
    };
    ErrorReply {
        http_status: status,
        code,
        message,
        ret_code: None,
    }
}

/// How Alibaba's API gateway answers a request it refuses before the action runs (contract §4;
/// the messages are Alibaba's own).
fn gateway_reply(err: &GatewayError) -> (u16, String, String) {
    let (status, code, message) = match err {
        GatewayError::IncompleteSignature => (
            400,
            "IncompleteSignature",
            "The request signature does not conform to Aliyun standards.",
        ),
        GatewayError::AccessKeyNotFound => (
            404,
            "InvalidAccessKeyId.NotFound",
            "Specified access key is not found.",
        ),
        GatewayError::SignatureMethodInvalid => (
            400,
            "InvalidSignatureMethod",
            "Specified signature method is not valid.",
        ),
        GatewayError::TimestampMalformed => (
            400,
            "InvalidTimeStamp.Format",
            "Specified time stamp or date value is not well formatted.",
        ),
        GatewayError::TimestampExpired => (
            400,
            "InvalidTimeStamp.Expired",
            "Specified time stamp or date value is expired.",
        ),
        GatewayError::SignatureMismatch { string_to_sign } => {
            // The classic SDK compares this suffix with its own string to sign and, when they
            // are equal, tells its user the AccessKeySecret is wrong.
            return (
                400,
                "SignatureDoesNotMatch".into(),
                format!(
                    "Specified signature is not matched with our calculation. server string to \
                     sign is:{string_to_sign}"
                ),
            );
        }
        GatewayError::NonceUsed => (
            400,
            "SignatureNonceUsed",
            "Specified signature nonce was used already.",
        ),
        GatewayError::VersionInvalid => (
            400,
            "InvalidVersion",
            "Specified parameter Version is not valid.",
        ),
        GatewayError::ActionMissing | GatewayError::ActionNotFound => {
            (404, "InvalidAction.NotFound", MSG_ACTION)
        }
        GatewayError::Throttled => (
            400,
            "Throttling.User",
            "Request was denied due to user flow control.",
        ),
        GatewayError::Unavailable => (
            503,
            "ServiceUnavailable",
            "The request has failed due to a temporary failure of the server.",
        ),
    };
    (status, code.into(), message.into())
}

/// Validate an Alibaba parameter map in the documented check order. The owner is the account.
pub fn validate(call: Call<'_>) -> Result<CreateParts<'_>, ApiError> {
    // 1. names, 2. Action
    let known = |name: &str| {
        matches!(
            name,
            "Action" | "RegionId" | "KeyPairName" | "ResourceGroupId"
        ) || tag_param(name).is_some()
    };
    super::check_create(call.params, known, SIGNING_PARAMS, SIGNING_REASON, ACTION)?;
    // 3. required
    call.required("RegionId")?;
    let name = call.required("KeyPairName")?;
    // 4. region
    let scope = actions::scope_ref(call)?;
    // 5. name
    if !name_is_valid(name) {
        return Err(ApiError::NameMalformed);
    }
    // 6. resource group
    let resource_group_id = actions::resource_group_ref(call)?;
    // 7. tags
    let tags = decode_tags(call.params)?;
    Ok(CreateParts {
        scope,
        name,
        resource_group_id,
        tags,
        zone: None,
    })
}

/// [`validate`], the request copied out.
pub fn decode(call: Call<'_>) -> Result<CreateRequest, ApiError> {
    validate(call).map(CreateParts::into_request)
}

/// `KeyPairName` rule of the seed (see the module docs).
pub fn name_is_valid(name: &str) -> bool {
    let len = name.chars().count();
    if !(2..=128).contains(&len) {
        return false;
    }
    // Checked in place, not on a lowercased copy: this runs for every row `submit` packs.
    let starts = |prefix: &str| {
        name.as_bytes()
            .get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix.as_bytes()))
    };
    if starts("http://") || starts("https://") {
        return false;
    }
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || is_chinese(c));
    first_ok
        && chars.all(|c| c.is_ascii_alphanumeric() || is_chinese(c) || matches!(c, ':' | '_' | '-'))
}

/// Rules shared by tag keys and values apart from emptiness.
fn tag_text_is_valid(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    s.chars().count() <= 128
        && !lower.starts_with("aliyun")
        && !lower.starts_with("acs:")
        && !lower.contains("http://")
        && !lower.contains("https://")
}

pub fn tag_key_is_valid(key: &str) -> bool {
    !key.is_empty() && tag_text_is_valid(key)
}

pub fn tag_value_is_valid(value: &str) -> bool {
    tag_text_is_valid(value)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TagPart {
    Key,
    Value,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TagIndex {
    Valid(u8),
    TooHigh,
    Malformed,
}

/// `Tag.<N>.Key` / `Tag.<N>.Value` → (index, part); `None` for any other name.
fn tag_param(name: &str) -> Option<(TagIndex, TagPart)> {
    let rest = name.strip_prefix("Tag.")?;
    let (n, part) = if let Some(n) = rest.strip_suffix(".Key") {
        (n, TagPart::Key)
    } else {
        (rest.strip_suffix(".Value")?, TagPart::Value)
    };
    Some((tag_index(n), part))
}

fn tag_index(n: &str) -> TagIndex {
    if n.is_empty() || n.starts_with('0') || !n.bytes().all(|b| b.is_ascii_digit()) {
        return TagIndex::Malformed;
    }
    // Digits only, no leading zero: more than two digits is certainly above 20 (and would not
    // fit any integer type for long enough inputs, so do not parse it).
    match n.parse::<u8>() {
        Ok(v) if n.len() <= 2 && usize::from(v) <= MAX_TAGS => TagIndex::Valid(v),
        _ => TagIndex::TooHigh,
    }
}

pub(crate) fn decode_tags(params: &BTreeMap<String, String>) -> Result<Vec<Tag>, ApiError> {
    let mut keys: BTreeMap<u8, &str> = BTreeMap::new();
    let mut values: BTreeMap<u8, &str> = BTreeMap::new();
    let (mut too_high, mut malformed) = (false, false);
    for (name, value) in params {
        match tag_param(name) {
            None => {}
            Some((TagIndex::TooHigh, _)) => too_high = true,
            Some((TagIndex::Malformed, _)) => malformed = true,
            Some((TagIndex::Valid(n), TagPart::Key)) => {
                keys.insert(n, value);
            }
            Some((TagIndex::Valid(n), TagPart::Value)) => {
                values.insert(n, value);
            }
        }
    }
    if too_high {
        return Err(ApiError::TooManyTags);
    }
    if malformed || values.keys().any(|n| !keys.contains_key(n)) {
        return Err(ApiError::TagKeyMalformed);
    }
    let mut tags = Vec::with_capacity(keys.len());
    for (n, key) in &keys {
        if !tag_key_is_valid(key) {
            return Err(ApiError::TagKeyMalformed);
        }
        let value = values.get(n).copied().unwrap_or("");
        if !tag_value_is_valid(value) {
            return Err(ApiError::TagValueMalformed);
        }
        tags.push(Tag {
            key: (*key).to_string(),
            value: value.to_string(),
        });
    }
    let mut seen = std::collections::BTreeSet::new();
    if !tags.iter().all(|t| seen.insert(t.key.as_str())) {
        return Err(ApiError::DuplicateTagKey);
    }
    Ok(tags)
}

/// Alibaba's `RequestId`: a UUID in upper case (the seed's `473469C7-AA6F-…`).
pub fn request_id(id: uuid::Uuid) -> String {
    id.hyphenated().to_string().to_ascii_uppercase()
}

/// The diagnosis link Alibaba puts in `Recommend`.
pub fn recommend(code: &str, request_id: &str) -> String {
    format!("https://api.aliyun.com/troubleshoot?q={code}&product=Ecs&requestId={request_id}")
}

/// Prefix of every Alibaba `KeyPairId`.
pub const KEY_PAIR_ID_PREFIX: &str = "kp-";

/// A fresh `KeyPairId`: `kp-` + 20 of `[a-z0-9]` (the shape of the current page's example).
///
/// # Panics
/// Only if the operating system's random source fails (no key can be made then either).
pub fn new_key_pair_id() -> String {
    match super::random_id(KEY_PAIR_ID_PREFIX, 20, &mut rand_core::OsRng) {
        Ok(id) => id,
        Err(e) => panic!("OS random source failed: {e}"),
    }
}

/// `{RequestId, KeyPairName, KeyPairFingerPrint, PrivateKeyBody}` as in the seed's JSON
/// example, plus `KeyPairId`, which the current CreateKeyPair page adds (and the official SDKs'
/// response models read).
pub fn success_json(req: &CreateRequest, created: &Created<'_>) -> serde_json::Value {
    let mut body = serde_json::json!({
        "RequestId": request_id(created.request_id),
        "KeyPairName": req.name,
        "KeyPairFingerPrint": created.fingerprint,
        "PrivateKeyBody": created.private_key_body,
    });
    if !created.key_pair_id.is_empty() {
        body["KeyPairId"] = serde_json::Value::String(created.key_pair_id.to_owned());
    }
    body
}

/// `{RequestId, HostId, Code, Message, Recommend}`.
pub fn error_json(err: &ApiError, request_id: uuid::Uuid) -> serde_json::Value {
    let r = reply(err);
    let id = self::request_id(request_id);
    serde_json::json!({
        "RequestId": id,
        "HostId": HOST_ID,
        "Recommend": recommend(&r.code, &id),
        "Code": r.code,
        "Message": r.message,
    })
}

/// The seed's XML rendering of a success.
pub fn success_xml(req: &CreateRequest, created: &Created<'_>) -> String {
    format!(
        "<CreateKeyPairResponse>\n<RequestId>{}</RequestId>\n<KeyPairName>{}</KeyPairName>\n\
         <KeyPairFingerPrint>{}</KeyPairFingerPrint>\n<PrivateKeyBody>{}</PrivateKeyBody>\n\
         </CreateKeyPairResponse>",
        xml_escape(&request_id(created.request_id)),
        xml_escape(&req.name),
        xml_escape(created.fingerprint),
        xml_escape(created.private_key_body),
    )
}

/// `<Error><RequestId/><HostId/><Code/><Message/><Recommend/></Error>`.
pub fn error_xml(err: &ApiError, request_id: uuid::Uuid) -> String {
    let r = reply(err);
    let id = self::request_id(request_id);
    format!(
        "<Error>\n<RequestId>{}</RequestId>\n<HostId>{}</HostId>\n<Code>{}</Code>\n\
         <Message>{}</Message>\n<Recommend>{}</Recommend>\n</Error>",
        xml_escape(&id),
        xml_escape(HOST_ID),
        xml_escape(&r.code),
        xml_escape(&r.message),
        xml_escape(&recommend(&r.code, &id)),
    )
}

/// Escape text content and attribute-safe. Characters XML 1.0 cannot carry at all (controls
/// other than tab/newline/CR, U+FFFE, U+FFFF) cannot be escaped either, so they become U+FFFD
/// rather than producing a document no parser accepts; they can only come from echoed caller
/// text, never from a validated name or our own key material.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if c < ' ' || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::tests::{all_errors, params};
    use crate::dialect::{Catalog, Provider, Scope};

    fn base() -> BTreeMap<String, String> {
        params(&[
            ("RegionId", "cn-hangzhou"),
            ("KeyPairName", "FinanceJoshuaV23"),
        ])
    }

    fn with(extra: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut p = base();
        p.extend(params(extra));
        p
    }

    fn run(p: &BTreeMap<String, String>) -> Result<CreateRequest, ApiError> {
        crate::dialect::decode(Provider::Aliyun, "acct", p, &Catalog::default())
    }

    fn name_result(name: &str) -> Result<(), ApiError> {
        run(&with(&[("KeyPairName", name)])).map(|_| ())
    }

    #[test]
    fn minimal_request_decodes() {
        let req = run(&base()).unwrap();
        assert_eq!(
            req,
            CreateRequest {
                scope: Scope {
                    provider: Provider::Aliyun,
                    owner: "acct".into(),
                    region: "cn-hangzhou".into()
                },
                name: "FinanceJoshuaV23".into(),
                resource_group_id: None,
                tags: vec![],
                zone: None,
            }
        );
        // The seed's request example.
        let p = params(&[
            ("Action", "CreateKeyPair"),
            ("RegionId", "cn-qingdao"),
            ("KeyPairName", "test"),
        ]);
        assert_eq!(run(&p).unwrap().scope.region, "cn-qingdao");
    }

    #[test]
    fn key_pair_names() {
        let ok = Ok(());
        let bad = Err(ApiError::NameMalformed);
        let cases: Vec<(String, Result<(), ApiError>)> = vec![
            ("a".into(), bad.clone()),
            ("ab".into(), ok.clone()),
            (format!("a{}", "b".repeat(127)), ok.clone()),
            (format!("a{}", "b".repeat(128)), bad.clone()),
            // Lengths count characters: 128 Chinese characters are 384 bytes and still fine.
            ("密".repeat(128), ok.clone()),
            ("密".repeat(129), bad.clone()),
            ("密钥对一".into(), ok.clone()),
            ("密".into(), bad.clone()),
            ("\u{3400}\u{4DBF}".into(), ok.clone()),
            ("Z密钥-1".into(), ok.clone()),
            ("1abc".into(), bad.clone()),
            ("_abc".into(), bad.clone()),
            (":abc".into(), bad.clone()),
            ("-abc".into(), bad.clone()),
            ("a1:_-Zz9".into(), ok.clone()),
            ("a:".into(), ok.clone()),
            ("a_".into(), ok.clone()),
            ("a-".into(), ok.clone()),
            ("a0".into(), ok.clone()),
            ("http://example".into(), bad.clone()),
            ("https://example".into(), bad.clone()),
            ("HTTP://example".into(), bad.clone()),
            ("http:abc".into(), ok.clone()),
            ("ab c".into(), bad.clone()),
            ("ab.c".into(), bad.clone()),
            ("ab/c".into(), bad.clone()),
            ("ab@c".into(), bad.clone()),
            ("ab🔑".into(), bad.clone()),
            ("abé".into(), bad.clone()),
            ("éab".into(), bad.clone()),
            ("ab\u{0}".into(), bad.clone()),
            ("ab\n".into(), bad.clone()),
            ("ab。".into(), bad.clone()),
            ("ａb".into(), bad.clone()), // full-width a is not an ASCII letter
            ("\u{20000}ab".into(), bad.clone()),
        ];
        for (name, want) in cases {
            assert_eq!(name_result(&name), want, "{name:?}");
            assert_eq!(name_is_valid(&name), want.is_ok(), "{name:?}");
        }
    }

    #[test]
    fn name_survives_into_request() {
        let req = run(&with(&[("KeyPairName", "密钥对一")])).unwrap();
        assert_eq!(req.name, "密钥对一");
    }

    #[test]
    fn required_parameters() {
        let cases = [
            (params(&[("KeyPairName", "ab")]), "RegionId"),
            (params(&[("RegionId", "cn-hangzhou")]), "KeyPairName"),
            (params(&[]), "RegionId"),
            (
                params(&[("RegionId", ""), ("KeyPairName", "ab")]),
                "RegionId",
            ),
            (
                params(&[("RegionId", "cn-hangzhou"), ("KeyPairName", "")]),
                "KeyPairName",
            ),
        ];
        for (p, missing) in cases {
            assert_eq!(
                run(&p),
                Err(ApiError::MissingParameter(missing.into())),
                "{p:?}"
            );
        }
    }

    #[test]
    fn unknown_parameters_are_rejected() {
        for name in [
            "KeyPairNmae",
            "regionid",
            "Zone",
            "Tag.1.key",
            "Tag.1",
            "Tags.1.Key",
            "",
        ] {
            match run(&with(&[(name, "x")])) {
                Err(ApiError::InvalidParameter { name: n, reason }) => {
                    assert_eq!(n, name);
                    assert_eq!(reason, "unknown parameter");
                }
                other => panic!("{name:?}: {other:?}"),
            }
        }
        match run(&with(&[("AccessKeyId", "LTAI")])) {
            Err(ApiError::InvalidParameter { name, reason }) => {
                assert_eq!(name, "AccessKeyId");
                assert!(reason.contains("credentials"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // A huge name is clipped before it is echoed.
        let long = "X".repeat(10_000);
        match run(&with(&[(long.as_str(), "x")])) {
            Err(ApiError::InvalidParameter { name, .. }) => assert!(name.len() < 100),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn action_value() {
        assert!(run(&with(&[("Action", "CreateKeyPair")])).is_ok());
        for bad in ["", "createkeypair", "CreateUHostKeyPair", "DeleteKeyPairs"] {
            match run(&with(&[("Action", bad)])) {
                Err(e @ ApiError::InvalidParameter { .. }) => {
                    let r = e.reply(Provider::Aliyun);
                    assert_eq!(r.http_status, 404);
                    assert_eq!(r.code, "InvalidAction.NotFound");
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn regions() {
        for r in [
            "cn-qingdao",
            "cn-hangzhou",
            "ap-southeast-1",
            "eu-central-1",
            "us-west-1",
        ] {
            assert!(run(&with(&[("RegionId", r)])).is_ok(), "{r}");
        }
        for r in ["cn-nowhere", "CN-HANGZHOU", " cn-hangzhou", "cn-bj2"] {
            assert_eq!(
                run(&with(&[("RegionId", r)])),
                Err(ApiError::RegionNotFound(r.into())),
                "{r}"
            );
        }
    }

    #[test]
    fn resource_groups() {
        let req = run(&with(&[("ResourceGroupId", "rg-resourcegroupid1")])).unwrap();
        assert_eq!(
            req.resource_group_id.as_deref(),
            Some("rg-resourcegroupid1")
        );
        for rg in ["rg-nope", ""] {
            assert_eq!(
                run(&with(&[("ResourceGroupId", rg)])),
                Err(ApiError::ResourceGroupNotFound(rg.into()))
            );
        }
    }

    type Pairs = Vec<(String, String)>;

    fn tags_result(tags: &[(String, String)]) -> Result<Vec<Tag>, ApiError> {
        let mut p = base();
        for (k, v) in tags {
            p.insert(k.clone(), v.clone());
        }
        run(&p).map(|r| r.tags)
    }

    fn tag_pairs(n: usize) -> Vec<(String, String)> {
        (1..=n)
            .flat_map(|i| {
                [
                    (format!("Tag.{i}.Key"), format!("k{i}")),
                    (format!("Tag.{i}.Value"), format!("v{i}")),
                ]
            })
            .collect()
    }

    fn s(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn tag_count_and_indices() {
        let tags = tags_result(&tag_pairs(20)).unwrap();
        assert_eq!(tags.len(), 20);
        // N order, not string order ("10" < "2").
        let keys: Vec<_> = tags.iter().map(|t| t.key.clone()).collect();
        let want: Vec<_> = (1..=20).map(|i| format!("k{i}")).collect();
        assert_eq!(keys, want);
        assert_eq!(
            tags[1],
            Tag {
                key: "k2".into(),
                value: "v2".into()
            }
        );

        assert_eq!(tags_result(&tag_pairs(21)), Err(ApiError::TooManyTags));
        let cases: Vec<(Pairs, Result<usize, ApiError>)> = vec![
            (s(&[("Tag.21.Key", "k")]), Err(ApiError::TooManyTags)),
            (s(&[("Tag.21.Value", "v")]), Err(ApiError::TooManyTags)),
            (s(&[("Tag.100.Key", "k")]), Err(ApiError::TooManyTags)),
            (
                s(&[("Tag.99999999999999999999999999.Key", "k")]),
                Err(ApiError::TooManyTags),
            ),
            (s(&[("Tag.20.Key", "k")]), Ok(1)),
            (s(&[("Tag.1.Key", "k")]), Ok(1)),
            (s(&[("Tag.0.Key", "k")]), Err(ApiError::TagKeyMalformed)),
            (s(&[("Tag.01.Key", "k")]), Err(ApiError::TagKeyMalformed)),
            (s(&[("Tag.x.Key", "k")]), Err(ApiError::TagKeyMalformed)),
            (s(&[("Tag..Key", "k")]), Err(ApiError::TagKeyMalformed)),
            (s(&[("Tag.-1.Key", "k")]), Err(ApiError::TagKeyMalformed)),
            (s(&[("Tag.+1.Key", "k")]), Err(ApiError::TagKeyMalformed)),
            (s(&[("Tag.1.1.Key", "k")]), Err(ApiError::TagKeyMalformed)),
            (s(&[("Tag.0.Value", "v")]), Err(ApiError::TagKeyMalformed)),
            // Gaps in N are fine.
            (s(&[("Tag.3.Key", "a"), ("Tag.7.Key", "b")]), Ok(2)),
            // Above-20 wins over a malformed index, deterministically.
            (
                s(&[("Tag.0.Key", "k"), ("Tag.21.Key", "k")]),
                Err(ApiError::TooManyTags),
            ),
        ];
        for (tags, want) in cases {
            assert_eq!(tags_result(&tags).map(|t| t.len()), want, "{tags:?}");
        }
    }

    #[test]
    fn tag_keys_and_values() {
        let long128 = "k".repeat(128);
        let long129 = "k".repeat(129);
        let cjk128 = "密".repeat(128);
        let cases: Vec<(Pairs, Result<(), ApiError>)> = vec![
            (
                s(&[
                    ("Tag.1.Key", "FinanceDept"),
                    ("Tag.1.Value", "FinanceDept.Joshua"),
                ]),
                Ok(()),
            ),
            (s(&[("Tag.1.Key", "k"), ("Tag.1.Value", "")]), Ok(())),
            (s(&[("Tag.1.Key", "k")]), Ok(())),
            (s(&[("Tag.1.Key", "")]), Err(ApiError::TagKeyMalformed)),
            (
                s(&[("Tag.1.Key", ""), ("Tag.1.Value", "v")]),
                Err(ApiError::TagKeyMalformed),
            ),
            (s(&[("Tag.1.Value", "v")]), Err(ApiError::TagKeyMalformed)),
            (s(&[("Tag.1.Value", "")]), Err(ApiError::TagKeyMalformed)),
            (
                s(&[("Tag.1.Key", "k"), ("Tag.2.Value", "v")]),
                Err(ApiError::TagKeyMalformed),
            ),
            (vec![("Tag.1.Key".into(), long128.clone())], Ok(())),
            (vec![("Tag.1.Key".into(), cjk128.clone())], Ok(())),
            (
                vec![("Tag.1.Key".into(), long129.clone())],
                Err(ApiError::TagKeyMalformed),
            ),
            (
                vec![
                    ("Tag.1.Key".into(), "k".into()),
                    ("Tag.1.Value".into(), long128),
                ],
                Ok(()),
            ),
            (
                vec![
                    ("Tag.1.Key".into(), "k".into()),
                    ("Tag.1.Value".into(), cjk128),
                ],
                Ok(()),
            ),
            (
                vec![
                    ("Tag.1.Key".into(), "k".into()),
                    ("Tag.1.Value".into(), long129),
                ],
                Err(ApiError::TagValueMalformed),
            ),
            (
                s(&[("Tag.1.Key", "aliyun")]),
                Err(ApiError::TagKeyMalformed),
            ),
            (
                s(&[("Tag.1.Key", "aliyunTeam")]),
                Err(ApiError::TagKeyMalformed),
            ),
            (
                s(&[("Tag.1.Key", "Aliyun-x")]),
                Err(ApiError::TagKeyMalformed),
            ),
            (s(&[("Tag.1.Key", "acs:x")]), Err(ApiError::TagKeyMalformed)),
            (s(&[("Tag.1.Key", "ACS:x")]), Err(ApiError::TagKeyMalformed)),
            (s(&[("Tag.1.Key", "myaliyun")]), Ok(())),
            (s(&[("Tag.1.Key", "acs")]), Ok(())),
            (
                s(&[("Tag.1.Key", "k"), ("Tag.1.Value", "aliyun1")]),
                Err(ApiError::TagValueMalformed),
            ),
            (
                s(&[("Tag.1.Key", "k"), ("Tag.1.Value", "acs:v")]),
                Err(ApiError::TagValueMalformed),
            ),
            (
                s(&[("Tag.1.Key", "k"), ("Tag.1.Value", "x aliyun")]),
                Ok(()),
            ),
            (
                s(&[("Tag.1.Key", "see http://x")]),
                Err(ApiError::TagKeyMalformed),
            ),
            (
                s(&[("Tag.1.Key", "https://x")]),
                Err(ApiError::TagKeyMalformed),
            ),
            (
                s(&[("Tag.1.Key", "HTTPS://x")]),
                Err(ApiError::TagKeyMalformed),
            ),
            (s(&[("Tag.1.Key", "http:/x")]), Ok(())),
            (
                s(&[("Tag.1.Key", "k"), ("Tag.1.Value", "go to https://x.y")]),
                Err(ApiError::TagValueMalformed),
            ),
            (
                s(&[("Tag.1.Key", "k"), ("Tag.1.Value", "http://x")]),
                Err(ApiError::TagValueMalformed),
            ),
            (
                s(&[("Tag.1.Key", "dup"), ("Tag.2.Key", "dup")]),
                Err(ApiError::DuplicateTagKey),
            ),
            (
                s(&[
                    ("Tag.1.Key", "dup"),
                    ("Tag.1.Value", "a"),
                    ("Tag.2.Key", "dup"),
                    ("Tag.2.Value", "b"),
                ]),
                Err(ApiError::DuplicateTagKey),
            ),
            (s(&[("Tag.1.Key", "Dup"), ("Tag.2.Key", "dup")]), Ok(())),
            // Content faults beat duplicates; earlier N beats later N.
            (
                s(&[("Tag.1.Key", "d"), ("Tag.2.Key", "d"), ("Tag.3.Key", "")]),
                Err(ApiError::TagKeyMalformed),
            ),
            (
                s(&[
                    ("Tag.1.Key", "k"),
                    ("Tag.1.Value", "acs:"),
                    ("Tag.2.Key", ""),
                ]),
                Err(ApiError::TagValueMalformed),
            ),
        ];
        for (tags, want) in cases {
            assert_eq!(tags_result(&tags).map(|_| ()), want, "{tags:?}");
        }
        let t = tags_result(&s(&[("Tag.1.Key", "k")])).unwrap();
        assert_eq!(
            t,
            vec![Tag {
                key: "k".into(),
                value: String::new()
            }]
        );
    }

    #[test]
    fn check_order() {
        let cases: Vec<(Vec<(&str, &str)>, ApiError)> = vec![
            (
                vec![("Bogus", "1"), ("Action", "Nope")],
                ApiError::InvalidParameter {
                    name: "Bogus".into(),
                    reason: "unknown parameter".into(),
                },
            ),
            (
                vec![("Action", "Nope"), ("KeyPairName", "")],
                ApiError::InvalidParameter {
                    name: "Action".into(),
                    reason: String::new(),
                },
            ),
            (
                vec![("Action", "CreateKeyPair"), ("KeyPairName", "")],
                ApiError::MissingParameter("RegionId".into()),
            ),
            (
                vec![("RegionId", "nowhere")],
                ApiError::MissingParameter("KeyPairName".into()),
            ),
            (
                vec![
                    ("RegionId", "nowhere"),
                    ("KeyPairName", "1"),
                    ("ResourceGroupId", "x"),
                ],
                ApiError::RegionNotFound("nowhere".into()),
            ),
            (
                vec![
                    ("RegionId", "cn-hangzhou"),
                    ("KeyPairName", "1"),
                    ("ResourceGroupId", "x"),
                ],
                ApiError::NameMalformed,
            ),
            (
                vec![
                    ("RegionId", "cn-hangzhou"),
                    ("KeyPairName", "ab"),
                    ("ResourceGroupId", "x"),
                    ("Tag.21.Key", "k"),
                ],
                ApiError::ResourceGroupNotFound("x".into()),
            ),
            (
                vec![
                    ("RegionId", "cn-hangzhou"),
                    ("KeyPairName", "ab"),
                    ("Tag.21.Key", ""),
                ],
                ApiError::TooManyTags,
            ),
        ];
        for (p, want) in cases {
            let got = run(&params(&p));
            match (&got, &want) {
                (
                    Err(ApiError::InvalidParameter { name, .. }),
                    ApiError::InvalidParameter { name: w, .. },
                ) => {
                    assert_eq!(name, w)
                }
                _ => assert_eq!(got, Err(want), "{p:?}"),
            }
        }
    }

    #[test]
    fn replies_for_every_variant() {
        let missing = "The input parameter \"KeyPairName\" that is mandatory for processing this request is not supplied.";
        let want: Vec<(u16, &str, &str)> = vec![
            (400, "MissingKeyPairName", missing),
            (400, "InvalidParameter", "The specified parameter \"Foo\" is not valid: unknown parameter."),
            (400, "InvalidKeyPairName.Malformed", "Specified Key Pair name is not valid."),
            (404, "InvalidRegionId.NotFound", "The specified RegionId does not exist."),
            (404, "InvalidZoneId.NotFound", "The specified zone does not exist."),
            (404, "InvalidResourceGroup.NotFound", "The ResourceGroup provided does not exist in our records."),
            (400, "Duplicate.TagKey", "The Tag.N.Key contain duplicate key."),
            (400, "InvalidTagKey.Malformed", "The specified Tag.n.Key is not valid."),
            (400, "InvalidTagValue.Malformed", "The specified Tag.n.Value is not valid."),
            (403, "QuotaExceed.Tags", "The maximum number of tags (20) is exceeded."),
            (403, "QuotaExceed.KeyPair", "The key pair quota exceeds."),
            (400, "KeyPair.AlreadyExist", "The key pair already exist."),
            (
                500,
                "InternalError",
                "The request processing has failed due to some unknown error, exception or failure.",
            ),
        ];
        let errors = all_errors();
        assert_eq!(errors.len(), want.len());
        for (err, (status, code, message)) in errors.iter().zip(want) {
            assert_eq!(
                err.reply(Provider::Aliyun),
                ErrorReply {
                    http_status: status,
                    code: code.into(),
                    message: message.into(),
                    ret_code: None
                },
                "{err:?}"
            );
        }
        let r = ApiError::MissingParameter("RegionId".into()).reply(Provider::Aliyun);
        assert_eq!(r.code, "MissingRegionId");
        assert_eq!(
            r.message,
            "The input parameter \"RegionId\" that is mandatory for processing this request is not supplied."
        );
        let action = ApiError::InvalidParameter {
            name: "Action".into(),
            reason: "x".into(),
        };
        assert_eq!(
            action.reply(Provider::Aliyun),
            ErrorReply {
                http_status: 404,
                code: "InvalidAction.NotFound".into(),
                message: "Specified api is not found, please check your url and method.".into(),
                ret_code: None
            }
        );
        // Internal detail stays in logs, never in the wire message.
        assert!(!ApiError::Internal("secret path".into())
            .reply(Provider::Aliyun)
            .message
            .contains("secret"));
    }

    const ID: &str = "473469c7-aa6f-4dc5-b3db-a3dc0de3c83e";

    fn created<'a>(fp: &'a str, body: &'a str) -> Created<'a> {
        Created {
            request_id: uuid::Uuid::parse_str(ID).unwrap(),
            key_pair_id: "",
            create_time: 1_700_000_000,
            fingerprint: fp,
            private_key_body: body,
        }
    }

    #[test]
    fn success_json_shape() {
        let req = run(&with(&[("KeyPairName", "test")])).unwrap();
        let body = crate::dialect::success_body(&req, &created("89:f0", "MIIE<&>"));
        assert_eq!(
            body,
            serde_json::json!({
                "RequestId": "473469C7-AA6F-4DC5-B3DB-A3DC0DE3C83E",
                "KeyPairName": "test",
                "KeyPairFingerPrint": "89:f0",
                "PrivateKeyBody": "MIIE<&>",
            })
        );
    }

    #[test]
    fn error_json_shape() {
        let id = uuid::Uuid::parse_str(ID).unwrap();
        let body = crate::dialect::error_body(Provider::Aliyun, &ApiError::NameMalformed, id);
        assert_eq!(
            body,
            serde_json::json!({
                "RequestId": "473469C7-AA6F-4DC5-B3DB-A3DC0DE3C83E",
                "HostId": "ecs.aliyuncs.com",
                "Code": "InvalidKeyPairName.Malformed",
                "Message": "Specified Key Pair name is not valid.",
                "Recommend": "https://api.aliyun.com/troubleshoot?q=InvalidKeyPairName.Malformed&product=Ecs&requestId=473469C7-AA6F-4DC5-B3DB-A3DC0DE3C83E",
            })
        );
        // Random ids render upper case too.
        let id = uuid::Uuid::new_v4();
        let body = error_json(&ApiError::QuotaExceeded, id);
        let rid = body["RequestId"].as_str().unwrap();
        assert_eq!(rid, id.to_string().to_uppercase());
        assert!(body["Recommend"].as_str().unwrap().contains(rid));
    }

    #[test]
    fn success_xml_matches_seed_layout_and_escapes() {
        let req = run(&with(&[("KeyPairName", "test")])).unwrap();
        let xml = success_xml(
            &req,
            &created("89:f0:ba", "MIIEpAIBAAKCAQEAtReyMzLIcBH78EV2zj****"),
        );
        assert_eq!(
            xml,
            "<CreateKeyPairResponse>\n<RequestId>473469C7-AA6F-4DC5-B3DB-A3DC0DE3C83E</RequestId>\n\
             <KeyPairName>test</KeyPairName>\n<KeyPairFingerPrint>89:f0:ba</KeyPairFingerPrint>\n\
             <PrivateKeyBody>MIIEpAIBAAKCAQEAtReyMzLIcBH78EV2zj****</PrivateKeyBody>\n\
             </CreateKeyPairResponse>"
        );
        let xml = success_xml(&req, &created("a<b", "x&y>z\"'\n"));
        assert!(
            xml.contains("<KeyPairFingerPrint>a&lt;b</KeyPairFingerPrint>"),
            "{xml}"
        );
        assert!(
            xml.contains("<PrivateKeyBody>x&amp;y&gt;z&quot;&apos;\n</PrivateKeyBody>"),
            "{xml}"
        );
    }

    #[test]
    fn error_xml_layout_and_escapes() {
        let id = uuid::Uuid::parse_str(ID).unwrap();
        let xml = error_xml(&ApiError::DuplicateTagKey, id);
        assert_eq!(
            xml,
            "<Error>\n<RequestId>473469C7-AA6F-4DC5-B3DB-A3DC0DE3C83E</RequestId>\n\
             <HostId>ecs.aliyuncs.com</HostId>\n<Code>Duplicate.TagKey</Code>\n\
             <Message>The Tag.N.Key contain duplicate key.</Message>\n\
             <Recommend>https://api.aliyun.com/troubleshoot?q=Duplicate.TagKey&amp;product=Ecs&amp;requestId=473469C7-AA6F-4DC5-B3DB-A3DC0DE3C83E</Recommend>\n\
             </Error>"
        );
        // Echoed caller text is escaped and cannot break the document.
        let err = ApiError::InvalidParameter {
            name: "<a>&\u{1}".into(),
            reason: "unknown parameter".into(),
        };
        let xml = error_xml(&err, id);
        assert!(xml.contains("&quot;&lt;a&gt;&amp;\u{FFFD}&quot;"), "{xml}");
    }

    #[test]
    fn xml_escape_table() {
        for (input, want) in [
            ("plain", "plain"),
            ("<&>", "&lt;&amp;&gt;"),
            ("\"'", "&quot;&apos;"),
            ("a\tb\nc\rd", "a\tb\nc\rd"),
            (
                "\u{0}\u{1f}\u{FFFE}\u{FFFF}",
                "\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD}",
            ),
            ("密钥", "密钥"),
        ] {
            assert_eq!(xml_escape(input), want);
        }
    }
}
