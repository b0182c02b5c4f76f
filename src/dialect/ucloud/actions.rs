//! UCloud ImportUHostKeyPairs, DescribeUHostKeyPairs and DeleteUHostKeyPairs: parameters,
//! check order and answers, as `keyfleet serve` speaks them. Create is the parent module's.
//!
//! Scope is project + region as for create: `ProjectId` absent → the caller's default project;
//! any well-formed `ProjectId` is a project (created on first use, as keyfleet has no project
//! list); `Region` absent → the default region.
//!
//! Readings where the pages are silent:
//! - Import: `KeyPairFingerPrint` is md5(`ProjectId|KeyPairId|type base64`), the same form as a
//!   created pair's (the public key without its comment), so both are described alike.
//! - Describe: `KeyPairName` matches exactly; `Limit` above 100 (or 0) is refused with 230.
//! - Delete: `KeyPairIds.N` with N from 0 (as the SDK numbers lists); ids that do not exist
//!   in the scope are skipped; more than 100 ids is 230.

use super::super::action::{
    check_names, parse_number, ActionKind, DeleteRequest, DescribeRequest, ImportRequest,
    ImportRules, Targets, MAX_DELETE,
};
use super::super::{clip, ApiError, Call, Provider, Scope, ScopeRef};
use super::{name_is_valid, project_id_is_valid, zone_in_region};
use crate::dialect::record::KeyPairRecord;

pub const DEFAULT_LIMIT: usize = 20;
pub const MAX_LIMIT: usize = 100;

/// The scope of a UCloud request, checked in the documented order: `ProjectId`, `Region`,
/// `Zone` (create uses it too).
pub(super) fn scope(call: Call<'_>) -> Result<Scope, ApiError> {
    scope_ref(call).map(ScopeRef::to_scope)
}

/// [`scope`], borrowed from the request (the default project and region from the caller and
/// the catalogue).
pub(super) fn scope_ref(call: Call<'_>) -> Result<ScopeRef<'_>, ApiError> {
    let params = call.params;
    let project = match params.get("ProjectId") {
        None => call.owner,
        Some(p) if project_id_is_valid(p) => p.as_str(),
        Some(p) => {
            return Err(ApiError::InvalidParameter {
                name: "ProjectId".into(),
                reason: format!("{:?} is not 1-64 of [A-Za-z0-9_-]", clip(p)),
            })
        }
    };
    let region = match params.get("Region") {
        None => call.catalog.ucloud_default_region.as_str(),
        Some(r) if call.catalog.ucloud_regions.contains(r) => r.as_str(),
        Some(r) => return Err(ApiError::RegionNotFound(clip(r))),
    };
    if let Some(z) = params.get("Zone") {
        if !zone_in_region(z, region) {
            return Err(ApiError::ZoneNotFound(clip(z)));
        }
    }
    Ok(ScopeRef {
        provider: Provider::Ucloud,
        owner: project,
        region,
    })
}

fn common(n: &str) -> bool {
    matches!(n, "Action" | "Region" | "Zone" | "ProjectId")
}

/// UCloud's part of the shared import: no resource groups, no tags.
const IMPORT: ImportRules = ImportRules {
    scope,
    name_is_valid,
    extras: |_| Ok((None, Vec::new())),
};

pub fn decode_import(call: Call<'_>) -> Result<ImportRequest, ApiError> {
    check_names(call.params, |n| {
        common(n) || matches!(n, "KeyPairName" | "PublicKeyBody")
    })?;
    ImportRequest::decode(call, &IMPORT)
}

pub fn decode_describe(call: Call<'_>) -> Result<DescribeRequest, ApiError> {
    check_names(call.params, |n| {
        common(n) || matches!(n, "KeyPairName" | "KeyPairFingerPrint" | "Offset" | "Limit")
    })?;
    let scope = scope(call)?;
    let offset = parse_number(call.params, "Offset", 0, 0..=usize::MAX / 2)?;
    let limit = parse_number(call.params, "Limit", DEFAULT_LIMIT, 1..=MAX_LIMIT)?;
    Ok(DescribeRequest::page(scope, call, offset, limit))
}

/// `KeyPairIds.N`, N a plain decimal from 0.
fn id_index(name: &str) -> Option<usize> {
    let n = name.strip_prefix("KeyPairIds.")?;
    if n.is_empty() || (n.len() > 1 && n.starts_with('0')) || !n.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    n.parse().ok()
}

pub fn decode_delete(call: Call<'_>) -> Result<DeleteRequest, ApiError> {
    check_names(call.params, |n| common(n) || id_index(n).is_some())?;
    let mut ids: Vec<(usize, &String)> = call
        .params
        .iter()
        .filter_map(|(k, v)| id_index(k).map(|i| (i, v)))
        .filter(|(_, v)| !v.is_empty())
        .collect();
    if ids.is_empty() {
        return Err(ApiError::MissingParameter("KeyPairIds".into()));
    }
    let scope = scope(call)?;
    if ids.len() > MAX_DELETE {
        return Err(ApiError::KeyPairNamesInvalid);
    }
    ids.sort();
    Ok(DeleteRequest {
        scope,
        targets: Targets::Ids(ids.into_iter().map(|(_, v)| v.clone()).collect()),
    })
}

fn response_action(kind: ActionKind) -> String {
    format!("{}Response", kind.name(Provider::Ucloud))
}

pub fn import_json(record: &KeyPairRecord) -> serde_json::Value {
    serde_json::json!({
        "RetCode": 0,
        "Action": response_action(ActionKind::Import),
        "KeyPairId": record.key_pair_id.clone().unwrap_or_default(),
        "KeyPairName": record.name,
        "KeyPairFingerPrint": record.key_pair_fingerprint,
    })
}

pub fn describe_json(
    _req: &DescribeRequest,
    total: usize,
    page: &[KeyPairRecord],
) -> serde_json::Value {
    let pairs: Vec<serde_json::Value> = page
        .iter()
        .map(|r| {
            serde_json::json!({
                "ProjectId": r.scope.owner,
                "KeyPairId": r.key_pair_id.clone().unwrap_or_default(),
                "KeyPairName": r.name,
                "KeyPairFingerPrint": r.key_pair_fingerprint,
                "CreateTime": r.created_at,
            })
        })
        .collect();
    serde_json::json!({
        "RetCode": 0,
        "Action": response_action(ActionKind::Describe),
        "TotalCount": total,
        "KeyPairs": pairs,
    })
}

/// An error answer of `action` (the envelope names the action that was asked).
pub fn error_json_for(action: &str, err: &ApiError) -> serde_json::Value {
    let r = super::reply(err);
    serde_json::json!({
        "RetCode": r.ret_code.unwrap_or(super::RET_SERVICE_UNAVAILABLE),
        "Action": format!("{action}Response"),
        "Message": r.message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::tests::params;
    // Through the dispatchers, as `keyfleet serve` calls them.
    use crate::dialect::{decode_delete, decode_describe, Catalog};

    #[test]
    fn delete_takes_zero_based_ids() {
        let cat = Catalog::default();
        let r = decode_delete(
            Provider::Ucloud,
            "p",
            &params(&[("KeyPairIds.1", "uhostkp-b"), ("KeyPairIds.0", "uhostkp-a")]),
            &cat,
        )
        .unwrap();
        assert_eq!(
            r.targets,
            Targets::Ids(vec!["uhostkp-a".into(), "uhostkp-b".into()])
        );
        assert_eq!(r.scope.owner, "p");
        let e = decode_delete(Provider::Ucloud, "p", &params(&[]), &cat).unwrap_err();
        assert_eq!(e.reply(Provider::Ucloud).ret_code, Some(220));
        let leading_zero = params(&[("KeyPairIds.01", "x")]);
        let e = decode_delete(Provider::Ucloud, "p", &leading_zero, &cat).unwrap_err();
        assert_eq!(e.reply(Provider::Ucloud).ret_code, Some(230));
    }

    #[test]
    fn describe_limit_bounds() {
        let cat = Catalog::default();
        let d = |kv: &[(&str, &str)]| decode_describe(Provider::Ucloud, "p", &params(kv), &cat);
        let r = d(&[]).unwrap();
        assert_eq!((r.offset, r.limit), (0, 20));
        assert_eq!(r.scope.region, "cn-bj2");
        assert!(d(&[("Limit", "100")]).is_ok());
        assert!(d(&[("Limit", "101")]).is_err());
        assert!(d(&[("Limit", "0")]).is_err());
        assert!(d(&[("Offset", "-1")]).is_err());
    }
}
