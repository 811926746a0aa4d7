//! The MQTT side: connection options, the session, subscriptions, acknowledgements on the
//! wire, and publishing replies. It knows no rule: ingest implements [`Sink`] over the rules
//! in force.
//!
//! Three tasks share the work ([`run`]). The *poll task* (`poll.rs`) drives rumqttc's event
//! loop, feeds each event to the session state machine (`session.rs`, pure: it decides what to
//! subscribe, which rules a SUBACK answers, which replies to hand back, what to log) and
//! performs what it returns; it forwards each publish to the *ingest loop* (`run.rs`), which
//! hands each group to the [`Sink`] and only when it is stored (durable) acknowledges it, in
//! the order received (under MQTT 3.1.1 a group's acknowledgements go out in one write:
//! `acks.rs`). The *subscriber* (`subscriber.rs`) sends every SUBSCRIBE and UNSUBSCRIBE.
//!
//! The poll task never waits on ingest: while ingest waits (a full disk, `when_full =
//! "block"`) the event loop keeps being polled, so PINGREQs go out and the connection stays
//! up. What it holds meanwhile is bounded: past [`INGEST_HOLD_MAX`] publishes or
//! [`INGEST_HOLD_MAX_BYTES`] it stops polling, or while it may not stop (a reply waits for its
//! PUBACK, acknowledgements wait to be sent) it drops QoS 0 publishes, each counted in the log,
//! and QoS 1/2 ones are bounded by the broker's in-flight window (`hold.rs`).
//!
//! Manual acks are on: a publish that was not stored is never acknowledged, so after a crash
//! the broker (persistent session, `clean_start = false`) delivers it again. A resumed session
//! is ready for the broker to repeat the release of QoS 2 messages acknowledged before.
//!
//! MQTT 3.1.1 and MQTT 5 (`mqtt.protocol`) differ only behind [`protocol`]; what the bridge
//! does with rumqttc beyond its documented API is all in `internals.rs`, with one test per
//! assumption, and rumqttc is pinned to the exact version those tests ran against.

mod acks;
mod hold;
mod internals;
mod notes;
mod options;
mod poll;
pub mod protocol;
mod reasons;
pub mod replies;
mod run;
mod session;
#[cfg(test)]
mod session_sim;
mod subscriber;

use std::time::Duration;

use crate::core::shutdown::Shutdown;

pub use options::{MqttError, options};
pub use protocol::Options;
use protocol::{Client, EventLoop, Inbound};
use replies::Replier;
pub use run::run;
pub use session::reminder_after;
pub use subscriber::{SubscriptionRequests, Subscriptions, subscriptions};

/// The MQTT protocol's largest packet. Set as our incoming limit so no message can make
/// rumqttc drop the connection (the broker would redeliver it and we would loop); messages too
/// large for Lambda are set aside after they arrive. Bound memory with the broker's own
/// `message_size_limit`.
pub const MAX_INCOMING_PACKET: usize = 268_435_455 + 5;
/// Outgoing QoS 1/2 publishes in flight, as rumqttc's 3.1.1 client defaults to. Set for MQTT 5
/// because its client otherwise sizes a table for 65,535 of them up front (about 13 MiB).
const OUTGOING_INFLIGHT: u16 = 100;
/// Requests (acks, subscribes) buffered towards the event loop.
const REQUEST_CAPACITY: usize = 10_000;
/// Publishes held between the poll task and the ingest loop; past it the poll task stops
/// polling (and so reading the socket) until ingest catches up, or when it may not stop,
/// drops QoS 0 publishes (`hold.rs`).
pub const INGEST_HOLD_MAX: usize = 4096;
/// Payload bytes held between the poll task and the ingest loop, likewise.
pub const INGEST_HOLD_MAX_BYTES: usize = 16 * 1024 * 1024;
/// Acknowledgements waiting for room in rumqttc's request channel before ingest stops taking
/// more publishes (the poll task keeps polling, which drains them).
const ACK_BACKLOG_MAX: usize = 4 * INGEST_BATCH;
/// Most publishes appended and acknowledged together: one durable append per rule per group.
/// Groups are only this large when the broker floods us with a backlog (it sends at most its
/// in-flight window otherwise); then each fsync the ingest loop waits for covers 1,024
/// messages rather than 256 (measured: a 50,000-message backlog delivered 8% sooner).
const INGEST_BATCH: usize = 1024;
/// First reconnect delay.
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(250);
/// Longest reconnect delay.
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(30);
/// At shutdown, how long DISCONNECT waits for the broker to release the QoS 2 messages the
/// bridge acknowledged (a round trip, normally); well within [`CLOSE_MIN_GRACE`].
const RELEASE_WAIT: Duration = Duration::from_millis(500);
/// Time given to the final acks and DISCONNECT at shutdown.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);
/// Time the MQTT side takes at most to disconnect once told to close.
pub const CLOSE_GRACE: Duration = Duration::from_secs(3);
/// Time it is given to disconnect even when delivery used all of the shutdown time.
pub const CLOSE_MIN_GRACE: Duration = Duration::from_secs(1);
/// How soon acks that found rumqttc's request channel full are offered again.
const ACK_RETRY: Duration = Duration::from_millis(1);

/// Where the connection hands what it receives, and asks which filters to subscribe: ingest
/// (`crate::ingest::mqtt`) implements it over the rules in force. The connection knows no rule.
pub trait Sink: Clone + Send + Sync + 'static {
    /// Stores one group of publishes in their rules' buffers; the connection acknowledges them
    /// after. `false` when shutdown interrupted it: nothing of the group is acknowledged.
    fn store(
        &self,
        publishes: &[Inbound],
        shutdown: &Shutdown,
    ) -> impl std::future::Future<Output = bool> + Send;

    /// Every filter of the rules in force with its highest QoS, in rule order.
    fn subscriptions(&self) -> Vec<(String, u8)>;

    /// How long a group of publishes may wait for more after its first before it is stored
    /// (`buffer.max_ack_delay`): the ingest loop takes what arrives meanwhile into the same
    /// group, so it shares one fsync per rule.
    fn gather_for(&self) -> Duration {
        Duration::ZERO
    }

    /// The names of the rules in force that subscribe `filter` (for the log of a SUBACK).
    fn rules_of(&self, filter: &str) -> Vec<String>;
}

/// The MQTT client before it runs: made first, so replies can be handed to it (they wait in
/// its request channel until it connects).
pub struct Link {
    client: Client,
    eventloop: EventLoop,
    broker: String,
    replier: Replier,
    requests: SubscriptionRequests,
}

/// The client for `options`, and the [`Replier`] that publishes through it.
pub fn link(options: Options, requests: SubscriptionRequests) -> (Link, Replier) {
    let broker = options.broker_url();
    let (client, eventloop) = protocol::connect(options, REQUEST_CAPACITY);
    let replier = Replier::new(client.clone());
    let link = Link {
        client,
        eventloop,
        broker,
        replier: replier.clone(),
        requests,
    };
    (link, replier)
}
