//! Where the servers of distributed mode are: one type that `submit`, `collect`, the worker,
//! `status`, `describe` and `delete` share.

use std::time::Duration;

use crate::queue::broker::Topology;
use crate::queue::nodes::AmqpUrls;

/// RabbitMQ and Redis, the prefix of every queue and key, and how long to wait for them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    /// One RabbitMQ node, or the nodes of a cluster in the order they are tried.
    pub amqp_url: AmqpUrls,
    pub redis_url: String,
    /// Prefix of every queue, exchange and Redis key (several deployments can share servers).
    pub prefix: String,
    /// How long start-up waits for each server.
    pub connect_timeout: Duration,
    /// Redis replicas every write that decides a key's fate waits for (`--redis-replicas`);
    /// 0 waits for none.
    pub redis_replicas: u32,
}

impl Endpoints {
    pub fn topology(&self) -> Topology {
        Topology::with_prefix(&self.prefix)
    }
}
