//! `[mqtt]` and `[mqtt.tls]`: the broker we subscribe to, each key's default, and what serde
//! cannot check. [`parse_mqtt_url`] lives here because both validation and the client
//! (`crate::mqtt::options`) use it, so a URL that validates is the URL that is dialled.
//!
//! Invariants: the password is a [`Secret`] and never appears in a Debug dump; the MQTT 5 keys
//! are refused under 3.1.1 instead of silently ignored; a keep-alive that validates is one the
//! MQTT 5 client accepts (it panics below [`MIN_KEEP_ALIVE_V5`]).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{HumanDuration, Issue};

/// The shortest keep-alive rumqttc's MQTT 5 client accepts (it panics below it).
pub const MIN_KEEP_ALIVE_V5: Duration = Duration::from_secs(5);

/// `[mqtt]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host[:port]` or `mqtts://host[:port]`.
    pub url: String,
    /// Stable identity: the broker keeps our persistent session (and queues QoS 1/2 messages
    /// while we are away) under it. Defaults to `mqtt-lambda-bridge-<hostname>`.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// `false` (the default) asks the broker to keep our session across disconnects.
    #[serde(default)]
    pub clean_start: bool,
    /// The MQTT version spoken: `"3.1.1"` (the default) or `"5"`.
    #[serde(default)]
    pub protocol: MqttProtocol,
    /// MQTT 5 only: how long the broker keeps our session (and queues messages for it) after
    /// a disconnect. Default [`DEFAULT_SESSION_EXPIRY`]; 0 with `clean_start = true`.
    pub session_expiry: Option<HumanDuration>,
    /// MQTT 5 only: most unacknowledged QoS 1/2 messages the broker may send at once.
    /// Default [`DEFAULT_RECEIVE_MAXIMUM`].
    pub receive_maximum: Option<u16>,
    /// MQTT keep-alive interval.
    #[serde(default = "default_keep_alive")]
    pub keep_alive: HumanDuration,
    /// Optional user name.
    pub username: Option<String>,
    /// Optional password; prefer `password_file` or `MLB_MQTT__PASSWORD` to keep it out of the file.
    pub password: Option<Secret>,
    /// A file whose first line is the password.
    pub password_file: Option<PathBuf>,
    /// TLS settings for `mqtts://`.
    pub tls: Option<TlsConfig>,
}

/// `mqtt.protocol`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum MqttProtocol {
    /// MQTT 3.1.1.
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5.
    #[serde(rename = "5")]
    V5,
}

/// How long an MQTT 5 broker keeps our session by default: a gateway offline for a long
/// weekend still finds its messages queued (within the broker's own limits).
pub const DEFAULT_SESSION_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);

/// Unacknowledged messages an MQTT 5 broker may send at once by default: one ingest group
/// (one durable append per rule) per round trip.
pub const DEFAULT_RECEIVE_MAXIMUM: u16 = 256;

impl MqttConfig {
    /// The session expiry interval sent in CONNECT (MQTT 5), in seconds.
    pub fn session_expiry_secs(&self) -> u32 {
        match (self.session_expiry, self.clean_start) {
            (Some(d), _) => u32::try_from(d.0.as_secs()).unwrap_or(u32::MAX),
            (None, true) => 0,
            (None, false) => DEFAULT_SESSION_EXPIRY.as_secs() as u32,
        }
    }

    /// The receive maximum sent in CONNECT (MQTT 5).
    pub fn receive_maximum(&self) -> u16 {
        self.receive_maximum.unwrap_or(DEFAULT_RECEIVE_MAXIMUM)
    }
}

impl MqttConfig {
    /// `[mqtt]` and `[mqtt.tls]`.
    pub(super) fn validate(&self) -> Vec<Issue> {
        let mut issues = Vec::new();
        if let Err(message) = parse_mqtt_url(&self.url) {
            issues.push(Issue::new("mqtt.url", message));
        }
        if self.client_id.trim().is_empty() {
            issues.push(Issue::new("mqtt.client_id", "must not be empty"));
        }
        if self.keep_alive.0 < Duration::from_secs(1) {
            issues.push(Issue::new(
                "mqtt.keep_alive",
                "must be at least 1s (MQTT counts it in whole seconds)",
            ));
        }
        if self.password.is_some() && self.password_file.is_some() {
            issues.push(Issue::new(
                "mqtt.password_file",
                "set either password or password_file, not both",
            ));
        }
        if (self.password.is_some() || self.password_file.is_some()) && self.username.is_none() {
            issues.push(Issue::new(
                "mqtt.username",
                "a password needs a username (MQTT 3.1.1 sends no password alone)",
            ));
        }
        if let Some(tls) = &self.tls {
            issues.extend(tls.validate(&self.url));
        }
        issues.extend(self.validate_v5());
        issues
    }

    /// The keys only MQTT 5 uses.
    fn validate_v5(&self) -> Vec<Issue> {
        let mut issues = Vec::new();
        if self.protocol != MqttProtocol::V5 {
            for (set, key) in [
                (self.session_expiry.is_some(), "mqtt.session_expiry"),
                (self.receive_maximum.is_some(), "mqtt.receive_maximum"),
            ] {
                if set {
                    issues.push(Issue::new(
                        key,
                        "is used only with mqtt.protocol = \"5\" (MQTT 3.1.1 has no such setting); \
                         remove it or set the protocol",
                    ));
                }
            }
            return issues;
        }
        if let Some(expiry) = self.session_expiry {
            if expiry.0.as_secs() > u64::from(u32::MAX) {
                issues.push(Issue::new(
                    "mqtt.session_expiry",
                    format!("must be at most {}s (about 136 years)", u32::MAX),
                ));
            } else if self.clean_start && !expiry.0.is_zero() {
                issues.push(Issue::new(
                    "mqtt.session_expiry",
                    "clean_start = true starts a fresh session on every connection, so a kept \
                     session is never used: remove session_expiry or set clean_start = false",
                ));
            } else if !self.clean_start && expiry.0 < Duration::from_secs(1) {
                issues.push(Issue::new(
                    "mqtt.session_expiry",
                    "must be at least 1s with clean_start = false: at 0 the broker drops our \
                     session at each disconnect and the messages published meanwhile are lost \
                     (write clean_start = true to mean that)",
                ));
            }
        }
        if self.keep_alive.0 >= Duration::from_secs(1) && self.keep_alive.0 < MIN_KEEP_ALIVE_V5 {
            issues.push(Issue::new(
                "mqtt.keep_alive",
                "must be at least 5s with mqtt.protocol = \"5\" (the MQTT 5 client allows no less)",
            ));
        }
        if self.receive_maximum == Some(0) {
            issues.push(Issue::new(
                "mqtt.receive_maximum",
                "must be 1 to 65535 (MQTT 5 forbids 0)",
            ));
        }
        issues
    }
}

/// `[mqtt.tls]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of CA certificates to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS (needs `key_file`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key for `cert_file`.
    pub key_file: Option<PathBuf>,
}

impl TlsConfig {
    /// `[mqtt.tls]`: its files are read by `preflight`; here only how the keys fit together.
    fn validate(&self, url: &str) -> Vec<Issue> {
        let mut issues = Vec::new();
        if self.cert_file.is_some() != self.key_file.is_some() {
            issues.push(Issue::new(
                "mqtt.tls",
                "cert_file and key_file go together for client certificates",
            ));
        }
        if !url.starts_with("mqtts://") {
            issues.push(Issue::new("mqtt.tls", "TLS settings need an mqtts:// url"));
        }
        issues
    }
}

/// A value that must never be printed (passwords).
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The parts of `mqtt.url` the client needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    /// Host name or address.
    pub host: String,
    /// TCP port (1883 for mqtt, 8883 for mqtts when absent).
    pub port: u16,
    /// Whether to speak TLS.
    pub tls: bool,
}

/// Splits `mqtt://host[:port]` into its parts; the message says what to write instead.
pub fn parse_mqtt_url(url: &str) -> Result<BrokerAddress, String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else {
        return Err(format!(
            "{url:?}: the scheme must be mqtt:// or mqtts://, e.g. \"mqtt://127.0.0.1:1883\""
        ));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('/') || authority.contains('?') || authority.contains('@') {
        return Err(format!(
            "{url:?}: write only scheme, host and port (user and password have their own keys)"
        ));
    }
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        // IPv6 literal: [::1]:1883
        let Some((host, after)) = bracketed.split_once(']') else {
            return Err(format!("{url:?}: unclosed '[' in an IPv6 address"));
        };
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(format!("{url:?}: unexpected text after the IPv6 address")),
        };
        (host.to_owned(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), Some(port)),
            None => (authority.to_owned(), None),
        }
    };
    if host.is_empty() {
        return Err(format!("{url:?}: the host is missing"));
    }
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{url:?}: the port must be a number from 1 to 65535"))?,
    };
    Ok(BrokerAddress { host, port, tls })
}

fn default_client_id() -> String {
    // gethostname(2), not /proc/sys/kernel/hostname: the systemd unit hides /proc/sys
    // (ProcSubset=pid), and a client id that changed with it would lose the broker session.
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for its whole length; the name is read up to its NUL.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let host = (rc == 0)
        .then(|| {
            let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
            String::from_utf8_lossy(&buf[..end]).trim().to_owned()
        })
        .filter(|h| !h.is_empty());
    match host {
        Some(host) => format!("mqtt-lambda-bridge-{host}"),
        None => "mqtt-lambda-bridge".to_owned(),
    }
}

fn default_keep_alive() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::config::tests::load_unvalidated;

    #[test]
    fn mqtt5_keys_need_protocol_5_and_sensible_values() {
        let issues = |extra: &str| {
            let config = load_unvalidated(&format!("[mqtt]\nurl = \"mqtt://x\"\n{extra}\n"));
            config
                .mqtt
                .validate()
                .into_iter()
                .map(|i| format!("{}: {}", i.key, i.message))
                .collect::<Vec<_>>()
        };
        assert!(
            issues("protocol = \"5\"\nsession_expiry = \"1h\"\nreceive_maximum = 10").is_empty()
        );
        assert!(issues("protocol = \"3.1.1\"").is_empty());
        let got = issues("session_expiry = \"1h\"\nreceive_maximum = 5");
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].starts_with("mqtt.session_expiry: is used only with mqtt.protocol = \"5\""));
        let got = issues("protocol = \"5\"\nclean_start = true\nsession_expiry = \"1h\"");
        assert!(
            got[0].contains("fresh session on every connection"),
            "{got:?}"
        );
        let got = issues("protocol = \"5\"\nsession_expiry = \"0s\"");
        assert!(got[0].contains("must be at least 1s"), "{got:?}");
        let got = issues("protocol = \"5\"\nkeep_alive = \"2s\"");
        assert!(got[0].contains("at least 5s"), "{got:?}");
        let got = issues("protocol = \"5\"\nreceive_maximum = 0");
        assert!(got[0].contains("1 to 65535"), "{got:?}");
        let config =
            load_unvalidated("[mqtt]\nurl = \"mqtt://x\"\nprotocol = \"5\"\nclean_start = true\n");
        assert_eq!(config.mqtt.session_expiry_secs(), 0);
        let config = load_unvalidated("[mqtt]\nurl = \"mqtt://x\"\nprotocol = \"5\"\n");
        assert_eq!(config.mqtt.session_expiry_secs(), 7 * 24 * 3600);
        assert_eq!(config.mqtt.receive_maximum(), 256);
    }

    #[test]
    fn broker_urls_parse() {
        assert_eq!(
            parse_mqtt_url("mqtts://[::1]"),
            Ok(BrokerAddress {
                host: "::1".into(),
                port: 8883,
                tls: true
            })
        );
        assert_eq!(
            parse_mqtt_url("mqtt://broker.local:1884/"),
            Ok(BrokerAddress {
                host: "broker.local".into(),
                port: 1884,
                tls: false
            })
        );
    }

    #[test]
    fn the_default_client_id_names_the_host_without_reading_proc() {
        // The test itself runs outside the unit's sandbox, where /proc/sys is readable.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .expect("a hostname to compare with");
        assert_eq!(
            default_client_id(),
            format!("mqtt-lambda-bridge-{}", host.trim())
        );
    }
}
