//! The HTTP upstream against a real cloud API: `keyfleet serve` on loopback with injected
//! faults and throttling is the cloud; `keyfleet run --upstream-endpoint …` registers every
//! created key there. Checked on the cloud's side: exactly the created names, with exactly the
//! manifest's fingerprints, nothing else.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::util::cloud::{cloud_pairs, rpc, ucloud};
use crate::util::serve::Server;
use crate::util::{keyfleet, manifest, text};

fn batch(dir: &std::path::Path, aliyun: usize, ucloud: usize) -> std::path::PathBuf {
    let mut csv = String::from("Provider,Owner,RegionId,KeyPairName,Region\n");
    for i in 0..aliyun {
        csv.push_str(&format!("aliyun,acme,cn-hangzhou,a-{i:03},\n"));
    }
    for i in 0..ucloud {
        csv.push_str(&format!("ucloud,org-acme,,u-{i:03},cn-bj2\n"));
    }
    let p = dir.join("batch.csv");
    std::fs::write(&p, csv).unwrap();
    p
}

/// The sum of `keyfleet_api_requests_total` over the series answered with `code`.
fn answered(metrics: &str, code: &str) -> u64 {
    let label = format!("code=\"{code}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("keyfleet_api_requests_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Another tool on the same Alibaba account, as platform teams have: it lists key pairs 50
/// times a second, above the cloud's per-account limit, so the account is at its limit
/// whatever the speed of this machine's key generation. It stops once the cloud has
/// throttled at least three calls that were not its own (the run's), or when `stop` is set,
/// and returns how many of its own calls were throttled.
async fn busy_neighbour(
    cloud: &Server,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> u64 {
    use std::sync::atomic::Ordering;
    let c = cloud.client();
    let mut own = 0u64;
    for i in 0u64.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let r = c
            .call(
                &rpc(),
                "DescribeKeyPairs",
                &[("RegionId", "cn-hangzhou"), ("PageSize", "1")],
            )
            .await
            .unwrap();
        if r.json()["Code"] == "Throttling.User" {
            own += 1;
        }
        // Its calls are sequential, so at most this one is counted by the cloud and not yet
        // here: three more than its own means at least two of the run's.
        if i % 10 == 9 && answered(&cloud.metrics().await, "Throttling.User") >= own + 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    own
}

fn run_against(
    dir: &std::path::Path,
    cloud: &str,
    file: &std::path::Path,
    out: &str,
    extra: &[&str],
    secret: &str,
) -> std::process::Output {
    keyfleet(dir)
        .args(["run", "--threads", "2", "--state"])
        .arg(dir.join(format!("{out}.redb")))
        .arg("--out")
        .arg(dir.join(out))
        .arg(file)
        .args(["--upstream-endpoint", &format!("aliyun=http://{cloud}")])
        .args(["--upstream-endpoint", &format!("ucloud=http://{cloud}")])
        .args(extra)
        .env("ALIBABA_CLOUD_ACCESS_KEY_ID", "testid")
        .env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", secret)
        .env("UCLOUD_PUBLIC_KEY", "ucloudpub")
        .env(
            "UCLOUD_PRIVATE_KEY",
            if secret == "testsecret" {
                "ucloudpriv"
            } else {
                secret
            },
        )
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_created_key_is_registered_once_through_faults_and_throttling() {
    tokio::time::timeout(Duration::from_secs(600), async {
        let dir = tempfile::tempdir().unwrap();
        let cloud = Server::start(
            dir.path(),
            &[
                "--fault-rate",
                "0.2",
                "--throttle-rps",
                "20",
                "--quota",
                "1000",
                "--state",
                dir.path().join("cloud.redb").to_str().unwrap(),
            ],
        );
        let file = batch(dir.path(), 150, 150);
        let d = dir.path().to_owned();
        let addr = cloud.addr.clone();
        let run = tokio::task::spawn_blocking(move || {
            run_against(
                &d,
                &addr,
                &file,
                "keys",
                &["--upstream-rps", "30"],
                "testsecret",
            )
        });
        // The run alone reaches the cloud's 20/s only when keys come faster than that, which a
        // loaded CI machine does not do; the neighbour makes throttling certain.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (out, own_throttled) = tokio::join!(
            async {
                let out = run.await.unwrap();
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                out
            },
            busy_neighbour(&cloud, stop.clone())
        );
        let t = text(&out);
        assert!(out.status.success(), "{t}");
        let rows = manifest(&dir.path().join("keys"));
        assert_eq!(rows.len(), 300);
        let failed: Vec<_> = rows.iter().filter(|r| r["status"] != "created").collect();
        assert!(
            failed.is_empty(),
            "no row fails for throttling or lost answers: {failed:?}"
        );
        let c = cloud.client();
        for provider in ["aliyun", "ucloud"] {
            let held = cloud_pairs(&c, provider).await;
            let made: BTreeMap<String, (String, String)> = rows
                .iter()
                .filter(|r| r["provider"] == provider)
                .map(|r| {
                    (
                        r["key_pair_name"].as_str().unwrap().to_owned(),
                        (
                            r["key_pair_id"].as_str().unwrap_or("").to_owned(),
                            r["key_pair_fingerprint"].as_str().unwrap().to_owned(),
                        ),
                    )
                })
                .collect();
            assert_eq!(made.len(), 150);
            if provider == "aliyun" {
                // Alibaba's describe answer has no id: compare names and fingerprints.
                let fps = |m: &BTreeMap<String, (String, String)>| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.1.clone()))
                        .collect::<BTreeMap<_, _>>()
                };
                assert_eq!(
                    fps(&held),
                    fps(&made),
                    "the cloud holds exactly the manifest's keys"
                );
            } else {
                assert_eq!(
                    held, made,
                    "the cloud holds exactly the manifest's keys, ids included"
                );
            }
        }
        // Each delivered key file is the key the cloud holds.
        for r in rows.iter().take(5).chain(rows.iter().rev().take(5)) {
            let pem = dir.path().join(r["private_key_file"].as_str().unwrap());
            let pem = if pem.exists() {
                pem
            } else {
                dir.path()
                    .join("keys")
                    .join(r["private_key_file"].as_str().unwrap())
            };
            let (md5, _) = keyfleet::keys::keygen::fingerprints_of_pem(
                &std::fs::read_to_string(&pem).unwrap(),
            )
            .unwrap();
            assert_eq!(md5, r["fingerprint_md5"].as_str().unwrap());
        }
        let metrics = cloud.metrics().await;
        let throttled = answered(&metrics, "Throttling.User") + answered(&metrics, "153");
        assert!(
            throttled > own_throttled,
            "the run's own calls were throttled: {throttled} throttled, {own_throttled} of them the neighbour's"
        );
        assert!(
            metrics.contains("code=\"ServiceUnavailable\"") || metrics.contains("code=\"150\""),
            "faults happened"
        );
        cloud.stop();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_secret_fails_every_row_and_names_the_setting() {
    tokio::time::timeout(Duration::from_secs(300), async {
        let dir = tempfile::tempdir().unwrap();
        let cloud = Server::start(
            dir.path(),
            &["--state", dir.path().join("cloud.redb").to_str().unwrap()],
        );
        let file = batch(dir.path(), 3, 2);
        let d = dir.path().to_owned();
        let addr = cloud.addr.clone();
        let secret = "Wr0ngSecretValue";
        let out =
            tokio::task::spawn_blocking(move || run_against(&d, &addr, &file, "keys", &[], secret))
                .await
                .unwrap();
        let t = text(&out);
        assert!(out.status.success(), "{t}");
        let rows = manifest(&dir.path().join("keys"));
        for r in &rows {
            assert_eq!(r["status"], "failed", "{r}");
            let (code, message) = (r["code"].as_str().unwrap(), r["message"].as_str().unwrap());
            if r["provider"] == "aliyun" {
                assert_eq!(code, "InvalidAccessKeySecret", "{r}");
                assert!(
                    message.contains("ALIBABA_CLOUD_ACCESS_KEY_SECRET"),
                    "{message}"
                );
            } else {
                assert_eq!(code, "171", "{r}");
                assert!(message.contains("UCLOUD_PRIVATE_KEY"), "{message}");
            }
        }
        let manifest_text =
            std::fs::read_to_string(dir.path().join("keys/manifest.jsonl")).unwrap();
        for shown in [t.as_str(), manifest_text.as_str()] {
            assert!(!shown.contains(secret), "the secret was printed");
        }
        let (_, log) = cloud.stop();
        assert!(!log.contains(secret));
        // Nothing was registered in the cloud.
        let cloud = Server::start(
            dir.path(),
            &["--state", dir.path().join("cloud.redb").to_str().unwrap()],
        );
        assert!(cloud_pairs(&cloud.client(), "aliyun").await.is_empty());
        cloud.stop();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_upstream_rate_limit_holds_per_account_and_region() {
    tokio::time::timeout(Duration::from_secs(300), async {
        let dir = tempfile::tempdir().unwrap();
        let cloud = Server::start(
            dir.path(),
            &["--state", dir.path().join("cloud.redb").to_str().unwrap()],
        );
        let file = batch(dir.path(), 30, 0);
        let d = dir.path().to_owned();
        let addr = cloud.addr.clone();
        let started = Instant::now();
        let out = tokio::task::spawn_blocking(move || {
            run_against(
                &d,
                &addr,
                &file,
                "keys",
                &["--upstream-rps", "5", "--upstream-burst", "1"],
                "testsecret",
            )
        })
        .await
        .unwrap();
        let elapsed = started.elapsed();
        assert!(out.status.success(), "{}", text(&out));
        let metrics = cloud.metrics().await;
        let imports: f64 = metrics
            .lines()
            .filter(|l| {
                l.starts_with("keyfleet_api_requests_total")
                    && l.contains("action=\"ImportKeyPair\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(imports, 30.0, "{metrics}");
        // 30 calls at 5 per second after a burst of 1: at least 29 / 5 s.
        assert!(
            elapsed >= Duration::from_secs_f64(29.0 / 5.0),
            "{elapsed:?}"
        );
        cloud.stop();
    })
    .await
    .expect("test timed out");
}

/// `keyfleet run` SIGKILLed mid-batch, then run again: keys registered by the dead run whose
/// private halves never reached a key file are replaced in the cloud, and in the end the cloud
/// holds exactly the keys of the key files on disk.
#[tokio::test(flavor = "multi_thread")]
async fn run_killed_mid_batch_then_rerun_cloud_holds_exactly_the_delivered_keys() {
    tokio::time::timeout(Duration::from_secs(600), async {
        let dir = tempfile::tempdir().unwrap();
        let cloud = Server::start(
            dir.path(),
            &[
                "--fault-rate",
                "0.1",
                "--throttle-rps",
                "15",
                "--quota",
                "1000",
                "--state",
                dir.path().join("cloud.redb").to_str().unwrap(),
            ],
        );
        let file = batch(dir.path(), 80, 40);
        let command = |d: &std::path::Path| {
            let mut c = keyfleet(d);
            c.args(["run", "--threads", "2", "--state"])
                .arg(d.join("keys.redb"))
                .arg("--out")
                .arg(d.join("keys"))
                .arg(&file);
            cloud
                .as_cloud_of(&mut c)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            c
        };
        // Six runs killed at different moments: some keys are registered in the cloud but
        // never written to a key file, which the next run must replace there.
        for ms in [700, 1300, 2100, 900, 1700, 3300] {
            let mut run = command(dir.path()).spawn().unwrap();
            tokio::time::sleep(Duration::from_millis(ms)).await;
            run.kill().unwrap();
            run.wait().unwrap();
        }
        let second = command(dir.path())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
            .wait_with_output()
            .unwrap();
        assert!(second.status.success());
        // Which rows each run did not create, for the messages below.
        let report = {
            let mut lines = Vec::new();
            for entry in std::fs::read_dir(dir.path().join("keys")).unwrap() {
                let path = entry.unwrap().path();
                let is_manifest = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("manifest"));
                if is_manifest {
                    for line in std::fs::read_to_string(&path).unwrap().lines() {
                        if !line.contains("\"created\"") {
                            lines.push(format!("{}: {line}", path.display()));
                        }
                    }
                }
            }
            lines.join("\n")
        };
        let c = cloud.client();
        let mut on_disk = 0;
        for (provider, owner, region) in [
            ("aliyun", "acme", "cn-hangzhou"),
            ("ucloud", "org-acme", "cn-bj2"),
        ] {
            let held = cloud_pairs(&c, provider).await;
            let folder = dir
                .path()
                .join("keys")
                .join(provider)
                .join(owner)
                .join(region);
            let mut files = BTreeMap::new();
            for entry in std::fs::read_dir(&folder).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "pem") {
                    let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
                    let (md5, _) = keyfleet::keys::keygen::fingerprints_of_pem(
                        &std::fs::read_to_string(&path).unwrap(),
                    )
                    .unwrap();
                    files.insert(name, md5);
                }
            }
            on_disk += files.len();
            assert_eq!(
                held.keys().collect::<Vec<_>>(),
                files.keys().collect::<Vec<_>>(),
                "{provider}: the cloud holds a pair for exactly the key files\n{report}"
            );
            for (name, (id, fp)) in &held {
                let pub_line = {
                    let pem = folder.join(format!("{name}.pem"));
                    crate::util::tool("ssh-keygen", &["-y", "-f", pem.to_str().unwrap()])
                        .trim()
                        .to_owned()
                };
                let expected = if provider == "aliyun" {
                    files[name].clone()
                } else {
                    keyfleet::dialect::ucloud::fingerprint(owner, id, &pub_line)
                };
                assert_eq!(
                    fp, &expected,
                    "{provider} {name}: the cloud's key is the key file's\n{report}"
                );
            }
        }
        assert_eq!(
            on_disk, 120,
            "every row ends with its key delivered\n{report}"
        );
        cloud.stop();
    })
    .await
    .expect("test timed out");
}

/// A name the cloud already holds with a key keyfleet never made answers AlreadyExist, and the
/// cloud's key is left alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_name_taken_in_the_cloud_by_another_key_is_left_alone() {
    tokio::time::timeout(Duration::from_secs(300), async {
        let dir = tempfile::tempdir().unwrap();
        let cloud = Server::start(
            dir.path(),
            &["--state", dir.path().join("cloud.redb").to_str().unwrap()],
        );
        let c = cloud.client();
        let theirs =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
        let r = c
            .call(
                &rpc(),
                "ImportKeyPair",
                &[
                    ("RegionId", "cn-hangzhou"),
                    ("KeyPairName", "a-001"),
                    ("PublicKeyBody", theirs),
                ],
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let file = batch(dir.path(), 3, 0);
        let d = dir.path().to_owned();
        let addr = cloud.addr.clone();
        let out = tokio::task::spawn_blocking(move || {
            run_against(&d, &addr, &file, "keys", &[], "testsecret")
        })
        .await
        .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let rows = manifest(&dir.path().join("keys"));
        let taken = rows.iter().find(|r| r["key_pair_name"] == "a-001").unwrap();
        assert_eq!(taken["code"], "KeyPair.AlreadyExist", "{taken}");
        assert_eq!(rows.iter().filter(|r| r["status"] == "created").count(), 2);
        let held = cloud_pairs(&c, "aliyun").await;
        assert_eq!(
            held["a-001"].1, "65:96:2d:fc:e8:d5:a9:11:64:0c:0f:ea:00:6e:5b:bd",
            "their key stays"
        );
        assert_eq!(held.len(), 3);
        // keyfleet's own registry did not keep the name: the quota slot is free again.
        let out = keyfleet(dir.path())
            .args(["describe", "--json", "--state"])
            .arg(dir.path().join("keys.redb"))
            .output()
            .unwrap();
        assert!(!text(&out).contains("a-001"), "{}", text(&out));
        cloud.stop();
    })
    .await
    .expect("test timed out");
}

/// `keyfleet reconcile` lists the drift; `keyfleet delete` with an endpoint deletes in the
/// cloud too.
#[tokio::test(flavor = "multi_thread")]
async fn reconcile_lists_drift_and_delete_reaches_the_cloud() {
    tokio::time::timeout(Duration::from_secs(300), async {
        let dir = tempfile::tempdir().unwrap();
        let cloud = Server::start(
            dir.path(),
            &["--state", dir.path().join("cloud.redb").to_str().unwrap()],
        );
        let file = batch(dir.path(), 4, 0);
        let (d, addr) = (dir.path().to_owned(), cloud.addr.clone());
        let out = tokio::task::spawn_blocking(move || {
            run_against(&d, &addr, &file, "keys", &[], "testsecret")
        })
        .await
        .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let endpoint = format!("aliyun=http://{}", cloud.addr);
        let with_cloud = |cmd: &str, extra: &[&str]| {
            keyfleet(dir.path())
                .args([
                    cmd,
                    "--provider",
                    "aliyun",
                    "--owner",
                    "acme",
                    "--region",
                    "cn-hangzhou",
                    "--state",
                ])
                .arg(dir.path().join("keys.redb"))
                .args(["--upstream-endpoint", &endpoint])
                .args(extra)
                .env("ALIBABA_CLOUD_ACCESS_KEY_ID", "testid")
                .env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "testsecret")
                .output()
                .unwrap()
        };
        let drift = |o: &std::process::Output| -> serde_json::Value {
            serde_json::from_slice(&o.stdout).unwrap_or_default()
        };
        let o = with_cloud("reconcile", &["--json"]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        assert_eq!(drift(&o)["in_both"], 4);
        // Drift: a pair made in the cloud by someone else, one deleted from keyfleet only.
        let theirs =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
        let r = cloud
            .client()
            .call(
                &rpc(),
                "ImportKeyPair",
                &[
                    ("RegionId", "cn-hangzhou"),
                    ("KeyPairName", "theirs"),
                    ("PublicKeyBody", theirs),
                ],
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        let o = keyfleet(dir.path())
            .args([
                "delete",
                "--provider",
                "aliyun",
                "--owner",
                "acme",
                "--region",
                "cn-hangzhou",
                "--state",
            ])
            .arg(dir.path().join("keys.redb"))
            .arg("a-001")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let o = with_cloud("reconcile", &["--json"]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let d = drift(&o);
        assert_eq!(d["in_cloud_only"], serde_json::json!(["a-001", "theirs"]));
        assert_eq!(d["in_keyfleet_only"], serde_json::json!([]));
        assert_eq!(d["in_both"], 3);
        // Delete with the endpoint: gone from both.
        let o = with_cloud("delete", &["a-000", "a-001"]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            text(&o).contains("deleted a-000 (and in the cloud)"),
            "{}",
            text(&o)
        );
        let o = with_cloud("reconcile", &["--json"]);
        let d = drift(&o);
        assert_eq!(d["in_cloud_only"], serde_json::json!(["theirs"]));
        assert_eq!(d["in_both"], 2);
        cloud.stop();
    })
    .await
    .expect("test timed out");
}

/// The config file's `[upstream.<provider>] endpoint` is used when the command line names
/// none; a bad one is refused at start with the setting named.
#[tokio::test(flavor = "multi_thread")]
async fn the_config_file_names_the_endpoint() {
    tokio::time::timeout(Duration::from_secs(300), async {
        let dir = tempfile::tempdir().unwrap();
        let cloud = Server::start(
            dir.path(),
            &["--state", dir.path().join("cloud.redb").to_str().unwrap()],
        );
        let file = batch(dir.path(), 2, 0);
        let config = dir.path().join("keyfleet.toml");
        std::fs::write(
            &config,
            format!("[upstream.aliyun]\nendpoint = \"http://{}\"\n", cloud.addr),
        )
        .unwrap();
        let run = |config: &std::path::Path| {
            keyfleet(dir.path())
                .arg("--config")
                .arg(config)
                .args(["run", "--state"])
                .arg(dir.path().join("k.redb"))
                .arg("--out")
                .arg(dir.path().join("keys"))
                .arg(&file)
                .env("ALIBABA_CLOUD_ACCESS_KEY_ID", "testid")
                .env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "testsecret")
                .output()
                .unwrap()
        };
        let out = run(&config);
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(cloud_pairs(&cloud.client(), "aliyun").await.len(), 2);
        std::fs::write(&config, "[upstream.aliyun]\nendpoint = \"ftp://x\"\n").unwrap();
        let out = run(&config);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(
            text(&out).contains("upstream.aliyun.endpoint"),
            "{}",
            text(&out)
        );
        cloud.stop();
    })
    .await
    .expect("test timed out");
}

/// `keyfleet serve --upstream-endpoint …` in front of a cloud: creates (from its reservoir),
/// imports and deletes reach the cloud; what the front answers is what the cloud holds.
#[tokio::test(flavor = "multi_thread")]
async fn serve_in_front_of_a_cloud_registers_there() {
    tokio::time::timeout(Duration::from_secs(300), async {
        let cloud_dir = tempfile::tempdir().unwrap();
        let cloud = Server::start(cloud_dir.path(), &[]);
        let dir = tempfile::tempdir().unwrap();
        let upstream_creds = crate::util::serve::credentials(dir.path());
        let a = format!("aliyun=http://{}", cloud.addr);
        let u = format!("ucloud=http://{}", cloud.addr);
        let front = Server::start(
            dir.path(),
            &[
                "--upstream-endpoint",
                &a,
                "--upstream-endpoint",
                &u,
                "--upstream-credentials",
                upstream_creds.to_str().unwrap(),
            ],
        );
        let f = front.client();
        let r = f
            .call(
                &rpc(),
                "CreateKeyPair",
                &[("RegionId", "cn-hangzhou"), ("KeyPairName", "front-1")],
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let fp = r.json()["KeyPairFingerPrint"].as_str().unwrap().to_owned();
        let r = f
            .call(
                &ucloud(),
                "CreateUHostKeyPair",
                &[("KeyPairName", "front-u")],
            )
            .await
            .unwrap();
        assert_eq!(r.json()["RetCode"], 0, "{}", r.body);
        let (uid, ufp) = (
            r.json()["KeyPair"]["KeyPairId"]
                .as_str()
                .unwrap()
                .to_owned(),
            r.json()["KeyPair"]["KeyPairFingerPrint"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
        let theirs =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
        let r = f
            .call(
                &rpc(),
                "ImportKeyPair",
                &[
                    ("RegionId", "cn-hangzhou"),
                    ("KeyPairName", "front-imp"),
                    ("PublicKeyBody", theirs),
                ],
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let c = cloud.client();
        let held = cloud_pairs(&c, "aliyun").await;
        assert_eq!(held["front-1"].1, fp);
        assert_eq!(
            held["front-imp"].1,
            "65:96:2d:fc:e8:d5:a9:11:64:0c:0f:ea:00:6e:5b:bd"
        );
        let held_u = cloud_pairs(&c, "ucloud").await;
        assert_eq!(
            held_u["front-u"],
            (uid, ufp),
            "the front answers with the cloud's KeyPairId"
        );
        let r = f
            .call(
                &rpc(),
                "DeleteKeyPairs",
                &[
                    ("RegionId", "cn-hangzhou"),
                    ("KeyPairNames", "[\"front-1\"]"),
                ],
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let held = cloud_pairs(&c, "aliyun").await;
        assert!(!held.contains_key("front-1") && held.contains_key("front-imp"));
        // A name the cloud has under another key: the front answers as the cloud would.
        let r = c
            .call(
                &rpc(),
                "ImportKeyPair",
                &[
                    ("RegionId", "cn-hangzhou"),
                    ("KeyPairName", "clash"),
                    ("PublicKeyBody", theirs),
                ],
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        let r = f
            .call(
                &rpc(),
                "CreateKeyPair",
                &[("RegionId", "cn-hangzhou"), ("KeyPairName", "clash")],
            )
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.json()["Code"].as_str().unwrap()),
            (400, "KeyPair.AlreadyExist")
        );
        front.stop();
        cloud.stop();
    })
    .await
    .expect("test timed out");
}

/// Two `serve` instances in front of one cloud, on one Redis, at `--upstream-rps 5
/// --upstream-burst 1` each, against a cloud that throttles above 5 calls a second: the budget
/// is theirs together, so the cloud throttles nothing (each on its own would send up to 10).
#[tokio::test(flavor = "multi_thread")]
async fn fronts_on_one_redis_share_the_upstream_budget() {
    tokio::time::timeout(Duration::from_secs(300), async {
        let cloud_dir = tempfile::tempdir().unwrap();
        let cloud = Server::start(cloud_dir.path(), &["--throttle-rps", "5"]);
        let redis_url = std::env::var("KEYFLEET_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let prefix = format!("kf-test-{}", uuid::Uuid::new_v4().simple());
        let endpoint = format!("aliyun=http://{}", cloud.addr);
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let fronts: Vec<Server> = dirs
            .iter()
            .map(|d| {
                let creds = crate::util::serve::credentials(d.path());
                Server::start(
                    d.path(),
                    &[
                        "--redis-url",
                        &redis_url,
                        "--prefix",
                        &prefix,
                        "--upstream-endpoint",
                        &endpoint,
                        "--upstream-credentials",
                        creds.to_str().unwrap(),
                        "--upstream-rps",
                        "5",
                        "--upstream-burst",
                        "1",
                    ],
                )
            })
            .collect();
        let creates = (0..24).map(|i| {
            let client = fronts[i % 2].client();
            async move {
                let name = format!("shared-{i:02}");
                let r = crate::util::serve::create_in_hangzhou(&client, &name).await;
                assert_eq!(r.status, 200, "{name}: {}", r.body);
            }
        });
        futures::future::join_all(creates).await;
        let metrics = cloud.metrics().await;
        assert_eq!(answered(&metrics, "Throttling.User"), 0, "{metrics}");
        assert_eq!(cloud_pairs(&cloud.client(), "aliyun").await.len(), 24);
        for front in fronts {
            front.stop();
        }
        cloud.stop();
        // This test's keys in Redis.
        let client = redis::Client::open(redis_url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: i64 = redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    })
    .await
    .expect("test timed out");
}
