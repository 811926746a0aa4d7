//! Topic filters and the rules that own them: pure functions, no I/O.
//!
//! Matching follows MQTT 3.1.1 §4.7: `+` matches exactly one level, `#` matches the parent level
//! and everything below it, and a filter starting with a wildcard never matches a topic starting
//! with `$` (broker-internal topics such as `$SYS/...`). One message may match several rules;
//! [`RuleSet::matching`] yields each of them, and each gets its own copy downstream.

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
    /// Takes the filters in rule order; they must already be valid.
    pub fn new(filters: impl IntoIterator<Item = String>) -> RuleSet {
        RuleSet {
            filters: filters.into_iter().collect(),
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
