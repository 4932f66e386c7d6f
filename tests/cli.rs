//! End-to-end tests of `tracker_program` and `client_program` as processes, against the
//! contract in SPEC.md: exact stdout lines, one `error: ` line per failed command, exit codes.

mod common;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{
    free_addr, free_ports, run_program, sha1sum, Client, Outcome, Running, Tracker, CLIENT_BIN,
    TRACKER_BIN,
};

/// SHA1 of the 3-byte file `abc`.
const SHA1_ABC: &str = "a9993e364706816aba3e25717850c26c9cd0d89d";
/// SHA1 of the 5-byte file `bob's`.
const SHA1_BOB: &str = "3775f99c6aa2788688a6f3f0e22b0c2da1be79d8";
/// SHA1 of the empty file.
const SHA1_EMPTY: &str = "da39a3ee5e6b4b0d3255bfef95601890afd80709";

fn tab(fields: &[&str]) -> String {
    fields.join("\t")
}

// ---------------------------------------------------------------------------------------
// 1. Usage
// ---------------------------------------------------------------------------------------

#[test]
fn client_help_and_version() {
    let (code, out, _) = run_program(CLIENT_BIN, &["--help"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("Usage: client_program"), "{out}");
    assert!(out.contains("--serve"), "{out}");
    let (code, out, _) = run_program(CLIENT_BIN, &["-h"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("Usage: client_program"), "{out}");
    let (code, out, _) = run_program(CLIENT_BIN, &["--version"]);
    assert_eq!(code, Some(0));
    assert_eq!(
        out.trim(),
        format!("client_program {}", env!("CARGO_PKG_VERSION"))
    );
    let (code, out, _) = run_program(CLIENT_BIN, &["-V"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("client_program "), "{out}");
}

#[test]
fn tracker_help_and_version() {
    let (code, out, _) = run_program(TRACKER_BIN, &["--help"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("Usage: tracker_program"), "{out}");
    let (code, out, _) = run_program(TRACKER_BIN, &["--version"]);
    assert_eq!(code, Some(0));
    assert_eq!(
        out.trim(),
        format!("tracker_program {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn client_usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let info = dir.path().join("tracker_info.txt");
    std::fs::write(&info, format!("{}\n", free_addr())).unwrap();
    let info = info.to_str().unwrap();
    let bad_info = dir.path().join("bad_info.txt");
    std::fs::write(&bad_info, "not an address\n").unwrap();
    let missing = dir.path().join("missing.txt");
    let addr = free_addr().to_string();
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec![&addr],
        vec![&addr, info, "extra"],
        vec!["notanaddr", info],
        vec!["127.0.0.1", info],
        vec![&addr, missing.to_str().unwrap()],
        vec![&addr, dir.path().to_str().unwrap()],
        vec![&addr, bad_info.to_str().unwrap()],
        vec!["--log-level", "loud", &addr, info],
        vec!["--no-such-option", &addr, info],
        vec!["--log-file", "/nonexistent-dir/sub/client.log", &addr, info],
    ];
    for args in cases {
        let (code, out, err) = run_program(CLIENT_BIN, &args);
        assert_eq!(code, Some(2), "client_program {args:?}: {out} {err}");
        assert!(
            out.is_empty(),
            "client_program {args:?} printed on stdout: {out}"
        );
        assert!(
            !err.is_empty(),
            "client_program {args:?}: no message on stderr"
        );
    }
}

#[test]
fn tracker_usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let info = dir.path().join("tracker_info.txt");
    std::fs::write(&info, format!("# one tracker\n\n{}\n", free_addr())).unwrap();
    let info = info.to_str().unwrap();
    let missing = dir.path().join("missing.txt");
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec![info],
        vec![info, "1", "extra"],
        vec![info, "0"],
        vec![info, "2"],
        vec![info, "3"],
        vec![info, "x"],
        vec![info, "-1"],
        vec![missing.to_str().unwrap(), "1"],
        vec!["--log-level", "loud", info, "1"],
        vec!["--log-file", "/nonexistent-dir/sub/tracker.log", info, "1"],
    ];
    for args in cases {
        let (code, out, err) = run_program(TRACKER_BIN, &args);
        assert_eq!(code, Some(2), "tracker_program {args:?}: {out} {err}");
        assert!(
            out.is_empty(),
            "tracker_program {args:?} printed on stdout: {out}"
        );
        assert!(
            !err.is_empty(),
            "tracker_program {args:?}: no message on stderr"
        );
    }
}

/// The data directory: by default per address under `XDG_STATE_HOME`, created 0700 and
/// locked; a second tracker on it (`--data-dir`) is refused with exit status 2, and so is one
/// whose data directory cannot be created.
#[test]
fn tracker_data_dir_is_locked_and_defaults_under_xdg_state_home() {
    use std::os::unix::fs::PermissionsExt;

    let tracker = Tracker::start();
    let data = common::state_home(&tracker.info)
        .join("p2pshare")
        .join(format!(
            "tracker-{}-{}",
            tracker.addr.ip(),
            tracker.addr.port()
        ));
    assert!(data.join("LOCK").is_file(), "no lock in {}", data.display());
    let mode = std::fs::metadata(&data).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    let info = tracker.info.to_str().unwrap();
    let (code, out, err) = run_program(
        TRACKER_BIN,
        &["--data-dir", data.to_str().unwrap(), info, "1"],
    );
    assert_eq!(code, Some(2), "{out} {err}");
    assert!(err.contains("in use by another process"), "{err}");

    let (code, _, err) = run_program(
        TRACKER_BIN,
        &["--data-dir", "/proc/no-such-place/data", info, "1"],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("/proc/no-such-place/data"), "{err}");
}

// ---------------------------------------------------------------------------------------
// 2. Tracker lifecycle
// ---------------------------------------------------------------------------------------

#[test]
fn tracker_quit_on_stdin_exits_0() {
    let mut tracker = Tracker::start();
    tracker.write_stdin("not-a-command");
    tracker.write_stdin("");
    assert!(tracker.is_running());
    let status = tracker.quit();
    assert_eq!(status.code(), Some(0), "{}", tracker.stderr());
}

#[test]
fn tracker_sigterm_exits_0() {
    let mut tracker = Tracker::start();
    tracker
        .run(&["create_user alice pw"])
        .check(&["user alice created"], 0, 0);
    let status = tracker.terminate();
    assert_eq!(status.code(), Some(0), "{}", tracker.stderr());
}

#[test]
fn tracker_sigint_exits_0() {
    let mut tracker = Tracker::start();
    let status = tracker.signal("INT");
    assert_eq!(status.code(), Some(0), "{}", tracker.stderr());
}

#[test]
fn tracker_keeps_running_when_stdin_closes() {
    let mut tracker = Tracker::start();
    tracker.close_stdin();
    // A client is served after the end of the tracker's input...
    tracker
        .run(&["create_user alice pw", "login alice pw"])
        .check(&["user alice created", "logged in as alice"], 0, 0);
    assert!(tracker.is_running(), "tracker stopped after stdin closed");
    // ...and a signal still stops it cleanly.
    assert_eq!(tracker.terminate().code(), Some(0));
}

// ---------------------------------------------------------------------------------------
// 3. Commands before login
// ---------------------------------------------------------------------------------------

#[test]
fn commands_before_login_fail() {
    let tracker = Tracker::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f.txt");
    std::fs::write(&file, "abc").unwrap();
    let upload = format!("upload_file {} g1", file.display());
    let download = format!("download_file g1 f.txt {}/", dir.path().display());
    let needs_login = [
        "create_group g1",
        "join_group g1",
        "leave_group g1",
        "list_requests g1",
        "accept_request g1 bob",
        "reject_request g1 bob",
        "list_groups",
        "list_files g1",
        upload.as_str(),
        download.as_str(),
        "stop_share g1 f.txt",
        "logout",
    ];
    let mut batch = vec!["show_downloads", "create_user alice pw"];
    batch.extend(needs_login);
    batch.push("show_downloads");
    let out = tracker.run(&batch);
    out.check(&["user alice created"], needs_login.len(), 1);
    assert!(
        out.errors.iter().all(|e| e.contains("not logged in")),
        "{:?}",
        out.errors
    );
    // Nothing of that happened on the tracker.
    tracker
        .run(&["login alice pw", "list_groups"])
        .check(&["logged in as alice"], 0, 0);
    assert!(!dir.path().join("f.txt.part").exists());
}

// ---------------------------------------------------------------------------------------
// 4. Accounts and sessions
// ---------------------------------------------------------------------------------------

#[test]
fn accounts_and_sessions() {
    let tracker = Tracker::start();
    tracker
        .run(&[
            "create_user alice pw",
            "create_user alice other", // taken
            "login alice wrong",       // wrong password
            "login bob pw",            // unknown user
            "login alice pw",
            "login alice pw", // session already open on this client
            "create_user bob pw-b",
            "login bob pw-b", // another user on the same client: still one session
            "logout",
            "logout", // not logged in any more
            "login bob pw-b",
            "list_groups",
        ])
        .check(
            &[
                "user alice created",
                "logged in as alice",
                "user bob created",
                "logged out alice",
                "logged in as bob",
            ],
            6,
            1,
        );
    // The account was not replaced by the refused duplicate.
    tracker.run(&["login alice other"]).check(&[], 1, 1);
    tracker.run(&["login alice pw", "logout"]).check(
        &["logged in as alice", "logged out alice"],
        0,
        0,
    );
}

#[test]
fn login_refused_while_user_is_on_another_live_client() {
    let tracker = Tracker::start();
    tracker
        .run(&["create_user alice pw", "create_user bob pw"])
        .check(&["user alice created", "user bob created"], 0, 0);
    let mut first = tracker.client();
    let mut live = first.live();
    live.cmd("login alice pw", &["logged in as alice"]);

    // Another client cannot open a second session for alice, but can for bob.
    tracker
        .run(&["login alice pw", "login bob pw"])
        .check(&["logged in as bob"], 1, 1);

    // After alice logs out on the first client, she can log in elsewhere.
    live.cmd("logout", &["logged out alice"]);
    let mut second = tracker.client();
    let mut live2 = second.live();
    live2.cmd("login alice pw", &["logged in as alice"]);
    // Now the first client is the one refused.
    live.send("login alice pw");
    let e = live.expect_error();
    assert!(e.contains("alice"), "{e}");
    let (status, rest) = live.finish();
    assert_eq!(status.code(), Some(1));
    assert!(rest.is_empty(), "{rest:?}");

    // A client that exits ends its session: alice is free again.
    let (status, rest) = live2.finish();
    assert_eq!(status.code(), Some(0));
    assert!(rest.is_empty(), "{rest:?}");
    tracker
        .run(&["login alice pw"])
        .check(&["logged in as alice"], 0, 0);
}

// ---------------------------------------------------------------------------------------
// 5. The command loop: syntax, errors, exit status
// ---------------------------------------------------------------------------------------

#[test]
fn batch_syntax_comments_quotes_and_errors() {
    let tracker = Tracker::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("my file.txt"), "abc").unwrap();
    let mut client = tracker.client().cwd(dir.path());
    let out = client.run(&[
        "# a comment line",
        "",
        "   ",
        "\t",
        "   # an indented comment",
        "create_user alice pw",
        "  login   alice\tpw  ",
        "create_group g1",
        "frobnicate g1",                // unknown command
        "create_group",                 // too few arguments
        "create_group a b",             // too many
        "list_groups extra",            // too many
        "upload_file \"my file.txt\"",  // too few
        "upload_file \"my file.txt g1", // unterminated quote
        "upload_file \"my file.txt\" g1",
        "list_files g1",
        "logout now",
    ]);
    out.check(
        &[
            "user alice created",
            "logged in as alice",
            "group g1 created",
            "uploaded my file.txt to group g1 (3 bytes, 1 pieces)",
            &tab(&["my file.txt", "3", "1", "1", SHA1_ABC]),
        ],
        7,
        1,
    );
    assert!(out.errors[0].contains("frobnicate"), "{:?}", out.errors);
    // Nothing but results on stdout, nothing but error lines (and log lines) on stderr.
    assert!(out.stdout.iter().all(|l| !l.starts_with("error")));
}

#[test]
fn batch_of_successes_exits_0() {
    let tracker = Tracker::start();
    tracker
        .run(&[
            "# setup",
            "create_user alice pw",
            "",
            "login alice pw",
            "create_group g1",
            "list_groups",
            "list_requests g1",
            "list_files g1",
            "show_downloads",
            "logout",
        ])
        .check(
            &[
                "user alice created",
                "logged in as alice",
                "group g1 created",
                "g1\towner=alice\tmembers=1\tyou=owner",
                "logged out alice",
            ],
            0,
            0,
        );
    // An empty batch succeeds too.
    tracker.run(&[]).check(&[], 0, 0);
}

#[test]
fn quit_ends_input() {
    let tracker = Tracker::start();
    tracker
        .run(&[
            "create_user alice pw",
            "quit now", // wrong argument count: an error, not a quit
            "quit",
            "create_user bob pw",
            "frobnicate",
        ])
        .check(&["user alice created"], 1, 1);
    tracker
        .run(&["create_user carol pw", "quit", "create_user bob pw"])
        .check(&["user carol created"], 0, 0);
    // bob was never created.
    tracker.run(&["login bob pw"]).check(&[], 1, 1);
    tracker
        .run(&["create_user bob pw"])
        .check(&["user bob created"], 0, 0);
}

// ---------------------------------------------------------------------------------------
// 6. Groups
// ---------------------------------------------------------------------------------------

#[test]
fn groups_requests_ownership_and_deletion() {
    let tracker = Tracker::start();
    tracker
        .run(&[
            "create_user alice pw",
            "create_user bob pw",
            "create_user carol pw",
            "create_user dave pw",
            "login alice pw",
            "create_group g2",
            "create_group g1",
            "create_group g1",   // taken
            "list_requests g1",  // none yet: no output
            "join_group g1",     // already a member (owner)
            "join_group nosuch", // no such group
            "list_requests nosuch",
            "list_groups",
        ])
        .check(
            &[
                "user alice created",
                "user bob created",
                "user carol created",
                "user dave created",
                "logged in as alice",
                "group g2 created",
                "group g1 created",
                "g1\towner=alice\tmembers=1\tyou=owner",
                "g2\towner=alice\tmembers=1\tyou=owner",
            ],
            4,
            1,
        );
    tracker
        .run(&[
            "login bob pw",
            "join_group g1",
            "join_group g1",         // already requested
            "list_requests g1",      // not the owner
            "accept_request g1 bob", // not the owner
            "reject_request g1 bob", // not the owner
            "list_groups",
        ])
        .check(
            &[
                "logged in as bob",
                "request to join group g1 sent",
                "g1\towner=alice\tmembers=1\tyou=requested",
                "g2\towner=alice\tmembers=1\tyou=-",
            ],
            4,
            1,
        );
    tracker.run(&["login carol pw", "join_group g1"]).check(
        &["logged in as carol", "request to join group g1 sent"],
        0,
        0,
    );
    tracker
        .run(&["login dave pw", "join_group g1", "leave_group g1"])
        .check(
            &["logged in as dave", "request to join group g1 sent"],
            1,
            1,
        );
    tracker
        .run(&[
            "login alice pw",
            "list_requests g1",
            "accept_request g1 nobody", // no such request
            "accept_request g1 alice",  // no such request (already a member)
            "accept_request g1 carol",
            "reject_request g1 dave",
            "accept_request g1 dave", // was rejected: no such request
            "reject_request g1 dave",
            "accept_request g1 bob",
            "accept_request g1 bob", // already accepted
            "list_requests g1",
            "list_groups",
            // The owner leaves: carol, accepted before bob, becomes the owner.
            "leave_group g1",
            "leave_group g1", // not a member any more
            "list_groups",
            // The last member leaves: the group is deleted.
            "leave_group g2",
            "list_groups",
            "list_files g2",
        ])
        .check(
            &[
                "logged in as alice",
                "bob",
                "carol",
                "dave",
                "carol accepted into group g1",
                "request of dave to join group g1 rejected",
                "bob accepted into group g1",
                "g1\towner=alice\tmembers=3\tyou=owner",
                "g2\towner=alice\tmembers=1\tyou=owner",
                "left group g1",
                "g1\towner=carol\tmembers=2\tyou=-",
                "g2\towner=alice\tmembers=1\tyou=owner",
                "left group g2",
                "g1\towner=carol\tmembers=2\tyou=-",
            ],
            7,
            1,
        );
    tracker
        .run(&[
            "login dave pw",
            "list_groups",
            "join_group g1", // a rejected user may ask again
            "join_group g2", // deleted
        ])
        .check(
            &[
                "logged in as dave",
                "g1\towner=carol\tmembers=2\tyou=-",
                "request to join group g1 sent",
            ],
            1,
            1,
        );
    tracker
        .run(&[
            "login carol pw",
            "list_groups",
            "list_requests g1",
            "leave_group g1",
            "list_groups",
        ])
        .check(
            &[
                "logged in as carol",
                "g1\towner=carol\tmembers=2\tyou=owner",
                "dave",
                "left group g1",
                "g1\towner=bob\tmembers=1\tyou=-",
            ],
            0,
            0,
        );
    tracker
        .run(&[
            "login bob pw",
            "list_requests g1", // bob inherited the pending request
            "leave_group g1",
            "list_groups",
            "create_group g1", // the id is free again
            "list_groups",
        ])
        .check(
            &[
                "logged in as bob",
                "dave",
                "left group g1",
                "group g1 created",
                "g1\towner=bob\tmembers=1\tyou=owner",
            ],
            0,
            0,
        );
}

// ---------------------------------------------------------------------------------------
// 7. Files
// ---------------------------------------------------------------------------------------

/// Asserts that each line starts with the wanted text (list_files may add fields).
#[track_caller]
fn check_prefixes(got: &[String], want: &[String]) {
    assert_eq!(got.len(), want.len(), "got {got:#?}\nwant {want:#?}");
    for (g, w) in got.iter().zip(want) {
        assert!(g.starts_with(w.as_str()), "got {g:?}, want {w:?}");
    }
}

#[test]
fn files_upload_list_share_and_stop() {
    let tracker = Tracker::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("abc.txt"), "abc").unwrap();
    std::fs::write(d.join("empty.bin"), "").unwrap();
    // 1.5 MiB: three 512 KiB pieces.
    let big: Vec<u8> = (0..1_572_864u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(d.join("big.bin"), &big).unwrap();
    std::fs::create_dir(d.join("bob")).unwrap();
    std::fs::write(d.join("bob/abc.txt"), "abc").unwrap();
    std::fs::write(d.join("bob/big.bin"), "not the same content").unwrap();
    std::fs::create_dir(d.join("adir")).unwrap();
    // Without sha1sum only the fields before the digest are checked for big.bin.
    let big_sha1 = sha1sum(&d.join("big.bin"));
    let abc = |online: &str, sharers: &str| tab(&["abc.txt", "3", online, sharers, SHA1_ABC]);
    let empty = |online: &str| tab(&["empty.bin", "0", online, "1", SHA1_EMPTY]);
    let big_line = |online: &str| match &big_sha1 {
        Some(h) => tab(&["big.bin", "1572864", online, "1", h]),
        None => tab(&["big.bin", "1572864", online, "1", ""]),
    };

    let mut alice = tracker.client().cwd(d);
    let mut bob = tracker.client().cwd(&d.join("bob"));
    let mut carol = tracker.client().cwd(d);

    let out = alice.run(&[
        "create_user alice pw",
        "create_user bob pw",
        "create_user carol pw",
        "login alice pw",
        "create_group g1",
        "list_files g1",              // empty: no output
        "upload_file missing.txt g1", // no such file
        "upload_file adir g1",        // a directory
        "upload_file abc.txt nosuch", // no such group
        "upload_file abc.txt g1",
        "upload_file empty.bin g1",
        "upload_file big.bin g1",
        "upload_file abc.txt g1", // again, same content: still one sharer
        "list_files g1",
    ]);
    assert_eq!(out.errors.len(), 3, "{out:#?}");
    assert_eq!(out.code(), Some(1), "{out:#?}");
    assert_eq!(
        out.stdout[..9],
        [
            "user alice created",
            "user bob created",
            "user carol created",
            "logged in as alice",
            "group g1 created",
            "uploaded abc.txt to group g1 (3 bytes, 1 pieces)",
            "uploaded empty.bin to group g1 (0 bytes, 0 pieces)",
            "uploaded big.bin to group g1 (1572864 bytes, 3 pieces)",
            "sharing abc.txt in group g1 (same content as the file already there)",
        ],
        "{out:#?}"
    );
    check_prefixes(
        &out.stdout[9..],
        &[abc("1", "1"), big_line("1"), empty("1")],
    );

    // alice's client has exited, so her shares are offline; carol is not a member yet.
    carol
        .run(&["login carol pw", "list_files g1", "join_group g1"])
        .check(
            &["logged in as carol", "request to join group g1 sent"],
            1,
            1,
        );
    bob.run(&["login bob pw", "join_group g1"]).check(
        &["logged in as bob", "request to join group g1 sent"],
        0,
        0,
    );

    // alice logs in again from the same client address: the client remembers her three shares
    // (its state directory), so they are served and online again.
    let mut live = alice.live();
    live.cmd(
        "login alice pw",
        &["logged in as alice (3 shared files resumed)"],
    );
    // Sharing the same file again changes nothing.
    live.cmd(
        "upload_file abc.txt g1",
        &["sharing abc.txt in group g1 (same content as the file already there)"],
    );
    live.cmd("accept_request g1 bob", &["bob accepted into group g1"]);
    live.cmd("accept_request g1 carol", &["carol accepted into group g1"]);

    // bob shares the same content under the same name: two sharers. Different content under
    // a taken name is refused; he cannot stop sharing what he does not share.
    let out = bob.run(&[
        "login bob pw",
        "list_files g1",
        "upload_file abc.txt g1",
        "upload_file big.bin g1",
        "stop_share g1 empty.bin",
        "stop_share g1 nosuch.bin",
        "list_files g1",
    ]);
    assert_eq!(out.errors.len(), 3, "{out:#?}");
    assert_eq!(out.code(), Some(1), "{out:#?}");
    assert_eq!(out.stdout.len(), 8, "{out:#?}");
    assert_eq!(out.stdout[0], "logged in as bob");
    check_prefixes(
        &out.stdout[1..4],
        &[abc("1", "1"), big_line("1"), empty("1")],
    );
    assert_eq!(
        out.stdout[4],
        "sharing abc.txt in group g1 (same content as the file already there)"
    );
    check_prefixes(
        &out.stdout[5..],
        &[abc("2", "2"), big_line("1"), empty("1")],
    );

    // bob's client exited: one of the two abc.txt sharers is online.
    live.send("list_files g1");
    check_prefixes(
        &live.next_outs(3),
        &[abc("1", "2"), big_line("1"), empty("1")],
    );

    // alice logs out: carol sees her shares go offline.
    live.cmd("logout", &["logged out alice"]);
    let out = carol.run(&["login carol pw", "list_files g1"]);
    assert_eq!(out.code(), Some(0), "{out:#?}");
    check_prefixes(
        &out.stdout[1..],
        &[abc("0", "2"), big_line("0"), empty("0")],
    );

    // She logs in again on the same client: her shares resume.
    live.cmd(
        "login alice pw",
        &["logged in as alice (3 shared files resumed)"],
    );
    let out = carol.run(&["login carol pw", "list_files g1"]);
    assert_eq!(out.code(), Some(0), "{out:#?}");
    check_prefixes(
        &out.stdout[1..],
        &[abc("1", "2"), big_line("1"), empty("1")],
    );

    // stop_share: a file nobody shares any more disappears; one still shared by bob stays.
    live.cmd(
        "stop_share g1 empty.bin",
        &["stopped sharing empty.bin in group g1"],
    );
    live.cmd(
        "stop_share g1 abc.txt",
        &["stopped sharing abc.txt in group g1"],
    );
    live.send("stop_share g1 abc.txt");
    live.expect_error();
    live.send("list_files g1");
    check_prefixes(&live.next_outs(2), &[abc("0", "1"), big_line("1")]);
    let (status, rest) = live.finish();
    assert_eq!(status.code(), Some(1), "{rest:?}");
    assert!(rest.is_empty(), "{rest:?}");

    // Logged in from another address, alice's shares are not online: they live on the
    // client that holds the files.
    let out = tracker.run(&["login alice pw", "list_files g1"]);
    assert_eq!(out.code(), Some(0), "{out:#?}");
    check_prefixes(&out.stdout[1..], &[abc("0", "1"), big_line("0")]);
    // From her own client's address again: online.
    let out = alice.run(&["login alice pw", "list_files g1"]);
    assert_eq!(out.code(), Some(0), "{out:#?}");
    check_prefixes(&out.stdout[1..], &[abc("0", "1"), big_line("1")]);

    // bob stops sharing abc.txt: nobody shares it, it disappears.
    let out = bob.run(&["login bob pw", "stop_share g1 abc.txt", "list_files g1"]);
    assert_eq!(out.code(), Some(0), "{out:#?}");
    assert_eq!(out.stdout[1], "stopped sharing abc.txt in group g1");
    check_prefixes(&out.stdout[2..], &[big_line("0")]);
}

#[test]
fn file_commands_need_membership_and_leaving_ends_shares() {
    let tracker = Tracker::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("abc.txt"), "abc").unwrap();
    std::fs::write(dir.path().join("bob.txt"), "bob's").unwrap();
    // One client address for both users, in turn.
    let mut client = tracker.client().cwd(dir.path());
    client
        .run(&[
            "create_user alice pw",
            "create_user bob pw",
            "login alice pw",
            "create_group g1",
            "upload_file abc.txt g1",
        ])
        .check(
            &[
                "user alice created",
                "user bob created",
                "logged in as alice",
                "group g1 created",
                "uploaded abc.txt to group g1 (3 bytes, 1 pieces)",
            ],
            0,
            0,
        );
    // Not a member: every file command is refused.
    client
        .run(&[
            "login bob pw",
            "upload_file abc.txt g1",
            "list_files g1",
            "stop_share g1 abc.txt",
            "leave_group g1",
            "join_group g1",
        ])
        .check(&["logged in as bob", "request to join group g1 sent"], 4, 1);
    // The same client address: it remembers alice's share.
    client
        .run(&["login alice pw", "accept_request g1 bob"])
        .check(
            &[
                "logged in as alice (1 shared files resumed)",
                "bob accepted into group g1",
            ],
            0,
            0,
        );
    // bob shares abc.txt too, and a file of his own; then he leaves: his shares end.
    client
        .run(&[
            "login bob pw",
            "upload_file abc.txt g1",
            "upload_file bob.txt g1",
            "list_files g1",
            "leave_group g1",
            "list_files g1",
        ])
        .check(
            &[
                "logged in as bob",
                "sharing abc.txt in group g1 (same content as the file already there)",
                "uploaded bob.txt to group g1 (5 bytes, 1 pieces)",
                &tab(&["abc.txt", "3", "1", "2", SHA1_ABC]),
                &tab(&["bob.txt", "5", "1", "1", SHA1_BOB]),
                "left group g1",
            ],
            1,
            1,
        );
    // Only alice shares abc.txt now; bob.txt, shared by nobody, is gone.
    client
        .run(&["login alice pw", "list_files g1", "list_groups"])
        .check(
            &[
                "logged in as alice (1 shared files resumed)",
                &tab(&["abc.txt", "3", "1", "1", SHA1_ABC]),
                "g1\towner=alice\tmembers=1\tyou=owner",
            ],
            0,
            0,
        );
}

// ---------------------------------------------------------------------------------------
// 9. Many clients at once
// ---------------------------------------------------------------------------------------

#[test]
fn two_hundred_concurrent_clients() {
    const N: usize = 200;
    let tracker = Tracker::start();
    let ports = free_ports(N);
    let batches: Vec<[String; 4]> = (0..N)
        .map(|i| {
            [
                format!("create_user u{i:03} pw{i}"),
                format!("login u{i:03} pw{i}"),
                format!("create_group g{i:03}"),
                "list_groups".to_owned(),
            ]
        })
        .collect();
    let mut clients: Vec<Client> = ports
        .iter()
        .map(|p| Client::with_addr(&tracker.info, ([127, 0, 0, 1], *p).into()))
        .collect();
    let started = Instant::now();
    let running: Vec<Running> = clients
        .iter()
        .zip(&batches)
        .map(|(c, b)| {
            let cmds: Vec<&str> = b.iter().map(String::as_str).collect();
            c.spawn(&cmds)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let outcomes: Vec<Outcome> = running.into_iter().map(|r| r.finish(deadline)).collect();
    let elapsed = started.elapsed();
    for (i, out) in outcomes.into_iter().enumerate() {
        let out = if out.addr_in_use() {
            // The listen port was taken meanwhile: run this one again on another port.
            clients[i].addr = free_addr();
            let cmds: Vec<&str> = batches[i].iter().map(String::as_str).collect();
            clients[i].run(&cmds)
        } else {
            out
        };
        assert_eq!(out.code(), Some(0), "client {i}: {out:#?}");
        assert_eq!(out.errors.len(), 0, "client {i}: {out:#?}");
        assert_eq!(
            &out.stdout[..3],
            &[
                format!("user u{i:03} created"),
                format!("logged in as u{i:03}"),
                format!("group g{i:03} created"),
            ],
            "client {i}"
        );
        // Its own group is listed, as owner.
        let own = format!("g{i:03}\towner=u{i:03}\tmembers=1\tyou=owner");
        assert!(out.stdout[3..].contains(&own), "client {i}: {out:#?}");
    }
    let out = tracker.run(&["create_user last pw", "login last pw", "list_groups"]);
    assert_eq!(out.code(), Some(0), "{out:#?}");
    let want: Vec<String> = (0..N)
        .map(|i| format!("g{i:03}\towner=u{i:03}\tmembers=1\tyou=-"))
        .collect();
    assert_eq!(&out.stdout[2..], &want[..]);
    eprintln!("{N} concurrent clients finished in {elapsed:?}");
}

// ---------------------------------------------------------------------------------------
// 10. Garbage on the tracker port
// ---------------------------------------------------------------------------------------

/// Whether the tracker closed this connection within `timeout` (EOF or a reset).
fn closed_within(stream: &mut TcpStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // whatever it says, keep waiting for the close
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

#[test]
fn garbage_on_the_tracker_port() {
    let mut tracker = Tracker::start();
    let connect = || TcpStream::connect(tracker.addr).expect("connect to tracker");

    // Random bytes (a fixed xorshift sequence).
    let mut random = connect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..8192)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let _ = random.write_all(&bytes);

    // An absurd length prefix.
    let mut huge = connect();
    let _ = huge.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]);

    // A zero length prefix.
    let mut zero = connect();
    let _ = zero.write_all(&[0, 0, 0, 0]);

    // A well-framed message of an unknown type.
    let mut unknown = connect();
    let _ = unknown.write_all(&[0, 0, 0, 3, 0xee, 1, 2]);

    // Half a frame, then nothing.
    let mut half = connect();
    let _ = half.write_all(&[0, 0, 0, 100, 1, 2, 3, 4, 5]);

    // Connected and silent.
    let mut idle = connect();

    // Meanwhile, a client is served normally.
    tracker
        .run(&[
            "create_user alice pw",
            "login alice pw",
            "create_group g1",
            "list_groups",
        ])
        .check(
            &[
                "user alice created",
                "logged in as alice",
                "group g1 created",
                "g1\towner=alice\tmembers=1\tyou=owner",
            ],
            0,
            0,
        );

    // The bad connections are closed: at once for the malformed ones, at the handshake
    // timeout (10 s) for the stalled ones.
    for (name, stream) in [
        ("random", &mut random),
        ("huge", &mut huge),
        ("zero", &mut zero),
        ("unknown", &mut unknown),
        ("half", &mut half),
        ("idle", &mut idle),
    ] {
        assert!(
            closed_within(stream, Duration::from_secs(30)),
            "{name} connection still open"
        );
    }

    // The tracker is still up and serving.
    assert!(tracker.is_running());
    tracker.run(&["login alice pw", "list_groups"]).check(
        &[
            "logged in as alice",
            "g1\towner=alice\tmembers=1\tyou=owner",
        ],
        0,
        0,
    );
    assert_eq!(tracker.quit().code(), Some(0));
}

// ---------------------------------------------------------------------------------------
// 11. Passwords stay out of logs
// ---------------------------------------------------------------------------------------

#[test]
fn passwords_never_appear_in_logs() {
    const SECRET: &str = "Zq7-secret-passphrase-Xk2";
    const WRONG: &str = "Wrong-guess-passphrase-Jm4";
    let dir = tempfile::tempdir().unwrap();
    let tracker_log = dir.path().join("tracker.log");
    let client_log = dir.path().join("client.log");
    let mut tracker = Tracker::start_with(&[
        OsString::from("--log-level"),
        OsString::from("trace"),
        OsString::from("--log-file"),
        tracker_log.clone().into_os_string(),
    ]);
    let mut client = tracker.client().options(&[
        OsString::from("--log-level"),
        OsString::from("trace"),
        OsString::from("--log-file"),
        client_log.clone().into_os_string(),
    ]);
    client
        .run(&[
            &format!("create_user alice {SECRET}"),
            &format!("login alice {WRONG}"),
            &format!("login alice {SECRET}"),
            "create_group g1",
            "logout",
        ])
        .check(
            &[
                "user alice created",
                "logged in as alice",
                "group g1 created",
                "logged out alice",
            ],
            1,
            1,
        );
    assert_eq!(tracker.quit().code(), Some(0));
    let tlog = std::fs::read_to_string(&tracker_log).unwrap();
    assert!(
        tlog.contains("listening on"),
        "tracker log is empty: {tlog}"
    );
    assert!(
        tlog.contains("alice"),
        "tracker log has no trace of the requests: {tlog}"
    );
    for log in [&tlog, &std::fs::read_to_string(&client_log).unwrap()] {
        assert!(!log.contains(SECRET), "password in a log:\n{log}");
        assert!(!log.contains(WRONG), "wrong password in a log:\n{log}");
    }
    // Nor on the tracker's stderr.
    assert!(!tracker.stderr().contains(SECRET));
}

// ---------------------------------------------------------------------------------------
// More bad input
// ---------------------------------------------------------------------------------------

#[test]
fn hostile_command_lines() {
    let tracker = Tracker::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tab\there.txt"), "abc").unwrap();
    let mut input: Vec<u8> = Vec::new();
    input.extend_from_slice(b"create_user alice pw\r\n"); // CRLF line ending
    input.extend_from_slice(b"login alice pw\r\n");
    input.extend(std::iter::repeat_n(b'a', 70_000)); // longer than any command line may be
    input.push(b'\n');
    input.extend_from_slice(b"create_user bad\x01id pw\n"); // control character
    input.extend_from_slice(b"create_group g\x001\n"); // NUL
    input.extend_from_slice(b"create_group \"\"\n"); // empty id
    input.extend_from_slice(format!("create_group {}\n", "g".repeat(65)).as_bytes());
    input.extend_from_slice(b"upload_file \"tab\there.txt\" g1\n"); // no group yet, bad name
    input.extend_from_slice(b"stop_share g1 ..\n"); // not a base name
    input.extend_from_slice(format!("create_group {}\n", "g".repeat(64)).as_bytes());
    input.extend_from_slice(b"create_group g1\n");
    input.extend_from_slice(b"upload_file \"tab\there.txt\" g1\n"); // a tab in the name
    input.extend_from_slice(b"create_user \"bob\" \"pass word\"\n"); // quoted password
    input.extend_from_slice(b"logout\n");
    input.extend_from_slice(b"login bob \"pass word\"\n");
    input.extend_from_slice(b"list_groups"); // no final newline
    let mut client = tracker.client().cwd(dir.path());
    let out = client.run_raw(&input);
    let long_group = "g".repeat(64);
    out.check(
        &[
            "user alice created",
            "logged in as alice",
            &format!("group {long_group} created"),
            "group g1 created",
            "user bob created",
            "logged out alice",
            "logged in as bob",
            "g1\towner=alice\tmembers=1\tyou=-",
            &format!("{long_group}\towner=alice\tmembers=1\tyou=-"),
        ],
        8,
        1,
    );
}

#[test]
fn nul_sentinel_lines_are_ordinary_bad_commands() {
    let tracker = Tracker::start();
    let out = tracker.client().run_raw(
        b"create_user alice pw\n\0eof\ncreate_user bob pw\n\0too-long\ncreate_user carol pw\n",
    );
    // Each odd line is one bad command; the loop goes on.
    out.check(
        &[
            "user alice created",
            "user bob created",
            "user carol created",
        ],
        2,
        1,
    );
    assert!(
        out.errors.iter().all(|e| !e.contains("too long")),
        "{:?}",
        out.errors
    );
}

#[test]
fn client_without_a_reachable_tracker() {
    let dir = tempfile::tempdir().unwrap();
    let info = dir.path().join("tracker_info.txt");
    // Nothing listens there.
    std::fs::write(&info, format!("{}\n", free_addr())).unwrap();
    let started = Instant::now();
    let out = Client::new(&info).run(&[
        "create_user alice pw",
        "show_downloads",
        "login alice pw",
        "list_groups",
    ]);
    out.check(&[], 3, 1);
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn client_uses_the_first_tracker_that_answers() {
    let tracker = Tracker::start();
    let dir = tempfile::tempdir().unwrap();
    let info = dir.path().join("tracker_info.txt");
    // A dead tracker first, the live one second, in the `IP PORT` form, with a comment and
    // blank lines.
    std::fs::write(
        &info,
        format!(
            "# two trackers\n\n{}\n   \n{} {}\n",
            free_addr(),
            tracker.addr.ip(),
            tracker.addr.port()
        ),
    )
    .unwrap();
    Client::new(&info)
        .run(&["create_user alice pw", "login alice pw", "list_groups"])
        .check(&["user alice created", "logged in as alice"], 0, 0);
    // The same state through the tracker's own file.
    tracker
        .run(&["login alice pw"])
        .check(&["logged in as alice"], 0, 0);
}

/// What a fake tracker does with one accepted connection.
type Serve = fn(TcpStream);

/// A fake tracker on a loopback port: every connection it accepts is handed to `serve`.
struct FakeTracker {
    addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl FakeTracker {
    fn start(serve: Serve) -> FakeTracker {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut accepted = 0;
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        accepted += 1;
                        stream.set_nonblocking(false).unwrap();
                        std::thread::spawn(move || serve(stream));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            accepted
        });
        FakeTracker {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops accepting; returns how many connections were accepted.
    fn stop(mut self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for FakeTracker {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Reads what the client sends (its hello and first request) before answering.
fn read_some(stream: &mut TcpStream) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 256];
    let _ = stream.read(&mut buf);
}

#[test]
fn client_survives_a_tracker_that_talks_garbage() {
    let behaviours: [(&str, Serve); 5] = [
        ("closes at once", |s| drop(s)),
        ("huge length prefix", |mut s| {
            read_some(&mut s);
            let _ = s.write_all(&[0xff, 0xff, 0xff, 0xff, 0x81]);
        }),
        ("empty frame", |mut s| {
            read_some(&mut s);
            let _ = s.write_all(&[0, 0, 0, 0]);
        }),
        ("unknown frame type", |mut s| {
            read_some(&mut s);
            let _ = s.write_all(&[0, 0, 0, 3, 0xee, 1, 2]);
            read_some(&mut s);
        }),
        ("reply before welcome", |mut s| {
            read_some(&mut s);
            let mut f = vec![0, 0, 0, 9, 0x90];
            f.extend_from_slice(&1u64.to_be_bytes());
            let _ = s.write_all(&f);
            read_some(&mut s);
        }),
    ];
    for (name, serve) in behaviours {
        let fake = FakeTracker::start(serve);
        let dir = tempfile::tempdir().unwrap();
        let info = dir.path().join("tracker_info.txt");
        std::fs::write(&info, format!("{}\n", fake.addr)).unwrap();
        let started = Instant::now();
        let out =
            Client::new(&info).run(&["create_user alice pw", "show_downloads", "login alice pw"]);
        assert_eq!(out.stdout, Vec::<String>::new(), "{name}: {out:#?}");
        assert_eq!(out.errors.len(), 2, "{name}: {out:#?}");
        assert_eq!(out.code(), Some(1), "{name}: {out:#?}");
        assert!(
            started.elapsed() < Duration::from_secs(25),
            "{name}: took {:?}",
            started.elapsed()
        );
        assert!(fake.stop() >= 1, "{name}: the client never connected");
    }
}

#[test]
fn client_survives_its_tracker_quitting() {
    let mut tracker = Tracker::start();
    let mut client = tracker.client();
    let mut live = client.live();
    live.cmd("create_user alice pw", &["user alice created"]);
    live.cmd("login alice pw", &["logged in as alice"]);
    assert_eq!(tracker.quit().code(), Some(0));
    // Each command now fails with one error line; nothing hangs.
    live.send("list_groups");
    live.expect_error();
    live.send("create_user bob pw");
    live.expect_error();
    let (status, rest) = live.finish();
    assert_eq!(status.code(), Some(1));
    assert!(rest.is_empty(), "{rest:?}");
}

#[test]
fn quit_from_a_live_client_exits_without_end_of_input() {
    let tracker = Tracker::start();
    let mut client = tracker.client();
    let mut live = client.live();
    live.cmd("create_user alice pw", &["user alice created"]);
    // One write, so that the pipe is not closed under the second line.
    live.send("quit\ncreate_user bob pw");
    // stdin stays open: the client exits because of `quit`.
    let (status, rest) = live.wait();
    assert_eq!(status.code(), Some(0));
    assert!(rest.is_empty(), "{rest:?}");
    tracker
        .run(&["create_user bob pw"])
        .check(&["user bob created"], 0, 0);
}

#[test]
fn serve_keeps_the_client_running_until_sigterm() {
    let tracker = Tracker::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("abc.txt"), "abc").unwrap();
    let mut client = tracker
        .client()
        .cwd(dir.path())
        .options(&[OsString::from("--serve")]);
    let mut live = client.live();
    live.cmd("create_user alice pw", &["user alice created"]);
    live.cmd("create_user bob pw", &["user bob created"]);
    live.cmd("login alice pw", &["logged in as alice"]);
    live.cmd("create_group g1", &["group g1 created"]);
    live.cmd(
        "upload_file abc.txt g1",
        &["uploaded abc.txt to group g1 (3 bytes, 1 pieces)"],
    );
    live.cmd("list_requests g1", &[]);
    live.close_stdin();
    // Input has ended, but the client keeps alice's session and shares.
    tracker
        .run(&["login alice pw", "login bob pw", "join_group g1"])
        .check(&["logged in as bob", "request to join group g1 sent"], 1, 1);
    assert!(live.try_status().is_none(), "--serve client exited");
    common::send_sigterm(live.pid());
    let (status, rest) = live.wait();
    assert_eq!(status.code(), Some(0), "{rest:?}");
    assert!(rest.is_empty(), "{rest:?}");
    // Gone: alice may log in elsewhere.
    tracker
        .run(&["login alice pw"])
        .check(&["logged in as alice"], 0, 0);
}

// ---------------------------------------------------------------------------------------
// Raw protocol abuse (frames written by hand: `u32 length | u8 type | body`, big-endian)
// ---------------------------------------------------------------------------------------

/// `Hello`: magic "P2PG", version, role 1 (client), client id.
fn hello_frame(magic: u32, version: u16) -> Vec<u8> {
    let mut f = vec![0, 0, 0, 16, 0x01];
    f.extend_from_slice(&magic.to_be_bytes());
    f.extend_from_slice(&version.to_be_bytes());
    f.push(1);
    f.extend_from_slice(&0x00c1_1e47u64.to_be_bytes());
    f
}

const MAGIC: u32 = 0x5032_5047;
use p2pshare::wire::PROTOCOL_VERSION;

/// `Ping` with a request id.
fn ping_frame(req_id: u64) -> Vec<u8> {
    let mut f = vec![0, 0, 0, 9, 0x10];
    f.extend_from_slice(&req_id.to_be_bytes());
    f
}

/// Reads one frame's payload (type byte + body).
fn read_frame(stream: &mut TcpStream) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).expect("frame length");
    let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut payload).expect("frame payload");
    payload
}

#[test]
fn bad_handshakes_and_bad_frames_after_one() {
    let mut tracker = Tracker::start();
    let connect = || TcpStream::connect(tracker.addr).expect("connect to tracker");

    // A correct handshake and a ping are answered (this checks the hand-made frames).
    let mut good = connect();
    good.write_all(&hello_frame(MAGIC, PROTOCOL_VERSION))
        .unwrap();
    assert_eq!(read_frame(&mut good)[0], 0x81, "expected Welcome");
    good.write_all(&ping_frame(77)).unwrap();
    let pong = read_frame(&mut good);
    assert_eq!(pong[0], 0x92, "expected Pong");
    assert_eq!(pong[1..9], 77u64.to_be_bytes());

    let mut bad_magic = connect();
    bad_magic
        .write_all(&hello_frame(0xdead_beef, PROTOCOL_VERSION))
        .unwrap();
    let mut bad_version = connect();
    bad_version.write_all(&hello_frame(MAGIC, 999)).unwrap();
    let mut request_first = connect();
    request_first.write_all(&ping_frame(1)).unwrap();
    let mut two_hellos = connect();
    two_hellos
        .write_all(&hello_frame(MAGIC, PROTOCOL_VERSION))
        .unwrap();
    two_hellos
        .write_all(&hello_frame(MAGIC, PROTOCOL_VERSION))
        .unwrap();
    let mut then_garbage = connect();
    then_garbage
        .write_all(&hello_frame(MAGIC, PROTOCOL_VERSION))
        .unwrap();
    then_garbage
        .write_all(&[0, 0, 0, 5, 0x1a, 1, 2, 3, 4])
        .unwrap(); // truncated req_id
    let mut then_huge = connect();
    then_huge
        .write_all(&hello_frame(MAGIC, PROTOCOL_VERSION))
        .unwrap();
    then_huge
        .write_all(&[0x7f, 0xff, 0xff, 0xff, 0x10])
        .unwrap(); // 2 GiB frame
    let mut then_bad_login = connect();
    then_bad_login
        .write_all(&hello_frame(MAGIC, PROTOCOL_VERSION))
        .unwrap();
    // Login with a user id of 200 bytes (ids are at most 64).
    let mut login = vec![0x12];
    login.extend_from_slice(&5u64.to_be_bytes());
    login.extend_from_slice(&200u16.to_be_bytes());
    login.extend(std::iter::repeat_n(b'u', 200));
    let mut framed = (login.len() as u32).to_be_bytes().to_vec();
    framed.extend(login);
    then_bad_login.write_all(&framed).unwrap();

    for (name, stream) in [
        ("bad magic", &mut bad_magic),
        ("bad version", &mut bad_version),
        ("request before hello", &mut request_first),
        ("two hellos", &mut two_hellos),
        ("garbage after hello", &mut then_garbage),
        ("huge frame after hello", &mut then_huge),
        ("oversized id after hello", &mut then_bad_login),
    ] {
        // These close at once; allow for a loaded machine.
        assert!(
            closed_within(stream, Duration::from_secs(30)),
            "{name}: connection still open"
        );
    }

    // The good connection is unaffected.
    good.write_all(&ping_frame(78)).unwrap();
    assert_eq!(read_frame(&mut good)[0], 0x92);
    tracker
        .run(&["create_user alice pw"])
        .check(&["user alice created"], 0, 0);
    assert_eq!(tracker.quit().code(), Some(0));
}

#[test]
fn tracker_serves_others_while_a_client_never_reads() {
    let tracker = Tracker::start();
    let mut flooder = TcpStream::connect(tracker.addr).unwrap();
    flooder
        .write_all(&hello_frame(MAGIC, PROTOCOL_VERSION))
        .unwrap();
    assert_eq!(read_frame(&mut flooder)[0], 0x81);
    // Pipeline pings and never read the pongs, until the tracker stops taking them.
    flooder
        .set_write_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let batch: Vec<u8> = (0..10_000u64).flat_map(ping_frame).collect();
    let mut sent = 0usize;
    let started = Instant::now();
    // A write error means it blocked (timed out): the tracker pushed back.
    while let Ok(n) = flooder.write(&batch) {
        sent += n;
        assert!(
            started.elapsed() < Duration::from_secs(60) && sent < 1 << 30,
            "the tracker kept reading without limit ({sent} bytes)"
        );
    }
    // Meanwhile everyone else is served.
    tracker
        .run(&["create_user alice pw", "login alice pw", "list_groups"])
        .check(&["user alice created", "logged in as alice"], 0, 0);
    drop(flooder);
    tracker
        .run(&["login alice pw"])
        .check(&["logged in as alice"], 0, 0);
}

/// A request larger than the handshake's 1 KiB limit sent right behind the hello, in the same
/// write (as a client does when it fails over with an upload in flight), is judged by the
/// limit the hello raised: it is answered, the connection is not closed.
#[test]
fn a_large_request_in_the_same_read_as_the_hello_is_answered() {
    use p2pshare::wire::tracker_link::{
        ClientMsg, FileMeta, Reply, ReplyBody, Request, RequestBody, TrackerMsg,
    };
    use p2pshare::wire::{FileName, GroupId, Sha1Digest, PIECE_LEN};
    let tracker = Tracker::start();
    let n_pieces = 200u32; // 200 * 20 bytes of hashes: about 4 KiB
    let meta = FileMeta {
        name: FileName::new("big.bin").unwrap(),
        size: u64::from(n_pieces) * u64::from(PIECE_LEN),
        piece_len: PIECE_LEN,
        file_sha1: Sha1Digest::default(),
        piece_hashes: vec![Sha1Digest::default(); n_pieces as usize],
    };
    let mut bytes = Vec::new();
    ClientMsg::hello(0x0b16).emit(&mut bytes);
    ClientMsg::Request(Request {
        req_id: 1,
        body: RequestBody::UploadFile {
            group: GroupId::new("g").unwrap(),
            meta,
        },
    })
    .emit(&mut bytes);
    assert!(bytes.len() > 4000);
    let mut stream = TcpStream::connect(tracker.addr).unwrap();
    stream.write_all(&bytes).unwrap();
    let welcome = TrackerMsg::parse(&read_frame(&mut stream)).unwrap();
    assert!(matches!(welcome, TrackerMsg::Welcome { .. }), "{welcome:?}");
    // Not logged in: refused, but answered on a connection that lives on.
    match TrackerMsg::parse(&read_frame(&mut stream)).unwrap() {
        TrackerMsg::Reply(Reply {
            req_id: 1,
            body: ReplyBody::Refused { .. },
        }) => {}
        other => panic!("unexpected {other:?}"),
    }
    stream.write_all(&ping_frame(2)).unwrap();
    let pong = TrackerMsg::parse(&read_frame(&mut stream)).unwrap();
    assert!(
        matches!(
            pong,
            TrackerMsg::Reply(Reply {
                req_id: 2,
                body: ReplyBody::Pong
            })
        ),
        "{pong:?}"
    );
}
