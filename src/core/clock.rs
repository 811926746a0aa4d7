//! The wall clock as the daemon trusts it: jumps detected, and message ages that a jump cannot
//! inflate. A Raspberry Pi has no battery-backed clock: until NTP sets it, the wall clock reads
//! 1970 or the time of the last shutdown (fake-hwclock), so `received_at` (and the UUIDv7 id)
//! of a message stored then is wrong, and jumps by hours or years when NTP steps the clock.
//!
//! # Rules
//!
//! - Order never comes from the wall clock: the queue hands messages out by sequence number,
//!   batches and windows close on the monotonic clock (`batch.rs`).
//! - A jump is what the wall clock moved beyond the monotonic clock between two observations
//!   (every [`SAMPLE_INTERVAL`], and at every age computation); steps under
//!   [`JUMP_THRESHOLD`] are ordinary NTP corrections and ignored. A backwards jump is logged at
//!   warn, a forward one at info, each with its size.
//! - The age that `buffer.max_age` is compared with never counts a jump:
//!   `age = now − received_at − (forward jumps seen after the message was stamped)`, where a
//!   message was stamped before a jump when its `received_at` is at or before the wall time the
//!   jump left (so a message stamped in 1970 before NTP is as old as it really is, not 56
//!   years). Backward jumps only make ages smaller, so they need no rule.
//! - A `received_at` before [`PLAUSIBLE_SINCE_MS`] (2024-01-01) cannot be a real time (a clock
//!   never set, from a previous run): its age counts from this process's start.
//!
//! The cost of these rules is on the safe side: a message may outlive `max_age` by the size of
//! a jump, never expire early. A clock that was wrong in a previous run and set before this one
//! started is beyond what the process can see: `After=time-sync.target` (with
//! `systemd-time-wait-sync.service` enabled) starts the daemon once the clock is set.

use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Steps smaller than this are ordinary NTP corrections, not jumps.
pub const JUMP_THRESHOLD: Duration = Duration::from_secs(2);
/// How often the daemon looks at the clock when nothing else does.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// 2024-01-01T00:00:00Z in milliseconds: no message this daemon stored is older.
pub const PLAUSIBLE_SINCE_MS: u64 = 1_704_067_200_000;
/// Forward jumps remembered (they are rare: boot, an operator); older ones merge into one.
const MAX_JUMPS: usize = 16;

/// A jump of the wall clock against the monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jump {
    /// The wall clock moved ahead by this much more than time passed.
    Forward(Duration),
    /// The wall clock went back by this much.
    Backward(Duration),
}

/// Tracks the wall clock against a monotonic one. Pure: the caller passes both readings
/// (`mono` is any monotonic duration from a fixed origin), so tests drive time by hand.
#[derive(Debug, Clone)]
pub struct ClockWatch {
    /// Monotonic reading when the watch started (the process start).
    mono_start: Duration,
    /// Wall minus monotonic at the last observation, in ms: it changes only when the clock is
    /// stepped.
    offset_ms: i128,
    /// Forward jumps: the wall time the clock left (ms) and how far it jumped (ms).
    jumps: Vec<(u64, u64)>,
}

impl ClockWatch {
    /// Starts watching at these readings.
    pub fn new(wall_ms: u64, mono: Duration) -> ClockWatch {
        ClockWatch {
            mono_start: mono,
            offset_ms: offset(wall_ms, mono),
            jumps: Vec::new(),
        }
    }

    /// Takes a reading; returns the jump since the last one, if the clock was stepped.
    pub fn observe(&mut self, wall_ms: u64, mono: Duration) -> Option<Jump> {
        let now = offset(wall_ms, mono);
        let step = now - self.offset_ms;
        let threshold = JUMP_THRESHOLD.as_millis() as i128;
        if step.abs() < threshold {
            return None;
        }
        self.offset_ms = now;
        let size = u64::try_from(step.unsigned_abs()).unwrap_or(u64::MAX);
        if step > 0 {
            // The wall time the clock left: what it would read now without the jump.
            let left = wall_ms.saturating_sub(size);
            self.jumps.push((left, size));
            if self.jumps.len() > MAX_JUMPS {
                // Merge the two oldest: the later point, the sum (never expires anything early).
                let (a, b) = (self.jumps.remove(0), self.jumps.remove(0));
                self.jumps
                    .insert(0, (a.0.max(b.0), a.1.saturating_add(b.1)));
            }
            Some(Jump::Forward(Duration::from_millis(size)))
        } else {
            Some(Jump::Backward(Duration::from_millis(size)))
        }
    }

    /// The age to compare with `buffer.max_age` of a message stamped `received_at_ms` (see the
    /// module's rules). Call [`ClockWatch::observe`] with the same readings first.
    pub fn age(&self, received_at_ms: u64, wall_ms: u64, mono: Duration) -> Duration {
        if received_at_ms < PLAUSIBLE_SINCE_MS {
            return mono.saturating_sub(self.mono_start);
        }
        let jumped: u64 = self
            .jumps
            .iter()
            .filter(|(left, _)| received_at_ms <= *left)
            .fold(0u64, |sum, (_, size)| sum.saturating_add(*size));
        Duration::from_millis(
            wall_ms
                .saturating_sub(received_at_ms)
                .saturating_sub(jumped),
        )
    }
}

fn offset(wall_ms: u64, mono: Duration) -> i128 {
    i128::from(wall_ms) - mono.as_millis() as i128
}

/// The process's clock watch, started at first use (the daemon touches it at start).
static PROCESS: LazyLock<(Instant, Mutex<ClockWatch>)> = LazyLock::new(|| {
    let origin = Instant::now();
    (
        origin,
        Mutex::new(ClockWatch::new(wall_now_ms(), Duration::ZERO)),
    )
});

fn wall_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Looks at the process's clock now, logging a jump; returns the readings.
fn observe_process(watch: &mut ClockWatch, origin: Instant) -> (u64, Duration) {
    let (wall, mono) = (wall_now_ms(), origin.elapsed());
    match watch.observe(wall, mono) {
        Some(Jump::Backward(d)) => tracing::warn!(
            "the wall clock jumped backwards by {}: received_at of new messages may be earlier than that of older ones; delivery order and buffer.max_age are not affected",
            human(d)
        ),
        Some(Jump::Forward(d)) => tracing::info!(
            "the wall clock jumped forward by {} (set by NTP?): buffer.max_age of messages stamped before it does not count the jump",
            human(d)
        ),
        None => {}
    }
    (wall, mono)
}

/// Starts the process's clock watch (call at start, so ages count from there).
pub fn start() {
    LazyLock::force(&PROCESS);
}

/// Looks at the clock now, logging a jump if there was one.
pub fn check() {
    let (origin, watch) = &*PROCESS;
    let mut watch = watch.lock().unwrap_or_else(|e| e.into_inner());
    observe_process(&mut watch, *origin);
}

/// The age of a message stamped `received_at_ms`, by the rules of this module.
pub fn age_of(received_at_ms: u64) -> Duration {
    let (origin, watch) = &*PROCESS;
    let mut watch = watch.lock().unwrap_or_else(|e| e.into_inner());
    let (wall, mono) = observe_process(&mut watch, *origin);
    watch.age(received_at_ms, wall, mono)
}

/// The clock read once, to age many messages by: a read of the buffer ages every message it
/// hands out, and reading the clocks and taking the lock for each was 1.5% of the CPU a
/// backlog's delivery took.
pub struct Reading {
    watch: ClockWatch,
    wall: u64,
    mono: Duration,
}

impl Reading {
    /// As [`age_of`], at the time of this reading.
    pub fn age_of(&self, received_at_ms: u64) -> Duration {
        self.watch.age(received_at_ms, self.wall, self.mono)
    }
}

/// Reads the clock now (logging a jump if there was one), for [`Reading::age_of`].
pub fn reading() -> Reading {
    let (origin, watch) = &*PROCESS;
    let mut watch = watch.lock().unwrap_or_else(|e| e.into_inner());
    let (wall, mono) = observe_process(&mut watch, *origin);
    Reading {
        watch: watch.clone(),
        wall,
        mono,
    }
}

/// Looks at the clock every [`SAMPLE_INTERVAL`] until aborted, so a jump is logged near when
/// it happens even while no message is read.
pub async fn watch() {
    start();
    let mut every = tokio::time::interval(SAMPLE_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        check();
    }
}

/// A duration as a person reads it in a log line: `490ms`, `2.5s`, `5m 12s`, `1h 3m`.
pub fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_millis());
    }
    if d < Duration::from_secs(10) {
        let tenths = (d.as_millis() + 50) / 100;
        return if tenths.is_multiple_of(10) {
            format!("{}s", tenths / 10)
        } else {
            format!("{}.{}s", tenths / 10, tenths % 10)
        };
    }
    let secs = (d.as_millis() + 500) / 1000;
    let secs = if secs >= 3600 { secs - secs % 60 } else { secs };
    humantime::format_duration(Duration::from_secs(secs as u64)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;
    const HOUR: u64 = 60 * MIN;
    const DAY: u64 = 24 * HOUR;
    /// 2026-01-01T00:00:00Z, a real time.
    const REAL: u64 = 1_767_225_600_000;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_steady_clock_has_no_jumps_and_plain_ages() {
        let mut watch = ClockWatch::new(REAL, ms(0));
        for i in 1..100 {
            // NTP slewing: a few ms off the monotonic clock is no jump.
            assert_eq!(watch.observe(REAL + i * 1000 + i % 7, ms(i * 1000)), None);
        }
        assert_eq!(watch.age(REAL, REAL + DAY, ms(DAY)), ms(DAY));
        assert_eq!(watch.age(REAL + DAY, REAL, ms(0)), ms(0), "future: age 0");
    }

    #[test]
    fn a_backwards_jump_is_reported_with_its_size() {
        let mut watch = ClockWatch::new(REAL, ms(0));
        assert_eq!(
            watch.observe(REAL + 10_000 - HOUR, ms(10_000)),
            Some(Jump::Backward(ms(HOUR)))
        );
        assert_eq!(watch.observe(REAL + 20_000 - HOUR, ms(20_000)), None);
    }

    #[test]
    fn messages_stamped_before_ntp_set_the_clock_are_not_expired_by_the_jump() {
        let max_age = ms(7 * DAY);
        // Booted with the clock at the last shutdown, three weeks behind.
        let boot = REAL - 21 * DAY;
        let mut watch = ClockWatch::new(boot, ms(0));
        let early = boot + 5 * MIN; // stamped before NTP
        assert_eq!(watch.observe(boot + 10 * MIN, ms(10 * MIN)), None);
        // NTP steps the clock forward three weeks.
        let now = REAL + 11 * MIN;
        assert_eq!(
            watch.observe(now, ms(11 * MIN)),
            Some(Jump::Forward(ms(21 * DAY)))
        );
        let later = REAL + 12 * MIN; // stamped after NTP
        let wall = now + HOUR;
        let mono = ms(11 * MIN + HOUR);
        assert_eq!(watch.observe(wall, mono), None);
        assert_eq!(watch.age(early, wall, mono), ms(HOUR + 6 * MIN));
        assert!(watch.age(early, wall, mono) < max_age);
        assert_eq!(watch.age(later, wall, mono), ms(HOUR - MIN));
        // A week and a bit later, the early message does expire, as it should.
        let wall = now + 7 * DAY;
        let mono = ms(11 * MIN + 7 * DAY);
        assert!(watch.age(early, wall, mono) > max_age);
    }

    #[test]
    fn a_1970_stamp_counts_from_the_process_start() {
        let mut watch = ClockWatch::new(5_000, ms(0));
        let stamped = 6_000;
        // NTP: from 1970 to now.
        assert!(matches!(
            watch.observe(REAL, ms(2_000)),
            Some(Jump::Forward(_))
        ));
        assert_eq!(
            watch.age(stamped, REAL + HOUR, ms(2_000 + HOUR)),
            ms(2_000 + HOUR)
        );
        // From a previous run (not seen jumping): still counted from this start, not 56 years.
        let fresh = ClockWatch::new(REAL, ms(500));
        assert_eq!(fresh.age(3_000, REAL + MIN, ms(500 + MIN)), ms(MIN));
    }

    #[test]
    fn messages_from_before_this_run_keep_their_real_age() {
        let max_age = ms(7 * DAY);
        let mut watch = ClockWatch::new(5_000, ms(0));
        // Stored last week with a good clock; this boot began in 1970 until NTP.
        let stored = REAL - 8 * DAY;
        assert!(watch.observe(REAL, ms(1_000)).is_some());
        assert!(watch.age(stored, REAL, ms(1_000)) > max_age);
    }

    #[tokio::test(start_paused = true)]
    async fn paused_time_drives_the_watch_like_a_real_process() {
        let origin = tokio::time::Instant::now();
        let mut watch = ClockWatch::new(REAL, ms(0));
        let mut wall = REAL;
        for _ in 0..10 {
            tokio::time::sleep(SAMPLE_INTERVAL).await;
            wall += SAMPLE_INTERVAL.as_millis() as u64;
            assert_eq!(watch.observe(wall, origin.elapsed()), None);
        }
        wall -= 3 * HOUR;
        tokio::time::sleep(SAMPLE_INTERVAL).await;
        wall += SAMPLE_INTERVAL.as_millis() as u64;
        assert_eq!(
            watch.observe(wall, origin.elapsed()),
            Some(Jump::Backward(ms(3 * HOUR)))
        );
    }

    #[test]
    fn many_forward_jumps_merge_on_the_safe_side() {
        let mut watch = ClockWatch::new(REAL, ms(0));
        let mut wall = REAL;
        for i in 1..=(MAX_JUMPS as u64 + 4) {
            wall += HOUR + 1000;
            assert!(watch.observe(wall, ms(i * 1000)).is_some());
        }
        assert_eq!(watch.jumps.len(), MAX_JUMPS);
        // A message from before all jumps: every jump is subtracted.
        let total = (MAX_JUMPS as u64 + 4) * HOUR;
        let mono = ms((MAX_JUMPS as u64 + 4) * 1000);
        assert_eq!(watch.age(REAL, wall, mono), ms(wall - REAL - total));
    }

    #[test]
    fn durations_read_as_words() {
        assert_eq!(human(Duration::from_nanos(490_189_627)), "490ms");
        assert_eq!(human(ms(2_460)), "2.5s");
        assert_eq!(human(ms(3_000)), "3s");
        assert_eq!(human(ms(30_000)), "30s");
        assert_eq!(human(ms(312_400)), "5m 12s");
        assert_eq!(human(ms(3 * HOUR + 125_000)), "3h 2m");
    }
}
