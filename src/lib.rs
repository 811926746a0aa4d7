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
//! - [`mqtt`]: connection options, the event loop, ingest into the queues, acks after append.
//! - [`pipeline`]: per-rule delivery: batching, rate limiting, retries with backoff.
//! - [`ratelimit`]: the token bucket and adaptive concurrency (pure).
//! - [`throttle`]: per-topic min_interval, only_changes, deadband (pure).
//! - [`aggregate`]: statistics windows (pure).
//! - [`invoker`]: the [`invoker::Invoke`] seam, the AWS SDK client, failure classification.
//! - [`shutdown`]: the stop signal shared by every task.
//! - [`admin`]: the `buffer stats` and `buffer dead-letters` commands.
//!
//! [`run`] wires them together and takes the shutdown future, so tests can stop it.

pub mod admin;
pub mod aggregate;
pub mod config;
pub mod envelope;
pub mod invoker;
pub mod mqtt;
pub mod pipeline;
pub mod preflight;
pub mod queue;
pub mod ratelimit;
pub mod rules;
pub mod shutdown;
pub mod throttle;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use std::fs::File;
use std::path::{Path, PathBuf};

use config::{Config, RuleConfig};
use invoker::{Invoke, LambdaInvoker};
use pipeline::{RulePlan, RuleStats};
use queue::deadletter::DeadLetters;
use queue::{DiskQueue, DiskQueueConfig};
use rules::RuleSet;

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
    let plans: Vec<RulePlan> = config.rules.iter().map(RulePlan::from_config).collect();
    let queues = open_queues(&config)?;
    let letters: Vec<DeadLetters> = config
        .rules
        .iter()
        .map(|r| DeadLetters::new(&rule_dir(&config, &r.name)))
        .collect();
    let stats: Vec<Arc<RuleStats>> = plans.iter().map(|_| Arc::default()).collect();
    for (plan, queue) in plans.iter().zip(&queues) {
        let pending = queue.stats();
        if pending.pending > 0 {
            tracing::info!(rule = %plan.name, pending = pending.pending, bytes = pending.bytes, "buffered messages from before: delivering them");
        }
    }

    let (stop_ingest, ingest_shutdown) = shutdown::channel();
    let (stop_delivery, drain) = shutdown::channel();

    let global = Arc::new(tokio::sync::Semaphore::new(
        config.aws.max_concurrency.max(1),
    ));
    let mut deliveries = tokio::task::JoinSet::new();
    for (((plan, queue), stats), letters) in plans.iter().zip(&queues).zip(&stats).zip(&letters) {
        deliveries.spawn(pipeline::deliver(
            plan.clone(),
            queue.clone(),
            invoker.clone(),
            stats.clone(),
            letters.clone(),
            global.clone(),
            drain.clone(),
        ));
    }
    tracing::info!(
        rules = plans.len(),
        broker = %config.mqtt.url,
        client_id = %config.mqtt.client_id,
        "mqtt-lambda-bridge started"
    );

    let sink = mqtt::Sink {
        rules: RuleSet::new(config.rules.iter().map(|r| r.topic.clone())),
        plans: plans.clone(),
        queues: queues.clone(),
        stats: stats.clone(),
        dead_letters: letters.clone(),
    };
    let filters = config
        .rules
        .iter()
        .map(|r| (r.topic.clone(), r.qos))
        .collect();
    let ingest = tokio::spawn(mqtt::run(options, filters, sink, ingest_shutdown));

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
    for ((plan, stats), queue) in plans.iter().zip(&stats).zip(&queues) {
        queue.close().await;
        let counters = queue.counters();
        tracing::info!(
            rule = %plan.name,
            queued = stats.queued.load(Ordering::Relaxed),
            delivered = stats.delivered.load(Ordering::Relaxed),
            invocations = stats.invocations.load(Ordering::Relaxed),
            failed_attempts = stats.failed_attempts.load(Ordering::Relaxed),
            set_aside = stats.set_aside.load(Ordering::Relaxed),
            dead_lettered = stats.dead_lettered.load(Ordering::Relaxed),
            throttled_min_interval = stats.throttled_min_interval.load(Ordering::Relaxed),
            throttled_only_changes = stats.throttled_unchanged.load(Ordering::Relaxed),
            throttled_deadband = stats.throttled_deadband.load(Ordering::Relaxed),
            dropped_oldest = counters.dropped_oldest.load(Ordering::Relaxed),
            dropped_newest = counters.dropped_newest.load(Ordering::Relaxed),
            expired = counters.expired.load(Ordering::Relaxed),
            lost_to_corruption = counters.lost.load(Ordering::Relaxed),
            left_in_buffer = queue.stats().pending,
            "rule summary"
        );
    }
    Ok(())
}
