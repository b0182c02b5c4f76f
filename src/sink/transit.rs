//! Private keys in transit: between a worker and `collect` a key travels only encrypted, to an
//! X25519 recipient of the batch (the `age` format, armored so it sits in the JSON result as
//! text). `submit` makes the batch's identity and records its recipient in Redis; workers read
//! the recipient from there — never from the job message, so whoever can publish a job cannot
//! redirect keys — and `collect` decrypts with the identity file.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use age::secrecy::ExposeSecret;
use zeroize::Zeroizing;

pub use age::x25519::{Identity, Recipient};

/// The first line of an armored age message: how a reader tells an encrypted key from a PEM.
pub const ARMOR_BEGIN: &str = "-----BEGIN AGE ENCRYPTED FILE-----";

#[derive(Debug, thiserror::Error)]
pub enum TransitError {
    #[error("{0:?} is not an age X25519 recipient (age1…)")]
    Recipient(String),
    #[error("cannot encrypt a private key: {0}")]
    Encrypt(String),
    /// Wrong identity, or not an age message, or tampered with.
    #[error("cannot decrypt a private key with this batch's identity: {0}")]
    Decrypt(String),
    #[error("identity file {path}")]
    IdentityFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("identity file {0} holds no age identity (AGE-SECRET-KEY-1…)")]
    IdentityFormat(PathBuf),
    #[error("no folder for batch identities: set XDG_STATE_HOME or HOME, or pass --identity FILE")]
    NoStateDir,
}

/// The file name of a batch's identity in the folders below.
pub fn identity_file_name(batch_id: &str) -> String {
    format!(
        "{}.age-identity",
        crate::sink::files::path_component(batch_id)
    )
}

/// keyfleet's own state folder for identities no output folder holds:
/// `$XDG_STATE_HOME/keyfleet`, else `~/.local/state/keyfleet` (the XDG base-directory default).
pub fn state_dir() -> Option<PathBuf> {
    let nonempty = |v: std::ffi::OsString| (!v.is_empty()).then(|| PathBuf::from(v));
    std::env::var_os("XDG_STATE_HOME")
        .and_then(nonempty)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .and_then(nonempty)
                .map(|h| h.join(".local").join("state"))
        })
        .map(|d| d.join("keyfleet"))
}

/// Where `submit` puts a batch's identity when the user names no file: in the output folder
/// of `--wait --out DIR` (where the batch's keys will be, already private), otherwise in the
/// state folder (made 0700).
pub fn default_identity_path(batch_id: &str, out: Option<&Path>) -> Result<PathBuf, TransitError> {
    let (folder, strict) = match out {
        Some(dir) => (dir.to_owned(), false),
        None => (state_dir().ok_or(TransitError::NoStateDir)?, true),
    };
    crate::sink::files::private_folder_checked(&folder, strict).map_err(|source| {
        TransitError::IdentityFile {
            path: folder.clone(),
            source,
        }
    })?;
    Ok(folder.join(identity_file_name(batch_id)))
}

/// Where `collect` looks for a batch's identity when not told, in this order: the output
/// folder, the state folder, and the working directory (where `submit` wrote it before
/// 2026-12).
pub fn identity_candidates(batch_id: &str, out: &Path) -> Vec<PathBuf> {
    let name = identity_file_name(batch_id);
    let mut places = vec![out.join(&name)];
    places.extend(state_dir().map(|d| d.join(&name)));
    places.push(PathBuf::from(&name));
    places
}

pub fn parse_recipient(s: &str) -> Result<Recipient, TransitError> {
    Recipient::from_str(s.trim()).map_err(|_| TransitError::Recipient(crate::dialect::clip(s)))
}

/// A new identity, written to `path` (mode 0600, created new: never over another file, never
/// through a symlink). Returns its recipient.
pub fn create_identity(path: &Path) -> Result<Recipient, TransitError> {
    let identity = Identity::generate();
    let io = |source| TransitError::IdentityFile {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(crate::sink::files::no_follow())
        .open(path)
        .map_err(io)?;
    let secret = identity.to_string();
    let text = Zeroizing::new(format!(
        "# keyfleet batch identity: decrypts this batch's private keys. Keep it 0600.\n# public key: {}\n{}\n",
        identity.to_public(),
        secret.expose_secret()
    ));
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(identity.to_public())
}

/// Reads the identity written by [`create_identity`] (or any age identity file with one
/// X25519 identity).
pub fn read_identity(path: &Path) -> Result<Identity, TransitError> {
    let io = |source| TransitError::IdentityFile {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(crate::sink::files::no_follow())
        .open(path)
        .map_err(io)?;
    let mut text = Zeroizing::new(String::new());
    file.read_to_string(&mut text).map_err(io)?;
    text.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("AGE-SECRET-KEY-1"))
        .find_map(|l| Identity::from_str(l).ok())
        .ok_or_else(|| TransitError::IdentityFormat(path.to_owned()))
}

/// The private key, encrypted to `recipient` and armored.
pub fn seal(recipient: &Recipient, pem: &str) -> Result<String, TransitError> {
    age::encrypt_and_armor(recipient, pem.as_bytes())
        .map_err(|e| TransitError::Encrypt(e.to_string()))
}

/// Whether a `PrivateKeyBody` is an encrypted key (rather than a plaintext PEM).
pub fn is_sealed(body: &str) -> bool {
    body.trim_start().starts_with(ARMOR_BEGIN)
}

/// The keys of a results group ([`crate::job::results_message::pack_keys`]), encrypted to
/// `recipient` under one header and armored: one X25519 agreement for the whole group.
pub fn seal_bytes(recipient: &Recipient, plain: &[u8]) -> Result<String, TransitError> {
    age::encrypt_and_armor(recipient, plain).map_err(|e| TransitError::Encrypt(e.to_string()))
}

/// The private key in a sealed `body`, into a buffer that is zeroized when dropped.
pub fn open(identity: &Identity, body: &str) -> Result<Zeroizing<String>, TransitError> {
    // Sized so a 4096-bit PEM never makes the buffer grow (a grown buffer leaves its old copy
    // behind unzeroized).
    let plain = open_bytes(identity, body, 16 * 1024)?;
    let text = std::str::from_utf8(&plain).map_err(|e| TransitError::Decrypt(e.to_string()))?;
    Ok(Zeroizing::new(text.to_owned()))
}

/// What a sealed `body` holds, into a zeroized buffer of at least `capacity` bytes, and never
/// less than the body itself (the plaintext is shorter than its armored ciphertext, so the
/// buffer never grows and leaves a copy behind).
pub fn open_bytes(
    identity: &Identity,
    body: &str,
    capacity: usize,
) -> Result<Zeroizing<Vec<u8>>, TransitError> {
    let decrypt = |e: &dyn std::fmt::Display| TransitError::Decrypt(e.to_string());
    let reader = age::armor::ArmoredReader::new(body.as_bytes());
    let decryptor = age::Decryptor::new_buffered(reader).map_err(|e| decrypt(&e))?;
    let mut stream = decryptor
        .decrypt(std::iter::once(identity as &dyn age::Identity))
        .map_err(|e| decrypt(&e))?;
    let mut plain = Zeroizing::new(Vec::with_capacity(capacity.max(body.len() + 64)));
    stream.read_to_end(&mut plain).map_err(|e| decrypt(&e))?;
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_keys_open_only_with_their_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.age-identity");
        let recipient = create_identity(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            create_identity(&path).is_err(),
            "never over an existing file"
        );
        let pem = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";
        let sealed = seal(&recipient, pem).unwrap();
        assert!(is_sealed(&sealed) && !sealed.contains("MIIE"));
        let identity = read_identity(&path).unwrap();
        assert_eq!(open(&identity, &sealed).unwrap().as_str(), pem);
        assert!(open(&Identity::generate(), &sealed).is_err());
        assert!(parse_recipient("age1nope").is_err());
        assert_eq!(
            parse_recipient(&recipient.to_string()).unwrap().to_string(),
            recipient.to_string()
        );
    }

    #[test]
    fn identity_files_are_not_followed_through_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "x").unwrap();
        let link = dir.path().join("link.age-identity");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(create_identity(&link).is_err());
        assert!(read_identity(&link).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "x");
    }
}
