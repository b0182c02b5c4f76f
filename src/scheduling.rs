//! Linux's batch scheduling policy (`SCHED_BATCH`) for the modes that work through a file
//! (`run`, `rotate` on the embedded store). Under the normal policy every wakeup of a plumbing
//! thread (the state file's writer, the key files' writer, the async runtime) preempts a
//! key-generation thread at once: about twelve preemptions a key on two cores. Batch threads
//! are not preempted by wakeups (the plumbing waits for the running thread's slice to end,
//! and then does more at once) and get the same share of the CPU; what they give up is
//! wakeup latency, which a batch file does not notice. `serve` and the worker answer
//! requests, so they keep the normal policy. Measured in docs/benchmarks.md.
//!
//! The policy is the thread's, and threads inherit it: set on the thread that starts a run,
//! before the key-generation pool and the writers are spawned, it covers them all.

use thread_priority::unix::{
    set_thread_priority_and_policy, thread_native_id, thread_schedule_policy,
    NormalThreadSchedulePolicy, ThreadSchedulePolicy,
};
use thread_priority::{ThreadPriority, ThreadPriorityValue};

/// The crate's portable priority that maps to nice 0 under a normal policy: it sets a nice
/// value with the policy, and 48 of its 0..=99 is nice 0 (`unix.rs`, `to_posix`).
const NICE_ZERO: u8 = 48;

/// The calling thread's policy while it lives; the normal policy again when dropped (threads
/// spawned meanwhile keep the batch policy, and end with the run that spawned them).
#[must_use = "the policy goes back to normal when this is dropped"]
pub struct Batch {
    set: bool,
}

/// Puts the calling thread (and so every thread it spawns from now on) under `SCHED_BATCH`.
/// Best effort, and only from the normal policy at nice 0: a process a user started with
/// `nice` or `chrt` keeps what it was given.
pub fn batch() -> Batch {
    let normal = matches!(
        thread_schedule_policy(),
        Ok(ThreadSchedulePolicy::Normal(
            NormalThreadSchedulePolicy::Other
        ))
    );
    let nice_zero = rustix::process::getpriority_process(None).is_ok_and(|n| n == 0);
    if !(normal && nice_zero) {
        return Batch { set: false };
    }
    let set = set(NormalThreadSchedulePolicy::Batch);
    if !set {
        tracing::debug!("SCHED_BATCH refused; the run keeps the normal policy");
    }
    Batch { set }
}

fn set(policy: NormalThreadSchedulePolicy) -> bool {
    let Ok(zero) = ThreadPriorityValue::try_from(NICE_ZERO) else {
        return false;
    };
    set_thread_priority_and_policy(
        thread_native_id(),
        ThreadPriority::Crossplatform(zero),
        ThreadSchedulePolicy::Normal(policy),
    )
    .is_ok()
}

impl Drop for Batch {
    fn drop(&mut self) {
        if self.set {
            set(NormalThreadSchedulePolicy::Other);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a thread of its own: the policy is per thread, and the test harness's threads are
    /// shared.
    #[test]
    fn a_run_is_batch_scheduled_threads_it_spawns_too_and_normal_again_after() {
        std::thread::spawn(|| {
            let before = rustix::process::getpriority_process(None).unwrap();
            let policy = || thread_schedule_policy().unwrap();
            let normal = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other);
            let batch_policy = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch);
            assert_eq!(policy(), normal);
            {
                let _batch = batch();
                if before == 0 {
                    assert_eq!(policy(), batch_policy);
                    let spawned = std::thread::spawn(move || thread_schedule_policy().unwrap())
                        .join()
                        .unwrap();
                    assert_eq!(spawned, batch_policy);
                } else {
                    // Started under `nice`: left alone.
                    assert_eq!(policy(), normal);
                }
                assert_eq!(rustix::process::getpriority_process(None).unwrap(), before);
            }
            assert_eq!(policy(), normal);
            assert_eq!(rustix::process::getpriority_process(None).unwrap(), before);
        })
        .join()
        .unwrap();
    }
}
