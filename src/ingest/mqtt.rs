//! MQTT publishes into the rules' buffers: the connection (`crate::mqtt`) hands each group of
//! publishes to [`Sink::store`], implemented here over the rules in force, and acknowledges the
//! group to the broker only when this returns `true`.
//!
//! A group is matched against, and stored by, one snapshot of the rules: a message matched to
//! a rule is appended to it even when a reload removes the rule meanwhile.

use std::time::SystemTime;

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
        let admission = routes.admit(received, SystemTime::now());
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

    fn rules_of(&self, filter: &str) -> Vec<String> {
        self.current()
            .iter()
            .filter(|r| r.filter == filter)
            .map(|r| r.plan.name.clone())
            .collect()
    }
}
