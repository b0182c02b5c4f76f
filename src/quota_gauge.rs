//! The `keyfleet_quota_used` gauge, kept current off the jobs' path. A job that creates a pair
//! only notes its scope here; one task per lifecycle reads the noted scopes' counts from the
//! registry at most every [`GATHER`] and sets the gauge. Before, every created key read its
//! scope's count right after its commit: a Redis round trip a key in the worker, and a trip
//! to the state file's writer thread a create in `serve` — thousands a second for a gauge
//! that Prometheus reads every few seconds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::dialect::Scope;
use crate::registry::Registry;

/// How long scopes noted after a refresh gather before the next: a gauge at most this stale
/// while keys are being made, and at most this many reads a second per scope.
pub const GATHER: Duration = Duration::from_millis(100);

/// What the jobs have noted since the last refresh.
#[derive(Default)]
struct Noted {
    /// Scope → the quota enforced there (`keyfleet_quota_limit`).
    scopes: Mutex<HashMap<Scope, u64>>,
    wake: Notify,
}

/// The jobs' side: cheap to clone (lifecycles are cloned per job); when the last clone goes,
/// the refreshing task ends.
#[derive(Clone)]
pub struct QuotaGauge {
    inner: Arc<Handle>,
}

struct Handle {
    noted: Arc<Noted>,
    /// Set when the last [`QuotaGauge`] is dropped, so the task stops.
    closed: CancellationToken,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

impl QuotaGauge {
    /// Starts the refreshing task on the current Tokio runtime when metrics are exported
    /// (else nothing is ever read). The task holds the registry weakly, so it never keeps a
    /// registry open (the state file commits at close); it ends at `shutdown`, when the last
    /// handle is dropped, or when the registry is gone.
    pub fn start<R: Registry>(registry: &Arc<R>, shutdown: &CancellationToken) -> Self {
        let gauge = QuotaGauge {
            inner: Arc::new(Handle {
                noted: Arc::new(Noted::default()),
                closed: shutdown.child_token(),
            }),
        };
        if let (true, Ok(runtime)) = (
            crate::telemetry::metrics::installed(),
            tokio::runtime::Handle::try_current(),
        ) {
            let noted = gauge.inner.noted.clone();
            let closed = gauge.inner.closed.clone();
            runtime.spawn(refresh(Arc::downgrade(registry), noted, closed));
        } else {
            // Nobody reads the gauge (or there is no runtime to read it on): noting is skipped.
            gauge.inner.closed.cancel();
        }
        gauge
    }

    /// A pair was created (or deleted) in `scope`, whose quota is `limit`: its count is read
    /// again with the next refresh. Only the first scope noted after a refresh wakes the task.
    pub fn changed(&self, scope: &Scope, limit: u64) {
        if self.inner.closed.is_cancelled() {
            return;
        }
        let noted = &self.inner.noted;
        let first = {
            let mut scopes = noted.scopes.lock().unwrap_or_else(PoisonError::into_inner);
            let first = scopes.is_empty();
            if !scopes.contains_key(scope) {
                scopes.insert(scope.clone(), limit);
            }
            first
        };
        if first {
            noted.wake.notify_one();
        }
    }
}

async fn refresh<R: Registry>(registry: Weak<R>, noted: Arc<Noted>, closed: CancellationToken) {
    loop {
        tokio::select! {
            _ = closed.cancelled() => return,
            _ = noted.wake.notified() => {}
        }
        tokio::select! {
            _ = closed.cancelled() => return,
            _ = tokio::time::sleep(GATHER) => {}
        }
        let scopes =
            std::mem::take(&mut *noted.scopes.lock().unwrap_or_else(PoisonError::into_inner));
        let Some(registry) = registry.upgrade() else {
            return;
        };
        for (scope, limit) in scopes {
            // Raced with the end, so a lifecycle that is gone is not kept open by a slow read.
            // A failed read leaves the gauge as it was; the next create in the scope reads again.
            let used = tokio::select! {
                _ = closed.cancelled() => return,
                used = registry.quota_used(&scope) => used,
            };
            if let Ok(used) = used {
                crate::telemetry::metrics::quota_used(
                    scope.provider.as_str(),
                    &scope.owner,
                    &scope.region,
                    used,
                    limit,
                );
            }
        }
    }
}
