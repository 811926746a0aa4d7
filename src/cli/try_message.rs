//! `try`: what each rule would do with one message, without a broker, a buffer or AWS. The
//! message goes through the code the daemon runs: ingest's matching, SQL and size decision
//! (`Routes::admit`), then delivery's forming of events (throttle, batch or window:
//! `shaping::batch::Former`), as if it were the only message the rule received. Rules it does
//! not match are not listed.

use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::buffer::MemoryQueue;
use crate::buffer::deadletter::DeadLetters;
use crate::core::config::Config;
use crate::core::envelope::Entry;
use crate::core::stats::RuleStats;
use crate::ingest::routes::{Received, Routes};
use crate::rule::Route;
use crate::shaping::batch::{Former, Now};
use crate::shaping::plan::RulePlan;

/// What one rule the message matches would do with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Its function would be invoked with `event` (compact JSON, as sent): `limit` is the
    /// invocation type's payload limit.
    Invoke {
        /// The event, as Lambda would receive it.
        event: Vec<u8>,
        /// Lambda's payload limit for the rule's invocation type, in bytes.
        limit: u64,
    },
    /// The rule's SQL WHERE does not keep it: this condition, as written, is not true.
    Filtered(String),
    /// Its event alone would be over Lambda's limit: it would go to the dead-letter store.
    TooLarge {
        /// The event's size, in bytes.
        size: usize,
        /// Lambda's payload limit for the rule's invocation type, in bytes.
        limit: u64,
    },
}

impl Verdict {
    /// Whether the rule's function would be invoked.
    pub fn invokes(&self) -> bool {
        matches!(self, Verdict::Invoke { .. })
    }
}

/// Per rule the message on `topic` matches (in rule order): the rule's name and its verdict.
pub fn try_message(
    config: &Config,
    topic: &str,
    payload: Vec<u8>,
    now: SystemTime,
) -> Vec<(String, Verdict)> {
    let routes: Vec<Arc<Route<MemoryQueue>>> = config
        .rules
        .iter()
        .map(|rule| {
            Arc::new(Route {
                plan: Arc::new(RulePlan::from_config(rule)),
                filter: rule.topic.clone(),
                qos: rule.qos,
                queue: Arc::new(MemoryQueue::new(1)),
                stats: Arc::default(),
                // Never written: `try` only admits, it does not store.
                dead_letters: DeadLetters::new(Path::new("/nonexistent")),
            })
        })
        .collect();
    let routes = Routes::new(routes);
    let received = Received {
        topic: topic.to_owned(),
        payload,
        qos: 1,
        retain: false,
        properties: None,
    };
    let admission = routes.admit([received], now);
    let plans: Vec<Arc<RulePlan>> = routes.iter().map(|r| r.plan.clone()).collect();
    let mut verdicts: Vec<(usize, Verdict)> = Vec::new();
    for (i, _, condition) in &admission.filtered {
        let text = plans[*i]
            .sql
            .as_ref()
            .map_or("", |s| s.condition(*condition));
        verdicts.push((*i, Verdict::Filtered(text.to_owned())));
    }
    for (i, _, size) in &admission.set_aside {
        let limit = plans[*i].invocation.payload_limit();
        verdicts.push((*i, Verdict::TooLarge { size: *size, limit }));
    }
    for (i, messages) in admission.append.into_iter().enumerate() {
        let plan = &plans[i];
        if let Some(event) = form_event(plan, messages, now) {
            let limit = plan.invocation.payload_limit();
            verdicts.push((i, Verdict::Invoke { event, limit }));
        }
    }
    verdicts.sort_by_key(|(i, _)| *i);
    verdicts
        .into_iter()
        .map(|(i, verdict)| (plans[i].name.clone(), verdict))
        .collect()
}

/// The event the rule's delivery would form of `messages` alone (its batch or window closed
/// at once, a held throttle message released).
fn form_event(
    plan: &Arc<RulePlan>,
    messages: Vec<crate::core::envelope::Message>,
    now: SystemTime,
) -> Option<Vec<u8>> {
    if messages.is_empty() {
        return None;
    }
    let wall_ms = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let now = Now {
        at: Instant::now(),
        wall_ms,
    };
    let mut former = Former::new(plan.clone(), Arc::new(RuleStats::default()));
    for (seq, message) in (0..).zip(messages) {
        former.push(Entry { seq, message }, now);
    }
    former.flush(now);
    former.take_ready().map(|unit| unit.payload)
}

/// Indents a JSON document two spaces per level, keeping its keys in the order they were
/// written (a `serde_json::Value` would sort them, and `try` shows the event as sent).
/// Whitespace outside strings is dropped first; the text of strings is kept as is.
pub fn pretty(json: &[u8]) -> String {
    let text = String::from_utf8_lossy(json);
    let mut out = String::with_capacity(text.len() * 2);
    let mut depth = 0usize;
    let (mut in_string, mut escaped) = (false, false);
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.extend(std::iter::repeat_n("  ", depth));
    };
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                while chars.peek().is_some_and(|c| c.is_whitespace()) {
                    chars.next();
                }
                if matches!(chars.peek(), Some('}' | ']')) {
                    out.extend(chars.next());
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretty_keeps_key_order_and_string_contents() {
        let json = br#"{"rule":"r","messages":[{"b":1, "a":"x, {y}: \"z\"","e":[],"o":{ }}]}"#;
        assert_eq!(
            pretty(json),
            "{\n  \"rule\": \"r\",\n  \"messages\": [\n    {\n      \"b\": 1,\n      \
             \"a\": \"x, {y}: \\\"z\\\"\",\n      \"e\": [],\n      \"o\": {}\n    }\n  ]\n}"
        );
        let value: serde_json::Value = serde_json::from_str(&pretty(json)).expect("still JSON");
        assert_eq!(value["messages"][0]["a"], "x, {y}: \"z\"");
    }
}
