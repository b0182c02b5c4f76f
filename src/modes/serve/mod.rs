//! `keyfleet serve`: the key-pair APIs of Alibaba Cloud ECS and UCloud over HTTP, for the
//! official SDKs unchanged, on the same registry, quota and lifecycle as `run` and the
//! workers.
//!
//! - `../credentials.rs`: the access keys the API accepts (`--credentials FILE`).
//! - `request.rs`: an HTTP request's parameters (query, form or JSON body).
//! - `gateway.rs`: which API a request speaks, its signature, time stamp, nonce, throttle and
//!   injected faults.
//! - `actions.rs`: create (a lifecycle job), import, describe, delete.
//! - `conn.rs`: the accept loop: connection cap, header-read and idle timeouts, heads too
//!   large.
//!
//! One listener serves the API on `/` (GET and POST), and beside it the telemetry routes
//! `/metrics`, `/healthz`, `/readyz` ([`crate::telemetry::metrics::routes`]).
//! On shutdown the listener stops accepting, idle connections close at once, in-flight
//! requests finish (up to `drain`), and creates already running finish and are settled even
//! when their client has gone.

pub mod actions;
pub mod conn;
pub mod gateway;
pub mod request;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dialect::{aliyun, ucloud, ApiError, Provider};
use crate::keys::cpu::{CpuError, CpuPool};
use crate::keys::keygen::KeyBits;
use crate::lifecycle::Lifecycle;
use crate::registry::embedded::EmbeddedRegistry;
use crate::registry::redis::RedisRegistry;
use crate::registry::{Registry, RegistryError};
use crate::reservoir::Reservoir;
use crate::retry::RetryPolicy;
use crate::settings::Settings;
use crate::telemetry::metrics::{MetricsError, Readiness};
use crate::upstream::Configured;

use crate::credentials::Credentials;
use actions::Actions;
pub use conn::Limits;
use gateway::{Caller, Fault, Format, Gateway, Refusal};
use request::ApiRequest;

/// Largest request body taken: the longest legitimate one (an import of an RSA-16384 key, or
/// a delete of 100 names) is a few KB. A larger one is answered in the API's error shape.
pub const MAX_BODY: usize = 256 * 1024;
/// Of a body too large, how much is read (and dropped) before answering, so a client still
/// sending reads the answer rather than a reset; beyond it the connection is just closed.
const MAX_BODY_DRAIN: usize = 4 * 1024 * 1024;

/// Where the registry is.
#[derive(Clone, Debug)]
pub enum Store {
    Embedded(PathBuf),
    Redis {
        url: String,
        prefix: String,
        connect_timeout: Duration,
        /// Replicas each registry write waits for (`--redis-replicas`).
        replicas: u32,
    },
}

#[derive(Debug)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub credentials: Credentials,
    pub store: Store,
    pub settings: Settings,
    pub threads: usize,
    pub key_bits: KeyBits,
    /// Keys made ahead on idle threads, so a create answers without waiting for one.
    pub reservoir: usize,
    /// Requests per second per access key before `Throttling.User` / RetCode 153; 0 = off.
    pub throttle_rps: u32,
    /// Fraction of requests answered 503 / RetCode 150 (half before the action, half after).
    pub fault_rate: f64,
    /// How long in-flight requests may take to finish after shutdown is asked for.
    pub drain: Duration,
    /// Where keys are registered besides the registry (local: nowhere else).
    pub upstream: Configured,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Cpu(#[from] CpuError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the HTTP server failed")]
    Server(#[source] std::io::Error),
}

/// Serves until `shutdown` is cancelled; `bound` is told the listening address once bound.
/// Connections get the default [`Limits`].
pub async fn serve(
    opts: ServeOptions,
    shutdown: CancellationToken,
    bound: impl FnOnce(SocketAddr) + Send,
) -> Result<(), ServeError> {
    serve_limited(opts, Limits::default(), shutdown, bound).await
}

/// [`serve`] with these connection limits.
pub async fn serve_limited(
    opts: ServeOptions,
    limits: Limits,
    shutdown: CancellationToken,
    bound: impl FnOnce(SocketAddr) + Send,
) -> Result<(), ServeError> {
    match opts.store.clone() {
        Store::Embedded(path) => {
            let registry = EmbeddedRegistry::open(&path)?;
            serve_with_limits(Arc::new(registry), opts, limits, shutdown, bound).await
        }
        Store::Redis {
            url,
            prefix,
            connect_timeout,
            replicas,
        } => {
            let registry = RedisRegistry::connect(&url, &prefix, connect_timeout)
                .await?
                .with_replicas(replicas);
            registry.check_replicas(connect_timeout).await?;
            // In front of a cloud, the budget is shared with every serve and worker on it.
            opts.upstream
                .share_rate_limit(registry.connection(), &prefix);
            serve_with_limits(Arc::new(registry), opts, limits, shutdown, bound).await
        }
    }
}

/// [`serve`] on a registry already open.
pub async fn serve_with<R: Registry>(
    registry: Arc<R>,
    opts: ServeOptions,
    shutdown: CancellationToken,
    bound: impl FnOnce(SocketAddr) + Send,
) -> Result<(), ServeError> {
    serve_with_limits(registry, opts, Limits::default(), shutdown, bound).await
}

/// [`serve_with`] with these connection limits.
pub async fn serve_with_limits<R: Registry>(
    registry: Arc<R>,
    opts: ServeOptions,
    limits: Limits,
    shutdown: CancellationToken,
    bound: impl FnOnce(SocketAddr) + Send,
) -> Result<(), ServeError> {
    let handle = crate::telemetry::metrics::install()?;
    let cpu = CpuPool::new_yielding(opts.threads)?;
    // Creates run to the end even after shutdown is asked for: their lifecycle has its own
    // token, cancelled only once the server has drained.
    let work = CancellationToken::new();
    let upstream = Arc::new(opts.upstream);
    let mut lifecycle = Lifecycle::new(
        registry,
        upstream.clone(),
        cpu.clone(),
        opts.settings.clone(),
        RetryPolicy::embedded(),
        work.clone(),
    );
    if opts.reservoir > 0 {
        let engine = opts.settings.engine;
        lifecycle = lifecycle.with_reservoir(Reservoir::new(
            cpu,
            engine,
            opts.reservoir,
            &[opts.key_bits],
        ));
    }
    let tasks = TaskTracker::new();
    if opts.throttle_rps > 0 {
        tracing::warn!(
            rps = opts.throttle_rps,
            "FAULT INJECTION: requests beyond {} per second per access key are answered Throttling.User / RetCode 153",
            opts.throttle_rps
        );
    }
    if opts.fault_rate > 0.0 {
        tracing::warn!(
            rate = opts.fault_rate,
            "FAULT INJECTION: a fraction {} of requests are answered 503 ServiceUnavailable / RetCode 150, half of them after the action was done",
            opts.fault_rate
        );
    }
    let readiness = Readiness::new();
    readiness.set_amqp(true);
    readiness.set_redis(true);
    let app = Arc::new(App {
        gateway: Gateway::new(opts.credentials, opts.throttle_rps, opts.fault_rate),
        actions: Actions {
            lifecycle,
            upstream,
            key_bits: opts.key_bits,
            tasks: tasks.clone(),
        },
        body_timeout: limits.header_read_timeout,
    });
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: opts.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: opts.listen,
        source,
    })?;
    tracing::info!(
        addr = %local,
        max_connections = limits.max_connections,
        header_read_timeout = ?limits.header_read_timeout,
        idle_timeout = ?limits.idle_timeout,
        "serving the key-pair APIs"
    );
    bound(local);
    // Connections: gracefully on `shutdown` (idle ones close at once), at once on `hard`
    // once the drain deadline has passed.
    let conns = TaskTracker::new();
    let hard = CancellationToken::new();
    let accepting = tokio::spawn(conn::accept(
        listener,
        router(
            app,
            crate::telemetry::metrics::routes(handle, readiness.clone()),
        ),
        limits,
        shutdown.clone(),
        hard.clone(),
        conns.clone(),
    ));
    shutdown.cancelled().await;
    readiness.set_draining(true);
    tracing::info!("shutting down: finishing requests in flight");
    let result = accepting
        .await
        .map_err(|e| ServeError::Server(std::io::Error::other(e)));
    conns.close();
    if tokio::time::timeout(opts.drain, conns.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "requests still in flight after {:?}: stopping anyway",
            opts.drain
        );
        hard.cancel();
    }
    // Creates whose clients left still finish (bounded by the same deadline).
    tasks.close();
    if tokio::time::timeout(opts.drain, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "creates still running after {:?}: stopping anyway",
            opts.drain
        );
    }
    work.cancel();
    result
}

struct App<R> {
    gateway: Gateway,
    actions: Actions<R>,
    /// Time for a request's body to arrive once its head has.
    body_timeout: Duration,
}

/// The API on `/`, beside the `telemetry` routes.
fn router<R: Registry>(app: Arc<App<R>>, telemetry: Router) -> Router {
    Router::new()
        .route("/", get(api::<R>).post(api::<R>))
        .with_state(app)
        .merge(telemetry)
}

async fn api<R: Registry>(
    State(app): State<Arc<App<R>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let (answer, format) = match read_body(body, app.body_timeout).await {
        Ok(body) => app.answer(method, uri.query(), headers, body).await,
        Err((why, seen)) => {
            // Answered in the dialect the request speaks, as far as its head and the start of
            // its body tell, so the SDK reports an API error rather than an unknown one.
            let (provider, format) = shape_of(method, uri.query(), headers, seen);
            let reason = match why {
                BodyError::TooLarge => format!("the request body exceeds {MAX_BODY} bytes"),
                BodyError::Timeout => "the request body did not arrive in time".to_owned(),
                BodyError::Broken => "the request body could not be read".to_owned(),
            };
            let err = ApiError::InvalidParameter {
                name: "body".into(),
                reason,
            };
            let answer = Answer::error(provider, None, &err);
            crate::telemetry::metrics::api_request(
                answer.provider.as_str(),
                "",
                &answer.code,
                started.elapsed(),
            );
            let mut response = answer.render(format);
            // What is left of the body is not read: the connection cannot carry another.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
    };
    crate::telemetry::metrics::api_request(
        answer.provider.as_str(),
        &answer.action,
        &answer.code,
        started.elapsed(),
    );
    tracing::debug!(
        provider = %answer.provider,
        action = %answer.action,
        code = %answer.code,
        status = answer.status,
        "answered"
    );
    answer.render(format)
}

/// Why a request's body was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyError {
    TooLarge,
    Timeout,
    Broken,
}

/// The body, up to [`MAX_BODY`], within `timeout`. On error, the body's first bytes (up to
/// [`MAX_BODY`]) come back too, to tell the dialect by. A body too large is read on (and
/// dropped) up to [`MAX_BODY_DRAIN`] so the client gets to read the answer.
async fn read_body(body: Body, timeout: Duration) -> Result<Bytes, (BodyError, Bytes)> {
    let mut kept = BytesMut::new();
    let mut total = 0usize;
    let mut stream = body.into_data_stream();
    let read = async {
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else {
                return Err(BodyError::Broken);
            };
            total = total.saturating_add(chunk.len());
            if kept.len() < MAX_BODY {
                let room = MAX_BODY - kept.len();
                kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            if total > MAX_BODY_DRAIN {
                break;
            }
        }
        if total > MAX_BODY {
            Err(BodyError::TooLarge)
        } else {
            Ok(())
        }
    };
    let outcome = match tokio::time::timeout(timeout, read).await {
        Ok(r) => r,
        Err(_) if total > MAX_BODY => Err(BodyError::TooLarge),
        Err(_) => Err(BodyError::Timeout),
    };
    match outcome {
        Ok(()) => Ok(kept.freeze()),
        Err(e) => Err((e, kept.freeze())),
    }
}

/// Whether the request says its body is JSON: only UCloud's SDKs send one.
fn json_body(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.to_ascii_lowercase().starts_with("application/json"))
}

/// Which dialect and format a request is answered in, from its head and (the start of) its
/// body; the Alibaba JSON envelope when neither tells.
fn shape_of(
    method: Method,
    query: Option<&str>,
    headers: HeaderMap,
    body: Bytes,
) -> (Provider, Format) {
    if json_body(&headers) {
        return (Provider::Ucloud, Format::Json);
    }
    match ApiRequest::parse(method, query, headers, body) {
        // The UCloud SDK sends `Action` and its `PublicKey` after the other parameters, so a
        // body cut short may hold neither; its `Region` / `ProjectId` still tell it apart from
        // Alibaba's `RegionId`.
        Ok(req)
            if req.param("Action").is_none()
                && req.param("RegionId").is_none()
                && (req.param("Region").is_some() || req.param("ProjectId").is_some()) =>
        {
            (Provider::Ucloud, Format::Json)
        }
        Ok(req) => Gateway::shape(&req),
        Err(_) => (Provider::Aliyun, Format::Json),
    }
}

impl<R: Registry> App<R> {
    async fn answer(
        &self,
        method: Method,
        query: Option<&str>,
        headers: HeaderMap,
        body: Bytes,
    ) -> (Answer, Format) {
        // Only UCloud sends JSON bodies: an unreadable one gets a UCloud answer (HTTP 200).
        let json = json_body(&headers);
        let req = match ApiRequest::parse(method, query, headers, body) {
            Ok(req) => req,
            Err(e) => {
                let provider = if json {
                    Provider::Ucloud
                } else {
                    Provider::Aliyun
                };
                return (Answer::error(provider, None, &e), Format::Json);
            }
        };
        let caller: Caller = match self
            .gateway
            .admit(&req, &**self.actions.lifecycle.registry())
            .await
        {
            Ok(caller) => caller,
            Err(Refusal {
                provider,
                format,
                action,
                error,
            }) => return (Answer::error(provider, action.as_deref(), &error), format),
        };
        let answer = self.actions.run(&caller).await;
        let answer = match caller.fault {
            Some(Fault::AfterAction) => Answer::error(
                answer.provider,
                Some(&caller.action),
                &ApiError::Gateway(crate::dialect::GatewayError::Unavailable),
            ),
            None => answer,
        };
        (answer, caller.format)
    }
}

/// A rendered answer: status, the dialect's JSON body, and the code for metrics.
#[derive(Debug)]
pub struct Answer {
    pub provider: Provider,
    pub action: String,
    pub status: u16,
    /// `OK` or the error code (UCloud: the RetCode).
    pub code: String,
    pub body: serde_json::Value,
}

impl Answer {
    pub fn ok(provider: Provider, action: &str, body: serde_json::Value) -> Answer {
        Answer {
            provider,
            action: action.to_owned(),
            status: 200,
            code: "OK".into(),
            body,
        }
    }

    pub fn error(provider: Provider, action: Option<&str>, err: &ApiError) -> Answer {
        if let ApiError::Internal(detail) = err {
            tracing::error!(provider = %provider, "internal error: {detail}");
        }
        let reply = err.reply(provider);
        let body = match provider {
            Provider::Aliyun => aliyun::error_json(err, uuid::Uuid::new_v4()),
            Provider::Ucloud => ucloud::actions::error_json_for(action.unwrap_or(""), err),
        };
        Answer {
            provider,
            action: action.unwrap_or("").to_owned(),
            status: reply.http_status,
            code: reply.code,
            body,
        }
    }

    /// Status, content type, body text and request id.
    fn parts(&self, format: Format) -> (StatusCode, &'static str, String, Option<String>) {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let request_id = self
            .body
            .get("RequestId")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        let (content_type, text) = match (self.provider, format) {
            (Provider::Aliyun, Format::Xml) => {
                let root = if self.code == "OK" {
                    format!("{}Response", self.action)
                } else {
                    "Error".to_owned()
                };
                let xml = aliyun::actions::to_xml(&root, &self.body);
                ("text/xml;charset=utf-8", xml)
            }
            _ => ("application/json;charset=utf-8", self.body.to_string()),
        };
        (status, content_type, text, request_id)
    }

    fn render(self, format: Format) -> Response {
        let (status, content_type, text, request_id) = self.parts(format);
        let mut response = (status, [(header::CONTENT_TYPE, content_type)], text).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(id) = request_id.and_then(|id| HeaderValue::from_str(&id).ok()) {
            headers.insert("x-acs-request-id", id);
        }
        response
    }

    /// The answer as bytes on the wire, for a connection hyper does not answer on (over the
    /// cap, a head too large); the connection is closed after it.
    pub(crate) fn raw(&self, format: Format, extra: &[(&str, &str)]) -> Vec<u8> {
        let (status, content_type, text, request_id) = self.parts(format);
        let mut head = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
             cache-control: no-store\r\nconnection: close\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            text.len(),
        );
        if let Some(id) = request_id.filter(|id| HeaderValue::from_str(id).is_ok()) {
            head.push_str(&format!("x-acs-request-id: {id}\r\n"));
        }
        for (name, value) in extra {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(text.as_bytes());
        out
    }
}
