//! Benchmarks of the RSA prime engine (`keyfleet::prime`): one 1024-bit modular exponentiation
//! (engine, crypto-bigint 0.7, num-bigint-dig) and RSA-2048 key generation (engine against
//! `rsa::RsaPrivateKey::new`), side by side. `cargo bench --bench prime`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use crypto_bigint::modular::{FixedMontyForm, FixedMontyParams};
use crypto_bigint::{Odd, Uint};
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

criterion_group!(benches, modexp, keygen);
criterion_main!(benches);
