//! Constant-time RSA key assembly: from two primes `p`, `q` to `n`, `d`, `dp`, `dq`, `qinv`, the
//! FIPS 186-5 key-pair checks, a pair-wise consistency test, and the encodings (PKCS#8 PEM,
//! OpenSSH public key).
//!
//! `rsa` 0.9's `RsaPrivateKey::from_p_q` computes these values with num-bigint-dig, whose
//! Euclid, inversion and division branch and index on the secret operands (the class of leak
//! behind OpenSSL's CVE-2018-0737). Here every operation on a secret is a non-`_vartime`
//! `crypto-bigint` 0.7 function, whose loop counts, branches and memory addresses depend only on
//! the operands' *precision* (a public function of the key size):
//!
//! - `n = p·q`: `concatenating_mul`.
//! - `λ = lcm(p − 1, q − 1)`: `Lcm::lcm` (constant-time safegcd, constant-time exact division).
//! - `d = e⁻¹ mod λ`: λ is even, and `invert_mod` with an even modulus shifts by the modulus'
//!   (secret) number of trailing zeros with a variable-time step. Instead we invert λ modulo the
//!   public prime `e`: with `u = λ mod e` (`rem_limb`, multiply-by-reciprocal) and
//!   `v = u⁻¹ mod e` (`invert_odd_mod`, safegcd), `d = (1 + λ·(e − v)) / e`. This is exact:
//!   `λ·(e − v) ≡ −λ·λ⁻¹ ≡ −1 (mod e)`, and `d·e = 1 + λ·(e − v) ≡ 1 (mod λ)`. Since
//!   `1 ≤ v ≤ e − 1`, `1 ≤ d ≤ (1 + λ·(e − 1))/e < λ`, so `d` is *the* inverse in `[1, λ)`,
//!   FIPS 186-5's requirement `d < λ(n)`. The division by `e` is `div_rem_limb` (reciprocal,
//!   no hardware `div`), and a zero remainder is asserted with a mask.
//! - `dp = d mod (p − 1)`, `dq = d mod (q − 1)`: `rem` (constant-time schoolbook division).
//! - `qinv = q⁻¹ mod p`: `rem` then `invert_odd_mod`.
//! - FIPS 186-5 A.1.1 / A.1.3: `d > 2^(nlen/2)` and `|p − q| > 2^(nlen/2 − 100)` are computed as
//!   masks (`ct_lt`, `ct_select`); only the combined verdict is branched on, and a failing pair
//!   is discarded (probability ≈ 2^−(nlen/2) and ≈ 2⁻⁹⁸), so the branch reveals nothing about
//!   the key that is kept.
//! - Pair-wise consistency (sign and verify once, as FIPS 140-3 asks of a generated key pair):
//!   `s = m^d mod n` through CRT with constant-time Montgomery `pow` on the secret side, then
//!   `s^e mod n = m` on the public side; a mismatch is an error, never a key. Its private side
//!   is two 1024-bit exponentiations for RSA-2048, most of the assembly's cost — except on the
//!   IFMA lanes, where each prime's half, `2^dp mod p` (`dp = e⁻¹ mod (p − 1)`, computed by
//!   [`crate::prime::inverse::crt_exponent`] the same way as d), rides in a lane its own random-base Miller-Rabin pass
//!   leaves free, and [`assemble_with_halves`] checks that the key's `dp`, `dq` are those
//!   exponents (masks) before it recombines the halves and runs the public side.
//!
//! What is not constant time, by design: the DER encoding strips leading zero bytes of each
//! integer, so its length (in bytes) depends on the value — it is written into the key file
//! anyway. `n` and `e` are public and handled as such.

use std::fmt;

use crypto_bigint::modular::{BoxedMontyForm, BoxedMontyParams};
use crypto_bigint::{
    BoxedUint, Choice, ConcatenatingMul, CtEq, CtLt, CtSelect, Integer, Lcm, NonZero, Odd, Resize,
};
use pkcs8::der::SecretDocument;
use zeroize::{Zeroize, Zeroizing};

pub use crate::prime::inverse::PUBLIC_EXPONENT;
use crate::prime::inverse::{e_inverse, from_limbs, limbs};

/// Why two primes did not make a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssembleError {
    /// FIPS 186-5 A.1.1: `d ≤ 2^(nlen/2)`, or A.1.3: `|p − q| ≤ 2^(nlen/2 − 100)`. Draw new
    /// primes (probability about 2^(−nlen/2) and 2⁻⁹⁸ for random primes).
    #[error("the primes fail FIPS 186-5's d-size or |p - q| condition; draw new primes")]
    Rejected,
    /// Inputs that cannot be RSA primes for e = 65537 (even, zero, `e | p − 1`, different
    /// lengths), or a failed pair-wise consistency test.
    #[error("invalid RSA primes: {0}")]
    Invalid(&'static str),
    /// DER/PEM encoding failed.
    #[error("encoding failed: {0}")]
    Encode(String),
}

/// An RSA private key (two primes, e = 65537) built by [`assemble`]. Every value is zeroized on
/// drop, and `Debug` prints only the modulus size.
pub struct RsaPrivate {
    n: BoxedUint,
    d: BoxedUint,
    p: BoxedUint,
    q: BoxedUint,
    dp: BoxedUint,
    dq: BoxedUint,
    qinv: BoxedUint,
}

impl Drop for RsaPrivate {
    fn drop(&mut self) {
        for x in [
            &mut self.n,
            &mut self.d,
            &mut self.p,
            &mut self.q,
            &mut self.dp,
            &mut self.dq,
            &mut self.qinv,
        ] {
            x.zeroize();
        }
    }
}

impl fmt::Debug for RsaPrivate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never d, p, q or the CRT values: the modulus size is all a log needs.
        f.debug_struct("RsaPrivate")
            .field("bits", &self.bits())
            .field("e", &PUBLIC_EXPONENT)
            .finish_non_exhaustive()
    }
}

/// Big-endian bytes without leading zeros (DER strips them anyway), in a zeroizing buffer.
fn be(x: &BoxedUint) -> Zeroizing<Vec<u8>> {
    let bytes = Zeroizing::new(x.to_be_bytes());
    let skip = bytes.iter().take_while(|&&b| b == 0).count();
    Zeroizing::new(bytes[skip.min(bytes.len() - 1)..].to_vec())
}

impl RsaPrivate {
    /// Modulus size in bits.
    pub fn bits(&self) -> u32 {
        // n is public.
        self.n.bits_vartime()
    }

    /// Modulus size in bytes.
    pub fn size(&self) -> usize {
        self.bits().div_ceil(8) as usize
    }

    /// The modulus, big-endian, no leading zeros.
    pub fn n_be(&self) -> Vec<u8> {
        be(&self.n).to_vec()
    }

    /// The public exponent, big-endian.
    pub fn e_be(&self) -> Vec<u8> {
        PUBLIC_EXPONENT.to_be_bytes()[1..].to_vec()
    }

    /// PKCS#1 `RSAPrivateKey` DER: version 0, n, e, d, p, q, dp, dq, qinv.
    pub fn to_pkcs1_der(&self) -> Result<SecretDocument, AssembleError> {
        let err = |e: pkcs1::der::Error| AssembleError::Encode(e.to_string());
        let (n, e, d) = (be(&self.n), self.e_be(), be(&self.d));
        let (p, q, dp, dq, qinv) = (
            be(&self.p),
            be(&self.q),
            be(&self.dp),
            be(&self.dq),
            be(&self.qinv),
        );
        fn uint(b: &[u8]) -> Result<pkcs1::UintRef<'_>, AssembleError> {
            pkcs1::UintRef::new(b).map_err(|e| AssembleError::Encode(e.to_string()))
        }
        let key = pkcs1::RsaPrivateKey {
            modulus: uint(&n)?,
            public_exponent: uint(&e)?,
            private_exponent: uint(&d)?,
            prime1: uint(&p)?,
            prime2: uint(&q)?,
            exponent1: uint(&dp)?,
            exponent2: uint(&dq)?,
            coefficient: uint(&qinv)?,
            other_prime_infos: None,
        };
        SecretDocument::encode_msg(&key).map_err(err)
    }

    /// PKCS#8 `PrivateKeyInfo` DER (rsaEncryption, NULL parameters) around the PKCS#1 key.
    pub fn to_pkcs8_der(&self) -> Result<SecretDocument, AssembleError> {
        let pkcs1 = self.to_pkcs1_der()?;
        let info = pkcs8::PrivateKeyInfo::new(pkcs1::ALGORITHM_ID, pkcs1.as_bytes());
        SecretDocument::encode_msg(&info).map_err(|e| AssembleError::Encode(e.to_string()))
    }

    /// `-----BEGIN PRIVATE KEY-----` PEM with LF line endings.
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, AssembleError> {
        use pkcs8::der::pem::PemLabel;
        self.to_pkcs8_der()?
            .to_pem(pkcs8::PrivateKeyInfo::PEM_LABEL, pkcs8::LineEnding::LF)
            .map_err(|e| AssembleError::Encode(e.to_string()))
    }
}

/// `a > b` for same-precision values, as a mask.
fn ct_gt(a: &BoxedUint, b: &BoxedUint) -> Choice {
    b.ct_lt(a)
}

/// `2^k` with the given precision.
fn pow2(k: u32, precision: u32) -> BoxedUint {
    BoxedUint::one_with_precision(precision)
        .shl_vartime(k)
        .expect("k below the precision")
}

/// Builds the key from two primes (big-endian, same length, each with its top bit set in that
/// length so n has exactly twice their bit length), e = 65537. The primes' primality and
/// `gcd(e, p − 1) = 1` are the caller's to ensure (the engines do); a value for which
/// `e | λ` is caught here. Runs the FIPS 186-5 checks and the pair-wise consistency test.
pub fn assemble(p_be: &[u8], q_be: &[u8]) -> Result<RsaPrivate, AssembleError> {
    let (key, p_odd) = derive(p_be, q_be)?;
    pairwise_consistency(&key, &p_odd)?;
    Ok(key)
}

/// Both primes' halves of the pair-wise consistency test, computed during the prime search
/// (`prime::lanes::PrimeHalf`): `dp = e⁻¹ mod (p − 1)`, `sp = 2^dp mod p`, and the same for q.
/// Limbs little-endian, primes of 64·N bits.
pub(crate) struct CrtHalves<'a, const N: usize> {
    pub dp: &'a [u64; N],
    pub dq: &'a [u64; N],
    pub sp: &'a [u64; N],
    pub sq: &'a [u64; N],
}

/// [`assemble`] for primes whose halves of the pair-wise test were computed already: the key's
/// `dp` and `dq` must equal the exponents the halves were computed with (compared as masks),
/// then the halves are recombined (Garner) and the public side checks `s^e mod n = 2`. The
/// test covers the same values as in [`assemble`]: `dp`, `dq`, `qinv`, `n` and `e`.
pub(crate) fn assemble_with_halves<const N: usize>(
    p_be: &[u8],
    q_be: &[u8],
    halves: &CrtHalves<'_, N>,
) -> Result<RsaPrivate, AssembleError> {
    let (key, p_odd) = derive(p_be, q_be)?;
    if key.p.bits_precision() != 64 * N as u32 {
        return Err(AssembleError::Invalid("halves of another size"));
    }
    let same = limbs::<N>(&key.dp)[..]
        .ct_eq(&halves.dp[..])
        .and(limbs::<N>(&key.dq)[..].ct_eq(&halves.dq[..]));
    let sp = Zeroizing::new(from_limbs(halves.sp));
    let sq = Zeroizing::new(from_limbs(halves.sq));
    let s = garner(&key, &p_odd, &sp, &sq);
    let m = BoxedUint::from(2u64).resize(key.p.bits_precision());
    let back = public_side(&key, &s, &m);
    if !same.to_bool() || !back {
        return Err(AssembleError::Invalid("pair-wise consistency test failed"));
    }
    Ok(key)
}

/// [`assemble`] without the pair-wise consistency test: only the d/CRT step (n, λ, d, dp, dq,
/// qinv and the FIPS checks). For the timing-leak bench (`benches/ct_dudect.rs`); keys that
/// leave keyfleet always come from [`assemble`].
#[doc(hidden)]
pub fn derive_only(p_be: &[u8], q_be: &[u8]) -> Result<RsaPrivate, AssembleError> {
    derive(p_be, q_be).map(|(key, _)| key)
}

fn derive(p_be: &[u8], q_be: &[u8]) -> Result<(RsaPrivate, Odd<BoxedUint>), AssembleError> {
    if p_be.len() != q_be.len() || p_be.is_empty() {
        return Err(AssembleError::Invalid("primes of different lengths"));
    }
    // Precision is a function of the (public) key size only.
    let prec = (8 * p_be.len() as u32).next_multiple_of(64);
    let decode = |b: &[u8]| {
        BoxedUint::from_be_slice(b, prec)
            .map(Zeroizing::new)
            .map_err(|_| AssembleError::Invalid("undecodable prime"))
    };
    let (p, q) = (decode(p_be)?, decode(q_be)?);
    // The primes' oddness is public (every RSA prime is odd); failing it means a caller bug.
    let p_odd = Odd::new((*p).clone())
        .into_option()
        .ok_or(AssembleError::Invalid("even p"))?;
    if !q.is_odd().to_bool() {
        return Err(AssembleError::Invalid("even q"));
    }
    let one = BoxedUint::one_with_precision(prec);
    let mut ok = Choice::TRUE;

    let n = p.concatenating_mul(&*q); // 2·prec bits
    let nlen = n.bits_vartime(); // public
    let pm1 = Zeroizing::new(p.wrapping_sub(&one));
    let qm1 = Zeroizing::new(q.wrapping_sub(&one));
    let lambda = Zeroizing::new(pm1.lcm(&qm1)); // 2·prec bits

    // d = (1 + λ·(e − (λ mod e)⁻¹ mod e)) / e: see the module comment. Invalid iff e | λ,
    // i.e. e | p − 1 or e | q − 1.
    let (d_wide, d_ok) = e_inverse(&lambda);
    ok = ok.and(d_ok);
    // d < λ < 2^(2·prec): dropping the top limb loses nothing.
    let d = Zeroizing::new((*d_wide).clone().resize_unchecked(2 * prec));
    let d_lt_lambda = d.ct_lt(&lambda);
    ok = ok.and(d_lt_lambda).and(d.is_nonzero());

    let pm1_nz = NonZero::new((*pm1).clone()).into_option();
    let qm1_nz = NonZero::new((*qm1).clone()).into_option();
    let (Some(pm1_nz), Some(qm1_nz)) = (pm1_nz, qm1_nz) else {
        return Err(AssembleError::Invalid("prime 1"));
    };
    let dp = Zeroizing::new(d.rem(&pm1_nz));
    let dq = Zeroizing::new(d.rem(&qm1_nz));
    let p_nz = p_odd.as_nz_ref();
    let q_mod_p = Zeroizing::new(q.rem(p_nz));
    let qinv = q_mod_p.invert_odd_mod(&p_odd);
    ok = ok.and(qinv.is_some()); // false iff p = q
    let qinv = Zeroizing::new(qinv.unwrap_or(BoxedUint::zero_with_precision(prec)));
    if !ok.to_bool() {
        return Err(AssembleError::Invalid("e divides p − 1 or q − 1, or p = q"));
    }

    // FIPS 186-5 A.1.1: d > 2^(nlen/2); A.1.3: |p − q| > 2^(nlen/2 − 100). One verdict, from masks.
    let mut fips = ct_gt(&d, &pow2(nlen / 2, 2 * prec));
    if nlen / 2 > 100 {
        let pq = Zeroizing::new(p.wrapping_sub(&*q));
        let qp = Zeroizing::new(q.wrapping_sub(&*p));
        let diff = Zeroizing::new(BoxedUint::ct_select(&pq, &qp, p.ct_lt(&q)));
        fips = fips.and(ct_gt(&diff, &pow2(nlen / 2 - 100, prec)));
    }
    if !fips.to_bool() {
        return Err(AssembleError::Rejected);
    }

    let key = RsaPrivate {
        n,
        d: (*d).clone(),
        p: (*p).clone(),
        q: (*q).clone(),
        dp: (*dp).clone(),
        dq: (*dq).clone(),
        qinv: (*qinv).clone(),
    };
    Ok((key, p_odd))
}

/// FIPS 186-5's pair-wise consistency test (as SP 800-56B's and FIPS 140-3's PCT: sign and verify
/// once): `s = m^d mod n` by CRT with constant-time Montgomery exponentiation on the private
/// side, then `s^e mod n` must give `m` back. `m` is a fixed public value; `s` is its signature,
/// which tells nothing the public key does not (the CRT halves `sp`, `sq` would, and are
/// zeroized).
///
/// For the engine's sizes (1024-, 1536-, 2048-bit primes) the exponentiations run on keyfleet's
/// own fixed-size engines — both CRT halves in two lanes of one AVX-512 IFMA pass when the lane
/// engine is active, else [`crate::prime::monty::Monty::pow`] — and the public side is 16
/// squarings and one multiplication (e = 2¹⁶ + 1) on `Monty<2N>`: crypto-bigint's
/// `BoxedMontyForm` would cost about a fifth of key generation instead of a tenth. Other sizes
/// (tests) use `BoxedMontyForm`. Every private-side path processes all exponent bits with a
/// fixed window and masked table reads.
fn pairwise_consistency(key: &RsaPrivate, p_odd: &Odd<BoxedUint>) -> Result<(), AssembleError> {
    let prec = key.p.bits_precision();
    // A fixed message, m = 2: below both primes, and 2^x mod p has a fast constant-time path
    // (masked doublings instead of table multiplications, as in the base-2 Miller-Rabin round).
    // The multiplicative order of 2 modulo n is a multiple of λ(n)'s large prime factors, so a
    // wrong d (or dp, dq, qinv) passes with negligible probability.
    let m = BoxedUint::from(2u64).resize(prec);
    let q_odd = Odd::new(key.q.clone())
        .into_option()
        .ok_or(AssembleError::Invalid("even q"))?;
    let ok = match prec {
        1024 => pct_fixed::<16, 32>(key, p_odd, &m),
        1536 => pct_fixed::<24, 48>(key, p_odd, &m),
        2048 => pct_fixed::<32, 64>(key, p_odd, &m),
        _ => pct_boxed(key, p_odd, &q_odd, &m),
    };
    if !ok {
        return Err(AssembleError::Invalid("pair-wise consistency test failed"));
    }
    Ok(())
}

/// Garner's recombination: `s = sq + q·(qinv·(sp − sq) mod p)`, below n, in 2·prec bits.
fn garner(key: &RsaPrivate, p_odd: &Odd<BoxedUint>, sp: &BoxedUint, sq: &BoxedUint) -> BoxedUint {
    let prec = key.p.bits_precision();
    let p_nz = p_odd.as_nz_ref();
    let sq_mod_p = Zeroizing::new(sq.rem(p_nz));
    let diff = Zeroizing::new(sp.sub_mod(&sq_mod_p, p_nz));
    let h = Zeroizing::new(key.qinv.mul_mod(&diff, p_nz));
    key.q
        .concatenating_mul(&*h)
        .wrapping_add(sq.clone().resize_unchecked(2 * prec))
}

fn pct_boxed(
    key: &RsaPrivate,
    p_odd: &Odd<BoxedUint>,
    q_odd: &Odd<BoxedUint>,
    m: &BoxedUint,
) -> bool {
    let params_p = BoxedMontyParams::new(p_odd.clone());
    let params_q = BoxedMontyParams::new(q_odd.clone());
    // m = 2 < p, q: already reduced.
    let sp = Zeroizing::new(
        BoxedMontyForm::new(m.clone(), &params_p)
            .pow(&key.dp)
            .retrieve(),
    );
    let sq = Zeroizing::new(
        BoxedMontyForm::new(m.clone(), &params_q)
            .pow(&key.dq)
            .retrieve(),
    );
    let s = garner(key, p_odd, &sp, &sq);
    public_boxed(key, &s, m)
}

/// The public side on `BoxedMontyForm` (sizes the fixed engines do not cover): n, e, s and m
/// are public.
fn public_boxed(key: &RsaPrivate, s: &BoxedUint, m: &BoxedUint) -> bool {
    let prec = key.p.bits_precision();
    let Some(n_odd) = Odd::new(key.n.clone()).into_option() else {
        return false;
    };
    let params_n = BoxedMontyParams::new_vartime(n_odd);
    let e = BoxedUint::from(u64::from(PUBLIC_EXPONENT));
    let back = BoxedMontyForm::new(s.clone(), &params_n)
        .pow_bounded_exp(&e, 17)
        .retrieve();
    back == m.clone().resize_unchecked(2 * prec)
}

/// The PCT for primes of 64·N bits; `M = 2N` (the modulus' limbs).
fn pct_fixed<const N: usize, const M: usize>(
    key: &RsaPrivate,
    p_odd: &Odd<BoxedUint>,
    m_big: &BoxedUint,
) -> bool {
    use crate::prime::{lanes, monty::Monty};
    debug_assert!(*m_big == BoxedUint::from(2u64).resize(m_big.bits_precision()));
    let (p, q) = (limbs::<N>(&key.p), limbs::<N>(&key.q));
    let (dp, dq) = (limbs::<N>(&key.dp), limbs::<N>(&key.dq));
    let simd = lanes::active();
    let (sp, sq) = if simd == lanes::Simd::Avx512Ifma {
        let out = Zeroizing::new(lanes::pow2::<N>(simd, &[*p, *q], &[*dp, *dq]));
        (from_limbs(&out[0]), from_limbs(&out[1]))
    } else {
        let half = |modulus: &[u64; N], exp: &[u64; N]| {
            let ctx = Monty::<N>::new(modulus).expect("odd prime above 3");
            let r = Zeroizing::new(ctx.pow2(exp));
            from_limbs(&Zeroizing::new(ctx.from_mont(&r)))
        };
        (half(&p, &dp), half(&q, &dq))
    };
    let (sp, sq) = (Zeroizing::new(sp), Zeroizing::new(sq));
    let s = garner(key, p_odd, &sp, &sq);
    public_fixed::<M>(key, &s, m_big)
}

/// The public side of the test: `s^e mod n = m`, on `Monty<M>` for the engine's sizes.
fn public_side(key: &RsaPrivate, s: &BoxedUint, m: &BoxedUint) -> bool {
    match key.p.bits_precision() {
        1024 => public_fixed::<32>(key, s, m),
        1536 => public_fixed::<48>(key, s, m),
        2048 => public_fixed::<64>(key, s, m),
        _ => public_boxed(key, s, m),
    }
}

/// `s^(2^16 + 1) mod n` on `Monty<M>` (M = the modulus' limbs), compared with `m`.
fn public_fixed<const M: usize>(key: &RsaPrivate, s: &BoxedUint, m_big: &BoxedUint) -> bool {
    use crate::prime::monty::Monty;
    let n = limbs::<M>(&key.n);
    let Some(ctx) = Monty::<M>::new(&n) else {
        return false;
    };
    let base = ctx.to_mont(&limbs::<M>(s));
    let mut acc = base;
    for _ in 0..16 {
        acc = ctx.sqr(&acc);
    }
    acc = ctx.mul(&acc, &base);
    ctx.from_mont(&acc) == *limbs::<M>(&m_big.clone().resize_unchecked(64 * M as u32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prime::inverse::crt_exponent;

    #[test]
    fn debug_is_redacted() {
        // Tiny primes keep the test fast: 251·241 has nlen = 16 and d = 3473 > 2^8 (the
        // |p − q| check only applies above 200-bit moduli).
        let key = assemble(&[0xfb], &[0xf1]).unwrap_or_else(|e| panic!("{e}"));
        let dbg = format!("{key:?}");
        assert!(dbg.contains("bits"));
        assert!(!dbg.contains("d:") && !dbg.contains("p:"));
    }

    /// The pair-wise consistency test catches a wrong private value on every path.
    #[test]
    fn pct_rejects_a_corrupted_key() {
        let p = crate::prime::random_prime::<16>(&mut rand_core::OsRng);
        let q = crate::prime::random_prime::<16>(&mut rand_core::OsRng);
        let be = |x: &[u64; 16]| {
            x.iter()
                .rev()
                .flat_map(|l| l.to_be_bytes())
                .collect::<Vec<_>>()
        };
        let (p, q) = (be(&p), be(&q));
        let (mut key, p_odd) = derive(&p, &q).unwrap();
        assert!(pairwise_consistency(&key, &p_odd).is_ok());
        key.dq = key.dq.wrapping_add(BoxedUint::one_with_precision(1024));
        assert!(pairwise_consistency(&key, &p_odd).is_err());
        let (key, p_odd) = derive(&p, &q).unwrap();
        let q_odd = Odd::new(key.q.clone()).unwrap();
        let m = BoxedUint::from(2u64).resize(1024);
        assert!(pct_boxed(&key, &p_odd, &q_odd, &m));
        let mut bad = derive(&p, &q).unwrap().0;
        bad.qinv = bad.qinv.wrapping_add(BoxedUint::one_with_precision(1024));
        assert!(!pct_boxed(&bad, &p_odd, &q_odd, &m));
        assert!(!pct_fixed::<16, 32>(&bad, &p_odd, &m));
    }

    /// The halves computed during the prime search (IFMA lanes, or the scalar lanes, whose
    /// code is the same) make the same test: a key built from them passes, and a wrong half or
    /// a half of another exponent fails it.
    #[test]
    fn pct_from_the_search_halves() {
        use crate::prime::lanes::{search_with_half, Simd};
        let simd = if crate::prime::lanes::ifma_available() {
            Simd::Avx512Ifma
        } else {
            Simd::Scalar
        };
        let mut rng = rand_core::OsRng;
        let p = search_with_half::<16>(simd, &mut rng).unwrap();
        let q = search_with_half::<16>(simd, &mut rng).unwrap();
        let be = |x: &[u64; 16]| {
            x.iter()
                .rev()
                .flat_map(|l| l.to_be_bytes())
                .collect::<Vec<_>>()
        };
        let (pb, qb) = (be(&p.prime), be(&q.prime));
        // The exponents are the key's dp and dq, and 2^dp mod p is what the lanes computed.
        let key = derive(&pb, &qb).unwrap().0;
        assert_eq!(*limbs::<16>(&key.dp), *p.crt);
        assert_eq!(*limbs::<16>(&key.dq), *q.crt);
        assert_eq!(crt_exponent::<16>(&q.prime).unwrap(), q.crt);
        let ctx = crate::prime::monty::Monty::<16>::new(&p.prime).unwrap();
        assert_eq!(ctx.from_mont(&ctx.pow2(&p.crt)), *p.half);
        let halves = CrtHalves {
            dp: &p.crt,
            dq: &q.crt,
            sp: &p.half,
            sq: &q.half,
        };
        assert!(assemble_with_halves(&pb, &qb, &halves).is_ok());
        let mut wrong = *p.half;
        wrong[0] ^= 4;
        let bad_half = CrtHalves {
            sp: &wrong,
            ..halves
        };
        assert!(assemble_with_halves(&pb, &qb, &bad_half).is_err());
        let mut other = *q.crt;
        other[0] ^= 2;
        let bad_exponent = CrtHalves {
            dq: &other,
            ..halves
        };
        assert!(assemble_with_halves(&pb, &qb, &bad_exponent).is_err());
    }
}
