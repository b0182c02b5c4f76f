//! The Redis registry against the Redis on 127.0.0.1:6379 (a fresh prefix per test) and the
//! Redis Cluster scripts/test.sh starts (`KEYFLEET_TEST_CLUSTER_URLS`).

#[path = "../util/mod.rs"]
mod util;

mod redis_cluster;
mod redis_registry;
mod redis_replicas;
