//! The daemon's wiring: opens the buffers, starts ingest (MQTT, HTTP), one delivery task per
//! rule and the reporters, reloads the rules on SIGHUP ([`reload`]), and stops them in order
//! on shutdown: ingest first, then delivery within `shutdown_timeout`, then the MQTT
//! connection. [`preflight`] is what `run` and `check` refuse before connecting; [`signals`]
//! turns the process's signals into a shutdown future and reload requests.
//!
//! [`run_with_reloads`] is three steps on one `Daemon` value that holds everything started
//! (the buffer lock included, until the very end): start, serve (the select loop: shutdown,
//! reload requests, rule events), and the ordered stop.
//!
//! The daemon is the only part that knows every other part; nothing below imports it.

pub mod preflight;
pub mod reload;
pub mod signals;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::buffer::DiskQueue;
use crate::buffer::layout::{BufferLock, LayoutError, open_queues};
use crate::core::config::Config;
use crate::core::{clock, health, shutdown};
use crate::delivery::invoker::{self, Invoke, LambdaInvoker};
use crate::ingest::http as http_ingest;
use crate::mqtt;
use crate::ops::{metrics, notify};

/// Why the daemon (or a `buffer` command) could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The MQTT side could not be set up.
    #[error(transparent)]
    Mqtt(#[from] mqtt::MqttError),
    /// The Lambda client could not be set up.
    #[error(transparent)]
    Lambda(#[from] invoker::SetupError),
    /// The buffer directory is unusable or held by another process.
    #[error(transparent)]
    Buffer(#[from] LayoutError),
    /// The metrics listener could not start.
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    /// HTTP ingest could not start.
    #[error(transparent)]
    Http(#[from] http_ingest::HttpError),
}

/// Where a reload reads the configuration and when it is asked for.
pub struct Reloads {
    /// The configuration file, read again at each request.
    pub path: PathBuf,
    /// One `()` per request (SIGHUP: [`signals::reload_requests`]).
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
    let requests = signals::reload_requests();
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
    let mut daemon = Daemon::start(config, invoker).await?;
    if !stopped_early {
        daemon.serve(shutdown, reloads).await;
    }
    daemon.stop().await;
    Ok(())
}

/// Everything the daemon started, held until the ordered stop.
struct Daemon<I> {
    rules: reload::LiveRules<I>,
    notifier: Arc<notify::Notifier>,
    http: Option<http_ingest::Running>,
    mqtt_task: tokio::task::JoinHandle<()>,
    /// Stops MQTT and HTTP ingest (first).
    stop_ingest: shutdown::Trigger,
    /// Resolved once MQTT ingest has stopped.
    ingest_stopped: tokio::sync::oneshot::Receiver<()>,
    /// Stops delivery (after ingest).
    stop_delivery: shutdown::Trigger,
    /// Closes the MQTT connection (last: replies may still be waiting for it).
    close_mqtt: shutdown::Trigger,
    supervisor: Option<tokio::task::JoinHandle<()>>,
    clock_watch: tokio::task::JoinHandle<()>,
    metrics: metrics::Metrics,
    /// Publishes `[telemetry]` snapshots, when configured.
    telemetry: Option<tokio::task::JoinHandle<()>>,
    shutdown_timeout: std::time::Duration,
    /// Held until the daemon has stopped: no other process may use the buffers meanwhile.
    _lock: BufferLock,
}

impl<I: Invoke> Daemon<I> {
    /// Opens the buffers under their lock, then starts the reporters, delivery (one task per
    /// rule) and ingest, in that order, so nothing is taken in before it can be stored.
    async fn start(config: Config, invoker: Arc<I>) -> Result<Self, RunError> {
        let options = mqtt::options(&config.mqtt)?;
        let (lock, queues) = open_buffers(&config)?;
        let health = Arc::new(health::Health::new());
        // Every rule's route, kept current by the live rule set, for the reporters.
        let board = crate::core::stats::Board::default();
        let metrics = metrics::serve(
            config.metrics.as_ref(),
            &config.mqtt.url,
            board.clone(),
            health.clone(),
        )
        .await?;
        let http = http_ingest::bind(&config.http, config.buffer.when_full).await?;
        let (stop_ingest, ingest_shutdown) = shutdown::channel();
        let (stop_delivery, drain) = shutdown::channel();
        let (subscriptions, subscription_requests) = mqtt::subscriptions();
        let (link, replier) = mqtt::link(options, subscription_requests);
        let telemetry = telemetry(&config, &board, &health, &replier);
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
        let mqtt_handles = reload::MqttHandles {
            subscriptions,
            replier,
        };
        let rules = reload::LiveRules::start(
            config,
            queues,
            invoker,
            drain,
            mqtt_handles,
            health.clone(),
            board,
        );
        let http = http
            .map(|listener| listener.serve(rules.table(), health.clone(), ingest_shutdown.clone()));
        let (close_mqtt, mqtt_close) = shutdown::channel();
        let (ingest_stopped_tx, ingest_stopped) = tokio::sync::oneshot::channel();
        let mqtt_task = tokio::spawn(mqtt::run(
            link,
            rules.table(),
            health.clone(),
            ingest_shutdown,
            mqtt_close,
            ingest_stopped_tx,
        ));
        let supervisor = supervise(&notifier, &health, watchdog, rules.board());
        // Started: the loader's relocation table is never read again.
        match crate::ops::memory::release_loader_pages() {
            Ok(bytes) => tracing::debug!(bytes, "gave back the pages of the relocation table"),
            Err(e) => tracing::debug!(error = %e, "kept the pages of the relocation table"),
        }
        Ok(Daemon {
            rules,
            notifier,
            http,
            mqtt_task,
            stop_ingest,
            ingest_stopped,
            stop_delivery,
            close_mqtt,
            supervisor,
            clock_watch: tokio::spawn(clock::watch()),
            metrics,
            telemetry,
            shutdown_timeout,
            _lock: lock,
        })
    }

    /// Runs until `shutdown` resolves: reloads on request, and moves the rules through their
    /// lives as their tasks end.
    async fn serve(
        &mut self,
        mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
        reloads: Option<Reloads>,
    ) {
        let (path, mut requests) = match reloads {
            Some(Reloads { path, requests }) => (Some(path), Some(requests)),
            None => (None, None),
        };
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                request = recv_opt(&mut requests) => match (request, &path) {
                    (Some(()), Some(path)) => reload_now(&mut self.rules, &self.notifier, path).await,
                    // No more requests can come (no SIGHUP handler).
                    _ => requests = None,
                },
                event = self.rules.next_event() => self.rules.on_event(event).await,
            }
        }
    }

    /// The ordered stop, all within `shutdown_timeout`: ingest first, then delivery (what is
    /// queued is delivered), then the MQTT connection, then the reporters.
    async fn stop(self) {
        self.notifier.stopping();
        // A snapshot waiting for its PUBACK is not worth holding the stop for.
        if let Some(telemetry) = &self.telemetry {
            telemetry.abort();
        }
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        tracing::info!(
            timeout = ?self.shutdown_timeout,
            "stopping: no new messages; delivering what is queued"
        );
        self.stop_ingest.trigger();
        // Appends waiting for buffer.max_ack_delay are written now, so the stores under way
        // finish (and are acknowledged) instead of being given up.
        for route in self.rules.routes() {
            route.queue.hurry();
        }
        if tokio::time::timeout_at(deadline, self.ingest_stopped)
            .await
            .is_err()
        {
            tracing::warn!("MQTT ingest did not stop in time");
        }
        if let Some(http) = self.http {
            http.finish(deadline).await;
        }
        self.stop_delivery.trigger();
        self.rules.finish(deadline).await;
        // Now that no reply can still be waiting for it, the MQTT connection goes: in what is
        // left of the shutdown time, or at least the moment a DISCONNECT takes.
        self.close_mqtt.trigger();
        let grace = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .clamp(mqtt::CLOSE_MIN_GRACE, mqtt::CLOSE_GRACE);
        let mut mqtt_task = self.mqtt_task;
        if tokio::time::timeout(grace, &mut mqtt_task).await.is_err() {
            mqtt_task.abort();
        }
        if let Some(supervisor) = self.supervisor {
            supervisor.abort();
        }
        self.clock_watch.abort();
        self.metrics.stop().await;
    }
}

/// Takes the buffer directory's lock, then opens every rule's queue (rule order), saying
/// which hold messages from before.
fn open_buffers(config: &Config) -> Result<(BufferLock, Vec<Arc<DiskQueue>>), RunError> {
    let lock = BufferLock::acquire(&config.buffer.dir)?;
    let queues = open_queues(config)?;
    for (rule, queue) in config.rules.iter().zip(&queues) {
        let pending = queue.stats();
        if pending.pending > 0 {
            tracing::info!(rule = %rule.name, pending = pending.pending, bytes = pending.bytes, "buffered messages from before: delivering them");
        }
    }
    Ok((lock, queues))
}

/// `[telemetry]`: snapshots of the board published through the MQTT connection (QoS 1,
/// retained), when configured.
fn telemetry(
    config: &Config,
    board: &crate::core::stats::Board,
    health: &Arc<health::Health>,
    replier: &mqtt::replies::Replier,
) -> Option<tokio::task::JoinHandle<()>> {
    let section = config.telemetry.as_ref()?;
    let (replier, topic) = (replier.clone(), section.topic.clone());
    let publish = move |payload: Vec<u8>| {
        let (replier, topic) = (replier.clone(), topic.clone());
        async move {
            // Not a reply to anything: no request id, no correlation data.
            let request = crate::core::reply::Request {
                id: String::new(),
                topic: String::new(),
                response_topic: None,
                correlation_data: None,
            };
            let published = replier.publish(topic, payload, true, &request).await;
            published.map_err(|err| err.to_string())
        }
    };
    metrics::telemetry::start(Some(section), board.clone(), health.clone(), publish)
}

/// The service manager's supervisor (systemd notify, watchdog), when one is listening.
fn supervise(
    notifier: &Arc<notify::Notifier>,
    health: &Arc<health::Health>,
    watchdog: Option<std::time::Duration>,
    board: crate::core::stats::Board,
) -> Option<tokio::task::JoinHandle<()>> {
    notifier.enabled().then(|| {
        tokio::spawn(notify::supervise(
            notifier.clone(),
            health.clone(),
            watchdog,
            move || {
                board.read().map_or(0, |rules| {
                    rules.iter().map(|r| r.buffer.stats().pending).sum()
                })
            },
        ))
    })
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
