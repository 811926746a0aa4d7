//! A seeded simulation of the session state machine (`session.rs`) against a simulated broker
//! (tests only; the whole-path simulation of buffer, delivery and reload is
//! `tests/simulation.rs`, which cannot reach this private module).
//!
//! One generator schedules connects (the broker keeping or losing the session), SUBSCRIBEs and
//! UNSUBSCRIBEs going out, reaching the broker and being answered, connections breaking in
//! between, and reloads adding and removing rules. The session is fed each event as the poll
//! task feeds it; its `Subscribe` is performed as the subscriber performs it (an UNSUBSCRIBE
//! for each filter the session may hold that no rule uses, then the filters in force that the
//! broker's session has not answered, one request). Invariant, whenever the connection is up
//! and no request is outstanding: the broker's subscriptions are exactly the filters in force —
//! a SUBSCRIBE or an UNSUBSCRIBE lost with its connection is sent again on a resumed session.
//!
//! `SIM_SEED=S` replays one seed, `SIM_SEEDS=N` runs N.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use super::acks::AckLine;
use super::protocol::Granted;
use super::replies::ReplyBook;
use super::session::{
    Action, Request, RequestsHeld, Session, SessionEvent, Shared, forgotten, unanswered,
};

/// No reply book and no ack line: this simulation is about subscriptions only.
struct Nothing;

impl Shared<()> for Nothing {
    fn book<R>(&self, _f: impl FnOnce(&mut ReplyBook<()>) -> R) -> Option<R> {
        None
    }
    fn line<R>(&self, _f: impl FnOnce(&mut AckLine) -> R) -> Option<R> {
        None
    }
}

/// A request on its way: a SUBSCRIBE of some filters or an UNSUBSCRIBE of one.
#[derive(Debug, Clone)]
enum Req {
    Sub(Vec<String>),
    Unsub(String),
}

/// The simulated broker and connection.
#[derive(Default)]
struct Broker {
    connected: bool,
    /// It still holds our session (subscriptions survive a reconnect).
    has_session: bool,
    subscriptions: BTreeSet<String>,
    /// Handed to the event loop, not yet sent: they survive a broken connection.
    queued: VecDeque<Req>,
    /// How many of `queued` (the oldest) rumqttc moved to its pending list when the
    /// connection broke; a new session drops those. The rest were handed during the outage
    /// and wait in its request channel, which a new session leaves alone.
    pending: usize,
    /// Sent on this connection, not yet at the broker: lost when it breaks.
    sent: VecDeque<(u16, Req)>,
    /// At the broker, not yet answered.
    arrived: VecDeque<(u16, Req)>,
    next_pkid: u16,
}

struct SessionWorld {
    seed: u64,
    rng: fastrand::Rng,
    session: Session,
    broker: Broker,
    /// The filters of the rules in force.
    filters: BTreeSet<String>,
    /// Rules added so far (each gets a filter of its own).
    added: usize,
    now: Instant,
}

impl SessionWorld {
    fn new(seed: u64) -> Self {
        let mut filters = BTreeSet::new();
        filters.insert("t/0/#".to_owned());
        SessionWorld {
            seed,
            rng: fastrand::Rng::with_seed(seed),
            session: Session::new(),
            // A previous process left its session at the broker, with the rules it had then.
            broker: Broker {
                has_session: true,
                subscriptions: filters.clone(),
                ..Broker::default()
            },
            filters,
            added: 0,
            now: Instant::now(),
        }
    }

    fn feed(&mut self, event: SessionEvent) {
        self.now += Duration::from_millis(10);
        for action in self.session.on::<()>(event, self.now, &Nothing) {
            if let Action::Subscribe(standing) = action {
                let current: Vec<(String, u8)> =
                    self.filters.iter().map(|f| (f.clone(), 1)).collect();
                for filter in forgotten(&current, &standing) {
                    self.unrequest(filter);
                }
                let asked: Vec<String> = unanswered(current, &standing.answered)
                    .into_iter()
                    .map(|(filter, _)| filter)
                    .collect();
                if !asked.is_empty() {
                    self.request(asked);
                }
            }
        }
    }

    /// The subscriber hands a SUBSCRIBE to the event loop.
    fn request(&mut self, filters: Vec<String>) {
        let named = filters
            .iter()
            .map(|f| (f.clone(), 1, vec![f.clone()]))
            .collect();
        self.broker.queued.push_back(Req::Sub(filters));
        self.feed(SessionEvent::Requested(Request::Subscribe(named)));
    }

    /// The subscriber hands an UNSUBSCRIBE to the event loop.
    fn unrequest(&mut self, filter: String) {
        self.broker.queued.push_back(Req::Unsub(filter.clone()));
        self.feed(SessionEvent::Requested(Request::Unsubscribe(filter)));
    }

    fn step(&mut self) {
        let b = &mut self.broker;
        match self.rng.u32(0..10) {
            0 | 1 if !b.connected => {
                if self.rng.u32(0..5) == 0 {
                    // The broker restarted without persistence meanwhile.
                    b.has_session = false;
                }
                let pending = std::mem::take(&mut b.pending);
                if !b.has_session {
                    b.subscriptions.clear();
                    // rumqttc drops its pending list when the session is new (`poll`), not
                    // what waits in its request channel.
                    b.queued.drain(..pending.min(b.queued.len()));
                }
                let present = b.has_session;
                b.connected = true;
                b.has_session = true;
                self.feed(SessionEvent::Connected {
                    session_present: present,
                    max_packet_size: None,
                });
            }
            2 | 3 if b.connected => {
                let Some(req) = b.queued.pop_front() else {
                    return;
                };
                b.next_pkid = b.next_pkid.wrapping_add(1).max(1);
                let pkid = b.next_pkid;
                b.sent.push_back((pkid, req));
                self.feed(SessionEvent::RequestSent(pkid));
            }
            4 | 5 if b.connected => self.arrive(),
            6 | 7 if b.connected => self.answer(),
            8 if b.connected => {
                b.connected = false;
                b.sent.clear();
                b.arrived.clear();
                // rumqttc's `clean()` moves what its request channel holds to its pending list.
                b.pending = b.queued.len();
                let requests = RequestsHeld {
                    taken: 0,
                    pending: b.pending,
                };
                self.feed(SessionEvent::ConnectionLost {
                    error: "connection reset".into(),
                    retry_in: Duration::from_secs(1),
                    held: Vec::new(),
                    unreported: Vec::new(),
                    requests,
                });
            }
            9 => self.reload(),
            _ => {}
        }
    }

    /// The oldest request on the wire reaches the broker.
    fn arrive(&mut self) {
        let b = &mut self.broker;
        if let Some((pkid, req)) = b.sent.pop_front() {
            match &req {
                Req::Sub(filters) => b.subscriptions.extend(filters.iter().cloned()),
                Req::Unsub(filter) => {
                    b.subscriptions.remove(filter);
                }
            }
            b.arrived.push_back((pkid, req));
        }
    }

    /// The broker answers the oldest request it has.
    fn answer(&mut self) {
        let answer = match self.broker.arrived.pop_front() {
            Some((pkid, Req::Sub(filters))) => SessionEvent::SubAck {
                pkid,
                granted: vec![Granted::Qos(1); filters.len()],
            },
            Some((pkid, Req::Unsub(_))) => SessionEvent::UnsubAck {
                pkid,
                refused: None,
            },
            None => return,
        };
        self.feed(answer);
    }

    /// A reload adds a rule or removes one; the subscriber sends its SUBSCRIBE or UNSUBSCRIBE.
    fn reload(&mut self) {
        let removable: Vec<String> = self.filters.iter().cloned().collect();
        if removable.len() > 1 && self.rng.bool() {
            let filter = removable[self.rng.usize(0..removable.len())].clone();
            self.filters.remove(&filter);
            self.unrequest(filter);
        } else {
            self.added += 1;
            let filter = format!("t/{}/#", self.added);
            self.filters.insert(filter.clone());
            self.request(vec![filter]);
        }
    }

    /// The broker has every filter in force once the connection is up and quiet.
    fn check(&self, step: usize) -> Result<(), String> {
        let b = &self.broker;
        let quiet = b.connected && b.queued.is_empty() && b.sent.is_empty();
        if !quiet || !b.arrived.is_empty() {
            return Ok(());
        }
        if let Some(missing) = self.filters.difference(&b.subscriptions).next() {
            return Err(format!(
                "seed {} step {step}: Unsubscribed: filter {missing} is in force but the broker \
                 has no subscription for it, and nothing is outstanding that would make one (a \
                 SUBSCRIBE lost with its connection is not sent again on a resumed session) \
                 (replay: SIM_SEED={} cargo nextest run --lib session_sim)",
                self.seed, self.seed
            ));
        }
        match b.subscriptions.difference(&self.filters).next() {
            None => Ok(()),
            Some(stale) => Err(format!(
                "seed {} step {step}: Stale: filter {stale} is used by no rule but the broker \
                 still has a subscription for it, and nothing is outstanding that would remove \
                 it (an UNSUBSCRIBE lost with its connection is not sent again on a resumed \
                 session) (replay: SIM_SEED={} cargo nextest run --lib session_sim)",
                self.seed, self.seed
            )),
        }
    }

    fn run(mut self, steps: usize) -> Result<(), String> {
        for step in 0..steps {
            self.step();
            self.check(step)?;
        }
        Ok(())
    }
}

/// Whether a SUBSCRIBE lost with its connection is known not to be resent on a resumed
/// session (it was, before the session kept what the broker answered); the test then asserts
/// the simulation still finds it.
const KNOWN_BUG: bool = false;

fn seeds() -> Vec<u64> {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    match var("SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..var("SIM_SEEDS").unwrap_or(300)).collect(),
    }
}

#[test]
fn the_broker_has_every_filter_in_force_whenever_the_connection_is_quiet() {
    let failures: Vec<String> = seeds()
        .into_iter()
        .filter_map(|seed| SessionWorld::new(seed).run(300).err())
        .collect();
    if KNOWN_BUG {
        assert!(
            !failures.is_empty(),
            "no seed finds the lost SUBSCRIBE any more: set KNOWN_BUG to false"
        );
        eprintln!(
            "known bug: {} seeds; first: {}",
            failures.len(),
            failures[0]
        );
    } else {
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
