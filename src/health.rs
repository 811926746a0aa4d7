//! What the daemon knows about its own state, shared by the parts that report it (metrics,
//! `/readyz`, systemd status lines, logs) and written only by the parts that own each fact.
//!
//! Every field is an atomic: writers never wait for readers, and a reader sees each fact
//! as of some recent moment, which is all a health report promises.

use std::sync::atomic::{AtomicBool, Ordering};

/// The daemon's shared health facts.
#[derive(Debug, Default)]
pub struct Health {
    /// True between a CONNACK and the next connection error or disconnect.
    mqtt_connected: AtomicBool,
}

impl Health {
    /// A new report: not connected yet.
    pub fn new() -> Health {
        Health::default()
    }

    /// The MQTT event loop got a CONNACK (true) or lost the connection (false).
    pub fn set_mqtt_connected(&self, connected: bool) {
        self.mqtt_connected.store(connected, Ordering::Relaxed);
    }

    /// Whether the broker connection is up.
    pub fn mqtt_connected(&self) -> bool {
        self.mqtt_connected.load(Ordering::Relaxed)
    }
}
