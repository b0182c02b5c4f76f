//! The worker's sink: a result is published to its batch's results queue with a publisher
//! confirm, its private key encrypted to the batch's recipient (`transit.rs`), and the batch's
//! progress is counted in Redis once the job is settled.

use uuid::Uuid;

use super::{DeliveryError, Sink};
use crate::batch_status::BatchStatusStore;
use crate::broker::{Broker, BrokerError};
use crate::job::{set_private_key_body, take_private_key_body, JobResult};
use crate::registry::RegistryError;
use crate::transit;
use zeroize::Zeroizing;

pub struct ResultsQueue<'a> {
    broker: &'a Broker,
    status: &'a BatchStatusStore,
    /// Send the PEM as it is when the batch has no recipient (jobs from producers other than
    /// `keyfleet submit`); otherwise such a job is refused.
    allow_plaintext: bool,
}

impl<'a> ResultsQueue<'a> {
    pub fn new(broker: &'a Broker, status: &'a BatchStatusStore) -> Self {
        ResultsQueue {
            broker,
            status,
            allow_plaintext: false,
        }
    }

    pub fn allow_plaintext(mut self, allow: bool) -> Self {
        self.allow_plaintext = allow;
        self
    }

    /// What goes into `PrivateKeyBody`: the key sealed to the batch's recipient.
    async fn body(&self, batch_id: &str, pem: &str) -> Result<Zeroizing<String>, DeliveryError> {
        let recipient = self.status.recipient(batch_id).await.map_err(|e| {
            DeliveryError::Unconfirmed(format!("reading the batch's recipient: {e}"))
        })?;
        match recipient {
            Some(r) => transit::parse_recipient(&r)
                .and_then(|r| transit::seal(&r, pem))
                .map(Zeroizing::new)
                .map_err(|e| DeliveryError::Undeliverable(e.to_string())),
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
            Err(e) => Err(DeliveryError::Unconfirmed(e.to_string())),
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
