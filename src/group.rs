//! Group commit: one thread takes work in groups, so that one sync makes a whole group durable.
//!
//! Whatever was queued while the thread made the last group durable is the next group (up to a
//! bound). An idle process pays what it paid before, one sync for one item; a busy one pays one
//! sync for many, and no item waits for a timer. The state file (`registry/embedded.rs`) and the
//! key files (`sink/key_files.rs`) are written this way.

use std::sync::mpsc;
use std::thread::JoinHandle;

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
        let (queue, rx) = mpsc::channel::<T>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut group = vec![first];
                    while group.len() < most {
                        match rx.try_recv() {
                            Ok(item) => group.push(item),
                            Err(_) => break,
                        }
                    }
                    each(group);
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
}
