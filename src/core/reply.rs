//! What a reply to a device is, apart from publishing it: `[rules.reply]` as delivery needs it
//! ([`ReplySpec`]), what a reply needs of its request ([`Request`]), where it goes
//! ([`destination`]), how `check` explains that ([`explain`]), and the checks of `reply.topic`
//! templates that validation shares. Pure. Publishing and waiting for the broker's PUBACK is
//! `crate::mqtt::replies`.
//!
//! Invariant: a device never chooses where the bridge publishes. A request's MQTT 5 Response
//! Topic is used only when it matches one of `reply.allow` (none by default); otherwise the
//! reply goes to `reply.topic`, and without one it is refused ([`Destination::NotAllowed`]),
//! which delivery turns into a `ReplyNotAllowed` dead letter.

use crate::core::envelope::Message;
use crate::core::rules;

/// What stands for the request's topic in `reply.topic`.
pub const TOPIC_PLACEHOLDER: &str = "{topic}";
/// Longest MQTT topic name.
const MAX_TOPIC_LEN: usize = u16::MAX as usize;

/// The dead-letter code of a reply whose Response Topic `reply.allow` does not allow.
pub const NOT_ALLOWED_CODE: &str = "ReplyNotAllowed";

/// `[rules.reply]` as the delivery loop needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplySpec {
    /// Template for requests without an allowed Response Topic.
    pub topic: Option<String>,
    /// Topic filters a request's Response Topic must match to be used (validated).
    pub allow: Vec<String>,
    /// The retain flag of replies.
    pub retain: bool,
}

/// What a reply needs of its request, kept with the event that carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The message's id, sent back as `request_id`.
    pub id: String,
    /// The topic it was published to.
    pub topic: String,
    /// Its MQTT 5 Response Topic.
    pub response_topic: Option<String>,
    /// Its MQTT 5 Correlation Data.
    pub correlation_data: Option<Vec<u8>>,
}

impl Request {
    /// The request `message` makes.
    pub fn of(message: &Message) -> Self {
        let props = message.properties.as_deref();
        Request {
            id: message.id.to_string(),
            topic: message.topic.clone(),
            response_topic: props.and_then(|p| p.response_topic.clone()),
            correlation_data: props.and_then(|p| p.correlation_data.clone()),
        }
    }
}

/// Where a reply goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// The request's Response Topic, which `reply.allow` allows.
    ResponseTopic(String),
    /// `reply.topic`, expanded for the request.
    Template {
        /// The topic to publish to.
        topic: String,
        /// The request's Response Topic, when it named one `reply.allow` does not allow.
        refused: Option<String>,
    },
    /// The request's Response Topic is not allowed and there is no `reply.topic`: the reply
    /// is refused (a `ReplyNotAllowed` dead letter).
    NotAllowed(String),
    /// No Response Topic and no `reply.topic`: the request gets no reply.
    Nowhere,
}

/// Where the reply to `request` goes: its Response Topic when `reply.allow` allows it, else
/// the rule's template; a Response Topic with neither is refused, and with no Response Topic
/// and no template there is no reply.
pub fn destination(spec: &ReplySpec, request: &Request) -> Destination {
    let refused = match &request.response_topic {
        Some(topic) if allowed(spec, topic) => return Destination::ResponseTopic(topic.clone()),
        other => other.clone(),
    };
    match (&spec.topic, refused) {
        (Some(template), refused) => Destination::Template {
            topic: expand(template, &request.topic),
            refused,
        },
        (None, Some(topic)) => Destination::NotAllowed(topic),
        (None, None) => Destination::Nowhere,
    }
}

/// Whether `reply.allow` allows `response_topic`. A `$` topic never is: those belong to the
/// broker (and a filter starting with a wildcard never matches one anyway).
fn allowed(spec: &ReplySpec, response_topic: &str) -> bool {
    !response_topic.starts_with('$')
        && spec
            .allow
            .iter()
            .any(|filter| rules::matches(filter, response_topic))
}

/// Where a rule's replies may go, in a sentence for `check`.
pub fn explain(spec: &ReplySpec) -> String {
    let fallback = match &spec.topic {
        Some(template) => format!("to reply.topic {template:?}"),
        None => format!(
            "dead-lettered as {NOT_ALLOWED_CODE} (and a request without a Response Topic gets \
             no reply, as reply.topic is not set)"
        ),
    };
    if spec.allow.is_empty() {
        return match &spec.topic {
            Some(_) => format!(
                "replies go {fallback}; a request's Response Topic is never used (reply.allow \
                 is empty)"
            ),
            None => format!(
                "replies to requests with a Response Topic are {fallback}: reply.allow is empty"
            ),
        };
    }
    let verb = if spec.topic.is_some() { "" } else { "are " };
    format!(
        "replies go to the request's Response Topic when it matches reply.allow {:?}, else {verb}{fallback}",
        spec.allow
    )
}

/// `template` with `{topic}` replaced by `topic`.
pub fn expand(template: &str, topic: &str) -> String {
    template.replace(TOPIC_PLACEHOLDER, topic)
}

/// A concrete topic a filter matches, for checking templates: each wildcard level becomes `x`.
pub fn sample_topic(filter: &str) -> String {
    filter
        .split('/')
        .map(|level| {
            if level == "+" || level == "#" {
                "x"
            } else {
                level
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Checks `reply.topic`: a topic name once `{topic}` is replaced, and no other placeholder.
pub fn check_template(template: &str) -> Result<(), String> {
    let rest = template.replace(TOPIC_PLACEHOLDER, "");
    if rest.contains(['{', '}']) {
        return Err(format!(
            "{template:?}: only {TOPIC_PLACEHOLDER} is replaced (by the request's topic); \
             remove the other braces"
        ));
    }
    check_topic_name(&expand(template, "t")).map_err(|why| format!("{template:?}: {why}"))
}

/// Whether `topic` can be published to: not empty, no wildcard, no NUL, not a `$` topic.
pub fn check_topic_name(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("a topic to publish to must not be empty".into());
    }
    if topic.contains(['+', '#']) {
        return Err("a topic to publish to must not contain '+' or '#'".into());
    }
    if topic.contains('\0') {
        return Err("a topic must not contain NUL characters".into());
    }
    if topic.starts_with('$') {
        return Err("topics starting with '$' belong to the broker".into());
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(format!(
            "a topic is at most {MAX_TOPIC_LEN} bytes, this one {}",
            topic.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(topic: Option<&str>, allow: &[&str]) -> ReplySpec {
        ReplySpec {
            topic: topic.map(str::to_owned),
            allow: allow.iter().map(|f| (*f).to_owned()).collect(),
            retain: false,
        }
    }

    fn request(response_topic: Option<&str>) -> Request {
        Request {
            id: "i".into(),
            topic: "dev/1/req".into(),
            response_topic: response_topic.map(str::to_owned),
            correlation_data: Some(b"c".to_vec()),
        }
    }

    #[test]
    fn an_allowed_response_topic_is_used() {
        let spec = spec(Some("{topic}/reply"), &["dev/+/answers", "replies/#"]);
        for topic in ["dev/1/answers", "replies/x/y"] {
            assert_eq!(
                destination(&spec, &request(Some(topic))),
                Destination::ResponseTopic(topic.into())
            );
        }
    }

    #[test]
    fn a_response_topic_outside_allow_goes_to_the_template_instead() {
        let template = "{topic}/reply";
        for spec in [
            spec(Some(template), &[]),
            spec(Some(template), &["replies/#"]),
        ] {
            assert_eq!(
                destination(&spec, &request(Some("dev/2/cmd"))),
                Destination::Template {
                    topic: "dev/1/req/reply".into(),
                    refused: Some("dev/2/cmd".into()),
                }
            );
        }
        // A broker topic is never allowed, not even by "#".
        assert_eq!(
            destination(&spec(Some(template), &["#"]), &request(Some("$SYS/x"))),
            Destination::Template {
                topic: "dev/1/req/reply".into(),
                refused: Some("$SYS/x".into()),
            }
        );
        assert_eq!(
            destination(&spec(Some(template), &["replies/#"]), &request(None)),
            Destination::Template {
                topic: "dev/1/req/reply".into(),
                refused: None,
            }
        );
    }

    #[test]
    fn a_response_topic_allowed_nowhere_without_a_template_is_refused() {
        let bare = spec(None, &["replies/#"]);
        assert_eq!(
            destination(&bare, &request(Some("dev/2/cmd"))),
            Destination::NotAllowed("dev/2/cmd".into())
        );
        assert_eq!(
            destination(&spec(None, &[]), &request(Some("replies/1"))),
            Destination::NotAllowed("replies/1".into())
        );
        // No Response Topic and no template: no reply, nothing refused.
        assert_eq!(destination(&bare, &request(None)), Destination::Nowhere);
    }

    #[test]
    fn check_explains_where_replies_go() {
        assert_eq!(
            explain(&spec(Some("r/{topic}"), &["replies/#"])),
            "replies go to the request's Response Topic when it matches reply.allow \
             [\"replies/#\"], else to reply.topic \"r/{topic}\""
        );
        assert!(explain(&spec(None, &["replies/#"])).ends_with(
            "else are dead-lettered as ReplyNotAllowed (and a request without a Response \
                 Topic gets no reply, as reply.topic is not set)"
        ));
        assert_eq!(
            explain(&spec(Some("r/{topic}"), &[])),
            "replies go to reply.topic \"r/{topic}\"; a request's Response Topic is never \
             used (reply.allow is empty)"
        );
        assert!(explain(&spec(None, &[])).starts_with(
            "replies to requests with a Response Topic are dead-lettered as ReplyNotAllowed"
        ));
    }

    #[test]
    fn templates_and_topics_are_checked() {
        assert!(check_template("{topic}/reply").is_ok());
        assert!(check_template("replies/all").is_ok());
        assert!(check_template("{device}/reply").is_err());
        assert!(check_template("replies/+").is_err());
        assert!(check_template("").is_err());
        assert!(check_template("$SYS/x").is_err());
        assert_eq!(sample_topic("dev/+/req/#"), "dev/x/req/x");
        assert!(check_topic_name("a/b").is_ok());
        assert!(check_topic_name("a/#").is_err());
    }
}
