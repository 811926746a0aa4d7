//! The MQTT side's life: starts the poll and subscriber tasks, runs the ingest loop (hand each
//! group of publishes to the [`Sink`], then acknowledge it), and at shutdown sends the last
//! acknowledgements, keeps the connection for replies still being published, and disconnects
//! once the broker released the QoS 2 messages acknowledged (or after a bounded wait).
//!
//! Invariants: a publish is acknowledged only after the sink stored it, in the order received;
//! the ingest loop never awaits room in rumqttc's request channel (acknowledgements that do not
//! fit wait in the [`AckQueue`]), so it cannot deadlock with the poll task. The ingest loop is
//! watched (health.rs `Beat`): while it waits for the buffer to store a group it counts as
//! alive, because with `when_full = "block"` that wait lasts as long as Lambda is down.

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::core::health::Health;
use crate::core::shutdown::Shutdown;

use super::acks::{AckLine, AckQueue, Exchanges};
use super::hold::Hold;
use super::poll::{Channels, poll};
use super::protocol::{Client, Inbound};
use super::subscriber::{SubscriptionRequests, subscriber};
use super::{ACK_BACKLOG_MAX, ACK_RETRY, DISCONNECT_GRACE, INGEST_BATCH, Link, RELEASE_WAIT, Sink};

/// Connects, subscribes and ingests until `shutdown`; then sends the last acks, says so on
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
    let (tx, rx) = mpsc::unbounded_channel::<Inbound>();
    let hold = Arc::new(Hold::default());
    let line = eventloop
        .writes_acks()
        .then(|| Arc::new(Mutex::new(AckLine::default())));
    let exchanges = Arc::new(Exchanges::default());
    let (notes_tx, notes) = mpsc::unbounded_channel();
    let SubscriptionRequests {
        tx: subscriber_tx,
        rx: subscriber_rx,
    } = requests;
    let subscriber_task = tokio::spawn(subscriber(
        client.clone(),
        routes.clone(),
        subscriber_rx,
        notes_tx,
    ));
    let channels = Channels {
        subscriber: subscriber_tx,
        notes,
        tx,
        hold: hold.clone(),
        replier,
        line: line.clone(),
        exchanges: exchanges.clone(),
    };
    let mut poll_task = tokio::spawn(poll(eventloop, channels, health.clone(), broker));
    let acks = AckQueue::new(hold.clone(), line, exchanges.clone());
    let ingest = Ingest {
        client: &client,
        poll_task: &poll_task,
        hold: &hold,
        acks,
    };
    ingest.run(rx, &routes, &health, &shutdown).await;
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
        disconnect(&client, poll_task, &health, &exchanges).await;
    }
    tracing::info!("MQTT connection closed");
}

/// The ingest loop's view of the connection.
struct Ingest<'a> {
    client: &'a Client,
    poll_task: &'a JoinHandle<()>,
    hold: &'a Hold,
    acks: AckQueue,
}

impl Ingest<'_> {
    /// Stores and acknowledges groups of publishes until `shutdown` or the event loop's end;
    /// then gives the acknowledgements still waiting a last chance.
    async fn run<S: Sink>(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Inbound>,
        routes: &S,
        health: &Arc<Health>,
        shutdown: &Shutdown,
    ) {
        let beat = health.watch_loop("the MQTT ingest loop");
        let mut publishes = Vec::with_capacity(INGEST_BATCH);
        loop {
            beat.turn();
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                n = rx.recv_many(&mut publishes, INGEST_BATCH), if self.acks.len() < ACK_BACKLOG_MAX => {
                    if n == 0 {
                        break;
                    }
                    gather(&mut rx, &mut publishes, routes.gather_for(), shutdown).await;
                    self.hold.release(&publishes);
                    if !beat.alive_while(routes.store(&publishes, shutdown)).await {
                        break;
                    }
                    self.acks.extend(&publishes);
                    // The payloads are stored: let them go now, not when the next group comes.
                    publishes.clear();
                    if self.flush().is_err() {
                        break;
                    }
                }
                _ = tokio::time::sleep(ACK_RETRY), if !self.acks.is_empty() => {
                    if self.flush().is_err() {
                        break;
                    }
                    if self.acks.is_empty() {
                        tracing::debug!("every acknowledgement handed to the event loop");
                    }
                }
                _ = beat.due() => {}
            }
        }
        // Stopping is a normal end; any other (the event loop gone) leaves the loop watched,
        // so the systemd watchdog sees it stalled.
        if shutdown.is_triggered() {
            beat.retire();
        } else {
            drop(beat);
        }
        // Publishes still buffered were not appended: they stay unacknowledged and the broker
        // delivers them again next time.
        drop(rx);
        self.last_acks().await;
    }

    fn flush(&mut self) -> Result<(), ()> {
        self.acks.flush(self.client, self.poll_task)
    }

    /// Acknowledgements still waiting get [`DISCONNECT_GRACE`] to be handed over.
    async fn last_acks(&mut self) {
        let deadline = tokio::time::Instant::now() + DISCONNECT_GRACE;
        while !self.acks.is_empty() && tokio::time::Instant::now() < deadline {
            if self.flush().is_err() {
                break;
            }
            tokio::time::sleep(ACK_RETRY).await;
        }
    }
}

/// `buffer.max_ack_delay`: takes the publishes arriving within `delay` of the group's first
/// into the same group, so that each rule stores them with one fsync, and the wait is paid
/// once (the buffers do not wait again for a gathered group). Ingest takes one group at a time,
/// so a wait anywhere behind it would hold the next group back as long again, and the broker's
/// in-flight window would hold both. A full group (`FULL_GROUP_MESSAGES` publishes or
/// `FULL_GROUP_BYTES` of payloads), shutdown or the channel's end stop the wait.
async fn gather(
    rx: &mut mpsc::UnboundedReceiver<Inbound>,
    publishes: &mut Vec<Inbound>,
    delay: std::time::Duration,
    shutdown: &Shutdown,
) {
    use crate::core::config::{FULL_GROUP_BYTES, FULL_GROUP_MESSAGES};
    if delay.is_zero() {
        return;
    }
    let deadline = tokio::time::Instant::now() + delay;
    let mut bytes: usize = publishes.iter().map(|p| p.payload.len()).sum();
    loop {
        let full = publishes.len() as u64 >= FULL_GROUP_MESSAGES
            || bytes as u64 >= FULL_GROUP_BYTES
            || publishes.len() >= INGEST_BATCH;
        if full {
            return;
        }
        let before = publishes.len();
        tokio::select! {
            biased;
            _ = shutdown.wait() => return,
            _ = tokio::time::sleep_until(deadline) => return,
            n = rx.recv_many(publishes, INGEST_BATCH - before) => {
                if n == 0 {
                    return;
                }
                bytes += publishes[before..].iter().map(|p| p.payload.len()).sum::<usize>();
            }
        }
    }
}

/// Says DISCONNECT once the QoS 2 messages acknowledged are released (or after
/// [`RELEASE_WAIT`]), and waits for it to go out.
async fn disconnect(
    client: &Client,
    mut poll_task: JoinHandle<()>,
    health: &Health,
    exchanges: &Exchanges,
) {
    if !health.mqtt_connected() {
        // Not connected: there is no one to say DISCONNECT to.
        poll_task.abort();
        return;
    }
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
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::core::config::FULL_GROUP_MESSAGES;
    use crate::core::shutdown;
    use crate::mqtt::hold::tests::publish;

    const MS: Duration = Duration::from_millis(1);

    /// A channel with a publish arriving at each of `at` (ms after now, virtual time).
    fn arrivals(at: &[u64]) -> mpsc::UnboundedReceiver<Inbound> {
        let (tx, rx) = mpsc::unbounded_channel();
        let at = at.to_vec();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            for ms in at {
                tokio::time::sleep_until(start + Duration::from_millis(ms)).await;
                let _ = tx.send(publish(1, 200));
            }
            // Keep the channel open: the wait must end by its own rule.
            std::future::pending::<()>().await;
        });
        rx
    }

    /// Takes a first group as the ingest loop does, then gathers for `delay`; the group's size
    /// and how long it took.
    async fn group(at: &[u64], delay: Duration, stop: Option<u64>) -> (usize, Duration) {
        let (trigger, shutdown) = shutdown::channel();
        if let Some(ms) = stop {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                trigger.trigger();
            });
        } else {
            std::mem::forget(trigger);
        }
        let mut rx = arrivals(at);
        let mut publishes = Vec::new();
        rx.recv_many(&mut publishes, INGEST_BATCH).await;
        let start = tokio::time::Instant::now();
        gather(&mut rx, &mut publishes, delay, &shutdown).await;
        (publishes.len(), start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn publishes_within_the_delay_join_the_group_and_the_wait_ends_at_the_delay() {
        // Ten sensors, 10 ms apart; the group starts with the first.
        let at: Vec<u64> = (0..10).map(|i| i * 10).collect();
        assert_eq!(group(&at, 100 * MS, None).await, (10, 100 * MS));
        // A publish after the delay belongs to the next group.
        assert_eq!(group(&[0, 50, 150], 100 * MS, None).await, (2, 100 * MS));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_delay_the_group_is_what_arrived_together() {
        assert_eq!(
            group(&[0, 0, 10], Duration::ZERO, None).await,
            (2, Duration::ZERO)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_group_or_shutdown_ends_the_wait() {
        let full = vec![0; FULL_GROUP_MESSAGES as usize + 5];
        let (n, took) = group(&full, Duration::from_secs(1), None).await;
        assert!(n >= FULL_GROUP_MESSAGES as usize, "{n}");
        assert_eq!(took, Duration::ZERO);
        assert_eq!(
            group(&[0, 10], Duration::from_secs(1), Some(30)).await,
            (2, 30 * MS)
        );
    }
}
