//! The lane primitives in portable Rust: eight `u64` lanes in an array, the 52×52-bit
//! multiply-add halves through `u128`. Runs everywhere; the reference the tests hold the IFMA
//! path to.

pub(crate) type V = [u64; LANES];

#[inline(always)]
fn map2(a: V, b: V, f: impl Fn(u64, u64) -> u64) -> V {
    let mut out = [0u64; LANES];
    for i in 0..LANES {
        out[i] = f(a[i], b[i]);
    }
    out
}

#[inline(always)]
fn zero() -> V {
    [0; LANES]
}

#[inline(always)]
fn splat(x: u64) -> V {
    [x; LANES]
}

#[inline(always)]
fn from_lanes(x: &[u64; LANES]) -> V {
    *x
}

#[inline(always)]
fn to_lanes(v: V) -> [u64; LANES] {
    v
}

#[inline(always)]
fn add(a: V, b: V) -> V {
    map2(a, b, u64::wrapping_add)
}

#[inline(always)]
fn sub(a: V, b: V) -> V {
    map2(a, b, u64::wrapping_sub)
}

#[inline(always)]
fn and(a: V, b: V) -> V {
    map2(a, b, |x, y| x & y)
}

#[inline(always)]
fn or(a: V, b: V) -> V {
    map2(a, b, |x, y| x | y)
}

#[inline(always)]
fn xor(a: V, b: V) -> V {
    map2(a, b, |x, y| x ^ y)
}

#[inline(always)]
fn shr52(a: V) -> V {
    a.map(|x| x >> 52)
}

#[inline(always)]
fn shr63(a: V) -> V {
    a.map(|x| x >> 63)
}

/// `acc + lo52((a mod 2^52)·(b mod 2^52))` per lane, as `vpmadd52luq`.
#[inline(always)]
fn madd_lo(acc: V, a: V, b: V) -> V {
    let mut out = acc;
    for i in 0..LANES {
        let p = (a[i] & MASK52) as u128 * (b[i] & MASK52) as u128;
        out[i] = out[i].wrapping_add(p as u64 & MASK52);
    }
    out
}

/// `acc + hi52((a mod 2^52)·(b mod 2^52))` per lane, as `vpmadd52huq`.
#[inline(always)]
fn madd_hi(acc: V, a: V, b: V) -> V {
    let mut out = acc;
    for i in 0..LANES {
        let p = (a[i] & MASK52) as u128 * (b[i] & MASK52) as u128;
        out[i] = out[i].wrapping_add((p >> 52) as u64);
    }
    out
}

/// Hides a mask from the optimizer so that selects stay arithmetic.
#[inline(always)]
fn opaque(v: V) -> V {
    core::hint::black_box(v)
}

lane_engine!();
