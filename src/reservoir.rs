//! The key reservoir: a bounded pool of pre-generated RSA keys per key size, filled on the
//! rayon pool only when a thread is idle, so a burst of jobs after a quiet spell is answered
//! without waiting for key generation. Keys are kept encoded (PEM, public line, fingerprints:
//! [`KeyMaterial`]), so a job that takes one needs no CPU work at all — not even a hop to the
//! rayon pool, where it would queue behind the refills. They live in memory only (never
//! persisted); the PEM is zeroized when dropped.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::keys::cpu::CpuPool;
use crate::keys::keygen::{self, Engine, KeyBits, KeyMaterial};

#[derive(Default)]
struct Pool {
    keys: VecDeque<KeyMaterial>,
    /// Keys being generated for this pool right now.
    filling: usize,
}

struct Inner {
    capacity: usize,
    /// Cleared by [`Reservoir::freeze`]: no more keys are started.
    refill: AtomicBool,
    /// Set by [`Reservoir::freeze_when_full`].
    once: AtomicBool,
    engine: Engine,
    cpu: CpuPool,
    pools: Mutex<HashMap<KeyBits, Pool>>,
}

/// Cheap to clone; all clones share the pools.
#[derive(Clone)]
pub struct Reservoir {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Reservoir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservoir")
            .field("capacity", &self.inner.capacity)
            .field("engine", &self.inner.engine)
            .finish_non_exhaustive()
    }
}

impl Reservoir {
    /// A reservoir holding up to `capacity` keys of each size in `sizes`; filling starts now.
    pub fn new(cpu: CpuPool, engine: Engine, capacity: usize, sizes: &[KeyBits]) -> Self {
        let r = Reservoir {
            inner: Arc::new(Inner {
                capacity,
                refill: AtomicBool::new(true),
                once: AtomicBool::new(false),
                engine,
                cpu,
                pools: Mutex::new(sizes.iter().map(|b| (*b, Pool::default())).collect()),
            }),
        };
        for b in sizes {
            r.top_up(*b);
        }
        r
    }

    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// Stops refilling: keys being made still arrive, no more are started. For measuring the
    /// pipeline alone (`keyfleet bench --pipeline --pooled`), where refills would take the
    /// cores the plumbing is measured on.
    pub fn freeze(&self) {
        self.inner.refill.store(false, Ordering::Relaxed);
    }

    /// Freezes the reservoir (see [`Reservoir::freeze`]) the first time it is full — now, if
    /// it already is.
    pub fn freeze_when_full(&self) {
        let pools = self.lock();
        self.inner.once.store(true, Ordering::Relaxed);
        if pools.values().all(|p| p.keys.len() >= self.inner.capacity) {
            self.inner.refill.store(false, Ordering::Relaxed);
        }
    }

    /// Keys ready for `bits` now.
    pub fn len(&self, bits: KeyBits) -> usize {
        self.lock().get(&bits).map_or(0, |p| p.keys.len())
    }

    pub fn is_empty(&self, bits: KeyBits) -> bool {
        self.len(bits) == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<KeyBits, Pool>> {
        // A poisoned lock only means a filler panicked between two plain field updates.
        self.inner.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A ready key of `bits`, if there is one; starts refilling either way.
    pub fn take(&self, bits: KeyBits) -> Option<KeyMaterial> {
        let key = {
            let mut pools = self.lock();
            let pool = pools.get_mut(&bits)?;
            let key = pool.keys.pop_front();
            crate::telemetry::metrics::reservoir_fill(bits.bits(), pool.keys.len());
            key
        };
        self.top_up(bits);
        key
    }

    /// Starts generating keys for `bits` on idle threads until the pool (with what is being
    /// generated) is full. Each finished key tops up again, so filling continues exactly as
    /// long as threads stay idle.
    fn top_up(&self, bits: KeyBits) {
        self.top_up_beside(bits, 0);
    }

    /// [`Reservoir::top_up`] from a filler about to end (`own` = 1): its own thread counts as
    /// free, for its successor and for any filler missing beside it (two fillers ending at
    /// once can leave one without a successor; the next to end starts it again). Asked as if
    /// it were busy, a finishing filler never started its successor while another filler ran,
    /// so a pool of n threads lost a filler at each such coincidence and never got it back:
    /// `serve`'s 2-thread pool filled on one thread, and a pool of one stopped after its first
    /// key.
    fn top_up_beside(&self, bits: KeyBits, own: usize) {
        loop {
            {
                let mut pools = self.lock();
                let Some(pool) = pools.get_mut(&bits) else {
                    return;
                };
                if pool.keys.len() + pool.filling >= self.inner.capacity
                    || !self.inner.refill.load(Ordering::Relaxed)
                    || !self.inner.cpu.has_idle_thread_beside(own)
                {
                    return;
                }
                pool.filling += 1;
            }
            // The filler holds the reservoir weakly: once its owners are gone (a server that
            // stopped), the key being made is dropped and no more are started.
            let weak = Arc::downgrade(&self.inner);
            let engine = self.inner.engine;
            self.inner.cpu.spawn_background(move || {
                let started = std::time::Instant::now();
                let key = keygen::generate_private(bits, engine)
                    .and_then(|k| keygen::encode(&k))
                    .ok();
                crate::telemetry::metrics::keygen(bits.bits(), started.elapsed());
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                let me = Reservoir { inner };
                {
                    let mut pools = me.lock();
                    if let Some(pool) = pools.get_mut(&bits) {
                        pool.filling -= 1;
                        if let Some(k) = key {
                            pool.keys.push_back(k);
                        }
                        if pool.keys.len() >= me.inner.capacity
                            && me.inner.once.load(Ordering::Relaxed)
                        {
                            me.inner.refill.store(false, Ordering::Relaxed);
                        }
                        crate::telemetry::metrics::reservoir_fill(bits.bits(), pool.keys.len());
                    }
                }
                me.top_up_beside(bits, 1);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn fills_up_to_capacity_and_refills_after_take() {
        let cpu = CpuPool::new(2).unwrap();
        let r = Reservoir::new(cpu, Engine::Fast, 3, &[KeyBits::B2048]);
        let deadline = Instant::now() + Duration::from_secs(120);
        while r.len(KeyBits::B2048) < 3 {
            assert!(Instant::now() < deadline, "reservoir did not fill");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(r.len(KeyBits::B2048), 3, "never above capacity");
        let key = r.take(KeyBits::B2048).expect("a ready key");
        assert!(key.public_line.starts_with("ssh-rsa "));
        assert!(key.private_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(
            r.take(KeyBits::B4096).is_none(),
            "sizes not asked for are never pooled"
        );
        while r.len(KeyBits::B2048) < 3 {
            assert!(Instant::now() < deadline, "reservoir did not refill");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A finishing filler counted itself as busy when it looked for an idle thread to start
    /// the next key on: a pool of one thread stopped after its first key (and a pool of two
    /// filled on one thread: `bench --serve` showed its key threads at 1.0 CPU-second a second
    /// while the reservoir filled).
    #[test]
    fn a_finishing_filler_hands_its_thread_on_so_a_one_thread_pool_fills_up() {
        let cpu = CpuPool::new(1).unwrap();
        let r = Reservoir::new(cpu.clone(), Engine::Fast, 3, &[KeyBits::B2048]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while r.len(KeyBits::B2048) < 3 {
            assert!(
                Instant::now() < deadline,
                "reservoir stopped at {} of 3 keys",
                r.len(KeyBits::B2048)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cpu.is_idle() {
            assert!(Instant::now() < deadline, "the pool kept working once full");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(r.len(KeyBits::B2048), 3, "never above capacity");
    }

    /// A stopped server's reservoir kept refilling on the pool, taking the cores from whatever
    /// ran next (it showed as a slow cold round in `keyfleet bench --serve`).
    #[test]
    fn frozen_reservoir_keeps_its_keys_and_starts_no_more() {
        let cpu = CpuPool::new(2).unwrap();
        let r = Reservoir::new(cpu.clone(), Engine::Fast, 2, &[KeyBits::B2048]);
        let deadline = Instant::now() + Duration::from_secs(120);
        while r.len(KeyBits::B2048) < 2 {
            assert!(Instant::now() < deadline, "reservoir did not fill");
            std::thread::sleep(Duration::from_millis(20));
        }
        r.freeze();
        assert!(r.take(KeyBits::B2048).is_some());
        std::thread::sleep(Duration::from_millis(300));
        assert!(cpu.is_idle(), "a frozen reservoir refilled");
        assert!(r.take(KeyBits::B2048).is_some());
        assert!(
            r.take(KeyBits::B2048).is_none(),
            "no key was made after the freeze"
        );
    }

    #[test]
    fn reservoir_frozen_when_full_is_filled_once() {
        let cpu = CpuPool::new(2).unwrap();
        let r = Reservoir::new(cpu.clone(), Engine::Fast, 2, &[KeyBits::B2048]);
        r.freeze_when_full();
        let deadline = Instant::now() + Duration::from_secs(120);
        while r.len(KeyBits::B2048) < 2 {
            assert!(Instant::now() < deadline, "reservoir did not fill");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(r.take(KeyBits::B2048).is_some());
        assert!(r.take(KeyBits::B2048).is_some());
        std::thread::sleep(Duration::from_millis(300));
        assert!(cpu.is_idle(), "a reservoir filled once refilled");
        assert!(r.take(KeyBits::B2048).is_none());
    }

    #[test]
    fn dropped_reservoir_stops_filling() {
        let cpu = CpuPool::new(2).unwrap();
        // So large that filling it would take minutes anywhere.
        let r = Reservoir::new(cpu.clone(), Engine::Fast, 100_000, &[KeyBits::B2048]);
        std::thread::sleep(Duration::from_millis(100));
        drop(r);
        // At most the keys already being made finish; then the pool goes idle.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cpu.is_idle() {
            assert!(
                Instant::now() < deadline,
                "the pool still works for a dropped reservoir"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        assert!(cpu.is_idle(), "a dropped reservoir started more keys");
    }
}
