//! `keyfleet run` against input a hostile (or unlucky) user gives it: a damaged state file,
//! bad CSV quoting, CRLF line ends, pipes and standard input, absurd flags. Each test is named
//! after the fault it pins; each answer is a clear message and a meaningful exit code, never a
//! panic, a hang or a silently lost row.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::util::{keyfleet, text};
use std::time::Duration;

fn manifest(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("manifest.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("whole manifest lines"))
        .collect()
}

fn run(dir: &Path, input: &str, extra: &[&str]) -> Output {
    keyfleet(dir)
        .args([
            "run",
            input,
            "--out",
            "o",
            "--progress",
            "off",
            "--threads",
            "1",
        ])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn truncated_state_file_exits_1_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.csv"),
        "RegionId,KeyPairName\ncn-hangzhou,a1\n",
    )
    .unwrap();
    let out = run(dir.path(), "a.csv", &["--state", "good.redb"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let good = std::fs::read(dir.path().join("good.redb")).unwrap();
    for cut in [512, 4096, good.len() / 2, good.len() - 1] {
        let state = dir.path().join(format!("cut-{cut}.redb"));
        std::fs::write(&state, &good[..cut]).unwrap();
        let out = run(dir.path(), "a.csv", &["--state", state.to_str().unwrap()]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "cut at {cut}: {t}");
        assert!(
            t.contains("damaged") || t.contains("cannot open state file"),
            "{t}"
        );
        assert!(!t.contains("panicked"), "cut at {cut}: {t}");
    }
}

#[test]
fn zero_length_state_file_is_refused_not_taken_as_empty() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.csv"),
        "RegionId,KeyPairName\ncn-hangzhou,a1\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("zero.redb"), b"").unwrap();
    let out = run(dir.path(), "a.csv", &["--state", "zero.redb"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("is empty"), "{}", text(&out));
}

#[test]
fn state_in_a_missing_folder_is_refused_not_created() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.csv"),
        "RegionId,KeyPairName\ncn-hangzhou,a1\n",
    )
    .unwrap();
    let out = run(dir.path(), "a.csv", &["--state", "nowhere/deeper/x.redb"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("does not exist"), "{}", text(&out));
    assert!(!dir.path().join("nowhere").exists());
}

#[test]
fn bad_csv_quoting_fails_one_row_and_the_rest_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut csv = String::from("Provider,Owner,KeyPairName,Region\n");
    csv.push_str("ucloud,,first,cn-bj2\n");
    csv.push_str("ucloud,,\"unterminated,cn-bj2\n");
    for i in 0..49 {
        csv.push_str(&format!("ucloud,,row-{i},cn-bj2\n"));
    }
    csv.push_str("ucloud,,\"bad\"quote\",cn-bj2\n");
    std::fs::write(dir.path().join("q.csv"), csv).unwrap();
    let out = run(dir.path(), "q.csv", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lines = manifest(&dir.path().join("o"));
    assert_eq!(lines.len(), 52, "one manifest line per row");
    let failed: Vec<u64> = lines
        .iter()
        .filter(|l| l["status"] == "failed")
        .map(|l| l["line"].as_u64().unwrap())
        .collect();
    assert_eq!(failed, [3, 53]);
    assert!(lines.iter().all(|l| l["key_pair_name"] != "badquote\""));
}

#[test]
fn crlf_input_keeps_manifest_line_numbers() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("w.csv"),
        "RegionId,KeyPairName\r\ncn-hangzhou,crlf-1\r\ncn-hangzhou,1bad\r\n",
    )
    .unwrap();
    let out = run(dir.path(), "w.csv", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lines = manifest(&dir.path().join("o"));
    let got: Vec<(u64, &str)> = lines
        .iter()
        .map(|l| (l["line"].as_u64().unwrap(), l["status"].as_str().unwrap()))
        .collect();
    assert_eq!(got, [(2, "created"), (3, "failed")]);
}

#[test]
fn fifo_and_stdin_input_are_read_once() {
    let dir = tempfile::tempdir().unwrap();
    let rows = "RegionId,KeyPairName\ncn-hangzhou,p1\ncn-hangzhou,p2\ncn-hangzhou,p3\n";
    // Standard input, named `-`.
    let mut child = keyfleet(dir.path())
        .args([
            "run",
            "-",
            "--format",
            "csv",
            "--out",
            "o1",
            "--progress",
            "off",
        ])
        .args(["--threads", "1", "--state", "s1.redb"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rows.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(manifest(&dir.path().join("o1")).len(), 3);

    // A FIFO: a writer that comes and goes once.
    let fifo = dir.path().join("f.csv");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let writer = {
        let (fifo, rows) = (fifo.clone(), rows.to_owned());
        std::thread::spawn(move || std::fs::write(fifo, rows).unwrap())
    };
    let mut child = keyfleet(dir.path())
        .args(["run", "f.csv", "--out", "o2", "--progress", "off"])
        .args(["--threads", "1", "--state", "s2.redb"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "run on a FIFO hangs");
        std::thread::sleep(Duration::from_millis(100));
    }
    writer.join().unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let names: Vec<String> = manifest(&dir.path().join("o2"))
        .iter()
        .map(|l| l["key_pair_name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["p1", "p2", "p3"]);
}

#[test]
fn absurd_threads_are_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.csv"),
        "RegionId,KeyPairName\ncn-hangzhou,a1\n",
    )
    .unwrap();
    let started = std::time::Instant::now();
    let out = keyfleet(dir.path())
        .args(["run", "a.csv", "--out", "o", "--threads", "100000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--threads"), "{}", text(&out));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!dir.path().join("o").exists());
    let bench = Command::new(env!("CARGO_BIN_EXE_keyfleet"))
        .args(["bench", "--threads", "100000"])
        .output()
        .unwrap();
    assert_eq!(bench.status.code(), Some(2), "{}", text(&bench));
}

#[test]
fn empty_input_file_is_a_clear_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("e.csv"), "").unwrap();
    let out = run(dir.path(), "e.csv", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("is empty"), "{}", text(&out));
    assert!(
        !dir.path().join("o").exists(),
        "no output folder for a bad input"
    );
}

#[test]
fn duplicate_header_columns_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("d.csv"),
        "RegionId,KeyPairName,KeyPairName\ncn-hangzhou,a,b\n",
    )
    .unwrap();
    let out = run(dir.path(), "d.csv", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("appears twice"), "{}", text(&out));
}

#[test]
fn error_cause_is_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.csv"),
        "RegionId,KeyPairName\ncn-hangzhou,a1\n",
    )
    .unwrap();
    let out = keyfleet(dir.path())
        .args(["run", "a.csv", "--out", "a.csv/inside", "--progress", "off"])
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert_eq!(t.matches("os error").count(), 1, "{t}");
    assert!(t.contains("cannot write to output folder"), "{t}");
}

#[test]
fn logs_carry_no_colour_codes_off_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.csv"),
        "RegionId,KeyPairName\ncn-hangzhou,a1\n",
    )
    .unwrap();
    let out = run(
        dir.path(),
        "a.csv",
        &["--log", "info", "--metrics-addr", "127.0.0.1:0"],
    );
    let t = text(&out);
    assert!(t.contains(" INFO "), "a log line was written: {t:?}");
    assert!(!t.contains('\u{1b}'), "{t:?}");
}

/// Found by fuzzing: a line holding only Unicode whitespace (U+3000, the ideographic space)
/// was skipped by the reader but counted in the progress total, which then ended one short.
#[test]
fn unicode_whitespace_line_is_not_counted_in_the_progress_total() {
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in [
        (
            "f.csv",
            "RegionId,KeyPairName\ncn-hangzhou,a\n\u{3000}\ncn-hangzhou,b\n \u{3000}\t\n",
        ),
        (
            "f.jsonl",
            "{\"RegionId\":\"cn-hangzhou\",\"KeyPairName\":\"a\"}\n\u{3000}\n{\"RegionId\":\"cn-hangzhou\",\"KeyPairName\":\"b\"}\n",
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        assert_eq!(
            keyfleet::job::batch::count_rows(&path, None),
            Some(2),
            "{name}: the total is the rows the reader hands out"
        );
        let out = run(dir.path(), name, &[]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert_eq!(manifest(&dir.path().join("o")).len(), 2, "{name}");
    }
}

/// Issue 17, fault 7: a CSV field that is not UTF-8 was read with U+FFFD in place of the bad
/// byte, and the pair created with it. Now that row fails, naming its line and column, and the
/// rows around it go on.
#[test]
fn invalid_utf8_csv_field_fails_its_row() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("u.csv"),
        b"RegionId,KeyPairName,Tag.1.Key,Tag.1.Value\n\
          cn-hangzhou,u1,env,pr\xffod\n\
          cn-hangzhou,u2,env,prod\n",
    )
    .unwrap();
    let out = run(dir.path(), "u.csv", &["--state", "s.redb"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lines = manifest(&dir.path().join("o"));
    let got: Vec<(u64, &str)> = lines
        .iter()
        .map(|l| (l["line"].as_u64().unwrap(), l["status"].as_str().unwrap()))
        .collect();
    assert_eq!(got, [(2, "failed"), (3, "created")]);
    let message = lines[0]["message"].as_str().unwrap();
    assert!(
        message.contains("line 2")
            && message.contains("column 4 (Tag.1.Value)")
            && message.contains("0xFF")
            && message.contains("UTF-8"),
        "{message}"
    );
    let listed = keyfleet(dir.path())
        .args(["describe", "--json", "--state", "s.redb"])
        .output()
        .unwrap();
    let listed = String::from_utf8(listed.stdout).unwrap();
    assert_eq!(listed.lines().count(), 1, "{listed}");
    assert!(
        !listed.contains('\u{fffd}') && !listed.contains("\\ufffd"),
        "{listed}"
    );
}

/// Issue 17, fault 7: a JSON Lines string holding a raw 0xFF byte was accepted (as U+FFFD).
#[test]
fn invalid_utf8_jsonl_fails_its_row() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("u.jsonl"),
        b"{\"RegionId\":\"cn-hangzhou\",\"KeyPairName\":\"j1\",\"Tag.1.Key\":\"pr\xffod\"}\n\
          {\"RegionId\":\"cn-hangzhou\",\"KeyPairName\":\"j2\"}\n",
    )
    .unwrap();
    let out = run(dir.path(), "u.jsonl", &["--state", "s.redb"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lines = manifest(&dir.path().join("o"));
    let got: Vec<(u64, &str)> = lines
        .iter()
        .map(|l| (l["line"].as_u64().unwrap(), l["status"].as_str().unwrap()))
        .collect();
    assert_eq!(got, [(1, "failed"), (2, "created")]);
    let message = lines[0]["message"].as_str().unwrap();
    assert!(
        message.contains("line 1: column 61") && message.contains("UTF-8"),
        "{message}"
    );
    assert!(
        !std::fs::read_to_string(dir.path().join("o/manifest.jsonl"))
            .unwrap()
            .contains('\u{fffd}')
    );
}

/// Issue 17, fault 11: a quoted field holding a line break (RFC 4180) became two failed rows.
/// It is one row, answered on the line it starts on, and the rows after it keep their numbers.
#[test]
fn csv_quoted_line_break_is_one_row() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("q.csv"),
        "RegionId,KeyPairName,Tag.1.Key,Tag.1.Value\r\n\
         cn-hangzhou,q1,note,\"first line\r\nsecond, \"\"quoted\"\" line\"\r\n\
         cn-hangzhou,q2,note,plain\r\n\
         cn-hangzhou,\"q3\",note,\"x\ny\nz\"\n\
         cn-hangzhou,1bad,note,plain\n",
    )
    .unwrap();
    assert_eq!(
        keyfleet::job::batch::count_rows(&dir.path().join("q.csv"), None),
        Some(4)
    );
    let out = run(dir.path(), "q.csv", &["--state", "s.redb"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lines = manifest(&dir.path().join("o"));
    let got: Vec<(u64, &str)> = lines
        .iter()
        .map(|l| (l["line"].as_u64().unwrap(), l["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        got,
        [
            (2, "created"),
            (4, "created"),
            (5, "created"),
            (8, "failed")
        ]
    );
    let listed = keyfleet(dir.path())
        .args(["describe", "--json", "--state", "s.redb", "--name", "q1"])
        .output()
        .unwrap();
    let pair: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(
        pair["tags"][0]["value"],
        "first line\r\nsecond, \"quoted\" line"
    );
}
