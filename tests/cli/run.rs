//! `keyfleet run` end to end on the embedded store: every error cause of both dialects in one
//! mixed batch, idempotent re-runs, the 500-per-region quota, and the key files themselves
//! checked with ssh-keygen and openssl.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

use crate::util::{manifest, run_batch, tool, Sandbox};
use keyfleet::dialect::{ApiError, Provider};
use keyfleet::registry::embedded::EmbeddedRegistry;
use keyfleet::registry::{Filter, Registry};
use keyfleet::settings::KeyPairQuota;
use serde_json::json;

fn code(p: Provider, e: ApiError) -> String {
    e.reply(p).code
}

/// One case of the mixed batch: the row and the code it must get (`None` = created).
struct Case {
    row: serde_json::Value,
    expect: Option<String>,
}

fn mixed_cases(reps: usize) -> Vec<Case> {
    use Provider::{Aliyun as A, Ucloud as U};
    let mut cases = Vec::new();
    let long = |n: usize| format!("k{}", "x".repeat(n - 1));
    let many_tags = |n: usize| {
        let mut m = serde_json::Map::new();
        for i in 1..=n {
            m.insert(format!("Tag.{i}.Key"), json!(format!("k{i}")));
            m.insert(format!("Tag.{i}.Value"), json!("v"));
        }
        m
    };
    for i in 0..reps {
        let mut push =
            |row: serde_json::Value, expect: Option<String>| cases.push(Case { row, expect });
        push(
            json!({"RegionId": "cn-hangzhou", "KeyPairName": format!("web-{i:03}")}),
            None,
        );
        push(
            json!({"RegionId": "cn-beijing", "KeyPairName": format!("app:{i}_x-y"),
                   "ResourceGroupId": "rg-resourcegroupid1", "Tag.1.Key": "env", "Tag.1.Value": "",
                   "Tag.2.Key": "team", "Tag.2.Value": "ops"}),
            None,
        );
        push(
            json!({"RegionId": "cn-shanghai", "KeyPairName": format!("密钥对{i}")}),
            None,
        );
        let mut t20 = many_tags(20);
        t20.insert("RegionId".into(), json!("cn-shanghai"));
        t20.insert("KeyPairName".into(), json!(format!("tags20-{i}")));
        push(serde_json::Value::Object(t20), None);
        // Errors, one per cause.
        push(
            json!({"RegionId": "cn-hangzhou", "KeyPairName": format!("web-{i:03}")}),
            Some(code(A, ApiError::AlreadyExists)),
        );
        push(
            json!({"RegionId": "cn-hangzhou", "KeyPairName": format!("{i}lead")}),
            Some(code(A, ApiError::NameMalformed)),
        );
        push(
            json!({"RegionId": "cn-hangzhou", "KeyPairName": "a"}),
            Some(code(A, ApiError::NameMalformed)),
        );
        push(
            json!({"RegionId": "cn-hangzhou", "KeyPairName": long(129)}),
            Some(code(A, ApiError::NameMalformed)),
        );
        push(
            json!({"RegionId": "cn-hangzhou", "KeyPairName": format!("http://h{i}")}),
            Some(code(A, ApiError::NameMalformed)),
        );
        push(
            json!({"RegionId": "cn-hangzhou", "KeyPairName": format!("sp ace{i}")}),
            Some(code(A, ApiError::NameMalformed)),
        );
        push(
            json!({"RegionId": "mars-1", "KeyPairName": format!("m{i}")}),
            Some(code(A, ApiError::RegionNotFound("mars-1".into()))),
        );
        push(
            json!({"RegionId": "cn-hangzhou", "KeyPairName": format!("rg{i}"), "ResourceGroupId": "rg-nope"}),
            Some(code(A, ApiError::ResourceGroupNotFound("rg-nope".into()))),
        );
        push(
            json!({"RegionId": "cn-hangzhou", "KeyPairName": format!("dup{i}"),
                    "Tag.1.Key": "k", "Tag.1.Value": "a", "Tag.2.Key": "k", "Tag.2.Value": "b"}),
            Some(code(A, ApiError::DuplicateTagKey)),
        );
        push(
            json!({"RegionId": "cn-hangzhou", "KeyPairName": format!("tk{i}"), "Tag.1.Key": "aliyun-x"}),
            Some(code(A, ApiError::TagKeyMalformed)),
        );
        push(
            json!({"RegionId": "cn-hangzhou", "KeyPairName": format!("te{i}"), "Tag.1.Key": ""}),
            Some(code(A, ApiError::TagKeyMalformed)),
        );
        push(
            json!({"RegionId": "cn-hangzhou", "KeyPairName": format!("tv{i}"), "Tag.1.Key": "k", "Tag.1.Value": "acs:v"}),
            Some(code(A, ApiError::TagValueMalformed)),
        );
        let mut t21 = many_tags(21);
        t21.insert("RegionId".into(), json!("cn-hangzhou"));
        t21.insert("KeyPairName".into(), json!(format!("tags21-{i}")));
        push(
            serde_json::Value::Object(t21),
            Some(code(A, ApiError::TooManyTags)),
        );
        push(
            json!({"RegionId": "cn-hangzhou"}),
            Some(code(A, ApiError::MissingParameter("KeyPairName".into()))),
        );
        push(
            json!({"RegionId": "cn-hangzhou", "KeyPairName": format!("u{i}"), "KeyPairname": "typo"}),
            Some(code(
                A,
                ApiError::InvalidParameter {
                    name: "KeyPairname".into(),
                    reason: String::new(),
                },
            )),
        );
        // UCloud.
        push(
            json!({"Provider": "ucloud", "Owner": "org-test", "KeyPairName": format!("db-{i:03}")}),
            None,
        );
        push(
            json!({"Provider": "ucloud", "Region": "cn-zj", "Zone": "cn-zj-01", "ProjectId": "org-x1",
                    "KeyPairName": format!("U{i}_key!#")}),
            None,
        );
        push(
            json!({"Provider": "ucloud", "Owner": "org-test", "KeyPairName": format!("db-{i:03}")}),
            Some(code(U, ApiError::AlreadyExists)),
        );
        push(
            json!({"Provider": "ucloud", "KeyPairName": long(64)}),
            Some(code(U, ApiError::NameMalformed)),
        );
        push(
            json!({"Provider": "ucloud", "Region": "xx-nowhere", "KeyPairName": format!("r{i}")}),
            Some(code(U, ApiError::RegionNotFound("xx-nowhere".into()))),
        );
        push(
            json!({"Provider": "ucloud", "Region": "cn-zj", "Zone": "cn-bj2-01", "KeyPairName": format!("z{i}")}),
            Some(code(U, ApiError::ZoneNotFound("cn-bj2-01".into()))),
        );
        push(
            json!({"Provider": "ucloud"}),
            Some(code(U, ApiError::MissingParameter("KeyPairName".into()))),
        );
    }
    cases
}

fn write_jsonl(sb: &Sandbox, name: &str, cases: &[Case]) -> std::path::PathBuf {
    let mut text = String::new();
    for c in cases {
        text.push_str(&c.row.to_string());
        text.push('\n');
    }
    // Lines that are not rows at all: they must be answered too, naming their line.
    text.push_str("{this is not json\n");
    sb.write(name, &text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_batch_gets_the_right_code_for_every_row_and_a_rerun_creates_nothing() {
    let sb = Sandbox::new();
    let cases = mixed_cases(12);
    let input = write_jsonl(&sb, "mixed.jsonl", &cases);
    let opts = sb.options(&input, "out1");
    let batch_opts = opts.clone();
    let summary = run_batch(opts).await;
    let lines = manifest(&sb.path("out1"));
    assert_eq!(lines.len(), cases.len() + 1, "one manifest line per row");
    let mut created = 0;
    for (i, (case, line)) in cases.iter().zip(&lines).enumerate() {
        assert_eq!(line["line"], json!(i + 1), "manifest is in input order");
        match &case.expect {
            None => {
                assert_eq!(
                    line["status"],
                    "created",
                    "row {}: {} → {line}",
                    i + 1,
                    case.row
                );
                created += 1;
            }
            Some(code) => {
                assert_eq!(line["status"], "failed", "row {}: {}", i + 1, case.row);
                assert_eq!(
                    line["code"],
                    json!(code),
                    "row {}: {} → {line}",
                    i + 1,
                    case.row
                );
            }
        }
    }
    let last = &lines[cases.len()];
    assert_eq!(last["status"], "failed");
    assert!(last["message"]
        .as_str()
        .unwrap()
        .contains(&format!("line {}", cases.len() + 1)));
    assert_eq!(summary.tally.created, created);
    assert_eq!(summary.tally.rows, cases.len() as u64 + 1);

    // Every created key: mode 0600, valid PKCS#8 (openssl), fingerprints equal ssh-keygen's.
    for line in lines.iter().filter(|l| l["status"] == "created") {
        let pem = line["private_key_file"].as_str().unwrap();
        let mode = std::fs::metadata(pem).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{pem}");
        assert!(std::fs::read_to_string(pem)
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----\n"));
        tool("openssl", &["pkey", "-check", "-noout", "-in", pem]);
        let pub_file = pem.replace(".pem", ".pub");
        let md5 = tool("ssh-keygen", &["-l", "-E", "md5", "-f", &pub_file]);
        let sha = tool("ssh-keygen", &["-l", "-E", "sha256", "-f", &pub_file]);
        let want_md5 = format!("MD5:{}", line["fingerprint_md5"].as_str().unwrap());
        assert!(md5.contains(&want_md5), "{md5} vs {want_md5}");
        assert!(
            sha.contains(line["fingerprint_sha256"].as_str().unwrap()),
            "{sha}"
        );
        assert!(md5.starts_with("2048 "), "{md5}");
        // The response body points at the file, never holds the key.
        let body = &line["response"];
        let pk = match line["provider"].as_str().unwrap() {
            "aliyun" => {
                assert_eq!(body["KeyPairFingerPrint"], line["fingerprint_md5"]);
                assert!(body["RequestId"]
                    .as_str()
                    .unwrap()
                    .chars()
                    .all(|c| !c.is_ascii_lowercase()));
                &body["PrivateKeyBody"]
            }
            _ => {
                assert_eq!(body["RetCode"], 0);
                assert_eq!(body["Action"], "CreateUHostKeyPairResponse");
                let kp = &body["KeyPair"];
                let id = kp["KeyPairId"].as_str().unwrap();
                assert!(id.starts_with("uhostkp-") && id.len() == 16, "{id}");
                let expect = keyfleet::dialect::ucloud::fingerprint(
                    kp["ProjectId"].as_str().unwrap(),
                    id,
                    line["public_key"].as_str().unwrap(),
                );
                assert_eq!(kp["KeyPairFingerPrint"], json!(expect));
                &kp["PrivateKeyBody"]
            }
        };
        assert_eq!(pk.as_str(), Some(pem));
    }
    let manifest_text = std::fs::read_to_string(sb.path("out1/manifest.jsonl")).unwrap();
    assert!(
        !manifest_text.contains("PRIVATE KEY"),
        "the manifest never holds key material"
    );

    // The same batch again, on the same state: nothing created, created rows now AlreadyExist.
    let mut again = batch_opts.clone();
    again.out = sb.path("out2");
    let summary2 = run_batch(again).await;
    assert_eq!(summary2.tally.created, 0);
    let lines2 = manifest(&sb.path("out2"));
    for (case, (first, second)) in cases.iter().zip(lines.iter().zip(&lines2)) {
        let provider: Provider = first["provider"].as_str().unwrap().parse().unwrap();
        let want = match &case.expect {
            None => code(provider, ApiError::AlreadyExists),
            Some(c) => c.clone(),
        };
        assert_eq!(second["code"], json!(want), "{}", case.row);
    }
    let registry = EmbeddedRegistry::open(&batch_opts.state).unwrap();
    let records = registry.describe(&Filter::default()).await.unwrap();
    assert_eq!(records.len() as u64, created);
    assert!(records.iter().all(|r| r.delivered));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_510_requests_create_exactly_500() {
    let sb = Sandbox::new();
    let mut text = String::from("RegionId,KeyPairName\n");
    for i in 0..510 {
        text.push_str(&format!("cn-qingdao,host-{i:04}\n"));
    }
    // Another region is not affected by the full one.
    text.push_str("cn-beijing,host-0000\n");
    let input = sb.write("fleet.csv", &text);
    let summary = run_batch(sb.options(&input, "out")).await;
    assert_eq!(summary.tally.created, 501);
    assert_eq!(
        summary.tally.failed_by_code,
        BTreeMap::from([("QuotaExceed.KeyPair".to_owned(), 10)])
    );
    let lines = manifest(&sb.path("out"));
    let over: Vec<_> = lines
        .iter()
        .filter(|l| l["code"] == "QuotaExceed.KeyPair")
        .collect();
    assert!(over.iter().all(|l| l["http_status"] == 403));
    assert_eq!(over[0]["message"], "The key pair quota exceeds.");
    let registry = EmbeddedRegistry::open(&sb.path("state.redb")).unwrap();
    let scope = keyfleet::dialect::Scope {
        provider: Provider::Aliyun,
        owner: "acct".into(),
        region: "cn-qingdao".into(),
    };
    assert_eq!(registry.quota_used(&scope).await.unwrap(), 500);

    // Deleting frees quota: two deletions, then two of the refused rows go through.
    assert!(registry.delete(&scope, "host-0000").await.unwrap());
    assert!(registry.delete(&scope, "host-0001").await.unwrap());
    drop(registry);
    let retry = sb.write(
        "retry.csv",
        "RegionId,KeyPairName\ncn-qingdao,host-0500\ncn-qingdao,host-0501\ncn-qingdao,host-0502\n",
    );
    let s = run_batch(sb.options(&retry, "out-retry")).await;
    assert_eq!((s.tally.created, s.tally.failed), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_region_quota_from_settings() {
    let sb = Sandbox::new();
    let input = sb.write(
        "f.csv",
        "RegionId,KeyPairName\ncn-beijing,a1\ncn-beijing,a2\ncn-beijing,a3\ncn-hangzhou,a1\ncn-hangzhou,a2\ncn-hangzhou,a3\n",
    );
    let mut opts = sb.options(&input, "out");
    opts.settings.quota = KeyPairQuota {
        default: 3,
        per_region: BTreeMap::from([("cn-beijing".to_owned(), 2)]),
    };
    let s = run_batch(opts).await;
    assert_eq!((s.tally.created, s.tally.failed), (5, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_key_file_is_never_overwritten_and_its_pair_is_not_kept() {
    let sb = Sandbox::new();
    let input = sb.write(
        "f.csv",
        "RegionId,KeyPairName\ncn-hangzhou,keep-me\ncn-hangzhou,fresh\n",
    );
    let existing = sb.path("out/aliyun/acct/cn-hangzhou/keep-me.pem");
    std::fs::create_dir_all(existing.parent().unwrap()).unwrap();
    std::fs::write(&existing, "precious").unwrap();
    let opts = sb.options(&input, "out");
    let state = opts.state.clone();
    let s = run_batch(opts).await;
    assert_eq!((s.tally.created, s.tally.failed), (1, 1));
    assert_eq!(std::fs::read_to_string(&existing).unwrap(), "precious");
    let lines = manifest(&sb.path("out"));
    assert_eq!(lines[0]["code"], "InternalError");
    assert!(lines[0]["message"]
        .as_str()
        .unwrap()
        .contains("refusing to overwrite"));
    let registry = EmbeddedRegistry::open(&state).unwrap();
    let names: Vec<String> = registry
        .describe(&Filter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(
        names,
        vec!["fresh".to_owned()],
        "the undeliverable pair was released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_output_folder_is_a_clear_error() {
    let sb = Sandbox::new();
    let input = sb.write("f.csv", "RegionId,KeyPairName\ncn-hangzhou,a1\n");
    sb.write("blocker", "a file where a folder should be");
    let mut opts = sb.options(&input, "blocker/out");
    opts.out = sb.path("blocker/out");
    let err = keyfleet::modes::run::run_locally(opts, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("blocker/out"), "{err}");
    // Nothing was reserved for a run that could not start.
    assert!(
        !sb.path("state.redb").exists() || {
            let r = EmbeddedRegistry::open(&sb.path("state.redb")).unwrap();
            r.describe(&Filter::default()).await.unwrap().is_empty()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_and_jsonl_inputs_agree() {
    let sb = Sandbox::new();
    let csv = sb.write(
        "a.csv",
        "Provider,RegionId,Region,KeyPairName,Tag.1.Key,Tag.1.Value\naliyun,cn-hangzhou,,c1,env,\nucloud,,cn-bj2,c2,,\n",
    );
    let s = run_batch(sb.options(&csv, "out-csv")).await;
    assert_eq!((s.tally.created, s.tally.failed), (2, 0));
    let lines = manifest(&sb.path("out-csv"));
    assert_eq!(lines[0]["line"], 2, "CSV lines count the header");
    let mut opts = sb.options(&sb.write("b.jsonl", "{\"RegionId\":\"cn-hangzhou\",\"KeyPairName\":\"j1\",\"Tag.1.Key\":\"env\",\"Tag.1.Value\":\"\"}\n"), "out-jsonl");
    opts.state = sb.path("state2.redb");
    let s = run_batch(opts).await;
    assert_eq!(s.tally.created, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_bits_3072_and_4096_make_keys_of_that_size() {
    let sb = Sandbox::new();
    for bits in [
        keyfleet::keys::keygen::KeyBits::B3072,
        keyfleet::keys::keygen::KeyBits::B4096,
    ] {
        let input = sb.write(
            &format!("{bits}.csv"),
            &format!("RegionId,KeyPairName\ncn-hangzhou,k{bits}\n"),
        );
        let mut opts = sb.options(&input, &format!("out{bits}"));
        opts.defaults.key_bits = bits;
        let s = run_batch(opts).await;
        assert_eq!(s.tally.created, 1);
        let pub_file = sb.path(&format!("out{bits}/aliyun/acct/cn-hangzhou/k{bits}.pub"));
        let out = tool("ssh-keygen", &["-l", "-f", pub_file.to_str().unwrap()]);
        assert!(out.starts_with(&format!("{bits} ")), "{out}");
        let pem = sb.path(&format!("out{bits}/aliyun/acct/cn-hangzhou/k{bits}.pem"));
        tool(
            "openssl",
            &["pkey", "-check", "-noout", "-in", pem.to_str().unwrap()],
        );
    }
}

/// The README's first command, `keyfleet run examples/fleet.csv --out keys`: the example batch
/// is in the repository, and runs as the README says — its 29 rows over both clouds, most
/// created, a few answered with the APIs' errors, one key file per created pair.
#[test]
fn the_readme_example_batch_runs() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/fleet.csv");
    assert!(example.exists(), "{} is missing", example.display());
    let dir = tempfile::tempdir().unwrap();
    let out = crate::util::keyfleet(dir.path())
        .arg("run")
        .arg(&example)
        .args(["--out", "keys", "--progress", "off"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", crate::util::text(&out));
    let lines = manifest(&dir.path().join("keys"));
    assert_eq!(lines.len(), 29, "one line per row");
    let created = lines.iter().filter(|l| l["status"] == "created").count();
    assert!((20..29).contains(&created), "{created} created");
    for provider in ["aliyun", "ucloud"] {
        assert!(
            lines
                .iter()
                .any(|l| l["provider"] == provider && l["status"] == "created"),
            "{provider}"
        );
    }
}
