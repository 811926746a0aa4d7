//! Routing: which rules a received message goes to, and storing it there before it is
//! acknowledged.
//!
//! One [`Route`] per rule (`crate::rule`) owns everything of that rule that lives while the
//! daemon runs.
//!
//! Deciding is pure ([`Routes::admit`]): match the topic, and set aside a message whose event
//! alone would exceed Lambda's limit (it can never be invoked, so it goes to the dead-letter
//! store instead of the queue). Storing ([`Routes::store`]) then performs that decision: the
//! set-aside writes and one durable append per rule, all rules at once. Only when `store`
//! returns [`StoreOutcome::Done`] may the caller acknowledge the messages; it names the rules
//! whose `when_full = "drop_newest"` dropped the new messages instead of storing them. MQTT
//! acknowledges those too (the drop is the configured policy, counted and logged by the
//! buffer); HTTP ingest must not answer 202 for them. A dropped message is never counted as
//! queued.
//!
//! The set in force is swappable ([`RouteTable`]): a reload (`daemon/reload`) puts a new
//! [`Routes`] in force and ingest takes the current one for each group of publishes, holding
//! that [`Snapshot`] until the group is stored. A message matched to a rule is therefore
//! appended to it even when a reload removes the rule meanwhile, and
//! [`RouteTable::released_before`] says when no snapshot older than a reload is held any more,
//! so a removed rule's queue is drained to its real end.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::buffer::deadletter::{DeadLetter, timestamp};
use crate::buffer::{Appended, Queue};
use crate::core::envelope::{self, Message};
use crate::core::rules::RuleSet;
use crate::core::shutdown::Shutdown;
use crate::core::sql::{self, Statement};
use crate::core::stats::RuleStats;
use crate::rule::Route;
use crate::shaping::plan::RulePlan;

/// First delay before a failed buffer write is tried again.
const STORE_RETRY_MIN_DELAY: Duration = Duration::from_millis(100);
/// Longest delay between two tries: once space is back (a delivered segment reclaimed, the
/// disk cleaned up), ingest resumes within this.
const STORE_RETRY_MAX_DELAY: Duration = Duration::from_secs(1);

/// After shutdown starts, how long a store already under way may still take: an append being
/// written finishes within milliseconds; one waiting for room (`when_full = "block"`) is given
/// up, unacknowledged.
const STORE_STOP_GRACE: Duration = Duration::from_millis(500);

/// One message as received, before routing.
#[derive(Debug, Clone)]
pub struct Received {
    /// The concrete topic.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// The QoS it was delivered with.
    pub qos: u8,
    /// The retain flag.
    pub retain: bool,
    /// MQTT 5 user properties and content type, when present.
    pub properties: Option<Box<envelope::Properties>>,
}

/// What [`Routes::admit`] decided for a group of received messages.
#[derive(Debug, Default)]
pub struct Admission {
    /// Per route (in route order), the messages to append to its queue, in order.
    pub append: Vec<Vec<Message>>,
    /// Messages too large for one invocation: route index, message, its event's size.
    pub set_aside: Vec<(usize, Message, usize)>,
    /// Messages that matched no rule.
    pub unmatched: usize,
    /// The producer already held these messages back for the buffers' `max_ack_delay` (MQTT
    /// ingest): the buffers write them without waiting again.
    pub gathered: bool,
    /// Messages a rule's SQL WHERE did not keep: route index, the message's id, and which
    /// condition was not true (`Statement::condition`). Nothing is stored for them;
    /// [`Routes::store`] counts them once the rest is stored.
    pub filtered: Vec<(usize, uuid::Uuid, usize)>,
}

/// What [`Routes::store`] did with an admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Every message went into its rule's buffer or dead-letter store, except those a rule's
    /// `when_full` policy dropped: `dropped` names those rules (rule name, messages dropped),
    /// in rule order; empty when everything was stored.
    Done {
        /// Rules whose buffer dropped the new messages, with how many.
        dropped: Vec<(String, u64)>,
    },
    /// Shutdown came first: nothing may be acknowledged.
    Stopping,
}

impl StoreOutcome {
    /// Whether the messages may be acknowledged to the broker (stored, or dropped by policy).
    pub fn is_done(&self) -> bool {
        matches!(self, StoreOutcome::Done { .. })
    }
}

/// The rules in force and the matcher over their filters.
pub struct Routes<Q> {
    matcher: RuleSet,
    routes: Vec<Arc<Route<Q>>>,
}

impl<Q: Queue> Routes<Q> {
    /// Routes in rule order (the order decides nothing but logs).
    pub fn new(routes: Vec<Arc<Route<Q>>>) -> Self {
        Routes {
            matcher: RuleSet::new(routes.iter().map(|r| r.filter.clone())),
            routes,
        }
    }

    /// Every route.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route<Q>>> {
        self.routes.iter()
    }

    /// The route of the rule called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Route<Q>>> {
        self.routes.iter().find(|r| r.plan.name == name)
    }

    /// The subscriptions these routes need: each filter once, with the highest QoS a rule
    /// asks of it, in rule order.
    pub fn subscriptions(&self) -> Vec<(String, u8)> {
        let mut subscriptions: Vec<(String, u8)> = Vec::new();
        for route in &self.routes {
            match subscriptions.iter_mut().find(|(f, _)| *f == route.filter) {
                Some((_, qos)) => *qos = (*qos).max(route.qos),
                None => subscriptions.push((route.filter.clone(), route.qos)),
            }
        }
        subscriptions
    }

    /// Decides where each message goes. Pure but for the fresh ids, which carry `now`.
    pub fn admit(
        &self,
        received: impl IntoIterator<Item = Received>,
        now: SystemTime,
    ) -> Admission {
        let mut admission = Admission {
            append: vec![Vec::new(); self.routes.len()],
            ..Admission::default()
        };
        for r in received {
            let matched: Vec<usize> = self.matcher.matching(&r.topic).collect();
            if matched.is_empty() {
                tracing::debug!(topic = %r.topic, "no rule matches; acknowledged and dropped");
                admission.unmatched += 1;
                continue;
            }
            // Every rule's copy carries the same id; the last rule takes the message itself.
            let message = Message::received(r.topic, r.payload, r.qos, r.retain, now)
                .with_properties(r.properties);
            let id = message.id;
            let copies = std::iter::repeat_n(message, matched.len());
            // The payload as JSON, parsed once for every SQL rule that reads it.
            let mut parsed: Option<Option<serde_json::Value>> = None;
            for (i, copy) in matched.into_iter().zip(copies) {
                let plan = &self.routes[i].plan;
                let copy = if plan.reply.is_some() {
                    copy
                } else {
                    copy.without_reply_fields()
                };
                let copy = match &plan.sql {
                    None => copy,
                    Some(statement) => match apply_sql(statement, copy, &mut parsed) {
                        Ok(copy) => copy,
                        Err(condition) => {
                            tracing::debug!(rule = %plan.name, id = %id, condition = statement.condition(condition), "the rule's SQL WHERE does not keep this message: acknowledged, not stored");
                            admission.filtered.push((i, id, condition));
                            continue;
                        }
                    },
                };
                match self.routes[i].plan.oversize(&copy) {
                    Some(size) => admission.set_aside.push((i, copy, size)),
                    None => admission.append[i].push(copy),
                }
            }
        }
        admission
    }

    /// Performs an admission: set-aside messages into their dead-letter stores, the rest
    /// appended to their queues, every rule at once. A failing store is retried until it works
    /// (the broker keeps the unacknowledged messages meanwhile); [`StoreOutcome::Stopping`] when
    /// shutdown came first, and then nothing may be acknowledged.
    pub async fn store(&self, admission: Admission, shutdown: &Shutdown) -> StoreOutcome {
        let now = SystemTime::now();
        let filtered = admission.filtered;
        for (i, message, size) in admission.set_aside {
            let route = &self.routes[i];
            log_oversize(&route.plan, &message, size);
            let letter = set_aside_letter(&route.plan, &message, size, now);
            let letters = route.dead_letters.clone();
            let write = move || {
                let (letters, letter) = (letters.clone(), letter.clone());
                async move {
                    tokio::task::spawn_blocking(move || letters.append(&letter))
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())
                }
            };
            let what = "the dead-letter store";
            if retry_until_stored(&route.plan.name, what, shutdown, write)
                .await
                .is_none()
            {
                return StoreOutcome::Stopping;
            }
            RuleStats::add(&route.stats.set_aside, 1);
            RuleStats::add(&route.stats.dead_lettered, 1);
        }
        let mut appends = JoinSet::new();
        for (i, (route, messages)) in self.routes.iter().zip(admission.append).enumerate() {
            if messages.is_empty() {
                continue;
            }
            let (route, shutdown) = (route.clone(), shutdown.clone());
            let gathered = admission.gathered;
            appends.spawn(async move {
                let queue = route.queue.clone();
                let append = move || {
                    let (queue, messages) = (queue.clone(), messages.clone());
                    async move {
                        let appended = if gathered {
                            queue.append_gathered(messages).await
                        } else {
                            queue.append(messages).await
                        };
                        appended.map_err(|e| e.to_string())
                    }
                };
                let appended: Option<Appended> =
                    retry_until_stored(&route.plan.name, "the buffer", &shutdown, append).await;
                if let Some(appended) = appended {
                    // What the policy dropped is counted by the buffer as dropped, not here.
                    RuleStats::add(&route.stats.queued, appended.stored);
                }
                (i, route.plan.name.clone(), appended)
            });
        }
        let mut dropped = Vec::new();
        let mut stopping = false;
        while let Some(joined) = appends.join_next().await {
            match joined {
                Ok((i, rule, Some(appended))) if appended.dropped > 0 => {
                    dropped.push((i, rule, appended.dropped));
                }
                Ok((_, _, Some(_))) => {}
                Ok((_, _, None)) | Err(_) => stopping = true,
            }
        }
        if stopping {
            return StoreOutcome::Stopping;
        }
        dropped.sort_unstable_by_key(|(i, _, _)| *i);
        for (i, _, _) in filtered {
            RuleStats::add(&self.routes[i].stats.filtered, 1);
        }
        StoreOutcome::Done {
            dropped: dropped.into_iter().map(|(_, rule, n)| (rule, n)).collect(),
        }
    }
}

/// The route set in force, swappable while ingest runs: a reload replaces, ingest takes
/// snapshots. Cheap to clone (all clones share the table).
pub struct RouteTable<Q> {
    shared: Arc<TableShared<Q>>,
}

impl<Q> Clone for RouteTable<Q> {
    fn clone(&self) -> Self {
        RouteTable {
            shared: self.shared.clone(),
        }
    }
}

struct TableShared<Q> {
    state: std::sync::Mutex<TableState<Q>>,
    /// Told whenever a snapshot is let go.
    let_go: Notify,
}

struct TableState<Q> {
    current: Arc<Routes<Q>>,
    /// Bumped by every replace; a snapshot carries the generation it was taken at.
    generation: u64,
    /// Snapshots held now, by generation.
    held: std::collections::BTreeMap<u64, usize>,
}

/// A route set taken for one group of messages; while it is held, a reload that removed one of
/// its rules waits before draining that rule's queue.
pub struct Snapshot<Q> {
    routes: Arc<Routes<Q>>,
    generation: u64,
    shared: Arc<TableShared<Q>>,
}

impl<Q> std::ops::Deref for Snapshot<Q> {
    type Target = Routes<Q>;
    fn deref(&self) -> &Routes<Q> {
        &self.routes
    }
}

impl<Q> Drop for Snapshot<Q> {
    fn drop(&mut self) {
        if let Ok(mut state) = self.shared.state.lock()
            && let Some(n) = state.held.get_mut(&self.generation)
        {
            *n -= 1;
            if *n == 0 {
                state.held.remove(&self.generation);
            }
        }
        self.shared.let_go.notify_waiters();
    }
}

impl<Q: Queue> RouteTable<Q> {
    /// A table holding `routes`.
    pub fn new(routes: Routes<Q>) -> Self {
        RouteTable {
            shared: Arc::new(TableShared {
                state: std::sync::Mutex::new(TableState {
                    current: Arc::new(routes),
                    generation: 0,
                    held: Default::default(),
                }),
                let_go: Notify::new(),
            }),
        }
    }

    /// The set in force now, to look at (not to store messages with: see [`Self::snapshot`]).
    pub fn current(&self) -> Arc<Routes<Q>> {
        match self.shared.state.lock() {
            Ok(state) => state.current.clone(),
            Err(poisoned) => poisoned.into_inner().current.clone(),
        }
    }

    /// The set in force now, held until the snapshot is dropped: match and store with it.
    pub fn snapshot(&self) -> Snapshot<Q> {
        let mut state = match self.shared.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        };
        let generation = state.generation;
        *state.held.entry(generation).or_default() += 1;
        Snapshot {
            routes: state.current.clone(),
            generation,
            shared: self.shared.clone(),
        }
    }

    /// Puts `routes` in force for every message matched from now on. Returns the generation
    /// it starts, for [`Self::released_before`].
    pub fn replace(&self, routes: Routes<Q>) -> u64 {
        let mut state = match self.shared.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        };
        state.current = Arc::new(routes);
        state.generation += 1;
        state.generation
    }

    /// Completes once no snapshot taken before `generation` is held: every message matched
    /// against an older set is stored (or was given back to the broker unacknowledged).
    pub fn released_before(
        &self,
        generation: u64,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let shared = self.shared.clone();
        async move {
            loop {
                let let_go = shared.let_go.notified();
                tokio::pin!(let_go);
                let_go.as_mut().enable();
                let oldest = match shared.state.lock() {
                    Ok(state) => state.held.keys().next().copied(),
                    Err(_) => None,
                };
                if oldest.is_none_or(|g| g >= generation) {
                    return;
                }
                let_go.await;
            }
        }
    }
}

/// Runs `attempt` until it succeeds, backing off (capped at [`STORE_RETRY_MAX_DELAY`]) and
/// logging the first failure; `None` when shutdown came first. Once shutdown starts, an
/// attempt still running gets [`STORE_STOP_GRACE`] and is then given up: a write finishes well
/// within it, a wait for room in a full `block` buffer does not hold the stop up. What is given
/// up is not acknowledged; the broker sends it again after the restart.
async fn retry_until_stored<T, F, Fut>(
    rule: &str,
    what: &str,
    shutdown: &Shutdown,
    attempt: F,
) -> Option<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let mut backoff =
        crate::core::retry::retry_delays(STORE_RETRY_MIN_DELAY, STORE_RETRY_MAX_DELAY);
    let mut failures = 0u32;
    let stopping = async {
        shutdown.wait().await;
        tokio::time::sleep(STORE_STOP_GRACE).await;
    };
    tokio::pin!(stopping);
    loop {
        let result = tokio::select! {
            result = attempt() => result,
            _ = &mut stopping => {
                tracing::info!(rule, "stopping: messages still waiting for {what} are not acknowledged; the broker sends them again after the restart");
                return None;
            }
        };
        match result {
            Ok(stored) => {
                if failures > 0 {
                    tracing::info!(
                        rule,
                        failures,
                        "writing {what} works again; acknowledging the held messages"
                    );
                }
                return Some(stored);
            }
            // Stopping: the buffer may be closed under it; nothing to fix, nothing acknowledged.
            Err(error) if shutdown.is_triggered() => {
                tracing::info!(rule, error = %error, "stopping: messages not written to {what} are not acknowledged; the broker sends them again after the restart");
                return None;
            }
            Err(error) => {
                failures += 1;
                if failures == 1 {
                    tracing::error!(rule, error = %error, "cannot write {what}: not acknowledging these messages until they are stored (the broker keeps them; an HTTP sender gets 503 after 10s); retrying");
                } else {
                    tracing::debug!(rule, error = %error, "still cannot write {what}");
                }
                let delay = backoff.next().unwrap_or(STORE_RETRY_MAX_DELAY);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.wait() => return None,
                }
            }
        }
    }
}

/// A rule's SQL statement applied to its copy of a message: the copy to store, its payload the
/// SELECT result, or the WHERE condition that did not keep it. `parsed` holds the whole payload
/// as JSON once a `SELECT *` statement needed it, for the message's other rules; the others read
/// only the fields they name.
fn apply_sql(
    statement: &Statement,
    mut copy: Message,
    parsed: &mut Option<Option<serde_json::Value>>,
) -> Result<Message, usize> {
    let own;
    let payload = if statement.reads_whole_payload() {
        parsed.get_or_insert_with(|| sql::parse_payload(&copy.payload))
    } else {
        own = statement.parse_payload(&copy.payload);
        &own
    };
    let input = sql::Input {
        topic: &copy.topic,
        payload: payload.as_ref(),
        received_ms: copy.received_at_ms(),
    };
    match statement.apply(&input) {
        sql::Outcome::Filtered(condition) => Err(condition),
        sql::Outcome::Kept(None) => Ok(copy),
        sql::Outcome::Kept(Some(payload)) => {
            copy.payload = payload;
            Ok(copy)
        }
    }
}

fn log_oversize(plan: &RulePlan, message: &Message, size: usize) {
    tracing::error!(
        rule = %plan.name, topic = %message.topic, id = %message.id,
        payload_bytes = message.payload.len(), event_bytes = size,
        limit = plan.invocation.payload_limit(),
        "message too large for one Lambda invocation: set aside in the dead-letter store, not invoked"
    );
}

/// The dead letter for a message too large for Lambda.
fn set_aside_letter(
    plan: &RulePlan,
    message: &Message,
    size: usize,
    now: SystemTime,
) -> DeadLetter {
    let event = envelope::encode_event(&plan.name, std::slice::from_ref(message));
    DeadLetter {
        rule: plan.name.clone(),
        reason: format!(
            "the event would be {size} bytes; Lambda accepts at most {} for this invocation type",
            plan.invocation.payload_limit()
        ),
        code: "PayloadTooLarge".into(),
        attempts: 0,
        first_attempt_at: timestamp(now),
        last_attempt_at: timestamp(now),
        event: serde_json::from_slice(&event).unwrap_or(serde_json::Value::Null),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::MemoryQueue;
    use crate::buffer::deadletter::DeadLetters;

    fn routes(filters: &[&str]) -> (tempfile::TempDir, Routes<MemoryQueue>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let routes = filters
            .iter()
            .enumerate()
            .map(|(i, filter)| {
                Arc::new(Route {
                    plan: Arc::new(RulePlan::for_tests(&format!("r{i}"))),
                    filter: (*filter).into(),
                    qos: 1,
                    queue: Arc::new(MemoryQueue::new(100)),
                    stats: Arc::default(),
                    dead_letters: DeadLetters::new(&dir.path().join(format!("r{i}"))),
                })
            })
            .collect();
        (dir, Routes::new(routes))
    }

    fn received(topic: &str, payload: Vec<u8>) -> Received {
        Received {
            topic: topic.into(),
            payload,
            qos: 1,
            retain: false,
            properties: None,
        }
    }

    #[test]
    fn a_message_goes_to_every_matching_rule_with_one_id_and_oversize_ones_are_set_aside() {
        let (_dir, routes) = routes(&["a/#", "a/+", "b/#"]);
        let admission = routes.admit(
            [
                received("a/x", b"1".to_vec()),
                received("c", b"2".to_vec()),
                received("b/y", vec![b'z'; 2 * 1024 * 1024]),
            ],
            SystemTime::now(),
        );
        assert_eq!(admission.append[0].len(), 1);
        assert_eq!(admission.append[1].len(), 1);
        assert_eq!(admission.append[0][0].id, admission.append[1][0].id);
        assert!(admission.append[2].is_empty());
        assert_eq!(admission.unmatched, 1);
        assert_eq!(admission.set_aside.len(), 1);
        assert_eq!(admission.set_aside[0].0, 2);
    }

    #[tokio::test]
    async fn store_appends_to_every_rule_and_writes_set_asides() {
        let (dir, routes) = routes(&["a/#", "b/#"]);
        for i in 0..2 {
            std::fs::create_dir_all(dir.path().join(format!("r{i}"))).expect("dir");
        }
        let admission = routes.admit(
            [
                received("a/x", b"1".to_vec()),
                received("b/y", vec![b'z'; 2 * 1024 * 1024]),
            ],
            SystemTime::now(),
        );
        let (_trigger, shutdown) = crate::core::shutdown::channel();
        let outcome = routes.store(admission, &shutdown).await;
        assert_eq!(outcome, StoreOutcome::Done { dropped: vec![] });
        let r: Vec<_> = routes.iter().cloned().collect();
        assert_eq!(r[0].queue.len(), 1);
        assert_eq!(RuleStats::get(&r[0].stats.queued), 1);
        assert_eq!(r[1].dead_letters.list().expect("list").len(), 1);
        assert_eq!(RuleStats::get(&r[1].stats.set_aside), 1);
    }

    #[tokio::test]
    async fn a_message_a_full_drop_newest_buffer_drops_is_reported_by_rule_and_not_counted_queued()
    {
        use crate::buffer::{DiskQueue, DiskQueueConfig};
        use crate::core::config::WhenFull;
        let dir = tempfile::tempdir().expect("tempdir");
        let route = |name: &str, max_size: u64| {
            let rule_dir = dir.path().join(name);
            let queue = DiskQueue::open(DiskQueueConfig {
                dir: rule_dir.clone(),
                segment_size: 4096,
                max_size,
                when_full: WhenFull::DropNewest,
                max_age: None,
                max_ack_delay: std::time::Duration::ZERO,
            })
            .expect("open");
            Arc::new(Route {
                plan: Arc::new(RulePlan::for_tests(name)),
                filter: "a/#".into(),
                qos: 1,
                queue: Arc::new(queue),
                stats: Arc::default(),
                dead_letters: DeadLetters::new(&rule_dir),
            })
        };
        // "full" has room for its segment header only; "roomy" takes everything.
        let routes = Routes::new(vec![route("full", 8), route("roomy", 1 << 20)]);
        let (_trigger, shutdown) = crate::core::shutdown::channel();
        let admission = routes.admit([received("a/x", b"1".to_vec())], SystemTime::now());
        let outcome = routes.store(admission, &shutdown).await;
        assert_eq!(
            outcome,
            StoreOutcome::Done {
                dropped: vec![("full".to_owned(), 1)]
            }
        );
        let r: Vec<_> = routes.iter().cloned().collect();
        assert_eq!(RuleStats::get(&r[0].stats.queued), 0, "dropped, not queued");
        assert_eq!(RuleStats::get(&r[1].stats.queued), 1);
        let dropped = &r[0].queue.counters().dropped_newest;
        assert_eq!(dropped.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_waiting_for_room_gives_up_shortly_after_shutdown_unacknowledged() {
        let (_dir, routes) = routes(&["a/#"]);
        let r: Vec<_> = routes.iter().cloned().collect();
        let full: Vec<Message> = (0..100)
            .map(|i| Message::received("a/x".into(), vec![i], 1, false, SystemTime::now()))
            .collect();
        r[0].queue.append(full).await.expect("fill");
        let (trigger, shutdown) = crate::core::shutdown::channel();
        let admission = routes.admit([received("a/x", b"1".to_vec())], SystemTime::now());
        let store = routes.store(admission, &shutdown);
        tokio::pin!(store);
        let waiting = tokio::time::timeout(Duration::from_secs(60), &mut store).await;
        assert!(waiting.is_err(), "a full queue holds the store back");
        trigger.trigger();
        let started = tokio::time::Instant::now();
        assert_eq!(store.await, StoreOutcome::Stopping);
        assert!(started.elapsed() <= STORE_STOP_GRACE);
        assert_eq!(RuleStats::get(&r[0].stats.queued), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replaced_set_is_released_only_when_no_older_snapshot_is_held() {
        let (_dir, first) = routes(&["a/#", "b/#"]);
        let (_dir2, second) = routes(&["a/#"]);
        let (_dir3, third) = routes(&["a/#"]);
        let table = RouteTable::new(first);
        let held = table.snapshot();
        assert_eq!(held.iter().count(), 2);
        let g2 = table.replace(second);
        // Taken after the replace: the new set, which does not hold back generation 2.
        let fresh = table.snapshot();
        assert_eq!(fresh.iter().count(), 1);
        let g3 = table.replace(third);
        let released = tokio::spawn(table.released_before(g3));
        tokio::task::yield_now().await;
        assert!(!released.is_finished(), "the first set is still held");
        drop(held);
        tokio::task::yield_now().await;
        assert!(!released.is_finished(), "the second set is still held");
        drop(fresh);
        released.await.expect("released");
        table.released_before(g2).await;
    }

    #[tokio::test]
    async fn a_message_no_sql_rule_keeps_is_not_stored_and_each_rule_gets_its_select_result() {
        let (_dir, routes) = routes(&["s/+", "s/+", "s/#"]);
        let mut r: Vec<Arc<Route<MemoryQueue>>> = routes.iter().cloned().collect();
        let with_sql = |route: &Arc<Route<MemoryQueue>>, sql: &str| {
            let mut plan = (*route.plan).clone();
            plan.sql = Some(Arc::new(crate::core::sql::compile(sql).expect("sql")));
            Arc::new(Route {
                plan: Arc::new(plan),
                filter: route.filter.clone(),
                qos: 1,
                queue: route.queue.clone(),
                stats: route.stats.clone(),
                dead_letters: route.dead_letters.clone(),
            })
        };
        r[0] = with_sql(&r[0], "SELECT t AS hot FROM 's/+' WHERE t > 50");
        r[1] = with_sql(&r[1], "SELECT topic(2) AS dev FROM 's/+' WHERE t < 0");
        let routes = Routes::new(r);
        let admission = routes.admit(
            [
                received("s/a", br#"{"t":60}"#.to_vec()),
                received("s/b", br#"{"t":10}"#.to_vec()),
            ],
            SystemTime::now(),
        );
        assert_eq!(admission.append[0].len(), 1);
        assert_eq!(admission.append[0][0].payload, br#"{"hot":60}"#);
        assert!(admission.append[1].is_empty());
        // The rule without SQL gets both, untouched.
        assert_eq!(admission.append[2].len(), 2);
        assert_eq!(admission.append[2][0].payload, br#"{"t":60}"#);
        let filtered: Vec<(usize, usize)> = admission
            .filtered
            .iter()
            .map(|(i, _, condition)| (*i, *condition))
            .collect();
        assert_eq!(filtered, [(1, 0), (0, 0), (1, 0)]);
        let (_trigger, shutdown) = crate::core::shutdown::channel();
        let outcome = routes.store(admission, &shutdown).await;
        assert_eq!(outcome, StoreOutcome::Done { dropped: vec![] });
        let r: Vec<_> = routes.iter().cloned().collect();
        let counts = |i: usize| {
            (
                RuleStats::get(&r[i].stats.queued),
                RuleStats::get(&r[i].stats.filtered),
            )
        };
        assert_eq!((counts(0), counts(1), counts(2)), ((1, 1), (0, 2), (2, 0)));
    }

    #[test]
    fn each_filter_is_subscribed_once_with_the_highest_qos() {
        let (_dir, routes) = routes(&["a/#", "b/#", "a/#"]);
        assert_eq!(
            routes.subscriptions(),
            vec![("a/#".to_owned(), 1), ("b/#".to_owned(), 1)]
        );
    }
}
