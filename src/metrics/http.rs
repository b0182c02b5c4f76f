//! The metrics endpoint: a deliberately small HTTP/1.1 responder on tokio for three fixed
//! routes (`/metrics`, `/healthz`, `/readyz`), so no HTTP framework joins the dependency tree.
//! One request per connection (`Connection: close`): Prometheus and kubelet probes open few
//! connections, and not keeping any alive means nothing to time out or leak between scrapes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{MetricsError, PrometheusHandle, Readiness};

/// Scrapers and probes need a handful; the cap keeps a misbehaving client from making the
/// worker hold thousands of sockets.
const MAX_CONNECTIONS: usize = 32;
/// Request lines and headers from Prometheus and kubelet are a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// A client that has not sent its request and read the answer by then is dropped, so slow
/// clients cannot use up the connection slots. Scrape timeouts are 10 s by default.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the client to close after the answer was sent.
const LINGER: Duration = Duration::from_secs(1);
/// Prometheus text exposition format 0.0.4.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// Serves GET /metrics (Prometheus text exposition), /healthz (200 "ok" while the process
/// runs), /readyz (200 when `readiness` is ready, 503 with the reasons otherwise) on `addr`
/// until `shutdown` is cancelled. Installs the recorder if that has not happened yet (its
/// upkeep thread then runs too). Binds, spawns the server task on the current tokio runtime
/// and returns the bound address (`addr` may use port 0).
pub async fn serve(
    addr: SocketAddr,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<SocketAddr, MetricsError> {
    let handle = super::install()?;
    let bind_error = |source| MetricsError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    tracing::info!(addr = %local, "serving /metrics, /healthz and /readyz");
    tokio::spawn(accept_loop(listener, handle, readiness, shutdown));
    Ok(local)
}

async fn accept_loop(
    listener: TcpListener,
    handle: PrometheusHandle,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // the semaphore is never closed
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            conn = listener.accept() => match conn {
                Ok(conn) => conn,
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (handle, readiness) = (handle.clone(), readiness.clone());
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(CONNECTION_TIMEOUT, answer(stream, &handle, &readiness))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "metrics endpoint: connection failed")
                }
                Err(_) => tracing::debug!(%peer, "metrics endpoint: client too slow, dropped"),
            }
        });
    }
    tracing::debug!("metrics endpoint stopped");
}

#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
    /// Methods to list in `Allow` (405 answers).
    allow: Option<&'static str>,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type: TEXT,
            body: body.into(),
            allow: None,
        }
    }
}

async fn answer(
    mut stream: TcpStream,
    handle: &PrometheusHandle,
    readiness: &Readiness,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let (response, is_head) = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(()); // closed before sending a whole request: nobody to answer
        }
        head.extend_from_slice(&chunk[..n]);
        // Read the whole head before answering: closing a socket with unread request bytes
        // makes the kernel send a reset, which can destroy the answer in flight.
        if let Some(end) = find_head_end(&head) {
            break match parse_request_line(&head[..end]) {
                Some((method, target)) => {
                    (route(method, target, readiness, handle), method == "HEAD")
                }
                None => (Response::text(400, "bad request\n"), false),
            };
        }
        if head.len() >= MAX_REQUEST_HEAD {
            break (Response::text(431, "request header too large\n"), false);
        }
    };
    stream.write_all(&encode(&response, is_head)).await?;
    stream.shutdown().await?;
    // Lingering close: swallow whatever the client still sends (the rest of an oversized
    // head) until it closes too, so our close cannot turn into a reset that eats the answer.
    let _ = tokio::time::timeout(LINGER, async {
        let mut left = MAX_REQUEST_HEAD * 8;
        while left > 0 {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
    Ok(())
}

/// Where the request head ends (after the blank line), tolerating bare `\n` line ends.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `METHOD SP request-target SP HTTP/1.x` → (method, path without the query string).
fn parse_request_line(head: &[u8]) -> Option<(&str, &str)> {
    let line_end = head.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&head[..line_end])
        .ok()?
        .trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || method.is_empty() {
        return None;
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    Some((method, path))
}

fn route(method: &str, path: &str, readiness: &Readiness, handle: &PrometheusHandle) -> Response {
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return Response::text(404, "not found: try /metrics, /healthz or /readyz\n");
    }
    if method != "GET" && method != "HEAD" {
        return Response {
            allow: Some("GET, HEAD"),
            ..Response::text(405, "method not allowed\n")
        };
    }
    match path {
        "/metrics" => Response {
            content_type: METRICS_CONTENT_TYPE,
            ..Response::text(200, handle.render())
        },
        "/healthz" => Response::text(200, "ok\n"),
        _ => {
            let why = readiness.not_ready_because();
            if why.is_empty() {
                Response::text(200, "ready\n")
            } else {
                Response::text(503, format!("not ready: {}\n", why.join(", ")))
            }
        }
    }
}

fn encode(r: &Response, head_only: bool) -> Vec<u8> {
    let reason = match r.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    let allow = r
        .allow
        .map(|a| format!("Allow: {a}\r\n"))
        .unwrap_or_default();
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        r.status,
        r.content_type,
        r.body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(r.body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One raw request; returns (status, headers, body).
    async fn send(addr: SocketAddr, request: &str) -> (u16, String, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head[9..12].parse().unwrap();
        (status, head.to_owned(), body.to_owned())
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        send(addr, &format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n")).await
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let readiness = Readiness::new();
        let shutdown = CancellationToken::new();
        let addr = serve(
            "127.0.0.1:0".parse().unwrap(),
            readiness.clone(),
            shutdown.clone(),
        )
        .await
        .unwrap();
        assert_ne!(addr.port(), 0);
        super::super::keygen(2048, Duration::from_millis(30));

        let (status, head, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(head.contains(METRICS_CONTENT_TYPE), "{head}");
        assert!(body.contains("# TYPE keyfleet_build_info gauge"), "{body}");
        assert!(
            body.contains("# TYPE keyfleet_keygen_seconds histogram"),
            "{body}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );

        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(get(addr, "/healthz?verbose=1").await.2, "ok\n");

        let (status, _, body) = get(addr, "/readyz").await;
        assert_eq!(status, 503);
        assert_eq!(
            body,
            "not ready: RabbitMQ not connected, Redis not connected\n"
        );
        readiness.set_amqp(true);
        readiness.set_redis(true);
        let (status, _, body) = get(addr, "/readyz").await;
        assert_eq!((status, body.as_str()), (200, "ready\n"));

        assert_eq!(get(addr, "/").await.0, 404);
        assert_eq!(get(addr, "/metrics/extra").await.0, 404);
        let (status, head, _) =
            send(addr, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert_eq!(status, 405);
        assert!(head.contains("Allow: GET, HEAD"), "{head}");
        let (status, head, body) = send(addr, "HEAD /healthz HTTP/1.1\r\n\r\n").await;
        assert_eq!((status, body.as_str()), (200, ""));
        assert!(head.contains("Content-Length: 3"), "{head}");
        assert_eq!(send(addr, "nonsense\r\n\r\n").await.0, 400);
        assert_eq!(send(addr, "GET /healthz HTTP/1.0\n\n").await.0, 200);
        let huge = format!(
            "GET /healthz HTTP/1.1\r\nX: {}\r\n",
            "a".repeat(MAX_REQUEST_HEAD)
        );
        assert_eq!(send(addr, &huge).await.0, 431);

        shutdown.cancel();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(addr).await.is_ok() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "still listening after shutdown"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request_line(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(parse_request_line(b"GET /metrics\r\n\r\n"), None);
        assert_eq!(parse_request_line(b"GET /metrics SPDY/3\r\n\r\n"), None);
        assert_eq!(
            find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"),
            Some(24)
        );
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }
}
