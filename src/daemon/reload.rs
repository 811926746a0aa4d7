//! Live reload: SIGHUP re-reads the configuration file and changes the rules without a restart.
//!
//! Two halves, as elsewhere. [`diff`] is pure: it compares the configuration in force with the
//! file just loaded and says which rules are added, changed and removed, which subscriptions
//! to add or drop, and which settings changed that only a restart applies. [`LiveRules`] owns
//! what runs per rule (route, queue, delivery task) and performs a diff.
//!
//! ```text
//! SIGHUP ─► load + validate + preflight (as at start) ─► invalid: log each problem, keep all
//!                     │ valid
//!                     ▼
//!             diff(in force, file) ─► settings that need a restart: logged, old values kept
//!                     │
//!   open added queues ─► new route set in force ─► SUBSCRIBE new filters, UNSUBSCRIBE unused
//!   changed: new plan to the running task      removed: no new messages; once no ingest
//!   added: a new delivery task                 holds an older route set, drain, then stop
//! ```
//!
//! Invariants:
//! - All or nothing: a reload that cannot open an added rule's queue changes nothing.
//! - The MQTT connection and session stay: subscriptions change on the live client.
//! - A removed rule's queue is read to its end only after every message matched to it was
//!   appended (`RouteTable::released_before`), so nothing acknowledged stays behind unread; its
//!   directory is never deleted.
//! - A rule keeps the share of `buffer.max_size` it was opened with until the next start; an
//!   added rule gets `max_size / rules in the new file`. Shrinking a share live could make
//!   `drop_oldest` delete buffered messages, which a reload must never do.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::buffer::DiskQueue;
use crate::buffer::deadletter::DeadLetters;
use crate::core::config::{Config, RuleConfig, Source};
use crate::core::health::Health;
use crate::core::shutdown::Shutdown;
use crate::core::stats::Board;
use crate::core::stats::RuleStats;
use crate::delivery::invoker::Invoke;
use crate::delivery::pipeline::{self, DeliveryError, Directive};
use crate::ingest::routes::{RouteTable, Routes};
use crate::mqtt::replies::Replier;
use crate::rule::Route;
use crate::shaping::plan::RulePlan;

/// What changed between the configuration in force and the file. Pure data.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Diff {
    /// Rules only in the file, in file order.
    pub added: Vec<String>,
    /// Rules in both with different settings, in file order.
    pub changed: Vec<String>,
    /// Rules only in force, in their order.
    pub removed: Vec<String>,
    /// Filters to subscribe (new, or asked with a higher QoS), with their QoS.
    pub subscribe: Vec<(String, u8)>,
    /// Filters no rule of the file uses any more.
    pub unsubscribe: Vec<String>,
    /// Keys whose new value only a restart applies; the value in force stays.
    pub needs_restart: Vec<&'static str>,
}

impl Diff {
    /// Whether the file changes nothing a reload applies.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// Settings read once at start: their key and their value as text, to compare. Add a key here
/// when a section is added to the configuration (`metrics.listen`, …).
fn restart_settings(config: &Config) -> Vec<(&'static str, String)> {
    let (mqtt, aws, buffer) = (&config.mqtt, &config.aws, &config.buffer);
    let tls = mqtt.tls.clone().unwrap_or_default();
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    vec![
        ("shutdown_timeout", format!("{:?}", config.shutdown_timeout)),
        ("mqtt.url", mqtt.url.clone()),
        ("mqtt.client_id", mqtt.client_id.clone()),
        ("mqtt.clean_start", mqtt.clean_start.to_string()),
        ("mqtt.keep_alive", format!("{:?}", mqtt.keep_alive)),
        ("mqtt.protocol", format!("{:?}", mqtt.protocol)),
        ("mqtt.session_expiry", format!("{:?}", mqtt.session_expiry)),
        (
            "mqtt.receive_maximum",
            format!("{:?}", mqtt.receive_maximum),
        ),
        ("mqtt.username", format!("{:?}", mqtt.username)),
        // Compared, never logged.
        (
            "mqtt.password",
            format!("{:?}", mqtt.password.as_ref().map(|p| p.expose())),
        ),
        (
            "mqtt.password_file",
            format!("{:?}", path(&mqtt.password_file)),
        ),
        ("mqtt.tls.ca_file", format!("{:?}", path(&tls.ca_file))),
        ("mqtt.tls.cert_file", format!("{:?}", path(&tls.cert_file))),
        ("mqtt.tls.key_file", format!("{:?}", path(&tls.key_file))),
        ("aws.region", format!("{:?}", aws.region)),
        ("aws.endpoint_url", format!("{:?}", aws.endpoint_url)),
        ("aws.profile", format!("{:?}", aws.profile)),
        ("aws.connect_timeout", format!("{:?}", aws.connect_timeout)),
        (
            "aws.operation_timeout",
            format!("{:?}", aws.operation_timeout),
        ),
        ("aws.max_concurrency", aws.max_concurrency.to_string()),
        ("aws.iot", format!("{:?}", aws.iot)),
        (
            "metrics.listen",
            format!("{:?}", config.metrics.as_ref().map(|m| &m.listen)),
        ),
        ("http.listen", format!("{:?}", config.http.listen)),
        (
            "http.token_file",
            format!("{:?}", path(&config.http.token_file)),
        ),
        ("http.max_body", config.http.max_body.0.to_string()),
        (
            "http.read_timeout",
            format!("{:?}", config.http.read_timeout),
        ),
        (
            "http.cert_file",
            format!("{:?}", path(&config.http.cert_file)),
        ),
        (
            "http.key_file",
            format!("{:?}", path(&config.http.key_file)),
        ),
        ("buffer.dir", buffer.dir.display().to_string()),
        ("buffer.max_size", buffer.max_size.0.to_string()),
        ("buffer.when_full", format!("{:?}", buffer.when_full)),
        ("buffer.max_age", format!("{:?}", buffer.max_age)),
        ("buffer.segment_size", buffer.segment_size.0.to_string()),
    ]
}

/// Whether two rules of the same name do the same thing. Every field of a rule is plain data
/// whose `Debug` text differs exactly when its value does (no secrets, no maps).
fn same_rule(a: &RuleConfig, b: &RuleConfig) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

/// Each filter once, with the highest QoS a rule asks of it, in rule order.
fn filters(rules: &[RuleConfig]) -> Vec<(String, u8)> {
    let mut out: Vec<(String, u8)> = Vec::new();
    for rule in rules {
        match out.iter_mut().find(|(f, _)| *f == rule.topic) {
            Some((_, qos)) => *qos = (*qos).max(rule.qos),
            None => out.push((rule.topic.clone(), rule.qos)),
        }
    }
    out
}

/// Compares the configuration in force with the one just loaded.
pub fn diff(running: &Config, file: &Config) -> Diff {
    let by_name = |rules: &[RuleConfig], name: &str| rules.iter().position(|r| r.name == name);
    let mut d = Diff::default();
    for rule in &file.rules {
        match by_name(&running.rules, &rule.name) {
            None => d.added.push(rule.name.clone()),
            Some(i) if !same_rule(&running.rules[i], rule) => d.changed.push(rule.name.clone()),
            Some(_) => {}
        }
    }
    d.removed = running
        .rules
        .iter()
        .filter(|r| by_name(&file.rules, &r.name).is_none())
        .map(|r| r.name.clone())
        .collect();
    let (before, after) = (filters(&running.rules), filters(&file.rules));
    d.subscribe = after
        .iter()
        .filter(|(f, qos)| !before.iter().any(|(g, q)| g == f && q >= qos))
        .cloned()
        .collect();
    d.unsubscribe = before
        .iter()
        .filter(|(f, _)| !after.iter().any(|(g, _)| g == f))
        .map(|(f, _)| f.clone())
        .collect();
    let (old, new) = (restart_settings(running), restart_settings(file));
    d.needs_restart = old
        .iter()
        .zip(&new)
        .filter(|((_, a), (_, b))| a != b)
        .map(|((key, _), _)| *key)
        .collect();
    d
}

/// The configuration to run after a reload: the file's rules, and every setting that needs a
/// restart as it is in force.
pub fn effective(running: &Config, file: Config) -> Config {
    Config {
        rules: file.rules,
        ..running.clone()
    }
}

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

/// How a delivery task ended: its rule, and its result.
pub type Ended = (String, Result<(), DeliveryError>);

/// What runs for one rule.
struct RuleTask {
    /// Its route (the latest, for a changed rule).
    route: Arc<Route<DiskQueue>>,
    /// Steers its delivery task.
    directive: Arc<watch::Sender<Directive>>,
    /// Removed by a reload: draining, no new messages.
    retiring: bool,
    /// Bumped by every removal and re-addition, so a late retirement never overrides a
    /// re-addition.
    epoch: Arc<AtomicU64>,
    /// Whether its delivery task runs.
    running: bool,
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
        // A reply must not go to a topic a replying rule takes: it would come back as a
        // request, forever.
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
        let mut live = LiveRules {
            table,
            config,
            tasks: HashMap::new(),
            deliveries: JoinSet::new(),
            task_rules: HashMap::new(),
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

    fn spawn(&mut self, route: Arc<Route<DiskQueue>>) {
        let name = route.plan.name.clone();
        let (tx, rx) = watch::channel(Directive::Run(route.plan.clone()));
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
        let epoch = self
            .tasks
            .remove(&name)
            .map_or_else(Arc::default, |t| t.epoch);
        self.tasks.insert(
            name,
            RuleTask {
                route,
                directive: Arc::new(tx),
                retiring: false,
                epoch,
                running: true,
            },
        );
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
        let mut opened: HashMap<String, Arc<DiskQueue>> = HashMap::new();
        for name in &d.added {
            if self.tasks.contains_key(name) {
                continue; // removed earlier and still draining: its queue is open
            }
            let Some(rule) = next.rules.iter().find(|r| &r.name == name) else {
                continue;
            };
            let qc = crate::buffer::layout::queue_config(&next, rule);
            let dir = qc.dir.clone();
            match tokio::task::spawn_blocking(move || DiskQueue::open(qc)).await {
                Ok(Ok(queue)) => {
                    opened.insert(name.clone(), Arc::new(queue));
                }
                failed => {
                    let why = match failed {
                        Ok(Err(err)) => err.to_string(),
                        Err(err) => err.to_string(),
                        Ok(Ok(_)) => String::new(),
                    };
                    for queue in opened.values() {
                        queue.close().await;
                    }
                    return Err(format!(
                        "rules[{name}]: cannot open its buffer {}: {why}",
                        dir.display()
                    ));
                }
            }
        }

        let mut routes: Vec<Arc<Route<DiskQueue>>> = Vec::with_capacity(next.rules.len());
        for rule in &next.rules {
            let route = match (self.tasks.get(&rule.name), opened.remove(&rule.name)) {
                (Some(task), _) if !d.changed.contains(&rule.name) && !task.retiring => {
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

        for route in routes {
            let name = route.plan.name.clone();
            let Some(task) = self.tasks.get_mut(&name) else {
                self.spawn(route);
                continue;
            };
            if Arc::ptr_eq(&task.route, &route) {
                continue;
            }
            let came_back = task.retiring;
            task.retiring = false;
            task.epoch.fetch_add(1, Ordering::SeqCst);
            task.route = route.clone();
            if task.running {
                task.directive
                    .send_replace(Directive::Run(route.plan.clone()));
            } else {
                // Its drain ended a moment ago; start it again over the same queue.
                self.spawn(route);
            }
            if came_back {
                tracing::info!(rule = %name, "rule added back while its buffer was draining: it takes new messages again");
            }
        }

        for name in &d.removed {
            let Some(task) = self.tasks.get_mut(name) else {
                continue;
            };
            task.retiring = true;
            let epoch = task.epoch.fetch_add(1, Ordering::SeqCst) + 1;
            let (flag, directive) = (task.epoch.clone(), task.directive.clone());
            let released = self.table.released_before(generation);
            let pending = task.route.queue.stats().pending;
            tracing::info!(rule = %name, pending, "rule removed: it takes no new messages; delivering what its buffer holds, then it stops");
            tokio::spawn(async move {
                released.await;
                directive.send_if_modified(|d| {
                    if flag.load(Ordering::SeqCst) != epoch {
                        return false; // added back meanwhile
                    }
                    *d = Directive::Retire;
                    true
                });
            });
        }
        self.config = next;
        Ok(())
    }

    /// The next delivery task to end (pending forever when none runs).
    pub async fn next_ended(&mut self) -> Ended {
        match self.deliveries.join_next_with_id().await {
            Some(Ok((id, result))) => (self.task_rules.remove(&id).unwrap_or_default(), result),
            Some(Err(err)) => {
                let rule = self.task_rules.remove(&err.id()).unwrap_or_default();
                (rule, Err(DeliveryError::Task(err.to_string())))
            }
            None => std::future::pending().await,
        }
    }

    /// A delivery task ended before shutdown: a removed rule finished draining, or a queue
    /// failed.
    pub async fn on_ended(&mut self, (name, result): Ended) {
        if let Err(err) = result {
            tracing::error!(error = %err, "delivery stopped");
            if let Some(task) = self.tasks.get_mut(&name) {
                task.running = false;
            }
            return;
        }
        let Some(task) = self.tasks.get_mut(&name) else {
            return;
        };
        task.running = false;
        if !task.retiring {
            // Added back just as its drain ended.
            let route = task.route.clone();
            self.spawn(route);
            return;
        }
        if let Some(task) = self.tasks.remove(&name) {
            self.publish();
            task.route.queue.close().await;
            let dir = crate::buffer::layout::rule_dir(&self.config, &name);
            tracing::info!(rule = %name, dir = %dir.display(), "removed rule's buffer delivered; it has stopped (its directory stays)");
            crate::rule::summary(&task.route);
        }
    }

    /// Shutdown: waits for every delivery task until `deadline` (the drain was triggered),
    /// closes every queue and logs each rule's summary.
    pub async fn finish(mut self, deadline: tokio::time::Instant) {
        let drained = tokio::time::timeout_at(deadline, async {
            while let Some(result) = self.deliveries.join_next().await {
                match result {
                    Ok(Err(err)) => tracing::error!(error = %err, "delivery stopped"),
                    Err(err) if err.is_panic() => {
                        tracing::error!(error = %err, "delivery task panicked")
                    }
                    _ => {}
                }
            }
        })
        .await;
        if drained.is_err() {
            self.deliveries.abort_all();
            tracing::warn!("shutdown deadline reached with invocations still in flight");
        }
        let mut tasks: Vec<RuleTask> = self.tasks.into_values().collect();
        tasks.sort_by(|a, b| a.route.plan.name.cmp(&b.route.plan.name));
        for task in tasks {
            task.route.queue.close().await;
            crate::rule::summary(&task.route);
            let left = task.route.queue.stats().pending;
            if task.retiring && left > 0 {
                let dir = crate::buffer::layout::rule_dir(&self.config, &task.route.plan.name);
                tracing::warn!(
                    rule = %task.route.plan.name, left_in_buffer = left, dir = %dir.display(),
                    "a removed rule stopped before its buffer was delivered: add the rule back (same name) and reload or restart to deliver what is left"
                );
            }
        }
    }
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
    use figment::providers::Env;

    fn config(extra: &str, rules: &[(&str, &str, &str)]) -> Config {
        let mut text =
            format!("[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\nclient_id = \"gw\"\n{extra}\n");
        for (name, topic, function) in rules {
            text.push_str(&format!(
                "\n[[rules]]\nname = \"{name}\"\ntopic = \"{topic}\"\nfunction = \"{function}\"\n"
            ));
        }
        Config::from_toml_str(
            &text,
            Path::new("t.toml"),
            Env::prefixed("MLB_TEST_UNUSED_"),
        )
        .expect("valid config")
    }

    #[test]
    fn the_same_file_changes_nothing() {
        let a = config("", &[("a", "s/+/t", "f"), ("b", "s/+/h", "g")]);
        let d = diff(&a, &a.clone());
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(d, Diff::default());
    }

    #[test]
    fn rules_are_added_changed_and_removed_by_name() {
        let old = config(
            "",
            &[("a", "s/+/t", "f"), ("b", "s/+/h", "g"), ("c", "x/#", "h")],
        );
        let new = config(
            "",
            &[("a", "s/+/t", "f2"), ("c", "x/#", "h"), ("d", "y/#", "k")],
        );
        let d = diff(&old, &new);
        assert_eq!(d.added, vec!["d"]);
        assert_eq!(d.changed, vec!["a"]);
        assert_eq!(d.removed, vec!["b"]);
        assert_eq!(d.subscribe, vec![("y/#".to_owned(), 1)]);
        assert_eq!(d.unsubscribe, vec!["s/+/h"]);
        assert!(d.needs_restart.is_empty());
    }

    #[test]
    fn a_filter_is_dropped_only_when_no_rule_uses_it_any_more() {
        let old = config("", &[("a", "s/#", "f"), ("b", "s/#", "g")]);
        let new = config("", &[("b", "s/#", "g")]);
        let d = diff(&old, &new);
        assert_eq!(d.removed, vec!["a"]);
        assert!(d.unsubscribe.is_empty(), "b still uses s/#: {d:?}");
        assert!(d.subscribe.is_empty());
    }

    #[test]
    fn a_changed_topic_subscribes_the_new_filter_and_drops_the_old() {
        let old = config("", &[("a", "s/+/t", "f")]);
        let new = config("", &[("a", "s/+/temp", "f")]);
        let d = diff(&old, &new);
        assert_eq!(d.changed, vec!["a"]);
        assert_eq!(d.subscribe, vec![("s/+/temp".to_owned(), 1)]);
        assert_eq!(d.unsubscribe, vec!["s/+/t"]);
    }

    #[test]
    fn a_higher_qos_on_a_filter_subscribes_it_again() {
        let old = config("", &[("a", "s/#", "f")]);
        let mut new = old.clone();
        new.rules[0].qos = 2;
        let d = diff(&old, &new);
        assert_eq!(d.changed, vec!["a"]);
        assert_eq!(d.subscribe, vec![("s/#".to_owned(), 2)]);
        assert!(d.unsubscribe.is_empty());
    }

    #[test]
    fn batching_and_pacing_changes_are_rule_changes() {
        let old = config("", &[("a", "s/#", "f")]);
        let mut new = old.clone();
        new.rules[0].max_concurrency = Some(4);
        assert_eq!(diff(&old, &new).changed, vec!["a"]);
    }

    #[test]
    fn start_time_settings_are_reported_by_key_and_kept() {
        let old = config("", &[("a", "s/#", "f")]);
        let new = config(
            "keep_alive = \"10s\"\nusername = \"u\"\npassword = \"hunter2\"\n[aws]\nregion = \"eu-west-1\"\n[buffer]\nmax_size = \"1MiB\"",
            &[("a", "s/#", "f"), ("b", "t/#", "g")],
        );
        let d = diff(&old, &new);
        assert_eq!(
            d.needs_restart,
            vec![
                "mqtt.keep_alive",
                "mqtt.username",
                "mqtt.password",
                "aws.region",
                "buffer.max_size"
            ]
        );
        assert_eq!(d.added, vec!["b"]);
        let running = effective(&old, new);
        assert_eq!(running.rules.len(), 2, "the file's rules");
        assert_eq!(running.aws.region, None, "the value in force stays");
        assert_eq!(running.buffer.max_size, old.buffer.max_size);
        assert!(diff(&running, &running.clone()).needs_restart.is_empty());
    }

    #[test]
    fn http_settings_need_a_restart() {
        let old = config("", &[("a", "s/#", "f")]);
        let new = config(
            "[http]\nlisten = \"127.0.0.1:8080\"\nmax_body = \"1KiB\"",
            &[("a", "s/#", "f")],
        );
        assert_eq!(
            diff(&old, &new).needs_restart,
            vec!["http.listen", "http.max_body"]
        );
        assert_eq!(effective(&old, new).http.listen, None);
    }
}
