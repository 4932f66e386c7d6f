//! What the benchmarks share (each declares `mod common;`), so that none carries its own copy:
//! knobs from the environment, free ports, a program run with its stdout lines on a channel
//! (killed on drop), a process's CPU time and memory from `/proc`, test files of
//! pseudo-random bytes and their comparison, and a blocking client of the tracker link
//! ([`SyncClient`]) for set-up and probes.
//!
//! The tests' helpers (`tests/common`) start programs for assertions and panic on any
//! surprise; these return errors where a benchmark reports them, and never touch the real
//! home directory (every program gets `XDG_STATE_HOME` in the benchmark's directory).

#![allow(dead_code)]

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream as StdStream};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use p2pshare::wire::frame::{FrameBuffer, MAX_CLIENT_TRACKER_FRAME};
use p2pshare::wire::tracker_link::{ClientMsg, Reply, ReplyBody, Request, RequestBody, TrackerMsg};

/// Clock ticks per second of `/proc/<pid>/stat` (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
pub const CLOCK_TICKS: f64 = 100.0;

/// The value of environment variable `name`, or `default` when it is unset or unreadable.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A non-negative number from environment variable `name`, or `default` (with a word on
/// stderr from `bench` when the value is not one).
pub fn env_num(bench: &str, name: &str, default: f64) -> f64 {
    match std::env::var(name) {
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(n) if n >= 0.0 && n.is_finite() => n,
            _ => {
                eprintln!("{bench}: ignoring {name}={v:?} (not a number)");
                default
            }
        },
        Err(_) => default,
    }
}

/// Ends a program that reads commands: `quit` on its stdin (or, with `None`, nothing more:
/// end of input ends it), then a kill if it has not exited within 2 s.
pub fn quit_or_kill(child: &mut Child, stdin: Option<ChildStdin>, quit: bool) {
    if let (Some(mut stdin), true) = (stdin, quit) {
        let _ = stdin.write_all(b"quit\n");
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A running program whose stdout lines arrive on a channel; killed on drop.
pub struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// How long `expect` waits for a line.
    step: Duration,
}

impl Proc {
    /// Starts `bin` with `args` in `dir`, its state (keys, data, client state) in `dir` too,
    /// never in the real home directory.
    pub fn start(bin: &str, args: &[&str], dir: &Path, step: Duration) -> Proc {
        let mut command = Command::new(bin);
        command
            .args(args)
            .env("XDG_STATE_HOME", dir)
            .current_dir(dir);
        Proc::spawn(command, step)
    }

    /// Starts `command` (whose environment and directory the caller set) with its stdin and
    /// stdout piped.
    pub fn spawn(mut command: Command, step: Duration) -> Proc {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start a program");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Proc {
            stdin: child.stdin.take(),
            child,
            lines: rx,
            step,
        }
    }

    /// Writes one line to the program's stdin.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write a command");
        stdin.flush().expect("flush");
    }

    /// The next stdout line, within `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> Result<String, mpsc::RecvTimeoutError> {
        self.lines.recv_timeout(timeout)
    }

    /// Waits for a stdout line containing `needle`; returns it, or `None` after the step
    /// timeout.
    pub fn wait_for(&mut self, needle: &str) -> Option<String> {
        let deadline = Instant::now() + self.step;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Some(line),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// Waits for a stdout line containing `needle`; returns it.
    pub fn expect(&mut self, needle: &str) -> String {
        match self.wait_for(needle) {
            Some(line) => line,
            None => panic!("no line containing {needle:?} within {:?}", self.step),
        }
    }

    /// Closes stdin and gives the program a few seconds to exit on its own (a profiler
    /// wrapping it then writes its data) before it is killed.
    pub fn finish(mut self) {
        self.stdin = None;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// User + system CPU seconds of process `pid` so far (`utime` and `stime` of its stat).
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces; fields after it start
    // at field 3 (state), so utime (14) and stime (15) are the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / CLOCK_TICKS)
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `RssAnon`, ...).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Writes `mib` MiB of pseudo-random bytes (xorshift from `seed`, fast enough not to matter).
pub fn make_file(path: &Path, mib: u64, seed: u64) {
    let mut f = io::BufWriter::with_capacity(1 << 20, File::create(path).expect("create"));
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ seed;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for chunk in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf).expect("write");
    }
    f.flush().expect("flush");
}

/// Whether two files hold the same bytes.
pub fn same_contents(a: &Path, b: &Path) -> bool {
    let (Ok(fa), Ok(fb)) = (File::open(a), File::open(b)) else {
        return false;
    };
    let (mut ra, mut rb) = (
        BufReader::with_capacity(1 << 20, fa),
        BufReader::with_capacity(1 << 20, fb),
    );
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = ra.read(&mut ba).unwrap_or(0);
        if na == 0 {
            return rb.read(&mut bb).unwrap_or(1) == 0;
        }
        if rb.read_exact(&mut bb[..na]).is_err() || ba[..na] != bb[..na] {
            return false;
        }
    }
}

/// Wraps an IO error with what was being done.
pub fn io_err(what: &str) -> impl Fn(io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// A blocking client-tracker connection speaking the wire protocol itself: for set-up
/// (users, logins, groups), probes and failover rounds. Every wait is bounded by a deadline.
pub struct SyncClient {
    stream: StdStream,
    rbuf: FrameBuffer,
    next_id: u64,
}

impl SyncClient {
    /// Connects, says hello (as its own client process: the local port tells connections
    /// apart) and waits for the welcome, each step within `timeout`.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<SyncClient, String> {
        let c = SyncClient::open(addr, None, timeout)?;
        c.welcome(timeout)
    }

    /// As [`connect`](Self::connect), as client process `id`.
    pub fn connect_as(addr: SocketAddr, id: u64, timeout: Duration) -> Result<SyncClient, String> {
        let c = SyncClient::open(addr, Some(id), timeout)?;
        c.welcome(timeout)
    }

    /// Connects and sends the hello (as client `id`, or as its local port), without waiting
    /// for the welcome.
    pub fn open(
        addr: SocketAddr,
        id: Option<u64>,
        timeout: Duration,
    ) -> Result<SyncClient, String> {
        let stream = StdStream::connect_timeout(&addr, timeout).map_err(io_err("connect"))?;
        stream.set_nodelay(true).map_err(io_err("set_nodelay"))?;
        // Reads wake at least every 100 ms, so `recv` keeps to deadlines shorter than
        // `timeout`.
        stream
            .set_read_timeout(Some(
                timeout.clamp(Duration::from_millis(1), Duration::from_millis(100)),
            ))
            .map_err(io_err("set_read_timeout"))?;
        stream
            .set_write_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(io_err("set_write_timeout"))?;
        let id = id.unwrap_or_else(|| u64::from(stream.local_addr().map_or(0, |a| a.port())));
        let mut c = SyncClient {
            stream,
            rbuf: FrameBuffer::new(MAX_CLIENT_TRACKER_FRAME),
            next_id: 1,
        };
        let mut out = Vec::new();
        ClientMsg::hello(id).emit(&mut out);
        c.stream.write_all(&out).map_err(io_err("send hello"))?;
        Ok(c)
    }

    fn welcome(mut self, timeout: Duration) -> Result<SyncClient, String> {
        match self.recv(Instant::now() + timeout)? {
            TrackerMsg::Welcome { .. } => Ok(self),
            other => Err(format!("expected a welcome, got {other:?}")),
        }
    }

    /// The next message from the tracker, by `deadline`.
    pub fn recv(&mut self, deadline: Instant) -> Result<TrackerMsg, String> {
        loop {
            if let Some(payload) = self
                .rbuf
                .next_frame()
                .map_err(|e| format!("bad frame: {e}"))?
            {
                return TrackerMsg::parse(payload).map_err(|e| format!("bad message: {e}"));
            }
            if Instant::now() >= deadline {
                return Err("timed out waiting for the tracker".into());
            }
            match self.stream.read(self.rbuf.spare()) {
                Ok(0) => return Err("connection closed by the tracker".into()),
                Ok(n) => self.rbuf.commit(n),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// Sends `bodies` pipelined; returns the first request id.
    pub fn send(&mut self, bodies: &[RequestBody]) -> Result<u64, String> {
        let first = self.next_id;
        let mut out = Vec::new();
        for body in bodies {
            Request {
                req_id: self.next_id,
                body: body.clone(),
            }
            .emit(&mut out);
            self.next_id += 1;
        }
        self.stream.write_all(&out).map_err(io_err("send"))?;
        Ok(first)
    }

    /// Sends one request with the next id; returns the id.
    pub fn send_one(&mut self, body: RequestBody) -> Result<u64, String> {
        let id = self.next_id;
        self.next_id += 1;
        self.send_with_id(id, body)?;
        Ok(id)
    }

    /// Sends a request under an id of the caller's (a retry after failover keeps its id).
    pub fn send_with_id(&mut self, req_id: u64, body: RequestBody) -> Result<(), String> {
        let mut out = Vec::new();
        Request { req_id, body }.emit(&mut out);
        self.stream.write_all(&out).map_err(io_err("send"))
    }

    /// The next message, which must be the reply to request `want`.
    pub fn reply(&mut self, want: u64, deadline: Instant) -> Result<ReplyBody, String> {
        match self.recv(deadline)? {
            TrackerMsg::Reply(Reply { req_id, body }) if req_id == want => Ok(body),
            other => Err(format!("expected the reply to {want}, got {other:?}")),
        }
    }

    /// Receives the `n` replies to requests sent from `first` on, in order.
    pub fn replies(
        &mut self,
        first: u64,
        n: usize,
        deadline: Instant,
    ) -> Result<Vec<ReplyBody>, String> {
        (first..first + n as u64)
            .map(|want| self.reply(want, deadline))
            .collect()
    }

    /// Sends one request and waits `timeout` for its reply.
    pub fn call(&mut self, body: RequestBody, timeout: Duration) -> Result<ReplyBody, String> {
        let id = self.send_one(body)?;
        self.reply(id, Instant::now() + timeout)
    }

    /// Sends `bodies` pipelined and waits `timeout` for all their replies.
    pub fn call_all(
        &mut self,
        bodies: &[RequestBody],
        timeout: Duration,
    ) -> Result<Vec<ReplyBody>, String> {
        let first = self.send(bodies)?;
        self.replies(first, bodies.len(), Instant::now() + timeout)
    }

    /// The id the next request gets.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// The next request gets id `id` (a client numbering on after another connection's).
    pub fn set_next_id(&mut self, id: u64) {
        self.next_id = id;
    }

    /// Hands the connection to a reactor: the non-blocking stream, what was read past the
    /// last message, and the next request id.
    pub fn into_mio(self) -> Result<(mio::net::TcpStream, FrameBuffer, u64), String> {
        self.stream
            .set_nonblocking(true)
            .map_err(io_err("set_nonblocking"))?;
        Ok((
            mio::net::TcpStream::from_std(self.stream),
            self.rbuf,
            self.next_id,
        ))
    }
}
