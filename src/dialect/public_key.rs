//! The `PublicKeyBody` of ImportKeyPair / ImportUHostKeyPairs: an OpenSSH public-key line,
//! checked and reduced to what the registry keeps (`type base64`, its fingerprints).
//!
//! Accepted types: `ssh-rsa`, `ssh-dss`, `ecdsa-sha2-nistp256/384/521` (the types the Alibaba
//! page lists) and `ssh-ed25519`. Ed25519 is not on Alibaba's list, but it is OpenSSH's default
//! key type and UCloud's own fingerprint example is an ed25519 key, so refusing it would only
//! break users; security keys (`sk-*`) and certificates are refused: no cloud takes them as a
//! key pair. The base64 blob's inner type must equal the line's type (ssh-key checks this).

use ssh_key::{Algorithm, PublicKey};

use super::ApiError;
use crate::keys::fingerprint;

/// Longest `PublicKeyBody` looked at: an RSA-16384 line is about 2.8 KB.
pub const MAX_LEN: usize = 16 * 1024;

/// A checked public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportedKey {
    /// `type base64`, without the comment: what the registry keeps and describes.
    pub line: String,
    /// `aa:bb:…` (`ssh-keygen -l -E md5` without `MD5:`).
    pub fingerprint_md5: String,
    /// `SHA256:…` as `ssh-keygen -l` prints it.
    pub fingerprint_sha256: String,
}

/// Parses one OpenSSH public-key line (surrounding whitespace ignored, comment dropped).
pub fn parse(body: &str) -> Result<ImportedKey, ApiError> {
    let body = body.trim();
    if body.is_empty() || body.len() > MAX_LEN || body.contains(['\n', '\r']) {
        return Err(ApiError::PublicKeyMalformed);
    }
    let key = PublicKey::from_openssh(body).map_err(|_| ApiError::PublicKeyMalformed)?;
    match key.algorithm() {
        Algorithm::Rsa { .. } | Algorithm::Dsa | Algorithm::Ecdsa { .. } | Algorithm::Ed25519 => {}
        _ => return Err(ApiError::PublicKeyMalformed),
    }
    let blob = key.to_bytes().map_err(|_| ApiError::PublicKeyMalformed)?;
    let mut fields = body.split_ascii_whitespace();
    let (Some(kind), Some(data)) = (fields.next(), fields.next()) else {
        return Err(ApiError::PublicKeyMalformed);
    };
    Ok(ImportedKey {
        line: format!("{kind} {data}"),
        fingerprint_md5: fingerprint::md5_colon(&blob),
        fingerprint_sha256: fingerprint::sha256_base64(&blob),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The contract's UCloud fingerprint example key (§6).
    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

    #[test]
    fn ed25519_example_has_the_contracts_md5() {
        let k = parse(&format!("  {ED25519} me@host\n")).unwrap();
        assert_eq!(k.line, ED25519);
        assert_eq!(
            k.fingerprint_md5,
            "65:96:2d:fc:e8:d5:a9:11:64:0c:0f:ea:00:6e:5b:bd"
        );
        assert!(k.fingerprint_sha256.starts_with("SHA256:"));
    }

    #[test]
    fn refuses_what_is_not_one_key() {
        let swapped = ED25519.replace("ssh-ed25519", "ssh-rsa");
        for bad in [
            "",
            "ssh-rsa",
            "ssh-rsa !!!notbase64",
            swapped.as_str(),
            "-----BEGIN PRIVATE KEY-----",
        ] {
            assert_eq!(parse(bad), Err(ApiError::PublicKeyMalformed), "{bad:?}");
        }
        let two = format!("{ED25519}\n{ED25519}");
        assert_eq!(parse(&two), Err(ApiError::PublicKeyMalformed));
    }
}
