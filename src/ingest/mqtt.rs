//! MQTT publishes into the rules' buffers: the connection (`crate::mqtt`) hands each group of
//! publishes to [`Sink::store`], implemented here over the rules in force, and acknowledges the
//! group to the broker only when this returns `true`.
//!
//! A group is matched against, and stored by, one snapshot of the rules: a message matched to
//! a rule is appended to it even when a reload removes the rule meanwhile. With
//! `buffer.max_ack_delay` the connection holds each group back for the delay before storing it
//! ([`Sink::gather_for`]), and the buffers write it without waiting again.

use std::time::{Duration, SystemTime};

use crate::buffer::Queue;
use crate::core::shutdown::Shutdown;
use crate::ingest::routes::{Received, RouteTable};
use crate::mqtt::Sink;
use crate::mqtt::protocol::Inbound;

impl<Q: Queue> Sink for RouteTable<Q> {
    async fn store(&self, publishes: &[Inbound], shutdown: &Shutdown) -> bool {
        let routes = self.snapshot();
        let received = publishes.iter().map(|p| Received {
            topic: p.topic.clone(),
            payload: p.payload.to_vec(),
            qos: p.qos,
            retain: p.retain,
            properties: p.properties.clone(),
        });
        let mut admission = routes.admit(received, SystemTime::now());
        // The ingest loop held the group back for `gather_for` already.
        admission.gathered = true;
        // A rule's drop_newest drop is acknowledged too: the broker cannot be told, and the
        // drop is the configured policy (counted and logged by the buffer).
        if !routes.store(admission, shutdown).await.is_done() {
            return false;
        }
        tracing::debug!(publishes = publishes.len(), "buffered and acknowledged");
        true
    }

    fn subscriptions(&self) -> Vec<(String, u8)> {
        self.current().subscriptions()
    }

    fn gather_for(&self) -> Duration {
        let routes = self.current();
        let delays = routes.iter().map(|r| r.queue.max_ack_delay());
        delays.max().unwrap_or(Duration::ZERO)
    }

    fn rules_of(&self, filter: &str) -> Vec<String> {
        self.current()
            .iter()
            .filter(|r| r.filter == filter)
            .map(|r| r.plan.name.clone())
            .collect()
    }
}
