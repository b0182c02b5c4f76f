//! The output folder of `keyfleet run` / `collect`: `manifest.jsonl`, one line per input row in
//! input order, and the key files written by its sink (`sink/key_files.rs`).

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::job::JobResult;
use crate::sink::KeyFiles;

pub const MANIFEST: &str = "manifest.jsonl";

/// The jobs a manifest answers, and whether each was created.
pub type Written = std::collections::HashMap<uuid::Uuid, bool>;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot write to output folder {path}")]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write manifest {path}")]
    Manifest {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct OutputDir {
    root: PathBuf,
    keys: KeyFiles,
    manifest_path: PathBuf,
    manifest: BufWriter<File>,
    /// The manifest of an earlier run in the same folder, kept under this name.
    pub rotated: Option<PathBuf>,
}

/// The key files of the folder `root`, with their writer.
fn key_files(root: &Path) -> Result<KeyFiles, OutputError> {
    KeyFiles::new(root).map_err(|source| OutputError::Folder {
        path: root.to_owned(),
        source,
    })
}

/// The jobs a manifest's bytes answer. A torn last line (crash mid-write, perhaps in the
/// middle of a character) is simply not counted: its result was not acked, so it comes again.
/// A later line for the same job (a created pair after a failure) supersedes the earlier one.
fn written_in(text: &[u8]) -> Written {
    let mut seen = Written::new();
    for line in text.split(|&b| b == b'\n') {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        let id = v.get("job_id").and_then(|j| j.as_str());
        if let Some(Ok(id)) = id.map(uuid::Uuid::parse_str) {
            let created = v.get("status").and_then(|s| s.as_str()) == Some("created");
            seen.insert(id, created);
        }
    }
    seen
}

/// The jobs the manifest in `root` answers, read without touching the folder (a `collect`
/// may be writing it): for a reader elsewhere, such as `retire` of a rotation whose keys were
/// collected there. No manifest answers nothing; an unreadable one is an error.
pub fn read_written(root: &Path) -> Result<Written, OutputError> {
    let path = root.join(MANIFEST);
    let mut text = Vec::new();
    match open_manifest(&path, OpenOptions::new().read(true))
        .and_then(|mut f| f.read_to_end(&mut text))
    {
        Ok(_) => Ok(written_in(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && root.is_dir() => Ok(Written::new()),
        Err(source) => Err(OutputError::Manifest { path, source }),
    }
}

/// Opens the manifest at `path` as `options` say: created 0600, never through a symlink, and
/// only if it is a regular file. The output folder may be one others could write to: a link
/// planted as the manifest would have `collect`'s repair of a torn last line cut, and its lines
/// appended to, whatever file the link points at.
fn open_manifest(path: &Path, options: &mut OpenOptions) -> std::io::Result<File> {
    let f = options
        .mode(0o600)
        .custom_flags(crate::sink::files::no_follow())
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
                std::io::Error::other(
                    "it is a symbolic link, which keyfleet neither follows nor writes through; \
                     move it away",
                )
            } else {
                e
            }
        })?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other(
            "it is not a regular file; move it away",
        ));
    }
    Ok(f)
}

/// Makes `root` a private folder (0700), sweeps what an interrupted process left in it, and
/// returns its manifest's path.
fn open_folder(root: &Path) -> Result<PathBuf, OutputError> {
    crate::sink::files::private_folder(root).map_err(|source| OutputError::Folder {
        path: root.to_owned(),
        source,
    })?;
    sweep(root);
    Ok(root.join(MANIFEST))
}

impl OutputDir {
    /// Creates the folder (and parents) and a fresh manifest. An existing manifest is kept
    /// beside it as `manifest-<unix seconds>.jsonl` rather than overwritten.
    pub fn create(root: &Path) -> Result<Self, OutputError> {
        let manifest_path = open_folder(root)?;
        let mut rotated = None;
        // Whatever is there is kept aside, a link as a link (even one pointing nowhere).
        let present = |p: &Path| fs::symlink_metadata(p).is_ok();
        if present(&manifest_path) {
            let mut n = crate::time::unix_now();
            let target = loop {
                let candidate = root.join(format!("manifest-{n}.jsonl"));
                if !present(&candidate) {
                    break candidate;
                }
                n += 1;
            };
            fs::rename(&manifest_path, &target).map_err(|source| OutputError::Folder {
                path: root.to_owned(),
                source,
            })?;
            rotated = Some(target);
        }
        let file = open_manifest(
            &manifest_path,
            OpenOptions::new().write(true).create_new(true),
        )
        .map_err(|source| OutputError::Manifest {
            path: manifest_path.clone(),
            source,
        })?;
        Ok(OutputDir {
            root: root.to_owned(),
            keys: key_files(root)?,
            manifest_path,
            manifest: BufWriter::new(file),
            rotated,
        })
    }

    /// Opens the folder for `collect`, which may be run again and again: the manifest is
    /// appended to, and the job ids already in it are returned so no job is written twice.
    pub fn resume(root: &Path) -> Result<(Self, Written), OutputError> {
        let manifest_path = open_folder(root)?;
        let manifest_err = |source| OutputError::Manifest {
            path: manifest_path.clone(),
            source,
        };
        // One open for the read, the repair and the appends: what is read is what is written.
        let mut file = open_manifest(
            &manifest_path,
            OpenOptions::new().read(true).append(true).create(true),
        )
        .map_err(manifest_err)?;
        // Bytes, not text: a line torn by a kill may end inside a character.
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(manifest_err)?;
        let seen = written_in(&text);
        if !text.is_empty() && !text.ends_with(b"\n") {
            let whole = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            if serde_json::from_slice::<serde_json::Value>(&text[whole..]).is_ok() {
                // Whole but for its line break (counted above): finish the line.
                file.write_all(b"\n").map_err(manifest_err)?;
            } else {
                // Torn: cut off, so the manifest stays one JSON object per line for
                // whoever reads it (`jq`); its result was not acked and comes again.
                file.set_len(whole as u64).map_err(manifest_err)?;
            }
            file.sync_all().map_err(manifest_err)?;
        }
        Ok((
            OutputDir {
                root: root.to_owned(),
                keys: key_files(root)?,
                manifest_path: manifest_path.clone(),
                manifest: BufWriter::new(file),
                rotated: None,
            },
            seen,
        ))
    }

    /// Flushes and syncs the manifest without closing it (before acking what it holds).
    pub fn sync(&mut self) -> Result<(), OutputError> {
        let err = |source| OutputError::Manifest {
            path: self.manifest_path.clone(),
            source,
        };
        self.manifest.flush().map_err(err)?;
        self.manifest.get_ref().sync_data().map_err(err)
    }

    /// Appends a message that could not be read as a result to `unreadable.jsonl` (mode 0600:
    /// it may hold a private key), one line each, so nothing a worker sent is lost.
    pub fn keep_unreadable(&self, bytes: &[u8]) -> Result<(), OutputError> {
        let line = String::from_utf8_lossy(bytes).replace('\n', " ");
        append_private(&self.root.join("unreadable.jsonl"), &line)
    }

    /// Appends a result whose key was not written (it failed decryption or did not match the
    /// registered fingerprint) to `rejected.jsonl` (0600), with the reason.
    pub fn keep_rejected(&self, result: &JobResult, reason: &str) -> Result<(), OutputError> {
        let line = serde_json::json!({ "reason": reason, "result": result }).to_string();
        append_private(&self.root.join("rejected.jsonl"), &line)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn manifest_path(&self) -> &Path {
        &self.manifest_path
    }

    /// The sink that writes this folder's key files.
    pub fn keys(&self) -> &KeyFiles {
        &self.keys
    }

    /// Appends one manifest line.
    pub fn append(&mut self, r: &JobResult, key_file: Option<&Path>) -> Result<(), OutputError> {
        self.append_with(r, key_file, &serde_json::Map::new())
    }

    /// Appends one manifest line with the fields of `extra` after the result's own (`rotate`
    /// adds the pair a successor replaces). `extra` never holds a private key.
    pub fn append_with(
        &mut self,
        r: &JobResult,
        key_file: Option<&Path>,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), OutputError> {
        #[derive(serde::Serialize)]
        struct Line<'a> {
            #[serde(flatten)]
            result: &'a JobResult,
            private_key_file: Option<String>,
            /// Present (true) only on a rerun's line for a pair an earlier run delivered.
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            delivered_earlier: bool,
            #[serde(flatten)]
            extra: &'a serde_json::Map<String, serde_json::Value>,
        }
        debug_assert!(!r.is_created() || key_file.is_some());
        let line = Line {
            result: r,
            private_key_file: key_file.map(|p| p.to_string_lossy().into_owned()),
            delivered_earlier: r.created().is_some_and(|c| c.delivered_earlier),
            extra,
        };
        let err = |source| OutputError::Manifest {
            path: self.manifest_path.clone(),
            source,
        };
        serde_json::to_writer(&mut self.manifest, &line).map_err(|e| err(e.into()))?;
        self.manifest.write_all(b"\n").map_err(err)
    }

    /// Flushes and syncs the manifest.
    pub fn finish(mut self) -> Result<PathBuf, OutputError> {
        let err = |source| OutputError::Manifest {
            path: self.manifest_path.clone(),
            source,
        };
        self.manifest.flush().map_err(err)?;
        self.manifest.get_ref().sync_all().map_err(err)?;
        Ok(self.manifest_path)
    }

    pub fn flush(&mut self) -> Result<(), OutputError> {
        self.manifest
            .flush()
            .map_err(|source| OutputError::Manifest {
                path: self.manifest_path.clone(),
                source,
            })
    }
}

/// Appends one line to a file only this user may read: created 0600, never through a
/// symlink, and an existing file that others could read (or that is not ours) is refused rather
/// than fed.
fn append_private(path: &Path, line: &str) -> Result<(), OutputError> {
    use std::os::unix::fs::MetadataExt;
    let err = |source| OutputError::Manifest {
        path: path.to_owned(),
        source,
    };
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(crate::sink::files::no_follow())
        .open(path)
        .map_err(err)?;
    let meta = f.metadata().map_err(err)?;
    if !meta.is_file()
        || meta.mode() & 0o077 != 0
        || meta.uid() != rustix::process::getuid().as_raw()
    {
        return Err(err(std::io::Error::other(format!(
            "refusing to write to it: it is not a private file of this user (mode {:o}); move it away",
            meta.mode() & 0o7777
        ))));
    }
    f.write_all(line.as_bytes()).map_err(err)?;
    f.write_all(b"\n").map_err(err)?;
    f.sync_data().map_err(err)
}

/// Removes the half-written key files a killed process left (each a private key nobody was
/// given); the folder is ours alone from here on.
fn sweep(root: &Path) {
    match crate::sink::key_files::sweep_unfinished(root) {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            "removed {n} temporary key file(s) that an interrupted run left unfinished"
        ),
        Err(e) => tracing::warn!("could not look for temporary key files left unfinished: {e}"),
    }
}
