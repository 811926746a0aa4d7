//! `[metrics]`: the listener for `/metrics`, `/healthz` and `/readyz`.
//!
//! Invariant: a `listen` that validates parses as an IP socket address, so a typo is a
//! configuration error rather than a failed bind at start.

use serde::Deserialize;

use super::Issue;

/// `[metrics]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address and port of the HTTP listener, e.g. `127.0.0.1:9464` (validated as an IP
    /// socket address, so a typo is a configuration error rather than a failed bind).
    pub listen: String,
}

impl MetricsConfig {
    /// The listen address; validation made sure it parses.
    pub fn listen_addr(&self) -> Result<std::net::SocketAddr, String> {
        self.listen.trim().parse().map_err(|_| {
            format!(
                "expected an IP address and port like \"127.0.0.1:9464\" or \"[::1]:9464\", got \"{}\"",
                self.listen
            )
        })
    }

    /// `[metrics]`: the listen address must be an IP address and a port.
    pub(super) fn validate(&self) -> Vec<Issue> {
        match self.listen_addr() {
            Err(message) => vec![Issue::new("metrics.listen", message)],
            Ok(_) => Vec::new(),
        }
    }
}
