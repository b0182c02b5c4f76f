//! The metrics keyfleet exports, checked by Prometheus' own tools: the exposition text passes
//! `promtool check metrics` (format and naming lints), and a real Prometheus scrapes
//! `keyfleet::telemetry::metrics::serve` and loads the alert rules from `deploy/prometheus/alerts.yml`.
//!
//! [`LocalPrometheus`] is the harness for the latter and for the worker's end-to-end test:
//! it starts `prometheus --config.file=<tmp>/prometheus.yml --storage.tsdb.path=<tmp>/data
//! --web.listen-address=127.0.0.1:<free port>` with a config scraping the given loopback
//! targets every second, and stops it when dropped. By hand, the same thing against a worker:
//!
//! ```sh
//! keyfleet-worker --metrics-addr 127.0.0.1:9464 &
//! prometheus --config.file=deploy/prometheus/prometheus.yml \
//!     --storage.tsdb.path="$(mktemp -d)" --web.listen-address=127.0.0.1:9090
//! # http://127.0.0.1:9090/targets: job keyfleet-local is UP
//! ```
//!
//! promtool and prometheus come from the Debian package `prometheus`, which scripts/test.sh
//! installs; without them these tests fail (they never skip).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyfleet::telemetry::metrics::{self, Readiness, NAMES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

fn record_one_of_each() {
    metrics::job_finished("aliyun", "created", Duration::from_millis(90));
    metrics::job_finished("aliyun", "QuotaExceed.KeyPair", Duration::from_millis(2));
    metrics::job_finished("ucloud", "8204", Duration::from_millis(3));
    metrics::keygen(2048, Duration::from_millis(41));
    metrics::keygen(4096, Duration::from_millis(1900));
    metrics::queue_wait(Duration::from_secs(3));
    metrics::quota_used("aliyun", "acme", "cn-hangzhou", 42, 500);
    metrics::quota_used("ucloud", "org-acme", "cn-bj2", 7, 500);
    metrics::reservoir_fill(2048, 16);
    metrics::upstream_wait("ucloud", Duration::from_millis(12));
    metrics::redelivered();
    metrics::rotation_progress(300, 120, 40, 2);
    metrics::rotation_retired("aliyun", "deleted");
    metrics::rotation_retired("ucloud", "an outcome nobody declared");
    metrics::dead_lettered("undecodable");
    metrics::dead_lettered("a reason nobody declared");
    let _in_flight = metrics::InFlight::start();
    metrics::in_flight(2);
    metrics::in_flight(-2);
}

fn missing_tool(tool: &str, e: std::io::Error) -> ! {
    panic!(
        "cannot run {tool} ({e}): run scripts/test.sh, which installs it (Debian package \
         `prometheus`), or `apt-get install prometheus`"
    )
}

#[test]
fn exposition_passes_promtool_check_metrics() {
    let handle = metrics::install().expect("install the recorder");
    record_one_of_each();
    let text = handle.render();
    for name in NAMES {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{text}"
        );
    }
    // (Other tests in this process record too: check presence, not counts.)
    assert!(
        text.contains(r#"keyfleet_dead_lettered_total{reason="other"} "#)
            && !text.contains("nobody declared"),
        "undeclared reasons fold into `other`:\n{text}"
    );

    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| missing_tool("promtool", e));
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(text.as_bytes()).expect("write to promtool");
    }
    let out = child.wait_with_output().expect("promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // promtool reports lint problems (missing _total, non-base units, …) on stdout.
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics:\n{report}\non:\n{text}"
    );
}

/// A throwaway Prometheus on loopback, scraping `targets` every second under job `job`, with
/// the repository's alert rules loaded. Killed (by its own pid) when dropped.
pub struct LocalPrometheus {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl LocalPrometheus {
    pub fn start(job: &str, targets: &[SocketAddr]) -> LocalPrometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yml");
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let config = format!(
            "# written by tests/serve/metrics.rs\n\
             global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - \"{}\"\n\
             scrape_configs:\n  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
            rules.display(),
            targets.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let addr = free_loopback_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| missing_tool("prometheus", e));
        LocalPrometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    /// `GET path` on Prometheus' HTTP API: (status, body).
    pub async fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let mut s = tokio::net::TcpStream::connect(self.addr).await?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
        s.write_all(req.as_bytes()).await?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).await?;
        let status = raw.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
        Ok((status, body))
    }

    /// The result vector of an instant query (empty if the query fails or matches nothing).
    pub async fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let Ok((200, body)) = self.get(&path).await else {
            return Vec::new();
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Polls `promql` until it returns something, or panics (with Prometheus' log) after
    /// `timeout`.
    pub async fn wait_for(&mut self, promql: &str, timeout: Duration) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let result = self.query(promql).await;
            if !result.is_empty() {
                return result;
            }
            if Instant::now() > deadline || self.child.try_wait().ok().flatten().is_some() {
                let _ = self.child.kill();
                let log = self
                    .child
                    .stderr
                    .take()
                    .map(|mut e| {
                        let mut s = String::new();
                        let _ = std::io::Read::read_to_string(&mut e, &mut s);
                        s
                    })
                    .unwrap_or_default();
                panic!("Prometheus at {} never answered {promql}\n{log}", self.addr);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for LocalPrometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_loopback_port() -> SocketAddr {
    // Bind and release: the port stays free long enough for Prometheus to take it.
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr")
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_endpoint_and_loads_the_rules() {
    let shutdown = CancellationToken::new();
    let readiness = Readiness::new();
    readiness.set_amqp(true);
    readiness.set_redis(true);
    let addr = metrics::serve("127.0.0.1:0".parse().unwrap(), readiness, shutdown.clone())
        .await
        .expect("serve");
    record_one_of_each();

    let mut prom = LocalPrometheus::start("keyfleet-worker", &[addr]);
    let limit = Duration::from_secs(60);
    let up = prom
        .wait_for(r#"up{job="keyfleet-worker"} == 1"#, limit)
        .await;
    assert_eq!(up.len(), 1, "{up:?}");
    let info = prom.wait_for("keyfleet_build_info", limit).await;
    assert_eq!(info[0]["metric"]["version"], env!("CARGO_PKG_VERSION"));
    let p99 = prom
        .wait_for(
            r#"histogram_quantile(0.99, sum by (le) (keyfleet_keygen_seconds_bucket{bits="2048"}))"#,
            limit,
        )
        .await;
    let seconds: f64 = p99[0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("a number");
    assert!(
        (0.03..=0.05).contains(&seconds),
        "one 41 ms key: p99 {seconds}"
    );

    let (status, body) = prom.get("/api/v1/rules").await.expect("rules API");
    assert_eq!(status, 200);
    assert!(
        body.contains("KeyfleetJobsStalled"),
        "alert rules loaded: {body}"
    );

    drop(prom);
    shutdown.cancel();
}
