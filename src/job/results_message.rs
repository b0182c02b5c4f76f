//! A results message on the wire: v1 carries one result (a [`JobResult`]), v2 the results of
//! several jobs of one batch — a worker publishes the answers of a v2 job message's jobs
//! together — with their private keys in one blob, sealed to the batch's recipient once rather
//! than once a key. RabbitMQ then handles one message, one confirm and one ack for the group,
//! and `collect` one age decryption. `collect` reads both versions.
//!
//! The blob holds each result's key in the results' order, every key followed by a NUL byte
//! (an empty entry for a result without a key): a PEM never holds a NUL, and unlike a JSON
//! array the keys are read out without an unescaping buffer that would leave a copy behind.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use zeroize::Zeroizing;

use super::{JobResult, SecretPem};

/// The version of a results message that carries several results.
pub const GROUP_VERSION: u32 = 2;

/// What a results message holds (no `Debug`: the blob may hold plaintext keys).
pub enum ResultsMessage {
    /// A v1 message: one result, its key (if any) in its `PrivateKeyBody`.
    One(Box<JobResult>),
    /// A v2 message: its results, each `PrivateKeyBody` empty, and their keys in one blob —
    /// sealed ([`crate::sink::transit::is_sealed`]) or, for a batch without a recipient, as
    /// they are.
    Group {
        batch_id: String,
        results: Vec<JobResult>,
        private_keys: Zeroizing<String>,
    },
}

#[derive(Serialize)]
struct GroupOut<'a> {
    v: u32,
    batch_id: &'a str,
    results: &'a [Box<RawValue>],
    private_keys: &'a str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupIn {
    #[allow(dead_code)]
    v: u32,
    batch_id: String,
    results: Vec<JobResult>,
    private_keys: String,
}

/// A v2 message of `results` (each already encoded, its `PrivateKeyBody` empty) and the blob
/// of their keys.
pub fn encode_group(
    batch_id: &str,
    results: &[Box<RawValue>],
    private_keys: &str,
) -> Result<Vec<u8>, serde_json::Error> {
    let size: usize = results.iter().map(|r| r.get().len() + 1).sum();
    let mut out = Vec::with_capacity(size + private_keys.len() * 2 + 128);
    serde_json::to_writer(
        &mut out,
        &GroupOut {
            v: GROUP_VERSION,
            batch_id,
            results,
            private_keys,
        },
    )?;
    Ok(out)
}

impl ResultsMessage {
    /// Reads a results message of either version; anything else is an error (`collect` keeps
    /// such bytes aside).
    pub fn decode(data: &[u8]) -> Result<ResultsMessage, serde_json::Error> {
        #[derive(Deserialize)]
        struct Versioned {
            v: u64,
        }
        match serde_json::from_slice::<Versioned>(data) {
            Ok(Versioned { v }) if v == u64::from(GROUP_VERSION) => {
                let g: GroupIn = serde_json::from_slice(data)?;
                Ok(ResultsMessage::Group {
                    batch_id: g.batch_id,
                    results: g.results,
                    private_keys: Zeroizing::new(g.private_keys),
                })
            }
            _ => serde_json::from_slice(data).map(|r| ResultsMessage::One(Box::new(r))),
        }
    }
}

/// The blob of `keys` (one entry a result, `None` for a result without a key), in one
/// allocation of its exact size, zeroized when dropped.
pub fn pack_keys(keys: &[Option<&str>]) -> Zeroizing<Vec<u8>> {
    let size = keys.iter().map(|k| k.map_or(0, str::len) + 1).sum();
    let mut out = Zeroizing::new(Vec::with_capacity(size));
    for key in keys {
        out.extend_from_slice(key.unwrap_or("").as_bytes());
        out.push(0);
    }
    out
}

/// The keys of a blob made by [`pack_keys`] for `n` results, or `None` when it holds another
/// number of entries or an entry that is not text.
pub fn unpack_keys(blob: &[u8], n: usize) -> Option<Vec<Option<SecretPem>>> {
    let body = blob.strip_suffix(&[0])?;
    let keys: Vec<Option<SecretPem>> = body
        .split(|b| *b == 0)
        .map(|entry| match entry {
            [] => Some(None),
            bytes => std::str::from_utf8(bytes)
                .ok()
                .map(|s| Some(SecretPem(Zeroizing::new(s.to_owned())))),
        })
        .collect::<Option<_>>()?;
    (keys.len() == n).then_some(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_unpack_as_packed() {
        let blob = pack_keys(&[Some("-----BEGIN A-----\nx\n"), None, Some("k")]);
        let keys = unpack_keys(&blob, 3).unwrap();
        let texts: Vec<Option<&str>> = keys
            .iter()
            .map(|k| k.as_ref().map(|k| k.0.as_str()))
            .collect();
        assert_eq!(texts, [Some("-----BEGIN A-----\nx\n"), None, Some("k")]);
        assert!(unpack_keys(&blob, 2).is_none(), "a count that differs");
        assert!(unpack_keys(b"no terminator", 1).is_none());
        assert_eq!(unpack_keys(&pack_keys(&[None]), 1).unwrap().len(), 1);
    }
}
