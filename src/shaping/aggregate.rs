//! Statistics windows: tumbling windows that summarize numeric fields instead of forwarding
//! messages. Pure: messages and times in, closed windows out.
//!
//! A message belongs to the window containing its `received_at` (not the time it is read), so a
//! backlog replayed after an outage yields the same windows as live traffic. Messages come from
//! the rule's queue in arrival order; a window closes when a message of a later window is read,
//! or when the clock passes its end and nothing more can arrive for it. A message whose
//! `received_at` is before the open window (a clock step backwards) counts in the open window.
//!
//! The event of a closed window (documented in the README):
//!
//! ```json
//! {"rule": "r",
//!  "window": {"start": "2026-11-27T10:15:00.000Z", "end": "2026-11-27T10:16:00.000Z"},
//!  "groups": [{"group": "sensors/dev1/temperature", "messages": 12,
//!              "fields": {"/temperature": {"count": 11, "skipped": 1, "min": 20.5, "max": 22.0,
//!                                          "mean": 21.2, "sum": 233.2, "first": 20.5, "last": 21.9}}}]}
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use crate::core::envelope::Message;
use crate::core::envelope::Seq;

pub use crate::core::config::GroupBy;

impl GroupBy {
    fn key(&self, topic: &str) -> String {
        match self {
            GroupBy::Topic => topic.to_owned(),
            GroupBy::None => String::new(),
            GroupBy::Level(n) => topic.split('/').nth(n - 1).unwrap_or("").to_owned(),
        }
    }
}

/// What to aggregate.
#[derive(Debug, Clone)]
pub struct AggregateSpec {
    /// Window length in milliseconds (at least 1).
    pub window_ms: u64,
    /// JSON pointers of the numeric fields.
    pub fields: Vec<String>,
    /// Grouping inside a window.
    pub group_by: GroupBy,
}

/// Running statistics of one field in one group.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldStats {
    /// Numbers seen.
    pub count: u64,
    /// Messages without the field, or with a non-number there.
    pub skipped: u64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// Total.
    pub sum: f64,
    /// First seen.
    pub first: f64,
    /// Last seen.
    pub last: f64,
}

impl FieldStats {
    fn add(&mut self, x: f64) {
        if self.count == 0 {
            self.min = x;
            self.max = x;
            self.first = x;
        } else {
            self.min = self.min.min(x);
            self.max = self.max.max(x);
        }
        self.last = x;
        self.sum += x;
        self.count += 1;
    }

    fn to_json(&self) -> Value {
        if self.count == 0 {
            return json!({"count": 0, "skipped": self.skipped});
        }
        json!({
            "count": self.count,
            "skipped": self.skipped,
            "min": self.min,
            "max": self.max,
            "mean": self.sum / self.count as f64,
            "sum": self.sum,
            "first": self.first,
            "last": self.last,
        })
    }
}

/// One group's statistics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Group {
    /// Messages in the group.
    pub messages: u64,
    /// Per field, in the order of `AggregateSpec::fields`.
    pub fields: Vec<FieldStats>,
}

/// A window, open or closed.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// Start, ms since the epoch (inclusive).
    pub start_ms: u64,
    /// End, ms since the epoch (exclusive).
    pub end_ms: u64,
    /// Groups by key.
    pub groups: BTreeMap<String, Group>,
    /// Highest queue sequence counted in this window: acknowledging through it releases the
    /// window's messages.
    pub last_seq: Seq,
    /// Lowest queue sequence counted in this window: the queue is not acknowledged past it
    /// while the window is open.
    pub first_seq: Seq,
    /// Messages counted.
    pub messages: u64,
}

impl Window {
    /// The event for this window (see the module docs).
    pub fn to_event(&self, rule: &str, spec: &AggregateSpec) -> Value {
        let at = |ms: u64| {
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        };
        let groups: Vec<Value> = self
            .groups
            .iter()
            .map(|(key, group)| {
                let mut fields = Map::new();
                for (name, stats) in spec.fields.iter().zip(&group.fields) {
                    fields.insert(name.clone(), stats.to_json());
                }
                json!({"group": key, "messages": group.messages, "fields": fields})
            })
            .collect();
        json!({
            "rule": rule,
            "window": {"start": at(self.start_ms), "end": at(self.end_ms)},
            "groups": groups,
        })
    }
}

/// Feeds messages into tumbling windows.
#[derive(Debug, Clone)]
pub struct Aggregator {
    spec: AggregateSpec,
    open: Option<Window>,
}

impl Aggregator {
    /// No window open yet.
    pub fn new(spec: AggregateSpec) -> Self {
        Aggregator { spec, open: None }
    }

    /// The spec it aggregates by.
    pub fn spec(&self) -> &AggregateSpec {
        &self.spec
    }

    /// Whether a window is open.
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Lowest sequence in the open window.
    pub fn open_first_seq(&self) -> Option<Seq> {
        self.open.as_ref().map(|w| w.first_seq)
    }

    /// End of the open window, ms since the epoch.
    pub fn open_until_ms(&self) -> Option<u64> {
        self.open.as_ref().map(|w| w.end_ms)
    }

    /// Counts `message` (queue sequence `seq`); returns the previous window when this message
    /// starts a later one.
    pub fn push(&mut self, seq: Seq, message: &Message) -> Option<Window> {
        let at = message.received_at_ms();
        let window = self.spec.window_ms.max(1);
        let closed = match &self.open {
            Some(open) if at >= open.end_ms => self.open.take(),
            _ => None,
        };
        let open = self.open.get_or_insert_with(|| {
            let start_ms = at - at % window;
            Window {
                start_ms,
                end_ms: start_ms + window,
                groups: BTreeMap::new(),
                last_seq: seq,
                first_seq: seq,
                messages: 0,
            }
        });
        let key = self.spec.group_by.key(&message.topic);
        let group = open.groups.entry(key).or_insert_with(|| Group {
            messages: 0,
            fields: vec![FieldStats::default(); self.spec.fields.len()],
        });
        group.messages += 1;
        let parsed: Option<Value> = serde_json::from_slice(&message.payload).ok();
        for (pointer, stats) in self.spec.fields.iter().zip(group.fields.iter_mut()) {
            match parsed
                .as_ref()
                .and_then(|v| v.pointer(pointer))
                .and_then(Value::as_f64)
            {
                Some(x) if x.is_finite() => stats.add(x),
                _ => stats.skipped += 1,
            }
        }
        open.last_seq = open.last_seq.max(seq);
        open.first_seq = open.first_seq.min(seq);
        open.messages += 1;
        closed
    }

    /// Closes the open window once `now_ms` has passed its end by `grace_ms` (time for the last
    /// messages of the window to be buffered and read).
    pub fn close_due(&mut self, now_ms: u64, grace_ms: u64) -> Option<Window> {
        match &self.open {
            Some(w) if now_ms >= w.end_ms + grace_ms => self.open.take(),
            _ => None,
        }
    }

    /// Closes the open window whatever the time (shutdown).
    pub fn close_now(&mut self) -> Option<Window> {
        self.open.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn msg(topic: &str, payload: &str, at_ms: u64) -> Message {
        Message::received(
            topic.into(),
            payload.as_bytes().to_vec(),
            1,
            false,
            UNIX_EPOCH + Duration::from_millis(at_ms),
        )
    }

    fn spec(group_by: GroupBy) -> AggregateSpec {
        AggregateSpec {
            window_ms: 60_000,
            fields: vec!["/temperature".into(), "/env/humidity".into()],
            group_by,
        }
    }

    #[test]
    fn a_window_over_known_values_gives_exact_statistics() {
        let mut agg = Aggregator::new(spec(GroupBy::Topic));
        let t0 = 1_795_774_500_000; // a minute boundary
        let values = [21.0, 19.5, 23.25, 20.25];
        for (i, v) in values.iter().enumerate() {
            let payload = format!(
                r#"{{"temperature": {v}, "env": {{"humidity": {}}}}}"#,
                40 + i
            );
            assert!(
                agg.push(i as Seq, &msg("s/d1/t", &payload, t0 + i as u64 * 1000))
                    .is_none()
            );
        }
        agg.push(4, &msg("s/d1/t", r#"{"temperature": "warm"}"#, t0 + 5000));
        agg.push(5, &msg("s/d1/t", "not json", t0 + 6000));
        let w = agg
            .push(6, &msg("s/d1/t", r#"{"temperature": 1}"#, t0 + 60_000))
            .expect("closed");
        assert_eq!(
            (w.start_ms, w.end_ms, w.last_seq, w.messages),
            (t0, t0 + 60_000, 5, 6)
        );
        let g = &w.groups["s/d1/t"];
        assert_eq!(g.messages, 6);
        let t = &g.fields[0];
        assert_eq!((t.count, t.skipped), (4, 2));
        assert_eq!(
            (t.min, t.max, t.sum, t.first, t.last),
            (19.5, 23.25, 84.0, 21.0, 20.25)
        );
        let h = &g.fields[1];
        assert_eq!((h.count, h.skipped, h.min, h.max), (4, 2, 40.0, 43.0));
        let event = w.to_event("r", agg.spec());
        assert_eq!(
            event["groups"][0]["fields"]["/temperature"]["mean"],
            json!(21.0)
        );
        assert_eq!(event["window"]["start"], json!("2026-11-27T10:15:00.000Z"));
        assert_eq!(event["window"]["end"], json!("2026-11-27T10:16:00.000Z"));
        assert!(event.get("messages").is_none());
    }

    #[test]
    fn window_boundaries_follow_received_at() {
        let mut agg = Aggregator::new(spec(GroupBy::None));
        let t0 = 1_795_774_500_000;
        assert!(agg.push(0, &msg("a", "{}", t0 + 59_999)).is_none());
        let w = agg
            .push(1, &msg("a", "{}", t0 + 60_000))
            .expect("next window closes the first");
        assert_eq!(w.start_ms, t0);
        assert_eq!(agg.open_until_ms(), Some(t0 + 120_000));
        // A message from the past (clock stepped back) counts in the open window.
        assert!(agg.push(2, &msg("a", "{}", t0)).is_none());
        assert_eq!(agg.close_due(t0 + 120_000, 2000), None);
        let w = agg.close_due(t0 + 122_000, 2000).expect("due");
        assert_eq!((w.messages, w.last_seq), (2, 2));
        assert!(!agg.is_open());
    }

    #[test]
    fn groups_by_topic_level_or_not_at_all() {
        let t0 = 1_795_774_500_000;
        for (group_by, expected) in [
            (GroupBy::Level(2), vec!["dev1", "dev2"]),
            (GroupBy::None, vec![""]),
            (GroupBy::Topic, vec!["s/dev1/t", "s/dev2/t"]),
        ] {
            let mut agg = Aggregator::new(spec(group_by));
            agg.push(0, &msg("s/dev1/t", r#"{"temperature":1}"#, t0));
            agg.push(1, &msg("s/dev2/t", r#"{"temperature":2}"#, t0));
            agg.push(2, &msg("s/dev1/t", r#"{"temperature":3}"#, t0));
            let w = agg.close_now().expect("open");
            assert_eq!(w.groups.keys().cloned().collect::<Vec<_>>(), expected);
        }
    }

    #[test]
    fn group_by_is_parsed_with_clear_errors() {
        assert_eq!(GroupBy::parse("level:2"), Ok(GroupBy::Level(2)));
        assert!(GroupBy::parse("level:0").is_err());
        assert!(GroupBy::parse("device").unwrap_err().contains("level:N"));
        let _ = SystemTime::now();
    }
}
