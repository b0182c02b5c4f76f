//! Fixed-size Montgomery arithmetic modulo an odd N-limb (64·N-bit) modulus.
//!
//! The engine's hot loop is modular squaring of 1024-, 1536- or 2048-bit numbers, so the sizes
//! are const generics (`N` = 16, 24, 32 limbs of 64 bits) and LLVM sees fixed trip counts.
//! Multiplication and squaring use the "finely integrated product scanning" (FIPS) form of
//! Montgomery multiplication: one column of partial products at a time into a three-word
//! accumulator, interleaving the reduction, so no 2N-limb intermediate is needed. Squaring
//! computes each off-diagonal product once and doubles the column, saving about a quarter of
//! the multiplications.
//!
//! Everything here is constant-time in the operands (including the modulus): loop bounds depend
//! only on `N`, exponent digits select table entries by scanning the whole table with masks, and
//! conditional subtractions are masked selects. The only data-dependent choices are in
//! [`Monty::new`]: whether the modulus is even or below 3, and whether its top bit is set. Both
//! go the same way for every engine candidate (odd, top two bits set by construction), so they
//! reveal nothing; the general path exists for tests and outside numbers.

use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::ct;

/// Width in bits of the fixed exponent window.
const WINDOW: usize = 5;
/// Entries of the window table.
const TABLE: usize = 1 << WINDOW;

/// Montgomery context for one odd modulus `m` of at most 64·N bits, with `R = 2^(64·N)`.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Monty<const N: usize> {
    m: [u64; N],
    /// `-m⁻¹ mod 2⁶⁴`.
    m_inv: u64,
    /// `R mod m`: 1 in Montgomery form.
    one: [u64; N],
    /// `m - (R mod m)`: −1 in Montgomery form.
    minus_one: [u64; N],
    /// `R² mod m`, to enter Montgomery form.
    r2: [u64; N],
}

impl<const N: usize> std::fmt::Debug for Monty<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The modulus may be a secret prime candidate.
        f.write_str("Monty { .. }")
    }
}

/// Adds the 128-bit product `x·y` into the accumulator `(lo, hi)` (192 bits in all).
#[inline(always)]
fn mac(lo: &mut u128, hi: &mut u64, x: u64, y: u64) {
    let p = (x as u128) * (y as u128);
    let (s, c) = lo.overflowing_add(p);
    *lo = s;
    *hi += c as u64;
}

/// Shifts the accumulator right by one word.
#[inline(always)]
fn shift(lo: &mut u128, hi: &mut u64) {
    *lo = (*lo >> 64) | ((*hi as u128) << 64);
    *hi = 0;
}

impl<const N: usize> Monty<N> {
    /// Context for modulus `m` (little-endian limbs). `None` when `m` is even or below 3.
    pub fn new(m: &[u64; N]) -> Option<Self> {
        if N == 0 || m[0] & 1 == 0 {
            return None;
        }
        let upper = m[1..].iter().fold(0u64, |acc, &l| acc | l);
        if upper == 0 && m[0] < 3 {
            return None;
        }
        // Newton's iteration doubles the number of correct low bits each step: 1 → 64 in 6.
        let mut inv = 1u64;
        for _ in 0..6 {
            inv = inv.wrapping_mul(2u64.wrapping_sub(m[0].wrapping_mul(inv)));
        }
        let mut ctx = Monty {
            m: *m,
            m_inv: inv.wrapping_neg(),
            one: [0; N],
            minus_one: [0; N],
            r2: [0; N],
        };
        if m[N - 1] >> 63 == 1 {
            // R/2 <= m < R, so R mod m = R - m = -m (two's complement).
            let (neg, _) = ct::sub_limbs(&[0; N], m);
            ctx.one = neg;
        } else {
            // General odd modulus (tests, small numbers): 2^(64N) mod m by doubling 1.
            let mut x = [0u64; N];
            x[0] = 1;
            for _ in 0..64 * N {
                x = ctx.double(&x);
            }
            ctx.one = x;
        }
        ctx.minus_one = ct::sub_limbs(m, &ctx.one).0;
        // R² mod m is the Montgomery form of R = 2^(64N) = 2^(k·2^j): double `one` k times
        // (Montgomery form of 2^k), then square j times.
        let bits = 64 * N;
        let j = bits.trailing_zeros();
        let k = bits >> j;
        let mut x = ctx.one;
        for _ in 0..k {
            x = ctx.double(&x);
        }
        for _ in 0..j {
            x = ctx.sqr(&x);
        }
        ctx.r2 = x;
        Some(ctx)
    }

    /// The modulus.
    pub fn modulus(&self) -> &[u64; N] {
        &self.m
    }

    /// 1 in Montgomery form.
    pub fn one(&self) -> &[u64; N] {
        &self.one
    }

    /// −1 in Montgomery form.
    pub fn minus_one(&self) -> &[u64; N] {
        &self.minus_one
    }

    /// `R² mod m`.
    pub fn r2(&self) -> &[u64; N] {
        &self.r2
    }

    /// `x` with `x < m` into Montgomery form (`x·R mod m`). Also correct for any `x < R`.
    pub fn to_mont(&self, x: &[u64; N]) -> [u64; N] {
        self.mul(x, &self.r2)
    }

    /// Out of Montgomery form.
    pub fn from_mont(&self, x: &[u64; N]) -> [u64; N] {
        let mut one = [0u64; N];
        one[0] = 1;
        self.mul(x, &one)
    }

    /// `t - m` if `t + carry·R >= m`, else `t`; for `t + carry·R < 2m`.
    #[inline(always)]
    fn reduce_once(&self, t: &[u64; N], carry: u64) -> [u64; N] {
        let (d, borrow) = ct::sub_limbs(t, &self.m);
        // Use the difference when it did not borrow or when the carry absorbs the borrow.
        let use_d = ct::from_bit(carry | (borrow ^ 1));
        ct::select_limbs(use_d, &d, t)
    }

    /// `2x mod m` for `x < m`.
    #[inline(always)]
    pub fn double(&self, x: &[u64; N]) -> [u64; N] {
        let mut t = [0u64; N];
        let mut carry = 0u64;
        for i in 0..N {
            t[i] = (x[i] << 1) | carry;
            carry = x[i] >> 63;
        }
        self.reduce_once(&t, carry)
    }

    /// `a + b mod m` for `a, b < m`.
    #[inline(always)]
    pub fn add(&self, a: &[u64; N], b: &[u64; N]) -> [u64; N] {
        let (t, carry) = ct::add_limbs(a, b);
        self.reduce_once(&t, carry)
    }

    /// Montgomery product `a·b·R⁻¹ mod m`, for `a < R` and `b < m` (or both `< m`).
    #[inline]
    pub fn mul(&self, a: &[u64; N], b: &[u64; N]) -> [u64; N] {
        let m = &self.m;
        let mut u = [0u64; N];
        let mut out = [0u64; N];
        let (mut lo, mut hi) = (0u128, 0u64);
        for k in 0..N {
            for j in 0..k {
                mac(&mut lo, &mut hi, a[j], b[k - j]);
                mac(&mut lo, &mut hi, u[j], m[k - j]);
            }
            mac(&mut lo, &mut hi, a[k], b[0]);
            let uk = (lo as u64).wrapping_mul(self.m_inv);
            u[k] = uk;
            // Clears the low word by construction.
            mac(&mut lo, &mut hi, uk, m[0]);
            shift(&mut lo, &mut hi);
        }
        for k in N..2 * N - 1 {
            for j in k + 1 - N..N {
                mac(&mut lo, &mut hi, a[j], b[k - j]);
                mac(&mut lo, &mut hi, u[j], m[k - j]);
            }
            out[k - N] = lo as u64;
            shift(&mut lo, &mut hi);
        }
        out[N - 1] = lo as u64;
        let carry = (lo >> 64) as u64;
        u.zeroize();
        self.reduce_once(&out, carry)
    }

    /// Montgomery square `a²·R⁻¹ mod m`, for `a < m`.
    #[inline]
    pub fn sqr(&self, a: &[u64; N]) -> [u64; N] {
        let m = &self.m;
        let mut u = [0u64; N];
        let mut out = [0u64; N];
        let (mut lo, mut hi) = (0u128, 0u64);
        for k in 0..N {
            self.sqr_column(a, k, &mut lo, &mut hi);
            for j in 0..k {
                mac(&mut lo, &mut hi, u[j], m[k - j]);
            }
            let uk = (lo as u64).wrapping_mul(self.m_inv);
            u[k] = uk;
            mac(&mut lo, &mut hi, uk, m[0]);
            shift(&mut lo, &mut hi);
        }
        for k in N..2 * N - 1 {
            self.sqr_column(a, k, &mut lo, &mut hi);
            for j in k + 1 - N..N {
                mac(&mut lo, &mut hi, u[j], m[k - j]);
            }
            out[k - N] = lo as u64;
            shift(&mut lo, &mut hi);
        }
        out[N - 1] = lo as u64;
        let carry = (lo >> 64) as u64;
        u.zeroize();
        self.reduce_once(&out, carry)
    }

    /// Adds column `k` of `a²` into the accumulator: the off-diagonal products `a[i]·a[k−i]`,
    /// `i < k−i`, once each and doubled, plus `a[k/2]²` for even `k`.
    #[inline(always)]
    fn sqr_column(&self, a: &[u64; N], k: usize, lo: &mut u128, hi: &mut u64) {
        let (mut slo, mut shi) = (0u128, 0u64);
        let i_min = (k + 1).saturating_sub(N);
        for i in i_min..k.div_ceil(2) {
            mac(&mut slo, &mut shi, a[i], a[k - i]);
        }
        shi = (shi << 1) | (slo >> 127) as u64;
        slo <<= 1;
        if k.is_multiple_of(2) {
            mac(&mut slo, &mut shi, a[k / 2], a[k / 2]);
        }
        let (s, c) = lo.overflowing_add(slo);
        *lo = s;
        *hi += shi + c as u64;
    }

    /// `base^exp` with `base` and the result in Montgomery form. Every one of the 64·N exponent
    /// bits is processed (leading zeros included) with a fixed 5-bit window; each window digit
    /// is fetched by a masked scan of the whole 32-entry table.
    pub fn pow(&self, base: &[u64; N], exp: &[u64; N]) -> [u64; N] {
        let mut table = Zeroizing::new([[0u64; N]; TABLE]);
        table[0] = self.one;
        table[1] = *base;
        for i in 2..TABLE {
            table[i] = if i.is_multiple_of(2) {
                self.sqr(&table[i / 2])
            } else {
                self.mul(&table[i - 1], base)
            };
        }
        let bits = 64 * N;
        let windows = bits.div_ceil(WINDOW);
        let mut acc = Zeroizing::new([0u64; N]);
        for w in (0..windows).rev() {
            let low = w * WINDOW;
            let width = WINDOW.min(bits - low);
            let digit = Zeroizing::new(extract_bits(exp, low, width));
            let entry = Zeroizing::new(lookup(&table, *digit));
            if w == windows - 1 {
                *acc = *entry;
            } else {
                for _ in 0..WINDOW {
                    *acc = self.sqr(&acc);
                }
                *acc = self.mul(&acc, &entry);
            }
        }
        *acc
    }

    /// `2^exp` in Montgomery form: square, then a masked doubling per exponent bit. A doubling
    /// costs O(N) against O(N²) for a multiplication, so this beats the windowed [`Self::pow`]
    /// for the base-2 Miller-Rabin round.
    pub fn pow2(&self, exp: &[u64; N]) -> [u64; N] {
        let mut acc = self.one;
        for limb in (0..N).rev() {
            for bit in (0..64).rev() {
                let sq = self.sqr(&acc);
                // sq + (sq or 0), then one conditional subtraction: a masked doubling.
                let mask = ct::from_bit(exp[limb] >> bit);
                let mut addend = [0u64; N];
                for i in 0..N {
                    addend[i] = sq[i] & mask;
                }
                let (t, carry) = ct::add_limbs(&sq, &addend);
                acc = self.reduce_once(&t, carry);
            }
        }
        acc
    }
}

/// `width` (≤ 64) bits of `x` starting at bit `low`; the positions are public, the value is not.
#[inline(always)]
fn extract_bits<const N: usize>(x: &[u64; N], low: usize, width: usize) -> u64 {
    let limb = low / 64;
    let off = low % 64;
    let mut v = x[limb] >> off;
    if off + width > 64 && limb + 1 < N {
        v |= x[limb + 1] << (64 - off);
    }
    v & ((1u64 << width) - 1)
}

/// `table[idx]` by reading every entry and keeping the one whose index matches.
#[inline(always)]
fn lookup<const N: usize>(table: &[[u64; N]; TABLE], idx: u64) -> [u64; N] {
    let mut out = [0u64; N];
    for (i, entry) in table.iter().enumerate() {
        let mask = ct::eq(i as u64, idx);
        for l in 0..N {
            out[l] |= entry[l] & mask;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_modulus_roundtrip() {
        let m = Monty::<1>::new(&[561]).unwrap();
        let a = m.to_mont(&[100]);
        let b = m.to_mont(&[200]);
        assert_eq!(m.from_mont(&m.mul(&a, &b)), [100 * 200 % 561]);
        assert_eq!(m.from_mont(&m.sqr(&a)), [100 * 100 % 561]);
        // 2^560 mod 561 = 1: 561 is a Carmichael number.
        assert_eq!(m.from_mont(&m.pow2(&[560])), [1]);
        assert_eq!(m.from_mont(&m.pow(&a, &[3])), [100 * 100 * 100 % 561]);
        assert!(Monty::<1>::new(&[4]).is_none());
        assert!(Monty::<1>::new(&[1]).is_none());
    }
}
