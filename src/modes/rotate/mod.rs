//! `keyfleet rotate` and `keyfleet retire`: a fleet's key pairs replaced in bulk.
//!
//! A rotation is a batch of create jobs. The pairs to replace (P) are selected as `describe`
//! selects them, and recorded in the registry with their successors' names (S, from a template)
//! and job ids *before* anything is created ([`Rotation`]); every pass then feeds the
//! successors' rows through the one lifecycle, as `run` does (`run::pass`), into one output
//! folder whose manifest lines name the pair each successor replaces. A rerun after a crash
//! finds the recorded rotation and so makes the same jobs, which the lifecycle finishes exactly
//! once. P is deleted (registry and cloud, as `delete` does) only once the registry shows its
//! successor delivered: by `retire`, at the end with `--retire`, or wave by wave with `--waves`.
//!
//! This file runs a rotation in-process on the embedded store; `fleet.rs` runs the same
//! rotation through RabbitMQ and the workers on the Redis registry (`rotate --submit`).

pub mod fleet;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use sha2::Digest;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::dialect::{self, Scope};
use crate::job::batch::Row;
use crate::job::{job_id, Job, JobResult, MESSAGE_VERSION};
use crate::keys::cpu::CpuPool;
use crate::keys::keygen::KeyBits;
use crate::lifecycle::Lifecycle;
use crate::modes::delete::{self, DeleteError, Deleted};
use crate::modes::run::{self, RunError};
use crate::registry::rotation::{Member, Replaced, Rotation};
use crate::registry::{Entry, Filter, Registry, RegistryError};
use crate::retry::RetryPolicy;
use crate::settings::Settings;
use crate::sink::folder::{OutputDir, Written};
use crate::telemetry::progress::{Progress, ProgressMode, Tally};
use crate::upstream::http::HttpUpstream;
use crate::upstream::Upstream;

/// The successor name template's default.
pub const DEFAULT_TEMPLATE: &str = "{name}-{yyyymmdd}";

/// Every rotation id starts with this, so `status` tells a rotation from a batch.
pub const ID_PREFIX: &str = "rot-";

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    /// The template cannot make valid, distinct successor names (a bad setting: exit 2).
    #[error("--successor {template:?}: {why}")]
    Template { template: String, why: String },
    #[error("nothing to rotate: no key pair matches the selection{0}")]
    NothingSelected(String),
    /// Not enough quota to hold every P and its S at once, and no `--waves`.
    #[error("{0}")]
    NoHeadroom(String),
    #[error("no rotation {0} in this registry")]
    NoSuchRotation(String),
    /// `retire` of a rotation through the workers reads its folder, to retire only pairs whose
    /// successor's key is there.
    #[error("rotation {id} collects into {dir}, which cannot be read here (retire it where that folder is)")]
    FolderUnreadable {
        id: String,
        dir: String,
        #[source]
        source: crate::sink::folder::OutputError,
    },
    /// A rotation through the workers collects into one folder: its keys are nowhere else.
    #[error("rotation {id} collects into {recorded}: run it again with --out {recorded} (its successors' keys already written are there, and only there)")]
    OtherFolder { id: String, recorded: String },
    #[error(transparent)]
    Submit(#[from] crate::modes::submit::SubmitError),
    #[error(transparent)]
    Broker(#[from] crate::queue::broker::BrokerError),
    #[error(transparent)]
    Collect(#[from] crate::modes::collect::CollectError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Output(#[from] crate::sink::folder::OutputError),
    #[error(transparent)]
    Cpu(#[from] crate::keys::cpu::CpuError),
    #[error("retiring a replaced pair")]
    Delete(#[from] DeleteError),
}

/// Which pairs a rotation replaces: `describe`'s filter, and optionally a list of names.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub filter: Filter,
    /// Only these names (from `--names-file`), when given.
    pub names: Option<BTreeSet<String>>,
}

impl Selection {
    /// The rotation id a selection and template get when none is given: the same command
    /// finds the same rotation again (a rerun resumes it).
    pub fn derived_id(&self, template: &str) -> String {
        let f = &self.filter;
        let parts = serde_json::json!([
            f.provider.map(|p| p.as_str()),
            f.owner,
            f.region,
            f.name,
            f.fingerprint,
            self.names,
            template,
        ]);
        let digest = sha2::Sha256::digest(parts.to_string().as_bytes());
        format!("{ID_PREFIX}{}", hex::encode(&digest[..8]))
    }
}

#[derive(Clone, Debug)]
pub struct RotateOptions {
    /// `None`: derived from the selection and the template.
    pub rotation_id: Option<String>,
    pub selection: Selection,
    pub template: String,
    pub out: PathBuf,
    pub threads: usize,
    pub settings: Settings,
    pub key_bits: KeyBits,
    pub progress: ProgressMode,
    /// Too little quota for every P and S at once: run in waves that retire as they go.
    pub waves: bool,
    /// Retire every P once every successor is delivered.
    pub retire: bool,
}

/// Free and used slots of one scope, before the rotation starts.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Headroom {
    pub provider: &'static str,
    pub owner: String,
    pub region: String,
    pub used: u64,
    pub quota: u64,
    /// Successors this scope still needs a slot for.
    pub needed: u64,
}

impl Headroom {
    pub fn free(&self) -> u64 {
        self.quota.saturating_sub(self.used)
    }

    fn render(&self) -> String {
        format!(
            "{}/{}/{}: {} of {} used, {} free; {} successor(s) to create",
            self.provider,
            self.owner,
            self.region,
            self.used,
            self.quota,
            self.free(),
            self.needed
        )
    }
}

/// What one `rotate` did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RotateSummary {
    pub rotation_id: String,
    /// The rotation was recorded by an earlier run (this one resumed it).
    pub resumed: bool,
    /// Everything was done before this run: nothing changed.
    pub already_finished: bool,
    pub headroom: Vec<Headroom>,
    pub waves: u32,
    /// Successor jobs published to RabbitMQ (`--submit`).
    pub enqueued: u64,
    #[serde(flatten)]
    pub tally: Tally,
    pub retired: u64,
    pub status: RotationStatus,
    pub manifest: Option<PathBuf>,
    pub interrupted: bool,
    /// Through the workers: results stopped coming for `--idle-timeout` before every
    /// successor of the wave was collected.
    pub incomplete: bool,
}

impl RotateSummary {
    pub fn render(&self) -> String {
        let mut out = String::new();
        if self.already_finished {
            out.push_str(&format!(
                "rotation {} is finished: nothing changed\n",
                self.rotation_id
            ));
            out.push_str(&self.status.render());
            return out;
        }
        out.push_str(&format!(
            "rotation {}{}\n",
            self.rotation_id,
            if self.resumed { " (resumed)" } else { "" }
        ));
        for h in &self.headroom {
            out.push_str(&format!("  quota {}\n", h.render()));
        }
        let t = &self.tally;
        if self.manifest.is_some() {
            out.push_str(&format!(
                "{} successor row(s) in {} wave(s): {} created, {} delivered earlier, {} failed; {} replaced pair(s) retired\n",
                t.rows, self.waves, t.created, t.delivered_earlier, t.failed, self.retired
            ));
        }
        for (code, n) in &t.failed_by_code {
            out.push_str(&format!("  failed {code}: {n}\n"));
        }
        if self.enqueued > 0 {
            out.push_str(&format!(
                "{} successor job(s) enqueued for the workers\n",
                self.enqueued
            ));
        }
        if self.manifest.is_none() {
            out.push_str(&format!(
                "collect the successors' keys with: keyfleet collect {} --out (the same folder)\n",
                self.rotation_id
            ));
        }
        out.push_str(&self.status.render());
        if let Some(m) = &self.manifest {
            out.push_str(&format!("manifest: {}\n", m.display()));
        }
        if self.interrupted {
            out.push_str("interrupted: run the same command again to finish the rotation\n");
        }
        if self.incomplete {
            out.push_str("incomplete: no result came for --idle-timeout (are the workers running?); run the same command again to go on\n");
        }
        out
    }
}

/// Where a rotation stands, member by member, from its record and the registry.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RotationStatus {
    pub rotation_id: String,
    /// Pairs the rotation replaces.
    pub replaced: u64,
    /// Successors delivered (their private keys are in the output folder).
    pub delivered: u64,
    /// Replaced pairs deleted.
    pub retired: u64,
    /// Successors whose last attempt failed, by error code.
    pub failed: BTreeMap<String, u64>,
    /// Successors neither delivered nor failed yet.
    pub pending: u64,
}

impl RotationStatus {
    pub fn render(&self) -> String {
        let mut out = format!(
            "rotation {}: replaced {}, delivered {}, retired {}, failed {}, pending {}\n",
            self.rotation_id,
            self.replaced,
            self.delivered,
            self.retired,
            self.failed.values().sum::<u64>(),
            self.pending
        );
        for (code, n) in &self.failed {
            out.push_str(&format!("  failed {code}: {n}\n"));
        }
        out
    }

    /// Every successor delivered and every replaced pair retired.
    pub fn finished(&self) -> bool {
        self.delivered == self.replaced && self.retired == self.replaced
    }
}

/// Where a member's successor stands in the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Successor {
    Delivered,
    /// Its job holds the name (a reservation or an undelivered pair): its slot is counted.
    Holding,
    /// Nothing under the name yet: creating it takes a slot.
    Missing,
    /// Another job's pair or reservation: the row will answer `KeyPair.AlreadyExist`.
    Taken,
}

fn successor_state(entry: Option<&Entry>, member: &Member, folder: Option<&Written>) -> Successor {
    match entry {
        None => Successor::Missing,
        // Through the workers, a reservation nobody renewed in time is free: the job that
        // held it is gone (its message dead-lettered or lost), and a new one takes it over.
        Some(Entry::Reserved {
            job_id,
            deadline_ms,
            ..
        }) if member.is_job(*job_id) => match folder {
            Some(_) if *deadline_ms <= crate::registry::now_ms() => Successor::Missing,
            _ => Successor::Holding,
        },
        // Through the workers, delivered means in the folder: until collected, the key is on
        // the results queue.
        Some(Entry::Pair(r)) if member.is_job(r.job_id) && r.delivered => match folder {
            Some(w) if w.get(&r.job_id) != Some(&true) => Successor::Holding,
            _ => Successor::Delivered,
        },
        Some(Entry::Pair(r)) if member.is_job(r.job_id) => Successor::Holding,
        Some(_) => Successor::Taken,
    }
}

/// Where each member's successor stands; with `folder` (a rotation through the workers, and
/// what its folder holds), as [`successor_state`] says.
async fn successor_states<R: Registry>(
    registry: &R,
    rotation: &Rotation,
    folder: Option<&Written>,
) -> Result<Vec<Successor>, RegistryError> {
    let mut out = Vec::with_capacity(rotation.members.len());
    for m in &rotation.members {
        let entry = registry.lookup(&m.scope, &m.successor).await?;
        out.push(successor_state(entry.as_ref(), m, folder));
    }
    Ok(out)
}

/// The rotation `id` as it stands.
pub async fn status<R: Registry>(registry: &R, id: &str) -> Result<RotationStatus, RotateError> {
    let rotation = registry
        .rotation(id)
        .await?
        .ok_or_else(|| RotateError::NoSuchRotation(id.to_owned()))?;
    // Through the workers a successor is delivered once its key is in the rotation's folder;
    // where that folder cannot be read (another machine), the registry's view is shown.
    let folder = match folder_of(&rotation) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(
                "{}: counting delivered as the registry does",
                crate::sink::error_chain(&e)
            );
            None
        }
    };
    let states = successor_states(registry, &rotation, folder.as_ref()).await?;
    Ok(status_of(&rotation, &states))
}

/// What the folder of a rotation through the workers holds (`None` for one made in-process,
/// whose keys are in its folder before the registry calls them delivered).
fn folder_of(rotation: &Rotation) -> Result<Option<Written>, RotateError> {
    let Some(dir) = &rotation.out else {
        return Ok(None);
    };
    crate::sink::folder::read_written(std::path::Path::new(dir))
        .map(Some)
        .map_err(|source| RotateError::FolderUnreadable {
            id: rotation.id.clone(),
            dir: dir.clone(),
            source,
        })
}

fn status_of(rotation: &Rotation, states: &[Successor]) -> RotationStatus {
    let mut s = RotationStatus {
        rotation_id: rotation.id.clone(),
        replaced: rotation.members.len() as u64,
        ..RotationStatus::default()
    };
    for (m, state) in rotation.members.iter().zip(states) {
        if m.retired_at.is_some() {
            s.retired += 1;
        }
        if *state == Successor::Delivered {
            s.delivered += 1;
        } else if let Some(code) = &m.failed {
            *s.failed.entry(code.clone()).or_default() += 1;
        } else {
            s.pending += 1;
        }
    }
    crate::telemetry::metrics::rotation_progress(
        s.replaced,
        s.delivered,
        s.retired,
        s.failed.values().sum(),
    );
    s
}

/// `{name}` and `{yyyymmdd}` (the UTC date the rotation is recorded) filled in.
pub fn successor_name(template: &str, name: &str, yyyymmdd: &str) -> String {
    template
        .replace("{name}", name)
        .replace("{yyyymmdd}", yyyymmdd)
}

/// Checks a template's placeholders before any pair is looked at.
pub fn check_template(template: &str) -> Result<(), RotateError> {
    let bad = |why: &str| RotateError::Template {
        template: template.to_owned(),
        why: why.to_owned(),
    };
    if !template.contains("{name}") {
        return Err(bad(
            "must contain {name}, so every successor gets a name of its own",
        ));
    }
    let rest = successor_name(template, "", "");
    if rest.contains('{') || rest.contains('}') {
        return Err(bad("knows only the placeholders {name} and {yyyymmdd}"));
    }
    Ok(())
}

/// Today's date as `yyyymmdd`, UTC.
fn today() -> String {
    let rfc = crate::time::rfc3339(crate::time::unix_now());
    rfc.get(..10).unwrap_or("").replace('-', "")
}

/// The members of a new rotation: every selected pair not already part of an unfinished
/// rotation (as a replaced pair or as a successor), with its successor's name checked against
/// the API's name rules.
async fn select<R: Registry>(
    registry: &R,
    id: &str,
    selection: &Selection,
    template: &str,
) -> Result<Vec<Member>, RotateError> {
    let mut busy: BTreeSet<(Scope, String)> = BTreeSet::new();
    for r in registry.rotations().await? {
        if r.all_retired() {
            continue;
        }
        for m in r.members {
            busy.insert((m.scope.clone(), m.successor.clone()));
            if m.retired_at.is_none() {
                busy.insert((m.scope, m.name));
            }
        }
    }
    let mut records = registry.describe(&selection.filter).await?;
    let matched = records.len();
    // An undelivered pair is not selected: its own job replaces it with another key when it
    // comes back, and nobody holds its private key to swap for a successor.
    records.retain(|r| {
        r.delivered
            && selection.names.as_ref().is_none_or(|n| n.contains(&r.name))
            && !busy.contains(&(r.scope.clone(), r.name.clone()))
    });
    if records.is_empty() {
        let why = if matched > 0 {
            format!(" ({matched} match, each of them undelivered, not in --names-file, or already part of an unfinished rotation)")
        } else {
            String::new()
        };
        return Err(RotateError::NothingSelected(why));
    }
    let date = today();
    let names: BTreeSet<(Scope, String)> = records
        .iter()
        .map(|r| (r.scope.clone(), r.name.clone()))
        .collect();
    let mut successors = BTreeSet::new();
    let mut members = Vec::with_capacity(records.len());
    for (i, r) in records.into_iter().enumerate() {
        let successor = successor_name(template, &r.name, &date);
        let bad = |why: String| RotateError::Template {
            template: template.to_owned(),
            why,
        };
        if !dialect::name_is_valid(r.scope.provider, &successor) {
            return Err(bad(format!(
                "the successor of {} would be {successor:?}, which is not a valid {} KeyPairName",
                r.name,
                r.scope.provider.as_str()
            )));
        }
        if names.contains(&(r.scope.clone(), successor.clone())) {
            return Err(bad(format!(
                "the successor of {} would be {successor:?}, a pair this rotation replaces",
                r.name
            )));
        }
        if !successors.insert((r.scope.clone(), successor.clone())) {
            return Err(bad(format!(
                "two successors would both be named {successor:?}"
            )));
        }
        members.push(Member {
            scope: r.scope.clone(),
            name: r.name.clone(),
            replaces: Replaced::of(&r),
            successor,
            // The line of a batch file this rotation could be: the same id scheme as `run`.
            successor_job_id: job_id(id, i as u64 + 1),
            earlier_job_ids: Vec::new(),
            published: 0,
            publishing: false,
            tags: r.tags,
            resource_group_id: r.resource_group_id,
            zone: r.zone,
            retired_at: None,
            failed: None,
        });
    }
    Ok(members)
}

/// Used and needed slots per scope; `states` are the successors' as they stand.
async fn headroom_of<R: Registry>(
    registry: &R,
    settings: &Settings,
    rotation: &Rotation,
    states: &[Successor],
) -> Result<Vec<Headroom>, RegistryError> {
    let mut needed: BTreeMap<&Scope, u64> = BTreeMap::new();
    for (m, s) in rotation.members.iter().zip(states) {
        let n = needed.entry(&m.scope).or_default();
        if *s == Successor::Missing {
            *n += 1;
        }
    }
    let mut out = Vec::new();
    for (scope, needed) in needed {
        out.push(Headroom {
            provider: scope.provider.as_str(),
            owner: scope.owner.clone(),
            region: scope.region.clone(),
            used: registry.quota_used(scope).await?,
            quota: settings.quota.for_region(&scope.region),
            needed,
        });
    }
    Ok(out)
}

fn headroom_error(short: &[&Headroom], waves: bool, resumed: bool) -> RotateError {
    let mut msg = String::from(
        "not enough key-pair quota: each replaced pair and its successor both count until the replaced pair is retired\n",
    );
    for h in short {
        msg.push_str(&format!("  {}\n", h.render()));
    }
    msg.push_str(match (waves, resumed) {
        (true, _) => "no slot is free for the next wave: retire or delete pairs first",
        (false, false) => "nothing was created; run with --waves to create and retire in waves that fit the free quota",
        (false, true) => "nothing more was created; run with --waves to create and retire in waves that fit the free quota",
    });
    RotateError::NoHeadroom(msg)
}

/// The successor row of member `i`.
fn row(rotation: &Rotation, i: usize, key_bits: KeyBits) -> Row {
    let m = &rotation.members[i];
    Row::Job(Job {
        v: MESSAGE_VERSION,
        job_id: m.successor_job_id,
        batch_id: rotation.id.clone(),
        line: Some(i as u64 + 1),
        provider: m.scope.provider,
        owner: m.scope.owner.clone(),
        params: dialect::create_params(
            &m.scope,
            &m.successor,
            &m.tags,
            m.resource_group_id.as_deref(),
            m.zone.as_deref(),
        ),
        key_bits,
    })
}

/// What `collect` adds to the manifest line of each result that answers a successor of
/// `rotation` (found by job id, or else by scope and name: a rerun may have given the member a
/// new job), looked up in indexes built once.
pub fn annotator(rotation: Rotation) -> crate::modes::collect::Annotator {
    let mut by_job = HashMap::new();
    let mut by_name = HashMap::new();
    for (i, m) in rotation.members.iter().enumerate() {
        for job in m.earlier_job_ids.iter().chain([&m.successor_job_id]) {
            by_job.insert(*job, i);
        }
        by_name.insert((m.scope.key(), m.successor.clone()), i);
    }
    crate::modes::collect::Annotator(Arc::new(move |result: &JobResult| {
        let i = by_job.get(&result.job_id).or_else(|| {
            let (name, region) = (result.key_pair_name.as_ref()?, result.region.as_ref()?);
            let scope = Scope {
                provider: result.provider,
                owner: result.owner.clone(),
                region: region.clone(),
            };
            by_name.get(&(scope.key(), name.clone()))
        })?;
        Some(annotation(&rotation, &rotation.members[*i], result))
    }))
}

/// What a successor's manifest line adds: the rotation, the pair it replaces, and a ready
/// `authorized_keys` line.
fn annotation(
    rotation: &Rotation,
    member: &Member,
    result: &JobResult,
) -> serde_json::Map<String, serde_json::Value> {
    let mut extra = serde_json::Map::new();
    extra.insert("rotation_id".into(), rotation.id.clone().into());
    extra.insert(
        "replaces".into(),
        serde_json::to_value(&member.replaces).unwrap_or_default(),
    );
    if let Some(c) = result.created() {
        extra.insert(
            "authorized_keys".into(),
            format!("{} {}", c.public_key, member.successor).into(),
        );
    }
    extra
}

/// How a rotation starts: finished already, or recorded and ready to go on.
enum Begun {
    Finished(Box<RotateSummary>),
    Go {
        rotation: Rotation,
        resumed: bool,
        headroom: Vec<Headroom>,
    },
}

impl Begun {
    /// A rotation found finished: nothing changed.
    fn finished(rotation_id: String, resumed: bool, status: RotationStatus) -> Begun {
        Begun::Finished(Box::new(RotateSummary {
            rotation_id,
            resumed,
            already_finished: true,
            headroom: Vec::new(),
            waves: 0,
            enqueued: 0,
            tally: Tally::default(),
            retired: 0,
            status,
            manifest: None,
            interrupted: false,
            incomplete: false,
        }))
    }
}

/// What every rotation does first, in-process or through the workers: finds the recorded
/// rotation or selects a new one, answers a finished one, checks the headroom, and records a
/// new one (before anything is created). `folder`, through the workers: the output folder
/// (canonical) and what it holds.
async fn begin<R: Registry>(
    registry: &R,
    opts: &RotateOptions,
    folder: Option<(&str, &Written)>,
) -> Result<Begun, RotateError> {
    check_template(&opts.template)?;
    let id = opts
        .rotation_id
        .clone()
        .unwrap_or_else(|| opts.selection.derived_id(&opts.template));
    let (mut rotation, resumed) = match registry.rotation(&id).await? {
        Some(r) => (r, true),
        None => {
            let members = select(registry, &id, &opts.selection, &opts.template).await?;
            let rotation = Rotation {
                id: id.clone(),
                created_at: crate::time::unix_now(),
                template: opts.template.clone(),
                members,
                out: folder.map(|(dir, _)| dir.to_owned()),
            };
            (rotation, false)
        }
    };
    match (&rotation.out, folder) {
        // Nothing more to collect or retire: finished wherever it is asked.
        (Some(_), Some(_)) if rotation.all_retired() => {
            let states = successor_states(registry, &rotation, None).await?;
            return Ok(Begun::finished(id, resumed, status_of(&rotation, &states)));
        }
        (Some(recorded), Some((dir, _))) if recorded != dir => {
            return Err(RotateError::OtherFolder {
                id,
                recorded: recorded.clone(),
            })
        }
        // Saved with the rotation's next change, before its next job is published.
        (None, Some((dir, _))) => rotation.out = Some(dir.to_owned()),
        _ => {}
    }
    if resumed && rotation.template != opts.template {
        tracing::warn!(
            "rotation {id} was recorded with --successor {:?}: its successors keep those names",
            rotation.template
        );
    }
    let states = successor_states(registry, &rotation, folder.map(|(_, w)| w)).await?;
    let status = status_of(&rotation, &states);
    let retiring = opts.retire || opts.waves;
    if status.finished() || (status.delivered == status.replaced && !retiring) {
        return Ok(Begun::finished(id, resumed, status));
    }
    let headroom = headroom_of(registry, &opts.settings, &rotation, &states).await?;
    let short: Vec<&Headroom> = headroom.iter().filter(|h| h.needed > h.free()).collect();
    // A resumed rotation in waves may find its quota full of its own delivered successors:
    // the first wave retires their replaced pairs, so only a new one is refused here.
    let no_room = short.iter().any(|h| h.free() == 0) && !resumed;
    if !short.is_empty() && (!opts.waves || no_room) {
        return Err(headroom_error(&short, opts.waves, resumed));
    }
    if !resumed {
        // Recorded before anything is created: a rerun finds these members, names and job ids.
        registry.save_rotation(&rotation).await?;
    }

    Ok(Begun::Go {
        rotation,
        resumed,
        headroom,
    })
}

/// Runs (or resumes) a rotation: record, headroom, successors in one pass or in waves, and the
/// retirement `--waves` and `--retire` ask for.
pub async fn rotate<R: Registry, U: Upstream>(
    opts: RotateOptions,
    registry: Arc<R>,
    upstream: Arc<U>,
    cloud: Option<&HttpUpstream>,
    shutdown: CancellationToken,
) -> Result<RotateSummary, RotateError> {
    let (mut rotation, resumed, headroom) = match begin(&*registry, &opts, None).await? {
        Begun::Finished(summary) => return Ok(*summary),
        Begun::Go {
            rotation,
            resumed,
            headroom,
        } => (rotation, resumed, headroom),
    };
    let id = rotation.id.clone();
    let mut out = OutputDir::create(&opts.out)?;
    let cpu = CpuPool::new(opts.threads)?;
    let concurrency = crate::modes::run::concurrency(cpu.threads());
    let lifecycle = Lifecycle::new(
        registry.clone(),
        upstream,
        cpu,
        opts.settings.clone(),
        RetryPolicy::embedded(),
        shutdown.child_token(),
    );
    let mut progress = Progress::new(opts.progress, Some(rotation.members.len() as u64));
    let by_job: HashMap<Uuid, usize> = rotation
        .members
        .iter()
        .enumerate()
        .map(|(i, m)| (m.successor_job_id, i))
        .collect();
    let mut listed = vec![false; rotation.members.len()];
    let mut waves = 0;
    let mut retired = 0;
    // Members left waiting for quota no retirement can free: the error, once the folder and
    // the registry are made durable.
    let mut stuck = None;
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        let next = next_step(
            &*registry,
            cloud,
            &opts,
            &mut rotation,
            None,
            &listed,
            &mut retired,
        )
        .await?;
        let wave = match next {
            Next::Wave { members, .. } => members,
            Next::Done => break,
            Next::Stuck(e) => {
                stuck = Some(e);
                break;
            }
        };
        waves += 1;
        for &i in &wave {
            listed[i] = true;
        }
        let rows: Vec<Row> = wave
            .iter()
            .map(|&i| row(&rotation, i, opts.key_bits))
            .collect();
        let failed = std::sync::Mutex::new(Vec::new());
        let annotate = |result: &JobResult| {
            let i = *by_job.get(&result.job_id)?;
            if !result.is_created() {
                let code = result.outcome_label().to_owned();
                failed.lock().ok()?.push((i, code));
            }
            Some(annotation(&rotation, &rotation.members[i], result))
        };
        let stream = futures::stream::iter(rows).take_until(shutdown.clone().cancelled_owned());
        run::pass(
            &lifecycle,
            &mut out,
            stream,
            &mut progress,
            concurrency,
            &annotate,
        )
        .await?;
        out.flush()?;
        let failed = failed.into_inner().unwrap_or_default();
        let failed_now: HashMap<usize, String> = failed.into_iter().collect();
        for &i in &wave {
            rotation.members[i].failed = failed_now.get(&i).cloned();
        }
        registry.save_rotation(&rotation).await?;
        if opts.waves {
            let states = successor_states(&*registry, &rotation, None).await?;
            retired += retire_delivered(&*registry, cloud, &mut rotation, &states).await?;
        }
    }
    registry.flush().await?;
    let manifest = out.finish()?;
    if let Some(e) = stuck {
        return Err(e);
    }
    let interrupted = shutdown.is_cancelled();
    let mut states = successor_states(&*registry, &rotation, None).await?;
    if opts.retire && !interrupted {
        if states.iter().all(|s| *s == Successor::Delivered) {
            retired += retire_delivered(&*registry, cloud, &mut rotation, &states).await?;
            states = successor_states(&*registry, &rotation, None).await?;
        } else {
            tracing::warn!(
                "rotation {id}: not retiring: some successors are not delivered (see `keyfleet status {id}`)"
            );
        }
    }
    let (tally, _) = progress.finish();
    Ok(RotateSummary {
        rotation_id: id,
        resumed,
        already_finished: false,
        headroom,
        waves,
        enqueued: 0,
        tally,
        retired,
        status: status_of(&rotation, &states),
        manifest: Some(manifest),
        interrupted,
        incomplete: false,
    })
}

/// What a rotation works on next.
enum Next {
    /// These members, with where every member's successor stands.
    Wave {
        members: Vec<usize>,
        states: Vec<Successor>,
    },
    /// Every member was listed by this run.
    Done,
    /// The members left wait for quota no retirement frees (the error, once the output is
    /// made durable).
    Stuck(RotateError),
}

/// The next wave ([`next_wave`]). When none fits the free quota (`--waves`), the delivered
/// members are retired to free slots, and it looks again; `retired` counts them.
async fn next_step<R: Registry>(
    registry: &R,
    cloud: Option<&HttpUpstream>,
    opts: &RotateOptions,
    rotation: &mut Rotation,
    folder: Option<&Written>,
    listed: &[bool],
    retired: &mut u64,
) -> Result<Next, RotateError> {
    loop {
        let states = successor_states(registry, rotation, folder).await?;
        let members = next_wave(registry, opts, rotation, &states, listed).await?;
        if !members.is_empty() {
            return Ok(Next::Wave { members, states });
        }
        if listed.iter().all(|l| *l) {
            return Ok(Next::Done);
        }
        let freed = retire_delivered(registry, cloud, rotation, &states).await?;
        if freed == 0 {
            let now = headroom_of(registry, &opts.settings, rotation, &states).await?;
            let short: Vec<&Headroom> = now.iter().filter(|h| h.needed > 0).collect();
            return Ok(Next::Stuck(headroom_error(&short, true, true)));
        }
        *retired += freed;
    }
}

/// The members of the next pass, in order: every one not yet listed by this run whose successor
/// needs no new slot (delivered, held, or taken by another pair), and — up to the free slots of
/// its scope with `--waves`, all of them without — the ones that do.
async fn next_wave<R: Registry>(
    registry: &R,
    opts: &RotateOptions,
    rotation: &Rotation,
    states: &[Successor],
    listed: &[bool],
) -> Result<Vec<usize>, RegistryError> {
    let mut free: BTreeMap<&Scope, u64> = BTreeMap::new();
    let mut wave = Vec::new();
    for (i, (m, state)) in rotation.members.iter().zip(states).enumerate() {
        if listed[i] {
            continue;
        }
        if *state != Successor::Missing || !opts.waves {
            wave.push(i);
            continue;
        }
        let slots = match free.get_mut(&m.scope) {
            Some(n) => n,
            None => {
                let used = registry.quota_used(&m.scope).await?;
                let quota = opts.settings.quota.for_region(&m.scope.region);
                free.entry(&m.scope).or_insert(quota.saturating_sub(used))
            }
        };
        if *slots > 0 {
            *slots -= 1;
            wave.push(i);
        }
    }
    Ok(wave)
}

/// Retires every member whose successor is delivered and whose replaced pair lives; returns
/// how many were retired. The record is saved after them.
async fn retire_delivered<R: Registry>(
    registry: &R,
    cloud: Option<&HttpUpstream>,
    rotation: &mut Rotation,
    states: &[Successor],
) -> Result<u64, RotateError> {
    let mut retired = 0;
    let mut error = None;
    for (m, state) in rotation.members.iter_mut().zip(states) {
        if m.retired_at.is_some() || *state != Successor::Delivered {
            continue;
        }
        match retire_one(registry, cloud, m).await {
            Ok(outcome) => {
                crate::telemetry::metrics::rotation_retired(m.scope.provider.as_str(), outcome);
                m.retired_at = Some(crate::time::unix_now());
                retired += 1;
            }
            Err(e) => {
                crate::telemetry::metrics::rotation_retired(m.scope.provider.as_str(), "failed");
                tracing::warn!(
                    "retiring {} in {}: {}",
                    m.name,
                    m.scope.key(),
                    crate::sink::error_chain(&e)
                );
                error.get_or_insert(e);
            }
        }
    }
    // Saved even when one failed: the others are gone, and a rerun must know it.
    if retired > 0 {
        registry.save_rotation(rotation).await?;
    }
    match error {
        Some(e) => Err(e.into()),
        None => Ok(retired),
    }
}

/// Deletes a member's replaced pair, registry and cloud; the outcome label of the metric.
async fn retire_one<R: Registry>(
    registry: &R,
    cloud: Option<&HttpUpstream>,
    m: &Member,
) -> Result<&'static str, DeleteError> {
    let entry =
        registry
            .lookup(&m.scope, &m.name)
            .await
            .map_err(|source| DeleteError::Registry {
                name: m.name.clone(),
                source,
            })?;
    match entry {
        Some(Entry::Pair(r)) if m.replaces.is(&r) => {
            match delete::delete(registry, cloud, &m.scope, &m.name).await? {
                Deleted::NotFound => Ok("gone"),
                Deleted::Here | Deleted::AlsoInCloud => Ok("deleted"),
            }
        }
        // Deleted already (by an earlier retire that stopped before recording it, or by
        // `delete`, which deletes in the cloud first); or the name now holds another key,
        // which is not this member's to delete.
        _ => Ok("gone"),
    }
}

/// `keyfleet retire`: deletes the replaced pairs of rotation `id` whose successors are
/// delivered. Returns the rotation's status afterwards and how many were retired now.
pub async fn retire<R: Registry>(
    registry: &R,
    cloud: Option<&HttpUpstream>,
    id: &str,
) -> Result<(RotationStatus, u64), RotateError> {
    let mut rotation = registry
        .rotation(id)
        .await?
        .ok_or_else(|| RotateError::NoSuchRotation(id.to_owned()))?;
    // A replaced pair is retired only once its successor's key is in the rotation's folder:
    // not from a machine that cannot read that folder.
    let folder = folder_of(&rotation)?;
    let states = successor_states(registry, &rotation, folder.as_ref()).await?;
    let retired = retire_delivered(registry, cloud, &mut rotation, &states).await?;
    registry.flush().await?;
    let states = successor_states(registry, &rotation, folder.as_ref()).await?;
    Ok((status_of(&rotation, &states), retired))
}

/// The names of the pairs rotations have retired in `scope`: a pair of these the cloud still
/// holds is drift `reconcile` names as such.
pub async fn retired_names<R: Registry>(
    registry: &R,
    scope: &Scope,
) -> Result<BTreeSet<String>, RegistryError> {
    let mut out = BTreeSet::new();
    for r in registry.rotations().await? {
        for m in r.members {
            if m.retired_at.is_some() && m.scope == *scope {
                out.insert(m.name);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_in_and_are_checked() {
        assert_eq!(
            successor_name(DEFAULT_TEMPLATE, "web-01", "20261205"),
            "web-01-20261205"
        );
        assert!(check_template(DEFAULT_TEMPLATE).is_ok());
        assert!(check_template("{name}-new").is_ok());
        assert!(check_template("fixed-{yyyymmdd}").is_err());
        assert!(check_template("{name}-{date}").is_err());
    }

    #[test]
    fn a_successor_of_another_job_is_taken_not_ours() {
        let member = |job_id: Uuid| Member {
            scope: Scope {
                provider: crate::dialect::Provider::Aliyun,
                owner: "o".into(),
                region: "r".into(),
            },
            name: "p".into(),
            replaces: Replaced {
                name: "p".into(),
                key_pair_id: None,
                key_pair_fingerprint: String::new(),
                fingerprint_md5: String::new(),
                fingerprint_sha256: String::new(),
            },
            successor: "s".into(),
            successor_job_id: job_id,
            earlier_job_ids: vec![],
            published: 0,
            publishing: false,
            tags: vec![],
            resource_group_id: None,
            zone: None,
            retired_at: None,
            failed: None,
        };
        let (ours, other) = (member(Uuid::new_v4()), member(Uuid::new_v4()));
        let held = Entry::Reserved {
            job_id: ours.successor_job_id,
            deadline_ms: 0,
            tried_keys: vec![],
        };
        assert_eq!(
            successor_state(Some(&held), &ours, None),
            Successor::Holding
        );
        assert_eq!(successor_state(Some(&held), &other, None), Successor::Taken);
        assert_eq!(successor_state(None, &ours, None), Successor::Missing);
        // Through the workers, an expired reservation of ours is free to take again.
        let folder = Written::new();
        assert_eq!(
            successor_state(Some(&held), &ours, Some(&folder)),
            Successor::Missing
        );
        // An earlier job of the member holds it just as well.
        let mut moved = ours.clone();
        moved.next_publication();
        moved.confirmed();
        moved.next_publication();
        assert_ne!(moved.successor_job_id, ours.successor_job_id);
        assert_eq!(
            successor_state(Some(&held), &moved, None),
            Successor::Holding
        );
    }
}
