//! `keyfleet bench`: key-generation throughput on this machine — the engine alone, the `rsa`
//! crate's generator side by side, and the whole `run` pipeline against raw generation.
//! Numbers only; nothing here asserts timing. The report names the Miller-Rabin path (`simd`);
//! `KEYFLEET_SIMD=off` in the environment forces the scalar engine.

pub mod publish;
pub mod serve;

use std::io::Write;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::dialect::Provider;
use crate::job::batch::RowDefaults;
use crate::keys::keygen::{self, Engine, KeyBits};
use crate::modes::run::{run_locally, RunOptions};
use crate::reservoir::Reservoir;
use crate::settings::{KeyPairQuota, Settings};
use crate::telemetry::progress::ProgressMode;

/// What keys a benchmark makes, and on how many threads (0 = one per core).
#[derive(Clone, Copy, Debug)]
pub struct KeySpec {
    pub engine: Engine,
    pub bits: KeyBits,
    pub threads: usize,
}

/// What [`bench`] measures: `keys` keys per measurement, alternated for `rounds` rounds,
/// against OpenSSL and `rsa` (`compare`) and through `keyfleet run` (`pipeline`).
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub keys: usize,
    pub rounds: usize,
    pub compare: bool,
    pub pipeline: bool,
    /// With `pipeline`: also time `run` with every key made before the clock starts, so the
    /// plumbing alone is measured (keys/s and CPU per key).
    pub pooled: bool,
    /// With `pipeline`: leave the rounds' folders in place (see `measure_pipeline`).
    pub keep_output: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Measurement {
    pub engine: String,
    pub bits: usize,
    pub threads: usize,
    pub keys: usize,
    pub seconds: f64,
    pub keys_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub engine: Measurement,
    pub keys_per_second_per_thread: f64,
    /// The Miller-Rabin path of the fast engine: `"avx512ifma"` (8-lane IFMA Montgomery engine)
    /// or `"scalar"` (no IFMA on this CPU, `KEYFLEET_SIMD=off`, or another engine).
    pub simd: &'static str,
    /// `rsa`'s RsaPrivateKey::new measured in the same run (`--compare`).
    pub baseline: Option<Measurement>,
    pub ratio_to_baseline: Option<f64>,
    /// OpenSSL's RSA key generation in the same run (`--compare`, when available).
    pub openssl: Option<OpensslMeasurement>,
    /// This engine's keys/s over OpenSSL's (medians).
    pub ratio_to_openssl: Option<f64>,
    /// keys/s of `keyfleet run` on a generated batch (`--pipeline`).
    pub pipeline_keys_per_second: Option<f64>,
    /// The pipeline's median keys/s over raw generation's median.
    pub pipeline_ratio_to_raw: Option<f64>,
    /// Each round's pipeline keys/s over the same round's raw generation, in round order. A
    /// round takes its two back to back, while raw generation alone drifted from 33.5 to 45.8
    /// keys/s between runs on a shared machine (docs/benchmarks.md, 2026-12-07).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pipeline_round_ratios: Vec<f64>,
    /// CPU time of this process (every thread) per key while `run` ran (`--pipeline`).
    pub pipeline_cpu_ms_per_key: Option<f64>,
    /// keys/s of `keyfleet run` with every key taken from memory (`--pooled`): the plumbing
    /// alone — reading, registry, key files, manifest.
    pub pooled_keys_per_second: Option<f64>,
    /// Each round's pooled keys/s, in round order (their median is the figure above).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pooled_rounds_keys_per_second: Vec<f64>,
    /// CPU time of this process per key in the pooled run: what the plumbing costs.
    pub pooled_cpu_ms_per_key: Option<f64>,
    /// With `--keep-output`: where the rounds' folders were left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_kept: Option<std::path::PathBuf>,
}

/// One timed `keyfleet run`.
#[derive(Clone, Copy, Debug)]
pub struct PipelineMeasurement {
    pub keys_per_second: f64,
    pub cpu_ms_per_key: f64,
}

/// OpenSSL's key generation, timed inside Python `cryptography` (one interpreter per thread,
/// each generating its share of the keys in a loop; interpreter start-up is outside the clock).
#[derive(Clone, Debug, serde::Serialize)]
pub struct OpensslMeasurement {
    /// `OpenSSL x.y.z …` as the library reports itself.
    pub version: String,
    pub keys_per_second: f64,
}

const OPENSSL_PROBE: &str = r#"
import sys, time
from cryptography.hazmat.backends.openssl import backend
from cryptography.hazmat.primitives.asymmetric import rsa
bits, n = int(sys.argv[1]), int(sys.argv[2])
rsa.generate_private_key(public_exponent=65537, key_size=bits)
t = time.perf_counter()
for _ in range(n):
    rsa.generate_private_key(public_exponent=65537, key_size=bits)
print(time.perf_counter() - t, backend.openssl_version_text())
"#;

/// keys/s of OpenSSL on `threads` processes generating `keys` keys in all; `None` when python3
/// with `cryptography` is not installed.
fn measure_openssl(bits: KeyBits, threads: usize, keys: usize) -> Option<OpensslMeasurement> {
    let threads = threads.max(1);
    let per = keys.div_ceil(threads).max(1);
    let children: Vec<_> = (0..threads)
        .map(|_| {
            std::process::Command::new("python3")
                .args([
                    "-c",
                    OPENSSL_PROBE,
                    &bits.bits().to_string(),
                    &per.to_string(),
                ])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
        })
        .collect::<Result<_, _>>()
        .ok()?;
    let mut slowest = 0f64;
    let mut version = String::new();
    for child in children {
        let out = child.wait_with_output().ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        let (secs, v) = text.trim().split_once(' ')?;
        slowest = slowest.max(secs.parse().ok()?);
        version = v.to_owned();
    }
    Some(OpensslMeasurement {
        version,
        keys_per_second: (per * threads) as f64 / slowest.max(1e-9),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("--keys must be at least 1")]
    NoKeys,
    #[error("thread pool: {0}")]
    Pool(String),
    #[error("key generation failed")]
    Keygen(#[from] keygen::KeygenError),
    #[error("pipeline run failed")]
    Run(#[from] crate::modes::run::RunError),
    #[error("temporary files")]
    Io(#[from] std::io::Error),
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[idx].as_secs_f64() * 1e3
}

/// Generates `keys` keys on `threads` rayon threads (0 = per core); per-key times and the wall
/// time of the whole set.
pub fn measure(
    engine: Engine,
    bits: KeyBits,
    threads: usize,
    keys: usize,
) -> Result<Measurement, BenchError> {
    use rayon::prelude::*;
    if keys == 0 {
        return Err(BenchError::NoKeys);
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        // Named, so a profile of `bench` tells raw generation from the runtime that started it.
        .thread_name(|i| format!("keyfleet-raw-{i}"))
        .build()
        .map_err(|e| BenchError::Pool(e.to_string()))?;
    let started = Instant::now();
    let mut times: Vec<Duration> = pool.install(|| {
        (0..keys)
            .into_par_iter()
            .map(|_| {
                let t = Instant::now();
                keygen::generate_private(bits, engine).map(|_| t.elapsed())
            })
            .collect::<Result<Vec<_>, _>>()
    })?;
    let seconds = started.elapsed().as_secs_f64();
    times.sort();
    Ok(Measurement {
        engine: engine.to_string(),
        bits: bits.bits(),
        threads: pool.current_num_threads(),
        keys,
        seconds,
        keys_per_second: keys as f64 / seconds,
        p50_ms: percentile(&times, 0.50),
        p99_ms: percentile(&times, 0.99),
    })
}

/// Runs `keyfleet run` on a generated batch of `keys` Alibaba rows in a new folder in
/// `scratch` and returns its keys/s and this process's CPU time per key. `pooled`: every key
/// is made first, into a reservoir that then stops refilling, so the clock sees the plumbing
/// alone.
///
/// The folder is left for the caller to remove after the last round: on ext4 without a
/// journal, files created within 60 s (up to 5 minutes) of many others being deleted cost
/// several times the CPU (the inode allocator passes over each recently deleted inode), so
/// one round's cleanup would be paid by the next round.
pub async fn measure_pipeline(
    spec: KeySpec,
    keys: usize,
    pooled: bool,
    scratch: &std::path::Path,
) -> Result<PipelineMeasurement, BenchError> {
    let dir = tempfile::tempdir_in(scratch)?.keep();
    let input = write_rows(&dir, keys)?;
    let reservoir = if pooled {
        let cpu = crate::keys::cpu::CpuPool::new(spec.threads)
            .map_err(|e| BenchError::Pool(e.to_string()))?;
        let r = Reservoir::new(cpu, spec.engine, keys, &[spec.bits]);
        while r.len(spec.bits) < keys {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        r.freeze();
        Some(r)
    } else {
        None
    };
    let opts = RunOptions {
        input,
        format: None,
        out: dir.join("out"),
        state: dir.join("state.redb"),
        threads: spec.threads,
        defaults: RowDefaults {
            batch_id: "bench".into(),
            provider: Provider::Aliyun,
            owner: "bench".into(),
            key_bits: spec.bits,
        },
        settings: Settings {
            quota: KeyPairQuota {
                default: keys as u64,
                ..KeyPairQuota::default()
            },
            engine: spec.engine,
            ..Settings::default()
        },
        progress: ProgressMode::Off,
        reservoir,
    };
    let cpu_before = process_cpu_seconds();
    let summary = run_locally(opts, CancellationToken::new()).await?;
    let cpu = process_cpu_seconds() - cpu_before;
    Ok(PipelineMeasurement {
        keys_per_second: summary.keys_per_second,
        cpu_ms_per_key: cpu * 1000.0 / keys as f64,
    })
}

/// A batch file of `rows` rows in `dir` (one region, unique names), for the benchmarks that
/// time a pipeline on it.
fn write_rows(dir: &std::path::Path, rows: usize) -> std::io::Result<std::path::PathBuf> {
    let input = dir.join("bench.csv");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&input)?);
    writeln!(f, "RegionId,KeyPairName")?;
    for i in 0..rows {
        writeln!(f, "cn-hangzhou,bench-{i:07}")?;
    }
    f.flush()?;
    Ok(input)
}

/// User + system CPU time of this process so far, every thread included, to the nanosecond
/// (`CLOCK_PROCESS_CPUTIME_ID`; `/proc/self/stat` counts in 10 ms ticks).
fn process_cpu_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// `0` means one per core, as for the key-generation pool.
fn threads_of(threads: usize) -> usize {
    match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The whole `bench` subcommand. With `--pipeline`, raw generation and the pipeline alternate
/// for `rounds` rounds and the medians are compared, so machine noise hits both alike.
pub async fn bench(spec: KeySpec, plan: Plan) -> Result<Report, BenchError> {
    let (engine, bits, threads) = (spec.engine, spec.bits, spec.threads);
    let Plan {
        keys,
        rounds,
        compare,
        pipeline,
        pooled,
        keep_output,
    } = plan;
    let rounds = rounds.max(1);
    let mut raws = Vec::new();
    let mut pipes = Vec::new();
    let mut pools = Vec::new();
    let mut openssl = Vec::new();
    // Every round's folders, removed at the end (see `measure_pipeline`).
    let scratch = tempfile::tempdir()?;
    for _ in 0..rounds {
        if compare {
            let m = tokio::task::spawn_blocking(move || {
                measure_openssl(bits, threads_of(threads), keys)
            })
            .await
            .map_err(|e| BenchError::Pool(e.to_string()))?;
            openssl.extend(m);
        }
        let m = tokio::task::spawn_blocking(move || measure(engine, bits, threads, keys))
            .await
            .map_err(|e| BenchError::Pool(e.to_string()))??;
        raws.push(m);
        if pipeline {
            pipes.push(measure_pipeline(spec, keys, false, scratch.path()).await?);
        }
        if pipeline && pooled {
            pools.push(measure_pipeline(spec, keys, true, scratch.path()).await?);
        }
    }
    let raw_median = median(raws.iter().map(|m| m.keys_per_second).collect());
    let mut engine_m = raws
        .iter()
        .min_by(|a, b| {
            (a.keys_per_second - raw_median)
                .abs()
                .total_cmp(&(b.keys_per_second - raw_median).abs())
        })
        .cloned()
        .ok_or(BenchError::NoKeys)?;
    engine_m.keys_per_second = raw_median;
    let baseline = if compare {
        let b = tokio::task::spawn_blocking(move || measure(Engine::RsaCrate, bits, threads, keys))
            .await
            .map_err(|e| BenchError::Pool(e.to_string()))??;
        Some(b)
    } else {
        None
    };
    let medians = |v: &[PipelineMeasurement]| {
        (!v.is_empty()).then(|| {
            (
                median(v.iter().map(|m| m.keys_per_second).collect()),
                median(v.iter().map(|m| m.cpu_ms_per_key).collect()),
            )
        })
    };
    let (pipeline_kps, pipeline_cpu) = medians(&pipes).unzip();
    let (pooled_kps, pooled_cpu) = medians(&pools).unzip();
    let openssl = (!openssl.is_empty()).then(|| OpensslMeasurement {
        version: openssl[0].version.clone(),
        keys_per_second: median(openssl.iter().map(|m| m.keys_per_second).collect()),
    });
    let simd = match engine {
        Engine::Fast => crate::prime::lanes::active(),
        _ => crate::prime::lanes::Simd::Scalar,
    };
    Ok(Report {
        simd: simd.as_str(),
        keys_per_second_per_thread: engine_m.keys_per_second / engine_m.threads as f64,
        ratio_to_baseline: baseline
            .as_ref()
            .map(|b| engine_m.keys_per_second / b.keys_per_second),
        pipeline_ratio_to_raw: pipeline_kps.map(|p| p / engine_m.keys_per_second),
        pipeline_round_ratios: raws
            .iter()
            .zip(&pipes)
            .map(|(raw, pipe)| pipe.keys_per_second / raw.keys_per_second)
            .collect(),
        pooled_rounds_keys_per_second: pools.iter().map(|m| m.keys_per_second).collect(),
        ratio_to_openssl: openssl
            .as_ref()
            .map(|o| engine_m.keys_per_second / o.keys_per_second),
        openssl,
        pipeline_keys_per_second: pipeline_kps,
        pipeline_cpu_ms_per_key: pipeline_cpu,
        pooled_keys_per_second: pooled_kps,
        pooled_cpu_ms_per_key: pooled_cpu,
        output_kept: (pipeline && keep_output).then(|| scratch.keep()),
        baseline,
        engine: engine_m,
    })
}

/// `  (what: a, b, c)` for two rounds or more: the figures a median was taken of.
fn rounds_of(figures: &[f64], what: &str, show: impl Fn(f64) -> String) -> String {
    if figures.len() < 2 {
        return String::new();
    }
    let shown: Vec<String> = figures.iter().map(|&x| show(x)).collect();
    format!("  ({what}: {})", shown.join(", "))
}

/// Human-readable report.
pub fn render(r: &Report) -> String {
    let m = &r.engine;
    let mut s = format!(
        "engine {} (simd {})  RSA-{}  {} thread(s)  {} keys\n  {:.1} keys/s ({:.1} per thread)  p50 {:.1} ms  p99 {:.1} ms\n",
        m.engine, r.simd, m.bits, m.threads, m.keys, m.keys_per_second, r.keys_per_second_per_thread, m.p50_ms, m.p99_ms
    );
    if let (Some(b), Some(ratio)) = (&r.baseline, r.ratio_to_baseline) {
        s.push_str(&format!(
            "baseline {}: {:.1} keys/s  p50 {:.1} ms  → engine is {:.2}× the baseline\n",
            b.engine, b.keys_per_second, b.p50_ms, ratio
        ));
    }
    if let (Some(o), Some(ratio)) = (&r.openssl, r.ratio_to_openssl) {
        s.push_str(&format!(
            "OpenSSL ({}, via Python cryptography): {:.1} keys/s  → engine is {:.2}× OpenSSL\n",
            o.version, o.keys_per_second, ratio
        ));
    }
    if let (Some(p), Some(ratio)) = (r.pipeline_keys_per_second, r.pipeline_ratio_to_raw) {
        s.push_str(&format!(
            "keyfleet run pipeline: {p:.1} keys/s  → {:.1}% of raw generation{}{}\n",
            ratio * 100.0,
            rounds_of(
                &r.pipeline_round_ratios,
                "the rounds' own ratios",
                |x| format!("{:.1}%", x * 100.0)
            ),
            r.pipeline_cpu_ms_per_key
                .map(|c| format!("  ({c:.2} ms CPU a key)"))
                .unwrap_or_default()
        ));
    }
    if let (Some(p), Some(c)) = (r.pooled_keys_per_second, r.pooled_cpu_ms_per_key) {
        s.push_str(&format!(
            "keyfleet run, keys made beforehand (the plumbing alone): {p:.1} keys/s{}  ({c:.2} ms CPU a key)\n",
            rounds_of(&r.pooled_rounds_keys_per_second, "rounds", |x| format!("{x:.0}"))
        ));
    }
    if let Some(kept) = &r.output_kept {
        s.push_str(&format!("output kept in {}\n", kept.display()));
    }
    s
}
