//! Where and how created keys are registered upstream: the plain settings the command line
//! and the config file resolve into (`cli::config::UpstreamArgs::resolve`).

use std::path::PathBuf;
use std::time::Duration;

use crate::dialect::Provider;
use crate::upstream::http::{AliyunSigning, Endpoint};

/// The upstream a mode registers keys with. No endpoint: keyfleet's registry is the cloud.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Every provider's endpoint: the ones named, then the public ones asked for.
    pub endpoints: Vec<(Provider, Endpoint)>,
    /// Upstream keys per owner, in `keyfleet serve`'s credentials format; owners it does not
    /// name use the environment's keys.
    pub credentials: Option<PathBuf>,
    /// How Alibaba requests are signed.
    pub signing: AliyunSigning,
    /// How long one key's registration may keep retrying through throttling and faults.
    pub deadline: Duration,
}

impl Settings {
    /// Whether keys go to a cloud at all.
    pub fn is_remote(&self) -> bool {
        !self.endpoints.is_empty()
    }
}
