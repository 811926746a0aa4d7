//! What a reload changes, pure: compares the configuration in force with the file just loaded
//! and says which rules are added, changed and removed, which subscriptions to add or drop,
//! and which settings changed that only a restart applies.
//!
//! Invariants:
//! - Rules are compared by name; two rules of the same name differ exactly when one of their
//!   settings does.
//! - A filter is dropped only when no rule of the file uses it any more, and subscribed again
//!   when a rule asks it with a higher QoS than any rule in force.
//! - Every setting read once at start is compared ([`restart_settings`]): a change is reported
//!   by key and the value in force stays ([`effective`]).

use std::path::PathBuf;

use crate::core::config::{Config, RuleConfig};

/// What changed between the configuration in force and the file. Pure data.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Diff {
    /// Rules only in the file, in file order.
    pub added: Vec<String>,
    /// Rules in both with different settings, in file order.
    pub changed: Vec<String>,
    /// Rules only in force, in their order.
    pub removed: Vec<String>,
    /// Filters to subscribe (new, or asked with a higher QoS), with their QoS.
    pub subscribe: Vec<(String, u8)>,
    /// Filters no rule of the file uses any more.
    pub unsubscribe: Vec<String>,
    /// Keys whose new value only a restart applies; the value in force stays.
    pub needs_restart: Vec<&'static str>,
}

impl Diff {
    /// Whether the file changes nothing a reload applies.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// Settings read once at start: their key and their value as text, to compare. Add a key here
/// when a section is added to the configuration (`metrics.listen`, …).
fn restart_settings(config: &Config) -> Vec<(&'static str, String)> {
    let (mqtt, aws, buffer) = (&config.mqtt, &config.aws, &config.buffer);
    let tls = mqtt.tls.clone().unwrap_or_default();
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    vec![
        ("shutdown_timeout", format!("{:?}", config.shutdown_timeout)),
        ("mqtt.url", mqtt.url.clone()),
        ("mqtt.client_id", mqtt.client_id.clone()),
        ("mqtt.clean_start", mqtt.clean_start.to_string()),
        ("mqtt.keep_alive", format!("{:?}", mqtt.keep_alive)),
        ("mqtt.protocol", format!("{:?}", mqtt.protocol)),
        ("mqtt.session_expiry", format!("{:?}", mqtt.session_expiry)),
        (
            "mqtt.receive_maximum",
            format!("{:?}", mqtt.receive_maximum),
        ),
        ("mqtt.username", format!("{:?}", mqtt.username)),
        // Compared, never logged.
        (
            "mqtt.password",
            format!("{:?}", mqtt.password.as_ref().map(|p| p.expose())),
        ),
        (
            "mqtt.password_file",
            format!("{:?}", path(&mqtt.password_file)),
        ),
        ("mqtt.tls.ca_file", format!("{:?}", path(&tls.ca_file))),
        ("mqtt.tls.cert_file", format!("{:?}", path(&tls.cert_file))),
        ("mqtt.tls.key_file", format!("{:?}", path(&tls.key_file))),
        ("aws.region", format!("{:?}", aws.region)),
        ("aws.endpoint_url", format!("{:?}", aws.endpoint_url)),
        ("aws.profile", format!("{:?}", aws.profile)),
        ("aws.connect_timeout", format!("{:?}", aws.connect_timeout)),
        (
            "aws.operation_timeout",
            format!("{:?}", aws.operation_timeout),
        ),
        ("aws.max_concurrency", aws.max_concurrency.to_string()),
        ("aws.iot", format!("{:?}", aws.iot)),
        (
            "metrics.listen",
            format!("{:?}", config.metrics.as_ref().map(|m| &m.listen)),
        ),
        (
            "telemetry.topic",
            format!("{:?}", config.telemetry.as_ref().map(|t| &t.topic)),
        ),
        (
            "telemetry.interval",
            format!("{:?}", config.telemetry.as_ref().map(|t| t.interval)),
        ),
        ("http.listen", format!("{:?}", config.http.listen)),
        (
            "http.token_file",
            format!("{:?}", path(&config.http.token_file)),
        ),
        ("http.max_body", config.http.max_body.0.to_string()),
        (
            "http.read_timeout",
            format!("{:?}", config.http.read_timeout),
        ),
        (
            "http.cert_file",
            format!("{:?}", path(&config.http.cert_file)),
        ),
        (
            "http.key_file",
            format!("{:?}", path(&config.http.key_file)),
        ),
        ("buffer.dir", buffer.dir.display().to_string()),
        ("buffer.max_size", buffer.max_size.0.to_string()),
        ("buffer.when_full", format!("{:?}", buffer.when_full)),
        ("buffer.max_age", format!("{:?}", buffer.max_age)),
        ("buffer.segment_size", buffer.segment_size.0.to_string()),
        (
            "buffer.max_ack_delay",
            format!("{:?}", buffer.max_ack_delay),
        ),
    ]
}

/// Whether two rules of the same name do the same thing. Every field of a rule is plain data
/// whose `Debug` text differs exactly when its value does (no secrets, no maps).
fn same_rule(a: &RuleConfig, b: &RuleConfig) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

/// Each filter once, with the highest QoS a rule asks of it, in rule order.
fn filters(rules: &[RuleConfig]) -> Vec<(String, u8)> {
    let mut out: Vec<(String, u8)> = Vec::new();
    for rule in rules {
        match out.iter_mut().find(|(f, _)| *f == rule.topic) {
            Some((_, qos)) => *qos = (*qos).max(rule.qos),
            None => out.push((rule.topic.clone(), rule.qos)),
        }
    }
    out
}

/// Compares the configuration in force with the one just loaded.
pub fn diff(running: &Config, file: &Config) -> Diff {
    let by_name = |rules: &[RuleConfig], name: &str| rules.iter().position(|r| r.name == name);
    let mut d = Diff::default();
    for rule in &file.rules {
        match by_name(&running.rules, &rule.name) {
            None => d.added.push(rule.name.clone()),
            Some(i) if !same_rule(&running.rules[i], rule) => d.changed.push(rule.name.clone()),
            Some(_) => {}
        }
    }
    d.removed = running
        .rules
        .iter()
        .filter(|r| by_name(&file.rules, &r.name).is_none())
        .map(|r| r.name.clone())
        .collect();
    let (before, after) = (filters(&running.rules), filters(&file.rules));
    d.subscribe = after
        .iter()
        .filter(|(f, qos)| !before.iter().any(|(g, q)| g == f && q >= qos))
        .cloned()
        .collect();
    d.unsubscribe = before
        .iter()
        .filter(|(f, _)| !after.iter().any(|(g, _)| g == f))
        .map(|(f, _)| f.clone())
        .collect();
    let (old, new) = (restart_settings(running), restart_settings(file));
    d.needs_restart = old
        .iter()
        .zip(&new)
        .filter(|((_, a), (_, b))| a != b)
        .map(|((key, _), _)| *key)
        .collect();
    d
}

/// The configuration to run after a reload: the file's rules, and every setting that needs a
/// restart as it is in force.
pub fn effective(running: &Config, file: Config) -> Config {
    Config {
        rules: file.rules,
        ..running.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Env;
    use std::path::Path;

    fn config(extra: &str, rules: &[(&str, &str, &str)]) -> Config {
        let mut text =
            format!("[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\nclient_id = \"gw\"\n{extra}\n");
        for (name, topic, function) in rules {
            text.push_str(&format!(
                "\n[[rules]]\nname = \"{name}\"\ntopic = \"{topic}\"\nfunction = \"{function}\"\n"
            ));
        }
        Config::from_toml_str(
            &text,
            Path::new("t.toml"),
            Env::prefixed("MLB_TEST_UNUSED_"),
        )
        .expect("valid config")
    }

    #[test]
    fn an_edited_sql_statement_is_a_rule_change_and_its_from_the_subscription() {
        let sql_config = |sql: &str| {
            let text = format!(
                "[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\nclient_id = \"gw\"\n\
                 [[rules]]\nname = \"hot\"\nfunction = \"f\"\nsql = \"{sql}\"\n"
            );
            Config::from_toml_str(
                &text,
                Path::new("t.toml"),
                Env::prefixed("MLB_TEST_UNUSED_"),
            )
            .expect("valid config")
        };
        let old = sql_config("SELECT * FROM 's/+/t' WHERE t > 50");
        assert!(diff(&old, &old.clone()).is_empty());
        let d = diff(&old, &sql_config("SELECT * FROM 's/+/t' WHERE t > 60"));
        assert_eq!(d.changed, vec!["hot"]);
        assert!(d.subscribe.is_empty() && d.unsubscribe.is_empty(), "{d:?}");
        let d = diff(&old, &sql_config("SELECT * FROM 's/#' WHERE t > 50"));
        assert_eq!(d.changed, vec!["hot"]);
        assert_eq!(d.subscribe, vec![("s/#".to_owned(), 1)]);
        assert_eq!(d.unsubscribe, vec!["s/+/t"]);
    }

    #[test]
    fn the_same_file_changes_nothing() {
        let a = config("", &[("a", "s/+/t", "f"), ("b", "s/+/h", "g")]);
        let d = diff(&a, &a.clone());
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(d, Diff::default());
    }

    #[test]
    fn rules_are_added_changed_and_removed_by_name() {
        let old = config(
            "",
            &[("a", "s/+/t", "f"), ("b", "s/+/h", "g"), ("c", "x/#", "h")],
        );
        let new = config(
            "",
            &[("a", "s/+/t", "f2"), ("c", "x/#", "h"), ("d", "y/#", "k")],
        );
        let d = diff(&old, &new);
        assert_eq!(d.added, vec!["d"]);
        assert_eq!(d.changed, vec!["a"]);
        assert_eq!(d.removed, vec!["b"]);
        assert_eq!(d.subscribe, vec![("y/#".to_owned(), 1)]);
        assert_eq!(d.unsubscribe, vec!["s/+/h"]);
        assert!(d.needs_restart.is_empty());
    }

    #[test]
    fn a_filter_is_dropped_only_when_no_rule_uses_it_any_more() {
        let old = config("", &[("a", "s/#", "f"), ("b", "s/#", "g")]);
        let new = config("", &[("b", "s/#", "g")]);
        let d = diff(&old, &new);
        assert_eq!(d.removed, vec!["a"]);
        assert!(d.unsubscribe.is_empty(), "b still uses s/#: {d:?}");
        assert!(d.subscribe.is_empty());
    }

    #[test]
    fn a_changed_topic_subscribes_the_new_filter_and_drops_the_old() {
        let old = config("", &[("a", "s/+/t", "f")]);
        let new = config("", &[("a", "s/+/temp", "f")]);
        let d = diff(&old, &new);
        assert_eq!(d.changed, vec!["a"]);
        assert_eq!(d.subscribe, vec![("s/+/temp".to_owned(), 1)]);
        assert_eq!(d.unsubscribe, vec!["s/+/t"]);
    }

    #[test]
    fn a_higher_qos_on_a_filter_subscribes_it_again() {
        let old = config("", &[("a", "s/#", "f")]);
        let mut new = old.clone();
        new.rules[0].qos = 2;
        let d = diff(&old, &new);
        assert_eq!(d.changed, vec!["a"]);
        assert_eq!(d.subscribe, vec![("s/#".to_owned(), 2)]);
        assert!(d.unsubscribe.is_empty());
    }

    #[test]
    fn batching_and_pacing_changes_are_rule_changes() {
        let old = config("", &[("a", "s/#", "f")]);
        let mut new = old.clone();
        new.rules[0].max_concurrency = Some(4);
        assert_eq!(diff(&old, &new).changed, vec!["a"]);
    }

    #[test]
    fn start_time_settings_are_reported_by_key_and_kept() {
        let old = config("", &[("a", "s/#", "f")]);
        let new = config(
            "keep_alive = \"10s\"\nusername = \"u\"\npassword = \"hunter2\"\n[aws]\nregion = \"eu-west-1\"\n[buffer]\nmax_size = \"1MiB\"",
            &[("a", "s/#", "f"), ("b", "t/#", "g")],
        );
        let d = diff(&old, &new);
        assert_eq!(
            d.needs_restart,
            vec![
                "mqtt.keep_alive",
                "mqtt.username",
                "mqtt.password",
                "aws.region",
                "buffer.max_size"
            ]
        );
        assert_eq!(d.added, vec!["b"]);
        let running = effective(&old, new);
        assert_eq!(running.rules.len(), 2, "the file's rules");
        assert_eq!(running.aws.region, None, "the value in force stays");
        assert_eq!(running.buffer.max_size, old.buffer.max_size);
        assert!(diff(&running, &running.clone()).needs_restart.is_empty());
    }

    #[test]
    fn http_settings_need_a_restart() {
        let old = config("", &[("a", "s/#", "f")]);
        let new = config(
            "[http]\nlisten = \"127.0.0.1:8080\"\nmax_body = \"1KiB\"",
            &[("a", "s/#", "f")],
        );
        assert_eq!(
            diff(&old, &new).needs_restart,
            vec!["http.listen", "http.max_body"]
        );
        assert_eq!(effective(&old, new).http.listen, None);
    }

    #[test]
    fn telemetry_settings_need_a_restart() {
        let old = config("", &[("a", "s/#", "f")]);
        let new = config(
            "[telemetry]
topic = \"gw/health\"
interval = \"5s\"",
            &[("a", "s/#", "f")],
        );
        assert_eq!(
            diff(&old, &new).needs_restart,
            vec!["telemetry.topic", "telemetry.interval"]
        );
        assert!(effective(&old, new).telemetry.is_none());
    }
}
