//! Tests of the state snapshot: golden bytes, round trips of states built through
//! `apply_entry` (every field: users, groups with members, requests and shared files, sessions,
//! remembered answers including refusals), a seeded random run whose decoded copies must keep
//! behaving like the original, the checks that refuse snapshots which could not back the
//! indexes, and truncation, forged counts and mutations (never a panic).

use super::*;
use crate::rng::SplitMix64;
use crate::testing::{fname, gid, uid};
use crate::tracker::state::{Entry, Op, OpQuotas, Origin, TrackerRef};
use crate::wire::{Sha1Digest, PIECE_LEN};

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

// =============================================================================================
// Values and helpers
// =============================================================================================

/// Where a client listens: 127.0.0.1:`port`.
fn addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn digest(content: u64, index: u64) -> Sha1Digest {
    let mut d = [0u8; 20];
    d[..8].copy_from_slice(&content.to_be_bytes());
    d[8..16].copy_from_slice(&index.to_be_bytes());
    d[16] = 0x5a;
    Sha1Digest(d)
}

/// Metadata of a `size`-byte file in standard pieces whose bytes are identified by `content`.
fn meta(name: &str, size: u64, content: u64) -> FileMeta {
    let n = FileMeta::n_pieces_for(size, PIECE_LEN);
    FileMeta {
        name: fname(name),
        size,
        piece_len: PIECE_LEN,
        file_sha1: digest(content, u64::MAX),
        piece_hashes: (0..n).map(|i| digest(content, i)).collect(),
    }
}

const T1: TrackerRef = TrackerRef {
    no: 1,
    incarnation: 11,
};
const T2: TrackerRef = TrackerRef {
    no: 2,
    incarnation: 22,
};

fn create_user(user: &str) -> Op {
    Op::CreateUser {
        user: uid(user),
        pw_hash: format!("$argon2id$v=19$m=8192,t=2,p=1$salt-of-{user}$hash"),
    }
}

/// Another creation of `user` (another salt): refused once `user` exists. The same creation
/// again (a byte-identical hash) is answered `Done`.
fn another_creation(user: &str) -> Op {
    Op::CreateUser {
        user: uid(user),
        pw_hash: format!("$argon2id$v=19$m=8192,t=2,p=1$another-salt-of-{user}$hash"),
    }
}

fn open(user: &str, port: u16, tracker: TrackerRef, client: u64) -> Op {
    Op::OpenSession {
        user: uid(user),
        peer_addr: addr(port),
        tracker,
        client,
        token: [port.to_be_bytes()[1]; 16],
        shares: None,
        client_key: [0; 32],
        link: 0,
    }
}

/// Applies `op` as a change asked for by `client` with request `req_id`.
fn asked(st: &mut TrackerState, client: u64, req_id: u64, op: Op) -> Answer {
    st.apply_entry(&Entry {
        origin: Some(Origin { client, req_id }),
        op,
    })
}

/// Applies `op` with no client behind it.
fn internal(st: &mut TrackerState, op: Op) -> Answer {
    st.apply_entry(&Entry { origin: None, op })
}

fn session_id(answer: Answer) -> SessionId {
    match answer {
        Ok(Outcome::SessionOpened(id)) => id,
        other => panic!("expected a session, got {other:?}"),
    }
}

fn encode(st: &TrackerState) -> Vec<u8> {
    let mut out = Vec::new();
    st.encode_snapshot(&mut out);
    out
}

/// Encodes, decodes, and checks that the copy equals the original (indexes included) and
/// re-encodes to the same bytes. Returns the snapshot.
#[track_caller]
fn round_trip(st: &TrackerState) -> Vec<u8> {
    let bytes = encode(st);
    let copy = TrackerState::decode_snapshot(&bytes).expect("a valid snapshot decodes");
    assert_eq!(&copy, st);
    assert_eq!(encode(&copy), bytes);
    bytes
}

/// The indexes agree with the data, and the groups keep `apply`'s invariants.
fn check_consistent(st: &TrackerState) {
    let mut by_user = BTreeMap::new();
    let mut by_client = BTreeMap::new();
    for (id, s) in &st.sessions {
        assert!(st.users.contains_key(&s.user));
        assert!(id.0 >= 1 && id.0 <= st.next_session);
        assert!(by_user.insert(s.user.clone(), *id).is_none());
        assert!(by_client.insert(s.client, *id).is_none());
    }
    assert_eq!(st.session_of_user, by_user);
    assert_eq!(st.session_of_client, by_client);
    let by_use: BTreeMap<u64, u64> = st.answers.iter().map(|(c, m)| (m.last_used, *c)).collect();
    assert_eq!(st.answers_by_use, by_use);
    assert!(st.answers.len() <= MAX_REMEMBERED_CLIENTS);
    for m in st.answers.values() {
        assert!(m.last_used >= 1 && m.last_used <= st.n_applied);
        assert!(m.answers.len() <= MAX_ANSWERS_PER_CLIENT);
    }
    for g in st.groups.values() {
        assert_eq!(g.members.first(), Some(&g.owner));
        let members: BTreeSet<&UserId> = g.members.iter().collect();
        assert_eq!(members.len(), g.members.len());
        let requests: BTreeSet<&UserId> = g.requests.iter().collect();
        assert_eq!(requests.len(), g.requests.len());
        assert!(members.is_disjoint(&requests));
        for u in g.members.iter().chain(&g.requests) {
            assert!(st.users.contains_key(u));
        }
        for (name, f) in &g.files {
            assert_eq!(&f.meta.name, name);
            assert!(!f.sharers.is_empty());
            for s in &f.sharers {
                assert!(members.contains(&s.user));
            }
        }
    }
}

/// A state with some of everything: users, two groups (members, pending requests, files with
/// several sharers), sessions on two trackers (one resumed, one opened without a client), and
/// remembered answers of every kind, refusals included.
fn rich_state() -> TrackerState {
    let mut st = TrackerState::new();
    for (i, u) in ["alice", "bob", "carol", "dave", "eve"].iter().enumerate() {
        assert_eq!(
            asked(&mut st, 100 + i as u64, 1, create_user(u)),
            Ok(Outcome::Done)
        );
    }
    // A refusal, remembered.
    assert!(asked(&mut st, 100, 2, another_creation("alice")).is_err());
    let alice = session_id(asked(&mut st, 100, 3, open("alice", 7001, T1, 100)));
    let bob = session_id(asked(&mut st, 101, 2, open("bob", 7002, T1, 101)));
    let carol = session_id(asked(&mut st, 102, 2, open("carol", 7003, T2, 102)));
    let dave = session_id(internal(&mut st, open("dave", 7004, T2, 103)));

    let g = |session, group: &str| Op::CreateGroup {
        session,
        group: gid(group),
        quotas: None,
    };
    let join = |session, group: &str| Op::JoinGroup {
        session,
        group: gid(group),
        quotas: None,
    };
    let accept = |session, group: &str, user: &str| Op::AcceptRequest {
        session,
        group: gid(group),
        user: uid(user),
    };
    let share = |session, group: &str, m: FileMeta| Op::ShareFile {
        session,
        group: gid(group),
        meta: m,
        quotas: None,
    };
    assert_eq!(asked(&mut st, 100, 4, g(alice, "team")), Ok(Outcome::Done));
    assert_eq!(asked(&mut st, 102, 3, g(carol, "other")), Ok(Outcome::Done));
    for (client, s) in [(101, bob), (102, carol)] {
        assert_eq!(
            asked(&mut st, client, 10, join(s, "team")),
            Ok(Outcome::Done)
        );
    }
    assert_eq!(internal(&mut st, join(dave, "team")), Ok(Outcome::Done));
    assert_eq!(
        asked(&mut st, 101, 11, join(bob, "other")),
        Ok(Outcome::Done)
    );
    assert_eq!(
        asked(&mut st, 100, 5, accept(alice, "team", "bob")),
        Ok(Outcome::Done)
    );
    // The same request id again is answered from memory: carol is not accepted by it.
    assert_eq!(
        asked(&mut st, 100, 5, accept(alice, "team", "carol")),
        Ok(Outcome::Done)
    );
    assert!(st
        .group(&gid("team"))
        .unwrap()
        .requests
        .contains(&uid("carol")));
    assert_eq!(
        asked(&mut st, 100, 6, accept(alice, "team", "carol")),
        Ok(Outcome::Done)
    );
    // Refused: dave has not been accepted, so he cannot share.
    assert!(asked(&mut st, 103, 2, share(dave, "team", meta("x", 1, 9))).is_err());

    let big = meta("movie.mkv", 3 * u64::from(PIECE_LEN) + 17, 1);
    assert_eq!(
        asked(&mut st, 100, 7, share(alice, "team", big.clone())),
        Ok(Outcome::Shared { new_file: true })
    );
    assert_eq!(
        asked(&mut st, 101, 12, share(bob, "team", big.clone())),
        Ok(Outcome::Shared { new_file: false })
    );
    assert_eq!(
        internal(&mut st, share(carol, "team", big)),
        Ok(Outcome::Shared { new_file: false })
    );
    assert_eq!(
        asked(&mut st, 100, 8, share(alice, "team", meta("empty", 0, 2))),
        Ok(Outcome::Shared { new_file: true })
    );
    assert_eq!(
        asked(
            &mut st,
            102,
            4,
            share(carol, "other", meta("notes 2026.pdf", 1500, 3))
        ),
        Ok(Outcome::Shared { new_file: true })
    );
    // Carol's tracker died; her client resumed through T1 as a new client id.
    let token = st.session(carol).unwrap().token;
    assert_eq!(
        asked(
            &mut st,
            202,
            1,
            Op::ResumeSession {
                token,
                tracker: T1,
                client: 202,
                link: 0,
            }
        ),
        Ok(Outcome::SessionOpened(carol))
    );
    // Eve logged in and out; her client went away (its answers are forgotten).
    let eve = session_id(asked(&mut st, 104, 2, open("eve", 7005, T2, 104)));
    assert_eq!(
        asked(
            &mut st,
            104,
            3,
            Op::CloseSession {
                session: eve,
                tracker: T2
            }
        ),
        Ok(Outcome::Done)
    );
    assert_eq!(
        internal(
            &mut st,
            Op::ClientGone {
                client: 104,
                tracker: T2,
                link: 0,
            }
        ),
        Ok(Outcome::Done)
    );
    // A refusal with a non-ASCII message.
    assert!(asked(&mut st, 101, 13, g(bob, "grüße")).is_ok());
    assert!(asked(&mut st, 101, 14, g(bob, "grüße")).is_err());
    st
}

// =============================================================================================
// Golden bytes and round trips
// =============================================================================================

#[test]
fn golden_empty_state() {
    let bytes = round_trip(&TrackerState::new());
    assert_eq!(
        bytes,
        [
            &[0, 0, 0, 3][..],         // version
            &[0, 0, 0, 0, 0, 0, 0, 0], // next_session
            &[0, 0, 0, 0, 0, 0, 0, 0], // n_applied
            &[0, 0, 0, 0],             // users
            &[0, 0, 0, 0],             // groups
            &[0, 0, 0, 0],             // sessions
            &[0, 0, 0, 0],             // answers
        ]
        .concat()
    );
}

#[test]
fn golden_user_session_and_answers() {
    let mut st = TrackerState::new();
    let hash = || Op::CreateUser {
        user: uid("a"),
        pw_hash: "h".to_owned(),
    };
    assert_eq!(asked(&mut st, 5, 6, hash()), Ok(Outcome::Done));
    let open = Op::OpenSession {
        user: uid("a"),
        peer_addr: addr(0x0102),
        tracker: TrackerRef {
            no: 3,
            incarnation: 4,
        },
        client: 5,
        token: [0xee; 16],
        shares: None,
        client_key: [0xcc; 32],
        link: 9,
    };
    assert_eq!(
        asked(&mut st, 5, 7, open),
        Ok(Outcome::SessionOpened(SessionId(1)))
    );
    let again = Op::CreateUser {
        user: uid("a"),
        pw_hash: "h2".to_owned(),
    };
    assert!(asked(&mut st, 5, 8, again).is_err());
    let message = b"user 'a' already exists";
    let want = [
        &[0, 0, 0, 3][..],
        &[0, 0, 0, 0, 0, 0, 0, 1], // next_session
        &[0, 0, 0, 0, 0, 0, 0, 3], // n_applied
        &[0, 0, 0, 1],             // one user
        &[0, 1, b'a', 0, 1, b'h'],
        &[0, 0, 0, 0],             // no groups
        &[0, 0, 0, 1],             // one session
        &[0, 0, 0, 0, 0, 0, 0, 1], // id
        &[0, 1, b'a'],
        &[4, 127, 0, 0, 1, 1, 2],           // peer_addr
        &[0, 3, 0, 0, 0, 0, 0, 0, 0, 4],    // tracker
        &[0, 0, 0, 0, 0, 0, 0, 5],          // client
        &[0xee; 16],                        // token
        &[0xcc; 32],                        // client key
        &[0, 0, 0, 0, 0, 0, 0, 9],          // link
        &[0, 0, 0, 1],                      // one remembered client
        &[0, 0, 0, 0, 0, 0, 0, 5],          // client
        &[0, 0, 0, 0, 0, 0, 0, 3],          // last_used
        &[0, 0, 0, 3],                      // three answers
        &[0, 0, 0, 0, 0, 0, 0, 6, 0],       // req 6: done
        &[0, 0, 0, 0, 0, 0, 0, 7, 1],       // req 7: session opened
        &[0, 0, 0, 0, 0, 0, 0, 1],          //   session 1
        &[0, 0, 0, 0, 0, 0, 0, 8, 3, 0, 2], // req 8: refused, UserExists
        &[0, message.len() as u8],
        message,
    ]
    .concat();
    assert_eq!(round_trip(&st), want);
}

#[test]
fn golden_group_with_a_file() {
    let mut st = TrackerState::new();
    assert!(internal(&mut st, create_user("o")).is_ok());
    let s = session_id(internal(&mut st, open("o", 9, T1, 1)));
    let outcome = internal(
        &mut st,
        Op::CreateGroup {
            session: s,
            group: gid("g"),
            quotas: None,
        },
    );
    assert_eq!(outcome, Ok(Outcome::Done));
    let m = FileMeta {
        name: fname("f"),
        size: 1,
        piece_len: 1,
        file_sha1: Sha1Digest([0xaa; 20]),
        piece_hashes: vec![Sha1Digest([0xbb; 20])],
    };
    let outcome = internal(
        &mut st,
        Op::ShareFile {
            session: s,
            group: gid("g"),
            meta: m,
            quotas: None,
        },
    );
    assert_eq!(outcome, Ok(Outcome::Shared { new_file: true }));
    let bytes = round_trip(&st);
    let users_end = 4 + 8 + 8 + 4 + 3 + 2 + st.users[&uid("o")].pw_hash.len();
    let want_groups = [
        &[0, 0, 0, 1][..], // one group
        &[0, 1, b'g'],
        &[0, 1, b'o'],             // owner
        &[0, 0, 0, 1, 0, 1, b'o'], // members
        &[0, 0, 0, 0],             // requests
        &[0, 0, 0, 1],             // one file
        &[0, 1, b'f'],             // file_meta: name
        &[0, 0, 0, 0, 0, 0, 0, 1], // size
        &[0, 0, 0, 1],             // piece_len
        &[0xaa; 20],               // file_sha1
        &[0, 0, 0, 1],             // one piece
        &[0xbb; 20],               //
        &[0, 0, 0, 1],             // one sharer
        &[0, 1, b'o', 4, 127, 0, 0, 1, 0, 9],
    ]
    .concat();
    assert_eq!(
        &bytes[users_end..users_end + want_groups.len()],
        &want_groups[..]
    );
}

#[test]
fn rich_state_round_trips() {
    let st = rich_state();
    check_consistent(&st);
    // The state really has some of everything.
    let team = st.group(&gid("team")).unwrap();
    assert_eq!(team.members.len(), 3);
    assert_eq!(team.requests, vec![uid("dave")]);
    assert_eq!(team.files.len(), 2);
    assert_eq!(team.files[&fname("movie.mkv")].sharers.len(), 3);
    assert_eq!(st.group(&gid("other")).unwrap().requests, vec![uid("bob")]);
    assert_eq!(st.sessions.len(), 4);
    assert!(st
        .sessions
        .values()
        .any(|s| s.tracker == T1 && s.client == 202));
    let answers: Vec<&Answer> = st
        .answers
        .values()
        .flat_map(|m| m.answers.iter().map(|(_, a)| a))
        .collect();
    assert!(answers.iter().any(|a| matches!(a, Ok(Outcome::Done))));
    assert!(answers
        .iter()
        .any(|a| matches!(a, Ok(Outcome::SessionOpened(_)))));
    assert!(answers
        .iter()
        .any(|a| matches!(a, Ok(Outcome::Shared { new_file: true }))));
    assert!(answers
        .iter()
        .any(|a| matches!(a, Ok(Outcome::Shared { new_file: false }))));
    let codes: BTreeSet<u16> = answers
        .iter()
        .filter_map(|a| a.as_ref().err().map(|r| r.code.to_u16()))
        .collect();
    assert!(codes.len() >= 3, "refusals remembered: {codes:?}");
    assert!(
        st.answers.contains_key(&104),
        "a gone client's answers stay (it may be retrying through another tracker)"
    );

    round_trip(&st);

    // The copy answers retries as the original does.
    let copy = TrackerState::decode_snapshot(&encode(&st)).unwrap();
    for (client, memory) in &st.answers {
        for (req_id, answer) in &memory.answers {
            let origin = Origin {
                client: *client,
                req_id: *req_id,
            };
            assert_eq!(copy.remembered(origin).as_ref(), Some(answer));
        }
    }
}

#[test]
fn other_reject_codes_and_long_messages_round_trip() {
    let mut st = TrackerState::new();
    let long = format!("{}é", "m".repeat(3000));
    st.n_applied = 5;
    st.remember(
        Origin {
            client: 1,
            req_id: 1,
        },
        Err(Reject::new(RejectCode::Other(0x7fff), long)),
    );
    st.remember(
        Origin {
            client: 1,
            req_id: 2,
        },
        Err(Reject::new(RejectCode::Internal, "")),
    );
    round_trip(&st);
}

#[test]
fn over_long_message_is_cut_at_a_char_boundary() {
    let mut st = TrackerState::new();
    st.n_applied = 1;
    // 2 * 40_000 bytes: byte 65 535 falls inside an 'é', so the cut is at 65 534.
    let message = "é".repeat(40_000);
    st.remember(
        Origin {
            client: 1,
            req_id: 1,
        },
        Err(Reject::new(RejectCode::Internal, message.clone())),
    );
    let copy = TrackerState::decode_snapshot(&encode(&st)).unwrap();
    match copy.remembered(Origin {
        client: 1,
        req_id: 1,
    }) {
        Some(Err(r)) => {
            assert_eq!(r.message.len(), usize::from(u16::MAX) - 1);
            assert!(message.starts_with(&r.message));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_full_answer_memory_round_trips() {
    let mut st = TrackerState::new();
    assert!(internal(&mut st, create_user("a")).is_ok());
    for req_id in 0..100 {
        let answer = asked(&mut st, 9, req_id, another_creation("a"));
        assert!(answer.is_err());
        // And a few other clients in between.
        let _ = asked(&mut st, 1000 + req_id % 3, req_id, create_user("b"));
    }
    assert_eq!(st.answers[&9].answers.len(), MAX_ANSWERS_PER_CLIENT);
    assert_eq!(st.answers.len(), 4);
    round_trip(&st);
}

#[test]
fn encode_appends_without_touching_what_is_there() {
    let st = rich_state();
    let mut out = vec![0xee, 0xee];
    st.encode_snapshot(&mut out);
    assert_eq!(out[..2], [0xee, 0xee]);
    assert_eq!(out[2..], encode(&st)[..]);
}

// =============================================================================================
// Random runs
// =============================================================================================

const R_USERS: [&str; 5] = ["u0", "u1", "u2", "u3", "u4"];
const R_GROUPS: [&str; 3] = ["g0", "g1", "g2"];
const R_FILES: [&str; 3] = ["f0", "f1", "f2"];
const R_PORTS: [u16; 3] = [7000, 7001, 7002];
const R_CLIENTS: [u64; 5] = [1, 2, 3, 4, 5];
const R_TRACKERS: [TrackerRef; 3] = [
    T1,
    T2,
    TrackerRef {
        no: 1,
        incarnation: 12,
    },
];

fn random_session(rng: &mut SplitMix64, st: &TrackerState) -> SessionId {
    let open: Vec<SessionId> = st.sessions.keys().copied().collect();
    if !open.is_empty() && rng.percent(85) {
        *rng.pick(&open)
    } else {
        SessionId(rng.below((st.next_session as usize).saturating_add(2)) as u64)
    }
}

fn owner_session(rng: &mut SplitMix64, st: &TrackerState, group: &str) -> SessionId {
    let owner = st
        .group(&gid(group))
        .and_then(|g| st.session_of_user.get(&g.owner));
    match owner {
        Some(s) if rng.percent(60) => *s,
        _ => random_session(rng, st),
    }
}

fn requester(rng: &mut SplitMix64, st: &TrackerState, group: &str) -> UserId {
    match st.group(&gid(group)) {
        Some(g) if !g.requests.is_empty() && rng.percent(70) => {
            g.requests[rng.below(g.requests.len())].clone()
        }
        _ => uid(rng.pick::<&str>(&R_USERS)),
    }
}

/// No quotas (an earlier build's op) or tight ones that the random ops reach.
fn random_quotas(rng: &mut SplitMix64) -> Option<OpQuotas> {
    rng.percent(60).then(|| OpQuotas {
        groups_owned: 1 + rng.below(2) as u64,
        requests: 1 + rng.below(2) as u64,
        files: 1 + rng.below(3) as u64,
        metadata: [100, 1 << 20][rng.below(2)],
        state_bytes: [2_000, u64::MAX][rng.below(2)],
    })
}

fn random_op(rng: &mut SplitMix64, st: &TrackerState) -> Op {
    let group = *rng.pick(&R_GROUPS);
    let tracker = *rng.pick(&R_TRACKERS);
    let client = *rng.pick(&R_CLIENTS);
    match rng.below(100) {
        0..=5 => {
            // Sometimes this very creation again (answered Done), sometimes another.
            let user = *rng.pick::<&str>(&R_USERS);
            if rng.below(2) == 0 {
                create_user(user)
            } else {
                another_creation(user)
            }
        }
        6..=17 => {
            let mut op = open(
                rng.pick::<&str>(&R_USERS),
                *rng.pick(&R_PORTS),
                tracker,
                client,
            );
            if let Op::OpenSession { token, link, .. } = &mut op {
                rng.fill(token);
                *link = rng.below(4) as u64;
            }
            op
        }
        18..=21 => {
            let tokens: Vec<[u8; 16]> = st.sessions.values().map(|s| s.token).collect();
            let token = if !tokens.is_empty() && rng.percent(70) {
                *rng.pick(&tokens)
            } else {
                [0x5a; 16]
            };
            Op::ResumeSession {
                token,
                tracker,
                client,
                link: rng.below(4) as u64,
            }
        }
        22..=26 => Op::CloseSession {
            session: random_session(rng, st),
            tracker,
        },
        27..=29 => Op::ClientGone {
            client,
            tracker,
            link: rng.below(4) as u64,
        },
        30 => Op::ExpireSessions { tracker },
        31..=36 => Op::CreateGroup {
            session: random_session(rng, st),
            group: gid(group),
            quotas: random_quotas(rng),
        },
        37..=48 => Op::JoinGroup {
            session: random_session(rng, st),
            group: gid(group),
            quotas: random_quotas(rng),
        },
        49..=53 => Op::LeaveGroup {
            session: random_session(rng, st),
            group: gid(group),
        },
        54..=65 => Op::AcceptRequest {
            session: owner_session(rng, st, group),
            group: gid(group),
            user: requester(rng, st, group),
        },
        66..=69 => Op::RejectRequest {
            session: owner_session(rng, st, group),
            group: gid(group),
            user: requester(rng, st, group),
        },
        70..=88 => {
            let i = rng.below(R_FILES.len());
            let content = usize::from(rng.percent(15));
            let size = [1000, 2 * u64::from(PIECE_LEN) + 1][content];
            Op::ShareFile {
                session: random_session(rng, st),
                group: gid(group),
                meta: meta(R_FILES[i], size, (i * 10 + content) as u64),
                quotas: random_quotas(rng),
            }
        }
        _ => Op::StopShare {
            session: random_session(rng, st),
            group: gid(group),
            name: fname(rng.pick::<&str>(&R_FILES)),
        },
    }
}

/// A random entry; most come from a client, some retry a recent request id.
fn random_entry(rng: &mut SplitMix64, st: &TrackerState, next_req: &mut u64) -> Entry {
    let op = random_op(rng, st);
    let origin = if rng.percent(80) {
        let req_id = if rng.percent(15) && *next_req > 0 {
            rng.below(*next_req as usize) as u64
        } else {
            *next_req += 1;
            *next_req
        };
        Some(Origin {
            client: *rng.pick(&R_CLIENTS),
            req_id,
        })
    } else {
        None
    };
    Entry { origin, op }
}

/// What the random run's snapshots held, to show it covered every part of the format.
#[derive(Default, Debug)]
struct Seen {
    requests: bool,
    multi_sharer_files: bool,
    sessions_on_two_trackers: bool,
    refusals: bool,
    opened: bool,
    shared: bool,
}

fn note(seen: &mut Seen, st: &TrackerState) {
    for g in st.groups.values() {
        seen.requests |= !g.requests.is_empty();
        seen.multi_sharer_files |= g.files.values().any(|f| f.sharers.len() > 1);
    }
    let trackers: BTreeSet<TrackerRef> = st.sessions.values().map(|s| s.tracker).collect();
    seen.sessions_on_two_trackers |= trackers.len() > 1;
    for m in st.answers.values() {
        for (_, a) in &m.answers {
            seen.refusals |= a.is_err();
            seen.opened |= matches!(a, Ok(Outcome::SessionOpened(_)));
            seen.shared |= matches!(a, Ok(Outcome::Shared { .. }));
        }
    }
}

#[test]
fn random_states_round_trip_and_decoded_copies_behave_the_same() {
    for seed in [1, 0x5eed, 0xdead_beef] {
        let mut rng = SplitMix64::new(seed);
        let mut st = TrackerState::new();
        let mut next_req = 0;
        // Copies decoded along the way, each fed the same entries afterwards.
        let mut copies: Vec<TrackerState> = Vec::new();
        let mut seen = Seen::default();
        for step in 0..1500 {
            let entry = random_entry(&mut rng, &st, &mut next_req);
            let answer = st.apply_entry(&entry);
            for copy in &mut copies {
                assert_eq!(copy.apply_entry(&entry), answer, "seed {seed} step {step}");
            }
            if step % 50 == 0 {
                round_trip(&st);
                check_consistent(&st);
                note(&mut seen, &st);
                copies.push(TrackerState::decode_snapshot(&encode(&st)).unwrap());
            }
        }
        for copy in &copies {
            assert_eq!(*copy, st, "seed {seed}: a decoded copy diverged");
        }
        round_trip(&st);
        note(&mut seen, &st);
        assert!(
            seen.requests
                && seen.multi_sharer_files
                && seen.sessions_on_two_trackers
                && seen.refusals
                && seen.opened
                && seen.shared,
            "seed {seed}: {seen:?}"
        );
    }
}

// =============================================================================================
// Snapshots that could not back the indexes are refused
// =============================================================================================

#[track_caller]
fn refused(st: &TrackerState, what: &'static str) {
    assert_eq!(
        TrackerState::decode_snapshot(&encode(st)),
        Err(DecodeError::BadValue(what))
    );
}

fn session(user: &str, client: u64) -> Session {
    Session {
        user: uid(user),
        peer_addr: addr(1),
        tracker: T1,
        client,
        token: [1; 16],
        client_key: [0; 32],
        link: 0,
    }
}

#[test]
fn bad_sessions_are_refused() {
    let base = rich_state();

    let mut st = base.clone();
    st.sessions
        .insert(SessionId(st.next_session), session("nobody", 999));
    refused(&st, "session of an unknown user");

    let mut st = base.clone();
    st.next_session += 1;
    st.sessions
        .insert(SessionId(st.next_session), session("alice", 999));
    refused(&st, "user with two sessions");

    let mut st = base.clone();
    st.next_session += 1;
    let client = st.sessions.values().next().unwrap().client;
    st.sessions
        .insert(SessionId(st.next_session), session("eve", client));
    refused(&st, "client with two sessions");

    let mut st = base.clone();
    st.sessions
        .insert(SessionId(st.next_session + 1), session("eve", 999));
    refused(&st, "session id out of range");

    let mut st = base.clone();
    st.sessions.insert(SessionId(0), session("eve", 999));
    refused(&st, "session id out of range");

    // The same session without its index entries is fine: the indexes are rebuilt.
    let mut st = base.clone();
    st.next_session += 1;
    st.sessions
        .insert(SessionId(st.next_session), session("eve", 999));
    let copy = TrackerState::decode_snapshot(&encode(&st)).unwrap();
    check_consistent(&copy);
    assert_eq!(
        copy.session_of_user[&uid("eve")],
        SessionId(st.next_session)
    );
}

#[test]
fn bad_groups_are_refused() {
    let base = rich_state();
    let team = gid("team");
    let edit = |f: &dyn Fn(&mut Group)| {
        let mut st = base.clone();
        f(st.groups.get_mut(&team).unwrap());
        st
    };
    refused(
        &edit(&|g| g.owner = uid("bob")),
        "group owner is not its first member",
    );
    refused(
        &edit(&|g| g.members.clear()),
        "group owner is not its first member",
    );
    refused(
        &edit(&|g| g.members.push(uid("nobody"))),
        "group lists an unknown user",
    );
    refused(
        &edit(&|g| g.requests.push(uid("nobody"))),
        "group lists an unknown user",
    );
    refused(
        &edit(&|g| g.members.push(uid("bob"))),
        "group lists a user twice",
    );
    refused(
        &edit(&|g| g.requests.push(uid("dave"))),
        "group lists a user twice",
    );
    refused(
        &edit(&|g| g.requests.push(uid("bob"))),
        "group member with a pending request",
    );
    refused(
        &edit(&|g| {
            g.files.values_mut().next().unwrap().sharers.clear();
        }),
        "file without sharers",
    );
    refused(
        &edit(&|g| {
            let f = g.files.values_mut().next().unwrap();
            f.sharers.push(Sharer {
                user: uid("dave"),
                peer_addr: addr(5),
            });
        }),
        "file shared by a non-member",
    );
    refused(
        &edit(&|g| {
            let f = g.files.values_mut().next().unwrap();
            let again = f.sharers[0].clone();
            f.sharers.push(again);
        }),
        "file sharer listed twice",
    );
    // A file filed under another name than its own is out of order once encoded.
    refused(
        &edit(&|g| {
            let (_, f) = g.files.pop_first().unwrap();
            g.files.insert(fname("zzz"), f);
        }),
        "files out of order",
    );
}

#[test]
fn bad_answer_memories_are_refused() {
    let base = rich_state();

    let mut st = base.clone();
    st.answers.values_mut().next().unwrap().last_used = st.n_applied + 1;
    refused(&st, "answer stamp out of range");

    // Stamp 0 would be taken for "never used" by the next answer remembered.
    let mut st = base.clone();
    st.answers.values_mut().next().unwrap().last_used = 0;
    refused(&st, "answer stamp out of range");

    let mut st = base.clone();
    let stamps: Vec<u64> = st.answers.values().map(|m| m.last_used).collect();
    st.answers.values_mut().nth(1).unwrap().last_used = stamps[0];
    refused(&st, "two clients with the same answer stamp");

    let mut st = base.clone();
    let m = st.answers.values_mut().next().unwrap();
    while m.answers.len() <= MAX_ANSWERS_PER_CLIENT {
        m.answers.push_back((1, Ok(Outcome::Done)));
    }
    refused(&st, "too many remembered answers");

    let mut st = TrackerState::new();
    st.n_applied = MAX_REMEMBERED_CLIENTS as u64 + 1;
    for c in 0..=MAX_REMEMBERED_CLIENTS as u64 {
        st.answers.insert(
            c,
            ClientAnswers {
                last_used: c + 1,
                answers: VecDeque::new(),
            },
        );
    }
    refused(&st, "too many remembered clients");
    // One client fewer is accepted.
    st.answers.pop_last();
    assert!(TrackerState::decode_snapshot(&encode(&st)).is_ok());
}

/// A snapshot of users only, written by hand.
fn users_snapshot(users: &[&[u8]]) -> Vec<u8> {
    let mut b = vec![0, 0, 0, 2];
    b.extend_from_slice(&[0; 16]);
    b.extend_from_slice(&(users.len() as u32).to_be_bytes());
    for u in users {
        b.extend_from_slice(&(u.len() as u16).to_be_bytes());
        b.extend_from_slice(u);
        b.extend_from_slice(&[0, 1, b'h']);
    }
    b.extend_from_slice(&[0; 12]);
    b
}

#[test]
fn keys_must_be_ascending_and_distinct() {
    assert!(TrackerState::decode_snapshot(&users_snapshot(&[b"a", b"b"])).is_ok());
    for users in [&[&b"b"[..], b"a"][..], &[b"a", b"a"], &[b"a", b"c", b"b"]] {
        assert_eq!(
            TrackerState::decode_snapshot(&users_snapshot(users)),
            Err(DecodeError::BadValue("users out of order"))
        );
    }
}

#[test]
fn bad_fields_are_refused() {
    // Version (1 is read: see `a_version_1_snapshot_is_read_with_zero_client_keys`).
    let mut b = encode(&rich_state());
    b[3] = 4;
    assert_eq!(
        TrackerState::decode_snapshot(&b),
        Err(DecodeError::BadValue("snapshot version"))
    );
    // Invalid ids and an over-long password hash.
    assert_eq!(
        TrackerState::decode_snapshot(&users_snapshot(&[b"a b"])),
        Err(DecodeError::BadId(
            crate::wire::IdError::WhiteSpaceOrControl
        ))
    );
    assert_eq!(
        TrackerState::decode_snapshot(&users_snapshot(&[b""])),
        Err(DecodeError::BadId(crate::wire::IdError::Empty))
    );
    let mut st = TrackerState::new();
    st.users.insert(
        uid("a"),
        User {
            pw_hash: "h".repeat(crate::wire::replication::MAX_PW_HASH_LEN + 1),
        },
    );
    assert_eq!(
        TrackerState::decode_snapshot(&encode(&st)),
        Err(DecodeError::BadValue("string too long"))
    );
    // An answer kind and a boolean out of range, in the one-answer memory written last.
    let mut st = TrackerState::new();
    st.n_applied = 1;
    st.remember(
        Origin {
            client: 1,
            req_id: 1,
        },
        Ok(Outcome::Shared { new_file: true }),
    );
    let good = encode(&st);
    assert!(TrackerState::decode_snapshot(&good).is_ok());
    let mut b = good.clone();
    *b.last_mut().unwrap() = 2;
    assert_eq!(
        TrackerState::decode_snapshot(&b),
        Err(DecodeError::BadValue("boolean"))
    );
    let mut b = good.clone();
    let kind = b.len() - 2;
    for k in [4u8, 0x80, 0xff] {
        b[kind] = k;
        assert_eq!(
            TrackerState::decode_snapshot(&b),
            Err(DecodeError::BadValue("answer kind"))
        );
    }
}

// =============================================================================================
// Truncation, trailing bytes, forged counts, mutations
// =============================================================================================

#[test]
fn every_strict_prefix_is_an_error_and_trailing_bytes_too() {
    let st = rich_state();
    let bytes = encode(&st);
    for i in 0..bytes.len() {
        assert!(
            TrackerState::decode_snapshot(&bytes[..i]).is_err(),
            "prefix {i}"
        );
    }
    for extra in [0u8, 1, 0xff] {
        let mut b = bytes.clone();
        b.push(extra);
        assert_eq!(
            TrackerState::decode_snapshot(&b),
            Err(DecodeError::TrailingBytes(1))
        );
    }
}

#[test]
fn forged_huge_counts_fail_fast() {
    let started = Instant::now();
    let header = [&[0, 0, 0, 2][..], &[0; 16]].concat();
    for n in [u32::MAX, u32::MAX / 3, 1 << 24] {
        let count = n.to_be_bytes();
        // Users, groups, sessions, answers: each count in its place with a few bytes after.
        for zeros_before in 0..4 {
            let mut b = header.clone();
            for _ in 0..zeros_before {
                b.extend_from_slice(&[0; 4]);
            }
            b.extend_from_slice(&count);
            b.extend_from_slice(&[0, 1, b'a', 0, 0, 0, 0]);
            assert_eq!(
                TrackerState::decode_snapshot(&b),
                Err(DecodeError::Truncated),
                "count {n} in field {zeros_before}"
            );
        }
    }
    assert!(started.elapsed() < Duration::from_secs(1));
}

fn mutate(rng: &mut SplitMix64, p: &mut Vec<u8>) {
    for _ in 0..rng.between(1, 3) {
        match rng.below(5) {
            0 if !p.is_empty() => {
                let i = rng.below(p.len());
                p[i] ^= 1 << rng.below(8);
            }
            1 if !p.is_empty() => {
                let i = rng.below(p.len());
                let any = rng.next_u64() as u8;
                p[i] = *rng.pick(&[0, 1, 2, 3, 4, 0x7f, 0x80, 0xfe, 0xff, any]);
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
                let v: u32 = *rng.pick(&[0, 1, 2, 0xffff, u32::MAX, u32::MAX / 2]);
                p[i..i + 4].copy_from_slice(&v.to_be_bytes());
            }
            _ => p.push(rng.next_u64() as u8),
        }
    }
}

#[test]
fn mutated_snapshots_never_panic_and_what_decodes_is_consistent() {
    let mut rng = SplitMix64::new(0x5ea1);
    // A corpus of the rich state and a few random ones.
    let mut corpus = vec![encode(&rich_state())];
    for seed in [2, 3] {
        let mut r = SplitMix64::new(seed);
        let mut st = TrackerState::new();
        let mut next_req = 0;
        for _ in 0..300 {
            let e = random_entry(&mut r, &st, &mut next_req);
            let _ = st.apply_entry(&e);
        }
        corpus.push(encode(&st));
    }
    let mut accepted = 0;
    for _ in 0..3000 {
        let mut b = rng.pick(&corpus).clone();
        mutate(&mut rng, &mut b);
        if let Ok(mut st) = TrackerState::decode_snapshot(&b) {
            accepted += 1;
            assert_eq!(encode(&st), b, "the encoding is canonical");
            check_consistent(&st);
            // The decoded state takes more entries without trouble.
            let mut next_req = 1000;
            for _ in 0..5 {
                let e = random_entry(&mut rng, &st, &mut next_req);
                let _ = st.apply_entry(&e);
                check_consistent(&st);
            }
        }
    }
    // Some mutations (a token bit, a port, a hash byte) leave a valid snapshot.
    assert!(accepted > 0);
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = SplitMix64::new(0x5ea2);
    let mut buf = [0u8; 120];
    for _ in 0..20_000 {
        let len = rng.below(buf.len());
        let b = &mut buf[..len];
        rng.fill(b);
        if len >= 4 && rng.percent(80) {
            // Mostly past the version check.
            b[..4].copy_from_slice(&[0, 0, 0, 1]);
        }
        let _ = TrackerState::decode_snapshot(b);
    }
}

/// Snapshots of versions 1 and 2 (earlier builds, in their data directories: version 2's
/// sessions have no link number, version 1's not even a client key) are read, with link 0
/// (not numbered) and zero keys, and written back as the current version.
#[test]
fn a_version_1_snapshot_is_read_with_zero_client_keys() {
    let mut st = TrackerState::new();
    internal(&mut st, create_user("alice")).unwrap();
    let t = TrackerRef {
        no: 1,
        incarnation: 1,
    };
    session_id(asked(&mut st, 7, 1, open("alice", 0x4142, t, 7)));
    let v3 = round_trip(&st);
    // Version 2 is version 3 without the 8-byte link number after each session's key.
    let token = [0x42u8; 16];
    let at = v3
        .windows(16)
        .position(|w| w == token)
        .expect("the token is in the snapshot")
        + 16;
    assert_eq!(v3[at..at + 32], [0; 32]);
    assert_eq!(v3[at + 32..at + 40], [0; 8], "not numbered");
    let mut v2 = [&v3[..at + 32], &v3[at + 40..]].concat();
    v2[..4].copy_from_slice(&2u32.to_be_bytes());
    let back = TrackerState::decode_snapshot(&v2).expect("version 2 is read");
    assert_eq!(back, st);
    assert_eq!(encode(&back), v3, "written back as the current version");
    // Version 1 is version 2 without the 32-byte key after each session's token.
    let mut v1 = [&v2[..at], &v2[at + 32..]].concat();
    v1[..4].copy_from_slice(&1u32.to_be_bytes());
    let back = TrackerState::decode_snapshot(&v1).expect("version 1 is read");
    assert_eq!(back, st);
    assert_eq!(encode(&back), v3, "written back as the current version");
    // Any other version is refused.
    for version in [0u32, 4] {
        v1[..4].copy_from_slice(&version.to_be_bytes());
        assert!(TrackerState::decode_snapshot(&v1).is_err());
    }
}

/// Two copies of one login through two trackers (the client left the first link after
/// sending it, and sent it again through another): whichever is ordered second is answered
/// from memory, and it moves the session only if it came through the client's newer link; the
/// `ClientGone` of the link the client left ends nothing (seed 13002294 of the simulated
/// clusters: the late copy came from the left link, moved the session there, and its
/// `ClientGone` ended the session the client held through the other tracker). The link number
/// survives a snapshot.
#[test]
fn a_late_copy_of_a_login_from_a_left_link_neither_moves_nor_ends_the_session() {
    let a = TrackerRef {
        no: 1,
        incarnation: 10,
    };
    let b = TrackerRef {
        no: 2,
        incarnation: 20,
    };
    let login = |tracker: TrackerRef, link: u64| {
        let mut op = open("alice", 0x4142, tracker, 7);
        if let Op::OpenSession { link: l, .. } = &mut op {
            *l = link;
        }
        op
    };
    let gone = |st: &mut TrackerState, tracker: TrackerRef, link: u64| {
        internal(
            st,
            Op::ClientGone {
                client: 7,
                tracker,
                link,
            },
        )
        .unwrap()
    };
    let on = |st: &TrackerState| {
        st.sessions()
            .map(|(_, s)| (s.tracker, s.link))
            .collect::<Vec<_>>()
    };
    // The client sent the login on its link 1 (through `a`), then on its link 2 (through `b`).
    for late_from_left_link in [true, false] {
        let mut st = TrackerState::new();
        internal(&mut st, create_user("alice")).unwrap();
        let ((first, first_link), (second, second_link)) = if late_from_left_link {
            ((b, 2), (a, 1))
        } else {
            ((a, 1), (b, 2))
        };
        let id = session_id(asked(&mut st, 7, 116, login(first, first_link)));
        assert_eq!(on(&st), [(first, first_link)]);
        assert_eq!(
            session_id(asked(&mut st, 7, 116, login(second, second_link))),
            id,
            "the copy gets the remembered answer"
        );
        assert_eq!(on(&st), [(b, 2)], "the session is with the newer link");
        let back = TrackerState::decode_snapshot(&encode(&st)).expect("round trip");
        assert_eq!(back, st, "the link number survives a snapshot");
        // The left link's tracker sees it close: nothing changes.
        gone(&mut st, a, 1);
        assert_eq!(on(&st), [(b, 2)], "the session stays where the client is");
        // A resume through the left link, ordered late, moves nothing either.
        let token = st.sessions().next().map(|(_, s)| s.token).unwrap();
        let resume = Op::ResumeSession {
            token,
            tracker: a,
            client: 7,
            link: 1,
        };
        assert_eq!(
            asked(&mut st, 7, 117, resume),
            Ok(Outcome::SessionOpened(id))
        );
        assert_eq!(on(&st), [(b, 2)]);
        // Nor does a login through it, which is refused (a newer link holds the session).
        assert_eq!(
            asked(&mut st, 7, 118, login(a, 1)).map_err(|r| r.code),
            Err(RejectCode::SessionAlreadyOpen)
        );
        assert_eq!(on(&st), [(b, 2)]);
        // The newer link's close ends it, as does a later link's through the same tracker.
        let mut later = st.clone();
        gone(&mut st, b, 2);
        assert!(on(&st).is_empty(), "its own link's close ends it");
        gone(&mut later, b, 3);
        assert!(on(&later).is_empty(), "a later link's close ends it too");
    }
}

/// Ops of clients and logs that do not number links (link 0: earlier builds) act as they
/// always did: a late copy moves the session, and the `ClientGone` of the tracker holding it
/// ends it, whatever link a numbered op named before.
#[test]
fn unnumbered_links_act_as_before() {
    let a = TrackerRef {
        no: 1,
        incarnation: 10,
    };
    let b = TrackerRef {
        no: 2,
        incarnation: 20,
    };
    let mut st = TrackerState::new();
    internal(&mut st, create_user("alice")).unwrap();
    let id = session_id(asked(&mut st, 7, 1, open("alice", 0x4142, b, 7)));
    session_id(asked(&mut st, 7, 1, open("alice", 0x4142, a, 7)));
    assert_eq!(
        st.session(id).map(|s| s.tracker),
        Some(a),
        "moved by the copy"
    );
    internal(
        &mut st,
        Op::ClientGone {
            client: 7,
            tracker: a,
            link: 0,
        },
    )
    .unwrap();
    assert_eq!(st.session(id), None);
    // A numbered session and an unnumbered op: the op is never older.
    let mut st = TrackerState::new();
    internal(&mut st, create_user("alice")).unwrap();
    let mut numbered = open("alice", 0x4142, b, 7);
    if let Op::OpenSession { link, .. } = &mut numbered {
        *link = 5;
    }
    let id = session_id(asked(&mut st, 7, 1, numbered));
    internal(
        &mut st,
        Op::ClientGone {
            client: 7,
            tracker: b,
            link: 0,
        },
    )
    .unwrap();
    assert_eq!(st.session(id), None);
}
