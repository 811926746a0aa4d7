//! Delivery: per rule, read the buffer, shape (batch, window, throttle, pace), invoke the
//! function, publish its reply, and acknowledge the buffer only for what was delivered or
//! dead-lettered.
//!
//! Invariant: the buffer is acknowledged in order and never past an event that is still in
//! flight or waiting for a retry. Delivery never imports ingest.

pub mod invoker;
pub mod pipeline;
