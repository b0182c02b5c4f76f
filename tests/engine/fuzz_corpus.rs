//! Replays every committed fuzz corpus (`fuzz/corpus/<target>/`) through the checks the fuzz
//! targets run (`fuzz/common/mod.rs`), on stable and without libFuzzer: a corpus input that
//! once found a fault keeps being tried by the normal `cargo test`.

#[path = "../../fuzz/common/mod.rs"]
mod common;

use std::path::Path;

fn replay(target: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no corpus", dir.display());
    for file in files {
        let data = std::fs::read(&file).unwrap();
        let run = std::panic::catch_unwind(|| common::check(target, &data));
        assert!(run.is_ok(), "{target}: {} panicked", file.display());
    }
}

#[test]
fn every_target_has_a_corpus() {
    for target in common::TARGETS {
        assert!(Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target)
            .is_dir());
    }
}

#[test]
fn batch_row_corpus() {
    replay("batch_row");
}

#[test]
fn job_message_corpus() {
    replay("job_message");
}

#[test]
fn dialect_decode_corpus() {
    replay("dialect_decode");
}

#[test]
fn serve_request_corpus() {
    replay("serve_request");
}

/// The signed modes really get past the gateway (else `serve_request` would only ever fuzz
/// refusals), and a raw request with a made-up signature does not.
#[test]
fn signed_requests_are_admitted() {
    let create = "CreateKeyPair\nRegionId=cn-hangzhou\nKeyPairName=web-01";
    for mode in ['1', '5', '2', '6'] {
        let input = format!("{mode}{create}");
        assert_eq!(
            common::serve_outcome(input.as_bytes()),
            Some(true),
            "{input}"
        );
    }
    for mode in ['3', '7'] {
        let input = format!("{mode}CreateUHostKeyPair\nRegion=cn-bj2\nKeyPairName=k1");
        assert_eq!(
            common::serve_outcome(input.as_bytes()),
            Some(true),
            "{input}"
        );
    }
    let forged = "0POST \ncontent-type: application/x-www-form-urlencoded\n\n\
                  Action=CreateUHostKeyPair&PublicKey=ucloudpub&Signature=00&Region=cn-bj2";
    assert_eq!(common::serve_outcome(forged.as_bytes()), Some(false));
}
