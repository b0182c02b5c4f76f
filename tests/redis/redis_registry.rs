//! The Redis registry and batch counters against a real Redis (127.0.0.1:6379, or
//! `KEYFLEET_TEST_REDIS_URL`): quota and uniqueness under concurrency, every reserve outcome,
//! the same answers as the embedded store, one cluster slot per scope, no private keys stored.
//! `scripts/test.sh` starts Redis; without it these tests fail (they never skip).
//!
//! Every test works under its own prefix `kf-test-<uuid>` and deletes its keys when done, even
//! when it fails.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::time::Duration;

use keyfleet::dialect::record::KeyPairRecord;
use keyfleet::dialect::{Provider, Scope, Tag};
use keyfleet::registry::batch_status::{BatchStatus, BatchStatusStore, CREATED};
use keyfleet::registry::embedded::EmbeddedRegistry;
use keyfleet::registry::redis::RedisRegistry;
use keyfleet::registry::{now_ms, Claim, Entry, Filter, Registry, RegistryError, Reserved};
use uuid::Uuid;

const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const LONG_TTL: i64 = 600_000;

fn redis_url() -> String {
    std::env::var("KEYFLEET_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Bounds a test so a hang fails it instead of stalling CI.
async fn bounded<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test did not finish within its time limit");
}

/// Deletes every key under the test's prefix when dropped, also after a failed assertion.
struct Cleanup {
    url: String,
    prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(self.url.as_str()) else {
            return;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(2)) else {
            return;
        };
        let mut cursor = 0u64;
        loop {
            let Ok((next, keys)) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}:*", self.prefix))
                .arg("COUNT")
                .arg(1000)
                .query::<(u64, Vec<String>)>(&mut conn)
            else {
                return;
            };
            if !keys.is_empty() {
                let _ = redis::cmd("UNLINK").arg(&keys).query::<i64>(&mut conn);
            }
            if next == 0 {
                return;
            }
            cursor = next;
        }
    }
}

fn fresh_prefix() -> String {
    format!("kf-test-{}", Uuid::new_v4())
}

fn unreachable(url: &str, e: RegistryError) -> ! {
    panic!(
        "Redis is not reachable at {url} ({e}). These tests need a real Redis: run \
         scripts/test.sh, which starts one (or set KEYFLEET_TEST_REDIS_URL)."
    )
}

async fn connect(prefix: &str) -> RedisRegistry {
    let url = redis_url();
    match RedisRegistry::connect(&url, prefix, CONNECT_TIMEOUT).await {
        Ok(r) => r,
        Err(e) => unreachable(&url, e),
    }
}

/// A registry under a fresh prefix, and the guard that removes its keys.
async fn fixture() -> (RedisRegistry, Cleanup) {
    let prefix = fresh_prefix();
    let cleanup = Cleanup {
        url: redis_url(),
        prefix: prefix.clone(),
    };
    (connect(&prefix).await, cleanup)
}

async fn batch_fixture() -> (BatchStatusStore, Cleanup) {
    let prefix = fresh_prefix();
    let url = redis_url();
    let cleanup = Cleanup {
        url: url.clone(),
        prefix: prefix.clone(),
    };
    match BatchStatusStore::connect(&url, &prefix, CONNECT_TIMEOUT).await {
        Ok(s) => (s, cleanup),
        Err(e) => unreachable(&url, e),
    }
}

/// Every key under `prefix`.
async fn keys_under(reg: &RedisRegistry, prefix: &str) -> Vec<String> {
    let mut conn = reg.connection();
    let mut cursor = 0u64;
    let mut all = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .expect("SCAN");
        all.extend(keys);
        if next == 0 {
            return all;
        }
        cursor = next;
    }
}

fn scope(provider: Provider, owner: &str, region: &str) -> Scope {
    Scope {
        provider,
        owner: owner.into(),
        region: region.into(),
    }
}

pub(crate) fn hangzhou() -> Scope {
    scope(Provider::Aliyun, "acct", "cn-hangzhou")
}

/// A reservation of `name` in `scope` for `job_id` under the usual quota (500) and a TTL that
/// does not run out during a test; a test that needs others says so by name.
pub(crate) fn claim<'a>(scope: &'a Scope, name: &'a str, job_id: Uuid) -> Claim<'a> {
    Claim {
        scope,
        name,
        job_id,
        quota: 500,
        ttl_ms: LONG_TTL,
    }
}

/// A record as the pipeline would commit it (fingerprints derived from the name so filters
/// can find them).
fn record(scope: &Scope, name: &str, job_id: Uuid) -> KeyPairRecord {
    KeyPairRecord {
        scope: scope.clone(),
        name: name.into(),
        job_id,
        key_pair_id: (scope.provider == Provider::Ucloud).then(|| "uhostkp-abcd1234".to_owned()),
        key_pair_fingerprint: format!("dialect-{name}"),
        fingerprint_md5: format!("md5-{name}"),
        fingerprint_sha256: format!("SHA256:{name}"),
        public_key: format!("ssh-rsa AAAAB3NzaC1yc2E {name}"),
        created_at: 1_700_000_000,
        tags: if name.len().is_multiple_of(2) {
            Vec::new()
        } else {
            vec![Tag {
                key: "team".into(),
                value: "\"delivered\":false".into(),
            }]
        },
        resource_group_id: None,
        earlier_keys: Vec::new(),
        zone: None,
        delivered: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reserves_stop_exactly_at_the_quota() {
    bounded(async {
        let (reg, _cleanup) = fixture().await;
        // Several connections, as several workers would have.
        let mut regs = vec![reg.clone()];
        for _ in 0..3 {
            regs.push(connect(reg.prefix()).await);
        }
        let s = hangzhou();
        let mut tasks = Vec::new();
        for i in 0..1_200 {
            let r = regs[i % regs.len()].clone();
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                r.reserve(&claim(&s, &format!("key-{i}"), Uuid::new_v4()))
                    .await
            }));
        }
        let (mut fresh, mut quota) = (0, 0);
        for t in tasks {
            match t.await.expect("task") {
                Ok(Reserved::Fresh) => fresh += 1,
                Err(RegistryError::QuotaExceeded) => quota += 1,
                other => panic!("unexpected reserve outcome {other:?}"),
            }
        }
        assert_eq!((fresh, quota), (500, 700));
        assert_eq!(reg.quota_used(&s).await.unwrap(), 500);
        let mut conn = reg.connection();
        let held: u64 = redis::cmd("HLEN")
            .arg(reg.scope_keys(&s).pairs)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(held, 500);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_name_raced_by_many_jobs_has_one_winner() {
    bounded(async {
        let (reg, _cleanup) = fixture().await;
        let s = hangzhou();
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (r, s) = (reg.clone(), s.clone());
            tasks.push(tokio::spawn(async move {
                r.reserve(&claim(&s, "web-01", Uuid::new_v4())).await
            }));
        }
        let mut outcomes = BTreeMap::new();
        for t in tasks {
            *outcomes
                .entry(format!("{:?}", t.await.expect("task")))
                .or_insert(0) += 1;
        }
        assert_eq!(
            outcomes,
            BTreeMap::from([
                ("Err(AlreadyExists)".to_owned(), 99),
                ("Ok(Fresh)".to_owned(), 1)
            ])
        );
        assert_eq!(reg.quota_used(&s).await.unwrap(), 1);
    })
    .await;
}

#[tokio::test]
async fn a_name_taken_by_another_job_already_exists() {
    bounded(async {
        let (reg, _cleanup) = fixture().await;
        let s = hangzhou();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(reg.reserve(&claim(&s, "web", a)).await, Ok(Reserved::Fresh));
        assert_eq!(
            reg.reserve(&claim(&s, "web", b)).await,
            Err(RegistryError::AlreadyExists)
        );
        reg.commit(&record(&s, "web", a)).await.unwrap();
        assert_eq!(
            reg.reserve(&claim(&s, "web", b)).await,
            Err(RegistryError::AlreadyExists)
        );
        // The same name in another region is another scope.
        let other = scope(Provider::Aliyun, "acct", "cn-beijing");
        assert_eq!(
            reg.reserve(&claim(&other, "web", b)).await,
            Ok(Reserved::Fresh)
        );
        assert_eq!(reg.quota_used(&s).await.unwrap(), 1);
        assert_eq!(reg.quota_used(&other).await.unwrap(), 1);
    })
    .await;
}

#[tokio::test]
async fn the_same_job_resumes_without_counting_twice() {
    bounded(async {
        let (reg, _cleanup) = fixture().await;
        let s = hangzhou();
        let job = Uuid::new_v4();
        let held = Claim {
            quota: 1,
            ..claim(&s, "web", job)
        };
        assert_eq!(reg.reserve(&held).await, Ok(Reserved::Fresh));
        // Even at the quota, a redelivered job gets its name back.
        assert_eq!(reg.reserve(&held).await, Ok(Reserved::Resumed));
        assert_eq!(
            reg.reserve(&Claim { ttl_ms: 1, ..held }).await,
            Ok(Reserved::Resumed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Its own reservation, expired or not, is still its own.
        assert_eq!(reg.reserve(&held).await, Ok(Reserved::Resumed));
        assert_eq!(reg.quota_used(&s).await.unwrap(), 1);
        assert!(matches!(
            reg.lookup(&s, "web").await.unwrap(),
            Some(Entry::Reserved { job_id, deadline_ms, .. }) if job_id == job && deadline_ms > now_ms()
        ));
    })
    .await;
}

#[tokio::test]
async fn an_expired_reservation_is_taken_over_without_counting_twice() {
    bounded(async {
        let (reg, _cleanup) = fixture().await;
        let s = hangzhou();
        let (crashed, next) = (Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(
            reg.reserve(&Claim {
                ttl_ms: 1,
                ..claim(&s, "web", crashed)
            })
            .await,
            Ok(Reserved::Fresh)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            reg.reserve(&claim(&s, "web", next)).await,
            Ok(Reserved::TookOver)
        );
        assert_eq!(reg.quota_used(&s).await.unwrap(), 1);
        // The slow job comes back: its reservation is gone.
        assert_eq!(
            reg.commit(&record(&s, "web", crashed)).await,
            Err(RegistryError::ReservationLost)
        );
        assert_eq!(
            reg.reserve(&claim(&s, "web", crashed)).await,
            Err(RegistryError::AlreadyExists)
        );
        reg.commit(&record(&s, "web", next)).await.unwrap();
        assert_eq!(reg.quota_used(&s).await.unwrap(), 1);
    })
    .await;
}

#[tokio::test]
async fn at_the_quota_expired_reservations_are_swept() {
    bounded(async {
        let (reg, _cleanup) = fixture().await;
        let s = hangzhou();
        reg.reserve(&Claim {
            quota: 2,
            ttl_ms: 1,
            ..claim(&s, "a", Uuid::new_v4())
        })
        .await
        .unwrap();
        reg.reserve(&Claim {
            quota: 2,
            ttl_ms: 1,
            ..claim(&s, "b", Uuid::new_v4())
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            reg.reserve(&Claim {
                quota: 2,
                ..claim(&s, "c", Uuid::new_v4())
            })
            .await,
            Ok(Reserved::Fresh)
        );
        assert_eq!(reg.quota_used(&s).await.unwrap(), 1);
        assert_eq!(reg.lookup(&s, "a").await.unwrap(), None);
        assert_eq!(reg.lookup(&s, "b").await.unwrap(), None);

        // A sweep that does not make room is not kept (as in the embedded store).
        reg.reserve(&Claim {
            quota: 2,
            ttl_ms: 1,
            ..claim(&s, "d", Uuid::new_v4())
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            reg.reserve(&Claim {
                quota: 1,
                ..claim(&s, "e", Uuid::new_v4())
            })
            .await,
            Err(RegistryError::QuotaExceeded)
        );
        assert!(reg.lookup(&s, "d").await.unwrap().is_some());
        assert_eq!(reg.quota_used(&s).await.unwrap(), 2);
        // Live reservations are never swept.
        assert_eq!(
            reg.reserve(&Claim {
                quota: 0,
                ..claim(&s, "e", Uuid::new_v4())
            })
            .await,
            Err(RegistryError::QuotaExceeded)
        );
        assert!(reg.lookup(&s, "c").await.unwrap().is_some());
    })
    .await;
}

/// A scope written before the deadline index existed (an older keyfleet) has reservations the
/// index does not know: the first time the scope is full it is indexed by one full read, so
/// its expired reservations are still swept.
#[tokio::test]
async fn reservations_written_before_the_deadline_index_are_still_swept() {
    bounded(async {
        let (reg, _cleanup) = fixture().await;
        let s = hangzhou();
        for name in ["a", "b"] {
            let short = Claim {
                quota: 2,
                ttl_ms: 1,
                ..claim(&s, name, Uuid::new_v4())
            };
            assert_eq!(reg.reserve(&short).await, Ok(Reserved::Fresh));
        }
        let keys = reg.scope_keys(&s);
        let mut conn = reg.connection();
        let _: i64 = redis::cmd("DEL")
            .arg(&keys.deadlines)
            .arg(&keys.indexed)
            .query_async(&mut conn)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let next = Claim {
            quota: 2,
            ..claim(&s, "c", Uuid::new_v4())
        };
        assert_eq!(reg.reserve(&next).await, Ok(Reserved::Fresh));
        assert_eq!(reg.lookup(&s, "a").await.unwrap(), None);
        assert_eq!(reg.lookup(&s, "b").await.unwrap(), None);
        assert_eq!(reg.quota_used(&s).await.unwrap(), 1);
        let indexed: bool = redis::cmd("EXISTS")
            .arg(&keys.indexed)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(indexed, "the scope is marked as indexed");
    })
    .await;
}

/// Sends `ECHO marker` until the MONITOR output read from `lines` shows it; every line read
/// on the way is pushed to `seen`.
async fn until_monitored(
    conn: &mut keyfleet::registry::connection::RedisConn,
    lines: &std::sync::mpsc::Receiver<String>,
    marker: &str,
    seen: &mut Vec<String>,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let _: String = redis::cmd("ECHO")
            .arg(marker)
            .query_async(conn)
            .await
            .unwrap();
        while let Ok(line) = lines.recv_timeout(Duration::from_millis(100)) {
            let done = line.contains(marker);
            seen.push(line);
            if done {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "MONITOR shows nothing"
        );
    }
}

/// A refusal at a full scope finds expired reservations in the deadline index: it never reads
/// the scope's hash (HGETALL of every pair, public keys included), watched with MONITOR.
#[tokio::test]
async fn a_refusal_at_a_full_scope_does_not_read_the_scope() {
    bounded(async {
        let (reg, _cleanup) = fixture().await;
        let s = hangzhou();
        for i in 0..20 {
            let (name, job) = (format!("pair-{i}"), Uuid::new_v4());
            reg.reserve(&Claim {
                quota: 20,
                ..claim(&s, &name, job)
            })
            .await
            .unwrap();
            reg.commit(&record(&s, &name, job)).await.unwrap();
        }
        let refuse = |n: usize| {
            let reg = &reg;
            let s = &s;
            async move {
                for i in 0..n {
                    let name = format!("more-{i}");
                    let full = Claim {
                        quota: 20,
                        ..claim(s, &name, Uuid::new_v4())
                    };
                    assert_eq!(reg.reserve(&full).await, Err(RegistryError::QuotaExceeded));
                }
            }
        };
        // The first refusal of a scope that was never full marks it indexed.
        refuse(1).await;
        let mut monitor = std::process::Command::new("redis-cli")
            .args(["-u", &redis_url(), "monitor"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("redis-cli (installed with Redis by scripts/test.sh)");
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        let stdout = monitor.stdout.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        // MONITOR shows only what comes after it attached: an ECHO of a marker, sent until it
        // is seen, says it has; a second marker after the refusals says all of them are in.
        let mut conn = reg.connection();
        let mut seen = Vec::new();
        let start = format!("start-{}", Uuid::new_v4());
        until_monitored(&mut conn, &lines, &start, &mut seen).await;
        seen.clear();
        refuse(5).await;
        let end = format!("end-{}", Uuid::new_v4());
        until_monitored(&mut conn, &lines, &end, &mut seen).await;
        monitor.kill().unwrap();
        let _ = monitor.wait();
        let seen = seen.join("\n");
        let keys = reg.scope_keys(&s);
        let mine = |cmd: &str, key: &str| {
            seen.lines()
                .filter(|l| l.contains(&format!("\"{cmd}\" \"{key}\"")))
                .count()
        };
        assert_eq!(
            mine("ZRANGEBYSCORE", &keys.deadlines),
            5,
            "MONITOR saw each refusal look in the index"
        );
        assert_eq!(mine("HGETALL", &keys.pairs), 0, "a refusal read the scope");
    })
    .await;
}

#[tokio::test]
async fn an_undelivered_pair_is_replaced_a_delivered_one_exists() {
    bounded(async {
        let (reg, _cleanup) = fixture().await;
        let s = hangzhou();
        let job = Uuid::new_v4();
        reg.reserve(&claim(&s, "web", job)).await.unwrap();
        reg.commit(&record(&s, "web", job)).await.unwrap();
        assert_eq!(
            reg.lookup(&s, "web").await.unwrap(),
            Some(Entry::Pair(record(&s, "web", job)))
        );
        // Another job never replaces it, delivered or not.
        assert_eq!(
            reg.reserve(&claim(&s, "web", Uuid::new_v4())).await,
            Err(RegistryError::AlreadyExists)
        );
        assert_eq!(
            reg.reserve(&claim(&s, "web", job)).await,
            Ok(Reserved::Replacing)
        );
        assert!(matches!(
            reg.lookup(&s, "web").await.unwrap(),
            Some(Entry::Reserved { job_id, .. }) if job_id == job
        ));
        reg.commit(&record(&s, "web", job)).await.unwrap();
        reg.mark_delivered(&s, "web", job).await.unwrap();
        // Delivering twice is harmless.
        reg.mark_delivered(&s, "web", job).await.unwrap();
        // The same job again is told it was answered; any other job that the name exists.
        assert_eq!(
            reg.reserve(&claim(&s, "web", job)).await,
            Err(RegistryError::AlreadyDelivered)
        );
        assert_eq!(
            reg.reserve(&claim(&s, "web", Uuid::new_v4())).await,
            Err(RegistryError::AlreadyExists)
        );
        assert_eq!(reg.quota_used(&s).await.unwrap(), 1);
    })
    .await;
}

#[tokio::test]
async fn mark_delivered_changes_only_the_delivered_flag() {
    bounded(async {
        let (reg, _cleanup) = fixture().await;
        let s = scope(Provider::Ucloud, "org-1", "cn-bj2");
        // Even length: no tags (cjson would turn `[]` into `{}`); odd: a tag whose value
        // spells the very text the script edits.
        for name in ["ab", "abc", "密钥对"] {
            let job = Uuid::new_v4();
            reg.reserve(&claim(&s, name, job)).await.unwrap();
            let mut r = record(&s, name, job);
            reg.commit(&r).await.unwrap();
            reg.mark_delivered(&s, name, job).await.unwrap();
            r.delivered = true;
            assert_eq!(reg.lookup(&s, name).await.unwrap(), Some(Entry::Pair(r)));
        }
    })
    .await;
}

#[tokio::test]
async fn commit_and_delivery_need_the_jobs_own_entry() {
    bounded(async {
        let (reg, _cleanup) = fixture().await;
        let s = hangzhou();
        let (mine, other) = (Uuid::new_v4(), Uuid::new_v4());
        let lost = Err(RegistryError::ReservationLost);
        assert_eq!(reg.commit(&record(&s, "web", mine)).await, lost);
        reg.reserve(&claim(&s, "web", other)).await.unwrap();
        assert_eq!(reg.commit(&record(&s, "web", mine)).await, lost);
        assert_eq!(reg.mark_delivered(&s, "web", other).await, lost);
        reg.commit(&record(&s, "web", other)).await.unwrap();
        // A second commit finds a record, not a reservation.
        assert_eq!(reg.commit(&record(&s, "web", other)).await, lost);
        assert_eq!(reg.mark_delivered(&s, "web", mine).await, lost);
        assert_eq!(reg.mark_delivered(&s, "nothing", mine).await, lost);
        assert_eq!(
            reg.lookup(&s, "web").await.unwrap(),
            Some(Entry::Pair(record(&s, "web", other)))
        );
    })
    .await;
}

#[tokio::test]
async fn release_and_delete_free_the_quota() {
    bounded(async {
        let (reg, _cleanup) = fixture().await;
        let s = hangzhou();
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        reg.reserve(&Claim {
            quota: 3,
            ..claim(&s, "a", a)
        })
        .await
        .unwrap();
        reg.reserve(&Claim {
            quota: 3,
            ..claim(&s, "b", b)
        })
        .await
        .unwrap();
        reg.reserve(&Claim {
            quota: 3,
            ..claim(&s, "c", c)
        })
        .await
        .unwrap();
        assert_eq!(reg.quota_used(&s).await.unwrap(), 3);

        // Only the owner releases.
        reg.release(&s, "a", b).await.unwrap();
        assert_eq!(reg.quota_used(&s).await.unwrap(), 3);
        reg.release(&s, "a", a).await.unwrap();
        assert_eq!(reg.quota_used(&s).await.unwrap(), 2);
        assert_eq!(reg.lookup(&s, "a").await.unwrap(), None);
        reg.release(&s, "a", a).await.unwrap();
        assert_eq!(reg.quota_used(&s).await.unwrap(), 2);

        // An undelivered record is released; a delivered one stays.
        reg.commit(&record(&s, "b", b)).await.unwrap();
        reg.release(&s, "b", b).await.unwrap();
        assert_eq!(reg.quota_used(&s).await.unwrap(), 1);
        reg.commit(&record(&s, "c", c)).await.unwrap();
        reg.mark_delivered(&s, "c", c).await.unwrap();
        reg.release(&s, "c", c).await.unwrap();
        assert_eq!(reg.quota_used(&s).await.unwrap(), 1);

        // Delete removes anything, once.
        assert!(reg.delete(&s, "c").await.unwrap());
        assert!(!reg.delete(&s, "c").await.unwrap());
        assert_eq!(reg.quota_used(&s).await.unwrap(), 0);
        reg.reserve(&Claim {
            quota: 3,
            ..claim(&s, "d", Uuid::new_v4())
        })
        .await
        .unwrap();
        assert!(reg.delete(&s, "d").await.unwrap());
        assert_eq!(reg.quota_used(&s).await.unwrap(), 0);
        assert!(!reg.delete(&s, "never").await.unwrap());
        assert_eq!(reg.quota_used(&s).await.unwrap(), 0);

        // The freed slots are usable again.
        for i in 0..3 {
            reg.reserve(&Claim {
                quota: 3,
                ..claim(&s, &format!("n{i}"), Uuid::new_v4())
            })
            .await
            .unwrap();
        }
        assert_eq!(
            reg.reserve(&Claim {
                quota: 3,
                ..claim(&s, "n3", Uuid::new_v4())
            })
            .await,
            Err(RegistryError::QuotaExceeded)
        );
    })
    .await;
}

/// Fills several scopes, some with reservations that `describe` must not list.
async fn populate<R: Registry>(reg: &R) -> Vec<KeyPairRecord> {
    let scopes = [
        scope(Provider::Aliyun, "acct", "cn-hangzhou"),
        scope(Provider::Aliyun, "acct", "cn-beijing"),
        scope(Provider::Aliyun, "acct", "cn-beijing-finance-1"),
        scope(Provider::Aliyun, "other:acct", "cn-hangzhou"),
        scope(Provider::Ucloud, "org-1", "cn-bj2"),
    ];
    let mut made = Vec::new();
    for (i, s) in scopes.iter().enumerate() {
        for name in ["web-01", "web-02", "db-01"] {
            let job = Uuid::new_v4();
            reg.reserve(&claim(s, name, job)).await.unwrap();
            let r = record(s, name, job);
            reg.commit(&r).await.unwrap();
            made.push(r);
        }
        reg.reserve(&claim(s, &format!("pending-{i}"), Uuid::new_v4()))
            .await
            .unwrap();
    }
    made
}

#[tokio::test]
async fn describe_filters_across_scopes_in_the_embedded_order() {
    bounded(async {
        let (reg, _cleanup) = fixture().await;
        let dir = tempfile::tempdir().unwrap();
        let embedded = EmbeddedRegistry::open(&dir.path().join("state.redb")).unwrap();
        let made = populate(&reg).await;
        for r in &made {
            // Same records in the embedded store, to compare answers.
            embedded
                .reserve(&claim(&r.scope, &r.name, r.job_id))
                .await
                .unwrap();
            embedded.commit(r).await.unwrap();
        }
        let names = |rs: &[KeyPairRecord]| -> Vec<String> {
            rs.iter()
                .map(|r| format!("{}/{}", r.scope.key(), r.name))
                .collect()
        };
        let filters = [
            Filter::default(),
            Filter {
                provider: Some(Provider::Ucloud),
                ..Filter::default()
            },
            Filter {
                owner: Some("acct".into()),
                ..Filter::default()
            },
            Filter {
                region: Some("cn-hangzhou".into()),
                ..Filter::default()
            },
            Filter {
                provider: Some(Provider::Aliyun),
                owner: Some("acct".into()),
                region: Some("cn-beijing".into()),
                ..Filter::default()
            },
            Filter {
                name: Some("web-*".into()),
                ..Filter::default()
            },
            Filter {
                fingerprint: Some("md5-db-01".into()),
                ..Filter::default()
            },
            Filter {
                fingerprint: Some("SHA256:web-02".into()),
                region: Some("cn-bj2".into()),
                ..Filter::default()
            },
            Filter {
                provider: Some(Provider::Aliyun),
                owner: Some("nobody".into()),
                region: Some("cn-hangzhou".into()),
                ..Filter::default()
            },
        ];
        for f in &filters {
            let got = reg.describe(f).await.unwrap();
            let want = embedded.describe(f).await.unwrap();
            assert_eq!(names(&got), names(&want), "filter {f:?}");
            assert_eq!(got, want, "filter {f:?}");
        }
        assert_eq!(reg.describe(&filters[0]).await.unwrap().len(), 15);
        assert_eq!(reg.describe(&filters[1]).await.unwrap().len(), 3);
        assert_eq!(reg.describe(&filters[2]).await.unwrap().len(), 9);
        assert_eq!(reg.describe(&filters[3]).await.unwrap().len(), 6);
        assert_eq!(reg.describe(&filters[4]).await.unwrap().len(), 3);
        assert_eq!(reg.describe(&filters[5]).await.unwrap().len(), 10);
        assert_eq!(reg.describe(&filters[6]).await.unwrap().len(), 5);
        assert_eq!(reg.describe(&filters[7]).await.unwrap().len(), 1);
        assert!(reg.describe(&filters[8]).await.unwrap().is_empty());
    })
    .await;
}

/// CRC16/XMODEM, Redis Cluster's key hash.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The hash tag Redis Cluster hashes: the text between the first `{` and the next `}`, if
/// that is not empty; otherwise the whole key.
fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

fn cluster_slot(key: &str) -> u16 {
    crc16(hash_tag(key).as_bytes()) % 16384
}

#[test]
fn cluster_slot_matches_redis() {
    assert_eq!(crc16(b"123456789"), 0x31c3);
    assert_eq!(cluster_slot("foo"), 12182);
    assert_eq!(
        cluster_slot("{user1000}.following"),
        cluster_slot("{user1000}.followers")
    );
    assert_eq!(cluster_slot("{}foo"), crc16(b"{}foo") % 16384);
}

#[tokio::test]
async fn every_key_of_a_scope_hashes_to_one_cluster_slot() {
    bounded(async {
        let (reg, _cleanup) = fixture().await;
        let scopes = [
            hangzhou(),
            scope(Provider::Ucloud, "org-1", "cn-bj2"),
            scope(Provider::Aliyun, "we{i}rd:own}er{", "cn-hangzhou"),
            scope(Provider::Aliyun, "", "cn-hangzhou"),
        ];
        for s in &scopes {
            let keys = reg.scope_keys(s);
            assert_eq!(hash_tag(&keys.pairs), s.key(), "{keys:?}");
            assert_eq!(
                cluster_slot(&keys.pairs),
                cluster_slot(&keys.used),
                "{keys:?}"
            );
            assert_eq!(
                redis::cluster_routing::Slot::for_key(&keys.pairs),
                redis::cluster_routing::Slot::for_key(&keys.used),
                "{keys:?}"
            );
        }
        // What the scripts actually wrote: only the keys passed to them, plus the index.
        for s in &scopes {
            let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
            reg.reserve(&claim(s, "a", a)).await.unwrap();
            reg.reserve(&Claim {
                ttl_ms: 1,
                ..claim(s, "b", b)
            })
            .await
            .unwrap();
            reg.commit(&record(s, "a", a)).await.unwrap();
            reg.mark_delivered(s, "a", a).await.unwrap();
            reg.reserve(&Claim {
                quota: 1,
                ..claim(s, "c", Uuid::new_v4())
            })
            .await
            .ok();
            reg.release(s, "b", b).await.unwrap();
            reg.delete(s, "a").await.unwrap();
            reg.reserve(&claim(s, "d", Uuid::new_v4())).await.unwrap();
        }
        let mut allowed: HashSet<String> = HashSet::from([reg.scopes_key()]);
        for s in &scopes {
            let keys = reg.scope_keys(s);
            allowed.insert(keys.pairs);
            allowed.insert(keys.used);
            allowed.insert(keys.deadlines);
            allowed.insert(keys.indexed);
        }
        for key in keys_under(&reg, reg.prefix()).await {
            assert!(allowed.contains(&key), "unexpected key {key:?} in Redis");
        }

        let (store, _cleanup2) = batch_fixture().await;
        for batch in ["b-1", "{x}", "50%{"] {
            let keys = store.batch_keys(batch).unwrap();
            assert_eq!(
                cluster_slot(&keys.counts),
                cluster_slot(&keys.jobs),
                "{keys:?}"
            );
            assert_ne!(
                hash_tag(&keys.counts),
                keys.counts,
                "{keys:?} has no hash tag"
            );
        }
        assert!(store.batch_keys("").is_err());
    })
    .await;
}

#[tokio::test]
async fn no_private_key_is_ever_stored() {
    bounded(async {
        let (reg, _cleanup) = fixture().await;
        let s = hangzhou();
        let job = Uuid::new_v4();
        reg.reserve(&claim(&s, "web", job)).await.unwrap();
        let mut bad = record(&s, "web", job);
        bad.public_key = "-----BEGIN PRIVATE KEY-----\nMIIE...".into();
        assert!(matches!(
            reg.commit(&bad).await,
            Err(RegistryError::Storage(_))
        ));
        populate(&reg).await;
        reg.commit(&record(&s, "web", job)).await.unwrap();
        reg.mark_delivered(&s, "web", job).await.unwrap();
        let store = BatchStatusStore::from_connection(reg.connection(), reg.prefix());
        store.set_total("b-1", 2).await.unwrap();
        store.record("b-1", job, CREATED).await.unwrap();

        let mut conn = reg.connection();
        let keys = keys_under(&reg, reg.prefix()).await;
        assert!(keys.len() > 5);
        for key in keys {
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            let (cmd, rest): (&str, &[&str]) = match kind.as_str() {
                "hash" => ("HGETALL", &[]),
                "set" => ("SMEMBERS", &[]),
                "string" => ("GET", &[]),
                "zset" => ("ZRANGE", &["0", "-1"]),
                other => panic!("unexpected {other} key {key}"),
            };
            let text: Vec<String> = redis::cmd(cmd)
                .arg(&key)
                .arg(rest)
                .query_async::<redis::Value>(&mut conn)
                .await
                .map(|v| vec![format!("{v:?}")])
                .unwrap();
            for t in text {
                assert!(!t.contains("PRIVATE KEY"), "{key} holds key material");
            }
        }
    })
    .await;
}

/// A small deterministic generator, so a failing sequence can be replayed.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// What an entry looks like, with deadlines reduced to live / expired (the two stores read
/// different clocks a few microseconds apart).
fn shape(e: Option<Entry>) -> String {
    match e {
        None => "free".into(),
        Some(Entry::Reserved {
            job_id,
            deadline_ms,
            tried_keys,
        }) => format!(
            "reserved {job_id} live={} tried={tried_keys:?}",
            deadline_ms > now_ms() + 60_000
        ),
        Some(Entry::Pair(r)) => format!("{r:?}"),
    }
}

/// The keys a job tried upstream survive its pair being replaced and its reservation being
/// resumed, in both stores: what lets a later attempt recognise its own lost key in the cloud.
#[tokio::test]
async fn tried_keys_survive_replacing_and_resuming() {
    bounded(async {
        let (reg, _cleanup) = fixture().await;
        let dir = tempfile::tempdir().unwrap();
        let embedded = EmbeddedRegistry::open(&dir.path().join("state.redb")).unwrap();
        async fn check<R: Registry>(r: &R) {
            let s = hangzhou();
            let job = Uuid::new_v4();
            let k = Claim {
                quota: 10,
                ..claim(&s, "k", job)
            };
            r.reserve(&k).await.unwrap();
            assert_eq!(
                r.note_key(&s, "k", job, "ssh-rsa A1").await.unwrap(),
                ["ssh-rsa A1"]
            );
            // A second note of the same key is not a second key.
            assert_eq!(
                r.note_key(&s, "k", job, "ssh-rsa A1").await.unwrap(),
                ["ssh-rsa A1"]
            );
            let mut rec = record(&s, "k", job);
            rec.public_key = "ssh-rsa A1".into();
            r.commit(&rec).await.unwrap();
            // The job comes back before delivery: its pair is replaced, its key remembered.
            assert_eq!(r.reserve(&k).await.unwrap(), Reserved::Replacing);
            let tried = r.note_key(&s, "k", job, "ssh-rsa A2").await.unwrap();
            assert_eq!(tried, ["ssh-rsa A1", "ssh-rsa A2"]);
            assert_eq!(r.reserve(&k).await.unwrap(), Reserved::Resumed);
            match r.lookup(&s, "k").await.unwrap() {
                Some(Entry::Reserved { tried_keys, .. }) => assert_eq!(tried_keys, tried),
                other => panic!("{other:?}"),
            }
            // Another job cannot note keys on this reservation.
            assert_eq!(
                r.note_key(&s, "k", Uuid::new_v4(), "ssh-rsa X").await,
                Err(RegistryError::ReservationLost)
            );
        }
        check(&reg).await;
        check(&embedded).await;
    })
    .await;
}

#[tokio::test]
async fn answers_exactly_like_the_embedded_store() {
    bounded(async {
        let (reg, _cleanup) = fixture().await;
        let dir = tempfile::tempdir().unwrap();
        let embedded = EmbeddedRegistry::open(&dir.path().join("state.redb")).unwrap();
        let scopes = [hangzhou(), scope(Provider::Ucloud, "org-1", "cn-bj2")];
        // Few names and jobs, so operations keep meeting each other's entries.
        let names = ["a", "b"];
        let jobs = [Uuid::new_v4(), Uuid::new_v4()];
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for step in 0..1_000 {
            let s = &scopes[rng.below(scopes.len())];
            let name = names[rng.below(names.len())];
            let job = jobs[rng.below(jobs.len())];
            // TTL 0 expires at once: takeovers and sweeps without sleeping.
            let ttl_ms = if rng.below(3) == 0 { 0 } else { LONG_TTL };
            let quota = 1 + rng.below(3) as u64;
            let reservation = Claim {
                quota,
                ttl_ms,
                ..claim(s, name, job)
            };
            let key = ["ssh-rsa AAAA1", "ssh-rsa AAAA2"][rng.below(2)];
            let (op, got, want) = match rng.below(8) {
                0 | 1 => (
                    format!("reserve {name} by {job} quota {quota} ttl {ttl_ms}"),
                    format!("{:?}", reg.reserve(&reservation).await),
                    format!("{:?}", embedded.reserve(&reservation).await),
                ),
                2 | 3 => (
                    format!("commit {name} by {job}"),
                    format!("{:?}", reg.commit(&record(s, name, job)).await),
                    format!("{:?}", embedded.commit(&record(s, name, job)).await),
                ),
                4 => (
                    format!("mark_delivered {name} by {job}"),
                    format!("{:?}", reg.mark_delivered(s, name, job).await),
                    format!("{:?}", embedded.mark_delivered(s, name, job).await),
                ),
                6 => (
                    format!("note_key {name} by {job}: {key}"),
                    format!("{:?}", reg.note_key(s, name, job, key).await),
                    format!("{:?}", embedded.note_key(s, name, job, key).await),
                ),
                5 => (
                    format!("release {name} by {job}"),
                    format!("{:?}", reg.release(s, name, job).await),
                    format!("{:?}", embedded.release(s, name, job).await),
                ),
                _ => (
                    format!("delete {name}"),
                    format!("{:?}", reg.delete(s, name).await),
                    format!("{:?}", embedded.delete(s, name).await),
                ),
            };
            assert_eq!(got, want, "step {step}: {op} in {}", s.key());
            for s in &scopes {
                assert_eq!(
                    reg.quota_used(s).await.unwrap(),
                    embedded.quota_used(s).await.unwrap(),
                    "step {step}: quota of {} after {op}",
                    s.key()
                );
                for n in names {
                    assert_eq!(
                        shape(reg.lookup(s, n).await.unwrap()),
                        shape(embedded.lookup(s, n).await.unwrap()),
                        "step {step}: {n} in {} after {op}",
                        s.key()
                    );
                }
            }
        }
        assert_eq!(
            reg.describe(&Filter::default()).await.unwrap(),
            embedded.describe(&Filter::default()).await.unwrap()
        );
    })
    .await;
}

#[tokio::test]
async fn connect_failures_name_the_url_but_not_the_password() {
    bounded(async {
        // Nothing listens on port 1.
        let err = RedisRegistry::connect(
            "redis://user:s3cret@127.0.0.1:1/",
            "keyfleet",
            Duration::from_millis(500),
        )
        .await
        .expect_err("port 1 has no Redis");
        let text = err.to_string();
        assert!(text.contains("127.0.0.1:1"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
        let err = RedisRegistry::connect(&redis_url(), "kf{x}", CONNECT_TIMEOUT)
            .await
            .expect_err("a hash tag in the prefix is refused");
        assert!(err.to_string().contains("prefix"), "{err}");
    })
    .await;
}

#[tokio::test]
async fn ping_and_prefix() {
    bounded(async {
        let (reg, _cleanup) = fixture().await;
        reg.ping().await.unwrap();
        assert!(reg.prefix().starts_with("kf-test-"));
    })
    .await;
}

#[tokio::test]
async fn batch_status_counts_each_job_once() {
    bounded(async {
        let (store, _cleanup) = batch_fixture().await;
        assert_eq!(store.status("b-1").await.unwrap(), None);
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        assert!(store.record("b-1", a, CREATED).await.unwrap());
        assert!(!store.record("b-1", a, CREATED).await.unwrap());
        // A redelivered job answering differently is still the same job.
        assert!(!store.record("b-1", a, "QuotaExceed.KeyPair").await.unwrap());
        assert!(store.record("b-1", b, "QuotaExceed.KeyPair").await.unwrap());
        assert!(store
            .record("b-1", c, "KeyPair.AlreadyExist")
            .await
            .unwrap());
        let status = store.status("b-1").await.unwrap().unwrap();
        assert_eq!(
            status,
            BatchStatus {
                batch_id: "b-1".into(),
                total: None,
                answered: 3,
                created: 1,
                failed: BTreeMap::from([
                    ("KeyPair.AlreadyExist".to_owned(), 1),
                    ("QuotaExceed.KeyPair".to_owned(), 1)
                ]),
            }
        );
        assert_eq!(status.pending(), None);
        store.set_total("b-1", 5).await.unwrap();
        let status = store.status("b-1").await.unwrap().unwrap();
        assert_eq!((status.total, status.pending()), (Some(5), Some(2)));
        // Batches are separate.
        assert_eq!(store.status("b-2").await.unwrap(), None);
        store.set_total("b-2", 0).await.unwrap();
        let empty = store.status("b-2").await.unwrap().unwrap();
        assert_eq!((empty.answered, empty.pending()), (0, Some(0)));
    })
    .await;
}

#[tokio::test]
async fn batch_status_counts_a_messages_outcomes_in_one_call_each_job_once() {
    bounded(async {
        let (store, _cleanup) = batch_fixture().await;
        let ids: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
        // One job recorded alone before (its message came back after a partial answer).
        assert!(store.record("m", ids[0], CREATED).await.unwrap());
        let outcomes: Vec<(Uuid, &str)> = vec![
            (ids[0], CREATED),
            (ids[1], CREATED),
            (ids[2], "QuotaExceed.KeyPair"),
            (ids[3], CREATED),
            (ids[4], "QuotaExceed.KeyPair"),
            (ids[5], "KeyPair.AlreadyExist"),
        ];
        assert_eq!(store.record_many("m", &outcomes).await.unwrap(), 5);
        // The whole message again (a redelivery): nothing counted twice.
        assert_eq!(store.record_many("m", &outcomes).await.unwrap(), 0);
        assert_eq!(store.record_many("m", &[]).await.unwrap(), 0);
        let status = store.status("m").await.unwrap().unwrap();
        assert_eq!(
            status,
            BatchStatus {
                batch_id: "m".into(),
                total: None,
                answered: 6,
                created: 3,
                failed: BTreeMap::from([
                    ("KeyPair.AlreadyExist".to_owned(), 1),
                    ("QuotaExceed.KeyPair".to_owned(), 2)
                ]),
            }
        );
        // Each job's own outcome is what `collect` reads.
        assert_eq!(
            store.outcome("m", ids[4]).await.unwrap().as_deref(),
            Some("QuotaExceed.KeyPair")
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_status_under_concurrent_records() {
    bounded(async {
        let (store, _cleanup) = batch_fixture().await;
        let jobs: Vec<Uuid> = (0..500).map(|_| Uuid::new_v4()).collect();
        store.set_total("big", jobs.len() as u64).await.unwrap();
        let mut tasks = Vec::new();
        // Every job is answered by two tasks at once, as a redelivery race would.
        for _ in 0..2 {
            for chunk in jobs.chunks(25) {
                let (store, chunk) = (store.clone(), chunk.to_vec());
                tasks.push(tokio::spawn(async move {
                    let mut counted = 0;
                    for (i, job) in chunk.iter().enumerate() {
                        let outcome = if i % 5 == 0 {
                            "QuotaExceed.KeyPair"
                        } else {
                            CREATED
                        };
                        if store.record("big", *job, outcome).await.unwrap() {
                            counted += 1;
                        }
                    }
                    counted
                }));
            }
        }
        let mut counted = 0;
        for t in tasks {
            counted += t.await.expect("task");
        }
        assert_eq!(counted, 500);
        let status = store.status("big").await.unwrap().unwrap();
        assert_eq!(status.answered, 500);
        assert_eq!(status.created, 400);
        assert_eq!(
            status.failed,
            BTreeMap::from([("QuotaExceed.KeyPair".to_owned(), 100)])
        );
        assert_eq!(status.pending(), Some(0));
    })
    .await;
}

#[tokio::test]
async fn batch_keys_expire_after_inactivity() {
    bounded(async {
        let (store, _cleanup) = batch_fixture().await;
        let store = store.with_ttl(Duration::from_millis(300));
        store
            .record("short", Uuid::new_v4(), CREATED)
            .await
            .unwrap();
        store.set_total("short", 3).await.unwrap();
        let keys = store.batch_keys("short").unwrap();
        let mut conn = redis::Client::open(redis_url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        for key in [&keys.counts, &keys.jobs] {
            let ttl: i64 = redis::cmd("PTTL")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(ttl > 0 && ttl <= 300, "{key}: PTTL {ttl}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(store.status("short").await.unwrap(), None);

        // The default keeps a batch for a week.
        let (week, _cleanup2) = batch_fixture().await;
        week.record("long", Uuid::new_v4(), CREATED).await.unwrap();
        let ttl: i64 = redis::cmd("PTTL")
            .arg(week.batch_keys("long").unwrap().counts)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 6 * 24 * 3600 * 1000, "PTTL {ttl}");
    })
    .await;
}

/// `run` and a worker's v2 message reserve the names of their jobs together (`reserve_many`;
/// in Redis one pipeline a scope): the answers must be those of reserving one job after
/// another in input order — the first of two rows with one name wins it, and the quota goes to
/// the earlier rows, each scope on its own — on both stores.
#[tokio::test]
async fn reserving_many_decides_in_the_order_given() {
    bounded(async {
        let (reg, _cleanup) = fixture().await;
        let dir = tempfile::tempdir().unwrap();
        let embedded = EmbeddedRegistry::open(&dir.path().join("state.redb")).unwrap();
        async fn check<R: Registry>(r: &R) {
            let s = hangzhou();
            let jobs: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
            let names = ["a", "b", "a", "c", "d", "e"];
            let claims: Vec<Claim<'_>> = names
                .iter()
                .zip(&jobs)
                .map(|(name, job)| Claim {
                    quota: 4,
                    ..claim(&s, name, *job)
                })
                .collect();
            let answers = r.reserve_many(&claims).await;
            let shown: Vec<String> = answers
                .iter()
                .map(|a| match a {
                    Ok(how) => format!("{how:?}"),
                    Err(e) => format!("{e:?}"),
                })
                .collect();
            assert_eq!(
                shown,
                [
                    "Fresh",
                    "Fresh",
                    "AlreadyExists",
                    "Fresh",
                    "Fresh",
                    "QuotaExceeded"
                ]
            );
            match r.lookup(&s, "a").await.unwrap() {
                Some(Entry::Reserved { job_id, .. }) => assert_eq!(job_id, jobs[0]),
                other => panic!("{other:?}"),
            }
            assert_eq!(r.quota_used(&s).await.unwrap(), 4);
            // Asked again by the same jobs: each holds its name already.
            let again = r.reserve_many(&claims[..2]).await;
            assert!(
                again.iter().all(|a| matches!(a, Ok(Reserved::Resumed))),
                "{again:?}"
            );
            // Scopes interleaved: each scope is decided on its own, in order within it.
            let beijing = scope(Provider::Aliyun, "acct", "cn-beijing");
            let more = [(&beijing, "a"), (&s, "f"), (&beijing, "a"), (&beijing, "b")];
            let mixed: Vec<Claim<'_>> = more
                .iter()
                .map(|(sc, name)| Claim {
                    quota: 4,
                    ..claim(sc, name, Uuid::new_v4())
                })
                .collect();
            let shown: Vec<String> = r
                .reserve_many(&mixed)
                .await
                .iter()
                .map(|a| match a {
                    Ok(how) => format!("{how:?}"),
                    Err(e) => format!("{e:?}"),
                })
                .collect();
            assert_eq!(shown, ["Fresh", "QuotaExceeded", "AlreadyExists", "Fresh"]);
            assert_eq!(r.quota_used(&beijing).await.unwrap(), 2);
        }
        check(&reg).await;
        check(&embedded).await;
    })
    .await;
}
