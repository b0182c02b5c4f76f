//! The `keyfleet` binary as a user meets it: exit codes, error messages that name the bad
//! setting, describe / delete against the state a run left.

use crate::util::{keyfleet, text};

#[test]
fn bad_values_exit_2_and_name_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("f.csv"),
        "RegionId,KeyPairName\ncn-hangzhou,a1\n",
    )
    .unwrap();
    let out = keyfleet(dir.path())
        .args(["run", "f.csv", "--out", "o", "--key-bits", "1024"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("2048, 3072 or 4096"), "{}", text(&out));

    let out = keyfleet(dir.path())
        .env("KEYFLEET_QUOTA", "lots")
        .args(["run", "f.csv", "--out", "o"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("KEYFLEET_QUOTA"), "{}", text(&out));

    std::fs::write(dir.path().join("keyfleet.toml"), "quota = 0\n").unwrap();
    let out = keyfleet(dir.path())
        .args(["run", "f.csv", "--out", "o"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("`quota`"), "{}", text(&out));

    for bad in ["0", "1001", "eight"] {
        let out = keyfleet(dir.path())
            .args(["submit", "f.csv", "--jobs-per-message", bad])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", text(&out));
        assert!(
            text(&out).contains("must be auto or 1 to 1000"),
            "{bad}: {}",
            text(&out)
        );
    }
    assert!(
        !dir.path().join("o").exists(),
        "nothing written on a config error"
    );
}

/// A setting that cannot work exits 2 like a bad flag, and each cause is printed once (the
/// credentials error once printed the OS error twice).
#[test]
fn unusable_settings_exit_2_printing_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = keyfleet(dir.path())
        .args(["serve", "--credentials", "missing.toml"])
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("missing.toml"), "{t}");
    assert_eq!(t.matches("No such file or directory").count(), 1, "{t}");

    let out = keyfleet(dir.path())
        .args(["reconcile", "--region", "cn-hangzhou"])
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("--upstream-endpoint"), "{t}");
}

#[test]
fn missing_input_exits_1_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let out = keyfleet(dir.path())
        .args(["run", "nope.csv", "--out", "o"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("nope.csv"), "{}", text(&out));
}

#[test]
fn run_then_describe_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("f.csv"),
        "RegionId,KeyPairName,Tag.1.Key,Tag.1.Value\ncn-hangzhou,web-1,env,prod\ncn-hangzhou,web-2,,\ncn-beijing,db-1,,\nmars,x1,,\n",
    )
    .unwrap();
    let out = keyfleet(dir.path())
        .args(["run", "f.csv", "--out", "keys", "--owner", "acme"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("4 rows: 3 created, 1 failed"), "{t}");
    assert!(t.contains("InvalidRegionId.NotFound: 1"), "{t}");
    assert!(
        dir.path().join("keyfleet.redb").exists(),
        "default state file"
    );

    let out = keyfleet(dir.path())
        .args(["describe", "--name", "web-*", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let names: Vec<String> = stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["name"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(names, ["web-1", "web-2"]);
    assert!(!stdout.contains("PRIVATE KEY"));

    let out = keyfleet(dir.path())
        .args([
            "delete",
            "--owner",
            "acme",
            "--region",
            "cn-hangzhou",
            "web-1",
            "ghost",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a name that was not there is reported"
    );
    assert!(text(&out).contains("deleted web-1") && text(&out).contains("not found ghost"));

    // Second run into the same folder: the earlier manifest is kept beside the new one; web-1
    // (deleted) is reserved again but its old key file is never overwritten (nor its key
    // registered again), so that row fails and nothing stays registered for it; the other two
    // are listed again, delivered by the first run, their key files untouched.
    let web2 = std::fs::read(dir.path().join("keys/aliyun/acme/cn-hangzhou/web-2.pem")).unwrap();
    let out = keyfleet(dir.path())
        .args(["run", "f.csv", "--out", "keys", "--owner", "acme", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["created"], 0);
    assert_eq!(summary["delivered_earlier"], 2, "{summary}");
    assert_eq!(summary["failed_by_code"]["InternalError"], 1);
    assert_eq!(
        std::fs::read(dir.path().join("keys/aliyun/acme/cn-hangzhou/web-2.pem")).unwrap(),
        web2
    );
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(dir.path().join("keys/manifest.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(lines[1]["status"], "created");
    assert_eq!(lines[1]["delivered_earlier"], true);
    assert!(lines[1]["private_key_file"]
        .as_str()
        .unwrap()
        .ends_with("web-2.pem"));
    assert!(lines[0]["message"]
        .as_str()
        .unwrap()
        .contains("it holds a key this row did not make"));
    let manifests = std::fs::read_dir(dir.path().join("keys"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("manifest")
        })
        .count();
    assert_eq!(manifests, 2);
    let out = keyfleet(dir.path())
        .args(["describe", "--region", "cn-hangzhou", "--json"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        1,
        "only web-2"
    );
}

/// Every setting a flag holds can also come from the environment, and `--help` says which
/// variable (one-off switches and describe/delete's query filters excepted).
#[test]
fn every_setting_flag_names_its_environment_variable() {
    let dir = tempfile::tempdir().unwrap();
    // `--scalar`'s variable is KEYFLEET_SIMD=off, which the engine reads itself.
    let switches = [
        "--help",
        "--version",
        "--json",
        "--wait",
        "--compare",
        "--pipeline",
        "--pooled",
        "--keys",
        "--scalar",
        "--serve",
        "--submit",
    ];
    let mut env_flags = std::collections::HashMap::<String, String>::new();
    for command in ["run", "bench", "submit", "collect", "status", "serve"] {
        let out = keyfleet(dir.path())
            .args([command, "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout).to_string();
        if command != "run" && command != "serve" {
            // Settings of the embedded registry belong to the commands that use it: `status`
            // reads a rotation's record from the state file, nothing else does.
            assert!(
                (command == "status" || !help.contains("--state")) && !help.contains("--quota"),
                "{command}: {help}"
            );
        }
        let mut flag: Option<String> = None;
        let mut has_env = false;
        for line in help.lines().chain(std::iter::once("  --end")) {
            let t = line.trim_start();
            if t.starts_with("--") || t.starts_with("-h, --") {
                if let Some(f) = flag.take() {
                    assert!(
                        has_env || switches.contains(&f.as_str()),
                        "keyfleet {command} {f} names no environment variable"
                    );
                }
                let name = t
                    .trim_start_matches("-h, ")
                    .split_whitespace()
                    .next()
                    .unwrap();
                flag = Some(name.to_owned());
                has_env = false;
            }
            has_env |= line.contains("[env: KEYFLEET_");
            // One variable, one meaning: `collect --idle-timeout` and `serve`'s keep-alive
            // timeout once shared KEYFLEET_IDLE_TIMEOUT, so exporting it for one changed the other.
            if let (Some(f), Some(rest)) = (&flag, line.split("[env: ").nth(1)) {
                let var: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                // `bench --bits` is `--key-bits` under a shorter name: the same setting.
                let f = &f.replace("--bits", "--key-bits");
                let first = env_flags.entry(var.clone()).or_insert_with(|| f.clone());
                assert_eq!(
                    first, f,
                    "{var} is the variable of both {first} and keyfleet {command} {f}"
                );
            }
        }
    }
}

/// The job contract allows any 1–200 bytes without control characters as a batch id; the
/// command line takes exactly the same, so every batch a producer can submit can be looked at.
#[test]
fn contract_valid_batch_id_is_accepted_by_status_and_collect() {
    let dir = tempfile::tempdir().unwrap();
    let long = "b".repeat(200);
    for id in ["onboarding 2026/11", "密钥批次-1", "x}:jobs", long.as_str()] {
        let out = keyfleet(dir.path())
            .args(["status", id, "--redis-url", "redis://127.0.0.1:1/"])
            .args(["--connect-timeout", "1s"])
            .output()
            .unwrap();
        assert_ne!(out.status.code(), Some(2), "{id}: {}", text(&out));
        assert!(
            !text(&out).contains("not a batch id"),
            "{id}: {}",
            text(&out)
        );
    }
    for bad in ["", "tab\there", &"b".repeat(201)] {
        let out = keyfleet(dir.path()).args(["status", bad]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", text(&out));
        assert!(text(&out).contains("not a batch id"), "{}", text(&out));
    }
}

#[test]
fn describe_table_lines_up_chinese_names() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("c.csv"),
        "RegionId,KeyPairName\ncn-hangzhou,web-01\ncn-hangzhou,密钥对一号\n",
    )
    .unwrap();
    let out = keyfleet(dir.path())
        .args([
            "run",
            "c.csv",
            "--out",
            "o",
            "--progress",
            "off",
            "--threads",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = keyfleet(dir.path()).arg("describe").output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    let year = &keyfleet::time::now_rfc3339()[..4];
    let columns: Vec<usize> = table
        .lines()
        .skip(1)
        .map(|l| {
            let at = l.find(year).expect("a CREATED cell");
            unicode_width::UnicodeWidthStr::width(&l[..at])
        })
        .collect();
    assert_eq!(columns.len(), 2, "{table}");
    assert_eq!(columns[0], columns[1], "{table}");
}

/// `keyfleet describe | head -1`: the reader closes the pipe; the command ends quietly with 0
/// instead of panicking ("Broken pipe", exit 101).
#[test]
fn describe_into_closed_pipe_exits_0_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let mut csv = String::from("RegionId,KeyPairName\n");
    for i in 0..3 {
        csv.push_str(&format!("cn-hangzhou,pipe-{i}\n"));
    }
    std::fs::write(dir.path().join("f.csv"), csv).unwrap();
    let out = keyfleet(dir.path())
        .args(["run", "f.csv", "--out", "o"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    for args in [&["describe"][..], &["describe", "--json"][..]] {
        let mut child = keyfleet(dir.path())
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The reader is gone before the command writes its first line.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// The progress bar's rate reads like the line mode's: `238/s`, not indicatif's `238.1506/s`.
#[test]
fn progress_rate_has_no_four_decimals() {
    assert_eq!(keyfleet::telemetry::progress::rate(238.150_6), "238/s");
    assert_eq!(keyfleet::telemetry::progress::rate(9.46), "9.5/s");
    assert_eq!(keyfleet::telemetry::progress::rate(0.0), "0.0/s");
}

/// `bench --pipeline --pooled` reports the plumbing alone beside the pipeline, and each
/// round's figures beside the medians (no figure is asserted: benchmarks are benchmarks), and
/// `--pooled` alone is refused, naming --pipeline.
#[test]
fn bench_pooled_reports_the_plumbing_alone() {
    let dir = tempfile::tempdir().unwrap();
    let bench = [
        "bench",
        "--keys",
        "6",
        "--threads",
        "2",
        "--rounds",
        "2",
        "--pipeline",
        "--pooled",
    ];
    let out = keyfleet(dir.path())
        .args(bench)
        .args(["--keep-output", "--json"])
        .env("TMPDIR", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for field in [
        "pipeline_keys_per_second",
        "pipeline_cpu_ms_per_key",
        "pooled_keys_per_second",
        "pooled_cpu_ms_per_key",
    ] {
        assert!(r[field].as_f64().is_some_and(|v| v > 0.0), "{field}: {r}");
    }
    for field in ["pipeline_round_ratios", "pooled_rounds_keys_per_second"] {
        let rounds = r[field]
            .as_array()
            .unwrap_or_else(|| panic!("{field}: {r}"));
        assert_eq!(rounds.len(), 2, "one figure a round: {field}: {r}");
        assert!(
            rounds.iter().all(|v| v.as_f64().is_some_and(|v| v > 0.0)),
            "{r}"
        );
    }
    // --keep-output: each round's two runs' folders are left where the report says, keys and all.
    let kept = std::path::PathBuf::from(r["output_kept"].as_str().expect("output_kept"));
    assert!(kept.starts_with(dir.path()), "{r}");
    let manifests = std::fs::read_dir(&kept)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .join("out/manifest.jsonl")
                .is_file()
        })
        .count();
    assert_eq!(
        manifests, 4,
        "each round's pipeline and pooled run folders: {r}"
    );
    // Read by a person: each round's figures beside the medians.
    let out = keyfleet(dir.path())
        .args(bench)
        .env("TMPDIR", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("(the rounds' own ratios: "), "{report}");
    assert!(report.contains("(rounds: "), "{report}");
    let out = keyfleet(dir.path())
        .args(["bench", "--keys", "2", "--pooled"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("--pipeline"), "{}", text(&out));
}

/// Settings of `bench --submit`, `bench --serve` and `bench --pipeline` exported for `submit`
/// and the others (`KEYFLEET_CONFIRM_WINDOW`, `KEYFLEET_JOBS_PER_MESSAGE`,
/// `KEYFLEET_BENCH_CONCURRENCY`, `KEYFLEET_BENCH_KEEP_OUTPUT`) do not stop a plain `bench`:
/// clap took a value from the environment for a flag given, and refused the run for want of
/// `--submit` (or `--pipeline`).
#[test]
fn bench_runs_with_the_submit_settings_in_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let out = keyfleet(dir.path())
        .args(["bench", "--keys", "2", "--threads", "1", "--json"])
        .env("KEYFLEET_CONFIRM_WINDOW", "64")
        .env("KEYFLEET_JOBS_PER_MESSAGE", "1")
        .env("KEYFLEET_BENCH_CONCURRENCY", "2")
        .env("KEYFLEET_BENCH_KEEP_OUTPUT", "true")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["keys"], 2, "{r}");
}

/// `bench --submit` times `submit` and the bare publisher on the real RabbitMQ and Redis
/// (no figure is asserted: benchmarks are benchmarks), on queues and Redis keys of its own
/// that are gone afterwards.
#[test]
fn bench_submit_reports_submit_beside_a_bare_publisher_and_leaves_no_queue() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("kfbs{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let out = keyfleet(dir.path())
        .args([
            "bench", "--submit", "--keys", "200", "--rounds", "1", "--json",
        ])
        .args(["--prefix", &prefix])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for field in [
        "bare_median_jobs_per_second",
        "submit_median_jobs_per_second",
        "submit_ratio_to_bare",
    ] {
        assert!(r[field].as_f64().is_some_and(|v| v > 0.0), "{field}: {r}");
    }
    assert_eq!(r["jobs"], 200, "{r}");
    assert_eq!(r["jobs_per_message"], "auto", "{r}");
    assert_eq!(r["messages"], 25, "200 jobs, 8 a message: {r}");
    let queues = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "name", "--quiet", "--no-table-headers"])
        .output()
        .expect("rabbitmqctl");
    let left: Vec<String> = String::from_utf8_lossy(&queues.stdout)
        .lines()
        .filter(|q| q.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    assert!(left.is_empty(), "queues left behind: {left:?}");
    let keys = std::process::Command::new("redis-cli")
        .args(["--scan", "--pattern", &format!("{prefix}*")])
        .output()
        .expect("redis-cli (installed with Redis by scripts/test.sh)");
    let left = String::from_utf8_lossy(&keys.stdout);
    assert!(left.trim().is_empty(), "Redis keys left behind: {left}");
}
