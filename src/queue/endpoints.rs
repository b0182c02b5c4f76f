//! Where the servers of distributed mode are: one type that `submit`, `collect`, the worker,
//! `status`, `describe` and `delete` share, and the one way a server URL is shown to a person
//! (without its password).

use std::time::Duration;

use crate::queue::broker::Topology;

/// RabbitMQ and Redis, the prefix of every queue and key, and how long to wait for them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    pub amqp_url: String,
    pub redis_url: String,
    /// Prefix of every queue, exchange and Redis key (several deployments can share servers).
    pub prefix: String,
    /// How long start-up waits for each server.
    pub connect_timeout: Duration,
}

impl Endpoints {
    pub fn topology(&self) -> Topology {
        Topology::with_prefix(&self.prefix)
    }
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
