//! The parsed layer: command-line flags, each with a `KEYFLEET_*` environment twin, as clap
//! reads them, and the value parsers that name a bad value's setting. `resolve.rs` merges
//! them with the config file into the settings a command runs with.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::dialect::Provider;
use crate::job::batch::Format;
use crate::job::jobs_per_message::JobsPerMessage;
use crate::keys::keygen::{Engine, KeyBits};
use crate::telemetry::progress::ProgressMode;

/// Where the embedded store lives unless told otherwise.
pub const DEFAULT_STATE: &str = "keyfleet.redb";
/// The optional config file read from the current folder.
pub const DEFAULT_CONFIG: &str = "keyfleet.toml";

#[derive(Debug, Parser)]
#[command(
    name = "keyfleet",
    version,
    about = "Create SSH key pairs in bulk with the semantics of Alibaba Cloud ECS CreateKeyPair and UCloud CreateUHostKeyPair",
    long_about = "Create SSH key pairs in bulk with the exact semantics of Alibaba Cloud ECS \
CreateKeyPair and UCloud CreateUHostKeyPair: names, tags, regions, quotas (500 per region) and \
error codes as the APIs answer them.\n\nWith no servers, `keyfleet run` does everything in one \
process and keeps its registry in a local file (--state).\n\nExit status: 0 when every row was \
processed (failed rows are results, not crashes); 1 when the run itself failed (unreadable input, \
unwritable output, broken state file); 2 for bad flags or configuration; 130 when interrupted."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Config file (TOML). Default: ./keyfleet.toml when it exists.
    #[arg(long, global = true, env = "KEYFLEET_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Log filter (tracing syntax), e.g. `info`, `keyfleet=debug`.
    #[arg(
        long,
        global = true,
        env = "KEYFLEET_LOG",
        default_value = "warn",
        value_name = "FILTER"
    )]
    pub log: String,
}

/// Where the embedded registry lives (`run`, `describe`, `delete`).
#[derive(Debug, Clone, Args)]
pub struct StateArgs {
    /// Embedded state file (the registry of key pairs). Default: ./keyfleet.redb, or `state` in
    /// the config file.
    #[arg(long, env = "KEYFLEET_STATE", value_name = "PATH")]
    pub state: Option<PathBuf>,
}

/// Which registry a command uses: the embedded state file, or Redis with `--redis-url`.
#[derive(Debug, Args)]
pub struct RegistryArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// Use the registry in Redis (distributed mode) instead of the state file; every process
    /// on the same Redis and prefix shares names, quota (and for `serve`, nonces).
    #[arg(long, env = "KEYFLEET_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key (with --redis-url).
    #[arg(long, env = "KEYFLEET_PREFIX", default_value = "keyfleet", value_parser = parse_prefix)]
    pub prefix: String,
    #[command(flatten)]
    pub replicas: ReplicasArgs,
}

/// `--redis-replicas`, wherever keyfleet writes to Redis.
#[derive(Debug, Clone, Copy, Args)]
pub struct ReplicasArgs {
    /// Redis replicas that must acknowledge every write deciding a key's fate (reserve,
    /// commit, delivered, batch totals) before keyfleet acts on it (Redis `WAIT`): with 1, a
    /// failover to that replica loses none of them. A shorter count is retried (the message
    /// names this setting), so a master without enough replicas stalls the work instead of
    /// risking it. 0 waits for none: a failover to a replica that is behind can lose keys.
    /// With a Redis (--redis-url).
    #[arg(
        long,
        env = "KEYFLEET_REDIS_REPLICAS",
        value_name = "N",
        default_value_t = 0
    )]
    pub redis_replicas: u32,
}

/// One provider + owner + region: where `delete` and `reconcile` act.
#[derive(Debug, Args)]
pub struct ScopeArgs {
    #[arg(long, default_value = "aliyun", value_parser = parse_provider)]
    pub provider: Provider,
    /// Alibaba account / UCloud project.
    #[arg(long, default_value = "default")]
    pub owner: String,
    #[arg(long)]
    pub region: String,
}

impl ScopeArgs {
    pub fn scope(&self) -> crate::dialect::Scope {
        crate::dialect::Scope {
            provider: self.provider,
            owner: self.owner.clone(),
            region: self.region.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a batch file through the whole pipeline in this process (no servers needed).
    ///
    /// On Linux its threads run under the batch scheduling policy (SCHED_BATCH), so the
    /// writers' wakeups do not interrupt key generation; a keyfleet started under `nice` or
    /// `chrt` keeps what it was given (docs/keygen.md).
    Run(RunArgs),
    /// List registered key pairs (like DescribeKeyPairs).
    Describe(DescribeArgs),
    /// Delete key pairs by name, freeing their quota.
    Delete(DeleteArgs),
    /// Measure key-generation throughput on this machine.
    Bench(BenchArgs),
    /// Enqueue a batch file as jobs on RabbitMQ (distributed mode); prints the batch id.
    ///
    /// Standard output is the batch id alone (`B=$(keyfleet submit fleet.csv)`); the report
    /// and the place of the batch's identity go to standard error.
    Submit(SubmitArgs),
    /// Write a batch's results (key files + manifest) from RabbitMQ; resumable.
    ///
    /// Before it reads a result it checks that the batch exists, was not collected into
    /// another folder, and that the identity is the batch's. A result is acked only once its
    /// key is on disk; one it cannot write stays queued for the next collect.
    ///
    /// Exit status: 0 when every result read was written (the report says whether the batch is
    /// complete; run again to continue); 1 when it refused to start, or left results on the
    /// queue (a key that did not decrypt, a full disk); 2 for bad flags; 130 when interrupted.
    Collect(CollectArgs),
    /// Progress of a batch: total / created / failed per code / pending (from Redis); or of a
    /// rotation (an id starting `rot-`): replaced / delivered / retired / failed / pending,
    /// from the state file.
    Status(StatusArgs),
    /// Replace a fleet's key pairs: a successor with a fresh key for every selected pair,
    /// delivered as `run` delivers; the replaced pairs stay until `retire` (or --retire).
    ///
    /// The rotation is recorded before anything is created; run the same command again after
    /// a crash and it finishes the same rotation. Exit status: 0 when every successor row was
    /// processed (failed rows are in the manifest); 1 when nothing matches, when the quota has
    /// no room for the successors beside the pairs they replace (without --waves; nothing is
    /// created then), or the rotation itself failed; 2 for bad flags or a --successor template
    /// that cannot make valid names; 130 when interrupted.
    Rotate(Box<RotateArgs>),
    /// Delete the replaced pairs of a rotation whose successors are delivered, in keyfleet's
    /// registry and (with an endpoint) in the cloud, freeing their quota.
    ///
    /// A pair whose successor is not delivered is kept. Exit status 0 when every replaced
    /// pair of the rotation is retired, 1 otherwise (the report says what is left).
    Retire(RetireArgs),
    /// List the drift between keyfleet's registry and the cloud for one provider, owner and
    /// region: pairs in the cloud only, in keyfleet only, and with different fingerprints.
    /// Exit 0 when they agree, 1 when they do not.
    Reconcile(ReconcileArgs),
    /// Serve the Alibaba Cloud ECS and UCloud key-pair APIs over HTTP, for their official SDKs.
    ///
    /// Point an SDK's endpoint at the printed address (README, "Pointing the official SDKs at
    /// keyfleet serve"). Signatures are checked with the keys of --credentials; created,
    /// imported and deleted pairs are the same registry rows `run`, `describe` and `delete` see.
    Serve(ServeArgs),
    /// Print a shell completion script, e.g.
    /// `keyfleet completions bash > ~/.local/share/bash-completion/completions/keyfleet`.
    Completions(CompletionsArgs),
    /// Print the man page (roff), e.g. `keyfleet man | man -l -`; with --out, write one page
    /// per command into a folder (for `MANPATH`).
    Man(ManArgs),
}

/// `keyfleet completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `keyfleet man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write `keyfleet.1` and a `keyfleet-COMMAND.1` per command into this folder instead of
    /// printing the main page.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// How keys are made: the flags `run`, `serve`, `bench` and the worker share.
#[derive(Clone, Copy, Debug, Args)]
pub struct EngineArgs {
    /// Key-generation threads; 0 = one per core, at most 4 per core. Default 0 (or `threads`
    /// in the config file).
    #[arg(long, env = "KEYFLEET_THREADS", value_name = "N", value_parser = parse_threads)]
    pub threads: Option<usize>,
    /// Prime-search engine.
    #[arg(long, env = "KEYFLEET_ENGINE", value_enum, default_value_t = Engine::Fast)]
    pub engine: Engine,
}

/// The RSA key size: the flag `run`, `serve`, `submit` and `bench` share.
#[derive(Clone, Copy, Debug, Args)]
pub struct KeyBitsArgs {
    /// RSA modulus size: 2048, 3072 or 4096. Default 2048 (or `key_bits` in the config file;
    /// `bench` reads no config file).
    #[arg(long, env = "KEYFLEET_KEY_BITS", value_name = "BITS", value_parser = parse_key_bits)]
    pub key_bits: Option<KeyBits>,
}

/// How a batch command reports: the flags `run`, `submit` and `collect` share.
#[derive(Clone, Copy, Debug, Args)]
pub struct ReportArgs {
    /// Progress on standard error.
    #[arg(long, env = "KEYFLEET_PROGRESS", value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
    /// Print the summary as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `keyfleet serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free one. The bound address is printed on stdout
    /// as `listening on http://ADDR`.
    #[arg(long, env = "KEYFLEET_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// The access keys the API accepts (TOML, mode 0600: `[[aliyun]]` access_key_id /
    /// access_key_secret / account, `[[ucloud]]` public_key / private_key / account).
    #[arg(long, env = "KEYFLEET_CREDENTIALS", value_name = "FILE")]
    pub credentials: PathBuf,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// How long to wait for Redis at start-up (with --redis-url).
    #[arg(long, env = "KEYFLEET_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: std::time::Duration,
    /// Key pairs allowed per region and account (UCloud: per project; default 500).
    #[arg(long, env = "KEYFLEET_QUOTA", value_name = "N", value_parser = parse_quota)]
    pub quota: Option<u64>,
    #[command(flatten)]
    pub key: KeyBitsArgs,
    #[command(flatten)]
    pub cpu: EngineArgs,
    /// Keys made ahead on idle threads and kept in memory (never persisted), so a create is
    /// answered without waiting for key generation; 0 turns this off.
    #[arg(long, env = "KEYFLEET_RESERVOIR", default_value_t = 64)]
    pub reservoir: usize,
    /// Fault injection: requests per second per access key beyond which the answer is
    /// Alibaba `Throttling.User` / UCloud RetCode 153, as the clouds throttle; 0 = off.
    #[arg(
        long,
        env = "KEYFLEET_THROTTLE_RPS",
        value_name = "N",
        default_value_t = 0
    )]
    pub throttle_rps: u32,
    /// Fault injection: the fraction of requests (0 to 1) answered 503 `ServiceUnavailable` /
    /// RetCode 150 — half before the action runs, half after it was done, so clients learn to
    /// reconcile a lost answer; 0 = off.
    #[arg(long, env = "KEYFLEET_FAULT_RATE", value_name = "P", default_value_t = 0.0, value_parser = parse_fraction)]
    pub fault_rate: f64,
    /// After a shutdown signal, how long requests in flight may take to finish.
    #[arg(long, env = "KEYFLEET_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: std::time::Duration,
    /// Time for a request's line and headers to arrive, from the connection's start or a later
    /// request's first byte (and for its body, once the headers are in); a connection that
    /// takes longer is closed.
    #[arg(long, env = "KEYFLEET_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: std::time::Duration,
    /// A kept-alive connection with no request for this long is closed.
    /// (Not `--idle-timeout`: that is `collect`'s quiet spell, and one environment variable
    /// must not mean two things.)
    #[arg(long, env = "KEYFLEET_KEEP_ALIVE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub keep_alive_timeout: std::time::Duration,
    /// Connections open at once; one more is answered 503 ServiceUnavailable and closed.
    /// Default: 1024, or the open-file limit less 128 if that is lower.
    #[arg(long, env = "KEYFLEET_MAX_CONNECTIONS", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,
    /// Also register created and imported keys in this cloud (and delete there): `serve` as a
    /// fast front, answering creates from its reservoir, for a cloud's key-pair API.
    #[command(flatten)]
    pub upstream: UpstreamArgs,
    #[command(flatten)]
    pub upstream_limit: UpstreamLimitArgs,
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!(
            "{s:?} is not a fraction from 0 to 1 (--fault-rate / KEYFLEET_FAULT_RATE)"
        )),
    }
}

/// The rate limit on calls to the cloud's API.
#[derive(Debug, Clone, Args)]
pub struct UpstreamLimitArgs {
    /// Upstream (cloud API) calls per second per provider + account + region, with
    /// --upstream-endpoint; 0 = unlimited. With an endpoint, for keyfleet-worker (and serve
    /// with --redis-url) it is the total of every such process on the same Redis and prefix;
    /// for run, this process's.
    #[arg(long, env = "KEYFLEET_UPSTREAM_RPS", default_value_t = 50)]
    pub upstream_rps: u32,
    /// Burst allowed above --upstream-rps.
    #[arg(long, env = "KEYFLEET_UPSTREAM_BURST", default_value_t = 10)]
    pub upstream_burst: u32,
}

impl UpstreamLimitArgs {
    /// The limiter every task of this process shares (`run`, `serve`); `None` when unlimited.
    pub fn rate_limit(&self) -> Option<std::sync::Arc<crate::upstream::rate_limit::RateLimit>> {
        crate::upstream::rate_limit::RateLimit::new(self.upstream_rps, self.upstream_burst)
            .map(std::sync::Arc::new)
    }
}

/// How `submit` publishes jobs (and `rotate --submit`, `bench --submit`, which use it).
#[derive(Args, Clone, Debug)]
pub struct PublishArgs {
    /// Publisher confirms (one a message) kept in flight; `rotate` and `bench`: with --submit.
    #[arg(long, env = "KEYFLEET_CONFIRM_WINDOW", default_value_t = 4096)]
    pub confirm_window: usize,
    /// Jobs packed into one RabbitMQ message, `auto` or 1 to 1000: one message, one confirm
    /// and one ack carry that many jobs (the v2 message of docs/distributed.md), and a message
    /// goes to one worker. `auto`: 8 a message for a batch's first 256 jobs (a small batch
    /// spreads over up to 32 workers), 32 after (half the broker's work a job, or less); 32
    /// from the first job when exactly one worker consumes the jobs queue at `submit`. 1
    /// publishes v1 messages, one job each, for workers older than v2. `rotate` and `bench`:
    /// with --submit (`bench`'s bare publisher sends messages of the same sizes).
    #[arg(
        long,
        env = "KEYFLEET_JOBS_PER_MESSAGE",
        default_value = "auto",
        value_name = "auto|N"
    )]
    pub jobs_per_message: JobsPerMessage,
}

/// Where the servers of distributed mode are.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// RabbitMQ URL, or the URLs of a cluster's nodes, comma-separated (tried in order; after
    /// a lost connection, the next node first).
    #[arg(
        long,
        env = "KEYFLEET_AMQP_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        value_parser = AmqpUrlsParser
    )]
    pub amqp_url: crate::queue::nodes::AmqpUrls,
    /// Redis URL.
    #[arg(
        long,
        env = "KEYFLEET_REDIS_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379/"
    )]
    pub redis_url: String,
    /// Prefix of every queue, exchange and Redis key (lets several deployments share servers).
    #[arg(long, env = "KEYFLEET_PREFIX", default_value = "keyfleet", value_parser = parse_prefix)]
    pub prefix: String,
    /// How long to wait for RabbitMQ and Redis at start-up before giving up.
    #[arg(long, env = "KEYFLEET_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: std::time::Duration,
    #[command(flatten)]
    pub replicas: ReplicasArgs,
}

impl ServerArgs {
    pub fn endpoints(&self) -> crate::queue::endpoints::Endpoints {
        crate::queue::endpoints::Endpoints {
            amqp_url: self.amqp_url.clone(),
            redis_url: self.redis_url.clone(),
            prefix: self.prefix.clone(),
            connect_timeout: self.connect_timeout,
            redis_replicas: self.replicas.redis_replicas,
        }
    }
}

/// Where created public keys are registered: a cloud's key-pair API (`--upstream-endpoint`),
/// or nowhere but keyfleet's registry (no endpoint: the default).
#[derive(Debug, Clone, Default, Args)]
pub struct UpstreamArgs {
    /// Register every created public key in the cloud at this endpoint: PROVIDER=URL, e.g.
    /// `aliyun=http://127.0.0.1:18080` (repeat, or comma-separate, for both providers). Keys
    /// are imported with ImportKeyPair / ImportUHostKeyPairs, signed with the credentials of
    /// ALIBABA_CLOUD_ACCESS_KEY_ID/_SECRET and UCLOUD_PUBLIC_KEY/_PRIVATE_KEY or
    /// --upstream-credentials.
    #[arg(id = "upstream_endpoint", long = "upstream-endpoint", env = "KEYFLEET_UPSTREAM_ENDPOINTS", value_name = "PROVIDER=URL", value_delimiter = ',', value_parser = parse_upstream_endpoint)]
    pub endpoints: Vec<(Provider, crate::upstream::http::Endpoint)>,
    /// Register in these providers' public clouds (comma-separated: `aliyun,ucloud`):
    /// https://ecs.<RegionId>.aliyuncs.com and https://api.ucloud.cn, unless
    /// --upstream-endpoint names another endpoint for the provider.
    #[arg(id = "upstream_providers", long = "upstream", env = "KEYFLEET_UPSTREAM", value_name = "PROVIDERS", value_delimiter = ',', value_parser = parse_provider)]
    pub providers: Vec<Provider>,
    /// Upstream keys per owner, in `keyfleet serve`'s credentials format (`account` = the row's
    /// owner; mode 0600). Owners it does not name use the environment's keys.
    #[arg(
        id = "upstream_credentials",
        long = "upstream-credentials",
        env = "KEYFLEET_UPSTREAM_CREDENTIALS",
        value_name = "FILE"
    )]
    pub credentials: Option<PathBuf>,
    /// How Alibaba requests are signed: v3 (ACS3-HMAC-SHA256) or rpc (HMAC-SHA1).
    #[arg(id = "upstream_signature", long = "upstream-signature", env = "KEYFLEET_UPSTREAM_SIGNATURE", value_enum, default_value_t = crate::upstream::http::AliyunSigning::V3)]
    pub signature: crate::upstream::http::AliyunSigning,
    /// How long one key's registration may keep retrying through throttling and faults.
    #[arg(id = "upstream_timeout", long = "upstream-timeout", env = "KEYFLEET_UPSTREAM_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    pub timeout: std::time::Duration,
}

fn parse_upstream_endpoint(s: &str) -> Result<(Provider, crate::upstream::http::Endpoint), String> {
    crate::upstream::http::parse_endpoint(s).map_err(|e| e.to_string())
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Batch file (same formats as `run`).
    pub file: PathBuf,
    #[arg(long, env = "KEYFLEET_FORMAT", value_enum)]
    pub format: Option<Format>,
    #[arg(long, env = "KEYFLEET_PROVIDER", default_value = "aliyun", value_parser = parse_provider)]
    pub provider: Provider,
    #[arg(long, env = "KEYFLEET_OWNER", default_value = "default")]
    pub owner: String,
    #[command(flatten)]
    pub key: KeyBitsArgs,
    /// Batch id; default: a new UUID.
    #[arg(long, env = "KEYFLEET_BATCH_ID", value_parser = parse_batch_id)]
    pub batch_id: Option<String>,
    /// After enqueueing, collect the results into --out (like `collect`).
    #[arg(long, requires = "out", conflicts_with = "recipient")]
    pub wait: bool,
    /// Output folder for --wait.
    #[arg(long, env = "KEYFLEET_OUT", value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// How jobs are published: messages and confirms.
    #[command(flatten)]
    pub publish: PublishArgs,
    /// The batch's age identity file: private keys travel encrypted to it and only `collect`
    /// with this file can read them. Created (0600) when it does not exist. Default:
    /// <batch-id>.age-identity in the --out folder with --wait, otherwise in
    /// $XDG_STATE_HOME/keyfleet/ (~/.local/state/keyfleet/), where `collect` finds it; removed
    /// once the batch is completely collected. Lose it and the batch's keys cannot be read.
    #[arg(
        long,
        env = "KEYFLEET_IDENTITY",
        value_name = "FILE",
        conflicts_with = "recipient"
    )]
    pub identity: Option<PathBuf>,
    /// Encrypt the batch's private keys to this age recipient (age1…) instead; you keep its
    /// identity and give it to `collect --identity`.
    #[arg(long, env = "KEYFLEET_RECIPIENT", value_name = "AGE1…")]
    pub recipient: Option<String>,
    #[command(flatten)]
    pub results: ResultsArgs,
}

#[derive(Debug, Args)]
pub struct CollectArgs {
    /// The batch id `submit` printed.
    #[arg(value_parser = parse_batch_id)]
    pub batch_id: String,
    /// Output folder (made 0700): key files, their .pub files and manifest.jsonl, as `run`
    /// writes them. The same folder again resumes where the last collect stopped.
    #[arg(long, env = "KEYFLEET_OUT", value_name = "DIR")]
    pub out: PathBuf,
    /// Stop after this long without a result (run again later to continue).
    #[arg(long, env = "KEYFLEET_IDLE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub idle_timeout: std::time::Duration,
    /// The batch's age identity file. Default: <batch-id>.age-identity where `submit` puts it —
    /// the --out folder, then $XDG_STATE_HOME/keyfleet/ (~/.local/state/keyfleet/), then the
    /// working directory. It is checked against the batch's recipient before anything is read.
    #[arg(long, env = "KEYFLEET_IDENTITY", value_name = "FILE")]
    pub identity: Option<PathBuf>,
    #[command(flatten)]
    pub results: ResultsArgs,
}

/// Where a batch's results are and how their collection reports: the flags `submit` and
/// `collect` share.
#[derive(Debug, Args)]
pub struct ResultsArgs {
    /// Keep an identity found in its default place once the batch is completely collected
    /// (`collect`, `submit --wait`); otherwise it is removed then. One named with --identity is
    /// always kept.
    #[arg(long, env = "KEYFLEET_KEEP_IDENTITY")]
    pub keep_identity: bool,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub report: ReportArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// A batch id, or a rotation id (`rot-…`: read from the state file when it holds it,
    /// otherwise from Redis, where `rotate --submit` records it).
    #[arg(value_parser = parse_batch_id)]
    pub batch_id: String,
    /// The state file a rotation is recorded in.
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    #[arg(long)]
    pub json: bool,
}

/// `keyfleet-worker`'s flags.
#[derive(Debug, Parser)]
#[command(
    name = "keyfleet-worker",
    version,
    about = "keyfleet worker: consumes key-creation jobs from RabbitMQ, enforces quotas in Redis, publishes results",
    long_about = "keyfleet worker: consumes key-creation jobs from RabbitMQ, generates RSA keys on a \
rayon pool, enforces the per-region quota atomically in Redis, rate-limits upstream calls per \
provider and region, and publishes each result (with the private key) before acking its job.\n\n\
Run as many as you like, anywhere. SIGTERM/Ctrl-C drains: stop consuming, finish jobs in flight \
within --drain-timeout, leave the rest for redelivery, exit 0; a second signal exits at once (130).\n\n\
Exit status: 0 after a drain; 1 when start-up or the worker failed (the message says which \
server); 2 for bad flags."
)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Jobs in flight at once, 1 to 65535; also the RabbitMQ prefetch, in messages (a v2
    /// message of `submit --jobs-per-message` jobs waits, unacked, until its jobs have room).
    /// Default: 4 per key-generation thread, plus 64 (so the Redis and RabbitMQ round trips of
    /// jobs that make no key overlap).
    #[arg(long, env = "KEYFLEET_CONCURRENCY", value_parser = parse_concurrency)]
    pub concurrency: Option<u16>,
    #[command(flatten)]
    pub cpu: EngineArgs,
    /// Key pairs allowed per region (default 500, or `quota` in the config file).
    #[arg(long, env = "KEYFLEET_QUOTA", value_name = "N", value_parser = parse_quota)]
    pub quota: Option<u64>,
    /// RSA-2048 keys generated ahead on idle threads and kept in memory (never persisted) so a
    /// burst of jobs does not wait for key generation; 0 turns the reservoir off.
    #[arg(long, env = "KEYFLEET_RESERVOIR", default_value_t = 16)]
    pub reservoir: usize,
    /// Fill the reservoir once and never refill it: for measuring the plumbing alone
    /// (`scripts/bench-distributed.sh --pooled`), where refills would take the cores being
    /// measured. Jobs beyond the reservoir make their keys as usual.
    #[arg(long, env = "KEYFLEET_RESERVOIR_ONCE")]
    pub reservoir_once: bool,
    #[command(flatten)]
    pub upstream_limit: UpstreamLimitArgs,
    #[command(flatten)]
    pub upstream: UpstreamArgs,
    /// After a shutdown signal, how long jobs in flight may take to finish.
    #[arg(long, env = "KEYFLEET_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: std::time::Duration,
    /// Prometheus /metrics, /healthz, /readyz; `off` to disable. Loopback unless you ask for
    /// more (`0.0.0.0:9464` for a scraper on another host). When the default port is taken (a
    /// second worker on this host), a free loopback port is used and logged; a port given
    /// here that is taken is an error. `127.0.0.1:0` always picks a free port.
    #[arg(long, env = "KEYFLEET_METRICS_ADDR", value_parser = parse_metrics_addr)]
    pub metrics_addr: Option<MetricsAddr>,
    /// Config file (TOML; same format as keyfleet's). Default: ./keyfleet.toml when it exists.
    #[arg(long, env = "KEYFLEET_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Send private keys in plaintext for batches with no recipient in Redis (jobs published
    /// by producers other than `keyfleet submit`). Off: such jobs are dead-lettered.
    #[arg(long, env = "KEYFLEET_ALLOW_PLAINTEXT_RESULTS")]
    pub allow_plaintext_results: bool,
    #[arg(
        long,
        env = "KEYFLEET_LOG",
        default_value = "info",
        value_name = "FILTER"
    )]
    pub log: String,
}

/// More key-generation threads than cores only adds switching: past 4 per core a value is a
/// typo (`--threads 100000` would spend minutes starting threads).
pub fn max_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) * 4
}

pub(crate) fn parse_threads(s: &str) -> Result<usize, String> {
    let max = max_threads();
    match s.trim().parse::<usize>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(format!(
            "must be 0 (one per core) to {max} (4 per core on this machine) (--threads / KEYFLEET_THREADS)"
        )),
    }
}

fn parse_concurrency(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("must be 1 to 65535 (--concurrency / KEYFLEET_CONCURRENCY)".into()),
    }
}

/// `30s`, `500ms`, `2m`, `1h 30m` (humantime's forms) or plain seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let parsed = match t.parse::<f64>() {
        Ok(secs) if secs.is_finite() && (0.0..1e9).contains(&secs) => {
            Ok(std::time::Duration::from_secs_f64(secs))
        }
        Ok(_) => Err(()),
        Err(_) => humantime::parse_duration(t).map_err(drop),
    };
    parsed
        .ok()
        .filter(|d| d.as_secs() < 1_000_000_000)
        .ok_or_else(|| format!("'{s}' is not a duration: use e.g. 30s, 500ms, 2m"))
}

/// Where a worker serves its metrics unless told: loopback, so nothing is exposed on every
/// interface unasked.
pub const DEFAULT_WORKER_METRICS: std::net::SocketAddr = std::net::SocketAddr::V4(
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 9464),
);

/// A listen address, or none (`off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<std::net::SocketAddr>);

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s.eq_ignore_ascii_case("off") || s.is_empty() {
        return Ok(MetricsAddr(None));
    }
    s.parse()
        .map(|a| MetricsAddr(Some(a)))
        .map_err(|_| format!("'{s}' is not host:port (e.g. 0.0.0.0:9464) or off (--metrics-addr / KEYFLEET_METRICS_ADDR)"))
}

/// Parses `--amqp-url` without echoing it: clap's own message for a bad value quotes the value,
/// and these URLs usually hold a password. Ours names the flag and the URL without it.
#[derive(Clone, Copy, Debug)]
struct AmqpUrlsParser;

impl clap::builder::TypedValueParser for AmqpUrlsParser {
    type Value = crate::queue::nodes::AmqpUrls;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Self::Value, clap::Error> {
        let fail = |message: String| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("{message} (--amqp-url / KEYFLEET_AMQP_URL)"),
            )
            .format(&mut cmd.clone())
        };
        value
            .to_str()
            .ok_or_else(|| fail("the RabbitMQ URL is not UTF-8".into()))?
            .parse()
            .map_err(|e: crate::queue::nodes::AmqpUrlError| fail(e.to_string()))
    }
}

fn parse_prefix(s: &str) -> Result<String, String> {
    if !s.is_empty()
        && s.len() <= 46
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "'{s}' is not a prefix: 1-46 of A-Z a-z 0-9 - _ . (--prefix / KEYFLEET_PREFIX)"
        ))
    }
}

/// Batch ids: the job contract's rule (`job::check_batch_id`), so any batch a producer can
/// submit can be `status`ed and `collect`ed.
pub fn parse_batch_id(s: &str) -> Result<String, String> {
    crate::job::check_batch_id(s)
        .map(|()| s.to_owned())
        .map_err(|e| format!("'{}' is not a batch id: {e}", crate::dialect::clip(s)))
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Batch file: CSV whose header uses API parameter names (RegionId, KeyPairName, Tag.1.Key…;
    /// optional Provider and Owner columns), or JSON Lines of flat objects with the same names.
    /// `-` reads standard input.
    pub file: PathBuf,
    #[command(flatten)]
    pub state: StateArgs,
    /// Key pairs allowed per region (both clouds document 500).
    #[arg(long, env = "KEYFLEET_QUOTA", value_name = "N", value_parser = parse_quota)]
    pub quota: Option<u64>,
    /// Output folder: manifest.jsonl plus one private key file (0600) and .pub per created pair.
    #[arg(long, env = "KEYFLEET_OUT", value_name = "DIR")]
    pub out: PathBuf,
    /// Input format; by default from the extension (.csv, .jsonl/.ndjson).
    #[arg(long, env = "KEYFLEET_FORMAT", value_enum)]
    pub format: Option<Format>,
    /// Provider of rows without a Provider column.
    #[arg(long, env = "KEYFLEET_PROVIDER", default_value = "aliyun", value_parser = parse_provider)]
    pub provider: Provider,
    /// Owner (Alibaba account / UCloud default project) of rows without an Owner column.
    #[arg(long, env = "KEYFLEET_OWNER", default_value = "default")]
    pub owner: String,
    #[command(flatten)]
    pub key: KeyBitsArgs,
    #[command(flatten)]
    pub cpu: EngineArgs,
    /// Batch id (ties job ids to rows so a re-run after a crash resumes). Default: derived
    /// from the input file's absolute path.
    #[arg(long, env = "KEYFLEET_BATCH_ID", value_parser = parse_batch_id)]
    pub batch_id: Option<String>,
    #[command(flatten)]
    pub report: ReportArgs,
    /// Serve Prometheus /metrics (and /healthz, /readyz) here while the run lasts, e.g.
    /// 127.0.0.1:9464. Off by default.
    #[arg(long, env = "KEYFLEET_METRICS_ADDR", default_value = "off", value_parser = parse_metrics_addr)]
    pub metrics_addr: MetricsAddr,
    #[command(flatten)]
    pub upstream: UpstreamArgs,
    #[command(flatten)]
    pub upstream_limit: UpstreamLimitArgs,
}

/// Which key pairs a command takes from the registry (`describe`, `rotate`): every filter
/// given must match.
#[derive(Debug, Args)]
pub struct SelectionArgs {
    /// Only the pairs of this provider.
    #[arg(long, value_parser = parse_provider)]
    pub provider: Option<Provider>,
    /// Alibaba account / UCloud project.
    #[arg(long)]
    pub owner: Option<String>,
    #[arg(long)]
    pub region: Option<String>,
    /// Key pair name; `*` matches any run of characters.
    #[arg(long)]
    pub name: Option<String>,
    /// Fingerprint (the API's, the MD5 colon form, or SHA256:…).
    #[arg(long)]
    pub fingerprint: Option<String>,
}

impl SelectionArgs {
    pub fn filter(&self) -> crate::registry::Filter {
        crate::registry::Filter {
            provider: self.provider,
            owner: self.owner.clone(),
            region: self.region.clone(),
            name: self.name.clone(),
            fingerprint: self.fingerprint.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct DescribeArgs {
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `keyfleet rotate`.
#[derive(Debug, Args)]
pub struct RotateArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// Key pairs allowed per region (both clouds document 500).
    #[arg(long, env = "KEYFLEET_QUOTA", value_name = "N", value_parser = parse_quota)]
    pub quota: Option<u64>,
    /// The pairs to rotate, as `describe` selects them.
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Rotate only the pairs named in this file, one name a line (with the filters above).
    #[arg(long, value_name = "FILE")]
    pub names_file: Option<PathBuf>,
    /// The successor's name: `{name}` is the replaced pair's, `{yyyymmdd}` the UTC date the
    /// rotation is recorded. Every successor name is checked against the API's name rules
    /// before anything is created.
    #[arg(long, env = "KEYFLEET_SUCCESSOR", value_name = "TEMPLATE", default_value = crate::modes::rotate::DEFAULT_TEMPLATE)]
    pub successor: String,
    /// Output folder: manifest.jsonl (each line names the pair its successor `replaces`, with
    /// an `authorized_keys` line) plus one private key file (0600) and .pub per successor.
    #[arg(long, env = "KEYFLEET_OUT", value_name = "DIR")]
    pub out: PathBuf,
    /// The rotation's id (`rot-…`). Default: derived from the selection and --successor, so
    /// the same command resumes the same rotation; give a new one to rotate the same pairs
    /// again after a finished rotation.
    #[arg(long, env = "KEYFLEET_ROTATION_ID", value_parser = parse_rotation_id)]
    pub rotation_id: Option<String>,
    /// When the free quota cannot hold every successor beside the pair it replaces: create
    /// as many successors as fit, retire their replaced pairs once delivered, and go on.
    #[arg(long)]
    pub waves: bool,
    /// Retire every replaced pair (registry and cloud) once every successor is delivered.
    #[arg(long)]
    pub retire: bool,
    /// Create the successors through RabbitMQ and the workers (distributed mode), selecting
    /// pairs in and recording the rotation in the fleet's Redis registry (--redis-url), not
    /// the state file. The workers register the successors in the cloud; this command deletes
    /// the replaced pairs there when it retires them (--upstream-endpoint).
    #[arg(long)]
    pub submit: bool,
    /// With --submit: collect the successors' keys into --out as they come (as `submit
    /// --wait` does), wave by wave with --waves, and retire with --waves / --retire. Without
    /// it, the jobs are published and `keyfleet collect ROTATION-ID --out DIR` collects them.
    #[arg(long, requires = "submit")]
    pub wait: bool,
    /// With --submit: the age identity file the successors' private keys are encrypted to
    /// (read if it exists, created 0600 if not). Default: in --out, removed once every
    /// successor's key is there.
    #[arg(
        long,
        value_name = "FILE",
        requires = "submit",
        conflicts_with = "recipient"
    )]
    pub identity: Option<PathBuf>,
    /// With --submit --wait: keep the identity made in --out once every successor's key is
    /// there (it is removed otherwise; one named with --identity is always kept).
    #[arg(long, env = "KEYFLEET_KEEP_IDENTITY")]
    pub keep_identity: bool,
    /// With --submit and without --wait: encrypt the successors' keys to this age recipient
    /// (`age1…`), whose identity you keep.
    #[arg(
        long,
        value_name = "AGE1…",
        requires = "submit",
        conflicts_with = "wait"
    )]
    pub recipient: Option<String>,
    /// With --submit --wait: give up after this long without a result (are the workers
    /// running?); run the same command again to go on.
    #[arg(long, env = "KEYFLEET_IDLE_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub idle_timeout: std::time::Duration,
    /// How jobs are published: messages and confirms.
    #[command(flatten)]
    pub publish: PublishArgs,
    /// RabbitMQ and Redis, with --submit.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Serve Prometheus /metrics (and /healthz, /readyz) here while the rotation runs, e.g.
    /// 127.0.0.1:9464. Off by default.
    #[arg(long, env = "KEYFLEET_METRICS_ADDR", default_value = "off", value_parser = parse_metrics_addr)]
    pub metrics_addr: MetricsAddr,
    #[command(flatten)]
    pub key: KeyBitsArgs,
    #[command(flatten)]
    pub cpu: EngineArgs,
    #[command(flatten)]
    pub report: ReportArgs,
    /// With an endpoint, successors are registered in the cloud (as `run` registers) and
    /// replaced pairs deleted there when retired.
    #[command(flatten)]
    pub upstream: UpstreamArgs,
    #[command(flatten)]
    pub upstream_limit: UpstreamLimitArgs,
}

/// `keyfleet retire`.
#[derive(Debug, Args)]
pub struct RetireArgs {
    /// The rotation id `rotate` printed.
    #[arg(value_parser = parse_rotation_id)]
    pub rotation_id: String,
    /// The state file, or with --redis-url the fleet's registry (a rotation made with
    /// `rotate --submit`).
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// With an endpoint, the replaced pairs are deleted in the cloud too (DeleteKeyPairs /
    /// DeleteUHostKeyPairs), before keyfleet's registry.
    #[command(flatten)]
    pub upstream: UpstreamArgs,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Rotation ids: a batch id (its successors' jobs carry it) that starts with `rot-`.
pub fn parse_rotation_id(s: &str) -> Result<String, String> {
    let id = parse_batch_id(s)?;
    if !id.starts_with(crate::modes::rotate::ID_PREFIX) {
        return Err(format!(
            "'{}' is not a rotation id: rotation ids start with {}",
            crate::dialect::clip(s),
            crate::modes::rotate::ID_PREFIX
        ));
    }
    Ok(id)
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub scope: ScopeArgs,
    /// Names of the key pairs to delete.
    #[arg(required = true)]
    pub names: Vec<String>,
    /// With an endpoint, the pairs are deleted in the cloud too (DeleteKeyPairs /
    /// DeleteUHostKeyPairs), before keyfleet's registry.
    #[command(flatten)]
    pub upstream: UpstreamArgs,
}

/// `keyfleet reconcile`.
#[derive(Debug, Args)]
pub struct ReconcileArgs {
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub scope: ScopeArgs,
    /// The cloud to compare with (required: --upstream-endpoint).
    #[command(flatten)]
    pub upstream: UpstreamArgs,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Keys to generate per measurement.
    #[arg(long, default_value_t = 64)]
    pub keys: usize,
    #[command(flatten)]
    pub cpu: EngineArgs,
    #[command(flatten)]
    pub key: KeyBitsArgs,
    /// Also measure, alternated round by round, `rsa`'s RsaPrivateKey::new and OpenSSL's RSA
    /// key generation (through Python `cryptography`, when python3 has it), and report ratios.
    #[arg(long)]
    pub compare: bool,
    /// Force the portable Miller-Rabin path even on a CPU with AVX-512 IFMA (the same as
    /// KEYFLEET_SIMD=off).
    #[arg(long)]
    pub scalar: bool,
    /// Rounds to alternate (medians are reported). Default: 3 with --pipeline or --compare, else 1.
    #[arg(long, env = "KEYFLEET_BENCH_ROUNDS", value_name = "N")]
    pub rounds: Option<usize>,
    /// Also run `keyfleet run` on a generated batch of --keys rows (temporary folder and state)
    /// and report its keys/s against raw generation.
    #[arg(long)]
    pub pipeline: bool,
    /// With --pipeline: also time `run` with every key made before the clock starts (kept in
    /// memory, no refills), so the plumbing alone is measured: keys/s and CPU ms a key. This
    /// figure does not depend on how fast the CPU makes keys.
    #[arg(long, requires = "pipeline")]
    pub pooled: bool,
    /// With --pipeline: leave the rounds' output folders in place (their path is printed)
    /// instead of removing them at the end. On ext4 without a journal, files created within
    /// 60 s (up to 5 minutes) of many being deleted cost several times the CPU (the inode
    /// allocator passes over each recently deleted inode), so the next benchmark would measure
    /// this one's cleanup; remove the folder yourself, and wait, before a run that should not.
    /// Without --pipeline it does nothing, so it may be set in the environment.
    #[arg(long, env = "KEYFLEET_BENCH_KEEP_OUTPUT")]
    pub keep_output: bool,
    /// Instead: measure `keyfleet serve` over loopback — --keys signed CreateKeyPair requests
    /// per measurement, creates/s and p50/p99 latency with the key reservoir warm and cold,
    /// against raw key generation on the same threads (each round raw, then cold, then warm;
    /// medians, and the cold ratio as the median of each round's own), and the CPU a cold
    /// create costs by thread (keys, state file, server runtime, the benchmark's client).
    #[arg(long, conflicts_with_all = ["compare", "pipeline"])]
    pub serve: bool,
    /// Instead: measure `keyfleet submit` of --keys generated rows against a bare publisher (the
    /// same jobs queue, message and confirm window, nothing else) on the RabbitMQ and Redis of
    /// --amqp-url / --redis-url, rounds alternated, medians. Queues of its own, deleted after.
    #[arg(long, conflicts_with_all = ["compare", "pipeline", "serve"])]
    pub submit: bool,
    /// How jobs are published: messages and confirms.
    #[command(flatten)]
    pub publish: PublishArgs,
    /// With --submit: where RabbitMQ and Redis are.
    #[command(flatten)]
    pub server: ServerArgs,
    /// With --serve: requests in flight at once.
    #[arg(long, env = "KEYFLEET_BENCH_CONCURRENCY", default_value_t = 8)]
    pub concurrency: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn parse_quota(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(n) if (1..=10_000_000).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{s}' is not a quota: a whole number from 1 to 10000000 (--quota / KEYFLEET_QUOTA)"
        )),
    }
}

pub(crate) fn parse_key_bits(s: &str) -> Result<KeyBits, String> {
    s.parse::<KeyBits>()
        .map_err(|e| format!("{e} (--key-bits / KEYFLEET_KEY_BITS)"))
}

fn parse_provider(s: &str) -> Result<Provider, String> {
    s.parse::<Provider>()
}
