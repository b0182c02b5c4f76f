//! `keyfleet rotate` and `retire` against a cloud: `keyfleet serve` with injected faults and
//! throttling. Rotate and retire are SIGKILLed mid-way and run again; in the end the cloud
//! and the registry hold exactly the successors, with the keys of their key files, and the
//! quota is where it was before the rotation.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::upstream::cloud_pairs;
use crate::util::serve::Server;
use crate::util::{keyfleet, text};
use keyfleet::dialect::{Provider, Scope};
use keyfleet::registry::embedded::EmbeddedRegistry;
use keyfleet::registry::{Filter, Registry};

const ALIYUN: usize = 200;
const UCLOUD: usize = 100;

fn against(cloud: &Server, mut c: Command) -> Command {
    cloud.as_cloud_of(&mut c);
    c
}

fn pem_count(dir: &Path) -> usize {
    fn walk(p: &Path, n: &mut usize) {
        let Ok(entries) = std::fs::read_dir(p) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, n);
            } else if path.extension().is_some_and(|x| x == "pem") {
                *n += 1;
            }
        }
    }
    let mut n = 0;
    walk(dir, &mut n);
    n
}

/// The key files under `folder`: name → MD5 fingerprint of the key.
fn key_files(folder: &Path) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(folder).unwrap() {
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
    files
}

/// Starts `command`, and SIGKILLs it once `ready` holds; `false` when it ended by itself
/// first.
fn kill_when(mut command: Command, ready: impl Fn() -> bool) -> bool {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(300) && !ready() {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    true
}

/// The issue's end-to-end case: 300 pairs on both clouds, rotated through a cloud that fails
/// a fifth of its calls and throttles at 20 per second, `rotate` SIGKILLed twice mid-way and
/// `retire` once.
#[tokio::test(flavor = "multi_thread")]
async fn rotation_killed_mid_way_then_rerun_and_retired_leaves_exactly_the_successors_everywhere() {
    tokio::time::timeout(Duration::from_secs(900), async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_owned();
        let cloud = Server::start(
            &d,
            &[
                "--fault-rate",
                "0.2",
                "--throttle-rps",
                "20",
                "--state",
                d.join("cloud.redb").to_str().unwrap(),
            ],
        );
        let mut csv =
            String::from("Provider,Owner,RegionId,KeyPairName,Tag.1.Key,Tag.1.Value,Region\n");
        for i in 0..ALIYUN {
            csv.push_str(&format!("aliyun,acme,cn-hangzhou,web-{i:03},env,prod,\n"));
        }
        for i in 0..UCLOUD {
            csv.push_str(&format!("ucloud,org-acme,,web-{i:03},,,cn-bj2\n"));
        }
        std::fs::write(d.join("fleet.csv"), csv).unwrap();
        let state = d.join("keyfleet.redb");
        let kf = |args: &[&str]| {
            let mut c = keyfleet(&d);
            c.args(args).arg("--state").arg(&state);
            against(&cloud, c)
        };
        let out = kf(&["run", "fleet.csv", "--out", "keys0", "--progress", "off"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));

        let rotate_args = [
            "rotate",
            "--name",
            "web-*",
            "--successor",
            "{name}-r",
            "--rotation-id",
            "rot-fleet",
            "--out",
            "keys",
            "--threads",
            "2",
            "--progress",
            "off",
        ];
        let keys = d.join("keys");
        for at in [40, 160] {
            assert!(
                kill_when(kf(&rotate_args), || pem_count(&keys) >= at),
                "rotate was to be killed mid-way, at {at} key files, but it ended first"
            );
        }
        let out = kf(&rotate_args).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let report = text(&out);
        assert!(
            report.contains("replaced 300, delivered 300, retired 0"),
            "{report}"
        );
        // This run resumed the rotation the killed runs recorded (the same members, names and
        // job ids), and delivered what they left.
        assert!(report.contains("rotation rot-fleet (resumed)"), "{report}");

        // Killed once mid-way, then again until it has retired every replaced pair.
        let mut retire = kf(&["retire", "rot-fleet"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        retire.kill().unwrap();
        retire.wait().unwrap();
        let mut tries = 0;
        let retired = loop {
            let out = kf(&["retire", "rot-fleet"]).output().unwrap();
            tries += 1;
            if out.status.success() || tries == 5 {
                break text(&out);
            }
        };
        assert!(
            retired.contains("retired 300, failed 0, pending 0"),
            "{retired}"
        );

        let registry = EmbeddedRegistry::open(&state).unwrap();
        let c = cloud.client();
        for (provider, owner, region, n) in [
            (Provider::Aliyun, "acme", "cn-hangzhou", ALIYUN),
            (Provider::Ucloud, "org-acme", "cn-bj2", UCLOUD),
        ] {
            let scope = Scope {
                provider,
                owner: owner.into(),
                region: region.into(),
            };
            let held = cloud_pairs(&c, provider.as_str()).await;
            let files = key_files(&keys.join(provider.as_str()).join(owner).join(region));
            let ours: BTreeMap<String, _> = registry
                .describe(&Filter {
                    provider: Some(provider),
                    owner: Some(owner.into()),
                    region: Some(region.into()),
                    ..Filter::default()
                })
                .await
                .unwrap()
                .into_iter()
                .map(|r| (r.name.clone(), r))
                .collect();
            let successors: Vec<String> = (0..n).map(|i| format!("web-{i:03}-r")).collect();
            assert_eq!(
                held.keys().cloned().collect::<Vec<_>>(),
                successors,
                "{provider}: the cloud holds exactly the successors"
            );
            assert_eq!(
                ours.keys().cloned().collect::<Vec<_>>(),
                successors,
                "{provider}: so does the registry"
            );
            assert_eq!(
                files.keys().cloned().collect::<Vec<_>>(),
                successors,
                "{provider}: one key file each"
            );
            for name in &successors {
                let record = &ours[name];
                assert_eq!(
                    files[name], record.fingerprint_md5,
                    "{name}: key file = registry"
                );
                assert_eq!(
                    held[name].1, record.key_pair_fingerprint,
                    "{name}: cloud = registry"
                );
                if provider == Provider::Aliyun {
                    assert_eq!(
                        record.tags.len(),
                        1,
                        "{name}: tagged as the pair it replaced"
                    );
                }
            }
            assert_eq!(
                registry.quota_used(&scope).await.unwrap(),
                n as u64,
                "{provider}: quota back where it was"
            );
        }
        cloud.stop();
    })
    .await
    .expect("test timed out");
}

/// A pair retired in keyfleet's registry alone (retire run without the cloud's endpoint) is
/// still in the cloud: `reconcile` names it as a retired pair, apart from strangers, and
/// `delete` with the endpoint clears it.
#[tokio::test(flavor = "multi_thread")]
async fn reconcile_names_a_retired_pair_still_in_the_cloud() {
    tokio::time::timeout(Duration::from_secs(300), async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_owned();
        let cloud = Server::start(&d, &["--state", d.join("cloud.redb").to_str().unwrap()]);
        std::fs::write(
            d.join("fleet.csv"),
            "RegionId,KeyPairName\ncn-hangzhou,web-1\ncn-hangzhou,web-2\n",
        )
        .unwrap();
        let state = d.join("keyfleet.redb");
        let plain = |args: &[&str]| {
            let mut c = keyfleet(&d);
            c.args(args).arg("--state").arg(&state);
            c
        };
        let kf = |args: &[&str]| against(&cloud, plain(args));
        for c in [
            kf(&["run", "fleet.csv", "--owner", "acme", "--out", "keys0"]),
            kf(&[
                "rotate",
                "--name",
                "web-*",
                "--successor",
                "{name}-r",
                "--out",
                "keys",
            ]),
        ] {
            let out = { c }.output().unwrap();
            assert!(out.status.success(), "{}", text(&out));
        }
        // Retired in the registry only.
        let rotation = {
            let registry = EmbeddedRegistry::open(&state).unwrap();
            let all = registry.rotations().await.unwrap();
            assert_eq!(all.len(), 1);
            all[0].id.clone()
        };
        let out = plain(&["retire", &rotation]).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let reconcile = || {
            kf(&[
                "reconcile",
                "--owner",
                "acme",
                "--region",
                "cn-hangzhou",
                "--json",
            ])
            .output()
            .unwrap()
        };
        let out = reconcile();
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let drift: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {}", text(&out)));
        assert_eq!(
            drift["retired_still_in_cloud"],
            serde_json::json!(["web-1", "web-2"])
        );
        assert_eq!(drift["in_cloud_only"], serde_json::json!([]));
        assert_eq!(drift["in_both"], 2);
        let out = kf(&[
            "delete",
            "--owner",
            "acme",
            "--region",
            "cn-hangzhou",
            "web-1",
            "web-2",
        ])
        .output()
        .unwrap();
        assert!(
            text(&out).contains("deleted web-1 (and in the cloud)"),
            "{}",
            text(&out)
        );
        let out = reconcile();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        cloud.stop();
    })
    .await
    .expect("test timed out");
}
