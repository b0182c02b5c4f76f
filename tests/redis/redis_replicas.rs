//! `--redis-replicas`: every write that decides a key's fate waits for that many replicas
//! (`WAIT`) before it returns. Each test starts its own `redis-server` processes on loopback
//! (a lone master, or a master with one replica), so the shared Redis on 6379 is never given
//! or asked for a replica.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyfleet::registry::batch_status::BatchStatusStore;
use keyfleet::registry::connection::REPLICA_WAIT;
use keyfleet::registry::redis::RedisRegistry;
use keyfleet::registry::{Entry, Registry, RegistryError, Reserved};
use keyfleet::retry::Transient;
use uuid::Uuid;

use crate::redis_registry::{claim, hangzhou};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One `redis-server` on a free loopback port, killed when dropped.
struct Server {
    port: u16,
    child: Child,
    /// Its working folder: a replica writes the master's snapshot there (`dump.rdb`).
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts a server, as a replica of `master` when given, and waits until it answers (and,
    /// for a replica, until its link to the master is up).
    fn start(master: Option<u16>) -> Server {
        let port = free_port();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir.path())
            .args(["--save", "", "--appendonly", "no"])
            .args(["--repl-diskless-sync-delay", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(m) = master {
            cmd.args(["--replicaof", "127.0.0.1", &m.to_string()]);
        }
        let child = cmd
            .spawn()
            .expect("redis-server is required (scripts/test.sh installs redis)");
        let server = Server {
            port,
            child,
            _dir: dir,
        };
        server.wait_until("to answer PING", |s| s.cli(&["ping"]).trim() == "PONG");
        if master.is_some() {
            server.wait_until("its replication link up", |s| {
                s.cli(&["info", "replication"])
                    .contains("master_link_status:up")
            });
        }
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli is required (scripts/test.sh installs redis)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_until(&self, what: &str, ok: impl Fn(&Server) -> bool) {
        let start = Instant::now();
        while !ok(self) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "redis on {} {what} within 20 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The registry and the batch counters on `server`, sharing one connection whose writes wait
/// for `replicas` replicas, as the worker builds them.
async fn stores(server: &Server, replicas: u32) -> (RedisRegistry, BatchStatusStore) {
    let registry = RedisRegistry::connect(&server.url(), "kf", CONNECT_TIMEOUT)
        .await
        .expect("connect")
        .with_replicas(replicas);
    let status = BatchStatusStore::from_connection(registry.connection(), "kf");
    (registry, status)
}

/// The fault: writes returned before any replica had them, so a failover at that moment lost
/// a reservation, a record or a delivery mark keyfleet had acted on. With `--redis-replicas 1`
/// each write is on the replica by the time it returns — read from the replica itself, right
/// after, with nothing waited for in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_on_the_replica_when_it_returns() {
    let master = tokio::task::spawn_blocking(|| Server::start(None))
        .await
        .unwrap();
    let port = master.port;
    let replica = tokio::task::spawn_blocking(move || Server::start(Some(port)))
        .await
        .unwrap();
    let (registry, status) = stores(&master, 1).await;
    let on_replica = |key: String, field: &str| {
        let got = replica.cli(&["hget", &key, field]);
        got.trim().to_owned()
    };
    let scope = hangzhou();
    let pairs = registry.scope_keys(&scope).pairs;
    let job = Uuid::new_v4();
    let name = "web-1";

    assert_eq!(
        registry.reserve(&claim(&scope, name, job)).await.unwrap(),
        Reserved::Fresh
    );
    assert!(
        on_replica(pairs.clone(), name).contains("\"reserved\""),
        "the reservation is on the replica"
    );

    // The scripts are gone from the master (as after a restart): the write loads its script
    // again and still waits for the replica.
    assert_eq!(master.cli(&["script", "flush"]).trim(), "OK");
    registry
        .note_key(&scope, name, job, "ssh-rsa AAAAB3NzaC1yc2E web-1")
        .await
        .unwrap();
    assert!(on_replica(pairs.clone(), name).contains("ssh-rsa AAAAB3NzaC1yc2E web-1"));

    let record = keyfleet::dialect::record::KeyPairRecord {
        scope: scope.clone(),
        name: name.into(),
        job_id: job,
        key_pair_id: None,
        key_pair_fingerprint: "dialect-web-1".into(),
        fingerprint_md5: "md5-web-1".into(),
        fingerprint_sha256: "SHA256:web-1".into(),
        public_key: "ssh-rsa AAAAB3NzaC1yc2E web-1".into(),
        created_at: 1_700_000_000,
        tags: Vec::new(),
        resource_group_id: None,
        earlier_keys: Vec::new(),
        zone: None,
        delivered: false,
    };
    registry.commit(&record).await.unwrap();
    assert!(on_replica(pairs.clone(), name).contains("\"delivered\":false"));
    registry.mark_delivered(&scope, name, job).await.unwrap();
    assert!(on_replica(pairs.clone(), name).contains("\"delivered\":true"));

    let batch = status.batch_keys("b1").unwrap();
    status.set_total("b1", 3).await.unwrap();
    assert_eq!(on_replica(batch.counts.clone(), "total"), "3");
    assert!(status
        .record("b1", job, keyfleet::registry::batch_status::CREATED)
        .await
        .unwrap());
    assert_eq!(on_replica(batch.counts.clone(), "created"), "1");
    status.set_recipient("b1", "age1example").await.unwrap();
    assert_eq!(
        replica.cli(&["get", &batch.recipient]).trim(),
        "age1example"
    );

    assert!(registry.delete(&scope, name).await.unwrap());
    assert_eq!(on_replica(pairs, name), "", "the delete is on the replica");
}

/// The fault: `--redis-replicas 1` against a master with no replica must not pass silently
/// (WAIT answers 0). Each write is refused with a retryable error that names the setting —
/// after it landed on the master, so the retry the error asks for is safe (the same reserve
/// finds its own reservation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_without_replicas_fails_writes_with_a_retryable_error_naming_the_setting() {
    let lone = tokio::task::spawn_blocking(|| Server::start(None))
        .await
        .unwrap();
    let (registry, status) = stores(&lone, 1).await;
    let scope = hangzhou();
    let job = Uuid::new_v4();
    let started = Instant::now();
    let err = registry
        .reserve(&claim(&scope, "web-1", job))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() >= REPLICA_WAIT - Duration::from_millis(50),
        "WAIT gave the replica its time: {:?}",
        started.elapsed()
    );
    assert_eq!(
        err,
        RegistryError::ReplicasBehind {
            acked: 0,
            wanted: 1,
            waited: REPLICA_WAIT
        }
    );
    assert!(err.is_transient(), "the retry policy retries it");
    let message = err.to_string();
    assert!(
        message.contains("--redis-replicas") && message.contains("KEYFLEET_REDIS_REPLICAS"),
        "{message}"
    );
    assert!(matches!(
        status.set_total("b1", 1).await,
        Err(RegistryError::ReplicasBehind { acked: 0, .. })
    ));

    // The write stood on the master: asked again without replicas, the reserve is resumed.
    let (plain, _) = stores(&lone, 0).await;
    assert_eq!(
        plain.reserve(&claim(&scope, "web-1", job)).await.unwrap(),
        Reserved::Resumed
    );
    assert!(matches!(
        plain.lookup(&scope, "web-1").await.unwrap(),
        Some(Entry::Reserved { job_id, .. }) if job_id == job
    ));
}

/// The fault: a process started with `--redis-replicas 1` on a master that has no replica ran
/// on, every write waiting for a replica that was never coming and retried for ever. Now the
/// setting is checked when the process connects: refused at once with the count it found,
/// naming the setting (`describe` exits 2, as for any unusable setting, after giving a replica
/// its connect timeout to appear), and accepted once the master has its replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_few_replicas_are_refused_at_start_up_naming_the_setting() {
    let lone = tokio::task::spawn_blocking(|| Server::start(None))
        .await
        .unwrap();
    let (registry, status) = stores(&lone, 1).await;
    let err = registry.check_replicas(Duration::ZERO).await.unwrap_err();
    assert!(
        matches!(&err, RegistryError::TooFewReplicas { wanted: 1, found } if found.contains("has 0")),
        "{err:?}"
    );
    assert!(!err.is_transient(), "nothing to retry: {err:?}");
    let message = err.to_string();
    assert!(
        message.contains("--redis-replicas 1") && message.contains("KEYFLEET_REDIS_REPLICAS"),
        "{message}"
    );
    assert!(status.check_replicas(Duration::ZERO).await.is_err());
    let (plain, _) = stores(&lone, 0).await;
    plain
        .check_replicas(Duration::ZERO)
        .await
        .expect("0 asks for none");

    let dir = tempfile::tempdir().unwrap();
    let out = crate::util::keyfleet(dir.path())
        .args([
            "describe",
            "--redis-url",
            &lone.url(),
            "--prefix",
            "kfcheck",
        ])
        .args(["--redis-replicas", "1"])
        .output()
        .unwrap();
    let said = crate::util::text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("--redis-replicas 1") && said.contains("has 0"),
        "{said}"
    );

    let port = lone.port;
    let _replica = tokio::task::spawn_blocking(move || Server::start(Some(port)))
        .await
        .unwrap();
    registry
        .check_replicas(Duration::ZERO)
        .await
        .expect("the master has its replica now");
}
