//! `[telemetry]`: the metrics as one JSON object, published to the local broker at an interval
//! (QoS 1, retained), so a gateway without Prometheus can forward its health through a rule.
//!
//! # The snapshot (a contract, like the metric names: add fields, never rename them)
//!
//! ```text
//! {
//!   "version": "0.1.0",                  the bridge's version
//!   "time": 1733351400,                  when the snapshot was taken, seconds since the epoch
//!   "process": {
//!     "start_time_seconds": 1733347800,  when the process started (a restart changes it)
//!     "uptime_seconds": 3600,
//!     "resident_memory_bytes": 7340032,  (each process figure left out where /proc cannot
//!     "cpu_seconds": 12.5,                be read)
//!     "open_fds": 23
//!   },
//!   "mqtt": { "connected": true, "qos0_dropped": 0 },
//!   "rules": {                           every rule running, by name
//!     "temperature": {
//!       "received": 1200, "delivered": 1198,
//!       "dropped": { "corrupt": 0, "drop_newest": 0, "drop_oldest": 0, "expired": 0,
//!                    "oversize": 0, "throttled": 0 },
//!       "dead_letters": 0,
//!       "invocations": { "dead_lettered": 0, "error": 0, "ok": 12, "throttled": 0 },
//!       "buffer": { "messages": 2, "bytes": 8192, "max_bytes": 268435456,
//!                   "oldest_age_seconds": 0.4 },
//!       "stalled": false                 true while it delivers nothing; then also
//!     }                                  "stalled_reason": "cannot read its buffer: …"
//!   }
//! }
//! ```
//!
//! Invariant: every figure is read from what `/metrics` reads (the rules' [`RuleReport`]s, the
//! health facts, /proc), through the same helpers (`families.rs`, `process.rs`), so the two
//! never disagree on what a name means. Counters count since the process started, as on
//! `/metrics`.
//!
//! The first snapshot goes out one interval after the start, then one each interval. A publish
//! waits for the broker's PUBACK through reconnects; ticks that pass meanwhile are skipped,
//! so an outage leaves one snapshot waiting, not a pile.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use serde::Serialize;

use crate::core::config::TelemetryConfig;
use crate::core::health::Health;
use crate::core::stats::{Board, RuleReport, RuleStats};

use super::families::{drop_reasons, invocation_results, now_seconds, oldest_age_seconds};
use super::process::{self, ProcessStat};

/// One snapshot, serialized as the module's text block shows.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    version: &'static str,
    time: u64,
    process: Process,
    mqtt: Mqtt,
    rules: BTreeMap<String, Rule>,
}

#[derive(Debug, Serialize)]
struct Process {
    start_time_seconds: u64,
    uptime_seconds: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    resident_memory_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    open_fds: Option<u64>,
}

#[derive(Debug, Serialize)]
struct Mqtt {
    connected: bool,
    qos0_dropped: u64,
}

#[derive(Debug, Serialize)]
struct Rule {
    received: u64,
    delivered: u64,
    dropped: BTreeMap<&'static str, u64>,
    dead_letters: u64,
    invocations: BTreeMap<&'static str, u64>,
    buffer: Buffer,
    stalled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stalled_reason: Option<String>,
}

#[derive(Debug, Serialize)]
struct Buffer {
    messages: u64,
    bytes: u64,
    max_bytes: u64,
    oldest_age_seconds: f64,
}

impl Snapshot {
    /// What the rules and the process say at `now` (seconds since the epoch); `start_time`:
    /// when the process started.
    pub fn take(routes: &[RuleReport], health: &Health, start_time: f64, now: f64) -> Snapshot {
        let stat = ProcessStat::read();
        Snapshot {
            version: env!("CARGO_PKG_VERSION"),
            time: now as u64,
            process: Process {
                start_time_seconds: start_time as u64,
                uptime_seconds: (now - start_time).max(0.0) as u64,
                resident_memory_bytes: stat.as_ref().map(|s| s.resident_bytes as u64),
                cpu_seconds: stat.as_ref().map(|s| s.cpu_seconds),
                open_fds: process::open_fds(),
            },
            mqtt: Mqtt {
                connected: health.mqtt_connected(),
                qos0_dropped: health.qos0_dropped(),
            },
            rules: routes
                .iter()
                .map(|r| (r.name.clone(), rule(r, now * 1000.0)))
                .collect(),
        }
    }

    /// The JSON text.
    pub fn to_json(&self) -> Vec<u8> {
        // Plain data with string keys: serializing it cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// One rule's figures at `now_ms`.
fn rule(r: &RuleReport, now_ms: f64) -> Rule {
    let (s, q) = (&r.stats, r.buffer.stats());
    let stalled_reason = s.stalled.reason();
    Rule {
        received: RuleStats::get(&s.queued),
        delivered: RuleStats::get(&s.delivered),
        dropped: drop_reasons(r).into_iter().collect(),
        dead_letters: RuleStats::get(&s.dead_lettered),
        invocations: invocation_results(s).into_iter().collect(),
        buffer: Buffer {
            messages: q.pending,
            bytes: q.bytes,
            max_bytes: r.buffer.max_bytes(),
            // Milliseconds are enough, and keep the JSON short.
            oldest_age_seconds: (oldest_age_seconds(r, q.pending, now_ms) * 1000.0).round()
                / 1000.0,
        },
        stalled: stalled_reason.is_some(),
        stalled_reason,
    }
}

/// Publishes a snapshot every `config.interval` until the task is aborted. `publish` hands
/// one payload to the broker and resolves once it acknowledged it (or why not, one line).
pub fn start<P, F>(
    config: Option<&TelemetryConfig>,
    board: Board,
    health: Arc<Health>,
    publish: P,
) -> Option<tokio::task::JoinHandle<()>>
where
    P: Fn(Vec<u8>) -> F + Send + 'static,
    F: Future<Output = Result<(), String>> + Send + 'static,
{
    let config = config?.clone();
    tracing::info!(topic = %config.topic, interval = ?config.interval.0, "publishing telemetry");
    Some(tokio::spawn(run(config, board, health, publish)))
}

async fn run<P, F>(config: TelemetryConfig, board: Board, health: Arc<Health>, publish: P)
where
    P: Fn(Vec<u8>) -> F,
    F: Future<Output = Result<(), String>>,
{
    let start_time = process::start_time().unwrap_or_else(now_seconds);
    let every = config.interval.0;
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut failing = false;
    loop {
        ticks.tick().await;
        let routes: Vec<RuleReport> = board.read().map(|r| r.clone()).unwrap_or_default();
        let snapshot = Snapshot::take(&routes, &health, start_time, now_seconds());
        match publish(snapshot.to_json()).await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(topic = %config.topic, "telemetry published again");
            }
            Ok(()) => {}
            // Once per streak: the same failure each interval says nothing new.
            Err(why) if !failing => {
                failing = true;
                tracing::warn!(topic = %config.topic, "cannot publish telemetry: {why}; trying again each interval");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::config::HumanDuration;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    fn board_with_one_rule() -> (Board, Arc<RuleStats>) {
        let stats = Arc::new(RuleStats::default());
        let buffer = Arc::new(super::super::tests::Writable::default());
        buffer.0.expired.store(4, Ordering::Relaxed);
        let report = RuleReport {
            name: "temperature".into(),
            replies: false,
            stats: stats.clone(),
            buffer,
        };
        (Board::new(std::sync::RwLock::new(vec![report])), stats)
    }

    #[test]
    fn a_snapshot_holds_each_rule_and_the_process_as_metrics_name_them() {
        let (board, stats) = board_with_one_rule();
        RuleStats::add(&stats.queued, 12);
        RuleStats::add(&stats.delivered, 10);
        RuleStats::add(&stats.invocations, 3);
        RuleStats::add(&stats.attempts_throttled, 1);
        RuleStats::add(&stats.throttled_deadband, 2);
        RuleStats::add(&stats.dead_lettered, 1);
        stats
            .stalled
            .set("cannot read its buffer: gone; retrying".into());
        let health = Health::new();
        health.set_mqtt_connected(true);
        let routes = board.read().expect("board").clone();
        let snapshot = Snapshot::take(&routes, &health, 1000.0, 4600.5);
        let json: serde_json::Value = serde_json::from_slice(&snapshot.to_json()).expect("JSON");
        assert_eq!(json["time"], 4600);
        assert_eq!(json["process"]["start_time_seconds"], 1000);
        assert_eq!(json["process"]["uptime_seconds"], 3600);
        assert!(
            json["process"]["resident_memory_bytes"].as_u64() > Some(0),
            "{json}"
        );
        assert!(json["process"]["open_fds"].as_u64() > Some(0), "{json}");
        assert_eq!(
            json["mqtt"],
            serde_json::json!({"connected": true, "qos0_dropped": 0})
        );
        assert_eq!(
            json["rules"]["temperature"],
            serde_json::json!({
                "received": 12,
                "delivered": 10,
                "dropped": {"corrupt": 0, "drop_newest": 0, "drop_oldest": 0, "expired": 4,
                            "oversize": 0, "throttled": 2},
                "dead_letters": 1,
                "invocations": {"dead_lettered": 0, "error": 0, "ok": 3, "throttled": 1},
                "buffer": {"messages": 0, "bytes": 0, "max_bytes": 65536,
                           "oldest_age_seconds": 0.0},
                "stalled": true,
                "stalled_reason": "cannot read its buffer: gone; retrying"
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_snapshot_goes_out_each_interval_the_first_after_one_and_none_piles_up() {
        let (board, stats) = board_with_one_rule();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // The second publish waits 250 s for its PUBACK (a broker outage).
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let publish = move |payload: Vec<u8>| {
            let (tx, calls) = (tx.clone(), calls.clone());
            async move {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                if n == 1 {
                    tokio::time::sleep(Duration::from_secs(250)).await;
                }
                let json: serde_json::Value = serde_json::from_slice(&payload).expect("JSON");
                let _ = tx.send((tokio::time::Instant::now(), json));
                Ok(())
            }
        };
        let config = TelemetryConfig {
            topic: "gw/health".into(),
            interval: HumanDuration(Duration::from_secs(60)),
        };
        let begun = tokio::time::Instant::now();
        let task = start(Some(&config), board, Arc::new(Health::new()), publish)
            .expect("telemetry configured");
        let (at, first) = rx.recv().await.expect("first snapshot");
        assert_eq!(at - begun, Duration::from_secs(60));
        assert_eq!(first["rules"]["temperature"]["received"], 0);
        RuleStats::add(&stats.queued, 5);
        let (at, second) = rx.recv().await.expect("second snapshot");
        assert_eq!(at - begun, Duration::from_secs(120 + 250));
        assert_eq!(second["rules"]["temperature"]["received"], 5);
        // The ticks missed while it waited are skipped, not sent in a burst.
        let (at, _) = rx.recv().await.expect("third snapshot");
        assert_eq!(
            at - begun,
            Duration::from_secs(370),
            "the late tick, at once"
        );
        let (at, _) = rx.recv().await.expect("fourth snapshot");
        assert_eq!(at - begun, Duration::from_secs(420), "back on the minute");
        task.abort();
        assert!(
            start(None, Board::default(), Arc::new(Health::new()), |_| async {
                Ok(())
            })
            .is_none()
        );
    }
}
