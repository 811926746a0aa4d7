//! The dead-letter store: events Lambda can never accept, one JSON object per line in
//! `<buffer.dir>/<rule>/dead-letters.jsonl`, with the reason and the attempts.
//!
//! Each line keeps the messages in the event's own shape (SPEC.md), so `buffer dead-letters
//! replay` can put them back into the rule's queue with their original ids.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::envelope::Message;

/// The file name inside a rule's directory.
pub const FILE_NAME: &str = "dead-letters.jsonl";

/// One dead letter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The rule whose function refused it.
    pub rule: String,
    /// Why it can never be delivered, in words.
    pub reason: String,
    /// AWS's error code, or `PayloadTooLarge` for an event over Lambda's limit.
    pub code: String,
    /// Invocation attempts made.
    pub attempts: u32,
    /// First attempt, RFC 3339.
    pub first_attempt_at: String,
    /// Last attempt, RFC 3339.
    pub last_attempt_at: String,
    /// The event as it would have been sent.
    pub event: serde_json::Value,
}

/// Why the dead-letter store failed.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A line is not a dead letter.
    #[error("{path}:{line}: not a dead-letter entry: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// RFC 3339 with milliseconds.
pub fn timestamp(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// The dead letters of one rule.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    path: PathBuf,
}

impl DeadLetters {
    /// The store in a rule's directory.
    pub fn new(rule_dir: &Path) -> Self {
        DeadLetters {
            path: rule_dir.join(FILE_NAME),
        }
    }

    /// Where it lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: io::Error) -> DeadLetterError {
        DeadLetterError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Appends one entry durably (fsync'd before it returns).
    pub fn append(&self, letter: &DeadLetter) -> Result<(), DeadLetterError> {
        let mut line = serde_json::to_vec(letter).map_err(|e| self.io(io::Error::other(e)))?;
        line.push(b'\n');
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| self.io(e))?;
        file.write_all(&line).map_err(|e| self.io(e))?;
        file.sync_data().map_err(|e| self.io(e))
    }

    /// Every entry, oldest first; a torn last line (crash mid-write) is ignored.
    pub fn list(&self) -> Result<Vec<DeadLetter>, DeadLetterError> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(e)),
        };
        let lines: Vec<String> = BufReader::new(file)
            .lines()
            .collect::<Result<_, _>>()
            .map_err(|e| self.io(e))?;
        let last = lines.len();
        let mut out = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str(line) {
                Ok(letter) => out.push(letter),
                Err(_) if i + 1 == last => {}
                Err(e) => {
                    return Err(DeadLetterError::Parse {
                        path: self.path.clone(),
                        line: i + 1,
                        message: e.to_string(),
                    });
                }
            }
        }
        Ok(out)
    }

    /// How many entries there are.
    pub fn count(&self) -> usize {
        self.list().map_or(0, |l| l.len())
    }

    /// Removes the file (after a replay put its messages back into the queue).
    pub fn clear(&self) -> Result<(), DeadLetterError> {
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io(e)),
        }
    }
}

/// The messages of a dead letter's event, as they were received (ids included).
pub fn messages_of(letter: &DeadLetter) -> Vec<Message> {
    let Some(messages) = letter.event.get("messages").and_then(|m| m.as_array()) else {
        return Vec::new();
    };
    messages
        .iter()
        .filter_map(|m| {
            let id = m.get("id")?.as_str()?.parse::<uuid::Uuid>().ok()?;
            let topic = m.get("topic")?.as_str()?.to_owned();
            let payload = if let Some(b64) = m.get("payload_base64").and_then(|p| p.as_str()) {
                base64::engine::general_purpose::STANDARD.decode(b64).ok()?
            } else {
                match m.get("payload")? {
                    serde_json::Value::String(s) => s.clone().into_bytes(),
                    other => serde_json::to_vec(other).ok()?,
                }
            };
            Some(Message {
                id,
                topic,
                payload,
                qos: m.get("qos").and_then(|q| q.as_u64()).unwrap_or(1).min(2) as u8,
                retain: m.get("retain").and_then(|r| r.as_bool()).unwrap_or(false),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::encode_event;
    use std::time::UNIX_EPOCH;

    #[test]
    fn entries_round_trip_and_their_messages_come_back_intact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DeadLetters::new(dir.path());
        let messages = vec![
            Message::received(
                "a/json".into(),
                br#"{"c":1}"#.to_vec(),
                1,
                false,
                UNIX_EPOCH,
            ),
            Message::received("a/text".into(), b"hello".to_vec(), 2, true, UNIX_EPOCH),
            Message::received("a/bin".into(), vec![0xff, 0], 1, false, UNIX_EPOCH),
        ];
        let event: serde_json::Value =
            serde_json::from_slice(&encode_event("r", &messages)).expect("json");
        let letter = DeadLetter {
            rule: "r".into(),
            reason: "function not found".into(),
            code: "ResourceNotFoundException".into(),
            attempts: 3,
            first_attempt_at: timestamp(UNIX_EPOCH),
            last_attempt_at: timestamp(UNIX_EPOCH),
            event,
        };
        store.append(&letter).expect("append");
        store.append(&letter).expect("append");
        let listed = store.list().expect("list");
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0], letter);
        assert_eq!(messages_of(&listed[0]), messages);
        store.clear().expect("clear");
        assert_eq!(store.count(), 0);
    }

    #[test]
    fn a_torn_last_line_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DeadLetters::new(dir.path());
        std::fs::write(store.path(), "{\"rule\":\"r\",\"rea").expect("write");
        assert_eq!(store.list().expect("list"), vec![]);
    }
}
