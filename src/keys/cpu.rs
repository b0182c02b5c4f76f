//! The one way CPU-heavy work leaves the async runtime: a rayon pool, with a oneshot channel
//! carrying the answer back to tokio, so a key generation never blocks a runtime thread.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("could not start the key-generation thread pool: {0}")]
    Build(String),
    #[error("a key-generation task panicked")]
    Panicked,
}

/// The nice value of `serve`'s key-generation threads (0 is normal, 19 the lowest priority).
pub const KEYGEN_NICE: i32 = 10;

/// A handle to the rayon pool; cheap to clone.
#[derive(Clone)]
pub struct CpuPool {
    pool: Arc<rayon::ThreadPool>,
    /// Tasks queued or running: lets background work (the key reservoir) use idle threads only.
    busy: Arc<AtomicUsize>,
}

impl CpuPool {
    /// `threads = 0` means one thread per core.
    pub fn new(threads: usize) -> Result<Self, CpuError> {
        CpuPool::build(threads, false)
    }

    /// A pool whose threads yield the cores to the async runtime (`keyfleet serve`): with the
    /// pool busy filling the reservoir, a request that needs no new key is not kept waiting
    /// behind one. Throughput is unchanged when nothing else runs; batch modes keep normal
    /// priority so a busy host does not slow them down.
    pub fn new_yielding(threads: usize) -> Result<Self, CpuError> {
        CpuPool::build(threads, true)
    }

    fn build(threads: usize, yielding: bool) -> Result<Self, CpuError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("keyfleet-keygen-{i}"))
            .start_handler(move |_| {
                // On Linux the nice value is per thread; failure only costs the preference.
                if yielding {
                    let _ = rustix::process::setpriority_process(None, KEYGEN_NICE);
                }
            })
            .build()
            .map_err(|e| CpuError::Build(e.to_string()))?;
        Ok(CpuPool {
            pool: Arc::new(pool),
            busy: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Whether a thread is free right now (nothing queued behind the running tasks).
    pub fn has_idle_thread(&self) -> bool {
        self.has_idle_thread_beside(0)
    }

    /// Whether a thread is free once `own` of the running tasks — the caller's own, about to
    /// end — have ended: a task that wants to start its successor asks this, not
    /// [`CpuPool::has_idle_thread`], since it still counts as busy itself.
    pub fn has_idle_thread_beside(&self, own: usize) -> bool {
        self.busy.load(Ordering::SeqCst).saturating_sub(own) < self.threads()
    }

    /// Whether no task is running or queued.
    pub fn is_idle(&self) -> bool {
        self.busy.load(Ordering::SeqCst) == 0
    }

    /// Runs `f` on the pool in the background, counted as busy like any task; a panic is
    /// contained to the task.
    pub fn spawn_background<F: FnOnce() + Send + 'static>(&self, f: F) {
        let busy = self.busy.clone();
        busy.fetch_add(1, Ordering::SeqCst);
        self.pool.spawn(move || {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            busy.fetch_sub(1, Ordering::SeqCst);
        });
    }

    /// Runs `f` on the pool and awaits its result. A panic inside `f` is caught on the pool
    /// thread and reported as an error instead of tearing down the caller.
    pub async fn run<F, T>(&self, f: F) -> Result<T, CpuError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let busy = self.busy.clone();
        busy.fetch_add(1, Ordering::SeqCst);
        self.pool.spawn(move || {
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            busy.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(out);
        });
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            _ => Err(CpuError::Panicked),
        }
    }
}
