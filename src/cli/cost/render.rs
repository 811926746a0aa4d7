//! The `cost` report as a table for people and as JSON for scripts.

use std::fmt::Write;

use serde_json::{Value, json};

use super::Report;
use crate::shaping::cost::Limit;

/// What decided a rule's invocations, in words.
fn decided_by(limit: Limit) -> &'static str {
    match limit {
        Limit::PerMessage => "one message per invocation",
        Limit::MaxMessages => "batch.max_messages",
        Limit::MaxBytes => "batch.max_bytes",
        Limit::MaxWait => "batch.max_wait",
        Limit::Window => "aggregate.window",
        Limit::RateLimit => "rate_limit",
        Limit::Nothing => "no messages",
    }
}

/// `1234567.4` → `1,234,567`.
fn thousands(n: f64) -> String {
    let digits = format!("{:.0}", n.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A rate for the table: enough digits to see a slow one.
fn rate(r: f64) -> String {
    if r == 0.0 || r >= 10.0 {
        format!("{r:.1}")
    } else if r >= 0.01 {
        format!("{r:.2}")
    } else {
        format!("{r:.2e}")
    }
}

/// The report as text: the assumptions, one row per rule, the total, then the notes.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let p = &report.prices;
    let _ = writeln!(
        out,
        "prices: ${} per million requests, ${} per GB-second (x86, on demand, USD; {})",
        p.per_million, p.per_gb_second, p.source
    );
    let _ = writeln!(
        out,
        "each invocation: {} MB for {}; messages of {} bytes; 30-day month; free tier not deducted",
        report.memory_mb,
        humantime::format_duration(report.duration),
        report.message_bytes
    );
    if let Some(url) = &report.from {
        let _ = writeln!(out, "rates: averages since start, from {url}");
    }
    let _ = writeln!(
        out,
        "\n{:<20} {:>10} {:>5} {:>10} {:>15} {:>10} {:>10} {:>10}  DECIDED BY",
        "RULE", "MSG/S", "KEPT", "INVOKE/S", "INVOKE/MONTH", "REQUESTS", "COMPUTE", "TOTAL"
    );
    for row in &report.rows {
        let f = &row.flow;
        let kept = if f.matched > 0.0 {
            f.kept / f.matched
        } else {
            1.0
        };
        let _ = writeln!(
            out,
            "{:<20} {:>10} {:>4.0}% {:>10} {:>15} {:>10} {:>10} {:>10}  {}",
            row.rule,
            rate(f.matched),
            kept * 100.0,
            rate(f.invocations),
            thousands(f.per_month()),
            format!("${:.2}", row.requests),
            format!("${:.2}", row.compute),
            format!("${:.2}", row.requests + row.compute),
            decided_by(f.limit)
        );
    }
    let (invocations, requests, compute) = totals(report);
    let _ = writeln!(
        out,
        "{:<20} {:>10} {:>5} {:>10} {:>15} {:>10} {:>10} {:>10}",
        "TOTAL",
        "",
        "",
        "",
        thousands(invocations),
        format!("${requests:.2}"),
        format!("${compute:.2}"),
        format!("${:.2}", requests + compute)
    );
    for row in &report.rows {
        for note in &row.notes {
            let _ = writeln!(out, "rule {}: {note}", row.rule);
        }
    }
    out
}

/// Invocations a month, request cost and compute cost of all rules.
fn totals(report: &Report) -> (f64, f64, f64) {
    report.rows.iter().fold((0.0, 0.0, 0.0), |(i, r, c), row| {
        (i + row.flow.per_month(), r + row.requests, c + row.compute)
    })
}

/// The report as one JSON object (see the README's `cost` section).
pub fn json(report: &Report) -> Value {
    let rules: Vec<Value> = report
        .rows
        .iter()
        .map(|row| {
            let f = &row.flow;
            json!({
                "rule": row.rule,
                "messages_per_second": f.matched,
                "kept_per_second": f.kept,
                "passed_per_second": f.passed,
                "messages_per_invocation": f.per_event,
                "invocations_per_second": f.invocations,
                "invocations_per_month": f.per_month().round(),
                "decided_by": f.limit.key(),
                "behind_per_second": f.behind,
                "gb_seconds": row.gb_seconds,
                "request_cost": row.requests,
                "compute_cost": row.compute,
                "cost": row.requests + row.compute,
                "notes": row.notes,
            })
        })
        .collect();
    let (invocations, requests, compute) = totals(report);
    let gb_seconds = crate::shaping::cost::total(report.rows.iter().map(|r| r.gb_seconds));
    json!({
        "currency": "USD",
        "region": report.region,
        "price_per_million_requests": report.prices.per_million,
        "price_per_gb_second": report.prices.per_gb_second,
        "prices_from": report.prices.source,
        "memory_mb": report.memory_mb,
        "duration_seconds": report.duration.as_secs_f64(),
        "message_bytes": report.message_bytes,
        "from": report.from,
        "rules": rules,
        "total": {
            "invocations_per_month": invocations.round(),
            "gb_seconds": gb_seconds,
            "request_cost": requests,
            "compute_cost": compute,
            "cost": requests + compute,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(thousands(25_920_000.0), "25,920,000");
        assert_eq!(thousands(999.6), "1,000");
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(123.0), "123");
    }

    #[test]
    fn slow_rates_keep_their_digits() {
        assert_eq!(rate(1000.0), "1000.0");
        assert_eq!(rate(0.5), "0.50");
        assert_eq!(rate(0.001), "1.00e-3");
        assert_eq!(rate(0.0), "0.0");
    }
}
