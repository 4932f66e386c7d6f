//! Tests of [`SharerStream`], the streaming decoder of what a sharer sends: golden bytes fed
//! in every split (one byte at a time, whole, random chunks), the frame limits checked at the
//! length prefix, the order of the handshake's answer, and random bytes never panicking.

use super::*;
use crate::rng::SplitMix64;

/// What a reader following the decoder saw: messages, and each block with its data.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Msg(SharerMsg),
    Block {
        piece: u32,
        offset: u32,
        data: Vec<u8>,
    },
}

/// Feeds `bytes` to a fresh decoder in chunks of the sizes `chunk` picks; block data is
/// collected as a reader writing it into a file would. Stops at the first error.
fn feed(bytes: &[u8], mut chunk: impl FnMut() -> usize) -> Result<Vec<Seen>, StreamError> {
    let mut stream = SharerStream::new();
    let mut seen = Vec::new();
    let mut block: Option<(u32, u32, Vec<u8>)> = None;
    let mut pos = 0;
    while pos < bytes.len() {
        let avail = chunk().max(1).min(bytes.len() - pos);
        let n = match stream.next_read() {
            Next::Buffer(buf) => {
                let n = avail.min(buf.len());
                buf[..n].copy_from_slice(&bytes[pos..pos + n]);
                n
            }
            Next::BlockData { piece, offset, len } => {
                let (p, o, data) = block.as_mut().expect("a block started");
                assert_eq!((piece, offset), (*p, *o + data.len() as u32));
                let n = avail.min(len as usize);
                data.extend_from_slice(&bytes[pos..pos + n]);
                n
            }
        };
        pos += n;
        match stream.filled(n)? {
            None => {}
            Some(Decoded::Msg(m)) => seen.push(Seen::Msg(m)),
            Some(Decoded::BlockStart { piece, offset, len }) => {
                assert!(block.is_none());
                assert!((1..=MAX_BLOCK_LEN).contains(&len));
                block = Some((piece, offset, Vec::new()));
            }
            Some(Decoded::BlockEnd { piece, offset, len }) => {
                let (p, o, data) = block.take().expect("a block started");
                assert_eq!((p, o, data.len() as u32), (piece, offset, len));
                seen.push(Seen::Block {
                    piece,
                    offset,
                    data,
                });
            }
        }
    }
    Ok(seen)
}

/// An `Accept` of 10 pieces holding 0 and 9, a block, a `Have`, a `Rejected` and a second
/// block, written out by hand from the layouts.
fn golden() -> Vec<u8> {
    let mut b = Vec::new();
    // Accept: len 13 | 0x81 | magic | version 2 | n_pieces 10 | bitfield 0b1000_0000 0b0100_0000.
    b.extend_from_slice(&[
        0, 0, 0, 13, 0x81, 0x50, 0x32, 0x50, 0x47, 0, 3, 0, 0, 0, 10, 0x80, 0x40,
    ]);
    // Block: len 1 + 8 + 5 | 0x84 | piece 9 | offset 0x10000 | "hello".
    b.extend_from_slice(&[0, 0, 0, 14, 0x84, 0, 0, 0, 9, 0, 1, 0, 0]);
    b.extend_from_slice(b"hello");
    // Have: len 5 | 0x83 | piece 3.
    b.extend_from_slice(&[0, 0, 0, 5, 0x83, 0, 0, 0, 3]);
    // Rejected: len 13 | 0x85 | piece 1 | offset 2 | len 3.
    b.extend_from_slice(&[0, 0, 0, 13, 0x85, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3]);
    // Block of one byte: piece 0 | offset 7 | "!".
    b.extend_from_slice(&[0, 0, 0, 10, 0x84, 0, 0, 0, 0, 0, 0, 0, 7, b'!']);
    b
}

fn golden_seen() -> Vec<Seen> {
    let mut bitfield = Bitfield::new(10);
    bitfield.set(0);
    bitfield.set(9);
    vec![
        Seen::Msg(SharerMsg::accept(bitfield)),
        Seen::Block {
            piece: 9,
            offset: 0x10000,
            data: b"hello".to_vec(),
        },
        Seen::Msg(SharerMsg::Have { piece: 3 }),
        Seen::Msg(SharerMsg::Rejected(BlockRef {
            piece: 1,
            offset: 2,
            len: 3,
        })),
        Seen::Block {
            piece: 0,
            offset: 7,
            data: b"!".to_vec(),
        },
    ]
}

#[test]
fn golden_bytes_decode_whatever_the_split() {
    let bytes = golden();
    assert_eq!(feed(&bytes, || usize::MAX).unwrap(), golden_seen());
    assert_eq!(feed(&bytes, || 1).unwrap(), golden_seen());
    let mut rng = SplitMix64::new(7);
    for _ in 0..500 {
        assert_eq!(feed(&bytes, || rng.between(1, 20)).unwrap(), golden_seen());
    }
}

#[test]
fn the_bytes_are_those_that_emit_writes() {
    // What `SharerMsg::emit` and `emit_block_header` write decodes to the same messages.
    let mut bytes = Vec::new();
    let bitfield = Bitfield::full(3);
    SharerMsg::accept(bitfield.clone()).emit(&mut bytes);
    SharerMsg::Block {
        piece: 2,
        offset: 5,
        data: vec![7; 1000],
    }
    .emit(&mut bytes);
    emit_block_header(&mut bytes, 1, 0, MAX_BLOCK_LEN as usize);
    bytes.extend(std::iter::repeat_n(9u8, MAX_BLOCK_LEN as usize));
    let seen = feed(&bytes, || 4096).unwrap();
    assert_eq!(
        seen,
        [
            Seen::Msg(SharerMsg::accept(bitfield)),
            Seen::Block {
                piece: 2,
                offset: 5,
                data: vec![7; 1000]
            },
            Seen::Block {
                piece: 1,
                offset: 0,
                data: vec![9; MAX_BLOCK_LEN as usize]
            },
        ]
    );
}

#[test]
fn a_refusal_is_an_answer() {
    let mut bytes = Vec::new();
    SharerMsg::Refuse {
        code: 1,
        message: "not shared".into(),
    }
    .emit(&mut bytes);
    let seen = feed(&bytes, || 3).unwrap();
    assert!(matches!(
        seen[..],
        [Seen::Msg(SharerMsg::Refuse { code: 1, .. })]
    ));
}

#[test]
fn frame_limits_are_checked_at_the_length_prefix() {
    let accept = &golden()[..17];
    // A block one byte over the largest, after the accept: refused before any data arrives.
    let mut b = accept.to_vec();
    b.extend_from_slice(&(MAX_PEER_FRAME as u32 + 1).to_be_bytes());
    b.push(0x84);
    assert_eq!(
        feed(&b, || 1),
        Err(StreamError::Decode(DecodeError::FrameTooLarge {
            len: MAX_PEER_FRAME + 1,
            max: MAX_PEER_FRAME
        }))
    );
    // The largest block is fine.
    let mut b = accept.to_vec();
    emit_block_header(&mut b, 0, 0, MAX_BLOCK_LEN as usize);
    b.extend(std::iter::repeat_n(1u8, MAX_BLOCK_LEN as usize));
    assert_eq!(feed(&b, || 65536).unwrap().len(), 2);
    // A small frame over the small limit once answered.
    let mut b = accept.to_vec();
    b.extend_from_slice(&(MAX_SMALL_FRAME as u32 + 1).to_be_bytes());
    b.push(0x83);
    assert_eq!(
        feed(&b, || 1),
        Err(StreamError::Decode(DecodeError::FrameTooLarge {
            len: MAX_SMALL_FRAME + 1,
            max: MAX_SMALL_FRAME
        }))
    );
    // Before the answer, a large Accept may come, but not more than a block's frame.
    let mut b = (MAX_PEER_FRAME as u32 + 1).to_be_bytes().to_vec();
    b.push(0x81);
    assert!(matches!(
        feed(&b, || 1),
        Err(StreamError::Decode(DecodeError::FrameTooLarge { .. }))
    ));
    // An empty frame.
    assert_eq!(
        feed(&[0, 0, 0, 0, 0x83], || 1),
        Err(StreamError::Decode(DecodeError::EmptyFrame))
    );
    // A block too short to hold its header and one byte of data.
    let mut b = accept.to_vec();
    b.extend_from_slice(&[0, 0, 0, 9, 0x84, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert!(feed(&b, || 1).is_err());
}

#[test]
fn the_answer_comes_first_and_once() {
    let g = golden();
    // A block before the accept.
    assert_eq!(feed(&g[17..], || 1), Err(StreamError::BeforeAnswer));
    // A Have before the accept.
    assert_eq!(
        feed(&[0, 0, 0, 5, 0x83, 0, 0, 0, 3], || 1),
        Err(StreamError::BeforeAnswer)
    );
    // A second accept.
    let mut b = g[..17].to_vec();
    b.extend_from_slice(&g[..17]);
    assert_eq!(feed(&b, || 5), Err(StreamError::SecondAnswer));
    // An unknown type.
    let mut b = g[..17].to_vec();
    b.extend_from_slice(&[0, 0, 0, 1, 0x99]);
    assert_eq!(
        feed(&b, || 1),
        Err(StreamError::Decode(DecodeError::UnknownType(0x99)))
    );
}

#[test]
fn every_strict_prefix_decodes_what_it_holds_and_waits() {
    let g = golden();
    let full = golden_seen();
    for cut in 0..g.len() {
        let seen = feed(&g[..cut], || 1).unwrap();
        assert!(seen.len() <= full.len());
        assert_eq!(seen[..], full[..seen.len()], "cut at {cut}");
    }
}

#[test]
fn random_and_mutated_bytes_never_panic() {
    let mut rng = SplitMix64::new(11);
    let g = golden();
    for _ in 0..3000 {
        let mut b = if rng.percent(50) {
            g.clone()
        } else {
            let mut v = vec![0u8; rng.between(0, 64)];
            rng.fill(&mut v);
            v
        };
        for _ in 0..rng.between(0, 4) {
            if !b.is_empty() {
                let i = rng.below(b.len());
                b[i] = rng.next_u64() as u8;
            }
        }
        let _ = feed(&b, || rng.between(1, 9));
    }
}
