//! `keyfleet bench --serve`: creates per second and latency of `keyfleet serve` over loopback,
//! with signed requests (Alibaba RPC, HMAC-SHA1, as the classic SDK sends them), with the key
//! reservoir warm (every create answered from keys made ahead) and cold (no reservoir: every
//! create waits for its key), against raw key generation on the same threads. Rounds
//! alternate raw / warm / cold; medians are reported. Numbers only; nothing asserts timing.

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
    /// Cold creates/s over raw keys/s.
    pub cold_ratio_to_raw: f64,
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
    let client = ApiClient::new(&addr.to_string()).map_err(|e| BenchError::Pool(e.to_string()))?;
    let signer = Signer::AliyunRpc {
        id: ID.into(),
        secret: SECRET.into(),
    };
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, signer, next) = (client.clone(), signer.clone(), next.clone());
        workers.push(tokio::spawn(async move {
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
                    Ok(r) => return Err(format!("create answered {}: {}", r.status, r.body)),
                    Err(e) => return Err(format!("create failed: {e}")),
                }
            }
            Ok(times)
        }));
    }
    let mut times = Vec::with_capacity(creates);
    for w in workers {
        let got = w
            .await
            .map_err(|e| BenchError::Pool(e.to_string()))?
            .map_err(BenchError::Pool)?;
        times.extend(got);
    }
    let seconds = started.elapsed().as_secs_f64();
    stop.cancel();
    let _ = server.await;
    times.sort();
    Ok(ServeMeasurement {
        creates,
        concurrency,
        creates_per_second: creates as f64 / seconds,
        p50_ms: percentile(&times, 0.50),
        p99_ms: percentile(&times, 0.99),
    })
}

fn reservoir_keys(bits: KeyBits) -> usize {
    let text = crate::telemetry::metrics::render().unwrap_or_default();
    let label = format!("keyfleet_reservoir_keys{{bits=\"{}\"}} ", bits.bits());
    text.lines()
        .find_map(|l| l.strip_prefix(&label))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as usize)
}

/// Alternates raw / warm / cold for `rounds` rounds of `creates` creates each.
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
        warm.push(one_round(engine, bits, threads, creates, concurrency, creates).await?);
        cold.push(one_round(engine, bits, threads, creates, concurrency, 0).await?);
    }
    let med = |v: &[ServeMeasurement]| ServeMeasurement {
        creates,
        concurrency,
        creates_per_second: median(v.iter().map(|m| m.creates_per_second).collect()),
        p50_ms: median(v.iter().map(|m| m.p50_ms).collect()),
        p99_ms: median(v.iter().map(|m| m.p99_ms).collect()),
    };
    let (warm, cold) = (med(&warm), med(&cold));
    let raw = median(raw);
    Ok(ServeReport {
        bits: bits.bits(),
        threads,
        rounds: rounds.max(1),
        cold_ratio_to_raw: cold.creates_per_second / raw,
        warm,
        cold,
        raw_keys_per_second: raw,
    })
}

pub fn render(r: &ServeReport) -> String {
    format!(
        "keyfleet serve, RSA-{} on {} threads, {} signed creates per measurement, medians of {} rounds:\n\
         \x20 warm reservoir: {:.1} creates/s, p50 {:.2} ms, p99 {:.2} ms (concurrency {})\n\
         \x20 cold reservoir: {:.1} creates/s, p50 {:.1} ms, p99 {:.1} ms (concurrency {})\n\
         \x20 raw key generation: {:.1} keys/s; cold serve = {:.0}% of raw\n",
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
        r.cold_ratio_to_raw * 100.0
    )
}
