//! mqtt-lambda-bridge: subscribes to a local MQTT broker, matches each message against rules,
//! buffers it per rule, and invokes AWS Lambda functions with it.
//!
//! # Layout
//!
//! ```text
//! MQTT (rumqttc, manual acks)                                      Lambda (aws-sdk-lambda)
//!   │ publish                                                          ▲ invoke (Event)
//!   ▼                                                                  │
//! mqtt ──► rules: topic → rule(s) ──► queue (per rule) ──► pipeline: batch, pace, retry ──► invoker
//!          (pure)                      append, then ack       (one task per rule)
//! ```
//!
//! - [`config`]: the TOML file, `MLB_` overrides, validation with one message per problem.
//! - [`rules`]: MQTT topic filter validation and matching (pure).
//! - [`envelope`]: the stored [`envelope::Message`] and the JSON event functions receive (pure).
//! - [`queue`]: the per-rule queue seam (`append` / `read` / `ack`) and its implementations.
//! - [`routing`]: one [`routing::Route`] per rule (plan, filter, queue, counters, dead letters);
//!   which rules a message goes to, and storing it there before it is acknowledged.
//! - [`plan`]: what a rule does, decided once from its configuration, and its counters.
//! - [`mqtt`]: connection options, the event loop, ingest into the routes, acks after append.
//! - [`batch`]: throttle, batches and windows between the queue and Lambda (pure).
//! - [`pipeline`]: per-rule delivery as a state machine: concurrency, retries, acks.
//! - [`ratelimit`]: the token bucket and adaptive concurrency (pure).
//! - [`throttle`]: per-topic min_interval, only_changes, deadband (pure).
//! - [`aggregate`]: statistics windows (pure).
//! - [`preflight`]: what `run` would refuse before connecting (files, buffer.dir, region),
//!   shared with `check`.
//! - [`invoker`]: the [`invoker::Invoke`] seam, the AWS SDK client, failure classification.
//! - [`health`]: facts about the daemon's state shared by its reporters (broker connection,
//!   whether the ingest and delivery loops turn).
//! - [`metrics`]: `/metrics` (Prometheus), `/healthz` and `/readyz`, read from the counters.
//! - [`http`]: a small HTTP/1.1 listener with bounded connections; routing is the caller's.
//! - [`http_ingest`]: `POST /topics/<topic>` (hyper), into the same routes as MQTT; answered
//!   202 once the message is on disk.
//! - [`notify`]: systemd's notify protocol: READY, the watchdog, STATUS, RELOADING, STOPPING.
//! - [`clock`]: wall clock jumps, and message ages for `buffer.max_age` that a jump cannot
//!   inflate.
//! - [`reload`]: SIGHUP's live reload: what changed in the file (pure), and applying it to the
//!   running rules (routes, queues, delivery tasks, subscriptions).
//! - [`reply`]: publishing a `request_response` function's response back to MQTT, and which
//!   PUBACK answers which reply across reconnects.
//! - [`shutdown`]: the stop signal shared by every task, and SIGHUP's reload requests.
//! - [`admin`]: the `buffer stats` and `buffer dead-letters` commands.
//!
//! [`run`] wires them together and takes the shutdown future, so tests can stop it; a reload
//! request (SIGHUP) goes through [`reload_now`].

pub mod admin;
pub mod aggregate;
pub mod batch;
pub mod clock;
pub mod config;
pub mod envelope;
pub mod health;
pub mod http;
pub mod http_ingest;
pub mod invoker;
pub mod metrics;
pub mod mqtt;
pub mod notify;
pub mod pipeline;
pub mod plan;
pub mod preflight;
pub mod queue;
pub mod ratelimit;
pub mod reload;
pub mod reply;
pub mod routing;
pub mod rules;
pub mod shutdown;
pub mod throttle;

use std::future::Future;
use std::sync::Arc;

use std::fs::File;
use std::path::{Path, PathBuf};

use config::{Config, RuleConfig};
use invoker::{Invoke, LambdaInvoker};
use plan::RuleStats;
use queue::{DiskQueue, DiskQueueConfig};
use routing::Route;

/// Why the daemon (or a `buffer` command) could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The MQTT side could not be set up.
    #[error(transparent)]
    Mqtt(#[from] mqtt::MqttError),
    /// The Lambda client could not be set up.
    #[error(transparent)]
    Lambda(#[from] invoker::SetupError),
    /// The buffer directory is unusable.
    #[error("buffer.dir {path}: {source}")]
    Buffer {
        /// The directory or file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The metrics listener could not start.
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    /// HTTP ingest could not start.
    #[error(transparent)]
    Http(#[from] http_ingest::HttpError),
    /// Another process (a running daemon) holds the buffer.
    #[error(
        "buffer.dir {0}: in use by another mqtt-lambda-bridge process (stop the daemon first, e.g. systemctl stop mqtt-lambda-bridge)"
    )]
    Locked(PathBuf),
}

/// Exclusive use of a buffer directory, held for the life of the daemon or a `buffer` command.
#[derive(Debug)]
pub struct BufferLock {
    /// The open lock file; the lock goes with it.
    _file: File,
}

impl BufferLock {
    /// Takes the lock on `<dir>/lock`, creating the directory; fails at once if it is held.
    pub fn acquire(dir: &Path) -> Result<BufferLock, RunError> {
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| RunError::Buffer { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        match file.try_lock() {
            Ok(()) => Ok(BufferLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(RunError::Locked(dir.to_owned())),
            Err(std::fs::TryLockError::Error(source)) => Err(RunError::Buffer { path, source }),
        }
    }
}

/// The queue settings of one rule: its own directory, and an equal share of `buffer.max_size`
/// (so the total stays under the configured cap).
pub fn queue_config(config: &Config, rule: &RuleConfig) -> DiskQueueConfig {
    let share = config.buffer.max_size.0 / config.rules.len().max(1) as u64;
    // At least four segments fit in a share, so drop_oldest frees space in steps of a quarter.
    let segment_size = config
        .buffer
        .segment_size
        .0
        .min(share / 4)
        .max(queue::disk::MIN_SEGMENT_SIZE);
    DiskQueueConfig {
        dir: rule_dir(config, &rule.name),
        segment_size,
        max_size: share,
        when_full: config.buffer.when_full,
        max_age: Some(config.buffer.max_age.0),
    }
}

/// Where a rule's queue and dead letters live.
pub fn rule_dir(config: &Config, rule: &str) -> PathBuf {
    config.buffer.dir.join(rule)
}

/// Opens every rule's queue, in rule order.
pub fn open_queues(config: &Config) -> Result<Vec<Arc<DiskQueue>>, RunError> {
    config
        .rules
        .iter()
        .map(|rule| {
            let qc = queue_config(config, rule);
            let dir = qc.dir.clone();
            DiskQueue::open(qc)
                .map(Arc::new)
                .map_err(|source| RunError::Buffer { path: dir, source })
        })
        .collect()
}

/// Where a reload reads the configuration and when it is asked for.
pub struct Reloads {
    /// The configuration file, read again at each request.
    pub path: PathBuf,
    /// One `()` per request (SIGHUP: [`shutdown::reload_requests`]).
    pub requests: tokio::sync::mpsc::Receiver<()>,
}

/// Runs the daemon with the AWS SDK invoker until `shutdown` resolves, then stops gracefully;
/// SIGHUP reloads `config_path`.
pub async fn run(
    config: Config,
    config_path: &Path,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    // First, so a SIGHUP from now on reloads instead of killing the process.
    let requests = shutdown::reload_requests();
    let invoker = LambdaInvoker::new(&config.aws).await?;
    let reloads = Reloads {
        path: config_path.to_owned(),
        requests,
    };
    run_with_reloads(config, Arc::new(invoker), shutdown, Some(reloads)).await
}

/// Runs the daemon with the given invoker, without reloads.
pub async fn run_with<I: Invoke>(
    config: Config,
    invoker: Arc<I>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    run_with_reloads(config, invoker, shutdown, None).await
}

/// Runs the daemon with the given invoker; each request of `reloads` re-reads its file.
pub async fn run_with_reloads<I: Invoke>(
    config: Config,
    invoker: Arc<I>,
    shutdown: impl Future<Output = ()>,
    reloads: Option<Reloads>,
) -> Result<(), RunError> {
    clock::start();
    // Poll the shutdown future once before anything starts: signal handlers are installed on
    // the first poll, and until then a SIGTERM (systemd may send one right after READY=1)
    // would kill the process instead of stopping it gracefully.
    let mut shutdown = std::pin::pin!(shutdown);
    let stopped_early = tokio::select! {
        biased;
        _ = &mut shutdown => true,
        _ = std::future::ready(()) => false,
    };
    let options = mqtt::options(&config.mqtt)?;
    let _lock = BufferLock::acquire(&config.buffer.dir)?;
    let queues = open_queues(&config)?;
    for (rule, queue) in config.rules.iter().zip(&queues) {
        let pending = queue.stats();
        if pending.pending > 0 {
            tracing::info!(rule = %rule.name, pending = pending.pending, bytes = pending.bytes, "buffered messages from before: delivering them");
        }
    }

    let health = Arc::new(health::Health::new());
    // Every rule's route, kept current by the live rule set, for the reporters.
    let shared = routing::SharedRoutes::default();
    let metrics = metrics::serve(
        config.metrics.as_ref(),
        &config.mqtt.url,
        shared.clone(),
        health.clone(),
    )
    .await?;
    let http = http_ingest::bind(&config.http, config.buffer.when_full).await?;

    let (stop_ingest, ingest_shutdown) = shutdown::channel();
    let (stop_delivery, drain) = shutdown::channel();
    let (subscriptions, subscription_requests) = mqtt::subscriptions();
    let (link, replier) = mqtt::link(options, subscription_requests);
    let shutdown_timeout = config.shutdown_timeout.0;
    let notifier = Arc::new(notify::Notifier::from_env());
    let watchdog = notify::watchdog_ping_interval().filter(|_| notifier.enabled());
    if let Some(ping) = watchdog {
        health.set_turn_interval(notify::turn_interval_for(ping));
    }
    tracing::info!(
        rules = config.rules.len(),
        broker = %config.mqtt.url,
        client_id = %config.mqtt.client_id,
        "mqtt-lambda-bridge started"
    );
    let mut rules = reload::LiveRules::start(
        config,
        queues,
        invoker,
        drain,
        reload::MqttHandles {
            subscriptions,
            replier,
        },
        health.clone(),
        shared,
    );

    let http =
        http.map(|listener| listener.serve(rules.table(), health.clone(), ingest_shutdown.clone()));
    let (close_mqtt, mqtt_close) = shutdown::channel();
    let (ingest_stopped_tx, ingest_stopped) = tokio::sync::oneshot::channel();
    let mut mqtt_task = tokio::spawn(mqtt::run(
        link,
        rules.table(),
        health.clone(),
        ingest_shutdown,
        mqtt_close,
        ingest_stopped_tx,
    ));
    let clock_watch = tokio::spawn(clock::watch());
    let supervisor = notifier.enabled().then(|| {
        let routes = rules.shared_routes();
        tokio::spawn(notify::supervise(
            notifier.clone(),
            health.clone(),
            watchdog,
            move || {
                routes.read().map_or(0, |routes| {
                    routes.iter().map(|r| r.queue.stats().pending).sum()
                })
            },
        ))
    });

    let (path, mut requests) = match reloads {
        Some(Reloads { path, requests }) => (Some(path), Some(requests)),
        None => (None, None),
    };
    if !stopped_early {
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                request = recv_opt(&mut requests) => match (request, &path) {
                    (Some(()), Some(path)) => reload_now(&mut rules, &notifier, path).await,
                    // No more requests can come (no SIGHUP handler).
                    _ => requests = None,
                },
                ended = rules.next_ended() => rules.on_ended(ended).await,
            }
        }
    }
    notifier.stopping();
    let deadline = tokio::time::Instant::now() + shutdown_timeout;
    tracing::info!(
        timeout = ?shutdown_timeout,
        "stopping: no new messages; delivering what is queued"
    );
    stop_ingest.trigger();
    if tokio::time::timeout_at(deadline, ingest_stopped)
        .await
        .is_err()
    {
        tracing::warn!("MQTT ingest did not stop in time");
    }
    if let Some(http) = http {
        http.finish(deadline).await;
    }
    stop_delivery.trigger();
    rules.finish(deadline).await;
    // Now that no reply can still be waiting for it, the MQTT connection goes: in what is left
    // of the shutdown time, or at least the moment a DISCONNECT takes.
    close_mqtt.trigger();
    let grace = deadline
        .saturating_duration_since(tokio::time::Instant::now())
        .clamp(mqtt::CLOSE_MIN_GRACE, mqtt::CLOSE_GRACE);
    if tokio::time::timeout(grace, &mut mqtt_task).await.is_err() {
        mqtt_task.abort();
    }
    if let Some(supervisor) = supervisor {
        supervisor.abort();
    }
    clock_watch.abort();
    metrics.stop().await;
    Ok(())
}

/// One reload, from request to result: the single place around which the service manager is
/// told (systemd: `RELOADING=1` before, `READY=1` after, whatever the outcome).
async fn reload_now<I: Invoke>(
    rules: &mut reload::LiveRules<I>,
    notifier: &notify::Notifier,
    path: &Path,
) {
    notifier.reloading();
    rules.reload(path).await;
    notifier.ready();
}

/// The next request, or pending forever when there is no source of requests.
async fn recv_opt(requests: &mut Option<tokio::sync::mpsc::Receiver<()>>) -> Option<()> {
    match requests {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Logs one rule's counters (at shutdown, or when a removed rule has drained).
pub(crate) fn rule_summary(route: &Route<DiskQueue>) {
    let (queue, stats) = (&route.queue, &route.stats);
    let counters = queue.counters();
    let get = RuleStats::get;
    tracing::info!(
        rule = %route.plan.name,
        queued = get(&stats.queued),
        delivered = get(&stats.delivered),
        accepted_invocations = get(&stats.invocations),
        failed_invocation_attempts = get(&stats.failed_attempts),
        set_aside = get(&stats.set_aside),
        dead_lettered = get(&stats.dead_lettered),
        throttled_min_interval = get(&stats.throttled_min_interval),
        throttled_only_changes = get(&stats.throttled_unchanged),
        throttled_deadband = get(&stats.throttled_deadband),
        throttle_forgotten = get(&stats.throttle_forgotten),
        dropped_oldest = get(&counters.dropped_oldest),
        dropped_newest = get(&counters.dropped_newest),
        expired = get(&counters.expired),
        lost_to_corruption = get(&counters.lost),
        left_in_buffer = queue.stats().pending,
        "rule summary"
    );
    if route.plan.reply.is_some() {
        tracing::info!(
            rule = %route.plan.name,
            replies_published = get(&stats.replies_published),
            replies_without_topic = get(&stats.replies_without_topic),
            replies_dead_lettered = get(&stats.replies_refused),
            "reply summary"
        );
    }
}
