//! Throttling noisy sources, per topic: pure decisions on each message, by its `received_at`.
//!
//! - `only_changes`: a payload identical to the last one passed for its topic is dropped.
//! - `deadband`: a message whose field moved less than the deadband since the last passed value
//!   for its topic is dropped (a message without the number passes).
//! - `min_interval` with `keep = "first"`: after a message passes, others from its topic are
//!   dropped until `min_interval` has passed.
//! - `min_interval` with `keep = "latest"`: time is cut into slots of `min_interval`; of each
//!   topic's messages in a slot only the last is kept. It is held until a later message of its
//!   topic arrives or the slot is over, then passes; the ones it replaced are dropped.
//!
//! Every drop is reported with its reason so the rule can count it.

use std::collections::HashMap;

use serde_json::Value;

use crate::envelope::Message;
use crate::queue::Entry;

/// Which message of an interval `min_interval` keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The first; later ones in the interval are dropped.
    First,
    /// The last; it waits for the interval to end.
    Latest,
}

/// The throttle settings of a rule.
#[derive(Debug, Clone)]
pub struct ThrottleSpec {
    /// At most one message per topic per this many ms.
    pub min_interval_ms: Option<u64>,
    /// Which one.
    pub keep: Keep,
    /// Drop payloads identical to the last passed one.
    pub only_changes: bool,
    /// JSON pointer and minimum change.
    pub deadband: Option<(String, f64)>,
}

/// Why a message was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Within `min_interval` of a kept message.
    MinInterval,
    /// Identical to the last payload.
    Unchanged,
    /// Inside the deadband.
    Deadband,
}

impl DropReason {
    /// The name used in logs and counters.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::MinInterval => "min_interval",
            DropReason::Unchanged => "only_changes",
            DropReason::Deadband => "deadband",
        }
    }
}

#[derive(Debug, Default)]
struct TopicState {
    /// Payload of the last message passed.
    last_payload: Option<Vec<u8>>,
    /// Deadband field of the last message passed.
    last_value: Option<f64>,
    /// received_at of the last message passed (`keep = first`).
    last_passed_ms: Option<u64>,
    /// The message held for its slot (`keep = latest`) and the slot's end.
    held: Option<(Entry, u64)>,
}

/// What the throttle did with one message.
#[derive(Debug, PartialEq)]
pub struct Outcome {
    /// Messages that pass now, in order (a held one may come out ahead of the new one).
    pub pass: Vec<Entry>,
    /// Messages dropped, with why.
    pub dropped: Vec<(Entry, DropReason)>,
}

/// Per-topic throttle state of one rule.
#[derive(Debug)]
pub struct Throttle {
    spec: ThrottleSpec,
    topics: HashMap<String, TopicState>,
}

impl Throttle {
    /// Nothing seen yet.
    pub fn new(spec: ThrottleSpec) -> Self {
        Throttle {
            spec,
            topics: HashMap::new(),
        }
    }

    fn value(&self, message: &Message) -> Option<f64> {
        let (pointer, _) = self.spec.deadband.as_ref()?;
        serde_json::from_slice::<Value>(&message.payload)
            .ok()?
            .pointer(pointer)?
            .as_f64()
    }

    /// Filters against the last passed message of the topic (only_changes, deadband).
    fn unchanged(&self, state: &TopicState, entry: &Entry) -> Option<DropReason> {
        if self.spec.only_changes
            && state.last_payload.as_deref() == Some(&entry.message.payload[..])
        {
            return Some(DropReason::Unchanged);
        }
        if let (Some((_, band)), Some(last), Some(now)) = (
            &self.spec.deadband,
            state.last_value,
            self.value(&entry.message),
        ) && (now - last).abs() < *band
        {
            return Some(DropReason::Deadband);
        }
        None
    }

    fn mark_passed(&self, state: &mut TopicState, entry: &Entry) {
        if self.spec.only_changes {
            state.last_payload = Some(entry.message.payload.clone());
        }
        if let Some(v) = self.value(&entry.message) {
            state.last_value = Some(v);
        }
        state.last_passed_ms = Some(entry.message.received_at_ms());
    }

    /// Decides on one message.
    pub fn push(&mut self, entry: Entry) -> Outcome {
        let mut outcome = Outcome {
            pass: Vec::new(),
            dropped: Vec::new(),
        };
        let topic = entry.message.topic.clone();
        let mut state = self.topics.remove(&topic).unwrap_or_default();
        let at = entry.message.received_at_ms();
        match (self.spec.min_interval_ms, self.spec.keep) {
            (Some(interval), Keep::Latest) => {
                let interval = interval.max(1);
                let slot_end = at - at % interval + interval;
                match state.held.take() {
                    Some((held, end)) if at < end => {
                        outcome.dropped.push((held, DropReason::MinInterval));
                    }
                    Some((held, _)) => self.release(&mut state, held, &mut outcome),
                    None => {}
                }
                state.held = Some((entry, slot_end));
            }
            (Some(interval), Keep::First) => {
                let within = state
                    .last_passed_ms
                    .is_some_and(|last| at < last + interval);
                if within {
                    outcome.dropped.push((entry, DropReason::MinInterval));
                } else {
                    self.release(&mut state, entry, &mut outcome);
                }
            }
            (None, _) => self.release(&mut state, entry, &mut outcome),
        }
        self.topics.insert(topic, state);
        outcome
    }

    /// Passes `entry` unless only_changes or the deadband drop it.
    fn release(&self, state: &mut TopicState, entry: Entry, outcome: &mut Outcome) {
        match self.unchanged(state, &entry) {
            Some(reason) => outcome.dropped.push((entry, reason)),
            None => {
                self.mark_passed(state, &entry);
                outcome.pass.push(entry);
            }
        }
    }

    /// Releases held messages whose slot ended by `now_ms` (or all of them with `u64::MAX`).
    pub fn release_due(&mut self, now_ms: u64) -> Outcome {
        let mut outcome = Outcome {
            pass: Vec::new(),
            dropped: Vec::new(),
        };
        let due: Vec<String> = self
            .topics
            .iter()
            .filter(|(_, s)| s.held.as_ref().is_some_and(|(_, end)| *end <= now_ms))
            .map(|(t, _)| t.clone())
            .collect();
        let mut released: Vec<Entry> = Vec::new();
        for topic in due {
            if let Some(mut state) = self.topics.remove(&topic) {
                if let Some((held, _)) = state.held.take() {
                    let mut one = Outcome {
                        pass: Vec::new(),
                        dropped: Vec::new(),
                    };
                    self.release(&mut state, held, &mut one);
                    released.extend(one.pass);
                    outcome.dropped.extend(one.dropped);
                }
                self.topics.insert(topic, state);
            }
        }
        released.sort_by_key(|e| e.seq);
        outcome.pass = released;
        outcome
    }

    /// The lowest sequence still held: the queue must not be acknowledged at or past it.
    pub fn lowest_held(&self) -> Option<u64> {
        self.topics
            .values()
            .filter_map(|s| s.held.as_ref().map(|(e, _)| e.seq))
            .min()
    }

    /// When the next held message falls due, ms since the epoch.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.topics
            .values()
            .filter_map(|s| s.held.as_ref().map(|(_, end)| *end))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn entry(seq: u64, topic: &str, payload: &str, at_ms: u64) -> Entry {
        Entry {
            seq,
            message: Message::received(
                topic.into(),
                payload.as_bytes().to_vec(),
                1,
                false,
                UNIX_EPOCH + Duration::from_millis(at_ms),
            ),
        }
    }

    fn spec() -> ThrottleSpec {
        ThrottleSpec {
            min_interval_ms: None,
            keep: Keep::First,
            only_changes: false,
            deadband: None,
        }
    }

    fn seqs(entries: &[Entry]) -> Vec<u64> {
        entries.iter().map(|e| e.seq).collect()
    }

    const T0: u64 = 1_795_774_500_000;

    #[test]
    fn keep_first_passes_one_per_interval_per_topic() {
        let mut t = Throttle::new(ThrottleSpec {
            min_interval_ms: Some(1000),
            ..spec()
        });
        let mut passed = Vec::new();
        let mut dropped = 0;
        for (seq, topic, at) in [
            (0, "a", 0),
            (1, "a", 500),
            (2, "b", 600),
            (3, "a", 999),
            (4, "a", 1000),
            (5, "b", 1500),
        ] {
            let out = t.push(entry(seq, topic, "x", T0 + at));
            passed.extend(seqs(&out.pass));
            dropped += out
                .dropped
                .iter()
                .filter(|(_, r)| *r == DropReason::MinInterval)
                .count();
        }
        assert_eq!(passed, vec![0, 2, 4]);
        assert_eq!(dropped, 3);
    }

    #[test]
    fn keep_latest_holds_the_last_of_each_slot() {
        let mut t = Throttle::new(ThrottleSpec {
            min_interval_ms: Some(1000),
            keep: Keep::Latest,
            ..spec()
        });
        assert!(t.push(entry(0, "a", "1", T0)).pass.is_empty());
        let out = t.push(entry(1, "a", "2", T0 + 400));
        assert_eq!(out.dropped.len(), 1, "the first is superseded");
        assert_eq!(t.lowest_held(), Some(1));
        let out = t.push(entry(2, "a", "3", T0 + 1200));
        assert_eq!(
            seqs(&out.pass),
            vec![1],
            "the slot's last comes out when the next slot starts"
        );
        assert_eq!(t.next_due_ms(), Some(T0 + 2000));
        assert!(t.release_due(T0 + 1999).pass.is_empty());
        assert_eq!(seqs(&t.release_due(T0 + 2000).pass), vec![2]);
        assert_eq!(t.lowest_held(), None);
    }

    #[test]
    fn only_changes_drops_repeated_payloads_per_topic() {
        let mut t = Throttle::new(ThrottleSpec {
            only_changes: true,
            ..spec()
        });
        let mut passed = Vec::new();
        for (seq, topic, payload) in [
            (0, "a", "on"),
            (1, "a", "on"),
            (2, "b", "on"),
            (3, "a", "off"),
            (4, "a", "on"),
            (5, "a", "on"),
        ] {
            let out = t.push(entry(seq, topic, payload, T0 + seq));
            passed.extend(seqs(&out.pass));
            assert!(out.dropped.iter().all(|(_, r)| *r == DropReason::Unchanged));
        }
        assert_eq!(passed, vec![0, 2, 3, 4]);
    }

    #[test]
    fn deadband_drops_small_moves_and_passes_messages_without_the_field() {
        let mut t = Throttle::new(ThrottleSpec {
            deadband: Some(("/t".into(), 0.5)),
            ..spec()
        });
        let mut passed = Vec::new();
        for (seq, payload) in [
            (0, r#"{"t":20.0}"#),
            (1, r#"{"t":20.4}"#),
            (2, r#"{"t":20.5}"#),
            (3, r#"{"t":20.2}"#),
            (4, "no number"),
            (5, r#"{"t":19.9}"#),
        ] {
            let out = t.push(entry(seq, "a", payload, T0 + seq));
            passed.extend(seqs(&out.pass));
        }
        assert_eq!(passed, vec![0, 2, 4, 5]);
    }
}
