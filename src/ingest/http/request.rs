//! What a request brings, checked before anything is stored: the bearer token, the topic its
//! path names, and the body, read within its limits.
//!
//! Invariants: the token is compared in constant time; a topic is accepted only as MQTT
//! accepts a topic to publish to; a body is never held beyond `http.max_body` bytes nor read
//! past its deadline.

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap};
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use super::files::Token;

/// The path every message is sent to, followed by the topic.
pub(super) const TOPICS_PREFIX: &str = "/topics/";
/// MQTT's longest topic name.
const MAX_TOPIC_BYTES: usize = u16::MAX as usize;

/// Whether a request carries the token. The comparison takes the same time whatever the bytes
/// (only the length may show), so a client cannot find the token byte by byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Auth {
    Granted,
    Missing,
    Wrong,
}

pub(super) fn authorize(headers: &HeaderMap, token: &Token) -> Auth {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Auth::Missing;
    };
    let value = value.as_bytes().trim_ascii();
    let Some(space) = value.iter().position(|b| *b == b' ') else {
        return Auth::Wrong;
    };
    let (scheme, given) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Auth::Wrong;
    }
    if bool::from(given.trim_ascii().ct_eq(&token.0)) {
        Auth::Granted
    } else {
        Auth::Wrong
    }
}

/// The topic a path names (the part after `/topics/`), %-decoded and checked as MQTT checks a
/// topic to publish to. Pure.
pub fn publish_topic(raw: &str) -> Result<String, String> {
    let bytes = percent_decode(raw)?;
    let topic =
        String::from_utf8(bytes).map_err(|_| "the topic is not UTF-8 once %-decoded".to_owned())?;
    if topic.is_empty() {
        return Err(
            "the topic is empty: POST /topics/<topic>, e.g. /topics/sensors/dev1/temperature"
                .into(),
        );
    }
    if topic.contains(['+', '#']) {
        return Err(format!(
            "the topic {topic:?} holds a wildcard (+ or #): a message is published to one concrete topic"
        ));
    }
    if topic.contains('\0') {
        return Err("the topic contains a NUL character".into());
    }
    if topic.starts_with('$') {
        return Err(format!(
            "the topic {topic:?} starts with $: such topics belong to the broker"
        ));
    }
    if topic.len() > MAX_TOPIC_BYTES {
        return Err("the topic is longer than MQTT allows (65535 bytes)".into());
    }
    Ok(topic)
}

/// `%XX` escapes to bytes; anything else is kept as is. Pure.
fn percent_decode(text: &str) -> Result<Vec<u8>, String> {
    let hex = |c: u8| char::from(c).to_digit(16);
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let high = bytes.get(i + 1).copied().and_then(hex);
            let low = bytes.get(i + 2).copied().and_then(hex);
            let (Some(high), Some(low)) = (high, low) else {
                return Err(format!(
                    "the topic has a bad %-escape at byte {i}: write % as %25"
                ));
            };
            // Two hex digits make at most 255.
            out.push((high * 16 + low) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// The declared body length, when there is a valid one.
pub(super) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Why a body was not read whole.
#[derive(Debug)]
pub(super) enum BodyError {
    /// Over `max_body`.
    TooLarge,
    /// Not within the read deadline.
    Slow,
    /// The client went away mid-body, or sent a malformed chunk.
    Broken(hyper::Error),
}

/// Reads the whole body, at most `max` bytes, before `deadline`.
pub(super) async fn read_body(
    mut body: Incoming,
    max: u64,
    hint: usize,
    deadline: Instant,
) -> Result<Vec<u8>, BodyError> {
    let mut payload = Vec::with_capacity(hint);
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(BodyError::Slow),
            Ok(None) => return Ok(payload),
            Ok(Some(Err(err))) => return Err(BodyError::Broken(err)),
            Ok(Some(Ok(frame))) => frame,
        };
        // Trailers carry nothing we keep.
        if let Ok(data) = frame.into_data() {
            if payload.len() as u64 + data.len() as u64 > max {
                return Err(BodyError::TooLarge);
            }
            payload.extend_from_slice(&data);
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn a_topic_is_percent_decoded_and_checked_as_a_publish_topic() {
        assert_eq!(publish_topic("sensors/dev1/t"), Ok("sensors/dev1/t".into()));
        assert_eq!(
            publish_topic("sensors/dev%201%2Ft"),
            Ok("sensors/dev 1/t".into())
        );
        assert_eq!(publish_topic("caf%C3%A9"), Ok("café".into()));
        assert_eq!(
            publish_topic("a//b/"),
            Ok("a//b/".into()),
            "empty levels are levels"
        );
        for (raw, says) in [
            ("", "empty"),
            ("a/+/b", "wildcard"),
            ("a/%23", "wildcard"),
            ("a%00b", "NUL"),
            ("$SYS/x", "starts with $"),
            ("%24SYS/x", "starts with $"),
            ("a%2", "%-escape"),
            ("a%zz", "%-escape"),
            ("a%+1", "%-escape"),
            ("%FF", "not UTF-8"),
        ] {
            let err = publish_topic(raw).expect_err(raw);
            assert!(err.contains(says), "{raw}: {err}");
        }
        assert!(publish_topic(&"a".repeat(65_536)).is_err());
    }

    #[test]
    fn the_bearer_token_is_required_and_compared_whole() {
        let token = Token::new("s3cret");
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(value).expect("header"),
            );
            authorize(&headers, &token)
        };
        assert_eq!(authorize(&HeaderMap::new(), &token), Auth::Missing);
        assert_eq!(with("Bearer s3cret"), Auth::Granted);
        assert_eq!(with("bearer  s3cret "), Auth::Granted);
        assert_eq!(with("Bearer s3cre"), Auth::Wrong);
        assert_eq!(with("Bearer s3cret2"), Auth::Wrong);
        assert_eq!(with("Basic s3cret"), Auth::Wrong);
        assert_eq!(with("s3cret"), Auth::Wrong);
        assert_eq!(format!("{token:?}"), "Token(***)");
    }
}
