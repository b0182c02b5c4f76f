//! The answer to one API request (`keyfleet serve`): the private key goes into the HTTP
//! response of the request that asked for it, and nowhere else. Delivery is handing the key to
//! the request's handler, which cannot fail. On the state file the pair is committed delivered
//! (synced) before the key is made available, and no separate delivered mark follows; on Redis,
//! where a failed commit may have happened, it is committed undelivered and marked after. Either
//! way an answered create is committed.

use std::sync::Mutex;

use uuid::Uuid;

use super::{DeliveryError, Sink};
use crate::job::{JobResult, SecretPem};
use crate::registry::RegistryError;

/// One request's sink: holds its private key until the handler renders the answer.
#[derive(Debug, Default)]
pub struct HttpReply {
    key: Mutex<Option<SecretPem>>,
}

impl HttpReply {
    pub fn new() -> Self {
        HttpReply::default()
    }

    /// The delivered private key, once.
    pub fn take_key(&self) -> Option<SecretPem> {
        self.key.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl Sink for HttpReply {
    // Each request is its own job: it never comes back.
    const ANSWERS_REPEATED_JOBS: bool = true;
    const DELIVERED_AT_COMMIT: bool = true;

    // Never fails: see `DELIVERED_AT_COMMIT`.
    async fn deliver(&self, result: &mut JobResult) -> Result<(), DeliveryError> {
        if let Some(key) = result.take_private_key() {
            *self.key.lock().unwrap_or_else(|e| e.into_inner()) = Some(key);
        }
        Ok(())
    }

    async fn settled(&self, _: &str, _: Uuid, _: &str) -> Result<(), RegistryError> {
        Ok(())
    }
}
