//! Shared helpers of the distributed-mode tests: real RabbitMQ and Redis on this machine
//! (started by scripts/test.sh), a fresh prefix per test for every queue and Redis key, worker
//! processes that die with the test, and submit / collect through the library.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keyfleet::dialect::{Catalog, Provider};
use keyfleet::job::batch::RowDefaults;
use keyfleet::keys::keygen::KeyBits;
use keyfleet::modes::collect::{collect, CollectOptions, CollectSummary};
use keyfleet::modes::submit::{submit, SubmitOptions, SubmitSummary};
use keyfleet::queue::broker::Topology;
use keyfleet::registry::{Filter, Registry};
use keyfleet::telemetry::progress::ProgressMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

pub fn amqp_url() -> String {
    std::env::var("KEYFLEET_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn redis_url() -> String {
    std::env::var("KEYFLEET_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

/// One test's world: its prefix, its folder, its workers.
pub struct Env {
    pub prefix: String,
    /// The RabbitMQ this test's workers, producer and collector use (one node, or a cluster's
    /// node list).
    pub amqp: String,
    /// The Redis this test's workers, producer and collector use (one server, or a cluster's
    /// node list).
    pub redis: String,
    /// `--redis-replicas` of this test's workers, producer and collector.
    pub redis_replicas: u32,
    pub jobs_per_message: keyfleet::job::jobs_per_message::JobsPerMessage,
    pub dir: tempfile::TempDir,
    workers: Vec<Child>,
    /// Other processes the test started (a `keyfleet serve` as the cloud), killed with it.
    helpers: Vec<Child>,
    /// Batches whose results queues this test created, deleted at the end.
    batches: std::sync::Mutex<Vec<String>>,
}

/// Kills its workers and helpers when dropped, so a failing test leaves nothing running.
impl Drop for Env {
    fn drop(&mut self) {
        for w in self.workers.iter_mut().chain(&mut self.helpers) {
            let _ = w.kill();
            let _ = w.wait();
        }
        let prefix = self.prefix.clone();
        let amqp = self.amqp.clone();
        let batches = std::mem::take(&mut *self.batches.lock().unwrap_or_else(|e| e.into_inner()));
        // Best-effort clean-up of the test's queues and keys.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                // The first node that answers (a cluster's may be down after a node-loss test).
                let mut conn = None;
                for url in amqp.split(',') {
                    if let Ok(c) = lapin::Connection::connect(url, Default::default()).await {
                        conn = Some(c);
                        break;
                    }
                }
                if let Some(conn) = conn {
                    if let Ok(ch) = conn.create_channel().await {
                        let results = batches.iter().map(|b| format!("{prefix}.results.{b}"));
                        let queues = [format!("{prefix}.jobs"), format!("{prefix}.jobs.dead")];
                        for q in queues.into_iter().chain(results) {
                            let _ = ch.queue_delete(q.into(), Default::default()).await;
                        }
                        for x in [
                            format!("{prefix}.jobs"),
                            format!("{prefix}.dlx"),
                            format!("{prefix}.results"),
                        ] {
                            let _ = ch.exchange_delete(x.into(), Default::default()).await;
                        }
                    }
                }
                if let Ok(client) = redis::Client::open(redis_url()) {
                    if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                        let keys: Vec<String> = redis::cmd("KEYS")
                            .arg(format!("{prefix}:*"))
                            .query_async(&mut c)
                            .await
                            .unwrap_or_default();
                        for k in keys {
                            let _: Result<(), _> =
                                redis::cmd("DEL").arg(k).query_async(&mut c).await;
                        }
                    }
                }
            });
            Some(())
        })
        .join();
    }
}

impl Env {
    pub fn new(name: &str) -> Env {
        let prefix = format!(
            "kft-{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        Env {
            prefix,
            amqp: amqp_url(),
            redis: redis_url(),
            redis_replicas: 0,
            jobs_per_message: Default::default(),
            dir: tempfile::tempdir().expect("tempdir"),
            workers: Vec::new(),
            helpers: Vec::new(),
            batches: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The same world on another RabbitMQ (a cluster's node list).
    pub fn on_amqp(mut self, urls: &str) -> Env {
        self.amqp = urls.to_owned();
        self
    }

    /// The same world on another Redis (a cluster's node list).
    pub fn on_redis(mut self, url: &str) -> Env {
        self.redis = url.to_owned();
        self
    }

    /// The same world with every write waiting for `n` Redis replicas (`--redis-replicas`).
    /// Jobs a message when this env submits (1: v1 messages); `auto` otherwise.
    pub fn with_jobs_per_message(mut self, n: usize) -> Env {
        self.jobs_per_message = keyfleet::job::jobs_per_message::JobsPerMessage::Fixed(n);
        self
    }

    pub fn with_redis_replicas(mut self, n: u32) -> Env {
        self.redis_replicas = n;
        self
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn worker_command(&self, extra: &[&str]) -> Command {
        self.worker_command_urls(&self.amqp, &self.redis, extra)
    }

    pub fn worker_command_urls(&self, amqp: &str, redis: &str, extra: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_keyfleet-worker"));
        for (k, _) in std::env::vars() {
            if k.starts_with("KEYFLEET_") {
                c.env_remove(k);
            }
        }
        c.args([
            "--amqp-url",
            amqp,
            "--redis-url",
            redis,
            "--prefix",
            &self.prefix,
        ])
        .args(extra)
        .stdin(Stdio::null());
        if self.redis_replicas > 0 && !extra.contains(&"--redis-replicas") {
            c.args(["--redis-replicas", &self.redis_replicas.to_string()]);
        }
        if !extra.contains(&"--upstream-rps") {
            c.args(["--upstream-rps", "0"]);
        }
        if !extra.contains(&"--log") {
            c.args(["--log", "keyfleet=info"]);
        }
        if !extra.contains(&"--metrics-addr") {
            c.args(["--metrics-addr", "off"]);
        }
        c
    }

    /// The `keyfleet` command line on this test's servers and prefix (through its
    /// environment variables), run in the test folder, with its state folder
    /// (`XDG_STATE_HOME`) inside it.
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new(keyfleet_bin());
        for (k, _) in std::env::vars() {
            if k.starts_with("KEYFLEET_") {
                c.env_remove(k);
            }
        }
        c.args(args)
            .env("KEYFLEET_AMQP_URL", &self.amqp)
            .env("KEYFLEET_REDIS_URL", &self.redis)
            .env("KEYFLEET_PREFIX", &self.prefix)
            .env("KEYFLEET_REDIS_REPLICAS", self.redis_replicas.to_string())
            .env("KEYFLEET_PROGRESS", "off")
            .env("XDG_STATE_HOME", self.path("state"))
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        c
    }

    /// Starts a worker whose log goes to `worker-<n>.log` in the test folder.
    pub fn start_worker(&mut self, extra: &[&str]) -> usize {
        let n = self.workers.len();
        let log = std::fs::File::create(self.path(&format!("worker-{n}.log"))).expect("log file");
        let child = self
            .worker_command(extra)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start keyfleet-worker");
        self.workers.push(child);
        n
    }

    /// [`Env::start_worker`] with extra environment variables (upstream credentials).
    pub fn start_worker_env(&mut self, extra: &[&str], envs: &[(&str, &str)]) -> usize {
        let n = self.workers.len();
        let log = std::fs::File::create(self.path(&format!("worker-{n}.log"))).expect("log file");
        let child = self
            .worker_command(extra)
            .envs(envs.iter().copied())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start keyfleet-worker");
        self.workers.push(child);
        n
    }

    /// Another process of the test's (a `keyfleet serve` standing in for the cloud): killed
    /// when the test ends, passed or failed.
    pub fn keep_helper(&mut self, child: Child) {
        self.helpers.push(child);
    }

    pub fn worker(&mut self, n: usize) -> &mut Child {
        &mut self.workers[n]
    }

    pub fn worker_log(&self, n: usize) -> String {
        std::fs::read_to_string(self.path(&format!("worker-{n}.log"))).unwrap_or_default()
    }

    /// Where this test keeps a batch's age identity.
    pub fn identity(&self, batch_id: &str) -> PathBuf {
        self.path(&format!(
            "{}.age-identity",
            keyfleet::sink::files::path_component(batch_id)
        ))
    }

    /// Gives `batch_id` a recipient (and an identity file), as `submit` does, for tests that
    /// publish jobs themselves.
    pub async fn give_recipient(&self, batch_id: &str) {
        let recipient = keyfleet::sink::transit::create_identity(&self.identity(batch_id)).unwrap();
        let store = keyfleet::registry::batch_status::BatchStatusStore::connect(
            &self.redis,
            &self.prefix,
            Duration::from_secs(10),
        )
        .await
        .expect("redis");
        store
            .set_recipient(batch_id, &recipient.to_string())
            .await
            .unwrap();
    }

    pub fn endpoints(&self) -> keyfleet::queue::endpoints::Endpoints {
        keyfleet::queue::endpoints::Endpoints {
            amqp_url: self.amqp.parse().expect("the test's RabbitMQ URLs"),
            redis_url: self.redis.clone(),
            prefix: self.prefix.clone(),
            connect_timeout: Duration::from_secs(10),
            redis_replicas: self.redis_replicas,
        }
    }

    pub fn topology(&self) -> Topology {
        Topology::with_prefix(&self.prefix)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    /// Remembers a batch so its results queue is deleted with the test.
    pub fn track(&self, batch_id: &str) {
        self.batches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(batch_id.to_owned());
    }

    pub async fn submit(&self, input: &Path, batch_id: &str) -> SubmitSummary {
        self.track(batch_id);
        self.wait_for_workers().await;
        let opts = SubmitOptions {
            input: input.to_owned(),
            format: None,
            defaults: RowDefaults {
                batch_id: batch_id.into(),
                provider: Provider::Aliyun,
                owner: "acct".into(),
                key_bits: KeyBits::B2048,
            },
            catalog: Catalog::default(),
            endpoints: self.endpoints(),
            progress: ProgressMode::Off,
            confirm_window: 1024,
            jobs_per_message: self.jobs_per_message,
            keys_to: keyfleet::modes::submit::KeysTo::IdentityFile(self.identity(batch_id)),
        };
        tokio::time::timeout(
            Duration::from_secs(120),
            submit(opts, CancellationToken::new()),
        )
        .await
        .expect("submit timed out")
        .expect("submit failed")
    }

    /// Waits (up to 30 s) until RabbitMQ counts as many consumers on the jobs queue as this
    /// test has workers alive. `submit` sizes a batch's first messages by that count
    /// (`JobsPerMessage::for_workers`), so a test gets the plan of the workers it started, not
    /// of however many had subscribed by the time `submit` asked. A worker that never consumes
    /// (a server down) costs the wait, and `submit` goes on.
    async fn wait_for_workers(&self) {
        let alive = self.workers.iter().filter(|w| is_alive(w.id())).count() as u32;
        if alive == 0 {
            return;
        }
        let mut conn = None;
        for url in self.amqp.split(',') {
            if let Ok(c) = lapin::Connection::connect(url, Default::default()).await {
                conn = Some(c);
                break;
            }
        }
        let Some(conn) = conn else { return };
        let queue = self.topology().jobs_queue();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (_, consumers) = queue_counts(&conn, &queue).await;
            if consumers >= alive || std::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = conn.close(200, "".into()).await;
    }

    pub async fn collect(&self, batch_id: &str, out: &str, idle: Duration) -> CollectSummary {
        self.track(batch_id);
        let opts = CollectOptions {
            batch_id: batch_id.into(),
            out: self.path(out),
            identity: Some(self.identity(batch_id)),
            keep_identity: false,
            endpoints: self.endpoints(),
            idle_timeout: idle,
            progress: ProgressMode::Off,
            until: None,
            annotate: None,
        };
        tokio::time::timeout(
            Duration::from_secs(600),
            collect(opts, CancellationToken::new()),
        )
        .await
        .expect("collect timed out")
        .expect("collect failed")
    }

    pub async fn status(
        &self,
        batch_id: &str,
    ) -> Option<keyfleet::registry::batch_status::BatchStatus> {
        let store = keyfleet::registry::batch_status::BatchStatusStore::connect(
            &self.redis,
            &self.prefix,
            Duration::from_secs(10),
        )
        .await
        .expect("redis");
        store.status(batch_id).await.expect("status")
    }

    pub async fn registry(&self) -> keyfleet::registry::redis::RedisRegistry {
        keyfleet::registry::redis::RedisRegistry::connect(
            &self.redis,
            &self.prefix,
            Duration::from_secs(10),
        )
        .await
        .expect("redis")
    }

    /// Waits until `cond` holds on the batch status, or panics after `limit`.
    pub async fn wait_status(
        &self,
        batch_id: &str,
        limit: Duration,
        cond: impl Fn(&keyfleet::registry::batch_status::BatchStatus) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(s) = self.status(batch_id).await {
                if cond(&s) {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "batch {batch_id} did not reach the expected state in time: {:?}",
                self.status(batch_id).await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A plain HTTP/1.0 GET on loopback (no HTTP client crate needed for two requests).
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

/// The `keyfleet` binary, built beside `keyfleet-worker` by `cargo test --workspace`.
pub fn keyfleet_bin() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_keyfleet-worker")).with_file_name("keyfleet");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (scripts/test.sh)",
        bin.display()
    );
    bin
}

pub fn manifest(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("manifest.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("manifest line"))
        .collect()
}

pub fn fleet_csv(n: usize, region: &str) -> String {
    let mut s = String::from("RegionId,KeyPairName\n");
    for i in 0..n {
        s.push_str(&format!("{region},host-{i:05}\n"));
    }
    s
}

/// A queue's messages and consumers as RabbitMQ counts them; (0, 0) for a queue not declared
/// yet. A channel a look: a passive declare of a missing queue closes the channel it ran on.
pub async fn queue_counts(conn: &lapin::Connection, queue: &str) -> (u32, u32) {
    let Ok(ch) = conn.create_channel().await else {
        return (0, 0);
    };
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let counts = match ch
        .queue_declare(queue.into(), passive, Default::default())
        .await
    {
        Ok(q) => (q.message_count(), q.consumer_count()),
        Err(_) => (0, 0),
    };
    let _ = ch.close(200, "".into()).await;
    counts
}

/// Whether process `pid` is running: not gone, and not a zombie (killed, not yet waited for).
fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// Sends SIGTERM (or another signal) through the `kill` command, keeping the crate free of
/// unsafe code.
pub fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Every job answered exactly once in the manifest; each created pair's key file matches the
/// pair the registry holds; returns (created, failed-by-code).
pub async fn check_batch(env: &Env, out: &str, jobs: usize) -> (usize, BTreeMap<String, usize>) {
    let lines = manifest(&env.path(out));
    let ids: HashSet<&str> = lines
        .iter()
        .map(|l| l["job_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), lines.len(), "one manifest line per job");
    assert_eq!(lines.len(), jobs, "every job answered");
    let registry = env.registry().await;
    let records = registry.describe(&Filter::default()).await.unwrap();
    let by_name: HashMap<String, _> = records.iter().map(|r| (r.name.clone(), r)).collect();
    let mut created = 0;
    let mut failed = BTreeMap::new();
    for l in &lines {
        if l["status"] == "created" {
            created += 1;
            let name = l["key_pair_name"].as_str().unwrap();
            let rec = by_name
                .get(name)
                .unwrap_or_else(|| panic!("{name} not registered"));
            assert!(rec.delivered, "{name} delivered");
            assert_eq!(
                rec.fingerprint_sha256,
                l["fingerprint_sha256"].as_str().unwrap(),
                "{name}: the key delivered is the key registered"
            );
            let pem = std::fs::read_to_string(l["private_key_file"].as_str().unwrap()).unwrap();
            assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
            // The key file itself, not only its manifest line, is the registered key.
            let (_, sha256) = keyfleet::keys::keygen::fingerprints_of_pem(&pem).unwrap();
            assert_eq!(
                sha256, rec.fingerprint_sha256,
                "{name}: the key file holds the registered key"
            );
        } else {
            *failed
                .entry(l["code"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    assert_eq!(
        records.len(),
        created,
        "the registry holds exactly the created pairs"
    );
    let keys = walk_pem(&env.path(out));
    assert_eq!(keys, created, "one key file per created pair");
    (created, failed)
}

pub fn walk_pem(dir: &std::path::Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            n += walk_pem(&p);
        } else if p.extension().is_some_and(|x| x == "pem") {
            n += 1;
        }
    }
    n
}

/// Reads (and removes) what lands on the test's dead-letter queue.
pub async fn dead_letters(broker: &keyfleet::queue::broker::Broker, env: &Env) -> lapin::Consumer {
    broker
        .channel()
        .basic_consume(
            env.topology().dead_queue().into(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("consume the dead-letter queue")
}

/// A valid Alibaba job of `batch` for the key-pair name `name` in cn-hangzhou.
pub fn job(batch: &str, name: &str) -> keyfleet::job::Job {
    keyfleet::job::Job {
        v: keyfleet::job::MESSAGE_VERSION,
        job_id: uuid::Uuid::new_v4(),
        batch_id: batch.into(),
        line: None,
        provider: keyfleet::dialect::Provider::Aliyun,
        owner: "acct".into(),
        params: BTreeMap::from([
            ("RegionId".to_owned(), "cn-hangzhou".to_owned()),
            ("KeyPairName".to_owned(), name.to_owned()),
        ]),
        key_bits: keyfleet::keys::keygen::KeyBits::B2048,
    }
}

/// Has RabbitMQ close every connection of process `pid` (keyfleet names its connections
/// `keyfleet pid N`), as a broker that restarts or drops a node does to its clients.
pub fn close_rabbitmq_connections_of(pid: u32) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "pid", "client_properties"])
        .args(["--quiet", "--no-table-headers"])
        .output()
        .expect("rabbitmqctl is needed for this test");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    // One line a connection: its Erlang pid (what close_connection takes), a tab, its
    // client properties.
    let mine = format!("\"keyfleet pid {pid}\"");
    let pids: Vec<&str> = listed
        .lines()
        .filter(|l| l.contains(&mine))
        .filter_map(|l| l.split('\t').next())
        .collect();
    assert!(!pids.is_empty(), "no connection of {mine}:\n{listed}");
    for conn in pids {
        let closed = std::process::Command::new("rabbitmqctl")
            .args(["close_connection", conn, "test: connection lost"])
            .output()
            .expect("rabbitmqctl");
        assert!(
            closed.status.success(),
            "{}",
            String::from_utf8_lossy(&closed.stderr)
        );
    }
}
