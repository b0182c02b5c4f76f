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
    /// The output folder a rotation run through the workers collects into (`rotate --submit
    /// --wait`): its successors' keys are written there only, so a rerun must use it too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out: Option<String>,
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
    /// S's job ids before the current one. A rerun through the workers never publishes a job
    /// id again (its first message may still be queued, and two copies of one job must never
    /// be worked at once): when S's job must be published again, it gets a new id, recorded
    /// here first. Whichever of them holds S holds it for this member.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier_job_ids: Vec<Uuid>,
    /// How many of S's jobs RabbitMQ confirmed (0: never published, or made in-process).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub published: u32,
    /// S's current job is being published and not yet confirmed: after a crash, nobody knows
    /// whether it is queued.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub publishing: bool,
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

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Member {
    /// Whether `name` in `scope` is this member's successor.
    pub fn is_successor(&self, scope: &Scope, name: &str) -> bool {
        self.scope == *scope && self.successor == name
    }

    /// Whether `job_id` is one of the jobs made for S (the current one or an earlier one).
    pub fn is_job(&self, job_id: Uuid) -> bool {
        self.successor_job_id == job_id || self.earlier_job_ids.contains(&job_id)
    }

    /// Readies S's job to be published: a job published (or being published) before gets a
    /// new id, the old one kept in [`Member::earlier_job_ids`]. Save the rotation before
    /// publishing, and call [`Member::confirmed`] once RabbitMQ confirms it.
    pub fn next_publication(&mut self) {
        if self.published > 0 || self.publishing {
            self.earlier_job_ids.push(self.successor_job_id);
            self.successor_job_id = Uuid::new_v4();
        }
        self.publishing = true;
        self.failed = None;
    }

    /// RabbitMQ confirmed S's current job: it is queued, and will be answered.
    pub fn confirmed(&mut self) {
        self.publishing = false;
        self.published += 1;
    }
}

impl Rotation {
    /// Every replaced pair retired: nothing more to do.
    pub fn all_retired(&self) -> bool {
        self.members.iter().all(|m| m.retired_at.is_some())
    }
}
