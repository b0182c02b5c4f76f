//! The output folder's sink: each created pair's private key becomes
//! `<provider>/<owner>/<region>/<name>.pem` (mode 0600, created new, synced, never
//! overwritten) with its `.pub` beside it. The manifest line that lists it is written by the
//! caller in input order (`output.rs`).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::{DeliveryError, Sink};
use crate::job::{set_private_key_body, JobResult, SecretPem};
use crate::output::path_component;
use crate::registry::RegistryError;

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
        self.root
            .join(r.provider.as_str())
            .join(path_component(&r.owner))
            .join(path_component(r.region.as_deref().unwrap_or("-")))
            .join(format!(
                "{}.pem",
                path_component(r.key_pair_name.as_deref().unwrap_or("-"))
            ))
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
    if path.symlink_metadata().is_ok() {
        return Err(KeyFileError::Exists(path.to_owned()));
    }
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

/// Creates `folder` and its missing parents with mode 0700 (existing ones are left as they are).
pub fn private_folder(folder: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(folder)
}

/// A new file in `folder` holding `bytes` (synced if `sync`); created new and never through a
/// symlink.
fn temp_file(folder: &Path, bytes: &[u8], mode: u32, sync: bool) -> std::io::Result<PathBuf> {
    let path = folder.join(format!(".keyfleet-{}.tmp", uuid::Uuid::new_v4().simple()));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(crate::transit::no_follow())
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

    async fn settled(&self, _: &str, _: Uuid, _: &str) -> Result<(), RegistryError> {
        Ok(())
    }
}
