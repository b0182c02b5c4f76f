//! Criterion benchmarks of key generation (per engine) and of the per-key encoding work
//! (PKCS#8 PEM, OpenSSH line, fingerprints). Throughput of whole runs: `keyfleet bench`.

use criterion::{criterion_group, criterion_main, Criterion};
use keyfleet::keys::keygen::{self, Engine, KeyBits};

fn keygen_rsa2048(c: &mut Criterion) {
    let mut g = c.benchmark_group("keygen_rsa2048");
    // A key takes tens of milliseconds with a wide spread; ten samples keep the run short.
    g.sample_size(10);
    for engine in [Engine::Fast, Engine::CryptoPrimes, Engine::RsaCrate] {
        g.bench_function(engine.to_string(), |b| {
            b.iter(|| keygen::generate_private(KeyBits::B2048, engine).expect("keygen"))
        });
    }
    g.finish();
}

fn encoding(c: &mut Criterion) {
    let key = keygen::generate_private(KeyBits::B2048, Engine::Fast).expect("keygen");
    c.bench_function("encode_rsa2048", |b| {
        b.iter(|| keygen::encode(&key).expect("encode"))
    });
}

criterion_group!(benches, keygen_rsa2048, encoding);
criterion_main!(benches);
