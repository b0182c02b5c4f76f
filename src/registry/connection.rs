//! The one way keyfleet connects to Redis: a self-reconnecting connection (redis-rs's
//! `ConnectionManager`) with bounded waits, checked with PING, whose errors name the server
//! without its password. The registry, the batch status and the readiness probe share it.
//!
//! A URL list (`redis://h1:7000,redis://h2:7001,…`) selects a Redis Cluster instead: redis-rs's
//! cluster client, which follows slot moves and failovers by itself. Every key keyfleet writes
//! for one scope or batch carries one hash tag, so each script touches one slot.
//!
//! Redis replicates asynchronously: a failover to a replica that is behind loses the writes it
//! lacks. With `--redis-replicas N` every write that decides a key's fate ([`RedisConn::write`])
//! is followed by `WAIT N` on the same connection, in the same pipeline, so it reaches the very
//! node that took the write; fewer than N acknowledgements is
//! [`RegistryError::ReplicasBehind`], which the retry policy retries like any storage failure.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, Script, ToRedisArgs, Value};

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

/// How long one `WAIT` may block for its replicas. A healthy replica acknowledges within a
/// round trip (the master asks it at once), so this is only ever reached when a replica is
/// down or far behind; then the write is retried (the retry policy's backoff, not a longer
/// wait here) so the failure shows in the logs each second. Well under [`RESPONSE_TIMEOUT`]:
/// a blocked `WAIT` holds up every command queued behind it on the shared connection.
pub const REPLICA_WAIT: Duration = Duration::from_secs(1);

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

/// A connection to one Redis server or to a Redis Cluster, and how many replicas a write must
/// reach before it counts; cheap to clone (clones share the connection and the setting).
#[derive(Clone)]
pub struct RedisConn {
    link: Link,
    replicas: u32,
}

#[derive(Clone)]
enum Link {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisConn {
    pub fn is_cluster(&self) -> bool {
        matches!(self.link, Link::Cluster(_))
    }

    /// The same connection, whose writes ([`RedisConn::write`]) each wait for `replicas`
    /// replicas to acknowledge them (`--redis-replicas`); 0, the default, waits for none.
    pub fn with_replicas(mut self, replicas: u32) -> Self {
        self.replicas = replicas;
        self
    }

    /// How many replicas each write waits for.
    pub fn replicas(&self) -> u32 {
        self.replicas
    }

    /// With `--redis-replicas N` above 0: fails, naming the setting, when a master (the
    /// server, or each master of a Cluster) has had fewer than N replicas connected for all of
    /// `within` (a replica resyncing after a failover comes back in seconds) — every write
    /// would otherwise wait for them and be retried for ever. A replica that drops later is
    /// what [`RegistryError::ReplicasBehind`] reports, write by write.
    pub async fn check_replicas(&self, within: Duration) -> Result<(), RegistryError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match self.replicas_short().await {
                Err(e @ RegistryError::TooFewReplicas { .. })
                    if tokio::time::Instant::now() < deadline =>
                {
                    tracing::debug!("{e}; asking again");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                done => return done,
            }
        }
    }

    /// One look at the masters' replica counts for [`RedisConn::check_replicas`].
    async fn replicas_short(&self) -> Result<(), RegistryError> {
        if self.replicas == 0 {
            return Ok(());
        }
        let mut conn = self.clone();
        let info: Value = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut conn)
            .await
            .map_err(storage)?;
        // One server answers its text; a Cluster client asks every master and answers a map
        // of address to text.
        let nodes: Vec<(String, String)> = match info {
            Value::Map(per_node) => per_node
                .into_iter()
                .map(|(addr, text)| (text_of(addr), text_of(text)))
                .collect(),
            text => vec![("the server".to_owned(), text_of(text))],
        };
        let short: Vec<String> = nodes
            .iter()
            .filter_map(|(node, text)| {
                let connected = text
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("connected_slaves:")?.parse().ok())
                    .unwrap_or(0u32);
                (connected < self.replicas).then(|| format!("{node} has {connected}"))
            })
            .collect();
        if short.is_empty() {
            Ok(())
        } else {
            Err(RegistryError::TooFewReplicas {
                wanted: self.replicas,
                found: short.join(", "),
            })
        }
    }

    /// Runs `write` — one command (or one script's EVALSHA, `script` being that script) whose
    /// keys are all in one slot — then, with `--redis-replicas N` above 0, `WAIT N` in the same
    /// pipeline. A pipeline goes to one node over one connection, so the `WAIT` counts the
    /// replicas of the node that took the write, for an offset that includes it (redis-rs's
    /// cluster client routes a pipeline by its first keyed command; `WAIT` alone would go to
    /// every master). A short count is [`RegistryError::ReplicasBehind`]: the write stands on
    /// the master but would be lost to a failover now, so the caller tries it again (every
    /// write here is safe to repeat) until a replica holds it.
    pub(crate) async fn write<T: FromRedisValue>(
        &self,
        write: &Cmd,
        script: Option<&Script>,
    ) -> Result<T, RegistryError> {
        let reply = self
            .write_many(std::slice::from_ref(write), script)
            .await?
            .pop()
            .ok_or_else(|| {
                RegistryError::Storage("redis: a pipeline answered nothing".to_owned())
            })?;
        redis::from_redis_value(reply)
            .map_err(|e| RegistryError::Storage(format!("redis: unexpected reply: {e}")))
    }

    /// [`RedisConn::write`] of several writes, all of whose keys are in one slot, in one
    /// pipeline (one round trip) with one `WAIT` after the last: one reply a write, in order.
    /// Redis runs them in the order given.
    pub(crate) async fn write_many(
        &self,
        writes: &[Cmd],
        script: Option<&Script>,
    ) -> Result<Vec<Value>, RegistryError> {
        let mut pipe = redis::pipe();
        for write in writes {
            pipe.add_command(write.clone());
        }
        if self.replicas > 0 {
            pipe.cmd("WAIT")
                .arg(self.replicas)
                .arg(REPLICA_WAIT.as_millis() as u64);
        }
        let mut conn = self.clone();
        let mut replies = match pipe.query_async::<Vec<Value>>(&mut conn).await {
            // The server lost its scripts (a restart, a failover to a replica that never ran
            // this one): load it and run the writes once more, as redis-rs's own invoke does.
            // None of them ran: a script that is not loaded runs nothing.
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                let Some(script) = script else {
                    return Err(storage(e));
                };
                script.load_async(&mut conn).await.map_err(storage)?;
                pipe.query_async::<Vec<Value>>(&mut conn).await
            }
            other => other,
        }
        .map_err(storage)?;
        if replies.len() != writes.len() + usize::from(self.replicas > 0) {
            return Err(RegistryError::Storage(format!(
                "redis: a pipeline of {} writes answered {} replies",
                writes.len(),
                replies.len()
            )));
        }
        if self.replicas > 0 {
            let acked = replies
                .pop()
                .and_then(|v| redis::from_redis_value::<u64>(v).ok())
                .ok_or_else(|| {
                    RegistryError::Storage("redis: WAIT did not answer a count".to_owned())
                })?;
            if acked < u64::from(self.replicas) {
                return Err(RegistryError::ReplicasBehind {
                    acked,
                    wanted: self.replicas,
                    waited: REPLICA_WAIT,
                });
            }
        }
        Ok(replies)
    }

    /// [`RedisConn::write`] of one script's EVALSHA.
    pub(crate) async fn run_script<T: FromRedisValue>(
        &self,
        call: &ScriptCall<'_>,
    ) -> Result<T, RegistryError> {
        self.write(&call.evalsha(), Some(call.script)).await
    }

    /// [`RedisConn::write_many`] of calls of one script, all of whose keys are in one slot.
    pub(crate) async fn run_scripts(
        &self,
        calls: &[ScriptCall<'_>],
    ) -> Result<Vec<Value>, RegistryError> {
        let writes: Vec<Cmd> = calls.iter().map(ScriptCall::evalsha).collect();
        self.write_many(&writes, calls.first().map(|c| c.script))
            .await
    }
}

/// One script's keys and arguments, to run with [`RedisConn::run_script`]: redis-rs's own
/// `ScriptInvocation` can only be invoked alone, not in a pipeline with a `WAIT`.
pub(crate) struct ScriptCall<'a> {
    script: &'a Script,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl<'a> ScriptCall<'a> {
    pub(crate) fn new(script: &'a Script) -> Self {
        ScriptCall {
            script,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }

    /// Adds `KEYS[i]`.
    pub(crate) fn key<T: ToRedisArgs>(&mut self, key: T) -> &mut Self {
        self.keys.extend(key.to_redis_args());
        self
    }

    /// Adds `ARGV[i]`.
    pub(crate) fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.args.extend(arg.to_redis_args());
        self
    }

    fn evalsha(&self) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash()).arg(self.keys.len());
        for k in &self.keys {
            cmd.arg(k.as_slice());
        }
        for a in &self.args {
            cmd.arg(a.as_slice());
        }
        cmd
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.link {
            Link::Single(c) => c.req_packed_command(cmd),
            Link::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.link {
            Link::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Link::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.link {
            Link::Single(c) => c.get_db(),
            Link::Cluster(c) => c.get_db(),
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
            .map(|c| RedisConn {
                link: Link::Single(c),
                replicas: 0,
            });
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
        .map(|c| RedisConn {
            link: Link::Cluster(c),
            replicas: 0,
        })
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

/// A reply as text (an `INFO` answer, a node address), whatever its RESP type.
fn text_of(v: Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
        Value::SimpleString(s) => s,
        Value::VerbatimString { text, .. } => text,
        other => format!("{other:?}"),
    }
}
