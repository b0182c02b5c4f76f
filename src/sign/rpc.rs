//! Alibaba RPC signature v1 (`SignatureMethod=HMAC-SHA1`, `SignatureVersion=1.0`), sent as the
//! `Signature` parameter by the classic Python SDK, by Tea with `signature_algorithm = "v2"` and
//! by pop-core:
//!
//! ```text
//! StringToSign = METHOD "&%2F&" pct(canonical_query)
//! Signature    = base64(HMAC-SHA1(key = secret "&", StringToSign))
//! ```
//!
//! The parameters are every query and form-body parameter but `Signature`, URL-decoded.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use zeroize::Zeroizing;

use super::{canonical_pairs, pct};

/// The canonical query: every parameter except `Signature`, sorted by key in byte order (ties
/// by value), each written `pct(key)=pct(value)`, joined with `&`. `params` hold decoded values.
pub fn canonical_query(params: &[(String, String)]) -> String {
    canonical_pairs(params, Some("Signature"))
}

/// `METHOD&%2F&` followed by the percent-encoded canonical query. `method` is the HTTP method
/// as sent (`GET` or `POST`); the `%2F` is the encoded path `/`, which the RPC style always uses.
pub fn string_to_sign(method: &str, params: &[(String, String)]) -> String {
    format!("{method}&%2F&{}", pct(&canonical_query(params)))
}

/// base64 of HMAC-SHA1 over `string_to_sign`, keyed with the AccessKey secret followed by `&`
/// (the `&` is where an OAuth-style token secret would go; Alibaba leaves that part empty).
pub fn signature(secret: &str, string_to_sign: &str) -> String {
    // The key is a copy of the secret: wiped when dropped, like the secret's other copies.
    let mut key = Zeroizing::new(Vec::with_capacity(secret.len() + 1));
    key.extend_from_slice(secret.as_bytes());
    key.push(b'&');
    // HMAC takes a key of any length (a long one is hashed first), so this cannot fail.
    let mut mac = Hmac::<Sha1>::new_from_slice(&key).expect("HMAC accepts keys of any length");
    mac.update(string_to_sign.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}
