//! Tests of the download state machine: linking, pipelining, verification, bans, timers,
//! re-asking the tracker, end-game cancels, and a randomized simulation of whole downloads.

use super::*;
use crate::wire::{FileName, Sha1Digest};
use std::collections::{BTreeSet, HashSet};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Piece length of the test files: two blocks of `BLOCK` bytes.
const PIECE: u32 = 8;
const BLOCK: u32 = 4;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

fn limits() -> Limits {
    Limits {
        block_len: BLOCK,
        depth: 3,
        min_depth: 3,
        max_depth: 3,
        queue_time: secs(1),
        connect_timeout: secs(10),
        stall_timeout: secs(15),
        requery_interval: secs(1),
        max_requeries: 3,
        stuck_grace: secs(2),
        ..Limits::default().without_discovery()
    }
}

/// Metadata with dummy digests: the engine never hashes.
fn meta_with(size: u64, piece_len: u32) -> FileMeta {
    let n = FileMeta::n_pieces_for(size, piece_len);
    FileMeta {
        name: FileName::new("movie.bin").unwrap(),
        size,
        piece_len,
        file_sha1: Sha1Digest([0xab; 20]),
        piece_hashes: (0..n).map(|i| Sha1Digest([i as u8; 20])).collect(),
    }
}

fn meta(size: u64) -> FileMeta {
    meta_with(size, PIECE)
}

fn group() -> GroupId {
    GroupId::new("friends").unwrap()
}

fn download(size: u64) -> Download {
    Download::new(group(), meta(size), limits())
}

fn addr(i: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], 7000 + i))
}

fn br(piece: u32, offset: u32, len: u32) -> BlockRef {
    BlockRef { piece, offset, len }
}

fn drain(d: &mut Download) -> Vec<Action> {
    std::iter::from_fn(|| d.poll_action()).collect()
}

fn full(n: u32) -> Bitfield {
    Bitfield::full(n as usize)
}

fn only(n: u32, pieces: &[u32]) -> Bitfield {
    let mut bits = Bitfield::new(n as usize);
    for &p in pieces {
        bits.set(p as usize);
    }
    bits
}

fn handshake() -> DownloaderMsg {
    let m = meta(0);
    DownloaderMsg::handshake(group(), m.name, m.file_sha1)
}

fn connects(actions: &[Action]) -> Vec<(PeerId, SocketAddr)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Connect { peer, addr } => Some((*peer, *addr)),
            _ => None,
        })
        .collect()
}

fn requests(actions: &[Action], of: PeerId) -> Vec<BlockRef> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send {
                peer,
                msg: DownloaderMsg::Request(b),
            } if *peer == of => Some(*b),
            _ => None,
        })
        .collect()
}

fn cancels(actions: &[Action], of: PeerId) -> Vec<BlockRef> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send {
                peer,
                msg: DownloaderMsg::Cancel(b),
            } if *peer == of => Some(*b),
            _ => None,
        })
        .collect()
}

fn closes(actions: &[Action]) -> Vec<PeerId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Close { peer } => Some(*peer),
            _ => None,
        })
        .collect()
}

fn n_queries(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|a| **a == Action::QuerySharers)
        .count()
}

/// Starts a download of `size` bytes from `addrs`; returns it with the peer of each connect.
fn started(size: u64, addrs: &[SocketAddr], now: Instant) -> (Download, Vec<PeerId>) {
    let mut d = download(size);
    d.start(addrs, now);
    let peers = connects(&drain(&mut d))
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    (d, peers)
}

/// A block from `peer`: its header, then (if the engine wants it) its data written.
fn deliver(d: &mut Download, peer: PeerId, b: BlockRef, now: Instant) -> Verdict {
    let verdict = d.on_block_header(peer, b.piece, b.offset, b.len, now);
    if verdict == Verdict::Write {
        d.on_block_written(peer, b.piece, b.offset, b.len);
    }
    verdict
}

/// Plays honest sharers and a hasher that passes everything: every request is served at once
/// and every piece verified, until no action is left. Returns every action seen.
fn run_to_end(d: &mut Download, first: Vec<Action>, now: Instant) -> Vec<Action> {
    let mut seen = Vec::new();
    let mut queue: VecDeque<Action> = first.into();
    while let Some(a) = queue.pop_front() {
        seen.push(a.clone());
        assert!(seen.len() < 10_000, "runaway download");
        match a {
            Action::Send {
                peer,
                msg: DownloaderMsg::Request(b),
            } => {
                deliver(d, peer, b, now);
            }
            Action::Verify { piece } => d.on_piece_checked(piece, true, now),
            _ => {}
        }
        queue.extend(drain(d));
    }
    seen
}

// ---------------------------------------------------------------------------------------------
// Starting and linking
// ---------------------------------------------------------------------------------------------

#[test]
fn start_connects_and_sends_the_handshake_to_every_address() {
    let t0 = Instant::now();
    let mut d = download(24);
    d.start(&[addr(1), addr(2), addr(3)], t0);
    let actions = drain(&mut d);
    assert_eq!(actions.len(), 6, "{actions:?}");
    let mut peers = BTreeSet::new();
    for (i, pair) in actions.chunks(2).enumerate() {
        let Action::Connect { peer, addr: a } = pair[0] else {
            panic!("expected a connect, got {:?}", pair[0]);
        };
        assert_eq!(a, addr(i as u16 + 1));
        assert_eq!(
            pair[1],
            Action::Send {
                peer,
                msg: handshake()
            }
        );
        peers.insert(peer);
    }
    assert_eq!(peers.len(), 3, "distinct peer ids");
    assert!(!d.is_finished());
    assert_eq!(d.progress().active_peers, 0);
    assert_eq!(d.next_deadline(), Some(t0 + limits().connect_timeout));
}

#[test]
fn zero_length_file_finishes_at_once() {
    let t0 = Instant::now();
    let mut d = download(0);
    d.start(&[addr(1)], t0);
    assert_eq!(drain(&mut d), vec![Action::Finished(Ok(()))]);
    assert!(d.is_finished());
    assert_eq!(d.next_deadline(), None);
    let p = d.progress();
    assert_eq!((p.n_pieces, p.pieces_verified, p.size), (0, 0, 0));
    d.on_sharers(&[addr(2)], t0);
    d.on_tick(t0 + secs(100));
    assert_eq!(drain(&mut d), vec![]);
}

#[test]
fn duplicate_addresses_are_linked_once() {
    let t0 = Instant::now();
    let mut d = download(24);
    d.start(&[addr(1), addr(1), addr(2), addr(1)], t0);
    let actions = drain(&mut d);
    let addrs: Vec<SocketAddr> = connects(&actions).into_iter().map(|(_, a)| a).collect();
    assert_eq!(addrs, vec![addr(1), addr(2)]);
    assert_eq!(actions.len(), 4);
    // The tracker lists them again while they are linked: nothing new.
    d.on_sharers(&[addr(2), addr(1), addr(2)], t0 + ms(5));
    assert_eq!(drain(&mut d), vec![]);
}

#[test]
fn accept_with_a_wrong_bitfield_length_drops_the_link() {
    let t0 = Instant::now();
    let (mut d, peers) = started(24, &[addr(1), addr(2)], t0);
    let (a, b) = (peers[0], peers[1]);
    // Three pieces, a bitfield of two: the link goes; `b` is still opening, so no query.
    d.on_accept(a, &full(2), t0);
    assert_eq!(drain(&mut d), vec![Action::Close { peer: a }]);
    assert_eq!(d.on_block_header(a, 0, 0, 4, t0), Verdict::Discard);
    d.on_accept(a, &full(3), t0);
    assert_eq!(drain(&mut d), vec![], "a dropped link stays dropped");
    assert_eq!(d.progress().active_peers, 0);
    // The last one too: now nobody can supply anything, so the tracker is asked.
    d.on_accept(b, &full(4), t0);
    assert_eq!(
        drain(&mut d),
        vec![Action::Close { peer: b }, Action::QuerySharers]
    );
    // Dropped links are not banned: the addresses are tried again.
    d.on_sharers(&[addr(1), addr(2)], t0 + ms(1));
    assert_eq!(connects(&drain(&mut d)).len(), 2);
}

// ---------------------------------------------------------------------------------------------
// Requests, blocks, verification
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Request depth
// ---------------------------------------------------------------------------------------------

fn adaptive_limits(queue_time: Duration) -> Limits {
    Limits {
        depth: 4,
        min_depth: 2,
        max_depth: 64,
        queue_time,
        ..limits()
    }
}

#[test]
fn depth_follows_the_rate_within_bounds() {
    let l = Limits {
        block_len: 128 * 1024,
        ..adaptive_limits(secs(1))
    };
    // 1 MiB/s for a second is 8 blocks of 128 KiB.
    assert_eq!(depth_for(1024.0 * 1024.0, &l), 8);
    assert_eq!(depth_for(1024.0 * 1024.0 + 1.0, &l), 9);
    assert_eq!(depth_for(0.0, &l), 2);
    assert_eq!(depth_for(f64::NAN, &l), 2);
    assert_eq!(depth_for(-5.0, &l), 2);
    assert_eq!(depth_for(1e15, &l), 64);
    assert_eq!(depth_for(f64::INFINITY, &l), 64);
    // Bounds out of order do not panic: the minimum wins.
    let odd = Limits {
        min_depth: 10,
        max_depth: 3,
        ..l.clone()
    };
    assert_eq!(depth_for(0.0, &odd), 10);
    assert_eq!(depth_for(1e15, &odd), 10);
}

/// A download of `n_pieces` pieces with `limits`, its one link accepted with `bitfield` at
/// `t0`; returns it, the link and its first requests.
fn accepted(
    limits: Limits,
    n_pieces: u32,
    bitfield: &Bitfield,
    t0: Instant,
) -> (Download, PeerId, Vec<BlockRef>) {
    let mut d = Download::new(
        group(),
        meta(u64::from(PIECE) * u64::from(n_pieces)),
        limits,
    );
    d.start(&[addr(1)], t0);
    let a = connects(&drain(&mut d))[0].0;
    d.on_accept(a, bitfield, t0);
    let first = requests(&drain(&mut d), a);
    (d, a, first)
}

/// Serves every outstanding request of `peer` every `rtt` (a link held back only by its round
/// trip), for `rounds` round trips; returns the most requests outstanding seen.
fn serve_rounds(
    d: &mut Download,
    peer: PeerId,
    mut outstanding: Vec<BlockRef>,
    t: &mut Instant,
    rtt: Duration,
    rounds: usize,
) -> usize {
    let mut most = outstanding.len();
    for _ in 0..rounds {
        *t += rtt;
        for b in std::mem::take(&mut outstanding) {
            deliver(d, peer, b, *t);
        }
        outstanding = requests(&drain(d), peer);
        if outstanding.is_empty() {
            break;
        }
        most = most.max(d.picker().outstanding(peer));
    }
    most
}

#[test]
fn a_fast_link_gets_a_deep_pipeline() {
    let t0 = Instant::now();
    let (mut d, a, first) = accepted(adaptive_limits(secs(1)), 400, &full(400), t0);
    assert_eq!(first.len(), 4, "the initial depth until a window closes");
    // Round trips of 10 ms: 4 blocks per 10 ms is far more than a second of queue would need
    // at that rate, so the depth grows to the maximum.
    let mut t = t0;
    let most = serve_rounds(&mut d, a, first, &mut t, ms(10), 60);
    assert_eq!(most, 64);
    assert_eq!(d.link_depth(a), Some(64));
}

#[test]
fn a_slow_link_keeps_only_a_queue_time_of_work() {
    let t0 = Instant::now();
    let (mut d, a, first) = accepted(adaptive_limits(ms(300)), 400, &full(400), t0);
    let mut outstanding: std::collections::VecDeque<BlockRef> = first.into();
    assert_eq!(outstanding.len(), 4);
    // One 4-byte block every 100 ms: 40 bytes/s, so 300 ms of queue is 12 bytes, 3 blocks.
    let mut t = t0;
    for _ in 0..40 {
        t += ms(100);
        let b = outstanding.pop_front().expect("a request outstanding");
        deliver(&mut d, a, b, t);
        outstanding.extend(requests(&drain(&mut d), a));
    }
    assert_eq!(d.link_depth(a), Some(3));
    assert_eq!(d.picker().outstanding(a), 3);
    assert_eq!(outstanding.len(), 3);
}

#[test]
fn idle_time_does_not_lower_the_rate() {
    let t0 = Instant::now();
    // Two pieces only: after they are requested the link is idle until a `have`.
    let (mut d, a, first) = accepted(adaptive_limits(secs(1)), 4, &only(4, &[0, 1]), t0);
    assert_eq!(first.len(), 4);
    let mut t = t0 + ms(1);
    for b in first {
        deliver(&mut d, a, b, t);
    }
    assert_eq!(d.picker().outstanding(a), 0);
    // A long idle spell, then more work: the first window after it counts from the new
    // requests, so the fast link is not taken for a slow one.
    t += secs(30);
    d.on_have(a, 2, t);
    d.on_have(a, 3, t);
    let more = requests(&drain(&mut d), a);
    assert_eq!(more.len(), 4);
    t += ms(300);
    for b in more {
        deliver(&mut d, a, b, t);
    }
    // The window closes at the first block: 4 bytes in 300 ms, about 13 bytes/s, is 4 blocks
    // of a second's queue. Counting the idle 30 s (20 bytes in 30.3 s) would have brought the
    // depth down to the minimum, 2.
    assert_eq!(d.link_depth(a), Some(4));
}

#[test]
fn requests_are_pipelined_up_to_depth() {
    let t0 = Instant::now();
    let (mut d, peers) = started(40, &[addr(1)], t0);
    let a = peers[0];
    d.on_accept(a, &full(5), t0);
    let reqs = requests(&drain(&mut d), a);
    assert_eq!(reqs.len(), limits().depth);
    assert_eq!(reqs.iter().collect::<HashSet<_>>().len(), reqs.len());
    assert_eq!(d.picker().outstanding(a), limits().depth);
    assert_eq!(d.progress().active_peers, 1);
    // A `have` for a piece it already announced asks for nothing more: the pipeline is full.
    d.on_have(a, 4, t0);
    assert_eq!(requests(&drain(&mut d), a), vec![]);

    // A block being written still counts; once it is written, exactly one more follows.
    let b = reqs[0];
    assert_eq!(
        d.on_block_header(a, b.piece, b.offset, b.len, t0),
        Verdict::Write
    );
    assert_eq!(drain(&mut d), vec![]);
    d.on_block_written(a, b.piece, b.offset, b.len);
    let more = requests(&drain(&mut d), a);
    assert_eq!(more.len(), 1);
    assert!(!reqs.contains(&more[0]));
    assert_eq!(d.picker().outstanding(a), limits().depth);
}

#[test]
fn block_headers_get_verdicts() {
    let t0 = Instant::now();
    let (mut d, peers) = started(24, &[addr(1), addr(2)], t0);
    let (a, b) = (peers[0], peers[1]);
    // Before the accept nothing is written.
    assert_eq!(d.on_block_header(a, 0, 0, 4, t0), Verdict::Discard);
    d.on_accept(a, &full(3), t0);
    let reqs = requests(&drain(&mut d), a);
    assert_eq!(reqs[0], br(0, 0, 4));
    // Unrequested, wrong length, wrong offset, out of range, unknown peer: discarded.
    assert_eq!(d.on_block_header(a, 2, 4, 4, t0), Verdict::Discard);
    assert_eq!(d.on_block_header(a, 0, 0, 3, t0), Verdict::Discard);
    assert_eq!(d.on_block_header(a, 0, 2, 4, t0), Verdict::Discard);
    assert_eq!(d.on_block_header(a, 9, 0, 4, t0), Verdict::Discard);
    assert_eq!(d.on_block_header(b, 0, 0, 4, t0), Verdict::Discard);
    assert_eq!(d.on_block_header(PeerId(99), 0, 0, 4, t0), Verdict::Discard);
    // The requested block is written once; the same header again is discarded.
    assert_eq!(d.on_block_header(a, 0, 0, 4, t0), Verdict::Write);
    assert_eq!(d.on_block_header(a, 0, 0, 4, t0), Verdict::Discard);
    d.on_block_written(a, 0, 0, 4);
    assert_eq!(d.on_block_header(a, 0, 0, 4, t0), Verdict::Discard);
    // A write that was never accepted is ignored.
    d.on_block_written(a, 2, 0, 4);
    assert!(!drain(&mut d).contains(&Action::Verify { piece: 2 }));
}

#[test]
fn complete_pieces_are_verified_then_announced_and_the_download_finishes() {
    let t0 = Instant::now();
    // 20 bytes: pieces of 8, 8 and 4 bytes (the last one a single block).
    let (mut d, peers) = started(20, &[addr(1)], t0);
    let a = peers[0];
    d.on_accept(a, &full(3), t0);
    let reqs = requests(&drain(&mut d), a);
    assert_eq!(reqs, vec![br(0, 0, 4), br(0, 4, 4), br(1, 0, 4)]);

    assert_eq!(deliver(&mut d, a, reqs[0], t0), Verdict::Write);
    let after_first = drain(&mut d);
    assert!(!after_first
        .iter()
        .any(|x| matches!(x, Action::Verify { .. })));
    assert_eq!(requests(&after_first, a), vec![br(1, 4, 4)]);

    assert_eq!(deliver(&mut d, a, reqs[1], t0), Verdict::Write);
    let after_second = drain(&mut d);
    assert!(after_second.contains(&Action::Verify { piece: 0 }));
    assert_eq!(
        requests(&after_second, a),
        vec![br(2, 0, 4)],
        "more requests follow"
    );

    assert_eq!(d.progress().bytes_verified, 0);
    d.on_piece_checked(0, true, t0);
    assert_eq!(drain(&mut d), vec![Action::Verified { piece: 0 }]);
    assert!(d.has_piece(0));
    let p = d.progress();
    assert_eq!((p.bytes_verified, p.pieces_verified, p.n_pieces), (8, 1, 3));

    // Serve the rest: the remaining pieces are verified, the link closed, then Finished.
    let rest = run_to_end(
        &mut d,
        vec![
            Action::Send {
                peer: a,
                msg: DownloaderMsg::Request(br(1, 0, 4)),
            },
            Action::Send {
                peer: a,
                msg: DownloaderMsg::Request(br(1, 4, 4)),
            },
            Action::Send {
                peer: a,
                msg: DownloaderMsg::Request(br(2, 0, 4)),
            },
        ],
        t0,
    );
    let verified: Vec<u32> = rest
        .iter()
        .filter_map(|x| match x {
            Action::Verified { piece } => Some(*piece),
            _ => None,
        })
        .collect();
    assert_eq!(verified, vec![1, 2]);
    let n = rest.len();
    assert_eq!(
        &rest[n - 2..],
        &[Action::Close { peer: a }, Action::Finished(Ok(()))]
    );
    assert!(d.is_finished());
    assert_eq!(d.progress().bytes_verified, 20);
    assert_eq!(d.next_deadline(), None);
}

#[test]
fn a_repeated_verdict_is_counted_once() {
    let t0 = Instant::now();
    let (mut d, peers) = started(24, &[addr(1)], t0);
    let a = peers[0];
    d.on_accept(a, &full(3), t0);
    drain(&mut d);
    deliver(&mut d, a, br(0, 0, 4), t0);
    deliver(&mut d, a, br(0, 4, 4), t0);
    assert!(drain(&mut d).contains(&Action::Verify { piece: 0 }));
    d.on_piece_checked(0, true, t0);
    assert_eq!(drain(&mut d), vec![Action::Verified { piece: 0 }]);
    d.on_piece_checked(0, true, t0);
    d.on_piece_checked(2, true, t0);
    assert_eq!(drain(&mut d), vec![]);
    assert_eq!(d.progress().bytes_verified, 8);
}

#[test]
fn have_announcements_add_pieces_and_fill_the_pipeline() {
    let t0 = Instant::now();
    let (mut d, peers) = started(24, &[addr(1)], t0);
    let a = peers[0];
    d.on_accept(a, &only(3, &[]), t0);
    assert_eq!(
        drain(&mut d),
        vec![Action::QuerySharers],
        "nobody holds anything"
    );
    d.on_have(a, 1, t0);
    assert_eq!(requests(&drain(&mut d), a), vec![br(1, 0, 4), br(1, 4, 4)]);
    d.on_have(a, 99, t0);
    d.on_have(PeerId(42), 0, t0);
    assert_eq!(drain(&mut d), vec![]);
}

#[test]
fn a_rejected_block_goes_to_another_peer() {
    let t0 = Instant::now();
    let (mut d, peers) = started(24, &[addr(1), addr(2)], t0);
    let (a, b) = (peers[0], peers[1]);
    d.on_accept(a, &full(3), t0);
    assert_eq!(
        requests(&drain(&mut d), a),
        vec![br(0, 0, 4), br(0, 4, 4), br(1, 0, 4)]
    );
    // `a` will not send piece 0 after all: it gets no more requests for it.
    d.on_rejected(a, br(0, 0, 4), t0);
    let after = drain(&mut d);
    assert!(
        requests(&after, a).iter().all(|r| r.piece != 0),
        "{after:?}"
    );
    assert_eq!(n_queries(&after), 0, "`b` is still opening");
    d.on_accept(b, &full(3), t0);
    let to_b = requests(&drain(&mut d), b);
    assert!(to_b.contains(&br(0, 0, 4)), "{to_b:?}");
}

// ---------------------------------------------------------------------------------------------
// Bans
// ---------------------------------------------------------------------------------------------

#[test]
fn a_bad_piece_bans_its_only_supplier_for_good() {
    let t0 = Instant::now();
    let (mut d, peers) = started(24, &[addr(1), addr(2)], t0);
    let (a, b) = (peers[0], peers[1]);
    // `a` (corrupt) holds piece 0 only and sends it alone.
    d.on_accept(a, &only(3, &[0]), t0);
    assert_eq!(requests(&drain(&mut d), a), vec![br(0, 0, 4), br(0, 4, 4)]);
    deliver(&mut d, a, br(0, 0, 4), t0);
    deliver(&mut d, a, br(0, 4, 4), t0);
    assert_eq!(drain(&mut d), vec![Action::Verify { piece: 0 }]);
    d.on_piece_checked(0, false, t0);
    assert_eq!(drain(&mut d), vec![Action::Close { peer: a }]);
    assert!(d.picker().is_banned(a));
    assert!(!d.has_piece(0));
    assert_eq!(d.progress().bytes_verified, 0);

    // The tracker lists it again: not linked.
    d.on_sharers(&[addr(1), addr(2)], t0 + ms(1));
    assert_eq!(drain(&mut d), vec![]);

    // `b` serves, is lost halfway, and the tracker lists both again: only `b` comes back.
    d.on_accept(b, &full(3), t0 + ms(2));
    let first = drain(&mut d);
    let r = requests(&first, b)[0];
    deliver(&mut d, b, r, t0 + ms(3));
    drain(&mut d);
    d.on_link_lost(b, "reset", t0 + ms(4));
    assert_eq!(drain(&mut d), vec![Action::QuerySharers]);
    d.on_sharers(&[addr(1), addr(2), addr(1)], t0 + ms(5));
    let again = drain(&mut d);
    let linked = connects(&again);
    assert_eq!(linked.len(), 1);
    assert_eq!(linked[0].1, addr(2));
    let c = linked[0].0;
    d.on_accept(c, &full(3), t0 + ms(6));
    let first = drain(&mut d);
    let all = run_to_end(&mut d, first, t0 + ms(7));
    assert_eq!(all.last(), Some(&Action::Finished(Ok(()))));
    assert!(connects(&all).is_empty());
}

#[test]
fn a_peer_lost_before_its_bad_piece_is_checked_is_still_banned_by_address() {
    let t0 = Instant::now();
    let (mut d, peers) = started(24, &[addr(1), addr(2)], t0);
    let a = peers[0];
    d.on_accept(a, &only(3, &[0]), t0);
    drain(&mut d);
    deliver(&mut d, a, br(0, 0, 4), t0);
    deliver(&mut d, a, br(0, 4, 4), t0);
    assert_eq!(drain(&mut d), vec![Action::Verify { piece: 0 }]);
    // It leaves while the hasher works.
    d.on_link_lost(a, "closed", t0 + ms(1));
    drain(&mut d);
    d.on_piece_checked(0, false, t0 + ms(2));
    drain(&mut d);
    assert!(d.picker().is_banned(a));
    d.on_sharers(&[addr(1), addr(2)], t0 + ms(3));
    assert!(
        connects(&drain(&mut d)).is_empty(),
        "the banned address was linked again"
    );
}

#[test]
fn a_ban_also_closes_a_newer_link_to_the_same_address() {
    let t0 = Instant::now();
    let (mut d, peers) = started(24, &[addr(1)], t0);
    let a = peers[0];
    d.on_accept(a, &full(3), t0);
    drain(&mut d);
    deliver(&mut d, a, br(0, 0, 4), t0);
    deliver(&mut d, a, br(0, 4, 4), t0);
    assert!(drain(&mut d).contains(&Action::Verify { piece: 0 }));
    // It leaves and comes back before the verdict.
    d.on_link_lost(a, "closed", t0 + ms(1));
    assert_eq!(drain(&mut d), vec![Action::QuerySharers]);
    d.on_sharers(&[addr(1)], t0 + ms(2));
    let again = connects(&drain(&mut d));
    assert_eq!(again.len(), 1);
    let a2 = again[0].0;
    d.on_accept(a2, &full(3), t0 + ms(3));
    drain(&mut d);
    d.on_piece_checked(0, false, t0 + ms(4));
    let after = drain(&mut d);
    assert!(closes(&after).contains(&a2), "{after:?}");
    assert!(requests(&after, a2).is_empty());
    assert_eq!(d.progress().active_peers, 0);
}

// ---------------------------------------------------------------------------------------------
// Lost links and the tracker
// ---------------------------------------------------------------------------------------------

#[test]
fn a_refused_link_gives_its_work_to_the_others() {
    let t0 = Instant::now();
    let (mut d, peers) = started(24, &[addr(1), addr(2)], t0);
    let (a, b) = (peers[0], peers[1]);
    d.on_accept(a, &full(3), t0);
    let to_a = requests(&drain(&mut d), a);
    assert_eq!(to_a, vec![br(0, 0, 4), br(0, 4, 4), br(1, 0, 4)]);
    d.on_accept(b, &full(3), t0);
    let to_b = requests(&drain(&mut d), b);
    assert_eq!(to_b.len(), 3);
    d.on_refused(a, "going away", t0);
    let after = drain(&mut d);
    assert_eq!(closes(&after), vec![a]);
    assert_eq!(n_queries(&after), 0);
    let mut first = Vec::new();
    for r in to_b {
        first.push(Action::Send {
            peer: b,
            msg: DownloaderMsg::Request(r),
        });
    }
    let all = run_to_end(&mut d, first, t0);
    assert_eq!(all.last(), Some(&Action::Finished(Ok(()))));
    let later_to_b: HashSet<BlockRef> = requests(&all, b).into_iter().collect();
    for r in to_a {
        assert!(later_to_b.contains(&r), "{r:?} not taken over");
    }
    assert!(requests(&all, a).is_empty());
}

#[test]
fn a_link_refused_while_opening_costs_nothing_else() {
    let t0 = Instant::now();
    let (mut d, peers) = started(24, &[addr(1), addr(2)], t0);
    let (a, b) = (peers[0], peers[1]);
    d.on_refused(a, "not sharing that file", t0);
    assert_eq!(drain(&mut d), vec![Action::Close { peer: a }]);
    d.on_accept(b, &full(3), t0);
    let first = drain(&mut d);
    let all = run_to_end(&mut d, first, t0);
    assert_eq!(all.last(), Some(&Action::Finished(Ok(()))));
}

#[test]
fn a_lost_links_partial_piece_is_finished_by_another() {
    let t0 = Instant::now();
    let (mut d, peers) = started(24, &[addr(1), addr(2)], t0);
    let (a, b) = (peers[0], peers[1]);
    d.on_accept(a, &full(3), t0);
    drain(&mut d);
    deliver(&mut d, a, br(0, 0, 4), t0);
    drain(&mut d);
    // A lost link needs no Close: the driver knows.
    d.on_link_lost(a, "reset", t0);
    assert_eq!(drain(&mut d), vec![]);
    d.on_accept(b, &full(3), t0);
    let first = drain(&mut d);
    assert_eq!(
        requests(&first, b)[0],
        br(0, 4, 4),
        "the partial piece first"
    );
    let all = run_to_end(&mut d, first, t0);
    assert!(!requests(&all, b).contains(&br(0, 0, 4)), "already written");
    assert_eq!(all.last(), Some(&Action::Finished(Ok(()))));
}

#[test]
fn stuck_after_losing_the_only_peer_asks_the_tracker_and_links_new_sharers() {
    let t0 = Instant::now();
    let (mut d, peers) = started(24, &[addr(1)], t0);
    let a = peers[0];
    d.on_accept(a, &full(3), t0);
    drain(&mut d);
    d.on_link_lost(a, "reset", t0 + ms(1));
    assert_eq!(drain(&mut d), vec![Action::QuerySharers]);
    // The answer: a new sharer (and the old one, which came back).
    d.on_sharers(&[addr(2), addr(1)], t0 + ms(2));
    let actions = drain(&mut d);
    let linked = connects(&actions);
    assert_eq!(
        linked.iter().map(|(_, x)| *x).collect::<Vec<_>>(),
        vec![addr(2), addr(1)]
    );
    assert_eq!(actions.len(), 4);
    assert_eq!(
        actions[1],
        Action::Send {
            peer: linked[0].0,
            msg: handshake()
        }
    );
    assert!(linked.iter().all(|(p, _)| *p != a), "new peer ids");
}

#[test]
fn stuck_without_new_sharers_fails_after_the_requeries_and_the_grace() {
    let t0 = Instant::now();
    let l = limits();
    let (mut d, peers) = started(24, &[addr(1)], t0);
    let a = peers[0];
    d.on_accept(a, &full(3), t0);
    drain(&mut d);
    d.on_link_lost(a, "reset", t0);
    assert_eq!(drain(&mut d), vec![Action::QuerySharers]);
    // Waiting for the answer: no timer.
    assert_eq!(d.next_deadline(), None);
    d.on_sharers(&[], t0 + ms(100));
    assert_eq!(drain(&mut d), vec![]);

    // Query 2 one interval after query 1.
    let q2 = t0 + l.requery_interval;
    assert_eq!(d.next_deadline(), Some(q2));
    d.on_tick(q2 - ms(1));
    assert_eq!(drain(&mut d), vec![]);
    d.on_tick(q2);
    assert_eq!(drain(&mut d), vec![Action::QuerySharers]);
    // The tracker cannot be reached this time.
    d.on_sharers_failed(q2 + ms(50));
    assert_eq!(drain(&mut d), vec![]);

    // Query 3 (the last one).
    let q3 = q2 + l.requery_interval;
    assert_eq!(d.next_deadline(), Some(q3));
    d.on_tick(q3);
    assert_eq!(drain(&mut d), vec![Action::QuerySharers]);
    d.on_sharers(&[], q3 + ms(10));
    assert_eq!(drain(&mut d), vec![]);

    // Then the grace, counted from the last query.
    let end = q3 + l.stuck_grace;
    assert_eq!(d.next_deadline(), Some(end));
    d.on_tick(end - ms(1));
    assert_eq!(drain(&mut d), vec![]);
    assert!(!d.is_finished());
    d.on_tick(end);
    let actions = drain(&mut d);
    assert_eq!(actions.len(), 1, "{actions:?}");
    let Action::Finished(Err(reason)) = &actions[0] else {
        panic!("expected a failure, got {actions:?}");
    };
    assert!(reason.to_string().contains("piece 0"), "{reason}");
    assert!(d.is_finished());
    assert_eq!(d.next_deadline(), None);
    d.on_sharers(&[addr(2)], end + secs(1));
    d.on_tick(end + secs(10));
    assert_eq!(drain(&mut d), vec![]);
}

#[test]
fn a_sharer_nobody_answers_for_fails_as_soon_as_before() {
    // A refused or unreachable connection is nobody there, not a sharer at its link cap:
    // the download gives up after its usual questions and grace, not `retry_dropped_for`.
    let t0 = Instant::now();
    let l = Limits {
        retry_dropped_for: secs(20),
        ..limits()
    };
    let mut d = Download::new(group(), meta(24), l.clone());
    d.start(&[addr(1)], t0);
    let mut now = t0;
    let mut actions = drain(&mut d);
    while !d.is_finished() && now - t0 < secs(30) {
        // Every connection attempt fails; every question is answered with the same sharer.
        for (peer, _) in connects(&actions) {
            d.on_connect_failed(peer, "connection refused", now);
        }
        if actions.contains(&Action::QuerySharers) {
            d.on_sharers(&[addr(1)], now);
        }
        actions = drain(&mut d);
        if actions.is_empty() {
            let Some(next) = d.next_deadline() else {
                panic!("no deadline at {:?}", now - t0);
            };
            now = next;
            d.on_tick(now);
            actions = drain(&mut d);
        }
    }
    assert!(d.is_finished());
    assert!(now - t0 < secs(10), "gave up at {:?}", now - t0);
}

#[test]
fn a_sharer_that_drops_links_before_the_handshake_is_retried_for_a_while() {
    // A sharer whose link cap is full of others' connections closes new ones at once: not
    // untrusted, so the download keeps asking and linking again (0, 1, 2, 4, 8, 12 ... s)
    // for `retry_dropped_for` after it got stuck, and goes on once a link is accepted.
    let t0 = Instant::now();
    let l = Limits {
        retry_dropped_for: secs(20),
        ..limits()
    };
    let mut d = Download::new(group(), meta(24), l.clone());
    d.start(&[addr(1)], t0);
    let mut peer = connects(&drain(&mut d))[0].0;
    let mut now = t0;
    let mut gaps = Vec::new();
    let mut last = now;
    loop {
        // Dropped before the handshake's answer.
        d.on_link_lost(peer, "reset", now);
        let actions = drain(&mut d);
        if !actions.contains(&Action::QuerySharers) {
            // Not yet: the next question comes at the deadline.
            assert!(actions.is_empty(), "{actions:?}");
            let Some(next) = d.next_deadline() else {
                panic!("no deadline while stuck");
            };
            now = next;
            d.on_tick(now);
            let actions = drain(&mut d);
            if d.is_finished() {
                assert!(
                    matches!(actions.last(), Some(Action::Finished(Err(_)))),
                    "{actions:?}"
                );
                break;
            }
            assert_eq!(actions, vec![Action::QuerySharers], "at {:?}", now - t0);
        }
        gaps.push(now - last);
        last = now;
        now += ms(10);
        d.on_sharers(&[addr(1)], now);
        let linked = connects(&drain(&mut d));
        assert_eq!(linked.len(), 1, "linked again at {:?}", now - t0);
        peer = linked[0].0;
    }
    // Asked at once, then twice 1 s apart (the 3 questions of before), then 2 s later, then
    // 4 s apart while another question fits in the 20 s since it got stuck; it gives up the
    // grace (2 s) after its last question.
    assert_eq!(gaps[0], Duration::ZERO);
    assert_eq!(&gaps[1..3], &[secs(1); 2], "{gaps:?}");
    assert_eq!(gaps[3], secs(2), "{gaps:?}");
    assert!(gaps[4..].iter().all(|g| *g == secs(4)), "{gaps:?}");
    let asked_until = last - t0;
    assert!(
        asked_until >= secs(16) && asked_until < secs(20),
        "{asked_until:?}"
    );
    assert_eq!(now - last, l.stuck_grace);

    // With the same drops, a sharer accepted before the end carries the download on.
    let mut d = Download::new(group(), meta(24), l.clone());
    d.start(&[addr(1)], t0);
    let peer = connects(&drain(&mut d))[0].0;
    d.on_link_lost(peer, "reset", t0);
    assert_eq!(drain(&mut d), vec![Action::QuerySharers]);
    // Past the old end (3 questions and the grace: 4 s): still asking.
    let mut now = t0;
    for _ in 0..5 {
        d.on_sharers(&[], now + ms(10));
        now = d.next_deadline().unwrap();
        d.on_tick(now);
    }
    assert!(!d.is_finished(), "gave up at {:?}", now - t0);
    assert!(now - t0 > secs(4));
    drain(&mut d);
    d.on_sharers(&[addr(1)], now + ms(1));
    let peer = connects(&drain(&mut d))[0].0;
    d.on_accept(peer, &full(3), now + ms(2));
    assert!(!requests(&drain(&mut d), peer).is_empty());
    assert!(!d.is_finished());
}

#[test]
fn a_sharer_the_tracker_keeps_listing_but_that_always_refuses_does_not_keep_it_alive() {
    let t0 = Instant::now();
    let l = limits();
    let (mut d, peers) = started(24, &[addr(1)], t0);
    let mut now = t0;
    d.on_refused(peers[0], "not sharing", now);
    let mut queries = 0;
    let mut connects_seen = 0;
    let mut result = None;
    for _ in 0..200 {
        let actions = drain(&mut d);
        for a in &actions {
            match a {
                Action::Connect { peer, .. } => {
                    connects_seen += 1;
                    now += ms(20);
                    d.on_refused(*peer, "not sharing", now);
                }
                Action::QuerySharers => {
                    queries += 1;
                    now += ms(20);
                    d.on_sharers(&[addr(1)], now);
                }
                Action::Finished(r) => result = Some(r.clone()),
                _ => {}
            }
        }
        if result.is_some() {
            break;
        }
        if actions.is_empty() {
            let t = d.next_deadline().expect("a timer while stuck");
            assert!(t > now, "a deadline in the past");
            now = t;
            d.on_tick(now);
        }
    }
    assert!(
        matches!(result, Some(Err(_))),
        "{result:?} after {queries} queries"
    );
    assert_eq!(queries, l.max_requeries as usize);
    assert_eq!(connects_seen, l.max_requeries as usize);
    assert!(now < t0 + secs(10));
}

// ---------------------------------------------------------------------------------------------
// Timers
// ---------------------------------------------------------------------------------------------

#[test]
fn connect_timeout_closes_the_link_and_counts_as_lost() {
    let t0 = Instant::now();
    let l = limits();
    let (mut d, peers) = started(24, &[addr(1)], t0);
    let a = peers[0];
    assert_eq!(d.next_deadline(), Some(t0 + l.connect_timeout));
    d.on_tick(t0 + l.connect_timeout - ms(1));
    assert_eq!(drain(&mut d), vec![]);
    d.on_tick(t0 + l.connect_timeout);
    assert_eq!(
        drain(&mut d),
        vec![Action::Close { peer: a }, Action::QuerySharers]
    );
    // A late accept is ignored; the address may be tried again.
    d.on_accept(a, &full(3), t0 + l.connect_timeout);
    assert_eq!(drain(&mut d), vec![]);
    d.on_sharers(&[addr(1)], t0 + l.connect_timeout + ms(1));
    assert_eq!(connects(&drain(&mut d)).len(), 1);
}

#[test]
fn stall_timeout_closes_a_silent_link() {
    let t0 = Instant::now();
    let stall = limits().stall_timeout;
    let (mut d, peers) = started(48, &[addr(1), addr(2)], t0);
    let (a, b) = (peers[0], peers[1]);
    d.on_accept(a, &full(6), t0);
    d.on_accept(b, &full(6), t0);
    let first = drain(&mut d);
    assert_eq!(d.next_deadline(), Some(t0 + stall));
    // `a` delivers at t0 + 5 s; `b` says nothing.
    let r = requests(&first, a)[0];
    deliver(&mut d, a, r, t0 + secs(5));
    drain(&mut d);
    d.on_tick(t0 + stall - ms(1));
    assert_eq!(drain(&mut d), vec![]);
    d.on_tick(t0 + stall);
    assert_eq!(drain(&mut d), vec![Action::Close { peer: b }]);
    assert_eq!(d.next_deadline(), Some(t0 + secs(5) + stall));
    // Data still flowing on a long block keeps `a` alive.
    d.on_data(a, t0 + secs(19));
    assert_eq!(d.next_deadline(), Some(t0 + secs(19) + stall));
    d.on_tick(t0 + secs(19) + stall);
    assert_eq!(
        drain(&mut d),
        vec![Action::Close { peer: a }, Action::QuerySharers]
    );
    // Both may be tried again.
    d.on_sharers(&[addr(1), addr(2)], t0 + secs(40));
    assert_eq!(connects(&drain(&mut d)).len(), 2);
}

#[test]
fn an_idle_link_sets_no_deadline_in_the_past() {
    let t0 = Instant::now();
    let stall = limits().stall_timeout;
    let (mut d, peers) = started(24, &[addr(1), addr(2)], t0);
    let (a, b) = (peers[0], peers[1]);
    d.on_accept(a, &full(3), t0);
    // `b` holds nothing: no requests, nothing to stall on.
    d.on_accept(b, &only(3, &[]), t0);
    let first = drain(&mut d);
    assert!(requests(&first, b).is_empty());
    d.on_data(a, t0 + secs(10));
    let now = t0 + stall + secs(1);
    d.on_tick(now);
    assert_eq!(drain(&mut d), vec![]);
    assert_eq!(d.progress().active_peers, 2);
    let next = d.next_deadline().unwrap();
    assert!(next > now, "deadline {:?} before now", next - now);
    assert_eq!(next, t0 + secs(10) + stall);
}

#[test]
fn an_idle_link_given_work_gets_a_fresh_stall_clock() {
    let t0 = Instant::now();
    let stall = limits().stall_timeout;
    let (mut d, peers) = started(24, &[addr(1), addr(2)], t0);
    let (a, b) = (peers[0], peers[1]);
    d.on_accept(a, &only(3, &[0, 1]), t0);
    d.on_accept(b, &only(3, &[]), t0);
    drain(&mut d);
    // `a` is busy (slowly); `b` has been idle for 20 s when it announces piece 2.
    d.on_data(a, t0 + secs(10));
    d.on_data(a, t0 + secs(20));
    d.on_have(b, 2, t0 + secs(20));
    assert_eq!(requests(&drain(&mut d), b).len(), 2);
    d.on_tick(t0 + secs(21));
    assert_eq!(drain(&mut d), vec![], "`b` was asked one second ago");
    assert_eq!(d.next_deadline(), Some(t0 + secs(20) + stall));
    d.on_tick(t0 + secs(20) + stall);
    assert_eq!(
        closes(&drain(&mut d)),
        vec![a, b],
        "both silent for a whole stall timeout"
    );
}

// ---------------------------------------------------------------------------------------------
// End-game
// ---------------------------------------------------------------------------------------------

#[test]
fn end_game_cancels_the_losers_copy() {
    let t0 = Instant::now();
    let (mut d, peers) = started(8, &[addr(1), addr(2)], t0);
    let (a, b) = (peers[0], peers[1]);
    d.on_accept(a, &full(1), t0);
    assert_eq!(requests(&drain(&mut d), a), vec![br(0, 0, 4), br(0, 4, 4)]);
    // Every block is requested: `b` asks for one again, the last of `a`'s queue.
    d.on_accept(b, &full(1), t0);
    assert_eq!(requests(&drain(&mut d), b), vec![br(0, 4, 4)]);

    // `a` delivers block 0, which only it was asked for: no cancel.
    assert_eq!(deliver(&mut d, a, br(0, 0, 4), t0), Verdict::Write);
    let actions = drain(&mut d);
    assert!(cancels(&actions, a).is_empty() && cancels(&actions, b).is_empty());
    assert!(requests(&actions, a).is_empty(), "nothing left to ask");
    // `b` wins block 1: `a` is told to cancel it, and the piece is complete.
    assert_eq!(deliver(&mut d, b, br(0, 4, 4), t0), Verdict::Write);
    let actions = drain(&mut d);
    assert_eq!(cancels(&actions, a), vec![br(0, 4, 4)]);
    assert!(actions.contains(&Action::Verify { piece: 0 }));
    // A copy crossing the cancel is discarded, and counted.
    assert_eq!(d.on_block_header(a, 0, 4, 4, t0), Verdict::Discard);
    assert_eq!(d.picker().outstanding(a), 0);
    assert_eq!(d.picker().outstanding(b), 0);
    let waste = d.waste();
    assert_eq!(
        (
            waste.received_bytes,
            waste.discarded_blocks,
            waste.discarded_bytes
        ),
        (12, 1, 4)
    );
    assert_eq!(
        (waste.seconds.endgame, waste.seconds.relief, waste.cancels),
        (1, 0, 1)
    );
    assert_eq!(waste.fraction(), 0.5);
    d.on_piece_checked(0, true, t0);
    let end = drain(&mut d);
    assert_eq!(end.first(), Some(&Action::Verified { piece: 0 }));
    assert_eq!(end.last(), Some(&Action::Finished(Ok(()))));
}

#[test]
fn end_game_copy_arriving_during_the_winners_write_needs_no_cancel() {
    let t0 = Instant::now();
    let (mut d, peers) = started(8, &[addr(1), addr(2)], t0);
    let (a, b) = (peers[0], peers[1]);
    d.on_accept(a, &full(1), t0);
    d.on_accept(b, &full(1), t0);
    // `b` was asked for block 1 again (the end-game).
    assert_eq!(requests(&drain(&mut d), b), vec![br(0, 4, 4)]);
    assert_eq!(d.on_block_header(a, 0, 4, 4, t0), Verdict::Write);
    assert_eq!(d.on_block_header(b, 0, 4, 4, t0), Verdict::Discard);
    d.on_block_written(a, 0, 4, 4);
    let actions = drain(&mut d);
    assert!(cancels(&actions, b).is_empty(), "{actions:?}");
    assert_eq!(d.picker().outstanding(b), 0);
}

// ---------------------------------------------------------------------------------------------
// The end
// ---------------------------------------------------------------------------------------------

/// Feeds every kind of event to a finished download and checks that nothing comes out.
fn assert_silent_after_the_end(d: &mut Download, peers: &[PeerId], now: Instant) {
    for &p in peers {
        d.on_accept(p, &full(3), now);
        d.on_have(p, 1, now);
        assert_eq!(d.on_block_header(p, 1, 0, 4, now), Verdict::Discard);
        d.on_block_written(p, 1, 0, 4);
        d.on_data(p, now);
        d.on_rejected(p, br(1, 0, 4), now);
        d.on_refused(p, "bye", now);
        d.on_link_lost(p, "bye", now);
    }
    for piece in 0..3 {
        d.on_piece_checked(piece, true, now);
        d.on_piece_checked(piece, false, now);
    }
    d.on_sharers(&[addr(1), addr(7)], now);
    d.on_sharers_failed(now);
    d.on_tick(now + secs(1000));
    d.abort("again");
    assert_eq!(drain(d), vec![]);
    assert_eq!(d.next_deadline(), None);
    assert!(d.is_finished());
}

#[test]
fn nothing_follows_a_successful_finish() {
    let t0 = Instant::now();
    let (mut d, peers) = started(24, &[addr(1), addr(2)], t0);
    d.on_accept(peers[0], &full(3), t0);
    let first = drain(&mut d);
    let all = run_to_end(&mut d, first, t0);
    assert_eq!(all.last(), Some(&Action::Finished(Ok(()))));
    assert_eq!(
        all.iter()
            .filter(|a| matches!(a, Action::Finished(_)))
            .count(),
        1
    );
    // Both links (one still opening) were closed before the end.
    let closed: BTreeSet<PeerId> = closes(&all).into_iter().collect();
    assert_eq!(closed, peers.iter().copied().collect());
    assert_silent_after_the_end(&mut d, &peers, t0 + secs(1));
}

#[test]
fn nothing_follows_an_abort_not_even_a_late_verdict() {
    let t0 = Instant::now();
    let (mut d, peers) = started(24, &[addr(1)], t0);
    let a = peers[0];
    d.on_accept(a, &full(3), t0);
    drain(&mut d);
    deliver(&mut d, a, br(0, 0, 4), t0);
    deliver(&mut d, a, br(0, 4, 4), t0);
    assert!(drain(&mut d).contains(&Action::Verify { piece: 0 }));
    d.abort("the user logged out");
    assert_eq!(
        drain(&mut d),
        vec![
            Action::Close { peer: a },
            Action::Finished(Err(GiveUp::Aborted("the user logged out".into())))
        ]
    );
    // The hasher's verdict on piece 0 arrives afterwards.
    d.on_piece_checked(0, true, t0 + ms(1));
    assert_eq!(drain(&mut d), vec![]);
    assert_silent_after_the_end(&mut d, &peers, t0 + ms(2));
}

#[test]
fn bitfield_of_lists_the_verified_pieces() {
    let t0 = Instant::now();
    let (mut d, peers) = started(24, &[addr(1)], t0);
    let a = peers[0];
    d.on_accept(a, &full(3), t0);
    drain(&mut d);
    deliver(&mut d, a, br(0, 0, 4), t0);
    deliver(&mut d, a, br(0, 4, 4), t0);
    drain(&mut d);
    d.on_piece_checked(0, true, t0);
    let bits = bitfield_of(d.picker());
    assert_eq!(bits.len(), 3);
    assert_eq!(bits.iter_ones().collect::<Vec<_>>(), vec![0]);
}

// ---------------------------------------------------------------------------------------------
// Randomized simulation
// ---------------------------------------------------------------------------------------------

use crate::rng::SplitMix64 as SplitMix;

struct FakeSharer {
    addr: SocketAddr,
    has: Vec<bool>,
    corrupt: bool,
}

/// The sharer's end of a link.
struct FakeLink {
    sharer: usize,
    handshaken: bool,
    accepted: bool,
    /// Never answers again (a connect or stall timeout must end it).
    mute: bool,
    /// Requests not served yet, plus cancelled ones whose data was already on the way.
    queue: Vec<BlockRef>,
    /// Requests the engine counts as outstanding: sent, not cancelled, not discarded on
    /// arrival, not yet written.
    expected: HashSet<BlockRef>,
}

struct Sim {
    seed: u64,
    rng: SplitMix,
    d: Download,
    now: Instant,
    depth: usize,
    block_len: u32,
    n_blocks: Vec<usize>,
    sharers: Vec<FakeSharer>,
    links: BTreeMap<PeerId, FakeLink>,
    /// Every peer id ever handed out, with its sharer.
    peer_sharer: BTreeMap<PeerId, usize>,
    /// Headers answered with `Write` whose data is not written yet.
    writes: Vec<(PeerId, BlockRef)>,
    /// Per piece and block: the peer whose data is in the file (since the last reset).
    written: Vec<Vec<Option<PeerId>>>,
    verifying: Vec<u32>,
    /// Passed the hasher, `Verified` not seen yet.
    passed: BTreeSet<u32>,
    verified: BTreeSet<u32>,
    query_pending: bool,
    banned: BTreeSet<usize>,
    trouble_left: u32,
    result: Option<Result<(), GiveUp>>,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = SplitMix(seed);
        let block_len = 4;
        let piece_len = block_len * (1 + rng.below(3) as u32);
        let n_pieces = 2 + rng.below(9);
        let size =
            (n_pieces as u64 - 1) * u64::from(piece_len) + 1 + rng.below(piece_len as usize) as u64;
        let depth = 1 + rng.below(4);
        let limits = Limits {
            block_len,
            depth,
            min_depth: 1,
            max_depth: depth,
            queue_time: ms(1 + rng.below(2000) as u64),
            connect_timeout: secs(10),
            stall_timeout: secs(15),
            requery_interval: secs(1),
            max_requeries: 5,
            stuck_grace: secs(2),
            ..Limits::default().without_discovery()
        };
        let n_sharers = 2 + rng.below(4);
        let mut sharers: Vec<FakeSharer> = (0..n_sharers)
            .map(|i| FakeSharer {
                addr: addr(i as u16 + 1),
                has: (0..n_pieces).map(|_| rng.percent(50)).collect(),
                corrupt: false,
            })
            .collect();
        for piece in 0..n_pieces {
            if !sharers.iter().any(|s| s.has[piece]) {
                let s = rng.below(n_sharers);
                sharers[s].has[piece] = true;
            }
        }
        if rng.percent(50) {
            let s = rng.below(n_sharers);
            sharers[s].corrupt = true;
        }
        let m = meta_with(size, piece_len);
        let d = Download::new(group(), m, limits);
        let n_blocks: Vec<usize> = (0..n_pieces as u32)
            .map(|p| d.picker().piece_size(p).unwrap().div_ceil(block_len) as usize)
            .collect();
        Sim {
            seed,
            rng,
            d,
            now: Instant::now(),
            depth,
            block_len,
            written: n_blocks.iter().map(|&n| vec![None; n]).collect(),
            n_blocks,
            sharers,
            links: BTreeMap::new(),
            peer_sharer: BTreeMap::new(),
            writes: Vec::new(),
            verifying: Vec::new(),
            passed: BTreeSet::new(),
            verified: BTreeSet::new(),
            query_pending: false,
            banned: BTreeSet::new(),
            trouble_left: 2,
            result: None,
        }
    }

    fn n_pieces(&self) -> usize {
        self.n_blocks.len()
    }

    fn honest_cover(&self) -> bool {
        (0..self.n_pieces()).all(|p| self.sharers.iter().any(|s| !s.corrupt && s.has[p]))
    }

    fn is_corrupt(&self, peer: PeerId) -> bool {
        self.sharers[self.peer_sharer[&peer]].corrupt
    }

    fn block_idx(&self, b: &BlockRef) -> usize {
        (b.offset / self.block_len) as usize
    }

    /// Performs the engine's actions and checks the invariants.
    fn pump(&mut self) {
        while let Some(action) = self.d.poll_action() {
            assert!(self.result.is_none(), "{action:?} after Finished");
            match action {
                Action::Connect { peer, addr } => {
                    let s = self
                        .sharers
                        .iter()
                        .position(|x| x.addr == addr)
                        .expect("unknown address");
                    assert!(!self.banned.contains(&s), "banned address {addr} linked");
                    assert!(
                        !self.links.values().any(|l| l.sharer == s),
                        "address {addr} linked twice"
                    );
                    assert!(self.peer_sharer.insert(peer, s).is_none(), "peer id reused");
                    self.links.insert(
                        peer,
                        FakeLink {
                            sharer: s,
                            handshaken: false,
                            accepted: false,
                            mute: false,
                            queue: Vec::new(),
                            expected: HashSet::new(),
                        },
                    );
                }
                Action::Send { peer, msg } => {
                    let link = self.links.get_mut(&peer).expect("send on an unknown link");
                    match msg {
                        DownloaderMsg::Ticket(_) => panic!("the engine sends no ticket"),
                        DownloaderMsg::Handshake { .. } => {
                            assert!(!link.handshaken, "second handshake");
                            link.handshaken = true;
                        }
                        DownloaderMsg::Request(b) => {
                            assert!(link.accepted, "request before the accept");
                            assert!(
                                self.sharers[link.sharer].has[b.piece as usize],
                                "request for a piece the sharer does not hold"
                            );
                            assert!(link.expected.insert(b), "{b:?} requested twice");
                            assert!(
                                link.expected.len() <= self.depth,
                                "more than {} requests outstanding",
                                self.depth
                            );
                            link.queue.push(b);
                        }
                        DownloaderMsg::Cancel(b) => {
                            assert!(link.expected.remove(&b), "cancel of {b:?}, not outstanding");
                            // Sometimes the data is already on its way.
                            if !self.rng.percent(30) {
                                link.queue.retain(|x| *x != b);
                            }
                        }
                    }
                }
                Action::Close { peer } => {
                    self.links.remove(&peer);
                    self.writes.retain(|(p, _)| *p != peer);
                }
                Action::Verify { piece } => {
                    let p = piece as usize;
                    assert!(
                        self.written[p].iter().all(Option::is_some),
                        "verify of piece {piece} with blocks missing"
                    );
                    assert!(
                        !self.verifying.contains(&piece),
                        "piece {piece} verified twice"
                    );
                    assert!(!self.verified.contains(&piece) && !self.passed.contains(&piece));
                    self.verifying.push(piece);
                }
                Action::Verified { piece } => {
                    assert!(
                        self.passed.remove(&piece),
                        "verified {piece} without passing"
                    );
                    self.verified.insert(piece);
                }
                Action::QuerySharers => {
                    assert!(!self.query_pending, "two queries at once");
                    self.query_pending = true;
                }
                Action::Finished(r) => self.result = Some(r),
            }
        }
        self.check();
    }

    fn check(&mut self) {
        // Bans: only corrupt sharers, and their links are all closed.
        let newly: Vec<(PeerId, usize)> = self
            .peer_sharer
            .iter()
            .filter(|(p, s)| self.d.picker().is_banned(**p) && !self.banned.contains(s))
            .map(|(p, s)| (*p, *s))
            .collect();
        for (peer, s) in newly {
            assert!(self.sharers[s].corrupt, "honest sharer {s} banned");
            self.banned.insert(s);
            // Its blocks of unfinished pieces are dropped (they are downloaded again).
            for (p, blocks) in self.written.iter_mut().enumerate() {
                let p32 = p as u32;
                if self.verifying.contains(&p32)
                    || self.passed.contains(&p32)
                    || self.verified.contains(&p32)
                {
                    continue;
                }
                for w in blocks.iter_mut() {
                    if *w == Some(peer) {
                        *w = None;
                    }
                }
            }
        }
        for (peer, link) in &self.links {
            assert!(
                !self.banned.contains(&link.sharer),
                "link {peer:?} to a banned sharer still open"
            );
            assert_eq!(
                link.expected.len(),
                self.d.picker().outstanding(*peer),
                "seed {}: outstanding requests of {peer:?}",
                self.seed
            );
        }
    }

    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.rng.below(v.len())]
    }

    /// One random event; false if there was nothing to do but wait.
    fn step(&mut self) -> bool {
        self.now += ms(self.rng.below(20) as u64);
        let now = self.now;
        let live = |l: &FakeLink| !l.mute;
        let to_accept: Vec<PeerId> = self
            .links
            .iter()
            .filter(|(_, l)| live(l) && l.handshaken && !l.accepted)
            .map(|(p, _)| *p)
            .collect();
        let serving: Vec<PeerId> = self
            .links
            .iter()
            .filter(|(_, l)| live(l) && l.accepted && !l.queue.is_empty())
            .map(|(p, _)| *p)
            .collect();
        let mut options = Vec::new();
        if !to_accept.is_empty() {
            options.push(0);
        }
        if !serving.is_empty() {
            options.extend([1, 1, 1]);
        }
        if !self.writes.is_empty() {
            options.extend([2, 2]);
        }
        if !self.verifying.is_empty() {
            options.push(3);
        }
        if self.query_pending {
            options.push(4);
        }
        if options.is_empty() {
            return false;
        }
        if self.trouble_left > 0 && !self.links.is_empty() && self.rng.percent(2) {
            options.push(5);
        }
        if self.rng.percent(3) {
            options.push(6);
        }
        match self.pick(&options) {
            0 => {
                let peer = self.pick(&to_accept);
                let s = self.links[&peer].sharer;
                self.links.get_mut(&peer).unwrap().accepted = true;
                let has = self.sharers[s].has.clone();
                // Sometimes some pieces are announced later with `have`.
                let later: Vec<u32> = (0..has.len() as u32)
                    .filter(|&p| has[p as usize] && self.rng.percent(20))
                    .collect();
                let mut bits = Bitfield::new(has.len());
                for (p, &h) in has.iter().enumerate() {
                    if h && !later.contains(&(p as u32)) {
                        bits.set(p);
                    }
                }
                self.d.on_accept(peer, &bits, now);
                self.pump();
                for p in later {
                    self.d.on_have(peer, p, now);
                    self.pump();
                }
            }
            1 => {
                let peer = self.pick(&serving);
                let link = self.links.get_mut(&peer).unwrap();
                let i = self.rng.below(link.queue.len());
                let b = link.queue.remove(i);
                let verdict = self.d.on_block_header(peer, b.piece, b.offset, b.len, now);
                let link = self.links.get_mut(&peer).unwrap();
                match verdict {
                    Verdict::Write => {
                        assert!(link.expected.contains(&b), "unexpected {b:?} written");
                        self.writes.push((peer, b));
                    }
                    Verdict::Discard => {
                        // A discarded copy consumes the request, unless it is a second copy
                        // of a block this peer's first copy of is being written (a cancelled
                        // copy still on the way, then the same block asked again).
                        if !self.writes.contains(&(peer, b)) {
                            link.expected.remove(&b);
                        }
                        self.d.on_data(peer, now);
                    }
                }
                self.pump();
            }
            2 => {
                let (peer, b) = self.writes.remove(self.rng.below(self.writes.len()));
                self.d.on_block_written(peer, b.piece, b.offset, b.len);
                if let Some(link) = self.links.get_mut(&peer) {
                    link.expected.remove(&b);
                }
                let idx = self.block_idx(&b);
                self.written[b.piece as usize][idx] = Some(peer);
                self.pump();
            }
            3 => {
                let piece = self.verifying.remove(self.rng.below(self.verifying.len()));
                let blocks = self.written[piece as usize].clone();
                let ok = blocks.iter().all(|w| !self.is_corrupt(w.unwrap()));
                if ok {
                    self.passed.insert(piece);
                } else {
                    self.written[piece as usize] = vec![None; blocks.len()];
                }
                self.d.on_piece_checked(piece, ok, now);
                self.pump();
            }
            4 => {
                self.query_pending = false;
                if self.rng.percent(10) {
                    self.d.on_sharers_failed(now);
                } else {
                    let mut list: Vec<SocketAddr> = self.sharers.iter().map(|s| s.addr).collect();
                    if self.rng.percent(20) {
                        let extra = self.pick(&list);
                        list.push(extra);
                    }
                    self.rng.shuffle(&mut list);
                    self.d.on_sharers(&list, now);
                }
                self.pump();
            }
            5 => {
                // Trouble: a link breaks, is refused, or goes silent.
                self.trouble_left -= 1;
                let peers: Vec<PeerId> = self.links.keys().copied().collect();
                let peer = self.pick(&peers);
                match self.rng.below(3) {
                    0 => {
                        self.links.remove(&peer);
                        self.writes.retain(|(p, _)| *p != peer);
                        self.d.on_link_lost(peer, "reset", now);
                    }
                    1 if !self.links[&peer].accepted => {
                        self.d.on_refused(peer, "no", now);
                    }
                    _ => self.links.get_mut(&peer).unwrap().mute = true,
                }
                self.pump();
            }
            _ => {
                self.d.on_tick(now);
                self.pump();
            }
        }
        true
    }

    fn run(&mut self, seed: u64) {
        let mut addrs: Vec<SocketAddr> = self
            .sharers
            .iter()
            .filter(|_| self.rng.percent(70))
            .map(|s| s.addr)
            .collect();
        if addrs.len() > 1 && self.rng.percent(20) {
            addrs.push(addrs[0]);
        }
        self.d.start(&addrs, self.now);
        self.pump();
        let mut idle_ticks = 0;
        for _ in 0..50_000 {
            if self.result.is_some() {
                return;
            }
            if self.step() {
                idle_ticks = 0;
                continue;
            }
            // Nothing to do but wait for the engine's next timer.
            let deadline = self
                .d
                .next_deadline()
                .unwrap_or_else(|| panic!("seed {seed}: hung with no timer"));
            if deadline > self.now {
                self.now = deadline;
                idle_ticks = 0;
            } else {
                idle_ticks += 1;
                assert!(idle_ticks < 3, "seed {seed}: the deadline does not move");
            }
            self.d.on_tick(self.now);
            self.pump();
        }
        panic!("seed {seed}: not finished");
    }
}

#[test]
fn randomized_downloads() {
    let mut outcomes = [0usize; 2];
    for seed in 0..100u64 {
        let mut sim = Sim::new(seed);
        sim.run(seed);
        let result = sim.result.clone().unwrap();
        let expect_ok = sim.honest_cover();
        assert_eq!(
            result.is_ok(),
            expect_ok,
            "seed {seed}: {result:?}, honest cover: {expect_ok}"
        );
        if result.is_ok() {
            assert_eq!(sim.verified.len(), sim.n_pieces(), "seed {seed}");
            let p = sim.d.progress();
            assert_eq!(p.bytes_verified, p.size, "seed {seed}");
            assert!(sim.passed.is_empty());
        }
        outcomes[usize::from(result.is_ok())] += 1;
        // Nothing after the end, whatever comes in.
        let now = sim.now + secs(1);
        for (peer, b) in std::mem::take(&mut sim.writes) {
            sim.d.on_block_written(peer, b.piece, b.offset, b.len);
        }
        for piece in std::mem::take(&mut sim.verifying) {
            sim.d.on_piece_checked(piece, true, now);
        }
        let all: Vec<SocketAddr> = sim.sharers.iter().map(|s| s.addr).collect();
        sim.d.on_sharers(&all, now);
        sim.d.on_tick(now + secs(100));
        assert_eq!(
            sim.d.poll_action(),
            None,
            "seed {seed}: action after Finished"
        );
        assert_eq!(sim.d.next_deadline(), None);
    }
    // Both kinds of ending were exercised.
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
}

// ---------------------------------------------------------------------------------------------
// Resuming a `.part`
// ---------------------------------------------------------------------------------------------

/// Pieces a resumed `.part` may hold are verified, not fetched; one that fails is fetched and
/// nobody is banned for it; the download then ends with every piece verified once.
#[test]
fn resumed_pieces_are_verified_not_fetched() {
    let t0 = Instant::now();
    let n = 4u32;
    let mut d = download(u64::from(PIECE) * u64::from(n));
    d.resume([0, 2, 2, 99]);
    d.start(&[addr(1)], t0);
    let first = drain(&mut d);
    let verifies: Vec<u32> = first
        .iter()
        .filter_map(|a| match a {
            Action::Verify { piece } => Some(*piece),
            _ => None,
        })
        .collect();
    assert_eq!(verifies, [0, 2], "each once, none out of range: {first:?}");
    let a = connects(&first)[0].0;
    d.on_accept(a, &full(n), t0);
    let mut pending = drain(&mut d);
    let asked: BTreeSet<u32> = requests(&pending, a).iter().map(|b| b.piece).collect();
    assert!(!asked.contains(&0) && !asked.contains(&2), "{asked:?}");
    // Piece 0 holds up; piece 2 does not and is fetched like any missing piece.
    d.on_piece_checked(0, true, t0);
    d.on_piece_checked(2, false, t0);
    let after = drain(&mut d);
    assert!(after.contains(&Action::Verified { piece: 0 }), "{after:?}");
    assert!(closes(&after).is_empty(), "nobody is blamed: {after:?}");
    assert!(!d.picker().is_banned(a));
    pending.extend(after);
    let seen = run_to_end(&mut d, pending, t0);
    let fetched: BTreeSet<u32> = seen
        .iter()
        .filter_map(|x| match x {
            Action::Send {
                msg: DownloaderMsg::Request(b),
                ..
            } => Some(b.piece),
            _ => None,
        })
        .chain(asked)
        .collect();
    assert_eq!(fetched, [1, 2, 3].into_iter().collect(), "{seen:?}");
    assert!(seen.contains(&Action::Finished(Ok(()))), "{seen:?}");
    assert_eq!(d.progress().pieces_verified, n);
}

// ---------------------------------------------------------------------------------------------
// Swarms: live discovery, bounded links, refusals, deferred pieces
// ---------------------------------------------------------------------------------------------

fn swarm_limits() -> Limits {
    Limits {
        block_len: BLOCK,
        depth: 3,
        min_depth: 3,
        max_depth: 3,
        max_links: 2,
        ..Limits::default()
    }
}

fn swarm_download(limits: Limits, addrs: &[SocketAddr], now: Instant) -> (Download, Vec<Action>) {
    let mut d = Download::new(group(), meta(24), limits);
    d.start(addrs, now);
    let actions = drain(&mut d);
    (d, actions)
}

#[test]
fn live_discovery_asks_again_and_backs_off_while_nobody_new_appears() {
    let t0 = Instant::now();
    let l = swarm_limits();
    let (mut d, actions) = swarm_download(l.clone(), &[addr(1)], t0);
    let a = connects(&actions)[0].0;
    d.on_accept(a, &full(3), t0);
    drain(&mut d);
    let mut now = t0;
    let mut gaps = Vec::new();
    for _ in 0..5 {
        let t = d.next_deadline().expect("a discovery timer");
        gaps.push(t - now);
        d.on_tick(t);
        assert_eq!(n_queries(&drain(&mut d)), 1, "asked at {:?}", t - t0);
        // Waiting for the answer: only the link's stall timer is left.
        assert!(d.next_deadline().is_some_and(|n| n > t + l.discover_max));
        d.on_sharers(&[addr(1)], t);
        now = t;
    }
    assert_eq!(gaps, vec![ms(250), ms(500), secs(1), secs(1), secs(1)]);
    // Someone new: linked at once, and the interval starts over.
    d.on_sharers(&[addr(1), addr(2)], now);
    assert_eq!(connects(&drain(&mut d)).len(), 1);
    assert_eq!(d.next_deadline(), Some(now + l.discover_min));
}

#[test]
fn links_are_bounded_and_the_slowest_is_replaced() {
    let t0 = Instant::now();
    let l = swarm_limits();
    let (mut d, actions) = swarm_download(l.clone(), &[addr(1), addr(2), addr(3)], t0);
    let linked = connects(&actions);
    assert_eq!(linked.len(), 2, "max_links");
    let (slow, fast) = (linked[0].0, linked[1].0);
    let mut now = t0;
    d.on_accept(slow, &full(3), now);
    d.on_accept(fast, &full(3), now);
    drain(&mut d);
    // The fast link delivers ten times as much over a few rate windows.
    for step in 1..=8u64 {
        now = t0 + ms(300 * step);
        for (peer, n) in [(fast, 10), (slow, 1)] {
            d.on_block_header(peer, 0, 0, n * 1000, now);
        }
    }
    let rotation = t0 + l.rotate_interval;
    d.on_tick(rotation - ms(1));
    d.on_sharers(&[addr(1), addr(2), addr(3)], rotation - ms(1));
    assert!(
        connects(&drain(&mut d)).is_empty(),
        "no rotation before its time"
    );
    assert!(d.next_deadline().is_some_and(|t| t <= rotation));
    d.on_tick(rotation);
    let actions = drain(&mut d);
    assert_eq!(closes(&actions), vec![slow]);
    let new: Vec<SocketAddr> = connects(&actions).into_iter().map(|(_, a)| a).collect();
    assert_eq!(new.len(), 1);
    assert!(!linked.iter().any(|(_, a)| *a == new[0]), "a new sharer");
}

#[test]
fn a_refusing_sharer_rests_longer_each_time_then_is_dropped() {
    let t0 = Instant::now();
    let l = swarm_limits();
    let (mut d, actions) = swarm_download(l.clone(), &[addr(1), addr(2)], t0);
    let linked = connects(&actions);
    let mut peer = linked[0].0;
    // The other sharer serves (so the download is never stuck), slowly.
    d.on_accept(linked[1].0, &full(3), t0);
    let mut now = t0;
    let mut tried_at = vec![now];
    loop {
        d.on_refused(peer, "not shared", now);
        drain(&mut d);
        // The tracker keeps listing it; it is linked again only after its rest.
        let mut relinked = None;
        for _ in 0..400 {
            now += ms(50);
            d.on_sharers(&[addr(1), addr(2)], now);
            if let Some((p, _)) = connects(&drain(&mut d)).first() {
                relinked = Some(*p);
                break;
            }
        }
        match relinked {
            Some(p) => {
                peer = p;
                tried_at.push(now);
            }
            None => break,
        }
    }
    let rests: Vec<Duration> = tried_at.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(rests.len() as u32, l.max_refusals - 1, "{rests:?}");
    assert!(rests[0] >= l.refused_backoff && rests[0] < l.refused_backoff + ms(100));
    assert!(rests[1] >= 2 * l.refused_backoff && rests[1] < 2 * l.refused_backoff + ms(100));
}

#[test]
fn a_declined_piece_is_asked_of_that_sharer_again_after_a_rest() {
    let t0 = Instant::now();
    let l = swarm_limits();
    let (mut d, actions) = swarm_download(l.clone(), &[addr(1)], t0);
    let a = connects(&actions)[0].0;
    d.on_accept(a, &full(3), t0);
    let first = requests(&drain(&mut d), a);
    assert_eq!(first[0], br(0, 0, 4));
    // Piece 0 declined: other pieces are asked for meanwhile, and the download is not stuck.
    d.on_rejected(a, first[0], t0);
    let next = requests(&drain(&mut d), a);
    assert!(next.iter().all(|b| b.piece != 0), "{next:?}");
    assert!(d.next_deadline().is_some_and(|t| t <= t0 + l.reject_rest));
    // Everything else arrives.
    let mut now = t0 + ms(10);
    for b in first.iter().skip(1).chain(next.iter()) {
        deliver(&mut d, a, *b, now);
    }
    for a in drain(&mut d) {
        if let Action::Verify { piece } = a {
            d.on_piece_checked(piece, true, now);
        }
    }
    drain(&mut d);
    now = t0 + l.reject_rest;
    d.on_tick(now);
    let again = requests(&drain(&mut d), a);
    assert!(again.contains(&br(0, 0, 4)), "{again:?}");
    assert!(!d.is_finished());
}
