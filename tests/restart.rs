//! End-to-end tests of client restarts with real processes on 127.0.0.1 (SPEC, client_program:
//! "A client started again at the same address, once the user logs in, serves that user's
//! shares again and continues that user's unfinished downloads"): a sharer killed with SIGKILL
//! and started again serves after its login and no phantom share stays online; a file changed
//! meanwhile is not served as it was; a downloader killed half-way continues by itself after
//! its login, fetches only the rest (counted by the sharer) and ends byte-identical; the state
//! directory's lock and a corrupt state file.
//!
//! Every process is owned by a guard that kills it on drop; every wait is on a condition (an
//! output or log line, a file's contents, a process state) with a generous deadline.

mod common;

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use common::{send_signal, Client, LiveClient, Tracker};
use p2pshare::client::part_record::{self, PartRecord};
use tempfile::TempDir;

const PIECE: u64 = 512 * 1024;
/// Deadline of one step on a loaded machine.
const STEP: Duration = Duration::from_secs(60);
const G: &str = "g1";

/// A tracker, a directory per user, and group `g1` of `alice` (owner) and `bob`.
struct Net {
    tracker: Tracker,
    root: PathBuf,
    _root: TempDir,
}

impl Net {
    fn new() -> Net {
        let tracker = Tracker::start();
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonicalize");
        for u in ["alice", "bob"] {
            fs::create_dir(root.join(u)).expect("user dir");
        }
        let out = tracker.run(&[
            "create_user alice pw",
            "create_user bob pw",
            "login bob pw",
            "logout",
            "login alice pw",
            &format!("create_group {G}"),
            "logout",
            "login bob pw",
            &format!("join_group {G}"),
            "logout",
            "login alice pw",
            &format!("accept_request {G} bob"),
        ]);
        assert_eq!(out.code(), Some(0), "setup failed: {out:#?}");
        Net {
            tracker,
            root,
            _root: dir,
        }
    }

    fn dir(&self, user: &str) -> PathBuf {
        self.root.join(user)
    }

    /// A live client of `user` at `addr` (a fresh one if `None`), in the user's directory,
    /// logging at `info` (the tests wait for some log lines); not logged in.
    fn client(&self, user: &str, addr: Option<SocketAddr>) -> LiveClient {
        let client = match addr {
            Some(addr) => Client::with_addr(&self.tracker.info, addr),
            None => self.tracker.client(),
        };
        let live = client
            .cwd(&self.dir(user))
            .options(&[OsString::from("--log-level"), OsString::from("info")])
            .live();
        if let Some(addr) = addr {
            assert_eq!(live.addr, addr, "the client must come back at its address");
        }
        live
    }

    /// A fresh client of `user`, logged in.
    fn login(&self, user: &str) -> LiveClient {
        let mut live = self.client(user, None);
        live.cmd(
            &format!("login {user} pw"),
            &[&format!("logged in as {user}")],
        );
        live
    }
}

/// `len` bytes that depend on the offset and `seed`.
fn write_file(path: &Path, len: u64, seed: u8) {
    let mut bytes = Vec::with_capacity(len as usize);
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
    for _ in 0..len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        bytes.push((x >> 11) as u8);
    }
    fs::write(path, bytes).expect("write file");
}

fn n_pieces(size: u64) -> u64 {
    size.div_ceil(PIECE)
}

fn upload(live: &mut LiveClient, path: &Path) {
    let size = fs::metadata(path).unwrap().len();
    let name = path.file_name().unwrap().to_str().unwrap().to_owned();
    live.cmd(
        &format!("upload_file \"{}\" {G}", path.display()),
        &[&format!(
            "uploaded {name} to group {G} ({size} bytes, {} pieces)",
            n_pieces(size)
        )],
    );
}

/// `list_files g1` as (name, online) pairs.
fn listed(live: &mut LiveClient, n_files: usize) -> Vec<(String, String)> {
    live.send(&format!("list_files {G}"));
    live.next_outs(n_files)
        .into_iter()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[0].to_owned(), f[2].to_owned())
        })
        .collect()
}

fn pair(name: &str, online: &str) -> (String, String) {
    (name.to_owned(), online.to_owned())
}

/// SIGKILLs a live client and waits until it is gone.
fn kill_now(live: &mut LiveClient) {
    send_signal(live.pid(), "KILL");
    let deadline = Instant::now() + STEP;
    while live.try_status().is_none() {
        assert!(Instant::now() < deadline, "process survived SIGKILL");
        thread::sleep(Duration::from_millis(5));
    }
}

fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// SIGSTOPs a process and waits until it is stopped.
fn freeze(pid: u32) {
    send_signal(pid, "STOP");
    let deadline = Instant::now() + STEP;
    while proc_state(pid) != Some('T') {
        assert!(Instant::now() < deadline, "process {pid} never stopped");
        thread::sleep(Duration::from_millis(2));
    }
}

#[track_caller]
fn assert_same(a: &Path, b: &Path) {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    File::open(a).unwrap().read_to_end(&mut x).unwrap();
    File::open(b).unwrap().read_to_end(&mut y).unwrap();
    assert!(x == y, "{a:?} and {b:?} differ");
}

/// Closes stdin and checks the exit status and that nothing else was printed.
#[track_caller]
fn finish(live: LiveClient, code: i32) {
    let seen = live.seen();
    let (status, rest) = live.finish();
    assert_eq!(status.code(), Some(code), "rest: {rest:?}; seen:\n{seen}");
    assert!(rest.is_empty(), "unexpected lines: {rest:?}; seen:\n{seen}");
}

/// The number in "... closed: N bytes of blocks of NAME served".
fn served_bytes(log_line: &str) -> u64 {
    let (_, rest) = log_line.split_once("closed: ").expect(log_line);
    rest.split(' ').next().unwrap().parse().expect(log_line)
}

// ---------------------------------------------------------------------------------------

/// A sharer killed with SIGKILL and started again at its address serves its shares once its
/// user logs in; a share whose file went away meanwhile is ended at the tracker (no phantom
/// sharer), and a file nobody shares any more leaves the listing.
#[test]
fn a_sharer_killed_and_restarted_serves_after_login() {
    let net = Net::new();
    let src = net.dir("alice").join("f.bin");
    let size = 3 * PIECE + 5;
    write_file(&src, size, 1);
    let gone = net.dir("alice").join("gone.bin");
    write_file(&gone, PIECE, 2);
    let mut alice = net.login("alice");
    upload(&mut alice, &src);
    upload(&mut alice, &gone);
    let addr = alice.addr;
    kill_now(&mut alice);
    fs::remove_file(&gone).unwrap();

    let mut bob = net.login("bob");
    // The tracker still lists both shares (alice's session ended with her connection).
    assert_eq!(
        listed(&mut bob, 2),
        [pair("f.bin", "0"), pair("gone.bin", "0")]
    );

    let mut alice = net.client("alice", Some(addr));
    alice.cmd(
        "login alice pw",
        &["logged in as alice (1 shared files resumed)"],
    );
    alice.wait_log("gone.bin", STEP);
    // Only what the client holds is online; the file that went away is not listed at all.
    assert_eq!(listed(&mut bob, 1), [pair("f.bin", "1")]);

    let target = net.dir("bob").join("f.bin");
    bob.send(&format!("download_file {G} f.bin ./"));
    assert_eq!(
        bob.next_out(),
        format!(
            "download of f.bin from group {G} started: {} ({size} bytes, 1 sharers online)",
            target.display()
        )
    );
    let done = bob.next_out_within(STEP);
    assert!(done.starts_with("downloaded f.bin"), "{done}");
    assert_same(&src, &target);
    finish(bob, 0);
    finish(alice, 0);
}

/// A shared file changed while its client was down: one changed in place (same size, other
/// bytes) is hashed again and dropped, one only touched (same bytes, new time) is hashed
/// again and served; neither is served before its check.
#[test]
fn a_changed_file_is_not_served_as_it_was() {
    let net = Net::new();
    let changed = net.dir("alice").join("changed.bin");
    let touched = net.dir("alice").join("touched.bin");
    write_file(&changed, 2 * PIECE + 1, 3);
    write_file(&touched, 2 * PIECE + 1, 4);
    let mut alice = net.login("alice");
    upload(&mut alice, &changed);
    upload(&mut alice, &touched);
    let addr = alice.addr;
    kill_now(&mut alice);

    let f = OpenOptions::new().write(true).open(&changed).unwrap();
    f.write_all_at(b"not the same bytes", PIECE + 7).unwrap();
    let later = std::time::SystemTime::now() + Duration::from_secs(5);
    f.set_modified(later).unwrap();
    drop(f);
    File::options()
        .write(true)
        .open(&touched)
        .unwrap()
        .set_modified(later)
        .unwrap();

    let mut alice = net.client("alice", Some(addr));
    alice.cmd("login alice pw", &["logged in as alice"]);
    alice.wait_log("no longer holds", STEP);
    alice.wait_log("verified again", STEP);

    let mut bob = net.login("bob");
    // The changed file had no other sharer: it is gone; the touched one is served again.
    assert_eq!(listed(&mut bob, 1), [pair("touched.bin", "1")]);
    bob.send(&format!("download_file {G} touched.bin ./"));
    bob.next_out();
    let done = bob.next_out_within(STEP);
    assert!(done.starts_with("downloaded touched.bin"), "{done}");
    assert_same(&touched, &net.dir("bob").join("touched.bin"));
    bob.send(&format!("download_file {G} changed.bin ./"));
    bob.expect_error();
    finish(bob, 1);
    finish(alice, 0);
}

/// A downloader killed with SIGKILL half-way, started again at its address: after its login
/// the download goes on by itself (`[D]`), its recorded pieces are verified again rather
/// than fetched, the sharer sends only the rest, and the result is byte-identical.
#[test]
fn a_download_killed_half_way_resumes_by_itself_and_fetches_only_the_rest() {
    let net = Net::new();
    let src = net.dir("alice").join("f.bin");
    let n = 64u64;
    let size = n * PIECE - 1000;
    write_file(&src, size, 5);
    let mut alice = net.login("alice");
    upload(&mut alice, &src);

    let mut bob = net.login("bob");
    let bob_addr = bob.addr;
    let target = net.dir("bob").join("f.bin");
    bob.send(&format!("download_file {G} f.bin ./"));
    bob.next_out();
    // Wait until the resume record holds at least a quarter of the pieces, then kill.
    let record_file = part_record::record_path(&target);
    let deadline = Instant::now() + STEP;
    loop {
        let count = fs::read(&record_file)
            .ok()
            .and_then(|b| PartRecord::decode(&b).ok())
            .map_or(0, |r| r.verified.count_ones() as u64);
        if count >= n / 4 {
            // The sharer stops at once, so the download stops well short of the end (its
            // first pieces come in a random order, so no piece of the file can be made the
            // one it never gets).
            freeze(alice.pid());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the record never reached a quarter; seen:\n{}",
            bob.seen()
        );
        thread::sleep(Duration::from_millis(5));
    }
    kill_now(&mut bob);
    send_signal(alice.pid(), "CONT");
    let record = PartRecord::decode(&fs::read(&record_file).unwrap()).unwrap();
    let kept: Vec<u64> = record.verified.iter_ones().map(|i| i as u64).collect();
    assert!(
        kept.len() as u64 >= n / 4 && (kept.len() as u64) < n,
        "{kept:?}"
    );
    let missing_bytes: u64 = (0..n)
        .filter(|p| !kept.contains(p))
        .map(|p| (size - p * PIECE).min(PIECE))
        .sum();
    // The sharer's first link (to the killed client) has closed.
    alice.wait_log("closed:", STEP);

    // Started again; the sharer is frozen for a moment so that the download is seen running.
    freeze(alice.pid());
    let mut bob = net.client("bob", Some(bob_addr));
    bob.cmd("login bob pw", &["logged in as bob"]);
    assert_eq!(
        bob.next_out(),
        format!(
            "download of f.bin from group {G} resumed: {} ({size} bytes, 1 sharers online, \
             {} of {n} pieces to verify again)",
            target.display(),
            kept.len()
        )
    );
    bob.cmd("show_downloads", &["[D] [g1] f.bin"]);
    send_signal(alice.pid(), "CONT");
    let done = bob.next_out_within(STEP);
    assert!(done.starts_with("downloaded f.bin"), "{done}");
    assert_same(&src, &target);
    assert!(!part_record::part_path(&target).exists());
    assert!(!record_file.exists());
    bob.cmd("show_downloads", &["[C] [g1] f.bin"]);

    // What the sharer sent after the restart: exactly the missing pieces (one block of slack).
    let line = alice.wait_log("closed:", STEP);
    let served = served_bytes(&line);
    assert!(
        served >= missing_bytes && served <= missing_bytes + 128 * 1024,
        "served {served} bytes after the restart, {missing_bytes} were missing; {line}"
    );
    finish(bob, 0);
    finish(alice, 0);
}

/// Two clients on one state directory: the second refuses to start, naming it.
#[test]
fn a_second_client_on_the_same_state_directory_refuses() {
    let net = Net::new();
    let state = net.root.join("state");
    let opts = [
        OsString::from("--state-dir"),
        state.clone().into_os_string(),
    ];
    let mut first = Client::new(&net.tracker.info).options(&opts).live();
    let out = Client::new(&net.tracker.info)
        .options(&opts)
        .run(&["login bob pw"]);
    assert_eq!(out.code(), Some(2), "{out:#?}");
    assert!(
        out.stderr
            .iter()
            .any(|l| l.contains("held by another running client")
                && l.contains(&state.display().to_string())),
        "{out:#?}"
    );
    assert!(out.stdout.is_empty(), "{out:#?}");
    first.cmd("login bob pw", &["logged in as bob"]);
    finish(first, 0);
    // Once the first is gone, the directory is free again.
    Client::new(&net.tracker.info)
        .options(&opts)
        .run(&["login bob pw"])
        .check(&["logged in as bob"], 0, 0);
}

/// A corrupt state file: a warning naming it, the file set aside, the client works.
#[test]
fn a_corrupt_state_file_is_named_and_the_client_starts() {
    let net = Net::new();
    let addr = common::free_addr();
    let dir = common::state_home(&net.tracker.info)
        .join("p2pshare")
        .join(format!("client-127.0.0.1-{}", addr.port()));
    fs::create_dir_all(&dir).unwrap();
    let state = dir.join("state");
    fs::write(&state, b"P2PCLST1 and then garbage").unwrap();
    let out = Client::with_addr(&net.tracker.info, addr).run(&["login bob pw", "logout"]);
    out.check(&["logged in as bob", "logged out bob"], 0, 0);
    assert!(
        out.stderr.iter().any(|l| l.contains("is corrupt")
            && l.contains(&state.display().to_string())
            && !l.starts_with("error: ")),
        "{out:#?}"
    );
    assert_eq!(
        fs::read(dir.join("state.bad")).unwrap(),
        b"P2PCLST1 and then garbage"
    );
}

/// A download interrupted by SIGTERM keeps its `.part` and record; `download_file` onto the
/// same target from another client (another address, so nothing remembered) resumes it.
#[test]
fn download_file_onto_an_interrupted_part_resumes_it() {
    let net = Net::new();
    let src = net.dir("alice").join("w.bin");
    let size = 4 * PIECE + 1;
    write_file(&src, size, 6);
    let mut alice = net.login("alice");
    upload(&mut alice, &src);
    // The sharer is frozen: the first download gets nothing before it is interrupted.
    freeze(alice.pid());
    let mut bob = net.login("bob");
    let target = net.dir("bob").join("w.bin");
    bob.send(&format!("download_file {G} w.bin ./"));
    assert!(bob.next_out().contains(" started: "), "{}", bob.seen());
    common::send_sigterm(bob.pid());
    let (status, rest) = bob.wait();
    assert_eq!(status.code(), Some(1), "{rest:?}");
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert!(
        rest[0].contains("failed: the client is exiting"),
        "{rest:?}"
    );
    assert!(part_record::part_path(&target).exists());
    assert!(part_record::record_path(&target).exists());
    send_signal(alice.pid(), "CONT");

    let mut other = net.login("bob");
    other.send(&format!("download_file {G} w.bin {}", target.display()));
    assert_eq!(
        other.next_out(),
        format!(
            "download of w.bin from group {G} resumed: {} ({size} bytes, 1 sharers online, 0 of \
             5 pieces to verify again)",
            target.display()
        )
    );
    let done = other.next_out_within(STEP);
    assert!(done.starts_with("downloaded w.bin"), "{done}");
    assert_same(&src, &target);
    assert!(!part_record::part_path(&target).exists());
    assert!(!part_record::record_path(&target).exists());
    finish(other, 0);
    finish(alice, 0);
}

/// Downloads that complete just before the end of input are remembered: the client holds its
/// exit until their registration as shares is answered, and a file of no pieces (0 bytes) is
/// registered at its completion. Started again at its address, the downloader serves both
/// after its login (both listed with two sharers online).
#[test]
fn downloads_completed_right_before_the_end_of_input_are_remembered() {
    let net = Net::new();
    let src = net.dir("alice").join("f.bin");
    write_file(&src, PIECE + 7, 9);
    let empty = net.dir("alice").join("empty.bin");
    File::create(&empty).unwrap();
    let mut alice = net.login("alice");
    upload(&mut alice, &src);
    alice.cmd(
        &format!("upload_file \"{}\" {G}", empty.display()),
        &[&format!(
            "uploaded empty.bin to group {G} (0 bytes, 0 pieces)"
        )],
    );

    let mut bob = net.login("bob");
    let bob_addr = bob.addr;
    // A download may end (its `downloaded` line) before the next command's `started` line:
    // such lines are kept for the checks below.
    let mut early = Vec::new();
    for name in ["f.bin", "empty.bin"] {
        bob.send(&format!("download_file {G} {name} ./"));
        loop {
            let line = bob.next_out();
            if line.starts_with(&format!("download of {name} from group {G} started")) {
                break;
            }
            assert!(line.starts_with("downloaded "), "{line}");
            early.push(line);
        }
    }
    // End of input right away: the client waits for both downloads, then exits.
    let seen = bob.seen();
    let (status, rest) = bob.finish();
    assert_eq!(status.code(), Some(0), "rest: {rest:?}; seen:\n{seen}");
    for name in ["f.bin", "empty.bin"] {
        assert!(
            early
                .iter()
                .chain(&rest)
                .any(|l| l.starts_with(&format!("downloaded {name}"))),
            "{early:?} {rest:?}"
        );
    }
    assert_same(&src, &net.dir("bob").join("f.bin"));
    assert_eq!(
        fs::metadata(net.dir("bob").join("empty.bin"))
            .unwrap()
            .len(),
        0
    );

    let mut bob = net.client("bob", Some(bob_addr));
    bob.send("login bob pw");
    let line = bob.next_out();
    assert!(line.starts_with("logged in as bob"), "{line}");
    // Both files online at alice and bob (a share whose stamp was not known yet is hashed
    // again first, so this may take a moment).
    let deadline = Instant::now() + STEP;
    loop {
        let now = listed(&mut alice, 2);
        if now == [pair("empty.bin", "2"), pair("f.bin", "2")] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the downloads were not remembered as shares: {now:?}; seen:\n{}",
            bob.seen()
        );
        thread::sleep(Duration::from_millis(50));
    }
    finish(bob, 0);
    finish(alice, 0);
}
