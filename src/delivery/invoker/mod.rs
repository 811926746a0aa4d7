//! Invoking Lambda: the [`Invoke`] seam, the AWS SDK implementation, and the classification of
//! every failure into what the delivery loop should do about it.
//!
//! The SDK's own retries are switched off: the delivery loop owns retrying (with backoff that
//! never blocks other rules), so every failure reaches [`classify`] and is logged with AWS's
//! error code. Every failure's message is one line made of the errors' `Display` texts
//! ([`one_line_chain`]), never the SDK's `Debug` structure: journald shows one line per event.
//!
//! - [`credentials`]: resolving credentials once at start, and saying where it looked.
//! - [`iot`]: the AWS IoT credentials provider (device certificate → temporary credentials).
//! - [`dry_run`]: `check --aws`, a DryRun invocation per rule.
//! - [`policy`]: the least-privilege IAM policy for the configured functions.

pub mod credentials;
pub mod dry_run;
pub mod iot;
pub mod policy;

use std::future::Future;
use std::time::Duration;

use aws_config::identity::IdentityCache;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_lambda::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_lambda::operation::invoke::InvokeError as SdkInvokeError;
use aws_sdk_lambda::primitives::Blob;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};

use crate::core::config::{AwsConfig, InvocationType};

/// One invocation to make.
#[derive(Debug, Clone)]
pub struct InvokeRequest {
    /// Function name, partial ARN or full ARN.
    pub function: String,
    /// Alias or version.
    pub qualifier: Option<String>,
    /// Event (async) or RequestResponse.
    pub invocation: InvocationType,
    /// The encoded event.
    pub payload: Vec<u8>,
}

/// Why an invocation did not succeed, sorted by what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvokeError {
    /// Lambda asked us to slow down (429); retry after `retry_after` when given.
    #[error("throttled by Lambda ({code}): {message}")]
    Throttled {
        /// AWS's error code, e.g. `TooManyRequestsException`.
        code: String,
        /// AWS's message.
        message: String,
        /// Lambda's `retryAfterSeconds`, when it sent one.
        retry_after: Option<Duration>,
    },
    /// A failure that may pass: network, timeout, 5xx, credentials being refreshed.
    #[error("{code}: {message}")]
    Transient {
        /// AWS's error code, or a short name of the local failure (`Timeout`, `Dispatch`).
        code: String,
        /// What happened.
        message: String,
    },
    /// A failure that repeats until someone changes something: the function does not exist,
    /// access is denied, the payload is refused.
    #[error("{code}: {message}")]
    Permanent {
        /// AWS's error code, e.g. `ResourceNotFoundException`.
        code: String,
        /// AWS's message.
        message: String,
    },
    /// A `request_response` function ran and raised an error.
    #[error("the function failed ({kind}): {detail}")]
    FunctionError {
        /// Lambda's `X-Amz-Function-Error` value (`Unhandled`).
        kind: String,
        /// The start of the function's error payload.
        detail: String,
    },
}

impl InvokeError {
    /// AWS's error code or the local failure's name.
    pub fn code(&self) -> &str {
        match self {
            InvokeError::Throttled { code, .. }
            | InvokeError::Transient { code, .. }
            | InvokeError::Permanent { code, .. } => code,
            InvokeError::FunctionError { .. } => "FunctionError",
        }
    }
}

/// Something that invokes Lambda functions: the AWS SDK in production, fakes in tests.
pub trait Invoke: Send + Sync + 'static {
    /// Invokes once; `Ok` means Lambda accepted the event (202 for Event, 200 without a function
    /// error for RequestResponse), with the function's response (empty for Event).
    fn invoke(
        &self,
        request: InvokeRequest,
    ) -> impl Future<Output = Result<Vec<u8>, InvokeError>> + Send;
}

/// Why the Lambda client could not be set up; each is a configuration problem (exit 78).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// No region in the config nor in the environment.
    #[error("aws.region: no AWS region configured; set aws.region, MLB_AWS__REGION or AWS_REGION")]
    NoRegion,
    /// `[aws.iot]` cannot be used (its files).
    #[error(transparent)]
    Iot(#[from] iot::IotError),
    /// No credential source is configured at all.
    #[error("{0}")]
    NoCredentials(String),
}

/// The SDK configuration `run` and `check --aws` share: rustls with ring, the configured
/// timeouts, SDK retries off, and `[aws.iot]` as the credentials provider when it is set.
pub async fn sdk_config(config: &AwsConfig) -> Result<SdkConfig, SetupError> {
    let http_client = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(config.connect_timeout.0)
        .operation_timeout(config.operation_timeout.0)
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http_client)
        .timeout_config(timeouts)
        .retry_config(RetryConfig::disabled());
    if let Some(region) = &config.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(profile) = &config.profile {
        loader = loader.profile_name(profile);
    }
    if let Some(endpoint) = &config.endpoint_url {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some(iot_config) = &config.iot {
        let provider = iot::IotCredentialsProvider::new(iot_config)?;
        loader = loader.credentials_provider(provider).identity_cache(
            IdentityCache::lazy()
                .load_timeout(iot::LOAD_TIMEOUT)
                .buffer_time(iot::REFRESH_BEFORE_EXPIRY)
                .build(),
        );
    }
    let sdk_config = loader.load().await;
    if sdk_config.region().is_none() {
        return Err(SetupError::NoRegion);
    }
    Ok(sdk_config)
}

/// Invokes through aws-sdk-lambda.
#[derive(Debug, Clone)]
pub struct LambdaInvoker {
    /// The SDK client; cheap to clone, shares one connection pool.
    client: aws_sdk_lambda::Client,
}

impl LambdaInvoker {
    /// Builds the client and resolves credentials once, so that the first log lines say
    /// whether and where they were found. No source at all is an error ([`SetupError`]); a
    /// source that fails now (the IoT endpoint or the network is down) is one warning, and the
    /// daemon keeps buffering while every invocation retries.
    pub async fn new(config: &AwsConfig) -> Result<Self, SetupError> {
        let sdk = sdk_config(config).await?;
        match credentials::resolve(&sdk, config).await {
            Ok(found) => tracing::info!("{found}"),
            Err(credentials::Problem::NoSource(line)) => {
                return Err(SetupError::NoCredentials(line));
            }
            Err(credentials::Problem::Unavailable(line)) => tracing::warn!(
                "{line}; messages are buffered and delivery retries until credentials can be had"
            ),
        }
        Ok(Self::from_sdk_config(&sdk))
    }

    /// A client for `sdk`, without resolving anything.
    pub fn from_sdk_config(sdk: &SdkConfig) -> Self {
        LambdaInvoker {
            client: aws_sdk_lambda::Client::new(sdk),
        }
    }

    /// The SDK client, for `check --aws`.
    pub fn client(&self) -> &aws_sdk_lambda::Client {
        &self.client
    }
}

impl Invoke for LambdaInvoker {
    async fn invoke(&self, request: InvokeRequest) -> Result<Vec<u8>, InvokeError> {
        let invocation_type = match request.invocation {
            InvocationType::Event => aws_sdk_lambda::types::InvocationType::Event,
            InvocationType::RequestResponse => {
                aws_sdk_lambda::types::InvocationType::RequestResponse
            }
        };
        let output = self
            .client
            .invoke()
            .function_name(request.function)
            .set_qualifier(request.qualifier)
            .invocation_type(invocation_type)
            .payload(Blob::new(request.payload))
            .send()
            .await
            .map_err(classify)?;
        if let Some(kind) = output.function_error() {
            let detail = output
                .payload()
                .map(|p| {
                    String::from_utf8_lossy(&p.as_ref()[..p.as_ref().len().min(512)]).into_owned()
                })
                .unwrap_or_default();
            return Err(InvokeError::FunctionError {
                kind: kind.to_owned(),
                detail,
            });
        }
        Ok(output
            .payload()
            .map(|p| p.as_ref().to_vec())
            .unwrap_or_default())
    }
}

/// Error codes that repeat until someone changes the function, its permissions or the event.
const PERMANENT_CODES: &[&str] = &[
    "ResourceNotFoundException",
    "RequestTooLargeException",
    "InvalidParameterValueException",
    "InvalidRequestContentException",
    "UnsupportedMediaTypeException",
    "AccessDeniedException",
    "AccessDenied",
];

/// Sorts an SDK failure into [`InvokeError`], with a one-line message.
pub fn classify<R: std::fmt::Debug + 'static>(err: SdkError<SdkInvokeError, R>) -> InvokeError {
    match &err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            let code = e.code().unwrap_or("Unknown").to_owned();
            let message = one_line(e.message().unwrap_or_default());
            if let SdkInvokeError::TooManyRequestsException(t) = e {
                let retry_after = t
                    .retry_after_seconds()
                    .and_then(|s| s.trim().parse::<f64>().ok())
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(Duration::from_secs_f64);
                return InvokeError::Throttled {
                    code,
                    message,
                    retry_after,
                };
            }
            classify_code(code, message)
        }
        // Missing credentials and the like surface as dispatch or construction failures; they
        // are fixed by an operator or by the network coming back, and until then the messages
        // wait rather than being refused.
        _ => {
            let fallback = match &err {
                SdkError::TimeoutError(_) => "Timeout",
                SdkError::ResponseError(_) => "Response",
                SdkError::DispatchFailure(_) => "Dispatch",
                _ => "Request",
            };
            let (code, message) = local_failure(&err, fallback);
            InvokeError::Transient { code, message }
        }
    }
}

/// A short code and a one-line reason for a failure that happened on this side: no
/// credentials, no connection, no answer in time, an answer that is not Lambda's.
/// `fallback` is the code when it is neither of those.
pub fn local_failure(err: &(dyn std::error::Error + 'static), fallback: &str) -> (String, String) {
    let chain = || std::iter::successors(Some(err), |e| e.source());
    // The SDK reports a failed credentials provider inside a connector error: look for the
    // credentials first, they are the cause to fix.
    if let Some(cred) = chain().find_map(|e| e.downcast_ref::<CredentialsError>()) {
        return credentials::describe(cred);
    }
    if let Some(connector) =
        chain().find_map(|e| e.downcast_ref::<aws_sdk_lambda::error::ConnectorError>())
    {
        let code = if connector.is_timeout() {
            "Timeout"
        } else {
            "ConnectionFailed"
        };
        return (
            code.to_owned(),
            format!("cannot reach Lambda: {}", innermost(connector)),
        );
    }
    (fallback.to_owned(), one_line_chain(err))
}

/// The deepest cause's text: what actually went wrong (`Connection refused (os error 111)`),
/// with the one above it when that adds words (`dns error: …`).
fn innermost(err: &(dyn std::error::Error + 'static)) -> String {
    let mut texts = Vec::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        texts.push(one_line(&e.to_string()));
        source = e.source();
    }
    texts.dedup();
    match texts.as_slice() {
        [] => String::new(),
        [only] => only.clone(),
        [.., above, last] if above.contains(last.as_str()) => above.clone(),
        [.., above, last] => format!("{above}: {last}"),
    }
}

/// An error and its causes as one line of their `Display` texts, each once.
pub fn one_line_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        let text = one_line(&e.to_string());
        // A wrapper often repeats its cause's text; keep the words once.
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = e.source();
    }
    parts.join(": ")
}

/// `text` on one line, runs of white space as one space.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Sorts a service error by its code.
pub fn classify_code(code: String, message: String) -> InvokeError {
    if PERMANENT_CODES.contains(&code.as_str()) {
        InvokeError::Permanent { code, message }
    } else if code.contains("Throttl") || code == "TooManyRequestsException" {
        InvokeError::Throttled {
            code,
            message,
            retry_after: None,
        }
    } else {
        InvokeError::Transient { code, message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_sorted_by_what_to_do() {
        let c = |code: &str| classify_code(code.into(), String::new());
        assert!(matches!(
            c("ResourceNotFoundException"),
            InvokeError::Permanent { .. }
        ));
        assert!(matches!(
            c("AccessDeniedException"),
            InvokeError::Permanent { .. }
        ));
        assert!(matches!(
            c("ServiceException"),
            InvokeError::Transient { .. }
        ));
        assert!(matches!(
            c("ExpiredTokenException"),
            InvokeError::Transient { .. }
        ));
        assert!(matches!(
            c("EC2ThrottledException"),
            InvokeError::Throttled { .. }
        ));
        assert_eq!(c("ServiceException").code(), "ServiceException");
    }
}
