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
//! - [`health`]: facts about the daemon's state shared by its reporters (broker connection).
//! - [`metrics`]: `/metrics` (Prometheus), `/healthz` and `/readyz`, read from the counters.
//! - [`http`]: a small HTTP/1.1 listener with bounded connections; routing is the caller's.
//! - [`shutdown`]: the stop signal shared by every task.
//! - [`admin`]: the `buffer stats` and `buffer dead-letters` commands.
//!
//! [`run`] wires them together and takes the shutdown future, so tests can stop it.

pub mod admin;
pub mod aggregate;
pub mod batch;
pub mod config;
pub mod envelope;
pub mod health;
pub mod http;
pub mod invoker;
pub mod metrics;
pub mod mqtt;
pub mod pipeline;
pub mod plan;
pub mod preflight;
pub mod queue;
pub mod ratelimit;
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
use plan::{RulePlan, RuleStats};
use queue::deadletter::DeadLetters;
use queue::{DiskQueue, DiskQueueConfig};
use routing::{Route, Routes};

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

/// Runs the daemon with the AWS SDK invoker until `shutdown` resolves, then stops gracefully.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let invoker = LambdaInvoker::new(&config.aws).await?;
    run_with(config, Arc::new(invoker), shutdown).await
}

/// Runs the daemon with the given invoker.
pub async fn run_with<I: Invoke>(
    config: Config,
    invoker: Arc<I>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let options = mqtt::options(&config.mqtt)?;
    let _lock = BufferLock::acquire(&config.buffer.dir)?;
    let queues = open_queues(&config)?;
    let routes: Vec<Arc<Route<DiskQueue>>> = config
        .rules
        .iter()
        .zip(queues)
        .map(|(rule, queue)| {
            Arc::new(Route {
                plan: Arc::new(RulePlan::from_config(rule)),
                filter: rule.topic.clone(),
                qos: rule.qos,
                queue,
                stats: Arc::new(RuleStats::default()),
                dead_letters: DeadLetters::new(&rule_dir(&config, &rule.name)),
            })
        })
        .collect();
    let routes = Arc::new(Routes::new(routes));
    for route in routes.iter() {
        let pending = route.queue.stats();
        if pending.pending > 0 {
            tracing::info!(rule = %route.plan.name, pending = pending.pending, bytes = pending.bytes, "buffered messages from before: delivering them");
        }
    }

    let health = Arc::new(health::Health::new());
    let metrics = metrics::serve(
        config.metrics.as_ref(),
        &config.mqtt.url,
        routes.clone(),
        health.clone(),
    )
    .await?;

    let (stop_ingest, ingest_shutdown) = shutdown::channel();
    let (stop_delivery, drain) = shutdown::channel();

    let global = Arc::new(tokio::sync::Semaphore::new(
        config.aws.max_concurrency.max(1),
    ));
    let mut deliveries = tokio::task::JoinSet::new();
    for route in routes.iter() {
        deliveries.spawn(pipeline::deliver(
            route.clone(),
            invoker.clone(),
            global.clone(),
            drain.clone(),
        ));
    }
    tracing::info!(
        rules = config.rules.len(),
        broker = %config.mqtt.url,
        client_id = %config.mqtt.client_id,
        "mqtt-lambda-bridge started"
    );

    let ingest = tokio::spawn(mqtt::run(
        options,
        routes.clone(),
        health.clone(),
        ingest_shutdown,
    ));

    shutdown.await;
    let deadline = tokio::time::Instant::now() + config.shutdown_timeout.0;
    tracing::info!(
        timeout = ?config.shutdown_timeout.0,
        "stopping: no new messages; delivering what is queued"
    );
    stop_ingest.trigger();
    if tokio::time::timeout_at(deadline, ingest).await.is_err() {
        tracing::warn!("MQTT ingest did not stop in time");
    }
    stop_delivery.trigger();
    let drained = tokio::time::timeout_at(deadline, async {
        while let Some(result) = deliveries.join_next().await {
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
        deliveries.abort_all();
        tracing::warn!("shutdown deadline reached with invocations still in flight");
    }
    for route in routes.iter() {
        let (queue, stats) = (&route.queue, &route.stats);
        queue.close().await;
        let counters = queue.counters();
        let get = RuleStats::get;
        tracing::info!(
            rule = %route.plan.name,
            queued = get(&stats.queued),
            delivered = get(&stats.delivered),
            invocations = get(&stats.invocations),
            failed_attempts = get(&stats.failed_attempts),
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
    }
    metrics.stop().await;
    Ok(())
}
