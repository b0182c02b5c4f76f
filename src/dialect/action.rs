//! The key-pair actions besides create, as both clouds' APIs name them (`keyfleet serve`):
//! import, describe and delete, in a provider-neutral form. Each dialect decodes its own
//! parameters into these (`aliyun/actions.rs`, `ucloud/actions.rs`) and renders the answers;
//! `dialect/mod.rs` picks the dialect.

use std::collections::BTreeMap;

use super::public_key::{self, ImportedKey};
use super::record::{wildcard_match, KeyPairRecord};
use super::{ApiError, Call, Provider, Scope, Tag};

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActionKind {
    Create,
    Import,
    Describe,
    Delete,
}

impl ActionKind {
    pub const ALL: [ActionKind; 4] = [
        ActionKind::Create,
        ActionKind::Import,
        ActionKind::Describe,
        ActionKind::Delete,
    ];

    /// The action's name in `provider`'s API.
    pub fn name(self, provider: Provider) -> &'static str {
        match (provider, self) {
            (Provider::Aliyun, ActionKind::Create) => "CreateKeyPair",
            (Provider::Aliyun, ActionKind::Import) => "ImportKeyPair",
            (Provider::Aliyun, ActionKind::Describe) => "DescribeKeyPairs",
            (Provider::Aliyun, ActionKind::Delete) => "DeleteKeyPairs",
            (Provider::Ucloud, ActionKind::Create) => "CreateUHostKeyPair",
            (Provider::Ucloud, ActionKind::Import) => "ImportUHostKeyPairs",
            (Provider::Ucloud, ActionKind::Describe) => "DescribeUHostKeyPairs",
            (Provider::Ucloud, ActionKind::Delete) => "DeleteUHostKeyPairs",
        }
    }

    /// The action `name` names in `provider`'s API (exact, case-sensitive, as the clouds are).
    pub fn parse(provider: Provider, name: &str) -> Option<ActionKind> {
        ActionKind::ALL
            .into_iter()
            .find(|k| k.name(provider) == name)
    }
}

/// ImportKeyPair / ImportUHostKeyPairs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportRequest {
    pub scope: Scope,
    pub name: String,
    pub key: ImportedKey,
    pub resource_group_id: Option<String>,
    pub tags: Vec<Tag>,
}

/// A dialect's rules that [`ImportRequest::decode`] plugs in.
pub(crate) struct ImportRules {
    /// The scope, checked in the dialect's order.
    pub scope: fn(Call<'_>) -> Result<Scope, ApiError>,
    /// The dialect's `KeyPairName` rule.
    pub name_is_valid: fn(&str) -> bool,
    /// The resource group and the tags (Alibaba checks them in that order; UCloud has neither).
    pub extras: fn(Call<'_>) -> Result<Extras, ApiError>,
}

/// An import's resource group and tags.
pub(crate) type Extras = (Option<String>, Vec<Tag>);

impl ImportRequest {
    /// An import once its parameter names (and Alibaba's `RegionId`) are through, in the order
    /// both clouds check: `KeyPairName`, then `PublicKeyBody`, given; the scope; the name rule;
    /// the extras; the key itself.
    pub(crate) fn decode(call: Call<'_>, rules: &ImportRules) -> Result<ImportRequest, ApiError> {
        let name = call.required("KeyPairName")?;
        let body = call.required("PublicKeyBody")?;
        let scope = (rules.scope)(call)?;
        if !(rules.name_is_valid)(name) {
            return Err(ApiError::NameMalformed);
        }
        let (resource_group_id, tags) = (rules.extras)(call)?;
        let key = public_key::parse(body)?;
        Ok(ImportRequest {
            scope,
            name: name.clone(),
            key,
            resource_group_id,
            tags,
        })
    }
}

/// DescribeKeyPairs / DescribeUHostKeyPairs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescribeRequest {
    pub scope: Scope,
    /// Alibaba: `*` wildcards; UCloud: exact.
    pub name: Option<String>,
    pub fingerprint: Option<String>,
    pub resource_group_id: Option<String>,
    /// Every one must be on the pair.
    pub tags: Vec<Tag>,
    pub include_public_key: bool,
    pub offset: usize,
    pub limit: usize,
}

impl DescribeRequest {
    /// One page of `scope` from `offset`, filtered by what both clouds take: `KeyPairName` and
    /// `KeyPairFingerPrint` (empty meaning no filter). Alibaba adds its own filters to it.
    pub(crate) fn page(scope: Scope, call: Call<'_>, offset: usize, limit: usize) -> Self {
        DescribeRequest {
            scope,
            name: call.nonempty("KeyPairName"),
            fingerprint: call.nonempty("KeyPairFingerPrint"),
            resource_group_id: None,
            tags: Vec::new(),
            include_public_key: false,
            offset,
            limit,
        }
    }

    pub fn matches(&self, r: &KeyPairRecord) -> bool {
        self.name
            .as_ref()
            .is_none_or(|n| match self.scope.provider {
                Provider::Aliyun => wildcard_match(n, &r.name),
                Provider::Ucloud => *n == r.name,
            })
            && self
                .fingerprint
                .as_ref()
                .is_none_or(|f| *f == r.key_pair_fingerprint)
            && self
                .resource_group_id
                .as_ref()
                .is_none_or(|g| r.resource_group_id.as_ref() == Some(g))
            && self.tags.iter().all(|t| r.tags.contains(t))
    }
}

/// DeleteKeyPairs (by name) / DeleteUHostKeyPairs (by id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeleteRequest {
    pub scope: Scope,
    pub targets: Targets,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Targets {
    Names(Vec<String>),
    Ids(Vec<String>),
}

/// Most names or ids one delete takes (both clouds).
pub const MAX_DELETE: usize = 100;

pub(crate) type Params = BTreeMap<String, String>;

/// Rejects the first parameter name (in byte order) that `known` does not accept, so a typo is
/// reported as itself rather than as a missing parameter.
pub(crate) fn check_names(params: &Params, known: impl Fn(&str) -> bool) -> Result<(), ApiError> {
    match params.keys().find(|n| !known(n)) {
        Some(name) => Err(ApiError::unknown_parameter(name, "unknown parameter")),
        None => Ok(()),
    }
}

/// A boolean as the SDKs send it: `true`/`false` in any case (`True` from Python).
pub(crate) fn parse_bool(name: &str, v: &str) -> Result<bool, ApiError> {
    if v.eq_ignore_ascii_case("true") {
        Ok(true)
    } else if v.eq_ignore_ascii_case("false") {
        Ok(false)
    } else {
        Err(ApiError::InvalidParameter {
            name: name.into(),
            reason: format!("{:?} is not true or false", super::clip(v)),
        })
    }
}

/// A decimal in `range`, or `default` when absent.
pub(crate) fn parse_number(
    params: &Params,
    name: &str,
    default: usize,
    range: std::ops::RangeInclusive<usize>,
) -> Result<usize, ApiError> {
    let Some(v) = params.get(name) else {
        return Ok(default);
    };
    match v.parse::<usize>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(ApiError::InvalidParameter {
            name: name.into(),
            reason: format!(
                "{:?} is not a whole number from {} to {}",
                super::clip(v),
                range.start(),
                range.end()
            ),
        }),
    }
}
