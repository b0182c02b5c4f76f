//! The `keyfleet` command: turns parsed flags and the config file into calls of the library.
//! `main.rs` only parses, sets up logging and the shutdown signal, and calls [`execute`].

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use sha2::Digest;
use tokio_util::sync::CancellationToken;

use crate::cli::config::{
    Cli, Command, DeleteArgs, DescribeArgs, RunArgs, ServeArgs, ServerArgs, StateArgs, StatusArgs,
    SubmitArgs,
};
use crate::cli::resolve::{resolve, FileConfig, Overrides};
use crate::job::batch::RowDefaults;
use crate::modes::collect::{CollectOptions, CollectSummary};
use crate::modes::run::{run, RunOptions, Summary};
use crate::modes::submit::{KeysTo, SubmitOptions};
use crate::registry::batch_status::BatchStatusStore;
use crate::registry::embedded::EmbeddedRegistry;
use crate::registry::redis::RedisRegistry;
use crate::registry::{Filter, Registry};
use crate::sink::transit;

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

/// Whether `e` is a write to a closed pipe: the reader has all it wanted (`| head`), so the
/// command ends quietly, with success, as `ripgrep` does.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Runs `$command(&registry, args)` on the registry `args.registry` names: Redis with
/// `--redis-url`, otherwise the embedded state file.
macro_rules! on_registry {
    ($command:ident, $args:expr, $file:expr $(, $extra:expr)*) => {{
        let args = $args;
        match args.registry.redis_url.clone() {
            Some(url) => {
                let registry = redis_registry(&url, &args.registry.prefix).await?;
                $command(&registry, args $(, $extra)*).await
            }
            None => {
                let state = state_path(&args.registry.state, $file);
                $command(&open_registry(&state)?, args $(, $extra)*).await
            }
        }
    }};
}

/// Runs one `keyfleet` command. Errors carry context for the user; the caller prints them.
pub async fn execute(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let (file, _path) = match FileConfig::load(cli.global.config.as_deref()) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("keyfleet: {}", crate::sink::error_chain(&e));
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    match cli.command {
        Command::Run(args) => run_command(&file, args, shutdown).await,
        Command::Describe(args) => on_registry!(describe, args, &file),
        Command::Delete(args) => {
            let upstream = args.upstream.resolve(&file);
            on_registry!(delete, args, &file, &upstream)
        }
        Command::Submit(args) => submit_command(&file, args, shutdown).await,
        Command::Collect(args) => {
            let json = args.json;
            let stopped = shutdown.clone();
            let summary = crate::modes::collect::collect(
                collect_options(
                    &args.batch_id,
                    args.out.clone(),
                    args.identity.clone(),
                    args.keep_identity,
                    args.idle_timeout,
                    &args.server,
                    args.progress,
                ),
                shutdown,
            )
            .await
            .with_context(|| format!("keyfleet collect {} failed", args.batch_id))?;
            print_collect(&summary, json, false)?;
            Ok(if stopped.is_cancelled() {
                ExitCode::from(EXIT_INTERRUPTED)
            } else {
                collect_exit(&summary)
            })
        }
        Command::Status(args) => status_command(args).await,
        Command::Serve(args) => serve_command(&file, args, shutdown).await,
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
        Command::Reconcile(args) => {
            let upstream = args.upstream.resolve(&file);
            on_registry!(reconcile, args, &file, &upstream)
        }
        Command::Bench(args) => {
            if args.scalar {
                crate::prime::lanes::force(crate::prime::lanes::Simd::Scalar);
            }
            if args.serve {
                let report = crate::modes::bench::serve::bench_serve(
                    args.cpu.engine,
                    args.bits,
                    args.cpu.threads.unwrap_or(0),
                    args.keys,
                    args.concurrency,
                    args.rounds.unwrap_or(3),
                )
                .await
                .context("benchmark failed")?;
                if args.json {
                    outln!("{}", serde_json::to_string(&report)?);
                } else {
                    out!("{}", crate::modes::bench::serve::render(&report));
                }
                return Ok(ExitCode::SUCCESS);
            }
            let several = args.pipeline || args.compare;
            let report = crate::modes::bench::bench(
                args.cpu.engine,
                args.bits,
                args.cpu.threads.unwrap_or(0),
                args.keys,
                args.compare,
                args.pipeline,
                args.rounds.unwrap_or(if several { 3 } else { 1 }),
            )
            .await
            .context("benchmark failed")?;
            if args.json {
                outln!("{}", serde_json::to_string(&report)?);
            } else {
                out!("{}", crate::modes::bench::render(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn serve_command(
    file: &FileConfig,
    args: ServeArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<ExitCode> {
    let credentials = match crate::credentials::Credentials::load(&args.credentials) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keyfleet serve: {}", crate::sink::error_chain(&e));
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let resolved = resolve(
        &Overrides {
            state: args.registry.state.state.clone(),
            quota: args.quota,
            key_bits: args.key_bits,
            threads: args.cpu.threads,
            engine: args.cpu.engine,
        },
        file,
    );
    let store = match &args.registry.redis_url {
        Some(url) => crate::modes::serve::Store::Redis {
            url: url.clone(),
            prefix: args.registry.prefix.clone(),
            connect_timeout: args.connect_timeout,
        },
        None => crate::modes::serve::Store::Embedded(resolved.state.clone()),
    };
    tracing::info!(
        aliyun_keys = credentials.count(crate::dialect::Provider::Aliyun),
        ucloud_keys = credentials.count(crate::dialect::Provider::Ucloud),
        "credentials loaded"
    );
    let upstream_settings = args.upstream.resolve(file);
    let upstream = if !upstream_settings.is_remote() {
        crate::upstream::Configured::local()
    } else {
        let limit = args.upstream_limit.rate_limit();
        match crate::upstream::Configured::build(&upstream_settings, limit) {
            Ok(u) => u,
            Err(e) => {
                eprintln!("keyfleet serve: {}", crate::sink::error_chain(&e));
                return Ok(ExitCode::from(EXIT_CONFIG));
            }
        }
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
    Ok(if shutdown.is_cancelled() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}

/// A stable batch id for a file: the same path gives the same job ids on a re-run.
fn batch_id_for(path: &Path) -> String {
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let digest = sha2::Sha256::digest(abs.to_string_lossy().as_bytes());
    let hex = hex::encode(&digest[..8]);
    format!("run-{hex}")
}

async fn run_command(
    file: &FileConfig,
    args: RunArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<ExitCode> {
    let resolved = resolve(
        &Overrides {
            state: args.state.state.clone(),
            quota: args.quota,
            key_bits: args.key_bits,
            threads: args.cpu.threads,
            engine: args.cpu.engine,
        },
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
        progress: args.progress,
    };
    if let Some(addr) = args.metrics_addr.0 {
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
    let upstream_settings = args.upstream.resolve(file);
    let summary = if !upstream_settings.is_remote() {
        run(opts, shutdown).await
    } else {
        let limit = args.upstream_limit.rate_limit();
        let upstream = match crate::upstream::Configured::build(&upstream_settings, limit) {
            Ok(u) => u,
            Err(e) => {
                eprintln!("keyfleet: {}", crate::sink::error_chain(&e));
                return Ok(ExitCode::from(EXIT_CONFIG));
            }
        };
        let registry = EmbeddedRegistry::open(&opts.state)
            .with_context(|| format!("keyfleet run {} failed", args.file.display()))?;
        crate::modes::run::run_with(
            opts,
            std::sync::Arc::new(registry),
            std::sync::Arc::new(upstream),
            shutdown,
        )
        .await
    }
    .with_context(|| format!("keyfleet run {} failed", args.file.display()))?;
    if args.json {
        outln!("{}", serde_json::to_string(&summary)?);
    } else {
        out!("{}", render_summary(&summary));
    }
    Ok(if summary.interrupted {
        ExitCode::from(EXIT_INTERRUPTED)
    } else {
        ExitCode::SUCCESS
    })
}

pub fn render_summary(s: &Summary) -> String {
    let mut out = format!(
        "{} rows: {} created, {} failed in {:.1} s ({:.1} keys/s on {} threads)\n",
        s.tally.rows, s.tally.created, s.tally.failed, s.seconds, s.keys_per_second, s.threads
    );
    if s.tally.delivered_earlier > 0 {
        out.push_str(&format!(
            "  delivered by an earlier run of this batch (listed again): {}\n",
            s.tally.delivered_earlier
        ));
    }
    for (code, n) in &s.tally.failed_by_code {
        out.push_str(&format!("  failed {code}: {n}\n"));
    }
    out.push_str(&format!("manifest: {}\n", s.manifest.display()));
    if s.interrupted {
        out.push_str("interrupted: rows after the last one in the manifest were not processed\n");
    }
    out
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

async fn redis_registry(url: &str, prefix: &str) -> anyhow::Result<RedisRegistry> {
    Ok(RedisRegistry::connect(url, prefix, std::time::Duration::from_secs(10)).await?)
}

#[allow(clippy::too_many_arguments)]
fn collect_options(
    batch_id: &str,
    out: std::path::PathBuf,
    identity: Option<std::path::PathBuf>,
    keep_identity: bool,
    idle_timeout: std::time::Duration,
    server: &ServerArgs,
    progress: crate::telemetry::progress::ProgressMode,
) -> CollectOptions {
    CollectOptions {
        batch_id: batch_id.to_owned(),
        out,
        identity,
        keep_identity,
        endpoints: server.endpoints(),
        idle_timeout,
        progress,
    }
}

/// 0 when every result read was written (the batch may still be incomplete: run collect
/// again); 1 when results were left on the queue because their keys could not be written.
fn collect_exit(s: &CollectSummary) -> ExitCode {
    if s.kept > 0 {
        ExitCode::from(EXIT_FAILED)
    } else {
        ExitCode::SUCCESS
    }
}

/// `collect`'s report: on standard output, or on standard error for `submit --wait`, whose
/// standard output is the batch id alone.
fn print_collect(s: &CollectSummary, json: bool, to_stderr: bool) -> anyhow::Result<()> {
    if json {
        outln!("{}", serde_json::to_string(s)?);
        return Ok(());
    }
    let mut text = format!(
        "batch {}: collected {} results this run ({} created, {} failed), {} duplicates skipped\n",
        s.batch_id, s.tally.rows, s.tally.created, s.tally.failed, s.duplicates
    );
    for (code, n) in &s.tally.failed_by_code {
        text.push_str(&format!("  failed {code}: {n}\n"));
    }
    if s.rejected > 0 {
        text.push_str(&format!(
            "  rejected (not the registered key; kept in rejected.jsonl): {}\n",
            s.rejected
        ));
    }
    if s.kept > 0 {
        text.push_str(&format!(
            "  left on the queue (their keys did not decrypt with {}): {}\n",
            s.identity
                .as_deref()
                .map_or("no identity".into(), |p| p.display().to_string()),
            s.kept
        ));
    }
    text.push_str(&match s.total {
        Some(t) if s.complete => format!(
            "complete: {}/{t} results in {}\n",
            s.collected,
            s.manifest.display()
        ),
        Some(t) => format!(
            "incomplete: {}/{t} results so far in {} (run collect again to continue)\n",
            s.collected,
            s.manifest.display()
        ),
        None => format!(
            "{} results so far in {} (total not known yet)\n",
            s.collected,
            s.manifest.display()
        ),
    });
    match (&s.identity_removed, &s.identity) {
        (Some(p), _) => text.push_str(&format!(
            "identity {} removed: every key of the batch is written (--keep-identity keeps it)\n",
            p.display()
        )),
        (None, Some(p)) if !s.complete => text.push_str(&format!(
            "identity: {} (keep it until the batch is collected)\n",
            p.display()
        )),
        _ => {}
    }
    if to_stderr {
        eprint!("{text}");
    } else {
        out!("{text}");
    }
    Ok(())
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
            key_bits: args.key_bits,
            ..Overrides::default()
        },
        file,
    );
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
        endpoints: args.server.endpoints(),
        progress: args.progress,
        confirm_window: args.confirm_window.max(1),
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
    if args.json && !args.wait {
        outln!("{}", serde_json::to_string(&summary)?);
    } else if !args.json {
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
    if summary.interrupted {
        return Ok(ExitCode::from(EXIT_INTERRUPTED));
    }
    if let (true, Some(out)) = (args.wait, args.out.clone()) {
        let c = crate::modes::collect::collect(
            collect_options(
                &batch_id,
                out,
                args.identity.clone(),
                args.keep_identity,
                std::time::Duration::from_secs(600),
                &args.server,
                args.progress,
            ),
            shutdown,
        )
        .await
        .with_context(|| format!("collecting batch {batch_id} failed"))?;
        print_collect(&c, args.json, true)?;
        if !c.complete {
            return Ok(ExitCode::from(EXIT_FAILED));
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn status_command(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let store = BatchStatusStore::connect(
        &args.server.redis_url,
        &args.server.prefix,
        args.server.connect_timeout,
    )
    .await?;
    let Some(s) = store.status(&args.batch_id).await? else {
        eprintln!(
            "keyfleet: no batch {} in Redis (never submitted, or expired)",
            args.batch_id
        );
        return Ok(ExitCode::from(EXIT_FAILED));
    };
    if args.json {
        outln!("{}", serde_json::to_string(&s)?);
    } else {
        let total = s
            .total
            .map(|t| t.to_string())
            .unwrap_or_else(|| "? (still submitting)".into());
        let pending = s
            .pending()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "?".into());
        outln!(
            "batch {}: total {total}, created {}, failed {}, pending {pending}",
            s.batch_id,
            s.created,
            s.failed.values().sum::<u64>()
        );
        for (code, n) in &s.failed {
            outln!("  failed {code}: {n}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn describe<R: Registry>(registry: &R, args: DescribeArgs) -> anyhow::Result<ExitCode> {
    let filter = Filter {
        provider: args.provider,
        owner: args.owner,
        region: args.region,
        name: args.name,
        fingerprint: args.fingerprint,
    };
    let records = registry.describe(&filter).await?;
    if args.json {
        for r in &records {
            outln!("{}", serde_json::to_string(r)?);
        }
    } else {
        // Padded by display width, so Chinese names (two columns a character) line up.
        let row = |cells: [&str; 6], rest: String| {
            let widths: [usize; 6] = [8, 12, 16, 32, 20, 48];
            let mut line = String::new();
            for (cell, width) in cells.iter().zip(widths) {
                line.push_str(cell);
                let shown = unicode_width::UnicodeWidthStr::width(*cell);
                line.push_str(&" ".repeat(width.saturating_sub(shown) + 1));
            }
            line.push_str(&rest);
            line
        };
        outln!(
            "{}",
            row(
                [
                    "PROVIDER",
                    "OWNER",
                    "REGION",
                    "NAME",
                    "CREATED",
                    "FINGERPRINT"
                ],
                "TAGS / RESOURCE GROUP".into()
            )
        );
        for r in &records {
            let tags: Vec<String> = r
                .tags
                .iter()
                .map(|t| format!("{}={}", t.key, t.value))
                .collect();
            let rest = format!(
                "{}{}",
                tags.join(","),
                r.resource_group_id
                    .as_deref()
                    .map(|g| format!(" rg={g}"))
                    .unwrap_or_default()
            );
            let created = crate::time::rfc3339(r.created_at);
            outln!(
                "{}",
                row(
                    [
                        r.scope.provider.as_str(),
                        &r.scope.owner,
                        &r.scope.region,
                        &r.name,
                        &created,
                        &r.key_pair_fingerprint,
                    ],
                    rest
                )
            );
        }
        eprintln!("{} key pair(s)", records.len());
    }
    Ok(ExitCode::SUCCESS)
}

/// Drift between the registry and the cloud in one scope.
#[derive(Debug, Default, serde::Serialize)]
struct Drift {
    in_cloud_only: Vec<String>,
    in_keyfleet_only: Vec<String>,
    fingerprints_differ: Vec<String>,
    in_both: usize,
}

async fn reconcile<R: Registry>(
    registry: &R,
    args: crate::cli::config::ReconcileArgs,
    upstream: &crate::upstream::settings::Settings,
) -> anyhow::Result<ExitCode> {
    let cloud = match cloud(upstream) {
        Ok(Some(c)) => c,
        Ok(None) => {
            eprintln!("keyfleet reconcile: no cloud to compare with: give --upstream-endpoint PROVIDER=URL");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
        Err(e) => {
            eprintln!("keyfleet reconcile: {}", crate::sink::error_chain(&e));
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let scope = args.scope.scope();
    let filter = Filter {
        provider: Some(scope.provider),
        owner: Some(scope.owner.clone()),
        region: Some(scope.region.clone()),
        ..Filter::default()
    };
    let ours: std::collections::BTreeMap<String, String> = registry
        .describe(&filter)
        .await?
        .into_iter()
        .map(|r| (r.name, r.key_pair_fingerprint))
        .collect();
    let theirs: std::collections::BTreeMap<String, String> = cloud
        .list(&scope)
        .await
        .map_err(|e| anyhow::anyhow!("listing the cloud's key pairs: {e}"))?
        .into_iter()
        .map(|p| (p.name, p.fingerprint))
        .collect();
    let mut drift = Drift::default();
    for (name, fp) in &theirs {
        match ours.get(name) {
            None => drift.in_cloud_only.push(name.clone()),
            Some(mine) if mine != fp => drift.fingerprints_differ.push(name.clone()),
            Some(_) => drift.in_both += 1,
        }
    }
    drift.in_keyfleet_only = ours
        .keys()
        .filter(|n| !theirs.contains_key(*n))
        .cloned()
        .collect();
    let agree = drift.in_cloud_only.is_empty()
        && drift.in_keyfleet_only.is_empty()
        && drift.fingerprints_differ.is_empty();
    if args.json {
        outln!("{}", serde_json::to_string(&drift)?);
    } else {
        outln!("{} in both with the same key", drift.in_both);
        for (what, names) in [
            ("in the cloud only", &drift.in_cloud_only),
            ("in keyfleet only", &drift.in_keyfleet_only),
            ("different keys", &drift.fingerprints_differ),
        ] {
            outln!("{}: {}", what, names.len());
            for n in names {
                outln!("  {n}");
            }
        }
    }
    Ok(if agree {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}

/// The HTTP upstream of `--upstream-endpoint`, if one is configured.
fn cloud(
    settings: &crate::upstream::settings::Settings,
) -> Result<Option<crate::upstream::http::HttpUpstream>, crate::upstream::BuildError> {
    if !settings.is_remote() {
        return Ok(None);
    }
    match crate::upstream::Configured::build(settings, None)? {
        crate::upstream::Configured::Http(h) => Ok(Some(h)),
        crate::upstream::Configured::Local(_) => Ok(None),
    }
}

async fn delete<R: Registry>(
    registry: &R,
    args: DeleteArgs,
    upstream: &crate::upstream::settings::Settings,
) -> anyhow::Result<ExitCode> {
    let cloud = match cloud(upstream) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keyfleet delete: {}", crate::sink::error_chain(&e));
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let scope = args.scope.scope();
    let mut missing = 0;
    for name in &args.names {
        // The cloud first: a pair left in keyfleet can be deleted again; one left only in the
        // cloud would be drift nobody sees.
        let in_cloud = match &cloud {
            Some(c) => c
                .delete_pair(&scope, name)
                .await
                .map_err(|e| anyhow::anyhow!("deleting {name} in the cloud: {e}"))?,
            None => false,
        };
        if registry.delete(&scope, name).await? || in_cloud {
            outln!(
                "deleted {name}{}",
                if in_cloud { " (and in the cloud)" } else { "" }
            );
        } else {
            outln!("not found {name}");
            missing += 1;
        }
    }
    Ok(if missing == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}
