//! What every mode's job lifecycle is configured with: the region catalogue, the key-pair
//! quota, the key engine and how long a reservation holds a name.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::dialect::Catalog;
use crate::keys::keygen::Engine;

/// The key-pair quota: one default and per-region overrides. (Not governor's `Quota`, which is
/// a request rate: see `rate_limit.rs`.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPairQuota {
    pub default: u64,
    pub per_region: BTreeMap<String, u64>,
}

impl Default for KeyPairQuota {
    /// 500 key pairs per region, as both clouds document.
    fn default() -> Self {
        KeyPairQuota {
            default: u64::from(crate::dialect::KEY_PAIR_QUOTA),
            per_region: BTreeMap::new(),
        }
    }
}

impl KeyPairQuota {
    pub fn for_region(&self, region: &str) -> u64 {
        self.per_region.get(region).copied().unwrap_or(self.default)
    }
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub catalog: Catalog,
    pub quota: KeyPairQuota,
    pub engine: Engine,
    /// How long a reservation holds a name before a crashed job's slot may be taken over.
    pub reservation_ttl: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            catalog: Catalog::default(),
            quota: KeyPairQuota::default(),
            engine: Engine::default(),
            reservation_ttl: Duration::from_secs(300),
        }
    }
}
