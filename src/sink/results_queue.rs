//! The worker's sink: a result is published to its batch's results queue with a publisher
//! confirm, its private key encrypted to the batch's recipient (`transit.rs`), and the batch's
//! progress is counted in Redis once the job is settled. The jobs of a v2 job message publish
//! their results together, as one v2 results message (`result_group.rs`), and their progress
//! is counted together at the end of the message.

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::result_group::{Pending, Publisher, ResultGroup};
use super::{DeliveryError, Sink};
use crate::job::results_message::{encode_group, pack_keys};
use crate::job::{set_private_key_body, take_private_key_body, JobResult};
use crate::queue::broker::{Broker, BrokerError};
use crate::registry::batch_status::BatchStatusStore;
use crate::registry::RegistryError;
use crate::sink::transit;
use zeroize::Zeroizing;

#[derive(Clone)]
pub struct ResultsQueue<'a> {
    broker: &'a Broker,
    status: &'a BatchStatusStore,
    /// Send the PEM as it is when the batch has no recipient (jobs from producers other than
    /// `keyfleet submit`); otherwise such a job is refused.
    allow_plaintext: bool,
    recipients: Option<&'a Recipients>,
    /// Cancelled when the channel the job came on closed (see [`Sink::gone`]).
    channel_closed: Option<&'a CancellationToken>,
    /// The job's message and its slot in it, when its results go out together.
    group: Option<(&'a ResultGroup, usize)>,
}

/// Batches' recipients already read from Redis: a batch's recipient is set once, before its
/// first job, so a worker reads it once per batch rather than once per key. Only recipients
/// found are kept (a batch without one may get one later), and the map is emptied when it
/// grows past a few thousand batches.
#[derive(Default)]
pub struct Recipients(std::sync::Mutex<std::collections::HashMap<String, transit::Recipient>>);

impl Recipients {
    const MAX: usize = 4096;

    fn get(&self, batch_id: &str) -> Option<transit::Recipient> {
        let map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(batch_id).cloned()
    }

    fn put(&self, batch_id: &str, recipient: &transit::Recipient) {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= Self::MAX {
            map.clear();
        }
        map.insert(batch_id.to_owned(), recipient.clone());
    }
}

impl<'a> ResultsQueue<'a> {
    pub fn new(broker: &'a Broker, status: &'a BatchStatusStore) -> Self {
        ResultsQueue {
            broker,
            status,
            allow_plaintext: false,
            recipients: None,
            channel_closed: None,
            group: None,
        }
    }

    /// The sink of the job in `slot` of `group`: its result is published with the others of
    /// its message.
    pub fn in_group(&self, group: &'a ResultGroup, slot: usize) -> Self {
        ResultsQueue {
            group: Some((group, slot)),
            ..self.clone()
        }
    }

    /// The job came on a channel that `closed` reports closed: once it is, the job is
    /// abandoned before its answer goes out.
    pub fn channel(mut self, closed: &'a CancellationToken) -> Self {
        self.channel_closed = Some(closed);
        self
    }

    /// Remembers batches' recipients in `recipients` (shared by a worker's jobs).
    pub fn recipients(mut self, recipients: &'a Recipients) -> Self {
        self.recipients = Some(recipients);
        self
    }

    pub fn allow_plaintext(mut self, allow: bool) -> Self {
        self.allow_plaintext = allow;
        self
    }

    /// Whom the batch's keys are sealed to: its recipient, or `None` when it has none and
    /// plaintext is allowed.
    async fn sealer(&self, batch_id: &str) -> Result<Option<transit::Recipient>, DeliveryError> {
        if let Some(r) = self.recipients.and_then(|c| c.get(batch_id)) {
            return Ok(Some(r));
        }
        let recipient = self.status.recipient(batch_id).await.map_err(|e| {
            DeliveryError::Unconfirmed(format!("reading the batch's recipient: {e}"))
        })?;
        match recipient {
            Some(r) => {
                let r = transit::parse_recipient(&r)
                    .map_err(|e| DeliveryError::Undeliverable(e.to_string()))?;
                if let Some(c) = self.recipients {
                    c.put(batch_id, &r);
                }
                Ok(Some(r))
            }
            None if self.allow_plaintext => Ok(None),
            None => Err(DeliveryError::Undeliverable(format!(
                "batch {:?} has no recipient for its private keys in Redis, so its keys cannot \
                 be sent encrypted (submit batches with `keyfleet submit`, or run the worker with \
                 --allow-plaintext-results)",
                crate::dialect::clip(batch_id)
            ))),
        }
    }

    /// What goes into `PrivateKeyBody`: the key sealed to the batch's recipient.
    async fn body(&self, batch_id: &str, pem: &str) -> Result<Zeroizing<String>, DeliveryError> {
        match self.sealer(batch_id).await? {
            Some(r) => transit::seal(&r, pem)
                .map(Zeroizing::new)
                .map_err(|e| DeliveryError::Undeliverable(e.to_string())),
            None => Ok(Zeroizing::new(pem.to_owned())),
        }
    }

    /// The job of this sink's group slot has ended: if it was the last one running and left
    /// no result, the others' results are published now.
    pub async fn left(&self) {
        if let Some((group, slot)) = self.group {
            if let Some(publisher) = group.leave(slot) {
                // The waiting jobs get the outcome; this one has its ending already.
                let _ = self.publish(group, publisher).await;
            }
        }
    }

    /// Publishes a group's results and tells its waiting jobs the outcome.
    async fn publish(
        &self,
        group: &ResultGroup,
        mut publisher: Publisher<'_>,
    ) -> Result<(), DeliveryError> {
        let pending = std::mem::take(&mut publisher.pending);
        let outcome = self.publish_group(group.batch_id(), pending).await;
        publisher.finish(outcome.clone());
        outcome
    }

    /// Publishes the results a message's jobs left ([`ResultGroup`]) as one v2 results
    /// message, their keys sealed together; the keys are dropped (zeroized) whatever happens.
    async fn publish_group(&self, batch: &str, pending: Vec<Pending>) -> Result<(), DeliveryError> {
        let Some(first) = pending.first() else {
            return Ok(());
        };
        let message_id = first.job_id.to_string();
        let keys: Vec<Option<&str>> = pending
            .iter()
            .map(|p| p.key.as_ref().map(|k| k.0.as_str()))
            .collect();
        let blob = if keys.iter().any(Option::is_some) {
            let packed = pack_keys(&keys);
            match self.sealer(batch).await? {
                Some(r) => Zeroizing::new(
                    transit::seal_bytes(&r, &packed)
                        .map_err(|e| DeliveryError::Undeliverable(e.to_string()))?,
                ),
                None => Zeroizing::new(
                    String::from_utf8(packed.to_vec())
                        .map_err(|e| DeliveryError::Undeliverable(e.to_string()))?,
                ),
            }
        } else {
            Zeroizing::new(String::new())
        };
        drop(keys);
        let encoded: Vec<_> = pending.into_iter().map(|p| p.encoded).collect();
        let payload = Zeroizing::new(
            encode_group(batch, &encoded, &blob)
                .map_err(|e| DeliveryError::Undeliverable(format!("encoding results: {e}")))?,
        );
        drop(blob);
        self.broker
            .publish_results(&payload, &message_id, batch)
            .await
            .map_err(undelivered)
    }
}

impl Sink for ResultsQueue<'_> {
    const ANSWERS_REPEATED_JOBS: bool = false;

    async fn gone(&self) {
        match self.channel_closed {
            Some(closed) => closed.cancelled().await,
            None => std::future::pending().await,
        }
    }

    async fn deliver(&self, result: &mut JobResult) -> Result<(), DeliveryError> {
        if let Some((group, slot)) = self.group {
            let pending = Pending {
                job_id: result.job_id,
                key: result.take_private_key(),
                encoded: serde_json::value::to_raw_value(result)
                    .map_err(|e| DeliveryError::Undeliverable(format!("encoding a result: {e}")))?,
            };
            return match group.put(slot, pending)? {
                Some(publisher) => self.publish(group, publisher).await,
                None => group.outcome().await,
            };
        }
        if let Some(pem) = result.take_private_key() {
            let body = self.body(&result.batch_id, &pem.0).await?;
            set_private_key_body(result.provider, &mut result.response, &body);
        }
        let published = self.broker.publish_result(result).await;
        // Whatever happened, the key leaves this process at most once: drop (zeroize) the copy
        // in the response body now.
        drop(take_private_key_body(result.provider, &mut result.response));
        published.map_err(undelivered)
    }

    async fn settled(
        &self,
        batch_id: &str,
        job_id: Uuid,
        outcome: &str,
    ) -> Result<(), RegistryError> {
        // A job of a group is counted with the others at the end of its message, in one
        // script call (the worker's `run_jobs`, through the lifecycle's `settle_many`), still
        // before the message is acked.
        if let Some((group, _)) = self.group {
            group.settled(job_id, outcome);
            return Ok(());
        }
        self.status
            .record(batch_id, job_id, outcome)
            .await
            .map(|_| ())
    }

    async fn settled_many(
        &self,
        batch_id: &str,
        outcomes: &[(Uuid, &str)],
    ) -> Result<(), RegistryError> {
        self.status
            .record_many(batch_id, outcomes)
            .await
            .map(|_| ())
    }
}

/// What a failed publish of results means for their jobs: no queue takes the batch's results
/// (unroutable), or the broker did not confirm them.
fn undelivered(e: BrokerError) -> DeliveryError {
    match e {
        e @ BrokerError::Unroutable(_) => DeliveryError::Undeliverable(e.to_string()),
        e => DeliveryError::Unconfirmed(crate::sink::error_chain(&e)),
    }
}
