//! A TCP relay between MQTT clients and the broker that sees when the broker receives the
//! clients' PUBACKs.
//!
//! Every client connects to the relay instead of the broker; the relay opens its own
//! connection to the broker for it and copies bytes both ways. In the client → broker direction
//! it follows MQTT's framing (the fixed header: packet type in the first byte's high nibble,
//! then the remaining length as a variable-length integer) and counts each complete PUBACK
//! (type 4). Once the bytes holding a PUBACK have been written to the broker's socket, it
//! records the moment and the running count. That is the earliest moment the broker can act on
//! the acknowledgement and the latest one a client could claim for it: an ingest figure stops
//! there, not when a client hands an ack to its own library.
//!
//! Invariants:
//! - Bytes are forwarded unchanged and in order; the relay never holds back a complete packet
//!   (it writes every chunk as soon as it is read, with TCP_NODELAY on both sockets).
//! - The count covers every connection accepted since the last `reset`, so a client that
//!   reconnects mid-run is still counted, and one that is gone (killed with acks still in its
//!   socket) never counts for the next run.
//! - The relay runs on its own thread and runtime: the benchmark's other work (the fake Lambda
//!   parsing events) cannot delay a PUBACK's forwarding or its timestamp, beyond sharing the
//!   machine's cores.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// MQTT control packet type of PUBACK (the high nibble of the first byte).
const PUBACK: u8 = 4;
/// Bytes read from a socket at a time.
const CHUNK: usize = 64 * 1024;

/// Where the parser is within the client's byte stream.
#[derive(Debug, Clone, Copy)]
enum Frame {
    /// Expecting the first byte of a fixed header.
    Header,
    /// Reading the remaining length (`value` so far, next byte's `shift`).
    Length { kind: u8, value: u32, shift: u32 },
    /// Skipping the rest of a packet of type `kind`.
    Body { kind: u8, left: u32 },
}

/// Follows MQTT packet boundaries in one direction of a connection.
#[derive(Debug)]
struct Framer {
    frame: Frame,
}

impl Framer {
    fn new() -> Framer {
        Framer {
            frame: Frame::Header,
        }
    }

    /// Takes the next bytes of the stream; returns how many PUBACKs they completed.
    fn feed(&mut self, mut bytes: &[u8]) -> u64 {
        let mut completed = 0;
        while !bytes.is_empty() {
            match self.frame {
                Frame::Header => {
                    self.frame = Frame::Length {
                        kind: bytes[0] >> 4,
                        value: 0,
                        shift: 0,
                    };
                    bytes = &bytes[1..];
                }
                Frame::Length { kind, value, shift } => {
                    let byte = bytes[0];
                    bytes = &bytes[1..];
                    let value = value | (u32::from(byte & 0x7f) << shift);
                    if byte & 0x80 != 0 {
                        self.frame = Frame::Length {
                            kind,
                            value,
                            shift: shift + 7,
                        };
                    } else if value == 0 {
                        completed += u64::from(kind == PUBACK);
                        self.frame = Frame::Header;
                    } else {
                        self.frame = Frame::Body { kind, left: value };
                    }
                }
                Frame::Body { kind, left } => {
                    let take = (left as usize).min(bytes.len());
                    bytes = &bytes[take..];
                    let left = left - take as u32;
                    if left == 0 {
                        completed += u64::from(kind == PUBACK);
                        self.frame = Frame::Header;
                    } else {
                        self.frame = Frame::Body { kind, left };
                    }
                }
            }
        }
        completed
    }
}

#[derive(Default)]
struct State {
    /// Bumped by `reset`; a connection counts only while its generation is current.
    generation: u64,
    /// When each client connection was accepted, since the last reset.
    connects: Vec<Instant>,
    /// PUBACKs written to the broker since the last reset.
    pubacks: u64,
    /// (when written to the broker's socket, PUBACKs written so far), one entry per chunk that
    /// held at least one PUBACK.
    timeline: Vec<(Instant, u64)>,
}

struct Shared {
    state: Mutex<State>,
    changed: Notify,
    /// Client connections whose relay is still running (across resets).
    open: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A running relay in front of one broker; stopped on drop.
pub struct AckProxy {
    /// Clients connect here.
    pub port: u16,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for AckProxy {
    fn drop(&mut self) {
        // Ending the relay's runtime drops every connection it carries.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl AckProxy {
    /// Listens on an ephemeral 127.0.0.1 port and relays to the broker on `broker_port`.
    pub fn start(broker_port: u16) -> AckProxy {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind the relay");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let port = listener.local_addr().expect("relay address").port();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            open: AtomicUsize::new(0),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("relay runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("relay listener");
                    let accept = async {
                        while let Ok((client, _)) = listener.accept().await {
                            let generation = {
                                let mut state = shared.lock();
                                state.connects.push(Instant::now());
                                state.generation
                            };
                            shared.open.fetch_add(1, Ordering::SeqCst);
                            shared.changed.notify_waiters();
                            let shared = shared.clone();
                            tokio::spawn(async move {
                                relay(client, broker_port, shared.clone(), generation).await;
                                shared.open.fetch_sub(1, Ordering::SeqCst);
                                shared.changed.notify_waiters();
                            });
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = stopped => {}
                    }
                });
            })
        };
        AckProxy {
            port,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Forgets PUBACKs seen so far; connections open now go on counting.
    pub fn clear_counts(&self) {
        let mut state = self.shared.lock();
        state.pubacks = 0;
        state.timeline.clear();
    }

    /// Forgets connections and PUBACKs seen so far; connections open now stop counting.
    pub fn reset(&self) {
        let mut state = self.shared.lock();
        *state = State {
            generation: state.generation + 1,
            ..State::default()
        };
    }

    /// PUBACKs written to the broker since the last reset.
    pub fn pubacks(&self) -> u64 {
        self.shared.lock().pubacks
    }

    /// Client connections accepted since the last reset.
    pub fn connections(&self) -> usize {
        self.shared.lock().connects.len()
    }

    /// Waits until no client connection is open, so the broker has seen every client of the
    /// last run go before the next backlog is published (or the broker could send part of it
    /// to a connection that is already gone). Panics after `patience`.
    pub async fn wait_idle(&self, patience: Duration) {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let changed = self.shared.changed.notified();
            let open = self.shared.open.load(Ordering::SeqCst);
            if open == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!("{open} client connection(s) still open through the relay");
            }
        }
    }

    /// When the first client connection since the last reset was accepted.
    pub fn first_connect(&self) -> Option<Instant> {
        self.shared.lock().connects.first().copied()
    }

    /// Waits for a client connection; `None` after `patience`.
    pub async fn wait_connect(&self, patience: Duration) -> Option<Instant> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let changed = self.shared.changed.notified();
            if let Some(at) = self.first_connect() {
                return Some(at);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return None;
            }
        }
    }

    /// Waits until `n` PUBACKs reached the broker; returns when the `n`th was written, or
    /// `None` after `patience`.
    pub async fn wait_pubacks(&self, n: u64, patience: Duration) -> Option<Instant> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let changed = self.shared.changed.notified();
            if let Some(at) = self.nth_puback(n) {
                return Some(at);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return None;
            }
        }
    }

    /// When the `n`th PUBACK since the last reset was written to the broker, if it was.
    pub fn nth_puback(&self, n: u64) -> Option<Instant> {
        let state = self.shared.lock();
        let i = state.timeline.partition_point(|&(_, count)| count < n);
        state.timeline.get(i).map(|&(at, _)| at)
    }
}

/// Copies one client's connection to and from the broker, counting its PUBACKs.
async fn relay(client: TcpStream, broker_port: u16, shared: Arc<Shared>, generation: u64) {
    let Ok(broker) = TcpStream::connect(("127.0.0.1", broker_port)).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = broker.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut broker_read, mut broker_write) = broker.into_split();
    let downstream = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut broker_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    });
    let mut framer = Framer::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match client_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let acks = framer.feed(&buf[..n]);
        if broker_write.write_all(&buf[..n]).await.is_err() {
            break;
        }
        if acks > 0 {
            let at = Instant::now();
            let mut state = shared.lock();
            if state.generation != generation {
                continue;
            }
            state.pubacks += acks;
            let total = state.pubacks;
            state.timeline.push((at, total));
            drop(state);
            shared.changed.notify_waiters();
        }
    }
    let _ = broker_write.shutdown().await;
    // The broker closes its side once it sees ours closed; a client that vanished (SIGKILL)
    // must not keep the broker's half open.
    downstream.abort();
}

/// Checks the framing on a stream cut at every possible point; runs at the start of each
/// benchmark (benches have no test harness) so a parser bug cannot silently skew a figure.
pub fn self_check() {
    // CONNECT-ish packet with a two-byte remaining length (200), two PUBACKs, a PINGREQ, a
    // PUBLISH, another PUBACK.
    let mut stream = vec![0x10, 0xc8, 0x01];
    stream.extend(std::iter::repeat_n(0u8, 200));
    stream.extend([0x40, 0x02, 0x00, 0x01, 0x40, 0x02, 0x00, 0x02, 0xc0, 0x00]);
    stream.extend([0x32, 0x05, 0x00, 0x01, b't', 0x00, 0x03]);
    stream.extend([0x40, 0x02, 0x00, 0x03]);
    for cut in 0..=stream.len() {
        let mut framer = Framer::new();
        let total = framer.feed(&stream[..cut]) + framer.feed(&stream[cut..]);
        assert_eq!(total, 3, "PUBACK framing is wrong when cut at byte {cut}");
    }
    let mut framer = Framer::new();
    let one_by_one: u64 = stream.iter().map(|b| framer.feed(&[*b])).sum();
    assert_eq!(one_by_one, 3, "PUBACK framing is wrong byte by byte");
}
