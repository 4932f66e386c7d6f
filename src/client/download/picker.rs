//! The piece picker: which block to request from which peer, and the state of every block.
//!
//! A file of `file_len` bytes is cut into pieces of `piece_len` bytes (the last one shorter)
//! and every piece into blocks of `block_len` bytes (the last block of a piece shorter). A
//! [`Picker`] follows each piece through four states:
//!
//! - **Missing**: nothing requested or kept.
//! - **Downloading**: some blocks requested or received. Per block it knows whether it is still
//!   open, requested (by which one or two peers, and whose copy is being written), or received
//!   (from whom). A downloading piece is usually *owned* by one peer, which fetches all of it.
//! - **Verifying**: every block received and the piece handed to the hasher; no write is
//!   accepted for it any more.
//! - **Have**: verified.
//!
//! # Policy
//!
//! [`Picker::next_requests`] tops a peer up to its pipeline depth, taking blocks in this order:
//!
//! 1. open blocks of pieces the peer owns (pieces it started);
//! 2. open blocks of orphaned partial pieces (their owner left) that the peer holds; it adopts
//!    them, so that partial pieces are finished before new ones are started;
//! 3. new pieces the peer holds, rarest first (availability = the number of connected,
//!    non-banned peers holding the piece), ties broken by the lowest index, or by an order
//!    whose first pieces are drawn from a seed ([`Picker::shuffle_ties`]); the peer owns them;
//! 4. open blocks of pieces owned by other peers (only when the peer has nothing of its own to
//!    do, so that a piece normally comes from a single peer);
//! 5. end-game: once no piece is missing and every block of every unfinished piece has been
//!    requested, a block outstanding at exactly one other peer is requested a second time,
//!    but only one per top-up and only while the peer has fewer than
//!    [`ENDGAME_MAX_OUTSTANDING`] blocks outstanding; the block is the last one of the
//!    longest queue (see below). Whichever copy arrives first is written;
//!    [`Picker::block_written`] names the loser so the driver can cancel it. A block is never
//!    requested from more than two peers.
//!
//! [`Picker::relieve`] adds a sixth source for the engine to use: blocks outstanding at a
//! slower (or choking) peer, requested a second time from a faster one, up to the faster
//! peer's depth, from the back of the slower peers' queues, and only the blocks the faster
//! peer could deliver first: a block at position `i` of a queue delivered at a fraction `s` of the faster peer's
//! rate arrives after about `(i + 1) / s` of its block times, the faster peer's `k`-th copy
//! after `outstanding + k + 1`, and the copy is asked for only if it would come first. A
//! stalled peer (`s` = 0) loses its whole queue as before; one only moderately slower keeps
//! the head of its queue, which it delivers before any copy could.
//!
//! Why relief is paced: in the simulated crowds (8 to 128 leechers, `swarm_tests.rs`) each
//! leecher asked for 105-430 relief copies of a 512-block file, and on shaped links (the
//! swarm bench) most of the discarded bytes were relief copies that lost. Pacing by rate,
//! and leaving a link that merely rests after a rejection alone until it has been silent for
//! the engine's `SLOW_SILENCE` (see `Download::slower_than` in `engine.rs`), cut them by
//! 15-50% with the finish times unchanged within the simulator's noise (README, "End-game
//! duplicates").
//!
//! Why the end-game is bounded: it used to top a peer up to its whole pipeline depth with
//! second copies, taken from the head of the other peers' queues. Those are the blocks the
//! other peers deliver next, and on a fast link (loopback) their sharers have sent them
//! before a cancel can arrive, so nearly every second copy was received and thrown away:
//! 8 MiB from 4 sharers received 52-75% more than the file, 64 MiB 9-10% (the end-game
//! starts when everything is requested, which for a small file is at once). The rule now is
//! libtorrent's: a peer takes a second copy only when it is about to run dry, one at a time,
//! so at most [`ENDGAME_MAX_OUTSTANDING`] blocks per peer are requested twice at once and
//! the copies are bounded by the number of peers, not by their pipeline depth. Two rather
//! than one keeps a block in flight while the next is asked for. The copy is the last block
//! of the longest queue: the block that would arrive last, where a copy can win, and which
//! its sharer has most likely not sent yet, so the loser's cancel still withdraws it. A slow
//! sharer's queue is still taken over in bulk by [`Picker::relieve`], which the engine uses
//! only for links delivering less than half as fast (or resting, or silent), so shaped links
//! keep their relief.
//!
//! # Blame
//!
//! A piece that fails verification goes back to Missing. If all of its blocks came from one
//! peer, that peer is banned for this download: it gets no more requests, its availability no
//! longer counts, its outstanding requests and the blocks it delivered for unfinished pieces go
//! back to the pool. If the blocks came from several peers (an orphan that was adopted, help
//! from a second peer, end-game) the culprit is unknown: an already banned supplier is blamed
//! if there is one; otherwise nobody is banned and the piece is marked *solo*, so that its next
//! attempt comes from one peer alone (no help, no end-game duplicates, and the received blocks
//! are dropped if that peer leaves), and a second failure then names the culprit. This way an
//! honest peer is never banned for a corrupt peer's blocks, which would otherwise make a
//! download fail although honest peers hold every piece. Each piece can fail with mixed
//! suppliers at most once, so a corrupt peer can cost at most one extra download per piece.
//!
//! # Robustness
//!
//! Every method accepts any sequence of calls: unknown peers, out-of-range pieces, blocks with
//! a wrong offset or length, blocks that were not requested, and repeated calls are ignored
//! (or answered with [`Verdict::Discard`]). Nothing here panics, reads a clock or does IO.
//!
//! # Cost
//!
//! Availability counts are kept up to date incrementally and missing pieces are kept sorted by
//! (availability, index), so picking a new piece walks that order only until it finds pieces
//! the peer holds. Continuing a piece in progress looks only at the few pieces that are
//! downloading. Adding or removing a peer costs O(n_pieces log n_pieces).

use std::collections::{BTreeMap, BTreeSet};

/// How many pieces [`Picker::shuffle_ties`] draws at random before the rest go by index.
pub const SHUFFLE_HEAD: u32 = 16;

/// In the end-game a peer is given a second copy of a block only while it has fewer than
/// this many blocks outstanding, one per top-up (see the module documentation).
pub const ENDGAME_MAX_OUTSTANDING: usize = 2;

/// An opaque name for a peer connection, chosen by the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

/// A block: `len` bytes at `offset` inside piece `piece`.
///
/// Its position in the file is `piece * piece_len + offset` (see [`Picker::file_offset`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Block {
    pub piece: u32,
    pub offset: u32,
    pub len: u32,
}

/// What the driver must do with the data of a block whose header just arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write the data into the file, then call [`Picker::block_written`].
    Write,
    /// Read the data into a scratch buffer and drop it.
    Discard,
}

/// The consequences of a written block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    /// The piece, if this was its last block: it is now Verifying and must go to the hasher.
    pub piece_complete: Option<u32>,
    /// End-game losers: other peers that also had this block outstanding. Their requests are
    /// forgotten; the driver should send them a cancel (a copy that still arrives is discarded).
    pub cancels: Vec<(PeerId, Block)>,
}

/// The set of pieces a peer holds. Private, so that the representation can change.
#[derive(Debug, Clone)]
struct PieceSet {
    bits: Vec<bool>,
}

impl PieceSet {
    fn new(n_pieces: u32) -> Self {
        PieceSet {
            bits: vec![false; n_pieces as usize],
        }
    }

    fn get(&self, piece: u32) -> bool {
        self.bits.get(piece as usize).copied().unwrap_or(false)
    }

    /// Sets or clears a bit; returns whether it changed.
    fn set(&mut self, piece: u32, value: bool) -> bool {
        match self.bits.get_mut(piece as usize) {
            Some(bit) if *bit != value => {
                *bit = value;
                true
            }
            _ => false,
        }
    }

    fn ones(&self) -> impl Iterator<Item = u32> + '_ {
        (0u32..)
            .zip(self.bits.iter())
            .filter(|(_, &b)| b)
            .map(|(i, _)| i)
    }
}

/// The peers that have a block outstanding: at most two (two only in the end-game).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Requesters([Option<PeerId>; 2]);

impl Requesters {
    fn one(peer: PeerId) -> Self {
        Requesters([Some(peer), None])
    }

    fn contains(&self, peer: PeerId) -> bool {
        self.0.contains(&Some(peer))
    }

    fn count(&self) -> usize {
        self.0.iter().flatten().count()
    }

    /// Adds a second requester; false if full or already present.
    fn add(&mut self, peer: PeerId) -> bool {
        if self.contains(peer) {
            return false;
        }
        match self.0.iter_mut().find(|slot| slot.is_none()) {
            Some(slot) => {
                *slot = Some(peer);
                true
            }
            None => false,
        }
    }

    fn remove(&mut self, peer: PeerId) {
        for slot in &mut self.0 {
            if *slot == Some(peer) {
                *slot = None;
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.0.iter().flatten().copied()
    }
}

/// The state of one block of a downloading piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockState {
    /// Not requested from anyone.
    Open,
    /// Requested from `by`; `writer` is the requester whose copy is being written.
    Requested {
        by: Requesters,
        writer: Option<PeerId>,
    },
    /// Written, with data from this peer.
    Received(PeerId),
}

/// The blocks of a piece that is Downloading or Verifying.
#[derive(Debug, Clone)]
struct Partial {
    blocks: Vec<BlockState>,
    n_open: u32,
    n_received: u32,
    /// The peer fetching this piece; `None` for an orphan.
    owner: Option<PeerId>,
}

impl Partial {
    fn new(n_blocks: u32) -> Self {
        Partial {
            blocks: vec![BlockState::Open; n_blocks as usize],
            n_open: n_blocks,
            n_received: 0,
            owner: None,
        }
    }

    fn is_idle(&self) -> bool {
        self.n_received == 0 && self.n_open as usize == self.blocks.len()
    }
}

#[derive(Debug, Clone)]
enum Slot {
    Missing,
    Downloading(Box<Partial>),
    Verifying(Box<Partial>),
    Have,
}

#[derive(Debug, Clone)]
struct Peer {
    has: PieceSet,
    outstanding: BTreeSet<Block>,
    /// Downloading pieces whose owner this peer is.
    owned: BTreeSet<u32>,
    /// Pieces it holds but declined to send for now ([`Picker::block_deferred`]).
    not_now: BTreeSet<u32>,
}

/// Piece picking and block bookkeeping for one download (see the module documentation).
#[derive(Debug, Clone)]
pub struct Picker {
    file_len: u64,
    piece_len: u32,
    block_len: u32,
    n_pieces: u32,
    slots: Vec<Slot>,
    /// Per piece: the number of connected, non-banned peers holding it.
    avail: Vec<u32>,
    /// The Missing pieces as (availability, rank): rarest first, then lowest rank.
    missing: BTreeSet<(u32, u32)>,
    /// Per piece, its rank among pieces of equal availability (its index unless
    /// [`Picker::shuffle_ties`] was called), and the piece of each rank.
    rank: Vec<u32>,
    by_rank: Vec<u32>,
    /// The Downloading pieces.
    downloading: BTreeSet<u32>,
    /// Pieces that must come from a single peer (they once failed with mixed suppliers).
    solo: BTreeSet<u32>,
    n_have: u32,
    /// Missing or Downloading pieces with availability 0.
    n_unavailable: u32,
    peers: BTreeMap<PeerId, Peer>,
    banned: BTreeSet<PeerId>,
    /// Second requests made so far (see [`SecondRequests`]).
    seconds: SecondRequests,
}

/// How many blocks were requested a second time (each usually costs one copy that is
/// received and thrown away, unless its cancel reaches the sharer before the block leaves).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SecondRequests {
    /// In the end-game (step 5 of the policy).
    pub endgame: u64,
    /// From [`Picker::relieve`] (a faster link taking over a slower one's blocks).
    pub relief: u64,
}

impl Picker {
    /// A picker for a file of `file_len` bytes, in pieces of `piece_len` bytes and blocks of
    /// `block_len` bytes. Nothing is held yet; a zero-length file has no pieces and is
    /// complete at once.
    ///
    /// A `piece_len` or `block_len` of 0 is taken as 1, and a `block_len` above `piece_len`
    /// as `piece_len`. Piece indices are `u32`, as on the wire: a file with more pieces than
    /// that is covered only up to piece `u32::MAX - 1`.
    pub fn new(file_len: u64, piece_len: u32, block_len: u32) -> Picker {
        let piece_len = piece_len.max(1);
        let block_len = block_len.clamp(1, piece_len);
        let n_pieces = u32::try_from(file_len.div_ceil(u64::from(piece_len))).unwrap_or(u32::MAX);
        Picker {
            file_len,
            piece_len,
            block_len,
            n_pieces,
            slots: vec![Slot::Missing; n_pieces as usize],
            avail: vec![0; n_pieces as usize],
            missing: (0..n_pieces).map(|piece| (0, piece)).collect(),
            rank: (0..n_pieces).collect(),
            by_rank: (0..n_pieces).collect(),
            downloading: BTreeSet::new(),
            solo: BTreeSet::new(),
            n_have: 0,
            n_unavailable: n_pieces,
            peers: BTreeMap::new(),
            banned: BTreeSet::new(),
            seconds: SecondRequests::default(),
        }
    }

    /// Breaks ties between pieces of equal availability in an order drawn from `seed` instead
    /// of by index: [`SHUFFLE_HEAD`] pieces drawn at random first, then the others by index.
    /// Downloaders that start together from one seed then ask it for different pieces, which
    /// they can pass on to each other, instead of all asking for piece 0 first. Seed 0 keeps
    /// the order by index.
    pub fn shuffle_ties(&mut self, seed: u64) {
        if seed == 0 {
            return;
        }
        // Only the head is drawn: downloaders starting together then ask the seed for
        // different first pieces (and after that rarity, what they pass each other and the
        // seed's declines keep them apart), while the rest come in index order, which keeps
        // the whole-file digest fed in order (a fully random order cost 20-30% of the
        // loopback rate: `cargo bench --bench transfer`, 512 MiB).
        let mut order: Vec<u32> = (0..self.n_pieces).collect();
        let mut rng = crate::rng::SplitMix64::new(seed);
        let head = (SHUFFLE_HEAD as usize).min(order.len());
        for i in 0..head {
            let j = i + rng.below(order.len() - i);
            order.swap(i, j);
        }
        order[head..].sort_unstable();
        let missing: Vec<u32> = self
            .missing
            .iter()
            .map(|&(_, rank)| self.by_rank[rank as usize])
            .collect();
        for (rank, &piece) in (0u32..).zip(order.iter()) {
            self.rank[piece as usize] = rank;
        }
        self.by_rank = order;
        self.missing = missing
            .into_iter()
            .map(|piece| (self.avail[piece as usize], self.rank[piece as usize]))
            .collect();
    }

    // -----------------------------------------------------------------------------------------
    // Geometry
    // -----------------------------------------------------------------------------------------

    /// The number of pieces.
    pub fn n_pieces(&self) -> u32 {
        self.n_pieces
    }

    /// The length of `piece` in bytes (the last piece may be shorter); `None` out of range.
    pub fn piece_size(&self, piece: u32) -> Option<u32> {
        if piece >= self.n_pieces {
            return None;
        }
        let start = u64::from(piece) * u64::from(self.piece_len);
        let rest = self.file_len.saturating_sub(start);
        // Fits: it is at most piece_len.
        Some(rest.min(u64::from(self.piece_len)) as u32)
    }

    /// The position of a block's first byte in the file.
    pub fn file_offset(&self, block: &Block) -> u64 {
        u64::from(block.piece) * u64::from(self.piece_len) + u64::from(block.offset)
    }

    fn n_blocks(&self, piece: u32) -> u32 {
        self.piece_size(piece)
            .map_or(0, |size| size.div_ceil(self.block_len))
    }

    /// Block `idx` of `piece`; `idx` must be below `n_blocks(piece)`.
    fn block_at(&self, piece: u32, idx: usize) -> Block {
        let size = self.piece_size(piece).unwrap_or(0);
        // idx < n_blocks, so offset < size <= u32::MAX.
        let offset = (idx as u32).saturating_mul(self.block_len);
        Block {
            piece,
            offset,
            len: self.block_len.min(size.saturating_sub(offset)),
        }
    }

    /// The index of `block` inside its piece, if it is exactly one of the piece's blocks.
    fn block_index(&self, block: &Block) -> Option<usize> {
        let size = self.piece_size(block.piece)?;
        if !block.offset.is_multiple_of(self.block_len) || block.offset >= size {
            return None;
        }
        let expected_len = self.block_len.min(size - block.offset);
        (block.len == expected_len).then_some((block.offset / self.block_len) as usize)
    }

    // -----------------------------------------------------------------------------------------
    // Queries
    // -----------------------------------------------------------------------------------------

    /// The number of verified pieces.
    pub fn n_have(&self) -> u32 {
        self.n_have
    }

    /// Whether every piece is verified (true at once for a zero-length file).
    pub fn is_complete(&self) -> bool {
        self.n_have == self.n_pieces
    }

    /// Whether `piece` is verified.
    pub fn have(&self, piece: u32) -> bool {
        matches!(self.slots.get(piece as usize), Some(Slot::Have))
    }

    /// The number of blocks `peer` has outstanding (requested, not yet written).
    pub fn outstanding(&self, peer: PeerId) -> usize {
        self.peers.get(&peer).map_or(0, |p| p.outstanding.len())
    }

    /// How many second requests were made so far.
    pub fn second_requests(&self) -> SecondRequests {
        self.seconds
    }

    /// Whether `peer` is banned from this download (it stays banned if it reconnects).
    pub fn is_banned(&self, peer: PeerId) -> bool {
        self.banned.contains(&peer)
    }

    /// Whether the download cannot finish: some piece that is Missing or Downloading is held
    /// by no connected, non-banned peer. A piece being verified does not count (it may pass);
    /// if it fails and nobody trusted holds it, `stuck` becomes true then.
    pub fn stuck(&self) -> bool {
        self.n_unavailable > 0
    }

    /// Whether `peer` is the only trusted holder of a piece not verified yet (dropping it
    /// would leave the download stuck). O(n_pieces).
    pub fn is_sole_holder(&self, peer: PeerId) -> bool {
        if self.banned.contains(&peer) {
            return false;
        }
        self.peers.get(&peer).is_some_and(|p| {
            p.has.ones().any(|piece| {
                !self.have(piece) && self.avail.get(piece as usize).copied() == Some(1)
            })
        })
    }

    // -----------------------------------------------------------------------------------------
    // Peers
    // -----------------------------------------------------------------------------------------

    /// A peer connected and announced the pieces it holds (`pieces[i]` for piece `i`; missing
    /// entries are false, extra ones ignored). For a peer already known, the pieces are added
    /// to those it holds. A banned peer is recorded but its pieces do not count.
    pub fn add_peer(&mut self, peer: PeerId, pieces: &[bool]) {
        let n_pieces = self.n_pieces;
        let entry = self.peers.entry(peer).or_insert_with(|| Peer {
            has: PieceSet::new(n_pieces),
            outstanding: BTreeSet::new(),
            owned: BTreeSet::new(),
            not_now: BTreeSet::new(),
        });
        let mut added = Vec::new();
        for (piece, &held) in (0..n_pieces).zip(pieces) {
            if held && entry.has.set(piece, true) {
                added.push(piece);
            }
        }
        if !self.is_banned(peer) {
            for piece in added {
                self.change_avail(piece, true);
            }
        }
    }

    /// A `have` announcement: `peer` now holds `piece`. Unknown peers and out-of-range pieces
    /// are ignored.
    pub fn peer_has(&mut self, peer: PeerId, piece: u32) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.has.set(piece, true) && !self.banned.contains(&peer) {
            self.change_avail(piece, true);
        }
    }

    /// A peer disconnected: its pieces no longer count and its outstanding blocks go back to
    /// the pool, to be requested from others. The pieces it owned become orphans that other
    /// peers finish (a solo piece starts over). Whether it was banned is remembered.
    pub fn remove_peer(&mut self, peer: PeerId) {
        let Some(p) = self.peers.remove(&peer) else {
            return;
        };
        if !self.banned.contains(&peer) {
            for piece in p.has.ones() {
                self.change_avail(piece, false);
            }
        }
        self.release_work(peer, p.outstanding, p.owned);
    }

    // -----------------------------------------------------------------------------------------
    // Requests
    // -----------------------------------------------------------------------------------------

    /// New block requests for `peer`, so that it has up to `max_in_flight` outstanding; empty
    /// for a banned or unknown peer. The blocks are recorded as requested from this peer; the
    /// driver sends them. See the module documentation for the order in which blocks are
    /// chosen.
    pub fn next_requests(&mut self, peer: PeerId, max_in_flight: usize) -> Vec<Block> {
        let mut out = Vec::new();
        if self.banned.contains(&peer) {
            return out;
        }
        let Some(p) = self.peers.get(&peer) else {
            return out;
        };
        let mut need = max_in_flight.saturating_sub(p.outstanding.len());
        if need == 0 {
            return out;
        }

        // 1. Pieces this peer started.
        let own: Vec<u32> = p.owned.iter().copied().collect();
        for piece in own {
            if need == 0 {
                return out;
            }
            self.take_open(peer, piece, &mut need, &mut out);
        }
        if need == 0 {
            return out;
        }

        // 2. Orphaned partial pieces: adopt them.
        let orphans: Vec<u32> = self
            .downloading
            .iter()
            .copied()
            .filter(|&piece| {
                self.partial(piece)
                    .is_some_and(|pt| pt.owner.is_none() && pt.n_open > 0)
                    && self.holds(peer, piece)
            })
            .collect();
        for piece in orphans {
            if need == 0 {
                return out;
            }
            self.set_owner(piece, peer);
            self.take_open(peer, piece, &mut need, &mut out);
        }
        if need == 0 {
            return out;
        }

        // 3. New pieces, rarest first.
        for piece in self.pick_fresh(peer, need) {
            if need == 0 {
                return out;
            }
            self.start_piece(piece);
            self.set_owner(piece, peer);
            self.take_open(peer, piece, &mut need, &mut out);
        }
        if need == 0 {
            return out;
        }

        // 4. Help with pieces owned by other peers.
        let others: Vec<u32> = self
            .downloading
            .iter()
            .copied()
            .filter(|&piece| {
                !self.solo.contains(&piece)
                    && self.partial(piece).is_some_and(|pt| pt.n_open > 0)
                    && self.holds(peer, piece)
            })
            .collect();
        for piece in others {
            if need == 0 {
                return out;
            }
            self.take_open(peer, piece, &mut need, &mut out);
        }
        if need == 0 {
            return out;
        }

        // 5. End-game: every block of every unfinished piece has been requested. At most one
        // second copy per top-up, and only while the peer is nearly idle.
        let all_requested = self.missing.is_empty()
            && self
                .downloading
                .iter()
                .all(|&piece| self.partial(piece).is_none_or(|pt| pt.n_open == 0));
        if all_requested && self.outstanding(peer) < ENDGAME_MAX_OUTSTANDING {
            if let Some(block) = self.endgame_block(peer) {
                if self.add_second(peer, block) {
                    self.seconds.endgame += 1;
                    out.push(block);
                }
            }
        }
        out
    }

    /// The end-game's choice for `peer`: a block outstanding at exactly one other peer (no
    /// copy being written), in a non-solo piece `peer` holds, that is likely to arrive last:
    /// from the peer with the most blocks outstanding (the longest queue), the last of them
    /// (the peer's requests go out in (piece, offset) order, mostly). A copy of a block at
    /// the head of a queue would almost always lose, and be thrown away.
    fn endgame_block(&self, peer: PeerId) -> Option<Block> {
        let mut others: Vec<(usize, PeerId)> = self
            .peers
            .iter()
            .filter(|&(&q, p)| q != peer && !p.outstanding.is_empty())
            .map(|(&q, p)| (p.outstanding.len(), q))
            .collect();
        // Longest queue first; among equals, the lowest id (a deterministic order).
        others.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for (_, q) in others {
            let Some(p) = self.peers.get(&q) else {
                continue;
            };
            if let Some(block) = p
                .outstanding
                .iter()
                .rev()
                .find(|b| self.second_copy_ok(peer, b))
            {
                return Some(*block);
            }
        }
        None
    }

    /// Whether `peer` may be asked for a second copy of `block`: a block of a non-solo
    /// piece that `peer` holds, requested from exactly one other peer, no copy being written.
    fn second_copy_ok(&self, peer: PeerId, block: &Block) -> bool {
        if self.solo.contains(&block.piece) || !self.holds(peer, block.piece) {
            return false;
        }
        self.block_index(block).is_some_and(|idx| {
            self.partial(block.piece).is_some_and(|pt| {
                matches!(
                    pt.blocks.get(idx),
                    Some(BlockState::Requested { by, writer: None })
                        if by.count() == 1 && !by.contains(peer)
                )
            })
        })
    }

    /// Records `peer` as the second requester of `block` (chosen by
    /// [`endgame_block`](Self::endgame_block), so the block has one other requester);
    /// false if it could not be.
    fn add_second(&mut self, peer: PeerId, block: Block) -> bool {
        let Some(idx) = self.block_index(&block) else {
            return false;
        };
        let Some(Slot::Downloading(pt)) = self.slots.get_mut(block.piece as usize) else {
            return false;
        };
        let Some(BlockState::Requested { by, .. }) = pt.blocks.get_mut(idx) else {
            return false;
        };
        if !by.add(peer) {
            return false;
        }
        self.peers
            .get_mut(&peer)
            .is_some_and(|p| p.outstanding.insert(block))
    }

    /// A second copy, from `peer` (up to `max_in_flight` outstanding), of blocks outstanding
    /// only at one of `slower` (no copy being written yet), in pieces that `slower` own and
    /// `peer` holds: a fast link takes over the pieces waiting behind a slow or busy sharer.
    /// The blocks are taken from the back of the slower peers' queues (the longest queue
    /// first), which they would deliver last and their sharers have most likely not sent yet,
    /// so the cancel for a copy that loses usually arrives in time. Whichever copy arrives
    /// first is written, and [`Picker::block_written`] names the loser (to cancel), as in the
    /// end-game. Solo pieces are left alone.
    ///
    /// Only the blocks that `peer` could win are copied. `slower` maps each slower peer to its
    /// delivery rate as a fraction of `peer`'s (0 for a peer that is not delivering: choked or
    /// silent, whose whole queue may be copied). A block at position `i` (from 0) of a slower
    /// peer's queue arrives after about `(i + 1) / speed` of `peer`'s block times; the `k`-th
    /// copy (from 0) that `peer` takes arrives after `outstanding + k + 1` of them. A block is
    /// copied only if the copy would arrive first: the head of a queue that is only
    /// moderately slower is left alone (see the module documentation).
    pub fn relieve(
        &mut self,
        peer: PeerId,
        max_in_flight: usize,
        slower: &BTreeMap<PeerId, f64>,
    ) -> Vec<Block> {
        let mut out = Vec::new();
        if self.banned.contains(&peer) || slower.contains_key(&peer) {
            return out;
        }
        let Some(p) = self.peers.get(&peer) else {
            return out;
        };
        let own = p.outstanding.len();
        let mut need = max_in_flight.saturating_sub(own);
        if need == 0 {
            return out;
        }
        let mut victims: Vec<(usize, PeerId, f64)> = slower
            .iter()
            .filter_map(|(q, &speed)| self.peers.get(q).map(|p| (p.outstanding.len(), *q, speed)))
            .filter(|&(n, _, _)| n > 0)
            .collect();
        victims.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for (_, q, speed) in victims {
            let Some(p) = self.peers.get(&q) else {
                continue;
            };
            // (position in the queue, block), from the back. The queue is kept in block
            // order, which is the order the blocks were asked for (a peer works through its
            // pieces in order), so the position approximates when the sharer sends it.
            let blocks: Vec<(usize, Block)> = p
                .outstanding
                .iter()
                .enumerate()
                .rev()
                .filter(|(_, b)| {
                    self.partial(b.piece)
                        .and_then(|pt| pt.owner)
                        .is_some_and(|o| slower.contains_key(&o))
                        && self.second_copy_ok(peer, b)
                })
                .map(|(i, b)| (i, *b))
                .collect();
            for (i, block) in blocks {
                if need == 0 {
                    break;
                }
                let copy_at = (own + out.len() + 1) as f64;
                if (i + 1) as f64 <= speed.max(0.0) * copy_at {
                    // This block and the ones before it arrive from `q` first.
                    break;
                }
                if self.add_second(peer, block) {
                    need -= 1;
                    out.push(block);
                }
            }
        }
        self.seconds.relief += out.len() as u64;
        out
    }

    /// How many connected, non-banned peers hold `piece` (0 out of range).
    pub fn availability(&self, piece: u32) -> u32 {
        self.avail.get(piece as usize).copied().unwrap_or(0)
    }

    /// Whether `peer` is connected and holds `piece`.
    fn holds(&self, peer: PeerId, piece: u32) -> bool {
        self.peers
            .get(&peer)
            .is_some_and(|p| p.has.get(piece) && !p.not_now.contains(&piece))
    }

    /// Up to enough Missing pieces that `peer` holds to give it `need` blocks, rarest first.
    fn pick_fresh(&self, peer: PeerId, need: usize) -> Vec<u32> {
        let Some(p) = self.peers.get(&peer) else {
            return Vec::new();
        };
        let mut picked = Vec::new();
        let mut blocks = 0usize;
        // A trusted peer's pieces have availability >= 1, so pieces nobody holds are skipped.
        for &(_, rank) in self.missing.range((1, 0)..) {
            let piece = self.by_rank.get(rank as usize).copied().unwrap_or(rank);
            if blocks >= need {
                break;
            }
            if p.has.get(piece) && !p.not_now.contains(&piece) {
                picked.push(piece);
                blocks = blocks.saturating_add(self.n_blocks(piece) as usize);
            }
        }
        picked
    }

    /// Requests the open blocks of `piece` from `peer`, in order, while `need` lasts.
    fn take_open(&mut self, peer: PeerId, piece: u32, need: &mut usize, out: &mut Vec<Block>) {
        if !self.holds(peer, piece) {
            return;
        }
        let Some(Slot::Downloading(pt)) = self.slots.get_mut(piece as usize) else {
            return;
        };
        let mut taken = Vec::new();
        for (idx, state) in pt.blocks.iter_mut().enumerate() {
            if *need == 0 || pt.n_open == 0 {
                break;
            }
            if *state == BlockState::Open {
                *state = BlockState::Requested {
                    by: Requesters::one(peer),
                    writer: None,
                };
                pt.n_open -= 1;
                *need -= 1;
                taken.push(idx);
            }
        }
        self.record_requests(peer, piece, &taken, out);
    }

    fn record_requests(&mut self, peer: PeerId, piece: u32, idxs: &[usize], out: &mut Vec<Block>) {
        let blocks: Vec<Block> = idxs.iter().map(|&i| self.block_at(piece, i)).collect();
        if let Some(p) = self.peers.get_mut(&peer) {
            p.outstanding.extend(blocks.iter().copied());
        }
        out.extend(blocks);
    }

    // -----------------------------------------------------------------------------------------
    // Blocks
    // -----------------------------------------------------------------------------------------

    /// A block's header arrived from `peer`, before its data. [`Verdict::Write`] only if the
    /// peer requested exactly this block, the block is not received yet, no other copy of it
    /// is being written, and the piece is Downloading (not Verifying or Have). The peer's
    /// request is consumed either way: a discarded end-game copy is not expected again.
    pub fn block_arrived(&mut self, peer: PeerId, block: Block) -> Verdict {
        let Some(idx) = self.block_index(&block) else {
            return Verdict::Discard;
        };
        let Some(Slot::Downloading(pt)) = self.slots.get_mut(block.piece as usize) else {
            return Verdict::Discard;
        };
        let Some(BlockState::Requested { by, writer }) = pt.blocks.get_mut(idx) else {
            return Verdict::Discard;
        };
        if !by.contains(peer) {
            return Verdict::Discard;
        }
        match *writer {
            None => {
                *writer = Some(peer);
                Verdict::Write
            }
            // The same copy announced twice: the first one is being written.
            Some(w) if w == peer => Verdict::Discard,
            // Another peer's copy is being written: this one lost the end-game race.
            Some(_) => {
                by.remove(peer);
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.outstanding.remove(&block);
                }
                Verdict::Discard
            }
        }
    }

    /// The data of a block for which [`Picker::block_arrived`] said [`Verdict::Write`] is in
    /// the file. Returns the end-game losers to cancel and, if this completed the piece, the
    /// piece (now Verifying: hand it to the hasher). A call without that verdict is ignored.
    pub fn block_written(&mut self, peer: PeerId, block: Block) -> Written {
        let mut written = Written::default();
        let Some(idx) = self.block_index(&block) else {
            return written;
        };
        let piece = block.piece;
        let Some(Slot::Downloading(pt)) = self.slots.get_mut(piece as usize) else {
            return written;
        };
        let Some(state) = pt.blocks.get_mut(idx) else {
            return written;
        };
        let BlockState::Requested { by, writer } = *state else {
            return written;
        };
        if writer != Some(peer) {
            return written;
        }
        *state = BlockState::Received(peer);
        pt.n_received += 1;
        let complete = pt.n_received as usize == pt.blocks.len();
        let owner = pt.owner;

        for other in by.iter() {
            if let Some(p) = self.peers.get_mut(&other) {
                p.outstanding.remove(&block);
            }
            if other != peer {
                written.cancels.push((other, block));
            }
        }
        if complete {
            let slot = std::mem::replace(&mut self.slots[piece as usize], Slot::Missing);
            if let Slot::Downloading(pt) = slot {
                self.slots[piece as usize] = Slot::Verifying(pt);
            }
            self.downloading.remove(&piece);
            if let Some(owner) = owner {
                if let Some(p) = self.peers.get_mut(&owner) {
                    p.owned.remove(&piece);
                }
            }
            self.leave_needed(piece);
            written.piece_complete = Some(piece);
        }
        written
    }

    /// Whether `block` is requested from `peer` now.
    fn requested_from(&self, peer: PeerId, block: &Block) -> bool {
        self.block_index(block).is_some_and(|idx| {
            self.partial(block.piece).is_some_and(|pt| {
                matches!(pt.blocks.get(idx), Some(BlockState::Requested { by, .. }) if by.contains(peer))
            })
        })
    }

    /// `peer` refused a block it was asked for. The block goes back to the pool and the peer
    /// is taken as not holding the piece (it gets no more requests for it and stops owning
    /// it). A refusal of a block the peer has no request for (say, after a cancel) is ignored.
    pub fn block_rejected(&mut self, peer: PeerId, block: Block) {
        let piece = block.piece;
        if !self.requested_from(peer, &block) {
            return;
        }
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.outstanding.remove(&block);
        let owned = p.owned.remove(&piece);
        let had = p.has.set(piece, false);
        self.drop_request(peer, block);
        if had && !self.banned.contains(&peer) {
            self.change_avail(piece, false);
        }
        if owned {
            self.disown(piece, peer);
        }
        self.maybe_revert(piece);
    }

    /// The peer declined a block of a piece it holds, for now (a seed sending each piece once
    /// while some piece has not left it yet): like [`block_rejected`](Self::block_rejected)
    /// the request is dropped and the piece disowned, but the peer still counts as holding it
    /// (so the download is not stuck for it) and is asked for it again only after
    /// [`undefer`](Self::undefer).
    pub fn block_deferred(&mut self, peer: PeerId, block: Block) {
        let piece = block.piece;
        if !self.requested_from(peer, &block) {
            return;
        }
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.outstanding.remove(&block);
        let owned = p.owned.remove(&piece);
        p.not_now.insert(piece);
        self.drop_request(peer, block);
        if owned {
            self.disown(piece, peer);
        }
        self.maybe_revert(piece);
    }

    /// `peer` may be asked for `piece` again.
    pub fn undefer(&mut self, peer: PeerId, piece: u32) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.not_now.remove(&piece);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Verification
    // -----------------------------------------------------------------------------------------

    /// The hasher's verdict on a Verifying piece (anything else is ignored). `ok`: the piece is
    /// Have. Not ok: the piece is Missing again and the peers blamed for it (see the module
    /// documentation) are banned; the newly banned peers are returned so that the driver can
    /// close them.
    pub fn piece_verified(&mut self, piece: u32, ok: bool) -> Vec<PeerId> {
        let i = piece as usize;
        if !matches!(self.slots.get(i), Some(Slot::Verifying(_))) {
            return Vec::new();
        }
        let new_state = if ok { Slot::Have } else { Slot::Missing };
        let Slot::Verifying(pt) = std::mem::replace(&mut self.slots[i], new_state) else {
            return Vec::new();
        };
        if ok {
            self.n_have += 1;
            return Vec::new();
        }

        self.missing.insert((self.avail[i], self.rank[i]));
        self.enter_needed(piece);
        let suppliers: BTreeSet<PeerId> = pt
            .blocks
            .iter()
            .filter_map(|state| match state {
                BlockState::Received(peer) => Some(*peer),
                _ => None,
            })
            .collect();
        let mut newly_banned = Vec::new();
        if suppliers.is_empty() {
            // A piece of a resumed `.part` (see `resume_piece`): nobody to blame.
        } else if suppliers.len() == 1 {
            for peer in suppliers {
                if self.ban(peer) {
                    newly_banned.push(peer);
                }
            }
        } else if !suppliers.iter().any(|peer| self.banned.contains(peer)) {
            self.solo.insert(piece);
        }
        newly_banned
    }

    /// A Missing piece whose data a resumed `.part` may already hold: it becomes Verifying
    /// with no supplier, so it is not requested, and a failed check sends it back to Missing
    /// without blaming any peer. False (nothing changes) if the piece is not Missing.
    pub fn resume_piece(&mut self, piece: u32) -> bool {
        let n_blocks = self.n_blocks(piece);
        let i = piece as usize;
        if !matches!(self.slots.get(i), Some(Slot::Missing)) {
            return false;
        }
        self.missing.remove(&(self.avail[i], piece));
        self.slots[i] = Slot::Verifying(Box::new(Partial::new(n_blocks)));
        self.leave_needed(piece);
        true
    }

    /// Bans `peer`; false if it already was. Its pieces stop counting, its requests and
    /// pieces return to the pool, and the blocks it delivered for unfinished pieces are
    /// dropped (they are probably bad too).
    fn ban(&mut self, peer: PeerId) -> bool {
        if !self.banned.insert(peer) {
            return false;
        }
        if let Some(p) = self.peers.get_mut(&peer) {
            let outstanding = std::mem::take(&mut p.outstanding);
            let owned = std::mem::take(&mut p.owned);
            let held: Vec<u32> = p.has.ones().collect();
            for piece in held {
                self.change_avail(piece, false);
            }
            self.release_work(peer, outstanding, owned);
        }
        let pieces: Vec<u32> = self.downloading.iter().copied().collect();
        for piece in pieces {
            if let Some(Slot::Downloading(pt)) = self.slots.get_mut(piece as usize) {
                for state in pt.blocks.iter_mut() {
                    if *state == BlockState::Received(peer) {
                        *state = BlockState::Open;
                        pt.n_received -= 1;
                        pt.n_open += 1;
                    }
                }
            }
            self.maybe_revert(piece);
        }
        true
    }

    // -----------------------------------------------------------------------------------------
    // Bookkeeping helpers
    // -----------------------------------------------------------------------------------------

    fn partial(&self, piece: u32) -> Option<&Partial> {
        match self.slots.get(piece as usize) {
            Some(Slot::Downloading(pt)) => Some(pt),
            _ => None,
        }
    }

    /// Missing -> Downloading.
    fn start_piece(&mut self, piece: u32) {
        let n_blocks = self.n_blocks(piece);
        let Some(slot) = self.slots.get_mut(piece as usize) else {
            return;
        };
        if matches!(slot, Slot::Missing) {
            *slot = Slot::Downloading(Box::new(Partial::new(n_blocks)));
            self.missing
                .remove(&(self.avail[piece as usize], self.rank[piece as usize]));
            self.downloading.insert(piece);
        }
    }

    fn set_owner(&mut self, piece: u32, peer: PeerId) {
        if let Some(Slot::Downloading(pt)) = self.slots.get_mut(piece as usize) {
            pt.owner = Some(peer);
            if let Some(p) = self.peers.get_mut(&peer) {
                p.owned.insert(piece);
            }
        }
    }

    /// Returns a departed or banned peer's requests and pieces to the pool. The peer's own
    /// sets are already taken out of it (or it is gone).
    fn release_work(&mut self, peer: PeerId, outstanding: BTreeSet<Block>, owned: BTreeSet<u32>) {
        let mut touched: BTreeSet<u32> = BTreeSet::new();
        for block in outstanding {
            touched.insert(block.piece);
            self.drop_request(peer, block);
        }
        for piece in owned {
            touched.insert(piece);
            self.disown(piece, peer);
        }
        for piece in touched {
            self.maybe_revert(piece);
        }
    }

    /// Forgets `peer`'s request for `block` in the piece's block states (not in the peer's
    /// own outstanding set, which the caller handles).
    fn drop_request(&mut self, peer: PeerId, block: Block) {
        let Some(idx) = self.block_index(&block) else {
            return;
        };
        let Some(Slot::Downloading(pt)) = self.slots.get_mut(block.piece as usize) else {
            return;
        };
        let Some(state) = pt.blocks.get_mut(idx) else {
            return;
        };
        if let BlockState::Requested { by, writer } = state {
            by.remove(peer);
            if *writer == Some(peer) {
                *writer = None;
            }
            if by.count() == 0 {
                *state = BlockState::Open;
                pt.n_open += 1;
            }
        }
    }

    /// `peer` stops owning `piece` (not touching the peer's own `owned` set). A solo piece
    /// starts over, since its blocks must all come from one peer.
    fn disown(&mut self, piece: u32, peer: PeerId) {
        let Some(Slot::Downloading(pt)) = self.slots.get_mut(piece as usize) else {
            return;
        };
        if pt.owner != Some(peer) {
            return;
        }
        pt.owner = None;
        if self.solo.contains(&piece) {
            self.reset_piece(piece);
        }
    }

    /// Downloading -> Missing, forgetting every request and received block of the piece.
    fn reset_piece(&mut self, piece: u32) {
        let i = piece as usize;
        if !matches!(self.slots.get(i), Some(Slot::Downloading(_))) {
            return;
        }
        let Slot::Downloading(pt) = std::mem::replace(&mut self.slots[i], Slot::Missing) else {
            return;
        };
        for (idx, state) in pt.blocks.iter().enumerate() {
            if let BlockState::Requested { by, .. } = state {
                let block = self.block_at(piece, idx);
                for r in by.iter() {
                    if let Some(p) = self.peers.get_mut(&r) {
                        p.outstanding.remove(&block);
                    }
                }
            }
        }
        if let Some(owner) = pt.owner {
            if let Some(p) = self.peers.get_mut(&owner) {
                p.owned.remove(&piece);
            }
        }
        self.downloading.remove(&piece);
        self.missing.insert((self.avail[i], self.rank[i]));
    }

    /// An orphan with nothing requested or received goes back to Missing, where it competes
    /// by rarity again.
    fn maybe_revert(&mut self, piece: u32) {
        if self
            .partial(piece)
            .is_some_and(|pt| pt.owner.is_none() && pt.is_idle())
        {
            self.reset_piece(piece);
        }
    }

    /// Adds or removes one peer from a piece's availability.
    fn change_avail(&mut self, piece: u32, up: bool) {
        let i = piece as usize;
        let Some(&old) = self.avail.get(i) else {
            return;
        };
        let new = if up {
            old.saturating_add(1)
        } else {
            old.saturating_sub(1)
        };
        if new == old {
            return;
        }
        self.avail[i] = new;
        let needed = match self.slots[i] {
            Slot::Missing => {
                self.missing.remove(&(old, self.rank[i]));
                self.missing.insert((new, self.rank[i]));
                true
            }
            Slot::Downloading(_) => true,
            Slot::Verifying(_) | Slot::Have => false,
        };
        if needed {
            if old == 0 {
                self.n_unavailable = self.n_unavailable.saturating_sub(1);
            } else if new == 0 {
                self.n_unavailable += 1;
            }
        }
    }

    /// The piece stops being Missing or Downloading.
    fn leave_needed(&mut self, piece: u32) {
        if self.avail.get(piece as usize) == Some(&0) {
            self.n_unavailable = self.n_unavailable.saturating_sub(1);
        }
    }

    /// The piece becomes Missing or Downloading again.
    fn enter_needed(&mut self, piece: u32) {
        if self.avail.get(piece as usize) == Some(&0) {
            self.n_unavailable += 1;
        }
    }
}

#[cfg(test)]
#[path = "picker_tests.rs"]
mod tests;
