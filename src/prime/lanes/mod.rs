//! Multi-lane Montgomery exponentiation: [`LANES`] independent modular exponentiations in
//! lock-step, on 52-bit limbs, for the Miller-Rabin rounds of the prime search.
//!
//! # Layout
//! A number of up to 64·N bits is held in `L = ⌈(64N + 4)/52⌉` limbs of 52 bits (20, 30, 40
//! for 1024, 1536, 2048 bits), and a lane vector holds the same limb of eight numbers
//! ("vertical" layout), so lane `i` of every operation belongs to exponentiation `i` and lanes
//! never interact. With `R = 2^(52L) ≥ 16m`, almost-Montgomery products of inputs below `4m`
//! land below `2m`, so the hot loop has no conditional subtraction at all.
//!
//! # One algorithm, two instruction sets
//! `engine.rs` holds the algorithm (Montgomery product, fixed-window exponentiation with a
//! masked table scan, base-2 exponentiation by masked doublings, the Miller-Rabin verdict)
//! written once over fourteen lane primitives. It is expanded twice: over [`scalar`] (portable
//! Rust, `[u64; 8]`, the reference for the tests) and over `ifma` (AVX-512 IFMA:
//! `vpmadd52luq`/`vpmadd52huq` on `__m512i`, every function compiled with
//! `avx512f,avx512ifma`). [`dispatch`] picks one at run time; it is the crate's only `unsafe`.
//!
//! # Which path the prime search takes
//! With IFMA present (and `KEYFLEET_SIMD` not `off`), [`crate::prime::random_prime`] sieves as
//! before and hands survivors to the IFMA lanes eight at a time ([`random_prime`]). Without
//! it the search keeps today's scalar engine ([`crate::prime::monty`], 64-bit limbs, product
//! scanning with a dedicated squaring), which does the same work faster than eight scalar lanes
//! of 52-bit limbs would (more, smaller limb products, no squaring shortcut). The scalar lanes
//! stay the portable reference the IFMA lanes are tested against; [`Simd::Scalar`] in this
//! module's functions runs them.

mod dispatch;
#[macro_use]
mod engine;
#[cfg(target_arch = "x86_64")]
mod ifma;
mod scalar;

use std::sync::atomic::{AtomicU8, Ordering};

use rand_core::CryptoRngCore;
use zeroize::{Zeroize, Zeroizing};

use super::ct;
use super::miller_rabin::{rounds_for_bits, shr_secret, trailing_zeros, Candidate, S_MAX};
use super::monty::Monty;
use super::sieve::{uniform_below, Window};

/// Exponentiations per lane vector (512 bits of 64-bit lanes).
pub const LANES: usize = 8;
/// Bits per limb.
const LIMB_BITS: usize = 52;
const MASK52: u64 = (1 << LIMB_BITS) - 1;
/// Fixed exponent window of the lanes: 16 table entries (20 KiB at 1024 bits) stay in L1.
const WINDOW: usize = 4;

/// Limb-major lane data: `x[j][lane]` is limb `j` of lane `lane`'s number.
pub(crate) type Limbs<const L: usize> = [[u64; LANES]; L];

/// The instruction set the lanes run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    /// AVX-512 IFMA (`vpmadd52luq`/`vpmadd52huq`).
    Avx512Ifma,
    /// Portable code.
    Scalar,
}

impl Simd {
    /// `"avx512ifma"` or `"scalar"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Simd::Avx512Ifma => "avx512ifma",
            Simd::Scalar => "scalar",
        }
    }
}

/// Whether this CPU has AVX-512F and AVX-512 IFMA.
pub fn ifma_available() -> bool {
    dispatch::ifma_present()
}

/// 0: not decided yet, 1: scalar, 2: IFMA.
static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// The path the prime search uses: IFMA when the CPU has it, unless the environment variable
/// `KEYFLEET_SIMD` is `off` (also `0`, `false`, `scalar`). Decided once per process.
pub fn active() -> Simd {
    match ACTIVE.load(Ordering::Relaxed) {
        1 => Simd::Scalar,
        2 => Simd::Avx512Ifma,
        _ => {
            let off = std::env::var("KEYFLEET_SIMD").is_ok_and(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "off" | "0" | "false" | "scalar" | "no"
                )
            });
            let simd = if !off && ifma_available() {
                Simd::Avx512Ifma
            } else {
                Simd::Scalar
            };
            force(simd);
            simd
        }
    }
}

/// Sets the search path for the rest of the process (the IFMA request is ignored on a CPU
/// without it). For benchmarks and tests.
pub fn force(simd: Simd) {
    let v = if simd == Simd::Avx512Ifma && ifma_available() {
        2
    } else {
        1
    };
    ACTIVE.store(v, Ordering::Relaxed);
}

/// 52-bit limbs for `N` 64-bit limbs, or `None` for a size the lanes are not built for.
pub const fn limbs52(n: usize) -> Option<usize> {
    match n {
        1 => Some(2),
        2 => Some(3),
        3 => Some(4),
        4 => Some(5),
        8 => Some(10),
        16 => Some(20),
        21 => Some(26),
        24 => Some(30),
        32 => Some(40),
        _ => None,
    }
}

/// Calls `$f::<N, L>($args)` with `L = limbs52(N)`; only the matching arm is instantiated.
macro_rules! with_l {
    ($f:ident::<$n:ident>($($arg:expr),*)) => {
        match $n {
            1 => $f::<$n, 2>($($arg),*),
            2 => $f::<$n, 3>($($arg),*),
            3 => $f::<$n, 4>($($arg),*),
            4 => $f::<$n, 5>($($arg),*),
            8 => $f::<$n, 10>($($arg),*),
            16 => $f::<$n, 20>($($arg),*),
            21 => $f::<$n, 26>($($arg),*),
            24 => $f::<$n, 30>($($arg),*),
            32 => $f::<$n, 40>($($arg),*),
            _ => panic!("lane engine: no limb count for {} 64-bit limbs", $n),
        }
    };
}

/// `x` (64·N bits) in L limbs of 52 bits. Bit positions are public.
fn to52<const N: usize, const L: usize>(x: &[u64; N]) -> [u64; L] {
    let mut out = [0u64; L];
    for (j, o) in out.iter_mut().enumerate() {
        let low = j * LIMB_BITS;
        let (limb, off) = (low / 64, low % 64);
        if limb >= N {
            break;
        }
        let mut v = x[limb] >> off;
        if off + LIMB_BITS > 64 && limb + 1 < N {
            v |= x[limb + 1] << (64 - off);
        }
        *o = v & MASK52;
    }
    out
}

/// Inverse of [`to52`] for values below 2^(64N).
fn from52<const N: usize, const L: usize>(x: &[u64; L]) -> [u64; N] {
    let mut out = [0u64; N];
    for (j, &v) in x.iter().enumerate() {
        let low = j * LIMB_BITS;
        let (limb, off) = (low / 64, low % 64);
        if limb < N {
            out[limb] |= v << off;
        }
        if off + LIMB_BITS > 64 && limb + 1 < N {
            out[limb + 1] |= v >> (64 - off);
        }
    }
    out
}

/// Per-lane Montgomery constants, limb-major.
pub(crate) struct Params<const L: usize> {
    m: Limbs<L>,
    /// `−m⁻¹ mod 2^52`.
    k0: [u64; LANES],
    /// `R mod m`, `R = 2^(52L)`: 1 in Montgomery form.
    one: Limbs<L>,
    /// `R² mod m` (zero when not asked for: only needed to bring a base into Montgomery form).
    r2: Limbs<L>,
}

impl<const L: usize> Drop for Params<L> {
    fn drop(&mut self) {
        self.m.zeroize();
        self.k0.zeroize();
        self.one.zeroize();
        self.r2.zeroize();
    }
}

/// `2x mod m` for `x < m` (m odd, 64·N bits), a masked subtraction.
fn double_mod<const N: usize>(x: &[u64; N], m: &[u64; N]) -> [u64; N] {
    let mut t = [0u64; N];
    let mut carry = 0u64;
    for i in 0..N {
        t[i] = (x[i] << 1) | carry;
        carry = x[i] >> 63;
    }
    let (d, borrow) = ct::sub_limbs(&t, m);
    ct::select_limbs(ct::from_bit(carry | (borrow ^ 1)), &d, &t)
}

impl<const L: usize> Params<L> {
    /// Constants for eight odd moduli `≥ 3` of at most 64·N bits; `R² mod m` only `with_r2`.
    /// The only branch is on the modulus' top bit, set for every engine candidate (as in
    /// [`Monty::new`]).
    fn new<const N: usize>(moduli: &[[u64; N]; LANES], with_r2: bool) -> Self {
        assert!(LIMB_BITS * L >= 64 * N + 4, "lane engine needs R ≥ 16m");
        let extra = LIMB_BITS * L - 64 * N;
        let mut p = Params {
            m: [[0; LANES]; L],
            k0: [0; LANES],
            one: [[0; LANES]; L],
            r2: [[0; LANES]; L],
        };
        for (lane, m) in moduli.iter().enumerate() {
            let mut inv = 1u64;
            for _ in 0..6 {
                inv = inv.wrapping_mul(2u64.wrapping_sub(m[0].wrapping_mul(inv)));
            }
            p.k0[lane] = inv.wrapping_neg() & MASK52;
            let monty = (with_r2 || m[N - 1] >> 63 == 0).then(|| Monty::new(m).expect("odd ≥ 3"));
            // 2^(64N) mod m: for the top bit set, 2^(64N) − m (two's complement).
            let mut one = Zeroizing::new(match &monty {
                Some(mo) => *mo.one(),
                None => ct::sub_limbs(&[0; N], m).0,
            });
            for _ in 0..extra {
                *one = double_mod(&one, m);
            }
            let mut r2 = Zeroizing::new([0u64; N]);
            if let Some(mo) = &monty {
                *r2 = *mo.r2();
                for _ in 0..2 * extra {
                    *r2 = double_mod(&r2, m);
                }
            }
            let (m52, one52, r252) = (
                Zeroizing::new(to52::<N, L>(m)),
                Zeroizing::new(to52::<N, L>(&one)),
                Zeroizing::new(to52::<N, L>(&r2)),
            );
            for j in 0..L {
                p.m[j][lane] = m52[j];
                p.one[j][lane] = one52[j];
                p.r2[j][lane] = r252[j];
            }
        }
        p
    }
}

/// Transposes up to eight numbers into limb-major lanes; missing lanes are zero.
fn lanes_of<const N: usize, const L: usize>(xs: &[[u64; N]]) -> Zeroizing<Limbs<L>> {
    let mut out = Zeroizing::new([[0u64; LANES]; L]);
    for (lane, x) in xs.iter().enumerate().take(LANES) {
        let x52 = Zeroizing::new(to52::<N, L>(x));
        for j in 0..L {
            out[j][lane] = x52[j];
        }
    }
    out
}

/// Exponents, word-major: `e[w][lane]`.
fn exps_of<const N: usize>(xs: &[[u64; N]]) -> Zeroizing<[[u64; LANES]; N]> {
    let mut out = Zeroizing::new([[0u64; LANES]; N]);
    for (lane, x) in xs.iter().enumerate().take(LANES) {
        for w in 0..N {
            out[w][lane] = x[w];
        }
    }
    out
}

/// The public filler for empty lanes: `2^(64N) − 1`, odd with the top bit set.
const fn filler<const N: usize>() -> [u64; N] {
    [u64::MAX; N]
}

/// Up to eight moduli padded with the filler.
fn padded<const N: usize>(moduli: &[[u64; N]]) -> Zeroizing<[[u64; N]; LANES]> {
    assert!(moduli.len() <= LANES, "at most {LANES} lanes");
    let mut out = Zeroizing::new([filler::<N>(); LANES]);
    out[..moduli.len()].copy_from_slice(moduli);
    out
}

fn unlanes<const N: usize, const L: usize>(x: &Limbs<L>, count: usize) -> Vec<[u64; N]> {
    (0..count)
        .map(|lane| {
            let mut v = [0u64; L];
            for j in 0..L {
                v[j] = x[j][lane];
            }
            from52::<N, L>(&v)
        })
        .collect()
}

fn pow_n<const N: usize, const L: usize>(
    simd: Simd,
    m: &[[u64; N]],
    base: &[[u64; N]],
    exp: &[[u64; N]],
) -> Vec<[u64; N]> {
    let p = Params::<L>::new(&padded(m), true);
    let r = dispatch::pow(simd, &p, &lanes_of::<N, L>(base), &exps_of(exp));
    unlanes::<N, L>(&r, m.len())
}

fn pow2_n<const N: usize, const L: usize>(
    simd: Simd,
    m: &[[u64; N]],
    exp: &[[u64; N]],
) -> Vec<[u64; N]> {
    let p = Params::<L>::new(&padded(m), false);
    let r = dispatch::pow2(simd, &p, &exps_of(exp));
    unlanes::<N, L>(&r, m.len())
}

fn mul_n<const N: usize, const L: usize>(
    simd: Simd,
    m: &[[u64; N]],
    a: &[[u64; N]],
    b: &[[u64; N]],
) -> Vec<[u64; N]> {
    let p = Params::<L>::new(&padded(m), false);
    let r = dispatch::mul(simd, &p, &lanes_of::<N, L>(a), &lanes_of::<N, L>(b));
    unlanes::<N, L>(&r, m.len())
}

/// `d` and `s` of `n − 1 = d·2^s` per lane (constant-time in `n`).
fn d_and_s<const N: usize>(ns: &[[u64; N]; LANES]) -> (Zeroizing<[[u64; LANES]; N]>, [u64; LANES]) {
    let mut d = Zeroizing::new([[0u64; LANES]; N]);
    let mut s = [0u64; LANES];
    for (lane, n) in ns.iter().enumerate() {
        let mut n1 = Zeroizing::new(*n);
        n1[0] ^= 1; // odd: n − 1 clears bit 0
        s[lane] = trailing_zeros(&n1);
        let dl = Zeroizing::new(shr_secret(&n1, s[lane]));
        for w in 0..N {
            d[w][lane] = dl[w];
        }
    }
    (d, s)
}

fn sprp_n<const N: usize, const L: usize>(
    simd: Simd,
    ns: &[[u64; N]],
    bases: Option<&[[u64; N]]>,
) -> Vec<bool> {
    let padded = padded(ns);
    let p = Params::<L>::new(&padded, bases.is_some());
    let (d, s) = d_and_s(&padded);
    let b = bases.map(lanes_of::<N, L>);
    let pass = dispatch::miller_rabin(simd, &p, b.as_deref(), &d, &s, 64 * N as u64, None);
    pass[..ns.len()].iter().map(|&m| m != 0).collect()
}

/// `base[i]^exp[i] mod m[i]` for up to eight lanes (odd moduli `≥ 3`, bases `< m`), on `simd`.
/// Supported sizes: N ∈ {1, 2, 3, 4, 8, 16, 21, 24, 32}. Used by the key assembly's pair-wise
/// consistency test (`rsa_ct`), tests and benchmarks.
pub fn pow<const N: usize>(
    simd: Simd,
    m: &[[u64; N]],
    base: &[[u64; N]],
    exp: &[[u64; N]],
) -> Vec<[u64; N]> {
    with_l!(pow_n::<N>(simd, m, base, exp))
}

/// `2^exp[i] mod m[i]` for up to eight lanes.
pub fn pow2<const N: usize>(simd: Simd, m: &[[u64; N]], exp: &[[u64; N]]) -> Vec<[u64; N]> {
    with_l!(pow2_n::<N>(simd, m, exp))
}

/// Montgomery products `a[i]·b[i]·R⁻¹ mod m[i]` with `R = 2^(52·limbs52(N))`, `a, b < m`.
pub fn mont_mul<const N: usize>(
    simd: Simd,
    m: &[[u64; N]],
    a: &[[u64; N]],
    b: &[[u64; N]],
) -> Vec<[u64; N]> {
    with_l!(mul_n::<N>(simd, m, a, b))
}

/// Strong probable-prime tests of odd `n[i] ≥ 3`, to base 2 (`bases` = `None`) or to
/// `bases[i]` (`1 < base < n`), every `s` handled. Up to eight lanes.
pub fn strong_probable_prime<const N: usize>(
    simd: Simd,
    n: &[[u64; N]],
    bases: Option<&[[u64; N]]>,
) -> Vec<bool> {
    with_l!(sprp_n::<N>(simd, n, bases))
}

/// A prime with the private half of its key's pair-wise consistency test: `crt` =
/// e⁻¹ mod (p − 1) (the key's dp or dq) and `half` = 2^crt mod p, computed in a lane the
/// prime's own random-base pass leaves free (see [`crate::prime::rsa_ct`]).
pub(crate) struct PrimeHalf<const N: usize> {
    pub prime: Zeroizing<[u64; N]>,
    pub crt: Zeroizing<[u64; N]>,
    pub half: Zeroizing<[u64; N]>,
}

/// Miller-Rabin with `rounds` random bases on one candidate, the bases in lanes. `None` when
/// the candidate is composite. With `crt` (an exponent below n), `2^crt mod n` is computed too
/// — in a free lane of the last pass, else in a pass of its own — and returned.
fn random_rounds<const N: usize, const L: usize>(
    simd: Simd,
    n: &[u64; N],
    rounds: usize,
    rng: &mut impl CryptoRngCore,
    crt: Option<&[u64; N]>,
) -> Option<Option<Zeroizing<[u64; N]>>> {
    let cand = Candidate::new(n)?;
    let all = Zeroizing::new([*n; LANES]);
    let p = Params::<L>::new(&all, true);
    let (mut d, s) = d_and_s(&all);
    let mut half = None;
    let mut done = 0;
    while done < rounds {
        let count = (rounds - done).min(LANES);
        // Unused lanes test the public base 1 and are ignored.
        let mut bases = Zeroizing::new([[0u64; N]; LANES]);
        for b in bases.iter_mut() {
            b[0] = 1;
        }
        for b in bases.iter_mut().take(count) {
            *b = *cand.random_base(rng);
        }
        // The last pass carries 2^crt in its first free lane (base 2, exponent crt).
        let extra = crt.filter(|_| done + count == rounds && count < LANES);
        if let Some(e) = extra {
            bases[count] = [0; N];
            bases[count][0] = 2;
            for (w, word) in e.iter().enumerate() {
                d[w][count] = *word;
            }
        }
        let b = lanes_of::<N, L>(&bases[..]);
        let mut first = Zeroizing::new([[0u64; LANES]; L]);
        let keep = extra.is_some().then_some(&mut *first);
        let pass = dispatch::miller_rabin(simd, &p, Some(&b), &d, &s, S_MAX, keep);
        if pass[..count].contains(&0) {
            return None;
        }
        if extra.is_some() {
            let out = Zeroizing::new(unlanes::<N, L>(&first, count + 1));
            half = Some(Zeroizing::new(out[count]));
        }
        done += count;
    }
    if let (Some(e), None) = (crt, &half) {
        // Every lane of the last pass held a round: one pass of its own.
        let out = Zeroizing::new(pow2_n::<N, L>(simd, &[*n], &[*e]));
        half = Some(Zeroizing::new(out[0]));
    }
    Some(half)
}

/// The prime search of [`crate::prime::random_prime`] on the lanes: survivors are drawn from
/// the window in the same uniformly random order, eight at a time, and get their base-2 round
/// together; the first survivor of that round in draw order gets its random-base rounds, also
/// in lanes. The candidates drawn after the one that becomes the prime were tested too and are
/// dropped: their verdicts concern other, uniformly random secret positions (see the module
/// documentation of [`crate::prime`]). The output is the first prime of the random order, as
/// in the one-at-a-time search. `with_half`: each survivor of the base-2 round also gets its
/// CRT exponent and that exponent's half of the pair-wise test ([`PrimeHalf`]).
fn search_prime<const N: usize, const L: usize>(
    simd: Simd,
    rng: &mut impl CryptoRngCore,
    with_half: bool,
) -> PrimeHalf<N> {
    let bits = 64 * N;
    let width = (bits / 2).max(32);
    let rounds = rounds_for_bits(bits);
    loop {
        let mut window = Window::<N>::new(rng, width);
        while window.live() > 0 {
            let mut batch = Zeroizing::new([filler::<N>(); LANES]);
            let mut count = 0;
            while count < LANES && window.live() > 0 {
                let k = uniform_below(rng, window.live());
                let (c, carry) = window.take(k);
                if carry != 0 {
                    continue; // ran past 2^(64N): only when base is within 2W of it
                }
                batch[count] = *c;
                count += 1;
            }
            if count == 0 {
                continue;
            }
            let p = Params::<L>::new(&batch, false);
            let (d, s) = d_and_s(&batch);
            let pass = dispatch::miller_rabin::<N, L>(simd, &p, None, &d, &s, S_MAX, None);
            for lane in 0..count {
                if pass[lane] == 0 {
                    continue;
                }
                // The sieve keeps e ∤ n − 1, so the exponent exists for every candidate.
                let crt = if with_half {
                    match crate::prime::inverse::crt_exponent::<N>(&batch[lane]) {
                        Some(e) => Some(e),
                        None => continue,
                    }
                } else {
                    None
                };
                if let Some(half) =
                    random_rounds::<N, L>(simd, &batch[lane], rounds, rng, crt.as_deref())
                {
                    return PrimeHalf {
                        prime: Zeroizing::new(batch[lane]),
                        crt: crt.unwrap_or_else(|| Zeroizing::new([0; N])),
                        half: half.unwrap_or_else(|| Zeroizing::new([0; N])),
                    };
                }
            }
        }
    }
}

/// [`search_prime`] without the pair-wise halves.
pub(crate) fn random_prime<const N: usize, const L: usize>(
    simd: Simd,
    rng: &mut impl CryptoRngCore,
) -> Zeroizing<[u64; N]> {
    search_prime::<N, L>(simd, rng, false).prime
}

/// The lane prime search on `simd` for the sizes the engine uses (N = 16, 24, 32), `None` for
/// others. [`crate::prime::random_prime`] calls it under IFMA; public for tests.
pub fn search<const N: usize>(
    simd: Simd,
    rng: &mut impl CryptoRngCore,
) -> Option<Zeroizing<[u64; N]>> {
    match N {
        16 => Some(random_prime::<N, 20>(simd, rng)),
        24 => Some(random_prime::<N, 30>(simd, rng)),
        32 => Some(random_prime::<N, 40>(simd, rng)),
        _ => None,
    }
}

/// [`search`] with the prime's half of the key's pair-wise consistency test ([`PrimeHalf`]).
pub(crate) fn search_with_half<const N: usize>(
    simd: Simd,
    rng: &mut impl CryptoRngCore,
) -> Option<PrimeHalf<N>> {
    match N {
        16 => Some(search_prime::<N, 20>(simd, rng, true)),
        24 => Some(search_prime::<N, 30>(simd, rng, true)),
        32 => Some(search_prime::<N, 40>(simd, rng, true)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limb_conversion_roundtrip() {
        let x: [u64; 16] =
            core::array::from_fn(|i| (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let y = to52::<16, 20>(&x);
        assert!(y.iter().all(|&l| l <= MASK52));
        assert_eq!(from52::<16, 20>(&y), x);
        for n in [1usize, 2, 3, 4, 8, 16, 21, 24, 32] {
            let l = limbs52(n).unwrap();
            assert!(LIMB_BITS * l >= 64 * n + 4 && LIMB_BITS * (l - 1) < 64 * n + 4);
        }
    }

    #[test]
    fn small_lanes_both_paths() {
        for simd in [Simd::Scalar, Simd::Avx512Ifma] {
            let r = pow::<1>(simd, &[[561], [1000003]], &[[100], [2]], &[[3], [1000002]]);
            assert_eq!(r, vec![[100 * 100 * 100 % 561], [1]]);
            assert_eq!(pow2::<1>(simd, &[[561]], &[[560]]), vec![[1]]);
            let v = strong_probable_prime::<1>(simd, &[[2047], [2047], [65537], [561]], None);
            assert_eq!(v, vec![true, true, true, false]);
            let v = strong_probable_prime::<1>(simd, &[[2047], [65537]], Some(&[[3], [3]]));
            assert_eq!(v, vec![false, true]);
        }
    }
}
