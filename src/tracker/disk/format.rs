//! The byte layouts of the tracker's data directory: segment headers, log records and snapshot
//! files, encoded into and decoded from memory. Pure: no files, no clocks. Decoding never
//! panics on any input; it says what is wrong so that recovery can tell a torn tail from
//! damage (see `recover`).
//!
//! Layouts (integers big-endian, CRC = CRC-32C (Castagnoli)):
//!
//! ```text
//! segment = header | record*
//! header  = "P2PSWAL\0" | u16 version (1) | u16 zero | u64 segment_no | u32 crc(previous 20 bytes)
//! record  = u32 RECORD_MARKER | u32 len | u32 crc(len | kind | body) | u8 kind | body
//!           (len = 1 + body length, at most MAX_RECORD_LEN)
//!   kind 1 entries:  u64 first_seq | u64 last_seq | payload      (first_seq <= last_seq)
//!   kind 2 truncate: u64 from_seq                                 (records with seq >= it are void)
//!   kind 3 meta:     blob                                         (the caller's metadata)
//! snapshot = "P2PSSNP\0" | u16 version (1) | u16 zero | u64 seq | u64 len | state (len bytes)
//!            | u32 crc(everything before)
//! ```
//!
//! The record marker is there so that recovery can look for valid records after a bad one
//! without trying every byte offset: a bad record followed by a valid one is damage, a bad
//! record followed by nothing valid is a torn tail.

use std::fmt;

pub const SEGMENT_MAGIC: [u8; 8] = *b"P2PSWAL\0";
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"P2PSSNP\0";
pub const FORMAT_VERSION: u16 = 1;
pub const SEGMENT_HEADER_LEN: usize = 24;
/// "WALR": the first four bytes of every record.
pub const RECORD_MARKER: u32 = 0x5741_4c52;
pub const RECORD_HEADER_LEN: usize = 12;
/// The largest `len` of a record (kind byte plus body). The tracker's largest batch is about
/// 8 MiB of entries; this leaves room and still rejects absurd lengths from damaged bytes.
pub const MAX_RECORD_LEN: usize = 64 << 20;
/// The largest payload an entries record can carry.
pub const MAX_PAYLOAD_LEN: usize = MAX_RECORD_LEN - 1 - 16;
pub const SNAPSHOT_HEADER_LEN: usize = 28;
pub const SNAPSHOT_TRAILER_LEN: usize = 4;

const KIND_ENTRIES: u8 = 1;
const KIND_TRUNCATE: u8 = 2;
const KIND_META: u8 = 3;

/// One decoded log record, borrowing its bytes from the segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    Entries {
        first_seq: u64,
        last_seq: u64,
        payload: &'a [u8],
    },
    TruncateFrom(u64),
    Meta(&'a [u8]),
}

/// Why the bytes at an offset are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// The file ends inside the record's header or body.
    Truncated,
    BadMarker,
    BadLength(u32),
    BadChecksum,
    /// The checksum holds but the body does not make sense (unknown kind, wrong size,
    /// `first_seq > last_seq`): written by another version, or a bug.
    BadBody(&'static str),
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::Truncated => f.write_str("record cut short by the end of the file"),
            RecordError::BadMarker => f.write_str("no record marker"),
            RecordError::BadLength(n) => write!(f, "impossible record length {n}"),
            RecordError::BadChecksum => f.write_str("record checksum mismatch"),
            RecordError::BadBody(what) => write!(f, "bad record body: {what}"),
        }
    }
}

fn crc(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |c, p| crc32c::crc32c_append(c, p))
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

pub fn emit_segment_header(segment_no: u64, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&SEGMENT_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&segment_no.to_be_bytes());
    let c = crc(&[&out[start..]]);
    out.extend_from_slice(&c.to_be_bytes());
}

/// The segment number a header names, or what is wrong with it.
pub fn parse_segment_header(b: &[u8]) -> Result<u64, &'static str> {
    if b.len() < SEGMENT_HEADER_LEN {
        return Err("file shorter than a segment header");
    }
    if b[..8] != SEGMENT_MAGIC {
        return Err("not a log segment (bad magic)");
    }
    if u32_at(b, 20) != crc(&[&b[..20]]) {
        return Err("segment header checksum mismatch");
    }
    if u16_at(b, 8) != FORMAT_VERSION {
        return Err("unknown segment format version");
    }
    Ok(u64_at(b, 12))
}

fn emit_record(kind: u8, fixed: &[u8], tail: &[u8], out: &mut Vec<u8>) {
    let len = (1 + fixed.len() + tail.len()) as u32;
    let len_bytes = len.to_be_bytes();
    let c = crc(&[&len_bytes, &[kind], fixed, tail]);
    out.extend_from_slice(&RECORD_MARKER.to_be_bytes());
    out.extend_from_slice(&len_bytes);
    out.extend_from_slice(&c.to_be_bytes());
    out.push(kind);
    out.extend_from_slice(fixed);
    out.extend_from_slice(tail);
}

/// Bytes an entries record with this payload takes in a segment.
pub fn entries_record_len(payload_len: usize) -> usize {
    RECORD_HEADER_LEN + 1 + 16 + payload_len
}

/// Appends an entries record. The caller has checked `payload.len() <= MAX_PAYLOAD_LEN`.
pub fn emit_entries(first_seq: u64, last_seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    let mut fixed = [0u8; 16];
    fixed[..8].copy_from_slice(&first_seq.to_be_bytes());
    fixed[8..].copy_from_slice(&last_seq.to_be_bytes());
    emit_record(KIND_ENTRIES, &fixed, payload, out);
}

pub fn emit_truncate(from_seq: u64, out: &mut Vec<u8>) {
    emit_record(KIND_TRUNCATE, &from_seq.to_be_bytes(), &[], out);
}

/// Appends a meta record. The caller has checked `blob.len() < MAX_RECORD_LEN`.
pub fn emit_meta(blob: &[u8], out: &mut Vec<u8>) {
    emit_record(KIND_META, &[], blob, out);
}

/// Decodes the record starting at `at`; on success also returns the offset just after it.
pub fn parse_record(b: &[u8], at: usize) -> Result<(Record<'_>, usize), RecordError> {
    let rest = b.get(at..).unwrap_or(&[]);
    if rest.len() < RECORD_HEADER_LEN {
        return Err(RecordError::Truncated);
    }
    if u32_at(rest, 0) != RECORD_MARKER {
        return Err(RecordError::BadMarker);
    }
    let len = u32_at(rest, 4);
    if len == 0 || len as usize > MAX_RECORD_LEN {
        return Err(RecordError::BadLength(len));
    }
    let end = RECORD_HEADER_LEN + len as usize;
    if rest.len() < end {
        return Err(RecordError::Truncated);
    }
    let content = &rest[RECORD_HEADER_LEN..end];
    if u32_at(rest, 8) != crc(&[&rest[4..8], content]) {
        return Err(RecordError::BadChecksum);
    }
    let (kind, body) = (content[0], &content[1..]);
    let record = match kind {
        KIND_ENTRIES => {
            if body.len() < 16 {
                return Err(RecordError::BadBody("entries record shorter than its seqs"));
            }
            let (first_seq, last_seq) = (u64_at(body, 0), u64_at(body, 8));
            if first_seq == 0 || first_seq > last_seq {
                return Err(RecordError::BadBody("entries record with bad seqs"));
            }
            Record::Entries {
                first_seq,
                last_seq,
                payload: &body[16..],
            }
        }
        KIND_TRUNCATE => {
            if body.len() != 8 {
                return Err(RecordError::BadBody("truncate record of the wrong size"));
            }
            Record::TruncateFrom(u64_at(body, 0))
        }
        KIND_META => Record::Meta(body),
        _ => return Err(RecordError::BadBody("unknown record kind")),
    };
    Ok((record, at + end))
}

/// The offset of the first valid record starting after `from`, if any: recovery's test for
/// "is anything valid written after this bad record?". Only offsets holding the record
/// marker are tried, so this is a scan of the bytes plus a checksum per marker found.
pub fn next_valid_record(b: &[u8], from: usize) -> Option<usize> {
    let marker = RECORD_MARKER.to_be_bytes();
    let mut at = from.checked_add(1)?;
    while at + RECORD_HEADER_LEN <= b.len() {
        let window = &b[at..];
        let hit = window.windows(4).position(|w| w == marker)?;
        at += hit;
        if parse_record(b, at).is_ok() {
            return Some(at);
        }
        at += 1;
    }
    None
}

pub fn emit_snapshot(seq: u64, state: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&SNAPSHOT_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&(state.len() as u64).to_be_bytes());
    out.extend_from_slice(state);
    let c = crc(&[&out[start..]]);
    out.extend_from_slice(&c.to_be_bytes());
}

/// The header of a snapshot file (everything before the state bytes), for writing a large
/// state without copying it: header, then the state, then [`snapshot_trailer`].
pub fn snapshot_header(seq: u64, state_len: usize) -> [u8; SNAPSHOT_HEADER_LEN] {
    let mut h = [0u8; SNAPSHOT_HEADER_LEN];
    h[..8].copy_from_slice(&SNAPSHOT_MAGIC);
    h[8..10].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
    h[12..20].copy_from_slice(&seq.to_be_bytes());
    h[20..28].copy_from_slice(&(state_len as u64).to_be_bytes());
    h
}

pub fn snapshot_trailer(header: &[u8], state: &[u8]) -> [u8; SNAPSHOT_TRAILER_LEN] {
    crc(&[header, state]).to_be_bytes()
}

/// Decodes a whole snapshot file into (seq, state bytes), or says what is wrong.
pub fn parse_snapshot(b: &[u8]) -> Result<(u64, &[u8]), &'static str> {
    if b.len() < SNAPSHOT_HEADER_LEN + SNAPSHOT_TRAILER_LEN {
        return Err("file shorter than a snapshot header");
    }
    if b[..8] != SNAPSHOT_MAGIC {
        return Err("not a snapshot (bad magic)");
    }
    let body_end = b.len() - SNAPSHOT_TRAILER_LEN;
    if u32_at(b, body_end) != crc(&[&b[..body_end]]) {
        return Err("snapshot checksum mismatch");
    }
    if u16_at(b, 8) != FORMAT_VERSION {
        return Err("unknown snapshot format version");
    }
    let seq = u64_at(b, 12);
    let len = u64_at(b, 20);
    if len != (body_end - SNAPSHOT_HEADER_LEN) as u64 {
        return Err("snapshot length does not match the file");
    }
    Ok((seq, &b[SNAPSHOT_HEADER_LEN..body_end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_bytes_of_a_truncate_record() {
        let mut out = Vec::new();
        emit_truncate(0x0102, &mut out);
        let len = 9u32.to_be_bytes();
        let mut want = vec![0x57, 0x41, 0x4c, 0x52];
        want.extend_from_slice(&len);
        let c = crc(&[&len, &[2], &[0, 0, 0, 0, 0, 0, 1, 2]]);
        want.extend_from_slice(&c.to_be_bytes());
        want.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(out, want);
        // CRC-32C check value of "123456789" (the Castagnoli polynomial, not CRC-32).
        assert_eq!(crc(&[b"123456789"]), 0xe306_9283);
    }

    #[test]
    fn records_round_trip_and_every_prefix_is_truncated() {
        let mut out = Vec::new();
        emit_entries(5, 7, b"payload", &mut out);
        assert_eq!(out.len(), entries_record_len(7));
        let (rec, end) = parse_record(&out, 0).unwrap();
        assert_eq!(
            rec,
            Record::Entries {
                first_seq: 5,
                last_seq: 7,
                payload: b"payload"
            }
        );
        assert_eq!(end, out.len());
        for n in 0..out.len() {
            assert_eq!(
                parse_record(&out[..n], 0).unwrap_err(),
                RecordError::Truncated
            );
        }
        let mut meta = Vec::new();
        emit_meta(b"", &mut meta);
        assert_eq!(parse_record(&meta, 0).unwrap().0, Record::Meta(b""));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let mut out = Vec::new();
        emit_entries(1, 1, b"abc", &mut out);
        for i in 0..out.len() {
            for bit in 0..8 {
                let mut bad = out.clone();
                bad[i] ^= 1 << bit;
                assert!(parse_record(&bad, 0).is_err(), "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn headers_and_snapshots_round_trip() {
        let mut h = Vec::new();
        emit_segment_header(42, &mut h);
        assert_eq!(h.len(), SEGMENT_HEADER_LEN);
        assert_eq!(parse_segment_header(&h), Ok(42));
        h[13] ^= 1;
        assert!(parse_segment_header(&h).is_err());

        let mut s = Vec::new();
        emit_snapshot(9, b"state", &mut s);
        assert_eq!(parse_snapshot(&s), Ok((9, &b"state"[..])));
        let header = snapshot_header(9, 5);
        let mut pieces = header.to_vec();
        pieces.extend_from_slice(b"state");
        pieces.extend_from_slice(&snapshot_trailer(&header, b"state"));
        assert_eq!(pieces, s);
        for i in 0..s.len() {
            let mut bad = s.clone();
            bad[i] ^= 0x40;
            assert!(parse_snapshot(&bad).is_err(), "byte {i}");
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = (x % 64) as usize;
            let mut b: Vec<u8> = (0..n).map(|i| (x >> (i % 8 * 8)) as u8).collect();
            if n >= 4 && x & 1 == 0 {
                b[..4].copy_from_slice(&RECORD_MARKER.to_be_bytes());
            }
            let _ = parse_record(&b, 0);
            let _ = parse_record(&b, n / 2);
            let _ = next_valid_record(&b, 0);
            let _ = parse_segment_header(&b);
            let _ = parse_snapshot(&b);
        }
    }

    #[test]
    fn next_valid_record_skips_damage() {
        let mut out = Vec::new();
        emit_entries(1, 1, b"aaaa", &mut out);
        let second = out.len();
        emit_entries(2, 2, b"bbbb", &mut out);
        out[20] ^= 1;
        assert!(parse_record(&out, 0).is_err());
        assert_eq!(next_valid_record(&out, 0), Some(second));
        assert_eq!(next_valid_record(&out, second), None);
    }
}
