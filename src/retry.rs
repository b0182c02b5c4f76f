//! The one retry policy of the job lifecycle: failures of keyfleet's own machinery (the
//! registry's storage, the key-generation pool) are retried with capped exponential backoff and
//! jitter (backon) until an attempt budget or a time window is used up, or shutdown is
//! signalled. Errors that are answers (quota, name taken, a cloud's refusal) are never retried.

use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio_util::sync::CancellationToken;

/// What a mode does with a job whose retries are used up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GiveUp {
    /// Answer the job with an internal error (`keyfleet run`: there is nobody to hand it to).
    Answer,
    /// Hand the job back to its queue, so the broker's delivery limit decides (the worker).
    HandBack,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries after the first; `None` = as many as fit in `window`.
    pub retries: Option<usize>,
    /// Total time spent waiting between tries, at most; `None` = no limit.
    pub window: Option<Duration>,
    pub min_delay: Duration,
    pub max_delay: Duration,
    pub give_up: GiveUp,
}

impl RetryPolicy {
    /// `keyfleet run`: the embedded store either works or the disk is in trouble, so three tries
    /// in all and then the row is answered with an internal error.
    pub fn embedded() -> Self {
        RetryPolicy {
            retries: Some(2),
            window: Some(Duration::from_secs(5)),
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            give_up: GiveUp::Answer,
        }
    }

    /// Queue modes: long enough to ride out a Redis restart while the job's message is held (so
    /// a restart does not burn the delivery limit); then the job is handed back.
    pub fn queue() -> Self {
        RetryPolicy {
            retries: None,
            window: Some(Duration::from_secs(120)),
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(3),
            give_up: GiveUp::HandBack,
        }
    }

    /// A lost connection to a server: tried again and again (200 ms doubling to 5 s) until it
    /// is back or shutdown is signalled.
    pub fn reconnect() -> Self {
        RetryPolicy {
            retries: None,
            window: None,
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
            give_up: GiveUp::HandBack,
        }
    }

    fn backoff(&self) -> ExponentialBuilder {
        let b = ExponentialBuilder::new()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0)
            .with_jitter()
            .with_total_delay(self.window);
        match self.retries {
            Some(n) => b.with_max_times(n),
            None => b.without_max_times(),
        }
    }

    /// Runs `op` until it succeeds, fails with an error that is not [`Transient`], or the
    /// policy gives up; then the last error. An attempt in flight is never cut short: a
    /// shutdown signal only ends the wait between attempts, after which one last attempt runs
    /// (a caller that sees a transient error and a cancelled token hands its job back).
    pub async fn run<T, E, F, Fut>(
        &self,
        what: &str,
        shutdown: &CancellationToken,
        op: F,
    ) -> Result<T, E>
    where
        E: Transient + std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let token = shutdown.clone();
        op.retry(self.backoff())
            .sleep(move |pause: Duration| {
                let shutdown = token.clone();
                async move {
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = shutdown.cancelled() => {}
                    }
                }
            })
            .when(|e: &E| e.is_transient() && !shutdown.is_cancelled())
            .notify(|e: &E, after: Duration| {
                tracing::warn!("{what}: {e}; retrying in {} ms", after.as_millis());
            })
            .await
    }
}

/// Whether an error may pass if the same thing is tried again.
pub trait Transient {
    fn is_transient(&self) -> bool;
}

impl Transient for crate::queue::broker::BrokerError {
    /// A broker that refuses or is away may be back: everything is worth another try.
    fn is_transient(&self) -> bool {
        true
    }
}

impl Transient for crate::registry::RegistryError {
    fn is_transient(&self) -> bool {
        use crate::registry::RegistryError as E;
        matches!(self, E::Storage(_))
    }
}
