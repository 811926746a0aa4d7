//! The on-disk record: one message, or an ack position, framed with its length and a CRC32C.
//! Pure: bytes in, bytes out.
//!
//! ```text
//! offset  size  field
//!      0     4  body length N, u32 little-endian (everything after the CRC)
//!      4     4  CRC32C of the body, u32 little-endian
//!      8     8  sequence number, u64 LE
//!     16    16  message id (UUIDv7 bytes; its timestamp is received_at)
//!     32     1  QoS
//!     33     1  flags: bit 0 = retain, bit 1 = MQTT 5 properties follow the topic
//!     34     2  topic length T, u16 LE
//!     36     T  topic, UTF-8
//!   36+T     …  payload, to the end of the body
//! ```
//!
//! 36 bytes of framing per message: a 200-byte reading takes 236 bytes on disk.
//!
//! With flags bit 1 (a message that carried MQTT 5 user properties or a content type), a
//! properties block sits between the topic and the payload:
//!
//! ```text
//! size  field
//!    4  block length P, u32 LE (the bytes below)
//!    1  content type present: 0 or 1
//!  2+C  if present: length C, u16 LE, then the content type, UTF-8
//!    4  user property count U, u32 LE
//!       U times: name length, u16 LE, name, value length, u16 LE, value (UTF-8)
//!    …  only when the request carried a Response Topic or Correlation Data:
//!    1  which follow: bit 0 = Response Topic, bit 1 = Correlation Data
//!  2+R  if bit 0: length R, u16 LE, then the Response Topic, UTF-8
//!  4+D  if bit 1: length D, u32 LE, then the Correlation Data
//! ```
//!
//! A block without the trailing part reads as before: records written before replies existed
//! need no conversion, and a binary from before reads every record of a message that asked for
//! no reply.
//!
//! Records without bit 1 (every record written before properties existed) read as before, so
//! old buffers need no conversion. Other flag bits are unused and make a record corrupt. A
//! binary older than the properties block would read a record with bit 1 as a payload with the
//! block in front: drain the buffer before downgrading.
//!
//! An **ack record** (segments with magic `MLBSEG02` only) has the same framing and fields, with
//! QoS [`ACK_MARKER`] (0xAC, a value no message has: MQTT QoS is 0 to 2, and decoding refuses
//! anything else as a message), the first unacknowledged sequence number in the sequence field,
//! and everything else empty: id all zeros, flags 0, topic length 0, no payload. It is 36 bytes,
//! does not consume a sequence number, and is never handed to a reader. Anything else with
//! QoS 0xAC is corrupt.
//!
//! **Do not change these fields, their order, or the meaning of QoS 0xAC**: existing buffers on
//! gateways must stay readable. A new format gets a new segment magic (see `disk.rs`).

use crate::core::envelope::{Message, Properties};

use super::Seq;

/// Length and CRC in front of the body.
pub const HEADER_LEN: usize = 8;
/// Fixed part of the body before the topic.
const FIXED_BODY_LEN: usize = 8 + 16 + 1 + 1 + 2;
/// Largest body accepted when reading: anything longer is a corrupt length field. Messages over
/// Lambda's 6 MiB limit never reach the queue, so 64 MiB leaves ample room.
pub const MAX_BODY_LEN: usize = 64 * 1024 * 1024;

/// The QoS byte of an ack record: no message can have it (MQTT QoS is 0, 1 or 2).
pub const ACK_MARKER: u8 = 0xAC;
/// Bytes an ack record takes on disk, header included.
pub const ACK_RECORD_LEN: usize = HEADER_LEN + FIXED_BODY_LEN;
/// Highest QoS a message record may carry.
const MAX_QOS: u8 = 2;
/// Flags bit: the message was retained.
const FLAG_RETAIN: u8 = 1;
/// Flags bit: a properties block follows the topic.
const FLAG_PROPERTIES: u8 = 2;

/// Bytes a message takes on disk, header included.
pub fn encoded_len(message: &Message) -> usize {
    HEADER_LEN
        + FIXED_BODY_LEN
        + message.topic.len()
        + message
            .properties
            .as_deref()
            .map_or(0, |p| 4 + properties_len(p))
        + message.payload.len()
}

/// MQTT strings are at most 65535 bytes; longer ones (never from a broker) are cut.
fn mqtt_str(s: &str) -> &[u8] {
    &s.as_bytes()[..s.len().min(u16::MAX as usize)]
}

fn properties_len(p: &Properties) -> usize {
    let reply = if p.response_topic.is_some() || p.correlation_data.is_some() {
        1 + p
            .response_topic
            .as_deref()
            .map_or(0, |t| 2 + mqtt_str(t).len())
            + p.correlation_data.as_ref().map_or(0, |d| 4 + d.len())
    } else {
        0
    };
    reply
        + 1
        + p.content_type
            .as_deref()
            .map_or(0, |c| 2 + mqtt_str(c).len())
        + 4
        + p.user
            .iter()
            .map(|(k, v)| 4 + mqtt_str(k).len() + mqtt_str(v).len())
            .sum::<usize>()
}

fn encode_properties(p: &Properties, out: &mut Vec<u8>) {
    let push_str = |out: &mut Vec<u8>, s: &str| {
        let bytes = mqtt_str(s);
        out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        out.extend_from_slice(bytes);
    };
    out.extend_from_slice(&(properties_len(p) as u32).to_le_bytes());
    match &p.content_type {
        Some(c) => {
            out.push(1);
            push_str(out, c);
        }
        None => out.push(0),
    }
    out.extend_from_slice(&(p.user.len() as u32).to_le_bytes());
    for (k, v) in &p.user {
        push_str(out, k);
        push_str(out, v);
    }
    if p.response_topic.is_some() || p.correlation_data.is_some() {
        out.push(
            u8::from(p.response_topic.is_some()) | u8::from(p.correlation_data.is_some()) << 1,
        );
        if let Some(topic) = &p.response_topic {
            push_str(out, topic);
        }
        if let Some(data) = &p.correlation_data {
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(data);
        }
    }
}

/// Reads a properties block front to back.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let bytes = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(bytes)
    }

    fn string(&mut self) -> Option<String> {
        let n = u16::from_le_bytes(self.take(2)?.try_into().ok()?) as usize;
        Some(std::str::from_utf8(self.take(n)?).ok()?.to_owned())
    }
}

/// The properties block at the start of `rest` and the bytes after it.
fn decode_properties(rest: &[u8]) -> Option<(Properties, &[u8])> {
    let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let block = rest.get(4..4usize.checked_add(len)?)?;
    let after = &rest[4 + len..];
    let mut cursor = Cursor {
        bytes: block,
        at: 0,
    };
    let content_type = match cursor.take(1)? {
        [0] => None,
        [1] => Some(cursor.string()?),
        _ => return None,
    };
    let count = u32::from_le_bytes(cursor.take(4)?.try_into().ok()?);
    let mut user = Vec::new();
    for _ in 0..count {
        let name = cursor.string()?;
        let value = cursor.string()?;
        user.push((name, value));
    }
    let (mut response_topic, mut correlation_data) = (None, None);
    if cursor.at < block.len() {
        let which = cursor.take(1)?[0];
        if which & !0b11 != 0 || which == 0 {
            return None;
        }
        if which & 1 != 0 {
            response_topic = Some(cursor.string()?);
        }
        if which & 2 != 0 {
            let n = u32::from_le_bytes(cursor.take(4)?.try_into().ok()?) as usize;
            correlation_data = Some(cursor.take(n)?.to_vec());
        }
    }
    // The block must be exactly what its fields take.
    if cursor.at != block.len() {
        return None;
    }
    Some((
        Properties {
            user,
            content_type,
            response_topic,
            correlation_data,
        },
        after,
    ))
}

/// Appends the record for `message` with sequence number `seq` to `out`.
pub fn encode(seq: Seq, message: &Message, out: &mut Vec<u8>) {
    let topic = message.topic.as_bytes();
    // MQTT limits topics to 65535 bytes, so the cast cannot truncate.
    let topic_len = topic.len().min(u16::MAX as usize);
    let properties = message.properties.as_deref();
    let body_len = FIXED_BODY_LEN
        + topic_len
        + properties.map_or(0, |p| 4 + properties_len(p))
        + message.payload.len();
    let start = out.len();
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(message.id.as_bytes());
    out.push(message.qos);
    let mut flags = 0;
    if message.retain {
        flags |= FLAG_RETAIN;
    }
    if properties.is_some() {
        flags |= FLAG_PROPERTIES;
    }
    out.push(flags);
    out.extend_from_slice(&(topic_len as u16).to_le_bytes());
    out.extend_from_slice(&topic[..topic_len]);
    if let Some(p) = properties {
        encode_properties(p, out);
    }
    out.extend_from_slice(&message.payload);
    let crc = crc32c::crc32c(&out[start + HEADER_LEN..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Appends an ack record saying that every sequence below `position` is acknowledged.
pub fn encode_ack(position: Seq, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&(FIXED_BODY_LEN as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&position.to_le_bytes());
    out.extend_from_slice(&[0; 16]);
    out.push(ACK_MARKER);
    out.push(0);
    out.extend_from_slice(&0u16.to_le_bytes());
    let crc = crc32c::crc32c(&out[start + HEADER_LEN..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// What the bytes at the start of a buffer hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole, valid record of `len` bytes.
    Record {
        /// Its sequence number.
        seq: Seq,
        /// The message.
        message: Message,
        /// Bytes it took, header included.
        len: usize,
    },
    /// A whole, valid ack record of `len` bytes: every sequence below `position` is
    /// acknowledged.
    Ack {
        /// The first unacknowledged sequence number it records.
        position: Seq,
        /// Bytes it took, header included.
        len: usize,
    },
    /// The buffer ends before the record does (a torn write, or simply the end).
    Incomplete,
    /// The bytes are not a valid record: bad length, CRC mismatch, or a malformed body.
    Corrupt,
}

/// Decodes the record at the start of `buf`.
pub fn decode(buf: &[u8]) -> Decoded {
    if buf.len() < HEADER_LEN {
        return Decoded::Incomplete;
    }
    let body_len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !(FIXED_BODY_LEN..=MAX_BODY_LEN).contains(&body_len) {
        return Decoded::Corrupt;
    }
    let len = HEADER_LEN + body_len;
    if buf.len() < len {
        return Decoded::Incomplete;
    }
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let body = &buf[HEADER_LEN..len];
    if crc32c::crc32c(body) != crc {
        return Decoded::Corrupt;
    }
    if body.get(24) == Some(&ACK_MARKER) {
        return match decode_ack_body(body) {
            Some(position) => Decoded::Ack { position, len },
            None => Decoded::Corrupt,
        };
    }
    match decode_body(body) {
        Some((seq, message)) => Decoded::Record { seq, message, len },
        None => Decoded::Corrupt,
    }
}

/// Only the length a record claims and whether its header is plausible: lets a reader skip a
/// record's payload without decoding it.
pub fn claimed_len(header: &[u8]) -> Option<usize> {
    let bytes: [u8; 4] = header.get(..4)?.try_into().ok()?;
    let body_len = u32::from_le_bytes(bytes) as usize;
    (FIXED_BODY_LEN..=MAX_BODY_LEN)
        .contains(&body_len)
        .then_some(HEADER_LEN + body_len)
}

/// An ack record's position, if the body is exactly an ack record's.
fn decode_ack_body(body: &[u8]) -> Option<Seq> {
    if body.len() != FIXED_BODY_LEN || body[8..24].iter().any(|b| *b != 0) || body[25..] != [0; 3] {
        return None;
    }
    Some(u64::from_le_bytes(body.get(0..8)?.try_into().ok()?))
}

fn decode_body(body: &[u8]) -> Option<(Seq, Message)> {
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(body.get(at..at + 8)?.try_into().ok()?))
    };
    let seq = u64_at(0)?;
    let id = uuid::Uuid::from_bytes(body.get(8..24)?.try_into().ok()?);
    let qos = *body.get(24)?;
    let flags = *body.get(25)?;
    let topic_len = u16::from_le_bytes(body.get(26..28)?.try_into().ok()?) as usize;
    let topic = std::str::from_utf8(body.get(28..28 + topic_len)?).ok()?;
    let rest = body.get(28 + topic_len..)?;
    if qos > MAX_QOS || flags & !(FLAG_RETAIN | FLAG_PROPERTIES) != 0 {
        return None;
    }
    let (properties, payload) = if flags & FLAG_PROPERTIES != 0 {
        let (p, payload) = decode_properties(rest)?;
        (Some(Box::new(p)), payload)
    } else {
        (None, rest)
    };
    Some((
        seq,
        Message {
            id,
            topic: topic.to_owned(),
            payload: payload.to_vec(),
            qos,
            retain: flags & FLAG_RETAIN != 0,
            properties,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn message(topic: &str, payload: &[u8]) -> Message {
        Message {
            id: uuid::Uuid::from_u128(0x0123_4567_89ab_7def_8123_4567_89ab_cdef),
            topic: topic.to_owned(),
            payload: payload.to_vec(),
            qos: 1,
            retain: true,
            properties: None,
        }
    }

    #[test]
    fn a_record_with_properties_round_trips_and_every_damage_is_caught() {
        let m = message("a/b", b"{}").with_properties(Properties::kept(
            vec![("k".into(), "v".into()), ("k".into(), "w".into())],
            Some("application/json".into()),
        ));
        let mut buf = Vec::new();
        encode(9, &m, &mut buf);
        assert_eq!(buf.len(), encoded_len(&m));
        assert_eq!(
            decode(&buf),
            Decoded::Record {
                seq: 9,
                message: m,
                len: buf.len()
            }
        );
        assert_truncations_incomplete_and_bit_flips_corrupt(&buf);
    }

    #[test]
    fn a_request_s_response_topic_and_correlation_data_round_trip() {
        for props in [
            Properties::of_request(vec![], None, Some("r/1".into()), Some(vec![0, 255, 7])),
            Properties::of_request(vec![], None, Some("r/1".into()), None),
            Properties::of_request(
                vec![("k".into(), "v".into())],
                Some("text/plain".into()),
                None,
                Some(Vec::new()),
            ),
        ] {
            let m = message("a/b", b"{}").with_properties(props);
            let mut buf = Vec::new();
            encode(3, &m, &mut buf);
            assert_eq!(buf.len(), encoded_len(&m));
            assert_eq!(
                decode(&buf),
                Decoded::Record {
                    seq: 3,
                    message: m,
                    len: buf.len()
                }
            );
            assert_truncations_incomplete_and_bit_flips_corrupt(&buf);
        }
    }

    /// A record as written before properties existed (flags bit 1 unused), byte for byte:
    /// seq 5, id 0x0123…cdef, QoS 1, retained, topic "a/b", payload "hi".
    const OLD_RECORD: [u8; 41] = [
        0x21, 0, 0, 0, 0x33, 0x52, 0x0b, 0x88, // body length 33, CRC32C
        5, 0, 0, 0, 0, 0, 0, 0, // sequence
        0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0x7d, 0xef, 0x81, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd,
        0xef, // id
        1, 1, 3, 0, // QoS, flags, topic length
        b'a', b'/', b'b', b'h', b'i',
    ];

    #[test]
    fn a_record_written_before_properties_existed_still_reads() {
        assert_eq!(
            decode(&OLD_RECORD),
            Decoded::Record {
                seq: 5,
                message: message("a/b", b"hi"),
                len: OLD_RECORD.len()
            }
        );
        // And a message without properties is still written exactly so.
        let mut buf = Vec::new();
        encode(5, &message("a/b", b"hi"), &mut buf);
        assert_eq!(buf, OLD_RECORD);
    }

    #[test]
    fn unknown_flag_bits_are_corrupt() {
        let mut buf = Vec::new();
        encode(5, &message("a/b", b"hi"), &mut buf);
        buf[HEADER_LEN + 25] |= 0x80;
        let crc = crc32c::crc32c(&buf[HEADER_LEN..]);
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&buf), Decoded::Corrupt);
    }

    #[test]
    fn a_record_round_trips() {
        let m = message("sensors/dev1/temperature", br#"{"c":21.5}"#);
        let mut buf = Vec::new();
        encode(42, &m, &mut buf);
        assert_eq!(buf.len(), encoded_len(&m));
        assert_eq!(
            decode(&buf),
            Decoded::Record {
                seq: 42,
                message: m,
                len: buf.len()
            }
        );
    }

    #[test]
    fn a_200_byte_message_costs_36_bytes_of_framing() {
        let m = message("sensors/dev1/temperature", &[b'x'; 176]);
        assert_eq!(encoded_len(&m) - 200, 36);
    }

    /// Every cut of `buf` is incomplete and every flipped bit past the length is corrupt.
    fn assert_truncations_incomplete_and_bit_flips_corrupt(buf: &[u8]) {
        for cut in 0..buf.len() {
            assert_eq!(decode(&buf[..cut]), Decoded::Incomplete, "cut at {cut}");
        }
        for byte in 4..buf.len() {
            for bit in 0..8 {
                let mut bad = buf.to_vec();
                bad[byte] ^= 1 << bit;
                assert_eq!(decode(&bad), Decoded::Corrupt, "byte {byte} bit {bit}");
            }
        }
    }

    #[test]
    fn every_truncation_is_incomplete_and_every_bit_flip_is_corrupt() {
        let m = message("a/b", b"payload");
        let mut buf = Vec::new();
        encode(7, &m, &mut buf);
        assert_truncations_incomplete_and_bit_flips_corrupt(&buf);
        // A flipped length either claims too much (incomplete) or too little (corrupt): never a
        // record.
        for bit in 0..32 {
            let mut bad = buf.clone();
            let len = u32::from_le_bytes([bad[0], bad[1], bad[2], bad[3]]) ^ (1 << bit);
            bad[..4].copy_from_slice(&len.to_le_bytes());
            assert!(
                !matches!(decode(&bad), Decoded::Record { .. }),
                "length bit {bit}"
            );
        }
    }

    #[test]
    fn an_ack_record_round_trips_in_36_bytes_and_every_damage_is_caught() {
        let mut buf = Vec::new();
        encode_ack(52_311, &mut buf);
        assert_eq!(buf.len(), ACK_RECORD_LEN);
        assert_eq!(ACK_RECORD_LEN, 36);
        assert_eq!(
            decode(&buf),
            Decoded::Ack {
                position: 52_311,
                len: 36
            }
        );
        assert_truncations_incomplete_and_bit_flips_corrupt(&buf);
    }

    #[test]
    fn a_record_with_the_ack_marker_and_a_message_body_is_corrupt() {
        let mut m = message("a/b", b"payload");
        m.qos = ACK_MARKER;
        let mut buf = Vec::new();
        encode(7, &m, &mut buf);
        assert_eq!(decode(&buf), Decoded::Corrupt);
    }

    #[test]
    fn zeros_are_corrupt_not_a_record() {
        assert_eq!(decode(&[0; 64]), Decoded::Corrupt);
    }

    proptest! {
        #[test]
        fn any_message_round_trips(
            seq in any::<u64>(),
            topic in "[a-z/+#$]{0,40}",
            payload in prop::collection::vec(any::<u8>(), 0..512),
            qos in 0u8..3,
            retain in any::<bool>(),
            id in any::<u128>(),
            user in prop::collection::vec(("[a-z]{0,4}", "\\PC{0,6}"), 0..4),
            content_type in prop::option::of("[a-z/]{0,12}"),
        ) {
            let properties = Properties::kept(
                user.into_iter().collect(),
                content_type,
            );
            let m = Message { id: uuid::Uuid::from_u128(id), topic, payload, qos, retain, properties };
            let mut buf = vec![0xAA; 3];
            encode(seq, &m, &mut buf);
            let decoded = decode(&buf[3..]);
            prop_assert_eq!(decoded, Decoded::Record { seq, message: m, len: buf.len() - 3 });
        }
    }
}
