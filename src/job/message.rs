//! A job message on the wire: v1 carries one job, v2 several jobs of one batch. `submit` packs
//! rows into v2 messages (`--jobs-per-message`, sized by [`super::jobs_per_message`]) so that
//! RabbitMQ handles one message, one confirm and one ack for many jobs; a worker reads both,
//! so other producers' v1 messages keep working. Each job inside a v2 message is a whole v1 job, decoded on its own: one bad
//! job is answered and dead-lettered alone, the others run.

use serde::Deserialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use super::{check_batch_id, DecodeError, Job, MESSAGE_VERSION};

/// The version of a message that carries several jobs.
pub const GROUP_VERSION: u32 = 2;

/// The most jobs one v2 message may carry: a message stays well under RabbitMQ's frame and
/// memory comfort (a job is ~200 bytes), and one redelivery never repeats more than this.
pub const MAX_JOBS_PER_MESSAGE: usize = 1000;

/// What a job message holds.
#[derive(Debug)]
pub enum JobMessage {
    /// A v1 message: one job.
    One(Job),
    /// A v2 message: its batch, and each job in the order it was published, decoded on its own.
    Group {
        batch_id: String,
        jobs: Vec<Result<Job, BadJob>>,
    },
}

/// A job of a v2 message that does not decode: its own bytes (dead-lettered alone) and why.
#[derive(Debug)]
pub struct BadJob {
    pub bytes: Vec<u8>,
    pub error: DecodeError,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupIn {
    #[allow(dead_code)]
    v: u32,
    batch_id: String,
    jobs: Vec<Box<RawValue>>,
}

/// Encodes `jobs` as one message: v1 for a single job, v2 for several. All of them must be of
/// one batch (the message's `correlation_id`); `submit` never mixes batches.
pub fn encode(jobs: &[Job]) -> Result<Vec<u8>, serde_json::Error> {
    let mut writer = Writer::default();
    writer.reserve(jobs.len());
    for job in jobs {
        writer.push(job)?;
    }
    Ok(match writer.finish() {
        Some((payload, ..)) => payload,
        // Nothing publishes an empty message; this is what the format would make of one.
        None => br#"{"v":2,"batch_id":"","jobs":[]}"#.to_vec(),
    })
}

/// The `message_id` of a message of `jobs`: the job id for one job; for several, a name-based
/// UUID of their ids, so a message published again (a rerun) has the same id.
pub fn message_id(jobs: &[Job]) -> Uuid {
    match jobs {
        [job] => job.job_id,
        _ => {
            let ids: Vec<&[u8]> = jobs.iter().map(|j| &j.job_id.as_bytes()[..]).collect();
            crate::job::name_based_id(&ids)
        }
    }
}

/// One message written a job at a time, as [`encode`] writes it (`encode` is this writer over
/// a slice). Each job is encoded when it is pushed, so the caller need not keep it: the
/// packer pushes the batch reader's one lent job, written over by each row
/// ([`super::batch::BatchInput::lend_rows`]). Before, it kept a message's 32 jobs and freed
/// them together, which overflowed glibc's per-thread cache of small blocks (docs/benchmarks.md,
/// 2026-12-07 (Emerald Rapids)).
#[derive(Default)]
pub struct Writer {
    out: Vec<u8>,
    /// Where the first job starts in `out`, after the v2 opening.
    jobs_at: usize,
    jobs: u64,
    first_id: Uuid,
    /// The jobs' ids one after another, for a v2 message's id ([`message_id`]).
    ids: Vec<u8>,
}

impl Writer {
    /// Room for a message of about `jobs` jobs (~200 bytes each), taken before the first push.
    pub fn reserve(&mut self, jobs: usize) {
        self.out.reserve(256 * jobs.max(1));
    }

    /// Jobs pushed since the last [`Writer::finish`].
    pub fn jobs(&self) -> u64 {
        self.jobs
    }

    /// Adds `job`, which must be of the first job's batch. A job that does not serialize
    /// leaves the message unfinishable: the caller stops.
    pub fn push(&mut self, job: &Job) -> Result<(), serde_json::Error> {
        if self.jobs == 0 {
            self.out.extend_from_slice(br#"{"v":"#);
            self.out
                .extend_from_slice(itoa::Buffer::new().format(GROUP_VERSION).as_bytes());
            self.out.extend_from_slice(br#","batch_id":"#);
            write_str(&mut self.out, &job.batch_id)?;
            self.out.extend_from_slice(br#","jobs":["#);
            self.jobs_at = self.out.len();
            self.first_id = job.job_id;
        } else {
            self.out.push(b',');
        }
        write_job(&mut self.out, job)?;
        self.ids.extend_from_slice(job.job_id.as_bytes());
        self.jobs += 1;
        Ok(())
    }

    /// The message of the jobs pushed so far — a v1 message for one job, v2 for several — its
    /// `message_id` and how many jobs it holds; `None` when none were. The writer starts over,
    /// empty.
    pub fn finish(&mut self) -> Option<(Vec<u8>, Uuid, u64)> {
        let jobs = std::mem::take(&mut self.jobs);
        if jobs == 0 {
            return None;
        }
        let id = if jobs == 1 {
            // One job is its own message (v1), without the v2 opening.
            self.out.drain(..self.jobs_at);
            self.first_id
        } else {
            self.out.extend_from_slice(b"]}");
            crate::job::name_based_id(&[&self.ids])
        };
        self.ids.clear();
        Some((std::mem::take(&mut self.out), id, jobs))
    }
}

/// A job as `serde_json::to_writer(out, job)` writes it, byte for byte (a test holds the two
/// to each other over arbitrary jobs), but with a string that needs no escaping copied as it
/// is: serde_json looks at a string a byte at a time, which was 14 % of `submit`'s packing
/// thread's samples (22 % of its instructions). A string that does need escaping is left to
/// serde_json.
fn write_job(out: &mut Vec<u8>, job: &Job) -> Result<(), serde_json::Error> {
    // Every field named, so a field added to `Job` does not compile until it is written here.
    let Job {
        v,
        job_id,
        batch_id,
        line,
        provider,
        owner,
        params,
        key_bits,
    } = job;
    let mut digits = itoa::Buffer::new();
    out.extend_from_slice(br#"{"v":"#);
    out.extend_from_slice(digits.format(*v).as_bytes());
    out.extend_from_slice(br#","job_id":""#);
    out.extend_from_slice(
        job_id
            .hyphenated()
            .encode_lower(&mut Uuid::encode_buffer())
            .as_bytes(),
    );
    out.extend_from_slice(br#"","batch_id":"#);
    write_str(out, batch_id)?;
    if let Some(line) = line {
        out.extend_from_slice(br#","line":"#);
        out.extend_from_slice(digits.format(*line).as_bytes());
    }
    out.extend_from_slice(br#","provider":"#);
    write_str(out, provider.as_str())?;
    out.extend_from_slice(br#","owner":"#);
    write_str(out, owner)?;
    out.extend_from_slice(br#","params":{"#);
    for (i, (name, value)) in params.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, name)?;
        out.push(b':');
        write_str(out, value)?;
    }
    out.extend_from_slice(br#"},"key_bits":"#);
    out.extend_from_slice(digits.format(u32::from(*key_bits)).as_bytes());
    out.push(b'}');
    Ok(())
}

/// A JSON string: quoted as it is when nothing in it needs escaping (JSON escapes only `"`,
/// `\` and control characters below U+0020, and serde_json nothing else), by serde_json when
/// something does.
fn write_str(out: &mut Vec<u8>, s: &str) -> Result<(), serde_json::Error> {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        Ok(())
    } else {
        serde_json::to_writer(out, s)
    }
}

impl JobMessage {
    /// Reads a job message of either version. The version is looked at first, so a message
    /// of a later version is reported as such whatever its fields.
    pub fn decode(data: &[u8]) -> Result<JobMessage, DecodeError> {
        #[derive(Deserialize)]
        struct Versioned {
            v: u64,
        }
        match serde_json::from_slice::<Versioned>(data) {
            Ok(Versioned { v }) if v == u64::from(GROUP_VERSION) => Self::decode_group(data),
            Ok(Versioned { v }) if v != u64::from(MESSAGE_VERSION) => {
                Err(DecodeError::UnsupportedVersion(v))
            }
            _ => Job::decode(data).map(JobMessage::One),
        }
    }

    fn decode_group(data: &[u8]) -> Result<JobMessage, DecodeError> {
        let group: GroupIn = serde_json::from_slice(data)
            .map_err(|e| DecodeError::NotAJob(format!("a v2 message: {e}")))?;
        check_batch_id(&group.batch_id)?;
        if group.jobs.is_empty() || group.jobs.len() > MAX_JOBS_PER_MESSAGE {
            return Err(DecodeError::NotAJob(format!(
                "a v2 message holds 1 to {MAX_JOBS_PER_MESSAGE} jobs, this one {}",
                group.jobs.len()
            )));
        }
        let jobs = group
            .jobs
            .into_iter()
            .map(|raw| {
                let bytes = raw.get().as_bytes();
                let bad = |error| BadJob {
                    bytes: bytes.to_vec(),
                    error,
                };
                match Job::decode(bytes) {
                    Ok(job) if job.batch_id == group.batch_id => Ok(job),
                    Ok(job) => Err(bad(DecodeError::NotAJob(format!(
                        "a job of batch {:?} in a v2 message of batch {:?}",
                        job.batch_id, group.batch_id
                    )))),
                    // A job inside a v2 message is a v1 job; a group in a group is not a job.
                    Err(e) => Err(bad(e)),
                }
            })
            .collect();
        Ok(JobMessage::Group {
            batch_id: group.batch_id,
            jobs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::Provider;
    use crate::keys::keygen::KeyBits;
    use serde::Serialize;

    fn job(batch: &str, line: u64) -> Job {
        Job {
            v: MESSAGE_VERSION,
            job_id: crate::job::job_id(batch, line),
            batch_id: batch.into(),
            line: Some(line),
            provider: Provider::Aliyun,
            owner: "acme".into(),
            params: [
                ("RegionId".to_owned(), "cn-hangzhou".to_owned()),
                ("KeyPairName".to_owned(), format!("web-{line}")),
            ]
            .into_iter()
            .collect(),
            key_bits: KeyBits::B2048,
        }
    }

    /// The v2 format as serde's derive writes it: what [`Writer`] must write byte for byte.
    #[derive(Serialize)]
    struct GroupOut<'a> {
        v: u32,
        batch_id: &'a str,
        jobs: &'a [Job],
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]
        /// The hand-written job is serde's, byte for byte, whatever the strings hold: quotes,
        /// backslashes, control characters, DEL, non-ASCII.
        #[test]
        fn a_job_is_written_as_serde_writes_it(
            batch in "(?s).{0,12}",
            owner in "[\\x00-\\x7f\"\\\\é\u{2028}\u{1F600}]{0,12}",
            params in proptest::collection::btree_map(
                "[a-zA-Z.\\x00-\\x1f\"\\\\]{0,10}", "(?s).{0,16}", 0..5),
            line in proptest::option::of(proptest::num::u64::ANY),
            ucloud in proptest::bool::ANY,
            bits in proptest::sample::select(vec![KeyBits::B2048, KeyBits::B3072, KeyBits::B4096]),
        ) {
            let job = Job {
                v: MESSAGE_VERSION,
                job_id: Uuid::new_v4(),
                batch_id: batch,
                line,
                provider: if ucloud { Provider::Ucloud } else { Provider::Aliyun },
                owner,
                params,
                key_bits: bits,
            };
            let mut out = Vec::new();
            write_job(&mut out, &job).unwrap();
            proptest::prop_assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(&job).unwrap()
            );
        }
    }

    #[test]
    fn the_writer_writes_what_serde_writes_and_starts_over_after_each_message() {
        let mut writer = Writer::default();
        assert!(writer.finish().is_none());
        for n in [1, 2, 1, 32, 3] {
            // A batch id and a name that need escaping, and a line that changes the width.
            let jobs: Vec<Job> = (0..n)
                .map(|l| {
                    let mut j = job("b\"\\\u{1}é", 9 + l);
                    j.params.insert("KeyPairName".into(), format!("a\"\n{l}"));
                    j
                })
                .collect();
            writer.reserve(jobs.len());
            for j in &jobs {
                writer.push(j).unwrap();
            }
            assert_eq!(writer.jobs(), n);
            let (payload, id, count) = writer.finish().unwrap();
            assert_eq!(count, n);
            let want = if n == 1 {
                serde_json::to_vec(&jobs[0]).unwrap()
            } else {
                serde_json::to_vec(&GroupOut {
                    v: GROUP_VERSION,
                    batch_id: &jobs[0].batch_id,
                    jobs: &jobs,
                })
                .unwrap()
            };
            assert_eq!(String::from_utf8(payload.clone()), String::from_utf8(want));
            assert_eq!(id, message_id(&jobs));
            assert_eq!(payload, encode(&jobs).unwrap());
            assert_eq!(writer.jobs(), 0);
        }
    }

    #[test]
    fn one_job_is_a_v1_message_and_several_a_v2_message_read_back_in_order() {
        let one = encode(&[job("b", 2)]).unwrap();
        assert!(
            matches!(JobMessage::decode(&one).unwrap(), JobMessage::One(j) if j == job("b", 2))
        );
        let jobs: Vec<Job> = (2..7).map(|l| job("b", l)).collect();
        let many = encode(&jobs).unwrap();
        match JobMessage::decode(&many).unwrap() {
            JobMessage::Group {
                batch_id,
                jobs: got,
            } => {
                assert_eq!(batch_id, "b");
                let got: Vec<Job> = got.into_iter().map(Result::unwrap).collect();
                assert_eq!(got, jobs);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(message_id(&jobs[..1]), jobs[0].job_id);
        assert_eq!(message_id(&jobs), message_id(&jobs.clone()));
        assert_ne!(message_id(&jobs), message_id(&jobs[1..]));
    }

    #[test]
    fn a_bad_job_in_a_v2_message_is_refused_alone() {
        let good = serde_json::to_string(&job("b", 2)).unwrap();
        let other_batch = serde_json::to_string(&job("c", 3)).unwrap();
        let data = format!(
            r#"{{"v":2,"batch_id":"b","jobs":[{good},{{"v":1,"job_id":"x"}},{other_batch},{{"v":2,"batch_id":"b","jobs":[{good}]}}]}}"#
        );
        let JobMessage::Group { jobs, .. } = JobMessage::decode(data.as_bytes()).unwrap() else {
            panic!("not a group");
        };
        assert_eq!(jobs.len(), 4);
        assert!(jobs[0].is_ok());
        let bad = jobs[1].as_ref().unwrap_err();
        assert_eq!(bad.bytes, br#"{"v":1,"job_id":"x"}"#);
        assert!(matches!(bad.error, DecodeError::NotAJob(_)));
        let bad = jobs[2].as_ref().unwrap_err();
        assert!(
            bad.error.to_string().contains("batch \"c\""),
            "{}",
            bad.error
        );
        let bad = jobs[3].as_ref().unwrap_err();
        assert!(matches!(bad.error, DecodeError::UnsupportedVersion(2)));
    }

    #[test]
    fn a_v2_message_with_no_jobs_too_many_a_bad_batch_or_an_unknown_field_is_not_a_job() {
        let good = serde_json::to_string(&job("b", 2)).unwrap();
        let too_many = vec![good.as_str(); MAX_JOBS_PER_MESSAGE + 1].join(",");
        for data in [
            r#"{"v":2,"batch_id":"b","jobs":[]}"#.to_owned(),
            format!(r#"{{"v":2,"batch_id":"b","jobs":[{too_many}]}}"#),
            format!(r#"{{"v":2,"batch_id":"","jobs":[{good}]}}"#),
            format!(r#"{{"v":2,"batch_id":"b","jobs":[{good}],"extra":1}}"#),
            r#"{"v":2,"batch_id":"b","jobs":{}}"#.to_owned(),
        ] {
            let err = JobMessage::decode(data.as_bytes()).unwrap_err();
            assert!(
                matches!(err, DecodeError::NotAJob(_) | DecodeError::BatchId),
                "{err:?}"
            );
        }
        let err = JobMessage::decode(br#"{"v":3,"jobs":[]}"#).unwrap_err();
        assert!(matches!(err, DecodeError::UnsupportedVersion(3)));
    }
}
