//! Unit tests of [`TrackerState::apply`] and its queries, without sockets: every op and query,
//! every permission and every refusal (with its exact [`RejectCode`], and an unchanged state),
//! then a seeded random run that checks determinism and the state's invariants after every op.

use super::*;
use crate::testing::{fname, gid, uid};

use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;

use crate::wire::{Sha1Digest, PIECE_LEN};

// =============================================================================================
// Values
// =============================================================================================

/// A file size of four pieces, the last one short.
const SIZE: u64 = 3 * PIECE_LEN as u64 + 17;

/// Where a client listens: 127.0.0.1:`port`.
fn addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// A digest that depends on `content` and `index`, so different contents hash differently.
fn digest(content: u64, index: u64) -> Sha1Digest {
    let mut d = [0u8; 20];
    d[..8].copy_from_slice(&content.to_be_bytes());
    d[8..16].copy_from_slice(&index.to_be_bytes());
    d[16] = 0x5a;
    Sha1Digest(d)
}

/// Metadata of a file whose bytes are identified by `content`, with the right number of piece
/// hashes for `size` and `piece_len`.
fn meta_with(name: &str, size: u64, piece_len: u32, content: u64) -> FileMeta {
    let n = FileMeta::n_pieces_for(size, piece_len);
    FileMeta {
        name: fname(name),
        size,
        piece_len,
        file_sha1: digest(content, u64::MAX),
        piece_hashes: (0..n).map(|i| digest(content, i)).collect(),
    }
}

/// Metadata of a `size`-byte file in standard pieces whose bytes are identified by `content`.
fn meta(name: &str, size: u64, content: u64) -> FileMeta {
    meta_with(name, size, PIECE_LEN, content)
}

// =============================================================================================
// Ops
// =============================================================================================

mod op {
    use super::*;

    pub fn create_user(user: &str) -> Op {
        Op::CreateUser {
            user: uid(user),
            pw_hash: format!("$argon2id$hash-of-{user}"),
        }
    }

    pub fn open(user: &str, port: u16) -> Op {
        Op::OpenSession {
            user: uid(user),
            peer_addr: addr(port),
            tracker: T1,
            client: user.bytes().fold(u64::from(port), |h, b| {
                h.wrapping_mul(131).wrapping_add(u64::from(b))
            }),
            token: [port.to_be_bytes()[1]; 16],
            shares: None,
            client_key: [port.to_be_bytes()[1] ^ 0x5a; 32],
            link: 0,
        }
    }

    /// The tracker every test session is held by.
    pub const T1: TrackerRef = TrackerRef {
        no: 1,
        incarnation: 11,
    };

    pub fn close(session: SessionId) -> Op {
        Op::CloseSession {
            session,
            tracker: T1,
        }
    }

    pub fn create_group(session: SessionId, group: &str) -> Op {
        Op::CreateGroup {
            session,
            group: gid(group),
            quotas: None,
        }
    }

    pub fn join(session: SessionId, group: &str) -> Op {
        Op::JoinGroup {
            session,
            group: gid(group),
            quotas: None,
        }
    }

    pub fn leave(session: SessionId, group: &str) -> Op {
        Op::LeaveGroup {
            session,
            group: gid(group),
        }
    }

    pub fn accept(session: SessionId, group: &str, user: &str) -> Op {
        Op::AcceptRequest {
            session,
            group: gid(group),
            user: uid(user),
        }
    }

    pub fn reject(session: SessionId, group: &str, user: &str) -> Op {
        Op::RejectRequest {
            session,
            group: gid(group),
            user: uid(user),
        }
    }

    pub fn share(session: SessionId, group: &str, meta: FileMeta) -> Op {
        Op::ShareFile {
            session,
            group: gid(group),
            meta,
            quotas: None,
        }
    }

    pub fn stop(session: SessionId, group: &str, name: &str) -> Op {
        Op::StopShare {
            session,
            group: gid(group),
            name: fname(name),
        }
    }
}

/// Applies an op that must succeed.
#[track_caller]
fn ok(st: &mut TrackerState, op: Op) -> Outcome {
    match st.apply(&op) {
        Ok(outcome) => outcome,
        Err(e) => panic!("{op:?} was refused: {:?} {e}", e.code),
    }
}

/// Applies an op that must succeed with [`Outcome::Done`].
#[track_caller]
fn done(st: &mut TrackerState, op: Op) {
    assert_eq!(ok(st, op), Outcome::Done);
}

/// Applies an op that must be refused with `code`, and checks that it changed nothing.
#[track_caller]
fn refused(st: &mut TrackerState, op: Op, code: RejectCode) {
    let before = st.clone();
    match st.apply(&op) {
        Ok(outcome) => panic!("{op:?} succeeded ({outcome:?}), expected {code:?}"),
        Err(e) => {
            assert_eq!(e.code, code, "{op:?}: {e}");
            assert!(!e.message.is_empty(), "{op:?}: empty message");
            assert_eq!(e.to_string(), e.message);
        }
    }
    assert_eq!(*st, before, "the refused {op:?} changed the state");
}

/// Checks that a query was refused with `code`.
#[track_caller]
fn query_refused<T: fmt::Debug>(result: Result<T, Reject>, code: RejectCode) {
    match result {
        Ok(v) => panic!("query answered {v:?}, expected {code:?}"),
        Err(e) => {
            assert_eq!(e.code, code, "{e}");
            assert!(!e.message.is_empty());
        }
    }
}

// =============================================================================================
// Scenarios
// =============================================================================================

/// Opens a session of an existing user from 127.0.0.1:`port`.
#[track_caller]
fn login(st: &mut TrackerState, user: &str, port: u16) -> SessionId {
    match ok(st, op::open(user, port)) {
        Outcome::SessionOpened(id) => id,
        other => panic!("OpenSession answered {other:?}"),
    }
}

/// Creates a user and opens a session from 127.0.0.1:`port`.
#[track_caller]
fn new_user(st: &mut TrackerState, user: &str, port: u16) -> SessionId {
    done(st, op::create_user(user));
    login(st, user, port)
}

/// Makes the user of `session` a member of `group`: request, then the owner accepts.
#[track_caller]
fn add_member(st: &mut TrackerState, owner: SessionId, group: &str, session: SessionId) {
    let user = st.user_of(session).unwrap().as_str().to_owned();
    done(st, op::join(session, group));
    done(st, op::accept(owner, group, &user));
}

/// Creates users (user `i` listening on port `i + 1`), the first creates `group` and the others
/// become members in order. Returns their sessions.
#[track_caller]
fn group_with(st: &mut TrackerState, group: &str, users: &[&str]) -> Vec<SessionId> {
    let sessions: Vec<SessionId> = users
        .iter()
        .zip(1u16..)
        .map(|(u, port)| new_user(st, u, port))
        .collect();
    done(st, op::create_group(sessions[0], group));
    for s in &sessions[1..] {
        add_member(st, sessions[0], group, *s);
    }
    sessions
}

// =============================================================================================
// Views
// =============================================================================================

fn names<T: fmt::Display>(items: &[T]) -> Vec<String> {
    items.iter().map(ToString::to_string).collect()
}

/// The members of a group, in the order they joined.
fn members(st: &TrackerState, group: &str) -> Vec<String> {
    names(&st.group(&gid(group)).expect("no such group").members)
}

fn owner(st: &TrackerState, group: &str) -> String {
    st.group(&gid(group))
        .expect("no such group")
        .owner
        .to_string()
}

/// Pending requests as the owner `session` sees them.
fn requests(st: &TrackerState, session: SessionId, group: &str) -> Vec<String> {
    names(&st.list_requests(session, &gid(group)).unwrap())
}

/// How the user of `session` stands towards `group`, from `list_groups`.
fn relation(st: &TrackerState, session: SessionId, group: &str) -> Relation {
    st.list_groups(session)
        .unwrap()
        .into_iter()
        .find(|g| g.group == gid(group))
        .expect("group not listed")
        .relation
}

/// `list_files` as (name, n_online, n_sharers).
fn files(st: &TrackerState, session: SessionId, group: &str) -> Vec<(String, u32, u32)> {
    st.list_files(session, &gid(group))
        .unwrap()
        .into_iter()
        .map(|f| (f.name.to_string(), f.n_online, f.n_sharers))
        .collect()
}

fn row(name: &str, n_online: u32, n_sharers: u32) -> (String, u32, u32) {
    (name.to_owned(), n_online, n_sharers)
}

// =============================================================================================
// CreateUser
// =============================================================================================

#[test]
fn create_user_stores_only_the_hash() {
    let mut st = TrackerState::new();
    assert_eq!(st.password_hash(&uid("alice")), None);
    done(&mut st, op::create_user("alice"));
    assert_eq!(
        st.password_hash(&uid("alice")),
        Some("$argon2id$hash-of-alice")
    );
    assert_eq!(st.password_hash(&uid("bob")), None);
    assert_eq!(st.check_can_log_in(&uid("alice")), Ok(()));
    assert_eq!(st.sessions().count(), 0, "creating a user does not log in");
}

#[test]
fn create_user_twice_is_user_exists() {
    let mut st = TrackerState::new();
    done(&mut st, op::create_user("alice"));
    let other_hash = Op::CreateUser {
        user: uid("alice"),
        pw_hash: "another".into(),
    };
    refused(&mut st, other_hash, RejectCode::UserExists);
    assert_eq!(
        st.password_hash(&uid("alice")),
        Some("$argon2id$hash-of-alice")
    );
    // Ids are case-sensitive: another user.
    done(&mut st, op::create_user("Alice"));
}

/// The same creation ordered again (a retried create_user re-proposed after its password
/// check, its remembered answer dropped meanwhile): the hash is byte-identical (a PHC string
/// with its random salt), so it is this client's own creation, answered Done and applying
/// nothing. Any other hash, the same password's included, is another creation: UserExists.
#[test]
fn the_same_creation_again_is_done_and_changes_nothing() {
    let mut st = TrackerState::new();
    done(&mut st, op::create_user("alice"));
    let before = st.clone();
    assert_eq!(st.apply(&op::create_user("alice")), Ok(Outcome::Done));
    assert_eq!(st, before, "nothing applied twice");
    // Through `apply_entry` with no remembered answer for the request (as when it was
    // dropped before the copy applied).
    let entry = |req_id| Entry {
        origin: Some(Origin { client: 9, req_id }),
        op: op::create_user("alice"),
    };
    assert_eq!(st.apply_entry(&entry(1)), Ok(Outcome::Done));
    assert_eq!(
        st.password_hash(&uid("alice")),
        before.password_hash(&uid("alice"))
    );
    let before = st.clone();
    let resalted = Op::CreateUser {
        user: uid("alice"),
        pw_hash: "$argon2id$another-salt$hash-of-alice".into(),
    };
    refused(&mut st, resalted, RejectCode::UserExists);
    assert_eq!(st, before);
}

// =============================================================================================
// Sessions
// =============================================================================================

#[test]
fn open_session_of_unknown_user_is_unknown_user() {
    let mut st = TrackerState::new();
    refused(&mut st, op::open("ghost", 1), RejectCode::UnknownUser);
    query_refused(st.check_can_log_in(&uid("ghost")), RejectCode::UnknownUser);
    done(&mut st, op::create_user("alice"));
    refused(&mut st, op::open("ghost", 1), RejectCode::UnknownUser);
}

#[test]
fn open_session_records_the_client() {
    let mut st = TrackerState::new();
    done(&mut st, op::create_user("alice"));
    let open = Op::OpenSession {
        user: uid("alice"),
        peer_addr: addr(4000),
        tracker: TrackerRef {
            no: 7,
            incarnation: 70,
        },
        client: 99,
        token: [9; 16],
        shares: None,
        client_key: [0x99; 32],
        link: 3,
    };
    let Outcome::SessionOpened(s) = ok(&mut st, open) else {
        panic!("no session id");
    };
    let expected = Session {
        user: uid("alice"),
        peer_addr: addr(4000),
        tracker: TrackerRef {
            no: 7,
            incarnation: 70,
        },
        client: 99,
        token: [9; 16],
        client_key: [0x99; 32],
        link: 3,
    };
    assert_eq!(st.session(s), Some(&expected));
    assert_eq!(st.user_of(s), Ok(&uid("alice")));
    assert_eq!(st.sessions().collect::<Vec<_>>(), vec![(&s, &expected)]);
}

#[test]
fn second_session_of_a_user_is_logged_in_elsewhere() {
    let mut st = TrackerState::new();
    let a = new_user(&mut st, "alice", 1);
    // From another client: one session per user.
    refused(
        &mut st,
        op::open("alice", 2),
        RejectCode::UserLoggedInElsewhere,
    );
    query_refused(
        st.check_can_log_in(&uid("alice")),
        RejectCode::UserLoggedInElsewhere,
    );
    // The same client process logging in again (it was told its session is gone: it moved
    // under a late retry) replaces its own session.
    let again = login(&mut st, "alice", 1);
    assert_ne!(again, a);
    assert_eq!(st.sessions().count(), 1);
    let a = again;
    // Another user is not affected, even from the same address.
    let b = new_user(&mut st, "bob", 1);
    assert_ne!(a, b);
    assert_eq!(st.sessions().count(), 2);
}

#[test]
fn session_ids_are_distinct_and_increasing() {
    let mut st = TrackerState::new();
    for u in ["alice", "bob", "carol"] {
        done(&mut st, op::create_user(u));
    }
    let mut ids = vec![login(&mut st, "alice", 1), login(&mut st, "bob", 2)];
    done(&mut st, op::close(ids[0]));
    ids.push(login(&mut st, "alice", 1));
    ids.push(login(&mut st, "carol", 3));
    done(&mut st, op::close(ids[3]));
    done(&mut st, op::close(ids[2]));
    ids.push(login(&mut st, "carol", 3));
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids not increasing: {ids:?}"
    );
    let open: Vec<SessionId> = st.sessions().map(|(id, _)| *id).collect();
    assert_eq!(open, vec![ids[1], ids[4]], "sessions() is in id order");
}

#[test]
fn close_session_frees_the_user() {
    let mut st = TrackerState::new();
    let a = new_user(&mut st, "alice", 1);
    let b = new_user(&mut st, "bob", 2);
    done(&mut st, op::close(a));
    assert_eq!(st.session(a), None);
    query_refused(st.user_of(a), RejectCode::NotLoggedIn);
    assert_eq!(st.check_can_log_in(&uid("alice")), Ok(()));
    assert_eq!(st.user_of(b), Ok(&uid("bob")), "other sessions stay");
    // From another client this time.
    let a2 = login(&mut st, "alice", 9);
    assert_ne!(a, a2);
    assert_eq!(st.session(a2).unwrap().peer_addr, addr(9));
    assert_eq!(st.sessions().count(), 2);
}

#[test]
fn close_unknown_session_is_not_logged_in() {
    let mut st = TrackerState::new();
    refused(&mut st, op::close(SessionId(0)), RejectCode::NotLoggedIn);
    refused(&mut st, op::close(SessionId(1)), RejectCode::NotLoggedIn);
    let a = new_user(&mut st, "alice", 1);
    refused(
        &mut st,
        op::close(SessionId(a.0 + 1)),
        RejectCode::NotLoggedIn,
    );
    done(&mut st, op::close(a));
    refused(&mut st, op::close(a), RejectCode::NotLoggedIn);
}

#[test]
fn every_session_op_and_query_needs_an_open_session() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob"]);
    let carol = new_user(&mut st, "carol", 3);
    done(&mut st, op::join(carol, "g"));
    ok(&mut st, op::share(s[0], "g", meta("f", SIZE, 1)));
    // Alice, the owner and sharer, logs out: her old session would be allowed everything.
    done(&mut st, op::close(s[0]));
    let never_issued = [SessionId(0), SessionId(s[0].0 + 1000), SessionId(u64::MAX)];
    for session in std::iter::once(s[0]).chain(never_issued) {
        let ops = [
            op::create_group(session, "new"),
            op::create_group(session, "g"),
            op::join(session, "g"),
            op::join(session, "nope"),
            op::leave(session, "g"),
            op::leave(session, "nope"),
            op::accept(session, "g", "carol"),
            op::accept(session, "nope", "carol"),
            op::reject(session, "g", "carol"),
            op::reject(session, "nope", "carol"),
            op::share(session, "g", meta("f", SIZE, 1)),
            op::share(session, "g", meta("f", SIZE, 2)),
            op::share(session, "g", meta("new", SIZE, 3)),
            op::share(session, "nope", meta("f", SIZE, 1)),
            op::stop(session, "g", "f"),
            op::stop(session, "g", "missing"),
            op::stop(session, "nope", "f"),
            op::close(session),
        ];
        for op in ops {
            refused(&mut st, op, RejectCode::NotLoggedIn);
        }
        for group in ["g", "nope"] {
            query_refused(
                st.list_requests(session, &gid(group)),
                RejectCode::NotLoggedIn,
            );
            query_refused(st.list_files(session, &gid(group)), RejectCode::NotLoggedIn);
        }
        query_refused(st.list_groups(session), RejectCode::NotLoggedIn);
        query_refused(st.user_of(session), RejectCode::NotLoggedIn);
        assert_eq!(st.session(session), None);
    }
}

// =============================================================================================
// CreateGroup
// =============================================================================================

#[test]
fn create_group_makes_the_creator_owner_and_first_member() {
    let mut st = TrackerState::new();
    let a = new_user(&mut st, "alice", 1);
    done(&mut st, op::create_group(a, "g"));
    let g = st.group(&gid("g")).unwrap();
    assert_eq!(g.owner, uid("alice"));
    assert_eq!(g.members, vec![uid("alice")]);
    assert!(g.requests.is_empty());
    assert!(g.files.is_empty());
    assert_eq!(
        st.list_groups(a).unwrap(),
        vec![GroupInfo {
            group: gid("g"),
            owner: uid("alice"),
            n_members: 1,
            relation: Relation::Owner,
        }]
    );
    assert_eq!(st.list_requests(a, &gid("g")).unwrap(), vec![]);
    assert_eq!(st.list_files(a, &gid("g")).unwrap(), vec![]);
    // A user may own several groups.
    done(&mut st, op::create_group(a, "h"));
    assert_eq!(owner(&st, "h"), "alice");
}

#[test]
fn create_group_twice_is_group_exists() {
    let mut st = TrackerState::new();
    let a = new_user(&mut st, "alice", 1);
    let b = new_user(&mut st, "bob", 2);
    done(&mut st, op::create_group(a, "g"));
    refused(&mut st, op::create_group(a, "g"), RejectCode::GroupExists);
    refused(&mut st, op::create_group(b, "g"), RejectCode::GroupExists);
    assert_eq!(owner(&st, "g"), "alice");
    // Ids are case-sensitive.
    done(&mut st, op::create_group(b, "G"));
}

// =============================================================================================
// JoinGroup and list_requests
// =============================================================================================

#[test]
fn join_group_files_requests_oldest_first() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice"]);
    let c = new_user(&mut st, "carol", 3);
    let b = new_user(&mut st, "bob", 2);
    let d = new_user(&mut st, "dave", 4);
    for x in [c, b, d] {
        done(&mut st, op::join(x, "g"));
    }
    assert_eq!(requests(&st, s[0], "g"), ["carol", "bob", "dave"]);
    assert_eq!(members(&st, "g"), ["alice"], "a request is not membership");
    assert_eq!(relation(&st, b, "g"), Relation::Requested);
    assert_eq!(st.list_groups(b).unwrap()[0].n_members, 1);
}

#[test]
fn join_unknown_group_is_no_such_group() {
    let mut st = TrackerState::new();
    let a = new_user(&mut st, "alice", 1);
    refused(&mut st, op::join(a, "g"), RejectCode::NoSuchGroup);
    done(&mut st, op::create_group(a, "g"));
    refused(&mut st, op::join(a, "G"), RejectCode::NoSuchGroup);
}

#[test]
fn join_as_member_or_owner_is_already_member() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob"]);
    refused(&mut st, op::join(s[0], "g"), RejectCode::AlreadyMember);
    refused(&mut st, op::join(s[1], "g"), RejectCode::AlreadyMember);
}

#[test]
fn join_twice_is_already_requested() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice"]);
    let b = new_user(&mut st, "bob", 2);
    done(&mut st, op::join(b, "g"));
    refused(&mut st, op::join(b, "g"), RejectCode::AlreadyRequested);
    // Also from another client of the same user.
    done(&mut st, op::close(b));
    let b2 = login(&mut st, "bob", 22);
    refused(&mut st, op::join(b2, "g"), RejectCode::AlreadyRequested);
    assert_eq!(requests(&st, s[0], "g"), ["bob"]);
}

#[test]
fn list_requests_is_for_the_owner_only() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob"]);
    let c = new_user(&mut st, "carol", 3);
    let d = new_user(&mut st, "dave", 4);
    done(&mut st, op::join(c, "g"));
    done(&mut st, op::create_group(d, "h"));
    // A member, a requester, the owner of another group.
    for x in [s[1], c, d] {
        query_refused(st.list_requests(x, &gid("g")), RejectCode::NotOwner);
    }
    query_refused(st.list_requests(s[0], &gid("h")), RejectCode::NotOwner);
    query_refused(
        st.list_requests(s[0], &gid("nope")),
        RejectCode::NoSuchGroup,
    );
    assert_eq!(requests(&st, s[0], "g"), ["carol"]);
    assert_eq!(requests(&st, d, "h"), Vec::<String>::new());
}

// =============================================================================================
// AcceptRequest and RejectRequest
// =============================================================================================

#[test]
fn accept_request_makes_a_member() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob"]);
    let c = new_user(&mut st, "carol", 3);
    let d = new_user(&mut st, "dave", 4);
    let e = new_user(&mut st, "eve", 5);
    for x in [c, d, e] {
        done(&mut st, op::join(x, "g"));
    }
    done(&mut st, op::accept(s[0], "g", "dave"));
    assert_eq!(members(&st, "g"), ["alice", "bob", "dave"]);
    assert_eq!(
        requests(&st, s[0], "g"),
        ["carol", "eve"],
        "the others keep their order"
    );
    assert_eq!(relation(&st, d, "g"), Relation::Member);
    assert_eq!(st.list_groups(d).unwrap()[0].n_members, 3);
    assert_eq!(st.list_files(d, &gid("g")).unwrap(), vec![]);
    // The user needs no open session to be accepted.
    done(&mut st, op::close(e));
    done(&mut st, op::accept(s[0], "g", "eve"));
    assert_eq!(members(&st, "g"), ["alice", "bob", "dave", "eve"]);
    // Accepting again finds no request.
    refused(
        &mut st,
        op::accept(s[0], "g", "dave"),
        RejectCode::NoSuchRequest,
    );
}

#[test]
fn reject_request_drops_it_and_the_user_may_ask_again() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice"]);
    let b = new_user(&mut st, "bob", 2);
    let c = new_user(&mut st, "carol", 3);
    done(&mut st, op::join(b, "g"));
    done(&mut st, op::join(c, "g"));
    done(&mut st, op::reject(s[0], "g", "bob"));
    assert_eq!(requests(&st, s[0], "g"), ["carol"]);
    assert_eq!(members(&st, "g"), ["alice"]);
    assert_eq!(relation(&st, b, "g"), Relation::None);
    refused(
        &mut st,
        op::reject(s[0], "g", "bob"),
        RejectCode::NoSuchRequest,
    );
    refused(
        &mut st,
        op::accept(s[0], "g", "bob"),
        RejectCode::NoSuchRequest,
    );
    // Bob asks again: now behind carol.
    done(&mut st, op::join(b, "g"));
    assert_eq!(requests(&st, s[0], "g"), ["carol", "bob"]);
    assert_eq!(relation(&st, b, "g"), Relation::Requested);
    done(&mut st, op::accept(s[0], "g", "bob"));
    assert_eq!(members(&st, "g"), ["alice", "bob"]);
}

#[test]
fn accept_and_reject_are_for_the_owner_only() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob"]);
    let c = new_user(&mut st, "carol", 3);
    let d = new_user(&mut st, "dave", 4);
    done(&mut st, op::join(c, "g"));
    done(&mut st, op::create_group(d, "h"));
    // A member who is not the owner, the requester herself, the owner of another group.
    for x in [s[1], c, d] {
        refused(&mut st, op::accept(x, "g", "carol"), RejectCode::NotOwner);
        refused(&mut st, op::reject(x, "g", "carol"), RejectCode::NotOwner);
    }
    // Permission is checked before the request exists.
    refused(
        &mut st,
        op::accept(s[1], "g", "nobody"),
        RejectCode::NotOwner,
    );
    refused(
        &mut st,
        op::reject(s[1], "g", "nobody"),
        RejectCode::NotOwner,
    );
    assert_eq!(requests(&st, s[0], "g"), ["carol"]);
}

#[test]
fn accept_or_reject_without_request_is_no_such_request() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob"]);
    let c = new_user(&mut st, "carol", 3);
    done(&mut st, op::create_group(s[1], "h"));
    done(&mut st, op::join(c, "h"));
    let owner_s = s[0];
    // An unknown user, a user who asked another group, a member, the owner.
    for u in ["ghost", "carol", "bob", "alice"] {
        refused(
            &mut st,
            op::accept(owner_s, "g", u),
            RejectCode::NoSuchRequest,
        );
        refused(
            &mut st,
            op::reject(owner_s, "g", u),
            RejectCode::NoSuchRequest,
        );
    }
}

#[test]
fn accept_or_reject_in_unknown_group_is_no_such_group() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice"]);
    let b = new_user(&mut st, "bob", 2);
    done(&mut st, op::join(b, "g"));
    refused(
        &mut st,
        op::accept(s[0], "nope", "bob"),
        RejectCode::NoSuchGroup,
    );
    refused(
        &mut st,
        op::reject(s[0], "nope", "bob"),
        RejectCode::NoSuchGroup,
    );
}

// =============================================================================================
// LeaveGroup
// =============================================================================================

#[test]
fn leave_unknown_group_is_no_such_group() {
    let mut st = TrackerState::new();
    let a = new_user(&mut st, "alice", 1);
    refused(&mut st, op::leave(a, "g"), RejectCode::NoSuchGroup);
}

#[test]
fn leave_without_membership_is_not_member() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice"]);
    let b = new_user(&mut st, "bob", 2);
    let c = new_user(&mut st, "carol", 3);
    done(&mut st, op::join(c, "g"));
    refused(&mut st, op::leave(b, "g"), RejectCode::NotMember);
    refused(&mut st, op::leave(c, "g"), RejectCode::NotMember);
    assert_eq!(requests(&st, s[0], "g"), ["carol"], "the request stays");
}

#[test]
fn member_leaving_becomes_a_stranger() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob", "carol"]);
    done(&mut st, op::leave(s[1], "g"));
    assert_eq!(members(&st, "g"), ["alice", "carol"]);
    assert_eq!(owner(&st, "g"), "alice");
    assert_eq!(relation(&st, s[1], "g"), Relation::None);
    query_refused(st.list_files(s[1], &gid("g")), RejectCode::NotMember);
    refused(&mut st, op::leave(s[1], "g"), RejectCode::NotMember);
    // Bob may ask again.
    done(&mut st, op::join(s[1], "g"));
    assert_eq!(relation(&st, s[1], "g"), Relation::Requested);
}

#[test]
fn owner_leaving_hands_ownership_to_the_longest_standing_member() {
    let mut st = TrackerState::new();
    let a = new_user(&mut st, "alice", 1);
    let b = new_user(&mut st, "bob", 2);
    let c = new_user(&mut st, "carol", 3);
    let d = new_user(&mut st, "dave", 4);
    done(&mut st, op::create_group(a, "g"));
    // Carol asks first, but bob is accepted first: bob has been a member longer.
    done(&mut st, op::join(c, "g"));
    done(&mut st, op::join(b, "g"));
    done(&mut st, op::accept(a, "g", "bob"));
    done(&mut st, op::accept(a, "g", "carol"));
    done(&mut st, op::join(d, "g"));
    assert_eq!(members(&st, "g"), ["alice", "bob", "carol"]);

    done(&mut st, op::leave(a, "g"));
    assert_eq!(owner(&st, "g"), "bob");
    assert_eq!(members(&st, "g"), ["bob", "carol"]);
    assert_eq!(relation(&st, a, "g"), Relation::None);
    assert_eq!(relation(&st, b, "g"), Relation::Owner);
    assert_eq!(relation(&st, c, "g"), Relation::Member);
    // The pending request passes to the new owner, who alone may handle it.
    assert_eq!(requests(&st, b, "g"), ["dave"]);
    query_refused(st.list_requests(a, &gid("g")), RejectCode::NotOwner);
    refused(&mut st, op::accept(a, "g", "dave"), RejectCode::NotOwner);
    done(&mut st, op::accept(b, "g", "dave"));
    assert_eq!(members(&st, "g"), ["bob", "carol", "dave"]);

    done(&mut st, op::leave(b, "g"));
    assert_eq!(owner(&st, "g"), "carol");
    done(&mut st, op::leave(c, "g"));
    assert_eq!(owner(&st, "g"), "dave");
    assert_eq!(members(&st, "g"), ["dave"]);
}

#[test]
fn a_member_who_rejoins_stands_behind_the_others() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob", "carol"]);
    done(&mut st, op::leave(s[1], "g"));
    add_member(&mut st, s[0], "g", s[1]);
    assert_eq!(members(&st, "g"), ["alice", "carol", "bob"]);
    done(&mut st, op::leave(s[0], "g"));
    assert_eq!(owner(&st, "g"), "carol");
}

#[test]
fn ownership_may_go_to_a_member_who_is_logged_out() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob"]);
    done(&mut st, op::close(s[1]));
    done(&mut st, op::leave(s[0], "g"));
    assert_eq!(owner(&st, "g"), "bob", "membership, not presence, decides");
}

#[test]
fn last_member_leaving_deletes_the_group() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice"]);
    let b = new_user(&mut st, "bob", 2);
    done(&mut st, op::join(b, "g"));
    ok(&mut st, op::share(s[0], "g", meta("f", SIZE, 1)));
    done(&mut st, op::create_group(b, "other"));

    done(&mut st, op::leave(s[0], "g"));
    assert_eq!(st.group(&gid("g")), None);
    let listed: Vec<GroupId> = st
        .list_groups(b)
        .unwrap()
        .into_iter()
        .map(|g| g.group)
        .collect();
    assert_eq!(listed, [gid("other")]);
    refused(&mut st, op::join(b, "g"), RejectCode::NoSuchGroup);
    refused(&mut st, op::leave(s[0], "g"), RejectCode::NoSuchGroup);
    query_refused(st.list_files(s[0], &gid("g")), RejectCode::NoSuchGroup);

    // The id is free again, and the new group starts empty.
    done(&mut st, op::create_group(b, "g"));
    assert_eq!(owner(&st, "g"), "bob");
    assert_eq!(members(&st, "g"), ["bob"]);
    assert_eq!(requests(&st, b, "g"), Vec::<String>::new());
    assert_eq!(files(&st, b, "g"), vec![]);
    assert_eq!(relation(&st, s[0], "g"), Relation::None);
}

#[test]
fn leaving_ends_the_users_shares_in_that_group_only() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob", "carol"]);
    let (a, b, c) = (s[0], s[1], s[2]);
    done(&mut st, op::create_group(a, "h"));
    ok(&mut st, op::share(a, "g", meta("both", SIZE, 1)));
    ok(&mut st, op::share(b, "g", meta("both", SIZE, 1)));
    ok(&mut st, op::share(a, "g", meta("alice-only", 10, 2)));
    ok(&mut st, op::share(b, "g", meta("bob-only", 20, 3)));
    ok(&mut st, op::share(a, "h", meta("alice-only", 10, 2)));

    done(&mut st, op::leave(a, "g"));
    assert_eq!(
        files(&st, c, "g"),
        [row("bob-only", 1, 1), row("both", 1, 1)]
    );
    let both = &st.group(&gid("g")).unwrap().files[&fname("both")];
    assert_eq!(
        both.sharers,
        vec![Sharer {
            user: uid("bob"),
            peer_addr: addr(2)
        }]
    );
    assert_eq!(files(&st, a, "h"), [row("alice-only", 1, 1)]);

    // The last sharer leaving takes the file with him; carol's group stays.
    done(&mut st, op::leave(b, "g"));
    assert_eq!(files(&st, c, "g"), vec![]);
    assert_eq!(owner(&st, "g"), "carol");
}

#[test]
fn leaving_ends_the_users_shares_from_every_client() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob"]);
    ok(&mut st, op::share(s[1], "g", meta("f", SIZE, 1)));
    done(&mut st, op::close(s[1]));
    let b2 = login(&mut st, "bob", 22);
    ok(&mut st, op::share(b2, "g", meta("f", SIZE, 1)));
    ok(&mut st, op::share(b2, "g", meta("mine", SIZE, 2)));
    assert_eq!(files(&st, s[0], "g"), [row("f", 1, 2), row("mine", 1, 1)]);
    done(&mut st, op::leave(b2, "g"));
    assert_eq!(files(&st, s[0], "g"), vec![]);
}

// =============================================================================================
// list_groups
// =============================================================================================

#[test]
fn list_groups_is_sorted_with_each_relation() {
    let mut st = TrackerState::new();
    let eve = new_user(&mut st, "eve", 5);
    let s = group_with(&mut st, "zeta", &["zed", "yan"]);
    done(&mut st, op::create_group(eve, "mid"));
    done(&mut st, op::create_group(s[1], "alpha"));
    add_member(&mut st, s[1], "alpha", eve);
    done(&mut st, op::create_group(s[0], "beta"));
    done(&mut st, op::join(eve, "zeta"));

    let info = |group: &str, owner: &str, n_members: u32, relation: Relation| GroupInfo {
        group: gid(group),
        owner: uid(owner),
        n_members,
        relation,
    };
    assert_eq!(
        st.list_groups(eve).unwrap(),
        vec![
            info("alpha", "yan", 2, Relation::Member),
            info("beta", "zed", 1, Relation::None),
            info("mid", "eve", 1, Relation::Owner),
            info("zeta", "zed", 2, Relation::Requested),
        ]
    );
    // Every user sees every group; only the relation differs.
    assert_eq!(
        st.list_groups(s[1]).unwrap(),
        vec![
            info("alpha", "yan", 2, Relation::Owner),
            info("beta", "zed", 1, Relation::None),
            info("mid", "eve", 1, Relation::None),
            info("zeta", "zed", 2, Relation::Member),
        ]
    );
}

#[test]
fn list_groups_with_no_groups_is_empty() {
    let mut st = TrackerState::new();
    let a = new_user(&mut st, "alice", 1);
    assert_eq!(st.list_groups(a).unwrap(), vec![]);
}

// =============================================================================================
// ShareFile
// =============================================================================================

#[test]
fn share_new_file() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob"]);
    let m = meta("movie.mkv", SIZE, 1);
    assert_eq!(m.piece_hashes.len(), 4);
    assert_eq!(
        ok(&mut st, op::share(s[1], "g", m.clone())),
        Outcome::Shared { new_file: true }
    );
    let expected = FileInfo {
        name: fname("movie.mkv"),
        size: SIZE,
        n_online: 1,
        n_sharers: 1,
        file_sha1: m.file_sha1,
    };
    // Every member sees it, the owner too.
    for x in [s[0], s[1]] {
        assert_eq!(st.list_files(x, &gid("g")).unwrap(), vec![expected.clone()]);
    }
    let f = &st.group(&gid("g")).unwrap().files[&fname("movie.mkv")];
    assert_eq!(f.meta, m);
    assert_eq!(
        f.sharers,
        vec![Sharer {
            user: uid("bob"),
            peer_addr: addr(2)
        }]
    );
}

#[test]
fn share_without_membership_is_not_member() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice"]);
    let b = new_user(&mut st, "bob", 2);
    let c = new_user(&mut st, "carol", 3);
    done(&mut st, op::join(c, "g"));
    ok(&mut st, op::share(s[0], "g", meta("f", SIZE, 1)));
    for x in [b, c] {
        refused(
            &mut st,
            op::share(x, "g", meta("new", SIZE, 2)),
            RejectCode::NotMember,
        );
        refused(
            &mut st,
            op::share(x, "g", meta("f", SIZE, 1)),
            RejectCode::NotMember,
        );
        // Membership is checked before content.
        refused(
            &mut st,
            op::share(x, "g", meta("f", SIZE, 9)),
            RejectCode::NotMember,
        );
    }
}

#[test]
fn share_in_unknown_group_is_no_such_group() {
    let mut st = TrackerState::new();
    let a = new_user(&mut st, "alice", 1);
    refused(
        &mut st,
        op::share(a, "g", meta("f", SIZE, 1)),
        RejectCode::NoSuchGroup,
    );
}

#[test]
fn share_same_content_by_another_member_adds_a_sharer() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob", "carol"]);
    let m = meta("f", SIZE, 1);
    assert_eq!(
        ok(&mut st, op::share(s[0], "g", m.clone())),
        Outcome::Shared { new_file: true }
    );
    assert_eq!(
        ok(&mut st, op::share(s[1], "g", m.clone())),
        Outcome::Shared { new_file: false }
    );
    assert_eq!(files(&st, s[2], "g"), [row("f", 2, 2)]);
    assert_eq!(
        ok(&mut st, op::share(s[2], "g", m)),
        Outcome::Shared { new_file: false }
    );
    assert_eq!(files(&st, s[2], "g"), [row("f", 3, 3)]);
    let sharers = &st.group(&gid("g")).unwrap().files[&fname("f")].sharers;
    assert_eq!(
        sharers
            .iter()
            .map(|s| s.user.to_string())
            .collect::<Vec<_>>(),
        ["alice", "bob", "carol"],
        "sharers in the order they came"
    );
}

#[test]
fn share_different_content_under_a_taken_name_is_content_mismatch() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob"]);
    let m = meta("f", SIZE, 1);
    ok(&mut st, op::share(s[0], "g", m.clone()));

    let mut one_piece = m.clone();
    one_piece.piece_hashes[2] = digest(99, 2);
    let mut whole_sha1 = m.clone();
    whole_sha1.file_sha1 = digest(99, 0);
    let mut size = m.clone();
    size.size += 1; // still four pieces, same hashes
    let different = [
        meta("f", SIZE, 2),
        meta("f", 10, 1),
        meta_with("f", SIZE, PIECE_LEN / 2, 1),
        one_piece,
        whole_sha1,
        size,
    ];
    for x in [s[0], s[1]] {
        for other in &different {
            refused(
                &mut st,
                op::share(x, "g", other.clone()),
                RejectCode::ContentMismatch,
            );
        }
    }
    assert_eq!(files(&st, s[1], "g"), [row("f", 1, 1)]);
}

#[test]
fn same_content_under_another_name_is_another_file() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob"]);
    let Outcome::Shared { new_file: true } = ok(&mut st, op::share(s[0], "g", meta("a", SIZE, 1)))
    else {
        panic!("not new");
    };
    assert_eq!(
        ok(&mut st, op::share(s[1], "g", meta("b", SIZE, 1))),
        Outcome::Shared { new_file: true }
    );
    assert_eq!(files(&st, s[0], "g"), [row("a", 1, 1), row("b", 1, 1)]);
}

#[test]
fn groups_have_separate_file_names() {
    let mut st = TrackerState::new();
    let a = new_user(&mut st, "alice", 1);
    done(&mut st, op::create_group(a, "g"));
    done(&mut st, op::create_group(a, "h"));
    ok(&mut st, op::share(a, "g", meta("f", SIZE, 1)));
    assert_eq!(
        ok(&mut st, op::share(a, "h", meta("f", 5, 2))),
        Outcome::Shared { new_file: true }
    );
    let sizes = |g: &str| -> Vec<u64> {
        st.list_files(a, &gid(g))
            .unwrap()
            .iter()
            .map(|f| f.size)
            .collect()
    };
    assert_eq!(sizes("g"), [SIZE]);
    assert_eq!(sizes("h"), [5]);
}

#[test]
fn sharing_again_from_the_same_client_changes_nothing() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob"]);
    let m = meta("f", SIZE, 1);
    ok(&mut st, op::share(s[0], "g", m.clone()));
    ok(&mut st, op::share(s[1], "g", m.clone()));
    let before = st.clone();
    for x in [s[0], s[1]] {
        assert_eq!(
            ok(&mut st, op::share(x, "g", m.clone())),
            Outcome::Shared { new_file: false }
        );
        assert_eq!(st, before);
    }
    // Also after logging out and in again on the same client.
    done(&mut st, op::close(s[0]));
    let a2 = login(&mut st, "alice", 1);
    let before = st.clone();
    assert_eq!(
        ok(&mut st, op::share(a2, "g", m)),
        Outcome::Shared { new_file: false }
    );
    assert_eq!(st, before);
    assert_eq!(files(&st, a2, "g"), [row("f", 2, 2)]);
}

#[test]
fn a_user_sharing_from_two_clients_is_one_sharer_per_client() {
    // Documents the current design: a share belongs to a (user, client) pair.
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob"]);
    let m = meta("f", SIZE, 1);
    ok(&mut st, op::share(s[0], "g", m.clone()));
    done(&mut st, op::close(s[0]));
    let a2 = login(&mut st, "alice", 11);
    assert_eq!(
        ok(&mut st, op::share(a2, "g", m)),
        Outcome::Shared { new_file: false }
    );
    // Only the client alice is logged in on is online.
    assert_eq!(files(&st, s[1], "g"), [row("f", 1, 2)]);
}

// =============================================================================================
// list_files
// =============================================================================================

#[test]
fn list_files_is_for_members_only() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice"]);
    ok(&mut st, op::share(s[0], "g", meta("f", SIZE, 1)));
    let b = new_user(&mut st, "bob", 2);
    let c = new_user(&mut st, "carol", 3);
    done(&mut st, op::join(c, "g"));
    done(&mut st, op::create_group(b, "h"));
    // A stranger who owns another group, a requester.
    for x in [b, c] {
        query_refused(st.list_files(x, &gid("g")), RejectCode::NotMember);
    }
    query_refused(st.list_files(s[0], &gid("nope")), RejectCode::NoSuchGroup);
    assert_eq!(files(&st, s[0], "g"), [row("f", 1, 1)]);
}

#[test]
fn list_files_is_sorted_by_name() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob"]);
    for (i, name) in ["m", "b b", "z.txt", "a", "B"].into_iter().enumerate() {
        ok(&mut st, op::share(s[i % 2], "g", meta(name, 100, i as u64)));
    }
    let listed: Vec<String> = files(&st, s[0], "g").into_iter().map(|f| f.0).collect();
    assert_eq!(listed, ["B", "a", "b b", "m", "z.txt"]);
}

#[test]
fn n_online_follows_the_sharers_sessions_on_their_clients() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob"]);
    let (a, b) = (s[0], s[1]);
    let m = meta("f", SIZE, 1);
    ok(&mut st, op::share(a, "g", m.clone()));
    assert_eq!(files(&st, b, "g"), [row("f", 1, 1)]);

    // Logged out: suspended, but still a sharer.
    done(&mut st, op::close(a));
    assert_eq!(files(&st, b, "g"), [row("f", 0, 1)]);

    // Back on the same client: online again.
    let a = login(&mut st, "alice", 1);
    assert_eq!(files(&st, b, "g"), [row("f", 1, 1)]);

    // On another client: the share stays offline.
    done(&mut st, op::close(a));
    let a = login(&mut st, "alice", 9);
    assert_eq!(files(&st, b, "g"), [row("f", 0, 1)]);
    assert_eq!(files(&st, a, "g"), [row("f", 0, 1)]);

    // Another sharer online, alice still on the wrong client.
    ok(&mut st, op::share(b, "g", m));
    assert_eq!(files(&st, a, "g"), [row("f", 1, 2)]);

    // Alice back on her sharing client.
    done(&mut st, op::close(a));
    let a = login(&mut st, "alice", 1);
    assert_eq!(files(&st, b, "g"), [row("f", 2, 2)]);

    // Bob away.
    done(&mut st, op::close(b));
    assert_eq!(files(&st, a, "g"), [row("f", 1, 2)]);
}

#[test]
fn another_user_on_the_sharing_client_does_not_make_the_share_online() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob"]);
    ok(&mut st, op::share(s[0], "g", meta("f", SIZE, 1)));
    done(&mut st, op::close(s[0]));
    // Carol logs in on alice's client (port 1).
    new_user(&mut st, "carol", 1);
    assert_eq!(files(&st, s[1], "g"), [row("f", 0, 1)]);
}

#[test]
fn is_online_needs_the_same_user_on_the_same_client() {
    let mut st = TrackerState::new();
    let a = new_user(&mut st, "alice", 1);
    let sharer = |user: &str, port| Sharer {
        user: uid(user),
        peer_addr: addr(port),
    };
    assert!(st.is_online(&sharer("alice", 1)));
    assert!(!st.is_online(&sharer("alice", 2)));
    assert!(!st.is_online(&sharer("bob", 1)));
    done(&mut st, op::close(a));
    assert!(!st.is_online(&sharer("alice", 1)));
}

// =============================================================================================
// StopShare
// =============================================================================================

#[test]
fn stop_share_errors() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob"]);
    let c = new_user(&mut st, "carol", 3);
    done(&mut st, op::join(c, "g"));
    ok(&mut st, op::share(s[0], "g", meta("f", SIZE, 1)));
    refused(
        &mut st,
        op::stop(s[0], "nope", "f"),
        RejectCode::NoSuchGroup,
    );
    refused(
        &mut st,
        op::stop(s[0], "g", "missing"),
        RejectCode::NoSuchFile,
    );
    refused(
        &mut st,
        op::stop(s[1], "g", "missing"),
        RejectCode::NoSuchFile,
    );
    // A member who does not share it, not even the owner may stop someone else's share.
    refused(&mut st, op::stop(s[1], "g", "f"), RejectCode::NotSharer);
    ok(&mut st, op::share(s[1], "g", meta("mine", SIZE, 2)));
    refused(&mut st, op::stop(s[0], "g", "mine"), RejectCode::NotSharer);
    // Not a member (a requester): refused before the file is looked at.
    refused(&mut st, op::stop(c, "g", "f"), RejectCode::NotMember);
    refused(&mut st, op::stop(c, "g", "missing"), RejectCode::NotMember);
}

#[test]
fn stop_share_by_a_former_member_is_not_member() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob"]);
    ok(&mut st, op::share(s[0], "g", meta("f", SIZE, 1)));
    ok(&mut st, op::share(s[1], "g", meta("f", SIZE, 1)));
    done(&mut st, op::leave(s[1], "g"));
    refused(&mut st, op::stop(s[1], "g", "f"), RejectCode::NotMember);
}

/// Login reconciliation: a client started again keeps only the shares it names; the user's
/// shares from other addresses and other users' shares stay.
#[test]
fn sync_shares_ends_what_the_client_no_longer_has() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob"]);
    ok(&mut st, op::share(s[0], "g", meta("kept", SIZE, 1)));
    ok(&mut st, op::share(s[0], "g", meta("gone", SIZE, 2)));
    ok(&mut st, op::share(s[0], "g", meta("also", SIZE, 3)));
    ok(&mut st, op::share(s[1], "g", meta("also", SIZE, 3)));
    // Alice also shares "gone" from another client (port 9).
    done(&mut st, op::close(s[0]));
    let other = login(&mut st, "alice", 9);
    ok(&mut st, op::share(other, "g", meta("gone", SIZE, 2)));
    done(&mut st, op::close(other));
    // Her first client comes back holding only "kept".
    let again = login(&mut st, "alice", 1);
    let keep = vec![(gid("g"), fname("kept")), (gid("nope"), fname("x"))];
    done(
        &mut st,
        Op::SyncShares {
            session: again,
            keep,
        },
    );
    assert_eq!(
        files(&st, again, "g"),
        [row("also", 1, 1), row("gone", 0, 1), row("kept", 1, 1)]
    );
    let sharers = &st.group(&gid("g")).unwrap().files[&fname("gone")].sharers;
    assert_eq!(sharers[0].peer_addr.port(), 9);
    // Keeping nothing ends the rest; a file nobody shares any more disappears.
    done(
        &mut st,
        Op::SyncShares {
            session: again,
            keep: vec![],
        },
    );
    assert_eq!(
        files(&st, again, "g"),
        [row("also", 1, 1), row("gone", 0, 1)]
    );
    // Without a session: refused, nothing changed.
    done(&mut st, op::close(again));
    refused(
        &mut st,
        Op::SyncShares {
            session: again,
            keep: vec![],
        },
        RejectCode::NotLoggedIn,
    );
}

#[test]
fn stop_share_of_one_sharer_keeps_the_file() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob"]);
    let m = meta("f", SIZE, 1);
    ok(&mut st, op::share(s[0], "g", m.clone()));
    ok(&mut st, op::share(s[1], "g", m.clone()));
    done(&mut st, op::stop(s[0], "g", "f"));
    assert_eq!(files(&st, s[0], "g"), [row("f", 1, 1)]);
    refused(&mut st, op::stop(s[0], "g", "f"), RejectCode::NotSharer);
    // Alice may share it again.
    assert_eq!(
        ok(&mut st, op::share(s[0], "g", m)),
        Outcome::Shared { new_file: false }
    );
    assert_eq!(files(&st, s[0], "g"), [row("f", 2, 2)]);
}

#[test]
fn stop_share_of_the_last_sharer_removes_the_file() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob"]);
    ok(&mut st, op::share(s[0], "g", meta("f", SIZE, 1)));
    ok(&mut st, op::share(s[0], "g", meta("g", SIZE, 2)));
    done(&mut st, op::stop(s[0], "g", "f"));
    assert_eq!(files(&st, s[1], "g"), [row("g", 1, 1)]);
    refused(&mut st, op::stop(s[0], "g", "f"), RejectCode::NoSuchFile);
    // The name is free: other content may take it.
    assert_eq!(
        ok(&mut st, op::share(s[1], "g", meta("f", 5, 3))),
        Outcome::Shared { new_file: true }
    );
}

#[test]
fn stop_share_ends_the_users_share_made_from_another_client() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob"]);
    ok(&mut st, op::share(s[0], "g", meta("f", SIZE, 1)));
    done(&mut st, op::close(s[0]));
    let a2 = login(&mut st, "alice", 11);
    // Alice is a sharer of f (from client 1): per SPEC she may stop sharing it.
    done(&mut st, op::stop(a2, "g", "f"));
    assert_eq!(files(&st, s[1], "g"), vec![]);
}

#[test]
fn stop_share_ends_all_the_users_shares_of_the_file() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob"]);
    let m = meta("f", SIZE, 1);
    ok(&mut st, op::share(s[0], "g", m.clone()));
    done(&mut st, op::close(s[0]));
    let a2 = login(&mut st, "alice", 11);
    ok(&mut st, op::share(a2, "g", m));
    done(&mut st, op::stop(a2, "g", "f"));
    assert_eq!(files(&st, s[1], "g"), vec![], "alice still shares f");
}

// =============================================================================================
// Determinism and invariants under random ops
// =============================================================================================

use crate::rng::SplitMix64;

const R_USERS: [&str; 5] = ["u0", "u1", "u2", "u3", "u4"];
const R_GROUPS: [&str; 3] = ["g0", "g1", "g2"];
const R_FILES: [&str; 3] = ["f0", "f1", "f2"];
const R_PORTS: [u16; 3] = [7000, 7001, 7002];

/// Mostly an open session, sometimes any id (closed, never issued).
fn random_session(rng: &mut SplitMix64, st: &TrackerState) -> SessionId {
    let open: Vec<SessionId> = st.sessions().map(|(id, _)| *id).collect();
    if !open.is_empty() && rng.percent(85) {
        *rng.pick(&open)
    } else {
        SessionId(rng.below(usize::try_from(st.next_session).unwrap() + 2) as u64)
    }
}

/// For owner-only ops: often the owner's session, when there is one.
fn random_owner_session(rng: &mut SplitMix64, st: &TrackerState, group: &str) -> SessionId {
    let owner_session = st
        .group(&gid(group))
        .and_then(|g| st.session_of_user.get(&g.owner));
    match owner_session {
        Some(s) if rng.percent(60) => *s,
        _ => random_session(rng, st),
    }
}

/// For accept/reject: often a user with a pending request.
fn random_requester(rng: &mut SplitMix64, st: &TrackerState, group: &str) -> String {
    match st.group(&gid(group)) {
        Some(g) if !g.requests.is_empty() && rng.percent(70) => {
            g.requests[rng.below(g.requests.len())].to_string()
        }
        _ => rng.pick(&R_USERS).to_string(),
    }
}

/// StopShare: often by a logged-in sharer of a file of `group`, else anything.
fn random_stop(rng: &mut SplitMix64, st: &TrackerState, group: &str) -> Op {
    let mut candidates = Vec::new();
    if let Some(g) = st.group(&gid(group)) {
        for (name, f) in &g.files {
            for sharer in &f.sharers {
                if let Some(session) = st.session_of_user.get(&sharer.user) {
                    candidates.push((*session, name.to_string()));
                }
            }
        }
    }
    if !candidates.is_empty() && rng.percent(50) {
        let (session, name) = &candidates[rng.below(candidates.len())];
        op::stop(*session, group, name)
    } else {
        op::stop(random_session(rng, st), group, rng.pick::<&str>(&R_FILES))
    }
}

fn random_meta(rng: &mut SplitMix64) -> FileMeta {
    let i = rng.below(R_FILES.len());
    // Mostly one content per name, sometimes another one.
    let content = if rng.percent(85) { 0 } else { 1 };
    let size = [1000, 2 * PIECE_LEN as u64 + 1][content];
    meta(R_FILES[i], size, (i * 10 + content) as u64)
}

/// `op` as an earlier build made it (no quotas) or carrying tight quotas the random run
/// reaches.
fn with_quotas(rng: &mut SplitMix64, mut op: Op) -> Op {
    let limits = rng.percent(50).then(|| OpQuotas {
        groups_owned: 1 + rng.below(3) as u64,
        requests: 1 + rng.below(3) as u64,
        files: 1 + rng.below(4) as u64,
        metadata: [2_000, 1 << 20][rng.below(2)],
        // Some runs reach a state quota too (a random run's state stays under 20 KB).
        state_bytes: [3_000, 8_000, u64::MAX][rng.below(3)],
    });
    if let Op::CreateGroup { quotas, .. }
    | Op::JoinGroup { quotas, .. }
    | Op::ShareFile { quotas, .. } = &mut op
    {
        *quotas = limits;
    }
    op
}

fn random_op(rng: &mut SplitMix64, st: &TrackerState) -> Op {
    let group = *rng.pick(&R_GROUPS);
    match rng.below(100) {
        0..=4 => {
            // Sometimes this very creation again (the same salted hash), sometimes another.
            let user = *rng.pick::<&str>(&R_USERS);
            let salt = rng.below(2);
            Op::CreateUser {
                user: uid(user),
                pw_hash: format!("$argon2id$salt{salt}$hash-of-{user}"),
            }
        }
        5..=16 => op::open(rng.pick::<&str>(&R_USERS), *rng.pick(&R_PORTS)),
        17..=24 => op::close(random_session(rng, st)),
        25..=31 => {
            let create = op::create_group(random_session(rng, st), group);
            with_quotas(rng, create)
        }
        32..=45 => {
            let join = op::join(random_session(rng, st), group);
            with_quotas(rng, join)
        }
        46..=52 => op::leave(random_session(rng, st), group),
        53..=66 => {
            let s = random_owner_session(rng, st, group);
            op::accept(s, group, &random_requester(rng, st, group))
        }
        67..=72 => {
            let s = random_owner_session(rng, st, group);
            op::reject(s, group, &random_requester(rng, st, group))
        }
        73..=90 => {
            let share = op::share(random_session(rng, st), group, random_meta(rng));
            with_quotas(rng, share)
        }
        _ => random_stop(rng, st, group),
    }
}

fn op_kind(op: &Op) -> &'static str {
    match op {
        Op::CreateUser { .. } => "CreateUser",
        Op::OpenSession { .. } => "OpenSession",
        Op::CloseSession { .. } => "CloseSession",
        Op::ResumeSession { .. } => "ResumeSession",
        Op::ClientGone { .. } => "ClientGone",
        Op::ExpireSessions { .. } => "ExpireSessions",
        Op::CreateGroup { .. } => "CreateGroup",
        Op::JoinGroup { .. } => "JoinGroup",
        Op::LeaveGroup { .. } => "LeaveGroup",
        Op::AcceptRequest { .. } => "AcceptRequest",
        Op::RejectRequest { .. } => "RejectRequest",
        Op::ShareFile { .. } => "ShareFile",
        Op::StopShare { .. } => "StopShare",
        Op::SyncShares { .. } => "SyncShares",
    }
}

fn has_duplicates<T: Ord>(items: &[T]) -> bool {
    items.iter().collect::<BTreeSet<_>>().len() != items.len()
}

/// What must hold after every op.
fn check_invariants(st: &TrackerState) {
    // Sessions: at most one per user, matching the index, of existing users.
    let mut logged_in = BTreeSet::new();
    for (id, s) in &st.sessions {
        assert!(logged_in.insert(&s.user), "{} has two sessions", s.user);
        assert_eq!(st.session_of_user.get(&s.user), Some(id));
        assert!(st.users.contains_key(&s.user));
        assert!(id.0 >= 1 && id.0 <= st.next_session);
    }
    assert_eq!(st.session_of_user.len(), st.sessions.len());

    for (id, g) in &st.groups {
        assert!(g.members.contains(&g.owner), "{id}: owner not a member");
        assert_eq!(
            g.members.first(),
            Some(&g.owner),
            "{id}: the owner is the longest-standing member"
        );
        assert!(!has_duplicates(&g.members), "{id}: duplicate members");
        assert!(!has_duplicates(&g.requests), "{id}: duplicate requests");
        for r in &g.requests {
            assert!(!g.members.contains(r), "{id}: {r} is member and requester");
        }
        for u in g.members.iter().chain(&g.requests) {
            assert!(st.users.contains_key(u), "{id}: unknown user {u}");
        }
        for (name, f) in &g.files {
            assert_eq!(&f.meta.name, name);
            assert!(!f.sharers.is_empty(), "{id}/{name}: no sharers");
            assert!(
                !has_duplicates(&sharer_keys(f)),
                "{id}/{name}: duplicate sharer"
            );
            for s in &f.sharers {
                assert!(
                    g.members.contains(&s.user),
                    "{id}/{name}: {} not a member",
                    s.user
                );
            }
        }
    }
}

fn sharer_keys(f: &SharedFile) -> Vec<(UserId, SocketAddr)> {
    f.sharers
        .iter()
        .map(|s| (s.user.clone(), s.peer_addr))
        .collect()
}

/// What the queries must show to every open session.
fn check_queries(st: &TrackerState) {
    for (id, s) in st.sessions() {
        let groups = st.list_groups(*id).unwrap();
        assert!(groups.windows(2).all(|w| w[0].group < w[1].group));
        assert_eq!(groups.len(), st.groups.len());
        for info in &groups {
            let g = st.group(&info.group).unwrap();
            assert_eq!(info.n_members as usize, g.members.len());
            let is_member = matches!(info.relation, Relation::Owner | Relation::Member);
            assert_eq!(is_member, g.members.contains(&s.user));
            assert_eq!(info.relation == Relation::Owner, g.owner == s.user);
            assert_eq!(
                info.relation == Relation::Requested,
                g.requests.contains(&s.user)
            );
            match st.list_files(*id, &info.group) {
                Ok(files) => {
                    assert!(is_member);
                    assert!(files.windows(2).all(|w| w[0].name < w[1].name));
                    assert_eq!(files.len(), g.files.len());
                    for f in &files {
                        assert!(f.n_sharers >= 1 && f.n_online <= f.n_sharers);
                    }
                }
                Err(e) => {
                    assert!(!is_member);
                    assert_eq!(e.code, RejectCode::NotMember);
                }
            }
            match st.list_requests(*id, &info.group) {
                Ok(requests) => assert_eq!(requests, g.requests),
                Err(e) => {
                    assert_ne!(info.relation, Relation::Owner);
                    assert_eq!(e.code, RejectCode::NotOwner);
                }
            }
        }
    }
}

/// One applied op of a random run.
struct Step {
    kind: &'static str,
    refusal: Option<RejectCode>,
}

/// What a random run did.
struct Run {
    state: TrackerState,
    ops: Vec<Op>,
    steps: Vec<Step>,
    /// Owners who left a group that lives on.
    handoffs: usize,
    /// Groups deleted by their last member leaving.
    deletions: usize,
}

/// Applies `n_ops` random ops to two fresh replicas in lockstep, checking after each op that
/// they agree, that a refusal changed nothing, and the invariants.
fn run_random(seed: u64, n_ops: usize) -> Run {
    let mut rng = SplitMix64(seed);
    let (mut a, mut b) = (TrackerState::new(), TrackerState::new());
    let mut run = Run {
        state: TrackerState::new(),
        ops: Vec::with_capacity(n_ops),
        steps: Vec::with_capacity(n_ops),
        handoffs: 0,
        deletions: 0,
    };
    for step in 0..n_ops {
        let op = random_op(&mut rng, &a);
        let before = a.clone();
        let ra = a.apply(&op);
        let rb = b.apply(&op);
        assert_eq!(ra, rb, "seed {seed} step {step}: {op:?}");
        assert_eq!(a, b, "seed {seed} step {step}: {op:?}");
        if let Err(e) = &ra {
            assert_eq!(
                a, before,
                "seed {seed} step {step}: refused {op:?} ({e}) changed the state"
            );
        }
        if let (Op::LeaveGroup { group, .. }, Ok(_)) = (&op, &ra) {
            match (before.group(group), a.group(group)) {
                (Some(old), Some(new)) if old.owner != new.owner => run.handoffs += 1,
                (Some(_), None) => run.deletions += 1,
                _ => {}
            }
        }
        check_invariants(&a);
        check_queries(&a);
        run.steps.push(Step {
            kind: op_kind(&op),
            refusal: ra.err().map(|e| e.code),
        });
        run.ops.push(op);
    }
    run.state = a;
    run
}

#[test]
fn random_ops_are_deterministic_and_keep_the_invariants() {
    for seed in [1, 0x5eed, 0xdead_beef] {
        let run = run_random(seed, 2000);

        // Replaying the log on a fresh replica gives the same state.
        let mut replica = TrackerState::new();
        for op in &run.ops {
            let _ = replica.apply(op);
        }
        assert_eq!(replica, run.state, "seed {seed}: replay differs");

        // The run exercised every op successfully, ownership changes, and every refusal.
        let succeeded: BTreeSet<&str> = run
            .steps
            .iter()
            .filter(|s| s.refusal.is_none())
            .map(|s| s.kind)
            .collect();
        assert_eq!(
            succeeded.len(),
            10,
            "seed {seed}: only {succeeded:?} succeeded"
        );
        assert!(run.handoffs > 0, "seed {seed}: no owner left a group");
        assert!(run.deletions > 0, "seed {seed}: no group was deleted");
        let codes: HashSet<RejectCode> = run.steps.iter().filter_map(|s| s.refusal).collect();
        for code in [
            RejectCode::UserExists,
            RejectCode::UnknownUser,
            RejectCode::UserLoggedInElsewhere,
            RejectCode::NotLoggedIn,
            RejectCode::GroupExists,
            RejectCode::NoSuchGroup,
            RejectCode::AlreadyMember,
            RejectCode::AlreadyRequested,
            RejectCode::NotMember,
            RejectCode::NotOwner,
            RejectCode::NoSuchRequest,
            RejectCode::NoSuchFile,
            RejectCode::ContentMismatch,
            RejectCode::NotSharer,
        ] {
            assert!(
                codes.contains(&code),
                "seed {seed}: never refused with {code:?}"
            );
        }
    }
}

#[test]
fn file_sharers_lists_online_sharers_for_members_only() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["alice", "bob", "carol"]);
    let m = meta("f", SIZE, 1);
    ok(&mut st, op::share(s[0], "g", m.clone()));
    ok(&mut st, op::share(s[1], "g", m.clone()));
    let (got, peers) = st.file_sharers(s[2], &gid("g"), &fname("f")).unwrap();
    assert_eq!(got, m);
    assert_eq!(peers.len(), 2);
    // Each sharer comes with the identity key its client registered at login.
    let (_, with_keys) = st
        .file_sharers_with_keys(s[2], &gid("g"), &fname("f"))
        .unwrap();
    let want: Vec<_> = [s[0], s[1]]
        .iter()
        .map(|id| {
            let session = st.session(*id).unwrap();
            (session.peer_addr, session.client_key)
        })
        .collect();
    assert_eq!(with_keys, want);
    assert_ne!(want[0].1, want[1].1);
    done(&mut st, op::close(s[1]));
    let (_, peers) = st.file_sharers(s[2], &gid("g"), &fname("f")).unwrap();
    assert_eq!(peers.len(), 1, "a logged-out sharer is not handed out");
    assert_eq!(
        st.file_sharers(s[2], &gid("g"), &fname("nope"))
            .unwrap_err()
            .code,
        RejectCode::NoSuchFile
    );
    let outsider = {
        done(&mut st, op::create_user("dave"));
        login(&mut st, "dave", 40)
    };
    assert_eq!(
        st.file_sharers(outsider, &gid("g"), &fname("f"))
            .unwrap_err()
            .code,
        RejectCode::NotMember
    );
}

#[test]
fn a_request_older_than_every_remembered_answer_is_not_applied() {
    let mut st = TrackerState::new();
    let owner = new_user(&mut st, "ann", 7000);
    let entry = |req_id: u64, group: &str| Entry {
        origin: Some(Origin { client: 9, req_id }),
        op: Op::CreateGroup {
            session: owner,
            group: gid(group),
            quotas: None,
        },
    };
    // Request 1 is applied, then the client sends as many later requests as are remembered.
    assert!(st.apply_entry(&entry(1, "g1")).is_ok());
    assert!(st
        .apply_entry(&Entry {
            origin: None,
            op: Op::LeaveGroup {
                session: owner,
                group: gid("g1"),
            },
        })
        .is_ok());
    for req_id in 2..2 + MAX_ANSWERS_PER_CLIENT as u64 {
        assert!(st
            .apply_entry(&entry(req_id, &format!("x{req_id}")))
            .is_ok());
    }
    // A late copy of request 1 (its answer is forgotten) must not create the group again.
    let late = st.apply_entry(&entry(1, "g1"));
    assert_eq!(late.unwrap_err().code, RejectCode::Unavailable);
    assert!(st.group(&gid("g1")).is_none(), "the late copy was applied");
    // A new request of the same client still is.
    assert!(st.apply_entry(&entry(100, "g100")).is_ok());
    assert!(st.group(&gid("g100")).is_some());
    // While its memory is not full, a client's requests are all new.
    let fresh = Entry {
        origin: Some(Origin {
            client: 10,
            req_id: 5,
        }),
        op: Op::CreateGroup {
            session: owner,
            group: gid("h"),
            quotas: None,
        },
    };
    assert!(st.apply_entry(&fresh).is_ok());
}

// =============================================================================================
// Quotas where changes are ordered, and the holdings index
// =============================================================================================

fn limits(groups_owned: u64, requests: u64, files: u64, metadata: u64) -> OpQuotas {
    OpQuotas {
        groups_owned,
        requests,
        files,
        metadata,
        state_bytes: u64::MAX,
    }
}

fn with(op: Op, limits: OpQuotas) -> Op {
    let mut op = op;
    if let Op::CreateGroup { quotas, .. }
    | Op::JoinGroup { quotas, .. }
    | Op::ShareFile { quotas, .. } = &mut op
    {
        *quotas = Some(limits);
    }
    op
}

/// Applies `op`, which must be refused for a quota with this message, changing nothing.
#[track_caller]
fn over_quota(st: &mut TrackerState, op: Op, message: &str) {
    let before = st.clone();
    let err = st.apply(&op).expect_err("past the quota");
    assert_eq!(err.code, RejectCode::QuotaExceeded, "{err}");
    assert_eq!(err.message, message);
    assert_eq!(*st, before);
}

#[test]
fn the_apply_refuses_a_change_past_the_quotas_it_carries() {
    let mut st = TrackerState::new();
    let ann = new_user(&mut st, "ann", 1);
    let bob = new_user(&mut st, "bob", 2);
    let q = limits(2, 1, 2, 3 * meta_bytes(&meta("a", SIZE, 1)) as u64 - 1);
    // Groups owned.
    done(&mut st, with(op::create_group(ann, "g1"), q));
    done(&mut st, with(op::create_group(ann, "g2"), q));
    over_quota(
        &mut st,
        with(op::create_group(ann, "g3"), q),
        "quota: at most 2 groups owned per user",
    );
    // The same op without quotas (an earlier build's entry) is applied as it was.
    done(&mut st, op::create_group(ann, "g3"));
    assert_eq!(st.holdings(&uid("ann")).groups_owned, 3);
    // Pending join requests.
    done(&mut st, with(op::join(bob, "g1"), q));
    over_quota(
        &mut st,
        with(op::join(bob, "g2"), q),
        "quota: at most 1 pending join requests per user",
    );
    done(&mut st, op::reject(ann, "g1", "bob"));
    done(&mut st, with(op::join(bob, "g2"), q));
    // Files: two; the same one again (from the same client) adds nothing; a third is refused.
    ok(&mut st, with(op::share(ann, "g1", meta("a", SIZE, 1)), q));
    ok(&mut st, with(op::share(ann, "g1", meta("b", SIZE, 2)), q));
    ok(&mut st, with(op::share(ann, "g1", meta("a", SIZE, 1)), q));
    over_quota(
        &mut st,
        with(op::share(ann, "g2", meta("c", SIZE, 3)), q),
        "quota: at most 2 shared files per user",
    );
    // Metadata bytes: room for two such files but not three, whatever the count allows.
    let roomy = limits(2, 1, 10, q.metadata);
    over_quota(
        &mut st,
        with(op::share(ann, "g2", meta("c", SIZE, 3)), roomy),
        &format!(
            "quota: at most {} bytes of file metadata per user",
            q.metadata
        ),
    );
    done(&mut st, op::stop(ann, "g1", "b"));
    ok(
        &mut st,
        with(op::share(ann, "g2", meta("c", SIZE, 3)), roomy),
    );
    // Another user's holdings do not count.
    assert_eq!(st.holdings(&uid("bob")).groups_owned, 0);
    done(&mut st, with(op::create_group(bob, "b1"), q));
}

#[test]
fn the_holdings_index_follows_every_change() {
    let mut st = TrackerState::new();
    let s = group_with(&mut st, "g", &["ann", "bob", "cid"]);
    let (ann, bob, cid) = (s[0], s[1], s[2]);
    let held = |st: &TrackerState, user: &str| st.holdings(&uid(user));
    let m = meta("f", SIZE, 1);
    let mb = meta_bytes(&m);
    done(&mut st, op::create_group(bob, "h"));
    done(&mut st, op::join(cid, "h"));
    done(&mut st, op::join(ann, "h"));
    assert_eq!(held(&st, "cid").requests, 1);
    done(&mut st, op::accept(bob, "h", "ann"));
    assert_eq!(held(&st, "ann").requests, 0);
    // A file shared from two clients of one user counts once, until both stop.
    ok(&mut st, op::share(ann, "g", m.clone()));
    ok(&mut st, op::share(bob, "g", m.clone()));
    done(&mut st, op::close(ann));
    let ann2 = login(&mut st, "ann", 9);
    ok(&mut st, op::share(ann2, "g", m.clone()));
    assert_eq!(
        held(&st, "ann"),
        Holdings {
            groups_owned: 1,
            requests: 0,
            files: 1,
            metadata: mb
        }
    );
    // A login from the first client holding none of its shares ends that one only.
    done(&mut st, op::close(ann2));
    let mut relogin = op::open("ann", 1);
    if let Op::OpenSession { shares, .. } = &mut relogin {
        *shares = Some(Vec::new());
    }
    let ann = match ok(&mut st, relogin) {
        Outcome::SessionOpened(id) => id,
        other => panic!("{other:?}"),
    };
    assert_eq!(held(&st, "ann").files, 1, "still shared from port 9");
    done(&mut st, op::stop(ann, "g", "f"));
    assert_eq!(held(&st, "ann").files, 0);
    assert_eq!(held(&st, "ann").metadata, 0);
    // The owner leaves: ownership passes to the longest-standing member.
    done(&mut st, op::leave(ann, "g"));
    assert_eq!(held(&st, "ann").groups_owned, 0);
    assert_eq!(held(&st, "bob").groups_owned, 2);
    // The last member leaves: the group goes, with its pending requests and files.
    done(&mut st, op::leave(cid, "g"));
    done(&mut st, op::join(cid, "g"));
    done(&mut st, op::join(ann, "g"));
    assert_eq!(held(&st, "cid").requests, 2);
    done(&mut st, op::leave(bob, "g"));
    assert!(st.group(&gid("g")).is_none());
    assert_eq!(held(&st, "cid").requests, 1);
    assert_eq!(held(&st, "ann").requests, 0);
    assert_eq!(
        held(&st, "bob"),
        Holdings {
            groups_owned: 1,
            ..Holdings::default()
        }
    );
    // Every user's entry equals the walk's, and users holding nothing are not kept.
    assert_eq!(st.holdings, st.holdings_walk());
    assert!(!st.holdings.contains_key(&uid("ann")));
    // A snapshot does not carry the index: it is rebuilt, equal, when one is read.
    let mut bytes = Vec::new();
    st.encode_snapshot(&mut bytes);
    let back = TrackerState::decode_snapshot(&bytes).unwrap();
    assert_eq!(back.holdings, st.holdings);
    assert_eq!(back, st);
}

#[test]
fn the_apply_refuses_a_change_past_the_state_quota_it_carries() {
    let mut st = TrackerState::new();
    let ann = new_user(&mut st, "ann", 1);
    let bob = new_user(&mut st, "bob", 2);
    done(&mut st, op::create_group(ann, "g"));
    ok(&mut st, op::share(ann, "g", meta("a", SIZE, 1)));
    assert_eq!(st.size(), st.approx_bytes());
    // Room for one more group of a one-letter id owned by ann, not for two.
    let group_bytes = 16 + 1 + 3 + 16 + 3;
    let q = OpQuotas {
        state_bytes: (st.size() + group_bytes) as u64,
        ..limits(100, 100, 100, u64::MAX)
    };
    done(&mut st, with(op::create_group(ann, "h"), q));
    assert_eq!(
        st.size() as u64,
        q.state_bytes,
        "the group took what was counted"
    );
    let full = format!(
        "quota: the service's state is full (about {} of its {} bytes); nothing more can be \
         added until something is removed",
        st.size(),
        q.state_bytes
    );
    over_quota(&mut st, with(op::create_group(ann, "i"), q), &full);
    over_quota(&mut st, with(op::join(bob, "g"), q), &full);
    over_quota(
        &mut st,
        with(op::share(ann, "h", meta("b", SIZE, 2)), q),
        &full,
    );
    // Sharing again what one shares adds nothing, so it passes at the limit; a new sharer of
    // an existing file needs room for its record.
    ok(&mut st, with(op::share(ann, "g", meta("a", SIZE, 1)), q));
    // Ops of earlier builds (no quotas) are applied unchecked.
    done(&mut st, op::join(bob, "g"));
    // A removal makes room again.
    done(&mut st, op::reject(ann, "g", "bob"));
    done(&mut st, op::stop(ann, "g", "a"));
    done(&mut st, with(op::create_group(ann, "i"), q));
    assert_eq!(st.size(), st.approx_bytes());
}

/// Not a correctness test: a fixed workload of the replication bench's changes, for counting
/// the apply path's instructions and allocations with callgrind (the README's figures):
///
///     valgrind --tool=callgrind --toggle-collect='*TrackerState::apply_entry*' \
///         target/release/deps/p2pshare-<hash> apply_cost_of_the_bench_changes --ignored
///
/// 1,024 logged-in users each alternate `CreateGroup g<i>` and `LeaveGroup g<i>` with the
/// quotas the tracker puts in its ops, 100 rounds (204,800 entries through `apply_entry`,
/// each with its client's origin). 2,100 other groups keep the state above
/// `HOLDINGS_CHECK_GROUPS`, so test builds skip their check walk in the measured part.
#[test]
#[ignore]
fn apply_cost_of_the_bench_changes() {
    const USERS: usize = 1024;
    const ROUNDS: u64 = 100;
    let mut st = TrackerState::new();
    let quotas = OpQuotas {
        groups_owned: 1_000,
        requests: 1_000,
        files: 1_000,
        metadata: 1 << 30,
        state_bytes: 1 << 40,
    };
    assert!(st.apply(&op::create_user("filler")).is_ok());
    let filler = open_session(&mut st, "filler", 1);
    for g in 0..HOLDINGS_CHECK_GROUPS + 52 {
        assert!(st
            .apply(&op::create_group(filler, &format!("filler-{g}")))
            .is_ok());
    }
    let mut sessions = Vec::new();
    for i in 0..USERS {
        let user = format!("u{i}");
        assert!(st.apply(&op::create_user(&user)).is_ok());
        sessions.push(open_session(&mut st, &user, 2_000 + i as u16));
    }
    let groups: Vec<GroupId> = (0..USERS).map(|i| gid(&format!("g{i}"))).collect();
    let started = std::time::Instant::now();
    for round in 0..ROUNDS {
        for (i, (session, group)) in sessions.iter().zip(&groups).enumerate() {
            for (k, create) in [(0, true), (1, false)] {
                let op = if create {
                    Op::CreateGroup {
                        session: *session,
                        group: group.clone(),
                        quotas: Some(quotas),
                    }
                } else {
                    Op::LeaveGroup {
                        session: *session,
                        group: group.clone(),
                    }
                };
                let entry = Entry {
                    origin: Some(Origin {
                        client: 1_000 + i as u64,
                        req_id: 2 * round + k + 1,
                    }),
                    op,
                };
                assert_eq!(st.apply_entry(&entry), Ok(Outcome::Done));
            }
        }
    }
    eprintln!(
        "{} entries applied in {:?}",
        2 * ROUNDS as usize * USERS,
        started.elapsed()
    );
}

/// Opens a session for `user` and returns its id.
fn open_session(st: &mut TrackerState, user: &str, port: u16) -> SessionId {
    match st.apply(&op::open(user, port)) {
        Ok(Outcome::SessionOpened(id)) => id,
        other => panic!("login of {user}: {other:?}"),
    }
}
