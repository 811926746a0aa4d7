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
//!
//! # Bounded state
//!
//! Topics often carry device ids or timestamps, so the set of topics a rule sees is unbounded.
//! The state kept per topic is small (a hash of the last payload, not the payload) and the
//! number of topics is bounded twice:
//! - *Idle expiry*: a topic without a message for [`TOPIC_IDLE_MS`] (or `min_interval`, if
//!   longer) is forgotten. Idle time is measured on the throttle's own clock, the latest
//!   `received_at` pushed, not the wall clock: a backlog drained after an outage is throttled
//!   as it would have been live, and a rule that stalls forgets nothing. A quiet rule expires
//!   nothing, but it does not grow either.
//! - *Cap*: at most [`MAX_TOPICS`] topics; a new one beyond it evicts the least recently seen,
//!   and the eviction is counted in [`Outcome::evicted`] for the caller to log.
//!
//! A forgotten topic starts afresh: its next message passes `only_changes`, `deadband` and
//! `min_interval` (for an expired topic `min_interval` is over anyway). A held message is never
//! lost to forgetting: it is released first, through the same decision as at its slot's end.
//!
//! Invariants: every held message belongs to a tracked topic; `held`, `due` and the topics'
//! `held` fields name the same messages; `lru` holds one stamp per tracked topic, in the order
//! the topics were last seen, which is also the order of their `seen_ms`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use serde_json::Value;

use crate::core::envelope::Message;
use crate::core::envelope::{Entry, Seq};

/// Most topics one rule's throttle tracks. About 250 bytes each plus the topic's text: a few
/// MiB at worst, while a gateway has hundreds to a few thousand devices. Beyond it, evicting
/// the least recently seen topic lets at most one extra message of it through.
pub const MAX_TOPICS: usize = 10_000;

/// A topic silent this long (in `received_at` time) is forgotten, unless `min_interval` is
/// longer. Periodic sensors report every few seconds to tens of minutes, so they keep their
/// state between reports; a topic silent longer costs at most one extra message per hour when
/// it comes back.
pub const TOPIC_IDLE_MS: u64 = 60 * 60 * 1000;

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

/// What the throttle keeps of one topic.
#[derive(Debug)]
struct TopicState {
    /// Hash of the payload of the last message passed (`only_changes`): 64 bits, keyed per
    /// process, so a changed payload passes for unchanged with odds of 2^-64.
    last_payload: Option<u64>,
    /// Deadband field of the last message passed.
    last_value: Option<f64>,
    /// received_at of the last message passed (`keep = first`).
    last_passed_ms: Option<u64>,
    /// Sequence of the message held for its slot (`keep = latest`), a key of `Throttle::held`.
    held: Option<Seq>,
    /// Key of this topic in `Throttle::lru`.
    stamp: u64,
    /// The throttle's clock when a message of this topic was last pushed.
    seen_ms: u64,
}

/// A message held until its slot ends.
#[derive(Debug)]
struct Held {
    entry: Entry,
    /// The slot's end, ms since the epoch.
    end_ms: u64,
}

/// What the throttle did with one message, or with the messages that fell due.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    /// Messages that pass now, in queue order (held ones may come out ahead of the new one).
    pub pass: Vec<Entry>,
    /// Messages dropped, with why.
    pub dropped: Vec<(Entry, DropReason)>,
    /// Topics forgotten because [`MAX_TOPICS`] was reached: each lets one more message of its
    /// topic through than `min_interval`, `only_changes` or `deadband` would have.
    pub evicted: u64,
}

/// The per-message decisions, apart from the bookkeeping so both can be borrowed at once.
#[derive(Debug)]
struct Filter {
    spec: ThrottleSpec,
    /// Keyed per process, so payloads cannot be crafted to collide with an earlier one.
    hasher: RandomState,
}

impl Filter {
    fn value(&self, message: &Message) -> Option<f64> {
        let (pointer, _) = self.spec.deadband.as_ref()?;
        serde_json::from_slice::<Value>(&message.payload)
            .ok()?
            .pointer(pointer)?
            .as_f64()
    }

    /// Passes `entry` unless only_changes or the deadband drop it; a passed one becomes the
    /// topic's reference.
    fn release(&self, state: &mut TopicState, entry: Entry, outcome: &mut Outcome) {
        let hash = self
            .spec
            .only_changes
            .then(|| self.hasher.hash_one(&entry.message.payload[..]));
        if hash.is_some() && state.last_payload == hash {
            outcome.dropped.push((entry, DropReason::Unchanged));
            return;
        }
        let value = self.value(&entry.message);
        if let (Some((_, band)), Some(last), Some(now)) =
            (&self.spec.deadband, state.last_value, value)
            && (now - last).abs() < *band
        {
            outcome.dropped.push((entry, DropReason::Deadband));
            return;
        }
        if hash.is_some() {
            state.last_payload = hash;
        }
        if value.is_some() {
            state.last_value = value;
        }
        state.last_passed_ms = Some(entry.message.received_at_ms());
        outcome.pass.push(entry);
    }
}

/// Per-topic throttle state of one rule.
#[derive(Debug)]
pub struct Throttle {
    filter: Filter,
    /// Most topics tracked at once.
    max_topics: usize,
    /// A topic silent this long on `clock_ms` is forgotten.
    idle_ms: u64,
    /// The latest received_at pushed: the clock idle expiry runs on.
    clock_ms: u64,
    /// The next `TopicState::stamp`; stamps only grow, so `lru` is in order of last sight.
    next_stamp: u64,
    topics: HashMap<Arc<str>, TopicState>,
    /// Tracked topics by stamp: the first is the least recently seen.
    lru: BTreeMap<u64, Arc<str>>,
    /// Held messages by sequence: the first is the lowest held.
    held: BTreeMap<Seq, Held>,
    /// Held messages by the end of their slot: the first falls due next.
    due: BTreeSet<(u64, Seq)>,
}

impl Throttle {
    /// Nothing seen yet; bounded by [`MAX_TOPICS`] and [`TOPIC_IDLE_MS`].
    pub fn new(spec: ThrottleSpec) -> Self {
        Self::bounded(spec, MAX_TOPICS, TOPIC_IDLE_MS)
    }

    /// Nothing seen yet, with other bounds.
    fn bounded(spec: ThrottleSpec, max_topics: usize, min_idle_ms: u64) -> Self {
        let idle_ms = spec.min_interval_ms.unwrap_or(0).max(min_idle_ms);
        Throttle {
            filter: Filter {
                spec,
                hasher: RandomState::new(),
            },
            max_topics: max_topics.max(1),
            idle_ms,
            clock_ms: 0,
            next_stamp: 0,
            topics: HashMap::new(),
            lru: BTreeMap::new(),
            held: BTreeMap::new(),
            due: BTreeSet::new(),
        }
    }

    /// Decides on one message. Forgets idle topics first, and the least recently seen one if
    /// the message's topic is new and the cap is reached; their held messages pass or drop in
    /// the same outcome.
    pub fn push(&mut self, entry: Entry) -> Outcome {
        let mut outcome = Outcome::default();
        let at = entry.message.received_at_ms();
        self.clock_ms = self.clock_ms.max(at);
        self.expire_idle(&mut outcome);

        // Taken out of the map while deciding, so the other fields can be changed meanwhile.
        let (topic, mut state) = match self.topics.remove_entry(entry.message.topic.as_str()) {
            Some((topic, state)) => {
                self.lru.remove(&state.stamp);
                (topic, state)
            }
            None => {
                while self.topics.len() >= self.max_topics && self.forget_oldest(&mut outcome) {
                    outcome.evicted += 1;
                }
                let state = TopicState {
                    last_payload: None,
                    last_value: None,
                    last_passed_ms: None,
                    held: None,
                    stamp: 0,
                    seen_ms: 0,
                };
                (Arc::from(entry.message.topic.as_str()), state)
            }
        };
        state.stamp = self.next_stamp;
        self.next_stamp += 1;
        state.seen_ms = self.clock_ms;

        match (self.filter.spec.min_interval_ms, self.filter.spec.keep) {
            (Some(interval), Keep::Latest) => {
                let interval = interval.max(1);
                let slot_end = (at - at % interval).saturating_add(interval);
                if let Some(held) = self.take_held(&mut state) {
                    if at < held.end_ms {
                        outcome.dropped.push((held.entry, DropReason::MinInterval));
                    } else {
                        self.filter.release(&mut state, held.entry, &mut outcome);
                    }
                }
                state.held = Some(entry.seq);
                self.due.insert((slot_end, entry.seq));
                self.held.insert(
                    entry.seq,
                    Held {
                        entry,
                        end_ms: slot_end,
                    },
                );
            }
            (Some(interval), Keep::First) => {
                // A message stamped before the last one passed (the clock was stepped back)
                // is not "within" it: a jump must not drop an hour of messages.
                let within = state
                    .last_passed_ms
                    .is_some_and(|last| at >= last && at < last.saturating_add(interval));
                if within {
                    outcome.dropped.push((entry, DropReason::MinInterval));
                } else {
                    self.filter.release(&mut state, entry, &mut outcome);
                }
            }
            (None, _) => self.filter.release(&mut state, entry, &mut outcome),
        }

        self.lru.insert(state.stamp, topic.clone());
        self.topics.insert(topic, state);
        outcome.pass.sort_by_key(|e| e.seq);
        outcome
    }

    /// Releases held messages whose slot ended by `now_ms` (or all of them with `u64::MAX`).
    pub fn release_due(&mut self, now_ms: u64) -> Outcome {
        let mut outcome = Outcome::default();
        while let Some(&(end_ms, seq)) = self.due.first() {
            if end_ms > now_ms {
                break;
            }
            self.due.pop_first();
            let Some(held) = self.held.remove(&seq) else {
                continue;
            };
            match self.topics.get_mut(held.entry.message.topic.as_str()) {
                Some(state) => {
                    state.held = None;
                    self.filter.release(state, held.entry, &mut outcome);
                }
                // Cannot happen (a held message's topic is tracked); passing beats losing it.
                None => outcome.pass.push(held.entry),
            }
        }
        outcome.pass.sort_by_key(|e| e.seq);
        outcome
    }

    /// The lowest sequence still held: the queue must not be acknowledged at or past it.
    pub fn lowest_held(&self) -> Option<Seq> {
        self.held.keys().next().copied()
    }

    /// When the next held message falls due, ms since the epoch. Expiry never needs a wake-up:
    /// it runs on `received_at` time, which only moves when a message is pushed.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.due.first().map(|(end_ms, _)| *end_ms)
    }

    /// Topics tracked now (at most [`MAX_TOPICS`]).
    pub fn topics(&self) -> usize {
        self.topics.len()
    }

    /// Takes the topic's held message out of `held` and `due`.
    fn take_held(&mut self, state: &mut TopicState) -> Option<Held> {
        let held = self.held.remove(&state.held.take()?)?;
        self.due.remove(&(held.end_ms, held.entry.seq));
        Some(held)
    }

    /// Forgets topics silent for `idle_ms` on the throttle's clock.
    fn expire_idle(&mut self, outcome: &mut Outcome) {
        while let Some(topic) = self.lru.values().next() {
            let idle = self
                .topics
                .get(topic)
                .is_none_or(|state| state.seen_ms.saturating_add(self.idle_ms) <= self.clock_ms);
            if !idle || !self.forget_oldest(outcome) {
                break;
            }
        }
    }

    /// Forgets the least recently seen topic after releasing its held message; false when
    /// nothing is tracked.
    fn forget_oldest(&mut self, outcome: &mut Outcome) -> bool {
        let Some((_, topic)) = self.lru.pop_first() else {
            return false;
        };
        if let Some(mut state) = self.topics.remove(&topic)
            && let Some(held) = self.take_held(&mut state)
        {
            self.filter.release(&mut state, held.entry, outcome);
        }
        true
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
    fn keep_first_after_the_clock_went_back_does_not_drop_until_it_catches_up() {
        let mut t = Throttle::new(ThrottleSpec {
            min_interval_ms: Some(60_000),
            ..spec()
        });
        // Stamped by hand: within one process ids never go back (uuid's context holds them at
        // the last time), but a message recovered from before a restart can be later than a
        // new one when the clock was set back in between.
        let stamped = |seq: u64, at_ms: u64| {
            let mut e = entry(seq, "a", "x", T0);
            let ts = uuid::Timestamp::from_unix(
                uuid::NoContext,
                at_ms / 1000,
                (at_ms % 1000) as u32 * 1_000_000,
            );
            e.message.id = uuid::Uuid::new_v7(ts);
            e
        };
        assert_eq!(seqs(&t.push(stamped(0, T0)).pass), vec![0]);
        // The clock was set back an hour: the next message is stamped before the last one.
        let back = T0 - 3_600_000;
        assert_eq!(seqs(&t.push(stamped(1, back)).pass), vec![1]);
        // And the interval runs from that one.
        assert!(t.push(stamped(2, back + 1000)).pass.is_empty());
    }

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

    const MINUTE: u64 = 60 * 1000;

    fn only_changes() -> ThrottleSpec {
        ThrottleSpec {
            only_changes: true,
            ..spec()
        }
    }

    fn keep_latest(interval_ms: u64) -> ThrottleSpec {
        ThrottleSpec {
            min_interval_ms: Some(interval_ms),
            keep: Keep::Latest,
            ..spec()
        }
    }

    #[test]
    fn an_idle_topic_is_forgotten_and_its_held_message_passes() {
        let mut t = Throttle::new(keep_latest(1000));
        assert!(t.push(entry(0, "a", "1", T0)).pass.is_empty());
        let out = t.push(entry(1, "b", "1", T0 + TOPIC_IDLE_MS + 5000));
        assert_eq!(
            seqs(&out.pass),
            vec![0],
            "a's held message passes, not dropped"
        );
        assert!(out.dropped.is_empty());
        assert_eq!(out.evicted, 0, "expiry is not an eviction");
        assert_eq!(t.topics(), 1);
        assert_eq!(t.lowest_held(), Some(1));
        assert_eq!(t.next_due_ms(), Some(T0 + TOPIC_IDLE_MS + 6000));
    }

    #[test]
    fn only_changes_remembers_a_topic_until_it_is_idle_for_an_hour() {
        let mut t = Throttle::new(only_changes());
        assert_eq!(seqs(&t.push(entry(0, "a", "on", T0)).pass), vec![0]);
        let out = t.push(entry(1, "a", "on", T0 + TOPIC_IDLE_MS - 1));
        assert_eq!(
            out.dropped.len(),
            1,
            "seen within the idle time: still known"
        );
        t.push(entry(2, "b", "x", T0 + 2 * TOPIC_IDLE_MS));
        assert_eq!(t.topics(), 1, "a is forgotten");
        let out = t.push(entry(3, "a", "on", T0 + 2 * TOPIC_IDLE_MS + 1));
        assert_eq!(seqs(&out.pass), vec![3], "a forgotten topic starts afresh");
    }

    #[test]
    fn idle_time_runs_on_received_at_so_a_backlog_is_throttled_as_live() {
        let mut t = Throttle::new(only_changes());
        t.push(entry(0, "a", "on", T0));
        // Drained ten hours later: the wall clock is far ahead of the messages.
        assert_eq!(t.release_due(T0 + 10 * 60 * MINUTE), Outcome::default());
        let out = t.push(entry(1, "a", "on", T0 + 1000));
        assert_eq!(out.dropped.len(), 1);
        assert_eq!(t.topics(), 1);
    }

    #[test]
    fn min_interval_longer_than_the_idle_time_keeps_its_topics() {
        let day = 24 * 60 * MINUTE;
        let mut t = Throttle::new(ThrottleSpec {
            min_interval_ms: Some(day),
            ..spec()
        });
        t.push(entry(0, "a", "x", T0));
        t.push(entry(1, "b", "x", T0 + 2 * TOPIC_IDLE_MS));
        let out = t.push(entry(2, "a", "x", T0 + day - 1));
        let dropped: Vec<_> = out.dropped.iter().map(|(e, r)| (e.seq, *r)).collect();
        assert_eq!(dropped, vec![(2, DropReason::MinInterval)]);
    }

    #[test]
    fn the_cap_evicts_the_least_recently_seen_topic_and_reports_it() {
        let mut t = Throttle::bounded(
            ThrottleSpec {
                only_changes: true,
                ..keep_latest(1000)
            },
            2,
            TOPIC_IDLE_MS,
        );
        t.push(entry(0, "a", "1", T0));
        t.push(entry(1, "b", "1", T0 + 10));
        t.push(entry(2, "a", "2", T0 + 20)); // a is now the most recently seen
        assert_eq!(t.lowest_held(), Some(1));
        let out = t.push(entry(3, "c", "1", T0 + 30));
        assert_eq!(out.evicted, 1);
        assert_eq!(
            seqs(&out.pass),
            vec![1],
            "b's held message passes on eviction"
        );
        assert_eq!(t.topics(), 2);
        assert_eq!(t.lowest_held(), Some(2));
        assert_eq!(seqs(&t.release_due(T0 + 1000).pass), vec![2, 3]);
        assert_eq!(t.lowest_held(), None);
        assert_eq!(t.next_due_ms(), None);
        // c was seen after a: a goes next, and comes back knowing nothing.
        let out = t.push(entry(4, "b", "1", T0 + 1100));
        assert_eq!(out.evicted, 1);
        assert!(out.pass.is_empty() && out.dropped.is_empty());
        assert_eq!(
            seqs(&t.release_due(T0 + 2000).pass),
            vec![4],
            "b starts afresh"
        );
        let out = t.push(entry(5, "a", "2", T0 + 2100));
        assert_eq!(out.evicted, 1, "a was forgotten");
        assert_eq!(
            seqs(&t.release_due(T0 + 3000).pass),
            vec![5],
            "a starts afresh"
        );
    }

    #[test]
    fn the_default_cap_holds_ten_thousand_topics() {
        let mut t = Throttle::new(only_changes());
        let mut evicted = 0;
        for i in 0..=MAX_TOPICS as u64 {
            evicted += t.push(entry(i, &format!("dev/{i}"), "x", T0 + i)).evicted;
        }
        assert_eq!(evicted, 1);
        assert_eq!(t.topics(), MAX_TOPICS);
        let out = t.push(entry(99_999, "dev/0", "x", T0 + 99_999));
        assert_eq!(seqs(&out.pass), vec![99_999], "dev/0 was the one evicted");
        let out = t.push(entry(100_000, "dev/2", "x", T0 + 100_000));
        assert_eq!(out.dropped.len(), 1, "dev/2 is still known");
    }

    /// The throttle as it was before its state was bounded: every topic kept forever, with
    /// its whole last payload. With bounds that never bite, the throttle must decide the same.
    mod unbounded {
        use super::super::*;

        #[derive(Default)]
        struct State {
            last_payload: Option<Vec<u8>>,
            last_value: Option<f64>,
            last_passed_ms: Option<u64>,
            held: Option<(Entry, u64)>,
        }

        pub struct Model {
            spec: ThrottleSpec,
            topics: HashMap<String, State>,
        }

        impl Model {
            pub fn new(spec: ThrottleSpec) -> Self {
                Model {
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

            fn release(&self, state: &mut State, entry: Entry, out: &mut Outcome) {
                if self.spec.only_changes
                    && state.last_payload.as_deref() == Some(&entry.message.payload[..])
                {
                    return out.dropped.push((entry, DropReason::Unchanged));
                }
                let value = self.value(&entry.message);
                if let (Some((_, band)), Some(last), Some(now)) =
                    (&self.spec.deadband, state.last_value, value)
                    && (now - last).abs() < *band
                {
                    return out.dropped.push((entry, DropReason::Deadband));
                }
                if self.spec.only_changes {
                    state.last_payload = Some(entry.message.payload.clone());
                }
                state.last_value = value.or(state.last_value);
                state.last_passed_ms = Some(entry.message.received_at_ms());
                out.pass.push(entry);
            }

            pub fn push(&mut self, entry: Entry) -> Outcome {
                let mut out = Outcome::default();
                let topic = entry.message.topic.clone();
                let mut state = self.topics.remove(&topic).unwrap_or_default();
                let at = entry.message.received_at_ms();
                match (self.spec.min_interval_ms, self.spec.keep) {
                    (Some(interval), Keep::Latest) => {
                        match state.held.take() {
                            Some((held, end)) if at < end => {
                                out.dropped.push((held, DropReason::MinInterval));
                            }
                            Some((held, _)) => self.release(&mut state, held, &mut out),
                            None => {}
                        }
                        state.held = Some((entry, at - at % interval + interval));
                    }
                    (Some(interval), Keep::First) => {
                        if state
                            .last_passed_ms
                            .is_some_and(|l| at >= l && at < l + interval)
                        {
                            out.dropped.push((entry, DropReason::MinInterval));
                        } else {
                            self.release(&mut state, entry, &mut out);
                        }
                    }
                    (None, _) => self.release(&mut state, entry, &mut out),
                }
                self.topics.insert(topic, state);
                out
            }

            pub fn release_due(&mut self, now_ms: u64) -> Outcome {
                let mut out = Outcome::default();
                let due: Vec<String> = self
                    .topics
                    .iter()
                    .filter(|(_, s)| s.held.as_ref().is_some_and(|(_, end)| *end <= now_ms))
                    .map(|(t, _)| t.clone())
                    .collect();
                for topic in due {
                    if let Some(mut state) = self.topics.remove(&topic) {
                        if let Some((held, _)) = state.held.take() {
                            self.release(&mut state, held, &mut out);
                        }
                        self.topics.insert(topic, state);
                    }
                }
                out.pass.sort_by_key(|e| e.seq);
                out
            }

            pub fn lowest_held(&self) -> Option<u64> {
                let held = self.topics.values().filter_map(|s| s.held.as_ref());
                held.map(|(e, _)| e.seq).min()
            }

            pub fn next_due_ms(&self) -> Option<u64> {
                let held = self.topics.values().filter_map(|s| s.held.as_ref());
                held.map(|(_, end)| *end).min()
            }
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeSet;

        const TOPICS: [&str; 5] = ["a", "b", "c", "d/e", "f"];
        const PAYLOADS: [&str; 5] = [r#"{"t":1}"#, r#"{"t":1.3}"#, r#"{"t":2}"#, "on", "off"];

        #[derive(Debug, Clone)]
        enum Op {
            /// A message `after_ms` after the previous one.
            Push {
                topic: usize,
                payload: usize,
                after_ms: u64,
            },
            /// The wall clock, `ahead_ms` ahead of the last message.
            Tick { ahead_ms: u64 },
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (0..TOPICS.len(), 0..PAYLOADS.len(), 0u64..1500)
                    .prop_map(|(topic, payload, after_ms)| Op::Push { topic, payload, after_ms }),
                1 => (0u64..3000).prop_map(|ahead_ms| Op::Tick { ahead_ms }),
            ]
        }

        fn throttle_spec() -> impl Strategy<Value = ThrottleSpec> {
            (
                prop_oneof![Just(None), Just(Some(1)), Just(Some(500)), Just(Some(1000))],
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
            )
                .prop_map(|(min_interval_ms, latest, only_changes, deadband)| {
                    ThrottleSpec {
                        min_interval_ms,
                        keep: if latest { Keep::Latest } else { Keep::First },
                        only_changes,
                        deadband: deadband.then(|| ("/t".to_owned(), 0.5)),
                    }
                })
        }

        fn sorted_drops(out: &Outcome) -> Vec<(u64, DropReason)> {
            let mut drops: Vec<_> = out.dropped.iter().map(|(e, r)| (e.seq, *r)).collect();
            drops.sort_by_key(|(seq, _)| *seq);
            drops
        }

        proptest! {
            /// With bounds that never bite, decisions are those of the unbounded throttle.
            #[test]
            fn unbounded_decisions_are_unchanged(
                spec in throttle_spec(),
                ops in proptest::collection::vec(op(), 0..80),
            ) {
                let mut t = Throttle::new(spec.clone());
                let mut model = unbounded::Model::new(spec);
                let mut at = T0;
                for (seq, op) in ops.into_iter().enumerate() {
                    let (got, want) = match op {
                        Op::Push { topic, payload, after_ms } => {
                            at += after_ms;
                            let e = || entry(seq as u64, TOPICS[topic], PAYLOADS[payload], at);
                            (t.push(e()), model.push(e()))
                        }
                        Op::Tick { ahead_ms } => {
                            (t.release_due(at + ahead_ms), model.release_due(at + ahead_ms))
                        }
                    };
                    prop_assert_eq!(seqs(&got.pass), seqs(&want.pass));
                    prop_assert_eq!(sorted_drops(&got), sorted_drops(&want));
                    prop_assert_eq!(got.evicted, 0);
                    prop_assert_eq!(t.lowest_held(), model.lowest_held());
                    prop_assert_eq!(t.next_due_ms(), model.next_due_ms());
                }
                let (got, want) = (t.release_due(u64::MAX), model.release_due(u64::MAX));
                prop_assert_eq!(seqs(&got.pass), seqs(&want.pass));
                prop_assert_eq!(sorted_drops(&got), sorted_drops(&want));
            }

            /// With a tiny cap and idle time, every message still comes out exactly once, the
            /// held ones are the ones `lowest_held` and `next_due_ms` speak of, and the cap holds.
            #[test]
            fn bounded_state_never_loses_or_duplicates_a_message(
                spec in throttle_spec(),
                max_topics in 1usize..4,
                min_idle_ms in 0u64..3000,
                ops in proptest::collection::vec(op(), 0..80),
            ) {
                let mut t = Throttle::bounded(spec, max_topics, min_idle_ms);
                let mut pending: BTreeSet<u64> = BTreeSet::new();
                let mut ends: BTreeSet<u64> = BTreeSet::new();
                let mut at = T0;
                let settle = |out: Outcome, pending: &mut BTreeSet<u64>| -> Result<(), TestCaseError> {
                    let passed = seqs(&out.pass);
                    let mut sorted = passed.clone();
                    sorted.sort_unstable();
                    prop_assert_eq!(&passed, &sorted, "passed in queue order");
                    for seq in passed.into_iter().chain(out.dropped.iter().map(|(e, _)| e.seq)) {
                        prop_assert!(pending.remove(&seq), "message {} came out twice", seq);
                    }
                    Ok(())
                };
                for (seq, op) in ops.into_iter().enumerate() {
                    match op {
                        Op::Push { topic, payload, after_ms } => {
                            at += after_ms;
                            pending.insert(seq as u64);
                            let out = t.push(entry(seq as u64, TOPICS[topic], PAYLOADS[payload], at));
                            settle(out, &mut pending)?;
                        }
                        Op::Tick { ahead_ms } => {
                            let now = at + ahead_ms;
                            let out = t.release_due(now);
                            settle(out, &mut pending)?;
                            prop_assert!(t.next_due_ms().is_none_or(|due| due > now));
                        }
                    }
                    prop_assert!(t.topics() <= max_topics);
                    prop_assert_eq!(t.lowest_held(), pending.first().copied());
                    ends.extend(t.next_due_ms());
                }
                let out = t.release_due(u64::MAX);
                settle(out, &mut pending)?;
                prop_assert!(pending.is_empty(), "never came out: {:?}", pending);
                prop_assert_eq!(t.lowest_held(), None);
                prop_assert_eq!(t.next_due_ms(), None);
            }
        }
    }
}
