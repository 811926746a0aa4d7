//! `[aws]` and `[aws.iot]`: how Lambda is reached and where credentials come from, each key's
//! default, and what serde cannot check. Whether a region or the files exist is
//! `crate::daemon::preflight`'s question: nothing here touches the environment or the disk.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{EVENT_DEFAULT_MAX_CONCURRENCY, HumanDuration, Issue};

/// `[aws]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// AWS region; when absent, the SDK's chain (AWS_REGION, the profile, IMDS) decides.
    pub region: Option<String>,
    /// Any Lambda-compatible endpoint (LocalStack, MiniStack) instead of AWS's.
    pub endpoint_url: Option<String>,
    /// A named profile from `~/.aws/config` for credentials and region.
    pub profile: Option<String>,
    /// Time allowed to open the HTTPS connection to Lambda.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Time allowed for one Invoke call, response included (cover `request_response` functions).
    #[serde(default = "default_operation_timeout")]
    pub operation_timeout: HumanDuration,
    /// Most Invoke calls in flight across all rules.
    #[serde(default = "default_global_concurrency")]
    pub max_concurrency: usize,
    /// Temporary credentials from the AWS IoT credentials provider, with the device's X.509
    /// certificate, instead of the SDK's default chain.
    pub iot: Option<IotConfig>,
}

/// `[aws.iot]`: the AWS IoT credentials provider, the way Greengrass devices get credentials.
/// The device presents its certificate (mutual TLS) and receives temporary credentials for the
/// IAM role behind `role_alias`; no long-lived key is stored on the device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IotConfig {
    /// The account's credentials endpoint, `host` or `host:port`
    /// (`aws iot describe-endpoint --endpoint-type iot:CredentialProvider`).
    pub credentials_endpoint: String,
    /// The IoT role alias that points at the IAM role the bridge assumes.
    pub role_alias: String,
    /// The thing the certificate is attached to; sent as `x-amzn-iot-thingname`.
    pub thing_name: String,
    /// PEM device certificate (chain).
    pub cert_file: PathBuf,
    /// PEM private key of `cert_file`.
    pub key_file: PathBuf,
    /// PEM CA certificates that sign the endpoint's certificate (Amazon Root CA 1); absent:
    /// the system's roots.
    pub ca_file: Option<PathBuf>,
}

impl Default for AwsConfig {
    fn default() -> Self {
        AwsConfig {
            region: None,
            endpoint_url: None,
            profile: None,
            connect_timeout: default_connect_timeout(),
            operation_timeout: default_operation_timeout(),
            max_concurrency: default_global_concurrency(),
            iot: None,
        }
    }
}

impl AwsConfig {
    /// `[aws]`. Whether a region can be found is `preflight`'s question (it needs the
    /// environment and the profile files).
    pub(super) fn validate(&self) -> Vec<Issue> {
        let mut issues = Vec::new();
        if let Some(endpoint) = &self.endpoint_url
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            issues.push(Issue::new(
                "aws.endpoint_url",
                format!("must start with http:// or https://, got {endpoint:?}"),
            ));
        }
        if self.operation_timeout.0.is_zero() {
            issues.push(Issue::new("aws.operation_timeout", "must be above zero"));
        }
        if self.max_concurrency == 0 {
            issues.push(Issue::new("aws.max_concurrency", "must be at least 1"));
        }
        if self.connect_timeout.0.is_zero() {
            issues.push(Issue::new("aws.connect_timeout", "must be above zero"));
        }
        if let Some(iot) = &self.iot {
            issues.extend(iot.validate());
        }
        issues
    }
}

impl IotConfig {
    /// `[aws.iot]`: the shape of the endpoint and the names; its files are read by `preflight`.
    fn validate(&self) -> Vec<Issue> {
        let mut issues = Vec::new();
        if let Err(message) = iot_endpoint(&self.credentials_endpoint) {
            issues.push(Issue::new("aws.iot.credentials_endpoint", message));
        }
        // AWS's patterns: role alias [\w=,@-]+, thing name [a-zA-Z0-9:_-]+; both go into the
        // request as they are, so nothing else may pass.
        let names = [
            ("aws.iot.role_alias", &self.role_alias, "=,@"),
            ("aws.iot.thing_name", &self.thing_name, ":"),
        ];
        for (key, value, extra) in names {
            if value.is_empty() {
                issues.push(Issue::new(key, "must not be empty"));
            } else if let Some(bad) = value.chars().find(|c| {
                !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-' || extra.contains(*c))
            }) {
                issues.push(Issue::new(
                    key,
                    format!("{value:?} contains {bad:?}; AWS IoT allows letters, digits, '_', '-' and {extra:?}"),
                ));
            }
        }
        issues
    }
}

/// `host` or `host:port`, as `aws iot describe-endpoint` prints it: no scheme, no path.
fn iot_endpoint(endpoint: &str) -> Result<(), String> {
    if endpoint.contains("://") || endpoint.contains('/') {
        return Err(format!(
            "{endpoint:?}: write the host alone, e.g. \"c1234567890abc.credentials.iot.eu-west-1.amazonaws.com\" (the bridge adds https:// and the path)"
        ));
    }
    let (host, port) = match endpoint.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (endpoint, None),
    };
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Err(format!("{endpoint:?} is not a host name"));
    }
    if let Some(port) = port
        && port.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err(format!(
            "{endpoint:?}: the port must be a number from 1 to 65535"
        ));
    }
    Ok(())
}

fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}

fn default_operation_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

fn default_global_concurrency() -> usize {
    // As many as one event rule adapts up to by default (ratelimit.rs says why).
    EVENT_DEFAULT_MAX_CONCURRENCY
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iot_endpoints_are_a_host_and_an_optional_port() {
        for ok in [
            "c1.credentials.iot.eu-west-1.amazonaws.com",
            "localhost:8443",
        ] {
            assert_eq!(iot_endpoint(ok), Ok(()), "{ok}");
        }
        for (bad, expected) in [
            (
                "https://c1.credentials.iot.eu-west-1.amazonaws.com",
                "write the host alone",
            ),
            ("host/role-aliases", "write the host alone"),
            ("host:0", "port must be"),
            ("host:https", "port must be"),
            ("", "not a host name"),
            ("a b", "not a host name"),
        ] {
            let err = iot_endpoint(bad).expect_err(bad);
            assert!(err.contains(expected), "{bad:?}: {err}");
        }
    }
}
