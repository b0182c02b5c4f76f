//! Request signatures of the clouds keyfleet speaks to, as pure functions: no I/O, no clock,
//! no key lookup. `keyfleet serve` uses them to verify requests from the official SDKs; a
//! client uses the same functions to sign requests to a real cloud.
//!
//! - `rpc.rs`: Alibaba RPC v1 (`HMAC-SHA1`, `Signature` parameter): the classic SDK, Tea with
//!   `signature_algorithm = "v2"`, pop-core.
//! - `acs3.rs`: Alibaba V3 (`Authorization: ACS3-HMAC-SHA256 …`): the Tea SDKs' default.
//! - `ucloud.rs`: UCloud (hex SHA-1 over the sorted parameters and the private key). It signs no
//!   timestamp or nonce, so a captured UCloud request can be replayed as often as anyone likes.
//! - Here: the RFC 3986 percent-encoding both Alibaba schemes share ([`pct`]) and the
//!   constant-time comparison every verifier must use ([`ct_eq`]).
//!
//! Every function takes parameters already URL-decoded: a server decodes the query and the form
//! body first (`+` and `%20` are both a space, `*` and `%2A` both a star) and these functions
//! re-encode them one canonical way, which is what makes SDKs that escape differently agree.

pub mod acs3;
pub mod rpc;
pub mod ucloud;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use subtle::ConstantTimeEq;

/// Everything but RFC 3986's unreserved characters `A-Za-z0-9-_.~` is escaped. The crate's
/// `NON_ALPHANUMERIC` escapes every ASCII non-alphanumeric (and all non-ASCII bytes), so only
/// the four unreserved punctuation marks are taken out of it.
const RFC3986: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Alibaba's percent-encoding: unreserved `A-Za-z0-9-_.~` kept, every other byte of the UTF-8
/// form as `%XX` in upper case, so a space is `%20` (never `+`), `*` is `%2A`, `~` stays.
pub fn pct(s: &str) -> String {
    utf8_percent_encode(s, RFC3986).to_string()
}

/// Whether `a` and `b` are equal, in time that depends only on their lengths: comparing a
/// received signature with `==` would tell an attacker, by timing, how many leading characters
/// of a forged one are right.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// The Alibaba canonical query string: pairs sorted by key in byte order, ties by value (so the
/// result does not depend on the order the parameters arrived in), each written `pct(k)=pct(v)`,
/// joined with `&`. Pairs whose key is `skip` are left out.
fn canonical_pairs(params: &[(String, String)], skip: Option<&str>) -> String {
    let mut sorted: Vec<&(String, String)> = params
        .iter()
        .filter(|(k, _)| Some(k.as_str()) != skip)
        .collect();
    // `String`'s order is byte order; tuples compare the key first, then the value.
    sorted.sort();
    let mut out = String::new();
    for (i, (k, v)) in sorted.into_iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(&pct(k));
        out.push('=');
        out.push_str(&pct(v));
    }
    out
}
