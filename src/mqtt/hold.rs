//! What the poll task holds for the ingest loop (publishes and their payload bytes), so it
//! can stop polling past [`INGEST_HOLD_MAX`] publishes or [`INGEST_HOLD_MAX_BYTES`]: TCP then
//! pushes back on the broker.
//!
//! Invariant: the poll task pauses only while no acknowledgement waits for it (acks drain only
//! while it polls), and the ingest loop stops taking publishes only while acknowledgements
//! wait (so the poll task is running and drains them): neither waits on the other for good.
//! Counters are atomics, touched once per publish and once per group: no lock on the hot path.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

use super::protocol::Inbound;
use super::{INGEST_HOLD_MAX, INGEST_HOLD_MAX_BYTES};

/// What the poll task holds for the ingest loop, so it can stop polling past a bound.
///
/// Deadlock-free by construction: the poll task pauses only while no acknowledgement is
/// waiting for it (acks drain only while it polls), and the ingest loop stops taking publishes
/// only while acknowledgements are waiting (so the poll task is running and drains them).
#[derive(Default)]
pub(super) struct Hold {
    publishes: AtomicUsize,
    bytes: AtomicUsize,
    /// Acknowledgements the ingest loop could not hand to the event loop yet.
    acks_waiting: AtomicUsize,
    /// Wakes the poll task when ingest took publishes or acks are waiting.
    taken: Notify,
}

impl Hold {
    pub(super) fn add(&self, publish: &Inbound) {
        self.publishes.fetch_add(1, Ordering::Relaxed);
        self.bytes
            .fetch_add(publish.payload.len(), Ordering::Relaxed);
    }

    pub(super) fn release(&self, publishes: &[Inbound]) {
        let bytes = publishes.iter().map(|p| p.payload.len()).sum();
        self.publishes.fetch_sub(publishes.len(), Ordering::Relaxed);
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.taken.notify_one();
    }

    pub(super) fn set_acks_waiting(&self, n: usize) {
        if self.acks_waiting.swap(n, Ordering::Relaxed) == 0 && n > 0 {
            self.taken.notify_one();
        }
    }

    /// Whether the poll task should pause.
    pub(super) fn full(&self) -> bool {
        (self.publishes.load(Ordering::Relaxed) >= INGEST_HOLD_MAX
            || self.bytes.load(Ordering::Relaxed) >= INGEST_HOLD_MAX_BYTES)
            && self.acks_waiting.load(Ordering::Relaxed) == 0
    }

    /// Waits while the bound is reached (the last resort: polling stops meanwhile).
    pub(super) async fn wait_for_room(&self) {
        while self.full() {
            let taken = self.taken.notified();
            if !self.full() {
                break;
            }
            taken.await;
        }
    }
}
