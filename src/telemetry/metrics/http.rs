//! `/metrics`, `/healthz` and `/readyz`: one axum router ([`routes`]) that the metrics
//! endpoint of `worker` and `run` serves alone ([`serve`]) and `keyfleet serve` beside its API
//! on its own listener. The endpoint adds its own manners: each answer closes its connection
//! (`Connection: close`), because scrapers and probes open few connections, and with none kept
//! alive nothing idles until the per-connection deadline cuts it mid-request; and unknown paths
//! get a hint. `keyfleet serve` keeps connections alive for the SDKs and leaves both out.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use super::{MetricsError, PrometheusHandle, Readiness};

/// Scrapers and probes need a handful; the cap keeps a misbehaving client from making the
/// worker hold thousands of sockets.
const MAX_CONNECTIONS: usize = 32;
/// hyper has no timeouts of its own unless given a timer, which `axum::serve` does not do, so a
/// client that has not sent its request and read the answer by then is dropped here: otherwise
/// slow clients could hold every slot. Scrape timeouts are 10 s by default.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Prometheus text exposition format 0.0.4.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves [`routes`] on `addr` until `shutdown` is cancelled. Installs the recorder if that
/// has not happened yet (its upkeep thread then runs too). Binds, spawns the server task on
/// the current tokio runtime and returns the bound address (`addr` may use port 0).
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
    let listener = CappedListener::new(listener, MAX_CONNECTIONS, CONNECTION_TIMEOUT);
    let server = axum::serve(listener, router(handle, readiness))
        .with_graceful_shutdown(shutdown.cancelled_owned());
    tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::warn!(error = %e, "metrics endpoint failed");
        }
        tracing::debug!("metrics endpoint stopped");
    });
    Ok(local)
}

/// GET /metrics (Prometheus text exposition), /healthz (200 "ok" while the process runs),
/// /readyz (200 when `readiness` is ready, 503 with the reasons otherwise).
pub fn routes(handle: PrometheusHandle, readiness: Readiness) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let body = handle.render();
                async move { ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], body) }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let why = readiness.not_ready_because();
                async move {
                    if why.is_empty() {
                        (StatusCode::OK, "ready\n".to_owned())
                    } else {
                        let body = format!("not ready: {}\n", why.join(", "));
                        (StatusCode::SERVICE_UNAVAILABLE, body)
                    }
                }
            }),
        )
}

/// [`routes`] as the metrics endpoint answers them.
fn router(handle: PrometheusHandle, readiness: Readiness) -> Router {
    routes(handle, readiness)
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /healthz or /readyz\n",
            )
        })
        .layer(axum::middleware::map_response(close_and_no_store))
}

/// A cached scrape or probe answer would be stale by definition.
async fn close_and_no_store(mut response: Response) -> impl IntoResponse {
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A TCP listener that holds at most `max` connections at a time (accepting waits for a slot)
/// and gives each a fixed lifetime, since `axum::serve` offers neither.
struct CappedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    lifetime: Duration,
}

impl CappedListener {
    fn new(inner: TcpListener, max: usize, lifetime: Duration) -> Self {
        CappedListener {
            inner,
            slots: Arc::new(Semaphore::new(max)),
            lifetime,
        }
    }
}

impl axum::serve::Listener for CappedListener {
    type Io = CappedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (CappedStream, SocketAddr) {
        let slot =
            (self.slots.clone().acquire_owned().await).expect("the semaphore is never closed");
        // axum's TcpListener impl logs accept errors and backs off.
        let (stream, peer) = axum::serve::Listener::accept(&mut self.inner).await;
        let deadline = Box::pin(tokio::time::sleep(self.lifetime));
        (
            CappedStream {
                stream,
                deadline,
                _slot: slot,
            },
            peer,
        )
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// Fails every read and write once the deadline has passed, which makes hyper drop the
/// connection and so free its slot. Polling the deadline in each read and write also wakes a
/// connection stuck waiting on its client when the time is up.
struct CappedStream {
    stream: TcpStream,
    deadline: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl CappedStream {
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.deadline.as_mut().poll(cx).is_ready().then(|| {
            tracing::debug!("metrics endpoint: client too slow, dropped");
            io::Error::new(io::ErrorKind::TimedOut, "connection lifetime exceeded")
        })
    }
}

impl AsyncRead for CappedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CappedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Closing is never refused: it is what the deadline is for.
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One raw request; returns (status, head with lower-case header names, body).
    async fn send(addr: SocketAddr, request: &str) -> (u16, String, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head[9..12].parse().unwrap();
        (status, head.to_ascii_lowercase(), body.to_owned())
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
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        assert!(head.contains("connection: close"), "{head}");
        assert!(head.contains("cache-control: no-store"), "{head}");

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
        assert!(head.contains("allow: get,head"), "{head}");
        let (status, head, body) = send(addr, "HEAD /healthz HTTP/1.1\r\n\r\n").await;
        assert_eq!((status, body.as_str()), (200, ""));
        assert!(head.contains("content-length: 3"), "{head}");
        assert_eq!(send(addr, "nonsense\r\n\r\n").await.0, 400);
        assert_eq!(send(addr, "GET /healthz HTTP/1.0\n\n").await.0, 200);

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

    #[tokio::test]
    async fn slow_clients_are_dropped_and_free_their_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = CappedListener::new(listener, 1, Duration::from_millis(300));
        let router = router(super::super::install().unwrap(), Readiness::new());
        tokio::spawn(async move { axum::serve(listener, router).await });

        // Holds the only slot with a request head that never ends.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest));
        assert!(read.await.is_ok(), "slow client still connected");

        let answer = tokio::time::timeout(Duration::from_secs(5), get(addr, "/healthz"));
        assert_eq!(answer.await.unwrap().2, "ok\n");
    }
}
