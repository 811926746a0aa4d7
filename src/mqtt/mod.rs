//! The MQTT side: connection options, the event loop, and ingest into the rule queues.
//!
//! Two tasks share the work. The *poll task* drives rumqttc's event loop (it must be polled for
//! anything to happen, acks and keep-alives included), subscribes when the broker says the
//! session is new, reconnects with capped exponential backoff, and forwards each publish to the
//! *ingest loop*. The ingest loop hands each group of publishes to the routes (`routing.rs`:
//! match, set aside what is too large, append to every matching rule's queue at once) and only
//! when they are stored (durable) acknowledges the publishes, in the order received (under
//! MQTT 3.1.1 a group's acknowledgements go out in one write: `acks.rs`). A resumed session is
//! ready for the broker to repeat the release of QoS 2 messages acknowledged before
//! ([`EventLoop::expect_repeated_releases`]).
//!
//! The poll task never waits on ingest: while ingest waits (a full disk, `when_full = "block"`)
//! the event loop keeps being polled, so PINGREQs go out and the connection stays up. What it
//! holds meanwhile is bounded by the broker's in-flight window for unacknowledged QoS 1/2
//! messages (mosquitto's `max_inflight_messages`, 20 by default); past [`INGEST_HOLD_MAX`]
//! publishes or [`INGEST_HOLD_MAX_BYTES`] it stops polling (TCP then pushes back on the broker).
//!
//! Manual acks are on: a publish that was not appended is never acknowledged, so after a crash
//! the broker (persistent session, `clean_start = false`) delivers it again.
//!
//! A broker that stays down is logged for a person reading the journal: one warn line with
//! the broker's URL at the first failure, reminders with the outage's length so far after
//! [`reminder_after`] (1 min, 5 min, then every 15 min), and one info line with the outage's
//! length when it is back. Repeats in between are at debug.
//!
//! The ingest loop is watched (health.rs `Beat`): it turns each time round and when idle. While
//! it waits for the buffer to store a group it counts as alive, because with
//! `when_full = "block"` that wait lasts as long as Lambda is down, by design.
//! A third task, the *subscriber*, sends every SUBSCRIBE and UNSUBSCRIBE: the whole current rule
//! set when the poll task reports a new session (and once per process start), and what a reload
//! adds or removes ([`Subscriptions`]) on the same connection and session. Being the only
//! sender, it notes each request in order, so a SUBACK names the filters it answers.
//!
//! MQTT 3.1.1 and MQTT 5 (`mqtt.protocol`) differ only behind [`protocol`]: the same tasks run
//! over either client, publishes arrive as one [`protocol::Inbound`] type (MQTT 5's user
//! properties and content type included) and are acknowledged by packet id. Under MQTT 5 the
//! session persists through the session expiry interval instead of the clean-session flag,
//! and the broker's reason codes are logged when it refuses a connection or a subscription.

mod acks;
mod internals;
pub mod protocol;
mod reasons;
pub mod replies;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::core::clock::human;
use crate::core::config::{MqttConfig, MqttProtocol, parse_mqtt_url};
use crate::core::health::Health;
use crate::core::shutdown::Shutdown;

use acks::{AckLine, AckQueue, Exchanges};
pub use protocol::Options;
use protocol::{Client, Event, EventLoop, Granted, Inbound, PendingPublishes};
use replies::Replier;

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
/// polling (and so reading the socket) until ingest catches up.
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
/// When a broker is still down, the first reminders in the log come after these times...
const OUTAGE_FIRST_REMINDERS: [Duration; 2] = [Duration::from_secs(60), Duration::from_secs(300)];
/// ...and then one every this long.
const OUTAGE_REMINDER_EVERY: Duration = Duration::from_secs(15 * 60);

/// Why the MQTT side cannot start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// `mqtt.url` is unusable (validation normally catches this first).
    #[error("mqtt.url: {0}")]
    Url(String),
    /// A file named in `[mqtt]` could not be read.
    #[error("{key}: cannot read {path}: {source}")]
    File {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A TLS file was read but is not usable.
    #[error("{key}: {message}")]
    Tls {
        /// The config key naming the file.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Builds rumqttc's options from `[mqtt]` for the configured protocol: persistent session
/// (3.1.1: clean session off; 5: the session expiry interval), manual acks, TLS with ring.
pub fn options(config: &MqttConfig) -> Result<Options, MqttError> {
    let address = parse_mqtt_url(&config.url).map_err(MqttError::Url)?;
    let credentials = credentials(config)?;
    let transport = if address.tls {
        Some(Transport::tls_with_config(tls_config(config)?))
    } else {
        None
    };
    match config.protocol {
        MqttProtocol::V311 => {
            let mut options =
                rumqttc::MqttOptions::new(config.client_id.clone(), address.host, address.port);
            options
                .set_clean_session(config.clean_start)
                .set_keep_alive(config.keep_alive.0.max(Duration::from_secs(1)))
                .set_manual_acks(true)
                .set_max_packet_size(MAX_INCOMING_PACKET, MAX_INCOMING_PACKET)
                .set_request_channel_capacity(REQUEST_CAPACITY);
            if let Some((username, password)) = credentials {
                options.set_credentials(username, password);
            }
            if let Some(transport) = transport {
                options.set_transport(transport);
            }
            Ok(Options::V311(options))
        }
        MqttProtocol::V5 => {
            let mut options =
                rumqttc::v5::MqttOptions::new(config.client_id.clone(), address.host, address.port);
            options
                .set_clean_start(config.clean_start)
                .set_keep_alive(config.keep_alive.0.max(protocol::MIN_KEEP_ALIVE_V5))
                .set_manual_acks(true)
                .set_session_expiry_interval(Some(config.session_expiry_secs()))
                .set_receive_maximum(Some(config.receive_maximum()))
                .set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT)
                .set_max_packet_size(Some(MAX_INCOMING_PACKET as u32))
                .set_request_channel_capacity(REQUEST_CAPACITY);
            if let Some((username, password)) = credentials {
                options.set_credentials(username, password);
            }
            if let Some(transport) = transport {
                options.set_transport(transport);
            }
            Ok(Options::V5(options))
        }
    }
}

/// The user name and password to send, if `mqtt.username` is set.
fn credentials(config: &MqttConfig) -> Result<Option<(String, String)>, MqttError> {
    if let Some(username) = &config.username {
        let password = match (&config.password, &config.password_file) {
            (Some(p), _) => p.expose().to_owned(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|source| MqttError::File {
                    key: "mqtt.password_file",
                    path: path.display().to_string(),
                    source,
                })?
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
            (None, None) => String::new(),
        };
        return Ok(Some((username.clone(), password)));
    }
    Ok(None)
}

fn tls_config(config: &MqttConfig) -> Result<TlsConfiguration, MqttError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let tls = config.tls.clone().unwrap_or_default();
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| MqttError::Tls {
                    key: "mqtt.tls.ca_file",
                    message: format!("cannot read {}: {e}", path.display()),
                })?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| MqttError::Tls {
                    key: "mqtt.tls.ca_file",
                    message: format!("{}: not PEM certificates: {e}", path.display()),
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(MqttError::Tls {
                    key: "mqtt.tls.ca_file",
                    message: format!("{}: no usable CA certificate in it", path.display()),
                });
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttError::Tls {
            key: "mqtt.tls",
            message: e.to_string(),
        })?
        .with_root_certificates(roots);
    let client = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| MqttError::Tls {
                    key: "mqtt.tls.cert_file",
                    message: format!("{}: {e}", cert.display()),
                })?;
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| MqttError::Tls {
                key: "mqtt.tls.key_file",
                message: format!("{}: {e}", key.display()),
            })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| MqttError::Tls {
                    key: "mqtt.tls.cert_file",
                    message: e.to_string(),
                })?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(TlsConfiguration::Rustls(Arc::new(client)))
}

/// What the subscriber task is asked to do.
#[derive(Debug)]
enum SubscriberEvent {
    /// The broker accepted the connection; subscribe everything on a new session.
    Connected {
        /// The broker still had our session (and its subscriptions).
        session_present: bool,
    },
    /// A reload added these filters (or raised their QoS).
    Subscribe(Vec<(String, u8)>),
    /// No rule uses these filters any more.
    Unsubscribe(Vec<String>),
}

/// Subscribe and unsubscribe on the running connection (a reload's changes); cheap to clone.
#[derive(Debug, Clone)]
pub struct Subscriptions(mpsc::UnboundedSender<SubscriberEvent>);

/// The other end of [`Subscriptions`], handed to [`run`].
#[derive(Debug)]
pub struct SubscriptionRequests {
    tx: mpsc::UnboundedSender<SubscriberEvent>,
    rx: mpsc::UnboundedReceiver<SubscriberEvent>,
}

/// A handle for reloads and the requests it sends, for [`run`].
pub fn subscriptions() -> (Subscriptions, SubscriptionRequests) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Subscriptions(tx.clone()), SubscriptionRequests { tx, rx })
}

impl Subscriptions {
    /// Subscribes `filters` (filter, QoS) on the live connection. Sent when connected, or
    /// right after the next connection.
    pub fn subscribe(&self, filters: Vec<(String, u8)>) {
        if !filters.is_empty() {
            let _ = self.0.send(SubscriberEvent::Subscribe(filters));
        }
    }

    /// Unsubscribes `filters` on the live connection.
    pub fn unsubscribe(&self, filters: Vec<String>) {
        if !filters.is_empty() {
            let _ = self.0.send(SubscriberEvent::Unsubscribe(filters));
        }
    }
}

/// A SUBSCRIBE or UNSUBSCRIBE as sent, to name its filters (and the rules that use them)
/// when the broker answers.
#[derive(Debug, Clone)]
enum Request {
    /// Each filter and the names of the rules that use it.
    Subscribe(Vec<(String, Vec<String>)>),
    Unsubscribe(String),
}

/// Requests in the order the subscriber sent them, then by packet id once they went out.
#[derive(Debug, Default)]
struct Requested {
    /// Handed to the event loop, not yet seen going out (the event loop keeps their order).
    queued: VecDeque<Request>,
    /// Gone out, waiting for the broker's answer.
    sent: HashMap<u16, Request>,
}

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

/// Connects, subscribes and ingests until `stop_ingest`; then sends the last acks, says so on
/// `ingest_stopped`, and keeps the connection (for replies still being published) until
/// `close`, when it disconnects.
pub async fn run<S: Sink>(
    link: Link,
    routes: S,
    health: Arc<Health>,
    shutdown: Shutdown,
    close: Shutdown,
    ingest_stopped: oneshot::Sender<()>,
) {
    let Link {
        client,
        eventloop,
        broker,
        replier,
        requests,
    } = link;
    let (tx, mut rx) = mpsc::unbounded_channel::<Inbound>();
    let hold = Arc::new(Hold::default());
    let line = eventloop
        .writes_acks()
        .then(|| Arc::new(Mutex::new(AckLine::default())));
    let exchanges = Arc::new(Exchanges::default());
    let requested = Arc::new(Mutex::new(Requested::default()));
    let SubscriptionRequests {
        tx: subscriber_tx,
        rx: subscriber_rx,
    } = requests;
    let subscriber_task = tokio::spawn(subscriber(
        client.clone(),
        routes.clone(),
        subscriber_rx,
        requested.clone(),
    ));
    let mut poll_task = tokio::spawn(poll(
        eventloop,
        Channels {
            subscriber: subscriber_tx,
            requested,
            tx,
            hold: hold.clone(),
            replier,
            line: line.clone(),
            exchanges: exchanges.clone(),
        },
        health.clone(),
        broker,
    ));

    let beat = health.watch_loop("the MQTT ingest loop");
    let mut publishes = Vec::with_capacity(INGEST_BATCH);
    let mut acks = AckQueue::new(hold.clone(), line, exchanges.clone());
    loop {
        beat.turn();
        tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            n = rx.recv_many(&mut publishes, INGEST_BATCH), if acks.len() < ACK_BACKLOG_MAX => {
                if n == 0 {
                    break;
                }
                hold.release(&publishes);
                if !beat.alive_while(routes.store(&publishes, &shutdown)).await {
                    break;
                }
                acks.extend(&publishes);
                // The payloads are stored: let them go now, not when the next group comes.
                publishes.clear();
                if acks.flush(&client, &poll_task).is_err() {
                    break;
                }
            }
            _ = tokio::time::sleep(ACK_RETRY), if !acks.is_empty() => {
                if acks.flush(&client, &poll_task).is_err() {
                    break;
                }
                if acks.is_empty() {
                    tracing::debug!("every acknowledgement handed to the event loop");
                }
            }
            _ = beat.due() => {}
        }
    }
    // Stopping is a normal end; any other (the event loop gone) leaves the loop watched, so the
    // systemd watchdog sees it stalled.
    if shutdown.is_triggered() {
        beat.retire();
    } else {
        drop(beat);
    }
    // Publishes still buffered were not appended: they stay unacknowledged and the broker
    // delivers them again next time. Acks still waiting get a last chance below.
    drop(rx);
    let deadline = tokio::time::Instant::now() + DISCONNECT_GRACE;
    while !acks.is_empty() && tokio::time::Instant::now() < deadline {
        if acks.flush(&client, &poll_task).is_err() {
            break;
        }
        tokio::time::sleep(ACK_RETRY).await;
    }
    tracing::info!("MQTT ingest stopped");
    let _ = ingest_stopped.send(());
    // Replies of deliveries still finishing need the connection: keep it (reconnecting if it
    // breaks) until told to close.
    let finished = tokio::select! {
        _ = close.wait() => false,
        _ = &mut poll_task => true,
    };
    subscriber_task.abort();
    if !finished {
        if health.mqtt_connected() {
            if !exchanges.settled(RELEASE_WAIT).await {
                tracing::warn!(
                    "the broker had not released every QoS 2 message after {} ms; disconnecting anyway (it may send them again after the next start)",
                    RELEASE_WAIT.as_millis()
                );
            }
            client.try_disconnect();
            if tokio::time::timeout(DISCONNECT_GRACE, &mut poll_task)
                .await
                .is_err()
            {
                poll_task.abort();
            }
        } else {
            // Not connected: there is no one to say DISCONNECT to.
            poll_task.abort();
        }
    }
    tracing::info!("MQTT connection closed");
}

/// What the poll task holds for the ingest loop, so it can stop polling past a bound.
///
/// Deadlock-free by construction: the poll task pauses only while no acknowledgement is
/// waiting for it (acks drain only while it polls), and the ingest loop stops taking publishes
/// only while acknowledgements are waiting (so the poll task is running and drains them).
#[derive(Default)]
struct Hold {
    publishes: AtomicUsize,
    bytes: AtomicUsize,
    /// Acknowledgements the ingest loop could not hand to the event loop yet.
    acks_waiting: AtomicUsize,
    /// Wakes the poll task when ingest took publishes or acks are waiting.
    taken: Notify,
}

impl Hold {
    fn add(&self, publish: &Inbound) {
        self.publishes.fetch_add(1, Ordering::Relaxed);
        self.bytes
            .fetch_add(publish.payload.len(), Ordering::Relaxed);
    }

    fn release(&self, publishes: &[Inbound]) {
        let bytes = publishes.iter().map(|p| p.payload.len()).sum();
        self.publishes.fetch_sub(publishes.len(), Ordering::Relaxed);
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.taken.notify_one();
    }

    fn set_acks_waiting(&self, n: usize) {
        if self.acks_waiting.swap(n, Ordering::Relaxed) == 0 && n > 0 {
            self.taken.notify_one();
        }
    }

    /// Whether the poll task should pause.
    fn full(&self) -> bool {
        (self.publishes.load(Ordering::Relaxed) >= INGEST_HOLD_MAX
            || self.bytes.load(Ordering::Relaxed) >= INGEST_HOLD_MAX_BYTES)
            && self.acks_waiting.load(Ordering::Relaxed) == 0
    }

    /// Waits while the bound is reached (the last resort: polling stops meanwhile).
    async fn wait_for_room(&self) {
        while self.full() {
            let taken = self.taken.notified();
            if !self.full() {
                break;
            }
            taken.await;
        }
    }
}

/// Sends every SUBSCRIBE and UNSUBSCRIBE, in order, noting each in `requested` first. Awaits
/// room in rumqttc's request channel, which the poll task drains while it polls; ingest never
/// waits on this task.
async fn subscriber<S: Sink>(
    client: Client,
    routes: S,
    mut events: mpsc::UnboundedReceiver<SubscriberEvent>,
    requested: Arc<Mutex<Requested>>,
) {
    let mut subscribed_once = false;
    let note = |request: Request| {
        if let Ok(mut requested) = requested.lock() {
            requested.queued.push_back(request);
        }
    };
    while let Some(event) = events.recv().await {
        let filters = match event {
            // Subscribe on a new session, and once per process so rules added to the config
            // since the session began are subscribed too.
            SubscriberEvent::Connected { session_present } => {
                if session_present && subscribed_once {
                    continue;
                }
                subscribed_once = true;
                routes.subscriptions()
            }
            SubscriberEvent::Subscribe(filters) => filters,
            SubscriberEvent::Unsubscribe(filters) => {
                for filter in filters {
                    note(Request::Unsubscribe(filter.clone()));
                    if let Err(err) = client.unsubscribe(filter).await {
                        tracing::error!(error = %err, "cannot queue the unsubscribe request");
                    }
                }
                continue;
            }
        };
        if filters.is_empty() {
            continue;
        }
        let named = filters
            .iter()
            .map(|(path, _)| (path.clone(), routes.rules_of(path)))
            .collect();
        note(Request::Subscribe(named));
        if let Err(err) = client.subscribe_many(filters).await {
            tracing::error!(error = %err, "cannot queue the subscription request");
        }
    }
}

fn reconnect_backoff() -> backon::ExponentialBackoff {
    crate::core::retry::retry_delays(RECONNECT_MIN_DELAY, RECONNECT_MAX_DELAY)
}

/// Where the poll task sends what it hears.
struct Channels {
    subscriber: mpsc::UnboundedSender<SubscriberEvent>,
    requested: Arc<Mutex<Requested>>,
    tx: mpsc::UnboundedSender<Inbound>,
    hold: Arc<Hold>,
    replier: Replier,
    /// Under MQTT 3.1.1: acknowledgements to write behind the first of their group.
    line: Option<Arc<Mutex<AckLine>>>,
    /// QoS 2 messages acknowledged and not yet released.
    exchanges: Arc<Exchanges>,
}

/// Fails every reply still waiting when the poll task ends, however it ends.
struct StopReplies(Replier);

impl Drop for StopReplies {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Drives the event loop until DISCONNECT went out (or the task is aborted).
async fn poll(mut eventloop: EventLoop, channels: Channels, health: Arc<Health>, broker: String) {
    let Channels {
        subscriber,
        requested,
        tx,
        hold,
        replier,
        line,
        exchanges,
    } = channels;
    let _stop_replies = StopReplies(replier.clone());
    // What rumqttc held when the connection broke, to hand back if the session is new.
    let mut held: Option<PendingPublishes> = None;
    let mut backoff = reconnect_backoff();
    let mut outage: Option<Outage> = None;
    let mut received: u64 = 0;
    let mut pauses: u64 = 0;
    loop {
        match eventloop.poll().await {
            Ok(Event::Connected {
                session_present,
                max_packet_size,
            }) => {
                health.set_mqtt_connected(true);
                replier.set_max_packet(max_packet_size);
                if session_present {
                    eventloop.expect_repeated_releases();
                }
                let again = held.take();
                if replier.with_book(|book| book.on_connected(session_present)) == Some(true)
                    && let Some(again) = again
                {
                    tracing::info!(
                        replies = again.pkids().len(),
                        "the broker started a new session: publishing the replies it had not acknowledged again"
                    );
                    eventloop.requeue(again);
                }
                backoff = reconnect_backoff();
                match outage.take() {
                    Some(outage) => tracing::info!(
                        broker = %broker,
                        session_present,
                        "connected to the MQTT broker again after an outage of {}",
                        human(outage.since.elapsed())
                    ),
                    None => tracing::info!(
                        broker = %broker,
                        session_present,
                        "connected to the MQTT broker"
                    ),
                }
                let _ = subscriber.send(SubscriberEvent::Connected { session_present });
            }
            Ok(Event::SubscribeSent(pkid) | Event::UnsubscribeSent(pkid)) => {
                if let Ok(mut requested) = requested.lock()
                    && let Some(request) = requested.queued.pop_front()
                {
                    requested.sent.insert(pkid, request);
                }
            }
            Ok(Event::UnsubAck { pkid, refused }) => {
                let request = requested.lock().ok().and_then(|mut r| r.sent.remove(&pkid));
                if let Some(Request::Unsubscribe(filter)) = request {
                    match refused {
                        None => {
                            tracing::info!(filter = %filter, "unsubscribed: no rule uses this filter any more")
                        }
                        Some(reason) => tracing::warn!(
                            filter = %filter, reason = %reason,
                            "the broker refused to unsubscribe; messages on this filter that match no rule are acknowledged and dropped"
                        ),
                    }
                }
            }
            Ok(Event::SubAck { pkid, granted }) => {
                let request = requested.lock().ok().and_then(|mut r| r.sent.remove(&pkid));
                let filters = match request {
                    Some(Request::Subscribe(filters)) => filters,
                    _ => Vec::new(),
                };
                for ((filter, rules), granted) in filters.iter().zip(&granted) {
                    // One line per rule, so each rule's subscription can be found by its name.
                    for rule in rules {
                        match granted {
                            Granted::Qos(qos) => tracing::info!(
                                rule = %rule, filter = %filter, granted = qos, "subscribed"
                            ),
                            Granted::Refused(reason) => tracing::error!(
                                rule = %rule, filter = %filter, reason = %reason,
                                "the broker refused the subscription ({reason}); check its ACL for this client"
                            ),
                        }
                    }
                }
            }
            Ok(Event::Publish(publish)) => {
                received += 1;
                if received.is_multiple_of(10_000) {
                    tracing::debug!(received, "publishes received from the broker");
                }
                if tx.is_closed() {
                    // Ingest has stopped; the broker keeps this one for next time.
                    continue;
                }
                hold.add(&publish);
                let _ = tx.send(publish);
                // A reply waiting for its PUBACK needs the socket read: pausing then could
                // hold up a delivery that ingest (a full buffer) waits for.
                if hold.full() && !replier.waiting() {
                    pauses += 1;
                    if pauses == 1 {
                        tracing::warn!(
                            held = INGEST_HOLD_MAX,
                            "ingest is far behind the broker: pausing reads from it while the buffer catches up"
                        );
                    } else {
                        tracing::debug!(pauses, "pausing reads from the broker again");
                    }
                    tokio::select! {
                        _ = hold.wait_for_room() => {}
                        _ = tx.closed() => {}
                        _ = replier.handed() => {}
                    }
                }
            }
            Ok(Event::PublishSent(pkid)) => {
                replier.with_book(|book| book.on_sent(pkid));
                tracing::debug!(pkid, "reply sent; waiting for the broker's acknowledgement");
            }
            Ok(Event::PubAck { pkid, refused }) => {
                if let Some(Some(waiter)) = replier.with_book(|book| book.on_puback(pkid)) {
                    let _ = waiter.send(refused.map_or(Ok(()), Err));
                }
            }
            Ok(Event::DisconnectSent) => {
                health.set_mqtt_connected(false);
                return;
            }
            Ok(Event::AckSent(pkid)) => {
                let rest = line
                    .as_deref()
                    .and_then(|line| acks::lock(line).on_sent(pkid));
                if let Some(rest) = rest.filter(|rest| !rest.is_empty())
                    && let Err(text) = eventloop.write_acks(&rest).await
                {
                    tracing::debug!(error = %text, acks = rest.len(), "writing acknowledgements failed; the broker sends those messages again");
                }
            }
            Ok(Event::Released(pkid)) => exchanges.completed(pkid),
            Ok(Event::Other) => {}
            Err(text) => {
                health.set_mqtt_connected(false);
                if let Some(line) = &line {
                    acks::lock(line).on_connection_lost();
                }
                exchanges.forget();
                let pending = eventloop.pending_publishes();
                let unreported = eventloop.unreported_publishes_sent();
                if replier.with_book(|book| book.on_connection_lost(pending.pkids(), unreported))
                    == Some(true)
                {
                    held = Some(pending);
                }
                let delay = backoff.next().unwrap_or(RECONNECT_MAX_DELAY);
                log_failure(&mut outage, &broker, text, delay);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// A broker outage as the log tells it.
struct Outage {
    /// The first failed attempt.
    since: tokio::time::Instant,
    /// Reminders logged so far.
    reminders: u32,
    /// The last failure's words, to tell when the reason changes.
    error: String,
}

/// When the `n`-th reminder (from 0) that the broker is still down is due, counted from the
/// outage's first failure: 1 min, 5 min, then every 15 min (20 min, 35 min, ...).
pub fn reminder_after(n: u32) -> Duration {
    match OUTAGE_FIRST_REMINDERS.get(n as usize) {
        Some(at) => *at,
        None => {
            let last = OUTAGE_FIRST_REMINDERS[OUTAGE_FIRST_REMINDERS.len() - 1];
            let beyond = n - (OUTAGE_FIRST_REMINDERS.len() as u32 - 1);
            last + OUTAGE_REMINDER_EVERY * beyond
        }
    }
}

/// Logs one failed connection attempt: warn at the first of an outage and at each reminder,
/// info when the reason changes, debug otherwise (a broker down for a day must not fill the
/// journal, nor fall silent).
fn log_failure(outage: &mut Option<Outage>, broker: &str, error: String, retry_in: Duration) {
    let Some(current) = outage else {
        tracing::warn!(
            broker = %broker,
            retry_in = %human(retry_in),
            "cannot connect to the MQTT broker: {error}; retrying with backoff, no messages arrive meanwhile"
        );
        *outage = Some(Outage {
            since: tokio::time::Instant::now(),
            reminders: 0,
            error,
        });
        return;
    };
    let down_for = current.since.elapsed();
    if down_for >= reminder_after(current.reminders) {
        current.reminders += 1;
        tracing::warn!(
            broker = %broker,
            retry_in = %human(retry_in),
            "the MQTT broker is still unreachable after {}: {error}; no messages arrive meanwhile",
            human(down_for)
        );
    } else if current.error != error {
        tracing::info!(broker = %broker, retry_in = %human(retry_in), "the MQTT broker still cannot be reached, now: {error}");
    } else {
        tracing::debug!(broker = %broker, retry_in = %human(retry_in), "still cannot reach the MQTT broker: {error}");
    }
    current.error = error;
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60;

    #[test]
    fn reminders_come_after_one_and_five_minutes_then_every_fifteen() {
        let at: Vec<u64> = (0..6).map(|n| reminder_after(n).as_secs()).collect();
        assert_eq!(
            at,
            vec![MIN, 5 * MIN, 20 * MIN, 35 * MIN, 50 * MIN, 65 * MIN]
        );
    }

    #[test]
    fn a_day_down_gives_about_a_hundred_reminders_not_one_per_retry() {
        let day = Duration::from_secs(24 * 3600);
        let reminders = (0..).take_while(|n| reminder_after(*n) <= day).count();
        // 1 min, 5 min, then 95 of every 15 min up to 24 h.
        assert_eq!(reminders, 2 + (24 * 60 - 5) / 15);
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_is_reminded_on_schedule_and_its_length_told() {
        let mut outage = None;
        let broker = "mqtt://127.0.0.1:1883";
        let mut reminders_seen = Vec::new();
        log_failure(&mut outage, broker, "refused".into(), RECONNECT_MIN_DELAY);
        let start = tokio::time::Instant::now();
        // A retry every 30 s for 40 minutes.
        for _ in 0..80 {
            tokio::time::advance(RECONNECT_MAX_DELAY).await;
            let before = outage.as_ref().map_or(0, |o: &Outage| o.reminders);
            log_failure(&mut outage, broker, "refused".into(), RECONNECT_MAX_DELAY);
            if outage.as_ref().is_some_and(|o| o.reminders > before) {
                reminders_seen.push(start.elapsed().as_secs());
            }
        }
        assert_eq!(reminders_seen, vec![60, 300, 1200, 2100]);
    }
}
