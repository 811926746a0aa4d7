//! Operations: what a person or a supervisor sees of the daemon. `/metrics`, `/healthz` and
//! `/readyz` ([`metrics`]) and systemd's notify protocol ([`notify`]).
//!
//! Invariant: operations read what the parts publish ([`crate::core::stats`],
//! [`crate::core::health`]), never a part's internals, and change nothing of what they read.

pub mod memory;
pub mod metrics;
pub mod notify;
