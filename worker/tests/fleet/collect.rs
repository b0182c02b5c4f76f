//! `keyfleet collect` against the faults a hostile try found (issue 17): a wrong identity, a
//! full disk, a SIGKILL mid-write, a batch that does not exist or was collected elsewhere, and
//! where a batch's identity lives. The rule each test pins: a result is acked only once its key
//! is durable in the folder, so every key is still delivered exactly once, by a later collect,
//! and each key file is the registered key.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use crate::util::{check_batch, close_rabbitmq_connections_of, fleet_csv, manifest, Env};
use keyfleet::registry::{Filter, Registry};

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `keyfleet ARGS` to the end (bounded), returning its output.
fn run_cli(env: &Env, args: &[&str]) -> Output {
    let mut child = env
        .cli(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start keyfleet");
    let deadline = Instant::now() + Duration::from_secs(180);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("keyfleet {args:?} did not finish in 180 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

/// `keyfleet collect BATCH --out OUT [--identity FILE] [--idle-timeout T]`, to its end.
fn collect_cli(env: &Env, batch: &str, out: &Path, identity: Option<&Path>, idle: &str) -> Output {
    let mut args = vec!["collect", batch, "--out", out.to_str().unwrap()];
    if let Some(id) = identity {
        args.extend(["--identity", id.to_str().unwrap()]);
    }
    args.extend(["--idle-timeout", idle]);
    run_cli(env, &args)
}

/// `o` succeeded and its report says the batch is complete with `n` results.
fn complete(o: &Output, n: usize) {
    assert!(o.status.success(), "{}", text(o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("complete: {n}/{n}")),
        "{}",
        text(o)
    );
}

/// Each created line of the manifest in `out`: its key file is the key the registry holds for
/// that name, marked delivered. Returns how many created keys were checked.
async fn keys_are_registered(env: &Env, out: &str) -> usize {
    let registry = env.registry().await;
    let records = registry.describe(&Filter::default()).await.unwrap();
    let by_name: HashMap<_, _> = records.iter().map(|r| (r.name.clone(), r)).collect();
    let mut n = 0;
    for l in manifest(&env.path(out)) {
        if l["status"] != "created" {
            continue;
        }
        let name = l["key_pair_name"].as_str().unwrap();
        let rec = by_name[name];
        assert!(rec.delivered, "{name} delivered");
        let pem = std::fs::read_to_string(l["private_key_file"].as_str().unwrap()).unwrap();
        let (_, sha256) = keyfleet::keys::keygen::fingerprints_of_pem(&pem).unwrap();
        assert_eq!(
            sha256, rec.fingerprint_sha256,
            "{name}: key file is the registered key"
        );
        n += 1;
    }
    n
}

fn csv(prefix: &str, n: usize) -> String {
    let mut s = String::from("RegionId,KeyPairName\n");
    for i in 0..n {
        s.push_str(&format!("cn-hangzhou,{prefix}-{i:03}\n"));
    }
    s
}

#[test]
fn wrong_identity_collect_keeps_keys_queued() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut env = Env::new("wrongid");
    env.start_worker(&["--threads", "1"]);
    env.track("ba");
    env.track("bb");
    env.write("a.csv", &csv("a", 2));
    env.write("b.csv", &csv("b", 2));
    for (file, batch) in [("a.csv", "ba"), ("b.csv", "bb")] {
        let o = run_cli(&env, &["submit", file, "--batch-id", batch]);
        assert!(o.status.success(), "{}", text(&o));
    }
    rt.block_on(env.wait_status("ba", Duration::from_secs(120), |s| s.created >= 2));
    let bb_identity = env.path("state/keyfleet/bb.age-identity");
    let keys = env.path("keys");
    assert!(
        bb_identity.exists(),
        "submit put bb's identity in the state folder"
    );

    // The identity of another batch: refused before anything is read.
    let o = collect_cli(&env, "ba", &keys, Some(&bb_identity), "3s");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("is not the identity of batch \"ba\""),
        "names the mismatch: {}",
        text(&o)
    );
    assert!(!env.path("keys/rejected.jsonl").exists());

    // The right identity (found in the state folder without --identity) gets every key.
    let o = collect_cli(&env, "ba", &keys, None, "10s");
    complete(&o, 2);
    assert_eq!(rt.block_on(keys_are_registered(&env, "keys")), 2);
}

/// The identity check passes, but the results were sealed to another recipient (the batch's
/// recipient was replaced after its keys were made): the keys cannot be decrypted here, so they
/// stay on the queue, collect exits 1, and a collect with the identity they were sealed to gets
/// every one.
#[test]
fn undecryptable_result_stays_queued() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut env = Env::new("undecrypt");
    env.start_worker(&["--threads", "1"]);
    let input = env.write("fleet.csv", &fleet_csv(3, "cn-qingdao"));
    rt.block_on(env.submit(&input, "bund"));
    rt.block_on(env.wait_status("bund", Duration::from_secs(120), |s| s.created >= 3));
    let store = rt
        .block_on(keyfleet::registry::batch_status::BatchStatusStore::connect(
            &env.redis,
            &env.prefix,
            Duration::from_secs(10),
        ))
        .unwrap();
    let sealed_to = rt.block_on(store.recipient("bund")).unwrap().unwrap();
    let other = env.path("other.age-identity");
    let keys = env.path("keys");
    let other_recipient = keyfleet::sink::transit::create_identity(&other).unwrap();
    rt.block_on(store.set_recipient("bund", &other_recipient.to_string()))
        .unwrap();
    let o = collect_cli(&env, "bund", &keys, Some(&other), "3s");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("left on the queue"),
        "{}",
        text(&o)
    );
    assert_eq!(crate::util::walk_pem(&env.path("keys")), 0);
    rt.block_on(store.set_recipient("bund", &sealed_to))
        .unwrap();
    let c = rt.block_on(env.collect("bund", "keys", Duration::from_secs(10)));
    assert!(c.complete, "{c:?}");
    assert_eq!(c.kept, 0);
    let (created, _) = rt.block_on(check_batch(&env, "keys", 3));
    assert_eq!(created, 3);
}

/// `collect` into a folder on a small tmpfs: it stops when the disk is full, having acked only
/// what is on disk; with room again, a second collect delivers every other key, exactly once.
#[test]
fn full_disk_collect_keeps_keys_queued() {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").map_or(1, |m| m.uid()) != 0 {
        eprintln!("full_disk_collect_keeps_keys_queued: needs root to mount a tmpfs; not run");
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut env = Env::new("diskfull");
    env.start_worker(&["--threads", "2"]);
    let jobs = 24;
    let input = env.write("fleet.csv", &fleet_csv(jobs, "cn-beijing"));
    rt.block_on(env.submit(&input, "bfull"));
    rt.block_on(env.wait_status("bfull", Duration::from_secs(240), |s| {
        s.created >= jobs as u64
    }));
    let mnt = env.path("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=40k", "tmpfs"])
        .arg(&mnt)
        .status()
        .expect("mount");
    assert!(mount.success(), "mount a 40 KiB tmpfs at {}", mnt.display());
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&mnt);
    let small = env.path("small/keys");
    let o = collect_cli(&env, "bfull", &small, None, "5s");
    assert_eq!(o.status.code(), Some(1), "the disk fills up: {}", text(&o));
    let written_first = manifest(&env.path("small/keys")).len();
    assert!(written_first < jobs, "{written_first} of {jobs} fit");
    let remount = std::process::Command::new("mount")
        .args(["-o", "remount,size=4m"])
        .arg(&mnt)
        .status()
        .expect("remount");
    assert!(remount.success());
    let o = collect_cli(&env, "bfull", &small, None, "10s");
    assert!(o.status.success(), "{}", text(&o));
    let (created, _) = rt.block_on(check_batch(&env, "small/keys", jobs));
    assert_eq!(created, jobs);
}

/// SIGKILL `collect` while it writes, several times, then let one finish: every key delivered
/// exactly once, each key file the registered key.
#[test]
fn killed_collect_loses_no_key() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut env = Env::new("killcollect");
    env.start_worker(&["--threads", "2"]);
    let jobs = 60;
    let input = env.write("fleet.csv", &fleet_csv(jobs, "cn-shanghai"));
    rt.block_on(env.submit(&input, "bkill"));
    rt.block_on(env.wait_status("bkill", Duration::from_secs(300), |s| {
        s.created >= jobs as u64
    }));
    let identity = env.identity("bkill");
    let out = env.path("keys");
    let pems = |dir: &Path| {
        if dir.exists() {
            crate::util::walk_pem(dir)
        } else {
            0
        }
    };
    let mut mid_batch = 0;
    for round in 0..4 {
        let before = pems(&out);
        let mut child = env
            .cli(&[
                "collect",
                "bkill",
                "--out",
                out.to_str().unwrap(),
                "--identity",
                identity.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Kill it as soon as it has written a few more keys (or after 20 s at most).
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline
            && pems(&out).saturating_sub(before) < 1 + round
            && child.try_wait().unwrap().is_none()
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        if child.try_wait().unwrap().is_none() && pems(&out) < jobs {
            mid_batch += 1;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(
        mid_batch >= 2,
        "only {mid_batch} of 4 kills landed mid-batch"
    );
    let c = rt.block_on(env.collect("bkill", "keys", Duration::from_secs(10)));
    assert!(c.complete, "{c:?}");
    let (created, _) = rt.block_on(check_batch(&env, "keys", jobs));
    assert_eq!(created, jobs);
}

#[test]
fn collect_of_unknown_batch_exits_1_and_creates_nothing() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let env = Env::new("nobatch");
    env.track("no-such-batch");
    let o = run_cli(&env, &["collect", "no-such-batch", "--out", "keys"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no such batch"),
        "{}",
        text(&o)
    );
    assert!(!env.path("keys").exists(), "no output folder made");
    // No results queue was declared for it: a passive declare finds none.
    rt.block_on(async {
        let conn = lapin::Connection::connect(&crate::util::amqp_url(), Default::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let q = format!("{}.results.no-such-batch", env.prefix);
        assert!(
            ch.queue_declare(q.as_str().into(), passive, Default::default())
                .await
                .is_err(),
            "{q} must not exist"
        );
    });
}

#[test]
fn collect_into_second_folder_names_the_first() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut env = Env::new("secondfolder");
    env.start_worker(&["--threads", "1"]);
    let input = env.write("fleet.csv", &fleet_csv(3, "cn-shenzhen"));
    rt.block_on(env.submit(&input, "btwice"));
    let c = rt.block_on(env.collect("btwice", "first", Duration::from_secs(60)));
    assert!(c.complete, "{c:?}");
    let identity = env.identity("btwice");
    let started = Instant::now();
    let o = collect_cli(&env, "btwice", &env.path("second"), Some(&identity), "30s");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    let first = std::fs::canonicalize(env.path("first")).unwrap();
    assert!(
        err.contains("already collected into") && err.contains(&*first.to_string_lossy()),
        "{}",
        text(&o)
    );
    assert!(err.contains("3 results"), "{}", text(&o));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "answers at once, not after the idle timeout"
    );
    // The same folder again is fine: it is complete there.
    let o = collect_cli(&env, "btwice", &env.path("first"), Some(&identity), "30s");
    complete(&o, 3);
}

/// `B=$(keyfleet submit f.csv)`: standard output is the batch id alone; the identity goes to
/// the state folder (0600 in 0700), not the working directory; collect finds it there and
/// removes it once the batch is complete.
#[test]
fn submit_prints_the_batch_id_and_keeps_identity_in_state_folder() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut env = Env::new("submitout");
    env.start_worker(&["--threads", "1"]);
    env.write("fleet.csv", &fleet_csv(2, "cn-hongkong"));
    let o = run_cli(&env, &["submit", "fleet.csv"]);
    assert!(o.status.success(), "{}", text(&o));
    let batch = String::from_utf8(o.stdout.clone()).unwrap();
    let batch = batch.trim_end_matches('\n');
    assert!(
        uuid::Uuid::parse_str(batch).is_ok(),
        "stdout is the id alone: {batch:?}"
    );
    env.track(batch);
    let status = run_cli(&env, &["status", batch]);
    assert!(status.status.success(), "{}", text(&status));

    let in_cwd: Vec<_> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".age-identity"))
        .collect();
    assert!(in_cwd.is_empty(), "no identity in the working directory");
    let state = env.path("state/keyfleet");
    let identity = state.join(format!("{batch}.age-identity"));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&identity), 0o600);
    assert_eq!(mode(&state), 0o700);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&*identity.to_string_lossy()),
        "submit says where the identity is: {}",
        text(&o)
    );

    let keys = env.path("keys");
    let o = collect_cli(&env, batch, &keys, None, "30s");
    complete(&o, 2);
    assert!(!identity.exists(), "removed once the batch is collected");
    // Again into the same folder: it is complete there, and needs no identity to say so.
    let o = collect_cli(&env, batch, &keys, None, "30s");
    complete(&o, 2);
    assert_eq!(rt.block_on(keys_are_registered(&env, "keys")), 2);
}

/// `submit --wait --out DIR` keeps the identity in DIR while it collects, and removes it at
/// the end unless --keep-identity.
#[test]
fn submit_wait_keeps_identity_in_the_output_folder() {
    let mut env = Env::new("waitid");
    env.start_worker(&["--threads", "1"]);
    env.write("fleet.csv", &fleet_csv(2, "cn-zhangjiakou"));
    let keys = env.path("keys");
    let o = run_cli(
        &env,
        &[
            "submit",
            "fleet.csv",
            "--batch-id",
            "bwait",
            "--wait",
            "--out",
            keys.to_str().unwrap(),
            "--keep-identity",
        ],
    );
    env.track("bwait");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "bwait\n",
        "{}",
        text(&o)
    );
    let identity = env.path("keys/bwait.age-identity");
    assert!(identity.exists(), "kept with --keep-identity");
    assert!(!env.path("state/keyfleet/bwait.age-identity").exists());
}

/// SIGTERM while collect waits for results: it stops, says what it has, and exits 130.
#[test]
fn interrupted_collect_exits_130() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let env = Env::new("intcollect");
    // No worker: the batch's results never come, so collect waits.
    let input = env.write("fleet.csv", &fleet_csv(2, "cn-wulanchabu"));
    rt.block_on(env.submit(&input, "bint"));
    let identity = env.identity("bint");
    let mut child = env
        .cli(&[
            "collect",
            "bint",
            "--out",
            env.path("keys").to_str().unwrap(),
            "--identity",
            identity.to_str().unwrap(),
            "--idle-timeout",
            "60s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Waiting on the queue once its output folder exists.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !env.path("keys/manifest.jsonl").exists() {
        assert!(Instant::now() < deadline, "collect did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    crate::util::signal(&child, "TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "collect did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("incomplete: 0/2"),
        "{}",
        text(&o)
    );
}

/// The fault: `collect` (and so `submit --wait`) stopped with an error when its RabbitMQ
/// connection dropped mid-batch — a node restarting, or lost in a cluster — though the batch
/// went on. Now it makes what it wrote durable, lets the unacked results go back to the queue
/// with the old channel, reconnects and goes on: the batch completes with every job answered
/// once and every key file the registered key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collect_rides_out_a_lost_rabbitmq_connection() {
    let mut env = Env::new("collost");
    env.start_worker(&["--threads", "1", "--concurrency", "4", "--reservoir", "0"]);
    let rows = 60;
    let input = env.write("fleet.csv", &fleet_csv(rows, "cn-shenzhen"));
    env.submit(&input, "bcollost").await;
    let cut = async {
        env.wait_status("bcollost", Duration::from_secs(120), |s| s.created >= 10)
            .await;
        // This test process's connections are the collector's (the worker is a process of
        // its own): RabbitMQ drops them as it would on a restart.
        close_rabbitmq_connections_of(std::process::id());
    };
    let (c, ()) = tokio::join!(env.collect("bcollost", "out", Duration::from_secs(60)), cut);
    assert!(c.complete, "{c:?}");
    let (created, failed) = check_batch(&env, "out", rows).await;
    assert_eq!((created, failed.len()), (rows, 0), "{failed:?}");
}

/// A batch id submitted again with another identity than the one its keys are already
/// encrypted to: refused before any job is published (the keys already sealed would become
/// unreadable to the batch's collector), naming the recorded recipient and `--identity`.
#[test]
fn resubmitting_a_batch_with_another_identity_is_refused() {
    let env = Env::new("reid");
    env.track("breid");
    env.write("fleet.csv", &fleet_csv(2, "cn-nanjing"));
    let first = env.path("first.age-identity");
    let o = run_cli(
        &env,
        &[
            "submit",
            "fleet.csv",
            "--batch-id",
            "breid",
            "--identity",
            first.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let again = |identity: &std::path::Path| {
        run_cli(
            &env,
            &[
                "submit",
                "fleet.csv",
                "--batch-id",
                "breid",
                "--identity",
                identity.to_str().unwrap(),
            ],
        )
    };
    let o = again(&env.path("second.age-identity"));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("are encrypted to age1"), "{}", text(&o));
    assert!(text(&o).contains("--identity"), "{}", text(&o));
    assert!(
        !env.path("second.age-identity").exists(),
        "no identity made for it"
    );
    // The batch's own identity: accepted.
    let o = again(&first);
    assert!(o.status.success(), "{}", text(&o));
}
