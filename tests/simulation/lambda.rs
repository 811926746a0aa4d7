//! The simulated Lambda: an [`Invoke`] whose every answer (accepted, throttled, 5xx, slow,
//! timed out, refused for good) is drawn from the run's seeded generator, and which records
//! what it accepted, per rule and message, to check delivery and duplicates against.
//!
//! Invariant: a message counts as delivered only when the answer was "accepted" and reached
//! the delivery task (a slow answer cut short by a crash does not count).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use mqtt_lambda_bridge::delivery::invoker::{Invoke, InvokeError, InvokeRequest};

/// How the function behaves for a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Accepts everything at once.
    Healthy,
    /// A mix of every answer.
    Flaky,
    /// 5xx for everything.
    Down,
    /// Accepts everything, after seconds.
    Slow,
}

/// Which crash each repeat delivery is charged to.
///
/// A message delivered again is charged to the first crash (or restart) after its last
/// acceptance: that crash lost its acknowledgement. A message a crash put back may wait
/// through later crashes (its rule removed, Lambda down) before it is delivered again; it
/// still counts against the crash that lost it, not the one before its redelivery.
#[derive(Debug, Default)]
pub struct Epochs {
    /// Crashes so far: the current epoch's number.
    pub current: usize,
    /// The epoch in which each (rule, message id) was last accepted.
    last: HashMap<(String, u64), usize>,
    /// Repeats per crash (1-based: the crash that ended epoch n is crash n + 1) and rule.
    pub dups: HashMap<(usize, String), u64>,
}

/// What the simulated function saw; behind the [`Lambda`]'s lock.
pub struct Seen {
    rng: fastrand::Rng,
    /// How it answers now.
    pub health: Health,
    /// Times each (rule, message id) was accepted.
    pub accepted: HashMap<(String, u64), u32>,
    /// Repeats, charged to crashes.
    pub epochs: Epochs,
}

/// The simulated function (all rules share it).
pub struct Lambda {
    seen: Mutex<Seen>,
}

enum Answer {
    Accept,
    Fail(InvokeError),
}

impl Lambda {
    /// A healthy function whose answers come from `seed`.
    pub fn new(seed: u64) -> Lambda {
        Lambda {
            seen: Mutex::new(Seen {
                rng: fastrand::Rng::with_seed(seed),
                health: Health::Healthy,
                accepted: HashMap::new(),
                epochs: Epochs::default(),
            }),
        }
    }

    /// The recorded state.
    pub fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A crash or restart happened: repeats of what was accepted before are charged to it.
    /// Returns its number.
    pub fn begin_epoch(&self) -> usize {
        let mut seen = self.seen();
        seen.epochs.current += 1;
        seen.epochs.current
    }

    fn decide(&self) -> (Duration, Answer) {
        let mut seen = self.seen();
        let health = seen.health;
        let rng = &mut seen.rng;
        let roll = rng.u32(0..100);
        let transient = |code: &str| {
            Answer::Fail(InvokeError::Transient {
                code: code.into(),
                message: "simulated".into(),
            })
        };
        match health {
            Health::Healthy => (Duration::ZERO, Answer::Accept),
            Health::Down => (Duration::ZERO, transient("ServiceException")),
            Health::Slow => (Duration::from_millis(rng.u64(500..8000)), Answer::Accept),
            Health::Flaky => match roll {
                0..55 => (Duration::ZERO, Answer::Accept),
                55..65 => (
                    Duration::ZERO,
                    Answer::Fail(InvokeError::Throttled {
                        code: "TooManyRequestsException".into(),
                        message: "simulated".into(),
                        retry_after: rng.bool().then(|| Duration::from_secs(rng.u64(1..4))),
                    }),
                ),
                65..80 => (Duration::ZERO, transient("ServiceException")),
                80..90 => (Duration::from_secs(rng.u64(1..10)), transient("Timeout")),
                90..98 => (Duration::from_millis(rng.u64(200..5000)), Answer::Accept),
                _ => (
                    Duration::ZERO,
                    Answer::Fail(InvokeError::Permanent {
                        code: "ResourceNotFoundException".into(),
                        message: "simulated".into(),
                    }),
                ),
            },
        }
    }

    fn record(&self, rule: &str, ids: &[u64]) {
        let mut seen = self.seen();
        let now = seen.epochs.current;
        for id in ids {
            let key = (rule.to_owned(), *id);
            *seen.accepted.entry(key.clone()).or_default() += 1;
            if let Some(last) = seen.epochs.last.insert(key, now)
                && last < now
            {
                *seen
                    .epochs
                    .dups
                    .entry((last + 1, rule.to_owned()))
                    .or_default() += 1;
            }
        }
    }
}

/// The rule and the message ids an event carries (each payload is its message's id).
pub fn parse_event(event: &[u8]) -> (String, Vec<u64>) {
    let value: serde_json::Value = serde_json::from_slice(event).unwrap_or_default();
    let rule = value["rule"].as_str().unwrap_or_default().to_owned();
    let ids = value["messages"]
        .as_array()
        .map(|ms| ms.iter().filter_map(|m| m["payload"].as_u64()).collect())
        .unwrap_or_default();
    (rule, ids)
}

impl Invoke for Lambda {
    async fn invoke(&self, request: InvokeRequest) -> Result<Vec<u8>, InvokeError> {
        let (delay, answer) = self.decide();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match answer {
            Answer::Accept => {
                let (rule, ids) = parse_event(&request.payload);
                self.record(&rule, &ids);
                Ok(Vec::new())
            }
            Answer::Fail(error) => Err(error),
        }
    }
}
