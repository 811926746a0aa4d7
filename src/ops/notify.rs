//! systemd's notify protocol (`Type=notify`): readiness, the watchdog, status lines, reload
//! and stop. Without `NOTIFY_SOCKET` in the environment every call does nothing.
//!
//! # What is sent, and when
//!
//! ```text
//! READY=1                  once every buffer is recovered and the first broker connection
//! STATUS=<line>            attempt ended, successful or not (a broker down at boot must not
//!                          fail the start)
//! WATCHDOG=1               every WATCHDOG_USEC/2, only while every watched loop (MQTT ingest,
//!                          each rule's delivery) turned within that time (health.rs)
//! STATUS=<line>            when the line changes, at most every STATUS_MIN_INTERVAL
//! RELOADING=1              at SIGHUP, with the monotonic clock in microseconds (systemd 253+
//! MONOTONIC_USEC=<usec>    requires it), then READY=1 once the new configuration is in force
//! STOPPING=1               at SIGTERM or SIGINT; from then on WATCHDOG=1 no longer depends on
//!                          the loops (they end while draining), TimeoutStopSec= bounds the stop
//! ```
//!
//! A status line reads `broker connected; 12 messages pending` or `broker not connected
//! (reconnecting); 12 messages pending`.
//!
//! A failed send is logged once at warn and otherwise ignored: the daemon's work does not
//! depend on systemd hearing it (with a watchdog, systemd restarts it if it hears nothing).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::Instant;

use crate::core::health::Health;

/// Shortest time between two status lines (the pending count changes with every message).
pub const STATUS_MIN_INTERVAL: Duration = Duration::from_secs(2);
/// How often the status line is recomputed.
const STATUS_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Idle loops turn this many times per watchdog ping, so one late wake-up does not miss a ping.
const TURNS_PER_PING: u32 = 4;

/// Where notifications go: the real socket, or a test's list.
pub trait Sink: Send + Sync {
    /// Sends one datagram with these assignments.
    fn send(&self, states: &[NotifyState<'_>]) -> io::Result<()>;
}

/// systemd's socket, named by `NOTIFY_SOCKET`.
struct Systemd;

impl Sink for Systemd {
    fn send(&self, states: &[NotifyState<'_>]) -> io::Result<()> {
        sd_notify::notify(states)
    }
}

/// Talks to the service manager. Cheap to share (`Arc`); every method is a no-op when
/// `NOTIFY_SOCKET` was not set.
pub struct Notifier {
    /// `None` when not started by a service manager that listens.
    sink: Option<Box<dyn Sink>>,
    /// `STOPPING=1` was sent: the watchdog no longer looks at the loops.
    stopping: AtomicBool,
    /// A send failed and was logged; later failures stay quiet.
    failed_once: AtomicBool,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("enabled", &self.enabled())
            .finish()
    }
}

impl Notifier {
    /// Talks to systemd when `NOTIFY_SOCKET` is set, otherwise to nobody.
    pub fn from_env() -> Notifier {
        let sink: Option<Box<dyn Sink>> = std::env::var_os("NOTIFY_SOCKET")
            .filter(|s| !s.is_empty())
            .map(|_| Box::new(Systemd) as Box<dyn Sink>);
        Notifier::new(sink)
    }

    /// Sends to `sink` (tests), or nowhere.
    pub fn new(sink: Option<Box<dyn Sink>>) -> Notifier {
        Notifier {
            sink,
            stopping: AtomicBool::new(false),
            failed_once: AtomicBool::new(false),
        }
    }

    /// Whether anything listens.
    pub fn enabled(&self) -> bool {
        self.sink.is_some()
    }

    /// Start-up, or a reload, is complete.
    pub fn ready(&self) {
        self.send(&[NotifyState::Ready]);
    }

    /// A reload (SIGHUP) begins; call [`Notifier::ready`] when the new configuration is in
    /// force, or the old one kept.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    /// The graceful stop begins.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.send(&[NotifyState::Stopping]);
    }

    /// Whether [`Notifier::stopping`] was called.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    fn status(&self, line: &str) {
        self.send(&[NotifyState::Status(line)]);
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        let Some(sink) = &self.sink else { return };
        if let Err(err) = sink.send(states)
            && !self.failed_once.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(error = %err, "cannot notify systemd (NOTIFY_SOCKET); going on without it");
        }
    }
}

/// The watchdog's ping interval asked for by systemd (`WATCHDOG_USEC / 2`), if any.
pub fn watchdog_ping_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

/// How often idle loops should turn for a watchdog pinging every `ping`.
pub fn turn_interval_for(ping: Duration) -> Duration {
    (ping / TURNS_PER_PING).min(crate::core::health::DEFAULT_TURN_INTERVAL)
}

/// The status line for these facts.
pub fn status_line(connected: bool, pending: u64) -> String {
    let broker = if connected {
        "broker connected"
    } else {
        "broker not connected (reconnecting)"
    };
    let noun = if pending == 1 { "message" } else { "messages" };
    format!("{broker}; {pending} {noun} pending")
}

/// Sends READY=1 once the first broker attempt ended, then keeps the watchdog fed while the
/// loops turn and the status line current. Runs until aborted.
pub async fn supervise(
    notifier: Arc<Notifier>,
    health: Arc<Health>,
    ping_every: Option<Duration>,
    pending: impl Fn() -> u64 + Send,
) {
    let mut watchdog = ping_every.map(|every| Watchdog {
        every,
        next: Instant::now(),
        stalled: false,
    });
    // Keep the watchdog fed while the first attempt runs (DNS or a TCP connect may take a
    // while): systemd may already be counting.
    {
        let first = health.first_mqtt_attempt();
        tokio::pin!(first);
        loop {
            let wake = watchdog.as_ref().map(|w| w.next);
            tokio::select! {
                _ = &mut first => break,
                _ = sleep_until_opt(wake) => {
                    if let Some(w) = watchdog.as_mut() {
                        w.tick(&notifier, &health);
                    }
                }
            }
        }
    }
    let mut line = status_line(health.mqtt_connected(), pending());
    notifier.send(&[NotifyState::Ready, NotifyState::Status(&line)]);
    tracing::debug!(status = %line, "told systemd the service is ready");
    let mut line_sent_at = Instant::now();
    let mut next_status = Instant::now() + STATUS_CHECK_INTERVAL;
    loop {
        let wake = match watchdog.as_ref() {
            Some(w) => w.next.min(next_status),
            None => next_status,
        };
        tokio::time::sleep_until(wake).await;
        let now = Instant::now();
        if let Some(w) = watchdog.as_mut()
            && now >= w.next
        {
            w.tick(&notifier, &health);
        }
        if now >= next_status {
            next_status = now + STATUS_CHECK_INTERVAL;
            let current = status_line(health.mqtt_connected(), pending());
            if current != line && now.duration_since(line_sent_at) >= STATUS_MIN_INTERVAL {
                notifier.status(&current);
                line = current;
                line_sent_at = now;
            }
        }
    }
}

/// The watchdog's state between pings.
struct Watchdog {
    /// `WATCHDOG_USEC / 2`: the ping interval and the bound on a loop's last turn.
    every: Duration,
    /// When the next ping is due.
    next: Instant,
    /// A loop was found stalled (logged once until it turns again).
    stalled: bool,
}

impl Watchdog {
    fn tick(&mut self, notifier: &Notifier, health: &Health) {
        self.next = Instant::now() + self.every;
        if notifier.is_stopping() {
            notifier.send(&[NotifyState::Watchdog]);
            return;
        }
        match health.stalled_loop(self.every) {
            None => {
                if self.stalled {
                    tracing::info!("every loop turns again: feeding the systemd watchdog again");
                    self.stalled = false;
                }
                notifier.send(&[NotifyState::Watchdog]);
            }
            Some((name, since)) => {
                if !self.stalled {
                    tracing::error!(
                        "{name} has not made progress for {}: no longer feeding the systemd watchdog, which will restart the service",
                        humantime::format_duration(round_to_seconds(since))
                    );
                    self.stalled = true;
                }
            }
        }
    }
}

fn round_to_seconds(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicU64;

    /// Records each datagram as its lines joined by '|'.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl Sink for Recorder {
        fn send(&self, states: &[NotifyState<'_>]) -> io::Result<()> {
            let text: Vec<String> = states.iter().map(|s| s.to_string()).collect();
            self.0.lock().expect("lock").push(text.join("|"));
            Ok(())
        }
    }

    impl Recorder {
        fn count(&self, prefix: &str) -> usize {
            let all = self.0.lock().expect("lock");
            all.iter().filter(|m| m.starts_with(prefix)).count()
        }
        fn all(&self) -> Vec<String> {
            self.0.lock().expect("lock").clone()
        }
    }

    fn start(
        ping: Duration,
    ) -> (
        Recorder,
        Arc<Notifier>,
        Arc<Health>,
        Arc<AtomicU64>,
        tokio::task::JoinHandle<()>,
    ) {
        let recorder = Recorder::default();
        let notifier = Arc::new(Notifier::new(Some(Box::new(recorder.clone()))));
        let health = Arc::new(Health::new());
        health.set_turn_interval(turn_interval_for(ping));
        let pending = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(supervise(notifier.clone(), health.clone(), Some(ping), {
            let pending = pending.clone();
            move || pending.load(Ordering::Relaxed)
        }));
        (recorder, notifier, health, pending, task)
    }

    /// An idle loop: it only turns when its beat is due, like the daemon's loops do.
    fn idle_loop(health: &Arc<Health>, name: &str) -> tokio::task::JoinHandle<()> {
        let beat = health.watch_loop(name);
        tokio::spawn(async move {
            loop {
                beat.due().await;
                beat.turn();
            }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn ready_waits_for_the_first_broker_attempt_even_a_failed_one() {
        let (recorder, _notifier, health, _pending, _task) = start(Duration::from_secs(15));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(recorder.count("READY=1"), 0, "{:?}", recorder.all());
        health.set_mqtt_connected(false);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            recorder
                .count("READY=1|STATUS=broker not connected (reconnecting); 0 messages pending"),
            1,
            "{:?}",
            recorder.all()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_loops_keep_the_watchdog_fed() {
        let ping = Duration::from_secs(15);
        let (recorder, _notifier, health, _pending, _task) = start(ping);
        let _ingest = idle_loop(&health, "MQTT ingest");
        let _delivery = idle_loop(&health, "delivery of rule a");
        health.set_mqtt_connected(true);
        tokio::time::sleep(ping * 10 + Duration::from_millis(1)).await;
        // One at start, then one per interval.
        assert_eq!(recorder.count("WATCHDOG=1"), 11, "{:?}", recorder.all());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_loop_stops_the_watchdog_pings_and_a_recovered_one_resumes_them() {
        let ping = Duration::from_secs(15);
        let (recorder, _notifier, health, _pending, _task) = start(ping);
        let _ingest = idle_loop(&health, "MQTT ingest");
        // A delivery loop that turns, then gets stuck in an await that never ends.
        let stuck = health.watch_loop("delivery of rule a");
        let (unstick, stuck_until) = tokio::sync::oneshot::channel::<()>();
        let delivery = tokio::spawn(async move {
            for _ in 0..10 {
                stuck.due().await;
                stuck.turn();
            }
            let _ = stuck_until.await;
            loop {
                stuck.due().await;
                stuck.turn();
            }
        });
        health.set_mqtt_connected(true);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = recorder.count("WATCHDOG=1");
        assert!(before >= 1);
        tokio::time::sleep(ping * 10).await;
        // At most the ping within one interval of the last turn; then none.
        let during = recorder.count("WATCHDOG=1") - before;
        assert!(during <= 1, "pings while stuck: {during}");
        let settled = recorder.count("WATCHDOG=1");
        tokio::time::sleep(ping * 4).await;
        assert_eq!(recorder.count("WATCHDOG=1"), settled, "no ping while stuck");

        unstick.send(()).expect("loop waits");
        tokio::time::sleep(ping * 3).await;
        assert!(recorder.count("WATCHDOG=1") >= settled + 2);
        delivery.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_died_stops_the_pings_until_stopping() {
        let ping = Duration::from_secs(15);
        let (recorder, notifier, health, _pending, _task) = start(ping);
        let delivery = idle_loop(&health, "delivery of rule a");
        health.set_mqtt_connected(true);
        tokio::time::sleep(Duration::from_secs(1)).await;
        delivery.abort();
        tokio::time::sleep(ping * 2).await;
        let settled = recorder.count("WATCHDOG=1");
        tokio::time::sleep(ping * 4).await;
        assert_eq!(recorder.count("WATCHDOG=1"), settled);
        // While stopping, loops end by design: the watchdog is fed regardless.
        notifier.stopping();
        tokio::time::sleep(ping * 2).await;
        assert!(recorder.count("WATCHDOG=1") >= settled + 2);
        assert_eq!(recorder.count("STOPPING=1"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn status_lines_follow_changes_no_more_often_than_the_minimum_interval() {
        let (recorder, _notifier, health, pending, _task) = start(Duration::from_secs(15));
        let _ingest = idle_loop(&health, "MQTT ingest");
        health.set_mqtt_connected(false);
        tokio::time::sleep(Duration::from_millis(10)).await;
        health.set_mqtt_connected(true);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            recorder.count("STATUS=broker connected; 0 messages pending"),
            1,
            "{:?}",
            recorder.all()
        );
        // A count that changes every 100 ms: a line at most every STATUS_MIN_INTERVAL.
        for n in 0..100 {
            pending.store(n, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let lines = recorder.count("STATUS=");
        let most = 1 + 1 + (10 / STATUS_MIN_INTERVAL.as_secs() as usize) + 1;
        assert!(lines <= most, "{lines} status lines in 10 s");
        assert!(lines >= 4, "{lines} status lines in 10 s");
    }

    #[test]
    fn reloading_carries_the_monotonic_clock_then_ready() {
        let recorder = Recorder::default();
        let notifier = Notifier::new(Some(Box::new(recorder.clone())));
        notifier.reloading();
        notifier.ready();
        let all = recorder.all();
        assert_eq!(all.len(), 2);
        let (reloading, usec) = all[0].split_once('|').expect("two lines");
        assert_eq!(reloading, "RELOADING=1");
        let usec: u64 = usec
            .strip_prefix("MONOTONIC_USEC=")
            .expect("MONOTONIC_USEC")
            .parse()
            .expect("a number");
        assert!(usec > 0);
        assert_eq!(all[1], "READY=1");
    }

    #[test]
    fn without_a_socket_nothing_is_sent() {
        let notifier = Notifier::new(None);
        assert!(!notifier.enabled());
        notifier.ready();
        notifier.stopping();
    }

    #[test]
    fn status_lines_read_as_words() {
        assert_eq!(status_line(true, 1), "broker connected; 1 message pending");
        assert_eq!(
            status_line(false, 12),
            "broker not connected (reconnecting); 12 messages pending"
        );
    }
}
