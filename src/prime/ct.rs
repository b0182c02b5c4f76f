//! Constant-time building blocks (masks, selects, comparisons) shared by the prime engine.
//!
//! A "mask" is `0` or `u64::MAX`. Masks are derived with arithmetic only (no `if`, no
//! short-circuiting `&&`/`||`), and passed through [`core::hint::black_box`] where they are
//! created from a comparison so that LLVM cannot prove they are booleans and turn a select back
//! into a branch.

use core::hint::black_box;

/// `u64::MAX` when `x == 0`, else `0`.
#[inline(always)]
pub(crate) fn is_zero(x: u64) -> u64 {
    // (x | -x) has its top bit set exactly when x != 0.
    black_box(((x | x.wrapping_neg()) >> 63).wrapping_sub(1))
}

/// `u64::MAX` when `a == b`, else `0`.
#[inline(always)]
pub(crate) fn eq(a: u64, b: u64) -> u64 {
    is_zero(a ^ b)
}

/// `u64::MAX` when `a < b`, for operands below 2^63 (bit counts, indices, small residues).
#[inline(always)]
pub(crate) fn lt_small(a: u64, b: u64) -> u64 {
    black_box((a.wrapping_sub(b) >> 63).wrapping_neg())
}

/// Mask from a bit that is 0 or 1.
#[inline(always)]
pub(crate) fn from_bit(bit: u64) -> u64 {
    black_box(bit & 1).wrapping_neg()
}

/// `a` where `mask` is all ones, `b` where it is zero.
#[inline(always)]
pub(crate) fn select(mask: u64, a: u64, b: u64) -> u64 {
    b ^ (mask & (a ^ b))
}

/// Limb-wise [`select`].
#[inline(always)]
pub(crate) fn select_limbs<const N: usize>(mask: u64, a: &[u64; N], b: &[u64; N]) -> [u64; N] {
    let mut out = [0u64; N];
    for i in 0..N {
        out[i] = select(mask, a[i], b[i]);
    }
    out
}

/// Mask: all limbs equal.
#[inline(always)]
pub(crate) fn eq_limbs<const N: usize>(a: &[u64; N], b: &[u64; N]) -> u64 {
    let mut diff = 0u64;
    for i in 0..N {
        diff |= a[i] ^ b[i];
    }
    is_zero(diff)
}

/// `a - b` over N limbs with the final borrow (0 or 1).
#[inline(always)]
pub(crate) fn sub_limbs<const N: usize>(a: &[u64; N], b: &[u64; N]) -> ([u64; N], u64) {
    let mut out = [0u64; N];
    let mut borrow = 0u64;
    for i in 0..N {
        let (d1, b1) = a[i].overflowing_sub(b[i]);
        let (d2, b2) = d1.overflowing_sub(borrow);
        out[i] = d2;
        borrow = (b1 | b2) as u64;
    }
    (out, borrow)
}

/// `a + b` over N limbs with the final carry (0 or 1).
#[inline(always)]
pub(crate) fn add_limbs<const N: usize>(a: &[u64; N], b: &[u64; N]) -> ([u64; N], u64) {
    let mut out = [0u64; N];
    let mut carry = 0u64;
    for i in 0..N {
        let (s1, c1) = a[i].overflowing_add(b[i]);
        let (s2, c2) = s1.overflowing_add(carry);
        out[i] = s2;
        carry = (c1 | c2) as u64;
    }
    (out, carry)
}

/// `a + small` over N limbs, carry propagated through every limb whatever its value.
#[inline(always)]
pub(crate) fn add_small<const N: usize>(a: &[u64; N], small: u64) -> ([u64; N], u64) {
    let mut out = [0u64; N];
    let mut carry = small;
    for i in 0..N {
        let (s, c) = a[i].overflowing_add(carry);
        out[i] = s;
        carry = c as u64;
    }
    (out, carry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(is_zero(0), u64::MAX);
        assert_eq!(is_zero(1), 0);
        assert_eq!(is_zero(u64::MAX), 0);
        assert_eq!(eq(5, 5), u64::MAX);
        assert_eq!(eq(5, 6), 0);
        assert_eq!(lt_small(3, 4), u64::MAX);
        assert_eq!(lt_small(4, 4), 0);
        assert_eq!(lt_small(5, 4), 0);
        assert_eq!(select(u64::MAX, 1, 2), 1);
        assert_eq!(select(0, 1, 2), 2);
        assert_eq!(add_small(&[u64::MAX, u64::MAX], 1), ([0, 0], 1));
        assert_eq!(sub_limbs(&[0, 0], &[1, 0]), ([u64::MAX, u64::MAX], 1));
    }
}
