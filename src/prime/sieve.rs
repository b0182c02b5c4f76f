//! Constant-time incremental sieve over a window of prime candidates `base + 2j`, `0 ≤ j < W`.
//!
//! Per window: `base mod q` for every odd prime `q < 2¹⁶` (6541 of them) is computed once, with
//! multiply-based (Barrett) reductions rather than `div`, whose latency depends on its operands.
//! Then, for each position `j` in order, every residue is tested for zero and advanced by 2
//! (a masked subtraction of `q`). The inner loop runs over the whole residue table with the
//! same operations whatever the values, in 16-bit lanes LLVM vectorizes. Two more conditions are
//! sieved the same way: `c ≢ 1 (mod 65537)`, i.e. `gcd(e, c − 1) = 1` for `e = 65537` prime, and
//! `c ≢ 1 (mod 2^(S_MAX+1))`, the cap on `s` that lets Miller-Rabin run a fixed number of
//! squarings. The verdicts go to a byte per position.
//!
//! No memory address depends on a residue: a classical sieve that strides through the window
//! from `(−base) mod q` would reveal `base mod q` for every `q` through the cache, and with it
//! (CRT) most of the final prime. Candidates are then drawn from the surviving positions in a
//! uniformly random order, by a masked scan of the whole flag array ([`Window::take`]).

use std::sync::OnceLock;

use rand_core::CryptoRngCore;
use zeroize::{Zeroize, Zeroizing};

use super::ct;
use super::miller_rabin::S_MAX;

/// Sieving primes are the odd primes below this bound.
pub const SIEVE_BOUND: u32 = 1 << 16;
/// The table is padded to a multiple of this many 16-bit lanes (copies of 3).
const LANES: usize = 16;
/// The RSA public exponent, prime.
const E: u64 = 65537;

/// A modulus with its Barrett constant `⌊2⁶⁴ / q⌋`.
#[derive(Clone, Copy)]
struct Modulus {
    q: u64,
    m: u64,
}

impl Modulus {
    fn new(q: u64) -> Self {
        // q is odd and > 1, so ⌊(2⁶⁴−1)/q⌋ = ⌊2⁶⁴/q⌋.
        Modulus { q, m: u64::MAX / q }
    }

    /// `x mod q` for any `x` and `q < 2³³`, without `div`. The estimate
    /// `⌊x·m / 2⁶⁴⌋` is `⌊x/q⌋` or one less, so one masked subtraction finishes.
    #[inline(always)]
    fn reduce(self, x: u64) -> u64 {
        let est = ((x as u128 * self.m as u128) >> 64) as u64;
        let r = x - est * self.q;
        let below = (r.wrapping_sub(self.q) >> 63).wrapping_neg();
        r - (self.q & !below)
    }
}

struct Table {
    /// Odd primes below [`SIEVE_BOUND`], then copies of 3 up to a multiple of [`LANES`].
    primes: Vec<u16>,
    /// Number of real primes at the front of `primes`.
    real: usize,
    /// Products of consecutive pairs of primes (below 2³²), for computing residues two at a time.
    pairs: Vec<(Modulus, Modulus, Modulus)>,
}

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        let bound = SIEVE_BOUND as usize;
        let mut composite = vec![false; bound];
        let mut primes = Vec::new();
        for n in 3..bound {
            if !n.is_multiple_of(2) && !composite[n] {
                primes.push(n as u16);
                for k in (n * n..bound).step_by(2 * n) {
                    composite[k] = true;
                }
            }
        }
        let real = primes.len();
        let pairs = primes
            .chunks(2)
            .map(|c| {
                let q1 = c[0] as u64;
                let q2 = c.get(1).map_or(3, |&q| q as u64);
                (Modulus::new(q1 * q2), Modulus::new(q1), Modulus::new(q2))
            })
            .collect();
        while primes.len() % LANES != 0 {
            primes.push(3);
        }
        Table {
            primes,
            real,
            pairs,
        }
    })
}

/// Number of sieving primes (for documentation and tests).
pub fn sieve_prime_count() -> usize {
    table().real
}

/// `x mod q` for every table entry (padding included), in constant time.
fn residues<const N: usize>(x: &[u64; N]) -> Zeroizing<Vec<u16>> {
    let t = table();
    let mut acc = Zeroizing::new(vec![0u64; t.pairs.len()]);
    // Horner over 32-bit chunks, most significant first; r < Q < 2³² keeps r·2³² + chunk < 2⁶⁴.
    // Chunks outside, pairs inside: the pairs are independent, so the loop is throughput-bound.
    for &limb in x.iter().rev() {
        for chunk in [limb >> 32, limb & 0xffff_ffff] {
            for (r, (pq, _, _)) in acc.iter_mut().zip(&t.pairs) {
                *r = pq.reduce((*r << 32) | chunk);
            }
        }
    }
    let mut out = Zeroizing::new(vec![0u16; t.primes.len()]);
    for (i, (r, (_, q1, q2))) in acc.iter().zip(&t.pairs).enumerate() {
        out[2 * i] = q1.reduce(*r) as u16;
        if 2 * i + 1 < t.real {
            out[2 * i + 1] = q2.reduce(*r) as u16;
        }
    }
    for i in t.real..out.len() {
        out[i] = out[0]; // padding lanes hold 3, like entry 0
    }
    out
}

/// One window of candidates and the sieve's verdict on each.
pub(crate) struct Window<const N: usize> {
    base: [u64; N],
    /// 1 for a position that survived the sieve and has not been taken yet.
    flags: Vec<u8>,
    live: usize,
}

impl<const N: usize> Drop for Window<N> {
    fn drop(&mut self) {
        self.base.zeroize();
        self.flags.zeroize();
    }
}

impl<const N: usize> Window<N> {
    /// A fresh random window of `width` odd candidates of exactly 64·N bits with the top two
    /// bits set, sieved.
    pub(crate) fn new(rng: &mut impl CryptoRngCore, width: usize) -> Self {
        let mut base = [0u64; N];
        for l in base.iter_mut() {
            *l = rng.next_u64();
        }
        base[N - 1] |= 0b11 << 62;
        base[0] |= 1;
        let mut w = Window {
            base,
            flags: vec![0u8; width],
            live: 0,
        };
        w.sieve();
        w
    }

    fn sieve(&mut self) {
        let t = table();
        let mut res = residues(&self.base);
        let e = Modulus::new(E);
        let mut r_e = Zeroizing::new(self.base.iter().rev().fold(0u64, |r, &l| {
            e.reduce(e.reduce((r << 32) | (l >> 32)) << 32 | (l & 0xffff_ffff))
        }));
        let low_mask = (1u64 << (S_MAX + 1)) - 1;
        let mut low = Zeroizing::new(self.base[0] & low_mask);
        let mut live = 0usize;
        for flag in self.flags.iter_mut() {
            let mut hit = 0u16;
            for (r, &q) in res.iter_mut().zip(&t.primes) {
                hit |= (*r == 0) as u16;
                let x = *r + 2;
                let wrap = (((x == q) as u16) | ((x == q + 1) as u16)).wrapping_neg();
                *r = x - (q & wrap);
            }
            let bad = !ct::is_zero(hit as u64) | ct::eq(*r_e, 1) | ct::eq(*low, 1);
            *r_e = e.reduce(*r_e + 2);
            *low = (*low + 2) & low_mask;
            let ok = 1 & !bad;
            *flag = ok as u8;
            live += ok as usize;
        }
        self.live = live;
    }

    /// Positions not yet taken that survived the sieve.
    pub(crate) fn live(&self) -> usize {
        self.live
    }

    /// Removes the `k`-th (`k < live`) surviving position `j` and returns `base + 2j` and the
    /// carry out of the top limb. `j` is found and cleared by scanning every flag with masks.
    pub(crate) fn take(&mut self, k: usize) -> (Zeroizing<[u64; N]>, u64) {
        let k = k as u64;
        let mut count = 0u64;
        let mut pos = 0u64;
        for (i, &f) in self.flags.iter().enumerate() {
            let f = f as u64;
            pos |= (i as u64) & ct::eq(count, k) & f.wrapping_neg();
            count += f;
        }
        for (i, f) in self.flags.iter_mut().enumerate() {
            *f &= !(ct::eq(i as u64, pos) as u8);
        }
        self.live -= 1;
        let (c, carry) = ct::add_small(&self.base, 2 * pos);
        pos.zeroize();
        (Zeroizing::new(c), carry)
    }
}

/// Index below a public `0 < n ≤ 2³²`, as `⌊v·n / 2⁶⁴⌋` for a random 64-bit `v`: no `%` or
/// `div` on the secret `v`, no rejection loop, and at most `n / 2⁶⁴ ≤ 2⁻³²` from uniform.
pub(crate) fn uniform_below(rng: &mut impl CryptoRngCore, n: usize) -> usize {
    let v = rng.next_u64();
    ((v as u128 * n as u128) >> 64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_primes_below_2_16() {
        assert_eq!(sieve_prime_count(), 6541);
        let t = table();
        assert_eq!(t.primes[0], 3);
        assert_eq!(t.primes[t.real - 1], 65521);
        assert_eq!(t.primes.len() % LANES, 0);
    }

    #[test]
    fn residues_match_division() {
        let x = [
            0x0123_4567_89ab_cdefu64,
            0xfedc_ba98_7654_3210,
            0xdead_beef_cafe_f00d,
        ];
        let r = residues(&x);
        let t = table();
        for (i, &q) in t.primes[..t.real].iter().enumerate() {
            let q = q as u128;
            let expect = x
                .iter()
                .rev()
                .fold(0u128, |acc, &l| ((acc << 64) | l as u128) % q);
            assert_eq!(r[i] as u128, expect, "q = {q}");
        }
    }

    #[test]
    fn sieve_flags_match_trial_division() {
        let mut rng = rand_core::OsRng;
        let mut w = Window::<2>::new(&mut rng, 64);
        let base = w.base;
        let flags = w.flags.clone();
        for (j, &f) in flags.iter().enumerate() {
            let c = ((base[1] as u128) << 64 | base[0] as u128) + 2 * j as u128;
            let divisible = table().primes.iter().any(|&q| c.is_multiple_of(q as u128));
            let bad = divisible || c % 65537 == 1 || c % (1 << (S_MAX + 1)) == 1;
            assert_eq!(f == 1, !bad, "position {j}");
        }
        let live = w.live();
        assert_eq!(live, flags.iter().filter(|&&f| f == 1).count());
        let mut seen = std::collections::BTreeSet::new();
        while w.live() > 0 {
            let k = uniform_below(&mut rng, w.live());
            let (c, carry) = w.take(k);
            assert_eq!(carry, 0);
            let j = (((c[1] as u128) << 64 | c[0] as u128)
                - ((base[1] as u128) << 64 | base[0] as u128))
                / 2;
            assert_eq!(flags[j as usize], 1);
            assert!(seen.insert(j));
        }
        assert_eq!(seen.len(), live);
    }
}
