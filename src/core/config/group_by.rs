//! `aggregate.group_by`: which messages of a window are aggregated together.

/// How messages are grouped inside a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBy {
    /// One group per topic.
    Topic,
    /// One group for the whole window.
    None,
    /// One group per value of this topic level (1-based): `level:2` of `sensors/dev1/temperature`
    /// is `dev1`.
    Level(usize),
}

impl GroupBy {
    /// Parses `"topic"`, `"none"` or `"level:N"`.
    pub fn parse(text: &str) -> Result<GroupBy, String> {
        match text {
            "topic" => Ok(GroupBy::Topic),
            "none" => Ok(GroupBy::None),
            other => other
                .strip_prefix("level:")
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| *n >= 1)
                .map(GroupBy::Level)
                .ok_or_else(|| {
                    format!("{other:?}: write \"topic\", \"none\" or \"level:N\" (N from 1, e.g. \"level:2\")")
                }),
        }
    }
}
