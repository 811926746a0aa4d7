//! What a reply to a device is, apart from publishing it: `[rules.reply]` as delivery needs it
//! ([`ReplySpec`]), what a reply needs of its request ([`Request`]), where it goes
//! ([`destination`]), and the checks of `reply.topic` templates that validation shares. Pure.
//! Publishing and waiting for the broker's PUBACK is `crate::mqtt::replies`.

use crate::core::envelope::Message;

/// What stands for the request's topic in `reply.topic`.
pub const TOPIC_PLACEHOLDER: &str = "{topic}";
/// Longest MQTT topic name.
const MAX_TOPIC_LEN: usize = u16::MAX as usize;

/// `[rules.reply]` as the delivery loop needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplySpec {
    /// Template for requests without a Response Topic.
    pub topic: Option<String>,
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

/// Where the reply to `request` goes: its Response Topic, else the rule's template; `None`
/// when neither is there (no reply).
pub fn destination(spec: &ReplySpec, request: &Request) -> Option<String> {
    match (&request.response_topic, &spec.topic) {
        (Some(topic), _) => Some(topic.clone()),
        (None, Some(template)) => Some(expand(template, &request.topic)),
        (None, None) => None,
    }
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

    #[test]
    fn destinations_prefer_the_response_topic_then_the_template() {
        let spec = ReplySpec {
            topic: Some("{topic}/reply".into()),
            retain: false,
        };
        let mut request = Request {
            id: "i".into(),
            topic: "dev/1/req".into(),
            response_topic: None,
            correlation_data: None,
        };
        assert_eq!(
            destination(&spec, &request).as_deref(),
            Some("dev/1/req/reply")
        );
        request.response_topic = Some("dev/1/answers".into());
        assert_eq!(
            destination(&spec, &request).as_deref(),
            Some("dev/1/answers")
        );
        let bare = ReplySpec {
            topic: None,
            retain: false,
        };
        request.response_topic = None;
        assert_eq!(destination(&bare, &request), None);
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
