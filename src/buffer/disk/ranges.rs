//! The acknowledged ranges above the ack position: events Lambda accepted while an older one
//! was still in flight. Pure: no I/O.
//!
//! Delivery acknowledges in order through a low-water mark, so one slow invocation holds back
//! the position of every later ack. These ranges record the later acks, so that a crash
//! replays only what really was not acknowledged (plus what the last write of the `ack` file
//! missed), not everything above the slow one.
//!
//! Invariants kept here:
//! - Ranges are half-open `[start, end)`, disjoint, not touching each other, and every one
//!   starts above the ack position it was last [`AckRanges::advance`]d with: a range that
//!   reaches the position is absorbed into it.
//! - At most [`MAX_RANGES`] are kept. Past that, a new range that touches none is not
//!   recorded: it stays unacknowledged on disk until the position passes it (a crash replays
//!   it; nothing is ever skipped that was not acknowledged).

use std::collections::BTreeMap;

use super::Seq;

/// Most ranges kept in memory (each one is a hole left by an event still in flight or
/// refused; the default concurrency of 64 leaves far fewer).
pub const MAX_RANGES: usize = 4096;

/// Acknowledged sequences above the ack position, as disjoint ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckRanges {
    /// Start → end (exclusive).
    map: BTreeMap<Seq, Seq>,
}

impl AckRanges {
    /// The ranges in `list` (possibly overlapping, unordered) above `position`.
    pub fn from_list(list: &[(Seq, Seq)], position: Seq) -> AckRanges {
        let mut ranges = AckRanges::default();
        for &(start, end) in list {
            ranges.insert(start, end, position);
        }
        ranges
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// How many ranges.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Records `[start, end)` as acknowledged, above `position` (the part below it already
    /// is). Returns how many sequences it adds at most (overlaps counted twice: a hint for
    /// how often to write, not a tally).
    pub fn insert(&mut self, start: Seq, end: Seq, position: Seq) -> u64 {
        let mut start = start.max(position);
        let mut end = end;
        if start >= end {
            return 0;
        }
        let added = end - start;
        // Merge with every range it touches or overlaps.
        let touching: Vec<(Seq, Seq)> = self
            .map
            .range(..=end)
            .rev()
            .take_while(|&(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        if touching.is_empty() && self.map.len() >= MAX_RANGES {
            return 0;
        }
        for (s, e) in touching {
            self.map.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.map.insert(start, end);
        added
    }

    /// The ack position moved to `position`: drops what is below it, and returns the position
    /// moved past every range it now reaches.
    pub fn advance(&mut self, mut position: Seq) -> Seq {
        while let Some((&start, &end)) = self.map.first_key_value() {
            if start > position {
                break;
            }
            self.map.remove(&start);
            position = position.max(end);
        }
        position
    }

    /// Where the range holding `seq` ends (`None`: `seq` is not in one).
    pub fn end_of(&self, seq: Seq) -> Option<Seq> {
        self.map
            .range(..=seq)
            .next_back()
            .and_then(|(_, &end)| (seq < end).then_some(end))
    }

    /// Drops everything at or past `end` (recovery: ranges past the records are stale);
    /// returns whether there was any.
    pub fn cut_at(&mut self, end: Seq) -> bool {
        let past: Vec<Seq> = self.map.range(end..).map(|(&s, _)| s).collect();
        let mut cut = !past.is_empty();
        for s in past {
            self.map.remove(&s);
        }
        if let Some(mut last) = self.map.last_entry()
            && *last.get() > end
        {
            *last.get_mut() = end;
            cut = true;
        }
        cut
    }

    /// The lowest `max` ranges, lowest first (what the `ack` file has room for; the ones
    /// left out are replayed after a crash).
    pub fn lowest(&self, max: usize) -> Vec<(Seq, Seq)> {
        self.map.iter().take(max).map(|(&s, &e)| (s, e)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(r: &AckRanges) -> Vec<(Seq, Seq)> {
        r.lowest(usize::MAX)
    }

    #[test]
    fn ranges_merge_when_they_touch_or_overlap() {
        let mut r = AckRanges::default();
        r.insert(10, 12, 0);
        r.insert(14, 16, 0);
        assert_eq!(list(&r), [(10, 12), (14, 16)]);
        r.insert(12, 14, 0);
        assert_eq!(list(&r), [(10, 16)]);
        r.insert(8, 11, 0);
        r.insert(15, 20, 0);
        assert_eq!(list(&r), [(8, 20)]);
        r.insert(30, 31, 0);
        r.insert(1, 40, 0);
        assert_eq!(list(&r), [(1, 40)]);
    }

    #[test]
    fn what_is_below_the_position_is_not_recorded() {
        let mut r = AckRanges::default();
        assert_eq!(r.insert(2, 5, 5), 0);
        assert_eq!(r.insert(3, 8, 5), 3);
        assert_eq!(list(&r), [(5, 8)]);
    }

    #[test]
    fn the_position_absorbs_the_ranges_it_reaches() {
        let mut r = AckRanges::from_list(&[(5, 8), (9, 12), (20, 21)], 0);
        assert_eq!(r.advance(4), 4);
        assert_eq!(r.advance(5), 8);
        assert_eq!(list(&r), [(9, 12), (20, 21)]);
        assert_eq!(r.advance(10), 12);
        assert_eq!(list(&r), [(20, 21)]);
    }

    #[test]
    fn end_of_names_the_range_a_sequence_is_in() {
        let r = AckRanges::from_list(&[(5, 8), (10, 11)], 0);
        assert_eq!(r.end_of(4), None);
        assert_eq!(r.end_of(5), Some(8));
        assert_eq!(r.end_of(7), Some(8));
        assert_eq!(r.end_of(8), None);
        assert_eq!(r.end_of(10), Some(11));
    }

    #[test]
    fn cut_at_drops_and_shortens_what_lies_past_the_records() {
        let mut r = AckRanges::from_list(&[(5, 8), (10, 20), (30, 31)], 0);
        assert!(r.cut_at(15));
        assert_eq!(list(&r), [(5, 8), (10, 15)]);
        assert!(!r.cut_at(15));
    }

    #[test]
    fn past_the_cap_a_separate_range_is_not_recorded() {
        let mut r = AckRanges::default();
        for i in 0..MAX_RANGES as u64 {
            r.insert(10 * i + 1, 10 * i + 2, 0);
        }
        assert_eq!(r.len(), MAX_RANGES);
        assert_eq!(r.insert(1_000_000, 1_000_001, 0), 0);
        assert_eq!(r.len(), MAX_RANGES);
        // One that merges is still taken.
        assert_eq!(r.insert(2, 3, 0), 1);
        assert_eq!(r.len(), MAX_RANGES);
    }
}
