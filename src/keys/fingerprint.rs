//! Public-key fingerprints in the forms the APIs and `ssh-keygen` print.
//!
//! The UCloud fingerprint (`md5(ProjectId|KeyPairId|PublicKey)`) lives in `dialect/ucloud.rs`
//! because it is a property of that dialect, not of the key.

use base64::Engine as _;
use md5::{Digest, Md5};
use sha2::Sha256;

/// MD5 over the SSH public-key wire blob as lower-case hex pairs joined by `:` (RFC 4716 style),
/// byte-identical to `ssh-keygen -l -E md5` without its `MD5:` prefix.
pub fn md5_colon(blob: &[u8]) -> String {
    let digest = Md5::digest(blob);
    let pairs: Vec<String> = digest.iter().map(|b| hex::encode([*b])).collect();
    pairs.join(":")
}

/// SHA-256 over the wire blob as `SHA256:` + unpadded base64, as `ssh-keygen -l -E sha256` prints.
pub fn sha256_base64(blob: &[u8]) -> String {
    let digest = Sha256::digest(blob);
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_colon_matches_known_digest() {
        // md5("abc") = 900150983cd24fb0d6963f7d28e17f72 (RFC 1321 test suite).
        assert_eq!(
            md5_colon(b"abc"),
            "90:01:50:98:3c:d2:4f:b0:d6:96:3f:7d:28:e1:7f:72"
        );
    }

    #[test]
    fn sha256_matches_known_digest() {
        // sha256("abc") = ba7816bf…; base64 without padding.
        assert_eq!(
            sha256_base64(b"abc"),
            "SHA256:ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0"
        );
    }
}
