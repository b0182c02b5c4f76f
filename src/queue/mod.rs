//! RabbitMQ: the broker connection and topology, and where the servers are.

pub mod broker;
pub mod endpoints;
