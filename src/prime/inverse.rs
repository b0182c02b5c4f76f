//! The public exponent e = 65537 and its inverses modulo even numbers, in constant time:
//! `d = e⁻¹ mod λ(n)` for the key (`rsa_ct`), `dp = e⁻¹ mod (p − 1)` for a prime during the
//! search (the IFMA lanes' half of the pair-wise test). Why it is computed as
//! `(1 + m·(e − v)) / e` is told in `rsa_ct`'s module comment.

use crypto_bigint::{BoxedUint, Choice, ConcatenatingMul, CtEq, Limb, NonZero, Odd, U64};
use zeroize::{Zeroize, Zeroizing};

/// The public exponent.
pub const PUBLIC_EXPONENT: u32 = 65537;

/// `e⁻¹ mod (p − 1)` for a prime (or candidate) `p` of 64·N bits, little-endian limbs, in
/// constant time — as d is computed in `rsa_ct::derive`, with `p − 1` for λ: for the prime that
/// becomes a key's p, this is its `dp = d mod (p − 1)`. `None` when `e | p − 1`.
pub(crate) fn crt_exponent<const N: usize>(p: &[u64; N]) -> Option<Zeroizing<[u64; N]>> {
    let prec = 64 * N as u32;
    let p = Zeroizing::new(from_limbs(p));
    let pm1 = Zeroizing::new(p.wrapping_sub(BoxedUint::one_with_precision(prec)));
    let (dp, ok) = e_inverse(&pm1);
    // Only the verdict is branched on: false means e | p − 1, which the sieve rules out.
    ok.to_bool().then(|| limbs::<N>(&dp))
}

/// `e⁻¹ mod m` for an even `m` (λ, or p − 1), in constant time: `(1 + m·(e − v)) / e` with
/// `v = (m mod e)⁻¹ mod e` (see the module comment). The value has m's precision plus one limb
/// (its top limb is zero); the choice is false when `e | m` (no inverse) or the division by `e`
/// was not exact.
pub(crate) fn e_inverse(m: &BoxedUint) -> (Zeroizing<BoxedUint>, Choice) {
    let e_limb = NonZero::new(Limb::from(PUBLIC_EXPONENT))
        .into_option()
        .expect("e ≠ 0");
    let e_odd = Odd::new(U64::from_u32(PUBLIC_EXPONENT))
        .into_option()
        .expect("e odd");
    let mut u = U64::from_word(m.rem_limb(e_limb).0);
    let v = u.invert_odd_mod(&e_odd);
    let mut ok = v.is_some();
    let mut v = v.unwrap_or(U64::ONE);
    let mut t = U64::from_u32(PUBLIC_EXPONENT).wrapping_sub(&v); // e − v, in [1, e − 1]
    let t_wide = BoxedUint::from(t);
    u.zeroize();
    v.zeroize();
    t.zeroize();
    let mut num = Zeroizing::new(m.concatenating_mul(&t_wide)); // m's bits + 64
    *num = num.wrapping_add(BoxedUint::one_with_precision(num.bits_precision()));
    let (quotient, rem) = num.div_rem_limb(e_limb);
    ok = ok.and(rem.ct_eq(&Limb::ZERO));
    (Zeroizing::new(quotient), ok)
}

/// Little-endian limbs of a value of at most 64·N bits.
pub(crate) fn limbs<const N: usize>(x: &BoxedUint) -> Zeroizing<[u64; N]> {
    let bytes = Zeroizing::new(x.to_le_bytes());
    let mut out = Zeroizing::new([0u64; N]);
    for (o, chunk) in out.iter_mut().zip(bytes.chunks_exact(8)) {
        *o = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
    }
    out
}

pub(crate) fn from_limbs<const N: usize>(x: &[u64; N]) -> BoxedUint {
    let bytes: Zeroizing<Vec<u8>> =
        Zeroizing::new(x.iter().flat_map(|l| l.to_le_bytes()).collect());
    BoxedUint::from_le_slice(&bytes, 64 * N as u32).expect("64·N bits")
}
