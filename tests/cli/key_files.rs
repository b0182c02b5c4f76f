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
