//! The answers of HTTP ingest, each one line of JSON: `{"id":…,"rules":[…]}` for a stored
//! message, `{"error":"…"}` saying what to change otherwise.
//!
//! Invariant: every answer but a 202 closes the connection. The request's body may be unread
//! (refused before reading it, or cut off), so the connection cannot be trusted to carry
//! another request.

use std::time::Duration;

use hyper::StatusCode;
use hyper::header::{self, HeaderValue};
use uuid::Uuid;

use super::request::{Auth, BodyError};
use crate::http::{self, Answer};

/// What a 503 tells the client to wait before trying again, in seconds.
const RETRY_AFTER_SECS: u64 = 5;
/// The `WWW-Authenticate` challenge of a 401.
const CHALLENGE: &str = "Bearer realm=\"mqtt-lambda-bridge\"";
/// The same, when a token was given and is wrong (RFC 6750 §3.1).
const CHALLENGE_INVALID: &str = "Bearer realm=\"mqtt-lambda-bridge\", error=\"invalid_token\"";

fn json(status: StatusCode, value: &serde_json::Value) -> Answer {
    let mut text = value.to_string();
    text.push('\n');
    http::answer(status, "application/json", text)
}

/// `{"error": message}` with `status`, closing the connection.
pub(super) fn error(status: StatusCode, message: impl Into<String>) -> Answer {
    closing(json(
        status,
        &serde_json::json!({ "error": message.into() }),
    ))
}

/// The answer, then the connection closes.
fn closing(answer: Answer) -> Answer {
    http::with_header(
        answer,
        header::CONNECTION,
        HeaderValue::from_static("close"),
    )
}

/// 202: stored for `rules`, of which `set_aside` went to their dead-letter store; `filtered`
/// matched it but their SQL WHERE did not keep it.
pub(super) fn stored(
    id: Uuid,
    rules: Vec<String>,
    set_aside: Vec<String>,
    filtered: Vec<String>,
) -> Answer {
    let mut body = serde_json::Map::new();
    body.insert("id".into(), id.hyphenated().to_string().into());
    body.insert("rules".into(), rules.into());
    if !set_aside.is_empty() {
        body.insert("set_aside".into(), set_aside.into());
    }
    if !filtered.is_empty() {
        body.insert("filtered".into(), filtered.into());
    }
    json(StatusCode::ACCEPTED, &serde_json::Value::Object(body))
}

/// 404: no rule matches `topic`. The body was read whole, so the connection stays open.
pub(super) fn no_rule(topic: &str) -> Answer {
    json(
        StatusCode::NOT_FOUND,
        &serde_json::json!({ "error": format!("no rule matches the topic {topic:?}: nothing stored") }),
    )
}

/// 401 with the challenge, when the token is missing or wrong (`None` when it was granted).
pub(super) fn unauthorized(auth: Auth) -> Option<Answer> {
    let (message, challenge) = match auth {
        Auth::Granted => return None,
        Auth::Missing => (
            "a bearer token is required: send Authorization: Bearer <token>",
            CHALLENGE,
        ),
        Auth::Wrong => {
            tracing::debug!("HTTP ingest: a request with a wrong token refused");
            (
                "the bearer token is not the one configured",
                CHALLENGE_INVALID,
            )
        }
    };
    Some(http::with_header(
        error(StatusCode::UNAUTHORIZED, message),
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    ))
}

/// 404 for a path other than `/topics/<topic>`.
pub(super) fn not_found() -> Answer {
    error(
        StatusCode::NOT_FOUND,
        "not found: send messages with POST /topics/<topic>",
    )
}

/// 405 for a method other than POST.
pub(super) fn post_only() -> Answer {
    http::with_header(
        error(
            StatusCode::METHOD_NOT_ALLOWED,
            "only POST is served: POST /topics/<topic> with the payload as the body",
        ),
        header::ALLOW,
        HeaderValue::from_static("POST"),
    )
}

/// 413: over `http.max_body`.
pub(super) fn too_large(max_body: u64) -> Answer {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the body is larger than http.max_body ({max_body} bytes)"),
    )
}

/// Why a body was not read whole, as an answer.
pub(super) fn body_failed(why: BodyError, max_body: u64, read_timeout: Duration) -> Answer {
    match why {
        BodyError::TooLarge => too_large(max_body),
        BodyError::Slow => error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the body did not arrive within {} (http.read_timeout)",
                humantime::format_duration(read_timeout)
            ),
        ),
        BodyError::Broken(err) => error(
            StatusCode::BAD_REQUEST,
            format!("the body was cut off or malformed: {err}"),
        ),
    }
}

/// Why a message is refused when full buffers with `when_full = "drop_newest"` dropped it:
/// names the rules. A retry is stored again by the rules that kept it (same topic, a new id):
/// functions that must see a message once deduplicate on its content.
pub(super) fn dropped_reason(rules: &[String]) -> String {
    let names: Vec<String> = rules.iter().map(|r| format!("{r:?}")).collect();
    let (noun, verb) = if names.len() == 1 {
        ("rule", "is")
    } else {
        ("rules", "are")
    };
    format!(
        "not stored: the buffer of {noun} {} {verb} full and buffer.when_full = \"drop_newest\" dropped the message; retry later",
        names.join(", ")
    )
}

/// 503 with Retry-After: `why`, in words for the client.
pub(super) fn retry_later(why: String) -> Answer {
    http::with_header(
        error(StatusCode::SERVICE_UNAVAILABLE, why),
        header::RETRY_AFTER,
        HeaderValue::from(RETRY_AFTER_SECS),
    )
}
