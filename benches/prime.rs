//! Benchmarks of the RSA prime engine (`keyfleet::prime`): one 1024-bit modular exponentiation
//! (engine, crypto-bigint 0.7, num-bigint-dig) and RSA-2048 key generation (engine against
//! `rsa::RsaPrivateKey::new`), side by side; the lane engine's 1024-bit modexp for 1, 2, 4 and
//! 8 lanes on each instruction set it has (throughput in modexps). `cargo bench --bench prime`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use crypto_bigint::modular::{FixedMontyForm, FixedMontyParams};
use crypto_bigint::{Odd, Uint};
use keyfleet::prime::lanes::{self, Simd};
use keyfleet::prime::{generate_rsa_key, monty::Monty};
use num_bigint_dig::BigUint;
use rand_core::{OsRng, RngCore};

fn random_limbs() -> [u64; 16] {
    let mut x = [0u64; 16];
    for l in x.iter_mut() {
        *l = OsRng.next_u64();
    }
    x
}

/// An odd 1024-bit modulus with the top bit set, a base below it, a full-width exponent.
fn operands() -> ([u64; 16], [u64; 16], [u64; 16]) {
    let mut m = random_limbs();
    m[0] |= 1;
    m[15] |= 1 << 63;
    let mut a = random_limbs();
    a[15] &= !(1 << 63);
    (m, a, random_limbs())
}

fn to_big(x: &[u64; 16]) -> BigUint {
    let bytes: Vec<u8> = x.iter().flat_map(|l| l.to_le_bytes()).collect();
    BigUint::from_bytes_le(&bytes)
}

fn modexp(c: &mut Criterion) {
    let (m, a, e) = operands();
    let mut g = c.benchmark_group("modexp_1024");
    g.measurement_time(Duration::from_secs(4));

    let ctx = Monty::<16>::new(&m).unwrap();
    let am = ctx.to_mont(&a);
    g.bench_function("engine_pow_window5", |b| b.iter(|| ctx.pow(&am, &e)));
    g.bench_function("engine_pow2_base2", |b| b.iter(|| ctx.pow2(&e)));
    g.bench_function("engine_sqr", |b| b.iter(|| ctx.sqr(&am)));
    g.bench_function("engine_mul", |b| b.iter(|| ctx.mul(&am, &am)));

    let params = FixedMontyParams::new_vartime(Odd::new(Uint::<16>::from_words(m)).unwrap());
    let ca = FixedMontyForm::new(&Uint::<16>::from_words(a), &params);
    let ce = Uint::<16>::from_words(e);
    g.bench_function("crypto_bigint_0_7_fixed_pow", |b| b.iter(|| ca.pow(&ce)));

    let (bm, ba, be) = (to_big(&m), to_big(&a), to_big(&e));
    g.bench_function("num_bigint_dig_modpow", |b| b.iter(|| ba.modpow(&be, &bm)));
    g.finish();
}

/// One 1024-bit modexp (window 4, full 1024-bit exponent) per lane, for 1, 2, 4 and 8 lanes
/// each holding a different modulus, base and exponent; and the base-2 Miller-Rabin round.
/// Includes the per-call set-up (per-lane constants, layout conversion).
fn lanes_modexp(c: &mut Criterion) {
    let ops: Vec<_> = (0..lanes::LANES).map(|_| operands()).collect();
    let m: Vec<[u64; 16]> = ops.iter().map(|o| o.0).collect();
    let a: Vec<[u64; 16]> = ops.iter().map(|o| o.1).collect();
    let e: Vec<[u64; 16]> = ops.iter().map(|o| o.2).collect();
    let mut paths = vec![Simd::Scalar];
    if lanes::ifma_available() {
        paths.push(Simd::Avx512Ifma);
    }
    let mut g = c.benchmark_group("lanes_modexp_1024");
    g.measurement_time(Duration::from_secs(4));
    g.sample_size(20);
    for simd in paths {
        for k in [1usize, 2, 4, 8] {
            g.throughput(Throughput::Elements(k as u64));
            g.bench_function(format!("{}_pow_{k}_lanes", simd.as_str()), |b| {
                b.iter(|| lanes::pow::<16>(simd, &m[..k], &a[..k], &e[..k]))
            });
        }
        g.throughput(Throughput::Elements(8));
        g.bench_function(format!("{}_mr_base2_8_lanes", simd.as_str()), |b| {
            b.iter(|| lanes::strong_probable_prime::<16>(simd, &m, None))
        });
    }
    g.finish();
}

fn keygen(c: &mut Criterion) {
    let mut g = c.benchmark_group("rsa2048_keygen");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.bench_function("engine", |b| {
        b.iter_batched(
            || (),
            |_| generate_rsa_key(2048).unwrap(),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("rsa_RsaPrivateKey_new", |b| {
        b.iter_batched(
            || (),
            |_| rsa::RsaPrivateKey::new(&mut OsRng, 2048).unwrap(),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, modexp, lanes_modexp, keygen);
criterion_main!(benches);
