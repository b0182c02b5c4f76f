//! `keyfleet serve` against hostile connections (issue 17): idle and half-sent connections
//! are closed on their timeouts, the connection cap refuses fast, a stop is not held by idle
//! connections, oversized requests are answered in the API's own error shape, and an empty
//! `SignatureNonce` is refused like a missing one. Real servers on loopback, raw sockets.

use std::time::{Duration, Instant};

use crate::util::cloud::rpc;
use crate::util::serve::{http, v3, Server};
use crate::util::within;
use keyfleet::upstream::client::CallOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(120);

/// Reads until the server closes the connection; how long that took, or `None` if it was
/// still open after `limit`. Bytes the server sends are collected into `got`.
async fn closed_within(
    stream: &mut TcpStream,
    limit: Duration,
    got: &mut Vec<u8>,
) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.checked_sub(start.elapsed())?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

async fn open(addr: &str, n: usize) -> Vec<TcpStream> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(TcpStream::connect(addr).await.expect("connect"));
    }
    v
}

/// One complete request on a kept-alive connection; returns once its answer has arrived.
async fn one_request(stream: &mut TcpStream) {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"ok\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("answer in time")
            .unwrap();
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
    }
}

fn shed(metrics: &str, reason: &str) -> u64 {
    let prefix = format!("keyfleet_serve_connections_shed_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_sheds_idle_connections() {
    within(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(
            dir.path(),
            &["--header-read-timeout", "1s", "--keep-alive-timeout", "3s"],
        );
        // Connections that never send a byte: closed on the header timeout.
        let mut silent = open(&server.addr, 30).await;
        let mut kept = open(&server.addr, 5).await;
        for k in &mut kept {
            one_request(k).await;
        }
        let idle_since = Instant::now();
        let mut waits = Vec::new();
        for s in &mut silent {
            let mut got = Vec::new();
            let t = closed_within(s, Duration::from_secs(5), &mut got).await;
            assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
            waits.push(t.expect("a silent connection still open after 5 s"));
        }
        let longest = waits.iter().max().unwrap();
        assert!(*longest < Duration::from_secs(3), "{waits:?}");
        // Kept-alive connections after an answer: the idle timeout (3 s), not the header
        // timeout (1 s).
        for k in &mut kept {
            let mut got = Vec::new();
            let t = closed_within(k, Duration::from_secs(8), &mut got).await;
            assert!(
                t.is_some(),
                "an idle kept-alive connection still open after 8 s"
            );
        }
        let idle = idle_since.elapsed();
        assert!(
            idle >= Duration::from_millis(2500) && idle < Duration::from_secs(6),
            "idle connections closed after {idle:?}"
        );
        let m = server.metrics().await;
        assert!(shed(&m, "header_timeout") >= 30, "{m}");
        assert!(shed(&m, "idle_timeout") >= 5, "{m}");
        let (status, log) = server.stop();
        assert!(status.success() && !log.contains("panicked"), "{log}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_refuses_half_sent_headers_after_timeout() {
    within(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(
            dir.path(),
            &["--header-read-timeout", "1s", "--keep-alive-timeout", "60s"],
        );
        let mut half = open(&server.addr, 30).await;
        for (i, s) in half.iter_mut().enumerate() {
            let partial = format!("GET /?Action=DescribeKeyPairs&n={i} HTTP/1.1\r\nhost: x\r\nx-a");
            s.write_all(partial.as_bytes()).await.unwrap();
        }
        // A kept-alive connection whose second request stops half-way: the header timeout
        // applies from its first byte, not the 60 s idle timeout.
        let mut second = TcpStream::connect(&server.addr).await.unwrap();
        one_request(&mut second).await;
        second
            .write_all(b"GET /healthz HTTP/1.1\r\nho")
            .await
            .unwrap();
        // A slow-loris: a byte every 300 ms never gets past the header timeout either.
        let mut drip = TcpStream::connect(&server.addr).await.unwrap();
        let dripping = tokio::spawn(async move {
            let started = Instant::now();
            for b in b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
                if drip.write_all(&[*b]).await.is_err() {
                    return Some(started.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            None
        });
        for s in half.iter_mut().chain(std::iter::once(&mut second)) {
            let mut got = Vec::new();
            let t = closed_within(s, Duration::from_secs(5), &mut got).await;
            let t = t.expect("a half-sent request still open after 5 s");
            assert!(t < Duration::from_secs(3), "{t:?}");
        }
        let cut = dripping
            .await
            .unwrap()
            .expect("the slow-loris was never cut");
        assert!(cut < Duration::from_secs(4), "{cut:?}");
        let m = server.metrics().await;
        assert!(shed(&m, "header_timeout") >= 32, "{m}");
        // Still serving.
        let r = server
            .client()
            .call(&rpc(), "DescribeKeyPairs", &[("RegionId", "cn-hangzhou")])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        server.stop();
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_caps_connections() {
    within(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(
            dir.path(),
            &["--max-connections", "50", "--header-read-timeout", "60s"],
        );
        let held = open(&server.addr, 50).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Beyond the cap: answered 503 in the Alibaba envelope and closed, at once.
        for _ in 0..5 {
            let mut extra = TcpStream::connect(&server.addr).await.unwrap();
            let mut got = Vec::new();
            let t = closed_within(&mut extra, Duration::from_secs(2), &mut got)
                .await
                .expect("a connection over the cap still open after 2 s");
            assert!(t < Duration::from_secs(1), "{t:?}");
            let text = String::from_utf8_lossy(&got);
            assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
            let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
            let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            assert_eq!(json["Code"], "ServiceUnavailable", "{text}");
        }
        // A signed request over the cap is refused the same way.
        let r = server
            .client()
            .call(&rpc(), "DescribeKeyPairs", &[("RegionId", "cn-hangzhou")])
            .await;
        if let Ok(r) = r {
            assert_eq!(r.status, 503, "{}", r.body);
        }
        // Room again once the held connections go.
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(5);
        let ok = loop {
            let r = server
                .client()
                .call(&rpc(), "DescribeKeyPairs", &[("RegionId", "cn-hangzhou")])
                .await;
            match r {
                Ok(r) if r.status == 200 => break true,
                _ if Instant::now() > deadline => break false,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        assert!(ok, "no room after the held connections closed");
        let m = server.metrics().await;
        assert!(shed(&m, "over_cap") >= 5, "{m}");
        let (status, log) = server.stop();
        assert!(status.success(), "{log}");
        assert!(log.contains("connections refused"), "{log}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_stops_within_5s_with_idle_connections() {
    within(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        // Defaults: 10 s header timeout, 60 s idle timeout, 30 s drain.
        let server = Server::start(dir.path(), &[]);
        let _silent = open(&server.addr, 100).await;
        let mut half = open(&server.addr, 20).await;
        for s in &mut half {
            s.write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-le")
                .await
                .unwrap();
        }
        let mut kept = open(&server.addr, 10).await;
        for k in &mut kept {
            one_request(k).await;
        }
        // And one whose second request is half-sent.
        kept[0]
            .write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        let (status, log) = tokio::task::spawn_blocking(move || server.stop())
            .await
            .unwrap();
        let took = started.elapsed();
        assert!(status.success(), "{log}");
        assert!(
            took < Duration::from_secs(5),
            "stopped after {took:?}\n{log}"
        );
        assert!(!log.contains("still in flight"), "{log}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_body_answered_in_api_error_shape() {
    within(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(dir.path(), &[]);
        let base = format!("http://{}/", server.addr);
        let http = http();
        let key = "a".repeat(300 * 1024);

        // Alibaba RPC, a form body too large: JSON when it asks for JSON…
        let r = http
            .post(&base)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "Action=ImportKeyPair&Format=JSON&AccessKeyId=testid&PublicKeyBody={key}"
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400);
        let body: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap_or_default();
        assert_eq!(body["Code"], "InvalidParameter", "{body}");
        assert!(body["RequestId"].is_string(), "{body}");
        // …and XML, the RPC default, when it does not.
        let r = http
            .post(&base)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("Action=ImportKeyPair&PublicKeyBody={key}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400);
        let text = r.text().await.unwrap();
        assert!(
            text.contains("<Error>") && text.contains("<Code>InvalidParameter</Code>"),
            "{text:.300}"
        );
        // UCloud, a JSON body too large: HTTP 200 with a RetCode, as UCloud answers.
        let r = http
            .post(&base)
            .header("content-type", "application/json")
            .body(format!(
                r#"{{"Action":"ImportUHostKeyPairs","PublicKey":"ucloudpub","PublicKeyBody":"{key}"}}"#
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let body: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap_or_default();
        assert_eq!(body["RetCode"], 230, "{body}");
        // UCloud as its Python SDK sends it: a form body whose `Action` and `PublicKey` come
        // after the key, beyond what is read of a body too large.
        let r = http
            .post(&base)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "Region=cn-bj2&ProjectId=org-1&KeyPairName=k&PublicKeyBody={key}&Action=ImportUHostKeyPairs&PublicKey=ucloudpub"
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let body: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap_or_default();
        assert_eq!(body["RetCode"], 230, "{body}");

        // The issue's case: a 700 KB ImportKeyPair in the query string (as the Tea SDKs send
        // RPC parameters) got hyper's 431 with an empty body.
        // (Raw: the http crate takes no URI above 64 KiB.)
        let big = "a".repeat(700 * 1024);
        let (status, body) = raw_exchange(
            &server.addr,
            &format!("GET /?Action=ImportKeyPair&Format=JSON&KeyPairName=k&PublicKeyBody={big} HTTP/1.1\r\nhost: x\r\n\r\n"),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["Code"], "InvalidParameter", "{body}");
        assert!(
            body["Message"].as_str().unwrap_or("").contains("exceed"),
            "{body}"
        );
        // A UCloud request line too large: a RetCode.
        let (status, body) = raw_exchange(
            &server.addr,
            &format!("GET /?Action=ImportUHostKeyPairs&PublicKey=ucloudpub&PublicKeyBody={big} HTTP/1.1\r\nhost: x\r\n\r\n"),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["RetCode"], 230, "{body}");
        // Headers too large (not the request line): the same.
        let (status, body) = raw_exchange(
            &server.addr,
            &format!("GET /?Action=DescribeKeyPairs&Format=JSON HTTP/1.1\r\nhost: x\r\nx-pad: {}\r\n\r\n", &big[..100 * 1024]),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["Code"], "InvalidParameter", "{body}");
        // A body that stops half-way is answered on the header timeout, not held.
        let mut slow = TcpStream::connect(&server.addr).await.unwrap();
        slow.write_all(
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: 1000\r\n\r\nAction=Desc",
        )
        .await
        .unwrap();
        let mut got = Vec::new();
        let t = closed_within(&mut slow, Duration::from_secs(15), &mut got)
            .await
            .expect("a half-sent body still held after 15 s");
        assert!(t < Duration::from_secs(12), "{t:?}");
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains("InvalidParameter"), "{text}");

        // Still serving.
        let r = server
            .client()
            .call(&rpc(), "DescribeKeyPairs", &[("RegionId", "cn-hangzhou")])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let (status, log) = server.stop();
        assert!(status.success() && !log.contains("panicked"), "{log}");
    })
    .await
}

/// Sends `request` on a fresh connection and reads the answer to the end: its status and
/// JSON body (`Null` if the body is not JSON).
async fn raw_exchange(addr: &str, request: &str) -> (u16, serde_json::Value) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    closed_within(&mut s, Duration::from_secs(10), &mut got)
        .await
        .expect("the answer to end within 10 s");
    let text = String::from_utf8_lossy(&got);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or_default())
}

/// An RPC request signed by hand, with `SignatureNonce` as given (`None`: left out).
fn rpc_request(nonce: Option<&str>, get: bool) -> (String, Vec<(String, String)>) {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let mut params: Vec<(String, String)> = [
        ("Action", "DescribeKeyPairs"),
        ("RegionId", "cn-hangzhou"),
        ("Version", "2014-05-26"),
        ("AccessKeyId", "testid"),
        ("SignatureMethod", "HMAC-SHA1"),
        ("SignatureVersion", "1.0"),
        ("Format", "JSON"),
        ("Timestamp", now.as_str()),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if let Some(n) = nonce {
        params.push(("SignatureNonce".into(), n.into()));
    }
    let method = if get { "GET" } else { "POST" };
    let sts = keyfleet::sign::rpc::string_to_sign(method, &params);
    params.push((
        "Signature".into(),
        keyfleet::sign::rpc::signature("testsecret", &sts),
    ));
    (method.to_owned(), params)
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_signature_nonce_refused() {
    within(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(dir.path(), &[]);
        let base = format!("http://{}/", server.addr);
        let http = http();
        let send = |nonce: Option<&'static str>, get: bool| {
            let (http, base) = (http.clone(), base.clone());
            async move {
                let (_, params) = rpc_request(nonce, get);
                let mut enc = form_urlencoded::Serializer::new(String::new());
                for (k, v) in &params {
                    enc.append_pair(k, v);
                }
                let enc = enc.finish();
                let r = if get {
                    http.get(format!("{base}?{enc}")).send().await.unwrap()
                } else {
                    http.post(&base)
                        .header("content-type", "application/x-www-form-urlencoded")
                        .body(enc)
                        .send()
                        .await
                        .unwrap()
                };
                let status = r.status().as_u16();
                let body: serde_json::Value =
                    serde_json::from_str(&r.text().await.unwrap()).unwrap_or_default();
                (status, body["Code"].as_str().unwrap_or("").to_owned())
            }
        };
        // A correctly signed request with a fresh nonce passes (so the refusals below are
        // about the nonce, not the signing).
        assert_eq!(send(Some("fresh-nonce-1"), false).await.0, 200);
        let missing = send(None, false).await;
        assert_eq!(missing, (400, "IncompleteSignature".to_owned()));
        // Empty (and blank) nonces, POST form and GET query, twice each: refused every time
        // exactly as a missing one, never taken as a nonce of its own.
        for nonce in ["", " ", "\t"] {
            for get in [false, true] {
                for _ in 0..2 {
                    let r = send(Some(nonce), get).await;
                    assert_eq!(r, missing, "nonce {nonce:?}, get {get}");
                }
            }
        }
        // V3: an empty x-acs-signature-nonce header.
        let c = server.client();
        for _ in 0..2 {
            let r = c
                .call_with(
                    &v3(),
                    "DescribeKeyPairs",
                    &[("RegionId", "cn-hangzhou")],
                    &CallOptions {
                        nonce: Some(String::new()),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            assert_eq!(
                (r.status, r.json()["Code"].as_str().unwrap_or("").to_owned()),
                (400, "IncompleteSignature".to_owned()),
                "{}",
                r.body
            );
        }
        // The RPC client with an empty nonce, GET and POST.
        for get in [false, true] {
            let r = c
                .call_with(
                    &rpc(),
                    "DescribeKeyPairs",
                    &[("RegionId", "cn-hangzhou")],
                    &CallOptions {
                        nonce: Some(String::new()),
                        get,
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            assert_eq!(r.status, 400, "{}", r.body);
            assert_eq!(r.json()["Code"], "IncompleteSignature", "{}", r.body);
        }
        let m = server.metrics().await;
        assert!(
            m.contains(r#"keyfleet_signature_failures_total{provider="aliyun",reason="missing"}"#),
            "{m}"
        );
        server.stop();
    })
    .await
}
