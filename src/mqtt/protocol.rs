//! The seam between MQTT 3.1.1 and MQTT 5: one client, one event loop and one event type over
//! rumqttc's two implementations (`rumqttc` and `rumqttc::v5`), so the ingest, ack and hold
//! logic in `mqtt/` is written once. Only rumqttc's documented API is used here; what the
//! bridge does with its internals (grouped acknowledgements, expecting repeated releases,
//! handing replies back after a new session) is in `internals.rs`, and reason codes are put
//! in words in `reasons.rs`.
//!
//! Invariants: an [`Inbound`] publish carries everything the bridge keeps of it (topic, payload,
//! QoS, retain, and under MQTT 5 its user properties and content type) and an [`Ack`] handle,
//! which is only a packet id and a QoS: acknowledging needs nothing else, so the payload can be
//! dropped once stored. Whatever the broker refuses (CONNACK, SUBACK per filter, UNSUBACK,
//! DISCONNECT) comes out as words a person can act on, with MQTT 5's reason code.

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::{Outgoing, QoS, Transport};

use crate::core::envelope::Properties;

pub use super::internals::PendingPublishes;
use super::reasons::{
    describe_v5, describe_v311, puback_reason_code, subscribe_reason, with_reason, words,
};

pub use crate::core::config::MIN_KEEP_ALIVE_V5;

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
    /// Polls once; an error is the connection's end, described for a person.
    pub async fn poll(&mut self) -> Result<Event, String> {
        match self {
            EventLoop::V311(e) => e.poll().await.map(from_v311).map_err(|e| describe_v311(&e)),
            EventLoop::V5(e) => e.poll().await.map(from_v5).map_err(|e| describe_v5(&e)),
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
                    // Telemetry answers no request: no `request_id` then.
                    user_properties: Some(reply.request_id)
                        .filter(|id| !id.is_empty())
                        .map(|id| ("request_id".into(), id))
                        .into_iter()
                        .collect(),
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
        E::Incoming(I::PubAck(ack)) => Event::PubAck {
            pkid: ack.pkid,
            refused: puback_refused(&ack),
        },
        E::Outgoing(o) => outgoing(o),
        E::Incoming(_) => Event::Other,
    }
}

/// Why the broker refused our publish, if it did: the reason code's words and number, and
/// its reason string.
fn puback_refused(ack: &p5::PubAck) -> Option<String> {
    use p5::PubAckReason as R;
    match ack.reason {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
