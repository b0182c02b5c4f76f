//! UCloud API signature: every parameter but `Signature` (`PublicKey` included), sorted by key,
//! written key then value with no separator and no escaping, the private key appended, and the
//! lower-case hex SHA-1 of that is the `Signature`.
//!
//! The string to sign *contains the private key*: never log it, never put it in an error
//! message, and derive no `Debug` on anything that holds it. [`signature`] therefore hashes the
//! pieces without building the string; [`string_to_sign`] exists for tests and for a debugger
//! on a throwaway key.
//!
//! No timestamp or nonce is signed (the SDK's `U-Timestamp-Ms` header is not), so anyone who
//! sees a signed request can send it again: UCloud requests cannot be protected against replay.

use sha1::{Digest, Sha1};

/// The parameters that are signed, in signing order: all but `Signature`, sorted by key in
/// byte order, ties by value so the order of a repeated key does not matter.
fn signed_params(params: &[(String, String)]) -> Vec<&(String, String)> {
    let mut sorted: Vec<&(String, String)> =
        params.iter().filter(|(k, _)| k != "Signature").collect();
    sorted.sort();
    sorted
}

/// The string UCloud signs: `k1v1k2v2…` then `private_key`. It holds the private key: do not
/// log it or keep it around.
pub fn string_to_sign(params: &[(String, String)], private_key: &str) -> String {
    let mut out = String::new();
    for (k, v) in signed_params(params) {
        out.push_str(k);
        out.push_str(v);
    }
    out.push_str(private_key);
    out
}

/// Lower-case hex SHA-1 of [`string_to_sign`], computed piece by piece so that no copy of the
/// private key is made.
pub fn signature(params: &[(String, String)], private_key: &str) -> String {
    let mut hash = Sha1::new();
    for (k, v) in signed_params(params) {
        hash.update(k.as_bytes());
        hash.update(v.as_bytes());
    }
    hash.update(private_key.as_bytes());
    hex::encode(hash.finalize())
}
