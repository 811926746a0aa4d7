//! A rule's life while the daemon runs, as one state and one pure transition function:
//! [`next`] takes the state and what happened ([`Event`]) and returns the new state and what
//! the daemon must do ([`Effect`]). No I/O, no clock, no tokio: the daemon's reload performs the
//! effects and feeds back what it observes.
//!
//! ```text
//!  event \ state    │ Running            │ Retiring          │ Failed
//!  reload keeps it  │ steer if changed   │ → Running, steer  │ → Running, respawn
//!  removed          │ → Retiring         │ –                 │ → Stopped, left
//!  released         │ –                  │ retire            │ –
//!  task ends ok     │ respawn (1)        │ → Stopped (2)     │ –
//!  task ends: error │ → Failed, stalled  │ → Stopped, left   │ –
//!  shutdown         │ → Stopped          │ → Stopped, left   │ → Stopped, left
//!
//!  Stopped is final: a rule added back after it stopped starts a new life.
//!  (1) its drain ended just as a reload added it back  (2) drained: its buffer was delivered
//!  "left": what its buffer still holds is reported, with how to deliver it
//! ```
//!
//! Invariants:
//! - A rule whose delivery task ended on an error is never reported as drained: only a task
//!   that ended normally while retiring makes `Stopped { drained: true }`.
//! - A retirement waits for ingest to let go of every route set older than its removal
//!   (`Released` with the removal's generation); a release from an earlier removal, the rule
//!   having been added back and removed again since, changes nothing.
//! - A reload of a failed rule respawns its task over the same queue, which the new task
//!   rewinds to the first unacknowledged message: what the dead task had in flight or had read
//!   is read again, so nothing is acknowledged that was not delivered or dead-lettered.
//! - A failed rule still in force is reported stalled to the watchdog, on `/readyz` and in
//!   `mlb_rule_stalled` until it runs again or stops, so a service manager restarts the
//!   daemon; a removed rule is not waited for (a restart would not deliver it either).
//! - A task fails only on a closed queue or a bug: a read error is retried inside the task,
//!   which reports the rule stalled meanwhile (`delivery::pipeline`), and is no event here.
//! - `Stopped` is final: a rule added back after it stopped starts a new life.

/// Where a rule is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Life {
    /// In force; its delivery task runs.
    Running,
    /// Removed by the reload of `generation`: it takes no new messages; once ingest has let go
    /// of older route sets (`released`), its task delivers what the queue holds, then ends.
    Retiring {
        /// The route table generation that removed it.
        generation: u64,
        /// Whether its task was told to retire.
        released: bool,
    },
    /// In force, but its delivery task ended on an error: its buffer fills and nothing is
    /// delivered until a reload or a restart.
    Failed {
        /// What the task said, one line.
        reason: String,
    },
    /// No task runs and none will: removed (or shut down), its queue closed.
    Stopped {
        /// Whether it was retired and its task delivered everything before it ended (at
        /// shutdown, what is left is the next start's: not drained).
        drained: bool,
    },
}

/// What happened to a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A reload kept the rule (in the file, same name); `changed` when its settings differ.
    Reloaded {
        /// Its settings differ from those in force.
        changed: bool,
    },
    /// A reload removed the rule; the new route table has this generation.
    Removed {
        /// The route table generation without the rule.
        generation: u64,
    },
    /// Ingest let go of every route set older than `generation`.
    Released {
        /// The generation awaited.
        generation: u64,
    },
    /// Its delivery task ended: normally (a drain or a retirement finished) or on an error.
    Ended(Result<(), String>),
    /// The daemon is stopping and every delivery task has ended or was abandoned.
    Shutdown,
}

/// Why messages may be left in a stopped rule's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeftBecause {
    /// It was removed and stopped before its queue was read to the end.
    Removed,
    /// Its delivery task ended on an error.
    Failed,
}

/// What the daemon must do for a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send the running task the latest plan (a changed rule, or one added back).
    Steer,
    /// Wait until ingest lets go of route sets older than this generation, then report
    /// [`Event::Released`].
    AwaitRelease(u64),
    /// Tell the running task to deliver what its queue holds, then stop.
    Retire,
    /// Start a new delivery task over the rule's queue (from its durable ack position).
    Respawn,
    /// Log that the rule was removed and now drains.
    LogRemoved,
    /// Log that a removed rule was added back before it stopped.
    LogAddedBack,
    /// Log that the delivery task stopped on this error.
    LogFailed(String),
    /// Report the rule's delivery loop as stalled to the watchdog, so a service manager that
    /// watches it restarts the daemon, and the rule as stalled on `/readyz` and in metrics.
    MarkStalled,
    /// Stop reporting it stalled (a task runs again, or the rule stops).
    ClearStalled,
    /// Close the rule's queue and drop it from the rules reported.
    Close,
    /// Log that the removed rule's buffer was delivered.
    ReportDrained,
    /// Warn, when its buffer still holds messages, that they were left, and why.
    ReportLeftBehind(LeftBecause),
    /// Log the rule's counters.
    Summary,
}

/// The state after `event` in `life`, and what the daemon must do, in order.
pub fn next(life: Life, event: Event) -> (Life, Vec<Effect>) {
    match life {
        Life::Running => running(event),
        Life::Retiring {
            generation,
            released,
        } => retiring(generation, released, event),
        Life::Failed { reason } => failed(reason, event),
        Life::Stopped { drained } => (Life::Stopped { drained }, vec![]),
    }
}

/// [`next`] from `Running`.
fn running(event: Event) -> (Life, Vec<Effect>) {
    use Effect::*;
    match event {
        Event::Reloaded { changed } => (Life::Running, if changed { vec![Steer] } else { vec![] }),
        Event::Removed { generation } => (
            Life::Retiring {
                generation,
                released: false,
            },
            vec![LogRemoved, AwaitRelease(generation)],
        ),
        Event::Released { .. } => (Life::Running, vec![]),
        // Its drain ended just as it was added back: start it again over the same queue.
        Event::Ended(Ok(())) => (Life::Running, vec![Respawn]),
        Event::Ended(Err(reason)) => (
            Life::Failed {
                reason: reason.clone(),
            },
            vec![LogFailed(reason), MarkStalled],
        ),
        Event::Shutdown => (Life::Stopped { drained: false }, vec![Close, Summary]),
    }
}

/// [`next`] from `Retiring`, removed by the reload of `generation`.
fn retiring(generation: u64, released: bool, event: Event) -> (Life, Vec<Effect>) {
    use Effect::*;
    let stay = Life::Retiring {
        generation,
        released,
    };
    match event {
        Event::Reloaded { .. } => (Life::Running, vec![Steer, LogAddedBack]),
        // Already out of the file: a reload cannot remove it again.
        Event::Removed { .. } => (stay, vec![]),
        Event::Released { generation: g } if g == generation && !released => (
            Life::Retiring {
                generation,
                released: true,
            },
            vec![Retire],
        ),
        Event::Released { .. } => (stay, vec![]),
        Event::Ended(Ok(())) => (
            Life::Stopped { drained: true },
            vec![Close, ReportDrained, Summary],
        ),
        Event::Ended(Err(reason)) => (
            Life::Stopped { drained: false },
            vec![
                LogFailed(reason),
                Close,
                ReportLeftBehind(LeftBecause::Removed),
                Summary,
            ],
        ),
        Event::Shutdown => (
            Life::Stopped { drained: false },
            vec![Close, Summary, ReportLeftBehind(LeftBecause::Removed)],
        ),
    }
}

/// [`next`] from `Failed`: no task runs.
fn failed(reason: String, event: Event) -> (Life, Vec<Effect>) {
    use Effect::*;
    match event {
        Event::Reloaded { .. } => (Life::Running, vec![ClearStalled, Respawn]),
        Event::Removed { .. } => (
            Life::Stopped { drained: false },
            vec![
                ClearStalled,
                Close,
                ReportLeftBehind(LeftBecause::Failed),
                Summary,
            ],
        ),
        // No task runs: nothing of it can end or be released.
        Event::Released { .. } | Event::Ended(_) => (Life::Failed { reason }, vec![]),
        Event::Shutdown => (
            Life::Stopped { drained: false },
            vec![
                ClearStalled,
                Close,
                Summary,
                ReportLeftBehind(LeftBecause::Failed),
            ],
        ),
    }
}

impl Life {
    /// Whether the rule is out of the file (retiring or stopped): it takes no new messages.
    pub fn is_removed(&self) -> bool {
        matches!(self, Life::Retiring { .. } | Life::Stopped { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::Effect::*;
    use super::*;

    fn retiring(generation: u64, released: bool) -> Life {
        Life::Retiring {
            generation,
            released,
        }
    }

    fn failed() -> Life {
        Life::Failed {
            reason: "rule a: disk full".into(),
        }
    }

    fn ended_err() -> Event {
        Event::Ended(Err("rule a: disk full".into()))
    }

    /// Every state against every event: the state after, and the effects in order.
    #[test]
    fn every_state_and_event() {
        let stopped = |drained| Life::Stopped { drained };
        let why = "rule a: disk full".to_owned();
        let unchanged = Event::Reloaded { changed: false };
        let changed = Event::Reloaded { changed: true };
        let removed = Event::Removed { generation: 7 };
        let released = Event::Released { generation: 7 };
        let ok = Event::Ended(Ok(()));
        #[rustfmt::skip]
        let table: Vec<(Life, Event, Life, Vec<Effect>)> = vec![
            (Life::Running, unchanged.clone(), Life::Running, vec![]),
            (Life::Running, changed.clone(), Life::Running, vec![Steer]),
            (Life::Running, removed.clone(), retiring(7, false), vec![LogRemoved, AwaitRelease(7)]),
            (Life::Running, released.clone(), Life::Running, vec![]),
            (Life::Running, ok.clone(), Life::Running, vec![Respawn]),
            (Life::Running, ended_err(), failed(), vec![LogFailed(why.clone()), MarkStalled]),
            (Life::Running, Event::Shutdown, stopped(false), vec![Close, Summary]),

            (retiring(7, false), unchanged.clone(), Life::Running, vec![Steer, LogAddedBack]),
            (retiring(7, true), changed.clone(), Life::Running, vec![Steer, LogAddedBack]),
            (retiring(7, false), removed.clone(), retiring(7, false), vec![]),
            (retiring(7, false), released.clone(), retiring(7, true), vec![Retire]),
            (retiring(7, true), released.clone(), retiring(7, true), vec![]),
            (retiring(7, false), ok.clone(), stopped(true), vec![Close, ReportDrained, Summary]),
            (retiring(7, true), ended_err(), stopped(false),
                vec![LogFailed(why.clone()), Close, ReportLeftBehind(LeftBecause::Removed), Summary]),
            (retiring(7, true), Event::Shutdown, stopped(false),
                vec![Close, Summary, ReportLeftBehind(LeftBecause::Removed)]),

            (failed(), unchanged.clone(), Life::Running, vec![ClearStalled, Respawn]),
            (failed(), changed.clone(), Life::Running, vec![ClearStalled, Respawn]),
            (failed(), removed.clone(), stopped(false),
                vec![ClearStalled, Close, ReportLeftBehind(LeftBecause::Failed), Summary]),
            (failed(), released.clone(), failed(), vec![]),
            (failed(), ok.clone(), failed(), vec![]),
            (failed(), ended_err(), failed(), vec![]),
            (failed(), Event::Shutdown, stopped(false),
                vec![ClearStalled, Close, Summary, ReportLeftBehind(LeftBecause::Failed)]),
        ];
        for (before, event, after, effects) in table {
            let what = format!("{before:?} + {event:?}");
            assert_eq!(next(before, event), (after, effects), "{what}");
        }
        for drained in [true, false] {
            for event in [
                unchanged.clone(),
                changed.clone(),
                removed.clone(),
                released.clone(),
                ok.clone(),
                ended_err(),
                Event::Shutdown,
            ] {
                assert_eq!(
                    next(stopped(drained), event),
                    (stopped(drained), vec![]),
                    "stopped is final"
                );
            }
        }
    }

    #[test]
    fn a_failed_rule_is_not_reported_as_drained() {
        for life in [Life::Running, retiring(3, false), retiring(3, true)] {
            let (after, effects) = next(life.clone(), ended_err());
            assert!(!effects.contains(&ReportDrained), "{life:?}: {effects:?}");
            assert_ne!(after, Life::Stopped { drained: true }, "{life:?}");
            let (after, effects) = next(after, Event::Shutdown);
            assert!(!effects.contains(&ReportDrained), "{life:?}: {effects:?}");
            assert_eq!(after, Life::Stopped { drained: false }, "{life:?}");
        }
        let (after, effects) = next(failed(), Event::Removed { generation: 4 });
        assert_eq!(after, Life::Stopped { drained: false });
        assert!(effects.contains(&ReportLeftBehind(LeftBecause::Failed)));
        assert!(!effects.contains(&ReportDrained));
    }

    #[test]
    fn a_reload_of_a_failed_rule_respawns_it() {
        for changed in [false, true] {
            let (after, effects) = next(failed(), Event::Reloaded { changed });
            assert_eq!(after, Life::Running);
            assert_eq!(
                effects,
                vec![ClearStalled, Respawn],
                "no longer stalled, running again"
            );
        }
    }

    #[test]
    fn a_failed_rule_is_reported_stalled_until_it_runs_again_or_stops() {
        let (life, effects) = next(Life::Running, ended_err());
        assert!(effects.contains(&MarkStalled), "{effects:?}");
        for event in [
            Event::Reloaded { changed: false },
            Event::Removed { generation: 1 },
            Event::Shutdown,
        ] {
            let (_, effects) = next(life.clone(), event);
            assert_eq!(effects.first(), Some(&ClearStalled), "{effects:?}");
        }
        let (_, effects) = next(retiring(1, true), ended_err());
        assert!(
            !effects.contains(&MarkStalled),
            "a removed rule is not waited for: {effects:?}"
        );
    }

    #[test]
    fn a_release_from_an_earlier_removal_does_not_retire_the_rule() {
        let (life, _) = next(Life::Running, Event::Removed { generation: 2 });
        let (life, _) = next(life, Event::Reloaded { changed: false });
        let (life, _) = next(life, Event::Removed { generation: 5 });
        let (life, effects) = next(life, Event::Released { generation: 2 });
        assert_eq!(life, retiring(5, false));
        assert!(effects.is_empty(), "{effects:?}");
        let (life, effects) = next(life, Event::Released { generation: 5 });
        assert_eq!((life, effects), (retiring(5, true), vec![Retire]));
    }
}
