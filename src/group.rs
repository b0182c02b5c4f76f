//! Group commit: one thread takes work in groups, so that one sync makes a whole group durable.
//!
//! Whatever was queued while the thread made the last group durable is the next group (up to a
//! bound). An idle process pays what it paid before, one sync for one item; a busy one pays one
//! sync for many, and no item waits for a timer. The state file (`registry/embedded.rs`) and the
//! key files (`sink/key_files.rs`) are written this way.
//!
//! A group may also be left open ([`Group::spawn_lingering`]): the state file answers writes
//! that need no sync before their transaction commits, and commits them with whatever comes
//! next — or, when nothing comes for a moment, on its own.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The thread and the way to it. Dropping it lets the thread finish the work already queued,
/// then waits for it (so whatever the thread holds, a database file say, is let go of when the
/// owner is dropped).
pub struct Group<T> {
    queue: Option<mpsc::Sender<T>>,
    thread: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> Group<T> {
    /// Starts the thread `name`, which hands `each` the items queued, at most `most` at a time,
    /// in the order they were sent.
    pub fn spawn(
        name: &str,
        most: usize,
        mut each: impl FnMut(Vec<T>) + Send + 'static,
    ) -> std::io::Result<Self> {
        Self::spawn_lingering(name, most, move |group| {
            each(group);
            None
        })
    }

    /// As [`Group::spawn`], but `each` may leave work open: when it returns `Some(wait)`, it is
    /// called again with an empty group once `wait` passes with nothing queued, and once more
    /// when the last sender is gone — so it can finish what it left open.
    pub fn spawn_lingering(
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
    fn lingering_work_is_called_again_when_nothing_comes_and_when_the_senders_go() {
        let (calls_tx, calls_rx) = mpsc::channel::<Vec<u32>>();
        let group = Group::spawn_lingering("test-linger", 8, move |items: Vec<u32>| {
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
