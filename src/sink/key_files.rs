//! The output folder's sink: each created pair's private key becomes
//! `<provider>/<owner>/<region>/<name>.pem` (mode 0600, created new, synced, never
//! overwritten) with its `.pub` beside it. The manifest line that lists it is written by the
//! caller in input order (`output.rs`).
//!
//! A key file outlives a crash that the registry's "delivered" mark may not: the sink reports
//! the key it finds at a destination ([`Sink::at_destination`]), and delivering a key that is
//! already there, byte for byte, succeeds and leaves that file as it is.
//!
//! Key files are written in groups (`group.rs`): the keys delivered while the last group was
//! being synced are written together, made durable by one flush of their filesystem and one
//! sync of each folder, and only then reported delivered — the syncs a key cost alone are
//! shared by the group. While keys are still being made for jobs (`run`), the writer waits for
//! theirs a few milliseconds before it syncs (`group.rs`).

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::{AtDestination, DeliveryError, Sink};
use crate::dialect::{Provider, Scope};
use crate::group::{Group, Held, GATHER};
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

/// A group's syncs are shared by this many key files, or by those queued when its wait for
/// company ends (up to twice as many).
const FILES_PER_GROUP: usize = 128;

/// One key file to write, and where its outcome goes.
type Queued = (
    KeyWrite,
    tokio::sync::oneshot::Sender<Result<(), KeyFileError>>,
);

#[derive(Clone)]
pub struct KeyFiles {
    root: PathBuf,
    /// The thread that writes delivered keys in groups.
    writer: Arc<Group<Queued>>,
}

impl std::fmt::Debug for KeyFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyFiles")
            .field("root", &self.root)
            .finish()
    }
}

impl KeyFiles {
    /// The key files under `root`, and the thread that writes them.
    pub fn new(root: &Path) -> std::io::Result<Self> {
        Self::gathering(root, GATHER)
    }

    /// [`KeyFiles::new`], with keys waiting up to `gather` for company.
    fn gathering(root: &Path, gather: Duration) -> std::io::Result<Self> {
        // Keys queued while keys are still being made wait for theirs, a few milliseconds at
        // most (`group.rs`), so that one group's syncs serve them all.
        let mut held = Held::new(gather);
        let writer = Group::spawn(
            "keyfleet-keyfiles",
            FILES_PER_GROUP,
            move |group: Vec<Queued>| {
                // An empty group: the wait passed, or the sink is being dropped.
                let wait_over = group.is_empty();
                held.extend(group);
                if held.is_empty() {
                    return None;
                }
                if !wait_over && held.len() < FILES_PER_GROUP {
                    if let Some(left) = held.left() {
                        return Some(left);
                    }
                }
                let (writes, answers): (Vec<_>, Vec<_>) = held.take().into_iter().unzip();
                for (written, answer) in write_group(writes).into_iter().zip(answers) {
                    let _ = answer.send(written);
                }
                None
            },
        )?;
        Ok(KeyFiles {
            root: root.to_owned(),
            writer: Arc::new(writer),
        })
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

    /// Queues the private key (0600) and its `.pub` for the writer thread, at once: keys
    /// queued together are written as one group and share its syncs (see [`write_group`]).
    /// The key moves out of `r` here; the returned future gives the key file's path once the
    /// key is durable there. Point the result's `PrivateKeyBody` at it with
    /// [`set_private_key_body`].
    ///
    /// Each key is written whole to a temporary name in its folder, flushed, then put in place
    /// with `link` (which never replaces anything, so an existing key file is never
    /// overwritten). A crash leaves the whole key file or none. Folders are created 0700.
    pub fn write_queued(
        &self,
        r: &mut JobResult,
    ) -> impl std::future::Future<Output = Result<PathBuf, KeyFileError>> + Send + 'static {
        let queued = self.prepare(r).and_then(|write| {
            let path = write.path.clone();
            let (tx, rx) = tokio::sync::oneshot::channel();
            match self.writer.send((write, tx)) {
                Ok(()) => Ok((path, rx)),
                Err((write, _)) => Err(io_error(&write.path)(std::io::Error::other(
                    "the key file writer has stopped",
                ))),
            }
        });
        async move {
            let (path, rx) = queued?;
            match rx.await {
                Ok(written) => written.map(|()| path),
                Err(_) => Err(io_error(&path)(std::io::Error::other(
                    "the key file writer failed",
                ))),
            }
        }
    }

    /// What [`write_group`] needs, taken from the result (its private key moves out).
    fn prepare(&self, r: &mut JobResult) -> Result<KeyWrite, KeyFileError> {
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
        Ok(KeyWrite { path, pem, public })
    }
}

/// One key file to write: where, the private key, and the `.pub` line.
struct KeyWrite {
    path: PathBuf,
    pem: SecretPem,
    public: String,
}

impl KeyWrite {
    fn folder(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }
}

/// How far one key file of a group got.
enum Step {
    /// Its key is in a temporary file of its folder, not yet synced.
    Staged(PathBuf),
    /// It is in place and its `.pub` beside it; its folder's sync is all that is left.
    Linked,
    Failed(KeyFileError),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError {
    let path = path.to_owned();
    move |source| KeyFileError::Io { path, source }
}

/// The blocking part of delivering key files, for a group of them: each key to a temporary
/// file in its folder; one flush of the filesystem(s) they are on (`syncfs`), so every key's
/// bytes are on disk before any key has its name; each key linked to its name (never replacing
/// a file) and its `.pub` renamed beside it; then one sync of each folder, which makes the
/// names durable. A crash leaves each key file whole or absent. One outcome per write, in
/// order; a failure is that file's alone where it can be.
fn write_group(writes: Vec<KeyWrite>) -> Vec<Result<(), KeyFileError>> {
    // A group's keys mostly share a few folders: each is made (or found) once.
    let mut folders_made = BTreeSet::new();
    let mut steps: Vec<Step> = writes.iter().map(|w| stage(w, &mut folders_made)).collect();

    // The staged keys' bytes, on disk: one flush per filesystem, not one sync per file. It
    // also flushes what other programs wrote to that filesystem, which a busy disk makes
    // slower, never less safe.
    let staged: Vec<&Path> = writes
        .iter()
        .zip(&steps)
        .filter(|(_, s)| matches!(s, Step::Staged(_)))
        .map(|(w, _)| w.folder())
        .collect();
    if let Err((folder, e)) = flush_filesystems(&staged) {
        for (w, step) in writes.iter().zip(steps.iter_mut()) {
            if let Step::Staged(tmp) = step {
                let _ = fs::remove_file(&*tmp);
                let why =
                    std::io::Error::new(e.kind(), format!("{} (flushing {})", e, folder.display()));
                *step = Step::Failed(io_error(&w.path)(why));
            }
        }
    }

    for (w, step) in writes.iter().zip(steps.iter_mut()) {
        if let Step::Staged(tmp) = step {
            *step = match link(w, tmp).and_then(|()| write_public(w)) {
                Ok(()) => Step::Linked,
                Err(e) => Step::Failed(e),
            };
        }
    }

    // The names, durable: one sync per folder for all its files.
    let folders: BTreeSet<&Path> = writes
        .iter()
        .zip(&steps)
        .filter(|(_, s)| matches!(s, Step::Linked))
        .map(|(w, _)| w.folder())
        .collect();
    let synced: Vec<(&Path, std::io::Result<()>)> = folders
        .into_iter()
        .map(|f| (f, File::open(f).and_then(|d| d.sync_all())))
        .collect();
    writes
        .iter()
        .zip(steps)
        .map(|(w, step)| match step {
            Step::Linked => match synced.iter().find(|(f, _)| *f == w.folder()) {
                Some((_, Err(e))) => Err(io_error(w.folder())(std::io::Error::new(
                    e.kind(),
                    e.to_string(),
                ))),
                _ => Ok(()),
            },
            Step::Failed(e) => Err(e),
            Step::Staged(_) => Err(io_error(&w.path)(std::io::Error::other(
                "the key file was not put in place",
            ))),
        })
        .collect()
}

/// The first step of one key file: its folder (made once a group, `made` holds those made),
/// then its key, written to a temporary file there. What is at the name already is looked
/// at only if the name turns out to be taken ([`link`]): almost never, and one lookup less a
/// key otherwise.
fn stage<'a>(w: &'a KeyWrite, made: &mut BTreeSet<&'a Path>) -> Step {
    let folder = w.folder();
    if !made.contains(folder) {
        if let Err(e) = private_folder(folder) {
            return Step::Failed(io_error(folder)(e));
        }
        made.insert(folder);
    }
    match temp_file(folder, w.pem.0.as_bytes(), 0o600) {
        Ok(tmp) => Step::Staged(tmp),
        Err(e) => Step::Failed(io_error(&w.path)(e)),
    }
}

/// `syncfs` once for each filesystem the folders are on (each folder looked at once, however
/// many keys it has in the group); the folder that failed, if one did.
fn flush_filesystems<'a>(folders: &[&'a Path]) -> Result<(), (&'a Path, std::io::Error)> {
    let mut flushed = BTreeSet::new();
    let folders: BTreeSet<&'a Path> = folders.iter().copied().collect();
    for folder in folders {
        let dir = File::open(folder).map_err(|e| (folder, e))?;
        let device = dir.metadata().map_err(|e| (folder, e))?.dev();
        if flushed.insert(device) {
            rustix::fs::syncfs(&dir).map_err(|e| (folder, e.into()))?;
        }
    }
    Ok(())
}

/// Gives the staged key its name with `link`, which never replaces anything (an existing key
/// file is never overwritten), and removes the temporary name. A name already taken by this
/// very key (an earlier attempt wrote and synced it, and stopped before the registry heard of
/// it) is the key in place, and its `.pub` is written again; by anything else, the key is
/// refused.
fn link(w: &KeyWrite, tmp: &Path) -> Result<(), KeyFileError> {
    let linked = fs::hard_link(tmp, &w.path);
    let _ = fs::remove_file(tmp);
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match read_key_file(&w.path) {
            Ok(Some(there)) if bool::from(there.as_bytes().ct_eq(w.pem.0.as_bytes())) => Ok(()),
            _ => Err(KeyFileError::Exists(w.path.clone())),
        },
        Err(e) => Err(io_error(&w.path)(e)),
    }
}

/// The `.pub` beside the key, put in place with `rename` (which replaces a planted symlink
/// itself rather than writing through it). Not synced on its own: it is public and can be
/// made again from the key (`ssh-keygen -y`), and ext4 and XFS flush a file replaced by
/// `rename` before the rename itself commits; the folder's sync that follows commits it.
fn write_public(w: &KeyWrite) -> Result<(), KeyFileError> {
    let pub_path = w.path.with_extension("pub");
    let tmp = temp_file(w.folder(), w.public.as_bytes(), 0o644).map_err(io_error(&pub_path))?;
    fs::rename(&tmp, &pub_path).map_err(io_error(&pub_path))
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

/// A new file in `folder` holding `bytes` (not synced: its group is); created new and never
/// through a symlink.
fn temp_file(folder: &Path, bytes: &[u8], mode: u32) -> std::io::Result<PathBuf> {
    let path = folder.join(format!(".keyfleet-{}.tmp", uuid::Uuid::new_v4().simple()));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(crate::sink::files::no_follow())
        .open(&path)?;
    if let Err(e) = f.write_all(bytes) {
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
        // To the writer thread, off the async runtime; answered once the key is durable.
        let path = self
            .write_queued(result)
            .await
            .map_err(|e| undeliverable(&e))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn write(folder: &Path, name: &str, pem: &str) -> KeyWrite {
        KeyWrite {
            path: folder.join(format!("{name}.pem")),
            pem: SecretPem(Zeroizing::new(pem.to_owned())),
            public: format!("ssh-rsa AAAA {name}\n"),
        }
    }

    fn names(folder: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(folder)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// While a key is being made for a job, keys queued for their files wait for it: none is
    /// in place (or answered) while the wait lasts, and when it ends (here the sink is closed,
    /// which ends it at once) all are written as one group and answered.
    #[test]
    fn key_files_wait_for_the_keys_being_made_then_are_written_together() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("aliyun/acct/cn-hangzhou");
        let files = KeyFiles::gathering(dir.path(), Duration::from_secs(60)).unwrap();
        let coming = crate::group::expect_company();
        let mut answers = Vec::new();
        for name in ["a", "b"] {
            let (tx, rx) = tokio::sync::oneshot::channel();
            assert!(files
                .writer
                .send((write(&folder, name, &format!("KEY-{name}\n")), tx))
                .is_ok());
            answers.push(rx);
        }
        std::thread::sleep(Duration::from_millis(100));
        for answer in &mut answers {
            assert!(answer.try_recv().is_err(), "a key file did not wait");
        }
        assert!(!folder.join("a.pem").exists() && !folder.join("b.pem").exists());
        drop(files);
        for answer in answers {
            answer.blocking_recv().unwrap().unwrap();
        }
        drop(coming);
        assert_eq!(names(&folder), ["a.pem", "a.pub", "b.pem", "b.pub"]);
    }

    /// The name is looked at only when `link` finds it taken: the same key there is the key
    /// in place (an earlier attempt's), another key is refused and left as it is.
    #[test]
    fn a_taken_name_is_this_key_in_place_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("aliyun/acct/cn-hangzhou");
        let first = write_group(vec![
            write(&folder, "a", "KEY-A\n"),
            write(&folder, "b", "KEY-B\n"),
        ]);
        assert!(first.iter().all(Result::is_ok), "{first:?}");

        fs::remove_file(folder.join("a.pub")).unwrap();
        let again = write_group(vec![
            write(&folder, "a", "KEY-A\n"),
            write(&folder, "b", "KEY-OTHER\n"),
            write(&folder, "c", "KEY-C\n"),
        ]);
        assert!(again[0].is_ok(), "the same key in place: {:?}", again[0]);
        assert!(
            matches!(&again[1], Err(KeyFileError::Exists(p)) if p.ends_with("b.pem")),
            "{:?}",
            again[1]
        );
        assert!(again[2].is_ok(), "{:?}", again[2]);
        assert_eq!(fs::read_to_string(folder.join("b.pem")).unwrap(), "KEY-B\n");
        assert_eq!(
            fs::read_to_string(folder.join("a.pub")).unwrap(),
            "ssh-rsa AAAA a\n",
            "the key in place has its .pub written again"
        );
        assert_eq!(
            names(&folder),
            ["a.pem", "a.pub", "b.pem", "b.pub", "c.pem", "c.pub"],
            "no temporary file is left"
        );
    }
}
