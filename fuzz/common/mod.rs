//! The checks the fuzz targets run, shared with `tests/engine/fuzz_corpus.rs` (which replays the
//! committed corpora on stable): one function per target, each taking the raw fuzz input and
//! panicking only on a fault.
//!
//! Input formats (text, so seeds can be written by hand):
//! - `batch_row`: first byte odd → JSON Lines, even → CSV; the rest is the batch file.
//! - `job_message`: the bytes are a job message.
//! - `dialect_decode`: lines; the first is the owner, each other `Name=Value` (no `=`: a name
//!   with an empty value).
//! - `serve_request`: first byte's value mod 8 picks the mode. 0/4: a raw request —
//!   `METHOD query` line, `Name: value` header lines, a blank line, the body. 1: Alibaba RPC
//!   form POST, 5: RPC GET, 2/6: Alibaba V3, 3: UCloud form, 7: UCloud JSON body, each
//!   correctly signed over the rest: first line the action, other lines `Name=Value` params.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use bytes::Bytes;
use keyfleet::credentials::{AccessKey, Credentials, Secret};
use keyfleet::dialect::action::ActionKind;
use keyfleet::dialect::{self, public_key, ApiError, Catalog, GatewayError, Provider};
use keyfleet::job::batch::{BatchInput, Format, Row, RowDefaults};
use keyfleet::job::{Job, JobResult};
use keyfleet::keys::keygen::KeyBits;
use keyfleet::modes::serve::gateway::Gateway;
use keyfleet::modes::serve::request::ApiRequest;
use keyfleet::registry::embedded::EmbeddedRegistry;
use keyfleet::sign;

pub const TARGETS: &[&str] = &[
    "batch_row",
    "job_message",
    "dialect_decode",
    "serve_request",
];

/// Runs `target`'s check on `data` (for the corpus replay).
pub fn check(target: &str, data: &[u8]) {
    match target {
        "batch_row" => batch_row(data),
        "job_message" => job_message(data),
        "dialect_decode" => dialect_decode(data),
        "serve_request" => serve_request(data),
        other => panic!("no fuzz target {other}"),
    }
}

fn catalog() -> &'static Catalog {
    static CATALOG: OnceLock<Catalog> = OnceLock::new();
    CATALOG.get_or_init(Catalog::default)
}

/// Renders an error both ways the API answers it (code table and body).
fn answer_error(provider: Provider, e: &ApiError) {
    let reply = e.reply(provider);
    assert!(!reply.code.is_empty(), "{e:?} has no code for {provider}");
    let _ = dialect::error_body(provider, e, uuid::Uuid::nil());
    let _ = e.to_string();
}

/// What the CLI does with a row: a job is decoded and validated (a failure is its result), a
/// bad row becomes a rejected-row result.
fn settle_row(row: Row) -> JobResult {
    match row {
        Row::Bad(bad) => bad.into_result(),
        Row::Job(job) => {
            // A batch job travels as a job message: it must read back as itself.
            let wire = serde_json::to_vec(&job).expect("a job serializes");
            let back = Job::decode(&wire).expect("a batch job decodes as a job message");
            assert_eq!(back, job);
            match dialect::decode(job.provider, &job.owner, &job.params, catalog()) {
                Ok(req) => {
                    assert_eq!(req.provider(), job.provider);
                    JobResult::failed(&job, &ApiError::QuotaExceeded, String::new(), 1)
                }
                Err(e) => {
                    answer_error(job.provider, &e);
                    JobResult::failed(&job, &e, String::new(), 1)
                }
            }
        }
    }
}

fn batch_path() -> &'static PathBuf {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("batch");
        (dir, path)
    })
    .1
}

pub fn batch_row(data: &[u8]) {
    let Some((&first, text)) = data.split_first() else {
        return;
    };
    let format = if first & 1 == 1 {
        Format::Jsonl
    } else {
        Format::Csv
    };
    let path = batch_path();
    std::fs::write(path, text).expect("write the batch file");
    let defaults = RowDefaults {
        batch_id: "fuzz".into(),
        provider: if first & 2 == 0 {
            Provider::Aliyun
        } else {
            Provider::Ucloud
        },
        owner: "acct".into(),
        key_bits: KeyBits::default(),
    };
    let Ok(input) = BatchInput::open(path, Some(format)) else {
        return;
    };
    let (mut emitted, mut last_line) = (0u64, 0u64);
    let read = input.read_rows(&defaults, |row| {
        emitted += 1;
        let result = settle_row(row);
        let line = result.line.expect("every row result names its line");
        assert!(line > last_line, "line {line} after line {last_line}");
        last_line = line;
        assert!(!result.is_created());
        true
    });
    let rows = read.expect("a readable file reads to its end");
    assert_eq!(rows, emitted);
}

pub fn job_message(data: &[u8]) {
    let Ok(job) = Job::decode(data) else {
        return;
    };
    let wire = serde_json::to_vec(&job).expect("a job serializes");
    assert_eq!(Job::decode(&wire).expect("a decoded job re-decodes"), job);
    match dialect::decode(job.provider, &job.owner, &job.params, catalog()) {
        Ok(req) => assert_eq!(req.provider(), job.provider),
        Err(e) => {
            answer_error(job.provider, &e);
            let _ = JobResult::failed(&job, &e, String::new(), 1);
        }
    }
}

/// `Name=Value` lines (the first line is the owner).
fn params_of(text: &str) -> (String, Vec<(String, String)>) {
    let mut lines = text.split('\n');
    let owner = lines.next().unwrap_or("").to_owned();
    let params = lines
        .map(|l| match l.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (l.to_owned(), String::new()),
        })
        .collect();
    (owner, params)
}

/// Every decoder a request's parameters can reach, for `provider`.
fn decode_all(provider: Provider, owner: &str, params: &BTreeMap<String, String>) {
    let c = catalog();
    match dialect::decode(provider, owner, params, c) {
        Ok(req) => {
            assert_eq!(req.provider(), provider);
            let created = dialect::Created {
                request_id: uuid::Uuid::nil(),
                key_pair_id: "uhostkp-abcd1234",
                create_time: 0,
                fingerprint: "00:11",
                private_key_body: "",
            };
            let _ = dialect::success_body(&req, &created);
        }
        Err(e) => answer_error(provider, &e),
    }
    if let Err(e) = dialect::decode_import(provider, owner, params, c) {
        answer_error(provider, &e);
    }
    if let Err(e) = dialect::decode_describe(provider, owner, params, c) {
        answer_error(provider, &e);
    }
    if let Err(e) = dialect::decode_delete(provider, owner, params, c) {
        answer_error(provider, &e);
    }
}

pub fn dialect_decode(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (owner, pairs) = params_of(&text);
    let params: BTreeMap<String, String> = pairs.into_iter().collect();
    for provider in Provider::ALL {
        decode_all(provider, &owner, &params);
    }
    if let Some(body) = params.get("PublicKeyBody") {
        if let Ok(key) = public_key::parse(body) {
            assert!(key.fingerprint_sha256.starts_with("SHA256:"));
        }
    }
    let _ = public_key::parse(&text);
}

struct Server {
    _dir: tempfile::TempDir,
    registry: EmbeddedRegistry,
    runtime: tokio::runtime::Runtime,
    gateway: Gateway,
}

pub const ALIYUN_ID: &str = "testid";
pub const ALIYUN_SECRET: &str = "testsecret";
pub const UCLOUD_PUBLIC: &str = "ucloudpub";
pub const UCLOUD_PRIVATE: &str = "ucloudpriv";

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temp dir");
        let registry = EmbeddedRegistry::open(&dir.path().join("state.redb")).expect("registry");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let credentials = Credentials::from_keys(vec![
            AccessKey {
                provider: Provider::Aliyun,
                id: ALIYUN_ID.into(),
                secret: Secret::new(ALIYUN_SECRET.into()),
                account: "acct".into(),
            },
            AccessKey {
                provider: Provider::Ucloud,
                id: UCLOUD_PUBLIC.into(),
                secret: Secret::new(UCLOUD_PRIVATE.into()),
                account: "org-fuzz".into(),
            },
        ]);
        Server {
            _dir: dir,
            registry,
            runtime,
            gateway: Gateway::new(credentials, 0, 0.0),
        }
    })
}

fn encode(params: &[(String, String)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        s.append_pair(k, v);
    }
    s.finish()
}

fn header_map(headers: &[(String, String)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v.as_bytes()),
        ) {
            map.append(k, v);
        }
    }
    map
}

/// A raw request: `METHOD query`, header lines, a blank line, the body.
fn raw_request(data: &[u8]) -> Option<ApiRequest> {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split('\n');
    let first = lines.next().unwrap_or("");
    let (method, query) = first.split_once(' ').unwrap_or((first, ""));
    let method = Method::from_bytes(method.as_bytes()).unwrap_or(Method::POST);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let query = (!query.is_empty()).then_some(query);
    ApiRequest::parse(
        method,
        query,
        header_map(&headers),
        Bytes::copy_from_slice(body),
    )
    .ok()
}

/// Parameters the signer sets itself: a fuzzer's copy would be a second value.
const SIGNER_OWNS: &[&str] = &[
    "AccessKeyId",
    "Action",
    "Format",
    "PublicKey",
    "Signature",
    "SignatureMethod",
    "SignatureNonce",
    "SignatureType",
    "SignatureVersion",
    "Timestamp",
    "Version",
];

/// A correctly signed request for the action and parameters in `text`.
fn signed_request(mode: u8, text: &str) -> Option<ApiRequest> {
    static NONCE: AtomicU64 = AtomicU64::new(0);
    let nonce = format!(
        "fuzz-{}-{}",
        std::process::id(),
        NONCE.fetch_add(1, Ordering::Relaxed)
    );
    let (action, pairs) = params_of(text);
    let mut params: Vec<(String, String)> = pairs
        .into_iter()
        .filter(|(k, _)| !SIGNER_OWNS.contains(&k.as_str()))
        .collect();
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let own = |kv: &[(&str, &str)]| -> Vec<(String, String)> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let form_type = "application/x-www-form-urlencoded".to_string();
    match mode {
        1 | 5 => {
            params.extend(own(&[
                ("Action", &action),
                ("Version", "2014-05-26"),
                ("AccessKeyId", ALIYUN_ID),
                ("SignatureMethod", "HMAC-SHA1"),
                ("SignatureVersion", "1.0"),
                ("SignatureNonce", &nonce),
                ("Format", "JSON"),
                ("Timestamp", &now),
            ]));
            let get = mode == 5;
            let sts = sign::rpc::string_to_sign(if get { "GET" } else { "POST" }, &params);
            params.push((
                "Signature".into(),
                sign::rpc::signature(ALIYUN_SECRET, &sts),
            ));
            if get {
                ApiRequest::parse(
                    Method::GET,
                    Some(&encode(&params)),
                    HeaderMap::new(),
                    Bytes::new(),
                )
                .ok()
            } else {
                ApiRequest::parse(
                    Method::POST,
                    None,
                    header_map(&[("content-type".into(), form_type)]),
                    Bytes::from(encode(&params)),
                )
                .ok()
            }
        }
        2 | 6 => {
            let content = sign::acs3::content_sha256(b"");
            let mut headers = own(&[
                ("host", "localhost"),
                ("x-acs-action", &action),
                ("x-acs-content-sha256", &content),
                ("x-acs-date", &now),
                ("x-acs-signature-nonce", &nonce),
                ("x-acs-version", "2014-05-26"),
            ]);
            let signed: Vec<String> = headers.iter().map(|(k, _)| k.clone()).collect();
            let map = header_map(&headers);
            if map.len() != headers.len() || map.values().any(|v| v.to_str().is_err()) {
                // An action that is no visible-ASCII header value cannot be sent (a server
                // reads header values as visible ASCII only).
                return None;
            }
            let canonical =
                sign::acs3::canonical_request("POST", &params, &headers, &signed, &content).ok()?;
            let sts = sign::acs3::string_to_sign(&canonical);
            let sig = sign::acs3::signature(ALIYUN_SECRET, &sts);
            headers.push((
                "authorization".into(),
                sign::acs3::authorization_header(ALIYUN_ID, &signed, &sig),
            ));
            ApiRequest::parse(
                Method::POST,
                Some(&encode(&params)),
                header_map(&headers),
                Bytes::new(),
            )
            .ok()
        }
        3 | 7 => {
            params.push(("Action".into(), action));
            params.push(("PublicKey".into(), UCLOUD_PUBLIC.into()));
            if mode == 7 {
                // A JSON object keeps one value per name.
                let mut seen = std::collections::HashSet::new();
                let mut kept: Vec<(String, String)> = params
                    .into_iter()
                    .rev()
                    .filter(|(k, _)| seen.insert(k.clone()))
                    .collect();
                kept.reverse();
                params = kept;
            }
            let sig = sign::ucloud::signature(&params, UCLOUD_PRIVATE);
            params.push(("Signature".into(), sig));
            if mode == 7 {
                let object: serde_json::Map<String, serde_json::Value> = params
                    .into_iter()
                    .map(|(k, v)| (k, serde_json::Value::String(v)))
                    .collect();
                ApiRequest::parse(
                    Method::POST,
                    None,
                    header_map(&[("content-type".into(), "application/json".into())]),
                    Bytes::from(serde_json::to_vec(&object).expect("JSON")),
                )
                .ok()
            } else {
                ApiRequest::parse(
                    Method::POST,
                    None,
                    header_map(&[("content-type".into(), form_type)]),
                    Bytes::from(encode(&params)),
                )
                .ok()
            }
        }
        _ => None,
    }
}

pub fn serve_request(data: &[u8]) {
    serve_outcome(data);
}

/// Whether the gateway admitted the request (`None`: no request could be made of `data`).
pub fn serve_outcome(data: &[u8]) -> Option<bool> {
    let (&first, rest) = data.split_first()?;
    let mode = first % 8;
    let (req, signed) = if mode % 4 == 0 {
        (raw_request(rest), false)
    } else {
        (signed_request(mode, &String::from_utf8_lossy(rest)), true)
    };
    let req = req?;
    let scheme = Gateway::scheme_of(&req);
    let s = server();
    let admitted = s.runtime.block_on(s.gateway.admit(&req, &s.registry));
    match admitted {
        Ok(caller) => {
            let provider = caller.scheme.provider();
            assert_eq!(caller.scheme, scheme);
            assert_eq!(caller.params.get("Action"), Some(&caller.action));
            assert_eq!(
                ActionKind::parse(provider, &caller.action),
                Some(caller.kind)
            );
            let owner = &caller.key.account;
            let c = catalog();
            let outcome = match caller.kind {
                ActionKind::Create => dialect::decode(provider, owner, &caller.params, c).map(drop),
                ActionKind::Import => {
                    dialect::decode_import(provider, owner, &caller.params, c).map(drop)
                }
                ActionKind::Describe => {
                    dialect::decode_describe(provider, owner, &caller.params, c).map(drop)
                }
                ActionKind::Delete => {
                    dialect::decode_delete(provider, owner, &caller.params, c).map(drop)
                }
            };
            if let Err(e) = outcome {
                answer_error(provider, &e);
            }
            Some(true)
        }
        Err(refusal) => {
            answer_error(refusal.provider, &refusal.error);
            // A request signed as the SDKs sign passes the signature checks (unless its action
            // is UCloud's, which makes an RPC request a UCloud one).
            let ucloud_action = req
                .param("Action")
                .is_some_and(|a| ActionKind::parse(Provider::Ucloud, a).is_some());
            if signed && !(mode % 4 == 1 && ucloud_action) {
                assert!(
                    !matches!(
                        refusal.error,
                        ApiError::Gateway(
                            GatewayError::IncompleteSignature
                                | GatewayError::AccessKeyNotFound
                                | GatewayError::SignatureMethodInvalid
                                | GatewayError::TimestampMalformed
                                | GatewayError::SignatureMismatch { .. }
                                | GatewayError::NonceUsed
                                | GatewayError::VersionInvalid
                        )
                    ),
                    "a correctly signed request was refused: {:?}",
                    refusal.error
                );
            }
            Some(false)
        }
    }
}
