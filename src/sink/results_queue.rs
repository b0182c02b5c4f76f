//! The worker's sink: a result is published to its batch's results queue with a publisher
//! confirm, its private key encrypted to the batch's recipient (`transit.rs`), and the batch's
//! progress is counted in Redis once the job is settled.

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{DeliveryError, Sink};
use crate::job::{set_private_key_body, take_private_key_body, JobResult};
use crate::queue::broker::{Broker, BrokerError};
use crate::registry::batch_status::BatchStatusStore;
use crate::registry::RegistryError;
use crate::sink::transit;
use zeroize::Zeroizing;

pub struct ResultsQueue<'a> {
    broker: &'a Broker,
    status: &'a BatchStatusStore,
    /// Send the PEM as it is when the batch has no recipient (jobs from producers other than
    /// `keyfleet submit`); otherwise such a job is refused.
    allow_plaintext: bool,
    recipients: Option<&'a Recipients>,
    /// Cancelled when the channel the job came on closed (see [`Sink::gone`]).
    channel_closed: Option<&'a CancellationToken>,
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

    /// What goes into `PrivateKeyBody`: the key sealed to the batch's recipient.
    async fn body(&self, batch_id: &str, pem: &str) -> Result<Zeroizing<String>, DeliveryError> {
        let seal = |r: &transit::Recipient| {
            transit::seal(r, pem)
                .map(Zeroizing::new)
                .map_err(|e| DeliveryError::Undeliverable(e.to_string()))
        };
        if let Some(r) = self.recipients.and_then(|c| c.get(batch_id)) {
            return seal(&r);
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
                seal(&r)
            }
            None if self.allow_plaintext => Ok(Zeroizing::new(pem.to_owned())),
            None => Err(DeliveryError::Undeliverable(format!(
                "batch {:?} has no recipient for its private keys in Redis, so its keys cannot \
                 be sent encrypted (submit batches with `keyfleet submit`, or run the worker with \
                 --allow-plaintext-results)",
                crate::dialect::clip(batch_id)
            ))),
        }
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
        if let Some(pem) = result.take_private_key() {
            let body = self.body(&result.batch_id, &pem.0).await?;
            set_private_key_body(result.provider, &mut result.response, &body);
        }
        let published = self.broker.publish_result(result).await;
        // Whatever happened, the key leaves this process at most once: drop (zeroize) the copy
        // in the response body now.
        drop(take_private_key_body(result.provider, &mut result.response));
        match published {
            Ok(()) => Ok(()),
            Err(e @ BrokerError::Unroutable(_)) => Err(DeliveryError::Undeliverable(e.to_string())),
            Err(e) => Err(DeliveryError::Unconfirmed(crate::sink::error_chain(&e))),
        }
    }

    async fn settled(
        &self,
        batch_id: &str,
        job_id: Uuid,
        outcome: &str,
    ) -> Result<(), RegistryError> {
        self.status
            .record(batch_id, job_id, outcome)
            .await
            .map(|_| ())
    }
}
