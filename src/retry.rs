//! The one retry policy of keyfleet: failures of its own machinery (the registry's storage, the
//! key-generation pool, the broker) and the cloud's throttling and lost answers (the upstream)
//! are retried with capped exponential backoff and jitter (backon) until an attempt budget, a
//! time window or a deadline is used up, or shutdown is signalled. Errors that are answers
//! (quota, name taken, a cloud's refusal) are never retried.

use std::future::Future;
use std::time::{Duration, Instant};

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
    /// No wait may end after this; `None` = no deadline. Unlike `window` it is a point in time,
    /// so several runs can share it (one key's registration: import, look-up, delete).
    pub deadline: Option<Instant>,
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
            deadline: None,
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
            deadline: None,
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
            deadline: None,
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
            give_up: GiveUp::HandBack,
        }
    }

    /// Calls to the upstream cloud: 100 ms doubling to 3 s, up to the key's registration
    /// `deadline`; what is left after it is the row's answer (an internal error).
    pub fn upstream(deadline: Instant) -> Self {
        RetryPolicy {
            retries: None,
            window: None,
            deadline: Some(deadline),
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(3),
            give_up: GiveUp::Answer,
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
    /// Each wait is at least what the error asks for ([`Transient::retry_after`]): a server
    /// that names its back-off knows its load better than our exponent does.
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
            .adjust(|e: &E, pause: Option<Duration>| {
                let pause = pause?.max(e.retry_after().unwrap_or_default());
                self.deadline
                    .is_none_or(|d| Instant::now() + pause <= d)
                    .then_some(pause)
            })
            .notify(|e: &E, after: Duration| {
                tracing::warn!("{what}: {e}; retrying in {} ms", after.as_millis());
            })
            .await
    }
}

/// Whether an error may pass if the same thing is tried again.
pub trait Transient {
    fn is_transient(&self) -> bool;

    /// How long the other side asked us to wait before trying again, if it said.
    fn retry_after(&self) -> Option<Duration> {
        None
    }
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
        matches!(self, E::Storage(_) | E::ReplicasBehind { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A transient error that may name its own wait.
    #[derive(Debug, thiserror::Error)]
    #[error("busy")]
    struct Busy(Option<Duration>);

    impl Transient for Busy {
        fn is_transient(&self) -> bool {
            true
        }

        fn retry_after(&self) -> Option<Duration> {
            self.0
        }
    }

    /// Tries until a failure, counting them, against a deadline `ms` from now.
    async fn tries_within(ms: u64, err: fn() -> Busy) -> usize {
        let tries = AtomicUsize::new(0);
        let deadline = Instant::now() + Duration::from_millis(ms);
        let op = || async {
            tries.fetch_add(1, Ordering::Relaxed);
            Err::<(), _>(err())
        };
        let r = RetryPolicy::upstream(deadline)
            .run("test", &CancellationToken::new(), op)
            .await;
        assert!(r.is_err());
        tries.into_inner()
    }

    #[tokio::test]
    async fn no_wait_ends_past_the_deadline() {
        // Waits of 100–200 ms, then 200–400 ms: the second try fits in 250 ms, a third never.
        assert_eq!(tries_within(250, || Busy(None)).await, 2);
        // The error's own wait counts: 400 ms does not fit.
        assert_eq!(
            tries_within(250, || Busy(Some(Duration::from_millis(400)))).await,
            1
        );
    }
}
