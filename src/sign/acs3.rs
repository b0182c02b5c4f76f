//! Alibaba signature V3, `ACS3-HMAC-SHA256`: the Tea SDKs' default (Python and Node). The
//! request carries
//! `Authorization: ACS3-HMAC-SHA256 Credential=<AK>,SignedHeaders=<h1;h2…>,Signature=<hex>` and
//!
//! ```text
//! CanonicalRequest = METHOD \n / \n canonical query \n
//!                    h1:trimmed value \n h2:… \n \n
//!                    h1;h2… \n x-acs-content-sha256
//! StringToSign     = "ACS3-HMAC-SHA256\n" hex(SHA-256(CanonicalRequest))
//! Signature        = hex(HMAC-SHA256(key = secret, StringToSign))
//! ```
//!
//! The headers signed are the ones the client lists, in its order (Python signs `accept` and
//! `user-agent`, Node does not). Which of them a server insists on (at least `host` and the
//! `x-acs-*` ones) and that `x-acs-content-sha256` equals [`content_sha256`] of the body are the
//! caller's checks: this module only computes.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::canonical_pairs;

/// The one V3 algorithm this module computes. Tea can also be told to use `ACS3-HMAC-SM3` or
/// `ACS3-RSA-SHA256`; [`parse_authorization`] reads those too, so a caller can answer them
/// with a clear error instead of a signature mismatch.
pub const ALGORITHM: &str = "ACS3-HMAC-SHA256";

/// The parts of an `Authorization: ACS3-…` header. Nothing in it is secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    /// `ACS3-HMAC-SHA256`, or another `ACS3-` algorithm the caller may not support.
    pub algorithm: String,
    /// The `Credential`: the AccessKey id.
    pub access_key_id: String,
    /// The `SignedHeaders`, in the order sent, as sent (the SDKs send them in lower case).
    pub signed_headers: Vec<String>,
    /// The `Signature`, as sent (lower-case hex from the SDKs).
    pub signature: String,
}

/// Why an `Authorization` header is not one of the form
/// `ACS3-<alg> Credential=<AK>,SignedHeaders=<h1;h2…>,Signature=<sig>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MalformedAuthorization {
    #[error("the Authorization header does not start with an ACS3- algorithm")]
    NotAcs3,
    #[error("the Authorization header has no {0}")]
    Missing(&'static str),
    #[error("the Authorization header gives {0} more than once")]
    Repeated(&'static str),
    #[error("the Authorization header's {0} is empty")]
    Empty(&'static str),
    #[error("the Authorization header has an unknown part {0:?}")]
    UnknownPart(String),
}

/// A header named in `SignedHeaders` that the request does not carry: the signature cannot be
/// checked, and the request is not one the SDKs send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("signed header {name:?} is not in the request")]
pub struct MissingHeader {
    pub name: String,
}

/// Splits an `Authorization` header into its parts. Spaces after the algorithm and around the
/// commas are tolerated; a missing, repeated, empty or unknown part is refused, and so is a
/// `SignedHeaders` list with an empty entry (`a;;b`): every header the server trusts must be
/// named. The algorithm is only checked to be an `ACS3-` one; compare it with [`ALGORITHM`].
pub fn parse_authorization(header: &str) -> Result<Authorization, MalformedAuthorization> {
    use MalformedAuthorization as E;
    let header = header.trim();
    let (algorithm, rest) = header
        .split_once(|c: char| c.is_ascii_whitespace())
        .ok_or(E::NotAcs3)?;
    if !algorithm.starts_with("ACS3-") || algorithm.len() == "ACS3-".len() {
        return Err(E::NotAcs3);
    }
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| E::UnknownPart(part.to_owned()))?;
        let (slot, name) = match key.trim() {
            "Credential" => (&mut credential, "Credential"),
            "SignedHeaders" => (&mut signed_headers, "SignedHeaders"),
            "Signature" => (&mut signature, "Signature"),
            _ => return Err(E::UnknownPart(part.to_owned())),
        };
        if slot.is_some() {
            return Err(E::Repeated(name));
        }
        let value = value.trim();
        if value.is_empty() {
            return Err(E::Empty(name));
        }
        *slot = Some(value);
    }
    let access_key_id = credential.ok_or(E::Missing("Credential"))?;
    let signed_headers = signed_headers.ok_or(E::Missing("SignedHeaders"))?;
    let signature = signature.ok_or(E::Missing("Signature"))?;
    let signed_headers: Vec<String> = signed_headers.split(';').map(str::to_owned).collect();
    if signed_headers.iter().any(String::is_empty) {
        return Err(E::Empty("SignedHeaders entry"));
    }
    Ok(Authorization {
        algorithm: algorithm.to_owned(),
        access_key_id: access_key_id.to_owned(),
        signed_headers,
        signature: signature.to_owned(),
    })
}

/// The canonical request. `query` holds every query parameter, decoded (V3 signs all of them;
/// a stray `Signature` parameter is signed too, unlike RPC); `headers` the request's headers
/// with lower-case names and raw values; `signed_headers` the `SignedHeaders` list as sent;
/// `content_sha256` the `x-acs-content-sha256` header as sent.
///
/// A signed header sent more than once is signed as its values joined with `,` in the order
/// received, which is what the repeated header means in HTTP; a caller that reads such a
/// header must read it the same way.
pub fn canonical_request(
    method: &str,
    query: &[(String, String)],
    headers: &[(String, String)],
    signed_headers: &[String],
    content_sha256: &str,
) -> Result<String, MissingHeader> {
    let mut out = format!("{method}\n/\n{}\n", canonical_pairs(query, None));
    for name in signed_headers {
        let mut values = headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.trim());
        let first = values
            .next()
            .ok_or_else(|| MissingHeader { name: name.clone() })?;
        out.push_str(name);
        out.push(':');
        out.push_str(first);
        for more in values {
            out.push(',');
            out.push_str(more);
        }
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&signed_headers.join(";"));
    out.push('\n');
    out.push_str(content_sha256);
    Ok(out)
}

/// `ACS3-HMAC-SHA256\n` followed by the lower-case hex SHA-256 of the canonical request.
pub fn string_to_sign(canonical_request: &str) -> String {
    format!(
        "{ALGORITHM}\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    )
}

/// Lower-case hex of HMAC-SHA256 over `sts`, keyed with the AccessKey secret itself (V3 adds
/// no `&`, unlike RPC).
pub fn signature(secret: &str, sts: &str) -> String {
    // HMAC takes a key of any length (a long one is hashed first), so this cannot fail.
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(sts.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Lower-case hex SHA-256 of the body: the value `x-acs-content-sha256` must carry (for an
/// empty body `e3b0c442…b855`).
pub fn content_sha256(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// The `Authorization` header value a client sends, in the Tea SDKs' exact form (no spaces
/// after the commas); [`parse_authorization`] reads it back.
pub fn authorization_header(
    access_key_id: &str,
    signed_headers: &[String],
    signature: &str,
) -> String {
    format!(
        "{ALGORITHM} Credential={access_key_id},SignedHeaders={},Signature={signature}",
        signed_headers.join(";")
    )
}
