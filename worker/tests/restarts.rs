//! The servers go away mid-batch and come back: a Redis restart (state saved on shutdown and
//! reloaded, as a persistent Redis would) and a RabbitMQ restart (the broker application stopped
//! and started, dropping every connection). Workers keep running, reconnect, and the batch
//! completes with every job answered once. One test function, so the restarts never overlap with
//! other tests of this binary; cargo runs test binaries one after another.

mod util;

use std::process::Command;
use std::time::Duration;

use keyfleet::registry::{Filter, Registry};
use util::{fleet_csv, manifest, Env};

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is needed for this test: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn redis_config(key: &str) -> String {
    let out = Command::new("redis-cli")
        .args(["CONFIG", "GET", key])
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .unwrap_or_default()
        .to_owned()
}

async fn port_open(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

async fn wait_port(port: u16, up: bool, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while port_open(port).await != up {
        assert!(
            tokio::time::Instant::now() < deadline,
            "port {port} did not become {}",
            if up { "open" } else { "closed" }
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_complete(env: &Env, out: &str, jobs: usize) {
    let lines = manifest(&env.path(out));
    let ids: std::collections::HashSet<_> = lines
        .iter()
        .map(|l| l["job_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        (lines.len(), ids.len()),
        (jobs, jobs),
        "every job answered exactly once"
    );
    assert!(lines.iter().all(|l| l["status"] == "created"), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_completes_across_redis_and_rabbitmq_restarts() {
    let mut env = Env::new("restart");
    env.start_worker(&["--threads", "1", "--concurrency", "4"]);
    env.start_worker(&["--threads", "1", "--concurrency", "4"]);

    // Redis: shut down (saving), stay away a few seconds, come back with the same data.
    let input = env.write("redis.csv", &fleet_csv(60, "cn-qingdao"));
    env.submit(&input, "bredis").await;
    // A collector is running through the restart too (`submit --wait` is one): it rides it
    // out instead of exiting.
    let restart = async {
        env.wait_status("bredis", Duration::from_secs(120), |s| s.created >= 10)
            .await;
        let (dir, dbfile) = (redis_config("dir"), redis_config("dbfilename"));
        run("redis-cli", &["SHUTDOWN", "SAVE"]);
        wait_port(6379, false, Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        run(
            "redis-server",
            &[
                "--daemonize",
                "yes",
                "--bind",
                "127.0.0.1",
                "--port",
                "6379",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &dir,
                "--dbfilename",
                &dbfile,
            ],
        );
        wait_port(6379, true, Duration::from_secs(20)).await;
    };
    let (c, ()) = tokio::join!(
        env.collect("bredis", "out-redis", Duration::from_secs(60)),
        restart
    );
    assert!(c.complete, "{c:?}");
    assert_complete(&env, "out-redis", 60);

    // RabbitMQ: stop and start the broker application; every connection drops.
    let input = env.write("amqp.csv", &fleet_csv(60, "cn-zhangjiakou"));
    env.submit(&input, "bamqp").await;
    env.wait_status("bamqp", Duration::from_secs(120), |s| s.created >= 10)
        .await;
    run("rabbitmqctl", &["stop_app"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    run("rabbitmqctl", &["start_app"]);
    wait_port(5672, true, Duration::from_secs(60)).await;
    let c = env
        .collect("bamqp", "out-amqp", Duration::from_secs(60))
        .await;
    assert!(c.complete, "{c:?}");
    assert_complete(&env, "out-amqp", 60);

    let records = env
        .registry()
        .await
        .describe(&Filter::default())
        .await
        .unwrap();
    assert_eq!(
        records.len(),
        120,
        "exactly the created pairs are registered"
    );
    // A worker may still be in its reconnect backoff (up to 5 s) when the other finished the
    // batch.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for n in 0..2 {
        while !env.worker_log(n).contains("reconnected to RabbitMQ") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "worker {n} log:\n{}",
                env.worker_log(n)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
