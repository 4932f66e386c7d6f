//! The most recent batches a tracker applied, kept in memory so that a tracker that is behind
//! can be sent only the entries it lacks instead of the whole state.
//!
//! A [`Ring`] holds consecutive batches, each tagged with the claim of primaryship (view,
//! primary number) under which this tracker applied it, bounded by a count of batches and by
//! an estimate of their bytes: the oldest go first. It only stores and answers; the
//! replication core ([`super::replica`]) decides what a tag proves. The rule it relies on: the
//! entries a tracker applied under claim `c` (as `c`'s primary, or as a backup following it)
//! are a prefix of the sequence `c`'s primary ordered, which only grows while `c` lasts. So
//! if this tracker applied entry `n` under `c`, and another tracker holds entries `1..=n` on
//! `c`'s sequence too, their first `n` entries are the same, and the batches after `n` here
//! are exactly what the other one lacks. The ring must be [`reset`](Ring::reset) whenever the
//! state is replaced (a snapshot installed): its batches would no longer follow the state.
//!
//! It does no IO and never panics on any position it is asked about.

use std::collections::VecDeque;
use std::sync::Arc;

use super::state::Entry;

/// Most batches kept.
pub const RING_MAX_BATCHES: usize = 65_536;
/// Most bytes of entries kept, by the same estimate that bounds batches (`entry_size` in
/// `replica`: 256 bytes an entry, more for a file's piece hashes).
pub const RING_MAX_BYTES: usize = 32 << 20;

/// A claim of primaryship: (view, primary number).
pub type Claim = (u64, u16);

#[derive(Debug)]
struct Kept {
    claim: Claim,
    first_seq: u64,
    /// Shared with the write that logs them (`Persist::Entries`): kept without a copy.
    entries: Arc<[Entry]>,
    bytes: usize,
}

impl Kept {
    fn last_seq(&self) -> u64 {
        self.first_seq + self.entries.len() as u64 - 1
    }
}

/// Consecutive entries in parts, for a tracker that is behind: each part is
/// `(first_seq, entries)`.
pub type Parts = Vec<(u64, Vec<Entry>)>;

#[derive(Debug)]
pub struct Ring {
    max_batches: usize,
    max_bytes: usize,
    /// The position just before the first batch, if its history is known: entries up to
    /// `base.0` were applied under claim `base.1` (or came in a state taken from that
    /// claim's primary). `None` while unknown (a directory of an earlier build).
    base: Option<(u64, Claim)>,
    /// The seq of the last entry held (the base's when no batch is).
    last_seq: u64,
    batches: VecDeque<Kept>,
    bytes: usize,
}

impl Ring {
    /// An empty ring whose state ends at `last_seq`, on the history of `claim` if known.
    pub fn new(max_batches: usize, max_bytes: usize, last_seq: u64, claim: Option<Claim>) -> Ring {
        Ring {
            max_batches: max_batches.max(1),
            max_bytes,
            base: claim.map(|c| (last_seq, c)),
            last_seq,
            batches: VecDeque::new(),
            bytes: 0,
        }
    }

    /// The state was replaced by one ending at `last_seq` (on `claim`'s history, if known):
    /// every batch kept goes.
    pub fn reset(&mut self, last_seq: u64, claim: Option<Claim>) {
        self.base = claim.map(|c| (last_seq, c));
        self.last_seq = last_seq;
        self.batches.clear();
        self.bytes = 0;
    }

    /// Keeps `entries` applied at `first_seq..` under `claim` (`bytes` is their estimated
    /// size). Entries that do not follow the last one held (a bug elsewhere) reset the ring
    /// to an unknown history first: nothing is ever sent from a gap.
    pub fn push(&mut self, claim: Claim, first_seq: u64, entries: &[Entry], bytes: usize) {
        if !entries.is_empty() {
            self.push_shared(claim, first_seq, entries.into(), bytes);
        }
    }

    /// [`push`](Self::push) of entries the caller no longer needs (recovery decodes each
    /// record once and hands its entries over without a copy).
    pub fn push_owned(&mut self, claim: Claim, first_seq: u64, entries: Vec<Entry>, bytes: usize) {
        self.push_shared(claim, first_seq, entries.into(), bytes);
    }

    /// [`push`](Self::push) of entries shared with their other holders (the replica keeps
    /// each batch once, for the ring and for the write that logs it).
    pub fn push_shared(
        &mut self,
        claim: Claim,
        first_seq: u64,
        entries: Arc<[Entry]>,
        bytes: usize,
    ) {
        if entries.is_empty() {
            return;
        }
        if first_seq != self.last_seq + 1 {
            self.reset(first_seq - 1, None);
        }
        self.last_seq = first_seq + entries.len() as u64 - 1;
        self.bytes += bytes;
        self.batches.push_back(Kept {
            claim,
            first_seq,
            entries,
            bytes,
        });
        self.evict();
    }

    /// Whether this tracker holds entry `seq` as applied under `claim` (so a tracker whose
    /// entries `1..=seq` are on `claim`'s history holds the same first `seq` entries).
    pub fn proves(&self, seq: u64, claim: Claim) -> bool {
        if self.base == Some((seq, claim)) {
            return true;
        }
        self.batches
            .iter()
            .any(|b| b.claim == claim && b.first_seq <= seq && seq <= b.last_seq())
    }

    /// The entries after `after` up to the last one held, in parts of at most `max_entries`
    /// entries and (roughly) `max_bytes` bytes (a batch larger than that is one part, as it
    /// was one batch), if the ring reaches back to `after`.
    pub fn suffix(&self, after: u64, max_entries: usize, max_bytes: usize) -> Option<Parts> {
        let first = self.base.map_or_else(
            || self.batches.front().map_or(u64::MAX, |b| b.first_seq - 1),
            |(seq, _)| seq,
        );
        if after < first || after > self.last_seq {
            return None;
        }
        let mut parts: Parts = Vec::new();
        let mut part_bytes = 0;
        for b in &self.batches {
            if b.last_seq() <= after {
                continue;
            }
            let skip = after.saturating_sub(b.first_seq - 1) as usize;
            let entries = &b.entries[skip.min(b.entries.len())..];
            let first_seq = b.first_seq + skip as u64;
            let fits = parts.last().is_some_and(|(_, p)| {
                p.len() + entries.len() <= max_entries && part_bytes + b.bytes <= max_bytes
            });
            match parts.last_mut() {
                Some((_, p)) if fits => {
                    p.extend_from_slice(entries);
                    part_bytes += b.bytes;
                }
                _ => {
                    parts.push((first_seq, entries.to_vec()));
                    part_bytes = b.bytes;
                }
            }
        }
        Some(parts)
    }

    /// The estimated bytes (as given to [`push`](Ring::push)) of the entries after `after`
    /// held here: what [`suffix`](Ring::suffix) would send. A batch that `after` cuts
    /// counts for its entries after it, pro rata.
    pub fn bytes_after(&self, after: u64) -> usize {
        self.batches
            .iter()
            .filter(|b| b.last_seq() > after)
            .map(|b| {
                let n = b.entries.len();
                let kept = (b.last_seq() - after.max(b.first_seq - 1)) as usize;
                if kept >= n {
                    b.bytes
                } else {
                    (b.bytes as u128 * kept as u128 / n as u128) as usize
                }
            })
            .sum()
    }

    /// Bounds the ring anew (tests use small ones); the oldest batches past them go.
    pub fn set_bounds(&mut self, max_batches: usize, max_bytes: usize) {
        self.max_batches = max_batches.max(1);
        self.max_bytes = max_bytes;
        self.evict();
    }

    fn evict(&mut self) {
        while self.batches.len() > self.max_batches
            || (self.bytes > self.max_bytes && !self.batches.is_empty())
        {
            if let Some(old) = self.batches.pop_front() {
                self.bytes -= old.bytes;
                self.base = Some((old.last_seq(), old.claim));
            }
        }
    }

    /// The seq of the last entry held.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Batches and estimated bytes held.
    pub fn len(&self) -> (usize, usize) {
        (self.batches.len(), self.bytes)
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }
}
