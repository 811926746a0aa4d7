//! Builds rumqttc's options from `[mqtt]`: the protocol version, the persistent session
//! (3.1.1: clean session off; 5: the session expiry interval), manual acks (a publish is
//! acknowledged only once stored), packet limits, credentials and TLS with ring.
//!
//! Invariant: every file `[mqtt]` names is read here, at start, and a file that cannot be used
//! is an [`MqttError`] naming its config key; preflight calls the same function.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{TlsConfiguration, Transport};

use crate::core::config::{MqttConfig, MqttProtocol, parse_mqtt_url};

use super::protocol::{self, Options};
use super::{MAX_INCOMING_PACKET, OUTGOING_INFLIGHT, REQUEST_CAPACITY};

/// Why the MQTT side cannot start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// `mqtt.url` is unusable (validation normally catches this first).
    #[error("mqtt.url: {0}")]
    Url(String),
    /// A file named in `[mqtt]` could not be read.
    #[error("{key}: cannot read {path}: {source}")]
    File {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A TLS file was read but is not usable.
    #[error("{key}: {message}")]
    Tls {
        /// The config key naming the file.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Builds rumqttc's options from `[mqtt]` for the configured protocol: persistent session
/// (3.1.1: clean session off; 5: the session expiry interval), manual acks, TLS with ring.
pub fn options(config: &MqttConfig) -> Result<Options, MqttError> {
    let address = parse_mqtt_url(&config.url).map_err(MqttError::Url)?;
    let credentials = credentials(config)?;
    let transport = if address.tls {
        Some(Transport::tls_with_config(tls_config(config)?))
    } else {
        None
    };
    match config.protocol {
        MqttProtocol::V311 => {
            let mut options =
                rumqttc::MqttOptions::new(config.client_id.clone(), address.host, address.port);
            options
                .set_clean_session(config.clean_start)
                .set_keep_alive(config.keep_alive.0.max(Duration::from_secs(1)))
                .set_manual_acks(true)
                .set_max_packet_size(MAX_INCOMING_PACKET, MAX_INCOMING_PACKET)
                .set_request_channel_capacity(REQUEST_CAPACITY);
            if let Some((username, password)) = credentials {
                options.set_credentials(username, password);
            }
            if let Some(transport) = transport {
                options.set_transport(transport);
            }
            Ok(Options::V311(options))
        }
        MqttProtocol::V5 => {
            let mut options =
                rumqttc::v5::MqttOptions::new(config.client_id.clone(), address.host, address.port);
            options
                .set_clean_start(config.clean_start)
                .set_keep_alive(config.keep_alive.0.max(protocol::MIN_KEEP_ALIVE_V5))
                .set_manual_acks(true)
                .set_session_expiry_interval(Some(config.session_expiry_secs()))
                .set_receive_maximum(Some(config.receive_maximum()))
                .set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT)
                .set_max_packet_size(Some(MAX_INCOMING_PACKET as u32))
                .set_request_channel_capacity(REQUEST_CAPACITY);
            if let Some((username, password)) = credentials {
                options.set_credentials(username, password);
            }
            if let Some(transport) = transport {
                options.set_transport(transport);
            }
            Ok(Options::V5(options))
        }
    }
}

/// The user name and password to send, if `mqtt.username` is set.
fn credentials(config: &MqttConfig) -> Result<Option<(String, String)>, MqttError> {
    if let Some(username) = &config.username {
        let password = match (&config.password, &config.password_file) {
            (Some(p), _) => p.expose().to_owned(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|source| MqttError::File {
                    key: "mqtt.password_file",
                    path: path.display().to_string(),
                    source,
                })?
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
            (None, None) => String::new(),
        };
        return Ok(Some((username.clone(), password)));
    }
    Ok(None)
}

fn tls_config(config: &MqttConfig) -> Result<TlsConfiguration, MqttError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let tls = config.tls.clone().unwrap_or_default();
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| MqttError::Tls {
                    key: "mqtt.tls.ca_file",
                    message: format!("cannot read {}: {e}", path.display()),
                })?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| MqttError::Tls {
                    key: "mqtt.tls.ca_file",
                    message: format!("{}: not PEM certificates: {e}", path.display()),
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(MqttError::Tls {
                    key: "mqtt.tls.ca_file",
                    message: format!("{}: no usable CA certificate in it", path.display()),
                });
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttError::Tls {
            key: "mqtt.tls",
            message: e.to_string(),
        })?
        .with_root_certificates(roots);
    let client = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| MqttError::Tls {
                    key: "mqtt.tls.cert_file",
                    message: format!("{}: {e}", cert.display()),
                })?;
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| MqttError::Tls {
                key: "mqtt.tls.key_file",
                message: format!("{}: {e}", key.display()),
            })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| MqttError::Tls {
                    key: "mqtt.tls.cert_file",
                    message: e.to_string(),
                })?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(TlsConfiguration::Rustls(Arc::new(client)))
}
