//! The test cloud as rotation and upstream tests read it, shared by the `keyfleet` test
//! binaries (`tests/util/`) and the worker's (`worker/tests/fleet/`, by `#[path]`): the test
//! access keys, what the cloud holds (its own Describe actions), what a key folder holds, and
//! the check a rotation ends with — the cloud, the registry and the key files hold exactly the
//! successors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyfleet::dialect::record::KeyPairRecord;
use keyfleet::dialect::{Provider, Scope};
use keyfleet::registry::{Filter, Registry};
use keyfleet::upstream::client::{ApiClient, Signer};

/// The test cloud's Alibaba access key (account `acme`).
pub fn rpc() -> Signer {
    Signer::AliyunRpc {
        id: "testid".into(),
        secret: "testsecret".into(),
    }
}

/// The test cloud's UCloud key pair (account `org-acme`).
pub fn ucloud() -> Signer {
    Signer::Ucloud {
        public_key: "ucloudpub".into(),
        private_key: "ucloudpriv".into(),
    }
}

/// name → (KeyPairId, KeyPairFingerPrint) of everything the cloud holds in the scope.
///
/// The cloud injects faults and throttles: a page that fails is asked for again (never the
/// whole listing from the start, which under a steady throttle never ends), at most 100 times.
pub async fn cloud_pairs(c: &ApiClient, provider: &str) -> BTreeMap<String, (String, String)> {
    let mut out = BTreeMap::new();
    for page in 0.. {
        let mut tries = 0;
        let j = loop {
            let r = if provider == "aliyun" {
                let n = (page + 1).to_string();
                c.call(
                    &rpc(),
                    "DescribeKeyPairs",
                    &[
                        ("RegionId", "cn-hangzhou"),
                        ("PageSize", "50"),
                        ("PageNumber", &n),
                    ],
                )
                .await
                .unwrap()
            } else {
                let off = (page * 100).to_string();
                c.call(
                    &ucloud(),
                    "DescribeUHostKeyPairs",
                    &[("Region", "cn-bj2"), ("Limit", "100"), ("Offset", &off)],
                )
                .await
                .unwrap()
            };
            let j = r.json();
            if r.status == 200 && j.get("Code").is_none() && j["RetCode"].as_i64().unwrap_or(0) == 0
            {
                break j;
            }
            tries += 1;
            assert!(tries < 100, "page {page} of {provider}: {}", r.body);
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let items = if provider == "aliyun" {
            j["KeyPairs"]["KeyPair"].clone()
        } else {
            j["KeyPairs"].clone()
        };
        let items = items.as_array().cloned().unwrap_or_default();
        if items.is_empty() {
            break;
        }
        for p in items {
            out.insert(
                p["KeyPairName"].as_str().unwrap().to_owned(),
                (
                    p["KeyPairId"].as_str().unwrap_or("").to_owned(),
                    p["KeyPairFingerPrint"].as_str().unwrap().to_owned(),
                ),
            );
        }
    }
    out
}

/// The private key files (`.pem`) under `dir`, at any depth.
fn pem_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for path in entries.flatten().map(|e| e.path()) {
        if path.is_dir() {
            out.extend(pem_files(&path));
        } else if path.extension().is_some_and(|x| x == "pem") {
            out.push(path);
        }
    }
    out
}

/// How many private key files are under `dir`, at any depth. Counted by path: the same name
/// in two providers' folders is two files.
pub fn pem_count(dir: &Path) -> usize {
    pem_files(dir).len()
}

/// The private key files under `dir`, at any depth: file name → MD5 fingerprint of its key
/// (read only when `fingerprints`; empty otherwise). Two files of one name are a failure, so
/// `dir` is one provider's, owner's and region's folder (or a tree where names are unique).
pub fn key_files(dir: &Path, fingerprints: bool) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for path in pem_files(dir) {
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        let md5 = match fingerprints {
            true => {
                keyfleet::keys::keygen::fingerprints_of_pem(
                    &std::fs::read_to_string(&path).unwrap(),
                )
                .unwrap()
                .0
            }
            false => String::new(),
        };
        assert!(out.insert(name, md5).is_none(), "two key files of one name");
    }
    out
}

/// Starts `command`, and SIGKILLs it once `ready` holds; `false` when it ended by itself
/// first.
pub fn kill_when(mut command: Command, ready: impl Fn() -> bool) -> bool {
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

/// The end of a rotation of `web-000…` in aliyun/acme/cn-hangzhou and ucloud/org-acme/cn-bj2
/// (`counts` pairs each) to `{name}-r`, with its key files under `keys`: the cloud, the
/// registry and the key files hold exactly the successors; each key file is the registered
/// key, and the cloud's; each Alibaba successor carries its pair's tag; the quota is where it
/// was. Returns the successors' records, for a test's own checks.
pub async fn assert_exactly_the_successors<R: Registry>(
    registry: &R,
    cloud: &ApiClient,
    keys: &Path,
    counts: [(Provider, usize); 2],
) -> Vec<KeyPairRecord> {
    let mut all = Vec::new();
    for (provider, n) in counts {
        let (owner, region) = match provider {
            Provider::Aliyun => ("acme", "cn-hangzhou"),
            Provider::Ucloud => ("org-acme", "cn-bj2"),
        };
        let scope = Scope {
            provider,
            owner: owner.into(),
            region: region.into(),
        };
        let held = cloud_pairs(cloud, provider.as_str()).await;
        let files = key_files(&keys.join(provider.as_str()).join(owner).join(region), true);
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
        all.extend(ours.into_values());
    }
    all
}
