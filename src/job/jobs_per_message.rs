//! How many jobs `submit` (and `rotate`) pack into each message of a batch
//! (`--jobs-per-message`). A message goes to one worker, so its size trades the broker's work
//! a job (one publish, confirm, ack and results round for the whole message) against how
//! widely a batch spreads over the workers. `auto`, the default, starts small so that a small
//! batch reaches many workers, and grows once the batch is large enough to keep every worker
//! busy anyway. Measured in docs/benchmarks.md ("jobs a message").

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

use super::message::MAX_JOBS_PER_MESSAGE;

/// With `auto`: jobs a message at the start of a batch. 32 messages of 8 for the first 256
/// jobs reach up to 32 workers, however few jobs a batch has; a larger batch has more
/// messages than that anyway.
pub const AUTO_FIRST: usize = 8;

/// With `auto`: the jobs of a batch packed [`AUTO_FIRST`] to a message before messages grow.
/// A multiple of [`AUTO_FIRST`], so the first large message starts right after it.
pub const AUTO_FIRST_JOBS: u64 = 256;

/// With `auto`: jobs a message after the first [`AUTO_FIRST_JOBS`]. Against 8, 32 halved
/// RabbitMQ's CPU a key and cut the collector's by a quarter to a third (docs/benchmarks.md,
/// 2026-12-06 evening), while a worker's prefetch (72 messages on two threads) holds ~2,300
/// jobs, ~10 s of its keys.
pub const AUTO_THEN: usize = 32;

/// The packing plan of a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum JobsPerMessage {
    /// [`AUTO_FIRST`] jobs a message for the first [`AUTO_FIRST_JOBS`] jobs, [`AUTO_THEN`] after.
    #[default]
    Auto,
    /// This many jobs a message, 1 to [`MAX_JOBS_PER_MESSAGE`] (1: v1 messages, one job each).
    Fixed(usize),
}

impl JobsPerMessage {
    /// The size of the next message once `packed` jobs of the batch are in messages already.
    pub fn next(self, packed: u64) -> usize {
        match self {
            JobsPerMessage::Auto if packed < AUTO_FIRST_JOBS => AUTO_FIRST,
            JobsPerMessage::Auto => AUTO_THEN,
            JobsPerMessage::Fixed(n) => n.clamp(1, MAX_JOBS_PER_MESSAGE),
        }
    }

    /// The most jobs any message of the plan holds.
    pub fn largest(self) -> usize {
        self.next(u64::MAX)
    }

    /// The plan for a batch published while `workers` consumers are on the jobs queue (as
    /// RabbitMQ answers its declare). `auto`'s small first messages are there to spread a
    /// batch's start over many workers. With exactly one consuming, they spread nothing: its
    /// prefetch (by default 64 messages and more) takes all 32 of them at once. They only
    /// multiply the work paid a message at the keys' pace — the broker's, the worker's results
    /// round and the collector's — so `auto` packs [`AUTO_THEN`] from the first job. Measured
    /// with one worker on two cores: 91–97 % of raw key generation end to end in seven runs,
    /// against 87–95 % in seven (docs/benchmarks.md, 2026-12-07 (one worker)). With none
    /// consuming yet (workers started later) or several, `auto` is kept as it is; a number is
    /// always kept.
    pub fn for_workers(self, workers: u32) -> JobsPerMessage {
        match self {
            JobsPerMessage::Auto if workers == 1 => JobsPerMessage::Fixed(AUTO_THEN),
            plan => plan,
        }
    }

    /// How many messages `jobs` valid jobs become.
    pub fn messages(self, jobs: u64) -> u64 {
        let (mut packed, mut messages) = (0u64, 0u64);
        while packed < jobs {
            let n = self.next(packed) as u64;
            // Whole runs of one size at once: a million jobs is not a million steps.
            let same = match self {
                JobsPerMessage::Auto if packed < AUTO_FIRST_JOBS => {
                    (AUTO_FIRST_JOBS.min(jobs) - packed).div_ceil(n)
                }
                _ => (jobs - packed).div_ceil(n),
            };
            messages += same;
            packed += same * n;
        }
        messages
    }
}

/// Where a stream of jobs is in its plan: the batch it is on, and how many of that batch's
/// jobs are in messages already. A batch of its own starts the plan over, as does the first
/// job after [`Cursor::restart`]. The packer of one batch file only sizes and seals
/// (`size`, `sealed`); `ConfirmWindow`, which may see several batches and drains between
/// waves, also asks `on` and calls `start`.
#[derive(Clone, Debug)]
pub struct Cursor {
    plan: JobsPerMessage,
    batch: Option<String>,
    packed: u64,
}

impl Cursor {
    pub fn new(plan: JobsPerMessage) -> Self {
        Cursor {
            plan,
            batch: None,
            packed: 0,
        }
    }

    /// Whether a job of `batch` goes on with the plan. When it does not, the jobs gathered
    /// before it go out first, in a message of their own, and then [`Cursor::start`].
    pub fn on(&self, batch: &str) -> bool {
        self.batch.as_deref() == Some(batch)
    }

    /// The plan over, for `batch`.
    pub fn start(&mut self, batch: &str) {
        self.batch = Some(batch.to_owned());
        self.packed = 0;
    }

    /// The size of the message being gathered.
    pub fn size(&self) -> usize {
        self.plan.next(self.packed)
    }

    /// `jobs` more jobs went out in a message.
    pub fn sealed(&mut self, jobs: usize) {
        self.packed += jobs as u64;
    }

    /// What comes next starts the plan over, whatever its batch.
    pub fn restart(&mut self) {
        self.batch = None;
    }

    /// The most jobs any message of the plan holds.
    pub fn largest(&self) -> usize {
        self.plan.largest()
    }
}

impl fmt::Display for JobsPerMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobsPerMessage::Auto => f.write_str("auto"),
            JobsPerMessage::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl FromStr for JobsPerMessage {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("auto") {
            return Ok(JobsPerMessage::Auto);
        }
        match s.parse::<usize>() {
            Ok(n) if (1..=MAX_JOBS_PER_MESSAGE).contains(&n) => Ok(JobsPerMessage::Fixed(n)),
            _ => Err(format!(
                "must be auto or 1 to {MAX_JOBS_PER_MESSAGE} \
                 (--jobs-per-message / KEYFLEET_JOBS_PER_MESSAGE)"
            )),
        }
    }
}

/// `"auto"` or the number, as the flag takes it.
impl Serialize for JobsPerMessage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            JobsPerMessage::Auto => s.serialize_str("auto"),
            JobsPerMessage::Fixed(n) => s.serialize_u64(*n as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_packs_eight_a_message_for_the_first_256_jobs_then_32() {
        let plan = JobsPerMessage::Auto;
        assert_eq!(plan.next(0), 8);
        assert_eq!(plan.next(248), 8);
        assert_eq!(plan.next(256), 32);
        assert_eq!(plan.largest(), 32);
        assert_eq!(plan.messages(0), 0);
        assert_eq!(plan.messages(5), 1);
        assert_eq!(plan.messages(256), 32);
        assert_eq!(plan.messages(257), 33);
        assert_eq!(plan.messages(1200), 32 + 30);
        assert_eq!(
            plan.messages(1_000_000),
            32 + (1_000_000u64 - 256).div_ceil(32)
        );
    }

    #[test]
    fn auto_with_one_worker_consuming_packs_32_from_the_first_job() {
        assert_eq!(
            JobsPerMessage::Auto.for_workers(1),
            JobsPerMessage::Fixed(AUTO_THEN)
        );
        assert_eq!(JobsPerMessage::Auto.for_workers(1).next(0), 32);
        // No worker yet (a backlog enqueued first), or several to spread over: as it is.
        for workers in [0, 2, 3, 32, 1000] {
            assert_eq!(
                JobsPerMessage::Auto.for_workers(workers),
                JobsPerMessage::Auto
            );
        }
        // A number is the user's: never changed.
        for workers in [0, 1, 2] {
            assert_eq!(
                JobsPerMessage::Fixed(8).for_workers(workers),
                JobsPerMessage::Fixed(8)
            );
            assert_eq!(
                JobsPerMessage::Fixed(1).for_workers(workers),
                JobsPerMessage::Fixed(1)
            );
        }
    }

    #[test]
    fn messages_agree_with_packing_one_message_at_a_time() {
        for plan in [
            JobsPerMessage::Auto,
            JobsPerMessage::Fixed(1),
            JobsPerMessage::Fixed(7),
            JobsPerMessage::Fixed(1000),
        ] {
            for jobs in [0u64, 1, 8, 9, 255, 256, 257, 288, 289, 5000] {
                let (mut packed, mut messages) = (0u64, 0u64);
                while packed < jobs {
                    packed += (plan.next(packed) as u64).min(jobs - packed);
                    messages += 1;
                }
                assert_eq!(plan.messages(jobs), messages, "{plan} {jobs}");
            }
        }
    }

    /// Another batch, or the first job after a restart (a rotation's next wave), is packed as
    /// a batch of its own: small messages first, whatever went before.
    #[test]
    fn a_cursor_starts_the_plan_over_for_another_batch_and_after_a_restart() {
        let mut cursor = Cursor::new(JobsPerMessage::Auto);
        assert!(!cursor.on("a"), "nothing is on before the first job");
        cursor.start("a");
        for _ in 0..32 {
            assert_eq!(cursor.size(), 8);
            cursor.sealed(8);
        }
        assert!(cursor.on("a"));
        assert_eq!(cursor.size(), 32, "past the first 256 jobs of a");
        assert!(!cursor.on("b"));
        cursor.start("b");
        assert_eq!(cursor.size(), 8, "b starts small");
        cursor.sealed(300);
        assert_eq!(cursor.size(), 32);
        cursor.restart();
        assert!(
            !cursor.on("b"),
            "the same batch after a restart starts over"
        );
        cursor.start("b");
        assert_eq!(cursor.size(), 8);
        let mut fixed = Cursor::new(JobsPerMessage::Fixed(5));
        fixed.start("a");
        fixed.sealed(1000);
        assert_eq!(fixed.size(), 5);
    }

    #[test]
    fn parses_auto_and_numbers_and_refuses_the_rest() {
        assert_eq!("auto".parse(), Ok(JobsPerMessage::Auto));
        assert_eq!(" AUTO ".parse(), Ok(JobsPerMessage::Auto));
        assert_eq!("1".parse(), Ok(JobsPerMessage::Fixed(1)));
        assert_eq!("1000".parse(), Ok(JobsPerMessage::Fixed(1000)));
        for bad in ["0", "1001", "-1", "eight", ""] {
            let err = bad.parse::<JobsPerMessage>().unwrap_err();
            assert!(err.contains("auto or 1 to 1000"), "{bad}: {err}");
        }
        assert_eq!(JobsPerMessage::Auto.to_string(), "auto");
        assert_eq!(
            serde_json::to_value(JobsPerMessage::Fixed(8)).unwrap(),
            serde_json::json!(8)
        );
        assert_eq!(
            serde_json::to_value(JobsPerMessage::Auto).unwrap(),
            serde_json::json!("auto")
        );
    }
}
