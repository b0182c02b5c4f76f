//! File safety for everything keyfleet writes: caller text made safe as a file name, private
//! folders, and opening without following symlinks.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

/// File-name-safe form of a path component: keeps letters (any script), digits and `-_.:`,
/// percent-encodes the rest, and never yields `.`/`..` or a leading dot.
pub fn path_component(s: &str) -> String {
    let keep = |i: usize, c: char| {
        c.is_alphanumeric() || matches!(c, '-' | '_' | ':') || (c == '.' && i > 0)
    };
    let out = crate::escape::escape_chars(s, |i, c| !keep(i, c));
    if out.is_empty() {
        return "%00".to_owned();
    }
    out
}

/// Creates `folder` and its missing parents with mode 0700 (existing ones are left as they are).
pub fn private_folder(folder: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(folder)
}

/// Makes `folder` (and its parents) with mode 0700 for what keyfleet creates; refuses a
/// symlink, and with `strict` (keyfleet's own state folder) a folder other users can open.
/// An output folder the user made is theirs to set; the identity in it is 0600 either way.
pub fn private_folder_checked(folder: &Path, strict: bool) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    private_folder(folder)?;
    let meta = std::fs::symlink_metadata(folder)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other("not a folder (a symlink is refused)"));
    }
    if strict && meta.permissions().mode() & 0o077 != 0 {
        return Err(std::io::Error::other(format!(
            "the folder is open to other users (mode {:o}); `chmod 700` it",
            meta.permissions().mode() & 0o777
        )));
    }
    Ok(())
}

/// `O_NOFOLLOW`: a path that is a symlink is refused instead of followed.
pub fn no_follow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_components_are_safe() {
        assert_eq!(path_component("web-01"), "web-01");
        assert_eq!(path_component("密钥对"), "密钥对");
        assert_eq!(path_component("a/b"), "a%2Fb");
        assert_eq!(path_component(".."), "%2E.");
        assert_eq!(path_component(""), "%00");
        assert_eq!(path_component("a b"), "a%20b");
    }
}
