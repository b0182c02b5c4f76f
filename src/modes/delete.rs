//! `keyfleet delete`: key pairs deleted by name from the cloud (when an upstream is
//! configured) and then from keyfleet's registry, freeing their quota.

use crate::dialect::{ApiError, Scope};
use crate::registry::{Registry, RegistryError};
use crate::upstream::http::HttpUpstream;

/// What deleting one name did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deleted {
    /// Deleted in keyfleet's registry; the cloud, if any, did not hold it.
    Here,
    /// Deleted in the cloud (and in the registry, if it held it).
    AlsoInCloud,
    /// Neither held it.
    NotFound,
}

#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    #[error("deleting {name} in the cloud")]
    Cloud {
        name: String,
        #[source]
        source: ApiError,
    },
    #[error("deleting {name} in keyfleet's registry")]
    Registry {
        name: String,
        #[source]
        source: RegistryError,
    },
}

/// Deletes `name` in `scope`: the cloud first — a pair left in keyfleet can be deleted again;
/// one left only in the cloud would be drift nobody sees.
pub async fn delete<R: Registry>(
    registry: &R,
    cloud: Option<&HttpUpstream>,
    scope: &Scope,
    name: &str,
) -> Result<Deleted, DeleteError> {
    let in_cloud = match cloud {
        Some(c) => c
            .delete_pair(scope, name)
            .await
            .map_err(|source| DeleteError::Cloud {
                name: name.to_owned(),
                source,
            })?,
        None => false,
    };
    let here = registry
        .delete(scope, name)
        .await
        .map_err(|source| DeleteError::Registry {
            name: name.to_owned(),
            source,
        })?;
    Ok(match (in_cloud, here) {
        (true, _) => Deleted::AlsoInCloud,
        (false, true) => Deleted::Here,
        (false, false) => Deleted::NotFound,
    })
}
