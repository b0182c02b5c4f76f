//! Workers registering keys in a cloud (`--upstream-endpoint`): a real `keyfleet serve` on
//! loopback, with injected faults and throttling, is the cloud. One of two workers is
//! SIGKILLed mid-batch; in the end the cloud holds exactly the delivered keys.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::util::{check_batch, fleet_csv, manifest, signal, Env};
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
        let cloud_dir = tempfile::tempdir().unwrap();
        let state = cloud_dir.path().join("cloud.redb");
        let registry = Arc::new(EmbeddedRegistry::open(&state).unwrap());
        let opts = ServeOptions {
            listen: ([127, 0, 0, 1], 0).into(),
            credentials: Credentials::from_keys(vec![AccessKey {
                provider: Provider::Aliyun,
                id: "testid".into(),
                secret: Secret::new("testsecret".into()),
                account: "acme".into(),
            }]),
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
            throttle_rps: 20,
            fault_rate: 0.1,
            drain: Duration::from_secs(5),
            upstream: keyfleet::upstream::Configured::local(),
        };
        let stop = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(serve_with(registry, opts, stop.clone(), move |a| {
            let _ = tx.send(a);
        }));
        let addr = rx.await.unwrap();
        let endpoint = format!("aliyun=http://{addr}");
        let creds = [
            ("ALIBABA_CLOUD_ACCESS_KEY_ID", "testid"),
            ("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "testsecret"),
        ];
        let mut env = Env::new("upkill");
        let args = [
            "--threads",
            "1",
            "--concurrency",
            "4",
            "--upstream-endpoint",
            endpoint.as_str(),
        ];
        let victim = env.start_worker_env(&args, &creds);
        env.start_worker_env(&args, &creds);
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
        // The cloud's side: exactly the delivered names, with the delivered keys.
        let delivered: BTreeMap<String, String> = manifest(&env.path("out"))
            .iter()
            .map(|l| {
                (
                    l["key_pair_name"].as_str().unwrap().to_owned(),
                    l["key_pair_fingerprint"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
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
                    &[
                        ("RegionId", "cn-beijing"),
                        ("PageSize", "50"),
                        ("PageNumber", &n),
                    ],
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
        assert_eq!(
            held, delivered,
            "the cloud holds exactly the delivered keys"
        );
        stop.cancel();
    })
    .await
    .expect("test timed out");
}
