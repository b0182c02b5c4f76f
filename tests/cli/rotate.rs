//! `keyfleet rotate`, `retire` and `status ROT-ID` on the embedded store, through the binary:
//! one successor per selected pair with the pair's tags, a manifest that names the replaced
//! pair, reruns that change nothing, retirement that deletes only replaced pairs whose
//! successors are delivered, and the quota headroom at a region with 400 of its 500 used.

use std::collections::BTreeMap;
use std::path::Path;

use crate::util::{checked_public_key, keyfleet, manifest, md5_fingerprint, text};
use keyfleet::dialect::record::KeyPairRecord;
use keyfleet::dialect::{Provider, Scope};
use keyfleet::registry::embedded::EmbeddedRegistry;
use keyfleet::registry::{Filter, Registry};

/// `keyfleet <args>` in `dir`, with its exit code and output.
fn kf(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = keyfleet(dir)
        .args(args)
        .args(["--state", "keyfleet.redb"])
        .output()
        .unwrap();
    (out.status.code(), text(&out))
}

/// The state file, opened in this process. Another test's child process, forked from this
/// process while it held the file open a moment ago, holds that lock until it execs: such a
/// refusal is tried again.
fn open(dir: &Path) -> EmbeddedRegistry {
    let mut tries = 0;
    loop {
        match EmbeddedRegistry::open(&dir.join("keyfleet.redb")) {
            Ok(r) => return r,
            Err(e) if tries == 200 => panic!("opening the state file: {e}"),
            Err(_) => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

/// Every pair in the registry, by name (the registry file is closed again before returning).
fn pairs(dir: &Path) -> BTreeMap<String, KeyPairRecord> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let registry = open(dir);
        registry
            .describe(&Filter::default())
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect()
    })
}

fn quota_used(dir: &Path, scope: &Scope) -> u64 {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let registry = open(dir);
        registry.quota_used(scope).await.unwrap()
    })
}

fn hangzhou(owner: &str) -> Scope {
    Scope {
        provider: Provider::Aliyun,
        owner: owner.into(),
        region: "cn-hangzhou".into(),
    }
}

/// A fleet of web pairs on both clouds (tags on the Alibaba ones) and a pair no selection
/// below matches.
fn fleet(dir: &Path) {
    let mut csv =
        String::from("Provider,Owner,RegionId,KeyPairName,Tag.1.Key,Tag.1.Value,Region,Zone\n");
    for i in 0..6 {
        csv.push_str(&format!("aliyun,acme,cn-hangzhou,web-{i:02},env,prod,,\n"));
    }
    for i in 0..3 {
        csv.push_str(&format!("ucloud,org-acme,,web-u{i},,,cn-bj2,cn-bj2-02\n"));
    }
    csv.push_str("aliyun,acme,cn-hangzhou,db-01,env,prod,,\n");
    std::fs::write(dir.join("fleet.csv"), csv).unwrap();
    let (code, out) = kf(
        dir,
        &["run", "fleet.csv", "--out", "keys0", "--progress", "off"],
    );
    assert_eq!(code, Some(0), "{out}");
}

#[test]
fn rotation_gives_each_selected_pair_one_successor_that_names_it_and_a_rerun_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fleet(d);
    let before = pairs(d);
    let args = [
        "rotate",
        "--name",
        "web-*",
        "--successor",
        "{name}-next",
        "--out",
        "keys",
        "--progress",
        "off",
        "--rotation-id",
        "rot-q4",
    ];
    let (code, out) = kf(d, &args);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("replaced 9, delivered 9, retired 0"), "{out}");

    let after = pairs(d);
    let lines = manifest(&d.join("keys"));
    assert_eq!(lines.len(), 9, "{lines:?}");
    for line in &lines {
        assert_eq!(line["status"], "created", "{line}");
        assert_eq!(line["rotation_id"], "rot-q4");
        let name = line["key_pair_name"].as_str().unwrap();
        let replaced = line["replaces"]["name"].as_str().unwrap();
        assert_eq!(name, format!("{replaced}-next"));
        // The manifest names the replaced pair by the fingerprints it was registered with.
        let p = &before[replaced];
        assert_eq!(
            line["replaces"]["fingerprint_sha256"],
            *p.fingerprint_sha256
        );
        assert_eq!(
            line["replaces"]["key_pair_fingerprint"],
            *p.key_pair_fingerprint
        );
        // The successor's key file holds the key the registry holds for it.
        let s = &after[name];
        let pem = Path::new(line["private_key_file"].as_str().unwrap());
        let pem = d.join(pem);
        let public = checked_public_key(&pem);
        assert_eq!(md5_fingerprint(&public, &pem), s.fingerprint_md5, "{name}");
        assert_eq!(s.public_key, public, "{name}");
        assert_eq!(
            line["authorized_keys"].as_str().unwrap(),
            format!("{public} {name}")
        );
        // Where the replaced pair is, tagged alike.
        assert_eq!((&s.scope, &s.tags, &s.zone), (&p.scope, &p.tags, &p.zone));
        assert!(s.delivered);
    }
    // Nothing replaced yet: both generations are there, and db-01 was not selected.
    assert_eq!(after.len(), 19);
    assert!(!after.contains_key("db-01-next"));

    let manifest_before = std::fs::read(d.join("keys/manifest.jsonl")).unwrap();
    let (code, out) = kf(d, &args);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("rotation rot-q4 is finished: nothing changed"),
        "{out}"
    );
    assert_eq!(
        pairs(d),
        after,
        "a rerun of a finished rotation changes nothing"
    );
    assert_eq!(
        std::fs::read(d.join("keys/manifest.jsonl")).unwrap(),
        manifest_before
    );

    let (code, out) = kf(d, &["status", "rot-q4", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let status: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(
        (
            &status["replaced"],
            &status["delivered"],
            &status["retired"]
        ),
        (&9.into(), &9.into(), &0.into()),
        "{out}"
    );

    let (code, out) = kf(d, &["retire", "rot-q4"]);
    assert_eq!(code, Some(0), "{out}");
    let retired = pairs(d);
    let names: Vec<&str> = retired.keys().map(String::as_str).collect();
    let mut expected: Vec<String> = before
        .keys()
        .filter(|n| n.starts_with("web-"))
        .map(|n| format!("{n}-next"))
        .collect();
    expected.push("db-01".into());
    expected.sort();
    assert_eq!(names, expected, "only the replaced pairs are gone");
    assert_eq!(quota_used(d, &hangzhou("acme")), 7, "their quota is back");
    let (code, out) = kf(d, &["retire", "rot-q4"]);
    assert_eq!(
        (code, out.contains("retired 0 replaced")),
        (Some(0), true),
        "{out}"
    );
}

#[test]
fn a_successor_of_an_unfinished_rotation_is_not_rotated_again_and_a_taken_name_is_already_exist() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fleet(d);
    let rotate = |id: &str, name: &str| {
        kf(
            d,
            &[
                "rotate",
                "--provider",
                "aliyun",
                "--name",
                name,
                "--successor",
                "new-{name}",
                "--out",
                &format!("keys-{id}"),
                "--progress",
                "off",
                "--rotation-id",
                id,
            ],
        )
    };
    // new-web-05 is taken by a pair of its own before the rotation starts.
    std::fs::write(
        d.join("taken.csv"),
        "RegionId,KeyPairName\ncn-hangzhou,new-web-05\n",
    )
    .unwrap();
    let (code, out) = kf(
        d,
        &[
            "run",
            "taken.csv",
            "--owner",
            "acme",
            "--out",
            "keys-taken",
            "--progress",
            "off",
        ],
    );
    assert_eq!(code, Some(0), "{out}");
    let taken = pairs(d)["new-web-05"].clone();
    let (code, out) = rotate("rot-a", "web-*");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("replaced 6, delivered 5,"), "{out}");
    let lines = manifest(&d.join("keys-rot-a"));
    let failed: Vec<_> = lines.iter().filter(|l| l["status"] != "created").collect();
    assert_eq!(failed.len(), 1, "{lines:?}");
    assert_eq!(failed[0]["code"], "KeyPair.AlreadyExist");
    assert_eq!(failed[0]["replaces"]["name"], "web-05");
    assert_eq!(
        pairs(d)["new-web-05"],
        taken,
        "the taken name keeps its own key"
    );

    // rot-a is unfinished (nothing retired): neither its pairs nor its successors are rotated
    // again, though `*web-*` matches them all.
    let (code, out) = rotate("rot-b", "*web-*");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("nothing to rotate"), "{out}");
    assert!(!d.join("keys-rot-b").exists());

    let (code, out) = kf(d, &["retire", "rot-a"]);
    // web-05's successor was not delivered: web-05 stays, and retire says the rotation is not
    // finished.
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("retired 5 replaced pair(s)"), "{out}");
    let left = pairs(d);
    assert!(left.contains_key("web-05") && !left.contains_key("web-00"));
    let (code, out) = kf(d, &["status", "rot-a"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("replaced 6, delivered 5, retired 5, failed 1")
            && out.contains("failed KeyPair.AlreadyExist: 1"),
        "{out}"
    );
}

#[test]
fn a_template_that_makes_invalid_names_exits_2_before_anything_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fleet(d);
    let before = pairs(d);
    for template in ["{name}/{yyyymmdd}", "{name}-{date}", "fixed"] {
        let (code, out) = kf(
            d,
            &[
                "rotate",
                "--name",
                "web-*",
                "--successor",
                template,
                "--out",
                "keys",
            ],
        );
        assert_eq!(code, Some(2), "{template}: {out}");
        assert!(out.contains("--successor"), "{out}");
    }
    assert_eq!(pairs(d), before);
    assert!(!d.join("keys").exists());
}

/// The quota case: 400 of a region's 500 used, all 400 rotated. Without --waves the
/// rotation reports the headroom and stops before creating anything; with it, it runs in
/// waves that retire as they go, and ends with the region exactly as full as before.
#[test]
fn rotating_400_of_500_needs_waves_and_waves_end_with_the_quota_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fill_400_of_500(d);
    let before = pairs(d);
    let scope = hangzhou("acme");
    assert_eq!(quota_used(d, &scope), 400);

    let rotate = |extra: &[&str]| {
        let mut args = vec![
            "rotate",
            "--owner",
            "acme",
            "--name",
            "host-*",
            "--out",
            "keys",
            "--progress",
            "off",
            "--json",
        ];
        args.extend_from_slice(extra);
        kf(d, &args)
    };
    let (code, out) = rotate(&[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("400 of 500 used, 100 free; 400 successor(s) to create")
            && out.contains("nothing was created")
            && out.contains("--waves"),
        "{out}"
    );
    assert_eq!(pairs(d), before, "nothing created");
    assert!(!d.join("keys").exists());

    let (code, out) = rotate(&["--waves"]);
    assert_eq!(code, Some(0), "{out}");
    let summary: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(summary["waves"], 4, "{out}");
    assert_eq!(summary["retired"], 400, "{out}");
    assert_eq!(summary["created"], 400, "{out}");
    let after = pairs(d);
    assert_eq!(after.len(), 400);
    assert!(
        after.keys().all(|n| !before.contains_key(n)),
        "every host-NNN is gone"
    );
    assert_eq!(quota_used(d, &scope), 400, "the quota is back where it was");
    assert_eq!(manifest(&d.join("keys")).len(), 400);

    // Finished: a rerun changes nothing and says so.
    let (code, out) = rotate(&["--waves"]);
    assert_eq!(code, Some(0), "{out}");
    let summary: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(summary["already_finished"], true, "{out}");
    assert_eq!(pairs(d), after);
}

/// `rotate --waves` SIGKILLed again and again, at any point of a wave (creating, delivering,
/// retiring): after each kill no replaced pair is gone whose successor is not delivered, and
/// the rerun finishes with exactly one successor per pair, each the key of its key file, and
/// the quota where it was.
#[test]
fn waves_killed_repeatedly_never_retire_a_pair_before_its_successor_and_finish_on_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fill_400_of_500(d);
    let originals: Vec<String> = pairs(d).into_keys().collect();
    let rotate = || {
        let mut c = keyfleet(d);
        c.args([
            "rotate",
            "--owner",
            "acme",
            "--name",
            "host-*",
            "--successor",
            "{name}-s",
        ])
        .args([
            "--out",
            "keys",
            "--waves",
            "--progress",
            "off",
            "--threads",
            "2",
        ])
        .args(["--state", "keyfleet.redb"]);
        c
    };
    let pems = || {
        let folder = d.join("keys/aliyun/acme/cn-hangzhou");
        std::fs::read_dir(folder).map_or(0, |entries| {
            entries
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "pem"))
                .count()
        })
    };
    for at in [30, 120, 150, 260, 390] {
        let mut child = rotate()
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while pems() < at && started.elapsed() < std::time::Duration::from_secs(120) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let now = pairs(d);
        for p in &originals {
            if !now.contains_key(p) {
                let s = now.get(&format!("{p}-s"));
                assert!(
                    s.is_some_and(|s| s.delivered),
                    "{p} was retired, but its successor is {s:?} (killed at {at} key files)"
                );
            }
        }
    }
    let out = rotate().output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let now = pairs(d);
    let expected: Vec<String> = originals.iter().map(|p| format!("{p}-s")).collect();
    assert_eq!(now.keys().cloned().collect::<Vec<_>>(), expected);
    let folder = d.join("keys/aliyun/acme/cn-hangzhou");
    for (name, record) in &now {
        let pem = folder.join(format!("{name}.pem"));
        let public = checked_public_key(&pem);
        assert_eq!(
            md5_fingerprint(&public, &pem),
            record.fingerprint_md5,
            "{name}"
        );
        assert!(record.delivered, "{name}");
    }
    assert_eq!(pems(), 400, "one key file per successor, nothing else");
    assert_eq!(quota_used(d, &hangzhou("acme")), 400);
    let lines = manifest(&d.join("keys"));
    assert_eq!(lines.len(), 400, "the last manifest lists every successor");
    assert!(lines.iter().all(|l| l["status"] == "created"));
}

/// `--names-file` narrows the filters to the names it lists; `--retire` deletes the replaced
/// pairs in the same run once every successor is delivered.
#[test]
fn names_file_selects_within_the_filters_and_retire_deletes_the_replaced_pairs_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fleet(d);
    std::fs::write(
        d.join("names.txt"),
        "# the two to rotate\nweb-01\n\nweb-u1\ndb-01\n",
    )
    .unwrap();
    let (code, out) = kf(
        d,
        &[
            "rotate",
            "--name",
            "web-*",
            "--names-file",
            "names.txt",
            "--out",
            "keys",
            "--retire",
            "--progress",
            "off",
        ],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("replaced 2, delivered 2, retired 2"), "{out}");
    let now = pairs(d);
    // The default template: `{name}-{yyyymmdd}`.
    let successors: Vec<String> = manifest(&d.join("keys"))
        .iter()
        .map(|l| l["key_pair_name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(successors.len(), 2);
    for (gone, successor) in ["web-01", "web-u1"].iter().zip(&successors) {
        assert!(!now.contains_key(*gone), "{gone} retired");
        let date = successor.strip_prefix(&format!("{gone}-")).unwrap_or("");
        assert!(
            date.len() == 8 && date.bytes().all(|b| b.is_ascii_digit()),
            "{successor}"
        );
        assert!(now.contains_key(successor), "{now:?}");
    }
    // db-01 is in the file but not matched by `web-*`; web-00 is matched but not in the file.
    assert!(now.contains_key("db-01") && now.contains_key("web-00"));
    assert_eq!(now.len(), 10);
}

/// A pair committed but never delivered (its run was killed before the key file) is not
/// selected: its own job replaces it on the rerun, and nobody holds its private key.
#[test]
fn an_undelivered_pair_is_not_rotated() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fleet(d);
    let scope = hangzhou("acme");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let registry = open(d);
        let job_id = uuid::Uuid::new_v4();
        registry
            .reserve(&keyfleet::registry::Claim {
                scope: &scope,
                name: "web-half",
                job_id,
                quota: 500,
                ttl_ms: 60_000,
            })
            .await
            .unwrap();
        let mut record = pairs_of(&registry, "web-00").await;
        record.name = "web-half".into();
        record.job_id = job_id;
        record.delivered = false;
        registry.commit(&record).await.unwrap();
    });
    let (code, out) = kf(
        d,
        &[
            "rotate",
            "--provider",
            "aliyun",
            "--name",
            "web-*",
            "--out",
            "keys",
            "--progress",
            "off",
        ],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("replaced 6, delivered 6"), "{out}");
    let names: Vec<_> = manifest(&d.join("keys"))
        .iter()
        .map(|l| l["replaces"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(!names.contains(&"web-half".to_owned()), "{names:?}");
}

async fn pairs_of(registry: &EmbeddedRegistry, name: &str) -> KeyPairRecord {
    registry
        .describe(&Filter {
            name: Some(name.into()),
            ..Filter::default()
        })
        .await
        .unwrap()
        .remove(0)
}

/// 400 pairs of acme in cn-hangzhou (of the default quota of 500), made by `run` in `d`.
fn fill_400_of_500(d: &Path) {
    let mut csv = String::from("RegionId,KeyPairName\n");
    for i in 0..400 {
        csv.push_str(&format!("cn-hangzhou,host-{i:03}\n"));
    }
    std::fs::write(d.join("hosts.csv"), csv).unwrap();
    let (code, out) = kf(
        d,
        &[
            "run",
            "hosts.csv",
            "--owner",
            "acme",
            "--out",
            "keys0",
            "--progress",
            "off",
        ],
    );
    assert_eq!(code, Some(0), "{out}");
}
