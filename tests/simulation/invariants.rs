//! The invariants the simulation checks (see `tests/simulation.rs`), after every step and at
//! the end, and what a broken one reports: its kind, the seed and step, and one line a person
//! can act on.

use std::collections::HashSet;

use mqtt_lambda_bridge::buffer::deadletter::DeadLetters;
use mqtt_lambda_bridge::core::config::WhenFull;
use mqtt_lambda_bridge::ingest::routes::StoreOutcome;

use super::{CAP_SLACK, Checked, KILL_BOUND, ORDER, POWER_BOUND, World, parse_event};

/// Which promise a run broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A store reported success (PUBACK, 202) for a message its `drop_newest` policy dropped.
    AckedButDropped,
    /// A rule in force has no delivery task, and nothing says so.
    Stalled,
    /// An acknowledged message was neither delivered, dead-lettered nor dropped by a counted
    /// policy.
    Lost,
    /// Ingest did not stop within 10 s of shutdown.
    ShutdownIgnored,
    /// A rule's buffer holds more than `max_size`.
    OverCap,
    /// A crash delivered more again than the bound allows.
    Duplicates,
}

/// One broken invariant.
#[derive(Debug, Clone)]
pub struct Violation {
    pub kind: Kind,
    pub seed: u64,
    pub step: usize,
    pub what: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} step {}: {:?}: {} (replay: SIM_SEED={} cargo nextest run --test simulation)",
            self.seed, self.step, self.kind, self.what, self.seed
        )
    }
}

impl World {
    /// [`Self::check`], passing what the profile ignores.
    pub(super) async fn check_unless_ignored(&mut self) -> Checked {
        match self.check().await {
            Err(v) if !self.profile.ignore.contains(&v.kind) => Err(v),
            _ => Ok(()),
        }
    }

    /// Accounts finished stores and checks the step's invariants.
    pub(super) async fn check(&mut self) -> Checked {
        self.collect_stores().await?;
        for spec in self.specs.iter().filter(|s| s.in_force) {
            let Some(live) = self.live.get_mut(&spec.name) else {
                continue;
            };
            if let Some(task) = live.task.take_if(|t| t.is_finished()) {
                let why = match task.await {
                    Ok(Ok(())) => "it ended".to_owned(),
                    Ok(Err(e)) => format!("it failed: {e}"),
                    Err(e) => format!("it panicked: {e}"),
                };
                return Err(self.violation(
                    Kind::Stalled,
                    format!(
                        "rule {} is in force but its delivery task stopped ({why}); ingest still \
                         acknowledges its messages and nothing retries or reports it",
                        spec.name
                    ),
                ));
            }
            let stats = live.route.queue.stats();
            if spec.when_full != WhenFull::Block && stats.bytes > spec.max_size + CAP_SLACK {
                return Err(self.violation(
                    Kind::OverCap,
                    format!(
                        "rule {} ({:?}) holds {} bytes in its buffer, over max_size {} \
                         ({} messages pending)",
                        spec.name, spec.when_full, stats.bytes, spec.max_size, stats.pending
                    ),
                ));
            }
        }
        self.check_duplicates()
    }

    pub(super) fn check_duplicates(&self) -> Checked {
        let seen = self.lambda.seen();
        for ((crash, rule), dups) in &seen.epochs.dups {
            let (allowed, what) = self
                .allowance
                .get(&(*crash, rule.clone()))
                .copied()
                .unwrap_or((0, "start"));
            if *dups > allowed {
                return Err(self.violation(
                    Kind::Duplicates,
                    format!(
                        "rule {rule}: {dups} messages delivered again after {what} number \
                         {crash}, over the bound of {allowed} (in flight plus {KILL_BOUND} per \
                         kill -9 or restart, {POWER_BOUND} per power cut)"
                    ),
                ));
            }
        }
        Ok(())
    }

    pub(super) async fn collect_stores(&mut self) -> Checked {
        let mut i = 0;
        while i < self.pending.len() {
            if !self.pending[i].handle.is_finished() {
                i += 1;
                continue;
            }
            let store = self.pending.swap_remove(i);
            // A rule the outcome names as dropped did not acknowledge the message as stored
            // (HTTP answers 503 naming it; MQTT's drop is the counted policy).
            let dropped: Vec<String> = match store.handle.await {
                Ok(StoreOutcome::Done { dropped }) => {
                    dropped.into_iter().map(|(rule, _)| rule).collect()
                }
                Ok(StoreOutcome::Stopping) | Err(_) => continue,
            };
            for (rule, ids) in &store.by_rule {
                if dropped.contains(rule) {
                    continue;
                }
                for id in ids {
                    self.acked.insert((rule.clone(), *id));
                }
                let alone = !store.overlapped.contains(rule);
                let before = store.newest_before.get(rule).copied().unwrap_or(0);
                let now = self
                    .live
                    .get(rule)
                    .map_or(0, |l| l.route.queue.counters().dropped_newest.load(ORDER));
                if alone && now > before {
                    return Err(self.violation(
                        Kind::AckedButDropped,
                        format!(
                            "a store of {} message(s) for rule {rule} reported success (PUBACK, \
                             HTTP 202) while drop_newest dropped {} message(s): acknowledged but \
                             never stored; first id {}",
                            ids.len(),
                            now - before,
                            ids.first().copied().unwrap_or(0)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every acknowledged message is delivered, dead-lettered or covered by a counted drop.
    pub(super) fn account(&self) -> Checked {
        let mut counted = self.counted.clone();
        for (name, live) in &self.live {
            let c = live.route.queue.counters();
            let n = c.dropped_oldest.load(ORDER) + c.expired.load(ORDER) + c.lost.load(ORDER);
            *counted.entry(name.clone()).or_default() += n;
        }
        let mut dead: HashSet<(String, u64)> = HashSet::new();
        for spec in &self.specs {
            let letters = DeadLetters::new(&self.rule_dir(&spec.name));
            for letter in letters.list().unwrap_or_default() {
                let event = serde_json::to_vec(&letter.event).unwrap_or_default();
                let (_, ids) = parse_event(&event);
                dead.extend(ids.into_iter().map(|id| (spec.name.clone(), id)));
            }
        }
        let seen = self.lambda.seen();
        for spec in &self.specs {
            let mut missing: Vec<u64> = self
                .acked
                .iter()
                .filter(|(rule, _)| *rule == spec.name)
                .filter(|k| !seen.accepted.contains_key(*k) && !dead.contains(*k))
                .map(|(_, id)| *id)
                .collect();
            missing.sort_unstable();
            let counted = counted.get(&spec.name).copied().unwrap_or(0);
            if missing.len() as u64 > counted {
                return Err(self.violation(
                    Kind::Lost,
                    format!(
                        "rule {} ({:?}): {} acknowledged messages never delivered nor \
                         dead-lettered, but only {counted} drops counted (drop_oldest, expired, \
                         corrupt); first missing id {}",
                        spec.name,
                        spec.when_full,
                        missing.len(),
                        missing[0]
                    ),
                ));
            }
        }
        Ok(())
    }
}
