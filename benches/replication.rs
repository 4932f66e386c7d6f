//! Tracker replication benchmark (`cargo bench --bench replication`).
//!
//! Starts real `tracker_program`s (release builds under `cargo bench`) on free loopback ports,
//! as one service of 1, 2 or 3 trackers (started in order, each once the one before serves, so
//! tracker 1 is the primary), and measures:
//!
//! - **writes**: replicated changes per second. N connections (default 128), each logged in as
//!   its own user and speaking the client wire protocol from this process's mio reactor,
//!   spread evenly over the trackers (a backup forwards its clients' changes to the primary),
//!   each keeping W changes in flight (default 1, like `client_program`, which runs one command
//!   at a time). The changes alternate `CreateGroup g<i>` and `LeaveGroup g<i>` (the owner
//!   leaving deletes the group), so the state stays small however long it runs. Each change is
//!   answered only once every live tracker holds it. Users are created and logged in before
//!   the clock starts (each Argon2 hash costs the tracker ~10 ms). Prints changes/s, p50 / p99
//!   / max latency and each tracker's CPU use during the measured seconds.
//! - **failover**: three trackers; a client connected to the primary; the primary is killed
//!   with SIGKILL; the time from the kill until the client's next change is answered through
//!   another tracker. Two clients, one round each per repetition: a raw connection that has a
//!   change in flight at the kill and does what `client_program` does (connect to the next
//!   tracker of its list, hello with the same client id, `Resume` with the session token, the
//!   unanswered request again with its id; the answer must be `Done`, not a refusal, so the
//!   change was applied once), and the real `client_program`, idle at the kill, whose next
//!   command is written to its stdin right after the kill. The killed tracker is started again
//!   (and has caught up) before the next round, which kills the new primary.
//!
//! Run it with:
//!
//!     cargo bench --bench replication                    # both parts
//!     cargo bench --bench replication -- writes          # one of them
//!     REPL_BENCH_CONNS=256 REPL_BENCH_SECS=10 cargo bench --bench replication -- writes
//!
//! Knobs (environment): `REPL_BENCH_CONNS` (128), `REPL_BENCH_WINDOW` (changes in flight per
//! connection, 1), `REPL_BENCH_SECS` (measured seconds per cluster size, 5),
//! `REPL_BENCH_WARMUP` (seconds excluded, 1), `REPL_BENCH_TRACKERS` (cluster sizes, `1,2,3`),
//! `REPL_BENCH_SPREAD` (1: connections spread over the trackers; 0: all on the primary),
//! `REPL_BENCH_FAILOVERS` (repetitions of the failover rounds, 5), `REPL_BENCH_TRACKER_BIN`
//! (the tracker program to run instead of this build's: two builds compared under the same
//! load generator).
//!
//! With `perf` (as root) the writes part also prints, per change and for all the trackers
//! together, the `recvfrom`, `sendto` and `epoll_wait` calls and the CPU time (`task-clock`)
//! of the measured seconds, beside the `fdatasync` calls.
//!
//! Every process is stopped when the benchmark ends (trackers get `quit`, then SIGKILL after
//! 2 s; clients end with their input), also on an error.

mod common;

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use common::{cpu_secs, env_num, io_err, quit_or_kill, SyncClient};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use p2pshare::wire::frame::FrameBuffer;
use p2pshare::wire::tracker_link::{Reply, ReplyBody, Request, RequestBody, TrackerMsg};
use p2pshare::wire::{GroupId, Password, UserId};

const TRACKER_BIN: &str = env!("CARGO_BIN_EXE_tracker_program");

/// The tracker program to run: `REPL_BENCH_TRACKER_BIN` (another build's, to compare two
/// builds under the same load generator), else this build's.
fn tracker_bin() -> PathBuf {
    std::env::var_os("REPL_BENCH_TRACKER_BIN")
        .map_or_else(|| PathBuf::from(TRACKER_BIN), PathBuf::from)
}
const CLIENT_BIN: &str = env!("CARGO_BIN_EXE_client_program");
const BENCH: &str = "replication";
const PASSWORD: &[u8] = b"bench-password";
/// Longest wait of one setup step (a start, a login, a reply).
const STEP: Duration = Duration::from_secs(30);
/// Connections opened at once during set-up (the listen backlog is 128).
const SETUP_BATCH: usize = 64;

type Res<T> = Result<T, String>;

struct Config {
    conns: usize,
    window: usize,
    secs: Duration,
    warmup: Duration,
    sizes: Vec<usize>,
    spread: bool,
    failovers: usize,
    parts: Vec<String>,
}

impl Config {
    fn from_env() -> Config {
        let sizes = std::env::var("REPL_BENCH_TRACKERS")
            .unwrap_or_else(|_| "1,2,3".into())
            .split(',')
            .filter_map(|s| s.trim().parse::<usize>().ok())
            .filter(|n| (1..=9).contains(n))
            .collect();
        Config {
            conns: env_num(BENCH, "REPL_BENCH_CONNS", 128.0).max(1.0) as usize,
            window: env_num(BENCH, "REPL_BENCH_WINDOW", 1.0).max(1.0) as usize,
            secs: Duration::from_secs_f64(env_num(BENCH, "REPL_BENCH_SECS", 5.0).max(0.1)),
            warmup: Duration::from_secs_f64(env_num(BENCH, "REPL_BENCH_WARMUP", 1.0)),
            sizes,
            spread: env_num(BENCH, "REPL_BENCH_SPREAD", 1.0) != 0.0,
            failovers: env_num(BENCH, "REPL_BENCH_FAILOVERS", 5.0) as usize,
            parts: std::env::args()
                .skip(1)
                .filter(|a| !a.starts_with('-'))
                .collect(),
        }
    }

    fn wants(&self, part: &str) -> bool {
        self.parts.is_empty() || self.parts.iter().any(|p| p == part)
    }
}

fn user(name: &str) -> UserId {
    UserId::new(name).expect("valid user id")
}

fn group(name: &str) -> GroupId {
    GroupId::new(name).expect("valid group id")
}

fn password() -> Password {
    Password::new(PASSWORD).expect("valid password")
}

/// A unique-enough client id (the trackers tell clients apart by it).
fn client_id(salt: u64) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (t ^ (u64::from(std::process::id()) << 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt
}

// ---------------------------------------------------------------------------------------------
// The trackers.

struct TrackerProc {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl TrackerProc {
    /// Asks the tracker to quit, and kills it if it has not within 2 s.
    fn stop(mut self) {
        quit_or_kill(&mut self.child, self.stdin.take(), true);
    }
}

/// The trackers of one tracker file; stopped when dropped.
struct Cluster {
    addrs: Vec<SocketAddr>,
    info: PathBuf,
    procs: Vec<Option<TrackerProc>>,
    runs: Vec<usize>,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// `n` trackers started in order, each once the one before serves; tried again on other
    /// ports if a port was taken meanwhile.
    fn start(n: usize) -> Res<Cluster> {
        let mut last = String::new();
        for _ in 0..3 {
            let listeners: Vec<StdListener> = (0..n)
                .map(|_| StdListener::bind("127.0.0.1:0"))
                .collect::<io::Result<_>>()
                .map_err(io_err("bind 127.0.0.1:0"))?;
            let addrs: Vec<SocketAddr> = listeners
                .iter()
                .map(|l| l.local_addr())
                .collect::<io::Result<_>>()
                .map_err(io_err("local_addr"))?;
            drop(listeners);
            let dir = tempfile::tempdir().map_err(io_err("tempdir"))?;
            let info = dir.path().join("tracker_info.txt");
            let text: String = addrs.iter().map(|a| format!("{a}\n")).collect();
            fs::write(&info, text).map_err(io_err("write the tracker file"))?;
            let mut cluster = Cluster {
                addrs,
                info,
                procs: (0..n).map(|_| None).collect(),
                runs: vec![0; n],
                dir,
            };
            match (1..=n).try_for_each(|no| cluster.start_one(no)) {
                Ok(()) => return Ok(cluster),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn log_path(&self, no: usize, run: usize) -> PathBuf {
        self.dir.path().join(format!("tracker-{no}-{run}.log"))
    }

    /// Starts tracker `no` and waits until it serves (a client's hello is welcomed).
    fn start_one(&mut self, no: usize) -> Res<()> {
        self.runs[no - 1] += 1;
        let log = self.log_path(no, self.runs[no - 1]);
        let stderr = File::create(&log).map_err(io_err("create a log file"))?;
        // Trackers' keys and data go in the bench's temporary directory, never the real home.
        let mut child = Command::new(tracker_bin())
            .env("XDG_STATE_HOME", self.dir.path())
            // The bench's clients speak plain client frames.
            .args(["--log-level", "warn", "--accept-plain-clients"])
            .arg(&self.info)
            .arg(no.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .map_err(io_err("start tracker_program"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let proc = TrackerProc { child, stdin };
        let (tx, rx) = mpsc::channel();
        if let Some(stdout) = stdout {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let _ = tx.send(line);
                }
            });
        }
        let addr = self.addrs[no - 1];
        let want = format!("tracker {no} listening on {addr}");
        let deadline = Instant::now() + STEP;
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line == want => break,
                Ok(_) => {}
                Err(_) => {
                    proc.stop();
                    let text = fs::read_to_string(&log).unwrap_or_default();
                    return Err(format!("tracker {no} did not listen on {addr}: {text}"));
                }
            }
        }
        self.procs[no - 1] = Some(proc);
        while Instant::now() < deadline {
            if SyncClient::connect_as(addr, client_id(no as u64), Duration::from_secs(5)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("tracker {no} did not serve within {STEP:?}"))
    }

    /// Starts a killed tracker again on its address.
    fn restart(&mut self, no: usize) -> Res<()> {
        let mut last = String::new();
        for attempt in 1..=5 {
            match self.start_one(no) {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(200 * attempt));
        }
        Err(last)
    }

    fn pid(&self, no: usize) -> Option<u32> {
        self.procs[no - 1].as_ref().map(|p| p.child.id())
    }

    /// SIGKILL, then reap.
    fn kill9(&mut self, no: usize) {
        if let Some(mut p) = self.procs[no - 1].take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// A tracker file listing these trackers in this order.
    fn info_for(&self, nos: &[usize]) -> Res<PathBuf> {
        let name: Vec<String> = nos.iter().map(|n| n.to_string()).collect();
        let path = self
            .dir
            .path()
            .join(format!("client-{}.txt", name.join("-")));
        let text: String = nos
            .iter()
            .map(|n| format!("{}\n", self.addrs[n - 1]))
            .collect();
        fs::write(&path, text).map_err(io_err("write a tracker file"))?;
        Ok(path)
    }

    /// What the trackers logged (warnings and errors), for error messages.
    fn logs(&self) -> String {
        let mut text = String::new();
        for (i, runs) in self.runs.iter().enumerate() {
            for run in 1..=*runs {
                let log = fs::read_to_string(self.log_path(i + 1, run)).unwrap_or_default();
                if !log.is_empty() {
                    text.push_str(&format!("tracker {} (run {run}):\n{log}", i + 1));
                }
            }
        }
        text
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in self.procs.iter_mut().filter_map(Option::take) {
            p.stop();
        }
    }
}

/// Creates users `<prefix>0..n` through `links` connections spread over `addrs` (each
/// connection's requests wait for one another's Argon2 hashes; several connections use the
/// trackers' password threads in parallel).
fn create_users(addrs: &[SocketAddr], prefix: &str, n: usize) -> Res<()> {
    let links = (2 * addrs.len()).min(n.max(1));
    let mut clients = Vec::new();
    for i in 0..links {
        clients.push(SyncClient::connect_as(
            addrs[i % addrs.len()],
            client_id(1000 + i as u64),
            STEP,
        )?);
    }
    let mut sent: Vec<Vec<u64>> = vec![Vec::new(); links];
    for i in 0..n {
        let id = clients[i % links].send_one(RequestBody::CreateUser {
            user: user(&format!("{prefix}{i}")),
            password: password(),
        })?;
        sent[i % links].push(id);
    }
    let deadline = Instant::now() + STEP + Duration::from_millis(50 * n as u64);
    for (c, ids) in clients.iter_mut().zip(&sent) {
        for id in ids {
            match c.reply(*id, deadline)? {
                ReplyBody::Done => {}
                other => return Err(format!("create_user: {other:?}")),
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Latencies.

/// Sorted latencies, in seconds.
struct Latencies(Vec<f64>);

impl Latencies {
    fn quantile_ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let i = ((self.0.len() as f64 * q).ceil() as usize).clamp(1, self.0.len()) - 1;
        self.0[i] * 1e3
    }
}

fn summary(times: &[Duration]) -> String {
    if times.is_empty() {
        return "no rounds".into();
    }
    let mut t: Vec<Duration> = times.to_vec();
    t.sort();
    format!(
        "min {:.1} ms, median {:.1} ms, max {:.1} ms ({} rounds)",
        t[0].as_secs_f64() * 1e3,
        t[t.len() / 2].as_secs_f64() * 1e3,
        t[t.len() - 1].as_secs_f64() * 1e3,
        t.len()
    )
}

// ---------------------------------------------------------------------------------------------
// Part (a): replicated writes per second.

/// A logged-in connection of the load.
struct LoadConn {
    stream: TcpStream,
    rbuf: FrameBuffer,
    wbuf: Vec<u8>,
    next_id: u64,
    /// Requests in flight: (id, sent at).
    in_flight: VecDeque<(u64, Instant)>,
    group: GroupId,
    /// The next change creates the group (else: leaves it).
    create_next: bool,
}

impl LoadConn {
    fn queue_change(&mut self, now: Instant) {
        let body = if self.create_next {
            RequestBody::CreateGroup {
                group: self.group.clone(),
            }
        } else {
            RequestBody::LeaveGroup {
                group: self.group.clone(),
            }
        };
        self.create_next = !self.create_next;
        Request {
            req_id: self.next_id,
            body,
        }
        .emit(&mut self.wbuf);
        self.in_flight.push_back((self.next_id, now));
        self.next_id += 1;
    }

    fn flush(&mut self) -> Res<()> {
        while !self.wbuf.is_empty() {
            match self.stream.write(&self.wbuf) {
                Ok(0) => return Err("write returned 0".into()),
                Ok(n) => {
                    self.wbuf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("write: {e}")),
            }
        }
        Ok(())
    }
}

struct WriteResult {
    changes: u64,
    elapsed: Duration,
    lat: Latencies,
    max_ms: f64,
    cpu: Vec<Option<f64>>,
    /// This process's CPU use (the load generator) over the measured seconds.
    generator_cpu: Option<f64>,
    /// What `perf` counted in all the trackers during the measured seconds, if it could.
    counts: Option<TrackerCounts>,
}

/// Counts of all the trackers' processes over the measured seconds (`perf stat`).
#[derive(Debug, Default, Clone, Copy)]
struct TrackerCounts {
    fsyncs: u64,
    recvs: u64,
    sends: u64,
    epoll_waits: u64,
    /// CPU time, in milliseconds (`task-clock`).
    cpu_ms: f64,
}

/// Counts the `fdatasync`, `recvfrom`, `sendto` and `epoll_wait` calls and the CPU time of
/// some processes with `perf stat` (kernel tracepoints and a software clock: no cost to
/// them, and no hardware counters needed) from `start` until `finish`. Needs `perf` and the
/// right to read tracepoints (root); `None` otherwise.
struct PerfCounter {
    child: Child,
}

/// The events `PerfCounter` asks for.
const PERF_EVENTS: &str = "syscalls:sys_enter_fdatasync,syscalls:sys_enter_recvfrom,\
    syscalls:sys_enter_sendto,syscalls:sys_enter_epoll_wait,task-clock";

impl PerfCounter {
    fn start(pids: &[u32]) -> Option<PerfCounter> {
        let list: Vec<String> = pids.iter().map(u32::to_string).collect();
        let child = Command::new("perf")
            .args(["stat", "-x", ",", "-e", PERF_EVENTS, "-p"])
            .arg(list.join(","))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok()?;
        Some(PerfCounter { child })
    }

    fn finish(self) -> Option<TrackerCounts> {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let out = self.child.wait_with_output().ok()?;
        let text = String::from_utf8_lossy(&out.stderr);
        let count = |event: &str| -> Option<f64> {
            text.lines()
                .find(|l| l.contains(event))
                .and_then(|l| l.split(',').next())
                .and_then(|n| n.trim().parse().ok())
        };
        Some(TrackerCounts {
            fsyncs: count("sys_enter_fdatasync")? as u64,
            recvs: count("sys_enter_recvfrom").unwrap_or(0.0) as u64,
            sends: count("sys_enter_sendto").unwrap_or(0.0) as u64,
            epoll_waits: count("sys_enter_epoll_wait").unwrap_or(0.0) as u64,
            cpu_ms: count("task-clock").unwrap_or(0.0),
        })
    }
}

fn bench_writes(cfg: &Config, n_trackers: usize) -> Res<WriteResult> {
    let cluster = Cluster::start(n_trackers)?;
    let result = run_writes(cfg, &cluster);
    if result.is_err() {
        eprintln!("{}", cluster.logs());
    }
    result
}

fn run_writes(cfg: &Config, cluster: &Cluster) -> Res<WriteResult> {
    let n = cfg.conns;
    let targets: Vec<SocketAddr> = if cfg.spread {
        cluster.addrs.clone()
    } else {
        vec![cluster.addrs[0]]
    };
    create_users(&cluster.addrs, "u", n)?;
    // Log every connection in, SETUP_BATCH at a time.
    let mut links = Vec::with_capacity(n);
    let mut start = 0;
    while start < n {
        let end = (start + SETUP_BATCH).min(n);
        let mut batch = Vec::new();
        for i in start..end {
            let mut c =
                SyncClient::connect_as(targets[i % targets.len()], client_id(i as u64), STEP)?;
            let id = c.send_one(RequestBody::Login {
                user: user(&format!("u{i}")),
                password: password(),
                peer_addr: SocketAddr::from(([127, 0, 0, 1], 20_000 + i as u16)),
                shares: Vec::new(),
                client_key: [0; 32],
                link: 0,
            })?;
            batch.push((c, id));
        }
        let deadline = Instant::now() + STEP + Duration::from_millis(50 * (end - start) as u64);
        for (mut c, id) in batch {
            match c.reply(id, deadline)? {
                ReplyBody::LoggedIn { .. } => links.push(c),
                other => return Err(format!("login: {other:?}")),
            }
        }
        start = end;
    }

    let mut poll = Poll::new().map_err(io_err("Poll::new"))?;
    let mut conns = Vec::with_capacity(n);
    for (i, c) in links.into_iter().enumerate() {
        let (mut stream, rbuf, next_id) = c.into_mio()?;
        poll.registry()
            .register(
                &mut stream,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(io_err("register"))?;
        conns.push(LoadConn {
            stream,
            rbuf,
            wbuf: Vec::new(),
            next_id,
            in_flight: VecDeque::new(),
            group: group(&format!("g{i}")),
            create_next: true,
        });
    }

    let begin = Instant::now();
    let from = begin + cfg.warmup;
    let to = from + cfg.secs;
    for c in &mut conns {
        for _ in 0..cfg.window {
            c.queue_change(begin);
        }
        c.flush()?;
    }
    let pids: Vec<Option<u32>> = (1..=cluster.addrs.len())
        .map(|no| cluster.pid(no))
        .collect();
    let mut cpu_from: Option<Vec<Option<f64>>> = None;
    let mut generator_from = None;
    let mut perf_counter: Option<Option<PerfCounter>> = None;
    let mut lat = Vec::new();
    let mut changes = 0u64;
    let mut max_s = 0f64;
    let mut events = Events::with_capacity(1024);
    loop {
        let now = Instant::now();
        if now >= to {
            break;
        }
        if cpu_from.is_none() && now >= from {
            cpu_from = Some(pids.iter().map(|p| p.and_then(cpu_secs)).collect());
            generator_from = cpu_secs(std::process::id());
            // For a profiler started by hand on the trackers (`perf record -p`).
            eprintln!("  measuring for {:?}", cfg.secs);
            let live: Vec<u32> = pids.iter().flatten().copied().collect();
            perf_counter = Some(PerfCounter::start(&live));
        }
        let wait = to
            .saturating_duration_since(now)
            .min(Duration::from_millis(50));
        match poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("poll: {e}")),
        }
        for ev in events.iter() {
            let c = &mut conns[ev.token().0];
            if ev.is_writable() {
                c.flush()?;
            }
            if !(ev.is_readable() || ev.is_read_closed() || ev.is_error()) {
                continue;
            }
            // A read that returns less than it had room for emptied the socket, and more
            // bytes raise a new (edge-triggered) event: no second read to hear `WouldBlock`,
            // as the tracker reads (`Conn::set_short_reads_end`). A close or an error reads on
            // to the end (its event is the last).
            let short_reads_end = !(ev.is_read_closed() || ev.is_error());
            let mut drained = false;
            while !drained {
                let spare = c.rbuf.spare();
                let room = spare.len();
                match c.stream.read(spare) {
                    Ok(0) => return Err(format!("connection {} closed", ev.token().0)),
                    Ok(k) => {
                        c.rbuf.commit(k);
                        drained = short_reads_end && k < room;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("read: {e}")),
                }
                let now = Instant::now();
                let mut answered = 0;
                while let Some(payload) = c.rbuf.next_frame().map_err(|e| format!("{e}"))? {
                    let msg = TrackerMsg::parse(payload).map_err(|e| format!("{e}"))?;
                    let Some((want, sent)) = c.in_flight.pop_front() else {
                        return Err(format!("unexpected {msg:?}"));
                    };
                    match msg {
                        TrackerMsg::Reply(Reply {
                            req_id,
                            body: ReplyBody::Done,
                        }) if req_id == want => {}
                        other => return Err(format!("reply to {want}: {other:?}")),
                    }
                    if now >= from && now < to {
                        let s = now.duration_since(sent).as_secs_f64();
                        lat.push(s);
                        max_s = max_s.max(s);
                        changes += 1;
                    }
                    answered += 1;
                }
                for _ in 0..answered {
                    c.queue_change(now);
                }
            }
            c.flush()?;
        }
    }
    let cpu_to: Vec<Option<f64>> = pids.iter().map(|p| p.and_then(cpu_secs)).collect();
    let generator_cpu = cpu_secs(std::process::id())
        .zip(generator_from)
        .map(|(b, a)| (b - a) / cfg.secs.as_secs_f64());
    let counts = perf_counter.flatten().and_then(PerfCounter::finish);
    let cpu = match cpu_from {
        Some(f) => f
            .iter()
            .zip(&cpu_to)
            .map(|(a, b)| Some((b.as_ref()? - a.as_ref()?) / cfg.secs.as_secs_f64()))
            .collect(),
        None => vec![None; pids.len()],
    };
    lat.sort_by(f64::total_cmp);
    Ok(WriteResult {
        changes,
        elapsed: cfg.secs,
        lat: Latencies(lat),
        max_ms: max_s * 1e3,
        cpu,
        generator_cpu,
        counts,
    })
}

// ---------------------------------------------------------------------------------------------
// Part (b): failover time.

/// The next tracker a client would try after `from` died: the following ones in its list
/// (wrapping), skipping those that refuse.
fn reconnect(
    cluster: &Cluster,
    order: &[usize],
    from_index: usize,
    id: u64,
) -> Res<(SyncClient, usize)> {
    let deadline = Instant::now() + STEP;
    while Instant::now() < deadline {
        for k in 1..=order.len() {
            let no = order[(from_index + k) % order.len()];
            if let Ok(c) =
                SyncClient::open(cluster.addrs[no - 1], Some(id), Duration::from_millis(500))
            {
                return Ok((c, no));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err("no tracker accepts a connection".into())
}

/// One round with a raw connection: logged in on the primary, a change in flight at the kill.
/// Returns the time from the kill to the answer of that change (or the next) through the new
/// tracker, and whether it was the change sent before the kill (the dead tracker had not
/// answered it).
fn raw_round(cluster: &mut Cluster, primary: usize, user_name: &str) -> Res<(Duration, bool)> {
    let order: Vec<usize> = (1..=cluster.addrs.len()).collect();
    let id = client_id(primary as u64 * 7919);
    let mut c = SyncClient::connect_as(cluster.addrs[primary - 1], id, STEP)?;
    let token = match c.call(
        RequestBody::Login {
            user: user(user_name),
            password: password(),
            peer_addr: SocketAddr::from(([127, 0, 0, 1], 30_000)),
            shares: Vec::new(),
            client_key: [0; 32],
            link: 0,
        },
        STEP,
    )? {
        ReplyBody::LoggedIn { token } => token,
        other => return Err(format!("login: {other:?}")),
    };
    let g = group(&format!("fo-{user_name}"));
    let change = |create: bool| {
        if create {
            RequestBody::CreateGroup { group: g.clone() }
        } else {
            RequestBody::LeaveGroup { group: g.clone() }
        }
    };
    let mut create = true;
    for _ in 0..10 {
        match c.call(change(create), STEP)? {
            ReplyBody::Done => create = !create,
            other => return Err(format!("change: {other:?}")),
        }
    }
    // A change in flight, then the kill.
    let mut pending = (c.send_one(change(create))?, change(create));
    let first = pending.0;
    let killed = Instant::now();
    cluster.kill9(primary);
    // Answers that left the old tracker before it died are taken; the first failure to read
    // or write means the link is gone.
    loop {
        match c.reply(pending.0, Instant::now() + STEP) {
            Ok(ReplyBody::Done) => {
                create = !create;
                let body = change(create);
                match c.send_one(body.clone()) {
                    Ok(req) => pending = (req, body),
                    Err(_) => {
                        pending = (c.next_id() - 1, body);
                        break;
                    }
                }
            }
            Ok(other) => return Err(format!("change: {other:?}")),
            Err(_) => break,
        }
    }
    let index = order.iter().position(|n| *n == primary).unwrap_or(0);
    let (mut n, _) = reconnect(cluster, &order, index, id)?;
    n.set_next_id(pending.0 + 1);
    let resume = n.next_id();
    n.set_next_id(resume + 1);
    n.send_with_id(resume, RequestBody::Resume { token, link: 0 })?;
    n.send_with_id(pending.0, pending.1)?;
    let deadline = Instant::now() + STEP;
    match n.recv(deadline)? {
        TrackerMsg::Welcome { .. } => {}
        other => return Err(format!("expected a welcome, got {other:?}")),
    }
    match n.reply(resume, deadline)? {
        ReplyBody::LoggedIn { token: t } if t == token => {}
        other => return Err(format!("resume: {other:?}")),
    }
    match n.reply(pending.0, deadline)? {
        ReplyBody::Done => {}
        other => return Err(format!("the retried change was answered {other:?}")),
    }
    let took = killed.elapsed();
    // The session goes on.
    match n.call(change(!create), STEP)? {
        ReplyBody::Done => {}
        other => return Err(format!("change after the failover: {other:?}")),
    }
    Ok((took, pending.0 == first))
}

/// A `client_program` with piped stdin and stdout; killed when dropped.
struct ClientProc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl ClientProc {
    fn start(info: &Path) -> Res<ClientProc> {
        let listen = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(io_err("find a free port"))?;
        let state_home = info.parent().unwrap_or(Path::new("."));
        let mut child = Command::new(CLIENT_BIN)
            .env("XDG_STATE_HOME", state_home)
            .args(["--log-level", "error"])
            .arg(listen.to_string())
            .arg(info)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(io_err("start client_program"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let (tx, rx) = mpsc::channel();
        if let Some(stdout) = stdout {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(ClientProc {
            child,
            stdin,
            lines: rx,
        })
    }

    fn cmd(&mut self, command: &str, want: &str) -> Res<()> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        writeln!(stdin, "{command}")
            .and_then(|()| stdin.flush())
            .map_err(io_err("write the client's stdin"))?;
        match self.lines.recv_timeout(STEP) {
            Ok(line) if line == want => Ok(()),
            Ok(line) => Err(format!("{command}: expected {want:?}, got {line:?}")),
            Err(e) => Err(format!("{command}: no answer ({e})")),
        }
    }
}

impl Drop for ClientProc {
    fn drop(&mut self) {
        // End of input ends it; kill it if it lingers.
        quit_or_kill(&mut self.child, self.stdin.take(), false);
    }
}

/// One round with the real client: logged in through the primary (first in its file), idle
/// at the kill; its next command is sent right after. Returns the kill-to-answer time.
fn client_round(cluster: &mut Cluster, primary: usize, user_name: &str) -> Res<Duration> {
    let mut order = vec![primary];
    order.extend((1..=cluster.addrs.len()).filter(|n| *n != primary));
    let info = cluster.info_for(&order)?;
    let mut c = ClientProc::start(&info)?;
    c.cmd(
        &format!("login {user_name} {}", String::from_utf8_lossy(PASSWORD)),
        &format!("logged in as {user_name}"),
    )?;
    let g = format!("fc-{user_name}");
    c.cmd(&format!("create_group {g}"), &format!("group {g} created"))?;
    let killed = Instant::now();
    cluster.kill9(primary);
    c.cmd(&format!("leave_group {g}"), &format!("left group {g}"))?;
    Ok(killed.elapsed())
}

fn bench_failover(cfg: &Config) -> Res<()> {
    let mut cluster = Cluster::start(3)?;
    let result = run_failover(cfg, &mut cluster);
    if result.is_err() {
        eprintln!("{}", cluster.logs());
    }
    result
}

fn run_failover(cfg: &Config, cluster: &mut Cluster) -> Res<()> {
    let rounds = cfg.failovers;
    create_users(&cluster.addrs, "raw", rounds)?;
    create_users(&cluster.addrs, "cli", rounds)?;
    let mut primary = 1;
    let (mut raw, mut cli) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        for kind in ["raw", "cli"] {
            let (took, note) = match kind {
                "raw" => {
                    let (took, retried) = raw_round(cluster, primary, &format!("raw{r}"))?;
                    let note = if retried {
                        " (the change in flight at the kill, retried)"
                    } else {
                        " (the dead tracker had answered the change in flight)"
                    };
                    (took, note)
                }
                _ => (client_round(cluster, primary, &format!("cli{r}"))?, ""),
            };
            println!(
                "  round {} ({kind}): tracker {primary} killed; next change answered after {:.1} ms{note}",
                r + 1,
                took.as_secs_f64() * 1e3
            );
            if kind == "raw" {
                raw.push(took);
            } else {
                cli.push(took);
            }
            // The lowest-numbered live tracker took over; the killed one rejoins as a backup.
            let killed = primary;
            primary = (1..=cluster.addrs.len())
                .find(|n| *n != killed)
                .unwrap_or(1);
            cluster.restart(killed)?;
        }
    }
    println!(
        "failover, raw connection (change in flight at the kill): {}",
        summary(&raw)
    );
    println!(
        "failover, client_program (idle at the kill, command sent right after): {}",
        summary(&cli)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------

fn main() {
    let cfg = Config::from_env();
    let mut failed = false;
    if cfg.wants("writes") {
        println!(
            "replicated writes: {} connections ({}), {} change(s) in flight each, {:?} measured after {:?}",
            cfg.conns,
            if cfg.spread {
                "spread over the trackers"
            } else {
                "all on the primary"
            },
            cfg.window,
            cfg.secs,
            cfg.warmup
        );
        for &k in &cfg.sizes {
            match bench_writes(&cfg, k) {
                Ok(r) => {
                    let cpu: Vec<String> = r
                        .cpu
                        .iter()
                        .enumerate()
                        .map(|(i, c)| match c {
                            Some(c) => format!("t{} {:.0}%", i + 1, c * 100.0),
                            None => format!("t{} ?", i + 1),
                        })
                        .chain(std::iter::once(match r.generator_cpu {
                            Some(c) => format!("generator {:.0}%", c * 100.0),
                            None => "generator ?".to_owned(),
                        }))
                        .collect();
                    // Every tracker writes every change: per tracker, fsyncs and the changes
                    // each one covers.
                    let fsyncs = match r.counts {
                        Some(c) if c.fsyncs > 0 => {
                            let per_tracker = c.fsyncs as f64 / k as f64;
                            // Per change, all the trackers together: the cost of one change
                            // to the service.
                            let per = |n: u64| n as f64 / r.changes.max(1) as f64;
                            format!(
                                "{:.0} fsyncs/s per tracker, {:.1} changes per fsync; per \
                                 change, all trackers: {:.2} recvfrom, {:.2} sendto, {:.3} \
                                 epoll_wait, {:.2} us CPU",
                                per_tracker / r.elapsed.as_secs_f64(),
                                r.changes as f64 / per_tracker,
                                per(c.recvs),
                                per(c.sends),
                                per(c.epoll_waits),
                                c.cpu_ms * 1e3 / r.changes.max(1) as f64
                            )
                        }
                        _ => "fsyncs not counted (needs perf, as root)".to_owned(),
                    };
                    println!(
                        "  {k} tracker(s): {:.0} changes/s; latency p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms; CPU {}; {fsyncs}",
                        r.changes as f64 / r.elapsed.as_secs_f64(),
                        r.lat.quantile_ms(0.50),
                        r.lat.quantile_ms(0.99),
                        r.max_ms,
                        cpu.join(", ")
                    );
                }
                Err(e) => {
                    eprintln!("  {k} tracker(s): failed: {e}");
                    failed = true;
                }
            }
        }
    }
    if cfg.wants("failover") {
        println!(
            "failover: 3 trackers, primary killed with SIGKILL, {} round(s) per client kind",
            cfg.failovers
        );
        if let Err(e) = bench_failover(&cfg) {
            eprintln!("failover: failed: {e}");
            failed = true;
        }
    }
    if failed {
        std::process::exit(1);
    }
}
