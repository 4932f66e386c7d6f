//! Harness for the end-to-end tests: trackers and clients as real processes.
//!
//! Every process is owned by a [`ProcGuard`], which kills and reaps it when dropped, so a
//! panicking test leaves nothing running. Nothing here sleeps to wait for readiness: a tracker
//! is ready when it prints its `listening` line, a batch client is done when it exits, and a
//! live client is in sync when the expected output lines have arrived.

#![allow(dead_code)]

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub const TRACKER_BIN: &str = env!("CARGO_BIN_EXE_tracker_program");
pub const CLIENT_BIN: &str = env!("CARGO_BIN_EXE_client_program");

/// How long a tracker may take to print its `listening` line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one batch client may run.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a live client may take to answer one command.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process may take to exit once told to.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

const ATTEMPTS: usize = 5;

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct loopback ports that were free a moment ago (all held at once while chosen).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local_addr").port())
        .collect()
}

pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Owns a child process: kills and reaps it on drop, whatever happened.
pub struct ProcGuard {
    child: Child,
    status: Option<ExitStatus>,
}

impl ProcGuard {
    pub fn new(child: Child) -> Self {
        ProcGuard {
            child,
            status: None,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has ended.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for ProcGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends a signal (`TERM`, `INT`...) to a process (no libc: the `kill` command).
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed: {status}");
}

pub fn send_sigterm(pid: u32) {
    send_signal(pid, "TERM");
}

fn read_all(file: &mut File) -> String {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).expect("seek");
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).expect("read output");
    text.push_str(&String::from_utf8_lossy(&bytes));
    text
}

fn lines_of(text: &str) -> Vec<String> {
    text.lines().map(str::to_owned).collect()
}

/// A running tracker (tracker 1 of a one-line tracker file in its own temp dir).
pub struct Tracker {
    proc: ProcGuard,
    stdin: Option<ChildStdin>,
    pub addr: SocketAddr,
    /// The tracker info file clients use.
    pub info: PathBuf,
    stderr_path: PathBuf,
    pub dir: TempDir,
}

/// The `XDG_STATE_HOME` a test's processes get: the temporary directory holding their tracker
/// file, so trackers' data and keys and clients' state never touch the real home directory, and
/// every process of one test (one tracker file) shares it.
pub fn state_home(info: &Path) -> &Path {
    info.parent()
        .expect("tracker file in a temporary directory")
}

impl Tracker {
    pub fn start() -> Tracker {
        Self::start_with(&[])
    }

    /// Starts a tracker with extra options before the positional arguments. If it exits before
    /// it is ready (its port was taken meanwhile), it is retried on another port.
    pub fn start_with(options: &[OsString]) -> Tracker {
        // The raw harnesses here (RawTracker, probe_welcome, the hostile and CLI tests)
        // speak plain client frames, which a tracker refuses unless told otherwise.
        let mut all = vec![OsString::from("--accept-plain-clients")];
        all.extend_from_slice(options);
        Tracker::start_exactly(&all)
    }

    /// Starts a tracker with exactly `options` (plain client links refused unless they
    /// include `--accept-plain-clients`).
    pub fn start_exactly(options: &[OsString]) -> Tracker {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut failures = Vec::new();
        for attempt in 0..ATTEMPTS {
            let addr = free_addr();
            let info = dir.path().join("tracker_info.txt");
            std::fs::write(&info, format!("# test tracker\n{addr}\n")).expect("write info");
            let stderr_path = dir.path().join(format!("tracker-stderr-{attempt}.log"));
            let stderr = File::create(&stderr_path).expect("create stderr file");
            let mut child = Command::new(TRACKER_BIN)
                .env("XDG_STATE_HOME", state_home(&info))
                .args(options)
                .arg(&info)
                .arg("1")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::from(stderr))
                .spawn()
                .expect("spawn tracker_program");
            let stdin = child.stdin.take();
            let stdout = child.stdout.take().expect("tracker stdout");
            let mut proc = ProcGuard::new(child);
            let (tx, rx) = mpsc::channel();
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { return };
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(line) if line.starts_with("tracker 1 listening on") => {
                        assert_eq!(line, format!("tracker 1 listening on {addr}"));
                        return Tracker {
                            proc,
                            stdin,
                            addr,
                            info,
                            stderr_path,
                            dir,
                        };
                    }
                    Ok(other) => failures.push(format!("unexpected stdout line: {other}")),
                    Err(RecvTimeoutError::Disconnected) => {
                        // Stdout closed: the tracker exited (typically: port taken).
                        let status = proc.wait_timeout(EXIT_TIMEOUT);
                        let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                        failures.push(format!("attempt {attempt} on {addr}: {status:?}: {err}"));
                        break;
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                        panic!(
                            "tracker on {addr} not ready within {READY_TIMEOUT:?}; stderr:\n{err}"
                        );
                    }
                }
            }
        }
        panic!("tracker did not start: {failures:#?}");
    }

    pub fn pid(&self) -> u32 {
        self.proc.id()
    }

    /// Writes a line on the tracker's standard input.
    pub fn write_stdin(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("tracker stdin already closed");
        writeln!(stdin, "{line}").expect("write tracker stdin");
        stdin.flush().expect("flush tracker stdin");
    }

    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Sends `quit` and waits for the exit status.
    pub fn quit(&mut self) -> ExitStatus {
        self.write_stdin("quit");
        self.wait_exit()
    }

    /// Sends a signal (`TERM`, `INT`) and waits for the exit status.
    pub fn signal(&mut self, signal: &str) -> ExitStatus {
        send_signal(self.pid(), signal);
        self.wait_exit()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM")
    }

    pub fn wait_exit(&mut self) -> ExitStatus {
        match self.proc.wait_timeout(EXIT_TIMEOUT) {
            Some(status) => status,
            None => panic!("tracker did not exit within {EXIT_TIMEOUT:?}"),
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.try_status().is_none()
    }

    /// What the tracker wrote on stderr (its log, by default).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// A new client with a fresh listen address, for this tracker.
    pub fn client(&self) -> Client {
        Client::new(&self.info)
    }

    /// Runs one batch on a fresh client.
    pub fn run(&self, commands: &[&str]) -> Outcome {
        self.client().run(commands)
    }
}

/// What a finished client printed, and how it exited.
#[derive(Debug)]
pub struct Outcome {
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
    /// The `error: ` lines of stderr.
    pub errors: Vec<String>,
    pub status: ExitStatus,
}

impl Outcome {
    fn new(stdout: &str, stderr: &str, status: ExitStatus) -> Outcome {
        let stderr = lines_of(stderr);
        let errors = stderr
            .iter()
            .filter(|l| l.starts_with("error: "))
            .cloned()
            .collect();
        Outcome {
            stdout: lines_of(stdout),
            stderr,
            errors,
            status,
        }
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The client could not bind its listen address.
    pub fn addr_in_use(&self) -> bool {
        self.code() == Some(2)
            && self
                .stderr
                .iter()
                .any(|l| l.contains("cannot run on") && l.to_lowercase().contains("in use"))
    }

    /// Asserts the exact stdout lines, the number of `error: ` lines and the exit code.
    #[track_caller]
    pub fn check(&self, stdout: &[&str], n_errors: usize, code: i32) {
        let dump = format!(
            "\n--- stdout:\n{}\n--- stderr:\n{}\n--- status: {}",
            self.stdout.join("\n"),
            self.stderr.join("\n"),
            self.status
        );
        assert_eq!(self.stdout, stdout, "stdout differs{dump}");
        assert_eq!(self.errors.len(), n_errors, "wrong number of errors{dump}");
        assert_eq!(self.code(), Some(code), "wrong exit code{dump}");
    }
}

/// Commands joined into a batch, one per line.
pub fn batch_bytes(commands: &[&str]) -> Vec<u8> {
    let mut input = Vec::new();
    for c in commands {
        input.extend_from_slice(c.as_bytes());
        input.push(b'\n');
    }
    input
}

/// A client identity: a listen address (kept across runs, so that the same user logging in
/// again is "on the same client"), a tracker file and a working directory.
pub struct Client {
    pub addr: SocketAddr,
    info: PathBuf,
    cwd: Option<PathBuf>,
    options: Vec<OsString>,
    /// The address has been used: a retry must keep it.
    addr_fixed: bool,
    /// Speak the plain peer protocol (tests that play a plain peer; see
    /// [`plain_peer_links`](Self::plain_peer_links)).
    plain_peers: bool,
}

/// A batch client that has been started.
pub struct Running {
    proc: ProcGuard,
    stdout: File,
    stderr: File,
}

impl Running {
    /// Waits for the client to exit (at most until `deadline`) and collects its output.
    pub fn finish(mut self, deadline: Instant) -> Outcome {
        let left = deadline.saturating_duration_since(Instant::now());
        let status = self.proc.wait_timeout(left);
        let stdout = read_all(&mut self.stdout);
        let stderr = read_all(&mut self.stderr);
        match status {
            Some(status) => Outcome::new(&stdout, &stderr, status),
            None => {
                self.proc.kill();
                panic!("client timed out\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}");
            }
        }
    }
}

impl Client {
    pub fn new(info: &Path) -> Client {
        Client {
            addr: free_addr(),
            info: info.to_path_buf(),
            cwd: None,
            options: Vec::new(),
            addr_fixed: false,
            plain_peers: false,
        }
    }

    pub fn with_addr(info: &Path, addr: SocketAddr) -> Client {
        Client {
            addr,
            info: info.to_path_buf(),
            cwd: None,
            options: Vec::new(),
            addr_fixed: false,
            plain_peers: false,
        }
    }

    /// Runs the client in `dir`.
    pub fn cwd(mut self, dir: &Path) -> Client {
        self.cwd = Some(dir.to_path_buf());
        self
    }

    /// The client speaks the plain (unencrypted) peer protocol, through the benchmark and
    /// test switch (`P2PSHARE_BENCH_PLAINTEXT_PEER_LINKS=1`): for tests that play a peer in
    /// the plain protocol to probe the serving core. Only plain clients link with it.
    pub fn plain_peer_links(mut self) -> Client {
        self.plain_peers = true;
        self
    }

    fn plain_env(&self) -> (&'static str, &'static str) {
        (
            "P2PSHARE_BENCH_PLAINTEXT_PEER_LINKS",
            if self.plain_peers { "1" } else { "0" },
        )
    }

    /// Extra options before the positional arguments.
    pub fn options(mut self, options: &[OsString]) -> Client {
        self.options = options.to_vec();
        self
    }

    /// Starts the client with `commands` (one per line) on stdin; stdout and stderr go to
    /// anonymous temp files, so nothing needs draining while it runs.
    pub fn spawn(&self, commands: &[&str]) -> Running {
        self.spawn_raw(&batch_bytes(commands))
    }

    /// Starts the client with exactly these bytes on stdin.
    pub fn spawn_raw(&self, stdin_bytes: &[u8]) -> Running {
        let mut input = tempfile::tempfile().expect("tempfile");
        input.write_all(stdin_bytes).expect("write commands");
        input.seek(SeekFrom::Start(0)).expect("seek");
        let stdout = tempfile::tempfile().expect("tempfile");
        let stderr = tempfile::tempfile().expect("tempfile");
        let mut cmd = Command::new(CLIENT_BIN);
        let (plain_key, plain_value) = self.plain_env();
        cmd.env("XDG_STATE_HOME", state_home(&self.info))
            .env(plain_key, plain_value)
            .args(&self.options)
            .arg(self.addr.to_string())
            .arg(&self.info)
            .stdin(Stdio::from(input))
            .stdout(Stdio::from(stdout.try_clone().expect("clone")))
            .stderr(Stdio::from(stderr.try_clone().expect("clone")));
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        let child = cmd.spawn().expect("spawn client_program");
        Running {
            proc: ProcGuard::new(child),
            stdout,
            stderr,
        }
    }

    /// Runs a batch of commands and waits (up to [`CLIENT_TIMEOUT`]) for the client to exit.
    /// If the listen address turns out to be taken, a fresh client retries on a new address
    /// and a client whose address is part of the test retries on the same one.
    pub fn run(&mut self, commands: &[&str]) -> Outcome {
        self.run_raw(&batch_bytes(commands))
    }

    /// Like [`run`](Self::run), with exactly these bytes on stdin.
    pub fn run_raw(&mut self, stdin_bytes: &[u8]) -> Outcome {
        let mut attempt = 0;
        loop {
            let outcome = self
                .spawn_raw(stdin_bytes)
                .finish(Instant::now() + CLIENT_TIMEOUT);
            attempt += 1;
            if !outcome.addr_in_use() || attempt >= ATTEMPTS {
                self.addr_fixed = true;
                return outcome;
            }
            if self.addr_fixed {
                thread::sleep(Duration::from_millis(200 * attempt as u64));
            } else {
                self.addr = free_addr();
            }
        }
    }

    /// Starts this client with a pipe on stdin, to drive it command by command.
    pub fn live(&mut self) -> LiveClient {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match LiveClient::start(self) {
                Ok(live) => {
                    self.addr_fixed = true;
                    return live;
                }
                Err(why) if attempt < ATTEMPTS => {
                    if self.addr_fixed {
                        thread::sleep(Duration::from_millis(200 * attempt as u64));
                    } else {
                        self.addr = free_addr();
                    }
                    let _ = why;
                }
                Err(why) => panic!("live client could not start: {why}"),
            }
        }
    }
}

#[derive(Debug)]
enum Line {
    Out(String),
    Err(String),
}

/// A client kept running, fed one command at a time; the test reads its output as it comes.
pub struct LiveClient {
    proc: ProcGuard,
    stdin: Option<ChildStdin>,
    lines: Receiver<Line>,
    pub addr: SocketAddr,
    /// Every line seen, for failure messages.
    seen: Vec<String>,
    /// Lines of `seen` that `wait_log` returned already.
    logs_taken: Vec<usize>,
}

impl LiveClient {
    /// Starts the client and waits until it listens on its address (a connection to it
    /// succeeds while the process is alive). `Err` if it exited because the address was taken.
    fn start(client: &Client) -> Result<LiveClient, String> {
        let mut cmd = Command::new(CLIENT_BIN);
        let (plain_key, plain_value) = client.plain_env();
        cmd.env("XDG_STATE_HOME", state_home(&client.info))
            .env(plain_key, plain_value)
            .args(&client.options)
            .arg(client.addr.to_string())
            .arg(&client.info)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = &client.cwd {
            cmd.current_dir(dir);
        }
        let mut child = cmd.spawn().expect("spawn client_program");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let mut proc = ProcGuard::new(child);
        let (tx, rx) = mpsc::channel();
        let tx2 = tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(Line::Out(line)).is_err() {
                    return;
                }
            }
        });
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if tx2.send(Line::Err(line)).is_err() {
                    return;
                }
            }
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = proc.try_status() {
                let mut text = String::new();
                while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
                    text.push_str(&format!("{line:?}\n"));
                }
                return Err(format!(
                    "client on {} exited: {status}\n{text}",
                    client.addr
                ));
            }
            if TcpStream::connect_timeout(&client.addr, Duration::from_secs(1)).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                panic!("live client on {} never listened", client.addr);
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(LiveClient {
            proc,
            stdin,
            lines: rx,
            addr: client.addr,
            seen: Vec::new(),
            logs_taken: Vec::new(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.proc.id()
    }

    /// The exit status if the process has ended.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.proc.try_status()
    }

    /// Ends the client's input (the pipe closes).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    pub fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("stdin already closed");
        writeln!(stdin, "{command}").expect("write client stdin");
        stdin.flush().expect("flush client stdin");
    }

    /// The next stdout or `error: ` line (log lines on stderr are skipped).
    fn next_line(&mut self) -> Line {
        self.next_line_within(LINE_TIMEOUT)
    }

    /// The next stdout or `error: ` line within `timeout` (log lines on stderr are skipped).
    fn next_line_within(&mut self, timeout: Duration) -> Line {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(Line::Err(l)) if !l.starts_with("error: ") => self.seen.push(l),
                Ok(line) => {
                    self.seen.push(format!("{line:?}"));
                    return line;
                }
                Err(e) => panic!(
                    "live client on {}: no line ({e:?}); seen so far:\n{}",
                    self.addr,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for exactly these stdout lines (an `error: ` line meanwhile is a failure).
    #[track_caller]
    pub fn expect_out(&mut self, expected: &[&str]) {
        for want in expected {
            match self.next_line() {
                Line::Out(got) => assert_eq!(
                    &got,
                    want,
                    "live client on {}; seen:\n{}",
                    self.addr,
                    self.seen.join("\n")
                ),
                Line::Err(e) => panic!(
                    "live client on {}: expected '{want}', got {e}; seen:\n{}",
                    self.addr,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for one `error: ` line (a stdout line meanwhile is a failure); returns it.
    #[track_caller]
    pub fn expect_error(&mut self) -> String {
        match self.next_line() {
            Line::Err(e) => e,
            Line::Out(o) => panic!(
                "live client on {}: expected an error, got '{o}'; seen:\n{}",
                self.addr,
                self.seen.join("\n")
            ),
        }
    }

    /// The next stdout line, whatever it is (an `error: ` line meanwhile is a failure).
    #[track_caller]
    pub fn next_out(&mut self) -> String {
        match self.next_line() {
            Line::Out(o) => o,
            Line::Err(e) => panic!(
                "live client on {}: expected output, got {e}; seen:\n{}",
                self.addr,
                self.seen.join("\n")
            ),
        }
    }

    /// The next stdout line within `timeout` (an `error: ` line meanwhile is a failure).
    #[track_caller]
    pub fn next_out_within(&mut self, timeout: Duration) -> String {
        match self.next_line_within(timeout) {
            Line::Out(o) => o,
            Line::Err(e) => panic!(
                "live client on {}: expected output, got {e}; seen:\n{}",
                self.addr,
                self.seen.join("\n")
            ),
        }
    }

    /// The next line within `timeout`, stdout or `error: `: `Ok(stdout line)` or
    /// `Err(error line)`.
    pub fn next_any_within(&mut self, timeout: Duration) -> Result<String, String> {
        match self.next_line_within(timeout) {
            Line::Out(o) => Ok(o),
            Line::Err(e) => Err(e),
        }
    }

    /// Waits (up to `timeout`) for a log line on stderr containing `needle` that no earlier
    /// `wait_log` returned (it may have been seen already, while waiting for other lines, in
    /// any order); returns it. A stdout or `error: ` line meanwhile is a failure.
    #[track_caller]
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> String {
        let unused = |i: &usize| !self.logs_taken.contains(i);
        if let Some(i) = (0..self.seen.len())
            .filter(unused)
            .find(|&i| self.seen[i].contains(needle))
        {
            self.logs_taken.push(i);
            return self.seen[i].clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(Line::Err(l)) if !l.starts_with("error: ") => {
                    let found = l.contains(needle);
                    self.seen.push(l.clone());
                    if found {
                        self.logs_taken.push(self.seen.len() - 1);
                        return l;
                    }
                }
                Ok(line) => panic!(
                    "live client on {}: {line:?} while waiting for a log line with '{needle}'; \
                     seen:\n{}",
                    self.addr,
                    self.seen.join("\n")
                ),
                Err(e) => panic!(
                    "live client on {}: no log line with '{needle}' ({e:?}); seen:\n{}",
                    self.addr,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Every line seen so far (stdout, `error: ` and log lines), for failure messages.
    pub fn seen(&self) -> String {
        self.seen.join("\n")
    }

    /// The next `n` stdout lines.
    #[track_caller]
    pub fn next_outs(&mut self, n: usize) -> Vec<String> {
        (0..n).map(|_| self.next_out()).collect()
    }

    /// Sends a command and waits for exactly these stdout lines.
    #[track_caller]
    pub fn cmd(&mut self, command: &str, expected: &[&str]) {
        self.send(command);
        self.expect_out(expected);
    }

    /// Closes stdin, waits for the exit, and returns the exit status plus any lines not yet
    /// consumed (stdout lines and `error: ` lines).
    pub fn finish(mut self) -> (ExitStatus, Vec<String>) {
        self.stdin = None;
        self.wait()
    }

    /// Waits for the exit (without closing stdin) and returns the exit status plus any lines
    /// not yet consumed (stdout lines and `error: ` lines).
    pub fn wait(mut self) -> (ExitStatus, Vec<String>) {
        let status = self
            .proc
            .wait_timeout(EXIT_TIMEOUT)
            .unwrap_or_else(|| panic!("live client on {} did not exit", self.addr));
        let mut rest = Vec::new();
        // The reader threads end at EOF, which closes the channel.
        while let Ok(line) = self.lines.recv_timeout(EXIT_TIMEOUT) {
            match line {
                Line::Out(l) => rest.push(l),
                Line::Err(l) if l.starts_with("error: ") => rest.push(l),
                Line::Err(_) => {}
            }
        }
        (status, rest)
    }
}

/// Runs a program to completion with stdin closed, killing it after [`CLIENT_TIMEOUT`];
/// returns (exit code, stdout, stderr).
pub fn run_program(bin: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut stdout = tempfile::tempfile().expect("tempfile");
    let mut stderr = tempfile::tempfile().expect("tempfile");
    // A private state home, so a run that gets far enough to create state leaves none behind.
    let home = tempfile::tempdir().expect("tempdir");
    let child = Command::new(bin)
        .env("XDG_STATE_HOME", home.path())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout.try_clone().expect("clone")))
        .stderr(Stdio::from(stderr.try_clone().expect("clone")))
        .spawn()
        .expect("spawn");
    let mut proc = ProcGuard::new(child);
    let status = proc.wait_timeout(CLIENT_TIMEOUT);
    let (out, err) = (read_all(&mut stdout), read_all(&mut stderr));
    match status {
        Some(status) => (status.code(), out, err),
        None => panic!("{bin} {args:?} did not exit\n{out}\n{err}"),
    }
}

/// The SHA1 of a file in hex, from the `sha1sum` command (None if it is not installed).
pub fn sha1sum(path: &Path) -> Option<String> {
    let out = Command::new("sha1sum").arg(path).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    text.split_whitespace().next().map(str::to_owned)
}

// ---------------------------------------------------------------------------------------------
// Several trackers of one tracker file, run as one service.

/// How long a tracker may take to serve (to hold a state caught up with the others) once it
/// listens.
pub const SERVE_TIMEOUT: Duration = Duration::from_secs(30);

/// One running tracker of a [`Cluster`].
struct ClusterTracker {
    proc: ProcGuard,
    /// Kept open: a tracker runs on after end of input anyway, and an open pipe is how a
    /// tracker started from a terminal sees its input.
    _stdin: Option<ChildStdin>,
}

/// The trackers of one tracker file (all on loopback). Tracker N is started with
/// [`start`](Self::start) or [`restart`](Self::restart), each start waiting until the tracker
/// serves (a client's hello is answered with a welcome, which a tracker sends only once it
/// holds the service's state); [`kill9`](Self::kill9) kills one with SIGKILL. Every tracker
/// still running is killed when the cluster is dropped; if that happens during a panic, the
/// trackers' logs are printed first.
pub struct Cluster {
    /// The address of tracker N is `addrs[N - 1]`.
    pub addrs: Vec<SocketAddr>,
    /// The tracker file listing every tracker (the trackers' own file).
    pub info: PathBuf,
    trackers: Vec<Option<ClusterTracker>>,
    /// Runs of each tracker so far (to name their log files).
    runs: Vec<usize>,
    pub dir: TempDir,
    /// Options every tracker is started with (before the positional arguments).
    options: Vec<OsString>,
}

impl Cluster {
    /// `n` trackers, started in order (tracker 1 is the primary).
    pub fn start(n: usize) -> Cluster {
        let all: Vec<usize> = (1..=n).collect();
        Self::start_some(n, &all)
    }

    /// [`start`](Self::start), every tracker with these options.
    pub fn start_with(n: usize, options: &[OsString]) -> Cluster {
        let all: Vec<usize> = (1..=n).collect();
        Self::start_some_with(n, &all, options)
    }

    /// A tracker file of `n` trackers of which only `which` are started, in that order, each
    /// once the one before serves. If a tracker cannot listen (its port was taken meanwhile),
    /// the whole cluster is tried again on other ports.
    pub fn start_some(n: usize, which: &[usize]) -> Cluster {
        Self::start_some_with(n, which, &[])
    }

    fn start_some_with(n: usize, which: &[usize], options: &[OsString]) -> Cluster {
        let mut failures = Vec::new();
        for _ in 0..ATTEMPTS {
            let dir = tempfile::tempdir().expect("tempdir");
            let addrs: Vec<SocketAddr> = free_ports(n)
                .into_iter()
                .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
                .collect();
            let info = dir.path().join("tracker_info.txt");
            let mut text = String::from("# test cluster\n");
            for a in &addrs {
                text.push_str(&format!("{a}\n"));
            }
            std::fs::write(&info, text).expect("write tracker file");
            let mut cluster = Cluster {
                addrs,
                info,
                trackers: (0..n).map(|_| None).collect(),
                runs: vec![0; n],
                dir,
                options: options.to_vec(),
            };
            match which.iter().try_for_each(|&no| cluster.try_start(no)) {
                Ok(()) => return cluster,
                Err(e) => failures.push(e),
            }
        }
        panic!("cluster did not start: {failures:#?}");
    }

    /// Starts tracker `no` (not running) and waits until it serves. `Err` if it exited before
    /// it listened (typically: its port is taken); panics if it listens but does not serve
    /// within [`SERVE_TIMEOUT`].
    fn try_start(&mut self, no: usize) -> Result<(), String> {
        self.try_start_with(no, true)
    }

    /// [`try_start`](Self::try_start), waiting until the tracker serves only if `serving`
    /// (else until it listens).
    fn try_start_with(&mut self, no: usize, serving: bool) -> Result<(), String> {
        assert!(self.trackers[no - 1].is_none(), "tracker {no} is running");
        self.runs[no - 1] += 1;
        let stderr_path = self.log_path(no, self.runs[no - 1]);
        let stderr = File::create(&stderr_path).expect("create stderr file");
        let mut child = Command::new(TRACKER_BIN)
            .env("XDG_STATE_HOME", state_home(&self.info))
            .args(&self.options)
            // Raw harnesses (probe_welcome) speak plain client frames.
            .arg("--accept-plain-clients")
            .arg(&self.info)
            .arg(no.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawn tracker_program");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("tracker stdout");
        let mut proc = ProcGuard::new(child);
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                // The receiver goes away after the ready line; keep draining.
                let _ = tx.send(line);
            }
        });
        let addr = self.addrs[no - 1];
        let want = format!("tracker {no} listening on {addr}");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line == want => break,
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let status = proc.wait_timeout(EXIT_TIMEOUT);
                    let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                    return Err(format!("tracker {no} on {addr}: {status:?}: {err}"));
                }
                Err(RecvTimeoutError::Timeout) => {
                    let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                    panic!("tracker {no} on {addr} not listening within {READY_TIMEOUT:?}:\n{err}");
                }
            }
        }
        if serving {
            let deadline = Instant::now() + SERVE_TIMEOUT;
            loop {
                if let Some(status) = proc.try_status() {
                    let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                    panic!("tracker {no} exited ({status}) before it served:\n{err}");
                }
                match probe_welcome(addr, deadline) {
                    Ok(()) => break,
                    Err(e) if Instant::now() >= deadline => {
                        let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                        panic!("tracker {no} did not serve within {SERVE_TIMEOUT:?} ({e}):\n{err}");
                    }
                    // Refused or closed: try again (a short pause, not a synchronisation).
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        self.trackers[no - 1] = Some(ClusterTracker {
            proc,
            _stdin: stdin,
        });
        Ok(())
    }

    fn log_path(&self, no: usize, run: usize) -> PathBuf {
        self.dir.path().join(format!("tracker-{no}-run-{run}.log"))
    }

    /// Starts tracker `no` again on its address (after [`kill9`](Self::kill9)) and waits until
    /// it serves, retrying while its port is still taken.
    pub fn restart(&mut self, no: usize) {
        self.restart_with(no, true);
    }

    /// Like [`restart`](Self::restart), but returns as soon as the tracker listens: clients
    /// may connect while it is still copying the state (they must not be answered before).
    pub fn restart_listening(&mut self, no: usize) {
        self.restart_with(no, false);
    }

    fn restart_with(&mut self, no: usize, serving: bool) {
        let mut failures = Vec::new();
        for attempt in 1..=ATTEMPTS {
            match self.try_start_with(no, serving) {
                Ok(()) => return,
                Err(e) => failures.push(e),
            }
            thread::sleep(Duration::from_millis(200 * attempt as u64));
        }
        panic!("tracker {no} did not restart: {failures:#?}");
    }

    pub fn is_running(&mut self, no: usize) -> bool {
        match self.trackers[no - 1].as_mut() {
            Some(t) => t.proc.try_status().is_none(),
            None => false,
        }
    }

    pub fn pid(&self, no: usize) -> u32 {
        self.trackers[no - 1]
            .as_ref()
            .unwrap_or_else(|| panic!("tracker {no} is not running"))
            .proc
            .id()
    }

    /// Kills tracker `no` with SIGKILL and reaps it.
    pub fn kill9(&mut self, no: usize) {
        let mut t = self.trackers[no - 1]
            .take()
            .unwrap_or_else(|| panic!("tracker {no} is not running"));
        t.proc.kill();
    }

    /// Kills tracker `no` and the processes `others` with one SIGKILL command (so that none of
    /// them outlives the others by more than a few microseconds), then reaps the tracker.
    pub fn kill9_with(&mut self, no: usize, others: &[u32]) {
        let mut cmd = Command::new("kill");
        cmd.arg("-KILL").arg(self.pid(no).to_string());
        for pid in others {
            cmd.arg(pid.to_string());
        }
        let status = cmd.status().expect("run kill");
        assert!(status.success(), "kill -KILL failed: {status}");
        self.kill9(no);
    }

    /// A tracker file listing these trackers, in this order (for clients).
    pub fn info_for(&self, nos: &[usize]) -> PathBuf {
        let name = nos
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join("-");
        let path = self.dir.path().join(format!("clients-{name}.txt"));
        let mut text = String::new();
        for no in nos {
            text.push_str(&format!("{}\n", self.addrs[no - 1]));
        }
        std::fs::write(&path, text).expect("write tracker file");
        path
    }

    /// Every run's log of every tracker, for failure messages.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        for (i, runs) in self.runs.iter().enumerate() {
            for run in 1..=*runs {
                let log = std::fs::read_to_string(self.log_path(i + 1, run)).unwrap_or_default();
                text.push_str(&format!("--- tracker {} run {run}:\n{log}", i + 1));
            }
        }
        text
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for t in self.trackers.iter_mut().flatten() {
            t.proc.kill();
        }
        if thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// Connects to a tracker as a client and waits (until `deadline`) for its welcome, which a
/// tracker sends only once it serves. The connection is closed again.
pub fn probe_welcome(addr: SocketAddr, deadline: Instant) -> Result<(), String> {
    use p2pshare::wire::frame::{FrameBuffer, MAX_CLIENT_TRACKER_FRAME};
    use p2pshare::wire::tracker_link::{ClientMsg, TrackerMsg};

    let left = deadline.saturating_duration_since(Instant::now());
    let mut stream = TcpStream::connect_timeout(&addr, left.max(Duration::from_millis(1)))
        .map_err(|e| format!("connect: {e}"))?;
    let mut hello = Vec::new();
    ClientMsg::hello(u64::from(std::process::id())).emit(&mut hello);
    stream
        .write_all(&hello)
        .map_err(|e| format!("send hello: {e}"))?;
    let mut buf = FrameBuffer::new(MAX_CLIENT_TRACKER_FRAME);
    loop {
        if let Some(payload) = buf.next_frame().map_err(|e| format!("bad frame: {e}"))? {
            return match TrackerMsg::parse(payload) {
                Ok(TrackerMsg::Welcome { .. }) => Ok(()),
                other => Err(format!("expected a welcome, got {other:?}")),
            };
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("no welcome".into());
        }
        stream
            .set_read_timeout(Some(left.min(Duration::from_millis(200))))
            .map_err(|e| format!("set_read_timeout: {e}"))?;
        match stream.read(buf.spare()) {
            Ok(0) => return Err("closed".into()),
            Ok(n) => buf.commit(n),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// Reads one frame's payload (type byte and body) from a blocking stream.
pub fn read_frame(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut payload)?;
    Ok(payload)
}

/// A raw, blocking client-tracker connection: a test speaks the protocol itself (to play a
/// client the tracker lists as a sharer, for example). Every call waits at most 30 s.
pub struct RawTracker {
    stream: TcpStream,
    next_id: u64,
}

impl RawTracker {
    pub fn connect(addr: SocketAddr) -> RawTracker {
        use p2pshare::wire::tracker_link::{ClientMsg, TrackerMsg};
        let mut stream = TcpStream::connect(addr).expect("connect to the tracker");
        stream.set_read_timeout(Some(LINE_TIMEOUT)).unwrap();
        let mut out = Vec::new();
        ClientMsg::hello(0x5ea1).emit(&mut out);
        stream.write_all(&out).unwrap();
        let welcome = TrackerMsg::parse(&read_frame(&mut stream).unwrap()).unwrap();
        assert!(matches!(welcome, TrackerMsg::Welcome { .. }), "{welcome:?}");
        RawTracker { stream, next_id: 0 }
    }

    pub fn call(
        &mut self,
        body: p2pshare::wire::tracker_link::RequestBody,
    ) -> p2pshare::wire::tracker_link::ReplyBody {
        use p2pshare::wire::tracker_link::{ClientMsg, Reply, Request, TrackerMsg};
        self.next_id += 1;
        let mut out = Vec::new();
        ClientMsg::Request(Request {
            req_id: self.next_id,
            body,
        })
        .emit(&mut out);
        self.stream.write_all(&out).unwrap();
        match TrackerMsg::parse(&read_frame(&mut self.stream).unwrap()).unwrap() {
            TrackerMsg::Reply(Reply { req_id, body }) if req_id == self.next_id => body,
            other => panic!("unexpected {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Secure peer links played by a test
// ---------------------------------------------------------------------------------------------

/// The identity key the tests' raw downloaders prove; raw tracker links log in with its public
/// half ([`raw_peer_public`]) so that the tickets they get name it.
pub const RAW_PEER_PRIVATE: [u8; 32] = [0x42; 32];

pub fn raw_peer_public() -> [u8; 32] {
    p2pshare::client::identity::public_of(&RAW_PEER_PRIVATE)
}

/// The identity key of the client listening at `addr` (from its state directory under the
/// test's `XDG_STATE_HOME`).
pub fn identity_public(info: &Path, addr: SocketAddr) -> [u8; 32] {
    let dir = state_home(info).join("p2pshare").join(format!(
        "client-{}-{}",
        addr.ip().to_string().replace(':', "_"),
        addr.port()
    ));
    p2pshare::client::identity::ClientIdentity::load(
        &dir.join(p2pshare::client::identity::IDENTITY_FILE),
    )
    .expect("the client's identity key")
    .public()
}

/// A downloader's side of a secure peer link, played by a test over a blocking socket.
pub struct SecurePeer {
    pub stream: TcpStream,
    sealer: Option<p2pshare::net::peer_secure::Sealer>,
    reader: p2pshare::net::peer_secure::SealedSharerStream,
    block: Vec<u8>,
}

impl SecurePeer {
    /// Sends the preamble and the handshake's first message, carrying `first` (whole frames:
    /// the ticket and the handshake), as `my_private` to the sharer holding `sharer_public`.
    /// Does not wait for the answer.
    pub fn begin(
        mut stream: TcpStream,
        my_private: &[u8; 32],
        sharer_public: &[u8; 32],
        first: &[u8],
    ) -> std::io::Result<SecurePeer> {
        let mut reader = p2pshare::net::peer_secure::SealedSharerStream::new();
        let mut out = Vec::new();
        reader
            .start(my_private, sharer_public, first, &mut out)
            .map_err(std::io::Error::other)?;
        stream.write_all(&out)?;
        Ok(SecurePeer {
            stream,
            sealer: None,
            reader,
            block: Vec::new(),
        })
    }

    /// Connects to `addr` as the tests' raw downloader ([`RAW_PEER_PRIVATE`]).
    pub fn connect(addr: SocketAddr, sharer_public: &[u8; 32], first: &[u8]) -> SecurePeer {
        let stream = TcpStream::connect(addr).expect("connect to the sharer");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        SecurePeer::begin(stream, &RAW_PEER_PRIVATE, sharer_public, first).expect("handshake")
    }

    /// The next frame from the sharer, as the plain protocol's payload (type and body; a
    /// block as `0x84 | piece | offset | data`). `UnexpectedEof` when the sharer closes;
    /// `InvalidData` when its bytes fail the secure layer.
    pub fn read_frame(&mut self) -> std::io::Result<Vec<u8>> {
        use p2pshare::net::peer_secure::{SealedDecoded, SealedNext};
        let bad = |e: p2pshare::net::peer_secure::PeerSecureError| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
        };
        loop {
            let n = match self.reader.next_read() {
                SealedNext::Ready => usize::MAX,
                SealedNext::Buffer(buf) => self.stream.read(buf)?,
                SealedNext::BlockData { len, .. } => {
                    let at = self.block.len();
                    self.block.resize(at + len as usize, 0);
                    let n = self.stream.read(&mut self.block[at..])?;
                    self.block.truncate(at + n);
                    n
                }
            };
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            // usize::MAX: bytes read ahead complete something, nothing was read.
            let n = if n == usize::MAX { 0 } else { n };
            match self.reader.filled(n).map_err(bad)? {
                None => {}
                Some(SealedDecoded::Established(sealer)) => self.sealer = Some(sealer),
                Some(SealedDecoded::Msg(msg)) => {
                    let mut out = Vec::new();
                    msg.emit(&mut out);
                    return Ok(out.split_off(4));
                }
                Some(SealedDecoded::BlockStart { .. }) => self.block.clear(),
                Some(SealedDecoded::BlockSealed { piece, offset, .. }) => {
                    self.reader.open_block(&mut self.block).map_err(bad)?;
                    let mut out = vec![0x84];
                    out.extend_from_slice(&piece.to_be_bytes());
                    out.extend_from_slice(&offset.to_be_bytes());
                    out.extend_from_slice(&self.block);
                    return Ok(out);
                }
            }
        }
    }

    /// Sends whole frames (each sealed as its own record); the handshake must be done (a
    /// frame was read).
    pub fn send(&mut self, frames: &[u8]) -> std::io::Result<()> {
        let Some(sealer) = self.sealer.as_mut() else {
            return Err(std::io::Error::other("the handshake is not done"));
        };
        let mut out = Vec::new();
        let mut rest = frames;
        while rest.len() >= 4 {
            let len = 4 + u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let frame = &rest[..len.min(rest.len())];
            sealer
                .seal_frame(&mut out, |o| o.extend_from_slice(frame))
                .map_err(std::io::Error::other)?;
            rest = &rest[frame.len()..];
        }
        self.stream.write_all(&out)
    }
}
