//! Helpers shared by the integration tests: running a batch on a fresh embedded store and
//! reading its manifest back.

#![allow(dead_code)]

pub mod bignum;
pub mod cloud;
pub mod serve;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use keyfleet::dialect::Provider;
use keyfleet::job::batch::RowDefaults;
use keyfleet::keys::keygen::KeyBits;
use keyfleet::modes::run::{run_locally, RunOptions, Summary};
use keyfleet::settings::Settings;
use keyfleet::telemetry::progress::ProgressMode;
use tokio_util::sync::CancellationToken;

/// Every test gets its own folder, state file and batch id.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Self {
        Sandbox {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).expect("write input");
        p
    }

    pub fn options(&self, input: &Path, out: &str) -> RunOptions {
        RunOptions {
            input: input.to_owned(),
            format: None,
            out: self.path(out),
            state: self.path("state.redb"),
            threads: 2,
            defaults: RowDefaults {
                batch_id: format!("test-{}", uuid::Uuid::new_v4()),
                provider: Provider::Aliyun,
                owner: "acct".into(),
                key_bits: KeyBits::B2048,
            },
            settings: Settings::default(),
            progress: ProgressMode::Off,
            reservoir: None,
        }
    }
}

/// `f`, failing the test (instead of hanging CI) when it takes longer than `limit`.
pub async fn within<T>(limit: Duration, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .expect("test timed out")
}

/// Runs a batch with a generous timeout so a hang fails the test instead of CI.
pub async fn run_batch(opts: RunOptions) -> Summary {
    tokio::time::timeout(
        Duration::from_secs(600),
        run_locally(opts, CancellationToken::new()),
    )
    .await
    .expect("run timed out")
    .expect("run failed")
}

pub fn manifest(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("manifest.jsonl"))
        .expect("manifest")
        .lines()
        .map(|l| serde_json::from_str(l).expect("manifest line is JSON"))
        .collect()
}

pub fn tool(name: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(name)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{name} is required for this test (scripts/test.sh installs it): {e}")
        });
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Checks a PEM private-key file with `openssl pkey -check` and returns its OpenSSH public-key
/// line (`ssh-keygen -y`, trimmed).
pub fn checked_public_key(pem: &Path) -> String {
    let p = pem.to_str().unwrap();
    tool("openssl", &["pkey", "-check", "-noout", "-in", p]);
    tool("ssh-keygen", &["-y", "-f", p]).trim().to_owned()
}

/// `ssh-keygen -l -E md5` of an OpenSSH public-key line (written to `file` first), without the
/// `MD5:` prefix.
pub fn md5_fingerprint(public: &str, file: &Path) -> String {
    std::fs::write(file, format!("{public}\n")).unwrap();
    let out = tool(
        "ssh-keygen",
        &["-l", "-E", "md5", "-f", file.to_str().unwrap()],
    );
    out.split_whitespace()
        .nth(1)
        .and_then(|f| f.strip_prefix("MD5:"))
        .unwrap_or_else(|| panic!("unexpected ssh-keygen -l output: {out}"))
        .to_owned()
}

/// The `keyfleet` binary as a user runs it: in `dir`, with no `KEYFLEET_*` settings inherited
/// from the test's environment and nothing on standard input.
pub fn keyfleet(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keyfleet"));
    c.current_dir(dir).stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("KEYFLEET_") {
            c.env_remove(k);
        }
    }
    c
}

/// Everything a command printed, stdout then stderr.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
