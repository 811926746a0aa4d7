//! `mqtt-lambda-bridge cost`: what a configuration costs per 30-day month in Lambda requests
//! and compute, for given message rates ([`CostArgs::rate`]) or the rates a running bridge has
//! seen ([`CostArgs::from`], [`scrape`]).
//!
//! The invocations come from [`crate::shaping::cost`] (pure, one formula per shaping); this
//! module reads the flags, matches rates to rules, prices the invocations ([`prices`]) and
//! prints them ([`render`]). Money is in USD.
//!
//! ```text
//! requests  = invocations / 1,000,000 · price per million
//! GB-s      = memory MB / 1024 · duration s · invocations
//! compute   = GB-s · price per GB-second
//! ```

pub mod prices;
mod render;
pub mod scrape;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::core::config::Config;
use crate::core::rules;
use crate::shaping::cost::{self, Assumptions, Flow, Stream};
use crate::shaping::plan::RulePlan;
use prices::Prices;

pub use render::{json, table};

/// Lambda's smallest and largest memory sizes, MB.
const MEMORY_MB: std::ops::RangeInclusive<u32> = 128..=10_240;

/// The `cost` command's arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct CostArgs {
    /// The configuration file.
    #[arg(long, short, default_value = crate::core::config::DEFAULT_CONFIG_PATH)]
    pub config: std::path::PathBuf,
    /// Messages on a topic: TOPIC=N/s (or N/min, N/h); repeat for more topics. A filter
    /// (sensors/+/temperature) stands for the total of its topics.
    #[arg(long, value_name = "TOPIC=N/s")]
    pub rate: Vec<String>,
    /// Payload size of every message, bytes (decides how many fit a batch's max_bytes).
    #[arg(long, default_value_t = 100)]
    pub message_bytes: usize,
    /// The functions' memory, MB.
    #[arg(long, default_value_t = 128)]
    pub memory_mb: u32,
    /// How long each invocation runs (e.g. 100ms, 2s).
    #[arg(long, default_value = "100ms")]
    pub duration: String,
    /// Fraction of a rule's messages its filter keeps: RULE=F (0 to 1); default all.
    #[arg(long, value_name = "RULE=F")]
    pub keep: Vec<String>,
    /// Fraction of a rule's messages that change (for throttle.only_changes and deadband):
    /// RULE=F; default: they drop nothing.
    #[arg(long, value_name = "RULE=F")]
    pub changes: Vec<String>,
    /// How many distinct topics a rule's messages come on, sharing its rate evenly: RULE=N
    /// (throttles and windows work per topic); default one per --rate.
    #[arg(long, value_name = "RULE=N")]
    pub topics: Vec<String>,
    /// USD per million requests, instead of the Region's price.
    #[arg(long)]
    pub price_per_million: Option<f64>,
    /// USD per GB-second, instead of the Region's x86 price.
    #[arg(long)]
    pub price_per_gb_second: Option<f64>,
    /// A running bridge's metrics URL (http://HOST:PORT/metrics): take each rule's average
    /// rate since it started instead of --rate.
    #[arg(long, value_name = "URL")]
    pub from: Option<String>,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// A command line `cost` cannot work with (exit 64).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// One rule's figures.
#[derive(Debug, Clone)]
pub struct Row {
    /// The rule's name.
    pub rule: String,
    /// Its rates through its shaping.
    pub flow: Flow,
    /// GB-seconds a month.
    pub gb_seconds: f64,
    /// USD a month for requests.
    pub requests: f64,
    /// USD a month for compute.
    pub compute: f64,
    /// What the figures assume or leave out, one line each.
    pub notes: Vec<String>,
}

/// The whole answer.
#[derive(Debug, Clone)]
pub struct Report {
    /// The Region priced (None: not configured).
    pub region: Option<String>,
    /// The prices used.
    pub prices: Prices,
    /// `--memory-mb`.
    pub memory_mb: u32,
    /// `--duration`.
    pub duration: Duration,
    /// `--message-bytes`.
    pub message_bytes: usize,
    /// `--from`, when the rates came from a bridge.
    pub from: Option<String>,
    /// One per rule, in configuration order.
    pub rows: Vec<Row>,
}

/// Where the rates come from.
#[derive(Debug, Clone)]
pub enum Rates {
    /// `--rate` flags.
    Given(Vec<Stream>),
    /// A bridge's metrics, read now (seconds since the epoch).
    Observed(scrape::Observed, f64),
}

impl CostArgs {
    /// Whether the rates come from `--from` (and its URL): one or the other, not both.
    pub fn source(&self) -> Result<Option<&str>, UsageError> {
        match (&self.from, self.rate.is_empty()) {
            (Some(_), false) => Err(UsageError(
                "give --rate or --from, not both: --from takes every rule's rate from the bridge"
                    .into(),
            )),
            (None, true) => Err(UsageError(
                "no rates: give --rate TOPIC=N/s (repeat for more) or --from http://HOST:PORT/metrics"
                    .into(),
            )),
            (from, _) => Ok(from.as_deref()),
        }
    }

    /// The `--rate` flags.
    pub fn streams(&self) -> Result<Vec<Stream>, UsageError> {
        self.rate.iter().map(|r| parse_rate(r)).collect()
    }
}

/// The report for `config` at `rates`.
pub fn report(config: &Config, args: &CostArgs, rates: &Rates) -> Result<Report, UsageError> {
    let duration = humantime::parse_duration(args.duration.trim()).map_err(|e| {
        UsageError(format!(
            "--duration {:?}: {e}; write e.g. 100ms or 2s",
            args.duration
        ))
    })?;
    if !MEMORY_MB.contains(&args.memory_mb) {
        return Err(UsageError(format!(
            "--memory-mb {}: Lambda allows {} to {} MB",
            args.memory_mb,
            MEMORY_MB.start(),
            MEMORY_MB.end()
        )));
    }
    for (flag, price) in [
        ("--price-per-million", args.price_per_million),
        ("--price-per-gb-second", args.price_per_gb_second),
    ] {
        if price.is_some_and(|p| !(p.is_finite() && p >= 0.0)) {
            return Err(UsageError(format!(
                "{flag}: give a price of 0 or more, in USD"
            )));
        }
    }
    let names: Vec<&str> = config.rules.iter().map(|r| r.name.as_str()).collect();
    let keep = per_rule(&args.keep, "--keep", &names, fraction)?;
    let changes = per_rule(&args.changes, "--changes", &names, fraction)?;
    let topics = per_rule(&args.topics, "--topics", &names, topic_count)?;
    let region = super::configured_region(config);
    let prices = Prices::for_region(
        region.as_deref(),
        args.price_per_million,
        args.price_per_gb_second,
    );
    let mut rows = Vec::with_capacity(config.rules.len());
    for rule in &config.rules {
        let name = rule.name.as_str();
        let given = |list: &[(String, f64)]| list.iter().find(|(r, _)| r == name).map(|(_, v)| *v);
        let mut assume = Assumptions {
            message_bytes: args.message_bytes,
            keep: given(&keep).unwrap_or(1.0),
            changes: given(&changes),
            topics: given(&topics).map(|n| n as u64),
        };
        let (streams, mut notes) = streams_of(name, &rule.topic, rates, &mut assume, &keep);
        let plan = RulePlan::from_config(rule);
        let flow = cost::flow(&plan, &streams, &assume);
        notes.extend(caveats(&plan, &streams, &assume, &flow));
        rows.push(priced(name, flow, notes, args.memory_mb, duration, &prices));
    }
    Ok(Report {
        region,
        prices,
        memory_mb: args.memory_mb,
        duration,
        message_bytes: args.message_bytes,
        from: args.from.clone(),
        rows,
    })
}

/// The streams that reach rule `name` (filter `filter`), and notes on what was left out. With
/// observed rates, the rule's filter carries its observed rate, and its observed keep fraction
/// stands unless `--keep` names the rule.
fn streams_of(
    name: &str,
    filter: &str,
    rates: &Rates,
    assume: &mut Assumptions,
    keep_flags: &[(String, f64)],
) -> (Vec<Stream>, Vec<String>) {
    match rates {
        Rates::Given(all) => {
            let (streams, partly) = cost::reaching(filter, all);
            let mut notes: Vec<String> = partly
                .iter()
                .map(|t| {
                    format!(
                        "--rate {t} overlaps the rule's filter {filter} only in part: not counted; give the topics inside it"
                    )
                })
                .collect();
            if streams.is_empty() {
                notes.push(format!("no --rate reaches the rule's filter {filter}"));
            }
            (streams, notes)
        }
        Rates::Observed(observed, now) => match observed.rate(name, *now) {
            Some(rate) => {
                if let (Some(k), false) = (rate.keep, keep_flags.iter().any(|(r, _)| r == name)) {
                    assume.keep = k;
                }
                let topic = rules::match_filter(filter).to_owned();
                let stream = Stream {
                    topic,
                    per_second: rate.per_second,
                };
                let over = crate::core::clock::human(Duration::from_secs_f64(rate.over_seconds));
                (
                    vec![stream],
                    vec![format!("average over the last {over} of the bridge")],
                )
            }
            None => (
                Vec::new(),
                vec![
                    "the bridge's metrics have no rate for this rule (not running there yet?)"
                        .into(),
                ],
            ),
        },
    }
}

/// What the figures of one rule assume, where it matters.
fn caveats(plan: &RulePlan, streams: &[Stream], assume: &Assumptions, flow: &Flow) -> Vec<String> {
    let mut notes = Vec::new();
    if flow.behind > 0.0 {
        notes.push(format!(
            "the rate limit falls behind by {:.2} messages/s: the buffer grows until it is full",
            flow.behind
        ));
    }
    if let Some(t) = &plan.throttle
        && (t.only_changes || t.deadband.is_some())
        && assume.changes.is_none()
    {
        notes.push(
            "only_changes/deadband counted as dropping nothing: give --changes RULE=F".into(),
        );
    }
    let per_topic = plan
        .throttle
        .as_ref()
        .is_some_and(|t| t.min_interval_ms.is_some())
        || plan.aggregate.is_some();
    if per_topic
        && assume.topics.is_none()
        && let Some(s) = streams.iter().find(|s| s.topic.contains(['+', '#']))
    {
        notes.push(format!(
            "{} counted as one topic: give --topics RULE=N for how many it stands for",
            s.topic
        ));
    }
    notes
}

/// A row: the flow priced.
fn priced(
    rule: &str,
    flow: Flow,
    notes: Vec<String>,
    memory_mb: u32,
    duration: Duration,
    prices: &Prices,
) -> Row {
    let invocations = flow.per_month();
    let gb_seconds = f64::from(memory_mb) / 1024.0 * duration.as_secs_f64() * invocations;
    Row {
        rule: rule.to_owned(),
        requests: invocations / 1_000_000.0 * prices.per_million,
        compute: gb_seconds * prices.per_gb_second,
        gb_seconds,
        flow,
        notes,
    }
}

/// Seconds since the epoch, now (for `--from`'s averages).
pub fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `TOPIC=N/s` (or `/min`, `/h`).
fn parse_rate(text: &str) -> Result<Stream, UsageError> {
    let bad = |why: &str| {
        UsageError(format!(
            "--rate {text:?}: {why}; write e.g. sensors/dev1/temperature=10/s"
        ))
    };
    let (topic, rate) = text.rsplit_once('=').ok_or_else(|| bad("no '='"))?;
    rules::validate_filter(topic).map_err(|why| bad(&why))?;
    let (number, unit) = rate
        .split_once('/')
        .ok_or_else(|| bad("no unit (/s, /min or /h)"))?;
    let seconds = match unit.trim() {
        "s" => 1.0,
        "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad("the unit is /s, /min or /h")),
    };
    let n: f64 = number.trim().parse().map_err(|_| bad("not a number"))?;
    if !(n.is_finite() && n >= 0.0) {
        return Err(bad("a rate is 0 or more"));
    }
    Ok(Stream {
        topic: topic.to_owned(),
        per_second: n / seconds,
    })
}

/// A fraction from 0 to 1.
fn fraction(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err("a fraction from 0 to 1, e.g. 0.1".into()),
    }
}

/// A count of topics, at least 1.
fn topic_count(text: &str) -> Result<f64, String> {
    match text.trim().parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n as f64),
        _ => Err("a whole number of topics, at least 1".into()),
    }
}

/// `RULE=VALUE` flags, each naming a configured rule.
fn per_rule(
    flags: &[String],
    flag: &str,
    rules: &[&str],
    value: fn(&str) -> Result<f64, String>,
) -> Result<Vec<(String, f64)>, UsageError> {
    flags
        .iter()
        .map(|text| {
            let (rule, v) = text
                .split_once('=')
                .ok_or_else(|| UsageError(format!("{flag} {text:?}: write RULE=VALUE")))?;
            if !rules.contains(&rule) {
                return Err(UsageError(format!(
                    "{flag} {text:?}: no rule named {rule:?} in the configuration (rules: {})",
                    rules.join(", ")
                )));
            }
            let v = value(v).map_err(|why| UsageError(format!("{flag} {text:?}: {why}")))?;
            Ok((rule.to_owned(), v))
        })
        .collect()
}
