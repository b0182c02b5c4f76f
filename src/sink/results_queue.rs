//! The worker's sink: a result is published to its batch's results queue with a publisher
//! confirm, and the batch's progress is counted in Redis once the job is settled.

use uuid::Uuid;

use super::{DeliveryError, Sink};
use crate::batch_status::BatchStatusStore;
use crate::broker::{Broker, BrokerError};
use crate::job::{set_private_key_body, take_private_key_body, JobResult};
use crate::registry::RegistryError;

pub struct ResultsQueue<'a> {
    broker: &'a Broker,
    status: &'a BatchStatusStore,
}

impl<'a> ResultsQueue<'a> {
    pub fn new(broker: &'a Broker, status: &'a BatchStatusStore) -> Self {
        ResultsQueue { broker, status }
    }
}

impl Sink for ResultsQueue<'_> {
    const ANSWERS_REPEATED_JOBS: bool = false;

    async fn deliver(&self, result: &mut JobResult) -> Result<(), DeliveryError> {
        if let Some(pem) = result.take_private_key() {
            set_private_key_body(result.provider, &mut result.response, &pem.0);
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
