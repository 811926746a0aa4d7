//! The seam between MQTT 3.1.1 and MQTT 5: one client, one event loop and one event type over
//! rumqttc's two implementations (`rumqttc` and `rumqttc::v5`), so the ingest, ack and hold
//! logic in `mqtt.rs` is written once.
//!
//! Invariants: an [`Inbound`] publish carries everything the bridge keeps of it (topic, payload,
//! QoS, retain, and under MQTT 5 its user properties and content type) and an [`Ack`] handle,
//! which is only a packet id and a QoS: acknowledging needs nothing else, so the payload can be
//! dropped once stored. Whatever the broker refuses (CONNACK, SUBACK per filter, UNSUBACK,
//! DISCONNECT) comes out as words a person can act on, with MQTT 5's reason code.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::{Outgoing, QoS, Transport};

use crate::core::envelope::Properties;

pub use crate::core::config::MIN_KEEP_ALIVE_V5;

/// How long writing acknowledgements may wait for the broker to take them (rumqttc's own
/// flushes wait as long, its default connection timeout).
const ACK_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Connection options for one of the two versions.
// One per process, built once: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Options {
    /// MQTT 3.1.1.
    V311(rumqttc::MqttOptions),
    /// MQTT 5.
    V5(rumqttc::v5::MqttOptions),
}

impl Options {
    /// The broker as `mqtt.url` names it, for log lines.
    pub fn broker_url(&self) -> String {
        let ((host, port), transport) = match self {
            Options::V311(o) => (o.broker_address(), o.transport()),
            Options::V5(o) => (o.broker_address(), o.transport()),
        };
        let scheme = match transport {
            Transport::Tcp => "mqtt",
            _ => "mqtts",
        };
        format!("{scheme}://{host}:{port}")
    }
}

/// Sends requests to the event loop; cheap to clone.
#[derive(Clone)]
pub enum Client {
    /// MQTT 3.1.1.
    V311(rumqttc::AsyncClient),
    /// MQTT 5.
    V5(rumqttc::v5::AsyncClient),
}

/// The event loop to poll; nothing happens unless it is polled.
// One per process, owned by the poll task: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum EventLoop {
    /// MQTT 3.1.1.
    V311(rumqttc::EventLoop),
    /// MQTT 5.
    V5(rumqttc::v5::EventLoop),
}

/// A client and its event loop for `options`, with `capacity` requests buffered between them.
pub fn connect(options: Options, capacity: usize) -> (Client, EventLoop) {
    match options {
        Options::V311(o) => {
            let (c, e) = rumqttc::AsyncClient::new(o, capacity);
            (Client::V311(c), EventLoop::V311(e))
        }
        Options::V5(o) => {
            let (c, e) = rumqttc::v5::AsyncClient::new(o, capacity);
            (Client::V5(c), EventLoop::V5(e))
        }
    }
}

/// What acknowledging a publish needs: its packet id and QoS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The broker's packet id.
    pub pkid: u16,
    /// 0, 1 or 2; QoS 0 needs no acknowledgement.
    pub qos: u8,
}

/// A publish as received, whichever the version.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The concrete topic.
    pub topic: String,
    /// The payload, shared with rumqttc's read buffer until stored.
    pub payload: Bytes,
    /// The QoS it was delivered with.
    pub qos: u8,
    /// The retain flag.
    pub retain: bool,
    /// MQTT 5 user properties and content type, when present.
    pub properties: Option<Box<Properties>>,
    /// How to acknowledge it once stored.
    pub ack: Ack,
}

/// What the broker answered for one filter of a SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Granted {
    /// Subscribed at this QoS.
    Qos(u8),
    /// Refused, and why in words (with MQTT 5's reason code).
    Refused(String),
}

/// One event from the event loop, as the ingest side needs it.
#[derive(Debug)]
pub enum Event {
    /// The broker accepted the connection.
    Connected {
        /// It still had our session.
        session_present: bool,
        /// The largest packet it accepts (MQTT 5 Maximum Packet Size), when it says.
        max_packet_size: Option<u32>,
    },
    /// A message.
    Publish(Inbound),
    /// A SUBSCRIBE went out with this packet id.
    SubscribeSent(u16),
    /// An UNSUBSCRIBE went out with this packet id.
    UnsubscribeSent(u16),
    /// The answer to a SUBSCRIBE, per filter in the order sent.
    SubAck {
        /// Its packet id.
        pkid: u16,
        /// Per filter.
        granted: Vec<Granted>,
    },
    /// The answer to an UNSUBSCRIBE; MQTT 5 may refuse it.
    UnsubAck {
        /// Its packet id.
        pkid: u16,
        /// Why the broker refused, if it did.
        refused: Option<String>,
    },
    /// One of our publishes (a reply) went out with this packet id; a publish sent again after
    /// a reconnect keeps its id.
    PublishSent(u16),
    /// The broker acknowledged our publish with this packet id (MQTT 5 may refuse it).
    PubAck {
        /// Its packet id.
        pkid: u16,
        /// Why the broker refused, if it did (MQTT 5 reason code and string).
        refused: Option<String>,
    },
    /// Our DISCONNECT went out: the event loop is done.
    DisconnectSent,
    /// A PUBACK or PUBREC went out through the request channel, with this packet id.
    AckSent(u16),
    /// The broker released the QoS 2 message with this packet id (a PUBCOMP went out).
    Released(u16),
    /// Anything else (pings, PUBCOMPs).
    Other,
}

impl EventLoop {
    /// Whether [`EventLoop::write_acks`] can write to the connection: under MQTT 3.1.1. rumqttc
    /// keeps its MQTT 5 connection to itself.
    pub fn writes_acks(&self) -> bool {
        matches!(self, EventLoop::V311(_))
    }

    /// Writes `acks` to the connection in one go (PUBACK, or PUBREC for QoS 2), between polls;
    /// under MQTT 5, or when not connected, writes nothing. An error is left for the next poll
    /// to find on the connection; it is returned only to be logged.
    pub async fn write_acks(&mut self, acks: &[Ack]) -> Result<(), String> {
        let EventLoop::V311(e) = self else {
            return Ok(());
        };
        let Some(network) = e.network.as_mut() else {
            return Ok(());
        };
        // Writing flushes on its own past 8 KiB of acknowledgements: all of it is bounded.
        let write = async {
            for ack in acks {
                let packet = if ack.qos == 2 {
                    rumqttc::Packet::PubRec(rumqttc::PubRec::new(ack.pkid))
                } else {
                    rumqttc::Packet::PubAck(rumqttc::PubAck::new(ack.pkid))
                };
                network.write(packet).await?;
            }
            network.flush().await
        };
        match tokio::time::timeout(ACK_FLUSH_TIMEOUT, write).await {
            Ok(written) => written.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "the broker took no data for {} s",
                ACK_FLUSH_TIMEOUT.as_secs()
            )),
        }
    }

    /// Polls once; an error is the connection's end, described for a person.
    pub async fn poll(&mut self) -> Result<Event, String> {
        match self {
            EventLoop::V311(e) => e.poll().await.map(from_v311).map_err(|e| describe_v311(&e)),
            EventLoop::V5(e) => e.poll().await.map(from_v5).map_err(|e| describe_v5(&e)),
        }
    }

    /// Makes rumqttc accept a PUBREL for any packet id (and answer it with PUBCOMP), as for a
    /// QoS 2 message received on this connection. Call right after a CONNACK with the session
    /// present, before polling again.
    ///
    /// A QoS 2 message the bridge acknowledged (PUBREC) on an earlier connection, or before a
    /// restart or a crash, is completed by the broker repeating its PUBREL after the CONNACK.
    /// rumqttc 0.25 keeps no record across connections, refuses that PUBREL as unsolicited and
    /// drops the connection, every time. Its state takes a packet id through the one door it
    /// has, an incoming QoS 2 publish, whose event is taken back so nobody sees it. Every id
    /// goes through (about 10 ms), since which ones the broker will repeat is not known; a
    /// PUBREL for an id the broker has no exchange for does not come.
    pub fn expect_repeated_releases(&mut self) {
        for pkid in 1..=u16::MAX {
            self.expect_release(pkid);
        }
    }

    fn expect_release(&mut self, pkid: u16) {
        // What the made-up publish leaves in rumqttc's events is taken back; an answer it
        // returns (none, with manual acks) is not sent.
        match self {
            EventLoop::V311(e) => {
                let mut publish = rumqttc::Publish::new("", QoS::ExactlyOnce, Vec::new());
                publish.pkid = pkid;
                let reported = e.state.events.len();
                let _ = e
                    .state
                    .handle_incoming_packet(rumqttc::Incoming::Publish(publish));
                e.state.events.truncate(reported);
            }
            EventLoop::V5(e) => {
                let mut publish = p5::Publish::new("", QoS5::ExactlyOnce, Bytes::new(), None);
                publish.pkid = pkid;
                let reported = e.state.events.len();
                let _ = e
                    .state
                    .handle_incoming_packet(rumqttc::v5::Incoming::Publish(publish));
                e.state.events.truncate(reported);
            }
        }
    }

    /// Our publishes rumqttc holds to send again after a reconnect, in the order it will send
    /// them: those in flight when the connection broke (with their packet ids) and those not yet
    /// sent (packet id 0). Right after a failed poll, this is everything handed to it before.
    pub fn pending_publishes(&self) -> PendingPublishes {
        match self {
            EventLoop::V311(e) => PendingPublishes::V311(
                e.pending
                    .iter()
                    .filter_map(|r| match r {
                        rumqttc::Request::Publish(p) => Some(p.clone()),
                        _ => None,
                    })
                    .collect(),
            ),
            EventLoop::V5(e) => PendingPublishes::V5(
                e.pending
                    .iter()
                    .filter_map(|r| match r {
                        rumqttc::v5::Request::Publish(p) => Some(p.clone()),
                        _ => None,
                    })
                    .collect(),
            ),
        }
    }

    /// Packet ids of publishes rumqttc sent but has not reported yet: a connection that broke
    /// in the middle of a turn leaves its events to be reported after the reconnect.
    pub fn unreported_publishes_sent(&self) -> Vec<u16> {
        match self {
            EventLoop::V311(e) => e
                .state
                .events
                .iter()
                .filter_map(|ev| match ev {
                    rumqttc::Event::Outgoing(Outgoing::Publish(pkid)) => Some(*pkid),
                    _ => None,
                })
                .collect(),
            EventLoop::V5(e) => e
                .state
                .events
                .iter()
                .filter_map(|ev| match ev {
                    rumqttc::v5::Event::Outgoing(Outgoing::Publish(pkid)) => Some(*pkid),
                    _ => None,
                })
                .collect(),
        }
    }

    /// Queues `publishes` again, first of all, as new ones (packet id 0): the broker started a
    /// new session, and rumqttc dropped what it held for the old one.
    pub fn requeue(&mut self, publishes: PendingPublishes) {
        match (self, publishes) {
            (EventLoop::V311(e), PendingPublishes::V311(list)) => {
                for mut p in list.into_iter().rev() {
                    p.pkid = 0;
                    p.dup = false;
                    e.pending.push_front(rumqttc::Request::Publish(p));
                }
            }
            (EventLoop::V5(e), PendingPublishes::V5(list)) => {
                for mut p in list.into_iter().rev() {
                    p.pkid = 0;
                    p.dup = false;
                    e.pending.push_front(rumqttc::v5::Request::Publish(p));
                }
            }
            // One event loop speaks one version.
            _ => {}
        }
    }
}

/// Publishes rumqttc held when a connection broke (see [`EventLoop::pending_publishes`]).
#[derive(Debug, Clone)]
pub enum PendingPublishes {
    /// MQTT 3.1.1.
    V311(Vec<rumqttc::Publish>),
    /// MQTT 5.
    V5(Vec<p5::Publish>),
}

impl PendingPublishes {
    /// None.
    pub fn none() -> Self {
        PendingPublishes::V311(Vec::new())
    }

    /// Their packet ids in order; 0 for one never sent.
    pub fn pkids(&self) -> Vec<u16> {
        match self {
            PendingPublishes::V311(l) => l.iter().map(|p| p.pkid).collect(),
            PendingPublishes::V5(l) => l.iter().map(|p| p.pkid).collect(),
        }
    }
}

/// A reply to publish, QoS 1.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Where.
    pub topic: String,
    /// The function's response, as it returned it.
    pub payload: Bytes,
    /// The retain flag.
    pub retain: bool,
    /// MQTT 5: the request's Correlation Data, returned as is.
    pub correlation_data: Option<Bytes>,
    /// MQTT 5: the request's id, sent as the user property `request_id`.
    pub request_id: String,
}

/// The content type of a reply under MQTT 5: Lambda returns JSON.
const REPLY_CONTENT_TYPE: &str = "application/json";

impl Client {
    /// Hands an acknowledgement to the event loop without waiting; `false` when its request
    /// channel is full or closed.
    pub fn try_ack(&self, ack: Ack) -> bool {
        match self {
            Client::V311(c) => {
                let mut publish = rumqttc::Publish::new("", qos(ack.qos), Vec::new());
                publish.pkid = ack.pkid;
                c.try_ack(&publish).is_ok()
            }
            Client::V5(c) => {
                let mut publish = p5::Publish::new("", qos5(ack.qos), Bytes::new(), None);
                publish.pkid = ack.pkid;
                c.try_ack(&publish).is_ok()
            }
        }
    }

    /// Hands one reply to the event loop (QoS 1) without waiting; `false` when its request
    /// channel is full or closed.
    pub fn try_publish_reply(&self, reply: Reply) -> bool {
        match self {
            Client::V311(c) => c
                .try_publish(reply.topic, QoS::AtLeastOnce, reply.retain, reply.payload)
                .is_ok(),
            Client::V5(c) => {
                let properties = p5::PublishProperties {
                    correlation_data: reply.correlation_data,
                    content_type: Some(REPLY_CONTENT_TYPE.into()),
                    user_properties: vec![("request_id".into(), reply.request_id)],
                    ..Default::default()
                };
                c.try_publish_with_properties(
                    reply.topic,
                    QoS5::AtLeastOnce,
                    reply.retain,
                    reply.payload,
                    properties,
                )
                .is_ok()
            }
        }
    }

    /// Queues one SUBSCRIBE for `filters` (filter, QoS).
    pub async fn subscribe_many(&self, filters: Vec<(String, u8)>) -> Result<(), String> {
        match self {
            Client::V311(c) => c
                .subscribe_many(
                    filters
                        .into_iter()
                        .map(|(f, q)| rumqttc::SubscribeFilter::new(f, qos(q))),
                )
                .await
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .subscribe_many(
                    filters
                        .into_iter()
                        .map(|(f, q)| p5::Filter::new(f, qos5(q))),
                )
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Queues one UNSUBSCRIBE for `filter`.
    pub async fn unsubscribe(&self, filter: String) -> Result<(), String> {
        match self {
            Client::V311(c) => c.unsubscribe(filter).await.map_err(|e| e.to_string()),
            Client::V5(c) => c.unsubscribe(filter).await.map_err(|e| e.to_string()),
        }
    }

    /// Asks the event loop to send DISCONNECT, without waiting.
    pub fn try_disconnect(&self) {
        let _ = match self {
            Client::V311(c) => c.try_disconnect().map_err(|_| ()),
            Client::V5(c) => c.try_disconnect().map_err(|_| ()),
        };
    }
}

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn qos5(level: u8) -> QoS5 {
    match level {
        0 => QoS5::AtMostOnce,
        1 => QoS5::AtLeastOnce,
        _ => QoS5::ExactlyOnce,
    }
}

fn outgoing(event: Outgoing) -> Event {
    match event {
        Outgoing::Subscribe(pkid) => Event::SubscribeSent(pkid),
        Outgoing::Unsubscribe(pkid) => Event::UnsubscribeSent(pkid),
        Outgoing::Publish(pkid) => Event::PublishSent(pkid),
        Outgoing::Disconnect => Event::DisconnectSent,
        Outgoing::PubAck(pkid) | Outgoing::PubRec(pkid) => Event::AckSent(pkid),
        Outgoing::PubComp(pkid) => Event::Released(pkid),
        _ => Event::Other,
    }
}

fn from_v311(event: rumqttc::Event) -> Event {
    use rumqttc::{Event as E, Incoming as I, SubscribeReasonCode as R};
    match event {
        E::Incoming(I::ConnAck(ack)) => Event::Connected {
            session_present: ack.session_present,
            max_packet_size: None,
        },
        E::Incoming(I::Publish(p)) => Event::Publish(Inbound {
            ack: Ack {
                pkid: p.pkid,
                qos: p.qos as u8,
            },
            topic: p.topic,
            payload: p.payload,
            qos: p.qos as u8,
            retain: p.retain,
            properties: None,
        }),
        E::Incoming(I::SubAck(ack)) => Event::SubAck {
            pkid: ack.pkid,
            granted: ack
                .return_codes
                .iter()
                .map(|code| match code {
                    R::Success(q) => Granted::Qos(*q as u8),
                    // 3.1.1 has one failure code and no reason.
                    R::Failure => Granted::Refused("failure (0x80)".into()),
                })
                .collect(),
        },
        E::Incoming(I::UnsubAck(ack)) => Event::UnsubAck {
            pkid: ack.pkid,
            refused: None,
        },
        E::Incoming(I::PubAck(ack)) => Event::PubAck {
            pkid: ack.pkid,
            refused: None,
        },
        E::Outgoing(o) => outgoing(o),
        E::Incoming(_) => Event::Other,
    }
}

fn from_v5(event: rumqttc::v5::Event) -> Event {
    use rumqttc::v5::{Event as E, Incoming as I};
    match event {
        E::Incoming(I::ConnAck(ack)) => Event::Connected {
            session_present: ack.session_present,
            max_packet_size: ack.properties.and_then(|p| p.max_packet_size),
        },
        E::Incoming(I::Publish(p)) => {
            let properties = p.properties.and_then(|props| {
                Properties::of_request(
                    props.user_properties,
                    props.content_type,
                    props.response_topic,
                    props.correlation_data.map(|d| d.to_vec()),
                )
            });
            Event::Publish(Inbound {
                ack: Ack {
                    pkid: p.pkid,
                    qos: p.qos as u8,
                },
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload,
                qos: p.qos as u8,
                retain: p.retain,
                properties,
            })
        }
        E::Incoming(I::SubAck(ack)) => {
            let reason = ack.properties.and_then(|p| p.reason_string);
            Event::SubAck {
                pkid: ack.pkid,
                granted: ack
                    .return_codes
                    .iter()
                    .map(|code| match code {
                        p5::SubscribeReasonCode::Success(q) => Granted::Qos(*q as u8),
                        refused => Granted::Refused(with_reason(
                            subscribe_reason(refused),
                            reason.as_deref(),
                        )),
                    })
                    .collect(),
            }
        }
        E::Incoming(I::UnsubAck(ack)) => {
            let reason = ack.properties.and_then(|p| p.reason_string);
            let refused = ack.reasons.iter().find_map(|r| match r {
                p5::UnsubAckReason::Success | p5::UnsubAckReason::NoSubscriptionExisted => None,
                other => Some(with_reason(words(&format!("{other:?}")), reason.as_deref())),
            });
            Event::UnsubAck {
                pkid: ack.pkid,
                refused,
            }
        }
        E::Incoming(I::PubAck(ack)) => {
            use p5::PubAckReason as R;
            let refused = match ack.reason {
                R::Success | R::NoMatchingSubscribers => None,
                other => Some(with_reason(
                    format!(
                        "{} (0x{:02X})",
                        words(&format!("{other:?}")),
                        puback_reason_code(other)
                    ),
                    ack.properties
                        .as_ref()
                        .and_then(|p| p.reason_string.as_deref()),
                )),
            };
            Event::PubAck {
                pkid: ack.pkid,
                refused,
            }
        }
        E::Outgoing(o) => outgoing(o),
        E::Incoming(_) => Event::Other,
    }
}

/// MQTT 5's number for a PUBACK reason.
fn puback_reason_code(reason: p5::PubAckReason) -> u8 {
    use p5::PubAckReason as R;
    match reason {
        R::Success => 0x00,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

/// `NotAuthorized` → `not authorized`: rumqttc's reason code names as words.
fn words(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push(' ');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// The reason code's words, and the broker's reason string when it sent one.
fn with_reason(code: String, reason: Option<&str>) -> String {
    match reason {
        Some(r) if !r.is_empty() => format!("{code}: {r}"),
        _ => code,
    }
}

/// A SUBACK failure as words with its MQTT 5 reason code.
fn subscribe_reason(code: &p5::SubscribeReasonCode) -> String {
    use p5::SubscribeReasonCode as R;
    let number = match code {
        R::Success(q) => *q as u8,
        R::Failure | R::Unspecified => 0x80,
        R::ImplementationSpecific => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicFilterInvalid => 0x8F,
        R::PkidInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::SharedSubscriptionsNotSupported => 0x9E,
        R::SubscriptionIdNotSupported => 0xA1,
        R::WildcardSubscriptionsNotSupported => 0xA2,
    };
    format!("{} (0x{number:02X})", words(&format!("{code:?}")))
}

/// A CONNACK refusal as words with its MQTT 5 reason code, and what to check.
fn connect_reason(code: &p5::ConnectReturnCode) -> String {
    use p5::ConnectReturnCode as R;
    let (number, hint) = match code {
        R::BadUserNamePassword => (Some(0x86), "; check mqtt.username and the password"),
        R::NotAuthorized => (
            Some(0x87),
            "; check the broker's ACL for this user and client id",
        ),
        R::ClientIdentifierNotValid => (Some(0x85), "; check mqtt.client_id"),
        R::Banned => (Some(0x8A), ""),
        R::UnsupportedProtocolVersion => (
            Some(0x84),
            "; the broker does not speak MQTT 5: set mqtt.protocol = \"3.1.1\"",
        ),
        R::ServerUnavailable => (Some(0x88), ""),
        R::ServerBusy => (Some(0x89), ""),
        R::QuotaExceeded => (Some(0x97), ""),
        R::ConnectionRateExceeded => (Some(0x9F), ""),
        R::UseAnotherServer => (Some(0x9C), ""),
        R::ServerMoved => (Some(0x9D), ""),
        R::UnspecifiedError => (Some(0x80), ""),
        R::MalformedPacket => (Some(0x81), ""),
        R::ProtocolError => (Some(0x82), ""),
        _ => (None, ""),
    };
    let name = words(&format!("{code:?}"));
    match number {
        Some(n) => format!("{name} (0x{n:02X}){hint}"),
        None => format!("{name}{hint}"),
    }
}

/// A DISCONNECT from the broker as words with its reason code, and what to check.
fn disconnect_reason(code: p5::DisconnectReasonCode, reason: Option<&str>) -> String {
    use p5::DisconnectReasonCode as R;
    let hint = match code {
        R::SessionTakenOver => {
            "; another client connected with the same mqtt.client_id (each bridge needs its own)"
        }
        R::NotAuthorized => "; check the broker's ACL for this user and client id",
        R::ReceiveMaximumExceeded => "; the broker sent more than mqtt.receive_maximum",
        _ => "",
    };
    format!(
        "the broker disconnected us: {} (0x{:02X}){hint}",
        with_reason(words(&format!("{code:?}")), reason),
        code as u8
    )
}

fn describe_v311(err: &rumqttc::ConnectionError) -> String {
    match err {
        rumqttc::ConnectionError::ConnectionRefused(code) => format!(
            "the broker refused the connection: {}; check mqtt.username, the password and mqtt.client_id",
            words(&format!("{code:?}"))
        ),
        other => other.to_string(),
    }
}

fn describe_v5(err: &rumqttc::v5::ConnectionError) -> String {
    use rumqttc::v5::{ConnectionError as C, StateError as S};
    match err {
        C::ConnectionRefused(code) | C::MqttState(S::ConnFail { reason: code }) => {
            format!(
                "the broker refused the connection: {}",
                connect_reason(code)
            )
        }
        C::MqttState(S::ServerDisconnect {
            reason_code,
            reason_string,
        }) => disconnect_reason(*reason_code, reason_string.as_deref()),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_a_resumed_session_any_repeated_release_is_answered_and_nothing_is_reported() {
        let mut v311 = rumqttc::MqttOptions::new("t", "127.0.0.1", 1883);
        v311.set_manual_acks(true);
        let mut v5 = rumqttc::v5::MqttOptions::new("t", "127.0.0.1", 1883);
        v5.set_manual_acks(true);
        for options in [Options::V311(v311), Options::V5(v5)] {
            let (_client, mut eventloop) = connect(options, 10);
            eventloop.expect_repeated_releases();
            match &mut eventloop {
                EventLoop::V311(e) => {
                    assert!(e.state.events.is_empty(), "no made-up publish is reported");
                    for pkid in [1, 4242, u16::MAX] {
                        let answer = e
                            .state
                            .handle_incoming_packet(rumqttc::Incoming::PubRel(
                                rumqttc::PubRel::new(pkid),
                            ))
                            .expect("the release is accepted");
                        assert_eq!(
                            answer,
                            Some(rumqttc::Packet::PubComp(rumqttc::PubComp::new(pkid)))
                        );
                    }
                }
                EventLoop::V5(e) => {
                    assert!(e.state.events.is_empty(), "no made-up publish is reported");
                    for pkid in [1, 4242, u16::MAX] {
                        let answer = e
                            .state
                            .handle_incoming_packet(rumqttc::v5::Incoming::PubRel(p5::PubRel::new(
                                pkid, None,
                            )))
                            .expect("the release is accepted");
                        assert!(
                            matches!(&answer, Some(p5::Packet::PubComp(c)) if c.pkid == pkid),
                            "{answer:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn reason_codes_read_as_words_with_their_number() {
        assert_eq!(words("NotAuthorized"), "not authorized");
        assert_eq!(
            subscribe_reason(&p5::SubscribeReasonCode::NotAuthorized),
            "not authorized (0x87)"
        );
        assert!(
            connect_reason(&p5::ConnectReturnCode::BadUserNamePassword)
                .starts_with("bad user name password (0x86); check mqtt.username")
        );
        assert_eq!(
            disconnect_reason(p5::DisconnectReasonCode::SessionTakenOver, None),
            "the broker disconnected us: session taken over (0x8E); another client connected \
             with the same mqtt.client_id (each bridge needs its own)"
        );
    }

    #[test]
    fn an_mqtt5_publish_keeps_its_user_properties_and_content_type() {
        let props = p5::PublishProperties {
            user_properties: vec![("k".into(), "v".into())],
            content_type: Some("text/plain".into()),
            ..Default::default()
        };
        let mut publish = p5::Publish::new("a/b", QoS5::AtLeastOnce, "x", Some(props));
        publish.pkid = 7;
        let Event::Publish(inbound) = from_v5(rumqttc::v5::Event::Incoming(
            rumqttc::v5::Incoming::Publish(publish),
        )) else {
            panic!("not a publish");
        };
        assert_eq!(inbound.topic, "a/b");
        assert_eq!(inbound.ack, Ack { pkid: 7, qos: 1 });
        let p = inbound.properties.expect("properties");
        assert_eq!(p.user, vec![("k".to_owned(), "v".to_owned())]);
        assert_eq!(p.content_type.as_deref(), Some("text/plain"));
    }

    #[test]
    fn broker_urls_name_scheme_host_and_port() {
        let options = Options::V311(rumqttc::MqttOptions::new("id", "gateway.local", 8883));
        assert_eq!(options.broker_url(), "mqtt://gateway.local:8883");
    }
}
