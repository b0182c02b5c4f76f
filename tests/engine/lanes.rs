//! The multi-lane Montgomery engine (`keyfleet::prime::lanes`) against the scalar Montgomery
//! engine (`keyfleet::prime::monty`) and num-bigint-dig: every lane with its own modulus, base
//! and exponent, lanes partly empty, 1024/1536/2048-bit moduli; Miller-Rabin verdicts on
//! Carmichael numbers and strong pseudoprimes; the lane prime search confirmed by BPSW. Each
//! test runs the portable scalar lanes always and the AVX-512 IFMA lanes where the CPU has
//! them, and says which it ran.

use keyfleet::prime::lanes::{self, Simd};
use keyfleet::prime::miller_rabin::is_strong_probable_prime_to_base;
use keyfleet::prime::monty::Monty;
use keyfleet::prime::PUBLIC_EXPONENT;
use num_bigint_dig::{prime::probably_prime, BigUint, RandBigInt};
use num_traits::{One, Zero};
use proptest::prelude::*;
use rand_core::{OsRng, RngCore};

use crate::util::bignum::{big_dec, from_big, limbs, to_big};

/// The paths to test on this machine: scalar lanes always, IFMA lanes where present.
fn paths() -> Vec<Simd> {
    let mut v = vec![Simd::Scalar];
    if lanes::ifma_available() {
        v.push(Simd::Avx512Ifma);
    }
    v
}

fn report_paths() {
    let names: Vec<&str> = paths().iter().map(|s| s.as_str()).collect();
    eprintln!("lane paths tested on this CPU: {names:?}");
}

/// One lane's operands: odd modulus (top bit set or not), base, second factor, exponent.
type Lane<const N: usize> = ([u64; N], [u64; N], [u64; N], [u64; N]);

/// Checks pow, pow2 and the Montgomery product of `lanes` (1 to 8; the rest of the lanes are
/// empty) on every path against num-bigint-dig and the scalar Montgomery engine.
fn check_lanes<const N: usize>(lanes_in: &[Lane<N>]) {
    let count = lanes_in.len();
    let ms: Vec<[u64; N]> = lanes_in.iter().map(|l| l.0).collect();
    let reduce = |x: &[u64; N], m: &[u64; N]| from_big::<N>(&(to_big(x) % to_big(m)));
    let bases: Vec<[u64; N]> = lanes_in.iter().map(|l| reduce(&l.1, &l.0)).collect();
    let bs: Vec<[u64; N]> = lanes_in.iter().map(|l| reduce(&l.2, &l.0)).collect();
    let exps: Vec<[u64; N]> = lanes_in.iter().map(|l| l.3).collect();
    let l52 = lanes::limbs52(N).unwrap();
    for simd in paths() {
        let pow = lanes::pow::<N>(simd, &ms, &bases, &exps);
        let pow2 = lanes::pow2::<N>(simd, &ms, &exps);
        let mul = lanes::mont_mul::<N>(simd, &ms, &bases, &bs);
        assert_eq!((pow.len(), pow2.len(), mul.len()), (count, count, count));
        for i in 0..count {
            let (m, a, b, e) = (
                to_big(&ms[i]),
                to_big(&bases[i]),
                to_big(&bs[i]),
                to_big(&exps[i]),
            );
            let want = a.modpow(&e, &m);
            assert_eq!(to_big(&pow[i]), want, "{simd:?} pow lane {i}/{count}");
            assert_eq!(
                to_big(&pow2[i]),
                BigUint::from(2u32).modpow(&e, &m),
                "{simd:?} pow2 lane {i}/{count}"
            );
            // mont_mul(a, b)·R ≡ a·b with R = 2^(52·L), and fully reduced.
            let r = BigUint::one() << (52 * l52);
            assert!(to_big(&mul[i]) < m, "{simd:?} mul reduced");
            assert_eq!(
                (to_big(&mul[i]) * &r) % &m,
                (&a * &b) % &m,
                "{simd:?} mul lane {i}/{count}"
            );
            // The scalar Montgomery engine agrees.
            let ctx = Monty::<N>::new(&ms[i]).unwrap();
            let sc = ctx.from_mont(&ctx.pow(&ctx.to_mont(&bases[i]), &exps[i]));
            assert_eq!(pow[i], sc, "{simd:?} lane vs scalar engine, lane {i}");
            let sc2 = ctx.from_mont(&ctx.pow2(&exps[i]));
            assert_eq!(
                pow2[i], sc2,
                "{simd:?} pow2 lane vs scalar engine, lane {i}"
            );
        }
    }
}

/// Odd modulus; `top` forces the top bit (the engine's case), else a random shorter size.
fn modulus<const N: usize>() -> impl Strategy<Value = [u64; N]> {
    (limbs::<N>(), any::<bool>(), 0..64 * N as u32).prop_map(|(mut m, top, shrink)| {
        m[0] |= 1;
        if top {
            m[N - 1] |= 1 << 63;
        } else {
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

fn lane<const N: usize>() -> impl Strategy<Value = Lane<N>> {
    (modulus::<N>(), limbs::<N>(), limbs::<N>(), limbs::<N>())
}

/// 1 to 8 lanes, each with different data.
fn lane_set<const N: usize>() -> impl Strategy<Value = Vec<Lane<N>>> {
    proptest::collection::vec(lane::<N>(), 1..=lanes::LANES)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn lanes_1024(set in lane_set::<16>()) {
        check_lanes(&set);
    }

    #[test]
    fn lanes_1536(set in lane_set::<24>()) {
        check_lanes(&set);
    }

    #[test]
    fn lanes_2048(set in lane_set::<32>()) {
        check_lanes(&set);
    }

    #[test]
    fn lanes_small(s1 in lane_set::<1>(), s2 in lane_set::<2>(), s4 in lane_set::<4>(), s8 in lane_set::<8>()) {
        check_lanes(&s1);
        check_lanes(&s2);
        check_lanes(&s4);
        check_lanes(&s8);
    }
}

/// Edge operands in full lanes: 0, 1, m − 1, all-ones exponents, m = 2^k − 1, m = 2^(k−1) + 1.
#[test]
fn lanes_edge_cases() {
    report_paths();
    let all = [u64::MAX; 16];
    let mut mm1 = all;
    mm1[0] -= 1;
    let mut low = [0u64; 16];
    low[0] = 1;
    low[15] = 1 << 63;
    let mut one = [0u64; 16];
    one[0] = 1;
    check_lanes::<16>(&[
        (all, [0; 16], [0; 16], [0; 16]),
        (all, mm1, mm1, all),
        (low, one, mm1, mm1),
        (low, mm1, one, all),
        (all, one, one, one),
        (low, [0; 16], mm1, one),
        (all, mm1, [0; 16], [0; 16]),
        (low, one, one, all),
    ]);
    check_lanes::<1>(&[([3], [2], [2], [u64::MAX])]);
}

/// `n` passes (or fails) a strong probable-prime test to each of `bases` in lanes, batched
/// eight at a time, on every path; the scalar engine agrees.
fn sprp_lanes<const N: usize>(n: &[u64; N], bases: &[[u64; N]]) -> Vec<bool> {
    let mut out: Option<Vec<bool>> = None;
    for simd in paths() {
        let mut v = Vec::new();
        for chunk in bases.chunks(lanes::LANES) {
            let ns = vec![*n; chunk.len()];
            v.extend(lanes::strong_probable_prime::<N>(simd, &ns, Some(chunk)));
        }
        if let Some(prev) = &out {
            assert_eq!(prev, &v, "paths disagree");
        }
        out = Some(v);
    }
    let v = out.unwrap();
    for (b, &pass) in bases.iter().zip(&v) {
        assert_eq!(pass, is_strong_probable_prime_to_base(n, b), "vs scalar");
    }
    v
}

fn small(b: u64) -> [u64; 1] {
    [b]
}

fn small_n<const N: usize>(b: u64) -> [u64; N] {
    let mut x = [0u64; N];
    x[0] = b;
    x
}

#[test]
fn lanes_carmichael_and_strong_pseudoprimes() {
    report_paths();
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
    // Base 2 for all eight in one call (lanes each with a different modulus): Fermat liars,
    // but the strong test sees through them.
    let ns: Vec<[u64; 1]> = carmichael.iter().map(|&n| small(n)).collect();
    for simd in paths() {
        let v = lanes::strong_probable_prime::<1>(simd, &ns, None);
        for (&n, &pass) in carmichael.iter().zip(&v) {
            assert_eq!(pass, is_strong_probable_prime_to_base(&[n], &[2]), "{n}");
        }
    }
    let spsp: [(u64, &[u64]); 4] = [
        (2047, &[2]),
        (3215031751, &[2, 3, 5, 7]),
        (2152302898747, &[2, 3, 5, 7, 11]),
        (
            3825123056546413051,
            &[2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31],
        ),
    ];
    for (n, fooled) in spsp {
        let bases: Vec<[u64; 1]> = fooled.iter().map(|&b| small(b)).collect();
        assert!(sprp_lanes(&small(n), &bases).iter().all(|&p| p), "{n}");
    }
    assert!(!sprp_lanes(&small(3825123056546413051), &[small(37)])[0]);
    assert!(!sprp_lanes(&small(2047), &[small(3)])[0]);
    // Base 2 through the pow2 path, mixed lanes: spsp(2) pass, a prime passes, others fail.
    let ns: Vec<[u64; 1]> = [2047u64, 3215031751, 65537, 561, 1105, 2152302898747]
        .iter()
        .map(|&n| small(n))
        .collect();
    for simd in paths() {
        let v = lanes::strong_probable_prime::<1>(simd, &ns, None);
        assert_eq!(v, vec![true, true, true, false, false, true], "{simd:?}");
    }
    // ψ₁₂: strong pseudoprime to every prime base up to 37.
    let psi12 = from_big::<2>(&big_dec("318665857834031151167461"));
    let bases: Vec<[u64; 2]> = [2u64, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]
        .iter()
        .map(|&b| small_n(b))
        .collect();
    assert!(sprp_lanes(&psi12, &bases).iter().all(|&p| p));
    assert!(!sprp_lanes(&psi12, &[small_n(41)])[0]);
}

/// Arnault's 1318-bit Carmichael number, a strong pseudoprime to every prime base below 307:
/// all 62 such bases pass in lanes, 307 fails, random bases are caught.
#[test]
fn lanes_arnault_carmichael() {
    report_paths();
    let n = big_dec(concat!(
        "2887148238050771212671429597130393991977609459279722700926516024197432303799152733116328983144639225941977",
        "8031109293496555784189494417409338056151139799994215424169339729054237110027510420801349667317551528592269",
        "6291677532547504444585610194940420003990443211677661994962953925045269871932907037356403227370127845389912",
        "6120309244841494728976885406024976768122077071687938121709811322297802059565867"
    ));
    let limbs = from_big::<21>(&n);
    let primes: Vec<[u64; 21]> = (2u64..307)
        .filter(|&p| (2..p).take_while(|d| d * d <= p).all(|d| p % d != 0))
        .map(small_n)
        .collect();
    assert_eq!(primes.len(), 62);
    assert!(sprp_lanes(&limbs, &primes).iter().all(|&p| p));
    assert!(!sprp_lanes(&limbs, &[small_n(307)])[0]);
    // Up to a quarter of all bases are strong liars for it: 16 random bases (two batches)
    // cannot all pass (probability ≤ 4⁻¹⁶), and each verdict matches the scalar engine.
    let randoms: Vec<[u64; 21]> = (0..16)
        .map(|_| from_big(&OsRng.gen_biguint_below(&n)))
        .collect();
    assert!(!sprp_lanes(&limbs, &randoms).iter().all(|&p| p));
}

/// 2^1021 − 1 and 2^2039 − 1 are composite strong pseudoprimes to base 2: the lanes' base-2
/// round passes them (in a batch with other lanes), random bases reject them.
#[test]
fn lanes_large_base2_pseudoprimes() {
    report_paths();
    let m1021 = (BigUint::one() << 1021) - 1u32;
    let l1021 = from_big::<16>(&m1021);
    let mut other = l1021;
    other[3] ^= 1 << 7; // an unrelated odd number in the next lane
    for simd in paths() {
        let v = lanes::strong_probable_prime::<16>(simd, &[l1021, other, l1021], None);
        assert_eq!(v, vec![true, false, true], "{simd:?}");
    }
    let randoms: Vec<[u64; 16]> = (0..8)
        .map(|_| from_big(&OsRng.gen_biguint_below(&m1021)))
        .collect();
    assert!(sprp_lanes(&l1021, &randoms).iter().all(|&p| !p));
    let m2039 = (BigUint::one() << 2039) - 1u32;
    let l2039 = from_big::<32>(&m2039);
    for simd in paths() {
        assert_eq!(
            lanes::strong_probable_prime::<32>(simd, &[l2039], None),
            vec![true]
        );
    }
    let randoms: Vec<[u64; 32]> = (0..3)
        .map(|_| from_big(&OsRng.gen_biguint_below(&m2039)))
        .collect();
    assert!(sprp_lanes(&l2039, &randoms).iter().all(|&p| !p));
}

/// Random odd 1024-bit numbers (mostly composite) and primes, eight lanes: lane verdicts equal
/// the scalar engine's and BPSW's for base 2 and random bases.
#[test]
fn lanes_verdicts_match_scalar_and_bpsw() {
    report_paths();
    let mut ns: Vec<[u64; 16]> = Vec::new();
    for _ in 0..5 {
        let mut x = [0u64; 16];
        for l in x.iter_mut() {
            *l = OsRng.next_u64();
        }
        x[0] |= 1;
        x[15] |= 1 << 63;
        ns.push(x);
    }
    for _ in 0..3 {
        ns.push(*keyfleet::prime::random_prime::<16>(&mut OsRng));
    }
    let bases: Vec<[u64; 16]> = ns
        .iter()
        .map(|n| from_big(&OsRng.gen_biguint_below(&to_big(n))))
        .collect();
    let two = small_n::<16>(2);
    for simd in paths() {
        let v2 = lanes::strong_probable_prime::<16>(simd, &ns, None);
        let vr = lanes::strong_probable_prime::<16>(simd, &ns, Some(&bases));
        for i in 0..ns.len() {
            let bpsw = probably_prime(&to_big(&ns[i]), 20);
            assert_eq!(v2[i], is_strong_probable_prime_to_base(&ns[i], &two));
            assert_eq!(vr[i], is_strong_probable_prime_to_base(&ns[i], &bases[i]));
            // Random 1024-bit odd numbers that pass are prime with overwhelming probability.
            assert_eq!(v2[i] && vr[i], bpsw, "{simd:?} lane {i}");
        }
    }
}

/// Primes from the lane search, on every path, confirmed by num-bigint-dig's BPSW.
#[test]
fn lane_search_primes_confirmed_by_bpsw() {
    report_paths();
    let e = BigUint::from(PUBLIC_EXPONENT);
    for simd in paths() {
        let counts: [usize; 3] = if simd == Simd::Scalar {
            [3, 1, 1]
        } else {
            [20, 4, 2]
        };
        let mut seen = std::collections::HashSet::new();
        for _ in 0..counts[0] {
            let p = lanes::search::<16>(simd, &mut OsRng).unwrap();
            let pb = to_big(&p);
            assert!(probably_prime(&pb, 20), "{simd:?}: {pb}");
            assert_eq!(pb.bits(), 1024);
            assert_eq!(p[15] >> 62, 0b11);
            assert!(!(&pb % &e - 1u32).is_zero() || (&pb % &e).is_zero());
            assert!(seen.insert(pb));
        }
        for _ in 0..counts[1] {
            let p = lanes::search::<24>(simd, &mut OsRng).unwrap();
            assert!(probably_prime(&to_big(&p), 20));
        }
        for _ in 0..counts[2] {
            let p = lanes::search::<32>(simd, &mut OsRng).unwrap();
            assert!(probably_prime(&to_big(&p), 20));
        }
        assert!(lanes::search::<8>(simd, &mut OsRng).is_none());
    }
}

/// A fixed amount of lane work for an instruction count (`perf stat -e instructions`, or
/// `valgrind --tool=callgrind` where the VM has no counters; release build): `LANES_ITERS`
/// (default 200) calls of one 8-lane 1024-bit modexp on `LANES_SIMD` (`scalar` lanes, IFMA, or
/// `engine`: the same eight modexps one after another on the 64-bit scalar engine's `pow`).
/// Counting with `LANES_ITERS=0` too and subtracting leaves the modexps alone.
/// `cargo test --release --test engine -- --ignored modexp_work`
#[test]
#[ignore = "work for an instruction count, release builds only"]
fn modexp_work() {
    let iters: usize = std::env::var("LANES_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let mode = std::env::var("LANES_SIMD").unwrap_or_default();
    let simd = match mode.as_str() {
        "scalar" | "engine" => Simd::Scalar,
        _ if lanes::ifma_available() => Simd::Avx512Ifma,
        _ => Simd::Scalar,
    };
    let mut m = [[0u64; 16]; 8];
    let mut a = [[0u64; 16]; 8];
    let mut e = [[0u64; 16]; 8];
    for i in 0..8 {
        for j in 0..16 {
            m[i][j] = OsRng.next_u64();
            a[i][j] = OsRng.next_u64();
            e[i][j] = OsRng.next_u64();
        }
        m[i][0] |= 1;
        m[i][15] |= 1 << 63;
        a[i][15] >>= 1;
    }
    let engines: Vec<Monty<16>> = m.iter().map(|m| Monty::new(m).unwrap()).collect();
    let t = std::time::Instant::now();
    let mut sink = 0u64;
    for _ in 0..iters {
        if mode == "engine" {
            for (i, ctx) in engines.iter().enumerate() {
                sink ^= ctx.pow(&a[i], &e[i])[0];
            }
        } else {
            sink ^= lanes::pow::<16>(simd, &m, &a, &e)[0][0];
        }
    }
    let per = t.elapsed().as_secs_f64() / (iters.max(1) * 8) as f64;
    let path = if mode == "engine" {
        "engine"
    } else {
        simd.as_str()
    };
    eprintln!(
        "{path}: {iters} × 8 lanes, {:.1} µs per modexp per lane ({sink:x})",
        per * 1e6
    );
}
