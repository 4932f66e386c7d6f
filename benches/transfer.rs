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
//!   and per GiB, and the sharers' together per GiB (what sealing costs them; the sharers'
//!   processes also hash the upload, which is over before the download starts),
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
//! benchmark's switch `P2PSHARE_BENCH_PLAINTEXT_PEER_LINKS=1`, the comparison in the same run;
//! odd-numbered runs take the modes in the reverse order).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{cpu_secs, env_or, free_port, make_file, same_contents, status_kib, Proc};

const STEP_TIMEOUT: Duration = Duration::from_secs(300);

/// Starts `bin` like `Proc::start`; `plain`: peer links in the plain protocol (the
/// benchmark's comparison, through the bench-only environment switch).
fn start_mode(bin: &str, args: &[&str], dir: &Path, plain: bool) -> Proc {
    let mut command = Command::new(bin);
    command
        .args(args)
        .env("XDG_STATE_HOME", dir)
        .env(
            "P2PSHARE_BENCH_PLAINTEXT_PEER_LINKS",
            if plain { "1" } else { "0" },
        )
        .current_dir(dir);
    Proc::spawn(command, STEP_TIMEOUT)
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
        let mut p = start_mode(client, &["--serve", &addr, info], &setup.dir, plain);
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
            start_mode(program, &words, &setup.dir, plain)
        }
        _ => start_mode(client, &client_args, &setup.dir, plain),
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
    let cpu0 = cpu_secs(d.pid()).unwrap_or(0.0);
    let sharers_cpu = |sharers: &[Proc]| -> f64 {
        sharers
            .iter()
            .map(|p| cpu_secs(p.pid()).unwrap_or(0.0))
            .sum()
    };
    let sharers_cpu0 = sharers_cpu(&sharers);
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
    let mut peak_anon = status_kib(d.pid(), "RssAnon").unwrap_or(0);
    let line = loop {
        match d.next_line(Duration::from_millis(5)) {
            Ok(line) if line.starts_with("downloaded ") => break line,
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                assert!(t0.elapsed() < STEP_TIMEOUT, "download did not finish");
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("downloader exited"),
        }
        peak_anon = peak_anon.max(status_kib(d.pid(), "RssAnon").unwrap_or(0));
    };
    let outside = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs(d.pid()).unwrap_or(0.0) - cpu0;
    let served_cpu = sharers_cpu(&sharers) - sharers_cpu0;
    peak_anon = peak_anon.max(status_kib(d.pid(), "RssAnon").unwrap_or(0));
    let gib = mib as f64 / 1024.0;
    let identical = same_contents(&setup.file, &target);
    println!(
        "{mode:>6}: {mib} MiB from {n_sharers} sharer(s): {:.0} MiB/s (outside: {outside:.3} s), downloader CPU {cpu:.2} s ({:.2} s/GiB), sharers {:.2} CPU-s/GiB, peak anon {:.1} MiB, identical: {identical}",
        mib as f64 / outside,
        cpu / gib,
        served_cpu / gib,
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
        STEP_TIMEOUT,
    );
    tracker.expect("listening");
    let file = dir.path().join("data.bin");
    let t0 = Instant::now();
    make_file(&file, mib, 0);
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
            // Odd runs take the modes in the other order: whichever goes first lands on
            // the memory the previous run freed, which on this VM is not always equally
            // warm (see the README), so neither mode keeps that place.
            let mut order = modes.clone();
            if run % 2 == 1 {
                order.reverse();
            }
            for plain in order {
                run_once(&setup, n, mib, run, plain);
            }
        }
    }
}
