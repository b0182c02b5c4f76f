//! RabbitMQ: the topology (README, "RabbitMQ topology") and the few operations the producer, the workers and
//! the collector need — publishing with confirms, consuming with manual acks, dead-lettering
//! with a reason.
//!
//! Names are derived from one prefix (`keyfleet` in production) so tests can run side by side
//! on one broker without seeing each other's messages.

use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use lapin::{Confirmation, PublisherConfirm};

use crate::escape::redact_url;
use crate::job::{Job, JobResult};
use crate::queue::nodes::{AmqpUrlError, AmqpUrls};

/// Header carrying why keyfleet dead-lettered a message.
pub const REASON_HEADER: &str = "x-keyfleet-reason";
/// Header carrying when keyfleet published a message, in Unix milliseconds (the AMQP
/// `timestamp` property has whole seconds only).
pub const PUBLISHED_MS_HEADER: &str = "x-keyfleet-published-ms";

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot connect to RabbitMQ at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error(transparent)]
    Url(#[from] AmqpUrlError),
    #[error("RabbitMQ")]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ refused a message (nack) on exchange {0}")]
    Nacked(String),
    #[error("no queue takes messages for routing key {0} (was the batch's results queue deleted or expired?)")]
    Unroutable(String),
    #[error("cannot encode a message: {0}")]
    Encode(String),
}

/// How long a result that RabbitMQ refuses is offered again before its job is handed back
/// ([`Broker::publish_result`]). A leader election after a node loss took 1–7 s on a loaded
/// 3-node test cluster; a queue that has lost its majority does not come back in this time, and
/// its jobs go back to the queue.
pub const NACK_RETRY_WINDOW: Duration = Duration::from_secs(60);

/// Queue and exchange names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    pub prefix: String,
    /// After this many deliveries a job is dead-lettered instead of looping (`x-delivery-limit`).
    pub delivery_limit: u32,
    /// Abandoned per-batch results queues are deleted after this long unused (`x-expires`).
    pub results_expiry: Duration,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            prefix: "keyfleet".into(),
            delivery_limit: 10,
            results_expiry: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl Topology {
    pub fn with_prefix(prefix: &str) -> Self {
        Topology {
            prefix: prefix.to_owned(),
            ..Topology::default()
        }
    }
    pub fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.prefix)
    }
    pub fn jobs_queue(&self) -> String {
        format!("{}.jobs", self.prefix)
    }
    pub fn dlx(&self) -> String {
        format!("{}.dlx", self.prefix)
    }
    pub fn dead_queue(&self) -> String {
        format!("{}.jobs.dead", self.prefix)
    }
    pub fn results_exchange(&self) -> String {
        format!("{}.results", self.prefix)
    }
    pub fn results_queue(&self, batch_id: &str) -> String {
        format!("{}.results.{batch_id}", self.prefix)
    }
    /// Routing key of jobs on the jobs exchange (direct).
    pub fn jobs_routing_key(&self) -> String {
        self.jobs_queue()
    }
}

/// A declare RabbitMQ refused because the queue exists with other arguments.
fn precondition_failed(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(e)
        if matches!(e.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)))
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// One connection and one confirm-mode channel.
pub struct Broker {
    conn: Connection,
    channel: Channel,
    pub topology: Topology,
    /// Which of the URLs it was given this broker is connected to.
    node: usize,
    /// Where results go once RabbitMQ has refused one on `channel`: a fresh channel (see
    /// [`Broker::publish_result`]). Channels it replaces are left open, since jobs in flight
    /// may still be publishing on them; there is one per refusal episode, and they close with
    /// the connection.
    results_channel: std::sync::Mutex<Option<Channel>>,
}

impl Broker {
    /// Connects to `urls` — one URL, or several comma-separated (the nodes of one cluster,
    /// tried in order) — waiting at most `timeout` for each, so a broker that is down fails
    /// start-up with a clear message instead of hanging.
    pub async fn connect(
        urls: &str,
        topology: Topology,
        timeout: Duration,
    ) -> Result<Self, BrokerError> {
        Self::connect_nodes(&urls.parse()?, 0, topology, timeout).await
    }

    /// Connects to the first node of `urls` that answers, starting with node `from` and
    /// wrapping around; each node gets at most `timeout`. After a lost connection, pass the
    /// lost node's index + 1 ([`Broker::node`]): a node that just died (or is cut off from this
    /// host) is tried last, so a fresh connection does not wait on it first.
    pub async fn connect_nodes(
        urls: &AmqpUrls,
        from: usize,
        topology: Topology,
        timeout: Duration,
    ) -> Result<Self, BrokerError> {
        let mut failures = Vec::new();
        for node in urls.order_from(from) {
            match Self::connect_one(urls.get(node), timeout).await {
                Ok((conn, channel)) => {
                    if urls.len() > 1 {
                        tracing::debug!(node = %urls.shown(node), "connected to RabbitMQ");
                    }
                    return Ok(Broker {
                        conn,
                        channel,
                        topology,
                        node,
                        results_channel: std::sync::Mutex::new(None),
                    });
                }
                Err(reason) if urls.len() == 1 => {
                    return Err(BrokerError::Connect {
                        url: urls.shown(node),
                        reason,
                    })
                }
                Err(reason) => failures.push(format!("{}: {reason}", urls.shown(node))),
            }
        }
        Err(BrokerError::Connect {
            url: format!("any of {} nodes", urls.len()),
            reason: failures.join("; "),
        })
    }

    /// One node: the connection and a confirm-mode channel, or why not (no password in it).
    async fn connect_one(url: &str, timeout: Duration) -> Result<(Connection, Channel), String> {
        if plaintext_off_host(url) {
            tracing::warn!(
                "{} is plain amqp:// to another host: credentials and job messages cross the network unencrypted (private keys do not: they are sealed); use amqps://",
                redact_url(url)
            );
        }
        let opened = async {
            // Named, so an operator (and a test) can tell keyfleet's connections apart in
            // `rabbitmqctl list_connections user_provided_name` and the management UI.
            let props = ConnectionProperties::default()
                .with_connection_name(format!("keyfleet pid {}", std::process::id()).into());
            let conn = Connection::connect(url, props).await?;
            let channel = async {
                let channel = conn.create_channel().await?;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await?;
                Ok::<_, lapin::Error>(channel)
            }
            .await;
            match channel {
                Ok(channel) => Ok((conn, channel)),
                Err(e) => {
                    // The next node is tried next: this connection must not linger open.
                    let _ = conn.close(200, "no channel".into()).await;
                    Err(e)
                }
            }
        };
        tokio::time::timeout(timeout, opened)
            .await
            .map_err(|_| format!("no answer within {} s", timeout.as_secs()))?
            .map_err(|e| e.to_string())
    }

    /// Which of the URLs given to [`Broker::connect_nodes`] this broker is connected to.
    pub fn node(&self) -> usize {
        self.node
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub fn is_connected(&self) -> bool {
        self.conn.status().connected() && self.channel.status().connected()
    }

    /// Declares the durable exchanges, the quorum jobs queue (dead-lettering to the DLX, with a
    /// delivery limit) and the dead-letter queue. Idempotent. Returns how many consumers (workers)
    /// the jobs queue has, as RabbitMQ's answer to its declare counts them: `submit` sizes a
    /// batch's first messages by it ([`crate::job::jobs_per_message::JobsPerMessage::for_workers`]).
    pub async fn declare(&self) -> Result<u32, BrokerError> {
        let t = &self.topology;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let ch = &self.channel;
        for (name, kind) in [
            (t.jobs_exchange(), ExchangeKind::Direct),
            (t.dlx(), ExchangeKind::Fanout),
            (t.results_exchange(), ExchangeKind::Direct),
        ] {
            ch.exchange_declare(name.into(), kind, durable, FieldTable::default())
                .await?;
        }
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), long("quorum"));
        args.insert("x-dead-letter-exchange".into(), long(&t.dlx()));
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(t.delivery_limit as i32),
        );
        let queue_opts = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let jobs = ch
            .queue_declare(t.jobs_queue().into(), queue_opts, args)
            .await?;
        ch.queue_bind(
            t.jobs_queue().into(),
            t.jobs_exchange().into(),
            t.jobs_routing_key().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let mut dead_args = FieldTable::default();
        dead_args.insert("x-queue-type".into(), long("quorum"));
        ch.queue_declare(t.dead_queue().into(), queue_opts, dead_args)
            .await?;
        ch.queue_bind(
            t.dead_queue().into(),
            t.dlx().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        Ok(jobs.consumer_count())
    }

    /// Declares the results queue of a batch, bound to the results exchange by batch id,
    /// expiring when unused so abandoned batches clean up. Idempotent.
    ///
    /// A quorum queue, like the jobs queue: on a cluster it is replicated on (up to) three
    /// nodes, so results a worker has had confirmed — the one copy of each private key — survive
    /// the loss of any one node, as the jobs do. A classic queue lives on one node and is gone
    /// while that node is. What quorum queues lack is no loss here: results queues were never
    /// exclusive or auto-delete (results must wait for a collector that is not running yet, or
    /// that crashed), and `x-expires` works for quorum queues as for classic ones, so an
    /// abandoned batch's queue is still deleted after [`Topology::results_expiry`] unused.
    ///
    /// A results queue that already exists is used as it is: a batch submitted by an older
    /// keyfleet has a classic one, and declaring it again as quorum would fail with
    /// PRECONDITION_FAILED and close the channel. The check runs on a channel of its own, since
    /// RabbitMQ closes the channel a passive declare of a missing queue ran on.
    pub async fn declare_results_queue(&self, batch_id: &str) -> Result<String, BrokerError> {
        let t = &self.topology;
        let name = t.results_queue(batch_id);
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), long("quorum"));
        // A result is the one copy of its key, and collect hands back results it cannot write
        // yet: RabbitMQ 4 drops a quorum queue's message after 20 such returns unless told
        // otherwise. Its "unlimited" (-1) means "drop at once" to RabbitMQ 3, so the limit is
        // set as high as it goes instead.
        args.insert("x-delivery-limit".into(), AMQPValue::LongInt(i32::MAX));
        args.insert(
            "x-expires".into(),
            AMQPValue::LongInt(t.results_expiry.as_millis().min(i32::MAX as u128) as i32),
        );
        // On a channel of its own: a declare RabbitMQ refuses closes the channel it ran on.
        let declaring = self.conn.create_channel().await?;
        let declared = declaring
            .queue_declare(
                name.clone().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await;
        match declared {
            Ok(_) => {
                let _ = declaring.close(200, "declared".into()).await;
            }
            // PRECONDITION_FAILED: the queue exists with other arguments (a classic queue of
            // a batch an older keyfleet submitted). It is used as it is. Asked only in this
            // rare case, since RabbitMQ (and lapin's log) treats a passive declare of a
            // missing queue as an error.
            Err(e) if precondition_failed(&e) => {
                let checking = self.conn.create_channel().await?;
                checking
                    .queue_declare(
                        name.clone().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                let _ = checking.close(200, "checked".into()).await;
            }
            Err(e) => return Err(e.into()),
        }
        self.channel
            .queue_bind(
                name.clone().into(),
                t.results_exchange().into(),
                batch_id.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(name)
    }

    /// Consumes `queue` with manual acks.
    pub async fn consume(&self, queue: &str) -> Result<lapin::Consumer, BrokerError> {
        Ok(self
            .channel
            .basic_consume(
                queue.into(),
                "".into(),
                lapin::options::BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?)
    }

    pub async fn set_prefetch(&self, n: u16) -> Result<(), BrokerError> {
        self.channel
            .basic_qos(n, BasicQosOptions::default())
            .await?;
        Ok(())
    }

    fn properties(message_id: &str, batch_id: &str) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(
            PUBLISHED_MS_HEADER.into(),
            AMQPValue::LongLongInt(crate::registry::now_ms()),
        );
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(message_id.into())
            .with_correlation_id(batch_id.into())
            .with_timestamp(crate::time::unix_now().max(0) as u64)
            .with_headers(headers)
    }

    /// Publishes a job and returns its confirm, so callers can keep many in flight.
    pub async fn publish_job(&self, job: &Job) -> Result<PublisherConfirm, BrokerError> {
        self.publish_jobs(std::slice::from_ref(job)).await
    }

    /// Publishes jobs of one batch as one message ([`crate::job::message`]): v1 for one job,
    /// v2 for several.
    pub async fn publish_jobs(&self, jobs: &[Job]) -> Result<PublisherConfirm, BrokerError> {
        let payload =
            crate::job::message::encode(jobs).map_err(|e| BrokerError::Encode(e.to_string()))?;
        let batch = jobs.first().map_or("", |j| j.batch_id.as_str());
        let id = crate::job::message::message_id(jobs).to_string();
        self.publish_encoded_job(&payload, &id, batch).await
    }

    /// [`Broker::publish_job`] for a job already encoded: the message a job becomes, with its
    /// properties. `keyfleet bench --submit`'s bare publisher sends one payload so.
    pub async fn publish_encoded_job(
        &self,
        payload: &[u8],
        message_id: &str,
        batch_id: &str,
    ) -> Result<PublisherConfirm, BrokerError> {
        let properties = Self::properties(message_id, batch_id);
        self.publish_to_jobs(payload, properties).await
    }

    /// Deletes this topology's queues (the jobs queue, its dead letters and the results
    /// queues of `batches`) and exchanges, with whatever they hold: for a benchmark that
    /// declared a prefix of its own.
    pub async fn remove(&self, batches: &[&str]) -> Result<(), BrokerError> {
        let t = &self.topology;
        let mut queues = vec![t.jobs_queue(), t.dead_queue()];
        queues.extend(batches.iter().map(|b| t.results_queue(b)));
        for q in queues {
            self.channel
                .queue_delete(q.as_str().into(), Default::default())
                .await?;
        }
        for x in [t.jobs_exchange(), t.dlx(), t.results_exchange()] {
            self.channel
                .exchange_delete(x.as_str().into(), Default::default())
                .await?;
        }
        Ok(())
    }

    /// Publishes raw bytes as a job message (other systems' producers; tests) and waits for
    /// the confirm.
    pub async fn publish_raw_job(
        &self,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        let confirm = self.publish_to_jobs(payload, properties).await?;
        check(confirm.await?, &self.topology.jobs_routing_key())
    }

    /// A mandatory publish to the jobs exchange: a job no queue takes comes back unroutable.
    async fn publish_to_jobs(
        &self,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<PublisherConfirm, BrokerError> {
        let t = &self.topology;
        Ok(self
            .channel
            .basic_publish(
                t.jobs_exchange().into(),
                t.jobs_routing_key().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                payload,
                properties,
            )
            .await?)
    }

    /// Publishes a result to its batch's queue and waits for the broker's confirm. The private
    /// key, if any, must already be in the response body: this is its one delivery.
    ///
    /// A result RabbitMQ refuses (nack: not enqueued) is offered again, with backoff, for up
    /// to [`NACK_RETRY_WINDOW`], each time on a fresh channel, which then carries this
    /// broker's later results. A quorum queue refuses publishes while it elects a new leader
    /// after losing a node, and (RabbitMQ 3.10, in `worker/tests/rabbit_node_loss.rs`) a
    /// channel whose publishes were refused then may go on being refused for minutes, while
    /// another channel on the same node publishes to the same queue fine. Handing the job back
    /// at once instead would have it redelivered in a tight loop, every delivery counted against
    /// the jobs queue's `x-delivery-limit`, until it was dead-lettered: the first version of
    /// that test lost 12 of 160 jobs so.
    pub async fn publish_result(&self, result: &JobResult) -> Result<(), BrokerError> {
        let payload = serde_json::to_vec(result).map_err(|e| BrokerError::Encode(e.to_string()))?;
        self.publish_results(&payload, &result.job_id.to_string(), &result.batch_id)
            .await
    }

    /// Publishes an encoded results message (one result, or a v2 group of them; see
    /// [`crate::job::results_message`]) to `batch_id`'s results queue, as
    /// [`Broker::publish_result`] does.
    pub async fn publish_results(
        &self,
        payload: &[u8],
        message_id: &str,
        batch_id: &str,
    ) -> Result<(), BrokerError> {
        let started = std::time::Instant::now();
        let mut delay = Duration::from_millis(100);
        let mut warned = false;
        let mut channel = self
            .results_channel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| self.channel.clone());
        loop {
            let confirm = channel
                .basic_publish(
                    self.topology.results_exchange().into(),
                    batch_id.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    payload,
                    Self::properties(message_id, batch_id),
                )
                .await?;
            match check(confirm.await?, batch_id) {
                Err(BrokerError::Nacked(_)) if started.elapsed() + delay < NACK_RETRY_WINDOW => {
                    if !std::mem::replace(&mut warned, true) {
                        tracing::warn!(message = %message_id, "RabbitMQ refused the result (nack; a quorum queue electing a new leader?); offering it again on a new channel for up to {} s", NACK_RETRY_WINDOW.as_secs());
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                    channel = self.conn.create_channel().await?;
                    channel
                        .confirm_select(ConfirmSelectOptions::default())
                        .await?;
                    *self
                        .results_channel
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(channel.clone());
                }
                done => return done,
            }
        }
    }

    /// Puts a message on the dead-letter queue with the reason in a header, and waits for the
    /// confirm (the caller acks the original only after this).
    pub async fn dead_letter(
        &self,
        payload: &[u8],
        properties: &BasicProperties,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(REASON_HEADER.into(), long(reason));
        let confirm = self
            .channel
            .basic_publish(
                self.topology.dlx().into(),
                "".into(),
                BasicPublishOptions::default(),
                payload,
                properties
                    .clone()
                    .with_headers(headers)
                    .with_delivery_mode(2),
            )
            .await?;
        check(confirm.await?, &self.topology.dlx())
    }

    pub async fn close(&self) {
        let _ = self.channel.close(200, "bye".into()).await;
        let _ = self.conn.close(200, "bye".into()).await;
    }
}

/// A plain `amqp://` URL whose host is not this machine.
fn plaintext_off_host(url: &str) -> bool {
    let Ok(u) = url::Url::parse(url) else {
        return false;
    };
    // `amqp` is not one of the URL standard's special schemes, so its host comes back as an
    // opaque name even when it is an address.
    let loopback = match u.host() {
        Some(url::Host::Domain(d)) => {
            let d = d.trim_start_matches('[').trim_end_matches(']');
            d == "localhost"
                || d.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => true,
    };
    u.scheme() == "amqp" && !loopback
}

/// Waits for a publisher confirm: a mandatory publish that no queue took is `Unroutable`.
pub async fn confirmed(confirm: PublisherConfirm, routing_key: &str) -> Result<(), BrokerError> {
    check(confirm.await?, routing_key)
}

/// How long a message waited between publishing and now: from keyfleet's millisecond header,
/// else from the AMQP timestamp (whole seconds), else unknown.
pub fn queue_wait(properties: &BasicProperties) -> Option<Duration> {
    let published_ms = match properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(PUBLISHED_MS_HEADER).cloned())
    {
        Some(AMQPValue::LongLongInt(ms)) => ms,
        _ => (*properties.timestamp())? as i64 * 1000,
    };
    let waited = crate::registry::now_ms() - published_ms;
    Some(Duration::from_millis(waited.max(0) as u64))
}

/// A mandatory publish that no queue took comes back as `Ack(Some(returned))`: not delivered.
/// The returned copy (which may hold a private key) is dropped here unread and unlogged.
fn check(confirmation: Confirmation, routing_key: &str) -> Result<(), BrokerError> {
    match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_)) => Err(BrokerError::Unroutable(routing_key.to_owned())),
        Confirmation::Nack(_) => Err(BrokerError::Nacked(routing_key.to_owned())),
    }
}

/// Reads a string header.
pub fn header_str(properties: &BasicProperties, name: &str) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The delivery count RabbitMQ's quorum queues keep in `x-delivery-count` (absent on the
/// first delivery).
pub fn delivery_count(properties: &BasicProperties) -> u32 {
    let Some(headers) = properties.headers().as_ref() else {
        return 0;
    };
    match headers.inner().get("x-delivery-count") {
        Some(AMQPValue::LongLongInt(n)) => *n as u32,
        Some(AMQPValue::LongInt(n)) => *n as u32,
        Some(AMQPValue::LongUInt(n)) => *n,
        Some(AMQPValue::ShortInt(n)) => *n as u32,
        Some(AMQPValue::ShortUInt(n)) => *n as u32,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_amqp_off_this_machine_is_noticed() {
        assert!(plaintext_off_host(
            "amqp://guest:guest@rabbit.internal:5672/%2f"
        ));
        assert!(plaintext_off_host("amqp://10.0.0.5"));
        assert!(!plaintext_off_host("amqp://guest:guest@127.0.0.1:5672/%2f"));
        assert!(!plaintext_off_host("amqp://localhost"));
        assert!(!plaintext_off_host("amqps://rabbit.internal"));
    }

    #[test]
    fn names_share_the_prefix() {
        let t = Topology::with_prefix("kf-t1");
        assert_eq!(t.jobs_queue(), "kf-t1.jobs");
        assert_eq!(t.dead_queue(), "kf-t1.jobs.dead");
        assert_eq!(t.results_queue("b1"), "kf-t1.results.b1");
    }
}
