//! The pure core: what the configuration says, which topics match which rules, what a stored
//! message and its event look like, time, and the small shared facts (counters, health, the
//! stop signal) the other parts write and the reporters read.
//!
//! Invariant: nothing here imports another part of the crate, opens a socket or touches the
//! buffer's files. The stop signal is a `tokio::sync::watch` channel and the clock watch a
//! timer: the only runtime types here.

pub mod clock;
pub mod config;
pub mod envelope;
pub mod health;
pub mod reply;
pub mod retry;
pub mod rules;
pub mod shutdown;
pub mod sql;
pub mod stats;
