//! Invoking Lambda: the [`Invoke`] seam, the AWS SDK implementation, and the classification of
//! every failure into what the delivery loop should do about it.
//!
//! The SDK's own retries are switched off: the delivery loop owns retrying (with backoff that
//! never blocks other rules), so every failure reaches [`classify`] and is logged with AWS's
//! error code.

use std::future::Future;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_lambda::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_lambda::operation::invoke::InvokeError as SdkInvokeError;
use aws_sdk_lambda::primitives::Blob;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};

use crate::config::{AwsConfig, InvocationType};

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
    /// error for RequestResponse).
    fn invoke(
        &self,
        request: InvokeRequest,
    ) -> impl Future<Output = Result<(), InvokeError>> + Send;
}

/// Why the Lambda client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// No region in the config nor in the environment.
    #[error("aws.region: no AWS region configured; set aws.region, MLB_AWS__REGION or AWS_REGION")]
    NoRegion,
}

/// Invokes through aws-sdk-lambda, with the default credential chain.
#[derive(Debug, Clone)]
pub struct LambdaInvoker {
    /// The SDK client; cheap to clone, shares one connection pool.
    client: aws_sdk_lambda::Client,
}

impl LambdaInvoker {
    /// Builds the client: rustls with ring, the configured timeouts, SDK retries off.
    pub async fn new(config: &AwsConfig) -> Result<Self, SetupError> {
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
        let sdk_config = loader.load().await;
        if sdk_config.region().is_none() {
            return Err(SetupError::NoRegion);
        }
        Ok(LambdaInvoker {
            client: aws_sdk_lambda::Client::new(&sdk_config),
        })
    }
}

impl Invoke for LambdaInvoker {
    async fn invoke(&self, request: InvokeRequest) -> Result<(), InvokeError> {
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
        Ok(())
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

/// Sorts an SDK failure into [`InvokeError`].
pub fn classify<R: std::fmt::Debug>(err: SdkError<SdkInvokeError, R>) -> InvokeError {
    match &err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            let code = e.code().unwrap_or("Unknown").to_owned();
            let message = e.message().unwrap_or_default().to_owned();
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
        SdkError::TimeoutError(_) => InvokeError::Transient {
            code: "Timeout".into(),
            message: format!("no answer in time: {}", DisplayErrorContext(&err)),
        },
        SdkError::DispatchFailure(_) => InvokeError::Transient {
            code: "Dispatch".into(),
            message: DisplayErrorContext(&err).to_string(),
        },
        SdkError::ResponseError(_) => InvokeError::Transient {
            code: "Response".into(),
            message: DisplayErrorContext(&err).to_string(),
        },
        // Missing credentials and the like surface here; they are fixed by an operator, and
        // until then the messages wait rather than being refused.
        _ => InvokeError::Transient {
            code: "Request".into(),
            message: DisplayErrorContext(&err).to_string(),
        },
    }
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
