//! Upstream rate limiting: one token bucket per provider + account + region, because that is
//! how the clouds throttle their key-pair APIs (per account, per regional endpoint).
//! [`RateLimited`] wraps the local upstream; the HTTP upstream takes a token before every call
//! it makes to the cloud (imports, and the describes and deletes that reconcile).
//!
//! In one process the bucket is governor's. Processes that share a Redis (the workers, `serve`
//! in front of a cloud) share one bucket per scope there as well ([`RateLimit::share`]):
//! `--upstream-rps` is then the fleet's total. governor stays in front, so a process never
//! asks Redis more often than the rate itself, and an idle fleet costs no Redis calls. If
//! Redis cannot answer, the call waits and asks again: the limit fails closed, never open.

use std::num::NonZeroU32;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::dialect::{ApiError, CreateRequest};
use crate::registry::connection::RedisConn;
use crate::upstream::seam::{Registered, Registration, Upstream};

static FLEET_RATE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("fleet_rate.lua")));

/// A keyed limiter: `rps` calls per second per provider + account + region, bursts up to
/// `burst`; once [`RateLimit::share`]d, for every process on one Redis together.
pub struct RateLimit<C: Clock = DefaultClock> {
    limiter: RateLimiter<String, DefaultKeyedStateStore<String>, C, NoOpMiddleware<C::Instant>>,
    rps: u32,
    burst: u32,
    fleet: OnceLock<Fleet>,
}

/// The shared bucket in Redis.
struct Fleet {
    conn: RedisConn,
    prefix: String,
    interval_us: u64,
    burst: u32,
}

impl<C: Clock> std::fmt::Debug for RateLimit<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("shared", &self.fleet.get().is_some())
            .finish_non_exhaustive()
    }
}

fn quota(rps: u32, burst: u32) -> Option<Quota> {
    let rps = NonZeroU32::new(rps)?;
    let burst = NonZeroU32::new(burst.max(1))?;
    Some(Quota::per_second(rps).allow_burst(burst))
}

/// The bucket a request draws from ([`crate::dialect::Scope::key`]: provider, account or project, region).
pub fn key(req: &CreateRequest) -> String {
    req.scope.key()
}

impl RateLimit<DefaultClock> {
    /// `None` when `rps` is 0 (no limit).
    pub fn new(rps: u32, burst: u32) -> Option<Self> {
        RateLimit::with_clock(rps, burst, DefaultClock::default())
    }

    /// From now on, the same `rps` and `burst` for every process on the Redis behind `conn`
    /// together, per provider + account + region (keys `<prefix>:{<scope>}:upstream-rate`, in
    /// the scope's cluster slot). Called once a process has its Redis connection; a second
    /// call changes nothing.
    pub fn share(&self, conn: RedisConn, prefix: &str) {
        let _ = self.fleet.set(Fleet {
            conn,
            prefix: prefix.to_owned(),
            interval_us: 1_000_000 / u64::from(self.rps.max(1)),
            burst: self.burst.max(1),
        });
    }

    /// Waits until `req`'s bucket has a token — this process's, then the fleet's; returns how
    /// long that took.
    pub async fn acquire(&self, req: &CreateRequest) -> Duration {
        let started = Instant::now();
        let key = key(req);
        self.limiter.until_key_ready(&key).await;
        if let Some(fleet) = self.fleet.get() {
            fleet.acquire(&key).await;
        }
        started.elapsed()
    }
}

impl Fleet {
    /// Asks Redis until the scope's shared bucket lets the call go. A Redis that does not
    /// answer is asked again (up to a second apart, logged): the limit never opens by itself.
    async fn acquire(&self, scope_key: &str) {
        let key = format!("{}:{{{scope_key}}}:upstream-rate", self.prefix);
        let mut backoff = Duration::from_millis(50);
        loop {
            let mut conn = self.conn.clone();
            let asked: Result<u64, redis::RedisError> = FLEET_RATE
                .key(&key)
                .arg(self.interval_us)
                .arg(self.burst)
                .invoke_async(&mut conn)
                .await;
            match asked {
                Ok(0) => return,
                Ok(wait_ms) => tokio::time::sleep(Duration::from_millis(wait_ms)).await,
                Err(e) => {
                    tracing::warn!("the fleet's upstream rate limit in Redis: {e}; asking again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

impl<C: Clock> RateLimit<C> {
    pub fn with_clock(rps: u32, burst: u32, clock: C) -> Option<Self> {
        Some(RateLimit {
            limiter: RateLimiter::new(quota(rps, burst)?, DefaultKeyedStateStore::default(), clock),
            rps,
            burst,
            fleet: OnceLock::new(),
        })
    }

    /// Takes a token if one is there now.
    pub fn try_acquire(&self, req: &CreateRequest) -> bool {
        self.limiter.check_key(&key(req)).is_ok()
    }
}

/// An upstream whose calls wait for their provider + region's token first.
#[derive(Debug)]
pub struct RateLimited<U> {
    inner: U,
    limit: Option<Arc<RateLimit>>,
}

impl<U> RateLimited<U> {
    pub fn new(inner: U, limit: Option<Arc<RateLimit>>) -> Self {
        RateLimited { inner, limit }
    }
}

impl<U: Upstream> Upstream for RateLimited<U> {
    fn is_remote(&self) -> bool {
        self.inner.is_remote()
    }

    async fn register(&self, reg: &Registration<'_>) -> Result<Registered, ApiError> {
        if let Some(limit) = &self.limit {
            let waited = limit.acquire(reg.req).await;
            crate::telemetry::metrics::upstream_wait(reg.req.scope.provider.as_str(), waited);
        }
        self.inner.register(reg).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::{Provider, Scope};
    use governor::clock::FakeRelativeClock;

    fn req(provider: Provider, region: &str) -> CreateRequest {
        CreateRequest {
            scope: Scope {
                provider,
                owner: "o".into(),
                region: region.into(),
            },
            name: "n1".into(),
            resource_group_id: None,
            tags: vec![],
            zone: None,
        }
    }

    /// Counts, not wall-clock: on a fake clock exactly `burst` calls pass at once, then `rps`
    /// more per second, separately for each provider + account + region.
    #[test]
    fn rate_limit_holds_per_provider_account_and_region() {
        let clock = FakeRelativeClock::default();
        let limit = RateLimit::with_clock(5, 2, clock.clone()).unwrap();
        let hz = req(Provider::Aliyun, "cn-hangzhou");
        let count = |r: &CreateRequest| (0..100).filter(|_| limit.try_acquire(r)).count();
        assert_eq!(count(&hz), 2, "burst");
        assert_eq!(count(&hz), 0);
        assert_eq!(
            count(&req(Provider::Aliyun, "cn-beijing")),
            2,
            "other region has its own bucket"
        );
        assert_eq!(
            count(&req(Provider::Ucloud, "cn-hangzhou")),
            2,
            "other provider too"
        );
        let mut other_account = req(Provider::Aliyun, "cn-hangzhou");
        other_account.scope.owner = "someone-else".into();
        assert_eq!(count(&other_account), 2, "and another account");
        clock.advance(Duration::from_millis(200));
        assert_eq!(count(&hz), 1, "one token per 1/5 s");
        clock.advance(Duration::from_secs(10));
        assert_eq!(count(&hz), 2, "never more than the burst");
    }

    #[test]
    fn zero_rps_means_unlimited() {
        assert!(RateLimit::new(0, 1).is_none());
    }
}
