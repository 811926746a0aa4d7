//! The process's signals. SIGTERM and SIGINT both start a graceful stop: ingest stops taking
//! messages, the queues are drained of what Lambda accepts within `shutdown_timeout`, and the
//! process exits 0. Under systemd, `run` says `STOPPING=1` as the stop begins
//! (`ops/notify.rs`). `run` polls the signal future once before it starts anything, so the
//! handlers are in place before READY=1.
//!
//! SIGHUP asks for a reload ([`reload_requests`]); it never stops the daemon.

use tokio::sync::mpsc;

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
