//! Tests of the peer-to-peer messages: golden bytes written out by hand from the layouts in the
//! doc comments, round trips of every variant, truncation, trailing bytes, invalid fields,
//! forged counts, seeded random and mutation fuzzing, frame limits, the zero-copy block header
//! helpers, and reassembly through `FrameBuffer`.

use super::*;
use crate::testing::{cat, fname, gid, rand_str, Draw, B};
use crate::wire::frame::{FrameBuffer, LEN_PREFIX, MAX_HANDSHAKE_FRAME};
use crate::wire::ids::IdError;
use crate::wire::PIECE_LEN;

use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

use crate::rng::SplitMix64 as Rng;

fn blk(piece: u32, offset: u32, len: u32) -> BlockRef {
    BlockRef { piece, offset, len }
}

/// A bitfield of `n_bits` bits with exactly the bits in `ones` set.
fn bits(n_bits: usize, ones: &[usize]) -> Bitfield {
    let mut bf = Bitfield::new(n_bits);
    for i in ones {
        bf.set(*i);
    }
    bf
}

fn emit_d(m: &DownloaderMsg) -> Vec<u8> {
    let mut out = Vec::new();
    m.emit(&mut out);
    out
}

fn emit_s(m: &SharerMsg) -> Vec<u8> {
    let mut out = Vec::new();
    m.emit(&mut out);
    out
}

/// The payload (type byte + body) of a whole frame, after checking its length prefix.
fn payload(frame: &[u8]) -> &[u8] {
    assert!(frame.len() > LEN_PREFIX, "frame too short: {frame:?}");
    let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
    assert_eq!(len, frame.len() - LEN_PREFIX, "length prefix of {frame:?}");
    &frame[LEN_PREFIX..]
}

impl B {
    /// A block reference `piece | offset | len`.
    fn block(self, piece: u32, offset: u32, len: u32) -> Self {
        self.u32(piece).u32(offset).u32(len)
    }
}

const MAGIC: [u8; 4] = [0x50, 0x32, 0x50, 0x47];

// ---------------------------------------------------------------------------------------------
// Samples covering every variant
// ---------------------------------------------------------------------------------------------

/// Index of the variant, by an exhaustive match: adding a variant breaks the build here until
/// the samples cover it.
fn downloader_variant(m: &DownloaderMsg) -> usize {
    match m {
        DownloaderMsg::Handshake { .. } => 0,
        DownloaderMsg::Request(_) => 1,
        DownloaderMsg::Cancel(_) => 2,
        DownloaderMsg::Ticket(_) => 3,
    }
}
const DOWNLOADER_VARIANTS: usize = 4;

fn sharer_variant(m: &SharerMsg) -> usize {
    match m {
        SharerMsg::Accept { .. } => 0,
        SharerMsg::Refuse { .. } => 1,
        SharerMsg::Have { .. } => 2,
        SharerMsg::Block { .. } => 3,
        SharerMsg::Rejected(_) => 4,
    }
}
const SHARER_VARIANTS: usize = 5;

/// Small samples (every strict prefix of each is parsed, so nothing here is large).
fn sample_downloader_msgs() -> Vec<DownloaderMsg> {
    vec![
        DownloaderMsg::handshake(gid("grp"), fname("movie.mkv"), Sha1Digest([0xaa; 20])),
        DownloaderMsg::Handshake {
            version: u16::MAX,
            group: gid(&"g".repeat(MAX_ID_LEN)),
            name: fname(&"n".repeat(MAX_FILE_NAME_LEN)),
            file_sha1: Sha1Digest([0; 20]),
        },
        DownloaderMsg::Handshake {
            version: 0,
            group: gid("grüppe"),
            name: fname("a b 中.txt"),
            file_sha1: Sha1Digest([0xff; 20]),
        },
        DownloaderMsg::Request(blk(0, 0, 1)),
        DownloaderMsg::Request(blk(u32::MAX, u32::MAX, MAX_BLOCK_LEN)),
        DownloaderMsg::Request(blk(3, 16 * 1024, 16 * 1024)),
        DownloaderMsg::Cancel(blk(0, 0, 1)),
        DownloaderMsg::Cancel(blk(7, PIECE_LEN - 1, MAX_BLOCK_LEN)),
        DownloaderMsg::Ticket(Box::new(sample_ticket("g", "u"))),
        DownloaderMsg::Ticket(Box::new(sample_ticket(
            &"g".repeat(MAX_ID_LEN),
            &"u".repeat(MAX_ID_LEN),
        ))),
    ]
}

fn sample_ticket(group: &str, user: &str) -> crate::wire::ticket::Ticket {
    crate::wire::ticket::Ticket {
        body: crate::wire::ticket::TicketBody {
            expires: 1_800_000_000,
            file_sha1: Sha1Digest([0xab; 20]),
            group: gid(group),
            user: crate::wire::UserId::new(user).unwrap(),
            client_key: [7; 32],
        },
        signature: [9; 64],
    }
}

#[test]
fn ticket_golden_bytes() {
    let mut out = Vec::new();
    DownloaderMsg::Ticket(Box::new(sample_ticket("g1", "bob"))).emit(&mut out);
    let ticket = sample_ticket("g1", "bob").to_bytes();
    let mut want = ((1 + ticket.len()) as u32).to_be_bytes().to_vec();
    want.push(0x12);
    want.extend_from_slice(&ticket);
    assert_eq!(out, want);
    // The longest ticket frame fits a downloader's frame limit.
    let mut long = Vec::new();
    DownloaderMsg::Ticket(Box::new(sample_ticket(
        &"g".repeat(MAX_ID_LEN),
        &"u".repeat(MAX_ID_LEN),
    )))
    .emit(&mut long);
    assert!(long.len() - 4 <= MAX_DOWNLOADER_FRAME);
}

fn sample_sharer_msgs() -> Vec<SharerMsg> {
    vec![
        SharerMsg::accept(Bitfield::new(0)),
        SharerMsg::accept(Bitfield::full(1)),
        SharerMsg::accept(Bitfield::full(8)),
        SharerMsg::accept(bits(10, &[0, 2, 9])),
        SharerMsg::Accept {
            version: u16::MAX,
            bitfield: bits(1000, &[0, 1, 499, 999]),
        },
        SharerMsg::Accept {
            version: 0,
            bitfield: Bitfield::new(17),
        },
        SharerMsg::Refuse {
            code: 0,
            message: String::new(),
        },
        SharerMsg::Refuse {
            code: u16::MAX,
            message: "no such file".into(),
        },
        SharerMsg::Refuse {
            code: 3,
            message: "é".repeat(MAX_REFUSE_LEN / 2),
        },
        SharerMsg::Have { piece: 0 },
        SharerMsg::Have { piece: u32::MAX },
        SharerMsg::Block {
            piece: 0,
            offset: 0,
            data: vec![0x5a],
        },
        SharerMsg::Block {
            piece: u32::MAX,
            offset: u32::MAX,
            data: (0..=255u8).collect(),
        },
        SharerMsg::Rejected(blk(0, 0, 1)),
        SharerMsg::Rejected(blk(u32::MAX, u32::MAX, MAX_BLOCK_LEN)),
    ]
}

// ---------------------------------------------------------------------------------------------
// Random valid messages
// ---------------------------------------------------------------------------------------------

const ID_CHARS: &[char] = &[
    'a', 'b', 'z', 'A', 'Z', '0', '9', '_', '-', '.', '/', '~', 'é', 'ü', 'ß', '中', '😀',
];
const NAME_CHARS: &[char] = &[
    'a', 'b', 'z', 'A', '0', '9', '_', '-', '.', ' ', 'é', '中', '😀', '#',
];

fn rand_group(rng: &mut Rng) -> GroupId {
    gid(&rand_str(rng, ID_CHARS, MAX_ID_LEN))
}

fn rand_name(rng: &mut Rng) -> FileName {
    loop {
        let s = rand_str(rng, NAME_CHARS, MAX_FILE_NAME_LEN);
        if let Ok(n) = FileName::new(&s) {
            return n;
        }
    }
}

fn rand_sha(rng: &mut Rng) -> Sha1Digest {
    let mut d = [0u8; 20];
    rng.fill(&mut d);
    Sha1Digest(d)
}

fn rand_block_ref(rng: &mut Rng) -> BlockRef {
    let len = if rng.chance(1, 2) {
        *rng.pick(&[1, 16 * 1024, MAX_BLOCK_LEN - 1, MAX_BLOCK_LEN])
    } else {
        rng.between(1, MAX_BLOCK_LEN as usize) as u32
    };
    blk(rng.u32(), rng.u32(), len)
}

fn rand_bitfield(rng: &mut Rng) -> Bitfield {
    let n = if rng.chance(1, 8) {
        0
    } else {
        rng.between(1, 70)
    };
    let mut bf = Bitfield::new(n);
    for i in 0..n {
        if rng.chance(1, 2) {
            bf.set(i);
        }
    }
    bf
}

fn rand_downloader(rng: &mut Rng) -> DownloaderMsg {
    match rng.below(DOWNLOADER_VARIANTS) {
        0 => DownloaderMsg::Handshake {
            version: rng.next_u64() as u16,
            group: rand_group(rng),
            name: rand_name(rng),
            file_sha1: rand_sha(rng),
        },
        1 => DownloaderMsg::Request(rand_block_ref(rng)),
        2 => DownloaderMsg::Cancel(rand_block_ref(rng)),
        _ => {
            let mut t = sample_ticket("g", "u");
            t.body.group = rand_group(rng);
            t.body.expires = rng.next_u64();
            t.body.file_sha1 = rand_sha(rng);
            t.signature[0] = rng.next_u64() as u8;
            DownloaderMsg::Ticket(Box::new(t))
        }
    }
}

fn rand_sharer(rng: &mut Rng) -> SharerMsg {
    match rng.below(SHARER_VARIANTS) {
        0 => SharerMsg::Accept {
            version: rng.next_u64() as u16,
            bitfield: rand_bitfield(rng),
        },
        1 => SharerMsg::Refuse {
            code: rng.next_u64() as u16,
            message: if rng.chance(1, 3) {
                String::new()
            } else {
                rand_str(rng, NAME_CHARS, MAX_REFUSE_LEN)
            },
        },
        2 => SharerMsg::Have { piece: rng.u32() },
        3 => {
            let n = if rng.chance(1, 16) {
                rng.between(1, 2000)
            } else {
                rng.between(1, 40)
            };
            SharerMsg::Block {
                piece: rng.u32(),
                offset: rng.u32(),
                data: rng.bytes(n),
            }
        }
        _ => SharerMsg::Rejected(rand_block_ref(rng)),
    }
}

/// Payloads (without length prefix) of the samples plus some random messages.
fn valid_payloads(rng: &mut Rng, n_random: usize) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = sample_downloader_msgs()
        .iter()
        .map(|m| payload(&emit_d(m)).to_vec())
        .chain(
            sample_sharer_msgs()
                .iter()
                .map(|m| payload(&emit_s(m)).to_vec()),
        )
        .collect();
    for _ in 0..n_random {
        out.push(payload(&emit_d(&rand_downloader(rng))).to_vec());
        out.push(payload(&emit_s(&rand_sharer(rng))).to_vec());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 1. Golden bytes
// ---------------------------------------------------------------------------------------------

fn golden_d(m: DownloaderMsg, want: &[u8]) {
    assert_eq!(emit_d(&m), want, "emit of {m:?}");
    assert_eq!(DownloaderMsg::parse(&want[4..]), Ok(m));
}

fn golden_s(m: SharerMsg, want: &[u8]) {
    assert_eq!(emit_s(&m), want, "emit of {m:?}");
    assert_eq!(SharerMsg::parse(&want[4..]), Ok(m));
}

#[test]
fn golden_handshake() {
    let want = cat(&[
        &[0, 0, 0, 37, 0x01],                  // length, type
        &[0x50, 0x32, 0x50, 0x47],             // magic "P2PG"
        &[0x01, 0x02],                         // version
        &[0, 1, b'g'],                         // group
        &[0, 5, b'f', b'.', b't', b'x', b't'], // name
        &[0xaa; 20],                           // file_sha1
    ]);
    assert_eq!(want.len(), 4 + 37);
    golden_d(
        DownloaderMsg::Handshake {
            version: 0x0102,
            group: gid("g"),
            name: fname("f.txt"),
            file_sha1: Sha1Digest([0xaa; 20]),
        },
        &want,
    );
    // The handshake this build sends carries version 3.
    let mut want = want;
    want[9..11].copy_from_slice(&[0, 3]);
    golden_d(
        DownloaderMsg::handshake(gid("g"), fname("f.txt"), Sha1Digest([0xaa; 20])),
        &want,
    );
}

#[test]
fn golden_request_and_cancel() {
    let block = blk(0x0102_0304, 0x0004_0000, 0x4000);
    golden_d(
        DownloaderMsg::Request(block),
        &cat(&[
            &[0, 0, 0, 13, 0x10], // length, type
            &[1, 2, 3, 4],        // piece
            &[0, 4, 0, 0],        // offset
            &[0, 0, 0x40, 0],     // len
        ]),
    );
    golden_d(
        DownloaderMsg::Cancel(block),
        &cat(&[
            &[0, 0, 0, 13, 0x11], // length, type
            &[1, 2, 3, 4],        // piece
            &[0, 4, 0, 0],        // offset
            &[0, 0, 0x40, 0],     // len
        ]),
    );
    golden_d(
        DownloaderMsg::Request(blk(0, 0, MAX_BLOCK_LEN)),
        &[0, 0, 0, 13, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0],
    );
}

#[test]
fn golden_accept() {
    golden_s(
        SharerMsg::Accept {
            version: 1,
            bitfield: bits(10, &[0, 2, 9]),
        },
        &cat(&[
            &[0, 0, 0, 13, 0x81],      // length, type
            &[0x50, 0x32, 0x50, 0x47], // magic
            &[0, 1],                   // version
            &[0, 0, 0, 10],            // n_pieces
            &[0b1010_0000, 0b0100_0000],
        ]),
    );
    // No pieces: no bitfield bytes at all.
    golden_s(
        SharerMsg::accept(Bitfield::new(0)),
        &[0, 0, 0, 11, 0x81, 0x50, 0x32, 0x50, 0x47, 0, 3, 0, 0, 0, 0],
    );
    // A whole byte, all set.
    golden_s(
        SharerMsg::accept(Bitfield::full(8)),
        &[
            0, 0, 0, 12, 0x81, 0x50, 0x32, 0x50, 0x47, 0, 3, 0, 0, 0, 8, 0xff,
        ],
    );
    // Nine pieces, all set: the second byte has only its top bit.
    golden_s(
        SharerMsg::Accept {
            version: 0x0203,
            bitfield: Bitfield::full(9),
        },
        &[
            0, 0, 0, 13, 0x81, 0x50, 0x32, 0x50, 0x47, 2, 3, 0, 0, 0, 9, 0xff, 0x80,
        ],
    );
}

#[test]
fn golden_refuse() {
    golden_s(
        SharerMsg::Refuse {
            code: 3,
            message: "no".into(),
        },
        &cat(&[
            &[0, 0, 0, 7, 0x82], // length, type
            &[0, 3],             // code
            &[0, 2, b'n', b'o'], // message
        ]),
    );
    golden_s(
        SharerMsg::Refuse {
            code: 0x03e7,
            message: String::new(),
        },
        &[0, 0, 0, 5, 0x82, 0x03, 0xe7, 0, 0],
    );
}

#[test]
fn golden_have() {
    golden_s(
        SharerMsg::Have { piece: 0x0a0b_0c0d },
        &[0, 0, 0, 5, 0x83, 0x0a, 0x0b, 0x0c, 0x0d],
    );
}

#[test]
fn golden_block() {
    golden_s(
        SharerMsg::Block {
            piece: 1,
            offset: 0x4000,
            data: b"abc".to_vec(),
        },
        &cat(&[
            &[0, 0, 0, 12, 0x84], // length, type
            &[0, 0, 0, 1],        // piece
            &[0, 0, 0x40, 0],     // offset
            b"abc",               // data
        ]),
    );
}

#[test]
fn golden_rejected() {
    golden_s(
        SharerMsg::Rejected(blk(2, 0, 1)),
        &cat(&[
            &[0, 0, 0, 13, 0x85], // length, type
            &[0, 0, 0, 2],        // piece
            &[0, 0, 0, 0],        // offset
            &[0, 0, 0, 1],        // len
        ]),
    );
}

#[test]
fn emit_appends_without_touching_what_is_there() {
    let mut out = vec![0xee, 0xee];
    DownloaderMsg::Cancel(blk(1, 2, 3)).emit(&mut out);
    SharerMsg::Have { piece: 4 }.emit(&mut out);
    assert_eq!(
        out,
        [
            &[0xee, 0xee][..],
            &[0, 0, 0, 13, 0x11, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3],
            &[0, 0, 0, 5, 0x83, 0, 0, 0, 4],
        ]
        .concat()
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Round trip
// ---------------------------------------------------------------------------------------------

#[test]
fn samples_cover_every_variant() {
    let mut seen = [false; DOWNLOADER_VARIANTS];
    for m in sample_downloader_msgs() {
        seen[downloader_variant(&m)] = true;
    }
    assert!(
        seen.iter().all(|s| *s),
        "downloader variants seen: {seen:?}"
    );
    let mut seen = [false; SHARER_VARIANTS];
    for m in sample_sharer_msgs() {
        seen[sharer_variant(&m)] = true;
    }
    assert!(seen.iter().all(|s| *s), "sharer variants seen: {seen:?}");
}

#[test]
fn round_trip_samples() {
    for m in sample_downloader_msgs() {
        let frame = emit_d(&m);
        assert_eq!(DownloaderMsg::parse(payload(&frame)), Ok(m));
    }
    for m in sample_sharer_msgs() {
        let frame = emit_s(&m);
        assert_eq!(SharerMsg::parse(payload(&frame)), Ok(m));
    }
}

#[test]
fn round_trip_random() {
    let mut rng = Rng::new(0x9ee7_0001);
    let mut seen_d = [0usize; DOWNLOADER_VARIANTS];
    let mut seen_s = [0usize; SHARER_VARIANTS];
    for _ in 0..3000 {
        let m = rand_downloader(&mut rng);
        seen_d[downloader_variant(&m)] += 1;
        let frame = emit_d(&m);
        assert_eq!(DownloaderMsg::parse(payload(&frame)).as_ref(), Ok(&m));
        let m = rand_sharer(&mut rng);
        seen_s[sharer_variant(&m)] += 1;
        let frame = emit_s(&m);
        assert_eq!(SharerMsg::parse(payload(&frame)).as_ref(), Ok(&m));
    }
    assert!(seen_d.iter().all(|n| *n > 0), "{seen_d:?}");
    assert!(seen_s.iter().all(|n| *n > 0), "{seen_s:?}");
}

#[test]
fn round_trip_largest_messages() {
    // A full-size block, and an accept for the largest file that fits the frame limit.
    let mut rng = Rng::new(0x9ee7_0002);
    let block = SharerMsg::Block {
        piece: 9,
        offset: PIECE_LEN - MAX_BLOCK_LEN / 2,
        data: rng.bytes(MAX_BLOCK_LEN as usize),
    };
    let frame = emit_s(&block);
    assert_eq!(payload(&frame).len(), MAX_PEER_FRAME);
    assert_eq!(SharerMsg::parse(payload(&frame)).as_ref(), Ok(&block));

    let mut bf = Bitfield::full(MAX_ACCEPT_PIECES);
    bf.clear(0);
    bf.clear(MAX_ACCEPT_PIECES - 1);
    let accept = SharerMsg::accept(bf);
    let frame = emit_s(&accept);
    assert_eq!(payload(&frame).len(), MAX_PEER_FRAME);
    assert_eq!(SharerMsg::parse(payload(&frame)).as_ref(), Ok(&accept));
}

#[test]
fn downloader_and_sharer_type_bytes_do_not_overlap() {
    for m in sample_downloader_msgs() {
        assert!(SharerMsg::parse(payload(&emit_d(&m))).is_err(), "{m:?}");
    }
    for m in sample_sharer_msgs() {
        assert!(DownloaderMsg::parse(payload(&emit_s(&m))).is_err(), "{m:?}");
    }
}

#[test]
fn over_long_refusal_is_cut_at_a_char_boundary() {
    // 1 + 2 * 600 bytes; byte 1024 falls inside an 'é', so the cut is at 1023.
    let message = format!("a{}", "é".repeat(600));
    let frame = emit_s(&SharerMsg::Refuse {
        code: 7,
        message: message.clone(),
    });
    match SharerMsg::parse(payload(&frame)) {
        Ok(SharerMsg::Refuse { code, message: got }) => {
            assert_eq!(code, 7);
            assert_eq!(got.len(), MAX_REFUSE_LEN - 1);
            assert!(message.starts_with(&got));
        }
        other => panic!("unexpected {other:?}"),
    }
    // Exactly MAX_REFUSE_LEN bytes survive whole.
    let m = SharerMsg::Refuse {
        code: 1,
        message: "m".repeat(MAX_REFUSE_LEN),
    };
    assert_eq!(SharerMsg::parse(payload(&emit_s(&m))), Ok(m));
}

#[test]
fn largest_handshake_fits_the_downloader_limit() {
    let m = DownloaderMsg::handshake(
        gid(&"g".repeat(MAX_ID_LEN)),
        fname(&"n".repeat(MAX_FILE_NAME_LEN)),
        Sha1Digest([1; 20]),
    );
    let frame = emit_d(&m);
    assert_eq!(payload(&frame).len(), MAX_DOWNLOADER_FRAME);
    const { assert!(MAX_DOWNLOADER_FRAME <= MAX_HANDSHAKE_FRAME) };
    // Every other downloader frame is smaller still.
    assert!(payload(&emit_d(&DownloaderMsg::Request(blk(1, 2, 3)))).len() < MAX_DOWNLOADER_FRAME);
}

#[test]
fn debug_of_a_block_does_not_dump_its_data() {
    let m = SharerMsg::Block {
        piece: 1,
        offset: 2,
        data: vec![0xab; MAX_BLOCK_LEN as usize],
    };
    assert_eq!(
        format!("{m:?}"),
        "Block { piece: 1, offset: 2, data_len: 1048576 }"
    );
    assert_eq!(
        format!("{:?}", SharerMsg::Rejected(blk(1, 2, 3))),
        "Rejected(BlockRef { piece: 1, offset: 2, len: 3 })"
    );
    assert_eq!(
        format!("{:?}", SharerMsg::Have { piece: 5 }),
        "Have { piece: 5 }"
    );
}

// ---------------------------------------------------------------------------------------------
// 3, 4. Truncation and trailing bytes
// ---------------------------------------------------------------------------------------------

fn parse_any(
    p: &[u8],
) -> (
    Result<DownloaderMsg, DecodeError>,
    Result<SharerMsg, DecodeError>,
) {
    (DownloaderMsg::parse(p), SharerMsg::parse(p))
}

/// The data of a `Block` payload, if `p` is one.
fn block_data(p: &[u8]) -> Option<&[u8]> {
    match p.first() {
        Some(&0x84) if p.len() > 1 + BLOCK_HEADER_LEN => Some(&p[1 + BLOCK_HEADER_LEN..]),
        _ => None,
    }
}

#[test]
fn every_strict_prefix_is_an_error() {
    let mut rng = Rng::new(0x9ee7_0003);
    for p in valid_payloads(&mut rng, 200) {
        let (d, s) = parse_any(&p);
        assert!(d.is_ok() != s.is_ok(), "exactly one parser accepts {p:?}");
        for i in 0..p.len() {
            let (d, s) = parse_any(&p[..i]);
            assert!(d.is_err(), "prefix {i} of {p:?}: {d:?}");
            if i == 0 {
                assert_eq!(d, Err(DecodeError::EmptyFrame));
                assert_eq!(s, Err(DecodeError::EmptyFrame));
                continue;
            }
            // A block's data runs to the end of the frame, so a prefix that keeps some of it
            // is a shorter block; only the frame's length prefix tells the two apart (see
            // `whole_frame_prefixes_yield_nothing` below).
            if block_data(&p).is_some() && i > 1 + BLOCK_HEADER_LEN {
                match s {
                    Ok(SharerMsg::Block { data, .. }) => assert_eq!(data, p[9..i]),
                    other => panic!("prefix {i} of a block: {other:?}"),
                }
            } else {
                assert!(s.is_err(), "prefix {i} of {p:?}: {s:?}");
            }
        }
    }
}

#[test]
fn whole_frame_prefixes_yield_nothing() {
    // On the stream, where frames are delimited by their length prefix, a strict prefix of any
    // frame (block included) never comes out of the frame buffer.
    let mut rng = Rng::new(0x9ee7_0004);
    for p in valid_payloads(&mut rng, 50) {
        let mut frame = (p.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&p);
        for i in 0..frame.len() {
            let mut fb = FrameBuffer::new(MAX_PEER_FRAME);
            feed(&mut fb, &frame[..i]);
            assert_eq!(fb.next_frame(), Ok(None), "prefix {i} of {frame:?}");
        }
        let mut fb = FrameBuffer::new(MAX_PEER_FRAME);
        feed(&mut fb, &frame);
        assert_eq!(fb.next_frame(), Ok(Some(&p[..])));
    }
}

#[test]
fn trailing_byte_is_an_error() {
    let mut rng = Rng::new(0x9ee7_0005);
    for mut p in valid_payloads(&mut rng, 200) {
        let downloader = DownloaderMsg::parse(&p).is_ok();
        let old_block = block_data(&p).map(<[u8]>::to_vec);
        for extra in [0u8, 1, 0xff] {
            p.push(extra);
            let (d, s) = parse_any(&p);
            assert!(d.is_err(), "{p:?}");
            if downloader {
                assert_eq!(d, Err(DecodeError::TrailingBytes(1)));
                assert!(s.is_err());
            } else if let Some(old) = &old_block {
                // An extra byte on a block is one more byte of data.
                match s {
                    Ok(SharerMsg::Block { data, .. }) => {
                        assert_eq!(data[..old.len()], old[..]);
                        assert_eq!(data[old.len()..], [extra]);
                    }
                    other => panic!("{other:?}"),
                }
            } else {
                assert_eq!(s, Err(DecodeError::TrailingBytes(1)));
            }
            p.pop();
        }
    }
}

#[test]
fn accept_with_more_bitfield_bytes_than_pieces_need_is_an_error() {
    let accept = |n: u32, bits: &[u8]| {
        B::ty(0x81)
            .raw(&MAGIC)
            .u16(PROTOCOL_VERSION)
            .u32(n)
            .raw(bits)
            .0
    };
    assert!(SharerMsg::parse(&accept(10, &[0, 0])).is_ok());
    assert_eq!(
        SharerMsg::parse(&accept(10, &[0, 0, 0])),
        Err(DecodeError::TrailingBytes(1))
    );
    assert_eq!(
        SharerMsg::parse(&accept(0, &[0])),
        Err(DecodeError::TrailingBytes(1))
    );
    assert_eq!(
        SharerMsg::parse(&accept(10, &[0])),
        Err(DecodeError::Truncated)
    );
    assert_eq!(
        SharerMsg::parse(&accept(9, &[0xff])),
        Err(DecodeError::Truncated)
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Invalid fields in otherwise well-formed frames
// ---------------------------------------------------------------------------------------------

fn handshake(group: &[u8], name: &[u8]) -> Vec<u8> {
    B::ty(0x01)
        .raw(&MAGIC)
        .u16(PROTOCOL_VERSION)
        .s(group)
        .s(name)
        .sha(0xaa)
        .0
}

#[test]
fn well_formed_builder_frames_parse() {
    // The builder itself is right: a valid frame built with it parses, so the failures below
    // come from the one field that was broken.
    assert!(DownloaderMsg::parse(&handshake(b"g", b"f")).is_ok());
    assert!(DownloaderMsg::parse(&B::ty(0x10).block(1, 2, 3).0).is_ok());
    assert!(DownloaderMsg::parse(&B::ty(0x11).block(1, 2, 3).0).is_ok());
    assert!(SharerMsg::parse(&B::ty(0x85).block(1, 2, 3).0).is_ok());
    assert!(SharerMsg::parse(&B::ty(0x82).u16(1).s(b"x").0).is_ok());
    assert!(SharerMsg::parse(&B::ty(0x83).u32(1).0).is_ok());
    assert!(SharerMsg::parse(&B::ty(0x84).u32(1).u32(2).u8(3).0).is_ok());
}

#[test]
fn block_ref_length_must_be_1_to_max() {
    let bad = Err(DecodeError::BadValue("block length"));
    for t in [0x10u8, 0x11] {
        for len in [0, MAX_BLOCK_LEN + 1, u32::MAX, 1 << 31] {
            assert_eq!(
                DownloaderMsg::parse(&B::ty(t).block(1, 0, len).0),
                bad,
                "{t:#04x} len {len}"
            );
        }
        for len in [1, 2, 16 * 1024, MAX_BLOCK_LEN] {
            assert!(DownloaderMsg::parse(&B::ty(t).block(1, 0, len).0).is_ok());
        }
    }
    for len in [0, MAX_BLOCK_LEN + 1, u32::MAX] {
        assert_eq!(
            SharerMsg::parse(&B::ty(0x85).block(1, 0, len).0),
            Err(DecodeError::BadValue("block length"))
        );
    }
    assert!(SharerMsg::parse(&B::ty(0x85).block(1, 0, MAX_BLOCK_LEN).0).is_ok());
}

#[test]
fn block_data_must_be_1_to_max() {
    let bad = Err(DecodeError::BadValue("block length"));
    let block = |n: usize| B::ty(0x84).u32(1).u32(2).raw(&vec![7; n]).0;
    assert_eq!(SharerMsg::parse(&block(0)), bad);
    assert_eq!(SharerMsg::parse(&block(MAX_BLOCK_LEN as usize + 1)), bad);
    assert!(SharerMsg::parse(&block(1)).is_ok());
    assert!(SharerMsg::parse(&block(MAX_BLOCK_LEN as usize)).is_ok());
    // Shorter than its header.
    for n in 0..BLOCK_HEADER_LEN {
        let p = B::ty(0x84).raw(&vec![0; n]).0;
        assert_eq!(SharerMsg::parse(&p), Err(DecodeError::Truncated), "{n}");
    }
}

#[test]
fn bitfield_spare_bits_are_rejected() {
    let accept = |n: u32, bits: &[u8]| {
        B::ty(0x81)
            .raw(&MAGIC)
            .u16(PROTOCOL_VERSION)
            .u32(n)
            .raw(bits)
            .0
    };
    let bad = Err(DecodeError::BadValue("bitfield spare bits"));
    assert_eq!(SharerMsg::parse(&accept(10, &[0, 0x20])), bad);
    assert_eq!(SharerMsg::parse(&accept(10, &[0xff, 0xff])), bad);
    assert_eq!(SharerMsg::parse(&accept(1, &[0x40])), bad);
    assert_eq!(SharerMsg::parse(&accept(7, &[0x01])), bad);
    assert_eq!(SharerMsg::parse(&accept(15, &[0, 0x01])), bad);
    // The last used bit is not a spare bit.
    assert_eq!(
        SharerMsg::parse(&accept(10, &[0, 0x40])),
        Ok(SharerMsg::accept(bits(10, &[9])))
    );
    assert_eq!(
        SharerMsg::parse(&accept(16, &[0xff, 0xff])),
        Ok(SharerMsg::accept(Bitfield::full(16)))
    );
}

#[test]
fn bad_magic_is_rejected() {
    assert_eq!(
        DownloaderMsg::parse(&B::ty(0x01).raw(b"P2PH").u16(1).s(b"g").s(b"f").sha(0).0),
        Err(DecodeError::BadMagic(0x5032_5048))
    );
    assert_eq!(
        DownloaderMsg::parse(&B::ty(0x01).u32(0).u16(1).s(b"g").s(b"f").sha(0).0),
        Err(DecodeError::BadMagic(0))
    );
    assert_eq!(
        SharerMsg::parse(&B::ty(0x81).raw(&[0x47, 0x50, 0x32, 0x50]).u16(1).u32(0).0),
        Err(DecodeError::BadMagic(0x4750_3250))
    );
    assert_eq!(
        SharerMsg::parse(&B::ty(0x81).u32(u32::MAX).u16(1).u32(0).0),
        Err(DecodeError::BadMagic(u32::MAX))
    );
    assert!(SharerMsg::parse(&B::ty(0x81).raw(&MAGIC).u16(PROTOCOL_VERSION).u32(0).0).is_ok());
}

#[test]
fn invalid_handshake_fields_are_rejected() {
    let cases: Vec<(&str, Vec<u8>, DecodeError)> = vec![
        (
            "empty group",
            handshake(b"", b"f"),
            DecodeError::BadId(IdError::Empty),
        ),
        (
            "65-byte group",
            handshake(&[b'g'; 65], b"f"),
            DecodeError::BadValue("string too long"),
        ),
        (
            "space in group",
            handshake(b"a b", b"f"),
            DecodeError::BadId(IdError::WhiteSpaceOrControl),
        ),
        (
            "non-utf8 group",
            handshake(&[b'a', 0xff], b"f"),
            DecodeError::NotUtf8,
        ),
        (
            "empty name",
            handshake(b"g", b""),
            DecodeError::BadId(IdError::Empty),
        ),
        (
            "slash in name",
            handshake(b"g", b"a/b"),
            DecodeError::BadId(IdError::NotABaseName),
        ),
        (
            "dot-dot name",
            handshake(b"g", b".."),
            DecodeError::BadId(IdError::NotABaseName),
        ),
        (
            "newline in name",
            handshake(b"g", b"a\nb"),
            DecodeError::BadId(IdError::WhiteSpaceOrControl),
        ),
        (
            "256-byte name",
            handshake(b"g", &[b'f'; 256]),
            DecodeError::BadValue("string too long"),
        ),
        (
            "non-utf8 name",
            handshake(b"g", &[0xed, 0xa0, 0x80]),
            DecodeError::NotUtf8,
        ),
    ];
    for (what, p, want) in cases {
        assert_eq!(DownloaderMsg::parse(&p), Err(want), "{what}");
    }
    assert!(DownloaderMsg::parse(&handshake(&[b'g'; 64], &[b'f'; 255])).is_ok());
}

#[test]
fn invalid_refusals_are_rejected() {
    assert_eq!(
        SharerMsg::parse(&B::ty(0x82).u16(1).s(&[0xff]).0),
        Err(DecodeError::NotUtf8)
    );
    assert_eq!(
        SharerMsg::parse(&B::ty(0x82).u16(1).s(&[b'm'; MAX_REFUSE_LEN + 1]).0),
        Err(DecodeError::BadValue("string too long"))
    );
    // A length prefix beyond the bytes that follow.
    assert_eq!(
        SharerMsg::parse(&B::ty(0x82).u16(1).u16(5).raw(b"abc").0),
        Err(DecodeError::Truncated)
    );
}

#[test]
fn unknown_frame_types_are_rejected() {
    let downloader_types = [0x01u8, 0x10, 0x11, 0x12];
    let sharer_types = [0x81u8, 0x82, 0x83, 0x84, 0x85];
    for t in 0..=255u8 {
        // A body long enough for any fixed-size message, so the type is what fails.
        let p = B::ty(t).raw(&[0; 16]).0;
        if !downloader_types.contains(&t) {
            assert_eq!(
                DownloaderMsg::parse(&p),
                Err(DecodeError::UnknownType(t)),
                "downloader, type {t:#04x}"
            );
        }
        if !sharer_types.contains(&t) {
            assert_eq!(
                SharerMsg::parse(&p),
                Err(DecodeError::UnknownType(t)),
                "sharer, type {t:#04x}"
            );
        }
        // No parser panics on a type byte alone either.
        let _ = parse_any(&[t]);
    }
}

#[test]
fn empty_payload_is_an_error() {
    assert_eq!(DownloaderMsg::parse(&[]), Err(DecodeError::EmptyFrame));
    assert_eq!(SharerMsg::parse(&[]), Err(DecodeError::EmptyFrame));
}

// ---------------------------------------------------------------------------------------------
// 6. Forged counts
// ---------------------------------------------------------------------------------------------

#[test]
fn forged_piece_counts_fail_fast() {
    let started = Instant::now();
    for n in [u32::MAX, u32::MAX - 7, 1 << 31, 1 << 24, 25] {
        // A few bitfield bytes where `n` pieces need far more.
        let p = B::ty(0x81)
            .raw(&MAGIC)
            .u16(PROTOCOL_VERSION)
            .u32(n)
            .raw(&[0xff; 3])
            .0;
        assert_eq!(SharerMsg::parse(&p), Err(DecodeError::Truncated), "{n}");
    }
    // A count far larger than any frame could carry, with no bytes after it at all.
    let p = B::ty(0x81)
        .raw(&MAGIC)
        .u16(PROTOCOL_VERSION)
        .u32(u32::MAX)
        .0;
    assert_eq!(SharerMsg::parse(&p), Err(DecodeError::Truncated));
    // Allocating ceil(u32::MAX / 8) bytes per case would take visible time; the checks above
    // returned errors, and quickly.
    assert!(started.elapsed() < Duration::from_secs(1));
}

// ---------------------------------------------------------------------------------------------
// 7. Random bytes and mutations never panic
// ---------------------------------------------------------------------------------------------

const KNOWN_TYPES: &[u8] = &[0x01, 0x10, 0x11, 0x81, 0x82, 0x83, 0x84, 0x85];

/// Parses with both parsers; whatever one accepts must re-emit to exactly the same bytes (the
/// encoding is canonical), so parse-then-emit can never smuggle a different message through.
fn check_no_panic_and_canonical(p: &[u8]) -> bool {
    let mut ok = false;
    if let Ok(m) = DownloaderMsg::parse(p) {
        assert_eq!(payload(&emit_d(&m)), p, "{m:?}");
        ok = true;
    }
    if let Ok(m) = SharerMsg::parse(p) {
        assert_eq!(payload(&emit_s(&m)), p, "{m:?}");
        assert!(!ok, "both parsers accepted {p:?}");
        ok = true;
    }
    ok
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng::new(0x9ee7_0007);
    let mut buf = [0u8; 300];
    let mut accepted = 0usize;
    for _ in 0..200_000 {
        let len = rng.below(300);
        let p = &mut buf[..len];
        rng.fill(p);
        if len > 0 && rng.chance(1, 2) {
            p[0] = *rng.pick(KNOWN_TYPES);
        }
        if len > 4 && rng.chance(1, 4) {
            // Give handshakes a chance to get past their magic.
            p[1..5].copy_from_slice(&MAGIC);
        }
        if check_no_panic_and_canonical(p) {
            accepted += 1;
        }
    }
    // Blocks and haves accept most bodies, so random input does reach the canonical check.
    assert!(accepted > 0);
}

fn mutate(rng: &mut Rng, p: &mut Vec<u8>) {
    for _ in 0..rng.between(1, 4) {
        match rng.below(5) {
            0 if !p.is_empty() => {
                // Flip one bit.
                let i = rng.below(p.len());
                p[i] ^= 1 << rng.below(8);
            }
            1 if !p.is_empty() => {
                // Overwrite a byte, favouring boundary values.
                let i = rng.below(p.len());
                let any = rng.byte();
                p[i] = *rng.pick(&[0, 1, 2, 3, 4, 5, 6, 0x7f, 0x80, 0xfe, 0xff, any]);
            }
            2 => {
                let i = rng.below(p.len() + 1);
                p.insert(i, rng.byte());
            }
            3 if !p.is_empty() => {
                let i = rng.below(p.len());
                p.remove(i);
            }
            _ if p.len() >= 4 => {
                // Overwrite four bytes with a big-endian boundary value (counts, lengths).
                let i = rng.below(p.len() - 3);
                let v: u32 = *rng.pick(&[
                    0,
                    1,
                    0xff,
                    0xffff,
                    0x1_0000,
                    MAX_BLOCK_LEN,
                    MAX_BLOCK_LEN + 1,
                    u32::MAX,
                    u32::MAX / 2,
                ]);
                p[i..i + 4].copy_from_slice(&v.to_be_bytes());
            }
            _ => p.push(rng.byte()),
        }
    }
}

#[test]
fn mutated_valid_frames_never_panic() {
    let mut rng = Rng::new(0x9ee7_0008);
    let corpus = valid_payloads(&mut rng, 100);
    let mut accepted = 0usize;
    for _ in 0..100_000 {
        let mut p = rng.pick(&corpus).clone();
        mutate(&mut rng, &mut p);
        if check_no_panic_and_canonical(&p) {
            accepted += 1;
        }
    }
    // The mutations reach past the first field: some survive as other valid messages.
    assert!(accepted > 0);
}

// ---------------------------------------------------------------------------------------------
// 8. Frame limits
// ---------------------------------------------------------------------------------------------

#[test]
fn limits_are_what_the_docs_say() {
    assert_eq!(MAX_BLOCK_LEN, 1_048_576);
    assert_eq!(MAX_PEER_FRAME, 1 + 8 + 1_048_576);
    assert_eq!(MAX_ACCEPT_PIECES, 8 * (MAX_PEER_FRAME - 11));
    // About 4 TiB of 512 KiB pieces.
    let max_file = MAX_ACCEPT_PIECES as u64 * u64::from(PIECE_LEN);
    assert!(max_file > (4u64 << 40) - (1 << 30), "{max_file}");
    assert!(max_file <= 4u64 << 40, "{max_file}");
    assert_eq!(MAX_DOWNLOADER_FRAME, 350);
}

#[test]
fn one_piece_more_than_the_largest_accept_does_not_fit() {
    let frame = emit_s(&SharerMsg::accept(Bitfield::new(MAX_ACCEPT_PIECES + 1)));
    let mut fb = FrameBuffer::new(MAX_PEER_FRAME);
    feed(&mut fb, &frame[..LEN_PREFIX]);
    assert_eq!(
        fb.next_frame(),
        Err(DecodeError::FrameTooLarge {
            len: MAX_PEER_FRAME + 1,
            max: MAX_PEER_FRAME
        })
    );
}

#[test]
fn oversized_frames_are_refused_at_the_length_prefix() {
    // A block one byte over the limit is refused by the frame buffer as soon as its length
    // prefix arrives, and by `parse` if it got that far.
    let data = vec![1u8; MAX_BLOCK_LEN as usize + 1];
    let mut frame = Vec::new();
    emit_block_header(&mut frame, 1, 0, data.len());
    let mut fb = FrameBuffer::new(MAX_PEER_FRAME);
    feed(&mut fb, &frame);
    assert_eq!(
        fb.next_frame(),
        Err(DecodeError::FrameTooLarge {
            len: MAX_PEER_FRAME + 1,
            max: MAX_PEER_FRAME
        })
    );
    let p = B::ty(0x84).u32(1).u32(0).raw(&data).0;
    assert_eq!(
        SharerMsg::parse(&p),
        Err(DecodeError::BadValue("block length"))
    );

    // A sharer holding its link to the downloader limit refuses a large frame outright.
    let mut fb = FrameBuffer::new(MAX_DOWNLOADER_FRAME);
    feed(&mut fb, &(MAX_DOWNLOADER_FRAME as u32 + 1).to_be_bytes());
    assert!(matches!(
        fb.next_frame(),
        Err(DecodeError::FrameTooLarge { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// 9. Zero-copy block helpers
// ---------------------------------------------------------------------------------------------

#[test]
fn block_header_plus_data_is_the_block_frame() {
    let mut rng = Rng::new(0x9ee7_0009);
    let mut lens: Vec<usize> = vec![1, 2, 7, 8, 9, 16 * 1024, MAX_BLOCK_LEN as usize];
    lens.extend((0..50).map(|_| rng.between(1, 5000)));
    for len in lens {
        let (piece, offset) = (rng.u32(), rng.u32());
        let data = rng.bytes(len);
        let mut split = vec![0xee];
        emit_block_header(&mut split, piece, offset, data.len());
        assert_eq!(split.len(), 1 + LEN_PREFIX + 1 + BLOCK_HEADER_LEN);
        split.extend_from_slice(&data);

        let mut whole = vec![0xee];
        SharerMsg::Block {
            piece,
            offset,
            data: data.clone(),
        }
        .emit(&mut whole);
        assert!(split == whole, "piece {piece} offset {offset} len {len}");

        // The receive side: read the prefix, the type and the header on their own.
        let frame = &whole[1..];
        let frame_len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(frame[4], 0x84);
        assert_eq!(block_data_len(frame_len), Ok(len));
        assert_eq!(parse_block_header(&frame[5..13]), Ok((piece, offset)));
        // Extra bytes after the header (the start of the data) are ignored.
        assert_eq!(parse_block_header(&frame[5..]), Ok((piece, offset)));
        assert_eq!(&frame[13..], &data[..]);
    }
}

#[test]
fn golden_block_header() {
    let mut out = Vec::new();
    emit_block_header(&mut out, 0x0102_0304, 0x0506_0708, 3);
    assert_eq!(out, [0, 0, 0, 12, 0x84, 1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(
        parse_block_header(&[1, 2, 3, 4, 5, 6, 7, 8]),
        Ok((0x0102_0304, 0x0506_0708))
    );
}

#[test]
fn block_header_helpers_never_panic() {
    for n in 0..BLOCK_HEADER_LEN {
        assert_eq!(
            parse_block_header(&vec![0xff; n]),
            Err(DecodeError::Truncated)
        );
    }
    // A data length no frame can carry saturates the length prefix rather than panicking.
    let mut out = Vec::new();
    emit_block_header(&mut out, 1, 2, usize::MAX);
    assert_eq!(out[..4], [0xff; 4]);
    assert_eq!(out.len(), 4 + 1 + BLOCK_HEADER_LEN);
    assert_eq!(
        block_data_len(usize::MAX),
        Err(DecodeError::BadValue("block length"))
    );
}

#[test]
fn block_data_len_agrees_with_parse() {
    // For every frame length around the edges, `block_data_len` gives what `parse` gives.
    let big = vec![0u8; MAX_PEER_FRAME + 2];
    let edges = (1..=12).chain(MAX_PEER_FRAME - 2..=MAX_PEER_FRAME + 2);
    for frame_len in edges {
        let mut p = big[..frame_len].to_vec();
        p[0] = 0x84;
        let want = SharerMsg::parse(&p).map(|m| match m {
            SharerMsg::Block { data, .. } => data.len(),
            other => panic!("{other:?}"),
        });
        assert_eq!(block_data_len(frame_len), want, "frame length {frame_len}");
    }
}

// ---------------------------------------------------------------------------------------------
// 10. FrameBuffer reassembly
// ---------------------------------------------------------------------------------------------

#[derive(Debug, PartialEq)]
enum Either {
    D(DownloaderMsg),
    S(SharerMsg),
}

fn feed(fb: &mut FrameBuffer, bytes: &[u8]) {
    let spare = fb.spare();
    assert!(spare.len() >= bytes.len());
    spare[..bytes.len()].copy_from_slice(bytes);
    fb.commit(bytes.len());
}

fn drain(fb: &mut FrameBuffer, got: &mut Vec<Either>) {
    while let Some(p) = fb.next_frame().unwrap() {
        let m = match DownloaderMsg::parse(p) {
            Ok(m) => Either::D(m),
            Err(_) => Either::S(SharerMsg::parse(p).unwrap()),
        };
        got.push(m);
    }
}

#[test]
fn frame_buffer_random_chunks_yield_the_same_messages() {
    let mut rng = Rng::new(0x9ee7_000a);
    let mut stream = Vec::new();
    let mut want = Vec::new();
    for m in sample_downloader_msgs() {
        m.emit(&mut stream);
        want.push(Either::D(m));
    }
    for m in sample_sharer_msgs() {
        m.emit(&mut stream);
        want.push(Either::S(m));
    }
    // One full-size block in the middle of the stream.
    let big = SharerMsg::Block {
        piece: 1,
        offset: 0,
        data: rng.bytes(MAX_BLOCK_LEN as usize),
    };
    big.emit(&mut stream);
    want.push(Either::S(big));
    for _ in 0..300 {
        if rng.chance(1, 2) {
            let m = rand_downloader(&mut rng);
            m.emit(&mut stream);
            want.push(Either::D(m));
        } else {
            let m = rand_sharer(&mut rng);
            m.emit(&mut stream);
            want.push(Either::S(m));
        }
    }
    for _ in 0..3 {
        let mut fb = FrameBuffer::new(MAX_PEER_FRAME);
        let mut got = Vec::new();
        let mut rest = &stream[..];
        while !rest.is_empty() {
            let n = rng.between(1, 70_000).min(rest.len()).min(fb.spare().len());
            feed(&mut fb, &rest[..n]);
            rest = &rest[n..];
            drain(&mut fb, &mut got);
        }
        assert_eq!(fb.buffered(), 0);
        assert!(got == want, "{} messages, {} wanted", got.len(), want.len());
    }
}
