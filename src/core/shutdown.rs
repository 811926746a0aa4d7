//! Shutdown signalling: a trigger that flips once and any number of listeners. The process's
//! signals (SIGTERM, SIGINT, SIGHUP) are turned into triggers and requests by
//! `crate::daemon::signals`.

use tokio::sync::watch;

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
