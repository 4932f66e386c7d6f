//! Tracker throughput benchmark (`cargo bench --bench tracker_load`).
//!
//! Starts the real `tracker_program` (release build under `cargo bench`) on a free loopback
//! port and drives it from this process with its own single-threaded, edge-triggered mio
//! reactor. Every connection handshakes, then pipelines requests, keeping a fixed window in
//! flight; replies come back in order, so each reply is matched with the send time of the
//! oldest outstanding request to get its latency.
//!
//! Scenarios (pick some by name as free arguments, e.g. `cargo bench --bench tracker_load --
//! ping hold`):
//! - `ping`: `Ping` from N connections (default 1,000), window W (default 32).
//! - `list_groups`: `ListGroups` needs a session, and each login costs the tracker an Argon2
//!   verification (milliseconds of CPU), so only a few connections (default 50) log in, each
//!   as its own user, and run `ListGroups` with a large window (default 256) against ~20
//!   groups; the other N - 50 connections ping at the same time, so the tracker still juggles
//!   N sockets. The two kinds should see similar latencies; a warning is printed if not.
//! - `hold`: opens 10,000 handshaken connections and keeps them idle, checks that a fresh
//!   connection still gets a `Pong` within 1 s, then has every held connection ping once.
//! - `announce`: N connections (default 1,000) say hello, then each announces a 16 MiB frame
//!   (a `Login` length prefix and type byte and 16 bytes of it) and sends nothing more; the
//!   tracker's RSS is read before and after (aim: under 64 MiB more), and a fresh connection
//!   must still get a `Pong`.
//! - `login_flood`: N connections (default 1,000) each guess the password of their own user
//!   (N accounts made first), keeping W (default 10) wrong-password logins in flight; once
//!   every one has been refused at least once, a probe thread logs in with the right password
//!   on a fresh connection, 5 times, and times each (aim: under 1 s), and a ping on it.
//! - `big_listing` (only when named): 300 users (TRACKER_BENCH_BIG_USERS) each create 1,000
//!   groups with 64-byte ids (TRACKER_BENCH_BIG_GROUPS in all, default 300,000), all at once;
//!   then one of them lists every group in parts (`ListPart`, as `client_program` does) and
//!   the listing is checked whole and sorted; the tracker's RSS and the time are printed.
//!
//! Knobs (environment): TRACKER_BENCH_CONNS, TRACKER_BENCH_WINDOW, TRACKER_BENCH_SECS
//! (measured seconds), TRACKER_BENCH_WARMUP (seconds, excluded), TRACKER_BENCH_LG_CONNS,
//! TRACKER_BENCH_LG_WINDOW, TRACKER_BENCH_GROUPS, TRACKER_BENCH_HOLD,
//! TRACKER_BENCH_HOLD_SECS (time allowed to open the held connections),
//! TRACKER_BENCH_FLOOD_WINDOW.
//!
//! Tracker CPU time comes from `/proc/<pid>/stat` (utime + stime, at 100 ticks per second).

mod common;

use std::collections::VecDeque;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{cpu_secs, env_num, io_err, quit_or_kill, status_kib, SyncClient};
use mio::event::Event;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use p2pshare::wire::frame::{FrameBuffer, MAX_CLIENT_TRACKER_FRAME};
use p2pshare::wire::tracker_link::{
    ClientMsg, Listing, RejectCode, Reply, ReplyBody, Request, RequestBody, TrackerMsg,
};
use p2pshare::wire::{GroupId, Password, UserId};

/// Connections allowed to be connecting or handshaking at once. mio's `TcpListener::bind`
/// listens with a backlog of 128, so a bigger connection storm would overflow the tracker's
/// accept queue and stall on SYN retransmits (1 s, 3 s, ...).
const MAX_PENDING_CONNECTS: usize = 64;
const BENCH: &str = "tracker_load";
/// Longest single wait in the reactor, so deadlines are checked at least this often.
const MAX_POLL_WAIT: Duration = Duration::from_millis(100);
const PASSWORD: &[u8] = b"bench-password";

struct Config {
    conns: usize,
    window: usize,
    warmup: Duration,
    secs: Duration,
    lg_conns: usize,
    lg_window: usize,
    groups: usize,
    hold: usize,
    hold_secs: Duration,
    flood_window: usize,
    scenarios: Vec<String>,
}

impl Config {
    fn from_env() -> Config {
        let scenarios = std::env::args()
            .skip(1)
            .filter(|a| !a.starts_with('-'))
            .collect();
        Config {
            conns: env_num(BENCH, "TRACKER_BENCH_CONNS", 1000.0).max(1.0) as usize,
            window: env_num(BENCH, "TRACKER_BENCH_WINDOW", 32.0).max(1.0) as usize,
            warmup: Duration::from_secs_f64(env_num(BENCH, "TRACKER_BENCH_WARMUP", 3.0)),
            secs: Duration::from_secs_f64(env_num(BENCH, "TRACKER_BENCH_SECS", 10.0).max(0.1)),
            lg_conns: env_num(BENCH, "TRACKER_BENCH_LG_CONNS", 50.0).max(1.0) as usize,
            lg_window: env_num(BENCH, "TRACKER_BENCH_LG_WINDOW", 256.0).max(1.0) as usize,
            groups: env_num(BENCH, "TRACKER_BENCH_GROUPS", 20.0) as usize,
            hold: env_num(BENCH, "TRACKER_BENCH_HOLD", 10_000.0) as usize,
            hold_secs: Duration::from_secs_f64(
                env_num(BENCH, "TRACKER_BENCH_HOLD_SECS", 60.0).max(1.0),
            ),
            flood_window: env_num(BENCH, "TRACKER_BENCH_FLOOD_WINDOW", 10.0).max(1.0) as usize,
            scenarios,
        }
    }

    fn wants(&self, scenario: &str) -> bool {
        self.scenarios.is_empty() || self.named(scenario)
    }

    /// Asked for by name (scenarios that are not run by default).
    fn named(&self, scenario: &str) -> bool {
        self.scenarios.iter().any(|s| s == scenario)
    }
}

// ---------------------------------------------------------------------------------------------
// The tracker process.

/// The running tracker; stopped (`quit`, then kill) when dropped.
struct Tracker {
    child: Child,
    stdin: Option<ChildStdin>,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Tracker {
    fn start() -> Result<Tracker, String> {
        let mut last_err = String::new();
        // The port is found by binding :0 and letting it go; another process could grab it
        // in between, so try a few times.
        for _ in 0..3 {
            match Tracker::try_start() {
                Ok(t) => return Ok(t),
                Err(e) => last_err = e,
            }
        }
        Err(last_err)
    }

    fn try_start() -> Result<Tracker, String> {
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("cannot find a free port: {e}"))?
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let dir = tempfile::tempdir().map_err(|e| format!("cannot make a temp dir: {e}"))?;
        let info = dir.path().join("tracker_info.txt");
        fs::write(&info, format!("{addr}\n")).map_err(|e| format!("cannot write {info:?}: {e}"))?;
        let mut child = Command::new(env!("CARGO_BIN_EXE_tracker_program"))
            .env("XDG_STATE_HOME", dir.path())
            .arg("--log-level")
            .arg("warn")
            // The load generator speaks plain client frames.
            .arg("--accept-plain-clients")
            .arg(&info)
            .arg("1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start tracker_program: {e}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let mut tracker = Tracker {
            child,
            stdin,
            addr,
            _dir: dir,
        };
        let (tx, rx) = mpsc::channel();
        if let Some(stdout) = stdout {
            // Reads the ready line, then drains stdout until the tracker exits.
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let _ = tx.send(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("tracker 1 listening on") => return Ok(tracker),
                Ok(_) => {}
                Err(_) => {
                    let status = tracker.child.try_wait().ok().flatten();
                    return Err(format!(
                        "tracker did not report 'tracker 1 listening on' within 10 s \
                         (exit status: {status:?})"
                    ));
                }
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds (user + system) the tracker has used so far.
    fn cpu_secs(&self) -> Option<f64> {
        cpu_secs(self.pid())
    }

    fn rss_kib(&self) -> Option<u64> {
        status_kib(self.pid(), "VmRSS")
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        quit_or_kill(&mut self.child, self.stdin.take(), true);
    }
}

// ---------------------------------------------------------------------------------------------
// A blocking client for set-up (users, logins, groups) and the fresh-connection probe:
// `common::SyncClient`.

fn expect_all(
    what: &str,
    replies: &[ReplyBody],
    ok: impl Fn(&ReplyBody) -> bool,
) -> Result<(), String> {
    match replies.iter().find(|r| !ok(r)) {
        Some(bad) => Err(format!("{what}: unexpected reply {bad:?}")),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Latency histogram: log-linear buckets (64 per octave, < 1.6 % error) over nanoseconds.

struct Hist {
    buckets: Vec<u64>,
    count: u64,
    sum_ns: u128,
    max_ns: u64,
}

impl Hist {
    fn new() -> Hist {
        Hist {
            buckets: vec![0; 128 + 57 * 64],
            count: 0,
            sum_ns: 0,
            max_ns: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < 128 {
            return v as usize;
        }
        let e = 63 - v.leading_zeros();
        let m = (v >> (e - 6)) as usize;
        128 + (e as usize - 7) * 64 + (m - 64)
    }

    fn lower_bound(idx: usize) -> u64 {
        if idx < 128 {
            return idx as u64;
        }
        let k = idx - 128;
        let e = k / 64 + 7;
        let m = (k % 64 + 64) as u64;
        m << (e - 6)
    }

    fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let idx = Hist::index(ns).min(self.buckets.len() - 1);
        self.buckets[idx] += 1;
        self.count += 1;
        self.sum_ns += u128::from(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    fn mean_ms(&self) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        self.sum_ns as f64 / self.count as f64 / 1e6
    }

    fn quantile_ms(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = ((self.count as f64 * q).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (idx, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Hist::lower_bound(idx) as f64 / 1e6;
            }
        }
        self.max_ns as f64 / 1e6
    }
}

// ---------------------------------------------------------------------------------------------
// The load reactor.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Connecting,
    Handshaking,
    Ready,
}

/// A group of connections doing the same thing.
struct Class {
    body: RequestBody,
    /// When not empty, the n-th connection of the class sends `variants[n % len]` instead.
    variants: Vec<RequestBody>,
    next_variant: usize,
    window: usize,
    /// Requests a connection sends in all (`None`: unbounded); 0 keeps it idle.
    max_per_conn: Option<u64>,
    /// Type byte of a reply already fully parsed and found right; later replies with the same
    /// type byte are only checked for their request id, to keep the load generator cheap.
    ok_type: Option<u8>,
    /// Size of the first good reply frame, for the report.
    reply_len: usize,
    groups_in_reply: Option<usize>,
    /// Replies received inside the measurement window, and their latencies.
    replies: u64,
    hist: Hist,
    /// Replies received at any time (for the burst check).
    total_replies: u64,
    ready: usize,
    failed: usize,
    first_error: Option<String>,
}

impl Class {
    fn new(body: RequestBody, window: usize) -> Class {
        Class {
            body,
            variants: Vec::new(),
            next_variant: 0,
            window,
            max_per_conn: None,
            ok_type: None,
            reply_len: 0,
            groups_in_reply: None,
            replies: 0,
            hist: Hist::new(),
            total_replies: 0,
            ready: 0,
            failed: 0,
            first_error: None,
        }
    }

    fn take_variant(&mut self) -> usize {
        self.next_variant += 1;
        self.next_variant - 1
    }

    /// What connection `conn` of the class sends.
    fn body_for(&self, conn: &Conn) -> &RequestBody {
        match self.variants.len() {
            0 => &self.body,
            n => &self.variants[conn.variant % n],
        }
    }

    fn check_reply(&mut self, payload: &[u8], want_id: u64) -> Result<(), String> {
        if payload.len() >= 9 && Some(payload[0]) == self.ok_type {
            let mut id = [0u8; 8];
            id.copy_from_slice(&payload[1..9]);
            let id = u64::from_be_bytes(id);
            if id != want_id {
                return Err(format!("reply id {id}, expected {want_id}"));
            }
            return Ok(());
        }
        let msg = TrackerMsg::parse(payload).map_err(|e| format!("bad reply: {e}"))?;
        let TrackerMsg::Reply(Reply { req_id, body }) = msg else {
            return Err(format!("expected a reply, got {msg:?}"));
        };
        if req_id != want_id {
            return Err(format!("reply id {req_id}, expected {want_id}"));
        }
        match (&self.body, body) {
            (RequestBody::Ping, ReplyBody::Pong) => {}
            (RequestBody::ListGroups, ReplyBody::Groups(groups)) => {
                self.groups_in_reply = Some(groups.len());
            }
            (
                RequestBody::Login { .. },
                ReplyBody::Refused {
                    code: RejectCode::WrongPassword,
                    ..
                },
            ) => {}
            (_, other) => return Err(format!("unexpected reply {other:?}")),
        }
        self.ok_type = payload.first().copied();
        self.reply_len = payload.len() + 4;
        Ok(())
    }
}

struct Conn {
    stream: TcpStream,
    class: usize,
    phase: Phase,
    opened_at: Instant,
    rbuf: FrameBuffer,
    wbuf: Vec<u8>,
    wpos: usize,
    /// Next request id to send, and the id the next reply must carry.
    next_req: u64,
    next_reply: u64,
    /// Requests sent in all.
    sent_total: u64,
    /// Send times of the requests in flight, oldest first.
    sent: VecDeque<Instant>,
    /// Which of the class's variants it sends.
    variant: usize,
}

/// The measurement window: replies arriving inside it are counted.
#[derive(Clone, Copy)]
struct Window {
    from: Option<Instant>,
    to: Option<Instant>,
}

impl Window {
    fn contains(&self, t: Instant) -> bool {
        self.from.is_some_and(|f| t >= f) && self.to.is_none_or(|e| t < e)
    }
}

struct Load {
    poll: Poll,
    events: Events,
    conns: Vec<Option<Conn>>,
    classes: Vec<Class>,
    window: Window,
    /// Slowest connect + handshake seen.
    max_open_time: Duration,
    /// Connections still connecting or handshaking.
    pending: usize,
}

impl Load {
    fn new(classes: Vec<Class>) -> Result<Load, String> {
        Ok(Load {
            poll: Poll::new().map_err(io_err("Poll::new"))?,
            events: Events::with_capacity(1024),
            conns: Vec::new(),
            classes,
            window: Window {
                from: None,
                to: None,
            },
            max_open_time: Duration::ZERO,
            pending: 0,
        })
    }

    fn register(&mut self, mut conn: Conn) -> Result<usize, String> {
        let idx = self.conns.len();
        self.poll
            .registry()
            .register(
                &mut conn.stream,
                Token(idx),
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(io_err("register"))?;
        if conn.phase != Phase::Ready {
            self.pending += 1;
        }
        self.conns.push(Some(conn));
        Ok(idx)
    }

    /// Starts a non-blocking connect; the hello is queued and sent once it completes.
    fn open(&mut self, addr: SocketAddr, class: usize) -> Result<(), String> {
        let stream = TcpStream::connect(addr).map_err(io_err("connect"))?;
        let _ = stream.set_nodelay(true);
        let mut wbuf = Vec::new();
        ClientMsg::hello(0xB0B).emit(&mut wbuf);
        let variant = self.classes[class].take_variant();
        self.register(Conn {
            stream,
            class,
            phase: Phase::Connecting,
            opened_at: Instant::now(),
            rbuf: FrameBuffer::new(MAX_CLIENT_TRACKER_FRAME),
            wbuf,
            wpos: 0,
            next_req: 1,
            next_reply: 1,
            sent_total: 0,
            sent: VecDeque::new(),
            variant,
        })
        .map(|_| ())
    }

    /// Adopts a connection that is already handshaken (and logged in) and starts its load.
    fn adopt(&mut self, client: SyncClient, class: usize) -> Result<(), String> {
        let (stream, rbuf, next_id) = client.into_mio()?;
        let variant = self.classes[class].take_variant();
        let idx = self.register(Conn {
            stream,
            class,
            phase: Phase::Ready,
            opened_at: Instant::now(),
            rbuf,
            wbuf: Vec::new(),
            wpos: 0,
            next_req: next_id,
            next_reply: next_id,
            sent_total: 0,
            sent: VecDeque::new(),
            variant,
        })?;
        self.classes[class].ready += 1;
        self.kick(idx);
        Ok(())
    }

    /// Opens `n` connections of `class`, at most `MAX_PENDING_CONNECTS` in progress at once,
    /// until all are handshaken or failed, or until `deadline`. Returns the first error that
    /// stopped new connects (such as EMFILE), if any.
    fn open_many(
        &mut self,
        addr: SocketAddr,
        class: usize,
        n: usize,
        deadline: Instant,
    ) -> Option<String> {
        let mut started = 0;
        let mut stop: Option<String> = None;
        while Instant::now() < deadline {
            while stop.is_none() && started < n && self.pending < MAX_PENDING_CONNECTS {
                match self.open(addr, class) {
                    Ok(()) => started += 1,
                    Err(e) => stop = Some(e),
                }
            }
            if self.pending == 0 && (started == n || stop.is_some()) {
                break;
            }
            self.turn(deadline);
        }
        stop
    }

    /// One poll and the handling of its events; waits at most until `deadline`.
    fn turn(&mut self, deadline: Instant) {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(MAX_POLL_WAIT);
        if let Err(e) = self.poll.poll(&mut self.events, Some(wait)) {
            if e.kind() != io::ErrorKind::Interrupted {
                eprintln!("tracker_load: poll failed: {e}");
                // Avoid spinning on a persistent poll error.
                std::thread::sleep(wait);
            }
            return;
        }
        // Taken out for the loop so `handle` may borrow `self`; `with_capacity(0)` does not
        // allocate.
        let events = std::mem::replace(&mut self.events, Events::with_capacity(0));
        for ev in events.iter() {
            let idx = ev.token().0;
            if let Err(e) = self.handle(idx, ev) {
                self.fail(idx, e);
            }
        }
        self.events = events;
    }

    fn handle(&mut self, idx: usize, ev: &Event) -> Result<(), String> {
        let Some(Some(conn)) = self.conns.get_mut(idx) else {
            return Ok(());
        };
        let writable = ev.is_writable() || ev.is_error();
        let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
        if conn.phase == Phase::Connecting {
            if !writable {
                return Ok(());
            }
            if let Some(e) = conn.stream.take_error().map_err(io_err("take_error"))? {
                return Err(format!("connect: {e}"));
            }
            match conn.stream.peer_addr() {
                Ok(_) => conn.phase = Phase::Handshaking,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
                Err(e) if e.raw_os_error() == Some(115) => return Ok(()), // EINPROGRESS
                Err(e) => return Err(format!("connect: {e}")),
            }
        }
        if readable {
            let class = &mut self.classes[conn.class];
            let now_ready = read_replies(conn, class, self.window)?;
            if now_ready {
                class.ready += 1;
                self.pending -= 1;
                self.max_open_time = self.max_open_time.max(conn.opened_at.elapsed());
            }
        }
        top_up(conn, &self.classes[conn.class]);
        flush(conn)
    }

    /// Queues requests on connection `idx` up to its window and writes them.
    fn kick(&mut self, idx: usize) {
        let Some(Some(conn)) = self.conns.get_mut(idx) else {
            return;
        };
        top_up(conn, &self.classes[conn.class]);
        if let Err(e) = flush(conn) {
            self.fail(idx, e);
        }
    }

    fn kick_all(&mut self) {
        for idx in 0..self.conns.len() {
            self.kick(idx);
        }
    }

    fn fail(&mut self, idx: usize, error: String) {
        if let Some(slot) = self.conns.get_mut(idx) {
            if let Some(mut conn) = slot.take() {
                let _ = self.poll.registry().deregister(&mut conn.stream);
                let class = &mut self.classes[conn.class];
                class.failed += 1;
                if conn.phase == Phase::Ready {
                    class.ready -= 1;
                } else {
                    self.pending -= 1;
                }
                class.first_error.get_or_insert(error);
            }
        }
    }

    /// Runs the reactor until `deadline`.
    fn run_until(&mut self, deadline: Instant) {
        while Instant::now() < deadline {
            self.turn(deadline);
        }
    }

    /// Runs until `done` holds or `deadline` passes; returns whether `done` held.
    fn run_while(&mut self, deadline: Instant, done: impl Fn(&Load) -> bool) -> bool {
        loop {
            if done(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            self.turn(deadline);
        }
    }

    fn live(&self) -> usize {
        self.conns.iter().flatten().count()
    }

    /// Stops sending and waits (at most 5 s) for the replies in flight, so that closing the
    /// sockets sends a FIN, not the RST a close with unread data would send.
    fn drain(&mut self) {
        for class in &mut self.classes {
            class.max_per_conn = Some(0);
        }
        self.window.to = Some(self.window.to.unwrap_or_else(Instant::now));
        self.run_while(Instant::now() + Duration::from_secs(5), |l| {
            l.conns.iter().flatten().all(|c| c.sent.is_empty())
        });
    }
}

/// Reads until `WouldBlock`, handling each whole frame; returns whether the handshake
/// completed during this call.
fn read_replies(conn: &mut Conn, class: &mut Class, window: Window) -> Result<bool, String> {
    let mut became_ready = false;
    loop {
        match conn.stream.read(conn.rbuf.spare()) {
            Ok(0) => return Err("connection closed by the tracker".into()),
            Ok(n) => conn.rbuf.commit(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(became_ready),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read: {e}")),
        }
        let now = Instant::now();
        while let Some(payload) = conn
            .rbuf
            .next_frame()
            .map_err(|e| format!("bad frame: {e}"))?
        {
            match conn.phase {
                Phase::Handshaking => match TrackerMsg::parse(payload) {
                    Ok(TrackerMsg::Welcome { .. }) => {
                        conn.phase = Phase::Ready;
                        became_ready = true;
                    }
                    other => return Err(format!("expected Welcome, got {other:?}")),
                },
                Phase::Ready => {
                    let sent = conn.sent.pop_front().ok_or("a reply to no request")?;
                    class.check_reply(payload, conn.next_reply)?;
                    conn.next_reply += 1;
                    class.total_replies += 1;
                    if window.contains(now) {
                        class.replies += 1;
                        class.hist.record(now.saturating_duration_since(sent));
                    }
                }
                Phase::Connecting => return Err("data before the connect completed".into()),
            }
        }
    }
}

/// Queues requests until the class's window is full.
fn top_up(conn: &mut Conn, class: &Class) {
    if conn.phase != Phase::Ready {
        return;
    }
    let now = Instant::now();
    while conn.sent.len() < class.window && class.max_per_conn.is_none_or(|m| conn.sent_total < m) {
        Request {
            req_id: conn.next_req,
            body: class.body_for(conn).clone(),
        }
        .emit(&mut conn.wbuf);
        conn.next_req += 1;
        conn.sent_total += 1;
        conn.sent.push_back(now);
    }
}

/// Writes queued bytes until done or `WouldBlock` (the `WRITABLE` edge brings us back).
fn flush(conn: &mut Conn) -> Result<(), String> {
    if conn.phase == Phase::Connecting {
        return Ok(());
    }
    while conn.wpos < conn.wbuf.len() {
        match conn.stream.write(&conn.wbuf[conn.wpos..]) {
            Ok(0) => return Err("write returned 0".into()),
            Ok(n) => conn.wpos += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("write: {e}")),
        }
    }
    conn.wbuf.clear();
    conn.wpos = 0;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

/// CPU use of the tracker and of this process over the measurement window.
struct CpuSample {
    at: Instant,
    tracker: Option<f64>,
    bench: Option<f64>,
}

impl CpuSample {
    fn take(tracker: &Tracker) -> CpuSample {
        CpuSample {
            at: Instant::now(),
            tracker: tracker.cpu_secs(),
            bench: cpu_secs(std::process::id()),
        }
    }
}

struct Measured {
    secs: f64,
    tracker_cpu: Option<f64>,
    bench_cpu: Option<f64>,
}

/// Warm-up, then the measured window; the load runs throughout.
fn measure(load: &mut Load, tracker: &Tracker, cfg: &Config) -> Measured {
    load.run_until(Instant::now() + cfg.warmup);
    let before = CpuSample::take(tracker);
    load.window = Window {
        from: Some(before.at),
        to: Some(before.at + cfg.secs),
    };
    load.run_until(before.at + cfg.secs);
    let after = CpuSample::take(tracker);
    Measured {
        secs: after.at.duration_since(before.at).as_secs_f64(),
        tracker_cpu: before.tracker.zip(after.tracker).map(|(b, a)| a - b),
        bench_cpu: before.bench.zip(after.bench).map(|(b, a)| a - b),
    }
}

fn class_line(label: &str, class: &Class, conns: usize, m: &Measured) -> String {
    let rate = class.replies as f64 / m.secs;
    let mut line = format!(
        "{label:<12} conns={conns:<5} window={:<4} reqs/s={rate:>9.0}  latency mean={:.2}ms \
         p50={:.2}ms p99={:.2}ms max={:.2}ms  replies={}",
        class.window,
        class.hist.mean_ms(),
        class.hist.quantile_ms(0.50),
        class.hist.quantile_ms(0.99),
        class.hist.max_ns as f64 / 1e6,
        class.replies,
    );
    if class.reply_len > 0 {
        line += &format!(" reply_bytes={}", class.reply_len);
    }
    if let Some(g) = class.groups_in_reply {
        line += &format!(" groups_per_reply={g}");
    }
    if class.failed > 0 {
        line += &format!(
            " FAILED_CONNS={} first_error={:?}",
            class.failed,
            class.first_error.as_deref().unwrap_or("")
        );
    }
    line
}

fn cpu_line(total_replies: u64, m: &Measured) -> String {
    let tracker = match m.tracker_cpu {
        Some(cpu) if cpu > 0.0 => format!(
            "tracker_cpu={cpu:.2}s ({:.0}% of one core, {:.0} reqs per tracker CPU-second)",
            100.0 * cpu / m.secs,
            total_replies as f64 / cpu
        ),
        Some(cpu) => format!("tracker_cpu={cpu:.2}s"),
        None => "tracker_cpu=unknown".into(),
    };
    let bench = match m.bench_cpu {
        Some(cpu) => format!(
            "bench_cpu={cpu:.2}s ({:.0}% of one core)",
            100.0 * cpu / m.secs
        ),
        None => "bench_cpu=unknown".into(),
    };
    format!("             measured {:.2}s  {tracker}  {bench}", m.secs)
}

fn scenario_ping(tracker: &Tracker, cfg: &Config) -> Result<(), String> {
    let mut load = Load::new(vec![Class::new(RequestBody::Ping, cfg.window)])?;
    let started = Instant::now();
    if let Some(e) = load.open_many(
        tracker.addr,
        0,
        cfg.conns,
        started + Duration::from_secs(30),
    ) {
        eprintln!("tracker_load: ping: stopped opening connections: {e}");
    }
    let opened_in = started.elapsed();
    let m = measure(&mut load, tracker, cfg);
    load.drain();
    let class = &load.classes[0];
    println!(
        "{}   (connected+handshaken {} in {:.2}s)",
        class_line("ping", class, class.ready, &m),
        class.ready,
        opened_in.as_secs_f64()
    );
    println!("{}", cpu_line(class.replies, &m));
    Ok(())
}

fn scenario_list_groups(tracker: &Tracker, cfg: &Config) -> Result<(), String> {
    let lg_conns = cfg.lg_conns.min(cfg.conns);
    let ping_conns = cfg.conns - lg_conns;
    println!(
        "list_groups: design: each login costs the tracker an Argon2 verification, so only \
         {lg_conns} users log in on {lg_conns} connections that run ListGroups with window \
         {}, against {} groups, while the other {ping_conns} connections ping with window {}",
        cfg.lg_window, cfg.groups, cfg.window
    );
    let setup_timeout = Duration::from_secs(120);
    let t0 = Instant::now();
    // Users, created over one connection, pipelined. The names are unique per run so the
    // scenario can be repeated against one tracker.
    let tag = std::process::id();
    let users: Vec<UserId> = (0..lg_conns)
        .map(|i| UserId::new(&format!("bench{tag}u{i}")))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("user id: {e}"))?;
    let password = Password::new(PASSWORD).map_err(|e| format!("password: {e}"))?;
    let mut admin = SyncClient::connect(tracker.addr, Duration::from_secs(10))?;
    let creates: Vec<RequestBody> = users
        .iter()
        .map(|u| RequestBody::CreateUser {
            user: u.clone(),
            password: password.clone(),
        })
        .collect();
    let replies = admin.call_all(&creates, setup_timeout)?;
    expect_all("create_user", &replies, |r| *r == ReplyBody::Done)?;
    let users_in = t0.elapsed();
    drop(admin);

    // One connection per user, logged in; all logins pipelined across the connections.
    let t1 = Instant::now();
    let mut clients = Vec::with_capacity(lg_conns);
    for _ in 0..lg_conns {
        clients.push(SyncClient::connect(tracker.addr, Duration::from_secs(10))?);
    }
    let mut firsts = Vec::with_capacity(lg_conns);
    for (i, (client, user)) in clients.iter_mut().zip(&users).enumerate() {
        firsts.push(client.send(&[RequestBody::Login {
            user: user.clone(),
            password: password.clone(),
            peer_addr: SocketAddr::from(([127, 0, 0, 1], 20_000 + i as u16)),
            shares: Vec::new(),
            client_key: [0; 32],
            link: 0,
        }])?);
    }
    let deadline = Instant::now() + setup_timeout;
    for (client, first) in clients.iter_mut().zip(firsts) {
        let replies = client.replies(first, 1, deadline)?;
        expect_all("login", &replies, |r| {
            matches!(r, ReplyBody::LoggedIn { .. })
        })?;
    }
    let logins_in = t1.elapsed();

    // Groups owned by the first user; every other user asks to join one, so the replies
    // carry a mix of relations.
    let groups: Vec<GroupId> = (0..cfg.groups)
        .map(|i| GroupId::new(&format!("bench{tag}g{i:02}")))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("group id: {e}"))?;
    let create_groups: Vec<RequestBody> = groups
        .iter()
        .map(|g| RequestBody::CreateGroup { group: g.clone() })
        .collect();
    let replies = clients[0].call_all(&create_groups, setup_timeout)?;
    expect_all("create_group", &replies, |r| *r == ReplyBody::Done)?;
    if !groups.is_empty() {
        for (i, client) in clients.iter_mut().enumerate().skip(1) {
            let join = [RequestBody::JoinGroup {
                group: groups[i % groups.len()].clone(),
            }];
            let replies = client.call_all(&join, setup_timeout)?;
            expect_all("join_group", &replies, |r| *r == ReplyBody::Done)?;
        }
    }
    println!(
        "list_groups: setup: {lg_conns} users created in {:.2}s ({:.1} ms per Argon2 hash), \
         {lg_conns} logins in {:.2}s ({:.1} ms each), {} groups",
        users_in.as_secs_f64(),
        users_in.as_secs_f64() * 1e3 / lg_conns as f64,
        logins_in.as_secs_f64(),
        logins_in.as_secs_f64() * 1e3 / lg_conns as f64,
        cfg.groups
    );

    let mut load = Load::new(vec![
        Class::new(RequestBody::ListGroups, cfg.lg_window),
        Class::new(RequestBody::Ping, cfg.window),
    ])?;
    for client in clients {
        load.adopt(client, 0)?;
    }
    if let Some(e) = load.open_many(
        tracker.addr,
        1,
        ping_conns,
        Instant::now() + Duration::from_secs(30),
    ) {
        eprintln!("tracker_load: list_groups: stopped opening connections: {e}");
    }
    let m = measure(&mut load, tracker, cfg);
    load.drain();
    let (lg, ping) = (&load.classes[0], &load.classes[1]);
    println!("{}", class_line("list_groups", lg, lg.ready, &m));
    println!("{}", class_line("  +ping", ping, ping.ready, &m));
    println!("{}", cpu_line(lg.replies + ping.replies, &m));
    // Both kinds queue behind the same single thread, so a fair tracker gives them similar
    // latencies; a large gap means some connections are being served far more often.
    let (lg_p50, ping_p50) = (lg.hist.quantile_ms(0.5), ping.hist.quantile_ms(0.5));
    if ping.replies > 0 && lg.replies > 0 && ping_p50 > 5.0 * lg_p50 {
        println!(
            "list_groups: WARNING: unfair service: ping p50 {ping_p50:.1}ms is {:.0}x the \
             list_groups p50 {lg_p50:.1}ms",
            ping_p50 / lg_p50
        );
    }
    Ok(())
}

fn scenario_hold(tracker: &mut Tracker, cfg: &Config) -> Result<(), String> {
    let mut idle = Class::new(RequestBody::Ping, 1);
    idle.max_per_conn = Some(0);
    let mut load = Load::new(vec![idle])?;
    let rss_before = tracker.rss_kib();
    let t0 = Instant::now();
    let stop = load.open_many(tracker.addr, 0, cfg.hold, t0 + cfg.hold_secs);
    let open_secs = t0.elapsed().as_secs_f64();
    let held = load.classes[0].ready;
    let mut line = format!(
        "hold:        held={held}/{} handshaken connections, opened in {open_secs:.2}s \
         ({:.0}/s, slowest connect+handshake {:.1}ms)",
        cfg.hold,
        held as f64 / open_secs,
        load.max_open_time.as_secs_f64() * 1e3
    );
    if let Some(e) = &stop {
        line += &format!("; opening stopped: {e}");
    }
    if load.classes[0].failed > 0 {
        line += &format!(
            "; {} failed, first: {}",
            load.classes[0].failed,
            load.classes[0].first_error.as_deref().unwrap_or("")
        );
    }
    if let (Some(before), Some(after)) = (rss_before, tracker.rss_kib()) {
        line += &format!(
            "; tracker RSS {:.1} MiB -> {:.1} MiB",
            before as f64 / 1024.0,
            after as f64 / 1024.0
        );
    }
    println!("{line}");

    // A fresh connection must still be served promptly.
    let t1 = Instant::now();
    let probe = SyncClient::connect(tracker.addr, Duration::from_secs(1)).and_then(|mut c| {
        let replies = c.call_all(&[RequestBody::Ping], Duration::from_secs(1))?;
        expect_all("ping", &replies, |r| *r == ReplyBody::Pong)
    });
    let probe_ms = t1.elapsed().as_secs_f64() * 1e3;
    match probe {
        Ok(()) if probe_ms < 1000.0 => println!(
            "hold:        fresh connection: connect+hello+ping answered in {probe_ms:.2}ms \
             with {held} connections held (OK, < 1 s)"
        ),
        Ok(()) => println!(
            "hold:        fresh connection: answered in {probe_ms:.2}ms with {held} held \
             (SLOW, > 1 s)"
        ),
        Err(e) => println!(
            "hold:        fresh connection FAILED after {probe_ms:.2}ms with {held} held: {e}"
        ),
    }

    // Every held connection pings once, all at the same time.
    let t2 = Instant::now();
    load.classes[0].max_per_conn = Some(1);
    load.window = Window {
        from: Some(t2),
        to: None,
    };
    load.kick_all();
    let want = load.live() as u64;
    let all = load.run_while(t2 + Duration::from_secs(10), |l| {
        l.classes[0].total_replies >= want
    });
    let class = &load.classes[0];
    println!(
        "hold:        burst: {} of {want} held connections pinged at once, all answered in \
         {:.1}ms{} (latency mean={:.2}ms p99={:.2}ms)",
        class.total_replies,
        t2.elapsed().as_secs_f64() * 1e3,
        if all { "" } else { " (INCOMPLETE after 10 s)" },
        class.hist.mean_ms(),
        class.hist.quantile_ms(0.99)
    );
    if !tracker.is_running() {
        return Err("the tracker exited during the hold scenario".into());
    }
    Ok(())
}

fn scenario_announce(tracker: &Tracker, cfg: &Config) -> Result<(), String> {
    let mut idle = Class::new(RequestBody::Ping, 1);
    idle.max_per_conn = Some(0);
    let mut load = Load::new(vec![idle])?;
    let t0 = Instant::now();
    if let Some(e) = load.open_many(tracker.addr, 0, cfg.conns, t0 + cfg.hold_secs) {
        eprintln!("tracker_load: announce: stopped opening connections: {e}");
    }
    let n = load.classes[0].ready;
    let before = tracker.rss_kib().ok_or("no RSS")?;
    // The frame: length 16 MiB, type Login, and 16 bytes of its body; the rest never comes.
    let mut head = Vec::new();
    head.extend_from_slice(&(MAX_CLIENT_TRACKER_FRAME as u32).to_be_bytes());
    head.push(0x12);
    head.extend_from_slice(&[0u8; 16]);
    for idx in 0..load.conns.len() {
        if let Some(Some(conn)) = load.conns.get_mut(idx) {
            conn.wbuf.extend_from_slice(&head);
            if let Err(e) = flush(conn) {
                load.fail(idx, e);
            }
        }
    }
    // Each announced frame is read (or not) by now once a ping on a connection opened after
    // them is answered; then a few more, to let the tracker settle.
    let t1 = Instant::now();
    let mut probe = SyncClient::connect(tracker.addr, Duration::from_secs(10))?;
    let mut after = before;
    for _ in 0..20 {
        let replies = probe.call_all(&[RequestBody::Ping], Duration::from_secs(10))?;
        expect_all("ping", &replies, |r| *r == ReplyBody::Pong)?;
        after = after.max(tracker.rss_kib().ok_or("no RSS")?);
    }
    let grew = after.saturating_sub(before) as f64 / 1024.0;
    println!(
        "announce:    {n} connections each announced a {} MiB frame and sent 21 bytes of it: \
         tracker RSS {:.1} MiB -> {:.1} MiB (+{grew:.1} MiB, {}); a fresh connection's 20 \
         pings answered in {:.1}ms",
        MAX_CLIENT_TRACKER_FRAME >> 20,
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        if grew < 64.0 {
            "OK, < 64 MiB"
        } else {
            "NOT OK"
        },
        t1.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

fn scenario_login_flood(tracker: &Tracker, cfg: &Config) -> Result<(), String> {
    const PROBES: usize = 5;
    let n = cfg.conns;
    let setup_timeout = Duration::from_secs(300);
    let tag = std::process::id();
    let user = |what: &str, i: usize| {
        UserId::new(&format!("flood{tag}{what}{i}")).map_err(|e| format!("user id: {e}"))
    };
    let password = Password::new(PASSWORD).map_err(|e| format!("password: {e}"))?;
    let wrong = Password::new(b"not-the-password").map_err(|e| format!("password: {e}"))?;
    // Accounts: one per attacking connection (so no user name's delay slows the flood down:
    // the hardest case for the tracker), and one per probe.
    let t0 = Instant::now();
    let mut admin = SyncClient::connect(tracker.addr, Duration::from_secs(10))?;
    let mut creates = Vec::with_capacity(n + PROBES);
    for i in 0..n {
        creates.push(RequestBody::CreateUser {
            user: user("v", i)?,
            password: password.clone(),
        });
    }
    for i in 0..PROBES {
        creates.push(RequestBody::CreateUser {
            user: user("p", i)?,
            password: password.clone(),
        });
    }
    let replies = admin.call_all(&creates, setup_timeout)?;
    expect_all("create_user", &replies, |r| *r == ReplyBody::Done)?;
    drop(admin);
    println!(
        "login_flood: setup: {} users created in {:.2}s",
        n + PROBES,
        t0.elapsed().as_secs_f64()
    );

    let mut flood = Class::new(
        RequestBody::Login {
            user: user("v", 0)?,
            password: wrong.clone(),
            peer_addr: SocketAddr::from(([127, 0, 0, 1], 9)),
            shares: Vec::new(),
            client_key: [0; 32],
            link: 0,
        },
        cfg.flood_window,
    );
    flood.variants = (0..n)
        .map(|i| {
            Ok(RequestBody::Login {
                user: user("v", i)?,
                password: wrong.clone(),
                peer_addr: SocketAddr::from(([127, 0, 0, 1], 9)),
                shares: Vec::new(),
                client_key: [0; 32],
                link: 0,
            })
        })
        .collect::<Result<_, String>>()?;
    let mut load = Load::new(vec![flood])?;
    let t1 = Instant::now();
    load.window = Window {
        from: Some(t1),
        to: None,
    };
    if let Some(e) = load.open_many(tracker.addr, 0, n, t1 + Duration::from_secs(60)) {
        eprintln!("tracker_load: login_flood: stopped opening connections: {e}");
    }
    let attackers = load.classes[0].ready;
    let all_failed = load.run_while(t1 + setup_timeout, |l| {
        l.conns.iter().flatten().all(|c| c.next_reply > 1)
    });
    println!(
        "login_flood: {attackers} connections, {} wrong-password logins in flight each: \
         every one refused at least once after {:.2}s{}",
        cfg.flood_window,
        t1.elapsed().as_secs_f64(),
        if all_failed { "" } else { " (NOT ALL)" }
    );
    load.run_until(Instant::now() + cfg.warmup);

    // Probes on a thread, while this one keeps the flood going.
    let before = CpuSample::take(tracker);
    let refused_before = load.classes[0].total_replies;
    let addr = tracker.addr;
    let probe_users: Vec<UserId> = (0..PROBES)
        .map(|i| user("p", i))
        .collect::<Result<_, _>>()?;
    let (tx, rx) = mpsc::channel();
    let prober = std::thread::spawn(move || {
        for (i, u) in probe_users.into_iter().enumerate() {
            let result = (|| {
                let t = Instant::now();
                let mut c = SyncClient::connect(addr, Duration::from_secs(30))?;
                let ping = c.call_all(&[RequestBody::Ping], Duration::from_secs(30))?;
                expect_all("ping", &ping, |r| *r == ReplyBody::Pong)?;
                let pinged = t.elapsed();
                let t = Instant::now();
                let login = RequestBody::Login {
                    user: u,
                    password: Password::new(PASSWORD).map_err(|e| e.to_string())?,
                    peer_addr: SocketAddr::from(([127, 0, 0, 1], 30_000 + i as u16)),
                    shares: Vec::new(),
                    client_key: [0; 32],
                    link: 0,
                };
                let r = c.call_all(&[login], Duration::from_secs(30))?;
                expect_all("login", &r, |r| matches!(r, ReplyBody::LoggedIn { .. }))?;
                Ok::<_, String>((pinged, t.elapsed()))
            })();
            let _ = tx.send(result);
        }
    });
    let mut results = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5 * 30 + 10);
    while results.len() < PROBES && Instant::now() < deadline {
        load.turn(Instant::now() + Duration::from_millis(10));
        while let Ok(r) = rx.try_recv() {
            results.push(r);
        }
    }
    let after = CpuSample::take(tracker);
    let secs = after.at.duration_since(before.at).as_secs_f64();
    let refused = load.classes[0].total_replies - refused_before;
    load.drain();
    let _ = prober.join();
    let mut worst = Duration::ZERO;
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok((ping, login)) => {
                worst = worst.max(*login);
                println!(
                    "login_flood: probe {i}: fresh connection: connect+hello+ping {:.2}ms, \
                     correct login answered in {:.2}ms",
                    ping.as_secs_f64() * 1e3,
                    login.as_secs_f64() * 1e3
                );
            }
            Err(e) => println!("login_flood: probe {i}: FAILED: {e}"),
        }
    }
    let ok = results.len() == PROBES && results.iter().all(Result::is_ok);
    println!(
        "login_flood: slowest correct login {:.2}ms ({}); meanwhile {:.0} wrong passwords \
         refused per second; tracker_cpu={}",
        worst.as_secs_f64() * 1e3,
        if ok && worst < Duration::from_secs(1) {
            "OK, < 1 s"
        } else {
            "NOT OK"
        },
        refused as f64 / secs,
        before
            .tracker
            .zip(after.tracker)
            .map_or("unknown".into(), |(b, a)| format!(
                "{:.0}% of one core",
                100.0 * (a - b) / secs
            )),
    );
    if !ok {
        return Err("a probe failed".into());
    }
    Ok(())
}

fn scenario_big_listing(tracker: &Tracker) -> Result<(), String> {
    let users = env_num(BENCH, "TRACKER_BENCH_BIG_USERS", 300.0) as usize;
    let groups = env_num(BENCH, "TRACKER_BENCH_BIG_GROUPS", 300_000.0) as usize;
    let per_user = groups.div_ceil(users.max(1));
    let timeout = Duration::from_secs(600);
    let password = Password::new(PASSWORD).map_err(|e| format!("password: {e}"))?;
    let t0 = Instant::now();
    let mut clients = Vec::with_capacity(users);
    for i in 0..users {
        let user = UserId::new(&format!("big{i}")).map_err(|e| format!("user id: {e}"))?;
        let mut c = SyncClient::connect(tracker.addr, Duration::from_secs(10))?;
        let first = c.send(&[
            RequestBody::CreateUser {
                user: user.clone(),
                password: password.clone(),
            },
            RequestBody::Login {
                user,
                password: password.clone(),
                peer_addr: SocketAddr::from(([127, 0, 0, 1], 9)),
                shares: Vec::new(),
                client_key: [0; 32],
                link: 0,
            },
        ])?;
        clients.push((c, first));
    }
    for (c, first) in &mut clients {
        let r = c.replies(*first, 2, Instant::now() + timeout)?;
        if r[0] != ReplyBody::Done || !matches!(r[1], ReplyBody::LoggedIn { .. }) {
            return Err(format!("create_user and login: {r:?}"));
        }
    }
    println!(
        "big_listing: {users} users created and logged in in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let t1 = Instant::now();
    let mut made = 0;
    let mut sent = Vec::with_capacity(users);
    for (i, (c, _)) in clients.iter_mut().enumerate() {
        let n = per_user.min(groups - made);
        let bodies: Vec<RequestBody> = (made..made + n)
            .map(|g| {
                GroupId::new(&format!("{g:07}{}", "g".repeat(57)))
                    .map(|group| RequestBody::CreateGroup { group })
                    .map_err(|e| format!("group id: {e}"))
            })
            .collect::<Result<_, _>>()?;
        made += n;
        sent.push((i, c.send(&bodies)?, n));
    }
    for (i, first, n) in sent {
        let replies = clients[i].0.replies(first, n, Instant::now() + timeout)?;
        expect_all("create_group", &replies, |r| *r == ReplyBody::Done)?;
    }
    println!(
        "big_listing: {made} groups created in {:.1}s; tracker RSS {:.1} MiB",
        t1.elapsed().as_secs_f64(),
        tracker.rss_kib().unwrap_or(0) as f64 / 1024.0
    );
    let lister = &mut clients[0].0;
    let t2 = Instant::now();
    let (mut listed, mut parts, mut bytes, mut from) = (Vec::new(), 0, 0usize, 0u32);
    loop {
        let body = RequestBody::ListPart {
            listing: Listing::Groups,
            from,
        };
        let first = lister.send(std::slice::from_ref(&body))?;
        let reply = lister
            .replies(first, 1, Instant::now() + timeout)?
            .remove(0);
        let ReplyBody::Part { next, items } = reply else {
            return Err(format!("list part from {from}: {reply:?}"));
        };
        let ReplyBody::Groups(part) = *items else {
            return Err(format!("list part from {from}: {items:?}"));
        };
        parts += 1;
        bytes += Reply {
            req_id: first,
            body: ReplyBody::Groups(part.clone()),
        }
        .size_bound();
        listed.extend(part.into_iter().map(|g| g.group));
        if next == 0 {
            break;
        }
        from = next;
    }
    let took = t2.elapsed();
    let sorted = listed.windows(2).all(|w| w[0] < w[1]);
    if listed.len() != made || !sorted {
        return Err(format!(
            "listed {} groups (sorted: {sorted}) of {made}",
            listed.len()
        ));
    }
    println!(
        "big_listing: all {made} groups listed, sorted, in {parts} parts ({:.1} MB) in {:.2}s; \
         tracker RSS {:.1} MiB",
        bytes as f64 / 1e6,
        took.as_secs_f64(),
        tracker.rss_kib().unwrap_or(0) as f64 / 1024.0
    );
    Ok(())
}

fn main() {
    let cfg = Config::from_env();
    let nofile = rlimit::increase_nofile_limit(u64::MAX);
    let mut tracker = match Tracker::start() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tracker_load: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "tracker_load: tracker pid {} on {} (--log-level warn), {} CPUs, bench nofile limit {}, \
         warm-up {:.1}s, measure {:.1}s",
        tracker.pid(),
        tracker.addr,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        match &nofile {
            Ok(n) => n.to_string(),
            Err(e) => format!("unknown ({e})"),
        },
        cfg.warmup.as_secs_f64(),
        cfg.secs.as_secs_f64()
    );
    let mut failed = false;
    if cfg.wants("ping") {
        if let Err(e) = scenario_ping(&tracker, &cfg) {
            println!("ping: FAILED: {e}");
            failed = true;
        }
    }
    if cfg.wants("list_groups") {
        if let Err(e) = scenario_list_groups(&tracker, &cfg) {
            println!("list_groups: FAILED: {e}");
            failed = true;
        }
    }
    if cfg.wants("hold") {
        if let Err(e) = scenario_hold(&mut tracker, &cfg) {
            println!("hold: FAILED: {e}");
            failed = true;
        }
    }
    if cfg.wants("announce") {
        if let Err(e) = scenario_announce(&tracker, &cfg) {
            println!("announce: FAILED: {e}");
            failed = true;
        }
    }
    if cfg.wants("login_flood") {
        if let Err(e) = scenario_login_flood(&tracker, &cfg) {
            println!("login_flood: FAILED: {e}");
            failed = true;
        }
    }
    if cfg.named("big_listing") {
        if let Err(e) = scenario_big_listing(&tracker) {
            println!("big_listing: FAILED: {e}");
            failed = true;
        }
    }
    let total_cpu = tracker.cpu_secs();
    drop(tracker);
    if let Some(cpu) = total_cpu {
        println!("tracker_load: tracker used {cpu:.2} CPU-seconds in all");
    }
    if failed {
        std::process::exit(1);
    }
}
