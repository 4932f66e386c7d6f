//! Recovery: reads a data directory back into the newest valid snapshot plus the log records
//! after it, and leaves the log ready to append to. The only repair it makes is cutting a
//! torn tail off the last segment (a bad record with nothing valid after it, which is what a
//! crash in the middle of a write leaves); every other inconsistency is a [`DiskError`]
//! naming the file and offset, because going on would silently lose data that may have been
//! acknowledged.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use log::{info, warn};

use super::format::{self, Record, SEGMENT_HEADER_LEN};
use super::writer::{LogState, Segment};
use super::{io_err, segment_name, DiskError, DiskOptions, LogRecord, Recovered, TornTail};

/// A record as read from its segment, with where it was (for error messages).
struct Located {
    record: LogRecord,
    path_idx: usize,
    offset: u64,
}

fn parse_hex_name(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    let hex = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

pub(super) fn recover(
    dir: &Path,
    options: DiskOptions,
) -> Result<(Recovered, LogState), DiskError> {
    let mut segment_nos = Vec::new();
    let mut snapshot_seqs = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir, "list the data directory"))? {
        let entry = entry.map_err(io_err(dir, "list the data directory"))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(no) = parse_hex_name(name, "wal-", ".log") {
            segment_nos.push(no);
        } else if let Some(seq) = parse_hex_name(name, "snap-", ".snap") {
            snapshot_seqs.push(seq);
        } else if name.ends_with(".tmp") {
            // A snapshot or segment that was being written when the process stopped: it was
            // never renamed into place, so nothing relies on it.
            let path = entry.path();
            info!("data dir: removing unfinished {}", path.display());
            fs::remove_file(&path).map_err(io_err(&path, "remove an unfinished file"))?;
        }
    }
    segment_nos.sort_unstable();
    snapshot_seqs.sort_unstable();
    let seg_paths: Vec<PathBuf> = segment_nos
        .iter()
        .map(|&no| dir.join(segment_name(no)))
        .collect();
    for (i, pair) in segment_nos.windows(2).enumerate() {
        if pair[1] != pair[0] + 1 {
            return Err(DiskError::MissingSegment {
                path: seg_paths[i + 1].clone(),
                missing: pair[0] + 1,
            });
        }
    }

    // Read every segment's records in order, applying truncations as they come.
    let mut log: Vec<Located> = Vec::new();
    let mut meta = None;
    let mut max_seqs = vec![0u64; segment_nos.len()];
    let mut torn_tail = None;
    let mut open_len = 0u64;
    for (idx, path) in seg_paths.iter().enumerate() {
        let bytes = fs::read(path).map_err(io_err(path, "read a log segment"))?;
        let no = format::parse_segment_header(&bytes).map_err(|why| DiskError::Corrupt {
            path: path.clone(),
            offset: 0,
            reason: why.into(),
        })?;
        if no != segment_nos[idx] {
            return Err(DiskError::Corrupt {
                path: path.clone(),
                offset: 0,
                reason: format!("header names segment {no:016x}"),
            });
        }
        let is_last = idx + 1 == seg_paths.len();
        let mut at = SEGMENT_HEADER_LEN;
        while at < bytes.len() {
            let (record, next) = match format::parse_record(&bytes, at) {
                Ok(ok) => ok,
                Err(why) => {
                    if let Some(valid) = format::next_valid_record(&bytes, at) {
                        return Err(DiskError::Corrupt {
                            path: path.clone(),
                            offset: at as u64,
                            reason: format!("{why}, followed by a valid record at {valid}"),
                        });
                    }
                    if !is_last {
                        // Segments before the last were fsync'd before the next one began.
                        return Err(DiskError::Corrupt {
                            path: path.clone(),
                            offset: at as u64,
                            reason: format!("{why} in a closed segment"),
                        });
                    }
                    let dropped = (bytes.len() - at) as u64;
                    warn!(
                        "data dir: {} ends in a torn write at offset {at} ({why}): dropping its \
                         last {dropped} bytes",
                        path.display()
                    );
                    cut_tail(path, at as u64)?;
                    torn_tail = Some(TornTail {
                        path: path.clone(),
                        offset: at as u64,
                        bytes_dropped: dropped,
                    });
                    break;
                }
            };
            match record {
                Record::Entries {
                    first_seq,
                    last_seq,
                    payload,
                } => {
                    max_seqs[idx] = max_seqs[idx].max(last_seq);
                    log.push(Located {
                        record: LogRecord {
                            first_seq,
                            last_seq,
                            payload: payload.to_vec(),
                        },
                        path_idx: idx,
                        offset: at as u64,
                    });
                }
                Record::TruncateFrom(from_seq) => {
                    while log.last().is_some_and(|l| l.record.first_seq >= from_seq) {
                        log.pop();
                    }
                    if let Some(l) = log.last().filter(|l| l.record.last_seq >= from_seq) {
                        return Err(DiskError::Corrupt {
                            path: path.clone(),
                            offset: at as u64,
                            reason: format!(
                                "truncation from seq {from_seq} splits the record of seqs \
                                 {}..={} at {} offset {}",
                                l.record.first_seq,
                                l.record.last_seq,
                                seg_paths[l.path_idx].display(),
                                l.offset
                            ),
                        });
                    }
                }
                Record::Meta(blob) => meta = Some(blob.to_vec()),
            }
            at = next;
        }
        if is_last {
            open_len = at.min(bytes.len()) as u64;
        }
    }

    // The newest snapshot that passes its checks; newer ones that fail are remembered, since
    // the log must then reach past them.
    let mut bad_snapshots: Vec<(u64, PathBuf, String)> = Vec::new();
    let mut snapshot = None;
    for &seq in snapshot_seqs.iter().rev() {
        let path = dir.join(super::snapshot_name(seq));
        let checked = match fs::read(&path) {
            Ok(bytes) => match format::parse_snapshot(&bytes) {
                Ok((s, state)) if s == seq => Ok(state.to_vec()),
                Ok((s, _)) => Err(format!("file holds the snapshot of seq {s}")),
                Err(why) => Err(why.to_string()),
            },
            Err(e) => Err(format!("cannot read: {e}")),
        };
        match checked {
            Ok(state) => {
                snapshot = Some((seq, state));
                break;
            }
            Err(why) => {
                warn!("data dir: snapshot {} is unusable: {why}", path.display());
                bad_snapshots.push((seq, path, why));
            }
        }
    }
    let snap_seq = snapshot.as_ref().map_or(0, |(s, _)| *s);

    // The records after the snapshot must continue it without a hole.
    let mut records = Vec::new();
    let mut expected = snap_seq + 1;
    for l in log.into_iter().filter(|l| l.record.last_seq > snap_seq) {
        let ok = if records.is_empty() {
            l.record.first_seq <= expected
        } else {
            l.record.first_seq == expected
        };
        if !ok {
            return Err(DiskError::Gap {
                expected_seq: expected,
                path: seg_paths[l.path_idx].clone(),
                offset: l.offset,
                found_seq: l.record.first_seq,
                bad_snapshots: bad_snapshots
                    .iter()
                    .map(|(_, p, why)| (p.clone(), why.clone()))
                    .collect(),
            });
        }
        expected = l.record.last_seq + 1;
        records.push(l.record);
    }
    let last_seq = expected - 1;
    if let Some((_, path, why)) = bad_snapshots.iter().find(|(s, _, _)| *s > last_seq) {
        return Err(DiskError::BadNewestSnapshot {
            path: path.clone(),
            reason: why.clone(),
            recovered_seq: last_seq,
        });
    }

    // Open (or create) the segment to append to.
    let (segments, file, seg_len) = if !segment_nos.is_empty() {
        let path = seg_paths[seg_paths.len() - 1].clone();
        let file = File::options()
            .append(true)
            .open(&path)
            .map_err(io_err(&path, "open the last log segment"))?;
        let segments = segment_nos
            .iter()
            .zip(seg_paths)
            .zip(max_seqs)
            .map(|((&no, path), max_seq)| Segment { no, path, max_seq })
            .collect();
        (segments, file, open_len)
    } else {
        let (segment, file, len) = super::writer::create_segment(dir, 1, meta.as_deref())?;
        (vec![segment], file, len)
    };

    let mut valid_snapshots: Vec<u64> = snapshot_seqs
        .iter()
        .copied()
        .filter(|s| !bad_snapshots.iter().any(|(b, _, _)| b == s))
        .collect();
    // Valid-looking snapshots newer than the chosen one cannot exist (the newest valid one
    // was chosen); older ones were not read and are assumed valid for keeping purposes only.
    valid_snapshots.retain(|&s| s <= snap_seq);
    let tail_bounds: VecDeque<(u64, u64)> = records
        .iter()
        .rev()
        .take(super::writer::TAIL_BOUNDS)
        .rev()
        .map(|r| (r.first_seq, r.last_seq))
        .collect();
    info!(
        "data dir {}: recovered {} (log records {}, up to seq {last_seq})",
        dir.display(),
        match &snapshot {
            Some((s, state)) => format!("snapshot of seq {s} ({} bytes)", state.len()),
            None => "no snapshot".into(),
        },
        records.len()
    );
    let state = LogState {
        dir: dir.to_path_buf(),
        options,
        segments,
        file,
        seg_len,
        last_seq,
        meta: meta.clone(),
        snapshots: valid_snapshots,
        bad_snapshots: bad_snapshots.into_iter().map(|(s, p, _)| (s, p)).collect(),
        bounds_dropped: records.len() > super::writer::TAIL_BOUNDS,
        tail_bounds,
    };
    Ok((
        Recovered {
            meta,
            snapshot,
            records,
            last_seq,
            torn_tail,
        },
        state,
    ))
}

/// Cuts a torn tail off a segment, durably, so that new records follow valid ones.
fn cut_tail(path: &Path, len: u64) -> Result<(), DiskError> {
    let file = File::options()
        .write(true)
        .open(path)
        .map_err(io_err(path, "open a segment to cut its torn tail"))?;
    file.set_len(len)
        .and_then(|()| file.sync_all())
        .map_err(io_err(path, "cut a torn tail"))
}
