//! An in-process fake of Lambda's Invoke API (`POST /2015-03-31/functions/{name}/invocations`)
//! that records every request and answers from a script: accept, throttle, fail, be slow.
//!
//! Its waits await the next request instead of polling, and give up after the fake's patience:
//! [`PATIENCE`], or more for a fake standing in for a Lambda that comes back after an outage
//! ([`FakeLambda::back_after`]). A wait that gives up says what arrived in a line (how many
//! requests and messages, the first payloads missing), never the requests themselves.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use tokio::sync::Notify;

use super::{Outage, PATIENCE};

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The function as it appeared in the path (name, partial ARN or ARN).
    pub function: String,
    /// The `Qualifier` query parameter.
    pub qualifier: Option<String>,
    /// The `X-Amz-Invocation-Type` header.
    pub invocation_type: Option<String>,
    /// The `Authorization` header (SigV4).
    pub authorization: Option<String>,
    /// The event.
    pub body: serde_json::Value,
    /// The raw body length.
    pub body_len: usize,
    /// Messages in the event (`messages[]`), counted once on arrival.
    pub messages: usize,
    /// Requests in flight at the fake when this one arrived (itself included).
    pub concurrent: usize,
    /// When it arrived.
    pub at: std::time::Instant,
}

/// A scripted answer.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 202 (Event) or 200 (RequestResponse).
    Accept,
    /// An AWS-style error.
    Error {
        status: u16,
        code: &'static str,
        message: &'static str,
        retry_after: Option<&'static str>,
    },
    /// Wait, then accept.
    Slow(Duration),
    /// A `request_response` function that raised an error (200 with X-Amz-Function-Error).
    FunctionError,
}

impl Reply {
    pub fn throttle(retry_after: Option<&'static str>) -> Reply {
        Reply::Error {
            status: 429,
            code: "TooManyRequestsException",
            message: "Rate Exceeded.",
            retry_after,
        }
    }

    pub fn service_error() -> Reply {
        Reply::Error {
            status: 500,
            code: "ServiceException",
            message: "Lambda is having a bad day",
            retry_after: None,
        }
    }
}

#[derive(Default)]
struct Inner {
    invocations: Vec<Invocation>,
    /// Answers still to give, per function (as in the path).
    scripts: HashMap<String, VecDeque<Reply>>,
    /// Functions answered with 404 ResourceNotFoundException, always.
    missing: HashSet<String>,
    /// Functions answered with 403 AccessDeniedException, always.
    denied: HashSet<String>,
    /// Requests answered with an error, in all.
    refused: usize,
    /// Requests being answered now.
    in_flight: usize,
    /// Requests that arrived, answered or not yet.
    arrived: usize,
    /// Count each event's messages without parsing it, and keep no body (benchmarks: the
    /// fake shares the machine with the bridge, and parsing would take its CPU).
    lean: bool,
    /// How long a wait may take; `None` is [`PATIENCE`].
    patience: Option<Duration>,
}

/// The fake; clones share state.
#[derive(Clone, Default)]
pub struct FakeLambda {
    inner: Arc<Mutex<Inner>>,
    notify: Arc<Notify>,
}

/// How each message of an event begins, as the bridge encodes it.
const MESSAGE_START: &[u8] = b"{\"id\":\"";

/// A running fake server.
pub struct FakeLambdaServer {
    pub fake: FakeLambda,
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeLambdaServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeLambdaServer {
    /// Serves on an ephemeral port.
    pub async fn start() -> FakeLambdaServer {
        Self::start_on(0, FakeLambda::default()).await
    }

    /// Serves `fake` on `port` (0: any); used to bring a "down" Lambda back on the same port.
    pub async fn start_on(port: u16, fake: FakeLambda) -> FakeLambdaServer {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind fake lambda");
        let port = listener.local_addr().expect("addr").port();
        let app = Router::new()
            .route("/2015-03-31/functions/{function}/invocations", post(invoke))
            .with_state(fake.clone());
        // Like Lambda's front end: answer without waiting on Nagle's algorithm.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeLambdaServer { fake, port, task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl FakeLambda {
    /// A fake that counts messages without parsing events; `body` is `null` (benchmarks).
    pub fn lean() -> FakeLambda {
        let fake = FakeLambda::default();
        fake.inner.lock().expect("lock").lean = true;
        fake
    }

    /// A fake for a Lambda that was down during `outage` and comes back now: its waits allow
    /// for the retry delay the bridge may be sleeping after that long.
    pub fn back_after(outage: &Outage) -> FakeLambda {
        let fake = FakeLambda::default();
        let patience = outage.patience();
        // Shown with a failure: whether the outage, and so the allowance, was long.
        eprintln!(
            "Lambda back after {:.1?} down; its waits allow {patience:.1?}",
            outage.lasted()
        );
        fake.inner.lock().expect("lock").patience = Some(patience);
        fake
    }

    /// How long each wait may take.
    pub fn patience(&self) -> Duration {
        self.inner
            .lock()
            .expect("lock")
            .patience
            .unwrap_or(PATIENCE)
    }

    pub fn script(&self, function: &str, replies: impl IntoIterator<Item = Reply>) {
        let mut inner = self.inner.lock().expect("lock");
        inner
            .scripts
            .entry(function.to_owned())
            .or_default()
            .extend(replies);
    }

    pub fn missing(&self, function: &str) {
        self.inner
            .lock()
            .expect("lock")
            .missing
            .insert(function.to_owned());
    }

    /// Answers every request for `function` with 403 AccessDeniedException, as Lambda does
    /// when the caller's policy does not allow lambda:InvokeFunction on it.
    pub fn denied(&self, function: &str) {
        self.inner
            .lock()
            .expect("lock")
            .denied
            .insert(function.to_owned());
    }

    /// Runs `f` over the recorded invocations without copying them.
    pub fn with_invocations<R>(&self, f: impl FnOnce(&[Invocation]) -> R) -> R {
        f(&self.inner.lock().expect("lock").invocations)
    }

    pub fn invocations(&self) -> Vec<Invocation> {
        self.inner.lock().expect("lock").invocations.clone()
    }

    /// Accepted invocations of `function`, in order.
    pub fn accepted_for(&self, function: &str) -> Vec<Invocation> {
        self.invocations()
            .into_iter()
            .filter(|i| i.function == function)
            .collect()
    }

    pub fn refused(&self) -> usize {
        self.inner.lock().expect("lock").refused
    }

    /// Waits until `predicate` holds over the accepted invocations; a failure summarises them.
    /// The predicate runs under the fake's lock: it must not lock it again.
    pub async fn wait_until(&self, what: &str, predicate: impl Fn(&[Invocation]) -> bool) {
        self.wait_for(what, |all| {
            if predicate(all) {
                Ok(())
            } else {
                Err(summary(all))
            }
        })
        .await
    }

    /// Waits until `check` passes over the accepted invocations, within the fake's patience; on
    /// failure the panic names `what` and the last thing `check` said was missing. `check` runs
    /// under the fake's lock: it must not lock it again.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        check: impl Fn(&[Invocation]) -> Result<T, String>,
    ) -> T {
        let patience = self.patience();
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let waiting = self.notify.notified();
            let missing = match self.with_invocations(&check) {
                Ok(done) => return done,
                Err(missing) => missing,
            };
            if tokio::time::timeout_at(deadline, waiting).await.is_err() {
                let refused = self.refused();
                panic!(
                    "fake Lambda never saw {what} within {patience:.1?}: {missing}; \
                     {refused} requests refused"
                );
            }
        }
    }

    /// Waits until every payload numbered `0..n` (see [`deliveries`]) reached the function, and
    /// returns how often each arrived; a payload numbered `n` or more fails the test. A failure
    /// says how many arrived and the first missing.
    pub async fn wait_for_payloads(&self, n: u64) -> std::collections::BTreeMap<u64, usize> {
        let seen = self
            .wait_for(&format!("payloads 0..{n}"), |all| {
                let seen = deliveries(all);
                let missing = first_missing(&seen, n);
                if missing.is_empty() {
                    return Ok(seen);
                }
                Err(format!(
                    "{} of {n} arrived in {} requests; first missing: {}",
                    seen.range(..n).count(),
                    all.len(),
                    list(&missing),
                ))
            })
            .await;
        let strays: Vec<u64> = seen.range(n..).map(|(k, _)| *k).collect();
        assert!(
            strays.is_empty(),
            "payloads outside 0..{n} arrived: {}",
            list(&strays)
        );
        seen
    }

    /// Waits until `n` messages in all reached `function`.
    pub async fn wait_for_messages(&self, function: &str, n: usize) {
        self.wait_for(&format!("{n} messages for {function}"), |all| {
            let got: usize = all
                .iter()
                .filter(|i| i.function == function)
                .map(|i| i.messages)
                .sum();
            if got >= n {
                Ok(())
            } else {
                Err(format!("{got} of {n} arrived; in all {}", summary(all)))
            }
        })
        .await
    }

    /// Waits until `n` requests have arrived in all, before they are answered (a slow answer
    /// is still being prepared).
    pub async fn wait_arrived(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + self.patience();
        loop {
            let waiting = self.notify.notified();
            let arrived = self.inner.lock().expect("lock").arrived;
            if arrived >= n {
                return;
            }
            if tokio::time::timeout_at(deadline, waiting).await.is_err() {
                panic!("only {arrived} of {n} requests reached the fake Lambda");
            }
        }
    }

    /// Waits until `n` refused requests in all.
    pub async fn wait_refused(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + self.patience();
        loop {
            let waiting = self.notify.notified();
            if self.refused() >= n {
                return;
            }
            if tokio::time::timeout_at(deadline, waiting).await.is_err() {
                panic!("fake Lambda refused only {} of {n}", self.refused());
            }
        }
    }
}

/// Items a failure message lists before it says there are more.
const SHOWN: usize = 10;

/// The first payload numbers below `n` not in `seen`: one more than [`SHOWN`], so [`list`]
/// can tell there are more.
fn first_missing(seen: &std::collections::BTreeMap<u64, usize>, n: u64) -> Vec<u64> {
    (0..n)
        .filter(|i| !seen.contains_key(i))
        .take(SHOWN + 1)
        .collect()
}

/// The first [`SHOWN`] of `items`, and "…" when there are more.
fn list(items: &[u64]) -> String {
    let shown: Vec<String> = items.iter().take(SHOWN).map(u64::to_string).collect();
    let more = if items.len() > SHOWN { ", …" } else { "" };
    format!("{}{more}", shown.join(", "))
}

/// What the fake accepted, in one line: requests and messages per function, and the numbered
/// payloads seen (how many, and the first gaps), never the events themselves.
pub fn summary(all: &[Invocation]) -> String {
    if all.is_empty() {
        return "no requests accepted".to_owned();
    }
    let mut per_function = std::collections::BTreeMap::<&str, (usize, usize)>::new();
    for i in all {
        let entry = per_function.entry(&i.function).or_default();
        entry.0 += 1;
        entry.1 += i.messages;
    }
    let functions: Vec<String> = per_function
        .iter()
        .map(|(f, (requests, messages))| format!("{f}: {messages} messages in {requests} requests"))
        .collect();
    let seen = deliveries(all);
    let numbers = match seen.keys().next_back() {
        None => "no numbered payloads".to_owned(),
        Some(&last) => {
            let gaps = first_missing(&seen, last);
            let gaps = if gaps.is_empty() {
                "none missing below it".to_owned()
            } else {
                format!("missing below it: {}", list(&gaps))
            };
            format!("{} numbered payloads up to {last}, {gaps}", seen.len())
        }
    };
    format!("{}; {numbers}", functions.join(", "))
}

/// Messages in an event, without parsing it: every message starts with its id, and the bridge
/// writes no whitespace. Jumps from `{` to `{` with libc's memchr: comparing at every byte
/// took the fake about 50 ms of CPU per 50,000 messages, which the benchmark's bridge run
/// had to share the machine's two cores with.
fn count_message_starts(body: &[u8]) -> usize {
    let mut count = 0;
    let mut at = 0;
    while let Some(rest) = body.get(at..).filter(|r| !r.is_empty()) {
        // SAFETY: memchr reads only the `rest.len()` bytes of `rest`, a live slice.
        let found = unsafe { libc::memchr(rest.as_ptr().cast(), i32::from(b'{'), rest.len()) };
        if found.is_null() {
            break;
        }
        let offset = found as usize - rest.as_ptr() as usize;
        if rest[offset..].starts_with(MESSAGE_START) {
            count += 1;
        }
        at += offset + 1;
    }
    count
}

async fn invoke(
    State(fake): State<FakeLambda>,
    Path(function): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let invocation_type = header("x-amz-invocation-type");
    let arrived = std::time::Instant::now();
    let concurrent = {
        let mut inner = fake.inner.lock().expect("lock");
        inner.in_flight += 1;
        inner.arrived += 1;
        inner.in_flight
    };
    fake.notify.notify_waiters();
    let response = answer(
        &fake,
        function,
        query,
        invocation_type,
        header("authorization"),
        body,
        concurrent,
        arrived,
    )
    .await;
    fake.inner.lock().expect("lock").in_flight -= 1;
    response
}

#[allow(clippy::too_many_arguments)]
async fn answer(
    fake: &FakeLambda,
    function: String,
    query: HashMap<String, String>,
    invocation_type: Option<String>,
    authorization: Option<String>,
    body_bytes: Bytes,
    concurrent: usize,
    at: std::time::Instant,
) -> Response {
    let reply = {
        let mut inner = fake.inner.lock().expect("lock");
        if inner.missing.contains(&function) {
            Reply::Error {
                status: 404,
                code: "ResourceNotFoundException",
                message: "Function not found",
                retry_after: None,
            }
        } else if inner.denied.contains(&function) {
            Reply::Error {
                status: 403,
                code: "AccessDeniedException",
                message: "User: arn:aws:iam::123456789012:user/bridge is not authorized to perform: lambda:InvokeFunction",
                retry_after: None,
            }
        } else {
            inner
                .scripts
                .get_mut(&function)
                .and_then(VecDeque::pop_front)
                .unwrap_or(Reply::Accept)
        }
    };
    if let Reply::Slow(delay) = reply {
        tokio::time::sleep(delay).await;
    }
    if let Reply::FunctionError = reply {
        fake.inner.lock().expect("lock").refused += 1;
        fake.notify.notify_waiters();
        return (
            StatusCode::OK,
            [("x-amz-function-error", "Unhandled")],
            r#"{"errorMessage":"boom","errorType":"ValueError"}"#,
        )
            .into_response();
    }
    if let Reply::Error {
        status,
        code,
        message,
        retry_after,
    } = reply
    {
        fake.inner.lock().expect("lock").refused += 1;
        fake.notify.notify_waiters();
        let mut response = (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            [
                ("x-amzn-errortype", code),
                ("content-type", "application/json"),
            ],
            format!(r#"{{"Type":"User","message":"{message}"}}"#),
        )
            .into_response();
        if let Some(after) = retry_after {
            response
                .headers_mut()
                .insert("retry-after", after.parse().expect("header value"));
        }
        return response;
    }
    let lean = fake.inner.lock().expect("lock").lean;
    let (body, messages) = if lean {
        (serde_json::Value::Null, count_message_starts(&body_bytes))
    } else {
        let body: serde_json::Value =
            serde_json::from_slice(&body_bytes).unwrap_or(serde_json::Value::Null);
        let messages = body["messages"].as_array().map_or(0, Vec::len);
        (body, messages)
    };
    let record_body = body.clone();
    let record = Invocation {
        messages,
        function,
        qualifier: query.get("Qualifier").cloned(),
        invocation_type: invocation_type.clone(),
        authorization,
        body_len: body_bytes.len(),
        body,
        concurrent,
        at,
    };
    fake.inner.lock().expect("lock").invocations.push(record);
    fake.notify.notify_waiters();
    if invocation_type.as_deref() == Some("RequestResponse") {
        // A function's answer: what it was asked, and for which message.
        let first = &record_body["messages"][0];
        let answer = serde_json::json!({"answer": first["payload"], "to": first["id"]});
        (StatusCode::OK, answer.to_string()).into_response()
    } else if invocation_type.as_deref() == Some("DryRun") {
        // Lambda checked the function, the qualifier and the permission, and ran nothing.
        StatusCode::NO_CONTENT.into_response()
    } else {
        StatusCode::ACCEPTED.into_response()
    }
}

/// Times each payload number reached the function (a number, or text starting `n:`).
pub fn deliveries(all: &[Invocation]) -> std::collections::BTreeMap<u64, usize> {
    let mut seen = std::collections::BTreeMap::new();
    for m in all
        .iter()
        .flat_map(|c| c.body["messages"].as_array().into_iter().flatten())
    {
        if let Some(n) = m["payload"].as_u64().or_else(|| {
            m["payload"]
                .as_str()
                .and_then(|s| s.split(':').next()?.parse().ok())
        }) {
            *seen.entry(n).or_default() += 1;
        }
    }
    seen
}
