//! End-to-end tests of tracker replication and client failover with the real binaries on
//! 127.0.0.1, against SPEC.md's "Trackers" section: several trackers are one service (a change
//! printed by one client is visible through every live tracker at once), the service survives
//! trackers being killed with SIGKILL (clients move to another tracker within two seconds,
//! keeping their session and shares, no command lost or applied twice), a tracker that
//! (re)starts copies the state before it serves, and the sessions held by a dead tracker end
//! after the grace period when nobody resumes them.
//!
//! Every process is owned by a guard that kills it on drop (also on panic, when the trackers'
//! logs are printed); every wait is on a condition (an output line, an answer, a process
//! state) with a generous deadline.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{Client, Cluster, LiveClient};
use p2pshare::tracker::replica::SESSION_GRACE;
use sha1::{Digest, Sha1};
use tempfile::TempDir;

/// What the spec allows for a client to move to another tracker.
const FAILOVER: Duration = Duration::from_secs(2);
/// Slack on top of [`FAILOVER`] for a loaded CI machine.
const FAILOVER_SLACK: Duration = Duration::from_secs(3);
/// Deadline of a long step (a download, the end of a grace period) on a loaded machine.
const STEP: Duration = Duration::from_secs(40);

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A live client (stdin a pipe this test writes) of the trackers listed in `info`, running in
/// `dir` if given.
fn live(info: &Path, dir: Option<&Path>, serve: bool) -> LiveClient {
    let mut client = Client::new(info);
    if let Some(dir) = dir {
        client = client.cwd(dir);
    }
    if serve {
        client = client.options(&["--serve".into()]);
    }
    client.live()
}

/// A live client that creates `user` and logs in.
fn new_user(info: &Path, dir: Option<&Path>, serve: bool, user: &str) -> LiveClient {
    let mut c = live(info, dir, serve);
    c.cmd(
        &format!("create_user {user} pw"),
        &[&format!("user {user} created")],
    );
    c.cmd(
        &format!("login {user} pw"),
        &[&format!("logged in as {user}")],
    );
    c
}

/// A file of `len` pseudo-random bytes (a different stream per `seed`).
fn make_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    bytes.truncate(len);
    fs::write(path, &bytes).expect("write file");
    bytes
}

fn sha1_hex(bytes: &[u8]) -> String {
    Sha1::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The `upload_file` line of a file nobody shares yet (512 KiB pieces).
fn uploaded(name: &str, group: &str, size: usize) -> String {
    format!(
        "uploaded {name} to group {group} ({size} bytes, {} pieces)",
        size.div_ceil(512 * 1024)
    )
}

/// A `list_files` line.
fn file_line(name: &str, bytes: &[u8], online: u32, sharers: u32) -> String {
    format!(
        "{name}\t{}\t{online}\t{sharers}\t{}",
        bytes.len(),
        sha1_hex(bytes)
    )
}

/// A `list_groups` line.
fn group_line(group: &str, owner: &str, members: u32, you: &str) -> String {
    format!("{group}\towner={owner}\tmembers={members}\tyou={you}")
}

/// Sends a command and checks that exactly these lines answer it (nothing else may arrive
/// before them, no `error: ` line).
#[track_caller]
fn cmd_lines(c: &mut LiveClient, command: &str, expected: &[String]) {
    let refs: Vec<&str> = expected.iter().map(String::as_str).collect();
    c.cmd(command, &refs);
}

/// `list_files` of `group` (whose files are `n` lines): the lines.
#[track_caller]
fn list_files(c: &mut LiveClient, group: &str, n: usize) -> Vec<String> {
    c.send(&format!("list_files {group}"));
    c.next_outs(n)
}

/// Sets the flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A canonical temp dir (clients print absolute targets).
/// Asks tracker `no` alone (as a new user `check<no>`) for its groups: every one of `groups`
/// must be listed.
#[track_caller]
fn assert_lists_groups(cluster: &Cluster, no: usize, groups: &[String]) {
    let out = Client::new(&cluster.info_for(&[no])).run(&[
        &format!("create_user check{no} pw"),
        &format!("login check{no} pw"),
        "list_groups",
    ]);
    let listed: std::collections::HashSet<&str> = out
        .stdout
        .iter()
        .filter_map(|l| l.split('\t').next())
        .collect();
    for g in groups {
        assert!(
            listed.contains(g.as_str()),
            "tracker {no} does not list acknowledged group {g}: {out:#?}\n{}",
            cluster.logs()
        );
    }
}

fn tempdir() -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().canonicalize().expect("canonicalize");
    (dir, path)
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// Two trackers: every change a client made through tracker 1 is visible through tracker 2
/// the moment the client printed its result, and the other way round.
#[test]
fn change_through_one_tracker_is_visible_through_the_other_at_once() {
    let cluster = Cluster::start(2);
    let (_files, dir) = tempdir();
    let mut a = live(&cluster.info_for(&[1]), Some(&dir), false);
    let mut b = live(&cluster.info_for(&[2]), None, false);

    // Users: created through one tracker, logged in through the other at once.
    a.cmd("create_user alice pw", &["user alice created"]);
    b.cmd("login alice pw", &["logged in as alice"]);
    b.cmd("create_user bob pw", &["user bob created"]);
    a.cmd("login bob pw", &["logged in as bob"]);

    for i in 0..8 {
        // a = bob through tracker 1, b = alice through tracker 2.
        let g = format!("a{i}");
        a.cmd(
            &format!("create_group {g}"),
            &[&format!("group {g} created")],
        );
        b.cmd(
            &format!("join_group {g}"),
            &[&format!("request to join group {g} sent")],
        );
        a.cmd(&format!("list_requests {g}"), &["alice"]);
        a.cmd(
            &format!("accept_request {g} alice"),
            &[&format!("alice accepted into group {g}")],
        );
        // Only a member may leave: the acceptance is already known to tracker 2.
        b.cmd(&format!("leave_group {g}"), &[&format!("left group {g}")]);

        let h = format!("b{i}");
        b.cmd(
            &format!("create_group {h}"),
            &[&format!("group {h} created")],
        );
        a.cmd(
            &format!("join_group {h}"),
            &[&format!("request to join group {h} sent")],
        );
        b.cmd(&format!("list_requests {h}"), &["bob"]);
        b.cmd(
            &format!("accept_request {h} bob"),
            &[&format!("bob accepted into group {h}")],
        );
        let name = format!("f{i}.bin");
        let bytes = make_file(&dir.join(&name), 1000 + i * 700_000, i as u64);
        cmd_lines(
            &mut a,
            &format!("upload_file {name} {h}"),
            &[uploaded(&name, &h, bytes.len())],
        );
        cmd_lines(
            &mut b,
            &format!("list_files {h}"),
            &[file_line(&name, &bytes, 1, 1)],
        );
        a.cmd(
            &format!("stop_share {h} {name}"),
            &[&format!("stopped sharing {name} in group {h}")],
        );
        // The file is gone: the group's list is empty, so the next line is the group list.
        b.send(&format!("list_files {h}"));
        cmd_lines(&mut b, "list_groups", &expected_groups_ab(i, "alice"));
        cmd_lines(&mut a, "list_groups", &expected_groups_ab(i, "bob"));
    }
    // A logout through tracker 1 lets the user log in through tracker 2 at once.
    a.cmd("logout", &["logged out bob"]);
    b.cmd("logout", &["logged out alice"]);
    b.cmd("login bob pw", &["logged in as bob"]);
}

/// The `list_groups` answer of `test_change_through_one_tracker...` after round `i`.
fn expected_groups_ab(i: usize, user: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for j in 0..=i {
        let you = if user == "bob" { "owner" } else { "-" };
        lines.push(group_line(&format!("a{j}"), "bob", 1, you));
    }
    for j in 0..=i {
        let you = if user == "alice" { "owner" } else { "member" };
        lines.push(group_line(&format!("b{j}"), "alice", 2, you));
    }
    lines
}

/// Three trackers; the primary (tracker 1) is killed with SIGKILL while a `--serve` client is
/// logged in with a shared file and another client has a stream of commands under way. Every
/// command succeeds exactly once, the serving client keeps its session, and tracker 1, started
/// again, catches up with everything, including what changed while it was down.
#[test]
fn primary_killed_clients_keep_working_and_restarted_tracker_catches_up() {
    let mut cluster = Cluster::start(3);
    let all = cluster.info_for(&[1, 2, 3]);
    let (_files, dir) = tempdir();

    let mut sharer = new_user(&all, Some(&dir), true, "alice");
    sharer.cmd("create_group g", &["group g created"]);
    let f1 = make_file(&dir.join("f1.bin"), 1_300_000, 1);
    cmd_lines(
        &mut sharer,
        "upload_file f1.bin g",
        &[uploaded("f1.bin", "g", f1.len())],
    );

    // Bob's client runs one change after another, from a thread, across the kill.
    let worker = new_user(&all, None, false, "bob");
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let runner = {
        let (done, stop) = (Arc::clone(&done), Arc::clone(&stop));
        thread::spawn(move || {
            let mut worker = worker;
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                worker.cmd(
                    &format!("create_group w{n:03}"),
                    &[&format!("group w{n:03} created")],
                );
                n += 1;
                done.store(n, Ordering::SeqCst);
            }
            (worker, n)
        })
    };
    // Should this thread panic, the worker stops too (and its process is killed).
    let _stop_on_panic = StopOnDrop(Arc::clone(&stop));
    let wait_for = |n: usize| {
        let deadline = Instant::now() + STEP;
        while done.load(Ordering::SeqCst) < n && !runner.is_finished() {
            assert!(Instant::now() < deadline, "the worker is stuck");
            thread::sleep(Duration::from_millis(1));
        }
    };
    wait_for(10);
    cluster.kill9(1);
    let at_kill = done.load(Ordering::SeqCst);
    wait_for(at_kill + 20);
    stop.store(true, Ordering::SeqCst);
    let (mut worker, n) = match runner.join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    println!("worker: {n} changes, the kill came after {at_kill}");
    let groups: Vec<String> = (0..n).map(|i| format!("w{i:03}")).collect();
    worker.cmd("create_user carol pw", &["user carol created"]);

    // The serving client was not asked to log in again.
    // Sorted: g first, then w000...
    let mut expected = vec![group_line("g", "alice", 1, "owner")];
    expected.extend(groups.iter().map(|g| group_line(g, "bob", 1, "-")));
    cmd_lines(&mut sharer, "list_groups", &expected);
    let f2 = make_file(&dir.join("f2.bin"), 700_000, 2);
    cmd_lines(
        &mut sharer,
        "upload_file f2.bin g",
        &[uploaded("f2.bin", "g", f2.len())],
    );

    // Tracker 1 again: it copies the state before it answers clients (this one connects as
    // soon as it listens).
    cluster.restart_listening(1);
    let mut late = live(&cluster.info_for(&[1]), None, false);
    late.cmd("login carol pw", &["logged in as carol"]);
    expected[0] = group_line("g", "alice", 1, "-");
    cmd_lines(&mut late, "list_groups", &expected);
    late.cmd("join_group g", &["request to join group g sent"]);
    sharer.cmd("accept_request g carol", &["carol accepted into group g"]);
    let files = list_files(&mut late, "g", 2);
    assert_eq!(
        files,
        [
            file_line("f1.bin", &f1, 1, 1),
            file_line("f2.bin", &f2, 1, 1)
        ]
    );
    // And it takes changes again (forwarded to the primary, tracker 2).
    late.cmd("create_group c1", &["group c1 created"]);
    worker.cmd("join_group c1", &["request to join group c1 sent"]);
    late.cmd("list_requests c1", &["bob"]);
    assert!(cluster.is_running(2) && cluster.is_running(3));
}

/// A sharer's tracker (the primary) is killed; the share survives the failover and a member
/// downloading through another tracker gets the file, byte for byte.
#[test]
fn shares_survive_failover_and_download_works() {
    let mut cluster = Cluster::start(3);
    let (_files, dir) = tempdir();
    let (_dest, dest) = tempdir();

    let mut sharer = new_user(&cluster.info_for(&[1, 2, 3]), Some(&dir), true, "sam");
    sharer.cmd("create_group g", &["group g created"]);
    let bytes = make_file(&dir.join("data.bin"), 3 * 1024 * 1024 + 12_345, 7);
    cmd_lines(
        &mut sharer,
        "upload_file data.bin g",
        &[uploaded("data.bin", "g", bytes.len())],
    );
    let mut getter = new_user(&cluster.info_for(&[3]), Some(&dest), false, "dora");
    getter.cmd("join_group g", &["request to join group g sent"]);
    sharer.cmd("accept_request g dora", &["dora accepted into group g"]);

    cluster.kill9(1);
    // The sharer's next command goes through its new tracker, with its session.
    cmd_lines(
        &mut sharer,
        "list_groups",
        &[group_line("g", "sam", 2, "owner")],
    );
    cmd_lines(
        &mut getter,
        "list_files g",
        &[file_line("data.bin", &bytes, 1, 1)],
    );
    let target = dest.join("data.bin");
    getter.send(&format!("download_file g data.bin {}/", dest.display()));
    let started = getter.next_out();
    assert_eq!(
        started,
        format!(
            "download of data.bin from group g started: {} ({} bytes, 1 sharers online)",
            target.display(),
            bytes.len()
        )
    );
    let done = getter.next_out_within(STEP);
    assert!(
        done.starts_with(&format!(
            "downloaded data.bin from group g to {} ({} bytes in ",
            target.display(),
            bytes.len()
        )),
        "unexpected line {done:?}"
    );
    let got = fs::read(&target).expect("read the downloaded file");
    assert!(
        got == bytes,
        "the downloaded file differs from the original"
    );
    // The downloader now shares it too.
    cmd_lines(
        &mut sharer,
        "list_files g",
        &[file_line("data.bin", &bytes, 2, 2)],
    );
}

/// A client whose tracker file lists a tracker that is down first starts on the next one; a
/// tracker that starts late copies the state before it serves.
#[test]
fn client_starts_on_next_tracker_when_first_is_down() {
    // Tracker 1 of the file never started: 2 is the primary, 3 its backup.
    let mut cluster = Cluster::start_some(3, &[2, 3]);
    let all = cluster.info_for(&[1, 2, 3]);
    let (_files, dir) = tempdir();
    let begin = Instant::now();
    let mut client = Client::new(&all).cwd(&dir);
    let out = client.run(&[
        "create_user erin pw",
        "login erin pw",
        "create_group e1",
        "list_groups",
    ]);
    out.check(
        &[
            "user erin created",
            "logged in as erin",
            "group e1 created",
            &group_line("e1", "erin", 1, "owner"),
        ],
        0,
        0,
    );
    let took = begin.elapsed();
    println!("batch through the file's second tracker: {took:?}");

    // Tracker 1 starts now: it copies the state before it answers (the client connects as
    // soon as it listens).
    cluster.restart_listening(1);
    let mut c1 = live(&cluster.info_for(&[1]), None, false);
    c1.cmd("login erin pw", &["logged in as erin"]);
    cmd_lines(
        &mut c1,
        "list_groups",
        &[group_line("e1", "erin", 1, "owner")],
    );
    c1.cmd("create_group e2", &["group e2 created"]);
    // Tracker 2 (the primary) dies: the live client's file lists only tracker 1, which
    // stays up; it keeps working through the takeover by tracker 1.
    cluster.kill9(2);
    c1.cmd("create_group e3", &["group e3 created"]);
    let mut c3 = live(&cluster.info_for(&[2, 3]), None, false);
    c3.cmd("create_user finn pw", &["user finn created"]);
    c3.cmd("login finn pw", &["logged in as finn"]);
    cmd_lines(
        &mut c3,
        "list_groups",
        &[
            group_line("e1", "erin", 1, "-"),
            group_line("e2", "erin", 1, "-"),
            group_line("e3", "erin", 1, "-"),
        ],
    );
}

/// The client moves to another tracker within two seconds: measured from the kill of its
/// tracker to the answer of its next command, twice (the primary, then the new primary).
#[test]
fn client_moves_to_another_tracker_within_two_seconds() {
    let mut cluster = Cluster::start(3);
    let mut c = new_user(&cluster.info_for(&[1, 2, 3]), None, false, "mo");
    c.cmd("create_group m0", &["group m0 created"]);
    for (round, victim) in [(1, 1), (2, 2)] {
        let g = format!("m{round}");
        let killed = Instant::now();
        cluster.kill9(victim);
        c.cmd(
            &format!("create_group {g}"),
            &[&format!("group {g} created")],
        );
        let took = killed.elapsed();
        println!("failover {round} (tracker {victim} killed): next change answered after {took:?}");
        assert!(
            took < FAILOVER + FAILOVER_SLACK,
            "the client took {took:?} to move after tracker {victim} died; seen:\n{}",
            c.seen()
        );
    }
    cmd_lines(
        &mut c,
        "list_groups",
        &[
            group_line("m0", "mo", 1, "owner"),
            group_line("m1", "mo", 1, "owner"),
            group_line("m2", "mo", 1, "owner"),
        ],
    );
}

/// Sessions held by a tracker that dies with its client end after the grace period (their
/// shares go offline), while a client that moved keeps its share online.
#[test]
fn sessions_of_a_dead_tracker_end_after_the_grace_period() {
    let mut cluster = Cluster::start(2);
    let (_files, dir) = tempdir();

    // Xavier's file lists only tracker 2: nobody will resume his session.
    let mut xavier = new_user(&cluster.info_for(&[2]), Some(&dir), true, "xavier");
    xavier.cmd("create_group g", &["group g created"]);
    let xb = make_file(&dir.join("x.bin"), 600_000, 3);
    cmd_lines(
        &mut xavier,
        "upload_file x.bin g",
        &[uploaded("x.bin", "g", xb.len())],
    );
    // Sue is also on tracker 2 but her file lists tracker 1 next: she moves.
    let mut sue = new_user(&cluster.info_for(&[2, 1]), Some(&dir), true, "sue");
    let mut olga = new_user(&cluster.info_for(&[1]), None, false, "olga");
    for (client, user) in [(&mut sue, "sue"), (&mut olga, "olga")] {
        client.cmd("join_group g", &["request to join group g sent"]);
        xavier.cmd(
            &format!("accept_request g {user}"),
            &[&format!("{user} accepted into group g")],
        );
    }
    let sb = make_file(&dir.join("s.bin"), 300_000, 4);
    cmd_lines(
        &mut sue,
        "upload_file s.bin g",
        &[uploaded("s.bin", "g", sb.len())],
    );
    let both_online = [file_line("s.bin", &sb, 1, 1), file_line("x.bin", &xb, 1, 1)];
    assert_eq!(list_files(&mut olga, "g", 2), both_online);

    let killed = Instant::now();
    cluster.kill9_with(2, &[xavier.pid()]);
    // Within the grace period both sessions are still there.
    assert_eq!(list_files(&mut olga, "g", 2), both_online);
    // Sue moved (her command is answered through tracker 1, with her session).
    cmd_lines(
        &mut sue,
        "list_groups",
        &[group_line("g", "xavier", 3, "member")],
    );
    let expect_after = [file_line("s.bin", &sb, 1, 1), file_line("x.bin", &xb, 0, 1)];
    let deadline = killed + SESSION_GRACE + STEP;
    let mut polls = 0;
    loop {
        polls += 1;
        let lines = list_files(&mut olga, "g", 2);
        if lines == expect_after {
            break;
        }
        assert_eq!(lines, both_online, "unexpected list_files answer");
        assert!(
            Instant::now() < deadline,
            "x.bin still online {:?} after the kill; logs:\n{}",
            killed.elapsed(),
            cluster.logs()
        );
        // Poll again shortly (the condition is the answer itself).
        thread::sleep(Duration::from_millis(200));
    }
    let took = killed.elapsed();
    println!("the dead tracker's session ended {took:?} after the kill ({polls} polls)");
    assert!(
        took >= SESSION_GRACE - Duration::from_millis(500),
        "the session ended after {took:?}, before the grace period ({SESSION_GRACE:?})"
    );
}

/// A hung tracker (SIGSTOP) keeps its sockets open: only silence tells. The other trackers
/// take over after their peer timeout (1.5 s); the client pings a quiet tracker link and
/// moves on after 1.8 s of silence, retrying its command with the same id.
#[test]
fn client_leaves_a_hung_tracker_within_two_seconds() {
    let cluster = Cluster::start(3);
    let mut c = new_user(&cluster.info_for(&[1, 2, 3]), None, false, "hal");
    c.cmd("create_group h0", &["group h0 created"]);
    let stopped = Instant::now();
    common::send_signal(cluster.pid(1), "STOP");
    c.send("create_group h1");
    let answer = c.next_any_within(Duration::from_secs(60));
    let took = stopped.elapsed();
    println!("hung tracker: next command answered after {took:?}: {answer:?}");
    assert_eq!(answer, Ok("group h1 created".to_owned()));
    // The peer timeout, the takeover and the move.
    assert!(
        took < Duration::from_millis(1500) + FAILOVER + FAILOVER_SLACK,
        "the client took {took:?} to leave the hung tracker"
    );
    // (The stopped tracker is killed with SIGKILL when the cluster is dropped.)
}

/// Two of three trackers hung at once (SIGSTOP): the client's and the next one in its file,
/// whose kernel still accepts connections while the process never answers. The client races
/// the trackers after the one it left, so the hung next tracker costs a stagger, not a whole
/// silence timeout: the next command is answered by the live tracker about as fast as with
/// one tracker hung (the build before racing took about 5.2 s here; SPEC: two seconds, with
/// slack for a loaded machine).
#[test]
fn client_reaches_the_live_tracker_when_two_of_three_hang() {
    let cluster = Cluster::start(3);
    let mut c = new_user(&cluster.info_for(&[1, 2, 3]), None, false, "tia");
    c.cmd("create_group t0", &["group t0 created"]);
    let stopped = Instant::now();
    common::send_signal(cluster.pid(1), "STOP");
    common::send_signal(cluster.pid(2), "STOP");
    c.send("create_group t1");
    let answer = c.next_any_within(Duration::from_secs(60));
    let took = stopped.elapsed();
    println!("two hung trackers: next command answered after {took:?}: {answer:?}");
    // Thawed before the cluster's drop kills them (a stopped process is killed too, but
    // its log is only complete once it ran again).
    common::send_signal(cluster.pid(1), "CONT");
    common::send_signal(cluster.pid(2), "CONT");
    assert_eq!(answer, Ok("group t1 created".to_owned()));
    assert!(
        took < Duration::from_secs(4),
        "the client took {took:?} to reach the live tracker; seen:\n{}",
        c.seen()
    );
    cmd_lines(
        &mut c,
        "list_groups",
        &[
            group_line("t0", "tia", 1, "owner"),
            group_line("t1", "tia", 1, "owner"),
        ],
    );
}

/// A first connection (no session yet) whose file lists a hung tracker first: its kernel
/// accepts the connection and the process never answers the handshake. The client races the
/// next tracker 150 ms later instead of waiting the whole silence timeout for that handshake
/// (1.8 s before racing, so the old code could not answer within the bound below).
#[test]
fn a_first_command_is_answered_at_once_when_the_first_tracker_listed_hangs() {
    let cluster = Cluster::start(3);
    let mut helper = new_user(&cluster.info_for(&[1, 2]), None, false, "hu");
    common::send_signal(cluster.pid(3), "STOP");
    // Once a change commits, the service has stopped waiting for the hung tracker.
    helper.cmd("create_group h0", &["group h0 created"]);
    let mut c = live(&cluster.info_for(&[3, 1, 2]), None, false);
    let begin = Instant::now();
    c.send("create_user zed pw");
    let answer = c.next_any_within(Duration::from_secs(60));
    let took = begin.elapsed();
    println!("first tracker listed hung: first command answered after {took:?}: {answer:?}");
    common::send_signal(cluster.pid(3), "CONT");
    assert_eq!(answer, Ok("user zed created".to_owned()));
    assert!(
        took < Duration::from_millis(1200),
        "the first command took {took:?} with the first tracker hung; seen:\n{}",
        c.seen()
    );
}

/// Issue 9's schedule with real processes: clients keep writing while the primary is frozen
/// (SIGSTOP) for 4 s, long enough for the others to take over, and then runs again (SIGCONT).
/// The thawed tracker must notice its stall, serve nothing stale, and rejoin: afterwards every
/// tracker, asked on its own, lists every change whose success a client printed.
#[test]
fn a_frozen_primary_rejoins_and_every_tracker_lists_every_acknowledged_change() {
    let cluster = Cluster::start(3);
    let mut writers = [
        new_user(&cluster.info_for(&[1, 2, 3]), None, false, "fay"),
        new_user(&cluster.info_for(&[2, 3, 1]), None, false, "gus"),
    ];
    let mut acked = Vec::new();
    let mut n = 0;
    let mut write_for = |writers: &mut [LiveClient; 2], acked: &mut Vec<String>, span: Duration| {
        let end = Instant::now() + span;
        while Instant::now() < end {
            for w in writers.iter_mut() {
                n += 1;
                let group = format!("f{n}");
                w.send(&format!("create_group {group}"));
                if let Ok(line) = w.next_any_within(STEP) {
                    assert_eq!(line, format!("group {group} created"));
                    acked.push(group);
                }
            }
        }
    };
    // A reader that only knows tracker 1: right after the thaw it asks tracker 1, which must
    // not answer from the state it held when it froze.
    let mut reader = new_user(&cluster.info_for(&[1]), None, false, "ray");
    write_for(&mut writers, &mut acked, Duration::from_millis(500));
    common::send_signal(cluster.pid(1), "STOP");
    write_for(&mut writers, &mut acked, Duration::from_secs(4));
    common::send_signal(cluster.pid(1), "CONT");
    // The answer to a later command marks the end of the listing. While tracker 1 rejoins,
    // a round of the reader's (it knows no other tracker) may fail at once with `error: no
    // tracker is reachable` on a loaded machine: that listing is asked again. What must never
    // happen is a listing, from the thawed tracker, that lacks an acknowledged change.
    let mut listed = std::collections::HashSet::new();
    for attempt in 0.. {
        assert!(attempt < 20, "the reader never got a listing");
        let end = format!("zz-end{attempt}");
        reader.send("list_groups");
        reader.send(&format!("create_group {end}"));
        listed.clear();
        let mut failed = 0;
        while failed < 2 {
            match reader.next_any_within(STEP) {
                Ok(line) if line == format!("group {end} created") => break,
                Ok(line) => {
                    listed.insert(line.split('\t').next().unwrap_or("").to_owned());
                }
                Err(e) if e.contains("no tracker is reachable") => failed += 1,
                Err(e) => panic!("the reader's list_groups failed: {e}"),
            }
        }
        if failed == 0 {
            break;
        }
    }
    for g in &acked {
        assert!(
            listed.contains(g),
            "tracker 1, just thawed, does not list acknowledged group {g}\n{}",
            cluster.logs()
        );
    }
    write_for(&mut writers, &mut acked, Duration::from_secs(2));
    println!("{} changes acknowledged around the freeze", acked.len());
    assert!(acked.len() > 10, "clients kept writing: {acked:?}");
    for no in 1..=3 {
        // Asked alone, each tracker answers once it serves again (a thawed tracker holds new
        // clients until it has rejoined).
        assert_lists_groups(&cluster, no, &acked);
    }
}

/// Every tracker killed with SIGKILL at once, while a client writes, then started again in the
/// other order: the service comes back with every change it acknowledged, and the client goes
/// on with its session (its token is durable state too) without logging in again.
#[test]
fn every_tracker_killed_at_once_and_restarted_in_the_other_order_loses_nothing() {
    let mut cluster = Cluster::start(3);
    let all = cluster.info_for(&[1, 2, 3]);
    let mut writer = new_user(&all, None, false, "kim");
    let mut acked = Vec::new();
    for i in 0..40 {
        let group = format!("k{i:02}");
        writer.cmd(
            &format!("create_group {group}"),
            &[&format!("group {group} created")],
        );
        acked.push(group);
    }
    // One more in flight when the trackers die: it may or may not have been applied.
    writer.send("create_group k-last");
    let others = [cluster.pid(2), cluster.pid(3)];
    cluster.kill9_with(1, &others);
    cluster.kill9(2);
    cluster.kill9(3);
    // Tracker 3 alone does not start the service: its disk says it served with the others,
    // which may hold newer changes.
    cluster.restart_listening(3);
    cluster.restart_listening(2);
    cluster.restart(1);
    // The change in flight is sent again once a tracker serves: done, or failed if the
    // trackers took longer than the client's 30 s per command.
    match writer.next_any_within(STEP) {
        Ok(line) => {
            assert_eq!(line, "group k-last created");
            acked.push("k-last".to_owned());
        }
        Err(e) => assert!(e.starts_with("error: "), "{e}"),
    }
    // The session goes on: a change without a new login.
    writer.cmd("create_group k-after", &["group k-after created"]);
    acked.push("k-after".to_owned());
    for no in 1..=3 {
        assert_lists_groups(&cluster, no, &acked);
    }
}

/// Every tracker killed; two of them restarted at once and the third 8 s later: meanwhile the
/// two accept the client's connections and complete its handshake but hold the welcome (their
/// disks say they served with the third, which may hold newer changes). That is a service not
/// serving yet, which the client waits for with its session (two minutes); the raced build gave
/// the session up after about 6.5 s here (three rounds of two attempts that timed out waiting
/// for the welcome, counted as links that broke), so the first command after the restart
/// failed with `not logged in`.
#[test]
fn a_client_keeps_its_session_while_restarted_trackers_hold_their_welcome() {
    let mut cluster = Cluster::start(3);
    let mut c = new_user(&cluster.info_for(&[1, 2, 3]), None, false, "wes");
    c.cmd("create_group w0", &["group w0 created"]);
    let others = [cluster.pid(2), cluster.pid(3)];
    cluster.kill9_with(1, &others);
    cluster.kill9(2);
    cluster.kill9(3);
    cluster.restart_listening(1);
    cluster.restart_listening(2);
    // The condition under test lasts this long (no synchronisation: the two trackers wait for
    // the third whatever the client does).
    std::thread::sleep(Duration::from_secs(8));
    cluster.restart(3);
    // Commands fail at once ("no tracker is reachable") until the link is up again; the
    // session must be there once it is.
    let deadline = Instant::now() + STEP;
    for i in 1.. {
        let group = format!("w{i}");
        c.send(&format!("create_group {group}"));
        match c.next_any_within(STEP) {
            Ok(line) => {
                assert_eq!(line, format!("group {group} created"));
                break;
            }
            Err(e) => {
                assert!(
                    e.contains("no tracker is reachable") && Instant::now() < deadline,
                    "{e}; seen:\n{}",
                    c.seen()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// The quick start's single tracker, killed and started again, keeps its users, groups and
/// files.
#[test]
fn a_single_tracker_killed_and_restarted_keeps_its_state() {
    let mut cluster = Cluster::start(1);
    let info = cluster.info_for(&[1]);
    let (_files, dir) = tempdir();
    let mut alice = new_user(&info, Some(&dir), false, "alice");
    alice.cmd("create_group team", &["group team created"]);
    let f = make_file(&dir.join("f.bin"), 600_000, 7);
    cmd_lines(
        &mut alice,
        "upload_file f.bin team",
        &[uploaded("f.bin", "team", f.len())],
    );
    // (Logged out first: a session whose client and tracker both died is held for the
    // grace period after the restart, in case its client comes back.)
    alice.cmd("logout", &["logged out alice"]);
    drop(alice);
    cluster.kill9(1);
    cluster.restart(1);
    let out = Client::new(&info).run(&["login alice pw", "list_groups", "list_files team"]);
    assert_eq!(
        out.errors,
        Vec::<String>::new(),
        "{out:#?}\n{}",
        cluster.logs()
    );
    assert_eq!(out.stdout[0], "logged in as alice");
    assert!(
        out.stdout
            .contains(&group_line("team", "alice", 1, "owner")),
        "{out:#?}"
    );
    assert!(
        out.stdout.iter().any(|l| l.starts_with("f.bin\t")),
        "{out:#?}"
    );
}

/// A tracker killed first misses the changes acknowledged after it died. When every tracker
/// is down and it starts first, it does not start the service with its older state: it waits
/// for the tracker it last served with, then takes the newer state from it.
#[test]
fn a_tracker_that_missed_changes_waits_for_the_one_that_has_them() {
    let mut cluster = Cluster::start(2);
    let all = cluster.info_for(&[1, 2]);
    let mut writer = new_user(&all, None, false, "lee");
    writer.cmd("create_group before", &["group before created"]);
    cluster.kill9(2);
    writer.cmd("create_group only-on-1", &["group only-on-1 created"]);
    drop(writer);
    cluster.kill9(1);
    cluster.restart_listening(2);
    let addr2 = cluster.addrs[1];
    // Longer than a starting tracker's discovery time (3 s).
    let early = common::probe_welcome(addr2, Instant::now() + Duration::from_secs(5));
    assert!(
        early.is_err(),
        "tracker 2 served with its older state while tracker 1 was down\n{}",
        cluster.logs()
    );
    cluster.restart(1);
    common::probe_welcome(addr2, Instant::now() + STEP)
        .unwrap_or_else(|e| panic!("tracker 2 does not serve: {e}\n{}", cluster.logs()));
    for no in 1..=2 {
        assert_lists_groups(&cluster, no, &["only-on-1".to_owned()]);
    }
}

/// Every tracker's data directory removed (a reset, or each run given a fresh data directory)
/// while the service key and its founder marker stay: the founder marker names a data
/// directory that is gone, so no tracker is the founder. Tracker 2 alone waits (tracker 1 may
/// hold the state); once both are up and say they hold nothing, tracker 1 starts the service
/// empty and both serve. (Before, neither ever served.)
#[test]
fn a_service_whose_data_directories_were_removed_starts_again_empty() {
    let mut cluster = Cluster::start(2);
    let out = Client::new(&cluster.info).run(&["create_user alice pw"]);
    assert_eq!(out.code(), Some(0), "{out:#?}");
    cluster.kill9(1);
    cluster.kill9(2);
    let base = common::state_home(&cluster.info).join("p2pshare");
    for addr in &cluster.addrs {
        let dir = base.join(format!("tracker-{}-{}", addr.ip(), addr.port()));
        fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("remove {}: {e}", dir.display()));
    }
    cluster.restart_listening(2);
    cluster.restart(1);
    let out = Client::new(&cluster.info_for(&[1])).run(&["create_user bob pw"]);
    assert_eq!(
        out.stdout,
        ["user bob created"],
        "{out:#?}\n{}",
        cluster.logs()
    );
    // Tracker 2 joined tracker 1's new state: alice is gone, bob is there.
    let out = Client::new(&cluster.info_for(&[2])).run(&["create_user alice pw", "login bob pw"]);
    assert_eq!(
        out.stdout,
        ["user alice created", "logged in as bob"],
        "{out:#?}\n{}",
        cluster.logs()
    );
}
