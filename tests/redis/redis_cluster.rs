//! keyfleet on a Redis Cluster (`--redis-url` holding several node URLs): the registry's
//! quota race, `serve` instances sharing quota and nonces, and every key of one scope in one
//! slot. Needs the 3-master cluster `scripts/test.sh` starts on 127.0.0.1:7101-7103 (or
//! `KEYFLEET_TEST_CLUSTER_URLS`).

use std::sync::Arc;
use std::time::Duration;

use crate::util::cloud::rpc;
use crate::util::serve::Server;
use keyfleet::dialect::{Provider, Scope};
use keyfleet::registry::redis::RedisRegistry;
use keyfleet::registry::{Claim, Registry, RegistryError};
use keyfleet::upstream::client::CallOptions;
use uuid::Uuid;

fn cluster_urls() -> String {
    std::env::var("KEYFLEET_TEST_CLUSTER_URLS").unwrap_or_else(|_| {
        "redis://127.0.0.1:7101,redis://127.0.0.1:7102,redis://127.0.0.1:7103".into()
    })
}

async fn connect(prefix: &str) -> RedisRegistry {
    RedisRegistry::connect(&cluster_urls(), prefix, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "no Redis Cluster at {}: {e}; scripts/test.sh starts one (or set \
                 KEYFLEET_TEST_CLUSTER_URLS)",
                cluster_urls()
            )
        })
}

fn prefix() -> String {
    format!("kfc{}", &Uuid::new_v4().simple().to_string()[..10])
}

/// Reservations of several scopes together (a worker's v2 message) on a cluster: each scope's
/// pipeline goes to the node of its slot, and the answers are those of one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_reserves_many_over_scopes_in_other_slots() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let reg = connect(&prefix()).await;
        let scopes: Vec<Scope> = ["cn-hangzhou", "cn-beijing", "cn-shanghai", "cn-shenzhen"]
            .iter()
            .map(|region| Scope {
                provider: Provider::Aliyun,
                owner: "acct".into(),
                region: (*region).into(),
            })
            .collect();
        // Two claims a scope, interleaved, the second of each on the first's name.
        let claims: Vec<Claim<'_>> = (0..8)
            .map(|i| Claim {
                scope: &scopes[i % 4],
                name: "web",
                job_id: Uuid::new_v4(),
                quota: 500,
                ttl_ms: 600_000,
            })
            .collect();
        let answers = reg.reserve_many(&claims).await;
        for (i, a) in answers.iter().enumerate() {
            if i < 4 {
                assert!(a.is_ok(), "claim {i}: {a:?}");
            } else {
                assert!(
                    matches!(a, Err(RegistryError::AlreadyExists)),
                    "claim {i}: {a:?}"
                );
            }
        }
        for s in &scopes {
            assert_eq!(reg.quota_used(s).await.unwrap(), 1);
        }
    })
    .await
    .expect("test timed out");
}

/// 1200 reserves for one region from 4 separate cluster connections stop at exactly 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_quota_race_gives_exactly_the_quota() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let prefix = prefix();
        let scope = Scope {
            provider: Provider::Aliyun,
            owner: "acct".into(),
            region: "cn-hangzhou".into(),
        };
        let mut regs = Vec::new();
        for _ in 0..4 {
            let r = connect(&prefix).await;
            assert!(r.connection().is_cluster());
            regs.push(Arc::new(r));
        }
        let mut tasks = Vec::new();
        for i in 0..1200 {
            let (reg, scope) = (regs[i % 4].clone(), scope.clone());
            tasks.push(tokio::spawn(async move {
                let name = format!("k-{i}");
                let claim = Claim {
                    scope: &scope,
                    name: &name,
                    job_id: Uuid::new_v4(),
                    quota: 500,
                    ttl_ms: 600_000,
                };
                reg.reserve(&claim).await
            }));
        }
        let (mut ok, mut quota) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(RegistryError::QuotaExceeded) => quota += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!((ok, quota), (500, 700));
        assert_eq!(regs[0].quota_used(&scope).await.unwrap(), 500);
    })
    .await
    .expect("test timed out");
}

/// Two `serve` processes on the cluster race for one region's last slots: exactly the free
/// count; a nonce used on one is refused by the other.
#[tokio::test(flavor = "multi_thread")]
async fn two_serve_instances_on_a_cluster_share_quota_and_nonces() {
    tokio::time::timeout(Duration::from_secs(300), async {
        let dir = tempfile::tempdir().unwrap();
        let prefix = prefix();
        let urls = cluster_urls();
        let args = [
            "--redis-url",
            urls.as_str(),
            "--prefix",
            prefix.as_str(),
            "--quota",
            "40",
        ];
        let a = Server::start(dir.path(), &args);
        let b = Server::start(dir.path(), &args);
        let (ca, cb) = (a.client(), b.client());
        let mut tasks = Vec::new();
        for i in 0..100 {
            let c = if i % 2 == 0 { ca.clone() } else { cb.clone() };
            tasks.push(tokio::spawn(async move {
                c.call(
                    &rpc(),
                    "CreateKeyPair",
                    &[
                        ("RegionId", "cn-qingdao"),
                        ("KeyPairName", &format!("c-{i}")),
                    ],
                )
                .await
                .unwrap()
            }));
        }
        let (mut ok, mut quota) = (0, 0);
        for t in tasks {
            let r = t.await.unwrap();
            match (r.status, r.json()["Code"].as_str().unwrap_or("")) {
                (200, _) => ok += 1,
                (403, "QuotaExceed.KeyPair") => quota += 1,
                other => panic!("{other:?}: {}", r.body),
            }
        }
        assert_eq!((ok, quota), (40, 60));
        let opts = CallOptions {
            nonce: Some(Uuid::new_v4().to_string()),
            ..Default::default()
        };
        let r = ca
            .call_with(
                &rpc(),
                "DescribeKeyPairs",
                &[("RegionId", "cn-qingdao")],
                &opts,
            )
            .await
            .unwrap();
        assert_eq!(r.json()["TotalCount"], 40);
        let r = cb
            .call_with(
                &rpc(),
                "DescribeKeyPairs",
                &[("RegionId", "cn-qingdao")],
                &opts,
            )
            .await
            .unwrap();
        assert_eq!(r.json()["Code"], "SignatureNonceUsed");
        a.stop();
        b.stop();
    })
    .await
    .expect("test timed out");
}
