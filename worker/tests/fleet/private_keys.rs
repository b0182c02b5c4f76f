//! Private keys between a worker and `collect`, against the real RabbitMQ and Redis: sealed to
//! the batch's recipient on the wire, never redirected by a job, checked against the registry
//! before they are written, never lost to a failed write. Each test is named after the fault
//! it pins.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::util::{amqp_url, check_batch, fleet_csv, manifest, Env};
use futures::StreamExt;
use keyfleet::job::{results_message, set_private_key_body, Job, JobResult};
use keyfleet::keys::cpu::CpuPool;
use keyfleet::keys::keygen::{self, KeyBits};
use keyfleet::lifecycle::{Finished, Lifecycle};
use keyfleet::queue::broker::{self, Broker, REASON_HEADER};
use keyfleet::registry::batch_status::BatchStatusStore;
use keyfleet::registry::RegistryError;
use keyfleet::retry::RetryPolicy;
use keyfleet::settings::Settings;
use keyfleet::sink::transit;
use keyfleet::sink::{DeliveryError, Sink};
use keyfleet::upstream::LocalUpstream;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

async fn connect(env: &Env) -> Broker {
    let broker = Broker::connect(&amqp_url(), env.topology(), Duration::from_secs(10))
        .await
        .unwrap();
    broker.declare().await.unwrap();
    broker
}

/// A queue of our own bound to the results exchange with the batch's routing key: what anyone
/// allowed to bind there would read.
async fn spy(broker: &Broker, env: &Env, batch: &str) -> lapin::Consumer {
    let q = broker
        .channel()
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    broker
        .channel()
        .queue_bind(
            q.name().clone(),
            env.topology().results_exchange().into(),
            batch.into(),
            QueueBindOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    broker
        .channel()
        .basic_consume(
            q.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap()
}

fn pem_body_lines(pem: &str) -> Vec<String> {
    pem.lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 40)
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_queue_holds_no_plaintext_key() {
    // Eight jobs a message, so that 12 jobs are two job messages (with one worker consuming,
    // `auto` would pack them all in one).
    let mut env = Env::new("sealed").with_jobs_per_message(8);
    env.start_worker(&["--threads", "1"]);
    let broker = connect(&env).await;
    broker.declare_results_queue("bsealed").await.unwrap();
    let mut spied = spy(&broker, &env, "bsealed").await;
    let input = env.write("fleet.csv", &fleet_csv(12, "cn-shenzhen"));
    env.submit(&input, "bsealed").await;
    let c = env.collect("bsealed", "out", Duration::from_secs(60)).await;
    assert!(c.complete, "{c:?}");
    let (created, _) = check_batch(&env, "out", 12).await;
    assert_eq!(created, 12);

    // A v2 results message carries the results of a v2 job message's jobs, their keys sealed
    // together: count results, not messages.
    let (mut seen, mut results) = (Vec::new(), 0);
    while results < 12 {
        let d = tokio::time::timeout(Duration::from_secs(10), spied.next())
            .await
            .expect("the spy saw every result")
            .unwrap()
            .unwrap();
        let m: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        results += m["results"].as_array().map_or(1, Vec::len);
        seen.push(String::from_utf8(d.data).unwrap());
    }
    assert_eq!(results, 12);
    // 12 jobs in job messages of 8 and 4: one results message for each.
    assert_eq!(
        seen.len(),
        2,
        "the jobs of a v2 job message answer in one v2 results message"
    );
    for l in manifest(&env.path("out")) {
        let file = l["private_key_file"].as_str().unwrap();
        // PKCS#8 holds the modulus too, which the public key carries in the clear: a PEM line
        // may match it where the two encodings align. Only private lines count.
        let public = l["public_key"].as_str().unwrap().to_owned();
        let pem = std::fs::read_to_string(file).unwrap();
        let check = std::process::Command::new("openssl")
            .args(["pkey", "-check", "-noout", "-in", file])
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
        for msg in &seen {
            assert!(!msg.contains("PRIVATE KEY"));
            assert!(msg.contains(transit::ARMOR_BEGIN));
            for line in pem_body_lines(&pem) {
                if public.contains(&line) {
                    continue;
                }
                assert!(
                    !msg.contains(&line),
                    "a key's PEM base64 is on the queue: {line} in {msg}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_naming_its_own_recipient_does_not_redirect_keys() {
    let mut env = Env::new("redirect");
    env.track("bredir");
    env.start_worker(&["--threads", "1"]);
    let broker = connect(&env).await;
    broker.declare_results_queue("bredir").await.unwrap();
    env.give_recipient("bredir").await;
    let attacker = transit::Identity::generate();
    let mut spied = spy(&broker, &env, "bredir").await;
    let job = serde_json::json!({"v": 1, "job_id": Uuid::new_v4(), "batch_id": "bredir",
        "provider": "aliyun", "owner": "acct", "recipient": attacker.to_public().to_string(),
        "params": {"RegionId": "cn-hangzhou", "KeyPairName": "redirected"}});
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_correlation_id("bredir".into());
    broker
        .publish_raw_job(job.to_string().as_bytes(), props.clone())
        .await
        .unwrap();
    // The same job without the field: created, sealed to the batch's recipient only.
    let mut plain = job.clone();
    plain.as_object_mut().unwrap().remove("recipient");
    plain["job_id"] = serde_json::json!(Uuid::new_v4());
    broker
        .publish_raw_job(plain.to_string().as_bytes(), props)
        .await
        .unwrap();
    let mut sealed_seen = 0;
    while sealed_seen == 0 {
        let d = tokio::time::timeout(Duration::from_secs(60), spied.next())
            .await
            .expect("results")
            .unwrap()
            .unwrap();
        let r: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        if r["status"] == "created" {
            let body = r["response"]["PrivateKeyBody"].as_str().unwrap();
            assert!(
                transit::open(&attacker, body).is_err(),
                "the attacker can read a key"
            );
            let mine = transit::read_identity(&env.identity("bredir")).unwrap();
            assert!(transit::open(&mine, body).is_ok());
            sealed_seen += 1;
        } else {
            assert_eq!(r["code"], "InvalidParameter", "{r}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_without_recipient_is_refused_unless_plaintext_allowed() {
    let mut env = Env::new("norecipient");
    let strict = env.start_worker(&["--threads", "1"]);
    let broker = connect(&env).await;
    broker.declare_results_queue("bnorec").await.unwrap();
    let job = |name: &str| crate::util::job("bnorec", name);
    let c = broker.publish_job(&job("refused-1")).await.unwrap();
    broker::confirmed(c, "jobs").await.unwrap();
    let mut dead = crate::util::dead_letters(&broker, &env).await;
    let d = tokio::time::timeout(Duration::from_secs(60), dead.next())
        .await
        .expect("dead-lettered")
        .unwrap()
        .unwrap();
    let reason = broker::header_str(&d.properties, REASON_HEADER).unwrap();
    assert!(reason.contains("no recipient"), "{reason}");
    crate::util::signal(env.worker(strict), "TERM");
    let _ = env.worker(strict).wait();

    env.start_worker(&["--threads", "1", "--allow-plaintext-results"]);
    let c = broker.publish_job(&job("allowed-1")).await.unwrap();
    broker::confirmed(c, "jobs").await.unwrap();
    let store = BatchStatusStore::connect(
        &crate::util::redis_url(),
        &env.prefix,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    store.set_total("bnorec", 1).await.unwrap();
    let c = env.collect("bnorec", "out", Duration::from_secs(60)).await;
    assert!(c.complete, "{c:?}");
    let (created, _) = check_batch(&env, "out", 1).await;
    assert_eq!(created, 1);
}

/// Delivers nothing: keeps the sealed result message a worker would have published.
struct Captured {
    recipient: transit::Recipient,
    message: Mutex<Option<Vec<u8>>>,
}

impl Sink for Captured {
    const ANSWERS_REPEATED_JOBS: bool = false;

    async fn deliver(&self, result: &mut JobResult) -> Result<(), DeliveryError> {
        let pem = result.take_private_key().unwrap();
        let sealed = transit::seal(&self.recipient, &pem.0).unwrap();
        set_private_key_body(result.provider, &mut result.response, &sealed);
        *self.message.lock().unwrap() = Some(serde_json::to_vec(result).unwrap());
        Ok(())
    }

    async fn settled(&self, _: &str, _: Uuid, _: &str) -> Result<(), RegistryError> {
        Ok(())
    }
}

/// A batch with a recipient, and one of its jobs created by a lifecycle whose sink keeps the
/// sealed result message instead of publishing it. Returns the batch's identity, the job and
/// the message a worker would have sent.
async fn created_unpublished(
    env: &Env,
    batch: &str,
    name: &str,
) -> (transit::Identity, Job, Vec<u8>) {
    let (identity, mut made) = created_unpublished_jobs(env, batch, &[name]).await;
    let (job, message) = made.remove(0);
    (identity, job, message)
}

/// [`created_unpublished`] for several jobs of one batch: each job and its v1 result message.
async fn created_unpublished_jobs(
    env: &Env,
    batch: &str,
    names: &[&str],
) -> (transit::Identity, Vec<(Job, Vec<u8>)>) {
    env.give_recipient(batch).await;
    let identity = transit::read_identity(&env.identity(batch)).unwrap();
    let registry = env.registry().await;
    let status = BatchStatusStore::from_connection(registry.connection(), &env.prefix);
    status.set_total(batch, names.len() as u64).await.unwrap();
    let lifecycle = Lifecycle::new(
        Arc::new(registry.clone()),
        Arc::new(LocalUpstream),
        CpuPool::new(1).unwrap(),
        Settings::default(),
        RetryPolicy::queue(),
        CancellationToken::new(),
    );
    let mut made = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let sink = Captured {
            recipient: identity.to_public(),
            message: Mutex::new(None),
        };
        let mut job = crate::util::job(batch, name);
        job.line = Some(2 + i as u64);
        let finished = lifecycle.process(job.clone(), 1, &sink).await;
        assert!(matches!(finished, Finished::Delivered(_)), "{finished:?}");
        let genuine = sink.message.lock().unwrap().take().unwrap();
        made.push((job, genuine));
    }
    (identity, made)
}

/// The v2 results message a worker would send for `genuine` (v1 result messages): their
/// results without keys, and their keys packed and sealed to `to` under one header.
fn v2_results(
    batch: &str,
    genuine: &[&[u8]],
    identity: &transit::Identity,
    to: &transit::Recipient,
) -> Vec<u8> {
    let (mut results, mut pems) = (Vec::new(), Vec::new());
    for g in genuine {
        let mut r: serde_json::Value = serde_json::from_slice(g).unwrap();
        let body = r["response"]["PrivateKeyBody"].as_str().unwrap().to_owned();
        pems.push(transit::open(identity, &body).unwrap());
        r["response"]["PrivateKeyBody"] = "".into();
        results.push(serde_json::value::to_raw_value(&r).unwrap());
    }
    let keys: Vec<Option<&str>> = pems.iter().map(|p| Some(p.as_str())).collect();
    let sealed = transit::seal_bytes(to, &results_message::pack_keys(&keys)).unwrap();
    results_message::encode_group(batch, &results, &sealed).unwrap()
}

/// Publishes raw bytes to the batch's results, as anyone allowed on the exchange could.
async fn publish_results(broker: &Broker, env: &Env, batch: &str, messages: Vec<Vec<u8>>) {
    for bytes in messages {
        let confirm = broker
            .channel()
            .basic_publish(
                env.topology().results_exchange().into(),
                batch.into(),
                Default::default(),
                &bytes,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
        confirm.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_result_is_not_written() {
    let env = Env::new("forged");
    let batch = "bforged";
    env.track(batch);
    let broker = connect(&env).await;
    broker.declare_results_queue(batch).await.unwrap();
    let (identity, _, genuine) = created_unpublished(&env, batch, "forged-1").await;

    // The forger knows the job id, the registered fingerprint and the batch's public
    // recipient, and sends its own key first.
    let mut forged: serde_json::Value = serde_json::from_slice(&genuine).unwrap();
    let own = keygen::generate(KeyBits::B2048, keygen::Engine::default()).unwrap();
    forged["response"]["PrivateKeyBody"] =
        serde_json::json!(transit::seal(&identity.to_public(), &own.private_pem).unwrap());
    publish_results(
        &broker,
        &env,
        batch,
        vec![forged.to_string().into_bytes(), genuine],
    )
    .await;
    let c = env.collect(batch, "out", Duration::from_secs(30)).await;
    assert!(c.complete, "{c:?}");
    assert_eq!(c.rejected, 1, "{c:?}");
    let (created, _) = check_batch(&env, "out", 1).await;
    assert_eq!(created, 1);
    let kept = env.path("out/rejected.jsonl");
    let text = std::fs::read_to_string(&kept).unwrap();
    assert!(text.contains("not the registered key"), "{text}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&kept).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_write_is_not_acked() {
    let mut env = Env::new("failwrite");
    env.start_worker(&["--threads", "1"]);
    let input = env.write("fleet.csv", &fleet_csv(3, "cn-chengdu"));
    env.submit(&input, "bfail").await;
    env.wait_status("bfail", Duration::from_secs(120), |s| s.created >= 3)
        .await;
    // The key folder cannot be written: collect stops and acks nothing it did not write.
    let out = env.path("out");
    std::fs::create_dir_all(out.join("aliyun")).unwrap();
    std::fs::write(out.join("aliyun/acct"), "a file where a folder must go").unwrap();
    let opts = keyfleet::modes::collect::CollectOptions {
        batch_id: "bfail".into(),
        out: out.clone(),
        identity: Some(env.identity("bfail")),
        keep_identity: false,
        endpoints: env.endpoints(),
        idle_timeout: Duration::from_secs(10),
        progress: keyfleet::telemetry::progress::ProgressMode::Off,
        until: None,
        annotate: None,
    };
    let err = keyfleet::modes::collect::collect(opts, CancellationToken::new())
        .await
        .expect_err("the write fails");
    assert!(format!("{err:#}").contains("stays on the queue"), "{err:#}");
    // Fixed, and run again: every key is there.
    std::fs::remove_file(out.join("aliyun/acct")).unwrap();
    let c = env.collect("bfail", "out", Duration::from_secs(30)).await;
    assert!(c.complete, "{c:?}");
    let (created, _) = check_batch(&env, "out", 3).await;
    assert_eq!(created, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_failure_does_not_hide_the_created_key() {
    let env = Env::new("forgedfail");
    let batch = "bforgedfail";
    env.track(batch);
    let broker = connect(&env).await;
    broker.declare_results_queue(batch).await.unwrap();
    let (_, job, genuine) = created_unpublished(&env, batch, "hidden-1").await;
    let forged = JobResult::failed(
        &job,
        &keyfleet::dialect::ApiError::QuotaExceeded,
        keyfleet::time::now_rfc3339(),
        1,
    );
    // Anyone who may publish to the results exchange sends a failure for the job first.
    publish_results(
        &broker,
        &env,
        batch,
        vec![serde_json::to_vec(&forged).unwrap(), genuine],
    )
    .await;
    let c = env.collect(batch, "out", Duration::from_secs(10)).await;
    assert!(c.complete, "{c:?}");
    let lines = manifest(&env.path("out"));
    let last = lines.last().unwrap();
    assert_eq!(last["status"], "created", "{lines:?}");
    let pem = std::fs::read_to_string(last["private_key_file"].as_str().unwrap()).unwrap();
    let (_, sha256) = keygen::fingerprints_of_pem(&pem).unwrap();
    assert_eq!(sha256, last["fingerprint_sha256"].as_str().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_results_whose_keys_do_not_decrypt_stay_on_the_queue_whole() {
    let env = Env::new("v2kept");
    let batch = "bv2kept";
    env.track(batch);
    let broker = connect(&env).await;
    broker.declare_results_queue(batch).await.unwrap();
    let (identity, made) = created_unpublished_jobs(&env, batch, &["v2-a", "v2-b"]).await;
    let genuine: Vec<&[u8]> = made.iter().map(|(_, m)| m.as_slice()).collect();
    // Sealed to someone else: this collect cannot read either key, so it writes neither and
    // acks nothing.
    let stranger = transit::Identity::generate().to_public();
    publish_results(
        &broker,
        &env,
        batch,
        vec![v2_results(batch, &genuine, &identity, &stranger)],
    )
    .await;
    let c = env.collect(batch, "out", Duration::from_secs(3)).await;
    assert!(!c.complete, "{c:?}");
    assert_eq!((c.kept, c.collected), (2, 0), "{c:?}");
    // The message the batch's identity opens: both keys written, each the registered key; the
    // other message is still on the queue, read again and kept again.
    publish_results(
        &broker,
        &env,
        batch,
        vec![v2_results(
            batch,
            &genuine,
            &identity,
            &identity.to_public(),
        )],
    )
    .await;
    let c = env.collect(batch, "out", Duration::from_secs(10)).await;
    assert!(c.complete, "{c:?}");
    assert_eq!(c.kept, 2, "{c:?}");
    let (created, _) = check_batch(&env, "out", 2).await;
    assert_eq!(created, 2);
}
