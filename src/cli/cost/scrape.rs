//! `cost --from URL`: each rule's average rate since its counters began, read from a running
//! bridge's `/metrics` (Prometheus text format).
//!
//! ```text
//! mlb_messages_received_total{rule}    kept and buffered
//! mlb_messages_filtered_total{rule}    matched, then left out by the rule's SQL filter (absent: 0)
//! mlb_rule_start_time_seconds{rule}    when the rule's counters began (absent, from an older
//!                                      bridge: process_start_time_seconds)
//!
//! rate = (received + filtered) / (now − start)      keep = received / (received + filtered)
//! ```
//!
//! Only those families are read; rule names are letters, digits, `-`, `_` and `.` (the config
//! refuses others), so label values need no unescaping.

use std::collections::BTreeMap;
use std::io::Read;
use std::time::Duration;

use crate::cli::probe::{resolve, send_get, split_url};

/// Connecting, sending and each read of the answer get this long.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of an answer read: a bridge's metrics take a few KiB per rule.
const MAX_ANSWER_BYTES: u64 = 64 * 1024 * 1024;

/// Why the metrics could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// Not an `http://HOST:PORT[/PATH]` URL.
    #[error("--from {0}: give the bridge's metrics URL, http://HOST:PORT/metrics")]
    Url(String),
    /// Nothing answered, or the answer broke off.
    #[error("--from {0}: cannot read the metrics: {1}")]
    Unreachable(String, String),
    /// An answer other than 200.
    #[error("--from {0}: answered {1}, not 200: is it the bridge's [metrics] listen address?")]
    Status(String, u16),
}

/// What a rule's counters said.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleCounts {
    /// `mlb_messages_received_total`.
    pub received: f64,
    /// `mlb_messages_filtered_total` (0 when absent).
    pub filtered: f64,
    /// `mlb_rule_start_time_seconds`, when present.
    pub since: Option<f64>,
}

/// What a scrape said, per rule.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    /// By rule name.
    pub rules: BTreeMap<String, RuleCounts>,
    /// `process_start_time_seconds`, when present.
    pub process_start: Option<f64>,
}

/// A rule's average rate since its counters began.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ObservedRate {
    /// Messages per second that matched the rule.
    pub per_second: f64,
    /// Fraction its filter kept, when any message matched.
    pub keep: Option<f64>,
    /// Seconds the average covers.
    pub over_seconds: f64,
}

impl Observed {
    /// Reads the families this command needs from a Prometheus text exposition.
    pub fn parse(text: &str) -> Observed {
        let mut observed = Observed::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            if name == "process_start_time_seconds" {
                observed.process_start = Some(value);
                continue;
            }
            let Some(rule) = label(labels, "rule") else {
                continue;
            };
            let field = match name {
                "mlb_messages_received_total" => |c: &mut RuleCounts, v| c.received = v,
                "mlb_messages_filtered_total" => |c: &mut RuleCounts, v| c.filtered = v,
                "mlb_rule_start_time_seconds" => |c: &mut RuleCounts, v| c.since = Some(v),
                _ => continue,
            };
            field(observed.rules.entry(rule.to_owned()).or_default(), value);
        }
        observed
    }

    /// `rule`'s average rate up to `now` (seconds since the epoch); None when the metrics do
    /// not name the rule or no time has passed.
    pub fn rate(&self, rule: &str, now: f64) -> Option<ObservedRate> {
        let counts = self.rules.get(rule)?;
        let since = counts.since.or(self.process_start)?;
        let over_seconds = now - since;
        if over_seconds <= 0.0 {
            return None;
        }
        let matched = counts.received + counts.filtered;
        Some(ObservedRate {
            per_second: matched / over_seconds,
            keep: (matched > 0.0).then(|| counts.received / matched),
            over_seconds,
        })
    }
}

/// The value of label `key` in `labels` (the text between the braces).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels
        .trim_end_matches('}')
        .split(',')
        .find_map(|pair| pair.trim().strip_prefix(key)?.strip_prefix("=\""))
        .and_then(|rest| rest.strip_suffix('"'))
}

/// GETs `url` (`http://HOST:PORT[/PATH]`, `/metrics` when no path) and returns the body.
pub fn fetch(url: &str) -> Result<String, ScrapeError> {
    let (authority, path) = split_url(url).ok_or_else(|| ScrapeError::Url(url.to_owned()))?;
    let path = if path == "/" { "/metrics" } else { path };
    let unreachable = |why: String| ScrapeError::Unreachable(url.to_owned(), why);
    let addrs =
        resolve(authority).ok_or_else(|| unreachable(format!("{authority} has no address")))?;
    let stream = send_get(addrs[0], authority, path, FETCH_TIMEOUT)
        .map_err(|e| unreachable(e.to_string()))?;
    let mut answer = Vec::new();
    stream
        .take(MAX_ANSWER_BYTES)
        .read_to_end(&mut answer)
        .map_err(|e| unreachable(e.to_string()))?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(&answer) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return Err(unreachable("the answer is not HTTP".into())),
    };
    match response.code {
        Some(200) => Ok(String::from_utf8_lossy(&answer[head_len..]).into_owned()),
        code => Err(ScrapeError::Status(url.to_owned(), code.unwrap_or(0))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP mlb_messages_received_total Messages matched.\n\
        # TYPE mlb_messages_received_total counter\n\
        mlb_messages_received_total{rule=\"temp\"} 900\n\
        mlb_messages_received_total{rule=\"new\"} 30.0\n\
        mlb_messages_filtered_total{rule=\"temp\"} 100\n\
        mlb_messages_dropped_total{rule=\"temp\",reason=\"throttled\"} 7\n\
        mlb_rule_start_time_seconds{rule=\"temp\"} 1000\n\
        mlb_rule_start_time_seconds{rule=\"new\"} 1090.0\n\
        process_start_time_seconds 999.5\n";

    #[test]
    fn a_rate_is_matched_messages_over_the_time_since_the_rule_began() {
        let observed = Observed::parse(TEXT);
        let temp = observed.rate("temp", 1100.0).expect("temp");
        assert_eq!(temp.per_second, 10.0);
        assert_eq!(temp.keep, Some(0.9));
        assert_eq!(temp.over_seconds, 100.0);
        // A rule added by a reload counts from the reload, not from the process start.
        let new = observed.rate("new", 1100.0).expect("new");
        assert_eq!((new.per_second, new.keep), (3.0, Some(1.0)));
        assert_eq!(observed.rate("absent", 1100.0), None);
        assert_eq!(observed.rate("temp", 1000.0), None, "no time has passed");
    }

    #[test]
    fn an_older_bridge_without_rule_start_times_counts_from_the_process_start() {
        let text = "mlb_messages_received_total{rule=\"temp\"} 50\n\
                    process_start_time_seconds 1000\n";
        let rate = Observed::parse(text).rate("temp", 1010.0).expect("temp");
        assert_eq!((rate.per_second, rate.keep), (5.0, Some(1.0)));
    }

    #[test]
    fn labels_are_found_among_others() {
        assert_eq!(label("rule=\"a.b\",reason=\"x\"}", "rule"), Some("a.b"));
        assert_eq!(label("reason=\"x\", rule=\"c\"", "rule"), Some("c"));
        assert_eq!(label("reason=\"x\"", "rule"), None);
    }

    #[test]
    fn urls_other_than_plain_http_are_refused_and_silence_is_unreachable() {
        assert!(matches!(
            fetch("https://127.0.0.1:1/metrics"),
            Err(ScrapeError::Url(_))
        ));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let err = fetch(&format!("http://127.0.0.1:{port}")).expect_err("nothing listens");
        assert!(matches!(err, ScrapeError::Unreachable(..)), "{err}");
    }
}
