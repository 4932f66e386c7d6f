//! Unit tests of [`ClientCore`] without IO: lines go in with `handle_line`, every
//! `Output::Send` is answered by hand with `handle_reply`, hashing is answered with
//! `handle_hashed`, and the `Print`/`Fail` sequences and the failure count are checked.
//! Only `upload_file` touches the disk (a temp file): the harness answers the core's questions
//! about files from the real file system, as the driver does.

use super::*;
use crate::testing::{fname, gid, pw, uid};

use std::net::Ipv4Addr;
use std::path::Path;

use crate::client::outcome::Resumed;
use crate::hasher::sha1_of;
use crate::wire::tracker_link::{FileInfo, GroupInfo, RejectCode, Relation};
use crate::wire::Sha1Digest;

// =============================================================================================
// Harness
// =============================================================================================

fn peer_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(10, 0, 0, 7), 4567))
}

struct Harness {
    core: ClientCore,
    now: Instant,
    /// The login reconciliations sent, each answered `Done` by the harness at once.
    syncs: Vec<Vec<(GroupId, FileName)>>,
}

impl Harness {
    fn new() -> Self {
        Harness {
            core: ClientCore::new(peer_addr()),
            now: Instant::now(),
            syncs: Vec::new(),
        }
    }

    /// The outputs so far, without `SharesChanged` (a hint to the driver, checked on its own).
    /// Questions about the file system are answered from the real one, as the driver does;
    /// the shares a login carries are recorded in `syncs` (the login itself is an output).
    fn drain(&mut self) -> Vec<Output> {
        let mut outs = Vec::new();
        while let Some(out) = self.core.poll_output() {
            match out {
                Output::SharesChanged => {}
                Output::Inspect(query) => self
                    .core
                    .handle_inspected(crate::client::disk::inspect(&query), self.now),
                Output::CheckShares { shares } => {
                    let checked = shares
                        .into_iter()
                        .map(|s| {
                            let stamp = FileStamp::read(&s.path).map_err(|e| e.to_string());
                            (s, stamp)
                        })
                        .collect();
                    self.core.handle_shares_checked(checked, self.now);
                }
                Output::Send(Request {
                    body: RequestBody::Login { ref shares, .. },
                    ..
                }) => {
                    self.syncs.push(shares.clone());
                    outs.push(out);
                }
                out => outs.push(out),
            }
        }
        outs
    }

    /// Feeds one line and returns what it produced at once.
    fn line(&mut self, line: &str) -> Vec<Output> {
        assert!(!self.core.is_busy(), "a line while busy: {line}");
        self.core.handle_line(line, self.now);
        self.drain()
    }

    /// Feeds a line that must send exactly one request; returns it.
    #[track_caller]
    fn line_sends(&mut self, line: &str) -> Request {
        match self.line(line).as_slice() {
            [Output::Send(req)] => {
                assert!(self.core.is_busy(), "awaiting the reply to {line}");
                req.clone()
            }
            other => panic!("{line}: expected one Send, got {other:?}"),
        }
    }

    /// Answers `req` with `body` and returns what the reply produced.
    fn reply(&mut self, req: &Request, body: ReplyBody) -> Vec<Output> {
        self.core.handle_reply(Reply {
            req_id: req.req_id,
            body,
        });
        let outs = self.drain();
        assert!(!self.core.is_busy(), "the command is finished");
        outs
    }

    /// Answers `req` with `body` when the command goes on afterwards (a download starting).
    fn reply_busy(&mut self, req: &Request, body: ReplyBody) -> Vec<Output> {
        self.core.handle_reply(Reply {
            req_id: req.req_id,
            body,
        });
        self.drain()
    }

    /// Runs one command answered by the tracker with `body`.
    #[track_caller]
    fn run(&mut self, line: &str, body: ReplyBody) -> Vec<Output> {
        let req = self.line_sends(line);
        self.reply(&req, body)
    }

    #[track_caller]
    fn login(&mut self, user: &str) {
        let outs = self.run(
            &format!("login {user} pw"),
            ReplyBody::LoggedIn { token: [9; 16] },
        );
        assert_eq!(outs.len(), 1, "{outs:?}");
        assert_eq!(self.core.logged_in_user(), Some(&uid(user)));
    }

    /// Uploads `path` to `group`: checks the hash job, feeds the digests of `content` (the
    /// file's bytes), checks the request and answers it with `Shared { new_file }`.
    #[track_caller]
    fn upload(&mut self, path: &Path, group: &str, content: &[u8], new_file: bool) -> Vec<Output> {
        let line = format!("upload_file \"{}\" {group}", path.display());
        let job = match self.line(&line).as_slice() {
            [Output::HashFile { job, path: hashed }] => {
                assert_eq!(*hashed, path.canonicalize().unwrap());
                *job
            }
            other => panic!("{line}: expected HashFile, got {other:?}"),
        };
        assert!(self.core.is_busy(), "busy while hashing");
        assert_eq!(self.core.poll_timeout(), None, "hashing has no deadline");
        self.core.handle_hashed(
            HashDone {
                job,
                result: Ok(hashes_of(content)),
            },
            self.now,
        );
        let req = match self.drain().as_slice() {
            [Output::Send(req)] => req.clone(),
            other => panic!("expected the upload request, got {other:?}"),
        };
        match &req.body {
            RequestBody::UploadFile { group: g, meta } => {
                assert_eq!(*g, gid(group));
                let base = path.file_name().unwrap().to_str().unwrap();
                assert_eq!(meta.name, fname(base), "the base name");
                assert_eq!(meta.piece_len, PIECE_LEN);
                assert_eq!(meta.size, content.len() as u64);
                assert_eq!(meta.file_sha1, sha1_of(content));
                assert_eq!(meta.piece_hashes, hashes_of(content).piece_hashes);
            }
            other => panic!("expected UploadFile, got {other:?}"),
        }
        self.reply(&req, ReplyBody::Shared { new_file })
    }

    /// (user, group, name) of every share, sorted.
    fn share_names(&self) -> Vec<(String, String, String)> {
        let mut names: Vec<_> = self
            .core
            .shares()
            .iter()
            .map(|s| (s.user.to_string(), s.group.to_string(), s.name.to_string()))
            .collect();
        names.sort();
        names
    }
}

/// What the hasher computes for `content` in standard pieces.
fn hashes_of(content: &[u8]) -> FileHashes {
    FileHashes {
        size: content.len() as u64,
        file_sha1: sha1_of(content),
        piece_hashes: content.chunks(PIECE_LEN as usize).map(sha1_of).collect(),
    }
}

fn print(s: &str) -> Output {
    Output::Print(s.to_owned())
}

fn fail(s: &str) -> Output {
    Output::Fail(s.to_owned())
}

/// Writes `content` to `dir/name`.
fn write_file(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

/// Every command that needs a session, with valid arguments.
const SESSION_LINES: [&str; 12] = [
    "create_group g",
    "join_group g",
    "leave_group g",
    "list_requests g",
    "accept_request g bob",
    "reject_request g bob",
    "list_groups",
    "list_files g",
    "upload_file /definitely/not/here g",
    "download_file g f /tmp/",
    "stop_share g f",
    "logout",
];

// =============================================================================================
// Lines that never reach the tracker
// =============================================================================================

#[test]
fn blank_and_comment_lines_produce_nothing() {
    let mut h = Harness::new();
    for line in ["", "   ", "\t", "# a comment", "   # login a b", "#"] {
        assert!(h.line(line).is_empty(), "{line:?}");
        assert!(!h.core.is_busy());
    }
    assert_eq!(h.core.n_failed(), 0);
}

#[test]
fn bad_lines_fail_once_each() {
    let mut h = Harness::new();
    let bad = [
        ("frobnicate", "unknown command 'frobnicate'"),
        ("create_user alice", "usage: create_user <user_id> <passwd>"),
        ("login a b c", "usage: login <user_id> <passwd>"),
        ("create_group", "usage: create_group <group_id>"),
        ("list_groups extra", "usage: list_groups"),
        ("quit now", "usage: quit"),
        ("logout now", "usage: logout"),
        (
            "upload_file only_path",
            "usage: upload_file <file_path> <group_id>",
        ),
        ("show_downloads x", "usage: show_downloads"),
    ];
    for (i, (line, reason)) in bad.iter().enumerate() {
        assert_eq!(h.line(line), [fail(reason)], "{line}");
        assert_eq!(h.core.n_failed(), i as u64 + 1);
        assert!(!h.core.is_busy());
    }
    // Also when logged in: still nothing is sent.
    h.login("alice");
    let before = h.core.n_failed();
    assert_eq!(h.line("list_files"), [fail("usage: list_files <group_id>")]);
    assert_eq!(h.line("unterminated \"quote").len(), 1);
    assert!(matches!(
        h.line("create_group \"a b\"").as_slice(),
        [Output::Fail(_)]
    ));
    assert_eq!(h.core.n_failed(), before + 3);
}

#[test]
fn session_commands_fail_locally_when_logged_out() {
    let mut h = Harness::new();
    for (i, line) in SESSION_LINES.iter().enumerate() {
        assert_eq!(h.line(line), [fail("not logged in")], "{line}");
        assert!(!h.core.is_busy());
        assert_eq!(h.core.n_failed(), i as u64 + 1);
    }
}

#[test]
fn quit_and_show_downloads() {
    let mut h = Harness::new();
    assert_eq!(h.line("show_downloads"), [Output::ShowDownloads]);
    assert_eq!(h.line("quit"), [Output::Quit]);
    h.login("alice");
    assert_eq!(h.line("show_downloads"), [Output::ShowDownloads]);
    assert_eq!(h.line("quit"), [Output::Quit]);
    assert_eq!(h.core.n_failed(), 0);
    assert!(!h.core.is_busy());
}

// =============================================================================================
// Users and sessions
// =============================================================================================

#[test]
fn create_user_sends_and_prints() {
    let mut h = Harness::new();
    let req = h.line_sends("create_user alice s3cret");
    assert_eq!(
        req.body,
        RequestBody::CreateUser {
            user: uid("alice"),
            password: pw("s3cret"),
        }
    );
    assert_eq!(
        h.reply(&req, ReplyBody::Done),
        [print("user alice created")]
    );
    assert_eq!(h.core.logged_in_user(), None, "creating is not logging in");
    assert_eq!(h.core.n_failed(), 0);
}

#[test]
fn login_carries_the_peer_addr_and_opens_the_session() {
    let mut h = Harness::new();
    let req = h.line_sends("login alice s3cret");
    assert_eq!(
        req.body,
        RequestBody::Login {
            user: uid("alice"),
            password: pw("s3cret"),
            peer_addr: peer_addr(),
            shares: Vec::new(),
            client_key: [0; 32],
            link: 0,
        }
    );
    assert_eq!(h.core.logged_in_user(), None, "not before the reply");
    assert_eq!(
        h.reply(&req, ReplyBody::LoggedIn { token: [1; 16] }),
        [print("logged in as alice")]
    );
    assert_eq!(h.core.logged_in_user(), Some(&uid("alice")));

    // A second login fails locally, whoever it names.
    for line in ["login alice s3cret", "login bob pw"] {
        let outs = h.line(line);
        match outs.as_slice() {
            [Output::Fail(reason)] => assert!(reason.contains("already"), "{reason}"),
            other => panic!("{line}: {other:?}"),
        }
        assert!(!h.core.is_busy());
    }
    assert_eq!(h.core.n_failed(), 2);
    assert_eq!(h.core.logged_in_user(), Some(&uid("alice")));
}

#[test]
fn request_ids_are_fresh() {
    let mut h = Harness::new();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let req = h.line_sends("create_user alice pw");
        ids.push(req.req_id);
        h.reply(&req, ReplyBody::Done);
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
}

#[test]
fn busy_until_the_matching_reply() {
    let mut h = Harness::new();
    assert!(!h.core.is_busy());
    assert_eq!(h.core.poll_timeout(), None);
    let req = h.line_sends("login alice pw");
    assert!(h.core.is_busy());
    assert_eq!(h.core.poll_timeout(), Some(h.now + REPLY_TIMEOUT));

    // A reply to another request is ignored.
    for req_id in [req.req_id + 1, req.req_id.wrapping_sub(1), 0] {
        h.core.handle_reply(Reply {
            req_id,
            body: ReplyBody::LoggedIn { token: [0; 16] },
        });
        assert!(h.drain().is_empty());
        assert!(h.core.is_busy());
        assert_eq!(h.core.logged_in_user(), None);
    }

    assert_eq!(
        h.reply(&req, ReplyBody::LoggedIn { token: [0; 16] }),
        [print("logged in as alice")]
    );
    // A duplicate of the reply finds nothing pending.
    h.core.handle_reply(Reply {
        req_id: req.req_id,
        body: ReplyBody::Done,
    });
    assert!(h.drain().is_empty());
    assert_eq!(h.core.n_failed(), 0);
}

#[test]
fn refusals_fail_with_the_trackers_message() {
    let mut h = Harness::new();
    let outs = h.run(
        "login alice nope",
        ReplyBody::Refused {
            code: RejectCode::WrongPassword,
            message: "wrong password".into(),
        },
    );
    assert_eq!(outs, [fail("wrong password")]);
    assert_eq!(h.core.logged_in_user(), None);
    assert_eq!(h.core.n_failed(), 1);

    h.login("alice");
    let outs = h.run(
        "create_group g",
        ReplyBody::Refused {
            code: RejectCode::GroupExists,
            message: "group 'g' already exists".into(),
        },
    );
    assert_eq!(outs, [fail("group 'g' already exists")]);
    assert_eq!(h.core.n_failed(), 2);
    assert_eq!(h.core.logged_in_user(), Some(&uid("alice")));
}

#[test]
fn an_unexpected_answer_fails_once() {
    let mut h = Harness::new();
    h.login("alice");
    let outs = h.run("list_groups", ReplyBody::Pong);
    assert!(matches!(outs.as_slice(), [Output::Fail(_)]), "{outs:?}");
    assert_eq!(h.core.n_failed(), 1);

    // A login answered with anything but a token does not open the session.
    let mut h = Harness::new();
    let outs = h.run("login alice pw", ReplyBody::Done);
    assert!(matches!(outs.as_slice(), [Output::Fail(_)]), "{outs:?}");
    assert_eq!(h.core.logged_in_user(), None);
    assert_eq!(h.core.n_failed(), 1);
}

#[test]
fn reply_timeout_fails_the_command() {
    let mut h = Harness::new();
    h.login("alice");
    let req = h.line_sends("list_groups");
    h.core
        .handle_timeout(h.now + REPLY_TIMEOUT - Duration::from_millis(1));
    assert!(h.drain().is_empty());
    assert!(h.core.is_busy());

    h.core.handle_timeout(h.now + REPLY_TIMEOUT);
    assert_eq!(h.drain(), [fail("the tracker did not answer in time")]);
    assert!(!h.core.is_busy());
    assert_eq!(h.core.poll_timeout(), None);
    assert_eq!(h.core.n_failed(), 1);

    // The late answer is ignored.
    h.core.handle_reply(Reply {
        req_id: req.req_id,
        body: ReplyBody::Groups(vec![]),
    });
    assert!(h.drain().is_empty());
    // And a timeout while idle does nothing.
    h.core.handle_timeout(h.now + 10 * REPLY_TIMEOUT);
    assert!(h.drain().is_empty());
    assert_eq!(h.core.n_failed(), 1);
}

#[test]
fn tracker_lost_fails_the_pending_command_and_logs_out() {
    let mut h = Harness::new();
    h.login("alice");
    let req = h.line_sends("list_groups");
    h.core.handle_tracker_lost();
    assert_eq!(h.drain(), [fail("lost the connection to the tracker")]);
    assert!(!h.core.is_busy());
    assert_eq!(h.core.logged_in_user(), None);
    assert_eq!(h.core.n_failed(), 1);
    h.core.handle_reply(Reply {
        req_id: req.req_id,
        body: ReplyBody::Groups(vec![]),
    });
    assert!(h.drain().is_empty());
    assert_eq!(h.line("list_groups"), [fail("not logged in")]);

    // When idle it only logs out.
    h.login("alice");
    h.core.handle_tracker_lost();
    assert!(h.drain().is_empty());
    assert_eq!(h.core.logged_in_user(), None);
    assert_eq!(h.core.n_failed(), 2);
}

#[test]
fn send_failed_fails_the_pending_command() {
    let mut h = Harness::new();
    h.core.handle_send_failed("no tracker answered");
    assert!(h.drain().is_empty(), "nothing pending: nothing to fail");
    assert_eq!(h.core.n_failed(), 0);

    // A change may have been made: the line says so.
    let req = h.line_sends("create_user alice pw");
    h.core.handle_send_failed("no tracker answered");
    assert_eq!(
        h.drain(),
        [fail(
            "no tracker answered; the change may have reached the service before its \
             trackers went away: check before repeating it"
        )]
    );
    assert!(!h.core.is_busy());
    assert_eq!(h.core.n_failed(), 1);
    h.core.handle_reply(Reply {
        req_id: req.req_id,
        body: ReplyBody::Done,
    });
    assert!(h.drain().is_empty());

    // A read changes nothing: the reason alone.
    h.login("alice");
    h.line_sends("list_groups");
    h.core.handle_send_failed("no tracker answered");
    assert_eq!(h.drain(), [fail("no tracker answered")]);
}

#[test]
fn record_failure_counts() {
    let mut h = Harness::new();
    h.core.record_failure();
    assert!(h.drain().is_empty());
    assert_eq!(h.core.n_failed(), 1);
}

#[test]
fn logout_prints_and_clears_the_user() {
    let mut h = Harness::new();
    h.login("alice");
    let req = h.line_sends("logout");
    assert_eq!(req.body, RequestBody::Logout);
    assert_eq!(
        h.core.logged_in_user(),
        Some(&uid("alice")),
        "not before the reply"
    );
    assert_eq!(h.reply(&req, ReplyBody::Done), [print("logged out alice")]);
    assert_eq!(h.core.logged_in_user(), None);
    assert_eq!(h.line("list_groups"), [fail("not logged in")]);
    // Another user may log in now.
    h.login("bob");
    assert_eq!(h.core.n_failed(), 1);
}

// =============================================================================================
// Requests and their output
// =============================================================================================

#[test]
fn group_commands_send_the_right_requests() {
    let mut h = Harness::new();
    h.login("alice");
    let g = gid("g1");
    let cases = [
        (
            "create_group g1",
            RequestBody::CreateGroup { group: g.clone() },
            "group g1 created",
        ),
        (
            "join_group g1",
            RequestBody::JoinGroup { group: g.clone() },
            "request to join group g1 sent",
        ),
        (
            "accept_request g1 bob",
            RequestBody::AcceptRequest {
                group: g.clone(),
                user: uid("bob"),
            },
            "bob accepted into group g1",
        ),
        (
            "reject_request g1 carol",
            RequestBody::RejectRequest {
                group: g.clone(),
                user: uid("carol"),
            },
            "request of carol to join group g1 rejected",
        ),
        (
            "leave_group g1",
            RequestBody::LeaveGroup { group: g.clone() },
            "left group g1",
        ),
        (
            "stop_share g1 \"my file.txt\"",
            RequestBody::StopShare {
                group: g.clone(),
                name: fname("my file.txt"),
            },
            "stopped sharing my file.txt in group g1",
        ),
    ];
    for (line, body, printed) in cases {
        let req = h.line_sends(line);
        assert_eq!(req.body, body, "{line}");
        assert_eq!(h.reply(&req, ReplyBody::Done), [print(printed)], "{line}");
    }
    assert_eq!(h.core.n_failed(), 0);
}

#[test]
fn list_groups_format() {
    let mut h = Harness::new();
    h.login("alice");
    let req = h.line_sends("list_groups");
    assert_eq!(
        req.body,
        RequestBody::ListPart {
            listing: Listing::Groups,
            from: 0
        }
    );
    let info = |g: &str, owner: &str, n_members, relation| GroupInfo {
        group: gid(g),
        owner: uid(owner),
        n_members,
        relation,
    };
    let outs = h.reply(
        &req,
        ReplyBody::Groups(vec![
            info("a", "alice", 3, Relation::Owner),
            info("b", "bob", 2, Relation::Member),
            info("c", "bob", 1, Relation::Requested),
            info("d", "carol", 1, Relation::None),
        ]),
    );
    assert_eq!(
        outs,
        [
            print("a\towner=alice\tmembers=3\tyou=owner"),
            print("b\towner=bob\tmembers=2\tyou=member"),
            print("c\towner=bob\tmembers=1\tyou=requested"),
            print("d\towner=carol\tmembers=1\tyou=-"),
        ]
    );
    // SPEC: the first white-space separated field is the group id.
    for (out, g) in outs.iter().zip(["a", "b", "c", "d"]) {
        let Output::Print(line) = out else {
            unreachable!()
        };
        assert_eq!(line.split_whitespace().next(), Some(g));
    }
    // No groups: nothing printed, and no failure.
    assert!(h.run("list_groups", ReplyBody::Groups(vec![])).is_empty());
    assert_eq!(h.core.n_failed(), 0);
}

/// A listing in parts: each part's `next` asks for the following one, and the whole
/// listing is printed once the last part is in; a failure mid-way prints nothing of it, and
/// the next listing starts afresh.
#[test]
fn a_listing_in_parts_is_gathered_then_printed() {
    let mut h = Harness::new();
    h.login("alice");
    let info = |g: &str| GroupInfo {
        group: gid(g),
        owner: uid("alice"),
        n_members: 1,
        relation: Relation::Owner,
    };
    let part = |next, groups: &[&str]| ReplyBody::Part {
        next,
        items: Box::new(ReplyBody::Groups(groups.iter().map(|g| info(g)).collect())),
    };
    let req = h.line_sends("list_groups");
    let outs = h.reply_busy(&req, part(2, &["a", "b"]));
    let [Output::Send(second)] = outs.as_slice() else {
        panic!("expected the next part's request, got {outs:?}");
    };
    assert_eq!(
        second.body,
        RequestBody::ListPart {
            listing: Listing::Groups,
            from: 2
        }
    );
    assert!(second.req_id > req.req_id);
    let outs = h.reply(second, part(0, &["c"]));
    let lines: Vec<String> = outs
        .iter()
        .map(|o| match o {
            Output::Print(l) => l.split('\t').next().unwrap_or("").to_owned(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(lines, ["a", "b", "c"]);
    // Cut short by a refusal: an error, nothing printed; the next listing is whole.
    let req = h.line_sends("list_groups");
    let outs = h.reply_busy(&req, part(1, &["x"]));
    let [Output::Send(second)] = outs.as_slice() else {
        panic!("{outs:?}");
    };
    let outs = h.reply(
        second,
        ReplyBody::Refused {
            code: RejectCode::NotLoggedIn,
            message: "not logged in".into(),
        },
    );
    assert!(
        !outs.iter().any(|o| matches!(o, Output::Print(_))),
        "{outs:?}"
    );
    let outs = h.run("list_groups", part(0, &["y"]));
    assert_eq!(outs.len(), 1, "{outs:?}");
    assert_eq!(h.core.n_failed(), 1);
}

#[test]
fn list_files_format() {
    let mut h = Harness::new();
    h.login("alice");
    let req = h.line_sends("list_files g");
    assert_eq!(
        req.body,
        RequestBody::ListPart {
            listing: Listing::Files(gid("g")),
            from: 0
        }
    );
    let mut sha = [0u8; 20];
    sha[0] = 0xab;
    sha[19] = 0x01;
    let outs = h.reply(
        &req,
        ReplyBody::Files(vec![
            FileInfo {
                name: fname("a b.txt"),
                size: 1_048_577,
                n_online: 1,
                n_sharers: 2,
                file_sha1: Sha1Digest(sha),
            },
            FileInfo {
                name: fname("z"),
                size: 0,
                n_online: 0,
                n_sharers: 1,
                file_sha1: Sha1Digest([0xff; 20]),
            },
        ]),
    );
    let want_sha = format!("ab{}01", "00".repeat(18));
    assert_eq!(
        outs,
        [
            print(&format!("a b.txt\t1048577\t1\t2\t{want_sha}")),
            print(&format!("z\t0\t0\t1\t{}", "ff".repeat(20))),
        ]
    );
    let Output::Print(line) = &outs[0] else {
        unreachable!()
    };
    let fields: Vec<&str> = line.split('\t').collect();
    assert_eq!(
        fields[..3],
        ["a b.txt", "1048577", "1"],
        "SPEC's first fields"
    );
    assert!(h.run("list_files g", ReplyBody::Files(vec![])).is_empty());
    assert_eq!(h.core.n_failed(), 0);
}

#[test]
fn list_requests_format() {
    let mut h = Harness::new();
    h.login("alice");
    let req = h.line_sends("list_requests g");
    assert_eq!(
        req.body,
        RequestBody::ListPart {
            listing: Listing::Requests(gid("g")),
            from: 0
        }
    );
    let outs = h.reply(&req, ReplyBody::Users(vec![uid("zed"), uid("bob")]));
    assert_eq!(outs, [print("zed"), print("bob")], "oldest first, as given");
    assert!(h
        .run("list_requests g", ReplyBody::Users(vec![]))
        .is_empty());
    assert_eq!(h.core.n_failed(), 0);
}

// =============================================================================================
// Uploads and local shares
// =============================================================================================

#[test]
fn upload_hashes_registers_and_records_the_share() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let content: Vec<u8> = (0..PIECE_LEN as usize + 1000).map(|i| i as u8).collect();
    write_file(dir.path(), "data.bin", &content);
    // A path with `..` in it: the share must keep a clean absolute path.
    let path = dir.path().join("sub").join("..").join("data.bin");

    let mut h = Harness::new();
    h.login("alice");
    let outs = h.upload(&path, "g", &content, true);
    assert_eq!(
        outs,
        [print(&format!(
            "uploaded data.bin to group g ({} bytes, 2 pieces)",
            content.len()
        ))]
    );
    let shares = h.core.shares();
    assert_eq!(shares.len(), 1);
    let share = &shares[0];
    assert_eq!(share.user, uid("alice"));
    assert_eq!(share.group, gid("g"));
    assert_eq!(share.name, fname("data.bin"));
    assert!(share.path.is_absolute());
    assert_eq!(
        share.path,
        dir.path().join("data.bin").canonicalize().unwrap()
    );
    assert_eq!(share.meta.size, content.len() as u64);
    assert_eq!(share.meta.piece_hashes.len(), 2);
    assert_eq!(h.core.n_failed(), 0);

    // Sharing the same name again (an existing file) replaces the entry, not duplicates it.
    let outs = h.upload(&path, "g", &content, false);
    assert_eq!(
        outs,
        [print(
            "sharing data.bin in group g (same content as the file already there)"
        )]
    );
    assert_eq!(h.core.shares().len(), 1);
}

#[test]
fn upload_of_a_file_name_with_spaces() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "my file.txt", b"hello");
    let mut h = Harness::new();
    h.login("alice");
    let outs = h.upload(&path, "g", b"hello", true);
    assert_eq!(
        outs,
        [print("uploaded my file.txt to group g (5 bytes, 1 pieces)")]
    );
    assert_eq!(h.core.shares()[0].name, fname("my file.txt"));
}

#[test]
fn upload_of_a_missing_file_or_a_directory_fails_locally() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new();
    h.login("alice");
    let missing = dir.path().join("missing.bin");
    for path in [missing.as_path(), dir.path()] {
        let outs = h.line(&format!("upload_file \"{}\" g", path.display()));
        match outs.as_slice() {
            [Output::Fail(reason)] => {
                assert!(reason.contains(&path.display().to_string()), "{reason}")
            }
            other => panic!("{}: {other:?}", path.display()),
        }
        assert!(!h.core.is_busy());
    }
    assert_eq!(h.core.n_failed(), 2);
    assert!(h.core.shares().is_empty());
}

#[test]
fn hash_errors_fail_the_upload() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "f", b"x");
    let mut h = Harness::new();
    h.login("alice");
    let job = match h
        .line(&format!("upload_file \"{}\" g", path.display()))
        .as_slice()
    {
        [Output::HashFile { job, .. }] => *job,
        other => panic!("{other:?}"),
    };
    // A result for another job is ignored.
    h.core.handle_hashed(
        HashDone {
            job: JobId(job.0 + 1),
            result: Ok(hashes_of(b"x")),
        },
        h.now,
    );
    assert!(h.drain().is_empty());
    assert!(h.core.is_busy());
    // A reply while hashing is ignored too.
    h.core.handle_reply(Reply {
        req_id: job.0,
        body: ReplyBody::Shared { new_file: true },
    });
    assert!(h.drain().is_empty());
    assert!(h.core.is_busy());

    h.core.handle_hashed(
        HashDone {
            job,
            result: Err(crate::hasher::HashError::Read {
                path: "f".into(),
                reason: "permission denied".into(),
            }),
        },
        h.now,
    );
    assert_eq!(h.drain(), [fail("cannot read f: permission denied")]);
    assert!(!h.core.is_busy());
    assert_eq!(h.core.n_failed(), 1);
    assert!(h.core.shares().is_empty());
}

#[test]
fn refused_upload_records_no_share() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "f", b"abc");
    let mut h = Harness::new();
    h.login("alice");
    let job = match h
        .line(&format!("upload_file \"{}\" g", path.display()))
        .as_slice()
    {
        [Output::HashFile { job, .. }] => *job,
        other => panic!("{other:?}"),
    };
    h.core.handle_hashed(
        HashDone {
            job,
            result: Ok(hashes_of(b"abc")),
        },
        h.now,
    );
    let req = match h.drain().as_slice() {
        [Output::Send(req)] => req.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(h.core.poll_timeout(), Some(h.now + REPLY_TIMEOUT));
    let outs = h.reply(
        &req,
        ReplyBody::Refused {
            code: RejectCode::ContentMismatch,
            message: "a different file named 'f' is already shared in group 'g'".into(),
        },
    );
    assert_eq!(
        outs,
        [fail(
            "a different file named 'f' is already shared in group 'g'"
        )]
    );
    assert!(h.core.shares().is_empty());
    assert_eq!(h.core.n_failed(), 1);
}

#[test]
fn stop_share_and_leave_group_remove_local_shares() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_file(dir.path(), "a", b"aaa");
    let b = write_file(dir.path(), "b", b"bbb");
    let mut h = Harness::new();
    h.login("alice");
    h.upload(&a, "g", b"aaa", true);
    h.upload(&b, "g", b"bbb", true);
    h.upload(&a, "h", b"aaa", true);
    assert_eq!(h.core.shares().len(), 3);

    // Bob shares from the same client; alice's commands must not touch his share.
    assert_eq!(
        h.run("logout", ReplyBody::Done),
        [print("logged out alice")]
    );
    assert_eq!(
        h.core.shares().len(),
        3,
        "logout suspends, it does not forget"
    );
    h.login("bob");
    h.upload(&a, "g", b"aaa", false);
    assert_eq!(h.run("logout", ReplyBody::Done).len(), 1);
    let outs = h.run("login alice pw", ReplyBody::LoggedIn { token: [0; 16] });
    assert_eq!(outs, [print("logged in as alice (3 shared files resumed)")]);

    assert_eq!(
        h.run("stop_share g a", ReplyBody::Done),
        [print("stopped sharing a in group g")]
    );
    let s = |u: &str, g: &str, n: &str| (u.to_owned(), g.to_owned(), n.to_owned());
    assert_eq!(
        h.share_names(),
        [
            s("alice", "g", "b"),
            s("alice", "h", "a"),
            s("bob", "g", "a")
        ]
    );

    assert_eq!(
        h.run("leave_group g", ReplyBody::Done),
        [print("left group g")]
    );
    assert_eq!(h.share_names(), [s("alice", "h", "a"), s("bob", "g", "a")]);

    // A refused stop_share keeps the share.
    let outs = h.run(
        "stop_share h a",
        ReplyBody::Refused {
            code: RejectCode::NoSuchGroup,
            message: "no such group 'h'".into(),
        },
    );
    assert_eq!(outs, [fail("no such group 'h'")]);
    assert_eq!(h.share_names(), [s("alice", "h", "a"), s("bob", "g", "a")]);
    assert_eq!(h.core.n_failed(), 1);
}

#[test]
fn tracker_lost_while_hashing_ends_in_one_failure() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "f", b"abc");
    let mut h = Harness::new();
    h.login("alice");
    let job = match h
        .line(&format!("upload_file \"{}\" g", path.display()))
        .as_slice()
    {
        [Output::HashFile { job, .. }] => *job,
        other => panic!("{other:?}"),
    };
    h.core.handle_tracker_lost();
    assert!(h.drain().is_empty(), "hashing is not a tracker request");
    assert_eq!(h.core.logged_in_user(), None);
    h.core.handle_hashed(
        HashDone {
            job,
            result: Ok(hashes_of(b"abc")),
        },
        h.now,
    );
    // The core may fail at once or ask a tracker that has no session for it; either way the
    // command ends in exactly one failure and records no share.
    match h.drain().as_slice() {
        [Output::Fail(_)] => {}
        [Output::Send(req)] => {
            let outs = h.reply(
                req,
                ReplyBody::Refused {
                    code: RejectCode::NotLoggedIn,
                    message: "not logged in".into(),
                },
            );
            assert_eq!(outs, [fail("not logged in")]);
        }
        other => panic!("{other:?}"),
    }
    assert!(!h.core.is_busy());
    assert_eq!(h.core.n_failed(), 1);
    assert!(h.core.shares().is_empty());
}

// =============================================================================================
// Failover: what a new tracker link carries
// =============================================================================================

#[test]
fn a_new_link_without_a_session_carries_only_what_is_in_flight() {
    let mut h = Harness::new();
    assert!(h.core.requests_for_new_link().is_empty());
    let req = h.line_sends("create_user alice pw");
    assert_eq!(h.core.requests_for_new_link(), vec![req.clone()]);
    // Asked again (the next tracker too died): the same request, same id.
    assert_eq!(h.core.requests_for_new_link(), vec![req.clone()]);
    h.reply(&req, ReplyBody::Done);
    assert!(h.core.requests_for_new_link().is_empty());
}

#[test]
fn a_new_link_resumes_the_session_then_resends_the_command_with_its_id() {
    let mut h = Harness::new();
    h.login("alice");
    let cmd = h.line_sends("create_group g1");
    let on_new_link = h.core.requests_for_new_link();
    let [resume, again] = on_new_link.as_slice() else {
        panic!("expected a resume and the command: {on_new_link:?}");
    };
    assert_eq!(
        resume.body,
        RequestBody::Resume {
            token: [9; 16],
            link: 0
        }
    );
    assert!(resume.req_id > cmd.req_id, "the resume has a fresh id");
    assert_eq!(again, &cmd, "the command goes again with its original id");
    // The resume answered: nothing to print, the session is kept.
    h.core.handle_reply(Reply {
        req_id: resume.req_id,
        body: ReplyBody::LoggedIn { token: [9; 16] },
    });
    assert!(h.drain().is_empty());
    assert_eq!(h.core.logged_in_user(), Some(&uid("alice")));
    // The command's answer prints as usual, once.
    assert_eq!(h.reply(&cmd, ReplyBody::Done), [print("group g1 created")]);
    // A second failover resumes again, with a fresh id, and nothing else is in flight.
    let next = h.core.requests_for_new_link();
    assert_eq!(next.len(), 1);
    assert_eq!(
        next[0].body,
        RequestBody::Resume {
            token: [9; 16],
            link: 0
        }
    );
    assert!(next[0].req_id > resume.req_id);
}

#[test]
fn a_resumed_session_announces_its_shares_again() {
    let dir = tempfile::tempdir().unwrap();
    let content = b"shared bytes".to_vec();
    let path = write_file(dir.path(), "s.txt", &content);
    let mut h = Harness::new();
    h.login("alice");
    h.upload(&path, "g1", &content, true);
    let resume = h.core.requests_for_new_link().remove(0);
    h.core.handle_reply(Reply {
        req_id: resume.req_id,
        body: ReplyBody::LoggedIn { token: [9; 16] },
    });
    let outs = h.drain();
    let [Output::Send(again)] = outs.as_slice() else {
        panic!("expected the share announced again: {outs:?}");
    };
    match &again.body {
        RequestBody::UploadFile { group, meta } => {
            assert_eq!(group, &gid("g1"));
            assert_eq!(meta.name, fname("s.txt"));
            assert_eq!(meta.size, content.len() as u64);
        }
        other => panic!("expected an upload, got {other:?}"),
    }
    // Its answer prints nothing; the command loop is free throughout.
    assert!(!h.core.is_busy());
    h.core.handle_reply(Reply {
        req_id: again.req_id,
        body: ReplyBody::Shared { new_file: false },
    });
    assert!(h.drain().is_empty());
    assert_eq!(h.core.n_failed(), 0);
}

#[test]
fn a_refused_resume_logs_out_without_an_error_line() {
    let mut h = Harness::new();
    h.login("alice");
    let resume = h.core.requests_for_new_link().remove(0);
    h.core.handle_reply(Reply {
        req_id: resume.req_id,
        body: ReplyBody::Refused {
            code: RejectCode::NotLoggedIn,
            message: "the session has ended".into(),
        },
    });
    assert!(h.drain().is_empty());
    assert_eq!(h.core.logged_in_user(), None);
    assert_eq!(h.core.n_failed(), 0);
    // Session commands now fail locally, and no resume is attempted on the next link.
    assert_eq!(h.line("list_groups"), [fail("not logged in")]);
    assert!(h.core.requests_for_new_link().is_empty());
}

#[test]
fn a_logout_forgets_the_token() {
    let mut h = Harness::new();
    h.login("alice");
    h.run("logout", ReplyBody::Done);
    assert!(h.core.requests_for_new_link().is_empty());
}

#[test]
fn background_requests_in_flight_go_again_in_id_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new();
    h.login("alice");
    // Start a download: its sharer query and its registration run in the background.
    let id = started_download(&mut h, dir.path());
    h.core.query_sharers(id);
    h.core.handle_first_piece(id);
    let side = h.drain();
    assert_eq!(side.len(), 2, "{side:?}");
    let cmd = h.line_sends("list_groups");
    let reqs = h.core.requests_for_new_link();
    assert_eq!(reqs.len(), 4, "{reqs:?}");
    assert!(matches!(reqs[0].body, RequestBody::Resume { .. }));
    let resent: Vec<&Request> = reqs[1..].iter().collect();
    let mut expected: Vec<&Request> = side
        .iter()
        .map(|o| match o {
            Output::Send(r) => r,
            other => panic!("expected a request: {other:?}"),
        })
        .chain([&cmd])
        .collect();
    expected.sort_by_key(|r| r.req_id);
    assert_eq!(resent, expected);
}

// ---------------------------------------------------------------------------------------------
// A failed download's share
// ---------------------------------------------------------------------------------------------

/// Starts a download of `f.bin` into `dir` for the logged-in user; returns its id.
/// What the driver reports of a download of `f.bin` from `g1` started into `dir`.
fn started_value(dir: &std::path::Path, resumed: Option<Resumed>) -> Started {
    Started {
        name: fname("f.bin"),
        group: gid("g1"),
        target: dir.join("f.bin"),
        size: 3,
        n_sharers: 1,
        resumed,
    }
}

fn started_download(h: &mut Harness, dir: &std::path::Path) -> DownloadId {
    let meta = FileMeta {
        name: fname("f.bin"),
        size: 3,
        piece_len: PIECE_LEN,
        file_sha1: Sha1Digest([1; 20]),
        piece_hashes: vec![Sha1Digest([2; 20])],
    };
    let ask = h.line_sends(&format!("download_file g1 f.bin {}/", dir.display()));
    let peer = SocketAddr::from((Ipv4Addr::LOCALHOST, 7000));
    let outs = h.reply_busy(
        &ask,
        ReplyBody::Sharers {
            meta,
            peers: vec![peer],
            ticket: None,
            peer_keys: Vec::new(),
        },
    );
    let [Output::StartDownload { id, .. }] = outs.as_slice() else {
        panic!("expected a download to start: {outs:?}");
    };
    let id = *id;
    h.core
        .handle_download_started(id, Ok(started_value(dir, None)));
    h.drain();
    id
}

/// The registration request a first verified piece sends.
fn registration(h: &mut Harness, id: DownloadId) -> Request {
    h.core.handle_first_piece(id);
    match h.drain().as_slice() {
        [Output::Send(r)] if matches!(r.body, RequestBody::UploadFile { .. }) => r.clone(),
        other => panic!("expected the registration: {other:?}"),
    }
}

fn stop_share_of(outs: &[Output]) -> Vec<(String, String)> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Send(Request {
                body: RequestBody::StopShare { group, name },
                ..
            }) => Some((group.to_string(), name.to_string())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_download_failing_after_its_registration_withdraws_the_share() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new();
    h.login("alice");
    let id = started_download(&mut h, dir.path());
    let reg = registration(&mut h, id);
    h.reply_busy(&reg, ReplyBody::Shared { new_file: false });
    assert_eq!(h.core.shares().len(), 1, "the download is shared");
    h.core.handle_download_finished(
        id,
        Err(DownloadError::Engine(GiveUp::Aborted(
            "no trusted peer".into(),
        ))),
    );
    let outs = h.drain();
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::Fail(r) if r.contains("failed: no trusted peer"))),
        "{outs:?}"
    );
    assert_eq!(
        stop_share_of(&outs),
        [("g1".to_string(), "f.bin".to_string())]
    );
    assert!(
        h.core.shares().is_empty(),
        "no local share of a missing file"
    );
}

#[test]
fn leaving_a_group_stops_the_users_downloads_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new();
    h.login("alice");
    let id = started_download(&mut h, dir.path());
    // Registered as a share (its first piece verified).
    let reg = registration(&mut h, id);
    h.reply_busy(&reg, ReplyBody::Shared { new_file: false });
    // Leaving another group stops nothing.
    assert_eq!(
        h.run("leave_group g2", ReplyBody::Done),
        [print("left group g2")]
    );
    assert_eq!(
        h.run("leave_group g1", ReplyBody::Done),
        [
            print("left group g1"),
            Output::StopDownloads {
                downloads: vec![id]
            }
        ]
    );
    assert!(h.core.shares().is_empty(), "the leave ended the share");
    h.core
        .handle_download_finished(id, Err(DownloadError::LeftGroup));
    // Only the error line: no StopShare for the share the leave ended (the tracker would
    // refuse it: not a member).
    assert_eq!(
        h.drain(),
        [fail(
            "download of f.bin from group g1 failed: its user left the group"
        )]
    );
    // A refused leave stops nothing (the download is over anyway; a new one runs).
    let id2 = started_download(&mut h, dir.path());
    let outs = h.run(
        "leave_group g1",
        ReplyBody::Refused {
            code: RejectCode::NotMember,
            message: "not a member of group 'g1'".into(),
        },
    );
    assert_eq!(outs, [fail("not a member of group 'g1'")]);
    assert!(h.core.downloads().iter().any(|d| d.id == id2));
}

#[test]
fn a_registration_answered_after_the_failure_is_withdrawn() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new();
    h.login("alice");
    let id = started_download(&mut h, dir.path());
    let reg = registration(&mut h, id);
    h.core.handle_download_finished(
        id,
        Err(DownloadError::Engine(GiveUp::Aborted(
            "no trusted peer".into(),
        ))),
    );
    let outs = h.drain();
    assert_eq!(stop_share_of(&outs), [], "nothing registered yet: {outs:?}");
    // The registration lands after the failure: it is withdrawn at once, never served.
    let outs = h.reply_busy(&reg, ReplyBody::Shared { new_file: false });
    assert_eq!(
        stop_share_of(&outs),
        [("g1".to_string(), "f.bin".to_string())]
    );
    assert!(h.core.shares().is_empty());
}

#[test]
fn a_download_failing_before_its_first_piece_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new();
    h.login("alice");
    let id = started_download(&mut h, dir.path());
    h.core.handle_download_finished(
        id,
        Err(DownloadError::Engine(GiveUp::Aborted(
            "no trusted peer".into(),
        ))),
    );
    let outs = h.drain();
    assert_eq!(stop_share_of(&outs), []);
    assert!(
        !outs.iter().any(|o| matches!(o, Output::Send(_))),
        "{outs:?}"
    );
}

#[test]
fn a_completed_download_keeps_its_share() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new();
    h.login("alice");
    let id = started_download(&mut h, dir.path());
    let reg = registration(&mut h, id);
    h.reply_busy(&reg, ReplyBody::Shared { new_file: false });
    let completed = Completed {
        name: fname("f.bin"),
        group: gid("g1"),
        target: dir.path().join("f.bin"),
        size: 3,
        elapsed: Duration::from_millis(20),
    };
    h.core.handle_download_finished(id, Ok(completed.clone()));
    let outs = h.drain();
    assert!(outs.contains(&print(&completed.to_string())), "{outs:?}");
    assert_eq!(stop_share_of(&outs), []);
    assert_eq!(h.core.shares().len(), 1);
}

#[test]
fn a_download_completed_before_its_first_piece_registered_registers_then() {
    // A file of no pieces (0 bytes) completes without a first verified piece: the completion
    // registers it, and the client holds its exit until the answer (the share remembered).
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new();
    h.login("alice");
    let id = started_download(&mut h, dir.path());
    assert!(!h.core.has_background_work());
    let completed = Completed {
        name: fname("f.bin"),
        group: gid("g1"),
        target: dir.path().join("f.bin"),
        size: 0,
        elapsed: Duration::from_millis(1),
    };
    h.core.handle_download_finished(id, Ok(completed.clone()));
    let outs = h.drain();
    assert!(outs.contains(&print(&completed.to_string())), "{outs:?}");
    let reg = outs
        .iter()
        .find_map(|o| match o {
            Output::Send(r) if matches!(r.body, RequestBody::UploadFile { .. }) => Some(r.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("the completed download is registered: {outs:?}"));
    assert!(
        h.core.has_background_work(),
        "the exit waits for the registration"
    );
    assert!(h.core.take_state_dirty());
    h.reply_busy(&reg, ReplyBody::Shared { new_file: false });
    assert!(!h.core.has_background_work());
    assert_eq!(h.core.shares().len(), 1);
    let saved = h.core.saved_state();
    assert_eq!(
        saved.users[&uid("alice")].shares.len(),
        1,
        "the share is what the state file holds: {saved:?}"
    );
}

#[test]
fn a_registration_in_flight_holds_the_exit_and_a_lost_link_releases_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new();
    h.login("alice");
    let id = started_download(&mut h, dir.path());
    let _reg = registration(&mut h, id);
    assert!(h.core.has_background_work());
    h.core.handle_tracker_lost();
    h.drain();
    assert!(
        !h.core.has_background_work(),
        "nothing left to wait for once the link is lost"
    );
}

/// Logs `user` in and returns what the login produced (the requests due included).
fn login_outputs(h: &mut Harness, user: &str) -> Vec<Output> {
    h.run(
        &format!("login {user} pw"),
        ReplyBody::LoggedIn { token: [9; 16] },
    )
}

#[test]
fn a_download_failing_while_logged_out_is_withdrawn_at_the_next_login() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new();
    h.login("alice");
    let id = started_download(&mut h, dir.path());
    let reg = registration(&mut h, id);
    h.reply_busy(&reg, ReplyBody::Shared { new_file: false });
    h.run("logout", ReplyBody::Done);
    h.core.handle_download_finished(
        id,
        Err(DownloadError::Engine(GiveUp::Aborted(
            "no trusted peer".into(),
        ))),
    );
    let outs = h.drain();
    assert_eq!(stop_share_of(&outs), [], "not logged in: {outs:?}");
    assert!(h.core.shares().is_empty());
    // Another user's login does not withdraw alice's share.
    let outs = login_outputs(&mut h, "bob");
    assert_eq!(stop_share_of(&outs), []);
    h.run("logout", ReplyBody::Done);
    let outs = login_outputs(&mut h, "alice");
    assert_eq!(
        stop_share_of(&outs),
        [("g1".to_string(), "f.bin".to_string())]
    );
    // Once.
    h.run("logout", ReplyBody::Done);
    let outs = login_outputs(&mut h, "alice");
    assert_eq!(stop_share_of(&outs), []);
}

#[test]
fn a_download_failing_before_its_registration_is_sent_is_never_registered() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new();
    h.login("alice");
    let id = started_download(&mut h, dir.path());
    h.run("logout", ReplyBody::Done);
    // The first piece verifies while alice is logged out: the registration waits for her.
    h.core.handle_first_piece(id);
    assert_eq!(h.drain(), []);
    h.core.handle_download_finished(
        id,
        Err(DownloadError::Engine(GiveUp::Aborted(
            "no trusted peer".into(),
        ))),
    );
    h.drain();
    let outs = login_outputs(&mut h, "alice");
    assert!(
        !outs.iter().any(|o| matches!(o, Output::Send(_))),
        "nothing to register or withdraw: {outs:?}"
    );
}

// =============================================================================================
// Restarts: the state file's shares and downloads
// =============================================================================================

fn meta_of(name: &str, content: &[u8]) -> FileMeta {
    let h = hashes_of(content);
    FileMeta {
        name: fname(name),
        size: h.size,
        piece_len: PIECE_LEN,
        file_sha1: h.file_sha1,
        piece_hashes: h.piece_hashes,
    }
}

/// A state file's worth of alice's shares of `files` in group g, stamped as they are now.
fn remembered_shares(files: &[(&Path, &[u8])]) -> ClientState {
    let mut state = ClientState::default();
    let u = state.users.entry(uid("alice")).or_default();
    for (path, content) in files {
        let name = path.file_name().unwrap().to_str().unwrap();
        u.shares.push(SavedShare {
            group: gid("g"),
            path: path.to_path_buf(),
            stamp: Some(FileStamp::read(path).unwrap()),
            meta: meta_of(name, content),
        });
    }
    state
}

#[test]
fn remembered_shares_come_back_at_login_after_the_cheap_check() {
    let dir = tempfile::tempdir().unwrap();
    let same = write_file(dir.path(), "same", b"same");
    let touched = write_file(dir.path(), "touched", b"tttt");
    let altered = write_file(dir.path(), "altered", b"aaaa");
    let resized = write_file(dir.path(), "resized", b"rrrr");
    let gone = write_file(dir.path(), "gone", b"gggg");
    let state = remembered_shares(&[
        (&same, b"same"),
        (&touched, b"tttt"),
        (&altered, b"aaaa"),
        (&resized, b"rrrr"),
        (&gone, b"gggg"),
    ]);
    let mut h = Harness::new();
    h.core.restore(state.clone());
    assert_eq!(h.core.saved_state(), state, "restored as remembered");
    // Nothing is served before the login.
    let m = meta_of("same", b"same");
    assert!(h
        .core
        .serving(&gid("g"), &fname("same"), &m.file_sha1)
        .is_none());

    // Meanwhile: one file touched (same bytes, new mtime), one altered in place (same size),
    // one resized, one removed.
    let later = std::time::SystemTime::now() + Duration::from_secs(10);
    std::fs::File::options()
        .write(true)
        .open(&touched)
        .unwrap()
        .set_modified(later)
        .unwrap();
    std::fs::write(&altered, b"AAAA").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&altered)
        .unwrap()
        .set_modified(later)
        .unwrap();
    std::fs::write(&resized, b"rrrrr").unwrap();
    std::fs::remove_file(&gone).unwrap();

    // The files are checked before the login is sent: only the unchanged one is kept at
    // once, and the login says so; the two of the same size are hashed again.
    let outs = h.line("login alice pw");
    let Some(Output::Send(req)) = outs.last().cloned() else {
        panic!("the login goes last: {outs:?}");
    };
    assert!(matches!(req.body, RequestBody::Login { .. }), "{req:?}");
    assert_eq!(h.syncs, [vec![(gid("g"), fname("same"))]]);
    let jobs: Vec<(JobId, PathBuf)> = outs
        .iter()
        .filter_map(|o| match o {
            Output::HashFile { job, path } => Some((*job, path.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        jobs.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>(),
        [touched.clone(), altered.clone()],
        "{outs:?}"
    );
    let outs = h.reply(&req, ReplyBody::LoggedIn { token: [3; 16] });
    assert!(
        outs.contains(&print("logged in as alice (1 shared files resumed)")),
        "{outs:?}"
    );
    assert!(!h.core.is_busy());
    assert!(h
        .core
        .serving(&gid("g"), &fname("same"), &m.file_sha1)
        .is_some());
    let t = meta_of("touched", b"tttt");
    assert!(h
        .core
        .serving(&gid("g"), &fname("touched"), &t.file_sha1)
        .is_none());
    // Both still remembered while they are checked; the resized and the gone are forgotten.
    let saved: Vec<PathBuf> = h.core.saved_state().users[&uid("alice")]
        .shares
        .iter()
        .map(|s| s.path.clone())
        .collect();
    assert_eq!(saved.len(), 3, "{saved:?}");
    assert!(h.core.take_state_dirty());

    // The touched file holds its content: served and announced again. The altered one does
    // not: dropped.
    h.core.handle_hashed(
        HashDone {
            job: jobs[0].0,
            result: Ok(hashes_of(b"tttt")),
        },
        h.now,
    );
    match h.drain().as_slice() {
        [Output::Send(Request {
            body: RequestBody::UploadFile { group, meta },
            ..
        })] => {
            assert_eq!(group, &gid("g"));
            assert_eq!(meta, &t);
        }
        other => panic!("expected the announcement: {other:?}"),
    }
    assert!(h
        .core
        .serving(&gid("g"), &fname("touched"), &t.file_sha1)
        .is_some());
    h.core.handle_hashed(
        HashDone {
            job: jobs[1].0,
            result: Ok(hashes_of(b"AAAA")),
        },
        h.now,
    );
    assert_eq!(h.drain(), []);
    let mut saved: Vec<String> = h.core.saved_state().users[&uid("alice")]
        .shares
        .iter()
        .map(|s| s.meta.name.to_string())
        .collect();
    saved.sort();
    assert_eq!(saved, ["same", "touched"]);
    // The touched file's new stamp is remembered, so the next check is cheap.
    let touched_saved = h.core.saved_state().users[&uid("alice")]
        .shares
        .iter()
        .find(|s| s.path == touched)
        .unwrap()
        .stamp;
    assert_eq!(touched_saved, Some(FileStamp::read(&touched).unwrap()));
    assert_eq!(h.core.n_failed(), 0);
}

#[test]
fn an_upload_is_remembered_with_its_stamp() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_file(dir.path(), "a", b"aaa");
    let mut h = Harness::new();
    h.login("alice");
    assert_eq!(h.syncs, [vec![]], "a login with nothing to keep says so");
    assert!(!h.core.take_state_dirty() || h.core.saved_state().users.is_empty());
    h.upload(&a, "g", b"aaa", true);
    assert!(h.core.take_state_dirty());
    let state = h.core.saved_state();
    let share = &state.users[&uid("alice")].shares[0];
    assert_eq!(share.path, a.canonicalize().unwrap());
    assert_eq!(share.stamp, Some(FileStamp::read(&a).unwrap()));
    assert_eq!(share.meta, meta_of("a", b"aaa"));
    // Stopped: forgotten.
    h.run("stop_share g a", ReplyBody::Done);
    assert!(h.core.take_state_dirty());
    assert!(h.core.saved_state().users.is_empty());
}

#[test]
fn an_interrupted_download_is_remembered_and_continues_at_the_next_login() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new();
    h.login("alice");
    let id = started_download(&mut h, dir.path());
    let target = dir.path().canonicalize().unwrap().join("f.bin");
    let want = SavedDownload {
        group: gid("g1"),
        name: fname("f.bin"),
        target: target.clone(),
    };
    assert!(h.core.take_state_dirty());
    assert_eq!(
        h.core.saved_state().users[&uid("alice")].downloads,
        std::slice::from_ref(&want)
    );
    // The client exits: the download is not forgotten.
    h.core
        .handle_download_finished(id, Err(DownloadError::Exiting));
    h.drain();
    let state = h.core.saved_state();
    assert_eq!(
        state.users[&uid("alice")].downloads,
        std::slice::from_ref(&want)
    );

    // The next run: restored, then continued by itself after the login.
    let mut h = Harness::new();
    h.core.restore(state);
    let outs = login_outputs(&mut h, "alice");
    let ask = match outs.as_slice() {
        [Output::Print(line), Output::Send(r)] => {
            assert_eq!(line, "logged in as alice");
            r.clone()
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(
        ask.body,
        RequestBody::FileSharers {
            group: gid("g1"),
            name: fname("f.bin"),
        }
    );
    // Still remembered while the tracker is asked.
    assert_eq!(
        h.core.saved_state().users[&uid("alice")].downloads,
        std::slice::from_ref(&want)
    );
    let meta = FileMeta {
        name: fname("f.bin"),
        size: 3,
        piece_len: PIECE_LEN,
        file_sha1: Sha1Digest([1; 20]),
        piece_hashes: vec![Sha1Digest([2; 20])],
    };
    let peer = SocketAddr::from((Ipv4Addr::LOCALHOST, 7000));
    h.core.handle_reply(Reply {
        req_id: ask.req_id,
        body: ReplyBody::Sharers {
            meta: meta.clone(),
            peers: vec![peer],
            ticket: None,
            peer_keys: Vec::new(),
        },
    });
    let id = match h.drain().as_slice() {
        [Output::StartDownload {
            id,
            target: t,
            peers,
            ..
        }] => {
            assert_eq!(t, &target);
            assert_eq!(peers, &[peer]);
            *id
        }
        other => panic!("{other:?}"),
    };
    let resumed = Started {
        resumed: Some(Resumed {
            to_verify: 1,
            n_pieces: 1,
        }),
        ..started_value(&PathBuf::from("/"), None)
    };
    h.core.handle_download_started(id, Ok(resumed.clone()));
    assert_eq!(h.drain(), [print(&resumed.to_string())]);
    assert_eq!(h.core.downloads()[0].status, DownloadStatus::Running);
    assert_eq!(h.core.downloads()[0].target, target);
    assert_eq!(h.core.saved_state().users[&uid("alice")].downloads, [want]);
    assert_eq!(h.core.n_failed(), 0);
}

#[test]
fn a_remembered_download_with_nobody_online_waits_for_the_next_login() {
    let mut state = ClientState::default();
    let want = SavedDownload {
        group: gid("g1"),
        name: fname("f.bin"),
        target: PathBuf::from("/nowhere/f.bin"),
    };
    state.users.entry(uid("alice")).or_default().downloads = vec![want.clone()];
    let mut h = Harness::new();
    h.core.restore(state);
    let outs = login_outputs(&mut h, "alice");
    let Some(Output::Send(ask)) = outs.last() else {
        panic!("{outs:?}");
    };
    h.core.handle_reply(Reply {
        req_id: ask.req_id,
        body: ReplyBody::Sharers {
            meta: FileMeta {
                name: fname("f.bin"),
                size: 3,
                piece_len: PIECE_LEN,
                file_sha1: Sha1Digest([1; 20]),
                piece_hashes: vec![Sha1Digest([2; 20])],
            },
            peers: vec![],
            ticket: None,
            peer_keys: vec![],
        },
    });
    match h.drain().as_slice() {
        [Output::Fail(reason)] => assert!(reason.contains("no sharer is online"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(h.core.downloads().is_empty());
    assert_eq!(h.core.saved_state().users[&uid("alice")].downloads, [want]);
}

#[test]
fn a_login_lost_after_the_check_forgets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_file(dir.path(), "a", b"aaa");
    let state = remembered_shares(&[(&a, b"aaa")]);
    let mut h = Harness::new();
    h.core.restore(state.clone());
    // Checked, then the login is sent; the tracker link breaks before its answer.
    let req = h.line_sends("login alice pw");
    assert!(matches!(req.body, RequestBody::Login { .. }), "{req:?}");
    h.core.handle_tracker_lost();
    h.drain();
    assert_eq!(h.core.saved_state(), state);
}

/// A share verified again while the login was on its way was not in the login (the tracker
/// ended it there): it is announced once the login is answered.
#[test]
fn a_share_verified_during_the_login_is_announced_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_file(dir.path(), "a", b"aaa");
    let state = remembered_shares(&[(&a, b"aaa")]);
    let later = std::time::SystemTime::now() + Duration::from_secs(10);
    std::fs::File::options()
        .write(true)
        .open(&a)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let mut h = Harness::new();
    h.core.restore(state);
    let outs = h.line("login alice pw");
    let (Some(Output::HashFile { job, .. }), Some(Output::Send(req))) =
        (outs.first().cloned(), outs.last().cloned())
    else {
        panic!("{outs:?}");
    };
    assert_eq!(h.syncs, [vec![]], "not kept before it is verified");
    h.core.handle_hashed(
        HashDone {
            job,
            result: Ok(hashes_of(b"aaa")),
        },
        h.now,
    );
    assert_eq!(h.drain(), [], "not announced before the login is answered");
    let outs = h.reply(&req, ReplyBody::LoggedIn { token: [3; 16] });
    assert!(
        outs.iter().any(|o| matches!(
            o,
            Output::Send(Request {
                body: RequestBody::UploadFile { .. },
                ..
            })
        )),
        "{outs:?}"
    );
}

#[test]
fn a_logout_before_the_answer_keeps_a_remembered_download() {
    let mut state = ClientState::default();
    let want = SavedDownload {
        group: gid("g1"),
        name: fname("f.bin"),
        target: PathBuf::from("/nowhere/f.bin"),
    };
    state.users.entry(uid("alice")).or_default().downloads = vec![want.clone()];
    let mut h = Harness::new();
    h.core.restore(state.clone());
    let outs = login_outputs(&mut h, "alice");
    let Some(Output::Send(ask)) = outs.last() else {
        panic!("{outs:?}");
    };
    assert_eq!(h.core.saved_state(), state, "remembered while asked");
    h.run("logout", ReplyBody::Done);
    h.core.handle_reply(Reply {
        req_id: ask.req_id,
        body: ReplyBody::Refused {
            code: RejectCode::NotLoggedIn,
            message: "not logged in".into(),
        },
    });
    assert_eq!(h.drain(), []);
    assert_eq!(h.core.saved_state(), state);
    // The tracker link breaking with the question in flight forgets nothing either.
    let outs = login_outputs(&mut h, "alice");
    assert!(matches!(outs.last(), Some(Output::Send(_))), "{outs:?}");
    h.core.handle_tracker_lost();
    h.drain();
    assert_eq!(h.core.saved_state(), state);
}

#[test]
fn commands_that_would_outgrow_the_state_file_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_file(dir.path(), "a", b"aaa");
    let mut state = ClientState::default();
    for i in 0..MAX_USERS {
        state
            .users
            .entry(uid(&format!("u{i}")))
            .or_default()
            .downloads
            .push(SavedDownload {
                group: gid("g"),
                name: fname("f"),
                target: PathBuf::from(format!("/d/{i}")),
            });
    }
    let mut h = Harness::new();
    h.core.restore(state);
    h.login("zed");
    let outs = h.line(&format!("upload_file {} g", a.display()));
    match outs.as_slice() {
        [Output::Fail(reason)] => assert!(reason.contains("1024 users"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let outs = h.line(&format!("download_file g f {}/", dir.path().display()));
    assert!(matches!(outs.as_slice(), [Output::Fail(_)]), "{outs:?}");
    // A user the state already knows still has room.
    h.run("logout", ReplyBody::Done);
    let outs = login_outputs(&mut h, "u7");
    assert!(matches!(outs.last(), Some(Output::Send(_))), "{outs:?}");
    let job = h.line(&format!("upload_file {} g", a.display()));
    assert!(
        matches!(job.as_slice(), [Output::HashFile { .. }]),
        "{job:?}"
    );
}

/// Killed after a download completed and before the state said so: the download continues
/// at the next login, finds its target there, and hashes it. The finished file is shared
/// (and announced); anything else at the target is an error and stays untouched.
#[test]
fn a_remembered_download_whose_target_exists_is_checked_not_fetched() {
    for finished in [true, false] {
        let target = PathBuf::from("/somewhere/f.bin");
        let mut state = ClientState::default();
        let want = SavedDownload {
            group: gid("g1"),
            name: fname("f.bin"),
            target: target.clone(),
        };
        state.users.entry(uid("alice")).or_default().downloads = vec![want];
        let mut h = Harness::new();
        h.core.restore(state);
        let outs = login_outputs(&mut h, "alice");
        let Some(Output::Send(ask)) = outs.last().cloned() else {
            panic!("{outs:?}");
        };
        let meta = meta_of("f.bin", b"abc");
        h.core.handle_reply(Reply {
            req_id: ask.req_id,
            body: ReplyBody::Sharers {
                meta: meta.clone(),
                peers: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 7000))],
                ticket: None,
                peer_keys: vec![[0; 32]],
            },
        });
        let outs = h.drain();
        let [Output::StartDownload { id, .. }] = outs.as_slice() else {
            panic!("expected the download to start: {outs:?}");
        };
        let id = *id;
        h.core
            .handle_download_started(id, Err(StartError::TargetExists(target.clone())));
        let job = match h.drain().as_slice() {
            [Output::HashFile { job, path }] => {
                assert_eq!(path, &target);
                *job
            }
            other => panic!("{other:?}"),
        };
        // Killed again while it is hashed: still remembered as a download.
        assert_eq!(h.core.saved_state().users[&uid("alice")].downloads.len(), 1);
        let content: &[u8] = if finished { b"abc" } else { b"xyz" };
        h.core.handle_hashed(
            HashDone {
                job,
                result: Ok(hashes_of(content)),
            },
            h.now,
        );
        let outs = h.drain();
        let saved = h.core.saved_state();
        let alice = saved.users.get(&uid("alice")).cloned().unwrap_or_default();
        assert!(alice.downloads.is_empty(), "{alice:?}");
        if finished {
            assert_eq!(h.core.downloads()[0].status, DownloadStatus::Complete);
            assert_eq!(alice.shares.len(), 1);
            assert_eq!(alice.shares[0].path, target);
            assert!(
                outs.iter().any(|o| matches!(
                    o,
                    Output::Send(Request {
                        body: RequestBody::UploadFile { .. },
                        ..
                    })
                )),
                "announced: {outs:?}"
            );
            assert!(
                outs.contains(&print(
                    "download of f.bin from group g1 had finished: /somewhere/f.bin (shared)"
                )),
                "{outs:?}"
            );
            assert_eq!(h.core.n_failed(), 0);
        } else {
            assert_eq!(h.core.downloads()[0].status, DownloadStatus::Failed);
            assert!(alice.shares.is_empty());
            assert!(
                matches!(outs.as_slice(), [Output::Fail(r)] if r.contains("already exists")),
                "{outs:?}"
            );
        }
    }
}
