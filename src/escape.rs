//! Percent-escaping of caller text that becomes part of a Redis key, a state-file key or a
//! file name. Only the characters that would break the key or path are escaped, with
//! `percent-encoding`'s byte table; letters of any script stay as they are (the crate's
//! encoders always escape non-ASCII, which would change every existing key and file name that
//! holds a Chinese key-pair name or owner).

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
}
