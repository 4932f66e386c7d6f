//! Flash-crowd benchmark on shaped links (`cargo bench --bench swarm`; needs root).
//!
//! Builds a test network of its own out of Linux network namespaces: a hub namespace holding
//! a bridge, and one namespace per program (the tracker, the seed, each leecher), each joined
//! to the bridge by a veth pair with a private address (10.77.0.0/24) and its upload capped by
//! a `tbf` queue on its end of the pair. Nothing is added to the namespace the benchmark runs
//! in. The seed shares a file of random bytes; every leecher then starts `download_file` at
//! the same instant, and the benchmark prints each leecher's finish time (from the command to
//! its completion line), the last, and the lower bound
//! `max(size / seed upload, leechers * size / total upload)`, and checks every copy byte for
//! byte.
//!
//! Not root, or no `ip`/`tc`: it says so and exits 0. The namespaces are deleted (which
//! removes their links) and the programs killed on every exit path: normal end, panic (a guard
//! dropped while unwinding) and SIGINT/SIGTERM (a signal thread). The programs get
//! `XDG_STATE_HOME` in the benchmark's temporary directory.
//!
//! Knobs: `SWARM_BENCH_LEECHERS` (8), `SWARM_BENCH_MIB` (64), `SWARM_BENCH_RATE` (uplink of
//! every peer in Mbit/s, 100), `SWARM_BENCH_RUNS` (1), `SWARM_BENCH_LOG` (log level of the
//! programs, `warn`), `SWARM_BENCH_TRACE` (set: every 250 ms, what each host's uplink sent,
//! read from the hub side of its veth, the seed's unacknowledged bytes per serve socket (`ss`),
//! and at the end how many times the seed sent the file), `SWARM_BENCH_NOTSENT_LOWAT` (bytes:
//! sets `net.ipv4.tcp_notsent_lowat` inside the benchmark's namespaces, to measure how much the
//! data waiting in socket buffers costs; unset: the kernel's default).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{env_or, make_file, same_contents};

const STEP_TIMEOUT: Duration = Duration::from_secs(120);
const SUBNET: &str = "10.77.0";
/// Set by the signal thread: the programs are being killed, so their silence is no failure.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// What must be undone: namespaces to delete and processes to kill.
#[derive(Default)]
struct Cleanup {
    namespaces: Vec<String>,
    pids: Vec<u32>,
    done: bool,
}

impl Cleanup {
    fn run(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        for pid in self.pids.drain(..) {
            let _ = Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Runs the cleanup when dropped (normal end and panics).
struct Guard(Arc<Mutex<Cleanup>>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(mut c) = self.0.lock() {
            c.run();
        }
    }
}

fn sh(args: &[&str]) {
    let status = Command::new(args[0])
        .args(&args[1..])
        .status()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(status.success(), "{args:?} failed: {status}");
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// The test network: a hub namespace with a bridge, one namespace per host.
struct Net {
    prefix: String,
    cleanup: Arc<Mutex<Cleanup>>,
    rate_mbit: u32,
}

impl Net {
    fn new(cleanup: Arc<Mutex<Cleanup>>, rate_mbit: u32) -> Net {
        let prefix = format!("p2ps{}", std::process::id());
        let net = Net {
            prefix,
            cleanup,
            rate_mbit,
        };
        let hub = net.ns("hub");
        net.add_ns(&hub);
        sh(&["ip", "-n", &hub, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &hub, "link", "set", "br0", "up"]);
        net
    }

    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn add_ns(&self, ns: &str) {
        // Recorded first, so that a failure half-way still deletes it.
        self.cleanup
            .lock()
            .expect("cleanup")
            .namespaces
            .push(ns.to_owned());
        sh(&["ip", "netns", "add", ns]);
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        // Only in the benchmark's own namespaces (each has its own TCP settings).
        if let Ok(v) = std::env::var("SWARM_BENCH_NOTSENT_LOWAT") {
            let set = format!("net.ipv4.tcp_notsent_lowat={v}");
            sh(&["ip", "netns", "exec", ns, "sysctl", "-q", &set]);
        }
    }

    /// A host namespace `name` at `SUBNET.host`, its upload shaped; returns its namespace.
    fn host(&self, name: &str, host: u8, shaped: bool) -> String {
        let ns = self.ns(name);
        let hub = self.ns("hub");
        self.add_ns(&ns);
        let port = format!("h{host}");
        sh(&[
            "ip", "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ]);
        sh(&[
            "ip", "-n", &hub, "link", "set", &port, "master", "br0", "up",
        ]);
        let addr = format!("{SUBNET}.{host}/24");
        sh(&["ip", "-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        if shaped {
            let rate = format!("{}mbit", self.rate_mbit);
            sh(&[
                "tc", "-n", &ns, "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", &rate,
                "burst", "256kb", "latency", "50ms",
            ]);
        }
        ns
    }
}

/// A program running in a namespace; its stdout lines arrive on a channel.
/// A program run in a network namespace (a [`common::Proc`] under `ip netns exec`), whose
/// pid the cleanup knows; once the benchmark is being stopped its silence is no failure.
struct Proc(common::Proc);

impl Proc {
    fn start(
        cleanup: &Arc<Mutex<Cleanup>>,
        ns: &str,
        bin: &str,
        args: &[&str],
        dir: &Path,
    ) -> Proc {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", ns, bin])
            .args(args)
            .env("XDG_STATE_HOME", dir)
            .current_dir(dir);
        let p = common::Proc::spawn(command, STEP_TIMEOUT);
        cleanup.lock().expect("cleanup").pids.push(p.pid());
        Proc(p)
    }

    fn send(&mut self, line: &str) {
        self.0.send(line);
    }

    fn expect(&mut self, needle: &str) -> String {
        match self.0.wait_for(needle) {
            Some(line) => line,
            None if STOPPING.load(Ordering::SeqCst) => loop {
                // The signal thread cleans up and exits the process.
                std::thread::park();
            },
            None => panic!("no line containing {needle:?} within {STEP_TIMEOUT:?}"),
        }
    }
}

/// One sample: seconds since the start, bytes sent by each host (seed first), and the
/// seed's unacknowledged bytes per serve socket.
type Sample = (f64, Vec<u64>, Vec<u64>);

/// `SWARM_BENCH_TRACE`: samples the bytes every host sent (the received bytes of the hub's end
/// of its veth: `h2` the seed, `h10`.. the leechers) every 250 ms, with one `ip netns exec`
/// per sample, and prints per window the seed's and each leecher's uplink use.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Sample>>,
    rate: f64,
}

impl Sampler {
    const EVERY: Duration = Duration::from_millis(250);

    fn start(hub: String, seed_ns: String, n_leechers: usize, rate_mbit: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let ports: Vec<String> = std::iter::once("h2".to_owned())
            .chain((0..n_leechers).map(|i| format!("h{}", 10 + i)))
            .collect();
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut samples = Vec::new();
            // Bounded in time as well: the benchmark's steps time out after STEP_TIMEOUT.
            while !flag.load(Ordering::SeqCst) && t0.elapsed() < 2 * STEP_TIMEOUT {
                let read_at = t0.elapsed().as_secs_f64();
                let paths: Vec<String> = ports
                    .iter()
                    .map(|p| format!("/sys/class/net/{p}/statistics/rx_bytes"))
                    .collect();
                let out = Command::new("ip")
                    .args(["netns", "exec", &hub, "cat"])
                    .args(&paths)
                    .output();
                if let Ok(out) = out {
                    let bytes: Vec<u64> = String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .filter_map(|l| l.trim().parse().ok())
                        .collect();
                    // The seed's serve sockets: bytes written but not yet acknowledged.
                    let queued: Vec<u64> = Command::new("ip")
                        .args([
                            "netns", "exec", &seed_ns, "ss", "-tnH", "sport", "=", ":7000",
                        ])
                        .output()
                        .map(|o| {
                            String::from_utf8_lossy(&o.stdout)
                                .lines()
                                .filter_map(|l| l.split_whitespace().nth(2)?.parse().ok())
                                .filter(|&q: &u64| q > 0)
                                .collect()
                        })
                        .unwrap_or_default();
                    if bytes.len() == ports.len() {
                        samples.push((read_at, bytes, queued));
                    }
                }
                std::thread::sleep(Self::EVERY);
            }
            samples
        });
        Sampler {
            stop,
            thread,
            rate: f64::from(rate_mbit) * 1e6 / 8.0,
        }
    }

    /// Stops sampling and prints the windows and the seed's total (in files).
    fn stop(self, size: f64) {
        self.stop.store(true, Ordering::SeqCst);
        let Ok(samples) = self.thread.join() else {
            return;
        };
        let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
            return;
        };
        for w in samples.windows(2) {
            let dt = w[1].0 - w[0].0;
            let use_of = |k: usize| (w[1].1[k] - w[0].1[k]) as f64 / (self.rate * dt) * 100.0;
            let leechers: Vec<String> = (1..w[1].1.len())
                .map(|k| format!("{:3.0}", use_of(k)))
                .collect();
            let queued: Vec<String> = w[1].2.iter().map(|q| format!("{}", q / 1024)).collect();
            println!(
                "  t={:5.2} seed {:3.0}% | leechers % {} | seed's unacknowledged KiB: {}",
                w[1].0,
                use_of(0),
                leechers.join(" "),
                queued.join(" ")
            );
        }
        let seed = (last.1[0] - first.1[0]) as f64;
        let all: f64 = (0..last.1.len())
            .map(|k| (last.1[k] - first.1[k]) as f64)
            .sum();
        println!(
            "  sent on the wire (headers included): seed {:.3}x the file, all {:.3}x",
            seed / size,
            all / size
        );
    }
}

fn run_once(
    cleanup: &Arc<Mutex<Cleanup>>,
    n_leechers: usize,
    mib: u64,
    rate_mbit: u32,
    run: usize,
) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let dir = dir.path();
    let log = std::env::var("SWARM_BENCH_LOG").unwrap_or_else(|_| "warn".into());
    let net = Net::new(Arc::clone(cleanup), rate_mbit);
    let tracker_ns = net.host("t", 1, false);
    let seed_ns = net.host("s", 2, true);
    let leecher_ns: Vec<String> = (0..n_leechers)
        .map(|i| net.host(&format!("l{i}"), 10 + i as u8, true))
        .collect();

    let info = dir.join("tracker_info.txt");
    fs::write(&info, format!("{SUBNET}.1:6000\n")).expect("tracker file");
    let info = info.to_str().expect("utf-8 path").to_owned();
    let tracker_bin = env!("CARGO_BIN_EXE_tracker_program");
    let client_bin = env!("CARGO_BIN_EXE_client_program");
    let mut tracker = Proc::start(
        cleanup,
        &tracker_ns,
        tracker_bin,
        &["--log-level", &log, &info, "1"],
        dir,
    );
    tracker.expect("listening");

    let file = dir.join("crowd.bin");
    make_file(&file, mib, run as u64);
    let addr = format!("{SUBNET}.2:7000");
    let mut seed = Proc::start(
        cleanup,
        &seed_ns,
        client_bin,
        &["--log-level", &log, &addr, &info],
        dir,
    );
    seed.send("create_user seed pw");
    seed.send("login seed pw");
    seed.expect("logged in");
    seed.send("create_group crowd");
    seed.expect("created");
    seed.send(&format!("upload_file {} crowd", file.display()));
    seed.expect("uploaded");

    let mut leechers = Vec::new();
    for (i, ns) in leecher_ns.iter().enumerate() {
        let addr = format!("{SUBNET}.{}:7000", 10 + i);
        let mut p = Proc::start(
            cleanup,
            ns,
            client_bin,
            &["--log-level", &log, &addr, &info],
            dir,
        );
        let user = format!("l{i}");
        p.send(&format!("create_user {user} pw"));
        p.send(&format!("login {user} pw"));
        p.expect("logged in");
        p.send("join_group crowd");
        p.expect("request to join");
        seed.send(&format!("accept_request crowd {user}"));
        seed.expect("accepted");
        leechers.push(p);
    }

    let targets: Vec<PathBuf> = (0..n_leechers)
        .map(|i| dir.join(format!("out-{i}.bin")))
        .collect();
    let tracing = std::env::var_os("SWARM_BENCH_TRACE").is_some();
    let sampler =
        tracing.then(|| Sampler::start(net.ns("hub"), seed_ns.clone(), n_leechers, rate_mbit));
    let t0 = Instant::now();
    for (p, target) in leechers.iter_mut().zip(&targets) {
        p.send(&format!(
            "download_file crowd crowd.bin {}",
            target.display()
        ));
    }
    let mut times = Vec::new();
    for (i, p) in leechers.iter_mut().enumerate() {
        let line = p.expect("downloaded ");
        let t = t0.elapsed().as_secs_f64();
        times.push((t, i, line));
    }
    // Lines are read in leecher order: a later leecher's line may have waited; take each
    // leecher's own reported duration as well.
    let size = (mib * 1024 * 1024) as f64;
    let rate = f64::from(rate_mbit) * 1e6 / 8.0;
    let bound = (size / rate).max(n_leechers as f64 * size / ((n_leechers + 1) as f64 * rate));
    let mut last = 0.0f64;
    for (_, i, line) in &times {
        // "... (N bytes in T s, R MiB/s)": the client's own clock from its command.
        let own = line
            .split(" bytes in ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|t| t.parse::<f64>().ok())
            .unwrap_or(f64::NAN);
        println!("  leecher {i}: {own:.2} s");
        last = last.max(own);
    }
    if let Some(sampler) = sampler {
        sampler.stop(size);
    }
    let all_same = targets.iter().all(|t| same_contents(&file, t));
    println!(
        "{n_leechers} leechers, {mib} MiB, {rate_mbit} Mbit/s uplinks: last {last:.2} s, bound {bound:.2} s ({:.2}x); every copy identical: {all_same}",
        last / bound
    );
    drop(leechers);
    drop(seed);
    drop(tracker);
    if let Ok(mut c) = cleanup.lock() {
        c.run();
        *c = Cleanup::default();
    }
    assert!(all_same, "a copy differs");
}

fn main() {
    if !is_root() {
        println!("swarm bench: skipped (network namespaces need root)");
        return;
    }
    if !have("ip") || !have("tc") {
        println!("swarm bench: skipped (needs the ip and tc commands)");
        return;
    }
    let n_leechers: usize = env_or("SWARM_BENCH_LEECHERS", 8).clamp(1, 200);
    let mib: u64 = env_or("SWARM_BENCH_MIB", 64);
    let rate_mbit: u32 = env_or("SWARM_BENCH_RATE", 100);
    let runs: usize = env_or("SWARM_BENCH_RUNS", 1);

    let cleanup = Arc::new(Mutex::new(Cleanup::default()));
    let _guard = Guard(Arc::clone(&cleanup));
    // SIGINT/SIGTERM: clean up, then exit.
    {
        let cleanup = Arc::clone(&cleanup);
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
        ])
        .expect("signal handlers");
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                STOPPING.store(true, Ordering::SeqCst);
                eprintln!("swarm bench: signal {sig}: cleaning up");
                if let Ok(mut c) = cleanup.lock() {
                    c.run();
                }
                std::process::exit(130);
            }
        });
    }
    for run in 0..runs {
        if STOPPING.load(Ordering::SeqCst) {
            break;
        }
        run_once(&cleanup, n_leechers, mib, rate_mbit, run);
    }
}
