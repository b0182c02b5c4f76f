//! A real Prometheus on loopback scrapes a real worker while it runs a small batch, and the
//! job counter is read back through Prometheus's HTTP API — the path a user's dashboard takes.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::util::{fleet_csv, http_get, Env};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_worker_and_reads_back_jobs_total() {
    let mut env = Env::new("prom");
    let (metrics_port, prom_port) = (free_port(), free_port());
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    env.start_worker(&["--threads", "1", "--metrics-addr", &metrics_addr]);

    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: keyfleet-worker\n    static_configs:\n      - targets: ['{metrics_addr}']\n"
    );
    let config_path = env.write("prometheus.yml", &config);
    let prom_log = std::fs::File::create(env.path("prometheus.log")).unwrap();
    let _prom = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                env.path("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdin(Stdio::null())
            .stdout(prom_log.try_clone().unwrap())
            .stderr(prom_log)
            .spawn()
            .expect("prometheus is required (scripts/test.sh installs the Debian package)"),
    );

    let input = env.write("fleet.csv", &fleet_csv(5, "cn-hongkong"));
    env.submit(&input, "bprom").await;
    let c = env.collect("bprom", "out", Duration::from_secs(60)).await;
    assert!(c.complete, "{c:?}");

    let query = "/api/v1/query?query=sum(keyfleet_jobs_total%7Boutcome%3D%22created%22%7D)";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(body) = http_get(prom_port, query).await {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) {
                if v["data"]["result"][0]["value"][1] == "5" {
                    break;
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Prometheus never saw 5 created jobs; its log:\n{}",
            std::fs::read_to_string(env.path("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The target is healthy from Prometheus's point of view too.
    let up = http_get(
        prom_port,
        "/api/v1/query?query=up%7Bjob%3D%22keyfleet-worker%22%7D",
    )
    .await
    .unwrap();
    assert!(up.contains("\"1\""), "{up}");
}

/// Metrics missing until the first job would leave `rate()` and alerts blind on a fresh
/// worker: its very first scrape lists every family (quota_used excepted: a zero would claim
/// an empty region, so it appears with the true count when a region is first touched).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_worker_first_scrape_lists_every_family() {
    let mut env = Env::new("firstscrape");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    env.start_worker(&[
        "--threads",
        "1",
        "--reservoir",
        "0",
        "--metrics-addr",
        &addr,
    ]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let body = loop {
        if let Some(b) = http_get(port, "/metrics").await {
            break b;
        }
        assert!(tokio::time::Instant::now() < deadline, "no /metrics");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for name in keyfleet::telemetry::metrics::NAMES {
        if [
            keyfleet::telemetry::metrics::QUOTA_USED,
            keyfleet::telemetry::metrics::QUOTA_LIMIT,
        ]
        .contains(name)
        {
            continue;
        }
        assert!(
            body.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{body}"
        );
    }
    assert!(body.contains(r#"keyfleet_jobs_total{provider="ucloud",outcome="8204"} 0"#));
}

/// "Run as many workers as you like": a second worker on one host with default flags starts
/// (the default metrics port is taken, so it serves on a free loopback port and says which);
/// a taken port given with --metrics-addr is an error naming the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_worker_with_default_metrics_addr_starts() {
    let env = Env::new("twoworkers");
    // Whoever holds 9464 (this test, or another process), it is taken.
    let _held = std::net::TcpListener::bind("127.0.0.1:9464");
    let worker = |extra: &[&str], log: &str| {
        let log = std::fs::File::create(env.path(log)).unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_keyfleet-worker"));
        for (k, _) in std::env::vars() {
            if k.starts_with("KEYFLEET_") {
                c.env_remove(k);
            }
        }
        c.args([
            "--amqp-url",
            &crate::util::amqp_url(),
            "--redis-url",
            &env.redis,
        ])
        .args(["--prefix", &env.prefix, "--threads", "1", "--log", "info"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .map(Killed)
        .unwrap()
    };
    let mut defaults = worker(&[], "defaults.log");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let port = loop {
        let log = std::fs::read_to_string(env.path("defaults.log")).unwrap_or_default();
        if let Some(rest) = log.split("serving metrics on 127.0.0.1:").nth(1) {
            let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            break digits.parse::<u16>().unwrap();
        }
        assert!(
            defaults.0.try_wait().unwrap().is_none(),
            "the worker with defaults exited: {log}"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "no fallback metrics port logged: {log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(port, 9464);
    let health = http_get(port, "/healthz").await;
    assert!(health.is_some(), "/healthz answers on the fallback port");

    let mut explicit = worker(&["--metrics-addr", "127.0.0.1:9464"], "explicit.log");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = explicit.0.try_wait().unwrap() {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "did not exit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = std::fs::read_to_string(env.path("explicit.log")).unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("--metrics-addr"), "names the flag: {log}");
}
