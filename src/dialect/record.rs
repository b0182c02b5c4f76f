//! A registered key pair as both dialects describe it (the public half only), and the
//! `*` pattern DescribeKeyPairs filters names with.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Scope, Tag};

/// A registered key pair. Holds the public half only: private keys are never stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPairRecord {
    pub scope: Scope,
    pub name: String,
    pub job_id: Uuid,
    /// UCloud's `KeyPairId`; `None` for Alibaba, which names pairs by name alone.
    pub key_pair_id: Option<String>,
    /// The dialect's `KeyPairFingerPrint` (Alibaba: MD5 of the key; UCloud: its own md5 form).
    pub key_pair_fingerprint: String,
    pub fingerprint_md5: String,
    pub fingerprint_sha256: String,
    pub public_key: String,
    pub created_at: i64,
    #[serde(default)]
    pub tags: Vec<Tag>,
    #[serde(default)]
    pub resource_group_id: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
    /// Whether the private key reached its one destination. An undelivered pair is replaced
    /// with a fresh one when its job comes back (redelivery, or a re-run after a crash).
    pub delivered: bool,
    /// Public keys earlier attempts of this job tried to register upstream
    /// (the registry's `Entry::Reserved`); empty when the first attempt succeeded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier_keys: Vec<String>,
}

/// `*`-only glob over characters (DescribeKeyPairs' KeyPairName filter).
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] != '*' && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard() {
        assert!(wildcard_match("*", ""));
        assert!(wildcard_match("web-*", "web-01"));
        assert!(wildcard_match("*-01", "web-01"));
        assert!(wildcard_match("w*b*1", "web-01"));
        assert!(wildcard_match("密钥*", "密钥对"));
        assert!(!wildcard_match("web-*", "db-01"));
        assert!(!wildcard_match("web", "web-01"));
    }
}
