//! A TCP relay between the bridge and mosquitto that can lose chosen MQTT packets the way a
//! network does, to test the seams of the connection.
//!
//! The bridge connects to the relay's port; the relay opens its own connection to the broker
//! for each and forwards whole MQTT packets both ways (it follows the framing: packet type in
//! the first byte's high nibble, then the remaining length as a variable-length integer).
//!
//! What it can do, each armed by the test:
//! - [`Relay::lose_subscribes`]: the next SUBSCRIBEs the bridge sends are lost with their
//!   connection: the relay closes both sides instead of forwarding one, so the broker never
//!   sees it and the bridge never gets its SUBACK;
//! - [`Relay::swallow_pubacks`]: the broker's PUBACKs (the answers to the bridge's replies) are
//!   dropped, so a reply waits for good while everything else flows;
//! - [`Relay::stall_bridge`]: stops reading from the bridge, so its writes block once the
//!   sockets' buffers are full.
//!
//! Invariant: a packet is forwarded whole or not at all, in order.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// MQTT control packet types (the first byte's high nibble).
const PUBACK: u8 = 4;
const SUBSCRIBE: u8 = 8;

#[derive(Default)]
struct Arms {
    lose_subscribes: AtomicUsize,
    swallow_pubacks: AtomicBool,
    stalled: AtomicBool,
    resumed: Notify,
    /// Connections closed because a SUBSCRIBE was lost.
    cuts: AtomicUsize,
    cut: Notify,
    /// Connections accepted from the bridge.
    accepted: AtomicUsize,
    /// PUBACKs dropped.
    swallowed: AtomicUsize,
    swallow: Notify,
}

/// The relay, listening on `port`, until dropped.
pub struct Relay {
    pub port: u16,
    arms: Arc<Arms>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Relays every connection to the broker on `broker_port`.
    pub async fn start(broker_port: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let port = listener.local_addr().expect("relay addr").port();
        let arms = Arc::new(Arms::default());
        let task = {
            let arms = arms.clone();
            tokio::spawn(async move {
                while let Ok((bridge, _)) = listener.accept().await {
                    arms.accepted.fetch_add(1, Ordering::SeqCst);
                    let Ok(broker) = TcpStream::connect(("127.0.0.1", broker_port)).await else {
                        continue;
                    };
                    tokio::spawn(relay(bridge, broker, arms.clone()));
                }
            })
        };
        Relay { port, arms, task }
    }

    /// The URL for the bridge's `mqtt.url`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The next `n` SUBSCRIBEs are lost with their connection.
    pub fn lose_subscribes(&self, n: usize) {
        self.arms.lose_subscribes.store(n, Ordering::SeqCst);
    }

    /// Whether the broker's PUBACKs are dropped.
    pub fn swallow_pubacks(&self, on: bool) {
        self.arms.swallow_pubacks.store(on, Ordering::SeqCst);
    }

    /// Whether the relay stops reading from the bridge.
    pub fn stall_bridge(&self, on: bool) {
        self.arms.stalled.store(on, Ordering::SeqCst);
        if !on {
            self.arms.resumed.notify_waiters();
        }
    }

    /// Connections accepted from the bridge so far.
    pub fn accepted(&self) -> usize {
        self.arms.accepted.load(Ordering::SeqCst)
    }

    /// Waits until `n` PUBACKs were dropped.
    pub async fn wait_swallowed(&self, n: usize) {
        let waited = tokio::time::timeout(super::PATIENCE, async {
            loop {
                let swallowed = self.arms.swallow.notified();
                if self.arms.swallowed.load(Ordering::SeqCst) >= n {
                    return;
                }
                swallowed.await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "the relay dropped {} of {n} PUBACKs",
            self.arms.swallowed.load(Ordering::SeqCst)
        );
    }

    /// Waits until `n` connections were cut for a lost SUBSCRIBE.
    pub async fn wait_cuts(&self, n: usize) {
        let waited = tokio::time::timeout(super::PATIENCE, async {
            loop {
                let cut = self.arms.cut.notified();
                if self.arms.cuts.load(Ordering::SeqCst) >= n {
                    return;
                }
                cut.await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "the relay cut {} of {n} connections for a SUBSCRIBE",
            self.arms.cuts.load(Ordering::SeqCst)
        );
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Takes one whole packet off the front of `buf`: (type, bytes); `None` until it is whole.
fn next_packet(buf: &mut BytesMut) -> Option<(u8, BytesMut)> {
    let mut remaining = 0usize;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let total = 1 + (i + 1) + remaining;
            if buf.len() < total {
                return None;
            }
            let kind = buf[0] >> 4;
            return Some((kind, buf.split_to(total)));
        }
    }
    None
}

async fn relay(bridge: TcpStream, broker: TcpStream, arms: Arc<Arms>) {
    let _ = bridge.set_nodelay(true);
    let _ = broker.set_nodelay(true);
    let (mut bridge_read, mut bridge_write) = bridge.into_split();
    let (mut broker_read, mut broker_write) = broker.into_split();
    let up = {
        let arms = arms.clone();
        async move {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            loop {
                while arms.stalled.load(Ordering::SeqCst) {
                    let resumed = arms.resumed.notified();
                    if !arms.stalled.load(Ordering::SeqCst) {
                        break;
                    }
                    resumed.await;
                }
                if bridge_read.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
                while let Some((kind, packet)) = next_packet(&mut buf) {
                    if kind == SUBSCRIBE
                        && arms
                            .lose_subscribes
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok()
                    {
                        arms.cuts.fetch_add(1, Ordering::SeqCst);
                        arms.cut.notify_waiters();
                        return;
                    }
                    if broker_write.write_all(packet.chunk()).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let down = async move {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        loop {
            if broker_read.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return;
            }
            while let Some((kind, packet)) = next_packet(&mut buf) {
                if kind == PUBACK && arms.swallow_pubacks.load(Ordering::SeqCst) {
                    arms.swallowed.fetch_add(1, Ordering::SeqCst);
                    arms.swallow.notify_waiters();
                    continue;
                }
                if bridge_write.write_all(packet.chunk()).await.is_err() {
                    return;
                }
            }
        }
    };
    // Either direction ending closes both: dropping the halves closes the sockets.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}
