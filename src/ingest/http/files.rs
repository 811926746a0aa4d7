//! The files `[http]` names: the bearer token (`http.token_file`) and the TLS pair
//! (`http.cert_file`, `http.key_file`). Read once at the start (and by `check`), so a bad file
//! fails before anything is served.
//!
//! Invariant: the token is never printed (its `Debug` shows `***`), and an error names the
//! config key and the file, never the file's content.

use std::path::Path;
use std::sync::Arc;

use crate::core::config::HttpConfig;

use super::HttpError;

fn file_error(key: &'static str, message: String) -> HttpError {
    HttpError::File { key, message }
}

/// The bearer token; never printed.
#[derive(Clone)]
pub struct Token(pub(super) Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

impl Token {
    /// A token from its text (tests, and the file's first line).
    pub fn new(text: &str) -> Token {
        Token(text.as_bytes().to_vec())
    }
}

/// Reads `http.token_file`: its first line, trimmed, which must not be empty.
pub fn read_token(path: &Path) -> Result<Token, HttpError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        file_error(
            "http.token_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let token = text.lines().next().unwrap_or_default().trim();
    if token.is_empty() {
        return Err(file_error(
            "http.token_file",
            format!(
                "{}: the first line is empty; put the token there (e.g. from `openssl rand -hex 32`)",
                path.display()
            ),
        ));
    }
    Ok(Token::new(token))
}

/// The rustls server configuration for `cert_file` and `key_file` (ring, TLS 1.2 and 1.3),
/// or `None` for plain HTTP. `check` builds it too, so a bad pair fails before the start.
pub fn tls_config(config: &HttpConfig) -> Result<Option<Arc<rustls::ServerConfig>>, HttpError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) else {
        return Ok(None);
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_error("http.cert_file", format!("{}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(file_error(
            "http.cert_file",
            format!(
                "{}: no certificate in it; expected PEM with -----BEGIN CERTIFICATE-----",
                cert.display()
            ),
        ));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| file_error("http.key_file", format!("{}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| file_error("http.cert_file", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            file_error(
                "http.cert_file",
                format!(
                    "the certificate {} and the key {} cannot be used together: {e}",
                    cert.display(),
                    key.display()
                ),
            )
        })?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(server)))
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_the_first_line_of_its_file_trimmed_and_not_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "  abc \nignored\n").expect("write");
        assert_eq!(read_token(&path).expect("token").0, b"abc");
        std::fs::write(&path, "\nabc\n").expect("write");
        let err = read_token(&path).expect_err("empty first line").to_string();
        assert!(err.starts_with("http.token_file: "), "{err}");
        assert!(err.contains("first line is empty"), "{err}");
        let err = read_token(&dir.path().join("missing")).expect_err("missing");
        assert!(err.to_string().contains("cannot read"), "{err}");
    }
}
