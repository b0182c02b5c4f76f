//! `keyfleet rotate --submit --wait`: a rotation through RabbitMQ and the workers, on the Redis
//! registry, with the workers registering successors in a cloud (`keyfleet serve` with
//! injected faults and throttling). `rotate` and a worker are SIGKILLed mid-way, `retire` too;
//! in the end the cloud and the registry hold exactly the successors, each successor's key
//! file is the registered key, and the quota is where it was before the rotation.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cloud::{assert_exactly_the_successors, key_files, kill_when, pem_count};
use crate::upstream::{start_cloud, CLOUD_CREDENTIALS};
use crate::util::{manifest, signal, Env};
use keyfleet::dialect::{Provider, Scope};
use keyfleet::registry::{Filter, Registry};
use keyfleet::upstream::client::ApiClient;

const ALIYUN: usize = 200;
const UCLOUD: usize = 100;

fn text(out: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The issue's end-to-end case through the workers: 300 pairs on both clouds, rotated through
/// a cloud that fails a fifth of its calls and throttles at 20 a second; `rotate` SIGKILLed
/// mid-way, then a worker SIGKILLed mid-way through the rerun, then `retire` SIGKILLed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_through_the_workers_killed_mid_way_leaves_exactly_the_successors_everywhere() {
    tokio::time::timeout(Duration::from_secs(900), async {
        let mut env = Env::new("rotfleet");
        env.track("rot-fleet");
        let (addr, stop) = start_cloud(&env, 20, 0.2).await;
        let aliyun = format!("aliyun=http://{addr}");
        let ucloud = format!("ucloud=http://{addr}");
        let worker_args = [
            "--threads",
            "1",
            "--concurrency",
            "8",
            "--upstream-endpoint",
            aliyun.as_str(),
            "--upstream-endpoint",
            ucloud.as_str(),
        ];
        let victim = env.start_worker_env(&worker_args, &CLOUD_CREDENTIALS);
        env.start_worker_env(&worker_args, &CLOUD_CREDENTIALS);

        // The fleet to rotate: made by the workers, registered in the cloud.
        let mut csv =
            String::from("Provider,Owner,RegionId,KeyPairName,Tag.1.Key,Tag.1.Value,Region\n");
        for i in 0..ALIYUN {
            csv.push_str(&format!("aliyun,acme,cn-hangzhou,web-{i:03},env,prod,\n"));
        }
        for i in 0..UCLOUD {
            csv.push_str(&format!("ucloud,org-acme,,web-{i:03},,,cn-bj2\n"));
        }
        submit_and_wait(&env, &csv);

        let kf = |env: &Env, args: &[&str]| {
            let mut c = env.cli(args);
            c.args([
                "--upstream-endpoint",
                &aliyun,
                "--upstream-endpoint",
                &ucloud,
            ])
            .envs(CLOUD_CREDENTIALS);
            c
        };
        let rotate_args = [
            "rotate",
            "--submit",
            "--wait",
            "--name",
            "web-*",
            "--successor",
            "{name}-r",
            "--rotation-id",
            "rot-fleet",
            "--out",
            "keys",
            "--idle-timeout",
            "60s",
        ];
        let keys = env.path("keys");
        assert!(
            kill_when(kf(&env, &rotate_args), || pem_count(&keys) >= 60),
            "rotate was to be killed mid-way, but it ended first"
        );
        // The rerun publishes new jobs for the successors still missing; a worker dies under it.
        let rerun = kf(&env, &rotate_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while pem_count(&keys) < 150 && started.elapsed() < Duration::from_secs(300) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        signal(env.worker(victim), "KILL");
        let _ = env.worker(victim).wait();
        env.start_worker_env(&worker_args, &CLOUD_CREDENTIALS);
        let out = tokio::task::spawn_blocking(move || rerun.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let report = text(&out);
        assert!(out.status.success(), "{report}");
        assert!(report.contains("rotation rot-fleet (resumed)"), "{report}");
        assert!(
            report.contains("replaced 300, delivered 300, retired 0"),
            "{report}"
        );
        let out = kf(&env, &rotate_args).output().unwrap();
        assert!(
            text(&out).contains("is finished: nothing changed"),
            "{}",
            text(&out)
        );

        // `retire`, on the Redis registry: killed once mid-way, then run until it has retired
        // every replaced pair.
        let redis = ["--redis-url", &crate::util::redis_url()];
        let retire = |extra: &[&str]| {
            let mut c = kf(&env, &["retire", "rot-fleet"]);
            c.args(redis).args(extra);
            c
        };
        let mut killed = retire(&[])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        killed.kill().unwrap();
        killed.wait().unwrap();
        let mut tries = 0;
        let retired = loop {
            let out = retire(&[]).output().unwrap();
            tries += 1;
            if out.status.success() || tries == 5 {
                break text(&out);
            }
        };
        assert!(
            retired.contains("retired 300, failed 0, pending 0"),
            "{retired}"
        );
        let status = env.cli(&["status", "rot-fleet"]).output().unwrap();
        assert!(
            text(&status).contains("replaced 300, delivered 300, retired 300"),
            "{}",
            text(&status)
        );

        let registry = env.registry().await;
        let client = ApiClient::new(&addr.to_string()).unwrap();
        let counts = [(Provider::Aliyun, ALIYUN), (Provider::Ucloud, UCLOUD)];
        let lines = manifest(&keys);
        for record in assert_exactly_the_successors(&registry, &client, &keys, counts).await {
            let (provider, name) = (record.scope.provider, &record.name);
            assert!(record.delivered, "{name}: delivered");
            // Its manifest line names the pair it replaced.
            let line = lines
                .iter()
                .find(|l| {
                    l["status"] == "created"
                        && l["key_pair_name"] == name.as_str()
                        && l["provider"] == provider.as_str()
                })
                .unwrap_or_else(|| panic!("{provider} {name}: no created line"));
            assert_eq!(line["rotation_id"], "rot-fleet");
            assert_eq!(line["replaces"]["name"], name.trim_end_matches("-r"));
        }
        stop.cancel();
    })
    .await
    .expect("test timed out");
}

/// The pairs to rotate, made by the workers from `csv` (and registered in the cloud when
/// the workers have one), collected into `keys0`.
fn submit_and_wait(env: &Env, csv: &str) {
    env.write("fleet.csv", csv);
    let out = env
        .cli(&["submit", "fleet.csv", "--wait", "--out", "keys0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // Standard output is the batch id: its results queue goes with the test's.
    env.track(String::from_utf8_lossy(&out.stdout).trim());
}

/// Seeds `n` pairs through a worker that is then SIGKILLed, so the rotation `id`'s first
/// jobs stay queued; returns the arguments of `rotate --submit` for it (without `--wait`).
fn first_jobs_left_queued(env: &mut Env, n: usize, id: &str) -> Vec<String> {
    env.start_worker(&["--threads", "1"]);
    seed(env, n);
    signal(env.worker(0), "KILL");
    let _ = env.worker(0).wait();
    env.track(id);
    [
        "rotate",
        "--submit",
        "--name",
        "app-*",
        "--rotation-id",
        id,
        "--out",
        "keys",
    ]
    .map(String::from)
    .to_vec()
}

/// Seeds `n` delivered pairs `app-00…` in aliyun/acme/cn-shanghai through the workers.
fn seed(env: &Env, n: usize) {
    let mut csv = String::from("Owner,RegionId,KeyPairName\n");
    for i in 0..n {
        csv.push_str(&format!("acme,cn-shanghai,app-{i:02}\n"));
    }
    submit_and_wait(env, &csv);
}

/// A crash between publishing a wave's jobs and recording that RabbitMQ confirmed them leaves
/// jobs nobody knows to be queued. The rerun publishes them again under new job ids, so the
/// queue holds two jobs for each successor: the registry gives each name to one of them, the
/// other answers `KeyPair.AlreadyExist`, and each successor is made once, its key file the
/// registered key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_after_a_crash_mid_publication_makes_each_successor_once() {
    tokio::time::timeout(Duration::from_secs(300), async {
        let mut env = Env::new("rotdup");
        let args = first_jobs_left_queued(&mut env, 10, "rot-dup");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = env.cli(&args).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            text(&out).contains("10 successor job(s) enqueued"),
            "{}",
            text(&out)
        );
        // As a crash would leave it: published, the confirms not recorded.
        let registry = env.registry().await;
        let mut rotation = registry.rotation("rot-dup").await.unwrap().unwrap();
        for m in &mut rotation.members {
            assert_eq!((m.published, m.publishing), (1, false));
            m.published = 0;
            m.publishing = true;
        }
        registry.save_rotation(&rotation).await.unwrap();

        // The rerun (still no worker): every job again, under new ids.
        let out = env.cli(&args).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            text(&out).contains("10 successor job(s) enqueued"),
            "{}",
            text(&out)
        );

        // Now the workers find two jobs for each successor; the wait publishes nothing more.
        env.start_worker(&["--threads", "1", "--concurrency", "8"]);
        let mut wait = args.to_vec();
        wait.push("--wait");
        let out = env.cli(&wait).output().unwrap();
        let report = text(&out);
        assert!(out.status.success(), "{report}");
        assert!(!report.contains("enqueued"), "{report}");
        assert!(
            report.contains("replaced 10, delivered 10, retired 0, failed 0, pending 0"),
            "{report}"
        );
        let rotation = registry.rotation("rot-dup").await.unwrap().unwrap();
        let keys = env.path("keys");
        let files = key_files(&keys, true);
        assert_eq!(files.len(), 10, "{files:?}");
        let lines = manifest(&keys);
        for m in &rotation.members {
            assert_eq!(
                m.earlier_job_ids.len(),
                1,
                "a second job for {}",
                m.successor
            );
            let Some(keyfleet::registry::Entry::Pair(record)) =
                registry.lookup(&m.scope, &m.successor).await.unwrap()
            else {
                panic!("{}: not registered", m.successor)
            };
            assert!(m.is_job(record.job_id) && record.delivered);
            assert_eq!(
                files[&m.successor], record.fingerprint_md5,
                "key file = registry"
            );
            let created: Vec<_> = lines
                .iter()
                .filter(|l| l["key_pair_name"] == m.successor.as_str() && l["status"] == "created")
                .collect();
            assert_eq!(created.len(), 1, "{}: one created line", m.successor);
            assert_eq!(created[0]["job_id"], record.job_id.to_string());
            assert_eq!(created[0]["replaces"]["name"], m.name.as_str());
        }
        // Every job of the queue was answered: the other of each pair of jobs, AlreadyExist
        // (written once the wait had what it needed, or left for `keyfleet collect`).
        let queued = lines.len() - 10;
        assert!(
            lines
                .iter()
                .filter(|l| l["status"] != "created")
                .all(|l| l["code"] == "KeyPair.AlreadyExist" && l["rotation_id"] == "rot-dup"),
            "{lines:?}"
        );
        assert!(queued <= 10, "{lines:?}");
    })
    .await
    .expect("test timed out");
}

/// `--waves` through the workers, at a region whose quota cannot hold every successor beside
/// the pair it replaces: 8 pairs under a quota of 10 go in waves of the free slots, each wave
/// collected before its replaced pairs are retired, and no worker is ever refused for quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_through_the_workers_in_waves_within_the_quota() {
    tokio::time::timeout(Duration::from_secs(300), async {
        let mut env = Env::new("rotwave");
        env.track("rot-waves");
        env.start_worker(&["--threads", "1", "--quota", "10"]);
        seed(&env, 8);
        let args = [
            "rotate",
            "--submit",
            "--wait",
            "--quota",
            "10",
            "--name",
            "app-*",
            "--rotation-id",
            "rot-waves",
            "--out",
            "keys",
        ];
        // Without --waves: refused before anything is published.
        let out = env.cli(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(text(&out).contains("run with --waves"), "{}", text(&out));
        assert!(
            !env.path("keys").join("manifest.jsonl").exists()
                || manifest(&env.path("keys")).is_empty()
        );

        let mut waves = args.to_vec();
        waves.push("--waves");
        let out = env.cli(&waves).output().unwrap();
        let report = text(&out);
        assert!(out.status.success(), "{report}");
        assert!(
            report.contains("replaced 8, delivered 8, retired 8, failed 0, pending 0"),
            "{report}"
        );
        let n: u32 = report
            .split(" wave(s)")
            .next()
            .and_then(|s| s.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no wave count: {report}"));
        assert!(n >= 4, "2 free slots make at least 4 waves of 8: {report}");
        let registry = env.registry().await;
        let scope = Scope {
            provider: Provider::Aliyun,
            owner: "acme".into(),
            region: "cn-shanghai".into(),
        };
        assert_eq!(registry.quota_used(&scope).await.unwrap(), 8);
        let names: Vec<String> = registry
            .describe(&Filter::default())
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.scope == scope)
            .map(|r| r.name)
            .collect();
        assert!(
            names.iter().all(|n| n.starts_with("app-") && n.len() > 6),
            "{names:?}"
        );
        assert_eq!(names.len(), 8);
        assert_eq!(pem_count(&env.path("keys")), 8);
        assert!(
            manifest(&env.path("keys"))
                .iter()
                .all(|l| l["status"] == "created"),
            "no row refused for quota"
        );
    })
    .await
    .expect("test timed out");
}

/// Without `--wait` the successors' keys sit on the results queue until `keyfleet collect`
/// writes them: `retire` (which reads the rotation's folder) retires nothing before that, and
/// everything after. `collect ROTATION-ID` ends as soon as every successor is in the folder,
/// and a rerun with another identity than the one the keys are encrypted to is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retire_waits_for_the_successors_keys_in_the_folder_not_on_the_queue() {
    tokio::time::timeout(Duration::from_secs(300), async {
        let mut env = Env::new("rotret");
        env.track("rot-ret");
        env.start_worker(&["--threads", "1"]);
        seed(&env, 6);
        let args = [
            "rotate",
            "--submit",
            "--name",
            "app-*",
            "--rotation-id",
            "rot-ret",
            "--out",
            "keys",
        ];
        let out = env.cli(&args).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        // Every successor made and on the results queue; none in the folder.
        let registry = env.registry().await;
        let rotation = registry.rotation("rot-ret").await.unwrap().unwrap();
        let started = Instant::now();
        loop {
            let mut delivered = 0;
            for m in &rotation.members {
                if let Some(keyfleet::registry::Entry::Pair(r)) =
                    registry.lookup(&m.scope, &m.successor).await.unwrap()
                {
                    delivered += usize::from(r.delivered);
                }
            }
            if delivered == 6 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the workers made {delivered} of 6"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let redis = crate::util::redis_url();
        let retire = || {
            env.cli(&["retire", "rot-ret", "--redis-url", &redis])
                .output()
                .unwrap()
        };
        let out = retire();
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(
            text(&out).contains("retired 0 replaced pair(s)"),
            "{}",
            text(&out)
        );
        assert!(
            text(&out).contains("delivered 0, retired 0"),
            "{}",
            text(&out)
        );

        // Another identity than the rotation's: refused, naming the way out.
        keyfleet::sink::transit::create_identity(&env.path("other.age-identity")).unwrap();
        let out = env
            .cli(&[&args[..], &["--wait", "--identity", "other.age-identity"]].concat())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(text(&out).contains("--identity"), "{}", text(&out));

        let started = Instant::now();
        let out = env
            .cli(&[
                "collect",
                "rot-ret",
                "--out",
                "keys",
                "--idle-timeout",
                "60s",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("complete"), "{}", text(&out));
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "collect waited for its idle timeout"
        );
        assert_eq!(pem_count(&env.path("keys")), 6);
        assert!(manifest(&env.path("keys"))
            .iter()
            .all(|l| l["replaces"]["name"].is_string()));
        let out = retire();
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            text(&out).contains("delivered 6, retired 6"),
            "{}",
            text(&out)
        );
    })
    .await
    .expect("test timed out");
}

/// A successor's job that never answers — its queue purged here, as dead-lettering after too
/// many deliveries would lose it too — holds nothing in the registry: once `--idle-timeout`
/// passes without an answer, `rotate --submit --wait` publishes it again under a new id,
/// instead of waiting for it on every rerun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_successor_job_is_published_again_after_the_idle_timeout() {
    tokio::time::timeout(Duration::from_secs(300), async {
        let mut env = Env::new("rotlost");
        let args = first_jobs_left_queued(&mut env, 4, "rot-lost");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = env.cli(&args).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let queue = env.topology().jobs_queue();
        let purged = Command::new("rabbitmqctl")
            .args(["purge_queue", &queue])
            .output()
            .expect("rabbitmqctl");
        assert!(purged.status.success(), "{}", text(&purged));

        env.start_worker(&["--threads", "1"]);
        let out = env
            .cli(&[&args[..], &["--wait", "--idle-timeout", "3s"]].concat())
            .output()
            .unwrap();
        let report = text(&out);
        assert!(out.status.success(), "{report}");
        assert!(report.contains("publishing them again"), "{report}");
        assert!(report.contains("replaced 4, delivered 4"), "{report}");
        assert_eq!(pem_count(&env.path("keys")), 4);
    })
    .await
    .expect("test timed out");
}
