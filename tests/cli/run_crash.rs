//! `keyfleet run` killed at any moment and run again: every row ends with one key file whose
//! key is the registered key, and the rerun's manifest lists every row — the ones an earlier
//! run delivered too (`delivered_earlier`), which no manifest may have listed before the kill.

use std::collections::BTreeSet;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::time::Duration;

use crate::util::{keyfleet, manifest, run_batch, text, Sandbox};
use keyfleet::dialect::record::KeyPairRecord;
use keyfleet::dialect::{Provider, Scope};
use keyfleet::registry::embedded::EmbeddedRegistry;
use keyfleet::registry::{Claim, Filter, Registry};

const ROWS: usize = 600;

/// The fault from issue 13: a run SIGKILLed mid-batch left key files that no manifest listed
/// as created (the rerun answered AlreadyExist), and a kill between a key file's write and its
/// "delivered" mark made the rerun refuse that row while registering another key for it.
#[test]
fn run_killed_repeatedly_then_rerun_lists_every_row_with_its_registered_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut csv = String::from("RegionId,KeyPairName\n");
    // Two regions: the batch stays within each region's quota of 500.
    for i in 0..ROWS {
        let region = ["cn-hangzhou", "cn-beijing"][i % 2];
        csv.push_str(&format!("{region},host-{i:03}\n"));
    }
    std::fs::write(dir.path().join("f.csv"), csv).unwrap();
    let run = || {
        let mut c = keyfleet(dir.path());
        c.args(["run", "f.csv", "--out", "keys", "--owner", "acme"])
            .args(["--threads", "2", "--json", "--progress", "off"]);
        c
    };
    // Six runs, each killed once it has written about 40 more key files (plus a few
    // milliseconds that differ per run, so the kill falls at different points of a key's
    // life); each rerun goes on where the last stopped, and the last one finishes the batch.
    let pem_count = || crate::util::cloud::pem_count(&dir.path().join("keys"));
    for extra_ms in [0, 7, 3, 11, 5, 13] {
        let before = if dir.path().join("keys").exists() {
            pem_count()
        } else {
            0
        };
        let mut child = run()
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(60)
            && (!dir.path().join("keys").exists() || pem_count() < before + 40)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(extra_ms));
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let out = run().output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let made = summary["created"].as_u64().unwrap();
    let earlier = summary["delivered_earlier"].as_u64().unwrap();
    assert_eq!(made + earlier, ROWS as u64, "{summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    assert!(
        earlier > 0 && made > 0,
        "the kills fell mid-batch: {summary}"
    );

    let registry = EmbeddedRegistry::open(&dir.path().join("keyfleet.redb")).unwrap();
    let records = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(registry.describe(&Filter::default()))
        .unwrap();
    assert_eq!(records.len(), ROWS);
    let lines = manifest(&dir.path().join("keys"));
    assert_eq!(lines.len(), ROWS, "one manifest line per row");
    let mut names = BTreeSet::new();
    for line in &lines {
        assert_eq!(line["status"], "created", "{line}");
        let name = line["key_pair_name"].as_str().unwrap();
        assert!(names.insert(name.to_owned()), "{name} listed twice");
        let file = line["private_key_file"].as_str().unwrap();
        let (md5, _) = keyfleet::keys::keygen::fingerprints_of_pem(
            &std::fs::read_to_string(dir.path().join(file)).unwrap(),
        )
        .unwrap();
        let record = records.iter().find(|r| r.name == name).unwrap();
        assert!(record.delivered, "{name}");
        assert_eq!(
            md5, record.fingerprint_md5,
            "{name}: the key file is the registered key"
        );
        assert_eq!(line["fingerprint_md5"], md5.as_str(), "{name}");
        if line["delivered_earlier"] == true {
            assert_eq!(
                line["response"]["PrivateKeyBody"], file,
                "a listed-again row points at its key file"
            );
        }
    }
    let temporaries = walk(&dir.path().join("keys"))
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().ends_with(".tmp"))
        .count();
    assert_eq!(
        temporaries, 0,
        "no half-written key file of a killed run is left"
    );
    assert!(
        !std::fs::read_to_string(dir.path().join("keys/manifest.jsonl"))
            .unwrap()
            .contains("PRIVATE KEY"),
        "no key material in the manifest"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The narrowest form of the fault: the pair is committed, its key file written, and the run
/// dies before the pair is marked delivered. The rerun takes that key up (it is this job's own:
/// the registry holds it) instead of refusing the row and registering another key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_file_written_before_the_delivered_mark_is_taken_up() {
    let sb = Sandbox::new();
    let input = sb.write("f.csv", "RegionId,KeyPairName\ncn-hangzhou,web-1\n");
    let opts = sb.options(&input, "out");
    let job_id = keyfleet::job::job_id(&opts.defaults.batch_id, 2);
    let scope = Scope {
        provider: Provider::Aliyun,
        owner: "acct".into(),
        region: "cn-hangzhou".into(),
    };
    let key =
        keyfleet::keys::keygen::generate(opts.defaults.key_bits, opts.settings.engine).unwrap();
    {
        let registry = EmbeddedRegistry::open(&opts.state).unwrap();
        registry
            .reserve(&Claim {
                scope: &scope,
                name: "web-1",
                job_id,
                quota: 500,
                ttl_ms: 60_000,
            })
            .await
            .unwrap();
        let record = KeyPairRecord {
            scope: scope.clone(),
            name: "web-1".into(),
            job_id,
            key_pair_id: None,
            key_pair_fingerprint: key.fingerprint_md5.clone(),
            fingerprint_md5: key.fingerprint_md5.clone(),
            fingerprint_sha256: key.fingerprint_sha256.clone(),
            public_key: key.public_line.clone(),
            created_at: 0,
            tags: Vec::new(),
            resource_group_id: None,
            zone: None,
            delivered: false,
            earlier_keys: Vec::new(),
        };
        registry.commit(&record).await.unwrap();
    }
    let folder = sb.path("out/aliyun/acct/cn-hangzhou");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&folder)
        .unwrap();
    let pem = folder.join("web-1.pem");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&pem)
            .unwrap();
        f.write_all(key.private_pem.as_bytes()).unwrap();
    }

    let state = opts.state.clone();
    let s = run_batch(opts).await;
    assert_eq!((s.tally.created, s.tally.failed), (1, 0));
    let lines = manifest(&sb.path("out"));
    assert_eq!(lines[0]["status"], "created", "{}", lines[0]);
    assert_eq!(lines[0]["fingerprint_md5"], key.fingerprint_md5.as_str());
    assert_eq!(
        std::fs::read_to_string(&pem).unwrap().as_str(),
        key.private_pem.as_str(),
        "the key file is left as it was"
    );
    assert!(
        folder.join("web-1.pub").exists(),
        "its .pub is written beside it"
    );
    let registry = EmbeddedRegistry::open(&state).unwrap();
    let records = registry.describe(&Filter::default()).await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].public_key, key.public_line);
    assert!(records[0].delivered);
}
