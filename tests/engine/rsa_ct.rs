//! The constant-time key assembly (`keyfleet::prime::rsa_ct`) against the `rsa` crate and the outside
//! tools: for the same primes our PKCS#8 DER equals `rsa::RsaPrivateKey::from_p_q`'s byte for
//! byte; engine keys pass `openssl pkey -check` and `ssh-keygen -y` gives back our public line;
//! many random keys satisfy the FIPS 186-5 key-pair relations; the d-size rejection path fires.

use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;

use keyfleet::keys::keygen::{self, Engine, KeyBits};
use keyfleet::prime::random_prime;
use keyfleet::prime::rsa_ct::{self, AssembleError};
use num_bigint_dig::{BigUint, ModInverse};
use num_traits::{One, Zero};
use rand_core::OsRng;
use rsa::pkcs8::EncodePrivateKey;
use rsa::traits::PrivateKeyParts;

fn be<const N: usize>(x: &[u64; N]) -> Vec<u8> {
    x.iter().rev().flat_map(|l| l.to_be_bytes()).collect()
}

/// Two engine primes of 64·N bits, big-endian.
fn primes<const N: usize>() -> (Vec<u8>, Vec<u8>) {
    (
        be(&random_prime::<N>(&mut OsRng)),
        be(&random_prime::<N>(&mut OsRng)),
    )
}

/// lcm by Euclid (test code: variable time is fine).
fn lcm(a: &BigUint, b: &BigUint) -> BigUint {
    let (mut x, mut y) = (a.clone(), b.clone());
    while !y.is_zero() {
        let r = &x % &y;
        x = y;
        y = r;
    }
    a * b / x
}

/// Our DER equals rsa's `from_p_q` DER for the same p, q; and the FIPS relations hold.
fn same_as_rsa_crate(p: &[u8], q: &[u8]) {
    let ours = rsa_ct::assemble(p, q).unwrap();
    let (bp, bq) = (BigUint::from_bytes_be(p), BigUint::from_bytes_be(q));
    let theirs =
        rsa::RsaPrivateKey::from_p_q(bp.clone(), bq.clone(), BigUint::from(65537u32)).unwrap();
    assert_eq!(
        ours.to_pkcs8_der().unwrap().as_bytes(),
        theirs.to_pkcs8_der().unwrap().as_bytes(),
        "PKCS#8 DER differs from rsa's from_p_q"
    );
    // FIPS 186-5: d·e ≡ 1 (mod λ), 2^(nlen/2) < d < λ.
    let one = BigUint::one();
    let (p1, q1) = (&bp - &one, &bq - &one);
    let lambda = lcm(&p1, &q1);
    let d = theirs.d();
    assert_eq!((d * BigUint::from(65537u32)) % &lambda, one);
    assert!(d < &lambda);
    let nlen = ours.bits() as usize;
    assert!(d > &(BigUint::one() << (nlen / 2)));
    let qinv = bq.clone().mod_inverse(&bp).unwrap().to_biguint().unwrap();
    assert_eq!(theirs.crt_coefficient().unwrap(), qinv);
}

#[test]
fn matches_rsa_crate_2048_many() {
    for _ in 0..40 {
        let (p, q) = primes::<16>();
        same_as_rsa_crate(&p, &q);
    }
    // Both orders of one pair: q > p and q < p (qinv = q⁻¹ mod p reduces q first).
    let (p, q) = primes::<16>();
    same_as_rsa_crate(&p, &q);
    same_as_rsa_crate(&q, &p);
}

#[test]
fn matches_rsa_crate_3072_4096() {
    for _ in 0..3 {
        let (p, q) = primes::<24>();
        same_as_rsa_crate(&p, &q);
        let (p, q) = primes::<32>();
        same_as_rsa_crate(&p, &q);
    }
}

/// A pair whose d ≤ 2^(nlen/2) is rejected (and one just above is accepted): 16-bit modulus,
/// threshold 2^8.
#[test]
fn small_d_is_rejected() {
    let small = [
        3u32, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73,
    ]
    .into_iter()
    .chain(
        (129u32..256)
            .step_by(2)
            .filter(|&x| (2..x).all(|k| x % k != 0)),
    )
    .filter(|&x| x >= 128)
    .collect::<Vec<_>>();
    let (mut rejected, mut accepted) = (0, 0);
    for &p in &small {
        for &q in &small {
            if p == q || (p - 1) % 65537 == 0 {
                continue;
            }
            let n = p * q;
            if n < 1 << 15 {
                continue; // needs nlen = 16
            }
            let lambda = lcm(&BigUint::from(p - 1), &BigUint::from(q - 1));
            let d = BigUint::from(65537u32)
                .mod_inverse(lambda)
                .unwrap()
                .to_biguint()
                .unwrap();
            let big = d > BigUint::from(256u32);
            match rsa_ct::assemble(&[p as u8], &[q as u8]) {
                Ok(_) => {
                    assert!(big, "p={p} q={q} d={d}: must be rejected");
                    accepted += 1;
                }
                Err(AssembleError::Rejected) => {
                    assert!(!big, "p={p} q={q} d={d}: wrongly rejected");
                    rejected += 1;
                }
                Err(e) => panic!("p={p} q={q}: {e}"),
            }
        }
    }
    assert!(rejected > 0 && accepted > 0, "{rejected} {accepted}");
}

#[test]
fn invalid_primes_are_refused() {
    assert!(matches!(
        rsa_ct::assemble(&[250], &[241]),
        Err(AssembleError::Invalid(_))
    ));
    assert!(matches!(
        rsa_ct::assemble(&[251], &[251]),
        Err(AssembleError::Invalid(_))
    ));
    assert!(matches!(
        rsa_ct::assemble(&[251], &[0, 241]),
        Err(AssembleError::Invalid(_))
    ));
}

fn write_0600(path: &std::path::Path, data: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(data).unwrap();
}

fn have(tool: &str, arg: &str) -> bool {
    let ok = Command::new(tool).arg(arg).output().is_ok();
    if !ok {
        eprintln!("{tool} not found: skipping");
    }
    ok
}

/// Engine keys of every size (and the comparison engines' keys) through `openssl pkey -check`
/// and `ssh-keygen -y -f`; fingerprints_of_pem agrees with encode.
#[test]
fn openssl_and_ssh_keygen_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (KeyBits::B2048, Engine::Fast),
        (KeyBits::B2048, Engine::Fast),
        (KeyBits::B3072, Engine::Fast),
        (KeyBits::B4096, Engine::Fast),
        (KeyBits::B2048, Engine::CryptoPrimes),
        (KeyBits::B2048, Engine::RsaCrate),
    ];
    let (openssl, ssh) = (have("openssl", "version"), have("ssh-keygen", "-?"));
    for (i, (bits, engine)) in cases.into_iter().enumerate() {
        let key = keygen::generate_private(bits, engine).unwrap();
        assert_eq!(key.bits() as usize, bits.bits());
        let km = keygen::encode(&key).unwrap();
        assert_eq!(
            keygen::fingerprints_of_pem(&km.private_pem).unwrap(),
            (km.fingerprint_md5.clone(), km.fingerprint_sha256.clone())
        );
        let path = dir.path().join(format!("k{i}.pem"));
        write_0600(&path, km.private_pem.as_bytes());
        if openssl {
            let out = Command::new("openssl")
                .args(["pkey", "-check", "-noout", "-in"])
                .arg(&path)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && text.contains("Key is valid"),
                "{text}"
            );
        }
        if ssh {
            let out = Command::new("ssh-keygen")
                .arg("-y")
                .arg("-f")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let line = String::from_utf8(out.stdout).unwrap();
            assert_eq!(line.trim(), km.public_line.trim());
        }
    }
}

/// A PKCS#1 (`RSA PRIVATE KEY`) PEM gives the same fingerprints as the PKCS#8 one.
#[test]
fn fingerprints_of_pkcs1_pem() {
    use pkcs8::der::pem::LineEnding;
    let key = keygen::generate_private(KeyBits::B2048, Engine::Fast).unwrap();
    let km = keygen::encode(&key).unwrap();
    let pkcs1 = key
        .to_pkcs1_der()
        .unwrap()
        .to_pem("RSA PRIVATE KEY", LineEnding::LF)
        .unwrap();
    assert_eq!(
        keygen::fingerprints_of_pem(&pkcs1).unwrap(),
        (km.fingerprint_md5, km.fingerprint_sha256)
    );
    assert!(
        keygen::fingerprints_of_pem("-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n")
            .is_err()
    );
    assert!(!format!("{key:?}").contains(&km.private_pem[40..60]));
}
