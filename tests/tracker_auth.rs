//! End-to-end tests of SPEC.md's Security rule for trackers, with the real binaries on
//! 127.0.0.1: only the trackers of a service link with each other. The trackers of one tracker
//! file find one service key by themselves and link; a process that says the tracker hello in
//! clear, or attempts the handshake without the service's key, gets nothing (not one byte) and
//! changes nothing; two trackers with different keys do not link (both log a warning); trackers
//! with separate state homes find the key beside their tracker file. Key
//! files: a corrupt or group-readable file, or a key on the tracker's own line that is not its
//! own, exit 2 with a message naming the problem.
//!
//! Every process is owned by a guard that kills it on drop; every wait is on a condition with a
//! generous deadline; every tracker and client gets a temporary `XDG_STATE_HOME`.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use common::{run_program, Client, Cluster, ProcGuard, READY_TIMEOUT, TRACKER_BIN};
use p2pshare::net::secure::{Params, SecureLink};
use p2pshare::wire::replication::ReplMsg;
use p2pshare::wire::tracker_link::{ClientMsg, Role};
use p2pshare::wire::PROTOCOL_VERSION;

/// How long a step may take on a loaded machine.
const STEP: Duration = Duration::from_secs(30);

/// Everything the peer at `stream` sends until it closes (or `STEP` passes: then the test
/// fails, since a refused peer must be closed, not left hanging).
fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let deadline = Instant::now() + STEP;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "the tracker did not close the connection");
        stream
            .set_read_timeout(Some(left.min(Duration::from_millis(200))))
            .unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            // A reset counts as closed.
            Err(_) => return got,
        }
    }
}

/// Waits until `path` (a tracker's log) contains `needle`.
fn wait_for_log(path: &Path, needle: &str) -> String {
    let deadline = Instant::now() + STEP;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "'{needle}' not logged in {}:\n{text}",
            path.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A tracker started by hand (own options, own state home); killed on drop.
struct Solo {
    proc: ProcGuard,
    log: PathBuf,
    /// The stdout line after the listening line.
    key_line: String,
}

/// Starts tracker `no` of `info` with `XDG_STATE_HOME=home` and `options`, and waits for its
/// two start lines.
fn start_solo(info: &Path, no: usize, home: &Path, options: &[&str], log: PathBuf) -> Solo {
    let stderr = File::create(&log).unwrap();
    let mut child = Command::new(TRACKER_BIN)
        .env("XDG_STATE_HOME", home)
        .args(options)
        .arg(info)
        .arg(no.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let proc = ProcGuard::new(child);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut lines = Vec::new();
    while lines.len() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                let err = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("tracker {no} did not start: {lines:?}\n{err}");
            }
        }
    }
    assert!(
        lines[0].starts_with(&format!("tracker {no} listening on ")),
        "{lines:?}"
    );
    Solo {
        proc,
        log,
        key_line: lines[1].clone(),
    }
}

/// The `ed25519:...` key of a `service key KEY in PATH` line.
fn key_of(line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words[..2], ["service", "key"], "{line}");
    assert_eq!(words[3], "in", "{line}");
    assert!(words[2].starts_with("ed25519:"), "{line}");
    words[2].to_string()
}

/// A client creates a user and group through the trackers in `info`; the outcome's stdout.
fn create(info: &Path, user: &str) {
    let out = Client::new(info).run(&[
        &format!("create_user {user} pw"),
        &format!("login {user} pw"),
        &format!("create_group g-{user}"),
    ]);
    out.check(
        &[
            &format!("user {user} created"),
            &format!("logged in as {user}"),
            &format!("group g-{user} created"),
        ],
        0,
        0,
    );
}

/// The group list as seen through the trackers in `info`, by a fresh user.
fn groups_through(info: &Path, user: &str) -> Vec<String> {
    let out = Client::new(info).run(&[
        &format!("create_user {user} pw"),
        &format!("login {user} pw"),
        "list_groups",
    ]);
    assert_eq!(out.code(), Some(0), "{:?} {:?}", out.stdout, out.stderr);
    out.stdout
        .iter()
        .skip(2)
        .map(|l| l.split('\t').next().unwrap_or("").to_string())
        .collect()
}

#[test]
fn trackers_of_one_file_share_one_key_and_replicate() {
    let cluster = Cluster::start(2);
    // One key file for the tracker file, private to its owner.
    let dir = cluster.info.parent().unwrap().join("p2pshare");
    let keys: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "key"))
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let mode = std::fs::metadata(&keys[0]).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // It is the copy of the one beside the tracker file, where the trackers look first.
    let beside = key_files_in(cluster.info.parent().unwrap());
    assert_eq!(beside.len(), 1, "{beside:?}");
    assert_eq!(
        std::fs::read(&beside[0]).unwrap(),
        std::fs::read(&keys[0]).unwrap()
    );
    // A change through one tracker is on the other.
    create(&cluster.info_for(&[1]), "alice");
    assert!(groups_through(&cluster.info_for(&[2]), "bob").contains(&"g-alice".to_string()));
}

#[test]
fn plaintext_tracker_hello_gets_nothing_and_changes_nothing() {
    let cluster = Cluster::start(2);
    create(&cluster.info_for(&[1]), "alice");
    // A stranger says it is tracker 2 (a new run of it), then asks for the state and tries
    // to order a change and to stop the service.
    let mut stream = TcpStream::connect(cluster.addrs[0]).unwrap();
    let mut bytes = Vec::new();
    ClientMsg::Hello {
        version: PROTOCOL_VERSION,
        role: Role::Tracker {
            no: 2,
            incarnation: 0xdead_beef,
        },
    }
    .emit(&mut bytes);
    ReplMsg::JoinRequest(None).emit(&mut bytes);
    ReplMsg::Heartbeat.emit(&mut bytes);
    stream.write_all(&bytes).unwrap();
    let got = read_until_closed(&mut stream);
    assert!(got.is_empty(), "the stranger was sent {} bytes", got.len());
    let logs = cluster.logs();
    assert!(
        logs.contains("without the service's handshake"),
        "no warning logged:\n{logs}"
    );
    // The real tracker 2 is still linked: a change through it is on tracker 1, and the
    // state from before is intact.
    create(&cluster.info_for(&[2]), "carol");
    let groups = groups_through(&cluster.info_for(&[1]), "dave");
    assert!(groups.contains(&"g-alice".to_string()), "{groups:?}");
    assert!(groups.contains(&"g-carol".to_string()), "{groups:?}");
}

#[test]
fn handshake_with_a_wrong_key_gets_nothing() {
    let cluster = Cluster::start(1);
    create(&cluster.info_for(&[1]), "alice");
    let mut stream = TcpStream::connect(cluster.addrs[0]).unwrap();
    let mut link = SecureLink::initiator(&Params::tracker_link([0x42; 32])).unwrap();
    stream.write_all(link.outgoing()).unwrap();
    let n = link.outgoing().len();
    link.advance_outgoing(n);
    let got = read_until_closed(&mut stream);
    assert!(got.is_empty(), "the stranger was sent {} bytes", got.len());
    let logs = cluster.logs();
    assert!(logs.contains("handshake failed"), "no warning:\n{logs}");
    assert!(logs.contains("WARN"), "{logs}");
    // Garbage after the magic gets nothing either.
    let mut stream = TcpStream::connect(cluster.addrs[0]).unwrap();
    stream.write_all(b"P2PT\x00\x01\x00\x30").unwrap();
    stream.write_all(&[0x55; 0x30]).unwrap();
    assert!(read_until_closed(&mut stream).is_empty());
    // The service still serves, with its state.
    let groups = groups_through(&cluster.info_for(&[1]), "bob");
    assert!(groups.contains(&"g-alice".to_string()), "{groups:?}");
}

/// The `*.key` files directly in `dir`.
fn key_files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "key"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn trackers_with_separate_state_homes_find_one_key_beside_their_tracker_file() {
    // A harness may give every process its own XDG_STATE_HOME: the trackers of one tracker
    // file must still be one service (the key is made beside the tracker file).
    let dir = tempfile::tempdir().unwrap();
    let ports = common::free_ports(2);
    let info = dir.path().join("tracker_info.txt");
    std::fs::write(
        &info,
        format!("127.0.0.1:{}\n127.0.0.1:{}\n", ports[0], ports[1]),
    )
    .unwrap();
    let homes = [dir.path().join("home1"), dir.path().join("home2")];
    let t1 = start_solo(&info, 1, &homes[0], &[], dir.path().join("t1.log"));
    let t2 = start_solo(&info, 2, &homes[1], &[], dir.path().join("t2.log"));
    assert_eq!(key_of(&t1.key_line), key_of(&t2.key_line));
    let beside = key_files_in(dir.path());
    assert_eq!(beside.len(), 1, "{beside:?}");
    let name = beside[0].file_name().unwrap().to_str().unwrap().to_string();
    assert!(name.starts_with(".p2pshare-service-"), "{name}");
    assert_eq!(
        std::fs::metadata(&beside[0]).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // One service: a change through tracker 1 is seen through tracker 2.
    let only = |no: usize| {
        let p = dir.path().join(format!("only-{no}.txt"));
        std::fs::write(&p, format!("127.0.0.1:{}\n", ports[no - 1])).unwrap();
        p
    };
    create(&only(1), "alice");
    assert!(groups_through(&only(2), "bob").contains(&"g-alice".to_string()));
    drop((t1.proc, t2.proc));
}

#[test]
fn a_key_on_the_own_line_without_its_key_file_creates_no_key() {
    let dir = tempfile::tempdir().unwrap();
    let info = dir.path().join("tracker_info.txt");
    let key = "ed25519:caYw7Udx7aESyOZBtTKdZVhBsOweLb7CsjO5aPleIkQ";
    std::fs::write(&info, format!("{} {key}\n", common::free_addr())).unwrap();
    let home = dir.path().join("home");
    let out = Command::new(TRACKER_BIN)
        .env("XDG_STATE_HOME", &home)
        .args([info.to_str().unwrap(), "1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(key) && err.contains("no key file"), "{err}");
    assert!(key_files_in(dir.path()).is_empty());
    assert!(key_files_in(&home.join("p2pshare")).is_empty());
}

#[test]
fn trackers_with_different_keys_do_not_link() {
    let dir = tempfile::tempdir().unwrap();
    let ports = common::free_ports(2);
    let addrs: Vec<SocketAddr> = ports
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    let info = dir.path().join("tracker_info.txt");
    std::fs::write(&info, format!("{}\n{}\n", addrs[0], addrs[1])).unwrap();
    let other_key = dir.path().join("other.key");
    let t1 = start_solo(&info, 1, dir.path(), &[], dir.path().join("t1.log"));
    let t2 = start_solo(
        &info,
        2,
        dir.path(),
        &["--service-key", other_key.to_str().unwrap()],
        dir.path().join("t2.log"),
    );
    assert_ne!(key_of(&t1.key_line), key_of(&t2.key_line));
    // Tracker 2 dials tracker 1: tracker 1 refuses the handshake, tracker 2 sees it closed.
    wait_for_log(&t1.log, "handshake failed");
    let log2 = wait_for_log(&t2.log, "during the handshake");
    assert!(log2.contains("WARN"), "{log2}");
    // Not one service: a change through tracker 1 is not seen through tracker 2.
    let only = |no: usize| {
        let p = dir.path().join(format!("only-{no}.txt"));
        std::fs::write(&p, format!("{}\n", addrs[no - 1])).unwrap();
        p
    };
    create(&only(1), "alice");
    let groups = groups_through(&only(2), "bob");
    assert!(!groups.contains(&"g-alice".to_string()), "{groups:?}");
    drop((t1.proc, t2.proc));
}

#[test]
fn key_on_tracker_lines_is_accepted_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let addr = common::free_addr();
    let plain = dir.path().join("plain.txt");
    std::fs::write(&plain, format!("{addr}\n")).unwrap();
    // --print-key creates the key and prints it, and says the same later.
    let home = dir.path().to_str().unwrap();
    let print = || {
        let out = Command::new(TRACKER_BIN)
            .env("XDG_STATE_HOME", home)
            .args(["--print-key", plain.to_str().unwrap()])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let key = print();
    assert!(key.starts_with("ed25519:"), "{key}");
    assert_eq!(print(), key);
    // A tracker file with the key on the line: the tracker starts (same key: the file name
    // depends on the addresses only), and clients read it too.
    let keyed = dir.path().join("tracker_info.txt");
    std::fs::write(&keyed, format!("# with key\n{addr} {key}\n")).unwrap();
    let t = start_solo(&keyed, 1, dir.path(), &[], dir.path().join("t.log"));
    assert_eq!(key_of(&t.key_line), key);
    create(&keyed, "alice");
    drop(t);
    // Another key on the tracker's own line: exit 2, naming both.
    let other = "ed25519:caYw7Udx7aESyOZBtTKdZVhBsOweLb7CsjO5aPleIkQ";
    assert_ne!(other, key);
    std::fs::write(&keyed, format!("{addr} {other}\n")).unwrap();
    let out = Command::new(TRACKER_BIN)
        .env("XDG_STATE_HOME", home)
        .args([keyed.to_str().unwrap(), "1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(other) && err.contains(&key), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_key_files_exit_2_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let info = dir.path().join("tracker_info.txt");
    std::fs::write(&info, format!("{}\n", common::free_addr())).unwrap();
    let info_s = info.to_str().unwrap();
    let key = dir.path().join("service.key");
    let key_s = key.to_str().unwrap();
    // Created on first use, with mode 0600.
    let (code, out, err) = run_program(
        TRACKER_BIN,
        &["--service-key", key_s, "--print-key", info_s],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Readable by the group: refused.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (code, out, err) = run_program(TRACKER_BIN, &["--service-key", key_s, info_s, "1"]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains(key_s) && err.contains("chmod 600"), "{err}");
    assert!(out.is_empty(), "{out}");
    // Corrupt: refused, and left as it was.
    std::fs::write(&key, "p2pshare-service-key-v1 AAAA\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, out, err) = run_program(TRACKER_BIN, &["--service-key", key_s, info_s, "1"]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains(key_s) && err.contains("corrupt"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&key).unwrap(),
        "p2pshare-service-key-v1 AAAA\n"
    );
    // Unreadable path (a directory where the file should be).
    let (code, _, err) = run_program(
        TRACKER_BIN,
        &["--service-key", dir.path().to_str().unwrap(), info_s, "1"],
    );
    assert_eq!(code, Some(2), "{err}");
}

#[test]
fn a_plain_client_hello_gets_nothing_by_default() {
    use p2pshare::wire::tracker_link::{Request, RequestBody};
    use p2pshare::wire::{Password, UserId};
    // A tracker started as a user would (no --accept-plain-clients).
    let tracker = common::Tracker::start_exactly(&[]);
    // A plain client says hello and asks to create a user, its password in clear.
    let mut stream = TcpStream::connect(tracker.addr).unwrap();
    let mut bytes = Vec::new();
    ClientMsg::hello(0x5ea1).emit(&mut bytes);
    ClientMsg::Request(Request {
        req_id: 1,
        body: RequestBody::CreateUser {
            user: UserId::new("mallory").unwrap(),
            password: Password::new(b"sent-in-clear").unwrap(),
        },
    })
    .emit(&mut bytes);
    stream.write_all(&bytes).unwrap();
    // No welcome, no answer: the connection is closed unread.
    let got = read_until_closed(&mut stream);
    assert!(
        got.is_empty(),
        "the plain client was sent {} bytes",
        got.len()
    );
    // Nothing changed: the user does not exist, so a real (secure) client can create it.
    Client::new(&tracker.info)
        .run(&["create_user mallory pw"])
        .check(&["user mallory created"], 0, 0);
    let logs = tracker.stderr();
    assert!(
        logs.contains("plain (unencrypted) client link refused"),
        "no warning logged:\n{logs}"
    );
}
