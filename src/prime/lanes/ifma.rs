//! The lane primitives on AVX-512 IFMA: eight lanes in a `__m512i`, `vpmadd52luq` /
//! `vpmadd52huq` for the multiply-add halves. Every function here, and the whole engine
//! expanded below, is compiled with `avx512f,avx512ifma`; they are safe functions that may only
//! be called once those features are known to be present, which `super::dispatch` checks.

use core::arch::x86_64::{
    __m512i, _mm512_add_epi64, _mm512_and_si512, _mm512_madd52hi_epu64, _mm512_madd52lo_epu64,
    _mm512_mask_reduce_add_epi64, _mm512_or_si512, _mm512_set1_epi64, _mm512_set_epi64,
    _mm512_setzero_si512, _mm512_srli_epi64, _mm512_sub_epi64, _mm512_xor_si512,
};

pub(crate) type V = __m512i;

#[target_feature(enable = "avx512f,avx512ifma")]
#[inline]
fn zero() -> V {
    _mm512_setzero_si512()
}

#[target_feature(enable = "avx512f,avx512ifma")]
#[inline]
fn splat(x: u64) -> V {
    _mm512_set1_epi64(x as i64)
}

#[target_feature(enable = "avx512f,avx512ifma")]
#[inline]
fn from_lanes(x: &[u64; LANES]) -> V {
    _mm512_set_epi64(
        x[7] as i64,
        x[6] as i64,
        x[5] as i64,
        x[4] as i64,
        x[3] as i64,
        x[2] as i64,
        x[1] as i64,
        x[0] as i64,
    )
}

#[target_feature(enable = "avx512f,avx512ifma")]
#[inline]
fn to_lanes(v: V) -> [u64; LANES] {
    let mut out = [0u64; LANES];
    for (i, o) in out.iter_mut().enumerate() {
        *o = _mm512_mask_reduce_add_epi64(1 << i, v) as u64;
    }
    out
}

#[target_feature(enable = "avx512f,avx512ifma")]
#[inline]
fn add(a: V, b: V) -> V {
    _mm512_add_epi64(a, b)
}

#[target_feature(enable = "avx512f,avx512ifma")]
#[inline]
fn sub(a: V, b: V) -> V {
    _mm512_sub_epi64(a, b)
}

#[target_feature(enable = "avx512f,avx512ifma")]
#[inline]
fn and(a: V, b: V) -> V {
    _mm512_and_si512(a, b)
}

#[target_feature(enable = "avx512f,avx512ifma")]
#[inline]
fn or(a: V, b: V) -> V {
    _mm512_or_si512(a, b)
}

#[target_feature(enable = "avx512f,avx512ifma")]
#[inline]
fn xor(a: V, b: V) -> V {
    _mm512_xor_si512(a, b)
}

#[target_feature(enable = "avx512f,avx512ifma")]
#[inline]
fn shr52(a: V) -> V {
    _mm512_srli_epi64::<52>(a)
}

#[target_feature(enable = "avx512f,avx512ifma")]
#[inline]
fn shr63(a: V) -> V {
    _mm512_srli_epi64::<63>(a)
}

#[target_feature(enable = "avx512f,avx512ifma")]
#[inline]
fn madd_lo(acc: V, a: V, b: V) -> V {
    _mm512_madd52lo_epu64(acc, a, b)
}

#[target_feature(enable = "avx512f,avx512ifma")]
#[inline]
fn madd_hi(acc: V, a: V, b: V) -> V {
    _mm512_madd52hi_epu64(acc, a, b)
}

/// Vector masks never become branches; nothing to hide.
#[target_feature(enable = "avx512f,avx512ifma")]
#[inline]
fn opaque(v: V) -> V {
    v
}

lane_engine!(#[target_feature(enable = "avx512f,avx512ifma")]);
