//! A batch file made into publishable job messages on the batch reader's thread (`submit`):
//! each row is checked against its dialect there, the valid ones are packed into messages
//! as the batch's [`JobsPerMessage`] plan says and encoded there, and the publishing loop is
//! handed runs of finished messages, not rows. So the loop only publishes, and the reader
//! thread is woken once a run instead of once a row. A row's job is lent, not made: the reader
//! writes each row over one job ([`BatchInput::lend_rows`]), which is checked and encoded in
//! place, so a valid row costs no allocation. Measured in docs/benchmarks.md ("`submit`
//! packing on the reader's thread", "a row read in place").

use tokio::sync::mpsc;

use super::batch::{BatchError, BatchInput, Reader, RowDefaults, RowRef};
use super::jobs_per_message::{Cursor, JobsPerMessage};
use super::message;
use super::JobResult;
use crate::dialect::{self, Catalog};
use crate::time::now_rfc3339;

/// What the publishing loop is handed, in the order of the rows.
#[derive(Debug)]
pub enum Packed {
    /// One job message, encoded as [`message::encode`] does, with its `message_id`.
    Message {
        payload: Vec<u8>,
        message_id: String,
        jobs: u64,
    },
    /// A row answered at once: not a job, or its parameters break its API's rules. Boxed: a
    /// run moves its items, and most are messages a tenth of a result's size.
    Answer(Box<JobResult>),
    /// The message could not be encoded (a job that does not serialize); nothing after it.
    Unencodable(String),
}

/// Messages (or answers) handed over at once, at most: 32 messages of up to 32 jobs is up to
/// 1,024 rows.
pub const RUN: usize = 32;

/// Reads `input` on its own thread and packs it (see the module's text). The channel holds
/// `runs` runs, so reading never runs ahead of publishing by more than `runs × RUN` messages.
/// A run goes as soon as it is full, or earlier when the loop has taken everything before it
/// (so rows trickling in through a pipe are not held back for company). The thread stops
/// early when the receiver is dropped; join it for the read's outcome.
pub fn spawn_packer(
    input: BatchInput,
    defaults: &RowDefaults,
    catalog: Catalog,
    jobs_per_message: JobsPerMessage,
    runs: usize,
) -> Result<(mpsc::Receiver<Vec<Packed>>, Reader), BatchError> {
    let (tx, rx) = mpsc::channel::<Vec<Packed>>(runs.max(1));
    let defaults = defaults.clone();
    let handle = input.read_on_thread(move |input| {
        let mut packer = Packer::new(catalog, jobs_per_message);
        let mut open = true;
        let read = input.lend_rows(&defaults, |row| {
            packer.take(row);
            if packer.run.len() >= RUN || (!packer.run.is_empty() && idle(&tx)) {
                open = tx.blocking_send(packer.hand_over()).is_ok();
            }
            open
        });
        if open {
            // The end of the input: the last, partly filled message.
            packer.seal();
            if !packer.run.is_empty() {
                let _ = tx.blocking_send(packer.hand_over());
            }
        }
        read
    })?;
    Ok((rx, handle))
}

/// Whether the loop has taken every run sent so far (and so is waiting for the next).
fn idle(tx: &mpsc::Sender<Vec<Packed>>) -> bool {
    tx.capacity() == tx.max_capacity()
}

/// The packing itself, apart from the thread and the channel.
struct Packer {
    catalog: Catalog,
    /// Where the batch is in its plan.
    cursor: Cursor,
    /// The message being filled: each job is encoded into it as it is taken (the reader then
    /// writes the next row over that job).
    message: message::Writer,
    run: Vec<Packed>,
}

impl Packer {
    fn new(catalog: Catalog, plan: JobsPerMessage) -> Self {
        Packer {
            catalog,
            cursor: Cursor::new(plan),
            message: message::Writer::default(),
            run: Vec::with_capacity(RUN),
        }
    }

    fn take(&mut self, row: RowRef<'_>) {
        match row {
            RowRef::Bad(bad) => self.run.push(Packed::Answer(Box::new(bad.into_result()))),
            RowRef::Job(job) => {
                match dialect::validate(job.provider, &job.owner, &job.params, &self.catalog) {
                    Err(e) => self.run.push(Packed::Answer(Box::new(JobResult::failed(
                        job,
                        &e,
                        now_rfc3339(),
                        1,
                    )))),
                    Ok(_) => {
                        if self.message.jobs() == 0 {
                            self.message.reserve(self.cursor.size());
                        }
                        if let Err(e) = self.message.push(job) {
                            // The publishing loop stops here; nothing after it is packed.
                            self.message = message::Writer::default();
                            self.run.push(Packed::Unencodable(e.to_string()));
                            return;
                        }
                        if self.message.jobs() >= self.cursor.size() as u64 {
                            self.seal();
                        }
                    }
                }
            }
        }
    }

    /// The jobs written so far become one message.
    fn seal(&mut self) {
        if let Some((payload, id, jobs)) = self.message.finish() {
            self.run.push(Packed::Message {
                payload,
                message_id: id.to_string(),
                jobs,
            });
            self.cursor.sealed(jobs as usize);
        }
    }

    /// The run so far, for the loop; the next starts with room for a whole run.
    fn hand_over(&mut self) -> Vec<Packed> {
        std::mem::replace(&mut self.run, Vec::with_capacity(RUN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::batch::tests::defaults;
    use crate::job::message::JobMessage;
    use crate::job::Job;
    use crate::job::Status;
    use std::io::Write;

    /// Everything a file packs into, runs flattened, in order.
    fn packed(text: &str, plan: JobsPerMessage) -> Vec<Packed> {
        let mut f = tempfile::Builder::new().suffix(".csv").tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        let input = BatchInput::open(f.path(), None).unwrap();
        let (mut rx, reader) =
            spawn_packer(input, &defaults(), Catalog::default(), plan, 2).unwrap();
        let mut out = Vec::new();
        while let Some(run) = rx.blocking_recv() {
            assert!(!run.is_empty() && run.len() <= RUN);
            out.extend(run);
        }
        reader.join().unwrap().unwrap();
        out
    }

    fn jobs_of(p: &Packed) -> Vec<Job> {
        let Packed::Message {
            payload,
            message_id,
            jobs,
        } = p
        else {
            panic!("not a message: {p:?}");
        };
        let decoded: Vec<Job> = match JobMessage::decode(payload).unwrap() {
            JobMessage::One(job) => vec![job],
            JobMessage::Group { jobs, .. } => jobs.into_iter().map(Result::unwrap).collect(),
        };
        assert_eq!(decoded.len() as u64, *jobs);
        assert_eq!(*message_id, message::message_id(&decoded).to_string());
        decoded
    }

    #[test]
    fn rows_become_messages_of_n_jobs_and_answers_in_the_order_of_the_file() {
        let mut text = String::from("RegionId,KeyPairName\n");
        for i in 0..20 {
            if i == 9 {
                // Breaks Alibaba's name rule (it must start with a letter).
                text.push_str("cn-hangzhou,9bad\n");
            } else {
                text.push_str(&format!("cn-hangzhou,web-{i:02}\n"));
            }
        }
        text.push_str("cn-hangzhou,too,many\n");
        let out = packed(&text, JobsPerMessage::Fixed(8));
        // Rows 0..8 fill the first message; row 9 is answered where it stands, before the
        // message it would have joined; the rest fill a second message and a last one of 3.
        let kinds: Vec<&str> = out
            .iter()
            .map(|p| match p {
                Packed::Message { .. } => "message",
                Packed::Answer(_) => "answer",
                Packed::Unencodable(_) => "unencodable",
            })
            .collect();
        assert_eq!(
            kinds,
            ["message", "answer", "message", "answer", "message"],
            "{out:?}"
        );
        let names: Vec<String> = [&out[0], &out[2], &out[4]]
            .iter()
            .flat_map(|p| jobs_of(p))
            .map(|j| j.params["KeyPairName"].clone())
            .collect();
        let want: Vec<String> = (0..20)
            .filter(|i| *i != 9)
            .map(|i| format!("web-{i:02}"))
            .collect();
        assert_eq!(names, want);
        assert_eq!(jobs_of(&out[0]).len(), 8);
        assert_eq!(jobs_of(&out[4]).len(), 3);
        let Packed::Answer(bad_name) = &out[1] else {
            unreachable!()
        };
        assert_eq!(bad_name.line, Some(11));
        let Status::Failed(failure) = &bad_name.status else {
            panic!("{bad_name:?}");
        };
        assert_eq!(failure.code, "InvalidKeyPairName.Malformed");
        let Packed::Answer(bad_row) = &out[3] else {
            unreachable!()
        };
        assert_eq!(bad_row.line, Some(22));
        assert!(matches!(bad_row.status, Status::Failed(_)));
    }

    /// Under `auto`, the plan counts the jobs packed, not the rows read: a row answered at once
    /// (not a job) neither fills a message nor moves the plan on.
    #[test]
    fn auto_counts_packed_jobs_not_rows() {
        let mut text = String::from("RegionId,KeyPairName\n");
        for i in 0..300 {
            if i == 5 {
                text.push_str("cn-hangzhou,9bad\n");
            } else {
                text.push_str(&format!("cn-hangzhou,web-{i:03}\n"));
            }
        }
        let out = packed(&text, JobsPerMessage::Auto);
        let sizes: Vec<usize> = out
            .iter()
            .filter(|p| matches!(p, Packed::Message { .. }))
            .map(|p| jobs_of(p).len())
            .collect();
        // 299 jobs: 32 messages of 8 (256 jobs), then one of 32 and the last 11.
        let mut want = vec![8; 32];
        want.extend([32, 11]);
        assert_eq!(sizes, want);
        assert_eq!(JobsPerMessage::Auto.messages(299), want.len() as u64);
        assert_eq!(
            out.iter()
                .filter(|p| matches!(p, Packed::Answer(_)))
                .count(),
            1
        );
    }

    #[test]
    fn one_job_a_message_is_a_v1_message_under_the_jobs_own_id() {
        let out = packed(
            "RegionId,KeyPairName\ncn-hangzhou,a1\ncn-hangzhou,a2\n",
            JobsPerMessage::Fixed(1),
        );
        assert_eq!(out.len(), 2);
        for p in &out {
            let jobs = jobs_of(p);
            let Packed::Message { message_id, .. } = p else {
                unreachable!()
            };
            assert_eq!(*message_id, jobs[0].job_id.to_string());
        }
    }

    #[test]
    fn a_long_file_goes_in_runs_of_growing_messages_and_every_row_arrives_once() {
        let mut text = String::from("RegionId,KeyPairName\n");
        for i in 0..5000 {
            text.push_str(&format!("cn-hangzhou,host-{i:05}\n"));
        }
        let out = packed(&text, JobsPerMessage::Auto);
        // The plan's sizes, message by message: 32 of 8, then 32s, the last one partly full.
        let sizes: Vec<usize> = out.iter().map(|p| jobs_of(p).len()).collect();
        assert_eq!(sizes.len() as u64, JobsPerMessage::Auto.messages(5000));
        assert!(sizes[..32].iter().all(|&n| n == 8), "{sizes:?}");
        assert!(
            sizes[32..sizes.len() - 1].iter().all(|&n| n == 32),
            "{sizes:?}"
        );
        assert_eq!(sizes.last(), Some(&((5000 - 256) % 32)));
        let mut names: Vec<String> = out
            .iter()
            .flat_map(jobs_of)
            .map(|j| j.params["KeyPairName"].clone())
            .collect();
        assert_eq!(names.len(), 5000);
        names.dedup();
        assert_eq!(names.len(), 5000);
    }
}
