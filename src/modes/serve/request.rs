//! One API request as the gateway sees it: method, headers, the parameters of the query string
//! and of the body (`application/x-www-form-urlencoded`, or for UCloud `application/json`), each
//! URL-decoded exactly once. Signatures are computed over these decoded values.

use axum::http::{HeaderMap, Method};
use bytes::Bytes;

use crate::dialect::ApiError;

/// Parameters, in the order they arrived (signing sorts them itself).
pub type Pairs = Vec<(String, String)>;

#[derive(Debug)]
pub struct ApiRequest {
    pub method: Method,
    pub headers: HeaderMap,
    pub query: Pairs,
    /// Parameters from the body (form fields, or a JSON object's members).
    pub form: Pairs,
    pub body: Bytes,
}

impl ApiRequest {
    pub fn parse(
        method: Method,
        raw_query: Option<&str>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<ApiRequest, ApiError> {
        let query = decode_form(raw_query.unwrap_or("").as_bytes());
        let content_type = headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let form = if body.is_empty() {
            Vec::new()
        } else if content_type.starts_with("application/x-www-form-urlencoded") {
            decode_form(&body)
        } else if content_type.starts_with("application/json") {
            json_params(&body)?
        } else {
            // A V3 request may carry a body of another type: it is covered by
            // x-acs-content-sha256, and no key-pair action takes one.
            Vec::new()
        };
        Ok(ApiRequest {
            method,
            headers,
            query,
            form,
            body,
        })
    }

    /// Query and body parameters together.
    pub fn all_params(&self) -> impl Iterator<Item = &(String, String)> {
        self.query.iter().chain(self.form.iter())
    }

    /// A parameter's value from the query or the body.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.all_params()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// `a=1&b=x+y%20z`: `+` is a space, each `%XX` decoded once, invalid UTF-8 replaced.
fn decode_form(raw: &[u8]) -> Pairs {
    form_urlencoded::parse(raw)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// A UCloud JSON body: a flat object. Strings as they are; numbers as written (a float with
/// no fraction without `.0`, as the SDK signs it); booleans `true`/`false`; an array `K` of
/// scalars becomes `K.0`, `K.1`, … (the SDK's numbering of lists). Nested objects are refused:
/// how UCloud would sign them is undocumented.
fn json_params(body: &[u8]) -> Result<Pairs, ApiError> {
    let bad = |reason: &str| ApiError::InvalidParameter {
        name: "body".into(),
        reason: reason.into(),
    };
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| bad("the JSON body is not valid JSON"))?;
    let serde_json::Value::Object(map) = value else {
        return Err(bad("the JSON body is not an object"));
    };
    let mut out = Vec::with_capacity(map.len());
    for (k, v) in map {
        match v {
            serde_json::Value::Array(items) => {
                for (i, item) in items.into_iter().enumerate() {
                    out.push((
                        format!("{k}.{i}"),
                        scalar(item).ok_or_else(|| bad("nested values are not supported"))?,
                    ));
                }
            }
            v => out.push((
                k,
                scalar(v).ok_or_else(|| bad("nested values are not supported"))?,
            )),
        }
    }
    Ok(out)
}

fn scalar(v: serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        serde_json::Value::Number(n) => Some(match n.as_f64() {
            Some(f) if !n.is_i64() && !n.is_u64() && f.fract() == 0.0 && f.abs() < 1e15 => {
                format!("{}", f as i64)
            }
            _ => n.to_string(),
        }),
        serde_json::Value::Null => Some(String::new()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decodes_plus_and_percent_once() {
        let p = decode_form(b"a=x+y%20z&b=%2A%252A&c=");
        assert_eq!(
            p,
            vec![
                ("a".into(), "x y z".into()),
                ("b".into(), "*%2A".into()),
                ("c".into(), "".into())
            ]
        );
    }

    #[test]
    fn json_bodies_flatten_as_the_sdk_signs() {
        let p =
            json_params(br#"{"Limit":10,"F":1.0,"G":1.5,"B":true,"L":["a","b"],"S":"x"}"#).unwrap();
        let get = |k: &str| p.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("Limit"), Some("10"));
        assert_eq!(get("F"), Some("1"));
        assert_eq!(get("G"), Some("1.5"));
        assert_eq!(get("B"), Some("true"));
        assert_eq!(get("L.0"), Some("a"));
        assert_eq!(get("L.1"), Some("b"));
        assert!(json_params(br#"{"a":{"b":1}}"#).is_err());
        assert!(json_params(b"[1]").is_err());
        assert!(json_params(b"nope").is_err());
    }
}
