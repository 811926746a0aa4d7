//! What a rule's shaping makes of message rates: invocations per second and per 30-day month,
//! for `mqtt-lambda-bridge cost`. Pure: rates, the rule's [`RulePlan`] and what is assumed of
//! the messages in; numbers out. The README's `cost` section states the same formulas.
//!
//! ```text
//! r_t    messages per second on topic t that reach the rule (its filter covers t)
//! keep   r_t ← keep · r_t          the fraction its SQL filter keeps (--keep; 1 without)
//! throttle, per topic, in the daemon's order:
//!        only_changes, deadband    r_t ← c · r_t   with the change fraction c (--changes);
//!                                  no reduction when c is not given
//!        min_interval T            r_t ← min(r_t, 1/T)   (at most one per topic per T)
//! R = Σ r_t                        messages per second into batching or windows
//! batch  n = min(max_messages, ⌊(max_bytes − envelope + 1) / message⌋, 1 + R · max_wait)
//!        events = R / n            a batch opens with a message and closes when full or
//!                                  max_wait later: the first message plus R · max_wait more
//! window W, g groups active in a window (a group with r_g < 1/W is active r_g·W of the time)
//!        events = min(R, 1/W) · ⌈g · group bytes / (max_bytes − window envelope)⌉
//!                                  one event per window that saw a message, all its groups in
//!                                  it, split only when they exceed max_bytes
//! rate limit L                     invocations = min(events, L)
//! month = 30 days = 2,592,000 s
//! ```
//!
//! Arrivals are taken as steady; sizes (`envelope`, `message`, `group bytes`) are measured with
//! the daemon's own encoders on a message of `--message-bytes` bytes, so they follow the event
//! format. When a rate limit holds invocations below what shaping forms, the buffer absorbs the
//! difference: batches grow up to their limits, and beyond that the rule falls behind
//! ([`Flow::behind`]) until its buffer is full.

use std::collections::BTreeMap;
use std::time::UNIX_EPOCH;

use crate::core::envelope::{self, Message};
use crate::core::rules;
use crate::shaping::aggregate::{AggregateSpec, FieldStats, Group, GroupBy, Window};
use crate::shaping::plan::RulePlan;

/// A 30-day month, the unit of the `cost` command's figures.
pub const SECONDS_PER_MONTH: f64 = 30.0 * 24.0 * 60.0 * 60.0;

/// Messages per second on one topic, or in total on the topics a filter stands for.
#[derive(Debug, Clone, PartialEq)]
pub struct Stream {
    /// A topic name, or a filter (`+`, `#`).
    pub topic: String,
    /// Messages per second.
    pub per_second: f64,
}

/// What the figures assume of one rule's messages beyond their rates.
#[derive(Debug, Clone, PartialEq)]
pub struct Assumptions {
    /// Payload size of every message, in bytes.
    pub message_bytes: usize,
    /// Fraction of the messages reaching the rule that its filter keeps (0 to 1).
    pub keep: f64,
    /// Fraction of messages whose payload (or deadband field) changed since the last one of
    /// their topic; `None`: unknown, so `only_changes` and `deadband` drop nothing.
    pub changes: Option<f64>,
    /// How many distinct topics the rule's messages come on, spread evenly; `None`: one per
    /// stream.
    pub topics: Option<u64>,
}

impl Default for Assumptions {
    fn default() -> Self {
        Assumptions {
            message_bytes: 100,
            keep: 1.0,
            changes: None,
            topics: None,
        }
    }
}

/// What decided the number of events a rule forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// No batching: one event per message.
    PerMessage,
    /// Batches leave full at `max_messages`.
    MaxMessages,
    /// Batches leave full at `max_bytes`.
    MaxBytes,
    /// Batches leave at `max_wait`, not full.
    MaxWait,
    /// Statistics windows: one event per window (more when its groups exceed `max_bytes`).
    Window,
    /// The rate limit holds invocations below what shaping forms.
    RateLimit,
    /// No message reaches the rule.
    Nothing,
}

impl Limit {
    /// A short name for scripts (`--json`).
    pub fn key(self) -> &'static str {
        match self {
            Limit::PerMessage => "per_message",
            Limit::MaxMessages => "max_messages",
            Limit::MaxBytes => "max_bytes",
            Limit::MaxWait => "max_wait",
            Limit::Window => "window",
            Limit::RateLimit => "rate_limit",
            Limit::Nothing => "no_messages",
        }
    }
}

/// One rule's rates through its shaping, per second.
#[derive(Debug, Clone, PartialEq)]
pub struct Flow {
    /// Messages reaching the rule.
    pub matched: f64,
    /// Messages its filter keeps.
    pub kept: f64,
    /// Messages its throttle passes.
    pub passed: f64,
    /// Average messages per event.
    pub per_event: f64,
    /// Events its batching or windows form.
    pub events: f64,
    /// Invocations, after its rate limit.
    pub invocations: f64,
    /// What decided `invocations`.
    pub limit: Limit,
    /// Messages per second the rule cannot deliver at its rate limit (its buffer grows).
    pub behind: f64,
}

impl Flow {
    /// Invocations in a 30-day month.
    pub fn per_month(&self) -> f64 {
        self.invocations * SECONDS_PER_MONTH
    }
}

/// The streams of `streams` that reach a rule with topic filter `filter` (a shared
/// subscription's filter is its `<filter>`), and the topics of those that reach it only partly
/// (a rate filter overlapping the rule's without being inside it), which are not counted.
pub fn reaching(filter: &str, streams: &[Stream]) -> (Vec<Stream>, Vec<String>) {
    let filter = rules::match_filter(filter);
    let (mut whole, mut partly) = (Vec::new(), Vec::new());
    for stream in streams {
        if covers(filter, &stream.topic) {
            whole.push(stream.clone());
        } else if rules::overlap(filter, &stream.topic) {
            partly.push(stream.topic.clone());
        }
    }
    (whole, partly)
}

/// Whether every topic that `inner` (a topic or a filter) stands for matches `filter`.
fn covers(filter: &str, inner: &str) -> bool {
    if !inner.contains(['+', '#']) {
        return rules::matches(filter, inner);
    }
    if inner.starts_with(['+', '#']) && filter.starts_with('$') {
        return false;
    }
    let mut outer_levels = filter.split('/');
    let mut inner_levels = inner.split('/');
    loop {
        match (outer_levels.next(), inner_levels.next()) {
            (Some("#"), _) | (None, None) => return true,
            (Some("+"), Some(level)) if level != "#" => {}
            (Some(a), Some(b)) if a == b && b != "+" && b != "#" => {}
            _ => return false,
        }
    }
}

/// The rates of one rule's `streams` (those that reach it) through its plan.
pub fn flow(plan: &RulePlan, streams: &[Stream], assume: &Assumptions) -> Flow {
    let matched = total(streams.iter().map(|s| s.per_second));
    let kept = matched * assume.keep;
    let topics = throttled(plan, &topics(streams, assume), assume);
    let passed = total(topics.iter().map(|(_, r)| *r));
    let (per_event, events, limit, capacity) = match &plan.aggregate {
        Some(spec) => windows(plan, spec, &topics, assume),
        None => batches(plan, streams, passed, assume),
    };
    let mut flow = Flow {
        matched,
        kept,
        passed,
        per_event,
        events,
        invocations: events,
        limit,
        behind: 0.0,
    };
    if passed <= 0.0 {
        flow.limit = Limit::Nothing;
        return flow;
    }
    if let Some((limit, _)) = plan.rate_limit
        && limit < events
    {
        flow.invocations = limit;
        flow.limit = Limit::RateLimit;
        flow.behind = (passed - limit * capacity).max(0.0);
    }
    flow
}

/// The sum of `rates`; 0 (not the -0 of `Iterator::sum`) when there are none.
pub fn total(rates: impl Iterator<Item = f64>) -> f64 {
    rates.fold(0.0, |a, b| a + b)
}

/// Each topic's kept rate: one per stream, or `assume.topics` topics sharing the total evenly.
fn topics(streams: &[Stream], assume: &Assumptions) -> Vec<(String, f64)> {
    let kept = |r: f64| r * assume.keep;
    match assume.topics {
        Some(n) if n > 0 => {
            let all = total(streams.iter().map(|s| kept(s.per_second)));
            let base = streams.first().map_or("", |s| s.topic.as_str());
            (0..n)
                .map(|i| (format!("{base}/{i}"), all / n as f64))
                .collect()
        }
        _ => streams
            .iter()
            .map(|s| (s.topic.clone(), kept(s.per_second)))
            .collect(),
    }
}

/// Each topic's rate after the rule's throttle.
fn throttled(
    plan: &RulePlan,
    topics: &[(String, f64)],
    assume: &Assumptions,
) -> Vec<(String, f64)> {
    let Some(spec) = &plan.throttle else {
        return topics.to_vec();
    };
    let changing = spec.only_changes || spec.deadband.is_some();
    let change = match assume.changes {
        Some(c) if changing => c,
        _ => 1.0,
    };
    let ceiling = spec
        .min_interval_ms
        .filter(|ms| *ms > 0)
        .map_or(f64::INFINITY, |ms| 1000.0 / ms as f64);
    topics
        .iter()
        .map(|(topic, r)| (topic.clone(), (r * change).min(ceiling)))
        .collect()
}

/// Batching: (messages per event, events per second, what decided them, most messages an
/// event can carry).
fn batches(
    plan: &RulePlan,
    streams: &[Stream],
    rate: f64,
    assume: &Assumptions,
) -> (f64, f64, Limit, f64) {
    let by_count = plan.max_messages.max(1) as f64;
    if plan.max_messages <= 1 {
        return (1.0, rate, Limit::PerMessage, 1.0);
    }
    let topic = streams.first().map_or("t", |s| s.topic.as_str());
    let message = envelope::encoded_message_len(&sample_message(topic, assume.message_bytes));
    let room = plan.max_bytes + 1 - envelope::envelope_overhead(&plan.name).min(plan.max_bytes);
    let by_bytes = ((room / message.max(1)) as f64).max(1.0);
    let by_wait = 1.0 + rate * plan.max_wait.as_secs_f64();
    let full = by_count.min(by_bytes);
    let (n, limit) = if by_wait < full {
        (by_wait, Limit::MaxWait)
    } else if by_bytes < by_count {
        (by_bytes, Limit::MaxBytes)
    } else {
        (by_count, Limit::MaxMessages)
    };
    (n, rate / n, limit, full)
}

/// Statistics windows: (messages per event, events per second, [`Limit::Window`], messages
/// an event carries).
fn windows(
    plan: &RulePlan,
    spec: &AggregateSpec,
    topics: &[(String, f64)],
    assume: &Assumptions,
) -> (f64, f64, Limit, f64) {
    let window = spec.window_ms as f64 / 1000.0;
    let rate = total(topics.iter().map(|(_, r)| *r));
    let groups = group_rates(&spec.group_by, topics, assume.topics.is_some());
    // A group quieter than one message per window is in a window only part of the time.
    let active = total(groups.iter().map(|r| (r * window).min(1.0)));
    let windows_per_second = rate.min(1.0 / window);
    let chunks = window_chunks(plan, spec, topics, active);
    let events = windows_per_second * chunks;
    let per_event = if events > 0.0 { rate / events } else { 0.0 };
    (per_event, events, Limit::Window, per_event)
}

/// The rate of each group a window forms, by the rule's `group_by`. With `synthetic` topics
/// (`--topics N`), each stands for a group of its own unless everything is one group.
fn group_rates(group_by: &GroupBy, topics: &[(String, f64)], synthetic: bool) -> Vec<f64> {
    let key = |topic: &str| match group_by {
        GroupBy::Topic => topic.to_owned(),
        GroupBy::None => String::new(),
        GroupBy::Level(_) if synthetic => topic.to_owned(),
        GroupBy::Level(n) => topic.split('/').nth(n - 1).unwrap_or("").to_owned(),
    };
    let mut groups: BTreeMap<String, f64> = BTreeMap::new();
    for (topic, rate) in topics {
        *groups.entry(key(topic)).or_default() += rate;
    }
    groups.into_values().collect()
}

/// How many events one window with `groups` active groups takes: its groups are split across
/// events only when they exceed `max_bytes` (sizes from the daemon's own window event).
fn window_chunks(
    plan: &RulePlan,
    spec: &AggregateSpec,
    topics: &[(String, f64)],
    groups: f64,
) -> f64 {
    let key = topics.first().map_or("t", |(t, _)| t.as_str());
    let size = |n: usize| {
        let window = sample_window(spec, key, n);
        serde_json::to_vec(&window.to_event(&plan.name, spec)).map_or(0, |v| v.len())
    };
    let empty = size(0);
    let group = size(1).saturating_sub(empty) + 1;
    let room = plan.max_bytes.saturating_sub(empty).max(group);
    let per_event = (room / group).max(1) as f64;
    (groups / per_event).ceil().max(1.0)
}

/// A window with `n` groups keyed like `key`, each with every field seen once.
fn sample_window(spec: &AggregateSpec, key: &str, n: usize) -> Window {
    let field = FieldStats {
        count: 1,
        skipped: 0,
        min: 21.5,
        max: 21.5,
        sum: 21.5,
        first: 21.5,
        last: 21.5,
    };
    let group = Group {
        messages: 1,
        fields: vec![field; spec.fields.len()],
    };
    Window {
        start_ms: 0,
        end_ms: spec.window_ms,
        groups: (0..n)
            .map(|i| (format!("{key}{i}"), group.clone()))
            .collect(),
        last_seq: 0,
        first_seq: 0,
        messages: n as u64,
    }
}

/// A message on `topic` whose payload is `bytes` bytes of JSON (a string), which travels in the
/// event verbatim as most sensor payloads do.
fn sample_message(topic: &str, bytes: usize) -> Message {
    let payload = if bytes >= 2 {
        let mut text = vec![b'a'; bytes];
        text[0] = b'"';
        text[bytes - 1] = b'"';
        text
    } else {
        vec![b'1'; bytes]
    };
    Message::received(topic.to_owned(), payload, 1, false, UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::config::RuleConfig;

    /// The plan of a rule with topic `t/#` and the extra keys of `extra` (TOML).
    fn plan(extra: &str) -> RulePlan {
        let text = format!("name = \"r\"\ntopic = \"t/#\"\nfunction = \"f\"\n{extra}");
        use figment::providers::{Format, Toml};
        let rule: RuleConfig = figment::Figment::from(Toml::string(&text))
            .extract()
            .expect("rule");
        RulePlan::from_config(&rule)
    }

    fn one(topic: &str, per_second: f64) -> Vec<Stream> {
        vec![Stream {
            topic: topic.into(),
            per_second,
        }]
    }

    fn month(plan: &RulePlan, streams: &[Stream], assume: &Assumptions) -> f64 {
        flow(plan, streams, assume).per_month().round()
    }

    #[test]
    fn one_message_per_invocation_at_10_per_second_is_25_920_000_a_month() {
        let f = flow(&plan(""), &one("t/a", 10.0), &Assumptions::default());
        assert_eq!(f.per_month().round(), 25_920_000.0);
        assert_eq!(f.limit, Limit::PerMessage);
    }

    #[test]
    fn a_rate_limit_of_2_per_second_caps_it_at_5_184_000_and_says_how_far_behind() {
        let p = plan("[rate_limit]\ninvocations_per_second = 2.0\n");
        let f = flow(&p, &one("t/a", 10.0), &Assumptions::default());
        assert_eq!(f.per_month().round(), 5_184_000.0);
        assert_eq!((f.limit, f.behind), (Limit::RateLimit, 8.0));
        // Batches of up to 10 absorb the difference: capped, but not behind.
        let p = plan(
            "[rate_limit]\ninvocations_per_second = 2.0\n[batch]\nmax_messages = 10\nmax_wait = \"0s\"\n",
        );
        let f = flow(&p, &one("t/a", 10.0), &Assumptions::default());
        assert_eq!((f.per_month().round(), f.behind), (5_184_000.0, 0.0));
    }

    #[test]
    fn a_thousand_per_second_in_batches_of_100_is_25_920_000() {
        let p = plan("[batch]\nmax_messages = 100\n");
        let f = flow(&p, &one("t/a", 1000.0), &Assumptions::default());
        assert_eq!(f.per_month().round(), 25_920_000.0);
        assert_eq!((f.limit, f.per_event), (Limit::MaxMessages, 100.0));
    }

    #[test]
    fn max_wait_decides_at_a_low_rate() {
        // 2/s with max_wait 5s: a batch is its first message and the 10 arriving in 5 s.
        let p = plan("[batch]\nmax_messages = 100\nmax_wait = \"5s\"\n");
        let f = flow(&p, &one("t/a", 2.0), &Assumptions::default());
        assert_eq!((f.limit, f.per_event), (Limit::MaxWait, 11.0));
        assert_eq!(
            f.per_month().round(),
            (2.0 / 11.0 * SECONDS_PER_MONTH).round()
        );
        // Without max_wait every message leaves alone.
        let p = plan("[batch]\nmax_messages = 100\nmax_wait = \"0s\"\n");
        let f = flow(&p, &one("t/a", 2.0), &Assumptions::default());
        assert_eq!((f.per_event, f.invocations), (1.0, 2.0));
    }

    #[test]
    fn max_bytes_decides_with_big_messages() {
        let p = plan("[batch]\nmax_messages = 100\n");
        let big = Assumptions {
            message_bytes: 100 * 1024,
            ..Assumptions::default()
        };
        // 1 MiB less the SDK's headroom holds ten 100 KiB messages with their fields.
        let f = flow(&p, &one("t/a", 100.0), &big);
        assert_eq!((f.limit, f.per_event), (Limit::MaxBytes, 10.0));
        assert_eq!(f.per_month().round(), 25_920_000.0);
        let p = plan("[batch]\nmax_messages = 100\nmax_bytes = \"10KiB\"\n");
        let small = Assumptions {
            message_bytes: 1000,
            ..Assumptions::default()
        };
        let f = flow(&p, &one("t/a", 100.0), &small);
        assert_eq!((f.limit, f.per_event), (Limit::MaxBytes, 9.0));
    }

    #[test]
    fn a_window_sends_one_event_per_window_whatever_the_groups() {
        let p = plan("[aggregate]\nwindow = \"60s\"\nfields = [\"/t\"]\n");
        let streams: Vec<Stream> = (0..3).flat_map(|i| one(&format!("t/{i}"), 1.0)).collect();
        let f = flow(&p, &streams, &Assumptions::default());
        assert_eq!(f.limit, Limit::Window);
        assert_eq!(f.per_month().round(), 43_200.0);
        assert_eq!(f.per_event, 180.0);
        // A rate below one message per window: one event per message.
        let f = flow(&p, &one("t/a", 0.01), &Assumptions::default());
        assert_eq!(f.per_month().round(), (0.01 * SECONDS_PER_MONTH).round());
    }

    #[test]
    fn a_window_whose_groups_exceed_max_bytes_is_split() {
        let p = plan("[aggregate]\nwindow = \"60s\"\nfields = [\"/temperature\", \"/humidity\"]\n");
        let many = Assumptions {
            topics: Some(20_000),
            ..Assumptions::default()
        };
        let f = flow(&p, &one("sensors/+/climate", 20_000.0), &many);
        // 20,000 groups of about 330 bytes: 7 events of at most 1 MiB per window.
        let chunks = f.events * 60.0;
        assert!((6.0..=8.0).contains(&chunks.round()), "{chunks}");
        let none = plan(
            "[aggregate]\nwindow = \"60s\"\nfields = [\"/temperature\"]\ngroup_by = \"none\"\n",
        );
        let f = flow(&none, &one("sensors/+/climate", 20_000.0), &many);
        assert_eq!(f.per_month().round(), 43_200.0);
    }

    #[test]
    fn min_interval_keeps_one_per_topic_per_interval() {
        let p = plan("[throttle]\nmin_interval = \"10s\"\n");
        let streams: Vec<Stream> = (0..5).flat_map(|i| one(&format!("t/{i}"), 1.0)).collect();
        let f = flow(&p, &streams, &Assumptions::default());
        assert_eq!(f.passed, 0.5);
        assert_eq!(f.per_month().round(), 1_296_000.0);
        // The same total on one topic: one message per 10 s.
        let f = flow(&p, &one("t/a", 5.0), &Assumptions::default());
        assert_eq!(f.passed, 0.1);
        // Spread over --topics 50: 0.1/s each, one per 10 s each: 5/s... capped at 0.1 each.
        let fifty = Assumptions {
            topics: Some(50),
            ..Assumptions::default()
        };
        let f = flow(&p, &one("t/+", 5.0), &fifty);
        assert!((f.passed - 5.0).abs() < 1e-9, "{}", f.passed);
    }

    #[test]
    fn only_changes_drops_nothing_unless_a_change_fraction_is_given() {
        let p = plan("[throttle]\nonly_changes = true\n");
        let assume = Assumptions::default();
        assert_eq!(month(&p, &one("t/a", 10.0), &assume), 25_920_000.0);
        let tenth = Assumptions {
            changes: Some(0.1),
            ..Assumptions::default()
        };
        assert_eq!(month(&p, &one("t/a", 10.0), &tenth), 2_592_000.0);
        // A change fraction means nothing to a rule that does not throttle on changes.
        assert_eq!(month(&plan(""), &one("t/a", 10.0), &tenth), 25_920_000.0);
    }

    #[test]
    fn the_keep_fraction_applies_before_everything_else() {
        let p = plan("[rate_limit]\ninvocations_per_second = 2.0\n");
        let tenth = Assumptions {
            keep: 0.1,
            ..Assumptions::default()
        };
        let f = flow(&p, &one("t/a", 10.0), &tenth);
        assert_eq!((f.matched, f.kept, f.invocations), (10.0, 1.0, 1.0));
        assert_eq!(f.limit, Limit::PerMessage);
        let none = Assumptions {
            keep: 0.0,
            ..Assumptions::default()
        };
        let f = flow(&p, &one("t/a", 10.0), &none);
        assert_eq!((f.invocations, f.limit), (0.0, Limit::Nothing));
    }

    #[test]
    fn rates_reach_rules_whose_filter_covers_their_topic() {
        let streams = [
            Stream {
                topic: "sensors/a/temp".into(),
                per_second: 1.0,
            },
            Stream {
                topic: "sensors/+/temp".into(),
                per_second: 2.0,
            },
            Stream {
                topic: "sensors/#".into(),
                per_second: 4.0,
            },
            Stream {
                topic: "other".into(),
                per_second: 8.0,
            },
        ];
        let total = |filter: &str| {
            let (whole, partly) = reaching(filter, &streams);
            (whole.iter().map(|s| s.per_second).sum::<f64>(), partly)
        };
        assert_eq!(total("sensors/#"), (7.0, vec![]));
        assert_eq!(total("sensors/+/temp"), (3.0, vec!["sensors/#".to_owned()]));
        assert_eq!(
            total("sensors/a/temp"),
            (
                1.0,
                vec!["sensors/+/temp".to_owned(), "sensors/#".to_owned()]
            )
        );
        assert_eq!(total("$share/g/sensors/+/temp").0, 3.0);
        assert_eq!(total("#").0, 15.0);
        assert_eq!(total("sensors/+").0, 0.0);
    }
}
