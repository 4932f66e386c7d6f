//! Unit tests of the serving core: handshakes accepted or refused with their codes, requests
//! answered with blocks or rejections, the order rules and the per-link read limit.

use super::*;
use crate::wire::peer_link::MAX_BLOCK_LEN;

fn handshake(version: u16) -> DownloaderMsg {
    DownloaderMsg::Handshake {
        version,
        group: GroupId::new("g").unwrap(),
        name: FileName::new("f.bin").unwrap(),
        file_sha1: Sha1Digest([7; 20]),
    }
}

fn blk(piece: u32, offset: u32, len: u32) -> BlockRef {
    BlockRef { piece, offset, len }
}

/// 2.5 pieces of 100 bytes.
fn offer() -> Offer {
    Offer {
        size: 250,
        piece_len: 100,
        bitfield: Bitfield::full(3),
    }
}

fn all(_: u32) -> bool {
    true
}

/// A link serving `offer()`.
fn serving() -> Uploader {
    let mut u = Uploader::new();
    assert!(matches!(
        u.handle_msg(handshake(PROTOCOL_VERSION), all),
        Ok(Step::LookUp { .. })
    ));
    assert_eq!(
        u.handle_offer(Ok(offer())),
        SharerMsg::accept(Bitfield::full(3))
    );
    assert!(u.is_serving());
    u
}

#[test]
fn a_handshake_for_a_shared_file_is_accepted_with_its_bitfield() {
    let mut u = Uploader::new();
    assert!(u.awaits_handshake());
    let step = u.handle_msg(handshake(PROTOCOL_VERSION), all).unwrap();
    assert_eq!(
        step,
        Step::LookUp {
            group: GroupId::new("g").unwrap(),
            name: FileName::new("f.bin").unwrap(),
            file_sha1: Sha1Digest([7; 20]),
        }
    );
    assert!(!u.awaits_handshake() && !u.is_serving());
    let mut bits = Bitfield::new(3);
    bits.set(1);
    let answer = u.handle_offer(Ok(Offer {
        bitfield: bits.clone(),
        ..offer()
    }));
    assert_eq!(answer, SharerMsg::accept(bits));
}

#[test]
fn refusals_carry_their_codes_and_end_the_link() {
    // Not shared: the driver's lookup says so.
    let mut u = Uploader::new();
    u.handle_msg(handshake(PROTOCOL_VERSION), all).unwrap();
    let answer = u.handle_offer(Err(Refusal {
        code: RefuseCode::NotShared,
        message: "f.bin of group g is not shared here".into(),
    }));
    assert!(matches!(answer, SharerMsg::Refuse { code: 1, .. }));
    assert!(u.is_refused());
    assert!(!u.may_read(0), "nothing more is read from a refused link");
    assert_eq!(
        u.handle_msg(DownloaderMsg::Request(blk(0, 0, 1)), all),
        Ok(Step::Nothing)
    );
    // Another version: refused without a lookup.
    let mut u = Uploader::new();
    let step = u.handle_msg(handshake(PROTOCOL_VERSION + 1), all).unwrap();
    assert!(matches!(
        step,
        Step::Send(SharerMsg::Refuse { code: 2, .. })
    ));
    assert!(u.is_refused());
    // Too many pieces to offer: busy.
    let mut u = Uploader::new();
    u.handle_msg(handshake(PROTOCOL_VERSION), all).unwrap();
    let answer = u.handle_offer(Ok(Offer {
        size: u64::MAX,
        piece_len: 1,
        bitfield: Bitfield::new(MAX_ACCEPT_PIECES + 1),
    }));
    assert!(matches!(answer, SharerMsg::Refuse { code: 3, .. }));
    // An offer nobody asked for is refused too.
    let mut u = Uploader::new();
    assert!(matches!(
        u.handle_offer(Ok(offer())),
        SharerMsg::Refuse { .. }
    ));
}

#[test]
fn refuse_codes_round_trip_through_the_wire() {
    for code in [
        RefuseCode::NotShared,
        RefuseCode::Version,
        RefuseCode::Busy,
        RefuseCode::Ticket,
    ] {
        assert_eq!(RefuseCode::from_wire(code.to_wire()), Some(code));
        assert!(!code.to_string().is_empty());
    }
    assert_eq!(RefuseCode::from_wire(0), None);
    assert_eq!(RefuseCode::from_wire(5), None);
}

#[test]
fn requests_inside_a_verified_piece_get_blocks_at_their_file_offset() {
    let mut u = serving();
    let req = |u: &mut Uploader, b| u.handle_msg(DownloaderMsg::Request(b), all).unwrap();
    assert_eq!(
        req(&mut u, blk(0, 0, 100)),
        Step::Block {
            block: blk(0, 0, 100),
            start: 0
        }
    );
    assert_eq!(
        req(&mut u, blk(1, 10, 5)),
        Step::Block {
            block: blk(1, 10, 5),
            start: 110
        }
    );
    // The short last piece.
    assert_eq!(
        req(&mut u, blk(2, 0, 50)),
        Step::Block {
            block: blk(2, 0, 50),
            start: 200
        }
    );
    for bad in [
        blk(2, 0, 51),       // past the end of the file
        blk(0, 90, 20),      // across two pieces
        blk(3, 0, 1),        // no such piece
        blk(0, u32::MAX, 1), // offset overflow
        blk(u32::MAX, 0, MAX_BLOCK_LEN),
    ] {
        assert_eq!(
            req(&mut u, bad),
            Step::Send(SharerMsg::Rejected(bad)),
            "{bad:?}"
        );
    }
}

#[test]
fn unverified_pieces_are_rejected() {
    let mut u = serving();
    let step = u
        .handle_msg(DownloaderMsg::Request(blk(1, 0, 10)), |p| p != 1)
        .unwrap();
    assert_eq!(step, Step::Send(SharerMsg::Rejected(blk(1, 0, 10))));
    let step = u
        .handle_msg(DownloaderMsg::Request(blk(0, 0, 10)), |p| p != 1)
        .unwrap();
    assert!(matches!(step, Step::Block { .. }));
}

#[test]
fn order_rules_break_the_link() {
    let mut u = Uploader::new();
    assert_eq!(
        u.handle_msg(DownloaderMsg::Request(blk(0, 0, 1)), all),
        Err(ServeError::RequestBeforeHandshake)
    );
    let mut u = serving();
    assert_eq!(
        u.handle_msg(handshake(PROTOCOL_VERSION), all),
        Err(ServeError::SecondHandshake)
    );
    // A request while the handshake is being looked up.
    let mut u = Uploader::new();
    u.handle_msg(handshake(PROTOCOL_VERSION), all).unwrap();
    assert_eq!(
        u.handle_msg(DownloaderMsg::Request(blk(0, 0, 1)), all),
        Err(ServeError::RequestBeforeHandshake)
    );
    // Garbage.
    let mut u = Uploader::new();
    assert!(matches!(
        u.handle_frame(&[0x77], all),
        Err(ServeError::Decode(_))
    ));
    // A cancel is fine at any time.
    let mut u = serving();
    assert_eq!(
        u.handle_msg(DownloaderMsg::Cancel(blk(0, 0, 1)), all),
        Ok(Step::Nothing)
    );
}

#[test]
fn a_link_with_a_full_queue_is_not_read() {
    let u = serving();
    assert!(u.may_read(0));
    assert!(u.may_read(MAX_QUEUED_BYTES - 1));
    assert!(!u.may_read(MAX_QUEUED_BYTES));
}

#[test]
fn random_messages_never_panic() {
    let mut rng = crate::rng::SplitMix64::new(3);
    for _ in 0..2000 {
        let mut u = Uploader::new();
        for _ in 0..rng.between(1, 8) {
            let mut frame = vec![0u8; rng.between(1, 40)];
            rng.fill(&mut frame);
            if rng.percent(30) {
                frame[0] = *rng.pick(&[0x01, 0x10, 0x11]);
            }
            match u.handle_frame(&frame, |p| p % 2 == 0) {
                Ok(Step::LookUp { .. }) => {
                    let _ = u.handle_offer(Ok(offer()));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
}
