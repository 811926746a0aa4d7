//! What the poll task holds for the ingest loop (publishes and their payload bytes), so it
//! can stop polling past [`INGEST_HOLD_MAX`] publishes or [`INGEST_HOLD_MAX_BYTES`]: TCP then
//! pushes back on the broker.
//!
//! Invariants:
//! - Deadlock-free: the poll task pauses only while no acknowledgement waits for it (acks
//!   drain only while it polls) and no reply waits for its PUBACK (which only polling reads:
//!   the delivery that published it may be what a full buffer, and so ingest, waits for); the
//!   ingest loop stops taking publishes only while acknowledgements wait (so the poll task is
//!   running and drains them): neither waits on the other for good.
//! - Bounded even when the poll task may not pause: past the bound it then takes no QoS 0
//!   publish ([`Admit::DropQos0`]; the session counts and logs each one: QoS 0 is at most once,
//!   and nothing else may hold it), and QoS 1/2 publishes are bounded by the broker's in-flight
//!   window (mosquitto's `max_inflight_messages`, MQTT 5's Receive Maximum), since none is
//!   acknowledged before ingest stored it.
//!
//! Counters are atomics, touched once per publish and once per group: no lock on the hot path.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

use super::protocol::Inbound;
use super::{INGEST_HOLD_MAX, INGEST_HOLD_MAX_BYTES};

/// What the poll task does with a publish it read (see the module's invariants).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Admit {
    /// Hand it to ingest.
    Take,
    /// Past the bound while the poll task may not pause: drop it (QoS 0 only).
    DropQos0,
}

/// What the poll task holds for the ingest loop, so it can stop polling past a bound.
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

    /// Whether the bound is reached.
    fn over(&self) -> bool {
        self.publishes.load(Ordering::Relaxed) >= INGEST_HOLD_MAX
            || self.bytes.load(Ordering::Relaxed) >= INGEST_HOLD_MAX_BYTES
    }

    /// Whether the poll task should pause.
    pub(super) fn full(&self) -> bool {
        self.over() && self.acks_waiting.load(Ordering::Relaxed) == 0
    }

    /// What to do with a publish of `qos` just read; `reply_waiting` says whether a reply waits
    /// for its PUBACK, asked only for a QoS 0 publish past the bound (it takes the reply book's
    /// lock, which the hot path of every other publish need not).
    pub(super) fn admit(&self, qos: u8, reply_waiting: impl FnOnce() -> bool) -> Admit {
        if qos != 0 || !self.over() {
            return Admit::Take;
        }
        let must_poll = self.acks_waiting.load(Ordering::Relaxed) > 0 || reply_waiting();
        if must_poll {
            Admit::DropQos0
        } else {
            Admit::Take
        }
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::mqtt::protocol::Ack;

    /// A publish of `bytes` payload bytes.
    pub(in crate::mqtt) fn publish(qos: u8, bytes: usize) -> Inbound {
        Inbound {
            topic: "t".into(),
            payload: vec![0; bytes].into(),
            qos,
            retain: false,
            properties: None,
            ack: Ack { pkid: 1, qos },
        }
    }

    /// A hold at its bound in publishes.
    fn at_bound() -> Hold {
        let hold = Hold::default();
        for _ in 0..INGEST_HOLD_MAX {
            hold.add(&publish(0, 1));
        }
        hold
    }

    #[test]
    fn below_the_bound_every_publish_is_taken_and_nothing_pauses() {
        let hold = Hold::default();
        hold.add(&publish(0, 10));
        hold.set_acks_waiting(3);
        assert_eq!(hold.admit(0, || true), Admit::Take);
        assert!(!hold.full());
    }

    #[test]
    fn at_the_bound_with_nothing_waiting_the_poll_task_pauses() {
        let hold = at_bound();
        assert!(hold.full());
        // A publish read while it pauses (a reply handed, then answered at once) is taken.
        assert_eq!(hold.admit(0, || false), Admit::Take);
    }

    #[test]
    fn at_the_bound_with_a_reply_waiting_qos0_is_dropped_and_qos1_2_taken() {
        let hold = at_bound();
        assert_eq!(hold.admit(0, || true), Admit::DropQos0);
        assert_eq!(hold.admit(1, || true), Admit::Take);
        assert_eq!(hold.admit(2, || true), Admit::Take);
    }

    #[test]
    fn at_the_bound_with_acks_waiting_the_poll_task_polls_on_and_qos0_is_dropped() {
        let hold = at_bound();
        hold.set_acks_waiting(1);
        assert!(!hold.full());
        assert_eq!(hold.admit(0, || false), Admit::DropQos0);
        assert_eq!(hold.admit(1, || false), Admit::Take);
    }

    #[test]
    fn the_bound_in_bytes_counts_too_and_ingest_taking_publishes_frees_room() {
        let hold = Hold::default();
        let big = publish(0, INGEST_HOLD_MAX_BYTES);
        hold.add(&big);
        assert_eq!(hold.admit(0, || true), Admit::DropQos0);
        hold.release(&[big]);
        assert_eq!(hold.admit(0, || true), Admit::Take);
    }
}
