//! The output folder's sink: each created pair's private key becomes
//! `<provider>/<owner>/<region>/<name>.pem` (mode 0600, created new, synced, never
//! overwritten) with its `.pub` beside it. The manifest line that lists it is written by the
//! caller in input order (`output.rs`).
//!
//! A key file outlives a crash that the registry's "delivered" mark may not: the sink reports
//! the key it finds at a destination ([`Sink::at_destination`]), and delivering a key that is
//! already there, byte for byte, succeeds without writing it again.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::{AtDestination, DeliveryError, Sink};
use crate::dialect::{Provider, Scope};
use crate::job::{set_private_key_body, JobResult, SecretPem};
use crate::keys::keygen;
use crate::registry::RegistryError;
use crate::sink::files::{path_component, private_folder};

/// Why one result's key could not be written (the run goes on; that row fails).
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("refusing to overwrite existing key file {0}")]
    Exists(PathBuf),
    #[error("cannot write key file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone, Debug)]
pub struct KeyFiles {
    root: PathBuf,
}

impl KeyFiles {
    pub fn new(root: &Path) -> Self {
        KeyFiles {
            root: root.to_owned(),
        }
    }

    /// Where a created pair's private key goes: `<provider>/<owner>/<region>/<name>.pem`.
    pub fn path(&self, r: &JobResult) -> PathBuf {
        self.path_of(
            r.provider,
            &r.owner,
            r.region.as_deref().unwrap_or("-"),
            r.key_pair_name.as_deref().unwrap_or("-"),
        )
    }

    fn path_of(&self, provider: Provider, owner: &str, region: &str, name: &str) -> PathBuf {
        self.root
            .join(provider.as_str())
            .join(path_component(owner))
            .join(path_component(region))
            .join(format!("{}.pem", path_component(name)))
    }

    /// Writes the private key (0600) and its `.pub`, and points the result's `PrivateKeyBody`
    /// at the file. The in-memory key is dropped (zeroized) here.
    ///
    /// Each file is written whole to a temporary name in its folder, synced, then put in place:
    /// the key with `link` (which never replaces anything, so an existing key file is never
    /// overwritten), the `.pub` with `rename` (which replaces a planted symlink itself rather
    /// than writing through it). A crash leaves the whole key file or none. Folders are created
    /// 0700.
    pub fn write(&self, r: &mut JobResult) -> Result<PathBuf, KeyFileError> {
        let (path, pem, public) = self.prepare(r)?;
        write_files(&path, &pem, &public)?;
        set_private_key_body(r.provider, &mut r.response, &path.to_string_lossy());
        Ok(path)
    }

    /// What [`write_files`] needs, taken from the result (its private key moves out).
    fn prepare(&self, r: &mut JobResult) -> Result<(PathBuf, SecretPem, String), KeyFileError> {
        let path = self.path(r);
        let Some(pem) = r.take_private_key() else {
            return Err(KeyFileError::Io {
                path,
                source: std::io::Error::other("no private key to write"),
            });
        };
        let public_key = r.created().map(|c| c.public_key.as_str()).unwrap_or("");
        let public = format!(
            "{public_key} {}\n",
            r.key_pair_name.as_deref().unwrap_or_default()
        );
        Ok((path, pem, public))
    }
}

/// The blocking part of [`KeyFiles::write`]: folders, the key, the `.pub`, and the syncs.
fn write_files(path: &Path, pem: &SecretPem, public: &str) -> Result<(), KeyFileError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| KeyFileError::Io { path, source }
    };
    let folder = path.parent().unwrap_or(Path::new(".")).to_owned();
    private_folder(&folder).map_err(io(&folder))?;
    match read_key_file(path) {
        Ok(None) => {
            let tmp_key = temp_file(&folder, pem.0.as_bytes(), 0o600, true).map_err(io(path))?;
            let linked = fs::hard_link(&tmp_key, path);
            let _ = fs::remove_file(&tmp_key);
            match linked {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(KeyFileError::Exists(path.to_owned()))
                }
                Err(e) => return Err(io(path)(e)),
            }
        }
        // This very key is in place: an earlier attempt wrote it and stopped before the
        // registry heard of it. It was synced then; it is not written again.
        Ok(Some(there)) if bool::from(there.as_bytes().ct_eq(pem.0.as_bytes())) => {}
        Ok(Some(_)) | Err(_) => return Err(KeyFileError::Exists(path.to_owned())),
    }
    let pub_path = path.with_extension("pub");
    // The `.pub` is not synced on its own: it is public and can be made again from the key
    // (`ssh-keygen -y`), and ext4 and XFS flush a file replaced by `rename` before the rename
    // itself commits. The key file above is synced.
    let tmp_pub = temp_file(&folder, public.as_bytes(), 0o644, false).map_err(io(&pub_path))?;
    fs::rename(&tmp_pub, &pub_path).map_err(io(&pub_path))?;
    File::open(&folder)
        .and_then(|d| d.sync_all())
        .map_err(io(&folder))
}

/// Removes the temporary files (`.keyfleet-*.tmp`, each a private key being written) that a
/// process killed mid-write left in the key folders under `root`: their keys were never
/// delivered, so nothing refers to them. Only regular files are removed, never through a
/// symlink. Call it while no other process writes into `root`. Returns how many were removed.
pub fn sweep_unfinished(root: &Path) -> std::io::Result<usize> {
    fn dirs(p: &Path) -> Vec<PathBuf> {
        fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect()
    }
    let mut removed = 0;
    // `<provider>/<owner>/<region>/`: exactly the depth key files are written at.
    for provider in dirs(root) {
        for owner in dirs(&provider) {
            for region in dirs(&owner) {
                for entry in fs::read_dir(&region)?.flatten() {
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    let ours = name.starts_with(".keyfleet-") && name.ends_with(".tmp");
                    if ours && entry.file_type().is_ok_and(|t| t.is_file()) {
                        fs::remove_file(entry.path())?;
                        removed += 1;
                    }
                }
            }
        }
    }
    Ok(removed)
}

/// The largest file read as a key file: a 4096-bit PKCS#8 PEM is about 3.3 KB.
const KEY_FILE_MAX: u64 = 16 * 1024;

/// The key file at `path`, read whole: `Ok(None)` when there is none. Never through a symlink
/// (that is an error, as is anything but a regular file of at most [`KEY_FILE_MAX`] bytes of
/// text); the buffer is zeroized when dropped.
fn read_key_file(path: &Path) -> std::io::Result<Option<Zeroizing<String>>> {
    use std::io::Read;
    let mut f = match OpenOptions::new()
        .read(true)
        .custom_flags(crate::sink::files::no_follow())
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = f.metadata()?;
    if !meta.is_file() || meta.len() > KEY_FILE_MAX {
        return Err(std::io::Error::other("not a regular file of key-file size"));
    }
    // Room for the whole file up front, so the buffer holding the key never reallocates
    // (which would leave a copy behind that is not zeroized).
    let mut text = Zeroizing::new(String::with_capacity(KEY_FILE_MAX as usize + 1));
    (&mut f).take(KEY_FILE_MAX).read_to_string(&mut text)?;
    Ok(Some(text))
}

/// A new file in `folder` holding `bytes` (synced if `sync`); created new and never through a
/// symlink.
fn temp_file(folder: &Path, bytes: &[u8], mode: u32, sync: bool) -> std::io::Result<PathBuf> {
    let path = folder.join(format!(".keyfleet-{}.tmp", uuid::Uuid::new_v4().simple()));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(crate::sink::files::no_follow())
        .open(&path)?;
    let written = f
        .write_all(bytes)
        .and_then(|()| if sync { f.sync_all() } else { Ok(()) });
    if let Err(e) = written {
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

impl Sink for KeyFiles {
    const ANSWERS_REPEATED_JOBS: bool = true;

    async fn deliver(&self, result: &mut JobResult) -> Result<(), DeliveryError> {
        if !result.is_created() {
            return Ok(());
        }
        if result.created().is_some_and(|c| c.delivered_earlier) {
            // Listed again: the lifecycle found this pair's key in its file.
            let path = self.path(result);
            set_private_key_body(
                result.provider,
                &mut result.response,
                &path.to_string_lossy(),
            );
            return Ok(());
        }
        let line = result.line;
        let undeliverable = move |e: &KeyFileError| {
            let why = super::error_chain(e);
            tracing::warn!(line, "{why}");
            DeliveryError::Undeliverable(why)
        };
        let (path, pem, public) = self.prepare(result).map_err(|e| undeliverable(&e))?;
        // Off the async runtime: three syncs per key would otherwise hold a runtime thread.
        let written =
            tokio::task::spawn_blocking(move || write_files(&path, &pem, &public).map(|()| path))
                .await
                .map_err(|e| {
                    DeliveryError::Undeliverable(format!("key file writer failed: {e}"))
                })?;
        let path = written.map_err(|e| undeliverable(&e))?;
        set_private_key_body(
            result.provider,
            &mut result.response,
            &path.to_string_lossy(),
        );
        Ok(())
    }

    async fn at_destination(&self, scope: &Scope, name: &str) -> AtDestination {
        let path = self.path_of(scope.provider, &scope.owner, &scope.region, name);
        let looked = tokio::task::spawn_blocking(move || {
            let refuse = |why: String| {
                AtDestination::Occupied(format!(
                    "refusing to overwrite existing key file {}: {why}",
                    path.display()
                ))
            };
            match read_key_file(&path) {
                Ok(None) => AtDestination::Free,
                Ok(Some(pem)) => match keygen::material_of_pem(pem) {
                    Ok(key) => AtDestination::Key {
                        key,
                        at: path.display().to_string(),
                    },
                    Err(_) => refuse("it holds no RSA private key".into()),
                },
                Err(e) => refuse(e.to_string()),
            }
        })
        .await;
        looked.unwrap_or_else(|e| AtDestination::Occupied(format!("key file reader failed: {e}")))
    }

    async fn settled(&self, _: &str, _: Uuid, _: &str) -> Result<(), RegistryError> {
        Ok(())
    }
}
