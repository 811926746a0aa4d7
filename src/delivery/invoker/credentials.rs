//! Resolving AWS credentials once at start, and saying in one line what was found, or what is
//! missing and where the bridge looked.
//!
//! Sources, in the order the SDK's default chain asks them (unless `[aws.iot]` replaces it):
//!
//! ```text
//! environment         AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (, AWS_SESSION_TOKEN)
//! profile             aws.profile / AWS_PROFILE / "default" in AWS_SHARED_CREDENTIALS_FILE
//!                     (~/.aws/credentials) and AWS_CONFIG_FILE (~/.aws/config)
//! web identity        AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN (EKS)
//! container endpoint  AWS_CONTAINER_CREDENTIALS_RELATIVE_URI / _FULL_URI (ECS, Greengrass TES)
//! instance metadata   EC2 IMDS (off with AWS_EC2_METADATA_DISABLED=true)
//! [aws.iot]           the AWS IoT credentials provider, with the device certificate
//! ```
//!
//! Policy: when every source says "nothing here" (or a profile is malformed), no later retry
//! can succeed, so start fails with [`Problem::NoSource`] (exit 78). When a source exists but
//! fails now (the IoT endpoint or the network is down at boot), that is
//! [`Problem::Unavailable`]: one warning, and the gateway keeps buffering.

use std::fmt;
use std::time::{Duration, SystemTime};

use aws_config::SdkConfig;
use aws_credential_types::provider::ProvideCredentials;
use aws_credential_types::provider::error::CredentialsError;

use crate::core::config::AwsConfig;

/// How long start waits for credentials. IMDS off EC2 gives up in about a second when its
/// address is unreachable; the IoT provider has its own, shorter bound.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(15);

/// Credentials that were found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// `[aws.iot] <endpoint>` or "the default chain".
    pub source: String,
    /// The access key id's last four characters (enough to tell keys apart in a log).
    pub key_hint: String,
    /// When they expire, for temporary credentials.
    pub expiry: Option<SystemTime>,
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "AWS credentials found ({}, access key ...{})",
            self.source, self.key_hint
        )?;
        match self.expiry {
            Some(at) => write!(
                f,
                ", temporary: they expire at {} and are renewed before",
                humantime::format_rfc3339_seconds(at)
            ),
            None => f.write_str(", long-lived"),
        }
    }
}

/// Why no credentials were had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// No source is configured: nothing will change until an operator sets one up.
    NoSource(String),
    /// A source exists but did not give credentials now.
    Unavailable(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NoSource(line) | Problem::Unavailable(line) => f.write_str(line),
        }
    }
}

/// Asks `sdk`'s credentials provider once, bounded by [`LOOKUP_TIMEOUT`].
pub async fn resolve(sdk: &SdkConfig, aws: &AwsConfig) -> Result<Found, Problem> {
    let source = match &aws.iot {
        Some(iot) => format!("[aws.iot] {}", iot.credentials_endpoint),
        None => "the SDK's default chain".to_owned(),
    };
    let Some(provider) = sdk.credentials_provider() else {
        return Err(Problem::NoSource(no_source_line(aws)));
    };
    let result = tokio::time::timeout(LOOKUP_TIMEOUT, provider.provide_credentials()).await;
    match result {
        Ok(Ok(credentials)) => {
            let key = credentials.access_key_id();
            let hint_start = key.char_indices().rev().nth(3).map_or(0, |(i, _)| i);
            Ok(Found {
                source,
                key_hint: key[hint_start..].to_owned(),
                expiry: credentials.expiry(),
            })
        }
        Ok(Err(CredentialsError::CredentialsNotLoaded(_))) => {
            Err(Problem::NoSource(no_source_line(aws)))
        }
        Ok(Err(err @ CredentialsError::InvalidConfiguration(_))) => Err(Problem::NoSource(
            format!("AWS credentials: {}", describe(&err).1),
        )),
        Ok(Err(err)) => Err(Problem::Unavailable(format!(
            "no AWS credentials yet: {}",
            describe(&err).1
        ))),
        Err(_) => Err(Problem::Unavailable(format!(
            "no AWS credentials yet: {source} gave none within {}s",
            LOOKUP_TIMEOUT.as_secs()
        ))),
    }
}

/// The one line that says what is missing and where the bridge looked.
pub fn no_source_line(aws: &AwsConfig) -> String {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let profile = aws
        .profile
        .clone()
        .or_else(|| env("AWS_PROFILE"))
        .unwrap_or_else(|| "default".to_owned());
    let credentials_file =
        env("AWS_SHARED_CREDENTIALS_FILE").unwrap_or_else(|| "~/.aws/credentials".to_owned());
    let config_file = env("AWS_CONFIG_FILE").unwrap_or_else(|| "~/.aws/config".to_owned());
    let imds = if env("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        "EC2 instance metadata (disabled by AWS_EC2_METADATA_DISABLED)"
    } else {
        "EC2 instance metadata (not an EC2 instance, or no role attached)"
    };
    format!(
        "no AWS credentials: looked in the environment (AWS_ACCESS_KEY_ID and \
         AWS_SECRET_ACCESS_KEY), profile {profile:?} in {credentials_file} and {config_file}, \
         web identity (AWS_WEB_IDENTITY_TOKEN_FILE), the container endpoint \
         (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI or _FULL_URI) and {imds}; set one of them, or \
         [aws.iot] to use the device certificate"
    )
}

/// A short code and a one-line reason for a credentials failure.
pub fn describe(err: &CredentialsError) -> (String, String) {
    let cause = || {
        std::error::Error::source(err)
            .map(super::one_line_chain)
            .unwrap_or_default()
    };
    match err {
        CredentialsError::CredentialsNotLoaded(_) => (
            "NoCredentials".to_owned(),
            "no AWS credentials: no source in the default chain has any (run `mqtt-lambda-bridge check --aws` for where it looks)".to_owned(),
        ),
        CredentialsError::ProviderTimedOut(t) => (
            "CredentialsTimeout".to_owned(),
            format!(
                "the credentials provider gave no answer within {}s",
                t.timeout_duration().as_secs()
            ),
        ),
        CredentialsError::InvalidConfiguration(_) => (
            "CredentialsConfig".to_owned(),
            format!("the credentials source is misconfigured: {}", cause()),
        ),
        _ => ("CredentialsUnavailable".to_owned(), cause()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn found_credentials_read_as_one_line_without_the_secret() {
        let found = Found {
            source: "[aws.iot] c1.credentials.iot.eu-west-1.amazonaws.com".into(),
            key_hint: "WXYZ".into(),
            expiry: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)),
        };
        assert_eq!(
            found.to_string(),
            "AWS credentials found ([aws.iot] c1.credentials.iot.eu-west-1.amazonaws.com, \
             access key ...WXYZ), temporary: they expire at 2027-01-15T08:00:00Z and are renewed before"
        );
    }

    #[test]
    fn a_provider_error_is_its_cause_on_one_line() {
        let err = CredentialsError::provider_error("endpoint unreachable:\n  connection refused");
        let (code, message) = describe(&err);
        assert_eq!(code, "CredentialsUnavailable");
        assert_eq!(message, "endpoint unreachable: connection refused");
    }
}
