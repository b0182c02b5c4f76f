//! Helpers shared by the integration tests: running a batch on a fresh embedded store and
//! reading its manifest back.

#![allow(dead_code)]

pub mod serve;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use keyfleet::dialect::Provider;
use keyfleet::job::batch::RowDefaults;
use keyfleet::keys::keygen::KeyBits;
use keyfleet::modes::run::{run, RunOptions, Summary};
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
        }
    }
}

/// Runs a batch with a generous timeout so a hang fails the test instead of CI.
pub async fn run_batch(opts: RunOptions) -> Summary {
    tokio::time::timeout(
        Duration::from_secs(600),
        run(opts, CancellationToken::new()),
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
