//! Run-time choice between the IFMA and the scalar lanes: the one place in the crate that
//! needs `unsafe`. The IFMA engine's functions are safe `#[target_feature]` functions; calling
//! one from code compiled without those features is `unsafe` because running AVX-512
//! instructions on a CPU without them is undefined behaviour. Every call below sits behind
//! [`ifma_present`], i.e. `is_x86_feature_detected!` for both features.
#![allow(unsafe_code)]

use super::{scalar, Limbs, Params, Simd, LANES};

#[cfg(target_arch = "x86_64")]
use super::ifma;

/// The CPU has AVX-512F and AVX-512 IFMA (std caches the CPUID answer).
#[inline]
pub(crate) fn ifma_present() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512ifma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Runs `$ifma` when `path` asks for IFMA and the CPU has it, else `$scalar`.
macro_rules! pick {
    ($path:expr, $ifma:expr, $scalar:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if $path == Simd::Avx512Ifma && ifma_present() {
                // SAFETY: `ifma_present()` has just confirmed with `is_x86_feature_detected!`
                // that this CPU supports `avx512f` and `avx512ifma`, the only target features
                // the called function enables; its arguments are ordinary references and arrays.
                return unsafe { $ifma };
            }
        }
        $scalar
    }};
}

pub(crate) fn mul<const L: usize>(
    path: Simd,
    p: &Params<L>,
    a: &Limbs<L>,
    b: &Limbs<L>,
) -> Limbs<L> {
    pick!(path, ifma::mul(p, a, b), scalar::mul(p, a, b))
}

pub(crate) fn pow<const N: usize, const L: usize>(
    path: Simd,
    p: &Params<L>,
    base: &Limbs<L>,
    exp: &[[u64; LANES]; N],
) -> Limbs<L> {
    pick!(path, ifma::pow(p, base, exp), scalar::pow(p, base, exp))
}

pub(crate) fn pow2<const N: usize, const L: usize>(
    path: Simd,
    p: &Params<L>,
    exp: &[[u64; LANES]; N],
) -> Limbs<L> {
    pick!(path, ifma::pow2(p, exp), scalar::pow2(p, exp))
}

pub(crate) fn miller_rabin<const N: usize, const L: usize>(
    path: Simd,
    p: &Params<L>,
    base: Option<&Limbs<L>>,
    d: &[[u64; LANES]; N],
    s: &[u64; LANES],
    max_s: u64,
    first: Option<&mut Limbs<L>>,
) -> [u64; LANES] {
    pick!(
        path,
        ifma::miller_rabin(p, base, d, s, max_s, first),
        scalar::miller_rabin(p, base, d, s, max_s, first)
    )
}
