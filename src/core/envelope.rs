//! The event a Lambda function receives (SPEC.md, "The event a Lambda function receives").
//!
//! A [`Message`] is what the bridge keeps of an MQTT publish; [`encode_event`] turns a rule's
//! batch of them into the JSON object sent to Lambda. Pure: no I/O, no clock.
//!
//! Payload rules: a payload that is valid JSON travels as JSON (verbatim, not re-serialized), a
//! UTF-8 payload that is not JSON travels as a string, an empty payload is `""`, and anything else
//! travels as `payload_base64`.
//!
//! MQTT 5 properties: a message's user properties and content type travel as
//! `"properties": {"user": {...}, "content_type": "..."}`, each part only when present and the
//! whole object only when one is. MQTT lets a user property's name repeat: a name sent once maps
//! to its value (a string), a name sent several times maps to an array of its values in the
//! order sent, so nothing is lost and the common case stays a plain string. A request's
//! Response Topic and Correlation Data travel there too, as `"response_topic"` and
//! `"correlation_data_base64"`, so a dead letter replayed still knows where its reply goes.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;

/// One MQTT message as the bridge keeps it, from the broker's publish to Lambda's acceptance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Assigned once on receipt and stored with the message, so it is the same in every retry
    /// and after every restart: functions deduplicate on it.
    pub id: uuid::Uuid,
    /// The concrete topic the message was published to.
    pub topic: String,
    /// The payload exactly as received.
    pub payload: Vec<u8>,
    /// The QoS the broker delivered it with.
    pub qos: u8,
    /// Whether the broker sent it as a retained message.
    pub retain: bool,
    /// MQTT 5 user properties and content type, when the publish carried any (boxed: most
    /// messages have none, and a message is held many times over in queues and batches).
    pub properties: Option<Box<Properties>>,
}

/// The MQTT 5 properties a message keeps (SPEC.md, "More ways in"), and where a request wants
/// its reply (`[rules.reply]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    /// User properties in the order sent; a name may repeat.
    pub user: Vec<(String, String)>,
    /// The publish's content type.
    pub content_type: Option<String>,
    /// The publish's Response Topic: where the requester wants the reply.
    pub response_topic: Option<String>,
    /// The publish's Correlation Data, returned with the reply.
    pub correlation_data: Option<Vec<u8>>,
}

impl Properties {
    /// The properties worth keeping, or `None` when there are none.
    pub fn kept(user: Vec<(String, String)>, content_type: Option<String>) -> Option<Box<Self>> {
        Self::of_request(user, content_type, None, None)
    }

    /// As [`Properties::kept`], with a request's Response Topic and Correlation Data.
    pub fn of_request(
        user: Vec<(String, String)>,
        content_type: Option<String>,
        response_topic: Option<String>,
        correlation_data: Option<Vec<u8>>,
    ) -> Option<Box<Self>> {
        let props = Properties {
            user,
            content_type,
            response_topic,
            correlation_data,
        };
        (props != Properties::default()).then(|| Box::new(props))
    }

    /// Reads back the `"properties"` object of an event entry (a dead letter replayed).
    pub fn from_json(value: &serde_json::Value) -> Option<Box<Self>> {
        let mut user = Vec::new();
        if let Some(map) = value.get("user").and_then(|u| u.as_object()) {
            for (name, v) in map {
                match v {
                    serde_json::Value::String(s) => user.push((name.clone(), s.clone())),
                    serde_json::Value::Array(values) => user.extend(
                        values
                            .iter()
                            .filter_map(|v| v.as_str())
                            .map(|s| (name.clone(), s.to_owned())),
                    ),
                    _ => {}
                }
            }
        }
        let text = |key: &str| value.get(key).and_then(|c| c.as_str()).map(str::to_owned);
        let correlation_data = text("correlation_data_base64")
            .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok());
        Self::of_request(
            user,
            text("content_type"),
            text("response_topic"),
            correlation_data,
        )
    }
}

/// Orders ids created within the same millisecond.
static ID_CONTEXT: std::sync::Mutex<IdContext> = std::sync::Mutex::new(IdContext {
    last_ms: 0,
    counter: 0,
});

/// The counter that orders ids within a millisecond: 42 bits (RFC 9562 method 1, as uuid's
/// `ContextV7`), seeded at random below [`ID_COUNTER_RESEED_MASK`] so it has room to count.
const ID_COUNTER_MAX: u64 = u64::MAX >> 22;
const ID_COUNTER_RESEED_MASK: u64 = u64::MAX >> 23;

/// The state of id generation: UUIDv7 as uuid's `ContextV7` makes them (48-bit milliseconds,
/// a 42-bit counter reseeded at random each new millisecond and counting up within one, then
/// 32 random bits). The random bits come from fastrand (a generator seeded once per thread)
/// rather than from the OS per id as uuid's `now_v7` does: one `getrandom` system call per
/// message was 4% of the bridge's CPU under a backlog. They make ids unique, not secret.
struct IdContext {
    /// Milliseconds of the latest stamp; a stamp never goes below it (but see the clock jump
    /// in [`Message::received`]).
    last_ms: u64,
    /// The counter of the latest id.
    counter: u64,
}

impl IdContext {
    /// The next id for a message received at `ms`.
    fn next(&mut self, ms: u64) -> uuid::Uuid {
        if ms > self.last_ms {
            self.last_ms = ms;
            self.counter = self.random_u64() & ID_COUNTER_RESEED_MASK;
        } else {
            // The same millisecond, or a clock stepped back a little: count on from the last
            // stamp so ids stay in order.
            self.counter += 1;
            if self.counter > ID_COUNTER_MAX {
                self.last_ms += 1;
                self.counter = self.random_u64() & ID_COUNTER_RESEED_MASK;
            }
        }
        let random = self.random_u64() as u32;
        // The counter's top 12 bits are rand_a, its low 30 bits start rand_b (after the 2
        // variant bits, which the builder sets), then 32 random bits.
        let counter = self.counter;
        let spread = (counter & ((1 << 30) - 1)) | ((counter >> 30) << 32);
        let bits = (u128::from(spread) << 80) | (u128::from(random) << 48);
        let mut bytes = [0u8; 10];
        bytes.copy_from_slice(&bits.to_be_bytes()[..10]);
        uuid::Builder::from_unix_timestamp_millis(self.last_ms, &bytes).into_uuid()
    }

    fn random_u64(&mut self) -> u64 {
        fastrand::u64(..)
    }
}

impl Message {
    /// A message received at `now`, with a fresh time-ordered id (UUIDv7) that carries `now`:
    /// the id's timestamp *is* `received_at`, so it is stored once.
    pub fn received(
        topic: String,
        payload: Vec<u8>,
        qos: u8,
        retain: bool,
        now: SystemTime,
    ) -> Self {
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let id = {
            let mut ids = ID_CONTEXT.lock().unwrap_or_else(|p| p.into_inner());
            let ms = since.as_millis().min(u128::from(u64::MAX)) as u64;
            // A clock set back (not a small NTP step): stamp the time it reads now. Otherwise
            // every id would carry the time before the jump until the clock caught up, so an
            // hour of messages would share one received_at (and min_interval would drop
            // them). Order does not suffer: the queue orders by sequence number.
            if ms.saturating_add(crate::core::clock::JUMP_THRESHOLD.as_millis() as u64)
                < ids.last_ms
            {
                ids.last_ms = 0;
            }
            ids.next(ms)
        };
        Message {
            id,
            topic,
            payload,
            qos,
            retain,
            properties: None,
        }
    }

    /// The same message without a request's Response Topic and Correlation Data: they are
    /// kept only for rules that reply, so other rules' events and buffers stay as they were.
    pub fn without_reply_fields(mut self) -> Self {
        let Some(p) = self.properties.as_deref_mut() else {
            return self;
        };
        if p.response_topic.is_none() && p.correlation_data.is_none() {
            // The common case under ingest: nothing to drop, nothing to rebuild.
            return self;
        }
        p.response_topic = None;
        p.correlation_data = None;
        if p.user.is_empty() && p.content_type.is_none() {
            self.properties = None;
        }
        self
    }

    /// The same message carrying `properties`.
    pub fn with_properties(mut self, properties: Option<Box<Properties>>) -> Self {
        self.properties = properties;
        self
    }

    /// Milliseconds since the Unix epoch at receipt, from the id (0 for an id that is not v7).
    pub fn received_at_ms(&self) -> u64 {
        self.id.get_timestamp().map_or(0, |ts| {
            let (secs, nanos) = ts.to_unix();
            secs * 1000 + u64::from(nanos / 1_000_000)
        })
    }

    /// `received_at` as RFC 3339 with milliseconds, UTC: `2026-11-27T10:15:30.123Z`.
    pub fn received_at(&self) -> String {
        let mut out = Vec::new();
        write_rfc3339_millis(&mut out, self.received_at_ms());
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Bytes the JSON around the messages takes at most: `{"rule":"…","messages":[]}` plus a rule
/// name; used to decide whether one more message still fits under Lambda's limit.
pub fn envelope_overhead(rule: &str) -> usize {
    r#"{"rule":,"messages":[]}"#.len() + json_string_len(rule)
}

/// The encoded size of one message inside `messages[]`, comma included.
pub fn encoded_message_len(message: &Message) -> usize {
    let mut buf = Vec::new();
    write_message(&mut buf, message);
    buf.len() + 1
}

/// Encodes the event for `rule` carrying `messages`, in order.
pub fn encode_event(rule: &str, messages: &[Message]) -> Vec<u8> {
    let mut encoded = Vec::with_capacity(
        messages
            .iter()
            .map(|m| m.payload.len() * 4 / 3 + m.topic.len() + 160)
            .sum::<usize>(),
    );
    for (i, message) in messages.iter().enumerate() {
        if i > 0 {
            encoded.push(b',');
        }
        write_message(&mut encoded, message);
    }
    event_from_encoded(rule, &encoded)
}

/// Appends one message as it appears inside `messages[]`; join several with `,` and wrap them
/// with [`event_from_encoded`].
pub fn encode_message(message: &Message, out: &mut Vec<u8>) {
    write_message(out, message);
}

/// The event for `rule` around messages already encoded and joined with `,`.
pub fn event_from_encoded(rule: &str, messages: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(envelope_overhead(rule) + messages.len());
    out.extend_from_slice(b"{\"rule\":");
    write_json_string(&mut out, rule);
    out.extend_from_slice(b",\"messages\":[");
    out.extend_from_slice(messages);
    out.extend_from_slice(b"]}");
    out
}

fn write_message(out: &mut Vec<u8>, m: &Message) {
    out.extend_from_slice(b"{\"id\":\"");
    let mut id = uuid::Uuid::encode_buffer();
    out.extend_from_slice(m.id.hyphenated().encode_lower(&mut id).as_bytes());
    out.push(b'"');
    out.extend_from_slice(b",\"topic\":");
    write_json_string(out, &m.topic);
    match classify_payload(&m.payload) {
        Payload::Json => {
            out.extend_from_slice(b",\"payload\":");
            out.extend_from_slice(trim_json(&m.payload));
        }
        Payload::Text(text) => {
            out.extend_from_slice(b",\"payload\":");
            write_json_string(out, text);
        }
        Payload::Binary => {
            out.extend_from_slice(b",\"payload_base64\":\"");
            out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(&m.payload)
                    .as_bytes(),
            );
            out.push(b'"');
        }
    }
    if let Some(properties) = &m.properties {
        write_properties(out, properties);
    }
    out.extend_from_slice(b",\"qos\":");
    push_number(out, u64::from(m.qos), 1);
    out.extend_from_slice(if m.retain {
        b",\"retain\":true"
    } else {
        b",\"retain\":false"
    });
    out.extend_from_slice(b",\"received_at\":\"");
    write_rfc3339_millis(out, m.received_at_ms());
    out.extend_from_slice(b"\"}");
}

/// `ms` since the Unix epoch as RFC 3339 with milliseconds, UTC (`2026-11-27T10:15:30.123Z`),
/// as `humantime::format_rfc3339_millis` writes it, without going through `fmt` (this runs
/// once per message delivered). Past year 9999 (a clock set that far) the year has five
/// digits, where humantime would fail.
fn write_rfc3339_millis(out: &mut Vec<u8>, ms: u64) {
    let secs = ms / 1000;
    let (days, day_secs) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's days_from_civil, inverted),
    // in a calendar of 400-year eras that start on 1 March.
    let z = days + 719_468;
    let (era, day_of_era) = (z / 146_097, z % 146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    push_number(out, year, 4);
    out.push(b'-');
    push_number(out, month, 2);
    out.push(b'-');
    push_number(out, day, 2);
    out.push(b'T');
    push_number(out, day_secs / 3_600, 2);
    out.push(b':');
    push_number(out, day_secs % 3_600 / 60, 2);
    out.push(b':');
    push_number(out, day_secs % 60, 2);
    out.push(b'.');
    push_number(out, ms % 1000, 3);
    out.push(b'Z');
}

/// `value` in decimal, zero-padded to at least `width` digits.
fn push_number(out: &mut Vec<u8>, value: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut at = digits.len();
    let mut rest = value;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let start = at.min(digits.len().saturating_sub(width));
    out.extend_from_slice(&digits[start..]);
}

/// `,"properties":{...}` with only the parts present.
fn write_properties(out: &mut Vec<u8>, p: &Properties) {
    out.extend_from_slice(b",\"properties\":{");
    let mut first = true;
    if !p.user.is_empty() {
        out.extend_from_slice(b"\"user\":{");
        // Names in first-seen order, each with all its values.
        let mut names: Vec<&str> = Vec::new();
        for (name, _) in &p.user {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
        for (i, name) in names.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_json_string(out, name);
            out.push(b':');
            let values: Vec<&str> = p
                .user
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
                .collect();
            match values.as_slice() {
                [one] => write_json_string(out, one),
                many => {
                    out.push(b'[');
                    for (j, v) in many.iter().enumerate() {
                        if j > 0 {
                            out.push(b',');
                        }
                        write_json_string(out, v);
                    }
                    out.push(b']');
                }
            }
        }
        out.push(b'}');
        first = false;
    }
    let mut field = |out: &mut Vec<u8>, name: &[u8], value: &str| {
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(name);
        write_json_string(out, value);
    };
    if let Some(content_type) = &p.content_type {
        field(out, b"\"content_type\":", content_type);
    }
    if let Some(topic) = &p.response_topic {
        field(out, b"\"response_topic\":", topic);
    }
    if let Some(data) = &p.correlation_data {
        let b64 = base64::engine::general_purpose::STANDARD.encode(data);
        field(out, b"\"correlation_data_base64\":", &b64);
    }
    out.push(b'}');
}

enum Payload<'a> {
    Json,
    Text(&'a str),
    Binary,
}

fn classify_payload(payload: &[u8]) -> Payload<'_> {
    match std::str::from_utf8(payload) {
        Err(_) => Payload::Binary,
        Ok(text) => {
            if !text.trim().is_empty()
                && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
            {
                Payload::Json
            } else {
                Payload::Text(text)
            }
        }
    }
}

/// JSON with surrounding whitespace removed, so the event stays compact.
fn trim_json(payload: &[u8]) -> &[u8] {
    let is_ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let start = payload
        .iter()
        .position(|b| !is_ws(b))
        .unwrap_or(payload.len());
    let end = payload
        .iter()
        .rposition(|b| !is_ws(b))
        .map_or(start, |i| i + 1);
    &payload[start..end]
}

fn write_json_string(out: &mut Vec<u8>, s: &str) {
    // serde_json's string escaping cannot fail when writing to a Vec.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn json_string_len(s: &str) -> usize {
    let mut buf = Vec::new();
    write_json_string(&mut buf, s);
    buf.len()
}

/// Position of a message in its rule's queue (`crate::buffer`); grows by one per appended message.
pub type Seq = u64;

/// A message read from a queue, with the position to acknowledge it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Acknowledge through this to release the message.
    pub seq: Seq,
    /// The message itself.
    pub message: Message,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};
    use std::time::Duration;

    #[test]
    fn after_the_clock_is_set_back_received_at_is_the_time_it_reads() {
        // An hour apart, at a time no other test uses (tests share the id context).
        let t0 = 1_955_000_000_000u64;
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        let before = Message::received("t".into(), vec![], 1, false, at(t0));
        let after = Message::received("t".into(), vec![], 1, false, at(t0 - 3_600_000));
        assert_eq!(before.received_at_ms(), t0);
        assert_eq!(after.received_at_ms(), t0 - 3_600_000);
    }

    fn msg(payload: &[u8]) -> Message {
        let mut m = Message::received(
            "sensors/dev1/temperature".into(),
            payload.to_vec(),
            1,
            false,
            UNIX_EPOCH + Duration::from_millis(1_795_774_530_123),
        );
        // A fixed id with that same timestamp, for exact comparisons.
        let mut bytes = *m.id.as_bytes();
        bytes[6..].copy_from_slice(&[0x70, 0, 0x80, 0, 0, 0, 0, 0, 0, 1]);
        m.id = uuid::Uuid::from_bytes(bytes);
        m
    }

    fn event(payloads: &[&[u8]]) -> Value {
        let messages: Vec<Message> = payloads.iter().map(|p| msg(p)).collect();
        serde_json::from_slice(&encode_event("temperature", &messages)).expect("valid JSON")
    }

    #[test]
    fn json_payload_travels_as_json() {
        let e = event(&[br#" {"c": 21.5} "#]);
        assert_eq!(
            e,
            json!({
                "rule": "temperature",
                "messages": [{
                    "id": "01a21c80-c24b-7000-8000-000000000001",
                    "topic": "sensors/dev1/temperature",
                    "payload": {"c": 21.5},
                    "qos": 1,
                    "retain": false,
                    "received_at": "2026-11-27T10:15:30.123Z"
                }]
            })
        );
    }

    #[test]
    fn text_empty_and_binary_payloads() {
        let e = event(&[b"21.5 C", b"", &[0xff, 0x00, 0x10], b"42", b"  "]);
        let m = &e["messages"];
        assert_eq!(m[0]["payload"], json!("21.5 C"));
        assert_eq!(m[1]["payload"], json!(""));
        assert_eq!(m[2]["payload_base64"], json!("/wAQ"));
        assert!(m[2].get("payload").is_none());
        assert_eq!(m[3]["payload"], json!(42));
        assert_eq!(m[4]["payload"], json!("  "));
    }

    #[test]
    fn strings_are_escaped() {
        let mut m = msg(b"say \"hi\"\n");
        m.topic = "a/\"b\"".into();
        let e: Value = serde_json::from_slice(&encode_event("r\"1", &[m])).expect("valid JSON");
        assert_eq!(e["rule"], json!("r\"1"));
        assert_eq!(e["messages"][0]["topic"], json!("a/\"b\""));
        assert_eq!(e["messages"][0]["payload"], json!("say \"hi\"\n"));
    }

    #[test]
    fn sizes_add_up_to_the_encoded_event() {
        let messages = vec![msg(b"{}"), msg(b"text"), msg(&[0xfe; 10])];
        let predicted = envelope_overhead("temperature")
            + messages.iter().map(encoded_message_len).sum::<usize>()
            - 1;
        assert_eq!(predicted, encode_event("temperature", &messages).len());
    }

    #[test]
    fn a_request_s_reply_fields_travel_in_properties_and_only_for_rules_that_reply() {
        let request = msg(b"1").with_properties(Properties::of_request(
            vec![],
            None,
            Some("dev/1/answers".into()),
            Some(vec![0, 1, 2]),
        ));
        let event: serde_json::Value =
            serde_json::from_slice(&encode_event("r", std::slice::from_ref(&request)))
                .expect("json");
        let props = &event["messages"][0]["properties"];
        assert_eq!(props["response_topic"], "dev/1/answers");
        assert_eq!(props["correlation_data_base64"], "AAEC");
        assert_eq!(Properties::from_json(props), request.properties);
        // A rule that does not reply keeps neither, nor an empty "properties".
        let plain = request.without_reply_fields();
        assert_eq!(plain.properties, None);
        let kept = msg(b"1")
            .with_properties(Properties::of_request(
                vec![("k".into(), "v".into())],
                None,
                Some("t".into()),
                None,
            ))
            .without_reply_fields();
        assert_eq!(
            kept.properties,
            Properties::kept(vec![("k".into(), "v".into())], None)
        );
    }

    #[test]
    fn properties_appear_only_when_present_and_repeated_names_become_arrays() {
        let plain = event(&[b"1"]);
        assert!(plain["messages"][0].get("properties").is_none());

        let user = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<Vec<_>>()
        };
        let with = |props| {
            let m = msg(b"1").with_properties(props);
            let e: Value = serde_json::from_slice(&encode_event("r", std::slice::from_ref(&m)))
                .expect("valid JSON");
            let sizes = envelope_overhead("r") + encoded_message_len(&m) - 1;
            assert_eq!(sizes, encode_event("r", &[m]).len());
            e["messages"][0]["properties"].clone()
        };
        let both = Properties::kept(
            user(&[
                ("site", "north"),
                ("tag", "a"),
                ("line", "3"),
                ("tag", "b\""),
            ]),
            Some("application/json".into()),
        );
        assert_eq!(
            with(both.clone()),
            json!({
                "user": {"site": "north", "tag": ["a", "b\""], "line": "3"},
                "content_type": "application/json"
            })
        );
        assert_eq!(
            with(Properties::kept(vec![], Some("text/plain".into()))),
            json!({"content_type": "text/plain"})
        );
        assert_eq!(
            with(Properties::kept(user(&[("k", "v")]), None)),
            json!({"user": {"k": "v"}})
        );
        assert!(Properties::kept(vec![], None).is_none());
        // Read back from an event (a replayed dead letter): the same values, names grouped.
        let back = Properties::from_json(&with(both)).expect("properties");
        assert_eq!(back.content_type.as_deref(), Some("application/json"));
        assert_eq!(back.user.len(), 4);
        assert!(back.user.contains(&("tag".into(), "b\"".into())));
    }

    #[test]
    fn ids_keep_order_within_a_millisecond_and_across_a_full_counter() {
        // A context of its own: other tests stamp the shared one at other times.
        let mut ids = IdContext {
            last_ms: 0,
            counter: 0,
        };
        let t = 1_960_000_000_000u64;
        let mut made: Vec<uuid::Uuid> = (0..2_000).map(|_| ids.next(t)).collect();
        ids.counter = ID_COUNTER_MAX;
        made.push(ids.next(t));
        assert!(made.windows(2).all(|w| w[0] < w[1]), "ids out of order");
        for id in &made {
            assert_eq!(id.get_version_num(), 7);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        }
        let stamp = |id: &uuid::Uuid| {
            let (secs, nanos) = id.get_timestamp().expect("v7").to_unix();
            secs * 1000 + u64::from(nanos / 1_000_000)
        };
        assert_eq!(stamp(&made[0]), t);
        // A full counter moves the stamp on by a millisecond rather than wrap.
        assert_eq!(stamp(&made[2_000]), t + 1);
        // The low 32 bits are random: no two alike among 2,000 (a collision is ~1 in 2,000).
        let low: std::collections::HashSet<[u8; 4]> = made
            .iter()
            .map(|id| id.as_bytes()[12..].try_into().expect("4 bytes"))
            .collect();
        assert!(low.len() >= 1_990, "{} distinct", low.len());
    }

    /// The first millisecond of year 10000, past what humantime writes.
    const YEAR_10000_MS: u64 = 253_402_300_800_000;

    #[test]
    fn received_at_is_written_as_humantime_writes_it() {
        // Leap days, month and year ends, the epoch, and a spread of times up to year 9999.
        let mut samples: Vec<u64> = vec![
            0,
            951_782_400_000,   // 2000-02-29
            951_868_799_999,   // 2000-02-29T23:59:59.999
            4_107_542_400_000, // 2100-03-01
            1_798_761_599_999, // 2026-12-31T23:59:59.999
            YEAR_10000_MS - 1, // 9999-12-31T23:59:59.999
        ];
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..20_000 {
            // xorshift: spread over 1970–9999
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            samples.push(x % YEAR_10000_MS);
        }
        for ms in samples {
            let mut ours = Vec::new();
            write_rfc3339_millis(&mut ours, ms);
            let theirs = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms))
                .to_string();
            assert_eq!(String::from_utf8(ours).expect("utf-8"), theirs, "{ms}");
        }
        let mut far = Vec::new();
        write_rfc3339_millis(&mut far, YEAR_10000_MS);
        assert_eq!(far, b"10000-01-01T00:00:00.000Z");
        let mut qos = Vec::new();
        push_number(&mut qos, 2, 1);
        push_number(&mut qos, 123, 1);
        push_number(&mut qos, 7, 3);
        assert_eq!(qos, b"2123007");
    }

    #[test]
    fn ids_are_unique_and_time_ordered() {
        let now = SystemTime::now();
        let a = Message::received("t".into(), vec![], 1, false, now);
        let b = Message::received("t".into(), vec![], 1, false, now);
        assert_ne!(a.id, b.id);
        assert!(a.id < b.id);
    }
}
