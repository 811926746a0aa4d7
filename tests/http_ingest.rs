//! HTTP ingest end to end: the real binary with `[http]`, a real mosquitto (the daemon needs a
//! broker) and the fake Invoke API. A POST answered 202 reaches the function with the id the
//! 202 named, even across kill -9; every refusal has its status; TLS works with a self-signed
//! certificate.

mod support;

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::fake_lambda::{FakeLambdaServer, Invocation};
use support::{Daemon, Mosquitto, binary, config, free_port};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP answer, as read off the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Header names in lower case.
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }
}

/// A request with `Connection: close`, so the answer ends when the server closes.
fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    let framed = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    if !framed("transfer-encoding") && !framed("content-length") {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Sends `bytes` and reads the answer to the end.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    bytes: &[u8],
) -> io::Result<Answer> {
    stream.write_all(bytes).await?;
    read_answer(&mut stream).await
}

async fn read_answer<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<Answer> {
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw).await {
        Ok(_) => {}
        // TLS without close_notify: what arrived is the answer.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e),
    }
    parse_answer(&raw)
}

fn parse_answer(raw: &[u8]) -> io::Result<Answer> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("no answer: {text:?}")))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no status line: {text:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Answer {
        status,
        headers,
        body: body.to_owned(),
    })
}

async fn send(port: u16, bytes: &[u8]) -> io::Result<Answer> {
    exchange(TcpStream::connect(("127.0.0.1", port)).await?, bytes).await
}

async fn post(port: u16, path: &str, body: &[u8]) -> io::Result<Answer> {
    send(port, &request("POST", path, &[], body)).await
}

/// A daemon with `[http]` on a free port (`http_extra` goes into the table), ready to serve.
async fn start(broker: &Mosquitto, lambda: &str, http_extra: &str, rest: &str) -> (Daemon, u16) {
    let port = free_port();
    let text = config(
        &broker.url(),
        lambda,
        &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n{http_extra}\n{rest}"),
    );
    let daemon = Daemon::start(&text).await;
    daemon.wait_for_log("HTTP ingest listening").await;
    (daemon, port)
}

const ONE_RULE: &str = r#"
[[rules]]
name = "ingest"
topic = "dev/#"
function = "sink"
[rules.batch]
max_messages = 100
max_wait = "20ms"
"#;

/// Every message of every event: (function, message).
fn messages(all: &[Invocation]) -> Vec<(String, serde_json::Value)> {
    all.iter()
        .flat_map(|i| {
            i.body["messages"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| (i.function.clone(), m.clone()))
        })
        .collect()
}

#[tokio::test]
async fn a_post_reaches_every_matching_function_with_the_id_its_202_named() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let rules = r#"
[[rules]]
name = "all"
topic = "sensors/#"
function = "archive"

[[rules]]
name = "temperature"
topic = "sensors/+/temp"
function = "alerts"
"#;
    let (daemon, port) = start(&broker, &lambda.endpoint(), "", rules).await;

    let answer = post(port, "/topics/sensors/dev%201/temp", br#"{"t": 21.5}"#)
        .await
        .expect("post");
    assert_eq!(answer.status, 202, "{answer:?}");
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let accepted = answer.json();
    assert_eq!(accepted["rules"], serde_json::json!(["all", "temperature"]));
    let id = accepted["id"].as_str().expect("an id").to_owned();

    // A binary payload, to one rule.
    let binary = post(port, "/topics/sensors/dev2/raw", &[0xff, 0x00, 0x01])
        .await
        .expect("post");
    assert_eq!(binary.status, 202, "{binary:?}");
    assert_eq!(binary.json()["rules"], serde_json::json!(["all"]));

    lambda
        .fake
        .wait_until("three messages", |all| messages(all).len() >= 3)
        .await;
    let seen = lambda.fake.with_invocations(messages);
    let first: Vec<_> = seen
        .iter()
        .filter(|(_, m)| m["id"] == id.as_str())
        .collect();
    let functions: Vec<&str> = first.iter().map(|(f, _)| f.as_str()).collect();
    assert!(
        functions.contains(&"archive") && functions.contains(&"alerts"),
        "{seen:?}"
    );
    for (_, m) in &first {
        assert_eq!(m["topic"], "sensors/dev 1/temp");
        assert_eq!(m["payload"], serde_json::json!({"t": 21.5}));
        assert_eq!(m["qos"], 1);
        assert_eq!(m["retain"], false);
    }
    let raw = seen
        .iter()
        .find(|(_, m)| m["id"] == binary.json()["id"])
        .expect("the binary message");
    assert_eq!(raw.1["payload_base64"], "/wAB");

    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("HTTP ingest stopped"), "{log}");
}

#[tokio::test]
async fn refusals_have_their_status_and_store_nothing() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let (daemon, port) = start(&broker, &lambda.endpoint(), "max_body = \"1KiB\"", ONE_RULE).await;

    let no_rule = post(port, "/topics/other/x", b"1").await.expect("post");
    assert_eq!(no_rule.status, 404, "{no_rule:?}");
    assert!(
        no_rule.json()["error"]
            .as_str()
            .expect("error")
            .contains("no rule matches")
    );

    let elsewhere = post(port, "/messages/dev/x", b"1").await.expect("post");
    assert_eq!(elsewhere.status, 404, "{elsewhere:?}");

    let get = send(port, &request("GET", "/topics/dev/x", &[], b""))
        .await
        .expect("get");
    assert_eq!(get.status, 405, "{get:?}");
    assert_eq!(get.header("allow"), Some("POST"));

    for bad in [
        "/topics/dev/+/x",
        "/topics/dev/%23",
        "/topics/",
        "/topics/%24SYS/x",
        "/topics/dev%zz",
    ] {
        let answer = post(port, bad, b"1").await.expect("post");
        assert_eq!(answer.status, 400, "{bad}: {answer:?}");
    }

    // By Content-Length, before any of the body is read.
    let head_only = request("POST", "/topics/dev/x", &[("Content-Length", "1025")], b"");
    let declared = send(port, &head_only).await.expect("post");
    assert_eq!(declared.status, 413, "{declared:?}");

    // Chunked, without a length: found while reading.
    let chunk = "x".repeat(800);
    let body = format!("320\r\n{chunk}\r\n320\r\n{chunk}\r\n0\r\n\r\n");
    let chunked = send(
        port,
        &request(
            "POST",
            "/topics/dev/x",
            &[("Transfer-Encoding", "chunked")],
            body.as_bytes(),
        ),
    )
    .await
    .expect("post");
    assert_eq!(chunked.status, 413, "{chunked:?}");

    // Exactly max_body is fine, chunked too.
    let fits = "y".repeat(1024);
    let answer = post(port, "/topics/dev/fits", fits.as_bytes())
        .await
        .expect("post");
    assert_eq!(answer.status, 202, "{answer:?}");
    lambda.fake.wait_for_messages("sink", 1).await;
    let seen = lambda.fake.with_invocations(messages);
    assert_eq!(seen.len(), 1, "only the one accepted: {seen:?}");
    assert_eq!(seen[0].1["topic"], "dev/fits");
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test]
async fn a_token_file_makes_the_bearer_token_required() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "  s3cret-t0ken \n").expect("write");
    let extra = format!("token_file = \"{}\"", token_file.display());
    let (daemon, port) = start(&broker, &lambda.endpoint(), &extra, ONE_RULE).await;

    let none = post(port, "/topics/dev/x", b"1").await.expect("post");
    assert_eq!(none.status, 401, "{none:?}");
    assert!(
        none.header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer")),
        "{none:?}"
    );
    for wrong in [
        "Bearer s3cret-t0ke",
        "Bearer s3cret-t0ken2",
        "Basic s3cret-t0ken",
    ] {
        let answer = send(
            port,
            &request("POST", "/topics/dev/x", &[("Authorization", wrong)], b"1"),
        )
        .await
        .expect("post");
        assert_eq!(answer.status, 401, "{wrong}: {answer:?}");
        assert!(
            answer
                .header("www-authenticate")
                .is_some_and(|v| v.contains("invalid_token")),
            "{answer:?}"
        );
    }
    let right = send(
        port,
        &request(
            "POST",
            "/topics/dev/x",
            &[("Authorization", "Bearer s3cret-t0ken")],
            b"2",
        ),
    )
    .await
    .expect("post");
    assert_eq!(right.status, 202, "{right:?}");
    lambda.fake.wait_for_messages("sink", 1).await;
    let seen = lambda.fake.with_invocations(messages);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].1["payload"], 2);
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains("s3cret"), "the token is never logged: {log}");
}

#[test]
fn a_token_file_that_cannot_be_read_is_a_configuration_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    let missing = dir.path().join("no-such-token");
    let text = config(
        "mqtt://127.0.0.1:1",
        "http://127.0.0.1:1",
        &format!(
            "[buffer]\ndir = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n{ONE_RULE}",
            dir.path().join("buffer").display(),
            missing.display()
        ),
    );
    std::fs::write(&path, text).expect("write");
    for command in ["check", "run"] {
        let mut cmd = std::process::Command::new(binary());
        cmd.args([command, "--config"]).arg(&path);
        cmd.env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("AWS_ACCESS_KEY_ID", "AKIDTEST")
            .env("AWS_SECRET_ACCESS_KEY", "test-secret");
        let out = cmd.output().expect("run the binary");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{command}: {stderr}");
        assert!(
            stderr.contains("http.token_file") && stderr.contains("no-such-token"),
            "{command}: {stderr}"
        );
    }
}

/// Clients posting their own numbers one after another until the daemon is gone (or, when
/// stopping, answers 503); each returns what was answered 202: payload → id.
fn post_until_gone(
    port: u16,
    clients: usize,
    accepted: Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<BTreeMap<String, String>>> {
    (0..clients)
        .map(|c| {
            let accepted = accepted.clone();
            tokio::spawn(async move {
                let mut ids = BTreeMap::new();
                for i in 0.. {
                    let payload = (c * 1_000_000 + i).to_string();
                    match post(port, "/topics/dev/load", payload.as_bytes()).await {
                        Ok(answer) if answer.status == 202 => {
                            let id = answer.json()["id"].as_str().expect("id").to_owned();
                            ids.insert(payload, id);
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(answer) if answer.status == 503 => break,
                        Ok(answer) => panic!("unexpected answer: {answer:?}"),
                        // The daemon is gone: connection refused or reset.
                        Err(_) => break,
                    }
                }
                ids
            })
        })
        .collect()
}

/// Waits until every promised payload reached the function with its promised id.
async fn wait_promised_delivered(lambda: &FakeLambdaServer, promised: &BTreeMap<String, String>) {
    let delivered = |all: &[Invocation]| -> BTreeMap<String, String> {
        messages(all)
            .into_iter()
            .filter_map(|(_, m)| {
                Some((
                    m["payload"].as_u64()?.to_string(),
                    m["id"].as_str()?.to_owned(),
                ))
            })
            .collect()
    };
    lambda
        .fake
        .wait_until(&format!("{} promised messages", promised.len()), |all| {
            let seen = delivered(all);
            promised.keys().all(|payload| seen.contains_key(payload))
        })
        .await;
    let seen = lambda.fake.with_invocations(delivered);
    for (payload, id) in promised {
        assert_eq!(seen.get(payload), Some(id), "payload {payload}");
    }
}

#[tokio::test]
async fn every_post_answered_202_is_delivered_after_a_kill_9_during_many_concurrent_posts() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let (daemon, port) = start(&broker, &lambda.endpoint(), "", ONE_RULE).await;
    let accepted = Arc::new(AtomicUsize::new(0));
    let clients = post_until_gone(port, 16, accepted.clone());
    while accepted.load(Ordering::Relaxed) < 500 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let daemon = daemon.kill().await;
    let mut promised = BTreeMap::new();
    for client in clients {
        promised.extend(client.await.expect("client"));
    }
    assert!(promised.len() >= 500, "{}", promised.len());

    let daemon = daemon.restart().await;
    daemon.wait_for_log("HTTP ingest listening").await;
    wait_promised_delivered(&lambda, &promised).await;
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test]
async fn a_sigterm_during_many_concurrent_posts_answers_the_requests_in_flight_and_keeps_each_202()
{
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let (mut daemon, port) = start(&broker, &lambda.endpoint(), "", ONE_RULE).await;
    let accepted = Arc::new(AtomicUsize::new(0));
    let clients = post_until_gone(port, 16, accepted.clone());
    while accepted.load(Ordering::Relaxed) < 300 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (code, log) = daemon.stop().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("HTTP ingest stopped"), "{log}");
    let mut promised = BTreeMap::new();
    for client in clients {
        promised.extend(client.await.expect("client"));
    }
    // What the stop left undelivered goes out after a restart.
    let daemon = daemon.restart().await;
    daemon.wait_for_log("HTTP ingest listening").await;
    wait_promised_delivered(&lambda, &promised).await;
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test]
async fn a_slow_body_is_cut_off_with_408_and_a_slow_head_is_hung_up_on() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let (daemon, port) = start(
        &broker,
        &lambda.endpoint(),
        "read_timeout = \"1s\"",
        ONE_RULE,
    )
    .await;

    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stream
        .write_all(
            b"POST /topics/dev/slow HTTP/1.1\r\nHost: g\r\nContent-Length: 100\r\n\r\n0123456789",
        )
        .await
        .expect("send");
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut stream))
        .await
        .expect("answered in time")
        .expect("an answer");
    assert_eq!(answer.status, 408, "{answer:?}");
    assert!(started.elapsed() >= Duration::from_millis(900));

    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stream
        .write_all(b"POST /topics/dev/slow HTTP/1.1\r\nHost: g\r\n")
        .await
        .expect("send");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .expect("closed in time");
    assert!(
        closed.is_err() || rest.is_empty(),
        "no answer to half a head: {rest:?}"
    );

    assert!(lambda.fake.invocations().is_empty());
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test]
async fn a_full_buffer_with_when_full_block_is_answered_503_with_retry_after() {
    let broker = Mosquitto::start().await;
    // Lambda is down: nothing leaves the buffer.
    let lambda = format!("http://127.0.0.1:{}", free_port());
    let buffer = tempfile::tempdir().expect("tempdir");
    let rest = format!(
        "[buffer]\ndir = \"{}\"\nmax_size = \"64KiB\"\nwhen_full = \"block\"\n{ONE_RULE}",
        buffer.path().display()
    );
    let (daemon, port) = start(&broker, &lambda, "", &rest).await;
    let payload = "z".repeat(40 * 1024);
    let first = post(port, "/topics/dev/big", payload.as_bytes())
        .await
        .expect("post");
    assert_eq!(first.status, 202, "{first:?}");
    let started = std::time::Instant::now();
    let second = post(port, "/topics/dev/big", payload.as_bytes())
        .await
        .expect("post");
    assert_eq!(second.status, 503, "{second:?}");
    assert_eq!(second.header("retry-after"), Some("5"));
    assert!(
        second.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("when_full")),
        "{second:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "held for the store wait"
    );
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test]
async fn tls_with_a_self_signed_certificate() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let (cert_file, key_file) = (dir.path().join("http.pem"), dir.path().join("http.key"));
    std::fs::write(&cert_file, key.cert.pem()).expect("write");
    std::fs::write(&key_file, key.signing_key.serialize_pem()).expect("write");
    let extra = format!(
        "cert_file = \"{}\"\nkey_file = \"{}\"",
        cert_file.display(),
        key_file.display()
    );
    let (daemon, port) = start(&broker, &lambda.endpoint(), &extra, ONE_RULE).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(key.cert.der().clone()).expect("root");
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let tls = connector.connect(name, tcp).await.expect("handshake");
    let answer = exchange(
        tls,
        &request("POST", "/topics/dev/secure", &[], b"\"over tls\""),
    )
    .await
    .expect("post");
    assert_eq!(answer.status, 202, "{answer:?}");
    lambda.fake.wait_for_messages("sink", 1).await;
    let seen = lambda.fake.with_invocations(messages);
    assert_eq!(seen[0].1["payload"], "over tls");
    assert_eq!(seen[0].1["id"], answer.json()["id"]);

    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let plain = post(port, "/topics/dev/plain", b"1").await;
    assert!(plain.is_err(), "{plain:?}");
    assert_eq!(lambda.fake.with_invocations(messages).len(), 1);
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test]
async fn a_post_an_sql_rule_does_not_keep_is_answered_202_naming_the_rule_and_never_stored() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let rules = r#"
[[rules]]
name = "hot"
function = "alarm"
sql = "SELECT t, topic(2) AS device FROM 'sensors/+/temp' WHERE t > 50"
"#;
    let (daemon, port) = start(&broker, &lambda.endpoint(), "", rules).await;
    let cold = post(port, "/topics/sensors/dev1/temp", br#"{"t": 20}"#)
        .await
        .expect("post");
    assert_eq!(cold.status, 202, "{cold:?}");
    assert_eq!(cold.json()["rules"], serde_json::json!([]));
    assert_eq!(cold.json()["filtered"], serde_json::json!(["hot"]));
    let hot = post(port, "/topics/sensors/dev2/temp", br#"{"t": 60}"#)
        .await
        .expect("post");
    assert_eq!(hot.json()["rules"], serde_json::json!(["hot"]), "{hot:?}");
    assert!(hot.json().get("filtered").is_none());
    let elsewhere = post(port, "/topics/other", b"{}").await.expect("post");
    assert_eq!(elsewhere.status, 404, "no rule's filter matches");
    lambda
        .fake
        .wait_until("the hot message", |all| !messages(all).is_empty())
        .await;
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    let seen = lambda.fake.with_invocations(messages);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].1["payload"],
        serde_json::json!({"t": 60, "device": "dev2"})
    );
}
