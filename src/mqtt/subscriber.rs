//! The subscriber task sends every SUBSCRIBE and UNSUBSCRIBE: on each connection, the filters
//! of the current rules the broker's session has not answered (the session says which are
//! answered; a new session and a process start have none) and an UNSUBSCRIBE for each filter
//! it answered that no rule uses any more (one lost with its connection), and what a reload
//! adds or removes ([`Subscriptions`]) on the same connection and session.
//!
//! Invariant: being the only sender, it notes each request for the session (through the poll
//! task) before handing it to rumqttc, in the order sent, so a SUBACK names the filters and
//! rules it answers. Being the only sender, it also keeps a subscribe and an unsubscribe of one
//! filter in the order asked: the current rules are read when their turn comes, after every
//! reload's change asked before. It awaits room in rumqttc's request channel, which the poll task drains
//! while it polls; ingest never waits on this task.

use tokio::sync::mpsc;

use super::Sink;
use super::protocol::Client;
use super::session::{Request, Standing, forgotten, unanswered};

/// What the subscriber task is asked to do.
#[derive(Debug)]
pub(super) enum SubscriberEvent {
    /// Subscribe each filter of the rules in force not answered so, and unsubscribe those the
    /// session may hold that no rule uses (the session says what it holds).
    SubscribeUnanswered(Standing),
    /// A reload added these filters (or raised their QoS).
    Subscribe(Vec<(String, u8)>),
    /// No rule uses these filters any more.
    Unsubscribe(Vec<String>),
}

/// Subscribe and unsubscribe on the running connection (a reload's changes); cheap to clone.
#[derive(Debug, Clone)]
pub struct Subscriptions(mpsc::UnboundedSender<SubscriberEvent>);

/// The other end of [`Subscriptions`], handed to [`super::run`].
#[derive(Debug)]
pub struct SubscriptionRequests {
    pub(super) tx: mpsc::UnboundedSender<SubscriberEvent>,
    pub(super) rx: mpsc::UnboundedReceiver<SubscriberEvent>,
}

/// A handle for reloads and the requests it sends, for [`super::run`].
pub fn subscriptions() -> (Subscriptions, SubscriptionRequests) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Subscriptions(tx.clone()), SubscriptionRequests { tx, rx })
}

impl Subscriptions {
    /// Subscribes `filters` (filter, QoS) on the live connection. Sent when connected, or
    /// right after the next connection.
    pub fn subscribe(&self, filters: Vec<(String, u8)>) {
        if !filters.is_empty() {
            let _ = self.0.send(SubscriberEvent::Subscribe(filters));
        }
    }

    /// Unsubscribes `filters` on the live connection.
    pub fn unsubscribe(&self, filters: Vec<String>) {
        if !filters.is_empty() {
            let _ = self.0.send(SubscriberEvent::Unsubscribe(filters));
        }
    }
}

/// Sends every SUBSCRIBE and UNSUBSCRIBE asked for, in order, noting each on `notes` first.
pub(super) async fn subscriber<S: Sink>(
    client: Client,
    routes: S,
    mut events: mpsc::UnboundedReceiver<SubscriberEvent>,
    notes: mpsc::UnboundedSender<Request>,
) {
    while let Some(event) = events.recv().await {
        let filters = match event {
            SubscriberEvent::SubscribeUnanswered(standing) => {
                let current = routes.subscriptions();
                unsubscribe(&client, &notes, forgotten(&current, &standing)).await;
                unanswered(current, &standing.answered)
            }
            SubscriberEvent::Subscribe(filters) => filters,
            SubscriberEvent::Unsubscribe(filters) => {
                unsubscribe(&client, &notes, filters).await;
                continue;
            }
        };
        if filters.is_empty() {
            continue;
        }
        let named = filters
            .iter()
            .map(|(path, qos)| (path.clone(), *qos, routes.rules_of(path)))
            .collect();
        let _ = notes.send(Request::Subscribe(named));
        if let Err(err) = client.subscribe_many(filters).await {
            tracing::error!(error = %err, "cannot queue the subscription request");
        }
    }
}

/// One UNSUBSCRIBE per filter, each noted for the session first.
async fn unsubscribe(
    client: &Client,
    notes: &mpsc::UnboundedSender<Request>,
    filters: Vec<String>,
) {
    for filter in filters {
        let _ = notes.send(Request::Unsubscribe(filter.clone()));
        if let Err(err) = client.unsubscribe(filter).await {
            tracing::error!(error = %err, "cannot queue the unsubscribe request");
        }
    }
}
