//! Constant-time Miller-Rabin (strong probable prime) rounds on fixed-size candidates.
//!
//! For a candidate `n` with `n − 1 = d·2^s`, `s` is found by a masked scan of all 64·N bits and
//! `d` by a barrel shift whose stages are masked selects, so neither `s` nor `d` shape control
//! flow. `a^d` always processes all 64·N exponent bits. The chain of squarings that follows is
//! run a fixed, public number of times (`max_s − 1`), and a squaring only counts towards the
//! verdict when a masked comparison says `j < s`. The caller learns one bit per round: pass or
//! fail.
//!
//! The engine caps `s` at [`S_MAX`] (its sieve drops candidates `≡ 1 mod 2^(S_MAX+1)`, 1 in 1024
//! primes; the loss of entropy is about 0.0014 bits), so a round costs `64·N + S_MAX − 1`
//! squarings instead of `2·64·N` for a loop padded to the largest possible `s`. The general entry
//! points here use `max_s = 64·N`, which handles every `s`. (Were `max_s` ever below `s`, a round
//! could only reject more often: a "probable prime" verdict is never weakened.)

use rand_core::CryptoRngCore;
use zeroize::{Zeroize, Zeroizing};

use super::ct;
use super::monty::Monty;

/// Largest `s` (trailing zeros of `p − 1`) of an engine prime.
pub const S_MAX: u64 = 10;

/// Miller-Rabin rounds with random bases for a prime of `bits` bits.
///
/// FIPS 186-5 Table B.1 (derived in its Appendix C.1 from the Damgård–Landrock–Pomerance
/// average-case bound) asks, for primes p and q of an RSA modulus: 1024-bit, 4 rounds for error
/// 2⁻¹⁰⁰ and 5 for 2⁻¹¹²; 1536-bit, 3 / 4 (2⁻¹²⁸); 2048-bit, 2 / 4 (2⁻¹⁴⁴). We use the right-hand
/// column (error at most 2⁻¹¹², 2⁻¹²⁸, 2⁻¹⁴⁴ respectively; the DLP bound itself gives 2⁻¹²⁰ for
/// 5 rounds at 1024 bits), which is stricter than the 2⁻¹⁰⁰ the issue requires. The fixed
/// base-2 round the engine runs first is a filter and is not counted. Smaller sizes (tests
/// only): 8 rounds from 512 bits (DLP: < 2⁻¹⁰⁰), else 50 (worst case 4⁻⁵⁰ = 2⁻¹⁰⁰ for any input).
pub fn rounds_for_bits(bits: usize) -> usize {
    match bits {
        b if b >= 1536 => 4,
        b if b >= 1024 => 5,
        b if b >= 512 => 8,
        _ => 50,
    }
}

/// A candidate prepared for Miller-Rabin rounds.
pub(crate) struct Candidate<const N: usize> {
    monty: Monty<N>,
    /// `(n − 1) / 2^s`.
    d: [u64; N],
    /// Trailing zero bits of `n − 1`.
    s: u64,
}

impl<const N: usize> Drop for Candidate<N> {
    fn drop(&mut self) {
        self.d.zeroize();
        self.s.zeroize();
    }
}

impl<const N: usize> Candidate<N> {
    /// `None` when `n` is even or below 3.
    pub(crate) fn new(n: &[u64; N]) -> Option<Self> {
        let monty = Monty::new(n)?;
        let mut n1 = *n;
        n1[0] ^= 1; // n is odd: n − 1 just clears bit 0
        let s = trailing_zeros(&n1);
        let d = shr_secret(&n1, s);
        n1.zeroize();
        Some(Candidate { monty, d, s })
    }

    /// Strong probable-prime test to base 2.
    pub(crate) fn round_base2(&self, max_s: u64) -> bool {
        let y = self.monty.pow2(&self.d);
        self.finish(y, max_s)
    }

    /// Strong probable-prime test to `base` (ordinary form, `base < n`).
    pub(crate) fn round_base(&self, base: &[u64; N], max_s: u64) -> bool {
        let b = Zeroizing::new(self.monty.to_mont(base));
        let y = self.monty.pow(&b, &self.d);
        self.finish(y, max_s)
    }

    /// Strong probable-prime test to a random base. The base is `b mod n` for `b` uniform below
    /// `2^(64N+64)`, within statistical distance 2⁻⁶⁴ of uniform mod n, and computed without
    /// rejection sampling (which would branch on a comparison with `n`): `b·R mod n` is
    /// `mont(lo, R²) + mont(hi, R³)` for `b = lo + hi·R`.
    pub(crate) fn round_random(&self, rng: &mut impl CryptoRngCore, max_s: u64) -> bool {
        let base = self.random_base_mont(rng);
        let y = self.monty.pow(&base, &self.d);
        self.finish(y, max_s)
    }

    /// The random base of [`Self::round_random`], in ordinary form (for the lane engine).
    pub(crate) fn random_base(&self, rng: &mut impl CryptoRngCore) -> Zeroizing<[u64; N]> {
        let base = self.random_base_mont(rng);
        Zeroizing::new(self.monty.from_mont(&base))
    }

    /// A random base in Montgomery form, as described at [`Self::round_random`].
    fn random_base_mont(&self, rng: &mut impl CryptoRngCore) -> Zeroizing<[u64; N]> {
        let mut lo = Zeroizing::new([0u64; N]);
        for l in lo.iter_mut() {
            *l = rng.next_u64();
        }
        let mut hi = Zeroizing::new([0u64; N]);
        hi[0] = rng.next_u64();
        let r3 = Zeroizing::new(self.monty.mul(self.monty.r2(), self.monty.r2()));
        let a = Zeroizing::new(self.monty.mul(&lo, self.monty.r2()));
        let b = Zeroizing::new(self.monty.mul(&hi, &r3));
        Zeroizing::new(self.monty.add(&a, &b))
    }

    /// Given `y = a^d` (Montgomery form): passes when `y = ±1` or `y^(2^j) = −1` for some
    /// `1 ≤ j < s`, looking at `j < max_s` only.
    fn finish(&self, mut y: [u64; N], max_s: u64) -> bool {
        let mut pass =
            ct::eq_limbs(&y, self.monty.one()) | ct::eq_limbs(&y, self.monty.minus_one());
        for j in 1..max_s {
            y = self.monty.sqr(&y);
            pass |= ct::eq_limbs(&y, self.monty.minus_one()) & ct::lt_small(j, self.s);
        }
        y.zeroize();
        pass != 0
    }
}

/// Trailing zero bits of a nonzero `x`, by a masked scan of every bit.
pub(crate) fn trailing_zeros<const N: usize>(x: &[u64; N]) -> u64 {
    let mut count = 0u64;
    let mut seen = 0u64;
    for &limb in x.iter() {
        for bit in 0..64 {
            seen |= ((limb >> bit) & 1).wrapping_neg();
            count += 1 & !seen;
        }
    }
    count
}

/// `x >> s` for a secret `s < 64·N`: one masked stage per bit of `s`.
pub(crate) fn shr_secret<const N: usize>(x: &[u64; N], s: u64) -> [u64; N] {
    let mut out = *x;
    let mut stage = 0;
    while (1usize << stage) < 64 * N {
        let shifted = shr_public(&out, 1 << stage);
        out = ct::select_limbs(ct::from_bit(s >> stage), &shifted, &out);
        stage += 1;
    }
    out
}

/// `x >> k` for a public `k`.
fn shr_public<const N: usize>(x: &[u64; N], k: usize) -> [u64; N] {
    let q = k / 64;
    let r = k % 64;
    let mut out = [0u64; N];
    for i in 0..N {
        let lo = if i + q < N { x[i + q] } else { 0 };
        let hi = if i + q + 1 < N { x[i + q + 1] } else { 0 };
        out[i] = if r == 0 {
            lo
        } else {
            (lo >> r) | (hi << (64 - r))
        };
    }
    out
}

/// Miller-Rabin with `rounds` random bases on any `n` (little-endian limbs). Not a building
/// block of the engine's search but the same constant-time rounds, exposed for tests and for
/// callers that must check an outside number. Numbers below 2³² are decided by trial division,
/// since a random base is then too likely to be `0` or `±1 mod n`.
pub fn is_probable_prime<const N: usize>(
    n: &[u64; N],
    rounds: usize,
    rng: &mut impl CryptoRngCore,
) -> bool {
    if N == 0 {
        return false;
    }
    let upper = n[1..].iter().fold(0u64, |acc, &l| acc | l);
    if upper == 0 && n[0] < 1 << 32 {
        let v = n[0];
        return v >= 2
            && (2..)
                .take_while(|f| f * f <= v)
                .all(|f| !v.is_multiple_of(f));
    }
    let Some(c) = Candidate::new(n) else {
        return false; // even
    };
    let max_s = 64 * N as u64;
    (0..rounds).all(|_| c.round_random(rng, max_s))
}

/// One strong probable-prime test of odd `n ≥ 3` to `base` (`1 < base < n`); false for even `n`.
pub fn is_strong_probable_prime_to_base<const N: usize>(n: &[u64; N], base: &[u64; N]) -> bool {
    match Candidate::new(n) {
        Some(c) => c.round_base(base, 64 * N as u64),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifts_and_zeros() {
        let x = [0u64, 0b1000, 7];
        assert_eq!(trailing_zeros(&x), 67);
        assert_eq!(shr_secret(&x, 67), [1 | (7 << 61), 0, 0]);
        assert_eq!(shr_secret(&x, 0), x);
        assert_eq!(shr_public(&x, 64), [0b1000, 7, 0]);
    }

    #[test]
    fn small_cases() {
        let mut rng = rand_core::OsRng;
        // 2047 = 23·89 is the smallest strong pseudoprime to base 2.
        assert!(Candidate::new(&[2047u64]).unwrap().round_base2(64));
        assert!(!is_probable_prime(&[2047u64], 20, &mut rng));
        assert!(is_probable_prime(&[65537u64], 20, &mut rng));
        assert!(is_probable_prime(&[(1u64 << 61) - 1], 20, &mut rng));
        assert!(!is_probable_prime(&[561u64], 20, &mut rng));
        assert!(is_strong_probable_prime_to_base(&[2047u64], &[2]));
        assert!(!is_strong_probable_prime_to_base(&[2047u64], &[3]));
    }
}
