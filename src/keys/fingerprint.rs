//! Public-key fingerprints in the forms the APIs and `ssh-keygen` print.
//!
//! The UCloud fingerprint (`md5(ProjectId|KeyPairId|PublicKey)`) lives in `dialect/ucloud.rs`
//! because it is a property of that dialect, not of the key.

use base64::Engine as _;
use md5::{Digest, Md5};
use pkcs8::der::SecretDocument;
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

/// The OpenSSH public key for modulus `n` and exponent `e` (big-endian).
pub fn ssh_public(n_be: &[u8], e_be: &[u8]) -> Result<ssh_key::PublicKey, String> {
    let rsa = ssh_key::public::RsaPublicKey {
        e: ssh_key::Mpint::from_positive_bytes(e_be).map_err(|e| e.to_string())?,
        n: ssh_key::Mpint::from_positive_bytes(n_be).map_err(|e| e.to_string())?,
    };
    Ok(ssh_key::PublicKey::from(ssh_key::public::KeyData::Rsa(rsa)))
}

/// `(md5, sha256)` SSH fingerprints of an OpenSSH public key.
pub fn fingerprints(public: &ssh_key::PublicKey) -> Result<(String, String), String> {
    let blob = public.to_bytes().map_err(|e| e.to_string())?;
    Ok((md5_colon(&blob), sha256_base64(&blob)))
}

/// `(n, e)` (big-endian) from a PKCS#8 (`PRIVATE KEY`) or PKCS#1 (`RSA PRIVATE KEY`) PEM. Only
/// the ASN.1 structure is parsed: nothing is computed on the private values.
pub fn public_of_pem(pem: &str) -> Result<(Vec<u8>, Vec<u8>), String> {
    let (label, doc) = SecretDocument::from_pem(pem).map_err(|e| e.to_string())?;
    let take = |der: &[u8]| -> Result<(Vec<u8>, Vec<u8>), String> {
        let key = pkcs1::RsaPrivateKey::try_from(der).map_err(|e| e.to_string())?;
        Ok((
            key.modulus.as_bytes().to_vec(),
            key.public_exponent.as_bytes().to_vec(),
        ))
    };
    match label {
        "PRIVATE KEY" => {
            let info =
                pkcs8::PrivateKeyInfo::try_from(doc.as_bytes()).map_err(|e| e.to_string())?;
            if info.algorithm.oid != pkcs1::ALGORITHM_OID {
                return Err(format!("not an RSA key (algorithm {})", info.algorithm.oid));
            }
            take(info.private_key)
        }
        "RSA PRIVATE KEY" => take(doc.as_bytes()),
        other => Err(format!("unexpected PEM label {other:?}")),
    }
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
