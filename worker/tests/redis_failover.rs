//! A Redis Cluster master fails over in the middle of a distributed batch. The test starts its
//! own cluster of three masters with one replica each (six `redis-server` processes on
//! loopback, `cluster-node-timeout` 1 s), SIGKILLs the master that holds the batch's scope while
//! two workers are creating keys, and checks that the batch still ends with every job answered
//! once and every key file the registered key, after the replica has taken over.
//!
//! The kill waits until that master's replica has caught up (replication offsets): Redis
//! replicates asynchronously, so a failover to a replica still behind would lose writes
//! keyfleet has acted on, and keyfleet does not `WAIT` for replicas. (A first version of this
//! test killed at once with a 1 s node timeout on this loaded 2-core machine; in about one run
//! in six the promoted replica held nothing of the batch's earlier writes.)

mod util;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use util::{check_batch, fleet_csv, Env};

/// Six nodes on loopback, killed when dropped.
struct Cluster {
    ports: Vec<u16>,
    nodes: Vec<Child>,
    _dir: tempfile::TempDir,
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
    fn start(ports: Vec<u16>) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for &p in &ports {
            let node_dir: PathBuf = dir.path().join(p.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            let log = std::fs::File::create(node_dir.join("redis.log")).unwrap();
            let child = Command::new("redis-server")
                .args(["--port", &p.to_string(), "--bind", "127.0.0.1"])
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
                .expect("redis-server is required (scripts/test.sh installs redis)");
            nodes.push(child);
        }
        let cluster = Cluster {
            ports,
            nodes,
            _dir: dir,
        };
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

    /// The replica of the master on `port`, once it has caught up with everything the master
    /// had written when this was called (replication offsets, as `INFO replication` shows).
    fn caught_up_replica(&self, port: u16) -> u16 {
        let info = cli(port, &["info", "replication"]);
        let field = |text: &str, key: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
        };
        let target = field(&info, "master_repl_offset:").expect("master offset");
        let replica = info
            .lines()
            .find(|l| l.starts_with("slave0:"))
            .and_then(|l| l.split(',').find_map(|kv| kv.strip_prefix("port=")))
            .and_then(|p| p.parse().ok())
            .expect("the master has a replica");
        wait_until("the replica caught up", Duration::from_secs(30), || {
            let r = cli(replica, &["info", "replication"]);
            r.contains("master_link_status:up")
                && field(&r, "slave_repl_offset:").is_some_and(|o| o >= target)
        });
        replica
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_rides_through_a_cluster_master_failover() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(ports()))
        .await
        .unwrap();
    let mut env = Env::new("failover").on_redis(&cluster.urls());
    env.start_worker(&["--threads", "1", "--concurrency", "4"]);
    env.start_worker(&["--threads", "1", "--concurrency", "4"]);
    let input = env.write("fleet.csv", &fleet_csv(80, "cn-shenzhen"));
    env.submit(&input, "bfailover").await;
    env.wait_status("bfailover", Duration::from_secs(120), |s| s.created >= 15)
        .await;
    // The master holding the scope's registry keys (one hash slot) goes away for good.
    let pattern = format!("{}:*:pairs", env.prefix);
    let victim = cluster
        .masters()
        .into_iter()
        .find(|&p| holds_keys(p, &pattern))
        .expect("a master holds the scope");
    // A failover promotes a replica that is in sync (a replica still loading its first copy
    // is not a failover keyfleet can survive: Redis replicates asynchronously).
    let (cluster, replica) = tokio::task::spawn_blocking(move || {
        let replica = cluster.caught_up_replica(victim);
        (cluster, replica)
    })
    .await
    .unwrap();
    let mut cluster = cluster;
    cluster.kill(victim);
    let promoted = Instant::now();
    let cluster = tokio::task::spawn_blocking(move || {
        wait_until("a replica promoted", Duration::from_secs(30), || {
            let masters = cluster.masters();
            masters.len() == 3 && masters.contains(&replica)
        });
        cluster
    })
    .await
    .unwrap();
    let took = promoted.elapsed();
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
            "{c:?} (failover took {took:?})\nstatus {status:?}\nrecords (all, delivered) {records:?}\n{}",
            logs.join("\n")
        );
    }
    let (created, failed) = check_batch(&env, "out", 80).await;
    assert_eq!((created, failed.len()), (80, 0), "{failed:?}");
    let status = env.status("bfailover").await.unwrap();
    assert_eq!(status.created, 80, "{status:?}");
    drop(cluster);
}
