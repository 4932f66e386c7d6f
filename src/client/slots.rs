//! Upload slots: which serve links may have blocks queued for sending, and which of their
//! requests go first. Sans-IO, shared by every serve link of a client.
//!
//! A client's uplink is its scarcest resource in a crowd. Handing it to every downloader at
//! once (as a plain request-answer loop does) gives each of N downloaders 1/N of it: with 128
//! downloaders a 512 KiB piece takes a hundred times longer to complete, and nobody has a
//! verified piece to pass on for seconds. So this core keeps at most [`SlotLimits::slots`]
//! links *in a slot*: only their requests are answered (granted to the driver, which queues
//! the blocks); the requests of the others are *held* here, in order, until their turn.
//!
//! - **Turns.** A link in a slot is granted up to [`SlotLimits::turn_bytes`] (one piece by
//!   default). Once that much is granted and its queued output has drained (the driver calls
//!   [`UploadSlots::drained`]), it leaves the slot if another link waits, and waits again if it
//!   still holds requests. With nobody waiting a link keeps its slot and every request is
//!   granted at once, exactly as without this core (a single downloader streams at full
//!   speed).
//! - **Who next.** The waiting link that has been granted the fewest bytes so far, then the one
//!   that waited longest: a newcomer gets its first piece quickly, and over time every link
//!   gets the same share (an unchoke with rotation, without tit-for-tat: the peers of a group
//!   cooperate).
//! - **Which piece.** Within a turn the held requests of the piece this client has sent the
//!   fewest times (over all its links of that file) go first, whole piece by whole piece, so a
//!   piece completes, verifies and spreads as early as possible.
//! - **Super-seeding.** A client serving a file whole (a seed, [`SlotLimits::superseed`])
//!   sends each piece once before it sends any twice: a request for a piece that has left it
//!   already (in part or whole, to another link) while some piece has not is answered with a
//!   [`Grant::Reject`]; the downloader asks again later and meanwhile takes the piece from the
//!   downloader that got it. A link always finishes a piece it was granted part of, and a
//!   piece is declined only while the uplink has work for other links (another link in a
//!   slot or waiting): super-seeding never leaves the uplink idle, and no downloader waits
//!   for ever for pieces nobody else asks for.
//! - **The line (choking).** At most [`SlotLimits::line`] links wait for a slot. A request
//!   from a link outside the slots and the line, while the line is full, is answered with a
//!   [`Grant::Reject`], and so are the held requests of a link whose turn ends while the
//!   line is full. Holding them instead (a queue as long as the crowd) kept each downloader's
//!   pieces assigned to a sharer that would not send them for seconds, while other sharers
//!   that held them idled; rejected, the downloader takes them from others and asks again
//!   after a rest (see the engine).
//! - **Cancels** withdraw a held request, which a plain loop could not: the end-game's second
//!   requests cost the uplink nothing once the first copy arrived.
//!
//! Bounds: at most [`SlotLimits::max_held`] requests held per link ([`UploadSlots::may_read`]
//! tells the driver to stop reading a link at that point); per-piece counters only for files
//! some link serves, dropped with the last such link.
//!
//! No clock, no IO: the driver reports requests, cancels, drained links and closed links,
//! and performs the [`Grant`]s it polls.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::wire::peer_link::BlockRef;
use crate::wire::Sha1Digest;

/// The policy's knobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotLimits {
    /// Links served at once.
    pub slots: usize,
    /// Bytes granted to a link per turn when others wait.
    pub turn_bytes: u64,
    /// Requests held per link; the driver stops reading a link that holds this many.
    pub max_held: usize,
    /// Links that may wait for a slot (the line); a request from a link neither in a slot
    /// nor in the line, while the line is full, is answered with a [`Grant::Reject`] (the
    /// link is *choked*: its downloader asks others and comes back later).
    pub line: usize,
    /// A seed sends each piece once before any twice (declining the others meanwhile).
    pub superseed: bool,
}

impl Default for SlotLimits {
    fn default() -> Self {
        SlotLimits {
            // Two, not four: a piece served to two links at once completes (and can be
            // passed on) twice as soon. In the swarm simulator (2026-12-04) four -> two moved
            // the crowd of 8 from 1.14x to 1.11x the bound, 32 from 1.34x to 1.28x, uneven
            // uplinks from 1.76x to 1.59x; one was worse everywhere (1.32x, 1.65x, 1.69x).
            slots: 2,
            turn_bytes: 512 * 1024,
            max_held: 256,
            line: 4,
            superseed: true,
        }
    }
}

impl SlotLimits {
    /// No policy: every request is granted at once (the behaviour before slots; for tests
    /// and measurements).
    pub fn unlimited() -> Self {
        SlotLimits {
            slots: usize::MAX,
            turn_bytes: u64::MAX,
            max_held: 256,
            line: usize::MAX,
            superseed: false,
        }
    }
}

/// What the driver does for a request: queue the block on `link` now (`start`: where it
/// starts in the file), or answer `Rejected` (a seed declining a piece that has left it
/// already while others have not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant<K> {
    Send {
        link: K,
        block: BlockRef,
        start: u64,
    },
    Reject {
        link: K,
        block: BlockRef,
    },
}

/// Per file served: how many bytes of each piece were granted, how many pieces were never
/// granted, and whether this client is a seed of it (serves it whole).
#[derive(Debug, Default)]
struct FileCounts {
    sent: Vec<u64>,
    untouched: u32,
    seed: bool,
}

impl FileCounts {
    /// Whether a seed declines `piece` to a link that has not been sent any of it: the piece
    /// left already (granted in part or whole) and some piece has not.
    fn declines(&self, piece: u32) -> bool {
        self.seed && self.untouched > 0 && self.sent.get(piece as usize).is_some_and(|&n| n > 0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// No slot, nothing held.
    Idle,
    /// Holding requests, waiting for a slot under this key of `waiting`.
    Waiting { served: u64, seq: u64 },
    /// In a slot, `turn` bytes granted in this turn.
    Slot { turn: u64 },
}

#[derive(Debug)]
struct LinkSlot {
    file: Sha1Digest,
    /// Pieces granted to this link (it finishes those it started).
    pieces: BTreeSet<u32>,
    held: Vec<(BlockRef, u64)>,
    /// Bytes granted over the link's life.
    served: u64,
    place: Place,
}

/// The slot policy of one client (see the module doc). `K` names a serve link.
#[derive(Debug)]
pub struct UploadSlots<K> {
    limits: SlotLimits,
    links: BTreeMap<K, LinkSlot>,
    /// Links waiting for a slot: fewest bytes served first, then the longest waiting.
    waiting: BTreeSet<(u64, u64, K)>,
    n_slots_used: usize,
    next_seq: u64,
    /// Per file served.
    sent: BTreeMap<Sha1Digest, FileCounts>,
    grants: VecDeque<Grant<K>>,
}

impl<K: Ord + Copy> UploadSlots<K> {
    pub fn new(limits: SlotLimits) -> Self {
        UploadSlots {
            limits,
            links: BTreeMap::new(),
            waiting: BTreeSet::new(),
            n_slots_used: 0,
            next_seq: 0,
            sent: BTreeMap::new(),
            grants: VecDeque::new(),
        }
    }

    /// A serve link was accepted for `file` of `n_pieces` pieces; `seed`: this client holds
    /// every piece (it then sends each piece once before any twice, see the module doc).
    pub fn add_link(&mut self, link: K, file: Sha1Digest, n_pieces: u32, seed: bool) {
        let counts = self.sent.entry(file).or_default();
        if counts.sent.len() < n_pieces as usize {
            counts.untouched += n_pieces - counts.sent.len() as u32;
            counts.sent.resize(n_pieces as usize, 0);
        }
        counts.seed |= seed && self.limits.superseed;
        self.links.entry(link).or_insert(LinkSlot {
            file,
            pieces: BTreeSet::new(),
            held: Vec::new(),
            served: 0,
            place: Place::Idle,
        });
    }

    /// The link closed: its slot goes to the next link waiting.
    pub fn remove_link(&mut self, link: K) {
        let Some(slot) = self.links.remove(&link) else {
            return;
        };
        self.unplace(link, slot.place);
        if !self.links.values().any(|l| l.file == slot.file) {
            self.sent.remove(&slot.file);
        }
        self.fill_slots();
    }

    /// Whether the driver may read more requests from `link`.
    pub fn may_read(&self, link: K) -> bool {
        self.links
            .get(&link)
            .is_none_or(|l| l.held.len() < self.limits.max_held)
    }

    /// How many links are in a slot.
    pub fn n_in_slots(&self) -> usize {
        self.n_slots_used
    }

    /// How many links wait for a slot.
    pub fn n_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// How many requests `link` holds.
    pub fn n_held(&self, link: K) -> usize {
        self.links.get(&link).map_or(0, |l| l.held.len())
    }

    /// A request the serving core accepted (`start`: where the block starts in the file).
    /// Returns false (and holds nothing) for an unknown link or one over its limit.
    pub fn request(&mut self, link: K, block: BlockRef, start: u64) -> bool {
        let max_held = self.limits.max_held;
        let others_busy = self.others_busy(link);
        let Some(slot) = self.links.get_mut(&link) else {
            return false;
        };
        if slot.held.len() >= max_held {
            return false;
        }
        let declined = others_busy
            && !slot.pieces.contains(&block.piece)
            && self
                .sent
                .get(&slot.file)
                .is_some_and(|c| c.declines(block.piece));
        if declined {
            self.grants.push_back(Grant::Reject { link, block });
            return true;
        }
        if slot.place == Place::Idle && self.waiting.len() >= self.limits.line {
            // Choked: the line is full.
            self.grants.push_back(Grant::Reject { link, block });
            return true;
        }
        slot.held.push((block, start));
        match slot.place {
            Place::Idle => self.wait(link),
            Place::Slot { .. } => self.grant_turn(link),
            Place::Waiting { .. } => {}
        }
        self.fill_slots();
        true
    }

    /// The downloader withdrew a request: dropped if still held.
    pub fn cancel(&mut self, link: K, block: BlockRef) {
        if let Some(slot) = self.links.get_mut(&link) {
            slot.held.retain(|(b, _)| *b != block);
            if slot.held.is_empty() {
                if let Place::Waiting { served, seq } = slot.place {
                    self.waiting.remove(&(served, seq, link));
                    slot.place = Place::Idle;
                }
            }
        }
    }

    /// Everything granted to `link` has been sent (its output queue is empty).
    pub fn drained(&mut self, link: K) {
        let Some(slot) = self.links.get_mut(&link) else {
            return;
        };
        let Place::Slot { turn } = slot.place else {
            return;
        };
        let others_wait = !self.waiting.is_empty();
        if turn >= self.limits.turn_bytes && others_wait || slot.held.is_empty() {
            self.unplace(link, Place::Slot { turn });
            let line_full = self.waiting.len() >= self.limits.line;
            if let Some(slot) = self.links.get_mut(&link) {
                slot.place = Place::Idle;
                if !slot.held.is_empty() {
                    if line_full {
                        // Its turn is over and the line is full: choked until it asks again
                        // (so that links outside the line get their turn too).
                        for (block, _) in slot.held.drain(..) {
                            self.grants.push_back(Grant::Reject { link, block });
                        }
                    } else {
                        self.wait(link);
                    }
                }
            }
        } else {
            self.grant_turn(link);
        }
        self.fill_slots();
    }

    /// The next block to send.
    pub fn poll_grant(&mut self) -> Option<Grant<K>> {
        self.grants.pop_front()
    }

    fn wait(&mut self, link: K) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(slot) = self.links.get_mut(&link) {
            slot.place = Place::Waiting {
                served: slot.served,
                seq,
            };
            self.waiting.insert((slot.served, seq, link));
        }
    }

    /// Whether the uplink has work for links other than `link` (another link in a slot, or
    /// one waiting): only then does a seed decline a piece that has left it already, so that
    /// super-seeding never leaves the uplink idle.
    fn others_busy(&self, link: K) -> bool {
        let own = match self.links.get(&link).map(|l| l.place) {
            Some(Place::Slot { .. }) => 1,
            _ => 0,
        };
        let waiting_own = match self.links.get(&link).map(|l| l.place) {
            Some(Place::Waiting { .. }) => 1,
            _ => 0,
        };
        self.n_slots_used > own || self.waiting.len() > waiting_own
    }

    /// Takes a link out of the waiting set or its slot.
    fn unplace(&mut self, link: K, place: Place) {
        match place {
            Place::Idle => {}
            Place::Waiting { served, seq } => {
                self.waiting.remove(&(served, seq, link));
            }
            Place::Slot { .. } => self.n_slots_used = self.n_slots_used.saturating_sub(1),
        }
    }

    /// Gives free slots to the links waiting.
    fn fill_slots(&mut self) {
        while self.n_slots_used < self.limits.slots {
            let Some((_, _, link)) = self.waiting.pop_first() else {
                return;
            };
            let Some(slot) = self.links.get_mut(&link) else {
                continue;
            };
            slot.place = Place::Slot { turn: 0 };
            self.n_slots_used += 1;
            self.grant_turn(link);
            // Every request it held was declined: nothing will drain, so the slot is free
            // again at once.
            if let Some(slot) = self.links.get_mut(&link) {
                if slot.place == (Place::Slot { turn: 0 }) && slot.held.is_empty() {
                    slot.place = Place::Idle;
                    self.n_slots_used -= 1;
                }
            }
        }
    }

    /// Grants held requests of a link in a slot: the rest of its turn, or everything while
    /// nobody waits.
    fn grant_turn(&mut self, link: K) {
        let others_wait = !self.waiting.is_empty();
        let others_busy = self.others_busy(link);
        let turn_bytes = self.limits.turn_bytes;
        let Some(slot) = self.links.get_mut(&link) else {
            return;
        };
        let Place::Slot { mut turn } = slot.place else {
            return;
        };
        let counts = self.sent.entry(slot.file).or_default();
        while !slot.held.is_empty() {
            if others_wait && turn >= turn_bytes {
                break;
            }
            if !others_wait && turn >= turn_bytes {
                // Nobody waits: a new turn at once.
                turn = 0;
            }
            // The held request of the piece sent least (then the earliest asked).
            let idx = least_sent(&slot.held, &counts.sent);
            let (block, start) = slot.held.remove(idx);
            let piece = block.piece;
            if others_busy && !slot.pieces.contains(&piece) && counts.declines(piece) {
                // Its other held blocks of this piece are declined too.
                let mut rejected = vec![block];
                slot.held.retain(|&(b, _)| {
                    let same = b.piece == piece;
                    if same {
                        rejected.push(b);
                    }
                    !same
                });
                for block in rejected {
                    self.grants.push_back(Grant::Reject { link, block });
                }
                continue;
            }
            if let Some(n) = counts.sent.get_mut(piece as usize) {
                if *n == 0 {
                    counts.untouched = counts.untouched.saturating_sub(1);
                }
                *n = n.saturating_add(u64::from(block.len));
            }
            slot.pieces.insert(piece);
            turn = turn.saturating_add(u64::from(block.len));
            slot.served = slot.served.saturating_add(u64::from(block.len));
            self.grants.push_back(Grant::Send { link, block, start });
        }
        slot.place = Place::Slot { turn };
    }
}

/// The index of the held request to grant next: the one whose piece was sent fewest times
/// (counted in whole pieces, so that the blocks of a piece being sent stay together), the
/// earliest asked among equals.
fn least_sent(held: &[(BlockRef, u64)], sent: &[u64]) -> usize {
    let times = |p: u32| sent.get(p as usize).copied().unwrap_or(0) / PIECE_GRAIN;
    held.iter()
        .enumerate()
        .min_by_key(|(i, (b, _))| (times(b.piece), *i))
        .map_or(0, |(i, _)| i)
}

/// Counts are compared in units of this many bytes (a piece of the default length).
const PIECE_GRAIN: u64 = 512 * 1024;

#[cfg(test)]
#[path = "slots_tests.rs"]
mod tests;
