//! mqtt-lambda-bridge: subscribes to a local MQTT broker, matches each message against rules,
//! buffers it per rule, and invokes AWS Lambda functions with it.
//!
//! # Layout
//!
//! ```text
//!            MQTT broker                 devices (HTTP)                    AWS Lambda
//!               │ ▲ replies                  │                                ▲
//!               ▼ │                          ▼                                │
//!             mqtt ◄──────────────┐        http                               │
//!               │                 │          │                                │
//!               ▼                 │          ▼                                │
//!   ingest: match, store, then ack │ ─► buffer (per rule) ─► delivery: read, shape, invoke, ack
//!                                 └─────────────────────────── (replies publish through mqtt)
//! ```
//!
//! Each folder is one part. A part may use the parts listed after "uses" and nothing else;
//! `tests/layers.rs` (run by CI) reads every `use crate::` and fails on any other
//! direction. Tests inside a module (`#[cfg(test)]`) may use anything.
//!
//! | part | owns | uses |
//! |---|---|---|
//! | [`core`] | configuration, topic rules, SQL rules (compiled and evaluated), the envelope, time, the reply templates, and the shared facts parts write and reporters read (counters, health, the stop signal) | nothing |
//! | [`shaping`] | what a rule does ([`shaping::plan`]), throttles, windows, batches, token bucket and adaptive concurrency; pure, no tokio | core |
//! | [`buffer`] | the durable per-rule queue (segment log, ack position, recovery), dead letters, the buffer directory's layout and lock | core |
//! | [`mqtt`] | the MQTT connection: options, the session, subscriptions, acknowledgements on the wire, publishing replies | core |
//! | [`http`] | HTTP servers with bounded connections: hyper's for HTTP ingest, a small one-request-per-connection listener for the metrics endpoints (it keeps hyper's server code out of memory when HTTP ingest is off) | core |
//! | [`rule`] | one rule's shared state while it runs ([`rule::Route`]) and its life cycle | core, shaping, buffer |
//! | [`ingest`] | messages in (MQTT, HTTP), matched, stored, then acknowledged | core, shaping, buffer, mqtt, http, rule |
//! | [`delivery`] | per rule: read, shape, invoke (the Lambda client), reply, acknowledge | core, shaping, buffer, mqtt, rule |
//! | [`ops`] | `/metrics`, `/healthz`, `/readyz`, systemd notify, telemetry, giving back the loader's pages once started | core, http |
//! | [`daemon`] | the wiring: start, reload, stop; preflight checks; signals | everything above |
//! | [`cli`] | the `buffer` commands, `cost` (what a configuration costs in Lambda) and the container health probe | everything above, daemon included |
//!
//! Two state machines carry the modes of the daemon, each a pure function tested with event
//! sequences and driven by a thin async loop: the MQTT session ([`mqtt`]'s `session.rs`) and a
//! rule's life ([`rule::life`]); delivery's own loop is a third (`delivery/pipeline/machine.rs`).
//!
//! [`run`] wires them together and takes the shutdown future, so tests can stop it; a reload
//! request (SIGHUP) re-reads the file.

pub mod buffer;
pub mod cli;
pub mod core;
pub mod daemon;
pub mod delivery;
pub mod http;
pub mod ingest;
pub mod mqtt;
pub mod ops;
pub mod rule;
pub mod shaping;

pub use daemon::{Reloads, RunError, run, run_with, run_with_reloads};
