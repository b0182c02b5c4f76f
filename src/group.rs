//! Group commit: one thread takes work in groups, so that one sync makes a whole group durable.
//!
//! Whatever was queued while the thread made the last group durable is the next group (up to a
//! bound). An idle process pays what it paid before, one sync for one item; a busy one pays one
//! sync for many, and no item waits for a timer. The state file (`registry/embedded.rs`) and the
//! key files (`sink/key_files.rs`) are written this way.
//!
//! A group may also be left open ([`Group::spawn`] with a wait): the state file answers writes
//! that need no sync before their transaction commits, and commits them with whatever comes
//! next — or, when nothing comes for a moment, on its own.
//!
//! Work that must be synced may also wait a little for company ([`company_coming`]): while
//! keys are being made for jobs, each of whose writes will follow in a few milliseconds, a
//! writer holds its synced work up to [`GATHER`] so that one sync serves several keys. With no
//! key on its way (a lone request, keys taken from the reservoir, a `collect`) nothing waits,
//! and after a wait that found no company the next groups do not wait ([`Held`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long synced work waits, at most, for the writes of keys still being made.
///
/// At two threads' ~220 keys/s a key is done every ~4.5 ms, so a wait of 20 ms shares each
/// sync among several keys; a faster machine fills its groups without waiting. At 10 ms a
/// sync served two to four, and a cold `serve` spent a third more of the state file's CPU a
/// create, for ~5 ms less latency at 8 in flight (docs/benchmarks.md, 2026-12-07 morning).
/// Only synced work waits (a write answered before its commit is answered at once): each
/// synced write of a job (its commit; before a cloud call, the key noted; a release) and its
/// key file wait at most this long, so `run` and a cold `serve` keep their key threads busy
/// with the jobs queued behind.
pub const GATHER: Duration = Duration::from_millis(20);

/// Keys being made (queued on the key threads or running) for jobs whose synced writes follow.
/// One count for the process: it is a hint about the next few milliseconds, not a promise, and
/// a wrong hint costs at most one [`GATHER`] wait or one group of one.
static COMING: AtomicUsize = AtomicUsize::new(0);

/// A key on its way: counted by [`company_coming`] until dropped.
#[must_use = "the key counts as coming only while this is held"]
pub struct Coming(());

impl Drop for Coming {
    fn drop(&mut self) {
        COMING.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a key being made for a job, whose commit and key file will reach the writers when it
/// is done: hold the result while the key is made (`lifecycle.rs`).
pub fn expect_company() -> Coming {
    COMING.fetch_add(1, Ordering::Relaxed);
    Coming(())
}

/// Whether a key is being made for a job right now, so that synced work waiting a few
/// milliseconds more would likely share its sync.
pub fn company_coming() -> bool {
    COMING.load(Ordering::Relaxed) > 0
}

/// Synced work a writer holds while keys are coming, so that one sync serves more of it.
///
/// A wait that found no company (the keys being made were not on their way here: a cloud's
/// answer comes first, say) makes the next groups go without waiting — 2, then 4, … up to 64
/// groups after waits in a row that found none — so a wrong hint costs little latency.
pub struct Held<T> {
    items: Vec<T>,
    /// When the first of `items` came.
    since: Option<Instant>,
    /// The longest the first item waits ([`GATHER`] but in tests).
    gather: Duration,
    /// How many items were held when this group began to wait, if it did.
    waited_with: Option<usize>,
    /// Waits in a row that found no company.
    lonely: u32,
    /// Groups still to go without waiting.
    skip: u32,
}

/// After this many lonely waits in a row, the number of groups that skip the wait stops
/// doubling (2⁶ = 64).
const MOST_LONELY: u32 = 6;

impl<T> Held<T> {
    pub fn new(gather: Duration) -> Self {
        Held {
            items: Vec::new(),
            since: None,
            gather,
            waited_with: None,
            lonely: 0,
            skip: 0,
        }
    }

    pub fn push(&mut self, item: T) {
        self.since.get_or_insert_with(Instant::now);
        self.items.push(item);
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// How much longer the held work may wait for company, or `None` when it should be made
    /// durable now: nothing is held, no key is coming, the first item has waited long
    /// enough, or recent waits found no company.
    pub fn left(&mut self) -> Option<Duration> {
        let since = self.since?;
        if self.skip > 0 || !company_coming() {
            return None;
        }
        let left = self
            .gather
            .checked_sub(since.elapsed())
            .filter(|left| !left.is_zero());
        if left.is_some() {
            self.waited_with.get_or_insert(self.items.len());
        }
        left
    }

    /// Everything held, in the order it came; the next item starts a new wait.
    pub fn take(&mut self) -> Vec<T> {
        if self.items.is_empty() {
            // A commit with no synced work in it is no group: the back-off is left as it is.
            return Vec::new();
        }
        match self.waited_with.take() {
            Some(held) if self.items.len() > held => self.lonely = 0,
            Some(_) => {
                self.lonely = (self.lonely + 1).min(MOST_LONELY);
                self.skip = 1 << self.lonely;
            }
            None => self.skip = self.skip.saturating_sub(1),
        }
        self.since = None;
        std::mem::take(&mut self.items)
    }
}

impl<T> Extend<T> for Held<T> {
    fn extend<I: IntoIterator<Item = T>>(&mut self, items: I) {
        for item in items {
            self.push(item);
        }
    }
}

/// The thread and the way to it. Dropping it lets the thread finish the work already queued,
/// then waits for it (so whatever the thread holds, a database file say, is let go of when the
/// owner is dropped).
pub struct Group<T> {
    queue: Option<mpsc::Sender<T>>,
    thread: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> Group<T> {
    /// Starts the thread `name`, which hands `each` the items queued, at most `most` at a time,
    /// in the order they were sent. `each` may leave work open: when it returns `Some(wait)`,
    /// it is called again with an empty group once `wait` passes with nothing queued, and once
    /// more when the last sender is gone — so it can finish what it left open.
    pub fn spawn(
        name: &str,
        most: usize,
        mut each: impl FnMut(Vec<T>) -> Option<Duration> + Send + 'static,
    ) -> std::io::Result<Self> {
        let (queue, rx) = mpsc::channel::<T>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let mut linger = None;
                loop {
                    let first = match linger {
                        None => match rx.recv() {
                            Ok(item) => item,
                            Err(_) => return,
                        },
                        Some(wait) => match rx.recv_timeout(wait) {
                            Ok(item) => item,
                            Err(mpsc::RecvTimeoutError::Timeout) => {
                                linger = each(Vec::new());
                                continue;
                            }
                            Err(mpsc::RecvTimeoutError::Disconnected) => {
                                each(Vec::new());
                                return;
                            }
                        },
                    };
                    let mut group = vec![first];
                    while group.len() < most {
                        match rx.try_recv() {
                            Ok(item) => group.push(item),
                            Err(_) => break,
                        }
                    }
                    linger = each(group);
                }
            })?;
        Ok(Group {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    /// Queues `item`; gives it back when the thread is gone (it panicked).
    pub fn send(&self, item: T) -> Result<(), T> {
        match &self.queue {
            Some(q) => q.send(item).map_err(|e| e.0),
            None => Err(item),
        }
    }
}

impl<T> Drop for Group<T> {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            // A panic on that thread was reported where it happened (each item's answer was
            // dropped with it, which its waiter sees).
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn items_queued_while_a_group_is_made_durable_form_the_next_group() {
        let (started_tx, started_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let groups = Arc::new(Mutex::new(Vec::new()));
        let seen = groups.clone();
        let group = Group::spawn("test-group", 3, move |items: Vec<u32>| {
            if items == [0] {
                // The "sync" of the first group: hold it until more items are queued.
                started_tx.send(()).unwrap();
                go_rx.recv().unwrap();
            }
            seen.lock().unwrap().push(items);
            None
        })
        .unwrap();
        group.send(0).unwrap();
        started_rx.recv().unwrap();
        for i in 1..=5 {
            group.send(i).unwrap();
        }
        go_tx.send(()).unwrap();
        drop(group);
        let groups = groups.lock().unwrap().clone();
        assert_eq!(groups, vec![vec![0], vec![1, 2, 3], vec![4, 5]]);
    }

    #[test]
    fn held_work_waits_for_company_only_while_a_key_is_coming_and_only_so_long() {
        let mut held = Held::new(Duration::from_secs(60));
        assert_eq!(held.left(), None, "nothing held, nothing to wait for");
        let coming = expect_company();
        held.extend([1, 2]);
        let left = held.left().expect("a key is coming: the work waits");
        assert!(left <= Duration::from_secs(60));
        held.push(3);
        assert_eq!(held.take(), vec![1, 2, 3]);
        assert_eq!(held.left(), None);

        // The wait is counted from the first item held, not the last.
        let mut short = Held::new(Duration::from_millis(20));
        short.push(1);
        std::thread::sleep(Duration::from_millis(30));
        short.push(2);
        assert_eq!(short.left(), None, "waited long enough: due now");
        drop(coming);
        // Other tests in this process may be making keys: no claim here that none is coming.
    }

    /// A wait that finds no company: the next two groups go at once, then one waits again; a
    /// wait that finds company keeps the waiting on; lonely waits in a row back off further.
    #[test]
    fn a_wait_that_finds_no_company_makes_the_next_groups_go_at_once() {
        let _coming = expect_company();
        let mut held = Held::new(Duration::from_secs(60));
        let group = |items: &[u32], held: &mut Held<u32>| -> bool {
            held.push(items[0]);
            let waits = held.left().is_some();
            held.extend(items[1..].iter().copied());
            assert_eq!(held.take(), items);
            waits
        };
        assert!(group(&[1], &mut held), "the first group waits");
        // Taking nothing (a commit with nothing held) is not a group that went at once.
        assert!(held.take().is_empty());
        assert!(!group(&[2], &mut held) && !group(&[3], &mut held));
        assert!(
            group(&[4, 5], &mut held),
            "then one waits again, and finds company"
        );
        assert!(group(&[6], &mut held), "so the next waits too");
        // Lonely once more: two groups skip. Lonely again after them: four skip.
        assert!(!group(&[7], &mut held) && !group(&[8], &mut held));
        assert!(group(&[9], &mut held));
        for i in 0..4 {
            assert!(!group(&[10 + i], &mut held), "group {i} of four waited");
        }
        assert!(group(&[14], &mut held));
    }

    #[test]
    fn lingering_work_is_called_again_when_nothing_comes_and_when_the_senders_go() {
        let (calls_tx, calls_rx) = mpsc::channel::<Vec<u32>>();
        let group = Group::spawn("test-linger", 8, move |items: Vec<u32>| {
            // After 1, a short linger; after 2, one longer than the test.
            let linger = match items.as_slice() {
                [1] => Some(Duration::from_millis(5)),
                [2] => Some(Duration::from_secs(600)),
                _ => None,
            };
            calls_tx.send(items).unwrap();
            linger
        })
        .unwrap();
        let next = || calls_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        group.send(1).unwrap();
        assert_eq!(next(), vec![1]);
        // Nothing more comes: called again, empty, once the linger passes.
        assert_eq!(next(), Vec::<u32>::new());
        group.send(2).unwrap();
        assert_eq!(next(), vec![2]);
        // The owner goes while work is open: one last empty call before the thread ends.
        drop(group);
        let rest: Vec<Vec<u32>> = calls_rx.iter().collect();
        assert_eq!(rest, vec![Vec::<u32>::new()]);
    }
}
