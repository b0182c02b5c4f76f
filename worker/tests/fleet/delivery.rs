//! The delivery path against the real RabbitMQ and Redis: the two faults it once had, each
//! pinned by a test named after it.
//! - A worker killed between publishing a result and marking its pair delivered: the job comes
//!   back and replaces the pair, so the first result's key must never be the one written.
//! - A valid job whose results queue does not exist: the broker returns the result, which must
//!   not reach any log (it holds a private key); the job is dead-lettered, the pair released.

use std::sync::Arc;
use std::time::Duration;

use crate::util::{amqp_url, check_batch, job, manifest, Env};
use futures::StreamExt;
use keyfleet::dialect::{Provider, Scope};
use keyfleet::job::{Job, JobResult};
use keyfleet::keys::cpu::CpuPool;
use keyfleet::lifecycle::{Finished, Lifecycle};
use keyfleet::queue::broker::{self, Broker, REASON_HEADER};
use keyfleet::registry::batch_status::BatchStatusStore;
use keyfleet::registry::{Entry, Registry, RegistryError};
use keyfleet::retry::RetryPolicy;
use keyfleet::settings::Settings;
use keyfleet::sink::{DeliveryError, ResultsQueue, Sink};
use keyfleet::upstream::LocalUpstream;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A worker that publishes its result and is killed before it can tell the registry.
struct KilledAfterPublish<'a>(ResultsQueue<'a>);

impl Sink for KilledAfterPublish<'_> {
    const ANSWERS_REPEATED_JOBS: bool = false;

    async fn deliver(&self, result: &mut JobResult) -> Result<(), DeliveryError> {
        self.0.deliver(result).await?;
        Err(DeliveryError::Unconfirmed(
            "SIGKILL after publishing".into(),
        ))
    }

    async fn settled(&self, _: &str, _: Uuid, _: &str) -> Result<(), RegistryError> {
        panic!("a killed worker settles nothing")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_key_is_the_registered_key_after_worker_kill() {
    let env = Env::new("killwindow");
    let batch = "bkillwindow";
    env.track(batch);
    let broker = Broker::connect(&amqp_url(), env.topology(), Duration::from_secs(10))
        .await
        .unwrap();
    broker.declare().await.unwrap();
    broker.declare_results_queue(batch).await.unwrap();
    let registry = env.registry().await;
    let status = BatchStatusStore::from_connection(registry.connection(), &env.prefix);
    status.set_total(batch, 1).await.unwrap();
    env.give_recipient(batch).await;

    // Attempt 1: made its key, committed the pair undelivered, published the result, died.
    let job = job(batch, "killed-mid-delivery");
    let lifecycle = Lifecycle::new(
        Arc::new(registry.clone()),
        Arc::new(LocalUpstream),
        CpuPool::new(1).unwrap(),
        Settings::default(),
        RetryPolicy::queue(),
        CancellationToken::new(),
    );
    let killed = KilledAfterPublish(ResultsQueue::new(&broker, &status));
    let finished = lifecycle.process(job.clone(), 1, &killed).await;
    assert!(matches!(finished, Finished::HandBack(_)), "{finished:?}");
    let scope = Scope {
        provider: Provider::Aliyun,
        owner: "acct".into(),
        region: "cn-hangzhou".into(),
    };
    let first = match registry
        .lookup(&scope, "killed-mid-delivery")
        .await
        .unwrap()
    {
        Some(Entry::Pair(r)) => r,
        other => panic!("attempt 1 left {other:?}"),
    };
    assert!(!first.delivered);

    // A collector reads attempt 1's result while the registry still holds that pair, and the
    // broker redelivers the job to a live worker, which replaces the pair with a new key.
    let mut worker = None;
    let redeliver = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let confirm = broker.publish_job(&job).await.unwrap();
        broker::confirmed(confirm, "jobs").await.unwrap();
        worker = Some(
            env.worker_command(&["--threads", "1"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
    };
    let (summary, ()) = tokio::join!(
        env.collect(batch, "out", Duration::from_secs(60)),
        redeliver
    );
    if let Some(mut w) = worker {
        let _ = w.kill();
        let _ = w.wait();
    }
    assert!(summary.complete, "{summary:?}");
    assert_eq!(
        summary.duplicates, 1,
        "attempt 1's result was dropped: {summary:?}"
    );
    let (created, failed) = check_batch(&env, "out", 1).await;
    assert_eq!((created, failed.len()), (1, 0));
    let line = &manifest(&env.path("out"))[0];
    assert_ne!(
        line["fingerprint_sha256"].as_str().unwrap(),
        first.fingerprint_sha256,
        "the key written is the second attempt's, the one registered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_result_never_logged_and_dead_lettered() {
    let mut env = Env::new("unroutable");
    // WARN from dependencies is on, as it is with the worker's default filter.
    let w = env.start_worker(&["--threads", "1", "--log", "info,keyfleet=debug"]);
    let broker = Broker::connect(&amqp_url(), env.topology(), Duration::from_secs(10))
        .await
        .unwrap();
    broker.declare().await.unwrap();
    // Batch ids whose results queue nobody declared.
    let batches = ["x}:jobs", "a/b", ".."];
    for (i, batch) in batches.iter().enumerate() {
        env.give_recipient(batch).await;
        let confirm = broker
            .publish_job(&job(batch, &format!("lost-{i}")))
            .await
            .unwrap();
        broker::confirmed(confirm, "jobs").await.unwrap();
    }
    let mut dead = crate::util::dead_letters(&broker, &env).await;
    let mut reasons = Vec::new();
    while reasons.len() < batches.len() {
        let d = tokio::time::timeout(Duration::from_secs(60), dead.next())
            .await
            .expect("the jobs reach the dead-letter queue")
            .unwrap()
            .unwrap();
        let job: Job = serde_json::from_slice(&d.data).expect("the job itself is dead-lettered");
        assert!(job.params["KeyPairName"].starts_with("lost-"));
        reasons.push(broker::header_str(&d.properties, REASON_HEADER).expect("reason"));
    }
    for r in &reasons {
        assert!(r.contains("no queue takes messages"), "{reasons:?}");
    }
    // No pair was kept for a key nobody can receive.
    let registry = env.registry().await;
    let scope = Scope {
        provider: Provider::Aliyun,
        owner: "acct".into(),
        region: "cn-hangzhou".into(),
    };
    assert_eq!(registry.quota_used(&scope).await.unwrap(), 0);
    for i in 0..batches.len() {
        assert_eq!(
            registry.lookup(&scope, &format!("lost-{i}")).await.unwrap(),
            None
        );
    }
    crate::util::signal(env.worker(w), "TERM");
    let _ = env.worker(w).wait();
    let log = env.worker_log(w);
    assert!(
        log.contains("dead-lettering a job whose result cannot be delivered"),
        "{log}"
    );
    for leak in ["PRIVATE KEY", "returned us a message", "data: [", "MII"] {
        assert!(!log.contains(leak), "the worker log holds {leak:?}:\n{log}");
    }
}
