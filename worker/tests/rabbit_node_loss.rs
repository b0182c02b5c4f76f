//! A RabbitMQ node dies in the middle of a distributed batch. On the 3-node cluster
//! `scripts/rabbit-cluster.sh` runs on loopback (scripts/test.sh starts it; this test starts
//! what is missing itself), two workers are given the three node URLs in different orders, the
//! batch is submitted, and once keys are being made the node leading the jobs quorum queue is
//! SIGKILLed. The batch must still end with every job answered once, every delivered key the
//! registered key, and nothing left on any of the batch's queues, unacked or ready; the worker
//! that was connected to the dead node must have moved to the next node of its list.
//!
//! The killed node is started again at the end (also when the test fails), so the next run
//! finds three nodes. A binary of its own: nothing else may run while a node of the cluster is
//! down, and it never touches the single RabbitMQ on 5672 the other tests use.

mod util;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyfleet::queue::broker::Broker;
use util::{check_batch, fleet_csv, Env};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/rabbit-cluster.sh")
}

/// Runs `scripts/rabbit-cluster.sh ARGS`, killed if it outlasts `limit`; returns whether it
/// succeeded and its standard output, or its standard error.
fn cluster(args: &[&str], limit: Duration) -> Result<String, String> {
    let child = Command::new(script())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", script().display()));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait for scripts/rabbit-cluster.sh"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            return Err(format!(
                "scripts/rabbit-cluster.sh {args:?} did not finish within {limit:?}"
            ));
        }
    };
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "scripts/rabbit-cluster.sh {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Node number (1-3) from a node name (`kf2@localhost`).
fn number(node: &str) -> Option<usize> {
    node.strip_prefix("kf")?.split('@').next()?.parse().ok()
}

/// The test's queues (names starting with `prefix`) as `rabbitmqctl list_queues` shows them on
/// the first of `nodes` that answers, each with its name and the requested columns.
fn queues(
    nodes: &[usize],
    prefix: &str,
    columns: &[&str],
) -> Result<Vec<serde_json::Value>, String> {
    let mut last = String::new();
    for n in nodes {
        let n = n.to_string();
        let mut args = vec!["ctl", &n, "-q", "list_queues", "--formatter", "json"];
        args.extend(["--timeout", "20", "name"]);
        args.extend(columns);
        match cluster(&args, Duration::from_secs(40)) {
            Ok(out) => {
                let all: Vec<serde_json::Value> = serde_json::from_str(out.trim())
                    .map_err(|e| format!("list_queues output {out:?}: {e}"))?;
                return Ok(all
                    .into_iter()
                    .filter(|q| q["name"].as_str().is_some_and(|s| s.starts_with(prefix)))
                    .collect());
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Starts again whatever node the test killed when dropped, so a failed run does not leave
/// the next one a two-node cluster.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        if let Err(e) = cluster(&["up"], Duration::from_secs(240)) {
            eprintln!("restarting the killed RabbitMQ node: {e}");
        }
    }
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> Result<bool, String>) {
    let start = Instant::now();
    let mut last = Ok(false);
    while start.elapsed() < limit {
        last = ok();
        if last == Ok(true) {
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("{what} within {limit:?} (last: {last:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_survives_losing_the_jobs_queue_leader() {
    // Up to ~1 min when nodes have to be started; seconds when the cluster is running.
    tokio::task::spawn_blocking(|| cluster(&["up"], Duration::from_secs(240)))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("the RabbitMQ cluster: {e}"));
    let urls: Vec<String> = std::env::var("KEYFLEET_TEST_RABBIT_CLUSTER_URLS")
        .ok()
        .or_else(|| cluster(&["urls"], Duration::from_secs(10)).ok())
        .expect("the cluster's URLs")
        .trim()
        .split(',')
        .map(str::to_owned)
        .collect();
    assert_eq!(urls.len(), 3, "{urls:?}");
    let port = |i: usize| {
        urls[i]
            .rsplit(':')
            .next()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_owned()
    };

    let mut env = Env::new("nodeloss").on_amqp(&urls.join(","));
    let restore = Restore;
    // The topology first, through node 1: a quorum queue's leader starts on the node its
    // declaring client is connected to (RabbitMQ's default), so the jobs queue and, through
    // submit, the batch's results queue start led from node 1.
    let broker = Broker::connect(&env.amqp, env.topology(), Duration::from_secs(10))
        .await
        .expect("connect to the cluster");
    broker.declare().await.expect("declare the topology");
    broker.close().await;
    let prefix = env.prefix.clone();
    let jobs_queue = env.topology().jobs_queue();
    let leader_of = move |q: &str, ask: &[usize]| -> Result<Option<usize>, String> {
        Ok(queues(ask, &prefix, &["leader"])?
            .iter()
            .find(|row| row["name"] == q)
            .and_then(|row| number(row["leader"].as_str()?)))
    };
    let victim = {
        let (leader_of, q) = (leader_of.clone(), jobs_queue.clone());
        tokio::task::spawn_blocking(move || leader_of(&q, &[1, 2, 3]))
            .await
            .unwrap()
            .expect("list_queues")
            .expect("the jobs queue has a leader")
    };
    let pid = cluster(&["pid", &victim.to_string()], Duration::from_secs(30))
        .expect("the leader's PID")
        .trim()
        .to_owned();
    // The leader and its PID are looked up before there is a batch (rabbitmqctl takes a second
    // or two a call, and a loaded machine makes keys quickly enough to finish first).
    // Worker 0 tries the nodes 1, 2, 3; worker 1 tries 2, 3, 1. Either may be on the node that
    // is killed; the other then keeps its connection while the queues' leaders move.
    let orders = [[0, 1, 2], [1, 2, 0]];
    for order in orders {
        let list: Vec<&str> = order.iter().map(|&i| urls[i].as_str()).collect();
        // Through `start_worker`, so the worker dies with the test, with this worker's order
        // of the URLs in place of the test's own.
        let saved = std::mem::replace(&mut env.amqp, list.join(","));
        env.start_worker(&["--threads", "1", "--concurrency", "4"]);
        env.amqp = saved;
    }

    let batch = "bnodeloss";
    let jobs = 160;
    let input = env.write("fleet.csv", &fleet_csv(jobs, "cn-chengdu"));
    env.submit(&input, batch).await;
    env.wait_status(batch, Duration::from_secs(180), |s| s.created >= 15)
        .await;
    let killed = Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .expect("kill");
    assert!(killed.success(), "kill -KILL {pid} (kf{victim})");
    let at = Instant::now();
    let made = env.status(batch).await.map_or(0, |s| s.created);
    assert!(
        made < jobs as u64,
        "the kill came after the batch ({made} keys)"
    );
    let survivors: Vec<usize> = (1..=3).filter(|&n| n != victim).collect();
    // A surviving member takes over the jobs queue (a Raft election among the two left).
    {
        let (leader_of, q, ask) = (leader_of.clone(), jobs_queue.clone(), survivors.clone());
        tokio::task::spawn_blocking(move || {
            wait_until(
                "a new leader of the jobs queue",
                Duration::from_secs(60),
                || Ok(leader_of(&q, &ask)?.is_some_and(|l| l != victim)),
            )
        })
        .await
        .unwrap();
    }
    let took = at.elapsed();
    eprintln!("killed kf{victim} (pid {pid}) with {made} of {jobs} keys made; a new leader of the jobs queue within {took:?}");

    // collect tries node 1 first: when that is the dead one, it goes on to node 2.
    let c = env.collect(batch, "out", Duration::from_secs(60)).await;
    let logs = || {
        (0..2)
            .map(|n| format!("worker {n}:\n{}", env.worker_log(n)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        c.complete,
        "{c:?} (kf{victim} killed; new leader after {took:?})\n{}",
        logs()
    );
    eprintln!(
        "collect: {} collected, {} duplicates dropped",
        c.collected, c.duplicates
    );
    let (created, failed) = check_batch(&env, "out", jobs).await;
    assert_eq!((created, failed.len()), (jobs, 0), "{failed:?}");
    let status = env.status(batch).await.unwrap();
    assert_eq!(status.created, jobs as u64, "{status:?}");

    // Nothing left behind: every job acked (none ready, none unacked, none dead-lettered), every
    // result taken. Workers ack after their result is confirmed, so the last acks may trail
    // collect by a moment.
    let prefix = env.prefix.clone();
    tokio::task::spawn_blocking(move || {
        wait_until(
            "every queue of the batch empty",
            Duration::from_secs(60),
            || {
                let rows = queues(
                    &survivors,
                    &prefix,
                    &[
                        "messages",
                        "messages_ready",
                        "messages_unacknowledged",
                        "type",
                        "members",
                    ],
                )?;
                if rows.len() < 3 {
                    return Err(format!("expected jobs, dead and results queues: {rows:?}"));
                }
                // Each a quorum queue with a member on every node (the dead one included): what
                // survived the loss was replicated, not lucky.
                for r in &rows {
                    let members = r["members"].as_array().map_or(0, Vec::len);
                    assert!(r["type"] == "quorum" && members == 3, "{r}");
                }
                Ok(rows.iter().all(|r| {
                    r["messages"] == 0
                        && r["messages_ready"] == 0
                        && r["messages_unacknowledged"] == 0
                }))
            },
        )
    })
    .await
    .unwrap();

    // The worker that lost its node reconnected to the next one on its list.
    for (w, order) in orders.iter().enumerate() {
        if order[0] + 1 == victim {
            let next = port(order[1]);
            let log = env.worker_log(w);
            for l in log.lines().filter(|l| l.contains("RabbitMQ")) {
                eprintln!("worker {w}: {}", &l[..l.len().min(240)]);
            }
            assert!(
                log.lines()
                    .any(|l| l.contains("reconnected to RabbitMQ") && l.contains(&next)),
                "worker {w} (on kf{victim} first) did not reconnect to 127.0.0.1:{next}:\n{log}"
            );
        }
    }
    // The node back before the test's queues are deleted.
    drop(restore);
    drop(env);
}
