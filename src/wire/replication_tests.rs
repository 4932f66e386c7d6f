//! Tests of the tracker-to-tracker messages: golden bytes written out by hand from the layouts in
//! the module documentation, round trips of every message, op and entry, truncation at every
//! offset, trailing bytes, invalid fields, forged counts, and seeded random and mutation fuzzing
//! (parse never panics, and whatever parses re-emits to the same bytes).

use super::*;
use crate::rng::SplitMix64 as Rng;
use crate::testing::{cat, fname, gid, rand_str, uid, B};
use crate::wire::frame::LEN_PREFIX;
use crate::wire::ids::{
    FileName, GroupId, IdError, Sha1Digest, UserId, MAX_FILE_NAME_LEN, MAX_ID_LEN,
};
use crate::wire::tracker_link::{ClientMsg, RequestBody, Role, MAX_PIECE_LEN};
use crate::wire::{PIECE_LEN, PROTOCOL_VERSION};

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn tref(no: u16, incarnation: u64) -> TrackerRef {
    TrackerRef { no, incarnation }
}

fn meta(name: &str, size: u64, piece_len: u32) -> FileMeta {
    let n = FileMeta::n_pieces_for(size, piece_len);
    FileMeta {
        name: fname(name),
        size,
        piece_len,
        file_sha1: Sha1Digest([0xaa; 20]),
        piece_hashes: (0..n).map(|i| Sha1Digest([i as u8; 20])).collect(),
    }
}

fn emit(m: &ReplMsg) -> Vec<u8> {
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

fn op_bytes(op: &Op) -> Vec<u8> {
    let mut out = Vec::new();
    encode_op(&mut out, op);
    out
}

fn entry_bytes(e: &Entry) -> Vec<u8> {
    let mut out = Vec::new();
    encode_entry(&mut out, e);
    out
}

/// Decodes exactly one entry from `bytes`.
fn decode_entry_all(bytes: &[u8]) -> Result<Entry, DecodeError> {
    let mut r = Reader::new(bytes);
    let e = decode_entry(&mut r)?;
    r.finish()?;
    Ok(e)
}

const MAGIC: [u8; 4] = [0x50, 0x32, 0x50, 0x47];

// ---------------------------------------------------------------------------------------------
// Samples covering every variant
// ---------------------------------------------------------------------------------------------

/// Index of the op variant, by an exhaustive match: a new op breaks the build here until the
/// samples and the generator cover it.
fn op_variant(op: &Op) -> usize {
    match op {
        Op::CreateUser { .. } => 0,
        Op::OpenSession { .. } => 1,
        Op::ResumeSession { .. } => 2,
        Op::CloseSession { .. } => 3,
        Op::ClientGone { .. } => 4,
        Op::ExpireSessions { .. } => 5,
        Op::CreateGroup { .. } => 6,
        Op::JoinGroup { .. } => 7,
        Op::LeaveGroup { .. } => 8,
        Op::AcceptRequest { .. } => 9,
        Op::RejectRequest { .. } => 10,
        Op::ShareFile { .. } => 11,
        Op::StopShare { .. } => 12,
        Op::SyncShares { .. } => 13,
    }
}
const OP_VARIANTS: usize = 14;

fn msg_variant(m: &ReplMsg) -> usize {
    match m {
        ReplMsg::Hello { .. } => 0,
        ReplMsg::Status(ReplStatus::Starting { .. }) => 1,
        ReplMsg::Status(ReplStatus::Serving { .. }) => 2,
        ReplMsg::Heartbeat => 3,
        ReplMsg::Forward { .. } => 4,
        ReplMsg::Batch(_) => 5,
        ReplMsg::Ack { .. } => 6,
        ReplMsg::Commit { .. } => 7,
        ReplMsg::Takeover { .. } => 8,
        ReplMsg::TakeoverAck { catchup, .. } => match catchup {
            Catchup::None => 9,
            Catchup::Batch(_) => 10,
            Catchup::Snapshot => 11,
        },
        ReplMsg::JoinRequest(None) => 12,
        ReplMsg::SnapshotPart { .. } => 13,
        ReplMsg::Snapshot { .. } => 14,
        ReplMsg::JoinRequest(Some(_)) => 15,
        ReplMsg::SuffixPart(_) => 16,
        ReplMsg::Suffix { .. } => 17,
    }
}
const MSG_VARIANTS: usize = 18;

fn sample_ops() -> Vec<Op> {
    let v4: SocketAddr = "10.0.0.7:6881".parse().unwrap();
    let v6: SocketAddr = "[fe80::1:2:3]:65535".parse().unwrap();
    let long_id = "u".repeat(MAX_ID_LEN);
    let long_name = "n".repeat(MAX_FILE_NAME_LEN);
    vec![
        Op::CreateUser {
            user: uid("alice"),
            pw_hash: "$argon2id$v=19$m=8192,t=2,p=1$c2FsdA$aGFzaA".to_owned(),
        },
        Op::CreateUser {
            user: uid(&long_id),
            pw_hash: "h".repeat(MAX_PW_HASH_LEN),
        },
        Op::CreateUser {
            user: uid("grüße"),
            pw_hash: String::new(),
        },
        Op::OpenSession {
            user: uid("bob"),
            peer_addr: v4,
            tracker: tref(1, 0x0102_0304_0506_0708),
            client: 42,
            token: [0x11; 16],
            shares: None,
            client_key: [0; 32],
            link: 0,
        },
        Op::OpenSession {
            user: uid("carol"),
            peer_addr: v6,
            tracker: tref(u16::MAX, u64::MAX),
            client: u64::MAX,
            token: *b"0123456789abcdef",
            shares: None,
            client_key: [0; 32],
            link: u64::MAX,
        },
        Op::ResumeSession {
            token: [0xfe; 16],
            tracker: tref(2, 7),
            client: 9,
            link: 0,
        },
        Op::ResumeSession {
            token: [0xfd; 16],
            tracker: tref(2, 8),
            client: 10,
            link: 1,
        },
        Op::CloseSession {
            session: SessionId(1),
            tracker: tref(1, 1),
        },
        Op::CloseSession {
            session: SessionId(u64::MAX),
            tracker: tref(0, 0),
        },
        Op::ClientGone {
            client: 77,
            tracker: tref(3, 33),
            link: 0,
        },
        Op::ClientGone {
            client: 78,
            tracker: tref(3, 34),
            link: 2,
        },
        Op::ExpireSessions {
            tracker: tref(4, 44),
        },
        Op::CreateGroup {
            session: SessionId(2),
            group: gid("g"),
            quotas: None,
        },
        Op::JoinGroup {
            session: SessionId(3),
            group: gid(&long_id),
            quotas: None,
        },
        Op::CreateGroup {
            session: SessionId(2),
            group: gid("g"),
            quotas: Some(sample_quotas()),
        },
        Op::JoinGroup {
            session: SessionId(3),
            group: gid(&long_id),
            quotas: Some(OpQuotas {
                groups_owned: 0,
                requests: u64::MAX,
                files: 1,
                metadata: 0,
                state_bytes: 7,
            }),
        },
        Op::LeaveGroup {
            session: SessionId(4),
            group: gid("grp-1"),
        },
        Op::AcceptRequest {
            session: SessionId(5),
            group: gid("grp"),
            user: uid("dave"),
        },
        Op::RejectRequest {
            session: SessionId(6),
            group: gid("grp"),
            user: uid("eve"),
        },
        Op::ShareFile {
            session: SessionId(7),
            group: gid("grp"),
            meta: meta("empty file", 0, PIECE_LEN),
            quotas: None,
        },
        Op::ShareFile {
            session: SessionId(8),
            group: gid("grp"),
            meta: meta(&long_name, 3 * u64::from(PIECE_LEN) - 1, PIECE_LEN),
            quotas: None,
        },
        Op::ShareFile {
            session: SessionId(9),
            group: gid("grp"),
            meta: meta("big pieces", u64::from(MAX_PIECE_LEN) + 1, MAX_PIECE_LEN),
            quotas: None,
        },
        Op::ShareFile {
            session: SessionId(9),
            group: gid("grp"),
            meta: meta("big pieces", u64::from(MAX_PIECE_LEN) + 1, MAX_PIECE_LEN),
            quotas: Some(sample_quotas()),
        },
        Op::StopShare {
            session: SessionId(10),
            group: gid("grp"),
            name: fname("my file.txt"),
        },
        Op::SyncShares {
            session: SessionId(11),
            keep: vec![],
        },
        Op::SyncShares {
            session: SessionId(12),
            keep: vec![(gid("grp"), fname("my file.txt")), (gid("g2"), fname("x"))],
        },
    ]
}

/// Every sample op, without an origin and with one.
fn sample_entries() -> Vec<Entry> {
    let mut out = Vec::new();
    for (i, op) in sample_ops().into_iter().enumerate() {
        out.push(Entry {
            origin: None,
            op: op.clone(),
        });
        out.push(Entry {
            origin: Some(Origin {
                client: i as u64 * 1000 + 1,
                req_id: if i % 2 == 0 { u64::MAX } else { i as u64 },
            }),
            op,
        });
    }
    out
}

fn sample_batch() -> Batch {
    Batch {
        view: 3,
        first_seq: 100,
        entries: sample_entries(),
    }
}

fn sample_msgs() -> Vec<ReplMsg> {
    vec![
        ReplMsg::Hello {
            version: PROTOCOL_VERSION,
            tracker: tref(1, 0xdead_beef),
        },
        ReplMsg::Hello {
            version: u16::MAX,
            tracker: tref(u16::MAX, u64::MAX),
        },
        ReplMsg::Status(ReplStatus::Starting {
            view: 0,
            applied: 0,
            waiting: 0,
            founder: false,
        }),
        ReplMsg::Status(ReplStatus::Starting {
            view: u64::MAX,
            applied: u64::MAX,
            waiting: u64::MAX,
            founder: true,
        }),
        ReplMsg::Status(ReplStatus::Serving {
            view: 0,
            primary: 1,
        }),
        ReplMsg::Status(ReplStatus::Serving {
            view: u64::MAX,
            primary: u16::MAX,
        }),
        ReplMsg::Heartbeat,
        ReplMsg::Forward { entries: vec![] },
        ReplMsg::Forward {
            entries: sample_entries(),
        },
        ReplMsg::Batch(Batch {
            view: 0,
            first_seq: 0,
            entries: vec![],
        }),
        ReplMsg::Batch(sample_batch()),
        ReplMsg::Ack { view: 1, seq: 2 },
        ReplMsg::Ack {
            view: u64::MAX,
            seq: u64::MAX,
        },
        ReplMsg::Commit { view: 3, seq: 4 },
        ReplMsg::Takeover {
            view: 5,
            applied: 6,
        },
        ReplMsg::TakeoverAck {
            view: 7,
            serving: true,
            applied: 8,
            catchup: Catchup::None,
        },
        ReplMsg::TakeoverAck {
            view: 7,
            serving: false,
            applied: 9,
            catchup: Catchup::Batch(sample_batch()),
        },
        ReplMsg::TakeoverAck {
            view: 7,
            serving: false,
            applied: 0,
            catchup: Catchup::Snapshot,
        },
        ReplMsg::JoinRequest(None),
        ReplMsg::JoinRequest(Some(JoinPosition {
            applied: 9,
            view: 3,
            primary: 2,
        })),
        ReplMsg::SuffixPart(sample_batch()),
        ReplMsg::Suffix { view: 4, seq: 10 },
        ReplMsg::SnapshotPart { data: vec![] },
        ReplMsg::SnapshotPart {
            data: (0..=255).collect(),
        },
        ReplMsg::Snapshot {
            view: 1,
            seq: 2,
            len: 0,
        },
        ReplMsg::Snapshot {
            view: u64::MAX,
            seq: u64::MAX,
            len: MAX_SNAPSHOT_LEN,
        },
    ]
}

// ---------------------------------------------------------------------------------------------
// Random valid messages
// ---------------------------------------------------------------------------------------------

const ID_CHARS: &[char] = &['a', 'z', 'A', '0', '_', '-', '.', '/', 'é', 'ß', '中', '😀'];
const NAME_CHARS: &[char] = &['a', 'z', 'A', '0', '_', '.', ' ', 'é', '中', '😀', '#'];

fn rand_user(rng: &mut Rng) -> UserId {
    uid(&rand_str(rng, ID_CHARS, MAX_ID_LEN))
}

fn rand_group(rng: &mut Rng) -> GroupId {
    gid(&rand_str(rng, ID_CHARS, MAX_ID_LEN))
}

fn rand_name(rng: &mut Rng) -> FileName {
    loop {
        if let Ok(n) = FileName::new(&rand_str(rng, NAME_CHARS, MAX_FILE_NAME_LEN)) {
            return n;
        }
    }
}

fn rand_sha(rng: &mut Rng) -> Sha1Digest {
    let mut d = [0u8; 20];
    rng.fill(&mut d);
    Sha1Digest(d)
}

fn rand_token(rng: &mut Rng) -> [u8; 16] {
    let mut t = [0u8; 16];
    rng.fill(&mut t);
    t
}

fn rand_addr(rng: &mut Rng) -> SocketAddr {
    let port = rng.next_u64() as u16;
    if rng.percent(50) {
        SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(rng.next_u64() as u32),
            port,
        ))
    } else {
        let ip = Ipv6Addr::from((u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64()));
        SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0))
    }
}

fn rand_tref(rng: &mut Rng) -> TrackerRef {
    tref(rng.next_u64() as u16, rng.next_u64())
}

fn rand_meta(rng: &mut Rng) -> FileMeta {
    let piece_len = *rng.pick(&[1, 2, 1000, PIECE_LEN, MAX_PIECE_LEN]);
    let n = rng.below(5) as u64;
    let size = if n == 0 {
        0
    } else {
        let pl = u64::from(piece_len);
        (n - 1) * pl + 1 + rng.next_u64() % pl
    };
    FileMeta {
        name: rand_name(rng),
        size,
        piece_len,
        file_sha1: rand_sha(rng),
        piece_hashes: (0..n).map(|_| rand_sha(rng)).collect(),
    }
}

fn rand_session(rng: &mut Rng) -> SessionId {
    SessionId(if rng.percent(50) {
        rng.below(100) as u64
    } else {
        rng.next_u64()
    })
}

fn sample_quotas() -> OpQuotas {
    OpQuotas {
        groups_owned: 1000,
        requests: 2,
        files: 10_000,
        metadata: 256 << 20,
        state_bytes: 2 << 30,
    }
}

/// Quotas or none, at random.
fn rand_quotas(rng: &mut Rng) -> Option<OpQuotas> {
    if rng.below(2) == 0 {
        return None;
    }
    Some(OpQuotas {
        groups_owned: rng.next_u64(),
        requests: rng.next_u64(),
        files: rng.next_u64(),
        metadata: rng.next_u64(),
        state_bytes: rng.next_u64(),
    })
}

/// A client's link number: not numbered (0) half the time.
fn rand_link(rng: &mut Rng) -> u64 {
    if rng.below(2) == 0 {
        0
    } else {
        rng.next_u64().max(1)
    }
}

fn rand_op(rng: &mut Rng) -> Op {
    match rng.below(OP_VARIANTS) {
        0 => Op::CreateUser {
            user: rand_user(rng),
            pw_hash: rand_str(rng, ID_CHARS, MAX_PW_HASH_LEN),
        },
        1 => Op::OpenSession {
            user: rand_user(rng),
            peer_addr: rand_addr(rng),
            tracker: rand_tref(rng),
            client: rng.next_u64(),
            token: rand_token(rng),
            shares: None,
            client_key: [0; 32],
            link: rand_link(rng),
        },
        2 => Op::ResumeSession {
            token: rand_token(rng),
            tracker: rand_tref(rng),
            client: rng.next_u64(),
            link: rand_link(rng),
        },
        3 => Op::CloseSession {
            session: rand_session(rng),
            tracker: rand_tref(rng),
        },
        4 => Op::ClientGone {
            client: rng.next_u64(),
            tracker: rand_tref(rng),
            link: rand_link(rng),
        },
        5 => Op::ExpireSessions {
            tracker: rand_tref(rng),
        },
        6 => Op::CreateGroup {
            session: rand_session(rng),
            group: rand_group(rng),
            quotas: rand_quotas(rng),
        },
        7 => Op::JoinGroup {
            session: rand_session(rng),
            group: rand_group(rng),
            quotas: rand_quotas(rng),
        },
        8 => Op::LeaveGroup {
            session: rand_session(rng),
            group: rand_group(rng),
        },
        9 => Op::AcceptRequest {
            session: rand_session(rng),
            group: rand_group(rng),
            user: rand_user(rng),
        },
        10 => Op::RejectRequest {
            session: rand_session(rng),
            group: rand_group(rng),
            user: rand_user(rng),
        },
        11 => Op::ShareFile {
            session: rand_session(rng),
            group: rand_group(rng),
            meta: rand_meta(rng),
            quotas: rand_quotas(rng),
        },
        12 => Op::StopShare {
            session: rand_session(rng),
            group: rand_group(rng),
            name: rand_name(rng),
        },
        _ => Op::SyncShares {
            session: rand_session(rng),
            keep: (0..rng.below(4))
                .map(|_| (rand_group(rng), rand_name(rng)))
                .collect(),
        },
    }
}

fn rand_entry(rng: &mut Rng) -> Entry {
    let origin = if rng.percent(70) {
        Some(Origin {
            client: rng.next_u64(),
            req_id: rng.next_u64(),
        })
    } else {
        None
    };
    Entry {
        origin,
        op: rand_op(rng),
    }
}

fn rand_entries(rng: &mut Rng) -> Vec<Entry> {
    (0..rng.below(5)).map(|_| rand_entry(rng)).collect()
}

fn rand_batch(rng: &mut Rng) -> Batch {
    Batch {
        view: rng.next_u64(),
        first_seq: rng.next_u64(),
        entries: rand_entries(rng),
    }
}

fn rand_msg(rng: &mut Rng) -> ReplMsg {
    match rng.below(MSG_VARIANTS) {
        0 => ReplMsg::Hello {
            version: rng.next_u64() as u16,
            tracker: rand_tref(rng),
        },
        1 => ReplMsg::Status(ReplStatus::Starting {
            view: rng.next_u64(),
            applied: rng.next_u64(),
            waiting: rng.next_u64(),
            founder: rng.below(2) == 1,
        }),
        2 => ReplMsg::Status(ReplStatus::Serving {
            view: rng.next_u64(),
            primary: rng.next_u64() as u16,
        }),
        3 => ReplMsg::Heartbeat,
        4 => ReplMsg::Forward {
            entries: rand_entries(rng),
        },
        5 => ReplMsg::Batch(rand_batch(rng)),
        6 => ReplMsg::Ack {
            view: rng.next_u64(),
            seq: rng.next_u64(),
        },
        7 => ReplMsg::Commit {
            view: rng.next_u64(),
            seq: rng.next_u64(),
        },
        8 => ReplMsg::Takeover {
            view: rng.next_u64(),
            applied: rng.next_u64(),
        },
        9..=11 => ReplMsg::TakeoverAck {
            view: rng.next_u64(),
            serving: rng.percent(50),
            applied: rng.next_u64(),
            catchup: match rng.below(3) {
                0 => Catchup::None,
                1 => Catchup::Batch(rand_batch(rng)),
                _ => Catchup::Snapshot,
            },
        },
        12 => ReplMsg::JoinRequest(None),
        15 => ReplMsg::JoinRequest(Some(JoinPosition {
            applied: rng.next_u64(),
            view: rng.next_u64(),
            primary: rng.next_u64() as u16,
        })),
        16 => ReplMsg::SuffixPart(rand_batch(rng)),
        17 => ReplMsg::Suffix {
            view: rng.next_u64(),
            seq: rng.next_u64(),
        },
        13 => {
            let mut data = vec![0u8; rng.below(64)];
            rng.fill(&mut data);
            ReplMsg::SnapshotPart { data }
        }
        _ => ReplMsg::Snapshot {
            view: rng.next_u64(),
            seq: rng.next_u64(),
            len: rng.next_u64() % (MAX_SNAPSHOT_LEN + 1),
        },
    }
}

/// Payloads (without length prefix) of the samples plus some random messages.
fn valid_payloads(rng: &mut Rng, n_random: usize) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = sample_msgs()
        .iter()
        .map(|m| payload(&emit(m)).to_vec())
        .collect();
    for _ in 0..n_random {
        out.push(payload(&emit(&rand_msg(rng))).to_vec());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 1. Golden bytes
// ---------------------------------------------------------------------------------------------

fn golden(m: ReplMsg, want: &[u8]) {
    assert_eq!(emit(&m), want, "emit of {m:?}");
    assert_eq!(ReplMsg::parse(&want[4..]), Ok(m));
}

#[test]
fn golden_hello() {
    golden(
        ReplMsg::Hello {
            version: 2,
            tracker: tref(3, 0x0102_0304_0506_0708),
        },
        &cat(&[
            &[0, 0, 0, 18, 0x01],
            &MAGIC,
            &[0, 2],                   // version
            &[2],                      // role: tracker
            &[0, 3],                   // tracker_no
            &[1, 2, 3, 4, 5, 6, 7, 8], // incarnation
        ]),
    );
}

#[test]
fn golden_status_heartbeat_join_request() {
    golden(
        ReplMsg::Status(ReplStatus::Starting {
            view: 3,
            applied: 0x0102,
            waiting: 0b101,
            founder: false,
        }),
        &[
            0, 0, 0, 26, 0x40, 0, //
            0, 0, 0, 0, 0, 0, 0, 3, // view
            0, 0, 0, 0, 0, 0, 1, 2, // applied
            0, 0, 0, 0, 0, 0, 0, 5, // waiting: trackers 1 and 3
        ],
    );
    golden(
        ReplMsg::Status(ReplStatus::Starting {
            view: 0,
            applied: 0,
            waiting: 0,
            founder: true,
        }),
        &[
            0, 0, 0, 26, 0x40, 2, // kind 2: starting, the founder
            0, 0, 0, 0, 0, 0, 0, 0, // view
            0, 0, 0, 0, 0, 0, 0, 0, // applied
            0, 0, 0, 0, 0, 0, 0, 0, // waiting
        ],
    );
    golden(
        ReplMsg::Status(ReplStatus::Serving {
            view: 5,
            primary: 2,
        }),
        &[0, 0, 0, 12, 0x40, 1, 0, 0, 0, 0, 0, 0, 0, 5, 0, 2],
    );
    golden(ReplMsg::Heartbeat, &[0, 0, 0, 1, 0x41]);
    golden(ReplMsg::JoinRequest(None), &[0, 0, 0, 1, 0x48]);
    golden(
        ReplMsg::JoinRequest(Some(JoinPosition {
            applied: 0x0102,
            view: 3,
            primary: 0x0405,
        })),
        &[
            0, 0, 0, 19, 0x48, //
            0, 0, 0, 0, 0, 0, 1, 2, // applied
            0, 0, 0, 0, 0, 0, 0, 3, // view
            4, 5, // primary
        ],
    );
    golden(
        ReplMsg::Suffix {
            view: 1,
            seq: 0x0203,
        },
        &[
            0, 0, 0, 17, 0x4c, //
            0, 0, 0, 0, 0, 0, 0, 1, // view
            0, 0, 0, 0, 0, 0, 2, 3, // seq
        ],
    );
    golden(
        ReplMsg::SuffixPart(Batch {
            view: 1,
            first_seq: 2,
            entries: vec![],
        }),
        &[
            0, 0, 0, 21, 0x4b, //
            0, 0, 0, 0, 0, 0, 0, 1, // view
            0, 0, 0, 0, 0, 0, 0, 2, // first_seq
            0, 0, 0, 0, // n
        ],
    );
}

#[test]
fn golden_two_u64_messages() {
    let body = [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 2, 3];
    for (ty, m) in [
        (
            0x44,
            ReplMsg::Ack {
                view: 1,
                seq: 0x0203,
            },
        ),
        (
            0x45,
            ReplMsg::Commit {
                view: 1,
                seq: 0x0203,
            },
        ),
        (
            0x46,
            ReplMsg::Takeover {
                view: 1,
                applied: 0x0203,
            },
        ),
    ] {
        golden(m, &cat(&[&[0, 0, 0, 17, ty], &body]));
    }
    golden(
        ReplMsg::Snapshot {
            view: 1,
            seq: 2,
            len: 3,
        },
        &cat(&[
            &[0, 0, 0, 25, 0x4a],
            &[0, 0, 0, 0, 0, 0, 0, 1],
            &[0, 0, 0, 0, 0, 0, 0, 2],
            &[0, 0, 0, 0, 0, 0, 0, 3],
        ]),
    );
}

#[test]
fn golden_forward_create_user_with_origin() {
    golden(
        ReplMsg::Forward {
            entries: vec![Entry {
                origin: Some(Origin {
                    client: 7,
                    req_id: 9,
                }),
                op: Op::CreateUser {
                    user: uid("al"),
                    pw_hash: "$h".to_owned(),
                },
            }],
        },
        &cat(&[
            &[0, 0, 0, 31, 0x42],
            &[0, 0, 0, 1],             // one entry
            &[1],                      // has_origin
            &[0, 0, 0, 0, 0, 0, 0, 7], // client
            &[0, 0, 0, 0, 0, 0, 0, 9], // req_id
            &[1],                      // CreateUser
            &[0, 2, b'a', b'l'],
            &[0, 2, b'$', b'h'],
        ]),
    );
}

#[test]
fn golden_batch_without_origins() {
    golden(
        ReplMsg::Batch(Batch {
            view: 2,
            first_seq: 10,
            entries: vec![
                Entry {
                    origin: None,
                    op: Op::CloseSession {
                        session: SessionId(5),
                        tracker: tref(1, 0xff),
                    },
                },
                Entry {
                    origin: None,
                    op: Op::ExpireSessions {
                        tracker: tref(2, 3),
                    },
                },
            ],
        }),
        &cat(&[
            &[0, 0, 0, 53, 0x43],
            &[0, 0, 0, 0, 0, 0, 0, 2],  // view
            &[0, 0, 0, 0, 0, 0, 0, 10], // first_seq
            &[0, 0, 0, 2],              // two entries
            &[0, 4],                    // no origin, CloseSession
            &[0, 0, 0, 0, 0, 0, 0, 5],  // session
            &[0, 1, 0, 0, 0, 0, 0, 0, 0, 0xff],
            &[0, 6], // no origin, ExpireSessions
            &[0, 2, 0, 0, 0, 0, 0, 0, 0, 3],
        ]),
    );
}

#[test]
fn golden_takeover_ack_and_snapshot_part() {
    golden(
        ReplMsg::TakeoverAck {
            view: 3,
            serving: true,
            applied: 4,
            catchup: Catchup::Snapshot,
        },
        &cat(&[
            &[0, 0, 0, 19, 0x47],
            &[0, 0, 0, 0, 0, 0, 0, 3],
            &[1],
            &[0, 0, 0, 0, 0, 0, 0, 4],
            &[2],
        ]),
    );
    golden(
        ReplMsg::TakeoverAck {
            view: 3,
            serving: false,
            applied: 4,
            catchup: Catchup::Batch(Batch {
                view: 3,
                first_seq: 4,
                entries: vec![],
            }),
        },
        &cat(&[
            &[0, 0, 0, 39, 0x47],
            &[0, 0, 0, 0, 0, 0, 0, 3],
            &[0],
            &[0, 0, 0, 0, 0, 0, 0, 4],
            &[1],
            &[0, 0, 0, 0, 0, 0, 0, 3],
            &[0, 0, 0, 0, 0, 0, 0, 4],
            &[0, 0, 0, 0],
        ]),
    );
    golden(
        ReplMsg::SnapshotPart {
            data: vec![0xde, 0xad],
        },
        &[0, 0, 0, 7, 0x49, 0, 0, 0, 2, 0xde, 0xad],
    );
}

#[test]
fn golden_ops() {
    let open = Op::OpenSession {
        user: uid("u"),
        peer_addr: "10.0.0.1:80".parse().unwrap(),
        tracker: tref(1, 2),
        client: 3,
        token: [7; 16],
        shares: Some(vec![(gid("g"), fname("f"))]),
        client_key: [0x3c; 32],
        link: 0,
    };
    assert_eq!(
        op_bytes(&open),
        cat(&[
            &[15],
            &[0, 1, b'u'],
            &[4, 10, 0, 0, 1, 0, 80],
            &[0, 1, 0, 0, 0, 0, 0, 0, 0, 2],
            &[0, 0, 0, 0, 0, 0, 0, 3],
            &[7; 16],
            &[1, 0, 0, 0, 1, 0, 1, b'g', 0, 1, b'f'], // has shares, one: (g, f)
            &[0x3c; 32],
        ])
    );
    // An earlier build's entry (no shares, no key) keeps kind 2, without the two fields.
    let legacy = Op::OpenSession {
        user: uid("u"),
        peer_addr: "10.0.0.1:80".parse().unwrap(),
        tracker: tref(1, 2),
        client: 3,
        token: [7; 16],
        shares: None,
        client_key: [0; 32],
        link: 0,
    };
    let bytes = op_bytes(&legacy);
    assert_eq!(
        bytes,
        cat(&[
            &[2],
            &[0, 1, b'u'],
            &[4, 10, 0, 0, 1, 0, 80],
            &[0, 1, 0, 0, 0, 0, 0, 0, 0, 2],
            &[0, 0, 0, 0, 0, 0, 0, 3],
            &[7; 16],
        ])
    );
    // The same op spelled as kind 15 is refused: one encoding per op.
    let mut as_15 = cat(&[&[15], &bytes[1..], &[0], &[0; 32]]);
    assert!(decode_op(&mut Reader::new(&as_15)).is_err());
    as_15[0] = 2;
    assert!(decode_op(&mut Reader::new(&as_15[..bytes.len()])).is_ok());
    let resume = Op::ResumeSession {
        token: [9; 16],
        tracker: tref(0x0102, 3),
        client: 4,
        link: 0,
    };
    assert_eq!(
        op_bytes(&resume),
        cat(&[
            &[3],
            &[9; 16],
            &[1, 2, 0, 0, 0, 0, 0, 0, 0, 3],
            &[0, 0, 0, 0, 0, 0, 0, 4],
        ])
    );
    let gone = Op::ClientGone {
        client: 5,
        tracker: tref(6, 7),
        link: 0,
    };
    assert_eq!(
        op_bytes(&gone),
        cat(&[
            &[5],
            &[0, 0, 0, 0, 0, 0, 0, 5],
            &[0, 6, 0, 0, 0, 0, 0, 0, 0, 7]
        ])
    );
    let session = [0, 0, 0, 0, 0, 0, 0, 1];
    let group_ops: [(u8, Op); 3] = [
        (
            7,
            Op::CreateGroup {
                session: SessionId(1),
                group: gid("g"),
                quotas: None,
            },
        ),
        (
            8,
            Op::JoinGroup {
                session: SessionId(1),
                group: gid("g"),
                quotas: None,
            },
        ),
        (
            9,
            Op::LeaveGroup {
                session: SessionId(1),
                group: gid("g"),
            },
        ),
    ];
    for (kind, op) in group_ops {
        assert_eq!(op_bytes(&op), cat(&[&[kind], &session, &[0, 1, b'g']]));
    }
    // With the quotas the apply checks: kinds 16 and 17, the limits after the group.
    let quotas = OpQuotas {
        groups_owned: 1,
        requests: 2,
        files: 3,
        metadata: 0x0102,
        state_bytes: 0x0304_0506,
    };
    let quota_bytes: &[u8] = &[
        0, 0, 0, 0, 0, 0, 0, 1, // groups_owned
        0, 0, 0, 0, 0, 0, 0, 2, // requests
        0, 0, 0, 0, 0, 0, 0, 3, // files
        0, 0, 0, 0, 0, 0, 1, 2, // metadata
        0, 0, 0, 0, 3, 4, 5, 6, // state_bytes
    ];
    let create = Op::CreateGroup {
        session: SessionId(1),
        group: gid("g"),
        quotas: Some(quotas),
    };
    let join = Op::JoinGroup {
        session: SessionId(1),
        group: gid("g"),
        quotas: Some(quotas),
    };
    assert_eq!(
        op_bytes(&create),
        cat(&[&[16], &session, &[0, 1, b'g'], quota_bytes])
    );
    assert_eq!(
        op_bytes(&join),
        cat(&[&[17], &session, &[0, 1, b'g'], quota_bytes])
    );
    let accept = Op::AcceptRequest {
        session: SessionId(1),
        group: gid("g"),
        user: uid("b"),
    };
    let reject = Op::RejectRequest {
        session: SessionId(1),
        group: gid("g"),
        user: uid("b"),
    };
    assert_eq!(
        op_bytes(&accept),
        cat(&[&[10], &session, &[0, 1, b'g', 0, 1, b'b']])
    );
    assert_eq!(
        op_bytes(&reject),
        cat(&[&[11], &session, &[0, 1, b'g', 0, 1, b'b']])
    );
    let share = Op::ShareFile {
        session: SessionId(1),
        group: gid("g"),
        meta: FileMeta {
            name: fname("f"),
            size: 1,
            piece_len: 1,
            file_sha1: Sha1Digest([0xaa; 20]),
            piece_hashes: vec![Sha1Digest([0xbb; 20])],
        },
        quotas: None,
    };
    assert_eq!(
        op_bytes(&share),
        cat(&[
            &[12],
            &session,
            &[0, 1, b'g'],
            &[0, 1, b'f'],
            &[0, 0, 0, 0, 0, 0, 0, 1], // size
            &[0, 0, 0, 1],             // piece_len
            &[0xaa; 20],
            &[0, 0, 0, 1],
            &[0xbb; 20],
        ])
    );
    let mut share_q = share.clone();
    if let Op::ShareFile { quotas: q, .. } = &mut share_q {
        *q = Some(quotas);
    }
    assert_eq!(
        op_bytes(&share_q),
        cat(&[&[18], &op_bytes(&share)[1..], quota_bytes])
    );
    let stop = Op::StopShare {
        session: SessionId(1),
        group: gid("g"),
        name: fname("a b"),
    };
    assert_eq!(
        op_bytes(&stop),
        cat(&[&[13], &session, &[0, 1, b'g', 0, 3, b'a', b' ', b'b']])
    );
    let sync = Op::SyncShares {
        session: SessionId(1),
        keep: vec![(gid("g"), fname("a b"))],
    };
    assert_eq!(
        op_bytes(&sync),
        cat(&[
            &[14],
            &session,
            &[0, 0, 0, 1],
            &[0, 1, b'g', 0, 3, b'a', b' ', b'b']
        ])
    );
    for op in [open, resume, gone, accept, reject, share, stop, sync] {
        let bytes = op_bytes(&op);
        let mut r = Reader::new(&bytes);
        assert_eq!(decode_op(&mut r), Ok(op));
        assert_eq!(r.remaining(), 0);
    }
}

#[test]
fn hello_has_the_layout_of_the_client_link_tracker_handshake() {
    let tracker = tref(4, 0xabcd);
    let peer = emit(&ReplMsg::Hello {
        version: PROTOCOL_VERSION,
        tracker,
    });
    let mut client = Vec::new();
    ClientMsg::Hello {
        version: PROTOCOL_VERSION,
        role: Role::Tracker {
            no: tracker.no,
            incarnation: tracker.incarnation,
        },
    }
    .emit(&mut client);
    assert_eq!(peer, client);
    assert_eq!(
        ClientMsg::parse(payload(&peer)),
        Ok(ClientMsg::Hello {
            version: PROTOCOL_VERSION,
            role: Role::Tracker {
                no: 4,
                incarnation: 0xabcd
            }
        })
    );
}

#[test]
fn emit_appends_without_touching_what_is_there() {
    let mut out = vec![0xee, 0xee];
    ReplMsg::Heartbeat.emit(&mut out);
    ReplMsg::JoinRequest(None).emit(&mut out);
    assert_eq!(out, [0xee, 0xee, 0, 0, 0, 1, 0x41, 0, 0, 0, 1, 0x48]);
}

// ---------------------------------------------------------------------------------------------
// 2. Round trips
// ---------------------------------------------------------------------------------------------

#[test]
fn samples_cover_every_variant() {
    let mut seen = [false; OP_VARIANTS];
    for op in sample_ops() {
        seen[op_variant(&op)] = true;
    }
    assert!(seen.iter().all(|s| *s), "op variants seen: {seen:?}");
    let mut seen = [false; MSG_VARIANTS];
    for m in sample_msgs() {
        seen[msg_variant(&m)] = true;
    }
    assert!(seen.iter().all(|s| *s), "message variants seen: {seen:?}");
}

#[test]
fn round_trip_sample_messages() {
    for m in sample_msgs() {
        let frame = emit(&m);
        assert!(payload(&frame).len() <= MAX_REPLICATION_FRAME);
        assert_eq!(ReplMsg::parse(payload(&frame)), Ok(m));
    }
}

#[test]
fn round_trip_every_op_with_and_without_origin() {
    for e in sample_entries() {
        let bytes = entry_bytes(&e);
        assert_eq!(decode_entry_all(&bytes), Ok(e.clone()));
        // The entry is the op's bytes behind the origin.
        let op = op_bytes(&e.op);
        let head = if e.origin.is_some() { 17 } else { 1 };
        assert_eq!(&bytes[head..], &op[..], "{e:?}");
        assert_eq!(bytes[0], u8::from(e.origin.is_some()));
        // And each one travels alone in a Forward.
        let m = ReplMsg::Forward { entries: vec![e] };
        assert_eq!(ReplMsg::parse(payload(&emit(&m))), Ok(m));
    }
}

#[test]
fn op_kinds_are_one_to_twenty_one_each_of_one_op() {
    let mut kinds = [None; 256];
    for op in sample_ops() {
        let k = op_bytes(&op)[0] as usize;
        assert!((1..=21).contains(&k), "{op:?}");
        match kinds[k] {
            None => kinds[k] = Some(op_variant(&op)),
            Some(v) => assert_eq!(v, op_variant(&op), "kind {k} shared by two ops"),
        }
    }
    // Kinds 16-18 are CreateGroup, JoinGroup and ShareFile with quotas, 19-21 OpenSession,
    // ResumeSession and ClientGone with a link number: 20 kinds, as kind 15 (an OpenSession
    // with shares or a key, and no link number) is not among the samples.
    assert_eq!(
        kinds.iter().filter(|k| k.is_some()).count(),
        OP_VARIANTS + 6
    );
    let mut variants: Vec<usize> = kinds.iter().flatten().copied().collect();
    variants.sort_unstable();
    variants.dedup();
    assert_eq!(variants.len(), OP_VARIANTS);
}

#[test]
fn round_trip_random() {
    let mut rng = Rng::new(0x9ee2_0001);
    let mut seen_msgs = [0usize; MSG_VARIANTS];
    let mut seen_ops = [0usize; OP_VARIANTS];
    for _ in 0..3000 {
        let m = rand_msg(&mut rng);
        seen_msgs[msg_variant(&m)] += 1;
        let frame = emit(&m);
        assert_eq!(ReplMsg::parse(payload(&frame)).as_ref(), Ok(&m));
        let e = rand_entry(&mut rng);
        seen_ops[op_variant(&e.op)] += 1;
        assert_eq!(decode_entry_all(&entry_bytes(&e)), Ok(e));
    }
    assert!(seen_msgs.iter().all(|n| *n > 0), "{seen_msgs:?}");
    assert!(seen_ops.iter().all(|n| *n > 0), "{seen_ops:?}");
}

#[test]
fn largest_forwarded_upload_fits_the_frame_limit() {
    use crate::wire::frame::MAX_CLIENT_TRACKER_FRAME;
    // The most piece hashes a client upload frame can carry: type, req_id, group, then the
    // file_meta fields before the hashes.
    let fixed = 1 + 8 + (2 + MAX_ID_LEN) + (2 + MAX_FILE_NAME_LEN) + 8 + 4 + 20 + 4;
    let n = (MAX_CLIENT_TRACKER_FRAME - fixed) / 20;
    let m = meta(&"n".repeat(MAX_FILE_NAME_LEN), n as u64, 1);
    let entry = Entry {
        origin: Some(Origin {
            client: 1,
            req_id: 2,
        }),
        op: Op::ShareFile {
            session: SessionId(1),
            group: gid(&"g".repeat(MAX_ID_LEN)),
            meta: m,
            quotas: Some(sample_quotas()),
        },
    };
    let frame = emit(&ReplMsg::Batch(Batch {
        view: 1,
        first_seq: 1,
        entries: vec![entry],
    }));
    assert!(payload(&frame).len() <= MAX_REPLICATION_FRAME);
    assert!(ReplMsg::parse(payload(&frame)).is_ok());
}

#[test]
fn over_long_snapshot_part_is_cut_to_the_limit() {
    let data: Vec<u8> = (0..SNAPSHOT_PART_LEN + 10).map(|i| i as u8).collect();
    let frame = emit(&ReplMsg::SnapshotPart { data: data.clone() });
    match ReplMsg::parse(payload(&frame)) {
        Ok(ReplMsg::SnapshotPart { data: got }) => {
            assert_eq!(got.len(), SNAPSHOT_PART_LEN);
            assert_eq!(got[..], data[..SNAPSHOT_PART_LEN]);
        }
        other => panic!("unexpected {:?}", other.map(|_| ())),
    }
    // Exactly SNAPSHOT_PART_LEN bytes survive whole.
    let m = ReplMsg::SnapshotPart {
        data: data[..SNAPSHOT_PART_LEN].to_vec(),
    };
    assert_eq!(ReplMsg::parse(payload(&emit(&m))), Ok(m));
}

// ---------------------------------------------------------------------------------------------
// 3. Truncation and trailing bytes
// ---------------------------------------------------------------------------------------------

#[test]
fn every_strict_prefix_is_an_error() {
    let mut rng = Rng::new(0x9ee2_0002);
    for p in valid_payloads(&mut rng, 300) {
        assert!(ReplMsg::parse(&p).is_ok(), "{p:?}");
        for i in 0..p.len() {
            let got = ReplMsg::parse(&p[..i]);
            if i == 1 && p[0] == 0x48 {
                // A JoinRequest's position is optional: its type byte alone is the form
                // without one (a message of its own, pinned by the golden bytes).
                assert_eq!(got, Ok(ReplMsg::JoinRequest(None)));
                continue;
            }
            assert!(got.is_err(), "prefix {i} of {p:?}: {got:?}");
            if i == 0 {
                assert_eq!(got, Err(DecodeError::EmptyFrame));
            }
        }
    }
}

#[test]
fn every_strict_prefix_of_an_entry_is_an_error() {
    for e in sample_entries() {
        let bytes = entry_bytes(&e);
        for i in 0..bytes.len() {
            assert!(
                decode_entry_all(&bytes[..i]).is_err(),
                "prefix {i} of {e:?}"
            );
        }
    }
}

#[test]
fn trailing_bytes_are_an_error() {
    let mut rng = Rng::new(0x9ee2_0003);
    for mut p in valid_payloads(&mut rng, 300) {
        if p == [0x48] {
            // The JoinRequest without a position: bytes after its type byte are the start of
            // a position (pinned by every_strict_prefix_is_an_error), so they are truncated.
            assert_eq!(ReplMsg::parse(&[0x48, 0]), Err(DecodeError::Truncated));
            continue;
        }
        for extra in [0u8, 1, 0xff] {
            p.push(extra);
            assert_eq!(
                ReplMsg::parse(&p),
                Err(DecodeError::TrailingBytes(1)),
                "{p:?}"
            );
            p.push(extra);
            assert_eq!(ReplMsg::parse(&p), Err(DecodeError::TrailingBytes(2)));
            p.truncate(p.len() - 2);
        }
    }
    for e in sample_entries() {
        let mut bytes = entry_bytes(&e);
        bytes.push(0);
        assert_eq!(decode_entry_all(&bytes), Err(DecodeError::TrailingBytes(1)));
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Invalid fields
// ---------------------------------------------------------------------------------------------

#[test]
fn well_formed_builder_frames_parse() {
    // The builder is right, so the failures below come from the one field that was broken.
    let hello = B::ty(0x01).raw(&MAGIC).u16(2).u8(2).u16(1).u64(5).0;
    assert!(ReplMsg::parse(&hello).is_ok());
    let fwd = B::ty(0x42).u32(1).u8(0).u8(1).s(b"u").s(b"").0;
    assert!(ReplMsg::parse(&fwd).is_ok());
    let ack = B::ty(0x47).u64(1).u8(1).u64(2).u8(0).0;
    assert!(ReplMsg::parse(&ack).is_ok());
}

#[test]
fn bad_hellos_are_rejected() {
    let hello = |magic: &[u8], role: u8| B::ty(0x01).raw(magic).u16(2).u8(role).u16(1).u64(5).0;
    assert_eq!(
        ReplMsg::parse(&hello(&MAGIC, 2)),
        Ok(ReplMsg::Hello {
            version: 2,
            tracker: tref(1, 5)
        })
    );
    assert_eq!(
        ReplMsg::parse(&hello(b"P2PH", 2)),
        Err(DecodeError::BadMagic(0x5032_5048))
    );
    for role in [0u8, 1, 3, 0xff] {
        assert_eq!(
            ReplMsg::parse(&hello(&MAGIC, role)),
            Err(DecodeError::BadValue("role")),
            "role {role}"
        );
    }
    // A client's handshake (role 1 with a u64 client id) is not a tracker's answer.
    let mut client = Vec::new();
    ClientMsg::hello(7).emit(&mut client);
    assert_eq!(
        ReplMsg::parse(payload(&client)),
        Err(DecodeError::BadValue("role"))
    );
}

#[test]
fn unknown_frame_types_are_rejected() {
    let known: Vec<u8> = (0x40..=0x4c).chain([0x01]).collect();
    for t in 0..=255u8 {
        // A body long enough for any fixed fields, so the type is what fails.
        let p = B::ty(t).raw(&[0; 40]).0;
        if !known.contains(&t) {
            assert_eq!(ReplMsg::parse(&p), Err(DecodeError::UnknownType(t)));
            assert_eq!(ReplMsg::parse(&[t]), Err(DecodeError::UnknownType(t)));
        } else {
            let _ = ReplMsg::parse(&[t]);
        }
    }
    // A client-link request is not a tracker-link message.
    let mut out = Vec::new();
    crate::wire::tracker_link::Request {
        req_id: 1,
        body: RequestBody::Ping,
    }
    .emit(&mut out);
    assert_eq!(
        ReplMsg::parse(payload(&out)),
        Err(DecodeError::UnknownType(0x10))
    );
}

#[test]
fn bad_flags_and_kinds_are_rejected() {
    let status = |b: u8| B::ty(0x40).u8(b).u64(1).u16(1).0;
    assert!(ReplMsg::parse(&status(1)).is_ok());
    assert_eq!(
        ReplMsg::parse(&B::ty(0x40).u8(0).u64(4).u64(9).u64(2).0),
        Ok(ReplMsg::Status(ReplStatus::Starting {
            view: 4,
            applied: 9,
            waiting: 2,
            founder: false,
        }))
    );
    for b in [3u8, 0x80, 0xff] {
        assert_eq!(
            ReplMsg::parse(&status(b)),
            Err(DecodeError::BadValue("status kind"))
        );
    }
    let ack = |serving: u8, kind: u8| B::ty(0x47).u64(1).u8(serving).u64(2).u8(kind).0;
    assert!(ReplMsg::parse(&ack(0, 0)).is_ok());
    assert!(ReplMsg::parse(&ack(1, 2)).is_ok());
    assert_eq!(
        ReplMsg::parse(&ack(2, 0)),
        Err(DecodeError::BadValue("boolean"))
    );
    for kind in [3u8, 4, 0xff] {
        assert_eq!(
            ReplMsg::parse(&ack(0, kind)),
            Err(DecodeError::BadValue("catchup kind"))
        );
    }
    // Kind 1 must be followed by a batch.
    assert_eq!(ReplMsg::parse(&ack(0, 1)), Err(DecodeError::Truncated));

    // An entry's origin flag and op kind.
    let fwd =
        |has_origin: u8, kind: u8| B::ty(0x42).u32(1).u8(has_origin).u8(kind).s(b"u").s(b"").0;
    assert!(ReplMsg::parse(&fwd(0, 1)).is_ok());
    assert_eq!(
        ReplMsg::parse(&fwd(2, 1)),
        Err(DecodeError::BadValue("boolean"))
    );
    for kind in [0u8, 22, 0x40, 0xff] {
        assert_eq!(
            ReplMsg::parse(&fwd(0, kind)),
            Err(DecodeError::BadValue("op kind")),
            "kind {kind}"
        );
    }
}

#[test]
fn invalid_op_fields_are_rejected() {
    let entry = |op: B| B::ty(0x42).u32(1).u8(0).raw(&op.0).0;
    let cases: Vec<(&str, B, DecodeError)> = vec![
        (
            "empty user",
            B(vec![1]).s(b"").s(b"h"),
            DecodeError::BadId(IdError::Empty),
        ),
        (
            "65-byte user",
            B(vec![1]).s(&[b'u'; 65]).s(b"h"),
            DecodeError::BadValue("string too long"),
        ),
        (
            "over-long password hash",
            B(vec![1]).s(b"u").s(&[b'h'; MAX_PW_HASH_LEN + 1]),
            DecodeError::BadValue("string too long"),
        ),
        (
            "password hash not utf-8",
            B(vec![1]).s(b"u").s(&[0xff, 0xfe]),
            DecodeError::NotUtf8,
        ),
        (
            "space in group",
            B(vec![7]).u64(1).s(b"a b"),
            DecodeError::BadId(IdError::WhiteSpaceOrControl),
        ),
        (
            "slash in file name",
            B(vec![13]).u64(1).s(b"g").s(b"a/b"),
            DecodeError::BadId(IdError::NotABaseName),
        ),
        (
            "address family",
            B(vec![2])
                .s(b"u")
                .u8(5)
                .raw(&[1, 2, 3, 4])
                .u16(80)
                .u16(1)
                .u64(1)
                .u64(1)
                .raw(&[0; 16]),
            DecodeError::BadValue("address family"),
        ),
        (
            "piece length 0",
            B(vec![12])
                .u64(1)
                .s(b"g")
                .s(b"f")
                .u64(0)
                .u32(0)
                .raw(&[0; 20])
                .u32(0),
            DecodeError::BadValue("piece length"),
        ),
        (
            "piece count not matching the size",
            B(vec![12])
                .u64(1)
                .s(b"g")
                .s(b"f")
                .u64(2)
                .u32(1)
                .raw(&[0; 20])
                .u32(1)
                .raw(&[0; 20]),
            DecodeError::BadValue("piece count does not match the size"),
        ),
    ];
    for (what, op, want) in cases {
        assert_eq!(ReplMsg::parse(&entry(op)), Err(want), "{what}");
    }
    // The longest hash allowed passes.
    let ok = entry(B(vec![1]).s(b"u").s(&[b'h'; MAX_PW_HASH_LEN]));
    assert!(ReplMsg::parse(&ok).is_ok());
}

#[test]
fn snapshot_lengths_are_bounded() {
    let part = |len: u32, have: usize| B::ty(0x49).u32(len).raw(&vec![0; have]).0;
    assert!(ReplMsg::parse(&part(3, 3)).is_ok());
    assert_eq!(
        ReplMsg::parse(&part(SNAPSHOT_PART_LEN as u32 + 1, 10)),
        Err(DecodeError::BadValue("snapshot part too long"))
    );
    assert_eq!(
        ReplMsg::parse(&part(u32::MAX, 10)),
        Err(DecodeError::BadValue("snapshot part too long"))
    );
    // A length within the limit but beyond the frame.
    assert_eq!(
        ReplMsg::parse(&part(SNAPSHOT_PART_LEN as u32, 10)),
        Err(DecodeError::Truncated)
    );
    let snap = |len: u64| B::ty(0x4a).u64(1).u64(2).u64(len).0;
    assert!(ReplMsg::parse(&snap(MAX_SNAPSHOT_LEN)).is_ok());
    assert_eq!(
        ReplMsg::parse(&snap(MAX_SNAPSHOT_LEN + 1)),
        Err(DecodeError::BadValue("snapshot too long"))
    );
    assert_eq!(
        ReplMsg::parse(&snap(u64::MAX)),
        Err(DecodeError::BadValue("snapshot too long"))
    );
}

#[test]
fn empty_payload_is_an_error() {
    assert_eq!(ReplMsg::parse(&[]), Err(DecodeError::EmptyFrame));
}

// ---------------------------------------------------------------------------------------------
// 5. Forged counts
// ---------------------------------------------------------------------------------------------

#[test]
fn forged_huge_counts_fail_fast_without_allocating() {
    let started = Instant::now();
    let mut cases: Vec<Vec<u8>> = Vec::new();
    for n in [u32::MAX, u32::MAX / 7, 1 << 24, 3] {
        // Far too few bytes for `n` entries (a couple of bytes of one follow).
        cases.push(B::ty(0x42).u32(n).raw(&[0, 1, 0, 1, b'u']).0);
        cases.push(B::ty(0x43).u64(1).u64(1).u32(n).raw(&[0, 6]).0);
        cases.push(B::ty(0x47).u64(1).u8(0).u64(1).u8(1).u64(1).u64(1).u32(n).0);
        // Piece hashes of a forwarded share, with a size that agrees with the forged count.
        cases.push(
            B::ty(0x42)
                .u32(1)
                .u8(0)
                .u8(12)
                .u64(1)
                .s(b"g")
                .s(b"f")
                .u64(u64::from(n))
                .u32(1)
                .raw(&[0; 20])
                .u32(n)
                .raw(&[1; 20])
                .0,
        );
    }
    // A snapshot part announcing the largest allowed length with a few bytes present.
    cases.push(B::ty(0x49).u32(SNAPSHOT_PART_LEN as u32).raw(&[1, 2, 3]).0);
    for p in &cases {
        assert_eq!(ReplMsg::parse(p), Err(DecodeError::Truncated), "{p:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn count_exactly_filling_the_frame_with_minimal_entries_still_checks_them() {
    // n entries of the smallest size (7 bytes), all zero: kind 0 is refused.
    let n = 1000u32;
    let p = B::ty(0x42).u32(n).raw(&vec![0; n as usize * 7]).0;
    assert_eq!(ReplMsg::parse(&p), Err(DecodeError::BadValue("op kind")));
    // One byte fewer than n minimal entries need is caught by the count check itself.
    let p = B::ty(0x42).u32(n).raw(&vec![0; n as usize * 7 - 1]).0;
    assert_eq!(ReplMsg::parse(&p), Err(DecodeError::Truncated));
    // The smallest entry really is 7 bytes.
    let smallest = entry_bytes(&Entry {
        origin: None,
        op: Op::CreateUser {
            user: uid("u"),
            pw_hash: String::new(),
        },
    });
    assert_eq!(smallest.len(), MIN_ENTRY_LEN);
    for e in sample_entries() {
        assert!(entry_bytes(&e).len() >= MIN_ENTRY_LEN, "{e:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Random bytes and mutations never panic
// ---------------------------------------------------------------------------------------------

const KNOWN_TYPES: &[u8] = &[
    0x01, 0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49, 0x4a,
];

/// Parses `p`; whatever parses must re-emit to exactly the same bytes (the encoding is
/// canonical). Returns whether it parsed.
fn check_no_panic_and_canonical(p: &[u8]) -> bool {
    match ReplMsg::parse(p) {
        Ok(m) => {
            assert_eq!(payload(&emit(&m)), p, "{m:?}");
            true
        }
        Err(_) => false,
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng::new(0x9ee2_0007);
    let mut buf = [0u8; 200];
    let mut accepted = 0;
    for _ in 0..50_000 {
        let len = rng.below(buf.len());
        let p = &mut buf[..len];
        rng.fill(p);
        if len > 0 && rng.percent(70) {
            p[0] = *rng.pick(KNOWN_TYPES);
        }
        if len > 2 && rng.percent(30) {
            // Small counts and lengths, so that some bodies get further.
            p[1] = 0;
            p[2] = 0;
        }
        if check_no_panic_and_canonical(p) {
            accepted += 1;
        }
        // Entries straight from random bytes, too.
        let mut r = Reader::new(p);
        let _ = decode_entry(&mut r);
    }
    assert!(accepted > 0);
}

fn mutate(rng: &mut Rng, p: &mut Vec<u8>) {
    for _ in 0..rng.between(1, 4) {
        match rng.below(5) {
            0 if !p.is_empty() => {
                let i = rng.below(p.len());
                p[i] ^= 1 << rng.below(8);
            }
            1 if !p.is_empty() => {
                let i = rng.below(p.len());
                let any = rng.next_u64() as u8;
                p[i] = *rng.pick(&[0, 1, 2, 3, 12, 13, 14, 0x7f, 0x80, 0xfe, 0xff, any]);
            }
            2 => {
                let i = rng.below(p.len() + 1);
                p.insert(i, rng.next_u64() as u8);
            }
            3 if !p.is_empty() => {
                let i = rng.below(p.len());
                p.remove(i);
            }
            _ if p.len() >= 4 => {
                let i = rng.below(p.len() - 3);
                let v: u32 = *rng.pick(&[0, 1, 0xff, 0xffff, 0x1_0000, u32::MAX, u32::MAX / 2]);
                p[i..i + 4].copy_from_slice(&v.to_be_bytes());
            }
            _ => p.push(rng.next_u64() as u8),
        }
    }
}

#[test]
fn mutated_valid_frames_never_panic() {
    let mut rng = Rng::new(0x9ee2_0008);
    let corpus = valid_payloads(&mut rng, 200);
    let mut accepted = 0usize;
    for _ in 0..30_000 {
        let mut p = rng.pick(&corpus).clone();
        mutate(&mut rng, &mut p);
        if check_no_panic_and_canonical(&p) {
            accepted += 1;
        }
    }
    // Some mutations survive as other valid messages: they reached past the first field.
    assert!(accepted > 0);
}

#[test]
fn mutated_entries_never_panic() {
    let mut rng = Rng::new(0x9ee2_0009);
    let corpus: Vec<Vec<u8>> = sample_entries().iter().map(entry_bytes).collect();
    let mut accepted = 0usize;
    for _ in 0..30_000 {
        let mut p = rng.pick(&corpus).clone();
        mutate(&mut rng, &mut p);
        if let Ok(e) = decode_entry_all(&p) {
            assert_eq!(entry_bytes(&e), p, "{e:?}");
            accepted += 1;
        }
    }
    assert!(accepted > 0);
}

/// Kinds 19-21: the session ops naming the client's link, the fields of kinds 15, 3 and 5
/// then `u64 link`. Link 0 (not numbered) is written as the earlier kinds, and refused as
/// 19-21, so that each op has one encoding.
#[test]
fn golden_ops_with_link_numbers() {
    let open = Op::OpenSession {
        user: uid("u"),
        peer_addr: "10.0.0.1:80".parse().unwrap(),
        tracker: tref(1, 2),
        client: 3,
        token: [7; 16],
        shares: Some(vec![(gid("g"), fname("f"))]),
        client_key: [0x3c; 32],
        link: 0x0102,
    };
    let open_bytes = cat(&[
        &[19],
        &[0, 1, b'u'],
        &[4, 10, 0, 0, 1, 0, 80],
        &[0, 1, 0, 0, 0, 0, 0, 0, 0, 2],
        &[0, 0, 0, 0, 0, 0, 0, 3],
        &[7; 16],
        &[1, 0, 0, 0, 1, 0, 1, b'g', 0, 1, b'f'],
        &[0x3c; 32],
        &[0, 0, 0, 0, 0, 0, 1, 2], // link
    ]);
    assert_eq!(op_bytes(&open), open_bytes);
    // Without shares and key (which kind 2 could say), a numbered login is still kind 19.
    let mut bare = open.clone();
    if let Op::OpenSession {
        shares, client_key, ..
    } = &mut bare
    {
        *shares = None;
        *client_key = [0; 32];
    }
    assert_eq!(op_bytes(&bare)[0], 19);
    let resume = Op::ResumeSession {
        token: [9; 16],
        tracker: tref(0x0102, 3),
        client: 4,
        link: 5,
    };
    let resume_bytes = cat(&[
        &[20],
        &[9; 16],
        &[1, 2, 0, 0, 0, 0, 0, 0, 0, 3],
        &[0, 0, 0, 0, 0, 0, 0, 4],
        &[0, 0, 0, 0, 0, 0, 0, 5],
    ]);
    assert_eq!(op_bytes(&resume), resume_bytes);
    let gone = Op::ClientGone {
        client: 5,
        tracker: tref(6, 7),
        link: u64::MAX,
    };
    let gone_bytes = cat(&[
        &[21],
        &[0, 0, 0, 0, 0, 0, 0, 5],
        &[0, 6, 0, 0, 0, 0, 0, 0, 0, 7],
        &[0xff; 8],
    ]);
    assert_eq!(op_bytes(&gone), gone_bytes);
    for (op, bytes) in [
        (open, open_bytes),
        (resume, resume_bytes),
        (gone, gone_bytes),
    ] {
        let mut r = Reader::new(&bytes);
        assert_eq!(decode_op(&mut r), Ok(op));
        assert_eq!(r.remaining(), 0);
        // Link 0 in a numbered kind is refused.
        let mut zero = bytes.clone();
        let n = zero.len();
        zero[n - 8..].fill(0);
        assert_eq!(
            decode_op(&mut Reader::new(&zero)),
            Err(DecodeError::BadValue(
                "link number 0 in an op of a numbered kind"
            ))
        );
    }
}
