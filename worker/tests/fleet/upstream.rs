//! Workers registering keys in a cloud (`--upstream-endpoint`): a real `keyfleet serve` on
//! loopback, with injected faults and throttling, is the cloud. One of two workers is
//! SIGKILLed mid-batch; in the end the cloud holds exactly the delivered keys. Three workers
//! on one Redis share one `--upstream-rps` budget, as the cloud's throttle counts it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::util::{check_batch, close_rabbitmq_connections_of, fleet_csv, manifest, signal, Env};
use keyfleet::credentials::{AccessKey, Credentials, Secret};
use keyfleet::dialect::Provider;
use keyfleet::keys::keygen::KeyBits;
use keyfleet::modes::serve::{serve_with, ServeOptions, Store};
use keyfleet::registry::embedded::EmbeddedRegistry;
use keyfleet::settings::{KeyPairQuota, Settings};
use keyfleet::upstream::client::{ApiClient, Signer};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_batch_the_cloud_holds_exactly_the_delivered_keys() {
    tokio::time::timeout(Duration::from_secs(400), async {
        let mut env = Env::new("upkill");
        let (addr, stop) = start_cloud(&env, 20, 0.1).await;
        let endpoint = format!("aliyun=http://{addr}");
        let args = [
            "--threads",
            "1",
            "--concurrency",
            "4",
            "--upstream-endpoint",
            endpoint.as_str(),
        ];
        let victim = env.start_worker_env(&args, &CLOUD_CREDENTIALS);
        env.start_worker_env(&args, &CLOUD_CREDENTIALS);
        let input = env.write("fleet.csv", &fleet_csv(80, "cn-beijing"));
        env.submit(&input, "bupkill").await;
        env.wait_status("bupkill", Duration::from_secs(120), |s| s.created >= 15)
            .await;
        signal(env.worker(victim), "KILL");
        let _ = env.worker(victim).wait();
        let c = env.collect("bupkill", "out", Duration::from_secs(60)).await;
        assert!(c.complete, "{c:?}");
        let (created, failed) = check_batch(&env, "out", 80).await;
        let why: Vec<String> = manifest(&env.path("out"))
            .iter()
            .filter(|l| l["status"] != "created")
            .map(|l| format!("{}: {} {}", l["key_pair_name"], l["code"], l["message"]))
            .collect();
        assert_eq!((created, failed.len()), (80, 0), "{failed:?} {why:?}");
        assert_eq!(
            cloud_holds(addr, "cn-beijing").await,
            delivered(&env, "out"),
            "the cloud holds exactly the delivered keys"
        );
        stop.cancel();
    })
    .await
    .expect("test timed out");
}

/// The fault chaos found: a worker whose RabbitMQ connection closed kept working the jobs it
/// had received on it — reserving, making keys, spending the fleet's upstream budget and
/// calling the cloud — though it could no longer ack them and RabbitMQ had given them to
/// another worker. Now those jobs stop where they are (`keyfleet_jobs_abandoned_total`), the
/// worker reconnects, and the batch still ends with every key delivered once and held by the
/// cloud. The jobs wait on a shared budget of 3 calls a second, so the victim holds several
/// when RabbitMQ closes its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_a_closed_rabbitmq_connection_are_abandoned_not_worked_on() {
    tokio::time::timeout(Duration::from_secs(300), async {
        // Eight jobs a message, whatever `auto` would make of one worker consuming: five
        // messages, of which the victim runs two and holds three waiting for a slot.
        let mut env = Env::new("chanloss").with_jobs_per_message(8);
        let (addr, stop) = start_cloud(&env, 20, 0.0).await;
        let endpoint = format!("aliyun=http://{addr}");
        let args = [
            "--threads",
            "1",
            "--concurrency",
            "16",
            "--upstream-rps",
            "3",
            "--upstream-burst",
            "1",
            "--upstream-endpoint",
            endpoint.as_str(),
            "--metrics-addr",
            "127.0.0.1:0",
        ];
        // The victim starts alone, so it holds every message of the batch (5 of 8 jobs, within
        // its prefetch) when its connection closes: with two consumers from the start, the
        // first to subscribe could take all five and leave the victim nothing to abandon.
        let victim = env.start_worker_env(&args, &CLOUD_CREDENTIALS);
        let rows = 40;
        let input = env.write("fleet.csv", &fleet_csv(rows, "cn-chengdu"));
        env.submit(&input, "bchanloss").await;
        env.wait_status("bchanloss", Duration::from_secs(120), |s| s.created >= 4)
            .await;
        env.start_worker_env(&args, &CLOUD_CREDENTIALS);
        let pid = env.worker(victim).id();
        close_rabbitmq_connections_of(pid);

        let c = env
            .collect("bchanloss", "out", Duration::from_secs(60))
            .await;
        assert!(c.complete, "{c:?}");
        let (created, failed) = check_batch(&env, "out", rows).await;
        assert_eq!((created, failed.len()), (rows, 0), "{failed:?}");
        assert_eq!(
            cloud_holds(addr, "cn-chengdu").await,
            delivered(&env, "out"),
            "the cloud holds exactly the delivered keys"
        );
        let log = env.worker_log(victim);
        let port: u16 = log
            .split("metrics on http://127.0.0.1:")
            .nth(1)
            .and_then(|rest| rest.split('/').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"));
        let metrics = crate::util::http_get(port, "/metrics")
            .await
            .expect("/metrics");
        let abandoned: f64 = metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix("keyfleet_jobs_abandoned_total ")?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no keyfleet_jobs_abandoned_total:\n{metrics}"));
        // At least one whole message of 8 waited for a slot, and the metric counts jobs.
        assert!(
            abandoned >= 8.0,
            "the victim held jobs when its connection closed, and stopped {abandoned}:\n{log}"
        );
        assert!(log.contains("reconnected to RabbitMQ"), "{log}");
        assert!(
            !log.contains(" ERROR "),
            "the lost connection's jobs must not race their other attempts:\n{log}"
        );
        stop.cancel();
    })
    .await
    .expect("test timed out");
}

/// The access keys the test clouds accept (Alibaba Cloud's for account `acme`, UCloud's for
/// `org-acme`), as a worker's environment gives them.
pub(crate) const CLOUD_CREDENTIALS: [(&str, &str); 4] = [
    ("ALIBABA_CLOUD_ACCESS_KEY_ID", "testid"),
    ("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "testsecret"),
    ("UCLOUD_PUBLIC_KEY", "ucloudpub"),
    ("UCLOUD_PRIVATE_KEY", "ucloudpriv"),
];

/// A cloud for the workers: a `keyfleet serve` in this process, on a state file in the test's
/// folder, with its throttle and injected fault rate, for both providers. Stopped by
/// cancelling the token.
pub(crate) async fn start_cloud(
    env: &Env,
    throttle_rps: u32,
    fault_rate: f64,
) -> (std::net::SocketAddr, CancellationToken) {
    let state = env.path("cloud.redb");
    let registry = Arc::new(EmbeddedRegistry::open(&state).unwrap());
    let opts = ServeOptions {
        listen: ([127, 0, 0, 1], 0).into(),
        credentials: Credentials::from_keys(vec![
            AccessKey {
                provider: Provider::Aliyun,
                id: "testid".into(),
                secret: Secret::new("testsecret".into()),
                account: "acme".into(),
            },
            AccessKey {
                provider: Provider::Ucloud,
                id: "ucloudpub".into(),
                secret: Secret::new("ucloudpriv".into()),
                account: "org-acme".into(),
            },
        ]),
        store: Store::Embedded(state),
        settings: Settings {
            quota: KeyPairQuota {
                default: 10_000,
                ..KeyPairQuota::default()
            },
            ..Settings::default()
        },
        threads: 1,
        key_bits: KeyBits::B2048,
        reservoir: 0,
        throttle_rps,
        fault_rate,
        drain: Duration::from_secs(5),
        upstream: keyfleet::upstream::Configured::local(),
    };
    let stop = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(serve_with(registry, opts, stop.clone(), move |a| {
        let _ = tx.send(a);
    }));
    (rx.await.unwrap(), stop)
}

/// Name → fingerprint of every pair a collected manifest delivered.
fn delivered(env: &Env, out: &str) -> BTreeMap<String, String> {
    manifest(&env.path(out))
        .iter()
        .map(|l| {
            (
                l["key_pair_name"].as_str().unwrap().to_owned(),
                l["key_pair_fingerprint"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Name → fingerprint of every pair the cloud at `addr` holds in `region`, read with its own
/// `DescribeKeyPairs`.
async fn cloud_holds(addr: std::net::SocketAddr, region: &str) -> BTreeMap<String, String> {
    let client = ApiClient::new(&addr.to_string()).unwrap();
    let signer = Signer::AliyunRpc {
        id: "testid".into(),
        secret: "testsecret".into(),
    };
    let mut held = BTreeMap::new();
    let mut page = 1;
    while page <= 10 {
        let n = page.to_string();
        let r = client
            .call(
                &signer,
                "DescribeKeyPairs",
                &[("RegionId", region), ("PageSize", "50"), ("PageNumber", &n)],
            )
            .await
            .unwrap();
        if r.status != 200 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue; // an injected fault or the throttle: ask again
        }
        let items = r.json()["KeyPairs"]["KeyPair"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if items.is_empty() {
            break;
        }
        for p in items {
            held.insert(
                p["KeyPairName"].as_str().unwrap().to_owned(),
                p["KeyPairFingerPrint"].as_str().unwrap().to_owned(),
            );
        }
        page += 1;
    }
    held
}

/// Three workers at `--upstream-rps 5 --upstream-burst 1` against a cloud that throttles an
/// account above 5 calls a second: the budget is the fleet's, so the cloud throttles nothing
/// (before it was each worker's: 15 calls a second, and the run saw 84 of 90 calls
/// throttled). The cloud is a `keyfleet serve` process of its own, so its `/metrics` count
/// only this test's calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_share_one_upstream_budget() {
    three_workers_within_one_budget(Env::new("fleetrate")).await;
}

/// The same on the Redis Cluster `scripts/test.sh` starts: the budget is one key on the scope's
/// slot, so the cluster client routes every worker's calls for it to one node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_on_a_redis_cluster_share_one_upstream_budget() {
    let urls = std::env::var("KEYFLEET_TEST_CLUSTER_URLS").unwrap_or_else(|_| {
        "redis://127.0.0.1:7101,redis://127.0.0.1:7102,redis://127.0.0.1:7103".into()
    });
    three_workers_within_one_budget(Env::new("fleetratecl").on_redis(&urls)).await;
}

/// Three workers at `--upstream-rps 5 --upstream-burst 1` in front of a cloud that throttles
/// above 5 calls a second, 45 rows of one account and region: every pair registered, nothing
/// throttled, and no faster than the budget allows.
async fn three_workers_within_one_budget(mut env: Env) {
    tokio::time::timeout(Duration::from_secs(300), async {
        let creds_file = env.write(
            "cloud-credentials.toml",
            "[[aliyun]]\naccess_key_id = \"testid\"\naccess_key_secret = \"testsecret\"\naccount = \"acme\"\n",
        );
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&creds_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let state = env.path("cloud.redb");
        let mut cloud = std::process::Command::new(crate::util::keyfleet_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--reservoir", "0"])
            .args(["--throttle-rps", "5", "--threads", "1", "--log", "warn"])
            .arg("--credentials")
            .arg(&creds_file)
            .arg("--state")
            .arg(&state)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let addr = {
            use std::io::BufRead;
            let mut line = String::new();
            std::io::BufReader::new(cloud.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            line.trim()
                .strip_prefix("listening on http://")
                .unwrap_or_else(|| panic!("serve printed {line:?}"))
                .to_owned()
        };
        // Killed with the test's other processes, even when an assertion below fails.
        env.keep_helper(cloud);
        let endpoint = format!("aliyun=http://{addr}");
        let creds = [
            ("ALIBABA_CLOUD_ACCESS_KEY_ID", "testid"),
            ("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "testsecret"),
        ];
        let args = [
            "--threads",
            "1",
            "--upstream-rps",
            "5",
            "--upstream-burst",
            "1",
            "--upstream-endpoint",
            endpoint.as_str(),
        ];
        for _ in 0..3 {
            env.start_worker_env(&args, &creds);
        }
        let rows = 45;
        let input = env.write("fleet.csv", &fleet_csv(rows, "cn-qingdao"));
        let started = std::time::Instant::now();
        env.submit(&input, "bfleetrate").await;
        let c = env.collect("bfleetrate", "out", Duration::from_secs(60)).await;
        let took = started.elapsed();
        assert!(c.complete, "{c:?}");
        let (created, failed) = check_batch(&env, "out", rows).await;
        assert_eq!((created, failed.len()), (rows, 0), "{failed:?}");
        let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
        let metrics = crate::util::http_get(port, "/metrics").await.expect("/metrics");
        let answered = |code: &str| -> f64 {
            metrics
                .lines()
                .filter(|l| {
                    l.starts_with("keyfleet_api_requests_total{")
                        && l.contains(&format!("code=\"{code}\""))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        assert_eq!(answered("Throttling.User"), 0.0, "{metrics}");
        assert_eq!(answered("OK"), rows as f64, "one import a key: {metrics}");
        // 45 calls at 5 a second with a burst of 1 cannot take less than 44 intervals.
        assert!(
            took >= Duration::from_millis(44 * 200),
            "the fleet went faster than its budget: {took:?}"
        );
    })
    .await
    .expect("test timed out");
}
