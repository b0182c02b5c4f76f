//! The answers of one job message's jobs, published as one results message (v2,
//! [`crate::job::results_message`]). Each job of the message reaches delivery on its own; it
//! leaves its result here and waits. When no job of the message is still running — each has
//! left a result, or ended without one (handed back, answered before, stopped) — the job that
//! made it so publishes them all: their keys sealed under one age header, one message, one
//! confirm. Every waiting job then gets that confirm's outcome as its own delivery's, and goes
//! on to be marked delivered and settled as before: nothing is marked delivered before the
//! message holding its key is confirmed.

use std::sync::Mutex;

use serde_json::value::RawValue;
use tokio::sync::watch;
use uuid::Uuid;

use super::results_queue::ResultsQueue;
use super::DeliveryError;
use crate::job::{JobResult, SecretPem};

/// A result left for the group's message: encoded without its key, and the key.
pub struct Pending {
    pub job_id: Uuid,
    pub encoded: Box<RawValue>,
    pub key: Option<SecretPem>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Running,
    /// Its result is with the group (waiting, or published).
    Delivering,
    /// It ended without a result to publish.
    Left,
}

struct State {
    slots: Vec<Slot>,
    running: usize,
    pending: Vec<Pending>,
}

/// The jobs of one message, one slot each.
pub struct ResultGroup {
    batch_id: String,
    state: Mutex<State>,
    /// The outcome of the group's one publish, once it is known.
    outcome: watch::Sender<Option<Result<(), DeliveryError>>>,
}

impl ResultGroup {
    /// The group of a message of `jobs` jobs of batch `batch_id`.
    pub fn new(batch_id: &str, jobs: usize) -> Self {
        ResultGroup {
            batch_id: batch_id.to_owned(),
            state: Mutex::new(State {
                slots: vec![Slot::Running; jobs],
                running: jobs,
                pending: Vec::with_capacity(jobs),
            }),
            outcome: watch::channel(None).0,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Delivers the result of the job in `slot` with the others of its message: returns when
    /// the message holding it is confirmed (or failed). The key is out of `result` afterwards.
    pub async fn deliver(
        &self,
        slot: usize,
        result: &mut JobResult,
        queue: &ResultsQueue<'_>,
    ) -> Result<(), DeliveryError> {
        let key = result.take_private_key();
        let encoded = serde_json::value::to_raw_value(result)
            .map_err(|e| DeliveryError::Undeliverable(format!("encoding a result: {e}")))?;
        let mut outcome = self.outcome.subscribe();
        let lead = {
            let mut s = self.state();
            if s.slots.get(slot) != Some(&Slot::Running) {
                return Err(DeliveryError::Unconfirmed(
                    "a result delivered twice in one message".into(),
                ));
            }
            s.slots[slot] = Slot::Delivering;
            s.running -= 1;
            s.pending.push(Pending {
                job_id: result.job_id,
                encoded,
                key,
            });
            s.running == 0
        };
        if lead {
            return self.publish(queue).await;
        }
        let published = match outcome.wait_for(Option::is_some).await {
            Ok(o) => o.clone().unwrap_or_else(|| {
                Err(DeliveryError::Unconfirmed(
                    "the message's results were not published".into(),
                ))
            }),
            Err(_) => Err(DeliveryError::Unconfirmed(
                "the message's results were not published".into(),
            )),
        };
        published
    }

    /// The job in `slot` has ended. If it ended without delivering and was the last one
    /// running, the results the others left are published now.
    pub async fn leave(&self, slot: usize, queue: &ResultsQueue<'_>) {
        let lead = {
            let mut s = self.state();
            if s.slots.get(slot) != Some(&Slot::Running) {
                return;
            }
            s.slots[slot] = Slot::Left;
            s.running -= 1;
            s.running == 0 && !s.pending.is_empty()
        };
        if lead {
            // The waiting jobs get the outcome; this one has its ending already.
            let _ = self.publish(queue).await;
        }
    }

    async fn publish(&self, queue: &ResultsQueue<'_>) -> Result<(), DeliveryError> {
        let pending = std::mem::take(&mut self.state().pending);
        // Dropped before the outcome is known (the worker stopped at once): the waiting jobs
        // are told their results are unconfirmed rather than left waiting.
        let guard = Unsettled(&self.outcome);
        let outcome = queue.publish_group(&self.batch_id, pending).await;
        std::mem::forget(guard);
        self.outcome.send_replace(Some(outcome.clone()));
        outcome
    }
}

struct Unsettled<'a>(&'a watch::Sender<Option<Result<(), DeliveryError>>>);

impl Drop for Unsettled<'_> {
    fn drop(&mut self) {
        self.0.send_replace(Some(Err(DeliveryError::Unconfirmed(
            "the worker stopped while publishing the message's results".into(),
        ))));
    }
}
