//! Making keys: the RSA key generator and its engines, constant-time key assembly,
//! fingerprints, and the CPU pool that keeps this work off the async runtime. Keys made ahead
//! are `crate::reservoir`'s, a floor up: it reports to the metrics, which this wing is below.

pub mod cpu;
pub mod fingerprint;
pub mod keygen;
