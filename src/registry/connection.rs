//! The one way keyfleet connects to Redis: a self-reconnecting connection (redis-rs's
//! `ConnectionManager`) with bounded waits, checked with PING, whose errors name the server
//! without its password. The registry, the batch status and the readiness probe share it.
//!
//! A URL list (`redis://h1:7000,redis://h2:7001,…`) selects a Redis Cluster instead: redis-rs's
//! cluster client, which follows slot moves and failovers by itself. Every key keyfleet writes
//! for one scope or batch carries one hash tag, so each script touches one slot.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::escape::redact_url;
use crate::registry::RegistryError;

/// How long one command may wait for its reply. Longer than any script takes (the slowest, a
/// reserve at the quota, reads one scope's hash); past it Redis counts as unreachable and the
/// operation fails with [`RegistryError::Storage`]. The command may still have run: every
/// operation is safe to repeat (a reserve comes back `Resumed`, a commit that did land is found
/// again as the job's own undelivered record and replaced).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Reconnection attempts per outage episode (about 0.1 s, 0.2 s, 0.4 s apart, jittered): the
/// operations waiting on them fail within a second or so instead of stalling a worker, and
/// the next operation starts a new round, so Redis is found again soon after it returns.
const RECONNECT_ATTEMPTS: usize = 3;
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

pub(crate) fn storage(e: redis::RedisError) -> RegistryError {
    RegistryError::Storage(format!("redis: {e}"))
}

/// A prefix with `{` or `}` would make its hash tag the cluster slot of every key: still
/// correct, but all scopes on one node. Refused so the mistake shows at start-up.
pub fn check_prefix(prefix: &str) -> Result<(), RegistryError> {
    if prefix.contains(['{', '}']) {
        return Err(RegistryError::Storage(format!(
            "Redis key prefix {prefix:?} must not contain '{{' or '}}' (they are hash tags)"
        )));
    }
    Ok(())
}

/// A connection to one Redis server or to a Redis Cluster; cheap to clone (clones share it).
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisConn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

/// Connects to `url` — one server, or a Redis Cluster when `url` is a comma-separated list of
/// node URLs — waiting at most `timeout`, and checks it with PING. Errors name the URLs
/// without their passwords and say which step failed.
pub async fn connect(url: &str, timeout: Duration) -> Result<RedisConn, RegistryError> {
    let nodes: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    if nodes.len() <= 1 {
        return connect_manager(url.trim(), timeout)
            .await
            .map(RedisConn::Single);
    }
    let shown = nodes
        .iter()
        .map(|n| redact_url(n))
        .collect::<Vec<_>>()
        .join(",");
    let client = redis::cluster::ClusterClient::builder(nodes.iter().copied())
        .connection_timeout(timeout)
        .response_timeout(RESPONSE_TIMEOUT)
        .build()
        .map_err(|e| RegistryError::Storage(format!("invalid Redis Cluster URLs {shown}: {e}")))?;
    let server = format!("Redis Cluster at {shown}");
    open_and_ping(server, timeout, client.get_async_connection())
        .await
        .map(RedisConn::Cluster)
}

/// Opens a self-reconnecting connection to `url`, waiting at most `timeout`, and checks it
/// with PING. Errors name the URL without its password and say which step failed.
pub async fn connect_manager(
    url: &str,
    timeout: Duration,
) -> Result<ConnectionManager, RegistryError> {
    let shown = redact_url(url);
    let client = redis::Client::open(url)
        .map_err(|e| RegistryError::Storage(format!("invalid Redis URL {shown}: {e}")))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(RECONNECT_ATTEMPTS)
        .set_max_delay(MAX_RECONNECT_DELAY);
    let opened = ConnectionManager::new_with_config(client, config);
    open_and_ping(format!("Redis at {shown}"), timeout, opened).await
}

/// Opens a connection with `open` and checks it with PING, all within `timeout`. Errors name
/// `server` and say which step failed.
async fn open_and_ping<C, F>(server: String, timeout: Duration, open: F) -> Result<C, RegistryError>
where
    C: redis::aio::ConnectionLike,
    F: std::future::Future<Output = redis::RedisResult<C>>,
{
    let connect = async {
        let mut conn = open.await.map_err(|e| format!("cannot connect: {e}"))?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(|e| format!("connected, but PING failed: {e}"))?;
        Ok::<_, String>(conn)
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(why)) => Err(RegistryError::Storage(format!("{server}: {why}"))),
        Err(_) => Err(RegistryError::Storage(format!(
            "{server}: no connection within {timeout:?}"
        ))),
    }
}
