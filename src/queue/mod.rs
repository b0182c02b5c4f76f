//! RabbitMQ: the broker connection and topology, which nodes to connect to, and where the
//! servers are.

pub mod broker;
pub mod endpoints;
pub mod nodes;
