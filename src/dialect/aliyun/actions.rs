//! Alibaba ECS ImportKeyPair, DescribeKeyPairs and DeleteKeyPairs (version 2014-05-26):
//! parameters, check order and answers, as `keyfleet serve` speaks them. Create is the parent
//! module's.
//!
//! Check order, first failure wins (as for create): parameter names; required parameters
//! (`RegionId`, then the action's own); `RegionId` in the catalogue; then the action's values.
//!
//! Readings where the pages are silent (contract §5, §8):
//! - DescribeKeyPairs `PageSize` above 50 (or 0) and `PageNumber` 0 are refused with 400
//!   `InvalidParameter` rather than clamped, so a client never silently sees fewer pairs than
//!   it asked for. `ResourceGroupId` and tags filter; a group that does not exist matches
//!   nothing rather than failing.
//! - DeleteKeyPairs with names that do not exist succeeds and deletes nothing; an empty array
//!   or one of more than 100 names is `InvalidKeyPairNames.ValueNotSupported`.

use super::super::action::{
    check_names, parse_bool, parse_number, DeleteRequest, DescribeRequest, ImportRequest,
    ImportRules, Targets, MAX_DELETE,
};
use super::super::{clip, ApiError, Call, Provider, Scope, ScopeRef};
use super::{decode_tags, name_is_valid, request_id, tag_param, xml_escape};
use crate::dialect::record::KeyPairRecord;
use crate::time::rfc3339;

/// Most pairs one DescribeKeyPairs page holds, and its default.
pub const MAX_PAGE_SIZE: usize = 50;
pub const DEFAULT_PAGE_SIZE: usize = 10;

/// `RegionId` given and in the catalogue (create uses it too).
pub(super) fn scope(call: Call<'_>) -> Result<Scope, ApiError> {
    scope_ref(call).map(ScopeRef::to_scope)
}

/// [`scope`], borrowed from the request.
pub(super) fn scope_ref(call: Call<'_>) -> Result<ScopeRef<'_>, ApiError> {
    let region = call.required("RegionId")?;
    if !call.catalog.aliyun_regions.contains(region) {
        return Err(ApiError::RegionNotFound(clip(region)));
    }
    Ok(ScopeRef {
        provider: Provider::Aliyun,
        owner: call.owner,
        region,
    })
}

/// `ResourceGroupId`, if given (even empty), in the catalogue (create uses it too).
pub(super) fn resource_group(call: Call<'_>) -> Result<Option<String>, ApiError> {
    resource_group_ref(call).map(|rg| rg.map(str::to_owned))
}

/// [`resource_group`], borrowed from the request.
pub(super) fn resource_group_ref(call: Call<'_>) -> Result<Option<&str>, ApiError> {
    match call.params.get("ResourceGroupId") {
        Some(rg) if !call.catalog.resource_groups.contains(rg) => {
            Err(ApiError::ResourceGroupNotFound(clip(rg)))
        }
        rg => Ok(rg.map(String::as_str)),
    }
}

/// Alibaba's part of the shared import: the resource group, then the tags, between the name
/// rule and the key.
const IMPORT: ImportRules = ImportRules {
    scope,
    name_is_valid,
    extras: |call| Ok((resource_group(call)?, decode_tags(call.params)?)),
};

pub fn decode_import(call: Call<'_>) -> Result<ImportRequest, ApiError> {
    check_names(call.params, |n| {
        matches!(
            n,
            "Action" | "RegionId" | "KeyPairName" | "PublicKeyBody" | "ResourceGroupId"
        ) || tag_param(n).is_some()
    })?;
    call.required("RegionId")?;
    ImportRequest::decode(call, &IMPORT)
}

pub fn decode_describe(call: Call<'_>) -> Result<DescribeRequest, ApiError> {
    let params = call.params;
    check_names(params, |n| {
        matches!(
            n,
            "Action"
                | "RegionId"
                | "KeyPairName"
                | "KeyPairFingerPrint"
                | "PageNumber"
                | "PageSize"
                | "IncludePublicKey"
                | "ResourceGroupId"
        ) || tag_param(n).is_some()
    })?;
    let scope = scope(call)?;
    let page_number = parse_number(params, "PageNumber", 1, 1..=1_000_000)?;
    let page_size = parse_number(params, "PageSize", DEFAULT_PAGE_SIZE, 1..=MAX_PAGE_SIZE)?;
    let include_public_key = match params.get("IncludePublicKey") {
        Some(v) => parse_bool("IncludePublicKey", v)?,
        None => false,
    };
    let tags = decode_tags(params)?;
    Ok(DescribeRequest {
        resource_group_id: call.nonempty("ResourceGroupId"),
        tags,
        include_public_key,
        ..DescribeRequest::page(scope, call, (page_number - 1) * page_size, page_size)
    })
}

pub fn decode_delete(call: Call<'_>) -> Result<DeleteRequest, ApiError> {
    check_names(call.params, |n| {
        matches!(n, "Action" | "RegionId" | "KeyPairNames")
    })?;
    call.required("RegionId")?;
    let raw = call.required("KeyPairNames")?;
    let scope = scope(call)?;
    let names: Vec<String> =
        serde_json::from_str(raw).map_err(|_| ApiError::KeyPairNamesInvalid)?;
    if names.is_empty() || names.len() > MAX_DELETE {
        return Err(ApiError::KeyPairNamesInvalid);
    }
    Ok(DeleteRequest {
        scope,
        targets: Targets::Names(names),
    })
}

pub fn import_json(record: &KeyPairRecord, id: uuid::Uuid) -> serde_json::Value {
    serde_json::json!({
        "RequestId": request_id(id),
        "KeyPairName": record.name,
        "KeyPairFingerPrint": record.key_pair_fingerprint,
    })
}

pub fn describe_json(
    req: &DescribeRequest,
    total: usize,
    page: &[KeyPairRecord],
    id: uuid::Uuid,
) -> serde_json::Value {
    let pairs: Vec<serde_json::Value> = page
        .iter()
        .map(|r| {
            let tags: Vec<serde_json::Value> = r
                .tags
                .iter()
                .map(|t| serde_json::json!({"TagKey": t.key, "TagValue": t.value}))
                .collect();
            let mut pair = serde_json::json!({
                "CreationTime": rfc3339(r.created_at),
                "KeyPairName": r.name,
                "KeyPairFingerPrint": r.key_pair_fingerprint,
                "ResourceGroupId": r.resource_group_id.clone().unwrap_or_default(),
                "Tags": {"Tag": tags},
            });
            if req.include_public_key {
                pair["PublicKey"] = serde_json::Value::String(r.public_key.clone());
            }
            pair
        })
        .collect();
    serde_json::json!({
        "RequestId": request_id(id),
        "TotalCount": total,
        "PageNumber": req.offset / req.limit.max(1) + 1,
        "PageSize": req.limit,
        "KeyPairs": {"KeyPair": pairs},
    })
}

/// Alibaba's XML form of a JSON answer: `<{root}>` around the fields; an array becomes one
/// element per item under the array's own name (`"KeyPair": [a, b]` →
/// `<KeyPair>a</KeyPair><KeyPair>b</KeyPair>`), which is how the POP gateway renders
/// `KeyPairs.KeyPair` and `Tags.Tag`.
pub fn to_xml(root: &str, value: &serde_json::Value) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    element(&mut out, root, value);
    out
}

fn element(out: &mut String, name: &str, value: &serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Array(items) => {
            for item in items {
                element(out, name, item);
            }
        }
        Value::Object(fields) => {
            out.push_str(&format!("<{name}>"));
            for (k, v) in fields {
                element(out, k, v);
            }
            out.push_str(&format!("</{name}>"));
        }
        Value::Null => out.push_str(&format!("<{name}/>")),
        Value::String(s) => out.push_str(&format!("<{name}>{}</{name}>", xml_escape(s))),
        other => out.push_str(&format!("<{name}>{other}</{name}>")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::tests::params;
    // Through the dispatchers, as `keyfleet serve` calls them.
    use crate::dialect::{decode_delete, decode_describe, Catalog};

    #[test]
    fn describe_paging_bounds() {
        let cat = Catalog::default();
        let ok = |kv: &[(&str, &str)]| decode_describe(Provider::Aliyun, "a", &params(kv), &cat);
        let r = ok(&[("RegionId", "cn-hangzhou")]).unwrap();
        assert_eq!((r.offset, r.limit), (0, 10));
        let r = ok(&[
            ("RegionId", "cn-hangzhou"),
            ("PageNumber", "3"),
            ("PageSize", "50"),
        ])
        .unwrap();
        assert_eq!((r.offset, r.limit), (100, 50));
        for bad in [
            ("PageSize", "51"),
            ("PageSize", "0"),
            ("PageNumber", "0"),
            ("PageNumber", "x"),
        ] {
            let e = ok(&[("RegionId", "cn-hangzhou"), bad]).unwrap_err();
            assert!(
                matches!(e, ApiError::InvalidParameter { .. }),
                "{bad:?}: {e:?}"
            );
        }
        let r = ok(&[("RegionId", "cn-hangzhou"), ("IncludePublicKey", "True")]).unwrap();
        assert!(r.include_public_key);
        assert_eq!(
            ok(&[("KeyPairName", "x")]).unwrap_err(),
            ApiError::MissingParameter("RegionId".into())
        );
    }

    #[test]
    fn delete_names_are_a_json_array_of_at_most_100() {
        let cat = Catalog::default();
        let del = |names: &str| {
            decode_delete(
                Provider::Aliyun,
                "a",
                &params(&[("RegionId", "cn-hangzhou"), ("KeyPairNames", names)]),
                &cat,
            )
        };
        assert!(del("[\"ab\"]").is_ok());
        let hundred = serde_json::to_string(&vec!["ab"; 100]).unwrap();
        assert!(del(&hundred).is_ok());
        let too_many = serde_json::to_string(&vec!["ab"; 101]).unwrap();
        for bad in ["ab", "[]", "[1]", "{\"a\":1}", too_many.as_str()] {
            assert_eq!(
                del(bad).unwrap_err(),
                ApiError::KeyPairNamesInvalid,
                "{bad}"
            );
        }
        let missing = decode_delete(
            Provider::Aliyun,
            "a",
            &params(&[("RegionId", "cn-hangzhou")]),
            &cat,
        );
        assert_eq!(
            missing.unwrap_err().reply(Provider::Aliyun).code,
            "MissingParameter"
        );
    }

    #[test]
    fn xml_repeats_array_items_under_their_name() {
        let v = serde_json::json!({"KeyPairs": {"KeyPair": [{"KeyPairName": "a<b"}, {"KeyPairName": "c"}]}, "TotalCount": 2});
        let x = to_xml("DescribeKeyPairsResponse", &v);
        assert!(x.contains("<KeyPairs><KeyPair><KeyPairName>a&lt;b</KeyPairName></KeyPair><KeyPair><KeyPairName>c</KeyPairName></KeyPair></KeyPairs>"), "{x}");
        assert!(x.contains("<TotalCount>2</TotalCount>"), "{x}");
    }
}
