//! Live reload: SIGHUP re-reads the configuration file and changes the rules without a restart.
//!
//! Two halves, as elsewhere. [`diff`] (`diff.rs`) is pure: what changed between the
//! configuration in force and the file. [`LiveRules`] owns what runs per rule (route, queue,
//! delivery task, and its [`Life`]) and performs a diff. Every change to a rule's life goes
//! through [`life::next`]: `LiveRules` feeds it what happened (a reload kept, changed or removed
//! the rule, ingest let go of older route sets, the task ended) and performs the effects it
//! returns, nothing else.
//!
//! ```text
//! SIGHUP ─► load + validate + preflight (as at start) ─► invalid: log each problem, keep all
//!                     │ valid
//!                     ▼
//!             diff(in force, file) ─► settings that need a restart: logged, old values kept
//!                     │
//!   open added queues ─► new route set in force ─► SUBSCRIBE new filters, UNSUBSCRIBE unused
//!   kept: Reloaded (steer, or respawn a failed)   removed: no new messages; once no ingest
//!   added: a new delivery task                    holds an older route set, drain, then stop
//! ```
//!
//! Invariants:
//! - All or nothing: a reload that cannot open an added rule's queue changes nothing.
//! - The MQTT connection and session stay: subscriptions change on the live client.
//! - A removed rule's queue is read to its end only after every message matched to it was
//!   appended (`RouteTable::released_before`), so nothing acknowledged stays behind unread; its
//!   directory is never deleted.
//! - At most one delivery task per rule: a task is spawned only for a rule that has none
//!   (added, or a life whose task ended: `Effect::Respawn`).
//! - A rule keeps the share of `buffer.max_size` it was opened with until the next start; an
//!   added rule gets `max_size / rules in the new file`. Shrinking a share live could make
//!   `drop_oldest` delete buffered messages, which a reload must never do.

mod diff;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::buffer::DiskQueue;
use crate::buffer::deadletter::DeadLetters;
use crate::core::config::{Config, RuleConfig, Source};
use crate::core::health::{Beat, Health};
use crate::core::shutdown::Shutdown;
use crate::core::stats::{Board, RuleStats};
use crate::delivery::invoker::Invoke;
use crate::delivery::pipeline::{self, DeliveryError, Directive};
use crate::ingest::routes::{RouteTable, Routes};
use crate::mqtt::replies::Replier;
use crate::rule::Route;
use crate::rule::life::{self, Effect, Event, LeftBecause, Life};
use crate::shaping::plan::RulePlan;

pub use diff::{Diff, diff, effective};

/// Loads `path` as `run` does at start (file, `MLB_` overrides, validation, preflight); on
/// failure, every problem as one line worded as `check` prints it.
pub async fn load(path: &Path) -> Result<Config, Vec<String>> {
    let config = Config::load(path).map_err(|err| err.problems())?;
    let issues = crate::daemon::preflight::check(&config).await;
    if issues.is_empty() {
        return Ok(config);
    }
    Err(Source::read(path)
        .locate(issues)
        .iter()
        .map(ToString::to_string)
        .collect())
}

/// Something that happened to a rule outside a reload, for [`LiveRules::on_event`].
#[derive(Debug)]
pub enum RuleEvent {
    /// A delivery task ended: its rule, and its result.
    Ended(String, Result<(), DeliveryError>),
    /// Ingest let go of every route set older than this generation, awaited for this rule.
    Released(String, u64),
}

/// What runs for one rule.
struct RuleTask {
    /// Its route (the latest, for a changed rule).
    route: Arc<Route<DiskQueue>>,
    /// Steers its delivery task.
    directive: watch::Sender<Directive>,
    /// Where it is in its life; changed only by [`life::next`].
    life: Life,
    /// While its delivery task is failed: a loop slot that never turns, so the watchdog
    /// reports it stalled (`Effect::MarkStalled`).
    stalled: Option<Beat>,
}

/// What the rules need of the MQTT side: subscribing (a reload's changes) and replying.
pub struct MqttHandles {
    /// Subscribes and unsubscribes on the live connection.
    pub subscriptions: crate::mqtt::Subscriptions,
    /// Publishes replies.
    pub replier: Replier,
}

/// The rules in force and what runs for each: routes, queues, delivery tasks. Rules removed
/// by a reload stay here while they drain.
pub struct LiveRules<I> {
    /// Rules and start-time settings in force.
    config: Config,
    table: RouteTable<DiskQueue>,
    tasks: HashMap<String, RuleTask>,
    deliveries: JoinSet<Result<(), DeliveryError>>,
    /// Which rule each delivery task serves.
    task_rules: HashMap<tokio::task::Id, String>,
    /// Removed rules waiting for ingest to let go of older route sets.
    releases: JoinSet<(String, u64)>,
    invoker: Arc<I>,
    /// Invocations in flight across all rules.
    global: Arc<Semaphore>,
    /// Shutdown's drain, shared by every delivery task.
    drain: Shutdown,
    subscriptions: crate::mqtt::Subscriptions,
    /// Publishes the replies of rules with `[rules.reply]`.
    replier: Replier,
    /// Proves each delivery loop alive for the systemd watchdog.
    health: Arc<Health>,
    /// [`LiveRules::routes`] as of the last change, as reporters in other tasks see them.
    board: Board,
}

impl<I: Invoke> LiveRules<I> {
    /// Starts a delivery task for every rule of `config` over its opened queue (rule order).
    pub fn start(
        config: Config,
        queues: Vec<Arc<DiskQueue>>,
        invoker: Arc<I>,
        drain: Shutdown,
        mqtt: MqttHandles,
        health: Arc<Health>,
        board: Board,
    ) -> Self {
        let MqttHandles {
            subscriptions,
            replier,
        } = mqtt;
        let routes: Vec<Arc<Route<DiskQueue>>> = config
            .rules
            .iter()
            .zip(queues)
            .map(|(rule, queue)| new_route(&config, rule, queue))
            .collect();
        let global = Arc::new(Semaphore::new(config.aws.max_concurrency.max(1)));
        let table = RouteTable::new(Routes::new(routes.clone()));
        guard_reply_loops(&replier, &table);
        let mut live = LiveRules {
            table,
            config,
            tasks: HashMap::new(),
            deliveries: JoinSet::new(),
            task_rules: HashMap::new(),
            releases: JoinSet::new(),
            invoker,
            global,
            drain,
            subscriptions,
            replier,
            health,
            board,
        };
        for route in routes {
            live.spawn(route);
        }
        live
    }

    /// The route table ingest reads.
    pub fn table(&self) -> RouteTable<DiskQueue> {
        self.table.clone()
    }

    /// Every rule's route, those in force and removed ones still draining, by name (for
    /// reporters such as metrics: a removed rule's counters stay until it stops).
    pub fn routes(&self) -> Vec<Arc<Route<DiskQueue>>> {
        let mut routes: Vec<_> = self.tasks.values().map(|t| t.route.clone()).collect();
        routes.sort_by(|a, b| a.plan.name.cmp(&b.plan.name));
        routes
    }

    /// [`LiveRules::routes`] as reporters see them, kept up to date (status lines, metrics).
    pub fn board(&self) -> Board {
        self.board.clone()
    }

    fn publish(&self) {
        if let Ok(mut board) = self.board.write() {
            *board = self.routes().iter().map(|route| route.report()).collect();
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Starts a delivery task over `route`'s queue; a rule new here starts `Running`, one
    /// already here keeps the life [`life::next`] gave it.
    fn spawn(&mut self, route: Arc<Route<DiskQueue>>) {
        let name = route.plan.name.clone();
        let (directive, rx) = watch::channel(Directive::Run(route.plan.clone()));
        let task = pipeline::deliver_with(
            route.clone(),
            self.invoker.clone(),
            self.global.clone(),
            self.drain.clone(),
            rx,
            self.health
                .watch_loop(format!("the delivery loop of rule {name}")),
            Some(self.replier.clone()),
        );
        let handle = self.deliveries.spawn(task);
        self.task_rules.insert(handle.id(), name.clone());
        match self.tasks.get_mut(&name) {
            Some(task) => {
                task.route = route;
                task.directive = directive;
            }
            None => {
                let life = Life::Running;
                let task = RuleTask {
                    route,
                    directive,
                    life,
                    stalled: None,
                };
                self.tasks.insert(name, task);
            }
        }
        self.publish();
    }

    /// Re-reads `path` and applies it; everything it did or refused is logged.
    pub async fn reload(&mut self, path: &Path) {
        tracing::info!(config = %path.display(), "reloading the configuration");
        let file = match load(path).await {
            Ok(file) => file,
            Err(problems) => {
                for problem in &problems {
                    tracing::error!("{problem}");
                }
                tracing::error!(
                    problems = problems.len(),
                    "configuration not reloaded: the file has problems (each logged above); the previous configuration keeps running"
                );
                return;
            }
        };
        let d = diff(&self.config, &file);
        for key in &d.needs_restart {
            tracing::warn!("{key} changed: needs a restart; the value in force stays");
        }
        let next = effective(&self.config, file);
        if let Err(err) = self.apply(&d, next).await {
            tracing::error!(
                "configuration not reloaded: {err}; the previous configuration keeps running"
            );
            return;
        }
        tracing::info!(
            added = %d.added.join(","),
            changed = %d.changed.join(","),
            removed = %d.removed.join(","),
            rules = self.config.rules.len(),
            needs_restart = d.needs_restart.len(),
            "configuration reloaded: {} rule(s) added, {} changed, {} removed",
            d.added.len(),
            d.changed.len(),
            d.removed.len()
        );
    }

    /// Performs `d`, whose file is `next` (with the start-time settings in force).
    async fn apply(&mut self, d: &Diff, next: Config) -> Result<(), String> {
        // Queues first: the only step that can fail, so a failure changes nothing.
        let mut opened = self.open_added(d, &next).await?;
        let mut routes: Vec<Arc<Route<DiskQueue>>> = Vec::with_capacity(next.rules.len());
        for rule in &next.rules {
            let route = match (self.tasks.get(&rule.name), opened.remove(&rule.name)) {
                (Some(task), _) if !d.changed.contains(&rule.name) && !task.life.is_removed() => {
                    task.route.clone()
                }
                // Changed, or added back while draining: same queue, counters and store.
                (Some(task), _) => Arc::new(Route {
                    plan: Arc::new(RulePlan::from_config(rule)),
                    filter: rule.topic.clone(),
                    qos: rule.qos,
                    queue: task.route.queue.clone(),
                    stats: task.route.stats.clone(),
                    dead_letters: task.route.dead_letters.clone(),
                }),
                (None, Some(queue)) => new_route(&next, rule, queue),
                (None, None) => {
                    return Err(format!("rule {}: its buffer was not opened", rule.name));
                }
            };
            routes.push(route);
        }

        // From here on, new messages go by the file's rules; then the broker is told.
        let generation = self.table.replace(Routes::new(routes.clone()));
        self.subscriptions.subscribe(d.subscribe.clone());
        self.subscriptions.unsubscribe(d.unsubscribe.clone());
        self.config = next;

        for route in routes {
            let name = route.plan.name.clone();
            let Some(task) = self.tasks.get_mut(&name) else {
                self.spawn(route);
                continue;
            };
            let changed = !Arc::ptr_eq(&task.route, &route);
            task.route = route;
            self.step(&name, Event::Reloaded { changed }).await;
        }
        for name in &d.removed {
            self.step(name, Event::Removed { generation }).await;
        }
        self.publish();
        Ok(())
    }

    /// Opens the queue of every rule `d` adds that is not here already; on a failure, closes
    /// those it opened and says which rule's buffer could not be opened.
    async fn open_added(
        &self,
        d: &Diff,
        next: &Config,
    ) -> Result<HashMap<String, Arc<DiskQueue>>, String> {
        let mut opened: HashMap<String, Arc<DiskQueue>> = HashMap::new();
        for name in &d.added {
            if self.tasks.contains_key(name) {
                continue; // removed earlier and still draining: its queue is open
            }
            let Some(rule) = next.rules.iter().find(|r| &r.name == name) else {
                continue;
            };
            let qc = crate::buffer::layout::queue_config(next, rule);
            let dir = qc.dir.clone();
            let why = match tokio::task::spawn_blocking(move || DiskQueue::open(qc)).await {
                Ok(Ok(queue)) => {
                    opened.insert(name.clone(), Arc::new(queue));
                    continue;
                }
                Ok(Err(err)) => err.to_string(),
                Err(err) => err.to_string(),
            };
            for queue in opened.values() {
                queue.close().await;
            }
            return Err(format!(
                "rules[{name}]: cannot open its buffer {}: {why}",
                dir.display()
            ));
        }
        Ok(opened)
    }

    /// Moves rule `name` through its life by `event` and performs what that asks for.
    async fn step(&mut self, name: &str, event: Event) {
        let Some(task) = self.tasks.get_mut(name) else {
            return;
        };
        let before = std::mem::replace(&mut task.life, Life::Stopped { drained: false });
        let (after, effects) = life::next(before, event);
        task.life = after;
        let route = task.route.clone();
        for effect in effects {
            self.perform(&route, effect).await;
        }
    }

    /// Does what one [`Effect`] says for the rule of `route`.
    async fn perform(&mut self, route: &Arc<Route<DiskQueue>>, effect: Effect) {
        let name = &route.plan.name;
        let send = |tasks: &HashMap<String, RuleTask>, directive: Directive| {
            if let Some(task) = tasks.get(name) {
                task.directive.send_replace(directive);
            }
        };
        match effect {
            Effect::Steer => send(&self.tasks, Directive::Run(route.plan.clone())),
            Effect::Retire => send(&self.tasks, Directive::Retire),
            Effect::AwaitRelease(generation) => {
                let released = self.table.released_before(generation);
                let name = name.clone();
                self.releases.spawn(async move {
                    released.await;
                    (name, generation)
                });
            }
            Effect::Respawn => self.spawn(route.clone()),
            Effect::LogRemoved => {
                let pending = route.queue.stats().pending;
                tracing::info!(rule = %name, pending, "rule removed: it takes no new messages; delivering what its buffer holds, then it stops");
            }
            Effect::LogAddedBack => {
                tracing::info!(rule = %name, "rule added back while its buffer was draining: it takes new messages again");
            }
            Effect::LogFailed(reason) => {
                tracing::error!(rule = %name, error = %reason, "delivery stopped: its messages stay in the buffer; reload or restart to start it again");
            }
            Effect::Close => {
                // A slot left watched would report a rule that no longer exists as stalled.
                if let Some(beat) = self.tasks.remove(name).and_then(|t| t.stalled) {
                    beat.retire();
                }
                self.publish();
                route.queue.close().await;
            }
            Effect::ReportDrained => {
                let dir = crate::buffer::layout::rule_dir(&self.config, name);
                tracing::info!(rule = %name, dir = %dir.display(), "removed rule's buffer delivered; it has stopped (its directory stays)");
            }
            Effect::ReportLeftBehind(why) => self.report_left_behind(route, why),
            Effect::Summary => crate::rule::summary(route),
            Effect::MarkStalled => {
                let beat = self.health.watch_loop(format!(
                    "the delivery loop of rule {name} (stopped on an error)"
                ));
                if let Some(task) = self.tasks.get_mut(name) {
                    task.stalled = Some(beat);
                    // Also for `/readyz` and `mlb_rule_stalled`, which read the counters.
                    if let Life::Failed { reason } = &task.life {
                        route.stats.stalled.set(format!(
                            "stopped delivering: {reason}; reload or restart to start it again"
                        ));
                    }
                } else {
                    beat.retire();
                }
            }
            Effect::ClearStalled => {
                route.stats.stalled.clear();
                if let Some(beat) = self.tasks.get_mut(name).and_then(|t| t.stalled.take()) {
                    beat.retire();
                }
            }
        }
    }

    /// Warns about the messages a stopped rule leaves in its buffer, and how to deliver them.
    fn report_left_behind(&self, route: &Route<DiskQueue>, why: LeftBecause) {
        let left = route.queue.stats().pending;
        if left == 0 {
            return;
        }
        let name = &route.plan.name;
        let dir = crate::buffer::layout::rule_dir(&self.config, name);
        match why {
            LeftBecause::Removed => tracing::warn!(
                rule = %name, left_in_buffer = left, dir = %dir.display(),
                "a removed rule stopped before its buffer was delivered: add the rule back (same name) and reload or restart to deliver what is left"
            ),
            LeftBecause::Failed => tracing::warn!(
                rule = %name, left_in_buffer = left, dir = %dir.display(),
                "a rule's delivery stopped on an error with messages in its buffer: fix the cause logged above, then reload (keeping the rule) or restart to deliver them"
            ),
        }
    }

    /// The next thing that happens to a rule outside a reload (pending forever when nothing
    /// runs or waits).
    pub async fn next_event(&mut self) -> RuleEvent {
        loop {
            tokio::select! {
                Some(joined) = self.deliveries.join_next_with_id(), if !self.deliveries.is_empty() => {
                    return match joined {
                        Ok((id, result)) => {
                            RuleEvent::Ended(self.task_rules.remove(&id).unwrap_or_default(), result)
                        }
                        Err(err) => {
                            let rule = self.task_rules.remove(&err.id()).unwrap_or_default();
                            RuleEvent::Ended(rule, Err(DeliveryError::Task(err.to_string())))
                        }
                    };
                }
                Some(released) = self.releases.join_next(), if !self.releases.is_empty() => {
                    if let Ok((rule, generation)) = released {
                        return RuleEvent::Released(rule, generation);
                    }
                }
                else => return std::future::pending().await,
            }
        }
    }

    /// Moves the rule `event` concerns through its life.
    pub async fn on_event(&mut self, event: RuleEvent) {
        match event {
            RuleEvent::Ended(name, result) => {
                let result = result.map_err(|err| err.to_string());
                self.step(&name, Event::Ended(result)).await;
            }
            RuleEvent::Released(name, generation) => {
                self.step(&name, Event::Released { generation }).await;
            }
        }
    }

    /// Shutdown: waits for every delivery task until `deadline` (the drain was triggered),
    /// then stops every rule: queue closed, summary logged, what is left reported.
    pub async fn finish(mut self, deadline: tokio::time::Instant) {
        self.releases.abort_all();
        let drained = tokio::time::timeout_at(deadline, async {
            while let Some(joined) = self.deliveries.join_next_with_id().await {
                // A normal end here is the drain's, not an event of the rule's life.
                let (id, err) = match joined {
                    Ok((_, Ok(()))) => continue,
                    Ok((id, Err(err))) => (id, err.to_string()),
                    Err(err) => (err.id(), format!("delivery task failed: {err}")),
                };
                let rule = self.task_rules.remove(&id).unwrap_or_default();
                self.step(&rule, Event::Ended(Err(err))).await;
            }
        })
        .await;
        if drained.is_err() {
            self.deliveries.abort_all();
            tracing::warn!("shutdown deadline reached with invocations still in flight");
        }
        let mut names: Vec<String> = self.tasks.keys().cloned().collect();
        names.sort();
        for name in names {
            self.step(&name, Event::Shutdown).await;
        }
    }
}

/// A reply must not go to a topic a replying rule takes: it would come back as a request,
/// forever. The guard reads the route table in force at each reply.
fn guard_reply_loops(replier: &Replier, table: &RouteTable<DiskQueue>) {
    let rules_now = table.clone();
    replier.set_loop_guard(Box::new(move |topic| {
        rules_now
            .current()
            .iter()
            .find(|r| {
                r.plan.reply.is_some()
                    && crate::core::rules::matches(
                        crate::core::rules::match_filter(&r.filter),
                        topic,
                    )
            })
            .map(|r| r.plan.name.clone())
    }));
}

/// The route of `rule` over `queue`, with fresh counters.
fn new_route(config: &Config, rule: &RuleConfig, queue: Arc<DiskQueue>) -> Arc<Route<DiskQueue>> {
    Arc::new(Route {
        plan: Arc::new(RulePlan::from_config(rule)),
        filter: rule.topic.clone(),
        qos: rule.qos,
        queue,
        stats: Arc::new(RuleStats::default()),
        dead_letters: DeadLetters::new(&crate::buffer::layout::rule_dir(config, &rule.name)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::shutdown;
    use crate::delivery::invoker::{InvokeError, InvokeRequest};
    use figment::providers::Env;
    use std::time::Duration;

    struct Accepting;

    impl Invoke for Accepting {
        async fn invoke(&self, _: InvokeRequest) -> Result<Vec<u8>, InvokeError> {
            Ok(Vec::new())
        }
    }

    fn config(dir: &Path, rules: &[&str]) -> Config {
        let mut text = format!(
            "[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\nclient_id = \"gw\"\n[buffer]\ndir = {:?}\n",
            dir.display().to_string()
        );
        for name in rules {
            text.push_str(&format!(
                "\n[[rules]]\nname = \"{name}\"\ntopic = \"{name}/#\"\nfunction = \"f\"\n"
            ));
        }
        Config::from_toml_str(
            &text,
            Path::new("t.toml"),
            Env::prefixed("MLB_TEST_UNUSED_"),
        )
        .expect("valid config")
    }

    /// The live rules of `config`, with what must outlive them (the MQTT link, the drain).
    fn live(config: Config) -> (LiveRules<Accepting>, impl Sized) {
        let queues = crate::buffer::layout::open_queues(&config).expect("open queues");
        let (subscriptions, requests) = crate::mqtt::subscriptions();
        let options = crate::mqtt::options(&config.mqtt).expect("options");
        let (link, replier) = crate::mqtt::link(options, requests);
        let (trigger, drain) = shutdown::channel();
        let rules = LiveRules::start(
            config,
            queues,
            Arc::new(Accepting),
            drain,
            MqttHandles {
                subscriptions,
                replier,
            },
            Arc::new(Health::new()),
            Board::default(),
        );
        (rules, (link, trigger))
    }

    async fn fail(rules: &mut LiveRules<Accepting>, name: &str) {
        let queue = rules.tasks[name].route.queue.clone();
        queue.close().await;
        let event = tokio::time::timeout(Duration::from_secs(10), rules.next_event())
            .await
            .expect("the delivery task ends");
        assert!(
            matches!(&event, RuleEvent::Ended(rule, Err(_)) if rule == name),
            "{event:?}"
        );
        rules.on_event(event).await;
    }

    #[tokio::test]
    async fn a_failed_rule_is_stalled_and_its_removal_stops_it_without_calling_it_drained() {
        let dir = tempfile::tempdir().expect("tempdir");
        let both = config(dir.path(), &["a", "b"]);
        let (mut rules, _keep) = live(both.clone());
        fail(&mut rules, "a").await;
        let a = &rules.tasks["a"];
        assert!(matches!(a.life, Life::Failed { .. }), "{:?}", a.life);
        assert!(a.stalled.is_some(), "reported stalled to the watchdog");
        let reason = a.route.stats.stalled.reason().unwrap_or_default();
        assert!(
            reason.starts_with("stopped delivering: rule a: "),
            "reported stalled to /readyz and metrics: {reason}"
        );
        assert_eq!(rules.routes().len(), 2, "a failed rule is still in force");

        let only_b = config(dir.path(), &["b"]);
        let d = diff(&both, &only_b);
        rules
            .apply(&d, effective(&both, only_b))
            .await
            .expect("apply");
        assert!(!rules.tasks.contains_key("a"), "stopped, not left retiring");
        let names: Vec<String> = rules.routes().iter().map(|r| r.plan.name.clone()).collect();
        assert_eq!(names, vec!["b"]);
        assert!(matches!(rules.tasks["b"].life, Life::Running));
    }

    #[tokio::test]
    async fn a_reload_that_keeps_a_failed_rule_starts_its_delivery_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = config(dir.path(), &["a"]);
        let (mut rules, _keep) = live(one.clone());
        fail(&mut rules, "a").await;
        rules
            .apply(&diff(&one, &one), effective(&one, one.clone()))
            .await
            .expect("apply");
        let a = &rules.tasks["a"];
        assert_eq!(a.life, Life::Running);
        assert!(a.stalled.is_none(), "no longer reported stalled");
        assert_eq!(a.route.stats.stalled.reason(), None);
        // Its queue is closed, so the new task fails again at once: proof that it ran.
        fail(&mut rules, "a").await;
    }
}
