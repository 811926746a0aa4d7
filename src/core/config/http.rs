//! `[http]`: HTTP ingest for devices that cannot speak MQTT (`crate::ingest::http`), each key's
//! default, and what serde cannot check; its files are read by `crate::daemon::preflight`.
//!
//! Invariant: a body that passes `max_body` is one Lambda can take in a synchronous invocation,
//! so no accepted message can be undeliverable by size alone.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{HumanDuration, Issue, REQUEST_RESPONSE_PAYLOAD_LIMIT, Size};

/// `[http]`: HTTP ingest for devices that cannot speak MQTT (`crate::ingest::http`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address and port to listen on, e.g. `127.0.0.1:8080`; absent: no listener.
    pub listen: Option<String>,
    /// A file whose first line (trimmed) is the bearer token every request must carry.
    pub token_file: Option<PathBuf>,
    /// Largest request body (the message's payload); larger ones are refused with 413.
    #[serde(default = "default_http_max_body")]
    pub max_body: Size,
    /// Time a client has to send a request's head, and again its body; slower ones are cut off.
    #[serde(default = "default_http_read_timeout")]
    pub read_timeout: HumanDuration,
    /// PEM certificate chain: with `key_file`, the listener speaks HTTPS only.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: None,
            token_file: None,
            max_body: default_http_max_body(),
            read_timeout: default_http_read_timeout(),
            cert_file: None,
            key_file: None,
        }
    }
}

impl HttpConfig {
    /// The listen address, when there is one; validation made sure it parses.
    pub fn listen_addr(&self) -> Option<Result<std::net::SocketAddr, String>> {
        let listen = self.listen.as_ref()?;
        Some(listen.trim().parse().map_err(|_| {
            format!(
                "expected an IP address and port like \"127.0.0.1:8080\" or \"[::1]:8080\", got \"{listen}\""
            )
        }))
    }
}

impl HttpConfig {
    /// `[http]`: an IP address and port to listen on, a body limit no function could exceed, a
    /// read timeout above zero, and the TLS files as a pair.
    pub(super) fn validate(&self) -> Vec<Issue> {
        let mut issues = Vec::new();
        if let Some(Err(message)) = self.listen_addr() {
            issues.push(Issue::new("http.listen", message));
        }
        if self.max_body.0 == 0 || self.max_body.0 > REQUEST_RESPONSE_PAYLOAD_LIMIT {
            issues.push(Issue::new(
                "http.max_body",
                format!(
                    "must be from 1 byte to 6MiB (Lambda's largest payload: a larger message could never be invoked), got {} bytes",
                    self.max_body.0
                ),
            ));
        }
        if self.read_timeout.0.is_zero() {
            issues.push(Issue::new(
                "http.read_timeout",
                "must be above zero; write e.g. \"30s\"",
            ));
        }
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => issues.push(Issue::new(
                "http.key_file",
                "http.cert_file is set: set http.key_file too (its private key), or neither for plain HTTP",
            )),
            (None, Some(_)) => issues.push(Issue::new(
                "http.cert_file",
                "http.key_file is set: set http.cert_file too (its certificate chain), or neither for plain HTTP",
            )),
            _ => {}
        }
        issues
    }
}

fn default_http_max_body() -> Size {
    Size(256 * 1024)
}

fn default_http_read_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_needs_an_ip_address_a_body_limit_lambda_can_take_and_both_tls_files() {
        assert!(
            HttpConfig::default().validate().is_empty(),
            "no listener, no problem"
        );
        let config = HttpConfig {
            listen: Some("localhost:8080".into()),
            max_body: Size(7 * 1024 * 1024),
            read_timeout: HumanDuration(Duration::ZERO),
            cert_file: Some("/etc/c.pem".into()),
            ..HttpConfig::default()
        };
        let issues = config.validate();
        let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "http.listen",
                "http.max_body",
                "http.read_timeout",
                "http.key_file"
            ]
        );
        assert!(
            issues[0].message.contains("\"127.0.0.1:8080\""),
            "{issues:?}"
        );
        let fine = HttpConfig {
            listen: Some("[::1]:8080".into()),
            max_body: Size(REQUEST_RESPONSE_PAYLOAD_LIMIT),
            ..HttpConfig::default()
        };
        assert!(fine.validate().is_empty());
        let key_only = HttpConfig {
            key_file: Some("/etc/k.pem".into()),
            ..HttpConfig::default()
        };
        assert_eq!(key_only.validate()[0].key, "http.cert_file");
    }
}
