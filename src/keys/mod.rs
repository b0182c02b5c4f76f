//! Making keys: the RSA key generator and its engines, constant-time key assembly,
//! fingerprints, and the CPU pool that keeps this work off the async runtime. Keys made ahead
//! are `crate::reservoir`'s, a floor up: the reservoir reports to the metrics, and this wing
//! stands below them (`job/` and `dialect/` use it, and the metrics use those).

pub mod cpu;
pub mod fingerprint;
pub mod keygen;
