//! Where a job's result goes: one trait for every mode, so "delivered" means one thing.
//!
//! - [`key_files`]: the output folder (`keyfleet run`, `keyfleet collect`): the private key
//!   becomes a 0600 file.
//! - [`results_queue`]: the batch's RabbitMQ results queue (the worker), confirmed by the
//!   broker, plus the batch's progress in Redis; [`result_group`] publishes the answers of a
//!   v2 job message's jobs as one message.
//! - [`http_reply`]: the HTTP answer of one API request (`keyfleet serve`).
//!
//! The lifecycle (`lifecycle.rs`) calls [`Sink::deliver`] once per result; only when it succeeds
//! is a created pair marked delivered in the registry (or, for a sink whose delivery cannot
//! fail, [`Sink::DELIVERED_AT_COMMIT`], the pair was committed delivered), and only then is
//! [`Sink::settled`] told.
//! A sink whose destinations outlive a crash (key files) also says what a destination already
//! holds ([`Sink::at_destination`]), so a rerun takes up the key an interrupted attempt left
//! there instead of making another.

pub mod files;
pub mod folder;
pub mod http_reply;
pub mod key_files;
pub mod result_group;
pub mod results_queue;
pub mod transit;

use std::future::Future;

use uuid::Uuid;

use crate::dialect::Scope;
use crate::job::JobResult;
use crate::keys::keygen::KeyMaterial;
use crate::registry::RegistryError;

pub use http_reply::HttpReply;
pub use key_files::KeyFiles;
pub use results_queue::ResultsQueue;

/// Why a result did not reach its destination. The variant decides what happens to the job.
#[derive(Clone, Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The destination can never take this result (its results queue does not exist, its key
    /// file cannot be written): the pair is released and the job dead-lettered or answered
    /// with an internal error.
    #[error("{0}")]
    Undeliverable(String),
    /// The destination did not confirm; the result may or may not have arrived. The job is
    /// handed back and its next attempt replaces the pair, so a copy that did arrive is
    /// recognised as superseded by whoever reads it.
    #[error("{0}")]
    Unconfirmed(String),
}

/// What a sink's destination for a key pair already holds.
#[derive(Debug)]
pub enum AtDestination {
    /// Nothing: the result is delivered there as usual.
    Free,
    /// A private key (a key file an earlier attempt wrote). The lifecycle takes it up when the
    /// registry shows it is one of the job's own keys, and refuses the job otherwise.
    Key {
        key: KeyMaterial,
        /// Where it is, for messages.
        at: String,
    },
    /// Something this sink never replaces (a symlink, a file that is not a key, a folder):
    /// the job's result cannot be delivered there.
    Occupied(String),
}

pub trait Sink: Send + Sync {
    /// Whether a job whose key pair was delivered before is answered again when it comes back
    /// (`AlreadyExist`: a new manifest needs a line per row), or acknowledged without a second
    /// answer (a queue already carries the job's one answer).
    const ANSWERS_REPEATED_JOBS: bool;

    /// Whether delivering is a hand-over inside this process that cannot fail (the key goes to
    /// the HTTP handler that renders the answer): the pair is then committed delivered, and no
    /// separate delivered mark is written — on a registry whose failed commits certainly did
    /// not happen (`Registry::FAILED_COMMIT_IS_CERTAIN`; Redis keeps the mark). A sink that
    /// can fail, or whose destination must confirm, keeps the default: committed undelivered,
    /// marked once delivery is confirmed.
    const DELIVERED_AT_COMMIT: bool = false;

    /// Hands `result` to the destination, with its private key when it was created. The key is
    /// out of `result` afterwards, delivered or dropped (zeroized).
    fn deliver(
        &self,
        result: &mut JobResult,
    ) -> impl Future<Output = Result<(), DeliveryError>> + Send;

    /// What the destination of `name` in `scope` holds now. Sinks that keep nothing between
    /// attempts (a queue, an HTTP answer) are always free.
    fn at_destination(
        &self,
        _scope: &Scope,
        _name: &str,
    ) -> impl Future<Output = AtDestination> + Send {
        async { AtDestination::Free }
    }

    /// Resolves when the job's answer can no longer be taken: a worker's channel to RabbitMQ
    /// closed, so the job can be neither acked nor handed back, and RabbitMQ has given it to
    /// another worker. The lifecycle then stops before delivery, as a crash there would, and
    /// leaves the name to the job's other attempt. Never, for a sink whose caller stays (a
    /// file; an HTTP reply, whose dropped connection drops the request's future itself).
    fn gone(&self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }

    /// The job is answered for good (its pair, if any, is marked delivered): record it with the
    /// outcome label. Retried by the lifecycle while it fails with a storage error.
    fn settled(
        &self,
        batch_id: &str,
        job_id: Uuid,
        outcome: &str,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// [`Sink::settled`] for several jobs of one batch at once: the jobs of a v2 message, whose
    /// settling the message's sinks left to the end of the message. One by one, unless the
    /// sink can record them together.
    fn settled_many(
        &self,
        batch_id: &str,
        outcomes: &[(Uuid, &str)],
    ) -> impl Future<Output = Result<(), RegistryError>> + Send {
        async move {
            for (job_id, outcome) in outcomes {
                self.settled(batch_id, *job_id, outcome).await?;
            }
            Ok(())
        }
    }
}

/// `error: cause: cause` on one line, each cause once (for messages that outlive the error).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
