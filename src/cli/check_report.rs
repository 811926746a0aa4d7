//! What `check` says of a valid configuration beyond "valid": where replies may go, the
//! telemetry it publishes, and what `buffer.max_ack_delay` costs.

use crate::core::config::{Config, MqttProtocol};
use crate::core::reply;
use crate::shaping::plan::RulePlan;

/// Prints each explanation that applies, one line each, on stdout.
pub fn explain(config: &Config) {
    explain_replies(config);
    if let Some(t) = &config.telemetry {
        println!(
            "telemetry: a JSON snapshot of the metrics every {} to {} (QoS 1, retained)",
            humantime::format_duration(t.interval.0),
            t.topic
        );
    }
    explain_ack_delay(config);
}

/// Where each replying rule's replies may go, one line per rule, so a Response Topic that
/// `reply.allow` leaves out is no surprise.
fn explain_replies(config: &Config) {
    for rule in &config.rules {
        if let Some(spec) = RulePlan::from_config(rule).reply {
            println!("rule {}: {}", rule.name, reply::explain(&spec));
        }
    }
}

/// What `buffer.max_ack_delay` costs, when it is set.
fn explain_ack_delay(config: &Config) {
    let window = match config.mqtt.protocol {
        MqttProtocol::V5 => Some(config.mqtt.receive_maximum()),
        MqttProtocol::V311 => None,
    };
    if let Some(line) = config.buffer.explain_ack_delay(window) {
        println!("{line}");
    }
}
