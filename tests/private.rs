//! End-to-end tests of SPEC.md's Security rules for clients, with the real binaries on
//! 127.0.0.1: a client's tracker link is encrypted (a relay in the middle records every byte
//! and never sees the password), and the client checks the tracker's service key (a wrong key
//! on the tracker's line, or another service behind a remembered address, is refused with an
//! `error: ` line naming the tracker and both keys; a key trusted on first use is remembered
//! in the state directory and checked on the next start).
//!
//! Every process is owned by a guard that kills it on drop; the relay's threads stop with it;
//! every wait has a generous deadline; every process gets a temporary `XDG_STATE_HOME`.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::{state_home, Client, RawTracker, Tracker};
use p2pshare::keys::{PublicKey, ServiceKey};
use p2pshare::wire::ids::{Password, UserId};
use p2pshare::wire::tracker_link::{ReplyBody, RequestBody};

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
