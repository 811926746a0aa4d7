//! The AWS IoT credentials provider as an SDK credentials provider: the device proves who it is
//! with its X.509 certificate (mutual TLS) and receives temporary credentials for the IAM role
//! behind a role alias, the way Greengrass devices do. No long-lived key is stored on the device.
//!
//! The exchange (AWS IoT Core developer guide, "Authorizing direct calls to AWS services"):
//!
//! ```text
//! GET https://<credentials_endpoint>/role-aliases/<role_alias>/credentials
//! x-amzn-iot-thingname: <thing_name>          (TLS client certificate: cert_file + key_file)
//!
//! 200 {"credentials": {"accessKeyId": "ASIA…", "secretAccessKey": "…",
//!                      "sessionToken": "…", "expiration": "2026-11-27T10:15:30Z"}}
//! 4xx/5xx {"message": "…"}   (403: the certificate is unknown, inactive or not allowed the alias)
//! ```
//!
//! Invariants: one fetch is one HTTPS connection (a fetch happens about once an hour, so no pool
//! is kept); each fetch is bounded by [`FETCH_TIMEOUT`]; every failure is one line that names the
//! endpoint and says what to check. Caching and refreshing before expiry are the SDK identity
//! cache's job (`invoker::sdk_config` sets [`REFRESH_BEFORE_EXPIRY`]).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{self, ProvideCredentials};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;

use crate::core::config::IotConfig;

/// The longest one fetch may take, connection and TLS handshake included. The SDK's identity
/// cache is told to wait a little longer (`LOAD_TIMEOUT`), so our own message is the one seen.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the SDK's identity cache may wait for a fetch before giving up on it.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(12);
/// Credentials are fetched anew at most this long and at least half this long before they
/// expire (the SDK's identity cache picks the moment at random, so a fleet of gateways does not
/// ask all at once): an invocation never signs with credentials about to lapse, and a slow LTE
/// link has minutes, not seconds, to fetch the next ones.
pub const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(5 * 60);
/// HTTPS port when the endpoint names none.
const HTTPS_PORT: u16 = 443;
/// The answer is a few hundred bytes; more is not the credentials provider.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// How much of an error body goes into the message.
const MAX_ERROR_TEXT: usize = 200;
/// The header that names the thing the certificate is attached to.
const THING_NAME_HEADER: &str = "x-amzn-iot-thingname";
/// The name the SDK shows for credentials from here.
pub const PROVIDER_NAME: &str = "IotCredentialsProvider";

/// Why `[aws.iot]` cannot be used, or why a fetch failed; each is one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IotError {
    /// A file named in `[aws.iot]` is unusable.
    #[error("{key}: {message}")]
    File {
        /// `aws.iot.cert_file` and so on.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// No connection to the endpoint (DNS, TCP, timeout).
    #[error("AWS IoT credentials endpoint {endpoint} unreachable: {reason}")]
    Unreachable {
        /// `host:port`.
        endpoint: String,
        /// What happened.
        reason: String,
    },
    /// The TLS handshake failed: the endpoint's certificate is not trusted, or ours refused.
    #[error("AWS IoT credentials endpoint {endpoint}: TLS failed: {reason}")]
    Tls {
        /// `host:port`.
        endpoint: String,
        /// What happened, and what to check.
        reason: String,
    },
    /// The endpoint answered with an error status.
    #[error("AWS IoT credentials endpoint {endpoint} answered HTTP {status}: {message}")]
    Refused {
        /// `host:port`.
        endpoint: String,
        /// The HTTP status.
        status: u16,
        /// Its `message`, or the start of its body, and what to check.
        message: String,
    },
    /// The answer was not the credentials document.
    #[error("AWS IoT credentials endpoint {endpoint}: unexpected answer: {reason}")]
    BadAnswer {
        /// `host:port`.
        endpoint: String,
        /// What was wrong with it.
        reason: String,
    },
}

/// Fetches temporary credentials from the AWS IoT credentials provider.
#[derive(Clone)]
pub struct IotCredentialsProvider {
    /// TLS with the device certificate as client certificate.
    connector: tokio_rustls::TlsConnector,
    /// The endpoint's host, for TCP and SNI.
    host: String,
    /// The endpoint's port.
    port: u16,
    /// The name the endpoint's certificate must carry.
    server_name: ServerName<'static>,
    /// `/role-aliases/<alias>/credentials`.
    path: String,
    /// Sent as `x-amzn-iot-thingname`.
    thing_name: String,
}

impl std::fmt::Debug for IotCredentialsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IotCredentialsProvider")
            .field("endpoint", &self.endpoint())
            .field("path", &self.path)
            .field("thing_name", &self.thing_name)
            .finish()
    }
}

/// The document the endpoint answers with.
#[derive(Deserialize)]
struct Answer {
    credentials: AnswerCredentials,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnswerCredentials {
    access_key_id: String,
    secret_access_key: String,
    session_token: String,
    expiration: String,
}

/// An error document: `{"message": "..."}`.
#[derive(Deserialize)]
struct ErrorAnswer {
    message: Option<String>,
}

impl IotCredentialsProvider {
    /// Reads the certificate, key and CA files and builds the TLS configuration.
    pub fn new(config: &IotConfig) -> Result<Self, IotError> {
        let (host, port) = match config.credentials_endpoint.rsplit_once(':') {
            Some((host, port)) => (
                host.to_owned(),
                port.parse().map_err(|_| IotError::File {
                    key: "aws.iot.credentials_endpoint",
                    message: format!("{port:?} is not a port"),
                })?,
            ),
            None => (config.credentials_endpoint.clone(), HTTPS_PORT),
        };
        let server_name = ServerName::try_from(host.clone()).map_err(|e| IotError::File {
            key: "aws.iot.credentials_endpoint",
            message: format!("{host:?}: {e}"),
        })?;
        let tls = tls_config(config)?;
        Ok(IotCredentialsProvider {
            connector: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            host,
            port,
            server_name,
            path: format!("/role-aliases/{}/credentials", config.role_alias),
            thing_name: config.thing_name.clone(),
        })
    }

    /// `host:port`, as messages name it.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// One fetch: connect, present the certificate, GET the credentials, parse them.
    pub async fn fetch(&self) -> Result<Credentials, IotError> {
        match tokio::time::timeout(FETCH_TIMEOUT, self.fetch_unbounded()).await {
            Ok(result) => result,
            Err(_) => Err(IotError::Unreachable {
                endpoint: self.endpoint(),
                reason: format!("no answer within {}s", FETCH_TIMEOUT.as_secs()),
            }),
        }
    }

    async fn fetch_unbounded(&self) -> Result<Credentials, IotError> {
        let endpoint = self.endpoint();
        let unreachable = |reason: String| IotError::Unreachable {
            endpoint: endpoint.clone(),
            reason,
        };
        let tls_failed = |e: &std::io::Error| IotError::Tls {
            endpoint: endpoint.clone(),
            reason: tls_reason(e),
        };
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let stream = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| tls_failed(&e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(hyper_reason(&e)))?;
        // Drives the connection while the request is in flight; it ends with the response.
        let driver = tokio::spawn(connection);
        let request = hyper::Request::get(&self.path)
            .header(hyper::header::HOST, &self.host)
            .header(THING_NAME_HEADER, &self.thing_name)
            .header(hyper::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| IotError::File {
                key: "aws.iot.role_alias",
                message: format!("cannot form the request: {e}"),
            })?;
        let result = async {
            let response = sender.send_request(request).await.map_err(|e| {
                // TLS 1.3 delivers a refused client certificate as an alert after the handshake,
                // on the first read: say so rather than "connection closed".
                match tls_alert(&e) {
                    Some(reason) => IotError::Tls {
                        endpoint: endpoint.clone(),
                        reason,
                    },
                    None => unreachable(hyper_reason(&e)),
                }
            })?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| unreachable(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok::<_, IotError>((status, body))
        }
        .await;
        driver.abort();
        let (status, body) = result?;
        if status != 200 {
            return Err(IotError::Refused {
                endpoint,
                status,
                message: refusal_message(status, &body),
            });
        }
        parse_answer(&body, SystemTime::now())
            .map_err(|reason| IotError::BadAnswer { endpoint, reason })
    }
}

impl ProvideCredentials for IotCredentialsProvider {
    fn provide_credentials<'a>(&'a self) -> provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        provider::future::ProvideCredentials::new(async move {
            self.fetch().await.map_err(CredentialsError::provider_error)
        })
    }
}

/// Parses the endpoint's answer; `now` only to refuse credentials that expired already.
pub fn parse_answer(body: &[u8], now: SystemTime) -> Result<Credentials, String> {
    let answer: Answer =
        serde_json::from_slice(body).map_err(|e| format!("not the credentials document ({e})"))?;
    let c = answer.credentials;
    let expiry = humantime::parse_rfc3339_weak(c.expiration.trim_end_matches('Z'))
        .or_else(|_| humantime::parse_rfc3339(&c.expiration))
        .map_err(|e| format!("expiration {:?} is not a time: {e}", c.expiration))?;
    if expiry <= now {
        return Err(format!(
            "the credentials expired at {} already (is this device's clock right?)",
            c.expiration
        ));
    }
    Ok(Credentials::new(
        c.access_key_id,
        c.secret_access_key,
        Some(c.session_token),
        Some(expiry),
        PROVIDER_NAME,
    ))
}

/// What an error status means for the operator, with the endpoint's own message.
fn refusal_message(status: u16, body: &[u8]) -> String {
    let own = serde_json::from_slice::<ErrorAnswer>(body)
        .ok()
        .and_then(|e| e.message)
        .unwrap_or_else(|| one_line(&String::from_utf8_lossy(body)));
    let hint = match status {
        400 => "check aws.iot.thing_name: the certificate must be attached to that thing",
        401 | 403 => {
            "check that the certificate is active and attached to the thing, and that its IoT policy allows iot:AssumeRoleWithCertificate on the role alias"
        }
        404 => "check aws.iot.role_alias: no such role alias in this account and region",
        _ => "the credentials provider could not serve the request",
    };
    let own: String = own.chars().take(MAX_ERROR_TEXT).collect();
    if own.is_empty() {
        hint.to_owned()
    } else {
        format!("{own}; {hint}")
    }
}

/// The reason of a failed TLS handshake, in words that say what to check.
fn tls_reason(e: &std::io::Error) -> String {
    let inner = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::InvalidCertificate(why)) => format!(
            "the endpoint's certificate is not trusted ({why}); check aws.iot.ca_file and aws.iot.credentials_endpoint"
        ),
        Some(rustls::Error::AlertReceived(alert)) => client_cert_refused(alert),
        Some(other) => other.to_string(),
        None => one_line(&e.to_string()),
    }
}

/// The alert a server sends when it refuses our certificate, if that is what `e` holds.
fn tls_alert(e: &hyper::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(rustls::Error::AlertReceived(alert)) = err.downcast_ref::<rustls::Error>() {
            return Some(client_cert_refused(alert));
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(rustls::Error::AlertReceived(alert)) = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(client_cert_refused(alert));
        }
        source = err.source();
    }
    None
}

fn client_cert_refused(alert: &rustls::AlertDescription) -> String {
    format!(
        "the endpoint refused the device certificate (TLS alert {alert:?}); check aws.iot.cert_file and aws.iot.key_file: the certificate must be registered with AWS IoT and active"
    )
}

/// hyper's error with its causes, on one line.
fn hyper_reason(e: &hyper::Error) -> String {
    super::one_line_chain(e)
}

/// `text` on one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The TLS client configuration: the endpoint's CA (or the system's), the device certificate.
pub fn tls_config(config: &IotConfig) -> Result<rustls::ClientConfig, IotError> {
    let mut roots = rustls::RootCertStore::empty();
    match &config.ca_file {
        Some(path) => {
            let certs = read_certs("aws.iot.ca_file", path)?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(IotError::File {
                    key: "aws.iot.ca_file",
                    message: format!("{}: no usable CA certificate in it", path.display()),
                });
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    let chain = read_certs("aws.iot.cert_file", &config.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&config.key_file).map_err(|e| IotError::File {
        key: "aws.iot.key_file",
        message: match e {
            rustls_pki_types::pem::Error::NoItemsFound => format!(
                "{}: no private key in it; expected PEM with -----BEGIN PRIVATE KEY----- (or RSA PRIVATE KEY, EC PRIVATE KEY)",
                config.key_file.display()
            ),
            other => format!("{}: {other}", config.key_file.display()),
        },
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| IotError::File {
            key: "aws.iot",
            message: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| IotError::File {
            key: "aws.iot.cert_file",
            message: format!(
                "the certificate {} and the key {} cannot be used together: {e}",
                config.cert_file.display(),
                config.key_file.display()
            ),
        })
}

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, IotError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| IotError::File {
            key,
            message: format!("{}: {e}", path.display()),
        })?;
    if certs.is_empty() {
        return Err(IotError::File {
            key,
            message: format!(
                "{}: no certificate in it; expected PEM with -----BEGIN CERTIFICATE-----",
                path.display()
            ),
        });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> SystemTime {
        humantime::parse_rfc3339(text).expect("time")
    }

    #[test]
    fn the_credentials_document_is_parsed_with_its_expiry() {
        let body = br#"{"credentials":{"accessKeyId":"ASIAEXAMPLE","secretAccessKey":"s","sessionToken":"t","expiration":"2026-11-27T10:15:30Z"}}"#;
        let c = parse_answer(body, at("2026-11-27T09:15:30Z")).expect("parse");
        assert_eq!(c.access_key_id(), "ASIAEXAMPLE");
        assert_eq!(c.session_token(), Some("t"));
        assert_eq!(c.expiry(), Some(at("2026-11-27T10:15:30Z")));
    }

    #[test]
    fn expired_or_malformed_answers_are_refused_in_words() {
        let body = br#"{"credentials":{"accessKeyId":"a","secretAccessKey":"s","sessionToken":"t","expiration":"2026-11-27T10:15:30Z"}}"#;
        let err = parse_answer(body, at("2026-11-27T11:00:00Z")).expect_err("expired");
        assert!(err.contains("expired"), "{err}");
        let err = parse_answer(b"<html>", SystemTime::UNIX_EPOCH).expect_err("html");
        assert!(err.contains("not the credentials document"), "{err}");
    }

    #[test]
    fn refusals_carry_the_endpoint_message_and_a_hint() {
        let m = refusal_message(403, br#"{"message":"Access Denied"}"#);
        assert!(
            m.starts_with("Access Denied; check that the certificate"),
            "{m}"
        );
        let m = refusal_message(404, b"");
        assert!(m.contains("aws.iot.role_alias"), "{m}");
    }
}
