//! Topic filters and the rules that own them: pure functions, no I/O.
//!
//! Matching follows MQTT 3.1.1 §4.7: `+` matches exactly one level, `#` matches the parent level
//! and everything below it, and a filter starting with a wildcard never matches a topic starting
//! with `$` (broker-internal topics such as `$SYS/...`). One message may match several rules;
//! [`RuleSet::matching`] yields each of them, and each gets its own copy downstream.
//!
//! A rule's topic may be a shared subscription, `$share/<group>/<filter>` (MQTT 5 §4.8.2;
//! mosquitto, EMQX, HiveMQ and AWS IoT Core accept it over 3.1.1 too): the SUBSCRIBE carries the
//! whole string, and the broker hands each message to one member of the group, while messages
//! arrive with their plain topic, so matching uses only `<filter>` ([`Topic::filter`]).
//!
//! Two subscriptions whose filters overlap deliver a message matching both once per
//! subscription, and the bridge (which cannot tell which subscription delivered a message under
//! 3.1.1) would hand each copy to every matching rule. For plain subscriptions that is the
//! broker's business as before; when a shared one is involved it would multiply messages across
//! the group, so [`conflict`] refuses such pairs (the same topic string in two rules is fine:
//! it is one subscription).

/// Checks a subscription filter; the error says what is wrong in words a user can act on.
pub fn validate_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("the filter is empty; write e.g. \"sensors/+/temperature\"".into());
    }
    if filter.contains('\0') {
        return Err(format!("{filter:?} contains a NUL character"));
    }
    if filter.len() > u16::MAX as usize {
        return Err("the filter is longer than MQTT allows (65535 bytes)".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != last) {
            return Err(format!(
                "'#' must be the last level, alone, got {filter:?} (e.g. \"sensors/#\")"
            ));
        }
        if level.contains('+') && *level != "+" {
            return Err(format!(
                "'+' must be a whole level, got {filter:?} (e.g. \"sensors/+/temperature\")"
            ));
        }
    }
    Ok(())
}

/// What introduces a shared subscription.
pub const SHARE_PREFIX: &str = "$share/";

/// A rule's topic as written: a plain filter or `$share/<group>/<filter>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topic<'a> {
    /// The share group, for a shared subscription.
    pub group: Option<&'a str>,
    /// The filter messages are matched against.
    pub filter: &'a str,
}

impl<'a> Topic<'a> {
    /// Splits a rule's topic; `$share/...` without a group or filter is an error.
    pub fn parse(topic: &'a str) -> Result<Topic<'a>, String> {
        let Some(rest) = topic.strip_prefix(SHARE_PREFIX) else {
            if topic == "$share" {
                return Err(share_shape(topic));
            }
            return Ok(Topic {
                group: None,
                filter: topic,
            });
        };
        let Some((group, filter)) = rest.split_once('/') else {
            return Err(share_shape(topic));
        };
        if group.is_empty() || filter.is_empty() {
            return Err(share_shape(topic));
        }
        if group.contains(['+', '#']) {
            return Err(format!(
                "{topic:?}: the share group {group:?} must not contain '+' or '#' \
                 (write e.g. \"$share/bridges/sensors/#\")"
            ));
        }
        Ok(Topic {
            group: Some(group),
            filter,
        })
    }
}

fn share_shape(topic: &str) -> String {
    format!(
        "{topic:?}: a shared subscription is \"$share/<group>/<filter>\" with a non-empty \
         group and filter, e.g. \"$share/bridges/sensors/#\""
    )
}

/// Checks a rule's topic: a valid filter, or `$share/<group>/<filter>` with both parts valid.
pub fn validate_topic(topic: &str) -> Result<(), String> {
    let parsed = Topic::parse(topic)?;
    match parsed.group {
        None => validate_filter(topic),
        Some(_) => validate_filter(parsed.filter)
            .map_err(|message| format!("in the shared subscription {topic:?}: {message}")),
    }
}

/// The filter messages are matched against: `<filter>` of `$share/<group>/<filter>`, else the
/// topic itself.
pub fn match_filter(topic: &str) -> &str {
    Topic::parse(topic).map_or(topic, |t| t.filter)
}

/// Whether some topic name matches both valid filters.
pub fn overlap(a: &str, b: &str) -> bool {
    // `+`/`#` first never match a `$` topic; a `$` literal first never matches one either.
    let dollar = |f: &str| f.starts_with('$');
    let wild = |f: &str| f.starts_with('+') || f.starts_with('#');
    if (dollar(a) && wild(b)) || (dollar(b) && wild(a)) {
        return false;
    }
    let mut a_levels = a.split('/');
    let mut b_levels = b.split('/');
    loop {
        match (a_levels.next(), b_levels.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(x), Some(y)) if x == y => {}
            _ => return false,
        }
    }
}

/// Why rule topics `a` and `b` (both valid) cannot be used together, if they cannot: different
/// subscriptions, at least one shared, whose filters overlap.
pub fn conflict(a: &str, b: &str) -> Option<String> {
    let (Ok(ta), Ok(tb)) = (Topic::parse(a), Topic::parse(b)) else {
        return None;
    };
    if a == b || (ta.group.is_none() && tb.group.is_none()) || !overlap(ta.filter, tb.filter) {
        return None;
    }
    Some(format!(
        "{b:?} and {a:?} are different subscriptions whose filters overlap, and one is shared: \
         the broker would deliver a message matching both once per subscription, and each copy \
         would go to both rules (duplicates across the share group); give both rules the same \
         topic, or filters that do not overlap"
    ))
}

/// Whether `topic` (a concrete topic name) matches the valid `filter`.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    let mut filter_levels = filter.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) if f == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The filters of every rule, in configuration order.
#[derive(Debug, Clone)]
pub struct RuleSet {
    /// `filters[i]` belongs to rule `i`.
    filters: Vec<String>,
}

impl RuleSet {
    /// Takes the rules' topics in rule order; they must already be valid. A shared
    /// subscription matches by its `<filter>`.
    pub fn new(topics: impl IntoIterator<Item = String>) -> RuleSet {
        RuleSet {
            filters: topics
                .into_iter()
                .map(|t| match_filter(&t).to_owned())
                .collect(),
        }
    }

    /// Indices of the rules whose filter matches `topic`, in configuration order.
    pub fn matching<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = usize> + 'a {
        self.filters
            .iter()
            .enumerate()
            .filter(move |(_, f)| matches(f, topic))
            .map(|(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn filters_are_validated() {
        let valid = [
            "#",
            "+",
            "a",
            "a/b",
            "a/+",
            "a/#",
            "+/+",
            "+/#",
            "/",
            "/a",
            "a/",
            "a//b",
            "$SYS/#",
            "sensors/+/temperature",
        ];
        for f in valid {
            assert_eq!(validate_filter(f), Ok(()), "{f}");
        }
        let invalid = [
            "", "a/#/b", "#/a", "a#", "a/b#", "a+", "a/+b", "++", "##", "a/#b",
        ];
        for f in invalid {
            assert!(validate_filter(f).is_err(), "{f} should be invalid");
        }
    }

    #[test]
    fn topics_match_filters_as_the_mqtt_spec_says() {
        let table = [
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/+", "a", false),
            ("a/+", "a/", true),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("a/#", "b", false),
            ("#", "a/b", true),
            ("#", "/a", true),
            ("+/+", "/a", true),
            ("+", "/a", false),
            ("sensors/+/temperature", "sensors/dev1/temperature", true),
            ("sensors/+/temperature", "sensors/dev1/humidity", false),
            ("#", "$SYS/broker", false),
            ("+/broker", "$SYS/broker", false),
            ("$SYS/#", "$SYS/broker", true),
            ("$SYS/+", "$SYS/broker", true),
            ("a/b", "a/b/", false),
            ("a//b", "a//b", true),
            ("a/+/b", "a//b", true),
        ];
        for (filter, topic, expected) in table {
            assert_eq!(matches(filter, topic), expected, "{filter} vs {topic}");
        }
    }

    #[test]
    fn a_message_matching_several_rules_selects_each() {
        let set = RuleSet::new(["a/+".to_owned(), "x".to_owned(), "a/#".to_owned()]);
        assert_eq!(set.matching("a/b").collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(set.matching("x").collect::<Vec<_>>(), vec![1]);
        assert!(set.matching("y").next().is_none());
    }

    #[test]
    fn shared_topics_are_checked_in_both_parts() {
        for ok in [
            "$share/g/a/#",
            "$share/bridges/+",
            "$share/g/#",
            "$share/g-1/$SYS/#",
        ] {
            assert_eq!(validate_topic(ok), Ok(()), "{ok}");
        }
        for (bad, words) in [
            ("$share/g", "non-empty group and filter"),
            ("$share//a", "non-empty group and filter"),
            ("$share/g/", "non-empty group and filter"),
            ("$share", "non-empty group and filter"),
            ("$share/g+/a", "must not contain '+' or '#'"),
            ("$share/#/a", "must not contain '+' or '#'"),
            (
                "$share/g/a/#/b",
                "in the shared subscription \"$share/g/a/#/b\": '#' must be",
            ),
        ] {
            let err = validate_topic(bad).expect_err(bad);
            assert!(err.contains(words), "{bad}: {err}");
        }
        assert_eq!(
            Topic::parse("$share/g/a/b"),
            Ok(Topic {
                group: Some("g"),
                filter: "a/b"
            })
        );
        // `$shared/...` or `$SHARE/...` are plain (if odd) filters.
        assert_eq!(Topic::parse("$shared/a").map(|t| t.group), Ok(None));
    }

    #[test]
    fn a_shared_rule_matches_by_its_filter() {
        let set = RuleSet::new(["$share/g/a/+".to_owned(), "b".to_owned()]);
        assert_eq!(set.matching("a/x").collect::<Vec<_>>(), vec![0]);
        assert!(set.matching("$share/g/a/x").next().is_none());
    }

    #[test]
    fn overlapping_filters() {
        let table = [
            ("a/#", "a/b", true),
            ("a/+", "+/b", true),
            ("a/+", "a/b/c", false),
            ("a/b", "a/c", false),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/+", true),
            ("a", "a/#", true),
            ("a/+", "a", false),
        ];
        for (a, b, expected) in table {
            assert_eq!(overlap(a, b), expected, "{a} vs {b}");
            assert_eq!(overlap(b, a), expected, "{b} vs {a}");
        }
    }

    #[test]
    fn shared_and_other_subscriptions_of_overlapping_filters_conflict() {
        assert!(conflict("$share/g/a/#", "$share/g/a/#").is_none());
        assert!(
            conflict("a/#", "a/b").is_none(),
            "plain subscriptions as before"
        );
        assert!(
            conflict("$share/g/a/#", "$share/g/b/#").is_none(),
            "disjoint"
        );
        assert!(conflict("$share/g/a/#", "a/#").is_some());
        assert!(conflict("$share/g/a/#", "$share/h/a/#").is_some());
        assert!(conflict("$share/g/a/#", "$share/g/a/b").is_some());
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![Just(String::new()), "[a-c]{1,2}", Just("$s".to_owned())]
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..5).prop_map(|l| l.join("/"))
    }

    proptest! {
        #[test]
        fn a_topic_used_as_a_filter_matches_itself(t in topic()) {
            prop_assert!(matches(&t, &t));
        }

        #[test]
        fn hash_matches_every_topic_not_starting_with_dollar(t in topic()) {
            prop_assert_eq!(matches("#", &t), !t.starts_with('$'));
        }

        #[test]
        fn replacing_a_level_by_plus_still_matches(t in topic(), i in 0usize..5) {
            let mut levels: Vec<&str> = t.split('/').collect();
            let i = i % levels.len();
            levels[i] = "+";
            let filter = levels.join("/");
            prop_assert!(validate_filter(&filter).is_ok());
            let expected = !(i == 0 && t.starts_with('$'));
            prop_assert_eq!(matches(&filter, &t), expected);
        }

        #[test]
        fn a_prefix_with_hash_matches_everything_below_it(t in topic(), cut in 0usize..5) {
            let levels: Vec<&str> = t.split('/').collect();
            let cut = cut % levels.len();
            let filter = if cut == 0 { "#".to_owned() } else { format!("{}/#", levels[..cut].join("/")) };
            let expected = !(cut == 0 && t.starts_with('$'));
            prop_assert_eq!(matches(&filter, &t), expected);
        }

        #[test]
        fn matching_never_panics_and_differing_literal_levels_never_match(
            a in topic(), b in topic()
        ) {
            if a != b {
                prop_assert!(!matches(&a, &b) || a.contains('+') || a.contains('#'));
            }
        }
    }
}
