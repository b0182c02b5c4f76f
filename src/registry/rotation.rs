//! A rotation: the key pairs one `keyfleet rotate` replaces, each beside its successor. It is
//! recorded in the registry before any successor is created, so a rerun after a crash works on
//! the same pairs with the same successor names and job ids, however the registry has changed
//! since (successors that match the selection, pairs retired in earlier waves).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::dialect::record::KeyPairRecord;
use crate::dialect::{Scope, Tag};

/// One rotation as the registry keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    pub id: String,
    /// Unix seconds when it was recorded.
    pub created_at: i64,
    /// The successor name template, as given.
    pub template: String,
    /// The replaced pairs, in the order their successors are made.
    pub members: Vec<Member>,
}

/// A replaced pair (P) and its successor (S).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub scope: Scope,
    /// P's name.
    pub name: String,
    /// P's identity when selected: a pair under P's name with another key (deleted and made
    /// again since) is not this member's, and is never retired for it.
    pub replaces: Replaced,
    /// S's name (the template applied to P).
    pub successor: String,
    /// S's job id: fixed here, so every attempt at S is the same job to the registry.
    pub successor_job_id: Uuid,
    /// P's tags, resource group and zone, which S is created with.
    #[serde(default)]
    pub tags: Vec<Tag>,
    #[serde(default)]
    pub resource_group_id: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
    /// Unix seconds when P was deleted from the registry (and the cloud); `None` while it lives.
    #[serde(default)]
    pub retired_at: Option<i64>,
    /// The error code S's last attempt ended in, when it failed (for `status`).
    #[serde(default)]
    pub failed: Option<String>,
}

/// What identifies the replaced pair: the fields a configuration management tool matches on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replaced {
    pub name: String,
    pub key_pair_id: Option<String>,
    pub key_pair_fingerprint: String,
    pub fingerprint_md5: String,
    pub fingerprint_sha256: String,
}

impl Replaced {
    pub fn of(r: &KeyPairRecord) -> Replaced {
        Replaced {
            name: r.name.clone(),
            key_pair_id: r.key_pair_id.clone(),
            key_pair_fingerprint: r.key_pair_fingerprint.clone(),
            fingerprint_md5: r.fingerprint_md5.clone(),
            fingerprint_sha256: r.fingerprint_sha256.clone(),
        }
    }

    /// Whether `r` is still the pair that was selected (same name, same key).
    pub fn is(&self, r: &KeyPairRecord) -> bool {
        self.name == r.name && self.fingerprint_sha256 == r.fingerprint_sha256
    }
}

impl Member {
    /// Whether `name` in `scope` is this member's successor.
    pub fn is_successor(&self, scope: &Scope, name: &str) -> bool {
        self.scope == *scope && self.successor == name
    }
}

impl Rotation {
    /// Every replaced pair retired: nothing more to do.
    pub fn all_retired(&self) -> bool {
        self.members.iter().all(|m| m.retired_at.is_some())
    }
}
