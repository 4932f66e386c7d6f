//! End-to-end tests of SPEC.md's Security rules for clients, with the real binaries on
//! 127.0.0.1: a client's tracker link is encrypted (a relay in the middle records every byte
//! and never sees the password), and the client checks the tracker's service key (a wrong key
//! on the tracker's line, or another service behind a remembered address, is refused with an
//! `error: ` line naming the tracker and both keys; a key trusted on first use is remembered
//! in the state directory and checked on the next start).
//!
//! Caps on peer links: a sharer flooded with handshaken connections (from one address, then
//! from many) keeps serving others and its own download completes.
//!
//! Every process is owned by a guard that kills it on drop; the relay's threads stop with it;
//! every wait has a generous deadline; every process gets a temporary `XDG_STATE_HOME`.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{identity_public, state_home, Client, LiveClient, RawTracker, SecurePeer, Tracker};
use p2pshare::client::transfers::{MAX_SERVE_LINKS, MAX_SERVE_LINKS_PER_ADDR};
use p2pshare::keys::{PublicKey, ServiceKey};
use p2pshare::wire::ids::{Password, UserId};
use p2pshare::wire::peer_link::DownloaderMsg;
use p2pshare::wire::ticket::Ticket;
use p2pshare::wire::tracker_link::{ReplyBody, RequestBody};
use p2pshare::wire::{FileName, GroupId, Sha1Digest, PROTOCOL_VERSION};

/// How long a relay's pump waits in one read before it looks at the stop flag.
const PUMP_TICK: Duration = Duration::from_millis(100);

/// A loopback TCP relay: every connection it accepts is forwarded to its current upstream,
/// and every byte in either direction is recorded.
struct Relay {
    addr: SocketAddr,
    upstream: Arc<Mutex<SocketAddr>>,
    recorded: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    accepted: Arc<Mutex<usize>>,
}

impl Relay {
    fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let relay = Relay {
            addr: listener.local_addr().unwrap(),
            upstream: Arc::new(Mutex::new(upstream)),
            recorded: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
            accepted: Arc::new(Mutex::new(0)),
        };
        let (upstream, recorded, stop, accepted) = (
            relay.upstream.clone(),
            relay.recorded.clone(),
            relay.stop.clone(),
            relay.accepted.clone(),
        );
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((down, _)) => {
                        *accepted.lock().unwrap() += 1;
                        let to = *upstream.lock().unwrap();
                        let Ok(up) = TcpStream::connect(to) else {
                            continue;
                        };
                        down.set_nonblocking(false).unwrap();
                        for (from, into) in [
                            (down.try_clone().unwrap(), up.try_clone().unwrap()),
                            (up, down),
                        ] {
                            let (recorded, stop) = (recorded.clone(), stop.clone());
                            thread::spawn(move || pump(from, into, &recorded, &stop));
                        }
                    }
                    // Nothing to accept: look again shortly (the stop flag ends the loop).
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        relay
    }

    /// New connections go to `addr` from now on.
    fn point_to(&self, addr: SocketAddr) {
        *self.upstream.lock().unwrap() = addr;
    }

    fn recorded(&self) -> Vec<u8> {
        self.recorded.lock().unwrap().clone()
    }

    fn accepted(&self) -> usize {
        *self.accepted.lock().unwrap()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Copies `from` to `into`, recording what passes, until either side closes or the relay
/// stops.
fn pump(mut from: TcpStream, mut into: TcpStream, recorded: &Mutex<Vec<u8>>, stop: &AtomicBool) {
    from.set_read_timeout(Some(PUMP_TICK)).unwrap();
    let mut buf = [0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                recorded.lock().unwrap().extend_from_slice(&buf[..n]);
                if into.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = into.shutdown(Shutdown::Write);
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The service key of the trackers started with `info` (in its state home).
fn service_key_of(info: &Path) -> PublicKey {
    let dir = state_home(info).join("p2pshare");
    let file: PathBuf = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "key"))
        .unwrap_or_else(|| panic!("no key file in {}", dir.display()));
    ServiceKey::load(&file).unwrap().public_key()
}

/// A tracker file in the tracker's directory that lists only `addr` (and `key`, if given).
fn info_for(tracker: &Tracker, name: &str, addr: SocketAddr, key: Option<PublicKey>) -> PathBuf {
    let info = tracker.dir.path().join(name);
    let line = match key {
        Some(key) => format!("{addr} {key}\n"),
        None => format!("{addr}\n"),
    };
    std::fs::write(&info, line).unwrap();
    info
}

#[test]
fn passwords_never_cross_the_tracker_link_in_clear() {
    let tracker = Tracker::start();
    let relay = Relay::start(tracker.addr);
    let info = info_for(&tracker, "relayed_info.txt", relay.addr, None);
    let password = "PW-marker-7d1e0c55";
    let out = Client::new(&info).run(&[
        &format!("create_user alice {password}"),
        &format!("login alice {password}"),
        "create_group GROUP-marker-31ab",
        "list_groups",
    ]);
    out.check(
        &[
            "user alice created",
            "logged in as alice",
            "group GROUP-marker-31ab created",
            "GROUP-marker-31ab\towner=alice\tmembers=1\tyou=owner",
        ],
        0,
        0,
    );
    let seen = relay.recorded();
    assert!(relay.accepted() >= 1);
    assert!(seen.len() > 200, "the relay saw {} bytes", seen.len());
    assert!(seen.starts_with(b"P2PC"), "not the secure client link");
    for marker in [password.as_bytes(), b"alice", b"GROUP-marker-31ab"] {
        assert!(
            !contains(&seen, marker),
            "{} crossed the link in clear",
            String::from_utf8_lossy(marker)
        );
    }

    // The recording can see a password: one sent on a plain link through the same relay.
    let mut raw = RawTracker::connect(relay.addr);
    let control = "PW-control-0b9f";
    assert_eq!(
        raw.call(RequestBody::CreateUser {
            user: UserId::new("bob").unwrap(),
            password: Password::new(control.as_bytes()).unwrap(),
        }),
        ReplyBody::Done
    );
    assert!(contains(&relay.recorded(), control.as_bytes()));
}

#[test]
fn a_wrong_key_on_the_tracker_line_is_refused_naming_both_keys() {
    let tracker = Tracker::start();
    let real = service_key_of(&tracker.info);
    let wrong = ServiceKey::from_seed([42u8; 32]).public_key();
    let relay = Relay::start(tracker.addr);
    let info = info_for(&tracker, "wrong_info.txt", relay.addr, Some(wrong));
    let out = Client::new(&info).run(&["create_user alice PW-marker-aa51", "show_downloads"]);
    assert_eq!(out.code(), Some(1), "{out:#?}");
    assert_eq!(out.errors.len(), 1, "{out:#?}");
    let error = &out.errors[0];
    for part in [relay.addr.to_string(), real.to_string(), wrong.to_string()] {
        assert!(error.contains(&part), "'{part}' not in {error}");
    }
    assert!(!contains(&relay.recorded(), b"PW-marker-aa51"));
    // The right key on the line works.
    let info = info_for(&tracker, "right_info.txt", tracker.addr, Some(real));
    Client::new(&info)
        .run(&["create_user alice pw"])
        .check(&["user alice created"], 0, 0);
}

#[test]
fn first_use_trust_is_remembered_and_checked_on_the_next_start() {
    let tracker = Tracker::start();
    let real = service_key_of(&tracker.info);
    // The client reaches its tracker through a relay, which later leads to another service.
    let relay = Relay::start(tracker.addr);
    let info = info_for(&tracker, "tofu_info.txt", relay.addr, None);
    let mut client = Client::new(&info);
    client
        .run(&["create_user alice pw"])
        .check(&["user alice created"], 0, 0);
    let known = state_home(&info)
        .join("p2pshare")
        .join(format!(
            "client-{}-{}",
            client.addr.ip(),
            client.addr.port()
        ))
        .join("known_trackers");
    let text = std::fs::read_to_string(&known).unwrap();
    assert!(text.contains(&format!("{} {real}", relay.addr)), "{text}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&known).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "{mode:o}");

    // Next start: the same service is accepted.
    client
        .run(&["login alice pw"])
        .check(&["logged in as alice"], 0, 0);

    // Next start, with another service behind the same address: refused, naming both keys.
    let impostor = Tracker::start();
    let other = service_key_of(&impostor.info);
    assert_ne!(other, real);
    relay.point_to(impostor.addr);
    let out = client.run(&["login alice PW-marker-e3c2", "show_downloads"]);
    assert_eq!(out.code(), Some(1), "{out:#?}");
    assert_eq!(out.errors.len(), 1, "{out:#?}");
    let error = &out.errors[0];
    for part in [
        relay.addr.to_string(),
        real.to_string(),
        other.to_string(),
        known.display().to_string(),
    ] {
        assert!(error.contains(&part), "'{part}' not in {error}");
    }
    // The impostor never learned the password, and the remembered key is unchanged.
    assert!(!contains(&relay.recorded(), b"PW-marker-e3c2"));
    assert_eq!(std::fs::read_to_string(&known).unwrap(), text);

    // A different client (its own state directory) trusts the impostor on first use: that
    // is what first use means, and why a key on the tracker line is stronger.
    Client::new(&info)
        .run(&["create_user mallory pw"])
        .check(&["user mallory created"], 0, 0);
}

/// With several trackers listed, a tracker that presents another key than the one remembered
/// is refused with an `error: ` line naming it and both keys, and the next tracker of the
/// file is not trusted on first use in its place: the trackers of a file are one service
/// with one key.
#[test]
fn a_mismatch_with_other_trackers_listed_fails_and_trusts_none_of_them() {
    let tracker = Tracker::start();
    let real = service_key_of(&tracker.info);
    let relay = Relay::start(tracker.addr);
    // Line 1 through the relay, line 2 the tracker itself (the same service).
    let info = tracker.dir.path().join("two_info.txt");
    std::fs::write(&info, format!("{}\n{}\n", relay.addr, tracker.addr)).unwrap();
    let mut client = Client::new(&info);
    client
        .run(&["create_user alice pw"])
        .check(&["user alice created"], 0, 0);
    let known = state_home(&info)
        .join("p2pshare")
        .join(format!(
            "client-{}-{}",
            client.addr.ip(),
            client.addr.port()
        ))
        .join("known_trackers");
    let text = std::fs::read_to_string(&known).unwrap();
    assert!(text.contains(&format!("{} {real}", relay.addr)), "{text}");

    let impostor = Tracker::start();
    let other = service_key_of(&impostor.info);
    relay.point_to(impostor.addr);
    let out = client.run(&["login alice PW-marker-5b7a"]);
    assert_eq!(out.code(), Some(1), "{out:#?}");
    assert_eq!(out.errors.len(), 1, "{out:#?}");
    let error = &out.errors[0];
    for part in [relay.addr.to_string(), real.to_string(), other.to_string()] {
        assert!(error.contains(&part), "'{part}' not in {error}");
    }
    assert!(out.stdout.is_empty(), "{out:#?}");
    // Nothing newly trusted, and the impostor never saw the password.
    assert_eq!(std::fs::read_to_string(&known).unwrap(), text);
    assert!(!contains(&relay.recorded(), b"PW-marker-5b7a"));
}

// ---------------------------------------------------------------------------------------
// Caps on peer links
// ---------------------------------------------------------------------------------------

/// Deadline of one download or flood step on a loaded machine.
const STEP: Duration = Duration::from_secs(90);
/// Connections of the big flood: more than the one cap of 4,096 peer links there was before
/// served links and the client's own links were limited apart.
const BIG_FLOOD: usize = 4500;
/// Connections per source address in the big flood (under the per-address cap).
const PER_SOURCE: usize = 30;

/// A TCP connection to `to` from the loopback address `from` (any of 127.0.0.0/8).
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use rustix::net::{AddressFamily, SocketType};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None)?;
    rustix::net::bind(&fd, &SocketAddrV4::new(from, 0))?;
    rustix::net::connect(&fd, &to)?;
    Ok(TcpStream::from(fd))
}

/// The ticket of member `user` (password `pw`) for `name` of group `g`, as the tracker hands
/// it out with the file's sharers (asked over a raw tracker link).
fn ticket_of(tracker: SocketAddr, user: &str, name: &str) -> Ticket {
    ticket_and_link(tracker, user, name).0
}

/// Like [`ticket_of`], with the raw tracker link `user` is logged in on.
fn ticket_and_link(tracker: SocketAddr, user: &str, name: &str) -> (Ticket, RawTracker) {
    let mut raw = RawTracker::connect(tracker);
    let login = raw.call(RequestBody::Login {
        user: UserId::new(user).unwrap(),
        password: Password::new(b"pw").unwrap(),
        peer_addr: "127.0.0.1:9".parse().unwrap(),
        shares: Vec::new(),
        client_key: common::raw_peer_public(),
        link: 0,
    });
    assert!(matches!(login, ReplyBody::LoggedIn { .. }), "{login:?}");
    match raw.call(RequestBody::FileSharers {
        group: GroupId::new("g").unwrap(),
        name: FileName::new(name).unwrap(),
    }) {
        ReplyBody::Sharers {
            ticket: Some(ticket),
            peers,
            peer_keys,
            ..
        } => {
            // The ticket names the key this link logged in with, and every sharer comes with
            // the (non-zero) identity key its client registered.
            assert_eq!(ticket.body.client_key, common::raw_peer_public());
            assert_eq!(peer_keys.len(), peers.len());
            assert!(peer_keys.iter().all(|k| *k != [0; 32]), "{peer_keys:?}");
            (*ticket, raw)
        }
        other => panic!("no ticket: {other:?}"),
    }
}

/// A downloader's ticket and handshake for `name` of group `g`, as a member (or a former
/// member whose ticket has not expired yet) would send them.
fn handshake_frame(ticket: &Ticket, name: &str, file_sha1: [u8; 20]) -> Vec<u8> {
    let mut out = Vec::new();
    DownloaderMsg::Ticket(Box::new(ticket.clone())).emit(&mut out);
    DownloaderMsg::Handshake {
        version: PROTOCOL_VERSION,
        group: GroupId::new("g").unwrap(),
        name: FileName::new(name).unwrap(),
        file_sha1: Sha1Digest(file_sha1),
    }
    .emit(&mut out);
    out
}

/// Opens `n` secure connections to `to` (whose identity key is `key`) from `from(i)`, each
/// sending `frame` in its handshake, then tells how many the sharer accepted (answered with a
/// frame) and keeps those open; the rest it closed.
fn flood(
    to: SocketAddr,
    key: [u8; 32],
    n: usize,
    from: impl Fn(usize) -> Ipv4Addr,
    frame: &[u8],
) -> Vec<SecurePeer> {
    let deadline = Instant::now() + STEP;
    let mut streams = Vec::with_capacity(n);
    for i in 0..n {
        assert!(
            Instant::now() < deadline,
            "flood: {i} connections in {STEP:?}"
        );
        let stream = connect_from(from(i), to).expect("flood connect");
        // A write may fail on a connection the sharer closed at once.
        if let Ok(peer) = SecurePeer::begin(stream, &common::RAW_PEER_PRIVATE, &key, frame) {
            streams.push(peer);
        }
    }
    let mut held = Vec::new();
    for mut peer in streams {
        let left = deadline.saturating_duration_since(Instant::now());
        peer.stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match peer.read_frame() {
            Ok(first) => {
                // 0x81: Accept. Anything else is a refusal of a handshake that was valid.
                assert_eq!(first[0], 0x81, "flood handshake refused");
                held.push(peer);
            }
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("flood: no answer and no close: {e}"),
        }
    }
    held
}

fn sha1_of(data: &[u8]) -> [u8; 20] {
    use sha1::Digest;
    sha1::Sha1::digest(data).into()
}

/// Bytes that differ from file to file and along a file.
fn varied(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

#[track_caller]
fn download(live: &mut LiveClient, name: &str, dest: &Path, size: usize) {
    let target = dest.join(name);
    live.send(&format!("download_file g {name} {}/", dest.display()));
    let started = live.next_out_within(STEP);
    assert!(
        started.starts_with(&format!("download of {name} from group g started: ")),
        "{started}"
    );
    let done = live.next_out_within(STEP);
    assert!(
        done.starts_with(&format!(
            "downloaded {name} from group g to {} ({size} bytes in ",
            target.display()
        )),
        "{done}"
    );
}

#[test]
fn a_handshake_flood_on_a_sharer_never_stops_its_own_download() {
    // The flood holds up to BIG_FLOOD sockets in this process.
    let open_files = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    let big_flood = if open_files >= (BIG_FLOOD + 1000) as u64 {
        BIG_FLOOD
    } else {
        eprintln!("open file limit {open_files}: a smaller flood");
        (open_files as usize)
            .saturating_sub(1000)
            .max(MAX_SERVE_LINKS + 100)
    };
    let tracker = Tracker::start();
    let out = tracker.run(&[
        "create_user alice pw",
        "create_user bob pw",
        "create_user mallory pw",
        "login bob pw",
        "create_group g",
        "logout",
        "login alice pw",
        "join_group g",
        "logout",
        "login mallory pw",
        "join_group g",
        "logout",
        "login bob pw",
        "accept_request g alice",
        "accept_request g mallory",
        "logout",
    ]);
    assert_eq!(out.code(), Some(0), "{out:#?}");
    let root = tracker.dir.path().canonicalize().unwrap();
    let (alice_dir, bob_dir) = (root.join("alice"), root.join("bob"));
    std::fs::create_dir(&alice_dir).unwrap();
    std::fs::create_dir(&bob_dir).unwrap();
    let small = varied(1 << 20, 1);
    let big = varied(24 << 20, 2);
    std::fs::write(alice_dir.join("small.bin"), &small).unwrap();
    std::fs::write(bob_dir.join("big.bin"), &big).unwrap();

    // Alice shares small.bin; bob shares big.bin.
    let mut alice = tracker.client().cwd(&alice_dir).live();
    alice.cmd("login alice pw", &["logged in as alice"]);
    alice.cmd(
        "upload_file small.bin g",
        &["uploaded small.bin to group g (1048576 bytes, 2 pieces)"],
    );
    let mut bob = tracker.client().cwd(&bob_dir).live();
    bob.cmd("login bob pw", &["logged in as bob"]);
    bob.cmd(
        "upload_file big.bin g",
        &["uploaded big.bin to group g (25165824 bytes, 48 pieces)"],
    );
    // The flood: mallory's ticket (valid: she is a member) on every connection.
    let ticket = ticket_of(tracker.addr, "mallory", "small.bin");
    let frame = handshake_frame(&ticket, "small.bin", sha1_of(&small));

    // A flood from one address gets the per-address cap, and others are still served.
    let one = Ipv4Addr::new(127, 0, 0, 2);
    let alice_key = identity_public(&tracker.info, alice.addr);
    let held_one = flood(alice.addr, alice_key, 100, |_| one, &frame);
    assert_eq!(held_one.len(), MAX_SERVE_LINKS_PER_ADDR);
    let bob_dl = tempfile::tempdir().unwrap();
    let bob_dl_dir = bob_dl.path().canonicalize().unwrap();
    download(&mut bob, "small.bin", &bob_dl_dir, small.len());
    assert_eq!(std::fs::read(bob_dl_dir.join("small.bin")).unwrap(), small);

    // A flood from many addresses fills the served links' cap, never the links alice
    // opens for her own download.
    let held_many = flood(
        alice.addr,
        alice_key,
        big_flood,
        |i| {
            Ipv4Addr::new(
                127,
                0,
                1 + (i / PER_SOURCE / 250) as u8,
                1 + (i / PER_SOURCE % 250) as u8,
            )
        },
        &frame,
    );
    assert!(
        held_one.len() + held_many.len() <= MAX_SERVE_LINKS,
        "{} + {} served links",
        held_one.len(),
        held_many.len()
    );
    // Bob's link for small.bin may not be closed yet at alice.
    assert!(
        held_one.len() + held_many.len() >= MAX_SERVE_LINKS - 1,
        "the cap was not reached: {} + {} held",
        held_one.len(),
        held_many.len()
    );
    let alice_dl = tempfile::tempdir().unwrap();
    let alice_dl_dir = alice_dl.path().canonicalize().unwrap();
    download(&mut alice, "big.bin", &alice_dl_dir, big.len());
    assert_eq!(std::fs::read(alice_dl_dir.join("big.bin")).unwrap(), big);
    drop(held_one);
    drop(held_many);
    let (status, _) = alice.finish();
    assert_eq!(status.code(), Some(0));
}

/// Idle connections (that never send a handshake) from the downloader's own address, beyond
/// the per-address cap and kept coming while the download runs, never lock it out: a new
/// connection takes the place of the quietest one not yet accepted, and those are closed
/// after 3 s anyway.
#[test]
fn idle_connections_past_the_per_address_cap_never_stop_a_download() {
    let tracker = Tracker::start();
    let out = tracker.run(&[
        "create_user alice pw",
        "create_user bob pw",
        "login alice pw",
        "create_group g",
        "logout",
        "login bob pw",
        "join_group g",
        "logout",
        "login alice pw",
        "accept_request g bob",
        "logout",
    ]);
    assert_eq!(out.code(), Some(0), "{out:#?}");
    let root = tracker.dir.path().canonicalize().unwrap();
    let alice_dir = root.join("alice");
    std::fs::create_dir(&alice_dir).unwrap();
    let data = varied(8 << 20, 3);
    std::fs::write(alice_dir.join("f.bin"), &data).unwrap();
    let mut alice = tracker.client().cwd(&alice_dir).live();
    alice.cmd("login alice pw", &["logged in as alice"]);
    alice.cmd(
        "upload_file f.bin g",
        &["uploaded f.bin to group g (8388608 bytes, 16 pieces)"],
    );
    let mut bob = tracker.client().live();
    bob.cmd("login bob pw", &["logged in as bob"]);

    // Twice the per-address cap of silent connections from 127.0.0.1, bob's address too.
    let to = alice.addr;
    let mut idle: Vec<TcpStream> = (0..2 * MAX_SERVE_LINKS_PER_ADDR)
        .map(|_| TcpStream::connect(to).expect("idle connect"))
        .collect();
    // More keep coming while bob downloads (a thread, stopped and joined below).
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut opened = 0usize;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(s) = TcpStream::connect(to) {
                    idle.push(s);
                    opened += 1;
                }
                if idle.len() > 4 * MAX_SERVE_LINKS_PER_ADDR {
                    idle.drain(..MAX_SERVE_LINKS_PER_ADDR);
                }
                thread::sleep(Duration::from_millis(20));
            }
            opened
        })
    };
    let dl = tempfile::tempdir().unwrap();
    let dl_dir = dl.path().canonicalize().unwrap();
    download(&mut bob, "f.bin", &dl_dir, data.len());
    stop.store(true, Ordering::Relaxed);
    let opened = flooder.join().unwrap();
    assert!(opened > 0, "the flood stopped before the download");
    assert_eq!(std::fs::read(dl_dir.join("f.bin")).unwrap(), data);
    let (status, _) = bob.finish();
    assert_eq!(status.code(), Some(0));
    let (status, _) = alice.finish();
    assert_eq!(status.code(), Some(0));
}

/// A member who leaves the group while downloading gets no more of the file: the client stops
/// its user's downloads in that group with an `error: ` line, and the target never appears
/// (the `.part` is removed).
#[test]
fn leaving_a_group_during_a_download_stops_it() {
    let tracker = Tracker::start();
    let out = tracker.run(&[
        "create_user alice pw",
        "create_user carol pw",
        "login alice pw",
        "create_group g",
        "logout",
        "login carol pw",
        "join_group g",
        "logout",
        "login alice pw",
        "accept_request g carol",
        "logout",
    ]);
    assert_eq!(out.code(), Some(0), "{out:#?}");
    let root = tracker.dir.path().canonicalize().unwrap();
    let alice_dir = root.join("alice");
    std::fs::create_dir(&alice_dir).unwrap();
    // Large enough that the download is still running when the leave is answered (one round
    // trip to the tracker after the download started).
    let data = varied(64 << 20, 4);
    std::fs::write(alice_dir.join("big.bin"), &data).unwrap();
    let mut alice = tracker.client().cwd(&alice_dir).live();
    alice.cmd("login alice pw", &["logged in as alice"]);
    alice.cmd(
        "upload_file big.bin g",
        &["uploaded big.bin to group g (67108864 bytes, 128 pieces)"],
    );
    let mut carol = tracker.client().live();
    carol.cmd("login carol pw", &["logged in as carol"]);
    let dl = tempfile::tempdir().unwrap();
    let dl_dir = dl.path().canonicalize().unwrap();
    carol.send(&format!("download_file g big.bin {}/", dl_dir.display()));
    carol.send("leave_group g");
    let (mut left, mut stopped) = (false, false);
    while !(left && stopped) {
        match carol.next_any_within(STEP) {
            Ok(line) if line == "left group g" => left = true,
            Ok(line) if line.starts_with("download of big.bin from group g started: ") => {}
            Ok(line) => panic!("unexpected: {line}; seen:\n{}", carol.seen()),
            Err(e) if e == "error: download of big.bin from group g failed: its user left the group" => {
                stopped = true
            }
            Err(e) => panic!("unexpected: {e}; seen:\n{}", carol.seen()),
        }
    }
    assert!(
        !dl_dir.join("big.bin").exists(),
        "the former member got the file"
    );
    assert!(!dl_dir.join("big.bin.part").exists(), "the .part stayed");
    carol.cmd("show_downloads", &["[F] [g] big.bin"]);
    let (status, rest) = carol.finish();
    assert!(
        !rest.iter().any(|l| l.starts_with("downloaded big.bin")),
        "{rest:?}"
    );
    // A download failed: exit status 1 (SPEC).
    assert_eq!(status.code(), Some(1), "{rest:?}");
    let (status, _) = alice.finish();
    assert_eq!(status.code(), Some(0));
}

// ---------------------------------------------------------------------------------------
// Tickets: member-only serving
// ---------------------------------------------------------------------------------------

/// The service key of the trackers started with `info` (the test may read it: it plays the
/// tracker that signs, to make tickets with chosen fields).
fn service_secret_of(info: &Path) -> ServiceKey {
    let dir = state_home(info).join("p2pshare");
    let file: PathBuf = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "key"))
        .unwrap();
    ServiceKey::load(&file).unwrap()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Connects to a sharer whose identity key is `key` over a secure link, sends `bytes` in the
/// handshake and returns the first frame's type (and a Refuse's code), or `None` if it closes
/// first; the link stays open for more.
fn ask(addr: SocketAddr, key: &[u8; 32], bytes: &[u8]) -> (SecurePeer, Option<(u8, u16)>) {
    let mut s = SecurePeer::connect(addr, key, bytes);
    s.stream.set_read_timeout(Some(STEP)).unwrap();
    let answer = s.read_frame().ok().map(|f| {
        let code = if f[0] == 0x82 {
            u16::from_be_bytes([f[1], f[2]])
        } else {
            0
        };
        (f[0], code)
    });
    (s, answer)
}

/// Whether the peer closes `s` within `within` (reading and dropping what comes).
fn closes_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

fn request_frame(piece: u32, offset: u32, len: u32) -> Vec<u8> {
    let mut out = Vec::new();
    DownloaderMsg::Request(p2pshare::wire::peer_link::BlockRef { piece, offset, len })
        .emit(&mut out);
    out
}

#[test]
fn sharers_serve_only_with_a_current_ticket_of_the_service() {
    let tracker = Tracker::start();
    let out = tracker.run(&[
        "create_user alice pw",
        "create_user mallory pw",
        "login alice pw",
        "create_group g",
        "create_group other",
        "logout",
        "login mallory pw",
        "join_group g",
        "logout",
        "login alice pw",
        "accept_request g mallory",
        "logout",
    ]);
    assert_eq!(out.code(), Some(0), "{out:#?}");
    let dir = tracker.dir.path().canonicalize().unwrap();
    let data = varied(3 << 20, 3);
    std::fs::write(dir.join("t.bin"), &data).unwrap();
    let sha1 = sha1_of(&data);
    let mut alice = tracker.client().cwd(&dir).live();
    alice.cmd("login alice pw", &["logged in as alice"]);
    alice.cmd(
        "upload_file t.bin g",
        &["uploaded t.bin to group g (3145728 bytes, 6 pieces)"],
    );
    let key = service_secret_of(&tracker.info);
    let sign_for = |expires: u64, group: &str, file: [u8; 20], key: &ServiceKey, client| {
        key.sign_ticket(p2pshare::wire::ticket::TicketBody {
            expires,
            file_sha1: Sha1Digest(file),
            group: GroupId::new(group).unwrap(),
            user: UserId::new("mallory").unwrap(),
            client_key: client,
        })
    };
    let sign = |expires: u64, group: &str, file: [u8; 20], key: &ServiceKey| {
        sign_for(expires, group, file, key, common::raw_peer_public())
    };
    let alice_key = identity_public(&tracker.info, alice.addr);
    let hs = |t: &Ticket| handshake_frame(t, "t.bin", sha1);
    let mut plain_hs = Vec::new();
    DownloaderMsg::handshake(
        GroupId::new("g").unwrap(),
        FileName::new("t.bin").unwrap(),
        Sha1Digest(sha1),
    )
    .emit(&mut plain_hs);

    // A member's ticket from the tracker: served.
    let (issued, mut raw) = ticket_and_link(tracker.addr, "mallory", "t.bin");
    assert_eq!(issued.body.user.as_str(), "mallory");
    // Valid for the ticket life (60 s), counted from its issue.
    let life = p2pshare::tracker::tickets::TICKET_LIFE_SECS;
    assert!(issued.body.expires > unix_now() + life / 2);
    assert!(issued.body.expires <= unix_now() + life);
    let (_s, answer) = ask(alice.addr, &alice_key, &hs(&issued));
    assert_eq!(answer, Some((0x81, 0)), "a valid ticket");

    // A downloader told another key for this address (the process there does not hold the
    // key it expects) gets no answer: the sharer cannot read its handshake and closes.
    let other_identity = p2pshare::client::identity::public_of(&[7; 32]);
    let (_wrong, answer) = ask(alice.addr, &other_identity, &hs(&issued));
    assert_eq!(answer, None, "a handshake to another key was answered");

    // Missing, forged (another key), expired, another group's, another file's: refused
    // with code 4.
    let later = unix_now() + 600;
    let other_key = ServiceKey::from_seed([77; 32]);
    let cases: [(&str, Vec<u8>); 6] = [
        ("no ticket", plain_hs.clone()),
        (
            "another client's key",
            hs(&sign_for(later, "g", sha1, &key, [9; 32])),
        ),
        ("another key", hs(&sign(later, "g", sha1, &other_key))),
        ("expired", hs(&sign(unix_now() - 5, "g", sha1, &key))),
        ("another group", hs(&sign(later, "other", sha1, &key))),
        ("another file", hs(&sign(later, "g", [1; 20], &key))),
    ];
    for (name, bytes) in cases {
        let (mut s, answer) = ask(alice.addr, &alice_key, &bytes);
        assert_eq!(answer, Some((0x82, 4)), "{name}");
        assert!(closes_within(&mut s.stream, STEP), "{name}: still open");
    }

    // A link whose ticket expires closes then; one whose ticket is renewed stays.
    let soon = unix_now() + 3;
    let (mut lapsing, answer) = ask(alice.addr, &alice_key, &hs(&sign(soon, "g", sha1, &key)));
    assert_eq!(answer, Some((0x81, 0)));
    let (mut renewed, answer) = ask(alice.addr, &alice_key, &hs(&sign(soon, "g", sha1, &key)));
    assert_eq!(answer, Some((0x81, 0)));
    let mut renewal = Vec::new();
    DownloaderMsg::Ticket(Box::new(sign(later, "g", sha1, &key))).emit(&mut renewal);
    renewed.send(&renewal).unwrap();
    assert!(
        closes_within(&mut lapsing.stream, STEP),
        "an expired ticket's link stayed open"
    );
    assert!(unix_now() >= soon, "closed before its ticket expired");
    renewed.send(&request_frame(0, 0, 16)).unwrap();
    let block = renewed.read_frame().expect("a block on the renewed link");
    assert_eq!(block[0], 0x84);
    assert_eq!(&block[9..], &data[..16]);
    // A renewal that does not verify ends the link.
    let mut bad = Vec::new();
    DownloaderMsg::Ticket(Box::new(sign(later, "g", sha1, &other_key))).emit(&mut bad);
    renewed.send(&bad).unwrap();
    assert!(
        closes_within(&mut renewed.stream, STEP),
        "a forged renewal was kept"
    );

    // A member who leaves gets no more tickets (no sharers either).
    assert_eq!(
        raw.call(RequestBody::LeaveGroup {
            group: GroupId::new("g").unwrap()
        }),
        ReplyBody::Done
    );
    assert!(matches!(
        raw.call(RequestBody::FileSharers {
            group: GroupId::new("g").unwrap(),
            name: FileName::new("t.bin").unwrap(),
        }),
        ReplyBody::Refused { .. }
    ));
    let (status, _) = alice.finish();
    assert_eq!(status.code(), Some(0));
}

/// A marker inside a shared file: it must never appear on the wire between two peers.
const MARKER: &[u8] = b"p2pshare-private-marker-5f0c1e";

#[test]
fn file_contents_never_cross_a_peer_link_in_clear() {
    let tracker = Tracker::start();
    let out = tracker.run(&[
        "create_user alice pw",
        "create_user bob pw",
        "create_user mallory pw",
        "login alice pw",
        "create_group g",
        "logout",
        "login bob pw",
        "join_group g",
        "logout",
        "login mallory pw",
        "join_group g",
        "logout",
        "login alice pw",
        "accept_request g bob",
        "accept_request g mallory",
        "logout",
    ]);
    assert_eq!(out.code(), Some(0), "{out:#?}");
    let dir = tracker.dir.path().canonicalize().unwrap();
    let mut data = varied(1 << 20, 9);
    for at in [1000, 70_000, 131_000] {
        data[at..at + MARKER.len()].copy_from_slice(MARKER);
    }
    std::fs::write(dir.join("m.bin"), &data).unwrap();
    let sha1 = sha1_of(&data);
    let mut alice = tracker.client().cwd(&dir).live();
    alice.cmd("login alice pw", &["logged in as alice"]);
    alice.cmd(
        "upload_file m.bin g",
        &["uploaded m.bin to group g (1048576 bytes, 2 pieces)"],
    );
    // Bob shares the same content in the plain protocol (the test switch): the control that
    // shows the recording would see the marker.
    let mut bob = tracker.client().cwd(&dir).plain_peer_links().live();
    bob.cmd("login bob pw", &["logged in as bob"]);
    bob.cmd(
        "upload_file m.bin g",
        &["sharing m.bin in group g (same content as the file already there)"],
    );
    let ticket = ticket_of(tracker.addr, "mallory", "m.bin");
    let first = handshake_frame(&ticket, "m.bin", sha1);
    let relay = Relay::start(alice.addr);

    // Through the relay to alice, over a secure link: the blocks arrive whole and right, and
    // the recording of both directions never holds the marker.
    let alice_key = identity_public(&tracker.info, alice.addr);
    let mut peer = SecurePeer::connect(relay.addr, &alice_key, &first);
    assert_eq!(peer.read_frame().expect("accept")[0], 0x81);
    let block_len = 128 * 1024;
    peer.send(
        &[
            request_frame(0, 0, block_len),
            request_frame(0, block_len, block_len),
        ]
        .concat(),
    )
    .unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let block = peer.read_frame().expect("a block");
        assert_eq!(block[0], 0x84);
        got.extend_from_slice(&block[9..]);
    }
    assert_eq!(got, data[..2 * block_len as usize]);
    assert!(contains(&got, MARKER));
    let recorded = relay.recorded();
    assert!(
        recorded.len() > 2 * block_len as usize,
        "{} bytes",
        recorded.len()
    );
    assert!(
        !contains(&recorded, MARKER),
        "the marker crossed the link in clear"
    );
    assert!(
        !contains(&recorded, b"m.bin"),
        "the file name crossed the link in clear"
    );
    drop(peer);

    // The same exchange with a plain peer through the same relay shows the marker: the
    // recording can fail.
    relay.point_to(bob.addr);
    let mut plain = TcpStream::connect(relay.addr).unwrap();
    plain.set_read_timeout(Some(STEP)).unwrap();
    plain.write_all(&first).unwrap();
    assert_eq!(common::read_frame(&mut plain).expect("accept")[0], 0x81);
    plain.write_all(&request_frame(0, 0, block_len)).unwrap();
    let block = common::read_frame(&mut plain).expect("a block");
    assert_eq!(block[9..], data[..block_len as usize]);
    assert!(contains(&relay.recorded(), MARKER));
    drop(plain);
    let (status, _) = bob.finish();
    assert_eq!(status.code(), Some(0));
    let (status, _) = alice.finish();
    assert_eq!(status.code(), Some(0));
}
