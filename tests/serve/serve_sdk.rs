//! The official cloud SDKs, unchanged, against a real `keyfleet serve --listen 127.0.0.1:0`.
//!
//! Every test starts its own server (fresh state file, 0600 credentials file) and drives it
//! through the driver scripts in `scripts/sdk/` — one per SDK, each printing one JSON line per
//! SDK call describing what the SDK returned or raised. The drivers never judge; the assertions
//! are all here. The SDKs are installed by `scripts/sdk/setup.sh` (run by `scripts/test.sh`)
//! into `target/sdk/venv` and `target/sdk/node`; without them every test fails and says so.
//!
//! Covered per SDK: create / import / describe / delete, the private key (`openssl pkey -check`)
//! and fingerprint (`ssh-keygen -l -E md5`; UCloud: md5(ProjectId|KeyPairId|"type base64")) of
//! every key handed out, every seed error code as the SDK's own exception, and refusal of a
//! wrong secret, an unknown key, a replayed nonce and a stale timestamp. Across SDKs: 50
//! concurrent creates, and a race of 2×K creates for the last K quota slots.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, Permissions};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use md5::{Digest, Md5};
use serde_json::Value;

use crate::util::{checked_public_key, tool};

const SERVE_START: Duration = Duration::from_secs(60);
const DRIVER_TIMEOUT: Duration = Duration::from_secs(180);
const TEST_TIMEOUT: Duration = Duration::from_secs(600);

const CREDENTIALS: &str = r#"[[aliyun]]
access_key_id = "testid"
access_key_secret = "testsecret"
account = "acme"

[[ucloud]]
public_key = "ucloudpub"
private_key = "ucloudpriv"
account = "org-acme"
"#;

const RESOURCE_GROUP: &str = "rg-resourcegroupid1";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn sdk_dir() -> PathBuf {
    repo().join("target").join("sdk")
}

/// Fails (never skips) when the SDKs are not installed.
fn require_sdks() {
    let missing: Vec<&str> = [
        "venv/bin/python",
        "venv/.keyfleet-pins",
        "node/node_modules/@alicloud/ecs20140526/package.json",
        "node/node_modules/@alicloud/pop-core/package.json",
        "node/.keyfleet-pins",
    ]
    .into_iter()
    .filter(|p| !sdk_dir().join(p).exists())
    .collect();
    assert!(
        missing.is_empty(),
        "the official SDKs are not installed (missing {missing:?} under {}): run scripts/sdk/setup.sh",
        sdk_dir().display()
    );
}

/// Runs a test body on its own thread and fails it when it takes longer than `TEST_TIMEOUT`.
fn with_timeout(name: &str, body: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            body();
            let _ = tx.send(());
        })
        .expect("spawn test thread");
    match rx.recv_timeout(TEST_TIMEOUT) {
        Ok(()) => handle.join().expect("test thread"),
        Err(RecvTimeoutError::Disconnected) => {
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(RecvTimeoutError::Timeout) => panic!("{name} did not finish within {TEST_TIMEOUT:?}"),
    }
}

/// A name no other test (or earlier run) uses: `<what>-<8 hex>`; starts with a letter, so it
/// is a valid Alibaba and UCloud key-pair name.
fn unique(what: &str) -> String {
    format!("{what}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

fn kill(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

// --- the server ------------------------------------------------------------------------------

struct Serve {
    child: Child,
    endpoint: String,
    dir: tempfile::TempDir,
}

impl Serve {
    fn start(quota: u64) -> Serve {
        let dir = tempfile::tempdir().expect("tempdir");
        let creds = dir.path().join("credentials.toml");
        std::fs::write(&creds, CREDENTIALS).unwrap();
        std::fs::set_permissions(&creds, Permissions::from_mode(0o600)).unwrap();
        let log = File::create(dir.path().join("serve.log")).unwrap();
        let mut child = crate::util::keyfleet(dir.path())
            .args(["serve", "--listen", "127.0.0.1:0", "--credentials"])
            .arg(&creds)
            .arg("--state")
            .arg(dir.path().join("state.redb"))
            .args(["--quota", &quota.to_string()])
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start keyfleet serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut first = String::new();
            let _ = r.read_line(&mut first);
            let _ = tx.send(first);
            let _ = std::io::copy(&mut r, &mut std::io::sink());
        });
        let first = rx.recv_timeout(SERVE_START).unwrap_or_default();
        let endpoint = first
            .trim()
            .strip_prefix("listening on http://")
            .map(str::to_owned);
        let Some(endpoint) = endpoint else {
            kill(child.id(), rustix::process::Signal::KILL);
            let _ = child.wait();
            panic!(
                "keyfleet serve did not print `listening on http://…` within {SERVE_START:?} \
                 (first line {first:?}); its log:\n{}",
                std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default()
            );
        };
        Serve {
            child,
            endpoint,
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    /// Waits until the reservoir holds `keys` RSA-2048 keys (read from `/metrics`), so that a
    /// burst is answered from it, as a running server answers one, rather than measuring how
    /// fast a cold server on a slow, shared CI machine makes keys (`keyfleet bench --serve`
    /// measures that).
    fn wait_for_reservoir(&self, keys: usize) {
        let deadline = Instant::now() + SERVE_START;
        let mut held = 0;
        while Instant::now() < deadline {
            held = self.reservoir_keys().unwrap_or(0);
            if held >= keys {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("the reservoir held {held} keys, not {keys}, after {SERVE_START:?}");
    }

    fn reservoir_keys(&self) -> Option<usize> {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(&self.endpoint).ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let request = format!("GET /metrics HTTP/1.0\r\nHost: {}\r\n\r\n", self.endpoint);
        conn.write_all(request.as_bytes()).ok()?;
        let mut body = String::new();
        conn.read_to_string(&mut body).ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix("keyfleet_reservoir_keys{bits=\"2048\"} "))
            .and_then(|n| n.trim().parse::<f64>().ok())
            .map(|n| n as usize)
    }

    fn run(&self, sdk: Sdk, args: &[&str]) -> Vec<Value> {
        sdk.run(&self.endpoint, args)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        kill(self.child.id(), rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// --- the SDK drivers -------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Sdk {
    /// aliyun-python-sdk-ecs (RPC v1)
    Classic,
    /// alibabacloud-ecs20140526, ACS3-HMAC-SHA256
    Tea,
    /// alibabacloud-ecs20140526, signature_algorithm "v2" (RPC v1)
    TeaV2,
    /// @alicloud/ecs20140526, ACS3-HMAC-SHA256
    NodeTea,
    /// @alicloud/ecs20140526, signatureAlgorithm "v2"
    NodeTeaV2,
    /// @alicloud/pop-core, POST form
    PopCore,
    /// ucloud-sdk-python3
    UCloud,
}

impl Sdk {
    fn label(self) -> &'static str {
        match self {
            Sdk::Classic => "classic",
            Sdk::Tea => "tea",
            Sdk::TeaV2 => "teav2",
            Sdk::NodeTea => "nodetea",
            Sdk::NodeTeaV2 => "nodeteav2",
            Sdk::PopCore => "popcore",
            Sdk::UCloud => "ucloud",
        }
    }

    fn is_ucloud(self) -> bool {
        self == Sdk::UCloud
    }

    fn command(self, endpoint: &str) -> Command {
        let python = sdk_dir().join("venv/bin/python");
        let (program, script, v2): (PathBuf, &str, bool) = match self {
            Sdk::Classic => (python, "aliyun_classic.py", false),
            Sdk::Tea => (python, "aliyun_tea.py", false),
            Sdk::TeaV2 => (python, "aliyun_tea.py", true),
            Sdk::UCloud => (python, "ucloud.py", false),
            Sdk::NodeTea => ("node".into(), "aliyun_tea.js", false),
            Sdk::NodeTeaV2 => ("node".into(), "aliyun_tea.js", true),
            Sdk::PopCore => ("node".into(), "pop_core.js", false),
        };
        let mut c = Command::new(program);
        c.arg(repo().join("scripts/sdk").join(script))
            .args(["--endpoint", endpoint]);
        if v2 {
            c.arg("--v2");
        }
        for var in [
            "ALIBABA_CLOUD_ACCESS_KEY_ID",
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
            "UCLOUD_PUBLIC_KEY",
            "UCLOUD_PRIVATE_KEY",
            "KEYFLEET_SDK_ENDPOINT",
        ] {
            c.env_remove(var);
        }
        c.env("PYTHONDONTWRITEBYTECODE", "1")
            .env("KEYFLEET_SDK_NODE_DIR", sdk_dir().join("node"))
            .current_dir(repo())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Runs one scenario; every line the driver printed, parsed.
    fn run(self, endpoint: &str, args: &[&str]) -> Vec<Value> {
        let what = format!("{} {}", self.label(), args.join(" "));
        let child = self
            .command(endpoint)
            .args(args)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{what}: cannot start the driver ({e}); run scripts/sdk/setup.sh")
            });
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out = match rx.recv_timeout(DRIVER_TIMEOUT) {
            Ok(out) => out.expect("driver output"),
            Err(_) => {
                kill(pid, rustix::process::Signal::KILL);
                panic!("{what}: the driver did not finish within {DRIVER_TIMEOUT:?}");
            }
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{what}: driver failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("{what}: not a JSON line ({e}): {l}"))
            })
            .collect()
    }

    /// The exception class the SDK raises for an Alibaba error answer with this code/status.
    fn exception(self, code: &str, status: u16) -> String {
        match self {
            Sdk::Classic => "ServerException".into(),
            Sdk::Tea | Sdk::TeaV2 if (400..500).contains(&status) => "ClientException".into(),
            Sdk::Tea | Sdk::TeaV2 => "ServerException".into(),
            Sdk::NodeTea | Sdk::NodeTeaV2 if (400..500).contains(&status) => "ClientError".into(),
            Sdk::NodeTea | Sdk::NodeTeaV2 => "ServerError".into(),
            // pop-core: err.name = Code + "Error"
            Sdk::PopCore => format!("{code}Error"),
            Sdk::UCloud => "RetCodeException".into(),
        }
    }
}

fn single(lines: Vec<Value>, what: &str) -> Value {
    assert_eq!(lines.len(), 1, "{what}: expected one line, got {lines:#?}");
    lines.into_iter().next().unwrap()
}

fn ok_body<'a>(line: &'a Value, what: &str, serve: &Serve) -> &'a Value {
    assert_eq!(
        line["ok"],
        Value::Bool(true),
        "{what}: the SDK reported a failure: {line}\nserver log tail:\n{}",
        tail(&serve.log())
    );
    &line["body"]
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// What the error line should say. `codes` lists acceptable codes (Alibaba strings or UCloud
/// RetCodes as strings); `status` the HTTP status (UCloud: always 200).
struct Want {
    codes: &'static [&'static str],
    status: u16,
}

/// Compares an SDK error line with `want`; None when it matches, else why not.
fn mismatch(sdk: Sdk, line: &Value, want: &Want) -> Option<String> {
    if line["ok"] != Value::Bool(false) {
        return Some(format!("expected an error, the SDK saw success: {line}"));
    }
    let code = match &line["code"] {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    };
    if !want.codes.contains(&code.as_str()) {
        return Some(format!("code {code}, want one of {:?}: {line}", want.codes));
    }
    let status = line["status"].as_u64().map(|s| s as u16);
    // the classic SDK on success has no status, but on errors it always reports one
    if status != Some(want.status) {
        return Some(format!(
            "HTTP status {status:?}, want {}: {line}",
            want.status
        ));
    }
    let class = sdk.exception(&code, want.status);
    if line["exception"].as_str() != Some(class.as_str()) {
        return Some(format!(
            "exception {}, want {class}: {line}",
            line["exception"]
        ));
    }
    None
}

// --- keys ------------------------------------------------------------------------------------

/// Checks a PEM private key with openssl and returns its public key as `type base64`.
fn check_private_key(pem: &str, dir: &Path, name: &str) -> String {
    assert!(
        pem.starts_with("-----BEGIN PRIVATE KEY-----"),
        "{name}: PrivateKeyBody is not unencrypted PKCS#8 PEM: {:?}",
        &pem[..pem.len().min(40)]
    );
    let path = dir.join(format!("{name}.pem"));
    std::fs::write(&path, pem).unwrap();
    std::fs::set_permissions(&path, Permissions::from_mode(0o600)).unwrap();
    type_and_base64(&checked_public_key(&path))
}

/// `type base64` of an OpenSSH public-key line (comment and newline dropped).
fn type_and_base64(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `ssh-keygen -l -E md5` of a public key line, without the `MD5:` prefix.
fn md5_fingerprint(public: &str, dir: &Path, name: &str) -> String {
    crate::util::md5_fingerprint(public, &dir.join(format!("{name}.fp.pub")))
}

/// UCloud: md5(ProjectId + "|" + KeyPairId + "|" + "type base64") as 32 lower-case hex digits
/// (serve contract, section 6).
fn ucloud_fingerprint(project: &str, id: &str, public: &str) -> String {
    let digest = Md5::digest(format!("{project}|{id}|{public}").as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn new_public_key(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    tool(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "rsa",
            "-b",
            "2048",
            "-N",
            "",
            "-C",
            "imported@keyfleet-test",
            "-f",
            path.to_str().unwrap(),
        ],
    );
    path.with_extension("pub")
}

fn str_of<'a>(v: &'a Value, field: &str, what: &str) -> &'a str {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no string {field} in {v}"))
}

/// Alibaba DescribeKeyPairs: `KeyPairs.KeyPair[]` by name.
fn alibaba_listed(body: &Value) -> BTreeMap<String, Value> {
    body["KeyPairs"]["KeyPair"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|k| {
                    (
                        k["KeyPairName"].as_str().unwrap_or("").to_owned(),
                        k.clone(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// UCloud DescribeUHostKeyPairs: `KeyPairs[]` by KeyPairId.
fn ucloud_listed(body: &Value) -> BTreeMap<String, Value> {
    body["KeyPairs"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|k| (k["KeyPairId"].as_str().unwrap_or("").to_owned(), k.clone()))
                .collect()
        })
        .unwrap_or_default()
}

// --- create / import / describe / delete ----------------------------------------------------

fn lifecycle(sdk: Sdk) {
    require_sdks();
    let serve = Serve::start(20);
    let base = unique(&format!("life-{}", sdk.label()));
    let created = format!("{base}-c");
    let imported = format!("{base}-i");
    let what = |op: &str| format!("{} {op}", sdk.label());

    // create (Alibaba: with two tags, one needing percent-encoding, and a resource group)
    let mut args = vec!["create", created.as_str()];
    if !sdk.is_ucloud() {
        args.extend([
            "--tag",
            "env=dev",
            "--tag",
            "team=a b/c*~",
            "--resource-group",
            RESOURCE_GROUP,
        ]);
    }
    let line = single(serve.run(sdk, &args), &what("create"));
    let body = ok_body(&line, &what("create"), &serve);
    let key = if sdk.is_ucloud() {
        &body["KeyPair"]
    } else {
        body
    };
    assert_eq!(str_of(key, "KeyPairName", "create"), created, "{line}");
    // Checks that do not stop the rest of the lifecycle; all reported at the end.
    let mut failures: Vec<String> = Vec::new();
    let id = key["KeyPairId"].as_str().unwrap_or_default().to_owned();
    let public = check_private_key(
        str_of(key, "PrivateKeyBody", "create"),
        serve.dir.path(),
        &created,
    );
    let fingerprint = str_of(key, "KeyPairFingerPrint", "create").to_owned();
    let project = if sdk.is_ucloud() {
        assert!(id.starts_with("uhostkp-"), "KeyPairId {id}");
        let project = str_of(key, "ProjectId", "create").to_owned();
        assert_eq!(project, "org-acme", "the account's default project");
        assert_eq!(
            fingerprint,
            ucloud_fingerprint(&project, &id, &public),
            "UCloud fingerprint = md5(ProjectId|KeyPairId|type base64)"
        );
        project
    } else {
        // the contract (section 5, current doc) and the SDKs' CreateKeyPair response models
        // have KeyPairId `kp-…`
        if !id.starts_with("kp-") {
            failures.push(format!(
                "{} create: KeyPairId {:?}, want `kp-…`; answer fields: {:?}",
                sdk.label(),
                key.get("KeyPairId"),
                key.as_object().map(|o| o.keys().collect::<Vec<_>>())
            ));
        }
        assert_eq!(
            fingerprint,
            md5_fingerprint(&public, serve.dir.path(), &created),
            "Alibaba fingerprint = ssh-keygen -l -E md5 of the key's public half"
        );
        assert!(body["RequestId"].as_str().is_some_and(|r| !r.is_empty()));
        String::new()
    };

    // import
    let pub_file = new_public_key(serve.dir.path(), &imported);
    let pub_line = type_and_base64(&std::fs::read_to_string(&pub_file).unwrap());
    let line = single(
        serve.run(sdk, &["import", &imported, pub_file.to_str().unwrap()]),
        &what("import"),
    );
    let body = ok_body(&line, &what("import"), &serve);
    assert_eq!(str_of(body, "KeyPairName", "import"), imported, "{line}");
    assert!(
        body.get("PrivateKeyBody").is_none_or(Value::is_null),
        "{line}"
    );
    let imported_fp = str_of(body, "KeyPairFingerPrint", "import").to_owned();
    let imported_id = if sdk.is_ucloud() {
        let iid = str_of(body, "KeyPairId", "import").to_owned();
        assert_eq!(
            imported_fp,
            ucloud_fingerprint(&project, &iid, &pub_line),
            "UCloud import fingerprint = md5(ProjectId|KeyPairId|type base64)"
        );
        iid
    } else {
        assert_eq!(
            imported_fp,
            md5_fingerprint(&pub_line, serve.dir.path(), &imported),
            "{line}"
        );
        String::new()
    };

    // describe
    if sdk.is_ucloud() {
        let line = single(serve.run(sdk, &["describe"]), &what("describe"));
        let listed = ucloud_listed(ok_body(&line, &what("describe"), &serve));
        let c = listed
            .get(&id)
            .unwrap_or_else(|| panic!("created {id} not described: {line}"));
        assert_eq!(c["KeyPairName"], created.as_str());
        assert_eq!(c["KeyPairFingerPrint"], fingerprint.as_str());
        assert_eq!(c["ProjectId"], project.as_str());
        assert!(c.get("PrivateKeyBody").is_none(), "{c}");
        let i = listed
            .get(&imported_id)
            .unwrap_or_else(|| panic!("imported {imported_id} not described: {line}"));
        assert_eq!(i["KeyPairFingerPrint"], imported_fp.as_str());
        let line = single(
            serve.run(sdk, &["describe", &created]),
            &what("describe by name"),
        );
        let by_name = ucloud_listed(ok_body(&line, &what("describe by name"), &serve));
        assert_eq!(
            by_name.keys().collect::<Vec<_>>(),
            vec![&id],
            "KeyPairName filter: {line}"
        );
    } else {
        let pattern = format!("{base}-*");
        let line = single(serve.run(sdk, &["describe", &pattern]), &what("describe"));
        let body = ok_body(&line, &what("describe"), &serve);
        assert_eq!(body["TotalCount"], 2, "{line}");
        let listed = alibaba_listed(body);
        let c = &listed[&created];
        assert_eq!(c["KeyPairFingerPrint"], fingerprint.as_str(), "{line}");
        assert_eq!(c["ResourceGroupId"], RESOURCE_GROUP, "{line}");
        assert_eq!(
            type_and_base64(c["PublicKey"].as_str().unwrap_or("")),
            public,
            "IncludePublicKey: {line}"
        );
        let tags: BTreeMap<&str, &str> = c["Tags"]["Tag"]
            .as_array()
            .unwrap_or_else(|| panic!("no Tags.Tag: {line}"))
            .iter()
            .map(|t| {
                (
                    t["TagKey"].as_str().unwrap_or(""),
                    t["TagValue"].as_str().unwrap_or(""),
                )
            })
            .collect();
        assert_eq!(
            tags,
            BTreeMap::from([("env", "dev"), ("team", "a b/c*~")]),
            "{line}"
        );
        let i = &listed[&imported];
        assert_eq!(i["KeyPairFingerPrint"], imported_fp.as_str(), "{line}");
        assert_eq!(
            type_and_base64(i["PublicKey"].as_str().unwrap_or("")),
            pub_line,
            "{line}"
        );
    }

    // delete
    if sdk.is_ucloud() {
        let line = single(
            serve.run(sdk, &["delete", &id, &imported_id]),
            &what("delete"),
        );
        ok_body(&line, &what("delete"), &serve);
        let line = single(
            serve.run(sdk, &["describe"]),
            &what("describe after delete"),
        );
        let listed = ucloud_listed(ok_body(&line, &what("describe after delete"), &serve));
        assert!(
            !listed.contains_key(&id) && !listed.contains_key(&imported_id),
            "deleted pairs still described: {line}"
        );
    } else {
        let line = single(
            serve.run(sdk, &["delete", &created, &imported]),
            &what("delete"),
        );
        ok_body(&line, &what("delete"), &serve);
        let pattern = format!("{base}-*");
        let line = single(
            serve.run(sdk, &["describe", &pattern]),
            &what("describe after delete"),
        );
        let body = ok_body(&line, &what("describe after delete"), &serve);
        assert_eq!(
            body["TotalCount"], 0,
            "deleted pairs still described: {line}"
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// --- seed error codes ------------------------------------------------------------------------

/// The error cases of `scripts/sdk/sdkcommon.py` and what keyfleet answers (seed table,
/// serve contract section 5, src/dialect/*.rs); None: the SDK / API has no such case.
fn expected_error(sdk: Sdk, case: &str) -> Option<Want> {
    let w = |codes, status| Some(Want { codes, status });
    if sdk.is_ucloud() {
        // src/dialect/ucloud.rs RetCode table; UCloud answers HTTP 200
        return match case {
            "bad-name" | "bad-public-key" => w(&["230"], 200),
            "duplicate-name" => w(&["8204"], 200),
            "quota-exceeded" => w(&["8203"], 200),
            "missing-name" | "missing-public-key" => w(&["220"], 200),
            "bad-region" => w(&["8201"], 200),
            _ => None,
        };
    }
    match case {
        "bad-name" => w(&["InvalidKeyPairName.Malformed"], 400),
        "duplicate-name" => w(&["KeyPair.AlreadyExist"], 400),
        "bad-resource-group" => w(&["InvalidResourceGroup.NotFound"], 404),
        "duplicate-tag-key" => w(&["Duplicate.TagKey"], 400),
        "bad-tag-key" => w(&["InvalidTagKey.Malformed"], 400),
        "bad-tag-value" => w(&["InvalidTagValue.Malformed"], 400),
        "too-many-tags" => w(&["QuotaExceed.Tags"], 403),
        "quota-exceeded" => w(&["QuotaExceed.KeyPair"], 403),
        "missing-name" => w(&["MissingKeyPairName"], 400),
        "bad-region" => w(&["InvalidRegionId.NotFound"], 404),
        "bad-public-key" => w(&["InvalidPublicKeyBody.Malformed"], 400),
        // the gateway's Missing{Name} (contract section 4) or ImportKeyPair's documented
        // MissingParameter (section 5): either is what Alibaba is known to answer
        "missing-public-key" => w(&["MissingPublicKeyBody", "MissingParameter"], 400),
        "bad-key-pair-names" => w(&["InvalidKeyPairNames.ValueNotSupported"], 400),
        _ => None,
    }
}

/// duplicate-name first (it uses one quota slot), quota-exceeded last.
const ERROR_CASES: [&str; 13] = [
    "duplicate-name",
    "bad-name",
    "bad-resource-group",
    "duplicate-tag-key",
    "bad-tag-key",
    "bad-tag-value",
    "too-many-tags",
    "missing-name",
    "bad-region",
    "bad-public-key",
    "missing-public-key",
    "bad-key-pair-names",
    "quota-exceeded",
];

fn seed_errors(sdk: Sdk) {
    require_sdks();
    const QUOTA: usize = 4;
    let serve = Serve::start(QUOTA as u64);
    let base = unique(&format!("err-{}", sdk.label()));
    let mut failures = Vec::new();
    for (n, case) in ERROR_CASES.iter().enumerate() {
        let name = format!("{base}-{n}");
        let lines = serve.run(sdk, &["error", case, &name]);
        let Some(want) = expected_error(sdk, case) else {
            assert!(
                lines.iter().all(|l| l["unsupported"] == true),
                "{} {case}: expected the driver to say unsupported: {lines:?}",
                sdk.label()
            );
            continue;
        };
        let last = lines.last().cloned().unwrap_or(Value::Null);
        if let Some(why) = mismatch(sdk, &last, &want) {
            failures.push(format!("{} error {case}: {why}", sdk.label()));
        }
        let oks = lines.iter().filter(|l| l["ok"] == true).count();
        let want_oks = match *case {
            "duplicate-name" => 1,
            "quota-exceeded" => QUOTA - 1,
            _ => 0,
        };
        if oks != want_oks {
            failures.push(format!(
                "{} error {case}: {oks} successes before the error, want {want_oks}: {lines:?}",
                sdk.label()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of the seed error cases did not arrive as expected:\n{}\nserver log tail:\n{}",
        failures.len(),
        failures.join("\n"),
        tail(&serve.log())
    );
}

// --- gateway refusals ------------------------------------------------------------------------

fn refusals(sdk: Sdk) {
    require_sdks();
    let serve = Serve::start(20);
    let base = unique(&format!("gw-{}", sdk.label()));
    let name = |s: &str| format!("{base}-{s}");
    let (wrong, unknown, stale, replay) = (name("w"), name("u"), name("s"), name("r"));
    let mut failures = Vec::new();
    let check = |failures: &mut Vec<String>, what: &str, line: &Value, want: Want| {
        if let Some(why) = mismatch(sdk, line, &want) {
            failures.push(format!("{} {what}: {why}", sdk.label()));
        }
    };

    let line = single(serve.run(sdk, &["wrong-secret", &wrong]), "wrong-secret");
    let want = match sdk {
        // the classic SDK matched the server's "server string to sign is:" with its own
        Sdk::Classic => Want {
            codes: &["InvalidAccessKeySecret"],
            status: 400,
        },
        Sdk::UCloud => Want {
            codes: &["171"],
            status: 200,
        },
        _ => Want {
            codes: &["SignatureDoesNotMatch"],
            status: 400,
        },
    };
    check(&mut failures, "wrong-secret", &line, want);

    let line = single(serve.run(sdk, &["unknown-key", &unknown]), "unknown-key");
    let want = if sdk.is_ucloud() {
        Want {
            codes: &["172"],
            status: 200,
        }
    } else {
        Want {
            codes: &["InvalidAccessKeyId.NotFound"],
            status: 404,
        }
    };
    check(&mut failures, "unknown-key", &line, want);

    let line = single(
        serve.run(sdk, &["stale-timestamp", &stale]),
        "stale-timestamp",
    );
    if sdk.is_ucloud() {
        assert_eq!(
            line["unsupported"], true,
            "UCloud signs no timestamp: {line}"
        );
    } else {
        check(
            &mut failures,
            "stale-timestamp (20 min)",
            &line,
            Want {
                codes: &["InvalidTimeStamp.Expired"],
                status: 400,
            },
        );
    }

    let lines = serve.run(sdk, &["replay", &replay]);
    assert_eq!(lines.len(), 2, "replay: {lines:?}");
    if lines[0]["ok"] != true {
        failures.push(format!(
            "{} replay: the first request failed: {}",
            sdk.label(),
            lines[0]
        ));
    }
    let want = if sdk.is_ucloud() {
        // UCloud signs no nonce: the copy reaches the action and is just a second create
        Want {
            codes: &["8204"],
            status: 200,
        }
    } else {
        Want {
            codes: &["SignatureNonceUsed"],
            status: 400,
        }
    };
    check(&mut failures, "replay (second send)", &lines[1], want);

    // nothing refused was created; the replayed create exists once
    let line = if sdk.is_ucloud() {
        single(serve.run(sdk, &["describe"]), "describe")
    } else {
        single(
            serve.run(sdk, &["describe", &format!("{base}-*")]),
            "describe",
        )
    };
    let body = ok_body(&line, "describe", &serve);
    let names: Vec<String> = if sdk.is_ucloud() {
        ucloud_listed(body)
            .values()
            .map(|k| k["KeyPairName"].as_str().unwrap_or("").to_owned())
            .filter(|n| n.starts_with(&base))
            .collect()
    } else {
        alibaba_listed(body).into_keys().collect()
    };
    if names != vec![replay.clone()] {
        failures.push(format!(
            "{}: after the refusals the key pairs are {names:?}, want only {replay:?}",
            sdk.label()
        ));
    }
    assert!(
        failures.is_empty(),
        "{}\nserver log tail:\n{}",
        failures.join("\n"),
        tail(&serve.log())
    );
}

// --- concurrency -----------------------------------------------------------------------------

/// Runs `create-many PREFIX N` on several SDKs at once; every create line, with its SDK.
fn create_many(serve: &Serve, plan: &[(Sdk, usize)], base: &str) -> Vec<(Sdk, Value)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = plan
            .iter()
            .map(|&(sdk, n)| {
                let prefix = format!("{base}-{}", sdk.label());
                let n = n.to_string();
                let endpoint = serve.endpoint.clone();
                s.spawn(move || {
                    let lines = sdk.run(&endpoint, &["create-many", &prefix, &n]);
                    lines.into_iter().map(|l| (sdk, l)).collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("driver thread"))
            .collect()
    })
}

fn fifty_concurrent_creates() {
    require_sdks();
    let serve = Serve::start(500);
    serve.wait_for_reservoir(50);
    let base = unique("many");
    let plan = [
        (Sdk::Classic, 8),
        (Sdk::Tea, 7),
        (Sdk::TeaV2, 7),
        (Sdk::NodeTea, 7),
        (Sdk::NodeTeaV2, 7),
        (Sdk::PopCore, 7),
        (Sdk::UCloud, 7),
    ];
    let lines = create_many(&serve, &plan, &base);
    assert_eq!(lines.len(), 50, "{lines:?}");
    let failed: Vec<_> = lines.iter().filter(|(_, l)| l["ok"] != true).collect();
    assert!(
        failed.is_empty(),
        "{} of 50 concurrent creates failed: {failed:#?}\nserver log tail:\n{}",
        failed.len(),
        tail(&serve.log())
    );
    let mut fingerprints = BTreeSet::new();
    let mut public_keys = BTreeSet::new();
    for (sdk, line) in &lines {
        let body = &line["body"];
        let key = if sdk.is_ucloud() {
            &body["KeyPair"]
        } else {
            body
        };
        let name = str_of(key, "KeyPairName", "create").to_owned();
        let public = check_private_key(
            str_of(key, "PrivateKeyBody", "create"),
            serve.dir.path(),
            &name,
        );
        let fp = str_of(key, "KeyPairFingerPrint", "create").to_owned();
        let want = if sdk.is_ucloud() {
            ucloud_fingerprint(
                str_of(key, "ProjectId", "create"),
                str_of(key, "KeyPairId", "create"),
                &public,
            )
        } else {
            md5_fingerprint(&public, serve.dir.path(), &name)
        };
        assert_eq!(fp, want, "{} {name}", sdk.label());
        fingerprints.insert(fp);
        public_keys.insert(public);
    }
    assert_eq!(fingerprints.len(), 50, "distinct fingerprints");
    assert_eq!(public_keys.len(), 50, "distinct keys");

    let line = single(
        serve.run(Sdk::Classic, &["describe", &format!("{base}-*")]),
        "describe",
    );
    assert_eq!(
        ok_body(&line, "describe", &serve)["TotalCount"],
        43,
        "{line}"
    );
}

fn quota_race() {
    require_sdks();
    const K: usize = 10;
    const USED: usize = 3;
    let serve = Serve::start((K + USED) as u64);
    let base = unique("race");
    // fill all but K slots of both scopes (Alibaba acme/cn-hangzhou, UCloud org-acme/cn-bj2)
    for sdk in [Sdk::Classic, Sdk::UCloud] {
        let lines = serve.run(
            sdk,
            &["create-many", &format!("{base}-pre"), &USED.to_string()],
        );
        assert!(
            lines.iter().all(|l| l["ok"] == true),
            "{} pre-fill: {lines:?}",
            sdk.label()
        );
    }
    // 2×K creates for the last K Alibaba slots, from four SDKs at once; UCloud likewise
    let plan = [
        (Sdk::Classic, K / 2),
        (Sdk::Tea, K / 2),
        (Sdk::NodeTeaV2, K / 2),
        (Sdk::PopCore, K / 2),
        (Sdk::UCloud, 2 * K),
    ];
    let lines = create_many(&serve, &plan, &base);
    let mut failures = Vec::new();
    for ucloud in [false, true] {
        let ours: Vec<_> = lines
            .iter()
            .filter(|(s, _)| s.is_ucloud() == ucloud)
            .collect();
        assert_eq!(ours.len(), 2 * K);
        let oks = ours.iter().filter(|(_, l)| l["ok"] == true).count();
        let provider = if ucloud { "UCloud" } else { "Alibaba" };
        if oks != K {
            failures.push(format!(
                "{provider}: {oks} of {} creates for the last {K} slots succeeded",
                2 * K
            ));
        }
        for (sdk, l) in ours.iter().filter(|(_, l)| l["ok"] != true) {
            let want = if ucloud {
                Want {
                    codes: &["8203"],
                    status: 200,
                }
            } else {
                Want {
                    codes: &["QuotaExceed.KeyPair"],
                    status: 403,
                }
            };
            if let Some(why) = mismatch(*sdk, l, &want) {
                failures.push(format!("{provider} {}: {why}", sdk.label()));
            }
        }
    }
    let line = single(
        serve.run(Sdk::Tea, &["describe", &format!("{base}-*")]),
        "describe",
    );
    let total = ok_body(&line, "describe", &serve)["TotalCount"].clone();
    if total != K + USED {
        failures.push(format!(
            "Alibaba describe: TotalCount {total}, want {}",
            K + USED
        ));
    }
    assert!(
        failures.is_empty(),
        "{}\nserver log tail:\n{}",
        failures.join("\n"),
        tail(&serve.log())
    );
}

// --- the tests -------------------------------------------------------------------------------

macro_rules! per_sdk {
    ($($sdk:ident: $lifecycle:ident, $errors:ident, $refusals:ident;)*) => {$(
        #[test]
        fn $lifecycle() {
            with_timeout(stringify!($lifecycle), || lifecycle(Sdk::$sdk));
        }
        #[test]
        fn $errors() {
            with_timeout(stringify!($errors), || seed_errors(Sdk::$sdk));
        }
        #[test]
        fn $refusals() {
            with_timeout(stringify!($refusals), || refusals(Sdk::$sdk));
        }
    )*};
}

per_sdk! {
    Classic: classic_lifecycle, classic_seed_errors, classic_refusals;
    Tea: tea_acs3_lifecycle, tea_acs3_seed_errors, tea_acs3_refusals;
    TeaV2: tea_v2_lifecycle, tea_v2_seed_errors, tea_v2_refusals;
    NodeTea: node_tea_acs3_lifecycle, node_tea_acs3_seed_errors, node_tea_acs3_refusals;
    NodeTeaV2: node_tea_v2_lifecycle, node_tea_v2_seed_errors, node_tea_v2_refusals;
    PopCore: pop_core_lifecycle, pop_core_seed_errors, pop_core_refusals;
    UCloud: ucloud_lifecycle, ucloud_seed_errors, ucloud_refusals;
}

#[test]
fn fifty_concurrent_creates_from_seven_sdks() {
    with_timeout("fifty_concurrent_creates", fifty_concurrent_creates);
}

#[test]
fn race_for_the_last_quota_slots() {
    with_timeout("quota_race", quota_race);
}
