//! The tracker under hostile or heavy clients (issue 11), against the real binary: raw
//! connections speaking the wire format, as an attacker's script would.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{free_port, Client, Cluster, Tracker};
use p2pshare::wire::frame::{FrameBuffer, MAX_CLIENT_TRACKER_FRAME};
use p2pshare::wire::tracker_link::{
    ClientMsg, RejectCode, Reply, ReplyBody, Request, RequestBody, TrackerMsg,
};
use p2pshare::wire::{GroupId, Password, UserId};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A client link spoken by hand.
struct Raw {
    stream: TcpStream,
    rbuf: FrameBuffer,
}

impl Raw {
    /// Connects and handshakes as client process `client`.
    fn connect(addr: SocketAddr, client: u64) -> Raw {
        let stream = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(TIMEOUT)).unwrap();
        let mut raw = Raw {
            stream,
            rbuf: FrameBuffer::new(MAX_CLIENT_TRACKER_FRAME),
        };
        raw.write(&ClientMsg::hello(client));
        match raw.recv() {
            TrackerMsg::Welcome { .. } => raw,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    fn write(&mut self, msg: &ClientMsg) {
        let mut out = Vec::new();
        msg.emit(&mut out);
        self.stream.write_all(&out).expect("send");
    }

    /// Sends the requests numbered from `first`, pipelined.
    fn send_all(&mut self, first: u64, bodies: &[RequestBody]) {
        let mut out = Vec::new();
        for (i, body) in bodies.iter().enumerate() {
            ClientMsg::Request(Request {
                req_id: first + i as u64,
                body: body.clone(),
            })
            .emit(&mut out);
        }
        self.stream.write_all(&out).expect("send");
    }

    /// The next frame's payload, within [`TIMEOUT`].
    fn recv_payload(&mut self) -> Vec<u8> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(p) = self.rbuf.next_frame().expect("a well-formed frame") {
                return p.to_vec();
            }
            assert!(Instant::now() < deadline, "no frame within {TIMEOUT:?}");
            match self.stream.read(self.rbuf.spare()) {
                Ok(0) => panic!("closed by the tracker"),
                Ok(n) => self.rbuf.commit(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    fn recv(&mut self) -> TrackerMsg {
        TrackerMsg::parse(&self.recv_payload()).expect("a well-formed message")
    }

    /// Sends one request and returns its answer.
    fn call(&mut self, req_id: u64, body: RequestBody) -> ReplyBody {
        self.send_all(req_id, &[body]);
        match self.recv() {
            TrackerMsg::Reply(Reply { req_id: id, body }) if id == req_id => body,
            other => panic!("expected the reply to {req_id}, got {other:?}"),
        }
    }
}

fn uid(s: &str) -> UserId {
    UserId::new(s).unwrap()
}

fn pw(s: &str) -> Password {
    Password::new(s.as_bytes()).unwrap()
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// A member pipelines a thousand requests with 274 KB answers and reads none of them: the
/// tracker stops reading that connection once its answers pass the output cap (instead of
/// making 274 MB of them, or 70 MB a turn), serves others meanwhile, and drops none: once the
/// member reads, every answer arrives, in order.
#[test]
fn unread_answers_are_held_back_not_piled_up() {
    const GROUPS: u64 = 2000;
    const ASKS: u64 = 1000;
    let tracker = Tracker::start_with(&["--max-groups-per-user".into(), "5000".into()]);
    let owner = "o".repeat(64);
    let mut member = Raw::connect(tracker.addr, 1);
    assert_eq!(
        member.call(
            1,
            RequestBody::CreateUser {
                user: uid(&owner),
                password: pw("pw"),
            }
        ),
        ReplyBody::Done
    );
    assert!(matches!(
        member.call(
            2,
            RequestBody::Login {
                user: uid(&owner),
                password: pw("pw"),
                peer_addr: SocketAddr::from(([127, 0, 0, 1], 9)),
                shares: Vec::new(),
                client_key: [0; 32],
                link: 0,
            }
        ),
        ReplyBody::LoggedIn { .. }
    ));
    let creates: Vec<RequestBody> = (0..GROUPS)
        .map(|i| RequestBody::CreateGroup {
            group: GroupId::new(&format!("{i:04}{}", "g".repeat(60))).unwrap(),
        })
        .collect();
    member.send_all(100, &creates);
    for i in 0..GROUPS {
        match member.recv() {
            TrackerMsg::Reply(Reply {
                req_id,
                body: ReplyBody::Done,
            }) => assert_eq!(req_id, 100 + i),
            other => panic!("create_group {i}: {other:?}"),
        }
    }
    let before = rss_kib(tracker.pid());

    let asks = vec![RequestBody::ListGroups; ASKS as usize];
    member.send_all(10_000, &asks);
    // Another client is served meanwhile, again and again.
    let mut other = Raw::connect(tracker.addr, 2);
    let mut max_rss = before;
    for i in 0..50 {
        assert_eq!(other.call(i, RequestBody::Ping), ReplyBody::Pong);
        max_rss = max_rss.max(rss_kib(tracker.pid()));
    }
    let grew_mib = (max_rss.saturating_sub(before)) as f64 / 1024.0;
    eprintln!("tracker RSS {before} KiB before, at most {max_rss} KiB with {ASKS} answers unread");
    // Without the cap it made 256 answers (70 MB) per turn, and all 274 MB if unread.
    assert!(
        grew_mib < 32.0,
        "the tracker grew by {grew_mib:.1} MiB holding unread answers"
    );

    // Every answer arrives, in order (only the ids of all but the last are decoded).
    let mut last = Vec::new();
    for i in 0..ASKS {
        let payload = member.recv_payload();
        let id = u64::from_be_bytes(payload[1..9].try_into().unwrap());
        assert_eq!(id, 10_000 + i, "answers in order, none dropped");
        last = payload;
    }
    match TrackerMsg::parse(&last).unwrap() {
        TrackerMsg::Reply(Reply {
            body: ReplyBody::Groups(groups),
            ..
        }) => assert_eq!(groups.len(), GROUPS as usize),
        other => panic!("{other:?}"),
    }
    assert_eq!(member.call(20_000, RequestBody::Ping), ReplyBody::Pong);
}

/// Client ids travel in clear: a thief who copies one, and the id of its owner's login
/// request, gets no session by replaying it, whatever password it proves, and cannot end the
/// owner's session by logging in under that id.
#[test]
fn a_copied_client_id_and_request_id_get_no_session() {
    let tracker = Tracker::start();
    let mut owner = Raw::connect(tracker.addr, 0xA11CE);
    let login = |user: &str, password: &str| RequestBody::Login {
        user: uid(user),
        password: pw(password),
        peer_addr: SocketAddr::from(([127, 0, 0, 1], 9)),
        shares: Vec::new(),
        client_key: [0; 32],
        link: 0,
    };
    let create = |user: &str, password: &str| RequestBody::CreateUser {
        user: uid(user),
        password: pw(password),
    };
    assert_eq!(owner.call(1, create("alice", "right")), ReplyBody::Done);
    let ReplyBody::LoggedIn { token } = owner.call(5, login("alice", "right")) else {
        panic!("alice logs in");
    };
    let mut thief = Raw::connect(tracker.addr, 0xA11CE);
    assert_eq!(thief.call(1000, create("mallory", "mine")), ReplyBody::Done);
    for body in [login("alice", "guess"), login("mallory", "mine")] {
        match thief.call(5, body) {
            ReplyBody::Refused { .. } => {}
            other => panic!("the replayed login was answered {other:?}"),
        }
    }
    match thief.call(6, login("mallory", "mine")) {
        ReplyBody::Refused { .. } => {}
        other => panic!("a login under the copied id was answered {other:?}"),
    }
    match thief.call(7, RequestBody::ListGroups) {
        ReplyBody::Refused { .. } => {}
        other => panic!("the thief has a session: {other:?}"),
    }
    drop(thief);
    // The owner's session is whole, its token unchanged.
    assert_eq!(
        owner.call(8, RequestBody::ListGroups),
        ReplyBody::Groups(vec![])
    );
    let mut again = Raw::connect(tracker.addr, 0xA11CE);
    assert_eq!(
        again.call(9, RequestBody::Resume { token, link: 0 }),
        ReplyBody::LoggedIn { token }
    );
    // The resume moved the session: the old link is detached.
    match owner.call(10, RequestBody::ListGroups) {
        ReplyBody::Refused { .. } => {}
        other => panic!("the old link still acts on the session: {other:?}"),
    }
}

/// A connection that says its client listens on another IP than the one it comes from is
/// refused at login with a clear error (downloaders would be sent to someone else), unless
/// the tracker was told to accept that; a wrong password is reported as such first.
#[test]
fn a_listen_address_on_a_foreign_ip_is_refused_at_login() {
    let tracker = Tracker::start();
    tracker
        .client()
        .run(&["create_user a pw"])
        .check(&["user a created"], 0, 0);
    // Connected from 127.0.0.1, claiming to listen on 127.0.0.2.
    let foreign = SocketAddr::from(([127, 0, 0, 2], free_port()));
    let login = |password: &str| RequestBody::Login {
        user: uid("a"),
        password: pw(password),
        peer_addr: foreign,
        shares: Vec::new(),
        client_key: [0; 32],
        link: 0,
    };
    let mut raw = Raw::connect(tracker.addr, 0xF0E1);
    match raw.call(1, login("wrong")) {
        ReplyBody::Refused { code, .. } => assert_eq!(code, RejectCode::WrongPassword),
        other => panic!("{other:?}"),
    }
    match raw.call(2, login("pw")) {
        ReplyBody::Refused { code, message } => {
            assert_eq!(code, RejectCode::BadRequest);
            assert!(
                message.contains(&format!(
                    "listen address {foreign} is not on this connection"
                )),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }

    let lenient = Tracker::start_with(&["--allow-foreign-addresses".into()]);
    lenient
        .client()
        .run(&["create_user a pw"])
        .check(&["user a created"], 0, 0);
    let mut raw = Raw::connect(lenient.addr, 0xF0E2);
    assert!(matches!(
        raw.call(1, login("pw")),
        ReplyBody::LoggedIn { .. }
    ));
}

/// Clients listening on other loopback IPs than their trackers' (127.0.0.2 and 127.0.0.3
/// against a tracker on 127.0.0.1) connect to the tracker from their listen IP, so the
/// tracker's honest-address check passes: they log in, one shares, the other downloads from
/// it. Skipped where 127.0.0.2 cannot be bound (on Linux it always can).
#[test]
fn clients_on_other_loopback_ips_log_in_share_and_download() {
    if std::net::TcpListener::bind(("127.0.0.2", 0)).is_err() {
        eprintln!("skipped: 127.0.0.2 cannot be bound here");
        return;
    }
    let tracker = Tracker::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("f.bin");
    let data: Vec<u8> = (0..700_000u32).map(|i| (i * 7 + i / 1000) as u8).collect();
    std::fs::write(&src, &data).unwrap();

    let mut alice = Client::with_addr(
        &tracker.info,
        SocketAddr::from(([127, 0, 0, 2], free_port())),
    )
    .live();
    assert_eq!(alice.addr.ip().to_string(), "127.0.0.2");
    alice.cmd("create_user alice pa", &["user alice created"]);
    alice.send("login alice wrong");
    let wrong = alice.expect_error();
    assert!(wrong.contains("wrong password"), "{wrong}");
    alice.cmd("login alice pa", &["logged in as alice"]);
    alice.cmd("create_group g1", &["group g1 created"]);
    alice.cmd(
        &format!("upload_file {} g1", src.display()),
        &["uploaded f.bin to group g1 (700000 bytes, 2 pieces)"],
    );

    let mut bob = Client::with_addr(
        &tracker.info,
        SocketAddr::from(([127, 0, 0, 3], free_port())),
    )
    .cwd(dir.path())
    .live();
    assert_eq!(bob.addr.ip().to_string(), "127.0.0.3");
    bob.cmd("create_user bob pb", &["user bob created"]);
    bob.cmd("login bob pb", &["logged in as bob"]);
    bob.cmd("join_group g1", &["request to join group g1 sent"]);
    alice.cmd("accept_request g1 bob", &["bob accepted into group g1"]);
    let target = dir.path().canonicalize().unwrap().join("copy.bin");
    bob.send("download_file g1 f.bin copy.bin");
    let started = bob.next_out();
    assert!(
        started.starts_with("download of f.bin from group g1 started"),
        "{started}"
    );
    let done = bob.next_out_within(Duration::from_secs(60));
    assert!(
        done.starts_with("downloaded f.bin from group g1 to "),
        "{done}"
    );
    assert_eq!(std::fs::read(&target).unwrap(), data);
    let (status, rest) = bob.finish();
    assert!(status.success(), "{rest:?}");
    // The wrong password counts as a failed command.
    let (status, rest) = alice.finish();
    assert_eq!(status.code(), Some(1), "{rest:?}");
}

/// A quota set by an option is a clear error for the command past it; the session lives on.
#[test]
fn quotas_come_from_options_and_refuse_clearly() {
    let tracker = Tracker::start_with(&["--max-groups-per-user".into(), "2".into()]);
    let out = tracker.client().run(&[
        "create_user a pw",
        "login a pw",
        "create_group g1",
        "create_group g2",
        "create_group g3",
        "list_groups",
    ]);
    assert_eq!(out.errors.len(), 1, "{out:#?}");
    assert!(
        out.errors[0].contains("quota: at most 2 groups owned per user"),
        "{out:#?}"
    );
    assert_eq!(out.stdout.len(), 6, "{out:#?}");
    assert!(out.stdout[4].starts_with("g1") && out.stdout[5].starts_with("g2"));
}

/// One user's two links through two trackers (the moment of a `Resume`: the link the client
/// left can still get a change in) each make a group at once, with a quota of one: each
/// tracker's early check may see a state without the other's change (timing decides whether
/// it does), but the apply where changes are ordered lets one in at most, and both trackers
/// then list the same groups. Several rounds, each a fresh user, make the race likely; the
/// quota must hold in every one.
#[test]
fn one_user_racing_through_two_trackers_stays_within_a_quota() {
    let cluster = Cluster::start_with(2, &["--max-groups-per-user".into(), "1".into()]);
    let (first, second) = (cluster.addrs[0], cluster.addrs[1]);
    let group = |name: String| RequestBody::CreateGroup {
        group: GroupId::new(&name).unwrap(),
    };
    let mut outcomes = Vec::new();
    for round in 0..12u64 {
        let user = format!("racer{round}");
        let mut a = Raw::connect(first, 0x5000 + 2 * round);
        let create = RequestBody::CreateUser {
            user: uid(&user),
            password: pw("pw"),
        };
        assert_eq!(a.call(1, create), ReplyBody::Done);
        let login = RequestBody::Login {
            user: uid(&user),
            password: pw("pw"),
            peer_addr: SocketAddr::from(([127, 0, 0, 1], 9)),
            shares: Vec::new(),
            client_key: [0; 32],
            link: 0,
        };
        let ReplyBody::LoggedIn { token } = a.call(2, login) else {
            panic!("{user} logs in");
        };
        let mut b = Raw::connect(second, 0x5001 + 2 * round);
        // Both at once: the second link resumes the session and makes a group right behind
        // it; the first makes another.
        b.send_all(
            1,
            &[
                RequestBody::Resume { token, link: 0 },
                group(format!("{user}-b")),
            ],
        );
        a.send_all(3, &[group(format!("{user}-a"))]);
        let reply = |raw: &mut Raw, req_id: u64| match raw.recv() {
            TrackerMsg::Reply(Reply { req_id: id, body }) if id == req_id => body,
            other => panic!("expected the reply to {req_id}, got {other:?}"),
        };
        assert_eq!(reply(&mut b, 1), ReplyBody::LoggedIn { token });
        let by_b = reply(&mut b, 2);
        let by_a = reply(&mut a, 3);
        let made = [&by_a, &by_b]
            .iter()
            .filter(|body| ***body == ReplyBody::Done)
            .count();
        assert!(
            made <= 1,
            "round {round}: both groups made: {by_a:?} {by_b:?}"
        );
        for body in [&by_a, &by_b] {
            match body {
                ReplyBody::Done => {}
                ReplyBody::Refused { code, message }
                    if message == "quota: at most 1 groups owned per user"
                        || *code == RejectCode::NotLoggedIn => {}
                other => panic!("round {round}: unexpected answer {other:?}"),
            }
        }
        // Both trackers hold the same groups of this user: at most one.
        let owned = |groups: ReplyBody| match groups {
            ReplyBody::Groups(g) => g
                .into_iter()
                .filter(|g| g.owner.as_str() == user)
                .map(|g| g.group.as_str().to_owned())
                .collect::<Vec<_>>(),
            other => panic!("round {round}: list_groups answered {other:?}"),
        };
        let through_second = owned(b.call(10, RequestBody::ListGroups));
        let mut watcher = Raw::connect(first, 0x9000 + round);
        let watcher_user = format!("watcher{round}");
        assert_eq!(
            watcher.call(
                1,
                RequestBody::CreateUser {
                    user: uid(&watcher_user),
                    password: pw("pw"),
                }
            ),
            ReplyBody::Done
        );
        let login = RequestBody::Login {
            user: uid(&watcher_user),
            password: pw("pw"),
            peer_addr: SocketAddr::from(([127, 0, 0, 1], 9)),
            shares: Vec::new(),
            client_key: [0; 32],
            link: 0,
        };
        assert!(matches!(watcher.call(2, login), ReplyBody::LoggedIn { .. }));
        let through_first = owned(watcher.call(3, RequestBody::ListGroups));
        assert_eq!(through_first, through_second, "round {round}");
        assert_eq!(
            through_first.len(),
            made,
            "round {round}: {through_first:?}"
        );
        outcomes.push((by_a, by_b));
    }
    eprintln!("answers (first link, second link) per round: {outcomes:?}");
}

/// Waits (within [`TIMEOUT`]) until the tracker's log holds `n` lines containing `text`.
fn wait_log_count(tracker: &Tracker, text: &str, n: usize) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let log = tracker.stderr();
        if log.matches(text).count() >= n {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "no {n} lines with '{text}' in the tracker's log within {TIMEOUT:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads until the peer closes; `Err` with what arrived if it does not within `within`.
fn closed_within(stream: &mut TcpStream, within: Duration) -> Result<(), String> {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("not closed: {e}")),
        }
    }
}

/// Connections past the cap (`--max-connections`) are closed at once, with one log line;
/// the connections already open keep being served, and once some close, new ones are
/// taken again.
#[test]
fn connections_past_the_cap_are_closed_and_the_others_served() {
    const CAP: usize = 8;
    let tracker = Tracker::start_with(&["--max-connections".into(), CAP.to_string().into()]);
    let mut held: Vec<Raw> = (0..CAP as u64)
        .map(|i| Raw::connect(tracker.addr, 100 + i))
        .collect();
    // Two more: accepted by the kernel, closed by the tracker before a byte is read.
    for _ in 0..2 {
        let mut extra = TcpStream::connect_timeout(&tracker.addr, TIMEOUT).expect("connect");
        let mut hello = Vec::new();
        ClientMsg::hello(999).emit(&mut hello);
        let _ = extra.write_all(&hello);
        closed_within(&mut extra, TIMEOUT).expect("a connection past the cap is closed");
    }
    let log = wait_log_count(
        &tracker,
        &format!("{CAP} connections open: the connection cap"),
        1,
    );
    assert_eq!(
        log.matches("the connection cap").count(),
        1,
        "one line per episode:\n{log}"
    );
    for (i, raw) in held.iter_mut().enumerate() {
        assert_eq!(raw.call(1, RequestBody::Ping), ReplyBody::Pong, "conn {i}");
    }
    // Some close: a new connection is served again (once the tracker has seen the closes).
    held.truncate(CAP - 2);
    let deadline = Instant::now() + TIMEOUT;
    let mut fresh = loop {
        let mut stream = TcpStream::connect_timeout(&tracker.addr, TIMEOUT).expect("connect");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut hello = Vec::new();
        ClientMsg::hello(1000).emit(&mut hello);
        stream.write_all(&hello).expect("send hello");
        let mut rbuf = FrameBuffer::new(MAX_CLIENT_TRACKER_FRAME);
        let welcomed = loop {
            if let Some(p) = rbuf.next_frame().expect("a well-formed frame") {
                break matches!(TrackerMsg::parse(p), Ok(TrackerMsg::Welcome { .. }));
            }
            match stream.read(rbuf.spare()) {
                Ok(0) | Err(_) => break false,
                Ok(n) => rbuf.commit(n),
            }
        };
        if welcomed {
            break Raw { stream, rbuf };
        }
        assert!(
            Instant::now() < deadline,
            "no connection taken after closes"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(fresh.call(1, RequestBody::Ping), ReplyBody::Pong);
}

/// A connection that says hello and then nothing is closed at the idle timeout
/// (`--idle-timeout`); a real client quiet for longer keeps its connection (it pings), so its
/// session goes on without a reconnection.
#[test]
fn silent_connections_are_closed_at_the_idle_timeout_and_quiet_clients_are_not() {
    const IDLE: Duration = Duration::from_secs(2);
    let tracker = Tracker::start_with(&["--idle-timeout".into(), "2".into()]);
    let mut raw = Raw::connect(tracker.addr, 7);
    let start = Instant::now();
    closed_within(&mut raw.stream, TIMEOUT).expect("a silent connection is closed");
    let waited = start.elapsed();
    assert!(
        waited >= IDLE - Duration::from_millis(100),
        "closed after {waited:?}"
    );
    // The default (30 s) would take longer: the option is what closed it.
    assert!(waited < Duration::from_secs(20), "closed after {waited:?}");
    wait_log_count(&tracker, "silent for", 1);

    let mut client = tracker.client();
    let mut live = client.live();
    live.cmd("create_user a pw", &["user a created"]);
    live.cmd("login a pw", &["logged in as a"]);
    // Quiet for three idle timeouts (the time is what is tested, not a synchronisation).
    std::thread::sleep(3 * IDLE);
    live.cmd("create_group g", &["group g created"]);
    let log = tracker.stderr();
    assert_eq!(
        log.matches("silent for").count(),
        1,
        "the pinging client was closed as silent:\n{log}"
    );
    let (status, _) = live.finish();
    assert_eq!(status.code(), Some(0));
}

/// At the tracker-wide memory budget (`--memory-budget`), client connections are not read
/// until the connection buffers drain: connections holding big partial frames pass it, a
/// fresh connection's hello then waits (it is not read), and once the silent ones are closed
/// at the idle timeout, their buffers go and the fresh connection is served.
#[test]
fn at_the_memory_budget_clients_wait_until_buffers_drain() {
    const BUDGET: usize = 4 * 1024 * 1024;
    const SENT: usize = 700 * 1024;
    let tracker = Tracker::start_with(&[
        "--memory-budget".into(),
        BUDGET.to_string().into(),
        "--idle-timeout".into(),
        "3".into(),
    ]);
    // Each announces a 16 MiB frame and sends 700 KiB of it (a buffer of about 1 MiB each).
    let mut senders: Vec<Raw> = (0..8).map(|i| Raw::connect(tracker.addr, 10 + i)).collect();
    for raw in &mut senders {
        let mut part = Vec::with_capacity(SENT);
        part.extend_from_slice(&(16u32 * 1024 * 1024 - 1).to_be_bytes());
        part.push(0x10);
        part.resize(SENT, 0x5a);
        raw.stream.write_all(&part).expect("send part of a frame");
    }
    wait_log_count(&tracker, "the memory budget", 1);
    let asked = Instant::now();
    let mut fresh = Raw::connect(tracker.addr, 99);
    let waited = asked.elapsed();
    assert_eq!(fresh.call(1, RequestBody::Ping), ReplyBody::Pong);
    let log = wait_log_count(&tracker, "under the memory budget again", 1);
    assert!(
        log.contains("silent for"),
        "the partial frames' connections were closed as silent:\n{log}"
    );
    // Its hello was not read while the budget was reached.
    assert!(
        waited >= Duration::from_secs(1),
        "welcomed after {waited:?}, at the budget:\n{log}"
    );
}

/// A listing larger than one part (`--listing-part-bytes`, here 2 KiB against the 1 MiB
/// default, as 300,000 groups are against it) comes whole, sorted, through `client_program`,
/// and the session goes on.
#[test]
fn listings_larger_than_a_part_come_whole() {
    const GROUPS: usize = 200;
    let tracker = Tracker::start_with(&["--listing-part-bytes".into(), "2048".into()]);
    let names: Vec<String> = (0..GROUPS)
        .rev()
        .map(|i| format!("{i:03}{}", "g".repeat(61)))
        .collect();
    let mut commands = vec!["create_user a pw".to_owned(), "login a pw".to_owned()];
    commands.extend(names.iter().map(|g| format!("create_group {g}")));
    commands.push("list_groups".into());
    commands.push(format!("list_files {}", names[0]));
    commands.push(format!("list_requests {}", names[0]));
    commands.push("create_group last".into());
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    let out = tracker.client().run(&commands);
    assert!(out.errors.is_empty(), "{out:#?}");
    let listed: Vec<&str> = out
        .stdout
        .iter()
        .skip(2 + GROUPS)
        .take(GROUPS)
        .map(|l| l.split('\t').next().unwrap_or(""))
        .collect();
    let mut want: Vec<&str> = names.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(listed, want, "{out:#?}");
    assert_eq!(out.stdout.len(), 2 + 2 * GROUPS + 1, "{out:#?}");
    assert_eq!(
        out.stdout.last().map(String::as_str),
        Some("group last created")
    );
}
