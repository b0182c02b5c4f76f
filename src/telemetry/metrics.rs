//! Prometheus metrics: every metric keyfleet exports is declared here — name, kind,
//! unit, help text, labels and histogram buckets — so the dashboard and alert rules in `deploy/`
//! have one list to be checked against ([`NAMES`]). The recording helpers are what the pipeline
//! calls; they are cheap and do nothing until [`install`] has put the recorder in place.
//! [`routes`] answers `/metrics`, `/healthz` and `/readyz`, which [`serve`] exposes alone and
//! `keyfleet serve` beside its API (see `metrics/http.rs`).
//!
//! Label values are kept to small fixed sets (providers, key sizes, error codes, dead-letter
//! reasons, catalogue regions): anything else is folded into `other` / `unknown`, because one
//! stray job id in a label would create a time series per job.

mod http;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use metrics::{counter, gauge, histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

pub use http::{routes, serve};
pub use metrics_exporter_prometheus::PrometheusHandle;

/// Declares each exported metric once: a name constant documented with the metric's help
/// text, and the same text with its unit given to the recorder ([`describe`]), so the docs
/// and `# HELP` cannot drift apart. [`NAMES`] lists them all.
macro_rules! declare_metrics {
    ($(
        $(#[$note:meta])*
        $kind:ident($($unit:ident)?) $NAME:ident = $name:literal, $help:literal;
    )*) => {
        $(
            #[doc = $help]
            $(#[$note])*
            pub const $NAME: &str = $name;
        )*

        /// Every metric name keyfleet exports (tests check dashboards/rules only query these).
        pub const NAMES: &[&str] = &[$($NAME),*];

        /// Gives the recorder every metric's help text and unit.
        fn describe() {
            // A metric's kind names the `metrics` macro that describes it.
            use metrics::{
                describe_counter as counter, describe_gauge as gauge,
                describe_histogram as histogram,
            };
            $($kind!($NAME, $(Unit::$unit,)? $help);)*
        }
    };
}

declare_metrics! {
    counter(Count) JOBS_TOTAL = "keyfleet_jobs_total",
        "Jobs answered, by provider and outcome: created, or the error code the cloud API would answer with.";
    histogram(Seconds) JOB_DURATION_SECONDS = "keyfleet_job_duration_seconds",
        "Seconds from picking a job up to its result being ready, including waits for the key-generation pool and the upstream rate limit.";
    histogram(Seconds) KEYGEN_SECONDS = "keyfleet_keygen_seconds",
        "Seconds to generate one RSA key pair on the key-generation pool, by key size in bits.";
    histogram(Seconds) QUEUE_WAIT_SECONDS = "keyfleet_queue_wait_seconds",
        "Seconds a job message waited in the queue before a worker picked it up.";
    histogram(Seconds) UPSTREAM_WAIT_SECONDS = "keyfleet_upstream_wait_seconds",
        "Seconds spent registering a public key upstream, including waiting for the per-provider and region rate limit.";
    gauge(Count) QUOTA_USED = "keyfleet_quota_used",
        "Key pairs held in a provider, owner (account or project) and region as last seen by this process.";
    /// The alert divides by it rather than by a number written into the rule.
    gauge(Count) QUOTA_LIMIT = "keyfleet_quota_limit",
        "The key-pair quota of a provider, owner and region as this process enforces it (default 500).";
    gauge(Count) RESERVOIR_KEYS = "keyfleet_reservoir_keys",
        "Pre-generated key pairs waiting in the reservoir, by key size in bits.";
    counter(Count) REDELIVERIES_TOTAL = "keyfleet_redeliveries_total",
        "Job messages delivered again after an earlier delivery was not acknowledged.";
    counter(Count) JOBS_ABANDONED_TOTAL = "keyfleet_jobs_abandoned_total",
        "Jobs a worker stopped because its RabbitMQ channel closed first (RabbitMQ gives them to another worker).";
    counter(Count) DEAD_LETTERED_TOTAL = "keyfleet_dead_lettered_total",
        "Job messages sent to the dead-letter queue, by reason.";
    gauge(Count) JOBS_IN_FLIGHT = "keyfleet_jobs_in_flight",
        "Jobs picked up and not yet answered.";
    gauge() BUILD_INFO = "keyfleet_build_info",
        "Always 1; the version label names the running keyfleet build.";
    counter(Count) API_REQUESTS_TOTAL = "keyfleet_api_requests_total",
        "keyfleet serve: API requests answered, by provider, action and code (OK, or the error code / RetCode answered).";
    histogram(Seconds) API_REQUEST_DURATION_SECONDS = "keyfleet_api_request_duration_seconds",
        "keyfleet serve: seconds from a request's arrival to its answer, by provider and action.";
    counter(Count) SIGNATURE_FAILURES_TOTAL = "keyfleet_signature_failures_total",
        "keyfleet serve: requests refused by the signature, time stamp or nonce checks, by provider and reason.";
    counter(Count) UPSTREAM_REQUESTS_TOTAL = "keyfleet_upstream_requests_total",
        "Calls to the upstream cloud API, by provider and code: OK, the cloud's error code, or retry (throttled, unavailable or a network error, tried again).";
    gauge() SERVE_CONNECTIONS_OPEN = "keyfleet_serve_connections_open",
        "keyfleet serve: connections open now (at most --max-connections).";
    gauge(Count) ROTATION_PAIRS = "keyfleet_rotation_pairs",
        "The rotation this process last worked on (rotate, retire, status), by state: replaced (its pairs), delivered (successors delivered), retired (replaced pairs deleted), failed (successors whose last attempt failed).";
    counter(Count) ROTATION_RETIRED_TOTAL = "keyfleet_rotation_retired_total",
        "Replaced pairs a rotation retired, by provider and outcome: deleted (registry, and the cloud with an upstream), gone (deleted before), failed (to be retried).";
    counter(Count) SERVE_CONNECTIONS_SHED_TOTAL = "keyfleet_serve_connections_shed_total",
        "keyfleet serve: connections refused or closed on a limit, by reason: over_cap, header_timeout, idle_timeout, head_too_large.";
}

/// The `reason` label's values of [`SERVE_CONNECTIONS_SHED_TOTAL`].
pub const SERVE_SHED_REASONS: &[&str] = &[
    "over_cap",
    "header_timeout",
    "idle_timeout",
    "head_too_large",
];

/// The histograms among [`NAMES`]: Prometheus also knows them as `<name>_bucket`, `_sum` and
/// `_count`.
pub const HISTOGRAMS: &[&str] = &[
    JOB_DURATION_SECONDS,
    KEYGEN_SECONDS,
    QUEUE_WAIT_SECONDS,
    UPSTREAM_WAIT_SECONDS,
    API_REQUEST_DURATION_SECONDS,
];

/// `keyfleet_keygen_seconds`. One key on one core: RSA-2048 takes ~26 ms with the fastest
/// engine measured here (our target), ~65 ms with the crypto-primes engine and
/// ~230 ms with the `rsa` crate, with a long tail because the prime search is a geometric
/// lottery; 3072 bits is ~3–4× that and 4096 bits ~8–10× (0.5–5 s). Fine steps from 10 ms to
/// 300 ms resolve the 2048-bit engines from each other; 0.5 s is the alert threshold for
/// 2048-bit p99; the coarse top serves 4096-bit keys and a starved pool.
pub const KEYGEN_BUCKETS: &[f64] = &[
    0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0,
];

/// `keyfleet_job_duration_seconds`. A job's own work is a few Redis round trips (~1 ms each)
/// plus one key (tens to hundreds of ms), but it also queues behind the rayon pool — with
/// prefetch = concurrency a job may wait for several keys ahead of it — and behind the
/// upstream's rate limit, so the range runs from ~25 ms to minutes.
pub const JOB_DURATION_BUCKETS: &[f64] = &[
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// `keyfleet_queue_wait_seconds`. Milliseconds when workers are idle (the first bucket lumps
/// everything under 100 ms: producer and worker clocks disagree by about that much anyway);
/// a 10,000-key onboarding on one 2-core worker drains in minutes; a 1M-job backlog takes
/// hours. Beyond a day it is +Inf. 900 s is the backlog alert threshold.
pub const QUEUE_WAIT_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0,
];

/// `keyfleet_upstream_wait_seconds`. The local upstream answers in microseconds (all of it
/// lands in the first bucket); a cloud API call takes ~50–500 ms; a saturated per-region rate
/// limit holds a job for seconds, growing with the number of jobs queued behind it.
pub const UPSTREAM_WAIT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// `keyfleet_api_request_duration_seconds`. A create from a warm reservoir is a few registry
/// writes (well under 5 ms, the goal); from a cold one it waits for a key (~25–300 ms) and
/// for the keys queued ahead of it; describe and delete are registry reads and writes.
pub const API_REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The `action` label's values of the API metrics; anything else is `other`.
pub const API_ACTIONS: &[&str] = &[
    "CreateKeyPair",
    "ImportKeyPair",
    "DescribeKeyPairs",
    "DeleteKeyPairs",
    "CreateUHostKeyPair",
    "ImportUHostKeyPairs",
    "DescribeUHostKeyPairs",
    "DeleteUHostKeyPairs",
];

/// The `reason` label's values of `keyfleet_signature_failures_total`.
pub const SIGNATURE_FAILURE_REASONS: &[&str] = &[
    "missing",
    "unknown_key",
    "method",
    "timestamp_format",
    "timestamp_expired",
    "mismatch",
    "nonce_used",
];

/// The `provider` label's values; anything else is counted as `unknown`.
pub const PROVIDERS: &[&str] = &["aliyun", "ucloud"];

/// The `outcome` label's values: `created`, `delivered_earlier`, every error code the two dialects answer with
/// (taken from `src/dialect/`, so a new code is a known label at once), and `other` for
/// anything else.
pub fn outcomes() -> &'static [String] {
    static OUTCOMES: OnceLock<Vec<String>> = OnceLock::new();
    OUTCOMES.get_or_init(|| {
        let mut all = vec![
            crate::job::CREATED.to_owned(),
            crate::job::DELIVERED_EARLIER.to_owned(),
        ];
        for provider in crate::dialect::Provider::ALL {
            all.extend(crate::dialect::error_codes(provider));
        }
        all.push("other".to_owned());
        all
    })
}

/// The `reason` label's values for dead-lettered job messages; anything else is `other`.
/// - `undecodable`: not JSON, or not a job (missing or mistyped fields);
/// - `unsupported_version`: a `"v"` this build does not read;
/// - `undeliverable`: a valid job whose result no queue takes (its batch's results queue does
///   not exist); its key pair was released;
/// - `delivery_limit`: delivered too often (the worker saw the delivery count reach the limit
///   and rejected it rather than let the broker dead-letter it unseen).
pub const DEAD_LETTER_REASONS: &[&str] = &[
    "undecodable",
    "unsupported_version",
    "undeliverable",
    "delivery_limit",
    "other",
];

/// The `bits` label's values; anything else is `other`.
pub const KEY_SIZES: &[&str] = &["2048", "3072", "4096"];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Typically: another metrics recorder was installed in this process first.
    #[error("could not install the Prometheus metrics recorder: {0}")]
    Install(String),
    #[error("could not listen for metrics requests on {addr}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// How often histogram samples are folded into their buckets when nobody scrapes; scrapes do
/// it too. Without it `run` with no metrics endpoint would keep every sample of a 1M-job
/// batch in memory.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static INSTALLING: Mutex<()> = Mutex::new(());

/// Installs the global Prometheus recorder once (idempotent: later calls return the same
/// handle), describes every metric (help text + units), sets explicit buckets, records
/// `keyfleet_build_info{version=...} = 1`, and starts a background thread that runs the
/// recorder's upkeep every few seconds.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    // Two first calls racing must not both try to become the global recorder.
    let _guard = INSTALLING.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let handle = builder()?
        .install_recorder()
        .map_err(|e| MetricsError::Install(e.to_string()))?;
    describe();
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // Rare events' series exist at 0 from the start: `increase()` cannot see a counter's first
    // sample as an increase, so the first dead letter of a fresh worker would not alert.
    counter!(REDELIVERIES_TOTAL).increment(0);
    counter!(JOBS_ABANDONED_TOTAL).increment(0);
    for reason in DEAD_LETTER_REASONS {
        counter!(DEAD_LETTERED_TOTAL, "reason" => *reason).increment(0);
    }
    gauge!(JOBS_IN_FLIGHT).increment(0.0);
    // Every family a dashboard or alert reads exists from the first scrape, at zero for its
    // known label values (Prometheus's "avoid missing metrics"), so `rate()` works on a fresh
    // process. `keyfleet_quota_used` (and its `_limit`) is left out on purpose: a zero would claim an empty
    // region; it appears with the true count when the process first touches a region.
    for provider in PROVIDERS {
        for outcome in outcomes() {
            counter!(JOBS_TOTAL, "provider" => *provider, "outcome" => outcome.as_str())
                .increment(0);
        }
        let _ = histogram!(JOB_DURATION_SECONDS, "provider" => *provider);
        let _ = histogram!(UPSTREAM_WAIT_SECONDS, "provider" => *provider);
    }
    for bits in KEY_SIZES {
        let _ = histogram!(KEYGEN_SECONDS, "bits" => *bits);
        // True at start: no reservoir has filled yet.
        gauge!(RESERVOIR_KEYS, "bits" => *bits).set(0.0);
    }
    let _ = histogram!(QUEUE_WAIT_SECONDS);
    for (provider, action) in PROVIDERS
        .iter()
        .flat_map(|p| API_ACTIONS.iter().map(move |a| (p, a)))
    {
        counter!(API_REQUESTS_TOTAL, "provider" => *provider, "action" => *action, "code" => "OK")
            .increment(0);
        let _ =
            histogram!(API_REQUEST_DURATION_SECONDS, "provider" => *provider, "action" => *action);
    }
    for provider in PROVIDERS {
        for code in ["OK", "retry"] {
            counter!(UPSTREAM_REQUESTS_TOTAL, "provider" => *provider, "code" => code).increment(0);
        }
        for reason in SIGNATURE_FAILURE_REASONS {
            counter!(SIGNATURE_FAILURES_TOTAL, "provider" => *provider, "reason" => *reason)
                .increment(0);
        }
    }
    for state in ROTATION_STATES {
        gauge!(ROTATION_PAIRS, "state" => *state).set(0.0);
    }
    for provider in PROVIDERS {
        for outcome in ROTATION_RETIRE_OUTCOMES {
            counter!(ROTATION_RETIRED_TOTAL, "provider" => *provider, "outcome" => *outcome)
                .increment(0);
        }
    }
    gauge!(SERVE_CONNECTIONS_OPEN).increment(0.0);
    for reason in SERVE_SHED_REASONS {
        counter!(SERVE_CONNECTIONS_SHED_TOTAL, "reason" => *reason).increment(0);
    }
    // Published before anything else can fail: the recorder is global from here on, and a
    // second install() must hand out this handle rather than try again.
    let handle = HANDLE.get_or_init(|| handle).clone();
    let upkeep = handle.clone();
    let spawned = std::thread::Builder::new()
        .name("keyfleet-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            upkeep.run_upkeep();
        });
    if let Err(e) = spawned {
        // Not fatal: every scrape folds the samples too.
        tracing::warn!(error = %e, "metrics: could not start the upkeep thread");
    }
    Ok(handle)
}

/// The installed recorder's handle, if [`install`] has run.
pub fn handle() -> Option<PrometheusHandle> {
    HANDLE.get().cloned()
}

/// Whether the recorder is installed (something may scrape what is recorded).
pub fn installed() -> bool {
    HANDLE.get().is_some()
}

/// The current exposition text, if [`install`] has run.
pub fn render() -> Option<String> {
    HANDLE.get().map(PrometheusHandle::render)
}

fn builder() -> Result<PrometheusBuilder, MetricsError> {
    let mut b = PrometheusBuilder::new();
    for (name, buckets) in [
        (KEYGEN_SECONDS, KEYGEN_BUCKETS),
        (JOB_DURATION_SECONDS, JOB_DURATION_BUCKETS),
        (QUEUE_WAIT_SECONDS, QUEUE_WAIT_BUCKETS),
        (UPSTREAM_WAIT_SECONDS, UPSTREAM_WAIT_BUCKETS),
        (API_REQUEST_DURATION_SECONDS, API_REQUEST_BUCKETS),
    ] {
        b = b
            .set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)
            .map_err(|e| MetricsError::Install(e.to_string()))?;
    }
    Ok(b)
}

fn provider_label(provider: &str) -> &'static str {
    PROVIDERS
        .iter()
        .find(|p| **p == provider)
        .copied()
        .unwrap_or("unknown")
}

fn outcome_label(outcome: &str) -> &'static str {
    outcomes()
        .iter()
        .find(|o| *o == outcome)
        .map(String::as_str)
        .unwrap_or("other")
}

fn bits_label(bits: usize) -> &'static str {
    match bits {
        2048 => "2048",
        3072 => "3072",
        4096 => "4096",
        _ => "other",
    }
}

/// `keyfleet serve` answered a request of `action` with `code` (`OK` or the error code).
pub fn api_request(provider: &str, action: &str, code: &str, duration: Duration) {
    let provider = provider_label(provider);
    let action = API_ACTIONS
        .iter()
        .find(|a| **a == action)
        .copied()
        .unwrap_or("other");
    let code = api_code_label(code);
    counter!(API_REQUESTS_TOTAL, "provider" => provider, "action" => action, "code" => code)
        .increment(1);
    histogram!(API_REQUEST_DURATION_SECONDS, "provider" => provider, "action" => action)
        .record(duration.as_secs_f64());
}

/// A call to the upstream cloud was answered with `code` (`OK`, an error code, or `retry`).
pub fn upstream_request(provider: &str, code: &str) {
    let code = if code == "retry" {
        "retry"
    } else {
        api_code_label(code)
    };
    counter!(UPSTREAM_REQUESTS_TOTAL, "provider" => provider_label(provider), "code" => code)
        .increment(1);
}

/// `keyfleet serve` refused a request's signature for `reason` (one of
/// [`SIGNATURE_FAILURE_REASONS`]).
pub fn signature_failure(provider: &str, reason: &'static str) {
    counter!(SIGNATURE_FAILURES_TOTAL, "provider" => provider_label(provider), "reason" => reason)
        .increment(1);
}

/// `keyfleet serve` opened (+1) or closed (-1) a connection.
pub fn serve_connections_open(delta: i64) {
    gauge!(SERVE_CONNECTIONS_OPEN).increment(delta as f64);
}

/// `keyfleet serve` refused or closed a connection on a limit (`reason`: one of
/// [`SERVE_SHED_REASONS`]; anything else counts as `other`).
pub fn serve_connection_shed(reason: &'static str) {
    let reason = if SERVE_SHED_REASONS.contains(&reason) {
        reason
    } else {
        "other"
    };
    counter!(SERVE_CONNECTIONS_SHED_TOTAL, "reason" => reason).increment(1);
}

/// Codes are the dialects' own, so the set is bounded; caller text never reaches a label.
fn api_code_label(code: &str) -> &'static str {
    static CODES: OnceLock<Vec<String>> = OnceLock::new();
    let codes = CODES.get_or_init(crate::dialect::all_answer_codes);
    if code == "OK" {
        return "OK";
    }
    codes
        .iter()
        .find(|c| *c == code)
        .map(String::as_str)
        .unwrap_or("other")
}

/// A job was answered: `outcome` is `"created"` or the error code of its result (`code`).
/// `duration` runs from picking the job up to its result being ready.
pub fn job_finished(provider: &str, outcome: &str, duration: Duration) {
    let provider = provider_label(provider);
    counter!(JOBS_TOTAL, "provider" => provider, "outcome" => outcome_label(outcome)).increment(1);
    histogram!(JOB_DURATION_SECONDS, "provider" => provider).record(duration.as_secs_f64());
}

/// One key pair of `bits` bits took `duration` on the key-generation pool (not counting the
/// wait for a free thread).
pub fn keygen(bits: usize, duration: Duration) {
    histogram!(KEYGEN_SECONDS, "bits" => bits_label(bits)).record(duration.as_secs_f64());
}

/// A job message waited `duration` between being published and being picked up.
pub fn queue_wait(duration: Duration) {
    histogram!(QUEUE_WAIT_SECONDS).record(duration.as_secs_f64());
}

/// The scope `provider` + `owner` + `region` now holds `used` of its `limit` key pairs.
/// `region` comes from the region catalogue (validated requests only); owners are the
/// accounts and projects a deployment serves, a set as small as its customers.
pub fn quota_used(provider: &str, owner: &str, region: &str, used: u64, limit: u64) {
    let labels = [
        ("provider", provider_label(provider).to_owned()),
        ("owner", owner.to_owned()),
        ("region", region.to_owned()),
    ];
    gauge!(QUOTA_USED, &labels).set(used as f64);
    gauge!(QUOTA_LIMIT, &labels).set(limit as f64);
}

/// The `state` label's values of [`ROTATION_PAIRS`].
pub const ROTATION_STATES: &[&str] = &["replaced", "delivered", "retired", "failed"];

/// The `outcome` label's values of [`ROTATION_RETIRED_TOTAL`].
pub const ROTATION_RETIRE_OUTCOMES: &[&str] = &["deleted", "gone", "failed"];

/// Where the rotation this process works on stands. No rotation id as a label: one process
/// works on one rotation at a time, and ids would grow the series without bound.
pub fn rotation_progress(replaced: u64, delivered: u64, retired: u64, failed: u64) {
    for (state, n) in ROTATION_STATES
        .iter()
        .zip([replaced, delivered, retired, failed])
    {
        gauge!(ROTATION_PAIRS, "state" => *state).set(n as f64);
    }
}

/// A rotation retired one replaced pair of `provider`; `outcome` is one of
/// [`ROTATION_RETIRE_OUTCOMES`].
pub fn rotation_retired(provider: &str, outcome: &'static str) {
    let outcome = ROTATION_RETIRE_OUTCOMES
        .iter()
        .find(|o| **o == outcome)
        .copied()
        .unwrap_or("failed");
    counter!(ROTATION_RETIRED_TOTAL, "provider" => provider_label(provider), "outcome" => outcome)
        .increment(1);
}

/// The reservoir of pre-generated `bits`-bit keys now holds `keys` keys.
pub fn reservoir_fill(bits: usize, keys: usize) {
    gauge!(RESERVOIR_KEYS, "bits" => bits_label(bits)).set(keys as f64);
}

/// Registering a key with `provider` took `duration`, rate-limit wait included.
pub fn upstream_wait(provider: &str, duration: Duration) {
    histogram!(UPSTREAM_WAIT_SECONDS, "provider" => provider_label(provider))
        .record(duration.as_secs_f64());
}

/// A job message arrived with the redelivered flag set.
pub fn redelivered() {
    counter!(REDELIVERIES_TOTAL).increment(1);
}

/// `jobs` jobs were stopped because the channel they came on closed (see
/// `Finished::Abandoned`).
pub fn abandoned(jobs: usize) {
    counter!(JOBS_ABANDONED_TOTAL).increment(jobs as u64);
}

/// A job message was dead-lettered; `reason` is one of [`DEAD_LETTER_REASONS`].
pub fn dead_lettered(reason: &str) {
    let reason = DEAD_LETTER_REASONS
        .iter()
        .find(|r| **r == reason)
        .copied()
        .unwrap_or("other");
    counter!(DEAD_LETTERED_TOTAL, "reason" => reason).increment(1);
}

/// Adds `delta` to the jobs in flight. Prefer [`InFlight`], which cannot forget the decrement
/// on an early return.
pub fn in_flight(delta: i64) {
    gauge!(JOBS_IN_FLIGHT).increment(delta as f64);
}

/// Counts one job in flight from [`InFlight::start`] until dropped.
#[must_use = "the job counts as in flight only while the guard lives"]
#[derive(Debug)]
pub struct InFlight(());

impl InFlight {
    pub fn start() -> Self {
        in_flight(1);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        in_flight(-1);
    }
}

/// Readiness flags set by the worker (RabbitMQ connected, Redis connected, not draining);
/// `/readyz` answers 200 only when all agree. `keyfleet run` marks both connections up.
#[derive(Clone, Default, Debug)]
pub struct Readiness(Arc<Flags>);

#[derive(Default, Debug)]
struct Flags {
    amqp: AtomicBool,
    redis: AtomicBool,
    draining: AtomicBool,
}

// Independent flags read by a probe: nothing else is published through them, so Relaxed.
impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_amqp(&self, up: bool) {
        self.0.amqp.store(up, Ordering::Relaxed);
    }

    pub fn set_redis(&self, up: bool) {
        self.0.redis.store(up, Ordering::Relaxed);
    }

    /// Shutdown has begun: stop reporting ready while in-flight jobs finish.
    pub fn set_draining(&self, draining: bool) {
        self.0.draining.store(draining, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.not_ready_because().is_empty()
    }

    /// What keeps this process from being ready (empty when it is ready).
    pub fn not_ready_because(&self) -> Vec<&'static str> {
        let mut why = Vec::new();
        if !self.0.amqp.load(Ordering::Relaxed) {
            why.push("RabbitMQ not connected");
        }
        if !self.0.redis.load(Ordering::Relaxed) {
            why.push("Redis not connected");
        }
        if self.0.draining.load(Ordering::Relaxed) {
            why.push("draining");
        }
        why
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::{ApiError, Provider};

    fn record_one_of_each() {
        job_finished("aliyun", "created", Duration::from_millis(80));
        job_finished("ucloud", "8204", Duration::from_millis(3));
        keygen(2048, Duration::from_millis(40));
        queue_wait(Duration::from_secs(2));
        quota_used("aliyun", "acme", "cn-hangzhou", 17, 500);
        reservoir_fill(2048, 8);
        upstream_wait("aliyun", Duration::from_millis(1));
        redelivered();
        abandoned(3);
        dead_lettered("undecodable");
        drop(InFlight::start());
        api_request("aliyun", "CreateKeyPair", "OK", Duration::from_millis(2));
        api_request("ucloud", "NoSuchAction", "161", Duration::from_millis(1));
        signature_failure("aliyun", "mismatch");
        upstream_request("aliyun", "OK");
    }

    #[test]
    fn api_labels_stay_within_known_sets() {
        assert_eq!(api_code_label("QuotaExceed.KeyPair"), "QuotaExceed.KeyPair");
        assert_eq!(api_code_label("SignatureNonceUsed"), "SignatureNonceUsed");
        assert_eq!(api_code_label("171"), "171");
        assert_eq!(api_code_label("job-4711"), "other");
        assert_eq!(api_code_label("OK"), "OK");
    }

    #[test]
    fn names_are_unique_and_histograms_are_names() {
        let mut sorted = NAMES.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), NAMES.len());
        for h in HISTOGRAMS {
            assert!(NAMES.contains(h), "{h}");
            assert!(
                h.ends_with("_seconds"),
                "{h}: histograms here measure seconds"
            );
        }
        for n in NAMES {
            assert!(n.starts_with("keyfleet_"), "{n}");
            let counter = [
                JOBS_TOTAL,
                REDELIVERIES_TOTAL,
                JOBS_ABANDONED_TOTAL,
                DEAD_LETTERED_TOTAL,
                API_REQUESTS_TOTAL,
                SIGNATURE_FAILURES_TOTAL,
                UPSTREAM_REQUESTS_TOTAL,
                SERVE_CONNECTIONS_SHED_TOTAL,
                ROTATION_RETIRED_TOTAL,
            ]
            .contains(n);
            assert_eq!(
                n.ends_with("_total"),
                counter,
                "{n}: `_total` is for counters only"
            );
        }
    }

    #[test]
    fn buckets_are_increasing() {
        for b in [
            KEYGEN_BUCKETS,
            JOB_DURATION_BUCKETS,
            QUEUE_WAIT_BUCKETS,
            UPSTREAM_WAIT_BUCKETS,
        ] {
            assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
        }
    }

    #[test]
    fn every_dialect_error_code_is_a_known_outcome() {
        for provider in Provider::ALL {
            for e in ApiError::every_kind() {
                let code = e.reply(provider).code;
                assert_eq!(outcome_label(&code), code, "{provider:?} {e:?}");
            }
        }
        assert!(outcomes()
            .iter()
            .any(|o| o == "InvalidKeyPairName.Malformed"));
        assert!(outcomes().iter().any(|o| o == "8204"));
    }

    #[test]
    fn labels_stay_bounded() {
        assert_eq!(provider_label("aws"), "unknown");
        assert_eq!(outcome_label("269a2ba3-job-id"), "other");
        assert_eq!(bits_label(1024), "other");
        assert_eq!(bits_label(4096), "4096");
    }

    #[test]
    fn readiness_needs_both_connections_and_no_drain() {
        let r = Readiness::new();
        assert!(!r.is_ready());
        r.set_amqp(true);
        assert_eq!(r.not_ready_because(), ["Redis not connected"]);
        r.clone().set_redis(true);
        assert!(r.is_ready(), "clones share the flags");
        r.set_draining(true);
        assert!(!r.is_ready());
    }

    #[test]
    fn install_is_idempotent_and_renders_every_metric() {
        let first = install().unwrap();
        record_one_of_each();
        let text = install().unwrap().render();
        assert!(
            first.render().contains(REDELIVERIES_TOTAL),
            "both handles read the one global recorder"
        );
        for name in NAMES {
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} HELP in:\n{text}"
            );
            let kind = if HISTOGRAMS.contains(name) {
                "histogram"
            } else if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} TYPE in:\n{text}"
            );
        }
        for h in HISTOGRAMS {
            assert!(
                text.contains(&format!("{h}_bucket{{")),
                "{h} has buckets:\n{text}"
            );
        }
        assert!(text.contains(&format!(
            "keyfleet_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(text.contains(r#"keyfleet_keygen_seconds_bucket{bits="2048",le="0.05"}"#));
        assert!(text.contains(r#"keyfleet_jobs_total{provider="ucloud",outcome="8204"}"#));
    }

    #[test]
    fn error_is_send_and_sync() {
        fn check<T: std::error::Error + Send + Sync + 'static>() {}
        check::<MetricsError>();
    }
}
