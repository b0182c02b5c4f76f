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
pub mod seam;
pub mod settings;

pub use seam::{LocalUpstream, Registered, Registration, Upstream};

use std::sync::Arc;

use crate::credentials::{Credentials, CredentialsError};
use crate::dialect::ApiError;
use crate::registry::connection::RedisConn;
use crate::upstream::http::UpstreamConfigError;
use crate::upstream::rate_limit::{RateLimit, RateLimited};
use crate::upstream::settings::Settings;

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

impl Configured {
    /// Makes the cloud's rate limit one budget for every process on the Redis behind `conn`
    /// (see [`RateLimit::share`]). Only in front of a cloud: without one there is no cloud to
    /// protect, and the local limit stays this process's, with no Redis call per key.
    pub fn share_rate_limit(&self, conn: RedisConn, prefix: &str) {
        if let Configured::Http(h) = self {
            if let Some(limit) = h.rate_limit() {
                limit.share(conn, prefix);
            }
        }
    }

    /// The cloud at `--upstream-endpoint`, for the commands that talk to it directly
    /// (`reconcile`, `delete`); `None` when no endpoint is configured.
    pub fn cloud(settings: &Settings) -> Result<Option<http::HttpUpstream>, BuildError> {
        if !settings.is_remote() {
            return Ok(None);
        }
        match Configured::build(settings, None)? {
            Configured::Http(h) => Ok(Some(h)),
            Configured::Local(_) => Ok(None),
        }
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
