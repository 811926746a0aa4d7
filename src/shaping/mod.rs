//! Shaping between a rule's queue and its function, all pure (no tokio, no rumqttc, no files):
//! what a rule does decided once from its configuration ([`plan`]), per-topic throttles
//! ([`throttle`]), statistics windows ([`aggregate`]), batches and windows as events
//! ([`batch`]), the token bucket and adaptive concurrency ([`ratelimit`]).
//!
//! Every function that depends on time takes `now` as an argument, so tests drive it by hand.

pub mod aggregate;
pub mod batch;
pub mod cost;
pub mod plan;
pub mod ratelimit;
pub mod throttle;
