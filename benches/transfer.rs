//! Download throughput benchmark (`cargo bench --bench transfer`).
//!
//! Starts the real binaries (release builds under `cargo bench`) on loopback: one tracker, N
//! sharers and one downloader. A file of random bytes is generated, every sharer uploads it
//! (the first upload's time is the hashing figure), then the downloader fetches it and the
//! benchmark prints, per run:
//!
//! - MiB/s over the whole download (from `download_file` to the completion line, as the
//!   client itself reports it, and as seen from outside),
//! - the downloader's CPU seconds (user + system, from `/proc/<pid>/stat`) during the download,
//!   and per GiB,
//! - the downloader's peak anonymous memory (`RssAnon` of `/proc/<pid>/status`, sampled every
//!   few milliseconds; the mapped file's pages are file-backed and not counted),
//! - that the result is byte-identical (compared with `cmp`-like reading).
//!
//! Knobs: `TRANSFER_BENCH_MIB` (file size, default 1024), `TRANSFER_BENCH_SHARERS` (comma
//! list, default `1,4`), `TRANSFER_BENCH_RUNS` (runs per sharer count, default 1),
//! `TRANSFER_BENCH_DIR` (where the files go, default the system temp dir),
//! `TRANSFER_BENCH_WRAP` (a command to run the downloader under, e.g. a profiler),
//! `TRANSFER_BENCH_LOG` (the downloader's log level, default `warn`), `TRANSFER_BENCH_MODES`
//! (comma list of `secure` and `plain`, default `secure,plain`: each run is made with
//! encrypted peer links, then with every client of the run in the plain protocol through the
//! benchmark's switch `P2PSHARE_BENCH_PLAINTEXT_PEER_LINKS=1`, the comparison in the same run).

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

const CLOCK_TICKS: f64 = 100.0;
const STEP_TIMEOUT: Duration = Duration::from_secs(300);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A running program whose stdout lines arrive on a channel; killed on drop.
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Proc {
    fn start(bin: &str, args: &[&str], dir: &Path) -> Proc {
        Self::start_mode(bin, args, dir, false)
    }

    /// `plain`: peer links in the plain protocol (the benchmark's comparison).
    fn start_mode(bin: &str, args: &[&str], dir: &Path, plain: bool) -> Proc {
        // State (keys, data, client state) goes in the bench's directory, never the real home.
        let mut child = Command::new(bin)
            .env("XDG_STATE_HOME", dir)
            .env(
                "P2PSHARE_BENCH_PLAINTEXT_PEER_LINKS",
                if plain { "1" } else { "0" },
            )
            .args(args)
            .current_dir(dir)
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
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write a command");
        stdin.flush().expect("flush");
    }

    /// Waits for a stdout line containing `needle`; returns it.
    fn expect(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("no line containing {needle:?} within {STEP_TIMEOUT:?}"),
            }
        }
    }

    /// Closes stdin and gives the program a few seconds to exit on its own (a profiler
    /// wrapping it then writes its data) before it is killed.
    fn finish(mut self) {
        self.stdin = None;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// user + system CPU seconds of a process so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat; here, after the name and state, 11 and 12.
    (ticks(11) + ticks(12)) / CLOCK_TICKS
}

/// Anonymous resident memory of a process in KiB.
fn rss_anon_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Writes `mib` MiB of pseudo-random bytes (xorshift, fast enough not to matter).
fn make_file(path: &Path, mib: u64) {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, File::create(path).expect("create"));
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
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

fn same_contents(a: &Path, b: &Path) -> bool {
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

struct Setup {
    dir: PathBuf,
    tracker_info: PathBuf,
    _tracker: Proc,
    file: PathBuf,
}

fn run_once(setup: &Setup, n_sharers: usize, mib: u64, run: usize, plain: bool) {
    let client = env!("CARGO_BIN_EXE_client_program");
    let info = setup.tracker_info.to_str().expect("utf-8 path");
    let mode = if plain { "plain" } else { "secure" };
    let tag = format!("s{n_sharers}r{run}{mode}");
    let group = format!("g{tag}");

    let mut sharers = Vec::new();
    for i in 0..n_sharers {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut p = Proc::start_mode(client, &["--serve", &addr, info], &setup.dir, plain);
        let user = format!("u{i}{tag}");
        p.send(&format!("create_user {user} pw"));
        p.send(&format!("login {user} pw"));
        p.expect("logged in");
        if i == 0 {
            p.send(&format!("create_group {group}"));
            p.expect("created");
        } else {
            p.send(&format!("join_group {group}"));
            p.expect("request to join");
            let owner: &mut Proc = &mut sharers[0];
            owner.send(&format!("accept_request {group} {user}"));
            owner.expect("accepted");
        }
        let t0 = Instant::now();
        p.send(&format!("upload_file {} {group}", setup.file.display()));
        p.expect(" group ");
        if i == 0 && run == 0 && !plain {
            println!(
                "upload (hash {mib} MiB, 512 KiB pieces + whole-file SHA1): {:.3} s",
                t0.elapsed().as_secs_f64()
            );
        }
        sharers.push(p);
    }

    let addr = format!("127.0.0.1:{}", free_port());
    // TRANSFER_BENCH_WRAP runs the downloader under another program (a profiler, say:
    // `perf record -g -o /tmp/d.data --`); its CPU and memory figures are then the wrapper's.
    // TRANSFER_BENCH_LOG sets the downloader's log level (`info` shows how many pieces were fed
    // to the whole-file digest as they were verified).
    let log_level = std::env::var("TRANSFER_BENCH_LOG").unwrap_or_else(|_| "warn".into());
    let client_args = ["--log-level", &log_level, &addr, info];
    let mut d = match std::env::var("TRANSFER_BENCH_WRAP") {
        Ok(wrap) if !wrap.trim().is_empty() => {
            let mut words: Vec<&str> = wrap.split_whitespace().collect();
            let program = words.remove(0);
            words.push(client);
            words.extend(client_args);
            Proc::start_mode(program, &words, &setup.dir, plain)
        }
        _ => Proc::start_mode(client, &client_args, &setup.dir, plain),
    };
    let user = format!("d{tag}");
    d.send(&format!("create_user {user} pw"));
    d.send(&format!("login {user} pw"));
    d.expect("logged in");
    d.send(&format!("join_group {group}"));
    d.expect("request to join");
    sharers[0].send(&format!("accept_request {group} {user}"));
    sharers[0].expect("accepted");
    let target = setup.dir.join(format!("out-{tag}"));
    let cpu0 = cpu_secs(d.pid());
    let t0 = Instant::now();
    d.send(&format!(
        "download_file {group} {} {}",
        setup
            .file
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name"),
        target.display()
    ));
    // Sample memory until the completion line.
    let mut peak_anon = rss_anon_kib(d.pid());
    let line = loop {
        match d.lines.recv_timeout(Duration::from_millis(5)) {
            Ok(line) if line.starts_with("downloaded ") => break line,
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                assert!(t0.elapsed() < STEP_TIMEOUT, "download did not finish");
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("downloader exited"),
        }
        peak_anon = peak_anon.max(rss_anon_kib(d.pid()));
    };
    let outside = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs(d.pid()) - cpu0;
    peak_anon = peak_anon.max(rss_anon_kib(d.pid()));
    let gib = mib as f64 / 1024.0;
    let identical = same_contents(&setup.file, &target);
    println!(
        "{mode:>6}: {mib} MiB from {n_sharers} sharer(s): {:.0} MiB/s (outside: {outside:.3} s), downloader CPU {cpu:.2} s ({:.2} s/GiB), peak anon {:.1} MiB, identical: {identical}",
        mib as f64 / outside,
        cpu / gib,
        peak_anon as f64 / 1024.0
    );
    println!("  client said: {line}");
    d.finish();
    assert!(identical, "the downloaded file differs");
    let _ = fs::remove_file(&target);
}

fn main() {
    let mib: u64 = env_or("TRANSFER_BENCH_MIB", 1024);
    let runs: usize = env_or("TRANSFER_BENCH_RUNS", 1);
    let sharer_counts: Vec<usize> = std::env::var("TRANSFER_BENCH_SHARERS")
        .unwrap_or_else(|_| "1,4".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let base = std::env::var_os("TRANSFER_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(base).expect("a temp dir");
    let tracker_port = free_port();
    let tracker_info = dir.path().join("tracker_info.txt");
    fs::write(&tracker_info, format!("127.0.0.1:{tracker_port}\n")).expect("tracker file");
    let mut tracker = Proc::start(
        env!("CARGO_BIN_EXE_tracker_program"),
        &[tracker_info.to_str().expect("utf-8"), "1"],
        dir.path(),
    );
    tracker.expect("listening");
    let file = dir.path().join("data.bin");
    let t0 = Instant::now();
    make_file(&file, mib);
    println!(
        "generated {mib} MiB in {:.2} s; cores: {}",
        t0.elapsed().as_secs_f64(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let setup = Setup {
        dir: dir.path().to_path_buf(),
        tracker_info,
        _tracker: tracker,
        file,
    };
    let modes: Vec<bool> = std::env::var("TRANSFER_BENCH_MODES")
        .unwrap_or_else(|_| "secure,plain".into())
        .split(',')
        .filter_map(|m| match m.trim() {
            "secure" => Some(false),
            "plain" => Some(true),
            _ => None,
        })
        .collect();
    for &n in &sharer_counts {
        for run in 0..runs {
            for &plain in &modes {
                run_once(&setup, n, mib, run, plain);
            }
        }
    }
}
