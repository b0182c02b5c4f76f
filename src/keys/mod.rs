//! Making keys: the RSA key generator and its engines, constant-time key assembly, keys made
//! ahead, fingerprints, and the CPU pool that keeps this work off the async runtime.

pub mod cpu;
pub mod fingerprint;
pub mod keygen;
pub mod reservoir;
