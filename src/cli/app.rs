//! The `keyfleet` command: turns parsed flags and the config file into calls of the library.
//! `main.rs` only parses, sets up logging and the shutdown signal, and calls [`execute`].
//!
//! Each command is one function here that resolves its settings, calls its mode
//! (`crate::modes::*`) and prints what the mode returns. Exit codes are decided in one place,
//! [`exit_code`]: a setting that cannot work is a [`BadSetting`] (2, as clap's bad flags), any
//! other error 1.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use sha2::Digest;
use tokio_util::sync::CancellationToken;

use crate::cli::config::{
    BenchArgs, Cli, CollectArgs, Command, DeleteArgs, DescribeArgs, EngineArgs, KeyBitsArgs,
    MetricsAddr, ReconcileArgs, ResultsArgs, RetireArgs, RotateArgs, RunArgs, ServeArgs,
    ServerArgs, StateArgs, StatusArgs, SubmitArgs,
};
use crate::cli::resolve::{resolve, FileConfig, Overrides};
use crate::job::batch::RowDefaults;
use crate::modes::collect::{CollectOptions, CollectSummary};
use crate::modes::delete::Deleted;
use crate::modes::run::{run, RunOptions};
use crate::modes::submit::{KeysTo, SubmitOptions};
use crate::registry::batch_status::BatchStatusStore;
use crate::registry::embedded::EmbeddedRegistry;
use crate::registry::redis::RedisRegistry;
use crate::registry::Registry;
use crate::sink::transit;
use crate::upstream::Configured;

/// Exit codes: 0 done, 1 the run itself failed, 2 bad flags/config (clap uses 2 too),
/// 130 interrupted.
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_CONFIG: u8 = 2;
pub const EXIT_INTERRUPTED: u8 = 130;

/// Standard output that reports a closed pipe (`keyfleet describe | head -1`) as an error,
/// which `main` ends on quietly with success, where `println!` would panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*)?
    }};
}
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

/// A setting that cannot work — the config file, a credentials file, an endpoint: the command
/// exits 2, as for a bad flag, with the message and its causes.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadSetting(String);

impl BadSetting {
    fn from(e: &(dyn std::error::Error + 'static)) -> anyhow::Error {
        BadSetting(crate::sink::error_chain(e)).into()
    }
}

/// The exit code for an error `execute` returned, after printing it. A write to a closed pipe
/// (`| head`) is success: the reader has all it wanted, as `ripgrep` does.
pub fn exit_code(e: &anyhow::Error) -> ExitCode {
    let broken_pipe = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    });
    if broken_pipe {
        return ExitCode::SUCCESS;
    }
    eprintln!("keyfleet: {e:#}");
    ExitCode::from(if e.is::<BadSetting>() {
        EXIT_CONFIG
    } else {
        EXIT_FAILED
    })
}

/// Runs `$command(&registry, args, …)` on the registry `args.registry` names: Redis with
/// `--redis-url`, otherwise the embedded state file.
macro_rules! on_registry {
    ($command:ident, $args:expr, $file:expr $(, $extra:expr)*) => {{
        let args = $args;
        match args.registry.redis_url.clone() {
            Some(url) => {
                let registry =
                    redis_registry(&url, &args.registry.prefix, args.registry.replicas.redis_replicas)
                        .await?;
                $command(&registry, args $(, $extra)*).await
            }
            None => {
                let state = state_path(&args.registry.state, $file);
                $command(&open_registry(&state)?, args $(, $extra)*).await
            }
        }
    }};
}

/// Runs one `keyfleet` command. Errors carry context for the user; [`exit_code`] prints them.
pub async fn execute(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let (file, _path) =
        FileConfig::load(cli.global.config.as_deref()).map_err(|e| BadSetting::from(&e))?;
    match cli.command {
        Command::Run(args) => run_command(&file, args, shutdown).await,
        Command::Submit(args) => submit_command(&file, args, shutdown).await,
        Command::Collect(args) => collect_command(args, shutdown).await,
        Command::Status(args) => status_command(&file, args).await,
        Command::Rotate(args) => rotate_command(&file, *args, shutdown).await,
        Command::Retire(args) => retire_command(&file, args).await,
        Command::Serve(args) => serve_command(&file, args, shutdown).await,
        Command::Describe(args) => on_registry!(describe_command, args, &file),
        Command::Delete(args) => {
            let cloud = Configured::cloud(&args.upstream.resolve(&file))
                .map_err(|e| BadSetting::from(&e))?;
            on_registry!(delete_command, args, &file, cloud.as_ref())
        }
        Command::Reconcile(args) => {
            let cloud = Configured::cloud(&args.upstream.resolve(&file))
                .map_err(|e| BadSetting::from(&e))?
                .ok_or_else(|| {
                    BadSetting(
                        "reconcile: no cloud to compare with: give --upstream-endpoint PROVIDER=URL"
                            .into(),
                    )
                })?;
            on_registry!(reconcile_command, args, &file, &cloud)
        }
        Command::Bench(args) => bench_command(args).await,
        Command::Completions(args) => {
            let mut out = Vec::new();
            crate::cli::generate::completions(args.shell, &mut out);
            std::io::Write::write_all(&mut std::io::stdout(), &out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man(args) => {
            let mut out = Vec::new();
            crate::cli::generate::man(args.out.as_deref(), &mut out)?;
            std::io::Write::write_all(&mut std::io::stdout(), &out)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// 0 when `ok`, otherwise 1.
fn success_if(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}

/// 130 when a signal stopped the command, otherwise `code`.
fn unless_interrupted(interrupted: bool, code: ExitCode) -> ExitCode {
    if interrupted {
        ExitCode::from(EXIT_INTERRUPTED)
    } else {
        code
    }
}

async fn run_command(
    file: &FileConfig,
    args: RunArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<ExitCode> {
    let resolved = resolve(
        &making_keys(&args.state, args.quota, &args.key, &args.cpu),
        file,
    );
    let opts = RunOptions {
        defaults: RowDefaults {
            batch_id: args
                .batch_id
                .clone()
                .unwrap_or_else(|| batch_id_for(&args.file)),
            provider: args.provider,
            owner: args.owner.clone(),
            key_bits: resolved.key_bits,
        },
        input: args.file.clone(),
        format: args.format,
        out: args.out.clone(),
        state: resolved.state,
        threads: resolved.threads,
        settings: resolved.settings,
        progress: args.report.progress,
        reservoir: None,
    };
    serve_embedded_metrics(&args.metrics_addr, &shutdown).await?;
    let upstream_settings = args.upstream.resolve(file);
    let failed = || format!("keyfleet run {} failed", args.file.display());
    let summary = if !upstream_settings.is_remote() {
        run(
            opts,
            std::sync::Arc::new(crate::upstream::LocalUpstream),
            shutdown,
        )
        .await
    } else {
        let limit = args.upstream_limit.rate_limit();
        let upstream =
            Configured::build(&upstream_settings, limit).map_err(|e| BadSetting::from(&e))?;
        run(opts, std::sync::Arc::new(upstream), shutdown).await
    }
    .with_context(failed)?;
    if args.report.json {
        outln!("{}", serde_json::to_string(&summary)?);
    } else {
        out!("{}", summary.render());
    }
    Ok(unless_interrupted(summary.interrupted, ExitCode::SUCCESS))
}

/// Serves /metrics while an embedded command runs, when `--metrics-addr` asks for it.
async fn serve_embedded_metrics(
    addr: &MetricsAddr,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    if let Some(addr) = addr.0 {
        crate::telemetry::metrics::install().context("cannot start metrics")?;
        let readiness = crate::telemetry::metrics::Readiness::new();
        // Embedded mode has no servers to wait for.
        readiness.set_amqp(true);
        readiness.set_redis(true);
        let bound = crate::telemetry::metrics::serve(addr, readiness, shutdown.child_token())
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        eprintln!("metrics: http://{bound}/metrics");
    }
    Ok(())
}

async fn rotate_command(
    file: &FileConfig,
    args: RotateArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<ExitCode> {
    use crate::modes::rotate::{self, RotateError, RotateOptions, Selection};
    rotate::check_template(&args.successor).map_err(|e| BadSetting::from(&e))?;
    let resolved = resolve(
        &making_keys(&args.state, args.quota, &args.key, &args.cpu),
        file,
    );
    let names = match &args.names_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --names-file {}", path.display()))?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect(),
        ),
        None => None,
    };
    let opts = RotateOptions {
        rotation_id: args.rotation_id.clone(),
        selection: Selection {
            filter: args.selection.filter(),
            names,
        },
        template: args.successor.clone(),
        out: args.out.clone(),
        threads: resolved.threads,
        settings: resolved.settings,
        key_bits: resolved.key_bits,
        progress: args.report.progress,
        waves: args.waves,
        retire: args.retire,
    };
    let summary = if args.submit {
        serve_embedded_metrics(&args.metrics_addr, &shutdown).await?;
        rotate_through_workers(opts, &args, file, shutdown).await?
    } else {
        let upstream = Configured::build(
            &args.upstream.resolve(file),
            args.upstream_limit.rate_limit(),
        )
        .map_err(|e| BadSetting::from(&e))?;
        let upstream = std::sync::Arc::new(upstream);
        let cloud = match &*upstream {
            Configured::Http(h) => Some(h),
            Configured::Local(_) => None,
        };
        serve_embedded_metrics(&args.metrics_addr, &shutdown).await?;
        // A batch, as `run` is: its threads batch-scheduled (`scheduling.rs`), the state
        // file's writer among them.
        let _batch = crate::scheduling::batch();
        let registry = std::sync::Arc::new(open_registry(&resolved.state)?);
        match rotate::rotate(opts, registry, upstream.clone(), cloud, shutdown).await {
            Ok(s) => s,
            Err(e @ RotateError::Template { .. }) => return Err(BadSetting::from(&e)),
            Err(e) => return Err(anyhow::Error::new(e).context("keyfleet rotate failed")),
        }
    };
    if args.report.json {
        outln!("{}", serde_json::to_string(&summary)?);
    } else {
        out!("{}", summary.render());
    }
    Ok(unless_interrupted(
        summary.interrupted,
        success_if(!summary.incomplete),
    ))
}

/// `rotate --submit`: the rotation through RabbitMQ and the workers, on the Redis registry.
async fn rotate_through_workers(
    opts: crate::modes::rotate::RotateOptions,
    args: &RotateArgs,
    file: &FileConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<crate::modes::rotate::RotateSummary> {
    use crate::modes::rotate::{fleet, RotateError};
    if (args.waves || args.retire) && !args.wait {
        return Err(BadSetting(
            "rotate --submit: --waves and --retire need --wait (a replaced pair is retired only once its successor's key is in --out)".into(),
        )
        .into());
    }
    let cloud =
        Configured::cloud(&args.upstream.resolve(file)).map_err(|e| BadSetting::from(&e))?;
    let endpoints = args.server.endpoints();
    let registry = std::sync::Arc::new(
        redis_registry(
            &endpoints.redis_url,
            &endpoints.prefix,
            endpoints.redis_replicas,
        )
        .await?,
    );
    // The rotation's id is its batch id: the identity is named after it.
    let id = opts
        .rotation_id
        .clone()
        .unwrap_or_else(|| opts.selection.derived_id(&opts.template));
    let (keys_to, remove_identity) = match (&args.recipient, &args.identity) {
        (Some(r), _) => (KeysTo::Recipient(r.clone()), None),
        (None, Some(path)) => (KeysTo::IdentityFile(path.clone()), None),
        (None, None) => {
            let path = transit::default_identity_path(&id, Some(&opts.out))
                .context("keyfleet rotate: no place for the rotation's identity")?;
            let remove = (!args.keep_identity).then(|| path.clone());
            (KeysTo::IdentityFile(path), remove)
        }
    };
    let fleet_opts = fleet::FleetOptions {
        endpoints,
        keys_to,
        identity: args.identity.clone(),
        remove_identity,
        wait: args.wait,
        idle_timeout: args.idle_timeout,
        confirm_window: args.publish.confirm_window.max(1),
        jobs_per_message: args.publish.jobs_per_message,
    };
    match fleet::rotate(opts, fleet_opts, registry, cloud.as_ref(), shutdown).await {
        Ok(s) => Ok(s),
        Err(
            e @ (RotateError::Template { .. }
            | RotateError::OtherFolder { .. }
            | RotateError::Submit(crate::modes::submit::SubmitError::OtherRecipient { .. })
            | RotateError::Collect(
                crate::modes::collect::CollectError::IdentityMismatch { .. }
                | crate::modes::collect::CollectError::NoIdentity { .. },
            )),
        ) => Err(BadSetting::from(&e)),
        Err(e) => Err(anyhow::Error::new(e).context("keyfleet rotate --submit failed")),
    }
}

async fn retire_command(file: &FileConfig, args: RetireArgs) -> anyhow::Result<ExitCode> {
    let cloud =
        Configured::cloud(&args.upstream.resolve(file)).map_err(|e| BadSetting::from(&e))?;
    on_registry!(retire_on, args, file, cloud.as_ref())
}

async fn retire_on<R: crate::registry::Registry>(
    registry: &R,
    args: RetireArgs,
    cloud: Option<&crate::upstream::http::HttpUpstream>,
) -> anyhow::Result<ExitCode> {
    let (status, retired) = crate::modes::rotate::retire(registry, cloud, &args.rotation_id)
        .await
        .with_context(|| format!("keyfleet retire {} failed", args.rotation_id))?;
    if args.json {
        outln!(
            "{}",
            serde_json::json!({ "retired_now": retired, "status": status })
        );
    } else {
        outln!("retired {retired} replaced pair(s)");
        out!("{}", status.render());
    }
    Ok(success_if(status.retired == status.replaced))
}

/// A stable batch id for a file: the same path gives the same job ids on a re-run.
fn batch_id_for(path: &Path) -> String {
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let digest = sha2::Sha256::digest(abs.to_string_lossy().as_bytes());
    let hex = hex::encode(&digest[..8]);
    format!("run-{hex}")
}

async fn submit_command(
    file: &FileConfig,
    args: SubmitArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<ExitCode> {
    let batch_id = args
        .batch_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let resolved = resolve(
        &Overrides {
            key_bits: args.key.key_bits,
            ..Overrides::default()
        },
        file,
    );
    let json = args.results.report.json;
    let opts = SubmitOptions {
        input: args.file.clone(),
        format: args.format,
        defaults: RowDefaults {
            batch_id: batch_id.clone(),
            provider: args.provider,
            owner: args.owner.clone(),
            key_bits: resolved.key_bits,
        },
        catalog: resolved.settings.catalog,
        endpoints: args.results.server.endpoints(),
        progress: args.results.report.progress,
        confirm_window: args.publish.confirm_window.max(1),
        jobs_per_message: args.publish.jobs_per_message,
        keys_to: match (&args.recipient, &args.identity) {
            (Some(r), _) => KeysTo::Recipient(r.clone()),
            (None, Some(path)) => KeysTo::IdentityFile(path.clone()),
            (None, None) => KeysTo::IdentityFile(
                transit::default_identity_path(
                    &batch_id,
                    args.out.as_deref().filter(|_| args.wait),
                )
                .context("keyfleet submit: no place for the batch's identity")?,
            ),
        },
    };
    if let KeysTo::IdentityFile(path) = &opts.keys_to {
        eprintln!(
            "batch {batch_id}: private keys encrypted to identity {} (collect finds it there; without it the batch's keys cannot be read)",
            path.display()
        );
    }
    let summary = crate::modes::submit::submit(opts, shutdown.clone())
        .await
        .with_context(|| format!("keyfleet submit {} failed", args.file.display()))?;
    if json && !args.wait {
        outln!("{}", serde_json::to_string(&summary)?);
    } else if !json {
        // Standard output is the batch id alone (`B=$(keyfleet submit f.csv)`); the report
        // goes to standard error.
        outln!("{}", summary.batch_id);
        std::io::Write::flush(&mut std::io::stdout())?;
        eprintln!(
            "batch {}: {} rows, {} enqueued, {} answered at once as failed, {:.0} rows/s",
            summary.batch_id,
            summary.rows,
            summary.enqueued,
            summary.rejected,
            summary.jobs_per_second
        );
    }
    let Some(out) = args
        .out
        .clone()
        .filter(|_| args.wait && !summary.interrupted)
    else {
        return Ok(unless_interrupted(summary.interrupted, ExitCode::SUCCESS));
    };
    let opts = collect_options(
        &batch_id,
        out,
        args.identity.clone(),
        std::time::Duration::from_secs(600),
        &args.results,
    );
    let c = crate::modes::collect::collect(opts, shutdown)
        .await
        .with_context(|| format!("collecting batch {batch_id} failed"))?;
    // Standard output is the batch id alone: the collect report goes to standard error.
    if json {
        outln!("{}", serde_json::to_string(&c)?);
    } else {
        eprint!("{}", c.render());
    }
    Ok(success_if(c.complete))
}

async fn collect_command(
    args: CollectArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<ExitCode> {
    let stopped = shutdown.clone();
    let mut opts = collect_options(
        &args.batch_id,
        args.out.clone(),
        args.identity.clone(),
        args.idle_timeout,
        &args.results,
    );
    if args.batch_id.starts_with(crate::modes::rotate::ID_PREFIX) {
        for_rotation(&mut opts).await?;
    }
    let summary = crate::modes::collect::collect(opts, shutdown)
        .await
        .with_context(|| format!("keyfleet collect {} failed", args.batch_id))?;
    print_summary(&summary, args.results.report.json)?;
    // 0 when every result read was written (the batch may still be incomplete: run collect
    // again); 1 when results were left on the queue because their keys could not be written.
    let code = success_if(summary.kept == 0);
    Ok(unless_interrupted(stopped.is_cancelled(), code))
}

/// `collect` of a rotation's successors (`rotate --submit` without `--wait`): their manifest
/// lines name the pair each replaces; they go into the folder the rotation records, where
/// `rotate --submit --wait` and `retire` look for them; the collect ends once every successor
/// is answered there; and the identity is kept, for successors a rerun may publish again.
async fn for_rotation(opts: &mut CollectOptions) -> anyhow::Result<()> {
    use crate::registry::Registry;
    let e = &opts.endpoints;
    let registry = redis_registry(&e.redis_url, &e.prefix, e.redis_replicas).await?;
    let Some(rotation) = registry.rotation(&opts.batch_id).await? else {
        anyhow::bail!(
            "no rotation {} in Redis (prefix {:?}): `keyfleet rotate --submit` records one",
            opts.batch_id,
            e.prefix
        );
    };
    let here = std::fs::canonicalize(&opts.out).unwrap_or_else(|_| opts.out.clone());
    if let Some(recorded) = &rotation.out {
        if Path::new(recorded) != here {
            return Err(BadSetting(format!(
                "rotation {} collects into {recorded}: collect it with --out {recorded}",
                rotation.id
            ))
            .into());
        }
    }
    let written = crate::sink::folder::read_written(&opts.out).unwrap_or_default();
    let all = 0..rotation.members.len();
    opts.until =
        Some(crate::modes::rotate::fleet::awaited(&registry, &rotation, all, &written).await?);
    opts.keep_identity = true;
    opts.annotate = Some(crate::modes::rotate::annotator(rotation));
    Ok(())
}

fn collect_options(
    batch_id: &str,
    out: std::path::PathBuf,
    identity: Option<std::path::PathBuf>,
    idle_timeout: std::time::Duration,
    results: &ResultsArgs,
) -> CollectOptions {
    CollectOptions {
        batch_id: batch_id.to_owned(),
        out,
        identity,
        keep_identity: results.keep_identity,
        endpoints: results.server.endpoints(),
        idle_timeout,
        progress: results.report.progress,
        until: None,
        annotate: None,
    }
}

fn print_summary(s: &CollectSummary, json: bool) -> anyhow::Result<()> {
    if json {
        outln!("{}", serde_json::to_string(s)?);
    } else {
        out!("{}", s.render());
    }
    Ok(())
}

async fn status_command(file: &FileConfig, args: StatusArgs) -> anyhow::Result<ExitCode> {
    if args.batch_id.starts_with(crate::modes::rotate::ID_PREFIX) {
        use crate::modes::rotate::{self, RotateError};
        // The state file when it holds the rotation (`rotate`), otherwise the fleet's Redis
        // (`rotate --submit`).
        let state = state_path(&args.state, file);
        let embedded = match state.exists() {
            true => match rotate::status(&open_registry(&state)?, &args.batch_id).await {
                Err(RotateError::NoSuchRotation(_)) => None,
                other => Some(other?),
            },
            false => None,
        };
        let s = match embedded {
            Some(s) => s,
            None => {
                let e = args.server.endpoints();
                let registry = redis_registry(&e.redis_url, &e.prefix, e.redis_replicas).await?;
                rotate::status(&registry, &args.batch_id)
                    .await
                    .with_context(|| format!("not in the state file {} either", state.display()))?
            }
        };
        if args.json {
            outln!("{}", serde_json::to_string(&s)?);
        } else {
            out!("{}", s.render());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let ServerArgs {
        redis_url,
        prefix,
        connect_timeout,
        ..
    } = &args.server;
    let store = BatchStatusStore::connect(redis_url, prefix, *connect_timeout).await?;
    let Some(s) = store.status(&args.batch_id).await? else {
        anyhow::bail!(
            "no batch {} in Redis (never submitted, or expired)",
            args.batch_id
        );
    };
    if args.json {
        outln!("{}", serde_json::to_string(&s)?);
    } else {
        out!("{}", crate::modes::status::render(&s));
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve_command(
    file: &FileConfig,
    args: ServeArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<ExitCode> {
    let credentials = crate::credentials::Credentials::load(&args.credentials)
        .map_err(|e| BadSetting::from(&e))?;
    let resolved = resolve(
        &making_keys(&args.registry.state, args.quota, &args.key, &args.cpu),
        file,
    );
    let store = match &args.registry.redis_url {
        Some(url) => crate::modes::serve::Store::Redis {
            url: url.clone(),
            prefix: args.registry.prefix.clone(),
            connect_timeout: args.connect_timeout,
            replicas: args.registry.replicas.redis_replicas,
        },
        None => crate::modes::serve::Store::Embedded(resolved.state.clone()),
    };
    tracing::info!(
        aliyun_keys = credentials.count(crate::dialect::Provider::Aliyun),
        ucloud_keys = credentials.count(crate::dialect::Provider::Ucloud),
        "credentials loaded"
    );
    let upstream_settings = args.upstream.resolve(file);
    let upstream = if upstream_settings.is_remote() {
        Configured::build(&upstream_settings, args.upstream_limit.rate_limit())
            .map_err(|e| BadSetting::from(&e))?
    } else {
        Configured::local()
    };
    let opts = crate::modes::serve::ServeOptions {
        listen: args.listen,
        credentials,
        store,
        settings: resolved.settings,
        threads: resolved.threads,
        key_bits: resolved.key_bits,
        reservoir: args.reservoir,
        throttle_rps: args.throttle_rps,
        fault_rate: args.fault_rate,
        drain: args.drain_timeout,
        upstream,
    };
    let limits = crate::modes::serve::Limits {
        header_read_timeout: args.header_read_timeout,
        idle_timeout: args.keep_alive_timeout,
        max_connections: args
            .max_connections
            .map_or_else(crate::modes::serve::conn::default_max_connections, |n| {
                n as usize
            }),
    };
    crate::modes::serve::serve_limited(opts, limits, shutdown.clone(), |addr| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on http://{addr}");
        let _ = out.flush();
    })
    .await
    .context("keyfleet serve failed")?;
    // The server ends on its own only when it failed.
    Ok(success_if(shutdown.is_cancelled()))
}

async fn describe_command<R: Registry>(
    registry: &R,
    args: DescribeArgs,
) -> anyhow::Result<ExitCode> {
    let records = registry.describe(&args.selection.filter()).await?;
    if args.json {
        for r in &records {
            outln!("{}", serde_json::to_string(r)?);
        }
    } else {
        out!("{}", crate::modes::describe::table(&records));
        eprintln!("{} key pair(s)", records.len());
    }
    Ok(ExitCode::SUCCESS)
}

async fn delete_command<R: Registry>(
    registry: &R,
    args: DeleteArgs,
    cloud: Option<&crate::upstream::http::HttpUpstream>,
) -> anyhow::Result<ExitCode> {
    let scope = args.scope.scope();
    let mut missing = 0;
    for name in &args.names {
        match crate::modes::delete::delete(registry, cloud, &scope, name).await? {
            Deleted::Here => outln!("deleted {name}"),
            Deleted::AlsoInCloud => outln!("deleted {name} (and in the cloud)"),
            Deleted::NotFound => {
                outln!("not found {name}");
                missing += 1;
            }
        }
    }
    Ok(success_if(missing == 0))
}

async fn reconcile_command<R: Registry>(
    registry: &R,
    args: ReconcileArgs,
    cloud: &crate::upstream::http::HttpUpstream,
) -> anyhow::Result<ExitCode> {
    let drift = crate::modes::reconcile::reconcile(registry, cloud, &args.scope.scope()).await?;
    if args.json {
        outln!("{}", serde_json::to_string(&drift)?);
    } else {
        out!("{}", drift.render());
    }
    Ok(success_if(drift.agree()))
}

async fn bench_command(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if args.scalar {
        crate::prime::lanes::force(crate::prime::lanes::Simd::Scalar);
    }
    let spec = crate::modes::bench::KeySpec {
        engine: args.cpu.engine,
        bits: args.key.key_bits.unwrap_or_default(),
        threads: args.cpu.threads.unwrap_or(0),
    };
    let (json, text) = if args.submit {
        let report = crate::modes::bench::publish::bench_submit(
            &args.server.endpoints(),
            args.keys,
            args.rounds.unwrap_or(3),
            args.publish.confirm_window.max(1),
            args.publish.jobs_per_message,
        )
        .await
        .context("benchmark failed")?;
        (
            serde_json::to_string(&report)?,
            crate::modes::bench::publish::render(&report),
        )
    } else if args.serve {
        let report = crate::modes::bench::serve::bench_serve(
            spec,
            args.keys,
            args.concurrency,
            args.rounds.unwrap_or(3),
        )
        .await
        .context("benchmark failed")?;
        (
            serde_json::to_string(&report)?,
            crate::modes::bench::serve::render(&report),
        )
    } else {
        let several = args.pipeline || args.compare;
        let plan = crate::modes::bench::Plan {
            keys: args.keys,
            rounds: args.rounds.unwrap_or(if several { 3 } else { 1 }),
            compare: args.compare,
            pipeline: args.pipeline,
            pooled: args.pooled,
            keep_output: args.keep_output,
        };
        let report = crate::modes::bench::bench(spec, plan)
            .await
            .context("benchmark failed")?;
        (
            serde_json::to_string(&report)?,
            crate::modes::bench::render(&report),
        )
    };
    if args.json {
        outln!("{json}");
    } else {
        out!("{text}");
    }
    Ok(ExitCode::SUCCESS)
}

/// What the command line of a command that makes keys (`run`, `rotate`, `serve`) overrides.
fn making_keys(
    state: &StateArgs,
    quota: Option<u64>,
    key: &KeyBitsArgs,
    cpu: &EngineArgs,
) -> Overrides {
    Overrides {
        state: state.state.clone(),
        quota,
        key_bits: key.key_bits,
        threads: cpu.threads,
        engine: cpu.engine,
    }
}

/// The state file `describe` and `delete` read, resolved like `run`'s.
fn state_path(state: &StateArgs, file: &FileConfig) -> std::path::PathBuf {
    let cli = Overrides {
        state: state.state.clone(),
        ..Overrides::default()
    };
    resolve(&cli, file).state
}

fn open_registry(state: &Path) -> anyhow::Result<EmbeddedRegistry> {
    if !state.exists() {
        anyhow::bail!(
            "no state file at {} (nothing has been created yet; pass --state or KEYFLEET_STATE)",
            state.display()
        );
    }
    Ok(EmbeddedRegistry::open(state)?)
}

async fn redis_registry(url: &str, prefix: &str, replicas: u32) -> anyhow::Result<RedisRegistry> {
    let timeout = std::time::Duration::from_secs(10);
    let registry = RedisRegistry::connect(url, prefix, timeout)
        .await?
        .with_replicas(replicas);
    registry
        .check_replicas(timeout)
        .await
        .map_err(|e| BadSetting::from(&e))?;
    Ok(registry)
}
