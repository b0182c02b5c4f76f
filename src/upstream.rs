//! The upstream seam: where a created public key is registered with a cloud. Until an HTTP
//! cloud endpoint exists, keyfleet's registry *is* the cloud, so the local upstream
//! has nothing further to call; the trait is where a real endpoint and its rate limit plug in.

use std::future::Future;

use crate::dialect::{ApiError, CreateRequest};

pub trait Upstream: Send + Sync + 'static {
    /// Registers `public_key` for `req`. An error is the cloud's answer for this request.
    fn register(
        &self,
        req: &CreateRequest,
        public_key: &str,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;
}

/// The registry commit is the registration: accept every key.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalUpstream;

impl Upstream for LocalUpstream {
    async fn register(&self, _req: &CreateRequest, _public_key: &str) -> Result<(), ApiError> {
        Ok(())
    }
}
