//! The one way keyfleet connects to Redis: a self-reconnecting connection (redis-rs's
//! `ConnectionManager`) with bounded waits, checked with PING, whose errors name the server
//! without its password. The registry, the batch status and the readiness probe share it.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::endpoints::redact_url;
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
    let connect = async {
        let mut conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(|e| format!("connected, but PING failed: {e}"))?;
        Ok::<_, String>(conn)
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(why)) => Err(RegistryError::Storage(format!("Redis at {shown}: {why}"))),
        Err(_) => Err(RegistryError::Storage(format!(
            "Redis at {shown}: no connection within {timeout:?}"
        ))),
    }
}
