//! The output folder's sink: each created pair's private key becomes
//! `<provider>/<owner>/<region>/<name>.pem` (mode 0600, created new, synced, never
//! overwritten) with its `.pub` beside it. The manifest line that lists it is written by the
//! caller in input order (`output.rs`).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::{DeliveryError, Sink};
use crate::job::{set_private_key_body, JobResult};
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

    /// Writes the private key (0600, created new, synced) and its `.pub`, and points the
    /// result's `PrivateKeyBody` at the file. The in-memory key is dropped (zeroized) here.
    pub fn write(&self, r: &mut JobResult) -> Result<PathBuf, KeyFileError> {
        let path = self.path(r);
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| KeyFileError::Io { path, source }
        };
        let Some(pem) = r.take_private_key() else {
            return Err(io(&path)(std::io::Error::other("no private key to write")));
        };
        let public_key = r
            .created()
            .map(|c| c.public_key.clone())
            .unwrap_or_default();
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let mut file = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(KeyFileError::Exists(path))
            }
            Err(e) => return Err(io(&path)(e)),
        };
        file.write_all(pem.0.as_bytes()).map_err(io(&path))?;
        file.sync_all().map_err(io(&path))?;
        let pub_path = path.with_extension("pub");
        let public = format!(
            "{public_key} {}\n",
            r.key_pair_name.as_deref().unwrap_or_default()
        );
        let mut pub_file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&pub_path)
            .map_err(io(&pub_path))?;
        pub_file
            .write_all(public.as_bytes())
            .map_err(io(&pub_path))?;
        set_private_key_body(r.provider, &mut r.response, &path.to_string_lossy());
        Ok(path)
    }
}

impl Sink for KeyFiles {
    const ANSWERS_REPEATED_JOBS: bool = true;

    async fn deliver(&self, result: &mut JobResult) -> Result<(), DeliveryError> {
        if !result.is_created() {
            return Ok(());
        }
        self.write(result).map(|_| ()).map_err(|e| {
            let why = super::error_chain(&e);
            tracing::warn!(line = result.line, "{why}");
            DeliveryError::Undeliverable(why)
        })
    }

    async fn settled(&self, _: &str, _: Uuid, _: &str) -> Result<(), RegistryError> {
        Ok(())
    }
}
