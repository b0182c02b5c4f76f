//! The `keyfleet` command: turns parsed flags and the config file into calls of the library.
//! `main.rs` only parses, sets up logging and the shutdown signal, and calls [`execute`].

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use sha2::Digest;
use tokio_util::sync::CancellationToken;

use crate::batch::RowDefaults;
use crate::config::{Cli, Command, DeleteArgs, DescribeArgs, FileConfig, RunArgs};
use crate::dialect::Scope;
use crate::registry::embedded::EmbeddedRegistry;
use crate::registry::{Filter, Registry};
use crate::run::{run, RunOptions, Summary};

/// Exit codes: 0 done, 1 the run itself failed, 2 bad flags/config (clap uses 2 too),
/// 130 interrupted.
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_CONFIG: u8 = 2;
pub const EXIT_INTERRUPTED: u8 = 130;

/// Runs one `keyfleet` command. Errors carry context for the user; the caller prints them.
pub async fn execute(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let (file, _path) = match FileConfig::load(cli.global.config.as_deref()) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("keyfleet: {e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    match cli.command {
        Command::Run(args) => run_command(&cli.global, &file, args, shutdown).await,
        Command::Describe(args) => describe(&file.state_path(&cli.global), args).await,
        Command::Delete(args) => delete(&file.state_path(&cli.global), args).await,
        Command::Bench(args) => {
            let report = crate::bench::bench(
                args.engine,
                args.bits,
                args.threads,
                args.keys,
                args.compare,
                args.pipeline,
                if args.pipeline { 3 } else { 1 },
            )
            .await
            .context("benchmark failed")?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", crate::bench::render(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A stable batch id for a file: the same path gives the same job ids on a re-run.
fn batch_id_for(path: &Path) -> String {
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let digest = sha2::Sha256::digest(abs.to_string_lossy().as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("run-{hex}")
}

async fn run_command(
    global: &crate::config::GlobalArgs,
    file: &FileConfig,
    args: RunArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<ExitCode> {
    let opts = RunOptions {
        defaults: RowDefaults {
            batch_id: args
                .batch_id
                .clone()
                .unwrap_or_else(|| batch_id_for(&args.file)),
            provider: args.provider,
            owner: args.owner.clone(),
            key_bits: file.key_bits(args.key_bits),
        },
        input: args.file.clone(),
        format: args.format,
        out: args.out.clone(),
        state: file.state_path(global),
        threads: args.threads.or(file.threads).unwrap_or(0),
        settings: file.settings(global, args.engine),
        progress: args.progress,
    };
    let summary = run(opts, shutdown)
        .await
        .with_context(|| format!("keyfleet run {} failed", args.file.display()))?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", render_summary(&summary));
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
    for (code, n) in &s.tally.failed_by_code {
        out.push_str(&format!("  failed {code}: {n}\n"));
    }
    out.push_str(&format!("manifest: {}\n", s.manifest.display()));
    if s.interrupted {
        out.push_str("interrupted: rows after the last one in the manifest were not processed\n");
    }
    out
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

async fn describe(state: &Path, args: DescribeArgs) -> anyhow::Result<ExitCode> {
    let registry = open_registry(state)?;
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
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        println!(
            "{:<8} {:<12} {:<16} {:<32} {:<20} {:<48} TAGS / RESOURCE GROUP",
            "PROVIDER", "OWNER", "REGION", "NAME", "CREATED", "FINGERPRINT"
        );
        for r in &records {
            let tags: Vec<String> = r
                .tags
                .iter()
                .map(|t| format!("{}={}", t.key, t.value))
                .collect();
            println!(
                "{:<8} {:<12} {:<16} {:<32} {:<20} {:<48} {}{}",
                r.scope.provider.as_str(),
                r.scope.owner,
                r.scope.region,
                r.name,
                crate::job::rfc3339(r.created_at),
                r.key_pair_fingerprint,
                tags.join(","),
                r.resource_group_id
                    .as_deref()
                    .map(|g| format!(" rg={g}"))
                    .unwrap_or_default()
            );
        }
        eprintln!("{} key pair(s)", records.len());
    }
    Ok(ExitCode::SUCCESS)
}

async fn delete(state: &Path, args: DeleteArgs) -> anyhow::Result<ExitCode> {
    let registry = Arc::new(open_registry(state)?);
    let scope = Scope {
        provider: args.provider,
        owner: args.owner,
        region: args.region,
    };
    let mut missing = 0;
    for name in &args.names {
        if registry.delete(&scope, name).await? {
            println!("deleted {name}");
        } else {
            println!("not found {name}");
            missing += 1;
        }
    }
    Ok(if missing == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}
