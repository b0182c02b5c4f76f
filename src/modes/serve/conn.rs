//! The connections of `keyfleet serve`: its own accept loop on hyper, because `axum::serve`
//! has no header-read timeout, no idle timeout and no connection cap, so idle or half-sent
//! connections used to stay open for ever and a flood of them ran the process out of file
//! descriptors (issue 17, fault 3).
//!
//! - At most `max_connections` at once; one more is answered 503 `ServiceUnavailable` (the
//!   Alibaba JSON envelope: the request has not been read, so its dialect is unknown) and
//!   closed at once, without taking a task or a buffer.
//! - A request's line and headers must arrive within `header_read_timeout` (from the
//!   connection's start, or from the first byte of a later request on a kept-alive one).
//! - A kept-alive connection with no request for `idle_timeout` is closed.
//! - A request line and headers above [`MAX_HEAD`] are answered in the API's error shape
//!   (guessed from the bytes seen so far) rather than hyper's empty 431.
//! - On shutdown, connections with no request in flight close at once; those with one finish
//!   it (up to the drain deadline, which the caller enforces by cancelling `hard`).
//!
//! The timers watch the connection from outside hyper (bytes read, requests begun and
//! answered), so a request being answered is never cut: only a connection with nothing in
//! flight is closed.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use axum::http::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::gateway::Format;
use super::Answer;
use crate::dialect::{ApiError, GatewayError, Provider};

/// Largest request line plus headers taken. The longest legitimate one (an RPC ImportKeyPair
/// of an RSA-16384 key in the query, or a delete of 100 long names) is well under 64 KiB.
pub const MAX_HEAD: usize = 64 * 1024;
/// hyper's own read buffer: above [`MAX_HEAD`], so this module's check (answered in the API's
/// shape) always comes before hyper's (an empty 431).
const HYPER_BUF: usize = MAX_HEAD + 16 * 1024;
/// After answering a request that was too large, how much more of it is read and dropped so
/// the client, still sending, reads the answer instead of a reset.
const MAX_DRAIN: usize = 4 * 1024 * 1024;
/// File descriptors kept back from the connection cap's default for everything else
/// (registry, Redis, the key-generation pool, logs).
const RESERVED_FDS: u64 = 128;
/// After shutdown is asked for, a connection with nothing in flight gets this long to finish
/// writing an answer before it is closed.
const STOP_GRACE: Duration = Duration::from_secs(1);
/// At most one warning per this interval about connections refused over the cap.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What a connection may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Time for a request's line and headers to arrive (and, in the API handler, its body).
    pub header_read_timeout: Duration,
    /// A kept-alive connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// Connections open at once; beyond it a connection is refused at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: default_max_connections(),
        }
    }
}

/// 1024, or fewer when the open-file limit leaves less room (a flood must meet the cap, not
/// EMFILE, or even the signed requests behind it fail).
pub fn default_max_connections() -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    match limit {
        Some(n) => n.saturating_sub(RESERVED_FDS).clamp(16, 1024) as usize,
        None => 1024,
    }
}

/// Accepts until `stop` is cancelled, each connection a task on `conns`; connections stop
/// gracefully on `stop` and at once on `hard`.
pub(super) async fn accept(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stop: CancellationToken,
    hard: CancellationToken,
    conns: TaskTracker,
) {
    let room = Arc::new(Semaphore::new(limits.max_connections));
    let mut refused_since_warning: u64 = 0;
    let mut warned: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and the like: the cap should keep us from them; wait rather than spin.
                tracing::warn!(error = %e, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = room.clone().try_acquire_owned() else {
            crate::telemetry::metrics::serve_connection_shed("over_cap");
            refuse(&stream);
            refused_since_warning += 1;
            if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    refused = refused_since_warning,
                    "connections refused: {} open already (--max-connections)",
                    limits.max_connections
                );
                warned = Some(Instant::now());
                refused_since_warning = 0;
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let (stop, hard) = (stop.clone(), hard.clone());
        conns.spawn(async move {
            crate::telemetry::metrics::serve_connections_open(1);
            connection(stream, router, limits, stop, hard).await;
            crate::telemetry::metrics::serve_connections_open(-1);
            drop(permit);
        });
    }
}

/// Over the cap: 503 in the Alibaba JSON envelope and close, without waiting on the client.
/// Whatever the client has sent already is read first, so closing does not reset the
/// connection before the answer is read (a client still sending may see a reset anyway).
fn refuse(stream: &TcpStream) {
    let answer = Answer::error(
        Provider::Aliyun,
        None,
        &ApiError::Gateway(GatewayError::Unavailable),
    );
    let _ = stream.try_write(&answer.raw(Format::Json, &[("retry-after", "1")]));
    let mut scratch = [0u8; 4096];
    for _ in 0..16 {
        match stream.try_read(&mut scratch) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
}

async fn connection(
    stream: TcpStream,
    router: Router,
    limits: Limits,
    stop: CancellationToken,
    hard: CancellationToken,
) {
    let accepted = Instant::now();
    // Until its first byte a connection holds no hyper state (boxed below, several KiB
    // with its read buffer): a flood of silent connections costs a small task and a socket
    // each.
    tokio::select! {
        r = stream.readable() => if r.is_err() { return },
        _ = tokio::time::sleep(limits.header_read_timeout) => {
            crate::telemetry::metrics::serve_connection_shed("header_timeout");
            return;
        }
        _ = stop.cancelled() => return,
        _ = hard.cancelled() => return,
    }
    Box::pin(http(stream, accepted, router, limits, stop, hard)).await
}

/// The connection once it has sent something: hyper, watched by this module's timers.
async fn http(
    stream: TcpStream,
    accepted: Instant,
    router: Router,
    limits: Limits,
    stop: CancellationToken,
    hard: CancellationToken,
) {
    let activity = Arc::new(Activity::new(accepted));
    let io = TokioIo::new(Watched::new(stream, activity.clone()));
    let service = Counted {
        inner: TowerToHyperService::new(router),
        activity: activity.clone(),
    };
    let conn = http1::Builder::new()
        // The timers are this module's (see the module docs), not hyper's.
        .header_read_timeout(None)
        .keep_alive(true)
        .max_buf_size(HYPER_BUF)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let mut stopping: Option<Instant> = None;
    loop {
        let deadline = activity.deadline(&limits, stopping);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended");
                }
                return;
            }
            _ = hard.cancelled() => return,
            _ = stop.cancelled(), if stopping.is_none() => {
                stopping = Some(Instant::now());
                // No request ever begun: nothing can be lost (a half-sent first request
                // would otherwise hold the stop until its header timeout).
                if activity.served.load(Ordering::Acquire) == 0 {
                    return;
                }
                // Idle kept-alive connections close now; one with a request in flight
                // closes once it is answered.
                conn.as_mut().graceful_shutdown();
            }
            _ = activity.wake.notified() => {}
            _ = sleep_until(deadline), if deadline.is_some() => {
                if let Some(reason) = activity.expired(&limits, stopping) {
                    if reason != "shutdown" {
                        crate::telemetry::metrics::serve_connection_shed(reason);
                        tracing::debug!(reason, "closing a connection");
                    }
                    return;
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(at) = deadline {
        tokio::time::sleep_until(at.into()).await;
    }
}

/// What a connection is doing, as seen from outside hyper. Times are milliseconds since
/// the connection's start.
struct Activity {
    start: Instant,
    /// The first byte of the request being read arrived at this time + 1 (0: none yet).
    head_since: AtomicU64,
    /// When the last request was answered (the connection's start before any).
    idle_since: AtomicU64,
    /// Requests begun and not yet answered.
    in_flight: AtomicU32,
    /// Requests begun.
    served: AtomicU64,
    /// Tells the watchdog its deadline moved earlier.
    wake: Notify,
}

impl Activity {
    fn new(start: Instant) -> Activity {
        Activity {
            start,
            head_since: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            served: AtomicU64::new(0),
            wake: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    /// Bytes arrived while no request is in flight: the next request's head has begun.
    fn head_begins(&self) {
        let now = self.now() + 1;
        if self
            .head_since
            .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.wake.notify_one();
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.served.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(0, Ordering::Release);
        InFlight(self.clone())
    }

    /// When the connection is to be closed if nothing happens; `None` while a request is in
    /// flight.
    fn deadline(&self, limits: &Limits, stopping: Option<Instant>) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let head = self.head_since.load(Ordering::Acquire);
        let idle = self.idle_since.load(Ordering::Acquire);
        let first = self.served.load(Ordering::Acquire) == 0;
        let mut at = if head > 0 {
            self.at(head - 1) + limits.header_read_timeout
        } else if first {
            // A new connection must send its first request within the header timeout.
            self.at(0) + limits.header_read_timeout
        } else {
            self.at(idle) + limits.idle_timeout
        };
        if let Some(stop) = stopping {
            at = at.min(stop.max(self.at(idle)) + STOP_GRACE);
        }
        Some(at)
    }

    /// Why the connection is to be closed now, if it is.
    fn expired(&self, limits: &Limits, stopping: Option<Instant>) -> Option<&'static str> {
        let at = self.deadline(limits, stopping)?;
        if Instant::now() < at {
            return None;
        }
        let head = self.head_since.load(Ordering::Acquire) > 0;
        let first = self.served.load(Ordering::Acquire) == 0;
        let stop_first = stopping.is_some_and(|s| {
            let idle = self.at(self.idle_since.load(Ordering::Acquire));
            s.max(idle) + STOP_GRACE <= at
        });
        Some(if stop_first {
            "shutdown"
        } else if head || first {
            "header_timeout"
        } else {
            "idle_timeout"
        })
    }
}

/// A request begun and not yet answered.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since.store(a.now(), Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
        a.wake.notify_one();
    }
}

/// The router, counting requests in flight.
struct Counted {
    inner: TowerToHyperService<Router>,
    activity: Arc<Activity>,
}

type RouterResponse = axum::response::Response;

impl hyper::service::Service<Request<Incoming>> for Counted {
    type Response = RouterResponse;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<RouterResponse, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let guard = self.activity.begin();
        let answer = self.inner.call(req);
        Box::pin(async move {
            let r = answer.await;
            drop(guard);
            r
        })
    }
}

/// The socket, telling [`Activity`] when a request's head begins and refusing one that grows
/// beyond [`MAX_HEAD`] with an answer of its own.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
    head: HeadScan,
    refusal: Option<Refusal>,
}

impl Watched {
    fn new(inner: TcpStream, activity: Arc<Activity>) -> Watched {
        Watched {
            inner,
            activity,
            head: HeadScan::default(),
            refusal: None,
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(refusal) = &mut this.refusal {
            return refusal.poll(&mut this.inner, cx);
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let got = &buf.filled()[before..];
        if got.is_empty() || this.activity.in_flight.load(Ordering::Acquire) > 0 {
            return Poll::Ready(Ok(()));
        }
        this.activity.head_begins();
        let generation = this.activity.served.load(Ordering::Acquire);
        if let Some(shape) = this.head.feed(generation, got) {
            // hyper never sees these bytes: it would answer an empty 431.
            buf.set_filled(before);
            crate::telemetry::metrics::serve_connection_shed("head_too_large");
            let (provider, format) = shape;
            let answer = Answer::error(
                provider,
                None,
                &ApiError::InvalidParameter {
                    name: "request".into(),
                    reason: format!("the request line and headers exceed {MAX_HEAD} bytes"),
                },
            );
            crate::telemetry::metrics::api_request(
                provider.as_str(),
                "",
                &answer.code,
                Duration::ZERO,
            );
            tracing::debug!(provider = %provider, "request head too large: refused");
            let refusal = this.refusal.insert(Refusal {
                answer: answer.raw(format, &[]),
                written: 0,
                drained: None,
            });
            return refusal.poll(&mut this.inner, cx);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.refusal.is_some() {
            // hyper's own error answer, if any: the client has had ours.
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.refusal.is_some() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.refusal.is_some() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.refusal.is_some() {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Answering a request whose head was too large: write the answer, end our side, read and
/// drop what the client still sends (up to [`MAX_DRAIN`]), then end of input for hyper.
struct Refusal {
    answer: Vec<u8>,
    written: usize,
    /// Bytes dropped since the answer was written (`None` while writing it).
    drained: Option<usize>,
}

impl Refusal {
    fn poll(&mut self, io: &mut TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.drained.is_none() {
            if self.written < self.answer.len() {
                match ready!(Pin::new(&mut *io).poll_write(cx, &self.answer[self.written..])) {
                    Ok(0) | Err(_) => return Poll::Ready(Ok(())),
                    Ok(n) => self.written += n,
                }
            } else {
                let _ = ready!(Pin::new(&mut *io).poll_shutdown(cx));
                self.drained = Some(0);
            }
        }
        let mut scratch = [0u8; 8192];
        loop {
            let mut rb = ReadBuf::new(&mut scratch);
            match ready!(Pin::new(&mut *io).poll_read(cx, &mut rb)) {
                Ok(()) if !rb.filled().is_empty() => {
                    let drained = self.drained.unwrap_or(0) + rb.filled().len();
                    self.drained = Some(drained);
                    if drained > MAX_DRAIN {
                        return Poll::Ready(Ok(()));
                    }
                }
                _ => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// Markers of a request's dialect in its head, looked for as the head streams past (the
/// head itself is hyper's; only these flags are kept).
const UCLOUD_MARKERS: &[&[u8]] = &[b"UHostKeyPair", b"?PublicKey=", b"&PublicKey="];
const XML_MARKERS: &[&[u8]] = &[b"Format=XML", b"Format=xml"];
/// Longest marker, less one: how much of the previous read is kept to find a marker or the
/// end of the head split between two reads.
const CARRY: usize = 15;

/// Counts a request head's bytes up to its end (`\r\n\r\n`) and notes dialect markers.
#[derive(Default)]
struct HeadScan {
    generation: u64,
    bytes: usize,
    ended: bool,
    ucloud: bool,
    xml: bool,
    carry: [u8; CARRY],
    carried: usize,
}

impl HeadScan {
    /// Feeds bytes read with no request in flight; `Some(shape)` once the head is too large.
    fn feed(&mut self, generation: u64, got: &[u8]) -> Option<(Provider, Format)> {
        if generation != self.generation {
            *self = HeadScan {
                generation,
                ..HeadScan::default()
            };
        }
        if self.ended {
            return None;
        }
        // The seam between the last read and this one, then this read.
        let mut seam = [0u8; 2 * CARRY];
        let lead = got.len().min(CARRY);
        seam[..self.carried].copy_from_slice(&self.carry[..self.carried]);
        seam[self.carried..self.carried + lead].copy_from_slice(&got[..lead]);
        let seam = &seam[..self.carried + lead];
        self.note_markers(seam);
        self.note_markers(got);
        let end = find(seam, b"\r\n\r\n")
            .map(|_| lead)
            .or_else(|| find(got, b"\r\n\r\n").map(|i| i + 4));
        let counted = end.unwrap_or(got.len());
        self.bytes += counted;
        if end.is_some() {
            self.ended = true;
        } else {
            let keep = got.len().min(CARRY);
            let mut carry = [0u8; CARRY];
            let old = (self.carried + keep)
                .saturating_sub(CARRY)
                .min(self.carried);
            let from_old = self.carried - old;
            carry[..from_old].copy_from_slice(&self.carry[old..self.carried]);
            carry[from_old..from_old + keep].copy_from_slice(&got[got.len() - keep..]);
            self.carry = carry;
            self.carried = from_old + keep;
        }
        if self.bytes > MAX_HEAD {
            let provider = if self.ucloud {
                Provider::Ucloud
            } else {
                Provider::Aliyun
            };
            let format = if self.xml && !self.ucloud {
                Format::Xml
            } else {
                Format::Json
            };
            return Some((provider, format));
        }
        None
    }

    fn note_markers(&mut self, hay: &[u8]) {
        self.ucloud |= UCLOUD_MARKERS.iter().any(|m| find(hay, m).is_some());
        self.xml |= XML_MARKERS.iter().any(|m| find(hay, m).is_some());
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.len() > hay.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_scan_finds_the_end_across_reads() {
        let mut s = HeadScan::default();
        assert!(s.feed(0, b"GET /?a=1 HTTP/1.1\r\nhost: x\r\n\r").is_none());
        assert!(!s.ended);
        assert!(s.feed(0, b"\nbody").is_none());
        assert!(s.ended);
        // The next request starts counting again.
        assert!(s.feed(1, &vec![b'a'; MAX_HEAD]).is_none());
        assert!(s.feed(1, b"aa").is_some());
    }

    #[test]
    fn head_scan_guesses_the_dialect_across_reads() {
        let mut s = HeadScan::default();
        assert!(s.feed(0, b"GET /?Action=CreateUHost").is_none());
        assert!(s.feed(0, b"KeyPair&x=").is_none());
        let shape = s.feed(0, &vec![b'a'; MAX_HEAD]).unwrap();
        assert_eq!(shape, (Provider::Ucloud, Format::Json));

        let mut s = HeadScan::default();
        assert!(s.feed(0, b"GET /?PublicKeyBody=x&Format=X").is_none());
        let shape = s.feed(0, &[b"ML&".as_slice(), &vec![b'a'; MAX_HEAD]].concat());
        assert_eq!(shape, Some((Provider::Aliyun, Format::Xml)));

        let mut s = HeadScan::default();
        let shape = s.feed(0, &vec![b'a'; MAX_HEAD + 1]);
        assert_eq!(shape, Some((Provider::Aliyun, Format::Json)));
    }

    #[test]
    fn default_cap_leaves_room_below_the_file_limit() {
        let cap = default_max_connections();
        assert!((16..=1024).contains(&cap));
        if let Some(n) = rustix::process::getrlimit(rustix::process::Resource::Nofile).current {
            assert!(cap as u64 <= n.max(16 + RESERVED_FDS));
        }
    }
}
