//! RSA key assembly for the fast engine: two engine primes that meet FIPS 186-5's conditions,
//! handed to the constant-time [`crate::prime::rsa_ct::assemble`].

use rand_core::{CryptoRngCore, OsRng};
use zeroize::Zeroizing;

use super::{ct, lanes, random_prime, EngineError};
use crate::prime::rsa_ct::{self, AssembleError, RsaPrivate};

pub use crate::prime::rsa_ct::PUBLIC_EXPONENT;

/// Mask: `|p − q| ≥ 2^(64N − 99)`, which implies FIPS 186-5's `|p − q| > 2^(nlen/2 − 100)`.
fn far_apart<const N: usize>(p: &[u64; N], q: &[u64; N]) -> u64 {
    let (pq, borrow) = ct::sub_limbs(p, q);
    let (qp, _) = ct::sub_limbs(q, p);
    let mut diff = Zeroizing::new(ct::select_limbs(ct::from_bit(borrow), &qp, &pq));
    let bit = 64 * N - 99;
    // Clear bits below `bit`, then test the rest for zero.
    for (i, l) in diff.iter_mut().enumerate() {
        let low = i * 64;
        if low + 64 <= bit {
            *l = 0;
        } else if low < bit {
            *l &= !((1u64 << (bit - low)) - 1);
        }
    }
    let any = diff.iter().fold(0u64, |a, &l| a | l);
    !ct::is_zero(any)
}

/// Little-endian limbs to big-endian bytes, in a zeroizing buffer.
fn to_be<const N: usize>(x: &[u64; N]) -> Zeroizing<Vec<u8>> {
    let mut bytes = Zeroizing::new(vec![0u8; 8 * N]);
    for (chunk, limb) in bytes.chunks_exact_mut(8).zip(x.iter().rev()) {
        chunk.copy_from_slice(&limb.to_be_bytes());
    }
    bytes
}

/// A key with a modulus of 128·N bits from `rng`.
pub(crate) fn generate<const N: usize>(
    rng: &mut impl CryptoRngCore,
) -> Result<RsaPrivate, EngineError> {
    let simd = lanes::active();
    if simd == lanes::Simd::Avx512Ifma {
        if let Some(key) = generate_on_lanes::<N>(simd, rng)? {
            return Ok(key);
        }
    }
    loop {
        let p = random_prime::<N>(rng);
        // The two primes are close with probability about 2⁻⁹⁸: the retry costs nothing in
        // practice and reveals only that a discarded q was close to p.
        let q = loop {
            let q = random_prime::<N>(rng);
            if far_apart(&p, &q) != 0 {
                break q;
            }
        };
        match rsa_ct::assemble(&to_be(&p), &to_be(&q)) {
            Ok(key) => return Ok(key),
            // FIPS 186-5 A.1.1: d ≤ 2^(nlen/2), probability about 2^(−nlen/2): draw again.
            Err(AssembleError::Rejected) => continue,
            Err(err) => return Err(EngineError::Rsa(err.to_string())),
        }
    }
}

/// [`generate`] on the IFMA lanes, each prime found with its half of the pair-wise
/// consistency test (computed in a lane of its own random-base pass, see
/// [`lanes::PrimeHalf`]); `None` for sizes the lane search does not cover.
fn generate_on_lanes<const N: usize>(
    simd: lanes::Simd,
    rng: &mut impl CryptoRngCore,
) -> Result<Option<RsaPrivate>, EngineError> {
    loop {
        let Some(p) = lanes::search_with_half::<N>(simd, rng) else {
            return Ok(None);
        };
        // As in `generate`: a q too close to p is drawn again.
        let q = loop {
            let Some(q) = lanes::search_with_half::<N>(simd, rng) else {
                return Ok(None);
            };
            if far_apart(&p.prime, &q.prime) != 0 {
                break q;
            }
        };
        let halves = rsa_ct::CrtHalves {
            dp: &p.crt,
            dq: &q.crt,
            sp: &p.half,
            sq: &q.half,
        };
        match rsa_ct::assemble_with_halves(&to_be(&p.prime), &to_be(&q.prime), &halves) {
            Ok(key) => return Ok(Some(key)),
            Err(AssembleError::Rejected) => continue,
            Err(err) => return Err(EngineError::Rsa(err.to_string())),
        }
    }
}

/// [`generate`] with the operating system's CSPRNG.
pub(crate) fn generate_os<const N: usize>() -> Result<RsaPrivate, EngineError> {
    generate::<N>(&mut OsRng)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn far_apart_threshold() {
        let p = [0u64, 0, 0, 1 << 63];
        let mut q = p;
        q[2] = 1 << (256 - 99 - 128); // difference exactly 2^(256−99)
        assert_ne!(far_apart(&p, &q), 0);
        assert_ne!(far_apart(&q, &p), 0);
        q[2] -= 1;
        q[1] = u64::MAX;
        assert_eq!(far_apart(&p, &q), 0);
        assert_eq!(far_apart(&p, &p), 0);
    }
}
