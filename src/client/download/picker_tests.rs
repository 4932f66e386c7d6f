//! Tests of the piece picker: geometry, the picking policy, end-game, blame and bans,
//! robustness against arbitrary call sequences, and a randomized simulation of whole
//! downloads with honest, corrupt, leaving and returning peers.
//!
//! Besides the public API, the tests look at the picker's private state through
//! [`check`], which verifies every internal invariant (availability counts, the sorted
//! missing set, block states against the peers' outstanding sets, ownership, the solo rule)
//! after each step.

use super::*;

const A: PeerId = PeerId(1);
const B: PeerId = PeerId(2);
const C: PeerId = PeerId(3);
const D: PeerId = PeerId(4);
const E: PeerId = PeerId(5);
const NOBODY: PeerId = PeerId(999);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn all(n: u32) -> Vec<bool> {
    vec![true; n as usize]
}

fn only(n: u32, pieces: &[u32]) -> Vec<bool> {
    let mut v = vec![false; n as usize];
    for &p in pieces {
        v[p as usize] = true;
    }
    v
}

/// Every peer of `peers` as stalled (speed 0): [`Picker::relieve`] may copy its whole queue.
fn stalled(peers: &BTreeSet<PeerId>) -> BTreeMap<PeerId, f64> {
    peers.iter().map(|&p| (p, 0.0)).collect()
}

fn blk(piece: u32, offset: u32, len: u32) -> Block {
    Block { piece, offset, len }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Missing,
    Downloading,
    Verifying,
    Have,
}

fn state(pk: &Picker, piece: u32) -> St {
    match &pk.slots[piece as usize] {
        Slot::Missing => St::Missing,
        Slot::Downloading(_) => St::Downloading,
        Slot::Verifying(_) => St::Verifying,
        Slot::Have => St::Have,
    }
}

fn owner(pk: &Picker, piece: u32) -> Option<PeerId> {
    match &pk.slots[piece as usize] {
        Slot::Downloading(pt) | Slot::Verifying(pt) => pt.owner,
        _ => None,
    }
}

/// The peers a block is outstanding at, sorted.
fn requesters(pk: &Picker, block: Block) -> Vec<PeerId> {
    let idx = pk.block_index(&block).expect("a valid block");
    match &pk.slots[block.piece as usize] {
        Slot::Downloading(pt) => match pt.blocks[idx] {
            BlockState::Requested { by, .. } => {
                let mut v: Vec<PeerId> = by.iter().collect();
                v.sort();
                v
            }
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

fn block_state(pk: &Picker, block: Block) -> Option<BlockState> {
    let idx = pk.block_index(&block)?;
    match &pk.slots[block.piece as usize] {
        Slot::Downloading(pt) | Slot::Verifying(pt) => Some(pt.blocks[idx]),
        _ => None,
    }
}

/// `next_requests`, then the invariant check.
fn req(pk: &mut Picker, peer: PeerId, depth: usize) -> Vec<Block> {
    let before = pk.outstanding(peer);
    let got = pk.next_requests(peer, depth);
    check(pk);
    assert_eq!(pk.outstanding(peer), before + got.len());
    assert!(got.is_empty() || pk.outstanding(peer) <= depth);
    got
}

/// A block arrives from `peer` and is written; the piece's completion and cancels returned.
fn deliver(pk: &mut Picker, peer: PeerId, block: Block) -> Written {
    assert_eq!(
        pk.block_arrived(peer, block),
        Verdict::Write,
        "{peer:?} {block:?}"
    );
    check(pk);
    let w = pk.block_written(peer, block);
    check(pk);
    w
}

/// Delivers every block of `blocks` from `peer`; returns the pieces completed.
fn deliver_all(pk: &mut Picker, peer: PeerId, blocks: &[Block]) -> Vec<u32> {
    let mut done = Vec::new();
    for &b in blocks {
        if let Some(p) = deliver(pk, peer, b).piece_complete {
            done.push(p);
        }
    }
    done
}

fn verified(pk: &mut Picker, piece: u32, ok: bool) -> Vec<PeerId> {
    let banned = pk.piece_verified(piece, ok);
    check(pk);
    banned
}

/// The distinct pieces of some blocks, in order of first appearance.
fn pieces_of(blocks: &[Block]) -> Vec<u32> {
    let mut v: Vec<u32> = Vec::new();
    for b in blocks {
        if !v.contains(&b.piece) {
            v.push(b.piece);
        }
    }
    v
}

/// Every internal invariant of the picker.
fn check(pk: &Picker) {
    let n = pk.n_pieces as usize;
    assert_eq!(pk.slots.len(), n);
    assert_eq!(pk.avail.len(), n);
    let mut missing = BTreeSet::new();
    let mut downloading = BTreeSet::new();
    let mut n_have = 0;
    let mut n_unavailable = 0;
    for piece in 0..pk.n_pieces {
        let i = piece as usize;
        let avail = pk
            .peers
            .iter()
            .filter(|(id, p)| !pk.banned.contains(id) && p.has.get(piece))
            .count() as u32;
        assert_eq!(pk.avail[i], avail, "availability of piece {piece}");
        match &pk.slots[i] {
            Slot::Missing => {
                missing.insert((avail, pk.rank[piece as usize]));
                n_unavailable += u32::from(avail == 0);
            }
            Slot::Downloading(pt) => {
                downloading.insert(piece);
                n_unavailable += u32::from(avail == 0);
                check_partial(pk, piece, pt, false);
            }
            Slot::Verifying(pt) => check_partial(pk, piece, pt, true),
            Slot::Have => n_have += 1,
        }
    }
    assert_eq!(pk.missing, missing, "missing set");
    assert_eq!(pk.downloading, downloading, "downloading set");
    assert_eq!(pk.n_have, n_have, "n_have");
    assert_eq!(pk.n_unavailable, n_unavailable, "n_unavailable");
    for (&id, p) in &pk.peers {
        assert_eq!(p.has.bits.len(), n);
        if pk.banned.contains(&id) {
            assert!(p.outstanding.is_empty(), "banned {id:?} has requests");
            assert!(p.owned.is_empty(), "banned {id:?} owns pieces");
        }
        for b in &p.outstanding {
            let idx = pk.block_index(b).expect("outstanding block is valid");
            match &pk.slots[b.piece as usize] {
                Slot::Downloading(pt) => match pt.blocks[idx] {
                    BlockState::Requested { by, .. } => {
                        assert!(by.contains(id), "{id:?} outstanding {b:?} not in by")
                    }
                    other => panic!("{id:?} outstanding {b:?} in state {other:?}"),
                },
                _ => panic!("{id:?} outstanding {b:?} of a piece not downloading"),
            }
        }
        for &piece in &p.owned {
            assert_eq!(state(pk, piece), St::Downloading, "{id:?} owns {piece}");
            assert_eq!(owner(pk, piece), Some(id));
            assert!(p.has.get(piece), "{id:?} owns {piece} it does not hold");
        }
    }
}

fn check_partial(pk: &Picker, piece: u32, pt: &Partial, verifying: bool) {
    assert_eq!(pt.blocks.len(), pk.n_blocks(piece) as usize);
    let open = pt.blocks.iter().filter(|s| **s == BlockState::Open).count();
    let received = pt
        .blocks
        .iter()
        .filter(|s| matches!(s, BlockState::Received(_)))
        .count();
    assert_eq!(pt.n_open as usize, open, "n_open of {piece}");
    assert_eq!(pt.n_received as usize, received, "n_received of {piece}");
    if verifying {
        assert_eq!(
            received,
            pt.blocks.len(),
            "verifying {piece} not fully received"
        );
    } else {
        assert!(
            received < pt.blocks.len(),
            "downloading {piece} fully received"
        );
        match pt.owner {
            Some(o) => {
                let p = pk.peers.get(&o).expect("owner is connected");
                assert!(
                    p.owned.contains(&piece),
                    "owner {o:?} does not list {piece}"
                );
                assert!(!pk.banned.contains(&o));
            }
            None => assert!(!pt.is_idle(), "idle orphan {piece} not reverted"),
        }
    }
    for (idx, s) in pt.blocks.iter().enumerate() {
        if let BlockState::Requested { by, writer } = s {
            assert!(!verifying);
            assert!((1..=2).contains(&by.count()), "{piece}/{idx}: {by:?}");
            if let Some(w) = writer {
                assert!(by.contains(*w), "writer not a requester");
            }
            let block = pk.block_at(piece, idx);
            for r in by.iter() {
                assert!(!pk.banned.contains(&r), "banned requester {r:?}");
                let p = pk.peers.get(&r).expect("requester is connected");
                assert!(p.outstanding.contains(&block), "{r:?} lost {block:?}");
            }
        }
    }
    if pk.solo.contains(&piece) {
        // A solo attempt comes from its owner alone.
        let o = pt.owner;
        assert!(verifying || o.is_some(), "solo {piece} without owner");
        let mut suppliers = BTreeSet::new();
        for s in &pt.blocks {
            match s {
                BlockState::Requested { by, .. } => {
                    assert_eq!(by.count(), 1, "solo {piece} duplicated");
                    assert!(by.iter().all(|r| Some(r) == o), "solo {piece} helped");
                }
                BlockState::Received(r) => {
                    suppliers.insert(*r);
                }
                BlockState::Open => {}
            }
        }
        assert!(suppliers.len() <= 1, "solo {piece} mixed: {suppliers:?}");
        if !verifying {
            assert!(suppliers.iter().all(|r| Some(*r) == o));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Geometry
// ---------------------------------------------------------------------------------------------

#[test]
fn geometry_short_last_piece_and_block() {
    let mut pk = Picker::new(10_000, 4096, 1024);
    assert_eq!(pk.n_pieces(), 3);
    assert_eq!(pk.piece_size(0), Some(4096));
    assert_eq!(pk.piece_size(1), Some(4096));
    assert_eq!(pk.piece_size(2), Some(10_000 - 8192));
    assert_eq!(pk.piece_size(3), None);
    assert_eq!(pk.piece_size(u32::MAX), None);
    assert!(!pk.is_complete());
    check(&pk);

    pk.add_peer(A, &all(3));
    let got = req(&mut pk, A, 100);
    // All availability 1: index order; 4 + 4 + 2 blocks.
    assert_eq!(got.len(), 10);
    assert_eq!(pieces_of(&got), vec![0, 1, 2]);
    assert_eq!(got[8], blk(2, 0, 1024));
    assert_eq!(got[9], blk(2, 1024, 784));
    assert_eq!(got.iter().map(|b| u64::from(b.len)).sum::<u64>(), 10_000);
    assert_eq!(pk.file_offset(&got[9]), 9216);
    assert_eq!(pk.file_offset(&got[9]) + u64::from(got[9].len), 10_000);
    assert_eq!(pk.file_offset(&blk(1, 3072, 1024)), 4096 + 3072);
    // Blocks tile the file exactly.
    let mut pos = 0;
    for b in &got {
        assert_eq!(pk.file_offset(b), pos);
        pos += u64::from(b.len);
    }
    let done = deliver_all(&mut pk, A, &got);
    assert_eq!(done, vec![0, 1, 2]);
    for p in 0..3 {
        assert!(verified(&mut pk, p, true).is_empty());
    }
    assert!(pk.is_complete());
    assert_eq!(pk.n_have(), 3);
}

#[test]
fn geometry_exact_multiple_and_uneven_blocks() {
    let pk = Picker::new(8192, 4096, 1024);
    assert_eq!(pk.n_pieces(), 2);
    assert_eq!(pk.piece_size(1), Some(4096));

    // A block length that does not divide the piece: blocks 4, 4, 2.
    let mut pk = Picker::new(20, 10, 4);
    assert_eq!(pk.n_pieces(), 2);
    pk.add_peer(A, &only(2, &[1]));
    let got = req(&mut pk, A, 10);
    assert_eq!(got, vec![blk(1, 0, 4), blk(1, 4, 4), blk(1, 8, 2)]);
    assert_eq!(pk.file_offset(&got[2]), 18);

    // One piece shorter than a block.
    let mut pk = Picker::new(3, 10, 4);
    assert_eq!(pk.n_pieces(), 1);
    assert_eq!(pk.piece_size(0), Some(3));
    pk.add_peer(A, &all(1));
    assert_eq!(req(&mut pk, A, 10), vec![blk(0, 0, 3)]);
}

#[test]
fn geometry_degenerate_lengths() {
    // piece_len 0 and block_len 0 are taken as 1.
    let mut pk = Picker::new(5, 0, 0);
    assert_eq!(pk.n_pieces(), 5);
    assert_eq!(pk.piece_size(4), Some(1));
    pk.add_peer(A, &all(5));
    let got = req(&mut pk, A, 2);
    assert_eq!(got, vec![blk(0, 0, 1), blk(1, 0, 1)]);

    // block_len above piece_len is taken as piece_len.
    let mut pk = Picker::new(10, 4, 100);
    assert_eq!(pk.n_pieces(), 3);
    pk.add_peer(A, &all(3));
    let got = req(&mut pk, A, 10);
    assert_eq!(got, vec![blk(0, 0, 4), blk(1, 0, 4), blk(2, 0, 2)]);
}

#[test]
fn geometry_zero_length_file_is_complete_at_once() {
    let mut pk = Picker::new(0, 4096, 1024);
    check(&pk);
    assert_eq!(pk.n_pieces(), 0);
    assert!(pk.is_complete());
    assert_eq!(pk.n_have(), 0);
    assert!(!pk.stuck());
    assert_eq!(pk.piece_size(0), None);
    assert!(!pk.have(0));
    pk.add_peer(A, &all(4));
    assert!(req(&mut pk, A, 10).is_empty());
    assert_eq!(pk.block_arrived(A, blk(0, 0, 0)), Verdict::Discard);
    assert_eq!(pk.block_written(A, blk(0, 0, 0)), Written::default());
    assert!(pk.piece_verified(0, false).is_empty());
    pk.peer_has(A, 0);
    pk.block_rejected(A, blk(0, 0, 1));
    pk.remove_peer(A);
    check(&pk);
    assert!(pk.is_complete());
    assert!(!pk.stuck());
}

#[test]
fn geometry_past_4_gib() {
    let len = 5 * (1u64 << 30) + 123;
    let mut pk = Picker::new(len, 1 << 20, 1 << 14);
    assert_eq!(pk.n_pieces(), 5 * 1024 + 1);
    let last = pk.n_pieces() - 1;
    assert_eq!(pk.piece_size(last - 1), Some(1 << 20));
    assert_eq!(pk.piece_size(last), Some(123));
    assert_eq!(pk.file_offset(&blk(last, 0, 123)), 5 << 30);
    assert_eq!(
        pk.file_offset(&blk(last - 1, (1 << 20) - (1 << 14), 1 << 14)),
        (5 << 30) - (1 << 14)
    );
    // Download the last (short) piece and a full one.
    pk.add_peer(A, &only(pk.n_pieces(), &[4096, last]));
    let got = req(&mut pk, A, 100);
    assert_eq!(got.len(), 64 + 1);
    assert!(got.contains(&blk(last, 0, 123)));
    assert_eq!(pk.file_offset(&blk(4096, 0, 1 << 14)), 4 << 30);
    let done = deliver_all(&mut pk, A, &got);
    assert_eq!(done.len(), 2);
    assert!(verified(&mut pk, last, true).is_empty());
    assert!(pk.have(last));

    // A piece length near u32::MAX: piece offsets beyond 4 GiB, a 3-byte last piece.
    let len = 3u64 << 32;
    let mut pk = Picker::new(len, u32::MAX, 1 << 14);
    assert_eq!(pk.n_pieces(), 4);
    assert_eq!(pk.piece_size(2), Some(u32::MAX));
    assert_eq!(pk.piece_size(3), Some(3));
    assert_eq!(pk.file_offset(&blk(3, 0, 3)), 3 * u64::from(u32::MAX));
    assert_eq!(
        pk.file_offset(&blk(2, u32::MAX - 1, 1)),
        3 * u64::from(u32::MAX) - 1
    );
    pk.add_peer(A, &only(4, &[3]));
    assert_eq!(req(&mut pk, A, 4), vec![blk(3, 0, 3)]);
    // The last block of piece 2 is short: u32::MAX = 262143 * 16384 + 16383.
    let size = u32::MAX;
    let last_off = (size - 1) / (1 << 14) * (1 << 14);
    let last_len = size - last_off;
    assert_eq!(last_len, 16383);
    assert_eq!(
        pk.block_index(&blk(2, last_off, last_len)),
        Some((last_off >> 14) as usize)
    );
    assert_eq!(pk.block_index(&blk(2, last_off, 1 << 14)), None);
}

// ---------------------------------------------------------------------------------------------
// Rarest first
// ---------------------------------------------------------------------------------------------

#[test]
fn rarest_first_with_lowest_index_tie_break() {
    let mut pk = Picker::new(5, 1, 1);
    pk.add_peer(A, &all(5));
    pk.add_peer(B, &only(5, &[0, 1, 2, 3]));
    pk.add_peer(C, &only(5, &[0, 1, 2]));
    pk.add_peer(D, &only(5, &[0]));
    check(&pk);
    // Availability: 4, 3, 3, 2, 1.
    let got = req(&mut pk, A, 5);
    assert_eq!(pieces_of(&got), vec![4, 3, 1, 2, 0]);
}

#[test]
fn rarest_first_one_at_a_time_and_after_changes() {
    let mut pk = Picker::new(4, 1, 1);
    pk.add_peer(A, &all(4));
    pk.add_peer(B, &only(4, &[0, 1]));
    pk.add_peer(C, &only(4, &[0]));
    // Availability: 3, 2, 1, 1 -> 2 (tie with 3, lower index).
    assert_eq!(req(&mut pk, A, 1), vec![blk(2, 0, 1)]);
    // A `have` makes piece 3 as common as piece 1; the tie goes to piece 1.
    pk.peer_has(B, 3);
    check(&pk);
    assert_eq!(req(&mut pk, A, 2), vec![blk(1, 0, 1)]);
    // B leaves: piece 3 is rare again (1), piece 0 at 2.
    pk.remove_peer(B);
    check(&pk);
    assert_eq!(req(&mut pk, A, 3), vec![blk(3, 0, 1)]);
    assert_eq!(req(&mut pk, A, 4), vec![blk(0, 0, 1)]);
}

#[test]
fn only_pieces_the_peer_holds_are_requested() {
    let mut pk = Picker::new(6, 1, 1);
    pk.add_peer(A, &only(6, &[1, 4]));
    pk.add_peer(B, &only(6, &[0, 1, 2, 3, 4]));
    let got = req(&mut pk, A, 10);
    assert_eq!(pieces_of(&got), vec![1, 4]);
    let got = req(&mut pk, B, 10);
    // Pieces 1 and 4 are fully requested at A: B gets 0, 2, 3 and nothing of piece 5.
    assert_eq!(pieces_of(&got), vec![0, 2, 3]);
    assert!(pk.stuck(), "nobody holds piece 5");
}

// ---------------------------------------------------------------------------------------------
// Partial pieces first, ownership
// ---------------------------------------------------------------------------------------------

#[test]
fn orphan_is_adopted_before_new_pieces() {
    let mut pk = Picker::new(16, 4, 1); // 4 pieces of 4 blocks
    pk.add_peer(A, &all(4));
    let got = req(&mut pk, A, 2);
    assert_eq!(got, vec![blk(0, 0, 1), blk(0, 1, 1)]);
    assert_eq!(owner(&pk, 0), Some(A));
    assert_eq!(deliver(&mut pk, A, got[0]), Written::default());
    pk.remove_peer(A);
    check(&pk);
    // Piece 0 keeps its received block and is an orphan.
    assert_eq!(state(&pk, 0), St::Downloading);
    assert_eq!(owner(&pk, 0), None);
    assert_eq!(block_state(&pk, got[0]), Some(BlockState::Received(A)));
    assert_eq!(block_state(&pk, got[1]), Some(BlockState::Open));

    // Piece 0 is the most common now, yet it is finished first.
    pk.add_peer(B, &all(4));
    pk.add_peer(C, &only(4, &[0, 1, 2]));
    pk.add_peer(D, &only(4, &[0]));
    pk.add_peer(E, &only(4, &[1]));
    // E does not hold piece 0: it cannot adopt it.
    assert_eq!(req(&mut pk, E, 1), vec![blk(1, 0, 1)]);
    assert_eq!(owner(&pk, 0), None);
    let got = req(&mut pk, B, 3);
    assert_eq!(got, vec![blk(0, 1, 1), blk(0, 2, 1), blk(0, 3, 1)]);
    assert_eq!(owner(&pk, 0), Some(B));
    // Then rarest first: piece 3 (only B).
    let got = req(&mut pk, B, 4);
    assert_eq!(got, vec![blk(3, 0, 1)]);
}

#[test]
fn idle_orphan_goes_back_to_missing() {
    let mut pk = Picker::new(8, 4, 1);
    pk.add_peer(A, &all(2));
    let got = req(&mut pk, A, 2);
    assert_eq!(pieces_of(&got), vec![0]);
    pk.remove_peer(A);
    check(&pk);
    assert_eq!(state(&pk, 0), St::Missing);
    assert_eq!(pk.outstanding(A), 0);
    // It competes by rarity again: piece 1 (only C) is now rarer than piece 0 (B and C).
    pk.add_peer(B, &only(2, &[0]));
    pk.add_peer(C, &all(2));
    assert_eq!(pieces_of(&req(&mut pk, C, 1)), vec![1]);
}

#[test]
fn one_peer_per_piece_normally() {
    let mut pk = Picker::new(16, 4, 1);
    pk.add_peer(A, &all(4));
    pk.add_peer(B, &all(4));
    assert_eq!(req(&mut pk, A, 2), vec![blk(0, 0, 1), blk(0, 1, 1)]);
    // B starts a new piece instead of taking piece 0's open blocks.
    assert_eq!(req(&mut pk, B, 2), vec![blk(1, 0, 1), blk(1, 1, 1)]);
    // Each continues its own piece first.
    assert_eq!(req(&mut pk, A, 4), vec![blk(0, 2, 1), blk(0, 3, 1)]);
    assert_eq!(req(&mut pk, B, 4), vec![blk(1, 2, 1), blk(1, 3, 1)]);
    assert_eq!(owner(&pk, 0), Some(A));
    assert_eq!(owner(&pk, 1), Some(B));
    for b in 0..4 {
        assert_eq!(requesters(&pk, blk(0, b, 1)), vec![A]);
        assert_eq!(requesters(&pk, blk(1, b, 1)), vec![B]);
    }
}

#[test]
fn help_only_when_nothing_of_ones_own() {
    let mut pk = Picker::new(12, 4, 1); // 3 pieces of 4 blocks
    pk.add_peer(A, &only(3, &[0]));
    pk.add_peer(B, &only(3, &[0, 2]));
    assert_eq!(req(&mut pk, A, 2), vec![blk(0, 0, 1), blk(0, 1, 1)]);
    // B has a fresh piece of its own (2): it takes that first.
    assert_eq!(pieces_of(&req(&mut pk, B, 4)), vec![2]);
    // With piece 2 fully requested, B helps with piece 0, which A still owns.
    assert_eq!(req(&mut pk, B, 6), vec![blk(0, 2, 1), blk(0, 3, 1)]);
    assert_eq!(owner(&pk, 0), Some(A));
    assert_eq!(requesters(&pk, blk(0, 3, 1)), vec![B]);
    // A finds nothing open in its piece; once it has piece 1 it starts that.
    assert!(req(&mut pk, A, 3).is_empty());
    pk.peer_has(A, 1);
    assert_eq!(pieces_of(&req(&mut pk, A, 3)), vec![1]);
}

// ---------------------------------------------------------------------------------------------
// Pipelining
// ---------------------------------------------------------------------------------------------

#[test]
fn pipelining_tops_up_to_depth() {
    let mut pk = Picker::new(40, 4, 1); // 10 pieces of 4 blocks
    pk.add_peer(A, &all(10));
    assert!(req(&mut pk, A, 0).is_empty());
    let got = req(&mut pk, A, 6);
    assert_eq!(got.len(), 6);
    assert_eq!(pieces_of(&got), vec![0, 1]);
    assert_eq!(pk.outstanding(A), 6);
    assert!(req(&mut pk, A, 6).is_empty());
    assert!(req(&mut pk, A, 3).is_empty(), "a lower depth asks nothing");
    assert_eq!(pk.outstanding(A), 6);
    deliver(&mut pk, A, got[0]);
    deliver(&mut pk, A, got[1]);
    assert_eq!(pk.outstanding(A), 4);
    assert!(req(&mut pk, A, 4).is_empty());
    let more = req(&mut pk, A, 6);
    assert_eq!(more, vec![blk(1, 2, 1), blk(1, 3, 1)]);
    assert_eq!(pk.outstanding(A), 6);
    // A large depth takes everything there is, never more.
    let rest = req(&mut pk, A, 1000);
    assert_eq!(rest.len(), 40 - 8);
    assert_eq!(pk.outstanding(A), 38);
    assert!(
        req(&mut pk, A, usize::MAX).is_empty(),
        "no end-game with one peer"
    );
    assert_eq!(pk.outstanding(NOBODY), 0);
}

#[test]
fn outstanding_counts_follow_arrivals_and_writes() {
    let mut pk = Picker::new(4, 4, 1);
    pk.add_peer(A, &all(1));
    let got = req(&mut pk, A, 4);
    assert_eq!(pk.outstanding(A), 4);
    // Between header and write the block still counts.
    assert_eq!(pk.block_arrived(A, got[0]), Verdict::Write);
    assert_eq!(pk.outstanding(A), 4);
    assert!(req(&mut pk, A, 4).is_empty());
    pk.block_written(A, got[0]);
    check(&pk);
    assert_eq!(pk.outstanding(A), 3);
}

// ---------------------------------------------------------------------------------------------
// End-game
// ---------------------------------------------------------------------------------------------

/// Two pieces of four blocks; A holds both and has all of piece 0 requested; D holds only
/// piece 0.
fn endgame_setup() -> Picker {
    let mut pk = Picker::new(8, 4, 1);
    pk.add_peer(A, &all(2));
    assert_eq!(pieces_of(&req(&mut pk, A, 4)), vec![0]);
    pk.add_peer(D, &only(2, &[0]));
    pk
}

#[test]
fn end_game_waits_until_nothing_is_missing_and_all_requested() {
    let mut pk = endgame_setup();
    // Piece 1 is Missing: no duplicates.
    assert!(req(&mut pk, D, 4).is_empty());
    // Piece 1 started but with open blocks: still none.
    assert_eq!(req(&mut pk, A, 6), vec![blk(1, 0, 1), blk(1, 1, 1)]);
    assert!(req(&mut pk, D, 4).is_empty());
    assert_eq!(req(&mut pk, A, 8), vec![blk(1, 2, 1), blk(1, 3, 1)]);
    // Everything requested: D takes one second copy per top-up, the last block of A's queue
    // that it holds (D does not hold piece 1), while it has fewer than two outstanding.
    assert_eq!(req(&mut pk, D, 4), vec![blk(0, 3, 1)]);
    assert_eq!(req(&mut pk, D, 4), vec![blk(0, 2, 1)]);
    assert!(req(&mut pk, D, 4).is_empty(), "two outstanding: no more");
    for b in [blk(0, 2, 1), blk(0, 3, 1)] {
        assert_eq!(requesters(&pk, b), vec![A, D]);
    }
    assert_eq!(pk.second_requests().endgame, 2);
    // A peer never duplicates its own request.
    assert!(req(&mut pk, A, 100).is_empty());
}

#[test]
fn end_game_never_asks_a_third_peer() {
    let mut pk = Picker::new(2, 2, 1); // 1 piece of 2 blocks
    pk.add_peer(A, &all(1));
    pk.add_peer(D, &all(1));
    pk.add_peer(E, &all(1));
    assert_eq!(req(&mut pk, A, 2).len(), 2);
    assert_eq!(req(&mut pk, D, 4), vec![blk(0, 1, 1)]);
    assert_eq!(req(&mut pk, D, 4), vec![blk(0, 0, 1)]);
    // Both blocks are at two peers: E gets nothing, however idle.
    assert!(req(&mut pk, E, 100).is_empty());
    assert_eq!(pk.second_requests().endgame, 2);
}

#[test]
fn end_game_not_entered_while_a_missing_piece_is_held_by_nobody() {
    let mut pk = Picker::new(8, 4, 1);
    pk.add_peer(A, &only(2, &[0]));
    pk.add_peer(B, &only(2, &[0]));
    assert_eq!(req(&mut pk, A, 4).len(), 4);
    assert!(req(&mut pk, B, 4).is_empty());
    assert!(pk.stuck());
}

#[test]
fn end_game_winner_cancels_loser_and_late_copy_is_discarded() {
    let mut pk = endgame_setup();
    req(&mut pk, A, 8);
    let dup = req(&mut pk, D, 4);
    let b3 = blk(0, 3, 1);
    assert_eq!(dup, vec![b3]);
    // D's copy arrives first and wins.
    let w = deliver(&mut pk, D, b3);
    assert_eq!(w.cancels, vec![(A, b3)]);
    assert_eq!(w.piece_complete, None);
    assert_eq!(pk.outstanding(A), 7);
    assert_eq!(pk.outstanding(D), 0);
    assert_eq!(block_state(&pk, b3), Some(BlockState::Received(D)));
    // A's late copy is discarded and changes nothing.
    assert_eq!(pk.block_arrived(A, b3), Verdict::Discard);
    assert_eq!(pk.block_written(A, b3), Written::default());
    check(&pk);
    assert_eq!(pk.outstanding(A), 7);
    assert_eq!(block_state(&pk, b3), Some(BlockState::Received(D)));
}

#[test]
fn end_game_loser_arriving_during_the_write_is_discarded() {
    let mut pk = endgame_setup();
    req(&mut pk, A, 8);
    let b3 = blk(0, 3, 1);
    assert_eq!(req(&mut pk, D, 4), vec![b3]);
    assert_eq!(pk.block_arrived(A, b3), Verdict::Write);
    check(&pk);
    assert_eq!(pk.block_arrived(D, b3), Verdict::Discard);
    check(&pk);
    // D's request is consumed; A's write proceeds with nobody to cancel.
    assert_eq!(pk.outstanding(D), 0);
    assert_eq!(requesters(&pk, b3), vec![A]);
    let w = pk.block_written(A, b3);
    check(&pk);
    assert!(w.cancels.is_empty());
    // D's write of the block is refused.
    assert_eq!(pk.block_written(D, b3), Written::default());
    assert_eq!(block_state(&pk, b3), Some(BlockState::Received(A)));
}

#[test]
fn end_game_skips_a_block_being_written() {
    let mut pk = endgame_setup();
    req(&mut pk, A, 8);
    let b3 = blk(0, 3, 1);
    assert_eq!(pk.block_arrived(A, b3), Verdict::Write);
    assert_eq!(req(&mut pk, D, 4), vec![blk(0, 2, 1)]);
    assert_eq!(req(&mut pk, D, 4), vec![blk(0, 1, 1)]);
    assert_eq!(requesters(&pk, b3), vec![A]);
}

#[test]
fn end_game_completes_piece_with_mixed_winners() {
    let mut pk = endgame_setup();
    req(&mut pk, A, 8);
    assert_eq!(req(&mut pk, D, 4), vec![blk(0, 3, 1)]);
    assert_eq!(req(&mut pk, D, 4), vec![blk(0, 2, 1)]);
    let mut cancels = Vec::new();
    let mut done = None;
    for (o, winner) in [(0, A), (1, A), (2, D), (3, A)] {
        let w = deliver(&mut pk, winner, blk(0, o, 1));
        cancels.extend(w.cancels);
        done = done.or(w.piece_complete);
    }
    assert_eq!(done, Some(0));
    assert_eq!(cancels, vec![(A, blk(0, 2, 1)), (D, blk(0, 3, 1))]);
    assert_eq!(pk.outstanding(D), 0);
    assert_eq!(pk.outstanding(A), 4);
    assert_eq!(state(&pk, 0), St::Verifying);
    // Late copies of a verifying piece are discarded.
    assert_eq!(pk.block_arrived(D, blk(0, 3, 1)), Verdict::Discard);
    assert!(verified(&mut pk, 0, true).is_empty());
    assert_eq!(pk.block_arrived(D, blk(0, 3, 1)), Verdict::Discard);
}

/// The end-game on loopback, where a cancel never arrives in time: peers holding the whole
/// file, each delivering `speeds[i]` blocks per round from the front of its queue (second
/// copies that lost arrive all the same and are discarded), topping up to `depth` after each
/// block (and the loser after a cancel, as the engine does). Returns the rounds taken, the
/// second copies requested (each is one block sent twice: no cancel arrives in time, and
/// copies still queued when the download ends are sent to a closed link) and the most blocks
/// requested twice at once.
fn race(speeds: &[usize], depth: usize) -> (usize, usize, usize) {
    use std::collections::VecDeque;
    let mut pk = Picker::new(64, 16, 1); // 4 pieces of 16 blocks
    let peers: Vec<PeerId> = (1..=speeds.len() as u64).map(PeerId).collect();
    let mut queues: BTreeMap<PeerId, VecDeque<Block>> = BTreeMap::new();
    for &p in &peers {
        pk.add_peer(p, &all(4));
    }
    for &p in &peers {
        queues.insert(p, req(&mut pk, p, depth).into());
    }
    let doubled = |pk: &Picker| {
        pk.downloading
            .iter()
            .filter_map(|&piece| pk.partial(piece))
            .flat_map(|pt| pt.blocks.iter())
            .filter(|s| matches!(s, BlockState::Requested { by, .. } if by.count() == 2))
            .count()
    };
    let (mut most_doubled, mut rounds) = (doubled(&pk), 0);
    while !pk.is_complete() {
        rounds += 1;
        assert!(rounds < 1000, "the download does not end");
        for (i, &p) in peers.iter().enumerate() {
            for _ in 0..speeds[i] {
                let Some(b) = queues.get_mut(&p).and_then(|q| q.pop_front()) else {
                    break;
                };
                if pk.block_arrived(p, b) == Verdict::Write {
                    let w = pk.block_written(p, b);
                    if let Some(piece) = w.piece_complete {
                        verified(&mut pk, piece, true);
                    }
                    for (loser, _) in w.cancels {
                        let more = req(&mut pk, loser, depth);
                        queues.entry(loser).or_default().extend(more);
                    }
                }
                check(&pk);
                let more = req(&mut pk, p, depth);
                queues.entry(p).or_default().extend(more);
                most_doubled = most_doubled.max(doubled(&pk));
            }
        }
    }
    (rounds, pk.second_requests().endgame as usize, most_doubled)
}

/// Equal peers drain their pipelines together: second copies only at the very end, a few
/// per peer. (The policy before asked every peer, at each block it delivered, for a copy of
/// the block at the head of another's queue, which always lost.)
#[test]
fn end_game_copies_are_bounded_by_peers_not_pipeline_depth() {
    let (rounds, seconds, most_doubled) = race(&[1, 1, 1, 1], 16);
    eprintln!("equal: {rounds} rounds, {seconds} second copies, {most_doubled} at two peers");
    let bound = 4 * ENDGAME_MAX_OUTSTANDING;
    assert!(seconds <= bound, "{seconds} second copies");
    assert!(most_doubled <= bound, "{most_doubled} blocks at two peers");
    assert_eq!(rounds, 16, "as fast as without copies");
}

/// A fast peer that ran dry takes over the tails of the slow peers' queues, one block at a
/// time: the download ends well before the slow peers would have delivered their own blocks
/// (16 rounds), with few blocks requested twice at once.
#[test]
fn end_game_lets_a_fast_peer_finish_the_slow_queues() {
    let (rounds, seconds, most_doubled) = race(&[4, 1, 1, 1], 16);
    eprintln!("fast: {rounds} rounds, {seconds} second copies, {most_doubled} at two peers");
    assert!(rounds < 12, "{rounds} rounds");
    assert!(
        most_doubled <= 4 * ENDGAME_MAX_OUTSTANDING,
        "{most_doubled} at two peers"
    );
    // Every copy the fast peer won is one a slow peer still sends (no cancel in time).
    assert!(seconds <= 24, "{seconds} second copies");
}

/// Relief: a fast peer takes over the back of a slower peer's queue, up to its own depth.
#[test]
fn relief_takes_the_back_of_the_slower_queue() {
    let mut pk = Picker::new(16, 8, 1); // 2 pieces of 8 blocks
    pk.add_peer(A, &all(2)); // slow
    pk.add_peer(B, &all(2)); // fast
    assert_eq!(pieces_of(&req(&mut pk, A, 8)), vec![0]);
    let b = req(&mut pk, B, 8);
    assert_eq!(pieces_of(&b), vec![1]);
    deliver_all(&mut pk, B, &b);
    let slower = BTreeSet::from([A]);
    assert!(
        pk.relieve(A, 8, &stalled(&slower)).is_empty(),
        "not from itself"
    );
    assert!(pk.relieve(B, 8, &BTreeMap::new()).is_empty());
    assert_eq!(
        pk.relieve(B, 3, &stalled(&slower)),
        vec![blk(0, 7, 1), blk(0, 6, 1), blk(0, 5, 1)]
    );
    check(&pk);
    assert!(
        pk.relieve(B, 3, &stalled(&slower)).is_empty(),
        "at its depth"
    );
    assert_eq!(pk.relieve(B, 4, &stalled(&slower)), vec![blk(0, 4, 1)]);
    assert_eq!(
        pk.second_requests(),
        SecondRequests {
            endgame: 0,
            relief: 4
        }
    );
    // Nearly idle or not, B is past the end-game's allowance now.
    assert!(req(&mut pk, B, 8).is_empty());
    // A third peer gets nothing of what is already at two.
    pk.add_peer(C, &all(2));
    assert_eq!(
        pk.relieve(C, 8, &stalled(&slower)),
        (0..4).rev().map(|o| blk(0, o, 1)).collect::<Vec<_>>()
    );
    check(&pk);
    // B's copy wins: A is told to cancel.
    assert_eq!(
        deliver(&mut pk, B, blk(0, 7, 1)).cancels,
        vec![(A, blk(0, 7, 1))]
    );
}

/// Paced relief: a fast peer copies only the blocks of a slower queue that it could deliver
/// first. A peer at 0.45 of B's rate with 8 blocks queued delivers its 4th block after
/// 4 / 0.45 = 8.9 of B's block times; B, with 4 blocks of its own outstanding, would deliver
/// copies after 5, 6, 7, 8, 9 block times: the last 4 blocks of A's queue are worth copying,
/// the head is not. The unpaced rule takes all 8 (up to B's depth).
#[test]
fn paced_relief_leaves_a_moderately_slower_queue_its_head() {
    let setup = || {
        let mut pk = Picker::new(24, 8, 1); // 3 pieces of 8 blocks
        pk.add_peer(A, &all(3)); // slower
        pk.add_peer(B, &all(3)); // faster
        assert_eq!(pieces_of(&req(&mut pk, A, 8)), vec![0]);
        let b = req(&mut pk, B, 8);
        assert_eq!(pieces_of(&b), vec![1]);
        deliver_all(&mut pk, B, &b[..4]);
        pk
    };
    let mut pk = setup();
    let paced = pk.relieve(B, 12, &BTreeMap::from([(A, 0.45)]));
    assert_eq!(
        paced,
        (4..8).rev().map(|o| blk(0, o, 1)).collect::<Vec<_>>()
    );
    assert_eq!(pk.second_requests().relief, 4);
    check(&pk);
    // Nothing more while B's queue is as long: the next copy would arrive after A's block.
    assert!(pk.relieve(B, 12, &BTreeMap::from([(A, 0.45)])).is_empty());

    // The unpaced rule (a stalled peer: speed 0) takes the whole queue.
    let mut pk = setup();
    assert_eq!(pk.relieve(B, 12, &stalled(&BTreeSet::from([A]))).len(), 8);
    let mut pk = setup();
    assert_eq!(pk.relieve(B, 12, &BTreeMap::from([(A, 0.0)])).len(), 8);
    // A peer as fast keeps all but what waits behind its longer queue (its 7th and 8th
    // blocks against B's 5th and 6th); a much slower one loses more.
    let mut pk = setup();
    assert_eq!(
        pk.relieve(B, 12, &BTreeMap::from([(A, 1.0)])),
        vec![blk(0, 7, 1), blk(0, 6, 1)]
    );
    let mut pk = setup();
    assert_eq!(pk.relieve(B, 12, &BTreeMap::from([(A, 0.2)])).len(), 6);
    // Nonsense speeds are harmless: negative or NaN counts as stalled, infinity as never
    // overtaken.
    for speed in [-1.0, f64::NAN] {
        let mut pk = setup();
        assert_eq!(pk.relieve(B, 12, &BTreeMap::from([(A, speed)])).len(), 8);
        check(&pk);
    }
    let mut pk = setup();
    assert!(pk
        .relieve(B, 12, &BTreeMap::from([(A, f64::INFINITY)]))
        .is_empty());
}

// ---------------------------------------------------------------------------------------------
// block_arrived / block_written rules
// ---------------------------------------------------------------------------------------------

#[test]
fn block_arrived_discards_what_was_not_asked() {
    let mut pk = Picker::new(16, 8, 4); // 2 pieces of 2 blocks
    pk.add_peer(A, &all(2));
    pk.add_peer(B, &all(2));
    let got = req(&mut pk, A, 2);
    assert_eq!(got, vec![blk(0, 0, 4), blk(0, 4, 4)]);
    // Not requested (piece 1 is Missing), or requested from somebody else.
    assert_eq!(pk.block_arrived(A, blk(1, 0, 4)), Verdict::Discard);
    assert_eq!(pk.block_arrived(B, blk(0, 0, 4)), Verdict::Discard);
    assert_eq!(pk.block_arrived(NOBODY, blk(0, 0, 4)), Verdict::Discard);
    // Wrong offset, wrong length, past the piece, out-of-range piece.
    assert_eq!(pk.block_arrived(A, blk(0, 1, 4)), Verdict::Discard);
    assert_eq!(pk.block_arrived(A, blk(0, 2, 2)), Verdict::Discard);
    assert_eq!(pk.block_arrived(A, blk(0, 0, 3)), Verdict::Discard);
    assert_eq!(pk.block_arrived(A, blk(0, 0, 8)), Verdict::Discard);
    assert_eq!(pk.block_arrived(A, blk(0, 0, 0)), Verdict::Discard);
    assert_eq!(pk.block_arrived(A, blk(0, 8, 4)), Verdict::Discard);
    assert_eq!(
        pk.block_arrived(A, blk(0, u32::MAX, u32::MAX)),
        Verdict::Discard
    );
    assert_eq!(pk.block_arrived(A, blk(2, 0, 4)), Verdict::Discard);
    assert_eq!(pk.block_arrived(A, blk(u32::MAX, 0, 4)), Verdict::Discard);
    check(&pk);
    // None of that consumed A's requests.
    assert_eq!(pk.outstanding(A), 2);
    assert_eq!(requesters(&pk, got[0]), vec![A]);
    // The real one is written; a repeated header is discarded, before and after the write.
    assert_eq!(pk.block_arrived(A, got[0]), Verdict::Write);
    assert_eq!(pk.block_arrived(A, got[0]), Verdict::Discard);
    assert_eq!(pk.outstanding(A), 2);
    let w = pk.block_written(A, got[0]);
    check(&pk);
    assert_eq!(w, Written::default());
    assert_eq!(pk.block_arrived(A, got[0]), Verdict::Discard);
    assert_eq!(pk.block_written(A, got[0]), Written::default());
    // Verifying and Have pieces take no writes.
    assert_eq!(deliver(&mut pk, A, got[1]).piece_complete, Some(0));
    assert_eq!(pk.block_arrived(A, got[1]), Verdict::Discard);
    assert_eq!(pk.block_written(A, got[1]), Written::default());
    assert!(verified(&mut pk, 0, true).is_empty());
    assert_eq!(pk.block_arrived(A, got[1]), Verdict::Discard);
    check(&pk);
    assert_eq!(pk.n_have(), 1);
}

#[test]
fn block_written_without_write_verdict_is_ignored() {
    let mut pk = Picker::new(8, 4, 1);
    pk.add_peer(A, &all(2));
    let got = req(&mut pk, A, 4);
    // Requested but its header never arrived.
    assert_eq!(pk.block_written(A, got[0]), Written::default());
    assert_eq!(
        block_state(&pk, got[0]),
        Some(BlockState::Requested {
            by: Requesters::one(A),
            writer: None
        })
    );
    // Written by somebody else than the writer.
    assert_eq!(pk.block_arrived(A, got[1]), Verdict::Write);
    assert_eq!(pk.block_written(B, got[1]), Written::default());
    assert_eq!(pk.block_written(NOBODY, got[1]), Written::default());
    check(&pk);
    assert_eq!(pk.outstanding(A), 4);
    assert_eq!(pk.block_written(A, got[1]), Written::default());
    assert_eq!(block_state(&pk, got[1]), Some(BlockState::Received(A)));
    assert_eq!(pk.outstanding(A), 3);
}

// ---------------------------------------------------------------------------------------------
// block_rejected
// ---------------------------------------------------------------------------------------------

#[test]
fn rejected_block_returns_and_peer_stops_holding_piece() {
    let mut pk = Picker::new(8, 4, 1);
    pk.add_peer(A, &all(2));
    pk.add_peer(B, &all(2));
    let got = req(&mut pk, A, 2);
    assert_eq!(got, vec![blk(0, 0, 1), blk(0, 1, 1)]);
    pk.block_rejected(A, got[1]);
    check(&pk);
    assert_eq!(pk.outstanding(A), 1);
    assert_eq!(block_state(&pk, got[1]), Some(BlockState::Open));
    assert!(!pk.peers[&A].has.get(0));
    assert_eq!(pk.avail, vec![1, 2]);
    // A no longer owns piece 0 and gets nothing more of it.
    assert_eq!(owner(&pk, 0), None);
    assert_eq!(pieces_of(&req(&mut pk, A, 10)), vec![1]);
    // B adopts the orphan and gets the rejected block.
    let got_b = req(&mut pk, B, 3);
    assert_eq!(got_b, vec![blk(0, 1, 1), blk(0, 2, 1), blk(0, 3, 1)]);
    assert_eq!(owner(&pk, 0), Some(B));
    // A's other request for piece 0 is still valid.
    assert_eq!(deliver(&mut pk, A, got[0]).piece_complete, None);
    // A later `have` restores it.
    pk.peer_has(A, 0);
    check(&pk);
    assert_eq!(pk.avail, vec![2, 2]);
}

#[test]
fn rejection_of_unrequested_block_is_ignored() {
    let mut pk = Picker::new(8, 4, 1);
    pk.add_peer(A, &all(2));
    pk.add_peer(B, &all(2));
    let got = req(&mut pk, A, 2);
    pk.block_rejected(B, got[0]);
    pk.block_rejected(A, blk(1, 0, 1));
    pk.block_rejected(A, blk(0, 3, 1));
    pk.block_rejected(A, blk(0, 0, 2));
    pk.block_rejected(A, blk(7, 0, 1));
    pk.block_rejected(NOBODY, got[0]);
    check(&pk);
    assert_eq!(pk.avail, vec![2, 2]);
    assert_eq!(pk.outstanding(A), 2);
    // After the write, a rejection (e.g. crossing a cancel) changes nothing.
    deliver(&mut pk, A, got[0]);
    pk.block_rejected(A, got[0]);
    check(&pk);
    assert_eq!(pk.avail, vec![2, 2]);
    assert_eq!(block_state(&pk, got[0]), Some(BlockState::Received(A)));
}

#[test]
fn rejection_can_make_download_stuck() {
    let mut pk = Picker::new(2, 1, 1);
    pk.add_peer(A, &all(2));
    assert!(!pk.stuck());
    let got = req(&mut pk, A, 1);
    pk.block_rejected(A, got[0]);
    check(&pk);
    assert!(pk.stuck());
    assert_eq!(state(&pk, got[0].piece), St::Missing);
    assert!(req(&mut pk, A, 1).iter().all(|b| b.piece != got[0].piece));
}

#[test]
fn rejection_in_end_game_keeps_the_other_request() {
    let mut pk = endgame_setup();
    req(&mut pk, A, 8);
    let b3 = blk(0, 3, 1);
    assert_eq!(req(&mut pk, D, 4), vec![b3]);
    pk.block_rejected(D, b3);
    check(&pk);
    assert_eq!(requesters(&pk, b3), vec![A]);
    assert_eq!(pk.outstanding(D), 0);
    assert!(!pk.peers[&D].has.get(0));
}

// ---------------------------------------------------------------------------------------------
// Peer loss
// ---------------------------------------------------------------------------------------------

#[test]
fn peer_loss_returns_work() {
    let mut pk = Picker::new(16, 4, 1);
    pk.add_peer(A, &all(4));
    pk.add_peer(B, &all(4));
    let got = req(&mut pk, A, 6);
    assert_eq!(pieces_of(&got), vec![0, 1]);
    deliver(&mut pk, A, got[0]);
    // The writer leaves mid-write: its write no longer counts.
    assert_eq!(pk.block_arrived(A, got[1]), Verdict::Write);
    pk.remove_peer(A);
    check(&pk);
    assert_eq!(pk.outstanding(A), 0);
    assert_eq!(pk.block_written(A, got[1]), Written::default());
    assert_eq!(block_state(&pk, got[1]), Some(BlockState::Open));
    // Piece 0 keeps A's received block; piece 1 (nothing received) is Missing again.
    assert_eq!(block_state(&pk, got[0]), Some(BlockState::Received(A)));
    assert_eq!(state(&pk, 1), St::Missing);
    let got_b = req(&mut pk, B, 3);
    assert_eq!(got_b, vec![blk(0, 1, 1), blk(0, 2, 1), blk(0, 3, 1)]);
    // Removing again, or an unknown peer, is a no-op.
    pk.remove_peer(A);
    pk.remove_peer(NOBODY);
    check(&pk);
    assert_eq!(pk.avail, vec![1, 1, 1, 1]);
    // A reconnects: its pieces count again, its old work is not resurrected.
    pk.add_peer(A, &all(4));
    check(&pk);
    assert_eq!(pk.avail, vec![2, 2, 2, 2]);
    assert_eq!(pk.outstanding(A), 0);
}

#[test]
fn end_game_partner_loss_leaves_single_request() {
    let mut pk = endgame_setup();
    req(&mut pk, A, 8);
    req(&mut pk, D, 4);
    req(&mut pk, D, 4);
    pk.remove_peer(A);
    check(&pk);
    // D's second copies stay with D; A's other blocks are open again.
    for o in 0..2 {
        assert_eq!(block_state(&pk, blk(0, o, 1)), Some(BlockState::Open));
    }
    for o in 2..4 {
        assert_eq!(requesters(&pk, blk(0, o, 1)), vec![D]);
    }
    // Piece 1 (only A held it) is back to Missing and nobody holds it.
    assert_eq!(state(&pk, 1), St::Missing);
    assert!(pk.stuck());
    // D adopts the orphan and finishes it.
    assert_eq!(req(&mut pk, D, 4), vec![blk(0, 0, 1), blk(0, 1, 1)]);
    assert_eq!(
        deliver_all(
            &mut pk,
            D,
            &(0..4).map(|o| blk(0, o, 1)).collect::<Vec<_>>()
        ),
        vec![0]
    );
}

#[test]
fn add_peer_merges_and_ignores_extra_entries() {
    let mut pk = Picker::new(3, 1, 1);
    pk.add_peer(A, &[true]);
    check(&pk);
    assert_eq!(pk.avail, vec![1, 0, 0]);
    pk.add_peer(A, &[false, false, true, true, true, true]);
    check(&pk);
    assert_eq!(pk.avail, vec![1, 0, 1]);
    pk.add_peer(A, &[]);
    pk.peer_has(A, 1);
    pk.peer_has(A, 1);
    pk.peer_has(A, 3);
    pk.peer_has(A, u32::MAX);
    pk.peer_has(NOBODY, 0);
    check(&pk);
    assert_eq!(pk.avail, vec![1, 1, 1]);
    assert!(!pk.stuck());
}

// ---------------------------------------------------------------------------------------------
// Verification and blame
// ---------------------------------------------------------------------------------------------

#[test]
fn piece_verified_ok_and_repeated() {
    let mut pk = Picker::new(4, 2, 1);
    pk.add_peer(A, &all(2));
    // Not verifying yet: ignored.
    assert!(verified(&mut pk, 0, true).is_empty());
    assert!(verified(&mut pk, 0, false).is_empty());
    assert!(verified(&mut pk, 9, true).is_empty());
    assert_eq!(pk.n_have(), 0);
    let got = req(&mut pk, A, 4);
    assert!(
        verified(&mut pk, 0, false).is_empty(),
        "downloading: ignored"
    );
    assert!(!pk.is_banned(A));
    assert_eq!(deliver_all(&mut pk, A, &got), vec![0, 1]);
    assert!(verified(&mut pk, 1, true).is_empty());
    assert!(verified(&mut pk, 1, true).is_empty());
    assert!(verified(&mut pk, 1, false).is_empty(), "have: ignored");
    assert!(pk.have(1));
    assert!(!pk.have(0));
    assert_eq!(pk.n_have(), 1);
    assert!(!pk.is_complete());
    assert!(verified(&mut pk, 0, true).is_empty());
    assert!(pk.is_complete());
    assert!(!pk.stuck());
    // Nothing more to ask.
    assert!(req(&mut pk, A, 10).is_empty());
}

#[test]
fn failed_piece_from_one_peer_bans_it() {
    let mut pk = Picker::new(6, 2, 1); // 3 pieces of 2 blocks
    pk.add_peer(A, &all(3));
    pk.add_peer(B, &only(3, &[0, 1]));
    // Piece 2 is the rarest (only A).
    let got = req(&mut pk, A, 2);
    assert_eq!(pieces_of(&got), vec![2]);
    assert_eq!(deliver_all(&mut pk, A, &got), vec![2]);
    // A also starts piece 0 and delivers half of it.
    let more = req(&mut pk, A, 2);
    assert_eq!(more, vec![blk(0, 0, 1), blk(0, 1, 1)]);
    deliver(&mut pk, A, more[0]);
    assert_eq!(pk.outstanding(A), 1);

    assert_eq!(verified(&mut pk, 2, false), vec![A]);
    assert!(pk.is_banned(A));
    assert!(!pk.is_banned(B));
    assert_eq!(state(&pk, 2), St::Missing);
    // Its requests and its delivered blocks are gone; piece 0 is Missing again.
    assert_eq!(pk.outstanding(A), 0);
    assert_eq!(state(&pk, 0), St::Missing);
    // Its availability no longer counts: piece 2 is held by nobody trusted.
    assert_eq!(pk.avail, vec![1, 1, 0]);
    assert!(pk.stuck());
    // No more requests to it, even after reconnecting.
    assert!(req(&mut pk, A, 10).is_empty());
    pk.remove_peer(A);
    pk.add_peer(A, &all(3));
    pk.peer_has(A, 2);
    check(&pk);
    assert!(pk.is_banned(A));
    assert!(req(&mut pk, A, 10).is_empty());
    assert_eq!(pk.avail, vec![1, 1, 0]);
    assert!(pk.stuck());
    // Its late blocks are discarded.
    assert_eq!(pk.block_arrived(A, more[1]), Verdict::Discard);
    // B takes over; a peer that holds piece 2 unsticks the download.
    let got_b = req(&mut pk, B, 10);
    assert_eq!(pieces_of(&got_b), vec![0, 1]);
    pk.add_peer(C, &only(3, &[2]));
    assert!(!pk.stuck());
    let got_c = req(&mut pk, C, 10);
    assert_eq!(deliver_all(&mut pk, C, &got_c), vec![2]);
    assert_eq!(deliver_all(&mut pk, B, &got_b), vec![0, 1]);
    for p in 0..3 {
        assert!(verified(&mut pk, p, true).is_empty());
    }
    assert!(pk.is_complete());
}

#[test]
fn ban_drops_banned_blocks_in_pieces_owned_by_others() {
    let mut pk = Picker::new(6, 3, 1); // 2 pieces of 3 blocks
    pk.add_peer(A, &all(2));
    pk.add_peer(C, &only(2, &[0, 1]));
    let a = req(&mut pk, A, 3); // piece 0
    assert_eq!(pieces_of(&a), vec![0]);
    let c = req(&mut pk, C, 3); // piece 1
    assert_eq!(pieces_of(&c), vec![1]);
    deliver(&mut pk, C, c[0]);
    deliver(&mut pk, C, c[1]);
    // Nothing open left and C nearly idle: an end-game copy of the last of A's blocks.
    let c2 = req(&mut pk, C, 3);
    assert_eq!(c2, vec![blk(0, 2, 1)]);
    // C wins block 2 of piece 0, A writes block 0; C finishes its piece 1.
    assert_eq!(
        deliver(&mut pk, C, blk(0, 2, 1)).cancels,
        vec![(A, blk(0, 2, 1))]
    );
    deliver(&mut pk, A, blk(0, 0, 1));
    assert_eq!(deliver_all(&mut pk, C, &c[2..]), vec![1]);
    // Piece 1 fails: C alone delivered it.
    assert_eq!(verified(&mut pk, 1, false), vec![C]);
    // C's block in A's piece is dropped and will be requested again, from A.
    assert_eq!(block_state(&pk, blk(0, 2, 1)), Some(BlockState::Open));
    assert_eq!(
        block_state(&pk, blk(0, 0, 1)),
        Some(BlockState::Received(A))
    );
    assert_eq!(owner(&pk, 0), Some(A));
    let again = req(&mut pk, A, 3);
    assert_eq!(again[0], blk(0, 2, 1));
}

#[test]
fn mixed_failure_marks_solo_and_second_failure_bans_culprit() {
    let mut pk = Picker::new(2, 2, 1); // 1 piece of 2 blocks
    pk.add_peer(A, &all(1)); // honest
    pk.add_peer(C, &all(1)); // corrupt
    assert_eq!(req(&mut pk, A, 1), vec![blk(0, 0, 1)]);
    assert_eq!(req(&mut pk, C, 1), vec![blk(0, 1, 1)], "C helps");
    deliver(&mut pk, A, blk(0, 0, 1));
    assert_eq!(deliver(&mut pk, C, blk(0, 1, 1)).piece_complete, Some(0));
    // Mixed suppliers: nobody banned, the piece becomes solo.
    assert!(verified(&mut pk, 0, false).is_empty());
    assert!(!pk.is_banned(A) && !pk.is_banned(C));
    assert!(pk.solo.contains(&0));
    assert_eq!(state(&pk, 0), St::Missing);
    assert!(!pk.stuck());
    // The next attempt comes from C alone: no help, no end-game duplicates.
    let c = req(&mut pk, C, 1);
    assert_eq!(c, vec![blk(0, 0, 1)]);
    assert!(req(&mut pk, A, 5).is_empty(), "no help on a solo piece");
    let c = req(&mut pk, C, 2);
    assert_eq!(c, vec![blk(0, 1, 1)]);
    assert!(req(&mut pk, A, 5).is_empty(), "no end-game on a solo piece");
    deliver(&mut pk, C, blk(0, 0, 1));
    assert_eq!(deliver(&mut pk, C, blk(0, 1, 1)).piece_complete, Some(0));
    // Second failure, single supplier: the culprit is banned, the honest peer never.
    assert_eq!(verified(&mut pk, 0, false), vec![C]);
    assert!(!pk.is_banned(A));
    let a = req(&mut pk, A, 5);
    assert_eq!(deliver_all(&mut pk, A, &a), vec![0]);
    assert!(verified(&mut pk, 0, true).is_empty());
    assert!(pk.is_complete());
    assert!(!pk.is_banned(A));
}

#[test]
fn solo_piece_from_honest_peer_passes() {
    let mut pk = Picker::new(2, 2, 1);
    pk.add_peer(A, &all(1));
    pk.add_peer(C, &all(1));
    req(&mut pk, C, 1);
    req(&mut pk, A, 1);
    deliver(&mut pk, C, blk(0, 0, 1));
    deliver(&mut pk, A, blk(0, 1, 1));
    assert!(verified(&mut pk, 0, false).is_empty());
    let a = req(&mut pk, A, 2);
    assert!(req(&mut pk, C, 2).is_empty());
    assert_eq!(deliver_all(&mut pk, A, &a), vec![0]);
    assert!(verified(&mut pk, 0, true).is_empty());
    assert!(pk.is_complete());
    assert!(!pk.is_banned(A) && !pk.is_banned(C));
}

/// A solo piece whose owner leaves (or rejects) starts over: its blocks must all come from
/// one peer.
#[test]
fn solo_piece_restarts_when_owner_leaves_or_rejects() {
    let mut pk = Picker::new(3, 3, 1); // 1 piece of 3 blocks
    pk.add_peer(A, &all(1));
    pk.add_peer(C, &all(1));
    req(&mut pk, A, 2);
    req(&mut pk, C, 1);
    for (peer, o) in [(A, 0), (A, 1), (C, 2)] {
        deliver(&mut pk, peer, blk(0, o, 1));
    }
    assert!(verified(&mut pk, 0, false).is_empty());
    assert!(pk.solo.contains(&0));

    // C owns the new attempt, delivers a block and leaves: the block is dropped.
    let c = req(&mut pk, C, 3);
    assert_eq!(c.len(), 3);
    deliver(&mut pk, C, c[0]);
    pk.remove_peer(C);
    check(&pk);
    assert_eq!(state(&pk, 0), St::Missing);

    // A owns the next attempt, delivers a block and rejects another: starts over too.
    let a = req(&mut pk, A, 2);
    assert_eq!(a.len(), 2);
    deliver(&mut pk, A, a[0]);
    pk.block_rejected(A, a[1]);
    check(&pk);
    assert_eq!(state(&pk, 0), St::Missing);
    assert_eq!(pk.outstanding(A), 0);
    assert!(pk.stuck(), "nobody trusted and connected holds it");

    // Some B finishes it alone.
    pk.add_peer(B, &all(1));
    let b = req(&mut pk, B, 5);
    assert_eq!(b.len(), 3);
    assert_eq!(deliver_all(&mut pk, B, &b), vec![0]);
    assert!(verified(&mut pk, 0, true).is_empty());
    assert!(pk.is_complete());
}

/// A rejection by the owner of a solo piece restarts the piece, which also forgets the
/// owner's other requests for it (no cancels are returned); their late copies are discarded.
#[test]
fn solo_owner_rejection_forgets_its_other_requests() {
    let mut pk = Picker::new(3, 3, 1); // 1 piece of 3 blocks
    pk.add_peer(A, &all(1));
    pk.add_peer(C, &all(1));
    req(&mut pk, A, 2);
    req(&mut pk, C, 1);
    for (peer, o) in [(A, 0), (A, 1), (C, 2)] {
        deliver(&mut pk, peer, blk(0, o, 1));
    }
    assert!(verified(&mut pk, 0, false).is_empty());
    let c = req(&mut pk, C, 3);
    assert_eq!(c.len(), 3);
    pk.block_rejected(C, c[0]);
    check(&pk);
    assert_eq!(state(&pk, 0), St::Missing);
    assert_eq!(pk.outstanding(C), 0);
    assert_eq!(pk.block_arrived(C, c[1]), Verdict::Discard);
    // A starts over; C's late copy of a block A now has requested is still discarded.
    let a = req(&mut pk, A, 3);
    assert_eq!(a, c);
    assert_eq!(pk.block_arrived(C, c[2]), Verdict::Discard);
    assert_eq!(deliver_all(&mut pk, A, &a), vec![0]);
    assert!(verified(&mut pk, 0, true).is_empty());
    assert!(!pk.is_banned(A) && !pk.is_banned(C));
}

#[test]
fn mixed_failure_blames_an_already_banned_supplier() {
    let mut pk = Picker::new(4, 2, 1); // 2 pieces of 2 blocks
    pk.add_peer(C, &all(2)); // corrupt
    pk.add_peer(A, &only(2, &[0])); // honest
                                    // Piece 1 is the rarest: C takes it; A takes piece 0; C helps with piece 0.
    assert_eq!(pieces_of(&req(&mut pk, C, 2)), vec![1]);
    assert_eq!(req(&mut pk, A, 1), vec![blk(0, 0, 1)]);
    assert_eq!(req(&mut pk, C, 3), vec![blk(0, 1, 1)]);
    deliver(&mut pk, A, blk(0, 0, 1));
    assert_eq!(deliver(&mut pk, C, blk(0, 1, 1)).piece_complete, Some(0));
    assert_eq!(
        deliver_all(&mut pk, C, &[blk(1, 0, 1), blk(1, 1, 1)]),
        vec![1]
    );
    assert_eq!(verified(&mut pk, 1, false), vec![C]);
    // Piece 0 fails with suppliers A and C: C is already banned, so it is blamed; the piece
    // is not solo and nobody new is banned.
    assert!(verified(&mut pk, 0, false).is_empty());
    assert!(!pk.solo.contains(&0));
    assert!(!pk.is_banned(A));
    // A may now be helped by others again; here it simply refetches.
    let a = req(&mut pk, A, 2);
    assert_eq!(deliver_all(&mut pk, A, &a), vec![0]);
    assert!(verified(&mut pk, 0, true).is_empty());
}

#[test]
fn banned_peer_ban_reported_once() {
    let mut pk = Picker::new(2, 1, 1);
    pk.add_peer(C, &all(2));
    let c = req(&mut pk, C, 2);
    assert_eq!(deliver_all(&mut pk, C, &c), vec![0, 1]);
    assert_eq!(verified(&mut pk, 0, false), vec![C]);
    // The other piece, verified after the ban, names only an already banned supplier.
    assert!(verified(&mut pk, 1, false).is_empty());
    assert!(pk.is_banned(C));
    assert!(!pk.solo.contains(&1));
    assert_eq!(pk.avail, vec![0, 0]);
    assert!(pk.stuck());
}

// ---------------------------------------------------------------------------------------------
// stuck()
// ---------------------------------------------------------------------------------------------

#[test]
fn stuck_semantics() {
    let mut pk = Picker::new(3, 1, 1);
    assert!(pk.stuck(), "no peers");
    pk.add_peer(A, &only(3, &[0, 1]));
    assert!(pk.stuck(), "piece 2 held by nobody");
    pk.peer_has(A, 2);
    check(&pk);
    assert!(!pk.stuck());
    // A piece being downloaded whose only holder leaves counts.
    let got = req(&mut pk, A, 1);
    assert_eq!(pk.block_arrived(A, got[0]), Verdict::Write);
    pk.remove_peer(A);
    check(&pk);
    assert!(pk.stuck());
    pk.add_peer(B, &all(3));
    assert!(!pk.stuck());
    // A verifying piece does not count, until it fails.
    let b = req(&mut pk, B, 1);
    assert_eq!(b, vec![blk(0, 0, 1)]);
    assert_eq!(deliver_all(&mut pk, B, &b), vec![0]);
    pk.remove_peer(B);
    check(&pk);
    assert!(pk.stuck(), "pieces 1 and 2 are held by nobody");
    pk.add_peer(E, &only(3, &[1, 2]));
    check(&pk);
    assert!(!pk.stuck(), "piece 0 is verifying");
    pk.remove_peer(E);
    assert!(pk.stuck());
    let mut pk2 = Picker::new(1, 1, 1);
    pk2.add_peer(B, &all(1));
    let b = req(&mut pk2, B, 1);
    deliver_all(&mut pk2, B, &b);
    pk2.remove_peer(B);
    check(&pk2);
    assert!(!pk2.stuck(), "only a verifying piece, nobody holds it");
    // It fails: B (the sole supplier) is banned and the piece is held by nobody.
    assert_eq!(verified(&mut pk2, 0, false), vec![B]);
    assert!(pk2.stuck());
    pk2.add_peer(B, &all(1));
    assert!(pk2.stuck(), "banned holders do not count");
    pk2.add_peer(A, &all(1));
    assert!(!pk2.stuck());
    // Have pieces never count.
    let a = req(&mut pk2, A, 1);
    deliver_all(&mut pk2, A, &a);
    assert!(verified(&mut pk2, 0, true).is_empty());
    pk2.remove_peer(A);
    assert!(!pk2.stuck());
    assert!(pk2.is_complete());
}

// ---------------------------------------------------------------------------------------------
// Robustness
// ---------------------------------------------------------------------------------------------

#[test]
fn unknown_peers_and_out_of_range_are_ignored() {
    let mut pk = Picker::new(10, 5, 2);
    assert!(pk.next_requests(NOBODY, 10).is_empty());
    assert_eq!(pk.outstanding(NOBODY), 0);
    assert!(!pk.is_banned(NOBODY));
    assert_eq!(pk.block_arrived(NOBODY, blk(0, 0, 2)), Verdict::Discard);
    assert_eq!(pk.block_written(NOBODY, blk(0, 0, 2)), Written::default());
    pk.block_rejected(NOBODY, blk(0, 0, 2));
    pk.remove_peer(NOBODY);
    pk.peer_has(NOBODY, 0);
    assert!(pk.piece_verified(u32::MAX, false).is_empty());
    assert!(!pk.have(u32::MAX));
    assert_eq!(
        pk.file_offset(&blk(u32::MAX, u32::MAX, 0)),
        u64::from(u32::MAX) * 5 + u64::from(u32::MAX)
    );
    check(&pk);
    assert!(pk.peers.is_empty());
    assert!(pk.banned.is_empty());
}

use crate::rng::SplitMix64 as Rng;

#[test]
fn prng_is_deterministic() {
    let mut a = Rng(42);
    let mut b = Rng(42);
    let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
    let ys: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
    assert_eq!(xs, ys);
    assert_ne!(xs[0], xs[1]);
    // The reference value of splitmix64 seeded with 0.
    assert_eq!(Rng(0).next_u64(), 0xE220_A839_7B1D_CDAF);
}

/// Arbitrary call sequences, including nonsense, never panic and keep every invariant.
#[test]
fn arbitrary_call_sequences_never_panic() {
    for seed in 0..120u64 {
        let mut rng = Rng(seed ^ 0xDEAD_BEEF);
        let file_len = rng.below(40) as u64;
        let piece_len = rng.below(7) as u32; // 0 included
        let block_len = rng.below(5) as u32; // 0 included
        let mut pk = Picker::new(file_len, piece_len, block_len);
        check(&pk);
        let n = pk.n_pieces();
        let mut seen: Vec<(PeerId, Block)> = Vec::new();
        for _ in 0..300 {
            let peer = PeerId(rng.below(6) as u64);
            let piece = rng.below(n as usize + 3) as u32;
            let block = if !seen.is_empty() && rng.percent(70) {
                seen[rng.below(seen.len())].1
            } else {
                blk(piece, rng.below(8) as u32, rng.below(6) as u32)
            };
            match rng.below(10) {
                0 => {
                    let len = rng.below(n as usize + 3);
                    let bits: Vec<bool> = (0..len).map(|_| rng.percent(60)).collect();
                    pk.add_peer(peer, &bits);
                }
                1 => pk.peer_has(peer, piece),
                2 => pk.remove_peer(peer),
                3 | 4 => {
                    let depth = rng.below(6);
                    for b in pk.next_requests(peer, depth) {
                        assert!(pk.outstanding(peer) <= depth);
                        seen.push((peer, b));
                    }
                }
                5 => {
                    let who = if rng.percent(80) && !seen.is_empty() {
                        seen[rng.below(seen.len())].0
                    } else {
                        peer
                    };
                    let _ = pk.block_arrived(who, block);
                }
                6 => {
                    let who = if rng.percent(80) && !seen.is_empty() {
                        seen[rng.below(seen.len())].0
                    } else {
                        peer
                    };
                    let w = pk.block_written(who, block);
                    for (loser, b) in w.cancels {
                        assert_ne!(loser, who);
                        assert_eq!(b, block);
                    }
                }
                7 => pk.block_rejected(peer, block),
                8 => {
                    let _ = pk.piece_verified(piece, rng.percent(50));
                }
                _ => {
                    let _ = (pk.stuck(), pk.is_complete(), pk.n_have(), pk.have(piece));
                    let _ = (pk.piece_size(piece), pk.file_offset(&block));
                    let _ = pk.is_banned(peer);
                }
            }
            check(&pk);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Randomized simulation of whole downloads
// ---------------------------------------------------------------------------------------------

/// What the simulated file holds at a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    /// The copy sent by this peer (good if the peer is honest).
    From(PeerId),
    /// The remains of a write interrupted by a disconnect.
    Garbage,
}

#[derive(Debug)]
struct SimPeer {
    id: PeerId,
    pieces: Vec<bool>,
    corrupt: bool,
    depth: usize,
    connected: bool,
    /// What the picker believes this connection holds (rejections remove pieces).
    announced: Vec<bool>,
    /// Requests sent to the peer, not yet answered.
    queue: Vec<Block>,
    /// Cancelled requests whose copy may still arrive.
    stale: Vec<Block>,
}

struct Sim {
    seed: u64,
    rng: Rng,
    pk: Picker,
    peers: Vec<SimPeer>,
    file: BTreeMap<Block, Content>,
    /// Write verdicts whose data is not written yet: (peer index, block).
    pending: Vec<(usize, Block)>,
    /// Blocks written and still counted by the picker in the current attempt of their piece.
    accepted: BTreeSet<Block>,
    /// Pieces handed to the hasher.
    hasher: Vec<u32>,
    banned: BTreeSet<PeerId>,
    stats: Stats,
    /// Print every step (set `PICKER_SIM_TRACE`).
    trace: bool,
}

/// How often the simulation went through the interesting paths.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    writes: u64,
    failures: u64,
    bans: u64,
    cancels: u64,
    late_copies: u64,
    lost_races: u64,
    rejections: u64,
    disconnects: u64,
    solo_pieces: u64,
    completed: u64,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x1234_5678);
        let block_len = 1 + rng.below(4) as u32;
        let per_piece = 1 + rng.below(4) as u32;
        let piece_len = (block_len * per_piece - rng.below(block_len as usize) as u32).max(1);
        let n_pieces = if seed.is_multiple_of(67) {
            0
        } else {
            1 + rng.below(12) as u64
        };
        let file_len = if n_pieces == 0 {
            0
        } else {
            u64::from(piece_len) * (n_pieces - 1) + 1 + rng.below(piece_len as usize) as u64
        };
        let pk = Picker::new(file_len, piece_len, block_len);
        let n = pk.n_pieces() as usize;
        assert_eq!(n as u64, n_pieces);

        let n_honest = 1 + rng.below(4);
        let mut sets: Vec<Vec<bool>> = (0..n_honest)
            .map(|_| (0..n).map(|_| rng.percent(45)).collect())
            .collect();
        for piece in 0..n {
            if !sets.iter().any(|s| s[piece]) {
                let k = rng.below(n_honest);
                sets[k][piece] = true;
            }
        }
        let mut peers: Vec<SimPeer> = Vec::new();
        for (k, pieces) in sets.into_iter().enumerate() {
            peers.push(SimPeer {
                id: PeerId(k as u64 + 1),
                announced: pieces.clone(),
                pieces,
                corrupt: false,
                depth: 1 + rng.below(6),
                connected: false,
                queue: Vec::new(),
                stale: Vec::new(),
            });
        }
        if rng.percent(60) {
            let dense = rng.percent(50);
            let pieces: Vec<bool> = (0..n).map(|_| dense || rng.percent(70)).collect();
            peers.push(SimPeer {
                id: PeerId(100),
                announced: pieces.clone(),
                pieces,
                corrupt: true,
                depth: 1 + rng.below(6),
                connected: false,
                queue: Vec::new(),
                stale: Vec::new(),
            });
        }
        let mut sim = Sim {
            seed,
            rng,
            pk,
            peers,
            file: BTreeMap::new(),
            pending: Vec::new(),
            accepted: BTreeSet::new(),
            hasher: Vec::new(),
            banned: BTreeSet::new(),
            stats: Stats::default(),
            trace: std::env::var_os("PICKER_SIM_TRACE").is_some(),
        };
        for i in 0..sim.peers.len() {
            if sim.rng.percent(80) {
                sim.connect(i);
            }
        }
        sim.check();
        sim
    }

    fn blocks_of(&self, piece: u32) -> Vec<Block> {
        (0..self.pk.n_blocks(piece) as usize)
            .map(|idx| self.pk.block_at(piece, idx))
            .collect()
    }

    fn connect(&mut self, i: usize) {
        let id = self.peers[i].id;
        let pieces = self.peers[i].pieces.clone();
        match self.rng.below(3) {
            0 => self.pk.add_peer(id, &pieces),
            1 => {
                self.pk.add_peer(id, &[]);
                for (piece, &held) in pieces.iter().enumerate() {
                    if held {
                        self.pk.peer_has(id, piece as u32);
                    }
                }
            }
            _ => {
                let half: Vec<bool> = pieces.iter().map(|&h| h && self.rng.percent(50)).collect();
                self.pk.add_peer(id, &half);
                self.pk.add_peer(id, &pieces);
            }
        }
        let p = &mut self.peers[i];
        p.connected = true;
        p.announced = pieces;
        assert!(p.queue.is_empty() && p.stale.is_empty());
    }

    fn disconnect(&mut self, i: usize) {
        let id = self.peers[i].id;
        self.pk.remove_peer(id);
        self.stats.disconnects += 1;
        // Interrupted writes leave garbage behind.
        let mut k = 0;
        while k < self.pending.len() {
            if self.pending[k].0 == i {
                let (_, b) = self.pending.swap_remove(k);
                self.file.insert(b, Content::Garbage);
            } else {
                k += 1;
            }
        }
        let p = &mut self.peers[i];
        p.connected = false;
        p.queue.clear();
        p.stale.clear();
        self.forget_reset_pieces();
    }

    /// Blocks of pieces the picker sent back to Missing are no longer written in this attempt.
    fn forget_reset_pieces(&mut self) {
        let pk = &self.pk;
        self.accepted
            .retain(|b| !matches!(pk.slots[b.piece as usize], Slot::Missing));
    }

    fn request(&mut self, i: usize) {
        if !self.peers[i].connected {
            return;
        }
        let id = self.peers[i].id;
        let depth = self.peers[i].depth;
        let before = self.pk.outstanding(id);
        let got = self.pk.next_requests(id, depth);
        assert_eq!(
            self.pk.outstanding(id),
            before + got.len(),
            "seed {}",
            self.seed
        );
        assert!(
            self.pk.outstanding(id) <= depth.max(before),
            "seed {}",
            self.seed
        );
        if self.banned.contains(&id) {
            assert!(
                got.is_empty(),
                "seed {}: request to a banned peer",
                self.seed
            );
        }
        for b in got {
            let p = &mut self.peers[i];
            assert!(
                p.announced[b.piece as usize],
                "seed {}: {b:?} not held",
                self.seed
            );
            assert!(self.pk.block_index(&b).is_some());
            assert!(
                !p.queue.contains(&b),
                "seed {}: {b:?} asked twice",
                self.seed
            );
            assert!(!self.pending.contains(&(i, b)));
            // A cancelled copy of the same block cannot be told apart from the new answer:
            // the peer is taken to have honoured the cancel.
            p.stale.retain(|s| *s != b);
            p.queue.push(b);
        }
    }

    fn deliver(&mut self, i: usize, phase1: bool) {
        let (nq, ns) = (self.peers[i].queue.len(), self.peers[i].stale.len());
        if !self.peers[i].connected || nq + ns == 0 {
            return;
        }
        let id = self.peers[i].id;
        let k = self.rng.below(nq + ns);
        if k >= nq {
            // A late copy of a cancelled request.
            let b = self.peers[i].stale.swap_remove(k - nq);
            self.stats.late_copies += 1;
            assert_eq!(
                self.pk.block_arrived(id, b),
                Verdict::Discard,
                "seed {}: late copy",
                self.seed
            );
            return;
        }
        let b = self.peers[i].queue.swap_remove(k);
        // A peer's messages are handled in order and a block's data is fully written before
        // the next message is read (as in `transfers.rs`), so a rejection never overtakes
        // the same peer's write. (Were it allowed to, a rejection by the owner of a solo
        // piece would reset the piece under that write.) Blocks, by contrast, may arrive
        // while earlier writes are pending, as with an asynchronous disk.
        let writing = self.pending.iter().any(|&(j, _)| j == i);
        if phase1 && !writing && self.rng.percent(4) {
            self.pk.block_rejected(id, b);
            self.stats.rejections += 1;
            self.peers[i].announced[b.piece as usize] = false;
            // A rejection by the owner of a solo piece restarts the piece, which also drops
            // the peer's other requests for it (without cancels): their copies may still
            // come and must be discarded.
            let outstanding = &self.pk.peers[&id].outstanding;
            let p = &mut self.peers[i];
            let (kept, dropped): (Vec<Block>, Vec<Block>) =
                p.queue.iter().partition(|q| outstanding.contains(q));
            for d in &dropped {
                assert_eq!(
                    d.piece, b.piece,
                    "seed {}: unrelated request dropped",
                    self.seed
                );
            }
            p.queue = kept;
            p.stale.extend(dropped);
            self.forget_reset_pieces();
            return;
        }
        let other_writer = self.pending.iter().any(|&(j, pb)| pb == b && j != i);
        let verdict = self.pk.block_arrived(id, b);
        match verdict {
            Verdict::Write => {
                assert!(!other_writer, "seed {}: two writers for {b:?}", self.seed);
                assert!(
                    !self.accepted.contains(&b),
                    "seed {}: {b:?} written twice",
                    self.seed
                );
                self.pending.push((i, b));
                if self.rng.percent(5) {
                    assert_eq!(
                        self.pk.block_arrived(id, b),
                        Verdict::Discard,
                        "seed {}",
                        self.seed
                    );
                }
            }
            Verdict::Discard => {
                self.stats.lost_races += 1;
                // Only an end-game loser's copy of a block outstanding at it is discarded.
                assert!(
                    other_writer,
                    "seed {}: {b:?} from {id:?} discarded",
                    self.seed
                );
            }
        }
    }

    fn write(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let k = self.rng.below(self.pending.len());
        let (i, b) = self.pending.swap_remove(k);
        let id = self.peers[i].id;
        self.file.insert(b, Content::From(id));
        self.stats.writes += 1;
        let w = self.pk.block_written(id, b);
        self.accepted.insert(b);
        match &self.pk.slots[b.piece as usize] {
            Slot::Downloading(pt) | Slot::Verifying(pt) => {
                let idx = self.pk.block_index(&b).expect("valid");
                assert_eq!(
                    pt.blocks[idx],
                    BlockState::Received(id),
                    "seed {}",
                    self.seed
                );
            }
            _ => panic!("seed {}: written block's piece not downloading", self.seed),
        }
        for (loser, lb) in w.cancels {
            self.stats.cancels += 1;
            assert_eq!(lb, b, "seed {}", self.seed);
            assert_ne!(loser, id, "seed {}", self.seed);
            let j = self
                .peers
                .iter()
                .position(|p| p.id == loser)
                .expect("known loser");
            let p = &mut self.peers[j];
            assert!(p.connected, "seed {}: cancel to a gone peer", self.seed);
            let pos = p
                .queue
                .iter()
                .position(|q| *q == b)
                .expect("loser had it in flight");
            p.queue.swap_remove(pos);
            if self.rng.percent(50) {
                p.stale.push(b);
            }
        }
        if let Some(piece) = w.piece_complete {
            assert_eq!(piece, b.piece, "seed {}", self.seed);
            assert!(!self.hasher.contains(&piece));
            for pb in self.blocks_of(piece) {
                assert!(
                    self.accepted.contains(&pb),
                    "seed {}: {pb:?} unwritten",
                    self.seed
                );
            }
            self.hasher.push(piece);
        }
    }

    fn verify(&mut self) {
        if self.hasher.is_empty() {
            return;
        }
        let k = self.rng.below(self.hasher.len());
        let piece = self.hasher.swap_remove(k);
        let ok = self
            .blocks_of(piece)
            .iter()
            .all(|b| match self.file.get(b) {
                Some(Content::From(id)) => !self.is_corrupt(*id),
                _ => false,
            });
        let newly = self.pk.piece_verified(piece, ok);
        if ok {
            assert!(newly.is_empty());
            assert!(self.pk.have(piece), "seed {}", self.seed);
        } else {
            self.stats.failures += 1;
            assert_eq!(state(&self.pk, piece), St::Missing);
            for b in self.blocks_of(piece) {
                self.accepted.remove(&b);
            }
        }
        for id in newly {
            assert!(
                self.is_corrupt(id),
                "seed {}: honest {id:?} banned",
                self.seed
            );
            assert!(
                self.banned.insert(id),
                "seed {}: {id:?} banned twice",
                self.seed
            );
            self.stats.bans += 1;
            // Blocks it delivered for unfinished pieces are dropped.
            let pk = &self.pk;
            let file = &self.file;
            self.accepted.retain(|b| {
                file.get(b) != Some(&Content::From(id))
                    || !matches!(pk.slots[b.piece as usize], Slot::Downloading(_))
            });
            // The driver closes it.
            let j = self.peers.iter().position(|p| p.id == id).expect("known");
            if self.peers[j].connected {
                self.disconnect(j);
            }
        }
        self.forget_reset_pieces();
    }

    fn is_corrupt(&self, id: PeerId) -> bool {
        self.peers.iter().any(|p| p.id == id && p.corrupt)
    }

    fn in_flight(&self) -> bool {
        !self.pending.is_empty()
            || !self.hasher.is_empty()
            || self
                .peers
                .iter()
                .any(|p| !p.queue.is_empty() || !p.stale.is_empty())
    }

    /// The driver-level invariants, on top of the picker's own.
    fn check(&self) {
        let seed = self.seed;
        check(&self.pk);
        let mut at: BTreeMap<Block, usize> = BTreeMap::new();
        for (i, p) in self.peers.iter().enumerate() {
            if !p.corrupt {
                assert!(
                    !self.pk.is_banned(p.id),
                    "seed {seed}: honest {:?} banned",
                    p.id
                );
            }
            if !p.connected {
                assert!(!self.pk.peers.contains_key(&p.id));
                continue;
            }
            // The picker's outstanding set is exactly what is in flight at the peer.
            let mut mine: BTreeSet<Block> = p.queue.iter().copied().collect();
            mine.extend(
                self.pending
                    .iter()
                    .filter(|(j, _)| *j == i)
                    .map(|(_, b)| *b),
            );
            assert_eq!(
                mine.len(),
                p.queue.len() + self.pending.iter().filter(|(j, _)| *j == i).count()
            );
            assert_eq!(
                self.pk.peers[&p.id].outstanding, mine,
                "seed {seed}: {:?}",
                p.id
            );
            assert!(mine.len() <= p.depth, "seed {seed}: depth exceeded");
            for b in mine {
                *at.entry(b).or_default() += 1;
            }
        }
        assert!(
            at.values().all(|&c| c <= 2),
            "seed {seed}: a block at 3 peers"
        );
        // Exactly one pending write per block being written, by the picker's writer.
        for &(i, b) in &self.pending {
            let idx = self.pk.block_index(&b).expect("valid");
            match &self.pk.slots[b.piece as usize] {
                Slot::Downloading(pt) => match pt.blocks[idx] {
                    BlockState::Requested { writer, .. } => {
                        assert_eq!(writer, Some(self.peers[i].id), "seed {seed}")
                    }
                    s => panic!("seed {seed}: pending {b:?} in state {s:?}"),
                },
                _ => panic!("seed {seed}: pending {b:?} of a piece not downloading"),
            }
        }
        // What the picker records as received is what the file holds, and vice versa.
        for piece in 0..self.pk.n_pieces() {
            if let Slot::Downloading(pt) | Slot::Verifying(pt) = &self.pk.slots[piece as usize] {
                for (idx, s) in pt.blocks.iter().enumerate() {
                    let b = self.pk.block_at(piece, idx);
                    if let BlockState::Received(id) = s {
                        assert_eq!(
                            self.file.get(&b),
                            Some(&Content::From(*id)),
                            "seed {seed}: {b:?}"
                        );
                        assert!(
                            self.accepted.contains(&b),
                            "seed {seed}: {b:?} not accepted"
                        );
                    } else {
                        assert!(!self.accepted.contains(&b), "seed {seed}: {b:?} forgotten");
                    }
                }
            }
        }
        // stuck() exactly when a needed piece has no connected, trusted holder.
        let expect_stuck = (0..self.pk.n_pieces()).any(|piece| {
            !self.pk.have(piece)
                && !self.hasher.contains(&piece)
                && !self.peers.iter().any(|p| {
                    p.connected && !self.banned.contains(&p.id) && p.announced[piece as usize]
                })
        });
        assert_eq!(self.pk.stuck(), expect_stuck, "seed {seed}: stuck()");
    }

    fn run(&mut self) {
        let disrupt = 50 + self.rng.below(400);
        let max_steps = disrupt + 20_000;
        let mut step = 0;
        while !self.pk.is_complete() {
            assert!(
                step < max_steps,
                "seed {}: no completion in {max_steps} steps",
                self.seed
            );
            let phase1 = step < disrupt;
            if step == disrupt {
                // From now on: everyone is connected and announces everything it holds.
                for i in 0..self.peers.len() {
                    if !self.peers[i].connected {
                        self.connect(i);
                    } else {
                        let id = self.peers[i].id;
                        for piece in 0..self.peers[i].pieces.len() {
                            if self.peers[i].pieces[piece] && !self.peers[i].announced[piece] {
                                self.pk.peer_has(id, piece as u32);
                                self.peers[i].announced[piece] = true;
                            }
                        }
                    }
                }
                self.check();
                assert!(
                    !self.pk.stuck(),
                    "seed {}: honest peers hold every piece",
                    self.seed
                );
            }
            let n = self.peers.len();
            let i = self.rng.below(n);
            let r = self.rng.below(100);
            if self.trace {
                let queues: Vec<_> = self.peers.iter().map(|p| (p.connected, &p.queue)).collect();
                eprintln!(
                    "step {step}: peer {i} action {r}; pending {:?}, hasher {:?}, queues {queues:?}",
                    self.pending, self.hasher
                );
            }
            match r {
                0..=29 => self.request(i),
                30..=59 => self.deliver(i, phase1),
                60..=79 => self.write(),
                80..=89 => self.verify(),
                90..=94 if phase1 && self.peers[i].connected => self.disconnect(i),
                95..=99 if phase1 && !self.peers[i].connected => self.connect(i),
                _ => {}
            }
            self.check();
            if !phase1 && !self.in_flight() {
                // Nothing under way: every peer is topped up, and something must move.
                for k in 0..n {
                    self.request(k);
                }
                self.check();
                assert!(
                    self.in_flight() || self.pk.is_complete(),
                    "seed {}: deadlock with {} of {} pieces",
                    self.seed,
                    self.pk.n_have(),
                    self.pk.n_pieces()
                );
            }
            step += 1;
        }
        self.stats.completed += 1;
        self.stats.solo_pieces += self.pk.solo.len() as u64;
        // Once complete, nothing more is asked of anybody.
        for k in 0..self.peers.len() {
            let id = self.peers[k].id;
            assert!(self.pk.next_requests(id, 100).is_empty());
        }
        assert!(!self.pk.stuck());
        for p in &self.peers {
            if !p.corrupt {
                assert!(!self.pk.is_banned(p.id), "seed {}", self.seed);
            }
        }
    }
}

/// 200 random downloads (seeds 0..200). Each: 0 to 12 pieces of 1 to 4 blocks (short last
/// piece and block), 1 to 4 honest peers with random piece sets covering the file, often a
/// corrupt peer, random pipeline depths; a disruption phase with disconnects, reconnects and
/// rejections, then everybody connected until the file is complete.
///
/// To reproduce one seed: `PICKER_SIM_SEED=35 PICKER_SIM_TRACE=1 cargo test --lib
/// simulated_downloads -- --nocapture`.
#[test]
fn simulated_downloads_complete_and_never_ban_honest_peers() {
    let one: Option<u64> = std::env::var("PICKER_SIM_SEED")
        .ok()
        .map(|s| s.parse().expect("a seed"));
    let seeds = one.map_or(0..200, |s| s..s + 1);
    let mut t = Stats::default();
    for seed in seeds {
        let mut sim = Sim::new(seed);
        sim.run();
        let s = sim.stats;
        t.writes += s.writes;
        t.failures += s.failures;
        t.bans += s.bans;
        t.cancels += s.cancels;
        t.late_copies += s.late_copies;
        t.lost_races += s.lost_races;
        t.rejections += s.rejections;
        t.disconnects += s.disconnects;
        t.solo_pieces += s.solo_pieces;
        t.completed += s.completed;
    }
    if one.is_none() {
        // The simulation went through every interesting path, many times.
        assert_eq!(t.completed, 200);
        assert!(t.writes > 2000, "{t:?}");
        assert!(t.failures > 50, "{t:?}");
        assert!(t.bans > 30, "{t:?}");
        assert!(t.solo_pieces > 20, "{t:?}");
        assert!(t.cancels > 30, "{t:?}");
        assert!(t.late_copies > 10, "{t:?}");
        assert!(t.lost_races > 10, "{t:?}");
        assert!(t.rejections > 30, "{t:?}");
        assert!(t.disconnects > 500, "{t:?}");
    }
}

#[test]
fn shuffled_ties_draw_the_first_pieces_then_go_by_index() {
    let n = 64u32;
    let mut orders = Vec::new();
    for seed in [1u64, 2] {
        let mut pk = Picker::new(u64::from(n) * 8, 8, 4);
        pk.add_peer(PeerId(1), &[true; 64]);
        pk.shuffle_ties(seed);
        check(&pk);
        for piece in 0..n {
            assert_eq!(pk.by_rank[pk.rank[piece as usize] as usize], piece);
        }
        let order: Vec<u32> = pk.by_rank.clone();
        let head = SHUFFLE_HEAD as usize;
        assert!(
            order[head..].windows(2).all(|w| w[0] < w[1]),
            "the rest by index"
        );
        assert_ne!(order[..head], (0..SHUFFLE_HEAD).collect::<Vec<_>>()[..]);
        // The picker asks for the head first.
        let first = pk.next_requests(PeerId(1), 2);
        assert_eq!(first[0].piece, order[0]);
        orders.push(order);
    }
    assert_ne!(orders[0], orders[1], "each seed its own order");
    let mut pk = Picker::new(80, 8, 4);
    pk.shuffle_ties(0);
    assert_eq!(pk.by_rank, (0..10).collect::<Vec<_>>(), "seed 0: by index");
}
