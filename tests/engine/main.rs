//! The prime engine, the lanes, constant-time RSA, request signing and the fuzz corpora: pure
//! library tests, in this process, with no servers and no `keyfleet` binary.

#[path = "../util/mod.rs"]
mod util;

mod fuzz_corpus;
mod lanes;
mod prime;
mod rsa_ct;
mod sign;
