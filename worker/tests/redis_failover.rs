//! A Redis Cluster master fails over in the middle of a distributed batch. The test starts its
//! own cluster of three masters with one replica each (six `redis-server` processes on
//! loopback, `cluster-node-timeout` 3 s), SIGKILLs the master that holds the batch's scope at
//! once while two workers are creating keys — without waiting for its replica to catch up —
//! and checks that the batch still ends with every job answered once and every key file the
//! registered key, after the replica has taken over.
//!
//! Redis replicates asynchronously: without `--redis-replicas` a failover to a replica that is
//! behind loses writes keyfleet has acted on (2 of 11 runs of this kill lost keys before the
//! setting existed). The workers, `submit` and `collect` run with `--redis-replicas 1`, so every
//! write they act on is on the replica first. The killed node is then started again, empty,
//! and rejoins as the promoted master's replica: until it has synced, that master has no
//! replica and every write to it is refused and retried (`--redis-replicas 1` asks for one).
//! `scripts/failover-repeat.sh N` runs this test N times and counts the passes.

mod util;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use util::{check_batch, fleet_csv, Env};

/// Six nodes on loopback, killed when dropped.
struct Cluster {
    ports: Vec<u16>,
    nodes: Vec<Child>,
    dir: tempfile::TempDir,
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli is required (scripts/test.sh installs redis)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Cluster {
    /// Starts the node on `port` in its folder under `dir` (its `nodes.conf` kept there, so a
    /// node started again rejoins the cluster it knew).
    fn spawn_node(dir: &std::path::Path, port: u16) -> Child {
        let node_dir: PathBuf = dir.join(port.to_string());
        std::fs::create_dir_all(&node_dir).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node_dir.join("redis.log"))
            .unwrap();
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            // 3 s: a loaded 2-core machine must not fail masters over by itself. No delay
            // before a full sync (the default waits 5 s for more replicas).
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "3000"])
            .args(["--repl-diskless-sync-delay", "0"])
            .args(["--cluster-config-file", "nodes.conf"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&node_dir)
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is required (scripts/test.sh installs redis)")
    }

    fn start(ports: Vec<u16>) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let nodes = ports
            .iter()
            .map(|&p| Cluster::spawn_node(dir.path(), p))
            .collect();
        let cluster = Cluster { ports, nodes, dir };
        for &p in &cluster.ports {
            wait_until(&format!("redis on {p}"), Duration::from_secs(20), || {
                cli(p, &["ping"]).trim() == "PONG"
            });
        }
        let addrs: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(created.success(), "redis-cli --cluster create");
        wait_until("the cluster", Duration::from_secs(30), || {
            cluster.ports.iter().all(|&p| cluster.state_ok(p)) && cluster.masters().len() == 3
        });
        // Every replica has its master's data stream before the batch starts.
        wait_until("replication links", Duration::from_secs(30), || {
            cluster
                .ports
                .iter()
                .filter(|p| !cluster.masters().contains(p))
                .all(|&p| cli(p, &["info", "replication"]).contains("master_link_status:up"))
        });
        cluster
    }

    fn state_ok(&self, port: u16) -> bool {
        cli(port, &["cluster", "info"]).contains("cluster_state:ok")
    }

    /// Ports of the live masters, as the first live node sees the cluster.
    fn masters(&self) -> Vec<u16> {
        let Some(&asked) = self
            .ports
            .iter()
            .find(|&&p| cli(p, &["ping"]).trim() == "PONG")
        else {
            return Vec::new();
        };
        cli(asked, &["cluster", "nodes"])
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail"))
            .filter_map(|l| {
                let addr = l.split_whitespace().nth(1)?;
                addr.split(['@', ':']).nth(1)?.parse().ok()
            })
            .collect()
    }

    /// The port of the replica of the master on `port`, as the master reports it.
    fn replica_of(&self, port: u16) -> u16 {
        cli(port, &["info", "replication"])
            .lines()
            .find(|l| l.starts_with("slave0:"))
            .and_then(|l| l.split(',').find_map(|kv| kv.strip_prefix("port=")))
            .and_then(|p| p.parse().ok())
            .expect("the master has a replica")
    }

    /// Whether the master on `port` has a replica whose link is up and which has finished its
    /// first sync (`state=online`).
    fn has_online_replica(&self, port: u16) -> bool {
        cli(port, &["info", "replication"])
            .lines()
            .any(|l| l.starts_with("slave0:") && l.contains("state=online"))
    }

    fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn kill(&mut self, port: u16) {
        let i = self.ports.iter().position(|&p| p == port).unwrap();
        self.nodes[i].kill().unwrap();
        self.nodes[i].wait().unwrap();
    }

    /// Starts the killed node on `port` again: empty (no persistence), it rejoins the cluster
    /// as a replica of the master that took its slots.
    fn restart(&mut self, port: u16) {
        let i = self.ports.iter().position(|&p| p == port).unwrap();
        self.nodes[i] = Cluster::spawn_node(self.dir.path(), port);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            let _ = n.kill();
            let _ = n.wait();
        }
    }
}

/// Six loopback ports that are free, each with its cluster bus port (`+ 10000`) free too, so
/// two test runs on one machine do not collide.
fn ports() -> Vec<u16> {
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    let mut out = Vec::new();
    while out.len() < 6 {
        let p = 20_000 + (uuid::Uuid::new_v4().as_u128() % 20_000) as u16;
        if !out.contains(&p) && free(p) && free(p + 10_000) {
            out.push(p);
        }
    }
    out
}

fn holds_keys(port: u16, pattern: &str) -> bool {
    !cli(port, &["--scan", "--pattern", pattern])
        .trim()
        .is_empty()
}

/// The fault: keyfleet acted on writes no replica had yet, so a master killed at once lost a
/// pair's record or the batch's totals to the failover, and `collect` dropped the keys it could
/// no longer vouch for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_at_once_loses_no_key_with_redis_replicas_1() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(ports()))
        .await
        .unwrap();
    // 1 unless a control run asks for another value (scripts/failover-repeat.sh).
    let replicas = std::env::var("KEYFLEET_TEST_FAILOVER_REPLICAS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut env = Env::new("failover")
        .on_redis(&cluster.urls())
        .with_redis_replicas(replicas);
    env.start_worker(&["--threads", "1", "--concurrency", "4"]);
    env.start_worker(&["--threads", "1", "--concurrency", "4"]);
    let input = env.write("fleet.csv", &fleet_csv(80, "cn-shenzhen"));
    env.submit(&input, "bfailover").await;
    env.wait_status("bfailover", Duration::from_secs(120), |s| s.created >= 15)
        .await;
    // The master holding the scope's registry keys (one hash slot) goes away at once, mid-batch,
    // whatever its replica has seen of it.
    let pattern = format!("{}:*:pairs", env.prefix);
    let (mut cluster, victim, replica) = tokio::task::spawn_blocking(move || {
        let victim = cluster
            .masters()
            .into_iter()
            .find(|&p| holds_keys(p, &pattern))
            .expect("a master holds the scope");
        let replica = cluster.replica_of(victim);
        (cluster, victim, replica)
    })
    .await
    .unwrap();
    let before = env.status("bfailover").await.unwrap();
    // The replica is behind when the master dies: its link is cut and cannot come back (the
    // master takes no new connection; its clients keep theirs), and the master dies 300 ms
    // later with whatever it took meanwhile. On loopback a connected replica is rarely behind
    // at the kill; a replica in a resynchronisation is (the 2-in-11 losses of the issue).
    // With `--redis-replicas 0` (`KEYFLEET_TEST_FAILOVER_REPLICAS=0`) this loses keys.
    cli(victim, &["config", "set", "maxclients", "1"]);
    cli(replica, &["client", "kill", "type", "master"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.kill(victim);
    let killed = Instant::now();
    assert!(
        before.answered < 80,
        "the master dies mid-batch, not after it: {before:?}"
    );
    let cluster = tokio::task::spawn_blocking(move || {
        wait_until("a replica promoted", Duration::from_secs(30), || {
            let masters = cluster.masters();
            masters.len() == 3 && masters.contains(&replica)
        });
        // The promoted master has no replica now; the killed node comes back as one.
        cluster.restart(victim);
        wait_until(
            "the old master back as the new one's replica",
            Duration::from_secs(60),
            || cluster.has_online_replica(replica),
        );
        cluster
    })
    .await
    .unwrap();
    let took = killed.elapsed();
    let c = env
        .collect("bfailover", "out", Duration::from_secs(60))
        .await;
    if !c.complete {
        let status = env.status("bfailover").await;
        let records = {
            use keyfleet::registry::Registry;
            env.registry()
                .await
                .describe(&keyfleet::registry::Filter::default())
                .await
                .map(|r| (r.len(), r.iter().filter(|r| r.delivered).count()))
        };
        let logs: Vec<String> = (0..2)
            .flat_map(|n| {
                env.worker_log(n)
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .map(|l| format!("worker {n}: {}", &l[..l.len().min(300)]))
                    .collect::<Vec<_>>()
            })
            .collect();
        panic!(
            "{c:?} (failover and resync took {took:?})\nstatus {status:?}\nrecords (all, delivered) {records:?}\n{}",
            logs.join("\n")
        );
    }
    let (created, failed) = check_batch(&env, "out", 80).await;
    assert_eq!((created, failed.len()), (80, 0), "{failed:?}");
    // A worker counts a job's outcome after its key is marked delivered, so `collect` can be
    // done before the last count is in (with `WAIT`, a replica round trip later): the count
    // must arrive, and be exact. A count the failover lost would never arrive.
    env.wait_status("bfailover", Duration::from_secs(60), |s| s.created >= 80)
        .await;
    let status = env.status("bfailover").await.unwrap();
    assert_eq!(
        (status.total, status.answered, status.created),
        (Some(80), 80, 80),
        "{status:?}"
    );
    drop(cluster);
}
