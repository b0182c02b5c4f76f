//! A real `keyfleet serve` for a test: its own folder, credentials file, state file (or Redis
//! prefix) and a free port; stopped with SIGTERM when the test is done with it.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::cloud::rpc;
use keyfleet::upstream::client::{ApiClient, Signer};

pub const CREDENTIALS: &str = r#"
[[aliyun]]
access_key_id = "testid"
access_key_secret = "testsecret"
account = "acme"
[[aliyun]]
access_key_id = "otherid"
access_key_secret = "othersecret"
account = "globex"
[[ucloud]]
public_key = "ucloudpub"
private_key = "ucloudpriv"
account = "org-acme"
"#;

pub fn v3() -> Signer {
    Signer::AliyunV3 {
        id: "testid".into(),
        secret: "testsecret".into(),
    }
}

/// An Alibaba `CreateKeyPair` of `name` in cn-hangzhou, signed with the test key.
pub async fn create_in_hangzhou(c: &ApiClient, name: &str) -> keyfleet::upstream::client::Reply {
    c.call(
        &rpc(),
        "CreateKeyPair",
        &[("RegionId", "cn-hangzhou"), ("KeyPairName", name)],
    )
    .await
    .unwrap()
}

/// Writes the test credentials at `dir/credentials.toml`, mode 0600.
pub fn credentials(dir: &Path) -> PathBuf {
    let p = dir.join("credentials.toml");
    std::fs::write(&p, CREDENTIALS).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// A plain HTTP client (reqwest is built without a default TLS provider).
pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

pub struct Server {
    child: Child,
    pub addr: String,
    pub log: PathBuf,
}

impl Server {
    /// `c` pointed at this server as its cloud, for both providers, with the access keys the
    /// test clouds accept (from the environment, as a user gives them).
    pub fn as_cloud_of<'a>(&self, c: &'a mut Command) -> &'a mut Command {
        c.args([
            "--upstream-endpoint",
            &format!("aliyun=http://{}", self.addr),
        ])
        .args([
            "--upstream-endpoint",
            &format!("ucloud=http://{}", self.addr),
        ])
        .env("ALIBABA_CLOUD_ACCESS_KEY_ID", "testid")
        .env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "testsecret")
        .env("UCLOUD_PUBLIC_KEY", "ucloudpub")
        .env("UCLOUD_PRIVATE_KEY", "ucloudpriv")
    }

    /// Starts `keyfleet serve` with `args` (plus --listen 127.0.0.1:0 and --credentials, and
    /// --state unless `args` names --redis-url or --state) and waits for its address.
    pub fn start(dir: &Path, args: &[&str]) -> Server {
        let creds = credentials(dir);
        let log = dir.join(format!("serve-{}.log", uuid::Uuid::new_v4().simple()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyfleet"));
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0", "--threads", "2"])
            .arg("--credentials")
            .arg(&creds);
        if !args.iter().any(|a| *a == "--redis-url" || *a == "--state") {
            cmd.arg("--state").arg(dir.join("state.redb"));
        }
        let mut child = cmd
            .args(args)
            .env("RUST_LOG", "keyfleet=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start keyfleet serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let Some(addr) = line.trim().strip_prefix("listening on http://") else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "keyfleet serve did not start: {line:?}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Server {
            child,
            addr: addr.to_owned(),
            log,
        }
    }

    pub fn client(&self) -> ApiClient {
        ApiClient::new(&self.addr).unwrap()
    }

    /// The exposition text of its `/metrics`.
    pub async fn metrics(&self) -> String {
        http()
            .get(format!("http://{}/metrics", self.addr))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// SIGKILL, as a crash: nothing of the server runs after it. Returns the log.
    pub fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits (at most 60 s); returns the exit status and the log.
    pub fn stop(mut self) -> (ExitStatus, String) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("keyfleet serve did not stop within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        (status, log)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
