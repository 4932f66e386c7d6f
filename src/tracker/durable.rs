//! What the replica keeps on disk, and how a tracker's state comes back from it.
//!
//! The replication core ([`super::replica`]) asks for its writes as [`Persist`] values, in
//! order; the driver turns each into exactly one message to the disk thread
//! ([`to_disk_msg`]), so the n-th `Persist` is the disk thread's ticket n, and a
//! `Durable` event for ticket n tells the replica that its first n writes are on disk
//! (`Replica::handle_durable`). The simulated cluster of the replica's tests keeps the same
//! writes in a disk of its own and recovers through the same [`restore`].
//!
//! Bytes on disk (inside the records and snapshots of [`super::disk`], which checksum them):
//!
//! ```text
//! entries record payload = u32 n | entry * n          (the replication link's entry encoding)
//! snapshot               = TrackerState::encode_snapshot
//! meta blob              = u8 version (3) | u64 claim view | u16 claim primary
//!                          | u64 accepted view | u16 accepted primary
//!                          | u64 highest view
//!                          | u16 n | u16 tracker_no * n   (wait_for)
//! ```
//!
//! (Version 2, written by earlier builds, lacks the highest view: it is read as the higher of
//! the claim's view and the accepted view, the most that version kept. Version 1 also lacks
//! the accepted primary: it is read as 0, unknown.)
//!
//! The meta blob holds what the replica needs beyond the state to rejoin safely: the claim it
//! follows or makes, the view in which it last accepted entries (its state's position, with
//! the entries applied) and the primary of that claim (so the state is known to be a prefix
//! of that claim's sequence: a primary may then send it only the entries it lacks; 0 while
//! that is not known), the highest view it ever claimed, followed or heard of (never lowered,
//! though the claim may go down when it joins a live service in a lower view: its next claim
//! goes above it, so it never claims a view its disk once named), and the trackers it must
//! hear from before it may start the service with its own state (those that may hold changes
//! acknowledged after it stopped: see `Replica`'s module doc).

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use super::disk::{DiskMsg, LogRecord, Recovered};
use super::replica::MAX_STORED_VIEW;
use super::ring::{Ring, RING_MAX_BATCHES, RING_MAX_BYTES};
use super::state::{Entry, TrackerState};
use crate::wire::codec::{put_u16, put_u64, put_u8, DecodeError, Reader};
use crate::wire::replication::{decode_entries, encode_entries};

/// A write the replica asks for. Durable in order: a later one is never durable before an
/// earlier one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Persist {
    /// Entries applied at `first_seq..` (never empty; shared with the replica's ring of
    /// recent batches, so a batch is not copied to be logged).
    Entries {
        first_seq: u64,
        entries: Arc<[Entry]>,
    },
    /// The replica's metadata changed.
    Meta(Meta),
    /// The state was replaced by one taken from another tracker, after entry `seq`: every
    /// entry logged past `seq` is void, and the log goes on from `seq + 1`.
    Install { seq: u64, state: Vec<u8> },
    /// The state after the committed entry `seq`, to compact the log (written off the
    /// reactor; not needed for any acknowledgement).
    Compact { seq: u64, state: Vec<u8> },
}

/// The replica's metadata (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Meta {
    pub claim: (u64, u16),
    pub accepted_view: u64,
    /// The primary of the claim under which the state was accepted (with `accepted_view`):
    /// the state is a prefix of the sequence that claim ordered. 0: not known.
    pub accepted_by: u16,
    /// The highest view this tracker ever claimed, followed or heard a peer name: never
    /// lowered, and every claim it makes goes above it.
    pub highest_view: u64,
    pub wait_for: BTreeSet<u16>,
}

const META_VERSION: u8 = 3;
/// Earlier builds' metadata: no `highest_view`.
const META_VERSION_2: u8 = 2;
/// Earlier builds' metadata: no `accepted_by` either.
const META_VERSION_1: u8 = 1;

impl Meta {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(31 + 2 * self.wait_for.len());
        put_u8(&mut out, META_VERSION);
        put_u64(&mut out, self.claim.0);
        put_u16(&mut out, self.claim.1);
        put_u64(&mut out, self.accepted_view);
        put_u16(&mut out, self.accepted_by);
        put_u64(&mut out, self.highest_view);
        put_u16(&mut out, self.wait_for.len() as u16);
        for no in &self.wait_for {
            put_u16(&mut out, *no);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Meta, DecodeError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if !(META_VERSION_1..=META_VERSION).contains(&version) {
            return Err(DecodeError::BadValue("meta version"));
        }
        let claim = (r.u64()?, r.u16()?);
        let accepted_view = r.u64()?;
        let accepted_by = if version >= META_VERSION_2 {
            r.u16()?
        } else {
            0
        };
        let highest_view = if version >= META_VERSION {
            r.u64()?
        } else {
            claim.0.max(accepted_view)
        };
        let n = r.u16()?;
        let mut wait_for = BTreeSet::new();
        for _ in 0..n {
            wait_for.insert(r.u16()?);
        }
        r.finish()?;
        if claim.0.max(accepted_view).max(highest_view) > MAX_STORED_VIEW {
            // No honest tracker names such a view (see `VIEW_JUMP`): starting from it would
            // bring every claim to `MAX_VIEW`, and this tracker could never take over.
            return Err(DecodeError::BadValue(
                "meta view beyond any the service reaches",
            ));
        }
        Ok(Meta {
            claim,
            accepted_view,
            accepted_by,
            highest_view,
            wait_for,
        })
    }
}

/// Encodes the payload of an entries record.
pub fn encode_entries_payload(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_entries(&mut out, entries);
    out
}

/// The disk thread's message for a write (one each: tickets and persist numbers match).
pub fn to_disk_msg(p: Persist) -> DiskMsg {
    match p {
        Persist::Entries { first_seq, entries } => DiskMsg::Append(LogRecord {
            first_seq,
            last_seq: first_seq + entries.len() as u64 - 1,
            payload: encode_entries_payload(&entries),
        }),
        Persist::Meta(m) => DiskMsg::SetMeta(m.encode()),
        Persist::Install { seq, state } => DiskMsg::Install(seq, state),
        Persist::Compact { seq, state } => DiskMsg::Snapshot(seq, state),
    }
}

/// A tracker's state as its disk gave it back.
#[derive(Debug)]
pub struct Restored {
    pub state: TrackerState,
    /// Entries applied (the seq of the last one).
    pub applied: u64,
    /// Entries known committed: those of the snapshot (later ones may be too; the service
    /// tells once the tracker rejoins).
    pub committed: u64,
    /// None: the directory was new.
    pub meta: Option<Meta>,
    /// The last batches replayed (within the ring's bounds), tagged with the claim the
    /// metadata says the state was accepted under; empty when that is not known. A tracker
    /// restarted as primary sends a tracker that is behind what it lacks from these.
    pub recent: Ring,
    /// This tracker founds the service: with no state of its own it may start the service
    /// empty (see `Replica`: a tracker without state that did not found the service only
    /// joins one). Set by the caller; [`restore`] leaves it false.
    pub founder: bool,
}

/// Why a data directory's contents cannot be made into a state (the checksums passed, so
/// this is a bug or a directory of another program version: the tracker must not start).
#[derive(Debug)]
pub enum RestoreError {
    Snapshot {
        seq: u64,
        error: DecodeError,
    },
    Record {
        first_seq: u64,
        error: DecodeError,
    },
    /// A record's entry count does not match its seqs.
    RecordLength {
        first_seq: u64,
        last_seq: u64,
        n: usize,
    },
    Meta(DecodeError),
}

impl fmt::Display for RestoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestoreError::Snapshot { seq, error } => {
                write!(f, "the snapshot of entry {seq} cannot be read: {error}")
            }
            RestoreError::Record { first_seq, error } => {
                write!(
                    f,
                    "the log record of entry {first_seq} cannot be read: {error}"
                )
            }
            RestoreError::RecordLength {
                first_seq,
                last_seq,
                n,
            } => write!(
                f,
                "the log record of entries {first_seq}..={last_seq} holds {n} entries"
            ),
            RestoreError::Meta(e) => write!(f, "the replica's metadata cannot be read: {e}"),
        }
    }
}

impl std::error::Error for RestoreError {}

/// Rebuilds the state: the snapshot, then every logged entry after it, in order.
pub fn restore(rec: &Recovered) -> Result<Restored, RestoreError> {
    let (mut state, snap_seq) = match &rec.snapshot {
        Some((seq, bytes)) => (
            TrackerState::decode_snapshot(bytes)
                .map_err(|error| RestoreError::Snapshot { seq: *seq, error })?,
            *seq,
        ),
        None => (TrackerState::new(), 0),
    };
    let meta = rec
        .meta
        .as_deref()
        .map(Meta::decode)
        .transpose()
        .map_err(RestoreError::Meta)?;
    // Every entry restored is on the sequence of the claim the state was accepted under (see
    // `Replica`), so every batch is tagged with it; unknown, nothing is kept.
    let history = meta
        .as_ref()
        .filter(|m| m.accepted_by != 0)
        .map(|m| (m.accepted_view, m.accepted_by));
    let mut recent = Ring::new(RING_MAX_BATCHES, RING_MAX_BYTES, snap_seq, history);
    let mut applied = snap_seq;
    for r in &rec.records {
        let mut reader = Reader::new(&r.payload);
        let entries = decode_entries(&mut reader)
            .and_then(|e| reader.finish().map(|()| e))
            .map_err(|error| RestoreError::Record {
                first_seq: r.first_seq,
                error,
            })?;
        if entries.len() as u64 != r.last_seq + 1 - r.first_seq {
            return Err(RestoreError::RecordLength {
                first_seq: r.first_seq,
                last_seq: r.last_seq,
                n: entries.len(),
            });
        }
        let first_new = applied + 1;
        for (i, e) in entries.iter().enumerate() {
            let seq = r.first_seq + i as u64;
            if seq > applied {
                let _ = state.apply_entry(e);
                applied = seq;
            }
        }
        if let Some(claim) = history {
            if applied >= first_new {
                let skip = (first_new - r.first_seq) as usize;
                let mut new = entries;
                new.drain(..skip);
                let bytes = new.iter().map(super::replica::entry_size).sum();
                recent.push_owned(claim, first_new, new, bytes);
            }
        }
    }
    if history.is_none() {
        recent.reset(applied, None);
    }
    Ok(Restored {
        state,
        applied,
        committed: snap_seq,
        meta,
        recent,
        founder: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::state::Op;
    use crate::wire::ids::UserId;

    fn entry(i: u64) -> Entry {
        Entry {
            origin: Some(crate::tracker::state::Origin {
                client: 7,
                req_id: i,
            }),
            op: Op::CreateUser {
                user: UserId::new(&format!("u{i}")).unwrap(),
                pw_hash: format!("hash{i}"),
            },
        }
    }

    #[test]
    fn meta_round_trips_and_refuses_garbage() {
        let m = Meta {
            claim: (9, 2),
            accepted_view: 8,
            accepted_by: 3,
            highest_view: 19,
            wait_for: [1, 3].into_iter().collect(),
        };
        assert_eq!(Meta::decode(&m.encode()).unwrap(), m);
        assert!(Meta::decode(&[2]).is_err());
        let mut long = m.encode();
        long.push(0);
        assert!(Meta::decode(&long).is_err());
        assert!(Meta::decode(&m.encode()[..10]).is_err());
        let mut future = m.encode();
        future[0] = 4;
        assert!(Meta::decode(&future).is_err());
        // Version 2 (earlier builds) has no highest view: read as the higher of the claim's
        // view and the accepted one.
        let v2 = [
            &[2u8][..],
            &9u64.to_be_bytes(),
            &2u16.to_be_bytes(),
            &8u64.to_be_bytes(),
            &3u16.to_be_bytes(),
            &2u16.to_be_bytes(),
            &1u16.to_be_bytes(),
            &3u16.to_be_bytes(),
        ]
        .concat();
        assert_eq!(
            Meta::decode(&v2).unwrap(),
            Meta {
                highest_view: 9,
                ..m.clone()
            }
        );
        let v2_accepted_higher = [&v2[..1], &1u64.to_be_bytes(), &v2[9..]].concat();
        assert_eq!(Meta::decode(&v2_accepted_higher).unwrap().highest_view, 8);
        // Metadata naming a view no honest tracker reaches is corruption, refused rather than
        // followed to view exhaustion; the highest honest one is read.
        for bad in [
            Meta {
                highest_view: MAX_STORED_VIEW + 1,
                ..m.clone()
            },
            Meta {
                claim: (u64::MAX, 1),
                ..m.clone()
            },
            Meta {
                accepted_view: 1 << 63,
                ..m.clone()
            },
        ] {
            assert!(Meta::decode(&bad.encode()).is_err(), "{bad:?}");
        }
        let top = Meta {
            highest_view: MAX_STORED_VIEW,
            ..m.clone()
        };
        assert_eq!(Meta::decode(&top.encode()).unwrap(), top);
        assert_eq!(
            m.encode().len(),
            31 + 2 * m.wait_for.len(),
            "the reserve is exact"
        );
        // Version 1 (earlier builds) has no accepted primary: read as 0, unknown.
        let v1 = [
            &[1u8][..],
            &9u64.to_be_bytes(),
            &2u16.to_be_bytes(),
            &8u64.to_be_bytes(),
            &1u16.to_be_bytes(),
            &5u16.to_be_bytes(),
        ]
        .concat();
        assert_eq!(
            Meta::decode(&v1).unwrap(),
            Meta {
                claim: (9, 2),
                accepted_view: 8,
                accepted_by: 0,
                highest_view: 9,
                wait_for: [5].into_iter().collect(),
            }
        );
    }

    #[test]
    fn restore_replays_records_after_the_snapshot_only() {
        let mut base = TrackerState::new();
        for i in 1..=3 {
            let _ = base.apply_entry(&entry(i));
        }
        let mut snap = Vec::new();
        base.encode_snapshot(&mut snap);
        let rec = |first: u64, last: u64| LogRecord {
            first_seq: first,
            last_seq: last,
            payload: encode_entries_payload(&(first..=last).map(entry).collect::<Vec<_>>()),
        };
        let recovered = Recovered {
            meta: Some(Meta::default().encode()),
            snapshot: Some((3, snap)),
            // The first record straddles the snapshot.
            records: vec![rec(2, 4), rec(5, 6)],
            last_seq: 6,
            torn_tail: None,
        };
        let r = restore(&recovered).unwrap();
        assert_eq!((r.applied, r.committed), (6, 3));
        let mut want = TrackerState::new();
        for i in 1..=6 {
            let _ = want.apply_entry(&entry(i));
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        r.state.encode_snapshot(&mut a);
        want.encode_snapshot(&mut b);
        assert_eq!(a, b, "same state as applying every entry once");
        assert_eq!(r.meta, Some(Meta::default()));
        // The metadata does not say which claim's history the state is on: no recent batch
        // is kept, and no position is provable.
        assert!(r.recent.is_empty());
        assert_eq!(r.recent.last_seq(), 6);
        assert!(!r.recent.proves(6, (0, 0)));

        // It does: the entries after the snapshot are kept as recent batches of that claim.
        let recovered = Recovered {
            meta: Some(
                Meta {
                    accepted_view: 4,
                    accepted_by: 2,
                    ..Meta::default()
                }
                .encode(),
            ),
            ..recovered
        };
        let r = restore(&recovered).unwrap();
        assert_eq!(r.recent.last_seq(), 6);
        assert!(r.recent.proves(3, (4, 2)), "the snapshot's position");
        assert!(r.recent.proves(5, (4, 2)));
        assert!(!r.recent.proves(5, (4, 1)));
        let parts = r.recent.suffix(3, 100, usize::MAX).unwrap();
        let entries: Vec<Entry> = parts.into_iter().flat_map(|(_, e)| e).collect();
        assert_eq!(entries, (4..=6).map(entry).collect::<Vec<_>>());
    }

    #[test]
    fn a_record_whose_count_disagrees_is_an_error() {
        let recovered = Recovered {
            records: vec![LogRecord {
                first_seq: 1,
                last_seq: 2,
                payload: encode_entries_payload(&[entry(1)]),
            }],
            last_seq: 2,
            ..Recovered::default()
        };
        assert!(matches!(
            restore(&recovered),
            Err(RestoreError::RecordLength { n: 1, .. })
        ));
    }
}
