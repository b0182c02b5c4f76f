//! The upstream seam itself: one key to register, what the cloud says back, the trait every
//! upstream implements, and the local upstream (keyfleet's registry is the cloud).

use std::future::Future;

use uuid::Uuid;

use crate::dialect::{ApiError, CreateRequest};

/// One key to register.
#[derive(Clone, Copy, Debug)]
pub struct Registration<'a> {
    pub req: &'a CreateRequest,
    pub job_id: Uuid,
    /// `ssh-rsa AAAA…`
    pub public_key: &'a str,
    /// `aa:bb:…`
    pub fingerprint_md5: &'a str,
    /// Public keys earlier attempts of this job tried to register and never delivered: a key
    /// under this name in the cloud that is one of these is keyfleet's own, with its private
    /// half lost, and may be replaced.
    pub tried: &'a [String],
}

/// What the cloud says about the registered pair.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Registered {
    /// The cloud's `KeyPairId`, when it gives one (then it is the id in the result and in the
    /// UCloud fingerprint); `None` lets keyfleet mint one.
    pub key_pair_id: Option<String>,
}

pub trait Upstream: Send + Sync + 'static {
    /// Whether keys go to a cloud outside keyfleet: then each attempt's key is noted on the
    /// reservation before the call ([`crate::registry::Registry::note_key`]).
    fn is_remote(&self) -> bool {
        false
    }

    /// Registers the key for `reg.req`. An error is the cloud's answer for this request (or
    /// keyfleet's internal error after its retries).
    fn register(
        &self,
        reg: &Registration<'_>,
    ) -> impl Future<Output = Result<Registered, ApiError>> + Send;
}

/// The registry commit is the registration: accept every key.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalUpstream;

impl Upstream for LocalUpstream {
    async fn register(&self, _reg: &Registration<'_>) -> Result<Registered, ApiError> {
        Ok(Registered::default())
    }
}
