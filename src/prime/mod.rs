//! The RSA prime engine: random probable primes of 1024, 1536 or 2048 bits for RSA-2048, -3072
//! and -4096 keys, several times faster than `rsa::RsaPrivateKey::new`, assembled into keys by
//! the constant-time [`crate::prime::rsa_ct::assemble`] (which does not check primality: the engine does).
//!
//! # How a prime is found
//! 1. A window of `W = bits/2` odd candidates `base + 2j` is drawn from the OS CSPRNG, `base`
//!    with its top two bits set (so `p ≥ √2·2^(bits−1)` and `n` has exactly `nlen` bits).
//!    [`sieve`] marks the positions divisible by one of the 6541 odd primes below 2¹⁶, congruent
//!    to 1 mod 65537 (so `gcd(e, p − 1) = 1`), or with more than [`miller_rabin::S_MAX`] trailing
//!    zeros in `p − 1`. About 1.4 primes are expected per window; W/10 positions survive.
//! 2. Survivors are taken in a uniformly random order. Each gets a Miller-Rabin round to base 2
//!    (a cheap filter: ~97% of survivors are composites and fail it), then
//!    [`miller_rabin::rounds_for_bits`] rounds with random bases (5 at 1024 bits, FIPS 186-5
//!    Table B.1's 2⁻¹¹² column). The first candidate to pass is the prime. A window whose
//!    survivors are exhausted is dropped for a fresh one.
//!
//!    With AVX-512 IFMA (and `KEYFLEET_SIMD` not `off`), steps 2's rounds run in [`lanes`]:
//!    survivors are drawn in the same random order eight at a time and get their base-2 round
//!    together, one candidate per lane; the first of them (in draw order) that passes gets its
//!    random-base rounds with one base per lane. Same round counts, same bases, same output
//!    distribution (the first prime of the random order); about five times the keys per second.
//!    Without IFMA the rounds run one at a time on [`monty`] as described above.
//! 3. [`generate_rsa_key`] draws q until `|p − q| > 2^(nlen/2 − 100)`, calls
//!    [`crate::prime::rsa_ct::assemble`] (constant-time `d = e⁻¹ mod λ(n)`, CRT values, FIPS checks,
//!    pair-wise consistency test), and redraws both if `d ≤ 2^(nlen/2)`.
//!
//! # Constant-time discipline
//! Every operation on a value that may become a secret prime — residues, sieve verdicts,
//! candidate selection, Montgomery arithmetic, exponent digits, `s` and `d` in Miller-Rabin —
//! runs with loop bounds, branches and memory addresses fixed by public sizes: the sieve
//! advances all 6541 residues at every position ([`sieve`]), a candidate is picked from the
//! window and erased from it by scanning every flag with masks, exponent windows read the whole
//! 32-entry table, conditional subtractions and the `s`-dependent part of Miller-Rabin are
//! masked selects ([`monty`], [`miller_rabin`]); no `/` or `%` touches secret data (x86 `div`
//! has operand-dependent latency: reductions are multiply-based). Data-dependent decisions are
//! allowed in exactly three places, each about a *discarded* value that is independent of the
//! prime finally returned: (a) "this candidate failed Miller-Rabin" — the candidate sits at a
//! uniformly random, secret position of its window, so the failure tells nothing about the
//! position, residues or value of the prime that is eventually chosen (an in-order scan, by
//! contrast, would leak that `p − 2`, `p − 4`, … were composite, hence residues of `p`); the
//! base-2 filter's early rejection is the same case, and so is the visible count of candidates
//! tried, which depends on the window and the random order, not on which survivor is `p`;
//! windows given up are fresh and independent of the next one; (b) the number of survivors in a window,
//! used as the public bound for the random order, which is a near-constant (≈ W/10) whose
//! dependence on `base mod q` is a fraction of a bit and says nothing about which survivor
//! becomes `p`; (c) the negligible-probability retries (carry out of the window, `p` and `q`
//! too close, `d` too small), each decided on a constant-time mask. Key assembly (`n`, `d`, the CRT values) is
//! constant-time too: see [`crate::prime::rsa_ct`]. Secret temporaries (bases, windows, flags, residues, exponents,
//! tables) are zeroized on drop.
//!
//! # The lane engine
//! [`lanes`] keeps every property above and adds none of its own decisions. Its eight lanes run
//! one instruction stream: limb counts, loop bounds, the exponent length (all 64·N bits of `d`)
//! and the length of the squaring chain (`S_MAX − 1`) are the same for every lane and fixed by
//! the size; a lane's exponent digit selects its table entry through a mask computed per lane
//! after all 16 entries are read; masked doublings replace conditional ones in the base-2
//! round; the final reductions are masked subtractions; there is no conditional subtraction
//! inside a multiplication at all (values stay below `2m` because `R ≥ 16m`). So neither the
//! instruction sequence nor any memory address depends on a candidate, a base, `d` or `s`, on
//! either instruction set. The per-lane constants are computed with the same rules (the one
//! branch, on the modulus' top bit, goes the same way for every candidate). Empty lanes (the
//! last batch of a window) hold the public filler `2^(64N) − 1`, and their verdicts are never
//! read. What leaves the engine is one pass/fail bit per lane, used exactly as in (a): a batch
//! reveals the verdicts of up to eight candidates at uniformly random secret positions,
//! including candidates drawn after the prime, which are then dropped (the one-at-a-time order
//! would have tested them only if the prime had failed; their verdicts, like every rejected
//! candidate's, are about other secret positions than the prime's). Which instruction set ran
//! is public (CPU features, environment).
//!
//! For RSA keys the random-base pass of a survivor also carries the private half of the key's
//! pair-wise consistency test in a lane its rounds leave free: base 2, exponent
//! `e⁻¹ mod (p − 1)` (computed with crypto-bigint's constant-time functions, see
//! [`crate::prime::rsa_ct::crt_exponent`]). That lane runs the same instruction stream as the others
//! (its exponent is read through the same fixed windows and masked table scan, its verdict is
//! never read), and its `base^d` value is copied out of every lane alike into a zeroizing
//! buffer, so it adds no decision and no address that depends on a secret. It saves the test's
//! separate pass — about a tenth of an RSA-2048 key's time.

pub mod inverse;
pub mod lanes;
pub mod miller_rabin;
pub mod monty;
pub mod rsa_ct;
pub mod sieve;

mod ct;
mod rsa_key;

use rand_core::CryptoRngCore;
use zeroize::Zeroizing;

pub use miller_rabin::{is_probable_prime, rounds_for_bits};
pub use rsa_key::PUBLIC_EXPONENT;

use miller_rabin::{Candidate, S_MAX};
use sieve::{uniform_below, Window};

/// Errors from the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Only 2048, 3072 and 4096-bit moduli are supported.
    #[error("unsupported RSA modulus size {0} bits (2048, 3072 or 4096)")]
    UnsupportedBits(usize),
    /// Key assembly refused the primes (should not happen: they are checked before).
    #[error("key assembly rejected the generated primes: {0}")]
    Rsa(String),
}

/// A fresh RSA key with e = 65537 from the fast engine. `bits` is the modulus size: 2048, 3072 or 4096.
pub fn generate_rsa_key(bits: usize) -> Result<crate::prime::rsa_ct::RsaPrivate, EngineError> {
    match bits {
        2048 => rsa_key::generate_os::<16>(),
        3072 => rsa_key::generate_os::<24>(),
        4096 => rsa_key::generate_os::<32>(),
        other => Err(EngineError::UnsupportedBits(other)),
    }
}

/// [`generate_rsa_key`] with a caller-supplied CSPRNG.
pub fn generate_rsa_key_with_rng(
    bits: usize,
    rng: &mut impl CryptoRngCore,
) -> Result<crate::prime::rsa_ct::RsaPrivate, EngineError> {
    match bits {
        2048 => rsa_key::generate::<16>(rng),
        3072 => rsa_key::generate::<24>(rng),
        4096 => rsa_key::generate::<32>(rng),
        other => Err(EngineError::UnsupportedBits(other)),
    }
}

/// A random probable prime of exactly 64·N bits (little-endian limbs) with its top two bits
/// set, `p ≢ 1 (mod 65537)` and at most [`S_MAX`] trailing zeros in `p − 1`. Error probability
/// per [`rounds_for_bits`]; N ≥ 1 (the sieve needs candidates above 2¹⁶).
pub fn random_prime<const N: usize>(rng: &mut impl CryptoRngCore) -> Zeroizing<[u64; N]> {
    let simd = lanes::active();
    if simd == lanes::Simd::Avx512Ifma {
        if let Some(p) = lanes::search::<N>(simd, rng) {
            return p;
        }
    }
    random_prime_scalar(rng)
}

/// [`random_prime`] on the scalar engine, one candidate at a time (the path without IFMA).
pub fn random_prime_scalar<const N: usize>(rng: &mut impl CryptoRngCore) -> Zeroizing<[u64; N]> {
    let bits = 64 * N;
    let width = (bits / 2).max(32);
    let rounds = rounds_for_bits(bits);
    loop {
        let mut window = Window::<N>::new(rng, width);
        while window.live() > 0 {
            let k = uniform_below(rng, window.live());
            let (c, carry) = window.take(k);
            if carry != 0 {
                continue; // ran past 2^(64N): only when base is within 2W of it
            }
            let Some(cand) = Candidate::new(&c) else {
                continue; // unreachable: candidates are odd and large
            };
            if !cand.round_base2(S_MAX) {
                continue;
            }
            if (0..rounds).all(|_| cand.round_random(rng, S_MAX)) {
                return c;
            }
        }
    }
}
