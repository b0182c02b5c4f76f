//! The answers of one job message's jobs, gathered to go out as one results message (v2,
//! [`crate::job::results_message`]). Each job of the message reaches delivery on its own; it
//! leaves its result here and waits. When no job of the message is still running — each has
//! left a result, or ended without one (handed back, answered before, stopped) — the job that
//! made it so is handed every result left ([`Publisher`]) to publish with one confirm, and
//! every waiting job then gets that confirm's outcome as its own delivery's. Nothing is marked
//! delivered before the message holding its key is confirmed. The jobs answered for good are
//! noted here too, so their batch's progress is counted in one call at the message's end. The
//! publishing itself is the results queue's (`results_queue.rs`); this file only counts and
//! hands over.

use std::sync::Mutex;

use serde_json::value::RawValue;
use tokio::sync::watch;
use uuid::Uuid;

use super::DeliveryError;
use crate::job::SecretPem;

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
    /// Jobs settled (answered for good), with their outcome labels, to count together.
    settled: Vec<(Uuid, String)>,
}

type Outcome = Option<Result<(), DeliveryError>>;

/// The jobs of one message, one slot each.
pub struct ResultGroup {
    batch_id: String,
    state: Mutex<State>,
    /// The outcome of the group's one publish, once it is known.
    outcome: watch::Sender<Outcome>,
}

/// The results of a group to publish, handed to the job whose turn it is. Its outcome must be
/// given with [`Publisher::finish`]; dropped without one (the worker stopped at once), the
/// waiting jobs are told their results are unconfirmed rather than left waiting.
pub struct Publisher<'a> {
    pub pending: Vec<Pending>,
    outcome: &'a watch::Sender<Outcome>,
    finished: bool,
}

impl Publisher<'_> {
    pub fn finish(mut self, outcome: Result<(), DeliveryError>) {
        self.finished = true;
        self.outcome.send_replace(Some(outcome));
    }
}

impl Drop for Publisher<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.outcome
                .send_replace(Some(Err(DeliveryError::Unconfirmed(
                    "the worker stopped while publishing the message's results".into(),
                ))));
        }
    }
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
                settled: Vec::with_capacity(jobs),
            }),
            outcome: watch::channel(None).0,
        }
    }

    pub fn batch_id(&self) -> &str {
        &self.batch_id
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Leaves the result of the job in `slot`. Returns the group's results to publish when
    /// this job was the last one running; otherwise the job waits ([`ResultGroup::outcome`]).
    pub fn put(
        &self,
        slot: usize,
        pending: Pending,
    ) -> Result<Option<Publisher<'_>>, DeliveryError> {
        let mut s = self.state();
        if s.slots.get(slot) != Some(&Slot::Running) {
            return Err(DeliveryError::Unconfirmed(
                "a result delivered twice in one message".into(),
            ));
        }
        s.slots[slot] = Slot::Delivering;
        s.running -= 1;
        s.pending.push(pending);
        Ok(self.turn(&mut s))
    }

    /// The job in `slot` has ended. If it ended without leaving a result and was the last one
    /// running, the results the others left are returned, to publish now.
    pub fn leave(&self, slot: usize) -> Option<Publisher<'_>> {
        let mut s = self.state();
        if s.slots.get(slot) != Some(&Slot::Running) {
            return None;
        }
        s.slots[slot] = Slot::Left;
        s.running -= 1;
        self.turn(&mut s)
    }

    fn turn(&self, s: &mut State) -> Option<Publisher<'_>> {
        (s.running == 0 && !s.pending.is_empty()).then(|| Publisher {
            pending: std::mem::take(&mut s.pending),
            outcome: &self.outcome,
            finished: false,
        })
    }

    /// The job `job_id` is answered for good with `outcome`: it is counted in its batch's
    /// progress with the others, once the message's jobs have all ended
    /// ([`ResultGroup::take_settled`]).
    pub fn settled(&self, job_id: Uuid, outcome: &str) {
        self.state().settled.push((job_id, outcome.to_owned()));
    }

    /// The jobs settled so far, to count.
    pub fn take_settled(&self) -> Vec<(Uuid, String)> {
        std::mem::take(&mut self.state().settled)
    }

    /// The outcome of the group's publish, once it is known.
    pub async fn outcome(&self) -> Result<(), DeliveryError> {
        let unpublished =
            || DeliveryError::Unconfirmed("the message's results were not published".into());
        let mut rx = self.outcome.subscribe();
        let published = match rx.wait_for(Option::is_some).await {
            Ok(o) => o.clone().unwrap_or_else(|| Err(unpublished())),
            Err(_) => Err(unpublished()),
        };
        published
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending() -> Pending {
        Pending {
            job_id: Uuid::new_v4(),
            encoded: serde_json::value::to_raw_value(&1).unwrap(),
            key: None,
        }
    }

    #[test]
    fn the_last_job_to_end_publishes_what_the_others_left() {
        let group = ResultGroup::new("b", 3);
        assert!(group.put(0, pending()).unwrap().is_none());
        assert!(group.leave(1).is_none(), "job 2 still runs");
        let publisher = group
            .put(2, pending())
            .unwrap()
            .expect("the last one publishes");
        assert_eq!(publisher.pending.len(), 2);
        publisher.finish(Ok(()));
        assert!(
            group.leave(0).is_none(),
            "a job that delivered leaves nothing behind"
        );
    }

    #[test]
    fn a_job_ending_without_a_result_last_publishes_the_others() {
        let group = ResultGroup::new("b", 2);
        assert!(group.put(0, pending()).unwrap().is_none());
        let publisher = group.leave(1).expect("the others' results go out");
        assert_eq!(publisher.pending.len(), 1);
        assert!(
            group.put(0, pending()).is_err(),
            "a second delivery of a job"
        );
    }

    #[test]
    fn settled_jobs_are_handed_over_once_with_their_outcomes() {
        let group = ResultGroup::new("b", 3);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        group.settled(a, "created");
        group.settled(b, "QuotaExceed.KeyPair");
        assert_eq!(
            group.take_settled(),
            vec![
                (a, "created".to_owned()),
                (b, "QuotaExceed.KeyPair".to_owned())
            ]
        );
        assert!(group.take_settled().is_empty(), "counted once");
    }

    #[tokio::test]
    async fn a_publisher_dropped_unfinished_tells_the_waiting_jobs() {
        let group = ResultGroup::new("b", 2);
        assert!(group.put(0, pending()).unwrap().is_none());
        drop(group.put(1, pending()).unwrap());
        assert!(matches!(
            group.outcome().await,
            Err(DeliveryError::Unconfirmed(_))
        ));
    }
}
