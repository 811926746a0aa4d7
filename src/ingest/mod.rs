//! Ingest: messages in (MQTT publishes, HTTP posts), matched to rules, stored in every
//! matching rule's buffer, and only then acknowledged (PUBACK, HTTP 202).
//!
//! Invariant: nothing is acknowledged before it is durable in the buffer of every rule it
//! matches (or set aside as a dead letter when it can never be delivered). Ingest never
//! imports delivery: the two meet only in the buffer and in [`crate::rule::Route`].

pub mod http;
pub mod mqtt;
pub mod routes;
