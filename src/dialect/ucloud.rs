//! UCloud `CreateUHostKeyPair` dialect (seed `003_…`): parameter validation, RetCodes and
//! messages, the JSON response, `KeyPairId` generation and the `KeyPairFingerPrint`.
//!
//! # Errors: RetCode table
//! UCloud answers every error with HTTP 200, a non-zero `RetCode` and a `Message`. The seed
//! lists no codes; these follow UCloud's public convention (1xx gateway, 2xx parameters,
//! 8xxx UHost resources) and are stable — callers may match on them.
//!
//! | RetCode | Cause                                                         | [`ApiError`]                         |
//! |--------:|---------------------------------------------------------------|--------------------------------------|
//! |     150 | service unavailable: keyfleet itself failed, retry later      | `Internal`                           |
//! |     153 | `keyfleet serve --throttle-rps`: too many requests            | `Gateway(Throttled)`                 |
//! |     160 | no `Action`                                                   | `MissingParameter("Action")`         |
//! |     161 | `Action` is not `CreateUHostKeyPair` (serve: no such action)  | `InvalidParameter { name: "Action" }`|
//! |     170 | `keyfleet serve`: no `Signature`                              | `Gateway(IncompleteSignature)`       |
//! |     171 | `keyfleet serve`: the signature does not match                | `Gateway(SignatureMismatch)`         |
//! |     172 | `keyfleet serve`: the `PublicKey` (API credential) is unknown | `Gateway(AccessKeyNotFound)`         |
//! |     220 | a required parameter (`KeyPairName`) is missing or empty      | `MissingParameter`                   |
//! |     230 | parameter not available: unknown name, bad `ProjectId`, …     | `InvalidParameter` (other names)     |
//! |     230 | `KeyPairName` not available (message names `[KeyPairName]`)   | `NameMalformed`                      |
//! |     230 | Alibaba-only parameters (resource group, tags; never produced by [`decode`]) | `ResourceGroupNotFound`, `DuplicateTagKey`, `TagKeyMalformed`, `TagValueMalformed`, `TooManyTags` |
//! |    8201 | `Region` does not exist                                       | `RegionNotFound`                     |
//! |    8202 | `Zone` is not a zone of the region                            | `ZoneNotFound`                       |
//! |    8203 | key pair quota of the project in the region exhausted         | `QuotaExceeded`                      |
//! |    8204 | a key pair of that name exists in the project and region      | `AlreadyExists`                      |
//!
//! # Check order
//! First failure wins: (1) parameter names, in byte order — only `Action`, `Region`, `Zone`,
//! `ProjectId`, `KeyPairName` are accepted (220/230 would otherwise hide a typo); (2) `Action`
//! value; (3) `KeyPairName` absent or empty; (4) `ProjectId`; (5) `Region`; (6) `Zone`;
//! (7) `KeyPairName` rules.
//!
//! # Readings of the seed
//! - `Region` absent → the catalogue's default region; present (even empty) → must exist.
//! - `Zone` absent → none; present → `<region>-NN` with NN two digits 01–99 (UCloud numbers
//!   zones from 01, e.g. the seed's `cn-zj-01` in `cn-zj`).
//! - `ProjectId` absent → the caller's default project (`owner`); present → 1–64 of
//!   `[A-Za-z0-9_-]`, which covers both `org-xxxxxx` ids and the seed's `EmINSQAU`.
//! - `KeyPairName`: 1–63 characters, each an ASCII letter, a Chinese character
//!   ([`super::is_chinese`]), an ASCII digit or an ASCII punctuation symbol
//!   (``!"#$%&'()*+,-./:;<=>?@[\]^_`{|}~``); no whitespace, no control characters.
//! - Fingerprint: `md5(ProjectId + "|" + KeyPairId + "|" + PublicKey)` as 32 lower-case hex
//!   digits, where `ProjectId` is the effective project and `PublicKey` is the OpenSSH
//!   public-key line (`ssh-rsa AAAA…`) exactly as handed out.
//! - The success body carries the `KeyPair` object of the field table and, like the seed's
//!   response example, `KeyPairName` at the top level too.

use md5::{Digest, Md5};
use rand_core::{OsRng, RngCore};

pub mod actions;

use super::{
    is_chinese, ApiError, Call, CreateParts, CreateRequest, Created, ErrorReply, GatewayError,
};

/// The only accepted `Action` value.
pub const ACTION: &str = "CreateUHostKeyPair";
/// `Action` of every response.
pub const RESPONSE_ACTION: &str = "CreateUHostKeyPairResponse";
/// Prefix of every `KeyPairId`.
pub const KEY_PAIR_ID_PREFIX: &str = "uhostkp-";

pub const RET_SERVICE_UNAVAILABLE: i64 = 150;
pub const RET_MISSING_ACTION: i64 = 160;
pub const RET_ACTION_NOT_AVAILABLE: i64 = 161;
pub const RET_MISSING_SIGNATURE: i64 = 170;
pub const RET_SIGNATURE_WRONG: i64 = 171;
pub const RET_USER_NOT_FOUND: i64 = 172;
pub const RET_THROTTLED: i64 = 153;
pub const RET_MISSING_PARAMS: i64 = 220;
pub const RET_PARAMS_NOT_AVAILABLE: i64 = 230;
pub const RET_REGION_NOT_AVAILABLE: i64 = 8201;
pub const RET_ZONE_NOT_AVAILABLE: i64 = 8202;
pub const RET_KEY_PAIR_QUOTA_EXCEEDED: i64 = 8203;
pub const RET_KEY_PAIR_NAME_EXISTS: i64 = 8204;

/// UCloud's signing parameters: a `PublicKey` here is the API credential, not an SSH key, which
/// is easy to confuse in a key-pair job, so it gets its own explanation.
const SIGNING_PARAMS: &[&str] = &["PublicKey", "Signature"];
/// What a signing parameter is refused with.
const SIGNING_REASON: &str = "a signing parameter (the API credential, not an SSH key); keyfleet \
                              takes no credentials or signatures";

/// How UCloud answers `err` (see the RetCode table in the module docs).
pub fn reply(err: &ApiError) -> ErrorReply {
    let not_available = |p: &str, why: &str| {
        (
            RET_PARAMS_NOT_AVAILABLE,
            format!("Params [{p}] not available: {why}"),
        )
    };
    let (ret, message) = match err {
        ApiError::MissingParameter(p) if p == "Action" => {
            (RET_MISSING_ACTION, "Missing Action".to_string())
        }
        ApiError::MissingParameter(p) => (RET_MISSING_PARAMS, format!("Missing params [{p}]")),
        ApiError::InvalidParameter { name, reason } if name == ApiError::ACTION => (
            RET_ACTION_NOT_AVAILABLE,
            format!("Action not available: {reason}"),
        ),
        ApiError::InvalidParameter { name, reason } => not_available(name, reason),
        ApiError::NameMalformed => not_available(
            "KeyPairName",
            "use 1-63 characters: letters (ASCII or Chinese), digits and ASCII symbols, \
             no whitespace or control characters",
        ),
        ApiError::ResourceGroupNotFound(_) => {
            not_available("ResourceGroupId", "UCloud has no resource groups")
        }
        ApiError::DuplicateTagKey => not_available("Tag", "duplicate tag key"),
        ApiError::TagKeyMalformed => not_available("Tag", "tag key is not valid"),
        ApiError::TagValueMalformed => not_available("Tag", "tag value is not valid"),
        ApiError::TooManyTags => not_available("Tag", "more than 20 tags"),
        ApiError::RegionNotFound(r) => (
            RET_REGION_NOT_AVAILABLE,
            format!("Region [{r}] not available"),
        ),
        ApiError::ZoneNotFound(z) => (
            RET_ZONE_NOT_AVAILABLE,
            format!("Zone [{z}] not available in this region"),
        ),
        ApiError::QuotaExceeded => (
            RET_KEY_PAIR_QUOTA_EXCEEDED,
            format!(
                "Key pair quota exceeded: a project may hold {} key pairs per region",
                super::KEY_PAIR_QUOTA
            ),
        ),
        ApiError::AlreadyExists => (
            RET_KEY_PAIR_NAME_EXISTS,
            "Key pair name already exists in this project and region".to_string(),
        ),
        // The detail is for our logs (Display), not for the caller.
        ApiError::Internal(_) | ApiError::Gateway(GatewayError::Unavailable) => (
            RET_SERVICE_UNAVAILABLE,
            "Service temporarily unavailable, please retry later".to_string(),
        ),
        ApiError::PublicKeyMalformed => not_available(
            "PublicKeyBody",
            "not an OpenSSH public key of type ssh-rsa, ssh-dss, ecdsa-sha2-* or ssh-ed25519",
        ),
        ApiError::KeyPairNamesInvalid => not_available("KeyPairIds", "at most 100 ids"),
        ApiError::Gateway(GatewayError::IncompleteSignature) => {
            (RET_MISSING_SIGNATURE, "Missing signature".to_string())
        }
        ApiError::Gateway(GatewayError::SignatureMismatch { .. }) => {
            (RET_SIGNATURE_WRONG, "Signature VerifyAC Error".to_string())
        }
        ApiError::Gateway(GatewayError::AccessKeyNotFound) => {
            (RET_USER_NOT_FOUND, "User not exist".to_string())
        }
        ApiError::Gateway(GatewayError::ActionMissing) => {
            (RET_MISSING_ACTION, "Missing Action".to_string())
        }
        ApiError::Gateway(GatewayError::ActionNotFound) => {
            (RET_ACTION_NOT_AVAILABLE, "Action not exist".to_string())
        }
        ApiError::Gateway(GatewayError::Throttled) => (
            RET_THROTTLED,
            "Request too frequent, please retry later".to_string(),
        ),
        // UCloud signs no time stamp, nonce, method or version: these never reach a UCloud
        // request; answered as a bad signature should one ever be produced.
        ApiError::Gateway(
            GatewayError::SignatureMethodInvalid
            | GatewayError::TimestampMalformed
            | GatewayError::TimestampExpired
            | GatewayError::NonceUsed
            | GatewayError::VersionInvalid,
        ) => (RET_SIGNATURE_WRONG, "Signature VerifyAC Error".to_string()),
        ApiError::Upstream(r) => (
            r.ret_code.unwrap_or(RET_SERVICE_UNAVAILABLE),
            r.message.clone(),
        ),
    };
    ErrorReply {
        http_status: 200,
        code: ret.to_string(),
        message,
        ret_code: Some(ret),
    }
}

/// Validate a UCloud parameter map in the documented check order. The owner is the default
/// project, used when `ProjectId` is absent.
pub fn validate(call: Call<'_>) -> Result<CreateParts<'_>, ApiError> {
    let known = |name: &str| {
        matches!(
            name,
            "Action" | "Region" | "Zone" | "ProjectId" | "KeyPairName"
        )
    };
    super::check_create(call.params, known, SIGNING_PARAMS, SIGNING_REASON, ACTION)?;
    let name = call.required("KeyPairName")?;
    // Project, region, zone: the rules every UCloud action shares.
    let scope = actions::scope_ref(call)?;
    if !name_is_valid(name) {
        return Err(ApiError::NameMalformed);
    }
    Ok(CreateParts {
        scope,
        name,
        resource_group_id: None,
        tags: Vec::new(),
        zone: call.params.get("Zone").map(String::as_str),
    })
}

/// [`validate`], the request copied out.
pub fn decode(call: Call<'_>) -> Result<CreateRequest, ApiError> {
    validate(call).map(CreateParts::into_request)
}

/// `KeyPairName` rule (see the module docs).
pub fn name_is_valid(name: &str) -> bool {
    (1..=63).contains(&name.chars().count())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c.is_ascii_punctuation() || is_chinese(c))
}

/// `ProjectId` shape when given (see the module docs).
pub fn project_id_is_valid(p: &str) -> bool {
    (1..=64).contains(&p.len())
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `zone` is `<region>-NN`, NN in 01..=99.
pub fn zone_in_region(zone: &str, region: &str) -> bool {
    let Some(nn) = zone
        .strip_prefix(region)
        .and_then(|rest| rest.strip_prefix('-'))
    else {
        return false;
    };
    nn.len() == 2 && nn.bytes().all(|b| b.is_ascii_digit()) && nn != "00"
}

/// A fresh `KeyPairId` from the OS random source.
///
/// # Panics
/// Only if the operating system's random source fails, in which case no key can be generated
/// either; use [`try_new_key_pair_id`] to get that as an error instead.
pub fn new_key_pair_id() -> String {
    match try_new_key_pair_id() {
        Ok(id) => id,
        Err(e) => panic!("{e}"),
    }
}

/// [`new_key_pair_id`], with an OS random-source failure as [`ApiError::Internal`].
pub fn try_new_key_pair_id() -> Result<String, ApiError> {
    key_pair_id_from(&mut OsRng)
        .map_err(|e| ApiError::Internal(format!("OS random source failed: {e}")))
}

/// `uhostkp-` + 8 characters drawn uniformly from `[a-z0-9]` out of `rng`.
pub fn key_pair_id_from<R: RngCore + ?Sized>(rng: &mut R) -> Result<String, rand_core::Error> {
    super::random_id(KEY_PAIR_ID_PREFIX, 8, rng)
}

/// `KeyPairFingerPrint`: md5(ProjectId + "|" + KeyPairId + "|" + PublicKey) as 32 lower-case
/// hex digits.
pub fn fingerprint(project_id: &str, key_pair_id: &str, public_key_line: &str) -> String {
    let mut h = Md5::new();
    h.update(project_id.as_bytes());
    h.update(b"|");
    h.update(key_pair_id.as_bytes());
    h.update(b"|");
    h.update(public_key_line.as_bytes());
    hex::encode(h.finalize())
}

/// `{"RetCode":0,"Action":…,"KeyPairName":…,"KeyPair":{…}}`.
pub fn success_json(req: &CreateRequest, created: &Created<'_>) -> serde_json::Value {
    serde_json::json!({
        "RetCode": 0,
        "Action": RESPONSE_ACTION,
        "KeyPairName": req.name,
        "KeyPair": {
            "ProjectId": req.scope.owner,
            "KeyPairId": created.key_pair_id,
            "KeyPairName": req.name,
            "KeyPairFingerPrint": created.fingerprint,
            "PrivateKeyBody": created.private_key_body,
            "CreateTime": created.create_time,
        },
    })
}

/// `{"RetCode": n, "Action": "CreateUHostKeyPairResponse", "Message": "…"}`.
pub fn error_json(err: &ApiError) -> serde_json::Value {
    let r = reply(err);
    serde_json::json!({
        "RetCode": r.ret_code.unwrap_or(RET_SERVICE_UNAVAILABLE),
        "Action": RESPONSE_ACTION,
        "Message": r.message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::tests::{all_errors, params};
    use crate::dialect::{Catalog, Provider, Scope};

    fn run(pairs: &[(&str, &str)]) -> Result<CreateRequest, ApiError> {
        crate::dialect::decode(
            Provider::Ucloud,
            "org-default",
            &params(pairs),
            &Catalog::default(),
        )
    }

    #[test]
    fn seed_example_decodes() {
        let req = run(&[
            ("Action", "CreateUHostKeyPair"),
            ("Region", "cn-zj"),
            ("Zone", "cn-zj-01"),
            ("ProjectId", "EmINSQAU"),
            ("KeyPairName", "IqZZckdR"),
        ])
        .unwrap();
        assert_eq!(
            req,
            CreateRequest {
                scope: Scope {
                    provider: Provider::Ucloud,
                    owner: "EmINSQAU".into(),
                    region: "cn-zj".into()
                },
                name: "IqZZckdR".into(),
                resource_group_id: None,
                tags: vec![],
                zone: Some("cn-zj-01".into()),
            }
        );
    }

    #[test]
    fn defaults_for_region_and_project() {
        let req = run(&[("KeyPairName", "k")]).unwrap();
        assert_eq!(req.scope.region, "cn-bj2");
        assert_eq!(req.scope.owner, "org-default");
        assert_eq!(req.zone, None);
        let cat = Catalog {
            ucloud_default_region: "hk".into(),
            ..Catalog::default()
        };
        let p = params(&[("KeyPairName", "k")]);
        let req = crate::dialect::decode(Provider::Ucloud, "p", &p, &cat).unwrap();
        assert_eq!(req.scope.region, "hk");
        assert_eq!(req.scope.key(), "ucloud:p:hk");
    }

    #[test]
    fn names() {
        let cases: Vec<(String, bool)> = vec![
            ("a".into(), true),
            ("1".into(), true),
            ("密".into(), true),
            ("密钥对一".into(), true),
            ("x".repeat(63), true),
            ("x".repeat(64), false),
            ("密".repeat(63), true),
            ("密".repeat(64), false),
            ("1abc".into(), true),
            ("http://x".into(), true),
            ("a.b/c@d:e_f-g".into(), true),
            ("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~".into(), true),
            ("a b".into(), false),
            (" a".into(), false),
            ("a\t".into(), false),
            ("a\n".into(), false),
            ("a\u{0}".into(), false),
            ("a\u{7f}".into(), false),
            ("a\u{3000}".into(), false), // ideographic space
            ("🔑".into(), false),
            ("é".into(), false),
            ("。".into(), false),
            ("ａ".into(), false),
        ];
        for (name, ok) in cases {
            let got = run(&[("KeyPairName", &name)]);
            if ok {
                assert_eq!(got.map(|r| r.name), Ok(name.clone()), "{name:?}");
            } else {
                assert_eq!(got, Err(ApiError::NameMalformed), "{name:?}");
            }
            assert_eq!(name_is_valid(&name), ok, "{name:?}");
        }
    }

    #[test]
    fn missing_name() {
        for p in [vec![], vec![("KeyPairName", "")], vec![("Region", "hk")]] {
            assert_eq!(
                run(&p),
                Err(ApiError::MissingParameter("KeyPairName".into())),
                "{p:?}"
            );
        }
    }

    #[test]
    fn regions() {
        for r in ["cn-bj2", "cn-sh2", "cn-gd", "hk", "us-ca", "cn-zj"] {
            let req = run(&[("KeyPairName", "k"), ("Region", r)]).unwrap();
            assert_eq!(req.scope.region, r);
        }
        for r in ["", "cn-hangzhou", "CN-BJ2", "nowhere"] {
            assert_eq!(
                run(&[("KeyPairName", "k"), ("Region", r)]),
                Err(ApiError::RegionNotFound(r.into())),
                "{r:?}"
            );
        }
    }

    #[test]
    fn zones() {
        let cases = [
            ("cn-zj", "cn-zj-01", true),
            ("cn-zj", "cn-zj-99", true),
            ("cn-zj", "cn-zj-00", false),
            ("cn-zj", "cn-zj-1", false),
            ("cn-zj", "cn-zj-001", false),
            ("cn-zj", "cn-zj-0a", false),
            ("cn-zj", "cn-zj01", false),
            ("cn-zj", "cn-bj2-01", false),
            ("cn-zj", "", false),
            ("cn-zj", "cn-zj-", false),
            ("cn-zj", "CN-ZJ-01", false),
            ("cn-zj", "cn-zj-０1", false), // full-width digit
            ("hk", "hk-02", true),
        ];
        for (region, zone, ok) in cases {
            let got = run(&[("KeyPairName", "k"), ("Region", region), ("Zone", zone)]);
            if ok {
                assert_eq!(got.map(|r| r.zone), Ok(Some(zone.to_string())), "{zone}");
            } else {
                assert_eq!(got, Err(ApiError::ZoneNotFound(zone.into())), "{zone:?}");
            }
            assert_eq!(zone_in_region(zone, region), ok, "{zone:?}");
        }
        // Without Region the zone must belong to the default region.
        assert!(run(&[("KeyPairName", "k"), ("Zone", "cn-bj2-05")]).is_ok());
        assert_eq!(
            run(&[("KeyPairName", "k"), ("Zone", "cn-zj-01")]),
            Err(ApiError::ZoneNotFound("cn-zj-01".into()))
        );
    }

    #[test]
    fn project_ids() {
        for (p, ok) in [
            ("org-abc123", true),
            ("EmINSQAU", true),
            ("a", true),
            ("a_b-C9", true),
            ("", false),
            ("org abc", false),
            ("org:abc", false),
            ("项目", false),
        ] {
            let got = run(&[("KeyPairName", "k"), ("ProjectId", p)]);
            match got {
                Ok(r) if ok => assert_eq!(r.scope.owner, p),
                Err(ApiError::InvalidParameter { name, .. }) if !ok => {
                    assert_eq!(name, "ProjectId")
                }
                other => panic!("{p:?}: {other:?}"),
            }
        }
        let p64 = "p".repeat(64);
        assert!(run(&[("KeyPairName", "k"), ("ProjectId", &p64)]).is_ok());
        let p65 = "p".repeat(65);
        assert!(run(&[("KeyPairName", "k"), ("ProjectId", &p65)]).is_err());
    }

    #[test]
    fn unknown_parameters_and_action() {
        for name in [
            "RegionId",
            "region",
            "Tag.1.Key",
            "ResourceGroupId",
            "KeyPairname",
        ] {
            match run(&[("KeyPairName", "k"), (name, "x")]) {
                Err(ApiError::InvalidParameter { name: n, reason }) => {
                    assert_eq!((n.as_str(), reason.as_str()), (name, "unknown parameter"))
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        match run(&[("KeyPairName", "k"), ("PublicKey", "ssh-rsa AAAA")]) {
            Err(ApiError::InvalidParameter { name, reason }) => {
                assert_eq!(name, "PublicKey");
                assert!(reason.contains("not an SSH key"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(run(&[("KeyPairName", "k"), ("Action", "CreateUHostKeyPair")]).is_ok());
        for bad in ["CreateKeyPair", "", "createuhostkeypair"] {
            let err = run(&[("KeyPairName", "k"), ("Action", bad)]).unwrap_err();
            let r = err.reply(Provider::Ucloud);
            assert_eq!((r.http_status, r.ret_code), (200, Some(161)), "{bad:?}");
        }
    }

    #[test]
    fn check_order() {
        let cases: Vec<(Vec<(&str, &str)>, i64)> = vec![
            (vec![("Bogus", "x"), ("Action", "Nope")], 230),
            (vec![("Action", "Nope")], 161),
            (vec![("ProjectId", "bad id"), ("Region", "nowhere")], 220),
            (
                vec![
                    ("KeyPairName", " "),
                    ("ProjectId", "bad id"),
                    ("Region", "nowhere"),
                ],
                230,
            ),
            (
                vec![("KeyPairName", " "), ("Region", "nowhere"), ("Zone", "x")],
                8201,
            ),
            (
                vec![("KeyPairName", " "), ("Region", "hk"), ("Zone", "x")],
                8202,
            ),
            (
                vec![("KeyPairName", " "), ("Region", "hk"), ("Zone", "hk-01")],
                230,
            ),
        ];
        for (p, code) in cases {
            let err = run(&p).unwrap_err();
            assert_eq!(
                err.reply(Provider::Ucloud).ret_code,
                Some(code),
                "{p:?}: {err:?}"
            );
        }
        // Distinguish the two 230s by cause.
        assert!(matches!(
            run(&[("KeyPairName", " "), ("ProjectId", "bad id")]),
            Err(ApiError::InvalidParameter { .. })
        ));
    }

    #[test]
    fn replies_for_every_variant() {
        let want: Vec<(i64, &str)> = vec![
            (220, "Missing params [KeyPairName]"),
            (230, "Params [Foo] not available: unknown parameter"),
            (
                230,
                "Params [KeyPairName] not available: use 1-63 characters: letters (ASCII or \
                 Chinese), digits and ASCII symbols, no whitespace or control characters",
            ),
            (8201, "Region [xx] not available"),
            (8202, "Zone [xx-01] not available in this region"),
            (
                230,
                "Params [ResourceGroupId] not available: UCloud has no resource groups",
            ),
            (230, "Params [Tag] not available: duplicate tag key"),
            (230, "Params [Tag] not available: tag key is not valid"),
            (230, "Params [Tag] not available: tag value is not valid"),
            (230, "Params [Tag] not available: more than 20 tags"),
            (
                8203,
                "Key pair quota exceeded: a project may hold 500 key pairs per region",
            ),
            (
                8204,
                "Key pair name already exists in this project and region",
            ),
            (150, "Service temporarily unavailable, please retry later"),
        ];
        let errors = all_errors();
        assert_eq!(errors.len(), want.len());
        for (err, (ret, message)) in errors.iter().zip(want) {
            assert_eq!(
                err.reply(Provider::Ucloud),
                ErrorReply {
                    http_status: 200,
                    code: ret.to_string(),
                    message: message.into(),
                    ret_code: Some(ret)
                },
                "{err:?}"
            );
            assert_eq!(
                crate::dialect::error_body(Provider::Ucloud, err, uuid::Uuid::nil()),
                serde_json::json!({
                    "RetCode": ret,
                    "Action": "CreateUHostKeyPairResponse",
                    "Message": message,
                })
            );
        }
        let action = ApiError::InvalidParameter {
            name: "Action".into(),
            reason: "unsupported action \"X\"; expected CreateUHostKeyPair".into(),
        };
        assert_eq!(
            action.reply(Provider::Ucloud).message,
            "Action not available: unsupported action \"X\"; expected CreateUHostKeyPair"
        );
    }

    #[test]
    fn success_body_shape() {
        let req = run(&[("KeyPairName", "bRkLZgiA"), ("ProjectId", "org-p")]).unwrap();
        let created = Created {
            request_id: uuid::Uuid::nil(),
            key_pair_id: "uhostkp-abcd1234",
            create_time: 1_700_000_000,
            fingerprint: "0123456789abcdef0123456789abcdef",
            private_key_body: "-----BEGIN PRIVATE KEY-----\n…",
        };
        assert_eq!(
            crate::dialect::success_body(&req, &created),
            serde_json::json!({
                "RetCode": 0,
                "Action": "CreateUHostKeyPairResponse",
                "KeyPairName": "bRkLZgiA",
                "KeyPair": {
                    "ProjectId": "org-p",
                    "KeyPairId": "uhostkp-abcd1234",
                    "KeyPairName": "bRkLZgiA",
                    "KeyPairFingerPrint": "0123456789abcdef0123456789abcdef",
                    "PrivateKeyBody": "-----BEGIN PRIVATE KEY-----\n…",
                    "CreateTime": 1_700_000_000,
                }
            })
        );
    }

    #[test]
    fn fingerprint_matches_md5sum() {
        // printf '%s' 'p|k|ssh-rsa AAAA' | md5sum
        assert_eq!(
            fingerprint("p", "k", "ssh-rsa AAAA"),
            "f513b4da1c95186b35a8b3ca07484599"
        );
        // printf '%s' 'org-abc|uhostkp-abcd1234|ssh-rsa AAAAB3NzaC1yc2E= me@host' | md5sum
        assert_eq!(
            fingerprint(
                "org-abc",
                "uhostkp-abcd1234",
                "ssh-rsa AAAAB3NzaC1yc2E= me@host"
            ),
            "4cac9d6dbc2980b33077c3156cdd9367"
        );
        // printf '%s' '||' | md5sum
        assert_eq!(fingerprint("", "", ""), "7d010443693eec253a121e2aa2ba177c");
    }

    fn assert_id_shape(id: &str) {
        let rest = id
            .strip_prefix("uhostkp-")
            .unwrap_or_else(|| panic!("{id}"));
        assert_eq!(rest.len(), 8, "{id}");
        assert!(
            rest.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "{id}"
        );
    }

    #[test]
    fn key_pair_ids_have_the_documented_shape() {
        let mut seen = std::collections::BTreeSet::new();
        let mut chars = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            let id = new_key_pair_id();
            assert_id_shape(&id);
            chars.extend(id[8..].chars());
            seen.insert(id);
        }
        // 36^8 ids: 2000 draws colliding would mean a broken source.
        assert_eq!(seen.len(), 2000);
        // 16000 uniform draws over 36 symbols reach every symbol.
        assert_eq!(chars.len(), 36);
        assert_id_shape(&try_new_key_pair_id().unwrap());
    }

    /// Yields a fixed byte sequence, cycling.
    struct Bytes(Vec<u8>, usize);
    impl RngCore for Bytes {
        fn next_u32(&mut self) -> u32 {
            let mut b = [0; 4];
            self.fill_bytes(&mut b);
            u32::from_le_bytes(b)
        }
        fn next_u64(&mut self) -> u64 {
            let mut b = [0; 8];
            self.fill_bytes(&mut b);
            u64::from_le_bytes(b)
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            for d in dest {
                *d = self.0[self.1 % self.0.len()];
                self.1 += 1;
            }
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }

    #[test]
    fn key_pair_id_rejects_biased_bytes() {
        // 252..=255 would map to a..d a second time; they must be skipped.
        let mut rng = Bytes(vec![252, 253, 254, 255, 0, 35, 36, 251], 0);
        assert_eq!(key_pair_id_from(&mut rng).unwrap(), "uhostkp-a9a9a9a9");
        // A source that only ever yields rejected bytes keeps drawing, then finishes once good
        // bytes arrive.
        let mut seq = vec![255u8; 40];
        seq.extend(0u8..8);
        let mut rng = Bytes(seq, 0);
        assert_eq!(key_pair_id_from(&mut rng).unwrap(), "uhostkp-abcdefgh");
    }
}
