//! The metric families of a scrape, read from what the parts publish: per rule, messages in
//! and out, invocations, replies, buffers; HTTP ingest's answers; the broker connection; then
//! the process (`process.rs`). Also the readiness check, which reads the same facts.
//!
//! Invariant: nothing here counts. Every number is read at scrape time from the counters the
//! owning parts keep anyway (`RuleStats`, the queue's `counters()` and `stats()`, `Health`), so
//! a scrape never changes a value and counters only ever grow across scrapes. A family with a
//! fixed label set lists every label value, 0 included, so a rate never starts from nothing.

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use crate::core::health::Health;
use crate::core::stats::{Board, RuleReport, RuleStats};

use super::process;

/// What a scrape reads: the routes' counters and queues, and the health facts.
pub(super) struct Collected {
    pub(super) routes: Board,
    pub(super) health: Arc<Health>,
    /// `mqtt://host:port`, for the readiness reason.
    pub(super) broker: String,
    /// Seconds since the epoch when the process started.
    pub(super) start_time: f64,
}

impl fmt::Debug for Collected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Collected")
            .field("broker", &self.broker)
            .finish()
    }
}

impl Collected {
    /// Why the daemon is not ready, or `None` when it is.
    pub(super) fn not_ready(&self) -> Option<String> {
        if !self.health.mqtt_connected() {
            return Some(format!(
                "not connected to the MQTT broker at {}",
                self.broker
            ));
        }
        self.routes.read().ok()?.iter().find_map(|rule| {
            if !rule.buffer.writable() {
                return Some(format!(
                    "buffer for rule {} cannot be written: the last write failed (disk full, read-only or I/O error)",
                    rule.name
                ));
            }
            let stalled = rule.stats.stalled.reason();
            stalled.map(|why| format!("rule {} {why}", rule.name))
        })
    }
}

type Labels = Vec<(&'static str, String)>;

fn rule_label(route: &RuleReport) -> Labels {
    vec![("rule", route.name.clone())]
}

fn with(mut labels: Labels, key: &'static str, value: &str) -> Labels {
    labels.push((key, value.to_owned()));
    labels
}

/// One counter family, one sample per label set.
fn counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, u64)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        family
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, u64, u64>(&value, None)?;
    }
    Ok(())
}

/// One gauge family, one sample per label set.
fn gauges<G: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, G)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        family.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

/// One unlabelled metric.
pub(super) fn single(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    value: f64,
) -> fmt::Result {
    let mut metric: MetricEncoder = encoder.encode_descriptor(name, help, None, kind)?;
    match kind {
        MetricType::Counter => metric.encode_counter::<NoLabelSet, f64, f64>(&value, None),
        _ => metric.encode_gauge(&value),
    }
}

impl Collector for Collected {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let routes: Vec<RuleReport> = self.routes.read().map(|r| r.clone()).unwrap_or_default();
        messages(&mut encoder, &routes)?;
        invocations(&mut encoder, &routes)?;
        answers(&mut encoder, &routes, &self.health)?;
        durations(&mut encoder, &routes)?;
        buffers(&mut encoder, &routes)?;
        single(
            &mut encoder,
            "mlb_mqtt_qos0_dropped",
            "QoS 0 messages dropped on arrival because ingest was far behind while reads could not pause (a reply or acknowledgements waiting on the connection).",
            MetricType::Counter,
            self.health.qos0_dropped() as f64,
        )?;
        single(
            &mut encoder,
            "mlb_mqtt_connected",
            "1 while the connection to the MQTT broker is up, else 0.",
            MetricType::Gauge,
            if self.health.mqtt_connected() {
                1.0
            } else {
                0.0
            },
        )?;
        process::encode(&mut encoder, self.start_time)
    }
}

/// One sample per rule, of the counter `read` picks.
fn per_rule(routes: &[RuleReport], read: impl Fn(&RuleStats) -> u64) -> Vec<(Labels, u64)> {
    routes
        .iter()
        .map(|r| (rule_label(r), read(&r.stats)))
        .collect()
}

/// Messages in, delivered, dropped (by reason) and dead-lettered, per rule.
fn messages(encoder: &mut DescriptorEncoder, routes: &[RuleReport]) -> fmt::Result {
    let get = RuleStats::get;
    counters(
        encoder,
        "mlb_messages_received",
        "Messages matched to the rule and buffered.",
        per_rule(routes, |s| get(&s.queued)),
    )?;
    counters(
        encoder,
        "mlb_messages_filtered",
        "Messages the rule's SQL WHERE did not keep: acknowledged, never stored.",
        per_rule(routes, |s| get(&s.filtered)),
    )?;
    counters(
        encoder,
        "mlb_messages_delivered",
        "Messages in events Lambda accepted.",
        per_rule(routes, |s| get(&s.delivered)),
    )?;
    counters(
        encoder,
        "mlb_messages_dropped",
        "Messages dropped, by reason: buffer full (drop_oldest, drop_newest), older than max_age (expired), rules.throttle (throttled), too large for Lambda (oversize, also dead-lettered), unreadable on disk (corrupt).",
        dropped(routes),
    )?;
    counters(
        encoder,
        "mlb_dead_letters",
        "Messages moved to the dead-letter store.",
        per_rule(routes, |s| get(&s.dead_lettered)),
    )
}

/// The samples of `mlb_messages_dropped`: every reason of every rule.
fn dropped(routes: &[RuleReport]) -> Vec<(Labels, u64)> {
    let mut dropped = Vec::new();
    for r in routes {
        for (reason, value) in drop_reasons(r) {
            dropped.push((with(rule_label(r), "reason", reason), value));
        }
    }
    dropped
}

/// A rule's dropped messages by reason, every reason (0 included), as `/metrics` and the
/// telemetry snapshot name them.
pub(super) fn drop_reasons(r: &RuleReport) -> [(&'static str, u64); 6] {
    let get = RuleStats::get;
    let (s, q) = (&r.stats, r.buffer.counters());
    let throttled =
        get(&s.throttled_min_interval) + get(&s.throttled_unchanged) + get(&s.throttled_deadband);
    [
        ("drop_oldest", get(&q.dropped_oldest)),
        ("drop_newest", get(&q.dropped_newest)),
        ("expired", get(&q.expired)),
        ("throttled", throttled),
        ("oversize", get(&s.set_aside)),
        ("corrupt", get(&q.lost)),
    ]
}

/// A rule's invocation attempts by result, every result (0 included).
pub(super) fn invocation_results(s: &RuleStats) -> [(&'static str, u64); 4] {
    let get = RuleStats::get;
    [
        ("ok", get(&s.invocations)),
        ("throttled", get(&s.attempts_throttled)),
        ("error", get(&s.attempts_error)),
        ("dead_lettered", get(&s.attempts_refused)),
    ]
}

/// Age in seconds of the oldest message a rule's delivery holds, at `now_ms` (ms since the
/// epoch); 0 when its buffer holds none.
pub(super) fn oldest_age_seconds(r: &RuleReport, pending: u64, now_ms: f64) -> f64 {
    let oldest = RuleStats::get(&r.stats.oldest_unacked_ms);
    if pending == 0 || oldest == 0 {
        0.0
    } else {
        ((now_ms - oldest as f64) / 1000.0).max(0.0)
    }
}

/// Invocation attempts per rule, by result.
fn invocations(encoder: &mut DescriptorEncoder, routes: &[RuleReport]) -> fmt::Result {
    let mut invocations = Vec::new();
    for r in routes {
        for (result, value) in invocation_results(&r.stats) {
            invocations.push((with(rule_label(r), "result", result), value));
        }
    }
    counters(
        encoder,
        "mlb_invocations",
        "Invocation attempts, by result: ok, throttled (retried), error (retried), dead_lettered (the event went to the dead-letter store).",
        invocations,
    )
}

/// HTTP ingest's answers (when it serves) and the replies of rules that reply (when one does):
/// each family only where it means something, as it is noise on every other gateway.
fn answers(encoder: &mut DescriptorEncoder, routes: &[RuleReport], health: &Health) -> fmt::Result {
    let mut replies = Vec::new();
    for r in routes.iter().filter(|r| r.replies) {
        let s = &r.stats;
        for (result, counter) in [
            ("published", &s.replies_published),
            ("no_topic", &s.replies_without_topic),
            ("dead_lettered", &s.replies_refused),
        ] {
            replies.push((
                with(rule_label(r), "result", result),
                RuleStats::get(counter),
            ));
        }
    }
    if let Some(answers) = health.http_answers.snapshot() {
        counters(
            encoder,
            "mlb_http_requests",
            "HTTP ingest requests, by the status answered (202 stored; 0: any other).",
            answers
                .into_iter()
                .map(|(status, n)| (vec![("status", status.to_string())], n)),
        )?;
    }
    if !replies.is_empty() {
        counters(
            encoder,
            "mlb_replies",
            "Replies of rules with [rules.reply], by result: published (the broker acknowledged it), no_topic (no Response Topic and no reply.topic), dead_lettered (it could not be published, or its Response Topic is not in reply.allow and there is no reply.topic).",
            replies,
        )?;
    }
    Ok(())
}

/// How long invocation attempts took, per rule.
fn durations(encoder: &mut DescriptorEncoder, routes: &[RuleReport]) -> fmt::Result {
    let mut family = encoder.encode_descriptor(
        "mlb_invocation_duration_seconds",
        "How long each invocation attempt took.",
        None,
        MetricType::Histogram,
    )?;
    for r in routes {
        let h = r.stats.invoke_seconds.snapshot();
        family
            .encode_family(&rule_label(r))?
            .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)?;
    }
    Ok(())
}

/// What each rule's buffer holds: messages, bytes, and the age of the oldest; its fsyncs.
fn buffers(encoder: &mut DescriptorEncoder, routes: &[RuleReport]) -> fmt::Result {
    let stats: Vec<_> = routes.iter().map(|r| (r, r.buffer.stats())).collect();
    gauges(
        encoder,
        "mlb_buffer_messages",
        "Messages buffered and not yet acknowledged by Lambda.",
        stats.iter().map(|(r, s)| (rule_label(r), s.pending)),
    )?;
    gauges(
        encoder,
        "mlb_buffer_bytes",
        "Bytes of the rule's buffer segment files.",
        stats.iter().map(|(r, s)| (rule_label(r), s.bytes)),
    )?;
    gauges(
        encoder,
        "mlb_buffer_max_bytes",
        "Bytes the rule's buffer may hold: its share of buffer.max_size.",
        routes.iter().map(|r| (rule_label(r), r.buffer.max_bytes())),
    )?;
    let now_ms = now_seconds() * 1000.0;
    gauges(
        encoder,
        "mlb_buffer_oldest_age_seconds",
        "Age of the oldest buffered message (0 when the buffer is empty).",
        stats
            .iter()
            .map(|(r, s)| (rule_label(r), oldest_age_seconds(r, s.pending, now_ms))),
    )?;
    counters(
        encoder,
        "mlb_buffer_fsyncs",
        "File fsyncs of the rule's buffer (group commits of its segments, syncs of its ack file); each rewrites at least one page of the disk.",
        routes.iter().map(|r| {
            let fsyncs = r
                .buffer
                .counters()
                .fsyncs
                .load(std::sync::atomic::Ordering::Relaxed);
            (rule_label(r), fsyncs)
        }),
    )?;
    gauges(
        encoder,
        "mlb_rule_stalled",
        "1 while the rule delivers nothing: its buffer cannot be read (retried) or its delivery stopped on an error (/readyz says why); else 0.",
        routes
            .iter()
            .map(|r| (rule_label(r), u64::from(r.stats.stalled.is_stalled()))),
    )?;
    gauges(
        encoder,
        "mlb_rule_start_time_seconds",
        "When the rule's counters began, in seconds since the Unix epoch: the start, or the reload that added the rule. A counter over the time since is the rule's average rate.",
        routes
            .iter()
            .map(|r| (rule_label(r), r.stats.since.epoch_seconds())),
    )
}

/// Seconds since the epoch, now.
pub(super) fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
