//! Limb arrays ↔ num-bigint-dig, and proptest strategies for limbs: the prime engine's and the
//! lanes' tests compare against num-bigint-dig the same way.

use num_bigint_dig::BigUint;
use proptest::prelude::*;

pub fn to_big<const N: usize>(x: &[u64; N]) -> BigUint {
    let bytes: Vec<u8> = x.iter().flat_map(|l| l.to_le_bytes()).collect();
    BigUint::from_bytes_le(&bytes)
}

pub fn from_big<const N: usize>(x: &BigUint) -> [u64; N] {
    let bytes = x.to_bytes_le();
    assert!(bytes.len() <= 8 * N);
    let mut out = [0u64; N];
    for (i, b) in bytes.iter().enumerate() {
        out[i / 8] |= (*b as u64) << (8 * (i % 8));
    }
    out
}

pub fn big_dec(s: &str) -> BigUint {
    BigUint::parse_bytes(s.as_bytes(), 10).unwrap()
}

pub fn limbs<const N: usize>() -> impl Strategy<Value = [u64; N]> {
    proptest::collection::vec(any::<u64>(), N).prop_map(|v| {
        let mut out = [0u64; N];
        out.copy_from_slice(&v);
        out
    })
}
