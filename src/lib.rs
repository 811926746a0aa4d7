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
//! - [`ratelimit`]: the token bucket (pure).
//! - [`invoker`]: the [`invoker::Invoke`] seam, the AWS SDK client, failure classification.
//! - [`shutdown`]: the stop signal shared by every task.
//!
//! [`run`] wires them together and takes the shutdown future, so tests can stop it.

pub mod config;
pub mod envelope;
pub mod invoker;
pub mod mqtt;
pub mod pipeline;
pub mod queue;
pub mod ratelimit;
pub mod rules;
pub mod shutdown;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use config::Config;
use invoker::{Invoke, LambdaInvoker};
use pipeline::{RulePlan, RuleStats};
use queue::MemoryQueue;
use rules::RuleSet;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The MQTT side could not be set up.
    #[error(transparent)]
    Mqtt(#[from] mqtt::MqttError),
    /// The Lambda client could not be set up.
    #[error(transparent)]
    Lambda(#[from] invoker::SetupError),
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
    let plans: Vec<RulePlan> = config.rules.iter().map(RulePlan::from_config).collect();
    let queues: Vec<Arc<MemoryQueue>> = plans.iter().map(|_| Arc::default()).collect();
    let stats: Vec<Arc<RuleStats>> = plans.iter().map(|_| Arc::default()).collect();

    let (stop_ingest, ingest_shutdown) = shutdown::channel();
    let (stop_delivery, drain) = shutdown::channel();

    let mut deliveries = tokio::task::JoinSet::new();
    for ((plan, queue), stats) in plans.iter().zip(&queues).zip(&stats) {
        deliveries.spawn(pipeline::deliver(
            plan.clone(),
            queue.clone(),
            invoker.clone(),
            stats.clone(),
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
        tracing::info!(
            rule = %plan.name,
            queued = stats.queued.load(Ordering::Relaxed),
            delivered = stats.delivered.load(Ordering::Relaxed),
            invocations = stats.invocations.load(Ordering::Relaxed),
            failed_attempts = stats.failed_attempts.load(Ordering::Relaxed),
            set_aside = stats.set_aside.load(Ordering::Relaxed),
            left_in_queue = queue.len(),
            "rule summary"
        );
    }
    Ok(())
}
