//! AWS: `check --aws` against the fake Invoke API, `policy`'s exact output, what `run` says
//! about credentials and failures (one line each, no Debug structure), and the AWS IoT
//! credentials provider against a local mutual-TLS stand-in.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::ProvideCredentials;
use mqtt_lambda_bridge::core::config::{AwsConfig, InvocationType, IotConfig};
use mqtt_lambda_bridge::delivery::invoker::iot::IotCredentialsProvider;
use mqtt_lambda_bridge::delivery::invoker::{Invoke, InvokeRequest, LambdaInvoker, sdk_config};
use support::fake_lambda::FakeLambdaServer;
use support::{Daemon, Mosquitto, Publisher, binary, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The binary with a clean AWS environment: static keys only when `keys`, no profile files, no
/// instance metadata.
fn bridge(home: &Path, keys: bool) -> Command {
    let mut cmd = Command::new(binary());
    cmd.env_clear()
        .env("HOME", home)
        .env("AWS_CONFIG_FILE", home.join("aws-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", home.join("aws-credentials"))
        .env("AWS_EC2_METADATA_DISABLED", "true");
    if keys {
        cmd.env("AWS_ACCESS_KEY_ID", "AKIDCHECK")
            .env("AWS_SECRET_ACCESS_KEY", "test-secret");
    }
    cmd
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A config with `rules` (TOML `[[rules]]` tables) against `endpoint`, its buffer in `dir`.
fn write_config(dir: &Path, endpoint: &str, extra_aws: &str, rules: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\n\
             [aws]\nregion = \"eu-west-1\"\nendpoint_url = \"{endpoint}\"\nconnect_timeout = \"1s\"\noperation_timeout = \"3s\"\n{extra_aws}\n\
             [buffer]\ndir = \"{}\"\n{rules}",
            dir.join("buffer").display()
        ),
    )
    .expect("write config");
    path
}

const THREE_RULES: &str = "[[rules]]\nname = \"temperature\"\ntopic = \"t/#\"\nfunction = \"ingest\"\nqualifier = \"live\"\n\
     [[rules]]\nname = \"gone\"\ntopic = \"g/#\"\nfunction = \"missing-fn\"\n\
     [[rules]]\nname = \"secret\"\ntopic = \"s/#\"\nfunction = \"arn:aws:lambda:eu-west-1:123456789012:function:secret\"\n";

async fn check_aws(path: &Path, keys: bool) -> Output {
    let mut cmd = bridge(path.parent().expect("dir"), keys);
    cmd.args(["check", "--aws", "--config"]).arg(path);
    tokio::task::spawn_blocking(move || cmd.output().expect("run check"))
        .await
        .expect("join")
}

#[tokio::test]
async fn check_aws_dry_runs_every_function_and_exits_0_when_all_are_ok() {
    let lambda = FakeLambdaServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), &lambda.endpoint(), "", THREE_RULES);
    let out = check_aws(&path, true).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("credentials: ok: AWS credentials found"),
        "{stdout}"
    );
    assert!(
        stdout.contains("temperature: ok: ingest:live\n"),
        "{stdout}"
    );
    assert!(stdout.contains("gone: ok: missing-fn\n"), "{stdout}");
    let calls = lambda.fake.invocations();
    assert_eq!(calls.len(), 3, "one DryRun per rule: {calls:#?}");
    assert!(
        calls
            .iter()
            .all(|c| c.invocation_type.as_deref() == Some("DryRun")),
        "{calls:#?}"
    );
    let ingest = lambda.fake.accepted_for("ingest");
    assert_eq!(ingest[0].qualifier.as_deref(), Some("live"));
    assert!(
        ingest[0]
            .authorization
            .as_deref()
            .is_some_and(|a| a.contains("Credential=AKIDCHECK/")),
        "signed with the resolved key: {:?}",
        ingest[0].authorization
    );
}

#[tokio::test]
async fn check_aws_says_not_found_and_access_denied_per_rule_and_exits_77() {
    let lambda = FakeLambdaServer::start().await;
    lambda.fake.missing("missing-fn");
    lambda
        .fake
        .denied("arn:aws:lambda:eu-west-1:123456789012:function:secret");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), &lambda.endpoint(), "", THREE_RULES);
    let out = check_aws(&path, true).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(77), "{stdout}{}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 5, "valid, credentials, one per rule: {stdout}");
    assert_eq!(lines[2], "temperature: ok: ingest:live");
    assert_eq!(
        lines[3],
        "gone: not found: missing-fn (ResourceNotFoundException: Function not found)"
    );
    assert!(
        lines[4].starts_with(
            "secret: access denied: arn:aws:lambda:eu-west-1:123456789012:function:secret (AccessDeniedException: User: "
        ),
        "{}",
        lines[4]
    );
}

#[tokio::test]
async fn check_aws_exits_69_when_lambda_cannot_be_reached() {
    let dir = tempfile::tempdir().expect("tempdir");
    let closed = format!("http://127.0.0.1:{}", free_port());
    let path = write_config(dir.path(), &closed, "", THREE_RULES);
    let out = check_aws(&path, true).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(69), "{stdout}{}", text(&out.stderr));
    let line = stdout
        .lines()
        .find(|l| l.starts_with("temperature: "))
        .expect("a line for the rule");
    assert!(
        line.starts_with(
            "temperature: unreachable: ingest:live (ConnectionFailed: cannot reach Lambda: "
        ),
        "{line}"
    );
    assert!(!line.contains('{'), "no Debug structure: {line}");
}

#[tokio::test]
async fn check_aws_without_credentials_says_where_it_looked_and_exits_77() {
    let lambda = FakeLambdaServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), &lambda.endpoint(), "", THREE_RULES);
    let out = check_aws(&path, false).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(77), "{stdout}{}", text(&out.stderr));
    let line = stdout
        .lines()
        .find(|l| l.starts_with("credentials: "))
        .expect("a credentials line");
    assert!(
        line.starts_with(
            "credentials: missing: no AWS credentials: looked in the environment (AWS_ACCESS_KEY_ID"
        ),
        "{line}"
    );
    assert!(
        line.contains("disabled by AWS_EC2_METADATA_DISABLED"),
        "{line}"
    );
    assert!(line.contains("[aws.iot]"), "{line}");
    assert!(
        lambda.fake.invocations().is_empty(),
        "nothing invoked without credentials"
    );
}

#[tokio::test]
async fn check_aws_with_a_bad_config_exits_78_before_asking_aws() {
    let lambda = FakeLambdaServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        dir.path(),
        &lambda.endpoint(),
        "",
        "[[rules]]\nname = \"a\"\ntopic = \"a/#/b\"\nfunction = \"f\"\n",
    );
    let out = check_aws(&path, true).await;
    assert_eq!(out.status.code(), Some(78));
    assert!(text(&out.stderr).contains("rules[0].topic"));
    assert!(lambda.fake.invocations().is_empty());
}

fn policy(path: &Path, args: &[&str]) -> Output {
    bridge(path.parent().expect("dir"), false)
        .args(["policy", "--config"])
        .arg(path)
        .args(args)
        .output()
        .expect("run policy")
}

#[test]
fn policy_allows_exactly_the_configured_arns_with_their_qualifiers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        dir.path(),
        "http://127.0.0.1:1",
        "",
        &format!(
            "{THREE_RULES}[[rules]]\nname = \"again\"\ntopic = \"a/#\"\nfunction = \"ingest\"\nqualifier = \"live\"\n\
             [[rules]]\nname = \"partial\"\ntopic = \"p/#\"\nfunction = \"210987654321:function:partial:7\"\n"
        ),
    );
    let out = policy(&path, &["--account-id", "123456789012"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        r#"{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Sid": "InvokeConfiguredFunctions",
      "Effect": "Allow",
      "Action": "lambda:InvokeFunction",
      "Resource": [
        "arn:aws:lambda:eu-west-1:123456789012:function:ingest:live",
        "arn:aws:lambda:eu-west-1:123456789012:function:missing-fn",
        "arn:aws:lambda:eu-west-1:123456789012:function:secret",
        "arn:aws:lambda:eu-west-1:210987654321:function:partial:7"
      ]
    }
  ]
}
"#
    );
}

#[test]
fn policy_without_the_account_id_says_which_rules_need_it_and_writes_no_wildcard() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), "http://127.0.0.1:1", "", THREE_RULES);
    let out = policy(&path, &[]);
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(text(&out.stdout), "", "no policy at all");
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "one line per rule given by name: {stderr}");
    assert_eq!(
        lines[0],
        format!(
            "{}: rules[0].function \"ingest\": a function name needs the account id: pass --account-id 123456789012, or write the full ARN",
            path.display()
        )
    );
    assert!(
        lines[1].contains("rules[1].function \"missing-fn\""),
        "{stderr}"
    );
}

/// A config for the daemon: rule `t` on `t/#` to `fn-t`, Lambda at `endpoint`.
fn daemon_config(broker: u16, endpoint: &str, extra_aws: &str) -> String {
    format!(
        "[mqtt]\nurl = \"mqtt://127.0.0.1:{broker}\"\nclient_id = \"aws-test\"\n\
         [aws]\nregion = \"eu-west-1\"\nendpoint_url = \"{endpoint}\"\nconnect_timeout = \"1s\"\n{extra_aws}\n\
         [[rules]]\nname = \"t\"\ntopic = \"t/#\"\nfunction = \"fn-t\"\n"
    )
}

/// The failure lines the daemon logged for `code`, each checked to be one line without Debug
/// structure.
fn assert_failure_lines_are_plain(daemon: &Daemon, code: &str) {
    let log = daemon.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("code={code}")))
        .collect();
    assert!(!lines.is_empty(), "no line with code={code}:\n{log}");
    for line in lines {
        assert!(line.contains("invocation failed"), "{line}");
        assert!(
            !line.contains('{')
                && !line.contains("CredentialsNotLoaded(")
                && !line.contains("ConnectorError"),
            "a Debug dump: {line}"
        );
        assert!(line.len() < 600, "too long for a log line: {line}");
    }
    // Nothing the daemon logged continues on a line of its own.
    assert!(
        log.lines()
            .all(|l| !l.starts_with(' ') && !l.starts_with('\t')),
        "a multi-line event:\n{log}"
    );
}

#[tokio::test]
async fn a_dispatch_failure_is_logged_as_one_plain_line() {
    let broker = Mosquitto::start().await;
    let closed = format!("http://127.0.0.1:{}", free_port());
    let daemon = Daemon::start(&daemon_config(broker.port, &closed, "")).await;
    daemon.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    publisher.publish("t/1", 1, "21.5").await;
    daemon.wait_for_log("code=ConnectionFailed").await;
    assert_failure_lines_are_plain(&daemon, "ConnectionFailed");
    assert!(daemon.log_text().contains("cannot reach Lambda: "));
    daemon.terminate().await;
}

#[test]
fn run_without_any_credential_source_exits_78_saying_where_it_looked() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Something listens where the broker would be: a connection attempt would be seen.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        format!(
            "{}[buffer]\ndir = \"{}\"\n",
            daemon_config(port, "http://127.0.0.1:1", ""),
            dir.path().join("buffer").display()
        ),
    )
    .expect("write config");
    let out = bridge(dir.path(), false)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("no AWS credentials: looked in the environment")),
        "{stderr}"
    );
    assert!(!stderr.contains('{'), "{stderr}");
    assert!(listener.accept().is_err(), "no connection was attempted");
}

// ---- AWS IoT credentials provider -------------------------------------------------------

/// A CA, a server certificate for `localhost` and a device certificate, as PEM files.
struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test CA");
        let key = rcgen::KeyPair::generate().expect("key");
        let ca = rcgen::CertifiedIssuer::self_signed(params, key).expect("CA");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write");
        let pki = Pki { dir, ca };
        pki.issue("server", vec!["localhost".into()]);
        pki.issue("device", Vec::new());
        pki
    }

    /// Writes `<name>.pem` and `<name>.key`, signed by this CA.
    fn issue(&self, name: &str, names: Vec<String>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(names).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.signed_by(&key, &self.ca).expect("sign");
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).expect("write");
        std::fs::write(self.path(&format!("{name}.key")), key.serialize_pem()).expect("write");
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn iot_config(&self, port: u16, device: &str) -> IotConfig {
        IotConfig {
            credentials_endpoint: format!("localhost:{port}"),
            role_alias: "bridge-role".into(),
            thing_name: "gw-01".into(),
            cert_file: self.path(&format!("{device}.pem")),
            key_file: self.path(&format!("{device}.key")),
            ca_file: Some(self.path("ca.pem")),
        }
    }
}

/// What the stand-in saw of one request: its path and its `x-amzn-iot-thingname`.
type SeenRequest = (String, Option<String>);

/// The IoT credentials endpoint stand-in: requires a client certificate from the test CA,
/// records each request's path and thing name, and hands out numbered credentials that expire
/// after `lifetime`.
struct IotStandIn {
    port: u16,
    requests: Arc<Mutex<Vec<SeenRequest>>>,
    fetched: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for IotStandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl IotStandIn {
    async fn start(pki: &Pki, lifetime: Duration) -> IotStandIn {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(pki.path("ca.pem")).expect("ca"))
            .expect("add ca");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .expect("verifier");
        let chain = vec![CertificateDer::from_pem_file(pki.path("server.pem")).expect("cert")];
        let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).expect("key");
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let fetched = Arc::new(AtomicUsize::new(0));
        let (requests_in, fetched_in) = (requests.clone(), fetched.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let requests = requests_in.clone();
                let fetched = fetched_in.clone();
                tokio::spawn(async move {
                    // A refused client certificate ends here, with an alert to the client.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let path = head
                        .split_whitespace()
                        .nth(1)
                        .unwrap_or_default()
                        .to_owned();
                    let thing = head.lines().find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("x-amzn-iot-thingname:")
                            .map(|v| v.trim().to_owned())
                    });
                    requests.lock().expect("lock").push((path, thing));
                    let n = fetched.fetch_add(1, Ordering::SeqCst) + 1;
                    let expiration =
                        humantime::format_rfc3339_seconds(SystemTime::now() + lifetime);
                    let body = format!(
                        r#"{{"credentials":{{"accessKeyId":"ASIAIOT{n}","secretAccessKey":"secret{n}","sessionToken":"token{n}","expiration":"{expiration}"}}}}"#
                    );
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(response.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        IotStandIn {
            port,
            requests,
            fetched,
            task,
        }
    }

    fn fetched(&self) -> usize {
        self.fetched.load(Ordering::SeqCst)
    }
}

fn invoke_request() -> InvokeRequest {
    InvokeRequest {
        function: "fn-iot".into(),
        qualifier: None,
        invocation: InvocationType::Event,
        payload: br#"{"rule":"t","messages":[]}"#.to_vec(),
    }
}

async fn iot_invoker(pki: &Pki, port: u16, lambda: &FakeLambdaServer) -> LambdaInvoker {
    let aws = AwsConfig {
        region: Some("eu-west-1".into()),
        endpoint_url: Some(lambda.endpoint()),
        iot: Some(pki.iot_config(port, "device")),
        ..AwsConfig::default()
    };
    LambdaInvoker::from_sdk_config(&sdk_config(&aws).await.expect("sdk config"))
}

fn access_keys_seen(lambda: &FakeLambdaServer) -> Vec<String> {
    lambda
        .fake
        .accepted_for("fn-iot")
        .iter()
        .filter_map(|i| i.authorization.clone())
        .filter_map(|a| {
            a.split("Credential=")
                .nth(1)
                .and_then(|rest| rest.split('/').next())
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn iot_credentials_are_fetched_with_the_device_certificate_and_sign_the_invocation() {
    let pki = Pki::new();
    let stand_in = IotStandIn::start(&pki, Duration::from_secs(3600)).await;
    let lambda = FakeLambdaServer::start().await;
    let invoker = iot_invoker(&pki, stand_in.port, &lambda).await;
    invoker
        .invoke(invoke_request())
        .await
        .expect("first invocation");
    invoker
        .invoke(invoke_request())
        .await
        .expect("second invocation");
    assert_eq!(
        stand_in.requests.lock().expect("lock").clone(),
        vec![(
            "/role-aliases/bridge-role/credentials".to_owned(),
            Some("gw-01".to_owned())
        )],
        "one fetch, with the alias in the path and the thing name in the header"
    );
    assert_eq!(access_keys_seen(&lambda), vec!["ASIAIOT1", "ASIAIOT1"]);
    let sent = lambda.fake.accepted_for("fn-iot");
    assert!(
        sent.iter().all(|i| i.authorization.is_some()),
        "every invocation is signed"
    );
}

#[tokio::test]
async fn iot_credentials_close_to_expiry_are_fetched_again_before_they_lapse() {
    let pki = Pki::new();
    // Still valid for two minutes: inside the last 2.5 to 5 minutes, when they are renewed.
    let stand_in = IotStandIn::start(&pki, Duration::from_secs(2 * 60)).await;
    let lambda = FakeLambdaServer::start().await;
    let invoker = iot_invoker(&pki, stand_in.port, &lambda).await;
    invoker
        .invoke(invoke_request())
        .await
        .expect("first invocation");
    invoker
        .invoke(invoke_request())
        .await
        .expect("second invocation");
    assert_eq!(stand_in.fetched(), 2, "renewed before expiry");
    assert_eq!(access_keys_seen(&lambda), vec!["ASIAIOT1", "ASIAIOT2"]);
}

#[tokio::test]
async fn a_device_certificate_the_endpoint_does_not_trust_is_one_clear_line() {
    let pki = Pki::new();
    let stand_in = IotStandIn::start(&pki, Duration::from_secs(3600)).await;
    // A device certificate from another CA.
    let other = Pki::new();
    let mut config = pki.iot_config(stand_in.port, "device");
    config.cert_file = other.path("device.pem");
    config.key_file = other.path("device.key");
    let provider = IotCredentialsProvider::new(&config).expect("provider");
    let err = provider.provide_credentials().await.expect_err("refused");
    let line = mqtt_lambda_bridge::delivery::invoker::one_line_chain(&err);
    assert!(
        line.contains("refused the device certificate") && line.contains("aws.iot.cert_file"),
        "{line}"
    );
    assert!(!line.contains('\n') && !line.contains('{'), "{line}");
    assert_eq!(stand_in.fetched(), 0);
}

#[tokio::test]
async fn an_unreachable_iot_endpoint_lets_the_daemon_start_and_each_failure_is_one_line() {
    let pki = Pki::new();
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let iot = format!(
        "[aws.iot]\ncredentials_endpoint = \"localhost:{}\"\nrole_alias = \"bridge-role\"\nthing_name = \"gw-01\"\n\
         cert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\n",
        free_port(),
        pki.path("device.pem").display(),
        pki.path("device.key").display(),
        pki.path("ca.pem").display()
    );
    let daemon = Daemon::start(&daemon_config(broker.port, &lambda.endpoint(), &iot)).await;
    daemon.wait_for_log("no AWS credentials yet").await;
    daemon.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    publisher.publish("t/1", 1, "21.5").await;
    daemon.wait_buffered(1).await;
    daemon.wait_for_log("code=CredentialsUnavailable").await;
    assert_failure_lines_are_plain(&daemon, "CredentialsUnavailable");
    assert!(
        daemon
            .log_text()
            .contains("AWS IoT credentials endpoint localhost:"),
        "{}",
        daemon.log_text()
    );
    assert!(lambda.fake.invocations().is_empty());
    daemon.terminate().await;
}

#[test]
fn check_reads_the_iot_files_and_names_each_bad_key_with_its_line() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    // The CA's certificate where the key belongs, and no key at all where the CA belongs.
    let iot = format!(
        "[aws.iot]\ncredentials_endpoint = \"https://localhost\"\nrole_alias = \"bridge role\"\nthing_name = \"gw-01\"\n\
         cert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\n",
        pki.path("device.pem").display(),
        pki.path("ca.pem").display(),
        dir.path().join("missing.pem").display()
    );
    let path = write_config(dir.path(), "http://127.0.0.1:1", &iot, THREE_RULES);
    let out = bridge(dir.path(), true)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run check");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    let file = path.display().to_string();
    for (line, key, words) in [
        (9, "aws.iot.credentials_endpoint", "write the host alone"),
        (10, "aws.iot.role_alias", "contains ' '"),
    ] {
        let expected = format!("{file}:{line}: {key}: ");
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&expected) && l.contains(words)),
            "{expected}…{words}\n{stderr}"
        );
    }
    // Files are read once the keys are valid.
    let fixed = std::fs::read_to_string(&path)
        .expect("read")
        .replace("https://localhost", "localhost")
        .replace("bridge role", "bridge-role");
    std::fs::write(&path, fixed).expect("write");
    let out = bridge(dir.path(), true)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run check");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with(&format!("{file}:14: aws.iot.ca_file: cannot read "))),
        "{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with(&format!("{file}:13: aws.iot.key_file: "))
                && l.contains("no private key")),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 2, "{stderr}");
}

#[tokio::test]
async fn check_aws_against_ministack_finds_the_deployed_function_and_not_the_other() {
    let ministack = support::MiniStack::start().await;
    let record = ministack.deploy_recorder("record-check").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        dir.path(),
        &ministack.endpoint(),
        "",
        "[[rules]]\nname = \"here\"\ntopic = \"h/#\"\nfunction = \"record-check\"\n\
         [[rules]]\nname = \"absent\"\ntopic = \"a/#\"\nfunction = \"no-such-function\"\n",
    );
    // demo/deploy_function.py deploys into us-east-1.
    let text_in = std::fs::read_to_string(&path).expect("read");
    std::fs::write(&path, text_in.replace("eu-west-1", "us-east-1")).expect("write");
    let out = check_aws(&path, true).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(77), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("\nhere: ok: record-check\n"), "{stdout}");
    assert!(
        stdout.contains("\nabsent: not found: no-such-function (ResourceNotFoundException"),
        "{stdout}"
    );
    assert!(
        std::fs::read_to_string(&record)
            .unwrap_or_default()
            .is_empty(),
        "a DryRun runs nothing"
    );
}

#[tokio::test]
async fn a_credentials_source_that_fails_now_is_one_line_and_exit_69_without_the_sdk_dump() {
    let lambda = FakeLambdaServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), &lambda.endpoint(), "", THREE_RULES);
    // A container credentials endpoint (ECS, Greengrass TES) that is down.
    let uri = format!("http://127.0.0.1:{}/credentials", free_port());
    let mut cmd = bridge(dir.path(), false);
    cmd.env("AWS_CONTAINER_CREDENTIALS_FULL_URI", uri)
        .args(["check", "--aws", "--config"])
        .arg(&path);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run check"))
        .await
        .expect("join");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(69), "{stdout}{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("credentials: "))
        .expect("a credentials line");
    assert!(
        line.starts_with("credentials: unreachable: no AWS credentials yet: "),
        "{line}"
    );
    assert!(!line.contains('{'), "{line}");
    assert!(
        !stderr.contains('{'),
        "the SDK's Debug dump leaked: {stderr}"
    );
    assert!(lambda.fake.invocations().is_empty());
}
