//! Every touch of rumqttc's internals: the fields and methods of its event loop that are
//! public but not part of its documented API (`network`, `pending`, `state.events`,
//! `state.handle_incoming_packet`). The rest of the bridge calls the small methods here and
//! never names those fields.
//!
//! Each use rests on an assumption about rumqttc 0.25.1 (pinned with `=` in Cargo.toml); each
//! assumption has one unit test below, named for it, so an upgrade that breaks one fails that
//! test by name instead of silently corrupting a stream of acknowledgements or replies:
//!
//! - under MQTT 3.1.1 `network` is `Some` once a CONNACK was polled, and what we write to it
//!   between polls reaches the broker in the order written (the grouped acknowledgements),
//!   and `clean()` after a failed write drops it so that the next poll connects again;
//! - `state.handle_incoming_packet` with a made-up QoS 2 publish marks its packet id as in
//!   progress, adds exactly one event (taken back by truncating `state.events`) and, with
//!   manual acks, answers nothing; a PUBREL for a marked id is then answered with PUBCOMP,
//!   and one for an unmarked id is refused (why the marking is needed at all);
//! - `pending` is a queue of requests sent before the request channel's, in order; after a
//!   broken connection it holds the publishes in flight (with their ids) and those not sent,
//!   and a CONNACK without the session clears it (so replies are handed back after it);
//! - a publish sent shows in `state.events` as `Outgoing::Publish(pkid)` until it is reported.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::{Outgoing, QoS};

use super::protocol::{Ack, EventLoop};
use super::session::RequestsHeld;

/// How long writing acknowledgements may wait for the broker to take them (rumqttc's own
/// flushes wait as long, its default connection timeout).
const ACK_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

impl EventLoop {
    /// Whether [`EventLoop::write_acks`] can write to the connection: under MQTT 3.1.1. rumqttc
    /// keeps its MQTT 5 connection to itself.
    pub fn writes_acks(&self) -> bool {
        matches!(self, EventLoop::V311(_))
    }

    /// Writes `acks` to the connection in one go (PUBACK, or PUBREC for QoS 2), between polls;
    /// under MQTT 5, or when not connected, writes nothing.
    ///
    /// When they cannot all be written (the broker took no data for [`ACK_FLUSH_TIMEOUT`], or
    /// the socket failed), the connection is dropped, as rumqttc drops it when its own writes
    /// fail: the broker sends unacknowledged messages again only on a new connection, so one
    /// that stayed up would hold them (and their in-flight slots) for good. The next poll
    /// connects again; the error says why, for the log.
    pub async fn write_acks(&mut self, acks: &[Ack]) -> Result<(), String> {
        let written = self.try_write_acks(acks).await;
        if written.is_err()
            && let EventLoop::V311(e) = self
        {
            // What rumqttc held moves to its pending list, as after a failed poll.
            e.clean();
        }
        written
    }

    async fn try_write_acks(&mut self, acks: &[Ack]) -> Result<(), String> {
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

    /// The SUBSCRIBEs and UNSUBSCRIBEs rumqttc holds, not reported sent yet: right after a
    /// failed poll, those it took (their reports wait in `state.events` and come after the
    /// reconnect) and those in `pending` (a CONNACK without the session clears them).
    pub fn requests_held(&self) -> RequestsHeld {
        match self {
            EventLoop::V311(e) => RequestsHeld {
                taken: (e.state.events.iter())
                    .filter(|ev| {
                        matches!(
                            ev,
                            rumqttc::Event::Outgoing(
                                Outgoing::Subscribe(_) | Outgoing::Unsubscribe(_)
                            )
                        )
                    })
                    .count(),
                pending: (e.pending.iter())
                    .filter(|r| {
                        matches!(
                            r,
                            rumqttc::Request::Subscribe(_) | rumqttc::Request::Unsubscribe(_)
                        )
                    })
                    .count(),
            },
            EventLoop::V5(e) => RequestsHeld {
                taken: (e.state.events.iter())
                    .filter(|ev| {
                        matches!(
                            ev,
                            rumqttc::v5::Event::Outgoing(
                                Outgoing::Subscribe(_) | Outgoing::Unsubscribe(_)
                            )
                        )
                    })
                    .count(),
                pending: (e.pending.iter())
                    .filter(|r| {
                        matches!(
                            r,
                            rumqttc::v5::Request::Subscribe(_)
                                | rumqttc::v5::Request::Unsubscribe(_)
                        )
                    })
                    .count(),
            },
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
    /// Their packet ids in order; 0 for one never sent.
    pub fn pkids(&self) -> Vec<u16> {
        match self {
            PendingPublishes::V311(l) => l.iter().map(|p| p.pkid).collect(),
            PendingPublishes::V5(l) => l.iter().map(|p| p.pkid).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::protocol::{Options, connect};
    use bytes::BytesMut;
    use rumqttc::{Packet, QoS};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    const WITHIN: Duration = Duration::from_secs(5);

    fn event_loops() -> [EventLoop; 2] {
        let mut v311 = rumqttc::MqttOptions::new("t", "127.0.0.1", 1883);
        v311.set_manual_acks(true);
        let mut v5 = rumqttc::v5::MqttOptions::new("t", "127.0.0.1", 1883);
        v5.set_manual_acks(true);
        [Options::V311(v311), Options::V5(v5)].map(|options| connect(options, 10).1)
    }

    /// A broker of one MQTT 3.1.1 connection, enough to see what the client writes.
    struct FakeBroker {
        stream: TcpStream,
        read: BytesMut,
    }

    impl FakeBroker {
        /// Takes the client's CONNECT and accepts it.
        async fn accept(listener: &TcpListener) -> FakeBroker {
            let (stream, _) = listener.accept().await.expect("accept");
            let mut broker = FakeBroker {
                stream,
                read: BytesMut::new(),
            };
            assert!(matches!(broker.next().await, Packet::Connect(..)));
            let mut out = BytesMut::new();
            Packet::ConnAck(rumqttc::ConnAck::new(
                rumqttc::ConnectReturnCode::Success,
                false,
            ))
            .write(&mut out, 1024)
            .expect("connack");
            broker.stream.write_all(&out).await.expect("write connack");
            broker
        }

        async fn next(&mut self) -> Packet {
            loop {
                match Packet::read(&mut self.read, 1 << 20) {
                    Ok(packet) => return packet,
                    Err(rumqttc::Error::InsufficientBytes(_)) => {
                        let n = self.stream.read_buf(&mut self.read).await.expect("read");
                        assert!(n > 0, "the client closed the connection");
                    }
                    Err(e) => panic!("not MQTT: {e}"),
                }
            }
        }
    }

    async fn listener() -> (TcpListener, rumqttc::EventLoop, rumqttc::AsyncClient) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mut options = rumqttc::MqttOptions::new("t", "127.0.0.1", port);
        options.set_manual_acks(true);
        let (client, eventloop) = rumqttc::AsyncClient::new(options, 10);
        (listener, eventloop, client)
    }

    /// Polls until the CONNACK.
    async fn connected(e: &mut rumqttc::EventLoop) {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Incoming::ConnAck(_)) =
                e.poll().await.expect("poll")
            {
                return;
            }
        }
    }

    #[tokio::test]
    async fn the_network_is_ours_after_a_connack_and_writes_arrive_in_order() {
        let (listener, e, _client) = listener().await;
        let mut eventloop = EventLoop::V311(e);
        assert!(eventloop.writes_acks());
        let EventLoop::V311(e) = &mut eventloop else {
            unreachable!()
        };
        assert!(e.network.is_none(), "no connection before the first poll");
        let broker = tokio::spawn(async move {
            let mut broker = FakeBroker::accept(&listener).await;
            let mut seen = Vec::new();
            for _ in 0..3 {
                seen.push(broker.next().await);
            }
            seen
        });
        tokio::time::timeout(WITHIN, connected(e))
            .await
            .expect("connack");
        assert!(e.network.is_some(), "connected after the CONNACK");
        let acks = [
            Ack { pkid: 3, qos: 1 },
            Ack { pkid: 1, qos: 2 },
            Ack { pkid: 2, qos: 1 },
        ];
        eventloop.write_acks(&acks).await.expect("written");
        let seen = tokio::time::timeout(WITHIN, broker).await.expect("in time");
        assert_eq!(
            seen.expect("broker"),
            vec![
                Packet::PubAck(rumqttc::PubAck::new(3)),
                Packet::PubRec(rumqttc::PubRec::new(1)),
                Packet::PubAck(rumqttc::PubAck::new(2)),
            ]
        );
    }

    #[tokio::test]
    async fn acks_the_broker_does_not_take_drop_the_connection_and_the_next_poll_reconnects() {
        let (listener, e, _client) = listener().await;
        let mut eventloop = EventLoop::V311(e);
        // A broker that takes the connection, then reads nothing: writes block once the
        // sockets' buffers are full.
        let broker = tokio::spawn(async move {
            let stalled = FakeBroker::accept(&listener).await;
            let again = FakeBroker::accept(&listener).await;
            (stalled, again)
        });
        let EventLoop::V311(e) = &mut eventloop else {
            unreachable!()
        };
        tokio::time::timeout(WITHIN, connected(e))
            .await
            .expect("connack");
        // Far more than the sockets' buffers take: 4 bytes each, 16 MiB.
        let acks: Vec<Ack> = (0..4 << 20)
            .map(|i| Ack {
                pkid: (i % 65_535 + 1) as u16,
                qos: 1,
            })
            .collect();
        // The ack timeout passes at once once the write blocks (the clock is paused).
        tokio::time::pause();
        let written = eventloop.write_acks(&acks).await;
        tokio::time::resume();
        assert!(written.is_err(), "the broker took 16 MiB without reading");
        let EventLoop::V311(e) = &mut eventloop else {
            unreachable!()
        };
        assert!(
            e.network.is_none(),
            "the connection must not stay up with acknowledgements lost: the broker sends those \
             messages again only on a new connection"
        );
        tokio::time::timeout(WITHIN, connected(e))
            .await
            .expect("the next poll connects again");
        let accepted = tokio::time::timeout(WITHIN, broker).await;
        assert!(matches!(accepted, Ok(Ok(_))), "a second connection");
    }

    #[tokio::test]
    async fn a_new_session_clears_pending_and_what_is_pushed_after_goes_out_first_in_order() {
        let (listener, e, client) = listener().await;
        let mut eventloop = EventLoop::V311(e);
        let old = rumqttc::Publish::new("old", QoS::AtLeastOnce, "0");
        eventloop.requeue(PendingPublishes::V311(vec![old]));
        // One handed over the ordinary way, waiting in the request channel.
        client
            .try_publish("c", QoS::AtLeastOnce, false, "3")
            .expect("queued");
        let broker = tokio::spawn(async move {
            let mut broker = FakeBroker::accept(&listener).await;
            let mut topics = Vec::new();
            while topics.len() < 3 {
                if let Packet::Publish(p) = broker.next().await {
                    topics.push(p.topic);
                }
            }
            topics
        });
        let EventLoop::V311(e) = &mut eventloop else {
            unreachable!()
        };
        tokio::time::timeout(WITHIN, connected(e))
            .await
            .expect("connack");
        assert!(
            eventloop.pending_publishes().pkids().is_empty(),
            "a CONNACK without the session drops what rumqttc held"
        );
        // Handed back as after a new session, one of which had an id.
        let mut a = rumqttc::Publish::new("a", QoS::AtLeastOnce, "1");
        a.pkid = 7;
        let b = rumqttc::Publish::new("b", QoS::AtLeastOnce, "2");
        eventloop.requeue(PendingPublishes::V311(vec![a, b]));
        assert_eq!(eventloop.pending_publishes().pkids(), vec![0, 0]);
        let EventLoop::V311(e) = &mut eventloop else {
            unreachable!()
        };
        let topics = tokio::time::timeout(WITHIN, async {
            tokio::select! {
                topics = broker => topics.expect("broker"),
                _ = async { loop { let _ = e.poll().await; } } => unreachable!(),
            }
        })
        .await
        .expect("in time");
        assert_eq!(topics, vec!["a", "b", "c"]);
    }

    #[tokio::test]
    async fn a_broken_connection_leaves_publishes_in_flight_in_pending_with_their_ids() {
        let (listener, e, client) = listener().await;
        let mut eventloop = EventLoop::V311(e);
        client
            .try_publish("x", QoS::AtLeastOnce, false, "1")
            .expect("queued");
        let broker = tokio::spawn(async move {
            let mut broker = FakeBroker::accept(&listener).await;
            loop {
                if let Packet::Publish(p) = broker.next().await {
                    return p.pkid;
                }
            }
            // The connection drops with the broker here, before any PUBACK.
        });
        let EventLoop::V311(e) = &mut eventloop else {
            unreachable!()
        };
        let broke = tokio::time::timeout(WITHIN, async {
            loop {
                if e.poll().await.is_err() {
                    return;
                }
            }
        });
        let (pkid, broke) = tokio::join!(broker, broke);
        broke.expect("the connection broke");
        let pkid = pkid.expect("broker");
        assert_ne!(pkid, 0);
        assert_eq!(eventloop.pending_publishes().pkids(), vec![pkid]);
    }

    #[test]
    fn held_subscribes_are_those_in_pending_and_those_whose_report_is_still_in_state_events() {
        let [mut v311, mut v5] = event_loops();
        let EventLoop::V311(e) = &mut v311 else {
            unreachable!()
        };
        e.state
            .handle_outgoing_packet(rumqttc::Request::Subscribe(rumqttc::Subscribe::new(
                "a",
                QoS::AtLeastOnce,
            )))
            .expect("taken");
        e.pending
            .push_back(rumqttc::Request::Unsubscribe(rumqttc::Unsubscribe::new(
                "b",
            )));
        e.pending
            .push_back(rumqttc::Request::Subscribe(rumqttc::Subscribe::new(
                "c",
                QoS::AtLeastOnce,
            )));
        let EventLoop::V5(e) = &mut v5 else {
            unreachable!()
        };
        e.pending
            .push_back(rumqttc::v5::Request::Unsubscribe(p5::Unsubscribe::new(
                "b", None,
            )));
        let held = |taken, pending| RequestsHeld { taken, pending };
        assert_eq!(v311.requests_held(), held(1, 2));
        assert_eq!(v5.requests_held(), held(0, 1));
    }

    #[test]
    fn a_made_up_qos2_publish_adds_one_event_and_answers_nothing_with_manual_acks() {
        for mut eventloop in event_loops() {
            match &mut eventloop {
                EventLoop::V311(e) => {
                    let mut publish = rumqttc::Publish::new("", QoS::ExactlyOnce, Vec::new());
                    publish.pkid = 9;
                    let answer = e
                        .state
                        .handle_incoming_packet(rumqttc::Incoming::Publish(publish))
                        .expect("accepted");
                    assert_eq!(answer, None);
                    assert_eq!(e.state.events.len(), 1);
                }
                EventLoop::V5(e) => {
                    let mut publish = p5::Publish::new("", QoS5::ExactlyOnce, Bytes::new(), None);
                    publish.pkid = 9;
                    let answer = e
                        .state
                        .handle_incoming_packet(rumqttc::v5::Incoming::Publish(publish))
                        .expect("accepted");
                    assert!(answer.is_none(), "{answer:?}");
                    assert_eq!(e.state.events.len(), 1);
                }
            }
            eventloop.expect_release(10);
            let reported = match &eventloop {
                EventLoop::V311(e) => e.state.events.len(),
                EventLoop::V5(e) => e.state.events.len(),
            };
            assert_eq!(reported, 1, "expect_release takes back its own event");
        }
    }

    #[test]
    fn an_unsolicited_release_is_refused_so_ids_must_be_marked_first() {
        for mut eventloop in event_loops() {
            match &mut eventloop {
                EventLoop::V311(e) => assert!(
                    e.state
                        .handle_incoming_packet(rumqttc::Incoming::PubRel(rumqttc::PubRel::new(5)))
                        .is_err()
                ),
                EventLoop::V5(e) => assert!(
                    e.state
                        .handle_incoming_packet(rumqttc::v5::Incoming::PubRel(p5::PubRel::new(
                            5, None
                        )))
                        .is_err()
                ),
            }
        }
    }

    #[test]
    fn a_publish_sent_shows_in_state_events_as_outgoing_publish() {
        for mut eventloop in event_loops() {
            match &mut eventloop {
                EventLoop::V311(e) => {
                    let publish = rumqttc::Publish::new("r", QoS::AtLeastOnce, "x");
                    e.state
                        .handle_outgoing_packet(rumqttc::Request::Publish(publish))
                        .expect("sent");
                }
                EventLoop::V5(e) => {
                    let publish = p5::Publish::new("r", QoS5::AtLeastOnce, "x", None);
                    e.state
                        .handle_outgoing_packet(rumqttc::v5::Request::Publish(publish))
                        .expect("sent");
                }
            }
            assert_eq!(eventloop.unreported_publishes_sent(), vec![1]);
        }
    }

    #[test]
    fn a_release_for_an_id_marked_in_progress_is_answered_with_pubcomp_and_nothing_is_reported() {
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
}
