//! Key files on disk, as a hostile neighbour on the same machine would try them: planted
//! symlinks are never written through, folders are private, files appear whole or not at all.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn run(dir: &Path, rows: &str) -> std::process::Output {
    std::fs::write(dir.join("k.csv"), rows).unwrap();
    crate::util::keyfleet(dir)
        .args([
            "run",
            "k.csv",
            "--out",
            "o",
            "--progress",
            "off",
            "--threads",
            "1",
        ])
        .output()
        .unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn pub_file_symlink_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("o/aliyun/default/cn-hangzhou");
    std::fs::create_dir_all(&folder).unwrap();
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, "precious\n").unwrap();
    std::os::unix::fs::symlink(&victim, folder.join("web-01.pub")).unwrap();
    let out = run(dir.path(), "RegionId,KeyPairName\ncn-hangzhou,web-01\n");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    let pub_file = folder.join("web-01.pub");
    assert!(std::fs::symlink_metadata(&pub_file).unwrap().is_file());
    assert!(std::fs::read_to_string(&pub_file)
        .unwrap()
        .starts_with("ssh-rsa AAAA"));
}

#[test]
fn output_folders_are_private_and_keys_0600() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), "RegionId,KeyPairName\ncn-hangzhou,web-02\n");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let o = dir.path().join("o");
    for folder in ["", "aliyun", "aliyun/default", "aliyun/default/cn-hangzhou"] {
        assert_eq!(mode(&o.join(folder)), 0o700, "{folder}");
    }
    assert_eq!(
        mode(&o.join("aliyun/default/cn-hangzhou/web-02.pem")),
        0o600
    );
    assert_eq!(mode(&o.join("manifest.jsonl")), 0o600);
    // No temporary file is left behind.
    let names: Vec<String> = std::fs::read_dir(o.join("aliyun/default/cn-hangzhou"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, ["web-02.pem", "web-02.pub"], "{names:?}");
}

#[test]
fn pem_symlink_is_never_written_through() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("o/aliyun/default/cn-hangzhou");
    std::fs::create_dir_all(&folder).unwrap();
    let victim = dir.path().join("victim.pem");
    std::os::unix::fs::symlink(&victim, folder.join("web-03.pem")).unwrap();
    let out = run(dir.path(), "RegionId,KeyPairName\ncn-hangzhou,web-03\n");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        !victim.exists(),
        "nothing written through the dangling link"
    );
    let manifest = std::fs::read_to_string(dir.path().join("o/manifest.jsonl")).unwrap();
    assert!(manifest.contains("refusing to overwrite"), "{manifest}");
}

/// `collect` (and `rotate --submit`) reopen the manifest to append to it, and cut a torn last
/// line. A link planted as the manifest once had both done to the file it points at: here the
/// victim's last line is not JSON, so the repair would have emptied it.
#[test]
fn a_manifest_planted_as_a_symlink_is_neither_cut_nor_appended_to() {
    use keyfleet::sink::folder::{read_written, OutputDir};
    let dir = tempfile::tempdir().unwrap();
    let o = dir.path().join("o");
    std::fs::create_dir(&o).unwrap();
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, o.join("manifest.jsonl")).unwrap();

    let err = OutputDir::resume(&o)
        .err()
        .expect("a symlinked manifest is refused");
    let why = format!("{err:#} {:?}", std::error::Error::source(&err));
    assert!(why.contains("symbolic link"), "{why}");
    let err = read_written(&o).expect_err("not read through the link either");
    assert!(
        format!("{:?}", std::error::Error::source(&err)).contains("symbolic link"),
        "{err:?}"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");

    // `run` keeps what it finds under another name (the link itself) and starts a file of its
    // own, 0600.
    let out = OutputDir::create(&o).unwrap();
    assert!(std::fs::symlink_metadata(out.rotated.as_ref().unwrap())
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(mode(&o.join("manifest.jsonl")), 0o600);
    drop(out);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");

    // A link pointing nowhere is kept aside too, not created through.
    let o2 = dir.path().join("o2");
    std::fs::create_dir(&o2).unwrap();
    let nowhere = dir.path().join("nowhere.txt");
    std::os::unix::fs::symlink(&nowhere, o2.join("manifest.jsonl")).unwrap();
    let out = OutputDir::create(&o2).unwrap();
    assert!(out.rotated.is_some());
    assert_eq!(mode(&o2.join("manifest.jsonl")), 0o600);
    assert!(!nowhere.exists());
}

/// A kill mid-write can tear the manifest's last line inside a character (a name in Chinese is
/// three bytes a character). That line is cut and its job comes again; the lines before it
/// still count. The manifest was once read as text, and such a tear stopped every later
/// `collect` with "stream did not contain valid UTF-8".
#[test]
fn a_manifest_line_torn_inside_a_character_is_cut_and_the_lines_before_it_kept() {
    use keyfleet::sink::folder::OutputDir;
    let dir = tempfile::tempdir().unwrap();
    let o = dir.path().join("o");
    std::fs::create_dir(&o).unwrap();
    let kept = uuid::Uuid::new_v4();
    let whole = format!("{{\"job_id\":\"{kept}\",\"status\":\"created\",\"name\":\"密钥\"}}\n");
    let torn = format!(
        "{{\"job_id\":\"{}\",\"status\":\"created\",\"name\":\"密",
        uuid::Uuid::new_v4()
    );
    let mut bytes = format!("{whole}{torn}").into_bytes();
    bytes.pop(); // the last byte of 密: the line now ends inside the character
    std::fs::write(o.join("manifest.jsonl"), &bytes).unwrap();

    let (out, seen) = OutputDir::resume(&o).unwrap();
    drop(out);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen.get(&kept), Some(&true));
    assert_eq!(
        std::fs::read_to_string(o.join("manifest.jsonl")).unwrap(),
        whole
    );
}

/// The state file (./keyfleet.redb unless --state says otherwise) is the registry. A link
/// planted in its place once had redb create the registry wherever the link pointed, or open
/// the file there for writing; now it is refused, and the file keyfleet makes is 0600.
#[test]
fn a_state_file_planted_as_a_symlink_is_refused_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("keyfleet.redb");
    let rows = "RegionId,KeyPairName\ncn-hangzhou,web-04\n";

    let elsewhere = dir.path().join("elsewhere.redb");
    std::os::unix::fs::symlink(&elsewhere, &state).unwrap();
    let out = run(dir.path(), rows);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = crate::util::text(&out);
    assert!(
        said.contains("keyfleet.redb") && said.contains("symbolic link"),
        "{said}"
    );
    assert!(!elsewhere.exists(), "nothing created where the link points");

    std::fs::remove_file(&state).unwrap();
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, &state).unwrap();
    let out = run(dir.path(), rows);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");

    std::fs::remove_file(&state).unwrap();
    let out = run(dir.path(), rows);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(mode(&state), 0o600);
}
