//! What the `buffer` commands print: `stats` as a table, `dead-letters list` one line per
//! dead letter (or its JSON), `dead-letters replay` per rule. `main.rs` maps the results to
//! exit codes.

use std::time::Duration;

use super::admin::{self, AdminError};
use crate::core::config::Config;

/// `buffer stats`: one row per rule.
pub async fn print_stats(config: &Config) -> Result<(), AdminError> {
    let rows = admin::stats(config).await?;
    println!(
        "{:<24} {:>10} {:>12} {:>14} {:>12}",
        "RULE", "PENDING", "BYTES", "OLDEST", "DEAD LETTERS"
    );
    for row in rows {
        // Whole seconds: the age is for a person, and sub-second digits only add noise.
        let oldest = row.oldest.map_or_else(
            || "-".to_owned(),
            |d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string(),
        );
        println!(
            "{:<24} {:>10} {:>12} {:>14} {:>12}",
            row.rule, row.pending, row.bytes, oldest, row.dead_letters
        );
    }
    Ok(())
}

/// `buffer dead-letters list`: one line per dead letter (or its stored JSON), then the lines
/// of the stores that are not dead letters, on stderr.
pub fn print_dead_letters(
    config: &Config,
    rule: Option<&str>,
    json: bool,
) -> Result<(), AdminError> {
    let listing = admin::list_dead_letters(config, rule)?;
    for letter in &listing.letters {
        if json {
            println!("{}", serde_json::to_string(letter).unwrap_or_default());
            continue;
        }
        let what = match letter.event["messages"].as_array() {
            Some(messages) => format!("{} message(s)", messages.len()),
            None if letter.event.get("window").is_some() => "a statistics window".to_owned(),
            None => "no messages".to_owned(),
        };
        println!(
            "{}  {}  {}  {what}, {} attempt(s): {}",
            letter.last_attempt_at, letter.rule, letter.code, letter.attempts, letter.reason
        );
    }
    for (path, line, why) in &listing.unreadable {
        eprintln!("{}:{line}: not a dead-letter entry: {why}", path.display());
    }
    if !json {
        eprintln!("{} dead letter(s)", listing.letters.len());
    }
    Ok(())
}

/// `buffer dead-letters replay`: what went back, per rule, on stdout; what stayed, on stderr.
/// Returns whether some stayed.
pub async fn print_replay(config: &Config, rule: Option<&str>) -> Result<bool, AdminError> {
    let mut kept_any = false;
    for replayed in admin::replay_dead_letters(config, rule).await? {
        println!(
            "{}: {} message(s) back in the queue",
            replayed.rule, replayed.restored
        );
        for line in &replayed.kept {
            eprintln!("{line}");
            kept_any = true;
        }
    }
    Ok(kept_any)
}
