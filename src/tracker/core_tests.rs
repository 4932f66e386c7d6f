//! Unit tests of [`TrackerCore`] without sockets: connections are hand-made [`ConnId`]s, frames
//! are produced with [`ClientMsg::emit`] (length prefix stripped, as the driver hands them up),
//! and every `Output::Send` is checked to survive `emit`/`parse` before it is inspected.
//!
//! Argon2 runs for real here (`create_user` hashes, `login` verifies), so the tests keep the
//! number of those calls small.

use super::*;
use crate::testing::{fname, gid, pw, uid};

use std::net::{Ipv4Addr, SocketAddr};

use crate::wire::frame::LEN_PREFIX;
use crate::wire::tracker_link::{FileInfo, FileMeta, GroupInfo, Relation, Role};
use crate::wire::{Sha1Digest, PIECE_LEN};

// =============================================================================================
// Harness
// =============================================================================================

fn conn(key: usize) -> ConnId {
    ConnId { key, generation: 1 }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// A frame payload (type byte + body) of `msg`, as the driver hands it to `handle_frame`.
fn payload(msg: &ClientMsg) -> Vec<u8> {
    let mut out = Vec::new();
    msg.emit(&mut out);
    out.split_off(LEN_PREFIX)
}

/// The handshake of the client on `c` (each conn is its own client process).
fn hello(c: ConnId) -> ClientMsg {
    ClientMsg::hello(c.key as u64 | c.generation << 32)
}

fn request(req_id: u64, body: RequestBody) -> ClientMsg {
    ClientMsg::Request(Request { req_id, body })
}

/// Metadata of a two-piece file identified by `content`.
fn meta(name: &str, content: u8) -> FileMeta {
    let size = u64::from(PIECE_LEN) + 100;
    FileMeta {
        name: fname(name),
        size,
        piece_len: PIECE_LEN,
        file_sha1: Sha1Digest([content; 20]),
        piece_hashes: vec![Sha1Digest([content ^ 1; 20]), Sha1Digest([content ^ 2; 20])],
    }
}

struct Harness {
    core: TrackerCore,
    now: Instant,
    next_req: u64,
}

impl Harness {
    /// Tracker 3 of 3, alone: the other two are down, so it serves as primary at once.
    fn new() -> Self {
        let mut h = Harness::with_others_down();
        while let Some(o) = h.core.poll_output() {
            match o {
                Output::Dial(no) => h.core.handle_dial_failed(no, h.now),
                other => panic!("unexpected output at start: {other:?}"),
            }
        }
        assert!(h.core.replica().is_primary());
        h
    }

    fn with_others_down() -> Self {
        Harness {
            core: TrackerCore::new(
                // A service of one tracker: these tests jump the clock, which a tracker with
                // others to link to would take for a stall.
                TrackerRef {
                    no: 1,
                    incarnation: 0x33,
                },
                1,
                0x1234_5678,
                Timings::default(),
                Instant::now(),
            ),
            now: Instant::now(),
            next_req: 100,
        }
    }

    /// Every queued output; each `Send` is checked to round-trip through the wire format.
    fn drain(&mut self) -> Vec<Output> {
        let mut outs = Vec::new();
        loop {
            let Some(o) = self.core.poll_output() else {
                // A password job held back after a failure: wait it out on the fake clock.
                match self.core.passwords().poll_timeout() {
                    Some(t) if self.core.passwords().waiting() > 0 => {
                        self.now = self.now.max(t);
                        self.core.handle_timeout(self.now);
                        continue;
                    }
                    _ => break,
                }
            };
            // Password work runs inline here; the driver runs it on a worker thread.
            if let Output::Password(conn, job) = &o {
                let result = crate::tracker::password::run(job);
                self.core.handle_password_done(*conn, result);
                continue;
            }
            if let Output::Send(_, msg) = &o {
                let mut bytes = Vec::new();
                msg.emit(&mut bytes);
                let parsed = TrackerMsg::parse(&bytes[LEN_PREFIX..]).unwrap();
                assert_eq!(&parsed, msg, "a sent message survives the wire");
            }
            outs.push(o);
        }
        outs
    }

    fn open(&mut self, c: ConnId) {
        self.core.handle_open(c, self.now);
        let outs = self.drain();
        assert!(outs.is_empty(), "{outs:?}");
    }

    fn send(&mut self, c: ConnId, msg: &ClientMsg) -> Vec<Output> {
        self.core.handle_frame(c, &payload(msg), self.now);
        self.drain()
    }

    /// Opens `c` and completes its handshake.
    fn connect(&mut self, c: ConnId) {
        self.open(c);
        let outs = self.send(c, &hello(c));
        assert_eq!(outs.len(), 2, "{outs:?}");
    }

    /// Sends one request on a handshaken conn and returns the single reply's body.
    fn ask(&mut self, c: ConnId, body: RequestBody) -> ReplyBody {
        self.next_req += 1;
        let req_id = self.next_req;
        let outs = self.send(c, &request(req_id, body));
        match outs.as_slice() {
            [Output::Send(to, TrackerMsg::Reply(reply))] => {
                assert_eq!(*to, c);
                assert_eq!(reply.req_id, req_id, "the reply carries the request's id");
                reply.body.clone()
            }
            other => panic!("expected one reply, got {other:?}"),
        }
    }

    fn create_user(&mut self, c: ConnId, user: &str, password: &str) -> ReplyBody {
        self.ask(
            c,
            RequestBody::CreateUser {
                user: uid(user),
                password: pw(password),
            },
        )
    }

    fn login(&mut self, c: ConnId, user: &str, password: &str, port: u16) -> ReplyBody {
        self.ask(
            c,
            RequestBody::Login {
                user: uid(user),
                password: pw(password),
                peer_addr: addr(port),
                shares: Vec::new(),
                client_key: [0; 32],
                link: 0,
            },
        )
    }

    /// Whether `user` has an open session in the state.
    fn has_session(&self, user: &str) -> bool {
        self.core
            .state()
            .sessions()
            .any(|(_, s)| s.user.as_str() == user)
    }
}

#[track_caller]
fn assert_refused(body: &ReplyBody, want: RejectCode) {
    match body {
        ReplyBody::Refused { code, message } => {
            assert_eq!(*code, want, "{message}");
            assert!(!message.is_empty());
        }
        other => panic!("expected Refused {want:?}, got {other:?}"),
    }
}

#[track_caller]
fn assert_logged_in(body: &ReplyBody) -> [u8; 16] {
    match body {
        ReplyBody::LoggedIn { token } => *token,
        other => panic!("expected LoggedIn, got {other:?}"),
    }
}

/// Every request that needs a session.
fn session_requests() -> Vec<RequestBody> {
    let g = gid("g");
    vec![
        RequestBody::Logout,
        RequestBody::CreateGroup { group: g.clone() },
        RequestBody::JoinGroup { group: g.clone() },
        RequestBody::LeaveGroup { group: g.clone() },
        RequestBody::ListRequests { group: g.clone() },
        RequestBody::AcceptRequest {
            group: g.clone(),
            user: uid("bob"),
        },
        RequestBody::RejectRequest {
            group: g.clone(),
            user: uid("bob"),
        },
        RequestBody::ListGroups,
        RequestBody::ListFiles { group: g.clone() },
        RequestBody::UploadFile {
            group: g.clone(),
            meta: meta("f", 1),
        },
        RequestBody::StopShare {
            group: g.clone(),
            name: fname("f"),
        },
    ]
}

// =============================================================================================
// Handshake
// =============================================================================================

#[test]
fn hello_gets_welcome_and_the_full_frame_limit() {
    let mut h = Harness::new();
    let c = conn(1);
    h.open(c);
    let outs = h.send(c, &hello(c));
    assert_eq!(outs.len(), 2, "{outs:?}");
    assert!(outs.contains(&Output::SetMaxFrame(c, MAX_CLIENT_TRACKER_FRAME)));
    assert!(outs.contains(&Output::Send(
        c,
        TrackerMsg::Welcome {
            version: PROTOCOL_VERSION,
            tracker_no: 1,
        }
    )));
    // The link is usable.
    assert_eq!(h.ask(c, RequestBody::Ping), ReplyBody::Pong);
}

#[test]
fn wrong_version_closes() {
    let mut h = Harness::new();
    let c = conn(1);
    h.open(c);
    let wrong = ClientMsg::Hello {
        version: PROTOCOL_VERSION + 1,
        role: Role::Client { client: 1 },
    };
    assert_eq!(h.send(c, &wrong), [Output::Close(c)]);
    // The connection is forgotten: later frames get nothing.
    assert!(h.send(c, &hello(c)).is_empty());
}

#[test]
fn second_hello_closes() {
    let mut h = Harness::new();
    let c = conn(1);
    h.connect(c);
    assert_eq!(h.send(c, &hello(c)), [Output::Close(c)]);
}

#[test]
fn request_before_hello_closes() {
    let mut h = Harness::new();
    let c = conn(1);
    h.open(c);
    assert_eq!(
        h.send(c, &request(1, RequestBody::Ping)),
        [Output::Close(c)]
    );
    assert!(h.send(c, &hello(c)).is_empty());
}

#[test]
fn malformed_frames_close() {
    let mut h = Harness::new();
    let bad: [&[u8]; 4] = [
        &[],                          // no type byte
        &[0x7f, 0, 0, 0],             // unknown type
        &[0x01, 1, 2, 3],             // truncated hello
        &[0x01, 0, 0, 0, 0, 0, 1, 1], // bad magic
    ];
    for (i, frame) in bad.iter().enumerate() {
        let c = conn(10 + i);
        h.open(c);
        h.core.handle_frame(c, frame, h.now);
        assert_eq!(h.drain(), [Output::Close(c)], "frame {frame:?}");
    }
    // Also after the handshake: a request with trailing bytes.
    let c = conn(20);
    h.connect(c);
    let mut p = payload(&request(1, RequestBody::Ping));
    p.push(0);
    h.core.handle_frame(c, &p, h.now);
    assert_eq!(h.drain(), [Output::Close(c)]);
}

#[test]
fn malformed_frame_ends_the_session() {
    let mut h = Harness::new();
    let (a, b) = (conn(1), conn(2));
    h.connect(a);
    h.connect(b);
    assert_eq!(h.create_user(a, "alice", "pw"), ReplyBody::Done);
    assert_logged_in(&h.login(a, "alice", "pw", 5000));
    assert!(h.has_session("alice"));

    h.core.handle_frame(a, &[0xee], h.now);
    assert_eq!(h.drain(), [Output::Close(a)]);
    assert!(!h.has_session("alice"), "closing the conn ends its session");
    // The driver reports the close afterwards; that is harmless.
    h.core.handle_close(a, h.now);
    assert!(h.drain().is_empty());

    assert_logged_in(&h.login(b, "alice", "pw", 5001));
}

#[test]
fn handshake_timeout_closes_only_unhandshaken_conns() {
    let mut h = Harness::new();
    let t0 = h.now;
    assert_eq!(h.core.poll_timeout(), None);

    let (slow, fast, late) = (conn(1), conn(2), conn(3));
    h.core.handle_open(slow, t0);
    h.core.handle_open(fast, t0);
    h.core.handle_open(late, t0 + Duration::from_secs(1));
    assert_eq!(h.core.poll_timeout(), Some(t0 + HANDSHAKE_TIMEOUT));
    assert_eq!(h.send(fast, &hello(fast)).len(), 2);

    // Not yet due.
    h.core
        .handle_timeout(t0 + HANDSHAKE_TIMEOUT - Duration::from_millis(1));
    assert!(h.drain().is_empty());

    h.core.handle_timeout(t0 + HANDSHAKE_TIMEOUT);
    assert_eq!(h.drain(), [Output::Close(slow)]);
    assert_eq!(
        h.core.poll_timeout(),
        Some(t0 + Duration::from_secs(1) + HANDSHAKE_TIMEOUT),
        "the next deadline is the later conn's"
    );
    // The handshaken conn lives on.
    assert_eq!(h.ask(fast, RequestBody::Ping), ReplyBody::Pong);

    h.core
        .handle_timeout(t0 + Duration::from_secs(1) + HANDSHAKE_TIMEOUT);
    assert_eq!(h.drain(), [Output::Close(late)]);
    assert_eq!(h.core.poll_timeout(), None);
    assert_eq!(h.ask(fast, RequestBody::Ping), ReplyBody::Pong);
}

#[test]
fn a_conn_closed_before_its_deadline_is_not_closed_again() {
    let mut h = Harness::new();
    let c = conn(1);
    h.open(c);
    h.core.handle_close(c, h.now);
    h.core.handle_timeout(h.now + HANDSHAKE_TIMEOUT);
    assert!(h.drain().is_empty());
    assert_eq!(h.core.poll_timeout(), None);
}

#[test]
fn frames_of_unknown_conns_are_ignored() {
    let mut h = Harness::new();
    let c = conn(9);
    assert!(h.send(c, &hello(c)).is_empty());
    assert!(h.send(c, &request(1, RequestBody::Ping)).is_empty());
}

#[test]
fn same_key_new_generation_is_a_new_conn() {
    let mut h = Harness::new();
    let old = ConnId {
        key: 4,
        generation: 1,
    };
    let new = ConnId {
        key: 4,
        generation: 2,
    };
    h.connect(old);
    h.core.handle_close(old, h.now);
    h.open(new);
    // The new conn must do its own handshake.
    assert_eq!(
        h.send(new, &request(1, RequestBody::Ping)),
        [Output::Close(new)]
    );
}

// =============================================================================================
// Requests without a session
// =============================================================================================

#[test]
fn ping_needs_no_session() {
    let mut h = Harness::new();
    let c = conn(1);
    h.connect(c);
    let outs = h.send(c, &request(42, RequestBody::Ping));
    assert_eq!(
        outs,
        [Output::Send(
            c,
            TrackerMsg::Reply(Reply {
                req_id: 42,
                body: ReplyBody::Pong
            })
        )]
    );
}

#[test]
fn every_session_request_before_login_is_refused() {
    let mut h = Harness::new();
    let c = conn(1);
    h.connect(c);
    for body in session_requests() {
        let reply = h.ask(c, body.clone());
        assert_refused(&reply, RejectCode::NotLoggedIn);
    }
    // The connection lives on.
    assert_eq!(h.ask(c, RequestBody::Ping), ReplyBody::Pong);
}

#[test]
fn replies_come_in_order_with_their_ids() {
    let mut h = Harness::new();
    let c = conn(1);
    h.connect(c);
    let ids = [7u64, 3, u64::MAX, 0, 7];
    for id in ids {
        let body = if id % 2 == 0 {
            RequestBody::Ping
        } else {
            RequestBody::ListGroups
        };
        h.core.handle_frame(c, &payload(&request(id, body)), h.now);
    }
    let got: Vec<(u64, bool)> = h
        .drain()
        .into_iter()
        .map(|o| match o {
            Output::Send(to, TrackerMsg::Reply(r)) => {
                assert_eq!(to, c);
                (r.req_id, r.body == ReplyBody::Pong)
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    let want: Vec<(u64, bool)> = ids.iter().map(|&id| (id, id % 2 == 0)).collect();
    assert_eq!(got, want);
}

#[test]
fn replies_go_to_the_asking_conn() {
    let mut h = Harness::new();
    let (a, b) = (conn(1), conn(2));
    h.connect(a);
    h.connect(b);
    h.core
        .handle_frame(a, &payload(&request(1, RequestBody::Ping)), h.now);
    h.core
        .handle_frame(b, &payload(&request(2, RequestBody::Ping)), h.now);
    h.core
        .handle_frame(a, &payload(&request(3, RequestBody::Ping)), h.now);
    let to: Vec<(ConnId, u64)> = h
        .drain()
        .into_iter()
        .map(|o| match o {
            Output::Send(c, TrackerMsg::Reply(r)) => (c, r.req_id),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(to, [(a, 1), (b, 2), (a, 3)]);
}

// =============================================================================================
// Users and sessions
// =============================================================================================

#[test]
fn create_user_and_login() {
    let mut h = Harness::new();
    let (a, b) = (conn(1), conn(2));
    h.connect(a);
    h.connect(b);

    assert_eq!(h.create_user(a, "alice", "s3cret"), ReplyBody::Done);
    assert_refused(&h.create_user(b, "alice", "other"), RejectCode::UserExists);
    let hash = h.core.state().password_hash(&uid("alice")).unwrap();
    assert!(hash.starts_with("$argon2id$"), "only a hash is stored");
    assert!(!hash.contains("s3cret"));

    assert_refused(
        &h.login(a, "alice", "wrong", 5000),
        RejectCode::WrongPassword,
    );
    assert_refused(
        &h.login(a, "nobody", "s3cret", 5000),
        RejectCode::UnknownUser,
    );
    assert!(!h.has_session("alice"));

    let token = assert_logged_in(&h.login(a, "alice", "s3cret", 5000));
    let (_, session) = h.core.state().sessions().next().unwrap();
    assert_eq!(session.user, uid("alice"));
    assert_eq!(session.peer_addr, addr(5000));
    assert_eq!(session.tracker.no, 1);
    assert_eq!(session.token, token);

    // A second login on the same conn, even as someone else.
    assert_refused(
        &h.login(a, "alice", "s3cret", 5000),
        RejectCode::SessionAlreadyOpen,
    );
    // The same user on another conn.
    assert_refused(
        &h.login(b, "alice", "s3cret", 5001),
        RejectCode::UserLoggedInElsewhere,
    );

    // Once the first conn is gone, the user may log in elsewhere.
    h.core.handle_close(a, h.now);
    assert!(h.drain().is_empty());
    assert!(!h.has_session("alice"));
    let token2 = assert_logged_in(&h.login(b, "alice", "s3cret", 5001));
    assert_ne!(token, token2, "every session gets a fresh token");
    assert_eq!(h.core.state().sessions().count(), 1);
}

#[test]
fn second_login_as_another_user_on_the_same_conn_is_refused() {
    let mut h = Harness::new();
    let c = conn(1);
    h.connect(c);
    assert_eq!(h.create_user(c, "alice", "pw"), ReplyBody::Done);
    assert_logged_in(&h.login(c, "alice", "pw", 5000));
    // Checked before the user is even looked up.
    assert_refused(
        &h.login(c, "nobody", "pw", 5000),
        RejectCode::SessionAlreadyOpen,
    );
}

#[test]
fn logout_ends_the_session() {
    let mut h = Harness::new();
    let (a, b) = (conn(1), conn(2));
    h.connect(a);
    h.connect(b);
    assert_eq!(h.create_user(a, "alice", "pw"), ReplyBody::Done);
    assert_logged_in(&h.login(a, "alice", "pw", 5000));
    assert_eq!(h.ask(a, RequestBody::ListGroups), ReplyBody::Groups(vec![]));

    assert_eq!(h.ask(a, RequestBody::Logout), ReplyBody::Done);
    assert!(!h.has_session("alice"));
    for body in session_requests() {
        assert_refused(&h.ask(a, body), RejectCode::NotLoggedIn);
    }
    // The conn itself is still open and can log in again; so could another.
    assert_eq!(h.ask(a, RequestBody::Ping), ReplyBody::Pong);
    assert_logged_in(&h.login(b, "alice", "pw", 5001));
    // Closing the logged-out conn does not touch the new session.
    h.core.handle_close(a, h.now);
    assert!(h.has_session("alice"));
}

// =============================================================================================
// A whole flow
// =============================================================================================

#[test]
fn group_and_file_flow() {
    let mut h = Harness::new();
    let (a, b) = (conn(1), conn(2));
    h.connect(a);
    h.connect(b);
    assert_eq!(h.create_user(a, "alice", "pa"), ReplyBody::Done);
    assert_eq!(h.create_user(b, "bob", "pb"), ReplyBody::Done);
    assert_logged_in(&h.login(a, "alice", "pa", 5000));
    assert_logged_in(&h.login(b, "bob", "pb", 6000));
    let g = gid("g1");

    // Alice creates the group, bob asks to join.
    assert_eq!(
        h.ask(a, RequestBody::CreateGroup { group: g.clone() }),
        ReplyBody::Done
    );
    assert_refused(
        &h.ask(b, RequestBody::CreateGroup { group: g.clone() }),
        RejectCode::GroupExists,
    );
    assert_refused(
        &h.ask(b, RequestBody::ListFiles { group: g.clone() }),
        RejectCode::NotMember,
    );
    assert_eq!(
        h.ask(b, RequestBody::JoinGroup { group: g.clone() }),
        ReplyBody::Done
    );
    assert_refused(
        &h.ask(b, RequestBody::JoinGroup { group: g.clone() }),
        RejectCode::AlreadyRequested,
    );
    assert_refused(
        &h.ask(b, RequestBody::ListRequests { group: g.clone() }),
        RejectCode::NotOwner,
    );
    assert_eq!(
        h.ask(a, RequestBody::ListRequests { group: g.clone() }),
        ReplyBody::Users(vec![uid("bob")])
    );
    assert_eq!(
        h.ask(b, RequestBody::ListGroups),
        ReplyBody::Groups(vec![GroupInfo {
            group: g.clone(),
            owner: uid("alice"),
            n_members: 1,
            relation: Relation::Requested,
        }])
    );
    assert_eq!(
        h.ask(
            a,
            RequestBody::AcceptRequest {
                group: g.clone(),
                user: uid("bob"),
            }
        ),
        ReplyBody::Done
    );
    assert_refused(
        &h.ask(
            a,
            RequestBody::AcceptRequest {
                group: g.clone(),
                user: uid("bob"),
            },
        ),
        RejectCode::NoSuchRequest,
    );
    assert_eq!(
        h.ask(a, RequestBody::ListRequests { group: g.clone() }),
        ReplyBody::Users(vec![])
    );
    assert_eq!(
        h.ask(b, RequestBody::ListFiles { group: g.clone() }),
        ReplyBody::Files(vec![])
    );

    // Bob shares a file; alice shares the same content; a different content is refused.
    let m = meta("movie.mkv", 7);
    assert_eq!(
        h.ask(
            b,
            RequestBody::UploadFile {
                group: g.clone(),
                meta: m.clone(),
            }
        ),
        ReplyBody::Shared { new_file: true }
    );
    assert_eq!(
        h.ask(
            a,
            RequestBody::UploadFile {
                group: g.clone(),
                meta: m.clone(),
            }
        ),
        ReplyBody::Shared { new_file: false }
    );
    assert_refused(
        &h.ask(
            a,
            RequestBody::UploadFile {
                group: g.clone(),
                meta: meta("movie.mkv", 8),
            },
        ),
        RejectCode::ContentMismatch,
    );
    let file = |n_online, n_sharers| FileInfo {
        name: fname("movie.mkv"),
        size: m.size,
        n_online,
        n_sharers,
        file_sha1: m.file_sha1,
    };
    assert_eq!(
        h.ask(a, RequestBody::ListFiles { group: g.clone() }),
        ReplyBody::Files(vec![file(2, 2)])
    );

    // Bob stops sharing; then alice, and the file disappears.
    assert_eq!(
        h.ask(
            b,
            RequestBody::StopShare {
                group: g.clone(),
                name: fname("movie.mkv"),
            }
        ),
        ReplyBody::Done
    );
    assert_refused(
        &h.ask(
            b,
            RequestBody::StopShare {
                group: g.clone(),
                name: fname("movie.mkv"),
            },
        ),
        RejectCode::NotSharer,
    );
    assert_eq!(
        h.ask(b, RequestBody::ListFiles { group: g.clone() }),
        ReplyBody::Files(vec![file(1, 1)])
    );

    // A sharer whose conn closes is offline but still listed.
    h.core.handle_close(a, h.now);
    let c = conn(3);
    h.connect(c);
    assert_logged_in(&h.login(c, "alice", "pa", 5999));
    assert_eq!(
        h.ask(c, RequestBody::ListFiles { group: g.clone() }),
        ReplyBody::Files(vec![file(0, 1)]),
        "alice's share was on the client at port 5000"
    );
    assert_eq!(
        h.ask(
            c,
            RequestBody::StopShare {
                group: g.clone(),
                name: fname("movie.mkv"),
            }
        ),
        ReplyBody::Done
    );
    assert_eq!(
        h.ask(b, RequestBody::ListFiles { group: g.clone() }),
        ReplyBody::Files(vec![])
    );

    // The owner leaves: bob owns the group; bob leaves: the group is gone.
    assert_eq!(
        h.ask(c, RequestBody::LeaveGroup { group: g.clone() }),
        ReplyBody::Done
    );
    assert_eq!(
        h.ask(b, RequestBody::ListGroups),
        ReplyBody::Groups(vec![GroupInfo {
            group: g.clone(),
            owner: uid("bob"),
            n_members: 1,
            relation: Relation::Owner,
        }])
    );
    assert_eq!(
        h.ask(b, RequestBody::LeaveGroup { group: g.clone() }),
        ReplyBody::Done
    );
    assert_eq!(h.ask(c, RequestBody::ListGroups), ReplyBody::Groups(vec![]));
    assert_refused(
        &h.ask(c, RequestBody::JoinGroup { group: g }),
        RejectCode::NoSuchGroup,
    );
}

#[test]
fn reject_request_drops_the_request() {
    let mut h = Harness::new();
    let (a, b) = (conn(1), conn(2));
    h.connect(a);
    h.connect(b);
    assert_eq!(h.create_user(a, "alice", "pa"), ReplyBody::Done);
    assert_eq!(h.create_user(b, "bob", "pb"), ReplyBody::Done);
    assert_logged_in(&h.login(a, "alice", "pa", 5000));
    assert_logged_in(&h.login(b, "bob", "pb", 6000));
    let g = gid("g");
    assert_eq!(
        h.ask(a, RequestBody::CreateGroup { group: g.clone() }),
        ReplyBody::Done
    );
    assert_eq!(
        h.ask(b, RequestBody::JoinGroup { group: g.clone() }),
        ReplyBody::Done
    );
    assert_eq!(
        h.ask(
            a,
            RequestBody::RejectRequest {
                group: g.clone(),
                user: uid("bob"),
            }
        ),
        ReplyBody::Done
    );
    assert_eq!(
        h.ask(a, RequestBody::ListRequests { group: g.clone() }),
        ReplyBody::Users(vec![])
    );
    assert_refused(
        &h.ask(b, RequestBody::ListFiles { group: g }),
        RejectCode::NotMember,
    );
}

#[test]
fn requests_behind_password_work_wait_their_turn() {
    let mut h = Harness::new();
    let c = conn(1);
    let other = conn(2);
    h.connect(c);
    h.connect(other);
    // create_user parks the connection on a password job; the request behind it waits, a
    // ping is answered at once (the client must not take its tracker for hung).
    h.core.handle_frame(
        c,
        &payload(&request(
            1,
            RequestBody::CreateUser {
                user: uid("alice"),
                password: pw("pw"),
            },
        )),
        h.now,
    );
    h.core
        .handle_frame(c, &payload(&request(2, RequestBody::ListGroups)), h.now);
    h.core
        .handle_frame(c, &payload(&request(3, RequestBody::Ping)), h.now);
    let job = match h.core.poll_output() {
        Some(Output::Password(to, job)) => {
            assert_eq!(to, c);
            job
        }
        other => panic!("expected a password job, got {other:?}"),
    };
    assert!(matches!(
        h.core.poll_output(),
        Some(Output::Send(to, TrackerMsg::Reply(Reply { req_id: 3, body: ReplyBody::Pong }))) if to == c
    ));
    assert_eq!(
        h.core.poll_output(),
        None,
        "list_groups waits behind create_user"
    );
    // Another connection is served meanwhile.
    h.core
        .handle_frame(other, &payload(&request(9, RequestBody::Ping)), h.now);
    assert!(matches!(
        h.core.poll_output(),
        Some(Output::Send(to, TrackerMsg::Reply(Reply { req_id: 9, .. }))) if to == other
    ));
    h.core
        .handle_password_done(c, crate::tracker::password::run(&job));
    let ids: Vec<u64> = h
        .drain()
        .into_iter()
        .map(|o| match o {
            Output::Send(to, TrackerMsg::Reply(r)) if to == c => r.req_id,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(ids, [1, 2], "answers keep the request order");
}

#[test]
fn password_result_for_a_closed_conn_is_dropped() {
    let mut h = Harness::new();
    let c = conn(1);
    h.connect(c);
    h.core.handle_frame(
        c,
        &payload(&request(
            1,
            RequestBody::CreateUser {
                user: uid("alice"),
                password: pw("pw"),
            },
        )),
        h.now,
    );
    let Some(Output::Password(_, job)) = h.core.poll_output() else {
        panic!("expected a password job");
    };
    h.core.handle_close(c, h.now);
    h.core
        .handle_password_done(c, crate::tracker::password::run(&job));
    assert_eq!(h.core.poll_output(), None);
    assert!(h.core.state().password_hash(&uid("alice")).is_none());
}

// =============================================================================================
// Tracker links only through the service's handshake
// =============================================================================================

fn tracker_hello(no: u16) -> ClientMsg {
    ClientMsg::Hello {
        version: crate::wire::PROTOCOL_VERSION,
        role: Role::Tracker {
            no,
            incarnation: 0x77,
        },
    }
}

/// Tracker 1 of a file of two, the other down: tracker 2 may link to it. (Its stall
/// detection is off: these tests do not keep its clock moving.)
fn two_tracker_harness() -> Harness {
    let now = Instant::now();
    let timings = Timings {
        stall_limit: Duration::MAX,
        ..Timings::default()
    };
    let mut h = Harness {
        core: TrackerCore::new(
            TrackerRef {
                no: 1,
                incarnation: 0x33,
            },
            2,
            0x1234_5678,
            timings,
            now,
        ),
        now,
        next_req: 100,
    };
    while let Some(o) = h.core.poll_output() {
        match o {
            Output::Dial(no) => h.core.handle_dial_failed(no, h.now),
            other => panic!("unexpected output at start: {other:?}"),
        }
    }
    assert!(h.core.replica().is_primary());
    h
}

/// Harness whose core refuses tracker hellos outside the secure handshake, as the driver's.
fn secure_harness() -> Harness {
    let mut h = two_tracker_harness();
    let core = std::mem::replace(&mut h.core, Harness::with_others_down().core);
    h.core = core.with_secure_tracker_links();
    h
}

#[test]
fn plaintext_tracker_hello_is_refused_and_changes_nothing() {
    let mut h = secure_harness();
    let c = conn(40);
    h.open(c);
    let replica = |h: &Harness| {
        let r = h.core.replica();
        (r.view(), r.applied(), r.committed(), r.is_primary())
    };
    let before = replica(&h);
    let outs = h.send(c, &tracker_hello(1));
    // Closed, and nothing at all was sent to it.
    assert_eq!(outs, vec![Output::Close(c)]);
    assert_eq!(replica(&h), before);
    // The service is still serving clients.
    let c2 = conn(41);
    h.connect(c2);
    assert_eq!(
        h.create_user(c2, "alice", "pw"),
        ReplyBody::Done,
        "the service is unchanged and serving"
    );
}

#[test]
fn tracker_hello_on_a_secure_link_is_accepted() {
    let mut h = secure_harness();
    let c = conn(42);
    h.open(c);
    h.core.handle_secure(c);
    let outs = h.send(c, &tracker_hello(2));
    assert!(
        outs.contains(&Output::SetMaxFrame(c, MAX_REPLICATION_FRAME)),
        "{outs:?}"
    );
    assert!(!outs.contains(&Output::Close(c)), "{outs:?}");
}

#[test]
fn client_hello_on_a_secure_link_is_refused() {
    let mut h = secure_harness();
    let c = conn(43);
    h.open(c);
    h.core.handle_secure(c);
    let outs = h.send(c, &hello(c));
    assert_eq!(outs, vec![Output::Close(c)]);
}

#[test]
fn without_the_requirement_any_link_may_be_a_tracker() {
    // The simulated clusters rely on this default.
    let mut h = two_tracker_harness();
    let c = conn(44);
    h.open(c);
    let outs = h.send(c, &tracker_hello(2));
    assert!(!outs.contains(&Output::Close(c)), "{outs:?}");
}

/// Login reconciliation: a client that comes back names the shares it holds in its login;
/// the user's other shares at its address end in the same change (no listing between the two
/// shows them), and a file nobody shares any more leaves the listing.
#[test]
fn a_login_names_its_shares_and_ends_what_the_client_lost() {
    let mut h = Harness::new();
    let (a, b) = (conn(1), conn(2));
    h.connect(a);
    assert_eq!(h.create_user(a, "alice", "pa"), ReplyBody::Done);
    assert_logged_in(&h.login(a, "alice", "pa", 5000));
    let g = gid("g1");
    assert_eq!(
        h.ask(a, RequestBody::CreateGroup { group: g.clone() }),
        ReplyBody::Done
    );
    for name in ["kept", "lost"] {
        assert_eq!(
            h.ask(
                a,
                RequestBody::UploadFile {
                    group: g.clone(),
                    meta: meta(name, 1),
                }
            ),
            ReplyBody::Shared { new_file: true }
        );
    }
    // The client restarts: a new connection from the same address.
    h.core.handle_close(a, h.now);
    h.drain();
    h.connect(b);
    let login = RequestBody::Login {
        user: uid("alice"),
        password: pw("pa"),
        peer_addr: addr(5000),
        shares: vec![(g.clone(), fname("kept"))],
        client_key: [0; 32],
        link: 0,
    };
    assert_logged_in(&h.ask(b, login));
    let open = h.core.state().sessions().count();
    assert_eq!(open, 1);
    match h.ask(b, RequestBody::ListFiles { group: g }) {
        ReplyBody::Files(files) => {
            let rows: Vec<(String, u32)> = files
                .iter()
                .map(|f| (f.name.to_string(), f.n_online))
                .collect();
            assert_eq!(rows, [("kept".to_owned(), 1)]);
        }
        other => panic!("{other:?}"),
    }
}

// =============================================================================================
// Fair password work
// =============================================================================================

fn wrong_login(req_id: u64, user: &str) -> ClientMsg {
    request(
        req_id,
        RequestBody::Login {
            user: uid(user),
            password: pw("guess"),
            peer_addr: SocketAddr::from((Ipv4Addr::new(127, 0, 0, 2), 9)),
            shares: Vec::new(),
            client_key: [0; 32],
            link: 0,
        },
    )
}

/// Takes the outputs queued so far, without running password jobs.
fn take_outputs(core: &mut TrackerCore) -> Vec<Output> {
    std::iter::from_fn(|| core.poll_output()).collect()
}

#[test]
fn a_fresh_login_is_not_delayed_by_a_wrong_password_flood() {
    let mut h = Harness::new();
    let setup = conn(1);
    h.connect(setup);
    assert_eq!(h.create_user(setup, "alice", "right"), ReplyBody::Done);
    // 300 connections from another address guess victim's password, each as fast as it is
    // answered. Their jobs "run" instantly here and fail; each answer brings the next guess.
    // Each guesses the password of its own victim (accounts made with one precomputed hash,
    // so that the test runs Argon2 only a few times).
    let attackers: Vec<ConnId> = (100..400).map(conn).collect();
    let victim = |c: ConnId| format!("v{}", c.key);
    let attacker_addr = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 2), 4000));
    let phc = crate::tracker::password::hash(&pw("secret")).unwrap();
    let mut req = 1000;
    for &a in &attackers {
        h.core.handle_open(a, h.now);
        h.core.handle_peer_addr(a, attacker_addr);
        h.core.handle_frame(a, &payload(&hello(a)), h.now);
        let body = RequestBody::CreateUser {
            user: uid(&victim(a)),
            password: pw("secret"),
        };
        h.core.handle_frame(a, &payload(&request(1, body)), h.now);
        loop {
            match h.core.poll_output() {
                Some(Output::Password(c, _)) => h.core.handle_password_done_at(
                    c,
                    PasswordResult::Hashed(Some(phc.clone())),
                    h.now,
                ),
                Some(Output::Send(_, TrackerMsg::Reply(r))) => {
                    assert_eq!(r.body, ReplyBody::Done);
                    break;
                }
                Some(_) => {}
                None => panic!("no answer to create_user"),
            }
        }
    }
    take_outputs(&mut h.core);
    for &a in &attackers {
        req += 1;
        h.core
            .handle_frame(a, &payload(&wrong_login(req, &victim(a))), h.now);
    }
    let mut in_flight: VecDeque<ConnId> = VecDeque::new();
    let mut refused = 0;
    let start = h.now;
    // Two simulated seconds of flood, a job finishing every 5 ms (2 threads at ~10 ms).
    while h.now < start + Duration::from_secs(2) {
        for o in take_outputs(&mut h.core) {
            match o {
                Output::Password(c, _) => in_flight.push_back(c),
                Output::Send(c, TrackerMsg::Reply(r)) => {
                    assert_refused(&r.body, RejectCode::WrongPassword);
                    refused += 1;
                    req += 1;
                    h.core
                        .handle_frame(c, &payload(&wrong_login(req, &victim(c))), h.now);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(in_flight.len() <= DEFAULT_PASSWORD_WORKERS, "{in_flight:?}");
        h.now += Duration::from_millis(5);
        h.core.handle_timeout(h.now);
        if let Some(c) = in_flight.pop_front() {
            h.core
                .handle_password_done_at(c, PasswordResult::Verified(false), h.now);
        }
    }
    assert!(
        refused >= 300,
        "every attacker failed at least once: {refused}"
    );
    assert!(
        h.core.passwords().waiting() > 200,
        "the attackers keep guessing"
    );
    // Now alice logs in on a fresh connection: her job is the next one handed out.
    let fresh = conn(2);
    h.core.handle_open(fresh, h.now);
    h.core.handle_peer_addr(fresh, addr(5000));
    h.core.handle_frame(fresh, &payload(&hello(fresh)), h.now);
    take_outputs(&mut h.core);
    h.core.handle_frame(
        fresh,
        &payload(&request(
            7,
            RequestBody::Login {
                user: uid("alice"),
                password: pw("right"),
                peer_addr: addr(5000),
                shares: Vec::new(),
                client_key: [0; 32],
                link: 0,
            },
        )),
        h.now,
    );
    let mut jobs_before = 0;
    let job = loop {
        let outs = take_outputs(&mut h.core);
        if let Some(job) = outs.iter().find_map(|o| match o {
            Output::Password(c, job) if *c == fresh => Some(job.clone()),
            _ => None,
        }) {
            break job;
        }
        for o in outs {
            if let Output::Password(c, _) = o {
                in_flight.push_back(c);
            }
        }
        let c = in_flight.pop_front().expect("a job in flight");
        jobs_before += 1;
        h.core
            .handle_password_done_at(c, PasswordResult::Verified(false), h.now);
    };
    assert!(
        jobs_before <= DEFAULT_PASSWORD_WORKERS,
        "alice waited for {jobs_before} jobs"
    );
    h.core
        .handle_password_done_at(fresh, crate::tracker::password::run(&job), h.now);
    let logged_in = take_outputs(&mut h.core).into_iter().any(|o| {
        matches!(o, Output::Send(c, TrackerMsg::Reply(Reply { req_id: 7, body: ReplyBody::LoggedIn { .. } })) if c == fresh)
    });
    assert!(logged_in);
}

#[test]
fn a_failing_connection_waits_before_its_next_check() {
    let mut h = Harness::new();
    let c = conn(1);
    h.connect(c);
    assert_eq!(h.create_user(c, "alice", "right"), ReplyBody::Done);
    h.core
        .handle_frame(c, &payload(&wrong_login(1, "alice")), h.now);
    let Some(Output::Password(_, job)) = h.core.poll_output() else {
        panic!("expected a job");
    };
    h.core
        .handle_password_done_at(c, crate::tracker::password::run(&job), h.now);
    let outs = take_outputs(&mut h.core);
    assert!(
        matches!(&outs[..], [Output::Send(_, TrackerMsg::Reply(r))] if matches!(r.body, ReplyBody::Refused { code: RejectCode::WrongPassword, .. })),
        "{outs:?}"
    );
    // The next check of this connection waits 100 ms; its pings are answered meanwhile.
    h.core
        .handle_frame(c, &payload(&wrong_login(2, "alice")), h.now);
    h.core
        .handle_frame(c, &payload(&request(3, RequestBody::Ping)), h.now);
    let outs = take_outputs(&mut h.core);
    assert!(
        matches!(
            &outs[..],
            [Output::Send(_, TrackerMsg::Reply(Reply { req_id: 3, .. }))]
        ),
        "{outs:?}"
    );
    let due = h.now + crate::tracker::password_queue::FIRST_DELAY;
    assert_eq!(h.core.poll_timeout().map(|t| t.min(due)), Some(due));
    h.core.handle_timeout(due - Duration::from_millis(1));
    assert!(take_outputs(&mut h.core).is_empty());
    h.core.handle_timeout(due);
    assert!(matches!(
        &take_outputs(&mut h.core)[..],
        [Output::Password(to, _)] if *to == c
    ));
}

#[test]
fn a_full_password_queue_refuses_and_the_connection_goes_on() {
    let mut h = Harness::new();
    h.core = TrackerCore::new(
        TrackerRef {
            no: 1,
            incarnation: 0x44,
        },
        1,
        7,
        Timings::default(),
        h.now,
    )
    .with_password_queue(crate::tracker::password_queue::PasswordQueue::new(1).with_max_waiting(1));
    while let Some(o) = h.core.poll_output() {
        if let Output::Dial(no) = o {
            h.core.handle_dial_failed(no, h.now);
        }
    }
    let conns: Vec<ConnId> = (1..=3).map(conn).collect();
    for &c in &conns {
        h.core.handle_open(c, h.now);
        h.core.handle_frame(c, &payload(&hello(c)), h.now);
    }
    take_outputs(&mut h.core);
    for (i, &c) in conns.iter().enumerate() {
        let body = RequestBody::CreateUser {
            user: uid(&format!("u{i}")),
            password: pw("pw"),
        };
        h.core.handle_frame(c, &payload(&request(1, body)), h.now);
    }
    // One job runs, one waits, the third is refused at once.
    let outs = take_outputs(&mut h.core);
    assert!(
        matches!(outs[0], Output::Password(to, _) if to == conns[0]),
        "{outs:?}"
    );
    match &outs[1..] {
        [Output::Send(to, TrackerMsg::Reply(r))] => {
            assert_eq!(*to, conns[2]);
            assert_refused(&r.body, RejectCode::Unavailable);
        }
        other => panic!("{other:?}"),
    }
    // The refused connection is served on.
    h.core.handle_frame(
        conns[2],
        &payload(&request(2, RequestBody::ListGroups)),
        h.now,
    );
    let outs = take_outputs(&mut h.core);
    assert!(
        matches!(&outs[..], [Output::Send(to, TrackerMsg::Reply(Reply { req_id: 2, .. }))] if *to == conns[2]),
        "{outs:?}"
    );
}

// =============================================================================================
// Backpressure and idle connections
// =============================================================================================

#[test]
fn a_connection_with_many_requests_parked_is_not_read_until_they_are_answered() {
    let mut h = Harness::new();
    let c = conn(1);
    h.connect(c);
    h.core.handle_frame(
        c,
        &payload(&request(
            1,
            RequestBody::CreateUser {
                user: uid("alice"),
                password: pw("pw"),
            },
        )),
        h.now,
    );
    let Some(Output::Password(_, job)) = h.core.poll_output() else {
        panic!("expected a password job");
    };
    assert!(h.core.wants_input(c));
    for id in 0..PAUSE_QUEUED_REQUESTS as u64 {
        assert!(h.core.wants_input(c), "{id} queued");
        h.core.handle_frame(
            c,
            &payload(&request(10 + id, RequestBody::ListGroups)),
            h.now,
        );
    }
    assert!(!h.core.wants_input(c), "the driver must stop reading it");
    assert!(h.core.take_pause_requested(), "and is told so");
    assert!(!h.core.take_pause_requested());
    assert!(h.core.wants_input(conn(2)), "others are read");
    assert_eq!(h.core.take_reply_bytes(), 0, "nothing answered yet");
    h.core
        .handle_password_done(c, crate::tracker::password::run(&job));
    let outs = h.drain();
    assert_eq!(
        outs.len(),
        1 + PAUSE_QUEUED_REQUESTS,
        "every answer, none dropped"
    );
    assert!(h.core.wants_input(c));
    let bytes = h.core.take_reply_bytes();
    let exact: usize = outs
        .iter()
        .map(|o| match o {
            Output::Send(_, msg) => {
                let mut b = Vec::new();
                msg.emit(&mut b);
                b.len()
            }
            other => panic!("{other:?}"),
        })
        .sum();
    assert!(bytes >= exact, "counted {bytes} of {exact} bytes");
}

#[test]
fn big_requests_parked_pause_the_connection_sooner() {
    let mut h = Harness::new();
    let c = conn(1);
    h.connect(c);
    h.core.handle_frame(
        c,
        &payload(&request(
            1,
            RequestBody::CreateUser {
                user: uid("alice"),
                password: pw("pw"),
            },
        )),
        h.now,
    );
    // Two uploads of 40,000-piece metadata (800 KB each) pass the byte limit.
    let mut big = meta("big", 3);
    big.size = 40_000 * u64::from(PIECE_LEN);
    big.piece_hashes = vec![Sha1Digest([7; 20]); 40_000];
    let upload = request(
        2,
        RequestBody::UploadFile {
            group: gid("g"),
            meta: big,
        },
    );
    h.core.handle_frame(c, &payload(&upload), h.now);
    assert!(h.core.wants_input(c));
    h.core.handle_frame(c, &payload(&upload), h.now);
    assert!(!h.core.wants_input(c));
}

#[test]
fn silent_clients_are_closed_after_the_idle_timeout() {
    let mut h = Harness::new();
    let idle = Duration::from_secs(30);
    h.core = TrackerCore::new(
        TrackerRef {
            no: 1,
            incarnation: 0x55,
        },
        1,
        9,
        Timings::default(),
        h.now,
    )
    .with_idle_timeout(idle);
    take_outputs(&mut h.core);
    let (quiet, chatty, unwelcomed) = (conn(1), conn(2), conn(3));
    h.connect(quiet);
    h.connect(chatty);
    h.open(unwelcomed);
    let start = h.now;
    while h.now < start + idle + Duration::from_secs(5) {
        h.now += Duration::from_millis(500);
        // The chatty one pings every 600 ms or so, like a real client.
        if (h.now - start).as_millis().is_multiple_of(1000) {
            h.send(chatty, &request(1, RequestBody::Ping));
        }
        h.core.handle_timeout(h.now);
        for o in take_outputs(&mut h.core) {
            match o {
                Output::Close(c) if c == unwelcomed => {
                    assert!(h.now >= start + HANDSHAKE_TIMEOUT, "the handshake deadline");
                }
                Output::Close(c) => {
                    assert_eq!(c, quiet, "only the silent client is closed");
                    assert!(h.now >= start + idle);
                    assert!(h.now <= start + idle + IDLE_SWEEP_EVERY + Duration::from_millis(500));
                }
                other => panic!("{other:?}"),
            }
        }
        // The handshake deadline, not the idle timeout, deals with the unwelcomed one.
        if h.now >= start + HANDSHAKE_TIMEOUT {
            assert!(!h.core.links.contains_key(&unwelcomed));
        }
    }
    assert!(!h.core.links.contains_key(&quiet));
    assert!(h.core.links.contains_key(&chatty));
}

#[test]
fn without_an_idle_timeout_silent_clients_stay() {
    let mut h = Harness::new();
    let c = conn(1);
    h.connect(c);
    h.now += Duration::from_secs(3600);
    h.core.handle_timeout(h.now);
    assert!(take_outputs(&mut h.core).is_empty());
    assert!(h.core.links.contains_key(&c));
}

// =============================================================================================
// Sessions belong to whoever proved the password
// =============================================================================================

/// The client id `hello` gives conn `c`.
fn client_id(c: ConnId) -> u64 {
    c.key as u64 | c.generation << 32
}

/// Opens `c` and says hello as client process `client` (a copy of someone else's id).
fn connect_as(h: &mut Harness, c: ConnId, client: u64) {
    h.open(c);
    let outs = h.send(c, &ClientMsg::hello(client));
    assert_eq!(outs.len(), 2, "{outs:?}");
}

fn login_req(req_id: u64, user: &str, password: &str) -> ClientMsg {
    request(
        req_id,
        RequestBody::Login {
            user: uid(user),
            password: pw(password),
            peer_addr: addr(5000),
            shares: Vec::new(),
            client_key: [0; 32],
            link: 0,
        },
    )
}

/// The one reply in `outs`, sent to `c`.
#[track_caller]
fn only_reply(outs: &[Output], c: ConnId) -> ReplyBody {
    match outs {
        [Output::Send(to, TrackerMsg::Reply(r))] if *to == c => r.body.clone(),
        other => panic!("expected one reply to {c}, got {other:?}"),
    }
}

/// Alice logged in on conn 1 with request id 5; returns her token.
fn alice_logged_in(h: &mut Harness) -> [u8; 16] {
    let victim = conn(1);
    h.connect(victim);
    assert_eq!(h.create_user(victim, "alice", "right"), ReplyBody::Done);
    let outs = h.send(victim, &login_req(5, "alice", "right"));
    assert_logged_in(&only_reply(&outs, victim))
}

#[test]
fn a_login_retry_with_a_copied_client_id_still_needs_the_password() {
    let mut h = Harness::new();
    alice_logged_in(&mut h);
    let thief = conn(2);
    connect_as(&mut h, thief, client_id(conn(1)));
    let outs = h.send(thief, &login_req(5, "alice", "wrong"));
    assert_refused(&only_reply(&outs, thief), RejectCode::WrongPassword);
    // Alice's session is untouched.
    assert_eq!(
        h.ask(conn(1), RequestBody::ListGroups),
        ReplyBody::Groups(vec![])
    );
}

#[test]
fn a_login_retry_proving_another_users_password_gets_no_session() {
    let mut h = Harness::new();
    let token = alice_logged_in(&mut h);
    let thief = conn(2);
    connect_as(&mut h, thief, client_id(conn(1)));
    assert_eq!(h.create_user(thief, "mallory", "mine"), ReplyBody::Done);
    // Alice's request id, Mallory's own (right) password.
    let outs = h.send(thief, &login_req(5, "mallory", "mine"));
    let body = only_reply(&outs, thief);
    assert_refused(&body, RejectCode::NotLoggedIn);
    assert!(!format!("{body:?}").contains(&format!("{token:?}")));
    let (_, s) = h.core.state().sessions().next().unwrap();
    assert_eq!((s.user.as_str(), s.token), ("alice", token));
    assert_eq!(
        h.ask(conn(1), RequestBody::ListGroups),
        ReplyBody::Groups(vec![])
    );
    assert_refused(
        &h.ask(thief, RequestBody::ListGroups),
        RejectCode::NotLoggedIn,
    );
}

fn create_user_req(req_id: u64, user: &str, password: &str) -> ClientMsg {
    request(
        req_id,
        RequestBody::CreateUser {
            user: uid(user),
            password: pw(password),
        },
    )
}

#[test]
fn a_create_user_retry_gets_the_remembered_answer_only_with_the_password() {
    let mut h = Harness::new();
    let token = alice_logged_in(&mut h); // create_user was request 101, login request 5
    let thief = conn(2);
    connect_as(&mut h, thief, client_id(conn(1)));
    // Alice's login request id under a create_user of another name: the answer remembered
    // there is her login's, not a creation, and nothing is created.
    let outs = h.send(thief, &create_user_req(5, "bob", "x"));
    let body = only_reply(&outs, thief);
    assert_refused(&body, RejectCode::BadRequest);
    assert!(!format!("{body:?}").contains(&format!("{token:?}")));
    assert!(h.core.state().password_hash(&uid("bob")).is_none());
    // Her create_user's request id with a wrong password: the name is taken, as for anyone.
    let outs = h.send(thief, &create_user_req(101, "alice", "wrong"));
    assert_refused(&only_reply(&outs, thief), RejectCode::UserExists);
    // With her password it is her retry: answered as the creation was.
    let outs = h.send(thief, &create_user_req(101, "alice", "right"));
    assert_eq!(only_reply(&outs, thief), ReplyBody::Done);
    // Her session is untouched.
    assert_eq!(
        h.ask(conn(1), RequestBody::ListGroups),
        ReplyBody::Groups(vec![])
    );
}

#[test]
fn a_copied_client_id_cannot_end_its_owners_session() {
    let mut h = Harness::new();
    alice_logged_in(&mut h);
    let thief = conn(2);
    connect_as(&mut h, thief, client_id(conn(1)));
    assert_eq!(h.create_user(thief, "mallory", "mine"), ReplyBody::Done);
    let outs = h.send(thief, &login_req(77, "mallory", "mine"));
    assert_refused(&only_reply(&outs, thief), RejectCode::SessionAlreadyOpen);
    // Its close ends nothing either.
    h.core.handle_close(thief, h.now);
    h.drain();
    assert!(h.has_session("alice"));
    assert_eq!(
        h.ask(conn(1), RequestBody::ListGroups),
        ReplyBody::Groups(vec![])
    );
}

#[test]
fn resume_moves_the_session_and_detaches_the_old_link() {
    let mut h = Harness::new();
    let token = alice_logged_in(&mut h);
    let newer = conn(2);
    h.connect(newer);
    assert_logged_in(&h.ask(newer, RequestBody::Resume { token, link: 0 }));
    assert_eq!(
        h.ask(newer, RequestBody::ListGroups),
        ReplyBody::Groups(vec![])
    );
    // The old link acts on it no more.
    assert_refused(
        &h.ask(conn(1), RequestBody::CreateGroup { group: gid("g") }),
        RejectCode::NotLoggedIn,
    );
    assert_refused(
        &h.ask(conn(1), RequestBody::Logout),
        RejectCode::NotLoggedIn,
    );
    assert!(h.has_session("alice"));
}

/// A client whose link broke twice in a row: the resume it sent on the link it lost second is
/// handled after the one on its newest link. The older link answers, but the session stays
/// with the newest.
#[test]
fn a_late_resume_on_an_older_link_of_the_client_does_not_take_the_session_back() {
    let mut h = Harness::new();
    let client = 0xC11E;
    let first = conn(1);
    connect_as(&mut h, first, client);
    assert_eq!(h.create_user(first, "alice", "right"), ReplyBody::Done);
    let outs = h.send(first, &login_req(5, "alice", "right"));
    let token = assert_logged_in(&only_reply(&outs, first));
    let (older, newer) = (conn(2), conn(3));
    connect_as(&mut h, older, client);
    connect_as(&mut h, newer, client);
    let outs = h.send(newer, &request(7, RequestBody::Resume { token, link: 0 }));
    assert_logged_in(&only_reply(&outs, newer));
    let outs = h.send(older, &request(6, RequestBody::Resume { token, link: 0 }));
    assert_logged_in(&only_reply(&outs, older));
    assert_eq!(
        h.ask(newer, RequestBody::ListGroups),
        ReplyBody::Groups(vec![]),
        "the newest link keeps the session"
    );
    assert!(h.has_session("alice"));
}

#[test]
fn resume_with_a_wrong_token_costs_no_change_and_no_memory() {
    let mut h = Harness::new();
    alice_logged_in(&mut h);
    let committed = h.core.replica().committed();
    let guesser = conn(2);
    h.connect(guesser);
    for i in 0..100u64 {
        let mut token = [0u8; 16];
        token[..8].copy_from_slice(&i.to_be_bytes());
        let outs = h.send(
            guesser,
            &request(1000 + i, RequestBody::Resume { token, link: 0 }),
        );
        assert_refused(&only_reply(&outs, guesser), RejectCode::NotLoggedIn);
        let origin = Origin {
            client: client_id(guesser),
            req_id: 1000 + i,
        };
        assert_eq!(h.core.state().remembered(origin), None);
    }
    assert_eq!(
        h.core.replica().committed(),
        committed,
        "nothing replicated"
    );
}

// =============================================================================================
// Honest addresses
// =============================================================================================

#[test]
fn a_listen_address_on_another_ip_is_refused_at_login() {
    for allow in [false, true] {
        let mut h = Harness::new();
        h.core = TrackerCore::new(
            TrackerRef {
                no: 1,
                incarnation: 0x66,
            },
            1,
            11,
            Timings::default(),
            h.now,
        )
        .with_foreign_addresses(allow);
        while let Some(o) = h.core.poll_output() {
            if let Output::Dial(no) = o {
                h.core.handle_dial_failed(no, h.now);
            }
        }
        let c = conn(1);
        h.core.handle_open(c, h.now);
        h.core
            .handle_peer_addr(c, SocketAddr::from((Ipv4Addr::new(127, 0, 0, 7), 40_000)));
        h.send(c, &hello(c));
        assert_eq!(h.create_user(c, "alice", "pw"), ReplyBody::Done);
        let foreign = SocketAddr::from((Ipv4Addr::new(10, 1, 2, 3), 6000));
        // A wrong password is reported as such, whatever the address (the password is
        // checked first).
        let body = h.ask(
            c,
            RequestBody::Login {
                user: uid("alice"),
                password: pw("wrong"),
                peer_addr: foreign,
                shares: Vec::new(),
                client_key: [0; 32],
                link: 0,
            },
        );
        assert!(
            matches!(
                body,
                ReplyBody::Refused {
                    code: RejectCode::WrongPassword,
                    ..
                }
            ),
            "{body:?}"
        );
        let body = h.ask(
            c,
            RequestBody::Login {
                user: uid("alice"),
                password: pw("pw"),
                peer_addr: foreign,
                shares: Vec::new(),
                client_key: [0; 32],
                link: 0,
            },
        );
        if allow {
            assert_logged_in(&body);
            continue;
        }
        match &body {
            ReplyBody::Refused { code, message } => {
                assert_eq!(*code, RejectCode::BadRequest);
                assert!(message.contains("10.1.2.3:6000"), "{message}");
                assert!(message.contains("127.0.0.7"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(!h.has_session("alice"));
        // Its own IP, any port, is fine.
        let own = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 7), 6000));
        assert_logged_in(&h.ask(
            c,
            RequestBody::Login {
                user: uid("alice"),
                password: pw("pw"),
                peer_addr: own,
                shares: Vec::new(),
                client_key: [0; 32],
                link: 0,
            },
        ));
    }
}

// =============================================================================================
// Quotas and answers that would not fit a frame
// =============================================================================================

fn harness_with(configure: impl FnOnce(TrackerCore) -> TrackerCore) -> Harness {
    let mut h = Harness::new();
    h.core = configure(TrackerCore::new(
        TrackerRef {
            no: 1,
            incarnation: 0x77,
        },
        1,
        13,
        Timings::default(),
        h.now,
    ));
    while let Some(o) = h.core.poll_output() {
        if let Output::Dial(no) = o {
            h.core.handle_dial_failed(no, h.now);
        }
    }
    h
}

#[test]
fn quotas_refuse_with_a_clear_error_and_the_session_goes_on() {
    let quotas = Quotas {
        groups_per_user: 2,
        requests_per_user: 1,
        files_per_user: 2,
        metadata_per_user: 2 * super::super::state::meta_bytes(&meta("f", 1)),
        ..Quotas::default()
    };
    let mut h = harness_with(|c| c.with_quotas(quotas));
    let (a, b) = (conn(1), conn(2));
    h.connect(a);
    h.connect(b);
    h.create_user(a, "alice", "pw");
    h.create_user(b, "bob", "pw");
    assert_logged_in(&h.login(a, "alice", "pw", 5000));
    assert_logged_in(&h.login(b, "bob", "pw", 5001));
    for g in ["g1", "g2"] {
        assert_eq!(
            h.ask(a, RequestBody::CreateGroup { group: gid(g) }),
            ReplyBody::Done
        );
    }
    let body = h.ask(a, RequestBody::CreateGroup { group: gid("g3") });
    assert_refused(&body, RejectCode::QuotaExceeded);
    assert!(format!("{body:?}").contains("at most 2 groups owned per user"));
    // One pending request at a time.
    assert_eq!(
        h.ask(b, RequestBody::JoinGroup { group: gid("g1") }),
        ReplyBody::Done
    );
    assert_refused(
        &h.ask(b, RequestBody::JoinGroup { group: gid("g2") }),
        RejectCode::QuotaExceeded,
    );
    // Files: two, the same one again adds nothing, a third is refused.
    for (name, content) in [("f", 1), ("h", 2)] {
        let body = h.ask(
            a,
            RequestBody::UploadFile {
                group: gid("g1"),
                meta: meta(name, content),
            },
        );
        assert_eq!(body, ReplyBody::Shared { new_file: true });
    }
    assert_eq!(
        h.ask(
            a,
            RequestBody::UploadFile {
                group: gid("g1"),
                meta: meta("f", 1),
            },
        ),
        ReplyBody::Shared { new_file: false }
    );
    assert_refused(
        &h.ask(
            a,
            RequestBody::UploadFile {
                group: gid("g2"),
                meta: meta("k", 3),
            },
        ),
        RejectCode::QuotaExceeded,
    );
    // The session lives on.
    assert!(matches!(h.ask(a, RequestBody::ListGroups), ReplyBody::Groups(g) if g.len() == 2));
}

#[test]
fn metadata_bytes_have_a_quota_of_their_own() {
    let quotas = Quotas {
        metadata_per_user: 1000,
        ..Quotas::default()
    };
    let mut h = harness_with(|c| c.with_quotas(quotas));
    let a = conn(1);
    h.connect(a);
    h.create_user(a, "alice", "pw");
    assert_logged_in(&h.login(a, "alice", "pw", 5000));
    h.ask(a, RequestBody::CreateGroup { group: gid("g") });
    let mut big = meta("big", 4);
    big.size = 60 * u64::from(PIECE_LEN);
    big.piece_hashes = vec![Sha1Digest([9; 20]); 60];
    let body = h.ask(
        a,
        RequestBody::UploadFile {
            group: gid("g"),
            meta: big,
        },
    );
    assert_refused(&body, RejectCode::QuotaExceeded);
    assert!(format!("{body:?}").contains("bytes of file metadata"));
}

#[test]
fn an_answer_too_big_for_a_frame_is_refused_and_the_session_survives() {
    let mut h = harness_with(|c| c.with_max_reply(300));
    let a = conn(1);
    h.connect(a);
    h.create_user(a, "alice", "pw");
    assert_logged_in(&h.login(a, "alice", "pw", 5000));
    for i in 0..20 {
        let group = gid(&format!("group-with-a-long-name-{i:02}"));
        assert_eq!(
            h.ask(a, RequestBody::CreateGroup { group }),
            ReplyBody::Done
        );
    }
    let body = h.ask(a, RequestBody::ListGroups);
    assert_refused(&body, RejectCode::BadRequest);
    assert!(
        format!("{body:?}").contains("more than the 300"),
        "{body:?}"
    );
    assert_eq!(h.ask(a, RequestBody::Ping), ReplyBody::Pong);
    assert!(h.has_session("alice"));
}

#[test]
fn the_whole_state_has_a_size_quota() {
    let quotas = Quotas {
        state_bytes: 2000,
        ..Quotas::default()
    };
    let mut h = harness_with(|c| c.with_quotas(quotas));
    let a = conn(1);
    h.connect(a);
    h.create_user(a, "alice", "pw");
    assert_logged_in(&h.login(a, "alice", "pw", 5000));
    let mut made = 0;
    let refusal = loop {
        assert!(
            made < 40,
            "40 groups of 64-byte ids made under a 2,000-byte quota"
        );
        let group = gid(&format!("{made:064}"));
        match h.ask(a, RequestBody::CreateGroup { group }) {
            ReplyBody::Done => made += 1,
            other => break other,
        }
    };
    assert_refused(&refusal, RejectCode::QuotaExceeded);
    assert!(
        format!("{refusal:?}").contains("the service's state is full"),
        "{refusal:?}"
    );
    assert!(made >= 5, "only {made} groups before the quota");
    let bytes = h.core.state().approx_bytes();
    assert!(bytes <= 2000, "the state grew to {bytes} bytes");
    // Nor can new accounts be made past it (one may still fit in what a group could not);
    // the session goes on, and removing makes room again.
    let refusal = (0..3)
        .map(|i| {
            h.ask(
                conn(1),
                RequestBody::CreateUser {
                    user: uid(&format!("{i:064}")),
                    password: pw("pw"),
                },
            )
        })
        .find(|r| *r != ReplyBody::Done)
        .expect("accounts refused at the quota");
    assert_refused(&refusal, RejectCode::QuotaExceeded);
    assert!(h.core.state().approx_bytes() <= 2000);
    assert!(matches!(
        h.ask(a, RequestBody::ListGroups),
        ReplyBody::Groups(g) if g.len() == made
    ));
    for i in 0..2 {
        let group = gid(&format!("{i:064}"));
        assert_eq!(h.ask(a, RequestBody::LeaveGroup { group }), ReplyBody::Done);
    }
    assert_eq!(
        h.ask(
            a,
            RequestBody::CreateGroup {
                group: gid("again")
            }
        ),
        ReplyBody::Done
    );
}

#[test]
fn a_listing_comes_in_parts_below_the_part_limit() {
    const GROUPS: usize = 300;
    const PART: usize = 4096;
    let mut h = harness_with(|c| c.with_max_part(PART));
    let a = conn(1);
    h.connect(a);
    h.create_user(a, "alice", "pw");
    assert_logged_in(&h.login(a, "alice", "pw", 5000));
    for i in 0..GROUPS {
        let group = gid(&format!("{i:05}{}", "g".repeat(59)));
        assert_eq!(
            h.ask(a, RequestBody::CreateGroup { group }),
            ReplyBody::Done
        );
    }
    let mut all = Vec::new();
    let mut from = 0;
    let mut parts = 0;
    loop {
        h.next_req += 1;
        let req_id = h.next_req;
        let outs = h.send(
            a,
            &request(
                req_id,
                RequestBody::ListPart {
                    listing: Listing::Groups,
                    from,
                },
            ),
        );
        let [Output::Send(_, msg @ TrackerMsg::Reply(Reply { body, .. }))] = outs.as_slice() else {
            panic!("{outs:?}");
        };
        let mut bytes = Vec::new();
        msg.emit(&mut bytes);
        assert!(bytes.len() <= PART + 64, "a part of {} bytes", bytes.len());
        let ReplyBody::Part { next, items } = body else {
            panic!("{body:?}");
        };
        let ReplyBody::Groups(groups) = &**items else {
            panic!("{items:?}");
        };
        assert!(!groups.is_empty());
        all.extend(groups.iter().map(|g| g.group.clone()));
        parts += 1;
        if *next == 0 {
            break;
        }
        assert_eq!(*next as usize, all.len());
        from = *next;
    }
    assert!(parts >= 5, "{parts} parts");
    let whole = h
        .core
        .state()
        .list_groups(h.core.session_of(a).unwrap())
        .unwrap();
    let want: Vec<GroupId> = whole.into_iter().map(|g| g.group).collect();
    assert_eq!(all, want, "every group once, sorted");
    // Past the end: an empty last part. Files and requests come in parts too.
    match h.ask(
        a,
        RequestBody::ListPart {
            listing: Listing::Groups,
            from: 1_000_000,
        },
    ) {
        ReplyBody::Part { next: 0, items } => assert_eq!(*items, ReplyBody::Groups(vec![])),
        other => panic!("{other:?}"),
    }
    let first = want[0].clone();
    assert_eq!(
        h.ask(
            a,
            RequestBody::ListPart {
                listing: Listing::Files(first.clone()),
                from: 0,
            },
        ),
        ReplyBody::Part {
            next: 0,
            items: Box::new(ReplyBody::Files(vec![]))
        }
    );
    assert_eq!(
        h.ask(
            a,
            RequestBody::ListPart {
                listing: Listing::Requests(first),
                from: 0,
            },
        ),
        ReplyBody::Part {
            next: 0,
            items: Box::new(ReplyBody::Users(vec![]))
        }
    );
    // Not logged in: refused like the whole listing.
    let b = conn(2);
    h.connect(b);
    assert_refused(
        &h.ask(
            b,
            RequestBody::ListPart {
                listing: Listing::Groups,
                from: 0,
            },
        ),
        RejectCode::NotLoggedIn,
    );
}

/// Measurement, run only when named (`--ignored`): one user makes `QUOTA_BENCH_GROUPS`
/// (300,000) groups with 64-byte ids through the core, each `create_group` checked against
/// the user's quotas (raised so that none is reached). Prints the time per tenth, so a cost
/// per check that grows with the state shows as tenths that grow.
#[test]
#[ignore]
fn one_user_makes_many_groups_bench() {
    let n: usize = std::env::var("QUOTA_BENCH_GROUPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300_000);
    let quotas = Quotas {
        groups_per_user: n + 1,
        ..Quotas::default()
    };
    let mut h = harness_with(|c| c.with_quotas(quotas));
    let a = conn(1);
    h.connect(a);
    h.create_user(a, "alice", "pw");
    assert_logged_in(&h.login(a, "alice", "pw", 5000));
    let start = Instant::now();
    let mut tenth = Instant::now();
    for i in 0..n {
        let body = h.ask(
            a,
            RequestBody::CreateGroup {
                group: gid(&format!("g{i:063}")),
            },
        );
        assert_eq!(body, ReplyBody::Done, "group {i}");
        if (i + 1) % (n / 10).max(1) == 0 {
            eprintln!(
                "{} groups: {:.2} s (this tenth {:.2} s)",
                i + 1,
                start.elapsed().as_secs_f64(),
                tenth.elapsed().as_secs_f64()
            );
            tenth = Instant::now();
        }
    }
    eprintln!(
        "one user made {n} groups through the core in {:.2} s",
        start.elapsed().as_secs_f64()
    );
}

/// Issue 9: a client's losing race attempt. After losing its link, a client races the
/// trackers of its file: attempts [`crate::client::uplink::RACE_STAGGER`] apart, the first
/// welcomed wins, the others are closed, and the resume and the requests go out on the winner
/// only. So a losing attempt at this tracker (a later link number than the winner's, through
/// another tracker) carries a hello and nothing else: no session, no change, and its close
/// submits no `ClientGone` (the session the client holds through its old link here stays
/// until that link's own close, below). The only way it submits one is by inheriting the old
/// link's close when that is seen after the attempt's hello (`handle_close` hands the session
/// to a newer link of the same client here): its `ClientGone` then names this tracker's run,
/// as the old link's would have, and `TrackerState::apply` ends a session only while it is
/// held through the run the op names, so not one the client resumed through another tracker
/// meanwhile (`a_late_copy_of_a_login_from_a_left_link_neither_moves_nor_ends_the_session` in
/// the state's tests); ordered before that resume, it ends the session as the old link's close
/// would (the documented behaviour of a broken connection, not the race's doing). Nothing to
/// fix; this pins the tracker side of both orders.
#[test]
fn a_losing_race_attempt_submits_no_client_gone_of_its_own() {
    for old_link_closes_first in [false, true] {
        let mut h = Harness::new();
        let (old, loser) = (conn(1), conn(2));
        h.connect(old);
        assert_eq!(h.create_user(old, "alice", "pw"), ReplyBody::Done);
        let body = h.ask(
            old,
            RequestBody::Login {
                user: uid("alice"),
                password: pw("pw"),
                peer_addr: addr(5000),
                shares: Vec::new(),
                client_key: [0; 32],
                link: 1,
            },
        );
        assert_logged_in(&body);
        // The same client process: its hello names the same client id.
        h.open(loser);
        let outs = h.send(loser, &hello(old));
        assert_eq!(outs.len(), 2, "welcomed: {outs:?}");
        let applied = h.core.replica().applied();
        if old_link_closes_first {
            h.core.handle_close(old, h.now);
            assert!(h.drain().is_empty());
            assert_eq!(
                h.core.replica().applied(),
                applied,
                "handed to the attempt, nothing submitted"
            );
            assert!(h.has_session("alice"));
            h.core.handle_close(loser, h.now);
            assert!(h.drain().is_empty());
            assert!(
                !h.has_session("alice"),
                "the inherited close ends the session held here, as the old link's would"
            );
        } else {
            h.core.handle_close(loser, h.now);
            assert!(h.drain().is_empty());
            assert_eq!(
                h.core.replica().applied(),
                applied,
                "the losing attempt's close submits nothing"
            );
            assert!(h.has_session("alice"));
            h.core.handle_close(old, h.now);
            assert!(h.drain().is_empty());
            assert!(!h.has_session("alice"), "the old link's own close ends it");
        }
    }
}
