//! The MQTT side: connection options, the event loop, and ingest into the rule queues.
//!
//! Two tasks share the work. The *poll task* drives rumqttc's event loop (it must be polled for
//! anything to happen, acks included), subscribes when the broker says the session is new,
//! reconnects with capped exponential backoff, and forwards each publish to the *ingest loop*.
//! The ingest loop matches topics to rules, appends each rule's copy to its queue, and only when
//! every `append` has returned (durable) acknowledges the publishes, in the order received.
//!
//! Manual acks are on: a publish that was not appended is never acknowledged, so after a crash
//! the broker (persistent session, `clean_start = false`) delivers it again.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, Outgoing, Publish, QoS,
    SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::{MqttConfig, parse_mqtt_url};
use crate::envelope::Message;
use crate::pipeline::{RulePlan, RuleStats};
use crate::queue::Queue;
use crate::queue::deadletter::{DeadLetter, DeadLetters, timestamp};
use crate::rules::RuleSet;
use crate::shutdown::Shutdown;

/// The MQTT protocol's largest packet. Set as our incoming limit so no message can make
/// rumqttc drop the connection (the broker would redeliver it and we would loop); messages too
/// large for Lambda are set aside after they arrive. Bound memory with the broker's own
/// `message_size_limit`.
pub const MAX_INCOMING_PACKET: usize = 268_435_455 + 5;
/// Requests (acks, subscribes) buffered towards the event loop.
const REQUEST_CAPACITY: usize = 10_000;
/// Publishes buffered between the poll task and the ingest loop; past it the poll task stops
/// reading the socket and TCP pushes back on the broker.
const INGEST_CAPACITY: usize = 1024;
/// Most publishes appended and acknowledged together: one durable append per rule per group.
const INGEST_BATCH: usize = 256;
/// First reconnect delay.
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(250);
/// Longest reconnect delay.
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(30);
/// Time given to the final acks and DISCONNECT at shutdown.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);
/// How soon acks that found rumqttc's request channel full are offered again.
const ACK_RETRY: Duration = Duration::from_millis(1);

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

/// Builds rumqttc's options from `[mqtt]`: persistent session, manual acks, TLS with ring.
pub fn options(config: &MqttConfig) -> Result<MqttOptions, MqttError> {
    let address = parse_mqtt_url(&config.url).map_err(MqttError::Url)?;
    let mut options = MqttOptions::new(config.client_id.clone(), address.host, address.port);
    options
        .set_clean_session(config.clean_start)
        .set_keep_alive(config.keep_alive.0.max(Duration::from_secs(1)))
        .set_manual_acks(true)
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_INCOMING_PACKET)
        .set_request_channel_capacity(REQUEST_CAPACITY);
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
        options.set_credentials(username.clone(), password);
    }
    if address.tls {
        options.set_transport(Transport::tls_with_config(tls_config(config)?));
    }
    Ok(options)
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

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Where ingested messages go: the rules, their queues and counters, in rule order.
pub struct Sink<Q> {
    /// Topic filters, in rule order.
    pub rules: RuleSet,
    /// `plans[i]` is rule `i`.
    pub plans: Vec<RulePlan>,
    /// `queues[i]` is rule `i`'s queue.
    pub queues: Vec<Arc<Q>>,
    /// `stats[i]` counts rule `i`.
    pub stats: Vec<Arc<RuleStats>>,
    /// `dead_letters[i]` keeps rule `i`'s messages that can never be invoked.
    pub dead_letters: Vec<DeadLetters>,
}

/// Connects, subscribes and ingests until `shutdown`; then sends the last acks and disconnects.
pub async fn run<Q: Queue>(
    options: MqttOptions,
    filters: Vec<(String, u8)>,
    sink: Sink<Q>,
    shutdown: Shutdown,
) {
    let (client, eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
    let (tx, mut rx) = mpsc::channel::<Publish>(INGEST_CAPACITY);
    let filters: Vec<SubscribeFilter> = filters
        .into_iter()
        .map(|(path, level)| SubscribeFilter::new(path, qos(level)))
        .collect();
    let mut poll_task = tokio::spawn(poll(eventloop, client.clone(), filters, tx));

    let mut publishes = Vec::with_capacity(INGEST_BATCH);
    let mut acks = AckQueue::default();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            n = rx.recv_many(&mut publishes, INGEST_BATCH) => {
                if n == 0 {
                    break;
                }
                if !ingest(&sink, &publishes, &shutdown).await {
                    break;
                }
                acks.extend(&publishes);
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
        }
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
    let _ = client.try_disconnect();
    if tokio::time::timeout(DISCONNECT_GRACE, &mut poll_task)
        .await
        .is_err()
    {
        poll_task.abort();
    }
    tracing::info!("MQTT ingest stopped");
}

/// Acknowledgements waiting for room in rumqttc's request channel, in the order received.
///
/// rumqttc's event loop takes one request per turn but reads up to ten packets per turn, so a
/// broker that floods us (mosquitto restoring a large persisted backlog ignores its in-flight
/// limit) can fill the request channel with acks. If ingest then *awaited* room there, it would
/// stop draining the publish channel, the poll task would stop polling, and nothing would ever
/// drain the acks: a deadlock. So acks are handed over without waiting, and the rest wait here
/// (a packet id and a QoS each) while ingest goes on.
#[derive(Default)]
struct AckQueue {
    waiting: VecDeque<Publish>,
}

impl AckQueue {
    fn extend(&mut self, publishes: &[Publish]) {
        self.waiting.extend(
            publishes
                .iter()
                .filter(|p| p.qos != QoS::AtMostOnce)
                .map(|p| {
                    let mut ack = Publish::new("", p.qos, Vec::new());
                    ack.pkid = p.pkid;
                    ack
                }),
        );
    }

    fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Hands over as many acks as fit; `Err` when the event loop (the poll task) is gone.
    fn flush(&mut self, client: &AsyncClient, poll_task: &JoinHandle<()>) -> Result<(), ()> {
        while let Some(ack) = self.waiting.front() {
            if client.try_ack(ack).is_err() {
                // Full, or closed because the poll task ended.
                return if poll_task.is_finished() {
                    Err(())
                } else {
                    Ok(())
                };
            }
            self.waiting.pop_front();
        }
        Ok(())
    }
}

/// Appends one group of publishes to their rules' queues; the caller acknowledges them after.
/// Returns `false` when shutdown interrupted it (nothing unappended is acknowledged).
async fn ingest<Q: Queue>(sink: &Sink<Q>, publishes: &[Publish], shutdown: &Shutdown) -> bool {
    let now = SystemTime::now();
    let mut per_rule: Vec<Vec<Message>> = vec![Vec::new(); sink.queues.len()];
    for publish in publishes {
        let mut matched = sink.rules.matching(&publish.topic).peekable();
        if matched.peek().is_none() {
            tracing::debug!(topic = %publish.topic, "no rule matches; acknowledged and dropped");
            continue;
        }
        let message = Message::received(
            publish.topic.clone(),
            publish.payload.to_vec(),
            publish.qos as u8,
            publish.retain,
            now,
        );
        for i in matched {
            let plan = &sink.plans[i];
            if let Some(size) = plan.oversize(&message) {
                tracing::error!(
                    rule = %plan.name, topic = %message.topic, id = %message.id,
                    payload_bytes = message.payload.len(), event_bytes = size,
                    limit = plan.invocation.payload_limit(),
                    "message too large for one Lambda invocation: set aside in the dead-letter store, not invoked"
                );
                // Like the queue: until it is written somewhere, nothing is acknowledged.
                let mut backoff = reconnect_backoff();
                let mut failures = 0;
                while let Err(err) = set_aside(&sink.dead_letters[i], plan, &message, size, now) {
                    failures += 1;
                    if failures == 1 {
                        tracing::error!(rule = %plan.name, error = %err, "cannot write the dead-letter store; not acknowledging, retrying");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next().unwrap_or(RECONNECT_MAX_DELAY)) => {}
                        _ = shutdown.wait() => return false,
                    }
                }
                let stats = &sink.stats[i];
                stats
                    .set_aside
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                stats
                    .dead_lettered
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            per_rule[i].push(message.clone());
        }
    }
    for (i, messages) in per_rule.into_iter().enumerate() {
        if messages.is_empty() {
            continue;
        }
        let count = messages.len() as u64;
        if !append_with_retry(&*sink.queues[i], &sink.plans[i].name, messages, shutdown).await {
            return false;
        }
        sink.stats[i]
            .queued
            .fetch_add(count, std::sync::atomic::Ordering::Relaxed);
    }
    tracing::debug!(publishes = publishes.len(), "buffered and acknowledged");
    true
}

/// Writes a message too large for Lambda to the rule's dead-letter store.
fn set_aside(
    letters: &DeadLetters,
    plan: &RulePlan,
    message: &Message,
    size: usize,
    now: SystemTime,
) -> Result<(), crate::queue::deadletter::DeadLetterError> {
    let event = crate::envelope::encode_event(&plan.name, std::slice::from_ref(message));
    letters.append(&DeadLetter {
        rule: plan.name.clone(),
        reason: format!(
            "the event would be {size} bytes; Lambda accepts at most {} for this invocation type",
            plan.invocation.payload_limit()
        ),
        code: "PayloadTooLarge".into(),
        attempts: 0,
        first_attempt_at: timestamp(now),
        last_attempt_at: timestamp(now),
        event: serde_json::from_slice(&event).unwrap_or(serde_json::Value::Null),
    })
}

/// Appends, retrying a failing buffer until it works or shutdown; `false` on shutdown.
async fn append_with_retry<Q: Queue>(
    queue: &Q,
    rule: &str,
    messages: Vec<Message>,
    shutdown: &Shutdown,
) -> bool {
    let mut backoff = reconnect_backoff();
    let mut failures = 0u32;
    loop {
        match queue.append(messages.clone()).await {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(
                        rule,
                        failures,
                        "buffering works again; acknowledging the held messages"
                    );
                }
                return true;
            }
            Err(err) => {
                let delay = backoff.next().unwrap_or(RECONNECT_MAX_DELAY);
                failures += 1;
                if failures == 1 {
                    tracing::error!(rule, error = %err, "cannot buffer messages: not acknowledging them (the broker keeps them); retrying");
                } else {
                    tracing::debug!(rule, error = %err, "still cannot buffer messages");
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.wait() => return false,
                }
            }
        }
    }
}

fn reconnect_backoff() -> backon::ExponentialBackoff {
    crate::ratelimit::retry_delays(RECONNECT_MIN_DELAY, RECONNECT_MAX_DELAY)
}

/// Drives the event loop until DISCONNECT went out (or the task is aborted).
async fn poll(
    mut eventloop: EventLoop,
    client: AsyncClient,
    filters: Vec<SubscribeFilter>,
    tx: mpsc::Sender<Publish>,
) {
    let mut backoff = reconnect_backoff();
    let mut subscribed_once = false;
    let mut last_error: Option<String> = None;
    let mut received: u64 = 0;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                backoff = reconnect_backoff();
                last_error = None;
                tracing::info!(
                    session_present = ack.session_present,
                    "connected to the MQTT broker"
                );
                // Subscribe on a new session, and once per process so rules added to the
                // config since the session began are subscribed too.
                if !ack.session_present || !subscribed_once {
                    if let Err(err) = client.try_subscribe_many(filters.clone()) {
                        tracing::error!(error = %err, "cannot queue the subscription request");
                    }
                    subscribed_once = true;
                }
            }
            Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                for (filter, code) in filters.iter().zip(&ack.return_codes) {
                    match code {
                        SubscribeReasonCode::Success(granted) => {
                            tracing::info!(filter = %filter.path, granted = ?granted, "subscribed")
                        }
                        SubscribeReasonCode::Failure => tracing::error!(
                            filter = %filter.path,
                            "the broker refused the subscription; check its ACL for this client"
                        ),
                    }
                }
            }
            Ok(Event::Incoming(Incoming::Publish(publish))) => {
                received += 1;
                if received.is_multiple_of(10_000) {
                    tracing::debug!(received, "publishes received from the broker");
                }
                if tx.send(publish).await.is_err() {
                    // Ingest has stopped; the broker keeps this one for next time.
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(err) => {
                if tx.is_closed() {
                    return;
                }
                let delay = backoff.next().unwrap_or(RECONNECT_MAX_DELAY);
                let text = describe(&err);
                // Log each distinct failure once at warn, repeats at debug: a broker that is down
                // for an hour must not fill the journal.
                if last_error.as_deref() == Some(text.as_str()) {
                    tracing::debug!(error = %text, "still cannot reach the MQTT broker");
                } else {
                    tracing::warn!(error = %text, retry_in = ?delay, "MQTT connection failed; reconnecting with backoff");
                    last_error = Some(text);
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

fn describe(err: &ConnectionError) -> String {
    match err {
        ConnectionError::ConnectionRefused(code) => format!(
            "the broker refused the connection ({code:?}); check mqtt.username, the password and mqtt.client_id"
        ),
        other => other.to_string(),
    }
}
