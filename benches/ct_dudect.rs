//! dudect-style timing-leak check of the d/CRT step (`keyfleet::prime::rsa_ct::derive_only`: n, λ, d,
//! dp, dq, qinv and the FIPS 186-5 checks) for RSA-2048, and that step's share of key
//! generation time. Not a CI test: timing is noisy on shared machines.
//!
//! Two classes of inputs, interleaved in a random order so drift hits both alike: class 0 is
//! one fixed prime pair, class 1 a pair drawn at random from a pool of fresh engine primes.
//! Welch's t statistic between the two classes' timings is printed for all measurements and
//! for those below several percentiles (dudect's cropping, which removes interrupts and
//! preemptions); |t| < 4.5 is the usual "no leak detected" threshold.
//!
//! Run: `DUDECT_N=200000 cargo bench --bench ct_dudect` (default 20000 measurements).

use std::hint::black_box;
use std::time::Instant;

use keyfleet::keys::keygen::{self, Engine, KeyBits};
use keyfleet::prime::random_prime;
use keyfleet::prime::rsa_ct;
use rand_core::{OsRng, RngCore};

fn be<const N: usize>(x: &[u64; N]) -> Vec<u8> {
    x.iter().rev().flat_map(|l| l.to_be_bytes()).collect()
}

fn pair() -> (Vec<u8>, Vec<u8>) {
    (
        be(&random_prime::<16>(&mut OsRng)),
        be(&random_prime::<16>(&mut OsRng)),
    )
}

/// Welch's t statistic of two samples.
fn welch(a: &[f64], b: &[f64]) -> f64 {
    let stats = |x: &[f64]| {
        let n = x.len() as f64;
        let mean = x.iter().sum::<f64>() / n;
        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, var, n)
    };
    let (ma, va, na) = stats(a);
    let (mb, vb, nb) = stats(b);
    (ma - mb) / (va / na + vb / nb).sqrt()
}

fn main() {
    let n: usize = std::env::var("DUDECT_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let fixed = pair();
    let pool: Vec<_> = (0..256).map(|_| pair()).collect();
    // Warm-up, so caches and the frequency governor settle before measuring.
    for _ in 0..200 {
        black_box(rsa_ct::derive_only(&fixed.0, &fixed.1).unwrap());
    }
    let mut times: [Vec<f64>; 2] = [Vec::with_capacity(n / 2), Vec::with_capacity(n / 2)];
    // Both classes are copied into the same buffers before timing, so the measured call reads
    // its inputs from the same (cached) addresses whichever class it is.
    let (mut bp, mut bq) = (vec![0u8; 128], vec![0u8; 128]);
    for i in 0..n {
        let class = (OsRng.next_u32() & 1) as usize;
        let (p, q) = if class == 0 {
            &fixed
        } else {
            &pool[i % pool.len()]
        };
        bp.copy_from_slice(p);
        bq.copy_from_slice(q);
        let (p, q) = (black_box(bp.as_slice()), black_box(bq.as_slice()));
        let t = Instant::now();
        let key = rsa_ct::derive_only(p, q);
        let dt = t.elapsed();
        black_box(key.unwrap());
        times[class].push(dt.as_nanos() as f64);
    }
    let mut all: Vec<f64> = times.iter().flatten().copied().collect();
    all.sort_by(f64::total_cmp);
    let median = all[all.len() / 2];
    println!(
        "d/CRT step (RSA-2048): {n} measurements, {} fixed / {} random, median {:.1} µs",
        times[0].len(),
        times[1].len(),
        median / 1e3
    );
    let mut max_t: f64 = 0.0;
    for pct in [100.0, 99.0, 90.0, 75.0, 50.0] {
        let cut = all[((all.len() - 1) as f64 * pct / 100.0) as usize];
        let keep = |x: &Vec<f64>| x.iter().copied().filter(|&v| v <= cut).collect::<Vec<_>>();
        let t = welch(&keep(&times[0]), &keep(&times[1]));
        max_t = max_t.max(t.abs());
        println!("  below p{pct:>3}: t = {t:+.2}");
    }
    println!(
        "max |t| = {max_t:.2} ({})",
        if max_t < 4.5 {
            "< 4.5: no leak detected"
        } else {
            "≥ 4.5: possible leak"
        }
    );

    // The d/CRT step's share of key generation (fast engine, this machine's lane path).
    let keys = 100;
    let t = Instant::now();
    for _ in 0..keys {
        black_box(keygen::generate_private(KeyBits::B2048, Engine::Fast).unwrap());
    }
    let keygen_ns = t.elapsed().as_nanos() as f64 / keys as f64;
    let t = Instant::now();
    for (p, q) in pool.iter().take(keys) {
        black_box(rsa_ct::assemble(p, q).unwrap());
    }
    let assemble_ns = t.elapsed().as_nanos() as f64 / keys as f64;
    println!(
        "keygen {:.2} ms/key; d/CRT step {:.1} µs ({:.2} %); with the pair-wise test {:.1} µs ({:.2} %)",
        keygen_ns / 1e6,
        median / 1e3,
        100.0 * median / keygen_ns,
        assemble_ns / 1e3,
        100.0 * assemble_ns / keygen_ns
    );
}
