//! RSA key pairs: which engine makes them, and the encodings every consumer needs
//! (PKCS#8 PEM private key, OpenSSH public-key line, fingerprints).
//!
//! Generation is CPU-bound and must run on the rayon pool (`cpu.rs`), never on the async runtime.
//!
//! Every engine's key is assembled from its two primes by the constant-time
//! [`crate::prime::rsa_ct::assemble`] (n, d, CRT values, FIPS 186-5 checks, pair-wise consistency test)
//! and encoded by [`encode`] with the `pkcs1`/`pkcs8`/`ssh-key` crates. The `rsa` crate is used
//! in exactly one place: the `rsa-crate` comparison engine ([`Engine::RsaCrate`]), which draws
//! its primes with `rsa::RsaPrivateKey::new` (variable-time, as that engine always was) and then
//! hands p and q to the same assembly, so all engines produce the same key type and encoding.

use std::fmt;
use std::str::FromStr;

use zeroize::Zeroizing;

use crate::keys::fingerprint;
use crate::prime::rsa_ct::{self, AssembleError};

/// The private key every engine returns: zeroized on drop, redacting `Debug`.
pub use crate::prime::rsa_ct::RsaPrivate as PrivateKey;

/// RSA modulus sizes keyfleet creates. The clouds accept these; anything smaller is unsafe and
/// anything larger is slow enough to be a mistake.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "u32", into = "u32")]
pub enum KeyBits {
    #[default]
    B2048,
    B3072,
    B4096,
}

impl KeyBits {
    pub fn bits(self) -> usize {
        match self {
            KeyBits::B2048 => 2048,
            KeyBits::B3072 => 3072,
            KeyBits::B4096 => 4096,
        }
    }
}

impl TryFrom<u32> for KeyBits {
    type Error = String;
    fn try_from(v: u32) -> Result<Self, String> {
        match v {
            2048 => Ok(KeyBits::B2048),
            3072 => Ok(KeyBits::B3072),
            4096 => Ok(KeyBits::B4096),
            other => Err(format!(
                "unsupported RSA key size {other}: use 2048, 3072 or 4096"
            )),
        }
    }
}

impl From<KeyBits> for u32 {
    fn from(b: KeyBits) -> u32 {
        b.bits() as u32
    }
}

impl FromStr for KeyBits {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let v: u32 = s
            .trim()
            .parse()
            .map_err(|_| format!("'{s}' is not a key size: use 2048, 3072 or 4096"))?;
        KeyBits::try_from(v)
    }
}

impl fmt::Display for KeyBits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.bits())
    }
}

/// Which prime source makes the keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    /// keyfleet's own engine (`prime/`: constant-time sieve, Miller-Rabin and fixed-size
    /// Montgomery arithmetic): the default.
    #[default]
    Fast,
    /// crypto-primes 0.7 (sieve + BPSW on crypto-bigint's constant-time arithmetic) feeding
    /// the constant-time key assembly.
    CryptoPrimes,
    /// `rsa` 0.9's `RsaPrivateKey::new`: the reference baseline (its primes, re-assembled by
    /// the constant-time key assembly so the output type and encoding are the same).
    RsaCrate,
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Engine::Fast => "fast",
            Engine::CryptoPrimes => "crypto-primes",
            Engine::RsaCrate => "rsa-crate",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    #[error("key generation failed: {0}")]
    Generate(String),
    #[error("key encoding failed: {0}")]
    Encode(String),
}

/// A freshly made key pair with everything derived from it. The private half is only ever held
/// in `Zeroizing` buffers (and [`PrivateKey`] zeroizes itself on drop).
pub struct KeyMaterial {
    pub private_pem: Zeroizing<String>,
    /// `ssh-rsa AAAA…` (no comment).
    pub public_line: String,
    /// `aa:bb:…`, MD5 over the SSH wire blob (Alibaba's KeyPairFingerPrint).
    pub fingerprint_md5: String,
    /// `SHA256:…`, as `ssh-keygen -l -E sha256` prints it.
    pub fingerprint_sha256: String,
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyMaterial")
            .field("private_pem", &"<redacted>")
            .field("public_line", &self.public_line)
            .field("fingerprint_md5", &self.fingerprint_md5)
            .finish()
    }
}

/// Makes the RSA private key only (the expensive part).
pub fn generate_private(bits: KeyBits, engine: Engine) -> Result<PrivateKey, KeygenError> {
    match engine {
        Engine::Fast => crate::prime::generate_rsa_key(bits.bits())
            .map_err(|e| KeygenError::Generate(e.to_string())),
        Engine::CryptoPrimes => crypto_primes_key(bits),
        Engine::RsaCrate => rsa_crate_key(bits),
    }
}

/// The `rsa-crate` comparison engine: `rsa` 0.9's own generator (variable-time; this engine
/// exists to compare against), its primes re-assembled in constant time.
fn rsa_crate_key(bits: KeyBits) -> Result<PrivateKey, KeygenError> {
    use rsa::traits::PrivateKeyParts;
    loop {
        let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, bits.bits())
            .map_err(|e| KeygenError::Generate(e.to_string()))?;
        let primes = key.primes();
        let len = bits.bits() / 16;
        let p = Zeroizing::new(left_pad(&primes[0].to_bytes_be(), len));
        let q = Zeroizing::new(left_pad(&primes[1].to_bytes_be(), len));
        match rsa_ct::assemble(&p, &q) {
            Ok(key) => return Ok(key),
            Err(AssembleError::Rejected) => continue,
            Err(e) => return Err(KeygenError::Generate(e.to_string())),
        }
    }
}

/// `bytes` left-padded with zeros to `len` (a shorter prime must still occupy the full width).
fn left_pad(bytes: &[u8], len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len.saturating_sub(bytes.len())];
    out.extend_from_slice(bytes);
    out
}

/// rand_core 0.10 view of the OS CSPRNG (crypto-primes speaks 0.10; `rsa` 0.9 speaks 0.6).
struct OsRng10;

impl rand_core10::TryRng for OsRng10 {
    type Error = std::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(rand_core::RngCore::next_u32(&mut rand_core::OsRng))
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(rand_core::RngCore::next_u64(&mut rand_core::OsRng))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, dst);
        Ok(())
    }
}

impl rand_core10::TryCryptoRng for OsRng10 {}

/// One prime of `bits` bits with its two top bits set (so p·q has exactly 2·bits bits) and
/// p mod 65537 ≠ 1 (so gcd(e, p−1) = 1), from crypto-primes' sieve and BPSW test.
fn crypto_prime<const L: usize>(bits: u32) -> Result<Zeroizing<Vec<u8>>, KeygenError>
where
    crypto_bigint::Uint<L>: crypto_bigint::Encoding,
{
    use crypto_bigint::Uint;
    use crypto_primes::hazmat::{SetBits, SmallFactorsSieveFactory};
    use crypto_primes::Flavor;
    let factory = SmallFactorsSieveFactory::<Uint<L>>::new(Flavor::Any, bits, SetBits::TwoMsb)
        .map_err(|e| KeygenError::Generate(e.to_string()))?;
    let e = crypto_bigint::NonZero::new(Uint::<L>::from_u32(65_537))
        .into_option()
        .ok_or_else(|| KeygenError::Generate("zero exponent".into()))?;
    let p: Uint<L> = crypto_primes::sieve_and_find(&mut OsRng10, factory, |_, c| {
        c.rem(&e) != Uint::ONE && crypto_primes::is_prime(Flavor::Any, c)
    })
    .map_err(|e| KeygenError::Generate(e.to_string()))?
    .ok_or_else(|| KeygenError::Generate("the prime sieve ran dry".into()))?;
    Ok(Zeroizing::new(p.to_be_bytes().as_ref().to_vec()))
}

fn crypto_primes_key(bits: KeyBits) -> Result<PrivateKey, KeygenError> {
    let half = (bits.bits() / 2) as u32;
    let prime = || match bits {
        KeyBits::B2048 => crypto_prime::<16>(half),
        KeyBits::B3072 => crypto_prime::<24>(half),
        KeyBits::B4096 => crypto_prime::<32>(half),
    };
    loop {
        let (p, q) = (prime()?, prime()?);
        // The assembly checks FIPS 186-5's |p − q| and d-size conditions in constant time.
        match rsa_ct::assemble(&p, &q) {
            Ok(key) => return Ok(key),
            Err(AssembleError::Rejected) => continue,
            Err(e) => return Err(KeygenError::Generate(e.to_string())),
        }
    }
}

/// Encodes a private key into everything a result carries.
pub fn encode(key: &PrivateKey) -> Result<KeyMaterial, KeygenError> {
    let private_pem = key
        .to_pkcs8_pem()
        .map_err(|e| KeygenError::Encode(e.to_string()))?;
    material(private_pem, &key.n_be(), &key.e_be())
}

/// A PEM with the public line and fingerprints of its modulus `n` and exponent `e`.
fn material(
    private_pem: Zeroizing<String>,
    n: &[u8],
    e: &[u8],
) -> Result<KeyMaterial, KeygenError> {
    let public = fingerprint::ssh_public(n, e).map_err(KeygenError::Encode)?;
    let public_line = public
        .to_openssh()
        .map_err(|e| KeygenError::Encode(e.to_string()))?;
    let (fingerprint_md5, fingerprint_sha256) =
        fingerprint::fingerprints(&public).map_err(KeygenError::Encode)?;
    Ok(KeyMaterial {
        private_pem,
        public_line,
        fingerprint_md5,
        fingerprint_sha256,
    })
}

/// The SSH fingerprints (`aa:bb:…` MD5, `SHA256:…`) of the public half of a PKCS#8 (or PKCS#1)
/// PEM private key: what a delivered key file is checked against in the registry. Only n and e
/// are read from the ASN.1 structure; nothing is computed on the private values.
pub fn fingerprints_of_pem(pem: &str) -> Result<(String, String), KeygenError> {
    let (n, e) = fingerprint::public_of_pem(pem).map_err(KeygenError::Encode)?;
    let public = fingerprint::ssh_public(&n, &e).map_err(KeygenError::Encode)?;
    fingerprint::fingerprints(&public).map_err(KeygenError::Encode)
}

/// The key material of a PEM private key this process made before (a key file an unfinished
/// attempt left): its public line and fingerprints, read from n and e only. The PEM is kept
/// as it is, byte for byte, so delivering it again finds the same file.
pub fn material_of_pem(private_pem: Zeroizing<String>) -> Result<KeyMaterial, KeygenError> {
    let (n, e) = fingerprint::public_of_pem(&private_pem).map_err(KeygenError::Encode)?;
    material(private_pem, &n, &e)
}

/// Generates and encodes one key pair.
pub fn generate(bits: KeyBits, engine: Engine) -> Result<KeyMaterial, KeygenError> {
    let key = generate_private(bits, engine)?;
    encode(&key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_bits_accepts_only_supported_sizes() {
        assert_eq!("2048".parse::<KeyBits>().unwrap(), KeyBits::B2048);
        assert_eq!("4096".parse::<KeyBits>().unwrap(), KeyBits::B4096);
        for bad in ["1024", "2047", "8192", "", "abc", "-1"] {
            let err = bad.parse::<KeyBits>().unwrap_err();
            assert!(err.contains("2048, 3072 or 4096"), "{bad}: {err}");
        }
    }

    #[test]
    fn debug_never_prints_the_private_key() {
        let km = generate(KeyBits::B2048, Engine::Fast).unwrap();
        let dbg = format!("{km:?}");
        assert!(!dbg.contains("PRIVATE KEY"));
        assert!(km.private_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(km.public_line.starts_with("ssh-rsa AAAA"));
        let (md5, sha256) = fingerprints_of_pem(&km.private_pem).unwrap();
        assert_eq!((md5, sha256), (km.fingerprint_md5, km.fingerprint_sha256));
    }
}
