//! Which RabbitMQ nodes keyfleet may connect to: `--amqp-url` takes one URL, or several
//! comma-separated — the nodes of one cluster, as `--redis-url` takes a Redis Cluster's. Parsed
//! once, when the flag is read, so a typo fails at start-up rather than at the first reconnect.
//!
//! Connecting tries the nodes in order; after a lost connection the worker starts with the node
//! after the one it lost (`Broker::connect_nodes`), so a node that died is tried last, not first.
//! Every way this type is shown (`Display`, `Debug`, errors) hides the URLs' passwords.

use std::fmt;
use std::str::FromStr;

use crate::escape::redact_url;

/// One or more `amqp://` / `amqps://` URLs, in the order they are tried.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrls(Vec<String>);

#[derive(Debug, thiserror::Error)]
pub enum AmqpUrlError {
    #[error("no RabbitMQ URL given")]
    Empty,
    // Named by its place in the list: a URL that does not parse cannot be shown without its
    // password. `reason` comes from the URL parser, which names the fault, not the text.
    #[error("RabbitMQ URL {position} of {count} does not parse: {reason}")]
    Invalid {
        position: usize,
        count: usize,
        reason: String,
    },
    #[error("RabbitMQ URL {shown} must start with amqp:// or amqps://")]
    Scheme { shown: String },
}

impl FromStr for AmqpUrls {
    type Err = AmqpUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let urls: Vec<String> = s
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        if urls.is_empty() {
            return Err(AmqpUrlError::Empty);
        }
        for (i, u) in urls.iter().enumerate() {
            let parsed = url::Url::parse(u).map_err(|e| AmqpUrlError::Invalid {
                position: i + 1,
                count: urls.len(),
                reason: e.to_string(),
            })?;
            if !matches!(parsed.scheme(), "amqp" | "amqps") {
                return Err(AmqpUrlError::Scheme {
                    shown: redact_url(u),
                });
            }
        }
        Ok(AmqpUrls(urls))
    }
}

impl AmqpUrls {
    /// How many nodes there are (at least one).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true: parsing refuses an empty list. (For clippy's `len_without_is_empty`.)
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The URL of node `i` (modulo the count), password included: for connecting only.
    pub fn get(&self, i: usize) -> &str {
        &self.0[i % self.0.len()]
    }

    /// Every node once, starting with node `from` (modulo the count), then wrapping around.
    pub fn order_from(&self, from: usize) -> impl Iterator<Item = usize> + '_ {
        let n = self.0.len();
        (0..n).map(move |k| (from + k) % n)
    }

    /// Node `i`'s URL without its password, for logs and errors.
    pub fn shown(&self, i: usize) -> String {
        redact_url(self.get(i))
    }
}

impl fmt::Display for AmqpUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<String> = (0..self.len()).map(|i| self.shown(i)).collect();
        f.write_str(&shown.join(","))
    }
}

/// Redacted too: configurations holding this type are `Debug`-printed.
impl fmt::Debug for AmqpUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AmqpUrls({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_or_several_urls() {
        let one: AmqpUrls = "amqp://guest:guest@127.0.0.1:5672/%2f".parse().unwrap();
        assert_eq!(one.len(), 1);
        let three: AmqpUrls = "amqp://u:p@h1:5672/%2f, amqps://u:p@h2/%2f,,amqp://h3"
            .parse()
            .unwrap();
        assert_eq!(three.len(), 3);
        assert_eq!(three.get(1), "amqps://u:p@h2/%2f");
        assert_eq!(three.order_from(2).collect::<Vec<_>>(), [2, 0, 1]);
        assert_eq!(three.order_from(4).collect::<Vec<_>>(), [1, 2, 0]);
    }

    #[test]
    fn passwords_never_shown() {
        let urls: AmqpUrls = "amqp://u:s3cret@h1/%2f,amqp://u:s3cret@h2/%2f"
            .parse()
            .unwrap();
        for text in [urls.to_string(), format!("{urls:?}"), urls.shown(1)] {
            assert!(!text.contains("s3cret"), "{text}");
            assert!(text.contains("h1") || text.contains("h2"), "{text}");
        }
        let bad = "amqp://u:s3cret@h1/%2f,http://u:s3cret@h2/"
            .parse::<AmqpUrls>()
            .unwrap_err()
            .to_string();
        assert!(!bad.contains("s3cret") && bad.contains("amqp://"), "{bad}");
        let bad = "amqp://h0/,amqp://u:s3cret@h1:99999/"
            .parse::<AmqpUrls>()
            .unwrap_err()
            .to_string();
        assert!(!bad.contains("s3cret") && bad.contains("2 of 2"), "{bad}");
        assert!(matches!(
            " , ".parse::<AmqpUrls>(),
            Err(AmqpUrlError::Empty)
        ));
    }
}
