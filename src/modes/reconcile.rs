//! `keyfleet reconcile`: the drift between keyfleet's registry and the cloud in one scope —
//! pairs in the cloud only (apart: those a rotation retired), in keyfleet only, and under one
//! name with different keys.

use std::collections::BTreeMap;

use crate::dialect::{ApiError, Scope};
use crate::registry::{Filter, Registry, RegistryError};
use crate::upstream::http::HttpUpstream;

/// Drift between the registry and the cloud in one scope, names sorted.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Drift {
    pub in_cloud_only: Vec<String>,
    /// Pairs a rotation replaced and retired (deleted from keyfleet's registry) that the cloud
    /// still holds: drift too, listed apart from `in_cloud_only` because the fix is known
    /// (`keyfleet delete` with the cloud's endpoint).
    pub retired_still_in_cloud: Vec<String>,
    pub in_keyfleet_only: Vec<String>,
    pub fingerprints_differ: Vec<String>,
    pub in_both: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("reading keyfleet's registry")]
    Registry(#[from] RegistryError),
    #[error("listing the cloud's key pairs: {0}")]
    Cloud(ApiError),
}

/// Compares the pairs keyfleet holds in `scope` with the ones the cloud lists there.
pub async fn reconcile<R: Registry>(
    registry: &R,
    cloud: &HttpUpstream,
    scope: &Scope,
) -> Result<Drift, ReconcileError> {
    let filter = Filter {
        provider: Some(scope.provider),
        owner: Some(scope.owner.clone()),
        region: Some(scope.region.clone()),
        ..Filter::default()
    };
    let ours: BTreeMap<String, String> = registry
        .describe(&filter)
        .await?
        .into_iter()
        .map(|r| (r.name, r.key_pair_fingerprint))
        .collect();
    let theirs: BTreeMap<String, String> = cloud
        .list(scope)
        .await
        .map_err(ReconcileError::Cloud)?
        .into_iter()
        .map(|p| (p.name, p.fingerprint))
        .collect();
    let mut drift = Drift::between(&ours, &theirs);
    let retired = crate::modes::rotate::retired_names(registry, scope).await?;
    let (retired, other): (Vec<String>, Vec<String>) = drift
        .in_cloud_only
        .into_iter()
        .partition(|n| retired.contains(n));
    drift.in_cloud_only = other;
    drift.retired_still_in_cloud = retired;
    Ok(drift)
}

impl Drift {
    /// `ours` and `theirs`: name → fingerprint.
    pub fn between(ours: &BTreeMap<String, String>, theirs: &BTreeMap<String, String>) -> Drift {
        let mut drift = Drift::default();
        for (name, fp) in theirs {
            match ours.get(name) {
                None => drift.in_cloud_only.push(name.clone()),
                Some(mine) if mine != fp => drift.fingerprints_differ.push(name.clone()),
                Some(_) => drift.in_both += 1,
            }
        }
        drift.in_keyfleet_only = ours
            .keys()
            .filter(|n| !theirs.contains_key(*n))
            .cloned()
            .collect();
        drift
    }

    /// Whether the registry and the cloud hold the same names with the same keys.
    pub fn agree(&self) -> bool {
        self.in_cloud_only.is_empty()
            && self.retired_still_in_cloud.is_empty()
            && self.in_keyfleet_only.is_empty()
            && self.fingerprints_differ.is_empty()
    }

    /// The report a person reads: counts, then the names under each kind of drift.
    pub fn render(&self) -> String {
        let mut out = format!("{} in both with the same key\n", self.in_both);
        for (what, names) in [
            ("in the cloud only", &self.in_cloud_only),
            (
                "retired by a rotation, still in the cloud",
                &self.retired_still_in_cloud,
            ),
            ("in keyfleet only", &self.in_keyfleet_only),
            ("different keys", &self.fingerprints_differ),
        ] {
            out.push_str(&format!("{what}: {}\n", names.len()));
            for n in names {
                out.push_str(&format!("  {n}\n"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(n, f)| (n.to_string(), f.to_string()))
            .collect()
    }

    #[test]
    fn drift_sorts_names_into_their_kind() {
        let ours = map(&[("a", "1"), ("b", "2"), ("c", "3")]);
        let theirs = map(&[("b", "2"), ("c", "9"), ("d", "4")]);
        let d = Drift::between(&ours, &theirs);
        assert_eq!(d.in_cloud_only, ["d"]);
        assert_eq!(d.in_keyfleet_only, ["a"]);
        assert_eq!(d.fingerprints_differ, ["c"]);
        assert_eq!(d.in_both, 1);
        assert!(!d.agree());
        assert!(Drift::between(&ours, &ours).agree());
    }
}
