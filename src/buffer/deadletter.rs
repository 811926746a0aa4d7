//! The dead-letter store: events Lambda can never accept, one JSON object per line in
//! `<buffer.dir>/<rule>/dead-letters.jsonl`, with the reason and the attempts.
//!
//! Each line keeps the messages in the event's own shape (SPEC.md), so `buffer dead-letters
//! replay` can put them back into the rule's queue with their original ids.
//!
//! ```text
//! <buffer.dir>/<rule>/dead-letters.jsonl      one DeadLetter per line, appended and fsync'd
//! <buffer.dir>/<rule>/dead-letters.jsonl.tmp  only while a replay rewrites the store
//! ```
//!
//! Invariants:
//! - An entry is appended whole and fsync'd before `append` returns; the append that creates
//!   the file also fsyncs the directory, so the file itself survives a power cut (its entries
//!   were acknowledged to the broker on the strength of it). A crash mid-append can
//!   leave a torn last line; the next append starts on a line of its own, so the torn line
//!   never swallows a good entry.
//! - Nothing is ever deleted that was not put back: replay ([`plan_replay`]) restores what the
//!   queue can deliver and keeps every other line — unreadable lines verbatim, statistics
//!   windows, messages older than `buffer.max_age`, messages the queue has no room for — and
//!   [`DeadLetters::replace`] rewrites the store atomically (temporary file, fsync, rename,
//!   directory fsync), so a crash leaves the old store or the new one, never a mix.
//!
//! Entries are written with `O_APPEND` (ingest and delivery may append to one store at the
//! same time); the directory fsyncs go through [`Storage`], so tests can count them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::storage::{RealStorage, Storage};
use crate::core::envelope::Message;

/// The file name inside a rule's directory.
pub const FILE_NAME: &str = "dead-letters.jsonl";
/// The replacement being written by [`DeadLetters::replace`], renamed over [`FILE_NAME`].
pub const TEMP_FILE_NAME: &str = "dead-letters.jsonl.tmp";

/// One dead letter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The rule whose function refused it.
    pub rule: String,
    /// Why it can never be delivered, in words.
    pub reason: String,
    /// AWS's error code, `PayloadTooLarge` for an event over Lambda's limit, or the `Reply…`
    /// code of a reply that was not published (e.g. `ReplyNotAllowed`: the request's Response
    /// Topic is outside `reply.allow` and the rule has no `reply.topic`).
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
}

/// RFC 3339 with milliseconds.
pub fn timestamp(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// The dead letters of one rule.
#[derive(Clone)]
pub struct DeadLetters {
    path: PathBuf,
    /// Where the directory fsyncs go.
    storage: Arc<dyn Storage>,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl DeadLetters {
    /// The store in a rule's directory.
    pub fn new(rule_dir: &Path) -> Self {
        DeadLetters::with_storage(rule_dir, Arc::new(RealStorage))
    }

    /// [`DeadLetters::new`], syncing directories through `storage` (tests pass a
    /// [`FaultStorage`](super::storage::FaultStorage) to count them).
    pub fn with_storage(rule_dir: &Path, storage: Arc<dyn Storage>) -> Self {
        DeadLetters {
            path: rule_dir.join(FILE_NAME),
            storage,
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
        let (mut file, created) = self.open_for_append()?;
        // A torn last line (crash mid-append) gets its end, so this entry stays whole.
        let len = file.metadata().map_err(|e| self.io(e))?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            file.read_exact_at(&mut last, len - 1)
                .map_err(|e| self.io(e))?;
            if last[0] != b'\n' {
                line.insert(0, b'\n');
            }
        }
        file.write_all(&line).map_err(|e| self.io(e))?;
        file.sync_data().map_err(|e| self.io(e))?;
        if created {
            // The file's directory entry is new: without this a power cut can lose the whole
            // file, entries fsync'd and acknowledged included.
            self.storage.sync_dir(self.dir()).map_err(|e| self.io(e))?;
        }
        Ok(())
    }

    /// The file opened for appending, and whether this call created it.
    fn open_for_append(&self) -> Result<(File, bool), DeadLetterError> {
        let mut options = OpenOptions::new();
        options.read(true).append(true);
        match options.clone().create_new(true).open(&self.path) {
            Ok(file) => Ok((file, true)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let file = options.open(&self.path).map_err(|e| self.io(e))?;
                Ok((file, false))
            }
            Err(e) => Err(self.io(e)),
        }
    }

    /// The rule's directory, which holds the file.
    fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Every non-empty line, oldest first: entries, and lines that are not one (a torn last
    /// line, a line edited by hand) kept as they are.
    pub fn read(&self) -> Result<Vec<StoredLine>, DeadLetterError> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(e)),
        };
        Ok(bytes
            .split(|b| *b == b'\n')
            .enumerate()
            .filter(|(_, raw)| !raw.trim_ascii().is_empty())
            .map(|(i, raw)| match serde_json::from_slice::<DeadLetter>(raw) {
                Ok(letter) => StoredLine::Letter {
                    letter,
                    raw: raw.to_vec(),
                },
                Err(e) => StoredLine::Unreadable {
                    line: i + 1,
                    raw: raw.to_vec(),
                    why: e.to_string(),
                },
            })
            .collect())
    }

    /// Every entry, oldest first; lines that are not entries are left out (see [`Self::read`]).
    pub fn list(&self) -> Result<Vec<DeadLetter>, DeadLetterError> {
        Ok(self
            .read()?
            .into_iter()
            .filter_map(|line| match line {
                StoredLine::Letter { letter, .. } => Some(letter),
                StoredLine::Unreadable { .. } => None,
            })
            .collect())
    }

    /// How many lines the store holds, entries and unreadable lines alike (0 when unreadable).
    pub fn count(&self) -> usize {
        self.read().map_or(0, |l| l.len())
    }

    /// Replaces the store with `lines` (each without its newline) atomically: a temporary file
    /// is written and fsync'd, renamed over the store, and the directory fsync'd. No lines:
    /// the store is removed.
    pub fn replace(&self, lines: &[Vec<u8>]) -> Result<(), DeadLetterError> {
        let dir = self.dir();
        if lines.is_empty() {
            return self.clear();
        }
        let temp = dir.join(TEMP_FILE_NAME);
        let temp_err = |source| DeadLetterError::Io {
            path: temp.clone(),
            source,
        };
        let mut file = File::create(&temp).map_err(temp_err)?;
        let mut text = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for line in lines {
            text.extend_from_slice(line);
            text.push(b'\n');
        }
        file.write_all(&text).map_err(temp_err)?;
        file.sync_all().map_err(temp_err)?;
        drop(file);
        fs::rename(&temp, &self.path).map_err(|e| self.io(e))?;
        self.storage.sync_dir(dir).map_err(|e| self.io(e))
    }

    /// Removes the file, durably.
    pub fn clear(&self) -> Result<(), DeadLetterError> {
        match fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.io(e)),
        }
        self.storage.sync_dir(self.dir()).map_err(|e| self.io(e))
    }
}

/// One non-empty line of the store.
#[derive(Debug, Clone, PartialEq)]
pub enum StoredLine {
    /// An entry, with its line as stored (written back verbatim when kept whole).
    Letter {
        /// The entry.
        letter: DeadLetter,
        /// Its line, without the newline.
        raw: Vec<u8>,
    },
    /// A line that is not an entry.
    Unreadable {
        /// 1-based line number.
        line: usize,
        /// The line as stored, without the newline.
        raw: Vec<u8>,
        /// Why it is not an entry.
        why: String,
    },
}

/// Why replay left something in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeptReason {
    /// A line that is not a dead-letter entry.
    UnreadableLine,
    /// A statistics-window event: a summary, not messages.
    Window,
    /// An event with neither `messages` nor a window.
    UnknownEvent,
    /// A message without a valid id, topic or payload.
    UnreadableMessage,
    /// A message older than `buffer.max_age`: the queue would drop it when read.
    TooOld,
    /// No room in the rule's share of `buffer.max_size`.
    NoRoom,
}

/// What a replay does with one rule's store: a pure decision over its lines.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplayPlan {
    /// Messages to put back into the queue, in store order, with their original ids.
    pub restore: Vec<Message>,
    /// The lines the store keeps, in store order.
    pub keep: Vec<Vec<u8>>,
    /// How many items were kept, per reason (lines for line-level reasons, messages otherwise).
    pub kept: std::collections::BTreeMap<KeptReason, usize>,
    /// The age of the oldest message kept as too old.
    pub oldest_kept_age: Option<Duration>,
}

/// Decides, for one rule's store, what goes back into its queue and what stays.
///
/// `now_ms` and `max_age` give each message's age by its id (UUIDv7 = `received_at`): one the
/// queue would expire is kept. `room` is the bytes the queue can take without dropping
/// anything; once a message does not fit, it and every later one are kept, so the order of
/// what is restored stays the store's. A letter whose messages are only partly restored is
/// kept with the rest of its messages; a letter restored whole leaves the store.
pub fn plan_replay(
    lines: Vec<StoredLine>,
    now_ms: u64,
    max_age: Duration,
    room: u64,
) -> ReplayPlan {
    let mut plan = ReplayPlan::default();
    let mut room_left = room;
    let mut full = false;
    let max_age_ms = max_age.as_millis().min(u128::from(u64::MAX)) as u64;
    for line in lines {
        let (mut letter, raw) = match line {
            StoredLine::Unreadable { raw, .. } => {
                plan.keep_line(raw, KeptReason::UnreadableLine, 1);
                continue;
            }
            StoredLine::Letter { letter, raw } => (letter, raw),
        };
        let Some(entries) = letter.event.get("messages").and_then(|m| m.as_array()) else {
            let reason =
                if letter.event.get("window").is_some() || letter.event.get("groups").is_some() {
                    KeptReason::Window
                } else {
                    KeptReason::UnknownEvent
                };
            plan.keep_line(raw, reason, 1);
            continue;
        };
        let mut left: Vec<serde_json::Value> = Vec::new();
        for entry in entries {
            let Some(message) = message_of(entry) else {
                plan.count(KeptReason::UnreadableMessage, 1);
                left.push(entry.clone());
                continue;
            };
            let age_ms = now_ms.saturating_sub(message.received_at_ms());
            if age_ms > max_age_ms {
                plan.count(KeptReason::TooOld, 1);
                let age = Duration::from_millis(age_ms);
                plan.oldest_kept_age = Some(plan.oldest_kept_age.map_or(age, |o| o.max(age)));
                left.push(entry.clone());
                continue;
            }
            let size = crate::buffer::record::encoded_len(&message) as u64;
            if full || size > room_left {
                full = true;
                plan.count(KeptReason::NoRoom, 1);
                left.push(entry.clone());
                continue;
            }
            room_left -= size;
            plan.restore.push(message);
        }
        if left.len() == entries.len() {
            plan.keep.push(raw);
        } else if !left.is_empty() {
            letter.event["messages"] = serde_json::Value::Array(left);
            // A DeadLetter always serializes; should it not, the original line is kept whole
            // (its restored messages would then be replayed twice, never lost).
            plan.keep.push(serde_json::to_vec(&letter).unwrap_or(raw));
        }
    }
    plan
}

impl ReplayPlan {
    fn count(&mut self, reason: KeptReason, n: usize) {
        *self.kept.entry(reason).or_default() += n;
    }

    fn keep_line(&mut self, raw: Vec<u8>, reason: KeptReason, n: usize) {
        self.keep.push(raw);
        self.count(reason, n);
    }
}

/// One message of an event as it was received (id included), or `None` when it lacks a valid
/// id, topic or payload.
fn message_of(m: &serde_json::Value) -> Option<Message> {
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
        properties: m
            .get("properties")
            .and_then(crate::core::envelope::Properties::from_json),
    })
}

/// The messages of a dead letter's event, as they were received (ids included); messages
/// without a valid id, topic or payload are left out.
pub fn messages_of(letter: &DeadLetter) -> Vec<Message> {
    letter
        .event
        .get("messages")
        .and_then(|m| m.as_array())
        .map(|messages| messages.iter().filter_map(message_of).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::envelope::encode_event;
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
            Message::received("a/text".into(), b"hello".to_vec(), 2, true, UNIX_EPOCH)
                .with_properties(crate::core::envelope::Properties::kept(
                    vec![("k".into(), "v".into())],
                    Some("text/plain".into()),
                )),
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
    fn the_append_that_creates_the_file_fsyncs_its_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = crate::buffer::FaultStorage::new();
        let store = DeadLetters::with_storage(dir.path(), Arc::new(storage.clone()));
        let letter = letter_with(vec![Message::received(
            "a".into(),
            b"1".to_vec(),
            1,
            false,
            SystemTime::now(),
        )]);
        store.append(&letter).expect("append");
        assert_eq!(storage.dir_syncs(), 1, "the new file's directory entry");
        store.append(&letter).expect("append");
        assert_eq!(storage.dir_syncs(), 1, "an existing file needs none");
        assert_eq!(store.count(), 2);
    }

    #[test]
    fn a_torn_last_line_is_kept_apart_and_the_next_entry_stays_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DeadLetters::new(dir.path());
        std::fs::write(store.path(), "{\"rule\":\"r\",\"rea").expect("write");
        assert_eq!(store.list().expect("list"), vec![]);
        let letter = letter_with(vec![Message::received(
            "a".into(),
            b"1".to_vec(),
            1,
            false,
            SystemTime::now(),
        )]);
        store.append(&letter).expect("append");
        let lines = store.read().expect("read");
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(
            matches!(&lines[0], StoredLine::Unreadable { line: 1, raw, .. } if raw == b"{\"rule\":\"r\",\"rea"),
            "{lines:#?}"
        );
        assert!(matches!(&lines[1], StoredLine::Letter { letter: l, .. } if *l == letter));
        assert_eq!(store.count(), 2);
    }

    fn letter_with(messages: Vec<Message>) -> DeadLetter {
        DeadLetter {
            rule: "r".into(),
            reason: "function not found".into(),
            code: "ResourceNotFoundException".into(),
            attempts: 1,
            first_attempt_at: timestamp(UNIX_EPOCH),
            last_attempt_at: timestamp(UNIX_EPOCH),
            event: serde_json::from_slice(&encode_event("r", &messages)).expect("json"),
        }
    }

    fn stored(letter: &DeadLetter) -> StoredLine {
        StoredLine::Letter {
            letter: letter.clone(),
            raw: serde_json::to_vec(letter).expect("json"),
        }
    }

    const DAY: Duration = Duration::from_secs(24 * 3600);

    /// A message received at `ms` since the epoch. Built here rather than with
    /// `Message::received`, whose shared id context keeps ids monotonic and so would move a
    /// back-dated id forward.
    fn received_at(topic: &str, payload: &[u8], ms: u64) -> Message {
        let ts =
            uuid::Timestamp::from_unix(uuid::NoContext, ms / 1000, (ms % 1000) as u32 * 1_000_000);
        Message {
            id: uuid::Uuid::new_v7(ts),
            topic: topic.to_owned(),
            payload: payload.to_vec(),
            qos: 1,
            retain: false,
            properties: None,
        }
    }

    #[test]
    fn replay_restores_what_the_queue_can_deliver_and_keeps_everything_else() {
        let now = 100 * DAY.as_millis() as u64;
        let fresh = received_at("t/fresh", b"1", now - 1000);
        let old = received_at("t/old", b"2", now - 8 * DAY.as_millis() as u64);
        let mixed = letter_with(vec![fresh.clone(), old.clone()]);
        let whole = letter_with(vec![fresh.clone()]);
        let window = DeadLetter {
            event: serde_json::json!({"rule": "r", "window": {"start": "x", "end": "y"}, "groups": []}),
            ..whole.clone()
        };
        let shapeless = DeadLetter {
            event: serde_json::json!({"rule": "r"}),
            ..whole.clone()
        };
        let mut broken = whole.clone();
        broken.event["messages"][0]["id"] = serde_json::json!("not-a-uuid");
        let garbage = StoredLine::Unreadable {
            line: 9,
            raw: b"\x00 not json".to_vec(),
            why: "x".into(),
        };
        let lines = vec![
            stored(&mixed),
            garbage,
            stored(&window),
            stored(&whole),
            stored(&shapeless),
            stored(&broken),
        ];
        let plan = plan_replay(lines, now, 7 * DAY, u64::MAX);

        assert_eq!(plan.restore, vec![fresh.clone(), fresh.clone()]);
        let kept: Vec<_> = plan.kept.iter().map(|(r, n)| (*r, *n)).collect();
        assert_eq!(
            kept,
            [
                (KeptReason::UnreadableLine, 1),
                (KeptReason::Window, 1),
                (KeptReason::UnknownEvent, 1),
                (KeptReason::UnreadableMessage, 1),
                (KeptReason::TooOld, 1),
            ]
        );
        assert_eq!(
            plan.oldest_kept_age,
            Some(Duration::from_millis(8 * DAY.as_millis() as u64))
        );
        // Kept in store order: the mixed letter with only its old message, the garbage line
        // verbatim, the window and shapeless events verbatim, the broken letter whole.
        assert_eq!(plan.keep.len(), 5);
        let mixed_kept: DeadLetter = serde_json::from_slice(&plan.keep[0]).expect("entry");
        assert_eq!(messages_of(&mixed_kept), vec![old]);
        assert_eq!(mixed_kept.reason, mixed.reason);
        assert_eq!(plan.keep[1], b"\x00 not json");
        assert_eq!(plan.keep[2], serde_json::to_vec(&window).expect("json"));
        assert_eq!(plan.keep[3], serde_json::to_vec(&shapeless).expect("json"));
        assert_eq!(plan.keep[4], serde_json::to_vec(&broken).expect("json"));
    }

    #[test]
    fn replay_keeps_in_order_what_the_queue_has_no_room_for() {
        let now = 10 * DAY.as_millis() as u64;
        let messages: Vec<Message> = (0..4)
            .map(|i| received_at(&format!("t/{i}"), &[b'x'; 10], now - 10))
            .collect();
        let size = crate::buffer::record::encoded_len(&messages[0]) as u64;
        let big = received_at("t/big", &[b'x'; 1000], now - 10);
        let lines = vec![
            stored(&letter_with(vec![messages[0].clone(), big.clone()])),
            stored(&letter_with(vec![messages[1].clone()])),
        ];
        // Room for two small messages: the big one does not fit, and the one after it waits
        // too, so what is restored keeps the store's order.
        let plan = plan_replay(lines, now, DAY, 2 * size);
        assert_eq!(plan.restore, vec![messages[0].clone()]);
        assert_eq!(plan.kept.get(&KeptReason::NoRoom), Some(&2));
        assert_eq!(plan.keep.len(), 2);
        let first: DeadLetter = serde_json::from_slice(&plan.keep[0]).expect("entry");
        assert_eq!(messages_of(&first), vec![big]);
    }

    #[test]
    fn a_store_restored_whole_keeps_nothing() {
        let now = 10 * DAY.as_millis() as u64;
        let m = received_at("t", b"1", now);
        let plan = plan_replay(
            vec![stored(&letter_with(vec![m.clone()]))],
            now,
            DAY,
            u64::MAX,
        );
        assert_eq!(plan.restore, vec![m]);
        assert!(plan.keep.is_empty() && plan.kept.is_empty(), "{plan:#?}");
    }

    #[test]
    fn replace_rewrites_the_store_and_an_empty_replacement_removes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DeadLetters::new(dir.path());
        std::fs::write(store.path(), "a\nb\nc\n").expect("write");
        store
            .replace(&[b"b".to_vec(), b"\x00 raw".to_vec()])
            .expect("replace");
        assert_eq!(std::fs::read(store.path()).expect("read"), b"b\n\x00 raw\n");
        assert!(!dir.path().join(TEMP_FILE_NAME).exists());
        store.replace(&[]).expect("replace");
        assert!(!store.path().exists());
    }
}
