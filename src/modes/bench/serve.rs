//! `keyfleet bench --serve`: creates per second and latency of `keyfleet serve` over loopback,
//! with signed requests (Alibaba RPC, HMAC-SHA1, as the classic SDK sends them), with the key
//! reservoir warm (every create answered from keys made ahead) and cold (no reservoir: every
//! create waits for its key), against raw key generation on the same threads. Rounds
//! alternate raw / cold / warm; medians are reported, and the cold ratio is the median of each
//! round's own cold ÷ raw. Numbers only; nothing asserts timing.
//!
//! The client runs on a thread of its own, so the CPU of each round is told apart by thread
//! (`/proc/self/task/*/schedstat`, to the nanosecond): key generation, the state file's
//! writer, the server's runtime, and the benchmark's own client, which a deployment would run
//! elsewhere but which shares this machine's cores here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{measure, median, percentile, threads_of, BenchError, KeySpec};
use crate::credentials::{AccessKey, Credentials, Secret};
use crate::dialect::Provider;
use crate::keys::keygen::{Engine, KeyBits};
use crate::modes::serve::{serve_with, ServeOptions, Store};
use crate::registry::embedded::EmbeddedRegistry;
use crate::settings::{KeyPairQuota, Settings};
use crate::upstream::client::{ApiClient, Signer};

#[derive(Clone, Debug, serde::Serialize)]
pub struct ServeMeasurement {
    pub creates: usize,
    pub concurrency: usize,
    pub creates_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// CPU a create, by thread, while the creates ran.
    pub cpu_ms_per_create: CpuShares,
}

/// CPU time in milliseconds a create, by the threads that spent it.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CpuShares {
    /// The key-generation pool (`keyfleet-keygen-*`).
    pub keys: f64,
    /// The state file's writer thread (redb commits and syncs).
    pub state: f64,
    /// The server's async runtime and its blocking pool (HTTP, signatures, the lifecycle).
    pub runtime: f64,
    /// The benchmark's client (signing, HTTP, reading the answers), as its thread counted it.
    pub client: f64,
    /// Every other thread of the process.
    pub other: f64,
}

/// The benchmark client's thread name (a thread's name is cut to 15 bytes by Linux).
const CLIENT_THREAD: &str = "keyfleet-bench-client";

/// Nanoseconds on a CPU so far of each thread of this process, by thread id, with its name.
fn thread_cpu() -> std::collections::HashMap<String, (String, u64)> {
    let mut out = std::collections::HashMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let ns = std::fs::read_to_string(dir.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
        if let Some(ns) = ns {
            let id = task.file_name().to_string_lossy().into_owned();
            out.insert(id, (name.trim().to_owned(), ns));
        }
    }
    out
}

impl CpuShares {
    /// What the threads spent between two [`thread_cpu`] readings, a create.
    fn between(
        before: &std::collections::HashMap<String, (String, u64)>,
        after: &std::collections::HashMap<String, (String, u64)>,
        creates: usize,
    ) -> CpuShares {
        let mut shares = CpuShares::default();
        let per = 1e6 * creates.max(1) as f64;
        for (id, (name, ns)) in after {
            let spent = ns.saturating_sub(before.get(id).map_or(0, |(_, b)| *b)) as f64 / per;
            let slot = if name.starts_with("keyfleet-keygen") {
                &mut shares.keys
            } else if name.starts_with("keyfleet-state") {
                &mut shares.state
            } else if name.starts_with("tokio-rt-worker") {
                &mut shares.runtime
            } else {
                &mut shares.other
            };
            *slot += spent;
        }
        shares
    }

    /// The share of the CPU that went to anything but keys, in per cent, with or without the
    /// benchmark's own client counted.
    fn plumbing_percent(&self, with_client: bool) -> f64 {
        let client = if with_client { self.client } else { 0.0 };
        let plumbing = self.state + self.runtime + self.other + client;
        100.0 * plumbing / (self.keys + plumbing).max(1e-9)
    }

    fn median_of(v: &[CpuShares]) -> CpuShares {
        let m = |f: fn(&CpuShares) -> f64| median(v.iter().map(f).collect());
        CpuShares {
            keys: m(|c| c.keys),
            state: m(|c| c.state),
            runtime: m(|c| c.runtime),
            client: m(|c| c.client),
            other: m(|c| c.other),
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ServeReport {
    pub bits: usize,
    pub threads: usize,
    pub rounds: usize,
    /// Medians over the rounds.
    pub warm: ServeMeasurement,
    pub cold: ServeMeasurement,
    pub raw_keys_per_second: f64,
    /// Each round's cold creates/s over the same round's raw keys/s: the median.
    pub cold_ratio_to_raw: f64,
    /// The lowest and highest of those ratios: how much the rounds disagree (the primes a
    /// round happens to draw, and the machine's speed, differ from round to round).
    pub cold_ratio_range: (f64, f64),
}

const ID: &str = "benchid";
const SECRET: &str = "benchsecret";

/// One server on a fresh state file: `reservoir` keys made ahead (waited for before the clock
/// starts), then `creates` signed creates, `concurrency` at a time.
async fn one_round(
    engine: Engine,
    bits: KeyBits,
    threads: usize,
    creates: usize,
    concurrency: usize,
    reservoir: usize,
) -> Result<ServeMeasurement, BenchError> {
    let dir = tempfile::tempdir().map_err(|e| BenchError::Pool(e.to_string()))?;
    let state = dir.path().join("state.redb");
    let registry =
        Arc::new(EmbeddedRegistry::open(&state).map_err(|e| BenchError::Pool(e.to_string()))?);
    let credentials = Credentials::from_keys(vec![AccessKey {
        provider: Provider::Aliyun,
        id: ID.into(),
        secret: Secret::new(SECRET.into()),
        account: "bench".into(),
    }]);
    let opts = ServeOptions {
        listen: ([127, 0, 0, 1], 0).into(),
        credentials,
        store: Store::Embedded(state),
        settings: Settings {
            engine,
            quota: KeyPairQuota {
                default: 10_000_000,
                ..KeyPairQuota::default()
            },
            ..Settings::default()
        },
        threads,
        key_bits: bits,
        reservoir,
        throttle_rps: 0,
        fault_rate: 0.0,
        drain: Duration::from_secs(30),
        upstream: crate::upstream::Configured::local(),
    };
    let stop = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(serve_with(registry, opts, stop.clone(), move |addr| {
        let _ = tx.send(addr);
    }));
    let addr = rx
        .await
        .map_err(|_| BenchError::Pool("keyfleet serve did not start".into()))?;
    if reservoir > 0 {
        // The reservoir fills on idle threads; its gauge says when it is full.
        let deadline = Instant::now() + Duration::from_secs(600);
        while reservoir_keys(bits) < reservoir && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let addr = addr.to_string();
    let signer = Signer::AliyunRpc {
        id: ID.into(),
        secret: SECRET.into(),
    };
    let cpu_before = thread_cpu();
    let started = Instant::now();
    let times = std::thread::Builder::new()
        .name(CLIENT_THREAD.into())
        .spawn(move || drive(&addr, signer, creates, concurrency))
        .map_err(|e| BenchError::Pool(e.to_string()))?;
    let times = tokio::task::spawn_blocking(move || times.join())
        .await
        .map_err(|e| BenchError::Pool(e.to_string()))?
        .map_err(|_| BenchError::Pool("the benchmark client panicked".into()))?;
    let (mut times, client_ns) = times.map_err(BenchError::Pool)?;
    let seconds = started.elapsed().as_secs_f64();
    let mut cpu = CpuShares::between(&cpu_before, &thread_cpu(), creates);
    // The client's thread has ended by now: it counted its own.
    cpu.client = client_ns as f64 / (1e6 * creates.max(1) as f64);
    stop.cancel();
    let _ = server.await;
    times.sort();
    Ok(ServeMeasurement {
        creates,
        concurrency,
        creates_per_second: creates as f64 / seconds,
        p50_ms: percentile(&times, 0.50),
        p99_ms: percentile(&times, 0.99),
        cpu_ms_per_create: cpu,
    })
}

/// The client: `creates` signed creates, `concurrency` at a time, on a runtime of this thread's
/// own; the latency of each, and the CPU this thread spent (nanoseconds).
fn drive(
    addr: &str,
    signer: Signer,
    creates: usize,
    concurrency: usize,
) -> Result<(Vec<Duration>, u64), String> {
    let cpu = || {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
    };
    let before = cpu();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("the client's runtime: {e}"))?;
    runtime
        .block_on(async move {
            // Made on this runtime: its connections' tasks run here, not on the server's.
            let client = ApiClient::new(addr).map_err(|e| e.to_string())?;
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut workers = tokio::task::JoinSet::new();
            for _ in 0..concurrency {
                let (client, signer, next) = (client.clone(), signer.clone(), next.clone());
                workers.spawn(async move {
                    let mut times = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= creates {
                            break;
                        }
                        let name = format!("bench-{i}");
                        let t = Instant::now();
                        let r = client
                            .call(
                                &signer,
                                "CreateKeyPair",
                                &[("RegionId", "cn-hangzhou"), ("KeyPairName", &name)],
                            )
                            .await;
                        match r {
                            Ok(r) if r.status == 200 => times.push(t.elapsed()),
                            Ok(r) => {
                                return Err(format!("create answered {}: {}", r.status, r.body))
                            }
                            Err(e) => return Err(format!("create failed: {e}")),
                        }
                    }
                    Ok(times)
                });
            }
            let mut times = Vec::with_capacity(creates);
            while let Some(got) = workers.join_next().await {
                times.extend(got.map_err(|e| e.to_string())??);
            }
            Ok(times)
        })
        .map(|times| (times, cpu().saturating_sub(before)))
}

fn reservoir_keys(bits: KeyBits) -> usize {
    let text = crate::telemetry::metrics::render().unwrap_or_default();
    let label = format!("keyfleet_reservoir_keys{{bits=\"{}\"}} ", bits.bits());
    text.lines()
        .find_map(|l| l.strip_prefix(&label))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as usize)
}

/// Alternates raw / cold / warm for `rounds` rounds of `creates` creates each.
pub async fn bench_serve(
    spec: KeySpec,
    creates: usize,
    concurrency: usize,
    rounds: usize,
) -> Result<ServeReport, BenchError> {
    let (engine, bits, threads) = (spec.engine, spec.bits, spec.threads);
    if creates == 0 {
        return Err(BenchError::NoKeys);
    }
    let threads = threads_of(threads);
    let concurrency = concurrency.max(1);
    let (mut raw, mut warm, mut cold) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds.max(1) {
        eprintln!("bench --serve: round {} of {}", round + 1, rounds.max(1));
        let r = tokio::task::spawn_blocking(move || measure(engine, bits, threads, creates))
            .await
            .map_err(|e| BenchError::Pool(e.to_string()))??;
        raw.push(r.keys_per_second);
        // Cold right after raw: the machine's speed drifts over seconds (shared cores), and
        // the ratio is taken round by round.
        cold.push(one_round(engine, bits, threads, creates, concurrency, 0).await?);
        warm.push(one_round(engine, bits, threads, creates, concurrency, creates).await?);
    }
    let ratios: Vec<f64> = cold
        .iter()
        .zip(&raw)
        .map(|(c, r)| c.creates_per_second / r.max(1e-9))
        .collect();
    let ratio_range = (
        ratios.iter().copied().fold(f64::INFINITY, f64::min),
        ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    );
    let med = |v: &[ServeMeasurement]| ServeMeasurement {
        creates,
        concurrency,
        creates_per_second: median(v.iter().map(|m| m.creates_per_second).collect()),
        p50_ms: median(v.iter().map(|m| m.p50_ms).collect()),
        p99_ms: median(v.iter().map(|m| m.p99_ms).collect()),
        cpu_ms_per_create: CpuShares::median_of(
            &v.iter()
                .map(|m| m.cpu_ms_per_create.clone())
                .collect::<Vec<_>>(),
        ),
    };
    let (warm, cold) = (med(&warm), med(&cold));
    let raw = median(raw);
    Ok(ServeReport {
        bits: bits.bits(),
        threads,
        rounds: rounds.max(1),
        cold_ratio_to_raw: median(ratios),
        cold_ratio_range: ratio_range,
        warm,
        cold,
        raw_keys_per_second: raw,
    })
}

pub fn render(r: &ServeReport) -> String {
    let c = &r.cold.cpu_ms_per_create;
    format!(
        "keyfleet serve, RSA-{} on {} threads, {} signed creates per measurement, medians of {} rounds:\n\
         \x20 warm reservoir: {:.1} creates/s, p50 {:.2} ms, p99 {:.2} ms (concurrency {})\n\
         \x20 cold reservoir: {:.1} creates/s, p50 {:.1} ms, p99 {:.1} ms (concurrency {})\n\
         \x20 raw key generation: {:.1} keys/s; cold serve = {:.0}% of raw (median of the rounds' \
         own ratios; {:.0}–{:.0}%)\n\
         \x20 CPU a cold create: keys {:.2} ms, state file {:.3}, server runtime {:.3}, \
         bench client {:.3}, other {:.3}: plumbing {:.1}% of it without the client, \
         {:.1}% with (the cores are busy in a cold round, so the keys' share, {:.1}%, is the \
         ratio the rounds scatter around)\n",
        r.bits,
        r.threads,
        r.warm.creates,
        r.rounds,
        r.warm.creates_per_second,
        r.warm.p50_ms,
        r.warm.p99_ms,
        r.warm.concurrency,
        r.cold.creates_per_second,
        r.cold.p50_ms,
        r.cold.p99_ms,
        r.cold.concurrency,
        r.raw_keys_per_second,
        r.cold_ratio_to_raw * 100.0,
        r.cold_ratio_range.0 * 100.0,
        r.cold_ratio_range.1 * 100.0,
        c.keys,
        c.state,
        c.runtime,
        c.client,
        c.other,
        c.plumbing_percent(false),
        c.plumbing_percent(true),
        100.0 - c.plumbing_percent(true),
    )
}
