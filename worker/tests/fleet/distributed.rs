//! Distributed mode against the real RabbitMQ and Redis: many workers and one quota, a worker
//! killed mid-batch, poison messages, jobs from any AMQP client (v1 and v2 messages), drain on
//! SIGTERM, start-up with a server down. Every test has its own queue and key prefix and is
//! bounded by timeouts.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::util::{check_batch, fleet_csv, job, manifest, signal, Env};
use futures::StreamExt;
use keyfleet::queue::broker::{Broker, REASON_HEADER};
use lapin::BasicProperties;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_1200_jobs_one_region_create_exactly_500() {
    let mut env = Env::new("quota");
    for _ in 0..3 {
        env.start_worker(&["--threads", "1"]);
    }
    let input = env.write("fleet.csv", &fleet_csv(1200, "cn-hangzhou"));
    let s = env.submit(&input, "b1200").await;
    assert_eq!((s.rows, s.enqueued, s.rejected), (1200, 1200, 0));
    let c = env.collect("b1200", "out", Duration::from_secs(120)).await;
    assert!(c.complete, "{c:?}");
    let (created, failed) = check_batch(&env, "out", 1200).await;
    assert_eq!(created, 500);
    assert_eq!(
        failed,
        BTreeMap::from([("QuotaExceed.KeyPair".to_owned(), 700)])
    );
    let st = env.status("b1200").await.unwrap();
    assert_eq!(
        (st.total, st.created, st.pending()),
        (Some(1200), 500, Some(0))
    );
    // All three workers took part.
    for n in 0..3 {
        assert!(
            env.worker_log(n).contains("consuming"),
            "worker {n}: {}",
            env.worker_log(n)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_batch_every_job_answered_once_and_keys_delivered_once() {
    let mut env = Env::new("sigkill");
    let victim = env.start_worker(&["--threads", "1", "--concurrency", "4"]);
    env.start_worker(&["--threads", "1", "--concurrency", "4"]);
    let input = env.write("fleet.csv", &fleet_csv(80, "cn-beijing"));
    env.submit(&input, "bkill").await;
    env.wait_status("bkill", Duration::from_secs(120), |s| s.created >= 15)
        .await;
    signal(env.worker(victim), "KILL");
    let _ = env.worker(victim).wait();
    let c = env.collect("bkill", "out", Duration::from_secs(60)).await;
    assert!(c.complete, "{c:?}");
    let (created, failed) = check_batch(&env, "out", 80).await;
    assert_eq!((created, failed.len()), (80, 0), "{failed:?}");
}

/// A producer other than `keyfleet submit`, ready for `batch`: the topology and the batch's
/// results queue declared (results need somewhere to go), and the batch's recipient recorded
/// (README: such a producer records it itself).
async fn foreign_producer(env: &Env, batch: &str) -> Broker {
    let broker = Broker::connect(
        &crate::util::amqp_url(),
        env.topology(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    broker.declare().await.unwrap();
    broker.declare_results_queue(batch).await.unwrap();
    env.give_recipient(batch).await;
    broker
}

/// The properties the job-message contract asks for.
fn job_properties(batch: &str, message_id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_correlation_id(batch.into())
        .with_message_id(message_id.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_message_is_dead_lettered_and_bad_jobs_get_error_results() {
    let mut env = Env::new("poison");
    env.start_worker(&["--threads", "1"]);
    let broker = foreign_producer(&env, "bpoison").await;
    // Something that is not a result on the results queue does not stop collect: it is kept
    // aside (0600, it might hold a key) and acked. Published before the jobs, so it is ahead of
    // their results: published after them, it raced the worker, and collect could see the
    // batch complete before reaching it.
    let confirm = broker
        .channel()
        .basic_publish(
            env.topology().results_exchange().into(),
            "bpoison".into(),
            Default::default(),
            b"garbage on the results queue",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
    confirm.await.unwrap();
    let props = |id: &str| job_properties("bpoison", id);
    // 1. Not JSON at all.
    let poison_id = uuid::Uuid::new_v4().to_string();
    broker
        .publish_raw_job(b"\x00\x01 this is not json", props(&poison_id))
        .await
        .unwrap();
    // 2. The documented format, from "any AMQP client", with a bad name: an error result.
    let bad = serde_json::json!({"v": 1, "job_id": uuid::Uuid::new_v4(), "batch_id": "bpoison",
        "provider": "aliyun", "owner": "acct", "params": {"RegionId": "cn-hangzhou", "KeyPairName": "1bad"}, "key_bits": 2048});
    broker
        .publish_raw_job(bad.to_string().as_bytes(), props("b"))
        .await
        .unwrap();
    // 3. The documented format, valid: created.
    let good = serde_json::json!({"v": 1, "job_id": uuid::Uuid::new_v4(), "batch_id": "bpoison",
        "provider": "ucloud", "owner": "org-1", "params": {"KeyPairName": "from-any-client"}});
    broker
        .publish_raw_job(good.to_string().as_bytes(), props("g"))
        .await
        .unwrap();
    // 4. A future version: dead-lettered too.
    let future = serde_json::json!({"v": 3, "job_id": uuid::Uuid::new_v4(), "batch_id": "bpoison",
        "provider": "aliyun", "owner": "acct", "params": {}});
    broker
        .publish_raw_job(future.to_string().as_bytes(), props("f"))
        .await
        .unwrap();

    let redis = env.registry().await;
    let store = keyfleet::registry::batch_status::BatchStatusStore::from_connection(
        redis.connection(),
        &env.prefix,
    );
    store.set_total("bpoison", 4).await.unwrap();
    let c = env.collect("bpoison", "out", Duration::from_secs(60)).await;
    assert!(c.complete, "{c:?}");
    let lines = manifest(&env.path("out"));
    let codes: BTreeMap<String, String> = lines
        .iter()
        .map(|l| {
            (
                l["job_id"].as_str().unwrap().to_owned(),
                l["code"].as_str().unwrap_or("created").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        codes.get(&poison_id).map(String::as_str),
        Some("InvalidParameter"),
        "{lines:?}"
    );
    assert_eq!(
        codes
            .get(bad["job_id"].as_str().unwrap())
            .map(String::as_str),
        Some("InvalidKeyPairName.Malformed")
    );
    assert_eq!(
        codes
            .get(good["job_id"].as_str().unwrap())
            .map(String::as_str),
        Some("created")
    );

    let unreadable = env.path("out/unreadable.jsonl");
    assert!(std::fs::read_to_string(&unreadable)
        .unwrap()
        .contains("garbage on the results queue"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&unreadable).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // The dead-letter queue holds the two undecodable messages, each with a reason.
    let mut dead = crate::util::dead_letters(&broker, &env).await;
    let mut reasons = Vec::new();
    while reasons.len() < 2 {
        let d = tokio::time::timeout(Duration::from_secs(10), dead.next())
            .await
            .expect("dead letters")
            .unwrap()
            .unwrap();
        reasons.push(
            keyfleet::queue::broker::header_str(&d.properties, REASON_HEADER)
                .expect("reason header"),
        );
    }
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("not a keyfleet job message")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("version")), "{reasons:?}");
}

/// A v2 message (several jobs of one batch, from any AMQP client): each job is answered on its
/// own; a job that does not decode is answered under its own job id and dead-lettered alone,
/// its bytes as they were; the others are created, each key file the registered key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v2_message_runs_every_job_and_dead_letters_a_bad_one_alone() {
    tokio::time::timeout(Duration::from_secs(180), async {
        let mut env = Env::new("v2msg");
        env.start_worker(&["--threads", "1"]);
        env.track("bv2");
        let broker = foreign_producer(&env, "bv2").await;
        let good: Vec<_> = (0..3)
            .map(|i| serde_json::to_value(job("bv2", &format!("v2-{i}"))).unwrap())
            .collect();
        let bad_name = serde_json::to_value(job("bv2", "1bad")).unwrap();
        let broken_id = uuid::Uuid::new_v4();
        // A job with its params missing: not a job, answered under its own id.
        let broken = serde_json::json!({"v": 1, "job_id": broken_id, "batch_id": "bv2",
            "provider": "aliyun", "owner": "acct"});
        let message = serde_json::json!({"v": 2, "batch_id": "bv2",
            "jobs": [good[0], broken, good[1], bad_name, good[2]]});
        let props = job_properties("bv2", &uuid::Uuid::new_v4().to_string());
        broker
            .publish_raw_job(message.to_string().as_bytes(), props)
            .await
            .unwrap();
        let store = keyfleet::registry::batch_status::BatchStatusStore::from_connection(
            env.registry().await.connection(),
            &env.prefix,
        );
        store.set_total("bv2", 5).await.unwrap();
        let c = env.collect("bv2", "out", Duration::from_secs(60)).await;
        assert!(c.complete, "{c:?}");
        let (created, failed) = check_batch(&env, "out", 5).await;
        assert_eq!(created, 3);
        assert_eq!(
            failed,
            BTreeMap::from([
                ("InvalidKeyPairName.Malformed".to_owned(), 1),
                ("InvalidParameter".to_owned(), 1)
            ])
        );
        let broken_line = manifest(&env.path("out"))
            .into_iter()
            .find(|l| l["job_id"] == broken_id.to_string())
            .expect("the broken job is answered under its own id");
        assert_eq!(broken_line["status"], "failed");
        // The progress of the four jobs that ran together was counted together, and the
        // broken one's alone, before the message was acked: each job once.
        let status = store.status("bv2").await.unwrap().unwrap();
        assert_eq!(
            (status.answered, status.created, status.pending()),
            (5, 3, Some(0))
        );
        let failed: BTreeMap<String, u64> = failed
            .into_iter()
            .map(|(code, n)| (code, n as u64))
            .collect();
        assert_eq!(status.failed, failed);

        // The dead-letter queue holds the broken job alone, as it was sent, with its reason.
        let mut dead = crate::util::dead_letters(&broker, &env).await;
        let d = tokio::time::timeout(Duration::from_secs(10), dead.next())
            .await
            .expect("a dead letter")
            .unwrap()
            .unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&d.data).unwrap(),
            broken
        );
        let reason = keyfleet::queue::broker::header_str(&d.properties, REASON_HEADER)
            .expect("reason header");
        assert!(reason.contains("params"), "{reason}");
        assert!(
            tokio::time::timeout(Duration::from_secs(2), dead.next())
                .await
                .is_err(),
            "nothing else is dead-lettered"
        );
        broker.close().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_jobs_and_exits_0() {
    // Eight jobs a message, whatever `auto` would make of one worker consuming: the batch's
    // status moves a message at a time, so the signal comes with a message's jobs in flight.
    let mut env = Env::new("drain").with_jobs_per_message(8);
    let w = env.start_worker(&[
        "--threads",
        "1",
        "--concurrency",
        "3",
        "--drain-timeout",
        "60s",
    ]);
    let input = env.write("fleet.csv", &fleet_csv(40, "cn-shanghai"));
    env.submit(&input, "bdrain").await;
    env.wait_status("bdrain", Duration::from_secs(120), |s| s.created >= 3)
        .await;
    signal(env.worker(w), "TERM");
    let status = tokio::task::spawn_blocking({
        let mut child = std::mem::replace(
            env.worker(w),
            std::process::Command::new("true").spawn().unwrap(),
        );
        move || child.wait()
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(status.code(), Some(0), "{}", env.worker_log(w));
    assert!(env.worker_log(w).contains("draining"));
    // A second worker finishes whatever the first left unacked: nothing lost, nothing twice.
    env.start_worker(&["--threads", "1"]);
    let c = env.collect("bdrain", "out", Duration::from_secs(60)).await;
    assert!(c.complete, "{c:?}");
    let (created, _) = check_batch(&env, "out", 40).await;
    assert_eq!(created, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_with_a_server_down_fails_with_a_clear_message() {
    let env = Env::new("down");
    let (amqp, redis) = (crate::util::amqp_url(), crate::util::redis_url());
    for (amqp, redis, expect) in [
        (
            "amqp://guest:guest@127.0.0.1:1/%2f",
            redis.as_str(),
            "RabbitMQ",
        ),
        (amqp.as_str(), "redis://127.0.0.1:1/", "Redis"),
    ] {
        let started = std::time::Instant::now();
        let out = tokio::task::spawn_blocking({
            let mut cmd = env.worker_command_urls(amqp, redis, &["--connect-timeout", "3s"]);
            move || cmd.output().unwrap()
        })
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(
            text.contains(expect) && text.contains("127.0.0.1:1"),
            "{text}"
        );
        assert!(started.elapsed() < Duration::from_secs(30), "bounded wait");
    }
}

/// The exactly-once fault of a worker killed between publishing a result and marking its pair
/// delivered, tried for real: ten rounds, each killing one of two workers at a random point of
/// a batch, with v1 messages or v2 ones of 8 or 32 jobs. Every round, every key file must be
/// the registered key (`check_batch`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_ten_times_every_delivered_key_is_the_registered_key() {
    for round in 0..10 {
        // v2 messages of 8 jobs (rounds 0, 3, 6, 9), v1 messages of a job each (1, 4, 7), v2
        // of 32 (2, 5, 8: `auto` with one worker consuming, and every message after a batch's
        // first 256 jobs). With 32, the batch is two messages, one a worker, and the status
        // moves a message at a time: the kill comes once one of them is answered.
        let per_message = [8, 1, 32][round % 3];
        let mut env = Env::new(&format!("kill10-{round}")).with_jobs_per_message(per_message);
        let victim =
            env.start_worker(&["--threads", "1", "--concurrency", "8", "--reservoir", "0"]);
        env.start_worker(&["--threads", "1", "--concurrency", "8", "--reservoir", "0"]);
        let jobs = 60;
        let input = env.write("fleet.csv", &fleet_csv(jobs, "cn-qingdao"));
        let batch = format!("bk10-{round}");
        env.submit(&input, &batch).await;
        // Somewhere between a few and most of the batch answered.
        let at = 3 + u64::from(uuid::Uuid::new_v4().as_bytes()[0]) % 40;
        env.wait_status(&batch, Duration::from_secs(120), |s| s.answered >= at)
            .await;
        signal(env.worker(victim), "KILL");
        let _ = env.worker(victim).wait();
        let c = env.collect(&batch, "out", Duration::from_secs(60)).await;
        assert!(c.complete, "round {round}: {c:?}");
        let (created, failed) = check_batch(&env, "out", jobs).await;
        assert_eq!(
            (created, failed.len()),
            (jobs, 0),
            "round {round}: {failed:?}"
        );
    }
}

/// Told to stop while its servers are still being waited for, a worker stops at once instead
/// of sitting out the connect timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_start_up_stops_at_once() {
    let env = Env::new("startterm");
    // A broker that accepts the connection and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let amqp = format!("amqp://guest:guest@{}/%2f", silent.local_addr().unwrap());
    let mut child = env
        .worker_command_urls(
            &amqp,
            &crate::util::redis_url(),
            &["--connect-timeout", "120s"],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    signal(&child, "TERM");
    let started = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    drop(silent);
}

/// A distributed batch on a Redis Cluster (`--redis-url` with the node list): every job
/// answered once, every key file the registered key, one worker killed mid-batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_on_a_redis_cluster_with_a_worker_killed() {
    let urls = std::env::var("KEYFLEET_TEST_CLUSTER_URLS").unwrap_or_else(|_| {
        "redis://127.0.0.1:7101,redis://127.0.0.1:7102,redis://127.0.0.1:7103".into()
    });
    let mut env = Env::new("cluster").on_redis(&urls);
    let victim = env.start_worker(&["--threads", "1", "--concurrency", "4"]);
    env.start_worker(&["--threads", "1", "--concurrency", "4"]);
    let input = env.write("fleet.csv", &fleet_csv(60, "cn-shenzhen"));
    env.submit(&input, "bcluster").await;
    env.wait_status("bcluster", Duration::from_secs(120), |s| s.created >= 10)
        .await;
    signal(env.worker(victim), "KILL");
    let _ = env.worker(victim).wait();
    let c = env
        .collect("bcluster", "out", Duration::from_secs(60))
        .await;
    assert!(c.complete, "{c:?}");
    let (created, failed) = check_batch(&env, "out", 60).await;
    assert_eq!((created, failed.len()), (60, 0), "{failed:?}");
}

/// `auto` packs a batch's first 256 jobs 8 to a message so that they spread over workers;
/// with exactly one worker consuming the jobs queue there is nothing to spread over (its
/// prefetch takes them all), and `submit` packs 32 from the first job. With none consuming yet
/// (a backlog enqueued before its workers), the small first messages stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_packs_32_from_the_first_job_when_one_worker_consumes() {
    use keyfleet::job::message::JobMessage;
    let env = Env::new("auto-one");
    let input = env.write("fleet.csv", &fleet_csv(300, "cn-hangzhou"));
    // Published with no consumer on the jobs queue.
    env.submit(&input, "nobody").await;

    // One consumer, as RabbitMQ counts them (a worker's is the same basic.consume).
    let conn = lapin::Connection::connect(&crate::util::amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            env.topology().jobs_queue().into(),
            "auto-one-test".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    env.submit(&input, "one-worker").await;

    // Every message of both batches, as the sizes of its messages in order.
    let mut sizes: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sizes.values().flatten().sum::<usize>() < 600 {
        let delivery = tokio::time::timeout_at(deadline, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("messages missing after 30 s: {sizes:?}"))
            .expect("consumer ended")
            .expect("delivery");
        let (batch, n) = match JobMessage::decode(&delivery.data).unwrap() {
            JobMessage::One(job) => (job.batch_id, 1),
            JobMessage::Group { batch_id, jobs } => (batch_id, jobs.len()),
        };
        sizes.entry(batch).or_default().push(n);
    }
    let mut alone = vec![8; 32];
    alone.extend([32, 12]);
    assert_eq!(sizes["nobody"], alone, "no worker consuming: auto as it is");
    let mut one = vec![32; 9];
    one.push(12);
    assert_eq!(
        sizes["one-worker"], one,
        "one worker consuming: 32 from the first job"
    );
    let _ = conn.close(200, "done".into()).await;
}

/// Rows written to `submit -` one at a time reach the jobs queue while the pipe is still open:
/// the reader thread, which packs rows into messages, hands over a message as soon as the
/// publishing loop is waiting for one, rather than holding it for a full run. A row that is
/// not valid is answered at once, in its turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_from_a_pipe_publishes_each_row_while_the_pipe_is_open() {
    use std::io::Write;
    let env = Env::new("pipe");
    let batch = "pipe-batch";
    env.track(batch);
    let mut child = env
        .cli(&[
            "submit",
            "-",
            "--format",
            "csv",
            "--batch-id",
            batch,
            "--jobs-per-message",
            "1",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "RegionId,KeyPairName").unwrap();

    let conn = lapin::Connection::connect(&crate::util::amqp_url(), Default::default())
        .await
        .unwrap();
    let depth = |queue: String| {
        let conn = &conn;
        async move { crate::util::queue_counts(conn, &queue).await.0 }
    };
    let jobs_queue = env.topology().jobs_queue();
    let results_queue = env.topology().results_queue(batch);
    let until = |queue: String, want: u32| {
        let depth = &depth;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let n = depth(queue.clone()).await;
                if n >= want || std::time::Instant::now() > deadline {
                    return n;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    for i in 1..=3u32 {
        writeln!(stdin, "cn-hangzhou,pipe-{i}").unwrap();
        stdin.flush().unwrap();
        assert_eq!(
            until(jobs_queue.clone(), i).await,
            i,
            "row {i} was not published while the pipe stayed open"
        );
    }
    // Not a valid Alibaba name (it must start with a letter): answered at once.
    writeln!(stdin, "cn-hangzhou,9-bad").unwrap();
    stdin.flush().unwrap();
    assert_eq!(until(results_queue.clone(), 1).await, 1);
    writeln!(stdin, "cn-hangzhou,pipe-4").unwrap();
    drop(stdin);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("5 rows, 4 enqueued, 1 answered at once as failed"),
        "{stderr}"
    );
    assert_eq!(depth(jobs_queue).await, 4);
    assert_eq!(depth(results_queue).await, 1);
}
