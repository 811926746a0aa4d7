//! Shutdown signalling: a trigger that flips once and any number of listeners.
//!
//! SIGTERM and SIGINT both start a graceful stop: ingest stops taking messages, the queues are
//! drained of what Lambda accepts within `shutdown_timeout`, and the process exits 0. Under
//! systemd, `run` says `STOPPING=1` as the stop begins (notify.rs). `run` polls the signal
//! future once before it starts anything, so the handlers are in place before READY=1.
//!
//! SIGHUP asks for a reload ([`reload_requests`]); it never stops the daemon.

use tokio::sync::{mpsc, watch};

/// Flips the shutdown flag; dropping it without triggering leaves listeners waiting forever.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// Listens for the shutdown flag; cheap to clone.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A new trigger and its listener.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    /// Starts the shutdown; calling it again does nothing.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// Resolves once the shutdown has been triggered (at once if it already was). If the trigger
    /// is dropped untriggered, it never resolves.
    pub async fn wait(&self) {
        let mut rx = self.0.clone();
        if rx.wait_for(|stop| *stop).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Whether the shutdown has started.
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received: shutting down"),
                    _ = int.recv() => tracing::info!("SIGINT received: shutting down"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Reload requests: one per SIGHUP, those arriving during a reload folded into one more.
/// From the call on, SIGHUP no longer terminates the process. Without a SIGHUP handler (not
/// unix, or registration failed: logged) the receiver is closed at once.
pub fn reload_requests() -> mpsc::Receiver<()> {
    // One waiting request is enough: the reload after it reads the file as it is by then.
    let (tx, rx) = mpsc::channel(1);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        tracing::info!("SIGHUP received: reloading the configuration");
                        if tx.try_send(()).is_err() && tx.is_closed() {
                            break;
                        }
                    }
                });
                return rx;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGHUP: reloading is off");
            }
        }
    }
    drop(tx);
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listeners_see_the_trigger() {
        let (trigger, shutdown) = channel();
        let other = shutdown.clone();
        assert!(!shutdown.is_triggered());
        let waiter = tokio::spawn(async move { other.wait().await });
        trigger.trigger();
        waiter.await.expect("join");
        assert!(shutdown.is_triggered());
        shutdown.wait().await;
    }
}
