//! A job message on the wire: v1 carries one job, v2 several jobs of one batch. `submit` packs
//! rows into v2 messages (`--jobs-per-message`, sized by [`super::jobs_per_message`]) so that
//! RabbitMQ handles one message, one confirm and one ack for many jobs; a worker reads both,
//! so other producers' v1 messages keep working. Each job inside a v2 message is a whole v1 job, decoded on its own: one bad
//! job is answered and dead-lettered alone, the others run.

use serde::{Deserialize, Serialize};
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

#[derive(Serialize)]
struct GroupOut<'a> {
    v: u32,
    batch_id: &'a str,
    jobs: &'a [Job],
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
    // A job is ~200 bytes: one allocation for the message, not a run of regrowths.
    let mut out = Vec::with_capacity(256 * jobs.len().max(1));
    match jobs {
        [job] => serde_json::to_writer(&mut out, job)?,
        _ => serde_json::to_writer(
            &mut out,
            &GroupOut {
                v: GROUP_VERSION,
                batch_id: jobs.first().map_or("", |j| j.batch_id.as_str()),
                jobs,
            },
        )?,
    }
    Ok(out)
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
