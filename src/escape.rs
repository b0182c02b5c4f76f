//! What caller and operator text may become when it is shown or stored: `redact_url` (a
//! server URL without its password, for logs and errors), and percent-escaping of caller text
//! that becomes part of a Redis key, a state-file key or a file name. Only the characters that
//! would break the key or path are escaped, with `percent-encoding`'s byte table; letters of any
//! script stay as they are (the crate's encoders always escape non-ASCII, which would change
//! every existing key and file name that holds a Chinese key-pair name or owner).

use percent_encoding::percent_encode_byte;

/// `s` with every character for which `escape(index, char)` holds written as `%XX` per UTF-8
/// byte.
pub fn escape_chars(s: &str, escape: impl Fn(usize, char) -> bool) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, c) in s.chars().enumerate() {
        if escape(i, c) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(percent_encode_byte(b));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `url` with its password (userinfo, or a `password`/`pass` query parameter) replaced by
/// `***`, fit for error messages and logs. A Redis URL's lone userinfo (`redis://secret@host`)
/// may be read as the password, so it is hidden too. A URL that does not parse is not shown.
pub fn redact_url(raw: &str) -> String {
    let Ok(mut url) = url::Url::parse(raw) else {
        return "<a URL that does not parse>".to_owned();
    };
    if url.password().is_some() {
        let _ = url.set_password(Some("***"));
    } else if !url.username().is_empty() && url.scheme().starts_with("redis") {
        let _ = url.set_username("***");
    }
    let secret = |k: &str| k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("pass");
    if url.query_pairs().any(|(k, _)| secret(&k)) {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if secret(&k) {
                    "***".into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_only_what_is_asked() {
        assert_eq!(
            escape_chars("a:b%c", |_, c| matches!(c, ':' | '%')),
            "a%3Ab%25c"
        );
        assert_eq!(escape_chars("密钥\n", |_, c| c.is_control()), "密钥%0A");
        assert_eq!(escape_chars("密", |_, _| true), "%E5%AF%86");
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqp://127.0.0.1"), "amqp://127.0.0.1");
        assert_eq!(redact_url("amqps://user@h/"), "amqps://user@h/");
        assert_eq!(
            redact_url("redis://user:s3cret@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact_url("redis://:s3cret@host"), "redis://:***@host");
        assert_eq!(redact_url("rediss://s3cret@host/"), "rediss://***@host/");
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact_url("redis+unix:///run/redis.sock?db=1&pass=s3cret"),
            "redis+unix:///run/redis.sock?db=1&pass=***"
        );
        assert_eq!(
            redact_url("redis://h/?password=s3cret"),
            "redis://h/?password=***"
        );
        assert!(!redact_url("redis://user:s3cret@[bad").contains("s3cret"));
    }
}
