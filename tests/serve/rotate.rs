//! `keyfleet rotate` and `retire` against a cloud: `keyfleet serve` with injected faults and
//! throttling. Rotate and retire are SIGKILLed mid-way and run again; in the end the cloud
//! and the registry hold exactly the successors, with the keys of their key files, and the
//! quota is where it was before the rotation.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::cloud::{assert_exactly_the_successors, kill_when, pem_count};
use crate::util::serve::Server;
use crate::util::{keyfleet, text};
use keyfleet::dialect::Provider;
use keyfleet::registry::embedded::EmbeddedRegistry;
use keyfleet::registry::Registry;

const ALIYUN: usize = 200;
const UCLOUD: usize = 100;

fn against(cloud: &Server, mut c: Command) -> Command {
    cloud.as_cloud_of(&mut c);
    c
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
        let counts = [(Provider::Aliyun, ALIYUN), (Provider::Ucloud, UCLOUD)];
        assert_exactly_the_successors(&registry, &cloud.client(), &keys, counts).await;
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
