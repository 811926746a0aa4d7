//! One simulated gateway: the real routing (`Routes`, `RouteTable`), the real disk queues on a
//! `FaultStorage`, the real delivery tasks (`deliver_with`, steered by the directives a reload
//! sends), in front of the simulated [`Lambda`]. A seeded generator picks every step; the
//! invariants are checked after each one and at the end.
//!
//! Determinism: the schedule — every step, every fault, every Lambda answer in the order
//! asked — is a function of the seed alone. The runtime is current-thread with paused time,
//! and the clock moves only when the simulation advances it (the simulation task never waits
//! on a timer, so tokio never advances on its own; reads on blocking threads hold it anyway).
//! The queue's writer is an OS thread, so each step ends by settling: yielding and giving that
//! thread a moment until what can be observed stops changing. What stays outside the seed is
//! that thread's timing: which concurrent appends land in one group commit, and its 100 ms
//! ack-file deadline (real time). A replayed seed follows the same schedule and, in practice,
//! breaks the same invariant, sometimes a few steps apart or with another count.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mqtt_lambda_bridge::buffer::deadletter::DeadLetters;
use mqtt_lambda_bridge::buffer::{DiskQueue, DiskQueueConfig, FaultStorage};
use mqtt_lambda_bridge::core::config::WhenFull;
use mqtt_lambda_bridge::core::health::Beat;
use mqtt_lambda_bridge::core::shutdown::{self, Shutdown, Trigger};
use mqtt_lambda_bridge::delivery::pipeline::{DeliveryError, Directive, deliver_with};
use mqtt_lambda_bridge::ingest::routes::StoreOutcome;
use mqtt_lambda_bridge::ingest::routes::{Received, RouteTable, Routes};
use mqtt_lambda_bridge::rule::Route;
use mqtt_lambda_bridge::shaping::plan::RulePlan;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use super::lambda::{Health, Lambda, parse_event};
pub use invariants::{Kind, Violation};

#[path = "invariants.rs"]
mod invariants;
#[path = "lifecycle.rs"]
mod lifecycle;

/// What a run leans towards (the finds_* tests aim at one bug each).
#[derive(Debug, Clone)]
pub struct Profile {
    pub steps: usize,
    /// Every rule's policy, or a random one per rule.
    pub when_full: Option<WhenFull>,
    /// Weight of EIO on read among storage faults (0: never).
    pub read_faults: u32,
    /// Weight of reload steps.
    pub reloads: u32,
    /// When Lambda's health changes, the weights of healthy, flaky, down and slow.
    pub health: [u32; 4],
    /// Weight of crash steps.
    pub crashes: u32,
    /// Among crash steps, the weights of kill -9, power cut and graceful restart.
    pub crash_mix: [u32; 3],
    /// Most publishes per burst.
    pub burst: usize,
    /// Smallest `max_size`.
    pub min_size: u64,
    /// Opens for reading take a millisecond (a slow card).
    pub slow_opens: bool,
    /// Kinds not checked, to look past one bug at another (not `ShutdownIgnored`: the run
    /// cannot go on from a stop that hangs).
    pub ignore: Vec<Kind>,
}

impl Profile {
    /// The sweep's profile for `seed`: one seed in three injects read errors, so the others
    /// get past a rule stalled by one and reach the rest.
    pub fn for_seed(seed: u64) -> Profile {
        Profile {
            read_faults: u32::from(seed.is_multiple_of(3)),
            ..Profile::default()
        }
    }
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            steps: 120,
            when_full: None,
            read_faults: 1,
            reloads: 4,
            health: [1, 1, 1, 1],
            crashes: 3,
            crash_mix: [1, 1, 1],
            burst: 12,
            min_size: 2048,
            slow_opens: false,
            ignore: Vec::new(),
        }
    }
}

/// A rule as configured.
#[derive(Debug, Clone)]
struct Spec {
    name: String,
    filter: String,
    when_full: WhenFull,
    max_size: u64,
    segment_size: u64,
    max_messages: usize,
    max_concurrency: usize,
    in_force: bool,
}

/// A rule while the simulated daemon runs.
struct Live {
    route: Arc<Route<DiskQueue>>,
    steer: watch::Sender<Directive>,
    task: Option<JoinHandle<Result<(), DeliveryError>>>,
    /// Sends `Retire` once the stores of older snapshots are done (a removal in progress).
    retire: Option<JoinHandle<()>>,
}

/// A store in progress: the messages of one publish group (or one HTTP request).
struct Pending {
    by_rule: Vec<(String, Vec<u64>)>,
    handle: JoinHandle<StoreOutcome>,
    /// Each rule's `dropped_newest` when it began.
    newest_before: HashMap<String, u64>,
    /// Rules another store was pending for at the same time (a drop is then not this one's).
    overlapped: HashSet<String>,
}

const TOPICS: [&str; 4] = ["t/a/x", "t/b/x", "t/a/y", "t/c/z"];
const FILTERS: [&str; 4] = ["t/a/#", "t/+/x", "t/#", "t/b/x"];
/// Bytes over `max_size` a buffer may hold: a segment header and an ack record it carries.
const CAP_SLACK: u64 = 128;
/// Duplicates a crash may cause beyond what was in flight (SPEC: delivery promise).
const KILL_BOUND: u64 = 32;
const POWER_BOUND: u64 = 256;

pub struct World {
    seed: u64,
    step: usize,
    rng: fastrand::Rng,
    profile: Profile,
    dir: tempfile::TempDir,
    storage: FaultStorage,
    specs: Vec<Spec>,
    lambda: Arc<Lambda>,
    table: Option<RouteTable<DiskQueue>>,
    live: BTreeMap<String, Live>,
    pending: Vec<Pending>,
    stop: (Trigger, Shutdown),
    global: Arc<Semaphore>,
    next_id: u64,
    /// (rule, id) acknowledged to the sender.
    acked: HashSet<(String, u64)>,
    /// Drops counted by policies that may drop acknowledged messages, over all restarts.
    counted: HashMap<String, u64>,
    /// Duplicates allowed since the last crash, per rule.
    /// Per crash (numbered from 1) and rule: the repeats it may cause, and what it was.
    allowance: HashMap<(usize, String), (u64, &'static str)>,
    /// Per rule: the last crash it was running at (what that crash left unsynced is still on
    /// disk while the rule stays closed).
    exposed: HashMap<String, usize>,
}

type Checked = Result<(), Violation>;

impl World {
    pub fn new(seed: u64, profile: Profile) -> World {
        let mut rng = fastrand::Rng::with_seed(seed);
        // On tmpfs when there is one: the fsyncs are the storage's business here, not the
        // disk's, and a real one costs milliseconds.
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        };
        let dir = dir.unwrap_or_else(|e| panic!("cannot create a tempdir: {e}"));
        let specs = (0..rng.usize(1..=3))
            .map(|i| Spec {
                name: format!("r{i}"),
                filter: FILTERS[rng.usize(0..FILTERS.len())].into(),
                when_full: profile.when_full.unwrap_or_else(|| {
                    [WhenFull::DropOldest, WhenFull::DropNewest, WhenFull::Block][rng.usize(0..3)]
                }),
                max_size: rng.u64(profile.min_size..profile.min_size * 8),
                segment_size: rng.u64(512..2048),
                max_messages: rng.usize(1..=8),
                max_concurrency: rng.usize(1..=3),
                in_force: true,
            })
            .collect();
        let lambda = Arc::new(Lambda::new(rng.u64(..)));
        let storage = FaultStorage::new();
        if profile.slow_opens {
            storage.slow_opens(Duration::from_millis(1));
        }
        World {
            seed,
            step: 0,
            rng,
            profile,
            dir,
            storage,
            specs,
            lambda,
            table: None,
            live: BTreeMap::new(),
            pending: Vec::new(),
            stop: shutdown::channel(),
            global: Arc::new(Semaphore::new(8)),
            next_id: 0,
            acked: HashSet::new(),
            counted: HashMap::new(),
            allowance: HashMap::new(),
            exposed: HashMap::new(),
        }
    }

    fn violation(&self, kind: Kind, what: String) -> Violation {
        Violation {
            kind,
            seed: self.seed,
            step: self.step,
            what,
        }
    }

    /// The whole run: start, the steps, then the end with every fault lifted.
    pub async fn run(mut self) -> Checked {
        self.start()?;
        assert!(!self.profile.ignore.contains(&Kind::ShutdownIgnored));
        for step in 0..self.profile.steps {
            self.step = step;
            let stepped = self.one_step().await;
            self.settle().await;
            for result in [stepped, self.check().await] {
                match result {
                    Err(v) if !self.profile.ignore.contains(&v.kind) => return Err(v),
                    _ => {}
                }
            }
        }
        self.step = self.profile.steps;
        self.finish().await
    }

    fn rule_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn plan(spec: &Spec) -> Arc<RulePlan> {
        let mut plan = RulePlan::for_tests(&spec.name);
        plan.max_messages = spec.max_messages;
        plan.max_concurrency = spec.max_concurrency;
        Arc::new(plan)
    }

    fn open_route(&self, spec: &Spec) -> Result<Arc<Route<DiskQueue>>, Violation> {
        let config = DiskQueueConfig {
            dir: self.rule_dir(&spec.name),
            segment_size: spec.segment_size,
            max_size: spec.max_size,
            when_full: spec.when_full,
            max_age: None,
            max_ack_delay: std::time::Duration::ZERO,
        };
        let open = || DiskQueue::open_with(config.clone(), Arc::new(self.storage.clone()));
        // A start that fails on a fault is retried once the fault is gone (systemd restarts
        // the service); only a buffer that cannot open on a healthy disk breaks a promise.
        let queue = open()
            .or_else(|_| {
                self.storage.lift_faults();
                open()
            })
            .map_err(|e| {
                self.violation(
                    Kind::Stalled,
                    format!(
                        "rule {} cannot open its buffer on a healthy disk: {e}",
                        spec.name
                    ),
                )
            })?;
        Ok(Arc::new(Route {
            plan: World::plan(spec),
            filter: spec.filter.clone(),
            qos: 1,
            queue: Arc::new(queue),
            stats: Arc::default(),
            dead_letters: DeadLetters::new(&self.rule_dir(&spec.name)),
        }))
    }

    fn spawn_delivery(&self, route: &Arc<Route<DiskQueue>>) -> Live {
        let (steer, directives) = watch::channel(Directive::Run(route.plan.clone()));
        let task = tokio::spawn(deliver_with(
            route.clone(),
            self.lambda.clone(),
            self.global.clone(),
            self.stop.1.clone(),
            directives,
            Beat::unwatched(),
            None,
        ));
        Live {
            route: route.clone(),
            steer,
            task: Some(task),
            retire: None,
        }
    }

    /// Opens every rule in force and starts its delivery.
    fn start(&mut self) -> Checked {
        // A new process: pending one-shot faults are gone, poisoned files take writes again.
        self.storage.process_restarted();
        self.stop = shutdown::channel();
        let mut routes = Vec::new();
        for spec in self.specs.iter().filter(|s| s.in_force) {
            let route = self.open_route(spec)?;
            let live = self.spawn_delivery(&route);
            self.live.insert(spec.name.clone(), live);
            routes.push(route);
        }
        self.table = Some(RouteTable::new(Routes::new(routes)));
        Ok(())
    }

    fn routes_in_force(&self) -> Routes<DiskQueue> {
        let routes = self
            .specs
            .iter()
            .filter(|s| s.in_force)
            .filter_map(|s| self.live.get(&s.name).map(|l| l.route.clone()))
            .collect();
        Routes::new(routes)
    }

    async fn one_step(&mut self) -> Checked {
        let weights = [
            30,                       // publish
            25,                       // time passes
            6,                        // Lambda's health changes
            5,                        // storage fault
            self.profile.read_faults, // a read fails
            self.profile.reloads,     // reload
            self.profile.crashes,     // crash or restart
        ];
        let pick = pick_weighted(&mut self.rng, &weights);
        if std::env::var_os("SIM_TRACE").is_some() {
            let state: Vec<String> = self
                .live
                .iter()
                .map(|(n, l)| {
                    let st = l.route.queue.stats();
                    format!("{n}:{}p/{}b", st.pending, st.bytes)
                })
                .collect();
            let what = [
                "publish", "time", "lambda", "storage", "read", "reload", "crash",
            ][pick];
            eprintln!(
                "step {} {what} [{}] acked {} pending stores {}",
                self.step,
                state.join(" "),
                self.acked.len(),
                self.pending.len()
            );
        }
        match pick {
            0 => self.publish(),
            1 => {
                let ms = self.rng.u64(10..3000);
                self.advance(Duration::from_millis(ms)).await;
            }
            2 => {
                let health = [Health::Healthy, Health::Flaky, Health::Down, Health::Slow];
                let pick = pick_weighted(&mut self.rng, &self.profile.health);
                self.lambda.seen().health = health[pick];
            }
            3 => match self.rng.u32(0..4) {
                0 => {
                    let bytes = self.rng.u64(0..4096);
                    self.trace(format_args!("disk full after {bytes} bytes"));
                    self.storage.fill_after(bytes)
                }
                1 => {
                    self.trace(format_args!("the next fsync fails"));
                    self.storage.fail_next_fsync()
                }
                _ => self.storage.lift_faults(),
            },
            4 => {
                if self.profile.read_faults > 0 {
                    self.storage.fail_next_reads(1);
                }
            }
            5 => self.reload(),
            _ => match pick_weighted(&mut self.rng, &self.profile.crash_mix) {
                0 => {
                    self.trace(format_args!("kill -9"));
                    self.crash(false).await?
                }
                1 => {
                    self.trace(format_args!("power cut"));
                    self.crash(true).await?
                }
                _ => self.restart().await?,
            },
        }
        Ok(())
    }

    /// A burst of publishes: one group (MQTT ingest stores what one poll brought together) or
    /// one store each (concurrent HTTP requests).
    fn publish(&mut self) {
        let Some(table) = self.table.clone() else {
            return;
        };
        let n = self.rng.usize(1..=self.profile.burst);
        let messages: Vec<Received> = (0..n)
            .map(|_| {
                let id = self.next_id;
                self.next_id += 1;
                Received {
                    topic: TOPICS[self.rng.usize(0..TOPICS.len())].into(),
                    payload: id.to_string().into_bytes(),
                    qos: 1,
                    retain: false,
                    properties: None,
                }
            })
            .collect();
        let groups: Vec<Vec<Received>> = if self.rng.bool() {
            vec![messages]
        } else {
            messages.into_iter().map(|m| vec![m]).collect()
        };
        for group in groups {
            let snapshot = table.snapshot();
            let admission = snapshot.admit(group, SystemTime::now());
            let mut by_rule = Vec::new();
            let mut newest_before = HashMap::new();
            for (route, messages) in snapshot.iter().zip(&admission.append) {
                let ids = messages
                    .iter()
                    .filter_map(|m| std::str::from_utf8(&m.payload).ok()?.parse().ok())
                    .collect::<Vec<u64>>();
                if !ids.is_empty() {
                    by_rule.push((route.plan.name.clone(), ids));
                }
                let newest = route.queue.counters().dropped_newest.load(ORDER);
                newest_before.insert(route.plan.name.clone(), newest);
            }
            let mut overlapped = HashSet::new();
            for other in &mut self.pending {
                for (rule, _) in &by_rule {
                    if other.by_rule.iter().any(|(r, _)| r == rule) {
                        other.overlapped.insert(rule.clone());
                        overlapped.insert(rule.clone());
                    }
                }
            }
            let stop = self.stop.1.clone();
            let handle = tokio::spawn(async move { snapshot.store(admission, &stop).await });
            self.pending.push(Pending {
                by_rule,
                handle,
                newest_before,
                overlapped,
            });
        }
    }

    /// A reload: change a rule's batching, remove a rule, or add a removed one back.
    fn reload(&mut self) {
        let Some(table) = self.table.clone() else {
            return;
        };
        let i = self.rng.usize(0..self.specs.len());
        let name = self.specs[i].name.clone();
        let in_force = self.specs[i].in_force;
        let others_in_force = self.specs.iter().filter(|s| s.in_force).count() > 1;
        if in_force && (self.rng.bool() || !others_in_force) {
            // Changed: a new plan over the same queue, counters and dead letters.
            self.specs[i].max_messages = self.rng.usize(1..=8);
            self.specs[i].max_concurrency = self.rng.usize(1..=3);
            let plan = World::plan(&self.specs[i]);
            if let Some(live) = self.live.get_mut(&name) {
                let old = &live.route;
                live.route = Arc::new(Route {
                    plan: plan.clone(),
                    filter: old.filter.clone(),
                    qos: old.qos,
                    queue: old.queue.clone(),
                    stats: old.stats.clone(),
                    dead_letters: old.dead_letters.clone(),
                });
                let _ = live.steer.send(Directive::Run(plan));
            }
            table.replace(self.routes_in_force());
        } else if in_force {
            // Removed: no new messages; once no store holds an older snapshot, it drains.
            self.specs[i].in_force = false;
            let generation = table.replace(self.routes_in_force());
            if let Some(live) = self.live.get_mut(&name) {
                let steer = live.steer.clone();
                let released = table.released_before(generation);
                live.retire = Some(tokio::spawn(async move {
                    released.await;
                    let _ = steer.send(Directive::Retire);
                }));
            }
        } else {
            // Added back: its task resumes, or a new one starts when it had drained.
            self.specs[i].in_force = true;
            let ended = match self.live.get_mut(&name) {
                Some(live) => {
                    // As the reload does: a removal not yet carried out is called off.
                    if let Some(retire) = live.retire.take() {
                        retire.abort();
                    }
                    let _ = live.steer.send(Directive::Run(live.route.plan.clone()));
                    live.task
                        .as_ref()
                        .is_none_or(|t| t.is_finished())
                        .then(|| live.route.clone())
                }
                None => None,
            };
            if let Some(route) = ended {
                let fresh = self.spawn_delivery(&route);
                self.live.insert(name.clone(), fresh);
            }
            table.replace(self.routes_in_force());
        }
    }

    /// Counts the drops of every queue (they start from zero when reopened).
    fn count_drops(&mut self) {
        for (name, live) in &self.live {
            let c = live.route.queue.counters();
            let n = c.dropped_oldest.load(ORDER) + c.expired.load(ORDER) + c.lost.load(ORDER);
            *self.counted.entry(name.clone()).or_default() += n;
        }
    }

    fn trace(&self, what: std::fmt::Arguments<'_>) {
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!("  {what}");
        }
    }

    /// What the simulation can observe, to tell when a step's effects have all landed.
    fn fingerprint(&self) -> Vec<u64> {
        let mut print = vec![
            self.pending
                .iter()
                .filter(|p| p.handle.is_finished())
                .count() as u64,
            self.lambda
                .seen()
                .accepted
                .values()
                .map(|n| u64::from(*n))
                .sum(),
        ];
        for live in self.live.values() {
            let stats = live.route.queue.stats();
            let c = live.route.queue.counters();
            print.extend([
                stats.pending,
                stats.bytes,
                stats.segments as u64,
                c.dropped_oldest.load(ORDER),
                c.dropped_newest.load(ORDER),
                u64::from(live.task.as_ref().is_some_and(|t| t.is_finished())),
                u64::from(live.route.queue.writable()),
            ]);
        }
        print
    }

    /// Lets every task run and the writer threads finish what they were handed: until what
    /// can be observed stays the same over two rounds (at most 20).
    async fn settle(&self) {
        let mut last = None;
        let mut same = 0;
        for _ in 0..20 {
            for _ in 0..32 {
                tokio::task::yield_now().await;
            }
            std::thread::sleep(Duration::from_micros(50));
            let now = self.fingerprint();
            if last.as_ref() == Some(&now) {
                same += 1;
                if same == 2 {
                    return;
                }
            } else {
                same = 0;
            }
            last = Some(now);
        }
    }

    /// Moves the clock by `by`, in a few hops so timers fire near their time.
    async fn advance(&self, by: Duration) {
        let hops = (by.as_millis() / 100).clamp(1, 3) as u32;
        for _ in 0..hops {
            tokio::time::advance(by / hops).await;
            self.settle().await;
        }
    }
}

/// An index into `weights`, drawn in proportion to them.
fn pick_weighted(rng: &mut fastrand::Rng, weights: &[u32]) -> usize {
    let mut roll = rng.u32(0..weights.iter().sum::<u32>().max(1));
    for (i, w) in weights.iter().enumerate() {
        if roll < *w {
            return i;
        }
        roll -= w;
    }
    weights.len() - 1
}

const ORDER: std::sync::atomic::Ordering = std::sync::atomic::Ordering::Relaxed;
