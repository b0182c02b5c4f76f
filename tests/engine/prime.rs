//! Correctness evidence for the RSA prime engine (`keyfleet::prime`): Montgomery arithmetic
//! against num-bigint-dig, engine primes against num-bigint-dig's independent primality test,
//! known composites and pseudoprimes rejected, and engine keys checked by `rsa`, by OpenSSL and
//! through PKCS#8 and signatures. The `#[ignore]`d tests are the long versions (run them with
//! `cargo test --release --test engine -- --ignored prime::`).

use std::time::Instant;

use keyfleet::prime::{
    generate_rsa_key, is_probable_prime, miller_rabin::is_strong_probable_prime_to_base,
    monty::Monty, random_prime, rounds_for_bits, EngineError, PUBLIC_EXPONENT,
};
use num_bigint_dig::{prime::probably_prime, BigUint};
use num_traits::{One, Zero};
use proptest::prelude::*;
use rand_core::OsRng;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use rsa::traits::{PrivateKeyParts, PublicKeyParts};
use rsa::{Pkcs1v15Sign, RsaPrivateKey};
use sha2::{Digest, Sha256};

use crate::util::bignum::{big_dec, from_big, limbs, to_big};

/// Checks mul, sqr, pow, pow2 for one modulus against num-bigint-dig.
fn check_monty<const N: usize>(m: [u64; N], a: [u64; N], b: [u64; N], e: [u64; N]) {
    let ctx = Monty::<N>::new(&m).unwrap();
    let (mb, ab, bb, eb) = (to_big(&m), to_big(&a), to_big(&b), to_big(&e));
    let a = from_big::<N>(&(&ab % &mb));
    let b = from_big::<N>(&(&bb % &mb));
    let (am, bm) = (ctx.to_mont(&a), ctx.to_mont(&b));
    assert_eq!(to_big(&ctx.from_mont(&am)), &ab % &mb, "to/from");
    assert_eq!(
        to_big(&ctx.from_mont(&ctx.mul(&am, &bm))),
        (&ab * &bb) % &mb,
        "mul"
    );
    assert_eq!(
        to_big(&ctx.from_mont(&ctx.sqr(&am))),
        (&ab * &ab) % &mb,
        "sqr"
    );
    assert_eq!(
        to_big(&ctx.from_mont(&ctx.add(&am, &bm))),
        (&ab + &bb) % &mb,
        "add"
    );
    assert_eq!(
        to_big(&ctx.from_mont(&ctx.double(&am))),
        (&ab << 1) % &mb,
        "double"
    );
    assert_eq!(
        to_big(&ctx.from_mont(&ctx.pow(&am, &e))),
        ab.modpow(&eb, &mb),
        "pow"
    );
    assert_eq!(
        to_big(&ctx.from_mont(&ctx.pow2(&e))),
        BigUint::from(2u32).modpow(&eb, &mb),
        "pow2"
    );
    // to_mont also accepts any x < R (used for random bases).
    assert_eq!(to_big(&ctx.from_mont(&ctx.to_mont(&b))), &bb % &mb);
    assert_eq!(to_big(ctx.r2()), (BigUint::one() << (128 * N)) % &mb, "r2");
}

/// Odd modulus; `top` forces the top bit (the engine's case), else arbitrary size.
fn modulus<const N: usize>(top: bool) -> impl Strategy<Value = [u64; N]> {
    (limbs::<N>(), 0..64 * N as u32).prop_map(move |(mut m, shrink)| {
        m[0] |= 1;
        if top {
            m[N - 1] |= 1 << 63;
        } else {
            // Clear the top `shrink` bits so that short moduli get exercised too.
            for bit in (64 * N as u32 - shrink)..(64 * N as u32) {
                m[(bit / 64) as usize] &= !(1u64 << (bit % 64));
            }
            if m.iter().skip(1).all(|&l| l == 0) && m[0] < 3 {
                m[0] = 3;
            }
        }
        m
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn monty_1024_top_bit(m in modulus::<16>(true), a in limbs::<16>(), b in limbs::<16>(), e in limbs::<16>()) {
        check_monty(m, a, b, e);
    }

    #[test]
    fn monty_1536_top_bit(m in modulus::<24>(true), a in limbs::<24>(), b in limbs::<24>(), e in limbs::<24>()) {
        check_monty(m, a, b, e);
    }

    #[test]
    fn monty_2048_top_bit(m in modulus::<32>(true), a in limbs::<32>(), b in limbs::<32>(), e in limbs::<32>()) {
        check_monty(m, a, b, e);
    }

    #[test]
    fn monty_small_any_size(m1 in modulus::<1>(false), m3 in modulus::<3>(false), m16 in modulus::<16>(false),
                            a in limbs::<16>(), b in limbs::<16>(), e in limbs::<16>()) {
        check_monty(m1, [a[0]], [b[0]], [e[0]]);
        check_monty(m3, [a[0], a[1], a[2]], [b[0], b[1], b[2]], [e[0], e[1], e[2]]);
        check_monty(m16, a, b, e);
    }
}

/// Edge operands: 0, 1, m − 1, all-ones exponents, modulus 2^k − 1.
#[test]
fn monty_edge_cases() {
    let mut m = [u64::MAX; 16];
    check_monty(m, [0; 16], [0; 16], [0; 16]);
    let mut mm1 = m;
    mm1[0] -= 1;
    check_monty(m, mm1, mm1, [u64::MAX; 16]);
    m[15] = 1 << 63;
    m[0] = 1;
    for l in &mut m[1..15] {
        *l = 0;
    }
    let mut one = [0u64; 16];
    one[0] = 1;
    check_monty(m, one, mm1, mm1);
    check_monty([3u64], [2], [2], [u64::MAX]);
}

/// Draws `count` engine primes of 64·N bits and confirms each with num-bigint-dig's
/// `probably_prime` (Miller-Rabin to 20 random bases plus a Lucas test: BPSW).
fn confirm_primes<const N: usize>(count: usize) {
    let mut rng = OsRng;
    let e = BigUint::from(PUBLIC_EXPONENT);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..count {
        let p = random_prime::<N>(&mut rng);
        let pb = to_big(&p);
        assert!(
            probably_prime(&pb, 20),
            "engine prime failed independent test: {pb}"
        );
        assert_eq!(pb.bits(), 64 * N);
        assert!(p[N - 1] >> 62 == 0b11, "top two bits");
        let pm1 = &pb - 1u32;
        assert!(num_integer_gcd(&e, &pm1).is_one(), "gcd(e, p-1)");
        assert!(seen.insert(pb), "repeated prime");
    }
}

fn num_integer_gcd(a: &BigUint, b: &BigUint) -> BigUint {
    let (mut a, mut b) = (a.clone(), b.clone());
    while !b.is_zero() {
        let r = &a % &b;
        a = b;
        b = r;
    }
    a
}

#[test]
fn engine_primes_confirmed_small_sizes() {
    confirm_primes::<1>(2000);
    confirm_primes::<2>(1000);
    confirm_primes::<4>(300);
    confirm_primes::<8>(50);
}

#[test]
fn engine_primes_confirmed_rsa_sizes() {
    confirm_primes::<16>(40);
    confirm_primes::<24>(6);
    confirm_primes::<32>(3);
}

#[test]
#[ignore = "long: thousands of 1024-bit primes"]
fn engine_primes_confirmed_long() {
    confirm_primes::<16>(3000);
    confirm_primes::<24>(300);
    confirm_primes::<32>(100);
}

/// Odd composites that fool weaker tests: Carmichael numbers (Fermat liars for every coprime
/// base) and strong pseudoprimes to several small bases.
#[test]
fn known_composites_rejected() {
    let mut rng = OsRng;
    let carmichael: [u64; 8] = [
        561,
        1105,
        41041,
        825265,
        321197185,
        5394826801,
        232250619601,
        9746347772161,
    ];
    for &n in &carmichael {
        assert!(!is_probable_prime(&[n], 50, &mut rng), "{n}");
        assert!(!is_probable_prime(&[n, 0], 50, &mut rng), "{n} as 2 limbs");
        // Fermat test to base 2 passes on these (all odd, so coprime to 2):
        let nb = BigUint::from(n);
        assert!(BigUint::from(2u32).modpow(&(&nb - 1u32), &nb).is_one());
    }
    // Strong pseudoprimes: (n, bases it fools).
    let spsp: [(u64, &[u64]); 4] = [
        (2047, &[2]),
        (3215031751, &[2, 3, 5, 7]),
        (2152302898747, &[2, 3, 5, 7, 11]),
        (3825123056546413051, &[2, 3, 5, 7, 11, 13, 17, 19, 23]),
    ];
    for (n, bases) in spsp {
        for &b in bases {
            assert!(
                is_strong_probable_prime_to_base(&[n], &[b]),
                "{n} should be a strong pseudoprime to base {b}"
            );
        }
        assert!(!is_probable_prime(&[n], 50, &mut rng), "{n}");
    }
    // 3825123056546413051 (ψ₁₁) also fools 29 and 31; 37 is the first prime base to catch it.
    let n = 3825123056546413051u64;
    for b in [29u64, 31] {
        assert!(
            is_strong_probable_prime_to_base(&[n], &[b]),
            "psi11 base {b}"
        );
    }
    assert!(!is_strong_probable_prime_to_base(&[n], &[37]));
    // ψ₁₂ = 318665857834031151167461: strong pseudoprime to every prime base up to 37.
    let psi12 = big_dec("318665857834031151167461");
    let psi12_limbs = from_big::<2>(&psi12);
    for b in [2u64, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37] {
        assert!(
            is_strong_probable_prime_to_base(&psi12_limbs, &[b, 0]),
            "psi12 base {b}"
        );
    }
    assert!(!is_probable_prime(&psi12_limbs, 50, &mut rng));
    assert!(!probably_prime(&psi12, 20));
}

/// F. Arnault, "Constructing Carmichael numbers which are strong pseudoprimes to several
/// bases", J. Symbolic Computation 20(2), 1995: a 397-digit (1318-bit) Carmichael number that is
/// a strong pseudoprime to every prime base below 307. A fixed-base test with the first 62
/// primes accepts it; random bases must not.
#[test]
fn arnault_carmichael_rejected() {
    let n = big_dec(concat!(
        "2887148238050771212671429597130393991977609459279722700926516024197432303799152733116328983144639225941977",
        "8031109293496555784189494417409338056151139799994215424169339729054237110027510420801349667317551528592269",
        "6291677532547504444585610194940420003990443211677661994962953925045269871932907037356403227370127845389912",
        "6120309244841494728976885406024976768122077071687938121709811322297802059565867"
    ));
    assert_eq!(n.bits(), 1318);
    let limbs = from_big::<21>(&n);
    let small_primes: Vec<u64> = (2u64..310)
        .filter(|&p| (2..p).take_while(|d| d * d <= p).all(|d| p % d != 0))
        .collect();
    for &b in small_primes.iter().filter(|&&b| b < 307) {
        let mut base = [0u64; 21];
        base[0] = b;
        assert!(is_strong_probable_prime_to_base(&limbs, &base), "base {b}");
    }
    let mut base = [0u64; 21];
    base[0] = 307;
    assert!(!is_strong_probable_prime_to_base(&limbs, &base));
    assert!(!is_probable_prime(&limbs, 50, &mut OsRng));
    assert!(!probably_prime(&n, 20));
}

/// Large strong pseudoprimes to base 2: 2^p − 1 for prime p with 2^p − 1 composite (2^p ≡ 1
/// makes 2^d ≡ 1 for d = (2^(p−1) − 1), the odd part of n − 1, as p | d). The engine's base-2
/// filter passes them; the random-base rounds must not.
#[test]
fn large_base2_pseudoprimes_rejected() {
    let mut rng = OsRng;
    // 2^1021 − 1 (1021 is prime, not a Mersenne exponent) and 2^2039 − 1.
    let m1021 = (BigUint::one() << 1021) - 1u32;
    let l1021 = from_big::<16>(&m1021);
    assert!(is_strong_probable_prime_to_base(
        &l1021,
        &from_big::<16>(&BigUint::from(2u32))
    ));
    assert!(!is_probable_prime(&l1021, 50, &mut rng));
    let m2039 = (BigUint::one() << 2039) - 1u32;
    let l2039 = from_big::<32>(&m2039);
    assert!(is_strong_probable_prime_to_base(
        &l2039,
        &from_big::<32>(&BigUint::from(2u32))
    ));
    assert!(!is_probable_prime(&l2039, 50, &mut rng));
    // A product of two 512-bit primes with the top bit set (the engine's Montgomery fast path).
    let p = to_big(&random_prime::<8>(&mut rng));
    let q = to_big(&random_prime::<8>(&mut rng));
    let n = from_big::<16>(&(&p * &q));
    assert!(!is_probable_prime(&n, 50, &mut rng));
}

/// FIPS 186-5 Table B.1, security-strength column (see `rounds_for_bits`).
#[test]
fn miller_rabin_round_counts() {
    assert_eq!(rounds_for_bits(1024), 5);
    assert_eq!(rounds_for_bits(1536), 4);
    assert_eq!(rounds_for_bits(2048), 4);
}

/// Known primes accepted (Mersenne M607, M1279, M2203 and small ones).
#[test]
fn known_primes_accepted() {
    let mut rng = OsRng;
    let m607 = from_big::<10>(&((BigUint::one() << 607) - 1u32));
    assert!(is_probable_prime(&m607, 10, &mut rng));
    let m1279 = from_big::<20>(&((BigUint::one() << 1279) - 1u32));
    assert!(is_probable_prime(&m1279, 4, &mut rng));
    let m2203 = from_big::<35>(&((BigUint::one() << 2203) - 1u32));
    assert!(is_probable_prime(&m2203, 2, &mut rng));
    for p in [2u64, 3, 5, 65537, 4294967291, 18446744073709551557] {
        assert!(is_probable_prime(&[p], 20, &mut rng), "{p}");
    }
}

/// The engine's key read back by the `rsa` crate from its PKCS#8 DER (an independent parser and
/// validator: `check_key` then tests it with rsa's own arithmetic).
fn as_rsa(key: &keyfleet::prime::rsa_ct::RsaPrivate) -> RsaPrivateKey {
    RsaPrivateKey::from_pkcs8_der(key.to_pkcs8_der().unwrap().as_bytes()).unwrap()
}

/// Everything a consumer relies on for one key.
fn check_key(key: &RsaPrivateKey, bits: usize) {
    key.validate().unwrap();
    assert_eq!(key.size() * 8, bits);
    assert_eq!(key.n().bits(), bits);
    assert_eq!(key.e(), &BigUint::from(65537u32));
    let primes = key.primes();
    assert_eq!(primes.len(), 2);
    let (p, q) = (&primes[0], &primes[1]);
    for x in [p, q] {
        assert!(probably_prime(x, 20));
        assert_eq!(x.bits(), bits / 2);
        assert!(x >> (bits / 2 - 2) == BigUint::from(3u32), "top two bits");
        assert!(num_integer_gcd(&BigUint::from(65537u32), &(x - 1u32)).is_one());
    }
    let diff = if p > q { p - q } else { q - p };
    assert!(diff > BigUint::one() << (bits / 2 - 100), "|p - q|");
    assert!(key.d() > &(BigUint::one() << (bits / 2)), "d");
    assert!(key.crt_coefficient().is_some(), "precomputed");

    let der = key.to_pkcs8_der().unwrap();
    let back = RsaPrivateKey::from_pkcs8_der(der.as_bytes()).unwrap();
    assert_eq!(&back, key);
    let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap();
    assert_eq!(&RsaPrivateKey::from_pkcs8_pem(&pem).unwrap(), key);

    let digest = Sha256::digest(b"keyfleet prime engine");
    let sig = key.sign(Pkcs1v15Sign::new::<Sha256>(), &digest).unwrap();
    key.to_public_key()
        .verify(Pkcs1v15Sign::new::<Sha256>(), &digest, &sig)
        .unwrap();
    let mut bad = digest;
    bad[0] ^= 1;
    assert!(key
        .to_public_key()
        .verify(Pkcs1v15Sign::new::<Sha256>(), &bad, &sig)
        .is_err());
}

/// `openssl pkey -check` on the PKCS#8 PEM of each key; skipped (with a note) without openssl.
fn openssl_check(keys: &[RsaPrivateKey]) {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!("openssl not found: skipping `openssl pkey -check`");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, key) in keys.iter().enumerate() {
        let path = dir.path().join(format!("k{i}.pem"));
        std::fs::write(&path, key.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes()).unwrap();
        let out = std::process::Command::new("openssl")
            .args(["pkey", "-check", "-noout", "-in"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "openssl pkey -check failed: {text}");
        assert!(text.contains("Key is valid"), "openssl said: {text}");
    }
}

#[test]
fn rsa_keys_all_sizes() {
    let mut keys = Vec::new();
    for bits in [2048, 2048, 2048, 3072, 4096] {
        let key = as_rsa(&generate_rsa_key(bits).unwrap());
        check_key(&key, bits);
        keys.push(key);
    }
    openssl_check(&keys);
    assert!(matches!(
        generate_rsa_key(1024),
        Err(EngineError::UnsupportedBits(1024))
    ));
}

#[test]
#[ignore = "long: hundreds of keys through openssl"]
fn rsa_keys_long() {
    let keys: Vec<_> = (0..300)
        .map(|_| as_rsa(&generate_rsa_key(2048).unwrap()))
        .chain((0..20).map(|_| as_rsa(&generate_rsa_key(3072).unwrap())))
        .chain((0..10).map(|_| as_rsa(&generate_rsa_key(4096).unwrap())))
        .collect();
    for key in &keys {
        check_key(key, key.size() * 8);
    }
    openssl_check(&keys);
}

/// On-CPU and run-queue-wait nanoseconds of the calling thread (Linux schedstat).
fn thread_sched_ns() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    Some((fields.next()??, fields.next()??))
}

/// `keys` RSA-2048 keys on each of `threads` threads: (keys/s of wall time, keys per on-CPU
/// second per thread, share of the threads' time spent waiting for a CPU).
fn engine_run(threads: usize, keys: usize) -> (f64, f64, f64) {
    let t = Instant::now();
    let per_thread: Vec<(u64, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || {
                    let before = thread_sched_ns().unwrap_or((0, 0));
                    for _ in 0..keys {
                        generate_rsa_key(2048).unwrap();
                    }
                    let after = thread_sched_ns().unwrap_or((0, 0));
                    (after.0 - before.0, after.1 - before.1)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wall = t.elapsed().as_secs_f64();
    let cpu: u64 = per_thread.iter().map(|p| p.0).sum();
    let wait: u64 = per_thread.iter().map(|p| p.1).sum();
    let total = (threads * keys) as f64;
    (
        total / wall,
        total / (cpu as f64 * 1e-9),
        wait as f64 / (cpu + wait).max(1) as f64,
    )
}

/// Throughput report, engine and `rsa` side by side (no assertions: numbers only). Also
/// prints keys per on-CPU second and the time spent waiting for a CPU, which separate the
/// engine's scaling from other load on a shared machine.
/// `cargo test --release --test engine -- --ignored --nocapture throughput`
#[test]
#[ignore = "timing report, release builds only"]
fn throughput_report() {
    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    }
    let (mut e1, mut e2, mut b1) = (Vec::new(), Vec::new(), Vec::new());
    let (mut c1, mut c2, mut w1, mut w2) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..5 {
        let (wall, cpu, wait) = engine_run(1, 40);
        e1.push(wall);
        c1.push(cpu);
        w1.push(wait);
        let t = Instant::now();
        for _ in 0..4 {
            RsaPrivateKey::new(&mut OsRng, 2048).unwrap();
        }
        b1.push(4.0 / t.elapsed().as_secs_f64());
        let (wall, cpu, wait) = engine_run(2, 40);
        e2.push(wall);
        c2.push(cpu);
        w2.push(wait);
    }
    println!("RSA-2048 keygen, medians of 5 runs (40 keys per thread per run):");
    println!(
        "  engine 1 thread : {:.1} keys/s ({:.1} keys per CPU-second, {:.0}% waiting for a CPU) {e1:.1?}",
        median(e1.clone()),
        median(c1.clone()),
        100.0 * median(w1.clone())
    );
    println!(
        "  engine 2 threads: {:.1} keys/s ({:.1} keys per CPU-second per thread, {:.0}% waiting for a CPU) {e2:.1?}",
        median(e2.clone()),
        median(c2.clone()),
        100.0 * median(w2.clone())
    );
    println!(
        "  rsa::RsaPrivateKey::new 1 thread: {:.1} keys/s {b1:.1?}",
        median(b1.clone())
    );
}
