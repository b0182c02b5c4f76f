//! The upstream seam: where a created public key is registered with a cloud.
//!
//! - [`LocalUpstream`] (the default, no servers, no credentials): keyfleet's registry *is* the
//!   cloud, so there is nothing further to call.
//! - [`http::HttpUpstream`]: imports the public key into the cloud account (`ImportKeyPair` /
//!   `ImportUHostKeyPairs`), signed as the official SDKs sign, retried through throttling and
//!   lost answers, exactly once (see its module docs).
//!
//! `rate_limit.rs` wraps either with the per provider + account + region limit.

pub mod client;
pub mod http;
pub mod rate_limit;
pub mod settings;

use std::future::Future;
use std::sync::Arc;

use uuid::Uuid;

use crate::credentials::{Credentials, CredentialsError};
use crate::dialect::{ApiError, CreateRequest};
use crate::upstream::http::UpstreamConfigError;
use crate::upstream::rate_limit::{RateLimit, RateLimited};
use crate::upstream::settings::Settings;

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

/// The upstream a command runs with: the local one (rate-limited as configured), or the cloud
/// at `--upstream-endpoint`.
// Built once per process and kept behind an Arc: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Configured {
    Local(RateLimited<LocalUpstream>),
    Http(http::HttpUpstream),
}

impl Configured {
    /// keyfleet's registry only, no rate limit.
    pub fn local() -> Configured {
        Configured::Local(RateLimited::new(LocalUpstream, None))
    }

    /// From resolved settings; the environment's `ALIBABA_CLOUD_*` / `UCLOUD_*` keys are read
    /// here. An error says which setting is wrong.
    pub fn build(
        settings: &Settings,
        limit: Option<Arc<RateLimit>>,
    ) -> Result<Configured, BuildError> {
        if !settings.is_remote() {
            return Ok(Configured::Local(RateLimited::new(LocalUpstream, limit)));
        }
        let credentials = match &settings.credentials {
            Some(path) => Some(Credentials::load(path)?),
            None => None,
        };
        let config = http::UpstreamConfig {
            endpoints: settings.endpoints.clone(),
            credentials,
            signing: settings.signing,
            deadline: settings.deadline,
        };
        Ok(Configured::Http(http::HttpUpstream::new(
            config,
            |k| std::env::var(k).ok(),
            limit,
        )?))
    }
}

/// Why an upstream could not be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error(transparent)]
    Config(#[from] UpstreamConfigError),
}

impl Upstream for Configured {
    fn is_remote(&self) -> bool {
        match self {
            Configured::Local(u) => u.is_remote(),
            Configured::Http(u) => u.is_remote(),
        }
    }

    async fn register(&self, reg: &Registration<'_>) -> Result<Registered, ApiError> {
        match self {
            Configured::Local(u) => u.register(reg).await,
            Configured::Http(u) => u.register(reg).await,
        }
    }
}
