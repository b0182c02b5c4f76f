//! RSA key pairs: which engine makes them, and the encodings every consumer needs
//! (PKCS#8 PEM private key, OpenSSH public-key line, fingerprints).
//!
//! Generation is CPU-bound and must run on the rayon pool (`cpu.rs`), never on the async runtime.

use std::fmt;
use std::str::FromStr;

use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use rsa::traits::PrivateKeyParts;
use rsa::RsaPrivateKey;
use zeroize::Zeroizing;

use crate::fingerprint;

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    /// keyfleet's own engine (`prime/`: constant-time sieve, Miller-Rabin and fixed-size
    /// Montgomery arithmetic): the default.
    #[default]
    Fast,
    /// crypto-primes 0.7 (sieve + BPSW on crypto-bigint's constant-time arithmetic) feeding
    /// `RsaPrivateKey::from_p_q`.
    CryptoPrimes,
    /// `rsa` 0.9's `RsaPrivateKey::new`: the reference baseline.
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
/// in `Zeroizing` buffers (and `RsaPrivateKey` zeroizes itself on drop).
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
pub fn generate_private(bits: KeyBits, engine: Engine) -> Result<RsaPrivateKey, KeygenError> {
    match engine {
        Engine::Fast => crate::prime::generate_rsa_key(bits.bits())
            .map_err(|e| KeygenError::Generate(e.to_string())),
        Engine::CryptoPrimes => crypto_primes_key(bits),
        Engine::RsaCrate => RsaPrivateKey::new(&mut rand_core::OsRng, bits.bits())
            .map_err(|e| KeygenError::Generate(e.to_string())),
    }
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

fn crypto_primes_key(bits: KeyBits) -> Result<RsaPrivateKey, KeygenError> {
    use rsa::BigUint;
    let half = (bits.bits() / 2) as u32;
    let prime = || match bits {
        KeyBits::B2048 => crypto_prime::<16>(half),
        KeyBits::B3072 => crypto_prime::<24>(half),
        KeyBits::B4096 => crypto_prime::<32>(half),
    };
    loop {
        let (p, q) = (prime()?, prime()?);
        let (p, q) = (BigUint::from_bytes_be(&p), BigUint::from_bytes_be(&q));
        // FIPS 186-5 A.1.3: |p − q| > 2^(nlen/2 − 100).
        let diff = if p > q { &p - &q } else { &q - &p };
        if diff.bits() <= bits.bits() / 2 - 100 {
            continue;
        }
        let mut key = RsaPrivateKey::from_p_q(p, q, BigUint::from(65_537u32))
            .map_err(|e| KeygenError::Generate(e.to_string()))?;
        // FIPS 186-5: d > 2^(nlen/2).
        if key.d().bits() <= bits.bits() / 2 {
            continue;
        }
        key.precompute()
            .map_err(|e| KeygenError::Generate(e.to_string()))?;
        return Ok(key);
    }
}

/// Encodes a private key into everything a result carries.
pub fn encode(key: &RsaPrivateKey) -> Result<KeyMaterial, KeygenError> {
    let private_pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| KeygenError::Encode(e.to_string()))?;
    let public = ssh_key::public::RsaPublicKey::try_from(key.to_public_key())
        .map_err(|e| KeygenError::Encode(e.to_string()))?;
    let public = ssh_key::PublicKey::from(ssh_key::public::KeyData::Rsa(public));
    let public_line = public
        .to_openssh()
        .map_err(|e| KeygenError::Encode(e.to_string()))?;
    let blob = public
        .to_bytes()
        .map_err(|e| KeygenError::Encode(e.to_string()))?;
    Ok(KeyMaterial {
        private_pem,
        public_line,
        fingerprint_md5: fingerprint::md5_colon(&blob),
        fingerprint_sha256: fingerprint::sha256_base64(&blob),
    })
}

/// The SSH fingerprints (`aa:bb:…` MD5, `SHA256:…`) of the public half of a PKCS#8 PEM private
/// key: what a delivered key file is checked against in the registry.
pub fn fingerprints_of_pem(pem: &str) -> Result<(String, String), KeygenError> {
    use rsa::pkcs8::DecodePrivateKey;
    let key = RsaPrivateKey::from_pkcs8_pem(pem).map_err(|e| KeygenError::Encode(e.to_string()))?;
    let public = ssh_key::public::RsaPublicKey::try_from(key.to_public_key())
        .map_err(|e| KeygenError::Encode(e.to_string()))?;
    let blob = ssh_key::PublicKey::from(ssh_key::public::KeyData::Rsa(public))
        .to_bytes()
        .map_err(|e| KeygenError::Encode(e.to_string()))?;
    Ok((
        fingerprint::md5_colon(&blob),
        fingerprint::sha256_base64(&blob),
    ))
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
