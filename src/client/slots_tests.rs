//! Tests of the upload slot policy: grants at once without contention, turns and rotation with
//! it, the least-sent piece first, cancels, closed links, the per-link bound.

use super::*;

const B: u32 = 128 * 1024;

fn file() -> Sha1Digest {
    Sha1Digest([7; 20])
}

fn block(piece: u32, idx: u32) -> BlockRef {
    BlockRef {
        piece,
        offset: idx * B,
        len: B,
    }
}

fn limits(slots: usize) -> SlotLimits {
    SlotLimits {
        slots,
        turn_bytes: 4 * u64::from(B),
        max_held: 8,
        line: usize::MAX,
        superseed: true,
    }
}

fn grants(s: &mut UploadSlots<u32>) -> Vec<(u32, u32, u32)> {
    std::iter::from_fn(|| s.poll_grant())
        .map(|g| match g {
            Grant::Send { link, block, .. } => (link, block.piece, block.offset / B),
            Grant::Reject { .. } => panic!("unexpected reject {g:?}"),
        })
        .collect()
}

/// Grants and rejects: (link, piece, block index, sent).
fn answers(s: &mut UploadSlots<u32>) -> Vec<(u32, u32, u32, bool)> {
    std::iter::from_fn(|| s.poll_grant())
        .map(|g| match g {
            Grant::Send { link, block, .. } => (link, block.piece, block.offset / B, true),
            Grant::Reject { link, block } => (link, block.piece, block.offset / B, false),
        })
        .collect()
}

fn ask(s: &mut UploadSlots<u32>, link: u32, piece: u32, idxs: std::ops::Range<u32>) {
    for i in idxs {
        assert!(s.request(link, block(piece, i), 0));
    }
}

#[test]
fn a_lone_link_is_granted_everything_at_once() {
    let mut s = UploadSlots::new(limits(1));
    s.add_link(1, file(), 16, false);
    ask(&mut s, 1, 0, 0..4);
    ask(&mut s, 1, 1, 0..4);
    assert_eq!(grants(&mut s).len(), 8, "nobody waits: no turn limit");
    s.drained(1);
    ask(&mut s, 1, 2, 0..2);
    assert_eq!(grants(&mut s), vec![(1, 2, 0), (1, 2, 1)]);
}

#[test]
fn waiting_links_take_turns_of_one_piece() {
    let mut s = UploadSlots::new(limits(1));
    for l in 1..=3 {
        s.add_link(l, file(), 16, false);
    }
    ask(&mut s, 1, 0, 0..4);
    assert_eq!(grants(&mut s).len(), 4);
    ask(&mut s, 2, 2, 0..4);
    ask(&mut s, 3, 3, 0..4);
    ask(&mut s, 1, 1, 0..4);
    // Link 1's turn is used up and others wait: its new requests are held.
    assert_eq!(grants(&mut s), vec![]);
    assert_eq!(s.n_held(1), 4);
    s.drained(1);
    // Link 2 has been served least (with 3, and it waited longer).
    assert_eq!(
        grants(&mut s),
        (0..4).map(|i| (2, 2, i)).collect::<Vec<_>>()
    );
    s.drained(2);
    assert_eq!(
        grants(&mut s),
        (0..4).map(|i| (3, 3, i)).collect::<Vec<_>>()
    );
    s.drained(3);
    assert_eq!(
        grants(&mut s),
        (0..4).map(|i| (1, 1, i)).collect::<Vec<_>>()
    );
    assert_eq!(s.n_in_slots(), 1);
}

#[test]
fn a_newcomer_goes_before_links_served_more() {
    let mut s = UploadSlots::new(limits(1));
    s.add_link(1, file(), 16, false);
    s.add_link(2, file(), 16, false);
    ask(&mut s, 1, 0, 0..4);
    ask(&mut s, 2, 1, 0..4);
    grants(&mut s);
    s.drained(1);
    assert_eq!(grants(&mut s).len(), 4, "link 2's turn");
    ask(&mut s, 1, 2, 0..4);
    s.add_link(9, file(), 16, false);
    ask(&mut s, 9, 3, 0..1);
    s.drained(2);
    assert_eq!(grants(&mut s), vec![(9, 3, 0)], "the newcomer first");
}

#[test]
fn the_piece_sent_least_goes_first() {
    let mut s = UploadSlots::new(limits(1));
    s.add_link(1, file(), 16, false);
    s.add_link(2, file(), 16, false);
    ask(&mut s, 1, 5, 0..4);
    grants(&mut s);
    // Link 2 asks for piece 5 (sent once already) before piece 6 (never sent).
    ask(&mut s, 2, 5, 0..4);
    ask(&mut s, 2, 6, 0..4);
    s.drained(1);
    let g = grants(&mut s);
    assert_eq!(g[..4], (0..4).map(|i| (2, 6, i)).collect::<Vec<_>>()[..]);
}

#[test]
fn cancels_and_closed_links_free_what_they_held() {
    let mut s = UploadSlots::new(limits(1));
    s.add_link(1, file(), 16, false);
    s.add_link(2, file(), 16, false);
    ask(&mut s, 1, 0, 0..4);
    grants(&mut s);
    ask(&mut s, 2, 1, 0..2);
    s.cancel(2, block(1, 0));
    assert_eq!(s.n_held(2), 1);
    s.remove_link(1);
    assert_eq!(
        grants(&mut s),
        vec![(2, 1, 1)],
        "the slot passed on at the close"
    );
    s.cancel(2, block(1, 1));
    s.remove_link(2);
    assert_eq!(s.n_in_slots(), 0);
    assert!(
        s.sent.is_empty(),
        "counters go with the last link of the file"
    );
}

#[test]
fn a_link_holds_at_most_max_held_requests() {
    let mut s = UploadSlots::new(limits(1));
    s.add_link(1, file(), 16, false);
    s.add_link(2, file(), 16, false);
    ask(&mut s, 1, 0, 0..4);
    for i in 0..8 {
        assert!(s.request(2, block(1 + i / 4, i % 4), 0) || i >= 8);
    }
    // Link 2 is in no slot (link 1 holds the only one, its output not drained).
    assert!(!s.may_read(2));
    assert!(!s.request(2, block(9, 0), 0));
    assert!(!s.request(77, block(9, 0), 0), "unknown link");
}

#[test]
fn unlimited_grants_everything_at_once() {
    let mut s = UploadSlots::new(SlotLimits::unlimited());
    for l in 1..=5 {
        s.add_link(l, file(), 16, false);
        ask(&mut s, l, l, 0..4);
    }
    assert_eq!(grants(&mut s).len(), 20);
}

#[test]
fn a_seed_sends_each_piece_once_before_any_twice() {
    let mut s = UploadSlots::new(limits(1));
    s.add_link(1, file(), 4, true);
    s.add_link(2, file(), 4, true);
    ask(&mut s, 1, 0, 0..4);
    assert_eq!(grants(&mut s).len(), 4);
    // Piece 0 left already and pieces 1 to 3 have not: link 2 is declined piece 0 at once.
    ask(&mut s, 2, 0, 0..1);
    ask(&mut s, 2, 1, 0..4);
    assert_eq!(answers(&mut s), vec![(2, 0, 0, false)]);
    s.drained(1);
    assert_eq!(grants(&mut s).len(), 4, "piece 1 for link 2");
    // A held request whose piece left meanwhile is declined at its turn, and a link finishes
    // a piece it started even when it went out elsewhere too.
    ask(&mut s, 1, 2, 0..4);
    ask(&mut s, 2, 2, 0..2);
    s.drained(2);
    let a = answers(&mut s);
    assert_eq!(a[..2], [(1, 2, 0, true), (1, 2, 1, true)]);
    // Link 1 asks for more after its turn, so the uplink has other work when link 2's turn
    // comes: link 2 is declined (and gives the slot back at once), then link 1 is served.
    ask(&mut s, 1, 3, 0..1);
    s.drained(1);
    let a = answers(&mut s);
    assert_eq!(a, vec![(2, 2, 0, false), (2, 2, 1, false), (1, 3, 0, true)]);
    ask(&mut s, 2, 3, 0..4);
    s.drained(1);
    assert_eq!(grants(&mut s).len(), 4, "piece 3 for link 2");
    // Every piece has left once: no more refusals.
    ask(&mut s, 2, 0, 0..4);
    assert!(answers(&mut s).iter().all(|a| a.3));
}

#[test]
fn a_sharer_that_is_not_a_seed_declines_nothing() {
    let mut s = UploadSlots::new(limits(4));
    s.add_link(1, file(), 3, false);
    s.add_link(2, file(), 3, false);
    ask(&mut s, 1, 0, 0..4);
    ask(&mut s, 2, 0, 0..4);
    assert!(answers(&mut s).iter().all(|a| a.3));
}

#[test]
fn a_declined_piece_is_served_once_the_uplink_has_nothing_else() {
    let mut s = UploadSlots::new(limits(1));
    s.add_link(1, file(), 4, true);
    s.add_link(2, file(), 4, true);
    ask(&mut s, 1, 0, 0..4);
    grants(&mut s);
    // Link 1's blocks are still being sent: link 2 is declined piece 0.
    ask(&mut s, 2, 0, 0..2);
    assert_eq!(answers(&mut s), vec![(2, 0, 0, false), (2, 0, 1, false)]);
    // Nobody asks for pieces 1 to 3; once link 1's blocks are out, link 2 asks again and is
    // served (so nobody waits for ever for pieces that nobody else asks for).
    s.drained(1);
    ask(&mut s, 2, 0, 0..2);
    assert_eq!(answers(&mut s), vec![(2, 0, 0, true), (2, 0, 1, true)]);
}

#[test]
fn a_seed_with_nothing_else_to_send_serves_a_piece_that_left_already() {
    let mut s = UploadSlots::new(limits(1));
    s.add_link(1, file(), 4, true);
    s.add_link(2, file(), 4, true);
    ask(&mut s, 1, 0, 0..4);
    grants(&mut s);
    s.drained(1);
    // Piece 0 left already, but declining it would leave the uplink idle.
    ask(&mut s, 2, 0, 0..2);
    assert_eq!(answers(&mut s), vec![(2, 0, 0, true), (2, 0, 1, true)]);
}

#[test]
fn a_full_line_chokes_the_links_outside_it() {
    let mut s = UploadSlots::new(SlotLimits {
        line: 1,
        ..limits(1)
    });
    for link in 1..=4 {
        s.add_link(link, file(), 8, false);
    }
    ask(&mut s, 1, 0, 0..4);
    assert_eq!(grants(&mut s).len(), 4, "link 1 in the slot");
    ask(&mut s, 2, 1, 0..1);
    assert!(answers(&mut s).is_empty(), "link 2 waits in the line");
    ask(&mut s, 3, 2, 0..2);
    assert_eq!(answers(&mut s), vec![(3, 2, 0, false), (3, 2, 1, false)]);
    // Link 1's turn is over and the line is full: its further requests are rejected too,
    // and link 2 takes the slot.
    ask(&mut s, 1, 3, 0..1);
    s.drained(1);
    assert_eq!(answers(&mut s), vec![(1, 3, 0, false), (2, 1, 0, true)]);
    // The line has room again: the next to ask (link 4) gets in.
    ask(&mut s, 4, 4, 0..1);
    assert!(answers(&mut s).is_empty());
    assert_eq!(s.n_waiting(), 1);
}
