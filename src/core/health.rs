//! What the daemon knows about its own state, shared by the parts that report it (metrics,
//! `/readyz`, systemd status lines and watchdog, logs) and written only by the parts that own
//! each fact.
//!
//! Facts are atomics: writers never wait for readers, and a reader sees each fact as of some
//! recent moment, which is all a health report promises.
//!
//! # Liveness of the loops
//!
//! The ingest loop and every rule's delivery loop hold a [`Beat`]. A loop *turns* when it goes
//! round: it calls [`Beat::turn`] each time, and its `select!` also waits on [`Beat::due`], so
//! an idle loop still turns every [`Health::turn_interval`]. A loop is alive while it has turned
//! within the watchdog's bound; one that is stuck in an await outside its `select!`, spins
//! without yielding, panicked or returned with an error stops turning, and the systemd
//! watchdog (`notify.rs`) stops being fed. A loop that ends normally (a drained rule) calls
//! [`Beat::retire`] and is no longer watched.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// How often an idle loop turns by default (a watchdog may ask for less, see
/// [`Health::set_turn_interval`]). One wake-up a second per loop costs nothing measurable.
pub const DEFAULT_TURN_INTERVAL: Duration = Duration::from_secs(1);

/// The daemon's shared health facts.
#[derive(Debug)]
pub struct Health {
    /// True between a CONNACK and the next connection error or disconnect.
    mqtt_connected: AtomicBool,
    /// Set once the first connection attempt ended, either way (systemd's READY waits for it).
    mqtt_attempted: AtomicBool,
    /// Wakes whoever waits for the first attempt.
    attempted: Notify,
    /// How often idle loops turn, in milliseconds.
    turn_interval_ms: AtomicU64,
    /// Where loop turn times count from (tokio's clock, so tests can pause it).
    epoch: Instant,
    /// The loops being watched.
    loops: Mutex<Vec<Arc<LoopSlot>>>,
    /// HTTP ingest's answers, by status.
    pub http_answers: HttpAnswers,
    /// QoS 0 publishes the MQTT connection dropped because ingest was far behind while reads
    /// could not pause (a reply or acknowledgements waiting on the connection).
    qos0_dropped: AtomicU64,
}

/// The statuses HTTP ingest answers with; anything else counts as the last, `0` ("other").
pub const HTTP_STATUSES: [u16; 9] = [202, 400, 401, 404, 405, 408, 413, 503, 0];

/// HTTP ingest's answers counted by status ([`HTTP_STATUSES`]), for metrics.
#[derive(Debug, Default)]
pub struct HttpAnswers {
    /// Set once HTTP ingest serves: without it, metrics leave the family out.
    serving: AtomicBool,
    counts: [AtomicU64; HTTP_STATUSES.len()],
}

impl HttpAnswers {
    /// HTTP ingest has started serving.
    pub fn set_serving(&self) {
        self.serving.store(true, Ordering::Relaxed);
    }

    /// Counts one answer.
    pub fn record(&self, status: u16) {
        let i = HTTP_STATUSES
            .iter()
            .position(|s| *s == status)
            .unwrap_or(HTTP_STATUSES.len() - 1);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Each status with its count, `None` when HTTP ingest does not serve.
    pub fn snapshot(&self) -> Option<Vec<(u16, u64)>> {
        self.serving.load(Ordering::Relaxed).then(|| {
            HTTP_STATUSES
                .iter()
                .zip(&self.counts)
                .map(|(s, c)| (*s, c.load(Ordering::Relaxed)))
                .collect()
        })
    }
}

impl Default for Health {
    fn default() -> Self {
        Health {
            mqtt_connected: AtomicBool::new(false),
            mqtt_attempted: AtomicBool::new(false),
            attempted: Notify::new(),
            turn_interval_ms: AtomicU64::new(DEFAULT_TURN_INTERVAL.as_millis() as u64),
            epoch: Instant::now(),
            loops: Mutex::new(Vec::new()),
            http_answers: HttpAnswers::default(),
            qos0_dropped: AtomicU64::new(0),
        }
    }
}

/// One watched loop.
#[derive(Debug)]
struct LoopSlot {
    /// Says which loop it is, in the log line when it stalls.
    name: String,
    /// When it last turned, in milliseconds after [`Health::epoch`].
    last_turn_ms: AtomicU64,
}

impl Health {
    /// A new report: not connected yet, no loop watched.
    pub fn new() -> Health {
        Health::default()
    }

    /// Counts one QoS 0 publish dropped past the ingest bound.
    pub fn count_qos0_dropped(&self) {
        self.qos0_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// QoS 0 publishes dropped past the ingest bound since the start.
    pub fn qos0_dropped(&self) -> u64 {
        self.qos0_dropped.load(Ordering::Relaxed)
    }

    /// The MQTT event loop got a CONNACK (true) or lost the connection (false). Either also
    /// marks the first connection attempt as made.
    pub fn set_mqtt_connected(&self, connected: bool) {
        self.mqtt_connected.store(connected, Ordering::Relaxed);
        if !self.mqtt_attempted.swap(true, Ordering::Relaxed) {
            self.attempted.notify_waiters();
        }
    }

    /// Whether the broker connection is up.
    pub fn mqtt_connected(&self) -> bool {
        self.mqtt_connected.load(Ordering::Relaxed)
    }

    /// Whether the first broker connection attempt has ended (success or failure).
    pub fn mqtt_attempted(&self) -> bool {
        self.mqtt_attempted.load(Ordering::Relaxed)
    }

    /// Resolves once the first broker connection attempt has ended.
    pub async fn first_mqtt_attempt(&self) {
        loop {
            let woken = self.attempted.notified();
            if self.mqtt_attempted() {
                return;
            }
            woken.await;
        }
    }

    /// How often idle loops turn.
    pub fn turn_interval(&self) -> Duration {
        Duration::from_millis(self.turn_interval_ms.load(Ordering::Relaxed))
    }

    /// Sets how often idle loops turn (the watchdog wants several turns per ping). Loops read
    /// it each time they wait.
    pub fn set_turn_interval(&self, every: Duration) {
        let ms = every.as_millis().clamp(1, u128::from(u64::MAX)) as u64;
        self.turn_interval_ms.store(ms, Ordering::Relaxed);
    }

    /// Starts watching a loop; it counts as having just turned.
    pub fn watch_loop(self: &Arc<Self>, name: impl Into<String>) -> Beat {
        let slot = Arc::new(LoopSlot {
            name: name.into(),
            last_turn_ms: AtomicU64::new(self.now_ms()),
        });
        self.lock_loops().push(slot.clone());
        Beat {
            watched: Some((self.clone(), slot)),
        }
    }

    /// The first watched loop that has not turned within `bound`, with how long ago it did.
    pub fn stalled_loop(&self, bound: Duration) -> Option<(String, Duration)> {
        let now = self.now_ms();
        let bound_ms = bound.as_millis() as u64;
        self.lock_loops().iter().find_map(|slot| {
            let since = now.saturating_sub(slot.last_turn_ms.load(Ordering::Relaxed));
            (since > bound_ms).then(|| (slot.name.clone(), Duration::from_millis(since)))
        })
    }

    /// How many loops are watched.
    pub fn watched_loops(&self) -> usize {
        self.lock_loops().len()
    }

    fn now_ms(&self) -> u64 {
        Instant::now().duration_since(self.epoch).as_millis() as u64
    }

    fn lock_loops(&self) -> MutexGuard<'_, Vec<Arc<LoopSlot>>> {
        // A panic while holding this lock cannot leave the list half-changed (push, retain).
        self.loops.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A loop's proof of life (see the module doc). Dropping it without [`Beat::retire`] leaves
/// the loop watched, so a loop that died counts as stalled.
#[derive(Debug, Default)]
pub struct Beat {
    /// The health record and this loop's slot in it; `None` for a loop nobody watches.
    watched: Option<(Arc<Health>, Arc<LoopSlot>)>,
}

impl Beat {
    /// A beat nobody watches (tests, tools): turning it does nothing.
    pub fn unwatched() -> Beat {
        Beat::default()
    }

    /// The loop went round.
    pub fn turn(&self) {
        if let Some((health, slot)) = &self.watched {
            slot.last_turn_ms.store(health.now_ms(), Ordering::Relaxed);
        }
    }

    /// Resolves when an idle loop should turn; never for an unwatched beat.
    pub async fn due(&self) {
        match &self.watched {
            Some((health, _)) => tokio::time::sleep(health.turn_interval()).await,
            None => std::future::pending().await,
        }
    }

    /// Awaits `work`, turning meanwhile as if the loop were idle: for waits that may last long
    /// by design (an append waiting for room in a full buffer, `when_full = "block"`).
    pub async fn alive_while<F: std::future::Future>(&self, work: F) -> F::Output {
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = self.due() => self.turn(),
            }
        }
    }

    /// The loop ended normally: stop watching it.
    pub fn retire(self) {
        if let Some((health, slot)) = &self.watched {
            health.lock_loops().retain(|s| !Arc::ptr_eq(s, slot));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_stops_turning_is_reported_after_the_bound() {
        let health = Arc::new(Health::new());
        let beat = health.watch_loop("delivery of rule a");
        let bound = Duration::from_secs(10);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(health.stalled_loop(bound), None);
        beat.turn();
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(health.stalled_loop(bound), None);
        tokio::time::advance(Duration::from_secs(2)).await;
        let (name, since) = health.stalled_loop(bound).expect("stalled");
        assert_eq!(name, "delivery of rule a");
        assert_eq!(since, Duration::from_secs(11));
    }

    #[tokio::test(start_paused = true)]
    async fn a_retired_loop_is_not_watched_and_a_dropped_one_still_is() {
        let health = Arc::new(Health::new());
        health.watch_loop("dropped");
        health.watch_loop("retired").retire();
        assert_eq!(health.watched_loops(), 1);
        tokio::time::advance(Duration::from_secs(5)).await;
        let (name, _) = health
            .stalled_loop(Duration::from_secs(1))
            .expect("stalled");
        assert_eq!(name, "dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_attempt_is_marked_by_success_or_failure() {
        let health = Arc::new(Health::new());
        assert!(!health.mqtt_attempted());
        let waiter = tokio::spawn({
            let health = health.clone();
            async move { health.first_mqtt_attempt().await }
        });
        health.set_mqtt_connected(false);
        waiter.await.expect("join");
        assert!(health.mqtt_attempted());
        assert!(!health.mqtt_connected());
    }
}
